"""The lineage graph (Registry.lineage) deep in a merge-heavy registry: the same graph as a plain
walk with one query per checkpoint, and every query it makes answered from an index (schema
v9's covering indexes), in a new registry and in one migrated from v8."""

import json
import random

import pytest

from registry import Registry, schema

NODE_COLUMNS = ("id", "name", "kind", "relation", "architecture", "param_count", "created_at")


def reference_lineage(reg, root: str, max_depth: int | None) -> dict:
    """The graph `Registry.lineage` promises, one checkpoint at a time: every checkpoint within
    `max_depth` edges up or down, oldest first (ties by id), each with its latest score per
    task/metric (keys in the order first recorded); the edges among them, by child, then
    position (none first), then parent."""
    db = reg.db.conn

    def within(src: str, dst: str) -> set[str]:
        seen, frontier, depth = {root}, [root], 0
        while frontier and (max_depth is None or depth < max_depth):
            depth += 1
            found = []
            for node in frontier:
                for (other,) in db.execute(f"SELECT {dst} FROM edges WHERE {src} = ?", [node]):
                    if other not in seen:
                        seen.add(other)
                        found.append(other)
            frontier = found
        return seen

    ids = within("child_id", "parent_id") | within("parent_id", "child_id")
    nodes = []
    for ck in ids:
        row = db.execute(f"SELECT {', '.join(NODE_COLUMNS)} FROM checkpoints WHERE id = ?",
                         [ck]).fetchone()
        scores = {}
        for task, metric, value in db.execute(
                "SELECT task, metric, value FROM evaluations WHERE checkpoint_id = ? "
                "ORDER BY id", [ck]):
            scores[f"{task}/{metric}"] = value
        nodes.append({**dict(zip(NODE_COLUMNS, row)), "scores": scores})
    nodes.sort(key=lambda n: (n["created_at"], n["id"]))
    edges = []
    for child in sorted(ids):
        rows = db.execute("SELECT parent_id, position, relation, weight, density, role "
                          "FROM edges WHERE child_id = ?", [child]).fetchall()
        rows.sort(key=lambda r: (-1 if r[1] is None else r[1], r[0]))
        edges += [{"parent": p, "child": child, "relation": rel, "weight": w, "density": d,
                   "role": role} for p, _, rel, w, d, role in rows if p in ids]
    return {"root": root, "nodes": nodes, "edges": edges}


def merge_heavy_lab(reg, seed: int = 7) -> dict:
    """Two 125-step lines of work, A and B, off their own bases; every ninth step A's tip is a
    merge with B's (weights, densities, roles), every eleventh a side line leaves A; re-
    evaluated scores, equal creation times, adapters, rows without an architecture, an edge
    without a position, and a descendant of A's middle merged with one of its ancestors.
    {"leaf", "mid", "base"}: ids (A's tip, middle and base)."""
    rng = random.Random(seed)
    count = 0

    def add(relation, parents, **fields):
        nonlocal count
        count += 1
        ck = reg.add_checkpoint(name=f"ck-{count}", relation=relation, parents=parents,
                                architecture=rng.choice(["LlamaForCausalLM", None]),
                                param_count=rng.choice([7_000_000, None]), **fields)
        for _ in range(rng.choice([0, 0, 1, 3])):  # repeats: the latest value is the score
            reg.add_evaluation(checkpoint_id=ck["id"], task=rng.choice(["arc", "mmlu", "p/q"]),
                               metric=rng.choice(["acc", "loss"]), value=rng.random())
        return ck["id"]

    def step_of(tip):
        return add(rng.choice(["finetune", "prune", "continue_pretrain"]), [{"id": tip}])

    base = a = add("import", [])
    b = add("import", [])
    for step in range(125):
        if step % 9 == 4:
            a = add("merge", [{"id": a, "weight": 0.6, "density": 0.3, "role": "model"},
                              {"id": b, "weight": round(rng.random(), 3), "role": "model"}])
        elif step % 17 == 0:  # created at the same instant as others: ordered by id
            a = add("finetune", [{"id": a}], created_at="2026-01-01T00:00:00.000000Z")
        else:
            a = step_of(a)
        b = step_of(b)
        if step % 11 == 0:
            step_of(add("finetune", [{"id": a}], kind=rng.choice(["model", "adapter"])))
        if step == 60:
            mid = a
    # an edge recorded without a position (rows from before positions were kept)
    reg.db["edges"].insert({"child_id": a, "parent_id": b, "relation": "merge",
                            "position": None})
    child = reg.descendants(mid, max_depth=1)[0]["id"]
    add("merge", [{"id": child}, {"id": reg.ancestors(mid, max_depth=4)[-1]["id"]}])
    return {"leaf": a, "mid": mid, "base": base}


