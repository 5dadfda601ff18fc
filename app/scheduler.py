"""The job scheduler: starts queued jobs as subprocesses on free device slots and watches them.

One scheduler per lab holds `scheduler.lock` (an flock, released by the OS even on kill -9).
Workers run in their own session/process group and report through the registry, so they
outlive a server restart; a restarted scheduler adopts them, and marks `interrupted` any job
recorded as running whose process is gone.

A long-lived scheduler (`run_forever`) makes a pass every `poll_seconds`, and at once when
woken: by a datagram on `scheduler.sock` in the lab folder, which app.jobs.wake_scheduler
sends from any process (a submit in the server, the CLI or a worker), or by one of its
workers exiting. The wake-up only saves the wait; the poll alone still starts every job, so a
lost datagram, or a lab where the socket cannot be bound (a lab path longer than an AF_UNIX
address holds), costs at most `poll_seconds`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from app.lab import WAKE_SOCKET, Lab  # noqa: F401 - WAKE_SOCKET: the name, for tests
from app.resources import detect_gpus, process_alive
from registry import hub
from registry.store import now

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
# a cluster job's journal is still replayed this long after it ended (Stop marks the job at
# once; the worker may write lines until the engine has ended it)
REPLAY_AFTER_END_S = 600
# A cluster engine is asked about a running job at most this often (the journal is replayed
# every pass): each question is an HTTP call to Ray's head or an squeue run against Slurm's
# controller, which site admins rightly dislike several times a second per job. An engine
# that says a job ended is acted on at once; only "still pending or running" is reused.
ENGINE_POLL_S = 3.0


def gpu_status() -> list[dict]:
    """Memory and utilisation of each GPU from nvidia-smi: [{"index", "name", "memory_used_mib",
    "memory_total_mib", "utilization_pct"}]; [] without nvidia-smi (no torch, no NVML import
    in the server)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,memory.used,memory.total,"
                              "utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 5 and parts[0].isdigit():
            def number(x):
                try:
                    return float(x)
                except ValueError:  # "[N/A]" on some boards
                    return None
            rows.append({"index": int(parts[0]), "name": parts[1],
                         "memory_used_mib": number(parts[2]),
                         "memory_total_mib": number(parts[3]),
                         "utilization_pct": number(parts[4])})
    return rows


def device_list(device: str | None) -> list[str]:
    """The devices a job's placement holds: `cuda:0,2` -> [cuda:0, cuda:2]; `cpu` -> [cpu]."""
    if not device:
        return []
    if device.startswith("cuda:"):
        return [f"cuda:{i}" for i in device[len("cuda:"):].split(",")]
    return [device]


def visible_devices(device: str) -> str:
    """CUDA_VISIBLE_DEVICES for a job placed on `device`: `cuda:0,2` -> `0,2`; cpu -> ``."""
    return ",".join(d.split(":")[1] for d in device_list(device) if d.startswith("cuda:"))


def log_tail(path: str | None, lines: int = 20) -> str:
    """The last lines of a job's log; "" when there is none. Only a regular file is read
    (a job folder on shared storage could hold a FIFO, which would hang the reader)."""
    if not path:
        return ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return ""
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 16384))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def fair_order(queued: list[dict], running: list[dict], last_start: dict[str, str]
               ) -> list[dict]:
    """The order in which queued jobs get free slots: higher priority first; within a
    priority, round-robin between users: the user with the fewest running jobs, then the one
    who was served longest ago, then that user's oldest job. One user's twenty queued jobs
    thus never starve another user's single job (each start counts against its user).

    Pure: `queued` and `running` are job rows, `last_start` maps user -> the latest
    started_at of their jobs."""
    counts = Counter(j["user"] for j in running)
    last = dict(last_start)
    pending = sorted(queued, key=lambda j: j["created_at"])
    order, tick = [], 0
    while pending:
        pick = min(pending, key=lambda j: (-(j["priority"] or 0), counts[j["user"]],
                                          last.get(j["user"]) or "", j["created_at"]))
        pending.remove(pick)
        order.append(pick)
        counts[pick["user"]] += 1
        tick += 1
        last[pick["user"]] = f"~{tick:09d}"  # sorts after every real timestamp, in pick order
    return order


