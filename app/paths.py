"""Safe inputs for a shared lab: every local path a config names must lie inside the lab's
allowed roots, and every Hub id must be well formed.

A lab is *restricted* when it has users (a shared deployment) or names `allowed_roots` in
lab.toml. Then each path is resolved with symlinks followed, and must fall inside the lab
folder, the shipped assets/ or one of `allowed_roots`. A path that climbs with `..` is refused
outright, even if it would land inside, so that a config reads the same on every machine. An
unrestricted lab (one person, no users, no roots) reads what its user can read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from pydantic import BaseModel

import plugins
from app.lab import Lab
from registry.refs import is_hub_id

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def restricted(lab: Lab) -> bool:
    from app.auth import has_users

    return bool(lab.settings.allowed_roots) or has_users(lab)


def roots(lab: Lab) -> list[Path]:
    return [lab.root.resolve(), ASSETS] + [Path(r).expanduser().resolve()
                                           for r in lab.settings.allowed_roots]


def path_values(config: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(field path, value, marker) for every value of a path-like field: `file` (a local
    file), `path` (a local file or folder), `data` (a local file or folder, or a Hub dataset
    id), `checkpoint(s)` (a registry reference, a folder or a Hub id)."""
    props = type(config).model_json_schema().get("properties", {})
    for name in type(config).model_fields:
        value = getattr(config, name)
        marker = plugins._marker(props.get(name, {}))
        if isinstance(value, BaseModel):
            yield from path_values(value, prefix + name + ".")
        elif marker in ("file", "path", "data", "checkpoint") and isinstance(value, str) \
                and value:
            yield prefix + name, value, marker
        elif marker == "checkpoints" and value:
            for i, item in enumerate(value):
                yield f"{prefix}{name}[{i}]", item, "checkpoint"
    extra = getattr(config, "referenced_paths", None)  # e.g. models inside a mergekit YAML
    if callable(extra):
        for field, value in extra():
            yield field, value, "checkpoint"


def _hub_id_not_path(value: str) -> bool:
    """A Hub id (ORG/NAME) that is not also an existing local path."""
    return is_hub_id(value) and not Path(value).expanduser().exists()


def check_path(lab: Lab, field: str, value: str) -> str | None:
    """Why `value` may not be read by a job of this lab, or None."""
    if ".." in Path(value).parts:
        return (f"field '{field}': {value!r} climbs out with '..'; give the path inside the "
                f"lab's allowed roots directly ({_roots_text(lab)})")
    real = Path(value).expanduser().resolve()  # symlinks followed: a link cannot escape
    if not any(real == r or real.is_relative_to(r) for r in roots(lab)):
        shown = f"{value!r}" + (f" (which is {real})" if str(real) != value else "")
        return (f"field '{field}': {shown} is outside the lab's allowed roots "
                f"({_roots_text(lab)}); an admin can add its folder to allowed_roots in "
                f"{lab.root / 'lab.toml'}")
    return None


def _roots_text(lab: Lab) -> str:
    return ", ".join(str(r) for r in roots(lab))


def import_problem(lab: Lab, ref: str) -> str | None:
    """Why importing `ref` (a folder or Hub id) is refused in this lab, or None."""
    ref = (ref or "").strip()
    if not restricted(lab) or _hub_id_not_path(ref):
        return None
    return check_path(lab, "ref", ref)


def config_problems(lab: Lab, config: BaseModel) -> list[str]:
    """The path and Hub id problems of a validated config (empty in an unrestricted lab)."""
    if not restricted(lab):
        return []
    problems = []
    with lab.registry() as reg:
        for field, value, marker in path_values(config):
            if marker == "checkpoint":
                if reg.find_checkpoint(value) is not None:
                    continue  # registered: its files are the lab's own
                if _hub_id_not_path(value):
                    continue  # resolve_ref has checked the Hub id's form
            elif marker == "data" and _hub_id_not_path(value):
                continue  # a Hub dataset id
            elif marker == "data" and "/" not in value and "\\" not in value and \
                    not Path(value).expanduser().exists():
                continue  # a bare name (e.g. a suite in LAB/suites or assets/suites)
            problem = check_path(lab, field, value)
            if problem:
                problems.append(problem)
    return problems
