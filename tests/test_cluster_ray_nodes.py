"""Jobs spanning two Ray nodes (issue 22): a real Ray cluster of two nodes on loopback
(tests/ray_cluster.py ray_two_nodes: a head of 2 CPUs and a worker node of 1, its own, not
the session's shared head), the lab's `executor = "ray"`, the scheduler as the server runs it.
The launching worker asks Ray for a placement group of one bundle per node (STRICT_SPREAD)
and runs each node's accelerate launch from an actor in its bundle (app/executors/ray.py
RayNodes). Every process of the jobs, Ray's workers included, cannot open registry.db
(tests/remote_node), as a node that mounts the lab folder over NFS must not.

What it proves: Ray places one rank's share on each of two nodes, the launches meet, rank 0
alone journals, Stop and a rank's failure leave no process, too few nodes fail the job. What it
cannot: both nodes share one kernel, one file system and loopback, so it says nothing of a
network between hosts, NFS or GPUs."""

import json
import os
import re

import pytest

from tests.conftest import wait_for
from tests.fake_engine import GUARD
from tests.ray_cluster import ray_two_nodes  # noqa: F401 - the module's two-node cluster
from tests.test_remote_worker import (guarded_lab, processes_of, run_to_end, scheduler_for,
                                     stop_running, train_config, until_a_logged_step)

# A sitecustomize that is the guard (tests/remote_node) and, in the process of rank
# WEIGHTSMITH_TEST_FAIL_RANK only, fails the first open of a file under
# WEIGHTSMITH_TEST_FAIL_UNDER (the model's folder: the rank loading its model): one rank
# on one node fails, the other runs on into the collective that waits for it.
FAILING_SITE = """
exec(compile(open({guard!r}).read(), {guard!r}, "exec"))
import os as _os, sys as _sys
if _os.environ.get("RANK") and _os.environ.get("RANK") == _os.environ.get(
        "WEIGHTSMITH_TEST_FAIL_RANK"):
    _UNDER = _os.environ["WEIGHTSMITH_TEST_FAIL_UNDER"]

    def _fail(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes)) and \\
                _os.fsdecode(args[0]).startswith(_UNDER):
            raise RuntimeError("rank " + _os.environ["RANK"] + " fails on its node (tests)")

    _sys.addaudithook(_fail)
"""


@pytest.fixture
def nodes_lab(lab_dir, monkeypatch, ray_two_nodes):  # noqa: F811
    lab = guarded_lab(lab_dir, monkeypatch, "ray", ray_address=ray_two_nodes,
                      cancel_grace_seconds=5)
    yield lab
    stop_running(lab)


def _log(lab, job_id: str) -> str:
    return (lab.job_dir(job_id) / "log.txt").read_text()


