"""merge: every mergekit method, on registry checkpoints, with one lineage edge per input.

The merge itself is mergekit's `run_merge`. This plugin adds what mergekit lacks for a lab:
references by registry id or name, checks that name the offending tensor or vocabulary
before any work is done, a NaN/Inf scan of the result, and the lineage.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from plugins import CheckpointRef, LongText, Plugin, PluginConfig

METHODS = ("linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "dare_linear",
           "breadcrumbs", "della", "model_stock", "passthrough")
NEEDS_BASE = {"slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "dare_linear",
              "breadcrumbs", "della", "model_stock"}
USES_DENSITY = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "della"}
USES_WEIGHT = USES_DENSITY | {"linear", "task_arithmetic"}  # mergekit requires a weight


class Config(PluginConfig):
    mergekit_yaml: Optional[LongText] = Field(
        None, description="A whole mergekit configuration: anything `mergekit-yaml` accepts. "
                          "Model references may be registry ids, names, folders or Hub ids. "
                          "Leave empty to merge with the fields below instead.")
    method: Literal[METHODS] = Field("linear", description="mergekit merge method.")
    models: list[CheckpointRef] = Field(
        default_factory=list, json_schema_extra={"x-weightsmith": "checkpoints"},
        description="The checkpoints to merge (not the base model).")
    weights: Optional[list[float]] = Field(
        None, description="One weight per model, in order. Empty: 1.0 each (for linear, the "
                          "plain mean; for task arithmetic, the sum of the task vectors).")
    density: Optional[float] = Field(
        None, gt=0, le=1, description="Fraction of each task vector kept (ties, dare_ties, "
                                      "dare_linear, breadcrumbs, della).")
    t: Optional[float] = Field(None, ge=0, le=1, description="Interpolation factor from the "
                                                             "base (0) to the model (1): slerp, "
                                                             "nuslerp.")
    base_model: Optional[CheckpointRef] = Field(
        None, description="The base model (task-vector methods, slerp, model_stock).")
    tokenizer_source: Optional[str] = Field(
        None, description="The output's tokenizer: 'base', 'union', or a model reference. "
                          "Needed when the vocabularies differ.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the merge is computed and stored in.")
    seed: int = Field(0, description="Random seed (DARE's random drops).")
    name: Optional[str] = Field(None, min_length=1, max_length=100,
                                description="Name of the merged checkpoint. Empty: derived.")

    @model_validator(mode="after")
    def _one_way(self):
        if self.mergekit_yaml and self.models:
            raise ValueError("give either mergekit_yaml or models, not both")
        if not self.mergekit_yaml:
            if not self.models:
                raise ValueError("models is empty: name the checkpoints to merge (or paste a "
                                 "mergekit_yaml)")
            if self.weights is not None and len(self.weights) != len(self.models):
                raise ValueError(f"weights has {len(self.weights)} values for "
                                 f"{len(self.models)} models")
            if self.method in NEEDS_BASE and not self.base_model:
                raise ValueError(f"method {self.method} needs a base_model")
            if self.method in ("slerp", "nuslerp") and self.t is None:
                raise ValueError(f"method {self.method} needs t")
        return self


def build_mergekit_config(config: Config) -> dict:
    """The mergekit configuration the form's fields describe."""
    entries = []
    for i, ref in enumerate(config.models):
        params = {}
        if config.weights is not None:
            params["weight"] = config.weights[i]
        elif config.method in USES_WEIGHT:
            params["weight"] = 1.0
        if config.density is not None and config.method in USES_DENSITY:
            params["density"] = config.density
        entries.append({"model": ref, **({"parameters": params} if params else {})})
    data: dict = {"merge_method": config.method, "models": entries, "dtype": config.dtype}
    if config.base_model:
        data["base_model"] = config.base_model
    if config.t is not None:
        data["parameters"] = {"t": config.t}
    if config.tokenizer_source:
        data["tokenizer_source"] = config.tokenizer_source
    return data


def model_refs(data: dict) -> list[tuple[str, str, dict]]:
    """(reference, role, parameters) for every model a mergekit config reads."""
    out = []
    for entry in data.get("models") or []:
        out.append((entry["model"], "model", entry.get("parameters") or {}))
    for piece in data.get("slices") or []:
        for source in piece.get("sources") or []:
            out.append((source["model"], "model", source.get("parameters") or {}))
    if data.get("base_model"):
        out.append((data["base_model"], "base", {}))
    return out


def _rewrite(data: dict, paths: dict[str, str]) -> dict:
    """A copy of the config with every model reference replaced by its local folder."""
    import copy

    data = copy.deepcopy(data)
    for entry in data.get("models") or []:
        entry["model"] = paths[entry["model"]]
    for piece in data.get("slices") or []:
        for source in piece.get("sources") or []:
            source["model"] = paths[source["model"]]
    if data.get("base_model"):
        data["base_model"] = paths[data["base_model"]]
    source = data.get("tokenizer_source")
    if isinstance(source, str) and source in paths:
        data["tokenizer_source"] = paths[source]
    return data


def _header_shapes(folder) -> dict[str, list[int]]:
    from registry.folder import tensor_headers, weight_files

    return {key: shape for file in weight_files(folder)
            for key, (_, shape) in tensor_headers(file).items()}


