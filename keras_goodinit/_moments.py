"""Gaussian moments of activations: E[phi(z)] and E[phi(z)^2] for z ~ N(m, v).

Piecewise-linear activations (relu, leaky_relu, relu6, hard_sigmoid,
hard_tanh...) have exact closed forms from the partial moments of the normal
law, so ReLU gives `gamma = 1 / E[relu(z)^2] = 2` exactly; every other
elementwise activation is integrated by Gauss-Hermite quadrature on the
function itself (evaluated in float64 through `keras.ops`).

`chi` is the slope of the variance map at its fixed point: whether a
data-free scalar init stays at its target with depth (`chi <= 1`) or drifts
away from it like `chi ** depth` (gelu, silu: `chi > 1`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import lru_cache

import keras
import numpy as np
from keras import ops

from keras_goodinit import _backend, _validate

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


def _evaluate(fn, z) -> np.ndarray:
    """`fn` on the float64 tensor of `z` (float32 where the backend has no float64)."""
    return np.asarray(ops.convert_to_numpy(fn(ops.convert_to_tensor(z, _backend.wide()))),
                      dtype=float)


def _quadrature_moments(fn, mean, var):
    mean, var = np.broadcast_arrays(np.asarray(mean, float), np.asarray(var, float))
    s = np.sqrt(np.maximum(var, 0.0))
    values = _evaluate(fn, mean[..., None] + math.sqrt(2) * s[..., None] * _X)
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

    `fn` is checked on a float64 probe (a grid over [-8, 8] and the
    quadrature's nodes at standard deviations 0.5, 1 and 2): it must run,
    return finite values of the input's shape, and be elementwise (the same
    value per entry whatever the other entries and their layout; softmax,
    glu or `x - mean(x)` are not). `homogeneous=True` is checked as
    `fn(2 x) == 2 fn(x)` to rounding, and `moments` on scalars and arrays.

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
            E[fn(z)])` for z ~ N(mean, var), on float64 arrays: it returns
            a pair of finite floats or arrays of the inputs' shape.

    Returns:
        `fn`.
    """
    if not callable(fn):
        raise ValueError(f"Argument `fn` must be callable. Received: fn={fn!r}")
    try:
        hash(fn)
    except TypeError:
        raise ValueError(f"Argument `fn` must be hashable (it keys the registry). "
                         f"Received: fn={fn!r}") from None
    homogeneous = _validate.boolean("homogeneous", homogeneous)
    if moments is not None and not callable(moments):
        raise ValueError(
            f"Argument `moments` must be callable or None. Received: moments={moments!r}")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"Argument `name` must be a string or None. Received: name={name!r}")
    _check_activation(fn, homogeneous)
    if moments is not None:
        _check_moments(moments)
    label = name or getattr(fn, "__name__", type(fn).__name__)
    _REGISTRY[fn] = ActivationSpec(label, fn, None, homogeneous, moments)
    return fn


def _probe() -> np.ndarray:
    """Ordinary inputs of an activation: a grid over [-8, 8] (0 included) and the
    quadrature's nodes `sqrt(2 v) x` at v = 0.25, 1, 4, where the moments evaluate it."""
    nodes = [math.sqrt(2 * v) * _X for v in (0.25, 1.0, 4.0)]
    return np.concatenate([np.linspace(-8.0, 8.0, 161), *nodes])


# An elementwise fn may give an entry a few ulps apart in another layout (packet and
# scalar loops), of float32 where it computes in float32 inside; a dependence on the other
# entries (softmax, x - mean(x)) changes it by O(1). 2^-20 is 8 float32 ulps.
_LAYOUT_RTOL = 2.0**-20


