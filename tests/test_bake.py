"""bake_weight_norm on the model structures `.keras` saving handles."""

import keras
import numpy as np
import pytest
from keras import layers as L

from keras_goodinit import GoodInit, WeightNormalization, bake_weight_norm


def _inputs(shape, batch=3, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, *shape)).astype("float32")


def _wrappers(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, WeightNormalization)]


def _randomize(model, seed=0):
    """Moves every g away from ||v|| and sets non-zero biases, so baking has work to do."""
    rng = np.random.default_rng(seed)
    for wrapper in _wrappers(model):
        wrapper.g.assign(rng.uniform(0.5, 2.0, size=wrapper.g.shape))
        bias = getattr(wrapper.layer, "bias", None)
        if bias is not None:
            bias.assign(rng.normal(size=bias.shape))


def _check_baked(model, x, *, rtol=1e-5, atol=1e-5):
    """Bakes `model` and checks outputs, weights and a `.keras` round trip; returns the copy."""
    _randomize(model)
    expected = keras.ops.convert_to_numpy(model(x))
    wrappers = len(_wrappers(model))
    assert wrappers > 0
    baked = bake_weight_norm(model)
    assert not _wrappers(baked)
    assert len(_wrappers(model)) == wrappers  # the original is untouched
    got = keras.ops.convert_to_numpy(baked(x))
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)
    assert len(baked.weights) == len(model.weights) - wrappers  # one g fewer per wrapper
    return baked


def test_sequential_and_the_kernel_is_the_effective_one():
    model = keras.Sequential([
        keras.Input((6,)),
        WeightNormalization(L.Dense(5, activation="relu",
                                    kernel_initializer=GoodInit("wn_relu", seed=1)), name="wn"),
        L.Dense(2, name="plain"),
    ])
    baked = _check_baked(model, _inputs((6,)))
    wrapper = model.get_layer("wn")
    np.testing.assert_array_equal(baked.get_layer(wrapper.layer.name).kernel.numpy(),
                                  keras.ops.convert_to_numpy(wrapper.normalized_kernel()))
    for old, new in zip(model.get_layer("plain").weights, baked.get_layer("plain").weights,
                        strict=True):
        np.testing.assert_array_equal(old.numpy(), new.numpy())


def test_functional_with_ops_slices_and_a_lambda():
    inputs = keras.Input((8,))
    h = WeightNormalization(L.Dense(8), name="wn_a")(inputs)
    h = h + inputs                       # an op, not a layer
    k = h[:, :4]                         # a slice
    k = L.Lambda(lambda t: t * 2.0)(k)
    k = WeightNormalization(L.Dense(3, activation="tanh"), name="wn_b")(k)
    outputs = keras.ops.concatenate([k, h[:, 4:]], axis=-1)
    model = keras.Model(inputs, outputs)
    baked = _check_baked(model, _inputs((8,)))
    assert {type(layer).__name__ for layer in baked.layers} >= {"Lambda", "Dense"}


def test_nested_models_and_time_distributed():
    inner = keras.Sequential([
        keras.Input((4,)),
        WeightNormalization(L.Dense(4, activation="relu")),
        L.Dense(4),
    ], name="inner")
    inputs = keras.Input((5, 4))
    h = L.TimeDistributed(WeightNormalization(L.Dense(4)))(inputs)
    h = L.TimeDistributed(inner)(h)
    h = L.Flatten()(h)
    model = keras.Model(inputs, WeightNormalization(L.Dense(2))(h))
    baked = _check_baked(model, _inputs((5, 4)))
    assert isinstance(baked.layers[1], L.TimeDistributed)
    assert type(baked.layers[1].layer) is L.Dense


def test_attention_block():
    inputs = keras.Input((6, 8))
    h = L.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
    h = L.LayerNormalization()(h + inputs)
    f = WeightNormalization(L.Dense(16, activation="gelu"))(h)
    f = WeightNormalization(L.Dense(8))(f)
    model = keras.Model(inputs, h + f)
    _check_baked(model, _inputs((6, 8)))


