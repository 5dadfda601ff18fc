"""mixture_law: run a small grid of continual pre-training runs over replay ratio x steps,
fit the D-CPT law (ops/mixture_law.py) to their domain and general losses, and predict the
replay ratio that meets a target; the prediction is offered as a continue_pretrain job.

Each cell trains the base with continue_pretrain's own pieces (ops/continual.py: packing,
the replay order, the re-warm + cosine Trainer settings) and measures the mean next-token
loss on held-out domain and general blocks. Cells are cached under the lab's cache by a
content hash of everything that decides them, so a rerun with a wider grid trains only the
new cells. Registered continue_pretrain jobs of the lab are not reused: the job context
exposes only a job's record (its config), not the held-out losses this law needs.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from plugins import ADVANCED, LOG_SCALE, CheckpointRef, DataRef, LocalFile, Plugin, \
    PluginConfig, form_hints
from plugins.kit.assets import DEMO_HELDOUT

CELL_VERSION = "mixture_law-cell-1"  # bump when what a cell measures changes
MAX_CELLS = 64
LAW_PARAMETERS = 6  # ops.mixture_law.PARAMETERS (not imported here: it loads numpy)


class Config(PluginConfig):
    checkpoint: CheckpointRef = Field(description="Base checkpoint every run continues: "
                                                  "registry id, name, local folder or Hub id.")
    data: DataRef = Field(description=(
        "Domain text: a local .txt, .jsonl, .json, .csv or .parquet file, a folder of them, "
        "or a Hub dataset id. Each row of text_column is one document."))
    replay_data: DataRef = Field(description=(
        "General (upstream) text mixed into the domain stream, same forms as data."))
    text_column: str = Field("text", min_length=1, description="Column holding the text "
                                                               "(plain .txt: 'text').",
                             json_schema_extra=ADVANCED)
    replay_ratios: list[float] = Field([0.1, 0.3, 0.5], min_length=2, max_length=8,
                                       description=(
        "The grid's replay ratios: the share of general (replay) blocks, as continue_pretrain's "
        "replay_ratio; the domain share is 1 - replay_ratio. 2 to 8 distinct values in "
        "[0, 0.9]."))
    step_grid: list[int] = Field([50, 100, 200], min_length=2, max_length=8, description=(
        "The grid's run lengths in optimizer steps (each cell is a whole run with its own "
        "re-warm + cosine schedule). 2 to 8 distinct values."))
    objective: Literal["domain_within_general_budget", "general_within_domain_target"] = Field(
        "domain_within_general_budget", description=(
            "domain_within_general_budget: the lowest predicted domain loss whose general "
            "perplexity is at most (1 + max_general_ppl_increase) x the base's. "
            "general_within_domain_target: the lowest predicted general loss whose domain "
            "perplexity is at most domain_ppl_target."))
    max_general_ppl_increase: float = Field(0.05, ge=0, le=10, description=(
        "domain_within_general_budget: the general perplexity may rise by this fraction of "
        "the base's (0.05: +5%)."))
    domain_ppl_target: Optional[float] = Field(None, gt=1, le=1e6, description=(
        "general_within_domain_target: the domain perplexity to reach."))
    predict_steps: Optional[int] = Field(None, ge=1, le=1_000_000, description=(
        "Steps of the run to predict (and suggest). Empty: the largest of step_grid."))
    block_size: Optional[int] = Field(None, ge=8, description=(
        "Tokens per packed block. Empty: the model's max_position_embeddings, at most 1024."),
        json_schema_extra=ADVANCED)
    batch_size: int = Field(8, ge=1, le=4096, description="Blocks per optimizer step.")
    max_learning_rate: float = Field(3e-4, gt=0, le=1, description=(
        "Peak learning rate of each run's linear re-warm-up."),
        json_schema_extra=LOG_SCALE)
    min_learning_rate: float = Field(3e-5, ge=0, le=1, description=(
        "Learning rate at the end of each run's cosine decay."),
        json_schema_extra=form_hints(LOG_SCALE, ADVANCED))
    warmup_ratio: float = Field(0.01, ge=0, lt=1, description="Fraction of each run's steps "
                                                              "spent re-warming.",
                                json_schema_extra=ADVANCED)
    weight_decay: float = Field(0.1, ge=0, le=1, description="AdamW weight decay.",
                                json_schema_extra=ADVANCED)
    domain_eval_file: Optional[LocalFile] = Field(None, description=(
        "Held-out domain text. Empty: eval_blocks blocks held out of data."),
        json_schema_extra=ADVANCED)
    general_eval_file: Optional[LocalFile] = Field(None, description=(
        "Held-out general text. Empty: the demo held-out text."),
        json_schema_extra=ADVANCED)
    eval_blocks: int = Field(16, ge=1, le=4096, description="Blocks per held-out set.",
                             json_schema_extra=ADVANCED)
    law_eps: float = Field(0.1, gt=0, le=1, description=(
        "The law's eps in C / (r + eps)^gamma, held fixed in the fit."),
        json_schema_extra=ADVANCED)
    fit_starts: int = Field(16, ge=1, le=256, description="Seeded starts of the fit; the "
                                                          "best is kept.",
                            json_schema_extra=ADVANCED)
    seed: int = Field(0, ge=0, le=2 ** 32 - 1, description="Random seed (data order, fit "
                                                           "starts).",
                      json_schema_extra=ADVANCED)
    keep_runs: bool = Field(False, description=(
        "Register the model of every cell this job trains (relation continue_pretrain). "
        "Cells read from the cache were trained before and are not registered again."),
        json_schema_extra=ADVANCED)

    @field_validator("replay_ratios")
    @classmethod
    def _ratios(cls, value):
        for r in value:
            if not (math.isfinite(r) and 0 <= r <= 0.9):
                raise ValueError(f"every replay ratio must lie in [0, 0.9], got {r}")
        if len(set(value)) != len(value):
            raise ValueError(f"the replay ratios must be distinct, got {value}")
        return sorted(value)

    @field_validator("step_grid")
    @classmethod
    def _steps(cls, value):
        for s in value:
            if not 1 <= s <= 100_000:
                raise ValueError(f"every step count must lie in [1, 100000], got {s}")
        if len(set(value)) != len(value):
            raise ValueError(f"the step counts must be distinct, got {value}")
        return sorted(value)

    @model_validator(mode="after")
    def _settings(self):
        cells = len(self.replay_ratios) * len(self.step_grid)
        if cells < LAW_PARAMETERS + 1:
            raise ValueError(f"replay_ratios x step_grid gives {cells} runs; the law has "
                             f"{LAW_PARAMETERS} parameters, so give at least "
                             f"{LAW_PARAMETERS + 1} (3 x 3 is the smallest square grid)")
        if cells > MAX_CELLS:
            raise ValueError(f"replay_ratios x step_grid gives {cells} runs; at most "
                             f"{MAX_CELLS}")
        if self.predict_steps is not None and self.predict_steps < min(self.step_grid):
            raise ValueError(f"predict_steps ({self.predict_steps}) is below the grid's "
                             f"fewest steps ({min(self.step_grid)}); the law is fitted on "
                             f"the grid and does not extrapolate downwards")
        if self.objective == "general_within_domain_target" and self.domain_ppl_target is None:
            raise ValueError("objective general_within_domain_target needs domain_ppl_target")
        if self.min_learning_rate > self.max_learning_rate:
            raise ValueError(f"min_learning_rate ({self.min_learning_rate:g}) must not exceed "
                             f"max_learning_rate ({self.max_learning_rate:g})")
        return self


# ------------------------------------------------------------------------------ the data
def _weights_hash(folder: Path) -> str:
    """sha256 over the checkpoint's config and weight files (names and contents)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and (
        p.name == "config.json" or p.suffix in (".safetensors", ".bin")))
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _tensor_hash(t) -> str:
    """The blocks' bytes with their shape: (N, 512) and (N/2, 1024) cut one stream alike."""
    h = hashlib.sha256(f"{tuple(t.shape)}:{t.dtype}:".encode())
    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------- a cell
