import json

from tests.conftest import last_json, run_cli, write_yaml


def test_demo_then_evaluate_then_lineage(lab_dir, tmp_path):
    lab_dir.mkdir(parents=True, exist_ok=True)
    (lab_dir / "lab.toml").write_text("auto_eval = false\n")
    demo = run_cli(lab_dir, "demo", "--pretrain-steps", "3", "--no-skills", check=True)
    base = json.loads(demo.stdout)["base"]
    assert base.startswith("ck-")
    # idempotent: a second call reuses the cached model
    again = json.loads(run_cli(lab_dir, "demo", "--no-skills", check=True).stdout)
    assert again == {"base": base, "name": "demo-base", "built": False}

    config = write_yaml(tmp_path / "ev.yaml", {"checkpoint": "demo-base", "max_tokens": 600,
                                               "window": 128})
    run = run_cli(lab_dir, "run", "evaluate", config, "--wait", check=True)
    summary = last_json(run.stdout)
    assert summary["status"] == "succeeded" and summary["checkpoints"] == []
    assert "progress" in run.stderr and "perplexity" in run.stderr

    graph = json.loads(run_cli(lab_dir, "registry", "lineage", base, "--json",
                               check=True).stdout)
    (node,) = graph["nodes"]
    assert node["id"] == base
    assert node["scores"]["ppl:heldout.txt/perplexity"] > 1
    mermaid = run_cli(lab_dir, "registry", "lineage", "demo-base", "--mermaid", check=True).stdout
    assert mermaid.startswith("graph TD") and "<b>ppl:heldout.txt</b>" in mermaid
    assert "perplexity = " in mermaid

    jobs = json.loads(run_cli(lab_dir, "jobs", "--json", check=True).stdout)
    assert [j["status"] for j in jobs] == ["succeeded"]
    logs = run_cli(lab_dir, "logs", summary["job"], check=True).stdout
    assert "succeeded" in logs


def test_bad_config_exits_2_naming_the_field(lab_dir, tmp_path):
    config = write_yaml(tmp_path / "bad.yaml", {"checkpoint": "x", "window": "wide",
                                                "strdie": 3})
    proc = run_cli(lab_dir, "run", "evaluate", config)
    assert proc.returncode == 2
    assert "field 'window': got 'wide'; expected: input should be a valid integer" in proc.stderr
    assert "field 'strdie': unknown field" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli(lab_dir, "run", "no_such_plugin", config)
    assert proc.returncode == 2 and "unknown plugin 'no_such_plugin'" in proc.stderr
    proc = run_cli(lab_dir, "run", "evaluate", tmp_path / "missing.yaml")
    assert proc.returncode == 2 and "missing.yaml does not exist" in proc.stderr


def test_failed_job_exits_1_with_json_summary(lab_dir, tmp_path):
    config = write_yaml(tmp_path / "crash.yaml", {"message": "nope"})
    proc = run_cli(lab_dir, "run", "test_crash", config, "--wait")
    assert proc.returncode == 1
    summary = last_json(proc.stdout)
    assert summary["status"] == "failed" and "RuntimeError: nope" in summary["error"]


def test_import_and_registry_show(lab_dir, tiny_model_dir, tmp_path):
    row = json.loads(run_cli(lab_dir, "import", tiny_model_dir, "--name", "tiny",
                             check=True).stdout)
    assert row["relation"] == "import" and row["architecture"] == "LlamaForCausalLM"
    shown = json.loads(run_cli(lab_dir, "registry", "show", "tiny", check=True).stdout)
    assert shown["id"] == row["id"] and shown["param_count"] > 0
    listing = run_cli(lab_dir, "registry", "list", check=True).stdout
    assert row["id"] in listing
    (tmp_path / "empty").mkdir()
    proc = run_cli(lab_dir, "import", tmp_path / "empty")
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    proc = run_cli(lab_dir, "registry", "show", "ck-00000000")
    assert proc.returncode == 2 and "no checkpoint 'ck-00000000'" in proc.stderr


def test_plugins_json_lists_schemas(lab_dir):
    listed = json.loads(run_cli(lab_dir, "plugins", "--json", check=True).stdout)
    evaluate = next(p for p in listed if p.get("name") == "evaluate")
    assert evaluate["schema"]["properties"]["checkpoint"]["x-weightsmith"] == "checkpoint"


def test_read_commands_refuse_a_missing_lab(tmp_path):
    proc = run_cli(tmp_path / "typo", "registry", "list")
    assert proc.returncode == 2 and "no lab at" in proc.stderr
    assert not (tmp_path / "typo").exists()
