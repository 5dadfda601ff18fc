"""The `ray` executor: a job's worker runs on a Ray cluster, through Ray's Jobs API
(`ray.job_submission.JobSubmissionClient`, plain HTTP to the head's dashboard).

Why the Jobs API rather than `ray.init` and actors: the worker is plain Python
(`python -m app.worker ...`), not Ray code, so it runs as an ordinary process tree, the job's
entrypoint. Ray's job supervisor (an actor on a cluster node) starts it in a session of its
own, keeps its stdout and stderr as the job's logs, and on stop signals it and every process
below it (SIGTERM to each, SIGKILL after RAY_JOB_STOP_WAIT_TIME_S, 3 s by default); if the
supervisor itself dies, a watcher kills the entrypoint's whole process group. (Stop walks the
process tree, not the group: a process that left the tree, daemonised, is not stopped.) Our
server never joins the cluster as a driver: it holds no Ray runtime, a cluster restart does
not take it down, and a restarted server re-attaches by asking the head about the submission
id it stored.

Ray is imported only inside methods: the web app must not pay its import (about 0.7 s) at
start, and a lab on the `local` executor does not need Ray installed.
"""

from __future__ import annotations

import os
import shlex
import time
from contextlib import contextmanager

from app.executors import (FAILED, FINAL, GONE, PENDING, RUNNING, STOPPED, SUCCEEDED,
                           EngineState, EngineUnreachable, Executor, ExecutorError, Submission)

# Ray's JobStatus values -> ours
STATES = {"PENDING": PENDING, "RUNNING": RUNNING, "SUCCEEDED": SUCCEEDED, "FAILED": FAILED,
          "STOPPED": STOPPED}
# (connect, read) seconds for one HTTP request: the client sets none, so an address that
# drops packets would hang a call (and the scheduler's tick) for minutes.
HTTP_TIMEOUT = (5.0, 30.0)
STOP_TIMEOUT = 30.0  # seconds stop() waits for a final state
MESSAGE_CHARS = 300


class _Refused(Exception):
    """The head answered with an HTTP error: its status code and body."""

    def __init__(self, status: int, text: str):
        super().__init__(f"HTTP {status}: {text}")
        self.status = status
        self.text = text


def _client_class():
    """JobSubmissionClient with a timeout on every request and its HTTP errors as _Refused
    (the client raises a bare RuntimeError whose text is the only trace of the status code;
    an unknown id is a 404). Both hooks are the client's own request and error methods,
    which every public call goes through."""
    from ray.job_submission import JobSubmissionClient

    class Client(JobSubmissionClient):
        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", HTTP_TIMEOUT)
            return super()._do_request(method, endpoint, **kwargs)

        def _raise_error(self, r):
            raise _Refused(r.status_code, r.text)

    return Client


def _last_line(text: str) -> str:
    """The line that says what went wrong in a server's error body (often a traceback)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip(" .")]
    return lines[-1] if lines else text.strip()


def short_message(message: str | None, error_type: str | None) -> str:
    """A job's state message in one line: Ray's first line (its FAILED message goes on with
    20,000 characters of the log, which logs() already gives), a traceback's last line, or
    the error type when Ray said nothing."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    if not lines:
        return error_type or ""
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    line = line.split(", last available logs")[0]
    if error_type and error_type != "JOB_ENTRYPOINT_COMMAND_ERROR":
        line = f"{line} ({error_type})"
    return line if len(line) <= MESSAGE_CHARS else line[:MESSAGE_CHARS - 1] + "…"


def entrypoint(sub: Submission) -> str:
    """The shell line Ray runs (it runs the entrypoint with a shell): into the job's folder,
    then exec, so that the worker itself is the process Ray signals, not a shell above it.
    Without a cwd the worker starts where the cluster's `ray start` was run."""
    command = "exec " + shlex.join(sub.command)
    return f"cd {shlex.quote(sub.cwd)} && {command}" if sub.cwd else command


