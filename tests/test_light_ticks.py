"""The workbench's timers send only what changed: the Jobs view's tick compares a digest of
the jobs (and the selected job's row, metrics and log) with the one the page holds, the
registry refresh a digest kept by triggers (schema v8). bench/load.py --pollers measures
the latency under 20 pages."""

import gradio as gr

from app.ui import jobs_view


def skipped(values) -> bool:
    return all(isinstance(v, dict) and v.get("__type__") == "update" and len(v) == 1
               for v in values)


def test_the_jobs_digest_moves_only_when_the_view_would(lab, tmp_path, monkeypatch):
    monkeypatch.setattr(jobs_view.time, "time", lambda: 1000.0)  # one 5-second step
    with lab.registry() as reg:
        job = reg.add_job(plugin="test_sleep", config={"seconds": 1, "pid_file": "x"})
        log = tmp_path / "log.txt"
        log.write_text("started\n")
        reg.update_job(job["id"], log_path=str(log))
    mark = jobs_view.view_mark(lab, job["id"])
    assert jobs_view.view_mark(lab, job["id"]) == mark
    # each thing the view shows moves the digest: progress, a log line, a metric, a new job,
    # another selected job, and time for a running job's duration (5-second steps)
    changes = [
        lambda reg: reg.update_job(job["id"], progress=0.5, status="running"),
        lambda reg: log.write_text("started\nstep 1\n"),
        lambda reg: reg.add_metric(name="loss", value=1.0, step=1, job_id=job["id"]),
        lambda reg: reg.add_job(plugin="test_sleep", config={}),
        lambda reg: reg.add_checkpoint(name="made", relation="import", job_id=job["id"]),
    ]
    for change in changes:
        with lab.registry() as reg:
            change(reg)
        new = jobs_view.view_mark(lab, job["id"])
        assert new != mark and jobs_view.view_mark(lab, job["id"]) == new
        mark = new
    assert jobs_view.view_mark(lab, None) != mark
    monkeypatch.setattr(jobs_view.time, "time", lambda: 1005.0)
    assert jobs_view.view_mark(lab, job["id"]) != mark
    table, status, *_ = jobs_view.jobs_refresh(lab, job["id"], None)
    assert job["id"] in status and len(table.data) == 2


def test_the_timers_return_only_digests(lab):
    """The app's timers output only hidden digest boxes and the GPU line; the views update
    from the boxes' change events."""
    from app.ui import build_app

    app = build_app(lab)
    config = app.get_config_file()
    kinds = {c["id"]: (c["type"], c.get("props", {}).get("visible", True))
             for c in config["components"]}
    ticks = [d for d in config["dependencies"] if any(t[1] == "tick" for t in d["targets"])]
    assert len(ticks) == 2  # one per timer: the Jobs view's, and the shared slow one
    outputs = [kinds[o] for d in ticks for o in d["outputs"]]
    assert outputs.count(("markdown", True)) == 1  # the GPU line
    assert all(kind == ("textbox", False) for kind in outputs if kind != ("markdown", True))


def test_the_registry_mark_moves_on_every_checkpoint_write(lab):
    with lab.registry() as reg:
        marks = [reg.registry_mark()]
        ck = reg.add_checkpoint(name="a", relation="import")
        marks.append(reg.registry_mark())
        reg.update_checkpoint(ck["id"], name="b")  # a rename: same count, new mark
        marks.append(reg.registry_mark())
        reg.add_evaluation(checkpoint_id=ck["id"], task="t", metric="m", value=1.0)
        marks.append(reg.registry_mark())
        reg.soft_delete_checkpoint(ck["id"], "ann")
        marks.append(reg.registry_mark())
        reg.add_job(plugin="x", config={})  # jobs are not what the lists show
        marks.append(reg.registry_mark())
    assert len(set(marks)) == 5 and marks[-1] == marks[-2]


def test_gradio_skip_is_what_skipped_detects():
    assert skipped([gr.skip()]) and not skipped(["text"])


def test_the_queue_of_an_idle_server_wakes_rarely():
    from app.server import PROGRESS_IDLE_SLEEP_S, QUEUE_IDLE_SLEEP_S, quiet_queue

    with gr.Blocks() as blocks:
        gr.Textbox()
    queue = quiet_queue(blocks.queue())._queue
    assert queue.sleep_when_free == QUEUE_IDLE_SLEEP_S >= 0.05
    assert queue.progress_update_sleep_when_free == PROGRESS_IDLE_SLEEP_S


def test_homes_digest_sees_any_queued_job_start(lab):
    with lab.registry() as reg:
        made = [reg.add_job(plugin="x", config={}) for _ in range(60)]
        before = reg.active_jobs_mark()
        reg.update_job(made[0]["id"], status="running")  # the oldest, far below the newest 50
        assert reg.active_jobs_mark() != before
