"""merge_search: search a merge recipe (weights, densities, per-layer or per-block scales) by
CMA-ES, each candidate merged by the native engine and scored on a local suite.

After Akiba et al. 2024, "Evolutionary Optimization of Model Merging Recipes"
(https://arxiv.org/abs/2403.13187), in parameter space: CMA-ES proposes recipes, each one is
merged by the native streaming engine (`ops/merge`) into a folder under the job's work_dir,
loaded once and scored in this process with the evaluate plugin's own task scoring (the same
numbers an `evaluate` job records), and its fitness (a weighted sum of suite metrics, minus
an optional perplexity penalty on general text) goes back to CMA-ES. Every candidate's recipe
and scores are job metrics (step = candidate index); the best recipe is registered as a
`merge` checkpoint, with its inputs as parents as the merge plugin records them.

Why CMA-ES, and why the `cma` package: a merge recipe has a handful to a few dozen
continuous values, each candidate costs a merge and an evaluation, and the fitness is noisy
and stepwise (accuracies over a few dozen items): a derivative-free, rank-based optimizer
that adapts its own step sizes and correlations is the method the evolutionary-merging paper
uses. `cma` is Nikolaus Hansen's reference implementation (the author of CMA-ES), kept up
for two decades; it handles the box bounds of every parameter with its BoundTransform (a
smooth transformation, so the search never proposes an out-of-range weight) and is seeded,
so a search is reproducible. Writing CMA-ES by hand would only re-derive it worse.

Candidates run one after another in the job's process, or `parallel: N` at a time in N
worker processes (one per GPU on a GPU lab), with the same candidates and scores.
"""

from __future__ import annotations

import math
import os
import re
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from plugins import (ADVANCED, LOG_SCALE, METHOD_SELECTOR, CheckpointList, CheckpointRef,
                     DataRef, LabFacts, LocalFile, Plugin, PluginConfig, Resources,
                     for_methods, form_hints)

METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "linear")
USES_DENSITY = ("ties", "dare_ties", "dare_linear")
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear")
SCALES = ("none", "lines", "per_layer", "per_block")
MAX_MODELS = 8
SANE = 10.0  # |bound| of a weight or scale range
METRIC_NAME = re.compile(r"^[A-Za-z0-9_.:@\-]+(/[A-Za-z0-9_.:@\-\[\]]+){1,3}$")
FITNESS = "fitness"  # the job metric of each candidate's fitness


def _range_field(default, description, **extra):
    return Field(default, min_length=2, max_length=2, description=description, **extra)


