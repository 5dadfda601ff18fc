"""prune: zero or remove weights (ops/prune.py), with the quality cost measured on the spot."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from plugins import (ADVANCED, LOG_SCALE, METHOD_SELECTOR, CheckpointRef, LocalFile, NextStep,
                     Plugin, PluginConfig, for_methods, form_hints)

from plugins.kit.assets import DEMO_CORPUS, DEMO_HELDOUT
from plugins.kit.textfiles import check_text_file

METHODS = {
    "magnitude": "zero the smallest |W| (no data needed)",
    "wanda": "zero the lowest |W_ij| * ||X_j|| of each output row (Sun et al. 2023)",
    "sparsegpt": "zero weights and update the rest to reconstruct each layer's output "
                 "(Frantar & Alistarh 2023)",
    "structured": "remove whole attention groups and MLP channels: a smaller, faster model",
    "dpruner": "D-Pruner (Zhang et al. 2024): score each weight by how much zeroing it changes "
               "the domain loss (domain_file) regularised by its general importance "
               "(calibration_file)",
}
DATA_METHODS = ("wanda", "sparsegpt", "structured", "dpruner")
MIXED_STATISTICS = ("wanda", "sparsegpt", "structured")  # methods domain_weight mixes


def nm_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4). Parsed here, not in ops/, so validating a form never imports torch."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match:
        raise ValueError(f"{pattern!r} is not of the form N:M (for example 2:4)")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(f"{pattern!r}: need 0 < N < M (N weights kept of every M)")
    return n, m


# dpruner's default λ, measured on the demo model (README, `### prune`)
DPRUNER_LAMBDA = 1e5


class Config(PluginConfig):
    checkpoint: CheckpointRef = Field(description="Checkpoint to prune: registry id, name, "
                                                  "local folder or Hub id.")
    method: Literal["magnitude", "wanda", "sparsegpt", "structured", "dpruner"] = Field(
        "wanda", description="; ".join(f"{k}: {v}" for k, v in METHODS.items()),
        json_schema_extra=METHOD_SELECTOR)
    sparsity: float = Field(0.5, ge=0, lt=1, description=(
        "Fraction of the decoder's linear weights set to zero (magnitude, wanda, sparsegpt, "
        "dpruner). structured: the fraction of MLP channels removed from every layer."))
    pattern: Optional[str] = Field(None, description=(
        "N:M semi-structured sparsity, e.g. 2:4 or 4:8: at most N non-zero weights in every M "
        "consecutive inputs of a row. Replaces sparsity and scope. Empty: unstructured."),
        json_schema_extra=for_methods("magnitude", "wanda", "sparsegpt", "dpruner"))
    scope: Optional[Literal["row", "layer", "global"]] = Field(None, description=(
        "Where weights compete: within each output row, within each matrix, or across the "
        "whole model (magnitude only). Empty: the method's own (wanda: row, others: layer)."),
        json_schema_extra=form_hints(for_methods("magnitude", "wanda", "sparsegpt", "dpruner"),
                                     ADVANCED))
    importance: Literal["magnitude", "taylor"] = Field("magnitude", description=(
        "structured: rank groups by their weight norm, or by first-order Taylor importance "
        "on the calibration data (needs a backward pass)."),
        json_schema_extra=for_methods("structured"))
    attention_groups_removed: int = Field(0, ge=0, description=(
        "structured: key/value head groups (each with its query heads, so GQA stays uniform) "
        "removed from every layer."),
        json_schema_extra=for_methods("structured"))
    calibration_file: Optional[LocalFile] = Field(None, description=(
        "UTF-8 text, or .jsonl with a 'text' field per line, for activations and importance "
        "(wanda, sparsegpt, taylor; dpruner: the general set its general importance comes "
        "from). Use text like the text the pruned model must keep: sparsegpt also updates "
        "the kept weights to reproduce each layer's outputs on this text, so text of another "
        "domain costs it more than wanda (README, prune). Empty: the demo corpus "
        "(assets/demo/corpus.txt)."),
        json_schema_extra=for_methods(*DATA_METHODS))
    calibration_samples: int = Field(64, ge=1, le=4096, description=(
        "Calibration windows, drawn at seeded random offsets. sparsegpt fits its weight "
        "update to them (the Wanda and SparseGPT papers use 128 windows of 2048 tokens)."),
        json_schema_extra=form_hints(for_methods(*DATA_METHODS), ADVANCED))
    calibration_length: int = Field(128, ge=8, le=8192,
                                    description="Tokens per calibration window.",
        json_schema_extra=form_hints(for_methods(*DATA_METHODS), ADVANCED))
    domain_file: Optional[LocalFile] = Field(None, description=(
        "UTF-8 text of the domain to keep; perplexity is reported on it too. dpruner "
        "(required): the domain calibration set whose regularised loss scores the weights. "
        "wanda, sparsegpt, structured: the mixed_statistics option, a linear mix "
        "(1 - domain_weight) * general + domain_weight * domain of the two sets' importance "
        "statistics (ours, not D-Pruner)."),
        json_schema_extra=form_hints(for_methods(*DATA_METHODS), ADVANCED))
    domain_weight: float = Field(0.5, ge=0, le=1, description=(
        "mixed_statistics: weight of the domain statistics in the mix (0: general only, 1: "
        "domain only)."),
        json_schema_extra=form_hints(for_methods(*MIXED_STATISTICS), ADVANCED))
    dpruner_lambda: float = Field(DPRUNER_LAMBDA, ge=0, le=1e12, description=(
        "dpruner: λ, the weight of the general-importance regulariser "
        "λ·Σ G·(θ' − θ)² in the domain loss. 0: the domain-only Taylor score."),
        json_schema_extra=for_methods("dpruner"))
    dpruner_learning_rate: float = Field(0.0, ge=0, le=1, description=(
        "dpruner: take a gradient step of this size on the regularised loss after each "
        "domain batch while scoring, as the paper scores during fine-tuning (the weights "
        "are restored before pruning). 0: score at the original weights."),
        json_schema_extra=form_hints(for_methods("dpruner"), ADVANCED, LOG_SCALE))
    dampening: float = Field(0.01, gt=0, le=1, description=(
        "sparsegpt: added to the Hessian diagonal, as a fraction of its mean."),
        json_schema_extra=form_hints(for_methods("sparsegpt"), ADVANCED))
    block_size: int = Field(128, ge=1, le=4096,
                            description="sparsegpt: columns processed per block.",
                            json_schema_extra=form_hints(for_methods("sparsegpt"), ADVANCED))
    eval_file: Optional[LocalFile] = Field(None, description=(
        "UTF-8 text on which perplexity is measured before and after. Empty: the demo "
        "held-out text (assets/demo/heldout.txt)."),
        json_schema_extra=ADVANCED)
    eval_max_tokens: Optional[int] = Field(None, ge=2, description=(
        "Measure perplexity on the first N tokens only (quick checks). Empty: all."),
        json_schema_extra=ADVANCED)
    seed: int = Field(0, description="Random seed for the calibration windows.",
                      json_schema_extra=ADVANCED)
    name: Optional[str] = Field(None, min_length=1, max_length=100,
                                description="Name of the new checkpoint. Empty: derived.")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value):
        if value is not None:
            nm_pattern(value)
        return value

    @field_validator("calibration_file", "domain_file", "eval_file")
    @classmethod
    def _readable(cls, value, info):
        return check_text_file(value, info.field_name)

    @model_validator(mode="after")
    def _method_settings(self):
        m = self.method
        if m == "structured":
            if self.pattern:
                raise ValueError("pattern (N:M) zeroes weights; it does not apply to method "
                                 "structured")
            if self.sparsity == 0 and self.attention_groups_removed == 0:
                raise ValueError("structured: set sparsity (MLP channels) or "
                                 "attention_groups_removed above 0, or nothing is removed")
        if self.scope == "global" and m != "magnitude":
            raise ValueError(f"scope global is for method magnitude, not {m}")
        if self.scope == "row" and m == "sparsegpt":
            raise ValueError("sparsegpt chooses its mask per column block of a layer; "
                             "scope row does not apply")
        if self.domain_file and not self.uses_data:
            raise ValueError(f"domain_file needs importance measured on data (wanda, "
                             f"sparsegpt, dpruner, or structured with importance taylor), "
                             f"not {m}"
                             + (" with importance magnitude" if m == "structured" else ""))
        if m == "dpruner" and not self.domain_file:
            raise ValueError("dpruner needs domain_file: the domain text whose loss scores "
                             "the weights")
        if self.pattern and self.sparsity != 0.5 and self.sparsity != self._nm_sparsity():
            raise ValueError(f"pattern {self.pattern} fixes the sparsity at "
                             f"{self._nm_sparsity():g}; leave sparsity at its default")
        return self

    @property
    def uses_data(self) -> bool:
        return self.method in ("wanda", "sparsegpt", "dpruner") or (
            self.method == "structured" and self.importance == "taylor")

    def _nm_sparsity(self) -> float:
        n, m = nm_pattern(self.pattern)
        return 1 - n / m


def _windows(tokenizer, path, default, config: Config, field: str) -> tuple[list, dict, str]:
    from plugins.kit.textfiles import read_text_file, sample_windows, sha256_text

    path, text = read_text_file(path, field, default)
    ids = tokenizer(text)["input_ids"]
    windows, digest = sample_windows(ids, config.calibration_samples,
                                     config.calibration_length, config.seed, field)
    info = {"file": str(path), "file_sha256": sha256_text(text), "tokens_sha256": digest,
            "samples": config.calibration_samples, "length": config.calibration_length,
            "seed": config.seed}
    return list(windows.split(8)), info, text  # batches of 8 windows: (8, length) each


def _perplexity(model, tokenizer, text: str, max_tokens: int | None) -> tuple[float, int]:
    """The evaluate plugin's default measurement (window 256, stride 128)."""
    import torch

    from ops.perplexity import sliding_window_nll

    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if max_tokens:
        ids = ids[:max_tokens]
    window = min(256, getattr(model.config, "max_position_embeddings", 256) or 256)
    result = sliding_window_nll(model, ids, window, window // 2)
    return result.perplexity, result.tokens


def _latency_ms(model, prompt, new_tokens: int = 32, repeats: int = 5) -> float:
    """Median wall time of a greedy generation of `new_tokens` from a fixed prompt."""
    import torch

    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first run warms up and is not counted
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=model.config.pad_token_id or 0)
            if prompt.is_cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[1:])


