"""Bringing checkpoints into the registry: imports and atomic publication of job outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from app.lab import Lab
from ops.gguf import DTYPES as GGUF_DTYPES
from registry import CheckpointError, Registry, inspect_checkpoint, resolve_ref
from registry import hub
from registry.refs import find_gguf_import, is_gguf_file
from registry.relations import RELATIONS

REPO = Path(__file__).resolve().parent.parent
GGUF_DEFAULT_DTYPE = "bfloat16"

# Files of a Hub repo that make up an HF checkpoint (skip other formats a repo may carry).
# Python files (a repo's custom modelling code) only come along in a lab that allows remote
# code (allow_trust_remote_code): elsewhere they could only ever be a way to smuggle code in.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.md"]


def row_fields(info) -> dict:
    return {"architecture": info.architecture, "param_count": info.param_count,
            "dtype": info.dtype, "size_bytes": info.size_bytes,
            "content_hash": info.content_hash,
            # a folder holding one GGUF file (plugins/export): kept as written, not a model
            # folder; a job that opens it imports (dequantizes) the file first
            "kind": "gguf" if info.is_gguf else
            "adapter" if info.is_adapter else
            # a task vector folder (plugins/task_vector) stores task_vector-NNNNN.safetensors
            "task_vector" if any(f.startswith("task_vector-") for f in info.weight_files)
            else "model"}


def import_checkpoint(lab: Lab, reg: Registry, ref: str, *, name: str | None = None,
                      user: str | None = None, metadata: dict | None = None,
                      log=print, dtype: str | None = None) -> dict:
    """Register an existing HF checkpoint (local folder, kept in place, or Hub id, downloaded
    into the lab) with relation `import`. An already-registered folder returns its row.
    A .gguf file is dequantized into a safetensors checkpoint in the lab, in `dtype`
    (default bfloat16; see import_gguf)."""
    if is_gguf_file(ref):
        return import_gguf(lab, reg, ref.strip(), name=name, user=user, metadata=metadata,
                           dtype=dtype or GGUF_DEFAULT_DTYPE, log=log)
    if dtype is not None:
        raise CheckpointError(f"dtype: {ref} is not a .gguf file; only a GGUF import is "
                              f"converted to a dtype")
    resolved = resolve_ref(reg, ref)
    if resolved.kind == "registry":
        return resolved.row
    if resolved.kind == "gguf":  # a folder holding one .gguf (an export's, copied elsewhere)
        return import_gguf(lab, reg, resolved.value, name=name, user=user, metadata=metadata,
                           dtype=GGUF_DEFAULT_DTYPE, log=log)
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


def import_gguf(lab: Lab, reg: Registry, path: str, *, name: str | None = None,
                user: str | None = None, metadata: dict | None = None,
                dtype: str = GGUF_DEFAULT_DTYPE, log=print,
                parents: list[dict] | None = None) -> dict:
    """Dequantize a GGUF file (llama.cpp, Ollama, LM Studio) into an HF safetensors checkpoint
    in the lab, registered with relation `import`. Its metadata records the file's sha256,
    size and tensor types, and the GGUF metadata that matters (architecture, context length,
    chat template). The conversion runs in a subprocess: it loads torch and the whole model,
    which the server never does. The same file (path, size, modification time) imported
    before in the same dtype returns that checkpoint. `parents`: lineage edges of the new
    checkpoint (an `export` checkpoint whose file this is)."""
    from ops.gguf import GGUFError, file_sha256, read_info

    from app.paths import check_path, restricted

    if dtype not in GGUF_DTYPES:
        raise CheckpointError(f"dtype: got {dtype!r}; expected one of {', '.join(GGUF_DTYPES)}")
    if restricted(lab):  # the CLI and the Import box check first; a job's ctx.open lands here
        problem = check_path(lab, "checkpoint", path)
        if problem:
            raise CheckpointError(problem)
    source = Path(path).expanduser().resolve()
    known = find_gguf_import(reg, source, dtype)
    if known is not None:
        return known
    try:
        info = read_info(source)
        stat = source.stat()
    except GGUFError as e:
        raise CheckpointError(str(e)) from None
    ck_id = reg.free_id("ck")
    tmp = lab.checkpoints_dir / f".tmp-import-{ck_id}"
    final = lab.checkpoints_dir / ck_id
    started = time.monotonic()
    try:
        tmp.mkdir(parents=True)
        log(f"dequantizing {source.name} ({info.architecture}, "
            f"{', '.join(f'{n} {k}' for k, n in info.quantization.items())} tensors) to "
            f"{dtype}")
        _run_gguf_conversion(source, tmp, dtype)
        log("hashing the GGUF file")
        checkpoint = inspect_checkpoint(tmp)
        record = {**info.as_metadata(), "sha256": file_sha256(source),
                  "mtime_ns": stat.st_mtime_ns, "dtype": dtype,
                  "seconds": round(time.monotonic() - started, 2)}
        os.rename(tmp, final)
        row = reg.add_checkpoint(
            id=ck_id, name=name or source.stem, relation="import", path=str(final),
            source=str(source), parents=parents, created_by=user or lab.settings.default_user,
            metadata={**(metadata or {}), "gguf": record}, **row_fields(checkpoint))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists() and reg.get_checkpoint(ck_id) is None:
            shutil.rmtree(final, ignore_errors=True)
        raise
    log(f"imported {source.name} as {row['id']} in {record['seconds']:.1f} s")
    return row


def _run_gguf_conversion(source: Path, dest: Path, dtype: str) -> None:
    """`python -m app.checkpoints gguf SOURCE DEST DTYPE`: the conversion in its own process,
    offline. A file transformers cannot read fails with the child's one-line reason."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "app.checkpoints", "gguf", str(source),
                           str(dest), dtype], capture_output=True, text=True, env=env,
                          cwd=str(REPO))
    if proc.returncode != 0:
        reasons = [line[len("error: "):] for line in proc.stderr.splitlines()
                   if line.startswith("error: ")]
        reason = reasons[-1] if reasons else (proc.stderr.strip().splitlines() or
                                              [f"exit code {proc.returncode}"])[-1]
        raise CheckpointError(f"{source}: not imported: {reason[:1000]}")


def convert_gguf(source: str, dest: str, dtype: str) -> int:
    """The conversion subprocess: check the architecture, dequantize, save as safetensors."""
    from ops.gguf import GGUFError, dequantized_model, read_info, unsupported_architecture

    try:
        problem = unsupported_architecture(read_info(source))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        model, tokenizer = dequantized_model(source, dtype)
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
    except GGUFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 -- transformers' reason, on one line, for the parent
        print(f"error: transformers could not convert it ({type(e).__name__}: "
              f"{' '.join(str(e).split())[:600]})", file=sys.stderr)
        return 1
    return 0


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


if __name__ == "__main__":  # python -m app.checkpoints gguf SOURCE DEST DTYPE
    if len(sys.argv) != 5 or sys.argv[1] != "gguf":
        print("usage: python -m app.checkpoints gguf SOURCE DEST DTYPE", file=sys.stderr)
        sys.exit(2)
    sys.exit(convert_gguf(*sys.argv[2:]))
