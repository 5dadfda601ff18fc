"""Job start-up: cold workers (a fresh `python -m app.worker` per job) against warm ones
(forked from app/forkserver.py, which has torch, transformers and peft imported), side by
side in one run.

    python bench/jobs.py [--dir /tmp/bench-jobs] [--repeats 3] [--steps 30]

Builds once (then reuses from --dir) a demo lab: demo-base, the demo model (3.3M parameters,
what `weightsmith demo` builds; --steps of its pretrain job: the scores do not matter here,
the model's size does), and demo-ft, two full fine-tuning steps of it (a second model to
merge). Then, the modes taking turns (cold, warm, cold, warm, ...), a scheduler runs as the
server runs it (run_forever in a thread, polling every 0.5 s; warm: once its fork server is
ready) and takes, one at a time:

  auto-eval  the job the lab queues for every new checkpoint (app.jobs.queue_auto_eval's
             config: the demo suite, at auto-eval priority) on demo-base, with
             reuse_scores off (as for a new checkpoint: every task really runs);
  lora       a LoRA train job of 2 steps on the demo's capitals data;
  merge      task arithmetic of demo-ft on demo-base.

A third mode, kept, is warm with the fork server keeping models loaded between jobs
(app/warm_models.py, lab setting warm_model_mb; warm runs with it at 0): each job runs once
untimed, then timed, so that its model is the one the server kept. --real FOLDER adds
eval-real, a perplexity evaluation (window 256, 4096 tokens) of a real checkpoint folder
(SmolLM2-135M: the tests' float32 conversion of the GGUF), where the load is a real cost.

Each figure is submit to the job's final status in the registry (polled every 20 ms): what a
user waits for; each line also splits it into queued (submit to started_at: the scheduler's
poll) and worker (started_at to finished_at: start-up, the plugin, registering). Prints the median of each mode and the ratio warm/cold. Target (issue 21): auto-eval of the
demo suite on the demo model, submit to scores, <= 3 s warm.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TARGET_AUTO_EVAL_S = 3.0


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def wait_job(lab, job_id: str, timeout: float = 600) -> dict:
    from registry.store import FINISHED

    deadline = time.monotonic() + timeout
    with lab.registry() as reg:
        while time.monotonic() < deadline:
            row = reg.job(job_id)
            if row["status"] in FINISHED:
                return row
            time.sleep(0.02)
    raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s")


class Running:
    """A scheduler as the server runs it, in a thread."""

    def __init__(self, lab, warm: bool):
        from app.scheduler import Scheduler

        self.scheduler = Scheduler(lab, warm=warm)
        if not self.scheduler.acquire():
            raise RuntimeError(f"{lab.root} is scheduled by another process "
                               f"({self.scheduler.holder})")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.scheduler.run_forever, args=(self.stop,),
                                       daemon=True)
        self.thread.start()
        if warm:  # (a server starts it with its first job, which runs cold)
            self.scheduler.warm.usable(self.scheduler._job_env("cpu"))
            deadline = time.monotonic() + 300
            while not self.scheduler.warm.ready:
                if time.monotonic() > deadline:
                    raise TimeoutError("the fork server did not get ready in 300 s")
                time.sleep(0.1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.scheduler.release()


def build_lab(root: Path, steps: int):
    from app import jobs
    from app.demo import DEMO_NAME, SUITE_DIR, build_demo
    from app.lab import Lab

    root.mkdir(parents=True, exist_ok=True)
    (root / "lab.toml").write_text("auto_eval = false\n")
    lab = Lab(root)
    with lab.registry() as reg:
        have = reg.find_checkpoint(DEMO_NAME) and reg.find_checkpoint("demo-ft")
    if have:
        return lab
    running = Running(lab, warm=False)
    try:
        job = build_demo(lab, pretrain_steps=steps, log=lambda m: None).get("job")
        if job:
            row = wait_job(lab, job, 1800)
            assert row["status"] == "succeeded", row["error"]
        job = jobs.submit(lab, "train", {
            "checkpoint": DEMO_NAME, "data": str(SUITE_DIR / "train_capitals.jsonl"),
            "method": "full", "max_steps": 2, "batch_size": 4, "save_steps": 0,
            "name": "demo-ft"})
        row = wait_job(lab, job["id"])
        assert row["status"] == "succeeded", row["error"]
    finally:
        running.close()
    return lab


def jobs_to_time(lab, real: str | None = None) -> dict[str, tuple[str, dict, dict]]:
    from app.demo import DEMO_NAME, SUITE_DIR
    from app.jobs import AUTO_EVAL_PRIORITY

    with lab.registry() as reg:
        base = reg.find_checkpoint(DEMO_NAME)["id"]
        if real:
            from app.checkpoints import import_checkpoint

            found = reg.find_checkpoint("bench-real")
            real_id = (found or import_checkpoint(lab, reg, real, name="bench-real",
                                                  log=lambda m: None))["id"]
    extra = {} if not real else {
        "eval-real": ("evaluate", {"checkpoint": real_id, "window": 256, "max_tokens": 4096,
                                   "text_file": str(REPO / "assets" / "demo" / "heldout.txt"),
                                   "dtype": "float32", "reuse_scores": False}, {})}
    return {**extra,
        # reuse_scores off: a new checkpoint's auto-eval has no scores to reuse, and the
        # same checkpoint evaluated again would reuse the first run's
        "auto-eval": ("evaluate", {"checkpoint": base, "suite": lab.settings.auto_eval_suite,
                                   "reuse_scores": False},
                      {"user": "auto-eval", "priority": AUTO_EVAL_PRIORITY}),
        "lora": ("train", {"checkpoint": DEMO_NAME,
                           "data": str(SUITE_DIR / "train_capitals.jsonl"), "method": "lora",
                           "max_steps": 2, "batch_size": 4, "save_steps": 0,
                           "name": "bench-lora"}, {}),
        "merge": ("merge", {"method": "task_arithmetic", "models": ["demo-ft"],
                            "base_model": DEMO_NAME, "weights": [1.0], "name": "bench-merge"},
                  {}),
    }


def time_job(lab, plugin: str, config: dict, extra: dict) -> dict:
    from app import jobs

    start = time.time()
    job = jobs.submit(lab, plugin, config, **extra)
    row = wait_job(lab, job["id"])
    wall = time.time() - start
    if row["status"] != "succeeded":
        raise RuntimeError(f"{plugin} {row['status']}: {row['error']}")
    started = parse_time(row["started_at"])
    return {"wall": wall, "queued": started - start,
            "worker": parse_time(row["finished_at"]) - started}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/bench-jobs", help="the demo lab is built here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30,
                        help="pretrain steps of the demo base (its size is the demo's)")
    parser.add_argument("--jobs", nargs="+", default=["auto-eval", "lora", "merge"])
    parser.add_argument("--real", help="a real checkpoint folder: adds the eval-real job")
    args = parser.parse_args()
    if args.real:
        args.jobs = ["eval-real", *args.jobs]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t = time.perf_counter()
    lab = build_lab(Path(args.dir) / "lab", args.steps)
    print(f"demo lab ready in {time.perf_counter() - t:.1f} s at {lab.root}; "
          f"{os.cpu_count()} CPUs", flush=True)
    specs = jobs_to_time(lab, args.real)
    results: dict[tuple[str, str], list[dict]] = {}
    modes = ("cold", "warm", "kept")
    for turn in range(args.repeats):
        for mode in modes:
            lab.settings.warm_model_mb = 2048 if mode == "kept" else 0
            t = time.perf_counter()
            running = Running(lab, warm=mode != "cold")
            ready = time.perf_counter() - t
            try:
                for name in args.jobs:
                    plugin, config, extra = specs[name]
                    config = dict(config)
                    if "name" in config:
                        config["name"] = f"{config['name']}-{mode}-{turn}"
                    if mode == "kept":  # the same job once before: its model is kept
                        before = list(running.scheduler.warm.kept)
                        time_job(lab, plugin, {**config, "name": config["name"] + "-prime"}
                                 if "name" in config else config, extra)
                        deadline = time.monotonic() + 5  # (a merge loads no model)
                        while running.scheduler.warm.kept == before and \
                                time.monotonic() < deadline:
                            time.sleep(0.05)
                    r = time_job(lab, plugin, config, extra)
                    results.setdefault((name, mode), []).append(r)
                    print(f"  turn {turn + 1} {mode:4} {name:9} {r['wall']:6.2f} s (queued "
                          f"{r['queued']:.2f} s, worker {r['worker']:.2f} s)"
                          + (f"; fork server ready after {ready:.1f} s" if mode != "cold"
                             and name == args.jobs[0] else ""), flush=True)
            finally:
                running.close()

    print(f"\n{'job':10} {'cold s':>7} {'warm s':>7} {'kept s':>7} {'warm/cold':>9} "
          f"{'kept/warm':>9}   (submit to final status; median of {args.repeats})")
    for name in args.jobs:
        cold, warm, kept = (statistics.median(r["wall"] for r in results[(name, mode)])
                            for mode in modes)
        print(f"{name:10} {cold:7.2f} {warm:7.2f} {kept:7.2f} {warm / cold:9.2f} "
              f"{kept / warm:9.2f}")
    if "auto-eval" in args.jobs:
        warm = statistics.median(r["wall"] for r in results[("auto-eval", "warm")])
        print(f"\ntarget: auto-eval of the demo suite on the demo model <= "
              f"{TARGET_AUTO_EVAL_S:.0f} s warm: {warm:.2f} s "
              f"({'met' if warm <= TARGET_AUTO_EVAL_S else 'missed'}); load average "
              f"{os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
