"""Lineage graphs as Mermaid flowcharts: the text the Registry view, the Home tab and
`weightsmith registry lineage --mermaid` draw.

A graph is the `{root, nodes, edges}` mapping that `Registry.lineage` and `Registry.lab_graph`
return (`root` may be None); nodes of kind "dataset" are drawn as cylinders, and their
"data" edges dashed. Every text from the registry (names, tasks, metrics, relations,
roles) goes through `mermaid_text` inside a quoted label; only the `<br/>` and `<b>` written
here are markup.

Mermaid refuses a diagram of more than 50,000 characters or 500 edges (its `maxTextSize` and
`maxEdges`, which a diagram cannot raise: they are "secure" settings, and Gradio's Markdown
initializes Mermaid with the defaults). `fit` leaves out the nodes farthest from the root (or,
without a root, the oldest) until the text fits, and says how many it left out.
"""

from __future__ import annotations

from collections import deque

# Mermaid's limits, with room to spare (the browser measures the text after HTML decoding,
# which turns `&gt;` back into the `>` counted here)
MAX_CHARS = 48_000
MAX_EDGES = 480

_MERMAID_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "
                           "_.,=+-/@*")  # no ":": ":::" starts a class, even in a label


def mermaid_text(text) -> str:
    """`text` as the literal characters of a quoted Mermaid label: every character outside
    a small plain set becomes Mermaid's entity code (`#60;` for `<`), so that quotes,
    brackets, pipes, parentheses, `#`, HTML, unicode and spaces all show as typed and none
    ends the label or becomes markup."""
    text = str(text)
    # a space at either end, or after a space, is encoded too: Mermaid trims labels
    return "".join(c if c in _MERMAID_PLAIN and not (
        c == " " and (i == 0 or i == len(text) - 1 or text[i - 1] == " "))
        else f"#{ord(c)};" for i, c in enumerate(text))


def mermaid_id(ck_id: str) -> str:
    """A node id Mermaid accepts whatever the checkpoint id (synced ids come from other labs):
    letters, digits and `_`, prefixed so that no id is a Mermaid keyword (`end`, `graph`).
    Reversible: every other character, `_` included, becomes `_<hex code>_`; lineage.js
    decodes it back to open the checkpoint a node shows."""
    return "n_" + "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):x}_"
                          for c in str(ck_id))


def split_key(key: str) -> tuple[str, str]:
    """("task", "metric") of a score key "task/metric" (a task may hold a `/`)."""
    task, _, metric = str(key).rpartition("/")
    return task, metric


def score_keys(graph: dict) -> list[str]:
    """Every "task/metric" scored on a node of the graph, sorted: the choices of "Scores on
    nodes"."""
    return sorted({k for n in graph["nodes"] for k in (n.get("scores") or {})})


def default_scores(graph: dict) -> list[str]:
    """One headline metric per task, for every task scored in the graph: the first metric
    recorded for the task (nodes oldest first, each node's scores in the order they were
    first recorded)."""
    first: dict[str, str] = {}
    for n in graph["nodes"]:
        for key in n.get("scores") or {}:
            first.setdefault(split_key(key)[0], key)
    return list(first.values())


def _label(node: dict, scores: list[str]) -> str:
    label = mermaid_text(node["name"])
    mine = node.get("scores") or {}
    tasks: dict[str, list[str]] = {}
    for key in scores:
        if key in mine:
            task, metric = split_key(key)
            tasks.setdefault(task, []).append(f"{mermaid_text(metric)} = {mine[key]:.4g}")
    for task, lines in tasks.items():
        label += f"<br/><b>{mermaid_text(task)}</b><br/>" + "<br/>".join(lines)
    return label


def mermaid(graph: dict, scores: list[str] | None = None) -> str:
    """Mermaid flowchart text for a lineage graph: each node shows its name, then the
    `scores` ("task/metric" keys; default: `default_scores`) it has; each edge its relation,
    weight and role; the root (if any) drawn thicker. Node ids are `mermaid_id`s."""
    if scores is None:
        scores = default_scores(graph)
    lines = ["graph TD"]
    for n in graph["nodes"]:
        if n.get("kind") == "dataset":  # a cylinder: data, not a checkpoint
            lines.append(f'{mermaid_id(n["id"])}[("{_data_label(n)}")]:::dataset')
            continue
        style = ":::root" if n["id"] == graph.get("root") else ""
        lines.append(f'{mermaid_id(n["id"])}["{_label(n, scores)}"]{style}')
    for e in graph["edges"]:
        tag = str(e["relation"])
        if e.get("weight") is not None:
            tag += f" {e['weight']:g}"
        if e.get("role"):
            tag += f" ({e['role']})"
        arrow = "-->"
        if e["relation"] == "data":  # dashed, labelled with the config field that read it
            arrow, tag = "-.->", str(e.get("role") or "data")
        lines.append(f'{mermaid_id(e["parent"])} {arrow}|"{mermaid_text(tag)}"| '
                     f'{mermaid_id(e["child"])}')
    lines.append("classDef root stroke-width:3px")
    if any(n.get("kind") == "dataset" for n in graph["nodes"]):
        lines.append("classDef dataset fill:#ecfeff,stroke:#0e7490")
    return "\n".join(lines)


def _data_label(node: dict) -> str:
    """A dataset node's label: its name, then its rows and format where known."""
    facts = []
    if node.get("rows") is not None:
        facts.append(f"{node['rows']} rows")
    if node.get("format"):
        facts.append(str(node["format"]))
    label = mermaid_text(node["name"])
    return label + (f"<br/>{mermaid_text(', '.join(facts))}" if facts else "")


def _priority(graph: dict) -> list[str]:
    """Node ids, the ones to keep first: by distance from the root (edges either way), then
    newest first; without a root, newest first."""
    order = {n["id"]: i for i, n in enumerate(graph["nodes"])}  # oldest first
    dist: dict[str, int] = {}
    root = graph.get("root")
    if root in order:
        near: dict[str, set[str]] = {}
        for e in graph["edges"]:
            near.setdefault(e["parent"], set()).add(e["child"])
            near.setdefault(e["child"], set()).add(e["parent"])
        dist[root] = 0
        queue = deque([root])
        while queue:
            node = queue.popleft()
            for other in near.get(node, ()):
                if other not in dist:
                    dist[other] = dist[node] + 1
                    queue.append(other)
    far = len(order) + 1
    return sorted(order, key=lambda i: (dist.get(i, far), -order[i]))


def subgraph(graph: dict, keep: set[str]) -> dict:
    return {**graph, "nodes": [n for n in graph["nodes"] if n["id"] in keep],
            "edges": [e for e in graph["edges"] if e["parent"] in keep and e["child"] in keep]}


def fit(graph: dict, scores: list[str] | None = None, max_chars: int = MAX_CHARS,
        max_edges: int = MAX_EDGES) -> tuple[dict, int]:
    """(the graph Mermaid can draw, how many nodes were left out): the whole graph when its
    text and edges are within Mermaid's limits, else the largest prefix of `_priority` that
    is (a binary search over the prefix length)."""
    if scores is None:
        scores = default_scores(graph)

    def fits(g: dict) -> bool:
        return len(g["edges"]) <= max_edges and len(mermaid(g, scores)) <= max_chars

    if fits(graph):
        return graph, 0
    ranked = _priority(graph)
    lo, hi = 0, len(ranked)  # prefix lo fits, prefix hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(subgraph(graph, set(ranked[:mid]))):
            lo = mid
        else:
            hi = mid
    return subgraph(graph, set(ranked[:lo])), len(ranked) - lo
