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


def path_values(config: BaseModel, plugin: plugins.Plugin | None = None,
                prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(field path, value, marker) for every value of a path-like field: `file` (a local
    file), `path` (a local file or folder), `data` (a local file or folder, or a Hub dataset
    id), `checkpoint(s)` (a registry reference, a folder or a Hub id)."""
    props = type(config).model_json_schema().get("properties", {})
    for name in type(config).model_fields:
        value = getattr(config, name)
        marker = plugins.field_marker(props.get(name, {}))
        if isinstance(value, BaseModel):
            yield from path_values(value, None, prefix + name + ".")
        elif marker in ("file", "path", "data", "checkpoint", "code") and isinstance(value, str) \
                and value:
            yield prefix + name, value, marker
        elif marker == "checkpoints" and value:
            for i, item in enumerate(value):
                yield f"{prefix}{name}[{i}]", item, "checkpoint"
    if plugin is not None:  # e.g. models inside a mergekit YAML: its referenced_paths hook
        for field, value in plugin.paths_referenced(config):
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


def code_roots(lab: Lab) -> list[Path]:
    return [Path(r).expanduser().resolve() for r in lab.settings.code_roots]


def check_code_path(lab: Lab, field: str, value: str) -> str | None:
    """Why a job of this lab may not load code from `value` (a folder whose files can become
    code, such as lm-eval task YAMLs with !function), or None. A shared lab takes only the
    folders its admin lists in code_roots, and never anything uploaded."""
    if ".." in Path(value).parts:
        return f"field '{field}': {value!r} climbs out with '..'; give the folder directly"
    if not Path(value).expanduser().is_absolute():  # the job runs in its own folder
        return f"field '{field}': {value!r} is relative; expected an absolute folder path"
    real = Path(value).expanduser().resolve()
    uploads = (lab.root / "uploads").resolve()
    if real == uploads or real.is_relative_to(uploads) or uploads.is_relative_to(real):
        return (f"field '{field}': {value!r} holds uploaded files, which are data and never "
                f"code; an admin can put reviewed task folders in a folder listed in "
                f"code_roots in {lab.root / 'lab.toml'}")
    if not any(real == r or real.is_relative_to(r) for r in code_roots(lab)):
        listed = ", ".join(str(r) for r in code_roots(lab)) or "none are listed"
        return (f"field '{field}': {value!r} may hold code (its files are imported by the "
                f"job), and this shared lab loads code only from the admin's code_roots "
                f"({listed}); an admin can add a reviewed folder to code_roots in "
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


# A data value ending like this names a local file (no Hub dataset id ends in a file suffix).
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".tsv", ".parquet", ".arrow",
                      ".yaml", ".yml")


def missing_paths(config: BaseModel, plugin: plugins.Plugin | None = None) -> list[str]:
    """Local files and folders a config names that do not exist, in any lab: found at
    submit, not when the job runs."""
    problems = []
    for field, value, marker in path_values(config, plugin):
        if marker == "checkpoint":
            continue  # resolved against the registry by check_config
        try:
            path = Path(value).expanduser()
            exists = path.exists()
        except (OSError, RuntimeError, ValueError) as e:  # ~nobody, a name too long...
            problems.append(f"field '{field}': {value[:200]!r} is not a usable path ({e})")
            continue
        if exists:
            if marker == "file" and not path.is_file():
                problems.append(f"field '{field}': {value!r} is a folder; expected a file")
            continue
        if marker == "data" and not value.lower().endswith(DATA_FILE_SUFFIXES):
            continue  # a Hub dataset id, or a bare name (a suite) the plugin resolves
        what = {"file": "file", "data": "file"}.get(marker, "file or folder")
        problems.append(f"field '{field}': {value!r} does not exist; expected an existing "
                        f"{what} on the server")
    return problems


def config_problems(lab: Lab, config: BaseModel,
                    plugin: plugins.Plugin | None = None) -> list[str]:
    """The path and Hub id problems of a validated config (empty in an unrestricted lab)."""
    if not restricted(lab):
        return []
    problems = []
    with lab.registry() as reg:
        for field, value, marker in path_values(config, plugin):
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
            problem = check_code_path(lab, field, value) if marker == "code" else \
                check_path(lab, field, value)
            if problem:
                problems.append(problem)
    return problems
