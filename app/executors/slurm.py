"""The `slurm` executor: a job's worker runs as a Slurm batch job, through Slurm's own client
commands (sbatch, squeue, scancel, sacct) on the server machine.

Why the commands rather than a library or slurmrestd: they are what every Slurm site has and
keeps working (the server machine only needs the client package, the cluster's slurm.conf and
munged with the cluster's key), their text output is stable across releases, and they carry
the site's own authentication. Each call is one short subprocess with a timeout, its argv a
list (never a shell: job ids, paths and settings are never parsed as shell words).

How a job maps onto Slurm:
- sbatch reads the batch script on stdin: nothing is written on the server's disk for it,
  and nothing needs cleaning up (Slurm copies the script into its controller at submit time
  anyway; a node never reads a file of ours for it). The script exports the submission's
  environment and then `exec`s the worker, so that the worker itself is the batch step's
  process, the one Slurm signals and whose exit code is the job's.
- `--export=NONE`: the job gets the user's login environment on the node (PATH, HOME...,
  which Slurm then loads there) plus what the script exports, not the whole environment of
  the server process (which may hold tokens the job must not see), as a Ray job gets its
  node's environment.
- A job of several nodes (Needs.nodes > 1): `--nodes=N --ntasks-per-node=1`, and
  --cpus-per-task, --gres and --mem are what each node gives it. Slurm runs the batch script,
  the worker, on the first node; the worker srun's one launch per node (app/worker.py).
- `--no-requeue`: a job whose node fails must not be run again from the top by Slurm: its
  journal already holds the first run's lines, and the lab decides what to do with it.
- The engine id is NAME@NUMBER: NAME is the id the lab handed over (the job name), NUMBER is
  Slurm's job id. A bare NAME (a submit that timed out, so the lab never learnt the number)
  is looked up by job name.

Slurm keeps an ended job in its controller for MinJobAge (300 s by default), so squeue is
asked first: it answers from the controller's memory, with the job's reason, and needs no
accounting database. Only when the controller has forgotten the job is sacct asked, and a
cluster without accounting (AccountingStorageType none) then says the job is GONE.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import stat
import subprocess
import time
from pathlib import Path
from signal import Signals

from app.executors import (FAILED, FINAL, GONE, PENDING, RUNNING, STOPPED, SUCCEEDED,
                           EngineState, EngineUnreachable, Executor, ExecutorError, Submission)

TIMEOUT = 30.0  # seconds for one client command (with its controller down, one takes ~20 s)
STOP_TIMEOUT = 30.0  # seconds stop() waits for Slurm to end a job after its SIGKILL
LOG_BYTES = 1 << 20  # logs(): the last MiB of the job's output
MESSAGE_CHARS = 300
INSTALL = ("install Slurm's client commands on the server machine (Debian/Ubuntu: apt-get "
           "install slurm-client), with the cluster's slurm.conf (or SLURM_CONF pointing at "
           "it) and munged running with the cluster's key")

# squeue's long state names -> ours. COMPLETING: the job's processes are being ended, some
# may still run; SUSPENDED and STOPPED (SIGSTOPped) jobs still hold their processes.
STATES = {
    "PENDING": PENDING, "CONFIGURING": PENDING, "REQUEUED": PENDING, "REQUEUE_HOLD": PENDING,
    "REQUEUE_FED": PENDING, "RESV_DEL_HOLD": PENDING,
    "RUNNING": RUNNING, "COMPLETING": RUNNING, "SUSPENDED": RUNNING, "STOPPED": RUNNING,
    "SIGNALING": RUNNING, "STAGE_OUT": RUNNING, "RESIZING": RUNNING,
    "COMPLETED": SUCCEEDED,
    "FAILED": FAILED, "TIMEOUT": FAILED, "OUT_OF_MEMORY": FAILED, "NODE_FAIL": FAILED,
    "BOOT_FAIL": FAILED, "DEADLINE": FAILED, "PREEMPTED": FAILED, "SPECIAL_EXIT": FAILED,
    "REVOKED": FAILED,
    "CANCELLED": STOPPED,
}
# what a few of Slurm's words mean, said after them
GLOSS = {
    "TIMEOUT": "the job ran past its time limit (lab setting slurm_time_limit, or the "
               "partition's)",
    "OUT_OF_MEMORY": "the job used more memory than it was given",
    "NODE_FAIL": "its node failed",
    "BOOT_FAIL": "its node failed to boot",
    "PREEMPTED": "a job of higher priority took its place",
    "DEADLINE": "it could not run before its deadline",
    "Resources": "no node has the CPUs, GPUs or memory it asks for free yet",
    "Priority": "jobs of higher priority come first",
    "PartitionConfig": "it asks for more than the partition has: it can never start",
    "ReqNodeNotAvail": "no node it may use is available",
    "BadConstraints": "no node has what it asks for",
}
# a job of several nodes: seconds its worker gets after the grace (stop) to end srun and
# record the end
NODES_STOP_MARGIN_S = 5
# squeue -O fields: "|" after each, WorkDir last (a path may hold "|": it takes the rest)
FIELDS = ("JobID", "Name", "State", "Reason", "exit_code", "NodeList", "WorkDir")
SACCT_FIELDS = ("JobID", "JobName", "State", "ExitCode", "NodeList", "WorkDir")
UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out",
               "Zero Bytes were transmitted", "Communication connection failure",
               "backup controller in standby", "Munge encode failed",
               "Did you start munged")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def batch_script(sub: Submission) -> str:
    """The batch script: the submission's environment, then `exec` the worker (so that Slurm's
    signals reach it, not a shell above it). Values are single-quoted by shlex: a space, a
    quote, a newline or a `$` arrives as it was."""
    lines = ["#!/bin/bash"]
    for key, value in sub.env.items():
        if not NAME.fullmatch(key):
            raise ExecutorError(f"environment variable name {key!r} of job {sub.job_id}: "
                                f"expected letters, digits and _ (not first a digit)")
        lines.append(f"export {key}={shlex.quote(str(value))}")
    lines.append("exec " + shlex.join(sub.command))
    return "\n".join(lines) + "\n"


def _exit_words(code: str) -> str:
    """squeue's exit_code is the raw wait status (768: exit code 3; 9: signal 9); sacct's
    ExitCode is CODE:SIGNAL."""
    code = code.strip()
    if ":" in code:
        exit_code, _, signal = code.partition(":")
        if not (exit_code or "0").isdigit() or not (signal or "0").isdigit():
            return ""
        exit_code, signal = int(exit_code or 0), int(signal or 0)
    elif code.isdigit():
        status = int(code)
        signal, exit_code = status & 0x7F, (status >> 8) & 0xFF
    else:
        return ""
    if signal:
        try:
            return f"killed by signal {signal} ({Signals(signal).name})"
        except ValueError:
            return f"killed by signal {signal}"
    return f"exit code {exit_code}" if exit_code else ""


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS - 1] + "…"


def read_tail(path: Path, limit: int = LOG_BYTES) -> str:
    """The last `limit` bytes of a regular file, from its first whole line on; "" when it is
    missing or not a regular file (a FIFO in a job folder on shared storage would hang the
    reader; a link could point anywhere)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        size = os.fstat(fd).st_size
        start = max(0, size - limit)
        os.lseek(fd, start, os.SEEK_SET)
        chunks, left = [], size - start
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if start and b"\n" in data:
        data = data[data.index(b"\n") + 1:]
    return data.decode("utf-8", "replace")


