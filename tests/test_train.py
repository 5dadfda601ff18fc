"""The train plugin: encoding, parameter selection, and jobs on a tiny model (LoRA, DoRA,
HFT, freeze, adapter merge, intermediate checkpoints, tokenization cache, resume, bad input)."""

import json

import pytest
import torch

from ops import training as T
from tests.conftest import wait_for

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n"
                 "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def sft_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a larger LM head. At init scale (std 0.02, hidden 32) the frozen head
    caps every logit below ~0.7, so no adapter could make a prediction confident."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sft") / "tiny-sft"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arithmetic_rows(n=64):
    """A small synthetic task a tiny model can learn: the word after a fixed cue."""
    words = ["red", "green", "blue", "black", "white", "pink", "gold", "gray"]
    return [{"prompt": f"color {i % 8}:", "completion": f" {words[i % 8]}"} for i in range(n)]


# ------------------------------------------------------------------------------ encoding
def test_prompt_completion_masks_the_prompt(tokenizer):
    row = T.encode_prompt_completion(tokenizer, "color 1:", " green", True, 64)
    n_prompt = len(tokenizer("color 1:")["input_ids"])
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    full = T.encode_prompt_completion(tokenizer, "color 1:", " green", False, 64)
    assert full["labels"] == full["input_ids"]
    assert len(T.encode_prompt_completion(tokenizer, "color 1:", " green", True, 3)
               ["input_ids"]) == 3


def test_messages_learn_only_the_assistant_turns(tokenizer):
    msgs = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye now"}]
    row = T.encode_messages(tokenizer, msgs, True, 512, CHAT_TEMPLATE)
    learned = tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"])
                                if l != -100])
    assert "hello" in learned and "bye now" in learned
    assert "hi there" not in learned and "and?" not in learned and "user" not in learned


def test_pad_collator_pads_labels_with_ignore():
    batch = T.PadCollator(3)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                              {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def row_by_row(tokenizer, fmt, row, completion_only, max_length):
    """The reference: one row at a time, as cached_tokenize did before it batched."""
    eos = [tokenizer.eos_token_id]
    if fmt == "prompt_completion":
        p = tokenizer(row["prompt"])["input_ids"]
        c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
        ids = (p + c)[:max_length]
        return ids, ([-100] * len(p) + c)[:max_length] if completion_only else ids
    if fmt == "text":
        ids = (tokenizer(row["text"])["input_ids"] + eos)[:max_length]
        return ids, ids
    enc = T.encode_messages(tokenizer, row["messages"], completion_only, max_length,
                            CHAT_TEMPLATE)
    return enc["input_ids"], enc["labels"]


@pytest.mark.parametrize("fmt", ["prompt_completion", "text", "messages"])
@pytest.mark.parametrize("completion_only", [True, False])
def test_batched_tokenization_equals_row_by_row(tokenizer, tmp_path, fmt, completion_only):
    import datasets

    from plugins.kit.data import cached_tokenize
    from plugins.train import Config, encoder

    words = ["red", "green  blue", "", "é ü ß", "x" * 40, "the quick brown fox jumps"]
    rows = []
    for i in range(2500):  # more than one datasets.map batch
        a, b = words[i % 6], words[(i * 5 + 1) % 6] + f" {i}"
        rows.append({"prompt_completion": {"prompt": a, "completion": b}, "text": {"text": a + b},
                     "messages": {"messages": [{"role": "user", "content": a},
                                               {"role": "assistant", "content": b}]}}[fmt])
    config = Config(checkpoint="x", data="d", data_format=fmt, max_length=12,
                    completion_only_loss=completion_only, chat_template=CHAT_TEMPLATE)
    ds = datasets.Dataset.from_list(rows)
    options = {"format": fmt, "completion_only": completion_only}
    got, key, hit = cached_tokenize(ds, "fingerprint", tokenizer, options,
                                    encoder(config, fmt, tokenizer), tmp_path, log=str)
    assert not hit and got.column_names == ["input_ids", "labels"]
    expected = [row_by_row(tokenizer, fmt, r, completion_only, 12) for r in rows]
    assert got["input_ids"] == [ids for ids, _ in expected]
    assert got["labels"] == [labels for _, labels in expected]
    assert any(len(ids) == 12 for ids, _ in expected)  # truncation is exercised
    again, key_again, hit = cached_tokenize(ds, "fingerprint", tokenizer, options,
                                            encoder(config, fmt, tokenizer), tmp_path, log=str)
    assert hit and key_again == key and again["labels"] == got["labels"]


# ------------------------------------------------------------------ parameter selection
def tiny(layers=4):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, num_hidden_layers=layers,
                                  num_attention_heads=2, num_key_value_heads=1,
                                  intermediate_size=32)
    return AutoModelForCausalLM.from_config(config)


