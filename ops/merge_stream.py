"""A native streaming merge engine for linear, task arithmetic, TIES, DARE-linear and DARE-TIES.

References:
- Linear ("model soups"): Wortsman et al. 2022, https://arxiv.org/abs/2203.05482
- Task arithmetic: Ilharco et al. 2022, https://arxiv.org/abs/2212.04089
- TIES-merging (trim, elect sign, disjoint merge): Yadav et al. 2023,
  https://arxiv.org/abs/2306.01708
- DARE (drop and rescale): Yu et al. 2023, https://arxiv.org/abs/2311.03099
- The numerics follow mergekit 0.1.5 (`merge_methods/linear.py`,
  `merge_methods/generalized_task_arithmetic.py`, `sparsify.py`,
  https://github.com/arcee-ai/mergekit) operation by operation, so that the output is
  bit-identical to mergekit's on the same configuration (see "Equality with mergekit" below).

Why by hand: mergekit's executor is a general task graph that keeps every input file mapped,
runs one tensor at a time on one Python thread and buffers a whole output shard before
writing it. This engine reads tensor by tensor with `safe_open`, releases each input mapping
when its tensor is done, writes every output chunk straight to its place in a pre-laid-out
safetensors shard (safetensors has no incremental writer), and spreads the work over a few
threads, so the peak memory is a bounded working set rather than the inputs.

Equality with mergekit (same YAML, same dtype):
- linear, task_arithmetic, ties: bit-identical. The element-wise steps are mergekit's torch
  operations applied to chunks (element-wise results do not depend on the chunking). TIES'
  magnitude trim keeps what mergekit's full `torch.argsort` of |delta| keeps, equal
  magnitudes at the threshold included: on CPU `introsort_keep` replays that sort on the
  path to position k only (see there why that is exact), at a fraction of its time and in
  half its memory; elsewhere it is torch.argsort itself. The replay, and for bf16 task
  arithmetic and two-model TIES the element-wise steps, run as C kernels (ops/native) where
  a C compiler built them: the same roundings in one pass; the tests compare both forms
  with mergekit.
- dare_linear, dare_ties: bit-identical for the same seed. mergekit seeds the global torch
  generator with the seed (`transformers.set_seed`) and draws one `torch.bernoulli` mask per
  (tensor, model) in its execution order, which is the tensors sorted by name. This engine
  draws from its own `torch.Generator(seed)` in that same order, one tensor at a time, and
  computes the whole-tensor L1 sums of the rescale with the default intra-op thread count,
  as mergekit does (a float sum's last bits depend on how it is split across threads).
  Random methods therefore run one tensor at a time (intra-op parallelism only).

Not covered (the caller falls back to mergekit): tensors that exist in only some inputs,
per-tensor or gradient parameters, tied/aliased names shared by two outputs under a random
method, non-safetensors inputs. `Unsupported` says which.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ops import native

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
RANDOM = ("dare_linear", "dare_ties")
# mergekit's defaults per method (GeneralizedTaskArithmeticMerge / linear_merge).
DEFAULTS = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "rescale": False, "int8_mask": False, "lambda": 1.0},
    "ties": {"normalize": True, "rescale": False, "int8_mask": False, "lambda": 1.0},
    "dare_linear": {"normalize": False, "rescale": True, "int8_mask": False, "lambda": 1.0},
    "dare_ties": {"normalize": False, "rescale": True, "int8_mask": False, "lambda": 1.0},
}
CONSENSUS = {"ties", "dare_ties"}
DEFAULT_SHARD_BYTES = 5_000_000_000  # mergekit's out_shard_size default
DEFAULT_WORKING_BYTES = 320 * 2**20
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
                      "F16": torch.float16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16, "float64": torch.float64}


class Unsupported(ValueError):
    """A merge the native engine does not cover; mergekit does. The message says why."""


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor, as mergekit's architecture describes it (WeightInfo): an input
    provides it under its name, an alias or a tied name (the first found); an optional tensor
    that no input has under its name or an alias is skipped, as mergekit skips it."""

    name: str
    aliases: tuple[str, ...] = ()
    tied: tuple[str, ...] = ()
    optional: bool = False


@dataclass
class MergeStats:
    tensors: int = 0
    bytes_written: int = 0
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    threads: int = 1
    peak_in_flight: int = 0  # tensors whose inputs were open at the same time
    peak_reserved_bytes: int = 0  # the working-set budget actually reserved at once


# ---------------------------------------------------------------------------------------------
# Inputs: a folder of safetensors shards, read tensor by tensor.


class Checkpoint:
    """The tensors of one model folder: name -> (file, dtype, shape), from the headers only."""

    def __init__(self, folder):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.folder / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise Unsupported(f"{self.folder} has no model.safetensors(.index.json) (the "
                              f"native engine reads safetensors only)")
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...]]] = {}
        for name in files:
            path = self.folder / name
            if not path.exists():
                raise ValueError(f"shard {name} is missing from {self.folder}")
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    self.entries[key] = (path, SAFETENSORS_DTYPES[piece.get_dtype()],
                                         tuple(piece.get_shape()))

    def open(self, key: str) -> torch.Tensor:
        """The tensor, backed by the file's memory map (zero copy; the pages are read when
        touched and released when the tensor is dropped)."""
        from safetensors import safe_open

        path = self.entries[key][0]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)


# ---------------------------------------------------------------------------------------------
# Output: shards laid out up front, written chunk by chunk at their offsets.


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
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
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
        self.names = (["model.safetensors"] if n == 1 else
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
        nbytes = dtype.itemsize * _numel(shape)
        if current and max_shard_bytes > 0 and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, dtype, shape))
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------------
# The per-element numerics, mirrored from mergekit 0.1.5 operation by operation.


def _linear_chunk(tensors: list[torch.Tensor], weights: torch.Tensor, normalize: bool,
                  denominator: torch.Tensor) -> torch.Tensor:
    """mergekit linear_merge on one chunk. tensors: N x (m,) in the compute dtype;
    weights: (N,) float32 (float64 for float64 inputs). Accumulates in float32: (m,) f32,
    then back to the compute dtype."""
    first = tensors[0]
    result = torch.zeros_like(first, dtype=weights.dtype)  # (m,) f32, from +0 as mergekit
    for tensor, coefficient in zip(tensors, weights.unbind(0)):
        result.addcmul_(tensor, coefficient.reshape(1))
    if normalize:
        result.div_(denominator)
    return result.to(first.dtype)


