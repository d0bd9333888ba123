"""Checks, before Keras is imported, that the backend it will use is installed.

Keras itself fails on import without its backend's package, with a message
that names no extra of this package; this check runs first.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

# Per backend: the package it needs and the extra that brings it.
PACKAGES = {"tensorflow": ("tensorflow", "tf"), "jax": ("jax", "jax"), "torch": ("torch", "torch")}


def configured_backend() -> str:
    """Keras' backend as Keras reads it: KERAS_BACKEND, else keras.json, else TensorFlow."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as config:
            return json.load(config).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


BACKEND = configured_backend()
if BACKEND in PACKAGES and importlib.util.find_spec(PACKAGES[BACKEND][0]) is None:
    package, extra = PACKAGES[BACKEND]
    raise ImportError(
        f"keras-goodinit runs on Keras' {BACKEND!r} backend here (KERAS_BACKEND, else "
        f"~/.keras/keras.json, else TensorFlow), and {package} is not installed: "
        f"from a clone of keras-goodinit (it is not on PyPI), `pip install \".[{extra}]\"`. "
        "The extras are [tf], [tf-cpu] (TensorFlow's CPU-only build), [jax] and [torch]; for "
        "GPUs, `tensorflow[and-cuda]`, `jax[cuda12]` or a CUDA build of torch.")
