"""The `slurm` executor against a real one-node Slurm (tests/slurm_cluster.py), through
SlurmExecutor alone: a job's output, environment and folder; a failure's reason; a stop that
gives the worker its grace and ends it and the process it started; a pending job's reason and
its stop; what Slurm says of an id it does not know, of a partition it does not have, of a
node that cannot see the job's folder, and when no controller answers. The lab's three
Slurm settings are checked without Slurm."""

import json
import os
import socket
import sys
import time
import uuid

import psutil
import pytest

from app.executors import (FAILED, FINAL, GONE, PENDING, RUNNING, STOPPED, SUCCEEDED,
                           EngineUnreachable, ExecutorError, Needs, Submission)
from app.executors.slurm import SlurmExecutor, batch_script
from tests.conftest import wait_for
from tests.ray_cluster import free_port
from tests.slurm_cluster import (KILL_WAIT, conf_with_port, slurm_cluster,  # noqa: F401
                                 slurm_conf)

JOB_TIMEOUT = 60.0  # a job here takes 1 to 3 s
GRACE = 2.0
# what the environment must carry through the batch script untouched
AWKWARD = "two words, 'single' and \"double\" quotes,\na newline, $HOME, `date` and \\ ; |"


def new_id(what: str) -> str:
    return f"test-{what}-{uuid.uuid4().hex[:8]}"


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def finish(executor: SlurmExecutor, engine_id: str):
    return wait_for(lambda: (s := executor.state(engine_id)).state in FINAL and s,
                    JOB_TIMEOUT, interval=0.1, what=f"Slurm job {engine_id} to end")


def running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def executor(slurm_cluster):  # noqa: F811
    return SlurmExecutor(grace=GRACE)


@pytest.fixture(scope="module")
def hello(executor, tmp_path_factory):
    """One job that prints a line, an awkward environment variable and its working folder
    (a path with a space and a %): its submission, engine id, final state and logs."""
    cwd = tmp_path_factory.mktemp("job folder 100%")
    sub = Submission(job_id=new_id("hello"), cwd=str(cwd),
                     env={"WEIGHTSMITH_PROBE": AWKWARD},
                     command=python("import json, os; print('hello from the worker'); "
                                    "print('probe=' + json.dumps(os.environ['WEIGHTSMITH_PROBE']));"
                                    " print('cwd=' + os.getcwd())"))
    engine_id = executor.submit(sub)
    state = finish(executor, engine_id)
    return sub, engine_id, state, executor.logs(engine_id)


def test_a_worker_that_exits_0_succeeds_and_its_output_is_the_logs(hello):
    sub, engine_id, state, logs = hello
    name, _, number = engine_id.partition("@")
    assert name == sub.job_id and number.isdigit()
    assert state.state == SUCCEEDED, (state, logs)
    assert "hello from the worker" in logs
    assert os.path.isfile(os.path.join(sub.cwd, f"slurm-{number}.out"))


def test_the_environment_arrives_intact_through_the_batch_script(hello):
    sub, engine_id, state, logs = hello
    assert f"probe={json.dumps(AWKWARD)}\n" in logs, logs


def test_the_worker_runs_in_the_submission_s_folder(hello):
    sub, engine_id, state, logs = hello
    assert f"cwd={sub.cwd}\n" in logs


def test_a_bare_name_finds_the_job_slurm_numbered(executor, hello):
    """After a submit that timed out the lab knows only the name it handed over."""
    sub, engine_id, state, logs = hello
    assert executor.state(sub.job_id).state == SUCCEEDED
    assert "hello from the worker" in executor.logs(sub.job_id)


def test_a_worker_that_exits_3_fails_with_slurm_s_reason_in_one_line(executor, tmp_path):
    engine_id = executor.submit(Submission(
        job_id=new_id("exit3"), cwd=str(tmp_path),
        command=python("import sys; print('about to fail'); sys.exit(3)")))
    state = finish(executor, engine_id)
    assert state.state == FAILED and not state.never_started
    assert "FAILED" in state.message and "exit code 3" in state.message, state.message
    assert "\n" not in state.message and len(state.message) <= 300
    assert "about to fail" in executor.logs(engine_id)


