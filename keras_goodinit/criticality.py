"""The order-to-chaos analysis of deep networks: fixed points, chi_1, depth scales.

For a layer `z' = W phi(z) + b` with weights of variance `sigma_w2 / fan_in`
and biases of variance `sigma_b2`, the pre-activations' second moment
follows the variance map `q' = sigma_w2 E[phi(sqrt(q) u)^2] + sigma_b2`
(u ~ N(0, 1)) to a fixed point `q*`; two inputs' correlation follows the
correlation map to `c*`. At `q*`, a small perturbation grows by
`chi_1 = sigma_w2 E[phi'(sqrt(q*) u)^2]` per layer: `chi_1 < 1` is the
ordered phase (inputs collapse onto one another), `chi_1 > 1` the chaotic
one (they decorrelate), and `chi_1 = 1` the edge of chaos, where the depth
scale `xi_c` over which correlations still carry information diverges.
Networks train up to about `6 xi_c` layers (Schoenholz et al. 2017).

Every expectation is a one-dimensional Gaussian integral, by the same
means `_moments` uses for `mean_field_init`: exact partial moments for
piecewise-linear activations, and otherwise a 12,001-point trapezoid rule
on [-12, 12] (spectrally accurate for smooth activations, about 1e-7 across
a kink); the correlation map uses `_moments.cross_moment`.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from keras_goodinit import _backend, _moments, _validate
from keras_goodinit.initializers import GoodInit


def _step() -> float:
    """Central differences for phi': truncation h^2 phi'''/6 and rounding eps/h are both
    about eps^(2/3) at h = eps^(1/3) (per unit of the input's scale), eps that of the float
    the backend evaluates activations in (4e-11 in float64; 2.4e-5 in float32, on JAX)."""
    return float(np.finfo(_backend.wide()).eps) ** (1 / 3)

# The fixed points are searched on q in [1e-8, 1e8]: far beyond any pre-activation
# scale an init aims at.
_Q_LOW, _Q_HIGH = 1e-8, 1e8
_SCAN = np.geomspace(_Q_LOW, _Q_HIGH, 321)
# chi_1 within this of 1 counts as critical (the quadrature's own accuracy is ~1e-10).
_CRITICAL_TOL = 1e-9
# The trainable depth is about 6 xi_c (Schoenholz et al. 2017, Figure 6).
DEPTH_FACTOR = 6.0


@dataclasses.dataclass(frozen=True)
class MeanFieldPhase:
    """Where `(sigma_w2, sigma_b2)` puts a deep network of one activation.

    Attributes:
        activation: The activation's name.
        sigma_w2: Weight variance times fan-in.
        sigma_b2: Bias variance.
        q_star: The stable fixed point of the variance map (`nan` when there
            is none: the variance diverges; or when every q is one).
        chi_1: `sigma_w2 E[phi'(z)^2]` at `q_star`: the growth of a small
            perturbation per layer.
        c_star: The stable fixed point of the correlation map (1 in the
            ordered phase and at criticality).
        chi_c: The correlation map's slope at `c_star` (`chi_1` when
            `c_star = 1`).
        xi_q: Depth scale over which the variance settles to `q_star`.
        xi_c: Depth scale over which the correlation settles to `c_star`:
            `-1 / ln(chi_c)`, infinite at the edge of chaos.
        phase: `"ordered"`, `"critical"`, `"chaotic"`, `"marginal"` (every q
            is a fixed point: a homogeneous activation at its critical gain)
            or `"divergent"` (no finite fixed point).
        note: What a user should know about this point, or "".
    """

    activation: str
    sigma_w2: float
    sigma_b2: float
    q_star: float
    chi_1: float
    c_star: float
    chi_c: float
    xi_q: float
    xi_c: float
    phase: str
    note: str = ""

    @property
    def trainable_depth(self) -> float:
        """About `6 xi_c` layers: the depth up to which such networks train."""
        return DEPTH_FACTOR * self.xi_c

    def __str__(self) -> str:
        text = (f"{self.activation}: sigma_w2={self.sigma_w2:.6g}, sigma_b2={self.sigma_b2:.6g}, "
                f"q*={self.q_star:.6g}, chi_1={self.chi_1:.6g}, c*={self.c_star:.6g}, "
                f"xi_c={self.xi_c:.4g}, trainable depth ~{self.trainable_depth:.4g} "
                f"({self.phase})")
        return text + (f"; {self.note}" if self.note else "")


def _spec(activation) -> _moments.ActivationSpec:
    if isinstance(activation, _moments.ActivationSpec):
        return activation
    return _moments._known(activation)


def _second(spec, q: np.ndarray) -> np.ndarray:
    """E[phi(sqrt(q) u)^2] for each q."""
    q = np.asarray(q, float)
    if spec.pieces is not None or spec.moments is not None:
        return np.asarray(_moments.moments(spec, np.zeros(q.shape), q)[0], float)
    values = _moments._evaluate(spec.fn, np.sqrt(q)[..., None] * _moments._GRID)
    return np.sum(_moments._GRID_W * values**2, axis=-1)


def _slope_of_second(spec, q: np.ndarray) -> np.ndarray:
    """d/dq E[phi(sqrt(q) u)^2], as `_moments.chi` takes it."""
    return np.asarray(_moments.second_slope(spec, float(q), 0.0), float)


def _derivative_square(spec, q: np.ndarray) -> np.ndarray:
    """E[phi'(sqrt(q) u)^2] for each q."""
    q = np.asarray(q, float)
    if spec.pieces is not None:
        s = np.sqrt(q)
        total = np.zeros(q.shape)
        for lower, upper, slope, _ in spec.pieces:
            mass = _moments._cdf(upper / s) - _moments._cdf(lower / s)
            total = total + slope**2 * mass
        return total
    z = np.sqrt(q)[..., None] * _moments._GRID
    step = _step() * np.maximum(1.0, np.abs(z))
    slope = (_moments._evaluate(spec.fn, z + step)
             - _moments._evaluate(spec.fn, z - step)) / (2 * step)
    return np.sum(_moments._GRID_W * slope**2, axis=-1)


def _derivative_spec(spec) -> _moments.ActivationSpec:
    """phi' as an activation spec, for its cross moment E[phi'(u) phi'(v)]."""
    if spec.pieces is not None:
        pieces = tuple((lower, upper, 0.0, slope) for lower, upper, slope, _ in spec.pieces)
        return _moments.ActivationSpec(spec.name + "'", None, pieces)
    fn, h = spec.fn, _step()

    def derivative(x):
        step = h * keras.ops.maximum(1.0, keras.ops.abs(x))
        return (fn(x + step) - fn(x - step)) / (2 * step)

    return _moments.ActivationSpec(spec.name + "'", derivative)


def _bisect_log(below, low: float, high: float) -> float:
    """The point in [low, high] where `below(q)` turns False, by bisection in log q to the
    float's resolution (`below(low)` True, `below(high)` False)."""
    for _ in range(200):
        mid = math.sqrt(low * high)
        if below(mid):
            low = mid
        else:
            high = mid
        if high - low <= 4 * np.finfo(float).eps * high:
            break
    return 0.5 * (low + high)


def _fixed_point(spec, sigma_w2: float, sigma_b2: float) -> tuple[float, str]:
    """(q*, phase hint): the stable fixed point of the variance map reached from small q."""
    if spec.homogeneous:
        # M(q) = q M(1): the map is linear, q' = sigma_w2 M(1) q + sigma_b2.
        slope = sigma_w2 * float(_second(spec, np.asarray(1.0)))
        if abs(slope - 1.0) <= _CRITICAL_TOL:
            return (math.nan, "marginal") if sigma_b2 == 0 else (math.nan, "divergent")
        if slope > 1.0:
            return math.nan, "divergent"
        return sigma_b2 / (1.0 - slope), ""
    gap = sigma_w2 * _second(spec, _SCAN) + sigma_b2 - _SCAN  # q' - q
    if gap[0] <= 0:  # the map pulls even tiny variances down: q* = 0 (only with no bias)
        return 0.0, ""
    crossings = np.nonzero((gap[:-1] > 0) & (gap[1:] <= 0))[0]
    if not crossings.size:
        return math.nan, "divergent"
    return _bisect_log(lambda q: sigma_w2 * float(_second(spec, np.asarray(q))) + sigma_b2 > q,
                       _SCAN[crossings[0]], _SCAN[crossings[0] + 1]), ""


def _correlation(spec, sigma_w2: float, sigma_b2: float, q: float, chi_1: float):
    """(c*, chi_c) of the correlation map at the variance fixed point q."""
    if chi_1 <= 1.0 + _CRITICAL_TOL or q == 0.0:
        return 1.0, chi_1

    def gap(c):
        return (sigma_w2 * _moments.cross_moment(spec, 0.0, q, c * q) + sigma_b2) / q - c

    # c = +-1 are fixed points too (c = -1 for an odd phi without bias), unstable here.
    low, high = -1.0 + 1e-6, 1.0 - 1e-6
    if gap(high) >= 0 or gap(low) < 0:  # too close to 1 to resolve: treat c* as 1
        return 1.0, chi_1
    for _ in range(60):
        mid = 0.5 * (low + high)
        if gap(mid) > 0:
            low = mid
        else:
            high = mid
    c = 0.5 * (low + high)
    chi_c = sigma_w2 * _moments.cross_moment(_derivative_spec(spec), 0.0, q, c * q)
    return c, chi_c


def _marginal_note(spec, sigma_w2: float) -> str:
    slopes = {piece[2] for piece in spec.pieces or ()}
    if slopes == {1.0}:  # linear: an orthogonal network is an exact isometry
        return (f"{spec.name}: every q is a fixed point at sigma_w2={sigma_w2:g}; with "
                "orthogonal weights the network is an exact isometry")
    return (f"{spec.name} is positively homogeneous: chi_1 = 1 only at sigma_w2={sigma_w2:g} "
            "with no bias, where every q is a fixed point (marginal): there is no critical line "
            "with sigma_b2 > 0 and no q* to choose, correlations converge to 1 as a power law, "
            "and the input-output Jacobian cannot reach dynamical isometry (the derivative "
            f"takes the values {sorted(slopes)}: the singular values spread with depth whatever "
            "the weights, Pennington et al. 2017)")


def _depth_scale(slope: float) -> float:
    if not math.isfinite(slope) or slope <= 0:
        return 0.0 if slope == 0 else math.nan
    if abs(slope - 1.0) <= _CRITICAL_TOL:
        return math.inf
    return -1.0 / math.log(slope) if slope < 1 else 1.0 / math.log(slope)


def _phase(spec, sigma_w2: float, sigma_b2: float, q: float | None = None) -> MeanFieldPhase:
    hint = ""
    if q is None:
        q, hint = _fixed_point(spec, sigma_w2, sigma_b2)
    note = ""
    if hint == "divergent":
        return MeanFieldPhase(spec.name, sigma_w2, sigma_b2, math.nan, math.nan, math.nan,
                              math.nan, math.nan, math.nan, "divergent",
                              "the variance map has no finite fixed point: the signal grows "
                              "without bound with depth")
    if hint == "marginal":
        chi_1 = sigma_w2 * float(_derivative_square(spec, np.asarray(1.0)))
        return MeanFieldPhase(spec.name, sigma_w2, sigma_b2, math.nan, chi_1, 1.0, chi_1,
                              math.inf, math.inf, "marginal", _marginal_note(spec, sigma_w2))
    probe = np.asarray(max(q, 1e-300))
    chi_1 = sigma_w2 * float(_derivative_square(spec, probe))
    # The variance map's slope at q*: a deviation from q* decays like slope^depth.
    slope_q = sigma_w2 * float(_slope_of_second(spec, probe)) if q > 0 else chi_1
    c_star, chi_c = _correlation(spec, sigma_w2, sigma_b2, q, chi_1)
    xi_c = _depth_scale(chi_c)
    xi_q = _depth_scale(slope_q)
    if slope_q > 1.0 + _CRITICAL_TOL:
        xi_q = math.nan
        note = (f"q* = {q:.4g} is an unstable fixed point of the variance map (slope "
                f"{slope_q:.4g} > 1): a deviation from it grows like {slope_q:.4g}^depth, "
                "so the variance drifts away (gelu, silu at small q*: a data-driven init, "
                "lsuv_init, holds it)")
    if abs(chi_1 - 1.0) <= _CRITICAL_TOL:
        phase, xi_c = "critical", math.inf
    else:
        phase = "ordered" if chi_1 < 1 else "chaotic"
    if q == 0.0:
        note = ("q* = 0: without bias the signal decays to zero; chi_1 is that of the "
                "linearised activation at 0")
    return MeanFieldPhase(spec.name, float(sigma_w2), float(sigma_b2), float(q), chi_1,
                          float(c_star), float(chi_c), xi_q, xi_c, phase, note)


def mean_field_phase(activation, sigma_w2: float, sigma_b2: float = 0.0) -> MeanFieldPhase:
    """The fixed point, `chi_1` and depth scales of a deep network at `(sigma_w2, sigma_b2)`.

    Examples:

    >>> phase = mean_field_phase("tanh", sigma_w2=1.5, sigma_b2=0.05)
    >>> phase.phase, round(phase.q_star, 3), round(phase.trainable_depth)
    ('ordered', 0.418, 95)
    >>> round(mean_field_phase("relu", 2.0).chi_1, 12), mean_field_phase("relu", 2.0).phase
    (1.0, 'marginal')

    Args:
        activation: A Keras activation function or name, or one registered
            with `register_activation`.
        sigma_w2: Weight variance times fan-in, a positive number.
        sigma_b2: Bias variance, a non-negative number.

    Returns:
        A `MeanFieldPhase`.

    Reference:
        - [Poole et al., 2016](https://arxiv.org/abs/1606.05340)
        - [Schoenholz et al., 2017](https://arxiv.org/abs/1611.01232)
    """
    sigma_w2 = _validate.number("sigma_w2", sigma_w2, positive=True)
    sigma_b2 = _validate.number("sigma_b2", sigma_b2, minimum=0.0)
    return _phase(_spec(activation), sigma_w2, sigma_b2)


def _ends_at_zero(spec) -> bool:
    """phi(0) = 0 and phi'(0) != 0: q = 0 is a fixed point without bias, the critical
    line's end at sigma_w2 = 1 / phi'(0)^2."""
    at_zero = float(_moments.values(spec, np.zeros(1))[0])
    # phi'(0)^2 by central differences is good to ~eps^(2/3): below 1e-8 it is 0.
    return at_zero == 0.0 and float(_derivative_square(spec, np.asarray(1e-300))) > 1e-8


def _critical_bias(spec, q: np.ndarray) -> np.ndarray:
    """sigma_b2 on the critical line at fixed point q: q - E[phi^2] / E[phi'^2]."""
    with np.errstate(divide="ignore", invalid="ignore"):  # phi' = 0 near 0 (shrinks)
        return q - _second(spec, q) / _derivative_square(spec, q)


def critical_point(activation, *, q_star: float | None = None,
                   sigma_b2: float | None = None) -> MeanFieldPhase:
    """The edge of chaos: `(sigma_w2, sigma_b2)` with `chi_1 = 1` at the fixed point `q*`.

    On the critical line `sigma_w2 = 1 / E[phi'(sqrt(q*) u)^2]` and
    `sigma_b2 = q* - sigma_w2 E[phi(sqrt(q*) u)^2]`: give the fixed point
    `q_star` (small q* keeps a bounded activation near its linear regime:
    the input-output Jacobian then concentrates best, Pennington et al.
    2017) or the bias variance `sigma_b2` (q* is then solved for). With
    neither, `q_star=0.01`.

    A positively homogeneous activation (relu, leaky_relu) has `chi_1 = 1`
    only at its He gain with no bias, where every q is a fixed point: the
    point is returned with `phase="marginal"` and a note that says why it is
    no critical line, and a `sigma_b2 > 0` raises. An activation for which
    the line needs a negative bias variance at `q_star` raises, naming the
    smallest q* that works.

    Examples:

    >>> point = critical_point("tanh", sigma_b2=0.05)
    >>> round(point.sigma_w2, 4), round(point.q_star, 4), point.phase
    (1.761, 0.57, 'critical')
    >>> round(critical_point("tanh", q_star=1.0).chi_1, 9)
    1.0

    Args:
        activation: A Keras activation function or name, or one registered
            with `register_activation`.
        q_star: The fixed point to put on the critical line, a positive number.
        sigma_b2: The bias variance instead, a non-negative number.

    Returns:
        A `MeanFieldPhase` whose `chi_1` is 1 (to the quadrature's accuracy).

    Reference:
        - [Schoenholz et al., 2017](https://arxiv.org/abs/1611.01232)
        - [Pennington, Schoenholz & Ganguli, 2017](https://arxiv.org/abs/1711.04735)
    """
    if q_star is not None and sigma_b2 is not None:
        raise ValueError("Give `q_star` or `sigma_b2`, not both. Received: "
                         f"q_star={q_star!r}, sigma_b2={sigma_b2!r}")
    spec = _spec(activation)
    if q_star is not None:
        q_star = _validate.number("q_star", q_star, positive=True)
    if sigma_b2 is not None:
        sigma_b2 = _validate.number("sigma_b2", sigma_b2, minimum=0.0)
    if spec.homogeneous:
        gain = 1.0 / float(_derivative_square(spec, np.asarray(1.0)))
        if q_star is not None:
            raise ValueError(
                f"Argument `q_star` has no meaning for {spec.name}: at its critical gain "
                f"sigma_w2 = {gain:g} every q is a fixed point. Received: q_star={q_star!r}")
        if sigma_b2:
            raise ValueError(
                f"Argument `sigma_b2` has no critical point for {spec.name}: chi_1 = 1 needs "
                f"sigma_w2 = {gain:g}, where the variance map is q -> q + sigma_b2 and has no "
                f"fixed point for sigma_b2 > 0. Received: sigma_b2={sigma_b2!r}")
        return _phase(spec, gain, 0.0)
    if sigma_b2 is None:
        q = 0.01 if q_star is None else q_star
        bias = float(_critical_bias(spec, np.asarray(q)))
        if bias < -1e-12 * q:
            feasible = _SCAN[_critical_bias(spec, _SCAN) >= 0]
            where = (f"the smallest q* on [{_Q_LOW:g}, {_Q_HIGH:g}] that works is about "
                     f"{feasible[0]:.3g}" if feasible.size else
                     f"no q* on [{_Q_LOW:g}, {_Q_HIGH:g}] works")
            raise ValueError(
                f"Argument `q_star` puts {spec.name}'s critical line at a negative bias "
                f"variance ({bias:.3g}): {where}. Received: q_star={q!r}")
        bias = max(bias, 0.0)
    elif sigma_b2 == 0.0 and _ends_at_zero(spec):
        # The critical line's end: q* = 0, where chi_1 = sigma_w2 phi'(0)^2.
        slope = float(_derivative_square(spec, np.asarray(1e-300)))
        return _phase(spec, 1.0 / slope, 0.0, 0.0)
    else:
        bias = sigma_b2
        gap = _critical_bias(spec, _SCAN) - bias
        crossings = np.nonzero((gap[:-1] < 0) & (gap[1:] >= 0))[0]
        if not crossings.size:
            raise ValueError(
                f"Argument `sigma_b2` meets no point of {spec.name}'s critical line with q* in "
                f"[{_Q_LOW:g}, {_Q_HIGH:g}]. Received: sigma_b2={sigma_b2!r}")
        q = _bisect_log(lambda q: float(_critical_bias(spec, np.asarray(q))) < bias,
                        _SCAN[crossings[0]], _SCAN[crossings[0] + 1])
    sigma_w2 = 1.0 / float(_derivative_square(spec, np.asarray(q)))
    return _phase(spec, sigma_w2, bias, q)


@keras.saving.register_keras_serializable(package="keras_goodinit")
class CriticalInit(GoodInit):
    """Kernels at the edge of chaos of an activation: `chi_1 = 1` at the fixed point `q*`.

    Every unit's fan-in vector gets the norm `g = sqrt(sigma_w2 * C_in / C_out)`
    of `GoodInit(gamma=sigma_w2)`, with `sigma_w2` from `critical_point`:
    between equal-width layers the weights then have variance
    `sigma_w2 / fan_in`. Draw the biases from `bias_initializer()`
    (`N(0, sigma_b2)`, fresh values per layer). With
    `distribution="orthogonal"` (Dense) or `"delta_orthogonal"` (Conv) and a
    bounded activation such as tanh at small `q*`, the input-output Jacobian
    stays close to an isometry at any depth (dynamical isometry).

    Examples:

    >>> init = CriticalInit("tanh", sigma_b2=0.05, seed=0)
    >>> round(init.point.sigma_w2, 3)
    1.761
    >>> layer = keras.layers.Dense(64, activation="tanh", kernel_initializer=init,
    ...                            bias_initializer=init.bias_initializer())

    Args:
        activation: The activation that follows the layer.
        q_star: The fixed point (see `critical_point`); default 0.01.
        sigma_b2: The bias variance instead of `q_star`.
        distribution: `"orthogonal"` (default), `"delta_orthogonal"` or
            `"normal"` directions, as `GoodInit`'s.
        layout: Where the output units sit in the kernel, as `GoodInit`'s.
        seed: A non-negative int, `None` or a `keras.random.SeedGenerator`.

    Reference:
        - [Schoenholz et al., 2017](https://arxiv.org/abs/1611.01232)
        - [Pennington, Schoenholz & Ganguli, 2017](https://arxiv.org/abs/1711.04735)
        - [Xiao et al., 2018](https://arxiv.org/abs/1806.05393)
    """

    def __init__(self, activation="tanh", *, q_star: float | None = None,
                 sigma_b2: float | None = None, distribution: str = "orthogonal",
                 layout: str = "default", seed=None):
        if isinstance(activation, dict):  # a serialized function, from get_config
            activation = keras.saving.deserialize_keras_object(activation)
        point = critical_point(activation, q_star=q_star, sigma_b2=sigma_b2)
        super().__init__("wn_linear", gamma=point.sigma_w2, distribution=distribution,
                         layout=layout, seed=seed)
        self.activation = activation
        self.q_star, self.sigma_b2 = q_star, sigma_b2
        self.point = point
        self._bias_seed = None

    def bias_initializer(self) -> keras.initializers.Initializer:
        """`N(0, sigma_b2)` biases (zeros when `sigma_b2` is 0), fresh for every layer."""
        if self.point.sigma_b2 == 0:
            return keras.initializers.Zeros()
        if self._bias_seed is None:  # one stream for every layer's biases: each draw is fresh
            seed = self.seed
            # Far from the kernel seeds `seed`, `seed + 1`... of neighbouring layers.
            self._bias_seed = (seed if isinstance(seed, keras.random.SeedGenerator) else
                               keras.random.SeedGenerator(
                                   None if seed is None else (seed + 2**30) % 2**31))
        return keras.initializers.RandomNormal(stddev=math.sqrt(self.point.sigma_b2),
                                               seed=self._bias_seed)

    def get_config(self) -> dict:
        config = super().get_config()
        for key in ("scheme", "num_blocks", "block_index", "gamma"):
            config.pop(key)
        activation = self.activation
        if not isinstance(activation, str):
            activation = keras.saving.serialize_keras_object(activation)
        config.update(activation=activation, q_star=self.q_star, sigma_b2=self.sigma_b2)
        return config


# As GoodInit: found by its plain name (`kernel_initializer="CriticalInit"`, a config dict).
keras.saving.get_custom_objects().update({"CriticalInit": CriticalInit})
