"""merge_search (issue 24): the search space, grid and Pareto front (ops/merge_search.py), the
Config's checks, a search run in-process on tiny models (scales, seeds, budgets, what is
kept) and one run as a lab job; the demo's grid-vs-CMA comparison is marked slow."""

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import plugins
from ops.merge_search import Param, SearchSpace, default_popsize, fitness
from plugins.kit.metrics import pareto_front
from plugins import ConfigError, LabFacts, validate_config

REPO = Path(__file__).resolve().parent.parent
CAP, SUMS = "demo/capitals/acc", "demo/sums/exact_match"


def plugin():
    return plugins.get("merge_search")


def config(**kw):
    base = {"models": ["ft-a", "ft-b"], "base_model": "base", "fitness": {CAP: 0.5, SUMS: 0.5},
            "max_candidates": 6}
    return validate_config(plugin(), {**base, **kw})


# ------------------------------------------------------------------------------ ops
def test_space_decodes_encodes_clips_and_grids():
    space = SearchSpace([Param("w0", 0.0, 2.0), Param("d", 0.2, 1.0)])
    assert space.decode([0.5, 0.0]) == {"w0": 1.0, "d": 0.2}
    assert space.decode([1.7, -3]) == {"w0": 2.0, "d": 0.2}  # clipped into the box
    assert space.encode({"w0": 0.5, "d": 1.0}) == [0.25, 1.0]
    grid = space.grid(5)
    assert len(grid) == 25 and grid[0] == [0.0, 0.0] and grid[-1] == [1.0, 1.0]
    assert sorted({space.decode(p)["w0"] for p in grid}) == [0.0, 0.5, 1.0, 1.5, 2.0]
    with pytest.raises(ValueError, match="low < high"):
        Param("w", 1.0, 1.0)
    with pytest.raises(ValueError, match="at most"):
        SearchSpace([Param(f"p{i}", 0, 1) for i in range(20)]).grid(5)
    with pytest.raises(ValueError, match="repeat"):
        SearchSpace([Param("a", 0, 1), Param("a", 0, 1)])


def test_pareto_front_keeps_the_non_dominated_points():
    points = [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.4, 0.4), (0.5, 0.5), (0.9, 0.1),
              (0.9, 0.05), (float("nan"), 2.0)]
    on = pareto_front(points)
    assert {i for i, o in enumerate(on) if o} == {2, 0, 4, 5, 1}
    lower = pareto_front(points, "lower", "lower")
    assert {i for i, o in enumerate(lower) if o} == {2, 3, 6, 1}


def test_fitness_is_the_weighted_sum_minus_the_penalty():
    scores = {"a": 0.5, "b": 1.0}
    assert fitness(scores, {"a": 0.5, "b": 0.5}) == 0.75
    assert math.isclose(fitness(scores, {"a": 1.0}, 0.1, nll=2.0), 0.3)
    with pytest.raises(ValueError, match="reads c"):
        fitness(scores, {"c": 1.0})
    assert default_popsize(2, 16) == 5 and default_popsize(2, 100) == 6
    assert default_popsize(30, 12) == 4 and default_popsize(2, 3) == 3


