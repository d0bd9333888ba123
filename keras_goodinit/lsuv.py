"""LSUV (Mishkin & Matas, 2016) and data-dependent WN init: two policies, one sweep."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import keras
import ml_dtypes
import numpy as np
from keras import ops

from keras_goodinit import (
    _backend,
    _data,
    _distribute,
    _graph,
    _recurrent,
    _residual,
    _sweep,
    _tables,
    _validate,
)
from keras_goodinit.initializers import GoodInit
from keras_goodinit.report import InitReport, LayerRecord
from keras_goodinit.weight_norm import WeightNormalization, unit_norms

MEASURES = ("pre_activation", "post_activation")
PRE_INITS = ("orthogonal", None)
# Bounds one post-activation step's scale factor, so a near-dead layer is not blown up in
# one go. Pre-activation variance is exactly c**2 times the kernel part's, so its step is
# exact and unbounded: a 1e30-scale input converges in one step, not fifteen.
MAX_STEP = 100.0

_SEARCHING, _OK, _MAX_ITER, _NON_FINITE, _DEAD, _STEP_DEAD, _UNREACHABLE = range(-1, 6)
_STATUS = {_OK: ("ok", ""), _MAX_ITER: ("max_iter", "reached max_iter"),
           _NON_FINITE: ("skipped", "non-finite variance"),
           _DEAD: ("skipped", "variance below epsilon (dead or constant output)"),
           _STEP_DEAD: ("max_iter", "stopped: the next step made the activation output "
                                    "constant (every unit dead); kept the last live scale"),
           _UNREACHABLE: ("max_iter", "no kernel scale reaches target_var: the bias alone "
                                      "gives more variance; took one LSUV step")}


def _relative_floor(dtype) -> float:
    """Variance, relative to the mean square, that rounding alone can make.

    That of the output's own dtype, plus that of float32 sums over many terms
    (tree reductions: the error grows like log2 of the count, under 64 eps).
    A variance this small says the layer is dead or constant, not small.
    """
    eps = float(ml_dtypes.finfo(keras.backend.standardize_dtype(dtype)).eps)
    return eps**2 + (64 * float(ml_dtypes.finfo("float32").eps)) ** 2


def _solve_scale(variance, *, target_var, tol: float, max_iter: int, dead,
                 max_step: float = MAX_STEP) -> dict:
    """The LSUV iteration on a variance function of the kernel scale c, as tensors.

    A `while_loop` bounded by `max_iter`, so it runs inside a compiled
    pass with no host decision between layers. `target_var` may be a tensor
    (a residual branch end's target is measured in the pass). Returns scale,
    var_before, var_after, iterations and the status code (int32).
    """
    wide = _backend.wide()
    target_var = ops.cast(target_var, wide)
    var_before = variance(ops.convert_to_tensor(1.0, wide))
    # Relative: an absolute tol would accept any variance below it for a small target_var.
    margin = tol * target_var

    def code_of(var, iterations):
        return ops.where(ops.abs(var - target_var) < margin, _OK,
                         ops.where(iterations >= max_iter, _MAX_ITER, _SEARCHING))

    def searching(scale, var, iterations, code):
        return code == _SEARCHING

    def step(scale, var, iterations, code):
        factor = ops.sqrt(target_var / var)
        if math.isfinite(max_step):
            factor = ops.clip(factor, 1.0 / max_step, max_step)
        new_var = variance(scale * factor)
        iterations += 1
        # A step that makes the output constant (e.g. every biased ReLU dead) or overflow
        # stops at the last scale whose output was alive.
        alive = (new_var > 0) & ops.isfinite(new_var)
        code = ops.where(alive, code_of(new_var, iterations), _STEP_DEAD)
        return (ops.where(alive, scale * factor, scale), ops.where(alive, new_var, var),
                iterations, ops.cast(code, "int32"))

    zero = ops.convert_to_tensor(0, "int32")
    code = ops.cast(_first_code(var_before, dead, code_of(var_before, zero)), "int32")
    state = (ops.convert_to_tensor(1.0, wide), var_before, zero, code)
    scale, var, iterations, code = ops.while_loop(searching, step, state,
                                                  maximum_iterations=max_iter)
    return {"scale": scale, "var_before": var_before, "var_after": var,
            "iterations": iterations, "code": code}


def _first_code(var_before, dead, code):
    """Before any step: non-finite and dead outputs are skipped, else `code`."""
    return ops.where(~ops.isfinite(var_before), _NON_FINITE, ops.where(dead, _DEAD, code))


def _solve_quadratic(coefficients, *, target_var, tol: float, dead) -> dict:
    """`_solve_scale` for a pre-activation variance `A c^2 + B c + C`, in closed form.

    The LSUV iteration `c <- c sqrt(t / var(c))` converges to the positive
    root of `var(c) = t`, which exists whenever the bias part C alone is
    below t (or the curve dips below t); the root is taken at once, so the
    compiled pass holds no loop. Where there is none, no kernel scale reaches
    t: one LSUV step is taken and the row says `max_iter`, since more steps
    would only shrink the kernel towards zero.
    """
    a, b, c = coefficients
    wide = _backend.wide()
    target_var = ops.cast(target_var, wide)
    variance = lambda scale: (a * scale + b) * scale + c  # noqa: E731
    var_before = variance(ops.convert_to_tensor(1.0, wide))
    margin = tol * target_var
    discriminant = b * b - 4.0 * a * (c - target_var)
    root_of = ops.sqrt(ops.maximum(discriminant, 0.0))
    # The larger root of A c^2 + B c + (C - t), in the form without cancellation.
    root = ops.where(b >= 0, 2.0 * (target_var - c) / (b + root_of), (root_of - b) / (2.0 * a))
    solvable = (discriminant >= 0) & (a > 0) & ops.isfinite(root) & (root > 0)
    step = ops.where(solvable, root, ops.sqrt(target_var / var_before))
    code = _first_code(var_before, dead, ops.where(ops.abs(var_before - target_var) < margin,
                                                   _OK, _SEARCHING))
    searching = code == _SEARCHING
    scale = ops.where(searching, step, ops.ones_like(step))
    var = variance(scale)
    reached = ops.where(ops.abs(var - target_var) < margin, _OK,
                        ops.where(solvable, _MAX_ITER, _UNREACHABLE))
    return {"scale": scale, "var_before": var_before, "var_after": var,
            "iterations": ops.cast(ops.where(searching, 1, 0), "int32"),
            "code": ops.cast(ops.where(searching, reached, code), "int32")}


def _quadratic(mean, var, bias):
    """The total variance of `c * (y - b) + b` as `A c^2 + B c + C`, from y's cells.

    `mean(c^2 var) + var_cells(c d + b)` with `d = mean - b`: three scalars,
    so solving for c costs a few scalar ops whatever the layer's size.
    """
    d = mean - bias
    centred_d, centred_b = d - ops.mean(d), bias - ops.mean(bias)
    a = ops.mean(var) + ops.mean(ops.square(centred_d))
    b = 2.0 * ops.mean(centred_d * centred_b)
    c = ops.mean(ops.square(centred_b))
    return a, b, c


@dataclasses.dataclass(frozen=True, eq=False)
class _Spec:
    """What an LSUV sweep aims at: the options every trial's policy bakes into its pass.

    `followers` maps id(target) to a separate activation layer that alone
    consumes its output (post-activation statistics apply it); `ends` maps
    id(target) to its `BranchEnd` under `residual="scaled"`.
    """

    target_var: float
    tol: float
    max_iter: int
    measure: str
    followers: dict
    ends: dict

    @property
    def probes(self) -> list:
        return [end.probe for end in self.ends.values() if end.probe is not None]

    def key(self, targets, max_iter: int) -> tuple:
        """Every option `policy` bakes into a traced pass (by target position)."""
        position = {id(t): i for i, t in enumerate(targets)}
        ends = tuple(sorted((position[k], end.num_blocks) for k, end in self.ends.items()))
        return ("lsuv", self.target_var, self.tol, max_iter, self.measure,
                _follower_key(targets, self.followers), ends)

    def target_of(self, state) -> float:
        """The variance a row aimed at: target_var, or its branch end's measured share."""
        ratio = float(state.get("ratio", 1.0))
        return self.target_var * ratio if math.isfinite(ratio) else self.target_var

    def policy(self, max_iter: int):
        """Per layer: scale the kernel by c until the output variance is within tol of its target.

        Scaling the kernel by c turns the output y into c * y + (1 - c) * b
        exactly. TensorFlow ops only, so the same policy runs eagerly or in
        the compiled pass.
        """
        target_var, tol, measure = self.target_var, self.tol, self.measure

        def policy(target, y, activation, state):
            post = self.followers.get(id(target)) or activation
            if state is None:
                bias = target.bias_tensor(target.cell_shape(tuple(y.shape)))
                weights = _sweep.mask_weights(y, target.mask)
                axes = target.cell_axes(len(y.shape))
                ratio = _share(self.ends.get(id(target)), target_var)
                # A float share is static (a constant argument would make Grappler
                # specialize the kernel); a measured one is a tensor of the pass.
                aim = target_var * ratio if isinstance(ratio, float) else target_var
                measured = ratio if ops.is_tensor(ratio) else None
                if measure == "pre_activation":
                    # One compiled kernel per output signature: one op in the traced pass.
                    y, state = _lsuv_pre_activation(y, weights, bias, measured, axes=axes,
                                                    tol=tol, target_var=aim)
                else:
                    mean, var = _sweep.moments_of(y, weights, axes)
                    state = _post_activation_scale(
                        y, weights, mean, var, _sweep.with_zeros(bias, mean), post,
                        target_var=aim if measured is None else aim * measured, tol=tol,
                        max_iter=max_iter)
                    y = _sweep.affine(y, state["scale"], state["shift"])
                if ratio is not None:
                    state["ratio"] = (measured if measured is not None else ops.convert_to_tensor(
                        math.nan if ratio is _UNPROBED else ratio, _backend.wide()))
                return activation(y), state
            return activation(_sweep.affine(y, state["scale"], state["shift"])), state

        return policy


_UNPROBED = object()


def _share(end, target_var: float):
    """A branch end's target `s / N` as a fraction of target_var.

    `s` is the variance of the block's skip input: the stream, measured in
    the pass (a tensor), for an identity skip; target_var, what LSUV gives
    it, for a projection skip (a float, `1 / N`). None for a layer that ends
    no branch, and `_UNPROBED` for one whose stream the pass has not
    measured by the time it runs (it keeps target_var).
    """
    if end is None:
        return None
    if end.probe is None:
        return 1.0 / end.num_blocks
    if end.probe.value is None:
        return _UNPROBED
    return end.probe.value / float(end.num_blocks * target_var)


def _dead(y, mean, var, bias):
    """Whether the kernel's part y - b of the output is rounding noise (so is any scale)."""
    kernel_var = _sweep.total_variance(mean - bias, var)
    power = ops.mean(var) + ops.mean(ops.square(mean))
    return kernel_var <= _relative_floor(y.dtype) * power


def _pre_activation(y, weights, bias, ratio, *, axes, tol, target_var):
    """The rescaled output and the state of one layer, on its pre-activation variance.

    The layer's target is `target_var`, times `ratio` (a float64 scalar
    computed in the pass) when given: layers with different targets then
    share one compiled kernel per output signature.
    """
    mean, var = _sweep.moments_of(y, weights, axes)
    bias = _sweep.with_zeros(bias, mean)
    if ratio is not None:
        target_var = target_var * ratio
    state = _solve_quadratic(_quadratic(mean, var, bias), target_var=target_var, tol=tol,
                             dead=_dead(y, mean, var, bias))
    state["shift"] = (1.0 - state["scale"]) * bias
    return _sweep.affine(y, state["scale"], state["shift"]), state


_lsuv_pre_activation = _sweep.per_signature(_pre_activation, any_shape=True)


def _post_activation_scale(y, weights, mean, var, bias, post, *, target_var, tol, max_iter):
    """The state of one layer on the variance after `post`, re-applied at each step."""
    def variance(c):
        out = post(_sweep.affine(y, c, (1.0 - c) * bias))
        return _sweep.total_variance(*_sweep.moments_of(
            out, weights, tuple(range(len(y.shape)))))

    state = _solve_scale(variance, target_var=target_var, tol=tol, max_iter=max_iter,
                         dead=_dead(y, mean, var, bias), max_step=MAX_STEP)
    state["shift"] = (1.0 - state["scale"]) * bias
    return state


def _data_init_policy():
    """Per unit of a WN layer: g = 1/sigma, b = -mu/sigma of the normalized-v output."""

    def policy(target, y, activation, state):
        if state is None:
            cells = target.cell_shape(tuple(y.shape))
            bias = target.bias_tensor(cells)
            g = None
            if target.is_weight_normalized:
                g = ops.reshape(ops.cast(ops.convert_to_tensor(target.layer.g),
                                         _backend.wide()), cells)
            y, state = _unit_kernel(y, _sweep.mask_weights(y, target.mask), bias, g,
                                    axes=target.cell_axes(len(y.shape)),
                                    has_bias=target.bias is not None)
            return activation(y), state
        if target.is_weight_normalized:  # dead units have scale 1, shift 0: exact
            y = _sweep.affine(y, state["scale"], state["shift"])
        return activation(y), state

    return policy


def _unit_step(y, weights, bias, g, *, axes, has_bias):
    mean, var = _sweep.moments_of(y, weights, axes)
    bias = _sweep.with_zeros(bias, mean)
    state = _unit_init(mean, var, bias, g, _relative_floor(y.dtype), has_bias=has_bias)
    if g is not None:
        y = _sweep.affine(y, state["scale"], state["shift"])
    return y, state


_unit_kernel = _sweep.per_signature(_unit_step)


def _unit_init(mean, var, bias, g, relative_floor: float, *, has_bias: bool) -> dict:
    """New g and b per unit, and the output's per-unit affine map; dead units keep theirs.

    `g` is None for a layer that is not weight-normalized: only its statistics.
    """
    before = _sweep.total_variance(mean, var)
    if g is None:
        return {"var_before": before, "var_after": before,
                "valid": ops.zeros([math.prod(mean.shape)], "bool"),
                "scale": ops.ones(mean.shape, _backend.wide())}
    # The statistics of x . v/||v|| (the normalized v): undo the current g.
    mu = (mean - bias) / g
    sigma = ops.sqrt(var) / ops.abs(g)
    valid = (ops.isfinite(sigma) & ops.isfinite(mu)
             & (var > relative_floor * (var + ops.square(mean))))
    safe_sigma = ops.where(valid, sigma, 1.0)
    new_g = ops.where(valid, 1.0 / safe_sigma, g)
    new_bias = ops.where(valid, -mu / safe_sigma, bias) if has_bias else bias
    # y = g * n + b becomes new_g * n + new_b, i.e. y * (new_g / g) + (new_b - b * new_g / g).
    scale = ops.where(valid, new_g / ops.where(valid, g, 1.0), 1.0)
    shift = new_bias - bias * scale
    cells = (mean * scale + shift, var * scale**2)  # the in-flight estimate per unit
    return {"var_before": before, "var_after": _sweep.total_variance(*cells),
            "valid": ops.reshape(valid, [-1]), "g": new_g, "bias": ops.reshape(new_bias, [-1]),
            "scale": scale, "shift": shift, "cells": cells}


# One check per keyword argument, shared by both functions and by LSUVCallback.
_CHECKS = {
    "tol": lambda v: _validate.number("tol", v, positive=True),
    "max_iter": lambda v: _validate.integer("max_iter", v, minimum=1),
    "target_var": lambda v: _validate.number("target_var", v, positive=True),
    "pre_init": lambda v: _validate.one_of("pre_init", v, PRE_INITS),
    "measure": lambda v: _validate.one_of("measure", v, MEASURES),
    "layers": _sweep.check_layers,
    "new_batch_per_trial": lambda v: _validate.boolean("new_batch_per_trial", v),
    "verbose": _validate.verbose,
    "seed": _validate.seed,
    "compile": lambda v: _validate.one_of("compile", v, _sweep.COMPILE_MODES),
    "residual": lambda v: _validate.one_of("residual", v, _residual.RESIDUAL_MODES),
    "embeddings": lambda v: _validate.boolean("embeddings", v),
}
_ACCEPTED = {"lsuv": tuple(_CHECKS), "weightnorm_data_init": ("layers", "verbose", "compile")}


def check_init_kwargs(method: str, kwargs: dict) -> None:
    """Validates keyword arguments for `lsuv_init` or `weightnorm_data_init` up front.

    The values are checked exactly as the init function itself checks them,
    so a bad value fails where it is given (e.g. when a callback is built),
    not when the init finally runs. `model` and `data` are not checked here.

    Examples:

    >>> check_init_kwargs("lsuv", {"tol": 0.05, "max_iter": np.int64(5)})
    >>> check_init_kwargs("lsuv", {"tol": -1.0})
    Traceback (most recent call last):
        ...
    ValueError: Argument `tol` must be a finite number > 0. Received: tol=-1.0

    Args:
        method: `"lsuv"` (the arguments of `lsuv_init`) or
            `"weightnorm_data_init"`.
        kwargs: Keyword arguments other than `model` and `data`.
    """
    _checked(method, kwargs)


def _checked(method: str, kwargs: dict) -> dict:
    """The keyword arguments as plain Python values, or a ValueError naming the bad one."""
    _validate.one_of("method", method, tuple(_ACCEPTED))
    if not isinstance(kwargs, dict):
        raise ValueError(f"Argument `kwargs` must be a dict. Received: kwargs={kwargs!r}")
    unknown = sorted(set(kwargs) - set(_ACCEPTED[method]))
    if unknown:
        raise ValueError(
            f"Unknown keyword arguments for method={method!r}: {unknown}. "
            f"Accepted: {sorted(_ACCEPTED[method])}. Received: {kwargs}"
        )
    return {name: _CHECKS[name](value) for name, value in kwargs.items()}


def _check_model(model) -> None:
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            f"Argument `model` must be a Keras model or layer. Received: model={model!r}")


