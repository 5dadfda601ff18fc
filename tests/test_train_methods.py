"""Issue 23's train methods, each with its paper's claim checked in miniature on tiny models:
MeZO (zeroth-order SGD from forward passes), the GaLore optimizer, AdaLoRA and MiSS."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from ops import zeroth_order as Z
from tests.conftest import REPO
from tests.test_train import (arithmetic_rows, base_config, run_job,  # noqa: F401
                              sft_model_dir, write_jsonl)

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def one_thread_per_job(monkeypatch):
    """Jobs (subprocesses) use one torch thread: on a shared, busy CPU more threads only
    contend (these tests are sized for 2 cores)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def tiny_llama(vocab=64, hidden=16, layers=2):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=hidden,
                                  num_hidden_layers=layers, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=2 * hidden)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def batch_loss(model, seed=1):
    x = torch.randint(0, model.config.vocab_size, (4, 16),
                      generator=torch.Generator().manual_seed(seed))
    return lambda: model(input_ids=x, labels=x).loss


# --------------------------------------------------------------------------------- MeZO
def test_perturb_and_restore_returns_theta_and_allocates_no_grad():
    """MeZO's Algorithm 1: +εz, -2εz, +εz with z regenerated from the seed each time brings θ
    back to itself (to float rounding); no autograd graph is built and no .grad exists."""
    model = tiny_llama()
    params = Z.trainable_parameters(model)
    before = {n: p.detach().clone() for n, p in params}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        g, loss = Z.projected_gradient(batch_loss(model), params, seed=7, eps=1e-3)
    worst = max(float((p.detach() - before[n]).abs().max()) for n, p in params)
    assert worst < 1e-6, worst
    assert g != 0 and math.isfinite(loss)
    assert saved == [] and all(p.grad is None for _, p in params)
    # the same seed is the same direction on every pass (regenerated, never stored)
    first = [z.clone() for _, _, z in Z._directions(params, 3)]
    assert all(torch.equal(a, z) for a, (_, _, z) in zip(first, Z._directions(params, 3)))
    Z.mezo_step(batch_loss(model), params, [5], eps=1e-3, lr=1e-2)
    assert all(p.grad is None for _, p in params) and saved == []
    assert max(float((p.detach() - before[n]).abs().max()) for n, p in params) > 1e-4


