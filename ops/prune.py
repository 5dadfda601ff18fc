"""Pruning of decoder-only transformers: unstructured and N:M masks from magnitude, Wanda or
SparseGPT importance, D-Pruner's domain-specific importance, structured removal of attention
head groups and MLP channels, and a linear mix of general and domain calibration statistics.

References:
- Magnitude pruning: "Learning both Weights and Connections for Efficient Neural Networks",
  https://arxiv.org/abs/1506.02626
- N:M semi-structured sparsity: "Accelerating Sparse Deep Neural Networks" (NVIDIA 2:4),
  https://arxiv.org/abs/2104.08378
- Wanda: "A Simple and Effective Pruning Approach for Large Language Models" (Sun et al.
  2023), https://arxiv.org/abs/2306.11695 ; score |W_ij| * ||X_j||_2, compared per output row.
- SparseGPT: "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
  (Frantar & Alistarh 2023), https://arxiv.org/abs/2301.00774 ; OBS reconstruction with the
  calibration Hessian H = 2 X X^T, processed in column blocks, with dampening.
- Structured pruning, first-order Taylor importance of a group (sum of w * dL/dw, squared):
  "Importance Estimation for Neural Network Pruning" (Molchanov et al. 2019),
  https://arxiv.org/abs/1906.10771 ; applied to LLM head groups and MLP channels as in
  "LLM-Pruner", https://arxiv.org/abs/2305.11627
- D-Pruner: "Pruning as a Domain-specific LLM Extractor" (Zhang et al. 2024),
  https://arxiv.org/abs/2405.06275 , code https://github.com/psunlpgroup/D-Pruner . The
  general importance G of each weight is the error its removal causes on general calibration
  data (the OBS / SparseGPT layer-wise error, `obs_removal_error`); G regularises the domain
  loss, L_total(θ') = L_domain(θ') + λ Σ_m G_m (θ'_m − θ_m)^2; each weight is scored by the
  second-order Taylor estimate of how much L_total changes when it is set to zero, with the
  empirical Fisher for the Hessian (`dpruner_scores`).
- `mixed_statistics` (ours, not from a paper; it is *not* D-Pruner): the per-weight statistics
  of Wanda, SparseGPT or structured Taylor importance are mixed as (1 - w) * general +
  w * domain over the two calibration sets, each normalised to the same scale first.

llmcompressor ships Wanda and SparseGPT modifiers, but its releases pin transformers and
huggingface-hub versions that conflict with ours, so the algorithms are written here from
the papers (and checked against the formulas in tests/test_prune.py).

All masks are boolean with True = pruned (set to zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ops.layers import LayoutError, decoder_layers as layers_of

# model_type -> the layout these ops rely on: model.model.layers[i] with self_attn.{q,k,v,o}_proj
# and mlp.{gate,up,down}_proj (the same family scale_layers supports).
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class PruneError(ValueError):
    """A pruning request that does not fit the model; the message names the setting."""


def check_supported(model) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise PruneError(f"architecture {model_type!r} is not supported for pruning "
                         f"(supported: {', '.join(SUPPORTED)}); nothing was written")


def decoder_layers(model) -> nn.ModuleList:
    try:
        return layers_of(model, "pruning")
    except LayoutError as e:
        raise PruneError(str(e)) from None


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The prunable projections of one decoder layer, by name ('self_attn.q_proj', ...).
    Embeddings and the LM head are never pruned (as in Wanda and SparseGPT)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


# ------------------------------------------------------------------------------------ masks
def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Prune the lowest-scoring weights: floor(sparsity * cols) in every row (per_row), or
    floor(sparsity * numel) in the whole matrix. scores: (out, in) -> bool mask (out, in)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if per_row:
        k = int(scores.shape[1] * sparsity)
        if k:
            mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    else:
        k = int(scores.numel() * sparsity)
        if k:
            mask.view(-1)[torch.topk(scores.reshape(-1), k, largest=False).indices] = True
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in every group of m consecutive inputs of a row, prune the m - n lowest."""
    rows, cols = scores.shape
    if not 0 < n < m:
        raise PruneError(f"pattern {n}:{m}: need 0 < N < M (N kept of every M)")
    if cols % m:
        raise PruneError(f"pattern {n}:{m} needs the input width to be a multiple of {m}, "
                         f"got a layer with {cols} inputs")
    groups = scores.reshape(rows, cols // m, m)  # (out, in/m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all matrices: exactly floor(sparsity * total) weights pruned.
    Holds every score at once (4 bytes per weight on the scores' device)."""
    k = int(sum(s.numel() for s in scores.values()) * sparsity)
    return global_topk_masks(scores, list(scores), k, largest=False)


def global_topk_masks(scores: dict[str, torch.Tensor], names: list[str], k: int,
                      largest: bool) -> dict[str, torch.Tensor]:
    """Bool masks (each tensor's shape) of the k largest (or smallest) scores over all the
    tensors together, concatenated in `names` order (which decides equal scores). Holds
    every score at once (4 bytes an entry, on the scores' device)."""
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k:
        mask[torch.topk(flat, k, largest=largest, sorted=False).indices] = True
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = mask[start:start + size].view(scores[n].shape)
        start += size
    return out


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2. weight: (out, in); input_sq_sum: (in,) sum over calibration tokens of
    x_j^2, so its square root is the column norm of X (tokens, in)."""
    return weight.detach().abs().float() * input_sq_sum.float().sqrt().unsqueeze(0)


# -------------------------------------------------------------------------------- sparsegpt
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5,
                    nm: tuple[int, int] | None = None, block_size: int = 128,
                    dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's pruning with reconstruction, Algorithm 1 of the paper.

    weight: (out, in); hessian: (in, in) = 2 X^T X / tokens over the calibration inputs
    (float32). Columns are processed left to right in blocks of `block_size`: within a block,
    the mask is chosen by w^2 / [H^-1]_jj^2, and each pruned column's error is propagated into
    the not-yet-processed columns through the Cholesky factor of H^-1. Unstructured: the
    block's share of floor(sparsity * numel) (cumulative rounding, so the layer total is
    exact); N:M: chosen per group of m columns as the sweep reaches it.
    Returns (new weight in float32, mask)."""
    W = weight.detach().clone().float()  # (out, in)
    H = hessian.detach().clone().float()  # (in, in)
    rows, cols = W.shape
    if nm is not None and (cols % nm[1] or block_size % nm[1]):
        raise PruneError(f"pattern {nm[0]}:{nm[1]} needs the input width ({cols}) and "
                         f"block_size ({block_size}) to be multiples of {nm[1]}")
    dead = torch.diag(H) == 0  # inputs that were never active: nothing to reconstruct
    H[dead, dead] = 1
    W[:, dead] = 0
    H += dampening * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    try:
        Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
        Hinv = torch.linalg.cholesky(Hinv, upper=True)  # (in, in), upper triangular
    except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise PruneError(f"the calibration Hessian is not positive definite ({exc}); raise "
                         f"dampening or use more calibration samples") from None
    mask = torch.zeros_like(W, dtype=torch.bool)
    target, pruned = int(W.numel() * sparsity), 0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (out, b)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        d1 = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            k = int(target * i2 / cols) - pruned if i2 < cols else target - pruned
            if k > 0:
                tmp = W1 ** 2 / d1.unsqueeze(0) ** 2
                mask1.view(-1)[torch.topk(tmp.reshape(-1), k, largest=False).indices] = True
                pruned += k
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                tmp = W1[:, i:i + m] ** 2 / d1[i:i + m].unsqueeze(0) ** 2  # (out, m)
                mask1.scatter_(1, i + torch.topk(tmp, m - n, dim=1, largest=False).indices,
                               True)
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d1[i]  # (out,)
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W[mask] = 0  # exact zeros, whatever rounding the updates left
    return W, mask


# ---------------------------------------------------------------------- calibration statistics
@dataclass
class InputStats:
    """Running statistics of one linear layer's inputs X (tokens, in) over calibration data."""

    tokens: int = 0
    sq_sum: torch.Tensor | None = None  # (in,) float32: sum of x_j^2 (Wanda)
    xtx: torch.Tensor | None = None  # (in, in) float32: sum of x x^T (SparseGPT)

    def add(self, x: torch.Tensor, hessian: bool) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.tokens += x.shape[0]
        sq = (x * x).sum(0)
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        if hessian:
            xtx = x.T @ x
            self.xtx = xtx if self.xtx is None else self.xtx + xtx

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / tokens, the Hessian of the layer-wise squared reconstruction error."""
        return 2 * self.xtx / max(1, self.tokens)


def mix_stats(general: InputStats, domain: InputStats | None, weight: float) -> InputStats:
    """The `mixed_statistics` option (ours; not D-Pruner, see `dpruner_scores`):
    (1 - weight) * general + weight * domain, each as a per-token average first, so a larger
    calibration set does not dominate by size."""
    if domain is None or weight == 0:
        return general
    g, d = max(1, general.tokens), max(1, domain.tokens)
    out = InputStats(tokens=1)
    out.sq_sum = (1 - weight) * general.sq_sum / g + weight * domain.sq_sum / d
    if general.xtx is not None and domain.xtx is not None:
        out.xtx = (1 - weight) * general.xtx / g + weight * domain.xtx / d
    return out


class _Captured(Exception):
    pass


@torch.no_grad()
def layer_inputs(model, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """The hidden states entering decoder layer 0 for each batch of token ids (B, T), and the
    keyword arguments the model passes to its layers (rotary embeddings, mask, positions).
    The forward stops at layer 0, so nothing past the embeddings runs. All batches must have
    the same shape (the keyword arguments are shared)."""
    device = next(model.parameters()).device
    hidden, kwargs_seen = [], {}

    def catch(module, args, kwargs):
        hidden.append(args[0] if args else kwargs["hidden_states"])
        kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    kwargs_seen["use_cache"] = False
    kwargs_seen.pop("past_key_values", None)
    return hidden, kwargs_seen


def _run_layer(layer, hidden: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    out = []
    for h in hidden:
        y = layer(h, **kwargs)
        out.append(y[0] if isinstance(y, tuple) else y)
    return out


@torch.no_grad()
def collect_stats(layer, hidden: list[torch.Tensor], kwargs: dict,
                  hessian: bool) -> dict[str, InputStats]:
    """Input statistics of every linear in `layer`, from one pass of `hidden` through it."""
    stats = {name: InputStats() for name in layer_linears(layer)}
    handles = []
    for name, module in layer_linears(layer).items():
        def hook(mod, args, name=name):
            stats[name].add(args[0], hessian)
        handles.append(module.register_forward_pre_hook(hook))
    try:
        _run_layer(layer, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats


# ------------------------------------------------------------------------------ the pruner
@dataclass
class PruneResult:
    per_layer: list[float]  # sparsity of each decoder layer's linears
    per_module: dict[str, float]  # "layers.3.mlp.down_proj" -> sparsity
    pruned: int  # weights set to zero by the masks
    total: int  # weights in the prunable linears
    reconstruction_error: dict[str, float] = field(default_factory=dict)  # sparsegpt only

    @property
    def sparsity(self) -> float:
        return self.pruned / max(1, self.total)


@torch.no_grad()
def prune_unstructured(model, method: str, sparsity: float = 0.5,
                       pattern: tuple[int, int] | None = None, scope: str = "layer",
                       general: list[torch.Tensor] | None = None,
                       domain: list[torch.Tensor] | None = None, domain_weight: float = 0.0,
                       block_size: int = 128, dampening: float = 0.01,
                       progress: Callable[[int, int], None] | None = None) -> PruneResult:
    """Prune every decoder linear of `model` in place.

    method: 'magnitude' (no data), 'wanda' or 'sparsegpt' (calibration batches `general`,
    each (B, T) token ids, optionally mixed with `domain` batches by `domain_weight`: the
    `mixed_statistics` option, `mix_stats`).
    pattern: (n, m) for N:M, which replaces `sparsity` and `scope`. scope: 'row' (per output
    row), 'layer' (per matrix) or 'global' (one threshold over all matrices; magnitude only).
    Data-aware methods go layer by layer (the Wanda and SparseGPT recipe): the calibration
    hidden states enter layer l, its statistics are taken, it is pruned, and its *pruned*
    outputs feed layer l + 1. Only one layer's activations are held at a time.
    """
    check_supported(model)
    if method not in ("magnitude", "wanda", "sparsegpt"):
        raise PruneError(f"unknown method {method!r}")
    if scope == "global" and method != "magnitude":
        raise PruneError(f"scope 'global' is for magnitude pruning; {method} compares weights "
                         f"within a {'row' if method == 'wanda' else 'layer'}")
    layers = decoder_layers(model)
    per_module, pruned_count, total, errors = {}, 0, 0, {}

    def apply(prefix: str, module: nn.Linear, mask: torch.Tensor, new_weight=None):
        nonlocal pruned_count, total
        if new_weight is not None:
            module.weight.copy_(new_weight.to(module.weight.dtype))
        module.weight[mask.to(module.weight.device)] = 0
        per_module[prefix] = mask.float().mean().item()
        pruned_count += int(mask.sum())
        total += mask.numel()

    def choose(scores: torch.Tensor) -> torch.Tensor:
        if pattern is not None:
            return nm_mask(scores, *pattern)
        return unstructured_mask(scores, sparsity, per_row=(scope == "row"))

    if method == "magnitude":
        all_scores = {f"layers.{i}.{name}": magnitude_scores(m.weight)
                      for i, layer in enumerate(layers)
                      for name, m in layer_linears(layer).items()}
        masks = global_masks(all_scores, sparsity) if scope == "global" and pattern is None \
            else {k: choose(v) for k, v in all_scores.items()}
        for i, layer in enumerate(layers):
            for name, m in layer_linears(layer).items():
                apply(f"layers.{i}.{name}", m, masks[f"layers.{i}.{name}"])
            if progress:
                progress(i + 1, len(layers))
    else:
        if not general:
            raise PruneError(f"{method} needs calibration data")
        hessian = method == "sparsegpt"
        h_gen, kwargs = layer_inputs(model, general)
        h_dom = layer_inputs(model, domain)[0] if domain else None
        for i, layer in enumerate(layers):
            stats = collect_stats(layer, h_gen, kwargs, hessian)
            dom_stats = collect_stats(layer, h_dom, kwargs, hessian) if h_dom else {}
            for name, m in layer_linears(layer).items():
                s = mix_stats(stats[name], dom_stats.get(name), domain_weight)
                key = f"layers.{i}.{name}"
                if method == "wanda":
                    apply(key, m, choose(wanda_scores(m.weight, s.sq_sum)))
                else:
                    H = s.hessian()
                    before = m.weight.detach().float()
                    new, mask = sparsegpt_prune(before, H, sparsity, pattern, block_size,
                                                dampening)
                    errors[key] = reconstruction_error(before, new, H)
                    apply(key, m, mask, new)
            h_gen = _run_layer(layer, h_gen, kwargs)  # the pruned layer feeds the next one
            if h_dom:
                h_dom = _run_layer(layer, h_dom, kwargs)
            if progress:
                progress(i + 1, len(layers))
    per_layer, _ = sparsity_of(model)
    return PruneResult(per_layer=per_layer, per_module=per_module, pruned=pruned_count,
                       total=total, reconstruction_error=errors)


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor,
                         hessian: torch.Tensor) -> float:
    """Layer-wise squared output error ||(W - W') X||^2 per token: tr(D H D^T) / 2 with
    D = W - W' and H = 2 X^T X / tokens."""
    D = (weight.float() - new_weight.float())  # (out, in)
    return float(((D @ hessian.float()) * D).sum() / 2)


def sparsity_of(model) -> tuple[list[float], float]:
    """Measured fraction of exact zeros in each decoder layer's linears, and over all of them."""
    per_layer, zeros, total = [], 0, 0
    for layer in decoder_layers(model):
        z = sum(int((m.weight == 0).sum()) for m in layer_linears(layer).values())
        n = sum(m.weight.numel() for m in layer_linears(layer).values())
        per_layer.append(z / n)
        zeros, total = zeros + z, total + n
    return per_layer, zeros / max(1, total)


# ------------------------------------------------------------------------------- D-Pruner
def obs_removal_error(weight: torch.Tensor, hessian: torch.Tensor,
                      dampening: float = 0.01) -> torch.Tensor:
    """D-Pruner's general importance of each weight: the error its removal causes on the
    general calibration data, as the Optimal Brain Surgeon measures it for a layer (the
    saliency SparseGPT ranks by): G_ij = w_ij^2 / (2 [H^-1]_jj), the rise of the layer's
    squared output error per token, ||(W - W') X||^2 / tokens, when w_ij is set to zero and
    the other weights of row i are re-fitted optimally.

    weight: (out, in); hessian: (in, in) = 2 X^T X / tokens (float32), dampened like
    `sparsegpt_prune` (dampening * mean(diag H) on the diagonal; 0 for the exact value).
    Inputs that were never active cost nothing to remove: G = 0 there. -> (out, in) float32."""
    W = weight.detach().float()
    H = hessian.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    if dampening:
        H += dampening * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], device=H.device)
    try:
        hinv_diag = torch.diag(torch.cholesky_inverse(torch.linalg.cholesky(H)))  # (in,)
    except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise PruneError(f"the general calibration Hessian is not positive definite ({exc}); "
                         f"raise dampening or use more calibration samples") from None
    G = W ** 2 / (2 * hinv_diag.unsqueeze(0))
    G[:, dead] = 0
    return G


@torch.no_grad()
def general_importance(model, batches: list[torch.Tensor],
                       dampening: float = 0.01) -> dict[str, torch.Tensor]:
    """`obs_removal_error` of every decoder linear on the general calibration batches (each
    (B, T) token ids), keyed 'layers.{i}.{name}'. Goes layer by layer on the dense model:
    each layer's Hessian comes from the inputs the dense layers before it produce. Holds one
    float32 score per prunable weight."""
    h, kwargs = layer_inputs(model, batches)
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        stats = collect_stats(layer, h, kwargs, hessian=True)
        for name, m in layer_linears(layer).items():
            out[f"layers.{i}.{name}"] = obs_removal_error(m.weight, stats[name].hessian(),
                                                          dampening)
        h = _run_layer(layer, h, kwargs)
    return out


def dpruner_scores(params: dict[str, torch.Tensor], loss_of: Callable[[object], torch.Tensor],
                   batches: list, general: dict[str, torch.Tensor], lam: float,
                   learning_rate: float = 0.0) -> dict[str, torch.Tensor]:
    """D-Pruner's dual-pruning importance of each weight in `params` (name -> the weight
    tensor of the model `loss_of` runs), over the domain calibration `batches`.

    The domain objective, regularised by the general importance `general` (name -> G, the
    weight's shape; see `obs_removal_error`) around the original weights θ:
        L_total(θ') = L_domain(θ') + lam * Σ_m G_m (θ'_m - θ_m)^2.
    For each batch, at the current θ' (with d = θ' - θ), the change of L_total when θ'_m is
    set to zero, to second order, with the empirical Fisher (the squared batch gradient g^2)
    for the Hessian of L_domain:
        ΔL_m = -(g_m + 2 lam G_m d_m) θ'_m + ½ g_m^2 θ'_m^2 + lam G_m θ'_m^2
    (the regulariser is quadratic, so its part is exact). The score is Σ over batches of
    |ΔL_m|. At lam = 0 it is the domain-only Taylor score Σ |g θ - ½ g^2 θ^2|.
    learning_rate > 0 also takes a plain gradient step on L_total after each batch (the paper
    scores while fine-tuning on the domain data); the weights are restored afterwards, so
    the model comes back unchanged either way.

    Holds the gradients and one float32 score per weight (and a copy of θ when
    learning_rate > 0). -> {name: (same shape) float32 scores}."""
    names = list(params)
    tensors = [params[n] for n in names]
    was = [t.requires_grad for t in tensors]
    original = [t.detach().clone() for t in tensors] if learning_rate else None
    acc = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    try:
        for t in tensors:
            t.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(loss_of(batch), tensors)
            with torch.no_grad():
                for k, (n, t, g) in enumerate(zip(names, tensors, grads)):
                    w, g = t.detach().float(), g.float()
                    G = general[n].to(w.device)
                    d = w - original[k].float() if original is not None else 0
                    grad_total = g + 2 * lam * G * d  # (out, in): dL_total / dθ'
                    change = -grad_total * w + 0.5 * g ** 2 * w ** 2 + lam * G * w ** 2
                    acc[n] += change.abs()
                    if learning_rate:
                        t.sub_((learning_rate * grad_total).to(t.dtype))
    finally:
        with torch.no_grad():
            for k, t in enumerate(tensors):
                if original is not None:
                    t.copy_(original[k])
                t.requires_grad_(was[k])
    return acc


def prune_dpruner(model, general: list[torch.Tensor], domain: list[torch.Tensor],
                  sparsity: float = 0.5, lam: float = 1.0, learning_rate: float = 0.0,
                  pattern: tuple[int, int] | None = None, scope: str = "layer",
                  dampening: float = 0.01,
                  progress: Callable[[int, int], None] | None = None) -> PruneResult:
    """D-Pruner on a decoder-only model, in place: `general_importance` on the `general`
    batches, `dpruner_scores` of the decoder linears on the `domain` batches (each (B, T)
    token ids; the loss is the model's next-token loss), then the lowest scores are zeroed
    per matrix (scope 'layer', as the paper's code does), per output row ('row') or N:M
    (`pattern`). The mask is applied to the original weights."""
    check_supported(model)
    if not general or not domain:
        raise PruneError("dpruner needs general (calibration_file) and domain (domain_file) "
                         "calibration data")
    if scope not in ("row", "layer"):
        raise PruneError(f"dpruner compares weights within a row or a layer, not {scope!r}")
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    G = general_importance(model, general, dampening)
    if progress:
        progress(1, 3)
    linears = {f"layers.{i}.{name}": m for i, layer in enumerate(layers)
               for name, m in layer_linears(layer).items()}
    frozen = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():  # gradients for the decoder linears only
        p.requires_grad_(False)
    try:
        scores = dpruner_scores(
            {k: m.weight for k, m in linears.items()},
            lambda ids: model(input_ids=ids.to(device), labels=ids.to(device),
                              use_cache=False).loss,
            domain, G, lam, learning_rate)
    finally:
        for p in model.parameters():
            p.requires_grad_(frozen[id(p)])
    if progress:
        progress(2, 3)
    per_module, pruned, total = {}, 0, 0
    with torch.no_grad():
        for key, m in linears.items():
            mask = nm_mask(scores[key], *pattern) if pattern is not None else \
                unstructured_mask(scores[key], sparsity, per_row=(scope == "row"))
            m.weight[mask.to(m.weight.device)] = 0
            per_module[key] = mask.float().mean().item()
            pruned += int(mask.sum())
            total += mask.numel()
    if progress:
        progress(3, 3)
    per_layer, _ = sparsity_of(model)
    return PruneResult(per_layer=per_layer, per_module=per_module, pruned=pruned, total=total)


# ------------------------------------------------------------------------------ structured
def attention_shape(model) -> tuple[int, int, int]:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim


def group_rows(group: int, size: int) -> slice:
    return slice(group * size, (group + 1) * size)


def structured_scores(model, importance: str,
                      grads: dict[str, torch.Tensor] | None = None
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Importance of each attention group (a key/value head with the query heads that share it,
    so GQA stays uniform) and each MLP channel, per layer: ([(kv,)], [(intermediate,)]).

    importance 'magnitude': the L2 norm of all weights of the group (q/k/v rows, o columns;
    gate/up rows, down column). 'taylor': (sum over the group of w * dL/dw)^2 with `grads`
    (parameter name -> accumulated score tensor from `taylor_weight_scores`)."""
    heads, kv, hd = attention_shape(model)
    rep = heads // kv
    attn_scores, mlp_scores = [], []
    for i, layer in enumerate(decoder_layers(model)):
        a, mlp = layer.self_attn, layer.mlp

        def w(name: str, module: nn.Linear) -> torch.Tensor:
            if importance == "magnitude":
                return module.weight.detach().float() ** 2
            return grads[f"model.layers.{i}.{name}.weight"]

        q, k, v = w("self_attn.q_proj", a.q_proj), w("self_attn.k_proj", a.k_proj), \
            w("self_attn.v_proj", a.v_proj)
        o = w("self_attn.o_proj", a.o_proj)
        g = torch.stack([q[group_rows(j, rep * hd)].sum() + k[group_rows(j, hd)].sum()
                         + v[group_rows(j, hd)].sum() + o[:, group_rows(j, rep * hd)].sum()
                         for j in range(kv)])
        ch = (w("mlp.gate_proj", mlp.gate_proj).sum(1) + w("mlp.up_proj", mlp.up_proj).sum(1)
              + w("mlp.down_proj", mlp.down_proj).sum(0))
        # magnitude: sqrt of the summed squares (an L2 norm); taylor: the signed group sum of
        # w * dL/dw, squared (the first-order estimate of the loss change, Molchanov et al.)
        g, ch = (g.sqrt(), ch.sqrt()) if importance == "magnitude" else (g ** 2, ch ** 2)
        attn_scores.append(g)
        mlp_scores.append(ch)
    return attn_scores, mlp_scores


def taylor_weight_scores(model, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-weight w * dL/dw summed over the calibration batches, for the decoder linears.
    The group score squares the group's sum (Molchanov et al.): see `structured_scores`.
    Needs a backward pass, so gradients for the whole model are held (once)."""
    device = next(model.parameters()).device
    params = {n: p for n, p in model.named_parameters()
              if n.startswith("model.layers.") and n.endswith("_proj.weight")}
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    try:
        for ids in batches:
            ids = ids.to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, list(params.values()))
            for (n, p), g in zip(params.items(), grads):
                acc[n] += (p.detach().float() * g.float())
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
    return acc


def normalise(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's scores divided by their mean, so two calibration sets mix on one scale."""
    return [s / s.mean().clamp_min(1e-12) for s in scores]


@torch.no_grad()
def remove_structures(model, keep_groups: list[list[int]], keep_channels: list[list[int]]
                      ) -> None:
    """Shrink the model in place: keep only `keep_groups[l]` attention groups and
    `keep_channels[l]` MLP channels of layer l. Every layer must keep the same counts (the HF
    config has one head count and one intermediate_size). head_dim is written into the config
    explicitly, since it no longer equals hidden_size / num_attention_heads."""
    check_supported(model)
    heads, kv, hd = attention_shape(model)
    rep = heads // kv
    n_groups = {len(g) for g in keep_groups}
    n_channels = {len(c) for c in keep_channels}
    if len(n_groups) != 1 or len(n_channels) != 1:
        raise PruneError("every layer must keep the same number of head groups and channels")
    new_kv, new_inter = n_groups.pop(), n_channels.pop()
    if new_kv < 1 or new_inter < 1:
        raise PruneError("structured pruning must keep at least one head group and one "
                         "MLP channel per layer")
    # The config must still validate (transformers' LlamaConfig, for one, requires hidden_size
    # to be a multiple of the head count even with an explicit head_dim): check before any
    # weight is touched.
    candidate = model.config.to_dict()
    candidate.update(head_dim=hd, num_attention_heads=new_kv * rep, num_key_value_heads=new_kv,
                     intermediate_size=new_inter)
    try:
        type(model.config).from_dict(candidate)
    except Exception as exc:  # transformers raises its own validation error types
        allowed = [g for g in range(1, kv + 1) if model.config.hidden_size % (g * rep) == 0]
        reason = str(exc).strip().splitlines()[-1].strip()
        raise PruneError(f"keeping {new_kv} of {kv} attention groups ({new_kv * rep} heads) "
                         f"gives a config transformers refuses ({reason}); groups that may be "
                         f"kept: {allowed}") from None
    for layer, groups, channels in zip(decoder_layers(model), keep_groups, keep_channels):
        a, mlp = layer.self_attn, layer.mlp
        q_idx = torch.cat([torch.arange(g * rep * hd, (g + 1) * rep * hd) for g in groups])
        kv_idx = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups])
        a.q_proj = _rows(a.q_proj, q_idx)
        a.k_proj = _rows(a.k_proj, kv_idx)
        a.v_proj = _rows(a.v_proj, kv_idx)
        a.o_proj = _cols(a.o_proj, q_idx)
        ch = torch.tensor(sorted(channels))
        mlp.gate_proj = _rows(mlp.gate_proj, ch)
        mlp.up_proj = _rows(mlp.up_proj, ch)
        mlp.down_proj = _cols(mlp.down_proj, ch)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = new_inter
    cfg = model.config
    cfg.head_dim = hd
    cfg.num_attention_heads = new_kv * rep
    cfg.num_key_value_heads = new_kv
    cfg.intermediate_size = new_inter


def _rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    idx = idx.to(lin.weight.device)
    new = nn.Linear(lin.in_features, len(idx), bias=lin.bias is not None,
                    device=lin.weight.device, dtype=lin.weight.dtype)
    new.weight.copy_(lin.weight[idx])
    if lin.bias is not None:
        new.bias.copy_(lin.bias[idx])
    return new


def _cols(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    idx = idx.to(lin.weight.device)
    new = nn.Linear(len(idx), lin.out_features, bias=lin.bias is not None,
                    device=lin.weight.device, dtype=lin.weight.dtype)
    new.weight.copy_(lin.weight[:, idx])
    if lin.bias is not None:
        new.bias.copy_(lin.bias)
    return new


def keep_top(scores: list[torch.Tensor], remove: int) -> list[list[int]]:
    """Per layer, the indices that survive removing the `remove` lowest scores, in order."""
    out = []
    for s in scores:
        keep = torch.topk(s, len(s) - remove).indices
        out.append(sorted(keep.tolist()))
    return out


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