class Config(PluginConfig):
    models: CheckpointList = Field(
        description=f"The fine-tuned checkpoints to merge (2 to {MAX_MODELS}; not the base).")
    base_model: Optional[CheckpointRef] = Field(
        None, json_schema_extra=for_methods(*TASK_VECTOR_METHODS),
        description="The base the models were fine-tuned from (task-vector methods: their "
                    "task vectors are model - base).")
    method: Literal[METHODS] = Field(
        "task_arithmetic", json_schema_extra=METHOD_SELECTOR,
        description="Merge method, run by the native engine: task_arithmetic, ties, "
                    "dare_ties, dare_linear (need base_model) or linear (a weighted mean).")
    weight_range: list[float] = _range_field(
        [0.0, 1.5], "[low, high] of each model's weight; one weight per model is searched.")
    density_range: Optional[list[float]] = Field(
        None, min_length=2, max_length=2,
        json_schema_extra=for_methods(*USES_DENSITY),
        description="[low, high] of the density (fraction of each task vector kept), one "
                    "density shared by the models, searched. Empty: the fixed density below.")
    density: Optional[float] = Field(
        None, gt=0, le=1, json_schema_extra=for_methods(*USES_DENSITY),
        description="A fixed density, not searched (with density_range empty). Empty: 1 "
                    "(nothing trimmed or dropped).")
    scales: Literal[SCALES] = Field(
        "none", json_schema_extra=for_methods(*TASK_VECTOR_METHODS),
        description="Per-layer scales of the merged task vector (merge - base), searched "
                    "too: none; lines (LiNeS, arXiv 2410.17146: alpha + beta * l / (L - 1) on "
                    "decoder layer l, alpha outside the layers; alpha and beta searched); "
                    "per_layer (one scale per decoder layer, one for the tensors outside); "
                    "per_block (aTLAS' blocks, arXiv 2407.02880: one scale per layer module "
                    "such as model.layers.0.mlp, and per embedding, norm and head).")
    scale_range: list[float] = _range_field(
        [0.0, 1.5], "[low, high] of each per_layer or per_block scale.",
        json_schema_extra=form_hints(for_methods(*TASK_VECTOR_METHODS), ADVANCED))
    lines_alpha_range: list[float] = _range_field(
        [0.0, 1.0], "[low, high] of LiNeS' alpha (scales: lines).",
        json_schema_extra=form_hints(for_methods(*TASK_VECTOR_METHODS), ADVANCED))
    lines_beta_range: list[float] = _range_field(
        [0.0, 1.0], "[low, high] of LiNeS' beta (scales: lines).",
        json_schema_extra=form_hints(for_methods(*TASK_VECTOR_METHODS), ADVANCED))
    suite: DataRef = Field(
        "demo", description="Local task suite the candidates are scored on: a built-in name "
                            "(`demo`), a name in the lab's suites/ folder, or a suite YAML.")
    tasks: list[str] = Field(
        default_factory=list,
        description="Only these tasks of the suite are scored. Empty: the tasks the fitness "
                    "and the Pareto plot read (all but perplexity tasks, with the default "
                    "fitness).")
    fitness: dict[str, float] = Field(
        default_factory=dict,
        description="The fitness: metric -> weight, summed, e.g. {demo/capitals/acc: 0.5, "
                    "demo/sums/exact_match: 0.5}. A metric is SUITE/TASK/METRIC as evaluate "
                    "records it. Empty: the mean of each scored task's first metric (acc, or "
                    "the first generation metric).")
    perplexity_penalty: float = Field(
        0.0, ge=0, le=1000, json_schema_extra=LOG_SCALE,
        description="Subtracted from the fitness times the general text's mean negative "
                    "log-likelihood per token (ln perplexity), to keep general ability. 0: "
                    "no penalty, and the text is not scored.")
    text_file: Optional[LocalFile] = Field(
        None, json_schema_extra=ADVANCED,
        description="General text for the perplexity penalty. Empty: the demo held-out "
                    "text.")
    perplexity_tokens: int = Field(
        2048, ge=16, le=1_000_000, json_schema_extra=ADVANCED,
        description="Perplexity penalty: score only the text's first N tokens.")
    max_candidates: int = Field(
        16, ge=2, le=10000,
        description="Budget: candidates (merges scored) at most.")
    max_minutes: Optional[float] = Field(
        None, gt=0, le=7 * 24 * 60,
        description="Budget: no new candidate starts after this many minutes. Empty: no "
                    "time limit.")
    strategy: Literal["cma", "grid"] = Field(
        "cma", json_schema_extra=ADVANCED,
        description="cma: CMA-ES (the `cma` package). grid: every point of a regular grid of "
                    "grid_points values per parameter (up to max_candidates), for comparison.")
    grid_points: int = Field(5, ge=2, le=50, json_schema_extra=ADVANCED,
                             description="grid: values per parameter, ends included.")
    population: Optional[int] = Field(
        None, ge=2, le=500, json_schema_extra=ADVANCED,
        description="CMA-ES population (candidates per generation). Empty: 4 + 3 ln(d) "
                    "for d parameters, at most a third of max_candidates, at least 4.")
    sigma: float = Field(
        0.3, gt=0, le=1, json_schema_extra=ADVANCED,
        description="CMA-ES initial step size, as a fraction of every range (the search "
                    "starts at the ranges' middle).")
    seed: int = Field(0, ge=0, le=2**31 - 2, json_schema_extra=ADVANCED,
                      description="Random seed of CMA-ES (and of DARE's drops): the same seed, "
                                  "the same candidates.")
    keep_top: int = Field(
        1, ge=1, le=20,
        description="Register the best K candidates as merge checkpoints (1: the best only). "
                    "Every candidate's recipe and scores are kept in the job's metrics.")
    pareto_x: Optional[str] = Field(
        None, max_length=200,
        description="Metric on the Pareto plot's x axis (SUITE/TASK/METRIC or fitness). "
                    "Empty: the fitness's first metric.")
    pareto_y: Optional[str] = Field(
        None, max_length=200,
        description="Metric on the Pareto plot's y axis. Empty: the fitness's second metric.")
    limit: Optional[int] = Field(
        None, ge=1, json_schema_extra=ADVANCED,
        description="Score only the first N items of each task (quicker, noisier).")
    batch_size: int = Field(16, ge=1, le=1024, json_schema_extra=ADVANCED,
                            description="Task items per forward pass.")
    parallel: int = Field(
        1, ge=1, le=16, json_schema_extra=ADVANCED,
        description="Candidates scored at once: worker processes, each merging and scoring "
                    "one candidate. On a lab with GPUs, one per GPU (the job asks for that "
                    "many); on CPU, each with its share of the cores. 1: one after another "
                    "in the job's process.")
    name: Optional[str] = Field(None, min_length=1, max_length=100,
                                description="Name of the best merge. Empty: derived.")

    @field_validator("models")
    @classmethod
    def _models(cls, models):
        if not 2 <= len(models) <= MAX_MODELS:
            raise ValueError(f"{len(models)} models given; a search merges 2 to {MAX_MODELS}")
        dup = sorted({m for m in models if models.count(m) > 1})
        if dup:
            raise ValueError(f"model {dup[0]} is listed twice")
        return models

    @field_validator("weight_range", "density_range", "scale_range", "lines_alpha_range",
                     "lines_beta_range")
    @classmethod
    def _range(cls, value, info):
        if value is None:
            return value
        low, high = value
        if not low < high:
            raise ValueError(f"{info.field_name}: [{low}, {high}]: expected [low, high] with "
                             f"low < high")
        if info.field_name == "density_range" and not (0 < low and high <= 1):
            raise ValueError(f"density_range: [{low}, {high}]: densities lie in (0, 1]")
        elif info.field_name == "lines_alpha_range" and not (0 <= low and high <= SANE):
            raise ValueError(f"lines_alpha_range: [{low}, {high}]: LiNeS' alpha lies in "
                             f"[0, {SANE:g}]")
        elif max(abs(low), abs(high)) > SANE:
            raise ValueError(f"{info.field_name}: [{low}, {high}]: expected bounds within "
                             f"[-{SANE:g}, {SANE:g}]")
        return value

    @field_validator("fitness")
    @classmethod
    def _fitness(cls, fitness):
        if len(fitness) > 32:
            raise ValueError(f"{len(fitness)} metrics; at most 32")
        for metric, weight in fitness.items():
            if not METRIC_NAME.match(metric):
                raise ValueError(f"metric {metric!r}: expected SUITE/TASK/METRIC, e.g. "
                                 f"demo/capitals/acc")
            if not (math.isfinite(weight) and abs(weight) <= 1e6):
                raise ValueError(f"metric {metric}: weight {weight}: expected a finite number "
                                 f"of at most 1e6 in size")
        if fitness and not any(fitness.values()):
            raise ValueError("every weight is 0: the fitness would not tell candidates apart")
        return fitness

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks):
        if len(tasks) > 64 or len(set(tasks)) != len(tasks):
            raise ValueError("expected at most 64 distinct task names")
        return tasks

    @field_validator("pareto_x", "pareto_y")
    @classmethod
    def _pareto(cls, value, info):
        if value is not None and value != FITNESS and not METRIC_NAME.match(value):
            raise ValueError(f"{info.field_name}: {value!r}: expected SUITE/TASK/METRIC or "
                             f"'{FITNESS}'")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        vector = self.method in TASK_VECTOR_METHODS
        if vector and not self.base_model:
            raise ValueError(f"method {self.method} needs a base_model (task vectors are "
                             f"model - base)")
        if not vector:
            if self.base_model:
                raise ValueError("method linear averages the models alone: leave base_model "
                                 "empty (or pick a task-vector method)")
            if self.scales != "none":
                raise ValueError(f"scales {self.scales} rescales a merged task vector, which "
                                 f"method linear has not: use a task-vector method")
        if self.base_model and self.base_model in self.models:
            raise ValueError(f"base_model {self.base_model} is also among models")
        if self.method not in USES_DENSITY and (self.density_range or self.density):
            raise ValueError(f"method {self.method} keeps every entry: density and "
                             f"density_range are read by {', '.join(USES_DENSITY)} only")
        if self.density_range and self.density is not None:
            raise ValueError("give density_range (searched) or density (fixed), not both")
        if self.keep_top > self.max_candidates:
            raise ValueError(f"keep_top ({self.keep_top}) exceeds max_candidates "
                             f"({self.max_candidates})")
        if self.population is not None and self.population > self.max_candidates:
            raise ValueError(f"population ({self.population}) exceeds max_candidates "
                             f"({self.max_candidates}): not one generation would complete")
        if self.method == "linear" and self.weight_range[0] <= 0:
            raise ValueError(f"weight_range: method linear divides by the sum of the weights, "
                             f"so the range must be above 0; got {self.weight_range}")
        if self.text_file and not self.perplexity_penalty:
            raise ValueError("text_file is read only with a perplexity_penalty above 0")
        if self.pareto_x and self.pareto_x == self.pareto_y:
            raise ValueError(f"pareto_x and pareto_y are both {self.pareto_x}: pick two "
                             f"metrics")
        return self


