"""How each task vector is trimmed before the merge combines it: TIES' magnitude trim and
DARE's random drop, as mergekit 0.1.5's `sparsify.py` does them, bit for bit.

- TIES (Yadav et al. 2023, https://arxiv.org/abs/2306.01708), trim: keep the k largest
  |delta|. mergekit keeps the first k of a full `torch.argsort`; which of the equal
  magnitudes at the threshold those are is decided by the sort's partitioning. Here, on CPU,
  `introsort_keep` replays that sort on the path to position k only (see there why that is
  exact), at a fraction of its time and in half its memory; elsewhere it is torch.argsort
  itself. The replay exists once in numpy (below) and once in C (ops/native/topk.c, for
  16-bit keys, and from a bf16 model and its base without making the delta); this module
  is the one place that picks among them.
- DARE (Yu et al. 2023, https://arxiv.org/abs/2311.03099), drop and rescale: one Bernoulli
  mask per (tensor, model) from the engine's generator, in mergekit's order.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ops import native


def magnitude_keep(delta: torch.Tensor, density: float,
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


def magnitude_keep_owned(make_delta: Callable[[], torch.Tensor],
                          density: float) -> Optional[torch.Tensor]:
    """magnitude_keep(make_delta(), density, in_place=True), with the same result, in less
    memory: the delta is made here, and for 16-bit deltas on CPU its storage (the |delta|
    keys) is freed once the keys are packed, before the replay allocates its masks. That is
    2 bytes an element less at the peak, which the largest tensors (the embeddings) set.
    Where the replay gives way to torch.argsort, the delta is made again. With the C
    kernels this is magnitude_keep: their replay packs the keys in a scratch of its own."""
    if density >= 1:
        return None
    delta = make_delta().reshape(-1)
    n = delta.numel()
    k = max(1, int(density * n))
    if (density <= 0 or k >= n or delta.device.type != "cpu"
            or delta.dtype not in (torch.bfloat16, torch.float16) or not _introsort_ok()
            or native.library() is not None):  # (the C replay needs no packed keys here)
        return magnitude_keep(delta, density, in_place=True)
    bits = delta.abs_().view(torch.int16)
    if int(bits.max()) > (0x7F80 if delta.dtype == torch.bfloat16 else 0x7C00):
        del bits
        return magnitude_keep(delta, density, in_place=True)  # NaN: as mergekit
    packed_keys = _pack(bits.numpy(), k)
    del delta, bits  # nothing else holds the keys now: their memory is freed
    kept = _replay(packed_keys, n, k)
    if kept is None:  # std::sort would heapsort: torch.argsort decides, on a fresh delta
        return magnitude_keep(make_delta(), density, in_place=True)
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
# sort would switch to heapsort. tests/test_merge_stream.py checks it on many
# ties.

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


def native_keep(x: torch.Tensor, base: torch.Tensor, density: float):
    """TIES' trim of a model by the C kernel, straight from its bf16 input and the base's
    ((n,) bf16 CPU tensors, memory-mapped will do): the same mask as magnitude_keep_owned,
    as native.KeepBits; None (keep all); or False where the kernel does not apply (no
    kernels, not bf16, NaN, ties past 32-bit packing, a sort that would heapsort): then
    magnitude_keep_owned decides."""
    n = x.numel()
    if density >= 1:
        return None
    k = max(1, int(density * n)) if density > 0 else 0
    if (native.library() is None or not 0 < k < n
            or x.dtype != torch.bfloat16 or base.dtype != torch.bfloat16):
        return False
    rc, keep = native.ties_keep_bf16(x, base, k)
    return keep if rc == native.OK else False


def l1_rescaled(delta: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """TIES with rescale (mergekit rescaled_masked_tensor, L1): delta * keep scaled to the
    L1 norm of the whole delta; (n,) compute dtype."""
    if keep is None:
        return delta
    masked = delta * keep
    before, after = delta.abs().sum(), masked.abs().sum()
    if not (before < 1e-7 or after < 1e-7):
        masked = masked * (before / after)
    return masked


def bernoulli_rescaled(delta: torch.Tensor, density: float, rescale: bool,
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
