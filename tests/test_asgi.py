"""The workbench mounted as an ASGI app behind an authenticating proxy (app.server.asgi_app):
run exactly as the README shows, under uvicorn, and driven through the HTTP API."""

import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.conftest import REPO, cli_env, wait_for


@pytest.mark.slow
def test_behind_a_proxy_the_header_names_the_user_and_no_header_is_refused(lab_dir):
    from gradio_client import Client

    from app import auth
    from app.lab import Lab
    from tests.test_ui import form_values, free_port

    lab = Lab(lab_dir)
    for name in ("alice", "bob"):  # lab users, so ownership is enforced (no one is admin)
        auth.add_user(lab, name, f"{name}-password")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory",
                             "app.server:asgi_app", "--host", "127.0.0.1", "--port", str(port),
                             "--timeout-graceful-shutdown", "3"],
                            env=cli_env(lab_dir), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)

    def get(path, headers=None):
        request = urllib.request.Request(url + path, headers=headers or {})
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status

    def up():
        try:
            return get("", {"X-Forwarded-User": "alice"}) == 200
        except urllib.error.HTTPError:
            raise
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode()
            return False

    try:
        wait_for(up, 60, interval=0.3, what="uvicorn")
        for path in ("", "config", "gradio_api/info"):  # no header: refused
            with pytest.raises(urllib.error.HTTPError) as refused:
                get(path)
            assert refused.value.code == 401, path
        with pytest.raises(Exception):
            Client(url, verbose=False)
        assert get("config", {"X-Forwarded-Email": "carol@lab.example"}) == 200

        alice = Client(url, verbose=False, headers={"X-Forwarded-User": "alice"})
        bob = Client(url, verbose=False, headers={"X-Forwarded-User": "bob"})
        message, job_id = alice.predict(*form_values("test_sleep", {
            "seconds": 30, "pid_file": str(lab_dir / "pid")}), api_name="/run_test_sleep")
        assert job_id.startswith("job-"), message
        with lab.registry() as reg:
            assert reg.job(job_id)["user"] == "alice"
        # the app's lifespan runs the lab's scheduler: the job starts with no other process
        wait_for(lambda: "running" in alice.predict(job_id, api_name="/job_detail")[0], 20,
                 interval=0.3, what="the job to start")
        assert "bob may not cancel" in bob.predict(job_id, api_name="/stop_job")
        assert alice.predict(job_id, api_name="/stop_job") == f"{job_id}: cancelled"
        assert [(a["action"], a["user"]) for a in auth.audit_log(lab)[:2]] == [
            ("job.cancel", "alice"), ("job.submit", "alice")]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    # the lifespan stopped the scheduler thread and released the lab cleanly
    assert b"Application shutdown complete" in out and b"Traceback" not in out, out.decode()
