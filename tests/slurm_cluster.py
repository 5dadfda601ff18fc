"""A real Slurm for the tests: `start_slurm` starts munged, slurmctld and two slurmd from a
temp folder of their own, on free local ports, and stops exactly the processes it started;
the `slurm_cluster` fixture (and `slurm_conf`, its slurm.conf) is the session's cluster,
shared by every test that imports them. Needs Debian's `slurm-wlm` and `munge`, and
root (slurmd starts each job as its user); without them the tests that use it are skipped.

Nothing of the machine's own Slurm or munge is used or touched: the key, munged's socket,
slurm.conf, the state and spool folders all lie in the temp folder, and the client commands
(sbatch, squeue, scancel) reach this cluster through SLURM_CONF, which the fixture sets in
os.environ for the session and puts back after. Only the daemons' binaries are the system's.

The default partition has one node, which plays a node of a real cluster as far as one
machine can: slurmd runs in a mount namespace of its own where `SlurmCluster.hidden` (a folder
in the temp folder) is an empty tmpfs, so a lab made under it is seen by the server (this
process) but not by the node: a node that does not mount the lab's storage. (Without
`unshare`, `hidden` is None.)

A second node, a second slurmd on this same machine (Slurm's multiple-slurmd set-up: each
slurmd started with -N NAME, listening on the port its NodeName line gives), joins the first
in the partition TWO_NODES, for the jobs that span nodes. Both claim every CPU of the machine
(overcommitted), and both see one file system, as nodes that mount the same shared storage.
Jobs that name no partition never land on it, so the one-node tests see one node.

Teardown: every process of the cluster is frozen, then SIGKILLed, and none may be left:
the three daemons' sessions, and every process whose environment names this cluster's
slurm.conf (slurmd's job step daemons, slurmstepd, and the jobs they started, which Slurm puts
in sessions of their own, even one that escaped its job: proctrack/linuxproc, the only
process tracking that works without cgroups, follows the process tree only).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.ray_cluster import free_ports

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo")
INSTALL = "apt-get install slurm-wlm munge"
START_TIMEOUT = 60.0  # seconds until the node is idle; about 3 s on 2 cores
STOP_WAIT = 10.0  # seconds for the killed processes to end at teardown
# Slurm's KillWait: SIGTERM to SIGKILL when a job is cancelled. Longer than the tests' grace
# by far, so that a test can tell the executor's own SIGKILL (after its grace) from Slurm's
KILL_WAIT = 10
TWO_NODES = "two"  # the partition of both nodes


class SlurmUnavailable(Exception):
    """Slurm cannot run here (not installed, not root): the reason, and how to fix it."""


@dataclass
class SlurmCluster:
    conf: Path  # slurm.conf: SLURM_CONF for the client commands
    dir: Path  # the temp folder everything lies in
    node: str  # the default partition's node's name
    cpus: int  # on each node
    hidden: Path | None  # a folder the nodes do not see (None: no mount namespace here)
    env: dict[str, str] = field(default_factory=dict)  # what os.environ gets: SLURM_CONF
    nodes: tuple[str, ...] = ()  # every node: `node`, then the second (partition TWO_NODES)

    def logs(self, chars: int = 3000) -> str:
        """The last lines of each daemon's log, for a failure message."""
        out = []
        for path in sorted(self.dir.glob("*.log")):
            if path.stem.split("-")[0] in DAEMONS:  # slurmd.log, slurmd-2.log...
                text = path.read_text(errors="replace")
                # MPI plugin noise: Debian's build looks for PMIx, which nothing here uses
                text = "\n".join(line for line in text.splitlines() if "pmix" not in line)
                out.append(f"--- {path}:\n{text[-chars:]}")
        return "\n".join(out)


