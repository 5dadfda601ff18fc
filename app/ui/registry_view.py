"""The Registry tab: the checkpoints, the selected one's details, the Python that loads it and
a zip of its folder, its lineage graph (Mermaid: around it or the whole lab, the scores one
picks on the nodes; static/lineage.js makes nodes clickable and the graph pan and zoom), its
per-layer series, the suggested next step ("Use as input of"), and import, delete, publish to
the Hub and registry sync. `lineage_block` and `lab_graph_markdown` draw the graph on other
tabs too."""

from dataclasses import dataclass
from pathlib import Path

import plugins
from app import auth
from app.auth import NotAllowed
from app.checkpoints import import_checkpoint, to_json
from app.lab import Lab
from app.ui.shared import checkpoint_choices, copy_first_cell, request_user, text_md
from plugins.kit import markup
from registry import CheckpointError, RefError, RegistryError

CK_COLUMNS = ["id", "name", "relation", "parents", "params", "size", "scores", "job"]


# ---------------------------------------------------------------------------------- handlers
def checkpoint_table(lab: Lab, search: str = "") -> list[list]:
    with lab.registry() as reg:
        rows = reg.list_checkpoints(search=search or None, limit=200)
    return [[r["id"], r["name"], r["relation"], ", ".join(r["parents"]),
             f"{r['param_count'] / 1e6:.2f}M" if r["param_count"] else "",
             f"{r['size_bytes'] / 2**20:.1f} MiB" if r["size_bytes"] else "",
             "; ".join(f"{k} = {v:.4g}" for k, v in r["scores"].items()), r["job_id"] or ""]
            for r in rows]


def checkpoint_detail(lab: Lab, ck_id: str | None) -> tuple[str, str, dict]:
    """(summary markdown, lineage graph markdown with a Mermaid diagram, details JSON)."""
    if not ck_id:
        return "Select a checkpoint in the table.", "", {}
    try:
        with lab.registry() as reg:
            row = to_json(reg.checkpoint(ck_id))
            parents = reg.parents(row["id"])
            evaluations = reg.evaluations(row["id"])
            deltas = reg.score_deltas(row["id"])
            graph = reg.lineage(row["id"], max_depth=LINEAGE_DEPTH, datasets=True)
            data = reg.datasets.of_job(row["job_id"]) if row["job_id"] else []
    except RegistryError as e:
        return markup.md(e), "", {}
    md = markup.md  # every value below may be a member's text: shown literally
    summary = (f"### {md(row['name'])}  ({md(row['id'])})\n{md(row['relation'])} · "
               f"{md(row['architecture'] or '')} · "
               f"{(row['param_count'] or 0) / 1e6:.2f}M params · {md(row['dtype'] or '')} · "
               f"created {row['created_at'][:19].replace('T', ' ')} by "
               f"{md(row['created_by'] or '-')}"
               + (f" · job {md(row['job_id'])}" if row["job_id"] else ""))
    if parents:
        summary += "\n\nParents: " + ", ".join(
            f"{md(p['parent_name'])} ({md(p['relation'])}"
            + (f", weight {p['weight']:g}" if p["weight"] is not None else "")
            + (f", {md(p['role'])}" if p["role"] else "") + ")" for p in parents)
    if data:  # what its job read: each dataset opens in the Datasets tab
        from app.ui.navigation import link

        summary += "\n\nData: " + ", ".join(
            f"{link(md(d['name']), tab='datasets', ds=d['id'])} ({md(d['field'])}, "
            f"{md(d['id'])})" for d in data)
    if row.get("hub_repo") or row.get("sync_status"):
        summary += (f"\n\nHub: {md(row['hub_repo'] or '-')} · {md(row['sync_status'] or '-')}"
                    + (f" at {md(row['hub_commit'][:12])}" if row.get("hub_commit") else "")
                    + (f" · {md(row['sync_error'])}" if row.get("sync_status") == "sync_failed"
                       else ""))
    if row["path"]:
        summary += f"\n\nFolder: {md(row['path'])}"
    else:
        summary += "\n\nRemote only: no files in this lab (import its Hub id to get them)."
    if deltas:  # a table: one row per metric, one column per parent
        names = list(dict.fromkeys(d["parent_name"] for d in deltas))
        table: dict[str, dict] = {}
        for d in deltas:
            table.setdefault(d["metric"], {"value": d["value"]})[d["parent_name"]] = d["delta"]
        summary += ("\n\n**Scores against parents**\n\n| metric | value | "
                    + " | ".join(f"vs {md(n)}" for n in names) + " |\n|---|---|"
                    + "---|" * len(names) + "\n"
                    + "\n".join(f"| {md(m)} | {v['value']:.4g} | " + " | ".join(
                        f"{v[n]:+.4g}" if n in v else "" for n in names) + " |"
                        for m, v in table.items()))
    meta = to_json(row).get("metadata")
    numbers = lambda v: isinstance(v, list) and all(type(i) is int for i in v)  # noqa: E731
    if isinstance(meta, dict) and numbers(meta.get("layer_map")) and \
            numbers(meta.get("new_layers") or []):
        lm = meta["layer_map"]  # numbers only, so the code span shows them as they are
        summary += (f"\n\nLayer map ({len(lm)} layers; new layer i is a copy of old layer "
                    f"map[i]): `{lm}`" + (f" · new blocks {meta['new_layers']}"
                                          if meta.get("new_layers") else ""))
    if isinstance(meta, dict) and isinstance(meta.get("sparsity"), (int, float)):
        summary += (f"\n\n{md(meta.get('method', ''))} sparsity {meta['sparsity']:.1%}"
                    + (f" ({md(meta['pattern'])})" if meta.get("pattern") else ""))
    files = sorted(p.name for p in Path(row["path"]).iterdir()) if row["path"] and \
        Path(row["path"]).is_dir() else []
    details = {"config": row.get("config"), "versions": row.get("versions"),
               "metadata": row.get("metadata"), "content_hash": row["content_hash"],
               "folder": row["path"], "files": files,
               "evaluations": [{k: e[k] for k in ("task", "metric", "value", "job_id")}
                               for e in evaluations]}
    return summary, graph_markdown(graph), details