def test_averaged_estimate_points_along_the_backprop_gradient(one_thread):
    """The n-seed average of g·z has cosine > 0.9 with the backprop gradient when n is large
    against the number of perturbed parameters d. The cosine follows sqrt(n / (n + d)) (a
    Gaussian-direction estimate): 16 parameters (the final norm) with n = 256 give ~0.96,
    while the whole 6,736-parameter model with n = 256 gives only ~0.19 (0.9 would need
    n ≈ 4.3·d ≈ 29,000 directions, 58,000 forward passes), which is measured too."""
    model = tiny_llama()
    loss = batch_loss(model)
    loss().backward()
    everything = Z.trainable_parameters(model)
    truth = {n: p.grad.clone() for n, p in everything}
    model.zero_grad(set_to_none=True)

    def cosine(params, n):
        est = Z.gradient_estimate(loss, params, range(n), eps=1e-3)
        a = torch.cat([est[k].flatten() for k, _ in params])
        b = torch.cat([truth[k].flatten() for k, _ in params])
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    norm = [(n, p) for n, p in everything if n == "model.norm.weight"]
    assert sum(p.numel() for _, p in norm) == 16
    assert cosine(norm, 256) > 0.9
    d = sum(p.numel() for _, p in everything)
    whole = cosine(everything, 256)
    assert whole == pytest.approx(math.sqrt(256 / (256 + d)), abs=0.06), (whole, d)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from ops import zeroth_order as Z
    torch.set_num_threads(1)
    config = AutoConfig.for_model("llama", vocab_size=8192, hidden_size=512,
                                  num_hidden_layers=4, num_attention_heads=8,
                                  num_key_value_heads=4, intermediate_size=1376)
    model = AutoModelForCausalLM.from_config(config)
    x = torch.randint(0, 8192, (2, 32))
    loss = lambda: model(input_ids=x, labels=x).loss
    # VmHWM, this process's own peak: ru_maxrss starts at the parent's RSS (pytest's, after
    # many tests) and keeps it across exec, so it read 2.5 GB for every phase in CI
    peak = lambda: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                        if l.startswith("VmHWM:"))
    with torch.no_grad():
        loss()
    inference = peak()
    params = Z.trainable_parameters(model)
    for step in range(3):
        Z.mezo_step(loss, params, [step], eps=1e-3, lr=1e-6)
    mezo = peak()
    grads = any(p.grad is not None for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for _ in range(2):
        loss().backward(); opt.step(); opt.zero_grad(set_to_none=False)
    print(json.dumps({"model": sum(p.numel() * 4 for p in model.parameters()),
                      "largest": max(p.numel() * 4 for p in model.parameters()),
                      "inference": inference, "mezo": mezo, "backprop": peak(),
                      "grads": grads}))
""")


def test_mezo_peak_memory_is_near_inference():
    """Peak resident memory (VmHWM of a fresh process, CPU): inference, then MeZO steps,
    then backprop + AdamW on a 20M-parameter Llama (76 MB in float32). MeZO adds at most
    one parameter-sized z (the largest, 16 MB) over inference (measured: +12 to +14 MB);
    backprop adds gradients and two Adam moments (measured: +250 MB, 3.3x the model)."""
    import os

    # a fixed mmap threshold: glibc hands every freed tensor above 128 kB back at once, so the
    # peak follows the live tensors (its default raises the threshold and keeps freed blocks)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True,
                          text=True, cwd=str(REPO), timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    print("memory (MB):", {k: round(v / 2 ** 20, 1) for k, v in m.items() if k != "grads"})
    assert not m["grads"]
    assert m["mezo"] - m["inference"] <= m["largest"] + 8 * 2 ** 20, m
    assert m["backprop"] - m["mezo"] > 2 * m["model"], m


def test_mezo_job_lowers_the_loss_and_registers_a_finetune(lab, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "colors.jsonl", arithmetic_rows())
    status, job, (ck,) = run_job(lab, base_config(
        tiny_model_dir, data, method="mezo", max_steps=100, learning_rate=2e-3,
        lr_scheduler="constant", logging_steps=10, completion_only_loss=False,
        weight_decay=0.0))
    assert status == "succeeded", job["error"]
    assert ck["relation"] == "finetune" and ck["name"] == "tiny-llama-mezo"
    meta = json.loads(ck["metadata"])
    assert meta["method"] == "mezo" and meta["mezo"] == {"eps": 1e-3, "samples": 1}
    assert meta["steps"] == 100 and meta["trainable_parameters"] == meta["total_parameters"]
    with lab.registry() as reg:
        metrics = reg.metrics(job["id"])
    losses = [m["value"] for m in metrics if m["name"] == "loss"]
    print("mezo losses every 10 steps:", [round(x, 3) for x in losses])
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.1, losses
    assert {m["name"] for m in metrics} >= {"loss", "learning_rate", "tokens_per_second"}
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(f"{ck['path']}/model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every weight moved


def test_new_methods_refuse_bad_settings_naming_the_field():
    import plugins
    from plugins.train import PLUGIN

    cases = [({"method": "lora", "optimizer": "galore_adamw"}, "optimizer galore_adamw"),
             ({"method": "mezo", "gradient_accumulation": 4}, "gradient_accumulation"),
             ({"method": "mezo", "cpu_processes": 2}, "method mezo runs as one process"),
             ({"method": "mezo", "mezo_eps": 0}, "field 'mezo_eps'"),
             ({"method": "adalora", "adalora_target_r": 16, "adalora_init_r": 8},
              r"adalora_target_r \(16\) must not exceed adalora_init_r"),
             ({"method": "adalora", "max_steps": 1}, "adalora_tinit and adalora_tfinal"),
             ({"method": "miss", "miss_r": 0}, "field 'miss_r'")]
    for extra, message in cases:
        with pytest.raises(plugins.ConfigError, match=message):
            plugins.validate_config(PLUGIN, {"checkpoint": "x", "data": "d", **extra})


# ------------------------------------------------------------------------------- GaLore
def galore_trainer(model, blocks, tmp_path, *, optimizer, steps, lr=2e-3, rank=8):
    """The train plugin's Trainer set-up (its TrainingArguments, plus what
    plugins.train.methods adds for the optimizer) on packed blocks."""
    from transformers import PrinterCallback, Trainer

    from ops import training as T
    from ops.pretrain import Blocks
    from plugins.train import Config, methods

    config = Config(checkpoint="x", data="d", method="full", optimizer=optimizer,
                    galore_rank=rank, galore_update_proj_gap=50)
    args = T.training_arguments(str(tmp_path / optimizer), device="cpu", max_steps=steps,
                                per_device_train_batch_size=8, learning_rate=lr,
                                warmup_steps=10, lr_scheduler_type="cosine", logging_steps=1,
                                save_strategy="no", seed=0, data_seed=0,
                                include_num_input_tokens_seen="no",
                                **methods.training_arguments(config))
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(blocks))
    trainer.remove_callback(PrinterCallback)
    return trainer


@pytest.fixture
def one_thread():
    """One torch thread: on a shared, busy CPU the default threads slow these loops ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_blocks():
    """The first 100 kB of the demo corpus, its own 300-token BPE, blocks of 32 tokens."""
    from ops.tiny_llama import pack_blocks, train_bpe_tokenizer

    text = (REPO / "assets" / "demo" / "corpus.txt").read_text()[:100_000]
    tokenizer = train_bpe_tokenizer(text.split("\n\n"), vocab_size=300)
    return tokenizer, pack_blocks(tokenizer(text)["input_ids"], 32)