# ------------------------------------------------------------------ what is scored
def task_metrics(task) -> list[str]:
    """The metrics evaluate records for one suite task, in its order."""
    if task.type == "multiple_choice":
        return ["acc", "acc_norm"]
    if task.type == "perplexity":
        return ["perplexity", "nll_per_token", "bits_per_byte"]
    return list(task.metrics)


def scoring_plan(config: Config, suite) -> dict:
    """What a search scores and how it ranks: {"tasks": [TaskSpec], "fitness": {metric:
    weight}, "pareto": (x, y), "produced": [metric]}; a ValueError names the field when a
    metric is not one the suite produces."""
    by_name = {t.name: t for t in suite.tasks}
    unknown = [t for t in config.tasks if t not in by_name]
    if unknown:
        raise ValueError(f"field 'tasks': suite {suite.name!r} has no task "
                         f"{', '.join(map(repr, unknown))}; it has {', '.join(by_name)}")
    produced = {f"{suite.name}/{t.name}/{m}": t.name for t in suite.tasks
                for m in task_metrics(t)}
    named = list(config.fitness) + [m for m in (config.pareto_x, config.pareto_y)
                                    if m and m != FITNESS]
    for field, metrics in (("fitness", list(config.fitness)),
                           ("pareto_x", [config.pareto_x] if config.pareto_x else []),
                           ("pareto_y", [config.pareto_y] if config.pareto_y else [])):
        for metric in metrics:
            if metric != FITNESS and metric not in produced:
                raise ValueError(f"field '{field}': {metric} is not a metric of suite "
                                 f"{suite.name!r}; it produces {', '.join(produced)}")
    if config.tasks:
        tasks = [by_name[t] for t in config.tasks]
        outside = [m for m in named if produced[m] not in config.tasks]
        if outside:
            raise ValueError(f"field 'tasks': {outside[0]} is read by the fitness or the "
                             f"Pareto plot, but its task is not among tasks")
    elif config.fitness:
        wanted = {produced[m] for m in named}
        tasks = [t for t in suite.tasks if t.name in wanted]
    else:
        wanted = {produced[m] for m in named}
        tasks = [t for t in suite.tasks if t.type != "perplexity" or t.name in wanted]
    fitness = dict(config.fitness)
    if not fitness:
        mains = [f"{suite.name}/{t.name}/{task_metrics(t)[0]}" for t in tasks
                 if t.type != "perplexity"]
        if not mains:
            raise ValueError(f"field 'fitness': empty, and suite {suite.name!r} has no task "
                             f"besides perplexity to average; name the metrics and weights")
        fitness = {m: 1.0 / len(mains) for m in mains}
    firsts = list(fitness) + [FITNESS, FITNESS]
    x = config.pareto_x or firsts[0]
    y = config.pareto_y or next((m for m in firsts if m != x), "best_fitness")
    return {"tasks": tasks, "fitness": fitness, "pareto": (x, y),
            "produced": [m for m in produced if produced[m] in {t.name for t in tasks}]}


