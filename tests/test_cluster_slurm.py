"""The job battery through a real Slurm (issue 22): a cluster on loopback
(tests/slurm_cluster.py), the lab's `executor = "slurm"`, the scheduler as the server runs it.
The jobs' processes cannot open any registry.db (tests/remote_node), as a node that mounts
the lab folder over NFS must not; and a lab in the cluster's `hidden` folder is one the node
does not see at all. The last tests run a train job spanning the cluster's two nodes (two
slurmd on this machine: what it proves and what it cannot is said at two_node_lab)."""

import os
import re
import signal
import uuid

import pytest

from tests.conftest import wait_for
from tests.slurm_cluster import slurm_cluster  # noqa: F401 - the session's cluster
from tests.test_jobs import gone
from tests.test_remote_worker import (guarded_lab, processes_of, run_to_end, scheduler_for,
                                     start_sleeper, stop_running, train_config,
                                     until_a_logged_step)


@pytest.fixture
def slurm_lab(lab_dir, monkeypatch, slurm_cluster):  # noqa: F811
    lab = guarded_lab(lab_dir, monkeypatch, "slurm")
    yield lab
    stop_running(lab)


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


# -- a job spanning two nodes (issue 22 item 4)

@pytest.fixture
def two_node_lab(slurm_lab, monkeypatch):
    """The Slurm lab, its jobs sent to the partition of both nodes (tests/slurm_cluster.py:
    two slurmd on this machine).

    What a job here proves: Slurm allocates it two nodes and runs the worker on the first,
    srun starts one task through each node's slurmd, the machine ranks find each other at
    the first node's NodeAddr through accelerate/torchrun's rendezvous, and everything
    reaches the lab through the journal. What it cannot: the nodes share one kernel, one
    file system and loopback, so it says nothing of a network between nodes (gloo's or
    NCCL's choice of interface, a firewall), of NFS's caching, or of GPUs."""
    from app.lab import Lab
    from tests.slurm_cluster import TWO_NODES

    monkeypatch.setenv("WEIGHTSMITH_SLURM_PARTITION", TWO_NODES)
    return Lab(slurm_lab.root)


def test_a_train_job_on_two_slurm_nodes_matches_two_processes_on_one(
        two_node_lab, slurm_cluster, tiny_model_dir, tmp_path):  # noqa: F811
    """nodes: 2, one CPU process each: Slurm allocates both nodes, the worker on the first
    srun's a launch per node, the two machine ranks meet, rank 0 alone journals; the model
    is the one 2 processes on one node train, and no process opened registry.db (the guard
    would have failed the job)."""
    import json

    import torch
    from safetensors.torch import load_file

    from app import jobs

    lab = two_node_lab
    config = train_config(tiny_model_dir, tmp_path)
    spread = jobs.submit(lab, "train", {**config, "nodes": 2, "name": "two-nodes"})
    together = jobs.submit(lab, "train", {**config, "cpu_processes": 2, "name": "one-node"})
    spread, together = (run_to_end(lab, j["id"], timeout=300) for j in (spread, together))
    log = (lab.job_dir(spread["id"]) / "log.txt").read_text()
    assert spread["status"] == "succeeded", spread["error"] + log[-3000:]
    assert together["status"] == "succeeded", together["error"]
    assert "launching on 2 nodes, 1 process each (ddp): srun --nodes=2" in log
    assert "--num_machines 2" in log  # each node's own launch line, through srun
    first, second = slurm_cluster.nodes  # two slurmd: each ran one machine rank
    assert f"node 0 of 2 ({first}): " in log and f"node 1 of 2 ({second}): " in log
    assert "--machine_rank 0" in log and "--machine_rank 1" in log
    assert log.count("running as rank") == 1 and "running as rank 0 of 2" in log
    # the launcher, both nodes' launches and both ranks, each unable to open registry.db
    assert log.count("registry.db cannot be opened here") >= 5
    with lab.registry() as reg:
        (ck_id,) = reg.job_checkpoints(spread["id"])
        made = reg.checkpoint(ck_id)
        graph = reg.lineage(ck_id)
        metrics = reg.metrics(spread["id"])
        (other,) = [reg.checkpoint(c) for c in reg.job_checkpoints(together["id"])]
    (imported,) = [n for n in graph["nodes"] if n.get("relation") == "import"]
    assert [e["relation"] for e in graph["edges"] if e["parent"] == imported["id"]] == \
        ["finetune"]
    assert [m["step"] for m in metrics if m["name"] == "loss"] == [2, 4]
    meta, other_meta = json.loads(made["metadata"]), json.loads(other["metadata"])
    assert meta["processes"]["count"] == 2 and meta["processes"]["nodes"] == 2
    assert meta["final_train_loss"] == pytest.approx(other_meta["final_train_loss"], rel=1e-5)
    mine, theirs = (load_file(f"{c['path']}/model.safetensors") for c in (made, other))
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-5) for k in mine)
    job_dir = lab.job_dir(spread["id"])
    assert not (job_dir / "registry-snapshot-ranks.db").exists()
    assert not (job_dir / "rank1").exists()


