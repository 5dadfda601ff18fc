"""`nodes` on train and continue_pretrain (issue 22 item 4), without a cluster: the field and
its form, the refusal at submit on the local executor, what the scheduler hands the engine,
the sbatch options and what the Ray executor asks of Ray, the srun, node and accelerate
command lines, and a worker that is not where several nodes can run. A job really spanning
two Slurm nodes runs in tests/test_cluster_slurm.py, two Ray nodes in
tests/test_cluster_ray_nodes.py."""

import subprocess

import pytest

import plugins
from app import forms, jobs
from app.executors import EngineState, Executor, Needs, Submission
from plugins import ConfigError
from tests.test_train import arithmetic_rows, write_jsonl


def _config(tiny_model_dir, tmp_path, **changes):
    data = write_jsonl(tmp_path / "rows.jsonl", arithmetic_rows(8))
    return {"checkpoint": str(tiny_model_dir), "data": str(data), "max_steps": 2, **changes}


def _lab(lab_dir, monkeypatch, executor):
    from app.lab import Lab

    monkeypatch.setenv("WEIGHTSMITH_EXECUTOR", executor)
    return Lab(lab_dir)


def test_several_nodes_are_refused_at_submit_on_the_local_executor_and_nothing_is_queued(
        lab_dir, tiny_model_dir, tmp_path, monkeypatch):
    config = _config(tiny_model_dir, tmp_path, nodes=2)
    lab = _lab(lab_dir, monkeypatch, "local")
    for plugin in ("train", "continue_pretrain"):
        with pytest.raises(ConfigError) as raised:
            jobs.submit(lab, plugin, config)
        assert "field 'nodes': got 2; several nodes need the slurm or ray executor (lab " \
               "setting executor)" in str(raised.value), (plugin, str(raised.value))
    with lab.registry() as reg:
        assert reg.jobs(limit=10) == []
    for executor in ("slurm", "ray"):
        lab = _lab(lab_dir, monkeypatch, executor)
        job = jobs.submit(lab, "train", config)  # queued: the scheduler hands it over
        assert job["status"] == "queued"
        jobs.submit(lab, "train", {**config, "cpu_processes": 2})  # 2 on each node: 4 in all


def test_nodes_outside_1_to_64_name_the_field(lab, tiny_model_dir, tmp_path):
    for bad in (0, 65):
        with pytest.raises(ConfigError, match=f"field 'nodes': got {bad}; expected"):
            jobs.submit(lab, "train", _config(tiny_model_dir, tmp_path, nodes=bad))
    config = plugins.validate_config(plugins.get("train"), _config(tiny_model_dir, tmp_path))
    assert config.nodes == 1 and plugins.get("train").needs(config).nodes == 1


def test_the_nodes_field_is_advanced_and_shows_on_gpu_and_cpu_labs():
    for name in ("train", "continue_pretrain"):
        specs = forms.form_spec(plugins.get(name).Config)
        (spec,) = [s for s in forms.leaves(specs) if s.path == "nodes"]
        assert spec.advanced, name
        values = forms.config_to_values(specs, {"checkpoint": "ck", "data": "d.jsonl",
                                                "nodes": 3})
        for gpu_lab in (True, False):
            hidden = forms.hidden_paths(specs, values, gpu_lab=gpu_lab)
            assert "nodes" not in hidden
            assert forms.values_to_config(specs, values, hidden)["nodes"] == 3


class Recorder(Executor):
    """An engine that takes every job and keeps its submission."""

    name = "slurm"

    def __init__(self):
        self.submitted: list[Submission] = []

    def submit(self, sub):
        self.submitted.append(sub)
        return f"{sub.job_id}@{len(self.submitted)}"

    def state(self, engine_id):
        return EngineState("running")

    def stop(self, engine_id):
        pass


def test_the_scheduler_hands_the_engine_the_nodes(lab_dir, tiny_model_dir, tmp_path,
                                                  monkeypatch):
    import app.executors
    from tests.test_remote_worker import scheduler_for

    monkeypatch.setenv("WEIGHTSMITH_CLUSTER_GPUS", "false")
    lab = _lab(lab_dir, monkeypatch, "slurm")
    engine = Recorder()
    monkeypatch.setattr(app.executors, "executor_for", lambda settings, name=None: engine)
    jobs.submit(lab, "train", _config(tiny_model_dir, tmp_path, nodes=3, cpu_processes=2))
    jobs.submit(lab, "train", _config(tiny_model_dir, tmp_path))
    scheduler = scheduler_for(lab)
    try:
        scheduler.tick()
    finally:
        scheduler.release()
    assert [(s.needs.nodes, s.needs.cpus, s.needs.gpus) for s in engine.submitted] == \
        [(3, 2, 0), (1, 1, 0)]  # CPUs per node


def _sbatch_argv(monkeypatch, needs: Needs) -> list[str]:
    from app.executors.slurm import SlurmExecutor

    seen = []

    def run(self, argv, what, stdin=None):
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="42\n", stderr="")

    monkeypatch.setattr(SlurmExecutor, "_run", run)
    assert SlurmExecutor().submit(Submission("job-1", ["true"], cwd="/lab/jobs/job-1",
                                             needs=needs)) == "job-1@42"
    return seen[0]