def _which(name: str) -> str | None:
    # the daemons live in /usr/sbin, which a non-login PATH may lack
    return shutil.which(name, path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def unavailable() -> str | None:
    """Why Slurm cannot run here, or None."""
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return f"Slurm's {', '.join(missing)} not installed: {INSTALL}"
    if os.geteuid() != 0:
        return "a test Slurm needs root: slurmd starts every job as its user"
    return None


def _node_hardware() -> tuple[int, int]:
    """(CPUs, RealMemory in MiB) as slurmd sees this machine, the memory a bit under it:
    a node that reports less memory than slurm.conf says is drained by slurmctld."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True,
                         timeout=30).stdout
    cpus = re.search(r"\bCPUs=(\d+)", out)
    memory = re.search(r"\bRealMemory=(\d+)", out)
    return (int(cpus.group(1)) if cpus else os.cpu_count() or 1,
            int(int(memory.group(1)) * 0.9) if memory else 1000)


def _config(root: Path, nodes: list[str], cpus: int, memory: int, ports: list[int]) -> str:
    """slurm.conf: the controller at ports[0], node i's slurmd at ports[i + 1]."""
    host = socket.gethostname()
    return "\n".join([
        "ClusterName=weightsmith-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",  # each NodeName line gives its own below
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge.socket'}",  # our munged, not the system's
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root / 'state'}",
        # %n: the node's name, one of each per slurmd on this machine
        f"SlurmdSpoolDir={root / 'spool' / '%n'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"PlugStackConfig={root / 'plugstack.conf'}",  # empty: not /etc/slurm's
        "MailProg=/bin/true",
        # no cgroups in a container: the process tree, and no task binding
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",  # no slurmdbd: sacct says so
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SchedulerType=sched/backfill",
        # a batch job is scheduled when it comes, not up to 3 s later (Slurm's default lets
        # a site batch the scheduling of many submissions): the tests' jobs start in ~1 s
        "SchedulerParameters=batch_sched_delay=0",
        # CPUs, not whole nodes: two 1-CPU jobs run side by side on the one node
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "MinJobAge=300",
        f"KillWait={KILL_WAIT}",
        "ReturnToService=2",
        *(f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} "
          f"CPUs={cpus} RealMemory={memory} State=UNKNOWN"
          for node, port in zip(nodes, ports[1:])),
        f"PartitionName=main Nodes={nodes[0]} Default=YES MaxTime=INFINITE State=UP",
        f"PartitionName={TWO_NODES} Nodes={','.join(nodes)} MaxTime=INFINITE State=UP",
        ""])


def conf_with_port(conf: Path, folder: Path, port: int, *extra: str) -> Path:
    """A copy of slurm.conf in `folder` whose controller is at `port` (where nothing
    answers, say), with `extra` lines: for the client commands' view of a controller that
    is down."""
    text = "".join(f"SlurmctldPort={port}\n" if line.startswith("SlurmctldPort=") else line
                   for line in conf.read_text().splitlines(keepends=True))
    path = folder / "slurm.conf"
    path.write_text(text + "".join(f"{line}\n" for line in extra))
    return path


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _cluster_processes(daemons: list[subprocess.Popen], conf: Path) -> list[psutil.Process]:
    """Every process of the cluster: the daemons, their sessions and trees, and whatever
    names our slurm.conf in its environment (slurmstepd and the jobs: Slurm gives each job
    SLURM_CONF), except this process and its own children (they got SLURM_CONF from the
    session's os.environ: they are the tests', not the cluster's)."""
    sessions = {d.pid for d in daemons}
    found: dict[int, psutil.Process] = {}
    for daemon in daemons:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(daemon.pid)
            for p in [proc, *proc.children(recursive=True)]:
                found[p.pid] = p
    marked = []
    for proc in psutil.process_iter():
        try:
            session = os.getsid(proc.pid)
        except OSError:
            continue
        if session in sessions:
            found.setdefault(proc.pid, proc)
        elif _names(proc.pid, conf):
            marked.append(proc)
    tests = {os.getpid()}
    with contextlib.suppress(psutil.NoSuchProcess):
        tests |= {p.pid for p in psutil.Process().children(recursive=True)} - set(found)
    for proc in marked:
        if proc.pid not in tests:
            found.setdefault(proc.pid, proc)
    return list(found.values())