def test_stop_ends_every_process_of_a_job_on_two_slurm_nodes(
        two_node_lab, tiny_model_dir, tmp_path):
    """Stop while both nodes train: the launcher, srun, each node's launch and each rank end,
    the ranks by their own SIGTERM handling (Slurm signals the nodes' steps, then the worker
    alone, which waits for srun: srun itself would SIGKILL its tasks)."""
    from app import jobs

    lab = two_node_lab
    job = jobs.submit(lab, "train", train_config(tiny_model_dir, tmp_path, max_steps=5000,
                                                 logging_steps=1, nodes=2))
    scheduler = scheduler_for(lab)
    try:
        until_a_logged_step(lab, scheduler, job["id"])
        procs = processes_of(job["id"])
        lines = [" ".join(p.cmdline()) for p in procs]
        launches = [line for line in lines if "accelerate.commands.launch" in line]
        assert len(launches) == 2 and all("--num_machines 2" in line for line in launches)
        assert sum("--rank" in line.split() for line in lines) == 2 + 2, lines  # + launches
        assert any(line.startswith("srun ") for line in lines), lines
        assert jobs.cancel(lab, job["id"])["status"] == "cancelled"
        wait_for(lambda: not processes_of(job["id"]), 30,
                 what="every process of the job to end")
    finally:
        scheduler.release()
    from app.executors import FINAL

    engine_id = lab.registry().job(job["id"])["engine_id"]
    assert _executor(lab).state(engine_id).state in FINAL
    log = (lab.job_dir(job["id"]) / "log.txt").read_text()
    assert "cancelled: partial output removed" in log
    # the ranks had their SIGTERM and grace, not srun's SIGKILL, which leaves no such line
    # (one may instead fail on its peer's exit in a collective, and srun's --kill-on-bad-exit
    # may end the other node's once the first node's launch has ended)
    assert re.search(r"rank [01] of 2: stopped, its partial output removed", log), log[-3000:]
    assert not list(lab.checkpoints_dir.glob(".tmp-*"))
    assert not (lab.job_dir(job["id"]) / "rank1").exists()


def test_a_job_on_two_slurm_nodes_fails_with_its_ranks_own_error(
        two_node_lab, tiny_model_dir, tmp_path):
    """Every rank fails on data without the columns: the first to fail writes its error file
    (srun then ends the other node's share), and the job's error is that rank's words."""
    from app import jobs
    from tests.test_train import write_jsonl

    data = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "b"}] * 8)
    job = jobs.submit(two_node_lab, "train", {"checkpoint": str(tiny_model_dir),
                                              "data": str(data), "nodes": 2})
    job = run_to_end(two_node_lab, job["id"], timeout=300)
    assert job["status"] == "failed"
    assert job["error"].startswith("ValueError: data: found none of the columns 'messages'")
    assert "Traceback" not in job["error"].split("last log lines")[0]