def queue_positions(registry) -> dict[str, int]:
    """{queued job id: its place in the queue, 1 = next to start} by fair_order."""
    queued = registry.queued_jobs()
    if not queued:
        return {}
    order = fair_order(queued, registry.jobs(status="running", limit=10_000),
                       registry.last_starts())
    return {j["id"]: i + 1 for i, j in enumerate(order)}


MAX_START_ATTEMPTS = 3  # hand-overs of a job its cluster engine never started


def _attempt(job: dict) -> int:
    """Which hand-over of the job its engine id is: 1 for the job id itself, N+1 for -rN.
    An engine that numbers jobs itself (Slurm) answers a submit with NAME@NUMBER, NAME being
    the id it was handed; the number is its own business."""
    engine_id, job_id = (job.get("engine_id") or "").partition("@")[0], job["id"]
    if engine_id.startswith(job_id + "-r") and engine_id[len(job_id) + 2:].isdigit():
        return int(engine_id[len(job_id) + 2:]) + 1
    return 1


def _next_engine_id(job: dict) -> str:
    """The engine id of the job's next hand-over: the job id, then JOB-r1, JOB-r2..."""
    return job["id"] if not job.get("engine_id") else f"{job['id']}-r{_attempt(job)}"


def _previous_engine_id(engine_id: str) -> str | None:
    base, _, n = engine_id.rpartition("-r")
    return base if n == "1" else f"{base}-r{int(n) - 1}"


