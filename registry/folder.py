"""Inspect an HF checkpoint folder without loading it: validity, architecture, size, hash.

Runs in the CLI and the server, so it must not import torch: the files are read by
`ops.checkpoint_files` (safetensors headers through `safe_open(framework="numpy")`, which
validates the header and file length).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

# The folder's files are ops/checkpoint_files.py's knowledge (CheckpointError and read_config
# stay importable here for registry.refs and registry/__init__).
from ops.checkpoint_files import (  # noqa: F401
    WEIGHT_SUFFIXES, CheckpointError, read_config, safetensors_summary, weight_files)


@dataclass
class CheckpointInfo:
    path: str
    architecture: str | None
    model_type: str | None
    param_count: int | None
    dtype: str | None
    size_bytes: int
    content_hash: str
    weight_files: list[str] = field(default_factory=list)
    is_adapter: bool = False
    needs_remote_code: bool = False
    is_gguf: bool = False  # a folder holding one GGUF file (an `export` checkpoint)


def gguf_file(folder: str | Path) -> Path | None:
    """The GGUF file of a checkpoint folder that holds one (an `export` checkpoint: one
    NAME.gguf and no config.json), else None."""
    folder = Path(folder)
    if (folder / "config.json").exists() or (folder / "adapter_config.json").exists():
        return None
    try:
        found = [p for p in folder.iterdir() if p.suffix.lower() == ".gguf" and p.is_file()
                 and not p.is_symlink() and not p.name.startswith(".")]
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


def inspect_gguf_folder(folder: Path, file: Path, with_hash: bool = True) -> CheckpointInfo:
    """A folder holding one GGUF file, described from the file's header (checked: a truncated
    or foreign file raises CheckpointError naming it)."""
    from ops.gguf import GGUFError, read_info

    try:
        info = read_info(file)
    except GGUFError as e:
        raise CheckpointError(str(e)) from None
    return CheckpointInfo(
        path=str(folder), architecture=info.architecture, model_type=info.architecture,
        param_count=info.parameters, size_bytes=info.size_bytes,
        dtype=(info.file_type or "").replace("MOSTLY_", "").replace("ALL_", "") or None,
        content_hash=hash_files([file], folder) if with_hash else "",
        weight_files=[file.name], is_gguf=True)


def hash_files(files: list[Path], root: Path) -> str:
    """sha256 over (relative name, bytes) of each file, in name order."""
    h = hashlib.sha256()
    for file in sorted(files):
        h.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def inspect_checkpoint(path: str | Path, with_hash: bool = True) -> CheckpointInfo:
    """Validate a checkpoint folder and describe it; `with_hash=False` skips reading the weights."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"{folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder (an HF checkpoint is a folder)")
    folder = folder.resolve()
    single_gguf = gguf_file(folder)
    if single_gguf is not None:
        return inspect_gguf_folder(folder, single_gguf, with_hash)
    config = read_config(folder)
    is_adapter = (folder / "adapter_config.json").exists() and not (folder / "config.json").exists()
    files = weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder} has a config but no weight files "
                              f"({', '.join(WEIGHT_SUFFIXES)})")
    params, dtype = 0, None
    for file in files:
        if file.suffix == ".safetensors":
            n, dtype = safetensors_summary(file)
            params += n
        else:
            params = None  # pickled weights: counting needs torch.load, which we avoid here
            break
    dtype = config.get("torch_dtype") or config.get("dtype") or dtype
    return CheckpointInfo(
        path=str(folder),
        architecture=(config.get("architectures") or [None])[0]
        or config.get("peft_type"),
        model_type=config.get("model_type"),
        param_count=params,
        dtype=dtype,
        size_bytes=sum(f.stat().st_size for f in files),
        content_hash=hash_files(files, folder) if with_hash else "",
        weight_files=[f.name for f in files],
        is_adapter=is_adapter,
        needs_remote_code=bool(config.get("auto_map")),
    )
