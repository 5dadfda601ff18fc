"""Where a job's worker process runs: this machine (`local`, the scheduler's own
subprocesses, app/scheduler.py) or a cluster engine (`ray`: app/executors/ray.py; `slurm`:
app/executors/slurm.py), chosen by the lab setting `executor`.

A cluster executor only starts, watches and stops `python -m app.worker JOB --lab DIR
--remote` through the engine's own API; it keeps no state of its own (the engine's id of a
job is on the job's row, `engine_id`), so a restarted server re-attaches by asking the
engine. The remote worker never opens registry.db (SQLite's locks are not safe over a
network file system): it reads a snapshot the server wrote into the job folder and writes
its registry calls to the job folder's journal, which the server replays
(registry/journal.py, app/ingest.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.lab import EXECUTORS  # noqa: F401 - the settings check them

# engine states, as the scheduler reads them
PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, GONE = (
    "pending", "running", "succeeded", "failed", "stopped", "gone")
FINAL = (SUCCEEDED, FAILED, STOPPED, GONE)


class ExecutorError(RuntimeError):
    """The engine refused or could not be reached; the message says which and how to fix it."""


class EngineUnreachable(ExecutorError):
    """The engine did not answer (down, restarting, a timeout): try again later; a job it
    was handed may or may not have reached it."""


@dataclass
class Needs:
    """What one job asks of the engine."""

    gpus: int = 0          # on each node
    cpus: float = 1.0      # on each node
    memory_bytes: int | None = None  # on each node; None: the engine's default
    # machines the job spans: its worker launches one share on each (Slurm: srun in the
    # allocation; Ray: a placement group, app/worker.py); an engine that cannot give a job
    # several nodes refuses it
    nodes: int = 1


@dataclass
class EngineState:
    state: str  # one of PENDING .. GONE
    message: str = ""  # the engine's own words (a failure's reason), shown on the job
    # FAILED before the worker ever started (the engine gave up waiting for resources): the
    # lab may hand the job over again
    never_started: bool = False


@dataclass
class Submission:
    """A worker to start: the command line, its environment additions and working folder.
    `job_id` is the id the engine is to know it by: the lab's job id, or JOB-rN when the
    engine gave up on an earlier hand-over before starting it (Ray never reuses an id)."""

    job_id: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    needs: Needs = field(default_factory=Needs)
    stop_grace_s: float | None = None  # Stop: SIGTERM, then SIGKILL after this long


class Executor:
    """A cluster engine, through its own API. Every method may raise ExecutorError."""

    name = ""

    def submit(self, sub: Submission) -> str:
        """Hand the worker to the engine; returns the engine's id for it."""
        raise NotImplementedError

    def state(self, engine_id: str) -> EngineState:
        """Where the worker is now; GONE when the engine no longer knows the id."""
        raise NotImplementedError

    def logs(self, engine_id: str) -> str:
        """The worker's whole output so far, as the engine kept it ("" when none)."""
        raise NotImplementedError

    def stop(self, engine_id: str) -> None:
        """End the worker and every process it started; returns once the engine has it."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def executor_for(settings, name: str | None = None) -> Executor | None:
    """The cluster executor `name` (default: the lab's setting `executor`) with the lab's
    settings; None for `local`."""
    kind = name or settings.executor
    if kind == "local":
        return None
    if kind == "ray":
        from app.executors.ray import RayExecutor

        # Stop waits for the whole grace period (SIGTERM, then SIGKILL), and a little more
        return RayExecutor(settings.ray_address,
                           stop_timeout=settings.cancel_grace_seconds + 20)
    if kind == "slurm":
        from app.executors.slurm import SlurmExecutor

        return SlurmExecutor(partition=settings.slurm_partition, account=settings.slurm_account,
                             time_limit=settings.slurm_time_limit,
                             grace=settings.cancel_grace_seconds)
    raise ExecutorError(f"unknown executor {kind!r}; expected one of {', '.join(EXECUTORS)}")
