"""select_data: LESS data selection (Xia et al. 2024, https://arxiv.org/abs/2402.04333). Warm
up a LoRA on a random part of a candidate pool, score every candidate by how well its
Adam-aware LoRA gradient lines up with the gradients of a few target examples (at several
warm-up checkpoints, randomly projected), and register the best-scoring fraction of the pool,
its rows verbatim, as a lab dataset that `train` can read. The method is in ops/less.py."""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from plugins import (ADVANCED, LOG_SCALE, CheckpointRef, DataRef, LongText, Plugin,
                     PluginConfig)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the paper's LoRA targets
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_TARGETS = 10_000   # target rows: each one's gradient is taken at every checkpoint
# settings that say how rows are read, passed on to the suggested train job
SHARED_WITH_TRAIN = ("prompt_column", "completion_column", "messages_column", "text_column",
                     "completion_only_loss")
MAX_FULL_TARGET_BYTES = 4 << 30  # the targets' unprojected gradients, kept for the scoring
TOP_ROWS_LOGGED = 10
SCORE_POINTS = 200     # at most this many points of the sorted-score curve as metrics
HISTOGRAM_BINS = 10


class Config(PluginConfig):
    checkpoint: CheckpointRef = Field(description=(
        "Base model whose LoRA gradients rank the pool (ideally the one you will train): "
        "registry id, name, local folder or Hub id."))
    pool: DataRef = Field(description=(
        "Candidate pool to select from, in any format train reads: a local .jsonl, .json, "
        ".csv, .parquet or .txt file, a folder of them, or a Hub dataset id."))
    targets: DataRef = Field(description=(
        "A handful of examples of the task you want to get better at (the paper uses a few "
        "per task), in the pool's format. Not selected from: give examples outside the pool."))
    fraction: float = Field(0.05, gt=0, le=1, description=(
        "Fraction of the pool to keep, best scores first (the paper's 5%)."))
    warmup_fraction: float = Field(0.05, gt=0, le=1, description=(
        "Fraction of the pool, drawn at random (seed), that the warm-up LoRA trains on (5% "
        "in the paper)."))
    warmup_epochs: int = Field(4, ge=1, le=100, description=(
        "Passes over the warm-up rows (4 in the paper), unless warmup_steps is set."))
    warmup_steps: Optional[int] = Field(None, ge=1, le=1_000_000, description=(
        "Optimizer steps of the warm-up. Empty: warmup_epochs passes."),
        json_schema_extra=ADVANCED)
    checkpoints: int = Field(4, ge=1, le=32, description=(
        "Warm-up checkpoints, evenly spaced, at which the gradients are taken (4 in the "
        "paper, one per epoch); each costs one gradient per pool row."))
    projection_dim: int = Field(4096, ge=0, le=65536, description=(
        "Dimensions of the seeded random projection of the gradients (8192 in the paper, "
        "for a 7B model); larger is closer to the full gradients and slower. 0: no "
        "projection, the full LoRA gradients (exact)."))
    projection: Literal["rademacher", "gaussian"] = Field("rademacher", description=(
        "Entries of the projection matrix: +-1 (rademacher, as the paper's code) or "
        "normal."), json_schema_extra=ADVANCED)
    learning_rate: float = Field(2e-4, gt=0, le=1, description=(
        "Peak learning rate of the warm-up (linear schedule, 3% warm-up). The paper's 2e-5 "
        "is for a 7B model and batches of 128."), json_schema_extra=LOG_SCALE)
    batch_size: int = Field(8, ge=1, le=4096, description=(
        "Warm-up examples per optimizer step. Gradients for scoring are taken one example at "
        "a time, as in the paper."))
    lora_r: int = Field(8, ge=1, le=1024, description=(
        "Rank of the warm-up LoRA; the gradient has about 2 * r * (in + out) values per "
        "adapted layer."), json_schema_extra=ADVANCED)
    lora_alpha: int = Field(32, ge=1, le=100_000, description=(
        "LoRA scaling alpha (scale = alpha / r)."), json_schema_extra=ADVANCED)
    target_modules: list[str] = Field(default_factory=lambda: list(ATTENTION), min_length=1,
                                      max_length=64, description=(
        "Linear layers that get the LoRA (the paper: the attention projections)."),
        json_schema_extra=ADVANCED)
    data_format: Literal["auto", "prompt_completion", "messages", "text"] = Field(
        "auto", description="How rows become token sequences, as in train. auto: 'messages' "
                            "if that column exists, else prompt/completion, else text.",
        json_schema_extra=ADVANCED)
    prompt_column: str = Field("prompt", min_length=1, max_length=200,
                               description="prompt_completion: the prompt column.",
                               json_schema_extra=ADVANCED)
    completion_column: str = Field("completion", min_length=1, max_length=200,
                                   description="prompt_completion: the completion column.",
                                   json_schema_extra=ADVANCED)
    messages_column: str = Field("messages", min_length=1, max_length=200, description=(
        "messages: the column of chat messages ([{role, content}, ...])."),
        json_schema_extra=ADVANCED)
    text_column: str = Field("text", min_length=1, max_length=200,
                             description="text: the text column.", json_schema_extra=ADVANCED)
    chat_template: Optional[LongText] = Field(None, description=(
        "messages: a Jinja chat template to use instead of the tokenizer's own."),
        json_schema_extra=ADVANCED)
    completion_only_loss: bool = Field(True, description=(
        "The loss (and so the gradient) covers only the completion or the assistant turns, "
        "as train learns them."), json_schema_extra=ADVANCED)
    max_length: Optional[int] = Field(None, ge=8, le=1_000_000, description=(
        "Tokens per example; longer ones are cut. Empty: the model's "
        "max_position_embeddings, at most 2048."), json_schema_extra=ADVANCED)
    seed: int = Field(0, ge=0, description=(
        "Random seed: the warm-up rows and order, the LoRA's initial values, the "
        "projection."), json_schema_extra=ADVANCED)
    name: Optional[str] = Field(None, min_length=1, max_length=100, description=(
        "Name of the selected dataset (letters, digits, '.', '_', '-'). Empty: "
        "<pool name>-less-<percent>."))

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        if value is not None and not NAME.match(value):
            raise ValueError("letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, value):
        for module in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,99}", module):
                raise ValueError(f"module names (letters, digits, '_'); got {module!r}")
        return value

    @model_validator(mode="after")
    def _settings(self):
        if self.pool.strip() == self.targets.strip():
            raise ValueError("targets: the same data as pool; give target examples that are "
                             "not in the pool")
        return self


