"""signal_report: numbers checked against models whose statistics are known in closed form."""

import json
import sys

import keras
import numpy as np
import pytest

from keras_goodinit import WeightNormalization, mean_field_init, signal_report


def _linear_chain(scales, width=8):
    """Dense layers with kernel = s * I and no bias: h_l = (prod s) x exactly."""
    inputs = keras.Input((width,))
    h = inputs
    for index, scale in enumerate(scales):
        h = keras.layers.Dense(width, use_bias=False, name=f"d{index}",
                               kernel_initializer=keras.initializers.Identity(scale))(h)
    return keras.Model(inputs, h)


@pytest.fixture
def batch():
    return np.random.default_rng(0).normal(size=(32, 8)).astype("float32")


def test_forward_statistics_of_scaled_identity_chain(batch):
    scales = [2.0, 0.5, 3.0]
    report = signal_report(_linear_chain(scales), batch, gradients=False)
    expected = np.cumprod(scales)
    assert [row.name for row in report.rows] == ["d0", "d1", "d2"]
    # ||s x|| / ||x|| = |s| and std(s x) = |s| std(x), exactly up to float32 rounding.
    np.testing.assert_allclose(report.column("norm_ratio"), expected, rtol=1e-5)
    np.testing.assert_allclose(report.column("std"), expected * batch.std(), rtol=1e-4)
    np.testing.assert_allclose(report.column("mean"), expected * batch.mean(), rtol=1e-4,
                               atol=1e-6)
    assert np.isnan(report.column("grad_norm_ratio")).all()
    assert report.input_norm == pytest.approx(float(np.linalg.norm(batch)), rel=1e-6)


def test_backward_statistics_of_scaled_identity_chain(batch):
    scales = [2.0, 0.5, 3.0]
    model = _linear_chain(scales)
    labels = np.arange(len(batch)) % 8
    report = signal_report(model, (batch, labels))
    # dL/dh_{l} = (prod of later scales) dL/dh_L, so the ratio is that product.
    np.testing.assert_allclose(report.column("grad_norm_ratio"), [1.5, 3.0, 1.0], rtol=1e-5)
    # dL/dW_l = h_{l-1}^T dL/dh_l, computed here by hand from the softmax cross-entropy.
    logits = batch * np.prod(scales)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    d_logits = (probs - np.eye(8)[labels]) / len(batch)
    inputs = [batch, batch * 2.0, batch * 1.0]
    upstream = [d_logits * 1.5, d_logits * 3.0, d_logits]
    expected = [np.std(h.T @ d) for h, d in zip(inputs, upstream)]
    np.testing.assert_allclose(report.column("weight_grad_std"), expected, rtol=1e-4)
    cross_entropy = -np.mean(np.log(probs[np.arange(len(batch)), labels]))
    assert report.loss == pytest.approx(cross_entropy, rel=1e-5)


def test_given_loss_and_its_labels(batch):
    model = _linear_chain([1.0, 1.0])
    report = signal_report(model, (batch, np.zeros_like(batch)), loss="mean_squared_error")
    # L = mean(h^2) with h = x: the loss is known exactly.
    assert report.loss == pytest.approx(float(np.mean(batch**2)), rel=1e-5)
    with pytest.raises(ValueError, match="loss"):
        signal_report(model, batch, loss="mean_squared_error")
    with pytest.raises(ValueError, match="loss=3"):
        signal_report(model, (batch, batch), loss=3)


