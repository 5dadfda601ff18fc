"""Perplexity: the `evaluate` plugin against lm-evaluation-harness's `loglikelihood_rolling`.

    python bench/eval.py [--repeats 3] [--threads 1] [--model PATH] [--window 256]
                         [--dtype float32|bfloat16|auto]

Same model, same text (assets/demo/heldout.txt, 60 KB), same token stream, one run:

    ours:    `weightsmith run evaluate cfg.yaml --wait` in a fresh lab: the CLI, the job's
             worker subprocess, registering the model folder (content hash), loading it,
             scoring, and writing the scores to the registry. Windows of W+1 tokens, stride W.
    lm-eval: the `lm_eval` CLI (`--model hf`) on a local wikitext-style task YAML (one
             document: the whole text; output_type loglikelihood_rolling), with
             max_length=W, batch size 8, add_bos_token=False.

Both sides run the model in the same dtype (--dtype, float32 by default): ours through the
evaluate config's `dtype`, lm-eval through `dtype=` in --model_args. auto is the checkpoint's
own dtype (its config.json) on both sides. A bfloat16 checkpoint scored in bfloat16 by one
side and float32 by the other differs by about 2e-3 nats per token on SmolLM2. Whatever the
model's dtype, both take log-softmax and sum in float32: ours upcasts the logits, lm-eval is
given softmax_dtype=float32 (by default it takes log_softmax in the model's dtype and sums each
window's log-probs in it: in bfloat16 that rounds each window's sum to a few nats, 4e-4 nats
per token apart from ours on SmolLM2).

Like with like. lm-eval's rolling windows predict W tokens each, the first from one token of
context; ours with window W+1 and stride W scores exactly the same tokens with exactly the
same contexts. The token stream is [BOS] + the text's tokens on both sides: our tokenizer
prepends BOS and we score every later token; lm-eval (add_bos_token=False) encodes the text
without BOS and prepends its prefix token, BOS. (With its default, lm-eval 0.4.13 would encode
[BOS] + text and prepend BOS again, scoring [BOS, BOS, text...].) A tokenizer that prepends
nothing (SmolLM2's, GPT-2's) would leave ours scoring text[1:] in windows one token earlier
than lm-eval's, which still prepends its prefix token (BOS, else EOS) and scores every text
token: 3.2e-3 nats per token apart on SmolLM2 in float32. For such a tokenizer ours is given
the text with the prefix token's string in front, which it tokenizes to [prefix] + text
(checked), the very stream lm-eval scores. We compare the summed
token-level log-likelihood (nats): ours from the registry (nll_per_token x tokens), lm-eval's
from its bits_per_byte x bytes x ln 2, over the same bytes. Word perplexity is not compared
(lm-eval divides by its word count, we do not report one).

Both sides start cold in fresh processes, with the same torch thread count (--threads, 1 by
default: the machine is shared). Runs alternate ours, lm-eval, ...; medians are printed with
the ratio lm-eval / ours (target >= 2) and the log-likelihood difference (target <= 1e-6 per
token). Ours again on the same lab (scores reused by content hash) is printed as well.

Measured (--repeats 1, 2 shared cores at load 2-4, side by side in one run):
  demo model, float32: ours 11.1 s, lm-eval 23.1 s, 2.07x (2.35x in an earlier run);
                       1.0e-7 nats per token apart
  SmolLM2-135M, float32: ours 95.4 s, lm-eval 110.3 s, 1.16x; 3.9e-9 nats per token apart
  SmolLM2-135M, bfloat16: ours 40.8 s, lm-eval 49.0 s, 1.20x; 4.2e-8 nats per token apart
On SmolLM2 ours spends about 94% of its time in the model's forward passes (the same
forward work as lm-eval's: 62 windows of up to 257 tokens), and about 5 s starting, loading
and tokenizing; lm-eval's fixed cost is 12 to 26 s, so at the same dtype and thread count
the ratio is bounded by (forward + 26) / (forward + 5), well under 2 for this model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "assets" / "demo" / "heldout.txt"


def build_model(out: Path) -> Path:
    """The demo architecture (3.3M parameters, hidden 256, 4 layers), randomly initialised,
    with a BPE tokenizer trained on the text: the forward work of the demo model."""
    sys.path.insert(0, str(REPO))
    from ops.tiny_llama import build_llama, llama_config, train_bpe_tokenizer

    if (out / "config.json").exists():
        return out
    tokenizer = train_bpe_tokenizer(TEXT.read_text().split("\n\n"), vocab_size=4096)
    config = llama_config(tokenizer, hidden_size=256, num_layers=4, num_heads=4,
                          num_kv_heads=2, intermediate_size=688, max_positions=512)
    model = build_llama(config, seed=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def env(threads: int, lab: Path | None = None) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
             TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")]))
    if lab:
        e["WEIGHTSMITH_LAB"] = str(lab)
    return e


def ours_text(model: Path, work: Path) -> tuple[Path, str]:
    """The text file ours scores, so that its token stream is lm-eval's [prefix] + text:
    TEXT when the tokenizer prepends BOS itself, else the prefix token's string + TEXT."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = TEXT.read_text(encoding="utf-8")
    ids = tokenizer(text)["input_ids"]
    # lm-eval's HFLM.prefix_token_id: BOS, else EOS
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.eos_token_id
    prefix = tokenizer.convert_ids_to_tokens(prefix_id)
    if ids[0] == prefix_id:
        return TEXT, f"the tokenizer prepends {prefix}"
    path = work / f"prefixed-{TEXT.name}"
    path.write_text(prefix + text, encoding="utf-8")
    if tokenizer(prefix + text)["input_ids"] != [prefix_id] + ids:
        raise SystemExit(f"{prefix!r} + text does not tokenize to [{prefix_id}] + text's ids")
    return path, f"the tokenizer prepends nothing: ours scores {prefix!r} + text"


