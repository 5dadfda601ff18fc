"""What train and continue_pretrain share: data-parallel settings and their hooks, layer
lists, resume checks and run folders, Trainer checkpoint files, and preview helpers.

Composition, not inheritance: a Config declares the fields (`gpus: GpuCount = 1`, ...) and
the plugin record names the hooks (`resources=data_parallel_resources`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from plugins import LabFacts, Resources

# files of a Trainer checkpoint-N folder that make up the model (the rest is resume state)
MODEL_FILES = ("config.json", "generation_config.json", "adapter_config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja")
PREVIEW_ROWS = 1000  # rows whose token lengths a preview measures

# More than one process: app/worker.py relaunches the job through `accelerate launch`, one
# process per GPU (or CPU process).
GpuCount = Annotated[int, Field(ge=1, le=64, description=(
    "GPUs this job uses. More than 1: one data-parallel process per GPU, launched through "
    "accelerate launch as `distributed` says; batch_size is per GPU. The job waits until that "
    "many GPUs are free."))]
DistributedMode = Annotated[Literal["ddp", "fsdp"], Field(description=(
    "With more than one process: ddp keeps a whole copy of the model on each GPU; fsdp "
    "shards parameters, gradients and optimizer state across them (GPU only)."))]
CpuProcesses = Annotated[int, Field(ge=1, le=64, description=(
    "Lab without GPUs only: data-parallel CPU processes (DDP over gloo, launched through "
    "accelerate launch); batch_size is per process. On a lab with GPUs use gpus."))]
# More than one node: the worker starts one `accelerate launch` per node, through srun in a
# Slurm allocation or from a Ray placement group of one bundle per node (app/worker.py), so
# only a cluster executor can give them (app/jobs.py refuses it on the local one).
NodeCount = Annotated[int, Field(ge=1, le=64, description=(
    "Machines this job spans (lab executor slurm or ray). More than 1: gpus (or "
    "cpu_processes) data-parallel processes on each of them, all training one model; "
    "batch_size is per process, so a step sees nodes x processes x batch_size examples. The "
    "job waits until the cluster has that many nodes free (on Ray at most 120 s, then it "
    "fails saying how many nodes Ray has)."))]


def data_parallel_problem(config) -> str | None:
    """What is wrong with a config's gpus / cpu_processes / distributed, if anything."""
    if config.gpus > 1 and config.cpu_processes > 1:
        return "give gpus or cpu_processes, not both"
    if config.distributed == "fsdp" and config.cpu_processes > 1:
        return "distributed fsdp runs on GPUs; with cpu_processes use ddp"
    return None


def data_parallel_resources(config) -> Resources:
    """The `resources` hook of a config with gpus, cpu_processes and distributed fields."""
    requires = ("gpus", f"got {config.gpus}; the job needs {config.gpus} GPUs") \
        if config.gpus > 1 else None
    return Resources(gpus=config.gpus, requires_gpu=requires, data_parallel=True,
                     cpu_processes=config.cpu_processes, distributed=config.distributed,
                     nodes=config.nodes)


def data_parallel_lab_problems(config, facts: LabFacts) -> list[str]:
    """The `lab_problems` hook: cpu_processes > 1 on a lab with GPUs."""
    if config.cpu_processes > 1 and facts.gpus:
        return [f"field 'cpu_processes': got {config.cpu_processes}; this lab has GPUs "
                f"({', '.join(map(str, facts.gpus))}), so jobs run there: use gpus"]
    return []


def check_layer_list(value: str | None) -> str | None:
    """A trainable_layers value: comma-separated indices, or 'new'."""
    if value is not None and value.strip() != "new":
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts or not all(p.isdigit() for p in parts):
            raise ValueError(f"{value!r}: expected comma-separated layer indices (2,5) or "
                             f"'new'")
    return value


def trainable_layers(value: str, ck) -> list[int]:
    """The decoder layers a trainable_layers value names on an opened checkpoint ('new': the
    layers a scale_layers block expansion added, from its metadata)."""
    if value.strip() == "new":
        new = (ck.metadata or {}).get("new_layers")
        if not new:
            raise ValueError(f"trainable_layers 'new': {ck.name} records no new layers (only a "
                             f"scale_layers block_expansion output does)")
        return list(new)
    return [int(p) for p in value.split(",") if p.strip()]


def run_dir_for(ctx, config) -> Path:
    """Where the Trainer keeps its resume state: the first job of a resume chain owns it."""
    job_id = ctx.job_id
    seen = set()
    if config.resume_job:
        job_id = config.resume_job
        while job_id not in seen:
            seen.add(job_id)
            prior = ctx.job_record(job_id)
            if prior is None:
                raise ValueError(f"resume_job: no job {job_id}")
            parent = prior.config.get("resume_job")
            if not parent:
                break
            job_id = parent
    return ctx.runs_dir / job_id


def check_resumable(ctx, config) -> None:
    """resume_job names a cancelled, failed or interrupted job of this plugin that ran with
    the same settings."""
    prior = ctx.job_record(config.resume_job)
    if prior is None:
        raise ValueError(f"resume_job: no job {config.resume_job}")
    if prior.plugin != ctx.job["plugin"]:
        raise ValueError(f"resume_job: {config.resume_job} is a {prior.plugin} job")
    if prior.status not in ("cancelled", "failed", "interrupted"):
        raise ValueError(f"resume_job: {config.resume_job} is {prior.status}; only a "
                         f"cancelled, failed or interrupted job can be resumed")
    new = config.model_dump(mode="json")
    fields = type(config).model_fields

    def before(key):  # a field added since the prior job ran (train's batching): its default
        if key in prior.config:
            return prior.config[key]
        if fields[key].is_required():
            return None
        return json.loads(json.dumps(fields[key].get_default(call_default_factory=True)))

    differ = [k for k in new if k not in ("resume_job", "name") and before(k) != new[k]]
    if differ:
        raise ValueError(f"resume_job: {config.resume_job} ran with different settings "
                         f"({', '.join(differ)}); resume needs the same ones")


def link_model_files(source: Path, dest: Path) -> None:
    """Hard-link (or copy) the model files of a Trainer checkpoint folder; optimizer and RNG
    state stay behind."""
    for f in source.iterdir():
        if f.name in MODEL_FILES or f.suffix == ".safetensors" or f.name.endswith(
                ".safetensors.index.json"):
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copy2(f, dest / f.name)


def open_for_training(ctx, config):
    """(checkpoint, its tokenizer with a pad token, config with max_length set): the
    checkpoint's max_position_embeddings (at most 2048) when empty, refused when above it.
    For configs with `checkpoint` and `max_length` (train, select_data)."""
    ck = ctx.open(config.checkpoint)
    tokenizer = ck.load_tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_pos = ck.config().get("max_position_embeddings")
    if config.max_length is None:
        config = config.model_copy(update={"max_length": min(max_pos or 2048, 2048)})
    elif max_pos and config.max_length > max_pos:
        raise ValueError(f"max_length ({config.max_length}) exceeds the model's "
                         f"max_position_embeddings ({max_pos})")
    return ck, tokenizer, config


def preview_tokenizer(config, view):
    """The tokenizer of the config's checkpoint, without registering anything."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(view.checkpoint_path(config.checkpoint))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def length_table(lengths: list[int], limit: int | None) -> str:
    import statistics

    cut = f" · {sum(1 for n in lengths if n >= limit)} reach max_length {limit}" if limit \
        else ""
    return (f"token lengths of the first {len(lengths)} rows: min {min(lengths)}, median "
            f"{statistics.median(lengths):.0f}, max {max(lengths)}{cut}")
