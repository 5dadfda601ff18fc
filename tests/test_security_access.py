"""Access to a lab: login lockout and rate bound, the loopback check of `weightsmith serve`,
the Host check against DNS rebinding on a no-user lab, and many `run --wait` at once."""

import asyncio
import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

from tests.conftest import REPO, cli_env, last_json, wait_for, write_yaml


def actions(lab) -> list[tuple]:
    from app import auth

    return [(a["action"], a["user"], a["target"]) for a in reversed(auth.audit_log(lab))]


# ------------------------------------------------------------------------------ login
def test_repeated_failures_lock_the_name_even_for_the_right_password(lab):
    from app import auth

    auth.add_user(lab, "alice", "correct horse")
    for _ in range(auth.LOCK_AFTER):
        assert not auth.authenticate(lab, "alice", "wrong horse")
    assert not auth.authenticate(lab, "alice", "correct horse")  # locked: not even checked
    log = actions(lab)
    assert log[1:] == [("login.failed", None, "alice")] * auth.LOCK_AFTER + [
        ("login.locked", None, "alice")]
    assert "horse" not in json.dumps(auth.audit_log(lab))  # never a password
    locked = auth.audit_log(lab)[0]
    assert "until" in locked["details"]
    # another name is not affected
    auth.add_user(lab, "bob", "battery staple")
    assert auth.authenticate(lab, "bob", "battery staple")
    # the lock ends LOCKOUT seconds after the last counted failure (moved back in time here)
    with lab.registry() as reg:
        reg.db.execute("UPDATE login_failures SET at = at - ?", [auth.LOCKOUT + 1])
    assert auth.authenticate(lab, "alice", "correct horse")
    assert actions(lab)[-1] == ("login.ok", "alice", "alice")
    with lab.registry() as reg:  # a success clears the name's failures
        assert reg.db["login_failures"].count_where("name = ?", ["alice"]) == 0


def test_a_success_resets_the_count_and_unknown_names_lock_too(lab):
    from app import auth

    auth.add_user(lab, "alice", "correct horse")
    for _ in range(2):
        for _ in range(auth.LOCK_AFTER - 1):
            assert not auth.authenticate(lab, "alice", "wrong horse")
        assert auth.authenticate(lab, "alice", "correct horse")
    # a name that is no user locks the same way, so a lock tells nothing about who exists
    for _ in range(auth.LOCK_AFTER):
        assert not auth.authenticate(lab, "mallory", "guess-guess")
    assert not auth.authenticate(lab, "mallory", "guess-guess")
    assert actions(lab)[-1] == ("login.locked", None, "mallory")
    # the lock ends; failures spread over more than FAILURE_WINDOW do not lock
    with lab.registry() as reg:
        reg.db.execute("UPDATE login_failures SET at = at - ?", [auth.FAILURE_WINDOW + 1])
    for _ in range(auth.LOCK_AFTER - 1):
        assert not auth.authenticate(lab, "mallory", "guess-guess")
        assert actions(lab)[-1] == ("login.failed", None, "mallory")
    # rows older than FAILURE_WINDOW + LOCKOUT count for nothing and are pruned
    with lab.registry() as reg:
        reg.db.execute("UPDATE login_failures SET at = at - ?",
                       [auth.FAILURE_WINDOW + auth.LOCKOUT + 1])
    assert not auth.authenticate(lab, "mallory", "guess-guess")
    assert actions(lab)[-1] == ("login.failed", None, "mallory")
    with lab.registry() as reg:
        assert reg.db["login_failures"].count_where("name = ?", ["mallory"]) == 1


def test_parallel_guesses_cannot_slip_past_the_lock(lab):
    from app import auth

    auth.add_user(lab, "alice", "correct horse")
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        auth.authenticate(lab, "alice", "wrong horse"))) for _ in range(3 * auth.LOCK_AFTER)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [False] * len(threads)
    log = [a for a, _, _ in actions(lab)]
    assert log.count("login.failed") == auth.LOCK_AFTER  # only 5 passwords were checked
    assert log.count("login.locked") == 2 * auth.LOCK_AFTER


