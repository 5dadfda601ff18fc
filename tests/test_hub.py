"""Hub sync against an in-process fake Hub (tests/fakehub.py) driven by the real
huggingface_hub client: publishing with model cards, registry sync through a dataset repo,
import with lineage, tokens and failures. One opt-in test runs against the real Hub."""

import json
import os
import shutil
import stat

import pytest

from registry import hub
from tests import fakehub
from tests.conftest import last_json, run_cli

TOKEN = "hf_weightsmithTESTtoken0123456789"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    server_hub, server = fakehub.start(tmp_path / "hub-store", token=TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", server_hub.url)  # for the CLI subprocesses
    # huggingface_hub read HF_ENDPOINT at import; ModelCard.validate uses that copy (and
    # hf_hub_url rewrites the URL template only when the two agree)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server_hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server_hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv(hub.TOKEN_FILE_ENV, str(tmp_path / "home" / ".config" / "hub_token"))
    monkeypatch.setenv(hub.RETRY_WAIT_ENV, "0.01")
    hub.save_token(TOKEN)
    yield server_hub
    server.shutdown()
    server.server_close()


def make_lineage(lab, tiny_model_dir):
    """base (imported folder) -> ft (finetune, made by a job) and merged (merge of both),
    with scores on base and ft."""
    from app.checkpoints import import_checkpoint, publish

    with lab.registry() as reg:
        base = import_checkpoint(lab, reg, str(tiny_model_dir), name="base")
        job = reg.add_job(plugin="train", config={
            "checkpoint": base["id"], "data": "org/chat-data",
            "text_file": str(tiny_model_dir / "notes.txt"), "api_key": "sk-other-secret"},
            versions={"torch": "2.13.0", "transformers": "5.23.0"})
        reg.update_job(job["id"], status="succeeded", finished_at="2026-01-01T00:00:00Z")
        made = {}
        for name, relation, parents in (
                ("ft", "finetune", [{"id": base["id"]}]),
                ("merged", "merge", [{"id": base["id"], "weight": 0.5, "role": "base"},
                                     {"id": None, "weight": 0.5, "role": "model"}])):
            tmp = lab.checkpoints_dir / f".tmp-{name}"
            shutil.copytree(tiny_model_dir, tmp)
            if name == "merged":
                parents[1]["id"] = made["ft"]["id"]
            made[name] = publish(lab, reg, tmp, name=name, relation=relation, parents=parents,
                                 job=reg.job(job["id"]), metadata={
                                     "mergekit_yaml": f"models:\n  - model: {tiny_model_dir}\n"
                                                      f"base_model: org/base\n"})
        reg.add_evaluation(checkpoint_id=base["id"], task="ppl:heldout", metric="perplexity",
                           value=40.0)
        reg.add_evaluation(checkpoint_id=made["ft"]["id"], task="ppl:heldout",
                           metric="perplexity", value=31.5)
    return base["id"], made["ft"]["id"], made["merged"]["id"]


def load_card(fake_hub, repo_id, tmp_path):
    from huggingface_hub import ModelCard

    path = hub.client().hf_hub_download(repo_id, "README.md", local_dir=tmp_path / "card")
    return ModelCard.load(path)


def lab_bytes(root):
    for path in root.rglob("*"):
        if path.is_file():
            yield path, path.read_bytes()


# ------------------------------------------------------------------------------ publishing
def test_card_names_hub_parents_with_the_hub_relation_and_validates(lab, tiny_model_dir,
                                                                   fake_hub, tmp_path):
    base, ft, merged = make_lineage(lab, tiny_model_dir)
    with lab.registry() as reg:
        hub.push_checkpoint(reg, base, "org/base", log=lambda m: None)
        hub.push_checkpoint(reg, ft, "org/ft", log=lambda m: None)
        result = hub.push_checkpoint(reg, merged, "org/merged", log=lambda m: None)
        row = reg.get_checkpoint(merged)
    assert (row["hub_repo"], row["hub_commit"], row["sync_status"]) == (
        "org/merged", fake_hub.commits("org/merged")[-1].oid, "synced")
    assert row["hub_pushed_at"] and result["new_commit"]
    # one commit holds weights, config, tokenizer and card
    files = fake_hub.files("org/merged")
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(files)
    assert len(fake_hub.commits("org/merged")) == 2  # the repo's first commit, then ours

    ft_card = load_card(fake_hub, "org/ft", tmp_path / "ft")
    assert ft_card.data.base_model == "org/base"
    assert ft_card.data.base_model_relation == "finetune"
    assert ft_card.data.library_name == "transformers"
    assert ft_card.data.datasets == ["org/chat-data"]  # the local text file is not a dataset
    assert ft_card.data.eval_results[0].metric_value == 31.5
    assert "```mermaid" in ft_card.text and "-8.5" in ft_card.text  # delta vs base
    card = load_card(fake_hub, "org/merged", tmp_path / "merged")
    assert card.data.base_model == ["org/base", "org/ft"]
    assert card.data.base_model_relation == "merge"
    assert {"weightsmith", "merge", "mergekit"} <= set(card.data.tags)
    card.validate()  # the Hub's validation route, through huggingface_hub's own call
    assert "POST /api/validate-yaml" in fake_hub.requests  # create_commit validated it too
    assert str(tiny_model_dir) not in card.content and TOKEN not in card.content

    bad = card.content.replace("base_model:\n- org/base", f"base_model:\n- {tiny_model_dir}")
    with pytest.raises(ValueError, match="base_model"):
        type(card)(bad).validate()


def test_relations_without_a_hub_word_map_to_finetune_with_our_tag(lab, tiny_model_dir):
    base, ft, _ = make_lineage(lab, tiny_model_dir)
    with lab.registry() as reg:
        reg.db.execute("UPDATE checkpoints SET relation = 'prune' WHERE id = ?", [ft])
        card = hub.build_card(reg, reg.get_checkpoint(ft), "org/ft-pruned", ["org/base"])
    assert card.data.base_model_relation == "finetune"
    assert "prune" in card.data.tags


def test_a_parent_not_on_the_hub_is_an_error_unless_omitted(lab, tiny_model_dir, fake_hub,
                                                            tmp_path):
    base, ft, _ = make_lineage(lab, tiny_model_dir)
    with lab.registry() as reg:
        with pytest.raises(hub.LocalParentError, match=f"parent base \\({base}\\) is not on "
                                                       f"the Hub.*--omit-local-parents"):
            hub.push_checkpoint(reg, ft, "org/ft")
        assert fake_hub.commits("org/ft") == []  # nothing was created
        warnings = []
        result = hub.push_checkpoint(reg, ft, "org/ft", omit_local_parents=True,
                                     log=warnings.append)
    assert result["base_model"] == [] and "left out of base_model" in warnings[0]
    card = load_card(fake_hub, "org/ft", tmp_path)
    assert card.data.base_model is None
    assert getattr(card.data, "base_model_relation", None) is None


def test_unchanged_repush_makes_no_commit(lab, tiny_model_dir, fake_hub):
    base, _, _ = make_lineage(lab, tiny_model_dir)
    with lab.registry() as reg:
        first = hub.push_checkpoint(reg, base, "org/base")
        again = hub.push_checkpoint(reg, base, "org/base")
        assert len(fake_hub.commits("org/base")) == 2
        assert not again["new_commit"] and again["commit"] == first["commit"]
        reg.add_evaluation(checkpoint_id=base, task="ppl:other", metric="perplexity",
                           value=12.0)
        changed = hub.push_checkpoint(reg, base, "org/base")  # the card changed
    assert changed["new_commit"] and len(fake_hub.commits("org/base")) == 3


def test_failed_push_is_marked_sync_failed_and_a_retry_completes_it(lab, tiny_model_dir,
                                                                    fake_hub):
    base, _, _ = make_lineage(lab, tiny_model_dir)
    # a push sends two upload requests, preupload then commit; the 2nd fails on every attempt
    fake_hub.fail(r"POST /api/models/org/base/commit/", nth=1, times=hub.RETRY_ATTEMPTS)
    with lab.registry() as reg:
        with pytest.raises(hub.HubError, match="500"):
            hub.push_checkpoint(reg, base, "org/base")
        row = reg.get_checkpoint(base)
        assert row["sync_status"] == "sync_failed" and "injected failure" in row["sync_error"]
        assert row["hub_commit"] is None
        uploads = [r for r in fake_hub.requests if "/preupload/" in r or "/commit/" in r]
        assert uploads[:2] == ["POST /api/models/org/base/preupload/main",
                               "POST /api/models/org/base/commit/main"]
        assert len(fake_hub.commits("org/base")) == 1  # created, nothing committed
        # one more transient failure: retried with backoff inside the same push
        fake_hub.fail(r"POST /api/models/org/base/commit/", nth=1, times=1)
        result = hub.push_checkpoint(reg, base, "org/base")
        row = reg.get_checkpoint(base)
    assert row["sync_status"] == "synced" and row["sync_error"] is None
    assert row["hub_commit"] == result["commit"] == fake_hub.commits("org/base")[-1].oid
    assert "model.safetensors" in fake_hub.files("org/base")


def test_token_is_kept_0600_outside_the_lab_and_never_written_into_it(lab, tiny_model_dir,
                                                                      fake_hub):
    base, ft, _ = make_lineage(lab, tiny_model_dir)
    path = hub.token_file()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not path.resolve().is_relative_to(lab.root)
    with pytest.raises(hub.HubError, match="outside"):
        os.environ[hub.TOKEN_FILE_ENV] = str(lab.root / "token")
        try:
            hub.save_token(TOKEN, lab_root=lab.root)
        finally:
            os.environ[hub.TOKEN_FILE_ENV] = str(path)
    with lab.registry() as reg:
        hub.push_checkpoint(reg, base, "org/base")
        hub.push_checkpoint(reg, ft, "org/ft")
        hub.sync_registry(reg, "org/lab-registry", log=lambda m: None)
    # the fake Hub accepts only this token, so it was sent; yet no lab file holds it
    leaks = [str(p) for p, data in lab_bytes(lab.root) if TOKEN.encode() in data]
    assert leaks == []
    synced = fake_hub.files("org/lab-registry", "dataset")
    assert not [n for n, data in synced.items() if TOKEN.encode() in data]


# ---------------------------------------------------------------------------- registry sync
def test_sync_then_pull_into_an_empty_lab_gives_the_same_lineage(lab, tiny_model_dir,
                                                                 fake_hub, tmp_path):
    from app.lab import Lab

    base, ft, merged = make_lineage(lab, tiny_model_dir)
    with lab.registry() as reg:
        hub.push_checkpoint(reg, base, "org/base")
        pushed = hub.sync_registry(reg, "org/lab-registry", log=lambda m: None)
        expected = json.dumps(reg.lineage(merged), sort_keys=True)
    assert pushed["pushed"] == {"checkpoints": 3, "edges": 3, "jobs": 1, "evaluations": 2}
    files = fake_hub.files("org/lab-registry", "dataset")
    assert any(n.endswith("/manifest.json") for n in files)
    for name, data in files.items():  # no local paths, no secrets
        assert str(tmp_path).encode() not in data and str(tiny_model_dir).encode() not in data
        assert b"api_key" not in data and b"sk-other-secret" not in data, name

    other = Lab(tmp_path / "other-lab")
    with other.registry() as reg:
        pulled = hub.sync_registry(reg, "org/lab-registry", log=lambda m: None)
        assert json.dumps(reg.lineage(merged), sort_keys=True) == expected
        rows = {r["id"]: r for r in reg.db.query("SELECT * FROM checkpoints")}
        job = reg.job(rows[ft]["job_id"])
        again = hub.sync_registry(reg, "org/lab-registry", log=lambda m: None)
    assert pulled["added"]["checkpoints"] == 3 and pulled["pushed_batch"] is None
    assert all(r["path"] is None for r in rows.values())  # remote-only rows
    assert rows[base]["hub_repo"] == "org/base"
    assert json.loads(job["config"])["data"] == "org/chat-data"
    assert json.loads(job["config"])["text_file"] == "local:notes.txt"
    assert again["pulled_batches"] == [] and again["pushed_batch"] is None

    # a job that opens a remote-only checkpoint published on the Hub downloads it first
    from app.context import JobContext

    with other.registry() as reg:
        job = reg.add_job(plugin="test_copy", config={})
        opened = JobContext(other, reg, job).open(base)
        assert opened.id == base and (opened.path / "model.safetensors").is_file()
        assert reg.get_checkpoint(base)["path"] == str(opened.path)


def test_two_labs_syncing_through_one_repo_both_end_with_the_union(lab, tiny_model_dir,
                                                                   fake_hub, tmp_path):
    from app.checkpoints import import_checkpoint
    from app.lab import Lab

    make_lineage(lab, tiny_model_dir)
    other = Lab(tmp_path / "other-lab")
    with other.registry() as reg:
        mine = import_checkpoint(other, reg, str(tiny_model_dir), name="base")  # same name
        reg.add_evaluation(checkpoint_id=mine["id"], task="ppl:x", metric="perplexity",
                           value=3.0)
    quiet = dict(log=lambda m: None)
    with lab.registry() as a, other.registry() as b:
        hub.sync_registry(a, "org/lab-registry", **quiet)
        hub.sync_registry(b, "org/lab-registry", **quiet)
        hub.sync_registry(a, "org/lab-registry", **quiet)
        commits = len(fake_hub.commits("org/lab-registry", "dataset"))
        hub.sync_registry(a, "org/lab-registry", **quiet)  # nothing new either way
        hub.sync_registry(b, "org/lab-registry", **quiet)
        assert len(fake_hub.commits("org/lab-registry", "dataset")) == commits

        def state(reg):
            return ({r["id"] for r in reg.db.query("SELECT id FROM checkpoints")},
                    {(r["child_id"], r["parent_id"]) for r in reg.db.query("SELECT * FROM edges")},
                    {r["uid"] for r in reg.db.query("SELECT uid FROM evaluations")})

        assert state(a) == state(b)
        ids, edges, evaluations = state(a)
        assert len(ids) == 4 and len(edges) == 3 and len(evaluations) == 3
        assert mine["id"] in ids
        assert sorted(r["name"] for r in a.db.query("SELECT name FROM checkpoints")) == [
            "base", "base-2", "ft", "merged"]


# ------------------------------------------------------------------------------------ CLI
def test_cli_push_sync_and_import_with_lineage(lab, lab_dir, tiny_model_dir, fake_hub,
                                               tmp_path):
    base, ft, _ = make_lineage(lab, tiny_model_dir)
    failed = run_cli(lab_dir, "hub", "push", ft, "--repo", "org/ft")
    assert failed.returncode == 2 and "is not on the Hub" in failed.stderr
    run_cli(lab_dir, "hub", "push", base, "--repo", "org/base", "--private", check=True)
    pushed = last_json(run_cli(lab_dir, "hub", "push", ft, "--repo", "org/ft",
                               check=True).stdout)
    assert pushed["base_model"] == ["org/base"] and pushed["new_commit"]
    synced = last_json(run_cli(lab_dir, "hub", "sync", "--repo", "org/lab-registry",
                               check=True).stdout)
    assert synced["pushed_batch"]

    fresh = tmp_path / "fresh-lab"
    row = json.loads(run_cli(lab_dir, "import", "org/ft", "--lab", fresh, check=True).stdout)
    from app.lab import Lab

    with Lab(fresh).registry() as reg:
        parents = reg.parents(row["id"])
        assert [p["relation"] for p in parents] == ["finetune"]
        stub = reg.get_checkpoint(parents[0]["parent_id"])
        assert stub["path"] is None and stub["source"] == "hf://org/base"
    run_cli(lab_dir, "import", "org/base", "--lab", fresh, check=True)  # fills the stub
    with Lab(fresh).registry() as reg:
        filled = reg.get_checkpoint(stub["id"])
        assert filled["path"] and (filled["content_hash"] == lab.registry().get_checkpoint(
            base)["content_hash"])
    leaks = [str(p) for p, data in lab_bytes(fresh) if TOKEN.encode() in data]
    assert leaks == []


# ------------------------------------------------------------------------------- live Hub
@pytest.mark.live
@pytest.mark.skipif(not os.environ.get("WEIGHTSMITH_LIVE_HUB_TOKEN"),
                    reason="set WEIGHTSMITH_LIVE_HUB_TOKEN to run against the real Hub")
def test_live_push_to_the_real_hub(lab, tiny_model_dir, monkeypatch):
    import secrets

    from huggingface_hub import HfApi

    token = os.environ["WEIGHTSMITH_LIVE_HUB_TOKEN"]
    monkeypatch.setenv("HF_ENDPOINT", hub.DEFAULT_ENDPOINT)
    monkeypatch.setenv("HF_TOKEN", token)
    user = HfApi(endpoint=hub.DEFAULT_ENDPOINT, token=token).whoami()["name"]
    repo = f"{user}/weightsmith-live-{secrets.token_hex(4)}"
    base, _, _ = make_lineage(lab, tiny_model_dir)
    try:
        with lab.registry() as reg:
            first = hub.push_checkpoint(reg, base, repo, private=True)
            again = hub.push_checkpoint(reg, base, repo, private=True)
        assert first["new_commit"] and not again["new_commit"]
    finally:
        HfApi(endpoint=hub.DEFAULT_ENDPOINT, token=token).delete_repo(repo, missing_ok=True)


# ------------------------------------------------------------------------------------- UI
def test_ui_publish_button_token_setting_and_sync(lab, tiny_model_dir, fake_hub, tmp_path,
                                                  monkeypatch):
    from app import ui

    base, ft, _ = make_lineage(lab, tiny_model_dir)
    assert "Not published" in ui.publish_to_hub(lab, ft, "org/ft")  # base is local only
    assert "Published to [org/base]" in ui.publish_to_hub(lab, base, "org/base")
    assert "Unchanged" in ui.publish_to_hub(lab, base, "org/base")
    assert "org/base" in ui.checkpoint_detail(lab, base)[0]
    monkeypatch.setenv(hub.TOKEN_FILE_ENV, str(tmp_path / "ui-user" / "token"))
    assert "mode 0600" in ui.save_hub_token(lab, TOKEN)
    assert hub.load_token() == TOKEN
    assert "pushed 3 checkpoints" in ui.sync_registry_form(lab, "org/lab-registry")


def test_each_lab_user_publishes_with_their_own_token(lab, tiny_model_dir, fake_hub):
    """On a shared server, a token saved in the UI belongs to the logged-in lab user: alice
    publishes with hers while the server's own token is wrong, bob (no token of his own)
    falls back to the server's and is refused; the publish is audited."""
    from app import auth, ui

    base, _, _ = make_lineage(lab, tiny_model_dir)
    hub.save_token("hf_the_servers_stale_token")  # the account the server runs as
    assert "mode 0600" in ui.save_hub_token(lab, TOKEN, user="alice")
    alice_file = hub.token_file("alice")
    assert alice_file.name == "hub_token.alice" and alice_file.read_text().strip() == TOKEN
    assert stat.S_IMODE(alice_file.stat().st_mode) == 0o600
    assert hub.load_token("alice") == TOKEN and hub.load_token("bob") != TOKEN
    assert "Not published" in ui.publish_to_hub(lab, base, "org/base", user="bob")
    assert "Published to [org/base]" in ui.publish_to_hub(lab, base, "org/base", user="alice")
    entry = auth.audit_log(lab)[0]
    assert (entry["action"], entry["user"], entry["target"]) == ("checkpoint.publish", "alice",
                                                                 base)
    assert "Not saved" in ui.save_hub_token(lab, TOKEN, user="../x")
    assert TOKEN not in "".join(p.read_text(errors="ignore") for p in lab.root.rglob("*")
                                if p.is_file() and p.stat().st_size < 10_000_000)


def test_cli_login_and_auto_sync_after_a_job(lab, lab_dir, tiny_model_dir, fake_hub, tmp_path,
                                             monkeypatch):
    import subprocess
    import sys

    from tests.conftest import REPO, cli_env, write_yaml

    token_file = tmp_path / "login-user" / "hub_token"
    monkeypatch.setenv(hub.TOKEN_FILE_ENV, str(token_file))
    login = subprocess.run([sys.executable, "-m", "app.cli", "hub", "login"], input=TOKEN + "\n",
                           capture_output=True, text=True, env=cli_env(lab_dir), cwd=str(REPO),
                           timeout=120)
    assert login.returncode == 0, login.stderr
    assert token_file.read_text().strip() == TOKEN
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and TOKEN not in login.stdout

    monkeypatch.setenv("WEIGHTSMITH_HUB_SYNC_REPO", "org/auto-registry")
    config = write_yaml(tmp_path / "copy.yaml", {"source": str(tiny_model_dir), "name": "auto"})
    done = last_json(run_cli(lab_dir, "run", "test_copy", config, "--wait", check=True).stdout)
    synced = fake_hub.files("org/auto-registry", "dataset")
    rows = [json.loads(line) for name, data in synced.items()
            if name.endswith("/checkpoints.jsonl") for line in data.decode().splitlines()]
    assert done["checkpoints"][0] in {r["id"] for r in rows}


def test_fake_hub_wire_format_is_pinned_to_the_constrained_client():
    """tests/fakehub.py answers what huggingface_hub of our constraints sends; a new client
    version must be checked against it (and this pin moved) before it is trusted."""
    import re

    import huggingface_hub

    from tests.conftest import REPO

    pin = re.search(r"^huggingface[-_]hub==(\S+)", (REPO / "constraints.txt").read_text(), re.M)
    assert pin and huggingface_hub.__version__ == pin.group(1)


def test_a_malformed_pulled_row_is_left_out_and_later_syncs_go_on(lab, fake_hub, tmp_path):
    """A batch written by anyone with access to the repo may hold rows without their keys
    or that are not mappings: they are refused by name, and the batch still counts as pulled,
    so the next sync does not trip over it again."""
    repo_id = "org/lab-registry"
    fake_hub.create_repo("dataset", repo_id, private=True)
    repo = fake_hub.repos[("dataset", repo_id)]
    rows = [json.dumps({"name": "no id"}), json.dumps(["not", "a", "mapping"]),
            json.dumps({"id": "ck-0badf00d", "name": "odd", "relation": "Not A Word"})]
    fake_hub._commit(repo, "hostile batch", "", {
        "batches/b1/manifest.json": json.dumps({"batch": "b1", "tables": ["checkpoints",
                                                                          "edges"]}).encode(),
        "batches/b1/checkpoints.jsonl": "\n".join(rows).encode(),
        "batches/b1/edges.jsonl": json.dumps({"child_id": "ck-1"}).encode()}, set())
    logged: list[str] = []
    with lab.registry() as reg:
        first = hub.sync_registry(reg, repo_id, log=logged.append)
        again = hub.sync_registry(reg, repo_id, log=logged.append)
        assert reg.get_checkpoint("ck-0badf00d") is None
    assert first["pulled_batches"] == ["b1"] and again["pulled_batches"] == []
    assert sum("left out a pulled row" in line for line in logged) >= 3
