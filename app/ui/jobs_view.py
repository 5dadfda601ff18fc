"""The Jobs tab: every job with its queue place, the selected job's live status, progress, log
tail and metric curves, and Stop, Retry and Resume. It polls the registry, so a refresh or a
second tab shows the same state."""

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import plugins
from app import auth
from app import jobs as jobs_mod
from app.auth import NotAllowed
from app.lab import Lab
from app.scheduler import log_tail
from app.ui.shared import Ticks, copy_first_cell, request_user, text_md
from plugins.kit import markup
from registry import RegistryError

JOB_COLUMNS = ["id", "plugin", "status", "progress", "user", "device", "duration", "created"]
LOG_LINES = 60
TABLE_ROWS = 200  # the newest jobs the table shows


# ---------------------------------------------------------------------------------- handlers
def _duration(job: dict) -> str:
    if not job["started_at"]:
        return ""
    start = datetime.fromisoformat(job["started_at"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(job["finished_at"].replace("Z", "+00:00")) \
        if job["finished_at"] else datetime.now(start.tzinfo)
    return f"{(end - start).total_seconds():.0f} s"


_GPU_CACHE: dict = {}  # {"at": monotonic time, "rows": gpu_status()}: one nvidia-smi per
GPU_CACHE_SECONDS = 4.0  # interval for the whole server, not one per open page


def gpu_summary() -> str:
    """One line per GPU for the Jobs view (nvidia-smi), or a note that there is none."""
    from app.scheduler import gpu_status

    cached = _GPU_CACHE.get("at")
    if cached is None or time.monotonic() - cached > GPU_CACHE_SECONDS:
        _GPU_CACHE.update(rows=gpu_status(), at=time.monotonic())
    rows = _GPU_CACHE["rows"]
    if not rows:
        return "GPUs: none found (nvidia-smi absent or reports none); jobs run on the CPU."

    def fmt(x, unit):
        return ("?" if x is None else f"{x:.0f}") + unit

    return "GPUs: " + " · ".join(
        f"**{r['index']}** {r['name']}: {fmt(r['memory_used_mib'], '')}/"
        f"{fmt(r['memory_total_mib'], ' MiB')}, {fmt(r['utilization_pct'], '%')} busy"
        for r in rows)


def job_table(lab: Lab) -> list[list]:
    from app.scheduler import queue_positions

    with lab.registry() as reg:
        rows = reg.jobs(limit=TABLE_ROWS)
        places = queue_positions(reg)
    return [[r["id"], r["plugin"],
             f"queued #{places[r['id']]}" if r["id"] in places else r["status"],
             f"{(r['progress'] or 0):.0%}", r["user"] or "",
             r["device"] or "", _duration(r), r["created_at"][:19].replace("T", " ")]
            for r in rows]


def job_table_view(lab: Lab, selected: str | None = None):
    """job_table for the view: the selected job's row is highlighted by its id, so the mark
    follows the job when newer jobs are inserted above it (Gradio's own cell selection
    stays at a row number; CSS hides it in this table)."""
    import pandas as pd

    frame = pd.DataFrame(job_table(lab), columns=JOB_COLUMNS)
    if not selected or selected not in set(frame["id"]):
        return frame
    return frame.style.apply(
        lambda row: ["background-color: #fed7aa" if row["id"] == selected else ""] * len(row),
        axis=1)


def job_detail(lab: Lab, job_id: str | None) -> tuple[str, str, str, object]:
    """(status markdown, progress bar HTML, log tail, metrics DataFrame) for one job."""
    return _job_view(lab, job_id)[:4]


def _job_view(lab: Lab, job_id: str | None) -> tuple[str, str, str, object, dict | None]:
    """job_detail, and the job's row (None when there is none), read in one connection."""
    import pandas as pd

    empty = pd.DataFrame({"step": [], "value": [], "name": []})
    if not job_id:
        return "Select a job in the table.", "", "", empty, None
    with lab.registry() as reg:
        job = reg.job(job_id, missing_ok=True)
        if job is None:
            return f"No job {markup.md(job_id)}.", "", "", empty, None
        metrics = reg.metrics(job_id)
        made = reg.job_checkpoints(job_id)
        made_data = [d["id"] for d in reg.datasets.made_by(job_id)]
    pct = (job["progress"] or 0) * 100
    status = (f"**{markup.md(job['id'])}** · {markup.md(job['plugin'])} · "
              f"**{markup.md(job['status'])}** · device {markup.md(job['device'] or '-')} · "
              f"{_duration(job)}")
    if job.get("executor"):  # a cluster engine's job: its id there, for the engine's own tools
        status += f" · {markup.md(job['executor'])} job {markup.md(job['engine_id'] or '-')}"
    if made:
        status += f"\n\nCheckpoints: {markup.md(', '.join(made))}"
    if made_data:
        status += f"\n\nDatasets: {markup.md(', '.join(made_data))}"
    scores = [m for m in metrics if m["step"] is None]  # final numbers, e.g. evaluations
    if scores:
        status += "\n\n" + " · ".join(f"{markup.md(m['name'])} = {m['value']:.4g}"
                                        for m in scores[-8:])
    if job["error"] and job["status"] != "succeeded":
        status += "\n\n" + markup.code_block(job["error"][-2000:])
    pct = min(max(float(pct), 0.0), 100.0)
    bar = (f"<div class='ws-progress'><div style='width:{pct:.1f}%'></div></div>"
           f"<div>{pct:.0f}% {markup.html(job['progress_message'] or '')}</div>")
    log = ""
    if job["log_path"] and Path(job["log_path"]).exists():
        log = log_tail(job["log_path"], LOG_LINES)
    curves = [m for m in metrics if m["step"] is not None]  # e.g. a training loss per step
    frame = pd.DataFrame({"step": [m["step"] for m in curves],
                          "value": [m["value"] for m in curves],
                          "name": [m["name"] for m in curves]}) if curves else empty
    return status, bar, log, frame, job


def plotted_metrics(names: list[str], chosen: list[str] | None) -> list[str]:
    """The curves drawn: the user's choice, else the losses and perplexities (metrics of
    other scales, such as tokens/s or the learning rate, would flatten them), else a
    search's fitness, else all."""
    if chosen:
        return [n for n in chosen if n in names]
    default = [n for n in names if "loss" in n or "ppl" in n or "perplexity" in n]
    return default or [n for n in names if "fitness" in n] or names


def pareto_frame(job: dict | None, frame) -> tuple[object, str, str]:
    """(points, x metric, y metric) of a job whose plugin declares `pareto`: one row per
    candidate that logged both metrics at the same step, with `front` saying whether it is
    on the Pareto front (plugins.kit.metrics says which way each is better); empty when the
    job's plugin declares none."""
    import pandas as pd

    from plugins.kit.metrics import better, pareto_front

    empty = pd.DataFrame({"x": [], "y": [], "front": [], "candidate": []})
    if job is None or not len(frame):
        return empty, "", ""
    try:
        plugin = plugins.get(job["plugin"])
        axes = plugin.pareto(plugin.Config.model_validate_json(job["config"])) \
            if plugin.pareto else None
    except Exception:  # a plugin gone or changed since the job: no plot rather than an error
        axes = None
    if not axes:
        return empty, "", ""
    x_name, y_name = axes
    xs = {int(r.step): r.value for r in frame.itertuples() if r.name == x_name}
    ys = {int(r.step): r.value for r in frame.itertuples() if r.name == y_name}
    steps = sorted(set(xs) & set(ys))
    if not steps:
        return empty, x_name, y_name
    points = [(xs[s], ys[s]) for s in steps]
    on = pareto_front(points, better(x_name), better(y_name))
    return pd.DataFrame({"x": [p[0] for p in points], "y": [p[1] for p in points],
                         "front": ["Pareto front" if o else "candidate" for o in on],
                         "candidate": steps}), x_name, y_name


def suggestion_text(suggestions: list[dict]) -> str:
    """The follow-up jobs a job offers, as Markdown (user-controlled text escaped)."""
    import yaml

    if not suggestions:
        return ""
    out = ["**Suggested next** (the button submits the first, as your job):"]
    for n, item in enumerate(suggestions, 1):
        out.append(f"{n}. {markup.md(item.get('label', ''))} "
                   f"({markup.md(item.get('plugin', ''))})")
        out.append(markup.code_block(yaml.safe_dump(item.get("config", {}), sort_keys=True),
                                     "yaml"))
    return "\n\n".join(out)


def live_job(lab: Lab, job_id: str | None, chosen: list[str] | None = None) -> tuple:
    """job_detail as the view's updates: (status, bar, log, the plot with the chosen curves,
    the Plot dropdown with every curve's name, the Pareto plot, the Submit-suggestion
    button); plots, dropdown and button hidden when they have nothing to show."""
    import gradio as gr

    status, bar, log, frame, job = _job_view(lab, job_id)
    points, x_name, y_name = pareto_frame(job, frame)
    suggested = json.loads(job["suggestions"]) if job and job.get("suggestions") else []
    if suggested:
        status += "\n\n" + suggestion_text(suggested)
    names = sorted(set(frame["name"])) if len(frame) else []
    shown = plotted_metrics(names, chosen)
    frame = frame[frame["name"].isin(shown)] if len(frame) else frame
    return (status, bar, log, gr.LinePlot(value=frame, visible=len(frame) > 0),
            gr.Dropdown(choices=names, visible=bool(names)),
            gr.ScatterPlot(value=points, visible=len(points) > 0, x_title=x_name or None,
                           y_title=y_name or None),
            gr.Button(visible=bool(suggested)))


def submit_suggestion(lab: Lab, job_id: str | None, user: str | None = None) -> tuple[str, str]:
    """Submit the first follow-up job the selected job offers, as the clicker's job (checked
    like any submit: a member's own data and checkpoints only)."""
    if not job_id:
        return "Select a job first.", ""
    with lab.registry() as reg:
        suggested = reg.job_suggestions(job_id)
    if not suggested:
        return f"{markup.md(job_id)} suggests no follow-up job.", job_id
    first = suggested[0]
    try:
        new = jobs_mod.submit(lab, first["plugin"], first["config"], user=user)
    except (plugins.ConfigError, plugins.PluginError, RegistryError, NotAllowed) as e:
        return f"**Not submitted:** {markup.md(e)}", job_id
    return (f"Submitted {markup.md(first.get('label', ''))} as **{markup.md(new['id'])}**.",
            new["id"])


def stop_job(lab: Lab, job_id: str | None, user: str | None = None) -> str:
    if not job_id:
        return "Select a job first."
    from app.executors import ExecutorError

    try:
        job = jobs_mod.cancel(lab, job_id, user=user)
    except NotAllowed as e:
        return f"**Not stopped.** {markup.md(e)}"
    except (RegistryError, ExecutorError) as e:  # ExecutorError: the cluster did not answer
        return f"**Not stopped.** {markup.md(e)}"
    return f"{markup.md(job_id)}: {markup.md(job['status'])}"


def retry_job(lab: Lab, job_id: str | None, user: str | None = None) -> tuple[str, str]:
    """Submit the selected job's config again, as a new job of whoever clicks (`user`),
    audited as theirs: a member's Retry of another's job is their own job."""
    if not job_id:
        return "Select a job first.", ""
    try:
        with lab.registry() as reg:
            job = reg.job(job_id)
        new = jobs_mod.submit(lab, job["plugin"], json.loads(job["config"]), user=user)
    except (plugins.ConfigError, plugins.PluginError, RegistryError) as e:
        return f"**Could not retry:** {markup.md(e)}", job_id
    return f"Re-submitted {markup.md(job_id)} as **{markup.md(new['id'])}**.", new["id"]


def resume_job(lab: Lab, job_id: str | None, user: str | None = None) -> tuple[str, str]:
    """Continue a cancelled or failed training job from its last saved state: the same
    config with the plugin's `resume_field` set to the job. It reads the job's
    own saved state, so only the job's owner or an admin may resume it; the new job is the
    resumer's."""
    if not job_id:
        return "Select a job first.", ""
    try:
        with lab.registry() as reg:
            job = reg.job(job_id)
        auth.check_owner(lab, user, job["user"], f"resume job {job_id}")
    except (NotAllowed, RegistryError) as e:
        return f"**Not resumed.** {markup.md(e)}", job_id
    plugin = plugins.get(job["plugin"])
    if not plugin.resume_field:
        return f"{markup.md(job['plugin'])} jobs cannot be resumed; use Retry.", job_id
    if job["status"] not in ("cancelled", "failed", "interrupted"):
        return (f"{markup.md(job_id)} is {markup.md(job['status'])}; only a stopped job can be "
                f"resumed."), job_id
    config = json.loads(job["config"])
    config[plugin.resume_field] = job_id
    try:
        new = jobs_mod.submit(lab, job["plugin"], config, user=user)
    except (plugins.ConfigError, plugins.PluginError) as e:
        return f"**Could not resume:** {markup.md(e)}", job_id
    return f"Resuming {markup.md(job_id)} as **{markup.md(new['id'])}**.", new["id"]


# ------------------------------------------------------------------------------------ layout
@dataclass
class JobsView:
    """The Jobs tab's components that its timers update (see `poll`)."""

    gpus: object
    table: object
    selected: object
    status: object
    progress: object
    log: object
    plot_metrics: object
    plot: object
    pareto: object
    suggest: object
    shown: object = None  # the jobs_mark of what the page shows (see `poll`)


def build(lab: Lab) -> JobsView:
    """The Jobs tab (inside the app's gr.Tabs) and its buttons' events."""
    import gradio as gr

    with gr.Tab("Jobs", id="jobs"):
        # both as they are now on every page load (app.ui.build_app)
        gpus = text_md(gpu_summary(), elem_id="gpus")
        table = gr.Dataframe(headers=JOB_COLUMNS, value=job_table_view(lab),
                             interactive=False, label="Jobs", elem_id="jobs-table")
        with gr.Row():
            selected = gr.Textbox(label="Selected job", scale=3, elem_id="selected-job")
            stop = gr.Button("Stop", variant="stop", scale=1)
            retry = gr.Button("Retry", scale=1)
            resume = gr.Button("Resume", scale=1)
        status = text_md(elem_id="job-status")
        suggest = gr.Button("Submit suggested job", visible=False, elem_id="job-suggest")
        progress = gr.HTML(elem_id="job-progress")
        with gr.Row():
            log = gr.Textbox(label="Log (live tail)", lines=16, max_lines=16,
                             autoscroll=True, scale=3, elem_id="job-log")
            with gr.Column(scale=2):
                plot_metrics = gr.Dropdown(  # custom values: see app.ui.bound_sessions
                    choices=[], multiselect=True, label="Plot", visible=False,
                    allow_custom_value=True,
                    info="Curves to draw (empty: the losses and perplexities).")
                plot = gr.LinePlot(x="step", y="value", color="name",
                                   label="Metrics", visible=False)
                # a search's candidates, one metric against another (Plugin.pareto)
                pareto = gr.ScatterPlot(x="x", y="y", color="front", label="Candidates",
                                        tooltip=["candidate", "x", "y"], visible=False,
                                        elem_id="job-pareto")
        action = text_md(elem_id="job-action")
        shown = gr.Textbox(visible=False)  # a digest of what the timer last sent

    copy_first_cell(table, selected)
    selected.change(lambda j: job_table_view(lab, j), inputs=selected, outputs=table,
                    api_visibility="private", show_progress="hidden")
    selected.change(lambda j: live_job(lab, j)[:4], inputs=selected,
                    outputs=[status, progress, log, plot], api_name="job_detail")
    selected.change(lambda j: live_job(lab, j)[5:], inputs=selected,
                    outputs=[pareto, suggest], api_visibility="private",
                    show_progress="hidden")
    plot_metrics.change(lambda j, c: live_job(lab, j, c)[3], inputs=[selected, plot_metrics],
                        outputs=plot, api_visibility="private")

    def on_stop(request: gr.Request, j):
        return stop_job(lab, j, request_user(request))

    def on_retry(request: gr.Request, j):
        return retry_job(lab, j, request_user(request))

    def on_resume(request: gr.Request, j):
        return resume_job(lab, j, request_user(request))

    def on_suggest(request: gr.Request, j):
        return submit_suggestion(lab, j, request_user(request))

    suggest.click(on_suggest, inputs=selected, outputs=[action, selected],
                  api_name="submit_suggestion")
    stop.click(on_stop, inputs=selected, outputs=action, api_name="stop_job")
    retry.click(on_retry, inputs=selected, outputs=[action, selected], api_name="retry_job")
    resume.click(on_resume, inputs=selected, outputs=[action, selected],
                 api_name="resume_job")
    return JobsView(gpus, table, selected, status, progress, log, plot_metrics, plot, pareto,
                    suggest, shown)


def view_mark(lab: Lab, job_id: str | None) -> str:
    """What the Jobs view shows, as a digest: the job list and the selected job's row, its
    metrics and its log's size; a running job's duration in 5-second steps."""
    with lab.registry() as reg:
        mark = reg.jobs_mark(TABLE_ROWS, job_id or None)
        job = reg.job(job_id, missing_ok=True) if job_id else None
    log = Path(job["log_path"]) if job and job["log_path"] else None
    size = log.stat().st_size if log is not None and log.exists() else 0
    return f"{mark}:{size}:{int(time.time() // 5)}"


def jobs_refresh(lab: Lab, job_id: str | None, chosen: list[str] | None) -> tuple:
    """What the Jobs view shows: (table, status, bar, log, plot, plot choices, Pareto plot,
    suggestion button)."""
    return (job_table_view(lab, job_id), *live_job(lab, job_id, chosen))


# The Jobs timer ticks every 1.5 s on every page that shows the Jobs tab. A tick returns only
# a digest of the jobs (one indexed query) into a hidden box; the box's change event, which
# the page fires only when the digest differs, sends the table, log and plot. A tick that
# returned skip() updates instead would still cost Gradio a new component and its config
# per output, per page (it rebuilds every updated output), so 20 pages watching an idle lab
# kept half a core busy (bench/load.py --pollers).
TICK_CONCURRENCY = Ticks.CONCURRENCY  # ticks of different pages run side by side


def poll(lab: Lab, view: JobsView, fast, slow) -> None:
    """Keep the tab live: the job list and the selected job when their digest changes, read
    on the `fast` gr.Timer; the GPU line on the `slow` one (an app.ui.shared.Ticks)."""
    fast.tick(lambda j: view_mark(lab, j), inputs=view.selected, outputs=view.shown,
              api_visibility="private", show_progress="hidden",
              concurrency_limit=TICK_CONCURRENCY, concurrency_id="ticks")
    view.shown.change(lambda j, c: jobs_refresh(lab, j, c),
                      inputs=[view.selected, view.plot_metrics],
                      outputs=[view.table, view.status, view.progress, view.log, view.plot,
                               view.plot_metrics, view.pareto, view.suggest],
                      api_visibility="private", show_progress="hidden",
                      concurrency_limit=TICK_CONCURRENCY, concurrency_id="ticks")
    slow.add(gpu_summary, [], [view.gpus])
