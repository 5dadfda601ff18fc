"""The workbench through its HTTP API (gradio_client) against a real server on 127.0.0.1."""

import re
import socket
from pathlib import Path
import subprocess
import sys

import pytest

import plugins
from app import forms
from tests.conftest import REPO, cli_env, run_cli, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(lab_dir, tiny_model_dir):
    run_cli(lab_dir, "import", tiny_model_dir, "--name", "tiny", check=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-demo", "--port",
                             str(port)], env=cli_env(lab_dir), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"

    def up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode()
            return False

    wait_for(up, 90, interval=0.3, what="the server")
    from gradio_client import Client

    yield Client(url, verbose=False)
    proc.terminate()
    proc.wait(20)


def form_values(name: str, data: dict) -> list:
    return forms.config_to_values(forms.form_spec(plugins.get(name).Config), data)


def test_evaluate_through_the_generated_form(server, lab_dir):
    values = form_values("evaluate", {"checkpoint": "tiny", "max_tokens": 300, "window": 64})
    message, job_id = server.predict(*values, api_name="/run_evaluate")
    assert job_id.startswith("job-"), message
    status = wait_for(lambda: (s := server.predict(job_id, api_name="/job_detail")[0])
                      and "succeeded" in s and s, 90, interval=0.5, what="job success")
    assert job_id in status
    summary, lineage, details = server.predict("tiny", api_name="/checkpoint_detail")
    assert "```mermaid" in lineage and "perplexity" in lineage
    assert {e["metric"] for e in details["evaluations"]} >= {"perplexity", "bits_per_byte"}


def test_prune_through_the_generated_form(server, lab_dir):
    values = form_values("prune", {"checkpoint": "tiny", "method": "sparsegpt",
                                   "pattern": "2:4", "calibration_samples": 4,
                                   "calibration_length": 32, "eval_max_tokens": 300})
    message, job_id = server.predict(*values, api_name="/run_prune")
    assert job_id.startswith("job-"), message
    wait_for(lambda: "succeeded" in server.predict(job_id, api_name="/job_detail")[0], 90,
             interval=0.5, what="job success")
    summary, lineage, details = server.predict("tiny-sparsegpt-2of4",
                                               api_name="/checkpoint_detail")
    assert "prune" in summary and "sparsegpt sparsity 50.0% (2:4)" in summary
    assert re.search(r"\| ppl:heldout.txt/perplexity \| [0-9.]+ \| \+[0-9.]+ \|", summary)
    assert "| vs tiny |" in summary
    assert details["metadata"]["sparsity_per_layer"] == [0.5, 0.5]
    assert "ppl#58;heldout.txt" in lineage  # the score on the lineage graph (":" encoded)


def test_bad_values_come_back_as_field_named_errors(server):
    values = form_values("evaluate", {"checkpoint": "no-such-checkpoint", "window": 64})
    values[[s.path for s in forms.leaves(forms.form_spec(plugins.get("evaluate").Config))]
           .index("stride")] = "wide"
    message, job_id = server.predict(*values, api_name="/run_evaluate")
    assert job_id == ""
    assert "field 'stride': got 'wide'; expected a number" in message
    values[[s.path for s in forms.leaves(forms.form_spec(plugins.get("evaluate").Config))]
           .index("stride")] = "100"
    message, job_id = server.predict(*values, api_name="/run_evaluate")
    assert job_id == ""
    assert "field 'stride': got 100; expected" in message or "stride (100)" in message
    message, _ = server.predict(*form_values("evaluate", {"checkpoint": "nope"}),
                                api_name="/run_evaluate")
    assert "field 'checkpoint': unknown checkpoint 'nope'" in message
    assert "Traceback" not in message


def test_preview_is_the_yaml_the_cli_accepts(server, tmp_path, lab_dir):
    import yaml

    values = form_values("evaluate", {"checkpoint": "tiny", "window": 32, "max_tokens": 100})
    text = server.predict(*values, api_name="/preview_evaluate")
    assert "weightsmith run evaluate" in text
    config = yaml.safe_load(text)
    assert config == {"checkpoint": "tiny", "window": 32, "batch_size": 8, "max_tokens": 100,
                      "reuse_scores": True, "dtype": "auto"}  # a checkbox, a dropdown: a value
    (tmp_path / "c.yaml").write_text(text)
    proc = run_cli(lab_dir, "run", "evaluate", tmp_path / "c.yaml", "--wait")
    assert proc.returncode == 0, proc.stderr


