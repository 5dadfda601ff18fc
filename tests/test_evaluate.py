"""The evaluate plugin: local suites (multiple choice, generation), lm-eval, score reuse,
automatic evaluation, and its errors."""

import json
import math
import shutil

import pytest
import torch

from tests.conftest import REPO, last_json, run_cli, write_yaml


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
            AutoTokenizer.from_pretrained(tiny_model_dir))


def naive_choice_ll(model, tokenizer, context, choice):
    """One unpadded forward per (context, choice): the definition, not the batched path."""
    from ops.evaluation import encode_pair

    ctx, cont = encode_pair(tokenizer, context, choice)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))


ITEMS = [
    {"context": "The capital of Varnia is", "choices": [" Oskel", " Pell", " Amber Bay"]},
    {"context": "one plus one is ", "choices": ["two", "three", "eleven", "a boat"]},
    {"context": "The fox is", "choices": [" red", " green and very large"]},
    {"context": "", "choices": ["Clara was a farmer", "Ben"]},
]


def test_multiple_choice_matches_a_naive_loop_and_a_known_answer_pattern(tiny):
    from ops.evaluation import score_multiple_choice

    model, tokenizer = tiny
    lls = [[naive_choice_ll(model, tokenizer, it["context"], c) for c in it["choices"]]
           for it in ITEMS]
    best = [max(range(len(v)), key=v.__getitem__) for v in lls]
    best_norm = [max(range(len(v)), key=lambda c, v=v, it=it: v[c] / len(it["choices"][c]))
                 for v, it in zip(lls, ITEMS)]
    # answer pattern: the model is right on items 0 and 2, wrong on 1 and 3
    items = [dict(it, answer=best[k] if k in (0, 2) else (best[k] + 1) % len(it["choices"]))
             for k, it in enumerate(ITEMS)]
    for batch in (1, 3, 16):
        result = score_multiple_choice(model, tokenizer, items, batch_size=batch)
        assert result["acc"] == 0.5
        assert [p for p, _ in result["predictions"]] == best
        assert [p for _, p in result["predictions"]] == best_norm
        expected_norm = sum(best_norm[k] == it["answer"] for k, it in enumerate(items)) / 4
        assert result["acc_norm"] == expected_norm
        assert result["acc_stderr"] == pytest.approx(math.sqrt(0.25 * 4 / 3 / 4))

    from ops.evaluation import continuation_loglikelihoods, encode_pair

    got = continuation_loglikelihoods(
        model, [encode_pair(tokenizer, it["context"], c) for it in ITEMS for c in it["choices"]],
        batch_size=5)
    assert [ll for ll, _ in got] == pytest.approx([x for v in lls for x in v], abs=1e-4)


def test_generation_metrics():
    from ops.evaluation import cut_at_stop, generation_match

    assert generation_match("exact_match", " seven \n", "seven")
    assert not generation_match("exact_match", "seven apples", "seven")
    assert generation_match("exact_match", "Seven", "seven", ignore_case=True)
    assert not generation_match("exact_match", "Seven", "seven")
    assert generation_match("contains", "it is seven apples", " seven")
    assert not generation_match("contains", "it is eleven", "seven apples")
    assert generation_match("regex", "answer: 42.", r"\b4\d\b")
    assert not generation_match("regex", "answer: 142", r"\b4\d\b")
    with pytest.raises(ValueError, match="unknown generation metric 'bleu'"):
        generation_match("bleu", "a", "a")
    assert cut_at_stop("ten.\nnext", ["\n", "."]) == "ten"
    assert cut_at_stop("ten", ["\n"]) == "ten"


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny):
    from ops.evaluation import greedy_generate

    model, tokenizer = tiny
    prompts = ["The capital of", "one plus two is", "Clara walked to the market and",
               "A"]
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, until=[],
                              batch_size=4)
    for prompt, text in zip(prompts, batched):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        assert text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def make_suite(folder, mc_rows=None, gen_rows=None, extra_yaml=""):
    folder.mkdir(parents=True, exist_ok=True)
    mc_rows = mc_rows if mc_rows is not None else [
        {"context": "The capital of Varnia is", "choices": [" Oskel", " Pell"], "answer": 0},
        {"context": "The fox is", "choices": [" red", " blue"], "answer": " red"}]
    gen_rows = gen_rows if gen_rows is not None else [
        {"prompt": "one plus one is", "target": " two"},
        {"prompt": "The capital of", "target": "[A-Z]"}]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc_rows))
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen_rows))
    (folder / "text.txt").write_text((REPO / "assets/demo/heldout.txt").read_text()[:2000])
    (folder / "suite.yaml").write_text(
        "name: tiny\ntasks:\n"
        "  - {name: mc, type: multiple_choice, data: mc.jsonl}\n"
        "  - {name: gen, type: generation, data: gen.jsonl, metrics: [exact_match, contains, "
        "regex], max_new_tokens: 4}\n"
        "  - {name: ppl, type: perplexity, text: text.txt, window: 64}\n" + extra_yaml)
    return folder / "suite.yaml"