def test_the_rate_bound_slows_then_refuses_a_burst_of_logins(lab):
    from app import auth

    clock = [100.0]
    limit = auth.RateLimit(rate=2.0, burst=3, max_wait=1.0, clock=lambda: clock[0])
    assert [limit.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.reserve() == pytest.approx(0.5)  # the 4th waits for its token
    assert limit.reserve() == pytest.approx(1.0)
    assert limit.reserve() is None  # would wait too long: refused, nothing taken
    clock[0] += 10.0
    assert limit.reserve() == 0.0

    auth.add_user(lab, "alice", "correct horse")
    login = auth.login_checker(lab, auth.RateLimit(rate=100.0, burst=1, max_wait=0.5))
    assert asyncio.run(login("alice", "correct horse")) is True
    assert asyncio.run(login("alice", "correct horse")) is True  # waited 10 ms
    refusing = auth.login_checker(lab, auth.RateLimit(rate=0.01, burst=1, max_wait=0.5))
    assert asyncio.run(refusing("alice", "correct horse")) is True
    before = len(auth.audit_log(lab))
    assert asyncio.run(refusing("alice", "correct horse")) is False  # over the bound
    assert len(auth.audit_log(lab)) == before  # a flood does not flood the audit table


# --------------------------------------------------------------------------- loopback
@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.5.6.7", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LocalHost", True),
    ("127.0.0.1.nip.io", False), ("localhost.evil.com", False), ("localhost.", False),
    ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("", False), ("127.1", False),
    ("[::1", False)])
def test_only_literal_loopback_addresses_and_localhost_serve_without_users(lab, host, loopback):
    from app import auth

    assert auth.is_loopback(host) is loopback
    refused = auth.serve_check(lab, host)
    assert (refused is None) is loopback
    if refused:
        assert "weightsmith users add" in refused and repr(host) in refused
    auth.add_user(lab, "alice", "correct horse")
    assert auth.serve_check(lab, host) is None  # with users, any host (logins protect it)


@pytest.mark.parametrize("header, ok", [
    ("localhost", True), ("localhost:7860", True), ("127.0.0.1:7860", True),
    ("127.8.9.10", True), ("[::1]:7860", True), ("[::1]", True),
    ("evil.example", False), ("evil.example:7860", False), ("127.0.0.1.nip.io:7860", False),
    ("localhost.evil.com", False), ("localhost:x", False), ("[::1]x", False), ("", False),
    (None, False)])
def test_the_host_header_of_a_no_user_lab_must_name_the_loopback(header, ok):
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from app.server import LoopbackHostOnly

    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("lab"))],
                    middleware=[Middleware(LoopbackHostOnly)])
    client = TestClient(app)
    headers = {"host": header} if header is not None else {}
    if header is None:  # httpx always sends one: drop it at the ASGI level instead
        client = TestClient(Starlette(middleware=[Middleware(_DropHost),
                                                  Middleware(LoopbackHostOnly)],
                                      routes=app.routes))
    response = client.get("/", headers=headers)
    if ok:
        assert response.status_code == 200 and response.text == "lab"
    else:
        assert response.status_code == 403
        assert response.headers["content-type"].startswith("text/plain")
        assert "expected localhost, 127.x.x.x or [::1]" in response.text


@pytest.mark.slow
def test_behind_a_proxy_the_host_check_is_off_unless_asked_for(lab):
    from starlette.testclient import TestClient

    from app.server import asgi_app

    user = {"X-Forwarded-User": "alice"}
    for only, code in ((False, 200), (True, 403)):
        client = TestClient(asgi_app(lab, schedule=False, loopback_host_only=only))
        assert client.get("/config", headers={"host": "lab.example.org", **user}
                          ).status_code == code
        assert client.get("/config", headers={"host": "127.0.0.1:7860", **user}
                          ).status_code == 200


