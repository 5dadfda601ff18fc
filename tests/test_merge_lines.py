"""LiNeS after a merge (plugins/merge `lines`, ops.task_vectors.lines_rescale_merge): the
merged task vector of a task_arithmetic or TIES merge, rescaled per decoder layer by the
paper's lambda(l) = alpha + beta * l / (L - 1) (alpha outside the layers), with the
multi-task alpha (||sum tau_t||_1 / ||tau_merged||_1) / T."""

import json

import pytest
import torch

import plugins
from app import jobs
from app.checkpoints import import_checkpoint
from tests.test_merge import merge, paths, tensors
from tests.test_task_vectors import build_deep_model, paper_lines, variant


@pytest.fixture
def deep_models(lab, tiny_model_dir, tmp_path):
    """A 4-layer base and two noisy 'fine-tunes' of it (registered)."""
    deep_model_dir = build_deep_model(tiny_model_dir, tmp_path / "deep-llama")
    with lab.registry() as reg:
        ids = {"base": import_checkpoint(lab, reg, str(deep_model_dir), name="base")["id"]}
        for name, seed in (("ft-a", 1), ("ft-b", 2)):
            ids[name] = import_checkpoint(
                lab, reg, str(variant(deep_model_dir, tmp_path / name, seed)), name=name)["id"]
    return ids


@pytest.mark.parametrize("method, extra", [("task_arithmetic", {"weights": [0.7, 0.7]}),
                                           ("ties", {"density": 0.5})])
def test_lines_after_a_merge_scales_the_merged_task_vector_per_layer(lab, deep_models, method,
                                                                     extra):
    fields = {"method": method, "models": ["ft-a", "ft-b"], "base_model": "base", **extra}
    plain, _, _ = merge(lab, {**fields, "name": f"{method}-plain"})
    lined, _, _ = merge(lab, {**fields, "lines": True, "name": f"{method}-lines"})
    base, a, b = paths(lab, [deep_models["base"], deep_models["ft-a"], deep_models["ft-b"]])
    merged, result = tensors(lab, plain["id"]), tensors(lab, lined["id"])
    summed = sum(float((a[k] - base[k] + b[k] - base[k]).double().abs().sum()) for k in base)
    moved = sum(float((merged[k] - base[k]).double().abs().sum()) for k in base)
    alpha = summed / moved / 2
    info = json.loads(lined["metadata"])["lines"]
    assert info["alpha"] == pytest.approx(alpha, rel=1e-6)
    assert info["beta"] == pytest.approx(1 - alpha) and info["layers"] == 4
    assert info["tasks"] == 2 and info["alpha_from"] == "multi-task norm ratio"
    assert set(result) == set(merged) == set(base)
    for key in base:  # every tensor: base + lambda(l) * (merge - base)
        expected = base[key] + paper_lines(key, 4, alpha) * (merged[key] - base[key])
        torch.testing.assert_close(result[key], expected, rtol=0, atol=1e-6)
    if method == "task_arithmetic":  # 0.7 * (tau_a + tau_b): alpha = 1 / (0.7 * 2)
        assert alpha == pytest.approx(1 / 1.4, rel=1e-5)


def test_lines_after_a_merge_with_alpha_and_beta_given(lab, deep_models):
    fields = {"method": "task_arithmetic", "models": ["ft-a", "ft-b"], "base_model": "base",
              "weights": [0.5, 0.5]}
    plain, _, _ = merge(lab, fields)
    lined, _, _ = merge(lab, {**fields, "lines": True, "lines_alpha": 0.2, "lines_beta": 0.5,
                              "name": "given"})
    base, = paths(lab, [deep_models["base"]])
    merged, result = tensors(lab, plain["id"]), tensors(lab, lined["id"])
    info = json.loads(lined["metadata"])["lines"]
    assert (info["alpha"], info["beta"], info["alpha_from"]) == (0.2, 0.5, "given")
    for key in base:
        expected = base[key] + paper_lines(key, 4, 0.2, 0.5) * (merged[key] - base[key])
        torch.testing.assert_close(result[key], expected, rtol=0, atol=1e-6)
    assert not (lab.checkpoints_dir / lined["id"] / ".lines").exists()


def test_lines_is_refused_where_it_means_nothing(lab, deep_models):
    def refused(data, message):
        with pytest.raises(plugins.ConfigError, match=message):
            jobs.submit(lab, "merge", data)

    refused({"method": "linear", "models": ["ft-a", "ft-b"], "lines": True},
            "rescales a task_arithmetic or ties merge, not linear")
    refused({"method": "dare_ties", "models": ["ft-a", "ft-b"], "base_model": "base",
             "density": 0.5, "lines": True}, "not dare_ties")
    refused({"method": "ties", "models": ["ft-a", "ft-b"], "base_model": "base",
             "lines_alpha": 0.3}, "read only with lines: true")
    refused({"mergekit_yaml": "merge_method: linear\nmodels:\n  - model: ft-a\n  - model: ft-b\n",
             "lines": True}, "not linear")
    refused({"mergekit_yaml": "merge_method: ties\nmodels:\n  - model: ft-a\n"
                              "    parameters: {weight: 1, density: 0.5}\n", "lines": True},
            "lines needs a base_model")
