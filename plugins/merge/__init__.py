"""merge: every mergekit method, on registry checkpoints, with one lineage edge per input.

Two engines merge. linear, task_arithmetic, ties, dare_linear and dare_ties run on the native
streaming engine (`ops/merge/`: tensor by tensor, bounded memory, both cores, results
bit-identical to mergekit's) when it covers the configuration; everything else runs on
mergekit's `run_merge`. This plugin adds what mergekit lacks for a lab: references by
registry id or name, checks that name the offending tensor or vocabulary before any work is
done, a NaN/Inf scan of the result, the choice of engine, and the lineage.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from ops.merge import METHODS as NATIVE_METHODS, native_refusal
from plugins import (ADVANCED, METHOD_SELECTOR, CheckpointRef, LongText, Plugin,
                     PluginConfig, for_methods, form_hints)

METHODS = ("linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "dare_linear",
           "breadcrumbs", "della", "model_stock", "passthrough")
NEEDS_BASE = {"slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "dare_linear",
              "breadcrumbs", "della", "model_stock"}
USES_DENSITY = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "della"}
USES_WEIGHT = USES_DENSITY | {"linear", "task_arithmetic"}  # mergekit requires a weight
ENGINES = ("auto", "native", "mergekit")
LINES_METHODS = ("task_arithmetic", "ties")  # LiNeS rescales their merged task vector


class Config(PluginConfig):
    # Which methods read weights, density, t and base_model (the form shows each field only
    # for those) is mergekit's own spec of each method, not a table of ours:
    # mergekit.merge_methods.get(method).spec.parameters (weight, density, t) and
    # .spec.contract.base (a base model required or optional); density counts only where the
    # method sparsifies (a GeneralizedTaskArithmeticMerge with a sparsification_method).
    # Written out here because importing mergekit imports torch, which the form never does;
    # tests/test_forms.py::test_merge_fields_follow_mergekits_method_specs recomputes the
    # lists from the installed mergekit and fails when they differ.
    mergekit_yaml: Optional[LongText] = Field(
        None, json_schema_extra=ADVANCED,
        description="A whole mergekit configuration: anything `mergekit-yaml` accepts. "
                    "Model references may be registry ids, names, folders or Hub ids. "
                    "Leave empty to merge with the fields above instead.")
    method: Literal[METHODS] = Field("linear", json_schema_extra=METHOD_SELECTOR,
                                     description="mergekit merge method.")
    models: list[CheckpointRef] = Field(
        default_factory=list, json_schema_extra={"x-weightsmith": "checkpoints"},
        description="The checkpoints to merge (not the base model).")
    weights: Optional[list[float]] = Field(
        None, json_schema_extra=for_methods("linear", "nuslerp", "task_arithmetic", "ties",
                                            "dare_ties", "dare_linear", "breadcrumbs", "della"),
        description="One weight per model, in order. Empty: 1.0 each (for linear, the "
                    "plain mean; for task arithmetic, the sum of the task vectors).")
    density: Optional[float] = Field(
        None, gt=0, le=1,
        json_schema_extra=for_methods("ties", "dare_ties", "dare_linear", "breadcrumbs",
                                      "della"),
        description="Fraction of each task vector kept (ties, dare_ties, dare_linear, "
                    "breadcrumbs, della).")
    t: Optional[float] = Field(None, ge=0, le=1, json_schema_extra=for_methods("slerp"),
                               description="Interpolation factor from the base (0) to the "
                                           "model (1): slerp.")
    base_model: Optional[CheckpointRef] = Field(
        None, json_schema_extra=for_methods("slerp", "nuslerp", "task_arithmetic", "ties",
                                            "dare_ties", "dare_linear", "breadcrumbs", "della",
                                            "model_stock"),
        description="The base model (task-vector methods, slerp, nuslerp, model_stock).")
    tokenizer_source: Optional[str] = Field(
        None, json_schema_extra=ADVANCED,
        description="The output's tokenizer: 'base', 'union', or a model reference. "
                    "Needed when the vocabularies differ.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", json_schema_extra=ADVANCED,
        description="Dtype the merge is computed and stored in.")
    seed: int = Field(0, json_schema_extra=ADVANCED,
                      description="Random seed (DARE's random drops).")
    name: Optional[str] = Field(None, min_length=1, max_length=100,
                                description="Name of the merged checkpoint. Empty: derived.")
    lines: bool = Field(
        False, json_schema_extra=for_methods(*LINES_METHODS),
        description="LiNeS after the merge (arXiv 2410.17146; task_arithmetic and ties): the "
                    "merged task vector (merge - base_model) is scaled by alpha + beta * l / "
                    "(L - 1) on decoder layer l of L and by alpha on the embeddings, final "
                    "norm and head, so shallow layers stay near the base. alpha: (||sum of "
                    "the models' task vectors||_1 / ||merged task vector||_1) / T.")
    lines_alpha: Optional[float] = Field(
        None, ge=0, le=10,
        json_schema_extra=form_hints(for_methods(*LINES_METHODS), ADVANCED),
        description="With lines: LiNeS' alpha, the scale of the shallowest layer and of the "
                    "tensors outside the layers. Empty: the multi-task norm ratio.")
    lines_beta: Optional[float] = Field(
        None, ge=-10, le=10,
        json_schema_extra=form_hints(for_methods(*LINES_METHODS), ADVANCED),
        description="With lines: LiNeS' beta, what the deepest layer adds to alpha. Empty: "
                    "1 - alpha.")
    engine: Literal[ENGINES] = Field(
        "auto", json_schema_extra=ADVANCED,
        description="Which engine merges. 'native': the streaming engine ("
                    f"{', '.join(NATIVE_METHODS)}; tensor by tensor, "
                    "bounded memory, results bit-identical to mergekit's). "
                    "'mergekit': mergekit's run_merge. 'auto': native when it covers "
                    "the configuration, else mergekit; the job log says which ran "
                    "and why.")

    @field_validator("engine")
    @classmethod
    def _native_covers(cls, engine, info):
        if engine != "native":
            return engine
        data = info.data
        if data.get("mergekit_yaml"):
            try:
                parsed = parse_mergekit_yaml(data["mergekit_yaml"])
            except ValueError:
                return engine  # reported by the mergekit_yaml validator
        else:
            parsed = {"merge_method": data.get("method"),
                      "base_model": data.get("base_model"),
                      "tokenizer_source": data.get("tokenizer_source")}
        reason = native_refusal(parsed)
        if reason:
            raise native_error(reason)
        return engine

    @field_validator("mergekit_yaml")
    @classmethod
    def _mergekit_yaml_parses(cls, text):
        if not text:
            return text
        data = parse_mergekit_yaml(text)
        if not isinstance(data.get("merge_method"), str) or not data["merge_method"].strip():
            raise ValueError("mergekit_yaml: merge_method is missing; expected a mergekit "
                             f"method name such as {', '.join(METHODS[:5])}")
        given = [key for key in ("models", "slices", "modules") if data.get(key)]
        if len(given) != 1:  # mergekit's own rule (MergeConfiguration.validate_inputs)
            raise ValueError("mergekit_yaml: expected exactly one of models, slices or modules"
                             + (f", got {' and '.join(given)}" if given else ""))
        model_refs(data)  # every model reference is one checkpoint reference
        return text

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
            # mergekit's nuslerp reads per-model weights, never t (its parameter spec)
            if self.method == "slerp" and self.t is None:
                raise ValueError("method slerp needs t")
            if self.method != "slerp" and self.t is not None:
                raise ValueError(f"t is read by slerp only, not by {self.method}: leave it "
                                 f"empty")
        if not self.lines and (self.lines_alpha is not None or self.lines_beta is not None):
            raise ValueError("lines_alpha and lines_beta are read only with lines: true")
        if self.lines:
            if self.mergekit_yaml:
                data = parse_mergekit_yaml(self.mergekit_yaml)
                method, base = data.get("merge_method"), data.get("base_model")
                if not data.get("models"):
                    raise ValueError("lines needs a mergekit_yaml with models (not slices or "
                                     "modules): it rescales the merged task vector tensor by "
                                     "tensor")
            else:
                method, base = self.method, self.base_model
            if method not in LINES_METHODS:
                raise ValueError(f"lines (LiNeS) rescales a {' or '.join(LINES_METHODS)} "
                                 f"merge, not {method}")
            if not base:
                raise ValueError("lines needs a base_model: LiNeS scales merge - base_model")
        return self


def referenced_paths(config: Config) -> list[tuple[str, str]]:
    """Every checkpoint a pasted mergekit_yaml reads: models, slice sources and bases,
    tokenizer sources and token sources (app/paths.py checks them in a shared lab). The job
    checks again, against mergekit's own parsed configuration."""
    if not config.mergekit_yaml:
        return []
    return [(f"mergekit_yaml ({where})", ref)
            for ref, where, _ in model_refs(parse_mergekit_yaml(config.mergekit_yaml))]


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