def test_execution_order_and_one_evaluation_per_layer(batch):
    class Reordered(keras.Model):
        def __init__(self):
            super().__init__()
            self.late = keras.layers.Dense(8, name="late")
            self.early = keras.layers.Dense(8, name="early", activation="relu")

        def call(self, x):
            return self.late(self.early(x))

    model = Reordered()
    model(batch)
    calls = {"early": 0, "late": 0}
    for layer in (model.early, model.late):
        original = layer.call

        def counted(*args, _original=original, _name=layer.name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        layer.call = counted
    report = signal_report(model, batch)
    assert [row.name for row in report.rows] == ["early", "late"]
    assert calls == {"early": 1, "late": 1}  # one forward pass; the backward re-runs nothing
    # The fused ReLU is part of the layer's output: nothing negative is recorded.
    assert report.samples["early"].min() >= 0.0


def test_weight_normalized_layers_report_their_direction_gradient(batch):
    model = keras.Sequential([keras.Input((8,)), WeightNormalization(keras.layers.Dense(4))])
    report = signal_report(model, (batch, np.arange(32) % 4))
    assert report.rows[0].class_name == "WeightNormalization(Dense)"
    assert np.isfinite(report.rows[0].weight_grad_std) and report.rows[0].weight_grad_std > 0


def test_summary_dict_and_plot(batch, tmp_path, capsys):
    report = signal_report(_linear_chain([1.0, 0.0]), batch)
    report.summary()
    assert "||h||/||x||" in capsys.readouterr().out
    # The dead second layer makes the backward ratio 0/0: NaN must survive JSON as a string.
    text = json.dumps(report.to_dict())
    assert json.loads(text)["rows"][1]["norm_ratio"] == 0.0
    path = report.plot(str(tmp_path / "signal.png"), histograms=True, title="test")
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(batch, tmp_path, monkeypatch):
    report = signal_report(_linear_chain([1.0]), batch, gradients=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"keras-goodinit\[examples\]"):
        report.plot(str(tmp_path / "x.png"))


def test_bad_input(batch):
    model = _linear_chain([1.0])
    with pytest.raises(ValueError, match="model"):
        signal_report("not a model", batch)
    with pytest.raises(ValueError, match="NaN or Inf"):
        signal_report(model, np.full((4, 8), np.nan, "float32"))
    with pytest.raises(ValueError, match="non-empty"):
        signal_report(model, np.zeros((0, 8), "float32"))


def test_bad_flags_name_the_argument(batch):
    model = _linear_chain([1.0])
    with pytest.raises(ValueError, match="gradients='yes'"):
        signal_report(model, batch, gradients="yes")
    with pytest.raises(ValueError, match="seed=1.5"):
        signal_report(model, batch, seed=1.5)


# ----------------------------------------------------------------------------
# Issue 8: the backward reference, multi-output losses, training mode, the default loss,
# state left exactly as it was, and argument validation.


def _identity_dense(units, scale, name, width=8):
    del width  # Identity(scale) needs a square kernel: units == input width
    return keras.layers.Dense(units, use_bias=False, name=name,
                              kernel_initializer=keras.initializers.Identity(scale))


def _values(model):
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.variables]


def _assert_untouched(model, before):
    after = _values(model)
    assert len(after) == len(before)
    for variable, old, new in zip(model.variables, before, after):
        # Bit for bit: a diagnostic must leave no trace, not even a rounding.
        assert old.tobytes() == new.tobytes(), variable.path


def test_discarded_last_head_does_not_make_the_ratio_nan(batch):
    class DiscardsAux(keras.Model):
        def __init__(self):
            super().__init__()
            self.d0 = _identity_dense(8, 2.0, "d0")
            self.d1 = _identity_dense(8, 3.0, "d1")
            self.aux = _identity_dense(8, 5.0, "aux")

        def call(self, x):
            h = self.d0(x)
            main = self.d1(h)
            self.aux(h)  # runs last, but its output is thrown away
            return main

    model = DiscardsAux()
    report = signal_report(model, (batch, np.arange(32) % 8))
    assert [row.name for row in report.rows] == ["d0", "d1", "aux"]
    assert report.grad_reference == "d1"
    # dL/dh0 = 3 dL/dh1 (kernel 3 I): the ratio is 3, the reference's own is 1, exactly.
    np.testing.assert_allclose(report.column("grad_norm_ratio")[:2], [3.0, 1.0], rtol=1e-5)
    # The discarded head has no gradient at all: NaN, not 0/0 spreading to the others.
    assert np.isnan(report.rows[2].grad_norm_ratio)
    assert np.isnan(report.rows[2].weight_grad_std)
    assert np.isfinite(report.column("weight_grad_std")[:2]).all()


def _two_outputs(as_dict=False):
    inputs = keras.Input((8,))
    a = _identity_dense(8, 1.0, "a")(inputs)
    b = _identity_dense(8, 2.0, "b")(inputs)
    return keras.Model(inputs, {"a": a, "b": b} if as_dict else [a, b])


@pytest.mark.parametrize("as_dict", [False, True])
def test_multi_output_string_and_callable_losses_sum_over_outputs(batch, as_dict):
    model = _two_outputs(as_dict)
    zeros = np.zeros_like(batch)
    y = {"a": zeros, "b": zeros} if as_dict else (zeros, zeros)
    report = signal_report(model, (batch, y), loss="mse")
    # Outputs x and 2x against 0: mean(x^2) + mean(4 x^2), exactly.
    assert report.loss == pytest.approx(5 * float(np.mean(batch**2)), rel=1e-5)
    assert report.loss_name.count("mse vs y") == 2
    # Both heads reach the loss; the one run last is the reference. dL/dh = 2 h / (n units)
    # with h = x and 2x: the gradient norms are in the ratio 1 : 2, whichever runs last.
    ratios = {row.name: row.grad_norm_ratio for row in report.rows}
    assert report.grad_reference == report.rows[-1].name
    assert ratios[report.grad_reference] == 1.0
    assert ratios["a"] / ratios["b"] == pytest.approx(0.5, rel=1e-5)

    def mean_abs(y_true, y_pred):
        return keras.ops.mean(keras.ops.abs(y_pred - y_true), axis=-1)

    report = signal_report(model, (batch, y), loss=mean_abs)
    assert report.loss == pytest.approx(3 * float(np.mean(np.abs(batch))), rel=1e-5)
    assert "mean_abs vs y" in report.loss_name
    # dL/dh = sign(h) / (n units) for both heads: equal norms.
    np.testing.assert_allclose(report.column("grad_norm_ratio"), [1.0, 1.0], rtol=1e-6)


