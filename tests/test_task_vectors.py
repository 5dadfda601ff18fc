"""Task vectors (plugins/task_vector, ops/task_vectors.py) on tiny Llamas: the chat-vector
recipe exactly, sparse storage, per-block coefficients, learned coefficients, grafting, and
the errors that name their cause."""

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import plugins
from app import jobs
from app.checkpoints import import_checkpoint
from app.context import JobContext
from ops import task_vectors as T
from tests.test_jobs import run_to_end

TEXT = Path(__file__).resolve().parent.parent / "assets" / "demo" / "heldout.txt"


def variant(src: Path, dst: Path, seed: int, scale: float = 0.05, nan: bool = False,
            only=None) -> Path:
    """A copy of src with every tensor (or those whose name contains `only`) nudged by
    seeded noise."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for key, value in weights.items():
        if only is None or only in key:
            weights[key] = value + scale * torch.randn(value.shape, generator=gen)
    if nan:
        weights["model.norm.weight"][0] = float("nan")
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def weights_of(lab, ref) -> dict:
    with lab.registry() as reg:
        row = reg.checkpoint(ref)
    return load_file(Path(row["path"]) / "model.safetensors")


@pytest.fixture
def family(lab, tiny_model_dir, tmp_path):
    """base; 'instruct' = base + delta A; 'cpt' = base + delta B (all registered)."""
    with lab.registry() as reg:
        import_checkpoint(lab, reg, str(tiny_model_dir), name="base")
        import_checkpoint(lab, reg, str(variant(tiny_model_dir, tmp_path / "instruct", 1)),
                          name="instruct")
        import_checkpoint(lab, reg, str(variant(tiny_model_dir, tmp_path / "cpt", 2)),
                          name="cpt")
    return tmp_path


def run_inline(lab, data) -> dict:
    """Run a task_vector job in this process (what app/worker.py does, without the
    subprocess start-up); returns the new checkpoint's row."""
    job = jobs.submit(lab, "task_vector", data)
    plugin = plugins.get("task_vector")
    config = plugins.validate_config(plugin, data)
    with lab.registry() as reg:
        ctx = JobContext(lab, reg, reg.job(job["id"]), out=io.StringIO())
        try:
            plugin.run(config, ctx)
            return ctx.publish_all()[0]
        except BaseException:
            ctx.discard_all()
            raise


def meta(row) -> dict:
    return json.loads(row["metadata"])


# ------------------------------------------------------------------- pure tensor pieces
def test_sparsify_keeps_exactly_the_top_k_and_round_trips():
    tau = torch.randn(37, 53, generator=torch.Generator().manual_seed(0))
    values, index = T.sparsify(tau, 0.1)
    k = T.kept_count(tau.numel(), 0.1)
    assert k == round(0.1 * 37 * 53) and values.numel() == index.numel() == k
    assert index.dtype == torch.int32 and bool((index[1:] > index[:-1]).all())
    dense = T.densify(values, index, tau.shape)
    kept = dense != 0
    assert int(kept.sum()) == k
    assert tau.abs()[kept].min() >= tau.abs()[~kept].max()
    assert torch.equal(dense[kept], tau[kept])


def test_blocks_layers_and_coefficients():
    name = "model.layers.3.mlp.up_proj.weight"
    assert T.layer_of(name) == 3 and T.layer_of("model.embed_tokens.weight") is None
    assert T.block_of(name) == "model.layers.3.mlp"
    assert T.block_of("model.layers.0.input_layernorm.weight") == "model.layers.0.input_layernorm"
    assert T.block_of("lm_head.weight") == "lm_head"
    scales = [1.0, 1.0, 1.0, 2.0]
    assert T.coefficient(name, 0.5, scales, {"self_attn": 9, "mlp": 3}) == 0.5 * 2 * 3
    assert T.coefficient("model.norm.weight", 0.5, scales, {"mlp": 3}) == 0.5
    assert T.coefficient(name, 0.5, scales, None, {"model.layers.3.mlp": 0.25}) == 0.25
    with pytest.raises(T.TaskVectorError, match="layer_scales has 2 values but tensor "
                                                 f"{name} is in layer 3"):
        T.coefficient(name, 1.0, [1.0, 1.0])