# ---------------------------------------------------------------------------- Config
@pytest.mark.parametrize("change, message", [
    ({"models": ["a"]}, "1 models given; a search merges 2 to 8"),
    ({"models": [f"m{i}" for i in range(9)]}, "9 models given"),
    ({"models": ["a", "a"]}, "listed twice"),
    ({"weight_range": [1.0, 0.5]}, "low < high"),
    ({"weight_range": [0.0, 50.0]}, "within [-10, 10]"),
    ({"weight_range": [0.0]}, "weight_range"),
    ({"method": "ties", "density_range": [0.0, 0.5]}, "densities lie in (0, 1]"),
    ({"density_range": [0.2, 0.8]}, "read by ties, dare_ties, dare_linear only"),
    ({"base_model": None}, "needs a base_model"),
    ({"method": "linear"}, "leave base_model empty"),
    ({"method": "linear", "base_model": None, "scales": "lines"}, "method linear has not"),
    ({"fitness": {CAP: 0.0}}, "every weight is 0"),
    ({"fitness": {"capitals": 1.0}}, "expected SUITE/TASK/METRIC"),
    ({"fitness": {CAP: float("inf")}}, "finite"),
    ({"keep_top": 7}, "keep_top (7) exceeds max_candidates (6)"),
    ({"pareto_x": CAP, "pareto_y": CAP}, "pick two metrics"),
    ({"base_model": "ft-a"}, "also among models"),
    ({"max_candidates": 1}, "max_candidates"),
])
def test_config_refuses_what_cannot_run_naming_the_field(change, message):
    with pytest.raises(ConfigError) as e:
        config(**change)
    assert message in str(e.value)


def test_lab_problems_check_metrics_and_tasks_against_the_suite():
    facts = LabFacts()
    assert plugin().problems_in_lab(config(), facts) == []
    problems = plugin().problems_in_lab(config(fitness={"demo/capitals/f1": 1.0}), facts)
    assert problems and "field 'fitness': demo/capitals/f1 is not a metric of suite" in \
        problems[0] and "demo/capitals/acc" in problems[0]
    problems = plugin().problems_in_lab(config(tasks=["capitals", "nope"]), facts)
    assert "field 'tasks'" in problems[0] and "'nope'" in problems[0]
    problems = plugin().problems_in_lab(config(tasks=["capitals"]), facts)
    assert "demo/sums/exact_match is read by the fitness" in problems[0]
    problems = plugin().problems_in_lab(config(suite="no-such-suite"), facts)
    assert problems[0].startswith("field 'suite'")


def test_pareto_hook_names_the_metrics_the_job_logs():
    assert plugin().pareto(config()) == (CAP, SUMS)
    assert plugin().pareto(config(pareto_y="fitness")) == (CAP, "fitness")
    default = config(fitness={})  # the demo suite's non-perplexity tasks, averaged
    assert plugin().pareto(default) == (CAP, "demo/colours/acc")


