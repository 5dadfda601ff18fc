"""train: supervised fine-tuning (full, LoRA, DoRA, QLoRA, freeze, HFT) on transformers'
Trainer and peft (ops/training.py), with live metrics, intermediate checkpoints and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from plugins import (ADVANCED, CPU_LABS_ONLY, GPU_LABS_ONLY, LOG_SCALE, METHOD_SELECTOR,
                     CheckpointRef, DataRef, LongText, Plugin, PluginConfig, NextStep,
                     Resources, for_methods, form_hints)
from plugins.kit.trainer import (CpuProcesses, DistributedMode, GpuCount, NodeCount,
                                 PREVIEW_ROWS, check_layer_list, check_resumable,
                                 data_parallel_lab_problems, data_parallel_problem,
                                 data_parallel_resources, length_table, link_model_files,
                                 open_for_training, preview_tokenizer, run_dir_for,
                                 trainable_layers)
from plugins.train import objectives
from plugins.train.objectives import (Beta, ChosenColumn, DistillAlpha, DistillTemperature,
                                      Objective, Reference, RejectedColumn, Teacher)
from plugins.train import methods
from plugins.train.methods import (AdaloraAlpha, AdaloraDeltaT, AdaloraInitR, AdaloraTargetR,
                                   AdaloraTfinal, AdaloraTinit, AdapterModules, GaloreGap,
                                   GaloreRank, GaloreScale, GaloreTargets, MezoEps, MezoSamples,
                                   MissR, Optimizer)

ADAPTER_METHODS = ("lora", "dora", "qlora")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Config(PluginConfig):
    checkpoint: CheckpointRef = Field(description="Base checkpoint to fine-tune: registry id, "
                                                  "name, local folder or Hub id.")
    data: DataRef = Field(description=(
        "Training data: a local .jsonl, .json, .csv, .parquet or .txt file, a folder of "
        "them, or a Hub dataset id."))
    data_format: Literal["auto", "prompt_completion", "messages", "text"] = Field(
        "auto", description="How rows become training text. auto: 'messages' if that column "
                            "exists, else prompt/completion, else text.",
        json_schema_extra=ADVANCED)
    prompt_column: str = Field("prompt", min_length=1, description="prompt_completion: the "
                                                                   "prompt column.",
                               json_schema_extra=ADVANCED)
    completion_column: str = Field("completion", min_length=1,
                                   description="prompt_completion: the completion column.",
                                   json_schema_extra=ADVANCED)
    messages_column: str = Field("messages", min_length=1, description=(
        "messages: the column of chat messages ([{role, content}, ...])."),
        json_schema_extra=ADVANCED)
    text_column: str = Field("text", min_length=1, description="text: the text column.",
                             json_schema_extra=ADVANCED)
    chat_template: Optional[LongText] = Field(None, description=(
        "messages: a Jinja chat template to use instead of the tokenizer's own."),
        json_schema_extra=ADVANCED)
    completion_only_loss: bool = Field(True, description=(
        "Learn only the completion (prompt_completion) or the assistant turns (messages); "
        "the prompt tokens get no loss."),
        json_schema_extra=ADVANCED)
    eval_data: Optional[DataRef] = Field(None, description=(
        "Held-out data in the same format, for eval loss. Empty: none, unless eval_fraction."),
        json_schema_extra=ADVANCED)
    eval_fraction: float = Field(0.0, ge=0, lt=0.5, description=(
        "Fraction of the training rows held out for eval loss (seeded split)."),
        json_schema_extra=ADVANCED)
    method: Literal["full", "lora", "dora", "qlora", "freeze", "hft", "mezo", "adalora",
                    "miss"] = Field("lora", description=(
        "full: every weight; lora / dora: peft adapters (DoRA adds a learned magnitude); "
        "qlora: LoRA on a 4-bit base (GPU only); freeze: only trainable_layers; hft: Half "
        "Fine-Tuning, half of the parameters chosen per category, the rest frozen; mezo: "
        "every weight, by zeroth-order SGD from forward passes only (inference memory); "
        "adalora: LoRA whose ranks are pruned to a budget by importance; miss: peft's MiSS "
        "shard-sharing adapter."),
        json_schema_extra=METHOD_SELECTOR)
    lora_r: int = Field(16, ge=1, le=1024, description="lora/dora/qlora: adapter rank.",
                        json_schema_extra=for_methods("lora", "dora", "qlora"))
    lora_alpha: int = Field(32, ge=1, description="lora/dora/qlora: scaling alpha (scale = "
                                                  "alpha / r).",
        json_schema_extra=form_hints(for_methods("lora", "dora", "qlora"), ADVANCED))
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="lora/dora/qlora: dropout on "
                                                              "the adapter input.",
        json_schema_extra=form_hints(for_methods("lora", "dora", "qlora"), ADVANCED))
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR), min_length=1,
                                      description="lora/dora/qlora: linear layers that get "
                                                  "adapters.",
        json_schema_extra=form_hints(for_methods("lora", "dora", "qlora"), ADVANCED))
    trainable_layers: Optional[str] = Field(None, description=(
        "freeze: comma-separated decoder layer indices to train (e.g. 2,5), or 'new' for the "
        "layers a scale_layers block expansion added to this checkpoint."),
        json_schema_extra=for_methods("freeze"))
    # issue 23: MeZO, AdaLoRA, MiSS and GaLore (plugins/train/methods.py)
    optimizer: Optimizer = "adamw"
    galore_rank: GaloreRank = 128
    galore_update_proj_gap: GaloreGap = 200
    galore_scale: GaloreScale = 0.25
    galore_target_modules: GaloreTargets = Field(default_factory=lambda: list(ALL_LINEAR))
    mezo_eps: MezoEps = 1e-3
    mezo_samples: MezoSamples = 1
    adalora_init_r: AdaloraInitR = 12
    adalora_target_r: AdaloraTargetR = 8
    adalora_alpha: AdaloraAlpha = 32
    adalora_tinit: AdaloraTinit = 0.1
    adalora_tfinal: AdaloraTfinal = 0.2
    adalora_delta_t: AdaloraDeltaT = 1
    miss_r: MissR = 64
    adapter_modules: AdapterModules = Field(default_factory=lambda: list(ALL_LINEAR))
    # issue 23: distillation and preference tuning (plugins/train/objectives.py)
    objective: Objective = "sft"
    teacher: Teacher = None
    distill_alpha: DistillAlpha = 0.5
    distill_temperature: DistillTemperature = 2.0
    reference: Reference = None
    beta: Beta = 0.1
    chosen_column: ChosenColumn = "chosen"
    rejected_column: RejectedColumn = "rejected"
    max_length: Optional[int] = Field(None, ge=8, description=(
        "Tokens per example; longer examples are cut (and counted in the log). Empty: the "
        "model's max_position_embeddings, at most 2048."),
        json_schema_extra=ADVANCED)
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps. Empty: epochs.")
    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the data when "
                                                          "max_steps is empty.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.",
                                 json_schema_extra=LOG_SCALE)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up.",
        json_schema_extra=ADVANCED)
    warmup_ratio: float = Field(0.03, ge=0, le=0.5, description="Fraction of steps spent "
                                                                "warming up.",
                                json_schema_extra=ADVANCED)
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.",
                                json_schema_extra=ADVANCED)
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per device per step.")
    batching: Literal["auto", "padding_free", "length_grouped", "padded"] = Field(
        "auto", description=(
            "How examples of different lengths share a batch (objective sft). padding_free: "
            "packed into rows with no padding, each example attending only to itself "
            "(checked on the model before training; the same loss as padded); "
            "length_grouped: batches of similar lengths, padded (transformers' "
            "group_by_length); padded: batches in data order, padded to their longest. "
            "auto: padding_free where the model passes the check, else length_grouped."),
        json_schema_extra=ADVANCED)
    gradient_accumulation: int = Field(1, ge=1, le=1024, description="Steps accumulated per "
                                                                     "optimizer update.",
                                       json_schema_extra=ADVANCED)
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the "
                                                            "backward pass to save memory.",
                                         json_schema_extra=ADVANCED)
    logging_steps: int = Field(10, ge=1, description="Metrics every N steps.",
                               json_schema_extra=ADVANCED)
    eval_steps: Optional[int] = Field(None, ge=1, description="Eval loss every N steps. "
                                                              "Empty: at logging_steps * 5.",
                                      json_schema_extra=ADVANCED)
    save_steps: int = Field(100, ge=0, description=(
        "Save and register an intermediate checkpoint every N steps (and the resume state). "
        "0: only the final checkpoint, and Resume starts over."),
        json_schema_extra=ADVANCED)
    seed: int = Field(0, description="Random seed (data order, LoRA init, HFT choice).",
                      json_schema_extra=ADVANCED)
    resume_job: Optional[str] = Field(None, pattern=r"^job-[0-9a-f]+$", description=(
        "Continue this cancelled or failed train job from its last saved state (optimizer, "
        "schedule, RNG and data position). The other settings must be the same."),
        json_schema_extra=ADVANCED)
    merge_adapter: bool = Field(False, description=(
        "lora/dora: also register base + adapter merged into a full checkpoint."),
        json_schema_extra=form_hints(for_methods("lora", "dora"), ADVANCED))
    gpus: GpuCount = Field(1, json_schema_extra=GPU_LABS_ONLY)
    distributed: DistributedMode = Field("ddp",
                                         json_schema_extra=form_hints(GPU_LABS_ONLY, ADVANCED))
    cpu_processes: CpuProcesses = Field(1, json_schema_extra=form_hints(CPU_LABS_ONLY, ADVANCED))
    nodes: NodeCount = Field(1, json_schema_extra=ADVANCED)
    name: Optional[str] = Field(None, min_length=1, max_length=100,
                                description="Name of the new checkpoint. Empty: derived.")

    @field_validator("batching")
    @classmethod
    def _batching_for_sft(cls, value: str, info):
        objective = info.data.get("objective")
        if value not in ("auto", "padded") and objective not in (None, "sft"):
            raise ValueError(f"batching {value} applies to objective sft; objective "
                             f"{objective} batches its own way (use auto)")
        return value

    @field_validator("trainable_layers")
    @classmethod
    def _layers(cls, value):
        return check_layer_list(value)

    @model_validator(mode="after")
    def _method_settings(self):
        if self.method == "freeze" and not self.trainable_layers:
            raise ValueError("method freeze needs trainable_layers")
        if self.merge_adapter and self.method not in ("lora", "dora"):
            raise ValueError(f"merge_adapter applies to lora and dora, not {self.method}")
        if self.eval_data and self.eval_fraction:
            raise ValueError("give eval_data or eval_fraction, not both")
        if self.method == "qlora" and self.distributed == "fsdp" and self.gpus > 1:
            raise ValueError("method qlora runs with distributed ddp, not fsdp")
        problem = data_parallel_problem(self) or methods.method_problem(self)
        if problem:
            raise ValueError(problem)
        return self

def resources(config: Config) -> Resources:
    """Data-parallel resources; qlora needs a CUDA GPU even as one process."""
    needs = data_parallel_resources(config)
    if config.method == "qlora" and config.gpus <= 1:
        return Resources(gpus=needs.gpus, cpu_processes=needs.cpu_processes,
                         distributed=needs.distributed, data_parallel=True, nodes=needs.nodes,
                         requires_gpu=("method", "qlora loads the base in 4 bits through "
                                                 "bitsandbytes, which needs a CUDA GPU"))
    return needs


# ------------------------------------------------------------------------------ data
def detect_format(config: Config, columns: list[str], field: str) -> str:
    fmt = config.data_format
    if fmt == "auto":
        if config.messages_column in columns:
            fmt = "messages"
        elif config.prompt_column in columns and config.completion_column in columns:
            fmt = "prompt_completion"
        elif config.text_column in columns:
            fmt = "text"
        else:
            raise ValueError(
                f"{field}: found none of the columns '{config.messages_column}', "
                f"'{config.prompt_column}' + '{config.completion_column}', or "
                f"'{config.text_column}'; the data has columns {columns}")
    needed = {"messages": [config.messages_column],
              "prompt_completion": [config.prompt_column, config.completion_column],
              "text": [config.text_column]}[fmt]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"{field}: missing column {missing[0]!r} for data_format {fmt}; the "
                         f"data has columns {columns}")
    return fmt


def encoder(config: Config, fmt: str, tokenizer):
    """A batched encoder for datasets.map(batched=True): columns of rows in, {"input_ids",
    "labels"} lists out, the same as encoding the rows one by one."""
    from ops import training as T

    def encode(batch: dict) -> dict:
        if fmt == "prompt_completion":
            return T.encode_prompt_completion_batch(
                tokenizer, [str(p) for p in batch[config.prompt_column]],
                [str(c) for c in batch[config.completion_column]], config.completion_only_loss,
                config.max_length)
        if fmt == "messages":  # the chat template renders one conversation at a time
            rows = [T.encode_messages(tokenizer, m, config.completion_only_loss,
                                      config.max_length, config.chat_template)
                    for m in batch[config.messages_column]]
            return {"input_ids": [r["input_ids"] for r in rows],
                    "labels": [r["labels"] for r in rows]}
        return T.encode_text_batch(tokenizer, [str(t) for t in batch[config.text_column]],
                                   config.max_length)
    return encode


def prepare_data(config: Config, ctx, tokenizer) -> tuple:
    """(train, eval or None, info) tokenized datasets, through the lab's cache."""
    from plugins.kit.data import cached_tokenize, load_rows

    cache = ctx.cache_dir
    rows, fingerprint = load_rows(config.data, "data", cache / "datasets")
    fmt = detect_format(config, rows.column_names, "data")
    if fmt == "messages" and not (config.chat_template or tokenizer.chat_template):
        raise ValueError("data is in chat 'messages' format but the tokenizer has no chat "
                         "template; set chat_template")
    options = {"format": fmt, "max_length": config.max_length,
               "completion_only": config.completion_only_loss,
               "columns": [config.prompt_column, config.completion_column,
                           config.messages_column, config.text_column],
               "chat_template": config.chat_template}
    encode = encoder(config, fmt, tokenizer)
    train, key, hit = cached_tokenize(rows, fingerprint, tokenizer, options, encode,
                                      cache / "tokenized", ctx.log)
    info = {"data": config.data, "format": fmt, "rows": len(train),
            "data_sha256": fingerprint, "tokenized_cache": key, "cache_hit": hit}
    evaluation = None
    if config.eval_data:
        eval_rows, eval_fp = load_rows(config.eval_data, "eval_data", cache / "datasets")
        detect_format(config.model_copy(update={"data_format": fmt}), eval_rows.column_names,
                       "eval_data")
        evaluation, _, _ = cached_tokenize(eval_rows, eval_fp, tokenizer, options, encode,
                                           cache / "tokenized", ctx.log)
    elif config.eval_fraction:
        split = train.train_test_split(test_size=config.eval_fraction, seed=config.seed)
        train, evaluation = split["train"], split["test"]
    # lengths and learned-token counts from the Arrow columns, not Python lists of lists
    import pyarrow.compute as pc

    table = train.with_format("arrow")[:]
    lengths = pc.list_value_length(table["input_ids"]).to_pylist()
    learned = int(pc.sum(pc.cast(pc.not_equal(pc.list_flatten(table["labels"]), -100),
                                 "int64")).as_py() or 0)
    if learned == 0:
        raise ValueError("data: no token has a loss (every label is masked); check "
                         "completion_only_loss and the columns")
    info.update(tokens=sum(lengths), learned_tokens=learned, longest=max(lengths),
                truncated=sum(1 for n in lengths if n >= config.max_length))
    ctx.log(f"data: {len(train)} rows ({fmt}), {info['tokens']:,} tokens, "
            f"{learned:,} with loss; {info['truncated']} cut at max_length "
            f"{config.max_length}" + (f"; eval {len(evaluation)} rows" if evaluation else ""))
    return train, evaluation, info


