"""The lineage graph without a browser: the whole lab's graph (Registry.lab_graph), the scores
picked for the nodes, Mermaid's limits (registry/lineage.py: fit), the CLI's --mermaid, the
Python line that loads a checkpoint and the zip of its folder (app/ui/registry_view.py).
tests/test_browser_lineage.py draws the same graphs in chromium."""

import contextlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from app.cli import main as cli_main
from app.lab import Lab
from app.ui import registry_view as rv
from registry import Registry, lineage


def merged_lab(reg, folder: Path | None = None) -> dict:
    """base -> ft-a, ft-b, ft-sums (each scored on its own task, two metrics) -> merged (three
    parents, weighted); base -> an adapter. With `folder`, every checkpoint but the merge
    gets files there. {name: row}."""
    def files(name, adapter=False):
        if folder is None:
            return None
        path = folder / name
        path.mkdir(parents=True)
        (path / ("adapter_config.json" if adapter else "config.json")).write_text("{}")
        (path / "model.safetensors").write_bytes(b"\0" * 1000)
        return str(path)

    rows = {"base": reg.add_checkpoint(name="base", relation="import", path=files("base"),
                                       created_by="bob")}
    for task in ("a", "b", "sums"):
        ft = reg.add_checkpoint(name=f"ft-{task}", relation="finetune", path=files(f"ft-{task}"),
                                parents=[{"id": rows["base"]["id"]}], created_by="bob")
        reg.add_evaluation(checkpoint_id=ft["id"], task=task, metric="acc", value=0.5)
        reg.add_evaluation(checkpoint_id=ft["id"], task=task, metric="loss", value=2.0)
        rows[ft["name"]] = ft
    rows["merged"] = reg.add_checkpoint(
        name="merged", relation="merge", created_by="bob",
        parents=[{"id": rows[f"ft-{t}"]["id"], "weight": w, "role": "model"}
                 for t, w in (("a", 0.5), ("b", 0.3), ("sums", 0.2))])
    rows["adapter"] = reg.add_checkpoint(
        name="lora", relation="adapter", kind="adapter", path=files("lora", adapter=True),
        parents=[{"id": rows["base"]["id"], "role": "base"}], created_by="bob")
    return rows


@pytest.fixture
def reg(tmp_path):
    with Registry(tmp_path / "r.db") as r:
        yield r


# ---------------------------------------------------------------------------- lab_graph
def test_lab_graph_latest_n_name_filter_and_edges_among_shown(reg):
    rows = merged_lab(reg)
    graph = reg.lab_graph()
    assert graph["root"] is None
    assert [n["name"] for n in graph["nodes"]] == ["base", "ft-a", "ft-b", "ft-sums", "merged",
                                                   "lora"]  # oldest first
    assert len(graph["edges"]) == 7
    assert graph["nodes"][1]["scores"] == {"a/acc": 0.5, "a/loss": 2.0}
    latest = reg.lab_graph(limit=2)
    assert [n["name"] for n in latest["nodes"]] == ["merged", "lora"]
    assert latest["edges"] == []  # their parents are not shown: no dangling edges
    fts = reg.lab_graph(search="FT-")  # case-insensitive, literal (no LIKE wildcards)
    assert {n["name"] for n in fts["nodes"]} == {"ft-a", "ft-b", "ft-sums"}
    assert reg.lab_graph(search="%")["nodes"] == []
    assert [n["id"] for n in reg.lab_graph(search=rows["merged"]["id"])["nodes"]] == [
        rows["merged"]["id"]]
    reg.soft_delete_checkpoint(rows["adapter"]["id"], "bob")
    assert "lora" not in {n["name"] for n in reg.lab_graph()["nodes"]}


def test_lab_graph_of_an_empty_lab(reg):
    assert reg.lab_graph() == {"root": None, "nodes": [], "edges": []}
    assert rv.graph_markdown(reg.lab_graph()) == "No checkpoints to draw."