# ------------------------------------------------------------------ runs on tiny models
@pytest.fixture(scope="module")
def tiny_family(tiny_model_dir, tmp_path_factory):
    """A tiny base and two 'fine-tunes' of it (the base plus two different seeded
    perturbations), saved with the tokenizer like registry checkpoints."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("family")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = {"base": tiny_model_dir}
    for seed, name in ((1, "ft-a"), (2, "ft-b")):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


@dataclass
class Opened:
    id: str
    name: str
    path: Path
    kind: str = "model"
    metadata: dict = field(default_factory=dict)

    def config(self):
        return json.loads((self.path / "config.json").read_text())

    def load_tokenizer(self, **kw):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path))


@dataclass
class Pending:
    path: Path
    name: str
    relation: str
    parents: list
    metadata: dict


class FakeCtx:
    """The job context, in memory: what run() logged, measured and registered."""

    def __init__(self, tmp: Path, family: dict):
        self.work_dir, self.family, self.tmp = tmp / "job", family, tmp
        self.work_dir.mkdir(parents=True)
        self.device, self.suites_dir = "cpu", tmp / "suites"
        self.metrics, self.messages, self.made, self.scores = [], [], [], []

    def open(self, ref):
        return Opened(id=f"ck-{ref}", name=ref, path=Path(self.family[ref]))

    def log(self, message):
        self.messages.append(message)

    def progress(self, fraction, message=""):
        self.messages.append(f"progress {fraction:.2f} {message}")

    def metric(self, name, value, step=None):
        self.metrics.append((name, value, step))

    def evaluation(self, ck, task, metric, value, stderr=None, details=None):
        self.scores.append((ck.name, task, metric, value, details))

    def new_checkpoint(self, relation, parents, name=None, metadata=None, intermediate=False):
        path = self.tmp / f"out{len(self.made)}"
        path.mkdir()
        self.made.append(Pending(path, name, relation, parents, metadata or {}))
        return self.made[-1]

    def series(self, name):
        return [(s, v) for n, v, s in self.metrics if n == name]


def search(tmp_path, family, **kw):
    ctx = FakeCtx(tmp_path, family)
    cfg = config(limit=4, **kw)
    plugin().run(cfg, ctx)
    return ctx


def test_search_scores_every_candidate_and_registers_the_best_as_a_merge(tmp_path,
                                                                          tiny_family):
    ctx = search(tmp_path, tiny_family, max_candidates=5, keep_top=2)
    fit = ctx.series("fitness")
    assert [s for s, _ in fit] == list(range(5))  # one fitness per candidate, step = index
    for name in (CAP, SUMS, "demo/capitals/acc_norm", "recipe/weight[0]", "recipe/weight[1]",
                 "best_fitness"):
        assert len(ctx.series(name)) == 5, name
    for (_, c), (_, s), (_, f) in zip(ctx.series(CAP), ctx.series(SUMS), fit):
        assert math.isclose(f, 0.5 * c + 0.5 * s)
    assert all(0.0 <= v <= 1.5 for _, v in ctx.series("recipe/weight[0]"))
    best, second = ctx.made
    assert best.relation == "merge" and best.name == "merge_search-task_arithmetic"
    assert second.name.endswith("-top2")
    assert best.metadata["fitness"] == max(v for _, v in fit) >= second.metadata["fitness"]
    assert [(p["role"], p["checkpoint"].name) for p in best.parents] == \
        [("model", "ft-a"), ("model", "ft-b"), ("base", "base")]
    assert best.parents[0]["weight"] == best.metadata["recipe"]["weight[0]"]
    assert best.metadata["search"]["candidates"] == 5
    assert best.metadata["mergekit_yaml"].startswith("merge_method: task_arithmetic")
    for out in (best, second):  # a whole checkpoint: weights, config, tokenizer
        assert (out.path / "config.json").is_file() and (out.path / "tokenizer.json").is_file()
        assert list(out.path.glob("*.safetensors"))
    assert {(t, m) for ck, t, m, _, _ in ctx.scores if ck == best.name} >= \
        {("demo/capitals", "acc"), ("demo/sums", "exact_match")}
    assert not (ctx.work_dir / "candidates").exists()  # no candidate folder is left
    lines = (ctx.work_dir / "candidates.jsonl").read_text().splitlines()
    assert len(lines) == 5 and set(json.loads(lines[0])) == {"index", "recipe", "scores",
                                                            "fitness"}
    assert any("candidate 5/5: fitness" in m and "(best" in m for m in ctx.messages)


def test_the_best_merge_is_the_recipe_merged_again(tmp_path, tiny_family):
    """The registered weights are the best recipe's merge: task arithmetic with its weights,
    recomputed here from the inputs."""
    import torch
    from safetensors.torch import load_file

    ctx = search(tmp_path, tiny_family, max_candidates=2)
    (best,) = ctx.made
    w = best.metadata["recipe"]
    merged = load_file(next(best.path.glob("*.safetensors")))
    tensors = [load_file(next(Path(tiny_family[n]).glob("*.safetensors")))
               for n in ("base", "ft-a", "ft-b")]
    name = "model.layers.0.mlp.up_proj.weight"
    b, a, c = (t[name].float() for t in tensors)
    expect = b + w["weight[0]"] * (a - b) + w["weight[1]"] * (c - b)
    assert torch.allclose(merged[name], expect, atol=1e-5)


def test_same_seed_same_candidates_other_seed_others(tmp_path, tiny_family):
    runs = [search(tmp_path / str(i), tiny_family, max_candidates=3, seed=seed)
            for i, seed in enumerate((3, 3, 4))]
    weights = [r.series("recipe/weight[0]") for r in runs]
    assert weights[0] == weights[1] and weights[0] != weights[2]


def test_scales_lines_and_per_block_search_their_own_parameters(tmp_path, tiny_family):
    import torch
    from safetensors.torch import load_file

    ctx = search(tmp_path / "lines", tiny_family, method="ties", density_range=[0.3, 0.9],
                 scales="lines", max_candidates=3)
    (best,) = ctx.made
    assert set(best.metadata["recipe"]) == {"weight[0]", "weight[1]", "density",
                                            "lines_alpha", "lines_beta"}
    assert best.parents[0]["density"] == best.metadata["recipe"]["density"]
    assert not (best.path / "mergekit_config.yml").exists()  # scales are not mergekit's
    ctx = search(tmp_path / "blocks", tiny_family, scales="per_block", max_candidates=2,
                 scale_range=[0.0, 0.001])
    (best,) = ctx.made
    blocks = [k for k in best.metadata["recipe"] if k.startswith("scale[")]
    assert "scale[model.layers.0.mlp]" in blocks and "scale[model.embed_tokens]" in blocks
    # scales near 0: the merge is (almost) the base
    merged = load_file(next(best.path.glob("*.safetensors")))
    base = load_file(next(Path(tiny_family["base"]).glob("*.safetensors")))
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.allclose(merged[name], base[name], atol=1e-3)


def test_grid_strategy_scores_the_grid_in_order(tmp_path, tiny_family):
    ctx = search(tmp_path, tiny_family, strategy="grid", grid_points=2, max_candidates=4)
    assert [v for _, v in ctx.series("recipe/weight[0]")] == [0.0, 0.0, 1.5, 1.5]
    assert [v for _, v in ctx.series("recipe/weight[1]")] == [0.0, 1.5, 0.0, 1.5]


def test_perplexity_penalty_lowers_the_fitness_by_the_text_nll(tmp_path, tiny_family):
    text = tmp_path / "general.txt"
    text.write_text((REPO / "assets" / "demo" / "heldout.txt").read_text()[:2000])
    plain = search(tmp_path / "a", tiny_family, max_candidates=2, seed=5)
    penal = search(tmp_path / "b", tiny_family, max_candidates=2, seed=5,
                   perplexity_penalty=0.1, text_file=str(text))
    for (_, f0), (_, f1) in zip(plain.series("fitness"), penal.series("fitness")):
        assert 0.1 * math.log(4) < f0 - f1 < 0.1 * 12  # nll of a 400-token vocabulary


@pytest.mark.slow
def test_parallel_workers_score_the_same_candidates(tmp_path, tiny_family):
    """parallel: 2 worker processes give the candidates (and scores) one process gives."""
    one = search(tmp_path / "one", tiny_family, max_candidates=4, seed=7)
    two = search(tmp_path / "two", tiny_family, max_candidates=4, seed=7, parallel=2)
    for name in ("recipe/weight[0]", "fitness", CAP, SUMS):
        assert one.series(name) == two.series(name), name
    assert two.made[0].metadata["fitness"] == one.made[0].metadata["fitness"]


def test_parallel_is_checked_against_the_lab():
    cfg = config(parallel=3)
    assert "3 candidates at once need as many GPUs; this lab has 2" in \
        plugin().problems_in_lab(cfg, LabFacts(gpus=(0, 1)))[0]
    assert plugin().needs(cfg).gpus == 3


@pytest.mark.slow
def test_merge_search_runs_as_a_lab_job(lab, tiny_family):
    """Through the app: submit (checks), the worker, the job's metrics, the registry."""
    from app import jobs
    from tests.test_jobs import run_to_end

    job = jobs.submit(lab, "merge_search", {
        "models": [str(tiny_family["ft-a"]), str(tiny_family["ft-b"])],
        "base_model": str(tiny_family["base"]), "fitness": {CAP: 0.5, SUMS: 0.5},
        "max_candidates": 4, "limit": 4, "name": "searched"})
    assert run_to_end(lab, job["id"], timeout=300) == "succeeded"
    with lab.registry() as reg:
        ck = reg.find_checkpoint("searched")
        assert ck["relation"] == "merge" and ck["job_id"] == job["id"]
        roles = sorted((p["role"] or "") for p in reg.parents(ck["id"]))
        assert roles == ["base", "model", "model"]
        metrics = [m for m in reg.metrics(job["id"]) if m["name"] == "fitness"]
        assert sorted(m["step"] for m in metrics) == [0, 1, 2, 3]
    with pytest.raises(Exception, match="not a metric of suite"):
        jobs.submit(lab, "merge_search", {
            "models": [str(tiny_family["ft-a"]), str(tiny_family["ft-b"])],
            "base_model": str(tiny_family["base"]), "fitness": {"demo/capitals/f1": 1.0}})


