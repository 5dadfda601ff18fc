"""Registry search: checkpoint names through the FTS5 trigram index (schema v8), literal and
case-insensitive, ids by prefix; an older registry gets the index filled on open."""

import pytest

from registry import Registry, schema, store


@pytest.fixture
def reg(tmp_path):
    with Registry(tmp_path / "registry.db") as r:
        yield r


def names(rows) -> set[str]:
    return {r["name"] for r in rows}


def test_search_is_a_literal_case_insensitive_substring(reg):
    for name in ("Demo-Base", "demo-ft-sums", 'we"ird %_ name', "x", "ab", "AND OR NOT *"):
        reg.add_checkpoint(name=name, relation="import")
    cases = {"demo": {"Demo-Base", "demo-ft-sums"}, "DEMO-F": {"demo-ft-sums"},
             '"ird %': {'we"ird %_ name'}, "%": {'we"ird %_ name'}, "_": {'we"ird %_ name'},
             "ab": {"ab"}, "b": {"ab", "Demo-Base"}, "zz": set(), "OR NOT": {"AND OR NOT *"},
             "NOT *": {"AND OR NOT *"}, "sums)": set()}
    for query, expected in cases.items():  # FTS5 syntax in a query is only text
        assert names(reg.list_checkpoints(search=query)) == expected, query
        assert names(reg.lab_graph(search=query)["nodes"]) == expected, query
    some = reg.list_checkpoints(search="x")[0]
    assert names(reg.list_checkpoints(search="ck-")) == names(reg.list_checkpoints())
    assert names(reg.list_checkpoints(search=some["id"])) == {"x"}
    # the index follows renames and deletes (sqlite-utils' triggers)
    reg.update_checkpoint(some["id"], name="renamed-thing")
    assert names(reg.list_checkpoints(search="thing")) == {"renamed-thing"}
    assert names(reg.list_checkpoints(search="x")) == set()


def test_long_searches_use_the_trigram_index(reg):
    reg.add_checkpoint(name="model-1", relation="import")
    params: list = []
    where = store._name_or_id("model-1", params)
    plan = " ".join(str(r) for r in reg.db.execute(
        f"EXPLAIN QUERY PLAN SELECT id FROM checkpoints WHERE {where}", params).fetchall())
    assert "checkpoints_fts" in plan and "VIRTUAL TABLE" in plan.upper()


def test_an_older_registry_gets_its_names_indexed(tmp_path, monkeypatch):
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:7])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", 7)
    with Registry(tmp_path / "r.db") as old:
        old.add_checkpoint(name="legacy-model", relation="import")
        assert "checkpoints_fts" not in old.db.table_names()
    monkeypatch.undo()
    with Registry(tmp_path / "r.db") as new:
        assert new.schema_version() == store.SCHEMA_VERSION >= 8
        assert names(new.list_checkpoints(search="acy-mo")) == {"legacy-model"}


def test_control_characters_and_case_in_a_search_are_only_text(reg):
    ck = reg.add_checkpoint(name="abc", relation="import")
    assert reg.list_checkpoints(search="a\0bc") == []  # FTS5 would end the query at NUL
    assert reg.lab_graph(search="ab\x01c")["nodes"] == []
    assert names(reg.list_checkpoints(search=ck["id"].upper())) == {"abc"}  # ids: lowercase
