"""Task vectors as stored artifacts: extract, sparsify, apply with per-block coefficients,
learn those coefficients, and graft a tiny mask of a vector.

References:
- Task arithmetic: Ilharco et al. 2022, "Editing Models with Task Arithmetic",
  https://arxiv.org/abs/2212.04089. A task vector is tau = theta_ft - theta_base; a model is
  edited by theta = theta_target + sum_i lambda_i * tau_i.
- Chat vector: "The Construction of Instruction-tuned LLMs for Finance without Instruction
  Data Using Continual Pretraining and Model Merging": the target need not be the vector's
  base; any shape-compatible checkpoint (e.g. a continually pre-trained one) will do.
- aTLAS: "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling",
  https://arxiv.org/abs/2407.02880: one coefficient per parameter block (here: per decoder
  layer and module, and per non-layer tensor) instead of one global lambda, optionally
  learned by gradient descent with the weights frozen.
- Grafting: Panigrahi et al. 2023, "Task-Specific Skill Localization in Fine-tuned Language
  Models", https://arxiv.org/abs/2302.06600: theta = theta_base + gamma (.) tau with a tiny
  binary mask gamma, chosen by magnitude or learned through a sigmoid relaxation.

Storage (why by hand: safetensors has no sparse layout, and mergekit keeps no task vectors):
a task vector folder holds `task_vector.json` (the manifest: every tensor's shape and whether
it is stored sparse), `config.json` of the fine-tune (so the registry knows the
architecture), and `task_vector-NNNNN.safetensors` shards. A dense tensor is stored under its
own name; a sparsified one as `NAME:values` (the kept entries, in the vector's dtype) and
`NAME:indices` (their flat positions, int32, or int64 past 2^31 entries, ascending).

Every function works tensor by tensor through `safe_open`, so extracting or applying holds
one tensor of each input (plus one output shard) at a time. Learning and grafting need the
target model in memory, as training does.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ops.checkpoint_files import TensorFiles

MANIFEST = "task_vector.json"
FORMAT = "weightsmith-task-vector"
SHARD_PREFIX = "task_vector"
# the decoder layer index in a tensor name: model.layers.3.mlp..., transformer.h.3.attn...
LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


class TaskVectorError(ValueError):
    """Incompatible or bad input; the message names the tensor (and the shapes)."""


# ------------------------------------------------------------------------------ names
def layer_of(name: str) -> Optional[int]:
    """The decoder layer a tensor belongs to, or None (embeddings, final norm, head)."""
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


def block_of(name: str) -> str:
    """The aTLAS parameter block of a tensor: its layer and module inside the layer
    (`model.layers.0.self_attn`, `model.layers.0.mlp`, `model.layers.0.input_layernorm`), or
    the tensor's module outside the layers (`model.embed_tokens`, `model.norm`, `lm_head`)."""
    match = LAYER.search(name)
    if match:
        rest = name[match.end():].split(".")[0]
        return name[:match.end()] + rest
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


# ----------------------------------------------------------------------------- reading
# The tensors of a list of safetensors files by name, opened lazily, one at a time.
Shards = TensorFiles