def _check_activation(fn, homogeneous: bool) -> None:
    """Raises a ValueError unless `fn` is a finite, elementwise function on the probe."""
    x = _probe()
    y = _call(fn, x, "fn")
    if y.shape != x.shape:
        raise ValueError(f"Argument `fn` must be elementwise: on a tensor of shape {x.shape} "
                         f"it returned shape {y.shape}. Received: fn={fn!r}")
    bad = ~np.isfinite(y)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"Argument `fn` must return finite values on ordinary inputs: it "
                         f"returned {float(y[i])} at x={float(x[i])!r} ({int(bad.sum())} of "
                         f"{x.size} probe entries non-finite). Received: fn={fn!r}")
    # The same entries in another order, in rows of 7 (a softmax or norm over the last
    # axis) and half of them (a reduction over the whole tensor).
    order = np.random.default_rng(0).permutation(x.size)
    rows = x.size - x.size % 7
    half = x.size // 2
    layouts = (("permuted", x[order], y[order]),
               ("in rows of 7", x[:rows].reshape(-1, 7), y[:rows].reshape(-1, 7)),
               ("on its first half alone", x[:half], y[:half]))
    for how, entries, want in layouts:
        got = _call(fn, entries, "fn")
        if got.shape != entries.shape:
            raise ValueError(
                f"Argument `fn` must be elementwise: on a tensor of shape {entries.shape} it "
                f"returned shape {got.shape}. Received: fn={fn!r}")
        differ = ~(np.abs(got - want) <= _LAYOUT_RTOL * np.maximum(np.abs(got), np.abs(want)))
        if differ.any():
            i = np.unravel_index(np.argmax(differ), differ.shape)
            at, whole, other = float(entries[i]), float(want[i]), float(got[i])
            raise ValueError(
                f"Argument `fn` must be elementwise (and deterministic): at x={at!r} it "
                f"returned {whole!r} on the whole probe and {other!r} with the same entries "
                f"{how}. Received: fn={fn!r}")
    if homogeneous:
        doubled = _call(fn, 2 * x, "fn")
        # Doubling is exact in floating point: a homogeneous fn's two sides differ by at
        # most their own roundings, a few ulps of the dtype it ran in.
        eps = 4 * np.finfo(_backend.wide()).eps
        off = ~(np.abs(doubled - 2 * y) <= eps * np.maximum(np.abs(doubled), np.abs(2 * y)))
        if off.any():
            i = int(np.argmax(off))
            raise ValueError(
                f"Argument `homogeneous` is True, but fn(2 x) != 2 fn(x) at x={float(x[i])!r}: "
                f"{float(doubled[i])!r} against {float(2 * y[i])!r}. Received: homogeneous=True")


def _call(fn, x, argument: str) -> np.ndarray:
    try:
        return _evaluate(fn, x)
    except Exception as error:  # a user's function may raise anything
        raise ValueError(f"Argument `{argument}` raised {type(error).__name__} on a float64 "
                         f"tensor of shape {x.shape}: {error}. Received: {argument}={fn!r}"
                         ) from error


def _check_moments(moments) -> None:
    """Raises a ValueError unless `moments` gives finite `(E[phi^2], E[phi])` pairs with
    E[phi^2] >= E[phi]^2, broadcastable to its inputs, on a scalar and on arrays."""
    cases = ((np.asarray(0.0), np.asarray(1.0)),
             (np.array([0.0, 0.5, -1.0]), np.array([1.0, 2.0, 0.25])))
    for mean, var in cases:
        where = f"moments({mean.tolist()!r}, {var.tolist()!r})"
        try:
            result = moments(mean, var)
        except Exception as error:  # a user's function may raise anything
            raise ValueError(f"Argument `moments` raised {type(error).__name__} on {where}: "
                             f"{error}. Received: moments={moments!r}") from error
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise ValueError(f"Argument `moments` must return a pair (E[phi^2], E[phi]); "
                             f"{where} returned {result!r}. Received: moments={moments!r}")
        try:
            second, first = (np.asarray(part, dtype=float) for part in result)
            shape = np.broadcast_shapes(second.shape, first.shape, mean.shape)
        except (TypeError, ValueError):
            shape = None
        if shape != mean.shape:
            raise ValueError(f"Argument `moments` must return floats or arrays broadcastable "
                             f"to its inputs' shape {mean.shape}; {where} returned "
                             f"{result!r}. Received: moments={moments!r}")
        if not (np.all(np.isfinite(second)) and np.all(np.isfinite(first))):
            raise ValueError(f"Argument `moments` must return finite values; {where} "
                             f"returned {result!r}. Received: moments={moments!r}")
        # A variance E[phi^2] - E[phi]^2 is never negative; allow its two roundings.
        square = first**2
        if np.any(second - square < -4 * np.finfo(float).eps * (np.abs(second) + square)):
            raise ValueError(f"Argument `moments` must return (E[phi^2], E[phi]) with "
                             f"E[phi^2] >= E[phi]^2; {where} returned {result!r}. "
                             f"Received: moments={moments!r}")