def foreign_config(data: dict) -> Optional[dict]:
    """A plain mergekit configuration file (what `mergekit-yaml` reads: `merge_method` at the
    top level) as this plugin's config, for `weightsmith run merge file.yml` and the form's
    Load YAML; None when `data` is not one.

    When the form's own fields say exactly the same merge (build_mergekit_config of them
    gives back the file's configuration, value for value: one method, models with per-model
    weights, one density, base_model, t, dtype, tokenizer_source), the file becomes those
    fields, so the form shows it field by field. Anything more (slices, a top-level
    normalize, per-model densities that differ, no dtype, a base model listed among the
    models...) becomes `mergekit_yaml`, the whole configuration as it is, exactly what
    wrapping the file in `mergekit_yaml:` gives: nothing in it is dropped or reinterpreted,
    and the mergekit_yaml checks (references, paths) apply to it as to a pasted one."""
    if not isinstance(data, dict) or "merge_method" not in data:
        return None
    fields = _form_fields(data)
    if fields is not None:
        return fields
    import yaml

    return {"mergekit_yaml": yaml.safe_dump(data, sort_keys=False, allow_unicode=True)}


def _form_fields(data: dict) -> Optional[dict]:
    """The form's fields for a mergekit configuration they describe exactly, else None."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if set(data) - {"merge_method", "models", "base_model", "dtype", "parameters",
                    "tokenizer_source"}:
        return None
    models = data.get("models")
    if not isinstance(models, list) or not models or not isinstance(data.get("merge_method"),
                                                                       str):
        return None
    refs, weights, densities = [], [], []
    for entry in models:
        if not isinstance(entry, dict) or set(entry) - {"model", "parameters"}:
            return None
        params = entry.get("parameters") or {}
        if not isinstance(params, dict) or set(params) - {"weight", "density"} \
                or not all(number(v) for v in params.values()):
            return None
        refs.append(entry.get("model"))
        weights.append(params.get("weight"))
        densities.append(params.get("density"))
    shared = data.get("parameters") or {}
    if not isinstance(shared, dict) or set(shared) - {"t"} or not all(
            number(v) for v in shared.values()):
        return None
    fields: dict = {"method": data["merge_method"], "models": refs}
    if all(w is not None for w in weights):
        fields["weights"] = weights
    if densities[0] is not None:
        fields["density"] = densities[0]
    for key, value in (("base_model", data.get("base_model")), ("t", shared.get("t")),
                       ("dtype", data.get("dtype")),
                       ("tokenizer_source", data.get("tokenizer_source"))):
        if value is not None:
            fields[key] = value
    try:
        config = Config.model_validate(fields)
    except ValueError:  # pydantic's ValidationError: not the form's to show, mergekit's
        return None
    return fields if build_mergekit_config(config) == data else None

def parse_mergekit_yaml(text: str) -> dict:
    """A pasted mergekit configuration as a mapping, through the bounded YAML loader
    (ValueError naming the problem). The text is parsed once per process (validating a
    Config, its referenced paths and the job all ask); each caller gets its own copy."""
    return copy.deepcopy(_parse_mergekit_yaml(text))


@lru_cache(maxsize=32)
def _parse_mergekit_yaml(text: str) -> dict:
    from ops import safe_yaml

    try:
        data = safe_yaml.load(text, what="mergekit_yaml")
    except safe_yaml.YamlError as e:
        raise ValueError(str(e)) from None
    if not isinstance(data, dict):
        raise ValueError("mergekit_yaml: expected a mapping (a mergekit configuration with "
                         "merge_method and models or slices)")
    return data


def _slots(data: dict):
    """(container, key, where, parameters) for every place in a mergekit configuration that
    names a model: mergekit's InputModelDefinition, InputSliceDefinition, the slices' and
    the config's base_model, modules, tokenizer_source, tokenizer.source and the token
    embedding sources (mergekit/config.py, mergekit/tokenizer/config.py). The job checks
    the result against mergekit's own parse, so a slot missing here fails the job before
    anything is read, rather than reading an unchecked path."""
    def entries(items, where):
        if items is None:
            return
        if not isinstance(items, list):
            raise ValueError(f"mergekit_yaml: {where} must be a list")
        for i, entry in enumerate(items):
            if not isinstance(entry, dict):
                raise ValueError(f"mergekit_yaml: {where}[{i}] must be a mapping with a model")
            yield entry, f"{where}[{i}]"

    def slices(items, where):
        for piece, at in entries(items, where):
            for source, src_at in entries(piece.get("sources"), f"{at}.sources"):
                yield source, "model", f"{src_at}.model", source.get("parameters") or {}
            if piece.get("base_model") is not None:
                yield piece, "base_model", f"{at}.base_model", {}

    def models(items, where):
        for entry, at in entries(items, where):
            yield entry, "model", f"{at}.model", entry.get("parameters") or {}

    yield from models(data.get("models"), "models")
    yield from slices(data.get("slices"), "slices")
    modules = data.get("modules")
    if modules is not None:
        if not isinstance(modules, dict):
            raise ValueError("mergekit_yaml: modules must be a mapping of module name to "
                             "its models or slices")
        for name, module in modules.items():
            if not isinstance(module, dict):
                raise ValueError(f"mergekit_yaml: modules.{name} must be a mapping")
            yield from models(module.get("models"), f"modules.{name}.models")
            yield from slices(module.get("slices"), f"modules.{name}.slices")
    if data.get("base_model") is not None:
        yield data, "base_model", "base_model", {}
    if data.get("tokenizer_source") not in (None, "base", "union"):
        yield data, "tokenizer_source", "tokenizer_source", {}
    tokenizer = data.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, dict):
            raise ValueError("mergekit_yaml: tokenizer must be a mapping")
        if tokenizer.get("source") not in (None, "base", "union"):
            yield tokenizer, "source", "tokenizer.source", {}
        tokens = tokenizer.get("tokens") or {}
        if not isinstance(tokens, dict):
            raise ValueError("mergekit_yaml: tokenizer.tokens must be a mapping")
        for token, spec in tokens.items():
            if not isinstance(spec, dict):
                raise ValueError(f"mergekit_yaml: tokenizer.tokens.{token} must be a mapping")
            source = spec.get("source")
            if isinstance(source, dict) and source.get("kind") == "model_token":
                yield source, "model", f"tokenizer.tokens.{token}.source.model", {}
            elif source is not None and not isinstance(source, dict):
                yield spec, "source", f"tokenizer.tokens.{token}.source", {}


_KINDS = {dict: "a mapping", list: "a list", str: "nothing", type(None): "nothing"}


def model_refs(data: dict) -> list[tuple[str, str, dict]]:
    """(reference, where, parameters) for every model a mergekit config reads; `where` is
    `base` for the merge's base model, else its place in the configuration. Raises
    ValueError for a reference that is not one checkpoint reference (a mapping, a list,
    nothing)."""
    out = []
    for container, key, where, params in _slots(data):
        ref = container.get(key)
        if not isinstance(ref, str) or not ref.strip():
            raise ValueError(f"mergekit_yaml: {where} must be a checkpoint reference (a "
                             f"registry id or name, a folder or a Hub id), got "
                             f"{_KINDS.get(type(ref), type(ref).__name__)}")
        out.append((ref, "base" if where == "base_model" else where,
                    params if isinstance(params, dict) else {}))
    return out


def _rewrite(data: dict, paths: dict[str, str]) -> dict:
    """A copy of the config with every model reference replaced by its local folder."""
    import copy

    data = copy.deepcopy(data)
    for container, key, _, _ in _slots(data):
        container[key] = paths[container[key]]
    return data


def mergekit_reads(merge_config) -> set[str]:
    """Every path mergekit's own parsed configuration would read: each ModelReference's
    model and LoRA path, wherever it sits in the configuration (a generic walk of the
    pydantic objects, so no key list can miss one)."""
    from mergekit.common import ModelPath
    from pydantic import BaseModel

    found: set[str] = set()

    def walk(obj):
        if isinstance(obj, ModelPath):
            found.add(obj.path)
        elif isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                walk(getattr(obj, name))
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    walk(merge_config)
    return found


def native_error(reason: str) -> ValueError:
    """The error for engine 'native' on a merge it cannot run (ops.merge.native_refusal's
    reason, or the engine's Unsupported)."""
    return ValueError(f"engine 'native' cannot run this merge: {reason}; use engine 'auto' "
                      f"or 'mergekit'")


def native_arguments(merge_config, data: dict, paths: dict[str, str]) -> dict:
    """stream_merge's arguments for a mergekit configuration that native_refusal accepts:
    parameters resolved as mergekit resolves them (a model's own, then the shared ones,
    then the method's default), and the output tensors from mergekit's architecture."""
    from mergekit import merge_methods
    from mergekit.architecture import get_architecture_info
    from mergekit.architecture.base import ConfiguredModelArchitecture
    from mergekit.options import MergeOptions

    from ops.merge import TensorSpec, Unsupported

    spec = merge_methods.get(data["merge_method"]).spec
    shared_settings = data.get("parameters") or {}
    params = {}
    for p in spec.shared_parameters:
        value = shared_settings.get(p.name, None if p.required else p.default)
        params[p.name] = p.validate(value)
    base = data.get("base_model")
    base_path = paths[base] if base else None
    models, weights, densities = [], [], []
    for entry in data.get("models") or []:
        path = paths[entry["model"]]
        if base_path and path == base_path:
            continue  # the base: no per-model parameters, as in mergekit
        own = entry.get("parameters") or {}
        resolved = {}
        for p in spec.input_parameters:
            value = own.get(p.name, shared_settings.get(p.name))
            if value is None:
                if p.required:
                    raise Unsupported(f"model {entry['model']} has no {p.name}")
                value = p.default
            resolved[p.name] = float(p.validate(value))
        models.append(path)
        weights.append(resolved["weight"])
        densities.append(resolved.get("density", 1.0))
    if len(set(models)) != len(models):
        raise Unsupported("a model is listed twice")
    options = MergeOptions()
    arch = get_architecture_info(merge_config, options)
    if getattr(arch, "post_fill_parameters", False):
        raise Unsupported("this architecture is post-filled by mergekit")
    donor = merge_config.base_model or merge_config.referenced_models()[0]
    weights_info = ConfiguredModelArchitecture(info=arch, config=donor.config()).all_weights()
    if any(w.force_dtype for w in weights_info):
        raise Unsupported("the architecture forces a dtype on some tensors")
    tensors = [TensorSpec(w.name, tuple(w.aliases or ()), tuple(w.tied_names or ()),
                          w.optional) for w in weights_info]
    return {"method": data["merge_method"], "models": models, "base": base_path,
            "weights": weights, "densities": densities, "params": params,
            "dtype": _dtype_name(data.get("dtype")),
            "out_dtype": _dtype_name(data.get("out_dtype")), "tensors": tensors,
            "donor": donor.model.path, "arch": arch}


def _dtype_name(name: Optional[str]) -> Optional[str]:
    from ops.merge import COMPUTE_DTYPES, Unsupported

    if not name:
        return None
    name = name[len("torch."):] if name.startswith("torch.") else name
    if name not in COMPUTE_DTYPES:
        raise Unsupported(f"dtype {name}")
    return name


def _header_shapes(folder) -> dict[str, list[int]]:
    from ops.checkpoint_files import tensor_headers, weight_files

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

    from ops.checkpoint_files import weight_files

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

    data = parse_mergekit_yaml(config.mergekit_yaml) if config.mergekit_yaml else \
        build_mergekit_config(config)
    refs = model_refs(data)
    inputs = []  # (checkpoint, role, parameters): the merge's inputs, for the lineage
    for ref, where, params in refs:
        if where == "base" or where.endswith("].model"):
            inputs.append((ref, "base" if where == "base" else "model", params))
    if not inputs:
        raise ValueError("the mergekit configuration names no models")
    opened = {}
    for ref, _, _ in refs:  # every reference, through the lab's checks
        if ref not in opened:
            opened[ref] = ctx.open(ref)
    ctx.progress(0.1, "inputs opened")
    check_compatible({r: opened[r] for r, _, _ in inputs}, data)
    resolved = _rewrite(data, {r: str(ck.path) for r, ck in opened.items()})
    try:
        merge_config = MergeConfiguration.model_validate(resolved)
    except (ValidationError, RuntimeError, ValueError) as e:
        raise ValueError(f"mergekit rejects this configuration: {e}") from None
    unchecked = mergekit_reads(merge_config) - {str(ck.path) for ck in opened.values()}
    if unchecked:  # mergekit would read something no check above saw: read nothing
        raise ValueError(f"mergekit_yaml: mergekit would read {', '.join(sorted(unchecked))}, "
                         f"which is not one of the checkpoints this job opened and checked")

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
                ancestors = set(ctx.ancestors(opened[ref].id))
                if base_id not in ancestors:
                    warnings.append(f"base model {base} is not an ancestor of {ref} in the "
                                    f"registry")
    for w in warnings:
        ctx.log(f"warning: {w}")

    engine, why, native = choose_engine(config.engine, merge_config, resolved)
    original = config.mergekit_yaml or yaml.safe_dump(data, sort_keys=False)
    out = ctx.new_checkpoint(
        "merge", parents=list(edges.values()),
        name=config.name or f"merge-{data.get('merge_method', 'merge')}",
        metadata={"mergekit_yaml": original, "merge_method": data.get("merge_method"),
                  "warnings": warnings, "engine": engine})
    ctx.log(f"merging {len(edges)} checkpoints with {data.get('merge_method')}")
    ctx.log(f"engine: {engine} ({why})")
    resolved_yaml = yaml.safe_dump(resolved, sort_keys=False)
    options = MergeOptions(copy_tokenizer=True, random_seed=config.seed, quiet=True,
                           cuda=ctx.device == "cuda", write_model_card=False)
    if engine == "native":
        if not merge_natively(native, merge_config, options, out.path, config, ctx):
            engine = out.metadata["engine"] = "mergekit"
    if engine == "mergekit":
        run_merge(merge_config, str(out.path), options, config_source=resolved_yaml)
    # mergekit writes mergekit_config.yml only along with its model card (the Hub-sync
    # plugin writes ours), so write it here, as mergekit would.
    (out.path / "mergekit_config.yml").write_text(resolved_yaml)
    if engine == "mergekit":  # the native engine checks every chunk as it writes it
        ctx.progress(0.9, "checking the result")
        check_finite(out.path)
    if config.lines:
        out.metadata["lines"] = apply_lines(config, resolved, out.path, ctx)
    ctx.progress(1.0, "merged")


def apply_lines(config: Config, resolved: dict, folder, ctx) -> dict:
    """LiNeS on the merge just written (ops.task_vectors.lines_rescale_merge): the rescaled
    shards go to a hidden folder, then replace the merged ones; returns alpha, beta, L, T
    and (multi-task alpha) the norms, for the checkpoint's metadata."""
    import os
    import shutil
    from pathlib import Path

    from ops.checkpoint_files import weight_files
    from ops.task_vectors import lines_rescale_merge

    folder = Path(folder)
    base = resolved["base_model"]
    models = [e["model"] for e in resolved["models"] if e["model"] != base]
    merged = weight_files(folder)
    for path in [*merged, *weight_files(Path(base)), *(f for m in models
                                                         for f in weight_files(Path(m)))]:
        if path.suffix != ".safetensors":
            raise ValueError(f"lines reads safetensors, and {path} is not: convert the "
                             f"models, or merge without lines")
    staging = folder / ".lines"
    staging.mkdir()
    ctx.progress(0.92, "LiNeS")
    info = lines_rescale_merge(weight_files(Path(base)), [weight_files(Path(m)) for m in models],
                               merged, staging, alpha=config.lines_alpha,
                               beta=config.lines_beta)
    for file in merged:
        os.replace(staging / file.name, file)
    shutil.rmtree(staging)
    ctx.log(f"LiNeS: merged task vector scaled by {info['alpha']:.6g} + {info['beta']:.6g} * "
            f"l / ({info['layers']} - 1) on decoder layer l, {info['alpha']:.6g} outside the "
            f"layers (alpha {info['alpha_from']}, T = {info['tasks']})")
    return info


def choose_engine(asked: str, merge_config, resolved: dict):
    """(engine, why, native arguments or None). Asking for native when it cannot run is an
    error naming the field; auto falls back to mergekit and says why."""
    if asked == "mergekit":
        return "mergekit", "engine: mergekit was asked for", None
    reason = native_refusal(resolved)
    native = None
    if reason is None:
        try:
            native = native_arguments(merge_config, resolved,
                                      {ref: ref for ref in _local_refs(resolved)})
        except Exception as e:  # Unsupported, or mergekit cannot plan it: mergekit says why
            reason = str(e) or type(e).__name__
    if reason is None:
        return "native", ("engine: native was asked for" if asked == "native" else
                          "auto: the native engine covers this configuration"), native
    if asked == "native":
        raise native_error(reason)
    return "mergekit", f"auto: falling back to mergekit, because {reason}", None


def _local_refs(resolved: dict) -> list[str]:
    refs = [e["model"] for e in resolved.get("models") or []]
    if resolved.get("base_model"):
        refs.append(resolved["base_model"])
    return refs


def merge_natively(native: dict, merge_config, options, out_path, config, ctx) -> bool:
    """Run the native engine into out_path, then copy the tokenizer and tag-along files as
    mergekit's run_merge does. False when the engine found, before writing anything, that
    it does not cover these inputs (and auto may fall back to mergekit)."""
    from mergekit.merge import _copy_tagalong_files, _copy_tokenizer

    from ops.merge import Unsupported, stream_merge

    arch = native.pop("arch")
    try:
        stats = stream_merge(
            **native, out_dir=out_path, seed=config.seed, device=ctx.device,
            max_shard_bytes=options.out_shard_size, log=ctx.log,
            progress=lambda fraction, name: ctx.progress(0.1 + 0.8 * fraction,
                                                         f"merged {name}"))
    except Unsupported as e:
        if config.engine == "native":
            raise native_error(str(e)) from None
        ctx.log(f"engine: mergekit (auto: falling back to mergekit, because {e})")
        return False
    except ValueError as e:
        if str(e).startswith("the merge produced NaN or Inf"):
            raise ValueError(f"{e}; nothing was registered") from None
        raise
    ctx.log(f"native engine: {stats.tensors} tensors, {stats.bytes_written / 2**20:.0f} MiB "
            f"in {len(stats.shards)} shard(s), {stats.seconds:.1f} s, {stats.threads} "
            f"thread(s)")
    # The same post-steps as run_merge (mergekit's own helpers, so the files are the same).
    try:
        _copy_tokenizer(merge_config, str(out_path), options=options)
    except Exception as e:  # mergekit logs and goes on, so do we
        ctx.log(f"warning: the tokenizer was not copied: {e}")
    _copy_tagalong_files(merge_config, str(out_path), files=arch.tagalong_files or [],
                         options=options)
    return True


PLUGIN = Plugin(
    name="merge",
    order=30,
    title="Merge",
    description="Merge checkpoints with any mergekit method (linear, slerp, task arithmetic, "
                "TIES, DARE, model stock, passthrough...), from the form or a pasted "
                "mergekit YAML.",
    Config=Config,
    run=run,
    referenced_paths=referenced_paths,
    foreign_config=foreign_config,
)
