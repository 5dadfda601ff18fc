"""Merge benchmark: the native streaming engine against mergekit, side by side.

    python bench/merge.py [--dir /tmp/bench-merge] [--methods task_arithmetic ties]
                          [--size 350m|60m] [--compare-tree /path/to/another/checkout]

Builds (once, then reuses) three Llama models of 348M parameters (hidden 1024, 22 layers,
vocab 32000; `--size 60m`: hidden 512, 8 layers, for a quick run), stored as bf16
safetensors in HF-style shards with an index: a random
`base` and two "fine-tunes" `ft-a`, `ft-b` (base plus seeded noise). Then, for each method, it
runs the same mergekit YAML through

    (a) `mergekit-yaml` (the CLI, as a subprocess: its wall time includes the start-up),
    (b) `mergekit.merge.run_merge` in a subprocess of its own (the call alone is timed),
    (c) `ops.merge.stream_merge` in a subprocess of its own (the call alone is timed),
    (d) with --compare-tree PATH, the same engine from another checkout (PATH's
        `ops.merge.stream_merge`, or `ops.merge_stream.stream_merge` in older trees), in
        turn with (c): "native-other", and the ratio of (c) to it,

and prints wall seconds, peak RSS (each process's own, from wait4), the peak of its anonymous
memory and of its file-backed pages (see "Memory" below), the ratio to run_merge's time, the
ratios of the peaks to one input model's size, and the ratio to the warm I/O floor: reading every input file once from the page cache plus writing one model-sized file.
Every run is done after a warm-up read, so all of them see warm inputs. With --repeats N
the engines take turns (a, b, c, a, b, c, ...), the floor is measured again before each
turn, and the best of each is reported: on a VM, writing into page-cache pages the host
has not backed yet costs several times more than into reused ones, and that drifts. The outputs of (b)
and (c) are compared tensor by tensor (bf16: bit-identical expected).

Memory. A process's RSS counts two different things: anonymous memory (what it allocated:
tensors it computed, buffers, the Python heap) and file-backed pages it mapped and touched
(safetensors files opened with mmap, shared libraries). File-backed pages are the page cache,
shared with every other reader and dropped by the kernel under pressure without any write; how
many of them stay mapped, and so counted in RSS, depends on the machine's free memory and on
the kernel, not on the program. That is why one engine measured 0.70x one model on one machine
and 1.69x on a fresh clone elsewhere: the same anonymous memory, more input pages left mapped.
So the bench samples /proc/PID/smaps_rollup every 5 ms from the parent and reports:
  anon peak   the largest `Anonymous` (private anonymous pages: what the process owns; its USS
              minus its private file pages), with the part it had before the timed call
              (imports: torch, transformers, mergekit) shown separately as `anon base`;
  file peak   the largest file-backed resident size (Rss - Anonymous): mapped input shards
              and libraries, which the kernel may reclaim at will;
  PSS peak    proportional set size (shared pages divided among their sharers).
The target is on the anonymous peak: what the merge itself needs in memory no one else can
use. Sampling every 5 ms can miss a spike shorter than that.

wait4's peak RSS (ru_maxrss, printed per run as "wait4 RSS") is not the child's own: Linux
starts a forked child's high-water mark at its parent's RSS and keeps it across exec, so it
is at least the bench's own RSS when it spawned the child. On a fresh clone the bench has just
built the models in its own process (about 1 GB resident), so every child "peaked" at that;
with the models reused, the bench is small and the figure is the child's. That, not the
engines, made the same native merge read 0.70x one model on one run and 1.69x on a fresh
clone. The table's RSS column is the sampled peak of the child's own RSS.

Targets (from the issues): ours <= 0.5x run_merge time; anonymous peak <= 1.0x one input
model (every native method); <= 6x the warm I/O floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = {"base": 0, "ft-a": 1, "ft-b": 2}
TARGETS = {"vs_run_merge": 0.5, "anon_vs_model": 1.0, "vs_floor": 6.0}
SAMPLE_SECONDS = 0.005


SIZES = {  # hidden, intermediate, layers, heads
    "350m": (1024, 2816, 22, 16),
    "60m": (512, 1408, 8, 8),
}


def llama(size: str = "350m"):
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads = SIZES[size]
    return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, max_position_embeddings=2048,
                       tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
                       dtype="bfloat16")


def build_models(root: Path, size: str = "350m") -> dict[str, Path]:
    """base, ft-a and ft-b under root, built tensor by tensor (never a whole model in memory)."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    paths = {name: root / name for name in MODELS}
    if all((p / "model.safetensors.index.json").exists() for p in paths.values()):
        return paths
    config = llama(size)
    with torch.device("meta"):
        shapes = {k: v.to(torch.bfloat16) for k, v in LlamaForCausalLM(config).state_dict().items()}
    split = split_torch_state_dict_into_shards(
        shapes, max_shard_size="300MB" if size == "350m" else "50MB")
    order = {name: i for i, name in enumerate(shapes)}

    def tensor(name: str, model_seed: int):
        gen = torch.Generator().manual_seed(order[name])
        shape = shapes[name].shape
        if name.endswith("norm.weight"):
            base = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            base = 0.02 * torch.randn(shape, generator=gen)
        if model_seed:
            gen = torch.Generator().manual_seed(1_000_003 * model_seed + order[name])
            base += 0.002 * torch.randn(shape, generator=gen)
        return base.to(torch.bfloat16)

    for name, seed in MODELS.items():
        path = paths[name]
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t = time.perf_counter()
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: tensor(k, seed) for k in keys}, tmp / filename,
                      metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(v.numel() * 2 for v in shapes.values())},
                 "weight_map": split.tensor_to_filename}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        print(f"built {name} in {time.perf_counter() - t:.1f} s", flush=True)
    return paths


