"""WeightNormalization and bake_weight_norm."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from _rounding import magnitude, reordered
from keras.src.testing import TestCase

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
    keras.layers.RNN(keras.layers.StackedRNNCells([keras.layers.LSTMCell(4)])),
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
    # predict runs a traced (XLA with jit_compile) program: two layers of sums of at most
    # 32 terms in another order (tests/_rounding.py).
    bound = reordered(2, 32, magnitude(eager))
    np.testing.assert_allclose(model.predict(x, verbose=0), eager, rtol=0, atol=bound)
    graph = tf.function(lambda inputs: model(inputs))
    np.testing.assert_allclose(graph(x).numpy(), eager, rtol=0, atol=bound)
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


# ----------------------------------------------------------------------------
# Losses, dtype policies, tiny and zero columns, quantization and LoRA.


def _twin_models(regularized, seed=0):
    """A WN model and the bare model with its effective weights (the reference)."""
    keras.utils.set_random_seed(seed)
    wrapped = keras.Sequential([keras.Input((5,)), WeightNormalization(regularized())])
    _randomize_scales(wrapped, seed)
    bare = keras.Sequential([keras.Input((5,)), regularized()])
    wrapper = wrapped.layers[0]
    bare.set_weights([keras.ops.convert_to_numpy(wrapper.normalized_kernel()),
                      np.asarray(wrapper.layer.bias)])
    return wrapped, bare


def _activity_regularized():
    return keras.layers.Dense(4, activity_regularizer=keras.regularizers.L2(3.0))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_an_activity_regularizer_on_the_wrapped_layer_counts_in_the_loss(jit_compile):
    wrapped, bare = _twin_models(_activity_regularized)
    x = _inputs((5,), batch=8)
    y = np.zeros((8, 4), "float32")
    wrapped(x)
    bare(x)
    assert len(wrapped.losses) == len(bare.losses) == 1
    np.testing.assert_allclose(float(wrapped.losses[0]), float(bare.losses[0]), rtol=1e-5)
    for model in (wrapped, bare):
        model.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    expected = bare.evaluate(x, y, verbose=0)
    mse = float(np.mean(np.square(keras.ops.convert_to_numpy(bare(x)))))
    assert expected > 2 * mse  # the regularizer is most of the loss
    np.testing.assert_allclose(wrapped.evaluate(x, y, verbose=0), expected, rtol=1e-5)
    # Training sees it too: the first step's loss is the same.
    first = wrapped.fit(x, y, batch_size=8, epochs=1, verbose=0).history["loss"][0]
    np.testing.assert_allclose(first, expected, rtol=1e-5)


class TestKerasLayerChecks(TestCase):
    """Keras' own layer checks (serialization, build, symbolic and eager calls, training and
    mixed precision)."""

    def test_dense(self):
        self.run_layer_test(WeightNormalization, {"layer": keras.layers.Dense(3)},
                            input_shape=(2, 4), expected_output_shape=(2, 3),
                            expected_num_trainable_weights=3,
                            expected_num_non_trainable_weights=0)

    def test_conv2d(self):
        self.run_layer_test(WeightNormalization,
                            {"layer": keras.layers.Conv2D(2, 3, padding="same")},
                            input_shape=(2, 5, 5, 3), expected_output_shape=(2, 5, 5, 2),
                            expected_num_trainable_weights=3,
                            expected_num_non_trainable_weights=0)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16", "float16", "float64"])
def test_the_wrapped_layer_follows_the_wrappers_dtype_policy(policy):
    wrapper = WeightNormalization(keras.layers.Dense(3), dtype=policy)
    assert wrapper.layer.dtype_policy.name == policy
    x = _inputs((4,))
    outputs = wrapper(x)
    spec = wrapper.compute_output_spec(keras.KerasTensor((4, 4), dtype=wrapper.compute_dtype))
    assert keras.backend.standardize_dtype(outputs.dtype) == spec.dtype == \
        wrapper.compute_dtype
    # Without `dtype`, the wrapper takes the wrapped layer's policy.
    assert WeightNormalization(keras.layers.Dense(3, dtype=policy)).dtype_policy.name == policy


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64",
                                   "mixed_float16"])
def test_tiny_columns_are_normalized_exactly_and_zero_columns_give_zero(dtype):
    wrapper = WeightNormalization(keras.layers.Dense(3, use_bias=False), dtype=dtype)
    x = np.ones((2, 4), "float32")
    wrapper(x)
    v = np.zeros((4, 3))
    v[:, 0] = [1e-7, 0, 0, 0]         # norm 1e-7: below any epsilon a norm might be given
    v[:, 1] = [0.5, -0.5, 0.5, 0.5]   # an ordinary unit-norm column
    wrapper.v.assign(v)
    wrapper.g.assign(np.ones(3))
    kernel = keras.ops.convert_to_numpy(keras.ops.cast(wrapper.normalized_kernel(), "float64"))
    np.testing.assert_allclose(kernel[:, 0], [1, 0, 0, 0], rtol=1e-3)
    np.testing.assert_allclose(kernel[:, 1], v[:, 1], rtol=1e-2)
    np.testing.assert_array_equal(kernel[:, 2], 0)
    outputs = keras.ops.convert_to_numpy(keras.ops.cast(wrapper(x), "float64"))
    np.testing.assert_allclose(outputs, [[1, 1, 0]] * 2, rtol=1e-2)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.cast(wrapper(x), "float32"))
    grad_g, grad_v = (np.asarray(tf.cast(grad, "float32"))
                      for grad in tape.gradient(loss, [wrapper.g, wrapper.v]))
    assert np.isfinite(grad_g).all() and np.isfinite(grad_v[:, 1:]).all()
    # The tiny column's true gradient is of order g / ||v|| = 1e7, beyond float16's range.
    if dtype != "float16":
        assert np.isfinite(grad_v[:, 0]).all()


def test_unit_norms_of_tiny_half_precision_kernels_do_not_underflow():
    from keras_goodinit.weight_norm import unit_norms

    kernel = np.full((16, 2), 1e-4, "float16")  # squares are 1e-8: zero in float16
    norms = keras.ops.convert_to_numpy(unit_norms(kernel, "default"))
    assert norms.dtype == np.float16
    np.testing.assert_allclose(norms.astype("float64"), 4e-4, rtol=1e-3)
    with pytest.raises(ValueError, match=re.escape("Received: layout='dense'")):
        unit_norms(kernel, "dense")


def _quantizable(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((16,)),
        WeightNormalization(keras.layers.Dense(32, activation="relu"), name="wn1"),
        keras.layers.Dense(32, activation="relu", name="plain"),
        WeightNormalization(keras.layers.Dense(8), name="wn2"),
    ])
    _randomize_scales(model, seed)
    return model


def _relative_error(got, expected):
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_quantizes_the_effective_kernel(mode, tmp_path):
    model = _quantizable()
    x = _inputs((16,), batch=32)
    expected = model.predict(x, verbose=0)
    reference = bake_weight_norm(model)
    reference.quantize(mode)
    model.quantize(mode)
    got = model.predict(x, verbose=0)
    # Exactly what quantizing the baked model gives, and close to the float model (int8
    # and int4 round each kernel entry to 1/127 and 1/7 of its column's largest).
    np.testing.assert_allclose(got, reference.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    error = _relative_error(got, expected)
    assert error < {"int8": 0.02, "int4": 0.2}[mode], error
    for name in ("wn1", "wn2"):
        wrapper = model.get_layer(name)
        assert wrapper.layer.quantization_mode == mode and not wrapper.g.trainable
    path = tmp_path / "quantized.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), got)


def test_quantizing_the_wrapper_itself_quantizes_the_effective_kernel():
    wrapper, x = _built("Dense")
    wrapper.g.assign(np.random.default_rng(2).uniform(0.5, 2.0, size=wrapper.g.shape))
    expected = keras.ops.convert_to_numpy(wrapper(x))
    wrapper.quantize("int8")
    assert wrapper.layer.quantization_mode == "int8"
    assert _relative_error(keras.ops.convert_to_numpy(wrapper(x)), expected) < 0.02


def test_a_failed_quantize_leaves_the_weight_normalized_layer_unchanged():
    model = _quantizable()
    x = _inputs((16,), batch=8)
    expected = model.predict(x, verbose=0)
    weights = [np.array(w) for w in model.get_weights()]
    with pytest.raises(ValueError, match="mode"):
        model.quantize("int3")
    for old, new in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)
    assert model.get_layer("wn1").g.trainable


def test_lora_on_the_wrapped_layer_adds_a_low_rank_update_to_the_effective_kernel(tmp_path):
    x, y = _regression_data()
    model = _regression_model()
    _randomize_scales(model)
    expected = model.predict(x, verbose=0)
    wrapper = model.layers[0]
    wrapper.layer.enable_lora(2)
    # lora_b starts at zero: the outputs do not move.
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6)
    assert not wrapper.v.trainable and wrapper.g.trainable
    assert {w.name for w in wrapper.trainable_weights} == {"g", "bias", "lora_kernel_a",
                                                            "lora_kernel_b"}
    v = np.array(wrapper.v)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, y, batch_size=64, epochs=2, verbose=0)
    np.testing.assert_array_equal(np.asarray(wrapper.v), v)
    lora = wrapper.layer
    delta = np.asarray(lora.lora_kernel_a) @ np.asarray(lora.lora_kernel_b) * (
        lora.lora_alpha / lora.lora_rank)
    assert np.abs(delta).max() > 0
    # The layer computes with g * v / ||v|| + delta.
    kernel = keras.ops.convert_to_numpy(wrapper.normalized_kernel()) + delta
    bare = keras.ops.convert_to_numpy(wrapper.layer.activation(
        x @ kernel + np.asarray(wrapper.layer.bias)))
    got = keras.ops.convert_to_numpy(wrapper(x))
    np.testing.assert_allclose(got, bare, rtol=1e-5, atol=1e-5)
    # Baked, saved and loaded, it computes the same.
    predicted = model.predict(x, verbose=0)
    baked = bake_weight_norm(model)
    np.testing.assert_allclose(baked.predict(x, verbose=0), predicted, rtol=1e-5, atol=1e-5)
    path = tmp_path / "lora.keras"
    model.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path).predict(x, verbose=0), predicted,
                               rtol=1e-6, atol=1e-6)


def test_a_mask_passes_through_as_it_does_through_the_wrapped_layer():
    tokens = np.array([[3, 5, 0, 0], [7, 0, 0, 0]])
    inputs = keras.Input((4,), dtype="int32")
    embedded = keras.layers.Embedding(10, 6, mask_zero=True)(inputs)
    wrapped = WeightNormalization(keras.layers.Dense(5))(embedded)
    plain = keras.layers.Dense(5)(embedded)
    # A mask-consuming layer downstream sees the padding only if the mask survived.
    model = keras.Model(inputs, [keras.layers.GlobalAveragePooling1D()(wrapped),
                                 keras.layers.GlobalAveragePooling1D()(plain)])
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)][0]
    wn = [layer for layer in model.layers if isinstance(layer, WeightNormalization)][0]
    dense.set_weights([wn.layer.kernel.numpy(), wn.layer.bias.numpy()])
    got, want = model(tokens)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got),
                               keras.ops.convert_to_numpy(want), rtol=1e-5, atol=1e-6)
    mask = wn.compute_mask(None, keras.ops.convert_to_tensor(tokens != 0))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(mask), tokens != 0)


# ----------------------------------------------------------------------------
# data_init: tensorflow-addons' data-dependent init on the first training batch (issue 17).

F32_EPS = float(np.finfo("float32").eps)


def _data_init_model(name="Conv2D", **layer_kwargs):
    factory = {"Conv2D": lambda: keras.layers.Conv2D(6, 3, activation="relu", **layer_kwargs),
               "Dense": lambda: keras.layers.Dense(6, activation="relu", **layer_kwargs),
               "DepthwiseConv2D": lambda: keras.layers.DepthwiseConv2D(
                   3, depth_multiplier=2, activation="relu", **layer_kwargs)}[name]
    input_shape = (5,) if name == "Dense" else (8, 8, 3)
    wrapper = WeightNormalization(factory(), data_init=True, name="wn")
    model = keras.Sequential([keras.Input(input_shape), wrapper, keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    # Far from zero mean and unit variance, so that the init has something to do.
    x = (_inputs(input_shape, batch=64, seed=3) * 3.0 + 1.0).astype("float32")
    y = _inputs((2,), batch=64, seed=4)
    return model, wrapper, x, y


def _pre_activation(wrapper, x):
    """The wrapped layer's output before its activation, from its weights as they are now."""
    config = {**wrapper.layer.get_config(), "activation": "linear", "name": "plain"}
    plain = type(wrapper.layer).from_config(config)
    plain.build(x.shape)
    weights = [keras.ops.convert_to_numpy(wrapper.normalized_kernel())]
    if getattr(wrapper.layer, "bias", None) is not None:
        weights.append(keras.ops.convert_to_numpy(wrapper.layer.bias))
    plain.set_weights(weights)
    y = keras.ops.convert_to_numpy(plain(x))
    return y.reshape(-1, y.shape[-1]).astype("float64")


