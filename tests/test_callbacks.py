"""`LSUVCallback` never initializes over weights that were trained, set or loaded.

The optimizer's step count misses every path where the weights arrive without
their optimizer: `set_weights`, `clone_model` + `set_weights`, a `.keras` file of
a model trained in a custom loop, a `.weights.h5` loaded before the optimizer is
built, `load_model(compile=False)` + a new `compile`. The callback recognizes
them because the weights are no longer what the layers' own initializers draw.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from _training import Peek, frozen_body_trained_head, same, values  # noqa: E402
from keras import layers as L  # noqa: E402

from keras_goodinit import GoodInit, LSUVCallback, WeightNormalization, lsuv_init  # noqa: E402
from keras_goodinit._freshness import first_changed, verify  # noqa: E402
from keras_goodinit.lsuv import written_targets  # noqa: E402

X = np.random.default_rng(0).normal(size=(64, 16)).astype("float32") * 3.0
Y = np.random.default_rng(1).normal(size=(64, 4)).astype("float32")
CHANGED = "not what its initializer drew"


def mlp(seed=0, kernel_initializer="glorot_uniform", use_bias=True, compile=True):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((16,)),
        L.Dense(32, activation="relu", kernel_initializer=kernel_initializer,
                use_bias=use_bias, name="hidden"),
        L.Dense(4, kernel_initializer=kernel_initializer, use_bias=use_bias, name="out"),
    ], name="mlp")
    if compile:
        _compile(model)
    return model


def _compile(model):
    # Momentum gives the optimizer variables that a not-yet-built one cannot load.
    model.compile(keras.optimizers.SGD(0.05, momentum=0.5), "mse", jit_compile=False)
    return model


def fit_with_callback(model, **kwargs):
    init, peek = LSUVCallback(X[:32], verbose=0, **kwargs), Peek()
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=[init, peek])
    return init, peek


def trained_mlp(**kwargs):
    model = mlp(**kwargs)
    model.fit(X, Y, batch_size=16, epochs=2, verbose=0)
    return model


def assert_stood_down(init, peek, trained, steps=0):
    assert init.report is None
    assert CHANGED in init.reason
    assert peek.steps == steps  # the step count alone would have let it run
    assert same(peek.weights, trained)


# ----------------------------------------------------------------------------
# The paths the step count misses.


def test_set_weights_of_trained_weights_into_a_fresh_model():
    trained = values(trained_mlp())
    model = mlp(seed=1)
    model.set_weights(trained)
    assert_stood_down(*fit_with_callback(model), trained)


def test_clone_model_and_set_weights():
    source = trained_mlp()
    trained = values(source)
    clone = keras.models.clone_model(source)
    clone.set_weights(trained)
    _compile(clone)
    assert_stood_down(*fit_with_callback(clone), trained)


def test_clone_model_without_set_weights_is_fresh():
    clone = _compile(keras.models.clone_model(trained_mlp()))
    init, _ = fit_with_callback(clone)
    assert init.reason is None and init.report.ok


def test_keras_file_of_a_model_trained_in_a_custom_loop(tmp_path):
    model = mlp(compile=False)
    optimizer = keras.optimizers.SGD(0.05)  # not the model's: nothing records the steps
    for _ in range(10):
        with tf.GradientTape() as tape:
            loss = keras.ops.mean(keras.ops.square(model(X) - Y))
        optimizer.apply(tape.gradient(loss, model.trainable_variables),
                        model.trainable_variables)
    trained = values(model)
    model.save(tmp_path / "custom.keras")
    loaded = _compile(keras.saving.load_model(tmp_path / "custom.keras"))
    assert same(values(loaded), trained)
    assert_stood_down(*fit_with_callback(loaded), trained)


def test_weights_h5_loaded_before_the_optimizer_is_built(tmp_path):
    source = trained_mlp()
    trained = values(source)
    source.save_weights(tmp_path / "ckpt.weights.h5")
    model = mlp(seed=1)
    model.load_weights(tmp_path / "ckpt.weights.h5")
    assert same(values(model), trained)
    assert_stood_down(*fit_with_callback(model), trained)


def test_load_model_compile_false_then_a_new_compile(tmp_path):
    source = trained_mlp()
    trained = values(source)
    source.save(tmp_path / "ckpt.keras")
    model = _compile(keras.saving.load_model(tmp_path / "ckpt.keras", compile=False))
    assert_stood_down(*fit_with_callback(model, method="weightnorm_data_init"), trained)


def test_a_model_initialized_by_lsuv_init_directly():
    model = mlp()
    lsuv_init(model, X[:32], verbose=0)
    initialized = values(model)
    assert_stood_down(*fit_with_callback(model), initialized)


def test_one_slightly_changed_kernel_is_enough():
    model = mlp()
    kernel = model.get_layer("out").kernel
    kernel.assign(kernel.numpy() * (1 + 1e-4))
    assert first_changed(model)[0] == kernel.path
    init, _ = fit_with_callback(model)
    assert init.report is None and kernel.path in init.reason


# ----------------------------------------------------------------------------
# Fresh models are still initialized, and force=True still forces.


def test_fresh_model_with_builtin_initializers_is_initialized():
    model = mlp()
    built = values(model)
    init, peek = fit_with_callback(model)
    assert init.reason is None and init.report is not None and init.report.ok
    assert not same(peek.weights, built)


def test_fresh_model_with_unseeded_goodinit_kernels_and_zero_biases():
    model = mlp(kernel_initializer=GoodInit("wn_relu"))
    assert first_changed(model) == (None, 2)  # the two zero biases; the kernels cannot tell
    init, peek = fit_with_callback(model)
    assert init.reason is None and init.report.ok


def test_unseeded_goodinit_kernels_the_biases_reveal_set_weights():
    trained = values(trained_mlp(kernel_initializer=GoodInit("wn_relu")))
    model = mlp(seed=1, kernel_initializer=GoodInit("wn_relu"))
    model.set_weights(trained)
    assert first_changed(model)[0].endswith("bias")
    assert_stood_down(*fit_with_callback(model), trained)


def test_weight_normalization_g_reveals_set_weights_without_biases():
    def build(seed):
        keras.utils.set_random_seed(seed)
        return _compile(keras.Sequential([
            keras.Input((16,)),
            WeightNormalization(L.Dense(32, activation="relu", use_bias=False,
                                        kernel_initializer=GoodInit("wn_relu")), name="wn"),
            WeightNormalization(L.Dense(4, use_bias=False,
                                        kernel_initializer=GoodInit("wn_relu")), name="wn_out"),
        ]))

    fresh = build(0)
    assert first_changed(fresh) == (None, 2)  # only g = ||v|| can be checked
    init, _ = fit_with_callback(fresh, method="weightnorm_data_init")
    assert init.report is not None
    fresh.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    trained = values(fresh)
    model = build(1)
    model.set_weights(trained)
    assert_stood_down(*fit_with_callback(model), trained)


def test_no_checkable_weight_stands_down_unless_forced_then_the_mark_stops_it():
    # Issue 17: nothing tells these kernels from trained ones, so the callback must not
    # call them fresh (it used to judge them by the step count and the mark alone).
    model = mlp(kernel_initializer=GoodInit("wn_relu"), use_bias=False)
    assert first_changed(model) == (None, 0)
    built = values(model)
    refused, peek = fit_with_callback(model)
    assert refused.report is None and "['hidden', 'out']" in refused.reason
    assert same(peek.weights, built)
    _compile(model)
    init, _ = fit_with_callback(model, force=True)
    assert init.report is not None and init.report.ok
    # Recompiled (steps back at 0): the mark set by the first run still stops a second one.
    _compile(model)
    again, _ = fit_with_callback(model)
    assert again.report is None and "already initialized" in again.reason


def test_force_true_reinitializes_weights_that_were_set():
    trained = values(trained_mlp())
    model = mlp(seed=1)
    model.set_weights(trained)
    init, peek = fit_with_callback(model, force=True)
    assert init.reason is None and init.report is not None and init.report.ok
    assert not same(peek.weights, trained)


def test_mixed_precision_fresh_and_set():
    keras.config.set_dtype_policy("mixed_float16")
    model = mlp()
    assert first_changed(model) == (None, 4)
    init, _ = fit_with_callback(model)
    assert init.report is not None
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    trained = values(model)
    twin = mlp(seed=1)
    twin.set_weights(trained)
    assert_stood_down(*fit_with_callback(twin), trained)


def test_fresh_layers_of_many_kinds_match_their_initializers():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, kernel_initializer="he_normal")(inputs)
    x = L.BatchNormalization()(x)
    x = L.DepthwiseConv2D(3, depthwise_initializer="orthogonal")(x)
    x = L.SeparableConv2D(4, 1, depthwise_initializer=keras.initializers.RandomNormal(seed=5),
                          pointwise_initializer=GoodInit("wn_relu", seed=2))(x)
    x = L.LayerNormalization()(x)
    x = L.Reshape((4 * 4, 4))(x)
    x = L.LSTM(5, return_sequences=True)(x)  # unit_forget_bias: its bias is not checked
    x = L.MultiHeadAttention(2, 3)(x, x)
    x = L.GRU(3)(x)
    model = keras.Model(inputs, L.Dense(2, kernel_initializer="lecun_uniform")(x))
    changed, checked = first_changed(model)
    assert changed is None
    # Every weight but the LSTM bias and the 4 attention kernels (both drawn by their
    # layers' build from something other than the initializer attribute).
    assert checked == len(model.weights) - 5
    model.get_layer(index=-1).bias.assign([0.0, 1e-3])
    assert first_changed(model)[0] == model.get_layer(index=-1).bias.path


def test_a_subclass_that_overrides_build_cannot_tell():
    class Scaled(L.Dense):
        def build(self, input_shape):
            super().build(input_shape)
            self.kernel.assign(self.kernel * 2.0)  # no longer what kernel_initializer drew

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), Scaled(8), L.Dense(4)])
    assert first_changed(model) == (None, 2)  # the plain Dense only


def test_seed_generator_seeds_cannot_tell():
    seeded = keras.initializers.HeNormal(seed=keras.random.SeedGenerator(0))
    model = mlp(kernel_initializer=seeded)
    assert first_changed(model) == (None, 2)  # the biases only


# ----------------------------------------------------------------------------
# Arguments are checked when the callback is made, not inside fit.


@pytest.mark.parametrize("kwargs, message", [
    ({"force": "False"}, "Received: force='False'"),
    ({"force": 1}, "Received: force=1"),
    ({"verbose": 3}, "Received: verbose=3"),
    ({"verbose": "1"}, "Received: verbose='1'"),
    ({"method": "LSUV"}, "Received: method='LSUV'"),
    ({"method": "weightnorm_data_init", "tol": 0.1}, "Unknown keyword arguments"),
    ({"tol": -1.0}, "Received: tol=-1.0"),
    ({"max_iter": 2.5}, "Received: max_iter=2.5"),
])
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LSUVCallback(X[:32], **kwargs)


def test_bool_verbose_is_accepted_as_keras_does():
    callback = LSUVCallback(X[:32], force=True, verbose=False)
    assert callback.force is True and callback.verbose == 0


def test_the_message_says_why_and_mentions_force(capsys):
    trained = values(trained_mlp())
    model = mlp(seed=1)
    model.set_weights(trained)
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0,
              callbacks=[LSUVCallback(X[:32], verbose=1)])
    printed = capsys.readouterr().out
    assert "not re-initializing 'mlp'" in printed
    assert "set_weights" in printed and "force=True" in printed


# ----------------------------------------------------------------------------
# Issue 17: judged on the layers the init would overwrite; every dtype; force resets.


def _frozen_body_trained_head():
    return frozen_body_trained_head(X, Y, epochs=5, learning_rate_after=1e-2, jit_compile=False)


def test_a_trained_head_that_cannot_be_checked_is_not_redrawn_for_a_fresh_body(capsys):
    model = _frozen_body_trained_head()
    trained = values(model)
    assert first_changed(model) == (None, 4)  # the body is fresh: its weights say nothing
    init, peek = LSUVCallback(X[:32], verbose=1), Peek()
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=[init, peek])
    assert init.report is None and "['head']" in init.reason
    assert same(peek.weights, trained)
    printed = capsys.readouterr().out
    assert "'head'" in printed and "force=True" in printed and "seed" in printed


def test_layers_limits_the_layers_judged():
    # Only the body is to be initialized: the head, which it would not touch, does not count.
    model = _frozen_body_trained_head()
    trained = values(model)
    init, peek = fit_with_callback(model, layers=["body_dense"])
    assert init.reason is None and [row.name for row in init.report.rows] == ["body/body_dense"]
    assert np.array_equal(peek.weights[-1], trained[-1])  # the head's kernel
    assert not np.array_equal(peek.weights[2], trained[2])  # the body's kernel


@pytest.mark.parametrize("policy", ["float16", "bfloat16", "float64", "mixed_float16",
                                    "mixed_bfloat16"])
def test_fresh_weights_match_in_every_dtype_and_a_few_ulps_more_do_not(policy):
    # Issue 17: the re-draw ran in float32 whatever the variables' dtype, so every fresh
    # float16, bfloat16 or float64 model looked "set or loaded".
    keras.config.set_dtype_policy(policy)
    model = mlp(compile=False)
    assert first_changed(model) == (None, 4)
    kernel = model.get_layer("out").kernel
    value = kernel.numpy().astype("float64")
    eps = float(np.finfo(value.dtype).eps) if policy == "float64" else {
        "float16": 2.0**-10, "bfloat16": 2.0**-7}.get(policy, 2.0**-23)
    # 8 ulps of the largest entry: rounded to the dtype it is still above the 4-ulp bound.
    value[0, 0] += 8 * eps * np.abs(value).max()
    kernel.assign(value.astype(kernel.dtype))
    assert first_changed(model)[0] == kernel.path


@pytest.mark.parametrize("policy", ["float16", "float64"])
def test_the_callback_initializes_a_fresh_model_in_that_dtype(policy):
    keras.config.set_dtype_policy(policy)
    init, _ = fit_with_callback(mlp())
    assert init.reason is None and init.report is not None


def test_force_true_resets_the_optimizers_steps_and_moments():
    model = mlp()
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    model.fit(X, Y, batch_size=16, epochs=2, verbose=0)
    optimizer = model.optimizer
    assert int(optimizer.iterations.numpy()) == 8
    seen = {}

    class FirstStep(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                seen["steps"] = int(optimizer.iterations.numpy())
                seen["slots"] = [np.abs(v.numpy()).max() for v in optimizer.variables
                                 if v is not optimizer.iterations
                                 and v is not optimizer._learning_rate]
                seen["learning_rate"] = float(optimizer.learning_rate.numpy())

    init = LSUVCallback(X[:32], force=True, verbose=0)
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=[init, FirstStep()])
    assert init.report is not None
    assert seen["steps"] == 0 and max(seen["slots"]) == 0.0
    assert seen["learning_rate"] == pytest.approx(1e-2)


# ----------------------------------------------------------------------------
# Recurrent layers: the init overwrites them too, so the check covers them.

SEQ = np.random.default_rng(2).normal(size=(32, 6, 16)).astype("float32")


def _recurrent_model(seed, recurrent, body_trainable=True):
    keras.utils.set_random_seed(seed)
    body = L.Dense(16, name="body_dense", trainable=body_trainable)
    model = keras.Sequential([keras.Input((6, 16)), body, recurrent], name="seq")
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    return model


def _fit_sequences(model, callbacks=()):
    model.fit(SEQ, Y[:32], batch_size=16, epochs=1, verbose=0, callbacks=list(callbacks))


def _wn_lstm():
    return WeightNormalization(L.LSTM(4), name="wn_lstm")


def test_a_trained_weight_normalized_lstm_makes_the_data_init_stand_down():
    fresh = _recurrent_model(0, _wn_lstm())
    assert "wn_lstm" in [name for name, _ in written_targets(fresh, "weightnorm_data_init")]
    _fit_sequences(fresh)
    _fit_sequences(fresh)
    trained = values(fresh)
    model = _recurrent_model(1, _wn_lstm())
    model.set_weights(trained)
    init, peek = LSUVCallback(SEQ, method="weightnorm_data_init", verbose=0), Peek()
    _fit_sequences(model, [init, peek])
    assert_stood_down(init, peek, trained)


def test_every_gain_of_a_weight_normalized_recurrent_layer_is_checked():
    # Each gain (input and recurrent, forward and backward) starts as ||v|| of its kernel,
    # so each one tells a change, not only the forward input gain `g`.
    model = _recurrent_model(0, WeightNormalization(L.Bidirectional(L.LSTM(4)), name="wn"))
    wrapper = model.get_layer("wn")
    gains = [g for _, g in wrapper._gains]
    assert len(gains) == 4
    changed, checked = verify(model)
    assert changed is None and all(id(g) in checked for g in gains)
    gains[-1].assign(gains[-1] * 1.5)  # backward recurrent_g
    assert first_changed(model)[0] == gains[-1].path


def test_a_trained_lstm_that_cannot_be_checked_is_not_redrawn_by_lsuv():
    # lsuv_init also fits plain recurrent layers: a trained one whose weights cannot be
    # checked (unseeded GoodInit kernels, no bias), after a fresh frozen body, must not
    # be overwritten on the strength of the body's fresh weights.
    def lstm():
        return L.LSTM(4, kernel_initializer=GoodInit("wn_linear"),
                      recurrent_initializer=GoodInit("wn_linear"), use_bias=False, name="lstm")

    model = _recurrent_model(0, lstm(), body_trainable=False)
    assert "lstm" in [name for name, _ in written_targets(model, "lsuv")]
    _fit_sequences(model)
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)  # steps back at 0
    trained = values(model)
    assert first_changed(model) == (None, 2)  # the body is fresh: its weights say nothing
    init, peek = LSUVCallback(SEQ, verbose=0), Peek()
    _fit_sequences(model, [init, peek])
    assert init.report is None and "['lstm']" in init.reason
    assert same(peek.weights, trained)


def test_a_trained_embedding_table_that_cannot_be_checked_is_not_rescaled_by_lsuv():
    # lsuv_init rescales embedding tables (embeddings=True): one drawn from a SeedGenerator
    # cannot be checked, so a fresh frozen layer after it must not vouch for it.
    keras.utils.set_random_seed(0)
    table = keras.initializers.RandomNormal(seed=keras.random.SeedGenerator(0))
    model = keras.Sequential([
        keras.Input((6,), dtype="int32"),
        L.Embedding(10, 16, embeddings_initializer=table, name="embed"),
        L.Dense(4, name="frozen_dense", trainable=False),
    ])
    tokens = np.random.default_rng(3).integers(0, 10, size=(32, 6)).astype("int32")
    targets = np.random.default_rng(4).normal(size=(32, 6, 4)).astype("float32")
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)
    model.fit(tokens, targets, batch_size=16, epochs=1, verbose=0)
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=False)  # steps back at 0
    trained = values(model)
    assert first_changed(model) == (None, 2)  # the frozen Dense: fresh, says nothing
    assert "embed" in [name for name, _ in written_targets(model, "lsuv")]
    assert "embed" not in [name for name, _ in written_targets(model, "lsuv", embeddings=False)]
    init, peek = LSUVCallback(tokens, verbose=0), Peek()
    model.fit(tokens, targets, batch_size=16, epochs=1, verbose=0, callbacks=[init, peek])
    assert init.report is None and "['embed']" in init.reason
    assert same(peek.weights, trained)
