"""The element-wise numerics of the merge methods on one chunk, mirrored from mergekit 0.1.5
(`merge_methods/linear.py`, `merge_methods/generalized_task_arithmetic.py`) operation by
operation, and the C kernels (ops/native) that do the same steps in one pass.

Equality with mergekit, element-wise: each step is mergekit's torch operation applied to a
chunk of the flattened tensors, and element-wise results do not depend on the chunking. So
linear, task_arithmetic and TIES' combination round to the compute dtype exactly where
mergekit's do. `ties_pair` (two models) and the C kernels reach the same bits by other
means; their docstrings say why that is exact, and the tests compare every form with
mergekit.

Shapes: a chunk is (m,) per input, flat; task vectors are stacked as (N, m), N the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ops import native


def linear_chunk(tensors: list[torch.Tensor], weights: torch.Tensor, normalize: bool,
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


def sign_consensus(deltas: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """TIES' elected sign (mergekit get_mask, method 'sum'): deltas (N, m) -> bool (N, m),
    True where a delta agrees with the sign of the summed deltas (0 counts as +)."""
    sign = deltas.sign().to(mask_dtype)
    sign_weight = deltas.sum(dim=0)  # (m,) compute dtype
    majority_sign = (sign_weight >= 0).to(mask_dtype) * 2 - 1
    del sign_weight
    return sign == majority_sign


# TIES with two models, in bit operations. The float dtypes whose sign elections it does, with
# the integer type of the same width, its sign-bit shift and its magnitude mask.
SIGN_BITS = {torch.bfloat16: (torch.int16, 15, 0x7FFF), torch.float16: (torch.int16, 15, 0x7FFF),
              torch.float32: (torch.int32, 31, 0x7FFFFFFF)}


def pair_divisors(weights_t: torch.Tensor, ints) -> list[int]:
    """mergekit's TIES divisor `(weights * mask).sum(dim=0)`, 0 made 1, for each of the four
    masks of two models (none, first, second, both), as the dtype's bits (signed ints).
    weights_t: (2, 1) compute dtype; the mask is bool, as get_mask returns it."""
    masks = torch.tensor([[False, True, False, True], [False, False, True, True]],
                         device=weights_t.device)  # (2, 4)
    divisor = (weights_t * masks).sum(dim=0)  # (4,) compute dtype, the same ops as mergekit
    divisor[divisor == 0] = 1
    return [int(v) for v in divisor.view(ints).tolist()]


def ties_pair(base: torch.Tensor, deltas: torch.Tensor, weights: list[float],
               divisors: Optional[list[int]], lam: float, out: torch.Tensor) -> torch.Tensor:
    """gta_chunk for TIES with two models whose deltas (2, m) (overwritten) are finite, on
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
    ints, shift, magnitude = SIGN_BITS[deltas.dtype]
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


def gta_chunk(base: torch.Tensor, deltas: torch.Tensor, weights: list[float],
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
        mask = sign_consensus(deltas, torch.int8 if int8_mask else base.dtype)
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


# ---------------------------------------------------------------------------------------------
# The C kernels behind one interface (ops/native/elementwise.c). A method's table entry
# names one (methods.Native.chunk); the executor runs it on bf16 chunks where `applies`, and
# falls back to the torch steps above for a chunk it gives back (a NaN or Inf on the way).


@dataclass(frozen=True)
class NativeChunk:
    """applies(n_models, params): whether the kernel does this merge; run(xs, base, keeps,
    start, weights, divisors, lam, out) -> bool: the chunk into out (m,) bf16, False where
    it gave the chunk back. xs: the models' (m,) bf16 chunks; keeps: the trim's masks for
    the whole tensor (ops.native.KeepBits) or None; start: the chunk's first element;
    weights: rounded to bf16; divisors: pair_divisors, or None without normalize."""

    applies: Callable[[int, dict], bool]
    run: Callable[..., bool]


def _ties_pair_native(xs, base, keeps, start, weights, divisors, lam, out) -> bool:
    k0, k1 = (None, None) if keeps is None else keeps
    if k0 is not None or k1 is not None:  # both as bits, from a whole byte on
        if not (isinstance(k0, native.KeepBits) and isinstance(k1, native.KeepBits)
                and start % 8 == 0):
            return False
        k0, k1 = k0.bits[start // 8:], k1.bits[start // 8:]
    return native.ties_pair_bf16(xs[0], xs[1], base, k0, k1, weights, divisors, lam, out)


def _task_arithmetic_native(xs, base, keeps, start, weights, divisors, lam, out) -> bool:
    return native.task_arithmetic_bf16(xs, base, weights, lam, out)


NATIVE_CHUNKS = {
    # TIES of two models (ties_pair's bit operations, from the inputs and the trim's bits)
    "ties_pair": NativeChunk(applies=lambda n, p: n == 2, run=_ties_pair_native),
    # task arithmetic of one or two models, without normalize
    "task_arithmetic": NativeChunk(applies=lambda n, p: n <= 2 and not p["normalize"],
                                   run=_task_arithmetic_native),
}
