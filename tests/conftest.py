import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_PLUGINS = ",".join(f"tests.plugins_for_tests:{name}"
                        for name in ("SLEEPER", "GPU_SLEEPER", "CRASHER", "COPIER"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (2 layers, hidden 32) and its BPE tokenizer, built locally in a temp dir."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def build_tiny_model(out: Path) -> Path:
    """tiny_model_dir's model, saved at `out` (bench/executor.py builds it too)."""
    from ops.tiny_llama import build_llama, llama_config, train_bpe_tokenizer

    text = (REPO / "assets" / "demo" / "heldout.txt").read_text()
    tokenizer = train_bpe_tokenizer(text.split("\n\n"), vocab_size=400)
    config = llama_config(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=64, max_positions=256)
    model = build_llama(config, seed=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The real demo model (what `weightsmith demo` builds: 3.3M parameters, 300 steps, about
    two minutes on 2 cores), for the tests whose claims are about the demo model itself. Built
    the way the app builds it: the demo's `pretrain` job, run by a scheduler pass."""
    from app.demo import build_demo
    from app.lab import Lab
    from app.scheduler import Scheduler

    root = tmp_path_factory.mktemp("demo") / "lab"
    root.mkdir()
    (root / "lab.toml").write_text("auto_eval = false\n")  # the model only
    lab = Lab(root)
    job_id = build_demo(lab, log=lambda message: None)["job"]
    scheduler = Scheduler(lab, poll_seconds=0.5)
    assert scheduler.acquire()
    try:
        def done():
            scheduler.tick(only=job_id)
            with lab.registry() as reg:
                job = reg.job(job_id)
            return job if job["status"] not in ("queued", "running") and \
                not scheduler.children else None

        job = wait_for(done, 1200, interval=0.5, what="the demo's pretrain job")
    finally:
        scheduler.release()
    assert job["status"] == "succeeded", job["error"]
    with lab.registry() as reg:
        (ck,) = reg.job_checkpoints(job_id)
        return Path(reg.checkpoint(ck)["path"])


@pytest.fixture
def lab_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "lab"
    monkeypatch.setenv("WEIGHTSMITH_LAB", str(path))
    monkeypatch.setenv("WEIGHTSMITH_PLUGINS", TEST_PLUGINS)
    monkeypatch.setenv("WEIGHTSMITH_CANCEL_GRACE_SECONDS", "3")
    import plugins

    plugins.discover(refresh=True)
    return path


@pytest.fixture
def lab(lab_dir):
    from app.lab import Lab

    return Lab(lab_dir)


def cli_env(lab_dir: Path) -> dict:
    env = dict(os.environ)
    env["WEIGHTSMITH_LAB"] = str(lab_dir)
    env["WEIGHTSMITH_PLUGINS"] = TEST_PLUGINS
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_cli(lab_dir: Path, *args, timeout=300, check=False,
            input_text: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env=cli_env(lab_dir), cwd=str(REPO), input=input_text)
    if check and proc.returncode != 0:
        raise AssertionError(f"weightsmith {' '.join(map(str, args))} exited "
                             f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def wait_for(predicate, timeout=60.0, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path
