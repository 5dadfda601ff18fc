"""The Home tab: the lab at a glance. Its lineage graph (every checkpoint, or the latest N
with a name filter; a click on a node opens it in the Registry), the running and queued
jobs (each a link to its live view), and on a demo lab the demo story's steps with a button
that opens each step's form filled in."""

from __future__ import annotations

from dataclasses import dataclass, field

from app import demo
from app.lab import Lab
from app.ui import navigation
from app.ui.shared import Ticks, text_md
from plugins.kit import markup

GRAPH_LATEST = 40  # checkpoints drawn on Home by default: a lab's recent work, readable
MARK = {"done": "✓", "running": "…", "next": "→", "later": "·"}
# the story steps that have a button, and its label
STORY_BUTTONS = {"merge": "Merge the fine-tunes", "compare": "Compare with parents",
                 "playground": "Open in the Playground", "prune": "Prune with Wanda",
                 "evaluate": "Evaluate"}


# ---------------------------------------------------------------------------------- handlers
def lab_summary(lab: Lab) -> str:
    with lab.registry() as reg:  # counts, not rows: a lab may hold 100,000 checkpoints
        counts = reg.lab_counts()
    n_ck, running, queued = counts["checkpoints"], counts["running"], counts["queued"]
    return (f"Lab `{markup.md(lab.root)}` · {n_ck} checkpoint{'s' * (n_ck != 1)} · "
            f"{running} job{'s' * (running != 1)} running · {queued} queued")


def active_jobs(lab: Lab) -> str:
    """The running and queued jobs as a Markdown table whose ids open the job's live view."""
    from app.scheduler import queue_positions

    with lab.registry() as reg:
        jobs = [j for j in reg.jobs(limit=500) if j["status"] in ("running", "queued")]
        places = queue_positions(reg)
    if not jobs:
        return "No job is running or queued. Start one from an operation's tab."
    lines = ["| job | operation | status | progress | user |", "|---|---|---|---|---|"]
    for j in sorted(jobs, key=lambda j: (j["status"] != "running", places.get(j["id"], 0))):
        status = f"queued #{places[j['id']]}" if j["id"] in places else j["status"]
        note = markup.md((j["progress_message"] or "")[:80])
        lines.append(f"| {navigation.job_link(j['id'])} | {markup.md(j['plugin'])} | "
                     f"{markup.md(status)} | {(j['progress'] or 0):.0%} {note} | "
                     f"{markup.md(j['user'] or '')} |")
    return "\n".join(lines)


def story_markdown(steps: list[demo.StoryStep]) -> str:
    if not steps:
        return ""
    lines = ["### The demo story", "A tiny model pre-trained here, two skill fine-tunes of "
             "it, and what a lab does next with them. The buttons fill in each form; you "
             "read it and click Run.", ""]
    for i, step in enumerate(steps, 1):
        lines.append(f"{i}. <span class='ws-{step.state}'>{MARK[step.state]}</span> "
                     f"{step.text}" + (" (running)" if step.state == "running" else ""))
    return "\n".join(lines)


def _button_look(steps: list[demo.StoryStep], key: str) -> dict:
    """A story button is shown while its step can be done (or done again); the next step's
    is the primary one."""
    state = {s.key: s.state for s in steps}.get(key)
    return {"visible": state in ("next", "done"),
            "variant": "primary" if state == "next" else "secondary"}


def story_buttons(steps: list[demo.StoryStep]) -> list:
    """One update per STORY_BUTTONS entry."""
    import gradio as gr

    return [gr.Button(**_button_look(steps, key)) for key in STORY_BUTTONS]


def lab_graph(lab: Lab, latest, search: str | None) -> str:
    """The lab's lineage graph (the Registry view draws it, with the same clicks)."""
    from app.ui import registry_view

    try:
        latest = int(latest) if latest else GRAPH_LATEST
    except (TypeError, ValueError):
        latest = GRAPH_LATEST
    draw = getattr(registry_view, "lab_graph_markdown", None)
    if draw is None:
        return ""
    return draw(lab, max(1, min(latest, 500)), (search or "").strip() or None)