def _prepare(model, data, layers, recurrent=False):
    """First batch, checked; the targets the sweep can scale; rows for the rest.

    The rest: targets whose kernel must not be scaled (quantized...) and, when
    `layers` is None, every other layer with weights of its own, so that the
    report lists every weight-bearing layer. `recurrent=True` (and `layers`
    None): the plain recurrent layers (`_recurrent.model_layers`) come back
    fourth, and their cells get no skipped row (they get rows of their own).
    """
    x = _data.first_batch(data)
    _data.check_batch(x)
    if not model.built:
        model(x, training=False)
    rnns = _recurrent.model_layers(model) if recurrent and layers is None else []
    # A model of recurrent layers alone has no kernel target, and needs none.
    found = _sweep.find_targets(model) if rnns else _sweep.prepare(model, x, layers)
    targets = _scalable(found)
    rows = [_skipped(t.path_name, t.class_name, t.unscalable_reason())
            for t in found if t.unscalable_reason()]
    if layers is None:
        cells = {id(rnn.cell) for rnn, _, _ in rnns}
        paths = _sweep._layer_paths(model)
        rows += [_skipped(paths.get(id(layer), layer.name), type(layer).__name__, reason)
                 for layer, reason in _sweep.unscalable_layers(model, found)
                 if id(layer) not in cells]
    return (x, targets, rows, rnns) if recurrent else (x, targets, rows)


