"""Job subprocess entry point: `python -m app.worker JOB_ID --lab DIR` (started by the scheduler).

stdout and stderr go to the job's log.txt. The worker records its own final status; if it dies
without doing so, the scheduler records `failed` (or `interrupted` after a restart).

A job whose plugin's `resources` hook asks for more than one process on its device
(`Resources.processes(device)`: train and continue_pretrain with `gpus` or `cpu_processes`
> 1) is relaunched through `accelerate launch`, which starts `python -m app.worker JOB_ID
--lab DIR --rank` once per process (through torchrun; env RANK, LOCAL_RANK, WORLD_SIZE).
Rank 0 runs the plugin with the job context: it alone records metrics and progress, and
writes and registers checkpoints. The other ranks get a RankContext that records nothing and
reads the registry through a query-only
connection. This worker waits for the launch and records the job's final status.

A job spanning several nodes (`Resources.nodes`: the `nodes` field; the slurm and ray
executors) imports the inputs and writes the ranks' registry copy as above, then starts one
`app.worker JOB --node-launch` per node, each of which becomes its node's accelerate launch
(node_launch), meeting the others at machine rank 0's node. On Slurm the worker is the batch
step of a Slurm job of that many nodes, on the first, and srun's them (machine rank
SLURM_PROCID): node_launch_command. On Ray the worker is the job's entrypoint, reserving
nothing; it asks Ray for a placement group of one bundle per node (STRICT_SPREAD) and runs
each node's launch from an actor in its bundle (--machine-rank i): app/executors/ray.py
RayNodes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import plugins
from app.context import JobCancelled, JobContext, NewCheckpoint
from app.lab import Lab
from app.resources import free_port
from app.scheduler import log_tail
from registry import hub
from registry.store import now


def _on_sigterm(signum, frame):
    # Once: a second SIGTERM must not interrupt the clean-up of the first. A stuck clean-up
    # still ends with the canceller's SIGKILL after the grace period.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise JobCancelled()


def _auto_sync(lab: Lab, reg, ctx: JobContext) -> None:
    """Registry sync after a job (lab setting hub_sync_repo); a failure is logged, and the
    job still succeeded: the next sync sends the rows."""
    try:
        hub.sync_registry(reg, lab.settings.hub_sync_repo, log=ctx.log)
    except Exception as e:  # noqa: BLE001 - the Hub being down must not fail the job
        ctx.log(f"hub sync with {lab.settings.hub_sync_repo} failed: {e}")


# ------------------------------------------------------------- several processes per job
class RankFailed(Exception):
    """A launched job failed: the message is the first failing rank's own error."""


class RankContext(JobContext):
    """The job context of ranks 1..N-1 of a launched job. It reads the registry and records
    nothing: no log lines, progress, metrics, scores or checkpoints. Its new checkpoints are
    scratch folders under the job folder, removed at the end (every rank calls
    Trainer.save_model, a collective under FSDP; only rank 0 writes files)."""

    def log(self, message: str) -> None:
        pass

    def progress(self, work, message: str = "", total: int | None = None):
        return None if isinstance(work, (int, float)) else iter(work)

    def metric(self, name, value, step=None) -> None:
        pass

    def evaluation(self, checkpoint, task, metric, value, stderr=None, details=None) -> None:
        pass

    def reuse_scores(self, checkpoint, key) -> list[dict]:
        return []

    def open(self, ref: str):
        from registry import resolve_ref

        if resolve_ref(self.registry, ref).kind != "registry":  # the launcher imported it
            raise RuntimeError(f"rank {self.rank}: {ref} is not registered; only rank 0 may "
                               f"import checkpoints")
        return super().open(ref)

    def new_checkpoint(self, relation, parents, name=None, metadata=None,
                       intermediate=False) -> NewCheckpoint:
        path = self.work_dir / f"rank{self.rank}" / str(self._made)
        self._made += 1
        path.mkdir(parents=True, exist_ok=True)
        pending = NewCheckpoint(path=path, name=name or relation, relation=relation,
                                parents=[], metadata=metadata or {})
        self._pending.append(pending)
        return pending

    def new_dataset(self, path, name, metadata=None) -> dict:
        raise RuntimeError(f"rank {self.rank} of a launched job may not register datasets; "
                           f"only rank 0 (ctx.is_main_process) does")

    def suggest(self, plugin, config, label) -> None:
        pass

    def publish(self, pending: NewCheckpoint) -> dict:
        raise RuntimeError(f"rank {self.rank} of a launched job may not register checkpoints; "
                           f"gate the call with ctx.is_main_process")

    def publish_all(self) -> list[dict]:
        self.discard_all()
        return []

    def discard_all(self) -> None:  # only this rank's scratch: rank 0 owns the job's folders
        shutil.rmtree(self.work_dir / f"rank{self.rank}", ignore_errors=True)
        self._pending.clear()


