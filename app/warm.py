"""Warm workers, the scheduler's side: start the fork server (app/forkserver.py), fork jobs
through it, and learn their exit codes. See app/forkserver.py for what a forked job is."""

from __future__ import annotations

import json
import sys
import time

# Variables that differ from job to job; any other difference between a job's environment
# and the server's means modules imported in the server may have read a stale value (HF_HOME,
# plugin lists): the server is then restarted with the new environment. (PYTEST_CURRENT_TEST:
# pytest sets it per test, and nothing reads it at import.)
PER_JOB_ENV = ("CUDA_VISIBLE_DEVICES", "PYTEST_CURRENT_TEST")


class ForkServer:
    """Starts `python -m app.forkserver`, forks jobs through it, and learns their exit codes.
    Used by the scheduler of a long-lived server (lab setting warm_workers); a job that
    cannot be forked (the server still importing, restarting, or gone) starts cold."""

    REPLY_SECONDS = 10.0  # the longest wait for a fork's pid

    def __init__(self, log=None):
        import logging
        import queue
        import threading

        self.proc = None
        self.key: tuple | None = None
        self.ready = False
        self.ready_seconds: float | None = None
        self.exits: dict[int, int] = {}
        self.kept: list[list] = []  # the models the server keeps (app/warm_models.py)
        self.keeping = False  # the server is loading a model to keep: it forks nothing now
        self._replies: "queue.Queue[dict]" = queue.Queue()
        self._lock = threading.Lock()
        self._log = log or logging.getLogger(__name__)

    @staticmethod
    def _key(env: dict) -> tuple:
        return tuple(sorted((k, v) for k, v in env.items() if k not in PER_JOB_ENV))

    def usable(self, env: dict) -> bool:
        """Whether a server for this environment is ready to fork; if none is running for
        it, start one (it is ready a few seconds later) and say False meanwhile."""
        key = self._key(env)
        if self.proc is not None and (self.proc.poll() is not None or self.key != key):
            self._log.info("restarting the warm worker server (%s)",
                           "it exited" if self.proc.poll() is not None
                           else "the job environment changed")
            self.close()
        if self.proc is None:
            self._start(env, key)
            return False
        return self.ready

    def _start(self, env: dict, key: tuple) -> None:
        import subprocess
        import threading
        from pathlib import Path

        base = {k: v for k, v in env.items() if k not in PER_JOB_ENV}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.forkserver"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=base, cwd=str(Path(__file__).resolve().parent.parent),
            start_new_session=True)  # not in the server's group: a Ctrl-C there is not ours
        self.key, self.ready = key, False
        threading.Thread(target=self._read, args=(self.proc,), daemon=True,
                         name="weightsmith-forkserver").start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "ready" in message:
                self.ready_seconds = message["ready"]
                if proc is self.proc:
                    self.ready = True
                self._log.info("warm worker server ready (imports took %.1f s)",
                               message["ready"])
            elif "keeping" in message and proc is self.proc:
                self.keeping = True
            elif "kept" in message and proc is self.proc:
                self.kept, self.keeping = message["kept"], False
            elif "exit" in message:
                self.exits[message["exit"]] = message["code"]
            elif ("pid" in message or "stale" in message) and proc is self.proc:
                self._replies.put(message)
        if proc is self.proc:
            self.ready = False

    def fork(self, job_id: str, lab: str, cwd: str, log_path: str, env: dict,
             keep_mb: int = 0):
        """A WarmChild running the job, or None (then the caller starts it cold). `keep_mb`:
        the memory the server may keep models loaded in for later jobs (app/warm_models.py)."""
        import queue

        with self._lock:
            proc = self.proc
            if proc is None or not self.ready or proc.poll() is not None or self.keeping:
                return None  # (while it loads a model to keep, a fork would wait for it)
            while not self._replies.empty():  # a late reply of a fork given up on
                self._replies.get_nowait()
            # the server forks nothing after the deadline, which comes before this side gives
            # up: a job given up on here (and started cold) is never also forked there
            request = {"job": job_id, "lab": lab, "cwd": cwd, "log": log_path, "env": env,
                       "keep_mb": keep_mb, "deadline": time.time() + self.REPLY_SECONDS - 2}
            try:
                proc.stdin.write((json.dumps(request) + "\n").encode())
                proc.stdin.flush()
                reply = self._replies.get(timeout=self.REPLY_SECONDS)
            except (OSError, queue.Empty) as e:
                self._log.warning("warm worker server did not fork job %s (%s); restarting it",
                                  job_id, e or "no reply")
                self.close(kill=True)
                return None
            if reply.get("job") == job_id and reply.get("stale"):
                return None  # it was busy; the job starts cold
            if reply.get("job") != job_id or not isinstance(reply.get("pid"), int):
                self.close(kill=True)
                return None
            return WarmChild(self, reply["pid"])

    def close(self, kill: bool = False) -> None:
        """Stop the server (end of its stdin; `kill`: at once, for one that stopped answering,
        which must not fork anything more); its running jobs go on."""
        proc, self.proc, self.ready, self.keeping = self.proc, None, False, False
        if proc is None:
            return
        if kill:
            proc.kill()
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - stuck: it holds no job, so it may be killed
            proc.kill()
            proc.wait(timeout=5)


class WarmChild:
    """A forked job's process, seen like a Popen by the scheduler: `pid`, `poll()`, `wait()`.
    Its exit code comes from the server that forked and reaped it; once that server is gone,
    from whether the process still exists (code -1 when it does not)."""

    def __init__(self, server: ForkServer, pid: int):
        import psutil

        # the server that forked it: only that one reaps it and reports its code
        self.server, self.owner, self.pid, self.returncode = server, server.proc, pid, None
        try:
            self.started = psutil.Process(pid).create_time()
        except psutil.Error:
            self.started = None

    def poll(self):
        if self.returncode is not None:
            return self.returncode
        if self.pid in self.server.exits:
            self.returncode = self.server.exits.pop(self.pid)
        elif self.owner is None or self.owner.poll() is not None:
            from app.resources import process_alive

            if not process_alive(self.pid, self.started):
                self.returncode = -1
        return self.returncode

    def wait(self, timeout: float | None = None):
        import subprocess

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"job process {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode
