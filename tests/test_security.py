"""Shared-lab security, driven as an attacker with an ordinary member account would drive it:
through the workbench's HTTP API as a logged-in member, and through the CLI.

Classes covered here (the others: tests/test_security_access.py for logins, host checks and
concurrent waits; tests/test_security_inputs.py for hostile config values;
tests/test_server_memory.py for per-connection state; tests/test_browser.py for markup in a
real browser):
1. code: uploads are data, never code; code folders are admin-only (code_roots);
2. markup: every user text reaching Markdown, HTML or Mermaid is escaped;
3. mergekit paths: every model a pasted mergekit YAML names is checked, and the job checks
   mergekit's own parse again;
4. YAML: one bounded loader refuses expanding aliases, depth and size;
5. resubmits belong to whoever clicks; resuming needs ownership;
6. Hub tokens: the submitting user's token is used, and no token reaches a log or an error.
"""

import json
import os
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TEST_PLUGINS, cli_env, run_cli, wait_for, write_yaml
from tests.test_ui import free_port

PASSWORD = "long enough"
XSS_IMG = '<img src=x onerror="window.__xss=1">'
XSS_SCRIPT = "<script>window.__xss=2</script>"
BOMB = ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n")


def shared_lab(lab, roots=(), code_roots=()):
    """alice (admin) and bob (member), and the lab's roots."""
    from app import auth
    from app.lab import Lab

    (lab.root / "lab.toml").write_text(f"allowed_roots = {json.dumps(list(map(str, roots)))}\n"
                                       f"code_roots = {json.dumps(list(map(str, code_roots)))}\n")
    auth.add_user(lab, "alice", PASSWORD, admin=True)
    auth.add_user(lab, "bob", PASSWORD)
    return Lab(lab.root)


def job_count(lab) -> int:
    with lab.registry() as reg:
        return reg.db["jobs"].count


@pytest.fixture
def member_api(lab):
    """The workbench's API on 127.0.0.1 as the members of a shared lab see it: a uvicorn
    server of app.server.asgi_app whose user is the one a header names (as behind the lab's
    OAuth proxy), and a gradio_client per user. No scheduler: nothing queued ever runs."""
    import uvicorn
    from gradio_client import Client

    from app.server import asgi_app

    lab = shared_lab(lab, roots=[lab.root.parent / "data"])
    app = asgi_app(lab, auth_dependency=lambda r: r.headers.get("x-test-user"),
                   schedule=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 60, what="the server")
    url = f"http://127.0.0.1:{port}/"
    clients = {name: Client(url, verbose=False, headers={"X-Test-User": name})
               for name in ("alice", "bob")}
    yield lab, clients
    server.should_exit = True
    thread.join(10)


def form_values(plugin_name, data):
    import plugins
    from app import forms

    specs = forms.form_spec(plugins.get(plugin_name).Config)
    return forms.config_to_values(specs, data)


# ---------------------------------------------------------------------------- 1. code
def test_uploads_are_data_and_a_member_cannot_name_a_code_folder(member_api, tmp_path):
    from app.ui import UploadError, save_upload

    lab, users = member_api
    evil = tmp_path / "hook.py"
    evil.write_text("import os; os.system('id > /tmp/pwned')\n")
    with pytest.raises(UploadError, match=r"'hook.py' refused: expected a data file"):
        save_upload(lab, str(evil))
    task = tmp_path / "task.yaml"  # an lm-eval task whose !function would import hook.py
    task.write_text("task: pwn\nprocess_docs: !function hook.process\n")
    kept = Path(save_upload(lab, str(task)))
    assert kept.parent == lab.root / "uploads" and oct(kept.stat().st_mode)[-3:] == "600"

    before = job_count(lab)
    values = form_values("evaluate", {"checkpoint": "org/model", "lm_eval_tasks": ["pwn"],
                                      "lm_eval_include_path": str(kept.parent)})
    message, job_id = users["bob"].predict(*values, api_name="/run_evaluate")
    assert job_id == "" and "field 'lm_eval_include_path'" in message
    assert "uploaded files, which are data and never code" in message
    assert job_count(lab) == before
    # a folder inside the allowed roots is still no code root
    data = lab.root.parent / "data" / "tasks"
    data.mkdir(parents=True)
    values = form_values("evaluate", {"checkpoint": "org/model", "lm_eval_tasks": ["pwn"],
                                      "lm_eval_include_path": str(data)})
    message, job_id = users["bob"].predict(*values, api_name="/run_evaluate")
    assert job_id == "" and "loads code only from the admin's code_roots (none are listed)" \
        in message
    # task names are names, not paths
    values = form_values("evaluate", {"checkpoint": "org/model",
                                      "lm_eval_tasks": ["../../uploads/task.yaml"]})
    message, job_id = users["bob"].predict(*values, api_name="/run_evaluate")
    assert job_id == "" and "field 'lm_eval_tasks.0'" in message
    assert job_count(lab) == before


