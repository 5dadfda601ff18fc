"""The job context a plugin's `run(config, ctx)` receives, and the view its `preview(config,
view)` receives, written down as typed protocols.

The app implements them (app/context.py); a plugin uses nothing of the lab beyond what is
declared here. Everything is plain data or a path: no registry rows, no Lab object, no SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol, runtime_checkable


class Checkpoint(Protocol):
    """A checkpoint opened for reading (`ctx.open`). Its parts load lazily."""

    id: str
    name: str
    path: Path                 # the folder: config.json, *.safetensors, tokenizer files
    kind: str                  # "model", "adapter" or "task_vector"
    metadata: dict             # what the job that wrote it recorded (decoded JSON)

    def config(self) -> dict: ...
    def load_model(self, device: Optional[str] = None, dtype: Any = None, **kwargs): ...
    def load_tokenizer(self, **kwargs): ...


class NewCheckpoint(Protocol):
    """A checkpoint being written (`ctx.new_checkpoint`): write into `path`; it is registered
    when `run` returns (or at once with `ctx.publish`)."""

    path: Path
    name: str
    relation: str
    metadata: dict


@dataclass(frozen=True)
class JobRecord:
    """Another job of this lab, as a plugin may see it (`ctx.job_record`)."""

    id: str
    plugin: str
    status: str                # queued, running, succeeded, failed, cancelled, interrupted
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Edge:
    """One lineage edge into a checkpoint (`ctx.parents`)."""

    parent_id: str
    parent_name: str
    role: Optional[str] = None
    weight: Optional[float] = None


@runtime_checkable
class JobContext(Protocol):
    """Everything `run(config, ctx)` may do."""

    job_id: str
    job: dict                  # this job's row: id, plugin, user, device, config (JSON text)
    work_dir: Path             # this job's own folder (logs, scratch files)
    rank: int                  # 0 unless the job runs as several data-parallel processes
    world_size: int

    @property
    def is_main_process(self) -> bool: ...
    @property
    def device(self) -> str: ...          # "cuda" or "cpu"
    @property
    def cache_dir(self) -> Path: ...      # the lab's cache: datasets, tokenized data
    @property
    def runs_dir(self) -> Path: ...       # resumable state of long jobs, one folder each
    @property
    def suites_dir(self) -> Path: ...     # the lab's own evaluation suites

    # reporting
    def log(self, message: str) -> None: ...
    def progress(self, work: Iterable | float, message: str = "",
                 total: Optional[int] = None): ...
    def metric(self, name: str, value: float, step: Optional[int] = None) -> None: ...
    def evaluation(self, checkpoint: Any, task: str, metric: str, value: float,
                   stderr: Optional[float] = None, details: Optional[dict] = None) -> None: ...
    def reuse_scores(self, checkpoint: Checkpoint, key: str) -> list[dict]: ...

    # checkpoints
    def open(self, ref: str) -> Checkpoint: ...
    def new_checkpoint(self, relation: str, parents: list[Any], name: Optional[str] = None,
                       metadata: Optional[dict] = None,
                       intermediate: bool = False) -> NewCheckpoint: ...
    def publish(self, pending: NewCheckpoint) -> dict: ...

    # datasets and suggestions
    def new_dataset(self, path: Path, name: str,
                    metadata: Optional[dict] = None) -> dict:
        """Register a data file (or folder) this job wrote as a lab dataset: it is moved
        into the lab's datasets folder, recorded by content hash with this job as its
        maker (so the lineage draws the datasets the job read -> this dataset), and can be
        named by any data field. Returns {"id", "name", "path"}. Main process only."""
        ...

    def suggest(self, plugin: str, config: dict, label: str) -> None:
        """Offer a follow-up job (a config of `plugin`) that the Jobs view shows on this
        job with a button that opens it in the plugin's form. Main process only."""
        ...

    # the lab, read-only
    def parents(self, checkpoint_id: str) -> list[Edge]: ...
    def ancestors(self, checkpoint_id: str) -> list[str]: ...
    def job_record(self, job_id: str) -> Optional[JobRecord]: ...


class PreviewContext(Protocol):
    """What `preview(config, view)` may use: it runs before anything is queued."""

    @property
    def cache_dir(self) -> Path: ...

    def checkpoint_path(self, ref: str) -> str:
        """A local folder (or a Hub id) for a checkpoint reference, nothing registered."""
        ...
