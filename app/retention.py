"""Retention: remove the files of old intermediate training checkpoints.

Intermediate checkpoints (the train and continue_pretrain plugins' `save_steps` saves, with
`intermediate: true` in their metadata) pile up. `weightsmith retention --days N` removes the
files of those older than N days and soft-deletes their rows; the rows, edges and scores stay
for the lineage. It never touches a checkpoint that has descendants (something was built on
it) or that was published to the Hub.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

from app.auth import soft_delete
from app.lab import Lab


def candidates(lab: Lab, days: float) -> list[dict]:
    cutoff = (datetime.now(timezone.utc) - timedelta(days=days)).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")
    with lab.registry() as reg:
        return reg.intermediate_checkpoints(created_before=cutoff)


def apply_retention(lab: Lab, days: float, dry_run: bool = False,
                    user: str | None = None) -> list[dict]:
    """Remove the files of old intermediate checkpoints; returns what was (or would be)
    removed: [{"id", "name", "created_at", "path", "bytes"}]."""
    if days < 0:
        raise ValueError(f"days: expected a number >= 0, got {days}")
    out = []
    rows = candidates(lab, days)
    with lab.registry() as reg:
        for row in rows:
            folder = Path(row["path"]) if row["path"] else None
            inside = folder is not None and folder.resolve().is_relative_to(
                lab.checkpoints_dir.resolve())
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) \
                if inside and folder.exists() else 0
            out.append({"id": row["id"], "name": row["name"], "created_at": row["created_at"],
                        "path": row["path"] if inside else None, "bytes": size})
            if dry_run:
                continue
            if inside:  # never delete files the lab does not own (an imported folder)
                shutil.rmtree(folder, ignore_errors=True)
            soft_delete(reg, row["id"], user or "retention", "checkpoint.retention",
                        {"name": row["name"], "bytes": size},
                        path=None if inside else row["path"])
    return out
