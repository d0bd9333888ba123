"""Are a model's weights still the ones its initializers drew when it was built?

Keras' built-in initializers are deterministic: one seeded with an int, or
with `None` (which gets a fixed default seed when the initializer object is
made), returns the same values on every call. Calling a layer's own
initializer again therefore re-draws exactly what the layer was built with,
and a weight that differs from its re-draw was changed after the build: it
was trained, set with `set_weights`, loaded with `load_weights` or
`load_model` (whose rebuilt layers draw from new seeds before the file's
values replace them), or initialized by this package. No mark is stored, so
`model.weights` and every checkpoint format stay as they were.

Initializers that draw fresh values per call (`GoodInit(seed=None)`, any
initializer seeded with a `SeedGenerator`, lambdas, unknown classes) cannot
be re-drawn; their weights are "cannot tell", never "changed".
"""

from __future__ import annotations

import keras
from keras import ops
from keras.src.initializers import constant_initializers, random_initializers

from keras_goodinit import rules
from keras_goodinit.initializers import GoodInit
from keras_goodinit.weight_norm import (
    WeightNormalization,
    _float32_reads,
    stored_dtype,
    unit_norms,
)

# Machine epsilon per float dtype. A re-draw on the device that built the model is
# bit-identical; the few-ulp slack only absorbs transcendental functions (log, sin in
# the normal sampler) that differ in the last bits between CPU and GPU kernels.
_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
_ULPS = 4

_CONSTANT = (constant_initializers.Constant, constant_initializers.Zeros,
             constant_initializers.Ones, constant_initializers.Identity,
             constant_initializers.STFT)


def _is_int_seed(seed) -> bool:
    return isinstance(seed, int) and not isinstance(seed, bool)


def _redraw_cost(initializer) -> int | None:
    """0 for a constant, 1 for a seeded random draw, None if it cannot be re-drawn."""
    if type(initializer) in _CONSTANT:
        return 0
    # Only Keras' own classes: a subclass may override `__call__` with a stateful draw.
    if (isinstance(initializer, random_initializers.RandomInitializer)
            and type(initializer).__module__ == random_initializers.__name__):
        return 1 if _is_int_seed(initializer.seed) else None
    if type(initializer) is GoodInit:
        return 1 if _is_int_seed(initializer.seed) else None
    return None


def _recurrent_gain_kernel(layer, variable):
    """The kernel whose unit norms `variable`, a gain of a weight-normalized recurrent
    layer (`recurrent_g`, `backward_g`, ...), started as; None for any other variable."""
    if not isinstance(layer, WeightNormalization) or layer._cells is None:
        return None
    return next((kernel for kernel, g in layer._gains if g is variable), None)


def _checks(model):
    """(cost, variable, dtype, function returning its build-time value), cheapest first."""
    checks = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for variable in layer._trainable_variables + layer._non_trainable_variables:
            dtype = stored_dtype(variable)
            if dtype not in _EPS or 0 in tuple(variable.shape):
                continue
            if isinstance(layer, WeightNormalization) and variable is layer._g:
                # `g` starts as ||v|| of the current v, whatever drew v.
                checks.append((0, variable, dtype, lambda layer=layer: unit_norms(
                    layer.v.value, layer.layout)))
                continue
            kernel = _recurrent_gain_kernel(layer, variable)
            if kernel is not None:  # a recurrent wrapper's other gains, alike
                checks.append((0, variable, dtype, lambda layer=layer, kernel=kernel: unit_norms(
                    kernel.value, layer.layout)))
                continue
            # What its build drew it from, as the layer's rule knows; None: cannot tell.
            rule = rules.rule_for(layer)
            initializer = None if rule is None else rule.build_initializer(layer, variable)
            cost = None if initializer is None else _redraw_cost(initializer)
            if cost is not None:
                # In the stored dtype, as `add_weight` drew it: a float16 draw is not a
                # float32 draw rounded to float16.
                checks.append((cost, variable, dtype, lambda i=initializer, v=variable, d=dtype: i(
                    tuple(v.shape), dtype=d)))
    # Trained weights differ almost everywhere, so the cheap checks usually decide.
    return sorted(checks, key=lambda check: check[0])


def _same(variable, dtype: str, expected) -> bool:
    work = "float64" if dtype == "float64" else "float32"
    # Rounded to the variable's dtype first, as the build stored it.
    expected = ops.cast(ops.cast(expected, dtype), work)
    value = ops.cast(variable.value, work)
    # Through NumPy: a torch parameter's value carries autograd, which float() warns about.
    difference = float(ops.convert_to_numpy(ops.max(ops.abs(value - expected))))
    scale = float(ops.convert_to_numpy(ops.max(ops.abs(expected))))
    # NaN compares False: a diverged weight counts as changed. The bound is a few ulps
    # of the stored dtype (see `_EPS`), not of float32.
    return difference <= _ULPS * _EPS[dtype] * scale


def verify(model: keras.Model) -> tuple[str | None, set[int]]:
    """The path of the first weight that is not what its initializer drew, and the ids of
    the weights checked (all checkable ones when the path is None)."""
    checked = set()
    # Raw reads: no autocast scope casts a value (or renames a dtype) while comparing.
    with _float32_reads():
        for _, variable, dtype, expected in _checks(model):
            try:
                drawn = expected()
            except Exception:  # noqa: BLE001 - a draw that cannot run says nothing
                continue
            if tuple(drawn.shape) != tuple(variable.shape):
                continue
            checked.add(id(variable))
            if not _same(variable, dtype, drawn):
                return variable.path, checked
    return None, checked


def first_changed(model: keras.Model) -> tuple[str | None, int]:
    """The path of the first weight that is not what its initializer drew, and the checks run.

    Returns `(None, 0)` when no weight can be checked, `(None, n)` when all
    `n` checkable weights still hold their build-time values.
    """
    changed, checked = verify(model)
    return changed, len(checked)
