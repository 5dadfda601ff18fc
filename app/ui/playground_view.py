"""The Playground tab: talk to one to three checkpoints side by side (say a merge and its
parents), with the same prompt, sampling settings and seed for each, so the differences come
from the weights. Text streams into each checkpoint's box token by token.

Generation runs in the Playground's worker process (app/playground.py), never in the
server; the handlers here check the form and turn the worker's events into updates."""

from dataclasses import dataclass, field

from app import playground as pg
from app.lab import Lab
from app.playground import playground_defaults
from app.ui.shared import request_user, text_md
from plugins.kit import markup

COLUMNS = pg.MAX_CHECKPOINTS


# ---------------------------------------------------------------------------------- handlers
def _head(box: "pg.Box | None") -> str:
    if box is None:
        return ""
    lines = [f"**{markup.md(box.title)}**", f"*{markup.md(box.status)}*"]
    lines += [f"⚠ {markup.md(n)}" for n in box.notes]
    return "  \n".join(lines)


def view_updates(view: "pg.View", names: list[str] | None = None) -> tuple:
    """A View as the tab's outputs: (run id, status, COLUMNS columns, COLUMNS headers,
    COLUMNS boxes)."""
    import gradio as gr

    boxes = list(view.boxes) + [None] * (COLUMNS - len(view.boxes))
    shown = len(view.boxes) or len(names or [])
    status = f"**{markup.md(view.status)}**" if view.status else ""
    return (view.run_id, status,
            *[gr.Column(visible=i < max(shown, 1)) for i in range(COLUMNS)],
            *[_head(b) for b in boxes],
            *[gr.Textbox(value=b.text if b else "",
                         label=(b.title if b else "Output")) for b in boxes])


def playground_generate(lab: Lab, ck_ids, mode, prompt, temperature, top_p, top_k,
                        max_new_tokens, seed, request=None):
    """The Generate button: a generator of the tab's updates as text streams in."""
    session = getattr(request, "session_hash", None) if request is not None else None
    for view in pg.generate(lab, request_user(request), ck_ids, mode, prompt, temperature,
                            top_p, top_k, max_new_tokens, seed, session=session):
        yield view_updates(view)


def playground_stop(lab: Lab, run_id: str | None, request=None) -> str:
    """The Stop button: end this page's generation before its next token."""
    playground = pg.playground(lab)
    session = getattr(request, "session_hash", None) if request is not None else None
    stopped = playground.stop(run_id) or playground.stop(playground.sessions.get(session or ""))
    return "**stopping…**" if stopped else "**nothing to stop**"


def with_parents(lab: Lab, ck_ids):
    """'Add its parents': the first picked checkpoint and its parents."""
    import gradio as gr

    first = next((c for c in (ck_ids or []) if c), None) if isinstance(ck_ids, list) else ck_ids
    if not first:
        gr.Warning("Pick a checkpoint first (a merge, say); its parents join it.")
        return gr.skip()
    return gr.Dropdown(value=playground_defaults(lab, first))


def column_heads(lab: Lab, ck_ids) -> tuple:
    """As picks change: one column per picked checkpoint, titled with its name."""
    import gradio as gr

    ids = [c for c in (ck_ids or []) if isinstance(c, str) and c][:COLUMNS]
    names = []
    with lab.registry() as reg:
        for c in ids:
            row = reg.get_checkpoint(c)
            names.append(f"{row['name']} ({row['id']})" if row else c)
    names += [None] * (COLUMNS - len(names))
    return (*[gr.Column(visible=i == 0 or n is not None) for i, n in enumerate(names)],
            *[f"**{markup.md(n)}**" if n else "" for n in names],
            *[gr.Textbox(label=n or "Output") for n in names])


# ------------------------------------------------------------------------------------ layout
@dataclass
class PlaygroundView:
    """What the app refreshes as the registry changes."""

    checkpoint_dropdowns: list = field(default_factory=list)
    picks: object = None


