"""task_vector: task vectors (tau = theta_ft - theta_base) as registry artifacts of kind
`task_vector`, and the edits made with them (ops/task_vectors.py).

- extract: tau from a fine-tune and its base, optionally only the top-k magnitudes of each
  tensor, stored sparse; its norm per layer and its size are recorded.
- apply: theta = theta_target + sum_i lambda_i * tau_i onto any shape-compatible checkpoint
  (the chat-vector recipe), with per-layer and per-block coefficients, or the LiNeS preset
  (lambda growing linearly with depth; alpha from the multi-task norm ratio).
- learn: aTLAS: the same, with one coefficient per vector and parameter tensor (or, coarser,
  per layer module) learned on a local text file from 0, the weights frozen; the loss before
  and after and the learned table are recorded.
- graft: theta_base + mask (.) tau with a tiny mask (top-k magnitudes, or learned through the
  paper's sigmoid parameterisation); the fraction of each layer the mask keeps says where
  the skill lives, and the overlap with other grafts' masks how similar the skills are.

mergekit's task_arithmetic merges models, not stored vectors, and has no per-block
coefficients, learned coefficients or grafting, hence this plugin.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from plugins import (ADVANCED, LOG_SCALE, METHOD_SELECTOR, CheckpointRef, LocalFile, NextStep,
                     Plugin, PluginConfig, for_methods, form_hints)

from plugins.kit.textfiles import check_text_file

ACTIONS = {
    "extract": "tau = finetuned - base, stored as a task_vector artifact",
    "apply": "target + sum of lambda_i * vectors[i] (any shape-compatible target)",
    "learn": "apply, with one lambda per vector and tensor learned on data_file (aTLAS)",
    "graft": "target + mask * vector, with a tiny top-k (or learned) mask",
}
GRANULARITIES = {
    "tensor": "one lambda per parameter tensor per vector (the aTLAS paper's blocks)",
    "layer_module": "one lambda per decoder layer's self_attn, mlp and each norm, and per "
                    "tensor outside the layers, per vector (coarser than the paper)",
}
DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class Config(PluginConfig):
    action: Literal[tuple(ACTIONS)] = Field(
        "extract", description="; ".join(f"{k}: {v}" for k, v in ACTIONS.items()),
        json_schema_extra=METHOD_SELECTOR)
    finetuned: Optional[CheckpointRef] = Field(
        None, description="extract: the fine-tuned checkpoint.",
        json_schema_extra=for_methods("extract"))
    base: Optional[CheckpointRef] = Field(
        None, description="extract: the checkpoint the fine-tune started from.",
        json_schema_extra=for_methods("extract"))
    target: Optional[CheckpointRef] = Field(
        None, description="apply, learn, graft: the checkpoint the vectors are added to. It "
                          "need not be the vectors' base, only shape-compatible (chat vector: "
                          "add instruct - base to a continually pre-trained model). graft, "
                          "empty: the vector's own base.",
        json_schema_extra=for_methods("apply", "learn", "graft"))
    vectors: list[CheckpointRef] = Field(
        default_factory=list,
        json_schema_extra=form_hints({"x-weightsmith": "checkpoints"},
                                     for_methods("apply", "learn", "graft")),
        description="apply, learn: the task vectors (registry artifacts of kind task_vector). "
                    "graft: exactly one.")
    weights: Optional[list[float]] = Field(
        None, description="apply: one lambda per vector, in order. Empty: 1.0 each. learn: "
                          "the starting lambdas; empty: 0, aTLAS' init (start at the target).",
        json_schema_extra=for_methods("apply", "learn"))
    lines: bool = Field(
        False, description="apply: the LiNeS preset (arXiv 2410.17146): each vector's lambda "
                           "times alpha + beta * l / (L - 1) on decoder layer l of L, and "
                           "times alpha on the embeddings, final norm and head, so shallow "
                           "layers stay near the target. alpha empty: (||sum tau||_1 / "
                           "||sum lambda_i tau_i||_1) / T over the T vectors (two or more).",
        json_schema_extra=for_methods("apply"))
    lines_alpha: Optional[float] = Field(
        None, ge=0, le=10, description="apply with lines: LiNeS' alpha, the scale of the "
                                      "shallowest layer and of the tensors outside the "
                                      "layers. Empty: the multi-task norm ratio (needs two "
                                      "or more vectors).",
        json_schema_extra=for_methods("apply"))
    lines_beta: Optional[float] = Field(
        None, ge=-10, le=10, description="apply with lines: LiNeS' beta, what the deepest "
                                        "layer adds to alpha. Empty: 1 - alpha (the last "
                                        "layer keeps the whole update).",
        json_schema_extra=form_hints(for_methods("apply"), ADVANCED))
    learn_granularity: Literal[tuple(GRANULARITIES)] = Field(
        "tensor", description="learn: what one learned lambda covers. "
                              + "; ".join(f"{k}: {v}" for k, v in GRANULARITIES.items()),
        json_schema_extra=form_hints(for_methods("learn"), ADVANCED))
    layer_scales: Optional[list[float]] = Field(
        None, description="apply: one factor per decoder layer, multiplying every vector's "
                          "lambda on that layer's tensors (for LiNeS, use lines). "
                          "Empty: 1.0.",
        json_schema_extra=form_hints(for_methods("apply", "learn"), ADVANCED))
    block_scales: Optional[dict[str, float]] = Field(
        None, description="apply: {regular expression: factor}; the first pattern found in a "
                          "tensor's name multiplies its lambda, e.g. {'self_attn': 0.5, "
                          "'mlp': 1.2, 'embed_tokens|lm_head': 0}. Empty: none.",
        json_schema_extra=form_hints(for_methods("apply", "learn"), ADVANCED))
    density: Optional[float] = Field(
        None, gt=0, le=1, description="extract: keep only this fraction of each tensor's "
                                      "entries, the largest in magnitude, stored as values and "
                                      "indices. Empty: the whole vector.",
        json_schema_extra=for_methods("extract"))
    dtype: Literal[DTYPES] = Field(
        "float32", description="extract: dtype tau is stored in (it is computed in float32).",
        json_schema_extra=form_hints(for_methods("extract"), ADVANCED))
    graft_density: float = Field(
        0.0001, gt=0, le=1, description="graft: fraction of the vector's entries kept, the "
                                        "largest in magnitude (the paper grafts about 0.01% "
                                        "of the parameters: 0.0001).",
        json_schema_extra=form_hints(for_methods("graft"), LOG_SCALE))
    learn_mask: bool = Field(
        False, description="graft: learn the mask on data_file, as the paper does: gamma = "
                           "gamma_base + (1 - 2 gamma_base) * sigmoid(S - b), started at the "
                           "top-k magnitudes (S = 0), rounded at the end.",
        json_schema_extra=for_methods("graft"))
    mask_sigmoid_bias: float = Field(
        5.0, ge=1, le=20, description="graft with learn_mask: b above; the mask starts within "
                                      "sigmoid(-b) of binary (5: 0.0067).",
        json_schema_extra=form_hints(for_methods("graft"), ADVANCED))
    compare_grafts: list[CheckpointRef] = Field(
        default_factory=list,
        json_schema_extra=form_hints({"x-weightsmith": "checkpoints"}, for_methods("graft")),
        description="graft: earlier grafts (of other skills) whose masks this graft's mask is "
                    "compared with; their overlap (shared entries, Jaccard similarity) is "
                    "recorded as mask_overlap. Empty: none.")
    data_file: Optional[LocalFile] = Field(
        None, description="learn, graft with learn_mask: UTF-8 text, or .jsonl with a 'text' "
                          "field per line, on which the coefficients (or mask) are trained.",
        json_schema_extra=for_methods("learn", "graft"))
    steps: int = Field(50, ge=1, le=100000, description="learn, graft: optimiser steps.",
                       json_schema_extra=form_hints(for_methods("learn", "graft"), ADVANCED))
    learning_rate: float = Field(
        0.05, gt=0, description="learn, graft: Adam's step size.",
        json_schema_extra=form_hints(for_methods("learn", "graft"), LOG_SCALE, ADVANCED))
    samples: int = Field(16, ge=1, le=4096,
                         description="learn, graft: token windows drawn from data_file.",
                         json_schema_extra=form_hints(for_methods("learn", "graft"), ADVANCED))
    length: int = Field(64, ge=8, le=8192, description="learn, graft: tokens per window.",
                        json_schema_extra=form_hints(for_methods("learn", "graft"), ADVANCED))
    seed: int = Field(0, description="Random seed for the data windows.",
                      json_schema_extra=form_hints(for_methods("learn", "graft"), ADVANCED))
    name: Optional[str] = Field(None, min_length=1, max_length=100,
                                description="Name of the new checkpoint. Empty: derived.")

    @field_validator("data_file")
    @classmethod
    def _readable(cls, value, info):
        return check_text_file(value, info.field_name)

    @field_validator("block_scales")
    @classmethod
    def _patterns(cls, value):
        for pattern in value or {}:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression ({e})") from None
        return value

    @model_validator(mode="after")
    def _action_fields(self):
        a = self.action
        if a == "extract":
            missing = [f for f in ("finetuned", "base") if not getattr(self, f)]
            if missing:
                raise ValueError(f"extract needs {' and '.join(missing)}")
            if self.vectors or self.target:
                raise ValueError("extract reads finetuned and base; vectors and target are for "
                                 "apply, learn and graft")
        else:
            if not self.vectors:
                raise ValueError(f"{a} needs vectors (task vectors made by extract)")
            if a in ("apply", "learn") and not self.target:
                raise ValueError(f"{a} needs a target checkpoint")
            if a == "graft" and len(self.vectors) != 1:
                raise ValueError(f"graft takes exactly one vector, got {len(self.vectors)}")
            if self.finetuned or self.base:
                raise ValueError(f"finetuned and base are for extract, not {a}")
            if self.density is not None:
                raise ValueError("density is for extract; graft uses graft_density")
            if self.compare_grafts and a != "graft":
                raise ValueError(f"compare_grafts is for graft, not {a}")
        if not self.lines and (self.lines_alpha is not None or self.lines_beta is not None):
            raise ValueError("lines_alpha and lines_beta are read only with lines: true")
        if self.lines:
            if a != "apply":
                raise ValueError(f"lines is a preset of apply, not {a}")
            if self.layer_scales is not None:
                raise ValueError("lines sets the per-layer scales itself: leave layer_scales "
                                 "empty")
            if self.lines_alpha is None and len(self.vectors) < 2:
                raise ValueError("lines with one vector needs lines_alpha (the multi-task "
                                 "alpha, a norm ratio over the vectors, needs two or more)")
        if self.weights is not None and len(self.weights) != len(self.vectors):
            raise ValueError(f"weights has {len(self.weights)} values for "
                             f"{len(self.vectors)} vectors")
        if (a == "learn" or (a == "graft" and self.learn_mask)) and not self.data_file:
            raise ValueError(f"{a}{' with learn_mask' if a == 'graft' else ''} needs a "
                             f"data_file to train on")
        return self


def _weight_files(folder: Path) -> list[Path]:
    from ops.checkpoint_files import weight_files

    files = weight_files(folder)
    if any(f.suffix != ".safetensors" for f in files):
        raise ValueError(f"{folder} stores pickled weights ({files[0].name}); task vectors "
                         f"need safetensors")
    return files


def _open_vectors(ctx, refs: list[str]):
    from ops.task_vectors import StoredVector

    opened = [ctx.open(ref) for ref in refs]
    return opened, [StoredVector(ck.path, label=ck.name) for ck in opened]


def _copy_non_weights(source: Path, dest: Path) -> None:
    """config, tokenizer, generation config and shard index of the target (not its card)."""
    from ops.task_vectors import MANIFEST

    for file in source.iterdir():
        if file.is_file() and file.suffix not in WEIGHT_SUFFIXES and not \
                file.name.startswith(".") and file.name not in ("README.md", MANIFEST):
            shutil.copy2(file, dest / file.name)


def _batches(target, config: Config, ctx) -> tuple[list, dict]:
    from plugins.kit.textfiles import read_text_file, sample_windows, sha256_text

    path, text = read_text_file(config.data_file, "data_file")
    ids = target.load_tokenizer()(text)["input_ids"]
    windows, digest = sample_windows(ids, config.samples, config.length, config.seed,
                                     "data_file")
    ctx.log(f"data: {config.samples} x {config.length} tokens from {path}")
    info = {"file": str(path), "file_sha256": sha256_text(text), "tokens_sha256": digest,
            "samples": config.samples, "length": config.length, "seed": config.seed}
    return list(windows.split(4)), info


def extract(config: Config, ctx) -> None:
    import torch

    from ops import task_vectors as T

    ft, base = ctx.open(config.finetuned), ctx.open(config.base)
    ctx.log(f"extracting tau = {ft.name} - {base.name}"
            + (f", top {config.density:g} of each tensor" if config.density else ""))
    out = ctx.new_checkpoint(
        "task_vector", name=config.name or f"{ft.name}-task-vector",
        parents=[{"checkpoint": ft, "role": "finetuned", "weight": 1.0},
                 {"checkpoint": base, "role": "base", "weight": -1.0}])
    stats = T.extract(_weight_files(ft.path), _weight_files(base.path), out.path,
                      density=config.density, dtype=getattr(torch, config.dtype),
                      labels=(f"fine-tune {ft.name}", f"base {base.name}"),
                      progress=lambda d, n: ctx.progress(0.05 + 0.9 * d / n, "tensors"))
    manifest = {"format": T.FORMAT, "version": 1, "dtype": config.dtype,
                "density": config.density,
                "finetuned": {"id": ft.id, "name": ft.name},
                "base": {"id": base.id, "name": base.name}, "tensors": stats.pop("tensors")}
    import json

    (out.path / T.MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.copy2(ft.path / "config.json", out.path / "config.json")
    out.metadata.update(stats, dtype=config.dtype, density=config.density,
                        finetuned=ft.id, base=base.id,
                        compression=stats["stored_bytes"] / max(stats["dense_bytes"], 1))
    for i, value in enumerate(stats["norm_per_layer"]):
        ctx.metric("norm", value, step=i)
    ctx.log(f"||tau|| = {stats['norm']:.6g}; per layer "
            + ", ".join(f"{v:.4g}" for v in stats["norm_per_layer"]))
    ctx.log(f"{stats['kept']:,} of {stats['entries']:,} entries kept; "
            f"{stats['stored_bytes']:,} bytes stored ({stats['dense_bytes']:,} dense)")
    ctx.progress(1.0, "extracted")


def apply(config: Config, ctx) -> None:
    from ops import task_vectors as T

    target = ctx.open(config.target)
    opened, vectors = _open_vectors(ctx, config.vectors)
    files = _weight_files(target.path)
    default = 0.0 if config.action == "learn" else 1.0  # aTLAS starts at 0
    weights = config.weights or [default] * len(vectors)
    learned: Optional[list] = None
    lines: Optional[dict] = _lines(config, ctx, files, vectors, weights) if config.lines \
        else None

    def lam(i: int, name: str) -> float:
        value = T.coefficient(name, weights[i], config.layer_scales, config.block_scales,
                              learned[i] if learned else None)
        if lines is not None:
            value *= T.lines_coefficient(name, lines["layers"], lines["alpha"], lines["beta"])
        return value

    # apply: a tensor whose lambda is 0 is left out, so it may differ in shape (a grown
    # vocabulary); learn may move any lambda, so every tensor must fit
    T.check_compatible(T.Shards(files), vectors, f"target {target.name}",
                       used=None if config.action == "learn" else
                       lambda i, name: lam(i, name) != 0)
    learned_meta: dict = {}
    if config.action == "learn":
        learned, learned_meta = _learn(config, ctx, target, vectors, weights,
                                       [ck.id for ck in opened])

    out = ctx.new_checkpoint(
        "task_vector_apply", name=config.name or f"{target.name}-plus-"
                                                 f"{'-'.join(ck.name for ck in opened)}"[:100],
        parents=[{"checkpoint": target, "role": "base"}]
        + [{"checkpoint": ck, "role": "task_vector", "weight": w, "relation": "task_vector"}
           for ck, w in zip(opened, weights)],
        metadata={"action": config.action, "weights": weights,
                  "layer_scales": config.layer_scales, "block_scales": config.block_scales,
                  "vectors": [ck.id for ck in opened], **({"lines": lines} if lines else {}),
                  **learned_meta})
    ctx.log(f"writing {target.name} + " + " + ".join(
        f"{w:g} * {ck.name}" for ck, w in zip(opened, weights)))
    T.write_updated(files, out.path, T.combined_delta(vectors, lam),
                    progress=lambda d, n: ctx.progress(0.6 + 0.35 * d / n, "tensors"))
    _copy_non_weights(target.path, out.path)
    ctx.progress(1.0, "applied")


def _lines(config: Config, ctx, files, vectors, weights) -> dict:
    """LiNeS' alpha, beta and L for apply; alpha empty: the multi-task norm ratio
    (||sum_i tau_i||_1 / ||sum_i lambda_i tau_i||_1) / T, lambda_i the weight (and block
    scale) each vector would be added with, read in one pass over the vectors."""
    from ops import task_vectors as T

    layers = T.decoder_layers(T.Shards(files).keys())
    info: dict = {"layers": layers, "tasks": len(vectors)}
    alpha = config.lines_alpha
    if alpha is None:
        sum_l1 = merged_l1 = 0.0
        for name in sorted({n for v in vectors for n in v.names()}):
            terms = [(T.coefficient(name, weights[i], None, config.block_scales),
                      vector.get(name)) for i, vector in enumerate(vectors) if name in vector]
            sum_l1 += float(sum(tau for _, tau in terms).double().abs().sum())
            merged_l1 += float(sum(c * tau for c, tau in terms).double().abs().sum())
        alpha = T.lines_multitask_alpha(sum_l1, merged_l1, len(vectors))
        info.update(sum_l1=sum_l1, merged_l1=merged_l1, alpha_from="multi-task norm ratio")
    else:
        info["alpha_from"] = "given"
    beta = 1.0 - alpha if config.lines_beta is None else config.lines_beta
    info.update(alpha=float(alpha), beta=float(beta))
    ctx.log(f"LiNeS: lambda(l) = {alpha:.6g} + {beta:.6g} * l / ({layers} - 1) on decoder "
            f"layer l, {alpha:.6g} outside the layers (alpha {info['alpha_from']})")
    return info


def _learn(config: Config, ctx, target, vectors, weights, ids):
    import torch

    from ops import task_vectors as T

    batches, data = _batches(target, config, ctx)
    model = target.load_model(device=ctx.device, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    dense = [{n: v.get(n) for n in v.names()} for v in vectors]
    key = T.GRANULARITIES[config.learn_granularity]
    init = [{key(n): T.coefficient(n, weights[i], config.layer_scales, config.block_scales)
             for n in v} for i, v in enumerate(dense)]
    ctx.progress(0.1, "learning coefficients")
    result = T.learn_coefficients(
        model, dense, batches, init=init, granularity=config.learn_granularity,
        steps=config.steps, lr=config.learning_rate,
        log=lambda step, loss: ctx.metric("loss", loss, step=step))
    del model, dense
    count = sum(len(table) for table in result["coefficients"])
    ctx.log(f"loss on data_file: {result['loss_before']:.5f} -> {result['loss_after']:.5f} "
            f"({count} coefficients: {len(result['coefficients'][0])} per vector, one per "
            f"{'parameter tensor' if config.learn_granularity == 'tensor' else 'layer module'})")
    meta = {"data": data, "loss_before": result["loss_before"],
            "loss_after": result["loss_after"], "steps": config.steps,
            "learning_rate": config.learning_rate, "granularity": config.learn_granularity,
            "coefficient_count": count,
            "coefficients": dict(zip(ids, result["coefficients"]))}
    return result["coefficients"], meta


def graft(config: Config, ctx) -> None:
    import torch

    from ops import task_vectors as T

    opened, vectors = _open_vectors(ctx, config.vectors)
    vector_ck, vector = opened[0], vectors[0]
    target = ctx.open(config.target or vector.manifest["base"]["id"])
    files = _weight_files(target.path)
    T.check_compatible(T.Shards(files), vectors, f"target {target.name}")
    tau = {n: vector.get(n) for n in vector.names()}
    meta: dict = {"action": "graft", "graft_density": config.graft_density,
                  "learn_mask": config.learn_mask, "vector": vector_ck.id}
    meta["mask_sigmoid_bias"] = config.mask_sigmoid_bias if config.learn_mask else None
    if config.learn_mask:
        batches, meta["data"] = _batches(target, config, ctx)
        model = target.load_model(device=ctx.device, dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(False)
        ctx.progress(0.1, "learning the mask")
        result = T.learn_graft_mask(model, tau, config.graft_density, batches,
                                    steps=config.steps, lr=config.learning_rate,
                                    bias=config.mask_sigmoid_bias,
                                    log=lambda step, loss: ctx.metric("loss", loss, step=step))
        del model
        mask = result["mask"]
        start_kept = int(sum(int(m.sum()) for m in result["start"].values()))
        meta.update(loss_magnitude_mask=result["loss_magnitude"],
                    loss_learned_mask=result["loss_learned"], kept_at_start=start_kept,
                    mask_start_gap=result["gate_start_gap"])
        ctx.log(f"loss of the graft: magnitude mask {result['loss_magnitude']:.5f} "
                f"({start_kept:,} entries), learned mask {result['loss_learned']:.5f}")
    else:
        mask = T.top_mask({n: t.abs() for n, t in tau.items()}, config.graft_density)
    per_layer, other = T.skill_per_layer(mask)
    kept = int(sum(int(m.sum()) for m in mask.values()))
    total = sum(m.numel() for m in mask.values())
    meta.update(kept=kept, entries=total, skill_per_layer=per_layer, skill_other=other)
    ctx.log(f"grafting {kept:,} of {total:,} entries ({kept / total:.3%}); fraction kept per "
            f"layer " + ", ".join(f"{v:.2e}" for v in per_layer))
    for i, value in enumerate(per_layer):
        ctx.metric("skill", value, step=i)
    overlaps = []
    for ref in config.compare_grafts:
        other_ck = ctx.open(ref)
        overlap = T.mask_overlap(mask, T.load_mask(other_ck.path, other_ck.name))
        overlaps.append({"graft": other_ck.id, "name": other_ck.name, **overlap})
        ctx.log(f"mask overlap with {other_ck.name}: {overlap['shared']:,} shared entries, "
                f"Jaccard similarity {overlap['jaccard']:.4f}")
    if overlaps:
        meta["mask_overlap"] = overlaps
    out = ctx.new_checkpoint(
        "graft", name=config.name or f"{target.name}-graft-{vector_ck.name}"[:100],
        parents=[{"checkpoint": target, "role": "base"},
                 {"checkpoint": vector_ck, "role": "task_vector", "relation": "task_vector",
                  "density": kept / total}],
        metadata=meta)
    T.save_mask(mask, out.path)

    def delta(name: str):
        return tau[name] * mask[name] if name in mask else None

    T.write_updated(files, out.path, delta,
                    progress=lambda d, n: ctx.progress(0.6 + 0.35 * d / n, "tensors"))
    _copy_non_weights(target.path, out.path)
    ctx.progress(1.0, "grafted")


def run(config: Config, ctx) -> None:
    if config.action == "extract":
        extract(config, ctx)
    elif config.action in ("apply", "learn"):
        apply(config, ctx)
    else:
        graft(config, ctx)


PLUGIN = Plugin(
    name="task_vector",
    order=40,
    title="Task vectors",
    description="Extract a task vector (fine-tune - base) as a stored artifact, apply vectors "
                "to any compatible checkpoint with per-layer/per-block coefficients (or learn "
                "them on data), or graft a tiny mask of one.",
    Config=Config,
    run=run,
    per_layer_series=("norm_per_layer", "skill_per_layer"),
    next_steps={"task_vector": NextStep("task_vector", (
        "A task vector is not a model: set `action: apply` (or learn, graft), put its id in "
        "`vectors` and choose a `target`."))},
)
