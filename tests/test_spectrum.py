"""jacobian_spectrum: the singular values of the input-output Jacobian at init (issue 21).

Theory (Saxe et al., 2014; Pennington, Schoenholz & Ganguli, 2017): a chain of
orthogonal linear layers is an isometry, every singular value 1 at any depth;
a chain of Gaussian layers of variance 1/N keeps the mean squared singular
value at 1 in expectation, but its singular values spread out with depth; a
tanh network with orthogonal weights at the order-to-chaos point keeps the
mean squared singular value near 1 at depth.

Tolerances: float32 rounding of a chain (`tests/_rounding.py`: `reordered`);
sampling error of a mean of squares (relative std sqrt(2/n) per Gaussian
layer, summed over the chain below).
"""

import math

import keras
import numpy as np
import pytest
from _rounding import reordered

from keras_goodinit.diagnostics import signal_report
from keras_goodinit.spectrum import JacobianSpectrum, jacobian_spectrum


def _chain(width: int, depth: int, initializer, *, activation=None, bias=None) -> keras.Model:
    layers = [keras.layers.Dense(
        width, activation=activation, use_bias=bias is not None,
        kernel_initializer=initializer(seed),
        bias_initializer=bias(seed) if bias is not None else "zeros",
        name=f"layer_{seed}") for seed in range(depth)]
    return keras.Sequential([keras.Input((width,)), *layers])


def _orthogonal(seed):
    return keras.initializers.Orthogonal(seed=seed)


def _gaussian(width):
    return lambda seed: keras.initializers.RandomNormal(stddev=1 / math.sqrt(width), seed=seed)


