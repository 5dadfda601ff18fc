"""Every input is hostile until checked: a bad config file or field value exits 2 with a
message naming the field, queues nothing, and never shows a traceback; a locked registry or
a full disk exits 1 with a message that says what to do.

The property test starts from each plugin's valid example (tests/test_plugins.py EXAMPLES,
plus the test plugins) and puts one always-invalid value into one field, then runs the file
through the CLI's loader and submit path in-process; a few real subprocess runs check the
same from the outside."""

from __future__ import annotations

import errno
import math
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

import plugins
from app import cli
from app.lab import Lab
from plugins import ConfigError, LocalPath, LongText, Plugin, PluginConfig, validate_config
from tests.conftest import TEST_PLUGINS, run_cli
from tests.test_plugins import EXAMPLES

ALL_PLUGINS = TEST_PLUGINS + ",tests.plugins_for_distributed:MULTI_GPU_SLEEPER"
# A valid config per plugin: the built-ins' from the shared table, the test plugins' here.
VALID = {
    **EXAMPLES,
    "test_sleep": {"seconds": 0.5, "pid_file": "pids.txt"},
    "test_gpu_sleep": {"seconds": 0.5, "pid_file": "pids.txt"},
    "test_crash": {"message": "boom"},
    "test_copy": {"source": "ck-12345678", "name": "copied"},
    "test_multi_gpu_sleep": {"seconds": 0.5, "pid_file": "pids.txt", "gpus": 1},
}
CHECKPOINTS = ("ck-12345678", "ck-11111111", "ck-22222222")  # the examples' references
CONTROL = [chr(c) for c in range(32) if chr(c) not in "\t\n\r"]
# A printable stderr: no control characters but newline and tab.
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f]")


