import enum
from typing import Annotated, Literal, Optional

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

import plugins
from app import forms
from plugins import CheckpointList, CheckpointRef, LocalFile, LongText, PluginConfig
from tests.test_plugins import EXAMPLES


class Color(str, enum.Enum):
    red = "red"
    blue = "blue"


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: float = Field(0.5, ge=0, le=1, description="A rate.")
    note: str = Field("", description="A note.")


class Everything(PluginConfig):
    model: CheckpointRef = Field(description="The model.")
    models: CheckpointList = Field(default_factory=lambda: ["a"], description="Models.")
    data: Optional[LocalFile] = Field(None, description="A file.")
    flag: bool = Field(False, description="A flag.")
    steps: int = Field(10, ge=1, le=1000, description="Bounded int.")
    lr: float = Field(1e-4, gt=0, description="Unbounded float.")
    method: Literal["ties", "linear"] = Field("ties", description="A literal.")
    color: Color = Field(Color.red, description="An enum.")
    name: str = Field("out", description="Text.")
    notes: Optional[LongText] = Field(None, description="Long text.")
    seed: Optional[int] = Field(None, description="Optional int.")
    density: Optional[float] = Field(None, gt=0, le=1, description="Optional bounded float.")
    tags: list[str] = Field(default_factory=list, description="A list.")
    inner: Inner = Field(default_factory=Inner, description="Nested.")


def test_each_field_type_gets_its_widget():
    specs = {s.path: s for s in forms.leaves(forms.form_spec(Everything))}
    kinds = {path: s.kind for path, s in specs.items()}
    assert kinds == {
        "model": "checkpoint", "models": "checkpoints", "data": "file", "flag": "checkbox",
        "steps": "slider", "lr": "number", "method": "dropdown", "color": "dropdown",
        "name": "text", "notes": "text", "seed": "number", "density": "number", "tags": "yaml", "inner.rate": "slider",
        "inner.note": "text"}
    assert specs["method"].choices == ["ties", "linear"]
    assert specs["color"].choices == ["red", "blue"]
    assert (specs["steps"].minimum, specs["steps"].maximum, specs["steps"].integer) == (1, 1000,
                                                                                          True)
    assert specs["model"].required and specs["model"].help == "The model."
    assert specs["seed"].optional and not specs["seed"].required
    assert specs["notes"].multiline and not specs["name"].multiline
    assert specs["density"].optional  # a text box that may stay empty, not a slider
    group = [s for s in forms.form_spec(Everything) if s.kind == "group"]
    assert [g.path for g in group] == ["inner"]


def test_values_round_trip_through_the_form():
    specs = forms.form_spec(Everything)
    data = {"model": "ck-1", "models": ["a", "b"], "flag": True, "steps": 20, "lr": 0.01,
            "method": "linear", "color": "blue", "name": "x", "seed": 3, "tags": ["p", "q"],
            "inner": {"rate": 0.25, "note": "hi"}}
    values = forms.config_to_values(specs, data)
    assert forms.values_to_config(specs, values) == data
    assert Everything.model_validate(data).inner.rate == 0.25
    # the YAML preview is exactly what `weightsmith run` reads back
    assert yaml.safe_load(forms.to_yaml(data)) == data


def test_empty_widgets_leave_fields_out():
    specs = forms.form_spec(Everything)
    empty = forms.config_to_values(specs, {})
    config = forms.values_to_config(specs, empty)
    assert "model" not in config and "data" not in config and "seed" not in config
    assert config["steps"] == 10  # defaults are filled into the form
    with pytest.raises(plugins.ConfigError, match="field 'model': missing"):
        plugins.validate_config(plugins.Plugin(
            name="everything", title="E", description="E", Config=Everything,
            run=lambda c, x: None), config)


def test_float_from_a_slider_becomes_an_int():
    specs = forms.form_spec(Everything)
    values = forms.config_to_values(specs, {"model": "m"})
    values[[s.path for s in forms.leaves(specs)].index("steps")] = 42.0
    assert forms.values_to_config(specs, values)["steps"] == 42


def test_bad_yaml_names_the_field_and_unknown_keys_are_reported():
    specs = forms.form_spec(Everything)
    values = forms.config_to_values(specs, {"model": "m"})
    values[[s.path for s in forms.leaves(specs)].index("tags")] = "[unclosed"
    with pytest.raises(forms.FormError, match="field 'tags': invalid YAML at line 1"):
        forms.values_to_config(specs, values)
    assert forms.unknown_keys(specs, {"model": "m", "modle": 1, "inner": {"x": 2}}) == [
        "modle", "inner.x"]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_plugin_form_round_trips_its_example(name):
    plugin = plugins.get(name)
    specs = forms.form_spec(plugin.Config)
    values = forms.config_to_values(specs, EXAMPLES[name])
    config = plugins.validate_config(plugin, forms.values_to_config(specs, values))
    assert config == plugins.validate_config(plugin, EXAMPLES[name])


