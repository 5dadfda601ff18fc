"""continue_pretrain: the schedule, replay counting, packing, vocabulary extension, and jobs
that record the stability-gap curve."""

import json
import math

import pytest
import torch

from ops.continual import (ContinualError, extend_vocabulary, pack_documents, replay_order,
                           rewarm_cosine)
from tests.conftest import REPO


# ------------------------------------------------------------------------------- pieces
def test_packing_puts_a_separator_after_every_document():
    blocks = pack_documents([[5, 6], [7], [8, 9, 10]], 4, separator=2)
    assert blocks.tolist() == [[5, 6, 2, 7], [2, 8, 9, 10]]  # the ragged tail [2] is dropped
    with pytest.raises(ContinualError, match="fewer than one block of 16"):
        pack_documents([[1, 2]], 16, 0)


def test_rewarm_then_cosine_shape():
    lr = [rewarm_cosine(s, 100, 10, 1e-3, 1e-4) for s in range(101)]
    assert lr[0] == 0 and lr[5] == pytest.approx(5e-4) and lr[10] == pytest.approx(1e-3)
    assert lr[55] == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way down the cosine
    assert lr[100] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))  # decays monotonically


@pytest.mark.parametrize("ratio,batch", [(0.25, 8), (0.1, 10), (0.5, 4), (0.0, 8)])
def test_replay_ratio_holds_in_every_batch(ratio, batch):
    order = replay_order(n_domain=7, n_replay=3, samples=400, replay_ratio=ratio, seed=1)
    replay = [p == "replay" for p, _ in order]
    assert sum(replay) == math.floor(400 * ratio)
    for start in range(0, 400, batch):
        assert abs(sum(replay[start:start + batch]) - ratio * batch) <= 1
    # small pools are cycled in reshuffled passes: every item used equally often (±1)
    counts = [sum(1 for p, i in order if p == "domain" and i == k) for k in range(7)]
    assert max(counts) - min(counts) <= 1


def test_vocabulary_extension_initialises_new_rows_to_the_sub_token_mean(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    emb = model.get_input_embeddings().weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    pieces = extend_vocabulary(model, tok, ["thrombocytopenia", "angioplasty"])
    assert len(pieces["thrombocytopenia"]) > 1
    new_id = tok.convert_tokens_to_ids("thrombocytopenia")
    assert new_id == 400 and len(tok) == 402
    assert tok("thrombocytopenia", add_special_tokens=False)["input_ids"] == [new_id]
    new_emb = model.get_input_embeddings().weight
    assert torch.allclose(new_emb[new_id], emb[pieces["thrombocytopenia"]].mean(0))
    assert torch.allclose(model.lm_head.weight[new_id], head[pieces["thrombocytopenia"]]
                          .mean(0))
    assert torch.equal(new_emb[:400], emb)
    with pytest.raises(ContinualError, match="already in the vocabulary"):
        extend_vocabulary(model, tok, ["thrombocytopenia"])


# ------------------------------------------------------------------------------ as jobs
def run_job(lab, data, plugin="continue_pretrain"):
    from tests.test_train import run_job as run

    return run(lab, data, plugin=plugin)


@pytest.fixture
def domain_file(tmp_path):
    """A 'medical' domain corpus, unlike the demo text."""
    words = ["patient", "dose", "renal", "cardiac", "therapy", "acute", "chronic", "biopsy"]
    docs = [" ".join(words[(i * 3 + j) % 8] for j in range(40)) for i in range(60)]
    path = tmp_path / "medical.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_continue_pretrain_records_schedule_replay_and_stability_gap(lab, tiny_model_dir,
                                                                      domain_file):
    config = {"checkpoint": str(tiny_model_dir), "data": str(domain_file),
              "replay_data": str(REPO / "assets" / "demo" / "heldout.txt"),
              "replay_ratio": 0.25, "block_size": 32, "max_steps": 24, "batch_size": 4,
              "max_learning_rate": 5e-3, "min_learning_rate": 5e-4, "warmup_ratio": 0.25,
              "eval_steps": 8, "logging_steps": 2, "eval_blocks": 4, "save_steps": 0,
              "new_tokens": ["cardiac"]}
    status, job, (ck,) = run_job(lab, config)
    assert status == "succeeded", job["error"]
    assert ck["relation"] == "continue_pretrain"
    meta = json.loads(ck["metadata"])
    # the learning rate the Trainer logged follows the configured re-warm + cosine
    with lab.registry() as reg:
        metrics = reg.metrics(job["id"])
        scores = {(e["task"], e["metric"]) for e in reg.evaluations(ck["id"])}
    logged = {m["step"]: m["value"] for m in metrics if m["name"] == "learning_rate"}
    assert sorted(logged) == list(range(2, 25, 2))
    for step, value in logged.items():  # the rate the step-th update used (0-based index)
        assert value == pytest.approx(rewarm_cosine(step - 1, 24, 6, 5e-3, 5e-4),
                                      rel=1e-6), step
    # replay: exactly a quarter of the 96 blocks served came from the general text
    assert meta["served"] == {"domain": 72, "replay": 24}
    # the stability-gap curve at steps 0, 8, 16, 24, on both held-out sets
    curve = meta["stability_gap"]
    assert [p["step"] for p in curve] == [0, 8, 16, 24]
    assert all(p["domain"] > 1 and p["general"] > 1 for p in curve)
    live = {(m["name"], m["step"]) for m in metrics}
    assert {("domain_ppl", 0), ("general_ppl", 24)} <= live
    assert meta["domain_gain"]["gain"] == pytest.approx(curve[0]["domain"]
                                                        - curve[-1]["domain"])
    assert meta["forgetting"]["rise"] == pytest.approx(curve[-1]["general"]
                                                       - curve[0]["general"])
    assert meta["domain_gain"]["gain"] > 0  # it learned the domain
    assert ("cpt:domain", "perplexity") in scores
    assert meta["tokenizer_change"]["vocab_size"] == [400, 401]
    saved = json.loads((lab.checkpoints_dir / ck["id"] / "config.json").read_text())
    assert saved["vocab_size"] == 401


