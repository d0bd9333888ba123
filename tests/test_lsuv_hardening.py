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


# ----------------------------------------------------------------------------
# 6. masked timesteps do not count


def test_masked_timesteps_do_not_count():
    inputs = keras.Input((12,), dtype="int32")
    h = L.Embedding(20, 6, mask_zero=True, name="embed")(inputs)
    h = L.Dense(16, name="d0")(h)
    model = keras.Model(inputs, L.Dense(4, name="out")(L.ReLU()(h)))
    rng = np.random.default_rng(4)
    lengths = rng.integers(2, 5, size=64)  # about 3 of 12 steps are real, the rest padding
    tokens = np.where(np.arange(12) < lengths[:, None], rng.integers(1, 20, (64, 12)), 0)
    # The padding token's embedding is no zero vector: make it large, so that counting
    # its (constant) outputs would move the statistics far from those of real steps.
    model.get_layer("embed").embeddings.assign(
        np.concatenate([np.full((1, 6), 30.0), rng.normal(size=(19, 6))]).astype("float32"))
    report = lsuv_init(model, tokens.astype("int32"), verbose=0)
    real = tokens != 0
    got = outputs_of(model, tokens.astype("int32"), ["d0", "out"])
    for name in ("d0", "out"):
        var = float(np.var(got[name][real]))
        assert report[name].status == "ok" and abs(var - 1.0) < 0.1, (name, var)
        assert var == pytest.approx(report[name].var_after, rel=MATCH)
    # Over all positions (padding included) the variance is far from 1.
    assert abs(float(np.var(got["d0"])) - 1.0) > 0.5


def test_weightnorm_data_init_uses_the_mask():
    inputs = keras.Input((10,), dtype="int32")
    h = L.Embedding(20, 6, mask_zero=True)(inputs)
    h = WeightNormalization(L.Dense(8), name="wn")(h)
    model = keras.Model(inputs, h)
    rng = np.random.default_rng(5)
    tokens = np.where(np.arange(10) < rng.integers(2, 6, size=(64, 1)),
                      rng.integers(1, 20, (64, 10)), 0).astype("int32")
    report = weightnorm_data_init(model, tokens, verbose=0)
    y = keras.ops.convert_to_numpy(model(tokens)).astype("float64")[tokens != 0]
    assert report["wn"].status == "ok"
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-5)  # float32 round-off
    np.testing.assert_allclose(y.std(axis=0), 1.0, rtol=1e-4)


# ----------------------------------------------------------------------------
# 11. any finite float32 input scale


@pytest.mark.parametrize("scale", [1e20, 1e-20])
@pytest.mark.parametrize("function", [lsuv_init, weightnorm_data_init])
def test_extreme_but_finite_input_scales(function, scale):
    # Separate ReLU layers: each named layer's output is its pre-activation.
    model = keras.Sequential([keras.Input((16,)),
                              WeightNormalization(L.Dense(16), name="wn0"), L.ReLU(),
                              L.Dense(16, name="d1"), L.ReLU(),
                              WeightNormalization(L.Dense(4), name="wn2")])
    x = normal((64, 16), 6, scale=scale)
    report = function(model, x, verbose=0)
    ours = [r for r in report.rows if r.reason != "not weight-normalized"]
    assert ours and all(r.status == "ok" for r in ours), report
    got = outputs_of(model, x, [r.name for r in ours])
    for row in ours:
        var = float(np.var(got[row.name]))
        assert var == pytest.approx(row.var_after, rel=MATCH), row.name
        # Unit variance: LSUV within tol; the data init exactly, to float32 round-off.
        assert abs(var - 1.0) < (0.1 if function is lsuv_init else 1e-4), (row.name, var)


# ----------------------------------------------------------------------------
# 7. every weight-bearing layer is in the report


class _LayerScale(L.Layer):
    """A per-channel learned scale (as in CaiT / ConvNeXt): weights, but no kernel."""

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.gamma


