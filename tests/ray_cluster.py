"""A real single-node Ray cluster for the tests: `start_ray_head` starts a head (GCS, raylet,
dashboard with the Jobs API) on free local ports and stops exactly the processes it started;
`ray_address` is the session's head, shared by every test that imports the fixture.

Why not `ray stop --force` at the end: it kills every Ray process of the user on the machine
by name (`ray stop` matches process names and command lines), so it would also end a
developer's own cluster or a parallel test session's head. The head runs instead as
`ray start --head --block` in a session of its own, and the teardown freezes, then SIGKILLs,
that process's tree, its session and every process whose command line names this head's temp
folder (the GCS, the raylet and its workers, the dashboard's modules, a job's processes), then
checks that none is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import pytest

NOT_INSTALLED = "ray is not installed: pip install -e '.[ray]'"
START_TIMEOUT = 90.0  # seconds until the Jobs API answers; about 5 s on 2 cores
STOP_WAIT = 10.0  # seconds for the killed processes to end at teardown


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports nothing listens on right now (the kernel's picks, all held
    until the last is chosen: one at a time, the kernel may pick the same port twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    return free_ports(1)[0]


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _head_processes(starter_pid: int, temp_dir: str) -> list[psutil.Process]:
    """Every process of the head: the starter's tree, its session (the dashboard's modules,
    say, once the dashboard has died), and anything naming the temp folder (a worker whose
    raylet died; a job's entrypoint runs in a session of its own but lies in the tree)."""
    found = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        starter = psutil.Process(starter_pid)
        for proc in [starter, *starter.children(recursive=True)]:
            found[proc.pid] = proc
    for proc in psutil.process_iter(["cmdline"]):
        if _session(proc.pid) == starter_pid or \
                any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
            found.setdefault(proc.pid, proc)
    found.pop(os.getpid(), None)
    return list(found.values())


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (a zombie has ended: only its parent's wait is missing)."""
    out = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
    return out


def _stop_head(starter: subprocess.Popen, temp_dir: str) -> None:
    """Freeze every process of the head, then SIGKILL them all, and fail if any survives.

    SIGKILL at once, as `ray stop --force` does, because a SIGTERM does not end the head
    promptly: the raylet and `ray start --block` outlive it by more than 10 s once the GCS has
    gone. SIGSTOP first, so that no process starts another (the raylet a worker, a job's
    supervisor its entrypoint) between the listing and the kill."""
    frozen: dict[int, psutil.Process] = {}
    while True:
        found = {p.pid: p for p in _head_processes(starter.pid, temp_dir)}
        for proc in frozen.values():  # children started before their parent froze
            with contextlib.suppress(psutil.NoSuchProcess):
                found.update((c.pid, c) for c in proc.children(recursive=True))
        new = [p for pid, p in found.items() if pid not in frozen]
        if not new:
            break
        for proc in new:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGSTOP)
            frozen[proc.pid] = proc
    for proc in frozen.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    starter.wait(timeout=STOP_WAIT)  # ours to reap; the others' zombies are init's
    deadline = time.monotonic() + STOP_WAIT
    while (left := _alive(list(frozen.values()) + _head_processes(starter.pid, temp_dir))) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, "Ray processes outlived the test head:\n" + "\n".join(
        f"{p.pid} {' '.join(p.cmdline())[:200]}" for p in left)


class _StartFailed(Exception):
    """`ray start` exited before the Jobs API answered."""


def _launch(log_path: Path, temp_dir: str) -> tuple[subprocess.Popen, str]:
    """Start `ray start --head --block` on free ports; return it and the Jobs API address
    once the API answers."""
    import requests

    options = ("--port", "--dashboard-port", "--ray-client-server-port",
               "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
               "--runtime-env-agent-port", "--metrics-export-port")
    ports = dict(zip(options, free_ports(len(options))))
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--num-cpus", "2", "--num-gpus", "0", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
               "--disable-usage-stats", "--object-store-memory", "200000000",
               "--temp-dir", temp_dir]
    for option, port in ports.items():
        command += [option, str(port)]
    # Every job inherits the head's environment: without the WEIGHTSMITH_ variables of the
    # test that happened to start it (its lab, its plugins), and without RAY_ADDRESS.
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("WEIGHTSMITH_")
           and name not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    with open(log_path, "w") as log:
        # a session of its own: Ctrl-C in the terminal running pytest does not reach it
        starter = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if starter.poll() is not None:
                raise _StartFailed(f"`ray start` exited {starter.returncode} (its output: "
                                   f"{log_path}):\n{log_path.read_text()[-3000:]}")
            try:  # what JobSubmissionClient.list_jobs asks, with a timeout (it sets none)
                answer = requests.get(f"{address}/api/jobs/", timeout=5)
                answer.raise_for_status()
                return starter, address
            except requests.RequestException as error:  # refused; 404 before the module loads
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"the Ray head's Jobs API did not answer at {address} within "
                        f"{START_TIMEOUT:.0f} s ({error}):\n{log_path.read_text()[-3000:]}")
                time.sleep(0.25)
    except BaseException:
        _stop_head(starter, temp_dir)  # and whatever it started before it failed
        raise


@contextlib.contextmanager
def start_ray_head(log_dir: Path, attempts: int = 3):
    """Start a one-node Ray head on free local ports, yield its Jobs API address
    (http://127.0.0.1:PORT) once the API answers, and stop every process of it after.

    A head whose `ray start` exits early is tried again on other ports, with a warning (a
    port found free may be taken before Ray binds it), up to `attempts` times. Ray's own temp
    folder is a short one under /tmp, not under log_dir: Ray puts Unix sockets in it, and a
    socket's path may not exceed 107 bytes. `ray start`'s output goes to
    log_dir/ray-start-N.log."""
    try:
        import ray.job_submission  # noqa: F401
    except ImportError:
        pytest.skip(NOT_INSTALLED)

    log_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        try:
            starter, address = _launch(log_dir / f"ray-start-{attempt}.log", temp_dir)
            break
        except _StartFailed as failed:
            shutil.rmtree(temp_dir)
            if attempt == attempts:
                raise AssertionError(f"no Ray head after {attempts} tries: {failed}") from None
            warnings.warn(f"Ray head, try {attempt} of {attempts}: {failed}")
        except BaseException:
            shutil.rmtree(temp_dir)
            raise
    try:
        yield address
    finally:
        _stop_head(starter, temp_dir)
        shutil.rmtree(temp_dir)


# Pytest makes a session fixture imported into two test modules two fixtures, each started
# once: the modules share this one head instead (about 800 MiB and 5 s to start), stopped
# when the last of them is done.
_SHARED: dict = {}


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """The Jobs API address of one Ray head shared by the whole test session."""
    if not _SHARED:
        stack = contextlib.ExitStack()
        address = stack.enter_context(start_ray_head(tmp_path_factory.mktemp("ray-head")))
        _SHARED.update(address=address, stack=stack, users=0)
    _SHARED["users"] += 1
    try:
        yield _SHARED["address"]
    finally:
        _SHARED["users"] -= 1
        if not _SHARED["users"]:
            stack = _SHARED.pop("stack")
            _SHARED.clear()
            stack.close()
