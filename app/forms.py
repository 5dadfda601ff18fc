"""Forms generated from a plugin's Config: which widget each field gets, and the conversion
between widget values and the config dict that `weightsmith run` accepts as YAML.

Pure data (no gradio import): the UI builds widgets from these specs, and tests check the
mapping without a browser. It reads the Config's JSON schema, the same schema the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel

from ops import safe_yaml

# widget kinds
CHECKBOX, SLIDER, NUMBER, DROPDOWN = "checkbox", "slider", "number", "dropdown"
CHECKPOINT, CHECKPOINTS, TEXT, FILE, YAML, GROUP = (
    "checkpoint", "checkpoints", "text", "file", "yaml", "group")


@dataclass
class FieldSpec:
    path: str  # dotted path in the config
    name: str
    kind: str
    label: str
    help: str = ""
    required: bool = False
    optional: bool = False  # None is allowed
    default: Any = None
    choices: list | None = None
    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False
    multiline: bool = False  # long text, e.g. a pasted YAML document
    children: list["FieldSpec"] = field(default_factory=list)


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        name = schema["$ref"].split("/")[-1]
        schema = {**root["$defs"][name], **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _unwrap_optional(prop: dict, root: dict) -> tuple[dict, bool]:
    options = prop.get("anyOf") or prop.get("oneOf")
    if options:
        rest = [o for o in options if o.get("type") != "null"]
        if len(rest) == 1 and len(rest) < len(options):
            merged = {**_resolve(rest[0], root),
                      **{k: v for k, v in prop.items() if k not in ("anyOf", "oneOf")}}
            return merged, True
    return prop, False


def _spec(name: str, prop: dict, root: dict, required: bool, prefix: str) -> FieldSpec:
    prop = _resolve(prop, root)
    prop, optional = _unwrap_optional(prop, root)
    marker = prop.get("x-weightsmith")
    spec = FieldSpec(path=prefix + name, name=name, kind=TEXT,
                     label=name.replace("_", " "), help=prop.get("description", ""),
                     required=required, optional=optional, default=prop.get("default"))
    kind = prop.get("type")
    if marker == "checkpoint":
        spec.kind = CHECKPOINT
    elif marker == "checkpoints" or (kind == "array" and
                                     _resolve(prop.get("items", {}), root).get("x-weightsmith")
                                     == "checkpoint"):
        spec.kind = CHECKPOINTS
    elif marker == "file":
        spec.kind = FILE
    elif "enum" in prop or "const" in prop:
        spec.kind = DROPDOWN
        spec.choices = list(prop.get("enum") or [prop["const"]])
    elif kind == "boolean":
        spec.kind = CHECKBOX
    elif kind in ("integer", "number"):
        spec.integer = kind == "integer"
        low = prop.get("minimum", prop.get("exclusiveMinimum"))
        high = prop.get("maximum", prop.get("exclusiveMaximum"))
        spec.minimum, spec.maximum = low, high
        # a slider only where both bounds exist and the range is one a hand can drag; an
        # optional number is never a slider (a slider cannot be empty: it would send a value)
        spec.kind = SLIDER if low is not None and high is not None and not optional and (
            not spec.integer or high - low <= 10_000) else NUMBER
    elif kind == "object" and "properties" in prop:
        spec.kind = GROUP
        needed = set(prop.get("required", []))
        spec.children = [_spec(n, p, root, n in needed, spec.path + ".")
                         for n, p in prop["properties"].items()]
    elif kind == "string":
        spec.kind = TEXT
        spec.multiline = marker == "multiline"
    else:
        spec.kind = YAML  # lists, dicts, unions: typed as YAML in a textbox
    return spec


def form_spec(config_cls: type[BaseModel]) -> list[FieldSpec]:
    schema = config_cls.model_json_schema()
    needed = set(schema.get("required", []))
    return [_spec(n, p, schema, n in needed, "") for n, p in schema["properties"].items()]


def leaves(specs: list[FieldSpec]) -> list[FieldSpec]:
    """The specs that get a widget, in form order (groups are containers)."""
    out = []
    for s in specs:
        out += leaves(s.children) if s.kind == GROUP else [s]
    return out


class FormError(ValueError):
    """A widget value that cannot even be read (bad YAML); names the field."""


def _from_widget(spec: FieldSpec, value: Any) -> tuple[bool, Any]:
    """(present, value). An empty widget leaves the field out, so its default applies, or
    validation reports it missing, naming it."""
    if value is None:
        return False, None
    if isinstance(value, str) and not value.strip():
        if spec.kind == TEXT and spec.required:
            return True, value  # let validation judge a required empty string
        return False, None
    if spec.kind == CHECKPOINTS and not value:
        return False, None
    if spec.kind == NUMBER and isinstance(value, str):  # optional numbers are text boxes
        try:
            number = float(value.strip())
        except ValueError:
            raise FormError(f"field '{spec.path}': got {value!r}; expected a number, or "
                            f"nothing for the default") from None
        value = number
    if spec.kind in (NUMBER, SLIDER) and spec.integer and isinstance(value, float) \
            and value.is_integer():
        return True, int(value)
    if spec.kind == YAML:
        try:
            return True, safe_yaml.load(value, what=f"field '{spec.path}'")
        except safe_yaml.YamlError as e:
            raise FormError(str(e)) from None
    if spec.kind in (CHECKPOINT, FILE):
        return True, str(value).strip()
    return True, value


def values_to_config(specs: list[FieldSpec], values: list) -> dict:
    """Widget values (in `leaves` order) to the config dict that is submitted."""
    flat = leaves(specs)
    if len(values) != len(flat):
        raise FormError(f"expected {len(flat)} values, got {len(values)}")
    config: dict = {}
    for spec, value in zip(flat, values):
        present, value = _from_widget(spec, value)
        if not present:
            continue
        target = config
        *parents, last = spec.path.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[last] = value
    return config


def config_to_values(specs: list[FieldSpec], data: dict) -> list:
    """A config dict (e.g. a loaded YAML file) to widget values, defaults where unset."""
    out = []
    for spec in leaves(specs):
        value: Any = data
        for part in spec.path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            value = spec.default
        if spec.kind == YAML:
            value = "" if value is None else yaml.safe_dump(value, default_flow_style=True).strip()
        elif spec.kind in (TEXT, CHECKPOINT, FILE) and value is None:
            value = ""
        elif spec.kind == NUMBER and spec.optional:
            value = "" if value is None else str(value)  # shown in a text box: empty = unset
        elif spec.kind == CHECKPOINTS and value is None:
            value = []
        elif spec.kind == CHECKBOX:
            value = bool(value)
        out.append(value)
    return out


def unknown_keys(specs: list[FieldSpec], data: dict, prefix: str = "") -> list[str]:
    """Keys of a loaded YAML file that the form has no field for (reported, not dropped)."""
    by_name = {s.name: s for s in specs}
    out = []
    for key, value in (data or {}).items():
        spec = by_name.get(key)
        if spec is None:
            out.append(prefix + key)
        elif spec.kind == GROUP and isinstance(value, dict):
            out += unknown_keys(spec.children, value, prefix + key + ".")
    return out


def to_yaml(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False) if config else "{}\n"