def pareto(config: Config) -> tuple[str, str]:
    """The two metrics the Jobs view plots against each other (both logged per candidate)."""
    if config.pareto_x and config.pareto_y:
        return config.pareto_x, config.pareto_y
    try:
        from plugins.evaluate.suites import load_suite

        return scoring_plan(config, load_suite(config.suite))["pareto"]
    except ValueError:  # a suite of the lab's own folder, unknown here: the given names
        x = config.pareto_x or next(iter(config.fitness), FITNESS)
        return x, config.pareto_y or (FITNESS if x != FITNESS else "best_fitness")


def lab_problems(config: Config, facts: LabFacts) -> list[str]:
    """The suite exists and parses, and the fitness and Pareto metrics are its metrics."""
    from pathlib import Path

    from plugins.evaluate.suites import SuiteError, load_items, load_suite

    problems = []
    try:
        suite = load_suite(config.suite, facts.suites_dir)
    except SuiteError as e:
        return [f"field 'suite': {e}"]
    try:
        plan = scoring_plan(config, suite)
        for task in plan["tasks"]:
            if task.type != "perplexity":
                load_items(suite, task)
    except SuiteError as e:
        problems.append(f"field 'suite': {e}")
    except ValueError as e:
        problems.append(str(e))
    if config.text_file and not Path(config.text_file).expanduser().is_file():
        problems.append(f"field 'text_file': {config.text_file} is not a file")
    if facts.gpus and config.parallel > len(facts.gpus):
        problems.append(f"field 'parallel': {config.parallel} candidates at once need as many "
                        f"GPUs; this lab has {len(facts.gpus)}")
    elif not facts.gpus and config.parallel > (os.cpu_count() or 1):
        problems.append(f"field 'parallel': {config.parallel} processes on a machine of "
                        f"{os.cpu_count()} cores; expected at most {os.cpu_count()}")
    return problems


def resources(config: Config) -> Resources:
    """One GPU per candidate scored at once (on a lab with GPUs)."""
    return Resources(gpus=config.parallel)


