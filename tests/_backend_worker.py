"""Scenarios run under another Keras backend by tests/test_backends.py (not collected).

    KERAS_BACKEND=jax python _backend_worker.py OUT.json SHARED_DIR [GROUP/GROUPS]

TensorFlow is made unimportable first (as if it were not installed), so any
import of it by the package fails loudly. Each scenario records plain facts in
a JSON file, and the test process makes the assertions; a scenario that
raises is recorded with its error and the others still run. SHARED_DIR holds
the TensorFlow process's saved model (`from_tf.keras`, `from_tf.npz`); this
process writes its own (`from_BACKEND.keras`, `from_BACKEND.npz`) for the
TensorFlow process to load. With GROUP/GROUPS (e.g. 0/2) the process runs
every GROUPS-th scenario in the order they are defined, from the GROUP-th:
test_backends.py starts the groups at once and merges their files.
"""

from __future__ import annotations

import math
import os
import sys

# As if TensorFlow were not installed: `import tensorflow` raises ModuleNotFoundError and
# `importlib.util.find_spec("tensorflow")` returns None (torch's dynamo asks that way).
sys.modules["tensorflow"] = None

OUT, SHARED = sys.argv[1], sys.argv[2]
GROUP, GROUPS = map(int, (sys.argv[3] if len(sys.argv) > 3 else "0/1").split("/"))
BACKEND = os.environ["KERAS_BACKEND"]

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _rounding import longest_sum  # noqa: E402
from _scenarios import recorder  # noqa: E402
from _training import frozen_body_trained_head  # noqa: E402
from keras import layers as L  # noqa: E402

import keras_goodinit as kg  # noqa: E402
from keras_goodinit import (  # noqa: E402
    GoodInit,
    WeightNormalization,
    bake_weight_norm,
    propagation,
)

RESULTS, scenario = recorder(OUT, GROUP, GROUPS)
RESULTS["backend"] = keras.backend.backend()

F32_EPS = float(np.finfo("float32").eps)
SIGNAL_FIELDS = ("mean", "std", "norm_ratio", "grad_norm_ratio", "weight_grad_std")


def numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