def _scalable(found):
    """The targets an init may write: those `unscalable_reason` does not rule out."""
    return [t for t in found if not t.unscalable_reason()]


def written_targets(model: keras.layers.Layer, method: str, layers=None,
                    embeddings: bool = True) -> list[tuple[str, list]]:
    """`(name, variables)` of each layer whose weights `method` would write, found as the
    init finds them.

    `lsuv_init` writes every scalable target's kernel (or `g`) and, with
    `layers` None, each plain recurrent layer's kernels and (with
    `embeddings`) each embedding table it rescales; `weightnorm_data_init`
    the weight-normalized targets' `g` and bias, and each weight-normalized
    recurrent layer's weights. `model` must be built.
    """
    if method == "weightnorm_data_init":
        rnns, found = _wrapped_rnns(model, layers)
        return ([(t.name, t.variables()) for t in _scalable(found) if t.is_weight_normalized]
                + [(wrapper.name, list(wrapper.weights)) for wrapper, _ in rnns])
    written = [(t.name, t.variables()) for t in _scalable(_sweep.find_targets(model, layers))]
    if layers is None:
        written += [(name, _recurrent.variables(rnn))
                    for rnn, name, _ in _recurrent.model_layers(model)]
        if embeddings:  # which tables, not their factors: any target will do
            written += [(table.name, [table.variable])
                        for table in _planned_tables(model, 1.0).values()]
    return written


def _skipped(name, class_name, reason) -> LayerRecord:
    return LayerRecord(name, class_name, math.nan, math.nan, 0, 1.0, "skipped", reason)


def _progbar(total: int, verbose, label: str):
    return keras.utils.Progbar(total, verbose=verbose, unit_name=label) if verbose else None


def _reached(targets, result):
    """Targets in execution order; those the pass never reached are reported last."""
    missed = [t for t in targets if id(t) not in result.states]
    return result.order, missed


