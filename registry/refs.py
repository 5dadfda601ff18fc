"""Resolve what a user typed where a checkpoint is expected: registry id, name, path or Hub id."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from registry.folder import CheckpointError, read_config
from registry.store import Registry

# ORG/NAME as the Hub spells repo ids; bare names are taken as registry names, not Hub ids.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def is_hub_id(value: str) -> bool:
    """ORG/NAME in the Hub's spelling (a path starting with /, ~ or . never matches)."""
    return bool(HUB_ID.match(value))


class RefError(Exception):
    """A checkpoint reference that names nothing usable."""


@dataclass
class Ref:
    kind: str  # "registry" | "path" | "hub"
    value: str  # registry id, absolute folder path, or Hub repo id
    row: dict | None = None  # the registry row when kind == "registry"


def resolve_ref(registry: Registry, ref: str) -> Ref:
    ref = (ref or "").strip()
    if not ref:
        raise RefError("empty checkpoint reference: give a registry id, a name, a folder or a "
                       "Hub id (ORG/NAME)")
    row = registry.find_checkpoint(ref)
    if row is not None:
        return Ref("registry", row["id"], row)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RefError(f"{path} is a file; a checkpoint is a folder with config.json")
        try:
            read_config(path)
        except CheckpointError as e:
            raise RefError(str(e)) from None
        return Ref("path", str(path.resolve()))
    if is_hub_id(ref):
        return Ref("hub", ref)
    raise RefError(f"unknown checkpoint {ref!r}: not a registry id or name, not an existing "
                   f"folder, and not a Hub id of the form ORG/NAME")
