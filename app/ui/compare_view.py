"""The Compare tab: the scores of two or more checkpoints side by side with their deltas
against their parents, and the scores along a lineage chain (what each step gained, and
what it forgot)."""

from dataclasses import dataclass, field

from app.lab import Lab
from app.ui.shared import text_md
from plugins.kit import markup
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
    metrics = sorted({m for r in rows for m in scores.get(r["id"], {})})
    data: dict[str, list] = {"metric": metrics}
    long = []
    for r in rows:
        label = f"{r['name']} ({r['id']})"
        values = scores.get(r["id"], {})
        data[label] = [f"{values[m]:.6g}" if m in values else "" for m in metrics]
        data[f"{r['name']} vs parents"] = [
            ", ".join(f"{d['delta']:+.4g} vs {d['parent_name']}" for d in deltas[r["id"]]
                      if d["metric"] == m) for m in metrics]
        # one bar per (metric, checkpoint): bars of one metric stand side by side, not stacked
        long += [{"bar": f"{m} · {r['name']}", "value": v, "checkpoint": r["name"]}
                 for m, v in sorted(values.items())]
    return pd.DataFrame(data), pd.DataFrame(long) if long else bars


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
        compare_go = gr.Button("Compare", variant="primary")
        compare_table = gr.Dataframe(label="Scores, and the change against each "
                                     "checkpoint's parents", interactive=False)
        compare_plot = gr.BarPlot(x="bar", y="value", color="checkpoint", label="Scores",
                                  x_label_angle=-30)
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

    compare_go.click(lambda c: compare(lab, c), inputs=picks,
                     outputs=[compare_table, compare_plot], api_name="compare")
    chain_go.click(lambda to, start, chosen: plot_chain(lab, to, start, chosen),
                   inputs=[chain_to, chain_from, chain_metrics],
                   outputs=[chain_plot, chain_metrics, chain_text], api_name="lineage_chain")
    return CompareView([picks, chain_to, chain_from])
