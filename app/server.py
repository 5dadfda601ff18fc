"""`weightsmith serve`: the lab's job scheduler plus the web app (app/ui/).

Importing this module imports neither torch nor gradio.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import sys
import threading

from app.lab import Lab
from app.scheduler import Scheduler

log = logging.getLogger("weightsmith")



# Gradio's queue loops sleep 1 ms (dispatch) and 10 ms (progress messages) between looks at
# an empty queue (its Linux defaults): 1,100 wake-ups a second, about 4% of a core for a
# server nobody uses. Every event of this app is a click or a timer tick of 1.5 s or more,
# and no handler streams gr.Progress, so looking every 50 and 100 ms costs nothing a person
# sees and brings the idle server under 1% of a core (bench/load.py prints it). Gradio has
# no setting for these; both attributes are read on every loop, so setting them after
# .queue() takes effect.
QUEUE_IDLE_SLEEP_S = 0.05  # what Gradio itself uses on Windows
PROGRESS_IDLE_SLEEP_S = 0.1


def quiet_queue(blocks):
    """`blocks` (after .queue()) with its queue loops waking at most every
    QUEUE_IDLE_SLEEP_S and PROGRESS_IDLE_SLEEP_S when there is nothing to do."""
    queue = getattr(blocks, "_queue", None)
    for name, floor in (("sleep_when_free", QUEUE_IDLE_SLEEP_S),
                        ("progress_update_sleep_when_free", PROGRESS_IDLE_SLEEP_S)):
        if queue is not None and isinstance(getattr(queue, name, None), (int, float)):
            setattr(queue, name, max(getattr(queue, name), floor))
    return blocks


def serve(lab: Lab, host: str = "127.0.0.1", port: int = 7860, build_demo: bool = True,
          ui: bool = True, demo_skills: bool = True, demo_steps: int | None = None) -> int:
    # No cyclic garbage collection while the server starts: importing Gradio and building
    # the page (~1,000 components) makes ~220,000 objects, and each full collection among
    # them takes ~0.12 s on 2 cores; then the objects made so far are frozen (gc.freeze:
    # never scanned again), so the live server's collections stay short too. Before this,
    # one page load in three took 0.2 s instead of 0.07 s (a full collection in its way).
    gc.disable()
    try:
        return _serve(lab, host, port, build_demo, ui, demo_skills, demo_steps)
    finally:
        gc.enable()


def _serve(lab: Lab, host: str, port: int, build_demo: bool, ui: bool, demo_skills: bool,
           demo_steps: int | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from registry.hub import install_log_redaction

    from registry.hub import RedactingStream

    install_log_redaction()  # no Hub token in the server's log, whatever a library echoes
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    from app.auth import has_users, serve_check

    refused = serve_check(lab, host) if ui else None
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    scheduler = Scheduler(lab, warm=lab.settings.warm_workers)
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
        _start_demo(lab, stop, demo_skills, demo_steps)
    thread = threading.Thread(target=scheduler.run_forever, args=(stop,), daemon=True,
                              name="weightsmith-scheduler")
    if not ui:
        thread.start()
    app = None
    try:
        if ui:
            from app.ui import CSS, HEAD, build_app

            app = build_app(lab)
            login, middleware = None, []
            if has_users(lab):  # a shared lab: every page and API call needs a login
                from app.auth import login_checker

                login = login_checker(lab)  # throttled, locks a name, audited
            else:  # a single-user lab on loopback: answer only to loopback names (rebinding)
                from starlette.middleware import Middleware

                middleware = [Middleware(LoopbackHostOnly)]
            # app_kwargs go to the FastAPI constructor (gradio.routes.App.create_app)
            quiet_queue(app.queue()).launch(
                server_name=host, server_port=port, prevent_thread_lock=True,
                show_error=True, css=CSS, head=HEAD, auth=login,
                max_file_size=f"{lab.settings.max_upload_mb}mb",
                auth_message=f"Weightsmith lab {lab.root.name}: log in",
                # per-page memory bound (app.ui.bound_sessions); launch would otherwise
                # reset it to Gradio's 10,000
                state_session_capacity=app.state_session_capacity,
                app_kwargs={"middleware": middleware})
            install_log_redaction()  # the handlers Gradio's uvicorn set up meanwhile
            gc.freeze()  # see `serve`
            gc.enable()
            log.info("serving %s at http://%s:%d", lab.root, host, port)
            # jobs start once the page answers: a queued job's worker imports torch, which
            # on two cores would otherwise slow the first page by seconds (bench/startup.py)
            thread.start()
        else:
            gc.enable()
            log.info("scheduler running for %s (no UI)", lab.root)
        while not stop.is_set():
            stop.wait(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        if app is not None:
            app.close()  # stop Gradio's server threads, or they keep the process alive
        if thread.is_alive():
            thread.join(timeout=5)
        scheduler.release()
        log.info("stopped")
    return 0


def _start_demo(lab: Lab, stop: threading.Event, skills: bool,
                steps: int | None = None) -> None:
    """Queue the demo: the job that pre-trains its base (the scheduler runs it; the server
    listens meanwhile), then its skill fine-tunes, queued by a small thread once the base is
    registered. A demo that cannot be queued is logged, and the workbench serves anyway."""
    from app.demo import DEFAULT_STEPS, build_demo, queue_demo_skills, queue_skills_when_built

    try:
        result = build_demo(lab, pretrain_steps=steps or DEFAULT_STEPS,
                            log=lambda m: log.info(m))
        if result["base"]:
            log.info("demo model: %s (%s)", result["name"], result["base"])
            if skills:
                for job in queue_demo_skills(lab):
                    log.info("queued demo skill fine-tune %s (%s)", job["id"],
                             json.loads(job["config"])["name"])
        elif skills:
            threading.Thread(target=queue_skills_when_built, name="weightsmith-demo",
                             args=(lab, result["job"], stop), daemon=True,
                             kwargs={"log": lambda m: log.info(m)}).start()
    except Exception:  # noqa: BLE001 - the demo is a convenience, the lab is the point
        log.exception("the demo could not be queued")


# --------------------------------------------------------------------------- Host check
def loopback_host_header(value: str | None) -> bool:
    """Whether a Host header names the loopback: `localhost`, a 127.x.x.x address or `[::1]`,
    with or without a port."""
    from app.auth import is_loopback

    value = (value or "").strip()
    if value.startswith("["):  # [::1] or [::1]:7860
        host, closed, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None if rest else ""
        return bool(closed) and port is not None and (port == "" or port.isdigit()) \
            and is_loopback(host)
    if value.count(":") == 1:  # name:port, ipv4:port
        host, port = value.split(":")
        return port.isdigit() and is_loopback(host)
    return is_loopback(value)


class LoopbackHostOnly:
    """ASGI middleware: refuse (HTTP 403, plain text) any HTTP request or websocket whose Host
    header does not name the loopback. A lab with no users has no login, and a web page on
    any site could otherwise reach it by DNS rebinding (its own name, re-pointed at
    127.0.0.1, sends that name as Host). Written out because Starlette's
    TrustedHostMiddleware matches exact names only (not 127.0.0.0/8) and splits `[::1]:7860`
    at the first colon."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope.get("headers") or ()
                     if k == b"host"), None)
        if loopback_host_header(host):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        shown = "no Host header" if host is None else f"Host {host[:100]!r}"
        body = (f"refused: {shown}; expected localhost, 127.x.x.x or [::1] (this lab has no "
                f"users, so it answers to loopback names only)\n").encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------ behind an OAuth proxy