@pytest.mark.slow
def test_suite_through_a_job_then_reuse_on_identical_weights(lab_dir, tiny_model_dir, tmp_path):
    suite = make_suite(tmp_path / "suite")
    config = write_yaml(tmp_path / "ev.yaml", {"checkpoint": str(tiny_model_dir),
                                               "suite": str(suite), "batch_size": 2})
    first = last_json(run_cli(lab_dir, "run", "evaluate", config, "--wait", check=True).stdout)
    from app.lab import Lab

    lab = Lab(lab_dir)
    with lab.registry() as reg:
        (ck,) = reg.list_checkpoints()
        scores = reg.latest_scores([ck["id"]])[ck["id"]]
        rows = reg.evaluations(ck["id"])
    assert {"tiny/mc/acc", "tiny/mc/acc_norm", "tiny/gen/exact_match", "tiny/gen/contains",
            "tiny/gen/regex", "tiny/ppl/perplexity", "tiny/ppl/bits_per_byte"} <= set(scores)
    assert all(0 <= scores[k] <= 1 for k in scores if "/mc/" in k or "/gen/" in k)
    mc = [r for r in rows if r["task"] == "tiny/mc" and r["metric"] == "acc"][0]
    assert mc["stderr"] is not None and json.loads(mc["details"])["n"] == 2

    # a copy of the same weights under another name: every task is reused, nothing recomputed
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    config2 = write_yaml(tmp_path / "ev2.yaml", {"checkpoint": str(copy), "suite": str(suite),
                                                 "batch_size": 2})
    run = run_cli(lab_dir, "run", "evaluate", config2, "--wait", check=True)
    assert run.stderr.count("reused") == 3, run.stderr
    with lab.registry() as reg:
        other = [c for c in reg.list_checkpoints() if c["id"] != ck["id"]][0]
        assert reg.latest_scores([other["id"]])[other["id"]] == scores
        reused = [json.loads(r["details"]) for r in reg.evaluations(other["id"])]
        assert all(d["reused_from"]["job"] == first["job"] for d in reused)


def test_bad_suites_are_refused_before_queueing(lab, tiny_model_dir, tmp_path):
    from app import jobs
    from plugins import ConfigError

    def problem(suite_ref):
        with pytest.raises(ConfigError) as e:
            jobs.submit(lab, "evaluate", {"checkpoint": str(tiny_model_dir), "suite": suite_ref})
        return str(e.value)

    assert "suite 'nope' not found" in problem("nope") and "demo" in problem("nope")
    assert "does not exist" in problem(str(tmp_path / "missing" / "suite.yaml"))

    bad_json = make_suite(tmp_path / "a")
    (tmp_path / "a" / "mc.jsonl").write_text(
        '{"context": "x", "choices": ["a", "b"], "answer": 0}\n{"context": "y", "choices"\n')
    msg = problem(str(bad_json))
    assert "mc.jsonl line 2: invalid JSON" in msg and "field 'suite'" in msg

    out_of_range = make_suite(tmp_path / "b", mc_rows=[
        {"context": "x", "choices": ["a", "b"], "answer": 0},
        {"context": "x", "choices": ["a", "b", "c", "d"], "answer": 4}])
    assert "mc.jsonl line 2: `answer` 4 is out of range: expected an index from 0 to 3" \
        in problem(str(out_of_range))

    bad_regex = make_suite(tmp_path / "c", gen_rows=[{"prompt": "p", "target": "(unclosed"}])
    assert "gen.jsonl line 1: `target` '(unclosed' is not a valid regular expression" \
        in problem(str(bad_regex))

    no_data = make_suite(tmp_path / "d", extra_yaml="  - {name: x, type: generation}\n")
    assert "tasks.3: Value error, a generation task needs `data`" in problem(str(no_data))

    with pytest.raises(ConfigError, match="suite 'demo' has no task 'nope'"):
        jobs.submit(lab, "evaluate", {"checkpoint": str(tiny_model_dir), "suite": "demo",
                                      "tasks": ["nope"]})
    with lab.registry() as reg:
        assert reg.jobs() == []


