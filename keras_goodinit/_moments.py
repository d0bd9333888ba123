"""Gaussian moments of activations: E[phi(z)] and E[phi(z)^2] for z ~ N(m, v).

Piecewise-linear activations (relu, leaky_relu, relu6, hard_sigmoid,
hard_tanh...) have exact closed forms from the partial moments of the normal
law, so ReLU gives `gamma = 1 / E[relu(z)^2] = 2` exactly; every other
elementwise activation is integrated by Gauss-Hermite quadrature on the
function itself (evaluated in float64 through `keras.ops`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import keras
import numpy as np
from keras import ops

from keras_goodinit import _validate

# Gauss-Hermite nodes: exact for polynomials of degree < 2 * _NODES. Smooth activations
# (gelu, silu, tanh...) come out within 1e-6 of a fine-grid integral; those with a kink
# away from the piecewise-linear table (selu, softsign, hard_silu) within about 2e-3.
_NODES = 96
_X, _W = np.polynomial.hermite.hermgauss(_NODES)
_W = _W / math.sqrt(math.pi)
_ERF = np.vectorize(math.erf, otypes=[float])

Piece = tuple[float, float, float, float]  # (lower, upper, slope, intercept)


@dataclasses.dataclass(frozen=True, eq=False)
class ActivationSpec:
    """What the mean-field sweep knows about an elementwise activation.

    Attributes:
        name: A name for reports.
        fn: The activation on tensors (None when `pieces` says it all).
        pieces: Piecewise-linear form, `(lower, upper, slope, intercept)` per
            interval, for exact moments; None for quadrature.
        homogeneous: `phi(c z) = c phi(z)` for c > 0 (relu, leaky_relu, linear):
            the scale of the input does not matter, only its gain.
        moments: A closed form `(mean, var) -> (E[phi^2], E[phi])`, if any.
    """

    name: str
    fn: Callable | None = None
    pieces: tuple[Piece, ...] | None = None
    homogeneous: bool = False
    moments: Callable | None = None


def _phi(x):
    return np.exp(-0.5 * np.square(x)) / math.sqrt(2 * math.pi)


def _cdf(x):
    return 0.5 * (1.0 + _ERF(np.asarray(x, float) / math.sqrt(2)))


def _piecewise_moments(pieces, mean, var):
    """Exact E[phi^2], E[phi] for a piecewise-linear phi: partial moments of N(m, s^2)."""
    mean, s = np.asarray(mean, float), np.sqrt(np.maximum(np.asarray(var, float), 0.0))
    second, first = np.zeros(np.broadcast(mean, s).shape), np.zeros(np.broadcast(mean, s).shape)
    degenerate = s <= 0
    safe = np.where(degenerate, 1.0, s)
    for lower, upper, slope, intercept in pieces:
        a = (lower - mean) / safe
        b = (upper - mean) / safe
        # Standard partial moments over (a, b): I0 = P, I1 = E[x 1], I2 = E[x^2 1].
        i0 = _cdf(b) - _cdf(a)
        pa, pb = _phi(a), _phi(b)
        i1 = pa - pb
        with np.errstate(invalid="ignore"):  # inf * 0 at an infinite bound
            a_pa = np.where(np.isfinite(a), a * pa, 0.0)
            b_pb = np.where(np.isfinite(b), b * pb, 0.0)
        i2 = i0 + a_pa - b_pb
        ez0, ez1 = i0, mean * i0 + s * i1
        ez2 = mean**2 * i0 + 2 * mean * s * i1 + s**2 * i2
        second = second + slope**2 * ez2 + 2 * slope * intercept * ez1 + intercept**2 * ez0
        first = first + slope * ez1 + intercept * ez0
    if np.any(degenerate):  # a constant input: phi(m) itself
        value = _piecewise_value(pieces, mean)
        second = np.where(degenerate, value**2, second)
        first = np.where(degenerate, value, first)
    return second, first


def _piecewise_value(pieces, z):
    z = np.asarray(z, float)
    out = np.zeros(z.shape)
    for lower, upper, slope, intercept in pieces:
        inside = (z > lower) & (z <= upper)
        out = np.where(inside, slope * z + intercept, out)
    return out


def _quadrature_moments(fn, mean, var):
    mean, var = np.broadcast_arrays(np.asarray(mean, float), np.asarray(var, float))
    s = np.sqrt(np.maximum(var, 0.0))
    z = mean[..., None] + math.sqrt(2) * s[..., None] * _X
    values = ops.convert_to_numpy(fn(ops.convert_to_tensor(z, "float64"))).astype(float)
    return np.sum(_W * values**2, axis=-1), np.sum(_W * values, axis=-1)


def moments(spec: ActivationSpec, mean, var) -> tuple[np.ndarray, np.ndarray]:
    """`(E[phi(z)^2], E[phi(z)])` for z ~ N(mean, var), elementwise over arrays."""
    if spec.moments is not None:
        second, first = spec.moments(np.asarray(mean, float), np.asarray(var, float))
        return np.asarray(second, float), np.asarray(first, float)
    if spec.pieces is not None:
        return _piecewise_moments(spec.pieces, mean, var)
    return _quadrature_moments(spec.fn, mean, var)


_INF = math.inf


def relu_pieces(negative_slope: float = 0.0, max_value: float | None = None,
                threshold: float = 0.0) -> tuple[Piece, ...]:
    """The pieces of Keras' `ReLU(max_value, negative_slope, threshold)`."""
    pieces = [(-_INF, threshold, negative_slope, -negative_slope * threshold)]
    if max_value is None:
        pieces.append((threshold, _INF, 1.0, 0.0))
    else:
        pieces += [(threshold, max_value, 1.0, 0.0), (max_value, _INF, 0.0, max_value)]
    return tuple(pieces)


