"""LESS: choose the training examples whose gradients point where a few target examples'
gradients point.

"LESS: Selecting Influential Data for Targeted Instruction Tuning", Xia, Malladi, Gururangan,
Arora and Chen, ICML 2024, https://arxiv.org/abs/2402.04333 (code: princeton-nlp/LESS). As the
paper does it (section 3 and 4):

1. `warmup_lora`: train a LoRA on a small random part of the candidate pool (5%, 4 epochs in
   the paper) and keep, at N checkpoints (one per epoch there), the LoRA weights, AdamW's
   first and second moment estimates, and the average learning rate of the steps since the
   previous checkpoint (eta_i).
2. `less_scores`: at each checkpoint, the gradient of each example's own loss (batch size
   1, mean over its learned tokens) with respect to the LoRA parameters only. A candidate's
   feature is the update Adam would make from that gradient, m_hat / (sqrt(v_hat) + eps), with
   m and v advanced one step from the checkpoint's moments (`adam_feature`, the paper's Eq.
   2); a target's feature is its plain gradient (its loss is what the step should lower).
3. Both are projected to d dimensions by one seeded random matrix (`RandomProjection`;
   Johnson-Lindenstrauss, TRAK's Rademacher projector in the paper's code) and normalised;
   a candidate's score at a checkpoint is its mean cosine to the targets' features, and its
   score is the sum over checkpoints weighted by eta_i (Eq. 4; weights here sum to 1).
4. The top-scoring fraction (5%) is kept (`top_fraction`).

Scores are computed streaming, a batch of candidates at a time, so neither the pool's
gradients nor their projections are ever held whole: memory is the model, the targets'
features (m, d), one batch of flattened gradients (B, D) and one block of the projection
(block_rows, d). D is the number of LoRA parameters. Everything is float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

IGNORE = -100                   # label id the loss skips (as ops/training.py)
ADAM_BETAS = (0.9, 0.999)       # the warm-up optimizer's (transformers' and the paper's)
ADAM_EPS = 1e-8


class LessError(ValueError):
    """A selection request that does not fit the data or the model; names the setting."""


# ------------------------------------------------------------------------------ warm-up
@dataclass
class WarmupCheckpoint:
    """The LoRA and its optimizer at one warm-up checkpoint. Tensors are float32 on the
    model's device; `exp_avg` and `exp_avg_sq` are AdamW's moments flattened in the order of
    `trainable_parameters(model)`, shape (D,)."""

    step: int                          # optimizer steps taken when it was kept
    weights: dict[str, torch.Tensor]   # parameter name -> value
    exp_avg: torch.Tensor              # (D,)
    exp_avg_sq: torch.Tensor           # (D,)
    learning_rate: float               # mean learning rate of the steps since the last one
    loss: float                        # mean warm-up loss over those steps
    betas: tuple[float, float] = ADAM_BETAS
    eps: float = ADAM_EPS


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter with requires_grad, in the model's order: the
    order of every flattened (D,) vector here."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def linear_schedule(step: int, total: int, warmup: int, peak: float) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up over `warmup`
    steps, then linear decay to 0 at `total` (transformers' "linear", the paper's)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def checkpoint_steps(total_steps: int, count: int) -> list[int]:
    """`count` checkpoints evenly over `total_steps` optimizer steps, the last at the end
    (with one per epoch: each epoch's end)."""
    if not 1 <= count <= total_steps:
        raise LessError(f"checkpoints: got {count}; expected 1 to {total_steps} (the warm-up "
                        f"has {total_steps} optimizer steps)")
    return [round(total_steps * (i + 1) / count) for i in range(count)]


def warmup_lora(model, batches: Iterable[dict], total_steps: int, learning_rate: float,
                keep_at: Sequence[int], *, warmup_ratio: float = 0.03,
                weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                on_step: Optional[Callable[[int, float], None]] = None
                ) -> list[WarmupCheckpoint]:
    """Train the model's trainable parameters (the LoRA) with AdamW for `total_steps` steps,
    one per batch ({"input_ids", "labels", "attention_mask"}, (B, L) long), on the linear
    schedule; return a WarmupCheckpoint after each step in `keep_at`.

    By hand rather than through transformers' Trainer: the moments of the optimizer at each
    checkpoint are the method's input, and a loop of this size keeps them in memory instead
    of in optimizer.pt files to read back."""
    params = trainable_parameters(model)
    if not params:
        raise LessError("the model has no trainable parameters (wrap it in a LoRA first)")
    keep = sorted(set(keep_at))
    if not keep or keep[0] < 1 or keep[-1] > total_steps:
        raise LessError(f"checkpoints: steps {keep} must lie in 1..{total_steps}")
    optimizer = torch.optim.AdamW([p for _, p in params], lr=learning_rate, betas=ADAM_BETAS,
                                  eps=ADAM_EPS, weight_decay=weight_decay)
    warmup = math.ceil(total_steps * warmup_ratio)
    model.train()
    kept: list[WarmupCheckpoint] = []
    lrs: list[float] = []
    losses: list[float] = []
    step = 0
    for batch in batches:
        if step >= total_steps:
            break
        lr = linear_schedule(step, total_steps, warmup, learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise LessError(f"warm-up step {step + 1}: the loss is {loss.item()} (a batch "
                            f"without learned tokens, or a diverging learning_rate)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for _, p in params], max_grad_norm)
        optimizer.step()
        step += 1
        lrs.append(lr)
        losses.append(loss.item())
        if on_step:
            on_step(step, loss.item())
        if step in keep:
            kept.append(_snapshot(params, optimizer, step, sum(lrs) / len(lrs),
                                  sum(losses) / len(losses)))
            lrs, losses = [], []
    if step < total_steps:
        raise LessError(f"the warm-up data gave {step} batches; {total_steps} were needed")
    model.eval()
    return kept


def _snapshot(params, optimizer, step: int, lr: float, loss: float) -> WarmupCheckpoint:
    state = [optimizer.state[p] for _, p in params]
    group = optimizer.param_groups[0]
    return WarmupCheckpoint(
        step=step, weights={n: p.detach().float().clone() for n, p in params},
        exp_avg=torch.cat([s["exp_avg"].detach().float().reshape(-1) for s in state]),
        exp_avg_sq=torch.cat([s["exp_avg_sq"].detach().float().reshape(-1) for s in state]),
        learning_rate=lr, loss=loss, betas=tuple(group["betas"]), eps=group["eps"])


def load_checkpoint(model, checkpoint: WarmupCheckpoint) -> None:
    """Put a checkpoint's LoRA weights back into the model."""
    with torch.no_grad():
        for name, p in trainable_parameters(model):
            p.copy_(checkpoint.weights[name])


def checkpoint_weights(learning_rates: Sequence[float]) -> list[float]:
    """eta_i / sum(eta): each checkpoint's weight in the score, its segment's mean learning
    rate (the paper's Eq. 4 weighs by it; dividing by the sum only rescales the scores)."""
    total = float(sum(learning_rates))
    if total <= 0:
        return [1.0 / len(learning_rates)] * len(learning_rates)
    return [float(lr) / total for lr in learning_rates]


# ---------------------------------------------------------------------- gradient features
def has_loss(example: dict) -> bool:
    """Whether an example has a learned token (a label other than -100)."""
    return any(int(t) != IGNORE for t in example["labels"][1:])


def example_gradient(model, params, example: dict) -> torch.Tensor:
    """The gradient of one example's loss (mean over its learned tokens) with respect to
    `params`, flattened: (D,) float32. `example` holds "input_ids" and "labels" (lists or
    1-D tensors). Batch size 1, as the paper's code: no padding enters the loss.

    A loop rather than torch.func's vmap over the batch: a transformers model's attention
    mask code branches on tensor values, which vmap refuses."""
    device = params[0][1].device
    ids = torch.as_tensor(example["input_ids"], dtype=torch.long, device=device)[None]
    labels = torch.as_tensor(example["labels"], dtype=torch.long, device=device)[None]
    for _, p in params:
        p.grad = None
    loss = model(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids)).loss
    loss.backward()
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
             for _, p in params]
    for _, p in params:
        p.grad = None
    return torch.cat(grads)


def adam_feature(grads: torch.Tensor, checkpoint: WarmupCheckpoint) -> torch.Tensor:
    """Gamma(z) = m_hat / (sqrt(v_hat) + eps), the paper's Eq. 2: the direction AdamW would
    step from the checkpoint if its next batch were z alone. m = b1 m_t + (1 - b1) g,
    v = b2 v_t + (1 - b2) g^2, bias-corrected for step t + 1. (The paper's code leaves out the
    bias correction and puts eps inside the root; neither changes a cosine noticeably.)
    grads: (B, D) float32 -> (B, D) float32."""
    b1, b2 = checkpoint.betas
    t = checkpoint.step + 1
    m = b1 * checkpoint.exp_avg + (1 - b1) * grads
    v = b2 * checkpoint.exp_avg_sq + (1 - b2) * grads.square()
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return m_hat / (v_hat.sqrt() + checkpoint.eps)


class RandomProjection:
    """x (n, D) -> x @ R / sqrt(d), R a (D, d) matrix of independent +-1 (rademacher) or
    N(0, 1) (gaussian) entries: inner products kept up to about 1/sqrt(d) relative error
    (Johnson-Lindenstrauss).

    R is never needed whole: rows [b * block_rows, (b + 1) * block_rows) are drawn from a
    generator seeded by (seed, b), so R depends only on (dim_in, dim_out, seed, kind,
    block_rows), whatever the batch or device, and a projection runs one block at a time in
    block_rows * dim_out floats. The blocks are kept for reuse when all of R fits in
    `cache_bytes`, and drawn again for each call otherwise."""

    def __init__(self, dim_in: int, dim_out: int, seed: int = 0, kind: str = "rademacher",
                 block_rows: int = 8192, cache_bytes: int = 1 << 30, device: str = "cpu"):
        if kind not in ("rademacher", "gaussian"):
            raise LessError(f"projection: got {kind!r}; expected rademacher or gaussian")
        if dim_in < 1 or dim_out < 1 or block_rows < 1:
            raise LessError(f"projection: dimensions must be positive (got {dim_in} -> "
                            f"{dim_out}, blocks of {block_rows})")
        self.dim_in, self.dim_out, self.seed, self.kind = dim_in, dim_out, seed, kind
        self.block_rows, self.device = block_rows, torch.device(device)
        self.cache: Optional[dict[int, torch.Tensor]] = \
            {} if dim_in * dim_out * 4 <= cache_bytes else None

    def block(self, b: int) -> torch.Tensor:
        """Rows [b * block_rows, ...) of R: (rows, dim_out) float32, unscaled."""
        if self.cache is not None and b in self.cache:
            return self.cache[b]
        rows = min(self.block_rows, self.dim_in - b * self.block_rows)
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.seed * 1_000_003 + b) % (1 << 63))
        if self.kind == "rademacher":
            out = torch.randint(0, 2, (rows, self.dim_out), generator=gen, device=self.device,
                                dtype=torch.float32).mul_(2).sub_(1)
        else:
            out = torch.randn((rows, self.dim_out), generator=gen, device=self.device,
                              dtype=torch.float32)
        if self.cache is not None:
            self.cache[b] = out
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, dim_in) float32 -> (n, dim_out) float32."""
        if x.shape[-1] != self.dim_in:
            raise LessError(f"projection: got vectors of {x.shape[-1]} values; expected "
                            f"{self.dim_in}")
        x = x.to(self.device, torch.float32)
        out = torch.zeros((x.shape[0], self.dim_out), dtype=torch.float32, device=self.device)
        for b in range(math.ceil(self.dim_in / self.block_rows)):
            start = b * self.block_rows
            out += x[:, start:start + self.block_rows] @ self.block(b)
        return out / math.sqrt(self.dim_out)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-20)


def features(model, examples: Sequence[dict], checkpoint: Optional[WarmupCheckpoint] = None,
             projection: Optional[RandomProjection] = None, batch_size: int = 16,
             on_example: Optional[Callable[[], None]] = None):
    """Yield (start, (B, d) float32) unit-length gradient features of `examples`, a batch at
    a time: Adam features when `checkpoint` is given (candidates), plain gradients when not
    (targets); projected when `projection` is given, else d = D."""
    params = trainable_parameters(model)
    for start in range(0, len(examples), batch_size):
        rows = []
        for example in examples[start:start + batch_size]:
            rows.append(example_gradient(model, params, example))
            if on_example:
                on_example()
        grads = torch.stack(rows)                      # (B, D)
        if checkpoint is not None:
            grads = adam_feature(grads, checkpoint)
        if projection is not None:
            grads = projection(grads)                  # (B, d)
        yield start, _normalise(grads)


def less_scores(model, candidates: Sequence[dict], targets: Sequence[dict],
                checkpoints: Sequence[WarmupCheckpoint],
                projection: Optional[RandomProjection] = None, batch_size: int = 16,
                on_example: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Each candidate's LESS score: sum over checkpoints i of w_i * mean over targets of
    cos(P Gamma_i(candidate), P grad_i(target)), w from `checkpoint_weights`. Returns (n,)
    float64; a candidate without a learned token (nothing to learn from) scores -inf.
    `on_example` is called once per gradient taken ((n + m) per checkpoint)."""
    if not targets:
        raise LessError("targets: no examples")
    if not all(has_loss(t) for t in targets):
        bad = next(i for i, t in enumerate(targets) if not has_loss(t))
        raise LessError(f"targets: row {bad} has no learned token (its completion is empty "
                        f"or cut by max_length)")
    learnable = torch.tensor([has_loss(c) for c in candidates], dtype=torch.bool)
    scores = torch.zeros(len(candidates), dtype=torch.float64)
    if projection is not None and projection.cache is None:
        # R is drawn again for every batch when it is too big to keep: batches of up to
        # 256 MiB of gradients draw it that many times fewer
        batch_size = max(batch_size, min(1024, (256 << 20) // (4 * projection.dim_in)))
    weights = checkpoint_weights([c.learning_rate for c in checkpoints])
    model.eval()
    for checkpoint, weight in zip(checkpoints, weights):
        load_checkpoint(model, checkpoint)
        target_features = torch.cat([f for _, f in features(
            model, targets, None, projection, batch_size, on_example)])   # (m, d)
        for start, f in features(model, candidates, checkpoint, projection, batch_size,
                                 on_example):
            cos = f @ target_features.T                                   # (B, m)
            scores[start:start + len(f)] += weight * cos.mean(dim=1).double().cpu()
    scores[~learnable | ~torch.isfinite(scores)] = -math.inf  # a NaN would scramble the order
    return scores


def top_fraction(scores: torch.Tensor, fraction: float) -> list[int]:
    """Indices of the round(n * fraction) best scores (at least 1), best first, ties by
    index; -inf scores are never kept."""
    if not 0 < fraction <= 1:
        raise LessError(f"fraction: got {fraction}; expected more than 0 and at most 1")
    keep = max(1, round(len(scores) * fraction))
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return [i for i in order[:keep] if math.isfinite(float(scores[i]))]