SLEEPER = ("import json, os, signal, subprocess, sys, time\n"
           "{handler}\n"
           "child = subprocess.Popen(['sleep', '300'])\n"
           "path = sys.argv[1]\n"
           "open(path + '.tmp', 'w').write(json.dumps([os.getpid(), child.pid]))\n"
           "os.replace(path + '.tmp', path)\n"
           "time.sleep(300)\n")


def start_sleeper(executor, tmp_path, handler: str):
    pids_file = tmp_path / "pids.json"
    engine_id = executor.submit(Submission(
        job_id=new_id("stop"), cwd=str(tmp_path),
        command=[*python(SLEEPER.format(handler=handler)), str(pids_file)]))
    wait_for(pids_file.exists, JOB_TIMEOUT, what="the worker to write its pids")
    assert executor.state(engine_id).state == RUNNING
    return engine_id, [psutil.Process(pid) for pid in json.loads(pids_file.read_text())]


def test_stop_sends_sigterm_first_and_the_worker_may_clean_up(executor, tmp_path):
    cleaned = tmp_path / "cleaned"
    engine_id, procs = start_sleeper(executor, tmp_path, (
        f"def bye(*_):\n    open({str(cleaned)!r}, 'w').write('x')\n    sys.exit(0)\n"
        f"signal.signal(signal.SIGTERM, bye)"))
    started = time.monotonic()
    executor.stop(engine_id)
    took = time.monotonic() - started
    assert cleaned.exists() and took < GRACE + 5, took
    assert executor.state(engine_id).state in FINAL
    assert not [p for p in procs if running(p)], "still running after stop"