def _not_called(target, result=None) -> LayerRecord:
    reason = ("not called in the forward pass" if result is None
              else f"{_sweep.unmet_reason(target, result)}; not scaled")
    return _skipped(target.path_name, target.class_name, reason)


def _add_notes(pairs, notes: dict) -> None:
    for target, row in pairs:
        if id(target) in notes:
            row.reason = "; ".join(r for r in (row.reason, notes[id(target)]) if r)


def _constraint_notes(targets) -> dict:
    """id(target) -> a note for targets whose scaled variable has a constraint.

    Keras applies a variable's constraint after every optimizer step, even at
    learning rate 0: a `UnitNorm` kernel is set back to unit norm, undoing the
    scale at the first step.
    """
    notes = {}
    for target in targets:
        constrained = [(v, v.constraint) for v in target.scale_variables
                       if getattr(v, "constraint", None) is not None]
        if constrained:
            names = ", ".join(f"{type(c).__name__} on {v.name!r}" for v, c in constrained)
            notes[id(target)] = (f"constrained ({names}): the optimizer applies it after "
                                 "every training step, which can undo this scale")
    return notes


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
    compile: str = "auto",
    residual: str | None = "scaled",
    embeddings: bool = True,
) -> InitReport:
    """Layer-sequential unit-variance init: rescales every kernel so its output has unit variance.

    Every layer that applies a kernel linearly (Dense, EinsumDense, Conv*,
    Conv*Transpose, DepthwiseConv*, SeparableConv* via the pointwise kernel,
    and `WeightNormalization`-wrapped layers via `g`) is visited in execution
    order, through nested and subclassed models. On a fixed batch each layer is
    evaluated once: scaling a kernel by c turns its output y into
    `c * (y - b) + b` exactly, so the iterations reuse y and the next layer
    sees the rescaled signal. The sweep costs about one forward pass, runs
    with `training=False`, and computes statistics in float32 (on the output
    divided by its peak where its squares would overflow or underflow, so
    any finite input scale works), as one compiled
    program by default (see `compile`), leaving out
    positions a Keras mask marks as padding. A layer inside `TimeDistributed`
    is measured over every time step at once. Each row's `var_after` is the
    variance of the rescaled output in flight, which is the model's own to
    float32 rounding when every target is a Keras linear layer as shipped
    computing in float32 or wider. Otherwise (mixed precision, a subclass
    with its own `call`) one more forward pass measures it on the same batch,
    and a row whose measurement departs from the in-flight estimate beyond
    rounding says so (status `"drift"` if it then misses `tol`).

    A layer whose variance is not finite or is below a dtype-aware epsilon
    (dead or constant) is skipped and keeps its (pre-initialized) weights.
    Quantized kernels are never touched (skipped); a LoRA-enabled layer is
    scaled through its effective kernel (base kernel and `lora_kernel_b`)
    and not pre-initialized. Recurrent layers (SimpleRNN, LSTM, GRU, either
    side of a `Bidirectional`; all of them when `layers` is None) get one row
    each: their recurrent kernel is drawn orthogonal per gate block (with
    `pre_init="orthogonal"`) and each gate block of the input kernel is
    scaled until that gate's pre-activation `x_t W + h_{t-1} U + b` has
    variance `target_var` over every unmasked time step of the layer's own
    recursion on the first batch (`_recurrent.lsuv_fit`); the kernel layers
    after one are fitted again to its new output. Every other layer with
    weights of its own (Embedding...) is listed as skipped with the reason, and
    layers that a normalization layer follows are noted, since it undoes
    their scale in training mode. If anything raises, every weight is
    restored exactly; every other weight that is not a target's (such as
    moving statistics) ends as it was either way. Random seed states (of
    dropout, say) advance as in any forward pass.

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
            or a `tf.data.Dataset`, `keras.utils.PyDataset` or iterator (e.g. a
            generator) of batches, of which the first is used.
        tol: Relative tolerance: stop when `|var - target_var| < tol * target_var`.
        max_iter: Most scale steps per layer; reaching it is reported.
        target_var: The variance to reach.
        pre_init: `"orthogonal"` re-draws every target kernel with orthonormal
            directions over its true fan-in first (as in the paper; an
            EinsumDense kernel over the axes it contracts with its input, a
            grouped convolution per group), or `None` to keep the kernels.
        measure: `"pre_activation"` (before a fused activation, as in the
            paper) or `"post_activation"`: after the fused activation or, for
            a layer without one, after a separate activation layer (`ReLU`,
            `Activation`...) that alone consumes its output in the model graph.
        layers: Only these layers (objects or names); default all targets.
        new_batch_per_trial: Each trial draws the next batch of `data`, as in
            the reference implementation: each trial is one sweep that takes
            one scale step at every layer that has not converged.
        verbose: 0 silent, 1 progress bar.
        seed: Makes the orthogonal pre-init reproducible; `None` draws from
            Keras' global seed generator (`keras.utils.set_random_seed`).
        compile: How the sweep runs. `"auto"` (default): one traced
            `tf.function` whose in-graph policy computes every layer's
            statistics and scale (in closed form, no host sync),
            with XLA on an accelerator where every layer supports it; eager
            when the model cannot be traced (a host read in a subclassed
            `call`). Under a `tf.distribute` strategy the traced pass runs
            in cross-replica context, on the whole batch. On Keras' JAX
            backend the sweep is one `jax.jit` program (`"xla"`); on PyTorch
            it runs eagerly (a note says so). `"xla"`,
            `"compiled"` (`tf.function` without XLA) or `"eager"` force one;
            a forced compiled mode raises if the model cannot be traced.
            The traced pass is cached per model, input signature and layer
            configuration, so a second call on an unchanged model reuses it.
            `InitReport.mode` says which ran.
        residual: `"scaled"` (default): in a Sequential or functional model,
            the last kernel layer of each residual branch (an `Add` of a skip
            and a branch, as `mean_field_init` finds them) targets `s / N`
            instead, with `s` the variance of the block's skip input and `N`
            the blocks in its stage. For an identity skip `s` is the stream,
            measured in the same pass; for a projection that LSUV itself
            normalizes it is `target_var`. The stream's variance then grows
            by at most a factor e per stage, not by `target_var` per block.
            `None`: every layer targets `target_var` (the paper's LSUV).
            Each row's `target_var` says what it aimed at.
        embeddings: Rescale embedding tables first (True, the default), as
            `mean_field_init` does (`keras_goodinit._tables`): the stream they
            start at second moment 1, a table tied to the output logits at
            `target_var / d`; each gets a row. False leaves them as they are.

    Returns:
        An `InitReport` with one row per target layer, in execution order.

    Reference:
        - [Mishkin & Matas, 2016](https://arxiv.org/abs/1511.06422)
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
          (the 1/N residual rule)
    """
    _check_model(model)
    checked = _checked("lsuv", dict(
        tol=tol, max_iter=max_iter, target_var=target_var, pre_init=pre_init, measure=measure,
        layers=layers, new_batch_per_trial=new_batch_per_trial, verbose=verbose, seed=seed,
        compile=compile, residual=residual, embeddings=embeddings))
    compile, verbose, seed = checked["compile"], checked["verbose"], checked["seed"]
    data = _data.replayable(data)
    x, targets, other_rows, recurrent = _prepare(model, data, checked["layers"], recurrent=True)
    tables = _planned_tables(model, checked["target_var"]) if checked["embeddings"] and (
        checked["layers"] is None) else {}
    variables = [v for t in targets for v in t.variables()] + [
        v for rnn, _, _ in recurrent for v in _recurrent.variables(rnn)] + [
        table.variable for table in tables.values()]
    if tables:  # their rows replace the "no kernel" rows of the same layers
        paths = _sweep._layer_paths(model)  # one row per table
        names = {paths.get(id(table.layer), table.layer.name) for table in tables.values()}
        other_rows = [row for row in other_rows if row.name not in names] + [
            LayerRecord(t.name, t.class_name, math.nan, math.nan, 0, t.scale, t.status, t.reason,
                        target_var=t.target) for t in tables.values()]
    ends, residual_notes = ({}, []) if checked["residual"] is None else \
        _residual.branch_ends(model, targets)
    spec = _Spec(checked["target_var"], checked["tol"], checked["max_iter"], checked["measure"],
                 _followers(model, targets, checked["measure"]), ends)
    notes = {}
    with _sweep.atomic(variables):
        _tables.write(tables)  # before the sweep: the kernels are fitted to the new stream
        if checked["pre_init"] == "orthogonal":
            notes = _orthogonal_pre_init(targets, seed)
            for index, (rnn, _, _) in enumerate(recurrent):
                _recurrent.orthogonalize(rnn, None if seed is None else seed + 7919 + 2 * index)

        def kernel_pass():
            if not targets:
                return [], _sweep.SweepResult(order=[], states={}, calls={}), x, 1
            if checked["new_batch_per_trial"]:
                return _lsuv_trials(model, data, targets, spec, verbose=verbose,
                                    compile=compile)
            result = _sweep.run(model, x, targets, spec.policy(spec.max_iter), compile=compile,
                                key=spec.key(targets, spec.max_iter), probes=spec.probes)
            return _commit_lsuv(result, targets, spec, verbose), result, x, 1

        first = x
        pairs, result, x, batches = kernel_pass()
        recurrent_rows, position = [], {}
        if recurrent:
            recurrent_rows, position, last = _recurrent_lsuv(model, first, recurrent, targets,
                                                             spec, pairs, kernel_pass)
            if last is not None:
                pairs, result, x, batches = last
        if not _sweep.in_flight_is_exact(targets):
            # The pass just run says which mode works: a failed trace is not tried again.
            _measure_after(model, x, targets, pairs, followers=spec.followers,
                           post=spec.measure == "post_activation", tol=spec.tol,
                           compile=result.mode)
        _add_notes(pairs, notes)
        _add_notes(pairs, _constraint_notes(targets))
        summary = (residual_notes + _normalization_notes(model, pairs)
                   + ([result.note] if result.note else []))
        _distribute.broadcast_from_chief(variables)
        _mark_data_initialized(pairs)
        rows = _in_order(pairs, recurrent_rows, position)
        return InitReport("lsuv", rows + other_rows, batches=batches, notes=summary,
                          mode=result.mode)


