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

A job spanning several nodes (`nodes: N`, issue 22) runs its launching worker as the
entrypoint, reserving nothing, and that worker asks Ray, as a driver, for a placement group
of N bundles, one per node (STRICT_SPREAD), each bundle holding one `NodeProcess` actor that
runs that node's accelerate launch: `RayNodes`, used by app/worker.py's launch().

Ray is imported only inside methods: the web app must not pay its import (about 0.7 s) at
start, and a lab on the `local` executor does not need Ray installed.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

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
# a job spanning several nodes: seconds its launching worker gets, beyond the lab's
# cancel_grace_seconds, between Ray's SIGTERM and SIGKILL to stop every node's ranks (each
# node gives its own ranks the grace, all nodes at once) and record the end
NODES_STOP_MARGIN_S = 30


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
        env = dict(sub.env)
        if needs.nodes > 1:
            # The entrypoint is only the launching worker: it imports the inputs, writes the
            # ranks' registry copy, then waits while the placement group it asks for (one
            # bundle of `cpus` CPUs and `gpus` GPUs on each of N nodes: RayNodes) runs the
            # ranks. It reserves nothing: STRICT_SPREAD needs a bundle's CPUs free on N
            # distinct nodes, and a CPU (even 0.01 of one) the entrypoint held on a node
            # would be one that node's bundle could not have, so on a cluster of exactly N
            # such nodes the job could never be placed. Ray runs a job that reserves nothing
            # on the head node. What tells the worker it is on Ray: the job row's executor
            # (the scheduler records "ray" before the snapshot) and RAY_ADDRESS, which Ray's
            # job supervisor sets for every entrypoint (the GCS address, for ray.init).
            kwargs = {}
            grace = sub.stop_grace_s if sub.stop_grace_s is not None else 10
            # read by the job's supervisor: the worker stops every node before it ends
            env["RAY_JOB_STOP_WAIT_TIME_S"] = str(max(1, round(grace)) + NODES_STOP_MARGIN_S)
        else:
            kwargs = {"entrypoint_num_cpus": needs.cpus}
            if needs.gpus > 0:
                kwargs["entrypoint_num_gpus"] = needs.gpus
            if needs.memory_bytes:
                kwargs["entrypoint_memory"] = int(needs.memory_bytes)
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


# ------------------------------------------------------ a job spanning several nodes
PLACEMENT_TIMEOUT_S = 120.0  # default wait for the placement group (see RayNodes)
ACTORS_TIMEOUT_S = 120.0  # for the placed actors to start (a new Ray worker each)

# The watchdog a NodeProcess starts next to each node's launch. It double-forks first: Ray
# SIGKILLs the direct children of an actor it kills (kill_child_processes_on_worker_exit; it
# kills the actors of a driver that died), and the launch's ranks sit in sessions of their
# own, out of that reach. It remembers every process it saw in the launch's tree (a rank
# whose torchrun was killed first has left the tree by then) and, once the launch or the
# actor has gone, ends those still running (SIGTERM, SIGKILL after the grace): after a
# launch that ended by itself none is left, since torchrun ends its ranks. psutil's
# Process checks its creation time, so a reused pid is never taken for one of ours.
_WATCHDOG = """
import os, sys, time, psutil
if os.fork():
    os._exit(0)
os.setsid()
try:
    actor, root = psutil.Process(int(sys.argv[1])), psutil.Process(int(sys.argv[2]))
except psutil.Error:
    sys.exit(0)
grace = float(sys.argv[3])
seen = {}
while True:
    try:
        if not root.is_running() or root.status() == psutil.STATUS_ZOMBIE:
            break
        seen.update((p.pid, p) for p in [root, *root.children(recursive=True)])
        if not actor.is_running() or actor.status() == psutil.STATUS_ZOMBIE:
            break
    except psutil.Error:
        break
    time.sleep(1)
left = [p for p in seen.values() if p.is_running()]
for p in left:
    try: p.terminate()
    except psutil.Error: pass
_, alive = psutil.wait_procs(left, timeout=grace)
for p in alive:
    try: p.kill()
    except psutil.Error: pass
"""