# ---------------------------------------------------------------------------- lineage graph
LINEAGE_DEPTH = 20  # generations drawn above and below the selected checkpoint
AROUND, WHOLE_LAB = "Ancestors and descendants", "Whole lab"
LAB_LIMIT = 100  # the whole lab's graph: the latest this many checkpoints (0: all)
LAB_MAX = 1000  # ... and never more than this many read ("all" in a lab of 100k)


def graph_markdown(graph: dict | None, scores: list[str] | None = None) -> str:
    """Markdown with the Mermaid flowchart of a lineage graph (registry/lineage.py), `scores`
    ("task/metric" keys) on its nodes (None: one headline metric per task). A graph over
    Mermaid's limits is cut to what it draws, with a line saying so. Show it in an element
    with class "ws-lineage" (`lineage_block` makes one): lineage.js then makes its nodes open
    their checkpoint and lets it pan and zoom."""
    from registry import lineage

    if not graph or not graph["nodes"]:
        return "No checkpoints to draw."
    if scores is None:
        scores = lineage.default_scores(graph)
    shown, left_out = lineage.fit(graph, scores)
    text = f"```mermaid\n{lineage.mermaid(shown, scores)}\n```"
    if left_out:
        text += (f"\n\nShowing {len(shown['nodes'])} of {len(graph['nodes'])} checkpoints "
                 f"(the nearest, or the newest): Mermaid draws at most "
                 f"{lineage.MAX_EDGES} edges and {lineage.MAX_CHARS:,} characters. Narrow it "
                 f"with the name filter or the number of checkpoints.")
    return text


def _limit(limit) -> int:
    """The number of checkpoints to read for the whole lab's graph: 0 (or nothing) means
    all, up to LAB_MAX (Mermaid could never draw more: `lineage.fit` keeps the newest)."""
    try:
        n = int(limit or 0)
    except (TypeError, ValueError, OverflowError):
        n = 0
    return min(n, LAB_MAX) if n > 0 else LAB_MAX


def lineage_graph(lab: Lab, ck_id: str | None, whole_lab: bool = False, limit=LAB_LIMIT,
                  search: str | None = None) -> dict | None:
    """The graph to draw: the lab's (the latest `limit`, 0 or None: all, names containing
    `search`), or the selected checkpoint's ancestors and descendants; None when there is
    no checkpoint to draw around (or it is not in the registry)."""
    with lab.registry() as reg:
        if whole_lab:
            return reg.lab_graph(_limit(limit), (search or "").strip() or None, datasets=True)
        if not ck_id:
            return None
        try:
            return reg.lineage(ck_id, max_depth=LINEAGE_DEPTH, datasets=True)
        except RegistryError:
            return None


def lab_graph_markdown(lab: Lab, limit=LAB_LIMIT, search: str | None = None,
                       scores: list[str] | None = None) -> str:
    """The whole lab's lineage graph as Markdown (for the Home tab and others): the latest
    `limit` checkpoints (0 or None: all) whose name or id contains `search`, `scores` on the
    nodes (None: one headline metric per task). Put it in a gr.Markdown with
    elem_classes=["ws-lineage"] (or use `lineage_block`)."""
    return graph_markdown(lineage_graph(lab, None, True, limit, search), scores)


