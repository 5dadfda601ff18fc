"""What a job leaves besides checkpoints: a dataset it wrote (ctx.new_dataset: select_data's
selection), drawn in the lineage between the data it read and the checkpoints trained on it;
and a follow-up job it suggests (ctx.suggest: mixture_law's predicted run), which the Jobs
view shows and submits in one click as the clicker's job."""

import json
from pathlib import Path

import pytest

from tests.test_train import arithmetic_rows, run_job, write_jsonl


@pytest.fixture
def selector_lab(lab_dir, monkeypatch):
    import plugins
    from app.lab import Lab
    from tests.conftest import TEST_PLUGINS

    monkeypatch.setenv("WEIGHTSMITH_PLUGINS", TEST_PLUGINS + ",tests.plugins_for_tests:SELECTOR")
    plugins.discover(refresh=True)
    return Lab(lab_dir)


def test_a_dataset_a_job_writes_is_registered_trained_on_and_drawn_with_its_sources(
        selector_lab, tiny_model_dir, tmp_path):
    lab = selector_lab
    pool = write_jsonl(tmp_path / "pool.jsonl", arithmetic_rows(16))
    status, job, made = run_job(lab, {"pool": str(pool), "keep": 8}, plugin="test_select")
    assert status == "succeeded", job["error"]
    assert made == []
    with lab.registry() as reg:
        (selection,) = reg.datasets.made_by(job["id"])
        (source,) = reg.datasets.sources(selection["id"])
        pool_row = reg.datasets.of_job(job["id"])[0]
    # the file moved under the lab's datasets folder, named by its id; 8 rows; this job made it
    assert Path(selection["path"]).parent == lab.root / "datasets" / selection["id"]
    assert Path(selection["path"]).read_text().count("\n") == 8
    assert selection["rows"] == 8 and selection["source"] == "job"
    assert selection["job_id"] == job["id"] and json.loads(selection["metadata"]) == {"keep": 8}
    assert not (lab.job_dir(job["id"]) / "selected.jsonl").exists()  # moved, not copied
    assert source["id"] == pool_row["id"] and source["field"] == "pool"
    from app.ui import datasets_view, jobs_view

    shown = datasets_view.dataset_detail(lab, selection["id"])[0]
    assert f"**Made by** [{job['id']}]" in shown and f"ds={pool_row['id']}" in shown
    assert f"Datasets: {selection['id']}" in jobs_view.job_detail(lab, job["id"])[0]

    # train reads it by id; the checkpoint's lineage draws pool -> selection -> checkpoint
    status, train_job, (ck,) = run_job(lab, {
        "checkpoint": str(tiny_model_dir), "data": selection["id"], "max_steps": 2,
        "batch_size": 4, "save_steps": 0, "method": "full"})
    assert status == "succeeded", train_job["error"]
    with lab.registry() as reg:
        graph = reg.lineage(ck["id"], datasets=True)
    kinds = {n["id"]: n["kind"] for n in graph["nodes"]}
    assert kinds[selection["id"]] == kinds[pool_row["id"]] == "dataset"
    data_edges = {(e["parent"], e["child"], e["role"]) for e in graph["edges"]
                  if e["relation"] == "data"}
    assert (selection["id"], ck["id"], "data") in data_edges
    assert (pool_row["id"], selection["id"], "pool") in data_edges

    # the same selection made again is the same dataset, not a second copy
    status, again, _ = run_job(lab, {"pool": str(pool), "keep": 8}, plugin="test_select")
    assert status == "succeeded", again["error"]
    with lab.registry() as reg:
        assert [d["id"] for d in reg.datasets.made_by(again["id"])] == []
        assert reg.datasets.get(selection["id"])["job_id"] == job["id"]
    assert len(list((lab.root / "datasets").iterdir())) == 1