def _builtin_specs() -> dict:
    a = keras.activations
    piecewise = {
        a.relu: (relu_pieces(), True),
        a.linear: (((-_INF, _INF, 1.0, 0.0),), True),
        a.leaky_relu: (relu_pieces(0.2), True),
        a.relu6: (relu_pieces(max_value=6.0), False),
        a.hard_sigmoid: (((-_INF, -3.0, 0.0, 0.0), (-3.0, 3.0, 1 / 6, 0.5),
                          (3.0, _INF, 0.0, 1.0)), False),
        a.hard_tanh: (((-_INF, -1.0, 0.0, -1.0), (-1.0, 1.0, 1.0, 0.0),
                       (1.0, _INF, 0.0, 1.0)), False),
        a.sparse_sigmoid: (((-_INF, -1.0, 0.0, 0.0), (-1.0, 1.0, 0.5, 0.5),
                            (1.0, _INF, 0.0, 1.0)), False),
        a.soft_shrink: (((-_INF, -0.5, 1.0, 0.5), (-0.5, 0.5, 0.0, 0.0),
                         (0.5, _INF, 1.0, -0.5)), False),
        a.hard_shrink: (((-_INF, -0.5, 1.0, 0.0), (-0.5, 0.5, 0.0, 0.0),
                         (0.5, _INF, 1.0, 0.0)), False),
    }
    specs = {fn: ActivationSpec(fn.__name__, fn, pieces, homogeneous)
             for fn, (pieces, homogeneous) in piecewise.items()}
    for fn in (a.elu, a.selu, a.celu, a.gelu, a.silu, a.mish, a.tanh, a.sigmoid, a.softplus,
               a.softsign, a.squareplus, a.sparse_plus, a.tanh_shrink, a.exponential,
               a.hard_silu, a.log_sigmoid):
        specs[fn] = ActivationSpec(fn.__name__, fn)
    return specs


_REGISTRY: dict = _builtin_specs()
# Not elementwise: their output's moments are not those of one Gaussian input.
NOT_ELEMENTWISE = {keras.activations.softmax, keras.activations.log_softmax,
                   keras.activations.sparsemax, keras.activations.glu}


def register_activation(fn: Callable, *, name: str | None = None, homogeneous: bool = False,
                        moments: Callable | None = None) -> Callable:
    """Teaches `mean_field_init` and `gamma` an elementwise activation.

    Its Gaussian moments are then computed by Gauss-Hermite quadrature on
    `fn` itself (evaluated on float64 tensors), or by `moments` if given.
    Returns `fn`, so it can be used as a decorator.

    Examples:

    >>> def twice_tanh(x):
    ...     return 2 * keras.ops.tanh(x)
    >>> _ = register_activation(twice_tanh)
    >>> round(gamma(twice_tanh) * 4, 4) == round(gamma("tanh"), 4)
    True

    Args:
        fn: An elementwise activation on tensors (as `keras.activations.*`).
        name: The name reports use; `fn.__name__` by default.
        homogeneous: True if `fn(c * z) == c * fn(z)` for every c > 0 (as
            ReLU): the mean-field rule then uses its gain alone, whatever the
            input's scale, as the paper does for ReLU.
        moments: Optional closed form `moments(mean, var) -> (E[fn(z)^2],
            E[fn(z)])` for z ~ N(mean, var), on float64 arrays.

    Returns:
        `fn`.
    """
    if not callable(fn):
        raise ValueError(f"Argument `fn` must be callable. Received: fn={fn!r}")
    homogeneous = _validate.boolean("homogeneous", homogeneous)
    if moments is not None and not callable(moments):
        raise ValueError(
            f"Argument `moments` must be callable or None. Received: moments={moments!r}")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"Argument `name` must be a string or None. Received: name={name!r}")
    label = name or getattr(fn, "__name__", type(fn).__name__)
    _REGISTRY[fn] = ActivationSpec(label, fn, None, homogeneous, moments)
    return fn