def _sign_consensus(deltas: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """TIES' elected sign (mergekit get_mask, method 'sum'): deltas (N, m) -> bool (N, m),
    True where a delta agrees with the sign of the summed deltas (0 counts as +)."""
    sign = deltas.sign().to(mask_dtype)
    sign_weight = deltas.sum(dim=0)  # (m,) compute dtype
    majority_sign = (sign_weight >= 0).to(mask_dtype) * 2 - 1
    del sign_weight
    return sign == majority_sign


# TIES with two models, in bit operations. The float dtypes whose sign elections it does, with
# the integer type of the same width, its sign-bit shift and its magnitude mask.
_SIGN_BITS = {torch.bfloat16: (torch.int16, 15, 0x7FFF), torch.float16: (torch.int16, 15, 0x7FFF),
              torch.float32: (torch.int32, 31, 0x7FFFFFFF)}


def _pair_divisors(weights_t: torch.Tensor, ints) -> list[int]:
    """mergekit's TIES divisor `(weights * mask).sum(dim=0)`, 0 made 1, for each of the four
    masks of two models (none, first, second, both), as the dtype's bits (signed ints).
    weights_t: (2, 1) compute dtype; the mask is bool, as get_mask returns it."""
    masks = torch.tensor([[False, True, False, True], [False, False, True, True]],
                         device=weights_t.device)  # (2, 4)
    divisor = (weights_t * masks).sum(dim=0)  # (4,) compute dtype, the same ops as mergekit
    divisor[divisor == 0] = 1
    return [int(v) for v in divisor.view(ints).tolist()]


def _ties_pair(base: torch.Tensor, deltas: torch.Tensor, weights: list[float],
               divisors: Optional[list[int]], lam: float, out: torch.Tensor) -> torch.Tensor:
    """_gta_chunk for TIES with two models whose deltas (2, m) (overwritten) are finite, on
    the bits of the float dtype; equal to mergekit bit for bit:
    - mergekit's sign_weight `deltas.sum(dim=0)` of two rows is one rounding of d0 + d1 (the
      reduction's +0 start only turns -0 into +0, and -0 >= 0 as +0 does), so it is `total`.
    - Its mask `sign(d) == majority` (majority +1 where total >= 0) is True exactly where d is
      nonzero and has total's sign bit: a nonzero finite sum of two dtype values never rounds
      to zero, and total is -0 only where both d are zeros, which the nonzero test drops.
    - `(deltas * mask).sum(dim=0)` adds d * mask from +0, so a masked-out d (±0) never changes
      the sum nor its sign of zero: it equals d0' + d1' with masked-out values set to +0.
    - `(weights * mask).sum(dim=0)`, 0 made 1, takes one of four values by the mask pair
      (`divisors`, computed by mergekit's own ops), picked here with bit masks.
    divisors: None when mergekit does not normalize."""
    ints, shift, magnitude = _SIGN_BITS[deltas.dtype]
    deltas[0].mul_(weights[0])
    deltas[1].mul_(weights[1])
    total = torch.add(deltas[0], deltas[1])  # (m,) mergekit's sign_weight
    if not bool(torch.isfinite(total.sum())):
        return None  # d * w overflowed: the caller takes mergekit's own steps
    bits = deltas.view(ints)  # (2, m)
    agree = bits & magnitude  # (2, m): 0 / -1 where the delta is zero / nonzero
    agree.neg_().bitwise_right_shift_(shift)
    same = bits ^ total.view(ints)  # sign bit set where the signs differ
    agree &= same.bitwise_right_shift_(shift).bitwise_not_()
    del same
    bits &= agree  # masked-out deltas become +0
    mixed = deltas[0].add_(deltas[1])  # (m,)
    if divisors is not None:
        none, first, second, both = divisors
        a0, a1 = agree[0], agree[1]
        pick = a0 & a1  # the divisor's bits: XOR of the differences by mask
        pick &= both ^ first ^ second ^ none
        pick ^= a0 & (first ^ none)
        pick ^= a1 & (second ^ none)
        pick ^= none
        mixed /= pick.view(deltas.dtype)
    if lam != 1:
        mixed *= lam
    return torch.add(base, mixed, out=out)


def _gta_chunk(base: torch.Tensor, deltas: torch.Tensor, weights: list[float],
               weights_t: torch.Tensor, consensus: bool, int8_mask: bool, normalize: bool,
               lam: float, divisor_all: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """mergekit GeneralizedTaskArithmeticMerge.merge_group after sparsification, on one chunk.

    base: (m,), deltas: (N, m) sparsified task vectors (overwritten), all in the compute
    dtype; weights: the N weights as Python floats already rounded to the compute dtype, and
    weights_t the same as a (N, 1) tensor. Every step rounds to the compute dtype exactly where
    mergekit's does. Without sign consensus the sum over models is done row by row, which is
    cheaper than mergekit's `deltas.sum(dim=0)` and equal to it: for one or two rows the sum
    is a single rounding either way, and `+ 0.0` turns an all -0 sum into +0, as the
    reduction (which starts from +0) gives; three or more rows use the reduction itself.
    """
    n = deltas.shape[0]
    for i in range(n):
        deltas[i].mul_(weights[i])  # == deltas.mul_(weights): w is exact in the dtype
    if consensus:
        mask = _sign_consensus(deltas, torch.int8 if int8_mask else base.dtype)
        mixed = (deltas * mask).sum(dim=0)  # (m,)
        divisor = (weights_t * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        if n <= 2:
            mixed = deltas[0]
            if n == 2:
                mixed.add_(deltas[1])
            mixed.add_(0.0)
        else:
            mixed = deltas.sum(dim=0)
        divisor = divisor_all
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return torch.add(base, mixed, out=out)


def _magnitude_keep(delta: torch.Tensor, density: float,
                    in_place: bool = False) -> Optional[torch.Tensor]:
    """TIES trim (mergekit sparsify.magnitude): the k = max(1, int(density * n)) largest |delta|
    as a bool mask (n,), ties broken exactly as mergekit's full `torch.argsort` breaks them.
    None: keep everything (density >= 1). in_place: |delta| overwrites delta. On CPU the
    selection is `introsort_keep` (a few passes and 9 bytes an element where argsort takes
    n log n comparisons and 17 bytes), torch.argsort where that cannot replay the sort."""
    n = delta.numel()
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return torch.zeros(n, dtype=torch.bool, device=delta.device)
    k = max(1, int(density * n))
    keys = (delta.abs_() if in_place else delta.abs()).reshape(-1)
    keep = None
    if keys.device.type == "cpu":
        if keys.dtype in (torch.bfloat16, torch.float16):
            # |x| of a 16-bit float, read as int16, orders exactly like its float32 value
            # (sign bit clear), so argsort sees the same comparisons at half the memory.
            bits = keys.view(torch.int16)
            limit = 0x7F80 if keys.dtype == torch.bfloat16 else 0x7C00
            keys = bits if int(bits.max()) <= limit else keys.float()  # NaN: as mergekit
        else:
            keys = keys.float()  # as mergekit (float64 keys are rounded to float32 too)
        if not (keys.is_floating_point() and bool(torch.isnan(keys).any())):
            kept = introsort_keep(keys.numpy(), k)
            if kept is not None:
                keep = torch.from_numpy(kept)
    if keep is None:
        top = torch.argsort(keys, descending=True)[:k]  # (k,) int64
        del keys
        keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
        keep[top] = True
    return keep


def _magnitude_keep_owned(make_delta: Callable[[], torch.Tensor],
                          density: float) -> Optional[torch.Tensor]:
    """_magnitude_keep(make_delta(), density, in_place=True), with the same result, in less
    memory: the delta is made here, and for 16-bit deltas on CPU its storage (the |delta|
    keys) is freed once the keys are packed, before the replay allocates its masks. That is
    2 bytes an element less at the peak, which the largest tensors (the embeddings) set.
    Where the replay gives way to torch.argsort, the delta is made again. With the C
    kernels this is _magnitude_keep: their replay packs the keys in a scratch of its own."""
    if density >= 1:
        return None
    delta = make_delta().reshape(-1)
    n = delta.numel()
    k = max(1, int(density * n))
    if (density <= 0 or k >= n or delta.device.type != "cpu"
            or delta.dtype not in (torch.bfloat16, torch.float16) or not _introsort_ok()
            or native.library() is not None):  # (the C replay needs no packed keys here)
        return _magnitude_keep(delta, density, in_place=True)
    bits = delta.abs_().view(torch.int16)
    if int(bits.max()) > (0x7F80 if delta.dtype == torch.bfloat16 else 0x7C00):
        del bits
        return _magnitude_keep(delta, density, in_place=True)  # NaN: as mergekit
    packed_keys = _pack(bits.numpy(), k)
    del delta, bits  # nothing else holds the keys now: their memory is freed
    kept = _replay(packed_keys, n, k)
    if kept is None:  # std::sort would heapsort: torch.argsort decides, on a fresh delta
        return _magnitude_keep(make_delta(), density, in_place=True)
    return torch.from_numpy(kept)


# ---------------------------------------------------------------------------------------------
# The first k of torch's CPU argsort, without the sort.
#
# torch.argsort(x, descending=True) on CPU is libstdc++'s std::sort (introsort) over
# (key, index) pairs compared by key alone; which of the equal keys at the k-th place end up
# among the first k is a product of its partitioning. introsort_keep replays that algorithm
# (median-of-three pivot moved to the front, Hoare's unguarded partition, a depth limit of
# 2*floor(log2 n), segments of 16 or fewer left to a final insertion sort, which is stable)
# but follows only the segment that holds position k: the elements left of it are among the
# first k in any order, those right of it are not. One partition is done with numpy on
# boolean masks: the left scan stops at keys <= pivot, the right scan at keys >= pivot, and
# the m-th stop from the left is swapped with the m-th stop from the right for as long as
# they have not crossed.
#
# Why the shortcuts below give the same k elements as the full sort:
# - Only the keys matter to std::sort, so any map that keeps their order and their ties
#   (int16 bits of a 16-bit |x|, a dense rank, the ordered bits of a float32) sorts alike.
# - With t the k-th largest key, every key > t is kept and every key < t is not; only which
#   of the keys equal to t are kept depends on the partitioning. So each key carries a tag
#   only if it equals t (packed = key * unit + tag), and the result is key > t plus the
#   tagged keys that the replay leaves among the first k.
# - After a partition with pivot p the left part holds keys >= p and the right part keys
#   <= p. Only the part that holds position k is partitioned again, so only its elements are
#   swapped into place; the other part is dropped (right: none of it is kept) or kept whole
#   (left: it can hold keys equal to t only when p == t, and then it is swapped into place
#   and its tagged keys are recorded).
# It needs the keys, 4-byte packed keys (8 when the tags do not fit 32 bits), two boolean
# masks and the result (9 bytes an element for 16-bit keys) where torch.sort needs about
# 17, and runs in a few passes over the data instead of n log n comparisons. It is checked
# against torch.argsort once per process, and gives None (use torch.argsort) where the real
# sort would switch to heapsort. test_merge_stream checks it on many ties.

_BLOCK = 1 << 16  # counting granularity
_PAIRS = 1 << 20  # swaps done at once
_INTROSORT_OK: Optional[bool] = None


def _true_counts(flags, out):
    """out[j] = the number of True in flags[:j * _BLOCK], for every block boundary."""
    import numpy as np

    n = flags.shape[0]
    full, blocks = n // _BLOCK, -(-n // _BLOCK)
    counts = out[1:blocks + 1]
    if full:
        flags[:full * _BLOCK].reshape(full, _BLOCK).sum(axis=1, out=counts[:full])
    if full < blocks:
        counts[full] = np.count_nonzero(flags[full * _BLOCK:])
    out[0] = 0
    np.cumsum(counts, out=counts)
    return out[:blocks + 1]


def _nth_true(flags, prefix, m: int) -> int:
    """The position of the m-th (from 0) True in flags, given its block counts."""
    import numpy as np

    j = int(np.searchsorted(prefix, m, side="right")) - 1
    start = j * _BLOCK
    return start + int(np.flatnonzero(flags[start:start + _BLOCK])[m - int(prefix[j])])


def _pack(key, k: int):
    """(keep, packed, unit, t, decode) for the k largest of key (1-D numpy int16 or float32,
    no NaN): t is the k-th largest key (as an ordered integer), keep = key > t (n,) bool,
    packed (n,) int32 or int64 = the key's order * unit + tag, where the keys equal to t have
    tags 1.. (int32) or their positions (int64), and decode(tags) gives their positions."""
    import numpy as np

    n = key.shape[0]
    if key.dtype == np.float32:
        ik = (key + np.float32(0)).view(np.int32)  # -0 + +0 = +0: equal keys, equal bits
        ik ^= (ik >> 31) & np.int32(0x7FFFFFFF)  # negative floats order backwards as bits
    else:
        ik = key
    if ik.dtype == np.int16 and int(ik.min()) >= 0:
        counts = torch.bincount(torch.from_numpy(ik)).numpy()  # (max + 1,)
        above = np.cumsum(counts[::-1])[::-1]  # above[v]: keys >= v
        t = int(np.flatnonzero(above >= k)[-1])
        keep = ik > t
        tpos = np.flatnonzero(ik == t)
        unit = len(tpos) + 1
        ranks = None
        if len(counts) * unit >= 2**31:  # dense ranks instead of the keys themselves
            ranks = (np.cumsum(counts > 0) - 1).astype(np.int32)
        if (len(counts) if ranks is None else int(ranks[-1]) + 1) * unit < 2**31:
            if ranks is None:
                packed = ik.astype(np.int32)
            else:
                packed, t = ranks[ik], int(ranks[t])
            packed *= np.int32(unit)
            packed[tpos] += np.arange(1, unit, dtype=np.int32)
            return keep, packed, unit, t, lambda tags: tpos[tags - 1]
    else:
        t = int(np.partition(ik, n - k)[n - k])
        keep = ik > t
    packed = ik.astype(np.int64)
    packed <<= 32
    packed |= np.arange(n, dtype=np.int64)
    return keep, packed, 1 << 32, t, lambda tags: tags


def _introsort_keep_unchecked(key, k: int):
    import numpy as np

    n = key.shape[0]
    if k >= n:
        return np.ones(n, dtype=np.bool_)
    if k <= 0:
        return np.zeros(n, dtype=np.bool_)
    return _replay(_pack(key, k), n, k)


def _replay(packed_keys: tuple, n: int, k: int):
    """The replay of introsort on _pack's result for the k largest of n keys (0 < k < n):
    the (n,) numpy bool mask, or None where std::sort would switch to heapsort. It needs
    only the packed keys, so the caller may drop the keys first."""
    import numpy as np

    keep, packed, unit, t, decode = packed_keys
    del packed_keys
    t_lo, t_hi = t * unit, t * unit + unit - 1
    found = []

    def record(part):  # the keys equal to t in part: all kept
        for s in range(0, part.shape[0], _PAIRS):
            piece = part[s:s + _PAIRS]
            hit = piece[(piece >= t_lo) & (piece <= t_hi)]
            if hit.size:
                found.append(decode(hit - t_lo))

    first, last = 0, n
    depth = 2 * (n.bit_length() - 1)
    le_buf, ge_buf = np.empty(n, dtype=np.bool_), np.empty(n, dtype=np.bool_)
    pl_buf = np.empty(-(-n // _BLOCK) + 1, dtype=np.int64)
    pr_buf = np.empty_like(pl_buf)
    while last - first > 16:
        if depth == 0:
            return None  # std::sort would heapsort this segment
        depth -= 1
        a, b, c = first + 1, first + (last - first) // 2, last - 1
        ka, kb, kc = int(packed[a]) // unit, int(packed[b]) // unit, int(packed[c]) // unit
        if ka > kb:
            m = b if kb > kc else (c if ka > kc else a)
        elif ka > kc:
            m = a
        elif kb > kc:
            m = c
        else:
            m = b
        packed[first], packed[m] = packed[m], packed[first]
        pivot, size = int(packed[first]) // unit, last - first
        seg = packed[first:last]
        le = np.less_equal(seg, pivot * unit + unit - 1, out=le_buf[:size])  # left scan stops
        le[0] = False  # (it starts after the pivot)
        ge = np.greater_equal(seg, pivot * unit, out=ge_buf[:size])  # right scan stops
        pl, pr = _true_counts(le, pl_buf), _true_counts(ge, pr_buf)
        total_l, total_r = int(pl[-1]), int(pr[-1])
        right = total_r - pr  # right stops at or after each block boundary
        # swaps = max over x of min(left stops before x, right stops from x on)
        j = int(np.flatnonzero(pl <= right)[-1])
        if j == len(pl) - 1:
            swaps = int(min(pl[j], right[j]))
        else:
            lo, hi = j * _BLOCK, min(size, (j + 1) * _BLOCK)
            left_x = np.zeros(hi - lo + 1, dtype=np.int64)
            np.cumsum(le[lo:hi], out=left_x[1:])
            right_x = np.zeros(hi - lo + 1, dtype=np.int64)
            np.cumsum(ge[lo:hi], out=right_x[1:])
            swaps = int(np.minimum(pl[j] + left_x, right[j] - right_x).max())
        if swaps == 0:
            cut = _nth_true(le, pl, 0)
        else:
            last_right = _nth_true(ge, pr, total_r - swaps)
            cut = last_right if swaps >= total_l else min(_nth_true(le, pl, swaps), last_right)
            # the left stops all lie before cut, the right stops from cut on
            into_left, into_right = k < first + cut or pivot == t, k >= first + cut
            for m0 in range(0, swaps, _PAIRS):  # pairs m0..m1-1 (bounded temporaries)
                m1 = min(swaps, m0 + _PAIRS)
                la, lb = _nth_true(le, pl, m0), _nth_true(le, pl, m1 - 1) + 1
                ra = _nth_true(ge, pr, total_r - m1)
                rb = _nth_true(ge, pr, total_r - 1 - m0) + 1
                lpos = np.flatnonzero(le[la:lb])  # left stops m0.. in order
                lpos += la
                rpos = np.flatnonzero(ge[ra:rb])[::-1]  # right stops m0.. from the right
                rpos += ra
                if into_left:
                    from_right = seg[rpos]
                if into_right:
                    seg[rpos] = seg[lpos]
                if into_left:
                    seg[lpos] = from_right
        cut += first
        if k < cut:
            last = cut
            continue
        if pivot == t:
            record(packed[first:cut])
        first = cut
        if cut == k:
            last = cut
    if last > first:
        part = packed[first:last]
        order = np.argsort(-(part // unit), kind="stable")  # the final insertion sort
        record(part[order[:k - first]])
    if found:
        keep[np.concatenate(found)] = True
    return keep


def introsort_keep(key, k: int):
    """torch.argsort(key, descending=True)[:k] on CPU as a (n,) numpy bool mask, or None
    (use torch.argsort). key: a 1-D numpy int16 or float32 array without NaN (not
    modified)."""
    import numpy as np

    if not _introsort_ok():
        return None
    if 0 < k < key.shape[0] and key.dtype == np.int16 and native.library() is not None:
        # the same replay in C (ops/native/topk.c); it takes non-negative keys only
        rc, keep = native.topk_keep_16(torch.from_numpy(key), k, 0x7FFF)
        if rc == native.OK:
            return keep.bool().numpy()
        if rc == native.HEAPSORT:
            return None
    return _introsort_keep_unchecked(key, k)


def _introsort_ok() -> bool:
    """Whether the replay equals this torch's argsort (checked once per process)."""
    global _INTROSORT_OK
    if _INTROSORT_OK is None:
        gen = torch.Generator().manual_seed(0)
        probe = torch.randint(0, 7, (50_000,), generator=gen, dtype=torch.int16)
        expected = torch.zeros(50_000, dtype=torch.bool)
        expected[torch.argsort(probe, descending=True)[:20_000]] = True
        got = _introsort_keep_unchecked(probe.numpy(), 20_000)
        _INTROSORT_OK = got is not None and torch.equal(torch.from_numpy(got), expected)
    return _INTROSORT_OK


def introsort_top(key, k: int):
    """The positions torch.argsort(key, descending=True)[:k] holds on CPU, in ascending
    order (numpy), or None; see introsort_keep."""
    import numpy as np

    keep = introsort_keep(key, k)
    return None if keep is None else np.flatnonzero(keep)


def _bernoulli_rescaled(delta: torch.Tensor, density: float, rescale: bool,
                        generator: torch.Generator) -> torch.Tensor:
    """DARE drop (mergekit sparsify.bernoulli): keep each element with probability density,
    then (rescale) match the L1 norm of the whole tensor. Same dtypes as mergekit: on CPU the
    mask is drawn in float32 unless the tensor is bf16 (full_like rounds density to it)."""
    if density >= 1:
        return delta
    if delta.device.type != "cpu" or delta.dtype == torch.bfloat16:
        work = delta.dtype
    else:
        work = torch.float32
    mask = torch.bernoulli(torch.full_like(delta, fill_value=density, dtype=work),
                           generator=generator)
    tensor = delta.to(work)
    masked = tensor * mask
    if rescale:
        before, after = tensor.abs().sum(), masked.abs().sum()  # 0-dim, work dtype
        if not (before < 1e-7 or after < 1e-7):
            masked = masked * (before / after)
    return masked.to(delta.dtype)


# ---------------------------------------------------------------------------------------------
# The plan.


@dataclass
class _Item:
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
        return _numel(self.shape)


def _plan(inputs: list[Checkpoint], labels: list[str], tensors: Optional[Sequence[TensorSpec]],
          dtype: Optional[torch.dtype], out_dtype: Optional[torch.dtype], log) -> list[_Item]:
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
        shapes = [e[2] for e in entries]
        for i, shape in enumerate(shapes[1:], 1):
            if shape != shapes[0]:
                raise ValueError(f"tensor {spec.name} differs in shape: {list(shapes[0])} in "
                                 f"{labels[0]}, {list(shape)} in {labels[i]}")
        in_dtypes = [e[1] for e in entries]
        loaded = [dtype or d for d in in_dtypes]  # mergekit casts on load when dtype is set
        compute = loaded[0]
        for d in loaded[1:]:
            compute = torch.promote_types(compute, d)
        items.append(_Item(spec.name, max(found), list(found), shapes[0], in_dtypes, loaded,
                           compute, out_dtype or compute))
    # mergekit's executor runs tensors in the order of their group label (the input name):
    # the save order (hence the shard layout) and the order random masks are drawn in.
    items.sort(key=lambda it: it.label)
    return items


# ---------------------------------------------------------------------------------------------
# Scheduling: a byte budget and a few worker threads.


class _Budget:
    """At most `limit` bytes reserved at once; a single larger request runs alone."""

    def __init__(self, limit: int):
        self.limit, self.used, self.count = limit, 0, 0
        self.peak_bytes, self.peak_count = 0, 0
        self.lock = threading.Lock()

    def try_acquire(self, n: int) -> bool:
        with self.lock:
            if self.used and self.used + n > self.limit:
                return False
            self.used += n
            self.count += 1
            self.peak_bytes = max(self.peak_bytes, self.used)
            self.peak_count = max(self.peak_count, self.count)
            return True

    def release(self, n: int) -> None:
        with self.lock:
            self.used -= n
            self.count -= 1


class _single_intraop:
    """On the calling thread, torch ops use one intra-op thread inside the block (when
    `on`): element-wise work on cache-sized chunks does not gain from OpenMP, which on a busy
    machine mostly waits at its barriers."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if self.on:
            self.previous = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.on:
            torch.set_num_threads(self.previous)


def _one_intraop_thread():
    """Worker initializer: torch ops on this thread use one intra-op thread, so N workers use
    N cores without OpenMP oversubscription. get_num_threads() first runs torch's lazy
    per-thread initialisation, which would otherwise reset the count at the first op."""
    torch.get_num_threads()
    torch.set_num_threads(1)


class _Engine:
    def __init__(self, method, inputs, n_models, items, writer, *, weights, densities,
                 params, seed, device, threads, budget, chunk_elements, part_elements,
                 check_finite, labels, native_kernels=True):
        self.method, self.inputs, self.n_models = method, inputs, n_models
        self.items, self.writer = items, writer
        self.weights, self.densities, self.params = weights, densities, params
        self.device = torch.device(device)
        self.threads, self.budget = threads, budget
        self.chunk_elements, self.part_elements = chunk_elements, part_elements
        self.check_finite, self.labels = check_finite, labels
        # The C kernels (ops/native), where they built; None: the numpy/torch forms
        self.native = native.library() if self.device.type == "cpu" and native_kernels else None
        self.generator = None
        if method in RANDOM:
            self.generator = torch.Generator(device=self.device)
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seed)
        self.stop = threading.Event()
        self.local = threading.local()
        self.finished: deque[str] = deque()  # tensors fully written, for the calling thread

    # -- reading -----------------------------------------------------------------------------

    def _open(self, item: _Item) -> list[torch.Tensor]:
        """Flat views (n,) of every input of item in its stored dtype, memory-mapped on CPU:
        nothing is copied here; chunks are cast to the compute dtype when used."""
        xs = [ck.open(key).reshape(-1) for ck, key in zip(self.inputs, item.keys)]
        if self.native is not None:
            for x in xs:
                native.populate(x)
        return xs

    def _cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(self.device)
        return x if x.dtype == dtype else x.to(dtype)

    # -- writing -----------------------------------------------------------------------------

    def _check(self, item: _Item, out: torch.Tensor) -> None:
        """Fail on NaN or Inf in out (a chunk of item's result), naming the inputs that
        already had one. A non-finite element makes the sum non-finite (one cheap pass;
        isfinite on bf16 is several times slower); a sum that overflowed is confirmed
        element-wise."""
        if not self.check_finite or not out.is_floating_point():
            return
        total = out.sum(dtype=torch.float32 if out.dtype == torch.float16 else None)
        if torch.isfinite(total) or torch.isfinite(out).all():
            return
        bad = [self.labels[i] for i, x in enumerate(self._open(item))
               if x.is_floating_point() and not torch.isfinite(x).all()]
        raise ValueError(f"the merge produced NaN or Inf in {item.name}"
                         + (f" (already in {', '.join(bad)})" if bad else ""))

    def _write(self, item: _Item, start: int, out: torch.Tensor) -> None:
        """out: item's result for elements [start, start + len), in the out dtype."""
        self.writer.write(item.name, start * item.out.itemsize, out.cpu().contiguous())

    def _buffer(self, key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A scratch tensor reused by this thread across chunks (they stay in cache)."""
        cache = self.local.__dict__.setdefault("buffers", {})
        numel = _numel(shape)
        held = cache.get((key, dtype))
        if held is None or held.numel() < numel:
            held = cache[(key, dtype)] = torch.empty(numel, dtype=dtype, device=self.device)
        return held[:numel].view(shape)

    # -- the merge of one tensor -------------------------------------------------------------

    def _split(self, xs):
        """(models, base) among the opened inputs: the base is last when there is one."""
        if self.method == "linear":
            return xs, None
        return xs[:self.n_models], xs[-1]

    def _copy_buffer(self, item: _Item, xs: list[torch.Tensor]) -> None:
        """mergekit copy_non_floating_buffer: integer buffers must agree and are copied."""
        loaded = [self._cast(x, d) for x, d in zip(xs, item.loaded)]
        first = loaded[0]
        if any(t.dtype != first.dtype or not torch.equal(t, first) for t in loaded[1:]):
            raise ValueError(f"non-floating buffer {item.name} differs between inputs")
        out = first.to(item.out)  # mergekit's SaveTensor casts to out_dtype
        self._check(item, out)
        self._write(item, 0, out)

    def _full_delta(self, x, base, cdt) -> torch.Tensor:
        """x - base over the whole tensor: (n,) compute dtype, made chunk by chunk."""
        out = torch.empty(x.numel(), dtype=cdt, device=self.device)
        for s in range(0, x.numel(), self.chunk_elements):
            e = min(x.numel(), s + self.chunk_elements)
            torch.sub(self._cast(x[s:e], cdt), self._cast(base[s:e], cdt), out=out[s:e])
        return out

    def _sparsify(self, item: _Item, xs=None):
        """Whole-tensor sparsification: (keeps, sparse). ties without rescale: bool keep-masks
        (n,) from the argsort of |delta| (the deltas are recomputed chunk by chunk later);
        otherwise the sparsified deltas themselves (n,) in the compute dtype. Each model's
        inputs are mapped only while its delta is made, so the argsort does not hold them."""
        cdt, rescale = item.compute, self.params["rescale"]
        base_ck, base_key = self.inputs[-1], item.keys[-1]
        keeps, sparse = [], []
        for i in range(self.n_models):
            def make_delta(i=i) -> torch.Tensor:
                with _single_intraop(self.threads <= 1):
                    return self._full_delta(self.inputs[i].open(item.keys[i]).reshape(-1),
                                            base_ck.open(base_key).reshape(-1), cdt)

            if self.method == "ties" and not rescale:
                keep = self._native_keep(item, i, xs)
                if keep is False:
                    keep = _magnitude_keep_owned(make_delta, self.densities[i])
                keeps.append(keep)
                continue
            delta = make_delta()
            if self.method == "ties":
                keep = _magnitude_keep(delta, self.densities[i], in_place=not rescale)
                if not rescale:
                    keeps.append(keep)
                    del delta
                    continue
                masked = delta if keep is None else delta * keep
                if keep is not None:  # mergekit rescaled_masked_tensor, L1
                    before, after = delta.abs().sum(), masked.abs().sum()
                    if not (before < 1e-7 or after < 1e-7):
                        masked = masked * (before / after)
                sparse.append(masked)
            else:
                sparse.append(_bernoulli_rescaled(delta, self.densities[i], rescale,
                                                  self.generator))
            del delta
        return (keeps or None), (sparse or None)

    def _native_keep(self, item: _Item, i: int, xs):
        """TIES' trim of model i by the C kernel, straight from the bf16 inputs (the same
        mask as _magnitude_keep_owned; xs: item's opened inputs, which _work maps before the
        trim whenever the kernels exist): native.KeepBits, None (keep all), or False where
        the kernel does not apply (not bf16 in and out of the computation, NaN, ties past
        32-bit packing, a sort that would heapsort): then the caller's path decides."""
        density, n = self.densities[i], item.numel
        if density >= 1:
            return None
        k = max(1, int(density * n)) if density > 0 else 0
        if (self.native is None or not 0 < k < n or item.compute != torch.bfloat16
                or any(d != torch.bfloat16 for d in (item.in_dtypes[i], item.in_dtypes[-1]))):
            return False
        rc, keep = native.ties_keep_bf16(xs[i], xs[-1], k)
        return keep if rc == native.OK else False

    def _native_chunk(self, item: _Item, models, base, s: int, e: int, keeps, wf,
                      pair_divisors, dest) -> bool:
        """The chunk [s, e) of a two-model TIES or a one- or two-model task arithmetic by the
        C kernels (elementwise.c), written into dest (m,) bf16 and already checked finite.
        False where they do not apply or met a NaN or Inf: the torch path redoes it. The
        caller has checked the rest (_elementwise's `fused`: bf16 throughout, on CPU)."""
        p = self.params
        xs = [x[s:e] for x in models]
        if self.method == "ties" and len(xs) == 2 and p["normalize"] == (pair_divisors is not None):
            k0, k1 = (None, None) if keeps is None else keeps
            if k0 is not None or k1 is not None:  # both as bits, from a whole byte on
                if not (isinstance(k0, native.KeepBits) and isinstance(k1, native.KeepBits)
                        and s % 8 == 0):
                    return False
                k0, k1 = k0.bits[s // 8:], k1.bits[s // 8:]
            return native.ties_pair_bf16(xs[0], xs[1], base[s:e], k0, k1, wf, pair_divisors,
                                         p["lambda"], dest)
        if self.method == "task_arithmetic" and len(xs) <= 2 and not p["normalize"]:
            return native.task_arithmetic_bf16(xs, base[s:e], wf, p["lambda"], dest)
        return False

    def _elementwise(self, item: _Item, lo: int, hi: int, xs, keeps=None, sparse=None):
        """The element-wise part of the merge for elements [lo, hi), chunk by chunk."""
        models, base = self._split(xs)
        cdt, dev, p = item.compute, self.device, self.params
        n = len(models)
        if self.method == "linear":
            acc = torch.float64 if cdt == torch.float64 else torch.float32
            w = torch.tensor([self.weights], dtype=acc, device=dev)  # (1, N) as mergekit
            denominator = w.sum(dim=1)  # (1,)
            w = w[0]
        else:
            w = torch.tensor(self.weights, dtype=cdt, device=dev).unsqueeze(-1)  # (N, 1)
            wf = [float(v) for v in w[:, 0].tolist()]  # the weights rounded to the dtype
            divisor = w.sum(dim=0)  # (1,) compute dtype
            divisor[divisor.abs() < 1e-8] = 1
            consensus = self.method in CONSENSUS
            pair = consensus and n == 2 and cdt in _SIGN_BITS  # see _ties_pair
            pair_divisors = _pair_divisors(w, _SIGN_BITS[cdt][0]) if pair and p["normalize"] \
                else None
        fused = (self.native is not None and sparse is None and native.element_wise()
                 and self.method in ("ties", "task_arithmetic")
                 and all(d == torch.bfloat16 for d in (*item.in_dtypes, cdt, item.out)))
        # Results go to a staging buffer written with one pwrite per part_elements: fewer,
        # larger writes, so two workers rarely queue on the file's lock.
        stage = self._buffer("stage", (min(hi - lo, self.part_elements),), item.out)
        # The C kernels write straight into the output file's pages (a shared mapping): no
        # staging copy, and no pwrite, whose file lock the workers would queue on.
        mapped = self.writer.mapped(item.name, item.out, lo, hi) if fused else None
        start, filled = lo, 0
        for s in range(lo, hi, self.chunk_elements):
            e = min(hi, s + self.chunk_elements)
            if mapped is not None and self._native_chunk(item, models, base, s, e, keeps, wf,
                                                         pair_divisors, mapped[s - lo:e - lo]):
                if filled:
                    self._write(item, start, stage[:filled])
                start, filled = e, 0
                continue
            if filled + e - s > stage.numel():
                self._write(item, start, stage[:filled])
                start, filled = s, 0
            dest = stage[filled:filled + e - s]  # (m,) out dtype
            if self.method == "linear":
                out = _linear_chunk([self._cast(x[s:e], cdt) for x in models], w,
                                    p["normalize"], denominator)
            else:
                b = self._cast(base[s:e], cdt)
                deltas = self._buffer("deltas", (n, e - s), cdt)  # (N, m) compute dtype
                direct = item.out == cdt and dest.device == self.device
                target = dest if direct else self._buffer("out", (e - s,), cdt)
                out = None
                if pair:  # TIES, two models: the same numbers in bit operations
                    ints, shift, _ = _SIGN_BITS[cdt]
                    for i, x in enumerate(models):
                        if sparse is not None:
                            deltas[i].copy_(sparse[i][s:e])
                        else:
                            torch.sub(self._cast(x[s:e], cdt), b, out=deltas[i])
                    # finite deltas only (NaN * 0 is NaN, but masking bits would make +0)
                    if bool(torch.isfinite(deltas.sum())):
                        for i in range(n):
                            if sparse is None and keeps is not None and keeps[i] is not None:
                                # delta * mask, as +0 where dropped (see _ties_pair)
                                keep = self._buffer(f"keep{i}", (e - s,), ints)
                                keep.copy_(keeps[i][s:e]).neg_()  # 0 / -1
                                deltas[i].view(ints).bitwise_and_(keep)
                        out = _ties_pair(b, deltas, wf, pair_divisors, p["lambda"], target)
                if out is None:
                    for i, x in enumerate(models):
                        if sparse is not None:
                            deltas[i].copy_(sparse[i][s:e])
                            continue
                        torch.sub(self._cast(x[s:e], cdt), b, out=deltas[i])
                        if keeps is not None and keeps[i] is not None:
                            deltas[i].mul_(keeps[i][s:e])  # mergekit: delta * mask
                    out = _gta_chunk(b, deltas, wf, w, consensus, p["int8_mask"],
                                     p["normalize"], p["lambda"], divisor, target)
            if out is not dest:
                dest.copy_(out)  # mergekit's SaveTensor cast to out_dtype (same rounding)
            self._check(item, dest)
            filled += e - s
        if filled:
            self._write(item, start, stage[:filled])
        if mapped is not None:
            self.writer.release(item.name, item.out, lo, hi)

    def _work(self, item: _Item, lo: int, hi: int, state: dict) -> None:
        keeps = sparse = None
        floating = all(d.is_floating_point for d in item.loaded)
        # The C trim reads the inputs the element-wise pass reads next: map them once.
        # (The other trims map each model's inputs only while its delta is made.)
        early = self.native is not None and self.method == "ties" and not self.params["rescale"]
        xs = self._inputs(item, state) if early else None
        if floating and self.method not in ("linear", "task_arithmetic"):
            keeps, sparse = self._sparsify(item, xs)
        if xs is None:
            xs = self._inputs(item, state)
        if not floating:
            self._copy_buffer(item, xs)
            return
        with _single_intraop(self.threads <= 1):
            self._elementwise(item, lo, hi, xs, keeps, sparse)

    def _inputs(self, item: _Item, state: dict) -> list[torch.Tensor]:
        """item's opened inputs, shared by its parts (state["xs"])."""
        with state["lock"]:
            if "xs" not in state:
                state["xs"] = self._open(item)
            return state["xs"]

    def _part(self, item: _Item, lo: int, hi: int, state: dict) -> None:
        """One part of one tensor (the whole tensor unless it is split for an element-wise
        method). state is shared by a tensor's parts: its open inputs and a countdown; the
        last part drops the memory maps, so their pages leave the RSS, and the budget."""
        try:
            if not self.stop.is_set():
                self._work(item, lo, hi, state)
        except BaseException:
            self.stop.set()
            raise
        finally:
            with state["lock"]:
                state["left"] -= 1
                last = state["left"] == 0
                if last:
                    state.pop("xs", None)
            if last:
                self.budget.release(state["reserved"])
                if not self.stop.is_set():
                    self.finished.append(item.name)

    def _estimate(self, item: _Item) -> int:
        """Working bytes of one tensor. Element-wise methods: its mapped inputs (the chunk
        buffers are small). TIES: the selection of the largest |delta| (introsort_keep: the
        keys, 4- or 8-byte packed keys, two masks and the result) and a keep-mask per model.
        Rescaled or random methods: the dense deltas, DARE's mask and probabilities."""
        n = item.numel
        inputs = sum(d.itemsize for d in item.in_dtypes) * n
        c = item.compute.itemsize
        # 16-bit: int32 packed keys; float32 keys: their ordered bits, then int64 packed
        select = n * (c + 7) if c <= 2 else n * (c + 13 + (4 if c > 4 else 0))
        if self.method == "ties" and not self.params["rescale"]:
            return max(inputs, select) + n * self.n_models
        if self.method == "ties":
            return inputs + select + n * c * self.n_models
        if self.method in RANDOM:
            return inputs + n * c * (self.n_models + 4)
        return inputs

    def _parts(self, item: _Item) -> list[tuple[int, int]]:
        n = item.numel
        if self.method in ("linear", "task_arithmetic") and self.threads > 1 and n:
            return [(s, min(n, s + self.part_elements)) for s in range(0, n, self.part_elements)]
        return [(0, n)]

    def run(self, report: Callable[[str], None]) -> None:
        """Merge every item; report(name) is called on this thread as each one is written."""
        if self.threads <= 1:
            for item in self.items:
                state = {"lock": threading.Lock(), "left": 1, "reserved": self._estimate(item)}
                self.budget.try_acquire(state["reserved"])
                self._part(item, 0, item.numel, state)
                while self.finished:
                    report(self.finished.popleft())
            return
        previous = torch.get_num_threads()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="merge",
                                  initializer=_one_intraop_thread)
        pending: list[Future] = []

        def reap(block: bool) -> None:
            if block and pending:
                wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for f in [f for f in pending if f.done()]:
                pending.remove(f)
                f.result()  # re-raises a worker's error here
            while self.finished:
                report(self.finished.popleft())

        try:
            list(pool.map(lambda _: None, range(self.threads)))  # start the workers
            # set_num_threads in a worker also sets the count that new threads start with:
            # put it back for the rest of the process.
            torch.set_num_threads(previous)
            for item in self.items:
                parts = self._parts(item)
                state = {"lock": threading.Lock(), "left": len(parts),
                         "reserved": self._estimate(item)}
                while not self.budget.try_acquire(state["reserved"]):
                    reap(block=True)
                for lo, hi in parts:
                    pending.append(pool.submit(self._part, item, lo, hi, state))
                while len(pending) > 4 * self.threads:
                    reap(block=True)
                reap(block=False)
            while pending:
                reap(block=True)
        except BaseException:
            self.stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------


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


def stream_merge(method: str, models: Sequence, base=None, *, weights: Sequence[float],
                 densities: Optional[Sequence[float]] = None, params: Optional[dict] = None,
                 out_dir, dtype: Optional[str] = None, out_dtype: Optional[str] = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, seed: Optional[int] = None,
                 device: str = "cpu", threads: Optional[int] = None,
                 max_working_bytes: int = DEFAULT_WORKING_BYTES,
                 tensors: Optional[Sequence[TensorSpec]] = None,
                 chunk_elements: int = 1 << 18, part_elements: int = 1 << 22,
                 check_finite: bool = True, write_config_json: bool = True, donor=None,
                 progress: Optional[Callable[[float, str], None]] = None,
                 log: Optional[Callable[[str], None]] = None,
                 on_tensor: Optional[Callable[[str], None]] = None,
                 native_kernels: bool = True) -> MergeStats:
    """Merge `models` (folders of safetensors shards; `base` too for the task-vector methods)
    into out_dir, tensor by tensor, as mergekit would with the same configuration.

    weights/densities: one per model (mergekit's per-model `weight` and `density`; density
    defaults to 1). params: mergekit's shared parameters (`normalize`, `rescale`, `lambda`,
    `int8_mask`), defaulting as in mergekit. dtype: the compute dtype (inputs are cast to it
    on load; None: the inputs' promoted dtype); out_dtype: the stored dtype (None: dtype).
    threads: worker threads for the deterministic methods (default: the torch thread count;
    each worker runs torch ops on one intra-op thread); random methods and any L1 rescale run
    one tensor at a time on the calling thread. max_working_bytes bounds what the tensors in
    flight may hold at once (their memory-mapped inputs and merge buffers); one tensor larger
    than that runs alone. on_tensor(name) is called once a tensor's bytes are all written,
    progress(fraction, name) likewise, both on the calling thread. donor: the folder whose
    config.json is copied (default: the base, else the first model, as mergekit).
    native_kernels: use ops/native's C kernels where they built and apply (False: the
    numpy/torch forms throughout, as on a machine without a C compiler; same results).
    Raises Unsupported, before anything is written, for what mergekit must do instead.
    """
    if method not in METHODS:
        raise Unsupported(f"method {method!r} is not one of the native engine's "
                          f"({', '.join(METHODS)})")
    log = log or (lambda message: None)
    started = time.perf_counter()
    params = {**DEFAULTS[method], **(params or {})}
    unknown = set(params) - set(DEFAULTS[method])
    if unknown:
        raise Unsupported(f"parameter(s) {', '.join(sorted(unknown))} are not used by "
                          f"{method}")
    models = [Path(m) for m in models]
    if method != "linear":
        if base is None:
            raise ValueError(f"method {method} needs a base model")
        base = Path(base)
        # mergekit drops the base from the non-base inputs when it is also listed
        keep = [i for i, m in enumerate(models) if m.resolve() != base.resolve()]
        models = [models[i] for i in keep]
        weights = [weights[i] for i in keep]
        if densities is not None:
            densities = [densities[i] for i in keep]
    elif base is not None:
        raise Unsupported("linear with a base_model: mergekit adds the base as an input")
    if not models:
        raise Unsupported("no model to merge besides the base")
    if len(weights) != len(models):
        raise ValueError(f"weights has {len(weights)} values for {len(models)} models")
    densities = [1.0] * len(models) if densities is None else [float(d) for d in densities]
    folders = models + ([base] if base is not None else [])
    labels = [m.name for m in folders]
    inputs = [Checkpoint(f) for f in folders]
    cdt = TORCH_DTYPES[dtype] if dtype else None
    odt = TORCH_DTYPES[out_dtype] if out_dtype else None
    items = _plan(inputs, labels, tensors, cdt, odt, log)
    if method in RANDOM:
        seen = set()
        for it in items:
            if it.label in seen:
                raise Unsupported(f"two outputs read {it.label}: mergekit's random draw order "
                                  f"for them is not fixed")
            seen.add(it.label)
    if threads is None:
        threads = torch.get_num_threads()
    if method in RANDOM or params.get("rescale") or torch.device(device).type != "cpu":
        threads = 1  # whole-tensor sums and the random draws run as mergekit runs them
    out_dir = Path(out_dir)
    writer = ShardWriter(out_dir, shard_layout([(it.name, it.out, it.shape) for it in items],
                                               max_shard_bytes))
    log(f"native engine: {method}, {len(items)} tensors into {len(writer.names)} shard(s), "
        f"{threads} thread(s), working set <= {max_working_bytes / 2**20:.0f} MiB")
    if method in ("ties", "task_arithmetic") and torch.device(device).type == "cpu":
        log("kernels: " + (native.status() if native_kernels else "numpy/torch forms (asked)"))
    budget = _Budget(max_working_bytes)
    engine = _Engine(method, inputs, len(models), items, writer, weights=list(weights),
                     densities=densities, params=params, seed=seed, device=device,
                     threads=threads, budget=budget, chunk_elements=chunk_elements,
                     part_elements=part_elements, check_finite=check_finite, labels=labels,
                     native_kernels=native_kernels)
    done = 0

    def report(name: str) -> None:
        nonlocal done
        done += 1
        if on_tensor:
            on_tensor(name)
        if progress:
            progress(done / max(1, len(items)), name)

    ok = False
    try:
        engine.run(report)
        ok = True
    finally:
        writer.close(ok)
    if write_config_json:
        donor = donor or (folders[-1] if base is not None else folders[0])
        write_config(donor, out_dir, out_dtype or dtype)
    return MergeStats(tensors=len(items), bytes_written=writer.total,
                      shards=list(writer.names), seconds=time.perf_counter() - started,
                      threads=threads, peak_in_flight=budget.peak_count,
                      peak_reserved_bytes=budget.peak_bytes)