def run_ours(model: Path, window: int, threads: int, dtype: str, text: Path, work: Path,
             lab: Path | None = None) -> tuple[float, float, int, str]:
    """(seconds, summed NLL in nats, tokens scored, the dtype the model ran in)."""
    lab = lab or Path(tempfile.mkdtemp(dir=work, prefix="lab-"))
    config = work / "ours.yaml"
    config.write_text(json.dumps({"checkpoint": str(model), "text_file": str(text),
                                  "window": window + 1, "stride": window, "batch_size": 8,
                                  "task": "bench", "dtype": dtype}))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "app.cli", "run", "evaluate", str(config),
                           "--wait"], env=env(threads, lab), cwd=REPO, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"ours failed:\n{proc.stderr[-3000:]}")
    sys.path.insert(0, str(REPO))
    from registry import Registry

    with Registry(lab / "registry.db") as reg:  # stored as bench@<dtype> unless float32
        rows = {r["metric"]: r for r in reg.db.query(
            "SELECT * FROM evaluations WHERE task = 'bench' OR task LIKE 'bench@%' "
            "ORDER BY id")}
    details = json.loads(rows["perplexity"]["details"])
    return (seconds, rows["nll_per_token"]["value"] * details["tokens"], details["tokens"],
            details["dtype"])


def write_task(folder: Path) -> None:
    sys.path.insert(0, str(REPO))
    from plugins.evaluate.suites import write_rolling_text_task

    write_rolling_text_task(folder, "benchtext", TEXT.read_text())


def run_lm_eval(model: Path, window: int, threads: int, dtype: str, work: Path
                ) -> tuple[float, float]:
    """(seconds, summed NLL in nats)."""
    tasks = work / "tasks"
    write_task(tasks)
    out = Path(tempfile.mkdtemp(dir=work, prefix="lm-eval-"))
    lm_eval = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or "lm_eval"
    start = time.perf_counter()
    proc = subprocess.run(
        [lm_eval, "--model", "hf", "--model_args",
         f"pretrained={model},add_bos_token=False,max_length={window},dtype={dtype},"
         "softmax_dtype=float32",
         "--tasks", "benchtext", "--include_path", str(tasks), "--batch_size", "8",
         "--device", "cpu", "--output_path", str(out)],
        env=env(threads), cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"lm-eval failed:\n{proc.stderr[-3000:]}")
    (result_file,) = out.rglob("results_*.json")
    bpb = json.loads(result_file.read_text())["results"]["benchtext"]["bits_per_byte,none"]
    return seconds, bpb * len(TEXT.read_bytes()) * math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--model", type=Path, help="an HF model folder (default: build one)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                        help="the model's dtype on both sides (auto: the checkpoint's own)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ws-bench-eval-"))
    try:
        model = args.model or build_model(work / "model")
        text, stream = ours_text(model, work)
        ours_t, theirs_t = [], []
        for i in range(args.repeats):
            t, nll, tokens, ran_in = run_ours(model, args.window, args.threads, args.dtype,
                                              text, work)
            ours_t.append(t)
            t2, nll_theirs = run_lm_eval(model, args.window, args.threads, args.dtype, work)
            theirs_t.append(t2)
            print(f"run {i + 1}: ours {t:.2f} s, lm-eval {t2:.2f} s")
        lab = Path(tempfile.mkdtemp(dir=work, prefix="lab-"))
        run_ours(model, args.window, args.threads, args.dtype, text, work, lab)
        reuse_t, _, _, _ = run_ours(model, args.window, args.threads, args.dtype, text, work,
                                    lab)
        ours, theirs = statistics.median(ours_t), statistics.median(theirs_t)
        print(f"\nmodel {model}, text {TEXT.name} ({len(TEXT.read_bytes()):,} bytes, "
              f"{tokens:,} scored tokens), window {args.window}, threads {args.threads}, "
              f"dtype {args.dtype} on both sides (ours ran in {ran_in}); {stream}")
        print(f"ours (weightsmith run evaluate --wait): median {ours:.2f} s of {ours_t}")
        print(f"lm-eval (lm_eval CLI):                  median {theirs:.2f} s of {theirs_t}")
        print(f"ratio lm-eval / ours: {theirs / ours:.2f}x (target >= 2)")
        print(f"ours again on the same weights (scores reused): {reuse_t:.2f} s")
        print(f"summed token log-likelihood: ours {-nll:.4f}, lm-eval {-nll_theirs:.4f} nats; "
              f"difference {abs(nll - nll_theirs):.2e} in all, "
              f"{abs(nll - nll_theirs) / tokens:.2e} per token (target <= 1e-6)")
        print(f"perplexity (per token): ours {math.exp(nll / tokens):.4f}, lm-eval "
              f"{math.exp(nll_theirs / tokens):.4f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
