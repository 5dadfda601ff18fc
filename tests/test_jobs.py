import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest

from app import jobs
from app.checkpoints import import_checkpoint
from app.scheduler import Scheduler
from plugins import ConfigError
from tests.conftest import REPO, cli_env, wait_for

from registry.store import FINISHED as FINAL


def run_to_end(lab, job_id, timeout=120):
    scheduler = Scheduler(lab, poll_seconds=0.1)
    assert scheduler.acquire()
    try:
        def done():
            scheduler.tick()
            with lab.registry() as reg:
                status = reg.job(job_id)["status"]
            return status if status in FINAL and not scheduler.children else None
        return wait_for(done, timeout, what=f"job {job_id} to finish")
    finally:
        scheduler.release()


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_evaluate_job_succeeds_and_records_scores(lab, tiny_model_dir):
    with lab.registry() as reg:
        ck = import_checkpoint(lab, reg, str(tiny_model_dir), name="tiny")
    job = jobs.submit(lab, "evaluate", {"checkpoint": "tiny", "window": 64, "max_tokens": 400})
    assert job["status"] == "queued"
    assert (lab.job_dir(job["id"]) / "config.yaml").exists()
    assert run_to_end(lab, job["id"]) == "succeeded"
    with lab.registry() as reg:
        row = reg.job(job["id"])
        scores = {e["metric"]: e["value"] for e in reg.evaluations(ck["id"])}
        metrics = {m["name"] for m in reg.metrics(job["id"])}
    assert row["progress"] == 1.0 and row["device"] == "cpu" and row["pid"]
    assert json.loads(row["versions"])["torch"]
    assert set(scores) == {"perplexity", "nll_per_token", "bits_per_byte"}
    assert 1 < scores["perplexity"] < 1000  # an untrained 400-token vocab model: about 400
    assert "ppl:heldout.txt/perplexity" in metrics
    assert "perplexity" in (lab.job_dir(job["id"]) / "log.txt").read_text()


def test_job_output_is_published_with_lineage(lab, tiny_model_dir):
    job = jobs.submit(lab, "test_copy", {"source": str(tiny_model_dir), "name": "the-copy"})
    assert run_to_end(lab, job["id"]) == "succeeded"
    with lab.registry() as reg:
        (ck_id,) = reg.job_checkpoints(job["id"])
        row = reg.checkpoint(ck_id)
        parents = reg.parents(ck_id)
    assert row["name"] == "the-copy" and row["relation"] == "finetune"
    assert row["path"] == str(lab.checkpoints_dir / ck_id)
    assert json.loads(row["config"])["name"] == "the-copy"
    assert row["plugin"] == "test_copy" and row["content_hash"].startswith("sha256:")
    assert [(p["parent_name"], p["weight"]) for p in parents] == [("tiny-llama", 1.0)]
    assert not list(lab.checkpoints_dir.glob(".tmp-*"))


def test_crashing_job_fails_with_log_tail_and_no_partial_checkpoint(lab):
    job = jobs.submit(lab, "test_crash", {"message": "kaboom"})
    assert run_to_end(lab, job["id"]) == "failed"
    with lab.registry() as reg:
        row = reg.job(job["id"])
        assert reg.job_checkpoints(job["id"]) == []
    assert "RuntimeError: kaboom" in row["error"]
    assert "MARKER-LAST-LINE" in row["error"]  # the last lines of the log
    assert not list(lab.checkpoints_dir.glob(".tmp-*"))


def test_bad_config_is_rejected_before_queueing(lab, tiny_model_dir):
    with pytest.raises(ConfigError, match="field 'window': got 0"):
        jobs.submit(lab, "evaluate", {"checkpoint": str(tiny_model_dir), "window": 0})
    with pytest.raises(ConfigError, match="field 'checkpoint': unknown checkpoint 'nope'"):
        jobs.submit(lab, "evaluate", {"checkpoint": "nope"})
    with pytest.raises(ConfigError, match="no config.json"):
        jobs.submit(lab, "evaluate", {"checkpoint": str(tiny_model_dir.parent)})
    with lab.registry() as reg:
        assert reg.jobs() == []


