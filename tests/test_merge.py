"""The merge plugin end to end on tiny models: mergekit does the merge, we check the numbers,
the lineage and the errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from app import jobs
from app.checkpoints import import_checkpoint
from tests.test_jobs import run_to_end


def variant(src, dst, seed, scale=0.05, nan=False):
    """A 'fine-tune' of src: the same files, every tensor nudged by seeded noise."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for key, value in weights.items():
        weights[key] = value + scale * torch.randn(value.shape, generator=gen)
    if nan:
        weights["model.norm.weight"][0] = float("nan")
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture
def family(lab, tiny_model_dir, tmp_path):
    """base, and fine-tunes a and b registered as its children."""
    with lab.registry() as reg:
        base = import_checkpoint(lab, reg, str(tiny_model_dir), name="base")
        out = {"base": base["id"]}
        for name, seed in (("ft-a", 1), ("ft-b", 2)):
            path = variant(tiny_model_dir, tmp_path / name, seed)
            from registry import inspect_checkpoint

            info = inspect_checkpoint(path)
            row = reg.add_checkpoint(name=name, relation="finetune", path=info.path,
                                     parents=[{"id": base["id"]}],
                                     content_hash=info.content_hash)
            out[name] = row["id"]
    return out


def merge(lab, data):
    job = jobs.submit(lab, "merge", data)
    status = run_to_end(lab, job["id"])
    with lab.registry() as reg:
        row = reg.job(job["id"])
        made = reg.job_checkpoints(job["id"])
        assert status == "succeeded", row["error"]
        return reg.checkpoint(made[0]), reg.parents(made[0]), row


def tensors(lab, ck_id):
    return load_file(lab.checkpoints_dir / ck_id / "model.safetensors")


def paths(lab, ids):
    with lab.registry() as reg:
        return [load_file(f"{reg.checkpoint(i)['path']}/model.safetensors") for i in ids]


def test_linear_merge_is_the_weighted_mean_and_records_lineage(lab, family):
    ck, parents, _ = merge(lab, {"method": "linear", "models": ["ft-a", "ft-b"],
                                 "weights": [0.25, 0.75], "name": "lin"})
    a, b = paths(lab, [family["ft-a"], family["ft-b"]])
    out = tensors(lab, ck["id"])
    for key in a:
        assert torch.allclose(out[key], 0.25 * a[key] + 0.75 * b[key], atol=1e-6), key
    assert ck["relation"] == "merge" and ck["name"] == "lin"
    assert [(p["parent_name"], p["weight"], p["role"]) for p in parents] == [
        ("ft-a", 0.25, "model"), ("ft-b", 0.75, "model")]
    written = (lab.checkpoints_dir / ck["id"] / "mergekit_config.yml").read_text()
    assert "merge_method: linear" in written
    stored = json.loads(ck["metadata"])["mergekit_yaml"]
    assert "ft-a" in stored  # what the user wrote, registry names and all


def test_task_arithmetic_adds_the_weighted_task_vectors(lab, family):
    ck, parents, _ = merge(lab, {"method": "task_arithmetic", "models": ["ft-a", "ft-b"],
                                 "weights": [1.0, 0.5], "base_model": "base"})
    base, a, b = paths(lab, [family["base"], family["ft-a"], family["ft-b"]])
    out = tensors(lab, ck["id"])
    for key in base:
        expected = base[key] + 1.0 * (a[key] - base[key]) + 0.5 * (b[key] - base[key])
        assert torch.allclose(out[key], expected, atol=1e-5), key
    assert {p["parent_name"]: p["role"] for p in parents} == {"ft-a": "model", "ft-b": "model",
                                                              "base": "base"}


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp"])
def test_other_methods_run_and_record_density(lab, family, method):
    data = {"method": method, "models": ["ft-a", "ft-b"], "base_model": "base"}
    if method == "slerp":
        data = {"method": "slerp", "models": ["ft-a"], "base_model": "base", "t": 0.3}
    else:
        data.update(weights=[0.5, 0.5], density=0.6)
    ck, parents, job = merge(lab, data)
    out = tensors(lab, ck["id"])
    assert all(torch.isfinite(v).all() for v in out.values())
    if method != "slerp":
        assert {p["parent_name"]: p["density"] for p in parents if p["role"] == "model"} == {
            "ft-a": 0.6, "ft-b": 0.6}
    assert "warning" not in open(job["log_path"]).read()  # base is an ancestor