# ------------------------------------------------------------------------------- data
def _encoded(config: Config, ctx, tokenizer, source: str, field: str):
    """(raw rows, token rows, fingerprint, format) of a data field, read and encoded exactly
    as train reads its `data` (and through the same tokenization cache)."""
    from plugins.kit.data import cached_tokenize, load_rows
    from plugins.train import detect_format, encoder

    rows, fingerprint = load_rows(source, field, ctx.cache_dir / "datasets")
    fmt = detect_format(config, rows.column_names, field)
    if fmt == "messages" and not (config.chat_template or tokenizer.chat_template):
        raise ValueError(f"{field} is in chat 'messages' format but the tokenizer has no chat "
                         f"template; set chat_template")
    options = {"format": fmt, "max_length": config.max_length,
               "completion_only": config.completion_only_loss,
               "columns": [config.prompt_column, config.completion_column,
                           config.messages_column, config.text_column],
               "chat_template": config.chat_template}
    encoded, _, _ = cached_tokenize(rows, fingerprint, tokenizer, options,
                                    encoder(config, fmt, tokenizer),
                                    ctx.cache_dir / "tokenized", ctx.log)
    return rows, encoded, fingerprint, fmt


def _token_rows(encoded) -> list[dict]:
    table = encoded.with_format("python")
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in table]


def _builder_files(source: str) -> tuple[Optional[str], list[Path]]:
    """The datasets builder and files of a local pool (None for a Hub dataset)."""
    from plugins.kit.data import BUILDERS

    path = Path(source).expanduser()
    if not path.exists():
        return None, []
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
    return BUILDERS.get(files[0].suffix), files


