"""The scheduler's wake-up (issue 21): a job queued from any process, or a worker that ends,
starts the next pass at once instead of at the next poll. Each scheduler here polls every
30 s, so a job that starts within seconds was started by the wake-up, not by the poll.

The wake-up is best-effort: a submit with no scheduler, with a killed scheduler's socket file,
or with a scheduler that reads nothing, still queues its job and returns at once; a lab where
the socket cannot be bound still runs its jobs on the poll.
"""

import contextlib
import logging
import socket
import subprocess
import sys
import threading
from datetime import datetime

import pytest

from app import jobs
from app.lab import Lab
from app.scheduler import WAKE_SOCKET, Scheduler
from tests.conftest import REPO, cli_env, wait_for

pytestmark = pytest.mark.slow  # workers are subprocesses

LONG_POLL = 30.0
PROMPT = 5.0  # seconds: generous for a loaded 2-core machine, and far below LONG_POLL


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@contextlib.contextmanager
def scheduling(lab: Lab, poll_seconds: float = LONG_POLL):
    """A scheduler running in a thread as the server runs it, yielded once its first pass is
    over (so that a job queued afterwards waits for a wake-up or the next poll). On exit, it
    must stop promptly even though its poll is long."""
    scheduler = Scheduler(lab, poll_seconds=poll_seconds)
    assert scheduler.acquire()
    first_pass = threading.Event()
    tick = scheduler.tick

    def tick_and_tell(*args, **kwargs):
        try:
            tick(*args, **kwargs)
        finally:
            first_pass.set()

    scheduler.tick = tick_and_tell
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        assert first_pass.wait(60), "the scheduler's first pass did not end"
        yield scheduler
    finally:
        stop.set()
        thread.join(PROMPT)
        stopped = not thread.is_alive()
        for proc in scheduler.children.values():  # no worker outlives the test
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        scheduler.release()
    assert stopped, f"the scheduler did not stop within {PROMPT} s of `stop` (poll " \
                    f"{poll_seconds} s)"


def sleeper(tmp_path, name: str, seconds: float = 0.2) -> dict:
    return {"seconds": seconds, "pid_file": str(tmp_path / f"{name}.pid")}


def job_row(lab: Lab, job_id: str) -> dict:
    with lab.registry() as reg:
        return reg.job(job_id)


def started(lab: Lab, job_id: str, timeout: float = 20.0) -> dict:
    return wait_for(lambda: (lambda row: row if row["started_at"] else None)(
        job_row(lab, job_id)), timeout, interval=0.05, what=f"job {job_id} to start")


def finished(lab: Lab, job_id: str, timeout: float = 120.0) -> dict:
    return wait_for(lambda: (lambda row: row if row["finished_at"] else None)(
        job_row(lab, job_id)), timeout, interval=0.1, what=f"job {job_id} to finish")


def test_a_job_queued_by_another_process_starts_at_once(lab, tmp_path):
    lab.registry().close()  # the lab exists before the CLI opens it
    config = tmp_path / "sleep.yaml"
    config.write_text(f"seconds: 0.2\npid_file: {tmp_path / 'cli.pid'}\n")
    with scheduling(lab):
        # `weightsmith run` while the server runs: the submit is in another process
        proc = subprocess.run([sys.executable, "-m", "app.cli", "run", "test_sleep",
                               str(config)], capture_output=True, text=True, timeout=120,
                              env=cli_env(lab.root), cwd=str(REPO))
        assert proc.returncode == 0, proc.stderr
        job_id = proc.stderr.split("queued ")[1].split()[0]
        row = started(lab, job_id)
        waited = parse_time(row["started_at"]) - parse_time(row["created_at"])
        assert waited < PROMPT, f"queued {waited:.2f} s with a {LONG_POLL} s poll"
        assert finished(lab, job_id)["status"] == "succeeded"


def test_a_job_that_ends_lets_the_next_one_start_at_once(lab, tmp_path):
    assert lab.settings.cpu_slots == 1  # the second job waits for the first's slot
    with scheduling(lab):
        first = jobs.submit(lab, "test_sleep", sleeper(tmp_path, "first", seconds=1.0))
        second = jobs.submit(lab, "test_sleep", sleeper(tmp_path, "second"))
        assert started(lab, first["id"])["status"] == "running"
        assert job_row(lab, second["id"])["status"] == "queued"
        # the first job's worker exits: no submit, no cancel, only its process ending
        done = finished(lab, first["id"])
        assert done["status"] == "succeeded", done["error"]
        row = started(lab, second["id"])
        waited = parse_time(row["started_at"]) - parse_time(done["finished_at"])
        assert waited < PROMPT, f"the next job waited {waited:.2f} s with a {LONG_POLL} s poll"
        assert finished(lab, second["id"])["status"] == "succeeded"