# ------------------------------------------------------------------------ the space
def search_space(config: Config, tensor_names: list[str], labels: list[str]):
    """The SearchSpace of a config, given the base's tensor names (for the per-layer and
    per-block scales) and the models' labels. Returns (space, scale keys)."""
    from ops.merge_search import Param, SearchSpace
    from ops.task_vectors import block_of, decoder_layers

    params = [Param(f"weight[{i}]", *config.weight_range) for i in range(len(labels))]
    if config.density_range:
        params.append(Param("density", *config.density_range))
    keys: list[str] = []
    if config.scales == "lines":
        params += [Param("lines_alpha", *config.lines_alpha_range),
                   Param("lines_beta", *config.lines_beta_range)]
    elif config.scales == "per_layer":
        layers = decoder_layers(tensor_names)
        if not layers:
            raise ValueError("scales per_layer: the base has no decoder layers its tensor "
                             "names show (model.layers.N...)")
        keys = [f"layer {i}" for i in range(layers)] + ["outside"]
    elif config.scales == "per_block":
        keys = list(dict.fromkeys(block_of(n) for n in tensor_names))
    if len(keys) > 512:
        raise ValueError(f"scales {config.scales}: {len(keys)} scales to search; at most 512")
    params += [Param(f"scale[{k}]", *config.scale_range) for k in keys]
    return SearchSpace(params), keys


def scale_function(config: Config, values: dict, layers: int):
    """scale(tensor name) of a candidate's values, or None when nothing is rescaled."""
    from ops.task_vectors import block_of, layer_of, lines_coefficient

    if config.scales == "lines":
        alpha, beta = values["lines_alpha"], values["lines_beta"]
        return lambda name: lines_coefficient(name, layers, alpha, beta)
    if config.scales == "per_layer":
        def per_layer(name):
            layer = layer_of(name)
            return values["scale[outside]" if layer is None else f"scale[layer {layer}]"]
        return per_layer
    if config.scales == "per_block":
        return lambda name: values[f"scale[{block_of(name)}]"]
    return None


def mergekit_yaml(config: Config, values: dict) -> dict:
    """The merge part of a recipe as a mergekit configuration (registry references), what
    the merge plugin would run; the scales are not mergekit's (see the metadata)."""
    entries = []
    for i, ref in enumerate(config.models):
        params = {"weight": round(values[f"weight[{i}]"], 6)}
        density = values.get("density", config.density)
        if density is not None and config.method in USES_DENSITY:
            params["density"] = round(density, 6)
        entries.append({"model": ref, "parameters": params})
    data = {"merge_method": config.method, "models": entries, "dtype": "float32"}
    if config.base_model:
        data["base_model"] = config.base_model
    return data


# ----------------------------------------------------------------------------- run
class _Quiet:
    """The evaluate plugin's task scoring logs through ctx.log; per candidate, that is noise."""

    def log(self, message: str) -> None:
        pass


