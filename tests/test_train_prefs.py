"""Issue 23: train's objectives beyond SFT, in miniature on tiny models: distillation from a
teacher (zero loss against itself, recovery of a ShortGPT-pruned model, the teacher in the
lineage, the tokenizer check) and preference tuning with DPO and ORPO (the log-ratio margin
grows, the reference in the lineage, the preview of pairs, missing columns refused)."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from ops import preference as P
from tests.test_train import base_config, run_job, write_jsonl

REPO = Path(__file__).resolve().parent.parent
WORDS = ["red", "green", "blue", "black", "white", "pink", "gold", "gray"]


def tiny_llama(vocab=64, layers=2, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=16,
                                  num_hidden_layers=layers, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=32)
    return AutoModelForCausalLM.from_config(config).eval()


# --------------------------------------------------------------------------- the losses
def test_a_student_identical_to_its_teacher_has_zero_distillation_loss():
    student = tiny_llama()
    x = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = x.clone()
    labels[:, :4] = -100  # a masked prompt: the KL counts the learned tokens only
    batch = {"input_ids": x, "labels": labels, "attention_mask": torch.ones_like(x)}
    same = P.Objective("distill", alpha=0.5, temperature=2.0, other=copy.deepcopy(student))
    loss, metrics = same.loss(student, batch)
    assert metrics["distill_loss"].item() == 0.0
    assert loss.item() == pytest.approx(0.5 * metrics["lm_loss"].item(), rel=1e-6)
    other = P.Objective("distill", alpha=0.5, temperature=2.0, other=tiny_llama(seed=1))
    assert other.loss(student, batch)[1]["distill_loss"].item() > 1e-4
    # Hinton et al.'s T^2: at a high temperature, T^2 * KL tends to the squared logit gap / 2
    s = torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(1))
    t = torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(2))
    lab = torch.tensor([[0, 1]])
    gap = (s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))
    expected = (gap[0, 0] ** 2).mean() / 2
    assert P.distill_kl(s, t, lab, 20.0).item() == pytest.approx(expected.item(), rel=1e-2)


def test_dpo_and_orpo_losses_follow_the_papers():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    ref_c, ref_r = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -4.5])
    loss, m = P.dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1)
    margins = (chosen - ref_c) - (rejected - ref_r)  # [1.0, -0.5]
    expected = -torch.nn.functional.logsigmoid(0.1 * margins).mean()
    assert loss.item() == pytest.approx(expected.item()) and m["logratio_margin"] == 0.25
    same, _ = P.dpo_loss(chosen, rejected, chosen, rejected, beta=0.1)
    assert same.item() == pytest.approx(math.log(2))  # policy = reference: log 2
    counts = torch.tensor([2.0, 2.0])
    loss, m = P.orpo_loss(chosen, counts, rejected, counts, lam=0.1)
    p_c, p_r = torch.exp(chosen / 2), torch.exp(rejected / 2)
    ratio = torch.log(p_c / (1 - p_c)) - torch.log(p_r / (1 - p_r))
    nll = -(chosen.sum() / 4)
    assert m["log_odds_ratio"].item() == pytest.approx(ratio.mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(
        (nll - 0.1 * torch.nn.functional.logsigmoid(ratio).mean()).item(), rel=1e-5)


# ------------------------------------------------------------------- distillation jobs
@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A 4-layer teacher pre-trained for 150 steps on the demo corpus (held-out loss about
    1.2 nats/token), and the student ShortGPT makes of it: the layer of lowest block influence
    removed (held-out about 1.4). Built in-process: a few seconds."""
    from ops.perplexity import sliding_window_nll
    from ops.scale_layers import (apply_layer_map, block_influence, lowest_influence,
                                  removal_map)
    from ops.tiny_llama import build_llama, llama_config, pack_blocks, train_bpe_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine, 1 thread beats 2 that wait for each other
    torch.manual_seed(0)
    paragraphs = [p for p in (REPO / "assets/demo/corpus.txt").read_text().split("\n\n")
                  if p.strip()]
    tokenizer = train_bpe_tokenizer(paragraphs[:1000], vocab_size=300)
    config = llama_config(tokenizer, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                          intermediate_size=64, max_positions=256)
    teacher = build_llama(config, seed=0).train()
    blocks = pack_blocks(tokenizer("\n\n".join(paragraphs[:1500]))["input_ids"], 48)
    steps = 150
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = blocks[torch.randint(0, len(blocks), (16,), generator=g)]
        loss = teacher(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    teacher.eval()
    student = copy.deepcopy(teacher)
    influence = block_influence(student, list(blocks[:16].split(8)))
    apply_layer_map(student, removal_map(4, lowest_influence(influence, 1)))
    root = tmp_path_factory.mktemp("pruned")
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    held_out = torch.tensor(tokenizer((REPO / "assets/demo/heldout.txt").read_text()[:8000])
                            ["input_ids"])

    def held_out_loss(model) -> float:
        return sliding_window_nll(model.eval(), held_out, 48, 48).nll_per_token

    # recovery data: unseen paragraphs in pieces of about 200 characters (less than an epoch)
    text = " ".join(" ".join(paragraphs[3000:3100]).split())
    pieces = [text[i:i + 200] for i in range(0, len(text), 200)]
    data = write_jsonl(root / "recovery.jsonl", [{"text": p} for p in pieces])
    torch.set_num_threads(threads)
    return {"root": root, "data": data, "held_out_loss": held_out_loss,
            "teacher_loss": held_out_loss(teacher), "pruned_loss": held_out_loss(student)}


def recovery_config(pruned, **kw):
    return {"checkpoint": str(pruned["root"] / "student"), "data": str(pruned["data"]),
            "method": "full", "max_steps": 30, "batch_size": 8, "learning_rate": 3e-3,
            "lr_scheduler": "constant", "warmup_ratio": 0.0, "max_length": 64,
            "logging_steps": 10, "save_steps": 0, "seed": 1, **kw}


def test_distillation_recovers_a_pruned_model_better_than_the_lm_loss(lab, pruned):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    teacher = str(pruned["root"] / "teacher")
    status, job, (sft,) = run_job(lab, recovery_config(pruned, name="sft"))
    assert status == "succeeded", job["error"]
    status, job, (distilled,) = run_job(lab, recovery_config(
        pruned, name="distilled", objective="distill", teacher=teacher))
    assert status == "succeeded", job["error"]
    status, job, (adapter,) = run_job(lab, recovery_config(
        pruned, name="distilled-lora", objective="distill", teacher=teacher, method="lora",
        lora_r=8, lora_dropout=0.0, learning_rate=1e-2))
    assert status == "succeeded", job["error"]

    loss_of = pruned["held_out_loss"]
    sft_loss = loss_of(AutoModelForCausalLM.from_pretrained(sft["path"]))
    distill_loss = loss_of(AutoModelForCausalLM.from_pretrained(distilled["path"]))
    lora_loss = loss_of(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        pruned["root"] / "student"), adapter["path"]))
    print(f"\nheld-out nats/token: teacher {pruned['teacher_loss']:.4f}, pruned "
          f"{pruned['pruned_loss']:.4f}, LM loss 30 steps {sft_loss:.4f}, distill 30 steps "
          f"{distill_loss:.4f}, distill LoRA 30 steps {lora_loss:.4f}")
    assert distill_loss < sft_loss < pruned["pruned_loss"]
    assert lora_loss < pruned["pruned_loss"]

    with lab.registry() as reg:
        roles = {p["parent_name"]: p["role"] for p in reg.parents(distilled["id"])}
        lora_roles = {p["parent_name"]: p["role"] for p in reg.parents(adapter["id"])}
        metrics = {m["name"] for m in reg.metrics(job["id"])}
    assert roles == {"student": None, "teacher": "teacher"}
    assert lora_roles == {"student": "base", "teacher": "teacher"}
    meta = json.loads(distilled["metadata"])
    assert meta["objective"] == "distill" and meta["teacher"]["name"] == "teacher"
    assert {"distill_loss", "lm_loss", "loss"} <= metrics


