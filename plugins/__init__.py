"""The plugin contract: one `PLUGIN` record per operation, found through entry points.

A plugin package exposes `PLUGIN = Plugin(name=..., title=..., description=..., Config=...,
run=...)`. `Config` is a pydantic model (the only source of truth for the settings: the UI form,
the CLI and the YAML file are generated from it); `run(config, ctx)` does the work through the
job context. Built-in plugins load through the same entry-point group as third-party ones
(`weightsmith.plugins`). Importing a plugin module must stay cheap: torch and transformers are
imported inside `run`, never at module level, so discovery costs nothing at app start.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Optional, Annotated, Any, Callable, Iterator, Mapping, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "weightsmith.plugins"
# Extra plugins as "module:OBJECT" specs, comma-separated: lets a plugin author (or a test)
# load a plugin without packaging it. Job subprocesses inherit it, so they see the same set.
EXTRA_PLUGINS_ENV = "WEIGHTSMITH_PLUGINS"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{1,39}$")

# Markers read by the CLI (reference resolution) and the UI (which widget to draw).
CheckpointRef = Annotated[str, Field(min_length=1, json_schema_extra={"x-weightsmith": "checkpoint"})]
CheckpointList = Annotated[list[CheckpointRef],
                           Field(min_length=1, json_schema_extra={"x-weightsmith": "checkpoints"})]
LocalFile = Annotated[str, Field(min_length=1, json_schema_extra={"x-weightsmith": "file"})]
LongText = Annotated[str, Field(json_schema_extra={"x-weightsmith": "multiline"})]
# A local file or folder (a text box, not an upload), checked against a shared lab's roots.
LocalPath = Annotated[str, Field(min_length=1, json_schema_extra={"x-weightsmith": "path"})]
# A local file or folder, or a Hub dataset id (ORG/NAME).
DataRef = Annotated[str, Field(min_length=1, json_schema_extra={"x-weightsmith": "data"})]
# A local folder whose files a job may turn into code (lm-eval task YAMLs with !function).
# In a shared lab it must lie in a folder the admin lists in lab.toml's code_roots.
CodePath = Annotated[str, Field(min_length=1, json_schema_extra={"x-weightsmith": "code"})]

# Form hints, read only by the UI (app/forms.py) to lay out a Config's form; they never change
# what a config means. Put them in a field's json_schema_extra, several joined with
# form_hints(...): `Field(..., json_schema_extra=form_hints(for_methods("ties"), ADVANCED))`.
# The field whose value picks the method (its `method` or `action`): the form shows a field
# marked for_methods(...) only while that method is chosen, and does not submit it otherwise.
METHOD_SELECTOR = {"x-weightsmith-selector": True}
# Under the form's "Advanced" accordion (basic fields come first).
ADVANCED = {"x-weightsmith-advanced": True}
# Shown (and submitted) only on a lab with GPUs / only on a lab without: GPU counts and fsdp,
# or CPU data-parallel processes.
GPU_LABS_ONLY = {"x-weightsmith-lab": "gpu"}
CPU_LABS_ONLY = {"x-weightsmith-lab": "cpu"}
# A number whose useful values span orders of magnitude (a learning rate): a number box,
# never a slider.
LOG_SCALE = {"x-weightsmith-scale": "log"}


def for_methods(*methods: str) -> dict:
    """The form hint: this field is read only by these values of the METHOD_SELECTOR field."""
    return {"x-weightsmith-methods": list(methods)}


def form_hints(*hints: Mapping[str, Any]) -> dict:
    """Several form hints (and markers) as one json_schema_extra dict (a new one)."""
    out: dict = {}
    for hint in hints:
        out.update(hint)
    return out


# ------------------------------------------------------------------ limits on every value
# Every config value is hostile until checked: these hold for every field of every plugin, on
# top of the field's own type and bounds, so that a value that cannot mean anything is refused
# at submit, naming the field, instead of failing (or hanging) the job at run time.
MAX_TEXT = 4096              # characters in an ordinary string (a name, an id, a path)
MAX_LONG_TEXT = 1_000_000    # characters in a LongText field (x-weightsmith: multiline)
MAX_PATH_PART = 255          # bytes in one part of a path (NAME_MAX on Linux and macOS)
MAX_INT = 2 ** 53            # the largest integer a JSON reader (the browser) keeps exactly
MAX_DEPTH = 32               # nesting of lists and mappings inside one value
MAX_ITEMS = 200_000          # values (list items, mapping entries) in one config
LIMIT_ERROR = "weightsmith_limit"  # the pydantic error type of the checks below
# C0 controls but tab, newline and carriage return; and lone surrogates, which no file,
# database or terminal can store
_BAD_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
_PATH_MARKERS = {"checkpoint", "checkpoints", "file", "path", "data", "code"}


@dataclass(frozen=True)
class _FieldRule:
    max_text: int                        # longest string anywhere in the value
    path: bool                           # strings are paths (parts of at most MAX_PATH_PART)
    model: Optional[type[BaseModel]]     # a mapping value is this nested model


def _annotation_facts(annotation: Any) -> tuple[set[str], list[type[BaseModel]]]:
    """The x-weightsmith markers and the pydantic models anywhere inside a type annotation
    (through Optional, Union, list, dict and Annotated)."""
    markers: set[str] = set()
    models: list[type[BaseModel]] = []
    stack, seen = [annotation], 0
    while stack and seen < 200:
        ann = stack.pop()
        seen += 1
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            models.append(ann)
            continue
        if get_origin(ann) is Annotated:
            for meta in getattr(ann, "__metadata__", ()):
                extra = getattr(meta, "json_schema_extra", None)
                if isinstance(extra, dict) and isinstance(extra.get("x-weightsmith"), str):
                    markers.add(extra["x-weightsmith"])
            stack.append(ann.__origin__)
            continue
        stack.extend(a for a in get_args(ann) if not isinstance(a, (str, int, float, bool)))
    return markers, models


@functools.lru_cache(maxsize=None)
def _field_rules(model: type[BaseModel]) -> dict[str, _FieldRule]:
    rules = {}
    for name, info in model.model_fields.items():
        markers, models = _annotation_facts(info.annotation)
        extra = info.json_schema_extra
        if isinstance(extra, dict) and isinstance(extra.get("x-weightsmith"), str):
            markers.add(extra["x-weightsmith"])
        rule = _FieldRule(max_text=MAX_LONG_TEXT if "multiline" in markers else MAX_TEXT,
                          path=bool(markers & _PATH_MARKERS),
                          model=models[0] if len(models) == 1 else None)
        rules[name] = rule
        if info.alias:
            rules[info.alias] = rule
    return rules


def _show_int(value: int) -> str:
    if abs(value) < 10 ** 30:
        return str(value)
    return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"


def _limit_error(path: str, got: str, expected: str) -> PydanticCustomError:
    message = f"field '{path or '(config)'}': got {got}; expected: {expected}"
    return PydanticCustomError(LIMIT_ERROR, "{message}", {"message": message})


def _check_text(text: str, path: str, rule: _FieldRule) -> None:
    if len(text) > rule.max_text:
        raise _limit_error(path, f"{_describe(text)} ({len(text)} characters)",
                           f"at most {rule.max_text} characters")
    bad = _BAD_CHAR.search(text)
    if bad:
        raise _limit_error(path, _describe(text),
                           f"text without control characters (found {bad.group()!r} at "
                           f"character {bad.start() + 1})")
    if rule.path:
        for part in re.split(r"[/\\]", text):
            if len(part.encode("utf-8", "replace")) > MAX_PATH_PART:
                raise _limit_error(path, f"{_describe(text)} ({len(text)} characters)",
                                   f"a path whose every part (between slashes) is at most "
                                   f"{MAX_PATH_PART} bytes")


def _check_values(value: Any, model: type[BaseModel]) -> None:
    """Walk a config (the raw input, or the validated model) and raise a
    LIMIT_ERROR naming the first value that breaks a limit above."""
    rules_of = _field_rules
    top = _FieldRule(MAX_TEXT, False, model)
    stack: list[tuple[Any, str, _FieldRule, int]] = [(value, "", top, 0)]
    items = 0
    while stack:
        value, path, rule, depth = stack.pop()
        items += 1
        if items > MAX_ITEMS:
            raise _limit_error(path.split(".")[0], f"more than {MAX_ITEMS} values",
                               "a smaller config")
        if depth > MAX_DEPTH:
            raise _limit_error(path, f"a value nested more than {MAX_DEPTH} levels deep",
                               "a flatter value")
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, str):
            _check_text(value, path, rule)
        elif isinstance(value, (bytes, bytearray)):
            _check_text(bytes(value).decode("utf-8", "replace"), path, rule)
        elif isinstance(value, int):
            if abs(value) > MAX_INT:
                raise _limit_error(path, _show_int(value), "an integer of at most 2**53 "
                                                           "(9007199254740992) either side of 0")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise _limit_error(path, repr(value), "a finite number")
        elif isinstance(value, BaseModel) or (isinstance(value, dict) and rule.model is not None):
            cls = type(value) if isinstance(value, BaseModel) else rule.model
            rules = rules_of(cls)
            forbid = cls.model_config.get("extra") == "forbid"
            entries = ((n, getattr(value, n, None)) for n in type(value).model_fields) \
                if isinstance(value, BaseModel) else value.items()
            for key, item in entries:
                if not isinstance(key, str):
                    continue  # pydantic refuses a key that is not a string
                if key not in rules and forbid:
                    continue  # pydantic refuses it as an unknown field, by name
                sub = rules.get(key, _FieldRule(MAX_TEXT, False, None))
                stack.append((item, f"{path}.{key}" if path else key, sub, depth + 1))
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{_loc_part(key)}" if path else _loc_part(key)
                if isinstance(key, str):
                    _check_text(key, where, _FieldRule(MAX_TEXT, False, None))
                stack.append((item, where, rule, depth + 1))
        elif isinstance(value, (list, tuple, set, frozenset)):
            for i, item in enumerate(value):
                stack.append((item, f"{path}.{i}", rule, depth + 1))


class PluginConfig(BaseModel):
    """Base for plugin configs: unknown fields are errors, so a typo never silently does nothing.

    Every value of every field, nested ones and list items included, must also keep the limits
    above (no control characters, bounded text, finite floats, integers of at most 2**53):
    checked on the raw input before the fields' own validators run, and on the validated
    values (a "1e30" that became an int) before the plugin's model validators run."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _weightsmith_limits_raw(cls, data: Any) -> Any:
        if isinstance(data, dict):
            _check_values(data, cls)
        return data

    @model_validator(mode="after")
    def _weightsmith_limits_validated(self):
        _check_values(self, type(self))
        return self