def test_multi_output_labels_must_match_the_outputs(batch):
    model = _two_outputs()
    with pytest.raises(ValueError, match="2 outputs.*Received: y=one array of shape"):
        signal_report(model, (batch, batch), loss="mse")
    with pytest.raises(ValueError, match="Received: y=a tuple of length 3"):
        signal_report(model, (batch, (batch, batch, batch)), loss="mse")


def test_multi_output_default_loss_is_per_output(batch):
    inputs = keras.Input((8,))
    logits = _identity_dense(8, 1.0, "logits")(inputs)
    value = keras.layers.Dense(1, use_bias=False, name="value",
                               kernel_initializer=keras.initializers.Ones())(inputs)
    model = keras.Model(inputs, [logits, value])
    report = signal_report(model, batch, seed=3)
    assert report.loss_name.endswith(
        "sparse_categorical_crossentropy from logits vs seeded labels + "
        "value: mean_squared_error vs seeded N(0, 1) targets")
    # The same draws, in output order, from the documented seed.
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 8, (32,))
    targets = rng.standard_normal((32, 1))
    shifted = batch - batch.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    cross_entropy = -np.mean(log_probs[np.arange(32), labels])
    squared = np.mean((batch.sum(1, keepdims=True) - targets) ** 2)
    assert report.loss == pytest.approx(cross_entropy + squared, rel=1e-5)


def test_one_unit_output_gets_squared_error_not_a_zero_loss(batch):
    kernel = np.linspace(-1.0, 1.0, 8).astype("float32")[:, None]
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(
        1, use_bias=False, name="head", kernel_initializer=keras.initializers.Constant(kernel))])
    pred = batch @ kernel
    targets = np.random.default_rng(0).standard_normal((32, 1))
    report = signal_report(model, batch)
    assert report.loss_name == "mean_squared_error vs seeded N(0, 1) targets"
    assert report.loss == pytest.approx(float(np.mean((pred - targets) ** 2)), rel=1e-5)
    # dL/dW = X^T 2 (pred - t) / n for L = mean((XW - t)^2): nonzero, computed by hand.
    d_kernel = batch.T @ (2 * (pred - targets) / 32)
    assert report.rows[0].weight_grad_std == pytest.approx(float(np.std(d_kernel)), rel=1e-4)
    assert report.rows[0].grad_norm_ratio == pytest.approx(1.0, rel=1e-6)
    y = np.arange(32, dtype="float32") / 32  # shape (32,): paired with the (32, 1) output
    report = signal_report(model, (batch, y))
    assert report.loss_name == "mean_squared_error vs y"
    assert report.loss == pytest.approx(float(np.mean((pred[:, 0] - y) ** 2)), rel=1e-5)


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_default_loss_reads_the_labels_by_shape(batch):
    model = _linear_chain([1.0])  # logits = x
    probs = _softmax(batch.astype("float64"))
    sparse = np.arange(32) % 8
    cross_entropy = -np.mean(np.log(probs[np.arange(32), sparse]))
    for y in (sparse, sparse[:, None], np.eye(8)[sparse]):
        report = signal_report(model, (batch, y))
        assert "crossentropy from logits vs y" in report.loss_name
        assert report.loss == pytest.approx(cross_entropy, rel=1e-5)
    # Targets of the output's shape that are not one-hot rows are regression targets.
    targets = np.ones_like(batch)
    report = signal_report(model, (batch, targets))
    assert report.loss_name == "mean_squared_error vs y"
    assert report.loss == pytest.approx(float(np.mean((batch - 1) ** 2)), rel=1e-5)
    with pytest.raises(ValueError, match=r"integers in \[0, 8\).*values in \[0, 8\]"):
        signal_report(model, (batch, np.arange(32) % 9))
    with pytest.raises(ValueError, match=r"Received: y of shape \(32, 3\)"):
        signal_report(model, (batch, np.zeros((32, 3))))


