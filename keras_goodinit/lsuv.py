"""LSUV (Mishkin & Matas, 2016) and data-dependent WN init: two policies, one sweep."""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import ml_dtypes
import numpy as np
from keras import ops

from keras_goodinit import _data, _distribute, _sweep
from keras_goodinit.initializers import GoodInit
from keras_goodinit.report import InitReport, LayerRecord
from keras_goodinit.weight_norm import unit_norms

MEASURES = ("pre_activation", "post_activation")
PRE_INITS = ("orthogonal", None)
# Bounds one step's scale factor, so a near-dead layer is not blown up in one go.
MAX_STEP = 100.0

_OK, _MAX_ITER, _NON_FINITE, _DEAD = 0, 1, 2, 3
_STATUS = {_OK: ("ok", ""), _MAX_ITER: ("max_iter", "reached max_iter"),
           _NON_FINITE: ("skipped", "non-finite variance"),
           _DEAD: ("skipped", "variance below epsilon (dead or constant output)")}


def _relative_floor(dtype) -> float:
    """Variance, relative to the mean square, that rounding alone can make.

    That of the output's own dtype, plus that of float32 sums over many terms
    (tree reductions: the error grows like log2 of the count, under 64 eps).
    A variance this small says the layer is dead or constant, not small.
    """
    eps = float(ml_dtypes.finfo(keras.backend.standardize_dtype(dtype)).eps)
    return eps**2 + (64 * float(ml_dtypes.finfo("float32").eps)) ** 2


def _cells(target, y):
    """Per-cell means, variances (float64, keepdims) and the bias in the same cells."""
    mean, var = _sweep.cell_moments(y, target.cell_axes(len(y.shape)))
    return mean, var, target.bias_cells(mean.shape)


def _total_variance(mean, var) -> float:
    # Law of total variance over equal-sized cells.
    return float(np.mean(var) + np.var(mean))


def _solve_scale(variance, *, target_var: float, tol: float, max_iter: int, dead: bool):
    """The LSUV iteration on a variance function of the kernel scale c (host floats)."""
    var_before = variance(1.0)
    if not math.isfinite(var_before):
        return 1.0, var_before, var_before, 0, _NON_FINITE
    if dead:
        return 1.0, var_before, var_before, 0, _DEAD
    scale, var, iterations = 1.0, var_before, 0
    while abs(var - target_var) >= tol and iterations < max_iter:
        scale *= min(max(math.sqrt(target_var / var), 1.0 / MAX_STEP), MAX_STEP)
        var = variance(scale)
        iterations += 1
    code = _OK if abs(var - target_var) < tol else _MAX_ITER
    return scale, var_before, var, iterations, code


def _lsuv_policy(*, target_var: float, tol: float, max_iter: int, measure: str):
    """Per layer: scale the kernel by c until the output variance is within tol of target_var.

    Scaling the kernel by c turns the output y into c * y + (1 - c) * b exactly.
    """

    def policy(target, y, activation, state):
        if state is None:
            mean, var, bias = _cells(target, y)
            # Only the kernel's part y - b scales; if it is rounding noise, so is any scale.
            kernel_var = _total_variance(mean - bias, var)
            power = float(np.mean(var) + np.mean(np.square(mean)))
            dead = kernel_var <= _relative_floor(y.dtype) * power
            if measure == "pre_activation":
                def variance(c):
                    return _total_variance(c * mean + (1.0 - c) * bias, c * c * var)
            else:
                def variance(c):
                    out = activation(_sweep.affine(y, c, (1.0 - c) * bias))
                    return _total_variance(*_sweep.cell_moments(out, tuple(range(len(y.shape)))))
            scale, before, after, iterations, code = _solve_scale(
                variance, target_var=target_var, tol=tol, max_iter=max_iter,
                dead=dead)
            state = {"scale": scale, "var_before": before, "var_after": after,
                     "iterations": iterations, "code": code,
                     "shift": (1.0 - scale) * bias}
        if state["scale"] != 1.0:
            y = _sweep.affine(y, state["scale"], state["shift"])
        return activation(y), state

    return policy


def _data_init_policy():
    """Per unit of a WN layer: g = 1/sigma, b = -mu/sigma of the normalized-v output."""

    def policy(target, y, activation, state):
        if state is None:
            mean, var, bias = _cells(target, y)
            state = _unit_init(target, mean, var, bias, _relative_floor(y.dtype))
        if target.is_weight_normalized and state["valid"].any():
            y = _sweep.affine(y, state["scale"], state["shift"])
        return activation(y), state

    return policy


