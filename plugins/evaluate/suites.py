"""Local evaluation suites: a YAML file naming tasks, each with its JSONL data (or a text file
for perplexity), in the lab's `suites/` folder or the shipped `assets/suites/`.

```yaml
name: my-suite
tasks:
  - name: capitals                 # multiple choice, scored by log-likelihood
    type: multiple_choice
    data: capitals.jsonl           # {"context": str, "choices": [str, ...], "answer": int}
  - name: sums                     # greedy generation
    type: generation
    data: sums.jsonl               # {"prompt": str, "target": str}
    metrics: [exact_match, contains, regex]   # regex: the target is a pattern
    max_new_tokens: 8
    until: ["\\n"]
  - name: heldout                  # sliding-window perplexity and bits-per-byte
    type: perplexity
    text: heldout.txt
```
Relative paths are resolved against the suite file's folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ops import safe_yaml
from plugins.kit.assets import SUITES_DIR

ASSET_SUITES = SUITES_DIR  # the shipped suites
GENERATION_METRICS = ("exact_match", "contains", "regex")  # ops.evaluation's, without torch


class SuiteError(ValueError):
    """A suite that cannot be used; the message names the file, the line or the field."""


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.:-]+$")
    type: Literal["multiple_choice", "generation", "perplexity"]
    description: str = ""
    data: Optional[str] = None  # JSONL (multiple_choice, generation)
    text: Optional[str] = None  # text file (perplexity)
    metrics: list[Literal["exact_match", "contains", "regex"]] = Field(
        default_factory=lambda: ["exact_match"], min_length=1)
    ignore_case: bool = False
    max_new_tokens: int = Field(16, ge=1, le=4096)
    until: list[str] = Field(default_factory=lambda: ["\n"])
    window: int = Field(256, ge=2)
    stride: Optional[int] = Field(None, ge=1)
    limit: Optional[int] = Field(None, ge=1)  # score only the first N items

    @model_validator(mode="after")
    def _inputs(self):
        if self.type == "perplexity":
            if not self.text:
                raise ValueError("a perplexity task needs `text` (a text file)")
        elif not self.data:
            raise ValueError(f"a {self.type} task needs `data` (a JSONL file)")
        if self.stride is not None and self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed window ({self.window})")
        return self


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    tasks: list[TaskSpec] = Field(min_length=1)
    path: Optional[Path] = None  # the YAML file; set by load_suite

    @model_validator(mode="after")
    def _unique(self):
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dup)}")
        return self

    def file(self, task: TaskSpec) -> Path:
        rel = task.text if task.type == "perplexity" else task.data
        return (self.path.parent / rel).resolve() if self.path else Path(rel)


def suite_path(ref: str, suites_dir: Path | None = None) -> Path:
    """The YAML file of a suite given as a path (file or folder) or a name looked up in
    `suites_dir` (the lab's LAB/suites/) and then in the shipped assets/suites/."""
    p = Path(ref).expanduser()
    if "/" in ref or ref.endswith((".yaml", ".yml")):  # a path
        if p.is_file():
            return p.resolve()
        if p.is_dir():
            if (p / "suite.yaml").is_file():
                return (p / "suite.yaml").resolve()
            raise SuiteError(f"suite folder {p} has no suite.yaml")
        raise SuiteError(f"suite file {p} does not exist")
    candidates = []
    for root in ([suites_dir] if suites_dir else []) + [ASSET_SUITES]:
        candidates += [root / f"{ref}.yaml", root / ref / "suite.yaml"]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise SuiteError(f"suite {ref!r} not found; looked for "
                     + ", ".join(str(c) for c in candidates)
                     + (f". Built-in suites: {', '.join(builtin_suites())}"
                        if builtin_suites() else ""))


def builtin_suites() -> list[str]:
    return sorted(p.parent.name for p in ASSET_SUITES.glob("*/suite.yaml"))


def load_suite(ref: str, suites_dir: Path | None = None) -> Suite:
    path = suite_path(ref, suites_dir)
    try:
        data = safe_yaml.load(path.read_bytes(), what=str(path))
    except safe_yaml.YamlError as e:
        raise SuiteError(str(e)) from None
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: expected a mapping with `name` and `tasks`")
    try:
        suite = Suite(**data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise SuiteError(f"{path}: {problems}") from None
    suite.path = path
    # a suite reads its own folder only (a shipped suite: anything shipped in assets/)
    home = ASSET_SUITES.parent.resolve() if path.resolve().is_relative_to(
        ASSET_SUITES.parent.resolve()) else path.parent.resolve()
    for task in suite.tasks:
        f = suite.file(task)
        if not f.is_relative_to(home):
            raise SuiteError(f"{path}: task {task.name!r}: file {f} lies outside the suite's "
                             f"folder {path.parent}; expected a file name next to the suite "
                             f"(a suite is data: it names no other files)")
        if not f.is_file():
            raise SuiteError(f"{path}: task {task.name!r}: file {f} does not exist")
    return suite


def load_items(suite: Suite, task: TaskSpec) -> list[dict]:
    """The task's items, checked line by line; errors name the file and the line."""
    path = suite.file(task)
    items = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SuiteError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") \
                    from None
            if not isinstance(row, dict):
                raise SuiteError(f"{where}: expected a JSON object, got {type(row).__name__}")
            items.append(_check_item(task, row, where))
            if task.limit and len(items) >= task.limit:
                break
    if not items:
        raise SuiteError(f"{path}: no items")
    return items


def _check_item(task: TaskSpec, row: dict, where: str) -> dict:
    def text(key: str, allow_empty: bool = False) -> str:
        value = row.get(key)
        if not isinstance(value, str) or (not allow_empty and not value):
            raise SuiteError(f"{where}: `{key}` must be a non-empty string, got {value!r}")
        return value

    if task.type == "multiple_choice":
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or \
                not all(isinstance(c, str) and c for c in choices):
            raise SuiteError(f"{where}: `choices` must be a list of at least 2 non-empty "
                             f"strings, got {choices!r}")
        answer = row.get("answer")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or \
                not 0 <= answer < len(choices):
            raise SuiteError(f"{where}: `answer` {answer!r} is out of range: expected an "
                             f"index from 0 to {len(choices) - 1} (or one of the choices)")
        return {"context": text("context", allow_empty=True), "choices": choices,
                "answer": answer}
    target = text("target")
    if "regex" in task.metrics:
        import re
        try:
            re.compile(target)
        except re.error as e:
            raise SuiteError(f"{where}: `target` {target!r} is not a valid regular expression "
                             f"for the regex metric ({e})") from None
    return {"prompt": text("prompt"), "target": target}


def task_key(suite: Suite, task: TaskSpec, extra: dict | None = None) -> str:
    """What a task's scores depend on besides the model: its settings and its data bytes.
    Scores are reused for a checkpoint with the same content hash and the same key."""
    return file_key(suite.file(task), {"task": task.model_dump(), "extra": extra or {}})


def file_key(path: Path, settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


def write_rolling_text_task(folder: Path, name: str, text: str) -> Path:
    """Write a wikitext-style lm-eval task over one local document (`text`): output_type
    loglikelihood_rolling, metrics word_perplexity, byte_perplexity and bits_per_byte.
    Point `lm_eval_include_path` at `folder` and run task `name`; it works offline."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text(json.dumps({"page": text}) + "\n", encoding="utf-8")
    task = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
            "output_type": "loglikelihood_rolling", "doc_to_text": "",
            "doc_to_target": "{{page}}", "should_decontaminate": False,
            "metric_list": [{"metric": m} for m in
                            ("word_perplexity", "byte_perplexity", "bits_per_byte")],
            "metadata": {"version": 1.0}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    return path
