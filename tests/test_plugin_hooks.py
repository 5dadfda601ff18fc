"""The typed hooks on the Plugin record: what the app reads from them, and what register()
refuses."""

import pytest
from pydantic import Field

import plugins
from plugins import LabFacts, NextStep, Plugin, PluginConfig, PluginError, Resources


class _Config(PluginConfig):
    resume_job: str | None = Field(None, description="job to continue")
    gpus: int = Field(1, description="gpus")


def _plugin(**hooks) -> Plugin:
    return Plugin(name="test_hooks", title="Hooks", description="Hooks (tests).",
                  Config=_Config, run=lambda config, ctx: None, **hooks)


def test_processes_follow_the_placement_only_for_a_data_parallel_job():
    spread = Resources(gpus=2)  # one process using both GPUs (a model spread over them)
    assert spread.processes("cuda:0,1") == 1 and spread.processes("cpu") == 1
    assert Resources(gpus=2, data_parallel=True).processes("cuda:0,1") == 2
    assert Resources(data_parallel=True, cpu_processes=3).processes("cpu") == 3
    with pytest.raises(ValueError, match="cpu_processes: got 3"):
        Resources(gpus=1, data_parallel=True, cpu_processes=3).processes("cuda:0")


def test_hooks_default_to_nothing_and_are_read_from_the_record():
    config = _Config()
    bare = _plugin()
    assert bare.needs(config) == Resources()
    assert bare.paths_referenced(config) == [] and bare.problems_in_lab(config, LabFacts()) == []
    hooked = _plugin(resources=lambda c: Resources(gpus=c.gpus),
                     referenced_paths=lambda c: [("models[0]", "/x")],
                     lab_problems=lambda c, facts: [f"field 'gpus': lab has {facts.gpus}"])
    assert hooked.needs(_Config(gpus=3)).gpus == 3
    assert hooked.paths_referenced(config) == [("models[0]", "/x")]
    assert hooked.problems_in_lab(config, LabFacts(gpus=(0, 1))) == ["field 'gpus': lab has (0, 1)"]


@pytest.mark.parametrize("hooks, message", [
    ({"resume_field": "resume_from"}, "resume_field 'resume_from' is not a field"),
    ({"resources": 3}, "resources must be callable"),
    ({"per_layer_series": (1,)}, "per_layer_series must be metadata key names"),
    ({"next_steps": {"prune": ("train", "hint")}}, "next_steps maps a relation name"),
])
def test_register_refuses_a_malformed_hook(hooks, message):
    with pytest.raises(PluginError, match=message):
        plugins.register(_plugin(**hooks))
    assert "test_hooks" not in plugins.discover()


def test_the_built_in_plugins_declare_their_hooks():
    found = plugins.discover()
    assert found["train"].resume_field == "resume_job"
    assert found["continue_pretrain"].resume_field == "resume_job"
    assert found["merge"].referenced_paths is not None
    assert found["evaluate"].lab_problems is not None
    assert found["prune"].per_layer_series == ("sparsity_per_layer",)
    assert isinstance(found["scale_layers"].next_steps["scale"], NextStep)
    train = found["train"]
    qlora = train.Config(checkpoint="x", data="d.jsonl", method="qlora")
    assert train.needs(qlora).requires_gpu[0] == "method"
    multi = train.Config(checkpoint="x", data="d.jsonl", gpus=2)
    assert train.needs(multi).gpus == 2 and train.needs(multi).processes("cuda:0,1") == 2
    cpu = train.Config(checkpoint="x", data="d.jsonl", cpu_processes=2)
    assert train.problems_in_lab(cpu, LabFacts(gpus=(0,)))[0].startswith(
        "field 'cpu_processes'")
    assert train.problems_in_lab(cpu, LabFacts()) == []


def test_submit_reads_the_hooks_of_the_plugin_submitted_to(lab_dir, monkeypatch):
    """Two plugins may share a Config class: each submit uses its own plugin's hooks. More
    GPUs than a GPU lab has is a field error even without requires_gpu; lab_problems gets
    the lab's facts, and a plugin without that hook never asks for them (no nvidia-smi)."""
    from app import jobs
    from app.lab import Lab

    lab_dir.mkdir(parents=True, exist_ok=True)
    (lab_dir / "lab.toml").write_text("gpus = [0, 1]\n")
    lab = Lab(lab_dir)
    seen = []
    greedy = _plugin(resources=lambda c: Resources(gpus=c.gpus),
                     lab_problems=lambda c, facts: seen.append(facts) or [])
    plain = Plugin(name="test_hooks_plain", title="Plain", description="No hooks (tests).",
                   Config=_Config, run=lambda config, ctx: None)
    plugins.register(greedy)
    plugins.register(plain)
    try:
        with pytest.raises(plugins.ConfigError, match="field 'gpus': got 3; the job needs 3 "
                                                       "GPUs at once, and this lab has 2"):
            jobs.check_config(lab, "test_hooks", {"gpus": 3})
        jobs.check_config(lab, "test_hooks", {"gpus": 2})
        assert seen == [LabFacts(gpus=(0, 1), shared=False, suites_dir=lab.root / "suites")]
        monkeypatch.setattr(jobs, "lab_gpus", lambda lab: pytest.fail("asked for the GPUs"))
        jobs.check_config(lab, "test_hooks_plain", {"gpus": 3})  # its Config, not its hooks
    finally:
        plugins.unregister("test_hooks")
        plugins.unregister("test_hooks_plain")