def test_sbatch_asks_for_the_nodes_one_task_on_each(monkeypatch):
    argv = _sbatch_argv(monkeypatch, Needs(gpus=2, cpus=3, nodes=4, memory_bytes=1 << 30))
    for option in ("--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=3", "--gres=gpu:2",
                   "--mem=1024M"):  # the last three: on each node
        assert option in argv, (option, argv)
    one = _sbatch_argv(monkeypatch, Needs(cpus=2))
    assert not [a for a in one if a.startswith(("--nodes", "--ntasks"))], one


def test_ray_submits_a_job_of_several_nodes_reserving_nothing_for_its_entrypoint(
        monkeypatch):
    """The entrypoint (the launching worker) reserves no CPU, GPU or memory: the placement
    group's bundles, one per node, need them (app/executors/ray.py submit); and Ray's
    supervisor gives it the grace plus a margin to stop every node before its SIGKILL."""
    from app.executors.ray import NODES_STOP_MARGIN_S, RayExecutor

    seen = []

    class Client:
        def submit_job(self, **kwargs):
            seen.append(kwargs)
            return kwargs["submission_id"]

    ray = RayExecutor("http://127.0.0.1:1")
    monkeypatch.setattr(ray, "_connect", lambda: Client())
    sub = Submission("job-1", ["true"], needs=Needs(nodes=2, cpus=3, gpus=1,
                                                    memory_bytes=1 << 30), stop_grace_s=10)
    assert ray.submit(sub) == "job-1"
    (kwargs,) = seen
    assert not [k for k in kwargs if k.startswith("entrypoint_num") or k == "entrypoint_memory"]
    assert kwargs["runtime_env"]["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == \
        str(10 + NODES_STOP_MARGIN_S)
    ray.submit(Submission("job-2", ["true"], needs=Needs(cpus=3, gpus=1), stop_grace_s=10))
    assert seen[1]["entrypoint_num_cpus"] == 3 and seen[1]["entrypoint_num_gpus"] == 1
    assert seen[1]["runtime_env"]["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "10"


def test_the_srun_and_accelerate_command_lines_for_two_nodes(tmp_path, monkeypatch):
    from accelerate.commands.launch import launch_command_parser

    from app.worker import arguments, launch_command, node_command, node_launch_command

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    srun = node_launch_command("job-1", tmp_path, 2, 3, "fsdp", "10.0.0.7", 29411)
    assert srun[:7] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                        "--kill-on-bad-exit=1", "--export=ALL", "--cpus-per-task=3"]
    args = arguments().parse_args(srun[srun.index("app.worker") + 1:])
    assert args.node_launch and args.remote and not args.rank
    assert (args.nodes, args.processes, args.distributed, args.main_address,
            args.main_port) == (2, 3, "fsdp", "10.0.0.7", 29411)

    cmd = launch_command("job-1", tmp_path, 3, "fsdp", remote=True, machines=2,
                         machine_rank=1, main_address="10.0.0.7", main_port=29411)
    parsed = launch_command_parser().parse_args(cmd[3:])
    assert parsed.num_processes == 6 and parsed.num_machines == 2  # accelerate: all machines'
    assert parsed.machine_rank == 1 and parsed.main_process_ip == "10.0.0.7"
    assert parsed.main_process_port == 29411 and parsed.use_fsdp
    assert parsed.training_script_args[-2:] == ["--rank", "--remote"]
    one = launch_command("job-1", tmp_path, 2)
    assert one[one.index("--num_machines") + 1] == "1" and "--machine_rank" not in one
    # on Ray, the node's machine rank is an argument (no SLURM_PROCID there)
    node = node_command("job-1", tmp_path, 2, 1, "ddp", "10.0.0.7", 29411, machine_rank=1)
    args = arguments().parse_args(node[node.index("app.worker") + 1:])
    assert args.node_launch and args.remote and args.machine_rank == 1
    assert arguments().parse_args(srun[srun.index("app.worker") + 1:]).machine_rank is None


def test_a_worker_outside_a_fitting_slurm_job_refuses_nodes(tmp_path, monkeypatch, capsys):
    from app.worker import node_launch, slurm_main_node

    for key in ("SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="field 'nodes': got 2; this job's worker runs on "
                                         "the slurm executor .* not in a Slurm job"):
        slurm_main_node(2)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n1")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    with pytest.raises(ValueError, match=r"field 'nodes': got 2, and this job's Slurm "
                                         r"allocation has 1 nodes \(n1\)"):
        slurm_main_node(2)
    # a node that does not see the job folder says so (in the job log, through srun)
    assert node_launch(tmp_path / "lab", "job-1", 2, 1, "ddp", "n1", 1) == 2
    assert "cannot see the lab's job folder" in capsys.readouterr().err
    # a machine rank given (Ray) that is not one of the job's nodes'
    (tmp_path / "lab" / "jobs" / "job-1").mkdir(parents=True)
    (tmp_path / "lab" / "jobs" / "job-1" / "registry-snapshot-ranks.db").write_bytes(b"")
    assert node_launch(tmp_path / "lab", "job-1", 2, 1, "ddp", "n1", 1, machine_rank=2) == 2
    assert "--machine-rank is 2; expected 0 to 1" in capsys.readouterr().err
