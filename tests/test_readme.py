"""Every Python block of README.md runs as written, on its own.

A reader copies one block into a fresh interpreter: each block must define
everything it uses. So each runs in a namespace of its own, in order, with
nothing shared between them.
"""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def python_blocks() -> list[tuple[int, str]]:
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, BLOCKS


@pytest.mark.parametrize("line, source", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_block_runs_as_written(line, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that save files write them here
    code = compile(source, f"README.md:{line}", "exec")
    exec(code, {"__name__": "__readme__"})
