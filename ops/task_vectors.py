"""Task vectors as stored artifacts: extract, sparsify, apply with per-block coefficients
(LiNeS among them), learn those coefficients, and graft a tiny mask of a vector.

References:
- Task arithmetic: Ilharco et al. 2022, "Editing Models with Task Arithmetic",
  https://arxiv.org/abs/2212.04089. A task vector is tau = theta_ft - theta_base; a model is
  edited by theta = theta_target + sum_i lambda_i * tau_i.
- Chat vector: "The Construction of Instruction-tuned LLMs for Finance without Instruction
  Data Using Continual Pretraining and Model Merging": the target need not be the vector's
  base; any shape-compatible checkpoint (e.g. a continually pre-trained one) will do.
- LiNeS: Wang et al. 2024, "LiNeS: Post-training Layer Scaling Prevents Forgetting and
  Enhances Model Merging", https://arxiv.org/abs/2410.17146: the update of decoder layer l
  (0-based, of L) is scaled by lambda(l) = alpha + beta * l / (L - 1), beta = 1 - alpha by
  default (the last layer keeps the whole update); tensors outside the decoder layers
  (embeddings, final norm, LM head) get alpha. For a multi-task merge of T vectors,
  alpha = (||sum_t tau_t||_1 / ||tau_merged||_1) / T.
- aTLAS: "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling",
  https://arxiv.org/abs/2407.02880: one coefficient per parameter block and task vector, a
  block being one parameter tensor (the paper's and its code's granularity), started at 0
  and learned by gradient descent with the weights frozen. The coarser `layer_module`
  blocks (a decoder layer's self_attn, mlp, each norm) are an option of ours.
- Grafting: Panigrahi et al. 2023, "Task-Specific Skill Localization in Fine-tuned Language
  Models", https://arxiv.org/abs/2302.06600: theta = theta_base + gamma (.) tau with a tiny
  binary mask gamma (about 0.01% of the parameters). The learned mask is
  gamma(S) = gamma_base + (1 - 2 gamma_base) (.) sigmoid(S - b), gamma_base the top-k
  magnitude mask, S started at 0 and b large (the authors' code: `sigmoid_bias`), so it starts
  within sigmoid(-b) of binary; the final mask is gamma rounded. The overlap of two skills'
  masks is their similarity.

Storage (why by hand: safetensors has no sparse layout, and mergekit keeps no task vectors):
a task vector folder holds `task_vector.json` (the manifest: every tensor's shape and whether
it is stored sparse), `config.json` of the fine-tune (so the registry knows the
architecture), and `task_vector-NNNNN.safetensors` shards. A dense tensor is stored under its
own name; a sparsified one as `NAME:values` (the kept entries, in the vector's dtype) and
`NAME:indices` (their flat positions, int32, or int64 past 2^31 entries, ascending). A graft
keeps its mask in `graft_mask/mask.safetensors` (flat positions per tensor, same layout), a
subfolder so that no loader takes it for weights.

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
    """lambda for one tensor of one vector: a learned coefficient when there is one (keyed by
    the tensor's name, or by its layer_module block), else weight x the layer's scale (if
    given for its layer) x the first block pattern (regular expression, searched in the
    name) that matches."""
    if learned is not None:
        for key in (name, block_of(name)):
            if key in learned:
                return float(learned[key])
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


# ----------------------------------------------------------------------------- LiNeS
def decoder_layers(names) -> int:
    """L: the number of decoder layers the tensor names span (highest index + 1; 0 if none)."""
    layers = [layer_of(n) for n in names]
    return max((l for l in layers if l is not None), default=-1) + 1


def lines_coefficient(name: str, num_layers: int, alpha: float,
                      beta: Optional[float] = None) -> float:
    """LiNeS (arXiv 2410.17146), the paper's convention: lambda(l) = alpha + beta * l / (L - 1)
    for a tensor of decoder layer l (0-based) of L, beta = 1 - alpha when not given; alpha
    for a tensor outside the decoder layers (embeddings, final norm, LM head). With a single
    layer (L = 1) that layer is the last one: alpha + beta."""
    beta = 1.0 - alpha if beta is None else beta
    layer = layer_of(name)
    if layer is None:
        return float(alpha)
    if layer >= num_layers:
        raise TaskVectorError(f"tensor {name} is in layer {layer}, but the model has "
                              f"{num_layers} decoder layers")
    depth = layer / (num_layers - 1) if num_layers > 1 else 1.0
    return float(alpha + beta * depth)


def lines_multitask_alpha(sum_l1: float, merged_l1: float, tasks: int) -> float:
    """LiNeS' multi-task alpha: (||sum_t tau_t||_1 / ||tau_merged||_1) / T, so the shallowest
    layers get the mean of the task vectors whatever the merge scaled them by."""
    if tasks < 1:
        raise TaskVectorError("LiNeS' multi-task alpha needs at least one task vector")
    if not merged_l1 > 0:
        raise TaskVectorError("the merged task vector is zero: LiNeS' multi-task alpha "
                              "(||sum tau||_1 / ||tau_merged||_1 / T) is undefined; give alpha")
    return float(sum_l1 / merged_l1 / tasks)


def lines_rescale_merge(base_files: Sequence[Path], model_files: Sequence[Sequence[Path]],
                        merged_files: Sequence[Path], out_dir: Path, *,
                        alpha: Optional[float] = None, beta: Optional[float] = None,
                        progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """LiNeS after a merge: write theta_base + lambda(l) * (theta_merged - theta_base) for every
    tensor of the merge into out_dir (the merged files' names and layout). alpha None: the
    multi-task alpha, with tau_t = theta_t - theta_base over the merged models (T of them,
    unweighted, as in the paper) and tau_merged = theta_merged - theta_base, both summed over
    every tensor the base and all models hold (a first pass, one tensor at a time). A tensor
    the base lacks (a tied head) is copied. Returns what was used: alpha, beta, layers,
    tasks and (multi-task) the two L1 norms."""
    base, merged = Shards(base_files), Shards(merged_files)
    models = [Shards(files) for files in model_files]
    names = [n for n in merged.keys() if n in base and merged.is_float(n)]
    layers = decoder_layers(merged.keys())
    info: dict = {"layers": layers, "tasks": len(models)}
    if alpha is None:
        sum_l1 = merged_l1 = 0.0
        for name in names:
            if not all(name in m for m in models):
                continue
            b = base.get(name).float()
            total = sum(m.get(name).float() - b for m in models)  # sum_t tau_t, fp32
            sum_l1 += float(total.double().abs().sum())
            merged_l1 += float((merged.get(name).float() - b).double().abs().sum())
        alpha = lines_multitask_alpha(sum_l1, merged_l1, len(models))
        info.update(sum_l1=sum_l1, merged_l1=merged_l1, alpha_from="multi-task norm ratio")
    else:
        info["alpha_from"] = "given"
    beta = 1.0 - alpha if beta is None else beta
    info.update(alpha=float(alpha), beta=float(beta))
    wanted = set(names)

    def delta(name: str) -> Optional[torch.Tensor]:
        if name not in wanted:
            return None
        theta = merged.get(name).float()
        lam = lines_coefficient(name, layers, alpha, beta)
        # theta + delta = theta_base + lam * (theta - theta_base), in float32
        return (1.0 - lam) * (base.get(name).float() - theta)

    write_updated(merged_files, out_dir, delta, progress=progress)
    return info


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


# aTLAS' blocks: what one learned coefficient covers, by the name of a tensor
GRANULARITIES: dict[str, Callable[[str], str]] = {
    "tensor": lambda name: name,    # one parameter tensor: the paper's (and its code's) block
    "layer_module": block_of,       # coarser: a decoder layer's self_attn, mlp or norm
}


def learn_coefficients(model, vectors: Sequence[dict[str, torch.Tensor]],
                       batches: Sequence[torch.Tensor], *, steps: int, lr: float,
                       init: Optional[Sequence[dict[str, float]]] = None,
                       granularity: str = "tensor",
                       log: Optional[Callable[[int, float], None]] = None) -> dict:
    """aTLAS: learn one coefficient per (vector, block) by Adam on the language-model loss of
    theta = theta_target + sum_i lambda_{i,block} * tau_i, the model's own weights frozen. A
    block is one parameter tensor (granularity 'tensor', the paper's), or a decoder layer's
    module ('layer_module'). `vectors`: per vector {tensor name: tau (float32, parameter's
    shape)}; only tensors that are parameters of the model are learned (a tied head is not a
    parameter of its own). `init`: per vector {block: starting lambda}; a block it lacks (or
    no init at all) starts at 0, the paper's init (theta starts at the target). `batches`:
    (batch, length) long tensors. Returns {"coefficients": [{block: lambda}], "init": the same
    table at the start, "loss_before", "loss_after"} (mean loss over all batches)."""
    if granularity not in GRANULARITIES:
        raise TaskVectorError(f"granularity {granularity!r} is not one of "
                              f"{', '.join(GRANULARITIES)}")
    key = GRANULARITIES[granularity]
    params = {n: p.detach() for n, p in model.named_parameters()}
    blocks = sorted({key(n) for v in vectors for n in v if n in params})
    if not blocks:
        raise TaskVectorError("no tensor of the task vectors is a parameter of the model")
    column = {b: j for j, b in enumerate(blocks)}
    start = [[float((init[i] if init else {}).get(b, 0.0)) for b in blocks]
             for i in range(len(vectors))]
    lam = torch.tensor(start, requires_grad=True)  # (vectors, blocks), float32
    device = next(model.parameters()).device
    taus = [{n: t.to(device) for n, t in v.items() if n in params} for v in vectors]

    def merged(coeffs: torch.Tensor) -> dict:
        out = dict(params)
        for i, tau in enumerate(taus):
            for name, t in tau.items():
                out[name] = out[name] + coeffs[i, column[key(name)]].to(t.dtype) * t
        return out

    before = _mean_loss(model, merged(lam), batches, device)
    _descend([lam], lambda: merged(lam), model, batches, device, steps, lr, log)
    after = _mean_loss(model, merged(lam), batches, device)
    table = [{b: float(lam.detach()[i, j]) for b, j in column.items()}
             for i in range(len(vectors))]
    return {"coefficients": table, "init": [dict(zip(blocks, row)) for row in start],
            "loss_before": before, "loss_after": after}


# ---------------------------------------------------------------------------- grafting
def top_mask(scores: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Global top-k of the scores over all tensors: bool masks with exactly
    kept_count(total, density) entries set. Holds every score at once (float32)."""
    from ops.prune import global_topk_masks

    k = kept_count(sum(s.numel() for s in scores.values()), density)
    return global_topk_masks(scores, sorted(scores), k, largest=True)


GRAFT_SIGMOID_BIAS = 5.0  # b: the authors' code's sigmoid_bias; sigmoid(-5) = 0.0067


def graft_gate(start: torch.Tensor, scores: torch.Tensor, bias: float) -> torch.Tensor:
    """The relaxed graft mask of Panigrahi et al.: gamma = gamma_base + (1 - 2 gamma_base) (.)
    sigmoid(S - b), gamma_base the binary start mask (bool, tau's shape) and S the scores
    (float32, same shape). With S = 0 it is within sigmoid(-b) of gamma_base; raising S
    moves an entry away from its start value (in towards 1 outside the start mask, out
    towards 0 inside it)."""
    g = start.to(scores.dtype)
    return g + (1 - 2 * g) * torch.sigmoid(scores - bias)


def learn_graft_mask(model, tau: dict[str, torch.Tensor], density: float,
                     batches: Sequence[torch.Tensor], *, steps: int, lr: float,
                     bias: float = GRAFT_SIGMOID_BIAS,
                     log: Optional[Callable[[int, float], None]] = None) -> dict:
    """Grafting with a learned mask (Panigrahi et al. 2023): scores S (one per entry of tau,
    float32, started at 0) trained by Adam through theta = theta_base + gamma(S) (.) tau with
    gamma = graft_gate(top-k magnitude mask, S, bias), on the loss of the batches; the final
    mask is gamma rounded (gamma > 0.5), as in the authors' code, so its size may move away
    from the start's. Returns {"mask", "start" (the magnitude mask), "loss_magnitude",
    "loss_learned" (losses of the two binary grafts), "gate_start_gap" (the largest
    |gamma - gamma_base| at the start)}."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    tau = {n: t.to(device) for n, t in tau.items() if n in params}
    start = {n: m.to(device) for n, m in
             top_mask({n: t.abs() for n, t in tau.items()}, density).items()}
    scores = {n: torch.zeros(t.shape, device=device, requires_grad=True)
              for n, t in tau.items()}
    with torch.no_grad():
        gap = max(float((graft_gate(start[n], scores[n], bias) - start[n].float()).abs().max())
                  for n in tau)

    def grafted(gates: dict) -> dict:
        out = dict(params)
        for n, t in tau.items():
            out[n] = out[n] + gates[n].to(t.dtype) * t
        return out

    def mean_loss(mask: dict) -> float:
        return _mean_loss(model, grafted({n: m.to(device).float() for n, m in mask.items()}),
                          batches, device)

    _descend(list(scores.values()),
             lambda: grafted({n: graft_gate(start[n], s, bias) for n, s in scores.items()}),
             model, batches, device, steps, lr, log)
    with torch.no_grad():
        mask = {n: (graft_gate(start[n], s, bias) > 0.5).cpu() for n, s in scores.items()}
    return {"mask": mask, "start": {n: m.cpu() for n, m in start.items()},
            "loss_magnitude": mean_loss(start), "loss_learned": mean_loss(mask),
            "gate_start_gap": gap}


def mask_overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """How much two skills' grafts share (Panigrahi et al.: regions of different tasks are
    almost disjoint; their overlap is a proxy for task similarity). a, b: bool masks by
    tensor name; a tensor only one holds shares nothing. Returns {"kept_a", "kept_b",
    "shared" (entries in both), "jaccard" (shared / entries in either; the similarity),
    "shared_of_smaller" (shared / the smaller graft)}."""
    for name in set(a) & set(b):
        if a[name].shape != b[name].shape:
            raise TaskVectorError(f"the grafts differ in the shape of {name}: "
                                  f"{list(a[name].shape)} and {list(b[name].shape)}")
    kept_a = sum(int(m.sum()) for m in a.values())
    kept_b = sum(int(m.sum()) for m in b.values())
    shared = sum(int((a[n] & b[n]).sum()) for n in set(a) & set(b))
    union = kept_a + kept_b - shared
    return {"kept_a": kept_a, "kept_b": kept_b, "shared": shared,
            "jaccard": shared / union if union else 0.0,
            "shared_of_smaller": shared / min(kept_a, kept_b) if min(kept_a, kept_b) else 0.0}


GRAFT_MASK = Path("graft_mask") / "mask.safetensors"


def save_mask(mask: dict[str, torch.Tensor], folder: Path) -> Path:
    """Store a graft's mask in folder/graft_mask/mask.safetensors: per tensor the flat
    positions it keeps (int32, or int64 past 2^31 entries), the shapes in the metadata."""
    from safetensors.torch import save_file

    path = Path(folder) / GRAFT_MASK
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, m in mask.items():
        dtype = torch.int32 if m.numel() < 2 ** 31 else torch.int64
        out[name] = m.reshape(-1).nonzero().reshape(-1).to(dtype).contiguous()
    save_file(out, str(path), metadata={"format": "weightsmith-graft-mask", "shapes": json.dumps(
        {n: list(m.shape) for n, m in mask.items()})})
    return path


def load_mask(folder: Path, label: str | None = None) -> dict[str, torch.Tensor]:
    """The bool masks a graft stored with save_mask; TaskVectorError naming the checkpoint
    when it has none."""
    from safetensors import safe_open

    path = Path(folder) / GRAFT_MASK
    if not path.is_file():
        raise TaskVectorError(f"{label or folder} has no graft mask ({GRAFT_MASK}): only "
                              f"checkpoints made by action 'graft' do")
    with safe_open(str(path), framework="pt") as f:
        shapes = json.loads((f.metadata() or {}).get("shapes", "{}"))
        out = {}
        for name in f.keys():
            flat = torch.zeros(math.prod(shapes[name]), dtype=torch.bool)
            flat[f.get_tensor(name).long()] = True
            out[name] = flat.view(*shapes[name])
    return out


def skill_per_layer(mask: dict[str, torch.Tensor]) -> tuple[list[float], dict[str, float]]:
    """Where the skill lives: per decoder layer, the fraction of the layer's entries the mask
    keeps (and the same for each tensor outside the layers)."""
    kept = {n: float(m.sum()) for n, m in mask.items()}
    sizes = {n: float(m.numel()) for n, m in mask.items()}
    kept_layers, kept_other = per_layer_sums(kept)
    size_layers, size_other = per_layer_sums(sizes)
    return ([k / s if s else 0.0 for k, s in zip(kept_layers, size_layers)],
            {n: kept_other[n] / size_other[n] for n in kept_other})
