"""Text that users control, made safe to show: every name, task label, log line, progress
message and error that reaches gr.Markdown or gr.HTML goes through one of these.

Gradio sanitises the HTML its Markdown component renders, but that is a last line of
defence, not a contract: a lab member's checkpoint name must show as the characters they
typed, in an admin's browser, with no markup of theirs interpreted at all. Markdown has no
escaping function of its own in the libraries we use (markdown-it and marked escape
nothing for callers), hence these few lines.
"""

from __future__ import annotations

import html as _html
import re

# Markdown syntax that can start anywhere in a line: emphasis, code spans, links and images,
# table cells, strikethrough, and the backslash itself. An underscore inside a word
# (`nll_per_token`) is no emphasis in CommonMark, so only one at a word's edge is escaped.
_MD_SPECIAL = re.compile(r"([\\`*\[\]|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")
# ...and what only counts at the start of a line: headings, lists, quotes.
_MD_LINE_START = re.compile(r"^(\d*)([#>+\-!.)])")


def md(text) -> str:
    """`text` as literal characters inside Markdown (not inside a code span): HTML special
    characters become entities and Markdown punctuation is backslash-escaped; line breaks
    become spaces, so that a value cannot start a heading, a list or a table row."""
    text = "" if text is None else str(text)
    text = " ".join(text.replace("\r", " ").split("\n"))
    text = _MD_SPECIAL.sub(r"\\\1", _html.escape(text, quote=False))
    return _MD_LINE_START.sub(r"\1\\\2", text)


def html(text) -> str:
    """`text` as literal characters inside HTML (gr.HTML)."""
    return _html.escape("" if text is None else str(text), quote=True)


def code_block(text, language: str = "") -> str:
    """`text` as a fenced Markdown code block, shown verbatim. The fence is longer than any
    run of backticks inside, so the text cannot close it (CommonMark's rule)."""
    text = "" if text is None else str(text)
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def lines(items) -> str:
    """A Markdown bullet list of messages (validation problems, refusals), each escaped."""
    return "\n".join(f"- {md(item)}" for item in items)
