"""The habits of the ecosystem: `weightsmith run merge my-mergekit.yml` and the Merge form's
Load YAML take a plain mergekit configuration file, through the merge plugin's
foreign_config hook; the bounded YAML reader still refuses what it refused before."""

import json

import pytest
import yaml

import plugins
from app import jobs
from tests.conftest import last_json, run_cli
from tests.test_merge import family  # noqa: F401 -- the fixture: base, ft-a, ft-b

TIES = {"merge_method": "ties", "base_model": "base",
        "models": [{"model": "ft-a", "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": "ft-b", "parameters": {"weight": 0.4, "density": 0.5}}],
        "dtype": "bfloat16"}
# mergekit's README style: the base among the models, a shared normalize, densities that
# differ: more than the form's fields can say, so it stays a whole mergekit configuration
RICH = {"models": [{"model": "base"},
                   {"model": "ft-a", "parameters": {"weight": 1.0, "density": 0.7}},
                   {"model": "ft-b", "parameters": {"weight": 0.5, "density": 0.3}}],
        "merge_method": "ties", "base_model": "base", "parameters": {"normalize": True},
        "dtype": "float16"}


def write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def queued_config(lab_dir, path) -> dict:
    """`weightsmith run merge PATH` (queued, not run): the config the job stored."""
    from app.lab import Lab

    proc = run_cli(lab_dir, "run", "merge", path, check=True)
    job_id = last_json(proc.stdout)["job"]
    with Lab(lab_dir).registry() as reg:
        return json.loads(reg.job(job_id)["config"])


def mergekit_of(config: dict) -> dict:
    """The mergekit configuration a stored merge config runs."""
    import plugins.merge as merge

    parsed = merge.Config.model_validate(config)
    return merge.parse_mergekit_yaml(parsed.mergekit_yaml) if parsed.mergekit_yaml else \
        merge.build_mergekit_config(parsed)


def test_run_takes_a_plain_mergekit_file_as_the_wrapped_one(lab, lab_dir, family,  # noqa: F811
                                                            tmp_path):
    plain = queued_config(lab_dir, write(tmp_path / "ties.yml", TIES))
    wrapped = queued_config(lab_dir, write(tmp_path / "wrapped.yml",
                                           {"mergekit_yaml": yaml.safe_dump(TIES)}))
    assert mergekit_of(plain) == mergekit_of(wrapped) == TIES  # the same merge, exactly
    # simple enough for the form: its own fields, so the form shows it field by field
    assert plain["mergekit_yaml"] is None
    assert (plain["method"], plain["models"], plain["weights"], plain["density"],
            plain["base_model"], plain["dtype"]) == ("ties", ["ft-a", "ft-b"], [0.6, 0.4],
                                                     0.5, "base", "bfloat16")

    rich = queued_config(lab_dir, write(tmp_path / "rich.yml", RICH))
    rich_wrapped = queued_config(lab_dir, write(tmp_path / "rich-wrapped.yml",
                                                {"mergekit_yaml": yaml.safe_dump(RICH)}))
    assert rich["models"] == [] and mergekit_of(rich) == mergekit_of(rich_wrapped) == RICH
    assert {k: v for k, v in rich.items() if k != "mergekit_yaml"} == \
        {k: v for k, v in rich_wrapped.items() if k != "mergekit_yaml"}


def test_the_hook_maps_only_what_the_form_says_exactly():
    import plugins.merge as merge

    assert merge.foreign_config({"method": "ties"}) is None  # not a mergekit file
    assert merge.foreign_config(TIES)["method"] == "ties"
    for changed in ({"dtype": None}, {"parameters": {"normalize": True}},
                    {"models": [{"model": "ft-a", "parameters": {"weight": True}}]},
                    {"models": [{"model": "ft-a", "parameters": {"weight": 1, "density": 0.5}},
                                {"model": "ft-b", "parameters": {"weight": 1, "density": 0.2}}]},
                    {"merge_method": "della_linear"}, {"dtype": "bf16"}):
        data = {k: v for k, v in {**TIES, **changed}.items() if v is not None}
        out = merge.foreign_config(data)
        assert set(out) == {"mergekit_yaml"}, changed
        assert merge.parse_mergekit_yaml(out["mergekit_yaml"]) == data