def _train_cell(config: Config, ctx, ck, tokenizer, pools, ratio: float, steps: int,
                out_dir: Path):
    """One continual pre-training run of `steps` steps at replay `ratio`; returns the model."""
    import torch
    from transformers import PrinterCallback, Trainer

    from ops import training as T
    from ops.continual import replay_order, rewarm_trainer_arguments
    from plugins.continue_pretrain import Stream

    model = ck.load_model(device=ctx.device, dtype=torch.float32)
    n_replay = pools["replay"].size(0) if ratio else 0
    order = replay_order(pools["domain"].size(0), n_replay, steps * config.batch_size, ratio,
                         config.seed)
    args = T.training_arguments(
        str(out_dir), device=ctx.device, seed=config.seed, data_seed=config.seed,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=1,
        **rewarm_trainer_arguments(steps, config.max_learning_rate, config.min_learning_rate,
                                   config.warmup_ratio, config.weight_decay),
        logging_steps=steps, eval_strategy="no", save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=Stream(order, pools),
                      processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return model


def _losses(model, evals: dict, batch_size: int) -> dict:
    from ops.continual import heldout_loss

    return {which: heldout_loss(model, blocks, batch_size) for which, blocks in evals.items()}


def _label(ratio: float) -> str:
    return f"{ratio:g}"


class Cells:
    """The base, the data and the held-out sets of one grid, and its cell cache: `measure`
    returns a cell's held-out losses, trained once and then read from the lab's cache."""

    def __init__(self, config: Config, ctx):
        import torch

        from ops.continual import pack_documents
        from plugins.continue_pretrain import documents, text_blocks

        self.config, self.ctx = config, ctx
        self.ck = ck = ctx.open(config.checkpoint)
        self.tokenizer = tokenizer = ck.load_tokenizer()
        sep = tokenizer.eos_token_id
        if sep is None:
            raise ValueError(f"{ck.name}'s tokenizer has no EOS token to separate documents")
        max_pos = ck.config().get("max_position_embeddings")
        block = config.block_size or min(max_pos or 1024, 1024)
        if max_pos and block > max_pos:
            raise ValueError(f"block_size ({block}) exceeds the model's "
                             f"max_position_embeddings ({max_pos})")
        domain = pack_documents(documents(config.data, "data", config, ctx, tokenizer)[0],
                                block, sep)  # (N, block)
        if config.domain_eval_file:
            domain_eval, _ = text_blocks(config.domain_eval_file, None, "domain_eval_file",
                                         tokenizer, block, config.eval_blocks, sep)
        else:
            if domain.size(0) <= config.eval_blocks:
                raise ValueError(f"data packs into {domain.size(0)} blocks of {block}; "
                                 f"holding out eval_blocks ({config.eval_blocks}) would leave "
                                 f"none to train on (lower eval_blocks or give "
                                 f"domain_eval_file)")
            domain_eval, domain = domain[-config.eval_blocks:], domain[:-config.eval_blocks]
        general_eval, _ = text_blocks(config.general_eval_file, DEMO_HELDOUT,
                                      "general_eval_file", tokenizer, block,
                                      config.eval_blocks, sep)
        replay = pack_documents(documents(config.replay_data, "replay_data", config, ctx,
                                          tokenizer)[0], block, sep)
        self.pools = {"domain": domain, "replay": replay}
        self.evals = {"domain": domain_eval, "general": general_eval}
        self.block = block
        self.tokens_per_step = config.batch_size * block
        ctx.log(f"domain: {domain.size(0)} blocks of {block} tokens; replay: "
                f"{replay.size(0)} blocks; held out: {domain_eval.size(0)} domain + "
                f"{general_eval.size(0)} general blocks; {self.tokens_per_step} tokens a step")
        # what decides a cell, hashed: a rerun (or a wider grid) reuses every cell it shares
        self.common = {
            "version": CELL_VERSION, "base": _weights_hash(ck.path),
            "domain": _tensor_hash(domain), "replay": _tensor_hash(replay),
            "domain_eval": _tensor_hash(domain_eval),
            "general_eval": _tensor_hash(general_eval), "block": block,
            "batch_size": config.batch_size,
            "max_learning_rate": config.max_learning_rate,
            "min_learning_rate": config.min_learning_rate,
            "warmup_ratio": config.warmup_ratio, "weight_decay": config.weight_decay,
            "seed": config.seed, "device": str(ctx.device).split(":")[0]}
        self.cache = ctx.cache_dir / "mixture_law"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.scratch = ctx.work_dir / "mixture_law-runs"
        self.kept: list[str] = []
        self._torch = torch

    def path(self, ratio: Optional[float], steps: int) -> Path:
        key = json.dumps({**self.common, "replay_ratio": ratio, "steps": steps},
                         sort_keys=True)
        return self.cache / f"{hashlib.sha256(key.encode()).hexdigest()}.json"

    def base(self) -> dict:
        """The base's held-out losses (steps 0)."""
        path = self.path(None, 0)
        if path.is_file():
            return json.loads(path.read_text())
        model = self.ck.load_model(device=self.ctx.device, dtype=self._torch.float32)
        result = _losses(model, self.evals, self.config.batch_size)
        _write_json(path, result)
        return result

    def measure(self, ratio: float, steps: int) -> tuple[dict, bool]:
        """({"domain", "general"} held-out losses after `steps` steps at replay `ratio`,
        whether it came from the cache)."""
        path = self.path(ratio, steps)
        if path.is_file():
            return json.loads(path.read_text()), True
        model = _train_cell(self.config, self.ctx, self.ck, self.tokenizer, self.pools,
                            ratio, steps, self.scratch / f"r{ratio:g}-s{steps}")
        result = _losses(model, self.evals, self.config.batch_size)
        _write_json(path, result)
        if self.config.keep_runs and self.ctx.is_main_process:
            self.kept.append(_register_cell(self.ctx, self.ck, self.tokenizer, model, ratio,
                                            steps, result))
        del model  # the Trainer and its Accelerator hold it in a cycle: free it before the next
        gc.collect()
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()
        return result, False


def run(config: Config, ctx) -> None:
    import numpy as np

    from ops.mixture_law import DOMAIN_BOUNDS, GENERAL_BOUNDS, fit_law, predict_ratio

    grid_cells = Cells(config, ctx)
    tokens_per_step = grid_cells.tokens_per_step
    base = grid_cells.base()
    for which in ("domain", "general"):
        ctx.metric(f"{which} loss (base)", base[which], step=0)
    ctx.log(f"base: domain loss {base['domain']:.4f} (ppl {math.exp(base['domain']):.3f}), "
            f"general loss {base['general']:.4f} (ppl {math.exp(base['general']):.3f})")

    grid = [(r, s) for r in config.replay_ratios for s in config.step_grid]
    total_steps = sum(s for _, s in grid)
    done_steps, cells, reused = 0, [], 0
    try:
        for ratio, steps in grid:
            ctx.progress(0.02 + 0.9 * done_steps / total_steps,
                         f"replay {ratio:g}, {steps} steps")
            result, cached = grid_cells.measure(ratio, steps)
            reused += cached
            done_steps += steps
            cells.append({"replay_ratio": ratio, "steps": steps,
                          "tokens": steps * tokens_per_step, **result})
            ctx.log(f"cell replay {ratio:g} x {steps} steps: domain loss "
                    f"{result['domain']:.4f}, general loss {result['general']:.4f}"
                    f"{' (cached)' if cached else ''}")
    finally:  # the Trainers' output folders, whether the grid finished or not
        shutil.rmtree(grid_cells.scratch, ignore_errors=True)
    ctx.log(f"{len(grid)} cells: {reused} from the cache, {len(grid) - reused} trained")

    # the fits: domain loss against r = domain share, general loss against r = replay share
    ctx.progress(0.93, "fitting the D-CPT law")
    d = np.array([c["tokens"] for c in cells], dtype=np.float64)
    replay_r = np.array([c["replay_ratio"] for c in cells], dtype=np.float64)
    laws = {
        "domain": fit_law(d, 1.0 - replay_r, [c["domain"] for c in cells], eps=config.law_eps,
                          bounds=DOMAIN_BOUNDS, starts=config.fit_starts, seed=config.seed),
        "general": fit_law(d, replay_r, [c["general"] for c in cells], eps=config.law_eps,
                           bounds=GENERAL_BOUNDS, starts=config.fit_starts, seed=config.seed),
    }
    share = {"domain": lambda r: 1.0 - r, "general": lambda r: r}
    for which, law in laws.items():
        ctx.log(f"{which} law (r = {'1 - replay_ratio' if which == 'domain' else 'replay_ratio'}"
                f"): L = {law.E:.4f} + {law.B:.4f} r^{law.eta:.3f} (D/{law.d_ref:.4g})^-"
                f"{law.beta:.3f} + {law.C:.4f} / (r + {law.eps:g})^{law.gamma:.3f}; "
                f"rmse(log) {law.rmse_log:.4f}, largest error {100 * law.max_rel_error:.2f}%")
        ctx.metric(f"{which} fit largest error %", 100 * law.max_rel_error)

    # the plot: data and fit per ratio over steps (x = step)
    lo, hi = min(config.step_grid), max(config.step_grid)
    curve_steps = sorted(set(config.step_grid) | {int(round(x)) for x in np.geomspace(lo, hi, 8)})
    for c in cells:
        for which in ("domain", "general"):
            ctx.metric(f"{which} loss @ replay {_label(c['replay_ratio'])} (data)", c[which],
                       step=c["steps"])
    for ratio in config.replay_ratios:
        for which, law in laws.items():
            for s in curve_steps:
                ctx.metric(f"{which} loss @ replay {_label(ratio)} (fit)",
                           float(law(s * tokens_per_step, share[which](ratio))), step=s)

    # the summary table
    rows = ["| replay_ratio | steps | domain loss | domain fit | general loss | general fit |",
            "|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        fd = float(laws["domain"](c["tokens"], 1.0 - c["replay_ratio"]))
        fg = float(laws["general"](c["tokens"], c["replay_ratio"]))
        rows.append(f"| {c['replay_ratio']:g} | {c['steps']} | {c['domain']:.4f} | {fd:.4f} | "
                    f"{c['general']:.4f} | {fg:.4f} |")
    ctx.log("\n".join(rows))

    # the prediction
    steps = config.predict_steps or max(config.step_grid)
    pred = predict_ratio(laws["domain"], laws["general"], steps * tokens_per_step,
                         objective=config.objective, base_general_loss=base["general"],
                         max_general_ppl_increase=config.max_general_ppl_increase,
                         domain_ppl_target=config.domain_ppl_target,
                         low=min(config.replay_ratios), high=max(config.replay_ratios))
    replay_ratio = round(pred.replay_ratio, 3)
    ctx.metric("predicted replay_ratio", replay_ratio, step=steps)
    ctx.metric("predicted domain loss", pred.domain_loss, step=steps)
    ctx.metric("predicted general loss", pred.general_loss, step=steps)
    target = (f"general perplexity <= {math.exp(pred.general_limit):.4f} (base "
              f"{math.exp(base['general']):.4f} + {100 * config.max_general_ppl_increase:g}%)"
              if pred.general_limit is not None else
              f"domain perplexity <= {config.domain_ppl_target:g}")
    ctx.log(f"prediction for {steps} steps, searched over replay_ratio in "
            f"[{min(config.replay_ratios):g}, {max(config.replay_ratios):g}] (the grid's "
            f"range): replay_ratio {replay_ratio:g} -> domain loss {pred.domain_loss:.4f} (ppl "
            f"{math.exp(pred.domain_loss):.3f}), general loss {pred.general_loss:.4f} (ppl "
            f"{math.exp(pred.general_loss):.3f}); target {target}: "
            f"{'met' if pred.feasible else 'NOT met by any ratio in the range'}")
    summary = {"base": base, "cells": cells, "tokens_per_step": tokens_per_step,
               "laws": {k: v.as_dict() for k, v in laws.items()},
               "prediction": {**pred.as_dict(), "steps": steps, "replay_ratio": replay_ratio},
               "objective": config.objective, "reused_cells": reused,
               "kept": grid_cells.kept}
    _write_json(ctx.work_dir / "mixture_law.json", summary)
    if pred.feasible and ctx.is_main_process:
        ctx.suggest("continue_pretrain", suggestion(config, replay_ratio, steps),
                    label=f"continue_pretrain with replay_ratio {replay_ratio:g} (predicted)")
    ctx.progress(1.0, "done")


def suggestion(config: Config, replay_ratio: float, steps: int) -> dict:
    """The continue_pretrain config of the predicted run: this job's data and settings."""
    out = {"checkpoint": config.checkpoint, "data": config.data,
           "replay_data": config.replay_data, "replay_ratio": replay_ratio,
           "max_steps": steps, "batch_size": config.batch_size,
           "max_learning_rate": config.max_learning_rate,
           "min_learning_rate": config.min_learning_rate,
           "warmup_ratio": config.warmup_ratio, "weight_decay": config.weight_decay,
           "eval_blocks": config.eval_blocks, "seed": config.seed,
           "text_column": config.text_column}
    for field in ("block_size", "domain_eval_file", "general_eval_file"):
        if getattr(config, field) is not None:
            out[field] = getattr(config, field)
    if not replay_ratio:
        out.pop("replay_data")
    return out


def _register_cell(ctx, ck, tokenizer, model, ratio, steps, result) -> str:
    name = f"{ck.name}-replay{ratio:g}-steps{steps}"
    out = ctx.new_checkpoint("continue_pretrain", parents=[ck], name=name, metadata={
        "mixture_law_cell": {"replay_ratio": ratio, "steps": steps, "domain_loss":
                             result["domain"], "general_loss": result["general"]}})
    model.save_pretrained(out.path)
    tokenizer.save_pretrained(out.path)
    ctx.publish(out)
    return name


def _write_json(path: Path, data) -> None:
    """Write whole or not at all: a temporary file renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


PLUGIN = Plugin(
    name="mixture_law",
    order=22,
    title="Mixture law",
    description="Fit the D-CPT law to a small grid of continual pre-training runs (replay "
                "ratio x steps), plot the fit with its data, and predict the replay ratio that "
                "meets a target (lowest domain loss within a general-perplexity budget); the "
                "prediction is offered as a continue_pretrain job.",
    Config=Config,
    run=run,
)
