"""The registry's schema: forward migrations `_v1`.. `_vN`, applied in order inside one write
transaction and recorded in the `schema_version` table. Registry.migrate runs `migrate` on
every open; a lab written by a newer weightsmith is refused rather than misread."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager

import sqlite_utils

from registry.common import RegistryError, now


def _v1(db: sqlite_utils.Database) -> None:
    db["checkpoints"].create(
        {
            "id": str, "name": str, "kind": str, "relation": str, "path": str, "source": str,
            "architecture": str, "param_count": int, "dtype": str, "size_bytes": int,
            "content_hash": str, "created_at": str, "created_by": str, "job_id": str,
            "plugin": str, "config": str, "versions": str, "metadata": str,
        },
        pk="id",
        not_null={"name", "kind", "relation", "created_at"},
        defaults={"kind": "model"},
    )
    db["checkpoints"].create_index(["name"], unique=True)
    db["checkpoints"].create_index(["created_at"])
    db["checkpoints"].create_index(["job_id"])
    db["checkpoints"].create_index(["path"])
    db["edges"].create(
        {"child_id": str, "parent_id": str, "relation": str, "weight": float, "role": str,
         "position": int},
        pk=("child_id", "parent_id"),
        not_null={"relation"},
        foreign_keys=[("child_id", "checkpoints", "id"), ("parent_id", "checkpoints", "id")],
    )
    db["edges"].create_index(["parent_id", "child_id"])
    db["jobs"].create(
        {
            "id": str, "plugin": str, "config": str, "status": str, "user": str, "priority": int,
            "created_at": str, "started_at": str, "finished_at": str, "job_dir": str,
            "log_path": str, "pid": int, "pid_started": float, "device": str, "versions": str,
            "progress": float, "progress_message": str, "error": str, "cancel_requested": int,
            "exit_code": int,
        },
        pk="id",
        not_null={"plugin", "config", "status", "created_at"},
        defaults={"priority": 0, "cancel_requested": 0},
    )
    db["jobs"].create_index(["status", "priority", "created_at"])
    db["metrics"].create(
        {"id": int, "job_id": str, "checkpoint_id": str, "name": str, "value": float,
         "step": int, "created_at": str},
        pk="id", not_null={"name", "created_at"},
    )
    db["metrics"].create_index(["job_id", "name", "step"])
    db["metrics"].create_index(["checkpoint_id"])
    db["evaluations"].create(
        {"id": int, "checkpoint_id": str, "job_id": str, "task": str, "metric": str,
         "value": float, "stderr": float, "details": str, "created_at": str},
        pk="id", not_null={"checkpoint_id", "task", "metric", "created_at"},
        foreign_keys=[("checkpoint_id", "checkpoints", "id")],
    )
    db["evaluations"].create_index(["checkpoint_id", "task", "metric"])


def _v2(db: sqlite_utils.Database) -> None:
    # merges record each input's density (TIES, DARE, ...) on its lineage edge
    db["edges"].add_column("density", float)


def _v3(db: sqlite_utils.Database) -> None:
    # Hub sync (registry/hub.py): where a checkpoint was published and how its last push went
    for column in ("hub_repo", "hub_commit", "hub_pushed_at", "sync_status", "sync_error"):
        db["checkpoints"].add_column(column, str)
    db["checkpoints"].create_index(["hub_repo"])
    db["checkpoints"].create_index(["source"])
    # evaluations are keyed by a local integer; synced rows need a globally unique key
    db["evaluations"].add_column("uid", str)
    db.execute("UPDATE evaluations SET uid = 'ev-' || lower(hex(randomblob(8))) "
               "WHERE uid IS NULL")
    db["evaluations"].create_index(["uid"], unique=True)
    # local sync state, never synced itself: which batches of a registry repo this lab has
    # merged or written, and which row versions it has pushed there
    db["hub_batches"].create({"repo": str, "batch": str, "direction": str, "at": str},
                             pk=("repo", "batch"))
    db["hub_rows"].create({"repo": str, "tbl": str, "key": str, "digest": str},
                          pk=("repo", "tbl", "key", "digest"))


def _v4(db: sqlite_utils.Database) -> None:
    # shared labs (app/auth.py): users with salted scrypt hashes, an append-only audit log,
    # and soft deletes that keep a checkpoint's row and edges for the lineage
    db["users"].create({"name": str, "salt": str, "hash": str, "admin": int,
                        "created_at": str}, pk="name", not_null={"salt", "hash"},
                       defaults={"admin": 0})
    db["audit"].create({"id": int, "at": str, "user": str, "action": str, "target": str,
                        "details": str}, pk="id", not_null={"at", "action"})
    db["audit"].create_index(["at"])
    db["audit"].create_index(["target"])
    db["checkpoints"].add_column("deleted_at", str)
    db["checkpoints"].add_column("deleted_by", str)


def _v5(db: sqlite_utils.Database) -> None:
    # login lockout (app/auth.py): one row per failed login, `at` in Unix seconds
    db["login_failures"].create({"name": str, "at": float}, not_null={"name", "at"})
    db["login_failures"].create_index(["name", "at"])


def _v6(db: sqlite_utils.Database) -> None:
    # the GPUs a job holds at once, known at submit: the scheduler reads it instead of
    # validating every queued config on every tick (NULL in older rows)
    db["jobs"].add_column("gpus", int)


def _v7(db: sqlite_utils.Database) -> None:
    # datasets (registry/datasets.py): a data file or folder by content hash (a Hub dataset
    # by its id), the jobs that read each one and in which field; which data trained or
    # calibrated a checkpoint is then job_datasets joined with checkpoints.job_id
    db["datasets"].create(
        {"id": str, "name": str, "content_hash": str, "path": str, "source": str,
         "format": str, "rows": int, "files": int, "size_bytes": int, "created_at": str,
         "created_by": str, "metadata": str, "deleted_at": str, "deleted_by": str},
        pk="id", not_null={"name", "source", "created_at"})
    db["datasets"].create_index(["created_at"])
    db["datasets"].create_index(["content_hash"])
    # where a hash was computed: a file whose size and mtime are unchanged is not read again
    db["dataset_files"].create({"path": str, "size_bytes": int, "mtime_ns": int,
                                "dataset_id": str}, pk="path")
    db["job_datasets"].create({"job_id": str, "dataset_id": str, "field": str},
                              pk=("job_id", "dataset_id", "field"),
                              foreign_keys=[("dataset_id", "datasets", "id")])
    db["job_datasets"].create_index(["dataset_id"])


def _v8(db: sqlite_utils.Database) -> None:
    # substring search on checkpoint names through SQLite's FTS5 with the trigram tokenizer
    # (case-insensitive; any 3 or more characters, not only whole words), kept in step with
    # the table by sqlite-utils' triggers: a LIKE '%s%' scan read all rows (35 ms at 100k)
    import sqlite3

    if sqlite3.sqlite_version_info < (3, 34):
        raise RegistryError(f"this Python's SQLite is {sqlite3.sqlite_version}; the registry "
                            f"needs 3.34 or later (FTS5's trigram tokenizer, for search)")
    db["checkpoints"].enable_fts(["name"], create_triggers=True, tokenize="trigram")
    # the Jobs view's list and digest read the newest jobs: an index, not a sort of all
    db["jobs"].create_index(["created_at"])
    # a change counter per table, kept by triggers whatever writes the row: the workbench's
    # timers compare it and send the checkpoint lists and dropdowns only when it moved
    db.execute("CREATE TABLE changes (tbl TEXT PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)")
    for table in CHANGE_COUNTED:
        db.execute("INSERT INTO changes (tbl, n) VALUES (?, 0)", [table])
        for op in ("INSERT", "UPDATE", "DELETE"):
            db.execute(f"CREATE TRIGGER {table}_changes_{op.lower()} AFTER {op} ON {table} "
                       f"BEGIN UPDATE changes SET n = n + 1 WHERE tbl = '{table}'; END")


CHANGE_COUNTED = ("checkpoints", "edges", "evaluations", "datasets")


LINEAGE_INDEXES = {"checkpoints": "idx_checkpoints_lineage", "edges": "idx_edges_lineage",
                   "evaluations": "idx_evaluations_scores"}


def _v9(db: sqlite_utils.Database) -> None:
    # covering indexes for the lineage graph (Registry.lineage): each of its nodes, edges and
    # scores is one index seek, not an index seek and then a read of the table row (a wide
    # one: config, versions and metadata JSON). At depth 100 in the 100k benchmark (2,217
    # nodes) those reads were 3 of the graph's 18 ms; the indexes add 17 MiB to its 62
    # MiB file
    db["checkpoints"].create_index(
        ["id", "name", "kind", "relation", "architecture", "param_count", "created_at"],
        index_name=LINEAGE_INDEXES["checkpoints"])
    db["edges"].create_index(
        ["child_id", "parent_id", "position", "relation", "weight", "density", "role"],
        index_name=LINEAGE_INDEXES["edges"])
    # scores (Registry.latest_scores): the (checkpoint, task, metric) index gains the value
    db["evaluations"].create_index(["checkpoint_id", "task", "metric", "value"],
                                   index_name=LINEAGE_INDEXES["evaluations"])
    db.execute("DROP INDEX IF EXISTS idx_evaluations_checkpoint_id_task_metric")


def _v10(db: sqlite_utils.Database) -> None:
    # a dataset a job wrote (select_data's selection): `job_id` is that job, so the datasets
    # the job read are its parents in the lineage (registry/datasets.py `edges`)
    db["datasets"].add_column("job_id", str)
    db["datasets"].create_index(["job_id"])
    # follow-up jobs a job offers (mixture_law's predicted continue_pretrain config): a JSON
    # list of {"plugin", "config", "label"}, which the Jobs view offers to submit
    db["jobs"].add_column("suggestions", str)


def _v11(db: sqlite_utils.Database) -> None:
    # jobs run by a cluster engine (app/executors): which executor ran it (NULL: this
    # machine's scheduler), the engine's id for it, and how far into the job folder's
    # journal (registry/journal.py) the server has replayed, in bytes: a restarted server
    # goes on from there, and a line is never applied twice
    db["jobs"].add_column("executor", str)
    db["jobs"].add_column("engine_id", str)
    db["jobs"].add_column("journal_offset", int, not_null_default=0)


# Forward migrations, applied in order; never edit one that has shipped, append a new one.
MIGRATIONS: list[tuple[int, Any]] = [(1, _v1), (2, _v2), (3, _v3), (4, _v4), (5, _v5),
                                     (6, _v6), (7, _v7), (8, _v8), (9, _v9), (10, _v10),
                                     (11, _v11)]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def version(db: sqlite_utils.Database) -> int:
    """The schema version a registry file is at (0: a new, empty file)."""
    if "schema_version" not in db.table_names():
        return 0
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return row[0] or 0


def migrate(db: sqlite_utils.Database, write: Callable[[], ContextManager[Any]],
            path: str | Path) -> None:
    """Apply the migrations a registry file lacks, in one `write()` transaction; refuse a file
    newer than SCHEMA_VERSION (`path` names it in the error)."""
    if version(db) == SCHEMA_VERSION:  # the common case: no write lock needed
        return
    with write():
        if "schema_version" not in db.table_names():
            db["schema_version"].create({"version": int, "applied_at": str}, pk="version")
        current = version(db)
        if current > SCHEMA_VERSION:
            raise RegistryError(
                f"{path} has schema version {current}, newer than this weightsmith "
                f"understands ({SCHEMA_VERSION}); upgrade weightsmith to open this lab")
        for number, migration in MIGRATIONS:
            if number > current:
                migration(db)
                db["schema_version"].insert({"version": number, "applied_at": now()})
