"""A lab is a folder: registry.db, checkpoints/, jobs/ and an optional lab.toml of settings."""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from registry import Registry

LAB_ENV = "WEIGHTSMITH_LAB"
DEFAULT_LAB = "lab"


class SettingsError(ValueError):
    pass


EXECUTORS = ("local", "ray", "slurm")  # app/executors
# what sbatch is given (as one argv word, never through a shell): a name; for the partition
# a comma list of up to 16 names (sbatch then starts the job in the first one that can run it
# soonest); a time limit in one of Slurm's forms (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or
# UNLIMITED / INFINITE: the partition's maximum); empty: not given
_NAME = r"[A-Za-z0-9_.-]{1,64}"
_SLURM_NAME = (re.compile(_NAME), "a name of 1 to 64 letters, digits, _ . -")
SLURM_SETTINGS = {
    "slurm_partition": (re.compile(rf"{_NAME}(,{_NAME}){{0,15}}"),
                        "a partition name of 1 to 64 letters, digits, _ . -, or up to 16 "
                        "such names separated by commas"),
    "slurm_account": _SLURM_NAME,
    "slurm_time_limit": (re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}"
                                    r"|(?i:unlimited|infinite)"),
                         "a Slurm time limit such as 30 (minutes), 1:00:00, 2-00:00:00 or "
                         "UNLIMITED")}
BOOLEAN_SETTINGS = ("allow_trust_remote_code", "auto_eval", "warm_workers", "cluster_gpus")


@dataclass
class Settings:
    """Lab settings from lab.toml (flat keys), overridden by WEIGHTSMITH_<KEY> variables."""

    cpu_slots: int = 1  # jobs run at once when no GPU is present
    jobs_per_gpu: int = 1
    gpus: list[int] | None = None  # None: every GPU nvidia-smi reports
    cancel_grace_seconds: float = 10.0  # SIGTERM, then SIGKILL after this long
    allow_trust_remote_code: bool = False
    # every checkpoint a job registers gets an evaluate job on this suite, at low priority
    auto_eval: bool = False  # the demo lab turns it on in its lab.toml
    auto_eval_suite: str = "demo"
    # shared labs (app/paths.py): folders configs may read besides the lab and assets/; a lab
    # with users or with roots reads nothing else
    allowed_roots: list[str] = field(default_factory=list)
    # folders whose files may become code in a job (lm-eval task folders, whose YAMLs can
    # import Python with !function): only what the admin lists here. In a shared lab no
    # config may name a code folder outside them, and never the lab's uploads/.
    code_roots: list[str] = field(default_factory=list)
    max_upload_mb: int = 1024  # the largest file the web app accepts
    hub_org: str = ""  # the Hub organisation a bare repo name is published under
    retention_days: float = 0  # `weightsmith retention` default; 0: only when --days is given
    default_user: str = field(default_factory=lambda: os.environ.get("USER") or "local")
    # a Hub dataset repo (ORG/NAME) the registry syncs with after every job; empty: off
    hub_sync_repo: str = ""
    # the server starts jobs through a fork server with torch and transformers imported
    # (app/forkserver.py): a short job starts in milliseconds instead of seconds
    warm_workers: bool = True
    # memory the fork server may keep models loaded in between jobs, by content hash
    # (app/warm_models.py): the next job on the same checkpoint starts with it loaded; 0: none
    warm_model_mb: int = 2048
    # where jobs run (app/executors): "local", this machine's scheduler; "ray", a Ray
    # cluster's Jobs API at `ray_address`; "slurm", Slurm batch jobs through this machine's
    # sbatch/squeue/scancel (in `slurm_partition`, charged to `slurm_account`, each with
    # `slurm_time_limit`; empty: the cluster's defaults). A cluster engine runs at most
    # `cluster_max_jobs` of the lab's jobs at once (the rest wait in the lab's fair queue),
    # each as `cluster_python -m app.worker` (default: this server's Python, which every
    # node must have at the same path, like the lab folder itself)
    executor: str = "local"
    ray_address: str = "http://127.0.0.1:8265"
    cluster_max_jobs: int = 4
    cluster_python: str = ""
    # whether a job that uses a GPU asks the cluster engine for its GPUs (false: a CPU-only
    # cluster, where every job runs on CPU)
    cluster_gpus: bool = True
    slurm_partition: str = ""
    slurm_account: str = ""
    slurm_time_limit: str = ""  # Slurm's forms: 30 (minutes), 1:00:00, 2-00:00:00

    @classmethod
    def load(cls, lab_dir: Path) -> "Settings":
        data: dict = {}
        file = lab_dir / "lab.toml"
        if file.exists():
            try:
                data = tomllib.loads(file.read_text())
            except tomllib.TOMLDecodeError as e:
                raise SettingsError(f"{file}: invalid TOML ({e})") from None
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise SettingsError(f"{file}: unknown settings {', '.join(unknown)}; "
                                f"known: {', '.join(known)}")
        for name in known:
            env = os.environ.get(f"WEIGHTSMITH_{name.upper()}")
            if env is not None:
                data[name] = _parse_env(name, env)
        settings = cls(**data)
        for name, f in known.items():
            value = getattr(settings, name)
            if name in ("allowed_roots", "code_roots") and not (
                    isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
                raise SettingsError(f"setting {name}: expected a list of folder paths, "
                                    f"got {value!r}")
            if name in ("cpu_slots", "jobs_per_gpu", "max_upload_mb", "cluster_max_jobs") \
                    and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SettingsError(f"setting {name}: expected an integer >= 1, got {value!r}")
            if name == "warm_model_mb" and (not isinstance(value, int) or
                                            isinstance(value, bool) or value < 0):
                raise SettingsError(f"setting {name}: expected an integer >= 0 (MiB), got "
                                    f"{value!r}")
            if name in BOOLEAN_SETTINGS and not isinstance(value, bool):
                raise SettingsError(f"setting {name}: expected true or false, got {value!r}")
            if name == "executor" and value not in EXECUTORS:
                raise SettingsError(f"setting executor: expected one of "
                                    f"{', '.join(EXECUTORS)}, got {value!r}")
            if name in ("ray_address", "cluster_python") and not isinstance(value, str):
                raise SettingsError(f"setting {name}: expected a string, got {value!r}")
            if name in SLURM_SETTINGS and not (isinstance(value, str) and (
                    not value or SLURM_SETTINGS[name][0].fullmatch(value))):
                raise SettingsError(f"setting {name}: expected {SLURM_SETTINGS[name][1]} (or "
                                    f"\"\" for the cluster's default), got {value!r}")
            if name == "auto_eval_suite" and not (isinstance(value, str) and value.strip()):
                raise SettingsError(f"setting {name}: expected a suite name or path, got "
                                    f"{value!r}")
        return settings


def _parse_env(name: str, raw: str):
    if name in BOOLEAN_SETTINGS:
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise SettingsError(f"WEIGHTSMITH_{name.upper()}: expected true or false, got {raw!r}")
        return raw.lower() in ("1", "true", "yes")
    if name == "gpus":
        return [int(x) for x in raw.split(",") if x.strip()] if raw.strip() else []
    if name in ("allowed_roots", "code_roots"):
        return [p for p in raw.split(os.pathsep) if p.strip()]
    if name in ("cpu_slots", "jobs_per_gpu", "max_upload_mb", "cluster_max_jobs",
                "warm_model_mb"):
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"WEIGHTSMITH_{name.upper()}: expected an integer, got {raw!r}") \
                from None
    if name in ("cancel_grace_seconds", "retention_days"):
        return float(raw)
    return raw


