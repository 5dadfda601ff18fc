"""What the machine has for jobs: its GPUs, and whether a job's process is still alive.

Shared by app/jobs.py (submit checks a job's GPUs against the lab's, cancel finds a job's
process) and app/scheduler.py (slots, reaping), so that neither imports the other.
"""

from __future__ import annotations

import os
import shutil
import subprocess

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
