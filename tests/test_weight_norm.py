"""WeightNormalization and bake_weight_norm."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_goodinit import GoodInit, WeightNormalization, _layouts, bake_weight_norm
from keras_goodinit.weight_norm import substituted

# name -> (layer factory, input shape without batch, shape of g)
SUPPORTED = {
    "Dense": (lambda: keras.layers.Dense(6), (5,), (6,)),
    "Conv1D": (lambda: keras.layers.Conv1D(4, 3), (9, 3), (4,)),
    "Conv2D": (lambda: keras.layers.Conv2D(4, 3, padding="same"), (7, 7, 3), (4,)),
    "Conv3D": (lambda: keras.layers.Conv3D(3, 2), (5, 5, 5, 2), (3,)),
    "Conv1DTranspose": (lambda: keras.layers.Conv1DTranspose(4, 3, strides=2), (6, 3), (4,)),
    "Conv2DTranspose": (lambda: keras.layers.Conv2DTranspose(4, 3, strides=2), (5, 5, 3), (4,)),
    "Conv3DTranspose": (lambda: keras.layers.Conv3DTranspose(3, 2), (4, 4, 4, 2), (3,)),
    "DepthwiseConv1D": (lambda: keras.layers.DepthwiseConv1D(3, depth_multiplier=2), (8, 3),
                        (3, 2)),
    "DepthwiseConv2D": (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2),
                        (6, 6, 3), (3, 2)),
}


def _inputs(shape, batch=4, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, *shape)).astype("float32")


def _built(name, seed=0):
    factory, input_shape, _ = SUPPORTED[name]
    layer = factory()
    wrapper = WeightNormalization(layer)
    x = _inputs(input_shape, seed=seed)
    wrapper(x)
    # A non-zero bias, so that the bias path is compared too.
    if getattr(layer, "bias", None) is not None:
        layer.bias.assign(np.random.default_rng(seed + 1).normal(size=layer.bias.shape))
    return wrapper, x


@pytest.mark.parametrize("name", SUPPORTED)
def test_supported_layers_compute_what_the_bare_layer_computes_at_build(name):
    wrapper, x = _built(name)
    expected = keras.ops.convert_to_numpy(wrapper.layer(x))  # the bare layer, kernel = v
    np.testing.assert_allclose(keras.ops.convert_to_numpy(wrapper(x)), expected,
                               rtol=1e-6, atol=1e-6)
    assert tuple(wrapper.g.shape) == SUPPORTED[name][2]
    assert tuple(wrapper.compute_output_shape(x.shape)) == expected.shape


@pytest.mark.parametrize("layer", [
    keras.layers.LSTM(4),
    keras.layers.SeparableConv2D(4, 3),
    keras.layers.BatchNormalization(),
], ids=lambda layer: type(layer).__name__)
def test_unsupported_layers_raise_listing_supported_types(layer):
    with pytest.raises(ValueError, match=r"Supported: Dense, Conv1D/2D/3D, "
                                         r"Conv1D/2D/3DTranspose, DepthwiseConv1D/2D") as info:
        WeightNormalization(layer)
    assert type(layer).__name__ in str(info.value)


@pytest.mark.parametrize("value", ["dense", 3, None])
def test_a_non_layer_raises_naming_the_argument(value):
    with pytest.raises(ValueError, match=re.escape(f"Received: layer={value!r}")) as info:
        WeightNormalization(value)
    assert "Supported: Dense" in str(info.value)


@pytest.mark.parametrize("name", SUPPORTED)
def test_v_is_the_wrapped_kernel_and_g_one_trainable_value_per_unit(name):
    wrapper, _ = _built(name)
    layer = wrapper.layer
    assert wrapper.v is layer.kernel
    # No second copy of the kernel: the wrapper adds exactly one variable, g.
    assert len(wrapper.weights) == len(layer.weights) + 1
    assert len({id(w) for w in wrapper.weights}) == len(wrapper.weights)
    assert sum(w is layer.kernel for w in wrapper.weights) == 1
    assert wrapper.g.trainable and any(w is wrapper.g for w in wrapper.trainable_weights)
    layout = _layouts.layout_of(layer)
    axes = _layouts.norm_axes(len(layer.kernel.shape), layout)
    norms = np.sqrt(np.sum(np.square(np.asarray(layer.kernel)), axis=axes))
    np.testing.assert_allclose(np.asarray(wrapper.g), norms, rtol=1e-6)


@pytest.mark.parametrize("name", ["Dense", "Conv2D", "Conv2DTranspose", "DepthwiseConv2D"])
def test_gradients_reach_g_v_and_bias_and_are_orthogonal_to_v(name):
    wrapper, x = _built(name)
    # Move g away from ||v|| so the effective kernel differs from v.
    rng = np.random.default_rng(3)
    wrapper.g.assign(rng.uniform(0.5, 2.0, size=wrapper.g.shape))
    probe = rng.normal(size=wrapper(x).shape).astype("float32")
    variables = [wrapper.g, wrapper.v, wrapper.layer.bias]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(wrapper(x) * probe)
    grad_g, grad_v, grad_b = (np.asarray(g, dtype="float64")
                              for g in tape.gradient(loss, variables))
    for grad in (grad_g, grad_v, grad_b):
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0

    v = np.asarray(wrapper.v, dtype="float64")
    axes = _layouts.norm_axes(v.ndim, wrapper.layout)
    dots = np.sum(grad_v * v, axis=axes)
    relative = np.abs(dots) / (np.sqrt(np.sum(grad_v**2, axis=axes))
                               * np.sqrt(np.sum(v**2, axis=axes)))
    assert relative.max() < 1e-5, relative

    # d loss / d g_j = (d loss / d w_j) . v_j / ||v_j||, with w the effective kernel.
    with tf.GradientTape() as tape:
        kernel = tf.Variable(wrapper.normalized_kernel())
        with substituted(wrapper.v, kernel):
            loss = tf.reduce_sum(wrapper.layer(x) * probe)
    grad_w = np.asarray(tape.gradient(loss, kernel), dtype="float64")
    expected = np.sum(grad_w * v, axis=axes) / np.sqrt(np.sum(v**2, axis=axes))
    np.testing.assert_allclose(grad_g, expected, rtol=1e-4, atol=1e-5)


def _regression_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(8, 1))) + 0.05 * rng.normal(size=(256, 1))).astype("float32")
    return x, y


def _regression_model(seed=0):
    return keras.Sequential([
        keras.Input((8,)),
        WeightNormalization(keras.layers.Dense(32, activation="relu",
                                               kernel_initializer=GoodInit("wn_relu", seed=seed))),
        WeightNormalization(keras.layers.Dense(
            1, kernel_initializer=GoodInit("wn_linear", seed=seed + 1))),
    ])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_predict_and_tf_function_work_and_loss_decreases(jit_compile):
    x, y = _regression_data()
    model = _regression_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", jit_compile=jit_compile)
    before = model.evaluate(x, y, verbose=0)
    history = model.fit(x, y, batch_size=64, epochs=15, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    assert after < 0.5 * before, (before, history.history["loss"], after)

    eager = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(model.predict(x, verbose=0), eager, rtol=1e-5, atol=1e-6)
    graph = tf.function(lambda inputs: model(inputs))
    np.testing.assert_allclose(graph(x).numpy(), eager, rtol=1e-5, atol=1e-6)
    # Training moved g as well as v.
    wrapper = model.layers[0]
    norms = np.linalg.norm(np.asarray(wrapper.v), axis=0)
    assert not np.allclose(np.asarray(wrapper.g), norms, rtol=1e-3)


def test_keras_save_and_load_give_identical_predictions(tmp_path):
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        WeightNormalization(keras.layers.Conv2D(4, 3, activation="relu",
                                                kernel_initializer=GoodInit("wn_relu", seed=1))),
        keras.layers.Flatten(),
        WeightNormalization(keras.layers.Dense(3)),
    ])
    for wrapper in (model.layers[0], model.layers[2]):
        wrapper.g.assign(np.random.default_rng(0).uniform(0.5, 2, size=wrapper.g.shape))
    x = _inputs((8, 8, 3))
    path = tmp_path / "x.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    for old, new in zip(model.layers, loaded.layers, strict=True):
        assert type(old) is type(new)
        if isinstance(new, WeightNormalization):
            assert new.v is new.layer.kernel
            np.testing.assert_array_equal(np.asarray(old.g), np.asarray(new.g))


def _half_precision_bound(model32, x, u):
    """Elementwise bound on |y_half - y_32| for a Dense/ReLU stack, by forward error analysis.

    Each layer y = W^T h + b runs on inputs and weights rounded to half
    (relative error u each), accumulates its dot products in float32 as
    TensorFlow's half-precision kernels do (error negligible next to u), and
    rounds the product and the sum with the bias (u each). So the new error is
    at most |W|^T |dh| + 4 u (|W|^T |h| + |b|), to first order in u; ReLU does
    not increase an error.
    """
    h = x.astype("float64")
    bound = np.full_like(h, u) * np.abs(h)  # the input cast
    for wrapper in model32.layers:
        w = np.asarray(wrapper.normalized_kernel(), dtype="float64")
        b = np.asarray(wrapper.layer.bias, dtype="float64")
        bound = bound @ np.abs(w)
        bound += 4 * u * (np.abs(h) @ np.abs(w) + np.abs(b))
        h = h @ w + b
        if wrapper.layer.activation is keras.activations.relu:
            h = np.maximum(h, 0)
    return bound


@pytest.mark.parametrize(("policy", "compute", "unit_roundoff"), [
    ("mixed_float16", "float16", 2.0**-11),
    ("mixed_bfloat16", "bfloat16", 2.0**-8),
])
def test_mixed_precision_keeps_float32_variables_and_matches_float32(policy, compute,
                                                                    unit_roundoff):
    x, y = _regression_data()
    model32 = _regression_model(seed=4)
    expected = keras.ops.convert_to_numpy(model32(x)).astype("float64")

    keras.config.set_dtype_policy(policy)
    model = _regression_model(seed=4)
    model.set_weights(model32.get_weights())
    for variable in model.weights:
        assert variable.dtype == "float32", variable.path
    outputs = model(x)
    assert keras.backend.standardize_dtype(outputs.dtype) == compute
    got = keras.ops.convert_to_numpy(keras.ops.cast(outputs, "float32")).astype("float64")
    bound = _half_precision_bound(model32, x, unit_roundoff)
    excess = np.abs(got - expected) - bound
    assert excess.max() <= 1e-6, (excess.max(), bound.max())

    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    history = model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    for variable in model.weights:
        assert variable.dtype == "float32", variable.path


def _no_weight_norm(model):
    return not any(isinstance(layer, WeightNormalization) for layer in model._flatten_layers())


def _randomize_scales(model, seed=0):
    """Moves every g away from ||v|| (and sets non-zero biases) so baking has work to do."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, WeightNormalization):
            layer.g.assign(rng.uniform(0.5, 2.0, size=layer.g.shape))
            if getattr(layer.layer, "bias", None) is not None:
                layer.layer.bias.assign(rng.normal(size=layer.layer.bias.shape))


