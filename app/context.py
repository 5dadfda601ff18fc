"""The job context: everything a plugin's `run(config, ctx)` may do, and nothing more.

It implements the protocols of plugins/kit/context.py (JobContext, Checkpoint,
PreviewContext); a plugin sees only what they declare.

It runs inside the job subprocess. Progress, logs, metrics and evaluations go to the job's log
file and the registry, never to the server's memory, so any browser or a restarted server
sees the same live job.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from app.checkpoints import import_checkpoint, publish
from app.lab import Lab
from registry import CheckpointError, RefError, Registry, inspect_checkpoint, resolve_ref
from registry import hub


# Any of these makes a folder's tokenizer loadable (fast, sentencepiece, tiktoken-style, or a
# config that names its class and files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "tokenizer.tiktoken")


class JobCancelled(BaseException):
    """Raised in the worker when it receives SIGTERM (BaseException: plugins' `except
    Exception` blocks must not swallow a cancel)."""


@dataclass
class OpenCheckpoint:
    """A checkpoint opened for reading. Load its parts lazily (torch is imported on demand)."""

    id: str
    name: str
    path: Path
    trust_remote_code: bool = False
    kind: str = "model"
    metadata: dict = field(default_factory=dict)  # what the job that wrote it recorded
    content_hash: str = ""  # the registry's; a warm worker may have the model loaded by it

    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def load_model(self, device: str | None = None, dtype: Any = None, **kwargs):
        from app import warm_models

        plain = not kwargs and not self.trust_remote_code  # a load the fork server can repeat
        model = warm_models.take(self.path, self.content_hash, dtype) if plain else None
        if model is not None:
            print(f"{self.name}: the model was already loaded in the warm worker server "
                  f"(same files, same dtype)", flush=True)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                str(self.path), dtype=dtype or "auto",
                trust_remote_code=self.trust_remote_code, **kwargs)
        if plain:
            warm_models.note_loaded(self.path, self.content_hash, dtype)
        if device:
            model.to(device)
        return model.eval()

    def load_tokenizer(self, **kwargs):
        from transformers import AutoTokenizer

        if not any((self.path / f).is_file() for f in TOKENIZER_FILES):
            raise CheckpointError(
                f"checkpoint {self.name} ({self.id}) has no tokenizer: {self.path} holds none "
                f"of {', '.join(TOKENIZER_FILES)}. Copy its tokenizer files into the folder "
                f"(tokenizer.save_pretrained) and import it again")
        return AutoTokenizer.from_pretrained(str(self.path),
                                             trust_remote_code=self.trust_remote_code, **kwargs)


@dataclass
class NewCheckpoint:
    """A checkpoint being written: write into `path`; it is published when the job succeeds."""

    path: Path
    name: str
    relation: str
    parents: list[dict]
    metadata: dict = field(default_factory=dict)
    # scores measured before the checkpoint exists in the registry, recorded when it is
    # published: (task, metric, value, stderr, details)
    evaluations: list[tuple] = field(default_factory=list)


class JobContext:
    # A job launched as several data-parallel processes (app/worker.py) runs `run` in each;
    # rank 0 has this context, the others a RankContext that records nothing.
    rank = 0
    world_size = 1

    @property
    def is_main_process(self) -> bool:
        """Whether this process records the job's results (always, unless launched as many)."""
        return self.rank == 0

    def __init__(self, lab: Lab, registry: Registry, job: dict, out=None):
        self.lab = lab
        self.registry = registry
        self.job = job
        self.job_id = job["id"]
        self.work_dir = Path(job["job_dir"] or lab.job_dir(job["id"]))
        self._out = out or sys.stdout
        self._pending: list[NewCheckpoint] = []
        self._made = 0  # temporary folder numbers, never reused within a job
        self._last_db_progress = 0.0
        self._last_log_progress = 0.0
        self._device: str | None = None

    # ----------------------------------------------------------------------------- folders
    @property
    def cache_dir(self) -> Path:
        """The lab's cache (datasets, tokenized data), shared by its jobs."""
        return self.lab.root / "cache"

    @property
    def runs_dir(self) -> Path:
        """Resumable state of long jobs, one folder per resume chain."""
        return self.lab.root / "runs"

    @property
    def suites_dir(self) -> Path:
        """The lab's own evaluation suites."""
        return self.lab.root / "suites"

    # --------------------------------------------------------------------- lab, read-only
    def job_record(self, job_id: str):
        """Another job of this lab (plugin, status, config), or None."""
        from plugins.kit.context import JobRecord

        row = self.registry.job(job_id, missing_ok=True)
        if row is None:
            return None
        return JobRecord(id=row["id"], plugin=row["plugin"], status=row["status"],
                         config=json.loads(row["config"] or "{}"))

    def parents(self, checkpoint_id: str) -> list:
        """The lineage edges into a checkpoint, in order."""
        from plugins.kit.context import Edge

        return [Edge(parent_id=e["parent_id"], parent_name=e["parent_name"], role=e["role"],
                     weight=e["weight"]) for e in self.registry.parents(checkpoint_id)]

    def ancestors(self, checkpoint_id: str) -> list[str]:
        """The ids of every checkpoint a checkpoint descends from."""
        return [r["id"] for r in self.registry.ancestors(checkpoint_id)]

    # --------------------------------------------------------------------------- device
    @property
    def device(self) -> str:
        """'cuda' when the scheduler gave this job a GPU (and torch can use it), else 'cpu'."""
        if self._device is None:
            placed = self.job.get("device") or "cpu"  # cuda:0,1; or ray:cuda (app/executors)
            assigned = placed.startswith("cuda") or placed.endswith(":cuda")
            self._device = "cpu"
            if assigned:
                import torch

                if not torch.cuda.is_available():
                    raise RuntimeError(
                        f"job was placed on {self.job['device']} but torch sees no CUDA device "
                        f"(torch {torch.__version__}); install a CUDA build of torch")
                self._device = "cuda"
        return self._device

    # --------------------------------------------------------------------------- logging
    def log(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        for line in str(message).splitlines() or [""]:
            print(f"[{stamp}] {line}", file=self._out, flush=True)

    def progress(self, work: Iterable | float, message: str = "", total: int | None = None):
        """Report progress: a fraction in [0, 1], or wrap an iterable and report as it goes."""
        if isinstance(work, (int, float)):
            self._report(float(work), message)
            return None
        return self._iterate(work, message, total)

    def _iterate(self, items: Iterable, message: str, total: int | None) -> Iterator:
        if total is None:
            try:
                total = len(items)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self._report(0.0, message)
        n = 0
        for n, item in enumerate(items, 1):
            yield item
            if total:
                self._report(n / total, f"{message} {n}/{total}".strip())
        self._report(1.0, message)

    def _report(self, fraction: float, message: str) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        t = time.monotonic()
        if fraction >= 1.0 or t - self._last_db_progress >= 0.5:
            self._last_db_progress = t
            self.registry.update_job(self.job_id, progress=fraction, progress_message=message)
        if fraction >= 1.0 or fraction == 0.0 or t - self._last_log_progress >= 5.0:
            self._last_log_progress = t
            self.log(f"progress {fraction:6.1%} {message}")

    def metric(self, name: str, value: float, step: int | None = None) -> None:
        self.registry.add_metric(name=name, value=value, step=step, job_id=self.job_id)

    def evaluation(self, checkpoint: OpenCheckpoint | NewCheckpoint | str, task: str,
                   metric: str, value: float, stderr: float | None = None,
                   details: dict | None = None) -> None:
        """Record a score on a registered checkpoint (and as a metric of this job). A score of
        a checkpoint being written is held until it is published (and dropped with it)."""
        if isinstance(checkpoint, NewCheckpoint):
            checkpoint.evaluations.append((task, metric, value, stderr, details))
            return
        ck_id = checkpoint.id if isinstance(checkpoint, OpenCheckpoint) else checkpoint
        self.registry.add_evaluation(checkpoint_id=ck_id, task=task, metric=metric,
                                     value=value, stderr=stderr, job_id=self.job_id,
                                     details=details)
        self.registry.add_metric(name=f"{task}/{metric}", value=value, job_id=self.job_id,
                                 checkpoint_id=ck_id)

    def reuse_scores(self, checkpoint: OpenCheckpoint, key: str) -> list[dict]:
        """Copy onto `checkpoint` the scores measured before under the same `key` on a
        checkpoint with identical weights (same content hash); returns the copied rows, or []
        when there are none. Evaluation is won by not repeating it."""
        row = self.registry.checkpoint(checkpoint.id)
        found = self.registry.scores_by_key(row["content_hash"] or "", key)
        for r in found:
            details = json.loads(r["details"]) if r["details"] else {}
            details["reused_from"] = {"checkpoint": r["checkpoint_id"], "job": r["job_id"]}
            self.evaluation(checkpoint, r["task"], r["metric"], r["value"], r["stderr"],
                            details=details)
        return found

    # ----------------------------------------------------------------------- checkpoints
    def open(self, ref: str) -> OpenCheckpoint:
        """Open a checkpoint by registry id, name, local folder or Hub id.

        A folder or Hub id that is not yet in the registry is registered first (relation
        `import`), so that everything a job reads appears in the lineage.
        """
        resolved = resolve_ref(self.registry, ref)
        if resolved.kind == "path":  # checked at submit too; here nothing can slip past
            from app.paths import check_path, restricted

            problem = check_path(self.lab, "checkpoint", ref) if restricted(self.lab) else None
            if problem:
                raise CheckpointError(problem)
        if resolved.kind == "registry":
            row = resolved.row
        else:
            row = import_checkpoint(self.lab, self.registry, ref, user=self.job.get("user"),
                                    log=self.log)
            self.log(f"registered {ref} as {row['id']} (import)")
        if not row["path"] and hub.hub_id(row):  # a remote-only row: download it now
            row = import_checkpoint(self.lab, self.registry, hub.hub_id(row),
                                    user=self.job.get("user"), log=self.log)
        if not row["path"]:
            raise CheckpointError(f"checkpoint {row['id']} has no local files")
        if row.get("kind") == "gguf":  # an export: its GGUF file, dequantized (once)
            row = self._import_export(row)
        info = inspect_checkpoint(row["path"], with_hash=False)  # validates headers and shards
        trust = self.lab.settings.allow_trust_remote_code
        if info.needs_remote_code and not trust:
            raise CheckpointError(
                f"{Path(row['path']) / 'config.json'} asks for custom code (auto_map); loading "
                f"it needs trust_remote_code, which this lab does not allow. Set "
                f"allow_trust_remote_code = true in {self.lab.root / 'lab.toml'} if you trust it")
        pickled = [f for f in info.weight_files if not f.endswith(".safetensors")]
        if pickled and not trust:
            from app.paths import restricted

            if restricted(self.lab):  # a pickle can run code when loaded; safetensors cannot
                raise CheckpointError(
                    f"checkpoint {row['id']} stores pickled weights ({', '.join(pickled[:3])}), "
                    f"which can run code when loaded; this shared lab reads safetensors only. "
                    f"Convert it (save_pretrained(..., safe_serialization=True)) and import "
                    f"the result")
        meta = row.get("metadata")
        meta = json.loads(meta) if isinstance(meta, str) and meta else (meta or {})
        return OpenCheckpoint(id=row["id"], name=row["name"], path=Path(row["path"]),
                              trust_remote_code=trust, kind=row.get("kind") or "model",
                              metadata=meta if isinstance(meta, dict) else {},
                              content_hash=row.get("content_hash") or "")

    def _import_export(self, row: dict) -> dict:
        """The checkpoint imported from an `export` checkpoint's GGUF file (bfloat16, as any
        .gguf in a checkpoint field), made now if there is none, with the export as its
        parent."""
        from app.checkpoints import GGUF_DEFAULT_DTYPE, import_gguf
        from registry.folder import gguf_file
        from registry.refs import find_gguf_import

        file = gguf_file(row["path"])
        if file is None:
            raise CheckpointError(f"checkpoint {row['name']} ({row['id']}) is a GGUF export, "
                                  f"but its folder {row['path']} holds no single .gguf file")
        known = find_gguf_import(self.registry, file, GGUF_DEFAULT_DTYPE)
        if known is not None:
            return known
        imported = import_gguf(self.lab, self.registry, str(file), user=self.job.get("user"),
                               log=self.log, parents=[{"id": row["id"], "role": "gguf"}],
                               name=f"{row['name']}-dequantized")
        self.log(f"imported the GGUF file of {row['name']} ({row['id']}) as {imported['id']}")
        return imported

    def new_checkpoint(self, relation: str, parents: list[Any], name: str | None = None,
                       metadata: dict | None = None, intermediate: bool = False) -> NewCheckpoint:
        """A temporary folder to write a checkpoint into; published when `run` returns.

        `parents`: OpenCheckpoints, registry ids, or dicts {"checkpoint": ..., "weight": ...,
        "role": ..., "relation": ...}. `intermediate`: a checkpoint saved along the way (a
        training step), whose files `weightsmith retention` may remove later.
        """
        metadata = dict(metadata or {})
        if intermediate:
            metadata["intermediate"] = True
        edges = []
        for p in parents:
            spec = dict(p) if isinstance(p, dict) else {"checkpoint": p}
            target = spec.pop("checkpoint")
            spec["id"] = target.id if isinstance(target, OpenCheckpoint) else \
                self.registry.checkpoint(target)["id"]
            edges.append(spec)
        tmp = self.lab.checkpoints_dir / (self.lab.tmp_prefix(self.job_id)
                                          + str(self._made))
        self._made += 1
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        pending = NewCheckpoint(path=tmp, name=name or f"{relation}-{self.job_id[4:]}",
                                relation=relation, parents=edges, metadata=metadata or {})
        self._pending.append(pending)
        return pending

    def publish(self, pending: NewCheckpoint) -> dict:
        """Publish one completely written checkpoint now, while the job goes on (for example
        an intermediate training checkpoint); returns its registry row. It stays registered
        whatever happens to the job later."""
        self._pending.remove(pending)
        row = publish(self.lab, self.registry, pending.path, name=pending.name,
                      relation=pending.relation, parents=pending.parents, job=self.job,
                      metadata=pending.metadata)
        self.log(f"registered checkpoint {row['id']} ({row['name']})")
        for task, metric, value, stderr, details in pending.evaluations:
            self.evaluation(row["id"], task, metric, value, stderr, details)
        note = getattr(self.registry, "note", None)
        if note is not None:  # a worker on another node: the server queues it on replay
            note("auto_eval", checkpoint=row["id"])
            return row
        from app.jobs import queue_auto_eval  # app.jobs imports plugins: import when needed

        queue_auto_eval(self.lab, row, source_plugin=self.job.get("plugin"), log=self.log)
        return row

    # -------------------------------------------------------------- datasets, suggestions
    def new_dataset(self, path: Path, name: str, metadata: dict | None = None) -> dict:
        """Register a data file (or folder) this job wrote as a lab dataset: moved into the
        lab's datasets/ folder under its id, recorded by content hash with this job as its
        maker, so the lineage draws the datasets the job read as its parents. Returns
        {"id", "name", "path"}; the same content registered before keeps its first row."""
        from app.datasets import DatasetError, clean_name, content_hash, count_rows, \
            file_format, fingerprint
        from registry.datasets import dataset_id

        src = Path(path)
        if src.is_symlink() or not (src.is_file() or src.is_dir()):
            raise DatasetError(f"new_dataset: {src} is not a file or folder this job wrote")
        digest, files = content_hash(src)
        ds_id = dataset_id(digest)
        folder = self.lab.root / "datasets" / ds_id
        target = folder / (src.name if src.name not in ("", ".", "..") else "data")
        if not target.exists():
            folder.mkdir(parents=True, exist_ok=True)
            staging = folder / f".tmp-{self.job_id}"  # renamed into place: never half there
            shutil.rmtree(staging, ignore_errors=True)
            shutil.move(src, staging)  # a rename within the lab's file system
            staging.rename(target)
        size, mtime = fingerprint(target)
        row = self.registry.datasets.add(
            content_hash=digest, name=clean_name(name), source="job", path=str(target),
            format=file_format(target), rows=count_rows(target), files=files,
            size_bytes=size, created_by=self.job.get("user"), metadata=metadata,
            job_id=self.job_id)
        self.registry.datasets.remember_file(str(target), size, mtime, row["id"])
        self.log(f"registered dataset {row['id']} ({row['name']}): {row['rows']} rows")
        return {"id": row["id"], "name": row["name"], "path": row["path"]}

    def suggest(self, plugin: str, config: dict, label: str) -> None:
        """Offer a follow-up job; the Jobs view shows it with a button that submits it (as
        the clicker's job, checked then like any submit)."""
        import plugins

        plugins.validate_config(plugins.get(plugin), config)  # a bad offer fails the job here
        self.registry.add_job_suggestion(self.job_id, {
            "plugin": plugin, "config": json.loads(json.dumps(config)),
            "label": str(label)[:200]})
        self.log(f"suggested: {label}")

    def publish_all(self) -> list[dict]:
        return [self.publish(pending) for pending in list(self._pending)]

    def discard_all(self) -> None:
        for pending in self._pending:
            shutil.rmtree(pending.path, ignore_errors=True)
        self._pending.clear()
        self.lab.remove_job_tmp(self.job_id)


class PreviewView:
    """What a plugin's `preview(config, view)` sees of the lab (plugins.kit.context
    .PreviewContext): its cache and where a checkpoint reference points, nothing registered."""

    def __init__(self, lab: Lab):
        self._lab = lab

    @property
    def cache_dir(self) -> Path:
        return self._lab.root / "cache"

    def checkpoint_path(self, ref: str) -> str:
        with self._lab.registry() as reg:
            resolved = resolve_ref(reg, ref)
        if resolved.kind == "gguf" and not resolved.row:  # a preview never converts a model
            raise RefError(f"{resolved.value} is a GGUF file not imported yet; the preview "
                           f"reads a checkpoint's tokenizer: import it first (`weightsmith "
                           f"import FILE.gguf`, or the Registry's Import) and preview that")
        return resolved.row["path"] if resolved.row else resolved.value