def test_llama_pro_style_training_of_the_new_blocks_only(lab, tiny_model_dir, domain_file):
    from safetensors.torch import load_file

    status, job, (grown,) = run_job(lab, {"checkpoint": str(tiny_model_dir),
                                          "method": "block_expansion", "expand_every": 2},
                                    plugin="scale_layers")
    assert status == "succeeded", job["error"]
    status, job, (ck,) = run_job(lab, {"checkpoint": grown["id"], "data": str(domain_file),
                                       "trainable_layers": "new", "block_size": 32,
                                       "max_steps": 3, "batch_size": 2, "eval_steps": 3,
                                       "eval_blocks": 2, "save_steps": 0})
    assert status == "succeeded", job["error"]
    before = load_file(f"{grown['path']}/model.safetensors")
    after = load_file(f"{ck['path']}/model.safetensors")
    changed = {k.split(".")[2] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"2"}  # 2 layers, expand every 2: the new block is layer 2
    from app.ui import suggested_next  # the Registry preselects this step for a grown model

    plugin, hint = suggested_next(lab, grown["id"])
    assert plugin == "continue_pretrain" and "trainable_layers: new" in hint


@pytest.mark.parametrize("extra,message", [
    ({"replay_ratio": 0.3}, "replay_ratio > 0 needs replay_data"),
    ({"min_learning_rate": 0.1, "max_learning_rate": 0.01}, "must not exceed"),
    ({"block_size": 1024}, r"block_size \(1024\) exceeds the model's max_position_embeddings"),
    ({"eval_blocks": 4000, "block_size": 64}, "would leave none to train on"),
])
def test_bad_requests_get_clear_errors(lab, tiny_model_dir, domain_file, extra, message):
    from app import jobs
    from plugins import ConfigError

    config = {"checkpoint": str(tiny_model_dir), "data": str(domain_file), "max_steps": 2,
              **extra}
    try:
        job = jobs.submit(lab, "continue_pretrain", config)
    except ConfigError as e:
        assert __import__("re").search(message, str(e)), str(e)
        return
    from tests.test_jobs import run_to_end

    assert run_to_end(lab, job["id"], timeout=120) == "failed"
    with lab.registry() as reg:
        error = reg.job(job["id"])["error"]
    assert __import__("re").search(message, error), error


# ------------------------------------------------------------ domain upsampling at the end
@pytest.mark.parametrize("steps,per_step,ratio,fraction,share", [
    (24, 4, 0.25, 0.25, 1.0), (50, 8, 0.5, 0.2, 0.8), (7, 3, 0.3, 0.1, 0.9),
    (10, 5, 0.9, 0.5, 0.35)])
