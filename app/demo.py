"""The demo lab: a few-million-parameter Llama and its BPE tokenizer, pre-trained locally on the
shipped corpus by a `pretrain` job (about two minutes on 2 CPU cores, once; then it is in the
lab's registry with its job and config, like any checkpoint), and two skill fine-tunes of it."""

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


def skill_config(name: str, base: str = DEMO_NAME) -> dict:
    skill = SKILLS[name]
    return {"checkpoint": base, "data": str(SUITE_DIR / skill["data"]), "method": "full",
            "epochs": skill["epochs"], "learning_rate": 3e-4, "batch_size": 8,
            "save_steps": 0, "name": name}


def queue_demo_skills(lab: Lab, base: str = DEMO_NAME) -> list[dict]:
    """Queue the skill fine-tunes of `base` (a reference: by default the demo base's name)
    the lab does not have yet (nor has queued or running)."""
    from app.jobs import submit

    out = []
    with lab.registry() as reg:
        pending = {json.loads(j["config"]).get("name") for j in reg.jobs(limit=1000)
                   if j["plugin"] == "train" and j["status"] in ("queued", "running")}
        missing = [n for n in SKILLS if reg.find_checkpoint(n) is None and n not in pending]
    for name in missing:
        out.append(submit(lab, "train", skill_config(name, base), user="demo"))
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
    with lab.registry() as reg:
        base = reg.find_checkpoint(DEMO_NAME)
        skills = {n: reg.find_checkpoint(n) for n in SKILLS}
        jobs = [j for j in reg.jobs(limit=200) if j["status"] in ("queued", "running")]
        def children(ck_id: str, relation: str) -> list[dict]:
            rows = [reg.get_checkpoint(c["id"]) for c in reg.descendants(ck_id, 1)
                    if c["relation"] == relation]
            return sorted((r for r in rows if r and r.get("deleted_at") is None),
                          key=lambda r: r["created_at"])

        merged = pruned = None
        if all(skills.values()):
            wanted = {r["id"] for r in skills.values()}
            merges = [c for c in children(skills[next(iter(SKILLS))]["id"], "merge")
                      if wanted <= {p["parent_id"] for p in reg.parents(c["id"])}]
            merged = merges[-1] if merges else None  # the newest
        if merged:
            prunes = children(merged["id"], "prune")
            pruned = prunes[-1] if prunes else None
        pruned_scored = bool(pruned and reg.evaluations(pruned["id"]))
    names = {json.loads(j["config"]).get("name") for j in jobs}
    return {"base": base, "skills": skills, "merged": merged, "pruned": pruned,
            "pruned_scored": pruned_scored, "running": names,
            "jobs": jobs}


def demo_story(lab: Lab) -> list[StoryStep]:
    """The demo story's steps and their states; [] on a lab that is not a demo lab (no
    demo base, and no job building one)."""
    rows = _story_rows(lab)
    building = any(j["plugin"] == "pretrain" for j in rows["jobs"]) and \
        DEMO_NAME in rows["running"]
    if rows["base"] is None and not building:
        return []

    def state(done: bool, running: bool, ready: bool) -> str:
        return "done" if done else "running" if running else "next" if ready else "later"

    have_skills = all(rows["skills"].values())
    merged, pruned = rows["merged"], rows["pruned"]
    return [
        StoryStep("base", f"Pre-train the demo base model ({DEMO_NAME})",
                  state(rows["base"] is not None, building, False)),
        StoryStep("skills", "Fine-tune it on two skills: " + " and ".join(SKILLS),
                  state(have_skills, bool(set(SKILLS) & rows["running"]), False)),
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
    if key == "merge" and len(skills) == len(SKILLS) and base:
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