def write_selection(rows, keep: list[int], source: str, dest_dir: Path, stem: str) -> Path:
    """Write the kept rows (in pool order) to dest_dir/stem.EXT, in the pool's format: the
    very lines of a .jsonl or .txt pool, byte for byte; a .csv or .parquet pool through
    datasets; a .json pool or a Hub dataset as JSON lines. Written to a temporary name and
    renamed, so no half-written file is ever seen."""
    builder, files = _builder_files(source)
    chosen = sorted(keep)
    lines = None
    if files and all(f.suffix in (".jsonl", ".txt", ".text") for f in files):
        # datasets reads one row per non-blank line of JSON lines, one per line of text
        lines = []
        for f in files:
            raw = f.read_bytes().splitlines()
            lines += [line for line in raw if line.strip()] if f.suffix == ".jsonl" else raw
        if len(lines) != len(rows):  # a layout datasets reads differently: write the rows
            lines = None
    suffix = {"csv": ".csv", "parquet": ".parquet", "text": ".txt"}.get(builder, ".jsonl")
    if lines is not None:
        suffix = ".txt" if builder == "text" else ".jsonl"
    final = dest_dir / f"{stem}{suffix}"
    tmp = dest_dir / f".{stem}.tmp-{os.getpid()}{suffix}"
    try:
        if lines is not None:
            tmp.write_bytes(b"".join(lines[i] + b"\n" for i in chosen))
        else:
            part = rows.select(chosen)
            if suffix == ".csv":
                part.to_csv(str(tmp), index=False)
            elif suffix == ".parquet":
                part.to_parquet(str(tmp))
            elif suffix == ".txt":  # the text builder's one column, a line per row
                tmp.write_text("".join(str(row["text"]) + "\n" for row in part),
                               encoding="utf-8")
            else:
                with open(tmp, "w", encoding="utf-8") as fh:
                    for row in part:
                        fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _pool_label(source: str) -> str:
    path = Path(source)
    stem = path.stem if path.suffix else path.name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "pool"
    return stem[:60]


def _row_preview(row: dict, limit: int = 120) -> str:
    text = json.dumps(row, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _histogram(values: list[float], bins: int = HISTOGRAM_BINS) -> list[dict]:
    low, high = min(values), max(values)
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - low) / width))] += 1
    return [{"from": low + i * width, "to": low + (i + 1) * width, "rows": c}
            for i, c in enumerate(counts)]


# ---------------------------------------------------------------------------- preview
def preview(config: Config, view) -> str:
    """Rows of the pool and the targets, their format, and what the job will do: the warm-up
    and the number of gradients it takes."""
    from plugins.kit import markup
    from plugins.kit.data import load_rows
    from plugins.train import detect_format

    pool, _ = load_rows(config.pool, "pool", view.cache_dir / "datasets")
    fmt = detect_format(config, pool.column_names, "pool")
    targets, _ = load_rows(config.targets, "targets", view.cache_dir / "datasets")
    detect_format(config.model_copy(update={"data_format": fmt}), targets.column_names,
                   "targets")
    n_warm = max(1, round(len(pool) * config.warmup_fraction))
    steps = config.warmup_steps or math.ceil(n_warm / config.batch_size) * config.warmup_epochs
    kept = max(1, round(len(pool) * config.fraction))
    return "\n".join([
        f"**pool** {len(pool):,} rows · format **{fmt}** · columns "
        f"{markup.md(pool.column_names)}",
        f"**targets** {len(targets):,} rows",
        f"warm-up: a LoRA on {n_warm:,} random rows, {steps:,} steps; gradients of "
        f"{len(pool) + len(targets):,} rows at each of {config.checkpoints} checkpoints "
        f"({(len(pool) + len(targets)) * config.checkpoints:,} backward passes)",
        f"keeps the best {kept:,} rows ({config.fraction:.1%})",
        "", "first target row:",
        markup.code_block(json.dumps(targets[0], ensure_ascii=False, default=str)[:600])])


