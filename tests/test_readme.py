"""Every Python block of README.md runs as written, on its own.

A reader copies one block into a fresh interpreter: each block must define
everything it uses. So each runs in a namespace of its own, in order, with
nothing shared between them.
"""

import os
import re
import subprocess
import sys

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


# A block that picks a backend: Keras reads KERAS_BACKEND once, at import.
_BACKEND = re.compile(r"""^os\.environ\["KERAS_BACKEND"\] = "(\w+)"$""", re.M)


@pytest.mark.parametrize("line, source", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_block_runs_as_written(line, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that save files write them here
    if _BACKEND.search(source):
        _runs_in_a_fresh_process_without_tensorflow(line, source, tmp_path)
        return
    code = compile(source, f"README.md:{line}", "exec")
    exec(code, {"__name__": "__readme__"})


def _runs_in_a_fresh_process_without_tensorflow(line, source, folder):
    backend = _BACKEND.search(source).group(1)
    # None in sys.modules: `import tensorflow` fails as if it were not installed.
    script = folder / f"readme_{line}.py"
    script.write_text('import sys\nsys.modules["tensorflow"] = None\n' + source)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("KERAS_BACKEND", None)
    process = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             cwd=folder, env=env, timeout=300)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
    assert process.stdout.split()[0] == backend, process.stdout
