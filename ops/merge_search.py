"""Merge-recipe search: the parameter space, the grid, the fitness and the rescaled merge.

References:
- Evolutionary model merging: Akiba et al. 2024, "Evolutionary Optimization of Model Merging
  Recipes", https://arxiv.org/abs/2403.13187: CMA-ES over a merge's parameters (per-model
  weights and densities of TIES/DARE, per-layer scales), each candidate merged and scored
  on the target tasks. The optimizer itself is Hansen's CMA-ES (the `cma` package, used by
  plugins/merge_search); this module is the optimizer-free part.
- The scales searched per layer or per block are those of LiNeS (Wang et al. 2024,
  https://arxiv.org/abs/2410.17146: lambda(l) = alpha + beta * l / (L - 1)) and of aTLAS
  (Zhang et al. 2024, https://arxiv.org/abs/2407.02880: one coefficient per parameter block),
  applied to the merged task vector: theta = theta_base + s(tensor) * (theta_merged -
  theta_base) (`rescale_merge`).

Every searched value lives in a box [low, high]; the optimizer works in the unit cube
[0, 1]^d (one scale for all coordinates, which CMA-ES's single step size assumes) and
`SearchSpace.decode` maps a point back. Nothing here imports torch at module level.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

MAX_GRID = 10_000  # points a grid may have (points_per_dim ** dim)


@dataclass(frozen=True)
class Param:
    """One searched value: its name (as logged and stored in the recipe) and its box."""

    name: str
    low: float
    high: float

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or \
                not self.low < self.high:
            raise ValueError(f"parameter {self.name}: range [{self.low}, {self.high}] must be "
                             f"two finite numbers with low < high")


class SearchSpace:
    """The searched parameters, in order; points are lists of floats, in the unit cube for
    the optimizer (`encode`/`decode`) or in the parameters' own units."""

    def __init__(self, params: Sequence[Param]):
        names = [p.name for p in params]
        if not params:
            raise ValueError("nothing to search: the search space has no parameter")
        if len(set(names)) != len(names):
            raise ValueError(f"parameter names repeat: {names}")
        self.params = list(params)

    @property
    def dim(self) -> int:
        return len(self.params)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def decode(self, unit: Sequence[float]) -> dict[str, float]:
        """{name: value} of a unit-cube point (clipped into the cube first)."""
        if len(unit) != self.dim:
            raise ValueError(f"a point of {len(unit)} coordinates for {self.dim} parameters")
        out = {}
        for p, u in zip(self.params, unit):
            u = min(1.0, max(0.0, float(u)))
            out[p.name] = p.low + u * (p.high - p.low)
        return out

    def encode(self, values: Mapping[str, float]) -> list[float]:
        """The unit-cube point of {name: value} (values outside a box are clipped to it)."""
        out = []
        for p in self.params:
            v = float(values[p.name])
            out.append(min(1.0, max(0.0, (v - p.low) / (p.high - p.low))))
        return out

    def center(self) -> list[float]:
        return [0.5] * self.dim

    def grid(self, points: int) -> list[list[float]]:
        """The full grid of `points` evenly spaced values per parameter, ends included
        (points ** dim unit-cube points, the first parameter varying slowest)."""
        if points < 2:
            raise ValueError(f"a grid needs at least 2 points per parameter, got {points}")
        total = points ** self.dim
        if total > MAX_GRID:
            raise ValueError(f"a grid of {points} points on {self.dim} parameters has {total} "
                             f"points; at most {MAX_GRID}")
        axis = [i / (points - 1) for i in range(points)]
        return [list(p) for p in itertools.product(axis, repeat=self.dim)]


def default_popsize(dim: int, budget: int) -> int:
    """CMA-ES's population for a small budget: Hansen's default 4 + floor(3 ln d), but no
    more than a third of the budget (at least three generations to adapt), and never under 4
    (nor over the budget)."""
    hansen = 4 + int(3 * math.log(max(dim, 1)))
    return max(2, min(budget, max(4, min(hansen, budget // 3))))


def fitness(scores: Mapping[str, float], weights: Mapping[str, float],
            perplexity_penalty: float = 0.0, nll: Optional[float] = None) -> float:
    """sum_m w_m * score_m - perplexity_penalty * nll, nll being the mean negative
    log-likelihood per token (ln perplexity) on the general text. A metric missing from
    `scores` is an error naming it."""
    missing = [m for m in weights if m not in scores]
    if missing:
        raise ValueError(f"the fitness reads {', '.join(missing)}, which the scoring did not "
                         f"produce (it produced {', '.join(sorted(scores))})")
    value = sum(float(w) * float(scores[m]) for m, w in weights.items())
    if perplexity_penalty:
        if nll is None:
            raise ValueError("a perplexity penalty needs the perplexity of the general text")
        value -= float(perplexity_penalty) * float(nll)
    return float(value)


# ------------------------------------------------------------------- per-layer scales
def rescale_merge(base_files: Sequence[Path], merged_files: Sequence[Path], out_dir: Path,
                  scale: Callable[[str], float]) -> dict:
    """theta = theta_base + scale(name) * (theta_merged - theta_base) for every float tensor
    of the merge the base holds (a tensor the base lacks, e.g. a tied head, is copied), into
    out_dir with the merged files' names. Float32 arithmetic, cast back to each tensor's
    dtype; NaN or Inf is an error naming the tensor. Returns {name: scale} of what changed."""
    from ops.task_vectors import Shards, write_updated

    base = Shards(list(base_files))
    merged = Shards(list(merged_files))
    used: dict[str, float] = {}

    def delta(name: str):
        if name not in base or not merged.is_float(name):
            return None
        s = float(scale(name))
        if s == 1.0:
            return None
        used[name] = s
        theta = merged.get(name).float()
        return (s - 1.0) * (theta - base.get(name).float())

    write_updated(list(merged_files), Path(out_dir), delta)
    return used