def test_the_builtin_demo_suite_loads_and_is_well_formed():
    from plugins.evaluate.suites import builtin_suites, load_items, load_suite

    assert "demo" in builtin_suites()
    suite = load_suite("demo")
    sizes = {t.name: len(load_items(suite, t)) for t in suite.tasks if t.type != "perplexity"}
    assert sizes == {"capitals": 24, "colours": 24, "sums": 40}
    for task in suite.tasks:
        if task.type == "multiple_choice":
            for item in load_items(suite, task):
                assert item["choices"][item["answer"]].strip()  # the answer is a real choice
                assert len(set(item["choices"])) == len(item["choices"])


def test_auto_evaluation_is_queued_when_a_job_registers_a_checkpoint(lab_dir, tiny_model_dir,
                                                                     tmp_path):
    from app.context import JobContext
    from app.jobs import AUTO_EVAL_PRIORITY, submit
    from app.lab import Lab

    suite = make_suite(tmp_path / "suite")
    (lab_dir).mkdir(parents=True, exist_ok=True)
    (lab_dir / "lab.toml").write_text(f"auto_eval = true\nauto_eval_suite = '{suite}'\n")
    lab = Lab(lab_dir)
    job = submit(lab, "test_copy", {"source": str(tiny_model_dir), "name": "copied"})
    with lab.registry() as reg:
        ctx = JobContext(lab, reg, reg.job(job["id"]), out=open("/dev/null", "w"))
        src = ctx.open(str(tiny_model_dir))
        pending = ctx.new_checkpoint("finetune", [src], name="child")
        for f in tiny_model_dir.iterdir():
            shutil.copy(f, pending.path / f.name)
        row = ctx.publish(pending)
        queued = [j for j in reg.jobs(status="queued") if j["plugin"] == "evaluate"]
    (auto,) = queued
    assert auto["priority"] == AUTO_EVAL_PRIORITY < 0 and auto["user"] == "auto-eval"
    assert json.loads(auto["config"])["checkpoint"] == row["id"]
    assert json.loads(auto["config"])["suite"] == str(suite)
    # the evaluation's own imports never trigger another evaluation
    from app.jobs import queue_auto_eval

    assert queue_auto_eval(lab, row, source_plugin="evaluate") is None
    assert queue_auto_eval(lab, {**row, "kind": "task_vector"}) is None
    # switchable
    (lab_dir / "lab.toml").write_text("auto_eval = false\n")
    assert queue_auto_eval(Lab(lab_dir), row) is None


@pytest.mark.slow
def test_lm_eval_local_yaml_offline_equals_our_perplexity(lab_dir, tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")
    text = (REPO / "assets/demo/heldout.txt").read_text()[:400]
    from plugins.evaluate.suites import write_rolling_text_task

    tasks = tmp_path / "tasks"
    write_rolling_text_task(tasks, "localtext", text)
    (tmp_path / "text.txt").write_text(text)
    config = write_yaml(tmp_path / "ev.yaml", {
        "checkpoint": str(tiny_model_dir), "lm_eval_tasks": ["localtext"],
        "lm_eval_include_path": str(tasks), "text_file": str(tmp_path / "text.txt"),
        "window": 256, "task": "ours"})
    env_run = run_cli(lab_dir, "run", "evaluate", config, "--wait", timeout=600)
    assert env_run.returncode == 0, env_run.stderr[-3000:]
    from app.lab import Lab

    with Lab(lab_dir).registry() as reg:
        (ck,) = reg.list_checkpoints()
        scores = reg.latest_scores([ck["id"]])[ck["id"]]
    # One window each (the text is shorter than the model's 256 positions). Token-level
    # log-likelihoods are recovered from bits per byte of the same bytes. lm-eval 0.4.13
    # encodes the text with the tokenizer's own BOS and then prepends its prefix token (BOS)
    # again, so its token stream is [BOS, BOS, text...]: scored on that same stream, ours
    # agrees. (bench/eval.py passes add_bos_token=False to compare the plain text.)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ops.perplexity import sliding_window_nll

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) < 255
    doubled = sliding_window_nll(model, torch.tensor([tokenizer.bos_token_id] + ids), 256, 128)
    n_bytes = len(text.encode())
    nll_lm_eval = scores["lm-eval:localtext/bits_per_byte"] * n_bytes * math.log(2)
    assert nll_lm_eval == pytest.approx(doubled.nll_sum, abs=1e-3)
    plain = sliding_window_nll(model, torch.tensor(ids), 256, 128)
    assert scores["ours/bits_per_byte"] == pytest.approx(plain.bits_per_byte(n_bytes), abs=1e-6)
    assert "lm-eval:localtext/word_perplexity" in scores