def merge_config(method: str, paths: dict[str, Path]) -> dict:
    """The mergekit YAML both engines run: two fine-tunes on their base, computed in bf16."""
    models = []
    for name, weight in (("ft-a", 0.6), ("ft-b", 0.4)):
        params = {"weight": weight}
        if method != "task_arithmetic":
            params["density"] = 0.5
        models.append({"model": str(paths[name]), "parameters": params})
    config = {"merge_method": method, "base_model": str(paths["base"]), "models": models,
              "dtype": "bfloat16"}
    if method == "linear":  # a weighted average of the models: no base (mergekit would
        del config["base_model"]  # ask for a weight for it too)
    return config


def warm_io_floor(paths: dict[str, Path], out: Path, repeats: int = 3) -> float:
    """Seconds to read every input file once (page cache) plus write one model-sized file:
    the least any merge of these inputs has to move. The best of `repeats`."""
    files = [f for p in paths.values() for f in sorted(p.glob("*.safetensors"))]
    model_bytes = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors"))
    buf = bytearray(64 * 2**20)
    best = float("inf")
    for _ in range(repeats):
        target = out / "floor.bin"
        settle()
        t = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
        with open(target, "wb", buffering=0) as fh:
            left = model_bytes
            while left > 0:
                left -= fh.write(memoryview(buf)[:min(left, len(buf))])
        best = min(best, time.perf_counter() - t)
        target.unlink()
    return best


def settle() -> None:
    """Flush the previous runs' dirty pages first, so no run pays for another's writeback
    (the inputs stay in the page cache)."""
    os.sync()
    time.sleep(1.0)


def memory_facts(pid: int | str = "self") -> dict[str, int] | None:
    """Bytes of a process's resident memory by kind, from /proc/PID/smaps_rollup (Linux 4.14+):
    rss, anon (private anonymous pages), file (rss - anon: file-backed and shared pages), pss,
    uss (private clean + private dirty). None once the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            text = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    kb = {}
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            kb[key.strip()] = int(parts[0]) * 1024
    if "Rss" not in kb:
        return None
    anon = kb.get("Anonymous", 0)
    return {"rss": kb["Rss"], "anon": anon, "file": kb["Rss"] - anon, "pss": kb.get("Pss", 0),
            "uss": kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)}


class PeakSampler:
    """Samples a child's memory_facts every SAMPLE_SECONDS on a thread; keeps each kind's peak.
    (The kernel keeps a peak for RSS only, VmHWM; none for anonymous memory alone.)"""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peak = pid, {"rss": 0, "anon": 0, "file": 0, "pss": 0, "uss": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            facts = memory_facts(self.pid)
            if facts:
                for key, value in facts.items():
                    self.peak[key] = max(self.peak[key], value)
            self._stop.wait(SAMPLE_SECONDS)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def spawn(cmd: list[str]) -> tuple[float, float, float, str, dict[str, int]]:
    """(wall seconds, peak RSS in MiB, CPU seconds, stdout, sampled memory peaks in bytes) of a
    child process: the first three its own figures from wait4."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, text=True)
        sampler = PeakSampler(proc.pid)
        # (the child stays a zombie, its /proc entry readable, until wait4 reaps it)
        _, status, usage = os.wait4(proc.pid, 0)
        peaks = sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{err.read()[-3000:]}")
        return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, out.read(), peaks