# ----------------------------------------------------------------------------- the hooks
# What the app learns from a plugin beyond its Config and run. Every hook is optional and is a
# plain function of the validated config (plus plain facts about the lab): the Config stays
# pure data, and a plugin never reaches into the app or the registry to answer.
@dataclass(frozen=True)
class LabFacts:
    """What a submit-time check may know about the lab (passed to `Plugin.lab_problems`)."""

    gpus: tuple[int, ...] = ()   # GPU indices jobs may use; empty: a CPU-only lab
    shared: bool = False         # a lab with users (members' inputs are restricted)
    suites_dir: Optional[Path] = None  # the lab's own evaluation suites (LAB/suites)


@dataclass(frozen=True)
class Resources:
    """What one job of a config needs (returned by `Plugin.resources`)."""

    gpus: int = 1                # GPUs the scheduler gives the job at once (on a GPU lab)
    # (field, why) when the config cannot run without `gpus` CUDA GPUs (e.g. qlora)
    requires_gpu: Optional[tuple[str, str]] = None
    # True: the job runs as one process per GPU (or cpu_processes on CPU), each running
    # `run`; False: one process that uses all its GPUs itself (e.g. a model spread over them)
    data_parallel: bool = False
    cpu_processes: int = 1       # data-parallel processes on a CPU-only placement
    distributed: str = "ddp"     # how several processes share the model: "ddp" or "fsdp"
    # machines the job spans, each running processes(device) of it (data_parallel only). Its
    # config field is `nodes`: the submit-time refusals (app/jobs.py) name that field.
    nodes: int = 1

    def processes(self, device: str) -> int:
        """Processes the worker launches on the device the scheduler chose (cuda:0,1 or
        cpu), on each of its `nodes`."""
        if not self.data_parallel:
            return 1
        if device.startswith("cuda"):
            if self.cpu_processes > 1:
                raise ValueError(f"cpu_processes: got {self.cpu_processes}, but this job runs "
                                 f"on {device}; use gpus for more processes on GPUs")
            return self.gpus
        return self.cpu_processes


