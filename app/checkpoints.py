"""Bringing checkpoints into the registry: imports and atomic publication of job outputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from app.lab import Lab
from registry import CheckpointError, Registry, inspect_checkpoint, resolve_ref
from registry import hub
from registry.relations import RELATIONS

# Files of a Hub repo that make up an HF checkpoint (skip other formats a repo may carry).
# Python files (a repo's custom modelling code) only come along in a lab that allows remote
# code (allow_trust_remote_code): elsewhere they could only ever be a way to smuggle code in.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.md"]


def row_fields(info) -> dict:
    return {"architecture": info.architecture, "param_count": info.param_count,
            "dtype": info.dtype, "size_bytes": info.size_bytes,
            "content_hash": info.content_hash,
            "kind": "adapter" if info.is_adapter else
            # a task vector folder (plugins/task_vector) stores task_vector-NNNNN.safetensors
            "task_vector" if any(f.startswith("task_vector-") for f in info.weight_files)
            else "model"}


def import_checkpoint(lab: Lab, reg: Registry, ref: str, *, name: str | None = None,
                      user: str | None = None, metadata: dict | None = None,
                      log=print) -> dict:
    """Register an existing HF checkpoint (local folder, kept in place, or Hub id, downloaded
    into the lab) with relation `import`. An already-registered folder returns its row."""
    resolved = resolve_ref(reg, ref)
    if resolved.kind == "registry":
        return resolved.row
    if resolved.kind == "path":
        info = inspect_checkpoint(resolved.value)
        return reg.add_checkpoint(
            name=name or Path(resolved.value).name, relation="import", path=info.path,
            source=info.path, created_by=user or lab.settings.default_user,
            metadata=metadata, **row_fields(info))
    # A Hub id: download into a temporary folder, then rename into place (never half-written).
    # The card's base_model links the parents (rows already here, or remote-only stubs); a
    # remote-only row of this id (a stub, or pulled by registry sync) gets the files.
    from huggingface_hub import snapshot_download

    known = hub.find_hub_row(reg, resolved.value)
    if known is not None and known["path"]:
        return known
    ck_id = known["id"] if known else reg.free_id("ck")
    tmp = lab.checkpoints_dir / f".tmp-import-{ck_id}"
    final = lab.checkpoints_dir / ck_id
    try:
        log(f"downloading {resolved.value} from the Hub")
        try:
            token = hub.load_token(user)  # the submitting user's own token when they saved one
        except hub.HubError:
            token = hub.load_token()
        patterns = HUB_PATTERNS + (["*.py"] if lab.settings.allow_trust_remote_code else [])
        try:
            snapshot_download(resolved.value, local_dir=str(tmp), allow_patterns=patterns,
                              endpoint=hub.endpoint(), token=token)
        except Exception as e:  # network, auth, missing repo: say which repo and why
            raise CheckpointError(hub.redact(f"could not download {resolved.value} from the "
                                             f"Hub: {type(e).__name__}: {e}",
                                             [token or ""] + hub.known_tokens())) from None
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        info = inspect_checkpoint(tmp)
        try:
            parents = hub.card_parents(reg, tmp / "README.md", resolved.value)
        except hub.HubError as e:
            raise CheckpointError(f"{resolved.value}: {e}") from None
        os.rename(tmp, final)
        if known is not None:
            return hub.fill_stub(reg, ck_id, str(final), row_fields(info), parents)
        return reg.add_checkpoint(
            id=ck_id, name=name or resolved.value.split("/")[-1], relation="import",
            path=str(final), source=f"hf://{resolved.value}", parents=parents,
            created_by=user or lab.settings.default_user, metadata=metadata,
            **row_fields(info))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists() and reg.get_checkpoint(ck_id) is None:
            shutil.rmtree(final, ignore_errors=True)
        raise


def publish(lab: Lab, reg: Registry, tmp: Path, *, name: str, relation: str,
            parents: list[dict], job: dict | None = None, metadata: dict | None = None,
            user: str | None = None) -> dict:
    """Move a completely written checkpoint folder into place, then register it.

    Order matters: rename first, register second. A crash between the two leaves an
    unregistered folder, never a registered checkpoint without its files.
    """
    info = inspect_checkpoint(tmp)
    if info.is_adapter and relation != RELATIONS["adapter"].name:
        raise CheckpointError(f"{tmp} holds an adapter; register it with relation "
                              f"'{RELATIONS['adapter'].name}'")
    ck_id = reg.free_id("ck")
    final = lab.checkpoints_dir / ck_id
    os.rename(tmp, final)
    try:
        return reg.add_checkpoint(
            id=ck_id, name=name, relation=relation, path=str(final), parents=parents,
            created_by=user or (job or {}).get("user") or lab.settings.default_user,
            job_id=(job or {}).get("id"), plugin=(job or {}).get("plugin"),
            config=(job or {}).get("config"), versions=(job or {}).get("versions"),
            metadata=metadata, **row_fields(info))
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise


def to_json(row: dict) -> dict:
    out = dict(row)
    for key in ("config", "versions", "metadata", "details"):
        if isinstance(out.get(key), str):
            try:
                out[key] = json.loads(out[key])
            except json.JSONDecodeError:
                pass
    return out