def _unit_bound(wrapper, y):
    """How far float32 rounding alone moves a unit's mean or std from the init's target.

    Each output is a float32 dot product over the unit's fan-in (relative error up
    to fan_in eps, Higham's gamma_n), and the statistics sum it over the batch in
    a tree (log2 of the count more); on outputs of size max|y|.
    """
    kernel = wrapper.v
    fan_in = int(np.prod(kernel.shape)) // int(np.prod(wrapper.g.shape))
    return (fan_in + np.log2(y.shape[0])) * F32_EPS * float(np.abs(y).max())


def _fit_once(model, x, y, *, jit_compile=False, learning_rate=0.0):
    """One training step on the whole batch (lr 0: only the init moves weights)."""
    model.compile(keras.optimizers.SGD(learning_rate), "mse", jit_compile=jit_compile)
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)


def test_data_init_is_an_argument_and_round_trips_in_get_config():
    for value in (True, False):
        wrapper = WeightNormalization(keras.layers.Conv2D(4, 3), data_init=value)
        assert wrapper.data_init is value
        config = wrapper.get_config()
        # False is the default and is left out, for older versions to load the file.
        assert config.get("data_init", False) is value and ("data_init" in config) is value
        assert WeightNormalization.from_config(dict(config)).data_init is value
    # A config saved before data_init existed (no key) loads with the default, no data init.
    assert "data_init" not in config
    assert WeightNormalization.from_config(config).data_init is False
    assert WeightNormalization(keras.layers.Dense(3)).data_init is False


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_data_init_raises_naming_it(value):
    with pytest.raises(ValueError, match=re.escape(f"Received: data_init={value!r}")):
        WeightNormalization(keras.layers.Dense(3), data_init=value)


