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


def test_fair_order_round_robins_users_within_a_priority():
    from app.scheduler import fair_order

    def job(i, user, priority=0):
        return {"id": f"{user}{i}", "user": user, "priority": priority,
                "created_at": f"2026-01-01T00:00:{i:02d}"}

    queued = [job(i, "a") for i in range(5)] + [job(10, "b"), job(11, "b"), job(12, "c"),
                                                job(13, "auto", priority=-10),
                                                job(14, "d", priority=5)]
    order = [j["id"] for j in fair_order(queued, running=[], last_start={})]
    assert order == ["d14", "a0", "b10", "c12", "a1", "b11", "a2", "a3", "a4", "auto13"]
    # a user with a job running yields to one without; the user served longest ago goes first
    running = [{"user": "a"}]
    order = [j["id"] for j in fair_order(queued[:7], running, {"b": "2026-01-02"})]
    assert order[:3] == ["b10", "a0", "b11"]


def test_one_users_ten_jobs_do_not_starve_anothers_one(lab, tmp_path):
    """User A queues 10 jobs, then user B queues 1: B's job starts before A's third."""
    from app import jobs
    from app.scheduler import Scheduler, queue_positions
    from tests.conftest import wait_for

    a_jobs = [jobs.submit(lab, "test_sleep", {"seconds": 0.1,
                                              "pid_file": str(tmp_path / f"a{i}")},
                          user="alice") for i in range(10)]
    b_job = jobs.submit(lab, "test_sleep", {"seconds": 0.1, "pid_file": str(tmp_path / "b")},
                        user="bob")
    with lab.registry() as reg:  # the place the Jobs view shows: bob's job is second
        assert queue_positions(reg)[b_job["id"]] == 2
    scheduler = Scheduler(lab, poll_seconds=0.05)
    assert scheduler.acquire()
    try:
        def third_a_started():
            scheduler.tick()
            with lab.registry() as reg:
                return reg.job(a_jobs[2]["id"])["started_at"]

        wait_for(third_a_started, 120, interval=0.05, what="A's third job to start")
        with lab.registry() as reg:
            b_started = reg.job(b_job["id"])["started_at"]
            a_started = [reg.job(j["id"])["started_at"] for j in a_jobs[:3]]
        assert b_started is not None and a_started[0] < b_started < a_started[1]
    finally:
        for j in a_jobs + [b_job]:
            jobs.cancel(lab, j["id"])
        scheduler.tick()
        scheduler.release()


def test_paths_outside_the_roots_escaping_symlinks_and_dot_dot_are_refused(lab_dir, tmp_path,
                                                                         tiny_model_dir):
    from app import auth, jobs
    from app.lab import Lab
    from app.paths import import_problem
    from plugins import ConfigError

    data = tmp_path / "shared-data"
    data.mkdir()
    (data / "text.txt").write_text("some text to score " * 50)
    lab_dir.mkdir(parents=True, exist_ok=True)
    (lab_dir / "lab.toml").write_text(f"allowed_roots = [{str(data)!r}]\n")
    lab = Lab(lab_dir)
    auth.add_user(lab, "alice", "long enough")
    (lab_dir / "escape").symlink_to("/etc")

    def refused(**fields):
        with pytest.raises(ConfigError) as e:
            jobs.submit(lab, "evaluate", {"checkpoint": "org/model", **fields})
        return str(e.value)

    msg = refused(text_file="/etc/hostname")
    assert "field 'text_file': '/etc/hostname' is outside the lab's allowed roots" in msg
    assert str(data) in msg and "allowed_roots" in msg
    msg = refused(text_file=str(lab_dir / "escape" / "hostname"))
    assert "(which is /etc/hostname) is outside the lab's allowed roots" in msg
    msg = refused(text_file="../../etc/passwd")
    assert "field 'text_file': '../../etc/passwd' climbs out with '..'" in msg
    msg = refused(text_file=str(data / ".." / "shared-data" / "text.txt"))  # inside, but '..'
    assert "climbs out with '..'" in msg
    assert "outside the lab's allowed roots" in refused(suite="/etc/suite.yaml")
    # a model folder outside the roots, given directly or inside a pasted mergekit YAML
    with pytest.raises(ConfigError, match="field 'checkpoint': .* is outside"):
        jobs.submit(lab, "evaluate", {"checkpoint": str(tiny_model_dir)})
    with pytest.raises(ConfigError, match=r"field 'mergekit_yaml \(models\[0\]\.model\)': .* is outside"):
        jobs.submit(lab, "merge", {"mergekit_yaml": f"merge_method: linear\nmodels:\n"
                                                    f"  - model: {tiny_model_dir}\n"})
    assert "is outside" in import_problem(lab, str(tiny_model_dir))
    # configs cannot carry environment variables or command lines: unknown fields are errors
    assert "field 'env': unknown field" in refused(env={"LD_PRELOAD": "x"})
    # inside the roots, and Hub ids, are fine
    job = jobs.submit(lab, "evaluate", {"checkpoint": "org/model",
                                        "text_file": str(data / "text.txt")})
    assert job["status"] == "queued"
    assert import_problem(lab, "org/model") is None