def test_lm_eval_tasks_without_the_extra_is_a_clear_config_error(monkeypatch, tiny_model_dir):
    import importlib.util

    import plugins
    from plugins.evaluate import LM_EVAL_MISSING

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(plugins.ConfigError) as e:
        plugins.validate_config(plugins.get("evaluate"),
                                {"checkpoint": "x", "lm_eval_tasks": ["hellaswag"]})
    assert LM_EVAL_MISSING in str(e.value) and "weightsmith[lm-eval]" in str(e.value)


@pytest.mark.slow
def test_demo_builds_two_skill_fine_tunes_evaluated_against_the_base(lab_dir):
    """`weightsmith demo`: base (built by a pretrain job), two fine-tunes on two skills of the
    demo suite, every one auto-evaluated on the suite, and the fine-tunes' scores compared
    with the base's. (A 3-step base here: the numbers are not the point, the flow is.)"""
    stdout = run_cli(lab_dir, "demo", "--pretrain-steps", "3", check=True, timeout=900).stdout
    out = json.loads(stdout)  # the jobs' logs and one-line summaries went to stderr
    assert set(out["skills"]) == {"demo-ft-capitals", "demo-ft-sums"}
    from app.lab import Lab

    lab = Lab(lab_dir)
    assert lab.settings.auto_eval and (lab_dir / "lab.toml").exists()
    with lab.registry() as reg:
        jobs = reg.jobs()
        assert {j["status"] for j in jobs} == {"succeeded"}
        evals = [j for j in jobs if j["plugin"] == "evaluate"]
        assert len(evals) == 3 and all(j["priority"] < 0 for j in evals)
        (pretrain,) = [j for j in jobs if j["plugin"] == "pretrain"]  # built by a job
        base = reg.find_checkpoint("demo-base")
        assert base["job_id"] == pretrain["id"] and base["relation"] == "pretrain"
        for name in out["skills"]:
            ck = reg.find_checkpoint(name)
            assert [p["parent_name"] for p in reg.parents(ck["id"])] == ["demo-base"]
            deltas = {d["metric"] for d in reg.score_deltas(ck["id"])}
            assert {"demo/capitals/acc", "demo/sums/exact_match",
                    "demo/heldout/perplexity"} <= deltas


def test_scores_along_a_lineage_chain(lab):
    from app.ui import lineage_chain
    from tests.test_registry import chain

    with lab.registry() as reg:
        ids = chain(reg)  # base -> ft1 -> ft2 ; base -> ft3 ; merge(ft2, ft3, base) -> m
        for name, acc in (("base", 0.25), ("ft1", 0.5), ("ft2", 0.75), ("m", 0.625)):
            reg.add_evaluation(checkpoint_id=ids[name], task="t", metric="acc", value=acc)
        reg.add_evaluation(checkpoint_id=ids["ft3"], task="t", metric="ppl", value=3.0)
        assert [r["name"] for r in reg.chain(ids["m"])] == ["base", "ft1", "ft2", "m"]
        assert [r["name"] for r in reg.chain(ids["m"], ids["ft3"])] == ["ft3", "m"]
        assert [r["name"] for r in reg.chain(ids["m"], ids["base"])] == ["base", "m"]
        assert [r["name"] for r in reg.chain(ids["base"])] == ["base"]
    frame, available, text = lineage_chain(lab, ids["m"], None, ["t/acc"])
    assert list(frame["value"]) == [0.25, 0.5, 0.75, 0.625]
    assert list(frame["step"]) == ["00 base", "01 ft1", "02 ft2", "03 m"]
    assert available == ["t/acc"] and text.startswith("base (import) → ft1 (finetune)")
    from app.ui import checkpoint_detail

    summary, _, _ = checkpoint_detail(lab, ids["m"])  # m: 0.625 against ft2 0.75, base 0.25
    assert "| metric | value | vs ft2 | vs base |" in summary
    assert "| t/acc | 0.625 | -0.125 | +0.375 |" in summary
    frame, available, text = lineage_chain(lab, ids["ft2"], ids["ft3"])
    assert frame.empty and "ft3" in text and "is not an ancestor of ft2" in text


