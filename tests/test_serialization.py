"""Serialization and reproducibility: configs, `.keras` files, baked models, seeds across processes.

Complements test_initializers.py / test_weight_norm.py / test_schedules.py
(which check each class's own config keys) with what a cluster job relies
on: the JSON that `.keras` writes, models saved *after* a data-dependent init
(the init must not be redone at load), baked models that load without this
package, and int seeds that give the same bits in another process.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers as L  # noqa: E402

from keras_goodinit import (  # noqa: E402
    GoodInit,
    WeightNormalization,
    bake_weight_norm,
    lsuv_init,
    weightnorm_data_init,
)
from keras_goodinit.schedules import QuadraticWarmup  # noqa: E402

SUBPROCESS_TIMEOUT = 120


def normal(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype("float32")


def values(model):
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.weights]


def assert_same_values(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert np.array_equal(x, y), i


def as_json(config):
    return json.loads(json.dumps(config))


def via_json(obj):
    """What a `.keras` file does: serialize, write JSON, read it back, deserialize."""
    text = json.dumps(keras.saving.serialize_keras_object(obj))
    return keras.saving.deserialize_keras_object(json.loads(text))


# ----------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize("make", [
    lambda: GoodInit("wn_relu", seed=3),
    lambda: GoodInit("wn_residual", num_blocks=4, distribution="normal", layout="conv_transpose",
                     seed=None),
    lambda: GoodInit("wn_hanin", block_index=3, gamma=0.5, layout="depthwise", seed=11),
    lambda: GoodInit("wn_linear", seed=keras.random.SeedGenerator(5)),
], ids=["int_seed", "no_seed", "gamma_depthwise", "seed_generator"])
def test_goodinit_round_trips_through_json(make):
    init = make()
    clone = via_json(init)
    assert type(clone) is GoodInit and clone.get_config() == init.get_config()
    assert GoodInit.from_config(init.get_config()).get_config() == init.get_config()
    assert clone.gamma == init.gamma and clone.unit_norm((3, 3, 4, 8)) == init.unit_norm(
        (3, 3, 4, 8))
    if isinstance(init.seed, keras.random.SeedGenerator):
        # A generator is saved as its seed: the clone draws what a fresh generator draws,
        # and a clone of an already-used generator too (its state is not part of the config).
        init((4, 4))
        fresh = GoodInit("wn_linear", seed=keras.random.SeedGenerator(5))
        np.testing.assert_array_equal(via_json(init)((6, 4)), fresh((6, 4)))
    elif isinstance(init.seed, int):
        shape = (3, 3, 4, 8) if init.layout != "depthwise" else (3, 3, 4, 2)
        np.testing.assert_array_equal(clone(shape), init(shape))


@pytest.mark.parametrize("make, shape", [
    (lambda: L.Dense(5, activation="relu", kernel_initializer=GoodInit("wn_relu", seed=1)), (7,)),
    (lambda: L.Conv2D(4, 3, padding="same"), (6, 6, 2)),
    (lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (6, 6, 3)),
    (lambda: L.Conv2DTranspose(3, 3, strides=2,
                               kernel_initializer=GoodInit("wn_linear", layout="conv_transpose")),
     (5, 5, 2)),
], ids=["dense", "conv2d", "depthwise", "conv_transpose"])
def test_weight_normalization_round_trips_through_json(make, shape):
    layer = WeightNormalization(make(), name="wn")
    x = normal((3, *shape))
    layer(x)
    layer.g.assign(np.random.default_rng(0).uniform(0.5, 2.0, layer.g.shape))
    clone = via_json(layer)
    assert type(clone) is WeightNormalization and type(clone.layer) is type(layer.layer)
    # (JSON turns the build shape's tuple into a list.)
    assert as_json(clone.get_config()) == as_json(layer.get_config())
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(x), layer(x))
    assert clone.layout == layer.layout


@pytest.mark.parametrize("after", [
    None, 0.01, keras.optimizers.schedules.CosineDecay(0.1, decay_steps=20),
    QuadraticWarmup(0.1, 0.2, warmup_steps=3),
], ids=["none", "number", "cosine", "nested_warmup"])
def test_quadratic_warmup_round_trips_through_json(after):
    schedule = QuadraticWarmup(0.0, 0.1, warmup_steps=10, after=after, name="warm")
    clone = via_json(schedule)
    assert type(clone) is QuadraticWarmup and clone.get_config() == schedule.get_config()
    steps = np.arange(0, 40, 3)
    np.testing.assert_array_equal([float(clone(s)) for s in steps],
                                  [float(schedule(s)) for s in steps])


# ----------------------------------------------------------------------------
# .keras files after an init.


def mixed_model():
    """Functional, with a nested Sequential, GoodInit kernels (int, None and generator seeds)
    and weight-normalized layers."""
    inner = keras.Sequential([
        keras.Input((8, 8, 6)),
        WeightNormalization(L.Conv2D(6, 3, padding="same", activation="relu",
                                     kernel_initializer=GoodInit("wn_relu", seed=2)),
                            name="inner_wn"),
        L.Conv2D(6, 3, padding="same", kernel_initializer=GoodInit(
            "wn_residual", num_blocks=2, seed=keras.random.SeedGenerator(4)), name="inner_conv"),
    ], name="inner")
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="stem",
                 kernel_initializer=GoodInit("wn_relu", seed=1))(inputs)
    x = L.Add()([x, inner(x)])
    x = L.GlobalAveragePooling2D()(x)
    x = WeightNormalization(L.Dense(8, activation="relu", kernel_initializer=GoodInit("wn_relu")),
                            name="wn_dense")(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x))


@pytest.mark.parametrize("init", ["lsuv", "weightnorm_data_init"])
def test_keras_file_keeps_the_initialized_weights(tmp_path, init):
    keras.utils.set_random_seed(0)
    model = mixed_model()
    built = values(model)
    x = normal((32, 8, 8, 3))
    if init == "lsuv":
        report = lsuv_init(model, x, seed=5, verbose=0)
    else:
        report = weightnorm_data_init(model, x, verbose=0)
    assert [r.status for r in report.rows].count("ok") >= 2
    initialized = values(model)
    changed = [not np.array_equal(a, b) for a, b in zip(built, initialized)]
    assert any(changed)
    expected = model.predict(x, verbose=0)
    path = tmp_path / "initialized.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    # Loading builds every layer (int-seeded GoodInit redraws the built kernel, a
    # WeightNormalization sets g = ||v||) and then must overwrite all of it.
    assert_same_values(values(loaded), initialized)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    assert isinstance(loaded.get_layer("stem").kernel_initializer, GoodInit)
    wn = loaded.get_layer("wn_dense")
    norms = np.linalg.norm(wn.v.numpy(), axis=0)
    g_differs_from_norms = not np.allclose(wn.g.numpy(), norms, rtol=1e-4)
    assert g_differs_from_norms  # the initialized g, not the build-time ||v||


def test_keras_file_keeps_optimizer_state_and_warmup_schedule(tmp_path):
    keras.utils.set_random_seed(0)
    model = mixed_model()
    x, y = normal((32, 8, 8, 3)), normal((32, 3), 1)
    lsuv_init(model, x, seed=5, verbose=0)
    schedule = QuadraticWarmup(0.0, 0.05, warmup_steps=10,
                               after=keras.optimizers.schedules.CosineDecay(0.05, 100))
    model.compile(keras.optimizers.SGD(schedule, momentum=0.9), "mse", jit_compile=False)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "trained.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert int(loaded.optimizer.iterations.numpy()) == 4
    restored = loaded.optimizer._learning_rate
    assert isinstance(restored, QuadraticWarmup)
    assert restored.get_config() == schedule.get_config()
    assert_same_values(values(loaded), values(model))
    # Both continue identically: same weights, same optimizer state (momentum), same lr.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(values(model), values(loaded)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


LOAD_WITHOUT_PACKAGE = textwrap.dedent("""
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.modules["keras_goodinit"] = None  # any import of the package now fails
    import keras, numpy as np
    path, x_path, y_path = sys.argv[1:4]
    model = keras.saving.load_model(path)
    same = np.array_equal(model.predict(np.load(x_path), verbose=0), np.load(y_path))
    print("RESULT", same, sorted({type(layer).__module__.split(".")[0]
                                   for layer in model._flatten_layers()}))