@pytest.fixture
def reg(tmp_path):
    with Registry(tmp_path / "r.db") as r:
        yield r


def test_a_deep_lineage_is_the_plain_walk_graph(reg):
    ids = merge_heavy_lab(reg)
    graph = reg.lineage(ids["leaf"], max_depth=100)
    assert len(graph["nodes"]) > 100 and len(graph["edges"]) > 110  # it goes deep
    cut = reg.lineage(ids["leaf"], max_depth=None)
    assert len(cut["nodes"]) > len(graph["nodes"])  # and depth 100 cuts through merges
    for root in ids.values():
        for depth in (100, 7, 1, 0, None):
            got = reg.lineage(root, max_depth=depth)
            expected = reference_lineage(reg, root, depth)
            # the same JSON, key order included: what the lineage view and `--json` write
            assert json.dumps(got) == json.dumps(expected), (root, depth)


def test_a_deep_lineage_with_its_datasets(reg):
    ids = merge_heavy_lab(reg)
    job = reg.add_job(plugin="sft", config={})
    ds = reg.datasets.add(content_hash="ab" * 32, name="chat.jsonl", source="upload",
                          format="jsonl", rows=10)
    reg.datasets.use(job["id"], ds["id"], "dataset")
    trained = reg.add_checkpoint(name="trained", relation="finetune", job_id=job["id"],
                                 parents=[{"id": ids["leaf"]}])
    plain = reference_lineage(reg, trained["id"], 100)
    graph = reg.lineage(trained["id"], max_depth=100, datasets=True)
    assert [n for n in graph["nodes"] if n["kind"] != "dataset"] == plain["nodes"]
    assert [n["id"] for n in graph["nodes"] if n["kind"] == "dataset"] == [ds["id"]]
    assert graph["edges"] == plain["edges"] + [{
        "parent": ds["id"], "child": trained["id"], "relation": "data", "weight": None,
        "density": None, "role": "dataset"}]


def lineage_plans(reg, ck_id: str) -> list[str]:
    """The query plan of every statement over an id list that `lineage` runs."""
    statements: list[str] = []
    reg.db.conn.set_trace_callback(statements.append)
    try:
        reg.lineage(ck_id, max_depth=100)
    finally:
        reg.db.conn.set_trace_callback(None)
    return [" | ".join(r[3] for r in reg.db.execute(f"EXPLAIN QUERY PLAN {sql}"))
            for sql in dict.fromkeys(statements) if "json_each" in sql]


def test_the_lineage_reads_only_indexes_also_in_a_migrated_registry(tmp_path, monkeypatch):
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:8])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", 8)
    with Registry(tmp_path / "r.db") as old:
        ids = merge_heavy_lab(old)
        before = reference_lineage(old, ids["leaf"], 100)
        # statistics from before v9, which would steer SQLite to the primary keys' indexes
        old.db.execute("ANALYZE")
    monkeypatch.undo()
    with Registry(tmp_path / "r.db") as new:
        assert new.schema_version() == schema.SCHEMA_VERSION >= 9
        indexes = {ix.name for table in ("checkpoints", "edges", "evaluations")
                   for ix in new.db[table].indexes}
        assert set(schema.LINEAGE_INDEXES.values()) <= indexes
        assert "idx_evaluations_checkpoint_id_task_metric" not in indexes  # now a prefix
        assert new.lineage(ids["leaf"], max_depth=100) == before
        plans = lineage_plans(new, ids["mid"])
    with Registry(tmp_path / "fresh.db") as fresh:
        plans += lineage_plans(fresh, merge_heavy_lab(fresh)["mid"])
    # walks up and down, nodes, parent edges and scores, each an index seek per id
    assert len(plans) >= 2 * 4
    for plan in plans:
        for step in plan.split(" | "):
            assert "VIRTUAL TABLE" in step or "USING COVERING INDEX" in step, plan
