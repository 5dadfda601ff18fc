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
  bit-identical to mergekit's on the same configuration.

The package, after mergekit's shape (a method is a small entry; I/O lives in an executor):
- `methods.py`: the table, one entry per method (its paper, parameters and defaults, trim,
  sign election, and the C kernels that serve it), and `native_refusal`, the one place that
  says whether the engine can run a mergekit configuration. No torch.
- `kernels.py`: the element-wise steps on one chunk, and the C element-wise kernels behind
  one interface (`NATIVE_CHUNKS`).
- `trim.py`: TIES' magnitude trim (the introsort replay, in numpy and in C) and DARE's drop.
- `plan.py`: the inputs' headers and one item per output tensor, in mergekit's order.
- `shards.py`: the output shards, laid out up front and written in place; config.json.
- `executor.py`: `stream_merge`, the memory budget, the threads and the streaming loop.

Equality with mergekit (same YAML, same dtype):
- linear, task_arithmetic, ties: bit-identical. The element-wise steps are mergekit's torch
  operations applied to chunks (element-wise results do not depend on the chunking; see
  kernels.py). TIES' magnitude trim keeps what mergekit's full `torch.argsort` of |delta|
  keeps, equal magnitudes at the threshold included (see trim.py). The replay, and for bf16
  task arithmetic and two-model TIES the element-wise steps, run as C kernels (ops/native)
  where a C compiler built them: the same roundings in one pass; the tests compare both
  forms with mergekit.
- dare_linear, dare_ties: bit-identical for the same seed (the draw order is mergekit's; see
  executor.py).

Not covered (the caller falls back to mergekit): tensors that exist in only some inputs,
per-tensor or gradient parameters, tied/aliased names shared by two outputs under a random
method, non-safetensors inputs. `Unsupported` says which.

Importing this package does not import torch (the app asks `native_refusal`); the engine's
names (`stream_merge`, `TensorSpec`, `TORCH_DTYPES`, `MergeStats`) load on first use.
"""

from __future__ import annotations

from ops.merge.methods import COMPUTE_DTYPES, METHODS, TABLE, Unsupported, native_refusal

__all__ = ["COMPUTE_DTYPES", "METHODS", "TABLE", "MergeStats", "TORCH_DTYPES", "TensorSpec",
           "Unsupported", "native_refusal", "stream_merge"]

_LAZY = {"stream_merge": "ops.merge.executor", "MergeStats": "ops.merge.executor",
         "TensorSpec": "ops.merge.plan", "TORCH_DTYPES": "ops.merge.plan"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
