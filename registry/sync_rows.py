"""The registry's side of Hub sync (registry/hub.py does the Hub's): the rows of the synced
tables as they are exported, the checks on rows pulled from another lab, and the local sync
state (`hub_batches`, `hub_rows`), never synced itself. Reached as `reg.sync`."""

from __future__ import annotations

import json
import secrets
from typing import Any, Iterable

from registry.common import FINISHED, RegistryError, check_relation, now


class SyncRows:
    """Hub sync rows of one Registry (given as `registry`: pulled rows are checked against
    its checkpoints and jobs, and written in its write transactions)."""

    def __init__(self, registry):
        self.registry = registry
        self.db = registry.db

    def rows(self, table: str) -> list[dict]:
        """The rows of a synced table as Hub sync exports them (jobs: finished ones only);
        evaluations made before the uid column existed get one first."""
        if table == "evaluations":
            with self.registry.write():
                for (row_id,) in self.db.execute(
                        "SELECT id FROM evaluations WHERE uid IS NULL").fetchall():
                    self.db.execute("UPDATE evaluations SET uid = ? WHERE id = ?",
                                    [f"ev-{secrets.token_hex(8)}", row_id])
        queries = {
            "checkpoints": ("SELECT * FROM checkpoints ORDER BY created_at, id", []),
            "edges": ("SELECT * FROM edges ORDER BY child_id, position", []),
            "jobs": (f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(FINISHED))}) "
                     "ORDER BY created_at, id", list(FINISHED)),
            "evaluations": ("SELECT * FROM evaluations ORDER BY id", []),
        }
        if table not in queries:
            raise RegistryError(f"table {table!r} is not synced; expected one of "
                                f"{', '.join(queries)}")
        sql, params = queries[table]
        return list(self.db.query(sql, params))

    # ------------------------------------------------------------ rows from another lab
    def add_checkpoint(self, row: dict) -> bool:
        """Insert a checkpoint pulled from another lab unless its id is known (False then).
        It gets no files here (path NULL) and a free name; its relation is checked as
        Registry.add_checkpoint checks one. JSON columns may be given decoded."""
        reg = self.registry
        if reg.get_checkpoint(row["id"]) is not None:  # known: nothing to check or add
            return False
        check_relation(row.get("relation"))
        with reg.write():
            if reg.get_checkpoint(row["id"]) is not None:
                return False
            new = {**row, "path": None, "name": reg._free_name(row["name"])}
            for key in ("config", "versions", "metadata"):
                new[key] = _dumps(new.get(key))
            self.db["checkpoints"].insert(new)
        return True

    def add_job(self, row: dict) -> bool:
        """Insert a finished job pulled from another lab unless its id is known."""
        reg = self.registry
        with reg.write():
            if reg.job(row["id"], missing_ok=True) is not None:
                return False
            if row.get("status") not in FINISHED:
                raise RegistryError(f"synced job {row['id']!r}: status {row.get('status')!r}; "
                                    f"expected a finished one ({', '.join(FINISHED)})")
            new = {**row, "cancel_requested": 0, "progress": 1.0}
            for key in ("config", "versions"):
                new[key] = _dumps(new.get(key))
            self.db["jobs"].insert(new)
        return True

    def add_evaluation(self, row: dict) -> bool:
        """Insert an evaluation pulled from another lab unless its uid is known; its
        checkpoint must exist."""
        reg = self.registry
        with reg.write():
            if reg.get_checkpoint(row.get("checkpoint_id") or "") is None:
                raise RegistryError(f"evaluation {row.get('uid')!r}: checkpoint "
                                    f"{row.get('checkpoint_id')!r} is not in the registry")
            if not row.get("uid") or self.db.execute(
                    "SELECT 1 FROM evaluations WHERE uid = ?", [row["uid"]]).fetchone():
                return False
            self.db["evaluations"].insert({**row, "details": _dumps(row.get("details"))})
        return True

    # ------------------------------------------------------------------ local sync state
    def batches(self, repo: str) -> set[str]:
        """The batches of a registry repo this lab has merged or written."""
        return {r["batch"] for r in self.db.query(
            "SELECT batch FROM hub_batches WHERE repo = ?", [repo])}

    def record_batch(self, repo: str, batch: str, direction: str) -> None:
        self.db["hub_batches"].insert({"repo": repo, "batch": batch, "direction": direction,
                                       "at": now()}, replace=True)

    def repo_rows(self, repo: str) -> set[tuple[str, str, str]]:
        """(table, key, digest) of every row version the repo has (pushed or pulled)."""
        return {(r["tbl"], r["key"], r["digest"]) for r in self.db.query(
            "SELECT tbl, key, digest FROM hub_rows WHERE repo = ?", [repo])}

    def record_repo_rows(self, repo: str, rows: Iterable[tuple[str, str, str]]) -> None:
        """Remember row versions (table, key, digest) the repo has, so they are not pushed."""
        with self.registry.write():
            for table, key, digest in rows:
                self.db["hub_rows"].insert({"repo": repo, "tbl": table, "key": key,
                                            "digest": digest}, replace=True)


def _dumps(value: Any) -> str | None:
    """A JSON column's text for a value given decoded (or already as text)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)
