"""Training throughput: the `train` plugin as a job against a plain transformers Trainer script.

    python bench/train.py [--repeats 2] [--methods lora full] [--threads 1] [--dir PATH]
    python bench/train.py --variable --seq-len 256 [--batching auto]   # padding-free batches

With --variable the rows have seeded random lengths, uniform in [--min-len, --seq-len] tokens:
the plain script pads each batch to its longest example (DataCollatorForLanguageModeling, as a
user would), ours batches as the train plugin's `batching` says (auto: padding-free rows here),
both count only real tokens (non-padding), and the target is >= 1.3x. Both sides draw the same
batches (the same seeded sampler), so their losses are comparable too.

Builds (once, then reuses from --dir) an 8.0M-parameter Llama (hidden 256, 6 layers, 4 heads,
2 KV heads, MLP 1376) with a byte-level BPE tokenizer trained by ops.tiny_llama on
assets/demo/corpus.txt (asked for 4096 tokens; the generated corpus saturates at 843), and a
JSONL of `text` rows cut from the same corpus, each long enough to fill --seq-len tokens, so
every example on both sides is exactly seq-len tokens (BOS + text, truncated; no padding
anywhere; checked row by row when the data is built). Then, per method (LoRA r16 / alpha 32 /
dropout 0.05 on the seven linear layers, and full fine-tuning), it runs, interleaved ours,
plain, ours, plain (--repeats pairs):

    ours:  the `train` plugin as a real job in a fresh temporary lab: `app.jobs.submit` plus
           the scheduler's tick loop, the way `weightsmith run train cfg.yaml --wait` does it,
           so the job runs in its own `python -m app.worker` subprocess. Throughput: the
           checkpoint metadata's tokens_seen / train_seconds (the Trainer's train_runtime).
           Per-window figures: the `tokens_per_second` metrics in the registry (one per log).
           Wall time: submit to the job's end (worker reaped).
    plain: this file in `--plain` mode as a subprocess: datasets.load_dataset + map with the
           tokenizer (truncation to seq-len), DataCollatorForLanguageModeling, the same model
           (peft get_peft_model with the same LoraConfig for LoRA), the same TrainingArguments
           values (batch, steps, lr, cosine schedule, no warm-up, seed, logging_steps, no
           saving, no eval), and trainer.save_model at the end. Throughput: steps * batch *
           seq-len / train_runtime. Per-window figures: a clock callback at each log.
           Wall time: spawn to exit.

Both sides start cold (a fresh lab / a fresh datasets cache, the same tokenization work) with
the same torch thread count: 1 by default (--threads), since on a shared 2-core machine other
processes on the cores torch's threads use slow them down 2-10x at random. Each run starts
after a quiet second, the CPU time other processes used during it is measured (/proc/stat
minus our own rusage), and a run they disturbed beyond the free cores is redone once.
Prints the median of each side and the ratio ours/plain (target >= 1.0: the framework must
add no overhead to the training loop), the best log window of each run (the figure least hurt
by other load), and the wall and CPU times of the whole runs, with the time outside the
training loop (wall - train_runtime).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "assets" / "demo" / "corpus.txt"
TARGET = 1.0  # equal rows: the framework adds no overhead
TARGET_VARIABLE = 1.3  # variable rows: padding-free batches beat padded ones (issue 21)
# Cores other processes may use during a run, beyond the cores our torch threads leave free,
# before the run's timing counts as disturbed (and the run is redone).
NOISY = 0.15
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LEARNING_RATE = 2e-4
SEED = 0


# ---------------------------------------------------------------------------- the inputs
def prepare(root: Path, seq_len: int, log=print) -> tuple[Path, Path]:
    """(model folder, data.jsonl) under root; built once, reused afterwards."""
    model_dir = root / "llama-8m"
    data = root / f"text-{seq_len}.jsonl"
    if (model_dir / "model.safetensors").exists() and data.exists():
        return model_dir, data
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from ops import training as T
    from ops.tiny_llama import build_llama, llama_config, train_bpe_tokenizer

    text = CORPUS.read_text()
    if not (model_dir / "model.safetensors").exists():
        t = time.perf_counter()
        tokenizer = train_bpe_tokenizer(text.split("\n\n"), vocab_size=4096)
        config = llama_config(tokenizer, hidden_size=256, num_layers=6, num_heads=4,
                              num_kv_heads=2, intermediate_size=1376, max_positions=512)
        model = build_llama(config, seed=SEED)
        tmp = root / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
        n = sum(p.numel() for p in model.parameters())
        log(f"built {model_dir} ({n / 1e6:.1f}M parameters) in {time.perf_counter() - t:.1f} s")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Rows: consecutive spans of the corpus, decoded and re-checked so that every row encodes
    # to at least seq_len tokens (with BOS); both sides then cut each row to exactly seq_len.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    span = seq_len + 8
    rows = []
    for start in range(0, len(ids) - span, span):
        row = tokenizer.decode(ids[start:start + span])
        ours = T.encode_text(tokenizer, row, seq_len)["input_ids"]
        plain = tokenizer(row, truncation=True, max_length=seq_len)["input_ids"]
        if len(ours) == seq_len and ours == plain:  # the same tokens on both sides
            rows.append({"text": row})
    tmp = data.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, data)
    log(f"wrote {data}: {len(rows)} rows of exactly {seq_len} tokens from {len(ids):,} corpus "
        f"tokens")
    return model_dir, data


def prepare_variable(root: Path, model_dir: Path, seq_len: int, min_len: int,
                     log=print) -> Path:
    """data: `text` rows of seeded random lengths, uniform in [min_len, seq_len] tokens as
    the train plugin encodes them (BOS + text + EOS), cut from the corpus in order. The plain
    script appends the EOS token's text to each row, so both sides see the same tokens
    (checked row by row here)."""
    import random

    data = root / f"text-var-{min_len}-{seq_len}.jsonl"
    if data.exists():
        return data
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from ops import training as T

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(CORPUS.read_text(), add_special_tokens=False)["input_ids"]
    rnd = random.Random(SEED)
    rows, lengths, start = [], [], 0
    while start < len(ids) - seq_len:
        want = rnd.randint(min_len, seq_len)
        text = tokenizer.decode(ids[start:start + want - 2])
        start += want
        ours = T.encode_text(tokenizer, text, seq_len)["input_ids"]
        plain = tokenizer(text + tokenizer.eos_token, truncation=True,
                          max_length=seq_len)["input_ids"]
        if len(ours) == want and ours == plain:  # the same tokens on both sides
            rows.append({"text": text})
            lengths.append(want)
    tmp = data.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, data)
    log(f"wrote {data}: {len(rows)} rows of {min(lengths)}-{max(lengths)} tokens (mean "
        f"{statistics.mean(lengths):.0f})")
    return data


def steps_for(args, method: str) -> int:
    return args.lora_steps if method == "lora" else args.full_steps


def env() -> dict:
    out = dict(os.environ)
    out.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), out.get("PYTHONPATH")]))
    return out


def parse_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


# ------------------------------------------------------- CPU accounting on a shared machine
def busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (the job worker, the plain
    script): the scheduler and subprocess.run reap them here."""
    import resource

    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def wait_for_quiet(max_wait: float, limit: float) -> float:
    """Wait (up to max_wait s) for a second in which other processes use < `limit` cores;
    returns the last second's load. Other processes on the cores torch's threads use slow
    them down several-fold (the threads spin for the same cores), so runs start quiet."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, o0 = busy_cpu_seconds(), own_cpu_seconds()
        time.sleep(1.0)
        load = (busy_cpu_seconds() - b0) - (own_cpu_seconds() - o0)
        if load < limit or time.monotonic() > deadline:
            return load


def measured(fn, *a) -> dict:
    """fn(*a) with the CPU seconds it used (own_cpu) and that the rest of the machine used
    meanwhile (other_load, in cores on average)."""
    b0, o0, t0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    try:
        result = fn(*a)
    except TimeoutError as e:
        result = {"timeout": str(e)}
    own = own_cpu_seconds() - o0
    result["cpu_s"] = own
    result["other_load"] = max(0.0, busy_cpu_seconds() - b0 - own) / (time.perf_counter() - t0)
    return result


# ------------------------------------------------------------------------- side A: ours
def run_ours(method: str, model_dir: Path, data: Path, work: Path, args) -> dict:
    from app import jobs
    from app.lab import Lab
    from app.scheduler import Scheduler
    from registry.store import FINISHED

    lab = Lab(work)
    config = {"checkpoint": str(model_dir), "data": str(data), "data_format": "text",
              "method": method, "max_length": args.seq_len, "max_steps": steps_for(args, method),
              "batch_size": args.batch_size, "learning_rate": LEARNING_RATE,
              "lr_scheduler": "cosine", "warmup_ratio": 0.0, "weight_decay": 0.0,
              "logging_steps": args.logging_steps, "save_steps": 0, "seed": SEED,
              "lora_r": LORA["r"], "lora_alpha": LORA["alpha"],
              "lora_dropout": LORA["dropout"], "target_modules": ALL_LINEAR,
              "batching": args.batching}
    start = time.perf_counter()
    job = jobs.submit(lab, "train", config)
    scheduler = Scheduler(lab, poll_seconds=0.2)
    if not scheduler.acquire():
        raise RuntimeError(f"{lab.root} is scheduled by another process ({scheduler.holder})")
    try:
        with lab.registry() as reg:
            cancelled = False
            while True:  # what `weightsmith run --wait` does: tick, look, sleep 0.2 s
                scheduler.tick(only=job["id"])
                row = reg.job(job["id"])
                if row["status"] in FINISHED and not scheduler.children:
                    break
                if not cancelled and time.perf_counter() - start > args.run_timeout:
                    jobs.cancel(lab, job["id"])
                    cancelled = True
                time.sleep(0.2)
            wall = time.perf_counter() - start
            if cancelled:
                raise TimeoutError(f"cancelled after {args.run_timeout:.0f} s")
            if row["status"] != "succeeded":
                raise RuntimeError(f"ours ({method}) {row['status']}: {row['error']}")
            (ck_id,) = reg.job_checkpoints(job["id"])
            meta = json.loads(reg.checkpoint(ck_id)["metadata"])
            per_log = [m["value"] for m in reg.metrics(job["id"])
                       if m["name"] == "tokens_per_second"]
    finally:
        scheduler.release()
    tokens, train_s = meta["tokens_seen"], meta["train_seconds"]
    return {"tok_s": tokens / train_s, "tokens": tokens, "train_s": train_s, "wall_s": wall,
            "worker_s": parse_time(row["finished_at"]) - parse_time(row["started_at"]),
            "windows": per_log, "steps": meta["steps"], "loss": meta["train_loss"],
            "batching": meta.get("batching")}


# ------------------------------------------------------------------------ side B: plain
def run_plain(method: str, model_dir: Path, data: Path, work: Path, args) -> dict:
    spec = {"method": method, "model": str(model_dir), "data": str(data), "out": str(work),
            "seq_len": args.seq_len, "steps": steps_for(args, method),
            "batch_size": args.batch_size, "logging_steps": args.logging_steps,
            "variable": args.variable}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--plain", json.dumps(spec)],
                              capture_output=True, text=True, env=env(), cwd=str(work.parent),
                              timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"killed after {args.run_timeout:.0f} s") from None
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"plain ({method}) exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def plain_script(spec: dict) -> None:
    """A minimal transformers Trainer fine-tuning script, as a user would write it; plus a
    clock at each log (what ours' metrics callback also does), for per-window throughput."""
    import torch
    from datasets import load_dataset
    from transformers import (AutoModelForCausalLM, AutoTokenizer,
                              DataCollatorForLanguageModeling, Trainer, TrainerCallback,
                              TrainingArguments)

    class LogClock(TrainerCallback):
        def __init__(self):
            self.times = []  # (monotonic time, global step) at train begin and each log

        def on_train_begin(self, args, state, control, **kw):
            self.times.append((time.monotonic(), state.global_step))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.times.append((time.monotonic(), state.global_step))

    out = Path(spec["out"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:  # what a user does for DataCollatorForLanguageModeling
        tokenizer.pad_token = tokenizer.eos_token
    rows = load_dataset("json", data_files=spec["data"], split="train",
                        cache_dir=str(out / "datasets"))
    eos = tokenizer.eos_token if spec["variable"] else ""  # rows end as the plugin's do
    train = rows.map(lambda b: tokenizer([t + eos for t in b["text"]], truncation=True,
                                         max_length=spec["seq_len"]),
                     batched=True, remove_columns=rows.column_names)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    if spec["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=ALL_LINEAR, task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out / "run"), max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"], learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        logging_steps=spec["logging_steps"], save_strategy="no", report_to="none",
        seed=SEED, data_seed=SEED, use_cpu=True, include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[LogClock()])
    result = trainer.train()
    trainer.save_model(str(out / "final"))
    lengths = {len(x) for x in train["input_ids"]}
    if spec["variable"]:  # real tokens (the attention mask), not the padded batch
        tokens = int(trainer.state.num_input_tokens_seen)
    else:
        assert lengths == {spec["seq_len"]}, f"rows of {sorted(lengths)} tokens"
        tokens = trainer.state.global_step * spec["batch_size"] * spec["seq_len"]
    train_s = result.metrics["train_runtime"]
    clock = next(c for c in trainer.callback_handler.callbacks if isinstance(c, LogClock))
    # a window's tokens: exact for equal rows, the run's mean per step for variable ones
    per_window = spec["logging_steps"] * tokens / max(1, trainer.state.global_step)
    windows = [(b[0] - a[0]) and per_window / (b[0] - a[0]) for a, b in
               zip(clock.times, clock.times[1:]) if b[1] - a[1] == spec["logging_steps"]]
    print(json.dumps({"tok_s": tokens / train_s, "tokens": tokens, "train_s": train_s,
                      "windows": windows, "steps": trainer.state.global_step,
                      "loss": result.training_loss,
                      "threads": torch.get_num_threads()}))


# ------------------------------------------------------------------------------ the run
def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora-steps", type=int, default=40,
                        help="optimizer steps of the LoRA runs (about 20 s with 1 thread; "
                             "use 60 with --threads 0 on 2 cores)")
    parser.add_argument("--full-steps", type=int, default=50,
                        help="optimizer steps of the full fine-tuning runs (about 20 s with 1 "
                             "thread; use 100 with --threads 0 on 2 cores)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["lora", "full"],
                        choices=["lora", "full"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (OMP_NUM_THREADS) of both sides; 0: torch's own "
                             "choice, one per core. With 1, other processes on the other core "
                             "of a shared 2-core machine barely move the figures; with one "
                             "thread per core they slow runs down 2-10x at random")
    parser.add_argument("--retries", type=int, default=1,
                        help="times a run is redone when other processes used the CPUs "
                             "during it")
    parser.add_argument("--run-timeout", type=float, default=150,
                        help="seconds after which a run (slowed down by other processes) is "
                             "stopped and redone")
    parser.add_argument("--quiet-wait", type=float, default=30,
                        help="seconds to wait, before each run, for other processes to "
                             "leave the CPUs alone")
    parser.add_argument("--variable", action="store_true",
                        help="variable-length rows (uniform in [--min-len, --seq-len] tokens) "
                             "instead of rows of exactly --seq-len: the plain script pads "
                             "each batch to its longest (DataCollatorForLanguageModeling), "
                             "ours batches by --batching; both count real tokens only")
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--batching", default="auto",
                        choices=["auto", "padding_free", "length_grouped", "padded"],
                        help="the train plugin's batching (auto: padding_free here)")
    parser.add_argument("--dir", default="/tmp/bench-train",
                        help="cache of the model and data (built once)")
    parser.add_argument("--plain", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:  # side B's subprocess
        plain_script(json.loads(args.plain))
        return 0

    os.environ.update({k: v for k, v in env().items() if k.endswith("_OFFLINE")})
    if args.threads:  # inherited by the job worker (through the scheduler) and the script
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    free = max(0, (os.cpu_count() or 1) - (args.threads or os.cpu_count() or 1))
    noisy_limit = free + NOISY
    sys.path.insert(0, str(REPO))
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    model_dir, data = prepare(root, args.seq_len)
    if args.variable:
        data = prepare_variable(root, model_dir, args.seq_len, args.min_len)
    runs_dir = root / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir()
    # warm the page cache for both sides' imports, so neither pays the first cold import
    subprocess.run([sys.executable, "-c", "import torch, transformers, peft, datasets, "
                    "transformers.trainer"], check=True, env=env())
    per_step = args.batch_size * args.seq_len
    target = TARGET_VARIABLE if args.variable else TARGET
    shape = (f"variable rows ({data.name}), ours batching {args.batching}, plain padded to "
             f"each batch's longest; " if args.variable else "")
    print(f"model {model_dir.name}: {shape}batch {args.batch_size} x up to {args.seq_len} "
          f"tokens = {per_step:,} tokens per step at most; " + ", ".join(
              f"{m} {steps_for(args, m)} steps" for m in args.methods)
          + f"; logging every {args.logging_steps} steps; {os.cpu_count()} CPUs, torch "
          f"threads {args.threads or 'default'}; runs interleaved ours, plain x "
          f"{args.repeats}; a run during which other processes used > {noisy_limit:.2f} "
          f"cores is redone (up to {args.retries} times)")

    results: dict[str, dict[str, list[dict]]] = {}
    for method in args.methods:
        results[method] = {"ours": [], "plain": []}
        for i in range(args.repeats):
            for side, fn in (("ours", run_ours), ("plain", run_plain)):
                for attempt in range(args.retries + 1):
                    quiet = wait_for_quiet(args.quiet_wait, free + 0.1)
                    work = runs_dir / f"{side}-{method}-{i}-{attempt}"
                    r = measured(fn, method, model_dir, data, work, args)
                    shutil.rmtree(work, ignore_errors=True)
                    if "timeout" in r:
                        print(f"  {method:4} {side:5} run {i + 1}: {r['timeout']} (others used "
                              f"{r['other_load']:.2f} cores during it)"
                              + ("  [redone]" if attempt < args.retries else "  [dropped]"),
                              flush=True)
                        continue
                    r["best_window"] = max(r["windows"], default=float("nan"))
                    redo = r["other_load"] > noisy_limit and attempt < args.retries
                    print(f"  {method:4} {side:5} run {i + 1}: {r['tok_s']:5.0f} tok/s "
                          f"({r['tokens']:,} tokens in {r['train_s']:5.1f} s, loss "
                          f"{r['loss']:.3f}), best window {r['best_window']:5.0f}; wall "
                          f"{r['wall_s']:4.1f} s, CPU {r['cpu_s']:5.1f} s; others used "
                          f"{quiet:.2f} cores before, {r['other_load']:.2f} during"
                          + ("  [noisy: redone]" if redo else ""), flush=True)
                    if not redo:
                        results[method][side].append(r)
                        break

    def med(method, side, key):
        values = [key(r) if callable(key) else r[key] for r in results[method][side]]
        return statistics.median(values) if values else float("nan")

    print(f"\ntraining throughput (tokens_seen / train_runtime), median of {args.repeats}; "
          f"best window: the fastest {args.logging_steps}-step interval between logs of a run "
          f"(median over runs), the figure least hurt by other processes")
    print(f"{'method':7} {'ours tok/s':>10} {'plain tok/s':>11} {'ratio':>6} {'target':>7}   "
          f"{'ours best':>9} {'plain best':>10} {'ratio':>6}   tok/s per run (ours | plain)")
    worst = None
    for method, runs in results.items():
        ours, plain = med(method, "ours", "tok_s"), med(method, "plain", "tok_s")
        bo, bp = med(method, "ours", "best_window"), med(method, "plain", "best_window")
        ratio = ours / plain
        if ratio == ratio:  # not NaN (every run of a side dropped)
            worst = ratio if worst is None else min(worst, ratio)
        each = [", ".join(f"{r['tok_s']:.0f}" for r in runs[side]) for side in runs]
        print(f"{method:7} {ours:10.0f} {plain:11.0f} {ratio:6.3f} {'>= ' + str(target):>7}"
              f"   {bo:9.0f} {bp:10.0f} {bo / bp:6.3f}   {each[0]} | {each[1]}")

    print(f"\nwhole run, median of {args.repeats}: ours = submit to job end (worker start-up, "
          f"data, training, checkpoint), plain = spawn to exit")
    print(f"{'method':7} {'ours wall s':>11} {'plain wall s':>12} {'ratio':>6}   "
          f"{'ours outside loop s':>19} {'plain outside loop s':>20}   {'ours CPU s':>10} "
          f"{'plain CPU s':>11} {'ratio':>6}")
    for method in results:
        wo, wp = med(method, "ours", "wall_s"), med(method, "plain", "wall_s")
        oo = med(method, "ours", lambda r: r["wall_s"] - r["train_s"])
        op = med(method, "plain", lambda r: r["wall_s"] - r["train_s"])
        co, cp = med(method, "ours", "cpu_s"), med(method, "plain", "cpu_s")
        print(f"{method:7} {wo:11.1f} {wp:12.1f} {wo / wp:6.2f}   {oo:19.1f} {op:20.1f}   "
              f"{co:10.1f} {cp:11.1f} {co / cp:6.2f}")
    noisy = max((r["other_load"] for m in results.values() for s in m.values() for r in s),
                default=0.0)
    if noisy > noisy_limit:
        print(f"\nnote: other processes used up to {noisy:.2f} cores during a run (more than "
              f"the {free} our threads leave free): its figures are not comparable")
    if worst is not None:
        print(f"\nheadline: worst ours/plain training throughput ratio {worst:.3f} "
              f"(target >= {target:.1f}): {'met' if worst >= target else 'NOT met'}")
    shutil.rmtree(runs_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
