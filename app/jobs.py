"""Submitting and cancelling jobs: the one code path behind the CLI, the UI and the scheduler."""

from __future__ import annotations

import os
import shutil
import socket
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

import plugins
from app.lab import Lab
from app.resources import detect_gpus, kill_tree, process_alive
from ops import safe_yaml
from registry import RefError, resolve_ref
from registry.store import now

TRACKED_LIBRARIES = ("weightsmith", "torch", "transformers", "peft", "mergekit", "accelerate",
                     "huggingface-hub")


def library_versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (no heavy imports)."""
    out = {}
    for name in TRACKED_LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: a config file is settings; data lives in its own files


def _read_text_config(path: Path) -> bytes:
    """The bytes of a config file, once they are known to be UTF-8 text of at most
    MAX_CONFIG_BYTES: a folder, a device, a binary file or a NUL byte is a ConfigError naming
    the file, found before anything parses it (and a huge file is never read whole)."""
    def refuse(why: str) -> plugins.ConfigError:
        return plugins.ConfigError("config", [f"config file {path}: {why}"])

    try:
        if not path.is_file():  # a folder, a FIFO or a device (/dev/zero) never ends well
            raise refuse("not a regular file; expected a YAML file")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise refuse(f"{size} bytes; expected at most {MAX_CONFIG_BYTES} (1 MiB)")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # the file may have grown since stat
    except OSError as e:
        raise refuse(f"cannot be read ({e.strerror or e}); expected a readable YAML "
                     f"file") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise refuse(f"more than {MAX_CONFIG_BYTES} bytes; expected at most 1 MiB")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise refuse(f"contains a NUL byte at byte {nul}; expected a YAML text file, not a "
                     f"binary one")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise refuse(f"not UTF-8 text (invalid byte at {e.start}); expected a YAML text "
                     f"file, not a binary one") from None
    return raw


def load_config_file(path: str | Path, plugin: str | plugins.Plugin | None = None) -> dict:
    """A config file as a mapping of field: value, through the bounded YAML reader (no
    expanding aliases, at most 1 MiB). With `plugin`, a file in the format of the tool the
    plugin replaces (a plain mergekit YAML for merge) becomes that plugin's config
    (`as_plugin_config`)."""
    path = Path(path)
    if not path.exists():
        raise plugins.ConfigError("config", [f"config file {path} does not exist"])
    raw = _read_text_config(path)
    try:
        data = safe_yaml.load(raw, what=str(path)) or {}
    except safe_yaml.YamlError as e:
        raise plugins.ConfigError("config", [str(e)]) from None
    if not isinstance(data, dict):
        raise plugins.ConfigError("config", [f"{path}: expected a mapping of field: value"])
    return data if plugin is None else as_plugin_config(plugin, data, where=str(path))


def foreign_format(plugin: plugins.Plugin, data: dict) -> bool:
    """Whether a config file's mapping is not the plugin's own config but may be one in the
    format of the tool it replaces: the plugin has a foreign_config hook, and some top-level
    key is no field of its Config (a mergekit file's merge_method, for merge). A file of
    only the plugin's fields is its own, whatever the hook would say."""
    if plugin.foreign_config is None or not data:
        return False
    fields = set(plugin.Config.model_fields)
    fields |= {f.alias for f in plugin.Config.model_fields.values() if f.alias}
    return any(not isinstance(key, str) or key not in fields for key in data)


def as_plugin_config(plugin: str | plugins.Plugin, data: dict, where: str = "config") -> dict:
    """`data` as the plugin's config: itself when it is one (or no hook recognises it: the
    validation names its unknown fields), else what the plugin's foreign_config makes of
    it. A hook that fails is a ConfigError naming the file, never a traceback."""
    plugin = plugins.get(plugin) if isinstance(plugin, str) else plugin
    if not foreign_format(plugin, data):
        return data
    try:
        converted = plugin.foreign_config(data)
    except Exception as e:  # noqa: BLE001 -- a plugin's hook on hostile data: say so, by file
        raise plugins.ConfigError(plugin.name, [
            f"config file {where}: not a {plugin.name} config, and {plugin.name} could not "
            f"read it as a file of the tool it replaces ({type(e).__name__}: "
            f"{str(e)[:300]})"]) from None
    if converted is None:
        return data
    if not isinstance(converted, dict):
        raise plugins.ConfigError(plugin.name, [
            f"config file {where}: {plugin.name}'s foreign_config returned "
            f"{type(converted).__name__}; expected a mapping of field: value"])
    return converted


def check_config(lab: Lab, plugin_name: str, data: dict):
    """Validate a config and every checkpoint reference in it, before anything is queued."""
    from app.datasets import resolve_refs

    plugin = plugins.get(plugin_name)
    data = resolve_refs(lab, plugin, data)  # a registered dataset's id: its file
    config = plugins.validate_config(plugin, data)
    problems = []
    with lab.registry() as reg:
        for field, ref in plugins.checkpoint_refs(config):
            try:
                resolve_ref(reg, ref)
            except RefError as e:
                problems.append(f"field '{field}': {e}")
    needs = plugin.needs(config)
    if needs.requires_gpu or needs.gpus > 1:  # what the lab has (nvidia-smi) only if it matters
        field, why = needs.requires_gpu or (
            "gpus", f"got {needs.gpus}; the job needs {needs.gpus} GPUs at once")
        have = lab_gpus(lab)
        if not have and needs.requires_gpu:
            problems.append(f"field '{field}': {why}, and this lab has none (set `gpus` in "
                            f"lab.toml if it has)")
        elif have and needs.gpus > len(have):
            problems.append(f"field '{field}': {why}, and this lab has {len(have)} "
                            f"({', '.join(map(str, have))})")
    problems += node_problems(lab, needs)
    from app.paths import config_problems, missing_paths, restricted

    problems += config_problems(lab, config, plugin)  # a shared lab reads only inside its roots
    if not problems:
        problems += missing_paths(config, plugin)
    if not problems and plugin.lab_problems:  # the plugin's own checks that need the lab
        facts = plugins.LabFacts(gpus=tuple(lab_gpus(lab)), shared=restricted(lab),
                                 suites_dir=lab.root / "suites")
        problems += plugin.problems_in_lab(config, facts)
    if problems:
        raise plugins.ConfigError(plugin_name, problems)
    return plugin, config


def node_problems(lab: Lab, needs: plugins.Resources) -> list[str]:
    """A job spanning several nodes (Resources.nodes, the config field `nodes`): the slurm
    executor gives a job a set of nodes at once (app/worker.py srun's one launch per node),
    and so does ray (a placement group of one bundle per node, STRICT_SPREAD:
    app/executors/ray.py RayNodes); the local scheduler runs a job on this one machine."""
    if needs.nodes <= 1:
        return []
    got = f"field 'nodes': got {needs.nodes}"
    if not needs.data_parallel:
        return [f"{got}; this job runs as one process, which cannot span nodes: expected 1"]
    if lab.settings.executor in ("slurm", "ray"):
        return []
    return [f"{got}; several nodes need the slurm or ray executor (lab setting executor)"]


def lab_gpus(lab: Lab) -> list[int]:
    return lab.settings.gpus if lab.settings.gpus is not None else detect_gpus()


def submit(lab: Lab, plugin_name: str, data: dict, *, user: str | None = None,
           priority: int = 0) -> dict:
    """Validate and queue a job; returns its registry row. Raises ConfigError on bad input."""
    from app.datasets import config_datasets, record

    plugin, config = check_config(lab, plugin_name, data)
    config_dict = config.model_dump(mode="json")
    # the data it reads, by content hash (hashed here, before any write; recorded with the job)
    read = config_datasets(lab, config, plugin)
    field = plugin.resume_field
    resumed = getattr(config, field) if field else None
    if resumed:  # resuming reads that job's saved state: its owner's or an admin's to do
        from app.auth import NotAllowed, check_owner

        with lab.registry() as reg:
            prior = reg.job(resumed, missing_ok=True)
        if prior is None:
            raise plugins.ConfigError(plugin_name, [f"field '{field}': no job {resumed}"])
        try:
            check_owner(lab, user or lab.settings.default_user, prior["user"],
                        f"resume job {resumed}")
        except NotAllowed as e:
            raise plugins.ConfigError(plugin_name, [f"field '{field}': {e}"]) from None
    with lab.registry() as reg:
        job = reg.add_job(plugin=plugin.name, config=config_dict,
                          user=user or lab.settings.default_user, priority=priority,
                          versions=library_versions(), gpus=max(1, plugin.needs(config).gpus))
        from app.auth import audit

        job_dir = lab.job_dir(job["id"])
        try:  # nothing half-queued: a full disk here takes the row back out
            job_dir.mkdir(parents=True, exist_ok=True)
            (job_dir / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
            reg.update_job(job["id"], job_dir=str(job_dir), log_path=str(job_dir / "log.txt"))
            for data_field, facts in read:
                dataset = record(reg, facts, job["user"])
                reg.datasets.use(job["id"], dataset["id"], data_field)
            audit(reg, job["user"], "job.submit", job["id"], {"plugin": plugin.name})
        except BaseException:
            try:  # unless a scheduler has started it meanwhile: then it is the job's folder
                taken_back = reg.take_back_job(job["id"])
            except Exception:  # noqa: BLE001 - the first error is the one to report
                taken_back = 0
            if taken_back:
                shutil.rmtree(job_dir, ignore_errors=True)
            raise
        job = reg.job(job["id"])
    # once the job is whole (its folder and config written): the scheduler, in whichever
    # process, starts it now rather than at its next poll; no scheduler running is fine
    wake_scheduler(lab)
    return job


def wake_scheduler(lab: Lab) -> bool:
    """Ask the lab's scheduler, in whichever process on this machine runs it, for a pass now
    (a job was queued, or one ended): one datagram on the socket it binds in the lab folder
    (Lab.wake_socket). Best-effort: it never blocks and never raises, since
    the scheduler's poll starts the job anyway. True if a scheduler was listening."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(b"\0", str(lab.wake_socket))
        return True
    except BlockingIOError:  # its queue is full of wake-ups it has not read yet: it will pass
        return True
    except OSError:  # no scheduler (no file, or a killed one's: refused), a path too long
        return False  # for a socket address (the scheduler polls then), no permission


AUTO_EVAL_PRIORITY = -10  # behind user jobs (0): the scheduler starts higher priorities first


def queue_auto_eval(lab: Lab, checkpoint: dict, *, source_plugin: str | None = None,
                    log=None) -> dict | None:
    """Queue the lab's automatic evaluation of a newly registered checkpoint, if the lab has
    it on (`auto_eval` in lab.toml); returns the job row, or None. Never for an evaluation's
    own imports, nor for artifacts that are not models (task vectors...)."""
    if not lab.settings.auto_eval or source_plugin == "evaluate" or \
            (checkpoint.get("kind") or "model") != "model" or not checkpoint.get("path"):
        return None
    data = {"checkpoint": checkpoint["id"], "suite": lab.settings.auto_eval_suite}
    try:
        job = submit(lab, "evaluate", data, user="auto-eval", priority=AUTO_EVAL_PRIORITY)
    except plugins.ConfigError as e:  # a bad suite setting must not fail the producing job
        if log:
            log(f"auto-eval not queued for {checkpoint['id']}: {e}")
        return None
    if log:
        log(f"auto-eval: queued {job['id']} (suite {lab.settings.auto_eval_suite}) for "
            f"{checkpoint['id']}")
    return job


# ---------------------------------------------------------------------------- processes
def cancel(lab: Lab, job_id: str, user: str | None = None) -> dict:
    """Cancel a queued or running job; a running one loses its whole process tree.

    Works from any process (CLI, UI, scheduler): everything needed is in the registry.
    `user`: who asks (None: the lab itself, e.g. the scheduler). Only the job's owner or an
    admin may cancel it (app.auth.NotAllowed otherwise); the cancel is audited.
    """
    from app.auth import audit, check_owner

    with lab.registry() as reg:
        job = reg.job(job_id)
        check_owner(lab, user, job["user"], f"cancel job {job_id}")
        if job["status"] in ("queued", "running"):
            audit(reg, user or "lab", "job.cancel", job_id, {"status": job["status"]})
        if job["status"] == "queued":
            if reg.update_job(job_id, only_if_status=("queued",), status="cancelled",
                              cancel_requested=1, finished_at=now()):
                return reg.job(job_id)
            job = reg.job(job_id)
        if job["status"] != "running":
            return job
        reg.update_job(job_id, cancel_requested=1)
        if job.get("executor"):  # the engine ends the worker's whole process tree
            from app.executors import executor_for

            # what it wrote before it stopped is replayed by the scheduler's next pass
            executor_for(lab.settings, job["executor"]).stop(job["engine_id"] or job_id)
        elif process_alive(job["pid"], job["pid_started"]):
            kill_tree(job["pid"], lab.settings.cancel_grace_seconds)
        reg.update_job(job_id, only_if_status=("running",), status="cancelled",
                       finished_at=now(), error="cancelled by user")
        if job.get("executor"):
            from registry.journal import remove_snapshots

            remove_snapshots(job["job_dir"] or lab.job_dir(job_id))
        lab.remove_job_tmp(job_id)
        job = reg.job(job_id)
    wake_scheduler(lab)  # its slot is free: the next queued job need not wait for the poll
    return job


def job_summary(lab: Lab, job_id: str) -> dict:
    with lab.registry() as reg:
        job = reg.job(job_id)
        return {"job": job_id, "status": job["status"],
                "checkpoints": reg.job_checkpoints(job_id),
                **({"error": job["error"]} if job["error"] else {})}


def preview(lab: Lab, plugin_name: str, data: dict, timeout: float = 180) -> str:
    """The plugin's data preview for a config (markdown), computed in a subprocess so that
    the server never imports torch. Raises ConfigError on bad input, like submit."""
    import subprocess
    import sys
    import tempfile

    plugin, config = check_config(lab, plugin_name, data)
    if plugin.preview is None:
        return f"{plugin.title} has no data preview."
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config.model_dump(mode="json"), f)
    try:
        proc = subprocess.run([sys.executable, "-m", "app.cli", "preview", plugin_name, f.name,
                               "--lab", str(lab.root)], capture_output=True, text=True,
                              timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return f"**Preview took more than {timeout:.0f} s and was stopped.**"
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        from plugins.kit import markup

        return "**Preview failed:** " + markup.md(lines[-1] if lines else
                                                 f"exit {proc.returncode}")
    return proc.stdout
