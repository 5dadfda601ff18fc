import enum
from typing import Literal, Optional

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

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