def test_stop_kills_a_worker_that_ignores_sigterm_after_the_grace(executor, tmp_path):
    """The worker and its child (which inherits the ignored SIGTERM) both end, by SIGKILL,
    once the grace is over, not after Slurm's own KillWait (a cancel's SIGKILL)."""
    engine_id, procs = start_sleeper(executor, tmp_path,
                                     "signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    started = time.monotonic()
    executor.stop(engine_id)
    took = time.monotonic() - started
    assert GRACE <= took < GRACE + KILL_WAIT / 2, took
    assert executor.state(engine_id).state in FINAL
    assert not [p for p in procs if running(p)], "still running after stop"


def test_a_pending_job_says_why_and_its_stop_takes_it_off_the_queue(
        executor, slurm_cluster, tmp_path):  # noqa: F811
    blocker = executor.submit(Submission(
        job_id=new_id("blocker"), cwd=str(tmp_path), needs=Needs(cpus=slurm_cluster.cpus),
        command=python("import time; time.sleep(60)")))
    queued = executor.submit(Submission(job_id=new_id("queued"), cwd=str(tmp_path),
                                        command=python("import time; time.sleep(60)")))
    try:
        wait_for(lambda: executor.state(blocker).state == RUNNING, JOB_TIMEOUT,
                 what="the blocker to run")
        state = wait_for(lambda: (s := executor.state(queued)).message and s, JOB_TIMEOUT,
                         what="the queued job's reason")
        assert state.state == PENDING and state.message.startswith("Resources"), state
        started = time.monotonic()
        executor.stop(queued)
        assert time.monotonic() - started < 5
        assert executor.state(queued).state == STOPPED
    finally:
        executor.stop(blocker)
    assert executor.state(blocker).state in FINAL


def test_an_id_slurm_does_not_know_is_gone_without_logs(executor, hello):
    """Nor is a number Slurm gave a job of another name ours (a cluster that lost its state
    numbers jobs from 1 again): the lab must not follow or stop someone else's job."""
    number = hello[1].partition("@")[2]
    for engine_id in (f"{new_id('never')}@999999", new_id("never-submitted"),
                      f"{new_id('another')}@{number}"):
        state = executor.state(engine_id)
        assert state.state == GONE and "does not know" in state.message
        assert executor.logs(engine_id) == ""
        executor.stop(engine_id)  # nothing to stop: no error


def test_a_partition_slurm_does_not_have_is_refused_with_slurm_s_words(
        slurm_cluster, tmp_path):  # noqa: F811
    executor = SlurmExecutor(partition="nowhere")
    with pytest.raises(ExecutorError) as raised:
        executor.submit(Submission(job_id=new_id("bad"), cwd=str(tmp_path), command=["true"]))
    message = str(raised.value)
    assert "Slurm refused job" in message and "partition" in message.lower()
    assert "lab setting slurm_partition = 'nowhere'" in message


def test_gpus_and_memory_are_asked_of_slurm(slurm_cluster, executor, tmp_path):  # noqa: F811
    """This cluster has no GPUs (no GresTypes) and not a terabyte: Slurm refuses both, so
    the options did reach it."""
    for needs, words in ((Needs(gpus=1), "gres"),
                         (Needs(memory_bytes=1 << 40), "memory specification")):
        with pytest.raises(ExecutorError, match="Slurm refused job") as raised:
            executor.submit(Submission(job_id=new_id("big"), cwd=str(tmp_path),
                                       command=["true"], needs=needs))
        assert words in str(raised.value).lower(), raised.value


def test_a_node_that_cannot_see_the_job_folder_fails_with_that_message(
        executor, slurm_cluster):  # noqa: F811
    if slurm_cluster.hidden is None:
        pytest.skip("no mount namespace here: the node sees every folder")
    cwd = slurm_cluster.hidden / new_id("lab") / "jobs" / "job-1"
    cwd.mkdir(parents=True)  # we see it; the node, in its own mount namespace, does not
    engine_id = executor.submit(Submission(job_id=new_id("blind"), cwd=str(cwd),
                                           command=python("print('never runs')")))
    state = finish(executor, engine_id)
    assert state.state == FAILED and not state.never_started
    assert "may not see the lab folder" in state.message, state.message
    assert "storage that every node mounts" in state.message
    assert executor.logs(engine_id) == ""


def test_no_controller_at_the_port_is_unreachable_quickly(
        slurm_conf, tmp_path, monkeypatch):  # noqa: F811
    # MessageTimeout=1: the client commands give up at once (10 s by default, twice)
    monkeypatch.setenv("SLURM_CONF", str(conf_with_port(slurm_conf, tmp_path, free_port(),
                                                         "MessageTimeout=1")))
    executor = SlurmExecutor()
    started = time.monotonic()
    with pytest.raises(EngineUnreachable) as raised:
        executor.state("job-1@1")
    assert time.monotonic() - started < 10
    assert "no Slurm controller answers" in str(raised.value)
    assert "Unable to contact slurm controller" in str(raised.value)
    with pytest.raises(EngineUnreachable):
        executor.submit(Submission(job_id=new_id("nowhere"), cwd=str(tmp_path),
                                   command=["true"]))
    with pytest.raises(EngineUnreachable):
        executor.stop("job-1@1")


def test_a_controller_that_does_not_answer_times_out_as_unreachable(
        slurm_conf, tmp_path, monkeypatch):  # noqa: F811
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("SLURM_CONF", str(conf_with_port(
            slurm_conf, tmp_path, silent.getsockname()[1])))
        executor = SlurmExecutor(timeout=1.0)
        started = time.monotonic()
        with pytest.raises(EngineUnreachable, match="did not answer within 1 s"):
            executor.state("job-1@1")
        assert time.monotonic() - started < 5


# -- without Slurm

def test_missing_client_commands_say_how_to_install_them(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, squeue... here
    monkeypatch.delenv("SLURM_CONF", raising=False)
    executor = SlurmExecutor()
    for call in (lambda: executor.state("job-1@1"), lambda: executor.stop("job-1"),
                 lambda: executor.submit(Submission(job_id="job-1", command=["true"]))):
        with pytest.raises(ExecutorError) as raised:
            call()
        assert not isinstance(raised.value, EngineUnreachable)
        assert "is not installed here" in str(raised.value)
        assert "apt-get install slurm-client" in str(raised.value)


def test_a_slurm_conf_that_is_not_there_is_said_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))
    with pytest.raises(ExecutorError, match="SLURM_CONF=.*missing.conf is not a file"):
        SlurmExecutor().state("job-1@1")