def test_optional_numbers_are_text_and_empty_means_unset():
    specs = forms.form_spec(Everything)
    paths = [s.path for s in forms.leaves(specs)]
    values = forms.config_to_values(specs, {"model": "m"})
    assert values[paths.index("seed")] == ""
    assert "seed" not in forms.values_to_config(specs, values)
    values[paths.index("seed")] = " 7 "
    assert forms.values_to_config(specs, values)["seed"] == 7
    values[paths.index("seed")] = "seven"
    with pytest.raises(forms.FormError, match="field 'seed': got 'seven'; expected a number"):
        forms.values_to_config(specs, values)


# ------------------------------------------------------------------ method-aware forms
def leaf_specs(plugin_name: str) -> dict[str, forms.FieldSpec]:
    return {s.path: s for s in forms.leaves(forms.form_spec(plugins.get(plugin_name).Config))}


def methods_of(plugin_name: str) -> dict[str, list | None]:
    return {path: s.methods for path, s in leaf_specs(plugin_name).items()}


def test_merge_fields_follow_mergekits_method_specs():
    """Which merge methods read weights, density, t and base_model is mergekit's own spec
    of each method (its parameters, and whether its contract takes a base model): the
    Config's for_methods lists are recomputed here from the installed mergekit."""
    pytest.importorskip("mergekit")
    from mergekit import merge_methods
    from mergekit.merge_methods.base import BasePolicy

    from plugins.merge import METHODS

    reads: dict[str, list[str]] = {"weights": [], "density": [], "t": [], "base_model": []}
    for method in METHODS:
        merger = merge_methods.get(method)
        names = {p.name for p in merger.spec.parameters}
        if "weight" in names:
            reads["weights"].append(method)
        # task_arithmetic lists density but does not sparsify, so never reads it
        if "density" in names and getattr(merger, "sparsification_method", True) is not None:
            reads["density"].append(method)
        if "t" in names:
            reads["t"].append(method)
        if merger.spec.contract.base in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL):
            reads["base_model"].append(method)
    declared = methods_of("merge")
    assert {field: declared[field] for field in reads} == reads
    assert reads["t"] == ["slerp"] and "ties" in reads["density"]  # the spec was read
    specs = leaf_specs("merge")
    assert specs["method"].selector and declared["models"] is None  # every method


def test_prune_scale_train_and_task_vector_fields_name_their_methods():
    prune = methods_of("prune")
    assert prune["dampening"] == prune["block_size"] == ["sparsegpt"]
    assert prune["importance"] == prune["attention_groups_removed"] == ["structured"]
    assert "structured" not in prune["pattern"] and "magnitude" not in prune["calibration_file"]
    assert prune["sparsity"] is None and prune["checkpoint"] is None
    scale = methods_of("scale_layers")
    assert (scale["solar_overlap"], scale["growth_factor"], scale["expand_every"],
            scale["intermediate_size"], scale["remove_layers"]) == (
        ["depth_upscale"], ["stack"], ["block_expansion"], ["widen_mlp"], ["prune_depth"])
    train = methods_of("train")
    for lora_field in ("lora_r", "lora_alpha", "lora_dropout", "target_modules"):
        assert train[lora_field] == ["lora", "dora", "qlora"], lora_field
    assert train["trainable_layers"] == ["freeze"] and train["merge_adapter"] == ["lora", "dora"]
    assert train["learning_rate"] is None and train["data"] is None
    vectors = methods_of("task_vector")
    assert vectors["finetuned"] == vectors["base"] == ["extract"]
    assert vectors["graft_density"] == ["graft"] and "extract" not in vectors["vectors"]
    for name in ("merge", "prune", "scale_layers", "train", "task_vector"):
        chooser = forms.selector(forms.form_spec(plugins.get(name).Config))
        assert chooser is not None and chooser.name in ("method", "action"), name
        for path, methods in methods_of(name).items():  # every named method exists
            assert methods is None or set(methods) <= set(chooser.choices), (name, path)


def form_of(name: str, data: dict) -> tuple[list, list]:
    specs = forms.form_spec(plugins.get(name).Config)
    return specs, forms.config_to_values(specs, data)


