"""Scenarios run in their own processes by tests/test_distributed.py (not collected: no test_).

    python _distributed_worker.py mirrored OUT.json
        One process, the CPU split into two logical devices, MirroredStrategy.
    python _distributed_worker.py multiworker OUT.json
        One worker of a MultiWorkerMirroredStrategy cluster; TF_CONFIG says which.

Each scenario records plain facts (digests, max differences, statuses) in a
JSON file; the test process makes the assertions. A scenario that raises is
recorded with its error and the others still run, so one failure does not
hide the rest of the matrix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

MODE, OUT = sys.argv[1], sys.argv[2]
if MODE == "mirrored":
    # Only possible before TensorFlow initializes its devices.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _scenarios import recorder  # noqa: E402
from keras import layers as L  # noqa: E402

from keras_goodinit import (  # noqa: E402
    GoodInit,
    LSUVCallback,
    WeightNormalization,
    lsuv_init,
    signal_report,
    weightnorm_data_init,
)

_, scenario = recorder(OUT)


def build(wn_everywhere=False):
    """Conv, weight-normalized conv, depthwise, Dense: GoodInit with int, None, generator seeds."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv",
                 kernel_initializer=GoodInit("wn_relu"))(inputs)
    x = WeightNormalization(L.Conv2D(8, 3, padding="same", activation="relu",
                                     kernel_initializer=GoodInit("wn_relu", seed=3)),
                            name="wn_conv")(x)
    depthwise = L.DepthwiseConv2D(3, padding="same", activation="relu", name="depthwise",
                                  depthwise_initializer=GoodInit(
                                      "wn_relu", layout="depthwise",
                                      seed=keras.random.SeedGenerator(5)))
    x = (WeightNormalization(depthwise, name="wn_depthwise") if wn_everywhere else depthwise)(x)
    x = L.GlobalAveragePooling2D()(x)
    x = WeightNormalization(L.Dense(16, activation="relu", kernel_initializer=GoodInit(
        "wn_relu")), name="wn_dense")(x)
    return keras.Model(inputs, L.Dense(2, name="out")(x))


def compiled(model):
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse", jit_compile=False)
    return model


def local(variable):
    """This process's copies of a (mirrored) variable: one array per local replica."""
    value = variable.value
    copies = getattr(value, "values", None) or (value,)
    return [np.array(c.numpy()) for c in copies]


def first_copies(model):
    return [local(v)[0] for v in model.weights]


def replicas_identical(model) -> bool:
    return all(all(np.array_equal(c[0], other) for other in c[1:])
               for c in (local(v) for v in model.weights))


def digest(model) -> str:
    h = hashlib.sha256()
    for array in first_copies(model):
        h.update(array.tobytes())
    return h.hexdigest()


def max_diff(arrays, other) -> float:
    return max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(arrays, other))


def report_diff(report, single) -> float:
    fields = ("var_before", "var_after", "scale")
    assert [r.name for r in report.rows] == [r.name for r in single.rows]
    return max(abs(getattr(a, f) - getattr(b, f)) for a, b in zip(report.rows, single.rows)
               for f in fields if np.isfinite(getattr(b, f)))


class Snapshot(keras.callbacks.Callback):
    """Replica values at train begin (after the init callback) and at the end of training."""

    def on_train_begin(self, logs=None):
        self.begin_identical = replicas_identical(self.model)
        self.begin = first_copies(self.model)
        self.begin_digest = digest(self.model)


# ----------------------------------------------------------------------------
# MirroredStrategy: two logical CPUs in this process.


