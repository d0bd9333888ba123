"""Shared pytest setup for the tests and the docstring examples.

Quiets TensorFlow, isolates tests from each other's Keras state, and gives
every doctest the names its example assumes: `np`, `keras` and the public API.
"""

import os

# Must be set before TensorFlow is first imported (by keras or keras_goodinit).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_goodinit  # noqa: E402

# Scripts the distributed and backend tests run in a subprocess, with arguments; not
# importable here (the backend worker makes TensorFlow unimportable in its process).
collect_ignore = ["tests/_distributed_worker.py", "tests/_backend_worker.py"]


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