@dataclass(frozen=True)
class NextStep:
    """What a checkpoint of some relation usually needs next: the UI preselects `plugin` in
    "Use as input of" and shows `hint`."""

    plugin: str
    hint: str


@dataclass(frozen=True)
class Plugin:
    """One operation. `name`, `title`, `description`, `Config` and `run` are required; the
    rest are optional hooks, each documented where it is declared. A plugin author reads
    this record (and `plugins.kit`) to learn the whole contract."""

    name: str
    title: str
    description: str
    Config: type[BaseModel]
    # run(config, ctx): does the work; ctx is a plugins.kit.context.JobContext
    run: Callable[[Any, Any], None]
    uses_gpu: bool = True  # placed on a GPU slot when the lab has one
    # preview(config, view) -> markdown: a quick look at what a config would read (first
    # rows, token lengths), shown before Run; view is a plugins.kit.context.PreviewContext.
    # It may import torch: it runs in a subprocess.
    preview: Optional[Callable[[Any, Any], str]] = None
    # resources(config) -> Resources: GPUs and processes one job needs. Default: Resources().
    resources: Optional[Callable[[Any], Resources]] = None
    # referenced_paths(config) -> [(field, reference)]: checkpoints or folders a config names
    # outside its marked fields (e.g. models inside a mergekit YAML); checked like them.
    referenced_paths: Optional[Callable[[Any], list[tuple[str, str]]]] = None
    # lab_problems(config, LabFacts) -> ["field 'x': ..."]: submit-time checks that need to
    # know the lab (e.g. cpu_processes on a lab with GPUs). Runs after the field checks pass.
    lab_problems: Optional[Callable[[Any, LabFacts], list[str]]] = None
    # Config field naming a cancelled or failed job to continue; the UI's Resume fills it.
    resume_field: Optional[str] = None
    # metadata keys holding one number per decoder layer, drawn per layer in the Registry
    per_layer_series: tuple[str, ...] = ()
    # relation -> what a checkpoint this plugin records under that relation usually needs next
    next_steps: Mapping[str, NextStep] = field(default_factory=dict)
    # where the plugin's tab stands among the operations in the workbench (lower: further
    # left; ties by title), so tabs follow the work: train, merge, prune, scale, evaluate
    order: int = 100
    # foreign_config(data) -> config dict or None: a configuration file in the format of the
    # tool this plugin replaces (e.g. a plain mergekit YAML for merge), as this plugin's
    # config; None when `data` is not one. `weightsmith run` and the form's Load YAML use it.
    foreign_config: Optional[Callable[[dict], Optional[dict]]] = None
    # pareto(config) -> (x metric, y metric): two metrics the job logs once per candidate
    # (same step = same candidate), both higher-is-better or as plugins/kit/metrics.py says;
    # the Jobs view plots them one against the other, live, with the Pareto front marked.
    pareto: Optional[Callable[[Any], tuple[str, str]]] = None

    def needs(self, config: Any) -> Resources:
        """The config's Resources (the default when the plugin declares none)."""
        return self.resources(config) if self.resources else Resources()

    def paths_referenced(self, config: Any) -> list[tuple[str, str]]:
        return list(self.referenced_paths(config)) if self.referenced_paths else []

    def problems_in_lab(self, config: Any, facts: LabFacts) -> list[str]:
        return list(self.lab_problems(config, facts)) if self.lab_problems else []


