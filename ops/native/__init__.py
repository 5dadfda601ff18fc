"""Small C kernels for the merge engine's hot loops, built on first use and cached.

Why by hand: mergekit's TIES trim keeps the elements of `torch.argsort(|delta|)[:k]`, and
which of the thousands of equal bf16 magnitudes at the threshold those are is decided by
the sort's partitioning: a sequential loop that numpy can only express in many passes
(topk.c replays it). And torch runs each of mergekit's bf16 steps as a pass of its own,
rounding in between; elementwise.c does the same roundings in one pass (task arithmetic and
two-model TIES). torch's `cpp_extension` would build these too, but against the torch
headers, with ninja; these are two C99 files that need only libc, built with the system C
compiler in about half a second and loaded with ctypes (which releases the GIL during a
call, so the merge's worker threads run them at once).

The build is cached under $WEIGHTSMITH_KERNEL_DIR, else $XDG_CACHE_HOME/weightsmith/kernels
(~/.cache/...), named by a hash of the sources, the flags and the CPU, written to a
temporary name and renamed, so concurrent jobs never load a half-written library. Without a
C compiler, or with WEIGHTSMITH_NATIVE=0, `library()` is None and the callers use their
numpy/torch forms, which give the same results more slowly; `status()` says which and why
(the merge logs it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("topk.c", "elementwise.c")]
# -ffp-contract=off: no fused multiply-add, mergekit rounds between the two (elementwise.c).
# -march=native: the element-wise loops need the CPU's vector width to beat torch's own
# kernels (which pick AVX2/AVX-512 at run time); the cache key names the CPU, and where the
# compiler refuses the flag the portable build is used.
FLAGS = ["-O3", "-std=c99", "-ffp-contract=off", "-fPIC", "-shared"]
NATIVE_FLAGS = ["-march=native"]

_LOCK = threading.Lock()
_LIB: Optional[ctypes.CDLL] = None
_STATUS: Optional[str] = None  # None: not tried yet


def _cache_dir() -> Path:
    explicit = os.environ.get("WEIGHTSMITH_KERNEL_DIR")
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "weightsmith" / "kernels"


def _key(compiler: str, flags: list[str]) -> str:
    """The cache name of a build: the sources, the compiler and flags, and the CPU (a
    -march=native build must not be loaded on another kind of machine sharing the cache)."""
    digest = hashlib.sha256()
    for src in SOURCES:
        digest.update(src.read_bytes())
    digest.update(" ".join([compiler, *flags, sys.platform, platform.machine()]).encode())
    try:
        with open("/proc/cpuinfo") as f:
            digest.update(next((line for line in f if line.startswith(("flags", "Features"))),
                               "").encode())
    except OSError:
        digest.update(platform.processor().encode())
    return digest.hexdigest()[:16]


def build(folder: Optional[Path] = None,
          flag_sets: Optional[list[list[str]]] = None) -> tuple[Optional[ctypes.CDLL], str]:
    """(library, status): the kernels built (or found built) in folder (default: the cache)
    with the first of flag_sets that compiles (default: native, then portable), loaded."""
    if os.environ.get("WEIGHTSMITH_NATIVE", "1") == "0":
        return None, "off (WEIGHTSMITH_NATIVE=0): numpy/torch forms"
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        return None, (f"no C compiler ({compiler!r} not found): numpy/torch forms, several "
                      f"times slower")
    folder = folder or _cache_dir()
    errors = []
    for flags in flag_sets or ([*FLAGS, *NATIVE_FLAGS], FLAGS):
        target = folder / f"weightsmith-{_key(compiler, flags)}.so"
        if target.exists():
            break
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
            try:
                done = subprocess.run([compiler, *flags, "-o", tmp, *map(str, SOURCES)],
                                      capture_output=True, text=True, timeout=120)
                if done.returncode == 0:
                    os.replace(tmp, target)  # whole or not at all, for concurrent jobs
                    break
                errors.append(done.stderr.strip()[-300:])
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"could not build in {folder} ({exc}): numpy/torch forms"
    else:
        return None, f"{compiler} failed ({errors[-1]}): numpy/torch forms"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        return None, f"could not load {target} ({exc}): numpy/torch forms"
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    signatures = {
        "ws_topk_keep_u16": [p, i64, i64, ctypes.c_uint16, p],
        "ws_ties_keep_bf16": [p, p, i64, i64, p],
        "ws_ties_pair_bf16": [p, p, p, p, p, i64, f32, f32, p, f32, i32, p],
        "ws_task_arithmetic_bf16": [p, p, p, i64, f32, f32, f32, i32, p],
        "ws_populate": [p, i64],
        "ws_vector_lanes": [],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
    lanes = lib.ws_vector_lanes()
    return lib, (f"C kernels, {lanes}-lane element-wise loops"
                 f"{'' if lanes >= 8 else ' (narrower than torch: torch does those)'} ({target})")


def library() -> Optional[ctypes.CDLL]:
    """The built kernels, or None (see status())."""
    global _LIB, _STATUS
    if _STATUS is None:
        with _LOCK:
            if _STATUS is None:
                _LIB, _STATUS = build()
    return _LIB


def status() -> str:
    """What library() gives and why, in a line for the job log."""
    library()
    return _STATUS or ""


# The results of ws_topk_keep_u16 and ws_ties_keep_bf16 that callers tell apart (topk.c's
# enum has the others: each means "use the numpy/torch form").
OK, HEAPSORT = 0, 1


def populate(tensor: torch.Tensor) -> None:
    """Map a memory-mapped CPU tensor's pages now, in one system call, instead of taking a
    page fault per 16 pages as it is read (see ws_populate); nothing where unsupported."""
    library().ws_populate(tensor.data_ptr(), tensor.numel() * tensor.element_size())


class KeepBits:
    """A keep mask of n elements as bits (bit i % 8 of byte i // 8, numpy's "little" order):
    what the trim kernels write, an eighth of a bool mask's memory. Indexing with a slice
    gives that part as a bool tensor, for the torch forms."""

    def __init__(self, bits: torch.Tensor, n: int):
        self.bits, self.n = bits, n  # ((n + 7) // 8,) uint8

    def __getitem__(self, part: slice) -> torch.Tensor:
        import numpy as np

        s, e, step = part.indices(self.n)
        assert step == 1
        lo = s // 8
        raw = np.unpackbits(self.bits[lo:-(-e // 8)].numpy(), bitorder="little")
        return torch.from_numpy(raw[s - 8 * lo:e - 8 * lo]).view(torch.bool)

    def bool(self) -> torch.Tensor:
        return self[0:self.n]


def topk_keep_16(keys: torch.Tensor, k: int, limit: int) -> tuple[int, Optional[KeepBits]]:
    """(result code, keep) for the k largest of keys, a (n,) int16 CPU tensor of 16-bit
    float magnitudes' bits, 0 < k < n: keep marks them as torch.argsort(keys as float32,
    descending=True)[:k] does, when the code is OK."""
    keys = keys.contiguous()
    n = keys.numel()
    keep = torch.empty((n + 7) // 8, dtype=torch.uint8)
    rc = library().ws_topk_keep_u16(keys.data_ptr(), n, k, limit, keep.data_ptr())
    return rc, (KeepBits(keep, n) if rc == OK else None)


def ties_keep_bf16(x: torch.Tensor, base: torch.Tensor,
                   k: int) -> tuple[int, Optional[KeepBits]]:
    """topk_keep_16 of |x - base| (bf16, as torch's bf16 subtraction rounds it) without making
    the delta: x, base contiguous (n,) bf16 CPU tensors (memory-mapped inputs will do)."""
    n = x.numel()
    keep = torch.empty((n + 7) // 8, dtype=torch.uint8)
    rc = library().ws_ties_keep_bf16(x.data_ptr(), base.data_ptr(), n, k, keep.data_ptr())
    return rc, (KeepBits(keep, n) if rc == OK else None)


def ties_pair_bf16(x0, x1, base, keep0, keep1, weights: list[float],
                   divisors: Optional[list[int]], lam: float, out) -> bool:
    """ops.merge.kernels.ties_pair's result from the inputs themselves (see elementwise.c)
    into out: x0, x1, base and out (m,) contiguous bf16 CPU tensors; keep0, keep1: the trim's
    masks from the chunk's first element on, as KeepBits.bits tensors (uint8), or both None.
    False: a NaN or Inf on the way (out is then undefined: redo the chunk with torch)."""
    lib = library()
    div = None
    if divisors is not None:
        div = torch.tensor(divisors, dtype=torch.int16)
    rc = lib.ws_ties_pair_bf16(
        x0.data_ptr(), x1.data_ptr(), base.data_ptr(),
        None if keep0 is None else keep0.data_ptr(), None if keep1 is None else keep1.data_ptr(),
        out.numel(), weights[0], weights[1], None if div is None else div.data_ptr(), lam,
        int(lam != 1), out.data_ptr())
    return rc == 0


def element_wise() -> bool:
    """Whether the element-wise kernels are worth running here: with 8-lane vectors (AVX2)
    they beat torch's passes; narrower (SSE2, NEON), torch's own kernels are faster."""
    lib = library()
    return lib is not None and lib.ws_vector_lanes() >= 8


def task_arithmetic_bf16(xs: list, base, weights: list[float], lam: float, out) -> bool:
    """mergekit's task arithmetic (one or two models, no normalize) into out; see
    ties_pair_bf16."""
    lib = library()
    x1 = xs[1].data_ptr() if len(xs) == 2 else None
    rc = lib.ws_task_arithmetic_bf16(xs[0].data_ptr(), x1, base.data_ptr(), out.numel(),
                                     weights[0], weights[-1], lam, int(lam != 1),
                                     out.data_ptr())
    return rc == 0