def wn_model():
    """Conv, weight-normalized conv and depthwise, Dense: the shapes of every layout."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv",
                 kernel_initializer=GoodInit("wn_relu", seed=1))(inputs)
    x = WeightNormalization(L.Conv2D(8, 3, padding="same", activation="relu",
                                     kernel_initializer=GoodInit("wn_relu", seed=2)),
                            name="wn_conv")(x)
    x = WeightNormalization(L.DepthwiseConv2D(3, padding="same", activation="relu",
                                              depthwise_initializer=GoodInit(
                                                  "wn_relu", layout="depthwise", seed=3)),
                            name="wn_depthwise")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = WeightNormalization(L.Dense(16, activation="relu",
                                    kernel_initializer=GoodInit("wn_relu", seed=4)),
                            name="wn_dense")(x)
    return keras.Model(inputs, L.Dense(2, name="out")(x))


rng = np.random.default_rng(0)
X = rng.normal(size=(32, 8, 8, 3)).astype("float32")
Y = rng.normal(size=(32, 2)).astype("float32")


@scenario
def imported_without_tensorflow():
    return {"tensorflow_loaded": any(module is not None for name, module in sys.modules.items()
                                     if name.split(".")[0] == "tensorflow"),
            "exports": sorted(kg.__all__)}


@scenario
def goodinit_norms_and_seeds():
    # Every unit's fan-in vector has norm sqrt(gamma * C_in / C_out): exactly, to rounding.
    cases = {"dense": ((64, 32), {}, 2.0 * 64 / 32),
             "conv": ((3, 3, 16, 8), {}, 2.0 * 16 / 8),
             "linear": ((32, 64), {"scheme": "wn_linear"}, 32 / 64),
             "residual": ((48, 48), {"scheme": "wn_residual", "num_blocks": 4}, 1 / 4)}
    errors = {}
    for name, (shape, kwargs, squared) in cases.items():
        kernel = numpy(GoodInit(**{"scheme": "wn_relu", **kwargs}, seed=7)(shape))
        columns = kernel.reshape(-1, shape[-1])
        errors[name] = float(np.max(np.abs(np.linalg.norm(columns, axis=0)
                                           - math.sqrt(squared))) / math.sqrt(squared))
    orthogonal = numpy(GoodInit("wn_linear", seed=7)((64, 32)))
    gram = orthogonal.T @ orthogonal / (64 / 32)
    same = np.array_equal(numpy(GoodInit("wn_relu", seed=11)((16, 8))),
                          numpy(GoodInit("wn_relu", seed=11)((16, 8))))
    generator = GoodInit("wn_relu", seed=keras.random.SeedGenerator(5))
    fresh = not np.array_equal(numpy(generator((16, 8))), numpy(generator((16, 8))))
    return {"norm_errors": errors, "gram_error": float(np.abs(gram - np.eye(32)).max()),
            "int_seed_repeats": same, "generator_differs": fresh}


@scenario
def structured_draw_is_orthonormal():
    # 4608 x 4096 is over the structured threshold: signs, permutations and DCTs.
    m, n = 4608, 4096
    kernel = numpy(GoodInit("wn_linear", seed=3)((m, n)))
    columns = kernel / np.linalg.norm(kernel, axis=0)
    sample = columns[:, :512]
    error = float(np.abs(sample.T @ sample - np.eye(512)).max())
    norms = np.linalg.norm(kernel, axis=0)
    return {"orthogonality_error": error, "bound": 8 * math.sqrt(m) * F32_EPS,
            "norm_error": float(np.abs(norms - math.sqrt(m / n)).max()),
            "max_entry": float(np.abs(columns).max()),
            "haar_bound": 2 * math.sqrt(2 * math.log(m * n) / m)}


@scenario
def weight_norm_fit():
    keras.utils.set_random_seed(0)
    model = wn_model()
    model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=False)
    start = model.get_weights()
    history = model.fit(X, Y, batch_size=16, epochs=3, verbose=0)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(start, model.get_weights()))
    # w = g v / ||v||: the effective kernel's column norms are |g| after training too.
    layer = model.get_layer("wn_dense")
    kernel = numpy(layer.normalized_kernel())
    norms = np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), axis=0)
    return {"losses": [float(v) for v in history.history["loss"]], "moved": moved,
            "norms_are_g": float(np.abs(norms - np.abs(numpy(layer.g).ravel())).max())}


@scenario
def weight_norm_jit_compile():
    keras.utils.set_random_seed(1)
    model = wn_model()
    model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=True)
    # One epoch (two compiled steps): torch.compile of this fit costs minutes on loaded CPUs.
    history = model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    eager = wn_model()
    eager.set_weights(model.get_weights())
    return {"losses": [float(v) for v in history.history["loss"]],
            "predict_vs_call": float(np.abs(model.predict(X, verbose=0)
                                            - numpy(eager(X))).max())}


@scenario
def weight_norm_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(2)
        model = wn_model()
        model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=False)
        history = model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
        layer = model.get_layer("wn_dense")
        dense_out = layer(np.ones((2, 8), "float16"))
        return {"loss_finite": bool(np.isfinite(history.history["loss"][0])),
                "output_dtype": keras.backend.standardize_dtype(dense_out.dtype),
                "variable_dtype": layer.g.dtype,
                "kernel_dtype": keras.backend.standardize_dtype(
                    layer.normalized_kernel().dtype)}
    finally:
        keras.mixed_precision.set_global_policy("float32")


@scenario
def bake_weight_norm_equal_outputs():
    keras.utils.set_random_seed(3)
    model = wn_model()
    baked = bake_weight_norm(model)
    return {"max_diff": float(np.abs(numpy(model(X)) - numpy(baked(X))).max()),
            "has_wn": any(isinstance(layer, WeightNormalization)
                          for layer in baked._flatten_layers())}


@scenario
def mean_field_init_without_data():
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((64,))]
                             + [L.Dense(64, activation="relu") for _ in range(4)]
                             + [L.Dense(10)])
    report = kg.mean_field_init(model, seed=0, verbose=0)
    # ReLU: gamma = 2, so each 64 -> 64 unit gets norm sqrt(2).
    first = numpy(model.layers[0].kernel)
    return {"gammas": [float(r.gamma) for r in report.rows],
            "first_norm_error": float(np.abs(np.linalg.norm(first, axis=0)
                                             - math.sqrt(2.0)).max())}


@scenario
def signal_report_matches_tensorflow():
    model = keras.saving.load_model(os.path.join(SHARED, "init_before.keras"))
    saved = np.load(os.path.join(SHARED, "signal.npz"))
    report = kg.signal_report(model, (saved["x"], saved["y"]), seed=3)
    return {"mode": report.mode, "loss_name": report.loss_name,
            "grad_reference": report.grad_reference, "blocks": len(report.blocks),
            "loss": report.loss,
            **{field: report.column(field).tolist() for field in SIGNAL_FIELDS},
            "block_variance": report.block_column("variance").tolist()}


@scenario
def norm_ratios_match_tensorflow():
    saved = np.load(os.path.join(SHARED, "norm_ratios.npz"))
    ratios = {}
    for name in ("mlp_chain", "residual_chain"):
        model = keras.saving.load_model(os.path.join(SHARED, f"{name}.keras"))
        forward, backward = propagation.norm_ratios(model, saved["x"], seed=4)
        ratios[name] = {"forward": forward.tolist(), "backward": backward.tolist()}
    return ratios


class _ListsItsActivations(keras.Model):
    """A subclassed two-layer chain that outputs both activations."""

    def __init__(self):
        super().__init__()
        self.first = L.Dense(8, activation="relu", kernel_initializer=GoodInit("wn_relu", seed=5))
        self.second = L.Dense(8, activation="relu",
                              kernel_initializer=GoodInit("wn_relu", seed=6))

    def call(self, x):
        h = self.first(x)
        return [h, self.second(h)]


@scenario
def norm_ratios_of_a_subclassed_model():
    x = np.random.default_rng(7).normal(size=(16, 8)).astype("float32")
    model = _ListsItsActivations()
    try:
        forward, backward = propagation.norm_ratios(model, x)
    except ValueError as error:
        return {"error_message": str(error)}
    return {"forward": forward.tolist(), "backward": backward.tolist()}


def after_tensorflow(method):
    """`method` on the TensorFlow process's model and batch, against its weights after it:
    on the default path (jax.jit on JAX, eager on torch) and on the eager one."""
    saved = np.load(os.path.join(SHARED, f"{method}_after.npz"))
    found = {}
    for compile in ("auto", "eager"):
        model = keras.saving.load_model(os.path.join(SHARED, "init_before.keras"))
        if method == "lsuv":
            report = kg.lsuv_init(model, saved["x"], pre_init=None, verbose=0, compile=compile)
        else:
            report = kg.weightnorm_data_init(model, saved["x"], verbose=0, compile=compile)
        after = model.get_weights()
        expected = [saved[f"w{i}"] for i in range(len(after))]
        found[compile] = {
            "mode": report.mode, "notes": report.notes,
            "statuses": [row.status for row in report.rows],
            "same_shapes": [a.shape for a in after] == [e.shape for e in expected],
            "max_rel_diff": max(float(np.max(np.abs(a - e)) / (np.max(np.abs(e)) or 1.0))
                                for a, e in zip(after, expected))}
    return found


@scenario
def lsuv_init_matches_tensorflow():
    return after_tensorflow("lsuv")


@scenario
def weightnorm_data_init_matches_tensorflow():
    return after_tensorflow("data_init")


@scenario
def lsuv_orthogonal_pre_init_and_callback_in_fit():
    keras.utils.set_random_seed(7)
    model = wn_model()
    report = kg.lsuv_init(model, X, seed=1, verbose=0)  # orthogonal pre-init, then LSUV
    fresh = wn_model()
    fresh.compile(keras.optimizers.SGD(0.01), "mse")
    callback = kg.LSUVCallback(X, verbose=0)
    fresh.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    again = kg.LSUVCallback(X, verbose=0)  # a second fit: the model is already initialized
    fresh.fit(X, Y, batch_size=16, epochs=1, verbose=0, callbacks=[again])
    return {"statuses": [row.status for row in report.rows],
            "var_after": [row.var_after for row in report.rows if row.status == "ok"],
            "callback_statuses": [row.status for row in callback.report.rows],
            "second_reason": again.reason}


@scenario
def mean_field_init_with_data():
    keras.utils.set_random_seed(8)
    model = wn_model()
    report = kg.mean_field_init(model, data=X, seed=0, verbose=0)
    return {"measured": [float(row.measured) for row in report.rows]}


@scenario
def loads_a_model_saved_under_tensorflow():
    model = keras.saving.load_model(os.path.join(SHARED, "from_tf.keras"))
    saved = np.load(os.path.join(SHARED, "from_tf.npz"))
    return {"max_diff": float(np.abs(numpy(model(saved["x"])) - saved["y"]).max()),
            "wn_layers": sum(isinstance(layer, WeightNormalization)
                             for layer in model._flatten_layers())}


@scenario
def saves_a_model_for_tensorflow():
    keras.utils.set_random_seed(5)
    model = wn_model()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)  # g and v no longer at their init
    model.save(os.path.join(SHARED, f"from_{BACKEND}.keras"))
    np.savez(os.path.join(SHARED, f"from_{BACKEND}.npz"), x=X, y=numpy(model(X)))
    return {"saved": True}


def replicas_identical(model) -> tuple[int, bool]:
    """(copies per variable, whether every device holds the same values) under JAX."""
    counts, same = set(), True
    for variable in model.weights:
        shards = [np.asarray(shard.data) for shard in variable.value.addressable_shards]
        counts.add(len(shards))
        same &= all(np.array_equal(shards[0], shard) for shard in shards[1:])
    return min(counts), bool(same)


def counted_model():
    """`wn_model()` and a counter of its first layer's Python calls (each trace, on JAX)."""
    model = wn_model()
    layer = model.get_layer("conv")
    calls = [0]
    original = layer.call

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    layer.call = counted
    return model, calls


