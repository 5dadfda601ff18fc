import pytest
import torch

from ops.scale_layers import (ScaleError, apply_layer_map, block_influence, expansion_map,
                              lowest_influence, removal_map, solar_map, stack_map, widen_mlp)


def tiny(model_type="llama", layers=4, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=32,
                                  num_hidden_layers=layers, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=48,
                                  max_position_embeddings=64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    # random init leaves o_proj/down_proj small; make every layer matter
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model


def ids(seed=0, batch=2, length=12):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, prompt, n=8):
    return model.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=True,
                          pad_token_id=0)


def reload(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path).eval()


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral"])
def test_block_expansion_computes_exactly_the_same_function(model_type, tmp_path):
    model = tiny(model_type)
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
    prompt = ids(1, batch=1, length=5)
    tokens_before = greedy(model, prompt)
    layer_map, new = expansion_map(4, 2)
    assert layer_map == [0, 1, 1, 2, 3, 3] and new == [2, 5]
    apply_layer_map(model, layer_map, zero_output=new)
    model = reload(model, tmp_path)  # what is written loads back with AutoModelForCausalLM
    assert model.config.num_hidden_layers == 6
    assert [l.self_attn.layer_idx for l in model.model.layers] == list(range(6))
    if model_type == "qwen3":
        assert len(model.config.layer_types) == 6
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)
    assert torch.equal(greedy(model, prompt), tokens_before)  # with the KV cache


def test_mlp_widening_preserves_the_output(tmp_path):
    model = tiny()
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
    widen_mlp(model, 80, noise=0.0, seed=1)
    model = reload(model, tmp_path)
    assert model.config.intermediate_size == 80
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (80, 32)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, before, atol=1e-5)
    noisy = tiny()
    widen_mlp(noisy, 80, noise=0.1, seed=1)
    with torch.no_grad():
        assert not torch.allclose(noisy(input_ids=x).logits, before, atol=1e-5)


@pytest.mark.parametrize("method,expected", [
    ("solar", [0, 1, 2, 1, 2, 3]),  # 4 layers, overlap 1
    ("stack", [0, 1, 2, 3, 0, 1, 2, 3]),  # factor 2
])
def test_solar_and_stack_copy_the_right_layers(method, expected, tmp_path):
    model = tiny()
    source = [l.state_dict() for l in model.model.layers]
    layer_map = solar_map(4, 1) if method == "solar" else stack_map(4, 2)
    assert layer_map == expected
    apply_layer_map(model, layer_map)
    model = reload(model, tmp_path)
    assert model.config.num_hidden_layers == len(expected)
    for new, old in enumerate(expected):
        for key, value in model.model.layers[new].state_dict().items():
            assert torch.equal(value, source[old][key]), (new, old, key)
    out = greedy(model, ids(1, batch=1, length=5))
    assert out.shape == (1, 13)


def test_depth_pruning_removes_the_lowest_influence_layers(tmp_path):
    model = tiny(layers=5)
    # make layer 3 nearly the identity: its residual update is tiny, so its BI is lowest
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight.mul_(1e-4)
        model.model.layers[3].mlp.down_proj.weight.mul_(1e-4)
    bi = block_influence(model, [ids(2), ids(3)])
    assert len(bi) == 5 and min(range(5), key=bi.__getitem__) == 3
    drop = lowest_influence(bi, 1)
    assert drop == [3]
    kept = removal_map(5, drop)
    assert kept == [0, 1, 2, 4]
    apply_layer_map(model, kept)
    model = reload(model, tmp_path)
    assert model.config.num_hidden_layers == 4
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1, 2, 3]
    assert greedy(model, ids(1, batch=1, length=5)).shape == (1, 13)


def test_bad_requests_get_clear_errors():
    with pytest.raises(ScaleError, match=r"solar_overlap \(4\) must be at least 1 and below"):
        solar_map(4, 4)
    with pytest.raises(ScaleError, match=r"growth_factor \(0\)"):
        stack_map(4, 0)
    with pytest.raises(ScaleError, match="cannot remove 4 of 4 layers"):
        removal_map(4, [0, 1, 2, 3])
    with pytest.raises(ScaleError, match=r"expand_every \(5\)"):
        expansion_map(4, 5)
    with pytest.raises(ScaleError, match=r"intermediate_size \(48\) must exceed"):
        widen_mlp(tiny(), 48)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
    with pytest.raises(ScaleError, match="'gpt2' is not supported"):
        apply_layer_map(gpt2, [0, 1, 1])