def run(config: Config, ctx) -> None:
    import json
    import shutil
    import time

    from plugins.evaluate.suites import load_suite
    from plugins.merge import check_compatible

    started = time.monotonic()
    suite = load_suite(config.suite, ctx.suites_dir)
    plan = scoring_plan(config, suite)
    opened = {ref: ctx.open(ref) for ref in config.models}
    base = ctx.open(config.base_model) if config.base_model else None
    check_compatible({**opened, **({config.base_model: base} if base else {})},
                     {"tokenizer_source": None})
    ctx.progress(0.01, "inputs opened")

    from ops.checkpoint_files import tensor_headers, weight_files
    from ops.task_vectors import decoder_layers

    donor = base or opened[config.models[0]]
    names = [k for f in weight_files(donor.path) for k in tensor_headers(f)]
    space, _ = search_space(config, names, config.models)
    layers = decoder_layers(names)
    tokenizer = donor.load_tokenizer()
    setup = {"config": config.model_dump(mode="json"), "suite": str(suite.path),
             "models": [str(opened[r].path) for r in config.models],
             "base": str(base.path) if base is not None else None,
             "donor": str(donor.path), "layers": layers}
    ctx.log(f"searching {space.dim} parameters ({', '.join(space.names[:8])}"
            f"{', ...' if space.dim > 8 else ''}) with {config.strategy}, budget "
            f"{config.max_candidates} candidates"
            + (f" or {config.max_minutes:g} minutes" if config.max_minutes else "")
            + f"; fitness = " + " + ".join(f"{w:g} * {m}" for m, w in plan["fitness"].items())
            + (f" - {config.perplexity_penalty:g} * nll(text)" if config.perplexity_penalty
               else "")
            + (f"; {config.parallel} candidates at once" if config.parallel > 1 else ""))

    folder = ctx.work_dir / "candidates"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    records: list[dict] = []
    kept: list[dict] = []  # the best keep_top records, best first, with their folders
    log_file = (ctx.work_dir / "candidates.jsonl").open("w")
    deadline = started + config.max_minutes * 60 if config.max_minutes else None

    def budget_left() -> bool:
        return len(records) < config.max_candidates and \
            (deadline is None or time.monotonic() < deadline)

    def keep(index: int, values: dict, where, scores: dict, rows: list, nll) -> float:
        from ops.merge_search import fitness as fitness_of

        value = fitness_of(scores, plan["fitness"], config.perplexity_penalty, nll)
        record = {"index": index, "recipe": values, "scores": scores, "fitness": value,
                  "rows": rows, "folder": where}
        records.append(record)
        kept.append(record)
        kept.sort(key=lambda r: (-r["fitness"], r["index"]))
        for dropped in kept[config.keep_top:]:
            shutil.rmtree(dropped["folder"], ignore_errors=True)
        del kept[config.keep_top:]
        best = kept[0]["fitness"]
        ctx.metric(FITNESS, value, step=index)
        ctx.metric("best_fitness", best, step=index)
        for metric, score in scores.items():
            ctx.metric(metric, score, step=index)
        for name, v in values.items():
            ctx.metric(f"recipe/{name}", v, step=index)
        log_file.write(json.dumps({k: record[k] for k in ("index", "recipe", "scores",
                                                          "fitness")}) + "\n")
        log_file.flush()
        ctx.progress(0.02 + 0.93 * len(records) / config.max_candidates,
                     f"candidate {index + 1}/{config.max_candidates}: fitness {value:.4g} "
                     f"(best {best:.4g})")
        return value

    workers = None
    try:
        if config.parallel > 1:
            workers = _Workers(setup, config.parallel, ctx.device)
        else:
            local = _Candidates(setup, ctx.device, tokenizer=tokenizer)

        def evaluate(units) -> list[float]:
            """Score the points in order, `parallel` at a time, while the budget lasts."""
            out = []
            for start in range(0, len(units), config.parallel):
                if not budget_left():
                    break
                chunk = units[start:start + config.parallel]
                chunk = chunk[:config.max_candidates - len(records)]
                todo = [(len(records) + i, space.decode(u), folder / f"c{len(records) + i:05d}")
                        for i, u in enumerate(chunk)]
                results = workers.score(todo) if workers else \
                    [local.score(values, where) for _, values, where in todo]
                for (index, values, where), result in zip(todo, results):
                    out.append(keep(index, values, where, *result))
            return out

        if config.strategy == "grid":
            points = space.grid(config.grid_points)
            if len(points) > config.max_candidates:
                ctx.log(f"warning: the grid has {len(points)} points; max_candidates "
                        f"{config.max_candidates} scores the first ones only")
            evaluate(points[:config.max_candidates])
            popsize = None
        else:
            popsize = cma_search(config, space, evaluate, budget_left, ctx)
        log_file.close()
        if not records:
            raise ValueError("max_minutes ran out before the first candidate was scored")
        register(config, kept, records, plan, opened, base, tokenizer, space, popsize,
                 started, ctx)
    finally:
        if workers is not None:
            workers.close()
        log_file.close()
        shutil.rmtree(folder, ignore_errors=True)
    ctx.progress(1.0, f"best fitness {kept[0]['fitness']:.4g} after {len(records)} candidates")


def cma_search(config: Config, space, evaluate, budget_left, ctx) -> int:
    """CMA-ES (Hansen's `cma`) over the unit cube, minimizing -fitness, until the budget is
    spent; a generation cut short by the budget is scored but not told. Returns the
    population size."""
    import warnings

    with warnings.catch_warnings():  # cma warns that matplotlib (its plots) is missing
        warnings.simplefilter("ignore")
        import cma

    from ops.merge_search import default_popsize

    popsize = config.population or default_popsize(space.dim, config.max_candidates)
    options = {"bounds": [0.0, 1.0], "BoundaryHandler": cma.BoundTransform,
               "popsize": popsize, "seed": config.seed + 1,  # cma: seed 0 means "from time"
               "verbose": -9, "verb_log": 0, "verb_disp": 0, "tolflatfitness": 10 ** 9,
               "tolfun": 0, "tolfunhist": 0, "tolx": 1e-12}
    es = cma.CMAEvolutionStrategy(space.center(), config.sigma, options)
    ctx.log(f"CMA-ES ({cma.__version__}): population {popsize}, sigma {config.sigma:g}, "
            f"seed {config.seed}")
    generation = 0
    while budget_left():
        solutions = es.ask()
        losses = [-f for f in evaluate([list(x) for x in solutions])]
        if len(losses) < len(solutions):
            break  # the budget ran out inside this generation: scored, not told
        es.tell(solutions, losses)
        generation += 1
        ctx.log(f"generation {generation}: best {-min(losses):.4g}, sigma {es.sigma:.3g}")
    return popsize


