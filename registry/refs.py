"""Resolve what a user typed where a checkpoint is expected: registry id, name, path or Hub id."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ops.gguf import GGUFError, read_info
from registry.folder import CheckpointError, gguf_file, read_config
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
    kind: str  # "registry" | "path" | "hub" | "gguf"
    value: str  # registry id, absolute folder path, Hub repo id, or absolute .gguf file path
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
        if path.is_file() and path.suffix.lower() == ".gguf":
            return _gguf_ref(registry, path)
        if not path.is_dir():
            raise RefError(f"{path} is a file; a checkpoint is a folder with config.json, or "
                           f"a .gguf file")
        single_gguf = gguf_file(path)  # an export's folder: its file, as a .gguf path
        if single_gguf is not None:
            return _gguf_ref(registry, single_gguf)
        try:
            read_config(path)
        except CheckpointError as e:
            raise RefError(str(e)) from None
        return Ref("path", str(path.resolve()))
    if is_hub_id(ref):
        return Ref("hub", ref)
    raise RefError(f"unknown checkpoint {ref!r}: not a registry id or name, not an existing "
                   f"folder, and not a Hub id of the form ORG/NAME")


def is_gguf_file(ref: str) -> bool:
    """Whether a reference names an existing .gguf file (imported by dequantizing it)."""
    try:
        path = Path((ref or "").strip()).expanduser()
        return path.suffix.lower() == ".gguf" and path.is_file()
    except (OSError, RuntimeError, ValueError):
        return False


def find_gguf_import(registry: Registry, path: str | Path, dtype: str | None = None) -> dict | None:
    """The newest checkpoint imported from this very GGUF file (same path, size and
    modification time, so a file replaced in place is imported afresh), in `dtype` if given."""
    real = Path(path).expanduser().resolve()
    try:
        stat = real.stat()
    except OSError:
        return None
    for row in registry.db.query(
            "SELECT * FROM checkpoints WHERE source = ? AND relation = 'import' AND "
            "deleted_at IS NULL AND path IS NOT NULL ORDER BY created_at DESC", [str(real)]):
        try:
            gguf = (json.loads(row["metadata"] or "{}") or {}).get("gguf") or {}
        except (TypeError, ValueError):
            continue
        if gguf.get("size_bytes") == stat.st_size and gguf.get("mtime_ns") == stat.st_mtime_ns \
                and (dtype is None or gguf.get("dtype") == dtype) and Path(row["path"]).is_dir():
            return row
    return None


def _gguf_ref(registry: Registry, path: Path) -> Ref:
    """A .gguf file: the checkpoint imported from it before, or the file (its header checked
    here, so that a truncated or foreign file is refused before a job is queued)."""
    row = find_gguf_import(registry, path)
    if row is not None:
        return Ref("registry", row["id"], row)
    try:
        info = read_info(path)
    except GGUFError as e:
        raise RefError(str(e)) from None
    return Ref("gguf", info.path)
