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


def test_a_model_stays_loaded_for_the_next_job_on_the_same_checkpoint(warm, tiny_model_dir,
                                                                       tmp_path):
    """The fork server keeps the model a job loaded (app/warm_models.py): the next job on the
    same files and dtype takes it instead of loading it, and gets the same scores; a job that
    trains the taken model changes only its own copy; the server keeps it without starting
    a thread pool that a fork would break."""
    import shutil

    lab, scheduler = warm
    folder = tmp_path / "kept"
    shutil.copytree(tiny_model_dir, folder)
    with lab.registry() as reg:
        ck = import_checkpoint(lab, reg, str(folder), name="kept")
    server = psutil.Process(scheduler.warm.proc.pid)
    threads = server.num_threads()
    evaluate = {"checkpoint": "kept", "window": 64, "max_tokens": 400, "dtype": "float32",
                "reuse_scores": False}

    def run(plugin, config):
        job = jobs.submit(lab, plugin, config)
        row = finish(lab, job["id"])
        assert row["status"] == "succeeded", row["error"]
        log = (lab.job_dir(job["id"]) / "log.txt").read_text()
        with lab.registry() as reg:
            scores = [e["value"] for e in reg.evaluations(ck["id"])
                      if e["job_id"] == job["id"] and e["metric"] == "perplexity"]
        return "already loaded in the warm worker server" in log, scores

    warm_load, first = run("evaluate", evaluate)
    assert not warm_load and len(first) == 1
    wait_for(lambda: any(k[0] == str(folder) and k[2] == "float32"
                         for k in scheduler.warm.kept), 60, what="the server to keep it")
    assert server.num_threads() == threads  # no OpenMP pool in the server after its load

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)})
                            + "\n" for i in range(8)))
    warm_load, _ = run("train", {"checkpoint": "kept", "data": str(data), "method": "full",
                                 "max_steps": 2, "batch_size": 4, "learning_rate": 0.05,
                                 "save_steps": 0})
    assert warm_load  # trained the server's model, in its own copy-on-write pages
    warm_load, second = run("evaluate", evaluate)
    assert warm_load and second == first  # the same weights as loaded from the files


def test_a_fork_the_scheduler_gave_up_on_is_never_made(warm, tmp_path):
    """The fork server may be busy (loading a model to keep); a request it reads after its
    deadline, when the scheduler has started the job cold, is answered stale and not forked
    (a fork then would run the job twice); while it loads, the scheduler does not ask."""
    lab, scheduler = warm
    server = scheduler.warm
    log = tmp_path / "log.txt"
    request = {"job": "job-5ca1e000", "lab": str(lab.root), "cwd": str(tmp_path),
               "log": str(log), "env": dict(os.environ), "deadline": time.time() - 1}
    with server._lock:
        server.proc.stdin.write((json.dumps(request) + "\n").encode())
        server.proc.stdin.flush()
        reply = server._replies.get(timeout=10)
    assert reply == {"job": "job-5ca1e000", "stale": True}
    time.sleep(0.3)
    assert not log.exists() and server.proc.poll() is None
    server.keeping = True
    try:
        assert server.fork("job-5ca1e001", str(lab.root), str(tmp_path), str(log),
                           dict(os.environ)) is None
    finally:
        server.keeping = False
    assert not log.exists()


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


KEEP_PROBE = """
import json, os, sys
from app.forkserver import _preload
_preload()
from app import warm_models
threads = lambda: len(os.listdir("/proc/self/task"))
a, b, mib = sys.argv[1], sys.argv[2], 1 << 20
entry = lambda path: {"path": path, "hash": "sha256:" + "ab" * 32, "dtype": "float32"}
out = {"before": threads()}
warm_models.keep(entry(a), 60 * mib, log=lambda m: None)
out["after"] = threads()  # no OpenMP pool, loader pool or tqdm monitor left to break a fork
out["one"] = [k[0] for k in warm_models.kept()]
warm_models.keep(entry(b), 60 * mib, log=lambda m: None)  # both do not fit: a goes
out["lru"] = [k[0] for k in warm_models.kept()]
warm_models.keep(entry(a), 10 * mib, log=lambda m: None)  # a smaller budget: b goes, and a
out["small"] = [k[0] for k in warm_models.kept()]        # (42 MiB) is not even loaded
out["estimate"] = warm_models.estimate(a, "float32"), warm_models.estimate(a, "bfloat16")
warm_models.keep(entry(b), 60 * mib, log=lambda m: None)
os.utime(os.path.join(b, "config.json"), ns=(1, 1))  # its files changed: not taken
out["stale"] = warm_models.take(b, "sha256:" + "ab" * 32, "float32") is None
print(json.dumps(out))
"""


def test_the_server_keeps_models_within_its_budget_and_starts_no_thread(tmp_path):
    """warm_models.keep in a process like the fork server, on a bfloat16 model loaded as
    float32 (a conversion large enough for PyTorch to run in parallel if it could)."""
    import shutil
    import subprocess
    import sys

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import REPO

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=4096)
    a, b = tmp_path / "a", tmp_path / "b"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(a)  # 42 MiB as float32
    shutil.copytree(a, b)
    proc = subprocess.run([sys.executable, "-c", KEEP_PROBE, str(a), str(b)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["after"] == out["before"], out
    assert out["one"] == [str(a)] and out["lru"] == [str(b)] and out["small"] == []
    weights = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert out["estimate"] == [4 * weights, 2 * weights]  # from the headers, per dtype
    assert out["stale"]