def _planned_tables(model, target_var: float) -> dict:
    try:
        graph = _graph.flatten(model)
    except ValueError:  # no graph to walk: the tables stay as they are
        return {}
    return _tables.plan(graph, target_var)


def _recurrent_lsuv(model, x, recurrent, targets, spec, pairs, kernel_pass) -> tuple:
    """LSUV on each recurrent layer in execution order (`_recurrent.lsuv_fit`), on `x`.

    A layer is fitted on its input as the model computes it then, so every
    kernel layer before it must already be at its target: the kernel sweep
    runs again before a recurrent layer that kernel layers run between it and
    the previous one (they were fitted to that one's old output), and once at
    the end if kernel layers follow the last. Layers within `tol` stay as they
    are in a new sweep, so each sweep only moves the layers after the
    recurrent one just fitted. Returns the `(position, row)` pairs, each
    layer's position in execution order, and the last kernel sweep's
    `(pairs, result, x, batches)` (None if none ran again).
    """
    inners = [t.inner for t in targets]
    order = _recurrent.call_order(model, x, [rnn for rnn, _, _ in recurrent] + inners)
    position = {id(layer): i for i, layer in enumerate(order)}
    kernel_positions = sorted(position[id(layer)] for layer in inners if id(layer) in position)
    called = sorted((r for r in recurrent if id(r[0]) in position),
                    key=lambda r: position[id(r[0])])
    rows = [(math.inf, _skipped(label, class_name, "not called in the forward pass"))
            for rnn, label, class_name in recurrent if id(rnn) not in position]
    last = -1
    state = None
    for rnn, label, class_name in called:
        here = position[id(rnn)]
        if last >= 0 and any(last < k < here for k in kernel_positions):
            state = _merged(pairs, kernel_pass())
            pairs = state[0]
        found = _recurrent.layer_input(model, x, rnn)
        row = _recurrent.lsuv_fit(rnn, found["x"], found["mask"], found["initial_state"],
                                  target_var=spec.target_var, tol=spec.tol,
                                  max_iter=spec.max_iter, name=label, class_name=class_name)
        rows.append((here, row))
        last = here
    if last >= 0 and any(k > last for k in kernel_positions):
        state = _merged(pairs, kernel_pass())
    return rows, position, state


def _merged(old_pairs, new) -> tuple:
    """A later kernel sweep's outcome, its rows counting the earlier sweeps' steps too."""
    pairs = new[0]
    earlier = {id(target): row for target, row in old_pairs}
    for target, row in pairs:
        before = earlier.get(id(target))
        if before is not None and before.status != "skipped":
            row.var_before = before.var_before
            row.scale *= before.scale
            row.iterations += before.iterations
    return (pairs, *new[1:])


def _in_order(pairs, recurrent_rows, position) -> list:
    """The kernel rows with the recurrent layers' rows put at their places in execution order."""
    placed = [(position.get(id(target.inner), math.inf), row) for target, row in pairs]
    placed += recurrent_rows
    return [row for _, row in sorted(placed, key=lambda item: item[0])]


_follower_key = _sweep.follower_key


_NORMALIZED = ("a normalization layer follows: in training mode it re-normalizes this "
               "output, so this scale barely changes what the network computes")


def _mark_data_initialized(pairs) -> None:
    """Sets the `initialized` flag of the `data_init=True` wrappers this init set, so that
    their first training batch does not overwrite it. A pair's first item is a target,
    or a recurrent wrapper itself."""
    for target, row in pairs:
        layer = getattr(target, "layer", None) if not isinstance(
            target, WeightNormalization) else target
        if row.status == "ok" and isinstance(layer, WeightNormalization):
            layer.mark_data_initialized()


def _normalization_notes(model, pairs) -> list[str]:
    """Notes the rows that a normalization layer follows; returns the summary line."""
    followed = _sweep.followed_by_normalization(model, [target for target, _ in pairs])
    normalized = [row for target, row in pairs
                  if row.status != "skipped" and id(target) in followed]
    for row in normalized:
        row.reason = "; ".join(r for r in (row.reason, _NORMALIZED) if r)
    if not normalized:
        return []
    # Mishkin & Matas (2016) make the same point: LSUV adds little to batch-normalized nets.
    return [f"{len(normalized)} of {len(pairs)} layers feed a normalization layer, which "
            "undoes their scale in training mode: LSUV changes little there"]