def test_conv_block_with_residuals_and_depthwise():
    inputs = keras.Input((8, 8, 4))
    h = WeightNormalization(L.DepthwiseConv2D(3, padding="same"))(inputs)
    h = L.LayerNormalization()(h)
    h = WeightNormalization(L.Conv2D(8, 1, activation="gelu"))(h)
    h = WeightNormalization(L.Conv2DTranspose(4, 1))(h)
    h = L.GlobalAveragePooling2D()(inputs + h)
    model = keras.Model(inputs, L.Dense(3)(h))
    _check_baked(model, _inputs((8, 8, 4)))


def test_mobilenet_without_wrappers_inside_keeps_its_weights():
    backbone = keras.applications.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 3), include_top=False, include_preprocessing=False,
        minimalistic=True, alpha=0.75)
    inputs = keras.Input((32, 32, 3))
    h = L.GlobalAveragePooling2D()(backbone(inputs))
    model = keras.Model(inputs, WeightNormalization(L.Dense(4))(h))
    baked = _check_baked(model, _inputs((32, 32, 3), batch=2))
    for old, new in zip(backbone.weights, baked.get_layer(backbone.name).weights, strict=True):
        assert old.path == new.path
        np.testing.assert_array_equal(old.numpy(), new.numpy())


@keras.saving.register_keras_serializable(package="test_bake")
class _Block(L.Layer):
    """A custom layer that creates its wrapper itself, so the config does not show it."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = WeightNormalization(L.Dense(units))

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, inputs):
        return self.dense(inputs)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="test_bake")
class _Wrapping(L.Layer):
    """A custom layer that takes its sublayer as an argument and serializes it."""

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer

    def build(self, input_shape):
        if not self.layer.built:  # a deserialized sublayer comes built
            self.layer.build(input_shape)

    def call(self, inputs):
        return 2.0 * self.layer(inputs)

    def get_config(self):
        return {**super().get_config(), "layer": keras.saving.serialize_keras_object(self.layer)}

    @classmethod
    def from_config(cls, config):
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)


def test_a_custom_layer_serializing_its_wrapper_is_baked():
    model = keras.Sequential([keras.Input((4,)), _Wrapping(WeightNormalization(L.Dense(3)))])
    baked = _check_baked(model, _inputs((4,)))
    assert type(baked.layers[0].layer) is L.Dense


def test_a_wrapper_a_custom_layer_creates_itself_is_kept_and_named():
    model = keras.Sequential([
        keras.Input((4,)),
        WeightNormalization(L.Dense(4), name="outer"),
        _Block(3, name="block"),
    ])
    _randomize(model)
    x = _inputs((4,))
    expected = keras.ops.convert_to_numpy(model(x))
    with pytest.warns(UserWarning, match=r"sequential/block/weight_normalization") as record:
        baked = bake_weight_norm(model)
    assert "outer" not in str(record[0].message)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(baked(x)), expected,
                               rtol=1e-5, atol=1e-5)
    kept = _wrappers(baked)
    assert len(kept) == 1 and kept[0] is baked.get_layer("block").dense
    np.testing.assert_array_equal(kept[0].g.numpy(), model.get_layer("block").dense.g.numpy())


def test_the_baked_model_round_trips_through_a_keras_file(tmp_path):
    inputs = keras.Input((6,))
    h = WeightNormalization(L.Dense(6, kernel_initializer=GoodInit("wn_linear")))(inputs)
    model = keras.Model(inputs, L.Dense(2)(h + inputs))
    x = _inputs((6,))
    baked = _check_baked(model, x)
    path = tmp_path / "baked.keras"
    baked.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), baked.predict(x, verbose=0))
    # No object of this package is left in the saved config.
    assert "keras_goodinit" not in str(keras.saving.serialize_keras_object(baked))


def test_mobilenet_with_its_convolutions_wrapped():
    source = keras.applications.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 3), include_top=True, classes=10)

    def wrap(layer):
        copy = layer.__class__.from_config(layer.get_config())
        if isinstance(copy, (L.Conv2D, L.DepthwiseConv2D)) and copy.kernel_size != (1, 1):
            return WeightNormalization(copy)
        return copy

    model = keras.models.clone_model(source, clone_function=wrap)
    assert len(_wrappers(model)) > 10
    _check_baked(model, _inputs((32, 32, 3), batch=2), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Quantized and data-initialized wrappers (issue 17).


def _quantized_dense(mode="int8"):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((16,)), WeightNormalization(L.Dense(8), name="wn")])
    _randomize(model)
    x = _inputs((16,), batch=32, seed=5)
    expected = keras.ops.convert_to_numpy(model(x))
    model.quantize(mode)
    return model, x, expected


def test_bake_of_an_int8_model_computes_what_the_quantized_model_computes():
    model, x, float_out = _quantized_dense()
    quantized = keras.ops.convert_to_numpy(model(x))
    weights = [np.array(w) for w in model.get_weights()]
    baked = bake_weight_norm(model)
    dense = baked.layers[0]
    assert type(dense) is L.Dense and dense.quantization_mode == "int8"
    got = keras.ops.convert_to_numpy(baked(x))
    # The same integer kernel and scales, the same ops: equal to float32 rounding of a
    # 16-term sum (16 eps of the output's size, however the backend orders it).
    eps = float(np.finfo("float32").eps)
    np.testing.assert_allclose(got, quantized, rtol=0, atol=16 * eps * np.abs(quantized).max())
    # And within int8's rounding of the float model: each kernel entry is off by at most
    # half a step 1/kernel_scale of its column, each input by half a step of its row
    # (abs-max scales: 127 / max|row|), so |x.w - x'.w'| <= |x|_1 / (2 ks) + |w'|_1 / (2 xs).
    wrapped = model.get_layer("wn").layer
    scale = keras.ops.convert_to_numpy(wrapped.kernel_scale).reshape(1, -1)
    kernel = keras.ops.convert_to_numpy(wrapped._kernel).astype("float64") / scale
    row_scale = 127.0 / np.abs(x).max(axis=1, keepdims=True)
    bound = (np.abs(x).sum(1, keepdims=True) / (2 * scale)
             + np.abs(kernel).sum(0, keepdims=True) / (2 * row_scale))
    assert np.all(np.abs(got - float_out) <= bound * (1 + 1e-3) + 1e-6), (
        np.abs(got - float_out).max(), bound.min())
    for old, new in zip(weights, model.get_weights(), strict=True):  # the original untouched
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("mode", ["int4", "float8"])
def test_bake_of_other_quantized_modes_keeps_the_outputs(mode):
    model, x, _ = _quantized_dense(mode)
    quantized = keras.ops.convert_to_numpy(model(x))
    baked = bake_weight_norm(model)
    assert baked.layers[0].quantization_mode == mode
    eps = float(np.finfo("float32").eps)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(baked(x)), quantized, rtol=0,
                               atol=16 * eps * np.abs(quantized).max())


def test_a_failed_bake_of_a_quantized_model_leaves_it_as_it_was(monkeypatch):
    model, x, _ = _quantized_dense()
    quantized = keras.ops.convert_to_numpy(model(x))
    weights = [np.array(w) for w in model.get_weights()]

    def broken(*args, **kwargs):
        raise TypeError("injected")

    monkeypatch.setattr(keras.saving, "deserialize_keras_object", broken)
    with pytest.raises(ValueError, match="injected.*Received: model="):
        bake_weight_norm(model)
    for old, new in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), quantized)


def test_a_quantized_wrapper_has_no_float_effective_kernel():
    model, _, _ = _quantized_dense()
    with pytest.raises(ValueError, match="'wn' is quantized \\(int8\\).*Received: layer="):
        model.get_layer("wn").normalized_kernel()


def test_bake_after_data_init_in_fit_keeps_the_outputs():
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        WeightNormalization(L.Conv2D(6, 3, activation="relu"), data_init=True, name="wn_conv"),
        L.Flatten(),
        WeightNormalization(L.Dense(4), data_init=True, name="wn_dense"),
    ])
    x = _inputs((8, 8, 3), batch=16) * 3.0 + 1.0
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(x, np.zeros((16, 4)), batch_size=16, epochs=2, verbose=0)
    assert all(bool(w.initialized.numpy()) for w in _wrappers(model))
    expected = keras.ops.convert_to_numpy(model(x))
    baked = bake_weight_norm(model)
    assert not _wrappers(baked)
    # The flag and the two shifts per wrapper go with the wrapper, as g does.
    assert len(baked.weights) == len(model.weights) - 2 * 4
    np.testing.assert_allclose(keras.ops.convert_to_numpy(baked(x)), expected,
                               rtol=1e-5, atol=1e-5)
