"""Tests of `lsuv_init`, `weightnorm_data_init` and `LSUVCallback` on real Keras models.

Every unit-variance claim is checked by an independent forward pass: the test
records each kernel layer's pre-activation output itself (its own hook on the
layer's `activation`, or a feature-extraction model over separate activation
layers) on the initialized model, and computes the variance of the whole
tensor in float64 with NumPy. Nothing the package computed is trusted.
"""

import contextlib
import dataclasses
import json
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers as L  # noqa: E402

from keras_goodinit import (  # noqa: E402
    InitReport,
    LayerRecord,
    LSUVCallback,
    WeightNormalization,
    _sweep,
    lsuv,
    lsuv_init,
    weightnorm_data_init,
)

# LSUV's default tolerance: it stops once |var - 1| < TOL on the batch it measures.
TOL = 0.1
# The package measures in float32 with tf.nn.moments and then rescales the
# signal in flight; the check reruns the model with rescaled kernels and takes
# float64 NumPy moments. Both agree to float32 round-off accumulated over a few
# layers (observed <= 1.5e-6 relative); 2e-5 leaves room and is far below TOL.
MATCH = 2e-5

KERNEL_TYPES = (
    L.Dense, L.EinsumDense, L.Conv1D, L.Conv2D, L.Conv3D, L.Conv1DTranspose,
    L.Conv2DTranspose, L.Conv3DTranspose, L.DepthwiseConv1D, L.DepthwiseConv2D,
    L.SeparableConv1D, L.SeparableConv2D,
)


SEED = int(os.environ.get("LSUV_TEST_SEED", 1234))


@pytest.fixture(autouse=True)
def _seeded():
    """Fixed Keras/NumPy/Python seeds: kernels and orthogonal pre-inits are reproducible."""
    keras.utils.set_random_seed(SEED)


def normal(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype("float32")


def values(model):
    return [keras.ops.convert_to_numpy(v.value).copy() for v in model.weights]


def assert_unchanged(model, before):
    after = values(model)
    assert len(after) == len(before)
    for v, old, new in zip(model.weights, before, after):
        assert np.array_equal(old, new), f"{v.path} changed"


# ----------------------------------------------------------------------------
# The independent measurement.


def kernel_layers(layer):
    """(reported name, layer owning the activation) for every kernel layer, recursively."""
    if isinstance(layer, WeightNormalization):
        return [(layer.name, layer.layer)]
    if isinstance(layer, KERNEL_TYPES):
        return [(layer.name, layer)]
    found = []
    for sub in getattr(layer, "layers", None) or []:
        found.extend(kernel_layers(sub))
    return found


@contextlib.contextmanager
def recording(model):
    """Yields {name: [pre-activation outputs, one per call]} filled by forward passes."""
    seen, saved = {}, []
    for name, layer in kernel_layers(model):
        activation = layer.activation

        def record(y, name=name, activation=activation):
            seen.setdefault(name, []).append(keras.ops.convert_to_numpy(y).astype("float64"))
            return activation(y)

        saved.append((layer, activation))
        layer.activation = record
    try:
        yield seen
    finally:
        for layer, activation in saved:
            layer.activation = activation


def pre_activations(model, x):
    """{name: first call's pre-activation output} from one inference-mode pass."""
    with recording(model) as seen:
        model(x, training=False)
    return {name: outputs[0] for name, outputs in seen.items()}


def assert_unit_variance(model, x, report, tol=TOL):
    """Every row at its target: 1, or a residual branch end's s / N (tol is relative)."""
    measured = {name: float(np.var(y)) for name, y in pre_activations(model, x).items()}
    # Rows are named by path ("inner/inner1"); `pre_activations` by layer name.
    measured = {row.name: measured[row.name.rsplit("/", 1)[-1]] for row in report.rows
                if row.name.rsplit("/", 1)[-1] in measured} | {
        name: value for name, value in measured.items()
        if name not in {r.name.rsplit("/", 1)[-1] for r in report.rows}}
    assert [row.name for row in report.rows] and set(measured) == {r.name for r in report.rows}
    for row in report.rows:
        assert row.status == "ok", row
        assert row.target_var == 1.0 or "residual branch end" in row.reason, row
        assert abs(measured[row.name] - row.target_var) < tol * row.target_var, (
            row.name, measured[row.name], row.target_var)
        # The report describes the model as it now is, not an estimate of it.
        assert measured[row.name] == pytest.approx(row.var_after, rel=MATCH), row.name
    return measured


# ----------------------------------------------------------------------------
# Models.


def two_input_model():
    """Two inputs, Concatenate, a nested Sequential used as a layer, a residual Add."""
    a = keras.Input((12,), name="a")
    b = keras.Input((8,), name="b")
    inner = keras.Sequential([keras.Input((16,)), L.Dense(16, activation="relu", name="inner1"),
                              L.Dense(16, name="inner2")], name="inner")
    h = L.Concatenate()([L.Dense(16, activation="relu", name="a1")(a),
                         L.Dense(16, activation="tanh", name="b1")(b)])
    h = L.Dense(16, name="mix")(h)
    h = L.Add()([h, inner(h)])
    out = L.Dense(3, name="out")(L.ReLU()(h))
    return keras.Model({"a": a, "b": b}, out)


class Shuffled(keras.Model):
    """Creates first, second, third; calls third, first, second."""

    def __init__(self):
        super().__init__()
        self.first = L.Dense(16, activation="relu", name="first")
        self.second = L.Dense(16, activation="relu", name="second")
        self.third = L.Dense(16, activation="relu", name="third")
        self.head = L.Dense(2, name="head")

    def call(self, x):
        return self.head(self.second(self.first(self.third(x))))


def channels_first_conv_runs() -> bool:
    """Whether this TensorFlow build has a channels_first Conv2D kernel on this device.

    Some CPU builds (without oneDNN) implement only NHWC; that is a property of
    the build, not of the package, so only the op itself is probed.
    """
    try:
        L.Conv2D(2, 3, data_format="channels_first")(np.ones((1, 2, 4, 4), "float32"))
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        return False
    return True


def image_zoo(channels_first=False):
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    x = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="relu",
                          name="depthwise")(x)
    x = L.SeparableConv2D(8, 3, padding="same", activation="relu", name="separable")(x)
    x = L.Conv2DTranspose(6, 3, strides=2, padding="same", activation="relu",
                          name="transpose")(x)
    if channels_first:
        x = L.Permute((3, 1, 2))(x)
        x = L.Conv2D(5, 3, padding="same", data_format="channels_first", activation="relu",
                     name="conv_cf")(x)
        x = L.Permute((2, 3, 1))(x)
    x = WeightNormalization(L.Conv2D(6, 3, padding="same", activation="relu"), name="wn_conv")(x)
    x = WeightNormalization(L.DepthwiseConv2D(3, padding="same", activation="relu"),
                            name="wn_depthwise")(x)
    x = WeightNormalization(L.Conv2DTranspose(4, 3, padding="same"), name="wn_transpose")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = WeightNormalization(L.Dense(6, activation="relu"), name="wn_dense")(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x))


