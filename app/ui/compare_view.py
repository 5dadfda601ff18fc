"""The Compare tab: the scores of two or more checkpoints side by side with their deltas
against their parents, and the scores along a lineage chain (what each step gained, and
what it forgot)."""

from dataclasses import dataclass, field
from typing import Optional

from app.lab import Lab
from app.ui.shared import text_md
from plugins.kit import markup, metrics
from registry import RegistryError


# ---------------------------------------------------------------------------------- handlers
def compare(lab: Lab, ck_ids: list[str] | None) -> tuple[object, object]:
    """Scores of two or more checkpoints side by side, with each one's delta against its
    parents: (table DataFrame, long-form DataFrame for the bar chart)."""
    import pandas as pd

    ck_ids = [c for c in (ck_ids or []) if c]
    table = pd.DataFrame({"metric": []})
    bars = pd.DataFrame({"bar": [], "value": [], "checkpoint": []})
    if not ck_ids:
        return table, bars
    with lab.registry() as reg:
        rows = [reg.checkpoint(c) for c in ck_ids]
        scores = reg.latest_scores([r["id"] for r in rows])
        deltas = {r["id"]: reg.score_deltas(r["id"]) for r in rows}
    labels = sorted({m for r in rows for m in scores.get(r["id"], {})})
    data: dict[str, list] = {"metric": labels, "better": [
        metrics.better(m) if metrics.known(m) else "higher? (direction unknown)"
        for m in labels]}
    long = []
    for r in rows:
        label = f"{r['name']} ({r['id']})"
        values = scores.get(r["id"], {})
        data[label] = [f"{values[m]:.6g}" if m in values else "" for m in labels]
        data[f"{r['name']} vs parents"] = [
            ", ".join(f"{d['delta']:+.4g} vs {d['parent_name']}" for d in deltas[r["id"]]
                      if d["metric"] == m) for m in labels]
        # one bar per (metric, checkpoint): bars of one metric stand side by side, not stacked
        long += [{"bar": f"{m} · {r['name']}", "value": v, "checkpoint": r["name"]}
                 for m, v in sorted(values.items())]
    return pd.DataFrame(data), pd.DataFrame(long) if long else bars


# ------------------------------------------------------------------ the compare heat table
# Why by hand: the scores of one comparison live on scales that share nothing (a perplexity of
# 2.8, an accuracy of 0.31), and each goes its own way (lower, higher). gr.BarPlot draws one
# axis per plot, so one plot mixes them and a grid of plots per metric costs one Altair chart
# each; a table with one row per metric, shaded within its own row, reads at a glance.
@dataclass
class Delta:
    """One change against one parent: child - parent, and whether it is a gain."""

    parent_id: str
    parent_name: str
    delta: float
    gain: Optional[bool]           # True better, False worse, None unchanged
    uneven: str = ""               # "4 vs 24 items" when the two were measured on different counts


@dataclass
class Cell:
    """One checkpoint's latest score on one metric."""

    value: float
    items: Optional[int] = None    # what it was measured on (items, or tokens for perplexity)
    unit: str = "items"
    partial: str = ""              # "4 of 24 items" when fewer than the others, or the whole task
    deltas: list = field(default_factory=list)


@dataclass
class MetricRow:
    metric: str                    # the registry label, task/metric
    direction: str                 # "higher" or "lower": which way is better
    source: str                    # "recorded", "table" or "unknown" (plugins.kit.metrics)
    cells: list = field(default_factory=list)  # one Cell or None per compared checkpoint


@dataclass
class Comparison:
    checkpoints: list              # [{"id", "name"}], in the order picked
    rows: list                     # [MetricRow], sorted by task then metric


def measured_on(details) -> tuple[Optional[int], Optional[int], str]:
    """(items measured, items in the whole task or None, unit) from an evaluation's details:
    lm-eval's n_samples {original, effective}, the suite's n (and n_total / limit if a
    later evaluate records them), a perplexity's tokens. Hostile details give (None, None)."""
    def count(value):
        return value if isinstance(value, int) and not isinstance(value, bool) \
            and 0 <= value <= 2 ** 53 else None

    if not isinstance(details, dict):
        return None, None, "items"
    samples = details.get("n_samples")
    if isinstance(samples, dict) and count(samples.get("effective")) is not None:
        return count(samples.get("effective")), count(samples.get("original")), "items"
    if count(details.get("n")) is not None:
        return count(details.get("n")), count(details.get("n_total")), "items"
    if count(details.get("tokens")) is not None:
        return count(details.get("tokens")), None, "tokens"
    return None, None, "items"


