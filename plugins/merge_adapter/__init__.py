"""merge_adapter: fold a registered LoRA or DoRA adapter into its base with peft's
merge_and_unload, and register the full checkpoint with relation `adapter_merge` and both
parents (the adapter, role `adapter`; the base, role `base`)."""

from __future__ import annotations

import json
from typing import Literal, Optional

from pydantic import Field

from plugins import CheckpointRef, Plugin, PluginConfig


class Config(PluginConfig):
    adapter: CheckpointRef = Field(description=(
        "The adapter to merge: a registry id or name (a train job's lora/dora output), or a "
        "peft adapter folder."))
    base: Optional[CheckpointRef] = Field(None, description=(
        "The checkpoint to merge into. Empty: the adapter's registered base (its lineage edge "
        "with role base), else the base_model_name_or_path of its adapter_config.json."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "dtype the base is loaded, merged and saved in. auto: the base's own."))
    max_shard_mb: int = Field(5000, ge=10, description=(
        "Largest safetensors shard written, in MB (bigger models are split into shards)."))
    name: Optional[str] = Field(None, min_length=1, max_length=100, description=(
        "Name of the merged checkpoint. Empty: <adapter name>-merged."))


def registered_base(ctx, adapter) -> str:
    """The base an adapter was trained on: its `base` lineage edge, else its adapter_config."""
    for edge in ctx.parents(adapter.id):
        if edge.role == "base":
            return edge.parent_id
    base = json.loads((adapter.path / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    if not base:
        raise ValueError(f"base: {adapter.name} has no registered base and its "
                         f"adapter_config.json names none; set base")
    return base


def merge_into_base(ctx, adapter, base, name: str, dtype: str = "auto",
                    max_shard_mb: int = 5000):
    """Load `base`, apply the adapter folder, merge_and_unload, and write the full model (and
    the adapter's tokenizer, else the base's) into a new `adapter_merge` checkpoint."""
    import torch
    from peft import PeftModel

    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    model = base.load_model(device=ctx.device, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(model, str(adapter.path)).merge_and_unload()
    out = ctx.new_checkpoint("adapter_merge", parents=[
        {"checkpoint": adapter, "role": "adapter"}, {"checkpoint": base, "role": "base"}],
        name=name, metadata={"adapter": adapter.id, "base": base.id,
                             "merge": "peft merge_and_unload", "dtype": dtype})
    merged.save_pretrained(out.path, max_shard_size=f"{max_shard_mb}MB")
    has_tokenizer = any((adapter.path / f).exists() for f in ("tokenizer.json",
                                                              "tokenizer_config.json"))
    (adapter if has_tokenizer else base).load_tokenizer().save_pretrained(out.path)
    ctx.log(f"merged adapter {adapter.name} into {base.name}")
    return out


def run(config: Config, ctx) -> None:
    adapter = ctx.open(config.adapter)
    if not (adapter.path / "adapter_config.json").exists():
        raise ValueError(f"adapter: {adapter.name} is not a peft adapter (its folder "
                         f"{adapter.path} has no adapter_config.json)")
    base = ctx.open(config.base or registered_base(ctx, adapter))
    ctx.progress(0.1, "merging")
    merge_into_base(ctx, adapter, base, config.name or f"{adapter.name}-merged", config.dtype,
                    config.max_shard_mb)
    ctx.progress(1.0, "done")


PLUGIN = Plugin(
    name="merge_adapter",
    order=35,
    title="Merge adapter",
    description="Merge a LoRA or DoRA adapter into its base: a full checkpoint whose parents "
                "are both the adapter and the base.",
    Config=Config,
    run=run,
)
