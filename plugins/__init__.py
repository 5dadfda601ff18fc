"""The plugin contract: one `PLUGIN` record per operation, found through entry points.

A plugin package exposes `PLUGIN = Plugin(name=..., title=..., description=..., Config=...,
run=...)`. `Config` is a pydantic model (the only source of truth for the settings: the UI form,
the CLI and the YAML file are generated from it); `run(config, ctx)` does the work through the
job context. Built-in plugins load through the same entry-point group as third-party ones
(`weightsmith.plugins`). Importing a plugin module must stay cheap: torch and transformers are
imported inside `run`, never at module level, so discovery costs nothing at app start.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Optional, Annotated, Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class PluginConfig(BaseModel):
    """Base for plugin configs: unknown fields are errors, so a typo never silently does nothing."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


@dataclass(frozen=True)
class Plugin:
    name: str
    title: str
    description: str
    Config: type[BaseModel]
    run: Callable[[Any, Any], None]
    uses_gpu: bool = True  # placed on a GPU slot when the lab has one
    # preview(config, lab) -> markdown: a quick look at what a config would read (first rows,
    # token lengths), shown before Run. It may import torch: it runs in a subprocess.
    preview: Optional[Callable[[Any, Any], str]] = None


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


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(config)"
            if err["type"] == "extra_forbidden":
                problems.append(f"field '{loc}': unknown field; expected one of: "
                                f"{', '.join(fields)}")
            elif err["type"] == "missing":
                problems.append(f"field '{loc}': missing; it is required")
            else:
                expected = err["msg"][0].lower() + err["msg"][1:]
                problems.append(f"field '{loc}': got {_describe(err.get('input'))}; "
                                f"expected: {expected}")
        raise ConfigError(plugin.name, problems) from None


def _marker(prop: dict) -> str | None:
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
        marker = _marker(props.get(name, {}))
        if marker == "checkpoint" and value:
            yield prefix + name, value
        elif marker == "checkpoints" and value:
            for i, item in enumerate(value):
                yield f"{prefix}{name}[{i}]", item
        elif isinstance(value, BaseModel):
            yield from checkpoint_refs(value, prefix + name + ".")
