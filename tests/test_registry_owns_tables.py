"""The registry owns every table: app/ and plugins/ hold no SQL and never touch the registry's
connection; every row, wherever it comes from (a job, Hub sync, a login), goes through a
Registry method and its checks. Relations have one home, registry/relations.py."""

import ast
import dataclasses
import re

import pytest

from registry import RELATIONS, Registry, RegistryError
from registry import hub, relations, schema, store
from tests.conftest import REPO

CODE_ROOTS = ("app", "plugins")
# the registry's connection and its cursors: `reg.db`, `db.conn`, `x.execute(...)`, `x.query(...)`
CONNECTION_ATTRS = {"db", "conn", "execute", "executemany", "executescript", "query"}
SQL = re.compile(r"\b(SELECT\b.*\bFROM|INSERT\s+(OR\s+[A-Z]+\s+)?INTO|UPDATE\s+\w+\s+SET|"
                 r"DELETE\s+FROM|PRAGMA\s+\w+|CREATE\s+(TABLE|INDEX)|DROP\s+TABLE)\b", re.S)


def python_files(*roots):
    for root in roots:
        yield from sorted((REPO / root).rglob("*.py"))


def sql_problems(path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in CONNECTION_ATTRS:
            found.append(f"{where}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr == "connect" and \
                isinstance(node.value, ast.Name) and node.value.id == "sqlite3":
            found.append(f"{where}:{node.lineno}: sqlite3.connect")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                SQL.search(node.value):
            found.append(f"{where}:{node.lineno}: SQL text {node.value[:60]!r}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] == "sqlite_utils" for n in names):
                found.append(f"{where}:{node.lineno}: imports sqlite_utils")
    return found


def test_the_checker_sees_sql_and_connection_use(tmp_path):
    (tmp_path / "bad.py").write_text(
        "import sqlite3\n"
        "def f(reg):\n"
        "    reg.db['users'].insert({})\n"
        "    sqlite3.connect('x').close()\n"
        "    return reg.db.execute('DELETE FROM jobs WHERE id = ?', [1])\n")
    assert len(sql_problems(tmp_path / "bad.py")) == 5  # 2 x .db, connect, .execute, DELETE
    (tmp_path / "good.py").write_text("import sqlite3\nERR = sqlite3.OperationalError\n"
                                      "HELP = 'Select a job first; delete it with Delete.'\n")
    assert sql_problems(tmp_path / "good.py") == []


def test_app_and_plugins_hold_no_sql_and_never_touch_the_connection():
    problems = [p for f in python_files(*CODE_ROOTS) for p in sql_problems(f)]
    assert problems == [], "SQL outside registry/ (add a Registry method):\n" + \
        "\n".join(problems)


# --------------------------------------------------------------------------------- relations
def recorded_relations(*roots) -> dict[str, str]:
    """{relation: where} for every relation literal the code records: the first argument of
    `new_checkpoint(...)`, `relation=...` keywords, `"relation": ...` in dict literals and
    `relation = ...` assignments (both branches of a conditional)."""
    found: dict[str, str] = {}

    def literals(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.IfExp):
            return literals(node.body) + literals(node.orelse)
        return []

    for path in python_files(*roots):
        where = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text(), where)):
            values = []
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", None))
                if name == "new_checkpoint" and node.args:
                    values += literals(node.args[0])
                values += [v for k in node.keywords if k.arg == "relation"
                           for v in literals(k.value)]
            elif isinstance(node, ast.Dict):
                values += [v for k, val in zip(node.keys, node.values)
                           if isinstance(k, ast.Constant) and k.value == "relation"
                           for v in literals(val)]
            elif isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "relation" for t in node.targets):
                values += literals(node.value)
            for v in values:
                found.setdefault(v, f"{where}:{node.lineno}")
    return found


def test_relations_table_covers_every_relation_the_code_records():
    found = recorded_relations("plugins", "app")
    # the scan itself works: these are recorded by train, merge_adapter, task_vector, import
    assert {"finetune", "adapter", "adapter_merge", "task_vector", "task_vector_apply",
            "graft", "merge", "prune", "scale", "continue_pretrain", "import"} <= set(found)
    missing = {r: where for r, where in found.items() if r not in RELATIONS}
    assert missing == {}, f"relations recorded but not in registry/relations.py: {missing}"


def test_every_relation_has_a_description_and_a_hub_word_the_hub_accepts():
    assert "pretrain" in RELATIONS
    for name, rel in RELATIONS.items():
        assert rel.name == name and relations.check_relation(name) == name
        assert rel.description and "\n" not in rel.description
        assert rel.hub is None or rel.hub in relations.HUB_BASE_MODEL_RELATIONS
    assert relations.hub_relation("adapter") == "adapter"
    assert relations.hub_relation("prune") == "finetune"
    assert relations.hub_relation("some_plugins_own") == "finetune"
    assert relations.from_hub("quantized") == "quantized"
    assert relations.from_hub("<b>x</b>") == relations.from_hub(None) == "finetune"


