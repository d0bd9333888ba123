"""The order-to-chaos analysis: critical points, chi_1, depth scales, CriticalInit."""

import math

import keras
import numpy as np
import pytest
from scipy import integrate

from keras_goodinit import criticality
from keras_goodinit.criticality import CriticalInit, critical_point, mean_field_phase


def _gauss(f, q):
    """E[f(sqrt(q) u)], u ~ N(0, 1), by adaptive quadrature (independent of the module's)."""
    s = math.sqrt(q)
    value, _ = integrate.quad(lambda u: f(s * u) * math.exp(-0.5 * u * u) / math.sqrt(2 * math.pi),
                              -12, 12, epsabs=1e-14, epsrel=1e-13, limit=200)
    return value


def _sech4(z):
    return 1.0 / math.cosh(z) ** 4


def test_tanh_critical_point_matches_the_published_value():
    # Schoenholz, Gilmer, Ganguli & Sohl-Dickstein 2017 (Deep Information Propagation): for
    # tanh with sigma_b2 = 0.05 the order-to-chaos transition is at sigma_w2 ~ 1.76 (quoted to
    # three figures: +-0.005).
    point = critical_point("tanh", sigma_b2=0.05)
    assert point.phase == "critical"
    assert abs(point.sigma_w2 - 1.76) <= 0.005
    # With no bias the line ends at sigma_w2 = 1 / tanh'(0)^2 = 1, q* = 0 (phi' by central
    # differences: good to about eps^(2/3) = 4e-11).
    end = critical_point("tanh", sigma_b2=0.0)
    assert end.q_star == 0.0 and abs(end.sigma_w2 - 1.0) < 1e-10


@pytest.mark.parametrize("kwargs", [{"sigma_b2": 0.05}, {"q_star": 1.0}, {"q_star": 0.01},
                                    {"sigma_b2": 0.3}])
def test_chi_1_is_one_and_q_star_a_fixed_point_by_independent_quadrature(kwargs):
    point = critical_point("tanh", **kwargs)
    # Adaptive quadrature to 1e-13: the module's trapezoid rule is spectrally accurate
    # (1e-12 here), its central differences for phi' good to ~1e-10: 1e-8 leaves room.
    chi_1 = point.sigma_w2 * _gauss(_sech4, point.q_star)
    assert abs(chi_1 - 1.0) < 1e-8
    mapped = point.sigma_w2 * _gauss(lambda z: math.tanh(z) ** 2, point.q_star) + point.sigma_b2
    assert abs(mapped - point.q_star) < 1e-8 * max(1.0, point.q_star)
    if "sigma_b2" in kwargs:
        assert point.sigma_b2 == kwargs["sigma_b2"]
    else:
        assert point.q_star == kwargs["q_star"]


def test_chi_1_is_one_at_finite_width_by_the_jacobian_of_a_critical_network():
    # A width-512 tanh network with CriticalInit's orthogonal kernels and N(0, sigma_b2)
    # biases, started at its fixed point q* = 1 (well inside tanh's non-linear range).
    # A perturbation delta grows per layer by ||W (phi'(z) * delta)||^2 / ||delta||^2 =
    # sigma_w2 sum_i phi'(z_i)^2 w_i (W orthogonal, w_i = delta_i^2 / ||delta||^2): a weighted
    # mean of a_i = sigma_w2 phi'(z_i)^2, whose expectation is chi_1 = 1.
    width, batch, depth, q = 512, 32, 40, 1.0
    point = critical_point("tanh", q_star=q)
    init = CriticalInit("tanh", q_star=q, seed=3)
    bias_init = init.bias_initializer()
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, math.sqrt(q), (batch, width))
    delta = rng.normal(size=(batch, width))
    log_growth = np.zeros(batch)
    for _ in range(depth):
        kernel = np.asarray(keras.ops.convert_to_numpy(init((width, width), "float64")))
        bias = np.asarray(keras.ops.convert_to_numpy(bias_init((width,), "float64")))
        slope = 1.0 / np.cosh(z) ** 2
        new_delta = (slope * delta) @ kernel
        log_growth += np.log(np.sum(new_delta**2, 1) / np.sum(delta**2, 1))
        z, delta = np.tanh(z) @ kernel + bias, new_delta
    measured = float(np.mean(log_growth)) / depth
    # The bound: per layer and example the weighted mean of a_i has variance about
    # (sum w_i^2 + 1/N) Var(a) = 4 Var(a) / N (Gaussian delta: E[sum w_i^2] = 3 / N; the
    # a_i's own sampling adds 1 / N); layers and examples are independent draws of z and
    # delta, so the mean log growth has standard error sqrt(4 cv^2 / N / (L B)) (cv^2 =
    # Var(a) / E[a]^2 by quadrature) and a bias of -2 cv^2 / N (E log <= log E). Four standard
    # errors plus the bias. A 2% detuning of sigma_w2 would move it by log(1.02) = 0.0198.
    second = point.sigma_w2**2 * _gauss(lambda s: _sech4(s) ** 2, q)
    cv2 = second - 1.0
    standard_error = math.sqrt(4 * cv2 / width / (depth * batch))
    bound = 4 * standard_error + 2 * cv2 / width
    assert bound < 0.01
    assert abs(measured) <= bound, (measured, bound)