def test_softmax_outputs_are_read_as_probabilities(batch):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(
        8, use_bias=False, activation="softmax", kernel_initializer="identity")])
    labels = np.arange(32) % 8
    report = signal_report(model, (batch, labels))
    assert report.loss_name == "sparse_categorical_crossentropy from probabilities vs y"
    # Cross-entropy of softmax(x): not the cross-entropy of softmax(softmax(x)).
    probs = _softmax(batch.astype("float64"))
    assert report.loss == pytest.approx(-np.mean(np.log(probs[np.arange(32), labels])),
                                        rel=1e-5)


def _bn_model():
    return keras.Sequential([
        keras.Input((8,)), _identity_dense(8, 1.0, "d0"),
        keras.layers.BatchNormalization(name="bn"), _identity_dense(8, 1.0, "d1")])


@pytest.mark.parametrize("gradients", [True, False])
def test_training_mode_is_used_and_recorded(gradients):
    # Channels with means and variances far from BN's moving ones (0 and 1).
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(64, 8)) * np.arange(1, 9) + 5.0).astype("float32")
    model = _bn_model()
    model(x)
    before = _values(model)
    train = signal_report(model, x, training=True, gradients=gradients)
    infer = signal_report(model, x, gradients=gradients)
    _assert_untouched(model, before)
    assert (train.training, infer.training) == (True, False)
    # Training mode: every channel normalized by the batch, variance v / (v + eps) and mean
    # 0, so the std over the tensor is sqrt(mean_c v_c / (v_c + eps)).
    variance = x.astype("float64").var(0)
    expected = np.sqrt(np.mean(variance / (variance + 1e-3)))
    assert train.rows[1].std == pytest.approx(expected, rel=1e-4)
    assert abs(train.rows[1].mean) < 1e-5
    # Inference mode: (x - 0) / sqrt(1 + eps), exactly.
    assert infer.rows[1].std == pytest.approx(x.std() / np.sqrt(1 + 1e-3), rel=1e-4)
    assert train.to_dict()["training"] is True and infer.to_dict()["training"] is False
    assert "training=True (training mode)" in train.table()
    assert "training=False (inference mode)" in infer.table()


def test_mobilenet_training_mode_matches_a_training_call():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 3), classes=10, dropout_rate=0.0,
        classifier_activation=None)
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    before = _values(model)
    train = signal_report(model, x, training=True)
    infer = signal_report(model, x)
    _assert_untouched(model, before)
    assert train.rows[-1].name == infer.rows[-1].name == "logits"
    # The logits row is the model's output: the report must reproduce each mode's call.
    for report, mode in ((infer, False), (train, True)):
        logits = keras.ops.convert_to_numpy(model(x, training=mode))
        assert report.rows[-1].std == pytest.approx(float(logits.std()), rel=1e-4)
    assert train.rows[-1].std > 10 * infer.rows[-1].std  # the two modes really differ


class _ForcedBatchNorm(keras.Model):
    """Calls BatchNormalization and Dropout in training mode, whatever mode it is called in."""

    def __init__(self):
        super().__init__()
        self.d0 = keras.layers.Dense(8, name="d0")
        self.bn = keras.layers.BatchNormalization(name="bn")
        self.drop = keras.layers.Dropout(0.5, seed=1)
        self.d1 = keras.layers.Dense(4, name="d1")
        self.fail = False

    def call(self, x, training=None):
        h = self.drop(self.bn(self.d0(x), training=True), training=True)
        if self.fail:
            raise RuntimeError("failing after the moving statistics moved")
        return self.d1(h)