def test_corrupt_weights_fail_the_job_naming_the_file(lab, tiny_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    job = jobs.submit(lab, "evaluate", {"checkpoint": str(broken)})
    assert run_to_end(lab, job["id"]) == "failed"
    with lab.registry() as reg:
        assert "model.safetensors: corrupt" in reg.job(job["id"])["error"]


def test_remote_code_needs_the_lab_setting(lab, tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from app.context import JobContext
    from app.lab import Lab
    from registry import CheckpointError

    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling.Model"}
    (custom / "config.json").write_text(json.dumps(config))
    with lab.registry() as reg:
        job = reg.add_job(plugin="evaluate", config={})
        with pytest.raises(CheckpointError, match="trust_remote_code.*lab.toml"):
            JobContext(lab, reg, job).open(str(custom))
    monkeypatch.setenv("WEIGHTSMITH_ALLOW_TRUST_REMOTE_CODE", "true")
    trusting = Lab(lab.root)
    with trusting.registry() as reg:
        assert JobContext(trusting, reg, job).open(str(custom)).trust_remote_code is True


def test_cancel_kills_the_whole_process_tree(lab, tmp_path):
    pid_file = tmp_path / "pids"
    job = jobs.submit(lab, "test_sleep", {"seconds": 120, "pid_file": str(pid_file)})
    scheduler = Scheduler(lab, poll_seconds=0.1)
    assert scheduler.acquire()
    try:
        scheduler.tick()
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60, what="worker start")
        worker, grandchild = map(int, pid_file.read_text().split())
        assert list(lab.checkpoints_dir.glob(".tmp-*"))  # a partial checkpoint exists
        start = time.monotonic()
        result = jobs.cancel(lab, job["id"])
        assert result["status"] == "cancelled"
        assert time.monotonic() - start < 10
        scheduler.tick()  # reap
        assert gone(worker) and gone(grandchild)
        assert not list(lab.checkpoints_dir.glob(".tmp-*"))
        with lab.registry() as reg:
            assert reg.job(job["id"])["status"] == "cancelled"
            assert reg.job_checkpoints(job["id"]) == []
    finally:
        scheduler.release()


def test_cancel_a_queued_job(lab, tmp_path):
    job = jobs.submit(lab, "test_sleep", {"seconds": 1, "pid_file": str(tmp_path / "p")})
    assert jobs.cancel(lab, job["id"])["status"] == "cancelled"
    scheduler = Scheduler(lab)
    assert scheduler.acquire()
    scheduler.tick()
    assert not scheduler.children  # never started
    scheduler.release()


def start_server(lab_dir):
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--no-ui", "--no-demo"],
        env=cli_env(lab_dir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)


def job_row(lab, job_id):
    with lab.registry() as reg:
        return reg.job(job_id)


def start_sleeper(lab, pid_file, seconds):
    """A server for the lab, with a test_sleep job running under it: (server, job, worker)."""
    server = start_server(lab.root)
    job = jobs.submit(lab, "test_sleep", {"seconds": seconds, "pid_file": str(pid_file)})
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60, what="worker start")
    return server, job, int(pid_file.read_text().split()[0])


