"""Registry benchmark: 100,000 checkpoints in realistic chains and merges.

    python bench/registry.py [--checkpoints 100000] [--db PATH]

Prints the time of an ancestors query at depth 100, a lineage graph, and list pages, each as
the median of repeated runs, against the 20 ms target.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registry import Registry  # noqa: E402
from registry.store import now  # noqa: E402

TARGET_MS = 20.0


def fill(reg: Registry, n: int, seed: int = 0) -> list[list[str]]:
    """Lines of work (continued pre-training, SFT rounds, prunes, scales) off a few hundred
    imported bases, with merges of a line's tip and recent checkpoints (3% of rows).

    Rows go in through sqlite-utils' insert_all in one transaction (per-row add_checkpoint
    would take minutes and measures nothing the queries care about)."""
    rng = random.Random(seed)
    chains: list[list[str]] = []
    checkpoints, edges, evaluations = [], [], []
    recent: list[str] = []
    for i in range(n):
        ck_id = f"ck-{i:08x}"
        r = rng.random()
        if i < 200 or r < 0.002:  # a new base model
            relation, parents = "import", []
            chains.append([ck_id])
        else:
            # extend a line of work: mostly recent ones (an exponential preference)
            if rng.random() < 0.8:
                chain = chains[-1 - min(int(rng.expovariate(1 / 20)), len(chains) - 1)]
            else:
                chain = rng.choice(chains)
            if r < 0.03 and len(recent) > 10:  # merge its tip with 1-2 recent checkpoints
                relation = "merge"
                others = [c for c in rng.sample(recent[-300:], 2) if c != chain[-1]]
                parents = [chain[-1]] + others[:rng.randint(1, 2)]
            else:  # fine-tune, continue pre-training, adapter, prune, scale
                relation = rng.choices(["finetune", "continue_pretrain", "adapter", "prune",
                                        "scale"], [60, 25, 8, 4, 3])[0]
                parents = [chain[-1]]
            chain.append(ck_id)
        checkpoints.append({
            "id": ck_id, "name": f"model-{i}", "kind": "model", "relation": relation,
            "path": f"/lab/checkpoints/{ck_id}", "architecture": "LlamaForCausalLM",
            "param_count": 7_000_000_000, "dtype": "bfloat16", "size_bytes": 14 * 2**30,
            "content_hash": f"sha256:{rng.getrandbits(256):064x}",
            "created_at": f"2026-01-01T00:00:00.{i:06d}Z" if i < 1_000_000 else now(),
            "created_by": rng.choice(["ana", "ben", "chen", "dee"]), "plugin": relation})
        for pos, p in enumerate(parents):
            edges.append({"child_id": ck_id, "parent_id": p, "relation": relation,
                          "weight": round(1 / len(parents), 3) if relation == "merge" else None,
                          "role": "model" if relation == "merge" else None, "position": pos})
        if rng.random() < 0.5:
            evaluations.append({"checkpoint_id": ck_id, "task": "ppl:heldout",
                                "metric": "perplexity", "value": rng.uniform(5, 50),
                                "created_at": now()})
        recent.append(ck_id)
    with reg.write():
        reg.db["checkpoints"].insert_all(checkpoints, batch_size=5000)
        reg.db["edges"].insert_all(edges, batch_size=5000)
        reg.db["evaluations"].insert_all(evaluations, batch_size=5000)
    reg.db.execute("ANALYZE")
    return chains


def timed(fn, repeats: int = 30) -> tuple[float, object]:
    fn()  # warm the page cache and the statement cache
    samples, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples), result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints", type=int, default=100_000)
    parser.add_argument("--db", default=None, help="default: a temporary file")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    db_path = Path(args.db or Path(tmp.name) / "registry.db")
    reg = Registry(db_path)
    t = time.perf_counter()
    chains = fill(reg, args.checkpoints)
    fill_s = time.perf_counter() - t
    deep = max(chains, key=len)
    leaf = deep[-1]
    size_mb = db_path.stat().st_size / 2**20
    print(f"filled {args.checkpoints:,} checkpoints, {reg.db['edges'].count:,} edges in "
          f"{fill_s:.1f} s ({size_mb:.0f} MiB); deepest chain {len(deep)}")

    rows = []
    ms, anc = timed(lambda: reg.ancestors(leaf, max_depth=100))
    rows.append(("ancestors, depth 100", ms, f"{len(anc)} ancestors, max depth "
                 f"{max(a['depth'] for a in anc)}"))
    ms, anc_all = timed(lambda: reg.ancestors(leaf), repeats=10)
    rows.append(("ancestors, unbounded", ms, f"{len(anc_all)} ancestors"))
    mid = deep[len(deep) // 2]
    ms, desc = timed(lambda: reg.descendants(mid, max_depth=100))
    rows.append(("descendants, depth 100", ms, f"{len(desc)} descendants"))
    ms, graph = timed(lambda: reg.lineage(leaf, max_depth=100))
    rows.append(("lineage graph JSON, depth 100", ms, f"{len(graph['nodes'])} nodes, "
                 f"{len(graph['edges'])} edges, {len(json.dumps(graph)) // 1024} KiB"))
    ms, page = timed(lambda: reg.list_checkpoints(limit=50))
    rows.append(("list page 1 (50 rows)", ms, f"{len(page)} rows with parents and scores"))
    ms, page = timed(lambda: reg.list_checkpoints(limit=50, offset=5000))
    rows.append(("list page 101 (offset 5000)", ms, f"{len(page)} rows"))
    ms, page = timed(lambda: reg.list_checkpoints(relation="merge", limit=50))
    rows.append(("list page, relation=merge", ms, f"{len(page)} rows"))
    ms, page = timed(lambda: reg.list_checkpoints(search="model-9999", limit=50))
    rows.append(("list page, search 'model-9999'", ms, f"{len(page)} rows"))

    print(f"\n{'query':34} {'median ms':>10} {'target ms':>10} {'ratio':>6}  result")
    worst = 0.0
    for name, ms, note in rows:
        print(f"{name:34} {ms:10.2f} {TARGET_MS:10.0f} {ms / TARGET_MS:6.2f}  {note}")
        if name.startswith(("ancestors, depth", "list page 1 ")):
            worst = max(worst, ms / TARGET_MS)
    print(f"\nheadline (ancestors depth 100, list page 1): worst ratio to target {worst:.2f}")
    reg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
