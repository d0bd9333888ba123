"""mean_field_init: the paper's rule on any graph, and the moments it predicts."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_goodinit import WeightNormalization, models
from keras_goodinit._moments import gamma, moments, register_activation, spec_of
from keras_goodinit.mean_field import mean_field_init, measured_moments
from keras_goodinit.weight_norm import unit_norms


def _norms(layer):
    if isinstance(layer, WeightNormalization):
        return ops.convert_to_numpy(layer.g)
    return ops.convert_to_numpy(unit_norms(layer.kernel, "default"))


def _kernel_layers(model):
    return [layer for layer in model.layers
            if isinstance(layer, (WeightNormalization, keras.layers.Dense, keras.layers.Conv2D))]


def _normal(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# --- activation moments -------------------------------------------------------------------

def test_relu_and_linear_gains_are_exactly_the_papers():
    assert gamma("relu") == 2.0
    assert gamma("linear") == 1.0
    # Homogeneous: the gain does not depend on the input scale.
    assert gamma("relu", q=7.0) == 2.0
    # leaky_relu(0.2): E[phi^2] = (1 + 0.2^2) / 2.
    assert gamma("leaky_relu") == pytest.approx(2 / 1.04, rel=1e-12)


@pytest.mark.parametrize("name", [
    "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "swish", "mish", "tanh",
    "sigmoid", "hard_sigmoid", "hard_silu", "softplus", "softsign", "linear", "celu",
    "hard_tanh", "log_sigmoid", "sparse_plus", "squareplus"])
def test_every_builtin_activation_matches_a_fine_grid_integral(name):
    fn = keras.activations.get(name)
    z = np.linspace(-14, 14, 200001)
    pdf = np.exp(-z**2 / 2) / math.sqrt(2 * math.pi)
    for mean, var in [(0.0, 1.0), (0.5, 2.0)]:
        values = ops.convert_to_numpy(fn(ops.convert_to_tensor(mean + math.sqrt(var) * z,
                                                                "float64")))
        # The trapezoid rule on a grid of step 1.4e-4 is exact to ~1e-8 even across kinks;
        # 96-node Gauss-Hermite is within 2e-3 for the kinked ones (selu, softsign...).
        expect2 = np.trapezoid(values**2 * pdf, z)
        expect1 = np.trapezoid(values * pdf, z)
        second, first = moments(spec_of(fn), mean, var)
        assert float(second) == pytest.approx(expect2, rel=3e-3)
        assert abs(float(first) - expect1) <= 3e-3 * math.sqrt(expect2)


def test_not_elementwise_and_unknown_activations_are_refused():
    with pytest.raises(ValueError, match="not elementwise"):
        gamma("softmax")

    def mystery(x):
        return x * 2

    with pytest.raises(ValueError, match="register_activation"):
        gamma(mystery)
    register_activation(mystery, homogeneous=True)
    assert gamma(mystery) == pytest.approx(0.25)


# --- same kernels as the paper's builders -------------------------------------------------

@pytest.mark.parametrize("weight_norm", [False, True])
def test_reproduces_builder_norms_for_relu_networks(weight_norm):
    for build in (lambda init: models.wn_mlp((20,), 10, depth=4, width=24, init=init,
                                             weight_norm=weight_norm, seed=1),
                  lambda init: models.wn_resnet((8, 8, 3), 10, num_blocks=2, width=8,
                                                init=init, weight_norm=weight_norm, seed=1)):
        proposed = build("orthogonal_proposed")
        baseline = build("orthogonal")
        # The builders keep the paper's head (gamma = 1 on the logits).
        report = mean_field_init(baseline, head="paper", verbose=0)
        assert report.ok
        for want, got in zip(_kernel_layers(proposed), _kernel_layers(baseline)):
            # Both are sqrt(gamma * C_in / C_out) in float32: equal to rounding.
            np.testing.assert_allclose(_norms(got), _norms(want), rtol=1e-6)
        # And keeping the builder's own kernels changes nothing but rounding.
        before = [ops.convert_to_numpy(v) for v in proposed.weights]
        mean_field_init(proposed, distribution=None, head="paper", verbose=0)
        for old, new in zip(before, proposed.weights):
            np.testing.assert_allclose(ops.convert_to_numpy(new), old, rtol=1e-5, atol=1e-7)


def test_resnet_gammas_and_stages():
    model = models.wn_resnet((8, 8, 3), 10, num_blocks=3, width=8, init="orthogonal",
                             weight_norm=False)
    rows = {r.name: r for r in mean_field_init(model, verbose=0).rows}
    assert rows["stem"].gamma == 1.0
    assert rows["stage1_block1_conv1"].gamma == 2.0
    assert rows["stage2_block1_shortcut"].gamma == 1.0
    for stage in (1, 2, 3):
        for block in (1, 2, 3):
            row = rows[f"stage{stage}_block{block}_conv2"]
            assert row.gamma == pytest.approx(1 / 3) and row.num_blocks == 3
            assert "N = 3" in row.reason
    plain = {r.name: r for r in mean_field_init(model, residual=None, verbose=0).rows}
    assert plain["stage2_block3_conv2"].gamma == 1.0


def test_stages_are_counted_through_nested_models_and_post_add_relus():
    def block(width):
        x = keras.Input((width,))
        y = keras.layers.Dense(width, activation="relu")(x)
        y = keras.layers.Dense(width)(y)
        return keras.Model(x, keras.layers.ReLU()(keras.layers.Add()([x, y])))

    inputs = keras.Input((16,))
    h = keras.layers.Dense(16)(inputs)
    for _ in range(4):
        h = block(16)(h)
    h = keras.layers.Dense(8)(h)  # shape change: a new stream
    for _ in range(2):
        h = block(8)(h)
    model = keras.Model(inputs, h)
    rows = mean_field_init(model, verbose=0).rows
    ends = [r for r in rows if r.num_blocks]
    assert [r.num_blocks for r in ends] == [4] * 4 + [2] * 2
    assert [r.gamma for r in ends] == pytest.approx([0.25] * 4 + [0.5] * 2)


# --- predicted moments hold on data -------------------------------------------------------

def _check_rows(report, lo=0.7, hi=1.4):
    for row in report.rows:
        assert row.status == "ok", row
        # Square orthogonal layers: sum_j w_j^T C w_j = tr(C) exactly, so the only gaps are
        # the batch's sampling error (B * width = 1e5 entries: ~1 %) and non-Gaussian
        # pre-activations; the 20 % bound.
        assert row.measured == pytest.approx(row.predicted, rel=0.2), row
        if "q set to 1" in row.reason:
            assert lo <= row.measured <= hi, row


_UNSTABLE = pytest.mark.xfail(strict=True, reason=(
    "q = 1 is an unstable fixed point of the q-map q -> gamma E[phi(sqrt(q) z)^2] for gelu "
    "(kappa = dlnE/dlnq = 1.14 at q = 1) and silu (1.17): any per-layer deviation (finite "
    "width, non-Gaussian pre-activations) grows by kappa per layer, ~1.14^50 = 700 over 50 "
    "layers. No data-free gamma can hold it; tanh (kappa = 0.46) is stable."))


@pytest.mark.parametrize("activation", [pytest.param("gelu", marks=_UNSTABLE),
                                        pytest.param("silu", marks=_UNSTABLE), "tanh"])
def test_50_layer_mlp_keeps_unit_pre_activations(activation):
    width = 128
    model = keras.Sequential([keras.Input((width,))] + [
        keras.layers.Dense(width, activation=activation) for _ in range(50)])
    report = mean_field_init(model, seed=0, verbose=0, data=_normal((512, width)))
    assert len(report.rows) == 50
    _check_rows(report)
    assert all(r.predicted == pytest.approx(1.0) for r in report.rows)


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh"])
def test_20_block_resnet_keeps_unit_pre_activations(activation):
    width, blocks = 128, 20
    inputs = keras.Input((width,))
    h = keras.layers.Dense(width, name="stem")(inputs)
    for b in range(blocks):
        y = keras.layers.Dense(width, activation=activation, name=f"b{b}_in")(h)
        y = keras.layers.Dense(width, name=f"b{b}_out")(y)
        h = keras.layers.Add(name=f"b{b}_add")([h, y])
    model = keras.Model(inputs, keras.layers.Dense(10, name="head")(h))
    x = _normal((512, width))
    report = mean_field_init(model, seed=0, verbose=0, data=x)
    _check_rows(report)
    branch_in = [r for r in report.rows if r.name.endswith("_in")]
    assert len(branch_in) == blocks and all("q set to 1" in r.reason for r in branch_in)
    adds = [f"b{b}_add" for b in range(blocks)]
    found = measured_moments(model, x, adds)
    for name in adds:
        assert found[name][0] == pytest.approx(report.add_outputs[name], rel=0.2)


def _resnet_check(num_blocks, size=16, batch=64):
    model = models.wn_resnet((size, size, 3), 10, num_blocks=num_blocks, weight_norm=False,
                             batch_norm=False, init="orthogonal")
    x = _normal((batch, size, size, 3), seed=1)
    report = mean_field_init(model, seed=0, verbose=0, data=x)
    adds = [layer.name for layer in model.layers if layer.name.endswith("_add")]
    found = measured_moments(model, x, adds)
    return model, report, found


def test_resnet56_stream_stays_bounded():
    _, report, found = _resnet_check(9)
    bound = (1 + 1 / 9) ** 9  # 2.58 < e
    for stage in (1, 2, 3):
        names = [f"stage{stage}_block{b}_add" for b in range(1, 10)]
        predicted = [report.add_outputs[n] for n in names]
        # Each block adds the branch's second moment P * (gain <= 1) / N to the stream's P:
        # the stage grows by at most (1 + 1/N)^N from the stream entering it.
        stream_in = predicted[0] / (1 + 1 / 9)
        assert max(predicted) <= bound * stream_in * (1 + 1e-9)
        for name in names:
            assert found[name][1] <= 3.0
            assert found[name][0] == pytest.approx(report.add_outputs[name], rel=0.2)
    for row in report.rows:
        if row.name.startswith("stage") and not row.num_blocks:
            assert 0.8 <= row.measured / row.predicted <= 1.25, row


# --- contract -----------------------------------------------------------------------------

def test_weight_norm_keeps_v_and_sets_g():
    model = keras.Sequential([keras.Input((12,)),
                              WeightNormalization(keras.layers.Dense(6, activation="relu")),
                              keras.layers.Dense(3)])
    wrapper = model.layers[0]
    v = ops.convert_to_numpy(wrapper.v)
    mean_field_init(model, distribution=None, verbose=0)
    np.testing.assert_array_equal(ops.convert_to_numpy(wrapper.v), v)
    np.testing.assert_allclose(ops.convert_to_numpy(wrapper.g), np.sqrt(2 * 12 / 6), rtol=1e-6)


def test_bad_arguments_and_models():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"Received: residual='yes'"):
        mean_field_init(model, residual="yes")
    with pytest.raises(ValueError, match="distribution"):
        mean_field_init(model, distribution="uniform")
    with pytest.raises(ValueError, match="input_variance"):
        mean_field_init(model, input_variance=0.0)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    class Host(keras.Model):  # NumPy inside `call`: no graph can be traced
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x) + float(np.sum(ops.convert_to_numpy(x)) > 0)

    sub = Sub()
    sub(np.zeros((1, 4), "float32"))
    assert [row.status for row in mean_field_init(sub, verbose=0).rows] == ["ok"]
    host = Host()
    host(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match="subclassed model whose `call` cannot be traced"):
        mean_field_init(host)
    with pytest.raises(ValueError, match="built"):
        mean_field_init(keras.Sequential([keras.layers.Dense(2)]))


def test_a_failed_call_leaves_every_weight_as_it_was():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(2)])
    before = [ops.convert_to_numpy(v) for v in model.weights]
    with pytest.raises(ValueError):  # the measuring pass fails on a batch of the wrong width
        mean_field_init(model, data=np.zeros((4, 5), "float32"), verbose=0)
    for old, new in zip(before, model.weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(new), old)


def test_merges_normalization_and_unknown_layers():
    width = 256
    inputs = keras.Input((width,))
    a = keras.layers.Dense(width, activation="sigmoid", name="a")(inputs)
    b = keras.layers.Dense(width, activation="tanh", name="b")(inputs)
    gated = keras.layers.Multiply()([a, b])
    mixed = keras.layers.Concatenate()([gated, keras.layers.Average()([a, b])])
    normed = keras.layers.LayerNormalization()(mixed)
    # A Lambda is traced into its ops: here none, so it is no step at all.
    odd = keras.layers.Lambda(lambda t: t, name="odd")(normed)
    out = keras.layers.Dense(width, activation="gelu", name="c")(odd)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(out))
    report = mean_field_init(model, seed=0, verbose=0, data=_normal((1024, width)))
    _check_rows(report)
    assert report.unanalysed == []
    assert "q set to 1" in report["c"].reason


def test_depthwise_and_separable_use_their_true_fan_in():
    inputs = keras.Input((12, 12, 8))
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same",
                                     activation="tanh", name="dw")(inputs)
    h = keras.layers.SeparableConv2D(32, 3, padding="same", activation="gelu", name="sep")(h)
    model = keras.Model(inputs, keras.layers.Conv2D(8, 1, name="head")(h))
    report = mean_field_init(model, seed=0, verbose=0, data=_normal((64, 12, 12, 8)))
    for row in report.rows:
        assert row.status == "ok"
        # Fewer units (16-32) than above: the kernel draw's own spread adds ~10 %.
        assert row.measured == pytest.approx(row.predicted, rel=0.2), row
    assert report["dw"].predicted == pytest.approx(1.0)
    assert report["sep"].predicted == pytest.approx(1.0)