# ------------------------------------------------------------------------------ the run
def run(config: Config, ctx) -> None:
    import torch

    from ops import less
    from ops import training as T
    from plugins.kit.trainer import open_for_training

    ck, tokenizer, config = open_for_training(ctx, config)
    pool_rows, pool_enc, pool_fp, fmt = _encoded(config, ctx, tokenizer, config.pool, "pool")
    target_rows, target_enc, target_fp, _ = _encoded(
        config.model_copy(update={"data_format": fmt}), ctx, tokenizer, config.targets,
        "targets")
    if len(target_rows) > MAX_TARGETS:
        raise ValueError(f"targets: {len(target_rows)} rows; expected at most {MAX_TARGETS} "
                         f"(a handful of examples of the task is what LESS needs)")
    pool = _token_rows(pool_enc)
    targets = _token_rows(target_enc)
    learnable = [i for i, row in enumerate(pool) if less.has_loss(row)]
    if not learnable:
        raise ValueError("pool: no row has a learned token (check completion_only_loss, the "
                         "columns and max_length)")
    ctx.log(f"pool: {len(pool)} rows ({fmt}), {len(pool) - len(learnable)} without a learned "
            f"token; targets: {len(targets)} rows")
    ctx.progress(0.02, "data ready")

    # the warm-up: a LoRA on a seeded random part of the pool
    rng = random.Random(config.seed)
    n_warm = max(1, round(len(learnable) * config.warmup_fraction))
    warm_rows = sorted(rng.sample(learnable, n_warm))
    per_epoch = math.ceil(n_warm / config.batch_size)
    total = config.warmup_steps or per_epoch * config.warmup_epochs
    keep_at = less.checkpoint_steps(total, config.checkpoints)
    collate = T.PadCollator(tokenizer.pad_token_id)
    device = ctx.device

    def batches():
        order = list(warm_rows)
        while True:  # epochs, each in a fresh seeded order
            rng.shuffle(order)
            for start in range(0, len(order), config.batch_size):
                batch = collate([pool[i] for i in order[start:start + config.batch_size]])
                yield {k: v.to(device) for k, v in batch.items()}

    torch.manual_seed(config.seed)
    model = ck.load_model(device=device, dtype=torch.float32)
    model = T.lora_wrap(model, r=config.lora_r, alpha=config.lora_alpha, dropout=0.0,
                        target_modules=config.target_modules)
    dim = sum(p.numel() for _, p in less.trainable_parameters(model))
    ctx.log(f"warm-up: LoRA r={config.lora_r} on {', '.join(config.target_modules)} "
            f"({dim:,} parameters), {n_warm} rows, {total} steps; checkpoints at steps "
            f"{keep_at}")

    def on_step(step: int, loss: float) -> None:
        ctx.metric("warmup_loss", loss, step=step)
        ctx.progress(0.02 + 0.18 * step / total, f"warm-up step {step}/{total}")

    checkpoints = less.warmup_lora(model, batches(), total, config.learning_rate, keep_at,
                                   on_step=on_step)
    for c in checkpoints:
        ctx.log(f"checkpoint at step {c.step}: mean learning rate {c.learning_rate:.3g}, "
                f"mean warm-up loss {c.loss:.4f}")

    # the scores
    projection = None
    if config.projection_dim and config.projection_dim < dim:
        projection = less.RandomProjection(dim, config.projection_dim, seed=config.seed,
                                           kind=config.projection, device=device)
    elif config.projection_dim:
        ctx.log(f"projection_dim {config.projection_dim} >= the {dim:,} LoRA parameters: "
                f"the full gradients are used")
    if projection is None and len(targets) * dim * 4 > MAX_FULL_TARGET_BYTES:
        raise ValueError(f"projection_dim: 0 keeps the targets' full gradients, "
                         f"{len(targets)} x {dim:,} floats (over "
                         f"{MAX_FULL_TARGET_BYTES >> 30} GiB); give a projection_dim such as "
                         f"8192, or fewer targets")
    work = (len(pool) + len(targets)) * len(checkpoints)
    done = [0]

    def on_example() -> None:
        done[0] += 1
        if done[0] % 50 == 0 or done[0] == work:
            ctx.progress(0.2 + 0.75 * done[0] / work, f"gradients {done[0]}/{work}")

    scores = less.less_scores(model, pool, targets, checkpoints, projection,
                              on_example=on_example)
    keep = less.top_fraction(scores, config.fraction)
    finite = [float(s) for s in scores if math.isfinite(float(s))]
    kept_scores = [float(scores[i]) for i in keep]
    summary = {"min": min(finite), "max": max(finite), "mean": sum(finite) / len(finite),
               "selected_min": min(kept_scores), "selected_mean":
               sum(kept_scores) / len(kept_scores), "histogram": _histogram(finite)}
    _report(ctx, pool_rows, scores, keep, summary)

    ctx.progress(0.96, "writing the selection")
    stem = config.name or f"{_pool_label(config.pool)}-less-{config.fraction * 100:g}pct"
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    path = write_selection(pool_rows, keep, config.pool, Path(ctx.work_dir), stem)
    metadata = {
        "method": "LESS (Xia et al. 2024)", "checkpoint": ck.id, "checkpoint_name": ck.name,
        "pool": config.pool, "pool_sha256": pool_fp, "pool_rows": len(pool),
        "targets": config.targets, "targets_sha256": target_fp, "target_rows": len(targets),
        "fraction": config.fraction, "rows": len(keep), "format": fmt,
        "projection_dim": projection.dim_out if projection else 0,
        "projection": config.projection, "gradient_dim": dim, "seed": config.seed,
        "warmup": {"rows": n_warm, "steps": total, "learning_rate": config.learning_rate,
                   "lora_r": config.lora_r, "target_modules": list(config.target_modules),
                   "checkpoints": [{"step": c.step, "learning_rate": c.learning_rate,
                                    "weight": w, "loss": c.loss} for c, w in zip(
                                        checkpoints, less.checkpoint_weights(
                                            [c.learning_rate for c in checkpoints]))]},
        "scores": summary, "selected_rows": keep[:10_000]}
    dataset = ctx.new_dataset(path, stem, metadata=metadata)
    ctx.log(f"selected {len(keep)} of {len(pool)} pool rows: dataset {dataset['id']} "
            f"({dataset['name']})")
    follow_up = {"checkpoint": config.checkpoint, "data": dataset["id"],
                 "data_format": fmt, **{k: getattr(config, k) for k in SHARED_WITH_TRAIN}}
    if config.chat_template:
        follow_up["chat_template"] = config.chat_template
    ctx.suggest("train", follow_up, f"Train on {stem}")
    ctx.progress(1.0, "done")