def lineage_view(lab: Lab, ck_id: str | None, mode: str | None, limit, search: str | None,
                 scores: list[str] | None, keep_scores: bool = True) -> tuple[str, object]:
    """(the graph's Markdown, the "Scores on nodes" update): the choices are every score
    key in the graph; the value keeps the picked keys still there (`keep_scores`), else the
    defaults."""
    import gradio as gr

    from registry import lineage

    graph = lineage_graph(lab, ck_id, mode == WHOLE_LAB, limit, search)
    if graph is None:
        return ("Select a checkpoint in the table." if mode != WHOLE_LAB else
                "No checkpoints to draw."), gr.Dropdown(choices=[], value=[], multiselect=True)
    keys = lineage.score_keys(graph)
    picked = [k for k in scores or [] if k in keys] if keep_scores and scores is not None \
        else lineage.default_scores(graph)
    return graph_markdown(graph, picked), gr.Dropdown(choices=keys, value=picked,
                                                      multiselect=True)


def graph_scores(lab: Lab, ck_id: str | None, mode: str | None, limit,
                 search: str | None) -> object:
    """The "Scores on nodes" of a newly selected graph: all its keys, the defaults picked."""
    import gradio as gr

    from registry import lineage

    graph = lineage_graph(lab, ck_id, mode == WHOLE_LAB, limit, search)
    if graph is None:
        return gr.Dropdown(choices=[], value=[], multiselect=True)
    return gr.Dropdown(choices=lineage.score_keys(graph), value=lineage.default_scores(graph),
                       multiselect=True)


@dataclass
class LineageBlock:
    """A lineage graph and its controls (`lineage_block`). `load(app)` draws it when the
    page loads (a block with no selected checkpoint: the whole lab)."""

    mode: object | None
    limit: object | None
    search: object | None
    scores: object
    graph: object
    draw: object = None  # (ck, mode, limit, search) -> (graph markdown, scores update)
    inputs: list | None = None

    def load(self, loads) -> None:
        """Draw the graph as it is now on each page load (`loads`: the page's one load
        event, an app.ui.shared.Ticks)."""
        loads.add(self.draw, self.inputs, [self.graph, self.scores])


def lineage_block(lab: Lab, elem_id: str = "lineage", whole_lab: bool = True,
                  selected=None, label: str = "Lineage") -> LineageBlock:
    """A lineage graph with "Scores on nodes" and, with `whole_lab`, the choice between the
    `selected` checkpoint's lineage (a gr.Textbox; None: only the whole lab) and the whole
    lab's (latest N, name filter). Call inside a gr.Blocks; the events are wired here. A
    click on a node opens that checkpoint in the Registry tab (lineage.js), from any tab."""
    import gradio as gr

    mode = limit = search = None
    if whole_lab:
        with gr.Row():
            if selected is not None:
                mode = gr.Radio([AROUND, WHOLE_LAB], value=AROUND, label="Graph", scale=2,
                                elem_id=f"{elem_id}-mode")
            limit = gr.Number(value=LAB_LIMIT, precision=0, minimum=0, scale=1,
                              label="Whole lab: latest N checkpoints (0: all)",
                              elem_id=f"{elem_id}-limit")
            search = gr.Textbox(label="Whole lab: name filter", scale=2,
                                elem_id=f"{elem_id}-search")
    scores = gr.Dropdown(choices=[], value=[], multiselect=True, label="Scores on nodes",
                         elem_id=f"{elem_id}-scores",
                         info="Scores shown on the graph's nodes (task/metric)")
    graph = text_md(label=label, elem_id=elem_id, elem_classes=["ws-lineage"])
    block = LineageBlock(mode, limit, search, scores, graph)
    # hidden components where this block shows no control (no gr.State: see app.ui)
    ck = selected if selected is not None else gr.Textbox(visible=False)
    state_default = WHOLE_LAB if selected is None else AROUND
    state_mode = mode if mode is not None else gr.Textbox(state_default, visible=False)
    extra = [limit if limit is not None else gr.Number(LAB_LIMIT, visible=False),
             search if search is not None else gr.Textbox(visible=False)]

    def redraw(c, m, n, q, picked):
        return lineage_view(lab, c, m, n, q, picked)[0]

    def repick(c, m, n, q):
        return lineage_view(lab, c, m, n, q, None, keep_scores=False)

    inputs = [ck, state_mode, *extra]
    # programmatic updates of the dropdown fire .change, not .input: no redraw loops
    scores.input(redraw, inputs=inputs + [scores], outputs=graph,
                 api_visibility="private", show_progress="hidden")
    triggers = ([mode.input] if mode is not None else []) + [
        event for box in (limit, search) if box is not None for event in (box.submit, box.blur)]
    if triggers:
        gr.on(triggers, repick, inputs=inputs, outputs=[graph, scores],
              api_visibility="private")
    block.draw = lambda c=None, m=None, n=LAB_LIMIT, q="": repick(c, m or state_default, n, q)
    block.inputs = inputs
    return block


