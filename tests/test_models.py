import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from keras_goodinit import WeightNormalization, models  # noqa: E402

TINY = {
    # builder: (input_shape, kwargs) small enough to build in well under a second
    "mlp": (models.wn_mlp, (4, 4, 1), {"depth": 2, "width": 8}),
    "cnn": (models.wn_cnn, (8, 8, 1), {"depth": 3, "width": 4}),
    "resnet": (models.wn_resnet, (8, 8, 2), {"num_blocks": 2, "width": 4}),
    "wrn": (models.wn_wide_resnet, (8, 8, 2), {"n": 1, "k": 2}),
}
WEIGHTED = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D)


def build(kind, **common):
    builder, input_shape, kwargs = TINY[kind]
    return builder(input_shape, 3, **kwargs, **common)


def weighted_layers(model):
    """Conv/Dense layers of the model (the wrapper where there is one), classifier included."""
    return [layer for layer in model.layers
            if isinstance(layer, WeightNormalization) or isinstance(layer, WEIGHTED)]


def kernel_of(layer):
    return np.asarray(layer.v if isinstance(layer, WeightNormalization) else layer.kernel)


def column_norms(kernel):
    return np.sqrt(np.sum(np.square(kernel), axis=tuple(range(kernel.ndim - 1))))


def initial_g(layer):
    """Per-unit scale at init: `g` of a wrapped layer, the kernel's column norms otherwise."""
    if isinstance(layer, WeightNormalization):
        return np.asarray(layer.g)
    return column_norms(kernel_of(layer))


def expected_gamma(name, num_blocks):
    """The gamma each layer should get (2 before a ReLU, 1 linear, 1/N residual), from its name."""
    if name in ("stem", "classifier") or name.endswith("_shortcut"):
        return 1.0
    if name.endswith("_conv2"):
        return 1.0 / num_blocks
    return 2.0