def _explained(error: BaseException) -> bool:
    """Whether an error is the job's own account of bad input (a checkpoint, data or
    setting that does not fit, raised as ValueError or CheckpointError with a message that
    says what is wrong): its message is the whole story, and a traceback in the log would
    only bury it. Anything else gets its traceback; WEIGHTSMITH_DEBUG=1 prints them all."""
    from registry import CheckpointError

    if os.environ.get("WEIGHTSMITH_DEBUG"):
        return False
    return isinstance(error, (ValueError, CheckpointError, FileNotFoundError, RankFailed))


def processes_for(plugin: plugins.Plugin, config, device: str) -> int:
    """How many data-parallel processes the job runs as on its device (the plugin's
    `resources` hook)."""
    return plugin.needs(config).processes(device)


def launch_command(job_id: str, lab_root, processes: int, mode: str = "ddp",
                   remote: bool = False, machines: int = 1, machine_rank: int = 0,
                   main_address: str = "", main_port: int = 0) -> list[str]:
    """The `accelerate launch` command line that runs this job as `processes` ranks on this
    machine (`remote`: on a cluster node, whose ranks read RANKS_SNAPSHOT and never
    registry.db). With `machines` > 1 it is machine `machine_rank`'s share of a job spanning
    that many: accelerate's torchrun meets the others at main_address:main_port (machine rank
    0's), and numbers the ranks across machines (RANK 0 on machine 0).

    DDP uses accelerate's torchrun launcher (`--multi_gpu`) on GPUs and on CPU alike: its
    `--cpu` launcher starts a single process unless an MPI hostfile is given
    (accelerate/utils/launch.py: prepare_simple_launcher_cmd_env). On CPU the ranks choose
    the gloo backend themselves (TrainingArguments(use_cpu=True): DistributedType.MULTI_CPU).
    Port 0: accelerate picks a free port, so jobs launched side by side do not collide.
    Mixed precision is left to the Trainer (bf16 on GPUs that support it)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--num_processes", str(processes * machines),  # all machines' (accelerate's word)
           "--num_machines", str(machines)]
    if machines > 1:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", main_address,
                "--main_process_port", str(main_port)]
    else:
        cmd += ["--main_process_port", "0"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if mode == "fsdp":
        # full shards per decoder layer (the model's _no_split_modules); orig params so that
        # frozen and trainable parameters (LoRA, freeze, HFT) may share a unit; the final and
        # intermediate checkpoints are gathered whole on rank 0 (FULL_STATE_DICT), so they
        # are ordinary HF checkpoints.
        cmd += ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
                "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_use_orig_params", "true",
                "--fsdp_sync_module_states", "true"]
    else:
        cmd += ["--multi_gpu"]
    return cmd + ["--module", "app.worker", job_id, "--lab", str(lab_root), "--rank"] + \
        (["--remote"] if remote else [])


def node_command(job_id: str, lab_root, nodes: int, processes: int, mode: str,
                 main_address: str, main_port: int, machine_rank: int | None = None) -> list[str]:
    """`app.worker JOB --node-launch ...`: one node's share of a job spanning `nodes`
    (node_launch); `machine_rank` None: the node reads it from SLURM_PROCID."""
    return [sys.executable, "-m", "app.worker", job_id, "--lab", str(lab_root),
            "--remote", "--node-launch", "--nodes", str(nodes), "--processes", str(processes),
            "--distributed", mode, "--main-address", main_address,
            "--main-port", str(main_port)] + \
        ([] if machine_rank is None else ["--machine-rank", str(machine_rank)])


def node_launch_command(job_id: str, lab_root, nodes: int, processes: int, mode: str,
                        main_address: str, main_port: int) -> list[str]:
    """The `srun` command line, run by a job's worker in its Slurm allocation, that starts
    one `app.worker JOB --node-launch` on each of its `nodes` nodes (each then execs its
    node's accelerate launch: node_launch). srun places the tasks and forwards their output
    into the job log; --kill-on-bad-exit ends every node's share as soon as one fails,
    instead of leaving the others waiting in the rendezvous. A SIGTERM to srun would make it
    SIGKILL its tasks at once, so a Stop signals the tasks themselves and then the worker
    alone (app/executors/slurm.py stop), which waits for srun (_launch_here).
    --export=ALL: the job was submitted with --export=NONE, which Slurm also makes the
    default of the job's own sruns (SLURM_EXPORT_ENV), and the tasks need this environment.
    --cpus-per-task: srun 22.05 no longer reads the job's SLURM_CPUS_PER_TASK."""
    cmd = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
           "--kill-on-bad-exit=1", "--export=ALL"]
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        cmd.append(f"--cpus-per-task={os.environ['SLURM_CPUS_PER_TASK']}")
    return cmd + node_command(job_id, lab_root, nodes, processes, mode, main_address,
                              main_port)


