"""The `ray` executor against a real one-node Ray head (tests/ray_cluster.py), through
RayExecutor alone: a job's output, environment and folder; a failure's reason; a stop that
ends the worker and the process it started; what Ray says of an id it does not know, of a
used id, and when nothing answers at the address."""

import json
import os
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from tests.conftest import REPO, wait_for
from tests.ray_cluster import NOT_INSTALLED, free_port, ray_address  # noqa: F401 (fixture)

try:
    import ray.job_submission  # noqa: F401
except ImportError:
    pytest.skip(NOT_INSTALLED, allow_module_level=True)

from app.executors import (FAILED, FINAL, GONE, PENDING, RUNNING, STOPPED, SUCCEEDED,
                           ExecutorError, Needs, Submission)
from app.executors.ray import RayExecutor

JOB_TIMEOUT = 60.0  # a job here takes 1 to 3 s


def new_id(what: str) -> str:
    """A submission id unused on the session's head (Ray never reuses one)."""
    return f"test-{what}-{uuid.uuid4().hex[:8]}"


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def finish(executor: RayExecutor, engine_id: str):
    return wait_for(lambda: (s := executor.state(engine_id)).state in FINAL and s,
                    JOB_TIMEOUT, interval=0.1, what=f"Ray job {engine_id} to end")


@pytest.fixture(scope="module")
def executor(ray_address):
    executor = RayExecutor(ray_address)
    yield executor
    executor.close()


@pytest.fixture(scope="module")
def hello(executor, tmp_path_factory):
    """One job that prints a line, an environment variable and its working folder (a path
    with a space, for the shell quoting): its submission, final state and logs."""
    cwd = tmp_path_factory.mktemp("job folder")
    sub = Submission(job_id=new_id("hello"), cwd=str(cwd),
                     env={"WEIGHTSMITH_PROBE": "forty two"},
                     command=python("import os; print('hello from the worker'); "
                                    "print('probe=' + os.environ['WEIGHTSMITH_PROBE']); "
                                    "print('cwd=' + os.getcwd())"))
    assert executor.submit(sub) == sub.job_id
    state = finish(executor, sub.job_id)
    return sub, state, executor.logs(sub.job_id)


def test_a_worker_that_exits_0_succeeds_and_its_output_is_the_logs(hello):
    sub, state, logs = hello
    assert state.state == SUCCEEDED, (state, logs)
    assert "hello from the worker" in logs


def test_the_worker_gets_the_submission_s_environment(hello):
    sub, state, logs = hello
    assert "probe=forty two" in logs


def test_the_worker_runs_in_the_submission_s_folder(hello):
    sub, state, logs = hello
    assert f"cwd={sub.cwd}\n" in logs


def test_a_worker_that_exits_3_fails_with_ray_s_reason_in_one_line(executor):
    job_id = executor.submit(Submission(
        job_id=new_id("exit3"), command=python("import sys; print('about to fail'); "
                                                "sys.exit(3)")))
    state = finish(executor, job_id)
    assert state.state == FAILED
    assert "exit code 3" in state.message, state.message
    assert "\n" not in state.message and len(state.message) <= 300
    assert "about to fail" in executor.logs(job_id)


def test_stop_ends_the_worker_and_the_process_it_started(executor, tmp_path):
    pids_file = tmp_path / "pids.json"
    code = ("import json, os, subprocess, sys, time\n"
            "child = subprocess.Popen(['sleep', '300'])\n"
            "path = sys.argv[1]\n"
            "open(path + '.tmp', 'w').write(json.dumps([os.getpid(), child.pid]))\n"
            "os.replace(path + '.tmp', path)\n"
            "time.sleep(300)\n")
    job_id = executor.submit(Submission(job_id=new_id("stop"),
                                        command=[*python(code), str(pids_file)]))
    wait_for(pids_file.exists, JOB_TIMEOUT, what="the worker to write its pids")
    assert executor.state(job_id).state == RUNNING
    pids = json.loads(pids_file.read_text())
    procs = [psutil.Process(pid) for pid in pids]
    started = time.monotonic()
    executor.stop(job_id)
    took = time.monotonic() - started
    assert executor.state(job_id).state == STOPPED
    assert not [p for p in procs if running(p)], f"still running after stop ({took:.1f} s)"


def running(proc: psutil.Process) -> bool:
    """Whether the process still runs (a zombie has ended; its parent has not waited)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stop_of_a_pending_job_returns_at_once_and_the_job_ends_stopped(executor):
    """Ray cannot take a job off its queue: the stop waits for the job's supervisor, so the
    job ends STOPPED once the resources it waits for are free."""
    blocker = executor.submit(Submission(job_id=new_id("blocker"), needs=Needs(cpus=2),
                                         command=python("import time; time.sleep(2)")))
    queued = executor.submit(Submission(job_id=new_id("queued"), needs=Needs(cpus=2),
                                        command=python("import time; time.sleep(300)")))
    wait_for(lambda: executor.state(blocker).state == RUNNING, JOB_TIMEOUT,
             what="the blocker to run")
    assert executor.state(queued).state == PENDING
    started = time.monotonic()
    executor.stop(queued)
    assert time.monotonic() - started < 5
    assert finish(executor, blocker).state == SUCCEEDED
    assert finish(executor, queued).state == STOPPED


def test_an_id_ray_does_not_know_is_gone_without_logs(executor):
    job_id = new_id("never-submitted")
    assert executor.state(job_id).state == GONE
    assert executor.logs(job_id) == ""
    executor.stop(job_id)  # nothing to stop: no error


def test_a_submission_id_ray_has_seen_is_refused_by_name(executor, hello):
    sub, _, _ = hello
    with pytest.raises(ExecutorError, match=f"already has a job with submission id "
                                            f"{sub.job_id}"):
        executor.submit(sub)


def test_no_cluster_at_the_address_says_how_to_start_one_quickly():
    address = f"http://127.0.0.1:{free_port()}"
    executor = RayExecutor(address)
    started = time.monotonic()
    with pytest.raises(ExecutorError) as raised:
        executor.state("any")
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert message.startswith(f"no Ray cluster answers at {address} (")
    assert "`ray start --head`" in message and "ray_address" in message
    with pytest.raises(ExecutorError, match="no Ray cluster answers"):
        executor.submit(Submission(job_id=new_id("nowhere"), command=["true"]))


def test_an_address_that_is_not_the_dashboard_s_url_is_refused():
    with pytest.raises(ExecutorError, match="setting ray_address: expected"):
        RayExecutor("127.0.0.1:6379").state("any")


def test_ray_s_address_variable_may_not_silently_win(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    with pytest.raises(ExecutorError, match="RAY_ADDRESS=http://10.0.0.1:8265"):
        RayExecutor("http://127.0.0.1:8265").state("any")


def test_importing_the_executor_does_not_import_ray():
    code = ("import sys; import app.executors.ray; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(REPO), env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
