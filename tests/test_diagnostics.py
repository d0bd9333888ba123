"""signal_report: numbers checked against models whose statistics are known in closed form."""

import json
import sys

import keras
import numpy as np
import pytest

from keras_goodinit import WeightNormalization, signal_report


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
