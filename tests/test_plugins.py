import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

import plugins
from plugins import ConfigError, Plugin, PluginConfig, PluginError, register, validate_config

REPO = Path(__file__).resolve().parent.parent

# The shared test table: one valid example config per built-in plugin. A new plugin adds a row.
EXAMPLES = {
    "evaluate": {"checkpoint": "ck-12345678", "window": 64, "stride": 32},
    "merge": {"method": "ties", "models": ["ck-11111111", "ck-22222222"],
              "weights": [0.5, 0.5], "density": 0.5, "base_model": "ck-12345678"},
    "prune": {"checkpoint": "ck-12345678", "method": "sparsegpt", "pattern": "2:4",
              "dampening": 0.05},
    "continue_pretrain": {"checkpoint": "ck-12345678", "data": "medical.jsonl",
                          "replay_data": "general.txt", "replay_ratio": 0.25,
                          "new_tokens": ["cardiac"], "max_steps": 50},
    "train": {"checkpoint": "ck-12345678", "data": "data.jsonl", "method": "hft",
              "max_steps": 10, "save_steps": 0},
    "scale_layers": {"checkpoint": "ck-12345678", "method": "widen_mlp",
                     "intermediate_size": 512, "noise": 0.01},
    "merge_adapter": {"adapter": "ck-12345678", "dtype": "float32"},
    "task_vector": {"action": "apply", "target": "ck-12345678", "vectors": ["ck-11111111"],
                    "weights": [0.7], "layer_scales": [0.5, 1.0],
                    "block_scales": {"mlp": 1.2}},
    "pretrain": {"data": "corpus.txt", "vocab_size": 300, "hidden_size": 32, "num_layers": 1,
                 "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64,
                 "max_positions": 64, "steps": 2, "batch_size": 2, "block_length": 32,
                 "name": "tiny-pretrained"},
    "export": {"checkpoint": "ck-12345678", "output_type": "Q4_0", "name": "tiny-q4_0"},
    "merge_search": {"models": ["ck-11111111", "ck-22222222"], "base_model": "ck-12345678",
                     "method": "ties", "density_range": [0.3, 0.9],
                     "fitness": {"demo/capitals/acc": 0.5, "demo/sums/exact_match": 0.5},
                     "max_candidates": 16, "keep_top": 2},
    "mixture_law": {"checkpoint": "ck-12345678", "data": "medical.jsonl",
                    "replay_data": "general.txt", "replay_ratios": [0.1, 0.3, 0.5],
                    "step_grid": [50, 100, 200], "max_general_ppl_increase": 0.05},
    "select_data": {"checkpoint": "ck-12345678", "pool": "pool.jsonl", "targets": "targets.jsonl",
                    "fraction": 0.05, "projection_dim": 1024, "checkpoints": 4,
                    "name": "pool-less"},
}


class GoodConfig(PluginConfig):
    x: int = Field(1, description="An x.")


def make(**kw):
    base = dict(name="good_one", title="Good", description="A plugin.", Config=GoodConfig,
                run=lambda c, ctx: None)
    base.update(kw)
    return Plugin(**base)


@pytest.fixture(autouse=True)
def cleanup():
    yield
    plugins.unregister("good_one")


def test_register_accepts_a_good_record():
    assert register(make()).name == "good_one"


@pytest.mark.parametrize("name", ["Bad", "1abc", "has space", "x", "a-b", "", None])
def test_register_rejects_bad_names(name):
    with pytest.raises(PluginError, match="name"):
        register(make(name=name))


def test_register_rejects_duplicates():
    register(make())
    with pytest.raises(PluginError, match="already registered"):
        register(make())


def test_register_rejects_malformed_records():
    with pytest.raises(PluginError, match="Plugin record"):
        register({"name": "good_one"})
    with pytest.raises(PluginError, match="title"):
        register(make(title=" "))

    class Loose(BaseModel):
        x: int = Field(1, description="x")

    with pytest.raises(PluginError, match="forbid unknown fields"):
        register(make(Config=Loose))

    class Undocumented(PluginConfig):
        x: int = 1

    with pytest.raises(PluginError, match="without a description.*x"):
        register(make(Config=Undocumented))
    with pytest.raises(PluginError, match="pydantic model"):
        register(make(Config=dict))
    with pytest.raises(PluginError, match="callable"):
        register(make(run="not callable"))