""")


def test_baked_model_saves_loads_and_needs_no_package(tmp_path):
    keras.utils.set_random_seed(0)
    model = mixed_model()
    x = normal((16, 8, 8, 3))
    weightnorm_data_init(model, x, verbose=0)
    baked = bake_weight_norm(model)
    assert not any(isinstance(layer, WeightNormalization) for layer in baked._flatten_layers())
    expected = baked.predict(x, verbose=0)
    np.testing.assert_allclose(expected, model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    path = tmp_path / "baked.keras"
    baked.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    # The point of baking: serving without keras-goodinit installed.
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", expected)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(path), str(tmp_path / "x.npy"),
         str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
        env=env)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT")]
    assert process.returncode == 0 and lines, process.stderr[-3000:]
    assert lines[0] == "RESULT True ['keras']"


# ----------------------------------------------------------------------------
# Same int seed, same bits, in another process.

DIGEST = textwrap.dedent("""
    import hashlib, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np
    from keras_goodinit import GoodInit, lsuv_init, models

    def digest(arrays):
        h = hashlib.sha256()
        for a in arrays:
            a = np.ascontiguousarray(keras.ops.convert_to_numpy(keras.ops.cast(a, "float32")))
            h.update(str(a.shape).encode()); h.update(a.tobytes())
        return h.hexdigest()

    def digests():
        out = {}
        for scheme, kwargs in [("wn_relu", {}), ("wn_residual", {"num_blocks": 3}),
                               ("wn_linear", {"distribution": "normal"}),
                               ("wn_hanin", {"block_index": 2, "layout": "depthwise"}),
                               ("wn_relu", {"layout": "conv_transpose"})]:
            init = GoodInit(scheme, seed=7, **kwargs)
            label = "-".join([scheme] + [f"{k}={v}" for k, v in kwargs.items()])
            out[label] = digest(
                [init(s, dtype=d) for s in [(3, 3, 16, 8), (2, 64, 32), (1, 8, 40)]
                 for d in ("float32", "float16", "bfloat16", "float64")])
        out["draw_count"] = digest([GoodInit("wn_relu", seed=9).draw((3, 3, 8, 8), count=4)])
        out["wn_resnet"] = digest(models.wn_resnet((8, 8, 3), 4, num_blocks=1, width=4,
                                                   seed=3).get_weights())
        out["wn_mlp_he"] = digest(models.wn_mlp((10,), 3, depth=2, width=8, init="he_proposed",
                                                seed=4).get_weights())
        model = models.wn_mlp((10,), 3, depth=3, width=16, init="lsuv", seed=5)
        x = np.random.default_rng(0).normal(size=(64, 10)).astype("float32")
        lsuv_init(model, x, seed=6, verbose=0)
        out["lsuv_seed"] = digest(model.get_weights())
        return out

    if __name__ == "__main__":
        for key, value in sorted(digests().items()):
            print("DIGEST", key, value)
