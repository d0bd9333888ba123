"""The slope chi of the variance map, and what `register_activation` accepts.

chi = q M'(q) / M(q) with M(q) = E[phi(z)^2], z ~ N(mean, q) (science.md §3).
It is checked against closed forms where there are some (homogeneous
activations, exp, sin, the exact moments of piecewise-linear ones) and
against a Richardson-extrapolated central difference of a fine-grid integral
for gelu, silu, mish and tanh; each tolerance says where it comes from.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_goodinit import _backend, _moments
from keras_goodinit._moments import ActivationSpec, chi, register_activation, spec_of

# Exact moments are float64 NumPy; activations run in float64 on tensors, or float32 where
# the backend has no float64 (JAX without x64): the grid's roundings are of that dtype.
EPS64 = float(np.finfo(float).eps)
EPS = float(np.finfo(_backend.wide()).eps)


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    # register_activation writes a module-level registry: keep other tests' view intact.
    monkeypatch.setattr(_moments, "_REGISTRY", dict(_moments._REGISTRY))


# --- chi ----------------------------------------------------------------------------------

def test_homogeneous_activations_have_chi_exactly_one():
    # M(q) = q M(1): the elasticity is 1 for every q, returned as such.
    for name in ("relu", "linear", "leaky_relu"):
        assert chi(name) == 1.0
        assert chi(name, q=3.7) == 1.0
    # The same through the numeric paths, without the homogeneous flag. M is exactly linear
    # in q, so a central difference only carries M's roundings, ~k eps M / h at h =
    # eps^(1/3) q: k eps^(2/3) with k = 32 roundings in the partial moments at most.
    bound = 32 * EPS64 ** (2 / 3)
    pieces = ActivationSpec("relu", None, _moments.relu_pieces(), False)
    leaky = ActivationSpec("leaky", None, _moments.relu_pieces(0.2), False)
    closed = ActivationSpec("relu", None, None, False,
                            lambda m, v: (v / 2, np.sqrt(v / (2 * np.pi))))
    for spec in (pieces, leaky, closed):
        for q in (0.3, 1.0, 3.7):
            assert abs(chi(spec, q) - 1.0) <= bound
    # The quadrature path for phi(z) = z: E[u^4] / E[u^2] - ... = (3 - 1) / 2 on the grid;
    # the trapezoid rule is spectrally accurate there, leaving sums' roundings of
    # sqrt(12001) eps each.
    identity = ActivationSpec("identity", lambda x: x)
    for q in (0.3, 1.0, 3.7):
        assert abs(chi(identity, q) - 1.0) <= 4 * math.sqrt(12001) * EPS


@pytest.mark.parametrize("q, mean", [(1.0, 0.0), (2.0, 0.5), (0.3, -0.2)])
def test_quadrature_chi_matches_closed_forms(q, mean):
    # exp: M = exp(2 mean + 2 q), chi = 2 q. sin: M = (1 - exp(-2q) cos(2 mean)) / 2.
    # Both smooth: the grid's error is its sums' roundings (bound as above, times chi).
    rounding = 4 * math.sqrt(12001) * EPS
    assert chi("exponential", q, mean) == pytest.approx(2 * q, rel=rounding, abs=0)
    decay = math.exp(-2 * q) * math.cos(2 * mean)
    want = 2 * q * decay / (1 - decay)
    got = chi(ActivationSpec("sin", ops.sin), q, mean)
    assert got == pytest.approx(want, rel=rounding, abs=rounding)


def _grid_reference(fn, q, mean):
    """chi from a fine-grid integral of M and a Richardson-extrapolated central difference."""
    u = np.linspace(-14.0, 14.0, 280001)
    pdf = np.exp(-0.5 * u**2) / math.sqrt(2 * math.pi)

    def second(v):
        values = ops.convert_to_numpy(fn(ops.convert_to_tensor(mean + math.sqrt(v) * u,
                                                               "float64")))
        return np.trapezoid(values**2 * pdf, u)

    h = 1e-3 * q

    def slope(step):
        return (second(q + step) - second(q - step)) / (2 * step)

    return q * (4 * slope(h / 2) - slope(h)) / 3 / second(q), u.size, h


@pytest.mark.parametrize("name", ["gelu", "silu", "mish", "tanh"])
@pytest.mark.parametrize("q, mean", [(1.0, 0.0), (2.0, 0.5)])
def test_smooth_chi_matches_a_fine_grid_derivative(name, q, mean):
    want, n, h = _grid_reference(keras.activations.get(name), q, mean)
    # The reference's error: each M has relative rounding <= sqrt(n) eps (a sum of n terms);
    # the Richardson combination (4 D(h/2) - D(h)) / 3 multiplies M's error by at most
    # 3 q / h relative to chi; its truncation is O((h/q)^4) = 1e-12. chi itself (grid of
    # 12001 points, spectrally accurate here) is far below that.
    tolerance = 3 * math.sqrt(n) * EPS * q / h + (h / q) ** 4
    assert abs(chi(name, q, mean) - want) <= tolerance


def _kink_bound(pieces, q, mean, value):
    """The trapezoid rule's error on chi for a piecewise-linear phi integrated on the grid.

    A derivative jump J of the integrand at one point costs the trapezoid rule on R at
    most J h^2 / 12 (Euler-Maclaurin: J h^2 B2({c/h}) / 2, |B2| <= 1/6). The integrands
    are phi(z)^2 pdf(u) (for M) and phi(z)^2 (u^2 - 1) pdf(u) (for 2 q M'), z = mean +
    sqrt(q) u; a kink of phi at z_k with slope jump s gives J = 2 |phi(z_k)| s sqrt(q)
    pdf(u_k) in the first, times |u_k^2 - 1| in the second.
    """
    h = 24 / 12000
    second = float(_moments.moments(ActivationSpec("p", None, pieces), mean, q)[0])
    bound = 0.0
    for (_, upper, slope, intercept), (_, _, after, _) in zip(pieces, pieces[1:]):
        u = (upper - mean) / math.sqrt(q)
        jump_m = (2 * abs(slope * upper + intercept) * abs(after - slope) * math.sqrt(q)
                  * math.exp(-0.5 * u * u) / math.sqrt(2 * math.pi))
        jump_slope = jump_m * abs(u * u - 1)
        bound += h * h / 12 * (jump_slope / (2 * second) + abs(value) * jump_m / second)
    return bound


@pytest.mark.parametrize("name", ["hard_tanh", "relu6", "soft_shrink", "hard_sigmoid"])
@pytest.mark.parametrize("q, mean", [(1.0, 0.0), (2.0, 0.5), (0.3, -0.2)])
def test_kinked_chi_on_the_grid_matches_exact_moments(name, q, mean):
    spec = spec_of(name)
    exact = chi(spec, q, mean)  # central difference of the exact partial moments
    grid = chi(ActivationSpec(name, spec.fn), q, mean)  # the quadrature path
    # Kink terms (leading, _kink_bound) + the O(h^4) ones and the exact path's
    # 32 eps^(2/3) (1.2e-9): 2e-9 for both; + the grid sums' roundings.
    rounding = 4 * math.sqrt(12001) * EPS
    assert abs(grid - exact) <= _kink_bound(spec.pieces, q, mean, exact) + 2e-9 + rounding


def test_chi_ordering_and_values():
    # Bounded or saturating activations contract deviations; gelu, silu and mish amplify
    # them (the values the issue measured on 50-layer MLPs: 1.14 and 1.17).
    for name in ("tanh", "sigmoid", "elu", "selu", "softplus", "relu6", "hard_tanh"):
        assert chi(name) < 1.0
    for name in ("gelu", "silu", "mish"):
        assert chi(name) > 1.0
    assert round(chi("gelu"), 3) == 1.144
    assert round(chi("silu"), 3) == 1.173
    # The slope does not depend on phi's scale: 2 tanh has the same chi as tanh, exactly
    # (the squares scale by 4, a power of two).
    twice = ActivationSpec("twice_tanh", lambda x: 2 * ops.tanh(x))
    assert chi(twice) == chi("tanh")


def test_chi_bad_arguments():
    for q in (0.0, -1.0, math.nan, "1"):
        with pytest.raises(ValueError, match="q="):
            chi("relu", q=q)
    with pytest.raises(ValueError, match="mean="):
        chi("relu", mean=math.inf)
    with pytest.raises(ValueError, match="not elementwise"):
        chi("softmax")
    with pytest.raises(ValueError, match="register_activation"):
        chi(lambda x: x)
    with pytest.raises(ValueError, match="maps N"):
        chi(ActivationSpec("zero", lambda x: 0 * x))


# --- register_activation ------------------------------------------------------------------

def _twice_tanh(x):
    return 2 * keras.ops.tanh(x)


@pytest.mark.parametrize("fn, homogeneous", [
    (keras.activations.relu, True), (keras.activations.leaky_relu, True),
    (lambda x: 3 * x, True), (keras.activations.tanh, False), (keras.activations.silu, False),
    (_twice_tanh, False), (lambda x: 2 * keras.ops.tanh(x), False)])
def test_elementwise_finite_functions_are_accepted(fn, homogeneous):
    assert register_activation(fn, homogeneous=homogeneous) is fn
    assert spec_of(fn).homogeneous is homogeneous


@pytest.mark.parametrize("fn, match", [
    (lambda x: ops.log(x), r"finite values .* nan at x=-8\.0"),
    (lambda x: 1 / x, r"finite values .* inf at x=0\.0"),
    (lambda x: ops.exp(x * x), r"finite values .* inf at x="),
    (keras.activations.softmax, "elementwise"),
    (keras.activations.log_softmax, "elementwise"),
    (keras.activations.glu, "fn"),  # halves an axis: raises on an odd size, else reshapes
    (lambda x: ops.glu(ops.reshape(x[:448], (-1, 2))), "returned shape"),
    (lambda x: x - ops.mean(x), "elementwise"),
    (lambda x: x / ops.max(ops.abs(x)), "elementwise"),
    (lambda x: ops.cumsum(x), "permuted"),
    (lambda x: ops.sort(x), "permuted"),
    (lambda x: x[:3], "returned shape"),
    (lambda x: x.no_such_attribute, "raised AttributeError"),
    (lambda x: ops.convert_to_numpy(x).tolist()["a"], "raised TypeError"),
])
def test_bad_functions_are_rejected_and_not_registered(fn, match):
    with pytest.raises(ValueError, match=match) as error:
        register_activation(fn)
    assert "Received: fn=" in str(error.value)
    assert spec_of(fn) is None


def test_softmax_is_rejected_by_its_row_dependence():
    with pytest.raises(ValueError, match="in rows of 7"):
        register_activation(keras.activations.softmax)
    with pytest.raises(ValueError, match="first half alone"):
        register_activation(lambda x: x / ops.max(ops.abs(x)))


@pytest.mark.parametrize("fn", [lambda x: x + 1.0, keras.activations.tanh, _twice_tanh,
                                keras.activations.relu6, keras.activations.elu])
def test_homogeneous_is_checked(fn):
    before = spec_of(fn)  # builtins keep their own spec
    with pytest.raises(ValueError, match=r"`homogeneous` is True.*fn\(2 x\) != 2 fn\(x\)"):
        register_activation(fn, homogeneous=True)
    assert spec_of(fn) is before


def _linear_moments(mean, var):
    return var + mean**2, mean


@pytest.mark.parametrize("moments, match", [
    (5, "callable"),
    ("relu", "callable"),
    (lambda mean, var: 1.0, "a pair"),
    (lambda mean, var: (1.0, 0.0, 0.0), "a pair"),
    (lambda mean, var: (var, "a"), "broadcastable"),
    (lambda mean, var: (np.ones(2), mean), r"broadcastable to its inputs' shape \(\)"),
    # Right on scalars, a (2, 3) array for inputs of shape (3,).
    (lambda mean, var: (var + mean**2 + np.zeros((2, 1) if np.ndim(mean) else ()), mean),
     r"shape \(3,\); moments\(\[0\.0, 0\.5, -1\.0\]"),
    (lambda mean, var: (var * np.nan, mean), "finite"),
    (lambda mean, var: (var, mean + np.inf), "finite"),
    (lambda mean, var: (mean, var + mean**2), r"E\[phi\^2\] >= E\[phi\]\^2"),  # swapped
    (lambda mean, var: (-var, mean), r"E\[phi\^2\] >= E\[phi\]\^2"),
    (lambda mean: mean, "raised TypeError"),
])
def test_bad_moments_are_rejected(moments, match):
    def identity(x):
        return x

    with pytest.raises(ValueError, match=match) as error:
        register_activation(identity, moments=moments)
    assert "moments=" in str(error.value)
    assert spec_of(identity) is None


def test_good_moments_are_accepted_and_used():
    def identity(x):
        return x

    register_activation(identity, moments=_linear_moments)
    second, first = _moments.moments(spec_of(identity), 0.5, 2.0)
    assert (float(second), float(first)) == (2.25, 0.5)
    # Python floats for scalars, and E[phi^2] = E[phi]^2 (a constant) within rounding.
    register_activation(lambda x: 0 * x + 1, moments=lambda mean, var: (1.0, 1.0))
    register_activation(lambda x: 0 * x + 0.1,
                        moments=lambda mean, var: (0.1 * 0.1 + 0 * mean, 0.1 + 0 * var))


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="fn=3"):
        register_activation(3)

    class Unhashable:
        __hash__ = None

        def __call__(self, x):
            return x

    with pytest.raises(ValueError, match="hashable"):
        register_activation(Unhashable())
    with pytest.raises(ValueError, match="homogeneous="):
        register_activation(keras.activations.relu, homogeneous="yes")
    with pytest.raises(ValueError, match="name="):
        register_activation(keras.activations.relu, name=3)
