"""ops/prune.py on tensors and tiny models: exact sparsity, N:M patterns, the Wanda formula,
SparseGPT's reconstruction, structured shrinking, domain mixing, bad input."""

import pytest
import torch

from ops.prune import (InputStats, PruneError, collect_stats, count_parameters, global_masks,
                       keep_top, layer_inputs, layer_linears, mix_stats, nm_mask,
                       prune_unstructured, reconstruction_error, remove_structures,
                       sparsegpt_prune, sparsity_of, structured_scores, taylor_weight_scores,
                       unstructured_mask, wanda_scores)


def tiny(layers=2, seed=0, hidden=32, inter=64, heads=4, kv=2):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=hidden,
                                  num_hidden_layers=layers, num_attention_heads=heads,
                                  num_key_value_heads=kv, intermediate_size=inter,
                                  max_position_embeddings=64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model


def batches(n=3, batch=2, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (batch, length), generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------- masks
def test_unstructured_masks_prune_exactly_the_lowest_scores():
    scores = torch.rand(6, 10, generator=torch.Generator().manual_seed(0))
    row = unstructured_mask(scores, 0.3, per_row=True)
    assert row.sum(1).tolist() == [3] * 6
    for r in range(6):  # every pruned score is below every kept score of its row
        assert scores[r][row[r]].max() < scores[r][~row[r]].min()
    layer = unstructured_mask(scores, 0.35, per_row=False)
    assert int(layer.sum()) == 21
    assert scores[layer].max() < scores[~layer].min()
    assert not unstructured_mask(scores, 0.0, per_row=False).any()


def test_global_mask_uses_one_threshold_across_matrices():
    a = torch.arange(20, dtype=torch.float32).view(4, 5)  # 0..19
    b = torch.arange(20, 30, dtype=torch.float32).view(2, 5) - 25  # -5..4
    masks = global_masks({"a": a, "b": b}, 0.5)
    assert int(masks["a"].sum()) + int(masks["b"].sum()) == 15
    assert masks["b"].all()  # every b score is below a's 10th
    assert int(masks["a"].sum()) == 5 and masks["a"].view(-1)[:5].all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_pattern_holds_in_every_group(n, m):
    scores = torch.rand(8, 32, generator=torch.Generator().manual_seed(1))
    mask = nm_mask(scores, n, m)
    kept = (~mask).view(8, 32 // m, m).sum(-1)
    assert (kept == n).all()
    groups = scores.view(8, -1, m)
    gm = mask.view(8, -1, m)
    for r in range(8):
        for g in range(32 // m):
            assert groups[r, g][gm[r, g]].max() <= groups[r, g][~gm[r, g]].min()


@pytest.mark.parametrize("n,m", [(4, 4), (5, 4), (0, 4)])
def test_bad_nm_ratios_are_refused(n, m):
    with pytest.raises(PruneError, match="need 0 < N < M"):
        nm_mask(torch.rand(4, 8), n, m)


def test_nm_needs_a_multiple_of_m():
    with pytest.raises(PruneError, match="multiple of 8"):
        nm_mask(torch.rand(4, 12), 4, 8)


# ------------------------------------------------------------------------------- wanda
def test_wanda_scores_equal_the_formula_on_captured_activations():
    model = tiny()
    data = batches()
    hidden, kwargs = layer_inputs(model, data)
    layer = model.model.layers[0]
    captured = []
    handle = layer.mlp.down_proj.register_forward_pre_hook(
        lambda mod, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    stats = collect_stats(layer, hidden, kwargs, hessian=True)
    handle.remove()
    X = torch.cat(captured)  # (tokens, in): every calibration token's input to down_proj
    assert stats["mlp.down_proj"].tokens == X.shape[0] == 3 * 2 * 16
    W = layer.mlp.down_proj.weight
    direct = W.abs() * X.norm(dim=0).unsqueeze(0)  # |W_ij| * ||X_j||_2
    assert torch.allclose(wanda_scores(W, stats["mlp.down_proj"].sq_sum), direct, rtol=1e-5)
    assert torch.allclose(stats["mlp.down_proj"].hessian(), 2 * X.T @ X / X.shape[0],
                          rtol=1e-4, atol=1e-6)


def test_layer_inputs_match_the_embedding_output():
    model = tiny()
    data = batches(n=2)
    hidden, kwargs = layer_inputs(model, data)
    assert torch.equal(hidden[0], model.model.embed_tokens(data[0]))
    assert "position_embeddings" in kwargs
    # running layer 0 standalone reproduces the full model's hidden state after layer 0
    out = model(input_ids=data[0], output_hidden_states=True).hidden_states[1]
    y = model.model.layers[0](hidden[0], **kwargs)
    assert torch.allclose(y[0] if isinstance(y, tuple) else y, out, atol=1e-5)


# --------------------------------------------------------------------------- sparsegpt
def correlated_inputs(tokens=512, width=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, width, generator=g)
    return torch.randn(tokens, 8, generator=g) @ basis + 0.1 * torch.randn(tokens, width,
                                                                            generator=g)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_magnitude(pattern):
    X = correlated_inputs()
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    H = 2 * X.T @ X / X.shape[0]
    new, mask = sparsegpt_prune(W, H, 0.5, pattern, block_size=16)
    if pattern is None:
        assert int(mask.sum()) == W.numel() // 2
    else:
        assert ((~mask).view(32, 16, 4).sum(-1) == 2).all()
    assert torch.equal(new == 0, mask)
    mag_mask = nm_mask(W.abs(), *pattern) if pattern else unstructured_mask(W.abs(), 0.5, False)
    magnitude = W.masked_fill(mag_mask, 0)
    err_sgpt = ((X @ (W - new).T) ** 2).sum().item()
    err_mag = ((X @ (W - magnitude).T) ** 2).sum().item()
    assert err_sgpt < 0.5 * err_mag, (err_sgpt, err_mag)
    # reconstruction_error is the same quantity per token
    assert reconstruction_error(W, new, H) == pytest.approx(err_sgpt / X.shape[0], rel=1e-3)


def test_sparsegpt_total_is_exact_across_uneven_blocks():
    X = correlated_inputs(width=40)
    W = torch.randn(7, 40)
    _, mask = sparsegpt_prune(W, 2 * X.T @ X / 512, 0.37, block_size=16)
    assert int(mask.sum()) == int(7 * 40 * 0.37)


# ------------------------------------------------------------------ whole-model pruning
@pytest.mark.parametrize("method,scope,pattern", [
    ("magnitude", "layer", None), ("magnitude", "global", None), ("magnitude", "row", None),
    ("wanda", "row", None), ("wanda", "layer", None), ("sparsegpt", "layer", None),
    ("magnitude", "layer", (2, 4)), ("wanda", "row", (4, 8)), ("sparsegpt", "layer", (2, 4)),
])
def test_every_method_hits_its_sparsity(method, scope, pattern):
    model = tiny()
    result = prune_unstructured(model, method, 0.5, pattern=pattern, scope=scope,
                                general=None if method == "magnitude" else batches(),
                                block_size=16)
    per_layer, total = sparsity_of(model)
    assert total == pytest.approx(0.5, abs=1e-9) if scope != "global" else True
    if scope == "global":
        assert result.sparsity == 0.5  # one threshold: layers may differ, the total does not
    else:
        assert per_layer == pytest.approx([0.5, 0.5], abs=1e-9)
        assert all(v == 0.5 for v in result.per_module.values())
    for i, layer in enumerate(model.model.layers):
        for name, m in layer_linears(layer).items():
            zeros = m.weight == 0
            if pattern:
                n, mm = pattern
                assert ((~zeros).view(m.weight.shape[0], -1, mm).sum(-1) == n).all(), name
            elif scope == "row":
                assert (zeros.sum(1) == m.weight.shape[1] // 2).all(), name


def test_data_aware_pruning_beats_magnitude_on_the_model_output():
    data = batches(n=4, length=32)
    reference = tiny()
    with torch.no_grad():
        target = reference(input_ids=data[0]).logits
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = tiny()
        prune_unstructured(model, method, 0.5, scope="row" if method == "wanda" else "layer",
                           general=data, block_size=16)
        with torch.no_grad():
            errors[method] = ((model(input_ids=data[0]).logits - target) ** 2).mean().item()
    assert errors["sparsegpt"] < errors["magnitude"], errors


def test_domain_weight_moves_the_mask_toward_the_domain_statistics():
    general = InputStats()
    general.add(torch.tensor([[10.0, 0.1, 1.0]]), hessian=False)
    domain = InputStats()
    domain.add(torch.tensor([[0.1, 10.0, 1.0]]), hessian=False)
    W = torch.ones(1, 3)
    pick = [unstructured_mask(wanda_scores(W, mix_stats(general, domain, w).sq_sum), 1 / 3,
                              per_row=True) for w in (0.0, 1.0)]
    assert pick[0].tolist() == [[False, True, False]]  # the general set's quiet input goes
    assert pick[1].tolist() == [[True, False, False]]  # the domain set's quiet input goes
    assert mix_stats(general, None, 0.7) is general


def test_scope_global_is_only_for_magnitude():
    with pytest.raises(PruneError, match="global"):
        prune_unstructured(tiny(), "wanda", 0.5, scope="global", general=batches())


# ------------------------------------------------------------------------- structured
@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_structured_pruning_shrinks_loads_and_generates(importance, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(heads=8, kv=4)
    before = count_parameters(model)
    grads = taylor_weight_scores(model, batches(n=2)) if importance == "taylor" else None
    assert all(not p.requires_grad or True for p in model.parameters())
    heads, channels = structured_scores(model, importance, grads)
    assert [h.shape for h in heads] == [(4,)] * 2 and [c.shape for c in channels] == [(64,)] * 2
    keep_g, keep_c = keep_top(heads, 2), keep_top(channels, 16)
    remove_structures(model, keep_g, keep_c)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    cfg = loaded.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.intermediate_size) == (4, 2, 4, 48)
    assert count_parameters(loaded) < before
    out = loaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False,
                          pad_token_id=0)
    assert out.shape == (1, 8)
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=batches(n=1)[0]).logits).all()


def test_structured_removal_refuses_a_head_count_the_config_cannot_hold():
    model = tiny(heads=8, kv=4)  # hidden 32: 6 heads would not divide it
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(PruneError, match=r"keeping 3 of 4 attention groups.*kept: \[1, 2, 4\]"):
        remove_structures(model, [[0, 1, 2]] * 2, [list(range(64))] * 2)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)  # untouched


def test_structured_removal_keeps_the_kept_groups_exactly():
    model = tiny(heads=4, kv=2)
    x = batches(n=1)[0]
    layer = model.model.layers[0]
    q_before = layer.self_attn.q_proj.weight.clone()
    k_before = layer.self_attn.k_proj.weight.clone()
    down_before = layer.mlp.down_proj.weight.clone()
    remove_structures(model, [[1], [0]], [list(range(0, 64, 2))] * 2)
    # head_dim 8, 2 query heads per group: group 1 is q rows 16..31 and k rows 8..15
    assert torch.equal(layer.self_attn.q_proj.weight, q_before[16:32])
    assert torch.equal(layer.self_attn.k_proj.weight, k_before[8:16])
    assert torch.equal(layer.mlp.down_proj.weight, down_before[:, ::2])
    with torch.no_grad():
        assert model(input_ids=x).logits.shape == (2, 16, 128)


def test_removing_a_zeroed_channel_does_not_change_the_output():
    model = tiny()
    x = batches(n=1)[0]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :8] = 0  # channels 0..7 contribute nothing
        before = model(input_ids=x).logits
    _, channels = structured_scores(model, "magnitude")
    remove_structures(model, [[0, 1], [0, 1]], [list(range(8, 64))] * 2)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, before, atol=1e-5)


