"""Forms generated from a plugin's Config: which widget each field gets, and the conversion
between widget values and the config dict that `weightsmith run` accepts as YAML.

Pure data (no gradio import): the UI builds widgets from these specs, and tests check the
mapping without a browser. It reads the Config's JSON schema, the same schema the CLI prints,
and the form hints a Config puts on its fields (plugins: METHOD_SELECTOR, for_methods,
ADVANCED, GPU_LABS_ONLY / CPU_LABS_ONLY, LOG_SCALE): which fields each method reads, which
go under "Advanced", which only a lab with (or without) GPUs shows, and which numbers are
boxes rather than sliders. A field the form hides is never submitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import math
import re

import yaml
from pydantic import BaseModel

from ops import safe_yaml

# widget kinds
CHECKBOX, SLIDER, NUMBER, DROPDOWN = "checkbox", "slider", "number", "dropdown"
CHECKPOINT, CHECKPOINTS, TEXT, FILE, DATA, YAML, GROUP = (
    "checkpoint", "checkpoints", "text", "file", "data", "yaml", "group")
PATH_KINDS = (CHECKPOINT, FILE, DATA)  # a reference typed or uploaded: stripped of spaces
UPLOADABLE = (FILE, DATA)  # a path box with an Upload button (the file is kept in the lab)
# the x-weightsmith-lab hint: "gpu" fields only on a lab with GPUs, "cpu" only on one without
GPU_LAB, CPU_LAB = "gpu", "cpu"
SLIDER_STEPS = 100  # a float slider moves in hundredths of its range


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
    # the Config refuses the bound itself (gt / lt): e.g. sparsity < 1
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    # a slider's reachable range and step: inside the Config's bounds, never on an excluded one
    slider_min: float | None = None
    slider_max: float | None = None
    step: float | None = None  # a slider's step, or a number box's arrow step
    selector: bool = False  # its value picks the method (the Config's METHOD_SELECTOR)
    methods: list[str] | None = None  # shown and submitted only for these methods; None: all
    advanced: bool = False  # under the form's "Advanced" accordion
    lab: str | None = None  # GPU_LAB / CPU_LAB: shown and submitted only on such a lab


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


def _grid_has(low: float, step: float, value: Any) -> bool:
    """Whether a slider from `low` in steps of `step` lands on `value` (its default)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return value is None
    n = (value - low) / step
    return abs(n - round(n)) < 1e-6


def _number(spec: FieldSpec, prop: dict, optional: bool) -> str:
    """SLIDER or NUMBER for a number field, and its bounds: a slider only where both bounds
    exist, the range is one a hand can drag, and the default lies on the slider's steps (a
    learning rate of 2e-4 on a 0-1 slider of hundredths cannot even be shown); never for an
    optional number (a slider cannot be empty: it would send a value) or a LOG_SCALE one. An
    excluded bound (gt / lt) is one step inside the slider's ends, so no position is a value
    the Config refuses."""
    spec.integer = prop.get("type") == "integer"
    low, high = prop.get("minimum"), prop.get("maximum")
    if low is None and prop.get("exclusiveMinimum") is not None:
        low, spec.exclusive_minimum = prop["exclusiveMinimum"], True
    if high is None and prop.get("exclusiveMaximum") is not None:
        high, spec.exclusive_maximum = prop["exclusiveMaximum"], True
    spec.minimum, spec.maximum = low, high
    default = spec.default
    if not spec.integer and isinstance(default, (int, float)) and default:
        spec.step = 10.0 ** math.floor(math.log10(abs(default)))  # a number box's arrows
    if low is None or high is None or optional or \
            prop.get("x-weightsmith-scale") == "log":
        return NUMBER
    step = 1 if spec.integer else (high - low) / SLIDER_STEPS
    lo = low + step if spec.exclusive_minimum else low
    hi = high - step if spec.exclusive_maximum else high
    if hi < lo or (spec.integer and hi - lo > 10_000) or not _grid_has(lo, step, default):
        return NUMBER
    spec.slider_min, spec.slider_max, spec.step = lo, hi, step
    return SLIDER


