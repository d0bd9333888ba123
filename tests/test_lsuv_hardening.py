"""Regression tests for the LSUV / data-dependent init hardening (issue 8).

Every claim is checked against an independent measurement: a forward pass of
the initialized model recorded by the test's own hook, with float64 NumPy
moments. Models are tiny and seeds fixed.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers as L  # noqa: E402

from keras_goodinit import WeightNormalization, lsuv_init, weightnorm_data_init  # noqa: E402
from keras_goodinit.lsuv import check_init_kwargs  # noqa: E402

# As in test_lsuv.py: the package's float32 moments of the rescaled signal and
# an independent float64 re-run agree to float32 round-off over a few layers.
MATCH = 2e-5


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(1234)


def normal(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype("float32")


def values(model):
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.variables]


def assert_unchanged(model, before):
    for variable, old, new in zip(model.variables, before, values(model)):
        assert np.array_equal(old, new, equal_nan=True), variable.path


def outputs_of(model, x, names):
    """{name: float64 output of that layer} by a feature model over the same graph."""
    features = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    got = features(x, training=False)
    got = got if isinstance(got, (list, tuple)) else [got]
    return {n: keras.ops.convert_to_numpy(y).astype("float64") for n, y in zip(names, got)}


# ----------------------------------------------------------------------------
# 1. check_init_kwargs


def test_check_init_kwargs_uses_the_init_functions_own_checks():
    check_init_kwargs("lsuv", {"tol": np.float32(0.05), "max_iter": np.int64(3), "seed": 0,
                               "layers": ["d0"], "measure": "post_activation"})
    check_init_kwargs("weightnorm_data_init", {"layers": None, "verbose": 0})
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, name="d0")])
    x = normal((8, 4))
    for method, kwargs in [("lsuv", {"tol": 0}), ("lsuv", {"seed": -1}),
                           ("lsuv", {"pre_init": "he"}), ("lsuv", {"layers": 5}),
                           ("weightnorm_data_init", {"verbose": 7})]:
        (name,) = kwargs
        with pytest.raises(ValueError, match=f"`{name}`") as early:
            check_init_kwargs(method, kwargs)
        function = lsuv_init if method == "lsuv" else weightnorm_data_init
        with pytest.raises(ValueError) as late:
            function(model, x, **kwargs)
        assert str(early.value) == str(late.value)  # one check, one message
    with pytest.raises(ValueError, match="Unknown keyword arguments.*tol"):
        check_init_kwargs("weightnorm_data_init", {"tol": 0.1})
    with pytest.raises(ValueError, match="`method`"):
        check_init_kwargs("anyinit", {})


# ----------------------------------------------------------------------------
# 3. tol is relative to target_var


def test_tol_is_relative_to_target_var():
    model = keras.Sequential([keras.Input((16,)), L.Dense(32, name="d0")])
    x = normal((256, 16))
    report = lsuv_init(model, x, target_var=0.01, verbose=0)
    row = report["d0"]
    var = float(np.var(outputs_of(model, x, ["d0"])["d0"]))
    # An absolute tol=0.1 accepted the glorot variance (~0.35 here) in 0 steps.
    assert row.iterations >= 1 and row.status == "ok"
    assert abs(var - 0.01) < 0.1 * 0.01, var
    assert var == pytest.approx(row.var_after, rel=MATCH)


# ----------------------------------------------------------------------------
# 4. post_activation: separate activation layers, and a step that kills a ReLU


@pytest.mark.parametrize("activation", [L.ReLU, lambda name: L.Activation("relu", name=name)])
def test_post_activation_applies_a_separate_activation_layer(activation):
    model = keras.Sequential([keras.Input((16,)), L.Dense(32, name="d0"), activation(name="act"),
                              L.Dense(4, name="out")])
    x = normal((256, 16), 1)
    report = lsuv_init(model, x, measure="post_activation", verbose=0)
    post = outputs_of(model, x, ["act"])["act"]
    assert report["d0"].status == "ok"
    assert abs(np.var(post) - 1.0) < 0.1
    assert np.var(post) == pytest.approx(report["d0"].var_after, rel=MATCH)
    # The pre-activation variance is about 1 / 0.34 (a ReLU keeps ~1/3 of a centred
    # Gaussian's variance): far from 1, so the activation really was applied.
    assert np.var(outputs_of(model, x, ["d0"])["d0"]) > 2.0


@pytest.mark.parametrize("separate", [False, True])
def test_a_step_that_kills_a_biased_relu_stops_at_the_last_live_scale(separate):
    # One sample at 1000, seven at 0, bias -5: relu output var ~ 1.1e5; the steps shrink
    # c (by at most MAX_STEP each) until c * 1000 < 5, where every sample is dead.
    dense = L.Dense(1, activation=None if separate else "relu", name="d0",
                    kernel_initializer="ones", bias_initializer=keras.initializers.Constant(-5.0))
    parts = [dense, L.ReLU(name="act")] if separate else [dense]
    model = keras.Sequential([keras.Input((1,)), *parts, L.Dense(1, name="out")])
    x = np.array([[1000.0]] + [[0.0]] * 7, "float32")
    report = lsuv_init(model, x, pre_init=None, measure="post_activation", verbose=0)
    row = report["d0"]
    assert row.status == "max_iter" and "dead" in row.reason, row
    # The kept scale is the last one with a live output: 1000 c > 5.
    kernel = keras.ops.convert_to_numpy(dense.kernel).item()
    assert kernel == pytest.approx(row.scale, rel=1e-6) and 1000 * kernel > 5.0
    post = np.maximum(kernel * x[:, 0].astype("float64") - 5.0, 0.0)
    assert np.var(post) > 0 and np.var(post) == pytest.approx(row.var_after, rel=MATCH)


# ----------------------------------------------------------------------------
# 5. var_after is measured; drift is flagged


class _ScaleFree(L.Dense):
    """A Dense that normalizes its kernel: scaling the kernel does not scale the output."""

    def call(self, inputs):
        kernel = self.kernel / keras.ops.sqrt(keras.ops.sum(keras.ops.square(self.kernel)))
        return self.activation(keras.ops.matmul(inputs, kernel) + self.bias)


def test_var_after_is_measured_and_a_drifting_estimate_is_flagged():
    model = keras.Sequential([keras.Input((16,)), L.Dense(32, name="d0"),
                              _ScaleFree(32, name="free"), L.Dense(8, name="out")])
    x = normal((128, 16), 2, scale=3.0)
    report = lsuv_init(model, x, pre_init=None, verbose=0)
    measured = {n: float(np.var(y)) for n, y in outputs_of(model, x, ["d0", "free", "out"]).items()}
    for name in measured:
        assert measured[name] == pytest.approx(report[name].var_after, rel=MATCH), name
    # The in-flight estimate said 1 for "free"; the layer ignores its kernel's scale.
    row = report["free"]
    assert row.status == "drift" and "in-flight estimate" in row.reason, row
    assert abs(measured["free"] - 1.0) > 0.1
    assert not report.ok
    # Layers the drift did not reach are measured and ok.
    assert report["d0"].status == "ok" and abs(measured["d0"] - 1.0) < 0.1


def test_weightnorm_data_init_var_after_is_measured():
    model = keras.Sequential([keras.Input((16,)),
                              WeightNormalization(L.Dense(32, activation="relu"), name="wn0"),
                              WeightNormalization(L.Dense(8), name="wn1"),
                              L.Dense(2, name="plain")])
    x = normal((128, 16), 3, scale=2.0)
    report = weightnorm_data_init(model, x, verbose=0)
    features = keras.Model(model.inputs, [model.get_layer(n).output for n in ("wn1", "plain")])
    wn1, plain = (keras.ops.convert_to_numpy(y).astype("float64") for y in features(x))
    assert report["wn1"].status == "ok"
    np.testing.assert_allclose(wn1.std(axis=0), 1.0, rtol=1e-4)  # float32 round-off
    assert float(np.var(wn1)) == pytest.approx(report["wn1"].var_after, rel=MATCH)
    # A skipped layer's var_after is measured too (its input changed upstream).
    assert report["plain"].status == "skipped"
    assert float(np.var(plain)) == pytest.approx(report["plain"].var_after, rel=MATCH)