def spec_of(activation) -> ActivationSpec | None:
    """The spec of an activation function or name; None if it is unknown."""
    if isinstance(activation, ActivationSpec):
        return activation
    if activation is None:
        return _REGISTRY[keras.activations.linear]
    spec = _REGISTRY.get(_hashable(activation))
    if spec is None and callable(activation) and (
            f"{getattr(activation, '__module__', '')}.{getattr(activation, '__name__', '')}"
            in _KNOWN_ELSEWHERE):
        # Elementwise functions of other Keras libraries, known without importing them.
        spec = _REGISTRY[_hashable(activation)] = ActivationSpec(activation.__name__, activation)
    return spec


# Smooth elementwise activations other Keras libraries define (quadrature handles them).
_KNOWN_ELSEWHERE = frozenset({"keras_hub.src.utils.keras_utils.gelu_approximate"})


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
    spec = _known(activation)
    # A homogeneous phi has E[phi(z)^2] = q E[phi(z / sqrt(q))^2]: its gain is scale-free,
    # so it is taken at q = 1 (where the closed forms are exact: relu gives 2.0).
    second = float(moments(spec, 0.0, 1.0 if spec.homogeneous else q)[0])
    if not second > 0:
        raise ValueError("Argument `activation` maps N(0, q) to zero: no finite gain. "
                         f"Received: activation={activation!r}")
    return 1.0 / second


def chi(activation, q: float = 1.0, mean: float = 0.0) -> float:
    """The slope of the variance map at its fixed point `q`: `q M'(q) / M(q)`.

    Between equal-width layers whose zero-mean weights have the gain that
    makes `q` a fixed point, the variance of the pre-activations follows
    `q_{l+1} = gamma M(q_l)` with `M(q) = E[phi(z)^2]`, z ~ N(mean, q), and
    `gamma = q / M(q)`. A deviation from `q` is multiplied by `chi` at every
    layer: `chi <= 1` is depth-stable, `chi > 1` drifts like `chi ** depth`.
    Homogeneous activations (relu, leaky_relu, linear) give exactly 1 at
    mean 0; bounded ones (tanh, sigmoid) less; gelu 1.144 and silu 1.173.

    `M'` is exact to about 1e-10 for piecewise-linear and closed-form
    activations (a central difference of their exact moments) and to about
    1e-7 for the others, kinks included (the identity
    `dM/dq = E[phi(z)^2 (u^2 - 1)] / (2 q)`, z = mean + sqrt(q) u, which
    needs no derivative of `phi`, on a fine grid).

    Examples:

    >>> chi("relu")
    1.0
    >>> round(chi("gelu"), 3), round(chi("silu"), 3)
    (1.144, 1.173)
    >>> chi("tanh") < 1
    True

    Args:
        activation: An `ActivationSpec`, or a Keras activation function or
            name, or one registered with `register_activation`.
        q: The fixed point: the pre-activations' variance, a positive number.
        mean: The pre-activations' mean, held fixed.

    Returns:
        `chi` as a Python float.
    """
    q = _validate.number("q", q, positive=True)
    mean = _validate.number("mean", mean)
    return _chi(_known(activation), q, mean)