@pytest.mark.parametrize("gradients", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_forced_training_state_is_restored(batch, gradients, training):
    model = _ForcedBatchNorm()
    model(batch)
    before = _values(model)
    report = signal_report(model, batch, gradients=gradients, training=training)
    assert [row.name for row in report.rows] == ["d0", "d1"]
    _assert_untouched(model, before)
    # The check above can fail: any call moves the moving mean (by 0.01 * the batch mean of
    # d0's output, nonzero) and the dropout seed state.
    mean, seed_state = (np.array(model.bn.moving_mean),
                        np.array(model.drop.seed_generator.state))
    model(batch)
    assert not np.array_equal(np.array(model.bn.moving_mean), mean)
    assert not np.array_equal(np.array(model.drop.seed_generator.state), seed_state)


@pytest.mark.parametrize("gradients", [True, False])
def test_state_is_restored_when_the_call_raises(batch, gradients):
    model = _ForcedBatchNorm()
    model(batch)
    before = _values(model)
    model.fail = True
    with pytest.raises(RuntimeError, match="moving statistics moved"):
        signal_report(model, batch, gradients=gradients)
    _assert_untouched(model, before)

    def failing_loss(y_true, y_pred):
        raise RuntimeError("loss failed")

    model.fail = False
    with pytest.raises(RuntimeError, match="loss failed"):
        signal_report(model, (batch, batch), loss=failing_loss, training=True)
    _assert_untouched(model, before)


def test_numpy_scalars_are_accepted(batch):
    model = _linear_chain([1.0, 2.0])
    reference = signal_report(model, batch, seed=2)
    report = signal_report(model, batch, seed=np.int64(2))
    assert report.loss == reference.loss
    np.testing.assert_array_equal(report.column("grad_norm_ratio"),
                                  reference.column("grad_norm_ratio"))
    assert report.training is False


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": -1}, "Argument `seed` must be a non-negative int. Received: seed=-1"),
    ({"seed": True}, "seed=True"),
    ({"seed": None}, "seed=None"),
    ({"seed": np.float64(2.0)}, r"seed=np.float64\(2.0\)"),
    ({"training": "yes"}, "Argument `training` must be a bool.*Received: training='yes'"),
    ({"training": 1}, "training=1"),
    ({"gradients": np.int64(1)}, r"gradients=np.int64\(1\)"),
    ({"loss": "no_such_loss"}, "Received: loss='no_such_loss'"),
    ({"loss": 3}, "loss=3"),
    ({"layers": 3}, "Argument `layers` must be a list.*Received: layers=3"),
    ({"layers": "d0"}, "layers='d0'"),
    ({"layers": [3]}, r"Every entry of argument `layers`.*Received: layers=\[3\]"),
    ({"layers": []}, r"at least one layer.*Received: layers=\[\]"),
    ({"layers": ["nope"]}, "nope"),
])
def test_bad_arguments_name_the_argument_and_value(batch, kwargs, message):
    model = _linear_chain([1.0])
    data = (batch, np.arange(32) % 8)
    before = _values(model)
    with pytest.raises(ValueError, match=message):
        signal_report(model, data, **kwargs)
    _assert_untouched(model, before)


# --- Residual blocks: the signal propagation plots of Brock et al. (2021) -------------------

def _scaled_conv(channels, scale, name, strides=1):
    """A bias-free 1x1 conv with kernel `scale * I`: it multiplies its input by `scale`."""
    kernel = scale * np.eye(channels, dtype="float32")[None, None]
    return keras.layers.Conv2D(channels, 1, strides=strides, use_bias=False, name=name,
                               kernel_initializer=keras.initializers.Constant(kernel))


def _channel_stats(y):
    """(mean_c mean(y_c)^2, mean_c var(y_c)) over batch and positions, in float64."""
    y = y.astype("float64")
    axes = tuple(range(y.ndim - 1))
    return float(np.mean(y.mean(axes) ** 2)), float(np.mean(y.var(axes)))


def _scaled_blocks_model():
    """Two identity blocks h <- h + s h, then a strided projection block, all linear:

    h1 = 1.5 x, h2 = h1 + 0.25 h1 (the Add's inputs swapped), then with
    s = h2[:, ::2, ::2]: out = 2 s (projection) + 0.5 * 0.5 s (two-kernel branch).
    """
    inputs = keras.Input((6, 6, 4))
    h1 = keras.layers.Add(name="add1")([inputs, _scaled_conv(4, 0.5, "b1")(inputs)])
    h2 = keras.layers.Add(name="add2")([_scaled_conv(4, 0.25, "b2")(h1), h1])
    skip = _scaled_conv(4, 2.0, "proj", strides=2)(h2)
    branch = _scaled_conv(4, 0.5, "b3a", strides=2)(h2)
    branch = _scaled_conv(4, 0.5, "b3b")(branch)
    out = keras.layers.Add(name="add3")([skip, branch])
    return keras.Model(inputs, keras.layers.Flatten()(out))


@pytest.fixture
def image_batch():
    # Channels with different means, so that the squared mean is not ~0.
    rng = np.random.default_rng(3)
    return (rng.normal(size=(16, 6, 6, 4)) * [1.0, 2.0, 0.5, 1.0]
            + [0.0, 1.0, -2.0, 3.0]).astype("float32")


