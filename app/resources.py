"""What the machine has for jobs: its GPUs, and whether a job's process is still alive.

Shared by app/jobs.py (submit checks a job's GPUs against the lab's, cancel finds a job's
process) and app/scheduler.py (slots, reaping), so that neither imports the other.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import psutil


def detect_gpus() -> list[int]:
    """Physical GPU indices: those in the server's CUDA_VISIBLE_DEVICES when it is set,
    else every GPU nvidia-smi reports (no torch import in the server)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(x) for x in visible.split(",") if x.strip().isdigit()]
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [int(x) for x in out.stdout.split() if x.strip().isdigit()]


def process_alive(pid: int | None, started: float | None) -> bool:
    """Whether the process that ran a job still exists (pid reuse is caught by start time)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes in a process group."""
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def kill_tree(pid: int, grace: float) -> None:
    """SIGTERM the process group `pid` leads and every descendant, then SIGKILL what is left
    after `grace` seconds (a job's worker on the server; a node's launch on Ray,
    app/executors/ray.py).

    The process is started as a session leader, so its pid is the group id. Descendants that
    moved to a group of their own are found through the process tree and killed too.
    """
    try:
        root = psutil.Process(pid)
        tree = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    group = {p.pid: p for p in group_members(pid)}
    targets = {**{p.pid: p for p in tree}, **group}
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    for p in tree:  # one SIGTERM each: only descendants that left the group get a direct one
        if p.pid not in group:
            try:
                p.terminate()
            except psutil.Error:
                pass
    _, alive = psutil.wait_procs(list(targets.values()), timeout=grace)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and group_members(pid):
        time.sleep(0.1)
    for p in alive + group_members(pid):
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    psutil.wait_procs(alive, timeout=5)


def free_port() -> int:
    """A TCP port free on this machine now, for torchrun's store (machine rank 0's): taken
    just before the launch (a port probed earlier could be drawn by the imports' outgoing
    connections meanwhile). app/worker.py on a Slurm node; the Ray node actor."""
    import socket

    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]