class PluginError(Exception):
    """A plugin record is malformed, or a plugin name is unknown."""


_plugins: dict[str, Plugin] = {}
_load_errors: list[str] = []
_discovered = False


def register(plugin: Any) -> Plugin:
    """Add a plugin to the registry after checking its record; returns it."""
    if not isinstance(plugin, Plugin):
        raise PluginError(f"expected a weightsmith Plugin record, got {type(plugin).__name__}")
    if not isinstance(plugin.name, str) or not NAME_PATTERN.match(plugin.name):
        raise PluginError(f"plugin name {plugin.name!r} is invalid: use 2-40 lowercase letters, "
                          f"digits or '_', starting with a letter")
    if plugin.name in _plugins:
        raise PluginError(f"plugin name {plugin.name!r} is already registered")
    for attr in ("title", "description"):
        if not isinstance(getattr(plugin, attr), str) or not getattr(plugin, attr).strip():
            raise PluginError(f"plugin {plugin.name!r}: {attr} must be a non-empty string")
    if not (isinstance(plugin.Config, type) and issubclass(plugin.Config, BaseModel)):
        raise PluginError(f"plugin {plugin.name!r}: Config must be a pydantic model class")
    if plugin.Config.model_config.get("extra") != "forbid":
        raise PluginError(f"plugin {plugin.name!r}: Config must forbid unknown fields "
                          f"(subclass plugins.PluginConfig)")
    undocumented = [n for n, f in _all_fields(plugin.Config) if not (f.description or "").strip()]
    if undocumented:
        raise PluginError(f"plugin {plugin.name!r}: Config fields without a description "
                          f"(it becomes the UI help text): {', '.join(undocumented)}")
    if not callable(plugin.run):
        raise PluginError(f"plugin {plugin.name!r}: run must be callable as run(config, ctx)")
    for hook in ("preview", "resources", "referenced_paths", "lab_problems", "foreign_config"):
        if getattr(plugin, hook) is not None and not callable(getattr(plugin, hook)):
            raise PluginError(f"plugin {plugin.name!r}: {hook} must be callable or None")
    if plugin.resume_field is not None and plugin.resume_field not in plugin.Config.model_fields:
        raise PluginError(f"plugin {plugin.name!r}: resume_field {plugin.resume_field!r} is not "
                          f"a field of its Config")
    if not all(isinstance(k, str) for k in plugin.per_layer_series):
        raise PluginError(f"plugin {plugin.name!r}: per_layer_series must be metadata key "
                          f"names (strings)")
    if not all(isinstance(r, str) and isinstance(n, NextStep)
               for r, n in dict(plugin.next_steps).items()):
        raise PluginError(f"plugin {plugin.name!r}: next_steps maps a relation name to a "
                          f"NextStep(plugin, hint)")
    if type(plugin.order) is not int:
        raise PluginError(f"plugin {plugin.name!r}: order must be an integer")
    _plugins[plugin.name] = plugin
    return plugin


