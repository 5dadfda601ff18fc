"""Warm workers (app/forkserver.py): jobs forked from a server with torch and transformers
imported keep the cold worker's contract: their own session (Stop kills the whole tree), the
job's log as stdout, the job's environment, the registry records, failure isolation; a
worker killed from outside is a failed job with its code; a changed environment restarts the
server; each job gets fresh random state.

One lab and one warm scheduler serve the whole module: starting the fork server (its imports)
is the cost these tests would otherwise pay per test.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from app import jobs
from app.checkpoints import import_checkpoint
from app.warm import WarmChild
from app.lab import Lab
from app.scheduler import Scheduler
from registry.store import FINISHED
from tests.conftest import TEST_PLUGINS, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """(lab, scheduler): a warm scheduler running in a thread, as the server runs it."""
    import plugins

    root = tmp_path_factory.mktemp("warm") / "lab"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEIGHTSMITH_LAB", str(root))
        mp.setenv("WEIGHTSMITH_PLUGINS", TEST_PLUGINS + ",tests.plugins_for_tests:DRAWER")
        mp.setenv("WEIGHTSMITH_CANCEL_GRACE_SECONDS", "3")
        plugins.discover(refresh=True)
        lab = Lab(root)
        scheduler = Scheduler(lab, poll_seconds=0.1, warm=True)
        assert scheduler.acquire()
        stop = threading.Event()
        thread = threading.Thread(target=scheduler.run_forever, args=(stop,), daemon=True)
        thread.start()
        assert scheduler.warm.proc is None  # started with the first job, not before
        scheduler.warm.usable(scheduler._job_env("cpu"))
        wait_for(lambda: scheduler.warm.ready, 180, interval=0.2, what="the fork server")
        try:
            yield lab, scheduler
        finally:
            stop.set()
            thread.join(10)
            scheduler.release()
        plugins.discover(refresh=True)


def finish(lab, job_id, timeout=120):
    def done():
        with lab.registry() as reg:
            job = reg.job(job_id)
        return job if job["status"] in FINISHED else None
    return wait_for(done, timeout, interval=0.1, what=f"job {job_id}")


def test_a_job_is_forked_warm_and_records_like_a_cold_one(warm, tiny_model_dir):
    lab, scheduler = warm
    with lab.registry() as reg:
        ck = import_checkpoint(lab, reg, str(tiny_model_dir), name="tiny")
    job = jobs.submit(lab, "evaluate", {"checkpoint": "tiny", "window": 64, "max_tokens": 400})
    wait_for(lambda: job["id"] in scheduler.children, 30, what="the job to start")
    assert isinstance(scheduler.children[job["id"]], WarmChild)
    row = finish(lab, job["id"])
    assert row["status"] == "succeeded", row["error"]
    with lab.registry() as reg:
        scores = {e["metric"]: e["value"] for e in reg.evaluations(ck["id"])}
    assert 1 < scores["perplexity"] < 1000 and row["progress"] == 1.0
    log = (lab.job_dir(job["id"]) / "log.txt").read_text()
    assert f"job {job['id']}: plugin evaluate on cpu" in log and "perplexity" in log
    # the worker's own session: its pid leads its process group, not the fork server's
    proc = psutil.Process(row["pid"]) if psutil.pid_exists(row["pid"]) else None
    assert proc is None or proc.status() == psutil.STATUS_ZOMBIE
    wait_for(lambda: job["id"] not in scheduler.children, 10, what="the child to be reaped")

    copy = jobs.submit(lab, "test_copy", {"source": "tiny", "name": "the-copy"})
    assert finish(lab, copy["id"])["status"] == "succeeded"
    with lab.registry() as reg:
        (ck_id,) = reg.job_checkpoints(copy["id"])
        assert [p["parent_name"] for p in reg.parents(ck_id)] == ["tiny"]


def test_a_crash_fails_only_its_job(warm):
    lab, scheduler = warm
    job = jobs.submit(lab, "test_crash", {"message": "kaboom"})
    row = finish(lab, job["id"])
    assert row["status"] == "failed" and "kaboom" in row["error"]
    assert "MARKER-LAST-LINE" in row["error"]
    assert not list(lab.checkpoints_dir.glob(".tmp-*"))
    assert scheduler.warm.proc.poll() is None  # the fork server lives on


def test_cancel_kills_the_forked_tree_and_the_server_lives(warm, tmp_path):
    lab, scheduler = warm
    pid_file = tmp_path / "pids"
    job = jobs.submit(lab, "test_sleep", {"seconds": 60, "pid_file": str(pid_file)})
    wait_for(pid_file.exists, 60, what="the sleeper to start")
    worker, grandchild = map(int, pid_file.read_text().split())
    assert os.getpgid(worker) == worker  # a session leader: Stop kills its whole group
    assert os.getpgid(worker) != os.getpgid(scheduler.warm.proc.pid)
    # CUDA_VISIBLE_DEVICES comes from the job's environment, not the server's
    assert Path(str(pid_file) + ".env").read_text() == ""
    assert jobs.cancel(lab, job["id"])["status"] == "cancelled"

    def dead(pid):
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    wait_for(lambda: dead(worker) and dead(grandchild), 20, what="the tree to end")
    assert scheduler.warm.proc.poll() is None


def test_a_worker_killed_from_outside_is_failed_with_its_code(warm, tmp_path):
    lab, scheduler = warm
    pid_file = tmp_path / "pids"
    job = jobs.submit(lab, "test_sleep", {"seconds": 60, "pid_file": str(pid_file)})
    wait_for(pid_file.exists, 60, what="the sleeper to start")
    worker, grandchild = map(int, pid_file.read_text().split())
    os.kill(worker, signal.SIGKILL)
    row = finish(lab, job["id"], timeout=30)
    os.kill(grandchild, signal.SIGKILL)
    assert row["status"] == "failed"
    assert "worker exited with code -9" in row["error"]


def test_fresh_random_state_per_job(warm, tmp_path):
    """Two forks of one server must not draw the same 'random' numbers (a fork copies the
    server's generators; a fresh process seeds its own)."""
    lab, _ = warm
    draws = []
    for i in range(2):
        out = tmp_path / f"draw{i}.json"
        job = jobs.submit(lab, "test_draw", {"out": str(out)})
        assert finish(lab, job["id"])["status"] == "succeeded"
        draws.append(json.loads(out.read_text()))
    for key in ("random", "numpy", "torch"):
        assert draws[0][key] != draws[1][key], key


def test_a_changed_environment_restarts_the_server(warm, monkeypatch, tmp_path):
    lab, scheduler = warm
    first = scheduler.warm.proc.pid
    monkeypatch.setenv("WEIGHTSMITH_TEST_MARKER", "changed")
    pid_file = tmp_path / "pids"
    job = jobs.submit(lab, "test_sleep", {"seconds": 0, "pid_file": str(pid_file)})
    row = finish(lab, job["id"])
    assert row["status"] == "succeeded", row["error"]  # started cold meanwhile
    wait_for(lambda: scheduler.warm.proc is not None and scheduler.warm.proc.pid != first
             and scheduler.warm.ready, 180, interval=0.2, what="a new fork server")
    monkeypatch.delenv("WEIGHTSMITH_TEST_MARKER")
    time.sleep(0.3)  # the next job restarts it again, with the module's environment