def test_taylor_scores_restore_requires_grad():
    model = tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    taylor_weight_scores(model, batches(n=1))
    assert not any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ the plugin: bad input
def prune_config(**data):
    import plugins

    return plugins.validate_config(plugins.get("prune"), {"checkpoint": "ck-12345678", **data})


@pytest.mark.parametrize("data,message", [
    ({"sparsity": 1.0}, "field 'sparsity': got 1.0; expected: input should be less than 1"),
    ({"sparsity": -0.1}, "field 'sparsity': got -0.1; expected: input should be greater than "
                         "or equal to 0"),
    ({"pattern": "4:4"}, "field 'pattern'.*'4:4': need 0 < N < M"),
    ({"pattern": "5:4"}, "field 'pattern'.*'5:4': need 0 < N < M"),
    ({"pattern": "2-4"}, "field 'pattern'.*not of the form N:M"),
    ({"method": "wanda", "scope": "global"}, "scope global is for method magnitude"),
    ({"method": "sparsegpt", "scope": "row"}, "scope row does not apply"),
    ({"method": "magnitude", "domain_file": "__FILE__"}, "domain_file needs importance "
                                                         "measured on data"),
    ({"method": "structured", "sparsity": 0}, "nothing is removed"),
    ({"method": "structured", "pattern": "2:4"}, "does not apply to method structured"),
    ({"pattern": "1:4", "sparsity": 0.3}, "fixes the sparsity at 0.75"),
    ({"method": "dpruner"}, "dpruner needs domain_file"),
    ({"method": "dpruner", "domain_file": "__FILE__", "scope": "global"},
     "scope global is for method magnitude"),
    ({"method": "dpruner", "domain_file": "__FILE__", "dpruner_lambda": -1},
     "field 'dpruner_lambda': got -1"),
])
def test_bad_prune_configs_name_the_problem(data, message, tmp_path):
    from plugins import ConfigError

    text = tmp_path / "domain.txt"
    text.write_text("some domain text\n")
    data = {k: (str(text) if v == "__FILE__" else v) for k, v in data.items()}
    with pytest.raises(ConfigError, match=message):
        prune_config(**data)