def _batch(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype("float32")


def test_an_orthogonal_linear_chain_is_an_isometry():
    width, depth = 32, 20
    spectrum = jacobian_spectrum(_chain(width, depth, _orthogonal), _batch((4, width)))
    assert isinstance(spectrum, JacobianSpectrum)
    assert spectrum.singular_values.shape == (4, width)
    assert (spectrum.in_dim, spectrum.out_dim, spectrum.output) == (width, width, "layer_19")
    # Each float32 kernel is orthogonal to 8 sqrt(n) eps (test_initializers.py) and each
    # product adds a sum of n roundings, sqrt(n) eps: 9 reordered(depth, n) in all.
    bound = 9 * reordered(depth, width)
    assert np.abs(spectrum.singular_values - 1).max() <= bound
    assert abs(spectrum.mean_squared - 1) <= 2 * bound  # s^2 doubles a relative error
    assert np.all(np.abs(spectrum.spreads - 1) <= 2 * bound)
    assert abs(spectrum.spread - 1) <= 2 * bound


def test_a_gaussian_linear_chain_keeps_the_mean_square_but_spreads_with_depth():
    width = 64
    spectra = {depth: jacobian_spectrum(_chain(width, depth, _gaussian(width)),
                                        _batch((2, width)))
               for depth in (1, 2, 4)}
    for depth, spectrum in spectra.items():
        # E[mean s^2] = 1 exactly: each layer keeps the expected squared norm. Each layer
        # multiplies ||J||_F^2 by a factor of relative variance 2 m_2 / N^2, m_2 = l + 1 the
        # second Fuss-Catalan moment of a chain of l Gaussian layers: relative std
        # sqrt(L (L + 1)) / N in all (0.07 at L = 4, N = 64, as 200 NumPy draws give). 4 std.
        assert abs(spectrum.mean_squared - 1) <= 4 * math.sqrt(depth * (depth + 1)) / width
    # The spread grows with depth: over 300 NumPy draws of the same N = 64 chains it lies in
    # [9.2, 16.9] at L = 1, [39, 98] at L = 2 and [500, 2127] at L = 4; an orthogonal
    # chain's is 1 at every depth (above).
    assert 5 < spectra[1].spread < spectra[2].spread < spectra[4].spread
    assert spectra[4].spread > 20 * spectra[1].spread


def _critical_tanh(q_star: float) -> tuple[float, float]:
    """(sigma_w^2, sigma_b^2) of tanh with chi_1 = 1 at the fixed point q* (science.md s. 3):
    sigma_w^2 = 1 / E[tanh'(sqrt(q*) u)^2], sigma_b^2 = q* - sigma_w^2 E[tanh(sqrt(q*) u)^2]."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(101)
    weights = weights / weights.sum()  # u ~ N(0, 1)
    z = math.sqrt(q_star) * nodes
    sigma_w2 = 1 / float(weights @ (1 / np.cosh(z)) ** 4)
    return sigma_w2, q_star - sigma_w2 * float(weights @ np.tanh(z) ** 2)


def test_a_critical_orthogonal_tanh_mlp_keeps_the_mean_square_at_depth():
    width, depth, q_star = 64, 50, 0.01
    sigma_w2, sigma_b2 = _critical_tanh(q_star)
    assert sigma_b2 > 0 and abs(sigma_w2 - 1) < 0.05  # small q*: sigma_w^2 ~ 1, tiny bias
    model = _chain(
        width, depth, lambda seed: keras.initializers.Orthogonal(math.sqrt(sigma_w2), seed),
        activation="tanh",
        bias=lambda seed: keras.initializers.RandomNormal(stddev=math.sqrt(sigma_b2),
                                                          seed=1000 + seed))
    # Inputs at the fixed point: the first pre-activation's variance is q*.
    spectrum = jacobian_spectrum(model, _batch((8, width), scale=math.sqrt(
        (q_star - sigma_b2) / sigma_w2)))
    # The target band. Mean field predicts 1 (chi_1 = 1 at every layer); each layer's
    # factor is a mean over N units of sigma_w^2 tanh'^2 = 1 - 2 q u^2 + ..., of relative std
    # ~ 2 sqrt(2) q* / sqrt(N) = 0.0035, so 50 layers move it by ~0.025 (4 std: 0.1).
    assert 0.5 <= spectrum.mean_squared <= 2
    assert abs(spectrum.mean_squared - 1) <= 4 * math.sqrt(depth) * 2 * math.sqrt(2) * q_star \
        / math.sqrt(width)
    # Orthogonal at criticality, the spectrum stays concentrated (1.34 here): a single
    # Gaussian layer already spreads it to 9-17 (above).
    assert spectrum.spread < 2


def _head_model():
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(7, activation="tanh", name="hidden",
                                bias_initializer=keras.initializers.RandomNormal(seed=2))(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))


def _exact_jacobians(model, x, output):
    """J_b in float64 from the weights: d head / dx = W2^T diag(tanh') W1^T."""
    w1, b1 = (np.asarray(w, "float64") for w in model.get_layer("hidden").get_weights())
    w2 = np.asarray(model.get_layer("head").get_weights()[0], "float64")
    slope = 1 - np.tanh(np.asarray(x, "float64") @ w1 + b1) ** 2  # (batch, 7)
    hidden = slope[:, :, None] * w1.T[None]  # (batch, 7, 5)
    return hidden if output == "hidden" else np.einsum("ho,bhi->boi", w2, hidden)


@pytest.mark.parametrize("output", [None, "hidden"])
def test_the_singular_values_are_those_of_the_exact_jacobian(output):
    # Head (3 x 5): reverse mode, 3 copies per example; hidden (7 x 5): forward mode, 5.
    model, x = _head_model(), _batch((6, 5), seed=1)
    spectrum = jacobian_spectrum(model, x, output=output)
    exact = np.linalg.svd(_exact_jacobians(model, x, output), compute_uv=False)
    assert spectrum.output == (output or "head")
    assert spectrum.singular_values.shape == exact.shape == (6, 3 if output is None else 5)
    # float32 versus float64: two layers' sums of at most 7 terms, at the scale of the
    # largest singular value (a singular value moves by at most the perturbation's norm).
    bound = reordered(2, 7, np.abs(exact).max()) * math.sqrt(exact.shape[1])
    np.testing.assert_allclose(spectrum.singular_values, exact, rtol=0, atol=bound)
    assert spectrum.mean_squared == pytest.approx(float(np.mean(exact**2)), rel=4 * bound)


def test_a_convolution_matches_per_output_gradients():
    # in_dim 3 * 3 * 1 = 9 < out_dim 3 * 3 * 4 = 36: forward mode, against 36 tape gradients.
    import tensorflow as tf

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((3, 3, 1)),
                              keras.layers.Conv2D(4, 3, padding="same", activation="tanh"),
                              keras.layers.Conv2D(4, 3, padding="same", activation="tanh")])
    x = _batch((2, 3, 3, 1), seed=4)
    spectrum = jacobian_spectrum(model, x)
    rows = []
    for j in range(36):
        inputs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            y = tf.reshape(model(inputs), (2, 36))[:, j]
        rows.append(tape.gradient(y, inputs).numpy().reshape(2, 9))
    exact = np.linalg.svd(np.stack(rows, axis=1).astype("float64"), compute_uv=False)
    # Two evaluations in float32 in another order: two layers of 36-term sums.
    bound = reordered(4, 36, exact.max()) * math.sqrt(9)
    np.testing.assert_allclose(spectrum.singular_values, exact, rtol=0, atol=bound)


