"""The merge's plan: the inputs' tensors from their headers, and one item per output tensor
(which input name provides it, its dtypes, the order mergekit runs it in)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ops.checkpoint_files import TensorFiles, numel, safetensors_files
from ops.merge.methods import Unsupported
from ops.merge.shards import SAFETENSORS_DTYPES

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor, as mergekit's architecture describes it (WeightInfo): an input
    provides it under its name, an alias or a tied name (the first found); an optional tensor
    that no input has under its name or an alias is skipped, as mergekit skips it."""

    name: str
    aliases: tuple[str, ...] = ()
    tied: tuple[str, ...] = ()
    optional: bool = False


class Checkpoint:
    """The tensors of one model folder, read tensor by tensor: name -> (dtype, shape) from
    the safetensors headers only (the native engine reads safetensors only)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        files = safetensors_files(self.folder)
        if files is None:
            raise Unsupported(f"{self.folder} has no model.safetensors(.index.json) (the "
                              f"native engine reads safetensors only)")
        self.files = TensorFiles(files)
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
            key: (SAFETENSORS_DTYPES[e.dtype], e.shape) for key, e in self.files.entries.items()}

    def open(self, key: str) -> torch.Tensor:
        """The tensor, backed by the file's memory map (zero copy; the pages are read when
        touched and released when the tensor is dropped)."""
        return self.files.get(key)


@dataclass
class Item:
    name: str
    label: str  # mergekit's group label: the largest resolved input name
    keys: list[str]  # the input name in each input (models..., base last)
    shape: tuple[int, ...]
    in_dtypes: list[torch.dtype]  # as stored
    loaded: list[torch.dtype]  # after mergekit's cast on load (to `dtype` when set)
    compute: torch.dtype  # the loaded dtypes promoted
    out: torch.dtype  # out_dtype, else compute

    @property
    def numel(self) -> int:
        return numel(self.shape)


def plan(inputs: list[Checkpoint], labels: list[str], tensors: Optional[Sequence[TensorSpec]],
         dtype: Optional[torch.dtype], out_dtype: Optional[torch.dtype], log) -> list[Item]:
    donor = inputs[-1]
    if tensors is None:
        tensors = [TensorSpec(name) for name in donor.entries]
    items = []
    for spec in tensors:
        named = (spec.name, *spec.aliases)
        if spec.optional and not any(c in ck.entries for ck in inputs for c in named):
            log(f"skipping optional tensor {spec.name}: in no input")
            continue
        found = [next((c for c in (*named, *spec.tied) if c in ck.entries), None)
                 for ck in inputs]
        missing = [labels[i] for i, f in enumerate(found) if f is None]
        if missing:
            raise Unsupported(f"tensor {spec.name} is missing from {', '.join(missing)}")
        entries = [ck.entries[f] for ck, f in zip(inputs, found)]
        shapes = [e[1] for e in entries]
        for i, shape in enumerate(shapes[1:], 1):
            if shape != shapes[0]:
                raise ValueError(f"tensor {spec.name} differs in shape: {list(shapes[0])} in "
                                 f"{labels[0]}, {list(shape)} in {labels[i]}")
        in_dtypes = [e[0] for e in entries]
        loaded = [dtype or d for d in in_dtypes]  # mergekit casts on load when dtype is set
        compute = loaded[0]
        for d in loaded[1:]:
            compute = torch.promote_types(compute, d)
        items.append(Item(spec.name, max(found), list(found), shapes[0], in_dtypes, loaded,
                          compute, out_dtype or compute))
    # mergekit's executor runs tensors in the order of their group label (the input name):
    # the save order (hence the shard layout) and the order random masks are drawn in.
    items.sort(key=lambda it: it.label)
    return items
