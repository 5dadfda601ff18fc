"""Jobs as several data-parallel processes: the scheduler gives a job N GPUs at once, the
worker relaunches it through `accelerate launch`, and only rank 0 records anything. On CPU the
same path runs as DDP over gloo (`cpu_processes`), tested end to end on a tiny model."""

import json
import time

import pytest
import torch

from app import jobs
from app.scheduler import Scheduler, device_list, visible_devices
from app.worker import launch_command
from plugins import ConfigError
from tests.test_train import arithmetic_rows, base_config, run_job, write_jsonl


def test_launch_command_for_ddp_and_fsdp(tmp_path):
    ddp = launch_command("job-1234abcd", tmp_path, 4)
    assert ddp[1:3] == ["-m", "accelerate.commands.launch"]
    assert ddp[ddp.index("--num_processes") + 1] == "4" and "--multi_gpu" in ddp
    assert ddp[ddp.index("--module"):] == ["--module", "app.worker", "job-1234abcd", "--lab",
                                           str(tmp_path), "--rank"]
    fsdp = launch_command("job-1234abcd", tmp_path, 2, "fsdp")
    assert "--multi_gpu" not in fsdp and "--use_fsdp" in fsdp
    assert fsdp[fsdp.index("--fsdp_state_dict_type") + 1] == "FULL_STATE_DICT"
    from accelerate.commands.launch import launch_command_parser

    parsed = launch_command_parser().parse_args(fsdp[3:])  # accelerate accepts every flag
    assert parsed.use_fsdp and parsed.num_processes == 2 and parsed.module
    assert parsed.training_script == "app.worker" and parsed.training_script_args[-1] == "--rank"


def test_device_strings():
    assert device_list("cuda:0,2") == ["cuda:0", "cuda:2"] and device_list("cpu") == ["cpu"]
    assert visible_devices("cuda:0,2") == "0,2" and visible_devices("cuda:1") == "1"
    assert visible_devices("cpu") == ""


def test_the_scheduler_gives_a_job_its_gpus_at_once(lab, tiny_model_dir, tmp_path):
    (lab.root / "lab.toml").write_text("gpus = [0, 1, 2]\n")
    from app.lab import Lab

    lab = Lab(lab.root)
    data = write_jsonl(tmp_path / "colors.jsonl", arithmetic_rows(8))
    config = base_config(tiny_model_dir, data, method="full")
    two = [jobs.submit(lab, "train", {**config, "gpus": 2})["id"] for _ in range(2)]
    one = jobs.submit(lab, "train", config)["id"]
    with pytest.raises(ConfigError, match=r"field 'gpus': got 4; the job needs 4 GPUs, and "
                                          r"this lab has 3 \(0, 1, 2\)"):
        jobs.submit(lab, "train", {**config, "gpus": 4})
    with pytest.raises(ConfigError, match="field 'cpu_processes': got 2; this lab has GPUs"):
        jobs.submit(lab, "continue_pretrain", {"checkpoint": str(tiny_model_dir),
                                               "data": str(data), "cpu_processes": 2})
    scheduler = Scheduler(lab)
    started = []
    scheduler.start = lambda job, device: started.append((job["id"], device)) or True
    scheduler._start_queued(None)
    # the first 2-GPU job takes cuda:0,1; the second waits for two, and the 1-GPU job queued
    # after it does not take the last GPU from under it
    assert started == [(two[0], "cuda:0,1")]
    assert scheduler._free_slot(True, __import__("collections").Counter(
        {"cuda:0": 1, "cuda:1": 1}), 2) is None
    with lab.registry() as reg:
        assert [reg.job(j)["status"] for j in two + [one]] == ["queued"] * 3


