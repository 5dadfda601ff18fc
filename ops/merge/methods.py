"""The merge methods the native engine runs: one entry per method, and what it covers.

Each entry names the paper, mergekit's shared parameters with mergekit 0.1.5's defaults
(`GeneralizedTaskArithmeticMerge`, `LinearMerge`), how each task vector is trimmed before it
is combined, whether signs are elected, and which C kernels (ops/native) serve it for bf16.
The engine (executor.py) reads these properties and never a method's name, so adding a
method is one entry here (plus, where it needs one, a kernel in kernels.py or ops/native)
and a test against mergekit in tests/test_merge_stream.py.

This module imports no torch: the merge plugin's form validation (in the app) asks
`native_refusal` whether a configuration can run natively.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class Unsupported(ValueError):
    """A merge the native engine does not cover; mergekit does. The message says why."""


@dataclass(frozen=True)
class Native:
    """What ops/native's C kernels do for a method, when inputs, computation and output are
    bf16 on CPU. chunk: the element-wise kernel, a name in kernels.NATIVE_CHUNKS (it also
    says for how many models and which parameters it applies); trim: the TIES magnitude
    trim straight from a model and its base (ties_keep_bf16)."""

    chunk: Optional[str] = None
    trim: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    reference: str  # the paper
    defaults: dict = field(default_factory=dict)  # mergekit's shared parameters
    uses_base: bool = True  # task vectors against a base; False: a weighted mean of models
    trim: Optional[str] = None  # each task vector first: "magnitude" (TIES) or "bernoulli" (DARE)
    consensus: bool = False  # TIES' sign election and disjoint mean
    native: Native = Native()

    @property
    def random(self) -> bool:
        """Draws random masks: runs tensor by tensor in mergekit's order (one thread)."""
        return self.trim == "bernoulli"

    @property
    def elementwise(self) -> bool:
        """Element by element throughout: a tensor may be split among threads."""
        return self.trim is None


_GTA = {"normalize": False, "rescale": False, "int8_mask": False, "lambda": 1.0}

TABLE: dict[str, Method] = {m.name: m for m in (
    Method("linear", "Wortsman et al. 2022, https://arxiv.org/abs/2203.05482",
           {"normalize": True}, uses_base=False),
    Method("task_arithmetic", "Ilharco et al. 2022, https://arxiv.org/abs/2212.04089", _GTA,
           native=Native(chunk="task_arithmetic")),
    Method("ties", "Yadav et al. 2023, https://arxiv.org/abs/2306.01708",
           {**_GTA, "normalize": True}, trim="magnitude", consensus=True,
           native=Native(chunk="ties_pair", trim=True)),
    Method("dare_linear", "Yu et al. 2023, https://arxiv.org/abs/2311.03099",
           {**_GTA, "rescale": True}, trim="bernoulli"),
    Method("dare_ties", "Yu et al. 2023, https://arxiv.org/abs/2311.03099",
           {**_GTA, "rescale": True}, trim="bernoulli", consensus=True),
)}
METHODS = tuple(TABLE)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")  # the compute and output dtypes


def method_refusal(name) -> Optional[str]:
    if name not in TABLE:
        return f"method {name} is not one of {', '.join(METHODS)} (the native engine's)"
    return None


LINEAR_WITH_BASE = "linear with a base_model (mergekit adds the base as one more input)"


def lookup(name: str, params: Optional[dict], has_base: bool) -> tuple[Method, dict]:
    """(the method, its shared parameters with mergekit's defaults), or Unsupported saying
    why not."""
    reason = method_refusal(name)
    if reason:
        raise Unsupported(reason)
    method = TABLE[name]
    unknown = set(params or {}) - set(method.defaults)
    if unknown:
        raise Unsupported(f"parameter(s) {', '.join(sorted(unknown))} are not used by {name}")
    if not method.uses_base and has_base:
        raise Unsupported(LINEAR_WITH_BASE)
    return method, {**method.defaults, **(params or {})}


def native_refusal(data: dict) -> Optional[str]:
    """Why the native engine cannot run this mergekit configuration (a parsed mergekit YAML),
    from its structure alone; None: it may (stream_merge checks the inputs when it opens
    them, and raises Unsupported for what it finds there)."""
    method = data.get("merge_method")
    reason = method_refusal(method)
    if reason:
        return reason
    if data.get("slices") or data.get("modules"):
        return "slices and modules are mergekit-only"
    if data.get("tokenizer_source") or data.get("tokenizer"):
        return "a tokenizer_source re-maps the embeddings to a new vocabulary (mergekit-only)"
    if not TABLE[method].uses_base and data.get("base_model"):
        return LINEAR_WITH_BASE
    settings = [("the shared parameters", data.get("parameters") or {})]
    for entry in data.get("models") or []:
        if isinstance(entry, dict):
            settings.append((f"model {entry.get('model')}", entry.get("parameters") or {}))
    for where, params in settings:
        if not isinstance(params, dict):
            return f"{where} are not a mapping"
        for key, value in params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                if key in ("normalize", "int8_mask", "rescale") and isinstance(value, bool):
                    continue
                return (f"{where}: {key} is {value!r}, not one number (gradients and filters "
                        f"are mergekit-only)")
    return None
