"""Users, roles, ownership and the audit log of a shared lab.

Passwords are stored as salted scrypt hashes (the standard library's `hashlib.scrypt`, the
memory-hard KDF of RFC 7914), never in plain text. A lab with no users is a single-user lab:
it serves on the loopback interface only, and every action is the local user's.

Members see the whole lab. Only a job's owner or an admin may cancel it; only a checkpoint's
creator or an admin may delete it, and a delete is soft: the row and its lineage edges stay.
Every such action is appended to the `audit` table.

Logins are throttled twice over. Per name: after LOCK_AFTER failures within FAILURE_WINDOW,
the name is locked for LOCKOUT (its password is not even checked), counted in the registry's
`login_failures` table, so the count survives restarts and holds across processes. Per
process: a token bucket (RateLimit) bounds all login checks together, which slows spraying
many names. Failed, refused and successful logins are audited, with the name tried and never
the password.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import threading
import time
from datetime import datetime, timezone

from app.lab import Lab
from registry.store import Registry, RegistryError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# scrypt cost: 16 MiB and about 50 ms per check on one core; slows guessing, not logins
SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "maxmem": 64 * 2 ** 20, "dklen": 32}
MIN_PASSWORD = 8
# login lockout, per name (users or not, so a lock tells nothing about who exists)
LOCK_AFTER = 5            # failures of one name within FAILURE_WINDOW lock it ...
FAILURE_WINDOW = 15 * 60  # seconds
LOCKOUT = 15 * 60         # ... for this many seconds after its last failure
# login rate, per process, all names together: LOGIN_RATE checks a second on average, bursts
# of LOGIN_BURST; a login waits for its turn up to LOGIN_MAX_WAIT seconds, else is refused
LOGIN_RATE = 2.0
LOGIN_BURST = 10
LOGIN_MAX_WAIT = 5.0

log = logging.getLogger("weightsmith")


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
        if reg.users.get(name) is not None:  # before the slow hash; users.add checks again
            raise AuthError(f"user {name!r} exists already")
        hashed = hash_password(password, salt)  # outside the write lock: scrypt is slow
        try:
            with reg.write():
                reg.users.add(name=name, salt=salt.hex(), password_hash=hashed, admin=admin)
                audit(reg, by or name, "users.add", name, {"admin": admin})
        except RegistryError as e:
            raise AuthError(str(e)) from None
    return {"name": name, "admin": admin}


def users(lab: Lab) -> list[dict]:
    """[{"name", "admin", "created_at"}] by name (as `weightsmith users list` prints them)."""
    with lab.registry() as reg:
        return [dataclasses.asdict(u) for u in reg.users.all()]


def has_users(lab: Lab) -> bool:
    with lab.registry() as reg:
        return reg.users.any()


def authenticate(lab: Lab, name: str, password: str) -> bool:
    """Check a login. A locked name (LOCK_AFTER failures within FAILURE_WINDOW, for LOCKOUT
    seconds) is refused without checking its password. Every outcome is audited:
    `login.ok`, `login.failed` or `login.locked`, with the name tried as target."""
    name = name or ""
    if len(name) > 64 or len(password or "") > 1024:  # no user has such a name (NAME)
        name = name[:65]  # what the failure rows store stays small, whatever is sent
    shown = _shown(name)
    t = time.time()
    with lab.registry() as reg:
        with reg.write():  # the lock check and this attempt's count, in one transaction
            reg.users.clear_login_failures(before=t - FAILURE_WINDOW - LOCKOUT)
            until = _locked_until(reg, name, t)
            if until is not None:
                audit(reg, None, "login.locked", shown, {"until": _iso(until)})
                return False
            # counted as a failure up front, so parallel guesses cannot slip past the lock;
            # a success deletes it again
            reg.users.add_login_failure(name, t)
            stored = reg.users.credentials(name)
        if stored:
            salt, expected = stored
            ok = hmac.compare_digest(hash_password(password or "", bytes.fromhex(salt)),
                                     expected)
        else:
            hash_password(password or "", b"0" * 16)  # same work whether or not the user exists
            ok = False
        with reg.write():
            if ok:
                reg.users.clear_login_failures(name)
                audit(reg, name, "login.ok", name)
            else:
                failures = len(reg.users.login_failures(name, since=t - FAILURE_WINDOW))
                audit(reg, None, "login.failed", shown, {"failures": failures})
    return ok


def _locked_until(reg: Registry, name: str, t: float) -> float | None:
    """When `name`'s lock ends, or None if it is not locked at time `t`: locked while its
    last LOCK_AFTER failures lie within FAILURE_WINDOW and the latest is under LOCKOUT old."""
    last = reg.users.login_failures(name, limit=LOCK_AFTER)
    if len(last) == LOCK_AFTER and last[0] - last[-1] <= FAILURE_WINDOW \
            and t - last[0] < LOCKOUT:
        return last[0] + LOCKOUT
    return None


def _shown(name: str) -> str:
    """A name as tried, fit for the audit log: at most 128 characters, none unprintable."""
    return "".join(c if c.isprintable() else "?" for c in name[:128])


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RateLimit:
    """A token bucket (written out: a dozen lines, and Gradio has no hook for a limiter):
    `rate` tokens a second, at most `burst` saved up. `reserve()` takes the next token and
    says how long to wait for it, or refuses (None, nothing taken) if that is over
    `max_wait`. Thread-safe; one per process, so it slows guesses, it does not count them."""

    def __init__(self, rate: float = LOGIN_RATE, burst: int = LOGIN_BURST,
                 max_wait: float = LOGIN_MAX_WAIT, clock=time.monotonic):
        self.rate, self.burst, self.max_wait, self.clock = rate, burst, max_wait, clock
        self.tokens = float(burst)  # below 0: tokens already promised to waiting logins
        self.stamp = clock()
        self._lock = threading.Lock()

    def reserve(self) -> float | None:
        with self._lock:
            t = self.clock()
            self.tokens = min(self.burst, self.tokens + (t - self.stamp) * self.rate)
            self.stamp = t
            wait = max(0.0, (1.0 - self.tokens) / self.rate)
            if wait > self.max_wait:
                return None
            self.tokens -= 1.0
            return wait


def login_checker(lab: Lab, limit: RateLimit | None = None):
    """The `auth=` callable for Gradio's `launch`: (name, password) -> bool, throttled by
    `limit` (default: a new RateLimit with the LOGIN_* constants) and then `authenticate`.
    It is a coroutine function, so Gradio awaits it: neither the wait nor scrypt blocks the
    event loop that serves everyone else."""
    limit = limit or RateLimit()
    warned = [0.0]

    async def login(name: str, password: str) -> bool:
        wait = limit.reserve()
        if wait is None:  # logged, not audited: a flood must not flood the audit table
            if time.monotonic() - warned[0] > 60:
                warned[0] = time.monotonic()
                log.warning("login refused: over %g logins a second; someone may be "
                            "guessing passwords", limit.rate)
            return False
        if wait:
            await asyncio.sleep(wait)
        try:
            return await asyncio.to_thread(authenticate, lab, name, password)
        except Exception:  # a locked registry, say: refuse the login, show no traceback
            log.exception("login check failed")
            return False

    return login


def is_admin(lab: Lab, name: str | None) -> bool:
    if not has_users(lab):
        return True  # a single-user lab: its one user may do everything
    with lab.registry() as reg:
        user = reg.users.get(name)
    return bool(user and user.admin)


def check_owner(lab: Lab, user: str | None, owner: str | None, what: str) -> None:
    """Raise NotAllowed unless `user` owns the thing or is an admin."""
    if user is None or user == owner or is_admin(lab, user):
        return
    raise NotAllowed(f"{user} may not {what}: it belongs to {owner or 'nobody'}; only its "
                     f"owner or an admin may")


def audit(reg: Registry, user: str | None, action: str, target: str | None = None,
          details: dict | None = None) -> None:
    reg.users.audit(user, action, target, details)


def audit_log(lab: Lab, limit: int = 200) -> list[dict]:
    """The latest audit lines, newest first, as `weightsmith audit` prints them: rows of
    {"id", "at", "user", "action", "target", "details"}, `details` a mapping (or None)."""
    with lab.registry() as reg:
        return [dataclasses.asdict(e) for e in reg.users.audit_log(limit)]


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


def soft_delete(reg: Registry, checkpoint_id: str, user: str | None, action: str,
                details: dict, **fields) -> None:
    """Mark a checkpoint deleted (its row, edges and scores stay) and audit it, in one
    transaction; `fields`: other columns to set at the same time."""
    with reg.write():
        reg.soft_delete_checkpoint(checkpoint_id, user, **fields)
        audit(reg, user, action, checkpoint_id, details)


def is_loopback(host: str) -> bool:
    """Whether `host` names the loopback interface: a literal loopback IP address
    (127.0.0.0/8, ::1, with or without brackets) or exactly `localhost`. Any other name,
    such as `127.0.0.1.nip.io` or `localhost.evil.com`, is not: DNS decides where it goes."""
    host = (host or "").strip()
    if host.lower() == "localhost":
        return True
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def serve_check(lab: Lab, host: str) -> str | None:
    """Why serving on `host` is refused, or None. A non-loopback address needs users."""
    if is_loopback(host):
        return None
    if has_users(lab):
        return None
    return (f"refusing to serve {lab.root} on {host!r} (expected a loopback address: "
            f"127.0.0.1, ::1 or localhost): anyone who can reach it could run jobs "
            f"and read the lab, and this lab has no users. Add one first, e.g.\n"
            f"  weightsmith users add alice --admin\n"
            f"then start again: the app will ask for a login. (Or serve on 127.0.0.1 behind "
            f"an authenticating proxy; see the README's 'Shared labs'.)")
