"""The one YAML loader for everything Weightsmith parses: form fields, config files, pasted
mergekit configurations, suites, task files and model-card front matter.

Why by hand: PyYAML's `safe_load` builds no Python objects from tags, but it expands aliases.
A few hundred bytes of nested aliases (`a: &a [x, x, ...]`, `b: &b [*a, *a, ...]`, ...) expand
to millions of nodes, and cost seconds and hundreds of MiB in whichever process reads them
(the web server, for a form field). PyYAML has no limits to set, so this loader adds them
while it composes the document, before anything is built:

- an alias may repeat a scalar (`*name` standing for a string or number), never a mapping or
  a list, which is what makes an alias expand;
- at most `max_bytes` of text, `max_depth` levels of nesting, and `max_nodes` nodes.

Everything else is `yaml.SafeLoader`. It lives in ops/ because ops/ is the layer that app/,
plugins/ and registry/ may all import; it imports nothing of ours.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_BYTES = 1 << 20  # 1 MiB: a config or a suite file; data lives in JSONL files, not here
MAX_DEPTH = 64
MAX_NODES = 100_000


class YamlError(ValueError):
    """Text that is not YAML, or that breaks one of the loader's limits. The message says
    where (line and column) and what was expected."""


def _where(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"


class _BoundedLoader(yaml.SafeLoader):
    max_depth = MAX_DEPTH
    max_nodes = MAX_NODES

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and not isinstance(target, yaml.ScalarNode):
                raise YamlError(
                    f"{_where(event.start_mark)}: the alias *{event.anchor} repeats a "
                    f"{'mapping' if isinstance(target, yaml.MappingNode) else 'list'}; "
                    f"aliases that expand (and `<<:` merge keys) are not accepted (write "
                    f"the value out, or use aliases for single values only)")
        self._nodes += 1
        if self._nodes > self.max_nodes:
            raise YamlError(f"more than {self.max_nodes} values; expected a smaller document")
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                mark = self.peek_event().start_mark
                raise YamlError(f"{_where(mark)}: nested more than {self.max_depth} levels "
                                f"deep; expected a flatter document")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load(text: str | bytes, *, what: str = "YAML", max_bytes: int = MAX_BYTES,
         max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> Any:
    """Parse one YAML document with the limits above; raises YamlError naming `what` (a field
    or a file) and the problem. Bytes must be UTF-8."""
    if isinstance(text, bytes):
        if len(text) > max_bytes:
            raise YamlError(f"{what}: {len(text)} bytes; expected at most {max_bytes}")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise YamlError(f"{what}: not UTF-8 text (byte {e.start}); expected a YAML "
                            f"text file") from None
    if not isinstance(text, str):
        raise YamlError(f"{what}: expected YAML text, got {type(text).__name__}")
    if len(text) > max_bytes:  # characters, checked before the bytes' cost of encoding
        raise YamlError(f"{what}: {len(text)} characters; expected at most {max_bytes}")
    if "\x00" in text:
        raise YamlError(f"{what}: contains a NUL byte; expected YAML text")
    loader = _BoundedLoader(text)
    loader.max_depth, loader.max_nodes = max_depth, max_nodes
    try:
        return loader.get_single_data()
    except YamlError as e:
        raise YamlError(f"{what}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise YamlError(f"{what}: invalid YAML at {_where(mark)}: {problem}") from None
    except RecursionError:
        raise YamlError(f"{what}: nested too deeply; expected a flatter document") from None
    finally:
        loader.dispose()