if BACKEND == "jax":
    @scenario
    def jitted_sweep_is_traced_once():
        model, calls = counted_model()
        first = kg.lsuv_init(model, X, seed=1, verbose=0)
        traced = calls[0]
        second = kg.lsuv_init(model, X, pre_init=None, verbose=0)
        return {"modes": [first.mode, second.mode], "first_calls": traced,
                "second_calls": calls[0] - traced,
                "second_iterations": [row.iterations for row in second.rows
                                      if row.status == "ok"]}

    @scenario
    def jitted_signal_report_is_traced_once():
        model, calls = counted_model()
        labels = [np.arange(32) % 2, (np.arange(32) // 2) % 2]
        first = kg.signal_report(model, (X, labels[0]))
        traced = calls[0]
        second = kg.signal_report(model, (X, labels[1]))  # new labels: the same program
        after_second = calls[0]
        eager = kg.signal_report(model, (X, labels[1]), compile="eager")
        return {"modes": [first.mode, second.mode, eager.mode], "first_calls": traced,
                "second_calls": after_second - traced, "longest_sum": longest_sum(model, X),
                "losses": [first.loss, second.loss, eager.loss],
                **{f"jitted_{f}": second.column(f).tolist() for f in SIGNAL_FIELDS},
                **{f"eager_{f}": eager.column(f).tolist() for f in SIGNAL_FIELDS}}

    @scenario
    def jitted_signal_report_discards_an_unreached_head():
        class DiscardsAux(keras.Model):
            def __init__(self):
                super().__init__()
                self.d0 = L.Dense(8, name="d0")
                self.d1 = L.Dense(4, name="d1")
                self.aux = L.Dense(8, name="aux")

            def call(self, x):
                h = self.d0(x)
                self.aux(h)  # its output is thrown away: its gradient is exactly zero
                return self.d1(h)

        x = np.random.default_rng(8).normal(size=(16, 8)).astype("float32")
        report = kg.signal_report(DiscardsAux(), x)
        return {"mode": report.mode, "grad_reference": report.grad_reference,
                "rows": [row.name for row in report.rows],
                "grad_norm_ratio": [None if math.isnan(r.grad_norm_ratio) else r.grad_norm_ratio
                                    for r in report.rows],
                "weight_grad_std": [None if math.isnan(r.weight_grad_std) else r.weight_grad_std
                                    for r in report.rows]}

    @scenario
    def data_parallel():
        # Two CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=2).
        devices = keras.distribution.list_devices("cpu")
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        try:
            keras.utils.set_random_seed(6)
            model = wn_model()
            built = replicas_identical(model)
            kg.mean_field_init(model, seed=0, verbose=0)
            initialized = replicas_identical(model)
            model.compile(keras.optimizers.SGD(0.05), "mse")
            start = model.get_weights()
            model.fit(X, Y, batch_size=16, epochs=2, verbose=0)
            moved = max(float(np.abs(a - b).max()) for a, b in zip(start, model.get_weights()))
            return {"devices": len(devices), "built": built, "initialized": initialized,
                    "fit": replicas_identical(model), "moved": moved}
        finally:
            keras.distribution.set_distribution(None)



# SignalMonitor (issue 20): records during fit through one program (jax.jit on JAX, eager on
# torch), TensorBoard event files written without TensorFlow, alarms that stop training.
def monitor_resnet():
    from keras_goodinit.models import wn_resnet

    # No weight norm: eager JAX passes of the twin below cost less (WN is tested above).
    model = wn_resnet((8, 8, 3), 2, num_blocks=1, width=4, weight_norm=False, seed=3)
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


class KeepWeights(keras.callbacks.Callback):
    """After a SignalMonitor: the weights of each of its records, by step."""

    def __init__(self, monitor):
        super().__init__()
        self.monitor, self.seen, self.weights = monitor, 0, {}

    def _keep(self):
        if len(self.monitor.history) > self.seen:  # it just recorded (and synced, on JAX)
            self.seen = len(self.monitor.history)
            self.weights[self.monitor.history[-1].step] = self.model.get_weights()

    def on_epoch_begin(self, epoch, logs=None):
        self._keep()

    def on_train_batch_end(self, batch, logs=None):
        self._keep()


@scenario
def signal_monitor_during_fit():
    keras.utils.set_random_seed(3)
    model = monitor_resnet()
    layer = model.get_layer("classifier")
    calls, original = [0], layer.call

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    layer.call = counted
    folder = os.path.join(SHARED, f"monitor_{BACKEND}")
    labels = np.arange(32) % 2
    monitor = kg.SignalMonitor((X, labels), every_n_steps=2, log_dir=folder,
                               json_path=os.path.join(folder, "history.jsonl"),
                               csv_path=os.path.join(folder, "history.csv"))
    keep = KeepWeights(monitor)
    model.fit(X, labels, batch_size=8, epochs=1, verbose=0, callbacks=[monitor, keep])
    first = calls[0]  # the monitor's program and fit's train step, traced (JAX)
    model.fit(X, labels, batch_size=8, epochs=2, verbose=0, callbacks=[monitor, keep])
    later = calls[0] - first  # 4 more records
    # Each record against signal_report of the weights of its step, set back into the model
    # (the program jitted for the monitor; eager JAX passes would take minutes here): what
    # the monitor measured mid-epoch is the weights of that step (synced, on JAX).
    final = model.get_weights()
    differences = {field: 0.0 for field in (*SIGNAL_FIELDS, "loss", "block_variance")}
    for record in monitor.history:
        model.set_weights(keep.weights[record.step])
        again = kg.signal_report(model, (X, labels))
        pairs = [(f, record.report.column(f), again.column(f)) for f in SIGNAL_FIELDS]
        pairs += [("loss", record.report.loss, again.loss),
                  ("block_variance", record.report.block_column("variance"),
                   again.block_column("variance"))]
        for field, got, expected in pairs:
            got, expected = np.asarray(got, "float64"), np.asarray(expected, "float64")
            assert np.array_equal(np.isnan(got), np.isnan(expected)), field
            finite = ~np.isnan(expected)
            relative = np.abs(got - expected)[finite] / np.abs(expected)[finite]
            differences[field] = max(differences[field], float(relative.max(initial=0.0)))
    model.set_weights(final)
    figure = monitor.plot()
    return {"steps": [r.step for r in monitor.history],
            "epochs": [r.epoch for r in monitor.history],
            "modes": sorted({r.report.mode for r in monitor.history}),
            "first_calls": first, "later_calls": later,
            "rows": len(monitor.history[0].report.rows),
            "blocks": len(monitor.history[0].report.blocks),
            "differences": differences, "panels": len(figure.axes),
            "losses": [r.report.loss for r in monitor.history],
            "alarms": [str(a) for a in monitor.alarms], "folder": folder,
            "tensorflow_loaded": any(module is not None for name, module in sys.modules.items()
                                     if name.split(".")[0] == "tensorflow")}


@scenario
def signal_monitor_stops_on_explosion():
    import warnings

    inputs = keras.Input((8,))
    h = L.Dense(8, use_bias=False, name="d0", kernel_initializer="identity")(inputs)
    h = L.Dense(8, use_bias=False, name="big",
                kernel_initializer=keras.initializers.Identity(1e4))(h)
    model = keras.Model(inputs, h)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x = np.random.default_rng(9).normal(size=(32, 8)).astype("float32")
    monitor = kg.SignalMonitor(x, on_explosion="stop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, x, batch_size=16, epochs=5, verbose=0, callbacks=[monitor])
    alarm = monitor.alarms[0]
    return {"epochs_run": len(history.epoch), "stop_training": bool(model.stop_training),
            "alarm": [alarm.step, alarm.layer, alarm.quantity, alarm.kind], "value": alarm.value,
            "reason": monitor.reason,
            "warnings": [str(w.message) for w in caught if "SignalMonitor" in str(w.message)]}


# ----------------------------------------------------------------------------
# WeightNormalization(data_init=True) in fit, and bake of a quantized WN model (issue 17).


def _data_init_facts(model, wrapper, x):
    """Per-unit mean and std of the wrapped layer's pre-activation output on `x`, and
    the float32 rounding bound on them (fan_in + log2 count) eps max|y|."""
    config = {**wrapper.layer.get_config(), "activation": "linear", "name": "plain"}
    plain = type(wrapper.layer).from_config(config)
    plain.build(x.shape)
    plain.set_weights([numpy(wrapper.normalized_kernel()), numpy(wrapper.layer.bias)])
    y = numpy(plain(x)).astype("float64")
    y = y.reshape(-1, y.shape[-1])
    fan_in = int(np.prod(wrapper.v.shape)) // int(np.prod(wrapper.g.shape))
    return {"mean_error": float(np.abs(y.mean(0)).max()),
            "std_error": float(np.abs(y.std(0) - 1.0).max()),
            "bound": (fan_in + math.log2(y.shape[0])) * F32_EPS * float(np.abs(y).max())}


@scenario
def wn_data_init_in_fit():
    import tempfile

    def build():
        keras.utils.set_random_seed(4)
        wrapper = WeightNormalization(L.Conv2D(6, 3, activation="relu"), data_init=True,
                                      name="wn")
        model = keras.Sequential([keras.Input((8, 8, 3)), wrapper, L.Flatten(), L.Dense(2)])
        # lr 0: only the init moves weights. JAX: the jitted (XLA) train step.
        model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=BACKEND == "jax")
        return model, wrapper

    rng = np.random.default_rng(5)
    x = (rng.normal(size=(64, 8, 8, 3)) * 3.0 + 1.0).astype("float32")
    y = rng.normal(size=(64, 2)).astype("float32")
    model, wrapper = build()
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    # Under JAX's stateless trainer the init waits in the shifts until an eager use.
    pending = float(np.abs(numpy(wrapper._g_shift.value)).max())
    facts = _data_init_facts(model, wrapper, x)
    folded = float(np.abs(numpy(wrapper._g_shift.value)).max())
    g = numpy(wrapper.g).copy()
    model.fit(x[::-1] * 2.0 + 5.0, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    redone = float(np.abs(numpy(wrapper.g) - g).max())
    out = numpy(model(x))
    path = os.path.join(tempfile.mkdtemp(), "data_init.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=BACKEND == "jax")
    loaded.fit(-x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    baked = numpy(bake_weight_norm(model)(x))
    explicit, explicit_wrapper = build()
    kg.weightnorm_data_init(explicit, x, verbose=0)
    return {**facts, "flag": bool(numpy(wrapper.initialized.value)), "pending": pending,
            "folded": folded, "redone": redone,
            "reloaded_flag": bool(numpy(loaded.get_layer("wn").initialized.value)),
            "reload_redone": float(np.abs(numpy(loaded.get_layer("wn").g) - g).max()),
            "reload_out": float(np.abs(numpy(loaded(x)) - out).max()),
            "bake_out": float(np.abs(baked - out).max()), "out_size": float(np.abs(out).max()),
            "explicit_flag": bool(numpy(explicit_wrapper.initialized.value)),
            "explicit_g": float(np.max(np.abs(numpy(explicit_wrapper.g) - g) / np.abs(g)))}


@scenario
def wn_bake_int8():
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((16,)),
                              WeightNormalization(L.Dense(8), name="wn")])
    model.get_layer("wn").g.assign(np.linspace(0.5, 2.0, 8))
    model.get_layer("wn").layer.bias.assign(np.linspace(-1.0, 1.0, 8))
    x = np.random.default_rng(7).normal(size=(32, 16)).astype("float32")
    before = numpy(model(x))
    model.quantize("int8")
    quantized = numpy(model(x))
    weights = [np.array(w) for w in model.get_weights()]
    baked = bake_weight_norm(model)
    got = numpy(baked(x))
    # int8's rounding: each kernel entry half a step 1/kernel_scale of its column, each
    # input half a step of its row (127 / max|row|): |x.w - x'.w'| per output.
    wrapped = model.get_layer("wn").layer
    scale = numpy(wrapped.kernel_scale).reshape(1, -1)
    kernel = numpy(wrapped._kernel).astype("float64") / scale
    row_scale = 127.0 / np.abs(x).max(axis=1, keepdims=True)
    bound = (np.abs(x).sum(1, keepdims=True) / (2 * scale)
             + np.abs(kernel).sum(0, keepdims=True) / (2 * row_scale))
    return {"mode": baked.layers[0].quantization_mode,
            "vs_quantized": float(np.abs(got - quantized).max()),
            "vs_float": float(np.abs(got - before).max()),
            "over_int8_bound": float(np.max(np.abs(got - before) / bound)),
            "size": float(np.abs(quantized).max()),
            "unchanged": all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))}


if BACKEND == "jax":
    @scenario
    def wn_data_init_data_parallel():
        # Two CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=2): the init on the
        # global batch, the same on both, folded in place after fit.
        rng = np.random.default_rng(8)
        x = (rng.normal(size=(32, 8, 8, 3)) * 2.0 + 0.5).astype("float32")
        y = rng.normal(size=(32, 2)).astype("float32")

        def build():
            keras.utils.set_random_seed(9)
            model = keras.Sequential([
                keras.Input((8, 8, 3)),
                WeightNormalization(L.Conv2D(6, 3, activation="relu"), data_init=True,
                                    name="wn"),
                L.Flatten(), L.Dense(2)])
            model.compile(keras.optimizers.SGD(0.0), "mse")
            return model

        single = build()
        single.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
        expected = numpy(single.get_layer("wn").g)
        devices = keras.distribution.list_devices("cpu")
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        try:
            model = build()
            model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
            g = numpy(model.get_layer("wn").g)  # folds the shifts in, eagerly
            return {"devices": len(devices), "replicas": replicas_identical(model),
                    "flag": bool(numpy(model.get_layer("wn").initialized.value)),
                    "vs_single": float(np.max(np.abs(g - expected) / np.abs(expected)))}
        finally:
            keras.distribution.set_distribution(None)


# ----------------------------------------------------------------------------
# Issue 17 (helper H3): stale traces, untraceable models, losses without a gradient,
# statistics after a separate activation, targets the pass cannot measure.


class _H3Scale(L.Layer):
    """`x * scale`, as Rescaling (which needs TensorFlow): a plain attribute a pass reads."""

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, x):
        return x * self.scale