def test_a_cancel_lets_the_next_job_start_at_once(lab, tmp_path):
    first = jobs.submit(lab, "test_sleep", sleeper(tmp_path, "long", seconds=120))
    second = jobs.submit(lab, "test_sleep", sleeper(tmp_path, "next"))
    # an earlier scheduler (one `run --wait` pass) starts the first job and lets go: the
    # server's scheduler adopts it, so only the cancel's wake-up, not a worker of its own
    # ending, can tell it that the slot is free
    earlier = Scheduler(lab)
    assert earlier.acquire()
    earlier.tick()
    earlier.release()
    assert list(earlier.children) == [first["id"]]
    try:
        with scheduling(lab) as scheduler:
            assert not scheduler.children
            assert job_row(lab, second["id"])["status"] == "queued"
            wait_for(lambda: (tmp_path / "long.pid").exists(), 60, what="the first job to run")
            assert jobs.cancel(lab, first["id"])["status"] == "cancelled"
            cancelled = parse_time(job_row(lab, first["id"])["finished_at"])
            row = started(lab, second["id"])
            waited = parse_time(row["started_at"]) - cancelled
            assert waited < PROMPT, f"the next job waited {waited:.2f} s after the cancel"
            finished(lab, second["id"])
    finally:
        earlier.children[first["id"]].wait(timeout=30)


def test_a_submit_with_no_scheduler_queues_and_returns_at_once(lab, tmp_path):
    assert not jobs.wake_scheduler(lab)  # no socket file at all
    job = jobs.submit(lab, "test_sleep", sleeper(tmp_path, "a"))
    assert job["status"] == "queued"
    # a killed server's socket file: bound once, nobody reads it any more
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(lab.root / WAKE_SOCKET))
    dead.close()
    assert (lab.root / WAKE_SOCKET).exists()
    assert not jobs.wake_scheduler(lab)
    assert jobs.submit(lab, "test_sleep", sleeper(tmp_path, "b"))["status"] == "queued"
    # a scheduler that is stuck (bound, reading nothing): its queue fills after a few
    # datagrams, and a blocking send would then hang every submit
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stuck:
        (lab.root / WAKE_SOCKET).unlink()
        stuck.bind(str(lab.root / WAKE_SOCKET))
        answers = []
        waking = threading.Thread(target=lambda: answers.extend(
            jobs.wake_scheduler(lab) for _ in range(2000)), daemon=True)
        waking.start()
        waking.join(PROMPT)
        assert not waking.is_alive(), "a wake-up blocked on a scheduler that reads nothing"
        assert answers == [True] * 2000
        assert jobs.submit(lab, "test_sleep", sleeper(tmp_path, "c"))["status"] == "queued"
        assert stuck.recv(64) == b"\0"
    with lab.registry() as reg:
        assert [j["status"] for j in reg.queued_jobs()] == ["queued"] * 3


def test_a_stale_socket_file_is_replaced_and_removed_on_release(lab, tmp_path):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # left by a killed server
    dead.bind(str(lab.root / WAKE_SOCKET))
    dead.close()
    assert not jobs.wake_scheduler(lab)
    with scheduling(lab):
        assert jobs.wake_scheduler(lab)  # the new scheduler's socket, at the same path
        job = jobs.submit(lab, "test_sleep", sleeper(tmp_path, "a"))
        row = started(lab, job["id"])
        assert parse_time(row["started_at"]) - parse_time(row["created_at"]) < PROMPT
        finished(lab, job["id"])
    assert not (lab.root / WAKE_SOCKET).exists()
    assert not jobs.wake_scheduler(lab)


def test_a_lab_path_too_long_for_a_socket_runs_its_jobs_on_the_poll(lab_dir, tmp_path,
                                                                   caplog):
    root = tmp_path / ("a-long-folder-name-" * 4) / ("another-long-one-" * 3) / "lab"
    assert len(str(root / WAKE_SOCKET)) > 108  # more than an AF_UNIX address holds
    lab = Lab(root)  # (lab_dir: the test plugins)
    with caplog.at_level(logging.WARNING, logger="app.scheduler"):
        with scheduling(lab, poll_seconds=0.2):
            assert not jobs.wake_scheduler(lab)
            job = jobs.submit(lab, "test_sleep", sleeper(tmp_path, "a"))
            assert finished(lab, job["id"])["status"] == "succeeded"
    assert "no wake-up socket" in caplog.text and "too long" in caplog.text


def test_a_file_in_the_sockets_place_is_left_alone(lab, caplog):
    (lab.root / WAKE_SOCKET).mkdir()  # something that is no socket holds its name
    (lab.root / WAKE_SOCKET / "keep").write_text("")
    with caplog.at_level(logging.WARNING, logger="app.scheduler"):
        with scheduling(lab):
            assert not jobs.wake_scheduler(lab)
    assert "no wake-up socket" in caplog.text
    assert (lab.root / WAKE_SOCKET / "keep").exists()  # released without touching it
