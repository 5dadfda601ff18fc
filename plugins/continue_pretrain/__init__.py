"""continue_pretrain: continual pre-training on raw domain text with re-warming, replay of
general text, and the stability-gap curve measured as it trains (ops/continual.py)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from plugins import (ADVANCED, CPU_LABS_ONLY, GPU_LABS_ONLY, LOG_SCALE, CheckpointRef, DataRef,
                     LocalFile, Plugin, PluginConfig, form_hints)
from plugins.kit.trainer import (CpuProcesses, DistributedMode, GpuCount, NodeCount,
                                 PREVIEW_ROWS, check_layer_list, check_resumable,
                                 data_parallel_lab_problems, data_parallel_problem,
                                 data_parallel_resources, length_table, link_model_files,
                                 preview_tokenizer, run_dir_for, trainable_layers)

from plugins.kit.assets import DEMO_HELDOUT


class Config(PluginConfig):
    checkpoint: CheckpointRef = Field(description="Checkpoint to continue: registry id, name, "
                                                  "local folder or Hub id.")
    data: DataRef = Field(description=(
        "Domain text: a local .txt, .jsonl, .json, .csv or .parquet file, a folder of them, "
        "or a Hub dataset id. Each row of text_column is one document."))
    text_column: str = Field("text", min_length=1, description="Column holding the text "
                                                               "(plain .txt: 'text').",
                             json_schema_extra=ADVANCED)
    replay_data: Optional[DataRef] = Field(None, description=(
        "General (upstream) text mixed into the domain stream, same forms as data."))
    replay_ratio: float = Field(0.0, ge=0, le=0.9, description=(
        "Fraction of training blocks drawn from replay_data (0.25: one in four)."))
    mixture_schedule: Literal["constant", "upsample_end"] = Field("constant", description=(
        "constant: replay_ratio for every step. upsample_end: replay_ratio, then over the "
        "last upsample_fraction of the steps a domain share of upsample_domain_ratio "
        "(domain upsampling at the end of training, Blakeney et al. 2024)."),
        json_schema_extra=ADVANCED)
    upsample_fraction: float = Field(0.2, gt=0, le=0.5, description=(
        "upsample_end: the last fraction of the optimizer steps that upsamples the domain "
        "(the paper finds the last 10-20% best)."),
        json_schema_extra=ADVANCED)
    upsample_domain_ratio: float = Field(1.0, gt=0, le=1, description=(
        "upsample_end: share of domain blocks in the last phase (1.0: domain only); must be "
        "above the domain share before it, 1 - replay_ratio."),
        json_schema_extra=ADVANCED)
    domain_subset_blocks: Optional[int] = Field(None, ge=1, description=(
        "Train on only this many domain blocks, chosen at random (seeded), repeated for as "
        "many epochs as the steps need: the 'several epochs on a right-sized subset' "
        "strategy of the stability-gap paper. The blocks are not chosen by quality (the "
        "paper's high-quality sub-corpus strategy is not implemented)."),
        json_schema_extra=ADVANCED)
    block_size: Optional[int] = Field(None, ge=8, description=(
        "Tokens per packed block (documents joined with the EOS token). Empty: the model's "
        "max_position_embeddings, at most 1024."),
        json_schema_extra=ADVANCED)
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, le=4096, description="Blocks per device per step.")
    gradient_accumulation: int = Field(1, ge=1, le=1024, description="Steps accumulated per "
                                                                     "optimizer update.",
                                       json_schema_extra=ADVANCED)
    max_learning_rate: float = Field(3e-4, gt=0, le=1, description=(
        "Peak learning rate reached by the linear re-warm-up."),
        json_schema_extra=LOG_SCALE)
    min_learning_rate: float = Field(3e-5, ge=0, le=1, description=(
        "Learning rate at the end of the cosine decay."),
        json_schema_extra=form_hints(LOG_SCALE, ADVANCED))
    warmup_ratio: float = Field(0.01, ge=0, lt=1, description=(
        "Fraction of the steps spent re-warming (Gupta et al. 2023 use about 1%)."),
        json_schema_extra=ADVANCED)
    weight_decay: float = Field(0.1, ge=0, le=1, description="AdamW weight decay.",
                                json_schema_extra=ADVANCED)
    trainable_layers: Optional[str] = Field(None, description=(
        "Train only these decoder layers (comma-separated), or 'new' for the blocks a "
        "scale_layers block expansion added (LLaMA Pro). Empty: every weight."),
        json_schema_extra=ADVANCED)
    new_tokens: list[str] = Field(default_factory=list, description=(
        "Domain tokens to add to the vocabulary; each new embedding starts as the mean of "
        "its old sub-token embeddings (so it lies in the convex hull of the existing ones). "
        "Not CW2V or a learned initialisation."),
        json_schema_extra=ADVANCED)
    domain_eval_file: Optional[LocalFile] = Field(None, description=(
        "Held-out domain text for the stability-gap curve. Empty: eval_blocks blocks held "
        "out of data."),
        json_schema_extra=ADVANCED)
    general_eval_file: Optional[LocalFile] = Field(None, description=(
        "Held-out general text for the stability-gap curve. Empty: the demo held-out text."),
        json_schema_extra=ADVANCED)
    eval_blocks: int = Field(16, ge=1, le=4096, description="Blocks per held-out set.",
                             json_schema_extra=ADVANCED)
    eval_steps: int = Field(20, ge=1, description="Measure both perplexities every N steps "
                                                  "(and before the first).",
                            json_schema_extra=ADVANCED)
    logging_steps: int = Field(10, ge=1, description="Training metrics every N steps.",
                               json_schema_extra=ADVANCED)
    save_steps: int = Field(100, ge=0, description=(
        "Register an intermediate checkpoint (and keep the resume state) every N steps; "
        "0: only the final checkpoint."),
        json_schema_extra=ADVANCED)
    seed: int = Field(0, description="Random seed (data order, subset choice).",
                      json_schema_extra=ADVANCED)
    resume_job: Optional[str] = Field(None, pattern=r"^job-[0-9a-f]+$", description=(
        "Continue this cancelled or failed continue_pretrain job from its last saved state. "
        "The other settings must be the same."),
        json_schema_extra=ADVANCED)
    gpus: GpuCount = Field(1, json_schema_extra=GPU_LABS_ONLY)
    distributed: DistributedMode = Field("ddp",
                                         json_schema_extra=form_hints(GPU_LABS_ONLY, ADVANCED))
    cpu_processes: CpuProcesses = Field(1, json_schema_extra=form_hints(CPU_LABS_ONLY, ADVANCED))
    nodes: NodeCount = Field(1, json_schema_extra=ADVANCED)
    name: Optional[str] = Field(None, min_length=1, max_length=100,
                                description="Name of the new checkpoint. Empty: derived.")

    @field_validator("trainable_layers")
    @classmethod
    def _layers(cls, value):
        return check_layer_list(value)

    @model_validator(mode="after")
    def _settings(self):
        if self.replay_ratio and not self.replay_data:
            raise ValueError("replay_ratio > 0 needs replay_data")
        if self.mixture_schedule == "upsample_end":
            if not self.replay_ratio:
                raise ValueError("mixture_schedule upsample_end needs replay_ratio > 0: with "
                                 "no replay the domain share is already 1")
            if self.upsample_domain_ratio <= 1 - self.replay_ratio:
                raise ValueError(f"upsample_domain_ratio ({self.upsample_domain_ratio:g}) "
                                 f"must exceed the domain share before the upsampling, 1 - "
                                 f"replay_ratio ({1 - self.replay_ratio:g})")
        if self.min_learning_rate > self.max_learning_rate:
            raise ValueError(f"min_learning_rate ({self.min_learning_rate:g}) must not exceed "
                             f"max_learning_rate ({self.max_learning_rate:g})")
        problem = data_parallel_problem(self)
        if problem:
            raise ValueError(problem)
        return self


class Stream:
    """Map-style dataset over the mixed order [(pool, index)], counting what it hands out,
    in all and per phase of the mixture schedule ([{"phase", "samples"}] in stream order)."""

    def __init__(self, order, pools, phases=()):
        self.order, self.pools = order, pools
        self.served = {"domain": 0, "replay": 0}
        self.ends = []  # (first stream index past the phase, phase name)
        end = 0
        for p in phases:
            end += p["samples"]
            self.ends.append((end, p["phase"]))
        self.by_phase = {name: {"domain": 0, "replay": 0} for _, name in self.ends}

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        pool, j = self.order[i]
        self.served[pool] += 1
        for end, name in self.ends:
            if i < end:
                self.by_phase[name][pool] += 1
                break
        block = self.pools[pool][j]
        return {"input_ids": block, "labels": block}


def documents(source: str, field: str, config: Config, ctx, tokenizer) -> tuple[list, str]:
    """(token ids per non-empty document of `config.text_column`, the data's fingerprint);
    mixture_law reads its data through this too."""
    from plugins.kit.data import cached_tokenize, load_rows

    cache = ctx.cache_dir
    rows, fingerprint = load_rows(source, field, cache / "datasets")
    if config.text_column not in rows.column_names:
        raise ValueError(f"{field}: missing column {config.text_column!r}; the data has "
                         f"columns {rows.column_names}")
    column = config.text_column
    docs, _, _ = cached_tokenize(
        rows, fingerprint, tokenizer, {"documents": column},
        lambda batch: {"input_ids": tokenizer([str(t) for t in batch[column]],
                                              add_special_tokens=False)["input_ids"]},
        cache / "tokenized", ctx.log)
    ids = [d for d in docs["input_ids"] if d]
    if not ids:
        raise ValueError(f"{field}: {source} has no text")
    return ids, fingerprint


def served_by_all(served: dict, world_size: int) -> dict:
    """Blocks served from each pool ({pool: n}, or {phase: {pool: n}}), summed over the
    processes of a launched job (each one draws its own batches from the stream)."""
    if world_size == 1:
        return json.loads(json.dumps(served))
    import torch.distributed as dist

    everyone = [None] * world_size
    dist.all_gather_object(everyone, json.loads(json.dumps(served)))

    def total(key, parts):
        if isinstance(parts[0], dict):
            return {k: total(k, [p[k] for p in parts]) for k in parts[0]}
        return sum(parts)

    return total(None, everyone)


def text_blocks(path, default, field: str, tokenizer, block: int, limit: int, sep: int):
    from plugins.kit.textfiles import read_text_file
    from ops.continual import pack_documents

    path, text = read_text_file(path, field, default)
    docs = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in text.split("\n\n")]
    return pack_documents([d for d in docs if d], block, sep)[:limit], path


def preview(config: Config, view) -> str:
    """Documents, token counts and blocks of the domain (and replay) data."""
    import json

    from plugins.kit.data import load_rows
    from plugins.kit import markup

    tokenizer = preview_tokenizer(config, view)
    out = []
    for field, source in (("data", config.data), ("replay_data", config.replay_data)):
        if not source:
            continue
        rows, _ = load_rows(source, field, view.cache_dir / "datasets")
        if config.text_column not in rows.column_names:
            raise ValueError(f"{field}: missing column {config.text_column!r}; the data has "
                             f"columns {rows.column_names}")
        head = rows.select(range(min(len(rows), PREVIEW_ROWS)))
        lengths = [len(tokenizer(str(r[config.text_column]), add_special_tokens=False)
                       ["input_ids"]) + 1 for r in head]
        per_doc = sum(lengths) / len(lengths)
        block = config.block_size or min(tokenizer.model_max_length, 1024)
        out += [f"**{field}**: {len(rows):,} documents · about {per_doc * len(rows):,.0f} "
                f"tokens · about {per_doc * len(rows) / block:,.0f} blocks of {block}",
                length_table(lengths, None),
                markup.code_block(json.dumps(head[0], ensure_ascii=False, default=str)[:600]),
                ""]
    return "\n".join(out)


def run(config: Config, ctx) -> None:
    import torch
    from transformers import PrinterCallback, Trainer

    from ops import training as T
    from ops.pretrain import Blocks
    from ops.continual import (extend_vocabulary, mixture_phases, pack_documents,
                               phased_order, rewarm_trainer_arguments)

    if config.resume_job:
        check_resumable(ctx, config)
    ck = ctx.open(config.checkpoint)
    tokenizer = ck.load_tokenizer()
    model = ck.load_model(device=ctx.device, dtype=torch.float32)
    meta: dict = {}
    if config.new_tokens:
        before = len(tokenizer)
        pieces = extend_vocabulary(model, tokenizer, config.new_tokens)
        meta["tokenizer_change"] = {"added": list(pieces), "vocab_size": [before,
                                                                          len(tokenizer)],
                                    "init": "mean of sub-token embeddings",
                                    "sub_tokens": pieces}
        ctx.log(f"vocabulary {before} -> {len(tokenizer)}: added {list(pieces)}")
    sep = tokenizer.eos_token_id
    if sep is None:
        raise ValueError(f"{ck.name}'s tokenizer has no EOS token to separate documents")
    max_pos = model.config.max_position_embeddings
    block = config.block_size or min(max_pos or 1024, 1024)
    if max_pos and block > max_pos:
        raise ValueError(f"block_size ({block}) exceeds the model's max_position_embeddings "
                         f"({max_pos})")

    docs, domain_hash = documents(config.data, "data", config, ctx, tokenizer)
    domain = pack_documents(docs, block, sep)  # (N, block)
    if config.domain_eval_file:
        domain_eval, _ = text_blocks(config.domain_eval_file, None, "domain_eval_file",
                                      tokenizer, block, config.eval_blocks, sep)
    else:
        if domain.size(0) <= config.eval_blocks:
            raise ValueError(f"data packs into {domain.size(0)} blocks of {block}; holding out "
                             f"eval_blocks ({config.eval_blocks}) would leave none to train "
                             f"on (lower eval_blocks or give domain_eval_file)")
        domain_eval, domain = domain[-config.eval_blocks:], domain[:-config.eval_blocks]
    general_eval, general_path = text_blocks(config.general_eval_file, DEMO_HELDOUT,
                                              "general_eval_file", tokenizer, block,
                                              config.eval_blocks, sep)
    if config.domain_subset_blocks:  # a seeded random subset: no selection by quality
        g = torch.Generator().manual_seed(config.seed)
        pick = torch.randperm(domain.size(0), generator=g)[:config.domain_subset_blocks]
        domain = domain[pick.sort().values]
    pools = {"domain": domain}
    if config.replay_data:
        replay_docs, replay_hash = documents(config.replay_data, "replay_data", config, ctx,
                                              tokenizer)
        pools["replay"] = pack_documents(replay_docs, block, sep)
        meta["replay"] = {"data": config.replay_data, "data_sha256": replay_hash,
                          "blocks": pools["replay"].size(0), "ratio": config.replay_ratio}
    # every process takes batch_size blocks a step, in turn from the one ordered stream
    per_step = config.batch_size * config.gradient_accumulation * ctx.world_size
    phases = mixture_phases(config.max_steps, per_step, config.replay_ratio,
                            config.mixture_schedule, config.upsample_fraction,
                            config.upsample_domain_ratio)
    n_replay = pools["replay"].size(0) if "replay" in pools else 0
    order = phased_order(domain.size(0), n_replay, [p["samples"] for p in phases],
                         [p["replay_ratio"] for p in phases], config.seed)
    stream = Stream(order, pools, phases)
    meta["mixture_schedule"] = {"kind": config.mixture_schedule, "phases": phases}
    if config.mixture_schedule == "upsample_end":
        up = phases[-1]
        ctx.log(f"mixture: replay {config.replay_ratio:g} until step {up['first_step'] - 1}, "
                f"then domain share {config.upsample_domain_ratio:g} for steps "
                f"{up['first_step']}-{up['last_step']}")
    n_domain = sum(1 for p, _ in order if p == "domain")
    meta.update(data={"data": config.data, "data_sha256": domain_hash,
                      "domain_blocks": domain.size(0), "block_size": block,
                      "domain_epochs": n_domain / domain.size(0)},
                schedule={"max_learning_rate": config.max_learning_rate,
                          "min_learning_rate": config.min_learning_rate,
                          "warmup_steps": math.ceil(config.warmup_ratio * config.max_steps),
                          "total_steps": config.max_steps, "shape": "linear re-warm, cosine"})
    ctx.log(f"domain: {domain.size(0)} blocks of {block} tokens ({n_domain / domain.size(0):.2f} "
            f"epochs); replay ratio {config.replay_ratio}; eval {domain_eval.size(0)} domain + "
            f"{general_eval.size(0)} general blocks")

    if config.trainable_layers:
        layers = trainable_layers(config.trainable_layers, ck)
        T.set_trainable(model, T.layer_parameter_names(model, layers))
        meta["trainable_layers"] = layers
    trainable, total = T.count_trainable(model)
    meta["trainable_parameters"], meta["total_parameters"] = trainable, total

    run_dir = run_dir_for(ctx, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = T.last_trainer_state(run_dir) if config.resume_job else None
    if config.resume_job:
        ctx.log(f"resuming from {resume_from}" if resume_from else
                f"resume_job {config.resume_job} saved no state; starting over")
    base_name = config.name or f"{ck.name}-cpt"
    curve: dict[int, dict] = {}

    def on_metrics(m) -> None:
        for key, value in m.values.items():
            if key.startswith("eval_") and key.endswith("_loss"):
                which = key[len("eval_"):-len("_loss")]  # domain / general
                ppl = math.exp(min(value, 50))
                curve.setdefault(m.step, {})[which] = ppl
                ctx.metric(f"{which}_ppl", ppl, step=m.step)
            elif key != "epoch" and not key.startswith("eval_"):
                ctx.metric(key, value, step=m.step)

    def on_save(step: int, folder: str) -> None:
        if not ctx.is_main_process:  # the Trainer calls back on every rank
            return
        if step >= config.max_steps:
            # transformers saves at the last step whatever save_steps says; that state is the
            # final model, which run registers once as base_name (the folder stays for resume)
            return
        pending = ctx.new_checkpoint("continue_pretrain", parents=[ck],
                                     name=f"{base_name}-step{step}",
                                     metadata={**meta, "step": step}, intermediate=True)
        link_model_files(Path(folder), pending.path)
        ctx.publish(pending)

    def on_step(step: int, total_steps: int) -> None:
        ctx.progress(0.05 + 0.9 * step / max(1, total_steps), f"step {step}/{total_steps}")

    args = T.training_arguments(
        str(run_dir), device=ctx.device, seed=config.seed, data_seed=config.seed,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        **rewarm_trainer_arguments(config.max_steps, config.max_learning_rate,
                                   config.min_learning_rate, config.warmup_ratio,
                                   config.weight_decay),  # the mix is read in order
        logging_steps=config.logging_steps, eval_strategy="steps",
        eval_steps=config.eval_steps, eval_on_start=resume_from is None,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500, save_total_limit=1)
    trainer = Trainer(model=model, args=args, train_dataset=stream,
                      eval_dataset={"domain": Blocks(domain_eval),
                                    "general": Blocks(general_eval)},
                      processing_class=tokenizer,
                      callbacks=[T.report_callback(on_metrics, on_save, on_step)])
    trainer.remove_callback(PrinterCallback)
    result = trainer.train(resume_from_checkpoint=resume_from)

    if trainer.state.global_step not in curve:  # the end of the curve, if not on a step
        for which in ("domain", "general"):
            loss = trainer.evaluate(eval_dataset=Blocks(domain_eval if which == "domain"
                                                         else general_eval),
                                    metric_key_prefix=f"eval_{which}")[f"eval_{which}_loss"]
            curve.setdefault(trainer.state.global_step, {})[which] = math.exp(min(loss, 50))
    steps = sorted(curve)
    points = [{"step": s, **curve[s]} for s in steps]
    start, end = curve[steps[0]], curve[steps[-1]]
    peak = max(points, key=lambda p: p.get("general", 0))
    meta.update(
        stability_gap=points, steps=trainer.state.global_step, train_loss=result.training_loss,
        served=served_by_all(stream.served, ctx.world_size),
        served_by_phase=served_by_all(stream.by_phase, ctx.world_size),
        forgetting={"general_ppl_before": start.get("general"),
                    "general_ppl_after": end.get("general"),
                    "rise": end["general"] - start["general"],
                    "peak_general_ppl": peak.get("general"), "peak_step": peak["step"]},
        domain_gain={"domain_ppl_before": start.get("domain"),
                     "domain_ppl_after": end.get("domain"),
                     "gain": start["domain"] - end["domain"]})
    if config.resume_job:
        meta["resumed_from"] = {"job": config.resume_job, "state": resume_from}
    ctx.log(f"domain perplexity {start['domain']:.3f} -> {end['domain']:.3f}; general "
            f"{start['general']:.3f} -> {end['general']:.3f} (peak {peak['general']:.3f} at "
            f"step {peak['step']}); served {meta['served']}")
    ctx.progress(0.97, "writing checkpoint")
    out = ctx.new_checkpoint("continue_pretrain", parents=[ck], name=base_name, metadata=meta)
    trainer.save_model(str(out.path))  # every rank (a collective under FSDP); rank 0 writes
    if not ctx.is_main_process:
        return
    tokenizer.save_pretrained(out.path)
    details = {"block_size": block, "blocks": config.eval_blocks, "measured_by":
               "continue_pretrain"}
    ctx.evaluation(out, "cpt:domain", "perplexity", end["domain"], details=details)
    ctx.evaluation(out, f"cpt:{general_path.name}", "perplexity", end["general"],
                   details=details)
    shutil.rmtree(run_dir, ignore_errors=True)
    ctx.progress(1.0, "done")


PLUGIN = Plugin(
    name="continue_pretrain",
    order=20,
    title="Continue pre-training",
    description="Continual pre-training on raw domain text: packed blocks, linear re-warm-up "
                "then cosine decay, replay of general text, optional vocabulary extension, "
                "and the stability-gap curve (domain and general perplexity) as it trains.",
    Config=Config,
    run=run,
    preview=preview,
    resources=data_parallel_resources,
    lab_problems=data_parallel_lab_problems,
    resume_field="resume_job",
)