# ------------------------------------------------------------- the demo: grid vs CMA-ES
DEMO_SEARCH = {"models": ["demo-ft-capitals", "demo-ft-sums"], "base_model": "demo-base",
               "method": "task_arithmetic", "weight_range": [0.0, 1.5],
               "fitness": {CAP: 0.5, SUMS: 0.5}}
GRID = {**DEMO_SEARCH, "strategy": "grid", "grid_points": 5, "max_candidates": 25,
        "name": "demo-grid-best"}
CMA = {**DEMO_SEARCH, "strategy": "cma", "max_candidates": 16, "seed": 0,
       "name": "demo-cma-best"}


def best_of(lab, job_id):
    with lab.registry() as reg:
        fit = [m for m in reg.metrics(job_id) if m["name"] == "fitness"]
    return max(m["value"] for m in fit), len(fit)


@pytest.mark.slow
def test_cma_on_the_demo_matches_the_best_of_a_5x5_grid_in_fewer_evaluations(lab,
                                                                              demo_model_dir):
    """Issue 24's check: a search over the demo's two skill fine-tunes (task arithmetic,
    weights in [0, 1.5], fitness the mean of the two skill accuracies) by CMA-ES finds a
    recipe at least as good as the best of the 5x5 grid over the same ranges, in fewer
    evaluations. The fine-tunes are the demo's (app/demo.py skill_config) of the demo base
    (the session's demo_model_dir, shared with other tests): about 10 minutes on 2 cores
    beside the base (two fine-tunes, 41 candidates); 20 on a loaded machine."""
    from app import jobs
    from app.demo import DEMO_NAME, SKILLS, skill_config
    from app.checkpoints import import_checkpoint
    from tests.test_jobs import run_to_end

    with lab.registry() as reg:
        import_checkpoint(lab, reg, str(demo_model_dir), name=DEMO_NAME)
    for name in SKILLS:
        job = jobs.submit(lab, "train", skill_config(name, DEMO_NAME))
        assert run_to_end(lab, job["id"], timeout=1800) == "succeeded"
    found = {}
    for label, cfg in (("grid", GRID), ("cma", CMA)):
        job = jobs.submit(lab, "merge_search", cfg)
        assert run_to_end(lab, job["id"], timeout=1800) == "succeeded"
        found[label] = best_of(lab, job["id"])
    print(f"grid: best fitness {found['grid'][0]:.4f} in {found['grid'][1]} evaluations; "
          f"CMA-ES: {found['cma'][0]:.4f} in {found['cma'][1]}")
    assert found["grid"][1] == 25 and found["cma"][1] == 16
    assert found["cma"][0] >= found["grid"][0]
    with lab.registry() as reg:
        ck = reg.find_checkpoint("demo-cma-best")
        assert ck["relation"] == "merge"
        assert {p["parent_name"] for p in reg.parents(ck["id"])} == \
            {DEMO_NAME, *SKILLS}