def test_code_roots_are_the_admins_and_the_cli_refuses_the_rest(lab_dir, lab, tmp_path):
    from app import jobs
    from app.lab import Lab

    reviewed = tmp_path / "reviewed-tasks"
    reviewed.mkdir()
    lab = shared_lab(lab, roots=[tmp_path], code_roots=[reviewed])
    (lab.root / "uploads").mkdir()
    config = write_yaml(tmp_path / "eval.yaml", {
        "checkpoint": "org/model", "lm_eval_tasks": ["pwn"],
        "lm_eval_include_path": str(lab.root / "uploads")})
    proc = run_cli(lab_dir, "run", "evaluate", config, "--user", "bob")
    assert proc.returncode == 2 and "field 'lm_eval_include_path'" in proc.stderr
    assert "Traceback" not in proc.stderr and job_count(lab) == 0
    # a code root that contains the uploads does not let them in either
    (lab.root / "lab.toml").write_text(f'code_roots = ["{lab.root}"]\n')
    with pytest.raises(Exception, match="holds uploaded files"):
        jobs.submit(Lab(lab.root), "evaluate", yaml.safe_load(config.read_text()), user="bob")
    (lab.root / "lab.toml").write_text(f'allowed_roots = ["{tmp_path}"]\n'
                                       f'code_roots = ["{reviewed}"]\n')
    job = jobs.submit(Lab(lab.root), "evaluate",
                      {"checkpoint": "org/model", "lm_eval_tasks": ["pwn"],
                       "lm_eval_include_path": str(reviewed)}, user="bob")
    assert job["status"] == "queued"


# -------------------------------------------------------------------------- 2. markup
def hostile_lab_rows(lab):
    """A checkpoint, evaluation, job progress message and error carrying markup, as a member
    can make them (a name, a task label, a message a plugin reports, an error)."""
    from app import jobs

    with lab.registry() as reg:
        base = reg.add_checkpoint(name="base", relation="import", created_by="bob")
        ck = reg.add_checkpoint(name=f"evil {XSS_IMG} | [x](javascript:alert(1)) \"q\" (p)",
                                relation="finetune", created_by="bob",
                                parents=[{"id": base["id"], "role": XSS_SCRIPT,
                                          "weight": 0.5}])
        reg.add_evaluation(checkpoint_id=ck["id"], task=f"task {XSS_SCRIPT}",
                           metric="acc", value=0.5)
    job = jobs.submit(lab, "test_sleep", {"seconds": 1, "pid_file": "/tmp/nothing"},
                      user="bob")
    with lab.registry() as reg:
        reg.update_job(job["id"], progress=0.4, progress_message=f"scoring {XSS_IMG}",
                       status="failed", error=f"```\n</pre>{XSS_SCRIPT}\n```")
        reg.add_metric(name=f"{XSS_IMG}/acc", value=1.0, job_id=job["id"])
    return ck, job