def sequence_zoo():
    inputs = keras.Input((10, 4))
    x = L.Conv1D(8, 3, padding="same", activation="relu", name="conv1d")(inputs)
    x = L.EinsumDense("abc,cd->abd", output_shape=(None, 12), bias_axes="d",
                      activation="relu", name="einsum_d")(x)
    x = WeightNormalization(L.Conv1D(6, 3, padding="same", activation="relu"),
                            name="wn_conv1d")(x)
    # A bias over two output axes: statistics per (d, e) cell.
    x = L.EinsumDense("abc,cde->abde", output_shape=(None, 3, 4), bias_axes="de",
                      name="einsum_de")(x)
    return keras.Model(inputs, x)


def conv_block(channels, name):
    """A residual block built as its own keras.Model, then called as a layer."""
    inputs = keras.Input((8, 8, channels))
    y = L.Conv2D(channels, 3, padding="same", use_bias=False, name=f"{name}_c1")(inputs)
    y = L.ReLU()(L.BatchNormalization()(y))
    y = L.Conv2D(channels, 3, padding="same", use_bias=False, name=f"{name}_c2")(y)
    y = L.BatchNormalization()(y)
    return keras.Model(inputs, L.ReLU()(L.Add()([inputs, y])), name=name)


def small_resnet():
    inputs = keras.Input((8, 8, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", name="stem")(inputs)))
    x = conv_block(8, "block1")(x)
    x = conv_block(8, "block2")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(4, name="logits")(x))


def mlp(width=32, depth=2, inputs=16, outputs=4):
    layers = [keras.Input((inputs,))]
    layers += [L.Dense(width, activation="relu", name=f"d{i}") for i in range(depth)]
    return keras.Sequential(layers + [L.Dense(outputs, name="out")])


# ----------------------------------------------------------------------------
# Unit variance, in execution order, through every kind of model and layer.


def test_sequential_unit_variance_checked_by_a_feature_model():
    model = keras.Sequential([keras.Input((20,)), L.Dense(32, name="d0"), L.Activation("relu"),
                              L.Dense(32, name="d1"), L.Activation("tanh"),
                              L.Dense(16, name="d2"), L.Activation("relu"),
                              L.Dense(5, name="d3")])
    x = normal((128, 20), scale=3.0)
    report = lsuv_init(model, x, verbose=0)
    assert [r.name for r in report.rows] == ["d0", "d1", "d2", "d3"]
    # A second, separately built functional model exposes every Dense output.
    names = ["d0", "d1", "d2", "d3"]
    features = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    outputs = features([x], training=False)
    for name, y, row in zip(names, outputs, report.rows):
        var = float(np.var(keras.ops.convert_to_numpy(y).astype("float64")))
        assert row.name == name and row.status == "ok" and abs(var - 1.0) < TOL
        assert var == pytest.approx(row.var_after, rel=MATCH)
    assert_unit_variance(model, x, report)


def test_functional_two_inputs_residual_concat_nested_model():
    model = two_input_model()
    data = {"a": normal((96, 12), 1), "b": normal((96, 8), 2, scale=5.0)}
    report = lsuv_init(model, data, verbose=0)
    names = [r.name for r in report.rows]
    # Both input branches before the mix, the nested model's layers between mix and out.
    assert sorted(names[:2]) == ["a1", "b1"]
    assert names[2:] == ["mix", "inner/inner1", "inner/inner2", "out"]  # rows named by path
    assert_unit_variance(model, data, report)


def test_subclassed_model_follows_execution_order_not_registration_order():
    model = Shuffled()
    x = normal((64, 16), scale=0.2)
    model(x)
    assert [layer.name for layer in model.layers] == ["first", "second", "third", "head"]
    report = lsuv_init(model, x, verbose=0)
    assert [r.name for r in report.rows] == ["third", "first", "second", "head"]
    assert_unit_variance(model, x, report)


@pytest.mark.parametrize("build, shape", [(image_zoo, (32, 8, 8, 3)),
                                          (sequence_zoo, (32, 10, 4))])
def test_every_kernel_layer_type(build, shape):
    model = build()
    x = normal(shape, 3)
    report = lsuv_init(model, x, verbose=0)
    assert len(report.rows) == len(kernel_layers(model))
    assert_unit_variance(model, x, report)


def test_channels_first_conv2d_where_the_build_runs_it():
    if not channels_first_conv_runs():
        pytest.skip("this TensorFlow build has no channels_first Conv2D kernel on this device")
    model = image_zoo(channels_first=True)
    x = normal((32, 8, 8, 3), 3)
    report = lsuv_init(model, x, verbose=0)
    assert "conv_cf" in [r.name for r in report.rows]
    assert_unit_variance(model, x, report)


def test_channels_first_statistics_on_layers_every_build_runs():
    # Depthwise and separable 1D convs run channels_first on every CPU build
    # (Keras transposes around the NWC op), so channel axis 1 is exercised here.
    inputs = keras.Input((10, 4))
    x = L.Permute((2, 1))(inputs)
    x = L.DepthwiseConv1D(3, padding="same", depth_multiplier=2, data_format="channels_first",
                          activation="relu", name="depthwise_cf")(x)
    x = L.SeparableConv1D(6, 3, padding="same", data_format="channels_first",
                          name="separable_cf")(x)
    model = keras.Model(inputs, L.Permute((2, 1))(x))
    x = normal((32, 10, 4), 3, scale=2.0)
    report = lsuv_init(model, x, verbose=0)
    assert [r.name for r in report.rows] == ["depthwise_cf", "separable_cf"]
    assert_unit_variance(model, x, report)


def test_channels_first_cells_are_per_channel_on_axis_1():
    # Tensor-level: no convolution runs, so no build can make this skip.
    layer = L.Conv2D(3, 1, data_format="channels_first")
    layer.build((None, 2, 4, 5))
    layer.bias.assign(np.array([1.0, -2.0, 3.0], "float32"))
    target = _sweep.Target(layer, layer)
    assert target.channel_axis == 1 and target.cell_axes(4) == (0, 2, 3)
    y = np.random.default_rng(0).normal(size=(6, 3, 4, 5)) * np.array([1, 2, 3])[:, None, None]
    mean, var = _sweep.cell_moments(y.astype("float32"), target.cell_axes(4))
    assert mean.shape == (1, 3, 1, 1)
    np.testing.assert_allclose(var.ravel(), y.var(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_array_equal(target.bias_cells(mean.shape).ravel(), [1.0, -2.0, 3.0])


def test_lsuv_scales_g_of_weight_normalized_layers_and_leaves_v_alone():
    model = image_zoo()
    x = normal((32, 8, 8, 3), 4)
    wrappers = [layer for layer in model.layers if isinstance(layer, WeightNormalization)]
    v_before = {w.name: np.array(w.v.numpy()) for w in wrappers}
    g_before = {w.name: np.array(w.g.numpy()) for w in wrappers}
    report = lsuv_init(model, x, pre_init=None, verbose=0)
    assert_unit_variance(model, x, report)
    for w in wrappers:
        row = report[w.name]
        assert row.class_name.startswith("WeightNormalization(")
        assert np.array_equal(w.v.numpy(), v_before[w.name]), w.name
        np.testing.assert_allclose(w.g.numpy(), g_before[w.name] * row.scale, rtol=1e-6)
    assert any(abs(report[w.name].scale - 1.0) > 0.05 for w in wrappers)  # g really moved


def test_measure_pre_activation_is_before_fused_relu_and_post_activation_after():
    x = normal((256, 16), 5)
    pre_model = mlp(depth=1)
    post_model = keras.models.clone_model(pre_model)
    post_model.set_weights(pre_model.get_weights())
    lsuv_init(pre_model, x, pre_init=None, verbose=0)
    lsuv_init(post_model, x, pre_init=None, measure="post_activation", verbose=0)
    pre = pre_activations(pre_model, x)["d0"]
    assert abs(np.var(pre) - 1.0) < TOL
    # ReLU of a zero-mean unit-variance signal has variance about 0.34, far from 1.
    assert np.var(np.maximum(pre, 0.0)) < 0.5
    post = np.maximum(pre_activations(post_model, x)["d0"], 0.0)
    assert abs(np.var(post) - 1.0) < TOL
    assert np.var(pre_activations(post_model, x)["d0"]) > 2.0


# ----------------------------------------------------------------------------
# Arguments: layers, data.


def test_layers_filter_by_object_and_name():
    x = normal((64, 16), 6)
    for chosen in (lambda m: [m.get_layer("d1")], lambda m: ["d1"]):
        model = mlp(depth=2)
        before = {layer.name: layer.get_weights() for layer in model.layers}
        report = lsuv_init(model, x, layers=chosen(model), verbose=0)
        assert [r.name for r in report.rows] == ["d1"]
        for layer in model.layers:
            same = all(np.array_equal(a, b)
                       for a, b in zip(before[layer.name], layer.get_weights()))
            assert same == (layer.name != "d1"), layer.name
        assert abs(np.var(pre_activations(model, x)["d1"]) - 1.0) < TOL
    model = mlp()
    before = values(model)
    with pytest.raises(ValueError, match="`layers`"):
        lsuv_init(model, x, layers=["nope"], verbose=0)
    assert_unchanged(model, before)


class _Batches(keras.utils.PyDataset):
    """Batch i is `xs[i]` with zero targets; records which indices were read."""

    def __init__(self, xs):
        super().__init__()
        self.xs, self.read = xs, []

    def __len__(self):
        return len(self.xs)

    def __getitem__(self, index):
        self.read.append(index)
        return self.xs[index], np.zeros((len(self.xs[index]), 1), "float32")


def test_every_data_form_uses_the_first_batch():
    x = normal((64, 16), 7)
    y = np.zeros((64, 1), "float32")
    other = normal((64, 16), 8, scale=10.0)  # later batches: would give other scales
    model = mlp()
    start = model.get_weights()

    def run(data):
        model.set_weights(start)
        lsuv_init(model, data, pre_init=None, verbose=0)
        return model.get_weights()

    expected = run(x)
    assert not all(np.array_equal(a, b) for a, b in zip(start, expected))
    dataset = tf.data.Dataset.from_tensor_slices((np.concatenate([x, other]),
                                                  np.zeros((128, 1), "float32"))).batch(64)
    forms = {"tensor": tf.constant(x), "xy": (x, y), "xyw": (x, y, np.ones(64, "float32")),
             "dataset": dataset, "pydataset": _Batches([x, other])}
    for form, data in forms.items():
        for a, b in zip(expected, run(data)):
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=form)

    # A dict of inputs for a multi-input model, bare, in a tuple and in a dataset.
    model = two_input_model()
    start = model.get_weights()
    inputs = {"a": normal((64, 12), 9), "b": normal((64, 8), 10)}
    expected = run(inputs)
    assert not all(np.array_equal(a, b) for a, b in zip(start, expected))
    dataset = tf.data.Dataset.from_tensor_slices((inputs, y)).batch(32)
    for form, data in {"xy": (inputs, y), "dataset": dataset}.items():
        first = ({k: v[:32] for k, v in inputs.items()} if form == "dataset" else inputs)
        expected = run(first)
        for a, b in zip(expected, run(data)):
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=f"dict {form}")


def test_new_batch_per_trial_draws_successive_batches():
    xs = [normal((256, 16), 20 + i) for i in range(8)]
    data = _Batches(xs)
    model = mlp(width=64, depth=3, outputs=16)
    report = lsuv_init(model, data, new_batch_per_trial=True, verbose=0)
    assert 1 < report.batches <= 10
    # Batch 0 is also read once up front to build and check; the trials read 0, 1, ...
    assert data.read[-report.batches:] == list(range(report.batches))
    assert report.ok  # so on the last batch drawn every layer was within TOL of 1
    # On other batches the variances differ from the last one's by the sampling error of
    # a 256-example variance, measured here as the spread `sd` over 16 fresh batches: the
    # mean over them (the population variance, nearly) is within TOL + 4 sd of 1, and any
    # single fresh batch within TOL + 8 sd (4 sd for each of the two batches).
    fresh = [pre_activations(model, normal((256, 16), 100 + i)) for i in range(16)]
    for name in fresh[0]:
        var = np.array([np.var(f[name]) for f in fresh])
        sd = var.std()
        assert sd < 0.08, name  # (<= 0.045 over 30 seeds) so the looser tolerance stays tight
        assert abs(var.mean() - 1.0) < TOL + 4 * sd, (name, var.mean(), sd)
        assert np.all(np.abs(var - 1.0) < TOL + 8 * sd), (name, var, sd)


# ----------------------------------------------------------------------------
# Inference mode, deep signal, weight-norm data init.


def test_inference_mode_batch_norm_stats_unchanged_and_dropout_off():
    model = keras.Sequential([keras.Input((16,)), L.Dense(32, name="d0"),
                              L.BatchNormalization(name="bn"), L.ReLU(), L.Dropout(0.5),
                              L.Dense(32, activation="relu", name="d1"), L.Dropout(0.5),
                              L.Dense(4, name="out")])
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.full(32, 0.3, "float32"))
    bn.moving_variance.assign(np.full(32, 2.0, "float32"))
    x = normal((64, 16), 11, scale=4.0)
    start = model.get_weights()
    stats = [bn.moving_mean.numpy(), bn.moving_variance.numpy()]
    results = []
    for _ in range(2):
        model.set_weights(start)
        report = lsuv_init(model, x, pre_init=None, verbose=0)
        assert np.array_equal(bn.moving_mean.numpy(), stats[0])
        assert np.array_equal(bn.moving_variance.numpy(), stats[1])
        results.append(model.get_weights())
    for a, b in zip(*results):
        assert np.array_equal(a, b)  # with dropout on, the two scales would differ
    assert_unit_variance(model, x, report)


