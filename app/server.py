"""`weightsmith serve`: the lab's job scheduler plus the web app (app/ui.py).

Importing this module imports neither torch nor gradio.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading

from app.lab import Lab
from app.scheduler import Scheduler

log = logging.getLogger("weightsmith")


def serve(lab: Lab, host: str = "127.0.0.1", port: int = 7860, build_demo: bool = True,
          ui: bool = True, demo_skills: bool = True) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from app.auth import has_users, serve_check

    refused = serve_check(lab, host) if ui else None
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
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
        if demo_skills:
            from app.demo import queue_demo_skills

            for job in queue_demo_skills(lab):
                log.info("queued demo skill fine-tune %s (%s)", job["id"],
                         json.loads(job["config"])["name"])
    thread = threading.Thread(target=scheduler.run_forever, args=(stop,), daemon=True,
                              name="weightsmith-scheduler")
    thread.start()
    app = None
    try:
        if ui:
            from app.ui import CSS, build_app

            app = build_app(lab)
            login = None
            if has_users(lab):  # a shared lab: every page and API call needs a login
                from app.auth import authenticate

                login = lambda name, password: authenticate(lab, name, password)  # noqa: E731
            app.queue().launch(server_name=host, server_port=port, prevent_thread_lock=True,
                               show_error=True, css=CSS, auth=login,
                               auth_message=f"Weightsmith lab {lab.root.name}: log in")
            log.info("serving %s at http://%s:%d", lab.root, host, port)
        else:
            log.info("scheduler running for %s (no UI)", lab.root)
        while not stop.is_set():
            stop.wait(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        if app is not None:
            app.close()  # stop Gradio's server threads, or they keep the process alive
        thread.join(timeout=5)
        scheduler.release()
        log.info("stopped")
    return 0