# Central differences of exact moments: truncation h^2 M'''/6 plus the roundings of M,
# ~eps M / h; both are ~eps^(2/3) (4e-11) relative at h = eps^(1/3) q.
_STEP = np.finfo(float).eps ** (1 / 3)
# The trapezoid rule on u ~ N(0, 1) over [-12, 12] (the tail beyond holds e^-72 of the
# mass): spectrally accurate for a smooth phi, O(h^2) ~ 1e-7 across a kink at h = 2e-3.
_GRID = np.linspace(-12.0, 12.0, 12001)
_GRID_W = np.exp(-0.5 * _GRID**2) / math.sqrt(2 * math.pi) * (_GRID[1] - _GRID[0])
_GRID_W[[0, -1]] /= 2


def second_and_slope(spec: ActivationSpec, q: float, mean: float) -> tuple[float, float]:
    """`(M(q), dM/dq)`, M(q) = E[phi(z)^2] for z ~ N(mean, q), to the accuracy `chi` says."""
    if spec.moments is None and spec.pieces is None:
        values = _evaluate(spec.fn, mean + math.sqrt(q) * _GRID)
        second = float(np.sum(_GRID_W * values**2))
        slope = float(np.sum(_GRID_W * values**2 * (_GRID**2 - 1))) / (2 * q)
    else:
        h = _STEP * q
        second = float(moments(spec, mean, q)[0])
        slope = (float(moments(spec, mean, q + h)[0])
                 - float(moments(spec, mean, q - h)[0])) / (2 * h)
    return second, slope


def second_slope(spec: ActivationSpec, q: float, mean: float) -> float:
    """dM/dq, M(q) = E[phi(z)^2] for z ~ N(mean, q) (see `second_and_slope`)."""
    return second_and_slope(spec, q, mean)[1]


@lru_cache(maxsize=1024)  # per report row; specs hash by identity
def _chi(spec: ActivationSpec, q: float, mean: float) -> float:
    if spec.homogeneous and mean == 0.0:
        return 1.0  # M(q) = q M(1): its elasticity is 1 whatever M(1) is
    second, slope = second_and_slope(spec, q, mean)
    if not second > 0:
        raise ValueError(f"Argument `activation` maps N({mean:g}, {q:g}) to zero: its "
                         f"variance map has no fixed point there. Received: activation="
                         f"{spec.name!r}")
    return float(q * slope / second)


def _known(activation) -> ActivationSpec:
    """The spec of `activation`, or a ValueError saying why it has none."""
    spec = spec_of(activation)
    if spec is None:
        reason = ("it is not elementwise" if _not_elementwise(activation)
                  else "it is unknown; register it with `register_activation`")
        raise ValueError(f"Argument `activation` has no Gaussian gain: {reason}. "
                         f"Received: activation={activation!r}")
    return spec


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


def values(spec: ActivationSpec, z) -> np.ndarray:
    """The activation itself on a float64 array."""
    if spec.pieces is not None:
        return _piecewise_value(spec.pieces, z)
    return _evaluate(spec.fn, np.asarray(z, float))


def cross_moment(spec: ActivationSpec, mean: float, var: float, cov: float) -> float:
    """`E[phi(u) phi(v)]` for (u, v) jointly Gaussian, each N(mean, var), covariance `cov`.

    The mean-field correlation map (Poole et al. 2016): what an elementwise
    activation does to the product of two positions' entries, as two tokens
    of one sequence. Product Gauss-Hermite quadrature in the two independent
    normals behind (u, v), exact for polynomials as `moments` is.
    """
    var = max(float(var), 0.0)
    if var == 0.0:
        value = float(values(spec, np.asarray([mean]))[0])
        return value * value
    rho = float(np.clip(cov / var, -1.0, 1.0))
    s = math.sqrt(var)
    if spec.pieces is None:  # smooth: product Gauss-Hermite, one evaluation of phi
        z1 = math.sqrt(2) * np.broadcast_to(_X[:, None], (_NODES, _NODES))
        z2 = math.sqrt(2) * np.broadcast_to(_X[None, :], (_NODES, _NODES))
        both = values(spec, np.stack([mean + s * z1,
                                      mean + s * (rho * z1 + math.sqrt(1.0 - rho * rho) * z2)]))
        return float(np.sum(_W[:, None] * _W[None, :] * both[0] * both[1]))
    # Outer: u = mean + s z on a fine grid (the integrand may have kinks, as relu's);
    # inner: E[phi(v) | z] exactly, v | z ~ N(mean + rho s z, (1 - rho^2) var).
    z = np.linspace(-_REACH, _REACH, 4001)
    weight = _phi(z) * (z[1] - z[0])
    inner = moments(spec, mean + rho * s * z, np.full(z.shape, (1.0 - rho * rho) * var))[1]
    return float(np.sum(weight * values(spec, mean + s * z) * inner))