class _DropHost:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"host"])
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------ served app
def _serve(lab_dir, port):
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-demo", "--port",
                             str(port)], env=cli_env(lab_dir), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _request(port, method, path, host, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def _up(proc, port):
    def ready():
        try:
            return _request(port, "GET", "/", f"127.0.0.1:{port}")[0] == 200
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode()
            return False
    wait_for(ready, 90, interval=0.3, what="the server")


def _stop(proc) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out.decode("utf-8", "replace")


@pytest.mark.slow
def test_a_no_user_lab_refuses_requests_for_other_host_names(lab_dir):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends
    `Host: evil.example`; the single-user lab must not answer it."""
    from tests.test_ui import free_port

    port = free_port()
    proc = _serve(lab_dir, port)
    try:
        _up(proc, port)
        for path in ("/", "/config", "/gradio_api/info"):
            status, text = _request(port, "GET", path, "evil.example")
            assert status == 403 and "Host 'evil.example'" in text, (path, status, text)
            assert "Traceback" not in text
        assert _request(port, "GET", "/config", f"evil.example:{port}")[0] == 403
        assert _request(port, "POST", "/gradio_api/queue/join", "evil.example", body="{}",
                        headers={"Content-Type": "application/json"})[0] == 403
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
            status, text = _request(port, "GET", "/config", host)
            assert status == 200, (host, status, text)
    finally:
        out = _stop(proc)
    assert "Traceback" not in out, out


@pytest.mark.slow
def test_the_served_login_locks_a_name_after_repeated_failures(lab_dir):
    """Through Gradio's /login: the lockout is wired into `weightsmith serve`, and a lab with
    users skips the Host check (its logins protect it)."""
    from app import auth
    from app.lab import Lab
    from tests.test_ui import free_port

    lab = Lab(lab_dir)
    auth.add_user(lab, "alice", "correct horse", admin=True)
    port = free_port()
    proc = _serve(lab_dir, port)

    def login(password, host=None):
        body = urllib.parse.urlencode({"username": "alice", "password": password})
        return _request(port, "POST", "/login", host or f"127.0.0.1:{port}", body=body,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})[0]
    try:
        _up(proc, port)
        assert login("correct horse", host="lab.example.org") == 200
        for _ in range(auth.LOCK_AFTER):
            assert login("wrong horse") == 400
        assert login("correct horse") == 400  # locked
    finally:
        out = _stop(proc)
    assert "Traceback" not in out, out
    log = [a for a, _, _ in actions(lab)]
    assert log[-(auth.LOCK_AFTER + 2):] == (["login.ok"] + ["login.failed"] * auth.LOCK_AFTER
                                             + ["login.locked"])


# ---------------------------------------------------------------------- run --wait
@pytest.mark.slow
def test_many_run_wait_at_once_without_a_server_all_finish(lab_dir, tmp_path):
    """Each `run --wait` takes the scheduler lock in turn to start its own job; none hangs."""
    n = 6
    procs = []
    for i in range(n):
        config = write_yaml(tmp_path / f"s{i}.yaml",
                            {"seconds": 0.3, "pid_file": str(tmp_path / f"pid{i}")})
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "app.cli", "run", "test_sleep", config, "--wait"],
            env=cli_env(lab_dir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    deadline = time.monotonic() + 150
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{n - len(results)} of {n} `run --wait` still waiting after 150 s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for code, out, err in results:
        assert code == 0, err
        assert last_json(out)["status"] == "succeeded", out
        assert "Traceback" not in err, err
    from app.lab import Lab

    with Lab(lab_dir).registry() as reg:
        assert [j["status"] for j in reg.jobs()] == ["succeeded"] * n
    # every waiter let go of the lock: a server could start now
    from app.scheduler import Scheduler

    scheduler = Scheduler(Lab(lab_dir))
    assert scheduler.acquire()
    scheduler.release()