class NodesFailed(Exception):
    """A node's launch of a job spanning several nodes ended badly: which node, its exit
    code, and what the node said about it (empty: see the ranks' error files)."""

    def __init__(self, node: int, code: int, note: str = ""):
        super().__init__(note or f"node {node}'s launch exited with code {code}")
        self.node, self.code, self.note = node, code, note


class NodesCancelled(BaseException):
    """A Stop (SIGTERM to the launching worker) while RayNodes was placing or running the job:
    the nodes have been (or are being) stopped. app/worker.py turns it into JobCancelled.
    A BaseException, as JobCancelled is: an `except Exception` must not swallow a Stop."""


class NodeProcess:
    """One node's share of a job spanning several nodes: a Ray actor in bundle i of the job's
    placement group (RayNodes makes it remote, with the bundle's CPUs and GPUs, which it
    holds while it lives; Ray sets CUDA_VISIBLE_DEVICES to the bundle's GPUs, and its
    child inherits that). `run` starts the node's launch command, a plain process tree
    (`app.worker JOB --node-launch`, which execs the node's accelerate launch), in a session
    of its own with its output appended to the job's log.txt on the shared lab folder, and
    waits for it; `stop` ends that tree. Threaded (max_concurrency 2): stop runs while run
    waits."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._root = None  # psutil.Process of _proc, taken at its start
        self._stopped = False

    def where(self) -> dict:
        """This node: its address, Ray node id and host name."""
        import ray

        return {"ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def free_port(self) -> int:
        """A port free on this node now (machine rank 0's), asked just before the launch."""
        from app.resources import free_port

        return free_port()

    def run(self, command: list[str], job_dir: str, header: str, grace: float) -> tuple:
        """(exit code, what went wrong when the node said something itself)."""
        folder = Path(job_dir)
        if not folder.is_dir():  # node_launch checks the ranks' snapshot itself, in the log
            return 2, (f"node {socket.gethostname()} cannot see the lab's job folder {folder}: "
                       f"the lab folder must be on storage that every node of the cluster "
                       f"mounts at the same path; see the README's \"Running on a cluster\"")
        with self._lock:
            if self._stopped:
                return 143, ""
            with open(folder / "log.txt", "ab") as log:
                log.write(f"{header}\n".encode())
                log.flush()
                try:
                    self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                                  stdout=log, stderr=subprocess.STDOUT,
                                                  cwd=folder, start_new_session=True)
                except OSError as error:
                    return 2, (f"node {socket.gethostname()} could not start `{command[0]}`: "
                               f"{error}")
            import psutil

            with suppress(psutil.Error):
                self._root = psutil.Process(self._proc.pid)
            # the watchdog's first process exits at once (the double fork): reaped here
            subprocess.run([sys.executable, "-c", _WATCHDOG, str(os.getpid()),
                            str(self._proc.pid), str(grace)], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        return self._proc.wait(), ""

    def stop(self, grace: float) -> None:
        with self._lock:
            self._stopped = True
            root = self._root
        # a launch that has ended ended its ranks itself (torchrun's agent); the check on
        # the psutil.Process taken at the start makes sure the pid is still the launch's
        # (a session leader: its group and its tree, where torchrun's ranks sit in sessions
        # of their own, are what kill_tree ends)
        if root is not None and root.is_running():
            from app.resources import kill_tree

            kill_tree(root.pid, grace)
            with suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)