def _h3_rescaled_model():
    inputs = keras.Input((16,))
    h = L.Dense(32, name="d0")(inputs)
    h = L.Activation("relu", name="act")(h)
    h = _H3Scale(1.0, name="rescale")(h)
    return keras.Model(inputs, L.Dense(8, name="d1")(h))


@scenario
def h3_a_changed_layer_config_gets_a_new_trace():
    x = np.random.default_rng(41).normal(size=(64, 16)).astype("float32")
    model = _h3_rescaled_model()
    kg.lsuv_init(model, x, verbose=0)
    model.get_layer("rescale").scale = 100.0
    report = kg.lsuv_init(model, x, verbose=0)
    facts = {"lsuv_mode": report.mode,
             "var_after": {r.name: r.var_after for r in report.rows}["d1"],
             "output_var": float(np.var(numpy(model(x)).astype("float64")))}
    model = _h3_rescaled_model()
    kg.signal_report(model, x)
    for name, change in (("scale", lambda m: setattr(m.get_layer("rescale"), "scale", 100.0)),
                         ("tanh", lambda m: setattr(m.get_layer("act"), "activation",
                                                    keras.activations.tanh))):
        change(model)
        compiled = kg.signal_report(model, x)
        eager = kg.signal_report(model, x, compile="eager")
        facts[name] = {"mode": compiled.mode,
                       **{f"compiled_{f}": compiled.column(f).tolist() for f in SIGNAL_FIELDS},
                       **{f"eager_{f}": eager.column(f).tolist() for f in SIGNAL_FIELDS}}
    return facts