def _drift_bound(target, upstream: int) -> float:
    """Relative gap between re-measured and in-flight variance that rounding can explain.

    The in-flight estimate and the re-run differ only by rounding: the scale
    stored in the variable's dtype (2 eps_v on a variance), each of the
    `upstream` layers before this one re-rounding its output in the compute
    dtype (2 eps_c each, adding up along the path), and the two float32
    moment computations (2 x 64 eps_32, see `_relative_floor`). A factor 8
    covers conditioning (residual sums, cancellations); above that the
    estimate has drifted (e.g. float16 rounding amplified over depth).
    """
    eps = lambda dtype: float(ml_dtypes.finfo(keras.backend.standardize_dtype(dtype)).eps)  # noqa: E731
    compute = getattr(target.inner, "compute_dtype", None) or "float32"
    return 8.0 * (2 * eps(target.scale_variable.dtype) + 2 * (upstream + 1) * eps(compute)
                  + 2 * 64 * eps("float32"))


def _measure_policy(followers, post: bool):
    """Measures each target's output (pre- or post-activation) and changes nothing."""

    def policy(target, y, activation, state):
        if state is None:
            mean, var = _sweep.moments(y, target.cell_axes(len(y.shape)), target.mask)
            state = {"mean": mean, "var": var, "total": _sweep.total_variance(mean, var)}
            if post:
                out = (followers.get(id(target)) or activation)(y)
                state["total"] = _sweep.total_variance(
                    *_sweep.moments(out, tuple(range(len(y.shape))), target.mask))
        return activation(y), state

    return policy


def _measure_after(model, x, targets, pairs, *, followers=None, post=False,
                   tol=None, estimates=None, compile="auto") -> dict:
    """One more forward pass on `x`: each row's `var_after` becomes the measured value.

    A row whose measurement departs from the in-flight estimate by more than
    `_drift_bound` says so; an LSUV row that then misses its tolerance, or a
    data-init row (which promises exact unit statistics), gets status "drift".
    `estimates` maps id(target) to estimated per-unit (mean, var), compared
    unit by unit (a mean relative to its unit's std).
    """
    followers = followers or {}
    result = _sweep.run(model, x, targets, _measure_policy(followers, post),
                        key=("measure", post, _follower_key(targets, followers)), compile=compile)
    position = {id(t): i for i, t in enumerate(result.order)}
    tiny = np.finfo("float64").tiny
    for target, row in pairs:
        state = result.states.get(id(target))
        if state is None:
            continue
        estimate, measured = row.var_after, float(state["total"])
        row.var_after = measured  # also for skipped rows: upstream layers moved their input
        if row.status == "skipped" or not math.isfinite(estimate):
            continue
        gap = abs(measured - estimate) / max(abs(estimate), tiny)
        if estimates and id(target) in estimates:
            mean_e, var_e = estimates[id(target)]
            with np.errstate(divide="ignore", invalid="ignore"):
                units = np.maximum(np.abs(state["var"] / np.maximum(var_e, tiny) - 1.0),
                                   np.abs(state["mean"] - mean_e) / np.sqrt(var_e))
            units = units[np.isfinite(units)]
            gap = max(gap, float(units.max())) if units.size else gap
        if not gap > _drift_bound(target, position[id(target)]):
            continue
        spread = (f", median unit std {float(np.median(np.sqrt(state['var']))):.3g}"
                  if estimates else "")
        note = (f"measured var {measured:.4g} departs from the in-flight estimate "
                f"{estimate:.4g} (relative {gap:.2g}, beyond rounding{spread})")
        missed = tol is None or abs(measured - row.target_var) >= tol * row.target_var
        if missed and row.status == "ok":
            row.status = "drift"
        row.reason = "; ".join(r for r in (row.reason, note) if r)
    return result.states


def _orthogonal_pre_init(targets, seed: int | None) -> dict:
    """Orthonormal directions with unit-norm fan-in vectors, over each kernel's true fan-in.

    Each kernel is drawn as (fan-in, units) blocks (see `_draw_plan`): an
    EinsumDense kernel over the axes its equation contracts with the input, a
    grouped convolution per group. LoRA-enabled layers keep their kernels:
    their effective kernel includes the LoRA update, so an orthonormal base
    kernel would not make it orthonormal. Returns id(target) -> a note for
    the layers left alone.
    """
    plans, notes = {}, {}
    for target in targets:
        if target.is_lora:
            notes[id(target)] = ("pre-init skipped: LoRA-enabled (the effective kernel "
                                 "includes the LoRA update)")
            continue
        variable = target.direction_variable
        shape, layout, count, assemble = _draw_plan(target)
        plans.setdefault((shape, variable.dtype, layout), []).append((target, count, assemble))
    for index, ((shape, dtype, layout), members) in enumerate(plans.items()):
        group_seed = None if seed is None else seed + index
        init = GoodInit("wn_relu_backward", gamma=1.0, layout=layout, seed=group_seed)
        # One batched QR per block shape.
        blocks = init.draw(shape, dtype, count=sum(count for _, count, _ in members))
        start = 0
        for target, count, assemble in members:
            kernel = assemble(blocks[start:start + count])
            start += count
            target.direction_variable.assign(kernel)
            if target.is_weight_normalized:  # the wrapper then computes the new kernel
                g = target.layer.g
                g.assign(ops.reshape(unit_norms(kernel, target.kernel_layout), g.shape))
    return notes