def max_moments(spec: ActivationSpec, mean: float, var: float, count: int) -> tuple[float, float]:
    """`(E[phi(M)^2], E[phi(M)])`, M the largest of `count` independent N(mean, var) draws.

    For a non-decreasing phi, `phi(M)` is the largest of the `count`
    activations (max pooling of activations). Integrated on the same
    12,001-point grid as `chi`, against the density `count phi(u) Phi(u)^(count-1)`.
    """
    s = math.sqrt(max(var, 0.0))
    density = count * _GRID_W * _cdf(_GRID) ** (count - 1)
    density = density / np.sum(density)  # the grid's own normalization
    out = values(spec, mean + s * _GRID)
    return float(np.sum(density * out**2)), float(np.sum(density * out))


# Gauss-Legendre nodes on each linear piece of a piecewise source, cut at +-_REACH standard
# deviations (the normal mass beyond is 1.5e-23): the integrand is the normal density times a
# smooth function there, so 64 nodes integrate it to about 1e-13.
_LEGENDRE_X, _LEGENDRE_W = np.polynomial.legendre.leggauss(64)
_REACH = 10.0


def _affine_identity(spec: ActivationSpec) -> bool:
    return spec.pieces is not None and tuple(spec.pieces) == ((-_INF, _INF, 1.0, 0.0),)