def _unit_init(target, mean, var, bias, relative_floor: float) -> dict:
    """New g and b per unit, and the output's per-unit affine map; dead units keep theirs."""
    before = _total_variance(mean, var)
    if not target.is_weight_normalized:
        return {"var_before": before, "var_after": before, "valid": np.zeros(mean.size, bool),
                "scale": np.ones(mean.shape)}
    g = np.reshape(ops.convert_to_numpy(target.layer.g).astype("float64"), mean.shape)
    # The statistics of x . v/||v|| (the normalized v): undo the current g.
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = (mean - bias) / g
        sigma = np.sqrt(var) / np.abs(g)
    valid = np.isfinite(sigma) & np.isfinite(mu) & (var > relative_floor * (var + np.square(mean)))
    safe_sigma = np.where(valid, sigma, 1.0)
    new_g = np.where(valid, 1.0 / safe_sigma, g)
    new_bias = np.where(valid, -mu / safe_sigma, bias) if target.bias is not None else bias
    # y = g * n + b becomes new_g * n + new_b, i.e. y * (new_g / g) + (new_b - b * new_g / g).
    scale = np.where(valid, new_g / np.where(valid, g, 1.0), 1.0)
    shift = new_bias - bias * scale
    after = _total_variance(mean * scale + shift, var * scale**2)
    return {"var_before": before, "var_after": after, "valid": valid.ravel(),
            "g": new_g, "bias": new_bias.ravel(), "scale": scale, "shift": shift}


def _check_common(model, verbose) -> None:
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            f"Argument `model` must be a Keras model or layer. Received: model={model!r}")
    if verbose not in (0, 1, 2, True, False):
        raise ValueError(f"Argument `verbose` must be 0, 1 or 2. Received: verbose={verbose!r}")


def _prepare(model, data, layers):
    """First batch, checked; the model's targets."""
    x = _data.first_batch(data)
    _data.check_batch(x)
    return x, _sweep.prepare(model, x, layers)


def _progbar(total: int, verbose, label: str):
    return keras.utils.Progbar(total, verbose=verbose, unit_name=label) if verbose else None


def _reached(targets, result):
    """Targets in execution order; those the pass never reached are reported last."""
    missed = [t for t in targets if id(t) not in result.states]
    return result.order, missed


def _not_called(target) -> LayerRecord:
    return LayerRecord(target.name, target.class_name, math.nan, math.nan, 0, 1.0, "skipped",
                       "not called in the forward pass")


def _shared_note(result, target) -> str:
    calls = result.calls.get(id(target), 0)
    return f"called {calls} times; measured at its first call" if calls > 1 else ""