def test_hidden_fields_are_not_submitted():
    """A field the chosen method does not read is hidden, and left out of the config even
    when it still holds a value (from another method, or a loaded YAML)."""
    specs, values = form_of("merge", {"method": "linear", "models": ["a", "b"],
                                      "density": 0.5, "t": 0.3, "base_model": "base"})
    hidden = forms.hidden_paths(specs, values)
    assert {"density", "t", "base_model"} <= hidden and "weights" not in hidden
    config = forms.values_to_config(specs, values, hidden)
    assert config["method"] == "linear" and not {"density", "t", "base_model"} & set(config)
    method_at = [s.path for s in forms.leaves(specs)].index("method")
    values[method_at] = "ties"
    config = forms.values_to_config(specs, values, forms.hidden_paths(specs, values))
    assert config["density"] == 0.5 and config["base_model"] == "base" and "t" not in config
    values[method_at] = "slerp"
    config = forms.values_to_config(specs, values, forms.hidden_paths(specs, values))
    assert config["t"] == 0.3 and "density" not in config and "weights" not in config
    # a field structured refuses (pattern) is not sent once structured is chosen
    specs, values = form_of("prune", {"checkpoint": "ck", "method": "structured",
                                      "pattern": "2:4", "sparsity": 0.25})
    config = forms.values_to_config(specs, values, forms.hidden_paths(specs, values))
    assert "pattern" not in config and "dampening" not in config
    plugins.validate_config(plugins.get("prune"), config)
    # a value that is no method hides nothing: validation names it
    values[[s.path for s in forms.leaves(specs)].index("method")] = "nonsense"
    assert forms.hidden_paths(specs, values) == set()


def test_advanced_fields_are_marked_and_basic_ones_are_not():
    merge = leaf_specs("merge")
    assert {p for p, s in merge.items() if s.advanced} == {
        "mergekit_yaml", "tokenizer_source", "dtype", "seed", "engine", "lines_alpha",
        "lines_beta"}
    train = leaf_specs("train")
    basic = [p for p, s in train.items() if not s.advanced]
    assert basic[:3] == ["checkpoint", "data", "method"]
    assert "learning_rate" in basic and "lora_r" in basic and "lr_scheduler" not in basic


def test_gpu_fields_show_only_on_a_lab_with_gpus():
    for name in ("train", "continue_pretrain"):
        specs, values = form_of(name, {"checkpoint": "ck", "data": "d.jsonl"})
        on_cpu = forms.hidden_paths(specs, values, gpu_lab=False)
        on_gpu = forms.hidden_paths(specs, values, gpu_lab=True)
        assert {"gpus", "distributed"} <= on_cpu and "cpu_processes" not in on_cpu, name
        assert "cpu_processes" in on_gpu and not {"gpus", "distributed"} & on_gpu, name
        values[[s.path for s in forms.leaves(specs)].index("gpus")] = 4
        assert "gpus" not in forms.values_to_config(specs, values, on_cpu)


def test_gpu_fields_are_hidden_and_unsent_on_a_cpu_lab(lab):
    from app.ui.forms_view import field_errors, submit_form

    lab.settings.gpus = []  # a lab without GPUs
    specs, values = form_of("train", {"checkpoint": "no-such", "data": "d.jsonl", "gpus": 4})
    message, job = submit_form(lab, "train", values)
    assert job == "" and "gpus" not in message  # refused for its checkpoint, not for gpus
    assert "field 'checkpoint'" in message
    assert set(field_errors(lab, "train", values)) == {"checkpoint"}


def test_no_slider_reaches_a_bound_the_config_excludes():
    seen = 0
    for name in sorted(EXAMPLES):
        for spec in forms.leaves(forms.form_spec(plugins.get(name).Config)):
            if spec.kind != forms.SLIDER:
                continue
            seen += 1
            assert spec.minimum <= spec.slider_min < spec.slider_max <= spec.maximum, spec.path
            if spec.exclusive_maximum:
                assert spec.slider_max < spec.maximum, (name, spec.path)
            if spec.exclusive_minimum:
                assert spec.slider_min > spec.minimum, (name, spec.path)
            field = plugins.get(name).Config.model_fields[spec.path]
            for end in (spec.slider_min, spec.slider_max):  # both ends are values it takes
                TypeAdapter(Annotated[field.annotation, *field.metadata]).validate_python(end)
                assert forms._range_problem(spec, end) is None, (name, spec.path, end)
    assert seen > 10
    sparsity = leaf_specs("prune")["sparsity"]
    assert sparsity.kind == forms.SLIDER and sparsity.slider_max == pytest.approx(0.99)
    assert sparsity.exclusive_maximum and sparsity.maximum == 1