def test_a_train_job_on_two_ray_nodes_matches_two_processes_on_one(
        nodes_lab, tiny_model_dir, tmp_path):
    """nodes: 2, one CPU process each: Ray places one bundle on each node, each node's actor
    starts its launch, the two machine ranks meet at node 0, rank 0 alone journals; the
    model is the one 2 processes on one node train."""
    import torch
    from safetensors.torch import load_file

    from app import jobs

    lab = nodes_lab
    config = train_config(tiny_model_dir, tmp_path)
    spread = jobs.submit(lab, "train", {**config, "nodes": 2, "name": "two-nodes"})
    spread = run_to_end(lab, spread["id"], timeout=300)
    log = _log(lab, spread["id"])
    assert spread["status"] == "succeeded", spread["error"] + log[-3000:]
    together = jobs.submit(lab, "train", {**config, "cpu_processes": 2, "name": "one-node"})
    together = run_to_end(lab, together["id"], timeout=300)
    assert together["status"] == "succeeded", together["error"]

    assert "STRICT_SPREAD" in log and "launching on 2 nodes, 1 process each (ddp), " \
                                      "through Ray" in log
    # each node's actor says where it runs: two different Ray nodes
    placed = dict(re.findall(r"^node (\d) of 2: Ray node ([0-9a-f]+) ", log, re.M))
    assert sorted(placed) == ["0", "1"] and placed["0"] != placed["1"], log[-3000:]
    assert "--machine_rank 0" in log and "--machine_rank 1" in log
    assert log.count("running as rank") == 1 and "running as rank 0 of 2" in log
    # both nodes' launches and both ranks, each unable to open registry.db
    assert log.count("registry.db cannot be opened here") >= 4
    with lab.registry() as reg:
        (ck_id,) = reg.job_checkpoints(spread["id"])
        made = reg.checkpoint(ck_id)
        metrics = reg.metrics(spread["id"])
        (other,) = [reg.checkpoint(c) for c in reg.job_checkpoints(together["id"])]
        assert reg.parents(ck_id)[0]["relation"] == "finetune"
    assert [m["step"] for m in metrics if m["name"] == "loss"] == [2, 4]
    meta, other_meta = json.loads(made["metadata"]), json.loads(other["metadata"])
    assert meta["processes"]["count"] == 2 and meta["processes"]["nodes"] == 2
    assert meta["final_train_loss"] == pytest.approx(other_meta["final_train_loss"], rel=1e-5)
    mine, theirs = (load_file(f"{c['path']}/model.safetensors") for c in (made, other))
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-5) for k in mine)
    job_dir = lab.job_dir(spread["id"])
    assert not (job_dir / "registry-snapshot-ranks.db").exists()
    assert not (job_dir / "rank1").exists()
    assert not processes_of(spread["id"])


def test_stop_ends_every_process_of_a_job_on_two_ray_nodes(
        nodes_lab, tiny_model_dir, tmp_path):
    """Stop while both nodes train: Ray's supervisor SIGTERMs the launching worker, which
    has each node's actor end its launch's process tree (SIGTERM, SIGKILL after the grace);
    nothing of the job is left, and it is cancelled."""
    from app import jobs

    lab = nodes_lab
    job = jobs.submit(lab, "train", train_config(tiny_model_dir, tmp_path, max_steps=5000,
                                            logging_steps=1, nodes=2))
    scheduler = scheduler_for(lab)
    try:
        until_a_logged_step(lab, scheduler, job["id"])
        lines = [" ".join(p.cmdline()) for p in processes_of(job["id"])]
        launches = [line for line in lines if "accelerate.commands.launch" in line]
        assert len(launches) == 2 and all("--num_machines 2" in line for line in launches)
        assert sum("--rank" in line.split() for line in lines) == 2 + 2, lines  # + launches
        assert jobs.cancel(lab, job["id"])["status"] == "cancelled"
        wait_for(lambda: not processes_of(job["id"]), 30,
                 what="every process of the job to end")
    finally:
        scheduler.release()
    with lab.registry() as reg:
        assert reg.job(job["id"])["status"] == "cancelled"
    log = _log(lab, job["id"])
    # the worker itself took the Stop as a cancel (not the server's row alone): no error
    assert "cancelled: partial output removed" in log, log[-3000:]
    # (torchrun prints its own traceback on a SIGTERM; the worker must not fail)
    assert "job failed" not in log and "SystemError" not in log, log[-3000:]
    # the ranks had their SIGTERM and grace (one may instead fail on its peer's exit in a
    # collective; a SIGKILL would leave no such line at all)
    assert re.search(r"rank [01] of 2: stopped, its partial output removed", log), log[-3000:]
    assert not list(lab.checkpoints_dir.glob(".tmp-*"))
    assert not (lab.job_dir(job["id"]) / "rank1").exists()