def _draw_plan(target):
    """(block shape, layout, block count, blocks -> kernel) for the orthogonal pre-init."""
    variable = target.direction_variable
    shape = tuple(variable.shape)
    inner = target.inner
    axes = target.fan_axes  # where the rule places them (an EinsumDense's equation)
    if axes is not None:
        fan_in, units = axes
        sizes = [shape[i] for i in fan_in + units]
        inverse = [int(i) for i in np.argsort(fan_in + units)]

        def assemble(blocks):
            return ops.transpose(ops.reshape(blocks[0], sizes), inverse)

        return (math.prod(sizes[:len(fan_in)]), math.prod(sizes[len(fan_in):])), \
            "default", 1, assemble
    groups = getattr(inner, "groups", 1) or 1
    if groups > 1 and target.kernel_layout == "default":
        # Kernel (*k, in / groups, out); output channel j belongs to group j // (out / groups).
        block = (*shape[:-1], shape[-1] // groups)

        def assemble(blocks):
            moved = ops.moveaxis(blocks, 0, -2)  # (*k, in / groups, groups, out / groups)
            return ops.reshape(moved, shape)

        return block, "default", groups, assemble
    return shape, target.kernel_layout, 1, lambda blocks: blocks[0]


def _followers(model, targets, measure) -> dict:
    """id(target) -> the separate activation step after it, for post-activation statistics."""
    return _sweep.followers(model, targets) if measure == "post_activation" else {}


def _lsuv_rows(result, targets, spec, progbar=None):
    """(target, report row) pairs, in execution order then the missed, and the scales."""
    order, missed = _reached(targets, result)
    pairs, scales = [], []
    for target in order:
        state = result.states[id(target)]
        status, reason = _STATUS[int(state["code"])]
        notes = (reason, _shared_note(result, target), _branch_note(spec, target, state))
        pairs.append((target, LayerRecord(
            target.path_name, target.class_name, float(state["var_before"]),
            float(state["var_after"]), int(state["iterations"]), float(state["scale"]),
            status, "; ".join(r for r in notes if r), target_var=spec.target_of(state))))
        scales.append((target, float(state["scale"])))
        if progbar is not None:
            progbar.add(1)
    return pairs + [(t, _not_called(t, result)) for t in missed], scales


def _branch_note(spec, target, state) -> str:
    end = spec.ends.get(id(target))
    if end is None:
        return ""
    ratio = float(state["ratio"])
    if not math.isfinite(ratio):
        return (f"residual branch end of {end.block!r}, but its stream was not measured "
                "before it ran: target_var kept")
    return (f"residual branch end of {end.block!r}: target s / N = "
            f"{spec.target_of(state) * end.num_blocks:.3g} / {end.num_blocks}")


def _apply_scales(scales) -> None:
    for target, scale in scales:
        if scale != 1.0:
            for variable in target.scale_variables:
                variable.assign(variable.value * ops.cast(scale, variable.dtype))


def _commit_lsuv(result, targets, spec, verbose):
    pairs, scales = _lsuv_rows(result, targets, spec, _progbar(len(targets), verbose, "layer"))
    _apply_scales(scales)
    return pairs


def _lsuv_trials(model, data, targets, spec, *, verbose, compile):
    """One sweep per trial, each on the next batch, each taking one scale step per layer.

    Every trial calls the same traced pass (traced once per batch signature).
    Returns the (target, row) pairs, the last sweep and the number of batches.
    """
    policy = spec.policy(max_iter=1)
    progbar = _progbar(spec.max_iter, verbose, "trial")
    # Keyed by the target itself: nested models may repeat layer names.
    first_var, scales, steps, pairs = {}, {}, {}, []
    for trial, x in enumerate(_data.batches(data)):
        _data.check_batch(x)
        result = _sweep.run(model, x, targets, policy, compile=compile,
                            key=spec.key(targets, 1), probes=spec.probes)
        pairs, trial_scales = _lsuv_rows(result, targets, spec)
        _apply_scales(trial_scales)
        for target, row in pairs:
            key = id(target)
            first_var.setdefault(key, row.var_before)
            scales[key] = scales.get(key, 1.0) * row.scale
            steps[key] = steps.get(key, 0) + row.iterations
        if progbar is not None:
            progbar.add(1)
        converged = all(row.iterations == 0 for _, row in pairs)
        if converged or trial + 1 == spec.max_iter:
            break
    for target, row in pairs:
        key = id(target)
        row.var_before = first_var.get(key, row.var_before)
        row.scale, row.iterations = scales.get(key, 1.0), steps.get(key, 0)
        if converged and row.status == "max_iter":
            row.status, row.reason = "ok", ""
    return pairs, result, x, trial + 1


def weightnorm_data_init(
    model: keras.Model,
    data,
    layers: Sequence[keras.layers.Layer | str] | None = None,
    verbose: int = 1,
    compile: str = "auto",
) -> InitReport:
    """Data-dependent init of weight-normalized layers (Salimans & Kingma, 2016).

    Layer by layer in execution order, on one batch, each
    `WeightNormalization` layer's output with `g = 1, b = 0` (that is,
    `x . v/||v||`) has per-unit mean mu and std sigma; the init sets
    `g = 1/sigma` and `b = -mu/sigma`, so every unit starts with zero mean
    and unit variance on the batch, before its activation. It shares LSUV's
    sweep: one forward pass, statistics in float32, `training=False`.
    Units with a non-finite or (near-)zero sigma keep their weights; layers
    that are not weight-normalized are reported as skipped, as is every
    other layer with weights of its own. Statistics leave out masked
    positions and cover every step of a `TimeDistributed` layer; `var_after`
    is measured as for `lsuv_init` (by one more forward pass under mixed
    precision or with subclassed layers), and a layer without a bias says
    by how much it cannot centre its units.

    A weight-normalized recurrent layer (an RNN, a `Bidirectional`, an RNN
    of a wrapped cell) gets the init `WeightNormalization` describes: each
    gate's input part `x_t W + b` standardized per unit over the batch and
    the steps its Keras mask keeps, the bias offsets (`unit_forget_bias`)
    and the recurrent gains kept. Its output is not an affine map of the
    new values, so the pass stops at it (one more forward pass per
    recurrent layer): what feeds it is initialized first, and what it
    feeds after it. Its row's variances are of that input part, over every
    unit and step, before and after.

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
        compile: `"auto"`, `"xla"`, `"compiled"` or `"eager"`, as for
            `lsuv_init`: per-unit g and b are computed in the traced pass.

    Returns:
        An `InitReport`; `scale` is the mean over units of the factor applied.

    Reference:
        - [Salimans & Kingma, 2016](https://arxiv.org/abs/1602.07868)
    """
    _check_model(model)
    checked = _checked("weightnorm_data_init", dict(layers=layers, verbose=verbose,
                                                    compile=compile))
    layers, verbose, compile = checked["layers"], checked["verbose"], checked["compile"]
    data = _data.replayable(data)
    x = _data.first_batch(data)
    _data.check_batch(x)
    if not model.built:
        model(x, training=False)
    rnns, found = _wrapped_rnns(model, layers)
    if not rnns:
        x, targets, other_rows = _prepare(model, data, layers)
    else:
        targets = _scalable(found)
        other_rows = [_skipped(t.path_name, t.class_name, t.unscalable_reason())
                      for t in found if t.unscalable_reason()]
        if layers is None:
            inside = {id(sub) for wrapper, _ in rnns
                      for sub in wrapper._flatten_layers(include_self=True, recursive=True)}
            paths = _sweep._layer_paths(model)
            other_rows += [_skipped(paths.get(id(layer), layer.name), type(layer).__name__,
                                    reason)
                           for layer, reason in _sweep.unscalable_layers(model, found)
                           if id(layer) not in inside]
    variables = [v for t in targets for v in t.variables()]
    variables += [v for wrapper, _ in rnns for v in wrapper.weights]
    with _sweep.atomic(variables):
        progbar = _progbar(len(targets) + len(rnns), verbose, "layer")
        if rnns:
            callers = {id(caller): wrapper for wrapper, caller in rnns}
            order = _recurrent.call_order(
                model, x, [t.layer for t in targets] + [caller for _, caller in rnns])
        else:
            callers, order = {}, [t.layer for t in targets]
        of_layer = {id(t.layer): t for t in targets}
        pairs, notes, modes, pending = [], [], [], []

        def flush(segment):
            if segment:
                found, note, mode = _kernel_data_init(model, x, segment, compile, progbar)
                pairs.extend(found)
                notes.extend([note] if note and note not in notes else [])
                modes.append(mode)

        paths = _sweep._layer_paths(model) if rnns else {}
        done = set()
        for layer in order:
            wrapper = callers.get(id(layer))
            if wrapper is None:
                pending.append(of_layer[id(layer)])
                continue
            flush(pending)  # what feeds the recurrent layer first
            pending = []
            pairs.append((wrapper, _recurrent_data_init(
                model, x, wrapper, layer, paths.get(id(wrapper), wrapper.name))))
            done.add(id(wrapper))
            if progbar is not None:
                progbar.add(1)
        # Targets the pass never reached get their rows from the sweep.
        reached = {id(layer) for layer in order}
        flush(pending + [t for t in targets if id(t.layer) not in reached])
        pairs += [(wrapper, _skipped(paths.get(id(wrapper), wrapper.name),
                                     _class_name(wrapper), "not called in the forward pass"))
                  for wrapper, _ in rnns if id(wrapper) not in done]
        _distribute.broadcast_from_chief(variables)
        _mark_data_initialized(pairs)
        return InitReport("weightnorm_data_init", [row for _, row in pairs] + other_rows,
                          notes=notes, mode=modes[-1] if modes else "eager")


def _kernel_data_init(model, x, targets, compile, progbar) -> tuple:
    """The data init of kernel targets in one sweep: `((target, row) pairs, note, mode)`."""
    result = _sweep.run(model, x, targets, _data_init_policy(), key=("data_init",),
                        compile=compile)
    order, missed = _reached(targets, result)
    pairs = []
    for target in order:
        state = result.states[id(target)]
        pairs.append((target, _data_init_row(target, state, _shared_note(result, target))))
        if target.is_weight_normalized and state["valid"].any():
            g = target.layer.g
            g.assign(np.reshape(state["g"], g.shape).astype(g.dtype))
            if target.bias is not None:
                target.bias.assign(state["bias"].astype(target.bias.dtype))
        if progbar is not None:
            progbar.add(1)
    pairs += [(t, _not_called(t, result)) for t in missed]
    estimates = {id(t): result.states[id(t)]["cells"] for t in order
                 if t.is_weight_normalized and result.states[id(t)]["valid"].any()}
    if _sweep.in_flight_is_exact(targets):
        measured = {key: {"mean": mean, "var": var} for key, (mean, var) in estimates.items()}
    else:
        measured = _measure_after(model, x, targets, pairs, estimates=estimates,
                                  compile=result.mode)
    _bias_free_notes(pairs, measured, estimates)
    return pairs, result.note, result.mode


def _wrapped_rnns(model, layers) -> tuple[list, list]:
    """`(wrapper, caller)` for each recurrent `WeightNormalization` the init does, and the
    kernel targets (`_sweep.find_targets`) of the rest of `layers` (every target for None).

    The caller is the layer whose call gets the sequence: the wrapper, or the
    RNN of a wrapped cell. `layers` entries name a wrapper, its wrapped layer,
    the RNN of a wrapped cell or a `Bidirectional` of wrappers (both of its
    sides), by object or name; an entry that is neither such a layer nor a
    kernel target raises, listing both kinds.
    """
    found = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, WeightNormalization) and layer._cells is not None:
            caller = layer
            if layer.layer is layer._cells[0]:  # a cell: the RNN that runs it
                caller = next((rnn for rnn in model._flatten_layers(include_self=True)
                               if isinstance(rnn, keras.layers.RNN) and rnn.cell is layer),
                              None)
            if caller is not None and all(w is not layer for w, _ in found):
                found.append((layer, caller))
    if layers is None:
        return found, _sweep.find_targets(model)
    # `Bidirectional(WeightNormalization(LSTM(8)))`: the layer a user names holds the wrappers.
    holders = {id(side): layer for layer in model._flatten_layers(include_self=True)
               if isinstance(layer, keras.layers.Bidirectional)
               for side in (layer.forward_layer, layer.backward_layer)}
    entries = [[obj for obj in dict.fromkeys((w, w.layer, c, holders.get(id(w)),
                                              holders.get(id(c))))
                if obj is not None] for w, c in found]
    chosen, rest = [], []
    for item in layers:
        match = [pair for pair, objs in zip(found, entries)
                 if any(item is obj or item == obj.name for obj in objs)]
        if match:
            chosen.extend(m for m in match if m not in chosen)
        else:
            rest.append(item)
    if not rest:
        return chosen, []
    try:
        return chosen, _sweep.find_targets(model, rest)
    except ValueError as error:
        if not found:
            raise
        names = list(dict.fromkeys(obj.name for objs in entries for obj in objs))
        raise ValueError(f"{error}; weight-normalized recurrent layers (also valid entries) "
                         f"are {names}") from None


