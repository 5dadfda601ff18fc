"""The lab's datasets: data files and folders recorded by content hash, and which jobs read
them. Reached as `reg.datasets` (a Registry builds one over its connection).

A dataset's id is `ds-` and the first 12 hex digits of its SHA-256 (a Hub dataset, which the
lab never holds, by the hash of its `hf://` id), so the same bytes uploaded twice, or named
by two paths, are one dataset. Which data trained or calibrated a checkpoint is not stored
twice: it is `job_datasets` (job, dataset, field) joined with the checkpoint's job_id, so
every checkpoint a job registers has the job's data as its data parents. app/datasets.py
computes hashes, formats and row counts; this module only stores them. Datasets are local to
a lab: Hub sync does not carry them (a path means nothing on another machine).
"""

from __future__ import annotations

import json
from typing import Any, Callable, ContextManager

import sqlite_utils

from registry.common import RegistryError, now

ID_DIGITS = 12


def dataset_id(content_hash: str) -> str:
    return f"ds-{content_hash[:ID_DIGITS]}"


class Datasets:
    """The `datasets`, `dataset_files` and `job_datasets` tables of one registry connection."""

    def __init__(self, db: sqlite_utils.Database, write: Callable[[], ContextManager[Any]]):
        self.db = db
        self.write = write

    def add(self, *, content_hash: str, name: str, source: str, path: str | None = None,
            format: str | None = None, rows: int | None = None, files: int | None = None,
            size_bytes: int | None = None, created_by: str | None = None,
            metadata: dict | None = None, job_id: str | None = None) -> dict:
        """Record a dataset, or return the row already recorded with this content (its first
        name, path and creator stay; a soft-deleted one comes back). `job_id`: the job that
        wrote it (the datasets that job read are then its parents)."""
        ds_id = dataset_id(content_hash)
        with self.write():
            known = self.get(ds_id)
            if known is not None:
                if known["content_hash"] != content_hash:  # 48 bits: never seen, but say so
                    raise RegistryError(f"dataset id {ds_id} is taken by other content")
                if known["deleted_at"]:
                    self.db["datasets"].update(ds_id, {"deleted_at": None, "deleted_by": None})
                if not known["path"] and path:
                    self.db["datasets"].update(ds_id, {"path": path})
                return self.get(ds_id)
            self.db["datasets"].insert({
                "id": ds_id, "name": name, "content_hash": content_hash, "path": path,
                "source": source, "format": format, "rows": rows, "files": files,
                "size_bytes": size_bytes, "created_at": now(), "created_by": created_by,
                "metadata": json.dumps(metadata, sort_keys=True) if metadata else None,
                "job_id": job_id})
        return self.get(ds_id)

    def get(self, ds_id: str | None) -> dict | None:
        rows = list(self.db.query("SELECT * FROM datasets WHERE id = ?", [ds_id or ""]))
        return rows[0] if rows else None

    def soft_delete(self, ds_id: str, user: str | None) -> None:
        """Hide a dataset from lists; its row and uses stay for the lineage."""
        with self.write():
            self.db["datasets"].update(ds_id, {"deleted_at": now(), "deleted_by": user})

    # ------------------------------------------------------------------ hashes by file
    def known_file(self, path: str, size_bytes: int, mtime_ns: int) -> dict | None:
        """The dataset a file (or folder) was hashed into, if its size and modification time
        are what they were then."""
        rows = list(self.db.query(
            "SELECT d.* FROM dataset_files f JOIN datasets d ON d.id = f.dataset_id "
            "WHERE f.path = ? AND f.size_bytes = ? AND f.mtime_ns = ?",
            [path, size_bytes, mtime_ns]))
        return rows[0] if rows else None

    def remember_file(self, path: str, size_bytes: int, mtime_ns: int, ds_id: str) -> None:
        with self.write():
            self.db["dataset_files"].upsert({"path": path, "size_bytes": size_bytes,
                                             "mtime_ns": mtime_ns, "dataset_id": ds_id},
                                            pk="path")

    # ------------------------------------------------------------------------- lists
    def list(self, *, search: str | None = None, limit: int = 200) -> list[dict]:
        """Datasets, newest first, not deleted, whose name or id holds `search` (literal,
        case-insensitive); each with `jobs` and `checkpoints`: how many read it, or were
        made from it."""
        where, params = ["d.deleted_at IS NULL"], []
        if search:
            where.append("(instr(lower(d.name), lower(?)) > 0 OR instr(d.id, ?) > 0)")
            params += [search, search]
        return list(self.db.query(
            "SELECT d.*, "
            "(SELECT COUNT(DISTINCT j.job_id) FROM job_datasets j WHERE j.dataset_id = d.id) "
            "AS jobs, "
            "(SELECT COUNT(DISTINCT c.id) FROM job_datasets j JOIN checkpoints c "
            " ON c.job_id = j.job_id WHERE j.dataset_id = d.id) AS checkpoints "
            "FROM datasets d WHERE " + " AND ".join(where)
            + " ORDER BY d.created_at DESC, d.id DESC LIMIT ?", params + [max(0, int(limit))]))

    # -------------------------------------------------------------------------- uses
    def use(self, job_id: str, ds_id: str, field: str) -> None:
        """Record that job `job_id` reads dataset `ds_id` through its config field `field`."""
        with self.write():
            self.db["job_datasets"].insert({"job_id": job_id, "dataset_id": ds_id,
                                            "field": field}, ignore=True)

    def of_job(self, job_id: str) -> list[dict]:
        """The datasets a job reads: dataset rows with the `field` each is read through."""
        return list(self.db.query(
            "SELECT d.*, j.field FROM job_datasets j JOIN datasets d ON d.id = j.dataset_id "
            "WHERE j.job_id = ? ORDER BY j.field", [job_id]))

    def made_by(self, job_id: str) -> list[dict]:
        """The datasets job `job_id` wrote (ctx.new_dataset), oldest first."""
        return list(self.db.query("SELECT * FROM datasets WHERE job_id = ? "
                                  "ORDER BY created_at, id", [job_id]))

    def sources(self, ds_id: str) -> list[dict]:
        """The datasets the job that wrote `ds_id` read (its parents), with the field."""
        return list(self.db.query(
            "SELECT s.*, j.field FROM datasets d JOIN job_datasets j ON j.job_id = d.job_id "
            "JOIN datasets s ON s.id = j.dataset_id WHERE d.id = ? AND s.id != d.id "
            "ORDER BY j.field, s.id", [ds_id]))

    def uses(self, ds_id: str, limit: int = 200) -> dict:
        """{"jobs": [...], "checkpoints": [...]}: the jobs that read a dataset (newest
        first, with the field) and the checkpoints they registered (not deleted)."""
        jobs = list(self.db.query(
            "SELECT jb.id, jb.plugin, jb.status, jb.user, jb.created_at, j.field "
            "FROM job_datasets j JOIN jobs jb ON jb.id = j.job_id WHERE j.dataset_id = ? "
            "ORDER BY jb.created_at DESC LIMIT ?", [ds_id, limit]))
        checkpoints = list(self.db.query(
            "SELECT DISTINCT c.id, c.name, c.relation, c.created_at, j.field "
            "FROM job_datasets j JOIN checkpoints c ON c.job_id = j.job_id "
            "WHERE j.dataset_id = ? AND c.deleted_at IS NULL "
            "ORDER BY c.created_at DESC LIMIT ?", [ds_id, limit]))
        return {"jobs": jobs, "checkpoints": checkpoints}

    def edges(self, ck_ids: list[str]) -> tuple[list[dict], list[dict]]:
        """(dataset nodes, data edges) for the checkpoints `ck_ids`: in the shape of the
        lineage graph's nodes and edges (`kind` "dataset"; relation "data", role the config
        field). A dataset is drawn even when soft-deleted: it made the checkpoint."""
        nodes: dict[str, dict] = {}
        edges: list[dict] = []
        for start in range(0, len(ck_ids), 500):
            chunk = ck_ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for r in self.db.query(
                    f"SELECT c.id AS child, d.id AS parent, d.name, d.created_at, d.format, "
                    f"d.rows, j.field FROM checkpoints c "
                    f"JOIN job_datasets j ON j.job_id = c.job_id "
                    f"JOIN datasets d ON d.id = j.dataset_id "
                    f"WHERE c.id IN ({marks}) ORDER BY c.id, j.field", chunk):
                nodes.setdefault(r["parent"], {
                    "id": r["parent"], "name": r["name"], "kind": "dataset",
                    "relation": "dataset", "format": r["format"], "rows": r["rows"],
                    "created_at": r["created_at"], "scores": {}})
                edges.append({"parent": r["parent"], "child": r["child"], "relation": "data",
                              "weight": None, "density": None, "role": r["field"]})
        # a dataset a job wrote (a selection) has the datasets that job read as parents,
        # and so on up: walked level by level, each dataset once
        todo = list(nodes)
        seen = set(todo)
        while todo:
            marks = ",".join("?" * len(todo))
            rows = list(self.db.query(
                f"SELECT d.id AS child, s.id AS parent, s.name, s.created_at, s.format, "
                f"s.rows, j.field FROM datasets d "
                f"JOIN job_datasets j ON j.job_id = d.job_id "
                f"JOIN datasets s ON s.id = j.dataset_id "
                f"WHERE d.id IN ({marks}) AND s.id != d.id ORDER BY d.id, j.field, s.id", todo))
            todo = []
            for r in rows:
                if r["parent"] not in seen:
                    seen.add(r["parent"])
                    todo.append(r["parent"])
                    nodes[r["parent"]] = {
                        "id": r["parent"], "name": r["name"], "kind": "dataset",
                        "relation": "dataset", "format": r["format"], "rows": r["rows"],
                        "created_at": r["created_at"], "scores": {}}
                edges.append({"parent": r["parent"], "child": r["child"], "relation": "data",
                              "weight": None, "density": None, "role": r["field"]})
        return sorted(nodes.values(), key=lambda n: (n["created_at"], n["id"])), edges