def unregister(name: str) -> None:
    _plugins.pop(name, None)


def _all_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, info in model.model_fields.items():
        yield prefix + name, info
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _all_fields(ann, prefix + name + ".")


def _load_spec(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module.strip())
    for part in (attr or "PLUGIN").strip().split("."):
        obj = getattr(obj, part)
    return obj


def discover(refresh: bool = False) -> dict[str, Plugin]:
    """Load every plugin from the entry-point group (and WEIGHTSMITH_PLUGINS); cached.

    A broken third-party plugin does not take the app down: its error is kept in
    `load_errors()` and shown by `weightsmith plugins`.
    """
    global _discovered
    if _discovered and not refresh:
        return dict(_plugins)
    if refresh:
        _plugins.clear()
        _load_errors.clear()
    sources = [(ep.name, ep.value, ep.load) for ep in entry_points(group=ENTRY_POINT_GROUP)]
    for spec in filter(None, (s.strip() for s in os.environ.get(EXTRA_PLUGINS_ENV, "").split(","))):
        sources.append((spec, spec, lambda spec=spec: _load_spec(spec)))
    for label, value, load in sources:
        try:
            plugin = load()
            if getattr(plugin, "name", None) in _plugins and _plugins[plugin.name] is plugin:
                continue
            register(plugin)
        except Exception as e:  # keep going: report which plugin failed and why
            msg = f"plugin {label} ({value}) failed to load: {e}"
            _load_errors.append(msg)
            log.warning(msg)
    _discovered = True
    return dict(_plugins)