def hub_repo(settings: Settings, repo: str) -> str:
    """ORG/NAME for a repo typed as NAME in a lab with `hub_org`; ORG/NAME is kept."""
    repo = (repo or "").strip()
    if repo and "/" not in repo and settings.hub_org:
        return f"{settings.hub_org}/{repo}"
    return repo


# the scheduler's wake-up socket, next to scheduler.lock in the lab folder
WAKE_SOCKET = "scheduler.sock"

class Lab:
    def __init__(self, root: str | Path | None = None, create: bool = True):
        """Open the lab at `root` ($WEIGHTSMITH_LAB, else ./lab). With `create=False` a
        missing lab is an error, so a mistyped path never reads as an empty lab."""
        root = root or os.environ.get(LAB_ENV) or DEFAULT_LAB
        self.root = Path(root).expanduser().resolve()
        if not create and not (self.root / "registry.db").exists():
            raise SettingsError(f"no lab at {self.root} (no registry.db); check --lab or "
                                f"${LAB_ENV}, or create one with `weightsmith demo`")
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints_dir.mkdir(exist_ok=True)
        self.jobs_dir.mkdir(exist_ok=True)
        self.settings = Settings.load(self.root)
        self.open_registry = None  # set by a remote worker: it never opens registry.db

    @property
    def db_path(self) -> Path:
        return self.root / "registry.db"

    @property
    def wake_socket(self) -> Path:
        """Where the lab's scheduler listens for wake-ups (app/scheduler.py); any process
        sends to it (app.jobs.wake_scheduler)."""
        return self.root / WAKE_SOCKET

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    def registry(self) -> Registry:
        """A new connection to the lab's registry; on a remote worker (app/worker.py
        --remote), a JournalRegistry over its snapshot instead (`open_registry`)."""
        if self.open_registry is not None:
            return self.open_registry()
        return Registry(self.db_path)

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def tmp_prefix(self, job_id: str) -> str:
        """Temporary checkpoint folders of a job start with this; they never get registered."""
        return f".tmp-{job_id}-"

    def remove_job_tmp(self, job_id: str) -> list[str]:
        removed = []
        for p in self.checkpoints_dir.glob(self.tmp_prefix(job_id) + "*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
        return removed