def load_code(lab: Lab, ck_id: str | None) -> str:
    """The Python that loads a checkpoint: `from_pretrained` of its folder, or for a PEFT
    adapter the adapter over its base model. Paths are Python string literals (json.dumps:
    quotes and backslashes escaped), shown in a gr.Code, never as Markdown."""
    import json

    if not ck_id:
        return ""
    with lab.registry() as reg:
        row = reg.find_checkpoint(ck_id)
        if row is None:
            return ""
        parents = reg.parents(row["id"])
        base_edge = next((p for p in parents if p["role"] == "base"), None) or \
            (parents[0] if parents else None)
        base = reg.get_checkpoint(base_edge["parent_id"]) if base_edge else None
    where = _load_ref(row)
    if where is None:
        return "# Remote only: no files in this lab (import its Hub id to get them)."
    if row["kind"] == "gguf":
        from registry.folder import gguf_file

        file = gguf_file(where)
        name = file.name if file else "model.gguf"
        return ("# A GGUF file (llama.cpp, Ollama, LM Studio). transformers dequantizes it:\n"
                "from transformers import AutoModelForCausalLM\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({json.dumps(where)}, "
                f"gguf_file={json.dumps(name)})\n"
                f"# llama.cpp: llama-cli -m {json.dumps(str(Path(where) / name))}")
    if row["kind"] == "task_vector":
        return (f"# A task vector, not a model: apply it with the task_vector plugin.\n"
                f"path = {json.dumps(where)}")
    if row["kind"] == "adapter" or row["relation"] == "adapter":
        base_ref = _load_ref(base) if base else None
        if base_ref is None:
            return ("# A PEFT adapter whose base model has no files in this lab.\n"
                    f"path = {json.dumps(where)}")
        return ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
                f"{json.dumps(base_ref)}), {json.dumps(where)})")
    return ("from transformers import AutoModelForCausalLM\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({json.dumps(where)})")


def _load_ref(row: dict | None) -> str | None:
    """What from_pretrained takes for a checkpoint: its folder here, else its Hub id."""
    if row is None:
        return None
    if row.get("path"):
        return row["path"]
    if row.get("hub_repo"):
        return row["hub_repo"]
    source = row.get("source") or ""
    return source[len("hf://"):] if source.startswith("hf://") else None


class DownloadRefused(Exception):
    """A checkpoint zip that is not made: the message says why."""


def checkpoint_zip(lab: Lab, ck_id: str | None, user: str | None, dest: Path) -> Path:
    """Zip a checkpoint's folder (ZIP_STORED: weights do not compress, and storing is as fast
    as copying) into `dest`, for `user`. Members see the whole lab (app/auth.py), so in a lab
    with users any logged-in member may; a request with no user is refused there. A lab
    without users serves only on the loopback, to its one user. Refused: a deleted or
    remote-only checkpoint, a folder that is gone, and (in a restricted lab) a folder outside
    the lab's roots. Symbolic links are left out. One zip per checkpoint and content, reused
    while it exists; written to a temporary name and renamed into place."""
    import os
    import re
    import tempfile
    import zipfile

    row, folder = _downloadable(lab, ck_id, user)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", row["name"])[:80].lstrip(".") or row["id"]
    stamp = re.sub(r"[^A-Za-z0-9]", "", row.get("content_hash") or "")[:12] or "files"
    target = dest / f"{row['id']}-{stamp}" / f"{safe}.zip"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)  # one per call: two downloads of the same checkpoint do not collide
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for file in sorted(folder.rglob("*")):
                if file.is_symlink() or not file.is_file():
                    continue
                zf.write(file, f"{safe}/{file.relative_to(folder).as_posix()}")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _downloadable(lab: Lab, ck_id: str | None, user: str | None) -> tuple[dict, Path]:
    """(row, folder) of a checkpoint `user` may download, or DownloadRefused saying why
    (the rules of checkpoint_zip)."""
    from app.paths import check_path, restricted

    if not ck_id:
        raise DownloadRefused("Select a checkpoint first.")
    if user is None and auth.has_users(lab):
        raise DownloadRefused("this lab has users: log in to download checkpoints")
    try:
        with lab.registry() as reg:
            row = reg.checkpoint(ck_id)
    except RegistryError as e:
        raise DownloadRefused(str(e)) from None
    if row.get("deleted_at"):
        raise DownloadRefused(f"{row['name']} ({row['id']}) was deleted")
    if not row["path"]:
        raise DownloadRefused(f"{row['name']} ({row['id']}) is remote only: it has no files "
                              f"in this lab (import its Hub id to get them)")
    folder = Path(row["path"])
    if not folder.is_dir():
        raise DownloadRefused(f"the folder of {row['name']} ({row['id']}), {folder}, is "
                              f"missing")
    if restricted(lab) and check_path(lab, "path", str(folder)):
        raise DownloadRefused(f"the folder of {row['name']} ({row['id']}) is outside the "
                              f"lab's roots")
    return row, folder