def _latest_details(rows: list[dict]) -> dict[str, dict]:
    """{task/metric: details} of the latest evaluation of each (rows oldest first, as
    Registry.evaluations gives them; the same row latest_scores keeps)."""
    import json

    out = {}
    for r in rows:
        try:
            details = json.loads(r["details"]) if r.get("details") else {}
        except (TypeError, ValueError):
            details = {}
        out[f"{r['task']}/{r['metric']}"] = details if isinstance(details, dict) else {}
    return out


def comparison(lab: Lab, ck_ids: list[str] | None) -> Comparison:
    """Everything the Compare tab shows, as data: for each metric any picked checkpoint has,
    which way is better, each checkpoint's latest value, what it was measured on (and a mark
    when fewer items than the others it is compared with), and its change against each
    parent, judged better or worse by the metric's direction."""
    ck_ids = list(dict.fromkeys(c for c in (ck_ids or []) if c))
    if not ck_ids:
        return Comparison([], [])
    with lab.registry() as reg:
        cks = [reg.checkpoint(c) for c in ck_ids]
        ids = [c["id"] for c in cks]
        scores = reg.latest_scores(ids)
        deltas = {i: reg.score_deltas(i) for i in ids}
        parent_ids = {d["parent"] for ds in deltas.values() for d in ds}
        details = {i: _latest_details(reg.evaluations(i)) for i in set(ids) | parent_ids}
    rows = []
    for metric in sorted({m for i in ids for m in scores.get(i, {})}):
        first = next((details[i].get(metric) for i in ids if metric in details[i]), None)
        way, source = metrics.direction(metric, first)
        row = MetricRow(metric, way, source)
        for i in ids:
            if metric not in scores.get(i, {}):
                row.cells.append(None)
                continue
            items, total, unit = measured_on(details[i].get(metric))
            cell = Cell(scores[i][metric], items, unit)
            if items is not None and total is not None and items < total:
                cell.partial = f"{items} of {total} {unit}"
            for d in deltas[i]:
                if d["metric"] != metric:
                    continue
                theirs, _, their_unit = measured_on(details.get(d["parent"], {}).get(metric))
                uneven = (f"{items} vs {theirs} {unit}" if items is not None and theirs
                          is not None and unit == their_unit and items != theirs else "")
                cell.deltas.append(Delta(d["parent"], d["parent_name"], d["delta"],
                                         metrics.is_gain(d["delta"], way), uneven))
            row.cells.append(cell)
        most = max((c.items for c in row.cells if c and c.items is not None), default=None)
        for c in row.cells:
            if c and c.items is not None and most and c.items < most and not c.partial:
                c.partial = f"{c.items} of {most} {c.unit}"
        rows.append(row)
    return Comparison([{"id": c["id"], "name": c["name"]} for c in cks], rows)


# green and red chips, opaque (the cell's shade does not tint them), dark text on a light
# ground: readable in the light and the dark theme alike
_GAIN, _LOSS = "#166534", "#991b1b"
_GAIN_BG, _LOSS_BG = "#dcfce7", "#fee2e2"


def _text(value) -> str:
    """Member-controlled text for the table: HTML-escaped, and the characters of gr.HTML's
    JS-template and Handlebars syntax as entities too, so no name is ever a template."""
    return (markup.html(value).replace("$", "&#36;").replace("{", "&#123;")
            .replace("}", "&#125;").replace("`", "&#96;"))


def _number(value: float) -> str:
    return f"{value:.4g}"


def _shade(row: MetricRow) -> list[float]:
    """How good each cell is among the row's cells, 0 (worst) to 1 (best); all 0 when
    there is nothing to rank."""
    values = [c.value for c in row.cells if c]
    if len(values) < 2 or max(values) == min(values):
        return [0.0] * len(row.cells)
    lo, hi = min(values), max(values)
    out = []
    for c in row.cells:
        if not c:
            out.append(0.0)
            continue
        good = (c.value - lo) / (hi - lo)
        out.append(good if row.direction == "higher" else 1 - good)
    return out


def _direction_badge(row: MetricRow) -> str:
    if row.source == "unknown":
        return ("<span title='this metric is not in plugins/kit/metrics.py: shown as better "
                "higher' style='color:#b45309;font-size:11px'>↑? direction unknown</span>")
    arrow, word = ("↑", "higher is better") if row.direction == "higher" else \
        ("↓", "lower is better")
    extra = " (recorded by the evaluation)" if row.source == "recorded" else ""
    return (f"<span title='{word}{extra}' style='color:var(--body-text-color-subdued,#666);"
            f"font-size:11px'>{arrow} {word}</span>")


