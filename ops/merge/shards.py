"""The merge's output: safetensors shards laid out up front and written chunk by chunk at
their offsets, split as mergekit's TensorWriter splits them, and config.json as mergekit
writes it.

Why by hand: safetensors has no incremental writer, and mergekit buffers a whole output
shard before writing it; laying the shards out first lets every chunk go straight to its
place, so the output never waits in memory.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Optional, Sequence

import torch

from ops.checkpoint_files import SAFETENSORS_SINGLE, numel

DEFAULT_SHARD_BYTES = 5_000_000_000  # mergekit's out_shard_size default
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
                      "F16": torch.float16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
SAFETENSORS_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _header(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]):
    """safetensors layout: u64 little-endian header size, JSON header padded with spaces to
    8 bytes, then the data. Data is ordered by element size (largest first) so every tensor
    stays aligned, then in the given order."""
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i][1].itemsize)
    header, offsets, pos = {"__metadata__": {"format": "pt"}}, {}, 0
    for i in order:
        name, dtype, shape = tensors[i]
        size = dtype.itemsize
        for s in shape:
            size *= s
        header[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [pos, pos + size]}
        offsets[name] = pos
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets, pos


class ShardWriter:
    """Writes a model's shards progressively: each shard file gets its header and full size
    when the merge starts, then every tensor's bytes are written in place as they are made."""

    def __init__(self, out_dir, shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]]):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        n = len(shards)
        self.names = ([SAFETENSORS_SINGLE] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.where: dict[str, tuple[int, int]] = {}  # tensor -> (fd, absolute byte offset)
        self.weight_map: dict[str, str] = {}
        self.fds: list[int] = []
        self.maps: dict = {}  # fd -> a shared mapping of the shard (see mapped)
        self.total = 0
        for filename, tensors in zip(self.names, shards):
            head, offsets, size = _header(tensors)
            fd = os.open(self.out_dir / filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            os.pwrite(fd, head, 0)
            os.ftruncate(fd, len(head) + size)
            for name, _, _ in tensors:
                self.where[name] = (fd, len(head) + offsets[name])
                self.weight_map[name] = filename
            self.total += size

    def mapped(self, name: str, dtype: torch.dtype, lo: int, hi: int) -> Optional[torch.Tensor]:
        """Elements [lo, hi) of tensor `name` as a writable (hi - lo,) dtype tensor over a
        shared mapping of its shard (what is written there is the file's data), or None
        where the file cannot be mapped. Call release() with the same range when done."""
        import mmap

        fd, start = self.where[name]
        if fd not in self.maps:
            try:  # the whole shard, once: one mapping per range was slower (ext4's faults)
                self.maps[fd] = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED,
                                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError, AttributeError):  # (no MAP_SHARED on Windows)
                self.maps[fd] = None
        if self.maps[fd] is None or hi <= lo:
            return None
        return torch.frombuffer(self.maps[fd], dtype=torch.uint8,
                                count=(hi - lo) * dtype.itemsize,
                                offset=start + lo * dtype.itemsize).view(dtype)

    def release(self, name: str, dtype: torch.dtype, lo: int, hi: int) -> None:
        """Unmap the whole pages of a written range from this process (MADV_DONTNEED): they
        stay in the page cache, dirty, as pwrite's would, but leave the process's RSS,
        which would otherwise grow by the model's size."""
        import mmap

        fd, start = self.where[name]
        mapping = self.maps.get(fd)
        if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        first, last = start + lo * dtype.itemsize, start + hi * dtype.itemsize
        first += -first % mmap.PAGESIZE
        last -= last % mmap.PAGESIZE
        if last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)

    def write(self, name: str, byte_offset: int, tensor: torch.Tensor) -> int:
        """Write a contiguous CPU tensor's bytes at byte_offset inside tensor `name`."""
        fd, start = self.where[name]
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], start + byte_offset + done)
        return done

    def close(self, ok: bool = True) -> None:
        self.maps = {}  # (torch.frombuffer does not pin them: no view may outlive this)
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if not ok:
            for filename in self.names:
                (self.out_dir / filename).unlink(missing_ok=True)
            return
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n")


def shard_layout(items: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int) -> list[list]:
    """Split tensors, in save order, into shards as mergekit's TensorWriter does: a new shard
    starts when the next tensor would push the current one past max_shard_bytes."""
    shards, current, size = [], [], 0
    for name, dtype, shape in items:
        nbytes = dtype.itemsize * numel(shape)
        if current and max_shard_bytes > 0 and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, dtype, shape))
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def write_config(donor, out_dir, dtype_name: Optional[str]) -> None:
    """config.json as mergekit writes it: the donor's (base, else first model) loaded and
    saved again by transformers, with its dtype set to out_dtype or dtype when given.

    When this very transformers version wrote the donor's config.json, loading and saving
    it gives the same JSON back, so it is copied as JSON (sorted keys, indent 2, as
    transformers writes it) with `dtype` set: loading it through AutoConfig would first
    import transformers' configuration registry, over a second of CPU for a file copy."""
    from importlib.metadata import version

    source = json.loads((Path(donor) / "config.json").read_text())
    if source.get("transformers_version") == version("transformers") and \
            "torch_dtype" not in source:
        if dtype_name:
            source["dtype"] = dtype_name
        (Path(out_dir) / "config.json").write_text(
            json.dumps(source, indent=2, sort_keys=True) + "\n")
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(donor))
    if dtype_name:
        config.dtype = dtype_name
    config.save_pretrained(str(out_dir))
