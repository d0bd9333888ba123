"""Runs the Python blocks of a Markdown page (README.md, docs/) as a reader would.

Shared by tests/test_readme.py and tests/test_docs.py. A block that sets
KERAS_BACKEND runs alone in a fresh process where TensorFlow cannot be
imported (Keras reads the variable once, at import, and a JAX or PyTorch user
may not have TensorFlow); every other block runs in this process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), os.pardir))

# A block that picks a backend: Keras reads KERAS_BACKEND once, at import.
BACKEND = re.compile(r"""^os\.environ\["KERAS_BACKEND"\] = "(\w+)"$""", re.M)


def python_blocks(path: str) -> list[tuple[int, str]]:
    """The ```python blocks of a Markdown file, as (line of the fence, source)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(1)))
    return blocks


def sets_backend(source: str) -> bool:
    return BACKEND.search(source) is not None


def run_here(label: str, source: str, namespace: dict) -> None:
    """Runs a block in `namespace`; a traceback names it as `label` (file:line)."""
    exec(compile(source, label, "exec"), namespace)


def run_in_a_fresh_process_without_tensorflow(label: str, source: str, folder) -> str:
    """Runs a block that sets KERAS_BACKEND in a new interpreter; returns its stdout.

    The block must print `keras.backend.backend()` first, so that the test
    sees which backend ran.
    """
    backend = BACKEND.search(source).group(1)
    # None in sys.modules: `import tensorflow` fails as if it were not installed.
    name = re.sub(r"\W", "_", label)
    script = os.path.join(str(folder), f"{name}.py")
    with open(script, "w", encoding="utf-8") as handle:
        handle.write('import sys\nsys.modules["tensorflow"] = None\n' + source)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("KERAS_BACKEND", None)
    process = subprocess.run([sys.executable, script], capture_output=True, text=True,
                             cwd=folder, env=env, timeout=300)
    assert process.returncode == 0, (label + "\n" + process.stdout[-2000:]
                                     + process.stderr[-3000:])
    assert process.stdout.split()[:1] == [backend], (
        f"{label} sets KERAS_BACKEND={backend!r} and must print keras.backend.backend() "
        f"first. Received stdout: {process.stdout[-500:]!r}")
    return process.stdout