def test_a_suggested_job_is_shown_and_submitted_as_the_clickers_own(selector_lab,
                                                                     tiny_model_dir, tmp_path):
    from app.ui import jobs_view

    lab = selector_lab
    pool = write_jsonl(tmp_path / "pool.jsonl", arithmetic_rows(4))
    status, job, _ = run_job(lab, {"pool": str(pool), "keep": 2,
                                   "suggest_copy_of": str(tiny_model_dir)},
                             plugin="test_select")
    assert status == "succeeded", job["error"]
    out = jobs_view.live_job(lab, job["id"])
    shown, button = out[0], out[6]
    assert "Suggested next" in shown and "suggested-copy" in shown
    assert button.visible is True
    message, new_id = jobs_view.submit_suggestion(lab, job["id"], user="ana")
    assert new_id != job["id"] and "Submitted" in message
    with lab.registry() as reg:
        new = reg.job(new_id)
    assert new["plugin"] == "test_copy" and new["user"] == "ana"
    assert json.loads(new["config"])["name"] == "suggested-copy"
    # a job without suggestions: no button, and the click says so
    status, plain, _ = run_job(lab, {"pool": str(pool), "keep": 1}, plugin="test_select")
    assert jobs_view.live_job(lab, plain["id"])[6].visible is False
    assert "suggests no follow-up" in jobs_view.submit_suggestion(lab, plain["id"])[0]


def test_a_bad_suggestion_fails_the_job_that_made_it(selector_lab, tmp_path):
    lab = selector_lab
    pool = write_jsonl(tmp_path / "pool.jsonl", arithmetic_rows(4))
    status, job, _ = run_job(lab, {"pool": str(pool), "keep": 1, "suggest_copy_of": "ck-12345678",
                                   "suggest_plugin": "no_such_plugin"},
                             plugin="test_select")
    assert status == "failed" and "unknown plugin 'no_such_plugin'" in job["error"]
    with lab.registry() as reg:
        assert reg.job_suggestions(job["id"]) == []


def test_the_jobs_view_plots_a_search_pareto_front(lab):
    """A plugin's `pareto` hook names two per-candidate metrics; the view pairs them by step
    and marks the front by each metric's direction (accuracy up, loss down)."""
    import dataclasses

    import plugins
    from app import jobs
    from app.ui import jobs_view
    from tests.plugins_for_tests import SLEEPER

    searcher = dataclasses.replace(SLEEPER, name="test_search",
                                   pareto=lambda c: ("sums/exact_match", "general/loss"))
    plugins.register(searcher)
    try:
        job = jobs.submit(lab, "test_search", {"seconds": 0, "pid_file": str(lab.root / "p")})
        with lab.registry() as reg:
            for step, (acc, loss) in enumerate([(0.5, 2.0), (0.6, 2.5), (0.4, 2.2),
                                                (0.6, 2.4), (0.3, 1.9)]):
                reg.add_metric(name="sums/exact_match", value=acc, step=step, job_id=job["id"])
                reg.add_metric(name="general/loss", value=loss, step=step, job_id=job["id"])
            reg.add_metric(name="general/loss", value=9.0, step=7, job_id=job["id"])  # unpaired
        plot = jobs_view.live_job(lab, job["id"])[5]
    finally:
        plugins.unregister("test_search")
    columns, data = plot.value["columns"], plot.value["data"]
    rows = {r[columns.index("candidate")]: r[columns.index("front")] for r in data}
    assert plot.visible is True
    assert rows == {0: "Pareto front", 1: "candidate", 2: "candidate", 3: "Pareto front",
                    4: "Pareto front"}


def test_a_search_plots_its_fitness_by_default():
    from app.ui.jobs_view import plotted_metrics

    names = ["best_fitness", "demo/sums/exact_match", "fitness", "recipe/weight[0]"]
    assert plotted_metrics(names, None) == ["best_fitness", "fitness"]
    assert plotted_metrics(names + ["loss"], None) == ["loss"]
    assert plotted_metrics(names, ["recipe/weight[0]"]) == ["recipe/weight[0]"]