def test_empty_missing_or_binary_calibration_files_are_refused(tmp_path):
    from plugins import ConfigError

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ConfigError, match=f"field 'calibration_file'.*{empty} is empty"):
        prune_config(calibration_file=str(empty))
    with pytest.raises(ConfigError, match="field 'calibration_file'.*does not exist"):
        prune_config(calibration_file=str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match="field 'eval_file'.*is not UTF-8 text"):
        prune_config(eval_file=str(binary))


def test_jsonl_calibration_files_are_read_by_their_text_field(tmp_path):
    from plugins.kit.textfiles import read_text_file
    from plugins import ConfigError

    good = tmp_path / "c.jsonl"
    good.write_text('{"text": "first doc"}\n\n{"text": "second", "id": 2}\n')
    assert read_text_file(good, "calibration_file")[1] == "first doc\n\nsecond"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(ConfigError, match="field 'calibration_file'.*line 2 has no string "
                                          "field 'text'"):
        prune_config(calibration_file=str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "  "}\n')
    with pytest.raises(ConfigError, match="is empty"):
        prune_config(calibration_file=str(empty))


def test_the_cli_refuses_bad_prune_input_before_queueing(lab_dir, tmp_path):
    from tests.conftest import run_cli, write_yaml

    config = write_yaml(tmp_path / "p.yaml", {"checkpoint": "x", "sparsity": 1.5})
    proc = run_cli(lab_dir, "run", "prune", config)
    assert proc.returncode == 2
    assert "field 'sparsity': got 1.5" in proc.stderr