def _spec(name: str, prop: dict, root: dict, required: bool, prefix: str) -> FieldSpec:
    prop = _resolve(prop, root)
    prop, optional = _unwrap_optional(prop, root)
    marker = prop.get("x-weightsmith")
    methods = prop.get("x-weightsmith-methods")
    spec = FieldSpec(path=prefix + name, name=name, kind=TEXT,
                     label=name.replace("_", " "), help=prop.get("description", ""),
                     required=required, optional=optional, default=prop.get("default"),
                     selector=bool(prop.get("x-weightsmith-selector")),
                     methods=list(methods) if methods is not None else None,
                     advanced=bool(prop.get("x-weightsmith-advanced")),
                     lab=prop.get("x-weightsmith-lab"))
    kind = prop.get("type")
    if marker == "checkpoint":
        spec.kind = CHECKPOINT
    elif marker == "checkpoints" or (kind == "array" and
                                     _resolve(prop.get("items", {}), root).get("x-weightsmith")
                                     == "checkpoint"):
        spec.kind = CHECKPOINTS
    elif marker == "file":
        spec.kind = FILE
    elif marker == "data":
        spec.kind = DATA
    elif "enum" in prop or "const" in prop:
        spec.kind = DROPDOWN
        spec.choices = list(prop.get("enum") or [prop["const"]])
    elif kind == "boolean":
        spec.kind = CHECKBOX
    elif kind in ("integer", "number"):
        spec.kind = _number(spec, prop, optional)
    elif kind == "object" and "properties" in prop:
        spec.kind = GROUP
        needed = set(prop.get("required", []))
        spec.children = [_spec(n, p, root, n in needed, spec.path + ".")
                         for n, p in prop["properties"].items()]
        for child in spec.children:  # a group's hints hold for what is inside it
            child.advanced = child.advanced or spec.advanced
            child.lab = child.lab or spec.lab
            if child.methods is None:
                child.methods = spec.methods
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
    """The specs that get a widget, in the order of their values (groups are containers).
    The form may lay them out in another order (basic fields first); its inputs, the HTTP
    API and the functions below keep this one."""
    out = []
    for s in specs:
        out += leaves(s.children) if s.kind == GROUP else [s]
    return out


def selector(specs: list[FieldSpec]) -> FieldSpec | None:
    """The field whose value picks the method (the Config's METHOD_SELECTOR), if any."""
    return next((s for s in leaves(specs) if s.selector and s.kind == DROPDOWN), None)


def on_lab(spec: FieldSpec, gpu_lab: bool | None) -> bool:
    """Whether a lab with GPUs (True), without (False) or unknown (None) shows the field."""
    return gpu_lab is None or spec.lab is None or spec.lab == (GPU_LAB if gpu_lab else CPU_LAB)


def for_method(spec: FieldSpec, method: Any, choices: list | None) -> bool:
    """Whether the field is read by `method`. A value that is no method of the selector (an
    API caller's typo) hides nothing: validation names it."""
    return spec.methods is None or method not in (choices or []) or method in spec.methods


def hidden_paths(specs: list[FieldSpec], values: list, gpu_lab: bool | None = None) -> set[str]:
    """The fields the form hides for these values (in `leaves` order), so does not submit:
    those the chosen method does not read, and GPU-only (or CPU-only) fields on a lab without
    (with) GPUs; gpu_lab None: the lab is not known, no field is hidden for it."""
    flat = leaves(specs)
    chooser = selector(specs)
    method = values[flat.index(chooser)] if chooser is not None and len(values) == len(flat) \
        else None
    return {s.path for s in flat
            if not on_lab(s, gpu_lab) or
            (chooser is not None and not for_method(s, method, chooser.choices))}


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
    if spec.kind in PATH_KINDS:
        return True, str(value).strip()
    return True, value


def values_to_config(specs: list[FieldSpec], values: list, hidden=()) -> dict:
    """Widget values (in `leaves` order) to the config dict that is submitted; the fields in
    `hidden` (paths, see hidden_paths) are left out, so their defaults apply."""
    flat = leaves(specs)
    if len(values) != len(flat):
        raise FormError(f"expected {len(flat)} values, got {len(values)}")
    config: dict = {}
    for spec, value in zip(flat, values):
        if spec.path in hidden:
            continue
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
        elif spec.kind in (TEXT, *PATH_KINDS) and value is None:
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


