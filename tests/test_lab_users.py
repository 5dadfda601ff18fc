"""Shared labs, first step: users with hashed passwords, login, ownership of jobs and
checkpoints, soft deletes that keep lineage, the audit log, and no open serving without users."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env, run_cli, write_yaml


def test_passwords_are_salted_scrypt_hashes_never_plaintext(lab):
    from app import auth

    auth.add_user(lab, "alice", "correct horse", admin=True)
    auth.add_user(lab, "bob", "correct horse")
    assert auth.authenticate(lab, "alice", "correct horse")
    assert not auth.authenticate(lab, "alice", "wrong horse")
    assert not auth.authenticate(lab, "nobody", "correct horse")
    with lab.registry() as reg:
        rows = {r["name"]: r for r in reg.db["users"].rows}
    assert rows["alice"]["salt"] != rows["bob"]["salt"]
    assert rows["alice"]["hash"] != rows["bob"]["hash"]  # same password, different salts
    assert b"correct horse" not in lab.db_path.read_bytes()
    with pytest.raises(auth.AuthError, match="at least 8 characters"):
        auth.add_user(lab, "carol", "short")
    with pytest.raises(auth.AuthError, match="exists already"):
        auth.add_user(lab, "bob", "another one")
    with pytest.raises(auth.AuthError, match="user name '../x'"):
        auth.add_user(lab, "../x", "long enough")
    assert [u["name"] for u in auth.users(lab)] == ["alice", "bob"]


def test_only_the_owner_or_an_admin_cancels_and_it_is_audited(lab):
    from app import auth, jobs
    from app.ui import stop_job

    for name, admin in (("alice", False), ("bob", False), ("root", True)):
        auth.add_user(lab, name, "long enough", admin=admin)
    job = jobs.submit(lab, "test_sleep", {"seconds": 30, "pid_file": str(lab.root / "p")},
                      user="alice")
    with pytest.raises(auth.NotAllowed, match="bob may not cancel job .* belongs to alice"):
        jobs.cancel(lab, job["id"], user="bob")
    assert "Not stopped" in stop_job(lab, job["id"], user="bob")  # the UI handler
    assert jobs.job_summary(lab, job["id"])["status"] == "queued"
    assert jobs.cancel(lab, job["id"], user="root")["status"] == "cancelled"
    log = auth.audit_log(lab)
    assert [(a["action"], a["user"], a["target"]) for a in log[:2]] == [
        ("job.cancel", "root", job["id"]), ("job.submit", "alice", job["id"])]


def test_cli_cancel_as_another_user_is_refused(lab_dir, tmp_path):
    from app import auth, jobs
    from app.lab import Lab

    lab = Lab(lab_dir)
    auth.add_user(lab, "alice", "long enough")
    auth.add_user(lab, "bob", "long enough")
    config = write_yaml(tmp_path / "s.yaml", {"seconds": 30, "pid_file": str(tmp_path / "p")})
    run_cli(lab_dir, "run", "test_sleep", config, "--user", "alice", check=True)
    (job,) = Lab(lab_dir).registry().jobs()
    assert job["user"] == "alice"
    proc = run_cli(lab_dir, "cancel", job["id"], "--user", "bob")
    assert proc.returncode == 2 and "bob may not cancel" in proc.stderr
    proc = run_cli(lab_dir, "cancel", job["id"], "--user", "mallory")
    assert proc.returncode == 2 and "'mallory' is not a user of this lab" in proc.stderr
    assert jobs.job_summary(lab, job["id"])["status"] == "queued"
    ok = run_cli(lab_dir, "cancel", job["id"], "--user", "alice", check=True)
    assert json.loads(ok.stdout)["status"] == "cancelled"


def test_soft_delete_hides_a_checkpoint_but_keeps_its_lineage(lab):
    from app import auth
    from app.ui import checkpoint_table, delete_checkpoint_form

    auth.add_user(lab, "alice", "long enough")
    auth.add_user(lab, "bob", "long enough")
    with lab.registry() as reg:
        base = reg.add_checkpoint(name="base", relation="import", created_by="alice")
        child = reg.add_checkpoint(name="child", relation="finetune", created_by="bob",
                                   parents=[{"id": base["id"]}])
    assert "Not deleted" in delete_checkpoint_form(lab, base["id"], user="bob")
    assert "Deleted base" in delete_checkpoint_form(lab, base["id"], user="alice")
    assert [r[1] for r in checkpoint_table(lab)] == ["child"]
    with lab.registry() as reg:
        assert [p["parent_name"] for p in reg.parents(child["id"])] == ["base"]
        assert {n["id"] for n in reg.lineage(child["id"])["nodes"]} == {base["id"], child["id"]}
    assert [a["action"] for a in auth.audit_log(lab)][0] == "checkpoint.delete"


def test_serving_beyond_loopback_needs_users(lab_dir):
    from app import auth
    from app.lab import Lab

    proc = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--host", "0.0.0.0",
                           "--no-demo"], env=cli_env(lab_dir), cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "refusing to serve" in proc.stderr and "weightsmith users add" in proc.stderr
    assert auth.serve_check(Lab(lab_dir), "127.0.0.1") is None
    added = run_cli(lab_dir, "users", "add", "alice", "--admin", "--password-stdin",
                    check=True, input_text="long enough\n")
    assert json.loads(added.stdout) == {"name": "alice", "admin": True}
    assert auth.serve_check(Lab(lab_dir), "0.0.0.0") is None


@pytest.mark.slow
def test_the_app_asks_for_a_login_and_jobs_belong_to_who_submitted_them(lab_dir):
    """Through the HTTP API (gradio_client): no session without a login; alice's job is
    hers; bob cannot stop it through the UI endpoint; an admin can."""
    from gradio_client import Client

    from app import auth
    from app.lab import Lab
    from tests.test_ui import form_values, free_port
    from tests.conftest import wait_for

    lab = Lab(lab_dir)
    for name, admin in (("alice", False), ("bob", False), ("root", True)):
        auth.add_user(lab, name, f"{name}-password", admin=admin)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-demo", "--port",
                             str(port)], env=cli_env(lab_dir), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        import urllib.request

        def login_page():
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return r.read().decode()
            except OSError:
                assert proc.poll() is None, "the server exited"
                return None

        wait_for(login_page, 90, interval=0.5, what="the server")
        import urllib.error

        with pytest.raises(urllib.error.HTTPError) as refused:  # the app's config: login first
            urllib.request.urlopen(url + "config", timeout=5)
        assert refused.value.code == 401
        with pytest.raises(Exception):
            Client(url, verbose=False, auth=("alice", "wrong-password"))
        alice = Client(url, verbose=False, auth=("alice", "alice-password"))
        bob = Client(url, verbose=False, auth=("bob", "bob-password"))
        message, job_id = alice.predict(*form_values("test_sleep", {
            "seconds": 30, "pid_file": str(lab_dir / "pid")}), api_name="/run_test_sleep")
        assert job_id, message
        with lab.registry() as reg:
            assert reg.job(job_id)["user"] == "alice"
        assert "bob may not cancel" in bob.predict(job_id, api_name="/stop_job")
        root = Client(url, verbose=False, auth=("root", "root-password"))
        assert root.predict(job_id, api_name="/stop_job") == f"{job_id}: cancelled"
    finally:
        proc.terminate()
        proc.wait(20)