def test_relu_has_no_critical_line():
    point = critical_point("relu")
    assert point.phase == "marginal"
    assert point.sigma_w2 == 2.0 and point.sigma_b2 == 0.0 and math.isnan(point.q_star)
    assert "no critical line" in point.note and "dynamical isometry" in point.note
    with pytest.raises(ValueError, match="sigma_b2"):
        critical_point("relu", sigma_b2=0.1)
    # Linear: every q is a fixed point, and an orthogonal network is an exact isometry.
    assert "exact isometry" in critical_point("linear").note


def test_infeasible_points_raise_naming_the_argument():
    with pytest.raises(ValueError, match=r"q_star.*smallest q\*.*Received: q_star=0.01"):
        critical_point("sigmoid")  # sigmoid's line needs sigma_b2 < 0 at small q*
    with pytest.raises(ValueError, match="Received: q_star=-1"):
        critical_point("tanh", q_star=-1)
    with pytest.raises(ValueError, match="not both"):
        critical_point("tanh", q_star=1.0, sigma_b2=0.1)
    with pytest.raises(ValueError, match="sigma_w2"):
        mean_field_phase("tanh", 0.0)
    with pytest.raises(ValueError, match="activation"):
        critical_point("softmax")


def test_ordered_and_chaotic_phases():
    ordered = mean_field_phase("tanh", 1.5, 0.05)
    assert ordered.phase == "ordered" and ordered.c_star == 1.0
    assert ordered.chi_1 == pytest.approx(1.5 * _gauss(_sech4, ordered.q_star), abs=1e-9)
    assert ordered.xi_c == pytest.approx(-1.0 / math.log(ordered.chi_1), rel=1e-12)
    assert ordered.trainable_depth == pytest.approx(6 * ordered.xi_c)
    chaotic = mean_field_phase("tanh", 2.5, 0.05)
    assert chaotic.phase == "chaotic" and chaotic.chi_1 > 1 and 0 < chaotic.c_star < 1
    # c* is a fixed point of the correlation map, checked by 2-D adaptive quadrature.
    q, c = chaotic.q_star, chaotic.c_star

    def pair(v, u):
        z1 = math.sqrt(q) * u
        z2 = math.sqrt(q) * (c * u + math.sqrt(1 - c * c) * v)
        return math.tanh(z1) * math.tanh(z2) * math.exp(-0.5 * (u * u + v * v)) / (2 * math.pi)

    cross, _ = integrate.dblquad(pair, -9, 9, -9, 9, epsabs=1e-11)
    assert (2.5 * cross + 0.05) / q == pytest.approx(c, abs=1e-6)
    assert 0 < chaotic.chi_c < 1 and math.isfinite(chaotic.xi_c)
    # Moving toward the edge of chaos lengthens the depth scale.
    closer = mean_field_phase("tanh", 1.7, 0.05)
    assert closer.xi_c > ordered.xi_c