def test_the_summary_and_the_plot(tmp_path):
    spectrum = jacobian_spectrum(_head_model(), _batch((4, 5)))
    text = str(spectrum)
    assert text == spectrum.summary()
    assert "'head'" in text and "3 x 5" in text and f"{spectrum.mean_squared:.4g}" in text
    assert set(spectrum.quantiles) == {0.05, 0.25, 0.5, 0.75, 0.95}
    assert spectrum.to_dict()["out_dim"] == 3
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    axis = spectrum.plot()
    assert axis.get_xscale() == "log"
    axis.figure.savefig(tmp_path / "spectrum.png")
    assert (tmp_path / "spectrum.png").stat().st_size > 0


def test_signal_report_carries_the_spectrum_on_the_same_batch():
    model, x = _head_model(), _batch((6, 5), seed=1)
    assert signal_report(model, x).spectrum is None  # the default is unchanged
    report = signal_report(model, x, spectrum=True)
    direct = jacobian_spectrum(model, x)
    np.testing.assert_array_equal(report.spectrum.singular_values, direct.singular_values)
    assert "Input-output Jacobian of 'head'" in str(report)
    assert signal_report(model, x, spectrum="hidden").spectrum.output == "hidden"
    with pytest.raises(ValueError, match="Received: spectrum='nowhere'"):
        signal_report(model, x, spectrum="nowhere")