@pytest.fixture
def hostile_lab(lab_dir, monkeypatch) -> Path:
    """A lab with every plugin loaded and the examples' checkpoints registered."""
    monkeypatch.setenv("WEIGHTSMITH_PLUGINS", ALL_PLUGINS)
    plugins.discover(refresh=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    (lab_dir / "lab.toml").write_text("auto_eval = false\ngpus = []\n")
    monkeypatch.chdir(lab_dir)  # the examples' data files, which submit checks exist
    for name in example_files():
        (lab_dir / name).write_text('{"text": "x"}\n')
    lab = Lab(lab_dir)
    with lab.registry() as reg:
        for ck in CHECKPOINTS:
            reg.add_checkpoint(id=ck, name=f"model-{ck[3:]}", relation="import",
                               path=str(lab_dir / "checkpoints" / ck))
    yield lab_dir
    plugins.unregister("test_multi_gpu_sleep")  # the other tests load TEST_PLUGINS only


def example_files() -> set[str]:
    """The data files the examples name (a new plugin's row needs no edit here)."""
    return {value for example in EXAMPLES.values() for value in example.values()
            if isinstance(value, str) and value.endswith((".jsonl", ".json", ".txt", ".csv"))}


def job_count(lab_dir: Path) -> int:
    conn = sqlite3.connect(str(lab_dir / "registry.db"))
    try:
        return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
    finally:
        conn.close()


def job_dirs(lab_dir: Path) -> list[str]:
    return sorted(p.name for p in (lab_dir / "jobs").iterdir())


def assert_clean_refusal(rc: int, err: str, lab_dir: Path, jobs_before: int,
                         code: int = 2) -> None:
    assert rc == code, err
    assert "Traceback" not in err
    assert err.startswith("error: "), err
    assert not RAW_CONTROL.search(err), repr(err[:300])
    assert job_count(lab_dir) == jobs_before, "a job was queued"
    assert job_dirs(lab_dir) == [], "a job folder was written"


# ------------------------------------------------------------------------- the test table
def test_every_plugin_has_a_valid_example(hostile_lab):
    """The property test covers every plugin: a new one must add a row (here or in EXAMPLES),
    and each row must pass the whole submit check, so that a refusal below is the mutation's."""
    from app import jobs

    assert set(plugins.discover()) == set(VALID)
    lab = Lab(hostile_lab)
    for name, example in VALID.items():
        jobs.check_config(lab, name, example)


# ----------------------------------------------------------------- hostile values, generated
def field_types(plugin: Plugin, field: str) -> tuple[set[str], bool]:
    """The JSON types a field accepts (through anyOf/Optional) and whether it is LongText."""
    prop = plugin.Config.model_json_schema()["properties"][field]
    options = [prop] + prop.get("anyOf", [])
    types = {o["type"] for o in options if isinstance(o.get("type"), str)}
    types |= {"string" for o in options if "enum" in o or "const" in o}
    types |= {"object" for o in options if "$ref" in o or "additionalProperties" in o}
    return types, plugins.field_marker(prop) == "multiline"


def hostile_value(plugin: Plugin, field: str) -> st.SearchStrategy:
    """Values that no field of this type may accept (whatever the plugin's own checks)."""
    types, multiline = field_types(plugin, field)
    control_text = st.builds(lambda a, c, b: a + c + b, st.text(max_size=12),
                             st.sampled_from(CONTROL), st.text(max_size=12))
    options = [
        control_text,
        st.integers(min_value=2 ** 63 + 1, max_value=2 ** 200),
        st.integers(min_value=-(2 ** 200), max_value=-(2 ** 63) - 1),
        st.sampled_from([math.nan, math.inf, -math.inf]),
    ]
    if not multiline:  # LongText may hold 1,000,000 characters: the file cap stops more
        options.append(st.integers(min_value=4097, max_value=100_000).map(lambda n: "w" * n))
    if "object" not in types:
        options.append(st.builds(lambda: {"__bad": 1}))  # a new one each time: no aliases
    if types <= {"integer", "null"}:  # an int field: the text or float of a huge int
        options.append(st.integers(min_value=2 ** 54, max_value=2 ** 80).map(str))
        options.append(st.floats(min_value=2.0 ** 54, max_value=1e300))
    if types <= {"number", "null"}:
        options.append(st.sampled_from(["nan", "inf", "-Infinity"]))
    scalar = st.one_of(options)
    if "array" in types:  # and inside a list
        return st.one_of(scalar, st.lists(scalar, min_size=1, max_size=3))
    return scalar


@st.composite
def mutation(draw, plugin: Plugin):
    """(config, name the error must carry, kind): one field made hostile, or an unknown key."""
    config = dict(VALID[plugin.name])
    if draw(st.integers(0, 9)) == 0:
        key = draw(st.from_regex(r"[a-z_]{1,30}", fullmatch=True)
                   .filter(lambda k: k not in plugin.Config.model_fields))
        config[key] = draw(st.one_of(st.integers(0, 9), st.text(max_size=5)))
        return config, key, "unknown"
    field = draw(st.sampled_from(sorted(plugin.Config.model_fields)))
    config[field] = draw(hostile_value(plugin, field))
    return config, field, "value"


PLUGIN_NAMES = sorted(VALID)


class NoAliasDumper(yaml.SafeDumper):
    """Writes a value repeated in a config out in full (the loader refuses aliased mappings)."""

    def ignore_aliases(self, data):
        return True


@pytest.mark.parametrize("name", PLUGIN_NAMES)
def test_hostile_field_values_exit_2_naming_the_field(name, hostile_lab, tmp_path, capsys):
    plugin = plugins.get(name)
    config_file = tmp_path / "hostile.yaml"
    lab = str(hostile_lab)

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(mutation(plugin))
    def check(case):
        config, field, kind = case
        config_file.write_text(yaml.dump(config, Dumper=NoAliasDumper, sort_keys=False))
        before = job_count(hostile_lab)
        rc = cli.main(["run", name, str(config_file), "--lab", lab])
        out, err = capsys.readouterr()
        assert "Traceback" not in out
        assert_clean_refusal(rc, err, hostile_lab, before)
        if kind == "unknown":
            assert f"field '{field}': unknown field" in err, err
        else:
            assert re.search(rf"field '{re.escape(field)}(\.\d+)?'", err), (field, err[:500])
        assert all(len(line) <= 1000 for line in err.splitlines()), "an unbounded message"

    check()


@pytest.mark.parametrize("line, field, expected", [
    ('data: "medical\\0.jsonl"', "data", "got 'medical\\x00.jsonl'; expected: text without "
                                          "control characters"),
    ("data: " + "d" * 100_000, "data", "(100000 characters); expected: at most 4096 characters"),
    ("max_steps: 99999999999999999999", "max_steps",
     "got 99999999999999999999; expected: an integer of at most 2**53"),
    ("learning_rate: .nan", "learning_rate", "got nan; expected: a finite number"),
    ("epochs: .inf", "epochs", "got inf; expected: a finite number"),
    ("seed: 1.0e+300", "seed", "expected"),
])
def test_the_reported_values_exit_2(line, field, expected, hostile_lab, tmp_path, capsys):
    """The issue's examples, written as a user would write them."""
    path = tmp_path / "train.yaml"
    path.write_text("checkpoint: ck-12345678\n" + line + "\n")
    if not line.startswith("data"):
        path.write_text(path.read_text() + "data: data.jsonl\n")
    rc = cli.main(["run", "train", str(path), "--lab", str(hostile_lab)])
    err = capsys.readouterr().err
    assert_clean_refusal(rc, err, hostile_lab, 0)
    assert f"field '{field}': " in err and expected in err, err


def test_hostile_keys_are_named_printably(hostile_lab, tmp_path, capsys):
    for key in ["bad\x00key", "k" * 5000, "tab\tand\x1bescape"]:
        config_file = tmp_path / "keys.yaml"
        config_file.write_text(yaml.safe_dump({**VALID["evaluate"], key: 1}))
        rc = cli.main(["run", "evaluate", str(config_file), "--lab", str(hostile_lab)])
        err = capsys.readouterr().err
        assert_clean_refusal(rc, err, hostile_lab, 0)
        assert "unknown field" in err and len(err) < 3000


# --------------------------------------------------------------------- the limits, directly
class Inner(BaseModel):
    label: str = Field("x", description="A label.")
    steps: int = Field(1, description="Steps.")


class InnerConfig(PluginConfig):
    note: LongText = Field("", description="A long note.")


class Outer(PluginConfig):
    inner: Inner = Field(default_factory=Inner, description="A nested plain model.")
    inners: list[Inner] = Field(default_factory=list, description="A list of them.")
    sub: Optional[InnerConfig] = Field(None, description="A nested plugin config.")
    tags: list[str] = Field(default_factory=list, description="Tags.")
    table: dict[str, float] = Field(default_factory=dict, description="A table.")
    note: Optional[LongText] = Field(None, description="A long note.")
    folder: Optional[LocalPath] = Field(None, description="A folder.")
    rate: float = Field(0.1, description="A rate.")
    count: int = Field(1, description="A count.")


DEEP: list = ["x"]
for _ in range(40):
    DEEP = [DEEP]

OUTER = Plugin(name="limits_probe", title="Limits", description="Probes the limits.",
               Config=Outer, run=lambda config, ctx: None)


@pytest.mark.parametrize("data, where, expected", [
    ({"inner": {"label": "a\x00b"}}, "inner.label", "control characters"),
    ({"inners": [{}, {"steps": 2 ** 60}]}, "inners.1.steps", "at most 2**53"),
    ({"inner": {"steps": 2.0 ** 60}}, "inner.steps", "at most 2**53"),  # a float become int
    ({"count": "99999999999999999999"}, "count", "at most 2**53"),
    ({"count": 99999999999999999999}, "count",
     "got 99999999999999999999; expected: an integer of at most 2**53"),
    ({"sub": {"note": "n" * 1_000_001}}, "sub.note", "at most 1000000 characters"),
    ({"tags": ["ok", "t" * 4097]}, "tags.1", "at most 4096 characters"),
    ({"table": {"k": math.nan}}, "table.k", "a finite number"),
    ({"table": {"k\x01": 1.0}}, "table.k\\x01", "control characters"),
    ({"rate": math.inf}, "rate", "a finite number"),
    ({"rate": "-inf"}, "rate", "finite number"),
    ({"folder": "a/" + "b" * 256}, "folder", "at most 255 bytes"),
    ({"note": "\ud800"}, "note", "control characters"),  # a lone surrogate
    ({"tags": DEEP}, "tags.0.0", "nested more than 32 levels"),
])
def test_limits_name_the_field_path(data, where, expected):
    with pytest.raises(ConfigError) as e:
        validate_config(OUTER, data)
    message = str(e.value)
    assert re.search(rf"field '{re.escape(where)}(\.0)*'", message), message
    assert expected in message, message
    assert all(len(line) < 600 for line in message.splitlines())


def test_limits_let_good_values_through():
    config = validate_config(OUTER, {"note": "n" * 100_000 + "\n\ttabbed\r\n",
                                     "sub": {"note": "x" * 1_000_000}, "tags": ["a", "b"],
                                     "inners": [{"steps": 2 ** 53}], "rate": 1e300,
                                     "folder": "a/" + "b" * 255, "table": {"k": -1.5}})
    assert config.inners[0].steps == 2 ** 53 and config.sub.note == "x" * 1_000_000


def test_messages_stay_short_and_never_show_the_whole_config():
    with pytest.raises(ConfigError) as e:
        validate_config(plugins.get("evaluate"), {"checkpoint": "x", "stride": 300,
                                                  "tasks": ["t" * 3000]})
    assert "t" * 100 not in str(e.value)
    with pytest.raises(ConfigError) as e:  # a model validator: the input is the whole dict
        validate_config(plugins.get("evaluate"), {"checkpoint": "x/" * 2000, "stride": 300})
    assert "stride (300) must not exceed window (256)" in str(e.value)
    assert "x/" * 50 not in str(e.value) and len(str(e.value)) < 400
    with pytest.raises(ConfigError) as e:  # an int too long for repr in a range error
        validate_config(plugins.get("evaluate"), {"checkpoint": "x", "window": 10 ** 5000})
    assert "field 'window': got an integer of about 5001 digits" in str(e.value)


# -------------------------------------------------------------------- the config file itself
@pytest.mark.parametrize("content, expected", [
    (bytes(range(256)) * 8, "NUL byte"),
    (b"checkpoint: x\nwindow: 64\x00\n", "NUL byte at byte 24"),
    (b"checkpoint: caf\xe9\n", "not UTF-8 text"),
    (b"checkpoint: x\n" + b"# padding\n" * 110_000, "expected at most 1048576"),
])
def test_bad_config_files_are_refused_naming_the_file(content, expected, hostile_lab, tmp_path,
                                                      capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    rc = cli.main(["run", "evaluate", str(path), "--lab", str(hostile_lab)])
    err = capsys.readouterr().err
    assert_clean_refusal(rc, err, hostile_lab, 0)
    assert f"config file {path}" in err and expected in err, err


def test_a_folder_or_fifo_is_not_a_config_file(hostile_lab, tmp_path, capsys):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would block forever
    for path in (tmp_path, fifo):
        rc = cli.main(["run", "evaluate", str(path), "--lab", str(hostile_lab)])
        err = capsys.readouterr().err
        assert_clean_refusal(rc, err, hostile_lab, 0)
        assert "not a regular file" in err


def test_hostile_arguments_exit_2(hostile_lab, capsys):
    rc = cli.main(["jobs", "--limit", "99999999999999999999", "--lab", str(hostile_lab)])
    err = capsys.readouterr().err
    assert rc == 2 and "argument limit" in err and "Traceback" not in err
    rc = cli.main(["logs", "j" * 10_000, "--lab", str(hostile_lab)])
    err = capsys.readouterr().err
    assert rc == 2 and "argument job" in err and len(err) < 400


def test_subprocess_runs_refuse_hostile_files_cleanly(hostile_lab, tmp_path):
    """From the outside: the real entry point, exit codes and stderr."""
    cases = {
        "binary.yaml": (os.urandom(4096) + b"\x00", None, "config file"),
        "nul.yaml": (b"checkpoint: ck-12345678\x00\n", None, "NUL byte"),
        "field_nul.yaml": (b'checkpoint: ck-12345678\ndata: "a\\0b"\n', "data",
                           "control characters"),
        "steps.yaml": (yaml.safe_dump({**VALID["train"], "max_steps": 10 ** 20}).encode(),
                       "max_steps", "got 100000000000000000000; expected: an integer of at most"),
    }
    for file_name, (content, field, expected) in cases.items():
        path = tmp_path / file_name
        path.write_bytes(content)
        proc = run_cli(hostile_lab, "run", "train", path, timeout=120)
        assert_clean_refusal(proc.returncode, proc.stderr, hostile_lab, 0)
        assert "Traceback" not in proc.stdout
        assert expected in proc.stderr, (file_name, proc.stderr)
        if field:
            assert f"field '{field}'" in proc.stderr, (file_name, proc.stderr)


# ------------------------------------------------------------- a locked registry, a full disk
@pytest.fixture
def locked_registry(hostile_lab, monkeypatch):
    """Another connection holds the registry exclusively (locking_mode EXCLUSIVE: even WAL
    readers wait on it) until the test ends."""
    monkeypatch.setattr(cli, "LOCK_PROBE_SECONDS", 0.5)
    holder = sqlite3.connect(str(hostile_lab / "registry.db"), isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("CREATE TABLE IF NOT EXISTS lock_probe (x)")
    yield hostile_lab
    holder.execute("ROLLBACK")
    holder.close()


@pytest.mark.parametrize("argv", [["jobs"], ["registry", "list"], ["audit"],
                                  ["logs", "job-00000000"]])
def test_locked_registry_fails_fast_with_what_to_do(argv, locked_registry, capsys):
    start = time.monotonic()
    rc = cli.main(argv + ["--lab", str(locked_registry)])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert "registry" in err and "locked by another process" in err and "try again" in err
    assert elapsed < 10, "a read-only command waited out the 30 s busy timeout"


def _submit_while_add_job_raises(message, hostile_lab, tmp_path, monkeypatch, capsys):
    from registry.store import Registry

    def fail(self, **kw):
        raise sqlite3.OperationalError(message)

    monkeypatch.setattr(Registry, "add_job", fail)
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(VALID["test_crash"]))
    rc = cli.main(["run", "test_crash", str(path), "--lab", str(hostile_lab)])
    err = capsys.readouterr().err
    assert_clean_refusal(rc, err, hostile_lab, 0, code=1)
    return err


def test_locked_registry_on_submit(hostile_lab, tmp_path, monkeypatch, capsys):
    err = _submit_while_add_job_raises("database is locked", hostile_lab, tmp_path,
                                       monkeypatch, capsys)
    assert "locked by another process" in err


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_on_jobs_exits_1_with_a_message(hostile_lab, monkeypatch, capsys):
    monkeypatch.setattr(Lab, "registry", _no_space)
    rc = cli.main(["jobs", "--lab", str(hostile_lab)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "no space left on the device" in err and "Free some space" in err


def test_full_database_on_submit_queues_nothing(hostile_lab, tmp_path, monkeypatch, capsys):
    err = _submit_while_add_job_raises("database or disk is full", hostile_lab, tmp_path,
                                       monkeypatch, capsys)
    assert "no space left on the device" in err


def _full_disk_writing_job_config(monkeypatch):
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "config.yaml" and self.parent.parent.name == "jobs":
            _no_space()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def test_full_disk_writing_the_job_folder_exits_1(hostile_lab, tmp_path, monkeypatch, capsys):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(VALID["test_crash"]))
    _full_disk_writing_job_config(monkeypatch)
    rc = cli.main(["run", "test_crash", str(path), "--lab", str(hostile_lab)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "no space left on the device" in err


def test_full_disk_writing_the_job_folder_queues_nothing(hostile_lab, tmp_path, monkeypatch,
                                                          capsys):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(VALID["test_crash"]))
    _full_disk_writing_job_config(monkeypatch)
    cli.main(["run", "test_crash", str(path), "--lab", str(hostile_lab)])
    assert job_count(hostile_lab) == 0


def test_unexpected_errors_print_one_line_and_a_hint(hostile_lab, tmp_path, monkeypatch,
                                                     capsys):
    from app import jobs

    def boom(path):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(jobs, "load_config_file", boom)
    rc = cli.main(["run", "evaluate", str(tmp_path / "x.yaml"), "--lab", str(hostile_lab)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "error: RuntimeError: kaboom" in err and "WEIGHTSMITH_DEBUG=1" in err
    monkeypatch.setenv("WEIGHTSMITH_DEBUG", "1")
    assert cli.main(["run", "evaluate", str(tmp_path / "x.yaml"), "--lab",
                     str(hostile_lab)]) == 1
    assert "Traceback" in capsys.readouterr().err
