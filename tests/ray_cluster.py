"""A real Ray cluster for the tests: `start_ray_head` starts a head (GCS, raylet, dashboard
with the Jobs API) on free local ports and stops exactly the processes it started;
`ray_address` is the session's head, shared by every test that imports the fixture.
`start_ray_node` adds a worker node (its own raylet, ports and temp folder) to a head, and
`ray_two_nodes` is a cluster of two nodes on loopback of its own, for one test module (jobs
spanning nodes), leaving the shared head alone.

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


# the GCS address (HOST:PORT, what `ray start --address` joins) of each head started here, by
# its Jobs API address
GCS_ADDRESS: dict[str, str] = {}


def _ray_env() -> dict[str, str]:
    """Every job inherits the node's environment: without the WEIGHTSMITH_ variables of the
    test that happened to start it (its lab, its plugins), and without RAY_ADDRESS."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith("WEIGHTSMITH_")
            and name not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}


def _launch(log_path: Path, temp_dir: str, num_cpus: int = 2) -> tuple[subprocess.Popen, str]:
    """Start `ray start --head --block` on free ports; return it and the Jobs API address
    once the API answers."""
    import requests

    options = ("--port", "--dashboard-port", "--ray-client-server-port",
               "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
               "--runtime-env-agent-port", "--metrics-export-port")
    ports = dict(zip(options, free_ports(len(options))))
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--num-cpus", str(num_cpus), "--num-gpus", "0",
               "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
               "--disable-usage-stats", "--object-store-memory", "200000000",
               "--temp-dir", temp_dir]
    for option, port in ports.items():
        command += [option, str(port)]
    env = _ray_env()
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
                GCS_ADDRESS[address] = f"127.0.0.1:{ports['--port']}"
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
def start_ray_head(log_dir: Path, attempts: int = 3, num_cpus: int = 2):
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
            starter, address = _launch(log_dir / f"ray-start-{attempt}.log", temp_dir,
                                       num_cpus)
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
        GCS_ADDRESS.pop(address, None)
        _stop_head(starter, temp_dir)
        shutil.rmtree(temp_dir)


def _alive_nodes(address: str) -> int:
    """How many nodes the head at `address` (its Jobs API) counts as alive (its state API)."""
    import requests

    try:  # a slow answer on a loaded machine: asked again
        answer = requests.get(f"{address}/api/v0/nodes", params={"limit": 100}, timeout=10)
        answer.raise_for_status()
        return sum(1 for node in answer.json()["data"]["result"]["result"]
                   if node.get("state") == "ALIVE")
    except (requests.RequestException, ValueError, KeyError):
        return -1


@contextlib.contextmanager
def start_ray_node(address: str, log_dir: Path, num_cpus: int = 1):
    """Add a worker node of `num_cpus` CPUs to the head at `address` (its Jobs API, started by
    start_ray_head), on this machine's loopback: `ray start --address=GCS --block` on free
    ports, with a temp folder and a session of its own; yields once the head counts it alive,
    and stops its processes after exactly as the head's are (_stop_head), never `ray stop`.
    The two nodes share one kernel, one file system and loopback: a job placed on both proves
    Ray's placement and the launches, not a network between hosts."""
    log_dir.mkdir(parents=True, exist_ok=True)
    # the head counts itself once it is up: at least one node before this one joins
    wanted = max(_alive_nodes(address), 1) + 1
    temp_dir = tempfile.mkdtemp(prefix="ray-node-", dir="/tmp")
    options = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
               "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
               "--runtime-env-agent-port")
    command = [sys.executable, "-m", "ray.scripts.scripts", "start",
               f"--address={GCS_ADDRESS[address]}", "--block", "--num-cpus", str(num_cpus),
               "--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
               "--object-store-memory", "100000000", "--temp-dir", temp_dir]
    for option, port in zip(options, free_ports(len(options))):
        command += [option, str(port)]
    log_path = log_dir / "ray-node.log"
    with open(log_path, "w") as log:
        starter = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=_ray_env(),
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while _alive_nodes(address) < wanted:
            if starter.poll() is not None:
                raise AssertionError(f"the Ray worker node's `ray start` exited "
                                     f"{starter.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the Ray worker node did not join the head within "
                                     f"{START_TIMEOUT:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield
    finally:
        _stop_head(starter, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_two_nodes(tmp_path_factory):
    """The Jobs API address of a Ray cluster of two nodes for one test module: a head of 2
    CPUs (a job of 2 processes fits on it) and a worker node of 1, so a placement group of
    one 1-CPU bundle per node (STRICT_SPREAD) has exactly two nodes, and one of three none.
    Its own head, not the shared one: the other modules' jobs never see the extra node."""
    folder = tmp_path_factory.mktemp("ray-two-nodes")
    with start_ray_head(folder / "head", num_cpus=2) as address, \
            start_ray_node(address, folder / "node", num_cpus=1):
        yield address


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