def test_layers_the_sweep_cannot_scale_are_listed_with_a_reason():
    inputs = keras.Input((6,), dtype="int32")
    h = L.Embedding(10, 8, name="embed")(inputs)
    h = L.GRU(8, return_sequences=True, name="gru")(h)
    h = L.LSTM(8, return_sequences=True, name="lstm")(h)
    h = _LayerScale(name="scale")(L.LayerNormalization(name="ln")(L.Dense(8, name="d")(h)))
    model = keras.Model(inputs, h)
    tokens = np.random.default_rng(7).integers(0, 10, (32, 6)).astype("int32")
    for function in (lsuv_init, weightnorm_data_init):
        report = function(model, tokens, verbose=0)
        rows = {r.name: r for r in report.rows}
        # lsuv_init fits the recurrent layers (their own rows) and rescales the embedding
        # table for the stream it starts (`embeddings=True`); the data init does neither.
        fitted = function is lsuv_init
        recurrent = ("gru", "lstm") if fitted else ("gru/gru_cell", "lstm/lstm_cell")
        assert set(rows) == {"d", "embed", "scale", *recurrent}, rows
        for name in ("scale", *(() if fitted else ("embed", *recurrent))):
            assert rows[name].status == "skipped" and rows[name].reason, rows[name]
        assert "_LayerScale" in rows["scale"].reason
        if fitted:
            assert rows["lstm"].status == rows["gru"].status == "ok", rows
            assert rows["embed"].status == "ok" and "stream" in rows["embed"].reason
        else:
            assert "embedding" in rows["embed"].reason
            assert "recurrent" in rows["lstm/lstm_cell"].reason


def test_a_layers_filter_lists_only_the_chosen_layers():
    inputs = keras.Input((6,), dtype="int32")
    h = L.Dense(8, name="d")(L.Embedding(10, 8)(inputs))
    model = keras.Model(inputs, h)
    report = lsuv_init(model, np.ones((8, 6), "int32"), layers=["d"], verbose=0)
    assert [r.name for r in report.rows] == ["d"]


# ----------------------------------------------------------------------------
# 8. quantized kernels are never touched; LoRA scales the effective kernel


@pytest.mark.parametrize("pre_init", [None, "orthogonal"])
def test_quantized_kernels_are_skipped_and_untouched(pre_init):
    model = keras.Sequential([keras.Input((8,)), L.Dense(16, name="a"), L.Dense(4, name="b")])
    x = normal((32, 8), 8)
    model(x)
    model.get_layer("a").quantize("int8")  # b stays float: it is still initialized
    before = values(model)
    report = lsuv_init(model, x, pre_init=pre_init, verbose=0)
    assert report["a"].status == "skipped" and "quantized" in report["a"].reason
    assert report["b"].status == "ok"
    a = model.get_layer("a")
    for variable, old in zip(model.variables, before):
        if any(variable is w for w in a.variables):
            assert np.array_equal(keras.ops.convert_to_numpy(variable.value), old)
    b = outputs_of(model, x, ["b"])["b"]
    assert abs(np.var(b) - 1.0) < 0.1


@pytest.mark.parametrize("pre_init", [None, "orthogonal"])
def test_lora_layers_are_scaled_through_their_effective_kernel(pre_init):
    model = keras.Sequential([keras.Input((8,)), L.Dense(16, name="a"), L.Dense(4, name="b")])
    x = normal((64, 8), 9)
    model(x)
    a = model.get_layer("a")
    a.enable_lora(2)
    # A trained-looking LoRA update: the effective kernel is far from the base kernel.
    a.lora_kernel_b.assign(normal((2, 16), 10, scale=3.0))
    lora_a = np.array(keras.ops.convert_to_numpy(a.lora_kernel_a))
    kernel, lora_b = (np.array(keras.ops.convert_to_numpy(v)) for v in (a._kernel,
                                                                        a.lora_kernel_b))
    report = lsuv_init(model, x, pre_init=pre_init, verbose=0)
    row = report["a"]
    var = float(np.var(outputs_of(model, x, ["a"])["a"]))
    assert row.status == "ok" and abs(var - 1.0) < 0.1, (row, var)
    assert var == pytest.approx(row.var_after, rel=MATCH)
    # c * (kernel + s A B) = c kernel + s A (c B): base and B scaled, A untouched,
    # and the pre-init did not re-draw the base kernel (it would not orthogonalize the sum).
    np.testing.assert_allclose(keras.ops.convert_to_numpy(a._kernel), kernel * row.scale,
                               rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(a.lora_kernel_b), lora_b * row.scale,
                               rtol=1e-6)
    assert np.array_equal(keras.ops.convert_to_numpy(a.lora_kernel_a), lora_a)
    if pre_init:
        assert "LoRA" in row.reason