def _scontrol(*args: str) -> str:
    try:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RankFailed(f"Slurm's `scontrol {' '.join(args)}` failed on this node: {e}") \
            from None
    if proc.returncode != 0:
        raise RankFailed(f"Slurm's `scontrol {' '.join(args)}` failed on this node: "
                         f"{' '.join(proc.stderr.split())[:300]}")
    return proc.stdout


def slurm_main_node(nodes: int) -> str:
    """The address where the nodes of this Slurm job meet: the first node of the
    allocation, where srun puts task 0 (machine rank 0), at its NodeAddr (the address Slurm
    itself reaches it by). It is this node: Slurm runs the batch step, this worker, there
    (checked), so the port is found free here (app.resources.free_port)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    allocated = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or ""
    if not nodelist:
        raise ValueError(f"field 'nodes': got {nodes}; this job's worker runs on the slurm "
                         f"executor (lab setting executor) but is not in a Slurm job")
    if allocated != str(nodes):
        raise ValueError(f"field 'nodes': got {nodes}, and this job's Slurm allocation has "
                         f"{allocated or 'an unknown number of'} nodes ({nodelist})")
    names = _scontrol("show", "hostnames", nodelist).split()
    here = os.environ.get("SLURMD_NODENAME", "")
    if not names or (here and names[0] != here):
        # srun puts task 0 (machine rank 0, which hosts the rendezvous) on the allocation's
        # first node, where Slurm also runs the batch step; anything else would hang there
        raise RankFailed(f"this job's worker runs on node {here or '?'}, not on the first "
                         f"node of its allocation ({nodelist}): the nodes could not meet")
    first = names[0]
    words = _scontrol("show", "node", first, "--oneliner").split()
    return next((w.split("=", 1)[1] for w in words if w.startswith("NodeAddr=")), first)


def node_launch(lab_root: Path, job_id: str, nodes: int, processes: int, mode: str,
                main_address: str, main_port: int, machine_rank: int | None = None) -> int:
    """One node's share of a job spanning `nodes`: becomes that node's accelerate launch,
    machine rank `machine_rank` (on Ray: the bundle's index, RayNodes), or SLURM_PROCID when
    it is None (task SLURM_PROCID of node_launch_command's srun, one per node). Its ranks read
    their own copy of the launching worker's RANKS_SNAPSHOT (run_remote_rank)."""
    import socket

    from registry.journal import RANKS_SNAPSHOT

    job_dir = lab_root / "jobs" / job_id
    host = socket.gethostname()
    if not (job_dir / RANKS_SNAPSHOT).is_file():  # said into the job log, through srun
        print(f"error: node {host} cannot see the lab's job folder {job_dir} (no "
              f"{RANKS_SNAPSHOT} there). The lab folder must be on storage that every node "
              f"of the cluster mounts at the same path; see the README's \"Running on a "
              f"cluster\".", file=sys.stderr, flush=True)
        return 2
    if machine_rank is not None:
        if not 0 <= machine_rank < nodes:
            print(f"error: node {host}: --machine-rank is {machine_rank}; expected 0 to "
                  f"{nodes - 1}", file=sys.stderr, flush=True)
            return 2
        rank = str(machine_rank)
    else:
        rank = os.environ.get("SLURM_PROCID", "")
        if not rank.isdigit() or int(rank) >= nodes:
            print(f"error: node {host}: SLURM_PROCID is {rank!r}; expected a task of an srun "
                  f"of {nodes} tasks", file=sys.stderr, flush=True)
            return 2
    cmd = launch_command(job_id, lab_root, processes, mode, remote=True, machines=nodes,
                         machine_rank=int(rank), main_address=main_address,
                         main_port=main_port)
    node = os.environ.get("SLURMD_NODENAME", host)
    print(f"node {rank} of {nodes} ({node}): {shlex.join(cmd)}", flush=True)
    os.chdir(job_dir)
    # exec, not a child: srun's task, whose exit code srun reports and which Slurm signals,
    # is then this node's torchrun itself
    os.execv(cmd[0], cmd)
    return 2  # not reached


def launch(ctx: JobContext, plugin: plugins.Plugin, config, processes: int,
           remote: bool = False, nodes: int = 1) -> list[dict]:
    """Run the job as `processes` ranks (on each of `nodes` Slurm or Ray nodes) through
    accelerate launch and wait; returns the checkpoints rank 0 registered. Raises RankFailed
    with the failing rank's error. `remote`: a cluster job (run_remote), whose registry is a
    journaled copy on this node."""
    from registry.journal import JOURNAL, RANKS_SNAPSHOT

    mode = plugin.needs(config).distributed
    on_ray = nodes > 1 and ctx.job.get("executor") == "ray"
    with contextlib.ExitStack() as stack:
        if nodes > 1:  # before any import: a worker that cannot have the nodes stops here
            if not remote:
                raise ValueError(f"field 'nodes': got {nodes}; several nodes need the slurm "
                                 f"or ray executor (lab setting executor)")
            if on_ray:  # the nodes are placed (or the job fails) before the imports
                ray_nodes = stack.enter_context(_ray_nodes(ctx, nodes, processes))
            else:
                main_address = slurm_main_node(nodes)
        for _, ref in plugins.checkpoint_refs(config):
            ctx.open(ref)  # a folder or Hub id is imported here, once, not by every rank
        journal = ctx.work_dir / JOURNAL
        start = journal.stat().st_size if journal.exists() else 0
        if remote:  # the ranks' registry: this copy, with the imports just journaled
            ctx.registry.snapshot(ctx.work_dir / RANKS_SNAPSHOT)
        for old in ctx.work_dir.glob("error-rank*.txt"):
            old.unlink()
        if on_ray:
            _launch_on_ray(ctx, ray_nodes, nodes, processes, mode)
            code = 0
        else:
            code = _launch_here(ctx, nodes, processes, mode, remote,
                                main_address if nodes > 1 else "")
    if code != 0:
        errors = sorted(ctx.work_dir.glob("error-rank*.txt"),
                        key=lambda f: int(f.stem[len("error-rank"):]))
        raise RankFailed(errors[0].read_text() if errors else
                         f"srun of the job's {nodes} node launches exited with code {code}"
                         if nodes > 1 else
                         f"accelerate launch of {processes} processes exited with code {code}")
    if remote:  # rank 0 journaled them from its own copy: this one never saw them
        from registry.journal import Journal

        made, at = [], start
        while True:
            lines = list(Journal(journal).read(at))
            if not lines:
                return made
            at = lines[-1][0]
            made += [{"id": entry["args"].get("id")} for _, entry, _ in lines
                     if entry and entry.get("call") == "add_checkpoint"]
    with ctx.lab.registry() as reg:
        return [reg.checkpoint(c) for c in reg.job_checkpoints(ctx.job_id)]


def _launch_here(ctx: JobContext, nodes: int, processes: int, mode: str, remote: bool,
                 main_address: str) -> int:
    """The launch as a child of this worker: accelerate launch on this machine, or (several
    Slurm nodes) srun of one launch per node. Returns its exit code."""
    if nodes > 1:
        cmd = node_launch_command(ctx.job_id, ctx.lab.root, nodes, processes, mode,
                                  main_address, free_port())
        what = f"on {nodes} nodes, {processes} process{'es' if processes > 1 else ''} " \
               f"each ({mode})"
    else:
        cmd = launch_command(ctx.job_id, ctx.lab.root, processes, mode, remote)
        what = f"{processes} processes ({mode})"
    ctx.log(f"launching {what}: {shlex.join(cmd)}")
    # Same stdout (the job log) and process group: Stop reaches the launcher, and kill_tree
    # finds the ranks (torchrun starts them in sessions of their own) as descendants. Under
    # srun every node's ranks are srun's tasks.
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, cwd=str(ctx.work_dir))
    except FileNotFoundError:
        raise RankFailed(f"`{cmd[0]}` is not on the PATH of node {os.uname().nodename}, "
                         f"where the job's worker runs") from None
    try:
        return proc.wait()
    except JobCancelled:
        if nodes == 1:
            proc.terminate()
        # else not srun: it answers a SIGTERM by SIGKILLing its tasks on every node (Slurm's
        # srun_job.c: "forcing job termination"). A Stop's scancel signals the tasks itself
        # (app/executors/slurm.py stop), so each node's torchrun gives its ranks their
        # SIGTERM and srun ends when they have; it is killed only after the grace.
        try:
            proc.wait(timeout=ctx.lab.settings.cancel_grace_seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        # the scratch of a rank that had no chance to clean up (a SIGKILL after the grace);
        # the job's partial checkpoints go with discard_all
        for scratch in ctx.work_dir.glob("rank[0-9]*"):
            shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _ray_nodes(ctx: JobContext, nodes: int, processes: int):
    """The job's nodes on Ray (app/executors/ray.py RayNodes: one placement-group bundle of
    `processes` CPUs, and as many GPUs on a GPU job, on each node), its errors as RankFailed
    (a job's own account: no traceback). Leaving it stops whatever still runs on the nodes
    and removes the placement group."""
    from app.executors import ExecutorError
    from app.executors.ray import NodesCancelled, RayNodes

    gpus = processes if str(ctx.job.get("device") or "").endswith("cuda") else 0
    cluster = RayNodes(ctx.job_id, ctx.work_dir, nodes, processes, gpus,
                       ctx.lab.settings.cancel_grace_seconds, ctx.log)
    # a Stop: RayNodes gives it to this worker's SIGTERM handler when it is done (JobCancelled);
    # NodesCancelled comes through only without that handler
    try:
        cluster.__enter__()
    except ExecutorError as e:
        raise RankFailed(str(e)) from None
    except NodesCancelled:
        raise JobCancelled() from None
    try:
        yield cluster
    except NodesCancelled:
        raise JobCancelled() from None
    except ExecutorError as e:
        raise RankFailed(str(e)) from None
    finally:
        try:
            cluster.__exit__(None, None, None)
        finally:
            for scratch in ctx.work_dir.glob("rank[0-9]*"):  # as in _launch_here
                shutil.rmtree(scratch, ignore_errors=True)


def _launch_on_ray(ctx: JobContext, cluster, nodes: int, processes: int, mode: str) -> None:
    """Every node's launch from its Ray actor (node_launch, --machine-rank i), meeting at node
    0's address on a port free there; raises RankFailed with the error of the rank that failed
    first (the earliest error file: a rank whose peer died fails after it, with gloo's words),
    else with what the failing node said."""
    from app.executors.ray import NodesFailed

    def command(i: int, main_address: str, main_port: int) -> list[str]:
        return node_command(ctx.job_id, ctx.lab.root, nodes, processes, mode, main_address,
                            main_port, machine_rank=i)

    ctx.log(f"launching on {nodes} nodes, {processes} process{'es' if processes > 1 else ''} "
            f"each ({mode}), through Ray")
    try:
        cluster.run(command)  # logs node 0's command line
    except NodesFailed as failed:
        errors = sorted(ctx.work_dir.glob("error-rank*.txt"),
                        key=lambda f: (f.stat().st_mtime_ns, int(f.stem[len("error-rank"):])))
        place = cluster.places[failed.node]
        raise RankFailed(errors[0].read_text() if errors else failed.note or
                         f"node {failed.node}'s launch (Ray node {place['node_id']}, "
                         f"{place['ip']}) exited with code {failed.code}") from None


def run_rank(lab: Lab, job_id: str) -> int:
    """One rank of a launched job (`app.worker JOB --lab DIR --rank`, env RANK, WORLD_SIZE)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    reg = lab.registry()
    job = reg.job(job_id)
    if rank == 0:
        ctx = JobContext(lab, reg, job)
    else:
        reg.read_only()  # a write here raises: rank 0 records
        ctx = RankContext(lab, reg, job)
    ctx.rank, ctx.world_size = rank, world
    try:
        plugin = plugins.get(job["plugin"])
        config = plugins.validate_config(plugin, json.loads(job["config"]))
        if ctx.device == "cuda":  # "cuda" is then this rank's GPU: models load straight there
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        ctx.log(f"running as rank {rank} of {world} on {job['device']}")
        plugin.run(config, ctx)
        _distributed("barrier")  # every rank finished before rank 0 registers the results
        ctx.publish_all()
        return 0
    except JobCancelled:
        ctx.discard_all()
        # in the job log: the rank had its grace (a SIGKILL leaves no such line)
        print(f"rank {rank} of {world}: stopped, its partial output removed", flush=True)
        return 143
    except BaseException as e:  # noqa: BLE001 - the launching worker reports it
        ctx.discard_all()
        traceback.print_exc()
        (ctx.work_dir / f"error-rank{rank}.txt").write_text(
            hub.redact(f"{type(e).__name__}: {e}"))
        return 1
    finally:
        _distributed("destroy_process_group")
        reg.close()


def _distributed(call: str) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        getattr(dist, call)()


def _quiet_progress_bars() -> None:
    """No tqdm bars in the job log (transformers' "Loading weights" on every model load, Hub
    downloads): in a file they are lines of carriage returns. ctx.progress reports instead.
    Called per job, so a fork-server child (whose imports came before its environment) is
    quiet too."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weightsmith-worker")
    parser.add_argument("job_id")
    parser.add_argument("--lab", required=True)
    parser.add_argument("--rank", action="store_true",
                        help="one of the processes of a launched job (see launch_command)")
    parser.add_argument("--remote", action="store_true",
                        help="started by a cluster engine, maybe on another node: never opens "
                             "registry.db (registry/journal.py)")
    parser.add_argument("--node-launch", action="store_true",
                        help="one node's share of a job spanning several Slurm or Ray nodes "
                             "(see node_launch_command, RayNodes); with the options below")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--processes", type=int, default=1, help="on each node")
    parser.add_argument("--distributed", default="ddp", choices=("ddp", "fsdp"))
    parser.add_argument("--main-address", default="")
    parser.add_argument("--main-port", type=int, default=0)
    parser.add_argument("--machine-rank", type=int, default=None,
                        help="this node's machine rank (Ray); default: SLURM_PROCID")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)

    if args.node_launch:
        return node_launch(Path(args.lab), args.job_id, args.nodes, args.processes,
                           args.distributed, args.main_address, args.main_port,
                           args.machine_rank)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.remote and args.rank:
        return run_remote_rank(Path(args.lab), args.job_id)
    if args.remote:
        return run_remote(Path(args.lab), args.job_id)
    sys.stdout, sys.stderr = hub.RedactingStream(sys.stdout), hub.RedactingStream(sys.stderr)
    _quiet_progress_bars()
    lab = Lab(args.lab)
    if args.rank:
        return run_rank(lab, args.job_id)
    return run_job(lab, args.job_id)


