"""What every part of the lineage store shares: its error, its clock, the job statuses and the
relation check. A leaf module (store.py, schema.py, users.py and sync_rows.py import it; it
imports none of them), so that the store's parts compose without an import cycle."""

from __future__ import annotations

from datetime import datetime, timezone

from registry import relations

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")


class RegistryError(Exception):
    """A registry operation was asked something the registry cannot do (unknown id, bad value)."""


def now() -> str:
    """UTC timestamp that sorts lexicographically in time order."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_relation(relation: str) -> None:
    """Relations are the known ones (registry/relations.py) or a plugin's own lowercase word
    (the list is extensible)."""
    try:
        relations.check_relation(relation)
    except relations.RelationError as e:
        raise RegistryError(str(e)) from None
