"""The files of an HF checkpoint folder: config.json, the weight files (one file, or shards
listed by an index), and the safetensors headers, read without loading a weight.

One home for what the registry (registry/folder.py), the merge engine (ops/merge) and task
vectors (ops/task_vectors.py) know about a checkpoint folder. The server imports this
module, so it never imports torch at module level: headers are read through
`safe_open(framework="numpy")`, which validates the header and the file length; only
`TensorFiles.get` (a tensor) imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
INDEXES = (SAFETENSORS_INDEX, "pytorch_model.bin.index.json")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# safetensors' dtype names -> torch's
DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
               "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64",
               "BOOL": "bool"}


class CheckpointError(Exception):
    """The folder is not a usable HF checkpoint; the message names the offending file."""


def read_config(folder: Path) -> dict:
    """config.json (or adapter_config.json for an adapter) as a mapping."""
    for name in ("config.json", "adapter_config.json"):
        file = Path(folder) / name
        if file.exists():
            try:
                return json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    raise CheckpointError(
        f"{folder} is not an HF checkpoint: it has no config.json (or adapter_config.json)")


def index_shards(folder: Path, index_name: str = SAFETENSORS_INDEX) -> Optional[list[Path]]:
    """The shard files a shard index lists (sorted, each once), or None without that index;
    raises naming the index when it is broken or a shard is missing."""
    index = Path(folder) / index_name
    if not index.exists():
        return None
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
    missing = [s for s in shards if not (Path(folder) / s).exists()]
    if missing:
        raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
    return [Path(folder) / s for s in shards]


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint; for sharded checkpoints every shard of the index."""
    folder = Path(folder)
    for index_name in INDEXES:
        shards = index_shards(folder, index_name)
        if shards is not None:
            return shards
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."))
    # Prefer safetensors when a folder carries both formats (HF loads safetensors first).
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files


def safetensors_files(folder: Path) -> Optional[list[Path]]:
    """The safetensors weights as transformers and mergekit load them: the shards of
    model.safetensors.index.json, else model.safetensors; None when there are neither."""
    shards = index_shards(folder)
    if shards is not None:
        return shards
    single = Path(folder) / SAFETENSORS_SINGLE
    return [single] if single.exists() else None


def tensor_headers(file: Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (safetensors dtype, shape)} from a safetensors header; raises naming the
    file."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            out = {}
            for key in f.keys():
                piece = f.get_slice(key)
                out[key] = (piece.get_dtype(), list(piece.get_shape()))
            return out
    except Exception as e:  # safetensors raises its own error type for every corruption
        raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from None


def numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def safetensors_summary(file: Path) -> tuple[int, str | None]:
    """(parameter count, dominant dtype) from a safetensors header; raises naming the file."""
    counts: dict[str, int] = {}
    for dtype, shape in tensor_headers(file).values():
        counts[dtype] = counts.get(dtype, 0) + numel(shape)
    total = sum(counts.values())
    dtype = max(counts, key=counts.get) if counts else None
    return total, DTYPE_NAMES.get(dtype, dtype) if dtype else None


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str  # safetensors' name: "BF16", "F32", ...
    shape: tuple[int, ...]


class TensorFiles:
    """The tensors of a list of safetensors files by name, from their headers only; `get`
    opens one tensor at a time, memory-mapped (zero copy: its pages are read when touched
    and released when the tensor is dropped)."""

    def __init__(self, files: Iterable[Path]):
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            for key, (dtype, shape) in tensor_headers(Path(file)).items():
                self.entries[key] = TensorEntry(Path(file), dtype, tuple(shape))

    def keys(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name].shape)

    def is_float(self, name: str) -> bool:
        return self.entries[name].dtype in FLOAT_DTYPES

    def get(self, name: str):
        """The tensor (torch), backed by its file's memory map."""
        from safetensors import safe_open

        with safe_open(str(self.entries[name].file), framework="pt") as f:
            return f.get_tensor(name)