def test_a_teacher_with_another_tokenizer_is_refused(lab, pruned, tiny_model_dir):
    status, job, made = run_job(lab, recovery_config(pruned, objective="distill",
                                                     teacher=str(tiny_model_dir)))
    assert status == "failed" and made == []
    assert "teacher: tiny-llama has another tokenizer than checkpoint student" in job["error"]


# ------------------------------------------------------------------- preference jobs
@pytest.fixture(scope="module")
def chooser_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a larger LM head (logits at init scale are all near 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("pref") / "tiny-pref"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def pairs(n=32):
    return [{"question": f"color {i % 8}:", "good": f" {WORDS[i % 8]}",
             "bad": f" {WORDS[(i + 3) % 8]}"} for i in range(n)]


def margin(model, tokenizer, rows) -> float:
    """Mean over pairs of log p(chosen | prompt) - log p(rejected | prompt)."""
    encoded = P.encode_pairs_batch(tokenizer, [r["question"] for r in rows],
                                   [r["good"] for r in rows], [r["bad"] for r in rows], 64)
    batch = P.PairCollator(tokenizer.pad_token_id)(
        [dict(zip(encoded, values)) for values in zip(*encoded.values())])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    total, _ = P.sequence_logps(logits, batch["labels"])
    return (total[:len(rows)] - total[len(rows):]).mean().item()


@pytest.mark.parametrize("objective,method", [("dpo", "full"), ("dpo", "lora"),
                                              ("orpo", "full")])
def test_preference_tuning_grows_the_chosen_rejected_margin(lab, chooser_dir, tmp_path,
                                                            objective, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs())
    config = base_config(chooser_dir, data, method=method, objective=objective,
                         prompt_column="question", chosen_column="good", rejected_column="bad",
                         max_steps=20, batch_size=8, logging_steps=1, learning_rate=3e-3 if method == "full"
                         else 1e-2, beta=0.1 if objective == "dpo" else 1.0)
    status, job, (ck,) = run_job(lab, config)
    assert status == "succeeded", job["error"]
    tokenizer = AutoTokenizer.from_pretrained(chooser_dir)
    start = AutoModelForCausalLM.from_pretrained(chooser_dir).eval()
    before = margin(start, tokenizer, pairs(8))
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chooser_dir),
                                        ck["path"]) if method == "lora" else \
        AutoModelForCausalLM.from_pretrained(ck["path"])
    after = margin(trained.eval(), tokenizer, pairs(8))
    with lab.registry() as reg:
        logged = [m["value"] for m in reg.metrics(job["id"]) if m["name"] == "logratio_margin"]
        edges = {p["parent_name"]: p["role"] for p in reg.parents(ck["id"])}
    print(f"\n{objective} {method}: log p(chosen) - log p(rejected) {before:.3f} -> "
          f"{after:.3f}; logged margin {[round(v, 2) for v in logged]}")
    assert after > before + 1.0
    assert len(logged) == 20  # one per step, the training batch's mean
    if objective == "dpo":  # at step 1 the policy is the reference: a margin of exactly 0
        assert abs(logged[0]) < 1e-4
    assert sum(logged[-5:]) / 5 > logged[0] + 0.5
    meta = json.loads(ck["metadata"])
    assert meta["objective"] == objective and meta["data"]["format"] == "pairs"
    if objective == "dpo" and method == "full":  # the start is the reference (the default)
        assert edges == {"tiny-pref": "reference"}
        assert meta["reference"]["name"] == "tiny-pref" and meta["beta"] == 0.1
    elif objective == "dpo":  # an adapter's reference is its base, the adapter switched off
        assert edges == {"tiny-pref": "base"} and meta["reference"]["adapter_disabled"]
    else:
        assert edges == {"tiny-pref": None} and "reference" not in meta