def mirrored():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32") * 2.0
    y = rng.normal(size=(32, 2)).astype("float32")
    half = x[:16]  # what one replica would see if statistics were per replica

    @scenario
    def replicas():
        return {"count": strategy.num_replicas_in_sync}

    @scenario
    def goodinit_and_weight_norm_fit():
        keras.utils.set_random_seed(1)
        with strategy.scope():
            model = compiled(build(wn_everywhere=True))
        built_identical = replicas_identical(model)
        start = first_copies(model)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        return {"built_identical": built_identical, "fit_identical": replicas_identical(model),
                "steps": int(model.optimizer.iterations.numpy()),
                "moved": max_diff(first_copies(model), start)}

    def against_single_device(init, seed, *, wn_everywhere, in_scope):
        """`init` on a mirrored model, and on single-device twins with the same start.

        The twin on the whole batch must match (global-batch statistics); with
        `in_scope`, a twin on one replica's half of the batch must not.
        """
        keras.utils.set_random_seed(seed)
        with strategy.scope():
            model = build(wn_everywhere=wn_everywhere)
        start = first_copies(model)
        batches = {"single": x, "half_batch": half} if in_scope else {"single": x}
        twins = {}
        for label, batch in batches.items():
            twin = build(wn_everywhere=wn_everywhere)
            twin.set_weights(start)
            twins[label] = (twin, batch)
        scope = strategy.scope() if in_scope else contextlib.nullcontext()
        with scope:
            report = init(model, x, verbose=0)
        result = {"identical": replicas_identical(model), "ok": report.ok,
                  "statuses": [r.status for r in report.rows], "mode": report.mode,
                  "changed": max_diff(first_copies(model), start) > 0}
        for label, (twin, batch) in twins.items():
            twin_report = init(twin, batch, verbose=0)
            result[f"weights_vs_{label}"] = max_diff(first_copies(model), twin.get_weights())
            result[f"stats_vs_{label}"] = report_diff(report, twin_report)
        return result

    def lsuv_without_pre_init(model, data, verbose):
        return lsuv_init(model, data, pre_init=None, verbose=verbose)

    @scenario
    def lsuv_init_in_scope():
        return against_single_device(lsuv_without_pre_init, 2, wn_everywhere=False,
                                     in_scope=True)

    @scenario
    def lsuv_init_outside_scope():
        # Variables created under the strategy, init called after leaving its scope.
        return against_single_device(lsuv_without_pre_init, 3, wn_everywhere=False,
                                     in_scope=False)

    @scenario
    def lsuv_init_orthogonal_and_trials():
        # Orthogonal pre-init drawn once and written to every replica; a dataset of batches.
        keras.utils.set_random_seed(4)
        batches = tf.data.Dataset.from_tensor_slices(np.concatenate([x, x * 0.5, x * 2])
                                                     ).batch(32)
        with strategy.scope():
            model = build()
            report = lsuv_init(model, batches, new_batch_per_trial=True, seed=9, verbose=0)
        return {"identical": replicas_identical(model),
                "statuses": sorted({r.status for r in report.rows}),
                "batches": report.batches, "mode": report.mode}

    @scenario
    def weightnorm_data_init_in_scope():
        return against_single_device(weightnorm_data_init, 5, wn_everywhere=True,
                                     in_scope=True)

    @scenario
    def weightnorm_data_init_outside_scope():
        return against_single_device(weightnorm_data_init, 5, wn_everywhere=True,
                                     in_scope=False)

    def callback_scenario(method, wn_everywhere, data):
        keras.utils.set_random_seed(6)
        with strategy.scope():
            model = compiled(build(wn_everywhere))
        single = build(wn_everywhere)
        single.set_weights(first_copies(model))
        kwargs = {"pre_init": None} if method == "lsuv" else {}
        callback, snapshot = LSUVCallback(data, method=method, verbose=0, **kwargs), Snapshot()
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback, snapshot])
        single_report = (lsuv_init if method == "lsuv" else weightnorm_data_init)(
            single, x, verbose=0, **kwargs)
        return {"init_identical": snapshot.begin_identical,
                "fit_identical": replicas_identical(model),
                "statuses": [r.status for r in callback.report.rows],
                "mode": callback.report.mode,
                "weights_vs_single": max_diff(snapshot.begin, single.get_weights()),
                "stats_vs_single": report_diff(callback.report, single_report),
                "steps": int(model.optimizer.iterations.numpy())}

    @scenario
    def callback_weightnorm_data_init():
        return callback_scenario("weightnorm_data_init", True, x)

    @scenario
    def callback_lsuv_dataset():
        return callback_scenario("lsuv", False, tf.data.Dataset.from_tensor_slices(x).batch(32))

    @scenario
    def signal_report_mirrored():
        keras.utils.set_random_seed(7)
        with strategy.scope():
            model = build(True)
        single = build(True)
        single.set_weights(first_copies(model))
        with strategy.scope():
            report = signal_report(model, (x, y), loss="mse")
        outside = signal_report(model, (x, y), loss="mse")  # after leaving the scope
        ref = signal_report(single, (x, y), loss="mse")
        fields = ("mean", "std", "norm_ratio", "grad_norm_ratio", "weight_grad_std")
        return {"names_match": [r.name for r in report.rows] == [r.name for r in ref.rows],
                "stats_vs_single": max(abs(getattr(a, f) - getattr(b, f)) for got in
                                       (report, outside) for a, b in zip(got.rows, ref.rows)
                                       for f in fields),
                "loss_vs_single": max(abs(report.loss - ref.loss), abs(outside.loss - ref.loss)),
                "identical": replicas_identical(model)}

    @scenario
    def distributed_dataset_as_data():
        # A per-replica dataset cannot give the global batch: the call must fail cleanly.
        keras.utils.set_random_seed(8)
        with strategy.scope():
            model = build()
        before = first_copies(model)
        distributed = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices(x).batch(32))
        try:
            with strategy.scope():
                lsuv_init(model, distributed, verbose=0)
            error = None
        except Exception as caught:  # noqa: BLE001
            error = f"{type(caught).__name__}: {caught}"[:500]
        return {"error": None, "raised": error,
                "unchanged": max_diff(first_copies(model), before) == 0.0,
                "identical": replicas_identical(model)}

    @scenario
    def data_init_fit_mirrored():
        # WeightNormalization(data_init=True) in model.fit: the init on the first global
        # batch (each replica sees half of it), the same on every replica.
        def data_init_model():
            inputs = keras.Input((8, 8, 3))
            h = WeightNormalization(L.Conv2D(6, 3, activation="relu"), data_init=True,
                                    name="wn_conv")(inputs)
            h = L.GlobalAveragePooling2D()(h)
            outputs = WeightNormalization(L.Dense(2), data_init=True, name="wn_dense")(h)
            model = keras.Model(inputs, outputs)
            model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=False)
            return model

        shifted = x + 0.5  # a non-zero mean for the bias to remove
        keras.utils.set_random_seed(9)
        with strategy.scope():
            model = data_init_model()
        start = first_copies(model)
        single, halved = data_init_model(), data_init_model()
        single.set_weights(start)
        halved.set_weights(start)
        model.fit(shifted, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
        single.fit(shifted, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
        halved.fit(shifted[:16], y[:16], batch_size=16, epochs=1, verbose=0, shuffle=False)
        flags = [bool(c) for name in ("wn_conv", "wn_dense")
                 for c in local(model.get_layer(name).initialized)]
        mirrored_g = [local(model.get_layer(n).g)[0] for n in ("wn_conv", "wn_dense")]

        def relative(a, b):
            return max(float(np.max(np.abs(p - q) / np.abs(q))) for p, q in zip(a, b))

        single_g = [single.get_layer(n).g.numpy() for n in ("wn_conv", "wn_dense")]
        halved_g = [halved.get_layer(n).g.numpy() for n in ("wn_conv", "wn_dense")]
        # A second epoch on other data must not redo it (lr 0: nothing else moves g).
        model.fit(shifted * 3.0, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
        again = [local(model.get_layer(n).g)[0] for n in ("wn_conv", "wn_dense")]
        return {"identical": replicas_identical(model), "flags": flags,
                "vs_single": relative(mirrored_g, single_g),
                "vs_half_batch": relative(mirrored_g, halved_g),
                "redone": max_diff(again, mirrored_g)}


    @scenario
    def data_init_fit_mirrored_rnn():
        # WeightNormalization(LSTM, data_init=True) behind a Masking layer in model.fit: the
        # first 8 samples are padded over 3 of their 6 steps, so replica 0 (samples 0-7)
        # has 24 unmasked steps and replica 1 has 48; the init must be the whole batch's.
        from keras_goodinit.weight_norm import _bias_offset

        seq = np.random.default_rng(1).normal(1.0, 2.0, size=(16, 6, 3)).astype("float32")
        seq[:8, 3:] = 0.0
        keep = np.any(seq != 0, axis=-1)
        target = np.zeros((16, 1), "float32")

        def rnn_model():
            inputs = keras.Input((6, 3))
            h = WeightNormalization(L.LSTM(4), data_init=True, name="wn_lstm")(
                L.Masking(0.0)(inputs))
            model = keras.Model(inputs, L.Dense(1, name="out")(h))
            model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=False)
            return model

        def init_values(model):
            wrapper = model.get_layer("wn_lstm")
            return [local(v)[0].astype("float64") for v in wrapper._init_variables()]

        def parts(model):
            """x_t W + b - offset at the unmasked steps, from the first replica's weights."""
            wrapper = model.get_layer("wn_lstm")
            cell = wrapper.layer.cell
            with wrapper.effective_kernel_scope():
                kernel = local(cell.kernel)[0].astype("float64")
            bias = local(cell.bias)[0].astype("float64") - _bias_offset(cell)
            return seq[keep].astype("float64") @ kernel + bias

        keras.utils.set_random_seed(4)
        with strategy.scope():
            fitted, prepared = rnn_model(), rnn_model()
        start = first_copies(fitted)
        prepared.set_weights(start)
        eager = rnn_model()
        eager.set_weights(start)
        # What averaging the replicas' means (equal shares assumed) would get wrong, in
        # units of each unit's std on the whole batch, from the starting weights.
        before = parts(fitted)
        shares = [before[: int(keep[:8].sum())], before[int(keep[:8].sum()):]]
        equal_share_gap = float(np.max(np.abs(
            (shares[0].mean(0) + shares[1].mean(0)) / 2 - before.mean(0)) / before.std(0)))
        built = init_values(fitted)
        fitted.fit(seq, target, batch_size=16, epochs=1, verbose=0, shuffle=False)
        weightnorm_data_init(eager, seq, verbose=0)
        expected = init_values(eager)
        got = init_values(fitted)
        after = parts(eager)
        # A model initialized by weightnorm_data_init trains under the strategy: its
        # `initialized` flag is set, so other data (x3) in fit does not redo the init.
        weightnorm_data_init(prepared, seq, verbose=0)
        initialized = init_values(prepared)
        prepared.fit(seq * 3.0, target, batch_size=16, epochs=1, verbose=0, shuffle=False)
        return {"identical": replicas_identical(fitted) and replicas_identical(prepared),
                "flags": [bool(c) for m in (fitted, prepared)
                          for c in local(m.get_layer("wn_lstm").initialized)],
                "vs_eager": max_diff(got, expected),
                "scale": max(float(np.max(np.abs(v))) for v in expected),
                "positions": int(keep.sum()), "fan_in": 3,
                "part_magnitude": float(np.max(np.abs(after))),
                "moved": max_diff(got, built),
                "equal_share_gap": equal_share_gap,
                "prepared_steps": int(prepared.optimizer.iterations.numpy()),
                "prepared_redone": max_diff(init_values(prepared), initialized)}


# ----------------------------------------------------------------------------
# MultiWorkerMirroredStrategy: this process is one worker.


def train_steps(strategy, model, x, y, batch_size=16):
    """A few synchronous SGD steps in a custom loop (see `keras_fit_with_callback`)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).with_options(options)
    optimizer = model.optimizer

    @tf.function
    def step(xb, yb):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
                loss = loss / strategy.num_replicas_in_sync
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss
        return strategy.run(replica_step, args=(xb, yb))

    for xb, yb in strategy.experimental_distribute_dataset(dataset):
        step(xb, yb)
    return int(optimizer.iterations.numpy())


def multiworker():
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    # Every worker its own global seed and its own data: identical results can only come
    # from synchronization.
    keras.utils.set_random_seed(100 + task)
    rng = np.random.default_rng(1000 + task)
    x = (rng.normal(size=(32, 8, 8, 3)) * (1.0 + task)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")

    @scenario
    def worker():
        return {"task": task, "replicas": strategy.num_replicas_in_sync}

    @scenario
    def goodinit_build():
        with strategy.scope():
            model = build(wn_everywhere=True)
        return {"digest": digest(model)}

    def init_run(function, wn_everywhere, in_scope):
        with strategy.scope():
            model = build(wn_everywhere)
        built = digest(model)
        if in_scope:
            with strategy.scope():
                report = function(model, x, verbose=0)  # lsuv: seed=None, this worker's draws
        else:
            report = function(model, x, verbose=0)
        return {"built": built, "digest": digest(model), "mode": report.mode,
                "statuses": [r.status for r in report.rows],
                "var_before": [r.var_before for r in report.rows]}

    @scenario
    def lsuv_init_in_scope():
        return init_run(lsuv_init, False, True)

    @scenario
    def lsuv_init_outside_scope():
        return init_run(lsuv_init, False, False)

    @scenario
    def weightnorm_data_init_in_scope():
        return init_run(weightnorm_data_init, True, True)

    @scenario
    def weightnorm_data_init_outside_scope():
        return init_run(weightnorm_data_init, True, False)

    def callback_run(method):
        with strategy.scope():
            model = compiled(build(wn_everywhere=True))
            model.optimizer.build(model.trainable_variables)
        callback = LSUVCallback(x, method=method, verbose=0)
        # What model.fit does with a callback: set_model, then on_train_begin, outside the
        # strategy's scope (Keras 3's TF trainer does not enter it for callbacks).
        callback.set_model(model)
        callback.on_train_begin()
        init_digest = digest(model)
        steps = train_steps(strategy, model, x, y)
        return {"init_digest": init_digest, "fit_digest": digest(model), "steps": steps,
                "mode": callback.report.mode,
                "statuses": [r.status for r in callback.report.rows],
                "var_before": [r.var_before for r in callback.report.rows]}

    @scenario
    def callback_lsuv():
        return callback_run("lsuv")

    @scenario
    def callback_weightnorm_data_init():
        return callback_run("weightnorm_data_init")

    @scenario
    def signal_report_multiworker():
        with strategy.scope():
            model = build(wn_everywhere=True)
            built = digest(model)
            inside = signal_report(model, (x, y), loss="mse")
        outside = signal_report(model, (x, y), loss="mse")
        return {"built": built, "digest": digest(model), "rows": len(inside.rows),
                "finite": bool(np.isfinite(np.concatenate([inside.column("std"),
                                                           outside.column("std")])).all())}

    @scenario
    def keras_fit_with_callback():
        # Last: if Keras' fit fails on one worker only, later collectives could hang.
        with strategy.scope():
            model = compiled(build(wn_everywhere=True))
        callback = LSUVCallback(x, verbose=0)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
        return {"init_ran": callback.report is not None, "fit_digest": digest(model)}


if __name__ == "__main__":
    {"mirrored": mirrored, "multiworker": multiworker}[MODE]()
    print("DONE")