def _source_nodes(spec: ActivationSpec, mean, var) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the law of `phi(z)`, z ~ N(mean, var), elementwise over arrays.

    Returns `(values, weights)` of shape `broadcast(mean, var).shape + (nodes,)`: the
    expectation of any function `f(phi(z))` is `sum(weights * f(values), -1)`. A constant
    piece (relu's zero) is one node holding its whole probability; a linear piece gets
    Gauss-Legendre nodes; a smooth `phi` the Gauss-Hermite nodes of `moments`.
    """
    mean, var = np.broadcast_arrays(np.asarray(mean, float), np.asarray(var, float))
    s = np.sqrt(np.maximum(var, 0.0))
    if spec.pieces is None:
        z = mean[..., None] + math.sqrt(2) * s[..., None] * _X
        fn = spec.fn if spec.moments is None or spec.fn is not None else None
        if fn is None:
            raise ValueError(f"Argument `spec` has neither pieces nor a function to evaluate. "
                             f"Received: spec={spec.name!r}")
        return _evaluate(fn, z), np.broadcast_to(_W, z.shape)
    degenerate = s <= 0
    safe = np.where(degenerate, 1.0, s)[..., None]
    m = mean[..., None]
    values, weights = [], []
    for lower, upper, slope, intercept in spec.pieces:
        a = np.maximum((lower - m) / safe, -_REACH)
        b = np.minimum((upper - m) / safe, _REACH)
        if slope == 0.0:
            mass = np.where(b > a, _cdf(b) - _cdf(a), 0.0)
            values.append(np.full(mass.shape, float(intercept)))
            weights.append(mass)
            continue
        half = np.maximum(b - a, 0.0) / 2
        u = (a + b) / 2 + half * _LEGENDRE_X
        values.append(slope * (m + safe * u) + intercept)
        weights.append(half * _LEGENDRE_W * _phi(u))
    values, weights = np.concatenate(values, -1), np.concatenate(weights, -1)
    if np.any(degenerate):  # a constant input: one node at phi(mean)
        point = np.zeros(values.shape)
        point[..., 0] = 1.0
        weights = np.where(degenerate[..., None], point, weights)
        values = np.where(degenerate[..., None], _piecewise_value(spec.pieces, mean)[..., None],
                          values)
    return values, weights


def sum_moments(source: ActivationSpec, mean, var, gain, spec: ActivationSpec, other_mean,
                other_var) -> tuple[np.ndarray, np.ndarray]:
    """`(E[psi(y)^2], E[psi(y)])` for `y = gain * phi(z) + g`, elementwise over arrays.

    z ~ N(mean, var) is the Gaussian input of the activation `phi = source`, and g ~
    N(other_mean, other_var), independent of z, the rest of the sum; `psi = spec`. The
    expectation over z is a quadrature on the law of `phi(z)` (`_source_nodes`: exact to
    about 1e-13 for piecewise `phi`, 1e-6 for smooth ones), the one over g the Gaussian
    moments of `psi` (`moments`: exact for piecewise `psi`).
    """
    values, weights = _source_nodes(source, mean, var)
    other_mean = np.asarray(other_mean, float)[..., None]
    other_var = np.asarray(other_var, float)[..., None]
    shifted = np.asarray(gain, float)[..., None] * values + other_mean
    second, first = moments(spec, shifted, np.broadcast_to(other_var, shifted.shape))
    return np.sum(weights * second, -1), np.sum(weights * first, -1)


# The bracket of `match_moments`' shape t = mean / std: below -4 the closed forms lose
# digits to 1 + erf(t / sqrt(2)) cancelling; beyond 8 the law is Gaussian to 1e-15.
_MATCH_T = np.linspace(-4.0, 8.0, 241)


def match_moments(spec: ActivationSpec, second, first):
    """Assumed-density filtering in the family `phi(N(m, v))` of a homogeneous `phi`.

    Finds `(m, v)` with `E[phi(z)^2] = second` and `E[phi(z)] = first`, z ~ N(m, v),
    elementwise over arrays: for a homogeneous `phi` the ratio `first |first| / second`
    depends on `t = m / sqrt(v)` alone, so t is a 1-D root (bisection to float64
    resolution) and `v = second / E[phi(N(t, 1))^2]`. The family is then carried on as if
    the law were exactly in it: that is the approximation. The law of a post-activation
    stream `relu(h + f)`, h rectified and f Gaussian, is not a rectified Gaussian; matched
    on its first two moments, the next sum's moments stay exact and only the activation
    after it sees the difference. Along the stream `h <- relu(h + f)` with independent
    Gaussian branches under the 1/N rule, this under-predicts the stream's second moment
    by 1.5% after 9 blocks and 1.9% after 27 (Monte-Carlo, `tests/test_rectified.py`),
    where taking `h + f` Gaussian under-predicts it by 16% and 19%.

    Returns:
        `(mean, var)` arrays, or None where no member matches: `phi` not homogeneous, its
        ratio not increasing in t (leaky_relu), or a target outside the family's range
        (t beyond [-4, 8] or `second <= 0`).
    """
    if not spec.homogeneous or _affine_identity(spec):
        return None
    second, first = np.broadcast_arrays(np.asarray(second, float), np.asarray(first, float))
    if not np.all(second > 0):
        return None

    def ratio(t):
        b, a = moments(spec, t, np.ones(np.shape(t)))
        return a * np.abs(a) / b

    table = ratio(_MATCH_T)
    if not np.all(np.diff(table) > 0):
        return None
    target = first * np.abs(first) / second
    if np.any(target < table[0]) or np.any(target > table[-1]):
        return None
    index = np.clip(np.searchsorted(table, target), 1, len(_MATCH_T) - 1)
    low, high = _MATCH_T[index - 1], _MATCH_T[index]
    for _ in range(60):  # the bracket is 0.05 wide: 60 halvings reach float64 resolution
        middle = (low + high) / 2
        above = ratio(middle) > target
        low, high = np.where(above, low, middle), np.where(above, middle, high)
    t = (low + high) / 2
    var = second / moments(spec, t, np.ones(t.shape))[0]
    return t * np.sqrt(var), var
