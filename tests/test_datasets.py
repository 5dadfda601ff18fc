"""Datasets without a browser: content hashes, formats, row counts and previews
(app/datasets.py); the registry's dataset rows and uses (registry/datasets.py); a job's data
recorded at submit and drawn in the lineage as dataset nodes with dashed edges; a `ds-` id in
a data field; hostile names and files; the Datasets view's handlers.
tests/test_browser_datasets.py walks the same in chromium."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from pydantic import Field

import plugins
from app import datasets, jobs
from app.ui import datasets_view, registry_view
from plugins import CheckpointRef, DataRef, LocalFile, Plugin, PluginConfig
from registry import lineage


class DataConfig(PluginConfig):
    checkpoint: CheckpointRef = Field(description="The checkpoint to start from.")
    data: DataRef = Field(description="Training data.")
    calibration_file: LocalFile | None = Field(None, description="Calibration text.")


READER = Plugin(name="test_read_data", title="Read data", description="Reads data (tests).",
                Config=DataConfig, run=lambda config, ctx: None, uses_gpu=False)


@pytest.fixture
def reader(lab):
    plugins.register(READER)
    yield READER
    plugins.unregister(READER.name)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_file_is_recorded_once_by_its_sha256(lab, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "completion": "a"}
                                                  for i in range(5)])
    row = datasets.register_path(lab, path, user="ann")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()  # what sha256sum prints
    assert row["content_hash"] == digest and row["id"] == f"ds-{digest[:12]}"
    assert (row["format"], row["rows"], row["files"], row["size_bytes"]) == \
        ("jsonl", 5, 1, path.stat().st_size)
    assert row["name"] == "pairs.jsonl" and row["created_by"] == "ann"
    # the same bytes at another path are the same dataset; an unchanged file is not re-read
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(path.read_bytes())
    assert datasets.register_path(lab, copy, user="bob")["id"] == row["id"]
    calls = []
    real = datasets.content_hash
    datasets.content_hash = lambda p: calls.append(p) or real(p)
    try:
        datasets.register_path(lab, path, user="ann")
        assert calls == []
        with open(path, "a") as f:  # changed: hashed again, a new dataset
            f.write(json.dumps({"prompt": "q5", "completion": "a"}) + "\n")
        changed = datasets.register_path(lab, path, user="ann")
        assert calls == [path] and changed["id"] != row["id"] and changed["rows"] == 6
    finally:
        datasets.content_hash = real
    assert len(datasets.dataset_rows(lab)) == 2


def test_a_folder_hash_skips_links_and_hidden_files(lab, tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("one\ntwo\n")
    (folder / "sub" / "b.txt").write_text("three\n")
    first = datasets.content_hash(folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("not in the dataset\n")
    os.symlink(secret, folder / "link.txt")
    (folder / ".hidden").write_text("x")
    assert datasets.content_hash(folder) == first and first[1] == 2
    expected = hashlib.sha256()
    for rel in ("a.txt", "sub/b.txt"):
        expected.update(f"{rel}\0{hashlib.sha256((folder / rel).read_bytes()).hexdigest()}\n"
                        .encode())
    assert first[0] == expected.hexdigest()
    row = datasets.register_path(lab, folder, user=None)
    assert (row["format"], row["rows"], row["files"]) == ("folder", 3, 2)
    columns, rows = datasets.preview(folder)
    assert columns == ["file", "format", "bytes"]
    assert [r[0] for r in rows] == ["a.txt", "sub/b.txt"]  # no link, no hidden file


def test_rows_and_previews_of_each_format(tmp_path):
    (tmp_path / "t.csv").write_text("q,a\n1,2\n3,\"4,5\"\n")
    (tmp_path / "t.tsv").write_text("q\ta\n1\t2\n")
    (tmp_path / "t.txt").write_text("l1\nl2\nl3")
    (tmp_path / "t.json").write_text(json.dumps([{"x": 1}, {"x": 2, "y": [1]}]))
    write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 1000}, {"text": "y"}])
    with open(tmp_path / "t.jsonl", "a") as f:
        f.write("\n{not json\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"row {i}" for i in range(30)]}), tmp_path / "t.parquet")
    assert {name: datasets.count_rows(tmp_path / name) for name in
            ("t.csv", "t.tsv", "t.txt", "t.json", "t.jsonl", "t.parquet")} == \
        {"t.csv": 2, "t.tsv": 1, "t.txt": 3, "t.json": 2, "t.jsonl": 3, "t.parquet": 30}
    assert datasets.preview(tmp_path / "t.csv") == (["q", "a"], [["1", "2"], ["3", "4,5"]])
    assert datasets.preview(tmp_path / "t.json") == (["x", "y"], [["1", ""], ["2", "[1]"]])
    columns, rows = datasets.preview(tmp_path / "t.jsonl")
    assert columns == ["text", "(not JSON)"] and len(rows[0][0]) == datasets.CELL_CHARS
    assert rows[2] == ["", "{not json"]
    columns, rows = datasets.preview(tmp_path / "t.parquet")
    assert columns == ["text"] and len(rows) == datasets.PREVIEW_ROWS
    assert datasets.preview(tmp_path / "t.txt") == (["text"], [["l1"], ["l2"], ["l3"]])
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(datasets.DatasetError, match="not a readable Parquet file"):
        datasets.preview(tmp_path / "bad.parquet")
    assert datasets.count_rows(tmp_path / "bad.parquet") is None


def test_submit_records_the_data_and_the_lineage_draws_it(lab, reader, tmp_path,
                                                           tiny_model_dir):
    from app.checkpoints import import_checkpoint

    data = write_jsonl(tmp_path / "<b>skills.jsonl", [{"text": "a"}, {"text": "b"}])
    calib = tmp_path / "calib.txt"
    calib.write_text("some text\n")
    with lab.registry() as reg:
        base = import_checkpoint(lab, reg, str(tiny_model_dir), name="base")
    job = jobs.submit(lab, READER.name, {"checkpoint": base["id"], "data": str(data),
                                         "calibration_file": str(calib)}, user="ann")
    with lab.registry() as reg:
        used = {d["field"]: d for d in reg.datasets.of_job(job["id"])}
        assert set(used) == {"data", "calibration_file"}
        assert used["data"]["name"] == "<b>skills.jsonl" and used["data"]["rows"] == 2
        # what the job registers has the job's data as its data parents
        child = reg.add_checkpoint(name="child", relation="finetune", job_id=job["id"],
                                   parents=[{"id": base["id"]}])
        graph = reg.lineage(child["id"], datasets=True)
        plain = reg.lineage(child["id"])
        whole = reg.lab_graph(datasets=True)
    assert {n["id"] for n in plain["nodes"]} == {base["id"], child["id"]}
    kinds = {n["id"]: n.get("kind") for n in graph["nodes"]}
    assert kinds[used["data"]["id"]] == "dataset" and kinds[child["id"]] == "model"
    data_edges = sorted((e["parent"], e["child"], e["role"]) for e in graph["edges"]
                        if e["relation"] == "data")
    assert data_edges == sorted([(used["data"]["id"], child["id"], "data"),
                                 (used["calibration_file"]["id"], child["id"],
                                  "calibration_file")])
    assert len(whole["edges"]) == 3 and len(whole["nodes"]) == 4
    text = lineage.mermaid(graph)
    node = lineage.mermaid_id(used["data"]["id"])
    assert f'{node}[("' in text and ":::dataset" in text  # a cylinder
    assert f'{node} -.->|"data"| {lineage.mermaid_id(child["id"])}' in text  # dashed
    assert "<b>skills" not in text and "#60;b#62;skills" in text  # the name as typed
    assert '-.->|"calibration_file"|' in text
    # the checkpoint's summary links its data; the dataset's lists what it made
    summary = registry_view.checkpoint_detail(lab, child["id"])[0]
    assert f"(?tab=datasets&ds={used['data']['id']})" in summary and "<b>" not in summary
    detail, preview = datasets_view.dataset_detail(lab, used["data"]["id"])
    assert f"(?tab=registry&ck={child['id']})" in detail
    assert f"(?tab=jobs&job={job['id']})" in detail and "<b>" not in detail
    assert preview == {"headers": ["text"], "data": [["a"], ["b"]]}
    table = datasets_view.dataset_table(lab)
    assert [r[0] for r in table] == [used["calibration_file"]["id"], used["data"]["id"]] or \
        {r[0] for r in table} == {used["calibration_file"]["id"], used["data"]["id"]}
    row = next(r for r in table if r[0] == used["data"]["id"])
    assert row[3:7] == [2, row[4], 1, 1]  # rows, size, checkpoints, jobs


def test_a_dataset_id_in_a_data_field_is_its_file(lab, reader, tmp_path, tiny_model_dir):
    from app.checkpoints import import_checkpoint

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    ds = datasets.register_path(lab, data, user=None)
    with lab.registry() as reg:
        base = import_checkpoint(lab, reg, str(tiny_model_dir), name="base")
    job = jobs.submit(lab, READER.name, {"checkpoint": base["id"], "data": ds["id"]})
    assert job["config"] and json.loads(job["config"])["data"] == str(data)
    with lab.registry() as reg:
        assert [d["id"] for d in reg.datasets.of_job(job["id"])] == [ds["id"]]
        queued = len(reg.jobs())
    # an unknown id is an error at its field, and nothing is queued
    with pytest.raises(plugins.ConfigError) as e:
        jobs.submit(lab, READER.name, {"checkpoint": base["id"], "data": "ds-000000000000"})
    assert "field 'data': no dataset ds-000000000000 in this lab" in str(e.value)
    with lab.registry() as reg:
        assert len(reg.jobs()) == queued
        reg.datasets.soft_delete(ds["id"], "ann")
    with pytest.raises(plugins.ConfigError, match="no dataset"):
        jobs.submit(lab, READER.name, {"checkpoint": base["id"], "data": ds["id"]})
    # only the exact form is an id: anything else is a path, checked as one
    with pytest.raises(plugins.ConfigError, match="does not exist"):
        jobs.submit(lab, READER.name, {"checkpoint": base["id"], "data": ds["id"] + ".jsonl"})


def test_a_hub_dataset_is_recorded_by_id_without_a_download(lab, reader, tiny_model_dir):
    from app.checkpoints import import_checkpoint

    with lab.registry() as reg:
        base = import_checkpoint(lab, reg, str(tiny_model_dir), name="base")
    job = jobs.submit(lab, READER.name, {"checkpoint": base["id"], "data": "org/some-set"})
    with lab.registry() as reg:
        (row,) = reg.datasets.of_job(job["id"])
    assert (row["source"], row["path"], row["format"], row["name"]) == \
        ("hf://org/some-set", None, "hub", "org/some-set")
    summary, preview = datasets_view.dataset_detail(lab, row["id"])
    assert "lab holds no copy" in summary and preview["data"] == []


def test_uploads_are_datasets_and_names_stay_text(lab, tmp_path):
    upload_dir = tmp_path / "gradio"
    upload_dir.mkdir()
    evil = upload_dir / "<img src=x onerror=alert(1)>.jsonl"
    write_jsonl(evil, [{"prompt": "p", "completion": "c"}])
    message, ds_id = datasets_view.upload_dataset(lab, str(evil), "ann")
    assert ds_id.startswith("ds-") and "<img" not in message and "1 rows" in message
    with lab.registry() as reg:
        row = reg.datasets.get(ds_id)
    assert row["name"] == evil.name and row["source"] == "upload"
    assert Path(row["path"]).parent == lab.root / "uploads"
    summary, _ = datasets_view.dataset_detail(lab, ds_id)
    assert "<img" not in summary
    assert datasets.clean_name("a\x00b\n" + "c" * 500) == "ab" + "c" * 118
    code = upload_dir / "x.py"
    code.write_text("import os")
    message, ds_id = datasets_view.upload_dataset(lab, str(code), "ann")
    assert ds_id == "" and "expected a data file" in message
    assert datasets_view.dataset_detail(lab, "ds-<script>")[0].startswith("no dataset")
    assert datasets_view.dataset_detail(lab, "")[0].startswith("Select a dataset")


def test_a_dataset_outside_the_roots_of_a_shared_lab_is_not_previewed(lab, tmp_path,
                                                                      monkeypatch):
    outside = write_jsonl(tmp_path / "private.jsonl", [{"text": "secret"}])
    ds = datasets.register_path(lab, outside, user="ann")
    monkeypatch.setattr("app.paths.restricted", lambda lab: True)
    summary, preview = datasets_view.dataset_detail(lab, ds["id"])
    assert "outside the lab's allowed roots" in summary and preview["data"] == []


def test_the_cli_records_lists_and_shows_datasets(lab_dir, tmp_path):
    from tests.conftest import run_cli

    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": "hello"}, {"text": "world"}])
    added = run_cli(lab_dir, "datasets", "add", str(data), "--name", "greetings", check=True)
    row = json.loads(added.stdout)
    assert row["name"] == "greetings" and row["rows"] == 2
    listed = json.loads(run_cli(lab_dir, "datasets", "list", check=True).stdout)
    assert [r["id"] for r in listed] == [row["id"]] and listed[0]["jobs"] == 0
    shown = json.loads(run_cli(lab_dir, "datasets", "show", row["id"], check=True).stdout)
    assert shown["preview"] == {"columns": ["text"], "rows": [["hello"], ["world"]]}
    missing = run_cli(lab_dir, "datasets", "add", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    unknown = run_cli(lab_dir, "datasets", "show", "ds-000000000000")
    assert unknown.returncode == 2 and "no dataset" in unknown.stderr
    assert "Traceback" not in missing.stderr + unknown.stderr


def test_hostile_and_large_files_are_read_in_bounded_pieces(lab, tmp_path, monkeypatch):
    big_cell = tmp_path / "big.csv"
    big_cell.write_text('text\n"' + "x" * 200_000 + '"\n')  # over the csv module's limit
    assert datasets.count_rows(big_cell) is None
    with pytest.raises(datasets.DatasetError, match="cannot be read as CSV"):
        datasets.preview(big_cell)
    one_line = tmp_path / "one.jsonl"
    one_line.write_text(json.dumps({"text": "y" * 3_000_000}))  # one 3 MB line, no newline
    assert datasets.count_rows(one_line) == 1
    columns, rows = datasets.preview(one_line)  # shown cut, never parsed whole
    assert len(rows) == 1 and len(rows[0][0]) == datasets.CELL_CHARS
    lines = tmp_path / "lines.txt"
    lines.write_text("a\n\nb\n   \nc")
    jsonl = tmp_path / "blank.jsonl"
    jsonl.write_text('{"a": 1}\n\n  \n{"a": 2}\n{"a": 3}')
    assert datasets.count_rows(lines) == 5 and datasets.count_rows(jsonl) == 3
    (tmp_path / "t.arrow").write_bytes(b"\x00\x01binary")
    with pytest.raises(datasets.DatasetError, match="binary"):
        datasets.preview(tmp_path / "t.arrow")
    # above MAX_HASH_BYTES: recorded by path, size and time, not read at submit
    monkeypatch.setattr(datasets, "MAX_HASH_BYTES", 5)
    monkeypatch.setattr(datasets, "content_hash", lambda p: pytest.fail("hashed"))
    row = datasets.register_path(lab, lines, user=None)
    assert json.loads(row["metadata"])["hashed"] is False and row["rows"] is None
    # a relative path is recorded absolute
    monkeypatch.chdir(tmp_path)
    assert datasets.register_path(lab, "blank.jsonl", user=None)["path"] == str(jsonl)


def test_an_upload_of_known_bytes_fills_the_form_with_the_new_file(lab, tmp_path):
    from app.ui.shared import upload_to_box

    first = write_jsonl(tmp_path / "first.jsonl", [{"a": 1}])
    known = datasets.register_path(lab, first, user="ann")
    first.write_text("edited since\n")  # the known dataset's file is not what is uploaded
    again = tmp_path / "gradio" / "mine.jsonl"
    again.parent.mkdir()
    write_jsonl(again, [{"a": 1}])
    kept = upload_to_box(lab, str(again), "bob")
    assert kept != str(first) and Path(kept).parent == lab.root / "uploads"
    assert Path(kept).read_text() == again.read_text()
    with lab.registry() as reg:  # the same bytes: the same dataset
        assert [r["id"] for r in reg.datasets.list()] == [known["id"]]


def test_a_refused_submit_records_no_dataset(lab, reader, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(plugins.ConfigError):  # the checkpoint does not exist
        jobs.submit(lab, READER.name, {"checkpoint": "no-such", "data": str(data)})
    with lab.registry() as reg:
        assert reg.datasets.list() == [] and reg.jobs() == []
