"""scale_layers: grow or shrink a model's depth and MLP width (ops/scale_layers.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, model_validator

from plugins import (ADVANCED, METHOD_SELECTOR, CheckpointRef, LocalFile, NextStep, Plugin,
                     PluginConfig, for_methods, form_hints)

from plugins.kit.assets import DEMO_HELDOUT as DEMO_TEXT

METHODS = {
    "depth_upscale": "SOLAR depth up-scaling: two copies, overlap layers cut, concatenated",
    "stack": "G_stack: the whole layer stack repeated growth_factor times",
    "block_expansion": "LLaMA Pro: a zero-output copy after every expand_every layers "
                       "(exactly the same function)",
    "widen_mlp": "Net2Net: MLP widened to intermediate_size by splitting neurons "
                 "(the same function, up to rounding, with noise 0)",
    "prune_depth": "ShortGPT: remove the remove_layers layers of lowest block influence",
}


class Config(PluginConfig):
    checkpoint: CheckpointRef = Field(description="Checkpoint to scale: registry id, name, "
                                                  "local folder or Hub id.")
    method: Literal["depth_upscale", "stack", "block_expansion", "widen_mlp",
                    "prune_depth"] = Field(
        "block_expansion", description="; ".join(f"{k}: {v}" for k, v in METHODS.items()),
        json_schema_extra=METHOD_SELECTOR)
    solar_overlap: int = Field(
        8, ge=1, json_schema_extra=for_methods("depth_upscale"),
        description="depth_upscale: layers cut from the end of the first copy and the start "
                    "of the second (32 layers, 8 -> 48 layers).")
    growth_factor: int = Field(2, ge=1, le=16, json_schema_extra=for_methods("stack"),
                               description="stack: how many times the layer stack is "
                                           "repeated.")
    expand_every: int = Field(4, ge=1, json_schema_extra=for_methods("block_expansion"),
                              description="block_expansion: insert a new block after every "
                                          "this many layers.")
    intermediate_size: Optional[int] = Field(None, ge=1, json_schema_extra=for_methods(
        "widen_mlp"), description="widen_mlp: the new MLP width (required).")
    noise: float = Field(0.0, ge=0, le=1,
                         json_schema_extra=form_hints(for_methods("widen_mlp"), ADVANCED),
                         description="widen_mlp: relative noise on the copied neurons to "
                                     "break symmetry (0: exact).")
    remove_layers: int = Field(1, ge=1, json_schema_extra=for_methods("prune_depth"),
                               description="prune_depth: how many layers to remove.")
    calibration_file: Optional[LocalFile] = Field(
        None, json_schema_extra=form_hints(for_methods("prune_depth"), ADVANCED),
        description="prune_depth: text to measure block influence and perplexity on. "
                    "Empty: the demo held-out text.")
    calibration_samples: int = Field(
        16, ge=1, le=4096, json_schema_extra=form_hints(for_methods("prune_depth"), ADVANCED),
        description="prune_depth: number of calibration sequences.")
    calibration_length: int = Field(
        128, ge=8, le=8192, json_schema_extra=form_hints(for_methods("prune_depth"), ADVANCED),
        description="prune_depth: tokens per calibration sequence.")
    seed: int = Field(0, json_schema_extra=form_hints(for_methods("widen_mlp"), ADVANCED),
                      description="Random seed (widen_mlp neuron choice and noise).")
    name: Optional[str] = Field(None, min_length=1, max_length=100,
                                description="Name of the new checkpoint. Empty: derived.")

    @model_validator(mode="after")
    def _method_settings(self):
        if self.method == "widen_mlp" and self.intermediate_size is None:
            raise ValueError("intermediate_size is required for method widen_mlp")
        return self


def mergekit_passthrough(source: str, ranges: list[tuple[int, int]]) -> str:
    """The mergekit passthrough YAML that builds the same layer stack from slices."""
    lines = ["merge_method: passthrough", "dtype: float32", "slices:"]
    for start, end in ranges:
        lines += ["  - sources:", f"      - model: {source}",
                  f"        layer_range: [{start}, {end}]"]
    return "\n".join(lines) + "\n"


def _calibration(config: Config, tokenizer):
    import torch

    path = Path(config.calibration_file).expanduser() if config.calibration_file else DEMO_TEXT
    if not path.is_file():
        raise FileNotFoundError(f"calibration_file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    ids = tokenizer(text)["input_ids"]
    need = config.calibration_samples * config.calibration_length
    if len(ids) < config.calibration_length:
        raise ValueError(f"calibration_file {path} has {len(ids)} tokens, fewer than one "
                         f"calibration_length ({config.calibration_length})")
    ids = ids[:need]
    n = len(ids) // config.calibration_length
    return torch.tensor(ids[:n * config.calibration_length]).view(n, config.calibration_length)


def run(config: Config, ctx) -> None:
    from ops.perplexity import sliding_window_nll
    from ops.scale_layers import (apply_layer_map, block_influence, check_supported,
                                  expansion_map, lowest_influence, num_layers, removal_map,
                                  solar_map, stack_map, widen_mlp)

    ck = ctx.open(config.checkpoint)
    ctx.log(f"scaling {ck.name} ({ck.id}) with {config.method}")
    model = ck.load_model(device=ctx.device)
    tokenizer = ck.load_tokenizer()
    check_supported(model)
    n = num_layers(model)
    meta: dict = {"method": config.method, "source_layers": n}
    ctx.progress(0.2, "model loaded")

    if config.method == "depth_upscale":
        layer_map = solar_map(n, config.solar_overlap)
        apply_layer_map(model, layer_map)
        meta["mergekit_yaml"] = mergekit_passthrough(
            str(ck.path), [(0, n - config.solar_overlap), (config.solar_overlap, n)])
    elif config.method == "stack":
        layer_map = stack_map(n, config.growth_factor)
        apply_layer_map(model, layer_map)
        meta["mergekit_yaml"] = mergekit_passthrough(str(ck.path),
                                                     [(0, n)] * config.growth_factor)
    elif config.method == "block_expansion":
        layer_map, new = expansion_map(n, config.expand_every)
        apply_layer_map(model, layer_map, zero_output=new)
        meta["new_layers"] = new  # train only these: the train plugins offer it
    elif config.method == "widen_mlp":
        before = model.config.intermediate_size
        widen_mlp(model, config.intermediate_size, config.noise, config.seed)
        layer_map = list(range(n))
        meta.update(intermediate_size=[before, config.intermediate_size], noise=config.noise)
    else:  # prune_depth
        if config.remove_layers >= n:
            raise ValueError(f"remove_layers ({config.remove_layers}) must be below the layer "
                             f"count ({n})")
        blocks = _calibration(config, tokenizer)
        flat = blocks.reshape(-1)
        length = config.calibration_length
        ppl_before = sliding_window_nll(model, flat, length, length).perplexity
        bi = block_influence(model, list(blocks.split(8)))
        drop = lowest_influence(bi, config.remove_layers)
        layer_map = removal_map(n, drop)
        apply_layer_map(model, layer_map)
        ppl_after = sliding_window_nll(model, flat, length, length).perplexity
        meta.update(block_influence=bi, removed_layers=drop,
                    calibration_perplexity={"before": ppl_before, "after": ppl_after})
        ctx.log(f"block influence: {', '.join(f'{b:.4f}' for b in bi)}; removed {drop}; "
                f"calibration perplexity {ppl_before:.3f} -> {ppl_after:.3f}")
        for i, value in enumerate(bi):
            ctx.metric("block_influence", value, step=i)
    meta["layer_map"] = layer_map
    ctx.progress(0.7, "writing checkpoint")

    out = ctx.new_checkpoint("scale", parents=[ck], metadata=meta,
                             name=config.name or f"{ck.name}-{config.method}")
    model.save_pretrained(out.path)
    tokenizer.save_pretrained(out.path)
    if "mergekit_yaml" in meta:
        (out.path / "mergekit_config.yml").write_text(meta["mergekit_yaml"])
    ctx.log(f"{n} -> {model.config.num_hidden_layers} layers; layer map {layer_map}")
    ctx.progress(1.0, "done")


PLUGIN = Plugin(
    name="scale_layers",
    order=60,
    title="Scale layers",
    description="Grow or shrink a model: SOLAR depth up-scaling, G_stack, LLaMA Pro block "
                "expansion, Net2Net MLP widening, or ShortGPT depth pruning by block influence.",
    Config=Config,
    run=run,
    per_layer_series=("block_influence",),
    next_steps={"scale": NextStep("continue_pretrain", (
        "Grown or cut layers need training: continue pre-training on domain text (after a "
        "block expansion, set `trainable_layers: new` to train only the new blocks, as LLaMA "
        "Pro does)."))},
)