# ------------------------------------------------------------------- the plugin, as a job
def run_job(lab, data):
    from app import jobs
    from tests.test_jobs import run_to_end

    job = jobs.submit(lab, "prune", data)
    status = run_to_end(lab, job["id"])
    with lab.registry() as reg:
        return status, reg.job(job["id"]), [reg.checkpoint(c) for c in
                                            reg.job_checkpoints(job["id"])]


def test_wanda_2_4_job_records_sparsity_perplexity_and_lineage(lab, tiny_model_dir):
    import json

    from safetensors.torch import load_file

    from app.ui import per_layer_frame

    status, job, (ck,) = run_job(lab, {"checkpoint": str(tiny_model_dir), "method": "wanda",
                                       "pattern": "2:4", "calibration_samples": 8,
                                       "calibration_length": 32, "eval_max_tokens": 600})
    assert status == "succeeded", job["error"]
    assert ck["relation"] == "prune"
    meta = json.loads(ck["metadata"])
    assert meta["sparsity_per_layer"] == [0.5, 0.5] and meta["sparsity"] == 0.5
    assert meta["target_sparsity"] == 0.5 and meta["pattern"] == "2:4"
    assert len(meta["calibration"]["tokens_sha256"]) == 64
    assert meta["calibration"]["file"].endswith("corpus.txt")
    ppl = meta["perplexity"]["ppl:heldout.txt"]
    assert ppl["before"] > 1 and ppl["after"] > 1 and ppl["before"] != ppl["after"]
    weights = load_file(lab.checkpoints_dir / ck["id"] / "model.safetensors")
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert ((q != 0).view(q.shape[0], -1, 4).sum(-1) == 2).all()  # 2:4 on disk
    source = load_file(tiny_model_dir / "model.safetensors")
    assert torch.equal(weights["model.embed_tokens.weight"],  # embeddings untouched
                       source["model.embed_tokens.weight"])
    with lab.registry() as reg:
        (delta,) = reg.score_deltas(ck["id"])
    assert delta["metric"] == "ppl:heldout.txt/perplexity"
    assert delta["parent_name"] == "tiny-llama"
    assert delta["delta"] == pytest.approx(ppl["after"] - ppl["before"])
    frame = per_layer_frame(lab, ck["id"])  # what the Registry view plots
    assert list(frame[frame.series == "sparsity_per_layer"]["value"]) == [0.5, 0.5]


