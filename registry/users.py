"""The lab's users, failed logins and audit log: three tables of the registry, reached as
`reg.users` (a Registry builds one Users over its connection). Passwords are hashed by
app/auth.py; only the salt and hash are stored, and User rows never carry them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import sqlite_utils

from registry.common import RegistryError, now


@dataclass(frozen=True)
class User:
    """A lab user, without the password hash (see Users.credentials)."""
    name: str
    admin: bool
    created_at: str | None


@dataclass(frozen=True)
class AuditEntry:
    """One line of the append-only audit log; `details` decoded from its JSON column."""
    id: int
    at: str
    user: str | None
    action: str
    target: str | None
    details: dict | None


class Users:
    """The `users`, `login_failures` and `audit` tables of one registry connection.

    `write` is the Registry's write-transaction context manager (BEGIN IMMEDIATE)."""

    def __init__(self, db: sqlite_utils.Database, write: Callable[[], ContextManager[Any]]):
        self.db = db
        self.write = write

    # ---------------------------------------------------------------------------- users
    def add(self, *, name: str, salt: str, password_hash: str, admin: bool = False) -> User:
        """Add a user with a salted password hash (app/auth.py computes it)."""
        with self.write():
            if self.db["users"].count_where("name = ?", [name]):
                raise RegistryError(f"user {name!r} exists already")
            self.db["users"].insert({"name": name, "salt": salt, "hash": password_hash,
                                     "admin": int(admin), "created_at": now()})
        return self.get(name)

    def get(self, name: str | None) -> User | None:
        rows = list(self.db.query("SELECT name, admin, created_at FROM users WHERE name = ?",
                                  [name or ""]))
        return _user(rows[0]) if rows else None

    def all(self) -> list[User]:
        return [_user(r) for r in self.db.query(
            "SELECT name, admin, created_at FROM users ORDER BY name")]

    def any(self) -> bool:
        """Whether the lab has users at all (a lab with users requires a login)."""
        return self.db["users"].count > 0

    def credentials(self, name: str) -> tuple[str, str] | None:
        """(salt, hash), both hex, of a user's password; None for no such user."""
        row = self.db.execute("SELECT salt, hash FROM users WHERE name = ?",
                              [name]).fetchone()
        return (row[0], row[1]) if row else None

    # ------------------------------------------------------------------- failed logins
    def add_login_failure(self, name: str, at: float) -> None:
        self.db["login_failures"].insert({"name": name, "at": at})

    def login_failures(self, name: str, *, since: float | None = None,
                       limit: int | None = None) -> list[float]:
        """Times (Unix seconds) of a name's failed logins, newest first: those after
        `since`, at most `limit` of them."""
        sql, params = "SELECT at FROM login_failures WHERE name = ?", [name]
        if since is not None:
            sql += " AND at > ?"
            params.append(since)
        sql += " ORDER BY at DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [r[0] for r in self.db.execute(sql, params)]

    def clear_login_failures(self, name: str | None = None, *,
                             before: float | None = None) -> None:
        """Forget a name's failed logins (after a success), or everyone's before a time."""
        if name is None and before is None:
            raise RegistryError("clear_login_failures: give a name or a time")
        where, params = [], []
        if name is not None:
            where.append("name = ?")
            params.append(name)
        if before is not None:
            where.append("at < ?")
            params.append(before)
        with self.write():
            self.db.execute(f"DELETE FROM login_failures WHERE {' AND '.join(where)}", params)

    # ------------------------------------------------------------------------ audit log
    def audit(self, user: str | None, action: str, target: str | None = None,
              details: dict | None = None) -> None:
        """Append one line to the audit log."""
        self.db["audit"].insert({"at": now(), "user": user, "action": action, "target": target,
                                 "details": json.dumps(details, sort_keys=True) if details
                                 else None})

    def audit_log(self, limit: int = 200) -> list[AuditEntry]:
        """The latest audit lines, newest first."""
        return [AuditEntry(id=r["id"], at=r["at"], user=r["user"], action=r["action"],
                           target=r["target"], details=_json(r["details"]))
                for r in self.db.query("SELECT * FROM audit ORDER BY id DESC LIMIT ?",
                                       [limit])]


def _user(row: dict) -> User:
    return User(name=row["name"], admin=bool(row["admin"]), created_at=row["created_at"])


def _json(text: str | None) -> Any:
    """A JSON column's value; text that is not JSON (hand-edited rows) stays text."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text