def load_errors() -> list[str]:
    return list(_load_errors)


def get(name: str) -> Plugin:
    plugins = discover()
    if name not in plugins:
        known = ", ".join(sorted(plugins)) or "none"
        raise PluginError(f"unknown plugin {name!r}; available: {known}")
    return plugins[name]


# ------------------------------------------------------------------------------- configs
class ConfigError(ValueError):
    """A config that does not fit the plugin's schema; `problems` names each bad field."""

    def __init__(self, plugin: str, problems: list[str]):
        self.plugin = plugin
        self.problems = problems
        super().__init__(f"invalid {plugin} config:\n" + "\n".join(f"  - {p}" for p in problems))


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlevel = 80, 80, 40, 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def _describe(value: Any) -> str:
    """A short, printable repr of a (possibly hostile) value: at most 80 characters."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _show_int(value)
    try:  # reprlib: a huge list or mapping is cut short before it is printed, not after
        text = _REPR.repr(value)
    except Exception:  # e.g. an int too long to print: never let the message itself fail
        text = f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _loc_part(part: Any) -> str:
    """One step of a field path, printable and short (a hostile key is neither)."""
    text = str(part)
    if _BAD_CHAR.search(text) or not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= 60 else text[:57] + "..."


def _short(text: str, limit: int = 300) -> str:
    text = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text[:limit + 1])
    return text if len(text) <= limit else text[:limit - 3] + "..."


def validate_config(plugin: Plugin, data: Any) -> BaseModel:
    """Parse a config dict; raises ConfigError naming each field, its value and what was expected."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(plugin.name, [f"the config must be a mapping of field: value, "
                                        f"got {type(data).__name__}"])
    try:
        return plugin.Config.model_validate(data)
    except ValidationError as e:
        problems = []
        fields = sorted(plugin.Config.model_fields)
        for err in e.errors()[:20]:
            loc = ".".join(_loc_part(p) for p in err["loc"])
            if err["type"] == LIMIT_ERROR:  # its message names the field path inside the model
                message = _short(err["ctx"]["message"], 400)
                problems.append(message.replace("field '", f"field '{loc}.", 1) if loc else
                                message)
            elif err["type"] == "extra_forbidden":
                problems.append(f"field '{loc}': unknown field; expected one of: "
                                f"{', '.join(fields)}")
            elif err["type"] == "missing":
                problems.append(f"field '{loc}': missing; it is required")
            elif err["type"] == "invalid_key":
                problems.append(f"field {_describe(err.get('input'))}: expected a field name "
                                f"(a string)")
            elif not loc:  # a model validator: the input is the whole config, never shown
                problems.append(f"config: {_short(err['msg'][0].lower() + err['msg'][1:], 600)}")
            else:
                expected = _short(err["msg"][0].lower() + err["msg"][1:], 600)
                problems.append(f"field '{loc}': got {_describe(err.get('input'))}; "
                                f"expected: {expected}")
        raise ConfigError(plugin.name, problems) from None


def field_marker(prop: dict) -> str | None:
    """The x-weightsmith marker of a schema property, looking inside Optional[...] too."""
    if "x-weightsmith" in prop:
        return prop["x-weightsmith"]
    for option in prop.get("anyOf", []):
        if "x-weightsmith" in option:
            return option["x-weightsmith"]
    return None


def checkpoint_refs(config: BaseModel, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(field path, reference) for every checkpoint-reference field set in a config.

    Read from the JSON schema: an Annotated marker inside Optional[...] only shows there."""
    props = type(config).model_json_schema().get("properties", {})
    for name in type(config).model_fields:
        value = getattr(config, name)
        marker = field_marker(props.get(name, {}))
        if marker == "checkpoint" and value:
            yield prefix + name, value
        elif marker == "checkpoints" and value:
            for i, item in enumerate(value):
                yield f"{prefix}{name}[{i}]", item
        elif isinstance(value, BaseModel):
            yield from checkpoint_refs(value, prefix + name + ".")
