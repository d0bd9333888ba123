"""Every Python block of README.md runs as written, on its own.

A reader copies one block into a fresh interpreter: each block must define
everything it uses. So each runs in a namespace of its own, in order, with
nothing shared between them.
"""

import os

import pytest
from _markdown_blocks import (
    ROOT,
    run_here,
    run_in_a_fresh_process_without_tensorflow,
    sets_backend,
)
from _markdown_blocks import python_blocks as _blocks_of

README = os.path.join(ROOT, "README.md")


def python_blocks() -> list[tuple[int, str]]:
    return _blocks_of(README)


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, BLOCKS


@pytest.mark.parametrize("line, source", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_block_runs_as_written(line, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that save files write them here
    if sets_backend(source):
        run_in_a_fresh_process_without_tensorflow(f"README.md:{line}", source, tmp_path)
        return
    run_here(f"README.md:{line}", source, {"__name__": "__readme__"})
