"""Users, roles, ownership and the audit log of a shared lab.

Passwords are stored as salted scrypt hashes (the standard library's `hashlib.scrypt`, the
memory-hard KDF of RFC 7914), never in plain text. A lab with no users is a single-user lab:
it serves on the loopback interface only, and every action is the local user's.

Members see the whole lab. Only a job's owner or an admin may cancel it; only a checkpoint's
creator or an admin may delete it, and a delete is soft: the row and its lineage edges stay.
Every such action is appended to the `audit` table.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets

from app.lab import Lab
from registry.store import now

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# scrypt cost: 16 MiB and about 50 ms per check on one core; slows guessing, not logins
SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "maxmem": 64 * 2 ** 20, "dklen": 32}
MIN_PASSWORD = 8


class AuthError(ValueError):
    """Bad user input (name, password) for user management."""


class NotAllowed(PermissionError):
    """The acting user may not do this; the message says who may."""


def hash_password(password: str, salt: bytes) -> str:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, **SCRYPT).hex()


def add_user(lab: Lab, name: str, password: str, admin: bool = False,
             by: str | None = None) -> dict:
    if not NAME.match(name or ""):
        raise AuthError(f"user name {name!r}: expected 1-64 letters, digits, '_', '.' or '-', "
                        f"starting with a letter or digit")
    if len(password or "") < MIN_PASSWORD:
        raise AuthError(f"password: expected at least {MIN_PASSWORD} characters")
    salt = secrets.token_bytes(16)
    with lab.registry() as reg:
        if reg.db["users"].count_where("name = ?", [name]):
            raise AuthError(f"user {name!r} exists already")
        row = {"name": name, "salt": salt.hex(), "hash": hash_password(password, salt),
               "admin": int(admin), "created_at": now()}
        reg.db["users"].insert(row)
        audit(reg, by or name, "users.add", name, {"admin": admin})
    return {"name": name, "admin": admin}


def users(lab: Lab) -> list[dict]:
    with lab.registry() as reg:
        return [{"name": r["name"], "admin": bool(r["admin"]), "created_at": r["created_at"]}
                for r in reg.db.query("SELECT * FROM users ORDER BY name")]


def has_users(lab: Lab) -> bool:
    with lab.registry() as reg:
        return reg.db["users"].count > 0


def authenticate(lab: Lab, name: str, password: str) -> bool:
    with lab.registry() as reg:
        rows = list(reg.db.query("SELECT * FROM users WHERE name = ?", [name or ""]))
    if not rows:
        hash_password(password or "", b"0" * 16)  # same work whether or not the user exists
        return False
    row = rows[0]
    return hmac.compare_digest(hash_password(password or "", bytes.fromhex(row["salt"])),
                               row["hash"])


def is_admin(lab: Lab, name: str | None) -> bool:
    if not has_users(lab):
        return True  # a single-user lab: its one user may do everything
    with lab.registry() as reg:
        row = reg.db.execute("SELECT admin FROM users WHERE name = ?", [name or ""]).fetchone()
    return bool(row and row[0])


def check_owner(lab: Lab, user: str | None, owner: str | None, what: str) -> None:
    """Raise NotAllowed unless `user` owns the thing or is an admin."""
    if user is None or user == owner or is_admin(lab, user):
        return
    raise NotAllowed(f"{user} may not {what}: it belongs to {owner or 'nobody'}; only its "
                     f"owner or an admin may")


def audit(reg, user: str | None, action: str, target: str | None = None,
          details: dict | None = None) -> None:
    reg.db["audit"].insert({"at": now(), "user": user, "action": action, "target": target,
                            "details": json.dumps(details, sort_keys=True) if details
                            else None})


def audit_log(lab: Lab, limit: int = 200) -> list[dict]:
    with lab.registry() as reg:
        return list(reg.db.query("SELECT * FROM audit ORDER BY id DESC LIMIT ?", [limit]))


def delete_checkpoint(lab: Lab, ref: str, user: str | None) -> dict:
    """Soft-delete a checkpoint: hidden from lists and pickers, its row, edges and scores
    kept so its descendants' lineage stays whole. Owner (creator) or admin only."""
    with lab.registry() as reg:
        row = reg.checkpoint(ref)
        if row.get("deleted_at"):
            return row
        check_owner(lab, user, row["created_by"], f"delete checkpoint {row['id']}")
        soft_delete(reg, row["id"], user, "checkpoint.delete", {"name": row["name"]})
        return reg.checkpoint(row["id"])


def soft_delete(reg, checkpoint_id: str, user: str | None, action: str, details: dict,
                **fields) -> None:
    """Mark a checkpoint deleted (its row, edges and scores stay) and audit it; `fields`:
    other columns to set at the same time."""
    reg.db["checkpoints"].update(checkpoint_id, {"deleted_at": now(), "deleted_by": user,
                                                 **fields})
    audit(reg, user, action, checkpoint_id, details)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_check(lab: Lab, host: str) -> str | None:
    """Why serving on `host` is refused, or None. A non-loopback address needs users."""
    if host in LOOPBACK or host.startswith("127."):
        return None
    if has_users(lab):
        return None
    return (f"refusing to serve {lab.root} on {host}: anyone who can reach it could run jobs "
            f"and read the lab, and this lab has no users. Add one first, e.g.\n"
            f"  weightsmith users add alice --admin\n"
            f"then start again: the app will ask for a login. (Or serve on 127.0.0.1 behind "
            f"an authenticating proxy; see the README's 'Shared labs'.)")