def test_hft_selects_half_of_each_category():
    model = tiny()
    chosen = T.hft_selection(model, seed=3)
    assert chosen == T.hft_selection(model, seed=3)  # recorded choice is reproducible
    assert chosen != T.hft_selection(model, seed=4)
    for i in range(4):
        mine = [n for n in chosen if n.startswith(f"model.layers.{i}.")]
        assert sum(".self_attn." in n for n in mine) == 2
        assert sum(".mlp." in n for n in mine) == (2 if i % 2 == 0 else 1)
        assert sum("layernorm" in n for n in mine) == 1
    outside = [n for n in chosen if not n.startswith("model.layers.")]
    assert outside in (["model.embed_tokens.weight"], ["model.norm.weight", "lm_head.weight"])
    matrices = [n for n, _ in model.named_parameters() if n.endswith("_proj.weight")]
    assert sum(n in chosen for n in matrices) == len(matrices) // 2  # 14 of 28


def test_layer_selection_rejects_missing_layers():
    with pytest.raises(T.TrainError, match=r"trainable_layers \[7\] are outside the model's "
                                           r"layers 0..3"):
        T.layer_parameter_names(tiny(), [1, 7])


# ---------------------------------------------------------------------------- as jobs
def run_job(lab, data, plugin="train"):
    from app import jobs
    from tests.test_jobs import run_to_end

    job = jobs.submit(lab, plugin, data)
    status = run_to_end(lab, job["id"], timeout=240)
    with lab.registry() as reg:
        return status, reg.job(job["id"]), [reg.checkpoint(c) for c in
                                            reg.job_checkpoints(job["id"])]


def base_config(tiny_model_dir, data, **kw):
    return {"checkpoint": str(tiny_model_dir), "data": str(data), "max_steps": 30,
            "batch_size": 8, "learning_rate": 1e-2, "logging_steps": 5, "save_steps": 0,
            "warmup_ratio": 0.0, "lora_dropout": 0.0, **kw}