def is_relu_after_add(model):
    """True if any ReLU layer reads the output of an Add layer."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.ReLU):
            source = layer.input._keras_history.operation
            if isinstance(source, keras.layers.Add):
                return True
    return False


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("weight_norm", [True, False])
@pytest.mark.parametrize("init", models.INITS)
@pytest.mark.parametrize("kind", list(TINY))
def test_every_builder_and_init_builds_and_predicts(kind, init, weight_norm, batch_norm):
    model = build(kind, init=init, weight_norm=weight_norm, batch_norm=batch_norm, seed=1)
    input_shape = TINY[kind][1]
    logits = keras.ops.convert_to_numpy(
        model(np.random.default_rng(0).normal(size=(2, *input_shape)).astype("float32")))
    assert logits.shape == (2, 3)
    assert np.all(np.isfinite(logits))
    assert np.std(logits) > 0

    classifier = model.get_layer("classifier")
    assert type(classifier) is keras.layers.Dense
    assert classifier.activation is keras.activations.linear  # logits, no softmax
    hidden = [layer for layer in weighted_layers(model) if layer is not classifier]
    assert hidden and all(isinstance(layer, WeightNormalization) == weight_norm
                          for layer in hidden)
    batch_norms = [layer for layer in model.layers
                   if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(batch_norms) == (len(hidden) if batch_norm else 0)

    num_blocks = TINY[kind][2].get("num_blocks", TINY[kind][2].get("n"))
    for layer in weighted_layers(model):
        g = initial_g(layer)
        if isinstance(layer, WeightNormalization):
            # The wrapper starts at g = ||v_j||: the bare layer's function.
            np.testing.assert_allclose(g, column_norms(kernel_of(layer)), rtol=1e-5)
        if init.endswith("_proposed"):
            fan_in, fan_out = kernel_of(layer).shape[-2:]
            expected = math.sqrt(expected_gamma(layer.name, num_blocks) * fan_in / fan_out)
            np.testing.assert_allclose(g, expected, rtol=1e-5, err_msg=layer.name)
        elif isinstance(layer, WeightNormalization):
            np.testing.assert_allclose(g, 1.0, rtol=1e-5, err_msg=layer.name)  # default WN


@pytest.fixture(scope="module")
def wrn_40_10():
    return models.wn_wide_resnet((32, 32, 3), 10, n=6, k=10, init="orthogonal_proposed", seed=0)


def test_wrn_40_10_initial_g_matches_theory(wrn_40_10):
    expected = {
        "stem": math.sqrt(3 / 16),                 # 3 -> 16, gamma 1
        "stage1_block1_conv1": math.sqrt(2 * 16 / 160),
        "stage1_block1_shortcut": math.sqrt(16 / 160),
        "stage2_block1_conv1": 1.0,                # 160 -> 320, gamma 2
        "stage2_block1_shortcut": math.sqrt(0.5),
        "stage3_block1_conv1": 1.0,                # 320 -> 640, gamma 2
        "stage3_block1_shortcut": math.sqrt(0.5),
        "classifier": math.sqrt(640 / 10),
    }
    for stage in (1, 2, 3):
        for block in range(1, 7):
            expected[f"stage{stage}_block{block}_conv2"] = math.sqrt(1 / 6)
            if block > 1:
                expected[f"stage{stage}_block{block}_conv1"] = math.sqrt(2)
    assert len(weighted_layers(wrn_40_10)) == len(expected) == 1 + 36 + 3 + 1
    for name, value in expected.items():
        g = initial_g(wrn_40_10.get_layer(name))
        np.testing.assert_allclose(g, value, atol=1e-4, err_msg=name)
    assert wrn_40_10.name == "wrn_40_10"
    assert wrn_40_10.get_layer("stage3_block6_conv2").g.shape == (640,)
    assert not is_relu_after_add(wrn_40_10)


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_resnet_depth_and_structure(num_blocks):
    model = models.wn_resnet((16, 16, 3), 10, num_blocks=num_blocks, width=4, seed=0)
    layers = weighted_layers(model)
    main_path = [layer for layer in layers if not layer.name.endswith("_shortcut")]
    assert len(main_path) == 6 * num_blocks + 2
    assert model.name == f"wn_resnet_{6 * num_blocks + 2}"
    # Projections only where the shape changes: the first block of stages 2 and 3.
    assert sorted(layer.name for layer in layers if layer.name.endswith("_shortcut")) == [
        "stage2_block1_shortcut", "stage3_block1_shortcut"]
    assert len([layer for layer in model.layers if isinstance(layer, keras.layers.Add)]) == (
        3 * num_blocks)
    assert not is_relu_after_add(model)
    # The stem has no ReLU after it either.
    assert not any(layer.name.startswith("stem") and isinstance(layer, keras.layers.ReLU)
                   for layer in model.layers)
    # Widths and strides: 16x16x4 -> 8x8x8 -> 4x4x16.
    assert model.get_layer("stage1_block1_add").output.shape == (None, 16, 16, 4)
    assert model.get_layer("stage2_block1_add").output.shape == (None, 8, 8, 8)
    assert model.get_layer("stage3_block1_add").output.shape == (None, 4, 4, 16)


def test_cnn_strides_and_1d_inputs():
    model = models.wn_cnn((16, 16, 3), 5, depth=4, width=6, seed=0)
    assert model.get_layer("conv2_relu").output.shape == (None, 4, 4, 6)
    assert model.get_layer("conv4_relu").output.shape == (None, 4, 4, 6)
    model_1d = models.wn_cnn((40, 1), 10, depth=3, width=4, seed=0)
    assert isinstance(model_1d.get_layer("conv1").layer, keras.layers.Conv1D)
    assert model_1d.get_layer("conv3_relu").output.shape == (None, 10, 4)
    resnet_1d = models.wn_resnet((40, 1), 10, num_blocks=1, width=4)
    assert keras.ops.convert_to_numpy(resnet_1d(np.ones((2, 40, 1)))).shape == (2, 10)


def test_mlp_flattens_and_has_depth_hidden_layers():
    model = models.wn_mlp((28, 28, 1), 10, depth=5, width=16, seed=0)
    assert len(weighted_layers(model)) == 6
    assert model.get_layer("dense1").v.shape == (784, 16)
    flat = models.wn_mlp((20,), 10, depth=1, width=16, seed=0)
    assert not any(isinstance(layer, keras.layers.Flatten) for layer in flat.layers)


@pytest.mark.parametrize("init, weight_norm", [
    ("orthogonal_proposed", True), ("he_proposed", False), ("he", False), ("orthogonal", True)])
def test_int_seed_reproducible_and_layers_differ(init, weight_norm):
    kwargs = {"init": init, "weight_norm": weight_norm}
    first = models.wn_resnet((8, 8, 1), 10, num_blocks=2, width=4, seed=7, **kwargs)
    second = models.wn_resnet((8, 8, 1), 10, num_blocks=2, width=4, seed=7, **kwargs)
    other = models.wn_resnet((8, 8, 1), 10, num_blocks=2, width=4, seed=8, **kwargs)
    for a, b, c in zip(first.get_weights(), second.get_weights(), other.get_weights(),
                       strict=True):
        np.testing.assert_array_equal(a, b)
        if a.ndim >= 2:
            assert not np.array_equal(a, c)
    kernels = [kernel_of(layer) for layer in weighted_layers(first)]
    for i, a in enumerate(kernels):
        for b in kernels[i + 1:]:
            if a.shape == b.shape:
                assert not np.allclose(a, b)


@pytest.mark.parametrize("init", ["orthogonal_proposed", "he"])
def test_seed_none_gives_fresh_kernels(init):
    first = models.wn_cnn((8, 8, 1), 3, depth=3, width=4, init=init, weight_norm=False)
    second = models.wn_cnn((8, 8, 1), 3, depth=3, width=4, init=init, weight_norm=False)
    for a, b in zip(weighted_layers(first), weighted_layers(second), strict=True):
        assert not np.allclose(kernel_of(a), kernel_of(b))


def test_saved_model_round_trip(tmp_path):
    model = models.wn_resnet((8, 8, 1), 4, num_blocks=1, width=4, batch_norm=True, seed=3)
    path = str(tmp_path / "resnet.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: models.wn_mlp((4,), 2, 2, init="foo"), "Received: init='foo'"),
    (lambda: models.wn_mlp((4,), 2, depth=0), "Received: depth=0"),
    (lambda: models.wn_mlp((4,), 2, depth=2.0), "Received: depth=2.0"),
    (lambda: models.wn_mlp((4,), 2, depth=True), "Received: depth=True"),
    (lambda: models.wn_mlp((4,), 2, 2, width=-3), "Received: width=-3"),
    (lambda: models.wn_mlp((4,), 0, 2), "Received: num_classes=0"),
    (lambda: models.wn_mlp((), 2, 2), r"Received: input_shape=\(\)"),
    (lambda: models.wn_mlp("28x28", 2, 2), "Received: input_shape='28x28'"),
    (lambda: models.wn_cnn((28, 28), 2, 2, seed="a"), "Received: seed='a'"),
    (lambda: models.wn_cnn((8, 8, 1, 1), 2, 2), r"Received: input_shape=\(8, 8, 1, 1\)"),
    (lambda: models.wn_cnn((8, 0, 1), 2, 2), r"Received: input_shape=\(8, 0, 1\)"),
    (lambda: models.wn_cnn((8, 8, 1), 2, 2, weight_norm="yes"), "Received: weight_norm='yes'"),
    (lambda: models.wn_resnet((8, 8, 1), 2, num_blocks=0), "Received: num_blocks=0"),
    (lambda: models.wn_resnet((8, 8, 1), 2, 1, batch_norm=1), "Received: batch_norm=1"),
    (lambda: models.wn_wide_resnet((8, 8, 1), 2, n=2, k=0), "Received: k=0"),
    (lambda: models.wn_wide_resnet((8, 8, 1), 2, n=None, k=2), "Received: n=None"),
])
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# NumPy scalars and the shared validators ---------------------------------------------------------

def test_numpy_scalars_build_the_same_model_as_python_ints():
    from_numpy = models.wn_resnet((np.int64(8), np.int32(8), np.int64(2)), np.int64(3),
                                  num_blocks=np.int64(1), width=np.int16(4),
                                  weight_norm=np.bool_(True), batch_norm=np.bool_(False),
                                  seed=np.int64(7))
    from_python = models.wn_resnet((8, 8, 2), 3, num_blocks=1, width=4, seed=7)
    assert from_numpy.name == from_python.name == "wn_resnet_8"
    for a, b in zip(from_numpy.get_weights(), from_python.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    mlp = models.wn_mlp([np.int64(6)], 2, np.int64(2), width=np.int64(5), seed=np.int64(1))
    assert mlp.input_shape == (None, 6) and mlp.get_layer("dense2").output.shape == (None, 5)


@pytest.mark.parametrize("call, match", [
    (lambda: models.wn_mlp((4,), 2, 2, seed=-1), "Received: seed=-1"),
    (lambda: models.wn_mlp((4,), 2, 2, seed=np.int64(-5)), "Received: seed=-5"),
    (lambda: models.wn_mlp((4,), 2, 2, seed=2.0), "Received: seed=2.0"),
    (lambda: models.wn_mlp((4.0,), 2, 2), r"Received: input_shape=\(4.0,\)"),
    (lambda: models.wn_mlp((2.5, 3), 2, 2), r"Received: input_shape=\(2.5, 3\)"),
    (lambda: models.wn_mlp((4,), np.float64(2.0), 2), r"Received: num_classes=np.float64"),
    (lambda: models.wn_cnn((8, 8, 1), 2, np.int64(0)), "Received: depth=0"),
    (lambda: models.wn_cnn((8, 8, 1), 2, 2, weight_norm=np.int64(1)),
     r"Received: weight_norm=np.int64\(1\)"),
])
def test_bad_numpy_and_float_arguments_name_argument_and_value(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert str(info.value).startswith("Argument `")


def test_propagation_accepts_numpy_scalars_and_names_bad_ones():
    from keras_goodinit.propagation import mlp_chain, norm_ratios, residual_chain

    chain = mlp_chain(np.array([6, 5, 4]), proposed=np.bool_(True), seed=np.int64(3))
    assert [tuple(o.shape) for o in chain.outputs] == [(None, 5), (None, 4)]
    residual = residual_chain(np.int64(6), np.int32(4), np.int64(2), seed=np.uint8(1))
    assert len(residual.outputs) == 2
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    forward, backward = norm_ratios(chain, x, seed=np.int64(2))
    assert forward[0] == 1.0 and backward[-1] == 1.0 and forward.shape == (3,)
    for call, match in [
        (lambda: mlp_chain([6, 2.5]), r"Received: widths=\[6, 2.5\]"),
        (lambda: mlp_chain([6, 4], seed=np.int64(-1)), "Received: seed=-1"),
        (lambda: residual_chain(6, 4.0, 2), "Received: branch_width=4.0"),
        (lambda: norm_ratios(chain, x, seed=-1), "Received: seed=-1"),
        (lambda: norm_ratios(chain, x, seed=None), "Received: seed=None"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
