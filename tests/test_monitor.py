"""SignalMonitor: signal_report's records during fit, their logs, alarms and one trace.

The JAX and PyTorch runs are scenarios of tests/_backend_worker.py, asserted
in tests/test_backends.py.

Tolerances: a record and a `signal_report` of the same weights computed
another way (eagerly) differ by the rounding of their passes
(tests/_rounding.py: depth * sqrt(fan-in) * eps); TensorBoard stores scalars
as float32, so an event's value is the record's value rounded to float32,
exactly; CSV and JSON write floats by their repr, which reads back exactly.
"""

import csv
import dataclasses
import json
import math
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from _rounding import reordered
from keras import layers as L
from keras.src import utils as keras_utils

from keras_goodinit import SignalMonitor, _sweep, signal_report
from keras_goodinit.monitor import BLOCK_FIELDS, LAYER_FIELDS

WIDTH = 8


def residual_net(branch_scale=0.5, seed=0):
    """Dense, a residual block `h + branch(h)` and a softmax head: rows and a block."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((WIDTH,))
    h = L.Dense(WIDTH, activation="relu", name="stem")(inputs)
    branch = L.Dense(WIDTH, name="branch",
                     kernel_initializer=keras.initializers.Orthogonal(branch_scale))(h)
    h = L.Add(name="add")([h, branch])
    model = keras.Model(inputs, L.Dense(4, name="logits")(h))
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def chain(scales, names=None):
    """Dense layers of kernel s * I, no bias: h_l = (prod s) x, dL/dh_l known too."""
    inputs = keras.Input((WIDTH,))
    h = inputs
    for index, scale in enumerate(scales):
        h = L.Dense(WIDTH, use_bias=False, name=(names or {}).get(index, f"d{index}"),
                    kernel_initializer=keras.initializers.Identity(scale))(h)
    model = keras.Model(inputs, h)
    model.compile(keras.optimizers.SGD(0.0), "mse")  # lr 0: the weights stay as built
    return model


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(64, WIDTH)).astype("float32"),
            rng.integers(0, 4, size=64).astype("int32"))


# ----------------------------------------------------------------------------
# Arguments.


@pytest.mark.parametrize("kwargs, message", [
    ({"every_n_epochs": 0}, "every_n_epochs=0"),
    ({"every_n_epochs": 1.5}, "every_n_epochs=1.5"),
    ({"every_n_steps": -2}, "every_n_steps=-2"),
    ({"every_n_steps": True}, "every_n_steps=True"),
    ({"every_n_epochs": 2, "every_n_steps": 3}, "every_n_epochs=2, every_n_steps=3"),
    ({"on_explosion": "raise"}, "on_explosion='raise'"),
    ({"explode_above": 0.5}, "explode_above=0.5"),
    ({"explode_above": math.inf}, "explode_above=inf"),
    ({"vanish_below": 0}, "vanish_below=0"),
    ({"vanish_below": 2.0}, "vanish_below=2.0"),
    ({"log_dir": 3}, "log_dir=3"),
    ({"csv_path": ""}, "csv_path=''"),
    ({"histograms": "yes"}, "histograms='yes'"),
    ({"record_initial": 1}, "record_initial=1"),
    ({"gradients": None}, "gradients=None"),
    ({"seed": -1}, "seed=-1"),
    ({"compile": "jit"}, "compile='jit'"),
])
def test_bad_arguments_name_the_argument_and_the_value(kwargs, message, data):
    with pytest.raises(ValueError, match=f"Received: .*{message}"):
        SignalMonitor(data, **kwargs)


def test_a_bad_probe_batch_is_refused_at_construction(data):
    x, _ = data
    with pytest.raises(ValueError, match="non-finite"):
        SignalMonitor(np.where(x > 2, np.nan, x))
    with pytest.raises(ValueError, match="non-empty"):
        SignalMonitor(x[:0])


def test_a_dataset_gives_its_first_batch_once(data):
    x, y = data
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    monitor = SignalMonitor(dataset)
    probe_x, probe_y = monitor.data
    np.testing.assert_array_equal(probe_x, x[:16])
    np.testing.assert_array_equal(probe_y, y[:16])


# ----------------------------------------------------------------------------
# What is recorded, and when.


def test_records_per_epoch_are_the_signal_report_of_the_weights_at_that_time(data):
    x, y = data
    model = residual_net()
    probe = (x[:32], y[:32])
    monitor = SignalMonitor(probe)
    weights = []  # after the monitor: the weights it measured at each epoch's end
    saver = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: weights.append(model.get_weights()))
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[monitor, saver])
    # Once before the first step, then at the end of each epoch (4 steps each).
    assert [(r.step, r.epoch) for r in monitor.history] == [(0, 0), (4, 1), (8, 2), (12, 3)]
    assert all(r.report.mode == "compiled" for r in monitor.history)
    assert all(r.report.samples == {} for r in monitor.history)  # the history stays small
    twin = residual_net()
    for record, values in zip(monitor.history[1:], weights, strict=True):
        twin.set_weights(values)
        expected = signal_report(twin, probe, compile="eager")
        # Each row's output is at most 4 layers deep, with sums of at most 8 terms; a
        # gradient goes forward and back through all of them.
        forward, backward = reordered(4, WIDTH), reordered(8, WIDTH)
        for field, rtol in (("std", forward), ("norm_ratio", forward),
                            ("grad_norm_ratio", backward), ("weight_grad_std", backward)):
            np.testing.assert_allclose(record.report.column(field), expected.column(field),
                                       rtol=rtol, err_msg=field)
        for field in BLOCK_FIELDS:
            np.testing.assert_allclose(record.report.block_column(field),
                                       expected.block_column(field), rtol=forward,
                                       err_msg=field)
        assert record.report.loss == pytest.approx(expected.loss, rel=backward)
    # The weights moved, and the records with them: the cached program read new values.
    assert monitor.history[-1].report.loss != monitor.history[0].report.loss


def test_every_record_runs_one_traced_program(data, monkeypatch):
    x, y = data
    model = residual_net()
    traced = []  # the tf.functions signal_report traces

    def spy(*args, **kwargs):
        result = trace(*args, **kwargs)
        traced.append(result[0])
        return result

    trace = _sweep._trace
    monkeypatch.setattr(_sweep, "_trace", spy)
    calls = [0]  # Python calls of a layer: each trace of a program that holds it
    layer_call = model.get_layer("branch").call

    def counted(*args, **kwargs):
        calls[0] += 1
        return layer_call(*args, **kwargs)

    model.get_layer("branch").call = counted
    monitor = SignalMonitor((x[:32], y[:32]))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    first = calls[0]  # the monitor's program and fit's train step, traced
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[monitor])
    assert len(monitor.history) == 5
    assert first >= 2 and calls[0] == first  # 3 more records, no new trace
    # One tf.function, traced once, for the first of the 5 records.
    assert len(traced) == 1 and traced[0].experimental_get_tracing_count() == 1


def test_every_n_epochs(data):
    x, y = data
    model = residual_net()
    monitor = SignalMonitor((x[:32], y[:32]), every_n_epochs=2, record_initial=False)
    model.fit(x, y, batch_size=32, epochs=5, verbose=0, callbacks=[monitor])
    assert [(r.step, r.epoch) for r in monitor.history] == [(4, 2), (8, 4)]


def test_every_n_steps_counts_steps_across_epochs_and_fits(data):
    x, y = data
    model = residual_net()
    monitor = SignalMonitor((x[:32], y[:32]), every_n_steps=3)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor])  # 8 steps
    assert [(r.step, r.epoch) for r in monitor.history] == [(0, 0), (3, 0), (6, 1)]
    # A second fit goes on from the optimizer's 8 steps (4 more): a record at its start.
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert [r.step for r in monitor.history][3:] == [8, 9, 12]


def test_several_steps_per_execution_record_once_per_multiple_crossed(data):
    x, y = data
    model = residual_net()
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=2)
    monitor = SignalMonitor((x[:32], y[:32]), every_n_steps=3)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor])
    # Batch hooks see steps 2, 4, 6, 8: 3 is crossed at 4, 6 at 6.
    assert [r.step for r in monitor.history] == [0, 4, 6]


def test_a_second_fit_does_not_record_its_start_twice(data):
    x, y = data
    model = residual_net()
    monitor = SignalMonitor((x[:32], y[:32]))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[monitor])
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[monitor])
    assert [(r.step, r.epoch) for r in monitor.history] == [(0, 0), (2, 1), (4, 1)]


def test_per_epoch_records_leave_the_batch_hook_undefined(data):
    # Keras dispatches callbacks that define no batch hook asynchronously (JAX).
    assert keras_utils.is_default(SignalMonitor(data).on_train_batch_end)
    assert not keras_utils.is_default(SignalMonitor(data, every_n_steps=2).on_train_batch_end)


def test_series_and_names(data):
    x, y = data
    model = residual_net()
    monitor = SignalMonitor((x[:32], y[:32]))
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[monitor])
    steps, values = monitor.series("norm_ratio")
    assert steps.tolist() == [0, 2, 4] and values.shape == (3, 3)
    assert monitor.names("norm_ratio") == ["stem", "branch", "logits"]
    np.testing.assert_array_equal(values[1], monitor.history[1].report.column("norm_ratio"))
    steps, values = monitor.series("variance")
    assert monitor.names("variance") == ["add"] and values.shape == (3, 1)
    assert monitor.series("loss")[1][:, 0].tolist() == [r.report.loss for r in monitor.history]
    with pytest.raises(ValueError, match="field='nope'"):
        monitor.series("nope")


# ----------------------------------------------------------------------------
# Logs: TensorBoard, CSV, JSON Lines, plot.


def _same_float32(values, expected):
    """Equal once `expected` is rounded to float32, NaN equal to NaN."""
    np.testing.assert_array_equal(np.asarray(values, "float32"),
                                  np.asarray(expected, "float32"))


def test_tensorboard_events_read_back_with_tensorboards_reader(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = data
    model = residual_net()
    monitor = SignalMonitor((x[:32], y[:32]), log_dir=tmp_path)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor])
    reader = EventAccumulator(str(tmp_path / "signal"), size_guidance={"scalars": 0,
                                                                       "histograms": 0})
    reader.Reload()
    expected = {}
    for record in monitor.history:
        for tag, value in record.scalars().items():
            expected.setdefault(tag, []).append((record.step, value))
    tags = reader.Tags()
    assert sorted(tags["scalars"]) == sorted(expected)
    assert len(expected) == 1 + 3 * len(LAYER_FIELDS) + len(BLOCK_FIELDS)
    assert {"probe_loss", "norm_ratio/stem", "grad_norm_ratio/branch",
            "block_variance/add"} <= set(expected)
    for tag, points in expected.items():
        events = reader.Scalars(tag)
        assert [e.step for e in events] == [step for step, _ in points], tag
        _same_float32([e.value for e in events], [value for _, value in points])
    # A histogram of each layer's output sample (8 x 32 values: all of them) per record.
    assert sorted(tags["histograms"]) == ["activation/branch", "activation/logits",
                                          "activation/stem"]
    report = signal_report(model, (x[:32], y[:32]))  # the last weights: the last record's
    for name in ("stem", "branch", "logits"):
        events = reader.Histograms(f"activation/{name}")
        assert [e.step for e in events] == [r.step for r in monitor.history]
        last = events[-1].histogram_value
        sample = report.samples[name]
        assert last.num == sample.size == 32 * (4 if name == "logits" else WIDTH)
        assert sum(last.bucket) == last.num
        # min and max are the sample's, to the rounding of one forward pass.
        tolerance = reordered(3, WIDTH) * float(np.abs(sample).max())
        assert last.min == pytest.approx(float(sample.min()), abs=tolerance)
        assert last.max == pytest.approx(float(sample.max()), abs=tolerance)


def test_without_histograms_or_gradients_only_forward_scalars_are_written(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = data
    model = residual_net()
    monitor = SignalMonitor((x[:32], y[:32]), log_dir=str(tmp_path), histograms=False,
                            gradients=False)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[monitor])
    reader = EventAccumulator(str(tmp_path / "signal"))
    reader.Reload()
    assert reader.Tags()["histograms"] == []
    assert sorted(reader.Tags()["scalars"]) == sorted(
        [f"{field}/{name}" for field in ("mean", "std", "norm_ratio")
         for name in ("stem", "branch", "logits")]
        + [f"block_{field}/add" for field in BLOCK_FIELDS])


def test_a_missing_tensorboard_package_names_the_extra(data, monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == "tensorboard"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r"keras-goodinit\[tensorboard\]"):
        SignalMonitor(data, log_dir="logs")
    SignalMonitor(data)  # without log_dir, tensorboard is never imported


def test_csv_and_json_lines_hold_the_history(data, tmp_path):
    x, y = data
    model = residual_net()
    csv_path, json_path = tmp_path / "signal.csv", tmp_path / "signal.jsonl"
    monitor = SignalMonitor((x[:32], y[:32]), csv_path=csv_path, json_path=json_path)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[monitor])
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(monitor.history) * (3 + 1)  # 3 layers, 1 block per record
    expected = []
    for record in monitor.history:
        for kind, signals in (("layer", record.report.rows), ("block", record.report.blocks)):
            expected += [(record.step, record.epoch, record.report.loss, kind, s)
                         for s in signals]
    for row, (step, epoch, loss, kind, signal) in zip(rows, expected, strict=True):
        assert (int(row["step"]), int(row["epoch"]), row["kind"]) == (step, epoch, kind)
        assert float(row["loss"]) == loss
        for field, value in dataclasses.asdict(signal).items():
            if isinstance(value, float):
                assert float(row[field]) == value or (math.isnan(value) and
                                                      row[field] == "nan"), field
            else:
                assert row[field] == str(value), field
    with open(json_path) as handle:
        lines = [json.loads(line) for line in handle]
    assert lines == [json.loads(json.dumps(r.to_dict())) for r in monitor.history]
    assert lines[1]["step"] == 2 and lines[1]["rows"][0]["name"] == "stem"
    # A new monitor on the same paths starts the files afresh.
    again = SignalMonitor((x[:32], y[:32]), csv_path=csv_path, json_path=json_path,
                          record_initial=False)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[again])
    with open(json_path) as handle:
        assert [json.loads(line)["step"] for line in handle] == [6]


def test_plot_returns_a_figure_of_the_curves(data, tmp_path):
    x, y = data
    model = residual_net()
    monitor = SignalMonitor((x[:32], y[:32]))
    with pytest.raises(ValueError, match="empty history"):
        monitor.plot()
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[monitor])
    figure = monitor.plot(tmp_path / "signal.png", title="residual net")
    # std, both ratios, the kernel gradient's std, and Brock's three block curves.
    assert len(figure.axes) == 7
    assert [len(line.get_xdata()) for line in figure.axes[1].lines] == [3, 3, 3]
    np.testing.assert_array_equal(figure.axes[1].lines[0].get_ydata(),
                                  monitor.series("norm_ratio")[1][:, 0])
    assert (tmp_path / "signal.png").stat().st_size > 0
    assert len(monitor.plot(fields=["loss"]).axes) == 1


# ----------------------------------------------------------------------------
# Alarms.


def test_stop_on_a_forward_explosion_names_the_layer_and_the_value(data):
    x, _ = data
    model = chain([1.0, 1e4, 1.0], names={1: "big"})
    monitor = SignalMonitor(x[:32], on_explosion="stop")
    with pytest.warns(RuntimeWarning, match="stopping training: the forward signal explodes "
                                            "at layer 'big' at step 0"):
        history = model.fit(x, x, batch_size=16, epochs=5, verbose=0, callbacks=[monitor])
    # Keras stops after the first step; the record at that epoch's end alarms again.
    assert len(history.epoch) == 1 and model.stop_training
    alarm = monitor.alarms[0]
    assert (alarm.step, alarm.layer, alarm.quantity, alarm.kind) == (0, "big", "norm_ratio",
                                                                     "explodes")
    # ||1e4 x|| / ||x|| = 1e4 to float32 rounding.
    assert alarm.value == pytest.approx(1e4, rel=reordered(2, WIDTH))
    assert monitor.reason == alarm.message and "> explode_above=1000" in alarm.message


def test_a_backward_explosion_is_found_where_the_gradient_starts_it(data):
    x, _ = data
    # h0 = 1e-2 x, h1 = 1e2 x: forward within bounds; dL/dh0 = 1e4 dL/dh1.
    model = chain([1e-2, 1e4], names={0: "small", 1: "big"})
    monitor = SignalMonitor(x[:32], on_explosion="ignore")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, x, batch_size=32, epochs=2, verbose=0, callbacks=[monitor])
    assert not [w for w in caught if "SignalMonitor" in str(w.message)]  # "ignore"
    assert len(monitor.alarms) == 3 and not model.stop_training
    alarm = monitor.alarms[0]
    assert (alarm.layer, alarm.quantity, alarm.kind) == ("small", "grad_norm_ratio",
                                                         "explodes")
    assert alarm.value == pytest.approx(1e4, rel=reordered(4, WIDTH))
    assert "backward signal explodes at layer 'small'" in alarm.message


def test_warn_once_per_run_of_alarms_and_train_on(data):
    x, _ = data
    model = chain([1.0, 1e-4], names={1: "tiny"})
    monitor = SignalMonitor(x[:32])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, x, batch_size=32, epochs=3, verbose=0, callbacks=[monitor])
    assert len(history.epoch) == 3 and len(monitor.alarms) == 4
    messages = [str(w.message) for w in caught if "SignalMonitor" in str(w.message)]
    assert messages == [f"SignalMonitor: {monitor.reason}"]
    assert "forward signal vanishes at layer 'tiny'" in monitor.reason
    assert "< vanish_below=0.001" in monitor.reason


def test_a_non_finite_signal_explodes_and_bounds_can_be_lifted(data):
    x, _ = data
    # 1e38 x is finite in float32 (no bound: no alarm), 1e39 x overflows to inf.
    model = chain([1e38, 10.0], names={1: "overflow"})
    monitor = SignalMonitor(x[:32], on_explosion="ignore", explode_above=None)
    model.fit(x, x, batch_size=32, epochs=1, verbose=0, callbacks=[monitor])
    alarm = monitor.alarms[0]
    assert (alarm.layer, alarm.quantity, alarm.kind) == ("overflow", "std", "explodes")
    assert math.isnan(alarm.value) and alarm.message.endswith("the output's std = nan")
    # No bound at all: a ratio of 1e4 is no alarm.
    quiet = SignalMonitor(x[:32], explode_above=None, vanish_below=None)
    chain([1e4]).fit(x, x, batch_size=32, epochs=1, verbose=0, callbacks=[quiet])
    assert quiet.alarms == [] and quiet.reason is None


def test_a_skipped_row_is_not_an_explosion():
    # A layer the pass could not measure has NaN statistics: that says nothing about the
    # signal, so it must raise no alarm (it used to read as "explodes", and stop training).
    from keras_goodinit.monitor import _alarm

    model = keras.Sequential([keras.Input((8,)), L.Dense(8, activation="relu", name="a"),
                              L.Dense(2, name="b")])
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    report = signal_report(model, x)
    assert _alarm(report, 0, 1e3, 1e-3) is None
    skipped = dataclasses.replace(report.rows[0], status="skipped", reason="not measured",
                                  mean=math.nan, std=math.nan, norm_ratio=math.nan)
    report = dataclasses.replace(report, rows=[skipped, *report.rows[1:]])
    assert _alarm(report, 0, 1e3, 1e-3) is None
    # A measured NaN still is one.
    broken = dataclasses.replace(report.rows[1], std=math.nan)
    alarm = _alarm(dataclasses.replace(report, rows=[skipped, broken]), 0, 1e3, 1e-3)
    assert alarm is not None and alarm.layer == "b"


def test_series_of_an_empty_history_is_empty():
    monitor = SignalMonitor(np.zeros((4, 8), "float32"))
    steps, values = monitor.series("std")
    assert steps.shape == (0,) and values.shape == (0, 0)