# ----------------------------------------------------------------------------
# 12. duplicate layer names in nested models


def _block(name, scale):
    return keras.Sequential([keras.Input((16,)), L.Dense(16, name="dense"),
                             L.Rescaling(scale)], name=name)


def test_duplicate_names_in_nested_models_keep_separate_rows():
    inputs = keras.Input((16,))
    # Same layer name "dense" in both blocks; the second block's input is 10x larger.
    model = keras.Model(inputs, _block("second", 1.0)(_block("first", 10.0)(inputs)))
    rng = np.random.default_rng(11)
    batches = [(rng.normal(size=(128, 16)) * 3).astype("float32") for _ in range(6)]
    report = lsuv_init(model, iter(batches), new_batch_per_trial=True, verbose=0)
    assert [r.name for r in report.rows] == ["first/dense", "second/dense"]  # by path
    first, second = report.rows
    assert first.scale != pytest.approx(second.scale, rel=0.01)
    # Each row describes its own layer on the last batch drawn.
    last = batches[report.batches - 1]
    hidden = keras.ops.convert_to_numpy(model.get_layer("first")(last))
    for block, x, row in (("first", last, first), ("second", hidden, second)):
        dense = model.get_layer(block).get_layer("dense")
        var = float(np.var(keras.ops.convert_to_numpy(dense(x)).astype("float64")))
        assert var == pytest.approx(row.var_after, rel=MATCH), block
        assert abs(var - 1.0) < 0.1, block


# ----------------------------------------------------------------------------
# 9. TimeDistributed measures every step; traced calls are skipped, not crashed


def _time_model():
    inputs = keras.Input((5, 6))
    h = L.TimeDistributed(WeightNormalization(L.Dense(8), name="wn"), name="td")(inputs)
    return keras.Model(inputs, L.Dense(3, name="out")(h))


def _steps_of_different_scale():
    # Step t has std 1 + t: step 0 alone would set a scale 2-3x off for the rest.
    return (normal((64, 5, 6), 12) * (1.0 + np.arange(5))[None, :, None]).astype("float32")


@pytest.mark.parametrize("function", [lsuv_init, weightnorm_data_init])
def test_time_distributed_statistics_cover_every_step(function):
    model = _time_model()
    x = _steps_of_different_scale()
    report = function(model, x, verbose=0)
    row = report["wn"]
    y = outputs_of(model, x, ["td"])["td"]  # the real TimeDistributed, after the sweep
    assert row.status == "ok" and "called" not in row.reason, row
    assert float(np.var(y)) == pytest.approx(row.var_after, rel=MATCH)
    if function is lsuv_init:
        assert abs(float(np.var(y)) - 1.0) < 0.1
    else:  # per unit over batch and time, to float32 round-off
        np.testing.assert_allclose(y.reshape(-1, 8).std(axis=0), 1.0, rtol=1e-4)
        np.testing.assert_allclose(y.reshape(-1, 8).mean(axis=0), 0.0, atol=1e-5)
    assert float(np.var(y[:, 0])) < 0.5  # step 0 alone is not what was normalized