class StoredVector:
    """A task vector folder, read tensor by tensor as dense float32 tensors."""

    def __init__(self, folder: Path, label: str | None = None):
        folder = Path(folder)
        self.label = label or folder.name
        manifest = folder / MANIFEST
        if not manifest.is_file():
            raise TaskVectorError(f"{self.label} is not a task vector: {manifest} is missing "
                                  f"(make one with action 'extract')")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise TaskVectorError(f"{manifest}: format {self.manifest.get('format')!r} is not "
                                  f"{FORMAT!r}")
        files = sorted(folder.glob(f"{SHARD_PREFIX}-*.safetensors"))
        self.shards = Shards(files)
        self.tensors: dict[str, dict] = self.manifest["tensors"]
        for name, info in self.tensors.items():
            keys = [f"{name}:values", f"{name}:indices"] if info["sparse"] else [name]
            for key in keys:
                if key not in self.shards:
                    raise TaskVectorError(f"{self.label}: tensor {key} listed in {manifest} "
                                          f"is in none of its safetensors files")

    def names(self) -> list[str]:
        return sorted(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        """tau for one tensor: float32, of its stored shape."""
        info = self.tensors[name]
        if info["sparse"]:
            return densify(self.shards.get(f"{name}:values"),
                           self.shards.get(f"{name}:indices"), info["shape"])
        return self.shards.get(name).float()


# ------------------------------------------------------------------------ pure pieces
def kept_count(numel: int, density: float) -> int:
    """Entries a top-k of `density` keeps in a tensor of `numel` entries (at least one)."""
    return numel if density >= 1 else min(numel, max(1, round(density * numel)))


def sparsify(tau: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by magnitude of one tensor: (values (k,) in tau's dtype, flat indices (k,) int32
    or int64, ascending). Exactly kept_count(numel, density) entries are kept."""
    flat = tau.reshape(-1)
    k = kept_count(flat.numel(), density)
    index = torch.topk(flat.abs().float(), k, sorted=False).indices.sort().values
    index_dtype = torch.int32 if flat.numel() < 2 ** 31 else torch.int64
    return flat[index].contiguous(), index.to(index_dtype)


def densify(values: torch.Tensor, indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The dense float32 tensor of `shape` with `values` at flat `indices`, zero elsewhere."""
    out = torch.zeros(math.prod(shape), dtype=torch.float32)
    out[indices.long()] = values.float()
    return out.view(*shape)


def check_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    if not torch.isfinite(tensor).all():
        raise TaskVectorError(f"NaN or Inf in {name} ({where})")


def per_layer_sums(values: dict[str, float]) -> tuple[list[float], dict[str, float]]:
    """Sum per-tensor values by decoder layer: (list by layer index, {other tensor: value})."""
    layers: dict[int, float] = {}
    other: dict[str, float] = {}
    for name, value in values.items():
        layer = layer_of(name)
        if layer is None:
            other[name] = value
        else:
            layers[layer] = layers.get(layer, 0.0) + value
    count = max(layers) + 1 if layers else 0
    return [layers.get(i, 0.0) for i in range(count)], other


def coefficient(name: str, weight: float, layer_scales: Optional[Sequence[float]] = None,
                block_scales: Optional[dict[str, float]] = None,
                learned: Optional[dict[str, float]] = None) -> float:
    """lambda for one tensor of one vector: a learned block coefficient when there is one,
    else weight x the layer's scale (if given for its layer) x the first block pattern
    (regular expression, searched in the name) that matches."""
    if learned is not None and block_of(name) in learned:
        return float(learned[block_of(name)])
    value = float(weight)
    layer = layer_of(name)
    if layer_scales is not None and layer is not None:
        if layer >= len(layer_scales):
            raise TaskVectorError(f"layer_scales has {len(layer_scales)} values but tensor "
                                  f"{name} is in layer {layer}")
        value *= float(layer_scales[layer])
    for pattern, scale in (block_scales or {}).items():
        if re.search(pattern, name):
            value *= float(scale)
            break
    return value


# --------------------------------------------------------------------------- extract
def extract(ft_files: Sequence[Path], base_files: Sequence[Path], out_dir: Path, *,
            density: Optional[float] = None, dtype: torch.dtype = torch.float32,
            shard_bytes: int = 1 << 30, labels: tuple[str, str] = ("fine-tune", "base"),
            progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Write tau = theta_ft - theta_base (computed in float32, stored in `dtype`) into
    out_dir as task_vector-NNNNN.safetensors shards of about `shard_bytes`; with `density`,
    only the top-k magnitudes of each tensor, stored sparse where that is smaller. Returns
    the manifest's tensor table and the statistics (norms per layer, sizes)."""
    ft, base = Shards(ft_files), Shards(base_files)
    for a, b, la, lb in ((ft, base, *labels), (base, ft, *labels[::-1])):
        missing = [n for n in a.keys() if n not in b]
        if missing:
            raise TaskVectorError(f"tensor {missing[0]} is in the {la} but not in the {lb}: "
                                  f"the checkpoints do not share an architecture")
    for name in ft.keys():
        if ft.shape(name) != base.shape(name):
            raise TaskVectorError(f"tensor {name} differs in shape: {ft.shape(name)} in the "
                                  f"{labels[0]}, {base.shape(name)} in the {labels[1]}")
    names = [n for n in ft.keys() if ft.is_float(n)]
    tensors: dict[str, dict] = {}
    squares: dict[str, float] = {}
    dense_squares: dict[str, float] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    shard = 0
    dense_bytes = stored_bytes = entries = kept = 0
    item_size = torch.tensor([], dtype=dtype).element_size()

    def flush():
        nonlocal pending, pending_bytes, shard
        from safetensors.torch import save_file

        if pending:
            shard += 1
            save_file(pending, str(Path(out_dir) / f"{SHARD_PREFIX}-{shard:05d}.safetensors"),
                      metadata={"format": FORMAT})
            pending, pending_bytes = {}, 0

    for done, name in enumerate(names, 1):
        tau = ft.get(name).float() - base.get(name).float()  # same shape as the weight, fp32
        check_finite(name, tau, f"the difference of the {labels[0]} and the {labels[1]}")
        dense_squares[name] = float(tau.double().pow(2).sum())
        numel = tau.numel()
        entries += numel
        dense_bytes += numel * item_size
        stored = tau.to(dtype)
        info = {"shape": list(tau.shape), "sparse": False, "kept": numel}
        if density is not None and density < 1:
            values, index = sparsify(stored, density)
            info["kept"] = values.numel()
            sparse_bytes = values.numel() * (item_size + index.element_size())
            if sparse_bytes < numel * item_size:
                info["sparse"] = True
                pending[f"{name}:values"], pending[f"{name}:indices"] = values, index
                pending_bytes += sparse_bytes
            else:  # small tensors: zeros stored densely take less room than indices
                dense = torch.zeros(numel, dtype=dtype)
                dense[index.long()] = values
                pending[name] = dense.view(tau.shape)
                pending_bytes += numel * item_size
            squares[name] = float(values.double().pow(2).sum())
        else:
            pending[name] = stored.contiguous()
            pending_bytes += numel * item_size
            squares[name] = float(stored.double().pow(2).sum())
        kept += info["kept"]
        tensors[name] = info
        if pending_bytes >= shard_bytes:
            stored_bytes += pending_bytes
            flush()
        if progress:
            progress(done, len(names))
    stored_bytes += pending_bytes
    flush()
    if not tensors:
        raise TaskVectorError(f"the {labels[0]} has no floating-point tensors")
    by_layer, other = per_layer_sums(squares)
    return {
        "tensors": tensors,
        "norm": math.sqrt(sum(squares.values())),
        "norm_per_layer": [math.sqrt(v) for v in by_layer],
        "norm_other": {k: math.sqrt(v) for k, v in other.items()},
        # the share of ||tau||^2 the sparsified vector keeps (1.0 when dense)
        "energy_kept": (sum(squares.values()) / sum(dense_squares.values())
                        if sum(dense_squares.values()) else 1.0),
        "entries": entries, "kept": kept, "dense_bytes": dense_bytes,
        "stored_bytes": stored_bytes, "shards": shard,
    }


# ----------------------------------------------------------------------------- apply
def check_compatible(target: Shards, vectors: Sequence[StoredVector], target_label: str,
                     used: Optional[Callable[[int, str], bool]] = None) -> None:
    """Every tensor of every vector exists in the target with the same shape; the error names
    the first tensor that differs and both shapes. `used(i, name)` False exempts a tensor
    (e.g. embeddings scaled by 0 when the target's vocabulary grew)."""
    for i, vector in enumerate(vectors):
        for name in vector.names():
            if used is not None and not used(i, name):
                continue
            if name not in target:
                raise TaskVectorError(f"tensor {name} of task vector {vector.label} is not in "
                                      f"{target_label}: the checkpoints do not share an "
                                      f"architecture")
            if target.shape(name) != vector.shape(name):
                raise TaskVectorError(
                    f"tensor {name} differs in shape: {vector.shape(name)} in task vector "
                    f"{vector.label}, {target.shape(name)} in {target_label}")


def write_updated(target_files: Sequence[Path], out_dir: Path,
                  delta: Callable[[str], Optional[torch.Tensor]], *,
                  progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Write theta = theta_target + delta(name) for every tensor of the target, file by file
    with the target's file names (so its shard index stays valid). delta returns a float32
    tensor of the target's shape, or None to copy the tensor. The sum is computed in float32
    and cast back to the target tensor's dtype; NaN or Inf in a result is an error naming
    the tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    total = sum(len(Shards([f]).keys()) for f in target_files)
    done = 0
    for file in target_files:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            for name in f.keys():
                weight = f.get_tensor(name)
                change = delta(name) if weight.is_floating_point() else None
                if change is not None:
                    result = weight.float() + change
                    check_finite(name, result, "the result")
                    weight = result.to(weight.dtype)
                out[name] = weight.contiguous()
                done += 1
                if progress:
                    progress(done, total)
        save_file(out, str(Path(out_dir) / Path(file).name), metadata={**metadata, "format": "pt"})


def combined_delta(vectors: Sequence[StoredVector],
                   lam: Callable[[int, str], float]) -> Callable[[str], Optional[torch.Tensor]]:
    """delta(name) = sum_i lam(i, name) * tau_i(name), over the vectors that hold the tensor."""
    def delta(name: str) -> Optional[torch.Tensor]:
        out = None
        for i, vector in enumerate(vectors):
            if name in vector and lam(i, name) != 0:  # lambda 0: the tensor is left out
                term = lam(i, name) * vector.get(name)
                out = term if out is None else out + term
        return out
    return delta


# --------------------------------------------------------------------------- learning
def _lm_loss(model, params: dict, batch: torch.Tensor) -> torch.Tensor:
    from torch.func import functional_call

    return functional_call(model, params, args=(), kwargs={"input_ids": batch,
                                                            "labels": batch}).loss


def _mean_loss(model, params: dict, batches: Sequence[torch.Tensor], device) -> float:
    """The mean language-model loss over all batches, without gradients."""
    with torch.no_grad():
        return sum(float(_lm_loss(model, params, b.to(device))) for b in batches) / len(batches)


def _descend(trainable: list[torch.Tensor], params_of: Callable[[], dict], model,
             batches: Sequence[torch.Tensor], device, steps: int, lr: float,
             log: Optional[Callable[[int, float], None]]) -> None:
    """Adam on `trainable` for `steps` steps, one batch a step in turn, of the loss of the
    model run with params_of() (which builds the parameters from `trainable`)."""
    optimizer = torch.optim.Adam(trainable, lr=lr)
    for step in range(steps):
        loss = _lm_loss(model, params_of(), batches[step % len(batches)].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log:
            log(step, float(loss.detach()))


def learn_coefficients(model, vectors: Sequence[dict[str, torch.Tensor]],
                       init: Sequence[dict[str, float]], batches: Sequence[torch.Tensor], *,
                       steps: int, lr: float,
                       log: Optional[Callable[[int, float], None]] = None) -> dict:
    """aTLAS: learn one coefficient per (vector, block) by Adam on the language-model loss
    of theta = theta_target + sum_i lambda_{i,block} * tau_i, the model's own weights frozen.
    `vectors`: per vector {tensor name: tau (float32, parameter's shape)}; `init`: per vector
    {block: starting lambda}; `batches`: (batch, length) long tensors. Returns
    {"coefficients": [{block: lambda}], "loss_before", "loss_after"} (mean loss over all
    batches, before and after)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    blocks = sorted({block_of(n) for v in vectors for n in v if n in params})
    if not blocks:
        raise TaskVectorError("no tensor of the task vectors is a parameter of the model")
    column = {b: j for j, b in enumerate(blocks)}
    lam = torch.tensor([[float(init[i].get(b, 1.0)) for b in blocks]
                        for i in range(len(vectors))], requires_grad=True)  # (vectors, blocks)
    device = next(model.parameters()).device
    taus = [{n: t.to(device) for n, t in v.items() if n in params} for v in vectors]

    def merged(coeffs: torch.Tensor) -> dict:
        out = dict(params)
        for i, tau in enumerate(taus):
            for name, t in tau.items():
                out[name] = out[name] + coeffs[i, column[block_of(name)]].to(t.dtype) * t
        return out

    before = _mean_loss(model, merged(lam), batches, device)
    _descend([lam], lambda: merged(lam), model, batches, device, steps, lr, log)
    after = _mean_loss(model, merged(lam), batches, device)
    table = [{b: float(lam.detach()[i, j]) for b, j in column.items()}
             for i in range(len(vectors))]
    return {"coefficients": table, "loss_before": before, "loss_after": after}


# ---------------------------------------------------------------------------- grafting
def top_mask(scores: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Global top-k of the scores over all tensors: bool masks with exactly
    kept_count(total, density) entries set. Holds every score at once (float32)."""
    from ops.prune import global_topk_masks

    k = kept_count(sum(s.numel() for s in scores.values()), density)
    return global_topk_masks(scores, sorted(scores), k, largest=True)


def learn_graft_mask(model, tau: dict[str, torch.Tensor], density: float,
                     batches: Sequence[torch.Tensor], *, steps: int, lr: float,
                     log: Optional[Callable[[int, float], None]] = None) -> dict:
    """Grafting with a learned mask: a real-valued score S per entry of tau, starting at +3
    on the top-k magnitudes and -3 elsewhere, trained through the relaxation
    theta = theta_base + sigmoid(S) * tau on the loss of the batches; the final mask is the
    top-k of S, so exactly the same number of entries as the magnitude mask. Returns
    {"mask", "loss_magnitude", "loss_learned"} (losses of the binary grafts)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    tau = {n: t.to(device) for n, t in tau.items() if n in params}
    start = top_mask({n: t.abs() for n, t in tau.items()}, density)
    scores = {n: torch.where(start[n].to(device), 3.0, -3.0).requires_grad_(True)
              for n in tau}

    def grafted(gates: dict) -> dict:
        out = dict(params)
        for n, t in tau.items():
            out[n] = out[n] + gates[n].to(t.dtype) * t
        return out

    def mean_loss(mask: dict) -> float:
        return _mean_loss(model, grafted({n: m.to(device).float() for n, m in mask.items()}),
                          batches, device)

    _descend(list(scores.values()),
             lambda: grafted({n: torch.sigmoid(s) for n, s in scores.items()}),
             model, batches, device, steps, lr, log)
    mask = top_mask({n: s.detach().cpu() for n, s in scores.items()}, density)
    return {"mask": mask, "loss_magnitude": mean_loss(start), "loss_learned": mean_loss(mask)}


def skill_per_layer(mask: dict[str, torch.Tensor]) -> tuple[list[float], dict[str, float]]:
    """Where the skill lives: per decoder layer, the fraction of the layer's entries the mask
    keeps (and the same for each tensor outside the layers)."""
    kept = {n: float(m.sum()) for n, m in mask.items()}
    sizes = {n: float(m.numel()) for n, m in mask.items()}
    kept_layers, kept_other = per_layer_sums(kept)
    size_layers, size_other = per_layer_sums(sizes)
    return ([k / s if s else 0.0 for k, s in zip(kept_layers, size_layers)],
            {n: kept_other[n] / size_other[n] for n in kept_other})