def test_dtype_keeps_precisions_apart_in_scores_and_the_score_cache(lab, tiny_model_dir,
                                                                    tmp_path):
    """Issue 20: evaluate's dtype. auto runs in the checkpoint's own dtype (lm-eval's default);
    a score in another precision than float32 is stored as task@dtype with the dtype in its
    details and its key, so latest scores, Compare and reuse never mix precisions."""
    from transformers import AutoModelForCausalLM

    from app import jobs
    from tests.test_jobs import run_to_end

    text = tmp_path / "text.txt"
    text.write_text((REPO / "assets" / "demo" / "heldout.txt").read_text()[:3000])

    def evaluate(checkpoint, **kw):
        job = jobs.submit(lab, "evaluate", {"checkpoint": str(checkpoint),
                                            "text_file": str(text), "window": 64, **kw})
        assert run_to_end(lab, job["id"], timeout=180) == "succeeded"
        with lab.registry() as reg:
            job = reg.job(job["id"])
        return job, open(job["log_path"]).read()

    def scores(name):
        with lab.registry() as reg:
            (ck,) = [c for c in reg.list_checkpoints() if c["name"] == name]
            return ck["id"], reg.latest_scores([ck["id"]])[ck["id"]], reg.evaluations(ck["id"])

    evaluate(tiny_model_dir)  # auto: the tiny model is float32
    ck_id, first, rows = scores("tiny-llama")
    assert set(first) == {"ppl:text.txt/perplexity", "ppl:text.txt/nll_per_token",
                          "ppl:text.txt/bits_per_byte"}
    assert {json.loads(r["details"])["dtype"] for r in rows} == {"float32"}

    _, log = evaluate(tiny_model_dir, dtype="bfloat16")
    assert "reused" not in log  # another precision is another measurement
    _, both, rows = scores("tiny-llama")
    half = both["ppl:text.txt@bfloat16/perplexity"]
    assert both["ppl:text.txt/perplexity"] == first["ppl:text.txt/perplexity"]  # not replaced
    assert half != first["ppl:text.txt/perplexity"]  # it really ran in bfloat16
    assert half == pytest.approx(first["ppl:text.txt/perplexity"], rel=0.05)
    assert {json.loads(r["details"])["dtype"] for r in rows if "@" in r["task"]} == {"bfloat16"}

    _, log = evaluate(tiny_model_dir, dtype="float32")  # the same measurement as auto here
    assert "reused 3 scores" in log
    _, log = evaluate(tiny_model_dir, dtype="bfloat16")
    assert "reused 3 scores" in log
    _, again, _ = scores("tiny-llama")
    assert again == both

    # a bfloat16 checkpoint: auto follows it; float32 is asked for
    stored = tmp_path / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(
        stored)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, stored / f.name)
    _, log = evaluate(stored)
    assert "dtype auto (bfloat16)" in log
    evaluate(stored, dtype="float32")
    _, bf16_scores, rows = scores("tiny-bf16")
    assert {"ppl:text.txt@bfloat16/perplexity", "ppl:text.txt/perplexity"} <= set(bf16_scores)
    by_task = {r["task"]: json.loads(r["details"])["dtype"] for r in rows}
    assert by_task == {"ppl:text.txt@bfloat16": "bfloat16", "ppl:text.txt": "float32"}
    assert ck_id not in {r["checkpoint_id"] for r in rows}