def merge_candidate(config: Config, values: dict, models: list, base, where,
                    layers: int) -> None:
    """Merge one recipe into `where` with the native engine (float32), then rescale its task
    vector per layer or block when the config searches scales."""
    from pathlib import Path

    from ops.checkpoint_files import weight_files
    from ops.merge import stream_merge
    from ops.merge_search import rescale_merge

    weights = [values[f"weight[{i}]"] for i in range(len(config.models))]
    density = values.get("density", config.density)
    densities = [density] * len(weights) if density is not None else None
    stream_merge(config.method, models, base, weights=weights,
                 densities=densities, out_dir=where, dtype="float32", seed=config.seed,
                 device="cpu")
    scale = scale_function(config, values, layers)
    if scale is not None:
        staging = where / ".scaled"
        staging.mkdir()
        merged = weight_files(where)
        rescale_merge(weight_files(Path(base)), merged, staging, scale)
        for file in merged:
            os.replace(staging / file.name, file)
        staging.rmdir()


class _Candidates:
    """Merges and scores candidates: the merge by the native engine, then the evaluate
    plugin's task scoring on the model loaded once, and the perplexity of the general text
    for the penalty. Built from plain data (`setup`), so a worker process builds its own."""

    def __init__(self, setup: dict, device: str, tokenizer=None):
        from pathlib import Path

        from transformers.utils import logging as hf_logging

        from plugins.evaluate import Config as EvaluateConfig, perplexity_job, suite_job
        from plugins.evaluate.suites import load_suite
        from plugins.kit.assets import DEMO_HELDOUT

        hf_logging.disable_progress_bar()  # a "Loading weights" bar per candidate is noise
        self.config = config = Config.model_validate(setup["config"])
        self.setup, self.device = setup, device
        suite = load_suite(setup["suite"])
        plan = scoring_plan(config, suite)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(setup["donor"])
        self.tokenizer = tokenizer
        evaluate = EvaluateConfig(checkpoint="candidate", suite=setup["suite"],
                                  limit=config.limit, batch_size=config.batch_size,
                                  reuse_scores=False)
        self.jobs = [suite_job(evaluate, suite, task, "float32") for task in plan["tasks"]]
        self.text = None
        if config.perplexity_penalty:
            path = Path(config.text_file).expanduser() if config.text_file else DEMO_HELDOUT
            self.text = perplexity_job(evaluate, path, f"ppl:{path.name}", 256, 128,
                                        config.perplexity_tokens, "float32")

    def score(self, values: dict, folder) -> tuple[dict, list, Optional[float]]:
        """Merge `values` into `folder` and score it: ({metric: value}, [(task, metric,
        value, stderr, details)], nll or None)."""
        import gc

        import torch
        from transformers import AutoModelForCausalLM

        from plugins.evaluate import check_finite_weights

        merge_candidate(self.config, values, self.setup["models"], self.setup["base"], folder,
                        self.setup["layers"])
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        model.to(self.device).eval()
        try:
            check_finite_weights(model, folder.name)
            quiet, rows = _Quiet(), []
            for label, key, compute in self.jobs:
                for task, metric, value, stderr, details in compute(
                        model, self.tokenizer, lambda done, total: None, quiet):
                    rows.append((task, metric, value, stderr,
                                 {**details, "dtype": "float32", "key": key}))
            nll = None
            if self.text is not None:
                for _, metric, value, _, _ in self.text[2](model, self.tokenizer,
                                                           lambda d, t: None, quiet):
                    if metric == "nll_per_token":
                        nll = value
        finally:
            del model
            gc.collect()
        broken = [f"{t}/{m} = {v}" for t, m, v, _, _ in rows if not math.isfinite(v)]
        if nll is not None and not math.isfinite(nll):
            broken.append(f"text_file nll_per_token = {nll}")
        if broken:
            raise ValueError(f"candidate {folder.name}: scores are not finite "
                             f"({', '.join(broken)})")
        return {f"{t}/{m}": float(v) for t, m, v, _, _ in rows}, rows, nll


_WORKER: Optional[_Candidates] = None  # in a worker process: its _Candidates


def _start_worker(setup: dict, device: str, threads: int) -> None:
    global _WORKER
    import torch

    if threads:
        torch.set_num_threads(threads)
    _WORKER = _Candidates(setup, device)


