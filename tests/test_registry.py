import multiprocessing as mp
import sqlite3

import pytest

from registry import Registry, RegistryError, SCHEMA_VERSION
from registry import schema


def chain(reg):
    """base -> ft1 -> ft2 ; base -> ft3 ; merge(ft2, ft3) -> m"""
    base = reg.add_checkpoint(name="base", relation="import")
    ft1 = reg.add_checkpoint(name="ft1", relation="finetune", parents=[{"id": base["id"]}])
    ft2 = reg.add_checkpoint(name="ft2", relation="finetune", parents=[{"id": ft1["id"]}])
    ft3 = reg.add_checkpoint(name="ft3", relation="finetune", parents=[{"id": base["id"]}])
    m = reg.add_checkpoint(name="m", relation="merge", parents=[
        {"id": ft2["id"], "weight": 0.5, "role": "model"},
        {"id": ft3["id"], "weight": 0.5, "role": "model"},
        {"id": base["id"], "role": "base"}])
    return {r["name"]: r["id"] for r in (base, ft1, ft2, ft3, m)}


def test_schema_from_empty_database(tmp_path):
    reg = Registry(tmp_path / "r.db")
    assert reg.schema_version() == SCHEMA_VERSION
    assert {"checkpoints", "edges", "jobs", "metrics", "evaluations",
            "schema_version"} <= set(reg.db.table_names())
    assert reg.db.journal_mode == "wal"
    reg.close()
    # reopening applies nothing twice
    reg = Registry(tmp_path / "r.db")
    assert [r["version"] for r in reg.db["schema_version"].rows] == list(
        range(1, SCHEMA_VERSION + 1))


def test_forward_migration_keeps_data(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "r.db")
    ids = chain(reg)
    reg.close()

    def v2(db):
        db["checkpoints"].add_column("stars", int)

    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS + [(SCHEMA_VERSION + 1, v2)])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    reg = Registry(tmp_path / "r.db")
    assert reg.schema_version() == SCHEMA_VERSION + 1
    assert "stars" in reg.db["checkpoints"].columns_dict
    assert len(reg.ancestors(ids["m"])) == 4


def test_newer_schema_is_refused(tmp_path):
    reg = Registry(tmp_path / "r.db")
    reg.db["schema_version"].insert({"version": SCHEMA_VERSION + 5, "applied_at": "x"})
    reg.close()
    with pytest.raises(RegistryError, match="newer than this weightsmith"):
        Registry(tmp_path / "r.db")


def test_lineage_queries(tmp_path):
    reg = Registry(tmp_path / "r.db")
    ids = chain(reg)
    anc = {r["name"]: r["depth"] for r in reg.ancestors(ids["m"])}
    assert anc == {"ft2": 1, "ft3": 1, "base": 1, "ft1": 2}
    assert {r["name"] for r in reg.ancestors(ids["m"], max_depth=1)} == {"ft2", "ft3", "base"}
    desc = {r["name"]: r["depth"] for r in reg.descendants(ids["base"])}
    assert desc == {"ft1": 1, "ft3": 1, "m": 1, "ft2": 2}
    graph = reg.lineage(ids["ft1"])
    assert graph["root"] == ids["ft1"]
    assert {n["name"] for n in graph["nodes"]} == {"base", "ft1", "ft2", "m"}
    edges = {(e["parent"], e["child"], e["relation"]) for e in graph["edges"]}
    assert (ids["base"], ids["ft1"], "finetune") in edges
    assert (ids["ft2"], ids["m"], "merge") in edges
    assert (ids["base"], ids["m"], "merge") in edges  # both ends in the graph
    m_edges = [e for e in reg.lineage(ids["m"])["edges"] if e["child"] == ids["m"]]
    assert [(e["weight"], e["role"]) for e in m_edges] == [(0.5, "model"), (0.5, "model"),
                                                          (None, "base")]
    text = reg.lineage_mermaid(ids["m"])
    assert text.startswith("graph TD")
    # quoted, with the parentheses as entities: unquoted, Mermaid reads them as a node shape
    node = lambda ck: "n_" + ck.replace("-", "_2d_")  # noqa: E731
    assert f'{node(ids["ft2"])} -->|"merge 0.5 #40;model#41;"| {node(ids["m"])}' in text


