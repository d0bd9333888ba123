"""Shared pytest setup for the tests and the docstring examples.

Quiets TensorFlow, isolates tests from each other's Keras state, and gives
every doctest the names its example assumes: `np`, `keras` and the public API.
"""

import os

# Must be set before TensorFlow is first imported (by keras or keras_goodinit).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The processes the tests start (backend and distributed workers, example scripts, README
# blocks) inherit this environment: they import this checkout's keras_goodinit, as the tests
# do, not a copy pip installed into the environment before the last edit.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [os.path.dirname(os.path.abspath(__file__))]
    + [path for path in [os.environ.get("PYTHONPATH")] if path])

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_goodinit  # noqa: E402

# Scripts the distributed and backend tests run in a subprocess, with arguments; not
# importable here (the backend worker makes TensorFlow unimportable in its process).
collect_ignore = ["tests/_distributed_worker.py", "tests/_backend_worker.py"]


# The test files that take longest, longest first (from `pytest --durations=60` on 2 loaded
# cores). `--dist loadfile` hands each xdist worker whole files, in collection order (with
# --no-loadscope-reorder, set in setup.cfg: xdist would otherwise order files by their
# number of tests): starting the long files first lets the short ones fill in at the end,
# instead of one long file running alone after every other has finished.
_LONGEST_FIRST = (  # sums of the slowest-60 durations, at load 11-34: seconds
    "tests/test_backends.py",         # 1870 (worker setup)
    "tests/test_mixed_precision.py",  # 1895
    "tests/test_resume.py",           # 1000
    "tests/test_train_example.py",    # 530
    "tests/test_weight_norm.py",      # 340
    "tests/test_distributed.py",      # 320 (worker setup)
    "tests/test_compiled_sweep.py",   # 250
    "tests/test_diagnostics.py",      # 207
    "tests/test_science.py",          # 186
    "tests/test_readme.py",           # 162
    "tests/test_serialization.py",    # 150
    "tests/test_bad_input.py",        # 103
    "tests/test_compare_inits.py",    # 76 (one subprocess)
)


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(_LONGEST_FIRST)}
    # A stable sort: the other files, and the tests within each file, keep their order.
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Clears Keras' global state after each test, so no test leaks it into the next."""
    yield
    # free_memory=False skips a full gc.collect(), which costs ~0.4 s per test with TF loaded.
    keras.backend.clear_session(free_memory=False)
    keras.config.set_dtype_policy("float32")


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(np=np, keras=keras)
    doctest_namespace.update({name: getattr(keras_goodinit, name)
                              for name in keras_goodinit.__all__})