@pytest.mark.parametrize(("name", "jit_compile"), [("Conv2D", False), ("Conv2D", True),
                                                   ("Dense", True), ("DepthwiseConv2D", False)])
def test_data_init_normalizes_the_first_training_batch_once(name, jit_compile):
    model, wrapper, x, y = _data_init_model(name)
    assert not bool(wrapper.initialized.numpy())
    model.predict(x, verbose=0)  # inference does not init
    assert not bool(wrapper.initialized.numpy())
    _fit_once(model, x, y, jit_compile=jit_compile)
    assert bool(wrapper.initialized.numpy())
    pre = _pre_activation(wrapper, x)
    bound = _unit_bound(wrapper, pre)
    assert np.abs(pre.mean(0)).max() <= bound, (np.abs(pre.mean(0)).max(), bound)
    assert np.abs(pre.std(0) - 1.0).max() <= bound, (np.abs(pre.std(0) - 1.0).max(), bound)
    # v itself is untouched: only g and the bias are set (normalized v).
    before = [w.numpy().copy() for w in (wrapper.g, wrapper.layer.bias)]
    _fit_once(model, x[::-1] * 2.0 + 5.0, y)  # another batch, other statistics
    for old, new in zip(before, (wrapper.g, wrapper.layer.bias), strict=True):
        np.testing.assert_array_equal(new.numpy(), old)