# ------------------------------------------------------------------ errors next to a field
def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _range_problem(spec: FieldSpec, value: Any) -> str | None:
    """'got 1.5; expected a number below 1' when a number breaks the field's bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    what = "a whole number" if spec.integer else "a number"
    low, high = spec.minimum, spec.maximum
    if low is not None and (value <= low if spec.exclusive_minimum else value < low):
        bound = f"above {_show(low)}" if spec.exclusive_minimum else f"of at least {_show(low)}"
    elif high is not None and (value >= high if spec.exclusive_maximum else value > high):
        bound = f"below {_show(high)}" if spec.exclusive_maximum else f"of at most {_show(high)}"
    elif spec.integer and isinstance(value, float) and not value.is_integer():
        bound = ""
    else:
        return None
    return f"got {_show(value)}; expected {what}{' ' + bound if bound else ''}"


def widget_problems(specs: list[FieldSpec], values: list, hidden=()) -> dict[str, str]:
    """{path: problem} for the widget values that cannot be a field's value: text that is no
    number, YAML that does not parse, a number outside the field's bounds. Each problem says
    what was got and what is expected ("got 1.5; expected a number below 1"); hidden fields
    are not looked at."""
    out = {}
    for spec, value in zip(leaves(specs), values):
        if spec.path in hidden:
            continue
        try:
            present, value = _from_widget(spec, value)
        except FormError as e:
            out[spec.path] = str(e).split(": ", 1)[-1]  # without "field 'x'"
            continue
        if present and spec.kind in (NUMBER, SLIDER):
            problem = _range_problem(spec, value)
            if problem:
                out[spec.path] = problem
    return out


# pydantic's wording of a bound, as the form words it
_PLAIN = [
    (re.compile(r"expected: input should be less than or equal to (\S+)$"),
     r"expected a number of at most \1"),
    (re.compile(r"expected: input should be greater than or equal to (\S+)$"),
     r"expected a number of at least \1"),
    (re.compile(r"expected: input should be less than (\S+)$"), r"expected a number below \1"),
    (re.compile(r"expected: input should be greater than (\S+)$"),
     r"expected a number above \1"),
    (re.compile(r"expected: input should be a valid integer.*$"), "expected a whole number"),
    (re.compile(r"expected: input should be a valid number.*$"), "expected a number"),
    (re.compile(r"^config: value error, "), "config: "),
]


def plain(problem: str) -> str:
    """A validation problem (plugins.ConfigError.problems) in the form's words: "field
    'sparsity': got 1.5; expected a number below 1" rather than pydantic's "input should be
    less than 1"; anything else as it is."""
    for pattern, words in _PLAIN:
        problem = pattern.sub(words, problem)
    return problem


_FIELD = re.compile(r"^field '([^']*)': (.*)$", re.S)


def problems_by_field(specs: list[FieldSpec], problems: list[str],
                      hidden=()) -> dict[str, str]:
    """{path: problem} for validation problems (ConfigError.problems): "field 'x.y': ..."
    goes to the field x.y (or the nearest field above it: a list item, a mapping key); a
    problem of the whole config (a model validator's) goes to every shown field it names
    ("method slerp needs t": t, else method). Problems of the same field are joined."""
    shown = [s for s in leaves(specs) if s.path not in hidden]
    paths = {s.path for s in shown}
    out: dict[str, list[str]] = {}
    for problem in map(plain, problems):
        match = _FIELD.match(problem)
        if match:
            path, text = re.sub(r"\[\d+\]", "", match[1]), match[2]  # models[0]: models
            while path and path not in paths:
                path = path.rpartition(".")[0]
            if path:
                out.setdefault(path, []).append(text)
            continue
        text = problem.split(": ", 1)[1] if problem.startswith("config: ") else problem
        named = [s.path for s in shown
                 if re.search(rf"(?<![\w.]){re.escape(s.name)}(?![\w])", text)]
        if len(named) > 1:  # the selector is named for context ("method slerp needs t")
            named = [p for p in named if not any(s.selector and s.path == p for s in shown)]
        for path in named:
            out.setdefault(path, []).append(text)
    return {path: "; ".join(texts) for path, texts in out.items()}
