"""The project's own rules: every arrow between the four folders points the allowed way,
no folder has an import cycle, ops/ stays pure, and CI runs the README's test command.

The arrows (DEVELOPERS.md draws them):  app -> plugins, registry, ops;  plugins -> plugins.kit,
ops;  registry -> ops;  ops -> nothing of ours. Imports inside functions count too: a lazy
import is still an arrow."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_OPS = {"gradio", "sqlite3", "sqlite_utils", "huggingface_hub"}
FOLDERS = ("app", "plugins", "ops", "registry")
# what each folder may import of ours, and which third-party packages it must not
ALLOWED = {"app": {"app", "plugins", "ops", "registry"}, "plugins": {"plugins", "ops"},
           "registry": {"registry", "ops"}, "ops": {"ops"}}
FORBIDDEN = {"plugins": {"gradio", "sqlite3", "sqlite_utils"}, "registry": {"gradio"},
             "ops": FORBIDDEN_IN_OPS}


def _module_name(file: Path) -> str:
    parts = list(file.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(f): f for folder in FOLDERS for f in (REPO / folder).rglob("*.py")}


def _imports(file: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every absolute import in a file, lazy ones included; for
    `from a.b import c` both a.b and a.b.c (c may be a module)."""
    out = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _ours(name: str) -> str | None:
    """The module of ours an imported name is (or lies in), if any."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, file in MODULES.items():
        targets = {_ours(name) for _, name in _imports(file)} - {None, module}
        # importing a package one is inside of is not an arrow (plugins.kit -> plugins)
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    return graph


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_arrow_points_the_allowed_way(folder):
    offenders = []
    for file in sorted((REPO / folder).rglob("*.py")):
        for line, name in _imports(file):
            top = name.split(".")[0]
            where = f"{file.relative_to(REPO)}:{line}: {name}"
            if top in FOLDERS and top not in ALLOWED[folder]:
                offenders.append(where)
            if top in FORBIDDEN.get(folder, ()):
                offenders.append(where)
    assert not offenders, f"{folder}/ may import {sorted(ALLOWED[folder])} of ours and none " \
                          f"of {sorted(FORBIDDEN.get(folder, ()))}:\n" + "\n".join(offenders)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_import_cycle_inside_a_folder(folder):
    graph = {m: {t for t in targets if t.split(".")[0] == folder}
             for m, targets in import_graph().items() if m.split(".")[0] == folder}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


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


def test_discovering_the_plugins_loads_neither_app_nor_registry_nor_torch():
    import subprocess
    import sys

    code = ("import sys, plugins; found = plugins.discover(); "
            "assert not plugins.load_errors(), plugins.load_errors(); "
            "print(len(found), sorted(m for m in sys.modules if m.split('.')[0] in "
            "('app', 'registry', 'torch', 'gradio', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split(" ", 1)
    assert int(out[0]) >= 8
    assert out[1].strip() == "[]"


def test_every_plugin_hook_is_declared_on_the_record_not_the_config():
    """The app reads hooks from the Plugin record; a Config that still carries one as a
    method would be silently ignored."""
    import plugins

    hooks = {"gpu_requirement", "gpu_count", "processes", "lab_problems", "referenced_paths",
             "resources", "preview", "next_steps", "per_layer_series"}
    for plugin in plugins.discover().values():
        carried = sorted(h for h in hooks if callable(getattr(plugin.Config, h, None)))
        assert not carried, f"{plugin.name}: Config carries {carried}"