def check_compatible(opened: dict, data: dict) -> None:
    """Fail before merging if shapes or vocabularies differ, naming the first difference."""
    has_slices = bool(data.get("slices"))
    refs = list(opened)
    first = refs[0]
    first_shapes = _header_shapes(opened[first].path)
    vocab = {r: opened[r].config().get("vocab_size") for r in refs}
    if len(set(vocab.values())) > 1 and not data.get("tokenizer_source"):
        a, b = [r for r in refs if vocab[r] != vocab[first]][:1] + [first]
        raise ValueError(f"vocabularies differ: {a} has vocab_size {vocab[a]}, {b} has "
                         f"{vocab[b]}; set tokenizer_source ('base', 'union' or a model)")
    if has_slices:
        return  # passthrough slices may combine models of different depths on purpose
    for ref in refs[1:]:
        shapes = _header_shapes(opened[ref].path)
        for key in sorted(set(first_shapes) | set(shapes)):
            if key not in shapes or key not in first_shapes:
                missing = ref if key not in shapes else first
                raise ValueError(f"tensor {key} is missing from {missing}: the models do not "
                                 f"share an architecture")
            if list(shapes[key]) != list(first_shapes[key]) and not (
                    "embed_tokens" in key or "lm_head" in key):
                raise ValueError(f"tensor {key} differs in shape: {list(first_shapes[key])} in "
                                 f"{first}, {list(shapes[key])} in {ref}")


def check_finite(folder) -> None:
    import torch
    from safetensors import safe_open

    from registry.folder import weight_files

    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if not torch.isfinite(f.get_tensor(key)).all():
                    raise ValueError(f"the merge produced NaN or Inf in {key} ({file.name}); "
                                     f"nothing was registered")


def run(config: Config, ctx) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from pydantic import ValidationError

    if config.mergekit_yaml:
        try:
            data = yaml.safe_load(config.mergekit_yaml)
        except yaml.YAMLError as e:
            raise ValueError(f"mergekit_yaml is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError("mergekit_yaml must be a mapping (a mergekit configuration)")
    else:
        data = build_mergekit_config(config)
    inputs = model_refs(data)
    if not inputs:
        raise ValueError("the mergekit configuration names no models")
    opened = {}
    for ref, _, _ in inputs:
        if ref not in opened:
            opened[ref] = ctx.open(ref)
    source = data.get("tokenizer_source")
    if isinstance(source, str) and source not in ("base", "union") and source not in opened:
        opened[source] = ctx.open(source)
    ctx.progress(0.1, "inputs opened")
    check_compatible({r: opened[r] for r, _, _ in inputs}, data)
    resolved = _rewrite(data, {r: str(ck.path) for r, ck in opened.items()})
    try:
        merge_config = MergeConfiguration.model_validate(resolved)
    except ValidationError as e:
        raise ValueError(f"mergekit rejects this configuration: {e}") from None

    # Lineage: one edge per input checkpoint; the base role wins when a model is both.
    edges: dict[str, dict] = {}
    for ref, role, params in inputs:
        ck = opened[ref]
        edge = edges.setdefault(ck.id, {"checkpoint": ck, "role": role})
        if role == "base":
            edge["role"] = "base"
        for key in ("weight", "density"):
            if isinstance(params.get(key), (int, float)):
                edge[key] = float(params[key])
    warnings = []
    base = data.get("base_model")
    if base:
        base_id = opened[base].id
        for ref, role, _ in inputs:
            if role == "model" and opened[ref].id != base_id:
                ancestors = {a["id"] for a in ctx.registry.ancestors(opened[ref].id)}
                if base_id not in ancestors:
                    warnings.append(f"base model {base} is not an ancestor of {ref} in the "
                                    f"registry")
    for w in warnings:
        ctx.log(f"warning: {w}")

    original = config.mergekit_yaml or yaml.safe_dump(data, sort_keys=False)
    out = ctx.new_checkpoint(
        "merge", parents=list(edges.values()),
        name=config.name or f"merge-{data.get('merge_method', 'merge')}",
        metadata={"mergekit_yaml": original, "merge_method": data.get("merge_method"),
                  "warnings": warnings})
    ctx.log(f"merging {len(edges)} checkpoints with {data.get('merge_method')}")
    resolved_yaml = yaml.safe_dump(resolved, sort_keys=False)
    run_merge(merge_config, str(out.path),
              MergeOptions(copy_tokenizer=True, random_seed=config.seed, quiet=True,
                           cuda=ctx.device == "cuda", write_model_card=False),
              config_source=resolved_yaml)
    # mergekit writes mergekit_config.yml only along with its model card (the Hub-sync
    # plugin writes ours), so write it here, as mergekit would.
    (out.path / "mergekit_config.yml").write_text(resolved_yaml)
    ctx.progress(0.9, "checking the result")
    check_finite(out.path)
    ctx.progress(1.0, "merged")


PLUGIN = Plugin(
    name="merge",
    title="Merge",
    description="Merge checkpoints with any mergekit method (linear, slerp, task arithmetic, "
                "TIES, DARE, model stock, passthrough...), from the form or a pasted "
                "mergekit YAML.",
    Config=Config,
    run=run,
)