def test_a_pretrained_root_has_no_parents(tmp_path):
    with Registry(tmp_path / "r.db") as reg:
        root = reg.add_checkpoint(name="scratch", relation="pretrain")
        assert reg.parents(root["id"]) == [] and reg.ancestors(root["id"]) == []
        child = reg.add_checkpoint(name="ft", relation="finetune", parents=[{"id": root["id"]}])
        assert [a["relation"] for a in reg.ancestors(child["id"])] == ["pretrain"]
        assert reg.chain(child["id"])[0]["id"] == root["id"]


# ------------------------------------------------------------------------------------- edges
@pytest.fixture
def reg(tmp_path):
    with Registry(tmp_path / "r.db") as r:
        yield r


def test_add_edge_checks_the_relation_and_both_ends(reg):
    a = reg.add_checkpoint(name="a", relation="import")["id"]
    b = reg.add_checkpoint(name="b", relation="import")["id"]
    with pytest.raises(RegistryError, match="relation"):
        reg.add_edge(b, a, "Not A Relation")
    with pytest.raises(RegistryError, match="parent checkpoint 'ck-gone'"):
        reg.add_edge(b, "ck-gone", "finetune")
    with pytest.raises(RegistryError, match="child checkpoint 'ck-gone'"):
        reg.add_edge("ck-gone", a, "finetune")
    with pytest.raises(RegistryError, match="own parent"):
        reg.add_edge(a, a, "finetune")
    assert reg.parents(b) == []
    assert reg.add_edge(b, a, "finetune") is True
    assert reg.add_edge(b, a, "merge", skip_existing=True) is False
    assert [(p["parent_id"], p["relation"]) for p in reg.parents(b)] == [(a, "finetune")]


def synced(reg):
    """Two checkpoints as another lab exports them, and an edge between them."""
    ck = {k: None for k in hub.SYNC_FIELDS["checkpoints"]}
    base = {**ck, "id": "ck-aaaaaaaaaaaa", "name": "base", "kind": "model",
            "relation": "import", "created_at": "2026-01-01T00:00:00Z"}
    ft = {**base, "id": "ck-bbbbbbbbbbbb", "name": "ft", "relation": "finetune",
          "config": {"lr": 1e-4}}
    edge = {"child_id": ft["id"], "parent_id": base["id"], "relation": "finetune",
            "weight": None, "density": None, "role": None, "position": 0}
    return base, ft, edge


def test_hub_sync_refuses_edges_with_a_bad_relation_or_a_missing_end(reg):
    base, ft, edge = synced(reg)
    refused: list[str] = []
    added = hub.merge_rows(reg, {
        "checkpoints": [base, ft],
        "edges": [{**edge, "relation": "<script>"},
                  {**edge, "parent_id": "ck-notthere000"},
                  {**edge, "child_id": ft["id"], "parent_id": ft["id"]}]}, refused)
    assert added["checkpoints"] == 2 and added["edges"] == 0
    assert reg.parents(ft["id"]) == []
    assert len(refused) == 3 and "relation" in refused[0] and "ck-notthere000" in refused[1]
    # the good edge still merges, once; its JSON column is stored as JSON text
    assert hub.merge_rows(reg, {"edges": [edge]})["edges"] == 1
    assert hub.merge_rows(reg, {"edges": [edge]})["edges"] == 0
    assert reg.get_checkpoint(ft["id"])["config"] == '{"lr": 0.0001}'


def test_hub_sync_refuses_a_checkpoint_with_a_bad_relation_and_unfinished_jobs(reg):
    base, _, _ = synced(reg)
    job = {k: None for k in hub.SYNC_FIELDS["jobs"]}
    refused: list[str] = []
    added = hub.merge_rows(reg, {
        "checkpoints": [{**base, "relation": "DROP TABLE"}],
        "jobs": [{**job, "id": "job-00000001", "plugin": "train", "config": {},
                  "status": "queued", "created_at": "2026-01-01T00:00:00Z"},
                 {**job, "id": "job-00000002", "plugin": "train", "config": {},
                  "status": "succeeded", "created_at": "2026-01-01T00:00:00Z"}],
        "evaluations": [{"uid": "ev-1", "checkpoint_id": "ck-aaaaaaaaaaaa", "task": "t",
                         "metric": "m", "value": 1.0, "created_at": "x"}]}, refused)
    assert added == {"checkpoints": 0, "edges": 0, "jobs": 1, "evaluations": 0}
    assert reg.get_checkpoint(base["id"]) is None
    assert reg.job("job-00000001", missing_ok=True) is None  # a scheduler would run it
    assert reg.queued_jobs() == []
    assert len(refused) == 3


