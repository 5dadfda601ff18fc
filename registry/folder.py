"""Inspect an HF checkpoint folder without loading it: validity, architecture, size, hash.

Runs in the CLI and the server, so it must not import torch: safetensors headers are read
through `safe_open(framework="numpy")`, which validates the header and file length.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
                "I8": "int8", "U8": "uint8", "I32": "int32", "I64": "int64", "BOOL": "bool"}


class CheckpointError(Exception):
    """The folder is not a usable HF checkpoint; the message names the offending file."""


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


def read_config(folder: Path) -> dict:
    for name in ("config.json", "adapter_config.json"):
        file = folder / name
        if file.exists():
            try:
                return json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    raise CheckpointError(
        f"{folder} is not an HF checkpoint: it has no config.json (or adapter_config.json)")


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint; for sharded checkpoints every shard of the index."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise CheckpointError(
                    f"{index} lists shards that are missing: {', '.join(missing)}")
            return [folder / s for s in shards]
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."))
    # Prefer safetensors when a folder carries both formats (HF loads safetensors first).
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files


def tensor_headers(file: Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype, shape)} from a safetensors header; raises naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            return {key: (f.get_slice(key).get_dtype(), list(f.get_slice(key).get_shape()))
                    for key in f.keys()}
    except Exception as e:  # safetensors raises its own error type for every corruption
        raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from None


def safetensors_summary(file: Path) -> tuple[int, str | None]:
    """(parameter count, dominant dtype) from a safetensors header; raises naming the file."""
    counts: dict[str, int] = {}
    for dtype, shape in tensor_headers(file).values():
        n = 1
        for d in shape:
            n *= d
        counts[dtype] = counts.get(dtype, 0) + n
    total = sum(counts.values())
    dtype = max(counts, key=counts.get) if counts else None
    return total, _DTYPE_NAMES.get(dtype, dtype) if dtype else None


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