def test_pasted_yaml_with_passthrough_slices(lab, family):
    yaml_text = ("merge_method: passthrough\ndtype: float32\nslices:\n"
                 "  - sources:\n      - model: ft-a\n        layer_range: [0, 2]\n"
                 "  - sources:\n      - model: ft-b\n        layer_range: [1, 2]\n")
    ck, parents, _ = merge(lab, {"mergekit_yaml": yaml_text})
    config = json.loads((lab.checkpoints_dir / ck["id"] / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert sorted(p["parent_name"] for p in parents) == ["ft-a", "ft-b"]
    out = tensors(lab, ck["id"])
    (b,) = paths(lab, [family["ft-b"]])
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])


def test_unrelated_base_is_a_recorded_warning(lab, family, tiny_model_dir, tmp_path):
    stranger = variant(tiny_model_dir, tmp_path / "stranger", 9)
    ck, _, job = merge(lab, {"method": "task_arithmetic", "models": [str(stranger)],
                             "base_model": "base"})
    assert "is not an ancestor" in json.loads(ck["metadata"])["warnings"][0]
    assert "warning: base model base is not an ancestor" in open(job["log_path"]).read()


def failed(lab, data):
    job = jobs.submit(lab, "merge", data)
    assert run_to_end(lab, job["id"]) == "failed"
    with lab.registry() as reg:
        assert reg.job_checkpoints(job["id"]) == []
        return reg.job(job["id"])["error"]


def test_mismatches_and_bad_outputs_fail_with_named_causes(lab, family, tmp_path):
    from ops.tiny_llama import build_llama, llama_config, train_bpe_tokenizer

    tok = train_bpe_tokenizer(["some text for a tokenizer"] * 20, vocab_size=300)
    wide = build_llama(llama_config(tok, hidden_size=48, num_layers=2, num_heads=4,
                                    num_kv_heads=2, intermediate_size=64))
    wide.save_pretrained(tmp_path / "wide")
    tok.save_pretrained(tmp_path / "wide")
    error = failed(lab, {"method": "linear", "models": ["ft-a", str(tmp_path / "wide")]})
    sizes = [json.loads((d / "config.json").read_text())["vocab_size"]
             for d in (tmp_path / "wide", tmp_path / "ft-a")]
    assert sizes[0] != sizes[1]
    assert f"wide has vocab_size {sizes[0]}, ft-a has {sizes[1]}" in error
    error = failed(lab, {"method": "linear", "models": ["ft-a", str(tmp_path / "wide")],
                         "tokenizer_source": "union"})
    assert "differs in shape" in error and "[32]" in error and "[48]" in error
    with lab.registry() as reg:
        base_path = reg.checkpoint("base")["path"]
    from pathlib import Path

    broken = variant(Path(base_path), tmp_path / "nan", 3, nan=True)
    error = failed(lab, {"method": "linear", "models": ["ft-a", str(broken)]})
    assert "NaN or Inf in model.norm.weight" in error
    assert not list(lab.checkpoints_dir.glob(".tmp-*"))


def test_config_errors_before_queueing(lab, family):
    from plugins import ConfigError

    with pytest.raises(ConfigError, match="weights has 1 values for 2 models"):
        jobs.submit(lab, "merge", {"models": ["ft-a", "ft-b"], "weights": [1.0]})
    with pytest.raises(ConfigError, match="method ties needs a base_model"):
        jobs.submit(lab, "merge", {"method": "ties", "models": ["ft-a", "ft-b"]})
    with pytest.raises(ConfigError, match="field 'base_model': unknown checkpoint 'nope'"):
        jobs.submit(lab, "merge", {"method": "ties", "models": ["ft-a"], "base_model": "nope"})


def test_mergekit_yaml_is_parsed_once_per_text(monkeypatch):
    """Validating a Config (its engine and its YAML) and the job's own reading share one
    parse of the text; each caller gets a copy it may change."""
    import uuid

    import plugins.merge as merge_plugin
    from ops import safe_yaml

    calls = []
    real = safe_yaml.load
    monkeypatch.setattr(safe_yaml, "load", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    text = (f"# {uuid.uuid4()}\nmerge_method: ties\nbase_model: base\nmodels:\n"
            "  - model: ft-a\n    parameters: {weight: 1.0, density: 0.5}\n")
    merge_plugin.Config.model_validate({"mergekit_yaml": text, "engine": "native"})
    data = merge_plugin.parse_mergekit_yaml(text)
    data["merge_method"] = "changed"
    assert merge_plugin.parse_mergekit_yaml(text)["merge_method"] == "ties"
    assert len(calls) == 1
