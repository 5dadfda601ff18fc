"""The server's side of a remote job (registry/journal.py): replay the new lines of the job
folder's journal into the lab's registry, after checking each one against what that job may
write.

A worker on another node is our own code, but its journal is a file on shared storage, so
each line is read as input: only the calls in registry.journal.CALLS, only the columns a
job may set (allowlists: the names of update_job's columns are SQL), only this job's own
rows, inside the lab only a checkpoint's own folder (outside it, in a shared lab, only its
allowed roots). Each line is applied together with the job's
`journal_offset` in one transaction, so a restarted server goes on from the next line and
never applies one twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

from app.lab import Lab
from registry import Registry, hub
from registry.journal import CALLS, JOURNAL, NOTES, Journal, remove_snapshots
from registry.store import now

log = logging.getLogger(__name__)

# what a worker may set on its own job row; the final statuses only from `running`
JOB_FIELDS = {"progress", "progress_message", "status", "finished_at", "exit_code", "error"}
WORKER_FINAL = ("succeeded", "failed", "cancelled")
# what a checkpoint's files say about it (app.checkpoints.row_fields)
FILE_FIELDS = {"architecture", "param_count", "dtype", "size_bytes", "content_hash", "kind"}
# the columns a job's new checkpoint may set (an allowlist: never created_at, the Hub sync
# state, deletion; created_by is the job's user)
CHECKPOINT_FIELDS = FILE_FIELDS | {"id", "name", "relation", "path", "parents", "source",
                                   "job_id", "plugin", "config", "versions", "metadata",
                                   "created_by"}  # (replaced by the job's user)


class IngestError(Exception):
    """A journal line the server refuses; the job fails with this message."""


def _check_path(lab: Lab, what: str, value, ck_id: str | None = None) -> None:
    """A path a job registers: inside the lab only a checkpoint's own folder,
    lab/checkpoints/<its id> (a dataset's: lab/datasets/...); outside it, a folder a config
    may name (a local import), checked as at submit in a shared lab."""
    from app.paths import check_path, restricted

    if value is None:
        return
    if not isinstance(value, str) or not value or "\0" in value or len(value) > 4096:
        raise IngestError(f"{what}: expected a path, got {value!r}")
    try:
        path = Path(value).resolve()
        root = lab.root.resolve()
    except (OSError, RuntimeError) as e:
        raise IngestError(f"{what}: {value!r} does not resolve ({e})") from None
    if path.is_relative_to(root):
        if ck_id is not None:
            allowed = path == (lab.checkpoints_dir / ck_id).resolve()
        else:
            allowed = path.is_relative_to((root / "datasets").resolve()) and \
                path != (root / "datasets").resolve()
        if not allowed:
            raise IngestError(f"{what}: {value} is a place in the lab a job may not register")
        return
    if restricted(lab):
        problem = check_path(lab, what, value)
        if problem:
            raise IngestError(problem)


def _own_checkpoint(reg: Registry, job: dict, ck_id) -> dict:
    """A checkpoint this job may add edges to: one it registered, one its user registered
    since it started (an import), or a Hub import whose card this job read."""
    row = reg.get_checkpoint(ck_id) if isinstance(ck_id, str) else None
    if row is None:
        raise IngestError(f"checkpoint {ck_id!r} is not in the registry")
    if row.get("deleted_at"):
        raise IngestError(f"checkpoint {ck_id} is deleted")
    mine = row.get("job_id") == job["id"] or (
        (row.get("created_at") or "") >= (job.get("started_at") or "~")
        and row.get("created_by") == (job.get("user") or row.get("created_by")))
    hub_import = (row.get("source") or "").startswith("hf://")
    if not (mine or hub_import):
        raise IngestError(f"checkpoint {ck_id} was not made by job {job['id']}")
    return row


def _checked(lab: Lab, reg: Registry, job: dict, call: str, args: dict) -> dict:
    """The call's arguments as the server applies them, or IngestError."""
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise IngestError("arguments are not an object")
    job_id = job["id"]
    if call == "update_job":
        fields = {k: v for k, v in args.items() if k not in ("job_id", "only_if_status")}
        if args.get("job_id") != job_id:
            raise IngestError(f"update_job of another job ({args.get('job_id')!r})")
        bad = sorted(set(fields) - JOB_FIELDS)
        if bad:
            raise IngestError(f"update_job may not set {', '.join(bad)}")
        if "status" in fields and fields["status"] not in WORKER_FINAL:
            raise IngestError(f"a worker may not set status {fields['status']!r}")
        if fields.get("status") == "failed" and reg.job(job_id)["cancel_requested"]:
            fields["status"] = "cancelled"  # it failed because it was stopped (the node's
            # snapshot never sees the request), as a local worker would have recorded
        return {"job_id": job_id, "only_if_status": ("running",), **fields}
    if call == "add_metric":
        return {**args, "job_id": job_id}
    if call == "add_evaluation":
        return {**args, "job_id": job_id}
    if call == "add_job_suggestion":
        if args.get("job_id") != job_id:
            raise IngestError("a suggestion for another job")
        offer = args.get("suggestion")
        if not (isinstance(offer, dict) and set(offer) == {"plugin", "config", "label"}
                and isinstance(offer["config"], dict)):
            raise IngestError("a suggestion is {plugin, config, label}")
        return args
    if call == "add_checkpoint":
        bad = sorted(set(args) - CHECKPOINT_FIELDS)
        if bad:
            raise IngestError(f"add_checkpoint may not set {', '.join(bad)}")
        if args.get("job_id") not in (None, job_id):
            raise IngestError("a checkpoint of another job")
        if not isinstance(args.get("id"), str) or not args["id"].startswith("ck-"):
            raise IngestError(f"add_checkpoint: expected an id ck-..., got {args.get('id')!r}")
        if not isinstance(args.get("parents") or [], list) or not all(
                isinstance(p, dict) and isinstance(p.get("id"), str)
                for p in args.get("parents") or []):
            raise IngestError("add_checkpoint: parents must be a list of {id: ...}")
        path = args.get("path")
        _check_path(lab, "checkpoint path", path, args["id"] if path and Path(path).resolve()
                    .is_relative_to(lab.root.resolve()) else None)
        source = args.get("source")
        if source is not None and source != path and not (
                isinstance(source, str) and path
                and Path(path).resolve() == (lab.checkpoints_dir / args["id"]).resolve()):
            raise IngestError("add_checkpoint: source must be the folder itself, or what a "
                              "download or conversion into the lab's own folder came from")
        return {**args, "created_by": job.get("user") or lab.settings.default_user}
    if call == "add_edge":
        _own_checkpoint(reg, job, args.get("child_id"))
        return args
    if call == "update_checkpoint":
        # only the Hub stub a job downloads (hub.fill_stub): its files, in its own folder
        ck_id = args.get("ck_id")
        row = reg.get_checkpoint(ck_id) if isinstance(ck_id, str) else None
        if row is None or row.get("path") or row.get("deleted_at"):
            raise IngestError(f"update_checkpoint: {ck_id!r} is not a Hub stub to fill")
        bad = sorted(set(args) - FILE_FIELDS - {"ck_id", "path"})
        if bad:
            raise IngestError(f"update_checkpoint may not set {', '.join(bad)}")
        if not args.get("path"):
            raise IngestError("update_checkpoint: a stub is filled with its path")
        _check_path(lab, "checkpoint path", args.get("path"), ck_id)
        return args
    if call == "datasets.add":
        if args.get("job_id") not in (None, job_id):
            raise IngestError("a dataset of another job")
        _check_path(lab, "dataset path", args.get("path"))
        return {**args, "created_by": job.get("user")}
    if call == "datasets.remember_file":
        # a cache of (path, size, mtime) -> dataset: only for a dataset that exists, with
        # the file's real size and time, so a line cannot point a file at other content
        _check_path(lab, "dataset path", args.get("path"))
        if reg.datasets.get(args.get("ds_id") or "") is None:
            raise IngestError(f"dataset {args.get('ds_id')!r} is not in the registry")
        from app.datasets import fingerprint

        try:
            real = fingerprint(Path(args["path"]))
        except (OSError, KeyError, TypeError) as e:
            raise IngestError(f"dataset file {args.get('path')!r}: {e}") from None
        if (args.get("size_bytes"), args.get("mtime_ns")) != real:
            raise IngestError("a dataset file's size or time differs from the file's own")
        return args
    raise IngestError(f"{call!r} is not a call a job may make")


def _applied(reg: Registry, job_id: str, at: int) -> bool:
    """Whether another process (a Stop in the web app, a second scheduler pass) has applied
    the line ending at byte `at` since this one read the offset; asked inside the line's
    transaction, so two ingests never both apply a line."""
    return (reg.job(job_id)["journal_offset"] or 0) >= at


def _apply(reg: Registry, call: str, args: dict) -> None:
    if call == "add_checkpoint" and reg.get_checkpoint(args.get("id")) is not None:
        raise IngestError(f"checkpoint id {args.get('id')} is already taken")
    target = reg.datasets if call.startswith("datasets.") else reg
    getattr(target, call.split(".")[-1])(**args)


def ingest(lab: Lab, reg: Registry, job_id: str) -> dict:
    """Replay the journal lines of job `job_id` that are new since the last call; returns the
    job's row after, with `refused`: whether a line was refused. A refused line fails the job
    (IngestError's message; the engine should then stop the worker); the lines after it are
    not applied."""
    job = reg.job(job_id)
    job_dir = Path(job["job_dir"] or lab.job_dir(job_id))
    notes, refused = [], False
    try:  # bounded (READ_BYTES a pass): the rest comes on the next pass
        lines = list(Journal(job_dir / JOURNAL).read(job["journal_offset"] or 0))
    except Exception as e:  # noqa: BLE001 - not a regular file, unreadable: the job fails
        lines = [(0, None, f"(the journal cannot be read: {e})")]
    for at, entry, raw in lines:
        try:
            if entry is None:
                raise IngestError(f"not a JSON object: {raw[:200]!r}")
            if "note" in entry:
                if entry["note"] not in NOTES or not isinstance(entry.get("args"), dict):
                    raise IngestError(f"unknown note {entry['note']!r}")
                with reg.write():
                    if _applied(reg, job_id, at):
                        continue
                    reg.update_job(job_id, journal_offset=at)
                notes.append((entry["note"], entry["args"]))
                continue
            call = entry.get("call")
            if call not in CALLS:
                raise IngestError(f"{call!r} is not a call a job may make")
            args = _checked(lab, reg, job, call, entry.get("args"))
            with reg.write():
                if _applied(reg, job_id, at):
                    continue
                _apply(reg, call, args)
                reg.update_job(job_id, journal_offset=at)
        except Exception as e:  # noqa: BLE001 - any line a worker wrote must fail only its job
            message = f"the job's registry journal ({job_dir / JOURNAL}) has a line the " \
                      f"server refused ({e}): {raw[:300]}"
            log.warning("job %s: %s", job_id, message)
            reg.update_job(job_id, only_if_status=("running",), status="failed",
                           finished_at=now(), error=hub.redact(message))
            try:  # nothing after a refused line is trusted: it is never read again
                end = (job_dir / JOURNAL).stat().st_size
            except OSError:
                end = at
            reg.update_job(job_id, journal_offset=max(end, at))
            refused = True
            break
    job = reg.job(job_id)
    if job["status"] != "running":
        remove_snapshots(job_dir)
    for name, args in notes:  # after the lines' transactions: these open their own
        try:
            _note(lab, reg, job, name, args)
        except Exception as e:  # noqa: BLE001 - a note is a side effect; the job stands
            log.warning("job %s: note %s %r not done: %s", job_id, name, args, e)
    return {**job, "refused": refused}


def _note(lab: Lab, reg: Registry, job: dict, name: str, args: dict) -> None:
    """The auto-evaluation of a checkpoint the job registered, queued by the server as a
    local job's worker queues it."""
    if name == "auto_eval":
        from app.jobs import queue_auto_eval

        ck_id = args.get("checkpoint")
        row = reg.get_checkpoint(ck_id) if isinstance(ck_id, str) else None
        if row is not None and row.get("job_id") == job["id"]:
            queue_auto_eval(lab, row, source_plugin=job["plugin"], log=log.info)