def test_fill_stub_adds_card_parents_through_the_edge_checks(reg):
    stub = reg.add_checkpoint(name="stub", relation="import", metadata={"remote_only": True})
    base = reg.add_checkpoint(name="base", relation="import")
    with pytest.raises(RegistryError, match="relation"):
        hub.fill_stub(reg, stub["id"], "/x", {}, [{"id": base["id"], "relation": "Bad!"}])
    assert reg.get_checkpoint(stub["id"])["path"] is None  # nothing half-written
    row = hub.fill_stub(reg, stub["id"], "/x", {}, [{"id": base["id"], "relation": "merge"}])
    assert row["path"] == "/x" and [p["relation"] for p in reg.parents(stub["id"])] == ["merge"]


def test_a_card_tag_that_is_no_relation_reads_as_the_hub_word():
    card = ("---\nbase_model: org/base\nbase_model_relation: quantized\n"
            "tags:\n- weightsmith\n- Not a Relation\n---\n\n# x\n")
    assert hub.read_card_lineage(card) == (["org/base"], "quantized")
    ours = card.replace("- Not a Relation", "- graft")
    assert hub.read_card_lineage(ours) == (["org/base"], "graft")


# --------------------------------------------------------------------- users, audit, jobs
def test_users_and_audit_lines_are_typed_rows_with_decoded_json(reg):
    alice = reg.users.add(name="alice", salt="00", password_hash="ab", admin=True)
    assert alice == store.User(name="alice", admin=True, created_at=alice.created_at)
    assert not hasattr(alice, "hash") and reg.users.credentials("alice") == ("00", "ab")
    with pytest.raises(RegistryError, match="exists already"):
        reg.users.add(name="alice", salt="01", password_hash="cd")
    assert reg.users.all() == [alice] and reg.users.any() and reg.users.get("bob") is None
    reg.users.audit("alice", "job.submit", "job-1", {"plugin": "train"})
    reg.users.audit(None, "login.failed", "bob")
    latest, first = reg.users.audit_log()
    assert isinstance(first, store.AuditEntry) and first.details == {"plugin": "train"}
    assert (latest.action, latest.user, latest.details) == ("login.failed", None, None)
    assert dataclasses.asdict(first)["target"] == "job-1"


def test_login_failures_are_counted_per_name_and_forgotten(reg):
    for t in (1.0, 2.0, 3.0):
        reg.users.add_login_failure("bob", t)
    reg.users.add_login_failure("eve", 2.5)
    assert reg.users.login_failures("bob") == [3.0, 2.0, 1.0]
    assert reg.users.login_failures("bob", since=1.5, limit=1) == [3.0]
    reg.users.clear_login_failures(before=2.0)
    assert reg.users.login_failures("bob") == [3.0, 2.0]
    reg.users.clear_login_failures("bob")
    assert reg.users.login_failures("bob") == [] and reg.users.login_failures("eve") == [2.5]
    with pytest.raises(RegistryError):
        reg.users.clear_login_failures()  # never everything by accident


def test_jobs_store_their_gpus_and_a_started_job_is_never_taken_back(reg):
    job = reg.add_job(plugin="train", config={}, gpus=2)
    assert job["gpus"] == 2 and reg.add_job(plugin="train", config={})["gpus"] is None
    with pytest.raises(RegistryError, match="gpus"):
        reg.add_job(plugin="train", config={}, gpus=0)
    reg.update_job(job["id"], status="running")
    assert reg.take_back_job(job["id"]) is False and reg.job(job["id"])
    queued = reg.queued_jobs()[0]
    assert reg.take_back_job(queued["id"]) is True
    assert reg.job(queued["id"], missing_ok=True) is None


def test_the_gpus_migration_leaves_older_rows_null(tmp_path, monkeypatch):
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:5])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", 5)
    with Registry(tmp_path / "r.db") as old:
        old.db["jobs"].insert({"id": "job-1", "plugin": "train", "config": "{}",
                               "status": "queued", "created_at": "2026-01-01"})
        assert "gpus" not in old.db["jobs"].columns_dict
    monkeypatch.undo()
    with Registry(tmp_path / "r.db") as new:
        assert new.schema_version() == store.SCHEMA_VERSION >= 6
        assert new.job("job-1")["gpus"] is None


def test_read_only_refuses_writes(reg):
    reg.read_only()
    with pytest.raises(Exception, match="readonly|read-only|query_only"):
        reg.add_metric(name="loss", value=1.0)