def test_the_weights_are_left_as_they_were():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8),
                              keras.layers.BatchNormalization(), keras.layers.Dense(4)])
    x = _batch((5, 6), scale=3.0)
    before = [v.numpy().copy() for v in model.variables]
    jacobian_spectrum(model, x, training=True)  # batch statistics: the moving ones would move
    for variable, value in zip(model.variables, before, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


def test_bad_input_is_refused_naming_the_argument():
    model = _head_model()
    x = _batch((4, 5))
    with pytest.raises(ValueError, match=r"`x`.*Received: x with shape \(4, 6\)"):
        jacobian_spectrum(model, _batch((4, 6)))
    with pytest.raises(ValueError, match=r"`x`.*non-empty.*\(0, 5\)"):
        jacobian_spectrum(model, x[:0])
    with pytest.raises(ValueError, match=r"`x` contains NaN"):
        jacobian_spectrum(model, np.where(np.arange(5) == 2, np.nan, x).astype("float32"))
    with pytest.raises(ValueError, match=r"`output`.*Received: output='nowhere'"):
        jacobian_spectrum(model, x, output="nowhere")
    with pytest.raises(ValueError, match=r"`output`.*Received: output='outsider'"):
        jacobian_spectrum(model, x, output=keras.layers.Dense(2, name="outsider"))
    with pytest.raises(ValueError, match=r"`model`.*Received: model="):
        jacobian_spectrum("not a model", x)
    with pytest.raises(ValueError, match=r"`training`"):
        jacobian_spectrum(model, x, training="yes")
    first, second = keras.Input((5,)), keras.Input((5,))
    two_inputs = keras.Model([first, second], keras.layers.Add()([first, second]))
    with pytest.raises(ValueError, match=r"`model` must have a single input.*2 inputs"):
        jacobian_spectrum(two_inputs, x)
    two_outputs = keras.Model(first, [keras.layers.Dense(2)(first), keras.layers.Dense(3)(first)])
    with pytest.raises(ValueError, match=r"`model` must have a single output.*2 outputs"):
        jacobian_spectrum(two_outputs, x)
    assert jacobian_spectrum(two_outputs, x, output=two_outputs.layers[2]).out_dim == 3



def test_the_compiled_programs_do_not_keep_the_model_alive():
    import gc
    import weakref

    model = _head_model()
    jacobian_spectrum(model, _batch((2, 5)))
    jacobian_spectrum(model, _batch((2, 5)), output="hidden")
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_a_batch_goes_through_in_chunks_with_the_same_result():
    # 1,024 copies per pass: 32 directions an example makes chunks of 32 examples, so 45
    # examples take two passes, the second padded. Each example's Jacobian is its own:
    # the same per example however the batch is cut, up to the rounding order a matmul's
    # batch size may change (depth 5 forward and back, sums of 32 terms: `reordered`).
    model = _chain(32, 5, _orthogonal, activation="tanh")
    x = _batch((45, 32), seed=3, scale=0.5)
    whole = jacobian_spectrum(model, x).singular_values
    parts = np.concatenate([jacobian_spectrum(model, x[:7]).singular_values,
                            jacobian_spectrum(model, x[7:]).singular_values])
    np.testing.assert_allclose(whole, parts, rtol=0, atol=reordered(2 * 5, 32))


def test_an_overflowed_jacobian_is_reported_not_raised(tmp_path):
    # Two layers of gain 1e30 per entry: the forward pass overflows float32 (max 3.4e38), so
    # the Jacobian has inf or NaN entries. The SVD cannot take them: the spectrum says so
    # (mean square inf, a note) instead of failing, and keeps the finite examples' figures.
    width = 4
    big = keras.initializers.Constant(1e30)
    model = keras.Sequential([keras.Input((width,)),
                              keras.layers.Dense(width, kernel_initializer=big, name="a"),
                              keras.layers.Dense(width, kernel_initializer=big, name="b")])
    x = _batch((3, width))
    x[0] = 0.0  # a zero example still overflows in the Jacobian (1e30 * 1e30 per entry)
    spectrum = jacobian_spectrum(model, x)
    assert spectrum.mean_squared == math.inf
    assert math.isnan(spectrum.spread) and np.all(np.isnan(spectrum.singular_values))
    assert "3 of 3 examples' Jacobians are not finite" in spectrum.note
    assert spectrum.note in spectrum.summary()
    assert spectrum.to_dict()["note"] == spectrum.note
    spectrum.plot().figure.savefig(tmp_path / "empty.png")
    # A healthy model has no note.
    assert jacobian_spectrum(_chain(width, 2, _orthogonal), x).note == ""


def test_the_finite_examples_keep_their_figures_beside_an_overflowed_one():
    # exp after an orthogonal kernel: at x = 0 the Jacobian is the kernel itself (every
    # singular value 1, up to the float32 QR's orthogonality error: a rounding per entry of
    # a width-long sum, `reordered(width)`); at x = 200 the pre-activations
    # reach hundreds and exp overflows float32 (above 88.7), so that example is not finite.
    width = 4
    model = _chain(width, 1, _orthogonal, activation="exponential")
    x = np.zeros((2, width), "float32")
    x[1] = 200.0
    spectrum = jacobian_spectrum(model, x)
    assert spectrum.mean_squared == math.inf
    assert "1 of 2 examples' Jacobians are not finite" in spectrum.note
    assert np.all(np.isnan(spectrum.singular_values[1]))
    np.testing.assert_allclose(spectrum.singular_values[0], 1.0, atol=reordered(width))
    assert spectrum.spread == pytest.approx(1.0, abs=2 * reordered(width))
    assert spectrum.quantiles[0.5] == pytest.approx(1.0, abs=reordered(width))