def test_data_init_uses_the_batchs_own_output_and_trains_from_the_init():
    """The first step's loss and gradients are those of the initialized layer."""
    model, wrapper, x, y = _data_init_model("Dense")
    initialized, _, _, _ = _data_init_model("Dense")
    initialized.set_weights(model.get_weights())
    _fit_once(initialized, x, y)  # lr 0: the init only
    expected = initialized.evaluate(x, y, verbose=0)
    stepped = [w.numpy().copy() for w in initialized.weights]
    # One step with a learning rate from the initialized weights (the flag is set)...
    _fit_once(initialized, x, y, learning_rate=0.1)
    # ...is what the first step of the uninitialized model does: init, then that step.
    model.compile(keras.optimizers.SGD(0.1), "mse")
    history = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    # The same float32 computation on the same batch, in another tf.function.
    assert abs(history.history["loss"][0] - expected) <= 1e-5 * abs(expected)
    for ours, theirs in zip(model.weights, initialized.weights, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(wrapper.g.numpy() - stepped[0]).max() > 0  # the step did move g


def test_data_init_false_adds_no_variable_and_changes_nothing():
    model, _, x, y = _data_init_model("Conv2D")
    plain = keras.Sequential([keras.Input((8, 8, 3)),
                              WeightNormalization(keras.layers.Conv2D(6, 3, activation="relu"),
                                                  data_init=False),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    # The wrapper holds g alone, as before data_init existed (older files load).
    assert len(plain.weights) == len(model.weights) - 3  # initialized, g_shift, bias_shift
    assert [w.name for w in plain.layers[0].weights] == ["g", "kernel", "bias"]
    before = [w.numpy().copy() for w in plain.weights]
    _fit_once(plain, x, y)
    for old, new in zip(before, plain.weights, strict=True):
        np.testing.assert_array_equal(new.numpy(), old)


def test_data_init_agrees_with_weightnorm_data_init_which_sets_the_flag():
    from keras_goodinit import weightnorm_data_init

    model, wrapper, x, y = _data_init_model("Conv2D")
    explicit, explicit_wrapper, _, _ = _data_init_model("Conv2D")
    explicit.set_weights(model.get_weights())
    _fit_once(model, x, y)
    weightnorm_data_init(explicit, x, verbose=0)
    assert bool(explicit_wrapper.initialized.numpy())
    pre = _pre_activation(wrapper, x)
    bound = _unit_bound(wrapper, pre)  # both set unit std 1 to this rounding
    for ours, theirs in ((wrapper.g, explicit_wrapper.g),
                         (wrapper.layer.bias, explicit_wrapper.layer.bias)):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=2 * bound, atol=2 * bound)
    # The flag it set keeps fit from doing the init again on another batch.
    before = explicit_wrapper.g.numpy().copy()
    _fit_once(explicit, x * 4.0, y)
    np.testing.assert_array_equal(explicit_wrapper.g.numpy(), before)


def test_data_init_in_a_tf_function_and_without_a_bias():
    model, wrapper, x, _ = _data_init_model("Conv2D", use_bias=False)
    step = tf.function(lambda batch: model(batch, training=True), jit_compile=True)
    step(tf.constant(x))
    assert bool(wrapper.initialized.numpy())
    pre = _pre_activation(wrapper, x)
    bound = _unit_bound(wrapper, pre)
    # Without a bias the units cannot be centred: unit variance only.
    assert np.abs(pre.std(0) - 1.0).max() <= bound
    assert np.abs(pre.mean(0)).max() > 0.1
    before = wrapper.g.numpy().copy()
    step(tf.constant(x * 3.0))  # the traced function does not do it again
    np.testing.assert_array_equal(wrapper.g.numpy(), before)


def test_data_init_under_mixed_precision_sets_float32_variables():
    policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model, wrapper, x, y = _data_init_model("Dense")
    finally:
        keras.mixed_precision.set_dtype_policy(policy)
    _fit_once(model, x, y)
    assert wrapper.g.dtype == "float32" and bool(wrapper.initialized.numpy())
    pre = _pre_activation(wrapper, x)
    # float16 outputs: the statistics hold to float16's rounding of each output.
    half = float(np.finfo("float16").eps) * float(np.abs(pre).max()) * 4
    assert np.abs(pre.std(0) - 1.0).max() <= half and np.abs(pre.mean(0)).max() <= half


def test_data_init_in_a_float64_layer_keeps_its_dtype():
    # The new g and bias are cast to what the variables store, not to the float32 an
    # autocast scope reports (a float64 layer raised a dtype error here).
    x = np.random.default_rng(0).normal(size=(64, 4))
    wrapper = WeightNormalization(keras.layers.Dense(3, dtype="float64"), data_init=True)
    y = keras.ops.convert_to_numpy(wrapper(x, training=True))
    assert bool(keras.ops.convert_to_numpy(wrapper.initialized))
    assert keras.backend.standardize_dtype(wrapper.g.value.dtype) == "float64"
    # The init's statistics and normalization read in float32 (`_float32_reads`), so a
    # float64 layer is float32-accurate here: the float32 bound of the other data-init tests.
    pre = x @ keras.ops.convert_to_numpy(wrapper.normalized_kernel()) + keras.ops.convert_to_numpy(
        wrapper.layer.bias)
    bound = _unit_bound(wrapper, pre)
    assert np.abs(pre.mean(0)).max() <= bound, (np.abs(pre.mean(0)).max(), bound)
    assert np.abs(pre.std(0) - 1.0).max() <= bound, (pre.std(0), bound)
    assert np.abs(y - pre).max() <= bound


def test_lsuv_init_marks_a_data_init_wrapper_initialized():
    # Otherwise the first training batch would overwrite the scale LSUV just set.
    from keras_goodinit import lsuv_init

    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    wrapper = WeightNormalization(keras.layers.Dense(8, activation="relu"), data_init=True)
    model = keras.Sequential([keras.Input((8,)), wrapper, keras.layers.Dense(2)])
    lsuv_init(model, x, verbose=0)
    assert bool(keras.ops.convert_to_numpy(wrapper.initialized))
    g = keras.ops.convert_to_numpy(wrapper.g)
    wrapper(x, training=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(wrapper.g), g)
