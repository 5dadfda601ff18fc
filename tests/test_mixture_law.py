"""mixture_law: the D-CPT law's fit recovers a known law, the ratio prediction meets its
target, a 3 x 3 grid of demo runs predicts a held-out run, and the job caches its cells, plots
data and fit, and offers the predicted continue_pretrain job."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from ops.mixture_law import (DOMAIN_BOUNDS, GENERAL_BOUNDS, Law, LawError, fit_law,
                             predict_ratio)
from tests.conftest import REPO

TRUE_DOMAIN = Law(E=1.2, B=0.8, eta=0.6, beta=0.5, C=0.3, gamma=0.7, eps=0.1, d_ref=1e5)
TRUE_GENERAL = Law(E=2.0, B=-0.3, eta=0.4, beta=0.3, C=0.2, gamma=0.8, eps=0.1, d_ref=1e5)


def grid_points(law, noise, seed=1):
    r = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    d = np.array([2e4, 4e4, 8e4, 1.6e5, 3.2e5])
    rr, dd = (a.ravel() for a in np.meshgrid(r, d))
    rng = np.random.default_rng(seed)
    return dd, rr, law(dd, rr) * (1 + noise * rng.standard_normal(rr.size))


def b_at(law, d_ref):
    """B expressed for another D_ref: B (D/D_ref)^-beta is the same term."""
    return law.B * (law.d_ref / d_ref) ** law.beta


# ---------------------------------------------------------------------------- the fit
@pytest.mark.parametrize("truth,bounds", [(TRUE_DOMAIN, DOMAIN_BOUNDS),
                                          (TRUE_GENERAL, GENERAL_BOUNDS)])
def test_fit_recovers_a_synthetic_law(truth, bounds):
    d, r, loss = grid_points(truth, noise=0.002)  # 0.2% multiplicative noise, 25 points
    fit = fit_law(d, r, loss, eps=truth.eps, bounds=bounds, starts=12, seed=0)
    for name in ("E", "eta", "beta", "C", "gamma"):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=0.1, abs=0.03), \
            name
    assert b_at(fit, truth.d_ref) == pytest.approx(truth.B, rel=0.1)
    assert fit.max_rel_error < 0.01 and fit.points == 25
    # and it predicts a point it never saw (a ratio and a D between the grid's)
    assert float(fit(1.2e5, 0.4)) == pytest.approx(float(truth(1.2e5, 0.4)), rel=0.005)


def test_fit_refuses_too_few_or_bad_points():
    with pytest.raises(LawError, match="cannot fit 6 parameters"):
        fit_law([1, 2, 3], [0.1, 0.2, 0.3], [1, 1, 1])
    d, r, loss = grid_points(TRUE_DOMAIN, 0.0)
    with pytest.raises(LawError, match=r"ratio r must lie in \[0, 1\]"):
        fit_law(d, r + 1, loss)
    with pytest.raises(LawError, match="every loss must be > 0"):
        fit_law(d, r, -loss)
    with pytest.raises(LawError, match="at least two ratios"):
        fit_law(d, np.full_like(r, 0.5), loss)


def test_prediction_meets_the_general_budget_with_the_lowest_domain_loss():
    tokens = 1e5
    base_general = float(TRUE_GENERAL(tokens, 0.9))  # the general loss at 90% replay
    pred = predict_ratio(TRUE_DOMAIN, TRUE_GENERAL, tokens, base_general_loss=base_general,
                         max_general_ppl_increase=0.05, low=0.0, high=0.9)
    limit = base_general + math.log(1.05)
    assert pred.feasible and pred.general_limit == pytest.approx(limit)
    assert pred.general_loss <= limit
    # brute force on a fine grid: the same ratio (within one grid step) is the best feasible
    replay = np.linspace(0, 0.9, 9001)
    ok = TRUE_GENERAL(tokens, replay) <= limit
    best = replay[ok][np.argmin(TRUE_DOMAIN(tokens, 1 - replay[ok]))]
    assert pred.replay_ratio == pytest.approx(best, abs=0.006)
    assert pred.domain_loss == pytest.approx(float(TRUE_DOMAIN(tokens, 1 - best)), rel=1e-3)
    # a budget nothing meets: not feasible, and the closest ratio is returned
    none = predict_ratio(TRUE_DOMAIN, TRUE_GENERAL, tokens, base_general_loss=1.0,
                         max_general_ppl_increase=0.0, low=0.0, high=0.9)
    assert not none.feasible
    # the other objective: lowest general loss reaching a domain perplexity
    target = math.exp(float(TRUE_DOMAIN(tokens, 0.6)))
    other = predict_ratio(TRUE_DOMAIN, TRUE_GENERAL, tokens,
                          objective="general_within_domain_target", domain_ppl_target=target)
    assert other.feasible and other.domain_loss <= math.log(target) + 1e-12
    with pytest.raises(LawError, match="is not one of"):
        predict_ratio(TRUE_DOMAIN, TRUE_GENERAL, tokens, objective="cheapest")


# ------------------------------------------------------------------------- the config
@pytest.mark.parametrize("extra,message", [
    ({"replay_ratios": [0.1, 0.5], "step_grid": [10, 20, 40]}, "gives 6 runs"),
    ({"replay_ratios": [0.1, 0.1, 0.5]}, "must be distinct"),
    ({"replay_ratios": [0.1, 0.95, 0.5]}, r"must lie in \[0, 0.9\]"),
    ({"step_grid": [0, 10, 20]}, r"must lie in \[1, 100000\]"),
    ({"objective": "general_within_domain_target"}, "needs domain_ppl_target"),
])
def test_bad_grids_and_targets_are_refused_by_field(extra, message):
    import plugins
    from plugins import ConfigError

    with pytest.raises(ConfigError, match=message):
        plugins.validate_config(plugins.get("mixture_law"),
                                {"checkpoint": "ck-12345678", "data": "d.txt",
                                 "replay_data": "g.txt", **extra})


# -------------------------------------------------------------------- runs on a model
class FakeContext:
    """Just what mixture_law uses of the job context, recorded for the test."""

    job_id, rank, world_size, is_main_process, device = "job-test", 0, 1, True, "cpu"

    def __init__(self, root: Path):
        self.cache_dir, self.work_dir = root / "cache", root / "work"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.logs, self.metrics, self.suggestions = [], [], []

    def log(self, message):
        self.logs.append(str(message))

    def progress(self, *args, **kwargs):
        pass

    def metric(self, name, value, step=None):
        self.metrics.append((name, float(value), step))

    def suggest(self, plugin, config, label):
        self.suggestions.append((plugin, config, label))

    def open(self, ref):
        from app.context import OpenCheckpoint

        return OpenCheckpoint(id=str(ref), name=Path(ref).name, path=Path(ref))


ARITHMETIC = re.compile(r"^(zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|"
                        r"twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|"
                        r"nineteen|twenty) (plus|minus) ")


@pytest.fixture(scope="module")
def demo_texts(tmp_path_factory):
    """Domain: the demo corpus's arithmetic paragraphs; general: its other paragraphs (the
    stories and facts); held out: the same split of the demo held-out text."""
    out = tmp_path_factory.mktemp("mixture-data")
    corpus = (REPO / "assets" / "demo" / "corpus.txt").read_text().split("\n\n")
    held = (REPO / "assets" / "demo" / "heldout.txt").read_text().split("\n\n")
    files = {"domain.txt": [p for p in corpus if ARITHMETIC.match(p)][:600],
             "general.txt": [p for p in corpus if not ARITHMETIC.match(p)][:600],
             "domain_eval.txt": [p for p in held if ARITHMETIC.match(p)],
             "general_eval.txt": [p for p in held if not ARITHMETIC.match(p)]}
    for name, paragraphs in files.items():
        (out / name).write_text("\n\n".join(paragraphs) + "\n")
    return out


def demo_config(model_dir, texts, **extra):
    return {"checkpoint": str(model_dir), "data": str(texts / "domain.txt"),
            "replay_data": str(texts / "general.txt"),
            "domain_eval_file": str(texts / "domain_eval.txt"),
            "general_eval_file": str(texts / "general_eval.txt"), **extra}


def test_job_plots_data_and_fit_offers_the_prediction_and_reuses_cells(lab, tiny_model_dir,
                                                                      demo_texts):
    """A 3 x 3 grid on the tiny model as a lab job: data and fit series per ratio, the
    prediction as metrics and as a continue_pretrain suggestion, no checkpoint; a second job
    with one more ratio and keep_runs trains (and registers) only the 3 new cells."""
    from tests.test_train import run_job

    config = demo_config(tiny_model_dir, demo_texts, replay_ratios=[0.1, 0.4, 0.7],
                         step_grid=[2, 4, 8], block_size=32, batch_size=4,
                         max_learning_rate=5e-3, min_learning_rate=5e-4, eval_blocks=4,
                         max_general_ppl_increase=10.0, fit_starts=4)
    status, job, made = run_job(lab, config, plugin="mixture_law")
    assert status == "succeeded", job["error"]
    assert made == []  # keep_runs is off: no checkpoint
    with lab.registry() as reg:
        names = {(m["name"], m["step"]) for m in reg.metrics(job["id"])}
        (offer,) = reg.job_suggestions(job["id"])
    for which in ("domain", "general"):
        assert {(f"{which} loss @ replay 0.4 (data)", s) for s in (2, 4, 8)} <= names
        assert (f"{which} loss @ replay 0.4 (fit)", 8) in names
    assert ("predicted replay_ratio", 8) in names
    assert offer["plugin"] == "continue_pretrain"
    predicted = offer["config"]["replay_ratio"]
    assert 0.1 <= predicted <= 0.7 and offer["config"]["max_steps"] == 8
    assert offer["label"] == f"continue_pretrain with replay_ratio {predicted:g} (predicted)"
    import plugins  # the offer is a valid continue_pretrain job

    plugins.validate_config(plugins.get("continue_pretrain"), offer["config"])
    log = (lab.root / "jobs" / job["id"] / "log.txt").read_text()
    assert "9 cells: 0 from the cache, 9 trained" in log
    assert "| replay_ratio | steps | domain loss | domain fit |" in log

    # one more ratio, keeping the runs: only the 3 new cells train, and only they register
    status, job, made = run_job(lab, {**config, "replay_ratios": [0.1, 0.4, 0.7, 0.9],
                                      "keep_runs": True}, plugin="mixture_law")
    assert status == "succeeded", job["error"]
    log = (lab.root / "jobs" / job["id"] / "log.txt").read_text()
    assert "12 cells: 9 from the cache, 3 trained" in log
    assert sorted(ck["name"] for ck in made) == [
        f"{tiny_model_dir.name}-replay0.9-steps{s}" for s in (2, 4, 8)]
    assert {ck["relation"] for ck in made} == {"continue_pretrain"}


# the 3 x 3 demo grid and its held-out cell (domain: the demo's arithmetic text; general:
# its stories and facts)
DEMO_GRID = dict(replay_ratios=[0.2, 0.5, 0.8], step_grid=[20, 40, 80], block_size=64,
                 batch_size=8, max_learning_rate=1e-3, min_learning_rate=1e-4,
                 warmup_ratio=0.1, eval_blocks=16)
HELD_OUT = (0.35, 60)  # replay ratio and steps of a run the fit never sees


@pytest.mark.slow  # builds the demo model (about two minutes), then 10 short runs
def test_demo_grid_predicts_a_held_out_run_within_5_percent(demo_model_dir, demo_texts,
                                                            tmp_path):
    import plugins
    from plugins.mixture_law import Cells

    plugin = plugins.get("mixture_law")
    config = plugins.validate_config(plugin, demo_config(demo_model_dir, demo_texts,
                                                         **DEMO_GRID))
    ctx = FakeContext(tmp_path)
    plugin.run(config, ctx)
    summary = json.loads((ctx.work_dir / "mixture_law.json").read_text())
    laws = {k: Law(**v) for k, v in summary["laws"].items()}
    ratio, steps = HELD_OUT
    measured, cached = Cells(config, ctx).measure(ratio, steps)
    assert not cached
    tokens = steps * summary["tokens_per_step"]
    predicted = {"domain": float(laws["domain"](tokens, 1 - ratio)),
                 "general": float(laws["general"](tokens, ratio))}
    errors = {k: predicted[k] / measured[k] - 1 for k in predicted}
    print(f"held-out replay {ratio} x {steps} steps: measured {measured}, predicted "
          f"{predicted}, errors {errors}")
    assert abs(errors["domain"]) < 0.05 and abs(errors["general"]) < 0.05, errors
    # the CPT moved both losses: the grid is not flat (a flat grid would fit trivially)
    cells = summary["cells"]
    assert max(c["domain"] for c in cells) - min(c["domain"] for c in cells) > 0.05
    assert ctx.suggestions and ctx.suggestions[0][0] == "continue_pretrain"


def test_the_plugin_counts_the_laws_parameters_as_the_op_does():
    from ops.mixture_law import PARAMETERS
    from plugins.mixture_law import LAW_PARAMETERS

    assert LAW_PARAMETERS == len(PARAMETERS)