def child(engine: str, config_path: Path, out: Path, tree: str | None = None) -> None:
    """In a subprocess of its own: one merge, timed around the call alone (not the start).
    tree: another checkout whose engine runs instead of this one's."""
    import resource

    import yaml

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    data = yaml.safe_load(config_path.read_text())
    shutil.rmtree(out, ignore_errors=True)
    if engine == "run_merge":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        config = MergeConfiguration.model_validate(data)
        base = memory_facts()["anon"]
        t, c = time.perf_counter(), cpu()
        run_merge(config, str(out), MergeOptions(random_seed=0, quiet=True,
                                                 copy_tokenizer=False,
                                                 write_model_card=False))
    else:
        import transformers  # noqa: F401  (loaded before the timer, as mergekit loads it)

        if tree:
            sys.path.insert(0, str(Path(tree).resolve()))
        try:
            from ops.merge import stream_merge
        except ImportError:  # a tree from before ops/merge/
            from ops.merge_stream import stream_merge
        import ops

        assert Path(ops.__file__).resolve().parent.parent == Path(tree or REPO).resolve(), \
            ops.__file__

        models = [m["model"] for m in data["models"]]
        params = [m["parameters"] for m in data["models"]]
        base = memory_facts()["anon"]
        t, c = time.perf_counter(), cpu()
        stream_merge(data["merge_method"], models, data.get("base_model"),
                     weights=[p["weight"] for p in params],
                     densities=[p.get("density", 1.0) for p in params],
                     out_dir=out, dtype=data["dtype"], seed=0)
    print(json.dumps({"seconds": time.perf_counter() - t, "cpu": cpu() - c, "anon_base": base}))
    # (the last shard's pages are still dirty in the page cache here, for both engines)