def test_kill_9_server_and_three_workers_marks_jobs_interrupted(lab, tmp_path):
    """A machine crash during three running jobs: the server and each job's whole process
    group die at once (a server killed alone leaves its jobs running; see the next test).
    After a restart the jobs are interrupted, the database is intact, and none of the three
    half-written checkpoints is registered or left on disk."""
    (lab.root / "lab.toml").write_text("cpu_slots = 3\n")
    server = start_server(lab.root)
    try:
        started = [jobs.submit(lab, "test_sleep", {"seconds": 120,
                                                   "pid_file": str(tmp_path / f"pids{i}")})
                   for i in range(3)]
        pid_files = [tmp_path / f"pids{i}" for i in range(3)]
        wait_for(lambda: all(f.exists() and f.read_text() for f in pid_files), 90,
                 what="three workers")
        workers = [int(f.read_text().split()[0]) for f in pid_files]
        assert {job_row(lab, j["id"])["status"] for j in started} == {"running"}
        assert len(list(lab.checkpoints_dir.glob(".tmp-*"))) == 3  # each one half-written
        os.kill(server.pid, signal.SIGKILL)
        for worker in workers:
            os.killpg(worker, signal.SIGKILL)
        server.wait(10)
        wait_for(lambda: all(gone(w) for w in workers), 10, what="workers to die")
        conn = sqlite3.connect(lab.db_path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        assert {job_row(lab, j["id"])["status"] for j in started} == {"running"}  # unnoticed
        server = start_server(lab.root)
        rows = wait_for(lambda: (rs := [job_row(lab, j["id"]) for j in started]) and all(
            r["status"] == "interrupted" for r in rs) and rs, 60, what="interrupted status")
        assert all("restart" in r["error"] for r in rows)
        assert not list(lab.checkpoints_dir.glob(".tmp-*"))
        conn = sqlite3.connect(lab.db_path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        with lab.registry() as reg:
            assert all(reg.job_checkpoints(j["id"]) == [] for j in started)
            assert list(reg.db.query("SELECT id FROM checkpoints")) == []
    finally:
        server.kill()
        server.wait(10)


def test_job_survives_a_server_restart(lab, tmp_path):
    server, job, _ = start_sleeper(lab, tmp_path / "pids", 4)
    try:
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        server = start_server(lab.root)  # re-attaches; the job keeps going and finishes
        row = wait_for(lambda: (r := job_row(lab, job["id"]))["status"] in FINAL and r, 60,
                       what="job end")
        assert row["status"] == "succeeded", row["error"]
    finally:
        server.kill()
        server.wait(10)


def test_second_server_for_the_same_lab_is_refused(lab):
    first = start_server(lab.root)
    try:
        wait_for(lambda: (lab.root / "scheduler.lock").exists(), 30, what="first server")
        time.sleep(1)
        second = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--no-ui",
                                 "--no-demo"], env=cli_env(lab.root), cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert "already running" in second.stderr
    finally:
        first.kill()
        first.wait(10)


def test_gpu_jobs_get_their_own_device_and_never_oversubscribe(lab, tmp_path, monkeypatch):
    from app.lab import Lab

    monkeypatch.setenv("WEIGHTSMITH_GPUS", "0,1")  # two (pretend) GPUs, one job each
    monkeypatch.setenv("WEIGHTSMITH_JOBS_PER_GPU", "1")
    lab = Lab(lab.root)
    gpu_jobs = [jobs.submit(lab, "test_gpu_sleep", {"seconds": 60,
                                                    "pid_file": str(tmp_path / f"g{i}")})
                for i in range(3)]
    cpu_job = jobs.submit(lab, "test_sleep", {"seconds": 60, "pid_file": str(tmp_path / "c")})
    scheduler = Scheduler(lab, poll_seconds=0.1)
    assert scheduler.acquire()
    try:
        scheduler.tick()
        with lab.registry() as reg:
            rows = {j["id"]: reg.job(j["id"]) for j in gpu_jobs + [cpu_job]}
        assert [rows[j["id"]]["status"] for j in gpu_jobs] == ["running", "running", "queued"]
        assert [rows[j["id"]]["device"] for j in gpu_jobs[:2]] == ["cuda:0", "cuda:1"]
        assert rows[cpu_job["id"]]["device"] == "cpu"
        for name, expected in (("g0", "0"), ("g1", "1"), ("c", "")):  # CPU jobs see no GPU
            wait_for(lambda: (tmp_path / name).exists(), 60, what=f"worker {name} start")
            assert (tmp_path / f"{name}.env").read_text() == expected
        jobs.cancel(lab, gpu_jobs[0]["id"])
        scheduler.tick()  # the freed GPU goes to the waiting job
        with lab.registry() as reg:
            assert reg.job(gpu_jobs[2]["id"])["device"] == "cuda:0"
    finally:
        for j in gpu_jobs + [cpu_job]:
            jobs.cancel(lab, j["id"])
        scheduler.tick()
        scheduler.release()


def test_hub_import_failure_is_clear_and_leaves_nothing(lab, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from registry import CheckpointError

    with lab.registry() as reg:
        with pytest.raises(CheckpointError, match="could not download some-org/some-model"):
            import_checkpoint(lab, reg, "some-org/some-model")
        assert reg.list_checkpoints() == []
    assert list(lab.checkpoints_dir.iterdir()) == []


# ------------------------------------------------------- GPUs stored at submit, no re-validation
def test_submit_stores_the_gpu_count_and_a_tick_never_revalidates(lab, tmp_path, monkeypatch):
    import plugins

    job = jobs.submit(lab, "test_sleep", {"seconds": 1, "pid_file": str(tmp_path / "p")})
    assert job["gpus"] == 1  # written at submit, from the validated config

    def no_validation(*a, **k):
        raise AssertionError("the scheduler validated a queued config on a tick")

    monkeypatch.setattr(plugins, "validate_config", no_validation)
    scheduler = Scheduler(lab)
    started = []
    scheduler.start = lambda job, device: started.append(job["id"]) or True
    scheduler.tick()
    scheduler.tick()
    assert started == [job["id"], job["id"]]  # stubbed start: the job stays queued


def test_a_row_without_gpus_is_validated_once_then_cached(lab, tmp_path, monkeypatch):
    import plugins

    job = jobs.submit(lab, "test_sleep", {"seconds": 1, "pid_file": str(tmp_path / "p")})
    with lab.registry() as reg:  # a row queued before the gpus column existed
        reg.update_job(job["id"], gpus=None)
    calls = []
    real = plugins.validate_config
    monkeypatch.setattr(plugins, "validate_config",
                        lambda *a, **k: calls.append(a[0].name) or real(*a, **k))
    scheduler = Scheduler(lab)
    scheduler.start = lambda job, device: False  # someone else claimed it: still queued
    for _ in range(3):
        scheduler.tick()
    assert calls == ["test_sleep"]
    jobs.cancel(lab, job["id"])
    scheduler.tick()
    assert scheduler._gpus == {}  # the cache holds queued jobs only


def test_a_legacy_row_that_no_longer_validates_fails_with_the_reason(lab, tmp_path):
    job = jobs.submit(lab, "test_sleep", {"seconds": 1, "pid_file": str(tmp_path / "p")})
    with lab.registry() as reg:
        reg.update_job(job["id"], gpus=None, config=json.dumps({"seconds": "soon"}))
    scheduler = Scheduler(lab)
    scheduler.start = lambda job, device: pytest.fail("started an invalid job")
    scheduler.tick()
    row = job_row(lab, job["id"])
    assert row["status"] == "failed" and "seconds" in row["error"]


def test_jobs_and_the_scheduler_do_not_import_each_other():
    import ast

    for module, other in (("jobs", "app.scheduler"), ("scheduler", "app.jobs")):
        tree = ast.parse((REPO / "app" / f"{module}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                     for a in n.names}
        assert other not in imported, f"app/{module}.py imports {other}"