def run_remote(lab_root: Path, job_id: str) -> int:
    """A job a cluster engine started (app/executors): the lab folder is shared storage,
    the registry is the job folder's snapshot and journal (registry/journal.py), and the
    log is the job folder's log.txt, as for a job on the server's machine."""
    import socket
    import tempfile

    from registry.journal import SNAPSHOT, JournalRegistry

    job_dir = lab_root / "jobs" / job_id
    if not (job_dir / SNAPSHOT).is_file():  # said on stderr: the engine's log keeps it
        print(f"error: node {socket.gethostname()} cannot see the lab's job folder {job_dir} "
              f"(no {SNAPSHOT} there). The lab folder must be on storage that every node of "
              f"the cluster mounts at the same path; see the README's \"Running on a "
              f"cluster\".", file=sys.stderr, flush=True)
        return 2
    log_fd = os.open(job_dir / "log.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout, sys.stderr = hub.RedactingStream(sys.stdout), hub.RedactingStream(sys.stderr)
    _quiet_progress_bars()
    local = Path(tempfile.mkdtemp(prefix=f"weightsmith-{job_id}-"))  # this node's own disk
    try:
        lab = Lab(lab_root, create=False)
        lab.open_registry = lambda: JournalRegistry.open(job_dir, local)
        print(f"job {job_id}: on node {socket.gethostname()}; registry: a snapshot, "
              f"written back through {job_dir.name}/registry-journal.jsonl", flush=True)
        return run_job(lab, job_id, remote=True)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def run_remote_rank(lab_root: Path, job_id: str) -> int:
    """One rank of a launched cluster job: its registry is its own copy of the launching
    worker's (RANKS_SNAPSHOT, on this rank's node), and rank 0 journals to the job's journal
    as the launching worker does (which waits meanwhile). Its output is the launcher's: the
    job's log."""
    import tempfile

    from registry.journal import RANKS_SNAPSHOT, JournalRegistry

    sys.stdout, sys.stderr = hub.RedactingStream(sys.stdout), hub.RedactingStream(sys.stderr)
    _quiet_progress_bars()
    job_dir = lab_root / "jobs" / job_id
    if not (job_dir / RANKS_SNAPSHOT).is_file():  # the launcher's error file says it all
        import socket

        said = (f"node {socket.gethostname()} cannot see the lab's job folder {job_dir} (no "
                f"{RANKS_SNAPSHOT} there): the lab folder must be on storage that every node "
                f"mounts at the same path")
        print(f"error: {said}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):  # (the folder may not be there at all)
            (job_dir / f"error-rank{os.environ['RANK']}.txt").write_text(said)
        return 2
    local = Path(tempfile.mkdtemp(prefix=f"weightsmith-{job_id}-rank{os.environ['RANK']}-"))
    try:
        lab = Lab(lab_root, create=False)
        lab.open_registry = lambda: JournalRegistry.open(job_dir, local, RANKS_SNAPSHOT)
        return run_rank(lab, job_id)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def run_job(lab: Lab, job_id: str, remote: bool = False) -> int:
    """Run one job in this process (or through accelerate launch) and record its end."""
    reg = lab.registry()
    job = reg.job(job_id)
    ctx = JobContext(lab, reg, job)
    ctx.log(f"job {job['id']}: plugin {job['plugin']} on {job['device']}")
    try:
        plugin = plugins.get(job["plugin"])
        config = plugins.validate_config(plugin, json.loads(job["config"]))
        device = job["device"] or "cpu"
        processes = processes_for(plugin, config, device.split(":")[-1] if remote else device)
        nodes = plugin.needs(config).nodes
        if processes > 1 or nodes > 1:
            created = launch(ctx, plugin, config, processes, remote, nodes)
        else:
            plugin.run(config, ctx)
            created = ctx.publish_all()
        reg.update_job(job["id"], only_if_status=("running",), status="succeeded",
                       progress=1.0, finished_at=now(), exit_code=0)
        ctx.log(f"job {job['id']} succeeded; checkpoints: "
                f"{', '.join(r['id'] for r in created) or 'none'}")
        if lab.settings.hub_sync_repo and not remote:  # a remote job's: the server's, after
            _auto_sync(lab, reg, ctx)
        return 0
    except JobCancelled:
        ctx.discard_all()
        ctx.log("cancelled: partial output removed")
        reg.update_job(job["id"], only_if_status=("running",), status="cancelled",
                       finished_at=now(), error="cancelled by user", exit_code=143)
        return 143
    except BaseException as e:  # noqa: BLE001 - every failure must be recorded on the job
        ctx.discard_all()
        if not _explained(e):
            traceback.print_exc()
        what = str(e) if isinstance(e, RankFailed) else f"{type(e).__name__}: {e}"
        ctx.log(f"job failed: {what}")
        sys.stdout.flush()
        status = "cancelled" if reg.job(job["id"])["cancel_requested"] else "failed"
        reg.update_job(job["id"], only_if_status=("running",), status=status,
                       finished_at=now(), error=hub.redact(f"{what}\nlast log lines:\n"
                                                           + log_tail(job["log_path"])),
                       exit_code=1)
        return 1
    finally:
        reg.close()


if __name__ == "__main__":
    code = main()
    # The job's status, log and files are final here. Skip the interpreter's teardown: with
    # torch and transformers loaded it takes about half a second, paid by every job before
    # the scheduler (or `run --wait`) sees the process end.
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
