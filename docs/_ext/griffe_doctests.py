"""A griffe extension for the API pages: doctest examples become `pycon` code blocks.

The docstrings follow Keras' style, where an `Examples:` header is followed by
a blank line and unindented `>>>` lines. Read as Markdown, such lines are prose
(a printed `['ok']` even looks like a link), so each run of `>>>`/`...` lines
and their output, up to a blank line, is fenced as a console session.
"""

from __future__ import annotations

import re

import griffe

_PROMPT = re.compile(r"^(\s*)>>> ")


def fence_doctests(text: str) -> str:
    """Returns `text` with each doctest run wrapped in a ```pycon fence."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        match = _PROMPT.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group(1)
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fences the doctest runs of every docstring once the object tree is loaded."""

    def on_object(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None and ">>> " in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