def test_retention_removes_old_intermediates_but_never_parents_or_published(lab_dir, lab):
    from app.retention import apply_retention

    def add(name, created_at, parents=(), intermediate=True, **fields):
        folder = lab.checkpoints_dir / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 100)
        with lab.registry() as reg:
            row = reg.add_checkpoint(name=name, relation="finetune", path=str(folder),
                                     parents=[{"id": p} for p in parents],
                                     metadata={"intermediate": intermediate, "step": 10},
                                     **fields)
            reg.db["checkpoints"].update(row["id"], {"created_at": created_at})
        return row["id"], folder

    old = "2020-01-01T00:00:00.000000Z"
    gone, gone_dir = add("run-step10", old)
    parent, parent_dir = add("run-step20", old)
    add("built-on-it", old, parents=[parent], intermediate=False)
    published, published_dir = add("run-step30", old, hub_repo="org/run")
    fresh, fresh_dir = add("run-step40", "2999-01-01T00:00:00.000000Z")
    with lab.registry() as reg:
        final = reg.add_checkpoint(name="run", relation="finetune")  # not intermediate
        reg.db["checkpoints"].update(final["id"], {"created_at": old})

    planned = apply_retention(lab, days=30, dry_run=True)
    assert [r["name"] for r in planned] == ["run-step10"] and gone_dir.exists()
    removed = run_cli(lab_dir, "retention", "--days", "30", check=True)
    assert [r["id"] for r in json.loads(removed.stdout)["checkpoints"]] == [gone]
    assert not gone_dir.exists()
    assert parent_dir.exists() and published_dir.exists() and fresh_dir.exists()
    with lab.registry() as reg:
        row = reg.checkpoint(gone)
        assert row["deleted_at"] and row["path"] is None  # the row stays for the lineage
    assert apply_retention(lab, days=30) == []  # idempotent


def test_gpu_memory_and_utilisation_come_from_nvidia_smi(tmp_path, monkeypatch):
    from app.ui import gpu_summary, jobs_view

    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    jobs_view._GPU_CACHE.clear()
    assert gpu_summary().startswith("GPUs: none found")
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\necho x >> {tmp_path}/calls\n"
                    "echo '0, NVIDIA H100, 1200, 81559, 37'\n"
                    "echo '1, NVIDIA H100, 80000, 81559, [N/A]'\n")
    fake.chmod(0o755)
    jobs_view._GPU_CACHE.clear()
    expected = ("GPUs: **0** NVIDIA H100: 1200/81559 MiB, 37% busy · "
                "**1** NVIDIA H100: 80000/81559 MiB, ?% busy")
    assert gpu_summary() == expected
    # every open page shows the line every 5 s: one nvidia-smi per interval serves them all
    assert [gpu_summary() for _ in range(20)] == [expected] * 20
    assert (tmp_path / "calls").read_text() == "x\n"


def test_hub_org_names_bare_repos(lab_dir, monkeypatch):
    from app.lab import Lab, hub_repo

    monkeypatch.setenv("WEIGHTSMITH_HUB_ORG", "my-lab")
    settings = Lab(lab_dir).settings
    assert hub_repo(settings, "run-7") == "my-lab/run-7"
    assert hub_repo(settings, "other/run-7") == "other/run-7"