@pytest.mark.parametrize("gradients", [True, False])
def test_residual_block_curves_of_scaled_identity_blocks(image_batch, gradients):
    model = _scaled_blocks_model()
    before = _values(model)
    report = signal_report(model, image_batch, gradients=gradients)
    _assert_untouched(model, before)
    x = image_batch.astype("float64")
    h1, h2 = 1.5 * x, 1.25 * 1.5 * x
    s = h2[:, ::2, ::2, :]
    # (block output, branch output, skip input) of each block, exactly.
    expected = [(h1, 0.5 * x, x), (h2, 0.25 * h1, h1), (2.25 * s, 0.25 * s, 2.0 * s)]
    assert [b.name for b in report.blocks] == ["add1", "add2", "add3"]
    # A stage ends where the shape changes: add3 starts the second one, alone in it.
    assert [(b.stage, b.num_blocks) for b in report.blocks] == [(0, 2), (0, 2), (1, 1)]
    for block, (out, branch, skip) in zip(report.blocks, expected):
        squared_mean, variance = _channel_stats(out)
        assert block.squared_mean == pytest.approx(squared_mean, rel=1e-5)
        assert block.variance == pytest.approx(variance, rel=1e-5)
        assert block.branch_variance == pytest.approx(_channel_stats(branch)[1], rel=1e-5)
        assert block.skip_variance == pytest.approx(_channel_stats(skip)[1], rel=1e-5)
    np.testing.assert_array_equal(report.block_column("stage"), [0, 0, 1])
    # The hooks are gone: every Add runs its class's call again.
    assert all("call" not in vars(model.get_layer(f"add{i}")) for i in (1, 2, 3))


def test_residual_blocks_in_nested_models_dict_table_and_plot(image_batch, tmp_path):
    inner = _scaled_blocks_model()
    inputs = keras.Input((6, 6, 4))
    outer = keras.Model(inputs, keras.layers.Dense(3, name="head")(inner(inputs)))
    report = signal_report(outer, image_batch)
    # Named by their path in the graph (issue 18): the nested model, then the layer.
    names = [f"{inner.name}/add{i}" for i in (1, 2, 3)]
    assert [b.name for b in report.blocks] == names
    direct = signal_report(inner, image_batch, gradients=False)
    np.testing.assert_allclose(report.block_column("variance"), direct.block_column("variance"),
                               rtol=1e-6)
    blocks = json.loads(json.dumps(report.to_dict()))["blocks"]
    assert [b["name"] for b in blocks] == names
    assert set(blocks[0]) == {"name", "stage", "num_blocks", "squared_mean", "variance",
                              "branch_variance", "skip_variance", "status", "reason"}
    assert {b["status"] for b in blocks} == {"ok"}
    table = report.table()
    assert "avg ch mean^2" in table and "branch var" in table and "add3" in table
    path = report.plot(str(tmp_path / "blocks.png"), histograms=True)
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_subclassed_models_are_traced_and_plain_sums_are_no_blocks(batch):
    class Residual(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(8)
            self.add = keras.layers.Add()

        def call(self, x):
            return self.add([x, self.dense(x)])

    model = Residual()
    model(batch)
    # A subclassed model is traced into its graph (issue 18): its Add is read in its call.
    (block,) = signal_report(model, batch).blocks
    assert block.status == "ok" and block.num_blocks == 1
    x = batch.astype("float64")
    assert block.skip_variance == pytest.approx(float(np.mean(x.var(axis=0))), rel=1e-5)
    assert signal_report(_linear_chain([1.0]), batch).to_dict()["blocks"] == []
    # An Add of two branches with one kernel each has no skip: a plain sum, not a block.
    inputs = keras.Input((8,))
    total = keras.layers.Add()([keras.layers.Dense(8)(inputs), keras.layers.Dense(8)(inputs)])
    assert signal_report(keras.Model(inputs, total), batch).blocks == []


def _dense_resnet(width: int, num_blocks: int) -> keras.Model:
    """A no-BN residual MLP: h <- h + W1 relu(W0 h), no ReLU after the addition."""
    inputs = keras.Input((width,))
    h = keras.layers.Dense(width, name="stem")(inputs)
    for block in range(num_blocks):
        y = keras.layers.Dense(width, activation="relu", name=f"block{block}_0")(h)
        y = keras.layers.Dense(width, name=f"block{block}_1")(y)
        h = keras.layers.Add(name=f"block{block}_add")([h, y])
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))