PROXY_USER_HEADERS = ("x-forwarded-user", "x-forwarded-email")  # oauth2-proxy's names


def proxy_user(request) -> str | None:
    """The user an authenticating reverse proxy (oauth2-proxy and the like) names in its
    request headers, or None, which refuses the request (401). Trust this only when the app
    is reachable through the proxy alone, and the proxy overwrites these headers."""
    for header in PROXY_USER_HEADERS:
        value = (request.headers.get(header) or "").strip()
        if value:
            return value[:256]
    return None


def _schedule(lab: Lab, stop: threading.Event) -> None:
    """Run the lab's job scheduler until `stop`. Another process may hold the lab's scheduler
    lock (`weightsmith serve --no-ui`, or another uvicorn worker): then wait, and take over
    if it stops, so that exactly one process schedules the lab at any time."""
    scheduler = Scheduler(lab, warm=lab.settings.warm_workers)
    while not scheduler.acquire():
        if stop.wait(5.0):
            return
    try:
        lost = scheduler.recover()
        if lost:
            log.warning("marked %d job(s) interrupted: %s", len(lost), ", ".join(lost))
        log.info("scheduler running for %s", lab.root)
        scheduler.run_forever(stop)
    finally:
        scheduler.release()


def asgi_app(lab: Lab | str | None = None, auth_dependency=proxy_user, path: str = "/",
             schedule: bool = True, loopback_host_only: bool = False):
    """The workbench as an ASGI app (FastAPI), to run under uvicorn behind an authenticating
    proxy. `auth_dependency(request)` returns the user's name, or None to refuse the request
    (HTTP 401); the default reads the proxy's X-Forwarded-User (else X-Forwarded-Email).
    Handlers get that name as `request.username`, so jobs and checkpoints record it.

    `lab`: a Lab or a folder (default: $WEIGHTSMITH_LAB, else ./lab). With `schedule`, the
    app's lifespan runs the lab's job scheduler in a thread (see `_schedule`). With
    `loopback_host_only`, requests whose Host is not a loopback name are refused
    (LoopbackHostOnly); off by default, since the proxy in front sets Host.

        WEIGHTSMITH_LAB=/srv/lab uvicorn --factory app.server:asgi_app --host 127.0.0.1
    """
    import contextlib

    import gradio as gr
    from fastapi import FastAPI

    from app.ui import CSS, HEAD, build_app

    from registry.hub import install_log_redaction

    install_log_redaction()  # uvicorn's handlers are set up by now
    lab = lab if isinstance(lab, Lab) else Lab(lab)  # as `weightsmith serve` opens it
    if auth_dependency is None:
        raise ValueError("asgi_app needs an auth_dependency: behind no proxy, use "
                         "`weightsmith serve`, which has its own login")

    @contextlib.asynccontextmanager
    async def lifespan(_):
        stop = threading.Event()
        thread = None
        if schedule:
            thread = threading.Thread(target=_schedule, args=(lab, stop), daemon=True,
                                      name="weightsmith-scheduler")
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if thread is not None:
                thread.join(timeout=10)

    blocks = quiet_queue(build_app(lab).queue())
    middleware = []
    if loopback_host_only:
        from starlette.middleware import Middleware

        middleware = [Middleware(LoopbackHostOnly)]
    return gr.mount_gradio_app(FastAPI(lifespan=lifespan, middleware=middleware), blocks,
                               path=path,
                               auth_dependency=auth_dependency, css=CSS, head=HEAD,
                               show_error=True,
                               max_file_size=f"{lab.settings.max_upload_mb}mb")