def test_the_batch_script_exports_then_execs_and_refuses_odd_names():
    script = batch_script(Submission(job_id="j", command=["python", "-m", "x y"],
                                     env={"A_1": "it's"}))
    assert script.splitlines() == ["#!/bin/bash", "export A_1='it'\"'\"'s'",
                                   "exec python -m 'x y'"]
    for name in ("1A", "A-B", "A;rm -rf /", ""):
        with pytest.raises(ExecutorError, match="environment variable name"):
            batch_script(Submission(job_id="j", command=["true"], env={name: "x"}))


def test_the_lab_s_slurm_settings_are_checked(tmp_path, monkeypatch):
    from app.executors import executor_for
    from app.lab import Settings, SettingsError

    (tmp_path / "lab.toml").write_text('executor = "slurm"\nslurm_partition = "gpu.a100-x_1"\n'
                                       'slurm_account = "proj_42"\n'
                                       'slurm_time_limit = "2-00:00:00"\n')
    settings = Settings.load(tmp_path)
    executor = executor_for(settings)
    assert isinstance(executor, SlurmExecutor)
    assert (executor.partition, executor.account, executor.time_limit) == \
        ("gpu.a100-x_1", "proj_42", "2-00:00:00")
    for good in ("30", "30:00", "1:00:00", "2-12", "2-12:30", "2-00:00:00", "UNLIMITED",
                 "infinite"):
        monkeypatch.setenv("WEIGHTSMITH_SLURM_TIME_LIMIT", good)
        assert Settings.load(tmp_path).slurm_time_limit == good
    monkeypatch.setenv("WEIGHTSMITH_SLURM_PARTITION", "gpu,cpu.long")  # the first that can
    assert Settings.load(tmp_path).slurm_partition == "gpu,cpu.long"
    monkeypatch.delenv("WEIGHTSMITH_SLURM_PARTITION")
    for name, bad in (("slurm_time_limit", "1h"), ("slurm_time_limit", "1:00:00:00"),
                      ("slurm_time_limit", "--wrap=x"), ("slurm_partition", "a b"),
                      ("slurm_partition", "x" * 65), ("slurm_partition", "a,"),
                      ("slurm_partition", ",a"), ("slurm_partition", "a,,b"),
                      ("slurm_partition", ",".join("p" * 17)),
                      ("slurm_time_limit", "UNLIMITED-1"), ("slurm_account", "--qos=high"),
                      ("slurm_account", "a,b")):
        monkeypatch.setenv(f"WEIGHTSMITH_{name.upper()}", bad)
        with pytest.raises(SettingsError) as raised:
            Settings.load(tmp_path)
        assert str(raised.value).startswith(f"setting {name}: expected ")
        assert repr(bad) in str(raised.value)
        monkeypatch.delenv(f"WEIGHTSMITH_{name.upper()}")
    (tmp_path / "lab.toml").write_text("slurm_partition = 3\n")
    with pytest.raises(SettingsError, match="setting slurm_partition: expected a partition name"):
        Settings.load(tmp_path)
    (tmp_path / "lab.toml").write_text("")
    assert Settings.load(tmp_path).slurm_partition == ""  # the cluster's default


def test_exit_codes_read_as_words():
    from app.executors.slurm import _exit_words

    # squeue: the raw wait status; sacct: CODE:SIGNAL
    assert _exit_words("768") == "exit code 3" and _exit_words("3:0") == "exit code 3"
    assert _exit_words("9") == "killed by signal 9 (SIGKILL)"
    assert _exit_words("0:15") == "killed by signal 15 (SIGTERM)"
    assert _exit_words("0") == "" and _exit_words("0:0") == "" and _exit_words("") == ""


def test_logs_read_a_bounded_tail_of_a_regular_file_only(tmp_path):
    from app.executors.slurm import read_tail

    big = tmp_path / "slurm-1.out"
    big.write_text("".join(f"line {i}\n" for i in range(200_000)))  # 2.6 MB
    tail = read_tail(big, limit=1 << 20)
    assert tail.endswith("line 199999\n") and tail.startswith("line ")
    assert len(tail.encode()) <= 1 << 20
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert read_tail(fifo) == ""  # no writer: an open or read would hang
    link = tmp_path / "link"
    link.symlink_to(big)
    assert read_tail(link) == "" and read_tail(tmp_path / "missing") == ""