def test_mean_field_branches_carry_one_nth_of_the_stream_variance():
    """After mean_field_init, N * branch variance / stream variance is in [1 - 1/pi, 1].

    The branch's ReLU layer has gamma = 2, so with stream second moment P
    its pre-activations have second moment 2P and ReLU passes P on, a
    fraction 1/pi of it as channel means (a half-Gaussian's mean^2 =
    sigma^2 / (2 pi) of its sigma^2 / 2). The branch end, gamma = 1/N,
    carries P / N, of which the channel variance is (1 - 1/pi) P / N. The
    stream's variance V is P minus its own squared means, which each
    branch feeds by at most the same fraction 1/pi: V is in
    [(1 - 1/pi) P, P], so N * branch / V is in [1 - 1/pi, 1]. Sampling
    (512 samples, 256 channels) adds a few percent.
    """
    keras.utils.set_random_seed(0)
    num_blocks = 8
    model = _dense_resnet(256, num_blocks)
    report = mean_field_init(model, seed=0, verbose=0)
    assert [r.num_blocks for r in report.rows if r.name.endswith("_1")] == [num_blocks] * 8
    x = np.random.default_rng(0).normal(size=(512, 256)).astype("float32")
    blocks = signal_report(model, x, gradients=False).blocks
    assert len(blocks) == num_blocks and {b.num_blocks for b in blocks} == {num_blocks}
    ratios = np.array([num_blocks * b.branch_variance / b.skip_variance for b in blocks])
    assert np.all(ratios > (1 - 1 / np.pi) * 0.9) and np.all(ratios < 1.1), ratios
    # So the stream grows by (1 + 1/N) per block at most: by less than e over the stage.
    variance = np.array([b.variance for b in blocks])
    assert np.all(variance[1:] / variance[:-1] < 1 + 1.1 / num_blocks)
    assert variance[-1] / blocks[0].skip_variance < np.e


# ----------------------------------------------------------------------------
# Issue 17: a loss that gives no gradient is refused, not reported as NaN.


@pytest.mark.parametrize("compile", ["auto", "eager"])
@pytest.mark.parametrize("kind", ["numpy", "numpy_as_tensor"])
def test_a_loss_that_gives_no_gradient_is_refused(batch, compile, kind):
    def numpy_loss(y_true, y_pred):
        value = np.mean((keras.ops.convert_to_numpy(y_pred) - y_true) ** 2)
        return keras.ops.convert_to_tensor(value) if kind == "numpy_as_tensor" else value

    model = _linear_chain([1.0, 1.0])
    before = [v.numpy().copy() for v in model.weights]
    with pytest.raises(ValueError, match=r"Argument `loss` gives no gradient.*Received: loss="):
        signal_report(model, (batch, np.zeros_like(batch)), loss=numpy_loss, compile=compile)
    assert all(np.array_equal(v.numpy(), b) for v, b in zip(model.weights, before))
    # Without gradients the loss is not computed: the same loss is no error there.
    report = signal_report(model, (batch, np.zeros_like(batch)), loss=numpy_loss,
                           gradients=False)
    assert len(report.rows) == 2


# ----------------------------------------------------------------------------
# Issue 17: a target the pass cannot measure is a skipped row that says why, never dropped.


class _NestedFunction(keras.Model):
    """Calls its first layer inside a tf.function traced before any report."""

    def __init__(self):
        import tensorflow as tf

        super().__init__(name="nested_function")  # a root name scope: no leading "_"
        self.inner = keras.layers.Dense(16, activation="relu", name="inner")
        self.inner.build((None, 8))  # variables first: the tf.function then reads them
        self.head = keras.layers.Dense(4, name="head")
        self.nested = tf.function(lambda x: self.inner(x))

    def call(self, x):
        return self.head(self.nested(x))


class _VectorizedMap(keras.Model):
    def __init__(self):
        super().__init__(name="vectorized_map")
        self.inner = keras.layers.Dense(16, activation="relu", name="inner")
        self.head = keras.layers.Dense(4, name="head")

    def call(self, x):
        return self.head(keras.ops.vectorized_map(lambda row: self.inner(row[None])[0], x))


@pytest.mark.parametrize("compile", ["auto", "eager"])
@pytest.mark.parametrize("model_class, why", [
    (_NestedFunction, "tf.function"), (_VectorizedMap, "vectorized_map")])
def test_a_target_the_pass_cannot_measure_is_a_skipped_row(batch, compile, model_class, why):
    model = model_class()
    model(batch)
    report = signal_report(model, batch, compile=compile)
    assert report.mode == ("compiled" if compile == "auto" else "eager"), report.note
    rows = {r.name: r for r in report.rows}
    assert set(rows) == {"inner", "head"}
    assert rows["head"].status == "ok" and np.isfinite(rows["head"].std)
    skipped = rows["inner"]
    assert skipped.status == "skipped" and why in skipped.reason, skipped
    assert np.isnan(skipped.std) and np.isnan(skipped.grad_norm_ratio)
    assert "1 of 2 target layers could not be measured" in report.note
    assert f"skipped inner: {skipped.reason}" in report.table()
    assert report.to_dict()["rows"][1]["status"] == "skipped"