def test_learning_rates_are_number_boxes_never_sliders():
    rates = [(name, spec) for name in sorted(EXAMPLES)
             for spec in forms.leaves(forms.form_spec(plugins.get(name).Config))
             if "learning_rate" in spec.name]
    assert {name for name, _ in rates} >= {"train", "continue_pretrain", "pretrain",
                                           "task_vector"}
    for name, spec in rates:
        assert spec.kind == forms.NUMBER, (name, spec.path)
    # and generally: a default the slider's hundredths cannot show makes a number box
    class Rates(PluginConfig):
        lr: float = Field(3e-4, gt=0, le=1, description="No hint, a tiny default.")
        ratio: float = Field(0.25, ge=0, le=1, description="On the slider's steps.")
        marked: float = Field(0.5, ge=0, le=1, description="A hint.",
                              json_schema_extra=plugins.LOG_SCALE)
    kinds = {s.name: s.kind for s in forms.form_spec(Rates)}
    assert kinds == {"lr": "number", "ratio": "slider", "marked": "number"}


def test_data_fields_get_an_upload_box():
    for name, path in (("train", "data"), ("train", "eval_data"),
                       ("continue_pretrain", "data"), ("continue_pretrain", "replay_data"),
                       ("evaluate", "suite")):
        assert leaf_specs(name)[path].kind == forms.DATA, (name, path)
        assert forms.DATA in forms.UPLOADABLE
    specs, values = form_of("train", {"checkpoint": "ck", "data": "  /tmp/d.jsonl "})
    assert forms.values_to_config(specs, values)["data"] == "/tmp/d.jsonl"


def test_a_bad_value_comes_back_in_words_naming_its_field(lab):
    from app.ui.forms_view import field_errors, submit_form

    specs, values = form_of("prune", {"checkpoint": "ck"})
    paths = [s.path for s in forms.leaves(specs)]
    values[paths.index("sparsity")] = 1.5  # what a slider clamped to 1 used to hide
    problems = forms.widget_problems(specs, values)
    assert problems == {"sparsity": "got 1.5; expected a number below 1"}
    message, job = submit_form(lab, "prune", values)
    assert job == "" and "field 'sparsity': got 1.5; expected a number below 1" in message
    assert "{" not in message  # never the config dict
    assert field_errors(lab, "prune", values) == problems
    # pydantic's wording, as the form words it
    assert forms.plain("field 'sparsity': got 1.0; expected: input should be less than 1") \
        == "field 'sparsity': got 1.0; expected a number below 1"
    # a problem of the whole config goes to the fields it names
    specs, values = form_of("merge", {"method": "slerp", "models": ["a", "b"],
                                      "base_model": "base"})
    assert forms.problems_by_field(specs, ["config: value error, method slerp needs t"],
                                   forms.hidden_paths(specs, values)) == {
        "t": "method slerp needs t"}
    errors = field_errors(lab, "merge", values)
    assert errors["t"] == "method slerp needs t"
    values[[s.path for s in forms.leaves(specs)].index("t")] = "0.5"
    errors = field_errors(lab, "merge", values)  # each unknown checkpoint by its field
    assert set(errors) == {"models", "base_model"}
    assert errors["models"].startswith("unknown checkpoint 'a'")
    assert "unknown checkpoint 'b'" in errors["models"]
    assert errors["base_model"].startswith("unknown checkpoint 'base'")
    specs, values = form_of("train", {"checkpoint": "ck", "data": "d.jsonl"})
    values[[s.path for s in forms.leaves(specs)].index("learning_rate")] = 5
    assert field_errors(lab, "train", values)["learning_rate"] == \
        "got 5; expected a number of at most 1"


def test_error_lines_show_only_their_fields_problem_and_open_advanced():
    import gradio as gr

    from app.ui.forms_view import FormField, error_html, error_updates

    specs = leaf_specs("merge")
    fields = [FormField(specs[p], None, None, None) for p in ("density", "engine", "name")]
    density, engine, name, accordion = error_updates(
        gr, fields, {"density": "got 1.5; expected a number of at most 1",
                     "engine": "got 'x'; expected 'auto', 'native' or 'mergekit'"}, object())
    assert density["visible"] and density["value"] == error_html(
        "density", "got 1.5; expected a number of at most 1")
    assert "<b>" not in error_html("<b>x</b>", "<i>")  # a value is shown as text
    assert engine["visible"] and not name["visible"] and name["value"] == ""
    assert accordion.get("open") is True  # engine is under Advanced: it opens
    *_, accordion = error_updates(gr, fields, {"density": "got 2"}, object())
    assert accordion == gr.skip()