class _PerSample(L.Layer):
    """Applies a Dense to each sample inside keras.ops.vectorized_map (traced by TF)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(8, name="inner")

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, x):
        return keras.ops.vectorized_map(lambda sample: self.dense(sample[None])[0], x)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 8)


def test_targets_inside_vectorized_map_are_skipped_with_a_reason():
    inputs = keras.Input((6,))
    h = _PerSample(name="per_sample")(L.Dense(6, name="first")(inputs))
    model = keras.Model(inputs, L.Dense(2, name="out")(h))
    x = normal((32, 6), 13)
    model(x)
    inner = model.get_layer("per_sample").dense
    before = np.array(keras.ops.convert_to_numpy(inner.kernel))
    report = lsuv_init(model, x, pre_init=None, verbose=0)
    row = report["inner"]
    assert row.status == "skipped" and "traced" in row.reason
    assert np.array_equal(keras.ops.convert_to_numpy(inner.kernel), before)
    # The layers the sweep could measure are initialized on the real signal.
    got = outputs_of(model, x, ["first", "out"])
    for name in ("first", "out"):
        assert report[name].status == "ok" and abs(np.var(got[name]) - 1.0) < 0.1


# ----------------------------------------------------------------------------
# 13. the orthogonal pre-init is orthogonal over each kernel's true fan-in


def _singular_values(matrix):
    return np.linalg.svd(np.asarray(matrix, "float64"), compute_uv=False)


def test_orthogonal_pre_init_of_einsum_query_kernels():
    inputs = keras.Input((10, 32))
    # A multi-head query projection: kernel (32, heads=4, head_dim=8), fan-in the 32 axis.
    q = L.EinsumDense("abc,cde->abde", output_shape=(None, 4, 8), bias_axes="de",
                      name="query")(inputs)
    # Output axes before the fan-in axis in the kernel: (heads, 32, head_dim).
    k = L.EinsumDense("abc,dce->abde", output_shape=(None, 4, 8), name="key")(inputs)
    model = keras.Model(inputs, [q, k])
    x = normal((16, 10, 32), 14)
    report = lsuv_init(model, x, seed=3, verbose=0)
    assert all(r.status == "ok" for r in report.rows), report
    query = keras.ops.convert_to_numpy(model.get_layer("query").kernel).reshape(32, 32)
    key = np.transpose(keras.ops.convert_to_numpy(model.get_layer("key").kernel),
                       (1, 0, 2)).reshape(32, 32)
    for name, matrix in (("query", query), ("key", key)):
        sv = _singular_values(matrix)
        # Square and orthogonal, then one scalar LSUV scale: every singular value equal,
        # to float32 round-off of a QR (a few eps times the dimension).
        assert sv.max() / sv.min() < 1 + 1e-4, (name, sv.max() / sv.min())


def test_orthogonal_pre_init_of_grouped_convolutions():
    inputs = keras.Input((8, 8, 8))
    # Kernel (3, 3, 2, 16): 4 groups of 4 units over a fan-in of 3*3*2 = 18; then a 1x1
    # one, kernel (1, 1, 4, 8): 4 groups of 2 units over a fan-in of 4. Over the whole
    # kernel 8 units cannot be orthonormal in 4 dimensions; within each group they can.
    h = L.Conv2D(16, 3, groups=4, padding="same", name="grouped")(inputs)
    h = L.Conv2D(8, 1, groups=4, name="grouped_1x1")(h)
    model = keras.Model(inputs, h)
    report = lsuv_init(model, normal((16, 8, 8, 8), 15), seed=4, verbose=0)
    for name, fan_in, units in (("grouped", 18, 4), ("grouped_1x1", 4, 2)):
        assert report[name].status == "ok"
        kernel = keras.ops.convert_to_numpy(model.get_layer(name).kernel)
        for group in range(4):
            block = kernel[..., group * units:(group + 1) * units].reshape(fan_in, units)
            sv = _singular_values(block)
            assert sv.max() / sv.min() < 1 + 1e-4, (name, group, sv)


# ----------------------------------------------------------------------------
# Issue 17: a constraint undoes the scale at the first step; the report says so.


def test_a_constrained_target_is_noted_and_its_row_still_says_what_was_done():
    model = keras.Sequential([
        keras.Input((16,)),
        L.Dense(32, kernel_constraint=keras.constraints.UnitNorm(axis=0), name="unit"),
        L.Dense(4, name="free"),
    ])
    x = normal((64, 16), scale=3.0)
    rows = {row.name: row for row in lsuv_init(model, x, verbose=0).rows}
    assert rows["unit"].status == "ok" and rows["unit"].iterations >= 1
    assert "UnitNorm" in rows["unit"].reason and "undo" in rows["unit"].reason
    assert "constrained" not in rows["free"].reason
    # What the note warns of: one step at learning rate 0 sets the unit norms back to 1.
    model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=False)
    model.fit(x, np.zeros((64, 4), "float32"), batch_size=64, epochs=1, verbose=0)
    norms = np.linalg.norm(model.get_layer("unit").kernel.numpy(), axis=0)
    # float32 normalization of a 16-term column: a few ulps.
    np.testing.assert_allclose(norms, 1.0, rtol=16 * np.finfo("float32").eps)