def test_broken_plugin_spec_is_reported_not_fatal(monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_PLUGINS", "no_such_module:PLUGIN")
    found = plugins.discover(refresh=True)
    assert "evaluate" in found
    assert any("no_such_module" in e for e in plugins.load_errors())
    monkeypatch.delenv("WEIGHTSMITH_PLUGINS")
    plugins.discover(refresh=True)


def test_discovery_and_app_import_do_not_import_torch():
    code = ("import sys, plugins, app.cli, app.server, app.ui, app.forms, app.jobs, "
            "app.scheduler, registry; "
            "found = plugins.discover(); assert 'evaluate' in found, found; "
            "heavy = [m for m in ('torch', 'transformers', 'gradio') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_builtin_plugins_come_from_the_entry_point_group():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="weightsmith.plugins")}
    assert "evaluate" in names
    assert set(EXAMPLES) <= names


# ----------------------------------------------------------------------- the plugin battery
def builtin():
    found = plugins.discover(refresh=True)
    return [found[name] for name in sorted(EXAMPLES)]


@pytest.mark.parametrize("plugin", builtin(), ids=lambda p: p.name)
class TestEveryPlugin:
    def test_schema_round_trips_as_json(self, plugin):
        schema = plugin.Config.model_json_schema()
        assert json.loads(json.dumps(schema)) == schema
        assert set(schema["properties"]) == set(plugin.Config.model_fields)
        for name, prop in schema["properties"].items():
            assert prop.get("description"), f"{plugin.name}.{name} has no description"

    def test_config_round_trips(self, plugin):
        config = validate_config(plugin, EXAMPLES[plugin.name])
        again = plugin.Config.model_validate_json(config.model_dump_json())
        assert again == config

    def test_unknown_field_is_rejected_by_name(self, plugin):
        with pytest.raises(ConfigError, match="field 'not_a_field': unknown field"):
            validate_config(plugin, {**EXAMPLES[plugin.name], "not_a_field": 1})

    def test_wrong_type_is_rejected_with_field_and_value(self, plugin):
        from typing import Literal, get_origin

        fields = plugin.Config.model_fields.items()
        ints = [n for n, f in fields if f.annotation is int]
        # a plugin without an integer field (export): a number where a word is expected
        field, bad = (ints[0], "lots") if ints else \
            (next(n for n, f in fields if get_origin(f.annotation) is Literal), 7)
        with pytest.raises(ConfigError) as e:
            validate_config(plugin, {**EXAMPLES[plugin.name], field: bad})
        assert f"field '{field}': got {bad!r}; expected" in str(e.value)

    def test_documented_in_readme(self, plugin):
        readme = (REPO / "README.md").read_text()
        assert re.search(rf"^### `{plugin.name}`", readme, re.M), \
            f"README has no '### `{plugin.name}`' section"


def test_range_errors_name_field_value_and_bound():
    plugin = plugins.get("evaluate")
    with pytest.raises(ConfigError) as e:
        validate_config(plugin, {"checkpoint": "x", "window": 1})
    assert "field 'window': got 1; expected: input should be greater than or equal to 2" \
        in str(e.value)
    with pytest.raises(ConfigError, match="field 'checkpoint': missing"):
        validate_config(plugin, {})
    with pytest.raises(ConfigError, match=r"stride \(300\) must not exceed window \(256\)"):
        validate_config(plugin, {"checkpoint": "x", "stride": 300})


# ------------------------------------------------------------------------------- pretrain
def test_pretrain_defaults_are_the_demo_model():
    """The demo base is the pretrain plugin's defaults (app/demo.py sets steps and name only):
    the numbers the demo's measured scores were taken on."""
    from plugins.kit.assets import DEMO_CORPUS

    config = validate_config(plugins.get("pretrain"), {})
    assert config.model_dump() == {
        "data": str(DEMO_CORPUS), "vocab_size": 4096, "hidden_size": 256, "num_layers": 4,
        "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 688, "max_positions": 512,
        "steps": 300, "batch_size": 16, "learning_rate": 2e-3, "block_length": 128,
        "seed": 0, "name": None}


@pytest.mark.parametrize("change, message", [
    ({"num_heads": 3}, r"num_heads \(3\) must divide hidden_size \(32\)"),
    ({"num_kv_heads": 3}, r"num_kv_heads \(3\) must divide num_heads \(4\)"),
    ({"block_length": 128}, r"block_length \(128\) must not exceed max_positions \(64\)"),
])
def test_pretrain_refuses_a_shape_that_cannot_build(change, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(plugins.get("pretrain"), {**EXAMPLES["pretrain"], **change})


def test_pretrain_job_registers_a_root_checkpoint_with_its_tokenizer(lab, tmp_path):
    """A tiny pretrain job: a model and tokenizer that load, relation `pretrain`, no parents,
    the loss as metrics, corpus and loss in the metadata."""
    import json

    from app import jobs
    from tests.test_jobs import run_to_end

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((REPO / "assets" / "demo" / "heldout.txt").read_text())
    job = jobs.submit(lab, "pretrain", {**EXAMPLES["pretrain"], "data": str(corpus)})
    assert run_to_end(lab, job["id"]) == "succeeded"
    with lab.registry() as reg:
        (ck_id,) = reg.job_checkpoints(job["id"])
        ck = reg.checkpoint(ck_id)
        assert ck["name"] == "tiny-pretrained" and ck["relation"] == "pretrain"
        assert reg.parents(ck_id) == []
        losses = [m for m in reg.metrics(job_id=job["id"]) if m["name"] == "loss"]
    meta = json.loads(ck["metadata"])
    assert meta["corpus"] == "corpus.txt" and meta["steps"] == 2
    assert [m["step"] for m in losses] == [1, 2] and losses[-1]["value"] == meta["final_loss"]
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(ck["path"])
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (32, 1, 300)
    assert len(AutoTokenizer.from_pretrained(ck["path"])) == 300
    assert not list(lab.checkpoints_dir.glob(".tmp-*"))
