"""The lineage store: checkpoints, lineage edges, jobs, metrics and evaluations in one SQLite file,
with the lab's users, login failures, audit log and Hub sync state beside them.

Every table is read and written through a Registry: its own methods, or the parts it is
composed of, `reg.users` (registry/users.py: users, failed logins, audit) and `reg.sync`
(registry/sync_rows.py: Hub sync rows); registry/schema.py holds the migrations. app/ and
plugins/ hold no SQL (tests/test_registry_owns_tables.py checks it), so that each row gets
the same checks wherever it comes from: a job, an import, a login, Hub sync.

sqlite-utils does table creation, inserts and queries; we add what it lacks for a multi-process
lab: WAL + busy timeout on every connection, `BEGIN IMMEDIATE` write transactions (a deferred
BEGIN that later upgrades to a write can fail with SQLITE_BUSY instead of waiting), a schema
version table with forward migrations, and recursive-CTE lineage queries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from registry import schema
from registry.datasets import Datasets
from registry.common import FINISHED, JOB_STATUSES, RegistryError, check_relation, now
# the Mermaid text of lineage graphs lives in registry/lineage.py; re-exported from here
from registry.lineage import mermaid, mermaid_text
from registry.relations import RELATIONS
from registry.schema import MIGRATIONS, SCHEMA_VERSION
from registry.sync_rows import SyncRows
from registry.users import AuditEntry, User, Users

# what other modules import from here; some names live in the store's parts and are
# re-exported (common.py, schema.py, users.py, relations.py)
__all__ = ["Registry", "RegistryError", "now", "probe", "new_id", "ID_BYTES", "FINISHED",
           "JOB_STATUSES", "check_relation", "RELATIONS", "MIGRATIONS", "SCHEMA_VERSION",
           "User", "AuditEntry", "mermaid", "mermaid_text"]

# Random bytes per id. Checkpoint ids are merged across labs by Hub sync, so they get 48 bits
# (a collision among a million synced checkpoints is about 0.2 % likely; 32 bits made one
# certain); older 8-digit ids stay valid. Job ids keep 32 bits.
ID_BYTES = {"ck": 6, "job": 4}


MMAP_BYTES = 256 << 20  # SQLite reads up to this much of registry.db through mmap


def new_id(prefix: str) -> str:
    """Short, human-friendly id such as `ck-1a2b3c4d5e6f`; callers retry on the (rare)
    collision."""
    return f"{prefix}-{secrets.token_hex(ID_BYTES.get(prefix, 4))}"


class Registry:
    """One connection to a lab's registry.db. Not shared between threads: open one per thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit; transactions are opened explicitly in `write()`.
        conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA foreign_keys = ON")
        self.db = sqlite_utils.Database(conn)
        if self.db.journal_mode != "wal":
            self.db.enable_wal()
        conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL: survives process crashes
        # reads through a shared memory map, not a read() per page into each connection's
        # small private cache: the lineage of 2,000 checkpoints took 40% less time
        conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        self.migrate()
        # the tables with a life of their own, by composition over this connection
        self.users = Users(self.db, self.write)  # users, failed logins, audit log
        self.sync = SyncRows(self)  # Hub sync: exported and pulled rows, local sync state
        self.datasets = Datasets(self.db, self.write)  # data by content hash, and its uses

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------- transactions
    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite_utils.Database]:
        """A write transaction that takes the lock up front (waits on busy_timeout)."""
        conn = self.db.conn
        if conn.in_transaction:  # nested: sqlite-utils turns this into a savepoint
            with self.db.atomic():
                yield self.db
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # ---------------------------------------------------------------------------- schema
    def schema_version(self) -> int:
        return schema.version(self.db)

    def migrate(self) -> None:
        """Bring the file to SCHEMA_VERSION (registry/schema.py holds the migrations)."""
        schema.migrate(self.db, self.write, self.path)

    # ------------------------------------------------------------------------ checkpoints
    def add_checkpoint(self, *, name: str, relation: str, path: str | None = None,
                       parents: list[dict] | None = None, kind: str = "model",
                       id: str | None = None, **fields: Any) -> dict:
        """Insert a checkpoint and its lineage edges in one transaction; returns the row.

        `parents`: [{"id": ..., "relation": optional, "weight": optional, "role": optional}].
        A taken name gets a numeric suffix so names stay unique (they are valid references).
        """
        check_relation(relation)
        for key in ("config", "versions", "metadata"):
            if key in fields and not isinstance(fields[key], (str, type(None))):
                fields[key] = json.dumps(fields[key], sort_keys=True)
        with self.write():
            for p in parents or []:
                if self.get_checkpoint(p["id"]) is None:
                    raise RegistryError(f"parent checkpoint {p['id']!r} is not in the registry")
            unique = self._free_name(name)
            ck_id = id or self.free_id("ck")
            row = {"id": ck_id, "name": unique, "kind": kind, "relation": relation,
                   "path": path, "created_at": now(), **fields}
            self.db["checkpoints"].insert(row)
            for position, p in enumerate(parents or []):
                self.add_edge(ck_id, p["id"], p.get("relation") or relation,
                              weight=p.get("weight"), density=p.get("density"),
                              role=p.get("role"), position=position)
        return self.get_checkpoint(ck_id)

    def add_edge(self, child_id: str, parent_id: str, relation: str, *,
                 weight: float | None = None, density: float | None = None,
                 role: str | None = None, position: int = 0,
                 skip_existing: bool = False) -> bool:
        """Insert one lineage edge after the checks every edge gets, wherever it comes from
        (a job, an import's card, Hub sync): a valid relation, two distinct checkpoints that
        both exist. With `skip_existing`, an edge already recorded is left as it is (False).
        Returns whether an edge was added."""
        check_relation(relation)
        if child_id == parent_id:
            raise RegistryError(f"checkpoint {child_id!r} cannot be its own parent")
        with self.write():
            for end, ck_id in (("parent", parent_id), ("child", child_id)):
                if not ck_id or self.get_checkpoint(ck_id) is None:
                    raise RegistryError(f"{end} checkpoint {ck_id!r} is not in the registry")
            if skip_existing and self.db.execute(
                    "SELECT 1 FROM edges WHERE child_id = ? AND parent_id = ?",
                    [child_id, parent_id]).fetchone():
                return False
            self.db["edges"].insert({
                "child_id": child_id, "parent_id": parent_id, "relation": relation,
                "weight": weight, "density": density, "role": role, "position": position})
        return True

    def update_checkpoint(self, ck_id: str, **fields: Any) -> None:
        """Set columns of a checkpoint row (Hub sync state, a stub's downloaded files);
        dicts and lists in the JSON columns are encoded here."""
        for key in ("config", "versions", "metadata"):
            if key in fields and not isinstance(fields[key], (str, type(None))):
                fields[key] = json.dumps(fields[key], sort_keys=True)
        if "relation" in fields:
            check_relation(fields["relation"])
        with self.write():
            self.db["checkpoints"].update(ck_id, fields)

    def soft_delete_checkpoint(self, ck_id: str, user: str | None, **fields: Any) -> None:
        """Mark a checkpoint deleted: hidden from lists, its row, edges and scores kept for
        the lineage. `fields`: other columns to set at the same time (path=None)."""
        self.update_checkpoint(ck_id, deleted_at=now(), deleted_by=user, **fields)

    def checkpoint_for_hub_id(self, repo_id: str) -> dict | None:
        """The row for a Hub model (published here, or imported from it): one with files
        first, then the oldest."""
        rows = list(self.db.query(
            "SELECT * FROM checkpoints WHERE hub_repo = ? OR source = ? "
            "ORDER BY path IS NULL, created_at LIMIT 1", [repo_id, f"hf://{repo_id}"]))
        return rows[0] if rows else None

    def intermediate_checkpoints(self, created_before: str) -> list[dict]:
        """Intermediate saves (metadata.intermediate) created before `created_before`, not
        deleted, not on the Hub and with no descendants: what retention may remove."""
        return list(self.db.query(
            "SELECT * FROM checkpoints c WHERE json_extract(c.metadata, '$.intermediate') = 1 "
            "AND c.created_at < ? AND c.deleted_at IS NULL AND c.hub_repo IS NULL "
            "AND NOT EXISTS (SELECT 1 FROM edges e WHERE e.parent_id = c.id) "
            "ORDER BY c.created_at", [created_before]))

    def free_id(self, prefix: str) -> str:
        """A new short id not yet used in its table (32 random bits, so retry on collision)."""
        table = {"ck": "checkpoints", "job": "jobs"}[prefix]
        while True:
            candidate = new_id(prefix)
            if not self.db.execute(f"SELECT 1 FROM {table} WHERE id = ?",
                                   [candidate]).fetchone():
                return candidate

    def _free_name(self, name: str) -> str:
        taken = {r["name"] for r in self.db.query(
            "SELECT name FROM checkpoints WHERE name = ? OR name LIKE ?", [name, name + "-%"])}
        if name not in taken:
            return name
        n = 2
        while f"{name}-{n}" in taken:
            n += 1
        return f"{name}-{n}"

    def get_checkpoint(self, ck_id: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM checkpoints WHERE id = ?", [ck_id]))
        return rows[0] if rows else None

    def find_checkpoint(self, ref: str) -> dict | None:
        """Resolve a registry id, a name, or a registered path; None when nothing matches."""
        row = self.get_checkpoint(ref)
        if row:
            return row
        rows = list(self.db.query("SELECT * FROM checkpoints WHERE name = ?", [ref]))
        if rows:
            return rows[0]
        try:
            real = str(Path(ref).expanduser().resolve())
        except (OSError, RuntimeError):
            return None
        rows = list(self.db.query(
            "SELECT * FROM checkpoints WHERE path = ? ORDER BY created_at DESC LIMIT 1", [real]))
        return rows[0] if rows else None

    def checkpoint(self, ck_id: str) -> dict:
        row = self.find_checkpoint(ck_id)
        if row is None:
            raise RegistryError(f"no checkpoint {ck_id!r} in the registry (not an id or a name)")
        return row

    def parents(self, ck_id: str) -> list[dict]:
        return list(self.db.query(
            "SELECT e.*, c.name AS parent_name FROM edges e JOIN checkpoints c "
            "ON c.id = e.parent_id WHERE e.child_id = ? ORDER BY e.position", [ck_id]))

    def list_checkpoints(self, *, search: str | None = None, relation: str | None = None,
                         kind: str | None = None, architecture: str | None = None,
                         limit: int = 50, offset: int = 0) -> list[dict]:
        """A page of checkpoints, newest first, each with its parents and latest scores."""
        where, params = [], []
        if search:
            where.append(_name_or_id(search, params))
        for column, value in (("relation", relation), ("kind", kind),
                              ("architecture", architecture)):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        where.append("deleted_at IS NULL")  # soft-deleted rows stay for the lineage only
        sql = "SELECT * FROM checkpoints WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC LIMIT ? OFFSET ?"
        rows = list(self.db.query(sql, params + [limit, offset]))
        ids = [r["id"] for r in rows]
        if not ids:
            return rows
        marks = ",".join("?" * len(ids))
        parents: dict[str, list[str]] = {}
        for e in self.db.query(
                f"SELECT child_id, parent_id FROM edges WHERE child_id IN ({marks}) "
                "ORDER BY position", ids):
            parents.setdefault(e["child_id"], []).append(e["parent_id"])
        scores = self.latest_scores(ids)
        for r in rows:
            r["parents"] = parents.get(r["id"], [])
            r["scores"] = scores.get(r["id"], {})
        return rows

    # ------------------------------------------------------------------------ lineage
    def _walk(self, ck_id: str, up: bool, max_depth: int | None) -> list[dict]:
        """Breadth-first walk over edges, one indexed query per level; each node is expanded
        once, at its shortest distance.

        Not a recursive CTE: a CTE that carries the depth can only drop exact (id, depth)
        duplicates, so in a merge-heavy DAG it re-expands a node once per distinct path
        length. Measured on the 100k-checkpoint benchmark, an unbounded walk that way ran for
        over ten minutes, where this takes milliseconds. Without the depth, a CTE cannot
        stop at `max_depth`.
        """
        depth_of = self._depths(ck_id, up, max_depth)
        rows = []
        for chunk in _chunks(list(depth_of)):
            marks = ",".join("?" * len(chunk))
            rows += self.db.query(
                f"SELECT id, name, relation, kind FROM checkpoints WHERE id IN ({marks})", chunk)
        for r in rows:
            r["depth"] = depth_of[r["id"]]
        rows.sort(key=lambda r: (r["depth"], r["id"]))
        return rows

    def _depths(self, ck_id: str, up: bool, max_depth: int | None,
                parent_edges: list[tuple] | None = None) -> dict[str, int]:
        """{checkpoint id: its shortest distance} of the walk from `ck_id` (not included).

        With `parent_edges` (a list; walking up), the walk reads whole `_PARENT_EDGES` rows
        and appends them to it: the parent edges of every node it expands, which the lineage
        graph then need not look up a second time. Each level's ids go in as one `_id_list`,
        so each direction is one prepared statement, whatever the level's size."""
        if parent_edges is not None:
            assert up, "only a walk up reads the parent edges of what it expands"
            sql, at = _PARENT_EDGES, 2
        else:
            src, dst = ("child_id", "parent_id") if up else ("parent_id", "child_id")
            sql, at = f"SELECT e.{dst} FROM json_each(?) j JOIN edges e ON e.{src} = j.value", 0
        depth_of: dict[str, int] = {ck_id: 0}
        frontier, depth = [ck_id], 0
        while frontier and (max_depth is None or depth < max_depth):
            depth += 1
            rows = self.db.conn.execute(sql, [_id_list(frontier)]).fetchall()
            if parent_edges is not None:
                parent_edges += rows
            frontier = []
            for row in rows:
                if row[at] not in depth_of:
                    depth_of[row[at]] = depth
                    frontier.append(row[at])
        del depth_of[ck_id]
        return depth_of

    def ancestors(self, ck_id: str, max_depth: int | None = None) -> list[dict]:
        return self._walk(self.checkpoint(ck_id)["id"], True, max_depth)

    def descendants(self, ck_id: str, max_depth: int | None = None) -> list[dict]:
        return self._walk(self.checkpoint(ck_id)["id"], False, max_depth)

    def lineage(self, ck_id: str, max_depth: int | None = None,
                datasets: bool = False) -> dict:
        """The lineage graph around a checkpoint: its ancestors, itself and its descendants;
        with `datasets`, also the datasets that trained or calibrated them (nodes of kind
        "dataset", edges of relation "data" whose role is the config field).

        One statement per level of each walk (the walk up brings each node's parent edges
        along) and one each for the other edges, the nodes and their scores, all answered
        from covering indexes (schema v9): at depth 100 in bench/registry.py's 100k
        registry (2,217 nodes), roughly half the time of reading the edges twice and each
        node, edge and score from its table row as well."""
        root = self.checkpoint(ck_id)["id"]
        found: list[tuple] = []  # _PARENT_EDGES rows
        ids = list(dict.fromkeys([root, *self._depths(root, True, max_depth, found),
                                  *self._depths(root, False, max_depth)]))
        # the walk up read the parent edges of the nodes it expanded; the others' (the last
        # level up, the descendants; nodes without parents again, finding none) are read here
        read = {row[0] for row in found}
        rest = [i for i in ids if i not in read]
        if rest:
            found += self.db.conn.execute(_PARENT_EDGES, [_id_list(rest)]).fetchall()
        listed = _id_list(ids)
        rows = self.db.conn.execute(_NODES, [listed]).fetchall()
        rows.sort()  # oldest first: (created_at, id), unique, so no other column is compared
        scores = self._scores(listed)
        nodes = [{"id": i, "name": name, "kind": kind, "relation": relation,
                  "architecture": architecture, "param_count": param_count,
                  "created_at": created_at, "scores": scores.get(i, {})}
                 for created_at, i, name, kind, relation, architecture, param_count in rows]
        shown = set(ids)
        found.sort()  # (child, position with NULL as -1, parent): (child, parent) is unique
        edges = [{"parent": p, "child": c, "relation": rel, "weight": w, "density": d,
                  "role": role} for c, _, p, rel, w, d, role in found if p in shown]
        graph = {"root": root, "nodes": nodes, "edges": edges}
        return self._with_datasets(graph) if datasets else graph

    def _with_datasets(self, graph: dict) -> dict:
        """`graph` with the datasets of its checkpoints: nodes in creation order, data edges
        after the checkpoint edges."""
        data_nodes, data_edges = self.datasets.edges([n["id"] for n in graph["nodes"]])
        nodes = sorted(graph["nodes"] + data_nodes, key=lambda n: (n["created_at"], n["id"]))
        return {**graph, "nodes": nodes, "edges": graph["edges"] + data_edges}

    def lineage_mermaid(self, ck_id: str, max_depth: int | None = None,
                        scores: list[str] | None = None) -> str:
        """Mermaid text of `lineage` (registry/lineage.py); `scores`: the "task/metric" keys
        to show on the nodes (default: one headline metric per task)."""
        return mermaid(self.lineage(ck_id, max_depth), scores)

    def lab_graph(self, limit: int | None = None, search: str | None = None,
                  datasets: bool = False) -> dict:
        """The lab's graph, in the shape of `lineage` with no root: the latest `limit`
        checkpoints (all when None) whose name or id contains `search`, not deleted, oldest
        first, with their latest scores and the edges between them; with `datasets`, also
        the datasets that trained or calibrated them (not counted in `limit`)."""
        where, params = ["deleted_at IS NULL"], []
        if search:
            where.append(_name_or_id(search, params))
        sql = ("SELECT id, name, kind, relation, architecture, param_count, created_at "
               "FROM checkpoints WHERE " + " AND ".join(where)
               + " ORDER BY created_at DESC, id DESC")
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, int(limit)))
        rows = list(self.db.query(sql, params))[::-1]
        ids = [r["id"] for r in rows]
        scores: dict[str, dict[str, float]] = {}
        edges: list[dict] = []
        for chunk in _chunks(ids):
            scores.update(self.latest_scores(chunk))
        if ids:
            # one query over the edges whose child is shown; parents outside are dropped here
            shown = set(ids)
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                edges += [e for e in self.db.query(
                    f"SELECT parent_id AS parent, child_id AS child, relation, weight, "
                    f"density, role FROM edges WHERE child_id IN ({marks}) "
                    f"ORDER BY child_id, position", chunk) if e["parent"] in shown]
        nodes = [{**r, "scores": scores.get(r["id"], {})} for r in rows]
        graph = {"root": None, "nodes": nodes, "edges": edges}
        return self._with_datasets(graph) if datasets and nodes else graph

    # ----------------------------------------------------------------- metrics & evaluations
    def add_metric(self, *, name: str, value: float, step: int | None = None,
                   job_id: str | None = None, checkpoint_id: str | None = None) -> None:
        self.db["metrics"].insert({"job_id": job_id, "checkpoint_id": checkpoint_id,
                                   "name": name, "value": float(value), "step": step,
                                   "created_at": now()})

    def metrics(self, job_id: str) -> list[dict]:
        return list(self.db.query(
            "SELECT name, value, step, created_at FROM metrics WHERE job_id = ? ORDER BY id",
            [job_id]))

    def add_evaluation(self, *, checkpoint_id: str, task: str, metric: str, value: float,
                       stderr: float | None = None, job_id: str | None = None,
                       details: dict | None = None) -> None:
        self.checkpoint(checkpoint_id)
        self.db["evaluations"].insert({
            "checkpoint_id": checkpoint_id, "job_id": job_id, "task": task, "metric": metric,
            "value": float(value), "stderr": stderr,
            "details": json.dumps(details) if details else None, "created_at": now()})

    def evaluations(self, ck_id: str) -> list[dict]:
        return list(self.db.query(
            "SELECT * FROM evaluations WHERE checkpoint_id = ? ORDER BY id", [ck_id]))

    def latest_scores(self, ids: list[str]) -> dict[str, dict[str, float]]:
        """{checkpoint: {"task/metric": latest value}} for the given checkpoints."""
        # a set: a joined list, unlike IN, yields a checkpoint's rows once per mention
        return self._scores(_id_list(set(ids))) if ids else {}

    def _scores(self, listed: str) -> dict[str, dict[str, float]]:
        """`latest_scores` of an `_id_list` without repeats."""
        out: dict[str, dict[str, float]] = {}
        # sorted here, not by ORDER BY id: that made SQLite scan the whole table in id order
        # instead of looking the checkpoints up in its checkpoint_id index (schema v9's index
        # also holds the value, so the table itself is not read)
        for _, ck, task, metric, value in sorted(self.db.conn.execute(
                "SELECT e.id, e.checkpoint_id, e.task, e.metric, e.value FROM json_each(?) j "
                "JOIN evaluations e ON e.checkpoint_id = j.value", [listed])):
            out.setdefault(ck, {})[f"{task}/{metric}"] = value
        return out

    def scores_by_key(self, content_hash: str, key: str) -> list[dict]:
        """Evaluation rows of the newest evaluation with this `key` (details.key: what the
        scores depend on besides the weights) of any checkpoint with these exact weights."""
        if not content_hash:
            return []
        rows = list(self.db.query(
            "SELECT e.* FROM evaluations e JOIN checkpoints c ON c.id = e.checkpoint_id "
            "WHERE c.content_hash = ? AND json_extract(e.details, '$.key') = ? "
            "ORDER BY e.id DESC", [content_hash, key]))
        if not rows:
            return []
        newest = rows[0]["job_id"], rows[0]["checkpoint_id"]
        return [r for r in reversed(rows) if (r["job_id"], r["checkpoint_id"]) == newest]

    def chain(self, ck_id: str, from_id: str | None = None) -> list[dict]:
        """The lineage path from an ancestor down to `ck_id`, oldest first (rows of
        checkpoints). With no `from_id`, follow each checkpoint's first parent up to a root;
        otherwise the shortest path from that ancestor (first parents preferred)."""
        target = self.checkpoint(ck_id)
        start = self.checkpoint(from_id) if from_id else None
        came_from: dict[str, str | None] = {target["id"]: None}
        frontier, found = [target["id"]], None
        while frontier and found is None:
            nxt = []
            for node in frontier:
                if start is not None and node == start["id"]:
                    found = node
                    break
                parents = self.parents(node)
                if start is None and not parents:
                    found = node
                    break
                for p in parents[:1] if start is None else parents:
                    if p["parent_id"] not in came_from:
                        came_from[p["parent_id"]] = node
                        nxt.append(p["parent_id"])
            frontier = nxt
        if found is None:
            raise RegistryError(f"{start['name']} ({start['id']}) is not an ancestor of "
                                f"{target['name']} ({target['id']})")
        path, node = [], found
        while node is not None:
            path.append(self.checkpoint(node))
            node = came_from[node]
        return path

    def score_deltas(self, ck_id: str) -> list[dict]:
        """For each parent and each metric both have: the checkpoint's latest value, the
        parent's, and the difference (child - parent)."""
        ck = self.checkpoint(ck_id)
        parents = self.parents(ck["id"])
        scores = self.latest_scores([ck["id"]] + [p["parent_id"] for p in parents])
        mine = scores.get(ck["id"], {})
        out = []
        for p in parents:
            theirs = scores.get(p["parent_id"], {})
            for metric in sorted(set(mine) & set(theirs)):
                out.append({"metric": metric, "value": mine[metric],
                            "parent": p["parent_id"], "parent_name": p["parent_name"],
                            "parent_value": theirs[metric],
                            "delta": mine[metric] - theirs[metric]})
        return out

    # ------------------------------------------------------------------------------ jobs
    def add_job(self, *, plugin: str, config: dict, user: str | None = None,
                priority: int = 0, versions: dict | None = None,
                gpus: int | None = None) -> dict:
        """Queue a job. `gpus`: how many GPUs it holds at once (its plugin's `resources` hook),
        stored so the scheduler need not validate the config again."""
        if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int)
                                 or gpus < 1):
            raise RegistryError(f"gpus: got {gpus!r}; expected a whole number >= 1")
        with self.write():
            job_id = self.free_id("job")
            self.db["jobs"].insert({
                "id": job_id, "plugin": plugin, "config": json.dumps(config, sort_keys=True),
                "status": "queued", "user": user, "priority": priority, "created_at": now(),
                "versions": json.dumps(versions or {}, sort_keys=True), "progress": 0.0,
                "cancel_requested": 0, "gpus": gpus})
        return self.job(job_id)

    def queued_jobs(self) -> list[dict]:
        """Every queued job, in no particular order (the scheduler orders them fairly)."""
        return list(self.db.query("SELECT * FROM jobs WHERE status = 'queued'"))

    def last_starts(self) -> dict[str, str]:
        """{user: the latest started_at of their jobs}, for the scheduler's fair order."""
        return {r["user"]: r["last"] for r in self.db.query(
            "SELECT user, MAX(started_at) AS last FROM jobs WHERE started_at IS NOT NULL "
            "GROUP BY user")}

    def take_back_job(self, job_id: str) -> bool:
        """Delete a job that is still queued (a submit that failed half-way); False if a
        scheduler has started it meanwhile, or it is gone."""
        with self.write():
            cur = self.db.execute("DELETE FROM jobs WHERE id = ? AND status = 'queued'",
                                  [job_id])
        return cur.rowcount > 0

    def job(self, job_id: str, missing_ok: bool = False) -> dict | None:
        rows = list(self.db.query("SELECT * FROM jobs WHERE id = ?", [job_id]))
        if not rows and not missing_ok:
            raise RegistryError(f"no job {job_id!r} in the registry")
        return rows[0] if rows else None

    def jobs(self, status: str | None = None, limit: int = 100) -> list[dict]:
        if status:
            return list(self.db.query(
                "SELECT * FROM jobs WHERE status = ? ORDER BY created_at DESC LIMIT ?",
                [status, limit]))
        return list(self.db.query("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?",
                                  [limit]))

    def jobs_mark(self, limit: int, job_id: str | None) -> str:
        """A digest of what the Jobs view shows: the newest `limit` jobs' ids, statuses,
        progress, devices and times, and the job `job_id`'s row and metric count. Equal
        digests: nothing there changed (the view then sends nothing)."""
        h = hashlib.blake2b(digest_size=12)
        for row in self.db.execute(
                "SELECT id, status, progress, progress_message, device, user, started_at, "
                "finished_at, priority FROM jobs ORDER BY created_at DESC LIMIT ?", [limit]):
            h.update(repr(row).encode())
        if job_id:
            h.update(repr(self.db.execute(
                "SELECT status, progress, progress_message, error, device, finished_at, "
                "suggestions, (SELECT COUNT(*) FROM metrics WHERE job_id = ?), "
                "(SELECT COUNT(*) FROM checkpoints WHERE job_id = ?) FROM jobs WHERE id = ?",
                [job_id, job_id, job_id]).fetchall()).encode())
        return h.hexdigest()

    def lab_counts(self) -> dict:
        """{"checkpoints": not deleted, "queued": ..., "running": ...}: counts, not rows."""
        out = {"checkpoints": self.db.execute(
            "SELECT COUNT(*) FROM checkpoints WHERE deleted_at IS NULL").fetchone()[0]}
        for status in ("queued", "running"):
            out[status] = self.db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?",
                                          [status]).fetchone()[0]
        return out

    def active_jobs_mark(self) -> str:
        """A digest of the queued and running jobs (ids, statuses, progress) and the number
        of jobs in each status: what Home's job list and counts show."""
        h = hashlib.blake2b(digest_size=12)
        for sql in ("SELECT id, status, progress, device FROM jobs "
                    "WHERE status IN ('queued', 'running') ORDER BY id",
                    "SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status"):
            h.update(repr(self.db.execute(sql).fetchall()).encode())
        return h.hexdigest()

    def registry_mark(self) -> str:
        """A digest that changes whenever a checkpoint, edge, evaluation or dataset row is
        written (the `changes` counters, kept by triggers: schema v8): what the checkpoint
        lists and dropdowns show."""
        rows = self.db.execute("SELECT tbl, n FROM changes ORDER BY tbl").fetchall()
        return hashlib.blake2b(repr(rows).encode(), digest_size=12).hexdigest()

    def update_job(self, job_id: str, *, only_if_status: tuple[str, ...] | None = None,
                   **fields: Any) -> bool:
        """Update a job; with `only_if_status`, only while it is in one of those states.

        Returns whether a row changed: this is how racing writers (the worker finishing, a
        cancel, the scheduler's reaper) agree on a single final status.
        """
        if "status" in fields and fields["status"] not in JOB_STATUSES:
            raise RegistryError(f"unknown job status {fields['status']!r}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        sql = f"UPDATE jobs SET {sets} WHERE id = ?"
        params = list(fields.values()) + [job_id]
        if only_if_status:
            sql += f" AND status IN ({','.join('?' * len(only_if_status))})"
            params += list(only_if_status)
        with self.write():
            cur = self.db.execute(sql, params)
        return cur.rowcount > 0

    def add_job_suggestion(self, job_id: str, suggestion: dict) -> None:
        """Append a follow-up job ({"plugin", "config", "label"}) that job `job_id` offers."""
        with self.write():
            row = self.job(job_id)
            found = json.loads(row["suggestions"]) if row.get("suggestions") else []
            found.append(suggestion)
            self.db["jobs"].update(job_id, {"suggestions": json.dumps(found, sort_keys=True)})

    def job_suggestions(self, job_id: str) -> list[dict]:
        row = self.job(job_id, missing_ok=True)
        return json.loads(row["suggestions"]) if row and row.get("suggestions") else []

    def ended_cluster_jobs(self, within_s: float) -> list[dict]:
        """Jobs of a cluster executor that ended in the last `within_s` seconds."""
        from datetime import datetime, timedelta, timezone

        since = (datetime.now(timezone.utc) - timedelta(seconds=within_s)).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ")
        return list(self.db.query(
            "SELECT * FROM jobs WHERE executor IS NOT NULL AND finished_at >= ? "
            "AND status IN ('succeeded', 'failed', 'cancelled', 'interrupted')", [since]))

    def job_checkpoints(self, job_id: str) -> list[str]:
        return [r["id"] for r in self.db.query(
            "SELECT id FROM checkpoints WHERE job_id = ? ORDER BY created_at", [job_id])]

    # ---------------------------------------------------------------------------- access
    def columns(self, table: str) -> set[str]:
        """The column names of one of the registry's tables."""
        if table not in self.db.table_names():
            raise RegistryError(f"no table {table!r} in the registry")
        return set(self.db[table].columns_dict)

    def snapshot(self, dest: str | Path) -> None:
        """A consistent copy of the whole registry in one file at `dest` (SQLite's online
        backup: readers and writers go on meanwhile), for a worker on another node, which
        must not open this file (registry/journal.py)."""
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".part")
        tmp.unlink(missing_ok=True)
        target = sqlite3.connect(str(tmp))
        try:
            self.db.conn.backup(target)
            target.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
        finally:
            target.close()
        os.replace(tmp, dest)  # a reader never sees half a copy

    def read_only(self) -> None:
        """From now on this connection refuses writes (a distributed job's other ranks:
        rank 0 records)."""
        self.db.execute("PRAGMA query_only = ON")