def test_pairs_preview_and_a_missing_column_named(lab, tiny_model_dir, tmp_path):
    import plugins
    from app import forms
    from app.ui import preview_data

    data = write_jsonl(tmp_path / "pairs.jsonl",
                       [{"prompt": r["question"], "chosen": r["good"], "rejected": r["bad"]}
                        for r in pairs(12)])
    specs = forms.form_spec(plugins.get("train").Config)

    def values(**kw):
        return forms.config_to_values(specs, {"checkpoint": str(tiny_model_dir),
                                              "objective": "dpo", "data": str(data), **kw})

    shown = preview_data(lab, "train", values())
    assert "**12 pairs** · objective **dpo**" in shown
    assert "prompt: color 0:" in shown and "chosen:  red" in shown and "rejected:  black" \
        in shown
    assert "missing column 'reject' (rejected_column) for objective dpo" in preview_data(
        lab, "train", values(rejected_column="reject"))
    status, job, made = run_job(lab, base_config(tiny_model_dir, data, objective="orpo",
                                                 chosen_column="better"))
    assert status == "failed" and made == []
    assert "data: missing column 'better' (chosen_column) for objective orpo" in job["error"]


def test_lineage_gives_the_teacher_or_reference_its_own_edge_or_role():
    from types import SimpleNamespace

    from plugins.train.objectives import Setup, lineage

    start, other = SimpleNamespace(id="ck-a"), SimpleNamespace(id="ck-b")

    def edges(base, extra):
        got = lineage(base, Setup(None, None, [extra], {}))
        return [(e["checkpoint"].id, e.get("role")) for e in got]

    assert edges({"checkpoint": start}, {"checkpoint": other, "role": "reference"}) == \
        [("ck-a", None), ("ck-b", "reference")]
    assert edges({"checkpoint": start}, {"checkpoint": start, "role": "reference"}) == \
        [("ck-a", "reference")]  # a full fine-tune of its own reference
    assert edges({"checkpoint": start, "role": "base"},
                 {"checkpoint": start, "role": "reference"}) == [("ck-a", "base")]
    assert lineage({"checkpoint": start}, None) == [{"checkpoint": start}]


def test_objective_fields_are_refused_where_they_mean_nothing(lab, tiny_model_dir, tmp_path):
    from app import jobs
    from plugins import ConfigError

    config = base_config(tiny_model_dir, tmp_path)
    with pytest.raises(ConfigError, match="field 'teacher'.*objective distill needs a teacher"):
        jobs.submit(lab, "train", {**config, "objective": "distill"})
    with pytest.raises(ConfigError, match="field 'teacher'.*read only by objective distill"):
        jobs.submit(lab, "train", {**config, "teacher": str(tiny_model_dir)})
    with pytest.raises(ConfigError, match="field 'reference'.*read only by objective dpo"):
        jobs.submit(lab, "train", {**config, "objective": "orpo",
                                   "reference": str(tiny_model_dir)})
