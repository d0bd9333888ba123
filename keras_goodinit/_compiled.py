"""Compiled TensorFlow kernels that are traced once per signature, never retraced."""

from __future__ import annotations

import functools
from collections.abc import Callable

import tensorflow as tf


def per_signature(fn: Callable) -> Callable:
    """`fn(*tensors, **static)` as one `tf.function` per signature, each traced once.

    Called eagerly it is a compiled kernel; called while a pass is traced it
    is one call op, however many layers share the signature, which is what
    keeps tracing a deep model cheap. A new `tf.function` per signature (not
    one retraced per shape) never triggers TensorFlow's retracing warning.
    `static` values must be hashable; `tensors` may hold None. Pass no
    constant tensor: Grappler specializes the function for every call site
    that gets one (seconds of optimization on a deep pass). Make constants
    inside `fn`, or pass them as `static` values.
    """
    functions = {}

    def call(*tensors, **static):
        tensors = tuple(None if t is None else tf.convert_to_tensor(t) for t in tensors)
        key = (tuple(None if t is None else (tuple(t.shape), t.dtype) for t in tensors),
               tuple(sorted(static.items())))
        compiled = functions.get(key)
        if compiled is None:
            # Not inlined: Grappler then optimizes one body per signature, not one per
            # layer (inlining a deep model's copies cost more than the pass itself).
            compiled = functions[key] = tf.function(
                functools.partial(fn, **static), autograph=False,
                experimental_attributes={"_noinline": True})
        return compiled(*tensors)

    return call