FTS_MIN = 3  # the trigram index finds substrings of at least 3 characters


def _name_or_id(search: str, params: list) -> str:
    """The WHERE clause (its parameters appended to `params`) of checkpoints whose name
    contains `search` (literally, case-insensitively) or whose id starts with it. Three or
    more characters go through the FTS5 trigram index on names (schema v8); shorter ones
    scan the names. An id prefix is a range on the primary key's index."""
    if len(search) >= FTS_MIN and all(c >= " " for c in search):  # FTS5 ends a query at NUL
        # one FTS5 string (quotes doubled): the trigrams of `search`, in order, i.e. the
        # substring; nothing in it is query syntax
        name = ("rowid IN (SELECT rowid FROM checkpoints_fts WHERE checkpoints_fts MATCH ?)")
        params.append('"' + search.replace('"', '""') + '"')
    else:
        name = "instr(lower(name), lower(?)) > 0"
        params.append(search)
    prefix = search.lower()  # ids are lowercase
    params += [prefix, prefix + "\U0010ffff"]
    return f"({name} OR (id >= ? AND id < ?))"


def probe(path: str | Path, timeout: float) -> None:
    """Read a registry file's schema with a short lock timeout: a file that another process
    holds exclusively raises sqlite3.OperationalError ("database is locked") within `timeout`
    seconds, rather than after a Registry's 30 s busy timeout. A missing file is left alone."""
    if not Path(path).is_file():
        return
    conn = sqlite3.connect(str(path), timeout=timeout)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    finally:
        conn.close()