class _H3Branchy(keras.Model):
    """A Python branch on a tensor's value in `call`: it cannot be traced."""

    def __init__(self):
        super().__init__(name="branchy")
        self.first = L.Dense(16, activation="relu", name="first")
        self.head = L.Dense(4, name="head")

    def call(self, x, training=False):
        h = self.first(x)
        if float(keras.ops.mean(h)) > 0:
            h = h * 2.0
        return self.head(h)


@scenario
def h3_untraceable_model_signal_report():
    x = np.random.default_rng(42).normal(size=(32, 8)).astype("float32")
    model = _H3Branchy()
    model(x)
    report = kg.signal_report(model, x)
    facts = {"mode": report.mode, "note": report.note, "rows": [r.name for r in report.rows],
             "std": report.column("std").tolist(),
             "grad_norm_ratio": report.column("grad_norm_ratio").tolist(),
             "lsuv_mode": kg.lsuv_init(model, x, verbose=0).mode}
    try:
        kg.signal_report(model, x, compile="xla")
    except Exception as error:  # noqa: BLE001 - the type and message are the facts
        facts["forced"] = [type(error).__name__, str(error)]
    return facts


@scenario
def h3_a_numpy_loss_is_refused():
    model = keras.Sequential([keras.Input((8,)), L.Dense(16, activation="relu"), L.Dense(4)])
    x = np.random.default_rng(43).normal(size=(32, 8)).astype("float32")
    y = np.zeros((32, 4), "float32")

    def numpy_loss(y_true, y_pred):
        return np.mean((keras.ops.convert_to_numpy(y_pred) - keras.ops.convert_to_numpy(y_true))
                       ** 2)

    facts = {}
    for compile in ("auto", "eager"):
        try:
            report = kg.signal_report(model, (x, y), loss=numpy_loss, compile=compile)
            facts[compile] = ["no error", report.column("grad_norm_ratio").tolist()]
        except Exception as error:  # noqa: BLE001 - the type and message are the facts
            facts[compile] = [type(error).__name__, str(error)]
    return facts