def test_load_yaml_fills_the_merge_form_from_a_plain_mergekit_file(lab_dir, tmp_path):
    from app import forms
    from app.ui import load_yaml

    values, note = load_yaml("merge", str(write(tmp_path / "ties.yml", TIES)))
    assert values is not None and "Read as a file of the tool Merge replaces" in note
    assert "Not in this form" not in note
    specs = forms.leaves(forms.form_spec(plugins.get("merge").Config))
    shown = {s.path: v for s, v in zip(specs, values)}
    assert shown["method"] == "ties" and shown["models"] == ["ft-a", "ft-b"]
    assert shown["base_model"] == "base" and shown["dtype"] == "bfloat16"
    assert str(shown["density"]) == "0.5" and "0.6" in str(shown["weights"])
    assert not shown["mergekit_yaml"]

    values, note = load_yaml("merge", str(write(tmp_path / "rich.yml", RICH)))
    shown = {s.path: v for s, v in zip(forms.leaves(forms.form_spec(
        plugins.get("merge").Config)), values)}
    assert yaml.safe_load(shown["mergekit_yaml"]) == RICH and "fills mergekit_yaml" in note


ALIASES = ("merge_method: ties\nbase_model: base\nm: &m\n  - model: ft-a\n"
           "models: *m\n")


def test_aliases_and_foreign_junk_are_refused_naming_the_field(lab, lab_dir, family,  # noqa: F811
                                                              tmp_path):
    from app.ui import load_yaml

    bad = tmp_path / "aliases.yml"
    bad.write_text(ALIASES)
    proc = run_cli(lab_dir, "run", "merge", bad)
    assert proc.returncode == 2 and "alias *m repeats a list" in proc.stderr
    assert "Traceback" not in proc.stderr
    values, note = load_yaml("merge", str(bad))
    assert values is None and "alias" in note

    junk = write(tmp_path / "junk.yml", {"models": ["ft-a"], "colour": "blue"})
    proc = run_cli(lab_dir, "run", "merge", junk)
    assert proc.returncode == 2 and "colour" in proc.stderr and "Traceback" not in proc.stderr
    # a mergekit file whose model reference is no reference: the field is mergekit_yaml
    odd = write(tmp_path / "odd.yml", {"merge_method": "linear", "models": [{"model": [1]}]})
    proc = run_cli(lab_dir, "run", "merge", odd)
    assert proc.returncode == 2 and "mergekit_yaml: models[0].model" in proc.stderr
    with pytest.raises(plugins.ConfigError, match="colour"):
        jobs.check_config(lab, "merge", jobs.load_config_file(junk, "merge"))


def test_plugins_without_the_hook_and_own_configs_are_as_before(tmp_path, lab_dir):
    evaluate, merge = plugins.get("evaluate"), plugins.get("merge")
    assert evaluate.foreign_config is None
    data = {"checkpoint": "tiny", "merge_method": "ties"}
    assert jobs.as_plugin_config("evaluate", data) is data
    own = {"method": "linear", "models": ["a", "b"]}
    assert not jobs.foreign_format(merge, own) and jobs.as_plugin_config(merge, own) is own
    path = write(tmp_path / "own.yml", own)
    assert jobs.load_config_file(path) == jobs.load_config_file(path, "merge") == own


def test_a_failing_hook_is_a_message_naming_the_file(tmp_path, lab_dir):
    import dataclasses

    def broken(data):
        raise KeyError("<b>boom</b>")

    plugin = dataclasses.replace(plugins.get("merge"), foreign_config=broken)
    with pytest.raises(plugins.ConfigError, match="could not read it") as e:
        jobs.as_plugin_config(plugin, {"merge_method": "x"}, where="f.yml")
    assert "f.yml" in e.value.problems[0]
    weird = dataclasses.replace(plugin, foreign_config=lambda data: ["not", "a", "dict"])
    with pytest.raises(plugins.ConfigError, match="expected a mapping"):
        jobs.as_plugin_config(weird, {"merge_method": "x"})