def demo_llama(tokenizer):
    from ops.tiny_llama import build_llama, llama_config

    return build_llama(llama_config(tokenizer, hidden_size=32, num_layers=2, num_heads=4,
                                    num_kv_heads=2, intermediate_size=85, max_positions=64),
                       seed=0).train()


def test_galore_keeps_rank_by_n_adam_state_for_projected_matrices(demo_blocks, tmp_path,
                                                                   one_thread):
    """GaLore's memory claim: a projected m x n weight's Adam moments are r x max(m, n)
    (the gradient projected on its smaller side), not m x n; other parameters keep full
    AdamW state."""
    tokenizer, blocks = demo_blocks
    model = demo_llama(tokenizer)
    trainer = galore_trainer(model, blocks, tmp_path, optimizer="galore_adamw", steps=2, rank=8)
    trainer.train()
    assert type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                else trainer.optimizer).__module__.startswith("galore_torch")
    state = trainer.optimizer.state
    checked = 0
    for name, p in model.named_parameters():
        moments = state[p]["exp_avg"], state[p]["exp_avg_sq"]
        if name.rsplit(".", 2)[-2] in LINEAR:
            m, n = p.shape
            expected = (m, 8) if m >= n else (8, n)
            assert all(t.shape == expected for t in moments), (name, p.shape, moments[0].shape)
            assert moments[0].numel() == 8 * max(m, n) < p.numel()
            checked += 1
        else:
            assert all(t.shape == p.shape for t in moments), name
    assert checked == 14  # 7 linear layers x 2 decoder layers


