"""evaluate: score a checkpoint on perplexity, a local task suite and lm-eval-harness tasks.

The model is loaded once per job for every task. Each task's scores are stored with a key
(its settings and data bytes); a checkpoint with the same weights and the same key reuses them
instead of recomputing (`reuse_scores`).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from plugins import (ADVANCED, CheckpointRef, CodePath, DataRef, LabFacts, LocalFile, Plugin,
                     PluginConfig)

from plugins.kit.assets import DEMO_HELDOUT as DEMO_TEXT

# A score measured in another precision than float32 is stored under its task name with the
# dtype after "@" (demo/capitals@bfloat16/acc), so that the registry's latest scores, Compare
# and the score cache never put a bfloat16 score next to a float32 one as the same measurement.
FULL_PRECISION = "float32"

LM_EVAL_MISSING = ("lm-eval is not installed; install the extra with "
                   "pip install 'weightsmith[lm-eval]' (or pip install lm-eval)")


class Config(PluginConfig):
    checkpoint: CheckpointRef = Field(
        description="Checkpoint to evaluate: registry id, name, local folder or Hub id.")
    suite: Optional[DataRef] = Field(
        None, description="Local task suite: a built-in name (`demo`), a name in "
                                        "the lab's suites/ folder, or a path to a suite YAML. "
                                        "Empty: no suite.")
    tasks: list[str] = Field(
        default_factory=list, description="Only these tasks of the suite. Empty: all of them.")
    text_file: Optional[LocalFile] = Field(
        None, description="UTF-8 text file to score for perplexity and bits-per-byte. Empty: "
                          "the demo held-out text (assets/demo/heldout.txt), unless a suite or "
                          "lm-eval tasks are given.")
    window: int = Field(256, ge=2, le=131072,
                        description="Perplexity: tokens per window (context length used for "
                                    "scoring).",
                        json_schema_extra=ADVANCED)
    stride: Optional[int] = Field(
        None, ge=1, description="Perplexity: tokens between window starts; each window scores "
                                "only its new tokens. Empty: half the window.",
        json_schema_extra=ADVANCED)
    batch_size: int = Field(8, ge=1, le=1024,
                            description="Windows or task items per forward pass.",
                            json_schema_extra=ADVANCED)
    max_tokens: Optional[int] = Field(
        None, ge=2, description="Perplexity: score only the first N tokens of the text (quick "
                                "checks).",
        json_schema_extra=ADVANCED)
    task: Optional[str] = Field(
        None, min_length=1, max_length=100,
        description="Name the text file's scores are stored under. Empty: 'ppl:<file name>'.",
        json_schema_extra=ADVANCED)
    limit: Optional[int] = Field(
        None, ge=1, description="Score only the first N items of each suite or lm-eval task "
                                "(quick checks). Empty: all.",
        json_schema_extra=ADVANCED)
    lm_eval_tasks: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")]] = Field(
        default_factory=list, description="lm-evaluation-harness tasks by name (needs the "
                                          "`lm-eval` extra), e.g. [hellaswag] or the name of a "
                                          "task YAML in lm_eval_include_path.")
    lm_eval_include_path: Optional[CodePath] = Field(
        None, description="Folder of lm-eval task YAMLs to add to the task index (works "
                          "offline for local data). Its YAMLs may import Python, so in a "
                          "shared lab it must lie in one of the admin's code_roots.",
        json_schema_extra=ADVANCED)
    lm_eval_num_fewshot: Optional[int] = Field(
        None, ge=0, le=64, description="lm-eval few-shot examples. Empty: each task's default.",
        json_schema_extra=ADVANCED)
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description=(
            "Precision the model runs in while it is scored. auto: the checkpoint's own dtype "
            "(its config.json), which is lm-eval's default (HFLM dtype='auto'); float32: full "
            "precision, faster on CPUs without native bfloat16 (on one with AVX512-BF16, SmolLM2 "
            "scored in 58 s in bfloat16 against 95 s in float32); bfloat16: half the memory. "
            "Scores in another precision than float32 are stored under the task name with "
            "the dtype added (demo/capitals@bfloat16), so precisions are never compared as "
            "one measurement."),
        json_schema_extra=ADVANCED)
    reuse_scores: bool = Field(
        True, description="Reuse a task's scores measured before on a checkpoint with the "
                          "same weights (content hash) and the same task settings and data.",
        json_schema_extra=ADVANCED)

    @model_validator(mode="after")
    def _consistent(self):
        if self.stride is not None and self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed window ({self.window})")
        if self.tasks and not self.suite:
            raise ValueError("tasks selects tasks of a suite; set suite too")
        if self.lm_eval_include_path and not self.lm_eval_tasks:
            raise ValueError("lm_eval_include_path adds task YAMLs; name the tasks to run in "
                             "lm_eval_tasks")
        if self.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None:
            raise ValueError(LM_EVAL_MISSING)
        return self

    def perplexity_file(self) -> Path | None:
        if self.text_file:
            return Path(self.text_file).expanduser()
        return None if (self.suite or self.lm_eval_tasks) else DEMO_TEXT


def lab_problems(config: Config, facts: LabFacts) -> list[str]:
    """Checks that need the lab: the suite and its data exist and parse."""
    from plugins.evaluate.suites import SuiteError, load_items, load_suite

    problems = []
    if config.suite:
        try:
            suite = load_suite(config.suite, facts.suites_dir)
            chosen = select_tasks(suite, config.tasks)
            for task in chosen:
                if task.type != "perplexity":
                    load_items(suite, task)
        except SuiteError as e:
            problems.append(f"field 'suite': {e}")
    if config.lm_eval_include_path and not Path(config.lm_eval_include_path).expanduser() \
            .is_dir():
        problems.append(f"field 'lm_eval_include_path': {config.lm_eval_include_path} is not "
                        f"a folder")
    return problems


def check_finite_weights(model, what: str) -> None:
    """Refuse to score a model whose weights hold NaN or Inf: every score of it would be
    meaningless (argmax over NaN logits still picks a choice, so accuracies look real)."""
    import torch

    bad = [(name, int((~torch.isfinite(p)).sum())) for name, p in model.named_parameters()
           if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        total = sum(n for _, n in bad)
        raise ValueError(f"checkpoint {what} has {total} NaN or Inf weights in {len(bad)} "
                         f"tensors (first: {bad[0][0]}); its scores would be meaningless, so "
                         f"none were recorded")


def planned_dtype(ck, requested: str) -> str:
    """The dtype the model will be loaded in, known before loading it: the requested one, or
    for auto the checkpoint's config.json `dtype` (`torch_dtype` before transformers 5);
    "auto" when the folder does not say (an adapter: its base decides)."""
    if requested != "auto":
        return requested
    try:
        config = ck.config()
    except (OSError, ValueError):
        return "auto"
    if not isinstance(config, dict):
        return "auto"
    name = config.get("dtype") or config.get("torch_dtype")
    return str(name).removeprefix("torch.") if isinstance(name, str) and name else "auto"


def precision_key(dtype: str) -> dict:
    """What a score key holds of the precision: nothing for float32 (the keys of scores
    measured before evaluate had a dtype field, all float32 on the demo, stay valid)."""
    return {} if dtype == FULL_PRECISION else {"dtype": dtype}


def score_task(task: str, dtype: str) -> str:
    """The task name a score is stored under: `task` in float32, `task@<dtype>` otherwise."""
    return task if dtype == FULL_PRECISION else f"{task}@{dtype}"


def select_tasks(suite, names: list[str]):
    from plugins.evaluate.suites import SuiteError

    if not names:
        return list(suite.tasks)
    known = {t.name: t for t in suite.tasks}
    missing = [n for n in names if n not in known]
    if missing:
        raise SuiteError(f"suite {suite.name!r} has no task {', '.join(map(repr, missing))}; "
                         f"it has {', '.join(known)}")
    return [known[n] for n in names]


def _stderr(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) \
        else float(value)


def run(config: Config, ctx) -> None:
    from plugins.evaluate.suites import load_suite

    ck = ctx.open(config.checkpoint)
    planned = planned_dtype(ck, config.dtype)
    ctx.log(f"evaluating {ck.name} ({ck.id}) with device {ctx.device}, dtype {config.dtype}"
            + (f" ({planned})" if config.dtype == "auto" and planned != "auto" else ""))
    loaded: dict = {}

    def model_and_tokenizer():  # loaded once, only if some task is not reused
        if not loaded:
            import torch

            loaded["tokenizer"] = ck.load_tokenizer()
            wanted = getattr(torch, planned, None)  # "auto", or a name torch does not know
            loaded["model"] = ck.load_model(
                device=ctx.device, dtype=wanted if isinstance(wanted, torch.dtype) else "auto")
            loaded["dtype"] = str(loaded["model"].dtype).removeprefix("torch.")
            check_finite_weights(loaded["model"], f"{ck.name} ({ck.id})")
        return loaded["model"], loaded["tokenizer"]

    jobs = []  # (label, key or None, compute function)
    text = config.perplexity_file()
    if text is not None:
        jobs.append(perplexity_job(config, text, config.task or f"ppl:{text.name}",
                                    config.window, config.stride, config.max_tokens, planned))
    if config.suite:
        suite = load_suite(config.suite, ctx.suites_dir)
        for task in select_tasks(suite, config.tasks):
            jobs.append(suite_job(config, suite, task, planned))
    if config.lm_eval_tasks:
        jobs.append(_lm_eval_job(config))

    for number, (label, key, compute) in enumerate(jobs):
        base = number / len(jobs)

        def report(done, total, label=label, base=base):
            ctx.progress(base + done / total / len(jobs), f"{label}: {done}/{total}")

        if key and config.reuse_scores:
            reused = ctx.reuse_scores(ck, key)
            if reused:
                ctx.log(f"{label}: reused {len(reused)} scores measured by job "
                        f"{reused[0]['job_id']} on {reused[0]['checkpoint_id']} (same weights, "
                        f"same task and data)")
                continue
        ctx.progress(base, f"{label}")
        model, tokenizer = model_and_tokenizer()
        rows = list(compute(model, tokenizer, report, ctx))
        broken = [f"{task}/{metric} = {value}" for task, metric, value, _, _ in rows
                  if not math.isfinite(value)]
        if broken:  # an infinite perplexity or a NaN accuracy is no score: record none
            raise ValueError(f"{label}: the model's scores are not finite ({', '.join(broken)}); "
                             f"nothing was recorded")
        dtype = loaded["dtype"]
        for task, metric, value, stderr, details in rows:
            details = {**details, "dtype": dtype, **({"key": key} if key else {})}
            ctx.evaluation(ck, score_task(task, dtype), metric, value, _stderr(stderr),
                           details=details)
    ctx.progress(1.0, "done")


def perplexity_job(config: Config, path: Path, task: str, window: int,
                   stride: int | None, max_tokens: int | None, dtype: str):
    from plugins.evaluate.suites import file_key

    if not path.is_file():
        raise FileNotFoundError(f"text_file {path} does not exist")
    stride = stride or max(1, window // 2)
    key = file_key(path, {"kind": "perplexity", "window": window, "stride": stride,
                          "max_tokens": max_tokens, "task": task, **precision_key(dtype)})

    def compute(model, tokenizer, report, ctx):
        import torch

        from ops.perplexity import sliding_window_nll

        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"text_file {path} is empty")
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        if max_tokens:
            ids = ids[:max_tokens]
            text = tokenizer.decode(ids, skip_special_tokens=True)
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos and window > max_pos:
            raise ValueError(f"window ({window}) exceeds the model's "
                             f"max_position_embeddings ({max_pos})")
        result = sliding_window_nll(model, ids, window, stride, config.batch_size,
                                    progress=report)
        n_bytes = len(text.encode("utf-8"))
        details = {"tokens": result.tokens, "windows": result.windows, "window": window,
                   "stride": stride, "bytes": n_bytes, "file": str(path)}
        ctx.log(f"{task}: perplexity {result.perplexity:.4f}, bits/byte "
                f"{result.bits_per_byte(n_bytes):.4f} over {result.tokens} tokens")
        return [(task, "perplexity", result.perplexity, None, details),
                (task, "nll_per_token", result.nll_per_token, None, details),
                (task, "bits_per_byte", result.bits_per_byte(n_bytes), None, details)]

    return task, key, compute


def suite_job(config: Config, suite, task, dtype: str):
    from plugins.evaluate.suites import load_items, task_key

    if task.type == "perplexity":
        label, job = f"{suite.name}/{task.name}", perplexity_job(
            config, suite.file(task), f"{suite.name}/{task.name}", task.window, task.stride,
            None, dtype)
        return label, job[1], job[2]
    label = f"{suite.name}/{task.name}"
    key = task_key(suite, task, {"limit": config.limit, **precision_key(dtype)})

    def compute(model, tokenizer, report, ctx):
        from ops.evaluation import greedy_generate, generation_match, mean, mean_stderr

        items = load_items(suite, task)[:config.limit or None]
        details = {"suite": suite.name, "suite_file": str(suite.path), "n": len(items)}
        if task.type == "multiple_choice":
            from ops.evaluation import score_multiple_choice

            result = score_multiple_choice(model, tokenizer, items, config.batch_size, report)
            ctx.log(f"{label}: acc {result['acc']:.3f}, acc_norm {result['acc_norm']:.3f} "
                    f"on {len(items)} items")
            return [(label, "acc", result["acc"], result["acc_stderr"], details),
                    (label, "acc_norm", result["acc_norm"], result["acc_norm_stderr"], details)]
        outputs = greedy_generate(model, tokenizer, [i["prompt"] for i in items],
                                  task.max_new_tokens, task.until, config.batch_size, report)
        rows = []
        for metric in task.metrics:
            hits = [float(generation_match(metric, out, item["target"], task.ignore_case))
                    for out, item in zip(outputs, items)]
            rows.append((label, metric, mean(hits), mean_stderr(hits), details))
        examples = [{"prompt": i["prompt"], "target": i["target"], "output": o}
                    for i, o in list(zip(items, outputs))[:3]]
        ctx.log(f"{label}: " + ", ".join(f"{r[1]} {r[2]:.3f}" for r in rows)
                + f" on {len(items)} items; first outputs {examples}")
        return rows

    return label, key, compute


def _lm_eval_job(config: Config):
    def compute(model, tokenizer, report, ctx):
        try:
            import lm_eval
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise RuntimeError(LM_EVAL_MISSING) from None
        include = str(Path(config.lm_eval_include_path).expanduser()) \
            if config.lm_eval_include_path else None
        manager = TaskManager(include_path=include)
        unknown = [t for t in config.lm_eval_tasks if not manager.match_tasks([t])]
        if unknown:
            raise ValueError(f"lm_eval_tasks: unknown task {', '.join(map(repr, unknown))}"
                             + (f" (not in lm-eval's index nor in {include})" if include
                                else "; give lm_eval_include_path for local task YAMLs"))
        ctx.log(f"lm-eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else ''}: "
                f"{', '.join(config.lm_eval_tasks)}")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(config.lm_eval_tasks), num_fewshot=config.lm_eval_num_fewshot,
            limit=config.limit, task_manager=manager, log_samples=False)
        rows = []
        for task, metrics in results["results"].items():
            for name, value in metrics.items():
                if name == "alias" or "_stderr," in name or not isinstance(value, (int, float)):
                    continue
                metric, _, filt = name.partition(",")
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                stderr = stderr if isinstance(stderr, (int, float)) else None
                label = metric if filt in ("", "none") else f"{metric}[{filt}]"
                rows.append((f"lm-eval:{task}", label, float(value), stderr,
                             {"lm_eval_task": task, "filter": filt,
                              "n_samples": results.get("n-samples", {}).get(task),
                              "num_fewshot": results.get("n-shot", {}).get(task)}))
        ctx.log("lm-eval: " + "; ".join(f"{t} {m} {v:.4g}" for t, m, v, _, _ in rows))
        return rows

    return "lm-eval", None, compute


PLUGIN = Plugin(
    name="evaluate",
    order=70,
    title="Evaluate",
    description="Score a checkpoint: perplexity and bits-per-byte on text, a local task suite "
                "(multiple choice, generation) and lm-eval-harness tasks; scores are recorded "
                "on the checkpoint and compared with its parents.",
    Config=Config,
    run=run,
    lab_problems=lab_problems,
)
