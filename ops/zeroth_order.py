"""Zeroth-order fine-tuning: MeZO, SGD on a gradient estimated from two forward passes.

"Fine-Tuning Language Models with Just Forward Passes" (Malladi et al., 2023),
https://arxiv.org/abs/2305.17333 . One step, for a random direction z ~ N(0, I) drawn from a
seed:

    g = (L(θ + εz) - L(θ - εz)) / (2ε)      # the projected gradient, a scalar
    θ ← θ - lr · (g · z + weight_decay · θ)

z is never stored: every pass over the parameters regenerates it from the seed, one parameter
tensor at a time, so the step needs the memory of inference plus one parameter-sized buffer
(in-place perturb-and-restore, the paper's Algorithm 1). No autograd graph is built and no
`.grad` is allocated. With `seeds` of more than one direction, the projected gradients are
averaged (n-SPSA, the paper's Appendix).

Pure functions on a model or a list of (name, parameter) pairs; nothing here reads files.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Params = Sequence[tuple[str, torch.Tensor]]

# The paper leaves biases and layer norms out of the weight decay (its MeZO trainer does).
NO_DECAY = ("bias", "norm", "layernorm", "ln_")


def trainable_parameters(model) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of every parameter with requires_grad, in a fixed order: the order z
    is drawn in, so the same seed gives the same direction on every pass."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _directions(params: Params, seed: int):
    """Yield (name, parameter, z) with z ~ N(0, I) shaped like the parameter, drawn from `seed`
    in the parameters' order; one z tensor lives at a time."""
    generators: dict = {}
    for name, p in params:
        g = generators.get(p.device)
        if g is None:
            g = generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        # drawn in float32 and cast, so a bf16 model sees the same direction as a float32 one
        z = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
        yield name, p, z.to(p.dtype)


@torch.no_grad()
def perturb_(params: Params, seed: int, scale: float) -> None:
    """θ ← θ + scale · z(seed), in place."""
    for _, p, z in _directions(params, seed):
        p.add_(z, alpha=scale)


@torch.no_grad()
def projected_gradient(loss_fn: Callable[[], torch.Tensor], params: Params, seed: int,
                       eps: float) -> tuple[float, float]:
    """(g, loss): the two-point estimate along z(seed), and the mean of the two losses.
    Perturbs θ by +εz, then -2εz, then +εz again: θ comes back to itself up to float
    rounding (the restore is the same z, regenerated)."""
    perturb_(params, seed, eps)
    plus = float(loss_fn())
    perturb_(params, seed, -2 * eps)
    minus = float(loss_fn())
    perturb_(params, seed, eps)
    return (plus - minus) / (2 * eps), (plus + minus) / 2


@torch.no_grad()
def update_(params: Params, seed: int, projected_grad: float, lr: float,
            weight_decay: float = 0.0) -> None:
    """θ ← θ - lr · (g · z(seed) + weight_decay · θ), decay skipping biases and norms."""
    for name, p, z in _directions(params, seed):
        if weight_decay and not any(k in name.lower() for k in NO_DECAY):
            p.mul_(1 - lr * weight_decay)
        p.add_(z, alpha=-lr * projected_grad)


@torch.no_grad()
def mezo_step(loss_fn: Callable[[], torch.Tensor], params: Params, seeds: Sequence[int],
              eps: float, lr: float, weight_decay: float = 0.0) -> dict:
    """One MeZO step with one direction per seed (their estimates averaged: all the losses are
    measured at θ before any update, then each direction is applied with g_i / n).
    Returns {"loss": mean loss at the perturbed points, "projected_grad": mean |g|}."""
    grads, losses = [], []
    for seed in seeds:
        g, loss = projected_gradient(loss_fn, params, seed, eps)
        grads.append(g)
        losses.append(loss)
    n = len(seeds)
    for i, (seed, g) in enumerate(zip(seeds, grads)):
        update_(params, seed, g / n, lr, weight_decay if i == 0 else 0.0)
    return {"loss": sum(losses) / n, "projected_grad": sum(abs(g) for g in grads) / n}


@torch.no_grad()
def gradient_estimate(loss_fn: Callable[[], torch.Tensor], params: Params,
                      seeds: Sequence[int], eps: float) -> dict[str, torch.Tensor]:
    """The averaged estimate (1/n) Σ g_i z_i as tensors per parameter name: what MeZO's
    update follows, materialised (for analysis and tests; a step never builds it)."""
    out = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params}
    for seed in seeds:
        g, _ = projected_gradient(loss_fn, params, seed, eps)
        for name, _, z in _directions(params, seed):
            out[name].add_(z.float(), alpha=g / len(seeds))
    return out


def step_seeds(base_seed: int, step: int, samples: int) -> list[int]:
    """The seeds of optimizer step `step`: a function of the run's seed and the step only, so
    a resumed run draws the same directions as an uninterrupted one."""
    return [(base_seed * 1_000_003 + step * 64 + i) % (2 ** 62) for i in range(samples)]