@pytest.mark.parametrize("compile", ["auto", "eager"])
def test_statistics_are_after_a_separate_activation_layer(compile):
    # Issue 17: wn_mlp puts each ReLU in its own layer; a row's mean, std, norm and samples
    # are of the output after it (>= 0), as for a fused activation, not of the pre-activation.
    from _rounding import reordered

    from keras_goodinit.models import wn_mlp

    model = wn_mlp((16,), 10, depth=3, width=32, seed=3)
    x = np.random.default_rng(5).normal(size=(64, 16)).astype("float32")
    report = signal_report(model, x, compile=compile)
    relus = {layer.name: model.layers[i + 1] for i, layer in enumerate(model.layers[:-1])
             if isinstance(model.layers[i + 1], keras.layers.ReLU)}
    assert len(relus) == 3
    features = keras.Model(model.inputs, [relu.output for relu in relus.values()])
    for row, expected in zip(report.rows, features(x)):
        assert row.name in relus
        expected = np.asarray(expected, dtype="float64")
        assert row.mean >= 0 and np.all(report.samples[row.name] >= 0), row
        # The same float32 values through another order of rounding: depth <= 3 layers of
        # fan-in <= 32, then a 2048-term statistic (tests/_rounding.py).
        bound = reordered(4, max(32, expected.size), np.abs(expected).max())
        assert abs(row.mean - expected.mean()) <= bound, row
        assert abs(row.std - expected.std()) <= bound, row


# --- Blocks written as tensor code and inside subclassed layers (issue 18) ------------------

class _InlineBlock(keras.layers.Layer):
    """A residual sum in a subclassed layer's own code, in one of three shapes:

    "scaled": `x + 0.5 * b(x)`, the layer's output (the branch is read at `b`'s call,
    times 0.25 in variance); "post_norm": `norm(x + b(x))` (the sum is read where the
    norm's call takes it); "hidden": `tanh(x + b(x))`, the sum seen by no call at all.
    """

    def __init__(self, shape, **kwargs):
        super().__init__(**kwargs)
        self.shape = shape
        self.b = _scaled_conv(4, 0.5, f"{kwargs['name']}_b")
        self.norm = keras.layers.Identity(name=f"{kwargs['name']}_norm")

    def call(self, x):
        if self.shape == "scaled":
            return x + 0.5 * self.b(x)
        total = x + self.b(x)
        return self.norm(total) if self.shape == "post_norm" else keras.ops.tanh(total)


def test_blocks_written_as_ops_and_inside_layers_are_all_reported(image_batch):
    inputs = keras.Input((6, 6, 4))
    h = _scaled_conv(4, 2.0, "stem")(inputs)
    h = h + _scaled_conv(4, 0.5, "b0")(h)  # an op node of the functional model
    h = keras.ops.add(_scaled_conv(4, 0.5, "b1")(h), h)
    for shape in ("scaled", "post_norm", "hidden"):
        h = _InlineBlock(shape, name=shape)(h)
    model = keras.Model(inputs, keras.layers.Flatten()(h))
    report = signal_report(model, image_batch, gradients=False)
    assert [b.num_blocks for b in report.blocks] == [5] * 5  # one stream, one stage
    op, ops_add, scaled, post_norm, hidden = report.blocks
    # Named by path: the op inside the layer (auto-named "add_<n>").
    assert [b.name.split("/")[0] for b in report.blocks[2:]] == ["scaled", "post_norm",
                                                                   "hidden"]
    # Linear maps of x: h0 = 2x, h1 = 1.5 h0, h2 = 1.5 h1, h3 = 1.25 h2 (its branch 0.5 * b(h2)
    # = 0.25 h2), h4 = 1.5 h3 through the identity "norm"; the last sum is hidden.
    x = image_batch.astype("float64")
    h0 = 2.0 * x
    h1, h2 = 1.5 * h0, 2.25 * h0
    h3 = 1.25 * h2
    h4 = 1.5 * h3
    expected = [(op, h1, 0.5 * h0, h0), (ops_add, h2, 0.5 * h1, h1),
                (scaled, h3, 0.25 * h2, h2), (post_norm, h4, 0.5 * h3, h3)]
    for block, out, branch, skip in expected:
        assert block.status == "ok", block
        assert block.variance == pytest.approx(_channel_stats(out)[1], rel=1e-5), block.name
        assert block.branch_variance == pytest.approx(_channel_stats(branch)[1], rel=1e-5)
        assert block.skip_variance == pytest.approx(_channel_stats(skip)[1], rel=1e-5)
    # The hidden sum is listed all the same, and says why its output was not measured.
    assert hidden.status == "skipped" and np.isnan(hidden.variance)
    assert "output" in hidden.reason and "own code" in hidden.reason, hidden.reason
    assert hidden.skip_variance == pytest.approx(_channel_stats(h4)[1], rel=1e-5)
    assert "1 of 5 residual blocks" in report.note
    assert f"skipped {hidden.name}: output:" in report.table()