# --------------------------------------------------------------------- the plugin, as a job
def run_job(lab, data):
    from app import jobs
    from tests.test_jobs import run_to_end

    job = jobs.submit(lab, "scale_layers", data)
    status = run_to_end(lab, job["id"])
    with lab.registry() as reg:
        return status, reg.job(job["id"]), [reg.checkpoint(c) for c in
                                            reg.job_checkpoints(job["id"])]


def test_block_expansion_job_registers_a_scale_checkpoint(lab, tiny_model_dir):
    import json

    status, job, (ck,) = run_job(lab, {"checkpoint": str(tiny_model_dir),
                                       "method": "block_expansion", "expand_every": 1})
    assert status == "succeeded", job["error"]
    assert ck["relation"] == "scale"
    meta = json.loads(ck["metadata"])
    assert meta["layer_map"] == [0, 0, 1, 1] and meta["new_layers"] == [1, 3]
    with lab.registry() as reg:
        assert [p["parent_name"] for p in reg.parents(ck["id"])] == ["tiny-llama"]
    config = json.loads((lab.checkpoints_dir / ck["id"] / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    from app.ui import checkpoint_detail  # the Registry shows the layer map

    summary = checkpoint_detail(lab, ck["id"])[0]
    assert "Layer map (4 layers" in summary and "`[0, 0, 1, 1]` · new blocks [1, 3]" in summary


def test_depth_upscale_job_writes_the_mergekit_yaml(lab, tiny_model_dir):
    import json

    import yaml

    status, job, (ck,) = run_job(lab, {"checkpoint": str(tiny_model_dir),
                                       "method": "depth_upscale", "solar_overlap": 1})
    assert status == "succeeded", job["error"]
    written = yaml.safe_load((lab.checkpoints_dir / ck["id"] / "mergekit_config.yml")
                             .read_text())
    assert written["merge_method"] == "passthrough"
    assert [s["sources"][0]["layer_range"] for s in written["slices"]] == [[0, 1], [1, 2]]
    assert json.loads(ck["metadata"])["layer_map"] == [0, 1]


def test_stored_mergekit_yaml_builds_the_same_model(lab, tiny_model_dir, tmp_path):
    """Run mergekit itself on the YAML we store: its output equals ours, tensor by tensor."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    status, job, (ck,) = run_job(lab, {"checkpoint": str(tiny_model_dir), "method": "stack",
                                       "growth_factor": 2})
    assert status == "succeeded", job["error"]
    ours = lab.checkpoints_dir / ck["id"]
    config = MergeConfiguration.model_validate(
        yaml.safe_load((ours / "mergekit_config.yml").read_text()))
    run_merge(config, str(tmp_path / "mk"), MergeOptions(copy_tokenizer=False, quiet=True))
    theirs = {}
    for f in (tmp_path / "mk").glob("*.safetensors"):
        theirs.update(load_file(f))
    mine = load_file(ours / "model.safetensors")
    assert set(theirs) == set(mine)
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


def test_prune_depth_job_records_influence_and_perplexity(lab, tiny_model_dir):
    import json

    status, job, (ck,) = run_job(lab, {"checkpoint": str(tiny_model_dir),
                                       "method": "prune_depth", "remove_layers": 1,
                                       "calibration_samples": 4, "calibration_length": 32})
    assert status == "succeeded", job["error"]
    meta = json.loads(ck["metadata"])
    assert len(meta["block_influence"]) == 2 and len(meta["removed_layers"]) == 1
    assert set(meta["calibration_perplexity"]) == {"before", "after"}
    assert meta["layer_map"] == [i for i in (0, 1) if i not in meta["removed_layers"]]
    from app.ui import per_layer_frame  # what the Registry view plots

    frame = per_layer_frame(lab, ck["id"])
    assert list(frame["layer"]) == ["00", "01"]
    assert list(frame["value"]) == meta["block_influence"]


def test_impossible_requests_fail_the_job_without_output(lab, tiny_model_dir):
    status, job, made = run_job(lab, {"checkpoint": str(tiny_model_dir),
                                      "method": "depth_upscale", "solar_overlap": 2})
    assert status == "failed" and made == []
    assert "solar_overlap (2) must be at least 1 and below the layer count (2)" in job["error"]
    status, job, made = run_job(lab, {"checkpoint": str(tiny_model_dir),
                                      "method": "prune_depth", "remove_layers": 2})
    assert status == "failed" and "remove_layers (2) must be below the layer count (2)" \
        in job["error"]
    assert not list(lab.checkpoints_dir.glob(".tmp-*"))