def _id_list(ids) -> str:
    """Checkpoint ids as the one JSON parameter that the lineage queries join (json_each):
    no bound-parameter limit, one prepared statement whatever the number, and cheaper than
    `IN (SELECT value FROM json_each(?))`, which first copies the list into a temporary
    index. Sorted, so that the index seeks run in key order."""
    return json.dumps(sorted(ids))


# The lineage graph's nodes and parent edges (of an `_id_list`) come from schema v9's covering
# indexes, named: with no ANALYZE statistics, or statistics older than v9, SQLite prefers the
# primary keys' indexes and then reads each table row as well. The first columns are the
# order the graph lists them in (a plain sort of the rows).
# Nodes: created_at, id
_NODES = ("SELECT c.created_at, c.id, c.name, c.kind, c.relation, c.architecture, "
          f"c.param_count FROM json_each(?) j JOIN checkpoints c "
          f"INDEXED BY {schema.LINEAGE_INDEXES['checkpoints']} ON c.id = j.value")
# Parent edges: child, position (NULL as -1), parent
_PARENT_EDGES = ("SELECT e.child_id, coalesce(e.position, -1), e.parent_id, e.relation, "
                 "e.weight, e.density, e.role FROM json_each(?) j JOIN edges e "
                 f"INDEXED BY {schema.LINEAGE_INDEXES['edges']} ON e.child_id = j.value")


def _chunks(items: list, size: int = 500) -> Iterator[list]:
    """Slices small enough for SQLite's bound-parameter limit."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