def spec_of(activation) -> ActivationSpec | None:
    """The spec of an activation function or name; None if it is unknown."""
    if isinstance(activation, ActivationSpec):
        return activation
    if activation is None:
        return _REGISTRY[keras.activations.linear]
    return _REGISTRY.get(_hashable(activation))


def gamma(activation, q: float = 1.0) -> float:
    """The gain `1 / E[phi(z)^2]` for z ~ N(0, q), as in `g = sqrt(gamma * C_in / C_out)`.

    ReLU gives exactly 2 and linear 1 (the paper's values); piecewise-linear
    activations are exact, the others use Gauss-Hermite quadrature. For a
    homogeneous activation (relu, leaky_relu, linear) the value does not
    depend on `q`.

    Examples:

    >>> gamma("relu")
    2.0
    >>> gamma("linear")
    1.0
    >>> round(gamma("tanh"), 4)
    2.5362

    Args:
        activation: A Keras activation function or name, or one registered
            with `register_activation`.
        q: Variance of the Gaussian input, a positive number.

    Returns:
        `gamma` as a Python float.

    Reference:
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
    """
    q = _validate.number("q", q, positive=True)
    spec = spec_of(activation)
    if spec is None:
        reason = ("it is not elementwise" if _not_elementwise(activation)
                  else "it is unknown; register it with `register_activation`")
        raise ValueError(f"Argument `activation` has no Gaussian gain: {reason}. "
                         f"Received: activation={activation!r}")
    # A homogeneous phi has E[phi(z)^2] = q E[phi(z / sqrt(q))^2]: its gain is scale-free,
    # so it is taken at q = 1 (where the closed forms are exact: relu gives 2.0).
    second = float(moments(spec, 0.0, 1.0 if spec.homogeneous else q)[0])
    if not second > 0:
        raise ValueError("Argument `activation` maps N(0, q) to zero: no finite gain. "
                         f"Received: activation={activation!r}")
    return 1.0 / second


def _not_elementwise(activation) -> bool:
    return _hashable(activation) in NOT_ELEMENTWISE


def _hashable(activation):
    """A Keras activation name as its function, else the object; None if neither resolves."""
    if isinstance(activation, str):
        try:
            activation = keras.activations.get(activation)
        except (ValueError, TypeError):
            return None
    try:
        hash(activation)
    except TypeError:
        return None
    return activation


def layer_spec(layer) -> tuple[ActivationSpec | None, str]:
    """The spec of an activation layer (`Activation`, `ReLU`, `LeakyReLU`, `ELU`, `PReLU`).

    Returns `(spec, reason)`: reason says why spec is None.
    """
    layers = keras.layers
    if isinstance(layer, layers.ReLU):
        pieces = relu_pieces(float(layer.negative_slope),
                             None if layer.max_value is None else float(layer.max_value),
                             float(layer.threshold))
        homogeneous = layer.max_value is None and float(layer.threshold) == 0.0
        return ActivationSpec(f"relu{_args(layer)}", None, pieces, homogeneous), ""
    if isinstance(layer, layers.LeakyReLU):
        slope = float(layer.negative_slope)
        return ActivationSpec(f"leaky_relu({slope:g})", None, relu_pieces(slope), True), ""
    if isinstance(layer, layers.PReLU):
        alpha = ops.convert_to_numpy(layer.alpha).astype(float)
        if not np.allclose(alpha, alpha.flat[0]):
            return (ActivationSpec("prelu", None, relu_pieces(float(np.mean(alpha))), True),
                    "PReLU slopes differ across units: their mean is used")
        slope = float(alpha.flat[0])
        return ActivationSpec(f"prelu({slope:g})", None, relu_pieces(slope), True), ""
    if isinstance(layer, layers.ELU):
        alpha = float(layer.alpha)
        return ActivationSpec(f"elu({alpha:g})",
                              lambda x: keras.activations.elu(x, alpha=alpha)), ""
    if isinstance(layer, layers.Softmax):
        return None, "softmax is not elementwise"
    if isinstance(layer, layers.Activation):
        return function_spec(layer.activation)
    return None, f"{type(layer).__name__} is no activation layer"


def function_spec(fn) -> tuple[ActivationSpec | None, str]:
    """The spec of an activation function, or `(None, reason)`."""
    spec = spec_of(fn)
    if spec is not None:
        return spec, ""
    name = getattr(fn, "__name__", repr(fn))
    if _not_elementwise(fn):
        return None, f"{name} is not elementwise"
    return None, f"unknown activation {name!r} (register it with register_activation)"


def _args(layer) -> str:
    parts = []
    if layer.max_value is not None:
        parts.append(f"max_value={float(layer.max_value):g}")
    if float(layer.negative_slope):
        parts.append(f"negative_slope={float(layer.negative_slope):g}")
    if float(layer.threshold):
        parts.append(f"threshold={float(layer.threshold):g}")
    return f"({', '.join(parts)})" if parts else ""
