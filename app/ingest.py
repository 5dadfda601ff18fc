"""The server's side of a remote job (registry/journal.py): replay the new lines of the job
folder's journal into the lab's registry, after checking each one against what that job may
write.

A worker on another node is our own code, but its journal is a file on shared storage, so
each line is read as input: only the calls in registry.journal.CALLS, only column names the
table has and a job may set, only this job's own rows, only paths inside the lab (or its
allowed roots, in a shared lab). Each line is applied together with the job's
`journal_offset` in one transaction, so a restarted server goes on from the next line and
never applies one twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

from app.lab import Lab
from registry import Registry, RegistryError, hub
from registry.journal import CALLS, JOURNAL, NOTES, SNAPSHOT, Journal
from registry.store import now

log = logging.getLogger(__name__)

# what a worker may set on its own job row; the final statuses only from `running`
JOB_FIELDS = {"progress", "progress_message", "status", "finished_at", "exit_code", "error"}
WORKER_FINAL = ("succeeded", "failed", "cancelled")
# checkpoint columns a job never sets (who deleted it, Hub sync state)
CHECKPOINT_NEVER = {"deleted_at", "deleted_by"}


class IngestError(Exception):
    """A journal line the server refuses; the job fails with this message."""


def _check_path(lab: Lab, what: str, value) -> None:
    from app.paths import check_path, restricted

    if value is None:
        return
    if not isinstance(value, str) or "\0" in value:
        raise IngestError(f"{what}: expected a path, got {value!r}")
    inside = Path(value).resolve().is_relative_to(lab.root.resolve())
    if not inside and restricted(lab):
        problem = check_path(lab, what, value)
        if problem:
            raise IngestError(problem)


def _own_checkpoint(reg: Registry, job: dict, ck_id) -> dict:
    """A checkpoint this job may change: one it registered (or imported) since it started,
    or a Hub stub whose files it downloaded."""
    row = reg.get_checkpoint(ck_id) if isinstance(ck_id, str) else None
    if row is None:
        raise IngestError(f"checkpoint {ck_id!r} is not in the registry")
    mine = row.get("job_id") == job["id"] or (
        (row.get("created_at") or "") >= (job.get("started_at") or "~")
        and row.get("created_by") in (job.get("user"), None))
    if not (mine or not row.get("path")):
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
        return {"job_id": job_id, "only_if_status": ("running",), **fields}
    if call == "add_metric":
        return {**args, "job_id": job_id}
    if call == "add_evaluation":
        return {**args, "job_id": job_id}
    if call == "add_job_suggestion":
        if args.get("job_id") != job_id:
            raise IngestError("a suggestion for another job")
        return args
    if call == "add_checkpoint":
        allowed = (reg.columns("checkpoints") - CHECKPOINT_NEVER) | {"parents"}
        bad = sorted(set(args) - allowed)
        if bad:
            raise IngestError(f"add_checkpoint may not set {', '.join(bad)}")
        if args.get("job_id") not in (None, job_id):
            raise IngestError("a checkpoint of another job")
        _check_path(lab, "checkpoint path", args.get("path"))
        return {**args, "created_by": job.get("user") or lab.settings.default_user}
    if call == "add_edge":
        _own_checkpoint(reg, job, args.get("child_id"))
        return args
    if call == "update_checkpoint":
        _own_checkpoint(reg, job, args.get("ck_id"))
        allowed = reg.columns("checkpoints") - CHECKPOINT_NEVER - {"id", "job_id",
                                                                    "created_by"}
        bad = sorted(set(args) - allowed - {"ck_id"})
        if bad:
            raise IngestError(f"update_checkpoint may not set {', '.join(bad)}")
        _check_path(lab, "checkpoint path", args.get("path"))
        return args
    if call == "datasets.add":
        if args.get("job_id") not in (None, job_id):
            raise IngestError("a dataset of another job")
        _check_path(lab, "dataset path", args.get("path"))
        return {**args, "created_by": job.get("user")}
    if call == "datasets.remember_file":
        _check_path(lab, "dataset path", args.get("path"))
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
    for at, entry, raw in Journal(job_dir / JOURNAL).read(job["journal_offset"] or 0):
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
        except (IngestError, RegistryError, TypeError, ValueError) as e:
            message = f"the job's registry journal ({job_dir / JOURNAL}) has a line the " \
                      f"server refused ({e}): {raw[:300]}"
            log.warning("job %s: %s", job_id, message)
            reg.update_job(job_id, only_if_status=("running",), status="failed",
                           finished_at=now(), error=hub.redact(message))
            refused = True
            break
    for name, args in notes:  # after the lines' transactions: these open their own
        _note(lab, reg, job, name, args)
    job = reg.job(job_id)
    if job["status"] != "running":
        (job_dir / SNAPSHOT).unlink(missing_ok=True)
    return {**job, "refused": refused}


def _note(lab: Lab, reg: Registry, job: dict, name: str, args: dict) -> None:
    if name == "auto_eval":
        from app.jobs import queue_auto_eval

        row = reg.get_checkpoint(args.get("checkpoint"))
        if row is not None and row.get("job_id") == job["id"]:
            queue_auto_eval(lab, row, source_plugin=job["plugin"], log=log.info)
