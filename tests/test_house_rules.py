"""The project's own rules: ops/ stays pure; CI runs the README's test command."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_OPS = {"gradio", "sqlite3", "sqlite_utils", "huggingface_hub"}


def test_ops_never_imports_ui_database_or_hub_code():
    offenders = []
    for file in (REPO / "ops").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{file.relative_to(REPO)}: {n}" for n in names
                          if n.split(".")[0] in FORBIDDEN_IN_OPS]
    assert not offenders, offenders


def readme_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", text, re.S)
    return [b.strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    test_cmd = next(c for c in readme_commands() if "pytest" in c)
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci, "the README's test command must appear verbatim in .ci/run"


def test_readme_has_exactly_two_setup_commands():
    setup = [c for c in readme_commands() if "pip install" in c]
    assert len(setup) == 2, setup
    assert any("weightsmith serve" in c for c in setup)
    assert any("pytest" in c for c in setup)
