"""mean_field_init(criterion="critical"): every activation at its edge of chaos."""

import math

import keras
import numpy as np
import pytest
from _rounding import EPS
from keras import ops

from keras_goodinit import _backend, mean_field
from keras_goodinit.criticality import _CRITICAL_TOL, critical_point
from keras_goodinit.mean_field import _SIGMAS, mean_field_init

# sigma_w2 comes from criticality's quadrature, the layer's input second moment from
# _moments' (rules.activation_output): two quadratures of E[phi^2], which agree to about
# 1e-10 (criticality's docstring), each a positive-weighted sum of phi^2 evaluated in the
# backend's widest float (`_backend.wide()`: float32 on JAX without x64), so each off by
# at most 2 eps of it; gamma = sigma_w2 times their ratio.
_QUADRATURE = 1e-10 + 4 * EPS[_backend.wide()]


def _normal(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _numpy(value):
    return np.asarray(ops.convert_to_numpy(value), dtype="float64")


def _mlp(activation="tanh", width=256, depth=5, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((width,))]
        + [keras.layers.Dense(width, activation=activation, name=f"h{i}") for i in range(depth)]
        + [keras.layers.Dense(10, name="head")])


def _cnn(activation="tanh", channels=32, depth=4, seed=0):
    # "valid" padding: every position sees a full window, so the second moment is uniform
    # and gamma = sigma_w2 holds exactly between equal channel counts (as for Dense).
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((14, 14, 3))]
        + [keras.layers.Conv2D(channels, 3, activation=activation, name=f"c{i}")
           for i in range(depth)]
        # Flatten, not a global average: its rule keeps the second moment (an upper bound,
        # exact for identical positions), which the independent positions here break.
        + [keras.layers.Flatten(), keras.layers.Dense(10, name="head")])


def _hidden(model):
    return [layer for layer in model.layers if layer.name != "head" and hasattr(layer, "kernel")]


@pytest.mark.parametrize("q_star", [None, 0.5])
@pytest.mark.parametrize("build", [_mlp, _cnn])
def test_tanh_layers_sit_at_the_critical_point(build, q_star):
    model = build()
    x = _normal((256, *model.inputs[0].shape[1:]))
    report = mean_field_init(model, criterion="critical", q_star=q_star, seed=0, verbose=0,
                             data=x)
    point = critical_point("tanh", q_star=q_star)
    hidden = _hidden(model)
    biases = []
    for index, layer in enumerate(hidden):
        row = report[layer.name]
        assert row.rule == "critical" and row.phase == "critical", row
        # Every hidden layer's pre-activations are predicted at q*, chi_1 = 1 there.
        assert row.predicted == pytest.approx(point.q_star, rel=1e-12)
        assert row.q_star == point.q_star and row.chi_1 == pytest.approx(1.0, abs=1e-9)
        assert row.xi_c == math.inf and row.trainable_depth == math.inf
        fan_in = math.prod(layer.kernel.shape[:-1])
        norms = np.sqrt(np.sum(_numpy(layer.kernel) ** 2,
                               axis=tuple(range(len(layer.kernel.shape) - 1))))
        if index:  # equal widths: gamma = sigma_w2, unit norms sqrt(sigma_w2)
            assert row.gamma == pytest.approx(point.sigma_w2, rel=_QUADRATURE)
            # An orthogonal draw's norms, to float32 rounding of a fan-in long sum.
            np.testing.assert_allclose(norms, math.sqrt(point.sigma_w2),
                                       rtol=2 * math.sqrt(fan_in) * EPS["float32"] + _QUADRATURE)
        biases.append(_numpy(layer.bias))
        # With data, each prediction agrees with its measurement within the row's tolerance,
        # which counts the drawn bias's sampling error.
        assert row.status == "ok", row
        assert abs(row.measured / row.predicted - 1) <= row.tolerance
    # The biases: N(0, sigma_b2), pooled over the layers; a second moment of n iid Gaussian
    # draws has relative standard deviation sqrt(2 / n): _SIGMAS of them.
    pooled = np.concatenate(biases)
    assert abs(np.mean(pooled**2) / point.sigma_b2 - 1) <= _SIGMAS * math.sqrt(2 / pooled.size)
    assert abs(np.mean(pooled)) <= _SIGMAS * math.sqrt(point.sigma_b2 / pooled.size)
    assert report.ok, report.table()
    assert any(note.startswith("criterion='critical': tanh") for note in report.notes)
    assert "chi_1" in report.table() and "q*" in report.table()


def test_relu_has_no_critical_line_and_keeps_its_gain():
    model = _mlp("relu", width=64, depth=3)
    before = [_numpy(layer.bias) for layer in _hidden(model)]
    report = mean_field_init(model, criterion="critical", seed=0, verbose=0)
    for layer, bias in zip(_hidden(model), before):
        row = report[layer.name]
        assert row.rule == "homogeneous" and row.gamma == 2.0 and row.phase == "marginal"
        assert "no critical line" in row.reason and math.isnan(row.q_star)
        np.testing.assert_array_equal(_numpy(layer.bias), bias)  # kept, not drawn
    assert any("relu is positively homogeneous" in note for note in report.notes)


def test_an_activation_without_a_critical_point_at_q_star_keeps_the_unit_rule():
    model = _mlp("sigmoid", width=64, depth=2)
    report = mean_field_init(model, criterion="critical", seed=0, verbose=0)
    for layer in _hidden(model):
        row = report[layer.name]
        assert row.rule == "q=1" and row.predicted == pytest.approx(1.0, rel=1e-12)
        assert "no critical point" in row.reason and not row.phase


