"""The job battery through a real Slurm (issue 22): a one-node cluster on loopback
(tests/slurm_cluster.py), the lab's `executor = "slurm"`, the scheduler as the server runs it.
The jobs' processes cannot open any registry.db (tests/remote_node), as a node that mounts
the lab folder over NFS must not; and a lab in the cluster's `hidden` folder is one the node
does not see at all."""

import os
import signal
import uuid

import pytest

from tests.conftest import wait_for
from tests.fake_engine import GUARD
from tests.slurm_cluster import slurm_cluster  # noqa: F401 - the session's cluster
from tests.test_jobs import gone
from tests.test_remote_worker import run_to_end, scheduler_for, start_sleeper


@pytest.fixture
def slurm_lab(lab_dir, monkeypatch, slurm_cluster):  # noqa: F811
    import plugins
    from app.lab import Lab

    monkeypatch.setenv("WEIGHTSMITH_EXECUTOR", "slurm")
    monkeypatch.setenv("WEIGHTSMITH_CLUSTER_GPUS", "false")
    # the jobs' processes play a node that cannot open registry.db (tests/remote_node)
    monkeypatch.setenv("WEIGHTSMITH_TEST_REMOTE_LAB", str(lab_dir))
    monkeypatch.setenv("WEIGHTSMITH_TEST_REMOTE_SAY", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        str(GUARD), os.environ.get("PYTHONPATH")])))
    plugins.discover(refresh=True)
    lab = Lab(lab_dir)
    yield lab
    _stop_running(lab)


def _stop_running(lab):
    from app.executors import executor_for

    slurm = executor_for(lab.settings, "slurm")
    with lab.registry() as reg:
        for job in reg.jobs(status="running", limit=100):
            slurm.stop(job["engine_id"] or job["id"])


def _start_sleeper(lab, tmp_path, seconds=60):
    return start_sleeper(lab, tmp_path, seconds, timeout=120)


def _executor(lab):
    from app.executors import executor_for

    return executor_for(lab.settings)


def test_a_job_on_slurm_registers_its_checkpoint_with_lineage(slurm_lab, tiny_model_dir):
    from app import jobs

    job = jobs.submit(slurm_lab, "test_copy", {"source": str(tiny_model_dir), "name": "c"})
    job = run_to_end(slurm_lab, job["id"])
    assert job["status"] == "succeeded", job["error"]
    name, _, number = job["engine_id"].partition("@")
    assert job["executor"] == "slurm" and name == job["id"] and number.isdigit()
    with slurm_lab.registry() as reg:
        (ck_id,) = reg.job_checkpoints(job["id"])
        (parent,) = reg.parents(ck_id)
        metrics = reg.metrics(job["id"])
    assert parent["relation"] == "finetune"
    assert metrics[0]["name"] == "copied_files" and metrics[0]["value"] > 0
    log = (slurm_lab.job_dir(job["id"]) / "log.txt").read_text()
    assert "on node" in log and "succeeded" in log
    # Slurm's own output file, in the job's folder: what the worker said before log.txt
    slurm_log = _executor(slurm_lab).logs(job["engine_id"])
    assert "registry.db cannot be opened here" in slurm_log
    assert (slurm_lab.job_dir(job["id"]) / f"slurm-{number}.out").is_file()


def test_a_failing_job_on_slurm_records_its_own_error(slurm_lab):
    from app import jobs

    job = jobs.submit(slurm_lab, "test_crash", {"message": "slurm boom"})
    job = run_to_end(slurm_lab, job["id"])
    assert job["status"] == "failed" and "RuntimeError: slurm boom" in job["error"]


def test_stop_on_slurm_ends_the_whole_process_tree(slurm_lab, tmp_path):
    from app import jobs

    job_id, scheduler, pids = _start_sleeper(slurm_lab, tmp_path)
    try:
        wait_for(lambda: (scheduler.tick(),
                          slurm_lab.registry().job(job_id)["progress"] > 0)[1], 60,
                 what="progress through the journal")
        assert jobs.cancel(slurm_lab, job_id)["status"] == "cancelled"
        wait_for(lambda: all(gone(p) for p in pids), 30, what="the job's processes to end")
        engine_id = slurm_lab.registry().job(job_id)["engine_id"]
        from app.executors import FINAL

        assert _executor(slurm_lab).state(engine_id).state in FINAL
    finally:
        scheduler.release()


def test_a_restarted_server_reattaches_to_a_job_on_slurm(slurm_lab, tmp_path):
    job_id, first, pids = _start_sleeper(slurm_lab, tmp_path, seconds=4)
    first.release()  # the server stops; the job goes on on its node
    job = run_to_end(slurm_lab, job_id)  # a new scheduler: the same job, followed to its end
    assert job["status"] == "succeeded" and job["progress"] == 1.0