@scenario
def h3_statistics_after_a_separate_activation():
    from keras_goodinit.models import wn_mlp

    model = wn_mlp((16,), 10, depth=3, width=32, seed=3)
    x = np.random.default_rng(5).normal(size=(64, 16)).astype("float32")
    report = kg.signal_report(model, x)
    relus = [layer for layer in model.layers if isinstance(layer, L.ReLU)]
    features = [numpy(f).astype("float64")
                for f in keras.Model(model.inputs, [r.output for r in relus])(x)]
    return {"mode": report.mode, "rows": [r.name for r in report.rows],
            "mean": report.column("mean").tolist(), "std": report.column("std").tolist(),
            "sample_min": [float(np.min(report.samples[r.name])) for r in report.rows],
            "expected_mean": [float(f.mean()) for f in features],
            "expected_std": [float(f.std()) for f in features],
            "expected_max": [float(np.abs(f).max()) for f in features]}


class _H3VectorizedMap(keras.Model):
    def __init__(self):
        super().__init__(name="vectorized_map")
        self.inner = L.Dense(16, activation="relu", name="inner")
        self.head = L.Dense(4, name="head")

    def call(self, x):
        return self.head(keras.ops.vectorized_map(lambda row: self.inner(row[None])[0], x))


@scenario
def h3_a_target_the_pass_cannot_measure_is_a_skipped_row():
    x = np.random.default_rng(44).normal(size=(16, 8)).astype("float32")
    model = _H3VectorizedMap()
    model(x)
    report = kg.signal_report(model, x)
    init = kg.lsuv_init(model, x, verbose=0)
    return {"mode": report.mode, "note": report.note,
            "rows": [[r.name, r.status, r.reason] for r in report.rows],
            "std": report.column("std").tolist(),
            "lsuv": [[r.name, r.status, r.reason] for r in init.rows]}