def test_deep_relu_mlp_gets_order_one_signal():
    model = keras.Sequential(
        [keras.Input((64,))] + [L.Dense(64, activation="relu") for _ in range(100)]
        + [L.Dense(10)])
    x = normal((256, 64), 12)
    # glorot_uniform halves the ReLU signal's second moment per layer: 2**-100.
    std_before = float(np.std(model(x, training=False)))
    assert std_before < 1e-10
    report = lsuv_init(model, x, verbose=0)
    assert len(report.rows) == 101 and report.ok
    # The last layer is linear and itself a target, so its variance is within TOL of 1.
    std_after = float(np.std(model(x, training=False)))
    assert math.sqrt(1 - TOL) < std_after < math.sqrt(1 + TOL)


def test_small_resnet_with_batch_norm_and_nested_blocks():
    model = small_resnet()
    x = normal((32, 8, 8, 3), 13)
    report = lsuv_init(model, x, verbose=0)
    assert [r.name.rsplit("/", 1)[-1] for r in report.rows] == [
        "stem", "block1_c1", "block1_c2", "block2_c1", "block2_c2", "logits"]
    assert_unit_variance(model, x, report)


def wn_model():
    inputs = keras.Input((8, 8, 3))
    x = WeightNormalization(L.Conv2D(6, 3, activation="relu"), name="wn_conv")(inputs)
    x = L.Flatten()(x)
    x = WeightNormalization(L.Dense(12, activation="relu"), name="wn_dense")(x)
    x = L.Dense(5, activation="relu", name="plain")(x)
    x = WeightNormalization(L.Dense(3), name="wn_out")(x)
    return keras.Model(inputs, x)


