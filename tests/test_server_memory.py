"""Server memory per browser page: Gradio keeps a SessionState (a copy of every component's
config, about 0.75 MiB for this app) per page from its first event on, and by default drops
one only past 10,000 pages. `weightsmith serve` must hold a bounded number, the least
recently active out first (app.ui.bound_sessions). The RSS figure lives in bench/load.py
--connections; this test asserts on Gradio's session store itself."""

import signal
import socket
import threading

import pytest

from tests.conftest import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_page_sessions_are_capped_and_open_pages_kept(lab, monkeypatch):
    import httpx

    from app import server, ui
    from bench.load import page_load

    assert 16 <= ui.SESSION_CAPACITY <= 128  # room for a team's tabs; ~1 MiB each at most
    capacity = 24  # the mechanism, not the number: fewer pages to open, a quicker test
    monkeypatch.setattr(ui, "SESSION_CAPACITY", capacity)
    monkeypatch.delenv("GRADIO_ANALYTICS_MAX_EVENTS", raising=False)
    built = []  # the Blocks that serve() builds, to look into its session store
    build = ui.build_app
    monkeypatch.setattr(ui, "build_app", lambda lab: built.append(build(lab)) or built[-1])
    handlers = {}  # serve() runs in a thread here: keep its SIGTERM handler to stop it
    monkeypatch.setattr(signal, "signal", lambda sig, handler: handlers.setdefault(sig, handler))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    thread = threading.Thread(target=server.serve, args=(lab,), daemon=True,
                              kwargs={"port": port, "build_demo": False})
    thread.start()

    def up():
        assert thread.is_alive(), "serve() ended"
        try:
            return httpx.get(url + "config", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 90, interval=0.3, what="the server")
        holder = built[0].state_holder
        assert holder.capacity == capacity  # launch() did not reset it to Gradio's 10,000
        assert built[0]._queue.ANALYTICS_MAX_EVENTS == ui.ANALYTICS_EVENTS  # not 10,000
        with httpx.Client(timeout=60) as http:
            config = http.get(url + "config").json()
            # an open page: its load events, then its timers' events every so often
            open_page = page_load(http, url, config=config)
            pages = []
            for i in range(capacity + 40):  # pages that load and go (or API clients)
                pages.append(page_load(http, url, ticks=False, config=config))
                if i % 8 == 7:
                    page_load(http, url, config=config, session=open_page)  # its timers
            held = len(holder.session_data)
            assert held <= capacity, held
            assert open_page in holder.session_data  # still active: kept
            assert pages[-1] in holder.session_data and pages[0] not in holder.session_data

            # a page whose session was evicted still works: its next events start a fresh one
            page_load(http, url, config=config, session=pages[0])
            assert pages[0] in holder.session_data and len(holder.session_data) <= capacity
    finally:
        if signal.SIGTERM in handlers:
            handlers[signal.SIGTERM](signal.SIGTERM, None)  # serve()'s stop
        thread.join(30)
    assert not thread.is_alive()