# ----------------------------------------------------------------------------
# Issue 17 (helper H2): the callback's freshness rule, dtypes, optimizer reset, data.


def _i17_mlp(initializer="glorot_uniform", use_bias=True):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((16,)),
        L.Dense(32, activation="relu", kernel_initializer=initializer, use_bias=use_bias,
                name="hidden"),
        L.Dense(4, kernel_initializer=initializer, use_bias=use_bias, name="out")])


I17_X = np.random.default_rng(5).normal(size=(64, 16)).astype("float32")
I17_Y = np.random.default_rng(6).normal(size=(64, 4)).astype("float32")


@scenario
def i17_trained_head_that_cannot_be_checked_is_kept():
    model = frozen_body_trained_head(I17_X, I17_Y, epochs=3, learning_rate_after=0.0)
    before = [numpy(v.value) for v in model.weights]
    init = kg.LSUVCallback(I17_X[:32], verbose=0)
    model.fit(I17_X, I17_Y, batch_size=64, epochs=1, verbose=0, callbacks=[init])
    after = [numpy(v.value) for v in model.weights]
    return {"reason": init.reason, "report": init.report is not None,
            "kept": all(np.array_equal(a, b) for a, b in zip(before, after))}


@scenario
def i17_fresh_weights_match_in_every_dtype():
    import ml_dtypes

    from keras_goodinit._freshness import first_changed

    found = {}
    for policy in ("float16", "bfloat16", "float64", "mixed_float16", "mixed_bfloat16"):
        keras.config.set_dtype_policy(policy)
        try:
            model = _i17_mlp()
            fresh = list(first_changed(model))
            kernel = model.get_layer("out").kernel
            stored = numpy(kernel.value)
            value = stored.astype("float64")
            eps = float(ml_dtypes.finfo(stored.dtype).eps)
            value[0, 0] += 8 * eps * np.abs(value).max()  # 8 ulps > the 4-ulp bound
            kernel.assign(value.astype(stored.dtype))
            found[policy] = {"fresh": fresh, "perturbed": first_changed(model)[0],
                             "path": kernel.path, "dtype": str(stored.dtype)}
        finally:
            keras.config.set_dtype_policy("float32")
    keras.config.set_dtype_policy("float16")
    try:
        init = kg.LSUVCallback(I17_X[:32], verbose=0)
        model = _i17_mlp()
        model.compile(keras.optimizers.SGD(0.01), "mse")
        model.fit(I17_X, I17_Y, batch_size=16, epochs=1, verbose=0, callbacks=[init])
        found["float16_callback"] = {"reason": init.reason, "ran": init.report is not None}
    finally:
        keras.config.set_dtype_policy("float32")
    return found