def test_upsample_end_phases_hold_their_mix_exactly(steps, per_step, ratio, fraction, share):
    from ops.continual import mixture_phases, phased_order

    phases = mixture_phases(steps, per_step, ratio, "upsample_end", fraction, share)
    main, up = phases
    last = max(1, round(fraction * steps))
    assert (main["first_step"], main["last_step"]) == (1, steps - last)
    assert (up["first_step"], up["last_step"]) == (steps - last + 1, steps)
    assert up["replay_ratio"] == pytest.approx(1 - share)
    order = phased_order(9, 5, [p["samples"] for p in phases],
                         [p["replay_ratio"] for p in phases], seed=3)
    assert len(order) == steps * per_step
    cut = main["samples"]
    for phase, part in ((main, order[:cut]), (up, order[cut:])):
        replay = sum(p == "replay" for p, _ in part)
        assert {"domain": len(part) - replay, "replay": replay} == phase["blocks"]
        assert replay == math.floor(phase["samples"] * phase["replay_ratio"])
        for start in range(0, len(part), per_step):  # every step gets its share, to within one
            got = sum(p == "replay" for p, _ in part[start:start + per_step])
            assert abs(got - phase["replay_ratio"] * per_step) <= 1
    constant = mixture_phases(steps, per_step, ratio)
    assert [p["phase"] for p in constant] == ["constant"]
    assert phased_order(9, 5, [constant[0]["samples"]], [ratio], 3) == \
        replay_order(9, 5, steps * per_step, ratio, 3)  # the old stream, unchanged


def test_mixture_phases_refuse_bad_settings():
    from ops.continual import mixture_phases

    with pytest.raises(ContinualError, match="upsample_fraction must lie in"):
        mixture_phases(10, 2, 0.5, "upsample_end", 0.6, 1.0)
    with pytest.raises(ContinualError, match="upsample_domain_ratio must lie in"):
        mixture_phases(10, 2, 0.5, "upsample_end", 0.2, 0.0)
    with pytest.raises(ContinualError, match="is not constant or upsample_end"):
        mixture_phases(10, 2, 0.5, "cosine")
    one = mixture_phases(1, 4, 0.5, "upsample_end", 0.2, 1.0)  # a single step: all upsampled
    assert [p["phase"] for p in one] == ["upsample"]


@pytest.mark.parametrize("extra,message", [
    ({"mixture_schedule": "upsample_end"}, "needs replay_ratio > 0"),
    ({"mixture_schedule": "upsample_end", "replay_ratio": 0.25, "replay_data": "g.txt",
      "upsample_domain_ratio": 0.7}, r"upsample_domain_ratio \(0.7\) must exceed"),
    ({"mixture_schedule": "upsample_end", "replay_ratio": 0.25, "replay_data": "g.txt",
      "upsample_fraction": 0.6}, "field 'upsample_fraction'"),
])
def test_upsample_settings_are_checked_before_queueing(extra, message):
    import plugins
    from plugins import ConfigError

    with pytest.raises(ConfigError, match=message):
        plugins.validate_config(plugins.get("continue_pretrain"),
                                {"checkpoint": "ck-12345678", "data": "d.txt", **extra})


def test_upsample_end_job_serves_each_phase_exactly(lab, tiny_model_dir, domain_file):
    """24 steps of 4 blocks at replay 0.25, the last 25% (6 steps) domain only: the served
    counts per phase are the schedule's, block for block."""
    config = {"checkpoint": str(tiny_model_dir), "data": str(domain_file),
              "replay_data": str(REPO / "assets" / "demo" / "heldout.txt"),
              "replay_ratio": 0.25, "mixture_schedule": "upsample_end",
              "upsample_fraction": 0.25, "upsample_domain_ratio": 1.0, "block_size": 32,
              "max_steps": 24, "batch_size": 4, "eval_steps": 12, "logging_steps": 12,
              "eval_blocks": 4, "save_steps": 0}
    status, job, (ck,) = run_job(lab, config)
    assert status == "succeeded", job["error"]
    meta = json.loads(ck["metadata"])
    phases = meta["mixture_schedule"]["phases"]
    assert [(p["phase"], p["first_step"], p["last_step"]) for p in phases] == \
        [("main", 1, 18), ("upsample", 19, 24)]
    assert meta["served_by_phase"] == {"main": {"domain": 54, "replay": 18},
                                       "upsample": {"domain": 24, "replay": 0}}
    assert meta["served_by_phase"] == {p["phase"]: p["blocks"] for p in phases}
    assert meta["served"] == {"domain": 78, "replay": 18}