def test_weightnorm_data_init_normalizes_every_unit():
    x = normal((64, 8, 8, 3), 14, scale=2.0)
    model = wn_model()
    start = model.get_weights()
    report = weightnorm_data_init(model, x, verbose=0)
    assert [r.name for r in report.rows] == ["wn_conv", "wn_dense", "plain", "wn_out"]
    assert report["plain"].status == "skipped" and "not weight-normalized" in report["plain"].reason
    outputs = pre_activations(model, x)
    for name in ("wn_conv", "wn_dense", "wn_out"):
        assert report[name].status == "ok"
        y = outputs[name].reshape(-1, outputs[name].shape[-1])
        np.testing.assert_array_less(np.abs(y.mean(axis=0)), 1e-4)
        np.testing.assert_allclose(y.std(axis=0), 1.0, atol=1e-3)
    result = model.get_weights()

    # The statistics are those of the normalized v: the starting g does not matter.
    model.set_weights(start)
    for name in ("wn_conv", "wn_dense", "wn_out"):
        g = model.get_layer(name).g
        g.assign(np.full(g.shape, 5.0, "float32"))
    weightnorm_data_init(model, x, verbose=0)
    for a, b in zip(result, model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Degenerate layers.


def dead_model():
    """d0's bias -100 kills every ReLU, so `dead` sees zeros and `after` a constant."""
    return keras.Sequential([keras.Input((16,)),
                             L.Dense(16, activation="relu", bias_initializer=keras.initializers
                                     .Constant(-100.0), name="d0"),
                             L.Dense(8, activation="relu", name="dead"),
                             L.Dense(4, name="after")])


@pytest.mark.parametrize("pre_init", [None, "orthogonal"])
def test_dead_layers_are_skipped_not_blown_up(pre_init):
    model = dead_model()
    x = normal((64, 16), 15)
    before = {n: model.get_layer(n).get_weights() for n in ("dead", "after")}
    report = lsuv_init(model, x, pre_init=pre_init, verbose=0)
    assert report["d0"].status == "ok"
    for name in ("dead", "after"):
        row = report[name]
        assert row.status == "skipped" and "dead" in row.reason and row.scale == 1.0, row
        weights = model.get_layer(name).get_weights()
        assert all(np.isfinite(w).all() for w in weights)
        if pre_init is None:
            assert all(np.array_equal(a, b) for a, b in zip(before[name], weights))
    assert not report.ok


def test_max_iter_is_reported():
    model = mlp(depth=1)
    # Biases of +-10 put a between-unit variance of 100 into the output that no kernel
    # scale can remove, so no scale reaches the target: one LSUV step, then it says why.
    bias = model.get_layer("d0").bias
    bias.assign(np.where(np.arange(32) % 2 == 0, 10.0, -10.0).astype("float32"))
    report = lsuv_init(model, normal((64, 16), 16), max_iter=1, verbose=0)
    row = report["d0"]
    assert row.status == "max_iter" and row.iterations == 1
    assert "no kernel scale reaches target_var" in row.reason
    assert abs(row.var_after - 1.0) >= TOL
    assert report["out"].status == "ok"


def test_shared_layer_is_measured_at_its_first_call_and_says_so():
    shared = L.Dense(16, activation="relu", name="shared")
    inputs = keras.Input((16,))
    model = keras.Model(inputs, L.Dense(3, name="head")(shared(shared(inputs))))
    x = normal((128, 16), 17, scale=3.0)
    report = lsuv_init(model, x, verbose=0)
    row = report["shared"]
    assert "called 2 times" in row.reason and "first call" in row.reason
    with recording(model) as seen:
        model(x, training=False)
    first, second = (float(np.var(y)) for y in seen["shared"])
    assert abs(first - 1.0) < TOL and first == pytest.approx(row.var_after, rel=MATCH)
    assert second != pytest.approx(first, rel=0.01)  # a different signal, not reported as 1
    assert abs(float(np.var(seen["head"][0])) - 1.0) < TOL


# ----------------------------------------------------------------------------
# Atomicity.


def _assert_atomic(model, call, error=RuntimeError):
    before = values(model)
    with pytest.raises(error):
        call()
    assert_unchanged(model, before)


@pytest.mark.parametrize("compile", ["auto", "eager"])
@pytest.mark.parametrize("pre_init", [None, "orthogonal"])
def test_failure_during_the_sweep_restores_every_weight(monkeypatch, pre_init, compile):
    model = two_input_model()
    data = {"a": normal((32, 12), 18), "b": normal((32, 8), 19)}
    # Each target's bias is read once, as the eager pass meets the target or as the
    # compiled pass is traced.
    real, calls = _sweep.Target.bias_tensor, []

    def failing(self, cell_shape):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom at the 4th target")
        return real(self, cell_shape)

    monkeypatch.setattr(_sweep.Target, "bias_tensor", failing)
    _assert_atomic(model, lambda: lsuv_init(model, data, pre_init=pre_init, verbose=0,
                                            compile=compile))
    assert len(calls) == 4
    monkeypatch.setattr(_sweep.Target, "bias_tensor", real)
    _assert_atomic(model, lambda: weightnorm_data_init(model, {"a": data["a"]}, verbose=0),
                   error=Exception)


def test_failure_while_writing_scales_restores_every_weight(monkeypatch):
    model = mlp(depth=3)
    real = lsuv._apply_scales

    def half_then_fail(scales):
        real(scales[: len(scales) // 2])
        raise RuntimeError("boom while committing")

    monkeypatch.setattr(lsuv, "_apply_scales", half_then_fail)
    _assert_atomic(model, lambda: lsuv_init(model, normal((32, 16), 21), verbose=0))


class _Bomb(L.Layer):
    armed = False

    def call(self, x):
        if self.armed:
            raise RuntimeError("boom in a layer")
        return x


def test_failure_in_a_layer_and_in_a_later_batch_restores_every_weight():
    bomb = _Bomb()
    model = keras.Sequential([keras.Input((16,)), L.Dense(16, activation="relu"), bomb,
                              L.Dense(4)])
    x = normal((32, 16), 22)
    model(x)
    bomb.armed = True
    _assert_atomic(model, lambda: lsuv_init(model, x, verbose=0))
    bomb.armed = False
    # new_batch_per_trial applies the first trial's scales before it meets a NaN batch.
    bad = x.copy()
    bad[0, 0] = np.nan
    _assert_atomic(model, lambda: lsuv_init(model, _Batches([x, bad]), verbose=0,
                                            new_batch_per_trial=True), error=ValueError)


# ----------------------------------------------------------------------------
# Report and argument checks.


def test_report_rows_dict_and_summary(capsys):
    model = mlp(depth=1)
    model.get_layer("out").kernel.assign(np.full((32, 4), np.inf, "float32"))
    report = lsuv_init(model, normal((32, 16), 23), pre_init=None, verbose=0)
    assert isinstance(report, InitReport) and report.method == "lsuv"
    fields = [f.name for f in dataclasses.fields(LayerRecord)]
    assert fields == ["name", "class_name", "var_before", "var_after", "iterations", "scale",
                      "status", "reason", "target_var"]
    assert all(isinstance(row, LayerRecord) for row in report.rows)
    row = report["out"]
    assert row.status == "skipped" and "non-finite" in row.reason and math.isnan(row.var_before)
    text = json.dumps(report.to_dict(), allow_nan=False)  # strict JSON despite the NaN
    assert json.loads(text)["rows"][1]["var_before"] == "nan"
    report.summary()
    printed = capsys.readouterr().out
    assert "var before" in printed and "d0" in printed and "out" in printed
    assert "1 ok, 1 skipped" in printed


@pytest.mark.parametrize("kwargs, argument", [
    ({"tol": 0}, "tol"), ({"tol": -0.1}, "tol"), ({"max_iter": 0}, "max_iter"),
    ({"pre_init": "foo"}, "pre_init"), ({"measure": "foo"}, "measure"),
    ({"data": np.zeros((0, 16), "float32")}, "data"),
    ({"data": np.full((4, 16), np.nan, "float32")}, "data"),
    ({"layers": []}, "layers"), ({"verbose": 7}, "verbose"),
    ({"new_batch_per_trial": "yes"}, "new_batch_per_trial"), ({"seed": 1.5}, "seed"),
])
def test_bad_arguments_raise_and_change_nothing(kwargs, argument):
    model = mlp(depth=1)
    kwargs = {"data": normal((8, 16)), "verbose": 0, **kwargs}
    before = values(model)
    with pytest.raises(ValueError, match=f"`{argument}`|{argument}="):
        lsuv_init(model, **kwargs)
    assert_unchanged(model, before)


def test_model_without_targets_raises():
    model = keras.Sequential([keras.Input((4,)), L.Activation("relu"), L.BatchNormalization()])
    before = values(model)
    with pytest.raises(ValueError, match="model="):
        lsuv_init(model, normal((8, 4)), verbose=0)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------
# Cost.


@contextlib.contextmanager
def counting_calls(layers):
    counts = {}
    for layer in layers:
        real = layer.call

        def call(*args, layer=layer, real=real, **kwargs):
            counts[layer.name] = counts.get(layer.name, 0) + 1
            return real(*args, **kwargs)

        layer.call = call
    try:
        yield counts
    finally:
        for layer in layers:
            del layer.call


@pytest.mark.parametrize("measure", ["pre_activation", "post_activation"])
def test_each_target_is_evaluated_once_per_pass_and_no_model_is_built(monkeypatch, measure):
    model = two_input_model()
    data = {"a": normal((32, 12), 24), "b": normal((32, 8), 25, scale=4.0)}
    model(data)
    targets = [layer for _, layer in kernel_layers(model)]
    built = []
    from keras.src.models.functional import Functional

    for cls in (keras.Model, Functional, keras.Sequential):
        real_init = cls.__init__

        def init(self, *args, _real=real_init, **kwargs):
            built.append(type(self).__name__)
            _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", init)
    # The counters can see what they must not see: a forward pass, a new model.
    with counting_calls(targets) as counts:
        model(data, training=False)
    assert counts == {layer.name: 1 for layer in targets}
    keras.Model(model.inputs, model.get_layer("mix").output)
    assert built
    built.clear()

    with counting_calls(targets) as counts:
        report = lsuv_init(model, data, measure=measure, verbose=0)
    # The init pass alone: with Keras' own float32 layers its in-flight statistics are the
    # model's, so no measuring pass follows (tests/test_compiled_sweep.py checks both cases).
    assert counts == {layer.name: 1 for layer in targets}
    assert built == []
    # (tanh's post-activation variance cannot reach 1 within max_iter, so not report.ok.)
    assert [r.name for r in report.rows] == [
        "a1", "b1", "mix", "inner/inner1", "inner/inner2", "out"]


# ----------------------------------------------------------------------------
# LSUVCallback.


class _Snapshot(keras.callbacks.Callback):
    """Records the weights at every on_train_begin (placed after the LSUV callback)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_begin(self, logs=None):
        self.seen.append(values(self.model))


def _compiled(model):
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=False)
    return model


def test_callback_initializes_once_and_never_over_trained_weights():
    x, y = normal((64, 16), 26, scale=3.0), normal((64, 4), 27)
    model = _compiled(mlp())
    start = values(model)
    callback, snapshot = LSUVCallback(x[:32], verbose=0), _Snapshot()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[callback, snapshot])
    first_report = callback.report
    assert first_report is not None and first_report.ok
    assert not all(np.array_equal(a, b) for a, b in zip(start, snapshot.seen[0]))
    assert_unit_variance_of_snapshot(model, snapshot.seen[0], x[:32], first_report)
    trained = values(model)

    # A second fit, with the same and with a new callback: nothing re-initialized.
    fresh = LSUVCallback(x[:32], verbose=0)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[callback, fresh, snapshot])
    assert callback.report is first_report and fresh.report is None
    assert all(np.array_equal(a, b) for a, b in zip(trained, snapshot.seen[1]))

    # A new optimizer (steps back at 0) does not make the model untrained.
    _compiled(model)
    trained = values(model)
    again = LSUVCallback(x[:32], verbose=0)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[again, snapshot])
    assert again.report is None
    assert all(np.array_equal(a, b) for a, b in zip(trained, snapshot.seen[2]))

    # force=True re-initializes.
    trained = values(model)
    forced = LSUVCallback(x[:32], force=True, verbose=0)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[forced, snapshot])
    assert forced.report is not None and forced.report.ok
    assert not all(np.array_equal(a, b) for a, b in zip(trained, snapshot.seen[3]))


def assert_unit_variance_of_snapshot(model, weights, x, report):
    current = values(model)
    for variable, value in zip(model.weights, weights):
        variable.assign(value)
    try:
        assert_unit_variance(model, x, report)
    finally:
        for variable, value in zip(model.weights, current):
            variable.assign(value)


def test_callback_skips_a_model_whose_optimizer_has_stepped():
    x, y = normal((64, 16), 28), normal((64, 4), 29)
    model = _compiled(mlp())
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # trained without this package
    trained = values(model)
    callback, snapshot = LSUVCallback(x, verbose=0), _Snapshot()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[callback, snapshot])
    assert callback.report is None
    assert all(np.array_equal(a, b) for a, b in zip(trained, snapshot.seen[0]))


def test_callback_weightnorm_data_init_and_bad_arguments():
    x = normal((32, 8, 8, 3), 30)
    model = _compiled(wn_model())
    callback = LSUVCallback(x, method="weightnorm_data_init", verbose=0)
    model.fit(x, normal((32, 3), 31), batch_size=32, epochs=1, verbose=0,
              callbacks=[callback])
    assert callback.report.method == "weightnorm_data_init"
    assert [r.status for r in callback.report.rows] == ["ok", "ok", "skipped", "ok"]
    with pytest.raises(ValueError, match="method"):
        LSUVCallback(x, method="kaiming")
    with pytest.raises(ValueError, match="tolerance"):
        LSUVCallback(x, tolerance=0.1)
    with pytest.raises(ValueError, match="tol"):
        LSUVCallback(x, method="weightnorm_data_init", tol=0.1)


def test_a_target_called_inside_an_earlier_tf_function_is_skipped_with_the_reason():
    # Issue 17: its cached program runs without the sweep's hooks (the traced pass's graph
    # reads its kernel all the same, which tells it from a layer the pass never calls).
    from test_diagnostics import _NestedFunction

    x = normal((64, 8), 44)
    model = _NestedFunction()
    model(x)
    report = lsuv_init(model, x, verbose=0)
    assert report.mode == "compiled", report.notes
    rows = {r.name: r for r in report.rows}
    assert rows["head"].status == "ok"
    assert rows["inner"].status == "skipped"
    assert "inside a tf.function traced before this pass" in rows["inner"].reason