def _sequential():
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        WeightNormalization(keras.layers.Conv2D(4, 3, activation="relu")),
        WeightNormalization(keras.layers.DepthwiseConv2D(3, depth_multiplier=2)),
        keras.layers.Flatten(),
        WeightNormalization(keras.layers.Dense(5)),
    ])


def _functional_residual():
    inputs = keras.Input((8, 8, 3))
    h = WeightNormalization(keras.layers.Conv2D(4, 3, padding="same"))(inputs)
    branch = WeightNormalization(keras.layers.Conv2D(4, 3, padding="same",
                                                     activation="relu"))(h)
    branch = WeightNormalization(keras.layers.Conv2DTranspose(4, 3, padding="same"))(branch)
    h = keras.layers.Add()([h, branch])
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def _functional_nested():
    inner = keras.Sequential([
        keras.Input((6,)),
        WeightNormalization(keras.layers.Dense(6, activation="relu")),
        WeightNormalization(keras.layers.Dense(6)),
    ], name="inner")
    inputs = keras.Input((5,))
    h = WeightNormalization(keras.layers.Dense(6))(inputs)
    h = inner(h)
    return keras.Model(inputs, WeightNormalization(keras.layers.Dense(2))(h))


@pytest.mark.parametrize(("build", "input_shape"), [
    (_sequential, (8, 8, 3)),
    (_functional_residual, (8, 8, 3)),
    (_functional_nested, (5,)),
], ids=["sequential", "functional_residual", "nested_sequential"])
def test_bake_removes_weight_norm_and_keeps_outputs(build, input_shape):
    model = build()
    _randomize_scales(model)
    x = _inputs(input_shape, batch=6)
    expected = keras.ops.convert_to_numpy(model(x))
    baked = bake_weight_norm(model)
    assert _no_weight_norm(baked)
    assert not _no_weight_norm(model)  # the original is untouched
    np.testing.assert_allclose(keras.ops.convert_to_numpy(baked(x)), expected,
                               rtol=1e-5, atol=1e-5)
    # The baked model has one variable fewer per wrapper (no g).
    wrappers = sum(isinstance(layer, WeightNormalization) for layer in model._flatten_layers())
    assert len(baked.weights) == len(model.weights) - wrappers


@pytest.mark.parametrize("value", [keras.layers.Dense(3), "model", None])
def test_bake_rejects_non_models(value):
    with pytest.raises(ValueError, match=re.escape(f"Received: model={value!r}")):
        bake_weight_norm(value)


def test_bake_rejects_unbuilt_models():
    model = keras.Sequential([WeightNormalization(keras.layers.Dense(3))], name="unbuilt")
    with pytest.raises(ValueError, match=re.escape("Received: model='unbuilt'")):
        bake_weight_norm(model)