def lsuv_init(
    model: keras.Model,
    data,
    tol: float = 0.1,
    max_iter: int = 10,
    target_var: float = 1.0,
    pre_init: str | None = "orthogonal",
    measure: str = "pre_activation",
    layers: Sequence[keras.layers.Layer | str] | None = None,
    new_batch_per_trial: bool = False,
    verbose: int = 1,
    seed: int | None = None,
) -> InitReport:
    """Layer-sequential unit-variance init: rescales every kernel so its output has unit variance.

    Every layer that applies a kernel linearly (Dense, EinsumDense, Conv*,
    Conv*Transpose, DepthwiseConv*, SeparableConv* via the pointwise kernel,
    and `WeightNormalization`-wrapped layers via `g`) is visited in execution
    order, through nested and subclassed models. On a fixed batch each layer is
    evaluated once: scaling a kernel by c turns its output y into
    `c * (y - b) + b` exactly, so the iterations reuse y and the next layer
    sees the rescaled signal. The whole sweep costs about one forward pass,
    runs with `training=False`, and computes statistics in float32.

    A layer whose variance is not finite or is below a dtype-aware epsilon
    (dead or constant) is skipped and keeps its (pre-initialized) weights.
    If anything raises, every weight is restored exactly.

    Examples:

    >>> model = keras.Sequential([keras.Input((16,)),
    ...                           keras.layers.Dense(32, activation="relu"),
    ...                           keras.layers.Dense(4)])
    >>> x = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")
    >>> report = lsuv_init(model, x, verbose=0)
    >>> [row.status for row in report.rows]
    ['ok', 'ok']

    Args:
        model: A Keras model (Sequential, functional or subclassed).
        data: A batch (array, tensor, `(x, y[, w])` tuple or dict of inputs),
            a `tf.data.Dataset` or a `keras.utils.PyDataset` (its first batch).
        tol: Stop when `|var - target_var| < tol`.
        max_iter: Most scale steps per layer; reaching it is reported.
        target_var: The variance to reach.
        pre_init: `"orthogonal"` re-draws every target kernel with orthonormal
            directions first (as in the paper), or `None` to keep the kernels.
        measure: `"pre_activation"` (before a fused activation, as in the
            paper) or `"post_activation"`.
        layers: Only these layers (objects or names); default all targets.
        new_batch_per_trial: Each trial draws the next batch of `data`, as in
            the reference implementation: each trial is one sweep that takes
            one scale step at every layer that has not converged.
        verbose: 0 silent, 1 progress bar.
        seed: Makes the orthogonal pre-init reproducible; `None` draws from
            Keras' global seed generator (`keras.utils.set_random_seed`).

    Returns:
        An `InitReport` with one row per target layer, in execution order.

    Reference:
        - [Mishkin & Matas, 2016](https://arxiv.org/abs/1511.06422)
    """
    _check_common(model, verbose)
    _check_positive("tol", tol)
    _check_positive("target_var", target_var)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(
            f"Argument `max_iter` must be a positive int. Received: max_iter={max_iter!r}")
    if pre_init not in PRE_INITS:
        raise ValueError(
            f"Argument `pre_init` must be one of {PRE_INITS}. Received: pre_init={pre_init!r}")
    if measure not in MEASURES:
        raise ValueError(
            f"Argument `measure` must be one of {MEASURES}. Received: measure={measure!r}")
    if not isinstance(new_batch_per_trial, bool):
        raise ValueError("Argument `new_batch_per_trial` must be a bool. "
                         f"Received: new_batch_per_trial={new_batch_per_trial!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"Argument `seed` must be an int or None. Received: seed={seed!r}")
    x, targets = _prepare(model, data, layers)
    variables = [v for t in targets for v in t.variables()]
    with _sweep.atomic(variables):
        if pre_init == "orthogonal":
            _orthogonal_pre_init(targets, seed)
        if new_batch_per_trial:
            report = _lsuv_trials(model, data, targets, target_var=target_var, tol=tol,
                                  max_iter=max_iter, measure=measure, verbose=verbose)
        else:
            policy = _lsuv_policy(target_var=target_var, tol=tol, max_iter=max_iter,
                                  measure=measure)
            result = _sweep.sweep(model, x, targets, policy)
            report = InitReport("lsuv", _commit_lsuv(result, targets, verbose))
        _distribute.broadcast_from_chief(variables)
        return report


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"Argument `{name}` must be a positive number. Received: {name}={value!r}")


def _orthogonal_pre_init(targets, seed: int | None) -> None:
    """Orthonormal directions with unit-norm fan-in vectors, in each kernel's own layout."""
    groups = {}
    for target in targets:
        variable = target.direction_variable
        key = (tuple(variable.shape), variable.dtype, target.kernel_layout)
        groups.setdefault(key, []).append(target)
    for index, ((shape, dtype, layout), members) in enumerate(groups.items()):
        group_seed = None if seed is None else seed + index
        init = GoodInit("wn_relu_backward", gamma=1.0, layout=layout, seed=group_seed)
        kernels = init.draw(shape, dtype, count=len(members))  # one batched QR per shape
        for target, kernel in zip(members, ops.unstack(kernels)):
            target.direction_variable.assign(kernel)
            if target.is_weight_normalized:  # the wrapper then computes the new kernel
                g = target.layer.g
                g.assign(ops.reshape(unit_norms(kernel, layout), g.shape))


def _lsuv_rows(result, targets, progbar=None):
    """Report rows, and the scale to apply per target, from a sweep's states."""
    order, missed = _reached(targets, result)
    rows, scales = [], []
    for target in order:
        state = result.states[id(target)]
        status, reason = _STATUS[state["code"]]
        note = _shared_note(result, target)
        rows.append(LayerRecord(target.name, target.class_name, float(state["var_before"]),
                                float(state["var_after"]), int(state["iterations"]),
                                float(state["scale"]), status,
                                "; ".join(r for r in (reason, note) if r)))
        scales.append((target, float(state["scale"])))
        if progbar is not None:
            progbar.add(1)
    return rows + [_not_called(t) for t in missed], scales


def _apply_scales(scales) -> None:
    for target, scale in scales:
        if scale != 1.0:
            variable = target.scale_variable
            variable.assign(variable.value * ops.cast(scale, variable.dtype))


def _commit_lsuv(result, targets, verbose):
    rows, scales = _lsuv_rows(result, targets, _progbar(len(targets), verbose, "layer"))
    _apply_scales(scales)
    return rows