def test_a_killed_worker_on_slurm_fails_with_slurm_s_word(slurm_lab, tmp_path):
    job_id, scheduler, pids = _start_sleeper(slurm_lab, tmp_path)
    try:
        os.kill(pids[0], signal.SIGKILL)  # out of memory, say: no chance to record its end
        job = run_to_end(slurm_lab, job_id, scheduler=scheduler)
    finally:
        scheduler.release()
        # the worker's child, orphaned by the SIGKILL: proctrack/linuxproc lost it
        if not gone(pids[1]):
            os.kill(pids[1], signal.SIGKILL)
    assert job["status"] == "failed"
    assert "slurm reports the job failed: FAILED" in job["error"]
    assert "killed by signal 9 (SIGKILL)" in job["error"]


def test_two_users_share_slurm_in_fair_order(slurm_lab):
    from app import jobs
    from app.lab import Lab

    (slurm_lab.root / "lab.toml").write_text("cluster_max_jobs = 1\n")
    lab = Lab(slurm_lab.root)
    ann = [jobs.submit(lab, "test_crash", {"message": f"a{i}"}, user="ann") for i in range(2)]
    bob = jobs.submit(lab, "test_crash", {"message": "b"}, user="bob")
    for job in ann + [bob]:
        run_to_end(lab, job["id"])
    with lab.registry() as reg:
        started = sorted(reg.jobs(limit=10), key=lambda j: j["started_at"])
    assert [j["user"] for j in started] == ["ann", "bob", "ann"]


def test_a_node_that_cannot_see_the_lab_fails_with_that_message(
        slurm_lab, slurm_cluster, monkeypatch):  # noqa: F811
    """A lab the server sees and the node does not (the node's mount namespace hides the
    folder): Slurm cannot open the job's output file there and fails the job before the
    worker runs; the job says why, without a traceback."""
    from app import jobs
    from app.lab import Lab

    if slurm_cluster.hidden is None:
        pytest.skip("no mount namespace here: the node sees every folder")
    root = slurm_cluster.hidden / f"lab-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("WEIGHTSMITH_LAB", str(root))
    lab = Lab(root)
    job = jobs.submit(lab, "test_crash", {"message": "never runs"})
    job = run_to_end(lab, job["id"])
    assert job["status"] == "failed"
    assert "slurm reports the job failed: FAILED (JobLaunchFailure)" in job["error"]
    assert "may not see the lab folder" in job["error"]
    assert "mounts at the same path" in job["error"]
    assert "Traceback" not in job["error"]


def test_an_unreachable_controller_keeps_the_queue_and_says_why(
        slurm_lab, slurm_cluster, tmp_path, monkeypatch):  # noqa: F811
    """slurmctld down (here: slurm.conf names a port nobody listens on) fails nobody's job:
    it waits in the lab's queue saying why, and goes to Slurm once Slurm answers."""
    from app import jobs
    from tests.ray_cluster import free_port
    from tests.slurm_cluster import conf_with_port

    live = os.environ["SLURM_CONF"]
    monkeypatch.setenv("SLURM_CONF", str(conf_with_port(
        slurm_cluster.conf, tmp_path, free_port(), "MessageTimeout=1")))
    job = jobs.submit(slurm_lab, "test_crash", {"message": "ran later"})
    scheduler = scheduler_for(slurm_lab)
    try:
        scheduler.tick()
        with slurm_lab.registry() as reg:
            waiting = reg.job(job["id"])
        assert waiting["status"] == "queued" and waiting["executor"] is None
        assert "waiting: no Slurm controller answers" in waiting["progress_message"]
        monkeypatch.setenv("SLURM_CONF", live)
        job = run_to_end(slurm_lab, job["id"], scheduler=scheduler)
    finally:
        scheduler.release()
    assert job["status"] == "failed" and "RuntimeError: ran later" in job["error"]


def test_a_submit_whose_answer_was_lost_is_found_by_its_name(slurm_lab, monkeypatch):
    """sbatch took the job but its answer never came (a timeout): the lab asks Slurm for the
    name it handed over, finds the job, and follows it to its end under that name."""
    from app import jobs
    from app.executors import EngineUnreachable
    from app.executors.slurm import SlurmExecutor

    submit = SlurmExecutor.submit

    def lost(self, sub):
        submit(self, sub)
        raise EngineUnreachable("Slurm did not answer within 30 s (tests)")

    monkeypatch.setattr(SlurmExecutor, "submit", lost)
    job = jobs.submit(slurm_lab, "test_crash", {"message": "found by name"})
    job = run_to_end(slurm_lab, job["id"])
    assert job["engine_id"] == job["id"]  # the bare name: the number never reached the lab
    assert job["status"] == "failed" and "RuntimeError: found by name" in job["error"]