def test_critical_init_kernels_and_biases():
    point = critical_point("tanh", sigma_b2=0.05)
    init = CriticalInit("tanh", sigma_b2=0.05, seed=1)
    kernel = keras.ops.convert_to_numpy(init((256, 256)))
    # Every unit norm is sqrt(sigma_w2) (square: C_in / C_out = 1), to float32 rounding.
    norms = np.sqrt(np.sum(kernel.astype(float) ** 2, 0))
    assert np.allclose(norms, math.sqrt(point.sigma_w2), rtol=1e-5)
    bias = keras.ops.convert_to_numpy(init.bias_initializer()((4096,))).astype(float)
    # Sample variance of 4096 N(0, sigma_b2) draws: relative std sqrt(2/n) = 0.022; 4 sigma.
    assert abs(np.var(bias) / point.sigma_b2 - 1) < 4 * math.sqrt(2 / bias.size)
    # Fresh biases per layer.
    other = keras.ops.convert_to_numpy(init.bias_initializer()((4096,)))
    assert not np.array_equal(bias, other)
    again = keras.initializers.get({"class_name": "CriticalInit", "config": init.get_config()})
    assert isinstance(again, CriticalInit) and again.get_config() == init.get_config()
    assert again.point.sigma_w2 == point.sigma_w2
    assert criticality.CriticalInit("tanh", sigma_b2=0.0).bias_initializer()((3,)).shape == (3,)


def test_the_chaotic_phase_of_an_odd_activation_without_bias():
    # tanh with no bias: c = 0 is the stable correlation (c = +-1 are unstable fixed points
    # in the chaotic phase), so chi_c = sigma_w2 E[phi'(u)] E[phi'(v)] at independent u, v.
    phase = mean_field_phase("tanh", 2.5, 0.0)
    assert phase.phase == "chaotic" and abs(phase.c_star) < 1e-6
    expected = 2.5 * _gauss(lambda z: 1 / math.cosh(z) ** 2, phase.q_star) ** 2
    assert phase.chi_c == pytest.approx(expected, rel=1e-6)
    assert phase.xi_c == pytest.approx(-1 / math.log(expected), rel=1e-5)


def test_no_bias_ends_the_line_at_zero_only_where_phi_does():
    # tanh: phi(0) = 0, phi'(0) = 1. tanh_shrink: phi'(0) = 0, and sigmoid: phi(0) = 1/2,
    # where q = 0 is no fixed point: their points without bias are searched, or refused.
    assert critical_point("tanh", sigma_b2=0.0).q_star == 0.0
    with pytest.raises(ValueError, match="sigma_b2"):
        critical_point("tanh_shrink", sigma_b2=0.0)
    sigmoid = critical_point("sigmoid", sigma_b2=0.0)
    assert sigmoid.q_star > 1 and sigmoid.sigma_w2 * _gauss(
        lambda z: (0.25 / math.cosh(z / 2) ** 2) ** 2, sigmoid.q_star) == pytest.approx(
            1, abs=1e-7)


def test_an_unstable_fixed_point_is_said_and_relu_takes_no_q_star():
    gelu = critical_point("gelu", q_star=0.01)
    assert "unstable fixed point" in gelu.note and math.isnan(gelu.xi_q)
    assert "unstable" not in critical_point("tanh", q_star=0.01).note
    with pytest.raises(ValueError, match="Received: q_star=0.5"):
        critical_point("relu", q_star=0.5)


def test_critical_init_round_trips_a_registered_activation():
    from keras_goodinit import register_activation

    @keras.saving.register_keras_serializable(package="test_criticality")
    def scaled_tanh(x):
        return keras.ops.tanh(0.5 * x)

    register_activation(scaled_tanh)
    init = CriticalInit(scaled_tanh, q_star=0.04, seed=0)
    again = CriticalInit.from_config(init.get_config())
    assert again.point.sigma_w2 == init.point.sigma_w2
