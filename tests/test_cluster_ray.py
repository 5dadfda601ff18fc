"""The job battery through a real Ray cluster (issue 22): a one-node head on loopback
(tests/ray_cluster.py), the lab's `executor = "ray"`, the scheduler as the server runs it.
The head's processes cannot open any registry.db (tests/remote_node), as a node that mounts
the lab folder over NFS must not."""

import os
import signal

import pytest

from tests.conftest import wait_for
from tests.ray_cluster import ray_address  # noqa: F401 - the session's head
from tests.test_jobs import gone
from tests.test_remote_worker import guarded_lab, run_to_end, start_sleeper, stop_running


@pytest.fixture
def ray_lab(lab_dir, monkeypatch, ray_address):  # noqa: F811
    lab = guarded_lab(lab_dir, monkeypatch, "ray", ray_address=ray_address)
    yield lab
    stop_running(lab)


def _start_sleeper(lab, tmp_path, seconds=60):
    return start_sleeper(lab, tmp_path, seconds, timeout=120)  # Ray's start: seconds more


def test_a_job_on_ray_registers_its_checkpoint_with_lineage(ray_lab, tiny_model_dir):
    from app import jobs

    job = jobs.submit(ray_lab, "test_copy", {"source": str(tiny_model_dir), "name": "c"})
    job = run_to_end(ray_lab, job["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["executor"] == "ray" and job["engine_id"] == job["id"]
    with ray_lab.registry() as reg:
        (ck_id,) = reg.job_checkpoints(job["id"])
        (parent,) = reg.parents(ck_id)
        metrics = reg.metrics(job["id"])
    assert parent["relation"] == "finetune" and reg is not None
    assert metrics[0]["name"] == "copied_files" and metrics[0]["value"] > 0
    log = (ray_lab.job_dir(job["id"]) / "log.txt").read_text()
    assert "on node" in log and "succeeded" in log
    from app.executors import executor_for  # Ray's own log: before the worker's log.txt

    assert "registry.db cannot be opened here" in executor_for(ray_lab.settings).logs(job["id"])


def test_a_failing_job_on_ray_records_its_own_error(ray_lab):
    from app import jobs

    job = jobs.submit(ray_lab, "test_crash", {"message": "ray boom"})
    job = run_to_end(ray_lab, job["id"])
    assert job["status"] == "failed" and "RuntimeError: ray boom" in job["error"]


def test_stop_on_ray_ends_the_whole_process_tree(ray_lab, tmp_path):
    from app import jobs

    job_id, scheduler, pids = _start_sleeper(ray_lab, tmp_path)
    try:
        wait_for(lambda: (scheduler.tick(),
                          ray_lab.registry().job(job_id)["progress"] > 0)[1], 60,
                 what="progress through the journal")
        assert jobs.cancel(ray_lab, job_id)["status"] == "cancelled"
        wait_for(lambda: all(gone(p) for p in pids), 30, what="the job's processes to end")
    finally:
        scheduler.release()


def test_a_restarted_server_reattaches_to_a_job_on_ray(ray_lab, tmp_path):
    job_id, first, pids = _start_sleeper(ray_lab, tmp_path, seconds=4)
    first.release()
    job = run_to_end(ray_lab, job_id)
    assert job["status"] == "succeeded" and job["progress"] == 1.0


def test_a_killed_worker_on_ray_fails_with_rays_word(ray_lab, tmp_path):
    job_id, scheduler, pids = _start_sleeper(ray_lab, tmp_path)
    try:
        os.kill(pids[0], signal.SIGKILL)
        job = run_to_end(ray_lab, job_id, scheduler=scheduler)
    finally:
        scheduler.release()
    assert job["status"] == "failed" and "ray reports the job failed" in job["error"]


def test_two_users_share_ray_in_fair_order(ray_lab):
    from app import jobs
    from app.lab import Lab

    (ray_lab.root / "lab.toml").write_text("cluster_max_jobs = 1\n")
    lab = Lab(ray_lab.root)
    ann = [jobs.submit(lab, "test_crash", {"message": f"a{i}"}, user="ann") for i in range(2)]
    bob = jobs.submit(lab, "test_crash", {"message": "b"}, user="bob")
    for job in ann + [bob]:
        run_to_end(lab, job["id"])
    with lab.registry() as reg:
        started = sorted(reg.jobs(limit=10), key=lambda j: j["started_at"])
    assert [j["user"] for j in started] == ["ann", "bob", "ann"]


def test_a_two_process_job_on_ray_trains_once(ray_lab, tiny_model_dir, tmp_path):
    """cpu_processes: 2 asks Ray for 2 CPUs (the head has 2), and the launching worker runs
    the ranks on that node; rank 0 alone registers, through the journal."""
    from app import jobs
    from tests.test_train import arithmetic_rows, write_jsonl

    data = write_jsonl(tmp_path / "rows.jsonl", arithmetic_rows(8))
    job = jobs.submit(ray_lab, "train", {
        "checkpoint": str(tiny_model_dir), "data": str(data), "method": "full",
        "max_steps": 2, "batch_size": 4, "save_steps": 0, "cpu_processes": 2})
    job = run_to_end(ray_lab, job["id"], timeout=300)
    log = (ray_lab.job_dir(job["id"]) / "log.txt").read_text()
    assert job["status"] == "succeeded", job["error"] + log[-3000:]
    assert "launching 2 processes (ddp)" in log and log.count("running as rank") == 1
    with ray_lab.registry() as reg:
        (ck_id,) = reg.job_checkpoints(job["id"])
        assert reg.parents(ck_id)[0]["relation"] == "finetune"