def _score_in_worker(values: dict, folder) -> tuple:
    return _WORKER.score(values, folder)


class _Workers:
    """`parallel` worker processes (spawned: no CUDA or thread state inherited), each with
    its own _Candidates and device: cuda:i on a job given GPUs, else the CPU, the cores
    shared among them. Candidates go round-robin, results come back in order."""

    def __init__(self, setup: dict, parallel: int, device: str):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        spawn = multiprocessing.get_context("spawn")
        threads = 0 if device.startswith("cuda") else max(1, (os.cpu_count() or 1) // parallel)
        self.pools = [ProcessPoolExecutor(
            max_workers=1, mp_context=spawn, initializer=_start_worker,
            initargs=(setup, f"cuda:{i}" if device.startswith("cuda") else "cpu", threads))
            for i in range(parallel)]

    def score(self, todo: list) -> list:
        futures = [self.pools[i % len(self.pools)].submit(_score_in_worker, values, where)
                   for i, (_, values, where) in enumerate(todo)]
        return [f.result() for f in futures]

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=True, cancel_futures=True)


def register(config: Config, kept: list, records: list, plan: dict, opened: dict, base,
             tokenizer, space, popsize, started: float, ctx) -> None:
    """The best keep_top candidates as merge checkpoints (the best first), each with the
    lineage the merge plugin records and the recipe, scores and search in its metadata."""
    import shutil
    import time

    import yaml

    from plugins.kit.metrics import better, pareto_front

    x, y = plan["pareto"]
    points = [(r["scores"].get(x, r["fitness"]) if x != FITNESS else r["fitness"],
               r["scores"].get(y, r["fitness"]) if y != FITNESS else r["fitness"])
              for r in records]
    # the directions the Jobs view uses too (a perplexity axis is better lower)
    on = pareto_front(points, "higher" if x == FITNESS else better(x),
                      "higher" if y == FITNESS else better(y))
    front = sorted((i for i, o in enumerate(on) if o), key=lambda i: points[i])
    search = {"strategy": config.strategy, "candidates": len(records),
              "population": popsize, "seed": config.seed, "parameters": space.names,
              "fitness": plan["fitness"], "perplexity_penalty": config.perplexity_penalty,
              "pareto": {"x": x, "y": y, "front": front},
              "minutes": round((time.monotonic() - started) / 60, 3)}
    for rank, record in enumerate(kept, 1):
        values = record["recipe"]
        parents = []
        for i, ref in enumerate(config.models):
            edge = {"checkpoint": opened[ref], "role": "model",
                    "weight": float(values[f"weight[{i}]"])}
            density = values.get("density", config.density)
            if density is not None:
                edge["density"] = float(density)
            parents.append(edge)
        if base is not None:
            parents.append({"checkpoint": base, "role": "base"})
        recipe_yaml = mergekit_yaml(config, values)
        name = config.name or f"merge_search-{config.method}"
        out = ctx.new_checkpoint(
            "merge", parents=parents, name=name if rank == 1 else f"{name}-top{rank}",
            metadata={"mergekit_yaml": yaml.safe_dump(recipe_yaml, sort_keys=False),
                      "merge_method": config.method, "engine": "native", "warnings": [],
                      "recipe": values, "scales": config.scales, "scores": record["scores"],
                      "fitness": record["fitness"], "candidate": record["index"],
                      "rank": rank, "search": search})
        for file in record["folder"].iterdir():
            shutil.move(str(file), str(out.path / file.name))
        tokenizer.save_pretrained(str(out.path))
        if config.scales == "none":  # the merge is exactly this mergekit configuration
            resolved = {**recipe_yaml, "models": [
                {**e, "model": str(opened[e["model"]].path)} for e in recipe_yaml["models"]]}
            if base is not None:
                resolved["base_model"] = str(base.path)
            (out.path / "mergekit_config.yml").write_text(yaml.safe_dump(resolved,
                                                                         sort_keys=False))
        for task, metric, value, stderr, details in record["rows"]:
            ctx.evaluation(out, task, metric, value, stderr, details=details)
        ctx.log(f"#{rank}: candidate {record['index']}, fitness {record['fitness']:.4g}, "
                f"recipe " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    ctx.log(f"Pareto front ({x} vs {y}): candidates {front}")


PLUGIN = Plugin(
    name="merge_search",
    order=35,
    title="Merge search",
    description="Search a merge recipe (weights, densities, per-layer LiNeS or per-block "
                "scales) with CMA-ES: each candidate merged natively and scored on a local "
                "suite; the best registered as a merge, every candidate's scores kept.",
    Config=Config,
    run=run,
    lab_problems=lab_problems,
    pareto=pareto,
    resources=resources,
)