def _lsuv_trials(model, data, targets, *, target_var, tol, max_iter, measure, verbose):
    """One sweep per trial, each on the next batch, each taking one scale step per layer."""
    policy = _lsuv_policy(target_var=target_var, tol=tol, max_iter=1, measure=measure)
    progbar = _progbar(max_iter, verbose, "trial")
    first_var, scales, steps, rows = {}, {}, {}, []
    for trial, x in enumerate(_data.batches(data)):
        _data.check_batch(x)
        result = _sweep.sweep(model, x, targets, policy)
        rows, trial_scales = _lsuv_rows(result, targets)
        _apply_scales(trial_scales)
        for row in rows:
            first_var.setdefault(row.name, row.var_before)
            scales[row.name] = scales.get(row.name, 1.0) * row.scale
            steps[row.name] = steps.get(row.name, 0) + row.iterations
        if progbar is not None:
            progbar.add(1)
        converged = all(row.iterations == 0 for row in rows)
        if converged or trial + 1 == max_iter:
            break
    for row in rows:
        row.var_before = first_var.get(row.name, row.var_before)
        row.scale, row.iterations = scales.get(row.name, 1.0), steps.get(row.name, 0)
        if converged and row.status == "max_iter":
            row.status, row.reason = "ok", ""
    return InitReport("lsuv", rows, batches=trial + 1)


def weightnorm_data_init(
    model: keras.Model,
    data,
    layers: Sequence[keras.layers.Layer | str] | None = None,
    verbose: int = 1,
) -> InitReport:
    """Data-dependent init of weight-normalized layers (Salimans & Kingma, 2016).

    Layer by layer in execution order, on one batch, each
    `WeightNormalization` layer's output with `g = 1, b = 0` (that is,
    `x . v/||v||`) has per-unit mean mu and std sigma; the init sets
    `g = 1/sigma` and `b = -mu/sigma`, so every unit starts with zero mean
    and unit variance on the batch, before its activation. It shares LSUV's
    sweep: one forward pass, statistics in float32, `training=False`.
    Units with a non-finite or (near-)zero sigma keep their weights; layers
    that are not weight-normalized are reported as skipped.

    Examples:

    >>> from keras_goodinit import WeightNormalization
    >>> model = keras.Sequential([
    ...     keras.Input((16,)),
    ...     WeightNormalization(keras.layers.Dense(32, activation="relu")),
    ...     keras.layers.Dense(4)])
    >>> x = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")
    >>> report = weightnorm_data_init(model, x, verbose=0)

    Args:
        model: A Keras model with `WeightNormalization` layers.
        data: As for `lsuv_init`; the first batch is used.
        layers: Only these layers (objects or names); default all targets.
        verbose: 0 silent, 1 progress bar.

    Returns:
        An `InitReport`; `scale` is the mean over units of the factor applied.

    Reference:
        - [Salimans & Kingma, 2016](https://arxiv.org/abs/1602.07868)
    """
    _check_common(model, verbose)
    x, targets = _prepare(model, data, layers)
    variables = [v for t in targets for v in t.variables()]
    with _sweep.atomic(variables):
        result = _sweep.sweep(model, x, targets, _data_init_policy())
        order, missed = _reached(targets, result)
        progbar = _progbar(len(targets), verbose, "layer")
        rows = []
        for target in order:
            state = result.states[id(target)]
            rows.append(_data_init_row(target, state, _shared_note(result, target)))
            if target.is_weight_normalized and state["valid"].any():
                g = target.layer.g
                g.assign(np.reshape(state["g"], g.shape).astype(g.dtype))
                if target.bias is not None:
                    target.bias.assign(state["bias"].astype(target.bias.dtype))
            if progbar is not None:
                progbar.add(1)
        _distribute.broadcast_from_chief(variables)
        return InitReport("weightnorm_data_init", rows + [_not_called(t) for t in missed])


def _data_init_row(target, state, note) -> LayerRecord:
    valid = state["valid"]
    if not target.is_weight_normalized:
        status, reason = "skipped", "not weight-normalized"
    elif not valid.any():
        status, reason = "skipped", "every unit has a non-finite or zero std (dead layer)"
    else:
        status = "ok"
        dead = int((~valid).sum())
        reason = f"{dead} of {valid.size} units dead, kept as they were" if dead else ""
    reason = "; ".join(r for r in (reason, note) if r)
    return LayerRecord(target.name, target.class_name, float(state["var_before"]),
                       float(state["var_after"]), 1 if status == "ok" else 0,
                       float(np.mean(state["scale"])), status, reason)