def differing_tensors(a: Path, b: Path) -> str:
    """'0 of N' when every tensor of a equals b's bit for bit."""
    import torch
    from safetensors import safe_open

    def index(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    if sorted(ia) != sorted(ib):
        return f"different tensor sets ({len(ia)} vs {len(ib)})"
    bad = 0
    for key in ia:
        with safe_open(str(ia[key]), framework="pt") as fa, \
                safe_open(str(ib[key]), framework="pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            bad += not torch.equal(x.reshape(-1).view(torch.uint8),
                                   y.reshape(-1).view(torch.uint8))
    return f"{bad} of {len(ia)}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/bench-merge", help="models are built here once")
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"],
                        help="merge methods to run; `all`: every native method")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per engine; the best wall time and its RSS are shown")
    parser.add_argument("--skip-cli", action="store_true", help="leave out mergekit-yaml")
    parser.add_argument("--size", choices=sorted(SIZES), default="350m",
                        help="the models' size (60m: a run of a few minutes)")
    parser.add_argument("--compare-tree", help="also time this other checkout's engine")
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["run_merge", "native"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.config), Path(args.out), args.tree)
        return 0

    if args.methods == ["all"]:
        from ops.merge import METHODS
        args.methods = list(METHODS)
    root = Path(args.dir) if args.size == "350m" else Path(args.dir) / args.size
    paths = build_models(root, args.size)
    model_bytes = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors"))
    work = root / "runs"
    work.mkdir(exist_ok=True)
    floor = warm_io_floor(paths, work)
    cli = Path(sys.executable).with_name("mergekit-yaml")
    print(f"inputs: 3 x {model_bytes / 2**20:.0f} MiB bf16 in "
          f"{len(list(paths['base'].glob('*.safetensors')))} shards; warm I/O floor "
          f"{floor:.2f} s; {os.cpu_count()} CPUs; load average before "
          f"{os.getloadavg()[0]:.2f}", flush=True)

    rows, compared = [], []
    for method in args.methods:
        import yaml

        config_path = work / f"{method}.yml"
        config_path.write_text(yaml.safe_dump(merge_config(method, paths), sort_keys=False))
        engines = ([] if args.skip_cli else ["mergekit-yaml"]) + ["run_merge", "native"]
        if args.compare_tree:
            engines.append("native-other")
        runs: dict[str, list] = {engine: [] for engine in engines}
        # The repeats take turns (a, b, c, a, b, c, ...): this machine's write speed drifts
        # (a VM's fresh page-cache pages cost several times more than reused ones), and
        # taking turns gives every engine a share of each state.
        for engine in [e for _ in range(args.repeats) for e in engines]:
            if engine == engines[0] and runs[engine]:  # the floor drifts as well: take turns
                floor = min(floor, warm_io_floor(paths, work, repeats=1))
            out = work / f"{method}-{engine}"
            shutil.rmtree(out, ignore_errors=True)
            settle()
            if engine == "mergekit-yaml":
                wall, rss, cpu, _, peaks = spawn([str(cli), str(config_path), str(out),
                                                  "--random-seed", "0", "--quiet",
                                                  "--no-copy-tokenizer",
                                                  "--no-write-model-card"])
                seconds, anon_base = wall, None
            else:
                tree = ["--tree", args.compare_tree] if engine == "native-other" else []
                wall, rss, cpu, stdout, peaks = spawn([sys.executable, __file__, "--child",
                                                       engine.split("-")[0], "--config",
                                                       str(config_path), "--out", str(out),
                                                       *tree])
                timed = json.loads(stdout.strip().splitlines()[-1])
                seconds, cpu, anon_base = timed["seconds"], timed["cpu"], timed["anon_base"]
            runs[engine].append((seconds, rss, cpu, wall, peaks, anon_base))
            print(f"  {method:16} {engine:14} {seconds:7.2f} s (CPU {cpu:.1f} s, process "
                  f"{wall:.2f} s), wait4 RSS {rss:.0f} MiB, sampled RSS peak "
                  f"{peaks['rss'] / 2**20:.0f} MiB, anonymous peak "
                  f"{peaks['anon'] / 2**20:.0f} MiB, file-backed peak "
                  f"{peaks['file'] / 2**20:.0f} MiB", flush=True)
        results = {engine: min(runs[engine], key=lambda r: r[0]) for engine in engines}
        same = {e: differing_tensors(work / f"{method}-{e}", work / f"{method}-run_merge")
                for e in ("native", "native-other") if e in engines}
        reference = results["run_merge"][0]
        for engine, (seconds, rss, cpu, wall, peaks, anon_base) in results.items():
            # the largest anonymous peak of the engine's runs: memory is not a best-of figure
            anon = max(r[4]["anon"] for r in runs[engine])
            rows.append({"method": method, "engine": engine, "seconds": seconds, "cpu": cpu,
                         "rss": max(r[4]["rss"] for r in runs[engine]) / 2**20,
                         "x_run_merge": seconds / reference,
                         "anon": anon / 2**20, "anon_base": (anon_base or 0) / 2**20
                         if anon_base is not None else None,
                         "file": max(r[4]["file"] for r in runs[engine]) / 2**20,
                         "pss": max(r[4]["pss"] for r in runs[engine]) / 2**20,
                         "rss_vs_model": max(r[4]["rss"] for r in runs[engine]) / model_bytes,
                         "anon_vs_model": anon / model_bytes,
                         "call_vs_model": (anon - (anon_base or 0)) / model_bytes
                         if anon_base is not None else None, "same": same.get(engine, "")})
        if args.compare_tree:
            each = ", ".join(f"{r[0]:.2f}/{o[0]:.2f}" for r, o in
                             zip(runs["native"], runs["native-other"]))
            compared.append(f"{method:16} native {results['native'][0]:.2f} s, native-other "
                            f"{results['native-other'][0]:.2f} s (best of each): ratio "
                            f"{results['native'][0] / results['native-other'][0]:.3f}; "
                            f"each turn (this/other): {each}")

    print(f"\nwarm I/O floor, the best of {3 + (args.repeats - 1) * len(args.methods)} "
          f"measurements taken between the runs: {floor:.2f} s")
    print(f"\n{'method':16} {'engine':14} {'wall s':>7} {'CPU s':>6} {'x run_merge':>11} "
          f"{'x floor':>7} {'RSS MiB':>8} {'anon MiB':>8} {'(base)':>6} {'file MiB':>8} "
          f"{'PSS MiB':>8} {'RSS/model':>9} {'anon/model':>10} {'call/model':>10}  tensors differing from "
          f"run_merge")
    for r in rows:
        base = "" if r["anon_base"] is None else f"{r['anon_base']:.0f}"
        call = "" if r["call_vs_model"] is None else f"{r['call_vs_model']:.2f}"
        print(f"{r['method']:16} {r['engine']:14} {r['seconds']:7.2f} {r['cpu']:6.1f} "
              f"{r['x_run_merge']:11.2f} {r['seconds'] / floor:7.1f} {r['rss']:8.0f} "
              f"{r['anon']:8.0f} {base:>6} {r['file']:8.0f} {r['pss']:8.0f} "
              f"{r['rss_vs_model']:9.2f} {r['anon_vs_model']:10.2f} {call:>10}  {r['same']}")
    print(f"\none input model: {model_bytes / 2**20:.0f} MiB. anon: the sampled peak of private "
          f"anonymous memory (base: what the process held before the timed call, its imports; "
          f"call/model: the peak less that base, what the merge itself added); "
          f"file: resident file-backed pages (mapped inputs, libraries), which the kernel "
          f"reclaims at will; RSS (sampled) counts both, so it differs between machines with "
          f"their free memory.")
    print(f"targets for native: x run_merge <= {TARGETS['vs_run_merge']}, anon/model <= "
          f"{TARGETS['anon_vs_model']}, x floor <= {TARGETS['vs_floor']}. mergekit-yaml's time "
          f"is the whole process (start-up included); run_merge's and native's are the call "
          f"alone, in a process of its own. Load average after: {os.getloadavg()[0]:.2f}")
    if compared:
        print(f"\nthis tree against {args.compare_tree} (ratio < 1: this tree is faster):")
        for line in compared:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