def run(config: Config, ctx) -> None:
    import torch

    from plugins.kit.textfiles import read_text_file
    from ops import prune as P

    ck = ctx.open(config.checkpoint)
    ctx.log(f"pruning {ck.name} ({ck.id}) with {config.method} on {ctx.device}")
    model = ck.load_model(device=ctx.device)
    tokenizer = ck.load_tokenizer()
    P.check_supported(model)
    device = next(model.parameters()).device

    eval_path, eval_text = read_text_file(config.eval_file, "eval_file", DEMO_HELDOUT)
    eval_sets = {f"ppl:{eval_path.name}": eval_text}
    general = domain = None
    meta: dict = {"method": config.method}
    if config.uses_data:
        general, meta["calibration"], _ = _windows(tokenizer, config.calibration_file,
                                                   DEMO_CORPUS, config, "calibration_file")
        ctx.log(f"calibration: {config.calibration_samples} x {config.calibration_length} "
                f"tokens from {meta['calibration']['file']}")
    if config.domain_file:
        domain, meta["domain"], domain_text = _windows(tokenizer, config.domain_file, None,
                                                       config, "domain_file")
        if config.method == "dpruner":
            meta["domain"].update(strategy="dpruner", dpruner_lambda=config.dpruner_lambda,
                                  dpruner_learning_rate=config.dpruner_learning_rate)
        else:
            meta["domain"].update(strategy="mixed_statistics", weight=config.domain_weight)
        eval_sets[f"ppl:{Path(meta['domain']['file']).name}"] = domain_text
    ctx.progress(0.05, "measuring perplexity before")
    before = {task: _perplexity(model, tokenizer, text, config.eval_max_tokens)
              for task, text in eval_sets.items()}
    params_before = P.count_parameters(model)
    prompt = torch.tensor([tokenizer(eval_text)["input_ids"][:16]], device=device)

    def layer_progress(done: int, total: int) -> None:
        ctx.progress(0.1 + 0.7 * done / total, f"layer {done}/{total}")

    if config.method == "structured":
        latency_before = _latency_ms(model, prompt)
        per_layer_params = [sum(p.numel() for p in layer.parameters())
                            for layer in P.decoder_layers(model)]
        groups = config.attention_groups_removed
        channels = int(model.config.intermediate_size * config.sparsity)
        _, kv, _ = P.attention_shape(model)
        if groups >= kv:
            raise ValueError(f"attention_groups_removed ({groups}) must be below the model's "
                             f"key/value head count ({kv})")
        if channels >= model.config.intermediate_size:
            raise ValueError(f"sparsity {config.sparsity} would remove every MLP channel")
        if config.importance == "taylor":
            ctx.progress(0.1, "first-order Taylor importance (backward passes)")
            head_scores, mlp_scores = P.structured_scores(
                model, "taylor", P.taylor_weight_scores(model, general))
            if domain:
                dom_heads, dom_mlp = P.structured_scores(
                    model, "taylor", P.taylor_weight_scores(model, domain))
                w = config.domain_weight
                head_scores = [(1 - w) * g + w * d for g, d in
                               zip(P.normalise(head_scores), P.normalise(dom_heads))]
                mlp_scores = [(1 - w) * g + w * d for g, d in
                              zip(P.normalise(mlp_scores), P.normalise(dom_mlp))]
        else:
            head_scores, mlp_scores = P.structured_scores(model, "magnitude")
        keep_groups = P.keep_top(head_scores, groups)
        keep_channels = P.keep_top(mlp_scores, channels)
        P.remove_structures(model, keep_groups, keep_channels)
        per_layer = [1 - sum(p.numel() for p in layer.parameters()) / n
                     for layer, n in zip(P.decoder_layers(model), per_layer_params)]
        params_after = P.count_parameters(model)
        latency_after = _latency_ms(model, prompt)
        meta.update(
            importance=config.importance, attention_groups_removed=groups,
            mlp_channels_removed=channels, kept_attention_groups=keep_groups,
            sparsity_per_layer=per_layer,  # the fraction of each layer's parameters removed
            sparsity=1 - params_after / params_before,
            parameters={"before": params_before, "after": params_after},
            latency_ms={"before": latency_before, "after": latency_after,
                        "prompt_tokens": prompt.shape[1], "new_tokens": 32,
                        "device": str(device)},
            config_change={"num_attention_heads": model.config.num_attention_heads,
                           "num_key_value_heads": model.config.num_key_value_heads,
                           "head_dim": model.config.head_dim,
                           "intermediate_size": model.config.intermediate_size})
        ctx.log(f"parameters {params_before:,} -> {params_after:,}; latency of 32 tokens "
                f"{latency_before:.1f} -> {latency_after:.1f} ms")
    else:
        pattern = nm_pattern(config.pattern) if config.pattern else None
        scope = config.scope or ("row" if config.method == "wanda" else "layer")
        if config.method == "dpruner":
            ctx.progress(0.1, "general importance, then Taylor scores of the regularised "
                              "domain loss (backward passes)")
            result = P.prune_dpruner(
                model, general, domain, config.sparsity, lam=config.dpruner_lambda,
                learning_rate=config.dpruner_learning_rate, pattern=pattern, scope=scope,
                dampening=config.dampening, progress=layer_progress)
        else:
            result = P.prune_unstructured(
                model, config.method, config.sparsity, pattern=pattern, scope=scope,
                general=general, domain=domain, domain_weight=config.domain_weight,
                block_size=config.block_size, dampening=config.dampening,
                progress=layer_progress)
        per_layer, total = P.sparsity_of(model)
        zeros = sum(int((p == 0).sum()) for p in model.parameters())
        meta.update(pattern=config.pattern, scope=None if pattern else scope,
                    target_sparsity=1 - pattern[0] / pattern[1] if pattern
                    else config.sparsity,
                    sparsity=total, sparsity_per_layer=per_layer,
                    sparsity_per_module=result.per_module,
                    sparsity_of_all_parameters=zeros / params_before)
        if result.reconstruction_error:
            meta["reconstruction_error"] = result.reconstruction_error
        ctx.log(f"sparsity {total:.4f} of the decoder linears ({zeros / params_before:.4f} of "
                f"all parameters); per layer " + ", ".join(f"{s:.3f}" for s in per_layer))
    for i, value in enumerate(meta["sparsity_per_layer"]):
        ctx.metric("sparsity", value, step=i)

    ctx.progress(0.85, "measuring perplexity after")
    after = {task: _perplexity(model, tokenizer, text, config.eval_max_tokens)
             for task, text in eval_sets.items()}
    meta["perplexity"] = {task: {"before": before[task][0], "after": after[task][0],
                                 "tokens": after[task][1]} for task in eval_sets}
    for task in eval_sets:
        ctx.log(f"{task}: perplexity {before[task][0]:.4f} -> {after[task][0]:.4f}")

    ctx.progress(0.9, "writing checkpoint")
    suffix = config.pattern.replace(":", "of") if config.pattern else f"{config.sparsity:g}"
    out = ctx.new_checkpoint("prune", parents=[ck], metadata=meta,
                             name=config.name or f"{ck.name}-{config.method}-{suffix}")
    model.save_pretrained(out.path)
    tokenizer.save_pretrained(out.path)
    details = {"window": 256, "stride": 128, "measured_by": "prune"}
    for task in eval_sets:
        ctx.evaluation(ck, task, "perplexity", before[task][0],
                       details={**details, "tokens": before[task][1]})
        ctx.evaluation(out, task, "perplexity", after[task][0],
                       details={**details, "tokens": after[task][1]})
    ctx.progress(1.0, "done")


PLUGIN = Plugin(
    name="prune",
    order=50,
    title="Prune",
    description="Zero weights (magnitude, Wanda, SparseGPT, D-Pruner; unstructured or N:M) or "
                "remove attention groups and MLP channels; perplexity before and after is "
                "recorded.",
    Config=Config,
    run=run,
    per_layer_series=("sparsity_per_layer",),
    next_steps={"prune": NextStep("train", "Fine-tuning can recover what pruning cost.")},
)
