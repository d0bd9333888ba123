"""Compiled TensorFlow kernels that are traced once per signature, never retraced."""

from __future__ import annotations

import functools
from collections.abc import Callable

from keras_goodinit import _backend
from keras_goodinit._backend import tf  # TensorFlow, imported on first use


def per_signature(fn: Callable, *, any_shape: bool = False) -> Callable:
    """`fn(*tensors, **static)` as one `tf.function` per signature, each traced once.

    Called eagerly it is a compiled kernel; called while a pass is traced it
    is one call op, however many layers share the signature, which is what
    keeps tracing a deep model cheap. A new `tf.function` per signature (not
    one retraced per shape) never triggers TensorFlow's retracing warning.
    `static` values must be hashable; `tensors` may hold None. With
    `any_shape`, the signature is each tensor's rank and dtype only: one
    trace serves every shape (`fn` must then read sizes with `tf.shape`),
    which makes a first call on a model of many shapes much cheaper. Pass no
    constant tensor: Grappler specializes the function for every call site
    that gets one (seconds of optimization on a deep pass). Make constants
    inside `fn`, or pass them as `static` values.
    """
    functions = {}

    def signature(tensor):
        if tensor is None:
            return None
        shape = (None,) * tensor.shape.rank if any_shape else tuple(tensor.shape)
        return shape, tensor.dtype

    def call(*tensors, **static):
        if not _backend.is_tensorflow():  # the sweep runs eagerly there, op by op
            return fn(*tensors, **static)
        tensors = tuple(None if t is None else tf.convert_to_tensor(t) for t in tensors)
        key = (tuple(signature(t) for t in tensors), tuple(sorted(static.items())))
        compiled = functions.get(key)
        if compiled is None:
            compiled = functions[key] = _compile(fn, key[0], static)
        return compiled(*(t for t in tensors if t is not None))

    return call


def _compile(fn, signature, static):
    """A tf.function of the tensors that are not None; the Nones are put back inside."""
    present = tuple(s is not None for s in signature)
    specs = [tf.TensorSpec(*s) for s in signature if s is not None]
    # A partial, not a closure: TensorFlow counts new tf.functions of one code object
    # as retracing, and would warn on a model of many shapes.
    body = functools.partial(_with_nones, fn, present, static)
    # Not inlined: Grappler then optimizes one body per signature, not one per
    # layer (inlining a deep model's copies cost more than the pass itself).
    return tf.function(body, input_signature=specs, autograph=False,
                       experimental_attributes={"_noinline": True})


def _with_nones(fn, present, static, *tensors):
    given = iter(tensors)
    return fn(*(next(given) if here else None for here in present), **static)
