"""Jobs on a cluster executor (issue 22): the worker runs where the engine puts it, never
opens registry.db, and the server, the registry's only writer, replays what the job wrote
(registry/journal.py, app/ingest.py). The engine here is tests/fake_engine.py: local
processes that cannot open registry.db (tests/remote_node), so the whole path runs
without a cluster; tests/test_executor_ray.py runs the same battery through a real Ray head.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.fake_engine import GUARD, ProcessEngine
from tests.test_jobs import gone
from tests.test_train import arithmetic_rows, write_jsonl

FINAL = ("succeeded", "failed", "cancelled", "interrupted")


@pytest.fixture
def cluster(lab_dir, monkeypatch, tmp_path):
    """A lab whose executor is the process engine (standing in for `executor = "ray"`)."""
    import app.executors
    import plugins
    from app.lab import Lab
    from tests.conftest import TEST_PLUGINS

    monkeypatch.setenv("WEIGHTSMITH_EXECUTOR", "ray")
    monkeypatch.setenv("WEIGHTSMITH_CLUSTER_GPUS", "false")  # this machine has none
    monkeypatch.setenv("WEIGHTSMITH_PLUGINS", TEST_PLUGINS + ",tests.plugins_for_tests:SELECTOR")
    plugins.discover(refresh=True)
    lab = Lab(lab_dir)
    engine = ProcessEngine(lab.root, tmp_path / "engine-logs")
    monkeypatch.setattr(app.executors, "executor_for", lambda settings, name=None: engine)
    lab.engine = engine
    yield lab
    for engine_id in list(engine.procs):
        engine.forget(engine_id)


def scheduler_for(lab):
    from app.scheduler import Scheduler

    scheduler = Scheduler(lab, poll_seconds=0.1)
    assert scheduler.acquire()
    return scheduler


def guarded_lab(lab_dir, monkeypatch, executor: str, **settings):
    """A lab on a real cluster `executor` (tests/test_cluster_*.py), its lab settings given as
    WEIGHTSMITH_<NAME> variables, whose jobs' processes play a node that cannot open
    registry.db (tests/remote_node, saying so in their logs)."""
    import plugins
    from app.lab import Lab

    monkeypatch.setenv("WEIGHTSMITH_EXECUTOR", executor)
    monkeypatch.setenv("WEIGHTSMITH_CLUSTER_GPUS", "false")
    for name, value in settings.items():
        monkeypatch.setenv(f"WEIGHTSMITH_{name.upper()}", str(value))
    monkeypatch.setenv("WEIGHTSMITH_TEST_REMOTE_LAB", str(lab_dir))
    monkeypatch.setenv("WEIGHTSMITH_TEST_REMOTE_SAY", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        str(GUARD), os.environ.get("PYTHONPATH")])))
    plugins.discover(refresh=True)
    return Lab(lab_dir)


def stop_running(lab):
    """Stop, through the lab's engine, every job a test left running."""
    from app.executors import executor_for

    engine = executor_for(lab.settings)
    with lab.registry() as reg:
        for job in reg.jobs(status="running", limit=100):
            engine.stop(job["engine_id"] or job["id"])