def _report(ctx, rows, scores, keep: list[int], summary: dict) -> None:
    """The best rows and the distribution of scores, in the log and as metrics."""
    ctx.log(f"scores: min {summary['min']:.4f}, mean {summary['mean']:.4f}, max "
            f"{summary['max']:.4f}; kept {len(keep)} rows scoring {summary['selected_min']:.4f} "
            f"or more")
    for rank, i in enumerate(keep[:TOP_ROWS_LOGGED], 1):
        ctx.log(f"  #{rank} row {i} score {float(scores[i]):.4f}: {_row_preview(rows[i])}")
    ctx.log("score histogram: " + "; ".join(f"[{b['from']:.3f}, {b['to']:.3f}) {b['rows']}"
                                            for b in summary["histogram"]))
    ranked = sorted((float(s) for s in scores if math.isfinite(float(s))), reverse=True)
    stride = max(1, math.ceil(len(ranked) / SCORE_POINTS))
    for rank in range(0, len(ranked), stride):
        ctx.metric("score_by_rank", ranked[rank], step=rank + 1)
    ctx.metric("selected_min_score", summary["selected_min"])
    ctx.metric("selected_rows", len(keep))


PLUGIN = Plugin(
    name="select_data",
    order=8,
    title="Select data",
    description="LESS data selection: rank a candidate pool by how its LoRA gradients align "
                "with a few target examples (Adam-aware, over warm-up checkpoints, randomly "
                "projected) and register the top fraction as a dataset for train.",
    Config=Config,
    run=run,
    preview=preview,
)