def _names(pid: int, conf: Path) -> bool:
    """Whether the process's environment has SLURM_CONF=conf."""
    return f"SLURM_CONF={conf}".encode() in _environ(pid).split(b"\0")


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
    return out


def _stop(daemons: list[subprocess.Popen], conf: Path) -> None:
    """Freeze every process of the cluster, then SIGKILL them all, and fail if any survives.
    SIGSTOP first, so that none starts another (slurmd a job, a job a child) between the
    listing and the kill; SIGKILL rather than SIGTERM, because nothing of the cluster is
    kept (slurmctld would save its state, slurmd would wait KillWait for its jobs)."""
    frozen: dict[int, psutil.Process] = {}
    while True:
        found = {p.pid: p for p in _cluster_processes(daemons, conf)}
        for proc in list(frozen.values()):  # children started before their parent froze
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
    for daemon in daemons:  # ours to reap; the others' zombies are init's
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.wait(timeout=STOP_WAIT)
    deadline = time.monotonic() + STOP_WAIT
    while (left := _alive(list(frozen.values()) + _cluster_processes(daemons, conf))) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, "processes of the test Slurm outlived it:\n" + "\n".join(
        f"{p.pid} {' '.join(p.cmdline())[:200]}" for p in left)


def _spawn(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "ab") as out:
        # a session of its own: Ctrl-C in pytest's terminal does not reach it, and the
        # teardown finds what it started by the session
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def _can_hide(folder: Path) -> bool:
    """Whether a mount namespace with a tmpfs over `folder` can be made here (root in a
    container without CAP_SYS_ADMIN cannot)."""
    if _which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                            'mount -t tmpfs -o size=1m blind "$1"', "sh", str(folder)],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


class _StartFailed(Exception):
    """A daemon exited before the node was idle (a port taken meanwhile, say)."""


def _launch(root: Path, env: dict, nodes: list[str], cpus: int, memory: int,
            hidden: Path | None) -> list[subprocess.Popen]:
    conf = root / "slurm.conf"
    conf.write_text(_config(root, nodes, cpus, memory, free_ports(1 + len(nodes))))
    daemons = [_spawn([_which("munged"), "--foreground",
                       # munged refuses to start where it finds a path insecure (a
                       # group-writable folder above the key, say): this one is throwaway
                       "--force",
                       f"--socket={root / 'munge.socket'}", f"--key-file={root / 'munge.key'}",
                       f"--pid-file={root / 'munged.pid'}", f"--seed-file={root / 'munged.seed'}",
                       f"--log-file={root / 'munged.file.log'}"], root / "munged.log", env)]
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (root / "munge.socket").exists():
            if daemons[0].poll() is not None or time.monotonic() > deadline:
                raise _StartFailed(f"munged exited {daemons[0].returncode}")
            time.sleep(0.05)
        daemons.append(_spawn([_which("slurmctld"), "-D", "-f", str(conf)],
                              root / "slurmctld.log", env))
        for i, node in enumerate(nodes):
            (root / "spool" / node).mkdir()
            slurmd = [_which("slurmd"), "-D", "-f", str(conf), "-N", node]
            if hidden is not None:  # the node's own view of the file system: `hidden` is empty
                slurmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                          'mount -t tmpfs -o size=1m blind "$1" && shift && exec "$@"', "sh",
                          str(hidden), *slurmd]
            daemons.append(_spawn(slurmd, root / ("slurmd.log" if i == 0 else
                                                  f"slurmd-{i + 1}.log"), env))
        names = list(DAEMONS) + ["slurmd"] * (len(nodes) - 1)
        while True:
            for name, daemon in zip(names, daemons):
                if daemon.poll() is not None:
                    raise _StartFailed(f"{name} exited {daemon.returncode}")
            # a line per node and partition: the first node is in two
            answer = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %T"],
                                    capture_output=True, text=True, env=env, timeout=30)
            if set(answer.stdout.splitlines()) == {f"{node} idle" for node in nodes}:
                return daemons
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the test Slurm's nodes {', '.join(nodes)} were not idle within "
                    f"{START_TIMEOUT:.0f} s (sinfo: "
                    f"{answer.stdout.strip() or answer.stderr.strip()})")
            time.sleep(0.2)
    except BaseException:
        _stop(daemons, conf)
        raise