# ---------------------------------------------------------------------------- scores
def test_default_scores_are_one_headline_metric_for_every_task(reg):
    rows = merged_lab(reg)
    graph = reg.lineage(rows["merged"]["id"])
    # all tasks (before, three at most were drawn): the first metric recorded for each
    assert lineage.default_scores(graph) == ["a/acc", "b/acc", "sums/acc"]
    assert lineage.score_keys(graph) == ["a/acc", "a/loss", "b/acc", "b/loss", "sums/acc",
                                         "sums/loss"]
    text = lineage.mermaid(graph)
    assert "<b>sums</b><br/>acc = 0.5" in text and "loss" not in text
    picked = lineage.mermaid(graph, ["sums/loss"])
    assert "<b>sums</b><br/>loss = 2" in picked and "acc" not in picked
    assert "<b>" not in lineage.mermaid(graph, [])
    # a metric recorded first wins even when another sorts before it
    reg.add_evaluation(checkpoint_id=rows["merged"]["id"], task="z", metric="zeta", value=1)
    reg.add_evaluation(checkpoint_id=rows["merged"]["id"], task="z", metric="alpha", value=2)
    assert "z/zeta" in lineage.default_scores(reg.lineage(rows["merged"]["id"]))


def test_lineage_view_offers_every_key_and_keeps_what_is_picked(tmp_path):
    lab = Lab(tmp_path / "lab")
    with lab.registry() as reg:
        rows = merged_lab(reg)
    ck = rows["merged"]["id"]
    text, scores = rv.lineage_view(lab, ck, rv.AROUND, 100, "", None, keep_scores=False)
    assert scores.choices and [c[1] for c in scores.choices] == [
        "a/acc", "a/loss", "b/acc", "b/loss", "sums/acc", "sums/loss"]
    assert scores.value == ["a/acc", "b/acc", "sums/acc"]
    text, scores = rv.lineage_view(lab, ck, rv.AROUND, 100, "", ["b/loss", "gone/x"])
    assert scores.value == ["b/loss"] and "loss = 2" in text and "acc =" not in text
    text, _ = rv.lineage_view(lab, ck, rv.WHOLE_LAB, 1, "", None)
    assert "lora" in text and "merged" not in text  # the latest one
    text, _ = rv.lineage_view(lab, None, rv.AROUND, 100, "", None)
    assert "Select a checkpoint" in text
    assert "```mermaid" in rv.lab_graph_markdown(lab, 0, "ft-")
    assert "ft-sums" in rv.lab_graph_markdown(lab, 0, "ft-")


# ---------------------------------------------------------------------------- Mermaid
def test_mermaid_ids_decode_back_to_the_checkpoint():
    import re

    for ck in ("ck-1a2b3c4d5e6f", "a_b", "ünï/☃ x", "end", "12345678", "_5f_"):
        enc = lineage.mermaid_id(ck)
        assert re.fullmatch(r"n_[A-Za-z0-9_]+", enc)
        # what lineage.js does
        assert re.sub(r"_([0-9a-f]+)_", lambda m: chr(int(m.group(1), 16)), enc[2:]) == ck


def big_graph(n: int, parents: int = 1, name: str = "checkpoint-{i}") -> dict:
    nodes = [{"id": f"ck-{i:012x}", "name": name.format(i=i), "scores": {"t/acc": 0.5}}
             for i in range(n)]
    edges = [{"parent": nodes[j]["id"], "child": nodes[i]["id"], "relation": "merge",
              "weight": 0.5, "role": "model"}
             for i in range(1, n) for j in range(max(0, i - parents), i)]
    return {"root": None, "nodes": nodes, "edges": edges}