def test_markup_in_names_labels_messages_and_errors_is_escaped(member_api):
    lab, users = member_api
    ck, job = hostile_lab_rows(lab)
    status, bar, log, _ = users["alice"].predict(job["id"], api_name="/job_detail")
    summary, lineage, _ = users["alice"].predict(ck["id"], api_name="/checkpoint_detail")
    # the error is verbatim inside a fence longer than any inside it: code, never markup
    assert "````\n```\n</pre><script>window.__xss=2</script>\n```\n````" in status
    outside_code = status.split("````")[0] + status.split("````")[-1]
    for text in (outside_code, bar, summary, lineage):
        assert "<img" not in text and "<script" not in text, text
    assert "scoring &lt;img src=x onerror=" in bar
    assert "evil &lt;img src=x" in summary and "\\[x\\](javascript:alert(1))" in summary
    assert "\\|" in summary
    # Mermaid: names, task labels and roles quoted and entity-encoded
    assert "#60;img src=x onerror=#34;window.__xss=1#34;#62;" in lineage
    assert "#60;script#62;" in lineage and '"q"' not in lineage and "#34;q#34;" in lineage


def test_mermaid_of_any_name_is_one_quoted_label(tmp_path):
    from registry import Registry

    reg = Registry(tmp_path / "r.db")
    names = ['a"b', "c]d", "e|f", "g(h)", "end", "i#j;k", "ünï ☃", "<b>x</b>", "l\nm"]
    rows = [reg.add_checkpoint(name=n, relation="import") for n in names]
    child = reg.add_checkpoint(name="child", relation="merge",
                               parents=[{"id": r["id"], "role": "r|o\"le"} for r in rows])
    text = reg.lineage_mermaid(child["id"])
    for line in text.splitlines()[1:-1]:
        if "-->" in line:
            assert line.count("|") == 2 and line.count('"') == 2, line
        else:
            assert line.count('"') == 2 and line.count("[") == 1, line
    assert "#9731;" in text and "#35;" in text and "<b>x</b>" not in text


# -------------------------------------------------------------------- 3. mergekit paths
@pytest.mark.parametrize("place, yaml_text", [
    ("tokenizer_source", "merge_method: linear\nmodels:\n  - model: org/a\n"
                         "tokenizer_source: {outside}\n"),
    ("tokenizer.source", "merge_method: linear\nmodels:\n  - model: org/a\n"
                         "tokenizer:\n  source: {outside}\n"),
    ("tokenizer.tokens.x.source.model",
     "merge_method: linear\nmodels:\n  - model: org/a\ntokenizer:\n  source: union\n"
     "  tokens:\n    x:\n      source: {{kind: model_token, model: {outside}, token_id: 1}}\n"),
    ("tokenizer.tokens.y.source", "merge_method: linear\nmodels:\n  - model: org/a\n"
                                  "tokenizer:\n  tokens:\n    y:\n      source: {outside}\n"),
    ("models[1].model", "merge_method: linear\nmodels:\n  - model: org/a\n  - model: {outside}\n"),
    ("slices[0].sources[1].model",
     "merge_method: passthrough\nslices:\n  - sources:\n      - model: org/a\n"
     "        layer_range: [0, 1]\n      - model: {outside}\n        layer_range: [0, 1]\n"),
    ("slices[0].base_model",
     "merge_method: ties\nslices:\n  - sources:\n      - model: org/a\n"
     "        layer_range: [0, 1]\n    base_model: {outside}\n"),
    ("modules.text.models[0].model",
     "merge_method: linear\nmodules:\n  text:\n    models:\n      - model: {outside}\n"),
])
def test_every_model_a_mergekit_yaml_names_is_checked(lab, tiny_model_dir, place, yaml_text):
    from app import jobs
    from plugins import ConfigError

    lab = shared_lab(lab)
    with pytest.raises(ConfigError) as e:
        jobs.submit(lab, "merge", {"mergekit_yaml": yaml_text.format(outside=tiny_model_dir)},
                    user="bob")
    assert f"field 'mergekit_yaml ({place})'" in str(e.value)
    assert "is outside the lab's allowed roots" in str(e.value)
    assert job_count(lab) == 0