def _delta_chip(d: Delta) -> str:
    if d.gain is None:
        colour, bg, word, sign = "#374151", "#f3f4f6", "unchanged", "="
    else:
        colour, bg = (_GAIN, _GAIN_BG) if d.gain else (_LOSS, _LOSS_BG)
        word, sign = ("better", "▲") if d.gain else ("worse", "▼")
    mark = (f" <span title='measured on {_text(d.uneven)}'>†</span>" if d.uneven else "")
    return (f"<div class='ws-delta {word}' title='{word} than {_text(d.parent_name)} "
            f"({_text(d.parent_id)})' style='color:{colour};background:{bg};border-radius:4px;"
            f"padding:0 4px;margin-top:2px;font-size:12px;white-space:nowrap;"
            f"display:table'>"
            f"{sign} {d.delta:+.3g} vs {_text(d.parent_name)}{mark}</div>")


def heat_table(data: Comparison) -> str:
    """The comparison as one HTML table: a row per metric (grouped by task, each saying
    which way is better), a column per checkpoint (its name, then its id); each cell shaded
    by its rank among the row's cells (darker: better), with a bar of its value, its change
    against each parent in green (better) or red (worse), and a † when it was measured on
    fewer items than the others. Every member-controlled text is escaped."""
    if not data.checkpoints:
        return "<p>Pick two or more checkpoints, then Compare.</p>"
    if not data.rows:
        names = ", ".join(_text(c["name"]) for c in data.checkpoints)
        return (f"<p>No scores yet for {names}: evaluate them (Evaluate tab), then "
                f"Compare.</p>")
    border = "1px solid var(--border-color-primary,#ddd)"
    cell_style = f"padding:4px 8px;border-bottom:{border};vertical-align:top"
    head = "".join(
        f"<th style='{cell_style};text-align:left;min-width:120px'>"
        f"<div class='ws-ck-name' style='font-weight:600'>{_text(c['name'])}</div>"
        f"<div style='font-weight:400;font-size:11px;color:var(--body-text-color-subdued,#666)'>"
        f"{_text(c['id'])}</div></th>" for c in data.checkpoints)
    body, task, partial, unknown = [], None, False, False
    for row in data.rows:
        row_task, _, name = row.metric.rpartition("/")
        if row_task != task:
            task = row_task
            body.append(f"<tr><td colspan='{len(data.checkpoints) + 1}' style='padding:8px 8px "
                        f"2px;font-weight:600;border-bottom:{border}'>{_text(task or '(no task)')}"
                        f"</td></tr>")
        unknown |= row.source == "unknown"
        top = max((abs(c.value) for c in row.cells if c), default=0) or 1
        cells = []
        for c, good in zip(row.cells, _shade(row)):
            if c is None:
                cells.append(f"<td style='{cell_style};color:var(--body-text-color-subdued,"
                             f"#999)'>–</td>")
                continue
            partial |= bool(c.partial)
            mark = (f"<sup title='measured on {_text(c.partial)}' style='color:#b45309'>†</sup>"
                    f"<div class='ws-partial' style='font-size:11px;color:#b45309'>"
                    f"{_text(c.partial)}</div>") if c.partial else ""
            width = max(2, round(100 * abs(c.value) / top))
            cells.append(
                f"<td style='{cell_style};background:rgba(37,99,235,{0.04 + 0.26 * good:.2f})'>"
                f"<div style='font-size:15px;font-variant-numeric:tabular-nums;font-weight:"
                f"{700 if good == 1 else 400}'>{_number(c.value)}{mark}</div>"
                f"<div style='height:4px;width:{width}%;background:rgba(37,99,235,.55);"
                f"border-radius:2px;margin:2px 0'></div>"
                + "".join(_delta_chip(d) for d in c.deltas) + "</td>")
        body.append(f"<tr><td style='{cell_style};padding-left:20px'>"
                    f"<div>{_text(name)}</div>{_direction_badge(row)}</td>{''.join(cells)}</tr>")
    chip = "border-radius:4px;padding:0 4px"
    legend = [f"<span style='background:rgba(37,99,235,.3);{chip}'>darker</span> better "
              f"among these checkpoints (<b>bold</b>: the best of the row)",
              f"<span style='color:{_GAIN};background:{_GAIN_BG};{chip}'>▲ better</span> "
              f"<span style='color:{_LOSS};background:{_LOSS_BG};{chip}'>▼ worse</span> than "
              f"the parent, by the metric's direction (↑ higher or ↓ lower is better)"]
    if partial or any(d.uneven for r in data.rows for c in r.cells if c for d in c.deltas):
        legend.append("<span style='color:#b45309'>†</span> measured on fewer items than the "
                      "others (a quick check with limit): not like for like")
    if unknown:
        legend.append("<span style='color:#b45309'>↑? direction unknown</span>: read as "
                      "better higher")
    return (f"<div class='ws-compare' style='overflow-x:auto'>"
            f"<div style='font-size:13px;display:flex;flex-wrap:wrap;gap:4px 18px;"
            f"margin:4px 0 8px'>{''.join(f'<span>{item}</span>' for item in legend)}</div>"
            f"<table style='border-collapse:collapse;font-size:14px;width:auto'>"
            f"<thead><tr><th style='{cell_style};text-align:left'>metric</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def compare_heat(lab: Lab, ck_ids: list[str] | None) -> tuple[str, object]:
    """The Compare button: (the heat table's HTML, the scores as a table, as `compare`)."""
    try:
        return heat_table(comparison(lab, ck_ids)), compare(lab, ck_ids)[0]
    except RegistryError as e:  # a checkpoint deleted since the dropdown was filled
        return f"<p><b>{_text(e)}</b></p>", compare(lab, [])[0]


def lineage_chain(lab: Lab, ck_id: str | None, from_id: str | None = None,
                  metrics: list[str] | None = None) -> tuple[object, list[str], str]:
    """Scores along a lineage path (e.g. base -> continue_pretrain -> train -> merge), to see
    what each step gained and what it forgot: (long-form DataFrame step/value/metric for a
    line plot, every metric scored somewhere on the path, the path as markdown)."""
    import pandas as pd

    empty = pd.DataFrame({"step": [], "value": [], "metric": []})
    if not ck_id:
        return empty, [], "Pick a checkpoint (and optionally an ancestor to start from)."
    try:
        with lab.registry() as reg:
            path = reg.chain(ck_id, from_id or None)
            scores = reg.latest_scores([r["id"] for r in path])
    except RegistryError as e:
        return empty, [], f"**{markup.md(e)}**"
    available = sorted({m for r in path for m in scores.get(r["id"], {})})
    chosen = [m for m in (metrics or []) if m in available] or available[:4]
    rows = []
    for i, r in enumerate(path):
        # zero-padded labels: an ordered categorical axis that names each step
        label = f"{i:02d} {r['name']}"
        rows += [{"step": label, "value": scores[r["id"]][m], "metric": m}
                 for m in chosen if m in scores.get(r["id"], {})]
    text = " → ".join(f"{markup.md(r['name'])} ({markup.md(r['relation'])})" for r in path)
    return (pd.DataFrame(rows) if rows else empty), available, text



def plot_chain(lab: Lab, ck_id: str | None, from_id: str | None,
               chosen: list[str] | None) -> tuple:
    """lineage_chain as the view's updates: (the plot's frame, the Metrics dropdown with
    every metric on the path, the path as markdown)."""
    import gradio as gr

    frame, available, text = lineage_chain(lab, ck_id, from_id, chosen)
    return frame, gr.Dropdown(choices=available, value=[
        m for m in (chosen or []) if m in available]), text


# ------------------------------------------------------------------------------------ layout
@dataclass
class CompareView:
    """What the app refreshes as the registry changes."""

    checkpoint_dropdowns: list = field(default_factory=list)


def build(lab: Lab, choices: list) -> CompareView:
    """The Compare tab (inside the app's gr.Tabs), `choices` in its checkpoint dropdowns."""
    import gradio as gr

    with gr.Tab("Compare", id="compare"):
        picks = gr.Dropdown(choices=choices, multiselect=True, filterable=True,
                            label="Checkpoints to compare (two or more)")
        compare_go = gr.Button("Compare", variant="primary", elem_id="compare-go")
        compare_heat_html = gr.HTML(heat_table(Comparison([], [])), elem_id="compare-heat",
                                    js_on_load=None)
        with gr.Accordion("The same scores as a table", open=False):
            compare_table = gr.Dataframe(label="Scores, and the change against each "
                                         "checkpoint's parents", interactive=False)
        text_md("### Scores along a lineage chain\nWhat each step gained, and what it "
                "forgot, from an ancestor down to a checkpoint.")
        with gr.Row():
            chain_to = gr.Dropdown(choices=choices, filterable=True,
                                   label="Checkpoint (end of the chain)")
            chain_from = gr.Dropdown(choices=choices, filterable=True,
                                     label="Ancestor to start from (empty: follow first "
                                           "parents to the root)")
            chain_metrics = gr.Dropdown(choices=[], multiselect=True, allow_custom_value=True,
                                        label="Metrics (empty: the first four)")
        chain_go = gr.Button("Plot chain")
        chain_text = text_md()
        chain_plot = gr.LinePlot(x="step", y="value", color="metric",
                                 label="Scores along the chain", x_label_angle=-30)

    compare_go.click(lambda c: compare_heat(lab, c), inputs=picks,
                     outputs=[compare_heat_html, compare_table], api_name="compare")
    chain_go.click(lambda to, start, chosen: plot_chain(lab, to, start, chosen),
                   inputs=[chain_to, chain_from, chain_metrics],
                   outputs=[chain_plot, chain_metrics, chain_text], api_name="lineage_chain")
    return CompareView([picks, chain_to, chain_from])
