"""`LSUVCallback` and `lsuv_init` under `tf.distribute.MirroredStrategy`.

The CPU is split into two logical devices, which TensorFlow allows only
before it initializes, so the scenario runs in a fresh Python process and
prints its findings as one JSON line for the test to check.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent(
    """
    import json
    import os

    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    import numpy as np
    from keras import layers as L

    from keras_goodinit import LSUVCallback, WeightNormalization, lsuv_init

    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


    def build():
        inputs = keras.Input((8, 8, 3))
        x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
        x = WeightNormalization(L.Conv2D(8, 3, padding="same", activation="relu"),
                                name="wn_conv")(x)
        x = L.DepthwiseConv2D(3, padding="same", activation="relu", name="depthwise")(x)
        x = L.GlobalAveragePooling2D()(x)
        x = L.Dense(16, activation="relu", name="dense")(x)
        return keras.Model(inputs, L.Dense(2, name="out")(x))


    def replicas(model):
        # Every replica's copy of every variable (a MirroredVariable under the strategy).
        return [(v.path, [np.array(c) for c in v.value.values]) for v in model.weights]


    def in_sync(copies):
        return {path: all(np.array_equal(c[0], c_) for c_ in c[1:]) for path, c in copies}


    class Snapshot(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.copies = replicas(self.model)


    def compare(copies, single, report, single_report):
        diff = max(float(np.max(np.abs(c[0] - np.array(v.value))))
                   for (_, c), v in zip(copies, single.weights))
        stats = max(abs(getattr(a, f) - getattr(b, f)) for a, b in
                    zip(report.rows, single_report.rows)
                    for f in ("var_before", "var_after", "scale"))
        return diff, stats, [r.name for r in report.rows] == [r.name for r in single_report.rows]


    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    out = {"replicas": strategy.num_replicas_in_sync}

    # 1. The callback, at the start of fit; pre_init=None so a single-device run can
    #    start from the very same weights.
    with strategy.scope():
        model = build()
        model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=False)
    start = model.get_weights()
    out["start_in_sync"] = all(in_sync(replicas(model)).values())
    callback, snapshot = LSUVCallback(x, pre_init=None, verbose=0), Snapshot()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback, snapshot])
    out["steps"] = int(model.optimizer.iterations.numpy())
    out["init_in_sync"] = in_sync(snapshot.copies)
    out["fit_in_sync"] = in_sync(replicas(model))
    out["changed"] = not all(np.array_equal(a, c[0])
                             for a, (_, c) in zip(start, snapshot.copies))
    single = build()
    single.set_weights(start)
    single_report = lsuv_init(single, x, pre_init=None, verbose=0)
    out["callback_vs_single"] = compare(snapshot.copies, single, callback.report, single_report)
    out["statuses"] = [r.status for r in callback.report.rows]

    # 2. lsuv_init called directly inside the strategy's scope, with the orthogonal
    #    pre-init (drawn once, written to every replica).
    with strategy.scope():
        model = build()
        report = lsuv_init(model, x, verbose=0)
    copies = replicas(model)
    out["scope_in_sync"] = in_sync(copies)
    single = build()
    single.set_weights([c[0] for _, c in copies])
    out["scope_ok"] = report.ok
    # The same batch through the initialized single-device copy: unit variance there too.
    recheck = lsuv_init(single, x, pre_init=None, verbose=0)
    out["scope_recheck_iterations"] = [r.iterations for r in recheck.rows]
    out["scope_recheck_var"] = [r.var_before for r in recheck.rows]
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def result():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0"}
    process = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True,
                             timeout=240, env=env)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, process.stdout[-3000:] + process.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_two_replicas(result):
    assert result["replicas"] == 2 and result["start_in_sync"]


def test_callback_keeps_replicas_identical_after_init_and_after_fit(result):
    assert result["changed"] and result["statuses"] == ["ok"] * 5
    assert result["steps"] == 2
    assert all(result["init_in_sync"].values()), result["init_in_sync"]
    assert all(result["fit_in_sync"].values()), result["fit_in_sync"]


def test_callback_matches_a_single_device_run(result):
    weight_diff, stats_diff, same_order = result["callback_vs_single"]
    # The same float32 computation on the same batch, on another device placement.
    assert same_order
    assert weight_diff < 1e-5 and stats_diff < 1e-5, result["callback_vs_single"]


def test_lsuv_init_inside_the_scope(result):
    assert result["scope_ok"] and all(result["scope_in_sync"].values()), result["scope_in_sync"]
    # Re-running LSUV on a single-device copy of the replica weights finds every layer
    # already within tol: zero steps, variance within 0.1 of 1.
    assert result["scope_recheck_iterations"] == [0] * 5
    assert all(abs(v - 1.0) < 0.1 for v in result["scope_recheck_var"])
