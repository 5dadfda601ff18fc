import json

from tests.conftest import last_json, run_cli, write_yaml


def test_demo_then_evaluate_then_lineage(lab_dir, tmp_path):
    lab_dir.mkdir(parents=True, exist_ok=True)
    (lab_dir / "lab.toml").write_text("auto_eval = false\n")
    demo = run_cli(lab_dir, "demo", "--pretrain-steps", "3", "--no-skills", check=True)
    built = json.loads(demo.stdout)  # stdout is the one JSON; the job's log went to stderr
    base = built["base"]
    assert base.startswith("ck-") and built["built"] and built["job"].startswith("job-")
    assert "step 3/3 loss" in demo.stderr and "registered checkpoint" in demo.stderr
    # idempotent: a second call reuses the cached model
    again = json.loads(run_cli(lab_dir, "demo", "--no-skills", check=True).stdout)
    assert again == {"base": base, "name": "demo-base", "built": False}

    # the base has a lineage like any checkpoint: its job, that job's config, relation pretrain
    from app.lab import Lab

    with Lab(lab_dir).registry() as reg:
        ck = reg.checkpoint(base)
        job = reg.job(ck["job_id"])
        assert ck["relation"] == "pretrain" and reg.parents(base) == []
        assert job["id"] == built["job"] and job["plugin"] == "pretrain"
        assert job["user"] == "demo" and job["status"] == "succeeded"
        config = json.loads(job["config"])
        assert config["steps"] == 3 and config["name"] == "demo-base"
        assert config["data"].endswith("corpus.txt") and config["vocab_size"] == 4096
        meta = json.loads(ck["metadata"])
        assert meta["corpus"] == "corpus.txt" and meta["steps"] == 3 and meta["final_loss"] > 0

    config = write_yaml(tmp_path / "ev.yaml", {"checkpoint": "demo-base", "max_tokens": 600,
                                               "window": 128})
    run = run_cli(lab_dir, "run", "evaluate", config, "--wait", check=True)
    summary = last_json(run.stdout)
    assert summary["status"] == "succeeded" and summary["checkpoints"] == []
    assert "progress" in run.stderr and "perplexity" in run.stderr

    graph = json.loads(run_cli(lab_dir, "registry", "lineage", base, "--json",
                               check=True).stdout)
    (node,) = [n for n in graph["nodes"] if n["kind"] != "dataset"]
    assert node["id"] == base
    # the corpus its pretrain job read, as a dataset node with a data edge
    (data,) = [n for n in graph["nodes"] if n["kind"] == "dataset"]
    assert data["name"] == "corpus.txt" and data["id"].startswith("ds-")
    assert [(e["parent"], e["child"], e["role"]) for e in graph["edges"]] == [
        (data["id"], base, "data")]
    assert node["scores"]["ppl:heldout.txt/perplexity"] > 1
    mermaid = run_cli(lab_dir, "registry", "lineage", "demo-base", "--mermaid", check=True).stdout
    assert mermaid.startswith("graph TD") and "<b>ppl#58;heldout.txt</b>" in mermaid
    assert "perplexity = " in mermaid

    jobs = json.loads(run_cli(lab_dir, "jobs", "--json", check=True).stdout)
    assert sorted((j["plugin"], j["status"]) for j in jobs) == [("evaluate", "succeeded"),
                                                                ("pretrain", "succeeded")]
    logs = run_cli(lab_dir, "logs", summary["job"], check=True).stdout
    assert "succeeded" in logs


SERVE_AND_PROBE = """
import json, os, signal, socket, sys, threading, time, urllib.request
import app.scheduler
from app.lab import Lab
from app.server import serve

def no_jobs(self, stop):  # this test is about the server: nothing is started
    stop.wait()

app.scheduler.Scheduler.run_forever = no_jobs
lab = Lab(sys.argv[1])
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
start = time.monotonic()

def probe():
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.2)
    with lab.registry() as reg:
        jobs = [(j["plugin"], j["status"], j["user"]) for j in reg.jobs()]
    heavy = [m for m in ("torch", "transformers") if m in sys.modules]
    print(json.dumps({"heavy": heavy, "jobs": jobs, "seconds": time.monotonic() - start}))
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=probe, daemon=True).start()
sys.exit(serve(lab, port=port))
"""


def test_serve_queues_the_demo_and_answers_at_once_without_torch(lab_dir):
    """A fresh lab's first `weightsmith serve` queues the demo's pretrain job and answers
    (HTTP 200) at once: the demo is trained by the job, never inside the server, which never
    imports torch."""
    import subprocess
    import sys

    from tests.conftest import REPO, cli_env

    lab_dir.mkdir(parents=True)
    out = subprocess.run([sys.executable, "-c", SERVE_AND_PROBE, str(lab_dir)],
                         capture_output=True, text=True, timeout=240, cwd=REPO,
                         env=cli_env(lab_dir))
    assert out.returncode == 0, out.stderr
    (seen,) = [json.loads(line) for line in out.stdout.splitlines()
               if line.startswith('{"heavy"')]  # Gradio prints its own lines at close
    assert seen["heavy"] == []
    assert seen["jobs"] == [["pretrain", "queued", "demo"]]
    assert "auto_eval = true" in (lab_dir / "lab.toml").read_text()  # a new demo lab


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


def test_the_servers_demo_thread_queues_the_skills_once_the_base_exists(lab, tiny_model_dir):
    """What `serve` runs in its demo thread: nothing while the base's job is queued, the two
    skill fine-tunes once that job registered the base: on its checkpoint, never on an older
    row that holds the name demo-base but lost its files."""
    import threading

    from app import jobs
    from app.demo import SKILLS, build_demo, queue_skills_when_built

    with lab.registry() as reg:  # a stale row: its files are gone, so the demo is rebuilt
        stale = reg.add_checkpoint(name="demo-base", relation="pretrain", path=None)
    job_id = build_demo(lab, pretrain_steps=2, log=lambda m: None)["job"]
    assert build_demo(lab, log=lambda m: None)["job"] == job_id  # queued once
    stop, said = threading.Event(), []
    waiter = threading.Thread(target=queue_skills_when_built, args=(lab, job_id, stop),
                              kwargs={"log": said.append, "poll": 0.1})
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive() and said == []  # the base's job is still queued
    with lab.registry() as reg:  # what the job registers when it ends
        built = reg.add_checkpoint(name="demo-base", relation="pretrain",
                                   path=str(tiny_model_dir), job_id=job_id)
    waiter.join(30)
    assert not waiter.is_alive() and len(said) == 2
    with lab.registry() as reg:
        trains = [j for j in reg.jobs() if j["plugin"] == "train"]
    assert sorted(json.loads(j["config"])["name"] for j in trains) == sorted(SKILLS)
    assert {json.loads(j["config"])["checkpoint"] for j in trains} == {built["id"]}
    assert built["id"] != stale["id"]
    jobs.cancel(lab, job_id)