def test_a_killed_launching_worker_leaves_no_rank_and_no_placement_group(
        nodes_lab, tiny_model_dir, tmp_path, ray_two_nodes):  # noqa: F811
    """SIGKILL to the launching worker mid-training: Ray kills the job's node actors and
    their launches, the watchdogs end the ranks (which sit in sessions of their own), and
    Ray removes the job's placement group; the job ends failed."""
    from ray.util.state import list_placement_groups

    from app import jobs

    lab = nodes_lab
    job = jobs.submit(lab, "train", train_config(tiny_model_dir, tmp_path, max_steps=5000,
                                            logging_steps=1, nodes=2))
    scheduler = scheduler_for(lab)
    try:
        until_a_logged_step(lab, scheduler, job["id"])
        launcher = [p for p in processes_of(job["id"])
                    if "--remote" in p.cmdline() and "--rank" not in p.cmdline()
                    and "--node-launch" not in p.cmdline()
                    and "accelerate.commands.launch" not in " ".join(p.cmdline())]
        assert len(launcher) == 1, [p.cmdline() for p in launcher]
        launcher[0].kill()
        wait_for(lambda: not processes_of(job["id"]), 60,
                 what="every process of the job to end")

        def ended():
            scheduler.tick()
            with lab.registry() as reg:
                return reg.job(job["id"])["status"] not in ("queued", "running")
        wait_for(ended, 60, interval=0.5, what="the job to end")
    finally:
        scheduler.release()
    with lab.registry() as reg:
        assert reg.job(job["id"])["status"] == "failed"
    dashboard = ray_two_nodes
    wait_for(lambda: all(g.state == "REMOVED"
                         for g in list_placement_groups(address=dashboard, timeout=10)),
             30, what="the job's placement group to be removed")


def test_a_rank_failing_on_one_ray_node_fails_the_job_with_its_own_error(
        nodes_lab, tiny_model_dir, tmp_path, monkeypatch):
    """Rank 1 alone fails (it cannot read its model): its node's launch ends badly, the
    launching worker stops the other node's, and the job's error is rank 1's own words (not
    rank 0's, which then fails in the collective with gloo's)."""
    from app import jobs

    site = tmp_path / "failing-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        FAILING_SITE.format(guard=str(GUARD / "sitecustomize.py")))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("WEIGHTSMITH_TEST_FAIL_RANK", "1")
    # the imported model stays where it is (a registered folder): every rank reads it there
    monkeypatch.setenv("WEIGHTSMITH_TEST_FAIL_UNDER", str(tiny_model_dir))
    job = jobs.submit(nodes_lab, "train", train_config(tiny_model_dir, tmp_path, nodes=2))
    job = run_to_end(nodes_lab, job["id"], timeout=300)
    log = _log(nodes_lab, job["id"])
    assert job["status"] == "failed", log[-3000:]
    assert job["error"].startswith("RuntimeError: rank 1 fails on its node (tests)"), \
        job["error"] + log[-3000:]
    assert "Traceback" not in job["error"].split("last log lines")[0]
    assert not processes_of(job["id"])


def test_more_nodes_than_the_ray_cluster_has_fail_the_job_saying_so(
        nodes_lab, tiny_model_dir, tmp_path, monkeypatch):
    """nodes: 3 on two nodes: the placement group cannot be placed; after the bounded wait
    the job fails, naming the field and how many nodes Ray has, and nothing is left."""
    from app import jobs

    monkeypatch.setenv("WEIGHTSMITH_RAY_PLACEMENT_TIMEOUT", "5")
    job = jobs.submit(nodes_lab, "train", train_config(tiny_model_dir, tmp_path, nodes=3))
    job = run_to_end(nodes_lab, job["id"], timeout=120)
    assert job["status"] == "failed"
    assert job["error"].startswith(
        "field 'nodes': got 3; Ray could not place the job on 3 different nodes "
        "({'CPU': 1} on each) within 5 s: the cluster has 2 alive nodes"), job["error"]
    assert "Traceback" not in job["error"].split("last log lines")[0]
    assert not processes_of(job["id"])