def test_fit_keeps_a_300_node_graph_whole_and_cuts_what_mermaid_refuses():
    graph = big_graph(300)
    shown, left_out = lineage.fit(graph)
    assert left_out == 0 and shown is graph
    assert len(lineage.mermaid(graph)) < lineage.MAX_CHARS
    dense = big_graph(300, parents=3)  # ~900 edges: over Mermaid's 500
    shown, left_out = lineage.fit(dense)
    assert left_out > 0 and len(shown["edges"]) <= lineage.MAX_EDGES
    assert len(shown["nodes"]) + left_out == 300
    newest = {n["id"] for n in dense["nodes"][-len(shown["nodes"]):]}
    assert {n["id"] for n in shown["nodes"]} == newest  # no root: the newest stay
    wordy = big_graph(300, name="<" * 40 + "{i}")  # each < is 4 characters of Mermaid
    shown, left_out = lineage.fit(wordy)
    assert left_out > 0 and len(lineage.mermaid(shown)) <= lineage.MAX_CHARS
    shown, _ = lineage.fit(dense)
    assert f"Showing {len(shown['nodes'])} of 300 checkpoints" in rv.graph_markdown(dense)


def test_fit_around_a_root_keeps_the_nearest():
    graph = big_graph(300, parents=3)
    graph["root"] = graph["nodes"][150]["id"]
    shown, left_out = lineage.fit(graph)
    ids = [n["id"] for n in shown["nodes"]]
    assert graph["root"] in ids and left_out > 0
    kept = {int(i[3:], 16) for i in ids}
    assert {149, 151, 147, 153} <= kept and 0 not in kept and 299 not in kept


# ---------------------------------------------------------------------------- CLI
def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_cli_lineage_mermaid_scores_and_whole_lab(tmp_path):
    lab = Lab(tmp_path / "lab")
    with lab.registry() as reg:
        rows = merged_lab(reg)
        expected = lineage.mermaid(reg.lineage(rows["merged"]["id"]), ["b/loss"])
    code, out, _ = cli("registry", "lineage", "merged", "--mermaid", "--scores", "b/loss",
                       "--lab", lab.root)
    assert code == 0 and out.strip() == expected
    code, out, _ = cli("registry", "lineage", "merged", "--mermaid", "--lab", lab.root)
    assert "<b>sums</b><br/>acc = 0.5" in out  # every task's headline metric by default
    code, out, _ = cli("registry", "lineage", "--whole-lab", "--mermaid", "--search", "ft-",
                       "--scores", "a/acc", "--scores", "a/loss", "--lab", lab.root)
    assert code == 0 and out.count('["') == 3 and "acc = 0.5<br/>loss = 2" in out
    code, out, _ = cli("registry", "lineage", "--whole-lab", "--limit", "2", "--lab", lab.root)
    assert [n["name"] for n in json.loads(out)["nodes"]] == ["merged", "lora"]
    code, _, err = cli("registry", "lineage", "--lab", lab.root)
    assert code == 2 and "--whole-lab" in err


# ------------------------------------------------------------------ load line and zip
def test_load_code_for_a_model_an_adapter_and_remote_checkpoints(tmp_path):
    lab = Lab(tmp_path / "lab")
    with lab.registry() as reg:
        rows = merged_lab(reg, tmp_path / 'ck "q"')
        remote = reg.add_checkpoint(name="remote", relation="import", hub_repo="org/model")
        stub = reg.add_checkpoint(name="stub", relation="import")
        lora_remote = reg.add_checkpoint(name="lora2", relation="adapter", kind="adapter",
                                         path=rows["adapter"]["path"],
                                         parents=[{"id": remote["id"], "role": "base"}])
    code = rv.load_code(lab, rows["ft-a"]["id"])
    path = json.dumps(rows["ft-a"]["path"])
    assert f"AutoModelForCausalLM.from_pretrained({path})" in code and '\\"q\\"' in path
    code = rv.load_code(lab, rows["adapter"]["id"])
    assert (f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
            f"{json.dumps(rows['base']['path'])}), {json.dumps(rows['adapter']['path'])})"
            in code)
    compile(code, "load", "exec")  # valid Python, whatever the path
    assert 'from_pretrained("org/model")' in rv.load_code(lab, lora_remote["id"])
    assert 'from_pretrained("org/model")' in rv.load_code(lab, remote["id"])
    assert "Remote only" in rv.load_code(lab, stub["id"])
    assert "Remote only" in rv.load_code(lab, rows["merged"]["id"])
    summary = rv.checkpoint_detail(lab, rows["ft-a"]["id"])[0]
    assert "Folder: " in summary and "\\\"q\\\"" not in summary