class RayExecutor(Executor):
    """A Ray cluster's Jobs API at `address`, the head's dashboard (http://HOST:8265)."""

    name = "ray"

    def __init__(self, address: str, stop_timeout: float = STOP_TIMEOUT):
        self.address = address.rstrip("/")
        self.stop_timeout = stop_timeout
        self._client = None

    # -- the engine's API, each call's errors as ExecutorError

    def submit(self, sub: Submission) -> str:
        needs = sub.needs
        if needs.nodes > 1:  # app/jobs.py refuses it at submit; a job queued before a
            # change of the lab's executor may still ask
            raise ExecutorError(f"job {sub.job_id} asks for {needs.nodes} nodes, and Ray runs "
                                f"a job's worker on one node: several nodes need the slurm "
                                f"executor (lab setting executor)")
        kwargs = {"entrypoint_num_cpus": needs.cpus}
        if needs.gpus > 0:
            kwargs["entrypoint_num_gpus"] = needs.gpus
        if needs.memory_bytes:
            kwargs["entrypoint_memory"] = int(needs.memory_bytes)
        env = dict(sub.env)
        if sub.stop_grace_s is not None:  # read by the job's supervisor, per job
            env["RAY_JOB_STOP_WAIT_TIME_S"] = str(max(1, round(sub.stop_grace_s)))
        try:
            with self._errors(f"submit job {sub.job_id}"):
                return self._connect().submit_job(
                    entrypoint=entrypoint(sub), submission_id=sub.job_id,
                    runtime_env={"env_vars": env}, **kwargs)
        except _Refused as refused:
            # Ray's own words, three tracebacks deep in a 500
            if "already exists" in refused.text:
                raise ExecutorError(
                    f"Ray at {self.address} already has a job with submission id "
                    f"{sub.job_id}: Ray never reuses one, even after the job ended") from None
            raise ExecutorError(f"Ray at {self.address} refused job {sub.job_id}: "
                                f"{_last_line(refused.text)}") from None

    def state(self, engine_id: str) -> EngineState:
        try:
            with self._errors(f"read the state of job {engine_id}"):
                info = self._connect().get_job_info(engine_id)
        except _Refused as refused:
            if refused.status == 404:
                return EngineState(GONE, f"Ray at {self.address} does not know job "
                                         f"{engine_id}")
            raise self._refusal(refused, f"read the state of job {engine_id}") from None
        status = str(info.status)
        if status not in STATES:
            raise ExecutorError(f"Ray at {self.address} reports job {engine_id} as {status}, "
                                f"a state this executor does not know (Ray's newer than it?)")
        error_type = str(info.error_type) if info.error_type else None
        # Ray fails a job still PENDING after RAY_JOB_START_TIMEOUT_SECONDS (900 s): its
        # entrypoint never ran, so the lab may queue it again
        return EngineState(STATES[status], short_message(info.message, error_type),
                           never_started=(error_type or "").endswith(
                               "JOB_SUPERVISOR_ACTOR_START_TIMEOUT"))

    def logs(self, engine_id: str) -> str:
        try:
            with self._errors(f"read the logs of job {engine_id}"):
                return self._connect().get_job_logs(engine_id)
        except _Refused as refused:
            if refused.status == 404:
                return ""
            raise self._refusal(refused, f"read the logs of job {engine_id}") from None

    def stop(self, engine_id: str) -> None:
        """Ask Ray to stop the job, then wait (up to stop_timeout) until it is in a final
        state: Ray's stop only queues the request, and the supervisor waits
        RAY_JOB_STOP_WAIT_TIME_S (3 s unless the job's env sets it) between SIGTERM and
        SIGKILL. An unknown id is already stopped.

        A PENDING job has no process yet, and Ray cannot take it off its queue: the stop
        waits for the job's supervisor, so once resources free up the worker starts and is
        stopped at once (RUNNING, then STOPPED). This returns at once for a PENDING job rather
        than wait for resources that may never come."""
        try:
            with self._errors(f"stop job {engine_id}"):
                self._connect().stop_job(engine_id)
        except _Refused as refused:
            if refused.status == 404:
                return
            raise self._refusal(refused, f"stop job {engine_id}") from None
        deadline = time.monotonic() + self.stop_timeout
        while True:
            current = self.state(engine_id)
            if current.state in FINAL or current.state == PENDING:
                return
            if time.monotonic() > deadline:
                raise ExecutorError(
                    f"Ray at {self.address} did not stop job {engine_id} within "
                    f"{self.stop_timeout:.0f} s (still {current.state}): its processes may "
                    f"still run")
            time.sleep(0.2)

    def close(self) -> None:
        self._client = None

    # -- connection and error translation

    def _connect(self):
        """The client, made on first use: making one imports Ray and asks the head for its
        version."""
        if self._client is None:
            if not self.address.startswith(("http://", "https://")):
                raise ExecutorError(f"setting ray_address: expected the Ray dashboard's "
                                    f"address, http://HOST:PORT (8265 by default), "
                                    f"got {self.address!r}")
            # Ray's client silently prefers these to the address it is given
            for variable in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
                value = os.environ.get(variable)
                if value:
                    if value.rstrip("/") != self.address:
                        raise ExecutorError(
                            f"the environment variable {variable}={value} would make Ray's "
                            f"client use that cluster instead of the lab setting ray_address "
                            f"({self.address}): unset it, or make the two agree")
                    break
            try:
                client_class = _client_class()
            except ImportError as error:
                raise ExecutorError(f"the lab's executor is ray, but Ray's job client is not "
                                    f"installed ({error}): pip install -e '.[ray]'") from None
            with self._errors("connect"):
                self._client = client_class(self.address)
        return self._client

    def _refusal(self, refused: _Refused, what: str) -> ExecutorError:
        return ExecutorError(f"Ray at {self.address} refused to {what}: HTTP {refused.status}: "
                             f"{_last_line(refused.text)}")

    @contextmanager
    def _errors(self, what: str):
        """Ray's and the HTTP library's exceptions as ExecutorError naming the address and
        what we were doing; _Refused goes through, for the caller to read its status."""
        try:
            yield
        except (_Refused, ExecutorError):
            raise
        except Exception as error:
            raise self._translate(error, what) from error

    def _translate(self, error: Exception, what: str) -> ExecutorError:
        import requests  # Ray's client raised: Ray, and so requests, is installed

        if isinstance(error, requests.exceptions.ReadTimeout):
            return EngineUnreachable(f"Ray at {self.address} did not answer within "
                                 f"{HTTP_TIMEOUT[1]:.0f} s when asked to {what}")
        if isinstance(error, (requests.exceptions.ConnectionError, ConnectionError)):
            return EngineUnreachable(
                f"no Ray cluster answers at {self.address} ({type(error).__name__} when "
                f"asked to {what}): start one with `ray start --head` or fix the lab setting "
                f"ray_address")
        return ExecutorError(f"Ray's job client failed to {what} at {self.address}: "
                             f"{type(error).__name__}: {error}")