def test_lora_lowers_the_loss_and_merges_to_the_same_logits(lab, sft_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "colors.jsonl", arithmetic_rows())
    status, job, made = run_job(lab, base_config(sft_model_dir, data, method="lora",
                                                 merge_adapter=True, save_steps=10,
                                                 eval_fraction=0.25))
    assert status == "succeeded", job["error"]
    steps = [c for c in made if json.loads(c["metadata"]).get("intermediate")]
    adapter = next(c for c in made if c["name"] == "tiny-sft-lora")
    merged = next(c for c in made if c["relation"] == "adapter_merge")
    # step 30 is the final model, registered once as tiny-sft-lora (issue 20)
    assert [json.loads(c["metadata"])["step"] for c in steps] == [10, 20]
    assert all(c["relation"] == "adapter" for c in steps)
    with lab.registry() as reg:
        metrics = reg.metrics(job["id"])
        parents = {p["parent_id"]: p for p in reg.parents(merged["id"])}
        adapter_parent = reg.parents(adapter["id"])[0]
    losses = [m["value"] for m in metrics if m["name"] == "loss"]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    assert {m["name"] for m in metrics} >= {"loss", "learning_rate", "grad_norm",
                                           "tokens_per_second", "eval_loss"}
    assert adapter_parent["parent_name"] == "tiny-sft" and adapter_parent["role"] == "base"
    assert set(parents) == {adapter["id"], adapter_parent["parent_id"]}
    assert {p["role"] for p in parents.values()} == {"adapter", "base"}

    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(sft_model_dir)
    with_adapter = PeftModel.from_pretrained(base, adapter["path"]).eval()
    full = AutoModelForCausalLM.from_pretrained(merged["path"]).eval()
    with torch.no_grad():
        a, b = with_adapter(input_ids=x).logits, full(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    meta = json.loads(adapter["metadata"])
    assert meta["data"]["format"] == "prompt_completion" and meta["final_eval_loss"] > 0
    assert meta["trainable_parameters"] < meta["total_parameters"] / 2


def test_max_steps_below_save_steps_registers_the_final_model_once(lab, tiny_model_dir,
                                                                  tmp_path):
    """transformers saves at the last step whatever save_steps says; that save is the final
    model, not an intermediate checkpoint of its own (issue 20: NAME-step3 and NAME, with
    identical files)."""
    data = write_jsonl(tmp_path / "colors.jsonl", arithmetic_rows())
    status, job, made = run_job(lab, base_config(tiny_model_dir, data, method="full",
                                                 max_steps=3, save_steps=100, name="once"))
    assert status == "succeeded", job["error"]
    assert [c["name"] for c in made] == ["once"]
    assert json.loads(made[0]["metadata"])["steps"] == 3
    assert not (lab.root / "runs" / job["id"]).exists()


def test_merge_adapter_folds_a_registered_adapter_into_its_base(lab, sft_model_dir, tmp_path):
    """The standalone "Merge adapter into base" action, on an adapter trained earlier."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "colors.jsonl", arithmetic_rows())
    status, job, (adapter,) = run_job(lab, base_config(sft_model_dir, data, method="lora",
                                                       max_steps=4))
    assert status == "succeeded", job["error"]
    status, job, (merged,) = run_job(lab, {"adapter": adapter["id"]}, plugin="merge_adapter")
    assert status == "succeeded", job["error"]
    assert merged["relation"] == "adapter_merge" and merged["name"] == "tiny-sft-lora-merged"
    with lab.registry() as reg:
        base_id = reg.parents(adapter["id"])[0]["parent_id"]
        roles = {p["parent_id"]: p["role"] for p in reg.parents(merged["id"])}
    assert roles == {adapter["id"]: "adapter", base_id: "base"}

    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = AutoModelForCausalLM.from_pretrained(sft_model_dir).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        sft_model_dir), adapter["path"]).eval()
    full = AutoModelForCausalLM.from_pretrained(merged["path"]).eval()
    with torch.no_grad():
        a, b, c = with_adapter(input_ids=x).logits, full(input_ids=x).logits, \
            plain(input_ids=x).logits
    assert (a - c).abs().max() > 1e-3  # the adapter changed something to merge
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert "adapter_config.json" not in {f.name for f in
                                         __import__("pathlib").Path(merged["path"]).iterdir()}
    status, job, made = run_job(lab, {"adapter": base_id}, plugin="merge_adapter")
    assert status == "failed" and made == [] and "is not a peft adapter" in job["error"]


def test_hft_job_freezes_exactly_the_recorded_half(lab, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "colors.jsonl", arithmetic_rows())
    status, job, (ck,) = run_job(lab, base_config(tiny_model_dir, data, method="hft",
                                                  max_steps=5, seed=1))
    assert status == "succeeded", job["error"]
    assert ck["relation"] == "finetune"
    selection = set(json.loads(ck["metadata"])["hft_selection"])
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(f"{ck['path']}/model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == selection


def test_freeze_trains_only_the_new_blocks_of_a_block_expansion(lab, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    status, job, (grown,) = run_job(lab, {"checkpoint": str(tiny_model_dir),
                                          "method": "block_expansion", "expand_every": 1},
                                    plugin="scale_layers")
    assert status == "succeeded", job["error"]
    data = write_jsonl(tmp_path / "colors.jsonl", arithmetic_rows())
    status, job, (ck,) = run_job(lab, base_config(grown["id"], data, method="freeze",
                                                  trainable_layers="new", max_steps=3))
    assert status == "succeeded", job["error"]
    assert json.loads(ck["metadata"])["trainable_layers"] == [1, 3]
    before = load_file(f"{grown['path']}/model.safetensors")
    after = load_file(f"{ck['path']}/model.safetensors")
    changed = {k.split(".")[2] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1", "3"}


def test_dora_chat_data_and_the_tokenization_cache(lab, tiny_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"color {i % 8}?"},
                          {"role": "assistant", "content": r["completion"]}]}
            for i, r in enumerate(arithmetic_rows(32))]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    config = base_config(tiny_model_dir, data, method="dora", max_steps=2,
                         chat_template=CHAT_TEMPLATE)
    status, job, (ck,) = run_job(lab, config)
    assert status == "succeeded", job["error"]
    meta = json.loads(ck["metadata"])
    assert meta["data"]["format"] == "messages" and meta["data"]["cache_hit"] is False
    assert json.loads((lab.root / "checkpoints" / ck["id"] / "adapter_config.json")
                      .read_text())["use_dora"] is True
    status, job, (again,) = run_job(lab, {**config, "name": "again"})
    assert status == "succeeded", job["error"]
    second = json.loads(again["metadata"])["data"]
    assert second["cache_hit"] is True and second["tokenized_cache"] == meta["data"][
        "tokenized_cache"]
    assert "tokenized data: cache hit" in open(job["log_path"]).read()


def test_resume_after_a_cancel_reaches_the_same_loss(lab, tiny_model_dir, tmp_path):
    from app import jobs
    from app.scheduler import Scheduler
    from tests.test_jobs import run_to_end

    data = write_jsonl(tmp_path / "colors.jsonl", arithmetic_rows())
    config = base_config(tiny_model_dir, data, method="full", max_steps=150, save_steps=10,
                         learning_rate=1e-3, logging_steps=10)
    first = jobs.submit(lab, "train", config)
    scheduler = Scheduler(lab, poll_seconds=0.05)
    assert scheduler.acquire()
    try:
        def saved():
            scheduler.tick()
            with lab.registry() as reg:
                return reg.job_checkpoints(first["id"])
        wait_for(saved, 120, interval=0.05, what="the first intermediate checkpoint")
        jobs.cancel(lab, first["id"])

        def stopped():
            scheduler.tick()
            with lab.registry() as reg:
                return reg.job(first["id"])["status"] in ("cancelled", "failed", "succeeded")
        wait_for(stopped, 60, what="the cancel")
    finally:
        scheduler.release()
    with lab.registry() as reg:
        assert reg.job(first["id"])["status"] == "cancelled"
    from app.ui import resume_job  # the Jobs view's Resume button

    message, resumed_id = resume_job(lab, first["id"])
    assert resumed_id != first["id"], message
    assert run_to_end(lab, resumed_id, timeout=240) == "succeeded"
    with lab.registry() as reg:
        job = reg.job(resumed_id)
        made = [reg.checkpoint(c) for c in reg.job_checkpoints(resumed_id)]
    assert json.loads(job["config"])["resume_job"] == first["id"]
    resumed = json.loads(made[-1]["metadata"])
    assert resumed["resumed_from"]["job"] == first["id"]
    assert resumed["steps"] == 150
    status, job, made = run_job(lab, {**config, "name": "straight"})
    assert status == "succeeded", job["error"]
    straight = json.loads(made[-1]["metadata"])
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"],
                                                        rel=1e-4)
    assert not (lab.root / "runs" / first["id"]).exists()  # resume state removed when done


@pytest.mark.parametrize("rows,extra,message", [
    ([{"question": "a", "answer": "b"}], {}, "found none of the columns 'messages'"),
    ([{"prompt": "a", "answer": "b"}], {"data_format": "prompt_completion"},
     "missing column 'completion' for data_format prompt_completion"),
    ([], {}, "has no rows|no rows"),
    ([{"messages": [{"role": "user", "content": "x"}]}], {}, "has no chat template"),
    ([{"text": "abc"}], {"max_length": 4096}, r"max_length \(4096\) exceeds the model's "
                                              r"max_position_embeddings \(256\)"),
])
def test_bad_data_fails_with_a_clear_error(lab, tiny_model_dir, tmp_path, rows, extra,
                                           message):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, rows) if rows else data.write_text("")
    status, job, made = run_job(lab, base_config(tiny_model_dir, data, **extra))
    assert status == "failed" and made == []
    assert __import__("re").search(message, job["error"]), job["error"]


def test_the_metrics_plot_shows_losses_unless_told_otherwise():
    from app.ui import plotted_metrics

    names = ["eval_loss", "grad_norm", "learning_rate", "loss", "tokens_per_second"]
    assert plotted_metrics(names, None) == ["eval_loss", "loss"]
    assert plotted_metrics(names, ["grad_norm", "gone"]) == ["grad_norm"]
    assert plotted_metrics(["sparsity"], []) == ["sparsity"]


def test_qlora_on_a_lab_without_gpus_is_a_config_error(lab, tiny_model_dir, tmp_path):
    from app import jobs
    from plugins import ConfigError

    with pytest.raises(ConfigError, match="field 'method': qlora loads the base in 4 bits.*"
                                          "this lab has none"):
        jobs.submit(lab, "train", base_config(tiny_model_dir, tmp_path, method="qlora"))
    with pytest.raises(ConfigError, match="method freeze needs trainable_layers"):
        jobs.submit(lab, "train", base_config(tiny_model_dir, tmp_path, method="freeze"))
    with pytest.raises(ConfigError, match="field 'trainable_layers'.*comma-separated"):
        jobs.submit(lab, "train", base_config(tiny_model_dir, tmp_path, method="freeze",
                                              trainable_layers="1,x"))


def test_data_preview_before_run(lab, tiny_model_dir, tmp_path):
    """The form's "Preview data" button: first rows, format, lengths and what is learned,
    computed in a subprocess (the server never imports torch)."""
    import plugins
    from app import forms
    from app.ui import preview_data

    data = write_jsonl(tmp_path / "colors.jsonl", arithmetic_rows(40))
    specs = forms.form_spec(plugins.get("train").Config)

    def values(**kw):
        return forms.config_to_values(specs, {"checkpoint": str(tiny_model_dir),
                                              "data": str(data), **kw})

    shown = preview_data(lab, "train", values(max_length=8))
    assert "**40 rows** · format **prompt_completion**" in shown
    assert "token lengths of the first 40 rows: min" in shown and "reach max_length 8" in shown
    assert '"prompt": "color 0:"' in shown and "learned:  red&lt;/s&gt;" in shown
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    assert "found none of the columns" in preview_data(lab, "train", values(data=str(bad)))
    assert "No preview: fix these fields" in preview_data(lab, "train",
                                                          values(method="freeze"))
    shown = preview_data(lab, "continue_pretrain", forms.config_to_values(
        forms.form_spec(plugins.get("continue_pretrain").Config),
        {"checkpoint": str(tiny_model_dir), "data": str(tmp_path / "colors.jsonl"),
         "text_column": "prompt", "block_size": 16}))
    assert "**data**: 40 documents" in shown and "blocks of 16" in shown


# ----------------------------------------------------------------- padding-free batches
def variable_rows(n=48, seed=0):
    """Prompt/completion rows of very different lengths (3 to ~60 tokens)."""
    import random

    rnd = random.Random(seed)
    words = ["red", "green", "blue", "black", "white", "pink", "gold", "gray"]
    return [{"prompt": " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 30))) + ":",
             "completion": " " + " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 12)))}
            for _ in range(n)]


def test_packed_rows_hold_every_example_once_and_give_the_padded_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(0)
    lengths = [5, 17, 9, 30, 3, 12, 28, 2, 30, 1]
    examples = []
    for n in lengths:
        ids = torch.randint(3, 200, (n,), generator=gen).tolist()
        keep = torch.rand(n, generator=gen) > 0.3
        examples.append({"input_ids": ids, "labels": [t if k else T.IGNORE
                                                      for t, k in zip(ids, keep.tolist())]})
    packed = T.PackCollator(0)(examples)
    padded = T.PadCollator(0)(examples)
    rows, width = packed["input_ids"].shape
    assert width == max(lengths) and rows < len(lengths) and "attention_mask" not in packed
    assert packed["use_cache"] is False
    # every example once, in one row, its positions 0..n-1; its first label ignored
    placed = sorted(i for row in T.PackCollator.rows(lengths) for i in row)
    assert placed == list(range(len(lengths)))
    starts = (packed["position_ids"] == 0).sum().item()
    assert starts >= len(lengths)
    real = (packed["labels"] != T.IGNORE).sum().item()
    assert real == sum(sum(1 for t in e["labels"][1:] if t != T.IGNORE) for e in examples)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    assert T.packing_keeps_examples_apart(model)
    assert model.training  # the check leaves the mode as it was
    with torch.no_grad():
        a = model(**packed).loss.item()
        b = model(**padded).loss.item()
        cache_on = dict(packed, use_cache=True)
        c = model(**cache_on).loss.item()  # with a KV cache, examples see each other
    assert a == pytest.approx(b, rel=1e-5)
    assert abs(c - b) > 1e-4


def test_a_model_that_mixes_packed_examples_gets_length_grouped_batches(monkeypatch,
                                                                        tiny_model_dir):
    from plugins import train as plugin

    logged = []

    class Ctx:
        def log(self, message):
            logged.append(message)

    monkeypatch.setattr(T, "packing_keeps_examples_apart", lambda model: False)
    config = plugin.Config(checkpoint="x", data="d.jsonl")
    tok = type("Tok", (), {"pad_token_id": 0})()
    meta = {}
    collator, grouped = plugin.batching(config, Ctx(), None, tok, None, meta)
    assert grouped and isinstance(collator, T.PadCollator)
    assert meta["batching"] == "length_grouped" and "mixes packed examples" in logged[0]
    with pytest.raises(ValueError, match="batching: padding_free needs"):
        plugin.batching(config.model_copy(update={"batching": "padding_free"}), Ctx(), None,
                        tok, None, {})


def test_batching_other_than_auto_is_refused_for_preference_objectives():
    from plugins import ConfigError, get, validate_config

    with pytest.raises(ConfigError, match="field 'batching'.*applies to objective sft"):
        validate_config(get("train"), {"checkpoint": "x", "data": "d.jsonl", "objective": "dpo",
                                       "batching": "padding_free"})


def test_padding_free_training_follows_the_padded_loss_curve(lab, tiny_model_dir, tmp_path):
    """The same data, seed and steps, full fine-tuning (no dropout): the packed job's logged
    losses equal the padded job's within float noise; length-grouped batches also train."""
    data = write_jsonl(tmp_path / "var.jsonl", variable_rows())
    curves = {}
    for how in ("padded", "padding_free", "length_grouped"):
        status, job, made = run_job(lab, base_config(
            tiny_model_dir, data, method="full", max_steps=12, batch_size=8, logging_steps=1,
            learning_rate=1e-3, batching=how, name=f"ft-{how}"))
        assert status == "succeeded", job["error"]
        (ck,) = made
        meta = json.loads(ck["metadata"])
        assert meta["batching"] == how
        with lab.registry() as reg:
            curves[how] = [m["value"] for m in reg.metrics(job["id"]) if m["name"] == "loss"]
    assert len(curves["padded"]) == 12
    assert curves["padding_free"] == pytest.approx(curves["padded"], rel=1e-4)
    assert curves["length_grouped"][-1] < curves["length_grouped"][0]


def test_a_job_from_before_a_new_field_can_still_be_resumed():
    """A field added since the prior job ran (batching) counts as its default there; a
    setting that really differs still refuses the resume."""
    from plugins import train as plugin
    from plugins.kit.context import JobRecord
    from plugins.kit.trainer import check_resumable

    config = plugin.Config(checkpoint="ck-1", data="d.jsonl", resume_job="job-0123abcd")
    old = config.model_dump(mode="json")
    del old["batching"]
    old["resume_job"] = None

    class Ctx:
        job = {"plugin": "train"}

        def __init__(self, prior):
            self.prior = prior

        def job_record(self, job_id):
            return JobRecord(id=job_id, plugin="train", status="cancelled", config=self.prior)

    check_resumable(Ctx(old), config)  # no error
    with pytest.raises(ValueError, match=r"different settings \(batching\)"):
        check_resumable(Ctx(old), config.model_copy(update={"batching": "padded"}))
    with pytest.raises(ValueError, match=r"different settings \(learning_rate\)"):
        check_resumable(Ctx({**old, "learning_rate": 1e-3}), config)
