"""`weightsmith serve`: the lab's job scheduler plus the web app.

Until the browser-workbench issue lands, the page is minimal: checkpoints and jobs, refreshed
live from the registry. Importing this module does not import torch.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from app.lab import Lab
from app.scheduler import Scheduler

log = logging.getLogger("weightsmith")


def checkpoint_rows(lab: Lab) -> list[list]:
    with lab.registry() as reg:
        rows = reg.list_checkpoints(limit=200)
    return [[r["id"], r["name"], r["relation"], ", ".join(r["parents"]),
             f"{r['param_count'] / 1e6:.2f}M" if r["param_count"] else "",
             "; ".join(f"{k} = {v:.4g}" for k, v in r["scores"].items()), r["created_at"]]
            for r in rows]


def job_rows(lab: Lab) -> list[list]:
    with lab.registry() as reg:
        rows = reg.jobs(limit=200)
    return [[r["id"], r["plugin"], r["status"], f"{(r['progress'] or 0):.0%}",
             r["progress_message"] or "", r["user"] or "", r["device"] or "", r["created_at"]]
            for r in rows]


def build_app(lab: Lab):
    import gradio as gr

    with gr.Blocks(title="Weightsmith") as app:
        gr.Markdown(f"# Weightsmith\nLab: `{lab.root}`")
        with gr.Tab("Registry"):
            checkpoints = gr.Dataframe(
                headers=["id", "name", "relation", "parents", "params", "scores", "created"],
                value=lambda: checkpoint_rows(lab), interactive=False)
        with gr.Tab("Jobs"):
            jobs = gr.Dataframe(
                headers=["id", "plugin", "status", "progress", "message", "user", "device",
                         "created"],
                value=lambda: job_rows(lab), interactive=False)
        timer = gr.Timer(2.0)
        timer.tick(lambda: (checkpoint_rows(lab), job_rows(lab)), outputs=[checkpoints, jobs])
    return app


def serve(lab: Lab, host: str = "127.0.0.1", port: int = 7860, build_demo: bool = True,
          ui: bool = True) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    scheduler = Scheduler(lab)
    if not scheduler.acquire():
        print(f"error: another weightsmith process (pid {scheduler.holder}) is already "
              f"running the jobs of {lab.root}: a server, or a `weightsmith run --wait`. "
              f"Stop it first (lock: {lab.root / 'scheduler.lock'})", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    lost = scheduler.recover()
    if lost:
        log.warning("marked %d job(s) interrupted: %s", len(lost), ", ".join(lost))
    if build_demo:
        from app.demo import build_demo as build

        result = build(lab, log=lambda m: log.info(m))
        log.info("demo model: %s (%s)", result["name"], result["base"])
    thread = threading.Thread(target=scheduler.run_forever, args=(stop,), daemon=True,
                              name="weightsmith-scheduler")
    thread.start()
    try:
        if ui:
            app = build_app(lab)
            app.queue().launch(server_name=host, server_port=port, prevent_thread_lock=True,
                               show_error=True)
            log.info("serving %s at http://%s:%d", lab.root, host, port)
        else:
            log.info("scheduler running for %s (no UI)", lab.root)
        while not stop.is_set():
            stop.wait(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        thread.join(timeout=5)
        scheduler.release()
    return 0