@scenario
def i17_force_resets_the_optimizer_and_constraints_are_noted():
    model = _i17_mlp()
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(I17_X, I17_Y, batch_size=16, epochs=2, verbose=0)
    optimizer, seen = model.optimizer, {}

    class FirstStep(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                seen["steps"] = int(numpy(optimizer.iterations))
                seen["slots"] = max(float(np.abs(numpy(v.value)).max())
                                    for v in optimizer.variables
                                    if v is not optimizer.iterations
                                    and v is not optimizer._learning_rate)
                seen["learning_rate"] = float(numpy(optimizer.learning_rate))

    steps_before = int(numpy(optimizer.iterations))
    init = kg.LSUVCallback(I17_X[:32], force=True, verbose=0)
    model.fit(I17_X, I17_Y, batch_size=16, epochs=1, verbose=0, callbacks=[init, FirstStep()])
    constrained = keras.Sequential([
        keras.Input((16,)),
        L.Dense(32, kernel_constraint=keras.constraints.UnitNorm(axis=0), name="unit"),
        L.Dense(4, name="free")])
    rows = kg.lsuv_init(constrained, I17_X * 3.0, verbose=0).rows
    return {"steps_before": steps_before, "ran": init.report is not None, **seen,
            "rows": [[r.name, r.status, r.reason] for r in rows]}


@scenario
def i17_torch_dataloader_and_complex_data():
    found = {}
    for dtype in ("complex64", "complex128"):
        try:
            kg.lsuv_init(_i17_mlp(), I17_X.astype(dtype), verbose=0)
            found[dtype] = "accepted"
        except ValueError as error:
            found[dtype] = str(error)
    if BACKEND != "torch":
        return found
    import torch

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.tensor(I17_X), torch.tensor(I17_Y)), batch_size=32)
    inputs_only = torch.utils.data.DataLoader(torch.tensor(I17_X), batch_size=32)
    by_array = _i17_mlp()
    kg.lsuv_init(by_array, I17_X[:32], verbose=0, seed=1)
    for name, data in (("xy", loader), ("x", inputs_only)):
        model = _i17_mlp()
        report = kg.lsuv_init(model, data, verbose=0, seed=1)
        signal = kg.signal_report(_i17_mlp(), data)
        mean_field = kg.mean_field_init(_i17_mlp(), data=data, verbose=0)
        callback = kg.LSUVCallback(data, verbose=0)
        fitted = _i17_mlp()
        fitted.compile(keras.optimizers.SGD(0.01), "mse")
        fitted.fit(I17_X, I17_Y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
        found[name] = {
            "statuses": [row.status for row in report.rows],
            "same_as_first_batch": all(np.array_equal(numpy(a.value), numpy(b.value))
                                       for a, b in zip(model.weights, by_array.weights)),
            "signal_rows": len(signal.rows), "mean_field": type(mean_field).__name__,
            "callback_ran": callback.report is not None}
    return found


@scenario
def i17_float64_goodinit_is_orthonormal_to_float64_rounding():
    from keras_goodinit import initializers

    found = {}
    for path, shape in (("cholesky_qr2", (256, 64)), ("householder", (48, 40)),
                        ("structured", (96, 40))):
        saved = initializers._STRUCTURED_FLOPS
        if path == "structured":
            initializers._STRUCTURED_FLOPS = 0
        try:
            kernel = numpy(GoodInit("wn_linear", seed=3)(shape, dtype="float64"))
        finally:
            initializers._STRUCTURED_FLOPS = saved
        q = kernel.astype("float64") / np.linalg.norm(kernel.astype("float64"), axis=0)
        found[path] = {"dtype": str(kernel.dtype), "rows": shape[0],
                       "error": float(np.abs(q.T @ q - np.eye(shape[1])).max())}
    return found


@scenario
def i21_jacobian_spectrum():
    # An orthogonal linear chain (an isometry), and a tanh layer with a head against the
    # exact float64 Jacobian W2^T diag(tanh') W1^T: reverse mode (3 x 5) and forward mode
    # (7 x 5, output="hidden").
    width, depth = 32, 20
    chain = keras.Sequential([keras.Input((width,))] + [
        L.Dense(width, use_bias=False, kernel_initializer=keras.initializers.Orthogonal(seed=s))
        for s in range(depth)])
    x = np.random.default_rng(0).normal(size=(4, width)).astype("float32")
    spectrum = kg.jacobian_spectrum(chain, x)
    inputs = keras.Input((5,))
    hidden = L.Dense(7, activation="tanh", name="hidden",
                     bias_initializer=keras.initializers.RandomNormal(seed=2))(inputs)
    model = keras.Model(inputs, L.Dense(3, name="head")(hidden))
    x = np.random.default_rng(1).normal(size=(6, 5)).astype("float32")
    w1, b1 = (numpy(w).astype("float64") for w in model.get_layer("hidden").weights)
    w2 = numpy(model.get_layer("head").kernel).astype("float64")
    inner = (1 - np.tanh(x.astype("float64") @ w1 + b1) ** 2)[:, :, None] * w1.T[None]
    errors, scale = {}, 0.0
    for output, exact in (("head", np.einsum("ho,bhi->boi", w2, inner)), ("hidden", inner)):
        got = kg.jacobian_spectrum(model, x, output=output).singular_values
        exact = np.linalg.svd(exact, compute_uv=False)
        errors[output], scale = float(np.abs(got - exact).max()), max(scale, exact.max())
    return {"deviation": float(np.abs(spectrum.singular_values - 1).max()),
            "mean_squared": spectrum.mean_squared, "width": width, "depth": depth,
            "exact_errors": errors, "scale": float(scale)}


print("DONE")