class _Job:
    """One row of squeue or sacct."""

    def __init__(self, number: str, name: str, state: str, reason: str, exit_code: str,
                 nodes: str, work_dir: str):
        self.number, self.name = number, name
        # sacct says "CANCELLED by 1000"; a state may carry flags after a "+"
        self.state = state.split()[0].split("+")[0] if state.strip() else ""
        self.reason = "" if reason in ("None", "(null)", "") else reason
        self.exit_code, self.nodes, self.work_dir = exit_code, nodes, work_dir

    @property
    def output(self) -> Path | None:
        """The job's output file: sbatch was given --output=<cwd>/slurm-%j.out."""
        return Path(self.work_dir) / f"slurm-{self.number}.out" if self.work_dir else None


def _ours(rows: list[_Job], name: str) -> _Job | None:
    """The latest of the rows named `name` (any row when no name is given). A number whose
    job has another name is not ours: a cluster whose controller lost its state numbers
    jobs from the start again, and the lab must neither follow nor cancel someone else's."""
    rows = [r for r in rows if not name or r.name == name]
    return max(rows, key=lambda r: int(r.number)) if rows else None


class SlurmExecutor(Executor):
    """A Slurm cluster, through the client commands on this machine. `partition`, `account`
    and `time_limit` are the lab's settings (empty: the cluster's defaults); `grace` is how
    long stop() lets the worker clean up after SIGTERM before it SIGKILLs it."""

    name = "slurm"

    def __init__(self, partition: str = "", account: str = "", time_limit: str = "",
                 grace: float = 10.0, timeout: float = TIMEOUT,
                 stop_timeout: float = STOP_TIMEOUT):
        self.partition, self.account, self.time_limit = partition, account, time_limit
        self.grace, self.timeout, self.stop_timeout = grace, timeout, stop_timeout

    # -- the executor's interface

    def submit(self, sub: Submission) -> str:
        needs = sub.needs
        argv = ["sbatch", "--parsable", f"--job-name={sub.job_id}", "--export=NONE",
                "--no-requeue", f"--cpus-per-task={max(1, math.ceil(needs.cpus))}"]
        if sub.cwd:
            if "\\" in sub.cwd:  # sbatch reads a backslash in --output as "no %j here"
                raise ExecutorError(f"job {sub.job_id}: its folder {sub.cwd} has a backslash "
                                    f"in its path, which Slurm's --output cannot take")
            # stdout and stderr both; %% is a literal % in Slurm's file name patterns
            argv += [f"--chdir={sub.cwd}",
                     f"--output={sub.cwd.replace('%', '%%')}/slurm-%j.out"]
        if needs.nodes > 1:
            # one task per node: the batch step (the worker, on the first node) srun's one
            # launcher per node, each starting that node's processes (app/worker.py);
            # --cpus-per-task, --gres and --mem are then what each node gives the job
            argv += [f"--nodes={needs.nodes}", "--ntasks-per-node=1"]
        if needs.gpus > 0:
            argv.append(f"--gres=gpu:{needs.gpus}")
        if needs.memory_bytes:
            argv.append(f"--mem={max(1, math.ceil(needs.memory_bytes / (1 << 20)))}M")
        for option, value in (("partition", self.partition), ("account", self.account),
                              ("time", self.time_limit)):
            if value:
                argv.append(f"--{option}={value}")
        proc = self._run(argv, f"submit job {sub.job_id}", stdin=batch_script(sub))
        if proc.returncode != 0:
            raise ExecutorError(f"Slurm refused job {sub.job_id}: {self._said(proc)}"
                                f"{self._settings_hint(proc.stderr)}")
        # --parsable: "NUMBER" or "NUMBER;CLUSTER"
        number = proc.stdout.strip().splitlines()[-1].split(";")[0].strip() \
            if proc.stdout.strip() else ""
        if not number.isdigit():
            raise ExecutorError(f"sbatch took job {sub.job_id} but printed {proc.stdout!r} "
                                f"instead of its job number")
        return f"{sub.job_id}@{number}"

    def state(self, engine_id: str) -> EngineState:
        job = self._find(engine_id)
        if job is None:
            return EngineState(GONE, f"Slurm does not know job {engine_id} (any more: its "
                                     f"controller forgets an ended job after MinJobAge, and "
                                     f"its accounting has no record of it)")
        ours = STATES.get(job.state)
        if ours is None:
            raise ExecutorError(f"Slurm reports job {engine_id} as {job.state}, a state this "
                                f"executor does not know (Slurm's newer than it?)")
        if ours == PENDING:
            return EngineState(PENDING, self._reason(job.reason))
        if ours in (RUNNING, SUCCEEDED):
            return EngineState(ours)
        if job.state == "FAILED" and job.reason == "JobLaunchFailure" and job.output and \
                not job.output.exists():
            # the node could not open the job's output file, which lies in the job's folder
            # in the lab: that node does not see the lab (we do: the folder is there)
            words = [f"{job.state} ({job.reason})",
                     f"Slurm could not start the job on {job.nodes or 'its node'}: it could "
                     f"not create the job's output file {job.output}. That node may not see "
                     f"the lab folder, which must be on storage that every node mounts at the "
                     f"same path"]
        else:
            exit_words = _exit_words(job.exit_code)
            reason = job.reason
            if reason == "JobLaunchFailure" and exit_words.startswith("killed"):
                # the worker ran (its output file is there) and a signal ended it: Slurm
                # 22.05 still calls that a launch failure, which would mislead
                reason = ""
            words = [job.state + (f" ({reason})" if reason else "")]
            if exit_words:
                words.append(exit_words)
            if job.state in GLOSS:
                words.append(GLOSS[job.state])
        return EngineState(ours, _one_line(": ".join(words)),
                           # the node never booted: the worker never ran, the lab may hand
                           # the job over again (cancelled or failed jobs are left alone:
                           # someone meant it, or it would fail again)
                           never_started=job.state == "BOOT_FAIL")

    def logs(self, engine_id: str) -> str:
        job = self._find(engine_id)
        return read_tail(job.output) if job is not None and job.output else ""

    def stop(self, engine_id: str) -> None:
        """End the job and every process it started. A pending job is taken off the queue.
        A running one gets SIGTERM, `grace` seconds to end, then SIGKILL; this returns once
        Slurm reports the job ended (or raises after stop_timeout more). An unknown id is
        already stopped.

        The SIGTERM goes to the worker and every process of its step (`--full` includes the
        batch step, which is the worker). A job of several nodes is signalled otherwise:
        srun, in its batch step, answers a SIGTERM by SIGKILLing its tasks on every node
        (srun_job.c: "forcing job termination"), and the ranks would get no grace. So the
        SIGTERM goes first to the steps other than the batch step (each node's torchrun,
        which passes it to its ranks), then to the batch step's own process alone
        (`--batch` without `--full`: the worker, which the batch script exec'd, and which
        waits for its srun to end).

        Not a plain scancel first: it would mark the job CANCELLED at once and then refuse
        any other signal, so the SIGKILL would come after the cluster's KillWait (30 s by
        default), not after the lab's grace. The price: a job stopped so ends FAILED (or
        COMPLETED, if the worker exits 0 on SIGTERM) in Slurm's eyes, not CANCELLED; the lab
        records it as cancelled either way (it asked for the stop).

        Which processes are "every process" is the cluster's process tracking: with
        proctrack/cgroup (the usual) all of the job's, with proctrack/linuxproc those still
        in the worker's process tree (one that daemonised has left it)."""
        job = self._find(engine_id)
        if job is None or STATES.get(job.state) in FINAL:
            return
        if STATES.get(job.state) == PENDING:
            self._scancel([job.number], engine_id)
            return
        grace = self.grace
        if "," in job.nodes or "[" in job.nodes:  # squeue's hostlist of several nodes
            try:  # no step yet (the worker still importing): nothing to signal
                self._scancel(["--signal=TERM", job.number], engine_id)  # all steps but batch
            except ExecutorError:
                pass
            self._scancel(["--signal=TERM", "--batch", job.number], engine_id)  # the worker
            # the worker waits the grace for srun, after its ranks had theirs, then records
            # the end: a margin before the SIGKILL
            grace += NODES_STOP_MARGIN_S
        else:
            self._scancel(["--signal=TERM", "--full", job.number], engine_id)
        if self._wait_final(job.number, grace):
            return
        # --batch with --full: SIGKILL to every process of the batch step, now (a plain
        # SIGKILL to the job is a cancel, which waits KillWait first)
        self._scancel(["--signal=KILL", "--full", "--batch", job.number], engine_id)
        self._scancel([job.number], engine_id)  # and the job itself, whatever is left of it
        if not self._wait_final(job.number, self.stop_timeout):
            raise ExecutorError(f"Slurm did not end job {engine_id} within "
                                f"{grace + self.stop_timeout:.0f} s of the stop: its "
                                f"processes may still run")

    # -- Slurm's commands

    def _find(self, engine_id: str) -> _Job | None:
        """The job behind an engine id (NAME@NUMBER, or a bare NAME, the latest job of that
        name), from squeue, else from sacct; None when Slurm knows nothing of it."""
        name, _, number = engine_id.partition("@")
        if number and not number.isdigit():
            raise ExecutorError(f"engine id {engine_id!r}: expected NAME@NUMBER, NUMBER "
                                f"being Slurm's job id")
        what = f"read the state of job {engine_id}"
        selector = [f"--jobs={number}"] if number else \
            [f"--name={name}", f"--user={os.getuid()}"]
        proc = self._run(["squeue", "--noheader", "--states=all", *selector,
                          "--Format=" + ",".join(f"{f}:|" if f != FIELDS[-1] else f"{f}:"
                                                 for f in FIELDS)], what)
        if proc.returncode == 0:
            rows = [_Job(*line.split("|", len(FIELDS) - 1))
                    for line in proc.stdout.splitlines() if line.count("|") >= len(FIELDS) - 1]
            rows = [r for r in rows if r.number.isdigit()]
            if rows:
                return _ours(rows, name)
        elif "Invalid job id" not in proc.stderr:
            raise ExecutorError(f"Slurm's squeue failed to {what}: {self._said(proc)}")
        return self._accounting(name, number, what)

    def _accounting(self, name: str, number: str, what: str) -> _Job | None:
        """The job from Slurm's accounting, for one its controller has forgotten; None when
        accounting is off or has no record of it."""
        selector = [f"--jobs={number}"] if number else \
            [f"--name={name}", f"--user={os.getuid()}", "--starttime=now-30days"]
        proc = self._run(["sacct", "--noheader", "--parsable2", "--allocations", *selector,
                          "--format=" + ",".join(SACCT_FIELDS)], what)
        if proc.returncode != 0:
            if "accounting storage is disabled" in proc.stderr.lower():
                return None
            if any(word.lower() in proc.stderr.lower()
                   for word in ("slurmdbd", "database", "Connection refused")):
                raise EngineUnreachable(f"Slurm's accounting did not answer when asked to "
                                        f"{what}: {self._said(proc)}")
            raise ExecutorError(f"Slurm's sacct failed to {what}: {self._said(proc)}")
        rows = []
        for line in proc.stdout.splitlines():
            parts = line.split("|", len(SACCT_FIELDS) - 1)
            if len(parts) == len(SACCT_FIELDS) and parts[0].isdigit():
                number_, job_name, state, exit_code, nodes, work_dir = parts
                rows.append(_Job(number_, job_name, state, "", exit_code, nodes, work_dir))
        return _ours(rows, name)

    def _wait_final(self, number: str, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            job = self._find(f"@{number}")
            if job is None or STATES.get(job.state) in FINAL:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def _scancel(self, args: list[str], engine_id: str) -> None:
        proc = self._run(["scancel", *args], f"stop job {engine_id}")
        # a job that ended meanwhile cannot be signalled: that is what we wanted
        if proc.returncode != 0 and not any(
                word in proc.stderr for word in ("Invalid job id", "already completing",
                                                 "completed")):
            raise ExecutorError(f"Slurm's scancel failed to stop job {engine_id}: "
                                f"{self._said(proc)}")

    def _run(self, argv: list[str], what: str, stdin: str | None = None
             ) -> subprocess.CompletedProcess:
        """One client command; its own failures (not installed, no answer) as ExecutorError
        and EngineUnreachable, its refusals left to the caller (returncode and stderr)."""
        conf = os.environ.get("SLURM_CONF")
        if conf and not os.path.isfile(conf):  # else the command retries for 60 s, silently
            raise ExecutorError(f"SLURM_CONF={conf} is not a file: point it at the cluster's "
                                f"slurm.conf, or unset it to use /etc/slurm/slurm.conf")
        try:
            proc = subprocess.run(argv, input=stdin if stdin is not None else "",
                                  capture_output=True, text=True, timeout=self.timeout,
                                  errors="replace")
        except FileNotFoundError:
            raise ExecutorError(f"the lab's executor is slurm, but Slurm's `{argv[0]}` "
                                f"command is not installed here: {INSTALL}") from None
        except subprocess.TimeoutExpired:
            raise EngineUnreachable(f"Slurm did not answer within {self.timeout:.0f} s when "
                                    f"asked to {what} (`{argv[0]}`): is slurmctld up?") \
                from None
        except OSError as error:
            raise ExecutorError(f"could not run Slurm's `{argv[0]}` to {what}: {error}") \
                from None
        if proc.returncode != 0 and any(word in proc.stderr for word in UNREACHABLE):
            hint = ("start munged on this machine, with the cluster's key"
                    if "munge" in proc.stderr.lower() else
                    "is slurmctld running, and does this machine's slurm.conf (or SLURM_CONF) "
                    "name its host and port?")
            raise EngineUnreachable(f"no Slurm controller answers when asked to {what} "
                                    f"({self._said(proc)}): {hint}")
        if proc.returncode != 0 and "configuration" in proc.stderr and "fatal" in proc.stderr:
            raise ExecutorError(f"Slurm's `{argv[0]}` cannot read its configuration "
                                f"({self._said(proc)}): {INSTALL}")
        return proc

    @staticmethod
    def _said(proc: subprocess.CompletedProcess) -> str:
        """What a command said on stderr, in one line, without the noise of retries."""
        lines = [line.strip() for line in proc.stderr.splitlines()
                 if line.strip() and "retrying" not in line]
        return _one_line("; ".join(lines) or f"exit status {proc.returncode}")

    def _settings_hint(self, stderr: str) -> str:
        """The lab settings a refusal speaks of ("Invalid account or account/partition
        combination specified" speaks of two)."""
        text = stderr.lower()
        named = [f"{setting} = {value!r}" for word, setting, value in (
            ("partition", "slurm_partition", self.partition),
            ("account", "slurm_account", self.account),
            ("time", "slurm_time_limit", self.time_limit)) if word in text and value]
        return f" (lab setting{'s' if len(named) > 1 else ''} {', '.join(named)})" \
            if named else ""

    @staticmethod
    def _reason(reason: str) -> str:
        if reason in GLOSS:
            return f"{reason}: {GLOSS[reason]}"
        return reason