# ------------------------------------------------------------------------------------ layout
@dataclass
class HomeView:
    summary: object
    story: object
    buttons: dict = field(default_factory=dict)  # story key -> gr.Button
    jobs: object = None
    latest: object = None
    search: object = None
    graph: object = None
    shown: object = None  # the graph text last drawn (redrawn only on a change)
    mark: object = None  # the registry and jobs digests of the last refresh


def build(lab: Lab) -> HomeView:
    """The Home tab (inside the app's gr.Tabs)."""
    import gradio as gr

    with gr.Tab("Home", id="home"):
        summary = text_md(lambda: lab_summary(lab), elem_id="home-summary")
        steps = demo.demo_story(lab)
        with gr.Row():
            with gr.Column(scale=3):
                story = text_md(story_markdown(steps), elem_id="home-story",
                                elem_classes=["ws-story"])
                with gr.Row():
                    buttons = {key: gr.Button(label, size="sm", elem_id=f"story-{key}",
                                              scale=0, min_width=170,
                                              **_button_look(steps, key))
                               for key, label in STORY_BUTTONS.items()}
            with gr.Column(scale=2):
                text_md("### Running and queued jobs")
                jobs = text_md(lambda: active_jobs(lab), elem_id="home-jobs")
        text_md("### Lineage of the lab\nClick a checkpoint to open it in the Registry; drag "
                "to pan, scroll to zoom.")
        with gr.Row():
            latest = gr.Number(GRAPH_LATEST, label="Latest checkpoints", precision=0,
                               minimum=1, maximum=500, scale=1)
            search = gr.Textbox(label="Name filter", scale=3)
        graph = text_md(elem_id="home-graph", elem_classes=["ws-lineage"])
        shown = gr.Textbox(visible=False)  # no gr.State: see app.ui
        mark = gr.Textbox(visible=False)
    return HomeView(summary, story, buttons, jobs, latest, search, graph, shown, mark)


def poll(lab: Lab, view: HomeView, timer, app) -> None:
    """Draw the graph when a page loads; refresh the summary, the story, the jobs and (when
    it changed) the graph when the lab's digest, read on `timer` (an app.ui.shared.Ticks),
    changes."""
    import gradio as gr

    def mark(latest, search):  # a digest on the timer; the rest only when it changes
        with lab.registry() as reg:
            return f"{reg.registry_mark()}:{reg.active_jobs_mark()}:{latest}:{search}"

    def refresh(latest, search, shown):
        steps = demo.demo_story(lab)
        text = lab_graph(lab, latest, search)
        return (lab_summary(lab), story_markdown(steps), *story_buttons(steps),
                active_jobs(lab), text if text != shown else gr.skip(), text)

    timer.add(mark, [view.latest, view.search], [view.mark])
    view.mark.change(refresh, inputs=[view.latest, view.search, view.shown],
                     outputs=[view.summary, view.story, *view.buttons.values(), view.jobs,
                              view.graph, view.shown],
                     api_visibility="private", show_progress="hidden",
                     concurrency_limit=Ticks.CONCURRENCY, concurrency_id="ticks")
    for trigger in (app.load, view.latest.submit, view.search.submit):
        trigger(lambda n, s: (lab_graph(lab, n, s),) * 2, inputs=[view.latest, view.search],
                outputs=[view.graph, view.shown], api_visibility="private")


def wire_story(lab: Lab, view: HomeView, tabs, targets: dict) -> None:
    """Each story button opens its step's view filled in. `targets`: story key -> (tab id,
    the components to fill, fill(preset) -> their values)."""
    import gradio as gr

    missing = set(view.buttons) - set(targets)
    if missing:
        raise RuntimeError(f"the demo story's steps {sorted(missing)} open no view")
    for key, button in view.buttons.items():
        tab_id, components, fill = targets[key]

        def on_click(key=key, tab_id=tab_id, fill=fill, n=len(components)):
            preset = demo.story_preset(lab, key)
            if preset is None:
                gr.Warning("This step's inputs are not in the registry yet.")
                return (gr.skip(),) * (n + 1)
            return (gr.Tabs(selected=tab_id), *fill(preset[1]))

        button.click(on_click, outputs=[tabs, *components], api_visibility="private")