@pytest.mark.parametrize("yaml_text, expected", [
    ("merge_method: linear\nmodels:\n  - model: {path: /etc}\n",
     "models[0].model must be a checkpoint reference"),
    ("merge_method: linear\nmodels:\n  - parameters: {weight: 1}\n",
     "models[0].model must be a checkpoint reference"),
    ("merge_method: linear\nmodels: [org/a]\n", "models[0] must be a mapping"),
    ("models:\n  - model: org/a\n", "merge_method is missing"),
    ("merge_method: linear\n", "exactly one of models, slices or modules"),
    ("- just a list\n", "expected a mapping"),
    ("merge_method: linear\nmodels: [\n", "invalid YAML at line"),
])
def test_a_broken_mergekit_yaml_is_refused_at_submit(lab, yaml_text, expected):
    from app import jobs
    from plugins import ConfigError

    with pytest.raises(ConfigError, match="field 'mergekit_yaml'") as e:
        jobs.submit(lab, "merge", {"mergekit_yaml": yaml_text})
    assert expected in str(e.value)
    assert job_count(lab) == 0


def test_the_job_checks_what_mergekit_itself_would_read(tmp_path):
    from mergekit.config import MergeConfiguration

    from plugins.merge import mergekit_reads

    config = MergeConfiguration.model_validate({
        "merge_method": "linear", "models": [{"model": "/m/a+/m/lora"}],
        "tokenizer": {"source": "union", "tokens": {
            "x": {"source": {"kind": "model_token", "model": "/m/tok", "token_id": 1}},
            "y": {"source": "/m/y"}}}})
    assert mergekit_reads(config) == {"/m/a", "/m/lora", "/m/tok", "/m/y"}


def test_a_job_opens_no_folder_outside_the_roots(lab, tiny_model_dir):
    from app.context import JobContext
    from registry import CheckpointError

    lab = shared_lab(lab)
    with lab.registry() as reg:
        job = reg.add_job(plugin="test_sleep", config={}, user="bob")
        ctx = JobContext(lab, reg, job)
        with pytest.raises(CheckpointError, match="is outside the lab's allowed roots"):
            ctx.open(str(tiny_model_dir))
        assert reg.find_checkpoint(str(tiny_model_dir)) is None


# ----------------------------------------------------------------------------- 4. YAML
def test_expanding_aliases_are_refused_everywhere_yaml_is_read(lab_dir, lab, tmp_path):
    from app import forms, jobs
    from plugins import ConfigError
    from plugins.evaluate.suites import SuiteError, load_suite

    assert len(BOMB) < 400
    # a form field (the server parses it)
    specs = forms.form_spec(__import__("plugins").get("evaluate").Config)
    values = forms.config_to_values(specs, {"checkpoint": "x"})
    values[[s.path for s in forms.leaves(specs)].index("lm_eval_tasks")] = BOMB
    with pytest.raises(forms.FormError, match="alias \\*a repeats a list"):
        forms.values_to_config(specs, values)
    # a config file, from the CLI
    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB)
    proc = run_cli(lab_dir, "run", "evaluate", config)
    assert proc.returncode == 2 and "aliases that expand (and `<<:` merge keys) are not accepted" in proc.stderr
    assert "Traceback" not in proc.stderr
    # a pasted mergekit YAML
    with pytest.raises(ConfigError, match="field 'mergekit_yaml'.*aliases that expand"):
        jobs.submit(lab, "merge", {"mergekit_yaml": "merge_method: linear\n" + BOMB})
    # a suite
    suite = tmp_path / "suite.yaml"
    suite.write_text(BOMB)
    with pytest.raises(SuiteError, match="aliases that expand"):
        load_suite(str(suite))
    # nesting and size
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 500 + "]" * 500 + "\n")
    proc = run_cli(lab_dir, "run", "evaluate", deep)
    assert proc.returncode == 2 and "nested more than 64 levels" in proc.stderr
    assert job_count(lab) == 0


