"""Executors side by side (issue 22): the same short jobs run by this machine's scheduler
(cold workers, then warm ones), handed to a Ray cluster (a one-node head on loopback, started
here as the tests start it) and to a Slurm cluster (one node on loopback, started as the
tests start it: tests/slurm_cluster.py; skipped, saying why, where Slurm cannot run), taking
turns, in one run.

    python bench/executor.py [--dir /tmp/bench-executor] [--repeats 5]

Jobs (the tests' plugins, loaded as WEIGHTSMITH_PLUGINS loads a plugin under development):
  noop   test_sleep for 0 s: the worker's start-up and the registry round trip alone;
  copy   test_copy of a tiny Llama folder: an import and a published checkpoint (on Ray,
         both through the job's journal and the server's replay).

Each line: submit to started_at (the queue: the scheduler's pass; on Ray, the hand-over
with its registry snapshot), and submit to the job's final status in the registry (what a
user waits for; on Ray it includes the scheduler's next replay of the journal, every 0.5 s).
On Slurm, queued is the hand-over (sbatch); the wait for Slurm's scheduler (the test
cluster's: batch_sched_delay=0, where a default Slurm may wait up to 3 s more) and the
node's start of the job (--export=NONE: it loads the user's login environment) are in the
total. Prints medians per executor and the ratio to local cold.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("WEIGHTSMITH_PLUGINS", "tests.plugins_for_tests:SLEEPER,"
                                              "tests.plugins_for_tests:COPIER")
os.environ.setdefault("PYTHONPATH", str(REPO))

from bench.jobs import Running, parse_time, wait_job  # noqa: E402


def tiny_model(root: Path) -> Path:
    from tests.conftest import build_tiny_model  # the tests' tiny Llama

    out = root / "tiny-llama"
    return out if (out / "config.json").exists() else build_tiny_model(out)


def make_lab(root: Path, settings: str):
    from app.lab import Lab

    root.mkdir(parents=True, exist_ok=True)
    (root / "lab.toml").write_text("auto_eval = false\n" + settings)
    return Lab(root)


def time_job(lab, plugin: str, config: dict) -> dict:
    from app import jobs

    t0 = time.time()
    job = jobs.submit(lab, plugin, config)
    row = wait_job(lab, job["id"], 600)
    if row["status"] != "succeeded":
        raise RuntimeError(f"{plugin} on {lab.root.name}: {row['status']}: {row['error']}")
    return {"queued": parse_time(row["started_at"]) - t0, "total": time.time() - t0}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/bench-executor")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = Path(args.dir)
    import plugins

    plugins.discover(refresh=True)
    model = tiny_model(root)
    from tests.ray_cluster import start_ray_head
    from tests.slurm_cluster import SlurmUnavailable, start_slurm

    with contextlib.ExitStack() as clusters:
        t = time.monotonic()
        address = clusters.enter_context(start_ray_head(root / "ray-logs"))
        print(f"Ray head up in {time.monotonic() - t:.1f} s at {address}")
        modes = {"local cold": (make_lab(root / "lab-local", "warm_workers = false\n"), False),
                 "local warm": (make_lab(root / "lab-warm", ""), True),
                 "ray": (make_lab(root / "lab-ray", f'executor = "ray"\nray_address = '
                                                    f'"{address}"\ncluster_gpus = false\n'),
                         False)}
        t = time.monotonic()
        try:
            slurm = clusters.enter_context(start_slurm())
            print(f"Slurm up in {time.monotonic() - t:.1f} s (SLURM_CONF={slurm.conf})")
            modes["slurm"] = (make_lab(root / "lab-slurm", 'executor = "slurm"\n'
                                                           'cluster_gpus = false\n'), False)
        except SlurmUnavailable as why:
            print(f"no slurm column: {why}")
        running = {name: Running(lab, warm) for name, (lab, warm) in modes.items()}
        results: dict[tuple[str, str], list[dict]] = {}
        try:
            for i in range(args.repeats + 1):  # the first round warms caches: not counted
                for name, (lab, _) in modes.items():
                    for job, (plugin, config) in {
                            "noop": ("test_sleep", {"seconds": 0,
                                                    "pid_file": str(root / f"pid-{name}")}),
                            "copy": ("test_copy", {"source": str(model),
                                                   "name": f"copy-{i}"})}.items():
                        figures = time_job(lab, plugin, config)
                        if i:
                            results.setdefault((job, name), []).append(figures)
        finally:
            for r in running.values():
                r.close()
    print(f"\nmedian of {args.repeats} (seconds; ratio: to local cold)")
    print(f"{'job':6} {'executor':11} {'queued':>8} {'total':>8} {'ratio':>6}")
    for job in ("noop", "copy"):
        base = statistics.median(f["total"] for f in results[(job, "local cold")])
        for name in modes:
            rows = results[(job, name)]
            queued = statistics.median(f["queued"] for f in rows)
            total = statistics.median(f["total"] for f in rows)
            print(f"{job:6} {name:11} {queued:8.2f} {total:8.2f} {total / base:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
