"""Plugins that exist only for the tests: loaded through WEIGHTSMITH_PLUGINS, exactly as a
third-party plugin under development would be."""

import shutil
import subprocess
import time
from pathlib import Path

from pydantic import Field

from plugins import CheckpointRef, DataRef, Plugin, PluginConfig


class SleepConfig(PluginConfig):
    seconds: float = Field(60.0, ge=0, description="How long to sleep.")
    pid_file: str = Field(description="Where to write the worker and grandchild pids.")


def sleep_run(config, ctx):
    # A partial checkpoint and a grandchild process: cancel must remove/kill both.
    partial = ctx.new_checkpoint("finetune", parents=[])
    (partial.path / "half-written.bin").write_bytes(b"x" * 1000)
    child = subprocess.Popen(["sleep", "600"])
    import os

    Path(config.pid_file + ".env").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
    Path(config.pid_file).write_text(f"{os.getpid()} {child.pid}")
    ctx.log("sleeping")
    for i in ctx.progress(range(int(config.seconds * 10)), "sleeping"):
        time.sleep(0.1)
    child.kill()
    ctx.discard_all()


class CrashConfig(PluginConfig):
    message: str = Field("boom", description="Text of the error to raise.")


def crash_run(config, ctx):
    partial = ctx.new_checkpoint("finetune", parents=[])
    (partial.path / "config.json").write_text("{}")
    ctx.log("about to crash: MARKER-LAST-LINE")
    raise RuntimeError(config.message)


class CopyConfig(PluginConfig):
    source: CheckpointRef = Field(description="Checkpoint to copy.")
    name: str = Field("copy", description="Name of the copy.")


def copy_run(config, ctx):
    src = ctx.open(config.source)
    out = ctx.new_checkpoint("finetune", parents=[{"checkpoint": src, "weight": 1.0}],
                             name=config.name)
    for f in src.path.iterdir():
        shutil.copy(f, out.path / f.name)
    ctx.metric("copied_files", len(list(src.path.iterdir())))


SLEEPER = Plugin(name="test_sleep", title="Sleep", description="Sleeps (tests).",
                 Config=SleepConfig, run=sleep_run, uses_gpu=False)
GPU_SLEEPER = Plugin(name="test_gpu_sleep", title="Sleep on a GPU",
                     description="Sleeps on a GPU slot (tests).", Config=SleepConfig,
                     run=sleep_run, uses_gpu=True)
CRASHER = Plugin(name="test_crash", title="Crash", description="Crashes (tests).",
                 Config=CrashConfig, run=crash_run, uses_gpu=False)
COPIER = Plugin(name="test_copy", title="Copy", description="Copies a checkpoint (tests).",
                Config=CopyConfig, run=copy_run, uses_gpu=False)


class LeakConfig(PluginConfig):
    message: str = Field("download failed", description="Text of the error to raise.")


def leak_run(config, ctx):
    # Like a library error that echoes a request: the Hub token in a log line, on stderr, in
    # a traceback and in the job's error. None of it may reach the log or jobs.error.
    import os
    import sys

    token = os.environ.get("HF_TOKEN", "")
    ctx.log(f"GET /api/models with Authorization: Bearer {token}")
    print(f"stderr says {token}", file=sys.stderr, flush=True)
    raise RuntimeError(f"{config.message}: 401 for token {token}")


LEAKER = Plugin(name="test_leak", title="Leak", description="Echoes the Hub token (tests).",
                Config=LeakConfig, run=leak_run, uses_gpu=False)


class DrawConfig(PluginConfig):
    out: str = Field(description="Where to write the draws (JSON).")


def draw_run(config, ctx):
    # What a job that forgets to seed would draw: a forked worker must not repeat another's.
    import json
    import random

    import numpy
    import torch

    Path(config.out).write_text(json.dumps({"random": random.random(),
                                            "numpy": float(numpy.random.random()),
                                            "torch": float(torch.rand(1))}))


DRAWER = Plugin(name="test_draw", title="Draw", description="Draws random numbers (tests).",
                Config=DrawConfig, run=draw_run, uses_gpu=False)


class SelectConfig(PluginConfig):
    pool: DataRef = Field(description="Rows to select from (JSON lines).")
    keep: int = Field(2, ge=1, le=1000, description="How many of the first rows to keep.")
    suggest_copy_of: str = Field("", description="A checkpoint to suggest copying next.")
    suggest_plugin: str = Field("test_copy", description="The plugin of the suggestion.")


def select_run(config, ctx):
    rows = Path(config.pool).read_text().splitlines()[:config.keep]
    out = ctx.work_dir / "selected.jsonl"
    out.write_text("".join(r + "\n" for r in rows))
    made = ctx.new_dataset(out, f"first {config.keep}", metadata={"keep": config.keep})
    ctx.metric("kept", len(rows))
    if config.suggest_copy_of:
        ctx.suggest(config.suggest_plugin, {"source": config.suggest_copy_of, "name": "suggested-copy"},
                    label=f"copy of {config.suggest_copy_of} (from {made['id']})")


SELECTOR = Plugin(name="test_select", title="Select", description="Keeps the first rows "
                  "of a data file as a new dataset (tests).", Config=SelectConfig,
                  run=select_run, uses_gpu=False)