# ----------------------------------------------------------------------- chat vector
def test_chat_vector_extract_instruct_minus_base_and_apply_to_cpt(lab, family):
    from transformers import AutoModelForCausalLM

    job = jobs.submit(lab, "task_vector", {"action": "extract", "finetuned": "instruct",
                                           "base": "base", "name": "chat-vector"})
    assert run_to_end(lab, job["id"]) == "succeeded"
    job = jobs.submit(lab, "task_vector", {"action": "apply", "target": "cpt",
                                           "vectors": ["chat-vector"], "name": "cpt-chat"})
    assert run_to_end(lab, job["id"]) == "succeeded"
    with lab.registry() as reg:
        vec = reg.checkpoint("chat-vector")
        vec_edges = {e["parent_id"]: e for e in reg.parents(vec["id"])}
        out = reg.checkpoint("cpt-chat")
        out_edges = {e["parent_id"]: e for e in reg.parents(out["id"])}
        ids = {n: reg.checkpoint(n)["id"] for n in ("base", "instruct", "cpt")}
    assert vec["kind"] == "task_vector" and vec["relation"] == "task_vector"
    assert {vec_edges[ids["instruct"]]["role"], vec_edges[ids["base"]]["role"]} == \
        {"finetuned", "base"}
    info = meta(vec)
    base, instruct, cpt = (weights_of(lab, n) for n in ("base", "instruct", "cpt"))
    tau = {k: instruct[k].float() - base[k].float() for k in base}
    layer_norms = [math.sqrt(sum(float(t.double().pow(2).sum()) for k, t in tau.items()
                                 if f"layers.{i}." in k)) for i in range(2)]
    assert info["norm_per_layer"] == pytest.approx(layer_norms, rel=1e-9)
    assert info["stored_bytes"] == info["dense_bytes"] > 0 and vec["size_bytes"] > 0

    assert out["kind"] == "model" and out["relation"] == "task_vector_apply"
    assert out_edges[ids["cpt"]]["role"] == "base"
    assert out_edges[vec["id"]]["weight"] == 1.0
    assert out_edges[vec["id"]]["relation"] == "task_vector"
    result = weights_of(lab, "cpt-chat")
    assert set(result) == set(cpt)
    for key in cpt:  # bit for bit: cpt + (instruct - base), in float32
        assert torch.equal(result[key], cpt[key].float() + tau[key]), key
    model = AutoModelForCausalLM.from_pretrained(out["path"])
    assert torch.equal(model.model.norm.weight.detach(), result["model.norm.weight"])
    assert (Path(out["path"]) / "tokenizer.json").exists()


def test_applying_a_vector_to_its_own_base_gives_back_the_fine_tune(lab, family):
    run_inline(lab, {"action": "extract", "finetuned": "instruct", "base": "base",
                     "name": "tv"})
    run_inline(lab, {"action": "apply", "target": "base", "vectors": ["tv"], "name": "back"})
    back, instruct = weights_of(lab, "back"), weights_of(lab, "instruct")
    for key in instruct:  # base + (ft - base) in float32 gives ft back, bit for bit here
        assert torch.equal(back[key], instruct[key]), key


# ------------------------------------------------------------------------- sparsity
def test_sparsified_vector_keeps_exactly_top_k_per_tensor_and_round_trips(lab, family):
    row = run_inline(lab, {"action": "extract", "finetuned": "instruct", "base": "base",
                           "density": 0.1, "name": "tv-sparse"})
    info = meta(row)
    vector = T.StoredVector(Path(row["path"]))
    base, instruct = weights_of(lab, "base"), weights_of(lab, "instruct")
    assert vector.names() == sorted(base)
    for key in base:
        tau = instruct[key].float() - base[key].float()
        got = vector.get(key)
        kept = got != 0
        assert int(kept.sum()) == T.kept_count(tau.numel(), 0.1), key
        assert torch.equal(got[kept], tau[kept])
        assert tau.abs()[kept].min() >= tau.abs()[~kept].max()
    assert any(vector.tensors[k]["sparse"] for k in base)  # stored as values + indices
    assert info["stored_bytes"] < 0.25 * info["dense_bytes"]
    assert info["kept"] == sum(T.kept_count(t.numel(), 0.1) for t in base.values())
    assert 0 < info["energy_kept"] < 1


