"""Grow and shrink decoder-only transformers: depth (copy, stack, insert, remove layers) and MLP
width. Every depth method is a *layer map*: new layer i is a copy of old layer map[i].

References:
- SOLAR depth up-scaling: "SOLAR 10.7B: Scaling Large Language Models with Simple yet
  Effective Depth Up-Scaling", https://arxiv.org/abs/2312.15166
- G_stack: "Stacking Your Transformers: A Closer Look at Model Growth for Efficient LLM
  Pre-Training", https://arxiv.org/abs/2405.15319
- Block expansion: "LLaMA Pro: Progressive LLaMA with Block Expansion",
  https://arxiv.org/abs/2401.02415
- MLP width growth: "Net2Net: Accelerating Learning via Knowledge Transfer",
  https://arxiv.org/abs/1511.05641 and "bert2BERT", https://arxiv.org/abs/2110.07143
- Block influence: "ShortGPT: Layers in Large Language Models are More Redundant Than You
  Expect", https://arxiv.org/abs/2403.03853
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ops.layers import LayoutError, decoder_layers as layers_of

# model_type -> the layout these ops rely on: model.model.layers[i] with self_attn.o_proj,
# self_attn.layer_idx and mlp.{gate,up,down}_proj.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class ScaleError(ValueError):
    """A scaling request that does not fit the model; the message names the setting."""


def check_supported(model) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ScaleError(f"architecture {model_type!r} is not supported for layer scaling "
                         f"(supported: {', '.join(SUPPORTED)}); nothing was written")
    try:
        layers_of(model, "layer scaling")
    except LayoutError as e:
        raise ScaleError(str(e)) from None


def num_layers(model) -> int:
    return len(model.model.layers)


# ------------------------------------------------------------------------------- layer maps
def solar_map(n: int, overlap: int) -> list[int]:
    """Two copies; drop `overlap` layers from the end of the first and the start of the
    second: 32 layers, overlap 8 -> 0..23 + 8..31 = 48 layers."""
    if not 1 <= overlap < n:
        raise ScaleError(f"solar_overlap ({overlap}) must be at least 1 and below the layer "
                         f"count ({n})")
    return list(range(n - overlap)) + list(range(overlap, n))


def stack_map(n: int, factor: int) -> list[int]:
    """G_stack: the whole layer sequence, `factor` times."""
    if factor < 1:
        raise ScaleError(f"growth_factor ({factor}) must be at least 1")
    return list(range(n)) * factor


def expansion_map(n: int, every: int) -> tuple[list[int], list[int]]:
    """LLaMA Pro: after every `every` layers, a copy of the last of them. Returns the map and
    the indices (in the new model) of the inserted blocks."""
    if not 1 <= every <= n:
        raise ScaleError(f"expand_every ({every}) must be between 1 and the layer count ({n})")
    layer_map, new = [], []
    for start in range(0, n, every):
        group = list(range(start, min(start + every, n)))
        layer_map += group
        if len(group) == every:
            new.append(len(layer_map))
            layer_map.append(group[-1])
    return layer_map, new


def removal_map(n: int, drop: list[int]) -> list[int]:
    if len(drop) >= n:
        raise ScaleError(f"cannot remove {len(drop)} of {n} layers: at least one must stay")
    return [i for i in range(n) if i not in set(drop)]


# ---------------------------------------------------------------------------- rebuilding
@torch.no_grad()
def apply_layer_map(model, layer_map: list[int], zero_output: list[int] = ()) -> None:
    """Rebuild `model.model.layers` in place from a layer map, keeping the config consistent.

    Each new layer is an independent deep copy (no tied weights between copies, so each can
    train on its own). Layers listed in `zero_output` get o_proj and down_proj set to zero:
    their residual contribution is exactly zero, so they compute the identity.
    """
    check_supported(model)
    old = model.model.layers
    n = len(old)
    if not layer_map or any(not 0 <= j < n for j in layer_map):
        raise ScaleError(f"layer map refers to layers outside 0..{n - 1}")
    model.model.layers = nn.ModuleList(copy.deepcopy(old[j]) for j in layer_map)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i  # the KV cache is indexed by it
        if i in set(zero_output):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                if proj.bias is not None:
                    proj.bias.zero_()
    config = model.config
    config.num_hidden_layers = len(layer_map)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[j] for j in layer_map]
    if getattr(config, "max_window_layers", None) is not None:
        # Qwen2/3 derive layer_types from it; layer_types (remapped above) is what is read.
        config.max_window_layers = min(config.max_window_layers, len(layer_map))


@torch.no_grad()
def widen_mlp(model, intermediate_size: int, noise: float = 0.0, seed: int = 0) -> dict:
    """Net2Net widening of every MLP: new neurons duplicate random existing ones (rows of
    gate_proj and up_proj), and each duplicated neuron's outgoing column of down_proj is
    split evenly among its copies, so the MLP output is unchanged (up to float rounding).
    `noise` (relative std) perturbs the duplicated input rows to break symmetry."""
    check_supported(model)
    old = model.config.intermediate_size
    if intermediate_size <= old:
        raise ScaleError(f"intermediate_size ({intermediate_size}) must exceed the current "
                         f"{old}")
    gen = torch.Generator().manual_seed(seed)
    picks = {}
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        extra = torch.randint(0, old, (intermediate_size - old,), generator=gen)  # (E,)
        index = torch.cat([torch.arange(old), extra])  # (I_new,) source neuron of each
        counts = torch.bincount(index, minlength=old).to(mlp.down_proj.weight.dtype)  # (I,)
        for name in ("gate_proj", "up_proj"):
            lin = getattr(mlp, name)  # weight (I, H)
            weight = lin.weight[index].clone()  # (I_new, H)
            if noise:
                jitter = torch.randn(weight[old:].shape, generator=gen) * noise
                weight[old:] += jitter.to(weight.dtype) * weight[old:].abs().mean()
            setattr(mlp, name, _linear(weight, lin.bias[index] if lin.bias is not None
                                       else None))
        down = mlp.down_proj  # weight (H, I)
        weight = (down.weight / counts)[:, index]  # (H, I_new): each copy carries 1/count
        mlp.down_proj = _linear(weight, down.bias)
        picks[i] = extra.tolist()
    model.config.intermediate_size = intermediate_size
    return picks


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    lin.weight.copy_(weight)
    if bias is not None:
        lin.bias.copy_(bias)
    return lin


# ------------------------------------------------------------------------- block influence
@torch.no_grad()
def block_influence(model, batches: list[torch.Tensor]) -> list[float]:
    """BI_l = 1 - mean over tokens of cos(x_in, x_out) for each decoder layer l, where x_in
    and x_out are the hidden states entering and leaving the layer. Low BI: the layer barely
    changes its input and is the first to remove. `batches`: (B, T) token id tensors."""
    check_supported(model)
    device = next(model.parameters()).device
    sums = [0.0] * num_layers(model)
    count = 0
    handles = []

    def hook(index):
        def fn(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
            x_out = output[0] if isinstance(output, tuple) else output  # (B, T, H)
            cos = nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            sums[index] += cos.sum().item()
        return fn

    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    try:
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / count for s in sums]


def lowest_influence(bi: list[float], n: int) -> list[int]:
    """Indices of the n layers with the lowest block influence, in layer order."""
    return sorted(sorted(range(len(bi)), key=lambda i: bi[i])[:n])