def test_galore_pretraining_loss_is_within_ten_percent_of_adamw(demo_blocks, tmp_path,
                                                                one_thread):
    """GaLore's quality claim in miniature: pre-training a 2-layer, width-32 Llama from scratch
    on the demo corpus for 100 steps (batch 8 x 32 tokens, lr 2e-3, cosine), GaLore at rank 8
    (a quarter of the width, as the paper's 60M model uses 128 of 512) ends within 10% of
    AdamW: mean loss of the last 10 steps 3.66 vs 3.71 measured (ratio 0.99)."""
    tokenizer, blocks = demo_blocks
    final = {}
    for optimizer in ("adamw", "galore_adamw"):
        trainer = galore_trainer(demo_llama(tokenizer), blocks, tmp_path, optimizer=optimizer,
                                 steps=100)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        final[optimizer] = sum(losses[-10:]) / 10
    print("final losses:", final)
    assert final["galore_adamw"] <= 1.10 * final["adamw"], final
    assert final["adamw"] < 4.5  # it learned something (ln 300 = 5.7 at the start)


# ------------------------------------------------------------------------ AdaLoRA, MiSS
def merged_matches_adapter(lab, adapter, base_dir):
    """merge_adapter folds the adapter: the merged model's logits equal base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    status, job, (merged,) = run_job(lab, {"adapter": adapter["id"]}, plugin="merge_adapter")
    assert status == "succeeded", job["error"]
    assert merged["relation"] == "adapter_merge"
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                             adapter["path"]).eval()
    full = AutoModelForCausalLM.from_pretrained(merged["path"]).eval()
    with torch.no_grad():
        a, b, c = (with_adapter(input_ids=x).logits, full(input_ids=x).logits,
                   plain(input_ids=x).logits)
    assert (a - c).abs().max() > 1e-4  # the adapter changed something to merge
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_adalora_ends_at_its_rank_budget_unevenly_spread(lab, sft_model_dir, tmp_path):
    """AdaLoRA's claim: the total rank ends at the budget target_r x (adapted matrices), and
    the allocation is not uniform (important matrices keep more). 14 matrices, init_r 6,
    target_r 2: budget 28 of 84."""
    data = write_jsonl(tmp_path / "colors.jsonl", arithmetic_rows())
    status, job, (adapter,) = run_job(lab, base_config(
        sft_model_dir, data, method="adalora", max_steps=30, adalora_init_r=6,
        adalora_target_r=2, adalora_tinit=0.1, adalora_tfinal=0.3))
    assert status == "succeeded", job["error"]
    assert adapter["relation"] == "adapter"
    meta = json.loads(adapter["metadata"])
    ranks = meta["adalora_ranks"]
    print("adalora ranks:", ranks)
    assert len(ranks) == 14 and meta["adalora_budget"] == 28
    assert meta["adalora_total_rank"] == sum(ranks.values()) == 28
    assert len(set(ranks.values())) > 1  # non-uniform
    saved = json.loads((lab.root / "checkpoints" / adapter["id"] / "adapter_config.json")
                       .read_text())
    assert saved["peft_type"] == "ADALORA"
    assert sum(sum(v) for v in saved["rank_pattern"].values()) == 28
    merged_matches_adapter(lab, adapter, sft_model_dir)


def test_miss_trains_an_adapter_that_merge_adapter_folds(lab, sft_model_dir, tmp_path):
    from ops.peft_methods import AdapterError, miss_wrap

    with pytest.raises(AdapterError, match=r"miss_r \(64\) must be at most the in_features"):
        miss_wrap(tiny_llama(hidden=32), r=64, target_modules=LINEAR)  # the default r
    data = write_jsonl(tmp_path / "colors.jsonl", arithmetic_rows())
    status, job, (adapter,) = run_job(lab, base_config(sft_model_dir, data, method="miss",
                                                       miss_r=8, max_steps=20))
    assert status == "succeeded", job["error"]
    assert adapter["relation"] == "adapter" and adapter["name"] == "tiny-sft-miss"
    saved = json.loads((lab.root / "checkpoints" / adapter["id"] / "adapter_config.json")
                       .read_text())
    assert saved["peft_type"] == "MISS" and saved["r"] == 8
    with lab.registry() as reg:
        losses = [m["value"] for m in reg.metrics(job["id"]) if m["name"] == "loss"]
    assert losses[-1] < losses[0], losses
    merged_matches_adapter(lab, adapter, sft_model_dir)