class Scheduler:
    def __init__(self, lab: Lab, poll_seconds: float = 0.5, warm: bool = False):
        """`warm`: start jobs through a fork server with torch and transformers imported
        (app/forkserver.py), for a long-lived scheduler (the server's, when the lab setting
        warm_workers is on); a one-off pass (`run --wait`) starts cold workers. The fork
        server is started with the first job (which runs cold meanwhile), not with the
        scheduler: its imports take seconds of CPU that the first page views need more."""
        self.lab = lab
        self.poll_seconds = poll_seconds
        self.children: dict[str, subprocess.Popen] = {}  # or warm.WarmChild
        self.warm = None
        if warm:
            from app.warm import ForkServer

            self.warm = ForkServer(log)
        self._lock_fd: int | None = None
        self.holder: str | None = None
        self._wake: socket.socket | None = None  # bound while run_forever runs
        # job id -> a pidfd of its worker, readable once the process has exited; None once
        # it fired, or where there is none (not Linux 5.3+, or already gone)
        self._exit_fds: dict[str, int | None] = {}
        self._looping = False  # run_forever is running (it owns the two above meanwhile)
        self._registry = None
        self._gpus: dict[str, int] = {}  # GPUs of queued jobs whose row predates the column
        self._executors: dict = {}  # cluster executors by name, made when first needed
        self._engine_warned: dict[str, str] = {}  # the last "unreachable" said per engine
        # job -> (monotonic time, engine id, EngineState): the last "still there" (ENGINE_POLL_S)
        self._engine_seen: dict[str, tuple] = {}
        gpus = lab.settings.gpus if lab.settings.gpus is not None else detect_gpus()
        self.gpu_capacity = {f"cuda:{i}": lab.settings.jobs_per_gpu for i in gpus}
        self.cpu_capacity = lab.settings.cpu_slots

    # --------------------------------------------------------------------------- lock
    def acquire(self) -> bool:
        """Become this lab's scheduler; False if another process already is (its pid is then
        in `holder`)."""
        fd = os.open(self.lab.root / "scheduler.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        return True

    def release(self) -> None:
        # The socket goes first, while the lock is still held: once it is released, a new
        # scheduler may bind its own socket at the same path, which must then stay. Not while
        # run_forever still runs in another thread (a shutdown whose join timed out): it may
        # be polling these descriptors, and closes them itself when it ends.
        if not self._looping:
            self._stop_listening()
            self._close_exit_fds()
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._registry is not None:
            self._registry.close()
            self._registry = None
        if self.warm is not None:
            self.warm.close()
        for executor in self._executors.values():
            if executor is not None:
                executor.close()
        self._executors.clear()

    @property
    def registry(self):
        if self._registry is None:
            self._registry = self.lab.registry()
        return self._registry

    # --------------------------------------------------------------------------- loop
    def recover(self) -> list[str]:
        """At start: jobs recorded as running whose process is gone become `interrupted`."""
        lost = []
        for job in self.registry.jobs(status="running", limit=10_000):
            if job.get("executor"):  # a cluster engine's: _watch_cluster asks the engine
                continue
            if job["id"] not in self.children and not process_alive(job["pid"],
                                                                      job["pid_started"]):
                self._finish_lost(job, "interrupted",
                                  "the job's process is gone and never recorded its end (it "
                                  "was killed, or the server or machine restarted)")
                lost.append(job["id"])
        return lost

    def tick(self, only: str | None = None) -> None:
        """One pass: reap finished children, check adopted jobs, start queued jobs."""
        reg = self.registry
        for job_id, proc in list(self.children.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.children[job_id]
            job = reg.job(job_id)
            if job["status"] == "running":  # the worker died before recording its end
                status = "cancelled" if job["cancel_requested"] else "failed"
                self._finish_lost(job, status, f"worker exited with code {code}", code)
        self._watch_cluster()
        self.recover()  # adopted jobs (started by an earlier server) that have since died
        self._start_queued(only)

    def _finish_lost(self, job: dict, status: str, reason: str, code: int | None = None) -> None:
        tail = log_tail(job["log_path"])
        error = hub.redact(reason + (f"\nlast log lines:\n{tail}" if tail else ""))
        if self.registry.update_job(job["id"], only_if_status=("running",), status=status,
                                    finished_at=now(), error=error, exit_code=code):
            if job.get("executor"):  # a cluster job's registry snapshot: no reader left
                from registry.journal import remove_snapshots

                remove_snapshots(job["job_dir"] or self.lab.job_dir(job["id"]))
            removed = self.lab.remove_job_tmp(job["id"])
            log.warning("job %s %s: %s%s", job["id"], status, reason,
                        f" (removed {len(removed)} partial checkpoint folders)" if removed else "")

    def _free_slot(self, uses_gpu: bool, busy: Counter, gpus: int = 1) -> str | None:
        """A device with room, given `busy` (running jobs per device), or None. A job that
        needs several GPUs gets them all at once, as one device string: `cuda:0,2`."""
        if uses_gpu and self.gpu_capacity:
            # A GPU job waits for a GPU; running it on the CPU instead would be a silent,
            # many-times-slower fallback. CPU slots serve GPU jobs only on GPU-less machines.
            free = [device.split(":")[1] for device, capacity in self.gpu_capacity.items()
                    if busy[device] < capacity]
            return "cuda:" + ",".join(free[:gpus]) if len(free) >= gpus else None
        cpu_busy = sum(n for d, n in busy.items() if d == "cpu")
        return "cpu" if cpu_busy < self.cpu_capacity else None

    def _job_gpus(self, job: dict, plugin) -> int:
        """The GPUs a queued job holds at once: its row's `gpus`, written at submit. A row
        from before that column has NULL: its config is validated once and the count kept
        (raises the plugin's ConfigError when it no longer validates)."""
        if job.get("gpus") is not None:
            return int(job["gpus"])
        if job["id"] not in self._gpus:
            import plugins

            config = plugins.validate_config(plugin, json.loads(job["config"]))
            self._gpus[job["id"]] = max(1, int(plugin.needs(config).gpus))  # as submit's
        return self._gpus[job["id"]]

    def _start_queued(self, only: str | None) -> None:
        import plugins

        queued = self.registry.queued_jobs()
        self._gpus = {k: v for k, v in self._gpus.items() if k in {j["id"] for j in queued}}
        if not queued:
            return
        running = self.registry.jobs(status="running", limit=10_000)
        queued = fair_order(queued, running, self.registry.last_starts())
        if self.lab.settings.executor != "local":
            self._hand_over_queued(queued, running, only)
            return
        busy = Counter(d for j in running if not j.get("executor")
                       for d in device_list(j["device"]))
        gpu_waiting = False  # a GPU job is waiting: later ones must not take its GPUs
        for job in queued:
            if only and job["id"] != only:
                continue
            try:
                plugin = plugins.get(job["plugin"])
                gpus = self._job_gpus(job, plugin)
            except (plugins.PluginError, plugins.ConfigError) as e:
                self.registry.update_job(job["id"], only_if_status=("queued",), status="failed",
                                         finished_at=now(), error=str(e))
                continue
            on_gpu = plugin.uses_gpu and bool(self.gpu_capacity)
            if on_gpu and gpus > len(self.gpu_capacity):
                self.registry.update_job(
                    job["id"], only_if_status=("queued",), status="failed", finished_at=now(),
                    error=f"the job needs {gpus} GPUs and this lab has {len(self.gpu_capacity)}")
                continue
            if on_gpu and gpu_waiting:  # a job asking for 2 GPUs is not starved by 1-GPU jobs
                continue
            device = self._free_slot(plugin.uses_gpu, busy, gpus)
            if device is not None and self.start(job, device):
                for d in device_list(device):
                    busy[d] += 1
            elif device is None and on_gpu:
                gpu_waiting = True

    def start(self, job: dict, device: str) -> bool:
        """Start a queued job on `device`; False if someone else claimed it first."""
        # Claim first: only one scheduler pass may move a job from queued to running.
        if not self.registry.update_job(job["id"], only_if_status=("queued",), status="running",
                                        device=device, started_at=now()):
            return False
        job_dir = Path(job["job_dir"] or self.lab.job_dir(job["id"]))
        job_dir.mkdir(parents=True, exist_ok=True)
        env = self._job_env(device)
        proc = None
        if self.warm is not None and self.warm.usable(env):
            proc = self.warm.fork(job["id"], str(self.lab.root), str(job_dir),
                                  str(job_dir / "log.txt"), env,
                                  keep_mb=self.lab.settings.warm_model_mb)
        how = "warm" if proc is not None else "cold"
        if proc is None:
            with open(job_dir / "log.txt", "ab") as logf:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "app.worker", job["id"], "--lab",
                     str(self.lab.root)],
                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=str(job_dir), env=env, start_new_session=True)
        try:
            started = psutil.Process(proc.pid).create_time()
        except psutil.NoSuchProcess:
            started = None
        self.registry.update_job(job["id"], pid=proc.pid, pid_started=started)
        self.children[job["id"]] = proc
        log.info("started job %s (%s) on %s as pid %d (%s worker)", job["id"], job["plugin"],
                 device, proc.pid, how)
        return True

    # ------------------------------------------------------------------ cluster executors
    def _executor(self, name: str):
        from app.executors import executor_for

        if name not in self._executors:
            self._executors[name] = executor_for(self.lab.settings, name)
        return self._executors[name]

    def _hand_over_queued(self, queued: list[dict], running: list[dict],
                          only: str | None) -> None:
        """Hand queued jobs, in fair order, to the lab's cluster engine while it runs fewer
        than `cluster_max_jobs` of them; the engine places each on a node with room."""
        import plugins

        name = self.lab.settings.executor
        free = self.lab.settings.cluster_max_jobs - sum(1 for j in running if j.get("executor"))
        for job in queued:
            if free <= 0:
                return
            if only and job["id"] != only:
                continue
            try:
                plugin = plugins.get(job["plugin"])
                config = plugins.validate_config(plugin, json.loads(job["config"]))
                gpus = self._job_gpus(job, plugin) \
                    if plugin.uses_gpu and self.lab.settings.cluster_gpus else 0
                needs = plugin.needs(config)
                processes = needs.processes("cuda" if gpus else "cpu")
            except Exception as e:  # noqa: BLE001 - one bad row must not stop the queue
                self.registry.update_job(job["id"], only_if_status=("queued",), status="failed",
                                         finished_at=now(), error=f"{type(e).__name__}: {e}"
                                         if not isinstance(e, (plugins.PluginError,
                                                               plugins.ConfigError,
                                                               ValueError)) else str(e))
                continue
            # its processes (several: app.worker launches them on its node) each want a core
            handed = self.hand_over(job, name, gpus, cpus=processes, nodes=needs.nodes)
            if handed is None:  # the engine does not answer: the rest wait with this one
                return
            if handed:
                free -= 1

    def hand_over(self, job: dict, name: str, gpus: int, cpus: int = 1,
                  nodes: int = 1) -> bool | None:
        """Start a queued job through cluster executor `name`; False if someone else claimed
        it first or the engine refused it (the job then failed with the engine's reason);
        None if the engine does not answer (the job is queued again, saying so)."""
        from app.executors import GONE, EngineUnreachable, ExecutorError, Needs, Submission
        from registry.journal import SNAPSHOT, remove_snapshots

        device = f"{name}:{'cuda' if gpus else 'cpu'}"
        engine_id = _next_engine_id(job)
        if not self.registry.update_job(job["id"], only_if_status=("queued",), status="running",
                                        device=device, started_at=now(), executor=name,
                                        engine_id=engine_id, journal_offset=0):
            return False
        job = {**job, "engine_id": engine_id}
        job_dir = Path(job["job_dir"] or self.lab.job_dir(job["id"]))
        job_dir.mkdir(parents=True, exist_ok=True)
        self.registry.snapshot(job_dir / SNAPSHOT)  # what the worker reads instead of the db
        python = self.lab.settings.cluster_python or sys.executable
        env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        # the lab's settings overrides and plugin list are the server's; never a secret
        # (the engine shows a job's environment to whoever can see its dashboard)
        for key, value in os.environ.items():
            if (key.startswith("WEIGHTSMITH_") or key in ("HF_HOME", "HF_ENDPOINT")) and \
                    not any(word in key for word in ("TOKEN", "SECRET", "PASSWORD", "KEY")):
                env[key] = value
        if not gpus:  # Ray leaves a GPU-less job the node's GPUs: it must not use them
            env["CUDA_VISIBLE_DEVICES"] = ""
        sub = Submission(engine_id, [python, "-m", "app.worker", job["id"], "--lab",
                                     str(self.lab.root), "--remote"],
                         env=env, cwd=str(job_dir), needs=Needs(gpus=gpus, cpus=cpus, nodes=nodes),
                         stop_grace_s=self.lab.settings.cancel_grace_seconds)
        executor = self._executor(name)
        try:
            engine_id = executor.submit(sub)
        except EngineUnreachable as e:
            try:  # a timeout may come after the engine took it
                taken = executor.state(engine_id).state != GONE
            except ExecutorError:
                taken = False
            if not taken:
                previous = None if engine_id == job["id"] else _previous_engine_id(engine_id)
                self.registry.update_job(
                    job["id"], only_if_status=("running",), status="queued", device=None,
                    started_at=None, executor=None, engine_id=previous,
                    progress_message=f"waiting: {e}"[:300])
                remove_snapshots(job_dir)
                if self._engine_warned.get(name) != str(e):
                    log.warning("cannot hand jobs to %s: %s", name, e)
                    self._engine_warned[name] = str(e)
                return None
        except ExecutorError as e:
            self.registry.update_job(job["id"], only_if_status=("running",), status="failed",
                                     finished_at=now(),
                                     error=f"could not hand the job to {name}: {e}")
            remove_snapshots(job_dir)
            log.warning("job %s: %s refused it: %s", job["id"], name, e)
            return False
        self.registry.update_job(job["id"], engine_id=engine_id, progress_message="")
        after = self.registry.job(job["id"])
        if after["status"] != "running" or after["cancel_requested"]:
            # stopped while it was being handed over (the Stop found nothing to stop yet)
            try:
                executor.stop(engine_id)
            except ExecutorError as e:
                log.warning("job %s: could not stop it on %s: %s", job["id"], name, e)
        log.info("handed job %s (%s) to %s as %s (%d GPUs)", job["id"], job["plugin"], name,
                 engine_id, gpus)
        return True

    def _watch_cluster(self) -> None:
        """Each running job of a cluster engine: replay its journal's new lines, and when the
        engine says it has ended without the worker having recorded its end (killed, out of
        memory, a node lost), record that, with the engine's reason. A job the engine no
        longer knows (the cluster was restarted) is `interrupted`. This is also how a
        restarted server re-attaches: it asks the engine about every job still running."""
        running = [j for j in self.registry.jobs(status="running", limit=10_000)
                   if j.get("executor")]
        for gone_id in set(self._engine_seen) - {j["id"] for j in running}:
            del self._engine_seen[gone_id]
        for job in running:
            try:
                self._watch_one(job)
            except Exception:  # noqa: BLE001 - one job's trouble must not stop the pass
                log.exception("watching cluster job %s failed", job["id"])
        self._replay_stopped()

    def _replay_stopped(self) -> None:
        """Cluster jobs that ended in the last REPLAY_AFTER_END_S (a Stop in the web app
        marks them at once) whose journal has lines not yet replayed: what the worker
        registered before it stopped (a checkpoint it published stays registered)."""
        from app.ingest import ingest
        from registry.journal import JOURNAL

        for job in self.registry.ended_cluster_jobs(REPLAY_AFTER_END_S):
            try:
                journal = Path(job["job_dir"] or self.lab.job_dir(job["id"])) / JOURNAL
                if journal.is_file() and journal.stat().st_size > (job["journal_offset"] or 0):
                    ingest(self.lab, self.registry, job["id"])
            except Exception:  # noqa: BLE001 - one job's trouble must not stop the pass
                log.exception("replaying ended cluster job %s failed", job["id"])

    def _watch_one(self, job: dict) -> None:
        from app.executors import FINAL, GONE, PENDING, ExecutorError
        from app.ingest import ingest
        from registry.journal import remove_snapshots

        name = job["executor"]
        executor = self._executor(name)
        try:
            engine = self._engine_state(executor, job)  # before the replay
        except ExecutorError as e:  # unreachable now: replay what is there, ask again later
            if self._engine_warned.get(name) != str(e):
                log.warning("cannot ask %s about its jobs: %s", name, e)
                self._engine_warned[name] = str(e)
            job = ingest(self.lab, self.registry, job["id"])
            if job["status"] == "succeeded" and self.lab.settings.hub_sync_repo:
                self._sync_after(job)
            return
        self._engine_warned.pop(name, None)
        job = ingest(self.lab, self.registry, job["id"])
        if job["refused"] and engine.state not in FINAL:  # the lab failed it: end it
            try:
                executor.stop(job["engine_id"] or job["id"])
            except ExecutorError as e:
                log.warning("job %s: could not stop it on %s: %s", job["id"], name, e)
        if job["status"] != "running":
            if job["status"] == "succeeded" and self.lab.settings.hub_sync_repo:
                self._sync_after(job)
            return
        if engine.state not in FINAL:
            if engine.state == PENDING and not job["progress"]:  # say why it waits
                waiting = (f"waiting in {name}" + (f": {engine.message}" if engine.message
                                                   else ""))[:300]
                if job["progress_message"] != waiting:
                    self.registry.update_job(job["id"], only_if_status=("running",),
                                             progress_message=waiting)
            return
        if engine.never_started and not job["journal_offset"] and not job["cancel_requested"] \
                and _attempt(job) < MAX_START_ATTEMPTS:
            # the engine gave up waiting for room before the worker ran: back to the lab's
            # queue, to be handed over again (under a new id: Ray never reuses one)
            if self.registry.update_job(
                    job["id"], only_if_status=("running",), status="queued", device=None,
                    started_at=None, executor=None, progress=0.0,
                    progress_message=f"queued again: {name} did not start it"
                                     f"{': ' + engine.message if engine.message else ''}"[:300]):
                remove_snapshots(job["job_dir"] or self.lab.job_dir(job["id"]))
                log.warning("job %s: %s did not start it; queued again", job["id"], name)
            return
        status = ("cancelled" if job["cancel_requested"] else
                  "interrupted" if engine.state == GONE else "failed")
        reason = f"{name} reports the job {engine.state}" + \
            (f": {engine.message}" if engine.message else "")
        if engine.state != GONE and not log_tail(job["log_path"]):
            try:  # the worker never reached its log (the node could not see the lab)
                reason += "\n" + "\n".join(executor.logs(job["engine_id"] or job["id"])
                                            .splitlines()[-20:])
            except ExecutorError:
                pass
        self._finish_lost(job, status, reason)

    def _engine_state(self, executor, job: dict):
        """The engine's word on a running job: asked again after ENGINE_POLL_S, or when the
        job's engine id changed (handed over again)."""
        from app.executors import FINAL

        engine_id = job["engine_id"] or job["id"]
        seen = self._engine_seen.get(job["id"])
        if seen and seen[1] == engine_id and time.monotonic() - seen[0] < ENGINE_POLL_S:
            return seen[2]
        state = executor.state(engine_id)
        if state.state in FINAL:
            self._engine_seen.pop(job["id"], None)
        else:
            self._engine_seen[job["id"]] = (time.monotonic(), engine_id, state)
        return state

    def _sync_after(self, job: dict) -> None:
        try:
            hub.sync_registry(self.registry, self.lab.settings.hub_sync_repo,
                              log=lambda m: log.info("job %s: %s", job["id"], m))
        except Exception as e:  # noqa: BLE001 - the Hub being down must not fail the job
            log.warning("hub sync after job %s failed: %s", job["id"], e)

    @staticmethod
    def _job_env(device: str) -> dict:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(device)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        return env

    def run_forever(self, stop: threading.Event) -> None:
        self._looping = True
        self._listen()
        # `stop` cannot wake a poll by itself: a thread waits on it and rings this pair
        interrupt, ring = socket.socketpair()

        def ring_on_stop():
            stop.wait()
            try:
                ring.send(b"\0")
            except OSError:  # run_forever ended otherwise and closed it
                pass

        threading.Thread(target=ring_on_stop, daemon=True,
                         name="weightsmith-scheduler-stop").start()
        try:
            while not stop.is_set():  # each tick begins with recover()
                try:
                    self.tick()
                except Exception:  # the loop must survive a bad job row or a locked database
                    log.exception("scheduler tick failed")
                try:
                    self._wait(interrupt)
                except Exception:  # the poll alone still starts every job
                    log.exception("scheduler wait failed")
                    stop.wait(self.poll_seconds)
        finally:
            self._stop_listening()
            self._close_exit_fds()
            interrupt.close()
            ring.close()
            self._looping = False

    # --------------------------------------------------------------------------- wake-up
    def _listen(self) -> None:
        """Bind the lab's wake socket, replacing the file a killed scheduler left; on any
        failure say so and rely on the poll."""
        if self._wake is not None or self._lock_fd is None:
            return  # only the lock's holder may replace the file: anyone else's is live
        path = self.lab.wake_socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # we hold the lock: no scheduler reads this one
            # a lab path longer than an AF_UNIX address holds (108 bytes on Linux) fails here
            sock.bind(str(path))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            log.warning("no wake-up socket at %s (%s): queued jobs start on the scheduler's "
                        "poll, within %.1f s", path, e, self.poll_seconds)
            return
        self._wake = sock

    def _stop_listening(self) -> None:
        sock, self._wake = self._wake, None
        if sock is not None:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.lab.wake_socket)

    def _watch_exits(self) -> tuple[dict[int, str], bool]:
        """({pidfd: job id} of the workers still to watch, whether one is already gone).
        Warm workers are the fork server's children, not ours: a pidfd works for them too."""
        for job_id in [j for j in self._exit_fds if j not in self.children]:
            fd = self._exit_fds.pop(job_id)
            if fd is not None:
                os.close(fd)
        gone = False
        for job_id, proc in self.children.items():
            if job_id not in self._exit_fds:
                try:
                    self._exit_fds[job_id] = os.pidfd_open(proc.pid)
                except ProcessLookupError:  # ended (and reaped) since the pass started it
                    self._exit_fds[job_id], gone = None, True
                except (AttributeError, OSError):  # no pidfds here: the poll notices the end
                    self._exit_fds[job_id] = None
        return {fd: job_id for job_id, fd in self._exit_fds.items() if fd is not None}, gone

    def _close_exit_fds(self) -> None:
        for fd in self._exit_fds.values():
            if fd is not None:
                os.close(fd)
        self._exit_fds.clear()

    def _wait(self, interrupt: socket.socket) -> None:
        """Until the next pass: `poll_seconds`, or less when a wake-up datagram comes, one of
        our workers exits (its slot is free), or `interrupt` rings (stop)."""
        exits, gone = self._watch_exits()
        if gone:
            return
        wake = self._wake
        # poll, not select: the server's process may hold more than FD_SETSIZE descriptors
        poller = select.poll()
        for fd in [interrupt.fileno(), *([wake.fileno()] if wake else []), *exits]:
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(self.poll_seconds * 1000):
            if fd in exits:  # a pidfd stays readable: watch this one no more
                os.close(fd)
                self._exit_fds[exits[fd]] = None
        if wake is not None:  # many wake-ups (twenty submits at once) make one pass
            with contextlib.suppress(OSError):  # BlockingIOError: all read
                while True:
                    wake.recv(64)