def checkpoint_gguf(lab: Lab, ck_id: str | None, user: str | None, dest: Path) -> Path:
    """The GGUF file of a checkpoint whose folder holds one (an `export`), placed in `dest`
    for `user` to download: hard-linked (no copy) where `dest` is on the same file system,
    else copied; under the same rules as checkpoint_zip. Reused while it exists."""
    import os
    import re
    import shutil
    import tempfile

    from registry.folder import gguf_file

    row, folder = _downloadable(lab, ck_id, user)
    file = gguf_file(folder)
    if file is None:
        raise DownloadRefused(f"{row['name']} ({row['id']}) has no .gguf file; an export "
                              f"checkpoint has one (use Download as zip for other folders)")
    stamp = re.sub(r"[^A-Za-z0-9]", "", row.get("content_hash") or "")[:12] or "file"
    target = dest / f"{row['id']}-{stamp}" / file.name
    if target.is_file() and target.stat().st_size == file.stat().st_size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.unlink()
        try:
            os.link(file, tmp)
        except OSError:  # another file system (or no hard links): a copy
            shutil.copyfile(file, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def download_gguf(lab: Lab, ck_id: str | None, user: str | None = None) -> tuple:
    """The "Download .gguf" button: (the file for the gr.File, a message)."""
    import gradio as gr
    from gradio.utils import get_upload_folder

    try:
        path = checkpoint_gguf(lab, ck_id, user, Path(get_upload_folder()) / "weightsmith-gguf")
    except (DownloadRefused, OSError) as e:
        return gr.File(value=None, visible=False), f"**Not downloaded:** {markup.md(e)}"
    size = path.stat().st_size
    shown = f"{size / 2 ** 20:.1f} MiB" if size >= 2 ** 20 else f"{size / 2 ** 10:.1f} KiB"
    return gr.File(value=str(path), visible=True), f"GGUF file ready: {shown}."


def has_gguf(lab: Lab, ck_id: str | None) -> bool:
    """Whether a checkpoint's folder holds one .gguf file (the "Download .gguf" button)."""
    from registry.folder import gguf_file

    if not ck_id:
        return False
    with lab.registry() as reg:
        row = reg.find_checkpoint(ck_id)
    return bool(row and row.get("path") and not row.get("deleted_at")
                and Path(row["path"]).is_dir() and gguf_file(row["path"]) is not None)


def download_checkpoint(lab: Lab, ck_id: str | None, user: str | None = None) -> tuple:
    """The "Download as zip" button: (the file for the gr.File, a message). The zip goes to
    Gradio's cache folder, which serves it without another copy."""
    import gradio as gr
    from gradio.utils import get_upload_folder

    try:
        path = checkpoint_zip(lab, ck_id, user, Path(get_upload_folder()) / "weightsmith-zips")
    except DownloadRefused as e:
        return gr.File(value=None, visible=False), f"**Not downloaded:** {markup.md(e)}"
    except OSError as e:
        return gr.File(value=None, visible=False), f"**Not downloaded:** {markup.md(e)}"
    size = path.stat().st_size
    shown = f"{size / 2 ** 20:.1f} MiB" if size >= 2 ** 20 else f"{size / 2 ** 10:.1f} KiB"
    return gr.File(value=str(path), visible=True), f"Zip ready: {shown}."


def suggested_next(lab: Lab, ck_id: str | None) -> tuple[str | None, str]:
    """(plugin to preselect in "Use as input of", a one-line hint) for a checkpoint: the
    `next_steps` a plugin declares for the checkpoint's relation, else evaluate."""
    if not ck_id:
        return None, ""
    with lab.registry() as reg:
        row = reg.find_checkpoint(ck_id)
    found = plugins.discover()
    relation = row["relation"] if row else None
    step = next((p.next_steps[relation] for p in found.values() if relation in p.next_steps),
                None)
    if step is not None and step.plugin in found:
        return step.plugin, step.hint
    return ("evaluate", "") if "evaluate" in found else (None, "")


def per_layer_series() -> list[str]:
    """Metadata keys drawn per layer in the Registry: every plugin's `per_layer_series`."""
    return list(dict.fromkeys(key for p in plugins.discover().values()
                              for key in p.per_layer_series))


def per_layer_frame(lab: Lab, ck_id: str | None):
    """Per-layer series a plugin recorded on a checkpoint (e.g. block influence), long form."""
    import pandas as pd

    rows = []
    if ck_id:
        with lab.registry() as reg:
            row = reg.find_checkpoint(ck_id)
        meta = (to_json(row).get("metadata") or {}) if row else {}
        for key in per_layer_series():
            values = meta.get(key) if isinstance(meta, dict) else None
            if isinstance(values, list):
                # zero-padded labels: a categorical axis (wide bars) that still sorts in order
                rows += [{"layer": f"{i:02d}", "value": v, "series": key}
                         for i, v in enumerate(values)]
    return pd.DataFrame(rows or {"layer": [], "value": [], "series": []})


def delete_checkpoint_form(lab: Lab, ck_id: str | None, user: str | None = None) -> str:
    """Soft delete: hidden from the lists; its row, edges and scores stay for the lineage."""
    if not ck_id:
        return "Select a checkpoint first."
    try:
        row = auth.delete_checkpoint(lab, ck_id, user)
    except (NotAllowed, RegistryError) as e:
        return f"**Not deleted.** {markup.md(e)}"
    return (f"Deleted {markup.md(row['name'])} ({markup.md(row['id'])}); its lineage is kept "
            f"(deleted {row['deleted_at'][:19].replace('T', ' ')} by "
            f"{markup.md(row['deleted_by'])}).")


def import_form(lab: Lab, ref: str, name: str, user: str | None = None) -> str:
    if not (ref or "").strip():
        return "**Give a local folder or a Hub id (ORG/NAME).**"
    from app.paths import import_problem

    refused = import_problem(lab, ref)
    if refused:
        return f"**Not imported:** {markup.md(refused)}"
    try:
        with lab.registry() as reg:
            row = import_checkpoint(lab, reg, ref.strip(), name=(name or "").strip() or None,
                                    user=user)
    except (CheckpointError, RefError, RegistryError) as e:
        return f"**Not imported:** {markup.md(e)}"
    return f"Registered **{markup.md(row['name'])}** as {markup.md(row['id'])}."


def publish_to_hub(lab: Lab, ck_id: str | None, repo: str, private: bool = False,
                   omit_local_parents: bool = False, user: str | None = None) -> str:
    """The "Publish to Hub" button: one commit with the checkpoint's files and model card,
    with the logged-in user's own token when they saved one (see hub.load_token)."""
    from app.auth import audit
    from registry import hub

    if not ck_id:
        return "Select a checkpoint first."
    if not (repo or "").strip():
        return "**Give a Hub repo (ORG/NAME).**"
    warnings: list[str] = []
    try:
        with lab.registry() as reg:
            from app.lab import hub_repo

            result = hub.push_checkpoint(reg, ck_id, hub_repo(lab.settings, repo),
                                         private=bool(private),
                                         omit_local_parents=bool(omit_local_parents),
                                         token=hub.load_token(user), log=warnings.append)
            audit(reg, user, "checkpoint.publish", result.get("checkpoint", ck_id),
                  {"repo": result["repo"], "commit": result["commit"]})
    except (hub.HubError, RegistryError) as e:
        return f"**Not published:** {markup.md(e)}"
    link = f"[{markup.md(result['repo'])}](<{markup.html(result['url'])}>)"
    done = (f"Published to {link} at commit {markup.md(result['commit'][:12])}."
            if result["new_commit"] else f"Unchanged on {link}: no new commit.")
    return "\n\n".join([done] + [f"_{markup.md(w)}_" for w in warnings])


def save_hub_token(lab: Lab, token: str, user: str | None = None) -> str:
    """Store the Hub token (mode 0600, never in the lab): the logged-in lab user's own file,
    or without users the token file of the account the server runs as."""
    from registry import hub

    try:
        path = hub.save_token(token, lab_root=lab.root, user=user)
    except hub.HubError as e:
        return f"**Not saved:** {markup.md(e)}"
    return f"Token saved to {markup.md(path)} (mode 0600)."


def sync_registry_form(lab: Lab, repo: str, user: str | None = None) -> str:
    from registry import hub

    repo = (repo or "").strip() or lab.settings.hub_sync_repo
    if not repo:
        return "**Give the registry's Hub dataset repo (ORG/NAME).**"
    try:
        with lab.registry() as reg:
            result = hub.sync_registry(reg, repo, token=hub.load_token(user),
                                       log=lambda m: None)
    except (hub.HubError, RegistryError) as e:
        return f"**Not synced:** {markup.md(e)}"
    added = ", ".join(f"{n} {t}" for t, n in result["added"].items() if n) or "nothing"
    pushed = ", ".join(f"{n} {t}" for t, n in result["pushed"].items() if n) or "nothing"
    return f"Synced with {markup.md(repo)}: pulled {added}; pushed {pushed}."



def next_step(lab: Lab, ck_id: str | None) -> tuple:
    """suggested_next as the view's updates: ("Use as input of" preselected, the hint)."""
    import gradio as gr

    plugin, hint = suggested_next(lab, ck_id)
    return gr.Dropdown(value=plugin), hint


def show_per_layer(lab: Lab, ck_id: str | None):
    """The "Per layer" bar plot of a checkpoint, hidden when it has no per-layer series."""
    import gradio as gr

    frame = per_layer_frame(lab, ck_id)
    return gr.BarPlot(value=frame, visible=len(frame) > 0)


def use_as_input(plugin_name: str | None, ck_id: str | None, plugin_names: list[str],
                 lists: frozenset = frozenset()) -> tuple:
    """"Use as input": open the plugin's tab with the checkpoint in its first checkpoint
    field (a list of one for the plugins in `lists`, whose field takes several); (the tabs,
    then one update per plugin in `plugin_names`)."""
    import gradio as gr

    if not plugin_name or not ck_id:
        return gr.skip(), *[gr.skip() for _ in plugin_names]
    value = [ck_id] if plugin_name in lists else ck_id
    return (gr.Tabs(selected=f"plugin-{plugin_name}"),
            *[value if name == plugin_name else gr.skip() for name in plugin_names])


def registry_lists(lab: Lab, search_text: str, n_dropdowns: int) -> tuple:
    """The registry as it is now: the checkpoint table (filtered by `search_text`), then
    fresh choices for each of the app's `n_dropdowns` checkpoint dropdowns."""
    import gradio as gr

    fresh = checkpoint_choices(lab)
    return (checkpoint_table(lab, search_text),
            *[gr.Dropdown(choices=fresh) for _ in range(n_dropdowns)])


# ------------------------------------------------------------------------------------ layout
@dataclass
class RegistryView:
    """The Registry tab's components that the app refreshes as the registry changes."""

    search: object
    table: object
    selected: object = None  # the selected checkpoint's id (the URL's ck)
    graph: object = None     # its lineage_block


def build(lab: Lab, tabs, found: dict, first_checkpoint: dict) -> RegistryView:
    """The Registry tab (inside the app's gr.Tabs `tabs`) and its events; "Use as input"
    fills `first_checkpoint` (plugin name -> its first checkpoint dropdown) and opens that
    plugin's tab."""
    import gradio as gr

    with gr.Tab("Registry", id="registry") as registry_tab:
        with gr.Row():
            search = gr.Textbox(label="Search name or id", scale=3)
            refresh = gr.Button("Refresh", scale=1)
        # as it is now on every page load (app.ui.build_app's refresh_registry)
        table = gr.Dataframe(headers=CK_COLUMNS, value=checkpoint_table(lab),
                             interactive=False, label="Checkpoints")
        # lineage.js sets this box when a graph's node is clicked, on any tab
        selected = gr.Textbox(label="Selected checkpoint", elem_id="selected-checkpoint")
        summary = text_md()
        with gr.Row():
            load = gr.Code(label="Load it in Python", language="python", interactive=False,
                           wrap_lines=True, elem_id="load-code", scale=3)
            with gr.Column(scale=1):
                download = gr.Button("Download as zip", elem_id="download-zip")
                zipped = gr.File(label="Checkpoint zip", visible=False, interactive=False,
                                 elem_id="download-file")
                # an export's GGUF file, as it is (shown for a folder that holds one)
                download_gguf_button = gr.Button("Download .gguf", visible=False,
                                                 elem_id="download-gguf")
                gguf_out = gr.File(label="GGUF file", visible=False, interactive=False,
                                   elem_id="download-gguf-file")
                download_msg = text_md(elem_id="download-message")
        with gr.Row():
            # value None: not gradio's default, the first choice (Select data), which a
            # click before the selection's suggestion lands would open
            use_plugin = gr.Dropdown(choices=[(found[n].title, n) for n in first_checkpoint],
                                     value=None, label="Use as input of", scale=2,
                                     elem_id="use-plugin")
            use = gr.Button("Use as input", scale=1)
        next_hint = text_md(elem_id="next-step")
        graph = lineage_block(lab, "lineage", whole_lab=True, selected=selected)
        lineage = graph.graph
        per_layer = gr.BarPlot(x="layer", y="value", color="series", label="Per layer",
                               visible=False)
        details = gr.JSON(label="Config, versions, files, evaluations")
        _checkpoint_actions(lab, selected)

    search.submit(lambda s: checkpoint_table(lab, s), inputs=search, outputs=table,
                  api_visibility="private")
    refresh.click(lambda s: checkpoint_table(lab, s), inputs=search, outputs=table,
                  api_name="checkpoints")
    copy_first_cell(table, selected)
    registry_tab.select(lambda s: checkpoint_table(lab, s), inputs=search, outputs=table,
                        api_visibility="private")
    selected.change(lambda c: checkpoint_detail(lab, c), inputs=selected,
                    outputs=[summary, lineage, details], api_name="checkpoint_detail")
    selected.change(lambda c, n, q: (gr.Radio(value=AROUND),
                                     graph_scores(lab, c, AROUND, n, q)),
                    inputs=[selected, graph.limit, graph.search],
                    outputs=[graph.mode, graph.scores], api_visibility="private")
    selected.change(lambda c: (load_code(lab, c), gr.File(value=None, visible=False), ""),
                    inputs=selected, outputs=[load, zipped, download_msg],
                    api_visibility="private")

    def on_download(request: gr.Request, c):
        return download_checkpoint(lab, c, request_user(request))

    download.click(on_download, inputs=selected, outputs=[zipped, download_msg],
                   api_name="download_checkpoint")
    selected.change(lambda c: (gr.Button(visible=has_gguf(lab, c)),
                               gr.File(value=None, visible=False)),
                    inputs=selected, outputs=[download_gguf_button, gguf_out],
                    api_visibility="private")

    def on_download_gguf(request: gr.Request, c):
        return download_gguf(lab, c, request_user(request))

    download_gguf_button.click(on_download_gguf, inputs=selected,
                               outputs=[gguf_out, download_msg], api_name="download_gguf")
    selected.change(lambda c: next_step(lab, c), inputs=selected,
                    outputs=[use_plugin, next_hint], api_name="next_step")
    selected.change(lambda c: show_per_layer(lab, c), inputs=selected, outputs=per_layer,
                    api_visibility="private")
    names = list(first_checkpoint)
    lists = frozenset(n for n in names if getattr(first_checkpoint[n], "multiselect", False))
    # Before the selection's next_step update lands (it queues behind the lineage), the
    # dropdown is still empty: use the plugin it is about to show rather than do nothing.
    use.click(lambda p, c: use_as_input(p or suggested_next(lab, c)[0], c, names, lists),
              inputs=[use_plugin, selected],
              outputs=[tabs] + [first_checkpoint[n] for n in names], api_name="use_as_input",
              api_visibility="private")
    return RegistryView(search, table, selected, graph)


def _checkpoint_actions(lab: Lab, selected) -> None:
    """The Registry's accordions and their events: import, delete (the `selected`
    checkpoint), publish it to the Hub, the Hub token and registry sync; each button acts as
    whoever clicks it."""
    import gradio as gr

    with gr.Accordion("Import checkpoint", open=False):
        imp_ref = gr.Textbox(label="Local folder or Hub id (ORG/NAME)")
        imp_name = gr.Textbox(label="Name (optional)")
        imp_go = gr.Button("Import")
        imp_msg = text_md()
    with gr.Accordion("Delete checkpoint", open=False):
        text_md("A soft delete: the checkpoint leaves the lists; its row, edges and scores "
                "stay so its descendants' lineage is whole. Only its creator or an admin may "
                "delete it.")
        del_go = gr.Button("Delete the selected checkpoint", variant="stop")
        del_msg = text_md()
    with gr.Accordion("Publish to Hub", open=False):
        pub_repo = gr.Textbox(label="Hub repo (ORG/NAME)")
        with gr.Row():
            pub_private = gr.Checkbox(label="Private repo")
            pub_omit = gr.Checkbox(label="Leave parents that are not on the Hub out of "
                                         "base_model")
        pub_go = gr.Button("Publish to Hub")
        pub_msg = text_md(elem_id="publish-message")
    with gr.Accordion("Hub settings", open=False):
        hub_token = gr.Textbox(
            label="Hub token", type="password",
            info="Kept in your own token file (mode 0600), never in the lab, and used when you "
                 "publish or sync. Without one, the server's HF_TOKEN or token file is used.")
        token_go = gr.Button("Save token")
        sync_repo = gr.Textbox(label="Registry dataset repo (ORG/NAME)",
                               value=lab.settings.hub_sync_repo)
        sync_go = gr.Button("Sync registry")
        hub_msg = text_md()

    def on_import(request: gr.Request, r, n):
        return import_form(lab, r, n, user=request_user(request))

    def on_delete(request: gr.Request, c):
        return delete_checkpoint_form(lab, c, request_user(request))

    def on_publish(request: gr.Request, c, r, p, o):
        return publish_to_hub(lab, c, r, p, o, user=request_user(request))

    def on_token(request: gr.Request, t):
        return save_hub_token(lab, t, user=request_user(request)), ""

    def on_sync(request: gr.Request, r):
        return sync_registry_form(lab, r, user=request_user(request))

    imp_go.click(on_import, inputs=[imp_ref, imp_name], outputs=imp_msg,
                 api_name="import_checkpoint")
    del_go.click(on_delete, inputs=selected, outputs=del_msg, api_name="delete_checkpoint")
    pub_go.click(on_publish, inputs=[selected, pub_repo, pub_private, pub_omit],
                 outputs=pub_msg, api_name="publish_to_hub")
    token_go.click(on_token, inputs=hub_token, outputs=[hub_msg, hub_token],
                   api_visibility="private")
    sync_go.click(on_sync, inputs=sync_repo, outputs=hub_msg, api_name="sync_registry")