def build(lab: Lab, choices: list) -> PlaygroundView:
    """The Playground tab (inside the app's gr.Tabs)."""
    import gradio as gr

    with gr.Tab("Playground", id="playground"):
        text_md("Try checkpoints side by side: each gets the same prompt, settings and "
                "seed, so the differences come from the weights. Pick a merge and add its "
                "parents to see what the merge changed.")
        with gr.Row(equal_height=True):
            picks = gr.Dropdown(choices=choices, multiselect=True, filterable=True,
                                max_choices=COLUMNS, scale=5, elem_id="playground-picks",
                                label=f"Checkpoints (one to {COLUMNS})")
            add_parents = gr.Button("Add its parents", scale=1)
        mode = gr.Radio(list(pg.MODES), value="Completion", label="Mode",
                        info="Chat wraps the prompt in the checkpoint's chat template; a "
                             "checkpoint without one gets plain completion, and its box says so")
        prompt = gr.Textbox(label="Prompt", lines=3, max_length=pg.MAX_PROMPT_CHARS,
                            elem_id="playground-prompt")
        with gr.Row():
            temperature = gr.Slider(0, pg.MAX_TEMPERATURE, value=0.7, step=0.05,
                                    label="temperature (0: greedy)")
            top_p = gr.Slider(0.01, 1, value=0.95, step=0.01, label="top_p (1: off)")
            top_k = gr.Number(50, precision=0, minimum=0, maximum=pg.MAX_TOP_K,
                              label="top_k (0: off)")
            max_new = gr.Number(128, precision=0, minimum=1, maximum=pg.MAX_NEW_TOKENS,
                                label=f"max new tokens (1 to {pg.MAX_NEW_TOKENS})")
            seed = gr.Number(0, precision=0, minimum=0, maximum=pg.MAX_SEED, label="seed")
        with gr.Row():
            go = gr.Button("Generate", variant="primary", elem_id="playground-generate")
            stop = gr.Button("Stop", variant="stop", elem_id="playground-stop")
        status = text_md(elem_id="playground-status")
        run_id = gr.Textbox(visible=False)  # this page's run; no gr.State (app.ui)
        columns, heads, boxes = [], [], []
        with gr.Row(equal_height=True):
            for i in range(COLUMNS):
                with gr.Column(visible=i == 0, min_width=240) as column:
                    heads.append(text_md(elem_id=f"playground-head-{i}"))
                    boxes.append(gr.Textbox(label="Output", lines=12, max_lines=30,
                                            interactive=False, autoscroll=True,
                                            elem_id=f"playground-out-{i}"))
                columns.append(column)

    inputs = [picks, mode, prompt, temperature, top_p, top_k, max_new, seed]

    def generate(ck_ids, mode_, prompt_, temperature_, top_p_, top_k_, max_new_, seed_,
                 request: gr.Request):  # named: Gradio passes the request by its annotation
        yield from playground_generate(lab, ck_ids, mode_, prompt_, temperature_, top_p_,
                                       top_k_, max_new_, seed_, request=request)

    def stop_now(current, request: gr.Request):
        return playground_stop(lab, current, request)

    # several pages may press Generate at once: each waits its turn in the worker and says
    # so (app/playground.py), rather than in Gradio's queue
    go.click(generate, inputs=inputs, outputs=[run_id, status, *columns, *heads, *boxes],
             api_name="playground_generate", concurrency_limit=8, show_progress="hidden")
    stop.click(stop_now, inputs=run_id, outputs=status, api_name="playground_stop",
               concurrency_limit=None, show_progress="hidden")
    add_parents.click(lambda c: with_parents(lab, c), inputs=picks, outputs=picks,
                      api_name="playground_defaults")
    picks.change(lambda c: column_heads(lab, c), inputs=picks,
                 outputs=[*columns, *heads, *boxes], api_visibility="private",
                 show_progress="hidden")
    return PlaygroundView([picks], picks)