def test_the_default_criterion_is_todays_init():
    # The numbers of mean_field_init's docstring, as before the criterion existed.
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="tanh"),
                              keras.layers.Dense(64, activation="gelu"),
                              keras.layers.Dense(10)])
    report = mean_field_init(model, seed=0, verbose=0)
    assert [round(row.predicted, 3) for row in report.rows] == [1.0, 1.0, 1.0]
    assert all(not row.phase and math.isnan(row.chi_1) for row in report.rows)
    relu = keras.Sequential([keras.Input((32,)), keras.layers.Dense(32),
                             keras.layers.ReLU(), keras.layers.Dense(8)])
    assert [row.gamma for row in mean_field_init(relu, head="paper", verbose=0).rows] == [2.0,
                                                                                         1.0]
    # criterion="unit" is the default: the same weights from the same seed, biases kept.
    first, second = _mlp(width=32, depth=3), _mlp(width=32, depth=3)
    biases = [_numpy(layer.bias) for layer in _hidden(first)]
    a = mean_field_init(first, seed=3, verbose=0)
    b = mean_field_init(second, criterion="unit", seed=3, verbose=0)
    for v, w in zip(first.weights, second.weights):
        np.testing.assert_array_equal(_numpy(v), _numpy(w))
    for layer, bias in zip(_hidden(first), biases):
        np.testing.assert_array_equal(_numpy(layer.bias), bias)
    assert [r.gamma for r in a.rows] == [r.gamma for r in b.rows]
    assert "chi_1" not in a.table()


def test_bad_criterion_and_q_star_name_the_argument():
    model = _mlp(width=8, depth=1)
    with pytest.raises(ValueError, match="criterion.*Received: criterion='edge'"):
        mean_field_init(model, criterion="edge", verbose=0)
    with pytest.raises(ValueError, match="q_star.*Received: q_star=-1"):
        mean_field_init(model, criterion="critical", q_star=-1.0, verbose=0)
    with pytest.raises(ValueError, match="q_star.*criterion='critical'.*Received: q_star=0.5"):
        mean_field_init(model, q_star=0.5, verbose=0)


def test_a_failure_leaves_the_drawn_biases_as_they_were(monkeypatch):
    model = _mlp(width=16, depth=4)
    before = [_numpy(v).copy() for v in model.weights]
    calls = []
    real = mean_field._write_bias

    def failing(target, decision, seed):
        calls.append(target)
        if len(calls) == 3:  # two layers' biases already drawn
            raise RuntimeError("disk full")
        real(target, decision, seed)

    monkeypatch.setattr(mean_field, "_write_bias", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        mean_field_init(model, criterion="critical", q_star=0.5, seed=0, verbose=0)
    for variable, old in zip(model.weights, before):
        np.testing.assert_array_equal(_numpy(variable), old)


def test_a_layer_not_set_at_the_critical_point_claims_no_phase():
    # A tanh Dense after a layer with no rule: its input's moments are unknown, the row is
    # "unanalysed", and it must not carry the critical point's chi_1 = 1 as if it had one.
    class Opaque(keras.layers.Layer):
        def call(self, x):
            return keras.ops.sort(x, axis=-1)

    inputs = keras.Input((16,))
    x = keras.layers.Dense(16, activation="tanh", name="first")(inputs)
    x = Opaque()(x)
    x = keras.layers.Dense(16, activation="tanh", name="after")(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    rows = {row.name: row for row in
            mean_field_init(model, criterion="critical", seed=0, verbose=0).rows}
    assert rows["first"].phase == "critical"
    assert rows["after"].status == "unanalysed"
    assert rows["after"].phase == "" and math.isnan(rows["after"].chi_1)


def test_a_layer_without_bias_holds_q_star_and_reports_its_own_phase():
    # Without a bias the kernel alone holds q*: sigma_w2 grows by q* / (q* - sigma_b2), so
    # chi_1 = 1 + sigma_b2 / (q* - sigma_b2), just over 1 (chaotic, c* = 0) with a long but
    # finite correlation depth; the row must say that, not the biased layer's "critical".
    q_star = 0.01
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((256,))]
        + [keras.layers.Dense(256, activation="tanh", use_bias=False, name=f"h{i}")
           for i in range(5)]
        + [keras.layers.Dense(10, name="head")])
    x = _normal((256, 256)) * math.sqrt(q_star)
    report = mean_field_init(model, criterion="critical", q_star=q_star, seed=0, verbose=0,
                             data=x)
    point = critical_point("tanh", q_star=q_star)
    expected = 1 + point.sigma_b2 / (point.q_star - point.sigma_b2)
    for layer in _hidden(model)[1:]:
        row = report[layer.name]
        assert row.rule == "critical" and "no bias to draw" in row.reason, row
        assert row.predicted == pytest.approx(q_star, rel=1e-12)
        assert row.status == "ok" and abs(row.measured / row.predicted - 1) <= row.tolerance
        # Equal widths: gamma = sigma_w2 q* / (q* - sigma_b2).
        assert row.gamma == pytest.approx(point.sigma_w2 * expected, rel=_QUADRATURE)
        # chi_1 = 1 at the critical point to criticality's _CRITICAL_TOL (its bisection),
        # times the exact factor q* / (q* - sigma_b2): that tolerance plus the quadrature's.
        assert row.chi_1 == pytest.approx(expected, abs=_CRITICAL_TOL + _QUADRATURE)
        assert row.chi_1 > 1 + 1e-5  # sigma_b2 / q* = 1.26e-4 here: well above the tolerance
        assert row.phase == "chaotic"
        # Chaotic: correlations decay towards c* = 0 over xi_c layers, finite but (at
        # chi_1 - 1 ~ 1e-4) tens of thousands: far beyond these 5.
        assert 1e3 < row.xi_c < math.inf