def test_a_hub_card_with_expanding_aliases_is_refused(tmp_path):
    from registry import hub

    card = "---\n" + BOMB + "base_model: org/a\n---\n# x\n"
    with pytest.raises(hub.HubError, match="the model card's metadata.*aliases that expand"):
        hub.read_card_lineage(card)
    assert hub.read_card_lineage("---\nbase_model: org/a\n---\n")[0] == ["org/a"]


# --------------------------------------------------------------- 5. retry and resume
def test_a_retry_belongs_to_whoever_clicks_and_resume_needs_ownership(member_api,
                                                                      tiny_model_dir):
    from app import auth, jobs
    from plugins import ConfigError

    lab, users = member_api
    job = jobs.submit(lab, "test_sleep", {"seconds": 1, "pid_file": "/tmp/x"}, user="alice")
    message, new_id = users["bob"].predict(job["id"], api_name="/retry_job")
    assert new_id != job["id"] and new_id.startswith("job-"), message
    with lab.registry() as reg:
        assert reg.job(new_id)["user"] == "bob"
    submits = [(a["user"], a["target"]) for a in auth.audit_log(lab)
               if a["action"] == "job.submit"]
    assert submits[0] == ("bob", new_id)

    # resume: train jobs have resume_job; bob may not resume alice's, by button or by field
    with lab.registry() as reg:
        base = reg.add_checkpoint(name="tiny", relation="import", path=str(tiny_model_dir),
                                  created_by="alice")
    data = lab.root.parent / "data" / "d.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    train = jobs.submit(lab, "train", {"checkpoint": base["id"], "data": str(data),
                                       "max_steps": 1}, user="alice")
    with lab.registry() as reg:
        reg.update_job(train["id"], status="failed")
    message, same = users["bob"].predict(train["id"], api_name="/resume_job")
    assert same == train["id"] and "bob may not resume job" in message
    with pytest.raises(ConfigError, match="field 'resume_job': bob may not resume"):
        jobs.submit(lab, "train", {"checkpoint": base["id"], "data": str(data),
                                   "max_steps": 1, "resume_job": train["id"]}, user="bob")
    message, resumed = users["alice"].predict(train["id"], api_name="/resume_job")
    assert resumed != train["id"], message
    with lab.registry() as reg:
        assert reg.job(resumed)["user"] == "alice"


# --------------------------------------------------------------------------- 6. tokens
def test_a_hub_download_uses_the_submitters_token_and_its_error_hides_it(lab, tmp_path,
                                                                        monkeypatch):
    import huggingface_hub

    from app.checkpoints import import_checkpoint
    from registry import CheckpointError, hub

    monkeypatch.setenv(hub.TOKEN_FILE_ENV, str(tmp_path / "cfg" / "hub_token"))
    monkeypatch.setenv("HF_TOKEN", "hf_serverSERVERserver0123456789")
    hub.save_token("hf_bobBOBbobBOBbob0123456789", user="bob")
    used = []

    def download(repo, token=None, **kw):
        used.append(token)
        raise RuntimeError(f"401 Unauthorized for {repo} with header Bearer {token}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    with lab.registry() as reg:
        with pytest.raises(CheckpointError) as e:
            import_checkpoint(lab, reg, "org/private", user="bob", log=lambda m: None)
    assert used == ["hf_bobBOBbobBOBbob0123456789"]
    assert "could not download org/private" in str(e.value) and "hf_bob" not in str(e.value)
    assert "Bearer ***" in str(e.value)


@pytest.mark.slow
def test_no_token_reaches_a_job_log_or_its_stored_error(lab_dir, tmp_path):
    from app.lab import Lab

    token = "hf_leakLEAKleakLEAK0123456789"
    config = write_yaml(tmp_path / "leak.yaml", {"message": "download failed"})
    env = dict(cli_env(lab_dir), HF_TOKEN=token,
               WEIGHTSMITH_PLUGINS=TEST_PLUGINS + ",tests.plugins_for_tests:LEAKER")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "app.cli", "run", "test_leak", str(config),
                           "--wait"], capture_output=True, text=True, timeout=180, env=env,
                          cwd=str(REPO))
    assert proc.returncode == 1
    with Lab(lab_dir).registry() as reg:
        (job,) = reg.jobs()
    log = Path(job["log_path"]).read_text()
    assert "Bearer ***" in log and "stderr says ***" in log and "401 for token ***" in log
    for text in (log, job["error"], proc.stdout, proc.stderr):
        assert token not in text