def test_checkpoint_zip_stores_the_folder_and_is_reused(tmp_path):
    lab = Lab(tmp_path / "lab")
    with lab.registry() as reg:
        rows = merged_lab(reg, lab.root / "checkpoints")
    folder = Path(rows["ft-a"]["path"])
    (folder / "sub").mkdir()
    (folder / "sub" / "tokenizer.json").write_text("{}")
    (folder / "leak").symlink_to("/etc/passwd")  # a link is left out, wherever it points
    out = rv.checkpoint_zip(lab, rows["ft-a"]["id"], None, tmp_path / "zips")
    with zipfile.ZipFile(out) as zf:
        infos = {i.filename: i for i in zf.infolist()}
    assert set(infos) == {"ft-a/config.json", "ft-a/model.safetensors",
                          "ft-a/sub/tokenizer.json"}
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos.values())
    assert infos["ft-a/model.safetensors"].file_size == 1000
    again = rv.checkpoint_zip(lab, rows["ft-a"]["id"], None, tmp_path / "zips")
    assert again == out and not list(out.parent.glob(".*tmp"))


def test_checkpoint_zip_refusals(tmp_path):
    from app import auth

    lab = Lab(tmp_path / "lab")
    with lab.registry() as reg:
        rows = merged_lab(reg, lab.root / "checkpoints")
        gone = reg.add_checkpoint(name="gone", relation="import",
                                  path=str(lab.root / "checkpoints" / "nothing-here"))
    zips = tmp_path / "zips"
    with pytest.raises(rv.DownloadRefused, match="remote only"):
        rv.checkpoint_zip(lab, rows["merged"]["id"], None, zips)
    with pytest.raises(rv.DownloadRefused, match="missing"):
        rv.checkpoint_zip(lab, gone["id"], None, zips)
    with pytest.raises(rv.DownloadRefused, match="no checkpoint"):
        rv.checkpoint_zip(lab, "ck-nope", None, zips)
    with pytest.raises(rv.DownloadRefused, match="Select"):
        rv.checkpoint_zip(lab, "", None, zips)
    auth.delete_checkpoint(lab, rows["ft-b"]["id"], None)
    with pytest.raises(rv.DownloadRefused, match="deleted"):
        rv.checkpoint_zip(lab, rows["ft-b"]["id"], None, zips)
    # a shared lab: members see the whole lab (app/auth.py), so any logged-in member may
    # download any checkpoint; a request with no user is refused
    auth.add_user(lab, "alice", "password-alice", admin=True)
    auth.add_user(lab, "bob", "password-bob")
    lab = Lab(lab.root)
    with pytest.raises(rv.DownloadRefused, match="log in"):
        rv.checkpoint_zip(lab, rows["ft-a"]["id"], None, zips)
    assert rv.checkpoint_zip(lab, rows["ft-a"]["id"], "bob", zips).is_file()
    # a restricted lab serves no folder outside its roots (an import that predates them)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    with lab.registry() as reg:
        stray = reg.add_checkpoint(name="stray", relation="import", path=str(outside))
    with pytest.raises(rv.DownloadRefused, match="outside the lab's roots"):
        rv.checkpoint_zip(lab, stray["id"], "bob", zips)
    assert not list(zips.rglob("stray.zip"))
    assert not zips.joinpath(stray["id"]).exists()


def test_download_button_message_never_a_traceback(tmp_path):
    lab = Lab(tmp_path / "lab")
    with lab.registry() as reg:
        rows = merged_lab(reg, lab.root / "checkpoints")
    file, message = rv.download_checkpoint(lab, rows["merged"]["id"])
    assert file.visible is False and message.startswith("**Not downloaded:**")
    file, message = rv.download_checkpoint(lab, rows["ft-a"]["id"])
    assert file.visible is True and file.value["path"].endswith("ft-a.zip") and "KiB" in message