def test_domain_aware_job_reports_both_perplexities(lab, tiny_model_dir, tmp_path):
    import json

    domain = tmp_path / "law.txt"
    domain.write_text("The court held that the contract was void. " * 60)
    status, job, (ck,) = run_job(lab, {"checkpoint": str(tiny_model_dir),
                                       "method": "sparsegpt", "sparsity": 0.3,
                                       "domain_file": str(domain), "domain_weight": 0.7,
                                       "calibration_samples": 4, "calibration_length": 32,
                                       "eval_max_tokens": 400})
    assert status == "succeeded", job["error"]
    meta = json.loads(ck["metadata"])
    assert set(meta["perplexity"]) == {"ppl:heldout.txt", "ppl:law.txt"}
    assert meta["domain"]["weight"] == 0.7 and meta["domain"]["file"] == str(domain)
    assert meta["domain"]["strategy"] == "mixed_statistics"
    assert meta["sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert meta["reconstruction_error"]


def test_dpruner_job_prunes_each_matrix_and_reports_both_perplexities(lab, tiny_model_dir,
                                                                        tmp_path):
    import json

    from safetensors.torch import load_file

    domain = tmp_path / "law.txt"
    domain.write_text("The court held that the contract was void. " * 60)
    status, job, (ck,) = run_job(lab, {"checkpoint": str(tiny_model_dir), "method": "dpruner",
                                       "sparsity": 0.5, "domain_file": str(domain),
                                       "dpruner_lambda": 10.0, "calibration_samples": 4,
                                       "calibration_length": 32, "eval_max_tokens": 400})
    assert status == "succeeded", job["error"]
    meta = json.loads(ck["metadata"])
    assert meta["method"] == "dpruner" and meta["scope"] == "layer"
    assert meta["domain"]["strategy"] == "dpruner" and meta["domain"]["dpruner_lambda"] == 10.0
    assert "weight" not in meta["domain"]
    assert set(meta["perplexity"]) == {"ppl:heldout.txt", "ppl:law.txt"}
    assert set(meta["sparsity_per_module"].values()) == {0.5}
    weights = load_file(lab.checkpoints_dir / ck["id"] / "model.safetensors")
    source = load_file(tiny_model_dir / "model.safetensors")
    q = weights["model.layers.1.mlp.up_proj.weight"]
    assert (q == 0).float().mean().item() == 0.5
    kept = q != 0  # the mask is applied to the original weights: survivors are unchanged
    assert torch.equal(q[kept], source["model.layers.1.mlp.up_proj.weight"][kept])


def test_structured_job_shrinks_the_config_and_reports_speed(lab, tiny_model_dir):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    status, job, (ck,) = run_job(lab, {"checkpoint": str(tiny_model_dir),
                                       "method": "structured", "importance": "taylor",
                                       "attention_groups_removed": 1, "sparsity": 0.25,
                                       "calibration_samples": 4, "calibration_length": 32,
                                       "eval_max_tokens": 400})
    assert status == "succeeded", job["error"]
    meta = json.loads(ck["metadata"])
    assert meta["config_change"] == {"num_attention_heads": 2, "num_key_value_heads": 1,
                                     "head_dim": 8, "intermediate_size": 48}
    assert meta["parameters"]["after"] < meta["parameters"]["before"]
    assert meta["latency_ms"]["before"] > 0 and meta["latency_ms"]["after"] > 0
    path = lab.checkpoints_dir / ck["id"]
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    out = model.generate(**tok("The model", return_tensors="pt"), max_new_tokens=4,
                         do_sample=False)
    assert out.shape[1] == len(tok("The model")["input_ids"]) + 4


def test_a_failing_prune_leaves_nothing_behind(lab, tiny_model_dir):
    status, job, made = run_job(lab, {"checkpoint": str(tiny_model_dir),
                                      "method": "structured", "attention_groups_removed": 2})
    assert status == "failed" and made == []
    assert "attention_groups_removed (2) must be below the model's key/value head count (2)" \
        in job["error"]
    assert not list(lab.checkpoints_dir.glob(".tmp-*"))


HALF_SPARSITY_RUNS = [("magnitude", "layer"), ("magnitude", "row"), ("wanda", "row"),
                      ("wanda", "layer"), ("sparsegpt", None)]


@pytest.fixture(scope="module")
def demo_at_half_sparsity(tmp_path_factory, demo_model_dir):
    """Held-out perplexity of the demo model pruned to 50% by each method, through the plugin
    with its default calibration (64 x 128 tokens of the demo corpus): {(method, scope): ppl},
    plus "dense"."""
    import json

    from app.lab import Lab

    lab = Lab(tmp_path_factory.mktemp("prune-demo") / "lab")
    ppl = {}
    for method, scope in HALF_SPARSITY_RUNS:
        status, job, (ck,) = run_job(lab, {"checkpoint": str(demo_model_dir), "method": method,
                                           "scope": scope, "sparsity": 0.5})
        assert status == "succeeded", job["error"]
        measured = json.loads(ck["metadata"])["perplexity"]["ppl:heldout.txt"]
        ppl[(method, scope)], ppl["dense"] = measured["after"], measured["before"]
    print(f"\ndemo model held-out perplexity: dense {ppl['dense']:.4f}; at 50% "
          + ", ".join(f"{m}/{s or 'blocks'} {ppl[(m, s)]:.4f}" for m, s in HALF_SPARSITY_RUNS))
    return ppl


@pytest.mark.slow
def test_sparsegpt_beats_wanda_and_magnitude_at_half_sparsity(demo_at_half_sparsity):
    ppl = demo_at_half_sparsity
    assert ppl[("sparsegpt", None)] <= min(ppl[("wanda", "row")], ppl[("wanda", "layer")])
    assert ppl[("sparsegpt", None)] <= min(ppl[("magnitude", "row")],
                                           ppl[("magnitude", "layer")])
    assert all(ppl[run] > ppl["dense"] for run in HALF_SPARSITY_RUNS)


@pytest.mark.slow
def test_wanda_beats_magnitude_within_rows_on_the_demo_model(demo_at_half_sparsity):
    """Wanda's own comparison group (each output row): |W|*||X|| beats |W| alone."""
    ppl = demo_at_half_sparsity
    assert ppl[("wanda", "row")] <= ppl[("magnitude", "row")]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "Measured on the demo model, not tuned away: Wanda (per row, its default) 1.9927 and "
    "Wanda per matrix 1.9812 against magnitude per matrix 1.9798. The 3.3M demo model has no "
    "large activation outliers, which is where the Wanda paper finds its activation term "
    "pays off. strict: if this starts passing, update the README and this note."))
def test_wanda_beats_magnitude_with_each_methods_default_on_the_demo_model(
        demo_at_half_sparsity):
    ppl = demo_at_half_sparsity
    assert ppl[("wanda", "row")] <= ppl[("magnitude", "layer")]
    assert ppl[("wanda", "layer")] <= ppl[("magnitude", "layer")]