def test_a_multi_gpu_job_sees_exactly_its_gpus(lab, tmp_path, monkeypatch):
    """Real workers on pretend GPUs: CUDA_VISIBLE_DEVICES lists the job's GPUs, and a GPU held
    by one job is never given to another."""
    from app.lab import Lab
    from tests.conftest import TEST_PLUGINS, wait_for

    monkeypatch.setenv("WEIGHTSMITH_PLUGINS",
                       TEST_PLUGINS + ",tests.plugins_for_distributed:MULTI_GPU_SLEEPER")
    monkeypatch.setenv("WEIGHTSMITH_GPUS", "0,1,2")
    __import__("plugins").discover(refresh=True)
    lab = Lab(lab.root)
    sleep = {"seconds": 60}
    submitted = [jobs.submit(lab, "test_multi_gpu_sleep", {**sleep, "gpus": 2,
                                                          "pid_file": str(tmp_path / "a")}),
                 jobs.submit(lab, "test_gpu_sleep", {**sleep, "pid_file": str(tmp_path / "b")}),
                 jobs.submit(lab, "test_multi_gpu_sleep", {**sleep, "gpus": 2,
                                                          "pid_file": str(tmp_path / "c")})]
    scheduler = Scheduler(lab, poll_seconds=0.1)
    assert scheduler.acquire()
    try:
        scheduler.tick()
        with lab.registry() as reg:
            rows = [reg.job(j["id"]) for j in submitted]
        assert [(r["status"], r["device"]) for r in rows] == [
            ("running", "cuda:0,1"), ("running", "cuda:2"), ("queued", None)]
        for name, expected in (("a", "0,1"), ("b", "2")):
            wait_for(lambda: (tmp_path / f"{name}.env").exists(), 60, what=f"worker {name}")
            assert (tmp_path / f"{name}.env").read_text() == expected
        jobs.cancel(lab, submitted[1]["id"])
        scheduler.tick()  # one GPU free: not enough for the waiting 2-GPU job
        with lab.registry() as reg:
            assert reg.job(submitted[2]["id"])["status"] == "queued"
        jobs.cancel(lab, submitted[0]["id"])
        scheduler.tick()
        with lab.registry() as reg:
            assert reg.job(submitted[2]["id"])["device"] == "cuda:0,1"
    finally:
        for j in submitted:
            jobs.cancel(lab, j["id"])
        scheduler.tick()
        scheduler.release()


def test_more_gpus_than_a_gpu_less_lab_has_is_a_config_error(lab, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="field 'gpus': got 2; the job needs 2 GPUs, and this "
                                          "lab has none"):
        jobs.submit(lab, "train", base_config(tiny_model_dir, tmp_path, gpus=2))
    with pytest.raises(ConfigError, match="distributed fsdp runs on GPUs"):
        jobs.submit(lab, "train", base_config(tiny_model_dir, tmp_path, cpu_processes=2,
                                              distributed="fsdp"))


def test_the_other_ranks_record_nothing(lab, tiny_model_dir):
    import sqlite3

    from app.worker import RankContext

    job = jobs.submit(lab, "merge_adapter", {"adapter": str(tiny_model_dir)})
    reg = lab.registry()
    reg.db.conn.execute("PRAGMA query_only = ON")  # as run_rank opens it for ranks 1..N-1
    try:
        ctx = RankContext(lab, reg, reg.job(job["id"]))
        ctx.rank, ctx.world_size = 1, 2
        assert not ctx.is_main_process
        ctx.log("x")
        ctx.metric("loss", 1.0, step=1)
        ctx.progress(0.5, "half")
        assert list(ctx.progress([1, 2], "items")) == [1, 2]
        pending = ctx.new_checkpoint("finetune", parents=[], name="n")
        assert pending.path.parent == lab.job_dir(job["id"]) / "rank1"
        with pytest.raises(RuntimeError, match="may not register checkpoints"):
            ctx.publish(pending)
        with pytest.raises(RuntimeError, match="only rank 0 may import"):
            ctx.open(str(tiny_model_dir))  # not registered yet: the launcher imports first
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reg.add_metric(name="loss", value=1.0, step=1, job_id=job["id"])
        assert ctx.publish_all() == [] and not pending.path.parent.exists()
    finally:
        reg.close()
    with lab.registry() as reg:
        assert reg.metrics(job["id"]) == [] and reg.job(job["id"])["progress"] in (None, 0)
        assert reg.list_checkpoints() == []