def test_retry_resubmits_the_same_config(server, lab_dir):
    import json

    message, job_id = server.predict(*form_values("test_crash", {"message": "again"}),
                                     api_name="/run_test_crash")
    wait_for(lambda: "failed" in server.predict(job_id, api_name="/job_detail")[0], 90,
             interval=0.5, what="the crash")
    note, new_id = server.predict(job_id, api_name="/retry_job")
    assert new_id != job_id and new_id in note
    from app.lab import Lab

    with Lab(lab_dir).registry() as reg:
        assert json.loads(reg.job(new_id)["config"]) == json.loads(reg.job(job_id)["config"])


def test_compare_shows_scores_and_deltas_against_parents(lab):
    from app.ui import compare

    with lab.registry() as reg:
        base = reg.add_checkpoint(name="base", relation="import")
        child = reg.add_checkpoint(name="child", relation="finetune",
                                   parents=[{"id": base["id"]}])
        for ck, value in ((base, 10.0), (child, 8.5)):
            reg.add_evaluation(checkpoint_id=ck["id"], task="ppl:x", metric="perplexity",
                               value=value)
    table, bars = compare(lab, [base["id"], child["id"]])
    row = table[table["metric"] == "ppl:x/perplexity"].iloc[0]
    assert row[f"base ({base['id']})"] == "10" and row[f"child ({child['id']})"] == "8.5"
    assert row["child vs parents"] == "-1.5 vs base"
    assert row["base vs parents"] == ""
    assert sorted(bars["checkpoint"]) == ["base", "child"]


def test_uploads_are_kept_in_the_lab(lab, tmp_path):
    from app.ui import save_upload

    src = tmp_path / "notes.txt"
    src.write_text("some text to score")
    kept = Path(save_upload(lab, str(src)))
    assert kept.parent == lab.root / "uploads" and kept.read_text() == "some text to score"
    assert save_upload(lab, None) == ""


def test_load_yaml_fills_the_form_and_reports_what_it_cannot(tmp_path, lab_dir):
    from app.ui import load_yaml

    good = tmp_path / "good.yaml"
    good.write_text("checkpoint: tiny\nwindow: 64\ncolour: blue\n")
    values, note = load_yaml("evaluate", str(good))
    paths = [s.path for s in forms.leaves(forms.form_spec(plugins.get("evaluate").Config))]
    assert values[paths.index("checkpoint")] == "tiny" and values[paths.index("window")] == 64
    assert "Not in this form (ignored): colour" in note
    bad = tmp_path / "bad.yaml"
    bad.write_text("checkpoint: [unclosed\n")
    values, note = load_yaml("evaluate", str(bad))
    assert values is None and "invalid YAML" in note  # the form is left as it was


def test_no_page_holds_a_heartbeat_stream(lab):
    """A gr.State or an unload listener makes every open page hold Gradio's heartbeat stream,
    and a uvicorn shutdown (asgi_app) then waits for every open tab (app.ui)."""
    from gradio.utils import connect_heartbeat

    from app.ui import build_app

    app = build_app(lab)
    assert not connect_heartbeat(app.get_config_file(), app.blocks.values())


def test_a_page_load_is_two_events_that_fill_every_view(lab):
    """Gradio's page walks its whole component tree for each event's loading status, so each
    extra load event delayed the first view (app.ui.shared.Ticks): one event restores the
    URL's tab and selections (navigation.wire), one fills every view."""
    from app.ui import build_app

    app = build_app(lab)
    config = app.get_config_file()
    loads = [d for d in config["dependencies"] if any(t[1] == "load" for t in d["targets"])]
    assert len(loads) == 2, [d["id"] for d in loads]
    ids = {c["props"].get("elem_id"): c["id"] for c in config["components"]}
    filled = set(loads[0]["outputs"]) | set(loads[1]["outputs"])
    for elem_id in ("home-summary", "home-jobs", "home-graph", "lineage", "jobs-table",
                    "dataset-table", "gpus", "ws-tabs", "selected-job"):
        assert ids[elem_id] in filled, elem_id