# ------------------------------------------------- 10. bad inputs found before they cost
def test_a_missing_data_file_is_refused_at_submit(lab, tiny_model_dir):
    from app import jobs
    from plugins import ConfigError

    with lab.registry() as reg:
        base = reg.add_checkpoint(name="tiny", relation="import", path=str(tiny_model_dir))
    with pytest.raises(ConfigError, match="field 'data': '/no/such/train.jsonl' does not "
                                          "exist; expected an existing file"):
        jobs.submit(lab, "train", {"checkpoint": base["id"], "data": "/no/such/train.jsonl"})
    with pytest.raises(ConfigError, match="field 'text_file': .* does not exist"):
        jobs.submit(lab, "evaluate", {"checkpoint": base["id"], "text_file": "/no/such.txt"})
    assert job_count(lab) == 0


@pytest.mark.slow
def test_nan_weights_and_a_missing_tokenizer_fail_with_what_is_wrong(lab_dir, tmp_path,
                                                                     tiny_model_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    from app.lab import Lab

    nan = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, nan)
    weights = load_file(str(nan / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first][0] = float("nan")
    save_file(weights, str(nan / "model.safetensors"), metadata={"format": "pt"})
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))

    for folder, expected in ((nan, "NaN or Inf weights in 1 tensors"),
                             (bare, "has no tokenizer: ")):
        config = write_yaml(tmp_path / f"{folder.name}.yaml",
                            {"checkpoint": str(folder), "max_tokens": 64, "window": 32})
        proc = run_cli(lab_dir, "run", "evaluate", config, "--wait", timeout=240)
        assert proc.returncode == 1 and expected in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr.split("last log lines:")[0]
    assert "tokenizer.json, tokenizer.model" in proc.stderr  # names the files it looked for
    with Lab(lab_dir).registry() as reg:
        assert reg.db["evaluations"].count == 0  # nothing scored


def test_log_records_and_stored_errors_lose_hub_tokens(monkeypatch, tmp_path):
    import io
    import logging

    from registry import hub

    monkeypatch.setenv(hub.TOKEN_FILE_ENV, str(tmp_path / "cfg" / "hub_token"))
    monkeypatch.setenv("HF_TOKEN", "hf_envENVenvENVenv0123456789")
    hub.save_token("secret-token-of-bob", user="bob")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("weightsmith-test-redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        hub.install_log_redaction()
        logger.warning("calling with %s and %s", "hf_envENVenvENVenv0123456789",
                       "secret-token-of-bob")
        try:
            raise RuntimeError("echo hf_someOTHERtokenOTHER0123456789")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert text.count("***") >= 3 and "hf_" not in text and "secret-token" not in text
    assert "RuntimeError: echo ***" in text


def test_a_suite_reads_only_its_own_folder(tmp_path):
    from plugins.evaluate.suites import SuiteError, load_suite

    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"prompt": "p", "target": "t"}\n')
    suite = tmp_path / "uploads" / "suite.yaml"
    suite.parent.mkdir()
    for data in (str(secret), "../secret.jsonl"):
        suite.write_text(f"name: s\ntasks:\n  - {{name: t, type: generation, data: '{data}'}}\n")
        with pytest.raises(SuiteError, match="lies outside the suite's folder"):
            load_suite(str(suite))


def test_a_code_folder_must_be_given_absolute(lab, tmp_path):
    from app.paths import check_code_path

    (tmp_path / "tasks").mkdir()
    lab = shared_lab(lab, code_roots=[tmp_path / "tasks"])
    assert "is relative; expected an absolute" in check_code_path(lab, "f", "tasks")
    assert check_code_path(lab, "f", str(tmp_path / "tasks")) is None
    assert "holds uploaded files" in check_code_path(lab, "f", str(tmp_path))  # has the lab