def test_two_cpu_processes_train_once_and_register_once(lab, tiny_model_dir, tmp_path):
    """A full fine-tune as 2 DDP processes over gloo, through submit, the scheduler, the worker
    and accelerate launch: one checkpoint per save, one metric per logging step."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "colors.jsonl", arithmetic_rows())
    config = base_config(tiny_model_dir, data, method="full", max_steps=6, batch_size=4,
                         logging_steps=2, save_steps=3, learning_rate=1e-3,
                         eval_fraction=0.25, cpu_processes=2)
    started = time.monotonic()
    status, job, made = run_job(lab, config)
    seconds = time.monotonic() - started
    log = open(job["log_path"]).read()
    assert status == "succeeded", job["error"] + log[-3000:]
    assert "launching 2 processes (ddp)" in log and "--multi_gpu" in log
    assert log.count("running as rank") == 1  # rank 1 writes no job log lines
    names = sorted(c["name"] for c in made)
    # the save at the last step is the final model, registered once (not also as -step6)
    assert names == ["tiny-llama-full", "tiny-llama-full-step3"], names
    final = next(c for c in made if c["name"] == "tiny-llama-full")
    meta = json.loads(final["metadata"])
    assert meta["steps"] == 6 and meta["processes"]["count"] == 2
    with lab.registry() as reg:
        metrics = reg.metrics(job["id"])
        assert len(reg.job_checkpoints(job["id"])) == 2
    for name in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
        steps = [m["step"] for m in metrics if m["name"] == name]
        assert steps == [2, 4, 6], (name, steps)  # once per logging step, not once per rank
    assert [m["step"] for m in metrics if m["name"] == "eval_loss"] == [6]
    assert not list((lab.root / "checkpoints").glob(".tmp-*"))
    assert not (lab.root / "jobs" / job["id"] / "rank1").exists()  # rank 1's scratch is gone

    model = AutoModelForCausalLM.from_pretrained(final["path"]).eval()
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(f"{final['path']}/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()

    # 2 processes x 4 examples take the same steps as 1 process x 8: the same global batches
    started = time.monotonic()
    status, job, made = run_job(lab, {**config, "cpu_processes": 1, "batch_size": 8,
                                      "name": "one"})
    one_seconds = time.monotonic() - started
    assert status == "succeeded", job["error"]
    one = next(c for c in made if c["name"] == "one")
    assert json.loads(one["metadata"])["final_train_loss"] == pytest.approx(
        meta["final_train_loss"], rel=1e-5)
    single = load_file(f"{one['path']}/model.safetensors")
    assert all(torch.allclose(after[k], single[k], atol=1e-5) for k in after)
    print(f"2 CPU processes: {seconds:.1f} s; 1 process: {one_seconds:.1f} s")


def test_two_cpu_processes_continue_pretrain_serve_the_mix_once(lab, tiny_model_dir, tmp_path):
    """continue_pretrain as 2 processes: the ranks draw their batches in turn from one
    ordered stream, so the replay share and the stability-gap curve are those of one process."""
    from tests.conftest import REPO

    heldout = REPO / "assets" / "demo" / "heldout.txt"
    config = {"checkpoint": str(tiny_model_dir), "data": str(heldout),
              "replay_data": str(heldout), "replay_ratio": 0.25, "block_size": 32,
              "max_steps": 4, "batch_size": 4, "eval_steps": 2, "eval_blocks": 4,
              "logging_steps": 2, "save_steps": 0, "cpu_processes": 2}
    status, job, made = run_job(lab, config, plugin="continue_pretrain")
    assert status == "succeeded", job["error"]
    (ck,) = made
    meta = json.loads(ck["metadata"])
    assert meta["served"] == {"domain": 24, "replay": 8}  # 4 steps x 2 processes x 4 blocks
    with lab.registry() as reg:
        metrics = reg.metrics(job["id"])
        scores = reg.evaluations(ck["id"])
    for name in ("domain_ppl", "general_ppl"):
        assert [m["step"] for m in metrics if m["name"] == name] == [0, 2, 4]
    assert [m["step"] for m in metrics if m["name"] == "loss"] == [2, 4]
    assert len([s for s in scores if s["task"] == "cpt:domain"]) == 1


def test_stop_ends_every_process_of_a_launched_job(lab, tiny_model_dir, tmp_path):
    import psutil

    from tests.conftest import wait_for

    data = write_jsonl(tmp_path / "colors.jsonl", arithmetic_rows())
    job = jobs.submit(lab, "train", base_config(tiny_model_dir, data, method="full",
                                                max_steps=5000, logging_steps=1,
                                                save_steps=2, cpu_processes=2))
    scheduler = Scheduler(lab, poll_seconds=0.05)
    assert scheduler.acquire()
    try:
        def training():
            scheduler.tick()
            with lab.registry() as reg:
                return reg.job_checkpoints(job["id"]) and reg.job(job["id"])["pid"]
        pid = wait_for(training, 120, interval=0.1, what="the first intermediate checkpoint")
        tree = [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
        ranks = [p for p in psutil.Process(pid).children(recursive=True)
                 if "app.worker" in p.cmdline()
                 and "accelerate.commands.launch" not in p.cmdline()]
        assert len(ranks) == 2, tree
        jobs.cancel(lab, job["id"])
        wait_for(lambda: not [p for p in tree if psutil.pid_exists(p) and
                              psutil.Process(p).status() != psutil.STATUS_ZOMBIE],
                 30, what="every process of the job to end")
        scheduler.tick()
    finally:
        scheduler.release()
    with lab.registry() as reg:
        assert reg.job(job["id"])["status"] == "cancelled"
        kept = reg.job_checkpoints(job["id"])
    assert kept  # the intermediate checkpoints published before the stop stay registered
    assert not list((lab.root / "checkpoints").glob(".tmp-*"))


def test_a_failing_rank_fails_the_job_with_its_own_error(lab, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "b"}] * 8)
    status, job, made = run_job(lab, base_config(tiny_model_dir, data, cpu_processes=2))
    assert status == "failed" and made == []
    assert job["error"].startswith("ValueError: data: found none of the columns 'messages'")
    assert not list((lab.root / "checkpoints").glob(".tmp-*"))