@contextlib.contextmanager
def start_slurm(attempts: int = 3):
    """Start a two-node Slurm (munged, slurmctld, two slurmd) in a temp folder of its own, set
    SLURM_CONF in os.environ, yield a SlurmCluster once the nodes are idle, and stop every
    process of it after (and put SLURM_CONF back). Raises SlurmUnavailable when Slurm cannot
    run here. A start whose daemon exits early is tried again on other ports.

    The temp folder is a short one under /tmp: slurmd puts a Unix socket per job step in its
    spool folder, and a socket's path may not exceed 107 bytes."""
    reason = unavailable()
    if reason:
        raise SlurmUnavailable(reason)
    cpus, memory = _node_hardware()
    node = socket.gethostname().split(".")[0]
    nodes = [node, f"{node}-2"]
    for attempt in range(1, attempts + 1):
        root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        root.chmod(0o755)  # munged's socket must be reachable by every user
        for folder in ("state", "spool", "hidden"):
            (root / folder).mkdir()
        (root / "plugstack.conf").write_text("")
        key = root / "munge.key"
        key.write_bytes(os.urandom(128))  # munged refuses a key anyone else may read
        key.chmod(0o400)
        hidden = root / "hidden" if _can_hide(root / "hidden") else None
        env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        try:
            daemons = _launch(root, env, nodes, cpus, memory, hidden)
            break
        except _StartFailed as failed:
            logs = SlurmCluster(root / "slurm.conf", root, node, cpus, hidden).logs()
            shutil.rmtree(root, ignore_errors=True)
            if attempt == attempts:
                raise AssertionError(f"no test Slurm after {attempts} tries: {failed}\n"
                                     f"{logs}") from None
        except AssertionError as failed:
            logs = SlurmCluster(root / "slurm.conf", root, node, cpus, hidden).logs()
            shutil.rmtree(root, ignore_errors=True)
            raise AssertionError(f"{failed}\n{logs}") from None
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
    cluster = SlurmCluster(root / "slurm.conf", root, node, cpus, hidden,
                           env={"SLURM_CONF": str(root / "slurm.conf")}, nodes=tuple(nodes))
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before
        _stop(daemons, cluster.conf)
        shutil.rmtree(root, ignore_errors=True)


# Pytest makes a session fixture imported into two test modules two fixtures, each started
# once: the modules share this one cluster instead, stopped when the last of them is done.
_SHARED: dict = {}


@pytest.fixture(scope="session")
def slurm_cluster():
    """The session's Slurm (skips the test where Slurm cannot run)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    if not _SHARED:
        stack = contextlib.ExitStack()
        _SHARED.update(cluster=stack.enter_context(start_slurm()), stack=stack, users=0)
    _SHARED["users"] += 1
    try:
        yield _SHARED["cluster"]
    finally:
        _SHARED["users"] -= 1
        if not _SHARED["users"]:
            stack = _SHARED["stack"]
            _SHARED.clear()
            stack.close()


@pytest.fixture(scope="session")
def slurm_conf(slurm_cluster):
    """The session's slurm.conf (SLURM_CONF is set to it for the whole session)."""
    return slurm_cluster.conf