def test_scores_show_in_lineage_and_lists(tmp_path):
    reg = Registry(tmp_path / "r.db")
    ids = chain(reg)
    reg.add_evaluation(checkpoint_id=ids["m"], task="ppl:x", metric="perplexity", value=12.5)
    reg.add_evaluation(checkpoint_id=ids["m"], task="ppl:x", metric="perplexity", value=11.0)
    node = [n for n in reg.lineage(ids["base"])["nodes"] if n["id"] == ids["m"]][0]
    assert node["scores"] == {"ppl:x/perplexity": 11.0}
    assert "<b>ppl#58;x</b><br/>perplexity = 11" in reg.lineage_mermaid(ids["m"])
    rows = reg.list_checkpoints(search="m")
    assert [r["name"] for r in rows] == ["m"]
    assert rows[0]["parents"] == [ids["ft2"], ids["ft3"], ids["base"]]
    assert rows[0]["scores"] == {"ppl:x/perplexity": 11.0}
    with pytest.raises(RegistryError):
        reg.add_evaluation(checkpoint_id="ck-nope", task="t", metric="m", value=1)


def test_list_filters_and_paging(tmp_path):
    reg = Registry(tmp_path / "r.db")
    chain(reg)
    assert {r["name"] for r in reg.list_checkpoints(relation="finetune")} == {"ft1", "ft2", "ft3"}
    first = reg.list_checkpoints(limit=2)
    second = reg.list_checkpoints(limit=2, offset=2)
    assert [r["name"] for r in first] == ["m", "ft3"]  # newest first
    assert [r["name"] for r in second] == ["ft2", "ft1"]


def test_names_unique_and_references(tmp_path):
    reg = Registry(tmp_path / "r.db")
    a = reg.add_checkpoint(name="x", relation="import", path=str(tmp_path))
    b = reg.add_checkpoint(name="x", relation="import")
    assert b["name"] == "x-2"
    assert reg.find_checkpoint("x")["id"] == a["id"]
    assert reg.find_checkpoint(a["id"])["id"] == a["id"]
    assert reg.find_checkpoint(str(tmp_path))["id"] == a["id"]
    assert reg.find_checkpoint("nothing") is None
    # 48 random bits: ids are merged across labs by Hub sync (older 8-digit ids stay valid)
    assert a["id"].startswith("ck-") and len(a["id"]) == 15


def test_bad_relation_and_unknown_parent_are_rejected(tmp_path):
    reg = Registry(tmp_path / "r.db")
    with pytest.raises(RegistryError, match="relation"):
        reg.add_checkpoint(name="a", relation="Not A Relation")
    with pytest.raises(RegistryError, match="ck-missing"):
        reg.add_checkpoint(name="a", relation="finetune", parents=[{"id": "ck-missing"}])
    assert reg.list_checkpoints() == []  # nothing half-written
    # the relation list is extensible: a plugin's own lowercase word is accepted
    assert reg.add_checkpoint(name="q", relation="quantize")["relation"] == "quantize"


def _writer(path, tag, n):
    reg = Registry(path)
    root = reg.find_checkpoint("root")["id"]
    for i in range(n):
        ck = reg.add_checkpoint(name=f"{tag}-{i}", relation="finetune", parents=[{"id": root}])
        reg.add_evaluation(checkpoint_id=ck["id"], task="t", metric="m", value=i)
        job = reg.add_job(plugin="evaluate", config={"i": i})
        reg.update_job(job["id"], only_if_status=("queued",), status="running")
    reg.close()


def test_concurrent_writers_from_two_processes(tmp_path):
    path = tmp_path / "r.db"
    reg = Registry(path)
    reg.add_checkpoint(name="root", relation="import")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, tag, 150)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert reg.db["checkpoints"].count == 301
    assert reg.db["edges"].count == 300
    assert reg.db["evaluations"].count == 300
    assert len(reg.jobs(status="running", limit=1000)) == 300
    assert len(reg.descendants("root")) == 300
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_score_deltas_against_each_parent(tmp_path):
    reg = Registry(tmp_path / "r.db")
    ids = chain(reg)
    for name, ppl, acc in (("ft2", 10.0, 0.5), ("ft3", 12.0, None), ("base", 20.0, 0.25),
                           ("m", 11.0, 0.75)):
        reg.add_evaluation(checkpoint_id=ids[name], task="t", metric="ppl", value=ppl)
        if acc is not None:
            reg.add_evaluation(checkpoint_id=ids[name], task="t", metric="acc", value=acc)
    deltas = {(d["parent_name"], d["metric"]): d["delta"] for d in reg.score_deltas(ids["m"])}
    assert deltas == {("ft2", "t/acc"): 0.25, ("ft2", "t/ppl"): 1.0, ("ft3", "t/ppl"): -1.0,
                      ("base", "t/acc"): 0.5, ("base", "t/ppl"): -9.0}
    assert reg.score_deltas(ids["base"]) == []  # a root has no parents