def _class_name(wrapper) -> str:
    return f"WeightNormalization({type(wrapper.layer).__name__})"


def _recurrent_data_init(model, x, wrapper, caller, name: str) -> LayerRecord:
    """The data init of a recurrent wrapper from the sequence `caller` gets in a pass on `x`.

    Eagerly, with the wrapper's own rule (`WeightNormalization._input_part_moments`):
    per cell, g and the input bias from the statistics of the input part
    `x_t W + b` over the unmasked steps. The row's variances are of that input
    part (minus the bias offset kept), over every unit and step, before and after.
    """
    wrapper._fold_shift()
    seen = _recurrent.layer_input(model, x, caller)
    if seen is None:
        return _skipped(name, _class_name(wrapper), "not called in the forward pass")
    moments = wrapper._input_part_moments(seen["x"], seen["mask"])
    states = []
    values = wrapper._data_init_values(moments, states)
    valid = np.concatenate([ops.convert_to_numpy(s["valid"]) for s in states])
    scale = np.concatenate([np.reshape(ops.convert_to_numpy(s["scale"]), -1) for s in states])

    def total(found):
        return float(_sweep.total_variance(ops.concatenate([m for m, _ in found]),
                                           ops.concatenate([v for _, v in found])))

    before = total(moments)
    mask = seen["mask"]
    steps = (int(np.prod(np.shape(seen["x"])[:2])) if mask is None
             else int(np.sum(ops.convert_to_numpy(mask))))
    note = (f"input part x W + b over {steps} unmasked (sample, step) pairs; recurrent "
            "gains kept")
    if not valid.any():
        return _skipped(name, _class_name(wrapper),
                        "every unit's input part has a non-finite or zero std (dead layer); "
                        + note)
    for variable, value in zip(wrapper._init_variables(), values):
        variable.assign(value)
    after = total(wrapper._input_part_moments(seen["x"], seen["mask"]))
    dead = int((~valid).sum())
    if dead:
        note = f"{dead} of {valid.size} units dead, kept as they were; " + note
    return LayerRecord(name, _class_name(wrapper), before, after, 1, float(np.mean(scale)),
                       "ok", note)


def _bias_free_notes(pairs, measured, estimates) -> None:
    """A weight-normalized layer without a bias cannot be centred: say by how much it is not."""
    for target, row in pairs:
        state = measured.get(id(target))
        if target.bias is not None or id(target) not in estimates or state is None:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.abs(state["mean"]) / np.sqrt(state["var"])
        off = off[np.isfinite(off)]
        worst = float(off.max()) if off.size else math.nan
        note = (f"no bias, so it cannot centre its units: unit means up to {worst:.3g} std "
                "remain (unit variances are set)")
        row.reason = "; ".join(r for r in (row.reason, note) if r)


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
    return LayerRecord(target.path_name, target.class_name, float(state["var_before"]),
                       float(state["var_after"]), 1 if status == "ok" else 0,
                       float(np.mean(state["scale"])), status, reason)