class RayNodes:
    """The nodes of one job on Ray, as a context manager of the launching worker (the job's
    entrypoint, app/worker.py launch()): on entry, connects to the cluster as a driver
    (RAY_ADDRESS, set by Ray's job supervisor), places a group of `nodes` bundles of
    {CPU: cpus, GPU: gpus} with STRICT_SPREAD (each on a different node; the wait is
    bounded, PLACEMENT_TIMEOUT_S or WEIGHTSMITH_RAY_PLACEMENT_TIMEOUT seconds: a cluster with
    too few nodes fails the job, saying how many it has, rather than hang), and starts one
    NodeProcess actor in each bundle. `run` starts every node's launch and waits; if one
    fails, it raises NodesFailed after the others were stopped (as srun's --kill-on-bad-exit
    does). On exit, whatever still runs is stopped (SIGTERM, then SIGKILL after `grace`:
    a Stop's JobCancelled comes through here), the group is removed and the driver
    disconnects."""

    def __init__(self, job_id: str, job_dir: Path, nodes: int, cpus: int, gpus: int,
                 grace: float, log):
        self.job_id, self.job_dir, self.nodes = job_id, Path(job_dir), nodes
        self.bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        self.grace, self.log = grace, log
        self.places: list[dict] = []
        self._actors: list = []
        self._group = None
        self._ours = None  # the worker's SIGTERM handler, while RayNodes has its own
        self._cancelled = False  # a Stop came
        self._quiet = True  # a Stop now is only noted (inside Ray's calls, the clean-up)

    def __enter__(self) -> "RayNodes":
        import logging

        import ray

        address = os.environ.get("RAY_ADDRESS", "")
        if not address:
            raise ExecutorError(f"field 'nodes': got {self.nodes}; this job's worker was not "
                                f"started by Ray's job supervisor (no RAY_ADDRESS), so it "
                                f"cannot ask Ray for the nodes")
        # A Stop's SIGTERM must not raise inside Ray's calls: Ray checks for signals inside
        # ray.wait and turns any exception but KeyboardInterrupt and SystemExit raised there
        # into a SystemError. So, while RayNodes is in use, the SIGTERM handler only notes the
        # Stop inside Ray's calls (and during the clean-up) and raises NodesCancelled
        # elsewhere; the loops check the note every second. __exit__ puts the worker's own
        # handler back and gives it the Stop (JobCancelled). ray.init installs a handler of
        # its own (sys.exit), replaced right after.
        self._ours = signal.getsignal(signal.SIGTERM)
        self._quiet = True
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            # log_to_driver off: the actors' own output is Ray's; each node's launch writes
            # into the job's log itself
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except SystemExit:  # Ray's handler: a Stop during the init
            self._cancelled = True
        except Exception as error:  # noqa: BLE001 - Ray's many ways of not connecting
            signal.signal(signal.SIGTERM, self._ours)
            raise ExecutorError(f"field 'nodes': got {self.nodes}; the worker could not "
                                f"connect to Ray at {address}: {type(error).__name__}: "
                                f"{error}") from None
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._check()
            self._place()
            self._check()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self._quiet = False  # the worker imports the inputs meanwhile: a Stop raises at once
        return self

    def _on_sigterm(self, signum, frame) -> None:
        first = not self._cancelled
        self._cancelled = True
        if first and not self._quiet:
            self._quiet = True
            raise NodesCancelled()

    def _check(self) -> None:
        if self._cancelled:
            raise NodesCancelled()

    def _place(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        raw = os.environ.get("WEIGHTSMITH_RAY_PLACEMENT_TIMEOUT", "")
        try:
            timeout = float(raw) if raw else PLACEMENT_TIMEOUT_S
        except ValueError:
            raise ExecutorError(f"environment variable WEIGHTSMITH_RAY_PLACEMENT_TIMEOUT: "
                                f"expected seconds, got {raw!r}") from None
        self.log(f"asking Ray for {self.nodes} nodes: a placement group of {self.nodes} "
                 f"bundles {self.bundle}, one per node (STRICT_SPREAD)")
        self._group = placement_group([dict(self.bundle) for _ in range(self.nodes)],
                                      strategy="STRICT_SPREAD")
        if not self._wait([self._group.ready()], timeout):
            alive = [n for n in ray.nodes() if n.get("Alive")]
            fits = [n for n in alive if all(n.get("Resources", {}).get(k, 0) >= v
                                            for k, v in self.bundle.items())]
            raise ExecutorError(
                f"field 'nodes': got {self.nodes}; Ray could not place the job on "
                f"{self.nodes} different nodes ({self.bundle} on each) within {timeout:.0f} s: "
                f"the cluster has {len(alive)} alive node{'s' if len(alive) != 1 else ''}, "
                f"{len(fits)} of them with that much in all")
        actor = ray.remote(NodeProcess)
        self._actors = [actor.options(
            num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0), max_concurrency=2,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self._group, placement_group_bundle_index=i)).remote()
            for i in range(self.nodes)]
        where = [a.where.remote() for a in self._actors]
        if not self._wait(where, ACTORS_TIMEOUT_S):
            raise ExecutorError(f"field 'nodes': got {self.nodes}; Ray placed the job's "
                                f"nodes but did not start their launchers within "
                                f"{ACTORS_TIMEOUT_S:.0f} s")
        try:
            self.places = ray.get(where)
        except ray.exceptions.RayError as error:
            raise ExecutorError(f"Ray could not start the launcher of a node of the job: "
                                f"{short_message(str(error), None)}") from None
        self.log("placed: " + "; ".join(f"node {i} on Ray node {p['node_id']} ({p['ip']})"
                                        for i, p in enumerate(self.places)))

    def run(self, command) -> None:
        """Start `command(i, main_address, main_port)` on every node i and wait for all;
        NodesFailed for the first that ends badly (the others stopped)."""
        import ray

        self._quiet = True
        self._check()
        main = self.places[0]
        port = self._get(self._actors[0].free_port.remote(), "a port on node 0")
        self.log(f"node 0's launch (node i: --machine-rank i): "
                 f"{shlex.join(command(0, main['ip'], port))}")
        runs = {}
        for i, (actor, place) in enumerate(zip(self._actors, self.places)):
            header = (f"node {i} of {self.nodes}: Ray node {place['node_id']} "
                      f"({place['host']}, {place['ip']})")
            ref = actor.run.remote(command(i, main["ip"], port), str(self.job_dir),
                                   header, self.grace)
            runs[ref] = i
        pending = list(runs)
        while pending:  # a second at a time: a Stop is checked in between
            self._check()
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                try:
                    code, note = ray.get(ref)
                except ray.exceptions.RayError as error:
                    code, note = 1, (f"Ray lost node {runs[ref]}'s launcher: "
                                     f"{short_message(str(error), None)}")
                if code != 0:
                    raise NodesFailed(runs[ref], code, note)

    def __exit__(self, *exc) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        self._quiet = True
        try:
            try:
                if self._actors:  # a no-op on a node whose launch has ended
                    # kill_tree takes the grace and 5 s (a second grace only for a group that
                    # outlives its SIGTERM); past the supervisor's grace + NODES_STOP_MARGIN_S
                    # its SIGKILL takes the actors, and the watchdogs end the ranks
                    self._wait([a.stop.remote(self.grace) for a in self._actors],
                               2 * self.grace + 15, stopping=True)
                if self._group is not None:
                    with suppress(Exception):
                        remove_placement_group(self._group)
            finally:
                ray.shutdown()
        finally:
            if self._ours is not None:
                signal.signal(signal.SIGTERM, self._ours)
                if self._cancelled and callable(self._ours):
                    self._ours(signal.SIGTERM, None)  # the worker's: JobCancelled

    def _wait(self, refs: list, timeout: float, stopping: bool = False) -> bool:
        """Whether every one of `refs` is ready within `timeout` seconds, asking a second at
        a time; NodesCancelled at a Stop (unless `stopping`: the clean-up goes on)."""
        import ray

        deadline = time.monotonic() + timeout
        pending = list(refs)
        while pending:
            if not stopping:
                self._check()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(1.0, left))
        return True

    def _get(self, ref, what: str):
        import ray

        if not self._wait([ref], ACTORS_TIMEOUT_S):
            raise ExecutorError(f"Ray did not answer within {ACTORS_TIMEOUT_S:.0f} s when "
                                f"asked for {what}")
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as error:
            raise ExecutorError(f"Ray could not give {what}: "
                                f"{short_message(str(error), None)}") from None