def processes_of(job_id: str) -> list:
    """Every live process whose command line names the job (its worker, a node's launch,
    the ranks)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if job_id in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def until_a_logged_step(lab, scheduler, job_id: str, timeout: float = 180) -> None:
    """Run the scheduler until the job has logged a training step."""
    def training():
        scheduler.tick()
        with lab.registry() as reg:
            return bool(reg.metrics(job_id))
    wait_for(training, timeout, interval=0.2, what="a logged training step")


def train_config(tiny_model_dir, tmp_path, **changes) -> dict:
    """A small full fine-tune of the tiny model (the cluster tests' training job)."""
    data = write_jsonl(tmp_path / "rows.jsonl", arithmetic_rows(16))
    return {"checkpoint": str(tiny_model_dir), "data": str(data), "method": "full",
            "max_steps": 4, "batch_size": 4, "logging_steps": 2, "save_steps": 0,
            "learning_rate": 1e-3, **changes}


def run_to_end(lab, job_id, timeout=180, scheduler=None):
    own = scheduler is None
    scheduler = scheduler or scheduler_for(lab)
    try:
        def done():
            scheduler.tick()
            with lab.registry() as reg:
                job = reg.job(job_id)
            return job if job["status"] in FINAL else None
        return wait_for(done, timeout, interval=0.2, what=f"job {job_id} to end")
    finally:
        if own:
            scheduler.release()


def test_the_guard_stops_a_node_reading_the_registry(lab):
    """The stand-in for another node really cannot open registry.db (else the tests below
    would prove nothing)."""
    env = {**os.environ, "WEIGHTSMITH_TEST_REMOTE_LAB": str(lab.root),
           "PYTHONPATH": str(GUARD)}
    probe = (f"import sqlite3; sqlite3.connect({str(lab.db_path)!r}).execute('select 1')")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "cannot read" in proc.stderr


def test_a_remote_job_chain_keeps_the_whole_lineage(cluster, tiny_model_dir, tmp_path):
    """A dataset-writing job, then training on its output from a folder import, with the lab's
    auto-evaluation: every row reaches the registry through the journal, with the lineage
    pool -> selection -> checkpoint <- import, the scores of the auto-evaluation (itself a
    remote job), metrics, progress and the suggested follow-up."""
    from app import jobs

    lab = cluster
    pool = write_jsonl(tmp_path / "pool.jsonl", arithmetic_rows(16))
    select = jobs.submit(lab, "test_select", {"pool": str(pool), "keep": 8,
                                              "suggest_copy_of": str(tiny_model_dir)})
    job = run_to_end(lab, select["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["executor"] == "ray" and job["engine_id"] == select["id"]
    assert job["device"] == "ray:cpu" and job["progress"] == 1.0
    job_dir = Path(job["job_dir"])
    assert job["journal_offset"] == (job_dir / "registry-journal.jsonl").stat().st_size
    assert not (job_dir / "registry-snapshot.db").exists()  # removed once the job ended
    assert "on node" in (job_dir / "log.txt").read_text()
    from app.ui import jobs_view

    shown, _, log, _ = jobs_view.job_detail(lab, select["id"])
    assert "device ray:cpu" in shown and f"ray job {select['id']}" in shown
    assert "registered dataset" in log  # the worker's log.txt, as for a local job
    with lab.registry() as reg:
        (selection,) = reg.datasets.made_by(select["id"])
        assert reg.metrics(select["id"])[0]["value"] == 8
        (suggestion,) = reg.job_suggestions(select["id"])
    assert suggestion["plugin"] == "test_copy"
    assert Path(selection["path"]).read_text().count("\n") == 8

    (lab.root / "lab.toml").write_text('auto_eval = true\nauto_eval_suite = "demo"\n')
    from app.lab import Lab

    lab2 = Lab(lab.root)
    train = jobs.submit(lab2, "train", {
        "checkpoint": str(tiny_model_dir), "data": selection["id"], "max_steps": 2,
        "batch_size": 4, "save_steps": 0, "method": "full", "logging_steps": 1})
    scheduler = scheduler_for(lab2)
    try:
        job = run_to_end(lab2, train["id"], scheduler=scheduler)
        assert job["status"] == "succeeded", job["error"]
        with lab2.registry() as reg:
            (ck_id,) = reg.job_checkpoints(train["id"])
            evals = [j for j in reg.jobs(limit=20) if j["plugin"] == "evaluate"]
        assert len(evals) == 1 and evals[0]["user"] == "auto-eval"  # queued by the server
        job = run_to_end(lab2, evals[0]["id"], timeout=300, scheduler=scheduler)
        assert job["status"] == "succeeded", job["error"]
    finally:
        scheduler.release()
    with lab2.registry() as reg:
        ck = reg.checkpoint(ck_id)
        graph = reg.lineage(ck_id, datasets=True)
        scores = reg.evaluations(ck_id)
        train_metrics = reg.metrics(train["id"])
    assert ck["job_id"] == train["id"] and ck["plugin"] == "train"
    assert Path(ck["path"]).parent == lab2.checkpoints_dir and Path(ck["path"]).is_dir()
    kinds = {n["id"]: n["kind"] for n in graph["nodes"]}
    relations = {(e["parent"], e["child"], e["relation"]) for e in graph["edges"]}
    (imported,) = [n for n in graph["nodes"] if n.get("relation") == "import"]
    assert (imported["id"], ck_id, "finetune") in relations
    assert kinds[selection["id"]] == "dataset"
    assert any(e["parent"] == selection["id"] and e["child"] == ck_id for e in graph["edges"])
    assert scores and {s["job_id"] for s in scores} == {evals[0]["id"]}
    assert any(m["name"] == "loss" for m in train_metrics)


def test_a_two_process_job_on_a_node_registers_once_through_the_journal(
        cluster, tiny_model_dir, tmp_path, monkeypatch):
    """A job launched as 2 DDP processes on a node (cpu_processes: 2): the launching worker
    imports the base and writes the ranks' snapshot, rank 0 journals its checkpoints and
    metrics, rank 1 records nothing, and no process opens registry.db."""
    from app import jobs

    lab = cluster
    monkeypatch.setenv("WEIGHTSMITH_TEST_REMOTE_SAY", "1")  # each guarded process says so
    data = write_jsonl(tmp_path / "rows.jsonl", arithmetic_rows(16))
    job = jobs.submit(lab, "train", {
        "checkpoint": str(tiny_model_dir), "data": str(data), "method": "full",
        "max_steps": 4, "batch_size": 4, "logging_steps": 2, "save_steps": 2,
        "cpu_processes": 2})
    job = run_to_end(lab, job["id"], timeout=300)
    log = Path(job["log_path"]).read_text()
    assert job["status"] == "succeeded", job["error"] + log[-3000:]
    assert "launching 2 processes (ddp)" in log and log.count("running as rank") == 1
    assert log.count("registry.db cannot be opened here") >= 2  # the ranks were guarded too
    with lab.registry() as reg:
        made = [reg.checkpoint(c) for c in reg.job_checkpoints(job["id"])]
        metrics = reg.metrics(job["id"])
        graph = reg.lineage(next(c["id"] for c in made if not c["name"].endswith("-step2")))
    assert sorted(c["name"] for c in made) == ["tiny-llama-full", "tiny-llama-full-step2"]
    # the launching worker learns rank 0's checkpoints from the journal
    said = log.split("succeeded; checkpoints: ")[1].split("\n")[0]
    assert sorted(said.split(", ")) == sorted(c["id"] for c in made)
    (imported,) = [n for n in graph["nodes"] if n.get("relation") == "import"]
    assert any(e["parent"] == imported["id"] and e["relation"] == "finetune"
               for e in graph["edges"])
    assert [m["step"] for m in metrics if m["name"] == "loss"] == [2, 4]  # rank 0's alone
    job_dir = Path(job["job_dir"])
    assert not (job_dir / "registry-snapshot-ranks.db").exists()  # removed at the end
    assert not (job_dir / "rank1").exists()


def test_a_failing_remote_job_records_its_own_error(cluster):
    from app import jobs

    job = jobs.submit(cluster, "test_crash", {"message": "remote boom"})
    job = run_to_end(cluster, job["id"])
    assert job["status"] == "failed"
    assert "RuntimeError: remote boom" in job["error"] and "MARKER-LAST-LINE" in job["error"]
    assert not list(cluster.checkpoints_dir.glob(".tmp-*"))  # the partial checkpoint is gone


def start_sleeper(lab, tmp_path, seconds=60, timeout=60):
    """Submit a sleeper, hand it over with a scheduler of its own, and wait for its worker:
    (job id, that scheduler, [worker pid, grandchild pid])."""
    from app import jobs

    pid_file = tmp_path / "pids"
    job = jobs.submit(lab, "test_sleep", {"seconds": seconds, "pid_file": str(pid_file)})
    scheduler = scheduler_for(lab)
    wait_for(lambda: (scheduler.tick(), pid_file.exists())[1], timeout, interval=0.2,
             what="the remote sleeper to start")
    return job["id"], scheduler, [int(p) for p in pid_file.read_text().split()]


def test_stop_ends_the_remote_process_tree(cluster, tmp_path):
    from app import jobs

    job_id, scheduler, pids = start_sleeper(cluster, tmp_path)
    try:
        wait_for(lambda: (scheduler.tick(),
                          cluster.registry().job(job_id)["progress"] > 0)[1], 30,
                 what="progress through the journal")
        job = jobs.cancel(cluster, job_id)
        assert job["status"] == "cancelled"
        assert all(gone(p) for p in pids)
        # a line the worker wrote just before it ended still reaches the registry
        journal = cluster.job_dir(job_id) / "registry-journal.jsonl"
        with open(journal, "a") as f:
            f.write(json.dumps({"call": "add_metric", "args": {
                "name": "last_words", "value": 1.0, "job_id": job_id}}) + "\n")
        scheduler.tick()
        with cluster.registry() as reg:
            assert reg.job(job_id)["status"] == "cancelled"
            assert "last_words" in {m["name"] for m in reg.metrics(job_id)}
        assert not list(cluster.checkpoints_dir.glob(".tmp-*"))
    finally:
        scheduler.release()


def test_a_killed_worker_fails_with_the_engines_word(cluster, tmp_path):
    job_id, scheduler, pids = start_sleeper(cluster, tmp_path)
    try:
        os.killpg(pids[0], signal.SIGKILL)  # out of memory, say: no chance to record its end
        job = run_to_end(cluster, job_id, scheduler=scheduler)
    finally:
        scheduler.release()
    assert job["status"] == "failed"
    assert "ray reports the job failed" in job["error"]


def test_a_restarted_server_reattaches_and_a_lost_job_is_interrupted(cluster, tmp_path):
    job_id, first, pids = start_sleeper(cluster, tmp_path, seconds=3)
    first.release()  # the server stops; the job goes on on its node
    job = run_to_end(cluster, job_id)  # a new scheduler: the same job, followed to its end
    assert job["status"] == "succeeded" and job["progress"] == 1.0

    (tmp_path / "second").mkdir()
    job_id, second, pids = start_sleeper(cluster, tmp_path / "second", seconds=60)
    second.release()
    cluster.engine.forget(job_id)  # the cluster restarted meanwhile
    job = run_to_end(cluster, job_id)
    assert job["status"] == "interrupted" and "ray reports the job gone" in job["error"]


def test_a_node_that_cannot_see_the_lab_fails_with_that_message(cluster):
    from app import jobs

    cluster.engine.lab_seen_as = "/nonexistent/lab"
    job = jobs.submit(cluster, "test_crash", {"message": "never runs"})
    job = run_to_end(cluster, job["id"])
    assert job["status"] == "failed"
    assert "cannot see the lab's job folder" in job["error"]
    assert "Traceback" not in job["error"]


def test_an_unreachable_engine_keeps_the_queue_and_says_why(cluster):
    """A head that does not answer (restarting, say) fails nobody's job: the queue waits,
    the job saying why, and goes to the engine once it answers."""
    from app import jobs

    cluster.engine.down = True
    job = jobs.submit(cluster, "test_crash", {"message": "ran later"})
    second = jobs.submit(cluster, "test_crash", {"message": "also later"})
    scheduler = scheduler_for(cluster)
    try:
        scheduler.tick()
        with cluster.registry() as reg:
            waiting = reg.job(job["id"])
            assert reg.job(second["id"])["status"] == "queued"
        assert waiting["status"] == "queued" and waiting["executor"] is None
        assert "waiting: no engine answers" in waiting["progress_message"]
        cluster.engine.down = False
        job = run_to_end(cluster, job["id"], scheduler=scheduler)
    finally:
        scheduler.release()
    assert job["status"] == "failed" and "RuntimeError: ran later" in job["error"]


def test_a_job_the_engine_never_started_is_queued_again_under_a_new_id(cluster):
    """Ray fails a job that waited for room longer than its start timeout, before its
    worker ran: the lab queues it again and hands it over as JOB-r1 (Ray never reuses an
    id); after MAX_START_ATTEMPTS it fails with the engine's words."""
    from app import jobs
    from app.scheduler import MAX_START_ATTEMPTS

    job = jobs.submit(cluster, "test_crash", {"message": "ran at last"})
    cluster.engine.hold = {job["id"]}
    scheduler = scheduler_for(cluster)
    try:
        scheduler.tick()  # handed over, held
        scheduler.tick()  # the engine gave up: queued again, and handed over as -r1
        with cluster.registry() as reg:
            row = reg.job(job["id"])
        assert row["engine_id"] == f"{job['id']}-r1", row
        row = run_to_end(cluster, job["id"], scheduler=scheduler)
        assert "RuntimeError: ran at last" in row["error"]

        again = jobs.submit(cluster, "test_crash", {"message": "never"})
        cluster.engine.hold = {again["id"]} | {f"{again['id']}-r{n}" for n in range(1, 9)}
        row = run_to_end(cluster, again["id"], scheduler=scheduler)
    finally:
        scheduler.release()
    assert row["status"] == "failed" and "no room on the cluster" in row["error"]
    assert row["engine_id"] == f"{again['id']}-r{MAX_START_ATTEMPTS - 1}"


def test_the_server_refuses_lines_that_reach_outside_the_job(cluster, tiny_model_dir):
    """What a job may register: its own folder under lab/checkpoints, never the folder
    itself (retention would remove the lab's checkpoints), no creation time or Hub state of
    its choosing, no other user's Hub stub."""
    from app.ingest import IngestError, _checked

    with cluster.registry() as reg:
        job = reg.add_job(plugin="test_crash", config={}, user="mallory")
        reg.update_job(job["id"], status="running", started_at="2026-01-01T00:00:00Z")
        job = reg.job(job["id"])
        stub = reg.add_checkpoint(name="theirs", relation="import", source="hf://org/m",
                                  created_by="alice")
        good = {"id": "ck-0123456789ab", "name": "x", "relation": "finetune",
                "path": str(cluster.checkpoints_dir / "ck-0123456789ab"), "job_id": job["id"]}
        assert _checked(cluster, reg, job, "add_checkpoint", good)["created_by"] == "mallory"
        for bad, message in [
                ({"path": str(cluster.checkpoints_dir)}, "may not register"),
                ({"path": str(cluster.root / "registry.db")}, "may not register"),
                ({"created_at": "2000-01-01"}, "may not set created_at"),
                ({"hub_repo": "org/m"}, "may not set"),
                ({"job_id": "job-other"}, "another job"),
                ({"parents": [{}]}, "parents must be")]:
            with pytest.raises(IngestError, match=message):
                _checked(cluster, reg, job, "add_checkpoint", {**good, **bad})
        with pytest.raises(IngestError, match="source must be"):
            _checked(cluster, reg, job, "add_checkpoint",
                     {**good, "path": str(tiny_model_dir), "source": "hf://meta/x"})
        fill = {"ck_id": stub["id"], "path": str(cluster.checkpoints_dir / stub["id"])}
        assert _checked(cluster, reg, job, "update_checkpoint", fill)
        for bad in ({"source": "hf://evil/x"}, {"name": "renamed"},
                    {"path": str(cluster.checkpoints_dir / "ck-elsewhere")}):
            with pytest.raises(IngestError):
                _checked(cluster, reg, job, "update_checkpoint", {**fill, **bad})


def test_a_refused_journal_line_fails_the_job(cluster, tmp_path):
    """A line no job may write (another job's row) is not applied, and fails the job."""
    from app import jobs
    from app.ingest import IngestError, _checked

    other = jobs.submit(cluster, "test_crash", {})
    job_id, scheduler, pids = start_sleeper(cluster, tmp_path)
    try:
        journal = cluster.job_dir(job_id) / "registry-journal.jsonl"
        with open(journal, "a") as f:
            f.write(json.dumps({"call": "update_job", "args": {
                "job_id": other["id"], "status": "succeeded"}}) + "\n")
        scheduler.tick()  # replays the line, refuses it, and has the engine stop the job
        with cluster.registry() as reg:
            job = reg.job(job_id)
            assert reg.job(other["id"])["status"] != "succeeded"
        assert job["status"] == "failed" and "refused" in job["error"]
        assert all(gone(p) for p in pids)
        # a column a worker may not set never reaches SQL (update_job's names are SQL)
        with cluster.registry() as reg, pytest.raises(IngestError, match="may not set"):
            _checked(cluster, reg, reg.job(job_id), "update_job", {
                "job_id": job_id, "user = 'x', status": "queued"})
    finally:
        scheduler.release()


def test_the_cluster_queue_serves_users_in_fair_order(cluster):
    """With room for one job at a time on the engine, one user's queue of three does not
    starve another's single job: the lab's fair order decides what the engine gets."""
    from app import jobs

    (cluster.root / "lab.toml").write_text("cluster_max_jobs = 1\n")
    from app.lab import Lab

    lab = Lab(cluster.root)
    first = [jobs.submit(lab, "test_crash", {"message": f"a{i}"}, user="ann") for i in range(3)]
    bob = jobs.submit(lab, "test_crash", {"message": "b"}, user="bob")
    for job in first + [bob]:
        run_to_end(lab, job["id"])
    with lab.registry() as reg:
        started = sorted(reg.jobs(limit=10), key=lambda j: j["started_at"])
    assert [j["user"] for j in started] == ["ann", "bob", "ann", "ann"]


def test_a_write_outside_the_journaled_calls_raises_on_the_node(tmp_path):
    from registry import Registry, RegistryError
    from registry.journal import SNAPSHOT, JournalRegistry

    with Registry(tmp_path / "registry.db") as reg:
        job = reg.add_job(plugin="x", config={})
        reg.snapshot(tmp_path / SNAPSHOT)
    node = JournalRegistry.open(tmp_path, tmp_path / "node")
    node.update_job(job["id"], progress=0.5)
    node.add_metric(name="loss", value=1.5, job_id=job["id"])
    node.users.audit("mallory", "job.cancel", job["id"])  # no journaled call: lost
    with pytest.raises(RegistryError, match="outside the journaled calls"):
        node.add_metric(name="loss", value=1.0, job_id=job["id"])  # said at the next call
    node.update_job(job["id"], status="failed")  # said once: the job's end is still recorded
    lines = [json.loads(x) for x in (tmp_path / "registry-journal.jsonl").read_text()
             .splitlines()]
    assert [x["call"] for x in lines] == ["update_job", "add_metric", "update_job"]
    assert lines[0]["args"] == {"job_id": job["id"], "progress": 0.5}
    node.close()


def test_lines_of_a_group_that_rolls_back_are_not_journaled(tmp_path):
    """hub.fill_stub groups its calls in one transaction: if it fails half-way on the node,
    the lab must not get the half that the node rolled back."""
    from registry import Registry
    from registry.journal import SNAPSHOT, JournalRegistry

    with Registry(tmp_path / "registry.db") as reg:
        job = reg.add_job(plugin="x", config={})
        reg.snapshot(tmp_path / SNAPSHOT)
    node = JournalRegistry.open(tmp_path, tmp_path / "node")
    with pytest.raises(RuntimeError):
        with node.write():
            node.update_job(job["id"], progress=0.25)
            raise RuntimeError("half-way")
    with pytest.raises(RuntimeError):
        with node.write():
            with node.write():  # an inner group: its lines wait for the outer one too
                node.update_job(job["id"], progress=0.4)
            raise RuntimeError("after the inner group")
    with node.write():
        node.update_job(job["id"], progress=0.5)
    lines = [json.loads(x) for x in (tmp_path / "registry-journal.jsonl").read_text()
             .splitlines()]
    assert [x["args"]["progress"] for x in lines] == [0.5]
    assert node.job(job["id"])["progress"] == 0.5
    node.close()



def test_the_engine_is_asked_about_a_running_job_every_few_seconds_not_every_pass(
        cluster, tmp_path, monkeypatch):
    """Every pass replays the journal, but asks the engine (an squeue, an HTTP call) at most
    every ENGINE_POLL_S while it says "running"; an ended job is seen at its next question."""
    import os
    import signal as signals
    import time

    from app import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "ENGINE_POLL_S", 1.0)
    job_id, scheduler, pids = start_sleeper(cluster, tmp_path)
    asked = []
    state = cluster.engine.state
    monkeypatch.setattr(cluster.engine, "state", lambda e: asked.append(e) or state(e))
    try:
        started = time.monotonic()
        while time.monotonic() - started < 2.5:
            scheduler.tick()
            time.sleep(0.05)
        assert 2 <= len(asked) <= 4, asked  # not once per pass (about 40 passes)
        os.kill(pids[0], signals.SIGKILL)
        job = run_to_end(cluster, job_id, timeout=30, scheduler=scheduler)
        assert job["status"] == "failed"
    finally:
        scheduler.release()
        for pid in pids:
            try:
                os.kill(pid, signals.SIGKILL)
            except ProcessLookupError:
                pass