""")


def test_int_seeds_give_bit_identical_kernels_across_processes(tmp_path):
    script = tmp_path / "digests.py"
    script.write_text(DIGEST)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # Two processes at once, each with a different global Keras/NumPy state and hash seed:
    # none of it may matter when every seed is an int.
    processes = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**env, "PYTHONHASHSEED": str(i)}) for i in (1, 2)]
    outputs = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
            assert process.returncode == 0, err[-3000:]
            outputs.append(dict(line.split()[1:3] for line in out.splitlines()
                                if line.startswith("DIGEST")))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert len(outputs[0]) == 9 and outputs[0] == outputs[1]
    # And in this process, after other draws moved the global generators.
    keras.utils.set_random_seed(123)
    GoodInit("wn_relu")((5, 5))
    namespace = {"__name__": "digests"}
    exec(compile(DIGEST, "digests", "exec"), namespace)
    assert namespace["digests"]() == outputs[0]
    assert hashlib.sha256(b"").hexdigest() not in outputs[0].values()


# ----------------------------------------------------------------------------
# WeightNormalization(data_init=True): the flag travels with the weights (issue 17).


def _data_init_model():
    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        WeightNormalization(L.Conv2D(6, 3, activation="relu"), data_init=True, name="wn"),
        L.Flatten(), L.Dense(2)])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    return model


def test_a_reloaded_data_init_model_does_not_redo_the_init(tmp_path):
    model = _data_init_model()
    x = normal((32, 8, 8, 3), seed=1, scale=3.0) + 1.0
    model.fit(x, np.zeros((32, 2)), batch_size=32, epochs=1, verbose=0)
    path = tmp_path / "initialized.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    wrapper = loaded.get_layer("wn")
    assert wrapper.data_init is True and bool(wrapper.initialized.numpy())
    before = values(loaded)
    # Another batch, with other statistics: a redone init would move g and the bias.
    loaded.compile(keras.optimizers.SGD(0.0), "mse")
    loaded.fit(-x * 2.0, np.zeros((32, 2)), batch_size=32, epochs=1, verbose=0)
    for old, new in zip(before, values(loaded), strict=True):
        np.testing.assert_array_equal(new, old)


def test_a_model_saved_before_its_data_init_does_it_after_loading(tmp_path):
    model = _data_init_model()
    path = tmp_path / "fresh.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    wrapper = loaded.get_layer("wn")
    assert not bool(wrapper.initialized.numpy())
    g = wrapper.g.numpy().copy()
    loaded.compile(keras.optimizers.SGD(0.0), "mse")
    x = normal((32, 8, 8, 3), seed=1, scale=3.0) + 1.0
    loaded.fit(x, np.zeros((32, 2)), batch_size=32, epochs=1, verbose=0)
    assert bool(wrapper.initialized.numpy()) and not np.array_equal(wrapper.g.numpy(), g)
