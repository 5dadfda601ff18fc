"""A cluster engine for the tests of the cluster path (app/executors) that needs no cluster:
each submission is a local process in its own session, started as a worker on another node
would be (tests/remote_node: it cannot open registry.db). The Ray executor's own tests run
against a real Ray head (tests/test_executor_ray.py)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from app.executors import (FAILED, GONE, RUNNING, STOPPED, SUCCEEDED, EngineState,
                           EngineUnreachable, Executor, ExecutorError)

GUARD = Path(__file__).resolve().parent / "remote_node"


class ProcessEngine(Executor):
    name = "ray"  # stands in for the lab's `executor = "ray"`

    def __init__(self, lab_root: Path, logs: Path, lab_seen_as: str | None = None):
        self.lab_root, self.log_dir = Path(lab_root), Path(logs)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.lab_seen_as = lab_seen_as  # the lab's path on the "node" (a wrong one: unmounted)
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopped: set[str] = set()
        self.down = False  # True: every call raises, as an unreachable engine
        self.hold: set[str] = set()  # ids never started: FAILED, never_started (no room)
        self.held: list[str] = []

    def _up(self):
        if self.down:
            raise EngineUnreachable("no engine answers (tests)")

    def submit(self, sub):
        self._up()
        if sub.job_id in self.procs or sub.job_id in self.held:
            raise ExecutorError(f"submission id {sub.job_id} is taken")
        if sub.job_id in self.hold:
            self.held.append(sub.job_id)
            return sub.job_id
        command = list(sub.command)
        if self.lab_seen_as:
            command[command.index("--lab") + 1] = self.lab_seen_as
        env = {**os.environ, **sub.env, "WEIGHTSMITH_TEST_REMOTE_LAB": str(self.lab_root)}
        env["PYTHONPATH"] = os.pathsep.join([str(GUARD), env.get("PYTHONPATH", "")])
        with open(self.log_dir / f"{sub.job_id}.log", "ab") as out:
            self.procs[sub.job_id] = subprocess.Popen(
                command, cwd=sub.cwd if Path(sub.cwd).is_dir() else "/", env=env,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        return sub.job_id

    def state(self, engine_id):
        self._up()
        if engine_id in self.held:
            return EngineState(FAILED, "no room on the cluster in time (tests)",
                               never_started=True)
        proc = self.procs.get(engine_id)
        if proc is None:
            return EngineState(GONE)
        code = proc.poll()
        if code is None:
            return EngineState(RUNNING)
        if engine_id in self.stopped:
            return EngineState(STOPPED, "stopped by request")
        return EngineState(SUCCEEDED if code == 0 else FAILED,
                           "" if code == 0 else f"the entrypoint exited with code {code}")

    def logs(self, engine_id):
        self._up()
        path = self.log_dir / f"{engine_id}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, engine_id):
        self._up()
        proc = self.procs.get(engine_id)
        if proc is None or proc.poll() is not None:
            return
        self.stopped.add(engine_id)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def forget(self, engine_id):
        """The engine lost the job (a cluster restart): kill it and drop its id."""
        proc = self.procs.pop(engine_id)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def close(self):
        pass