# ---------------------------------------------------------------------------- preview
def preview(config: Config, view) -> str:
    """First rows, how the first examples are learned, and token lengths."""
    from plugins.kit.data import load_rows
    from plugins.kit import markup

    if config.objective in objectives.PAIR_OBJECTIVES:
        return objectives.preview_pairs(config, view)
    rows, _ = load_rows(config.data, "data", view.cache_dir / "datasets")
    fmt = detect_format(config, rows.column_names, "data")
    tokenizer = preview_tokenizer(config, view)
    if fmt == "messages" and not (config.chat_template or tokenizer.chat_template):
        raise ValueError("data is in chat 'messages' format but the tokenizer has no chat "
                         "template; set chat_template")
    encode = encoder(config.model_copy(update={"max_length": 10 ** 9}), fmt, tokenizer)
    head = rows.select(range(min(len(rows), PREVIEW_ROWS)))
    columns = encode(head[:])
    encoded = [dict(zip(columns, row)) for row in zip(*columns.values())]
    out = [f"**{len(rows):,} rows** · format **{fmt}** · columns "
           f"{markup.md(rows.column_names)}",
           length_table([len(e["input_ids"]) for e in encoded], config.max_length),
           objectives.preview_note(config, view, tokenizer), ""]
    for i, e in enumerate(encoded[:3]):  # the rows are the member's data: shown verbatim
        learned = [t for t, lab_ in zip(e["input_ids"], e["labels"]) if lab_ != -100]
        out += [f"**row {i}** ({len(e['input_ids'])} tokens, {len(learned)} with loss)",
                markup.code_block(json.dumps(head[i], ensure_ascii=False, default=str)[:600]),
                "learned: " + markup.md(tokenizer.decode(learned)[:300]), ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------ the run
def batching(config: Config, ctx, model, tokenizer, objective, meta: dict):
    """(data collator, group by length?) for the run, recorded in meta["batching"].
    padding_free (ops.training.PackCollator) only where the model keeps packed examples
    apart (`packing_keeps_examples_apart`, one small forward pass): asked for explicitly on
    a model that fails the check, the job stops with that reason; auto falls back to
    length-grouped batches and says so."""
    from ops import training as T

    pad = T.PadCollator(tokenizer.pad_token_id)
    if objective is not None:
        meta["batching"] = "objective"
        return objective.collator, False
    how = config.batching
    if how in ("auto", "padding_free"):
        if T.packing_keeps_examples_apart(model):
            how = "padding_free"
        elif how == "padding_free":
            raise ValueError("batching: padding_free needs an attention that keeps packed "
                             "examples apart by their position ids; this model's logits "
                             "change when two examples share a row. Use length_grouped")
        else:
            how = "length_grouped"
            ctx.log("batching: the model's attention mixes packed examples; batches of "
                    "similar lengths instead")
    meta["batching"] = how
    ctx.log(f"batching: {how}")
    if how == "padding_free":
        return T.PackCollator(tokenizer.pad_token_id), False
    return pad, how == "length_grouped"


def run(config: Config, ctx) -> None:
    import torch

    from ops import training as T

    if config.resume_job:
        check_resumable(ctx, config)
    if config.method == "qlora" and not ctx.device.startswith("cuda"):
        raise ValueError("method: qlora needs a CUDA GPU (4-bit bitsandbytes); this job runs "
                         "on CPU")
    ck, tokenizer, config = open_for_training(ctx, config)
    train, evaluation, data_info = objectives.prepare(config, ctx, tokenizer, prepare_data)
    ctx.progress(0.02, "data ready")

    torch.manual_seed(config.seed)
    load_kwargs = {}
    if config.method == "qlora":
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("method: qlora needs the bitsandbytes package (pip install "
                             "bitsandbytes)") from None
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        model = ck.load_model(device_map={"": torch.cuda.current_device()}, **load_kwargs)
    else:
        model = ck.load_model(device=ctx.device, dtype=torch.float32)
    meta: dict = {"method": config.method, "data": data_info}
    if ctx.world_size > 1:
        meta["processes"] = {"count": ctx.world_size, "distributed": config.distributed,
                             "device": ctx.job.get("device"), "nodes": config.nodes}
    if config.method in ADAPTER_METHODS:
        if config.method == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, config.gradient_checkpointing)
        model = T.lora_wrap(model, r=config.lora_r, alpha=config.lora_alpha,
                            dropout=config.lora_dropout, target_modules=config.target_modules,
                            dora=config.method == "dora")
    elif config.method == "freeze":
        layers = trainable_layers(config.trainable_layers, ck)
        T.set_trainable(model, T.layer_parameter_names(model, layers))
        meta["trainable_layers"] = layers
    elif config.method == "hft":
        selection = T.hft_selection(model, config.seed)
        T.set_trainable(model, selection)
        meta["hft_selection"] = selection
    elif config.method in methods.NEW_ADAPTERS:  # adalora, miss
        model = methods.wrap_model(config, model, meta)
    trainable, total = T.count_trainable(model)
    meta["trainable_parameters"], meta["total_parameters"] = trainable, total
    ctx.log(f"{config.method}: training {trainable:,} of {total:,} parameters "
            f"({trainable / total:.2%})")
    objective = objectives.setup(config, ctx, ck, model, tokenizer)  # None for sft
    if objective:
        meta.update(objective.meta)

    run_dir = run_dir_for(ctx, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = None
    if config.resume_job:
        resume_from = T.last_trainer_state(run_dir)
        if resume_from is None:
            ctx.log(f"resume_job {config.resume_job} saved no state; starting over")
        else:
            ctx.log(f"resuming from {resume_from}")
    relation = "adapter" if config.method in ADAPTER_METHODS + methods.NEW_ADAPTERS \
        else "finetune"
    base_name = config.name or f"{ck.name}-{config.method}"
    last_step = [0, 0]  # (global step, the run's total steps), as on_step last saw them

    def on_metrics(m) -> None:
        for key, value in m.values.items():
            if key != "epoch":
                ctx.metric(key, value, step=m.step)

    def on_save(step: int, folder: str) -> None:
        if not ctx.is_main_process:  # the Trainer calls back on every rank
            return
        if last_step[1] and step >= last_step[1]:
            # transformers saves at the last step whatever save_steps says; that state is the
            # final model, which run registers once as base_name (the folder stays for resume)
            return
        pending = ctx.new_checkpoint(relation, parents=objectives.lineage(
                                         _base_edge(ck, relation), objective),
                                     name=f"{base_name}-step{step}",
                                     metadata={**meta, "step": step}, intermediate=True)
        link_model_files(Path(folder), pending.path)
        ctx.publish(pending)

    def on_step(step: int, total_steps: int) -> None:
        last_step[0], last_step[1] = step, total_steps
        if total_steps:
            ctx.progress(0.03 + 0.9 * step / total_steps, f"step {step}/{total_steps}")

    collator, grouped = batching(config, ctx, model, tokenizer, objective, meta)
    if grouped:  # the sampler reads lengths from this column instead of every row's ids
        train = train.add_column("length", [len(x) for x in train["input_ids"]])
    eval_steps = config.eval_steps or config.logging_steps * 5
    args = T.training_arguments(
        str(run_dir), device=ctx.device, seed=config.seed, data_seed=config.seed,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio, weight_decay=config.weight_decay,  # <1: a ratio
        max_steps=config.max_steps or -1, num_train_epochs=config.epochs,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if evaluation is not None else "no",
        eval_steps=eval_steps if evaluation is not None else None,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500, save_total_limit=1,
        activation_checkpointing=config.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if grouped else "random",
        **methods.training_arguments(config))  # mezo, galore_adamw
    from transformers import PrinterCallback, Trainer

    trainer_class = objective.trainer(Trainer) if objective else \
        methods.trainer_class(config, Trainer)  # mezo's step, adalora's allocation
    trainer = trainer_class(model=model, args=args, train_dataset=train,
                      eval_dataset=evaluation,
                      data_collator=collator,
                      processing_class=tokenizer,
                      callbacks=[T.report_callback(on_metrics, on_save, on_step)])
    trainer.remove_callback(PrinterCallback)
    result = trainer.train(resume_from_checkpoint=resume_from)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    meta.update(steps=trainer.state.global_step, final_train_loss=losses[-1] if losses else None,
                train_loss=result.training_loss, final_eval_loss=evals[-1] if evals else None,
                tokens_seen=trainer.state.num_input_tokens_seen,
                train_seconds=result.metrics.get("train_runtime"))
    methods.record(config, model, meta)
    if config.resume_job:
        meta["resumed_from"] = {"job": config.resume_job, "state": resume_from}
    ctx.progress(0.95, "writing checkpoint")
    out = ctx.new_checkpoint(relation, parents=objectives.lineage(_base_edge(ck, relation),
                                                                  objective), name=base_name,
                             metadata=meta)
    trainer.save_model(str(out.path))  # every rank (a collective under FSDP); rank 0 writes
    if not ctx.is_main_process:
        return
    tokenizer.save_pretrained(out.path)
    if config.merge_adapter:  # what the merge_adapter plugin does, from the saved adapter
        from plugins.merge_adapter import merge_into_base

        adapter = ctx.open(ctx.publish(out)["id"])
        merge_into_base(ctx, adapter, ck, f"{base_name}-merged")
    ctx.log(f"trained {trainer.state.global_step} steps; final loss "
            f"{meta['final_train_loss']}" + (f", eval loss {meta['final_eval_loss']:.4f}"
                                             if meta["final_eval_loss"] is not None else ""))
    shutil.rmtree(run_dir, ignore_errors=True)  # the resume state is not needed any more
    ctx.progress(1.0, "done")


def _base_edge(ck, relation: str) -> dict:
    return {"checkpoint": ck, "role": "base"} if relation == "adapter" else {"checkpoint": ck}


PLUGIN = Plugin(
    name="train",
    order=10,
    title="Train",
    description="Supervised fine-tuning on prompt/completion, chat or text data: full, LoRA, "
                "DoRA, QLoRA, chosen layers, or Half Fine-Tuning; or distillation from a "
                "teacher, or DPO / ORPO on preference pairs; live metrics, "
                "intermediate checkpoints and resume.",
    Config=Config,
    run=run,
    preview=preview,
    resources=resources,
    lab_problems=data_parallel_lab_problems,
    resume_field="resume_job",
    next_steps={"adapter": NextStep("merge_adapter", (
        "Fold it into its base for a full checkpoint that any plugin can read (or merge it "
        "with other models)."))},
)