# ------------------------------------------------------------------- per-block scales
def test_per_layer_and_per_block_coefficients_are_applied(lab, family):
    run_inline(lab, {"action": "extract", "finetuned": "instruct", "base": "base",
                     "name": "tv"})
    row = run_inline(lab, {"action": "apply", "target": "cpt", "vectors": ["tv"],
                           "weights": [0.5], "layer_scales": [1.0, 2.0],
                           "block_scales": {"mlp": 3.0, "embed_tokens|lm_head": 0.0}})
    base, instruct, cpt = (weights_of(lab, n) for n in ("base", "instruct", "cpt"))
    result = weights_of(lab, row["id"])
    for key in cpt:
        lam = 0.5 * (2.0 if ".layers.1." in key else 1.0)
        lam *= 3.0 if ".mlp." in key else 0.0 if "embed_tokens" in key or "lm_head" in key \
            else 1.0
        expected = cpt[key].float() + lam * (instruct[key].float() - base[key].float())
        assert torch.equal(result[key], expected), key
    assert torch.equal(result["model.embed_tokens.weight"], cpt["model.embed_tokens.weight"])
    assert meta(row)["block_scales"] == {"mlp": 3.0, "embed_tokens|lm_head": 0.0}


def test_a_grown_vocabulary_is_left_out_with_lambda_zero(lab, family, tmp_path):
    """Chat vector onto a domain model whose vocabulary grew: the embeddings differ in shape,
    so they must be scaled by 0 (and are then left as they are)."""
    from transformers import AutoModelForCausalLM

    run_inline(lab, {"action": "extract", "finetuned": "instruct", "base": "base",
                     "name": "tv"})
    grown = tmp_path / "grown"
    shutil.copytree(weights_dir(lab, "cpt"), grown)
    weights = load_file(grown / "model.safetensors")
    for key in weights:
        if "embed_tokens" in key or "lm_head" in key:
            weights[key] = torch.cat([weights[key], torch.zeros(8, weights[key].shape[1])])
    save_file(weights, grown / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((grown / "config.json").read_text())
    config["vocab_size"] += 8
    (grown / "config.json").write_text(json.dumps(config))
    with pytest.raises(T.TaskVectorError, match=r"tensor (lm_head|model.embed_tokens).weight "
                                                r"differs in shape"):
        run_inline(lab, {"action": "apply", "target": str(grown), "vectors": ["tv"]})
    row = run_inline(lab, {"action": "apply", "target": str(grown), "vectors": ["tv"],
                           "block_scales": {"embed_tokens|lm_head": 0}})
    base, instruct = weights_of(lab, "base"), weights_of(lab, "instruct")
    result = weights_of(lab, row["id"])
    for key in weights:
        if "embed_tokens" in key or "lm_head" in key:
            assert torch.equal(result[key], weights[key])
        else:
            assert torch.equal(result[key], weights[key] + (instruct[key] - base[key])), key
    assert AutoModelForCausalLM.from_pretrained(row["path"]).config.vocab_size == \
        config["vocab_size"]


# ------------------------------------------------------------------- learned lambdas
def trained(src: Path, dst: Path, steps: int = 40) -> Path:
    """src trained briefly on the demo held-out text: a fine-tune that really fits it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(src)(TEXT.read_text())["input_ids"]
    windows = torch.tensor([ids[i:i + 32] for i in range(0, 32 * 64, 32)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = windows[(step * 8) % 64:(step * 8) % 64 + 8]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    shutil.copytree(src, dst)
    model.save_pretrained(dst)
    return dst


def test_learned_coefficients_lower_the_loss_where_the_right_lambda_is_known(
        lab, tiny_model_dir, tmp_path):
    """tau = trained - base, target = base: lambda = 1 is the trained model. Started at
    lambda = 0, the learned coefficients lower the loss and move towards 1; the model's own
    weights do not change."""
    with lab.registry() as reg:
        import_checkpoint(lab, reg, str(tiny_model_dir), name="base")
        import_checkpoint(lab, reg, str(trained(tiny_model_dir, tmp_path / "ft")), name="ft")
    run_inline(lab, {"action": "extract", "finetuned": "ft", "base": "base", "name": "skill"})
    row = run_inline(lab, {"action": "learn", "target": "base", "vectors": ["skill"],
                           "weights": [0.0], "data_file": str(TEXT), "samples": 8,
                           "length": 32, "steps": 25, "learning_rate": 0.1})
    info = meta(row)
    assert info["loss_after"] < info["loss_before"] - 0.3
    (table,) = info["coefficients"].values()
    base_w, ft_w = weights_of(lab, "base"), weights_of(lab, "ft")
    assert set(table) == set(base_w)  # one lambda per parameter tensor (aTLAS' blocks)
    assert info["granularity"] == "tensor" and info["coefficient_count"] == len(base_w)
    big = [v for b, v in table.items() if "norm" not in b]  # matrices, not norms
    assert sum(big) / len(big) > 0.5  # moved from 0 towards the right 1
    # the written model is target + learned lambda per tensor * tau
    result = weights_of(lab, row["id"])
    for key in base_w:
        expected = base_w[key] + table[key] * (ft_w[key] - base_w[key])
        assert torch.equal(result[key], expected), key
    # the coarser blocks (a layer's self_attn, mlp, each norm), started at lambda = 1 (the
    # plain sum): learning still lowers the loss on the data
    coarse = meta(run_inline(lab, {"action": "learn", "target": "base", "vectors": ["skill"],
                                   "weights": [1.0], "learn_granularity": "layer_module",
                                   "data_file": str(TEXT), "samples": 8, "length": 32,
                                   "steps": 10, "learning_rate": 0.05}))
    assert coarse["loss_after"] < coarse["loss_before"]
    (table,) = coarse["coefficients"].values()
    assert set(table) == {T.block_of(k) for k in base_w}
    assert {"model.layers.0.self_attn", "model.layers.1.mlp", "lm_head"} <= set(table)
    assert coarse["coefficient_count"] == len(table) < len(base_w)


# --------------------------------------------------------------------------- graft
def test_graft_keeps_a_tiny_mask_and_reports_the_layers(lab, family):
    run_inline(lab, {"action": "extract", "finetuned": "instruct", "base": "base",
                     "name": "tv"})
    row = run_inline(lab, {"action": "graft", "vectors": ["tv"], "graft_density": 0.01})
    info = meta(row)
    base, instruct = weights_of(lab, "base"), weights_of(lab, "instruct")
    total = sum(t.numel() for t in base.values())
    assert info["entries"] == total and info["kept"] == T.kept_count(total, 0.01)
    result = weights_of(lab, row["id"])
    changed = sum(int((result[k] != base[k]).sum()) for k in base)
    assert changed == info["kept"]
    for key in base:  # the changed entries carry the fine-tune's values
        moved = result[key] != base[key]
        torch.testing.assert_close(result[key][moved], instruct[key][moved], rtol=0, atol=1e-6)
    assert len(info["skill_per_layer"]) == 2
    layer_entries = [sum(t.numel() for k, t in base.items() if f"layers.{i}." in k)
                     for i in range(2)]
    kept_in_layers = sum(f * n for f, n in zip(info["skill_per_layer"], layer_entries))
    assert kept_in_layers + sum(v * base[f"{k}"].numel() for k, v in
                                info["skill_other"].items()) == pytest.approx(info["kept"])
    with lab.registry() as reg:
        edges = {e["role"]: e for e in reg.parents(row["id"])}
        assert edges["base"]["parent_id"] == reg.checkpoint("base")["id"]

    learned = run_inline(lab, {"action": "graft", "vectors": ["tv"], "graft_density": 0.01,
                               "learn_mask": True, "data_file": str(TEXT), "samples": 4,
                               "length": 32, "steps": 3})
    info = meta(learned)
    assert info["kept_at_start"] == T.kept_count(total, 0.01)
    # three small Adam steps cannot move a score past b = 5: the rounded mask is the start
    assert info["kept"] == info["kept_at_start"]
    assert info["mask_start_gap"] == pytest.approx(1 / (1 + math.exp(5)), rel=1e-4)
    assert info["loss_learned_mask"] > 0 and info["loss_magnitude_mask"] > 0


# --------------------------------------------------------------------------- errors
def test_errors_name_the_tensor_the_shapes_the_file_and_the_nan(lab, family, tmp_path):
    from ops.tiny_llama import build_llama, llama_config, train_bpe_tokenizer

    run_inline(lab, {"action": "extract", "finetuned": "instruct", "base": "base",
                     "name": "tv"})
    tok = train_bpe_tokenizer(["some text for a tokenizer"] * 20, vocab_size=300)
    wide = build_llama(llama_config(tok, hidden_size=48, num_layers=2, num_heads=4,
                                    num_kv_heads=2, intermediate_size=64))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(T.TaskVectorError) as e:
        run_inline(lab, {"action": "apply", "target": str(tmp_path / "wide"), "vectors": ["tv"]})
    message = str(e.value)
    assert "differs in shape" in message and "in task vector tv" in message
    name = message.split("tensor ")[1].split(" ")[0]
    wide_shape = list(load_file(tmp_path / "wide" / "model.safetensors")[name].shape)
    tv_shape = list(weights_of(lab, "base")[name].shape)
    assert f"{tv_shape} in task vector tv, {wide_shape} in target wide" in message
    assert not list(lab.checkpoints_dir.glob(".tmp-*"))

    with pytest.raises(T.TaskVectorError, match="instruct is not a task vector"):
        run_inline(lab, {"action": "apply", "target": "cpt", "vectors": ["instruct"]})

    broken = variant(Path(weights_dir(lab, "base")), tmp_path / "nan", 3, nan=True)
    with pytest.raises(T.TaskVectorError, match=r"NaN or Inf in model.norm.weight"):
        run_inline(lab, {"action": "extract", "finetuned": str(broken), "base": "base"})
    with pytest.raises(T.TaskVectorError, match=r"NaN or Inf in model.norm.weight \(the "
                                                r"result\)"):
        run_inline(lab, {"action": "apply", "target": str(broken), "vectors": ["tv"]})

    with lab.registry() as reg:  # a vector whose shard went missing
        folder = Path(reg.checkpoint("tv")["path"])
    shard = next(folder.glob("task_vector-*.safetensors"))
    shard.rename(folder / "moved.bin")
    with pytest.raises(Exception, match="task_vector.json is in none|no weight files|"
                                        "moved.bin"):
        run_inline(lab, {"action": "apply", "target": "cpt", "vectors": ["tv"]})
    with pytest.raises(plugins.ConfigError, match="field 'data_file'.*does not exist"):
        jobs.submit(lab, "task_vector", {"action": "learn", "target": "cpt", "vectors": ["tv"],
                                         "data_file": str(tmp_path / "nope.txt")})
    with pytest.raises(plugins.ConfigError, match="learn needs a data_file"):
        jobs.submit(lab, "task_vector", {"action": "learn", "target": "cpt", "vectors": ["tv"]})
    with pytest.raises(plugins.ConfigError, match="weights has 2 values for 1 vectors"):
        jobs.submit(lab, "task_vector", {"action": "apply", "target": "cpt", "vectors": ["tv"],
                                         "weights": [1, 2]})
    assert not list(lab.checkpoints_dir.glob(".tmp-*"))


def weights_dir(lab, ref) -> str:
    with lab.registry() as reg:
        return reg.checkpoint(ref)["path"]


def test_registry_view_plots_a_task_vectors_norm_per_layer(lab, family):
    from app import ui

    row = run_inline(lab, {"action": "extract", "finetuned": "instruct", "base": "base",
                           "name": "tv"})
    frame = ui.per_layer_frame(lab, row["id"])
    series = frame[frame["series"] == "norm_per_layer"]
    assert list(series["layer"]) == ["00", "01"]
    assert list(series["value"]) == pytest.approx(meta(row)["norm_per_layer"])
    assert all(v > 0 for v in series["value"])



# --------------------------------------------------------------------------- LiNeS
def build_deep_model(tiny_model_dir: Path, out: Path) -> Path:
    """A tiny Llama with 4 decoder layers (so LiNeS has layers between the first and the
    last), with the tiny model's tokenizer."""
    from transformers import AutoTokenizer

    from ops.tiny_llama import build_llama, llama_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    build_llama(llama_config(tokenizer, hidden_size=32, num_layers=4, num_heads=4,
                             num_kv_heads=2, intermediate_size=64, max_positions=256),
                seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return build_deep_model(tiny_model_dir, tmp_path_factory.mktemp("deep") / "deep-llama")


@pytest.fixture
def deep_family(lab, deep_model_dir, tmp_path):
    """deep-base; deep-a = base + delta A; deep-b = base + delta B; and their task vectors
    tv-a, tv-b (all registered)."""
    with lab.registry() as reg:
        import_checkpoint(lab, reg, str(deep_model_dir), name="deep-base")
        for name, seed in (("deep-a", 1), ("deep-b", 2)):
            import_checkpoint(lab, reg, str(variant(deep_model_dir, tmp_path / name, seed)),
                              name=name)
    for name in ("a", "b"):
        run_inline(lab, {"action": "extract", "finetuned": f"deep-{name}", "base": "deep-base",
                         "name": f"tv-{name}"})
    return tmp_path


def paper_lines(name: str, layers: int, alpha: float, beta=None) -> float:
    """LiNeS as the paper writes it, by hand: alpha + beta * l / (L - 1) on decoder layer l
    (0-based), beta = 1 - alpha by default; alpha outside the decoder layers."""
    import re

    beta = 1 - alpha if beta is None else beta
    found = re.search(r"^model\.layers\.(\d+)\.", name)
    return alpha if found is None else alpha + beta * int(found.group(1)) / (layers - 1)


def test_lines_lambda_is_the_papers_formula_for_every_tensor_name(deep_model_dir):
    names = list(load_file(deep_model_dir / "model.safetensors"))
    assert T.decoder_layers(names) == 4
    outside = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert outside < set(names)
    for alpha, beta in ((0.0, None), (0.3, None), (0.25, 0.5), (1.2, -0.4)):
        for name in names:
            assert T.lines_coefficient(name, 4, alpha, beta) == pytest.approx(
                paper_lines(name, 4, alpha, beta), abs=1e-12), (name, alpha, beta)
        for name in outside:  # alpha, not 1, outside the decoder layers
            assert T.lines_coefficient(name, 4, alpha, beta) == alpha
    last = "model.layers.3.mlp.down_proj.weight"
    assert T.lines_coefficient(last, 4, 0.3) == pytest.approx(1.0)  # keeps the whole update
    assert T.lines_coefficient("model.layers.0.mlp.down_proj.weight", 4, 0.3) == 0.3
    assert T.lines_multitask_alpha(6.0, 2.0, 2) == 1.5
    with pytest.raises(T.TaskVectorError, match="merged task vector is zero"):
        T.lines_multitask_alpha(1.0, 0.0, 2)


def test_lines_preset_on_apply_scales_every_tensor_by_the_papers_lambda(lab, deep_family):
    base, a, b = (weights_of(lab, n) for n in ("deep-base", "deep-a", "deep-b"))
    tau_a = {k: a[k].float() - base[k].float() for k in base}
    tau_b = {k: b[k].float() - base[k].float() for k in base}
    # one vector, alpha given: beta = 1 - alpha
    row = run_inline(lab, {"action": "apply", "target": "deep-base", "vectors": ["tv-a"],
                           "weights": [0.8], "lines": True, "lines_alpha": 0.25})
    result = weights_of(lab, row["id"])
    assert meta(row)["lines"]["alpha"] == 0.25 and meta(row)["lines"]["beta"] == 0.75
    for key in base:
        expected = base[key] + 0.8 * paper_lines(key, 4, 0.25) * tau_a[key]
        torch.testing.assert_close(result[key], expected, rtol=0, atol=1e-6)
    # two vectors, the multi-task alpha: (||tau_a + tau_b||_1 / ||sum lambda_i tau_i||_1) / T
    row = run_inline(lab, {"action": "apply", "target": "deep-base",
                           "vectors": ["tv-a", "tv-b"], "weights": [0.5, 0.7],
                           "lines": True})
    summed = sum(float((tau_a[k] + tau_b[k]).double().abs().sum()) for k in base)
    merged = sum(float((0.5 * tau_a[k] + 0.7 * tau_b[k]).double().abs().sum()) for k in base)
    alpha = summed / merged / 2
    info = meta(row)["lines"]
    assert info["alpha"] == pytest.approx(alpha, rel=1e-9) and 0 < alpha < 1
    assert info["beta"] == pytest.approx(1 - alpha) and info["layers"] == 4
    assert info["alpha_from"] == "multi-task norm ratio"
    result = weights_of(lab, row["id"])
    for key in base:
        lam = paper_lines(key, 4, alpha)
        expected = base[key] + lam * (0.5 * tau_a[key] + 0.7 * tau_b[key])
        torch.testing.assert_close(result[key], expected, rtol=0, atol=1e-6)
    # and the errors name the field
    with pytest.raises(plugins.ConfigError, match="lines with one vector needs lines_alpha"):
        jobs.submit(lab, "task_vector", {"action": "apply", "target": "deep-base",
                                         "vectors": ["tv-a"], "lines": True})
    with pytest.raises(plugins.ConfigError, match="leave layer_scales empty"):
        jobs.submit(lab, "task_vector", {"action": "apply", "target": "deep-base",
                                         "vectors": ["tv-a"], "lines": True,
                                         "lines_alpha": 0.5, "layer_scales": [1, 1, 1, 1]})
    with pytest.raises(plugins.ConfigError, match="read only with lines: true"):
        jobs.submit(lab, "task_vector", {"action": "apply", "target": "deep-base",
                                         "vectors": ["tv-a"], "lines_alpha": 0.5})


# --------------------------------------------------------------------------- aTLAS
def test_atlas_learns_one_coefficient_per_tensor_per_vector_from_zero(tiny_model_dir,
                                                                      tmp_path):
    """The paper's granularity: tensors x vectors coefficients, all started at 0 (theta starts
    at the target), and the loss on the data falls."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ft = trained(tiny_model_dir, tmp_path / "ft")
    base_w = load_file(tiny_model_dir / "model.safetensors")
    ft_w = load_file(ft / "model.safetensors")
    noise = load_file(variant(tiny_model_dir, tmp_path / "noise", 5) / "model.safetensors")
    vectors = [{k: ft_w[k] - base_w[k] for k in base_w},
               {k: noise[k] - base_w[k] for k in base_w}]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(TEXT.read_text())["input_ids"]
    batches = list(torch.tensor([ids[i:i + 32] for i in range(0, 32 * 8, 32)]).split(4))
    losses = []
    result = T.learn_coefficients(model, vectors, batches, steps=15, lr=0.1,
                                  log=lambda step, loss: losses.append(loss))
    tensors = [n for n, _ in model.named_parameters()]
    assert len(tensors) == len(base_w)  # untied: every stored tensor is a parameter
    assert sum(len(t) for t in result["coefficients"]) == len(tensors) * len(vectors)
    assert all(set(t) == set(tensors) for t in result["coefficients"])
    assert all(v == 0.0 for t in result["init"] for v in t.values())  # the paper's init
    assert losses[0] == pytest.approx(result["loss_before"], rel=0.2)
    assert result["loss_after"] < result["loss_before"] - 0.1
    assert result["coefficients"][0] != result["init"][0]
    coarse = T.learn_coefficients(model, vectors, batches, steps=1, lr=0.1,
                                  granularity="layer_module")
    assert len(coarse["coefficients"][0]) == len({T.block_of(n) for n in tensors}) < \
        len(tensors)
    with pytest.raises(T.TaskVectorError, match="granularity 'layer' is not one of"):
        T.learn_coefficients(model, vectors, batches, steps=1, lr=0.1, granularity="layer")


# --------------------------------------------------------------------------- grafting
def test_graft_mask_starts_almost_binary_at_the_top_k_mask():
    gen = torch.Generator().manual_seed(0)
    tau = {"a": torch.randn(40, 50, generator=gen), "b": torch.randn(300, generator=gen)}
    start = T.top_mask({n: t.abs() for n, t in tau.items()}, 0.01)
    assert sum(int(m.sum()) for m in start.values()) == T.kept_count(2300, 0.01)
    off = 1 / (1 + math.exp(5))  # sigmoid(-b), b = 5
    for name, t in tau.items():
        scores = torch.zeros(t.shape)  # S starts at 0
        gate = T.graft_gate(start[name], scores, 5.0)
        torch.testing.assert_close(gate, torch.where(start[name], 1 - off, off), rtol=0,
                                   atol=1e-7)
        assert torch.equal(gate > 0.5, start[name])  # rounded: exactly the top-k mask
        # a score raised past b flips an entry: in from outside, out from inside
        raised = T.graft_gate(start[name], torch.full(t.shape, 10.0), 5.0)
        assert torch.equal(raised > 0.5, ~start[name])
    assert T.GRAFT_SIGMOID_BIAS == 5.0


def test_graft_default_size_is_the_papers_and_overlap_is_reported(lab, family):
    config = plugins.get("task_vector").Config
    assert config.model_fields["graft_density"].default == 1e-4  # about 0.01%
    run_inline(lab, {"action": "extract", "finetuned": "instruct", "base": "base",
                     "name": "tv-instruct"})
    run_inline(lab, {"action": "extract", "finetuned": "cpt", "base": "base",
                     "name": "tv-cpt"})
    first = run_inline(lab, {"action": "graft", "vectors": ["tv-instruct"], "name": "g1"})
    total = meta(first)["entries"]
    assert meta(first)["kept"] == T.kept_count(total, 1e-4) == round(total * 1e-4)
    # toy grafts of two skills, large enough to share entries: each stores its mask
    a = run_inline(lab, {"action": "graft", "vectors": ["tv-instruct"], "name": "ga",
                         "graft_density": 0.2})
    b = run_inline(lab, {"action": "graft", "vectors": ["tv-cpt"], "name": "gb",
                         "graft_density": 0.2, "compare_grafts": ["ga", "g1"]})
    mask_a, mask_b = T.load_mask(Path(a["path"])), T.load_mask(Path(b["path"]))
    base, result = weights_of(lab, "base"), weights_of(lab, "gb")
    for key in base:  # the stored mask is what was grafted
        assert torch.equal(mask_b[key], result[key] != base[key]), key
    shared = sum(int((mask_a[k] & mask_b[k]).sum()) for k in base)
    either = sum(int((mask_a[k] | mask_b[k]).sum()) for k in base)
    overlap = meta(b)["mask_overlap"]
    with lab.registry() as reg:
        assert [o["graft"] for o in overlap] == [reg.checkpoint("ga")["id"],
                                                 reg.checkpoint("g1")["id"]]
    assert overlap[0]["shared"] == shared > 0
    assert overlap[0]["jaccard"] == pytest.approx(shared / either)
    kept = meta(a)["kept"]
    assert overlap[0]["kept_a"] == overlap[0]["kept_b"] == kept
    assert overlap[0]["shared_of_smaller"] == pytest.approx(shared / kept)
    # independent noise: about what two random 20% masks share (0.2 x 0.2 of the entries)
    assert 0.5 * 0.04 * total < shared < 2 * 0.04 * total
    with pytest.raises(T.TaskVectorError, match="base has no graft mask"):
        run_inline(lab, {"action": "graft", "vectors": ["tv-cpt"], "compare_grafts": ["base"]})


def test_mask_overlap_of_two_toy_grafts():
    a = {"t1": torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool),
         "t2": torch.zeros(3, dtype=torch.bool)}
    b = {"t1": torch.tensor([0, 0, 1, 1, 1, 0], dtype=torch.bool),
         "t2": torch.tensor([1, 0, 0], dtype=torch.bool)}
    overlap = T.mask_overlap(a, b)
    assert overlap == {"kept_a": 4, "kept_b": 4, "shared": 2, "jaccard": 2 / 6,
                       "shared_of_smaller": 0.5}
    assert T.mask_overlap(a, a)["jaccard"] == 1.0
    assert T.mask_overlap(a, {"t1": ~a["t1"]})["jaccard"] == 0.0
    with pytest.raises(T.TaskVectorError, match="differ in the shape of t1"):
        T.mask_overlap(a, {"t1": torch.zeros(5, dtype=torch.bool)})
