"""`SignalMonitor`: the signal through every layer and residual block, watched during `fit`."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Sequence

import keras
import numpy as np

from keras_goodinit import _data, _sweep, _validate
from keras_goodinit.diagnostics import BlockSignal, LayerSignal, SignalReport, signal_report

ON_EXPLOSION = ("ignore", "warn", "stop")

# The statistics a record holds, as `signal_report` defines them: its rows' float fields.
LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerSignal) if f.type == "float")
BLOCK_FIELDS = tuple(f.name for f in dataclasses.fields(BlockSignal) if f.type == "float")

# The statistics of the backward pass (NaN in a report without gradients).
_BACKWARD_FIELDS = ("grad_norm_ratio", "weight_grad_std")

# What each ratio is, in an alarm's message.
_FORMULAS = {"norm_ratio": "||h_l|| / ||x||", "grad_norm_ratio": "||dL/dh_l|| / ||dL/dh_R||",
             "std": "the output's std", "weight_grad_std": "the kernel gradient's std"}

# Bins of a TensorBoard histogram of a layer's output sample.
_HISTOGRAM_BINS = 30


@dataclasses.dataclass
class SignalAlarm:
    """Where and how the signal left its bounds, in one record of `SignalMonitor`.

    Attributes:
        step: The record's step.
        layer: The layer where it happened; None for the probe loss.
        quantity: `"norm_ratio"`, `"grad_norm_ratio"`, `"std"`,
            `"weight_grad_std"` or `"loss"`.
        value: Its value.
        kind: `"explodes"` or `"vanishes"`.
        message: The whole story in one sentence.
    """

    step: int
    layer: str | None
    quantity: str
    value: float
    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass
class SignalRecord:
    """One measurement of `SignalMonitor`.

    Attributes:
        step: Training steps taken when it was measured (the optimizer's
            iterations).
        epoch: Epochs completed in its `fit` when it was measured, as Keras
            counts them (from `initial_epoch`, 0 by default, in every `fit`):
            the epoch's index while it runs, one more at its end.
        report: The `SignalReport` of the probe batch (without its output
            samples, which go to TensorBoard's histograms only).
        alarm: The `SignalAlarm` the record raised, or None.
    """

    step: int
    epoch: int
    report: SignalReport
    alarm: SignalAlarm | None = None

    def to_dict(self) -> dict:
        """A JSON-safe dict: the step, the epoch, the alarm's message and the report's dict."""
        return {"step": self.step, "epoch": self.epoch,
                "alarm": None if self.alarm is None else self.alarm.message,
                **self.report.to_dict()}

    def scalars(self) -> dict[str, float]:
        """The record's TensorBoard scalars, tag -> value.

        `probe_loss` (with gradients); `{field}/{layer}` for every
        `LayerSignal` statistic (the backward ones with gradients only);
        `block_{field}/{block}` for every `BlockSignal` statistic.
        """
        report = self.report
        backward = bool(report.loss_name)  # False: no backward pass, its fields are NaN
        tags = {"probe_loss": report.loss} if backward else {}
        fields = [f for f in LAYER_FIELDS if backward or f not in _BACKWARD_FIELDS]
        for row in report.rows:
            tags.update({f"{field}/{row.name}": getattr(row, field) for field in fields})
        for block in report.blocks:
            tags.update({f"block_{field}/{block.name}": getattr(block, field)
                         for field in BLOCK_FIELDS})
        return tags


class SignalMonitor(keras.callbacks.Callback):
    """Records `signal_report` on a fixed probe batch during training.

    Every `every_n_epochs` epochs (once per epoch by default) or every
    `every_n_steps` training steps, and once before the first step, it
    measures on the same batch everything `signal_report` measures: per
    target layer, the mean and std of its output, the forward ratio
    `||h_l|| / ||x||`, the backward ratio `||dL/dh_l|| / ||dL/dh_R||` and the
    std of the kernel's gradient; per residual block, the signal propagation
    curves of Brock et al. (2021). Every record runs the same compiled
    program (a `tf.function` on TensorFlow, `jax.jit` on JAX, traced on the
    first record and reused; eagerly on PyTorch) and changes no weight.

    The records go to `history` (a list of `SignalRecord`), to TensorBoard
    when given `log_dir` (a scalar per statistic and layer, a histogram of
    each layer's output; in the run `log_dir/signal`, with the step as x
    axis), to a CSV file (one row per record and layer or block) and to a
    JSON Lines file (one record per line). `plot()` draws the curves over
    training.

    A record whose forward or backward ratio of some layer goes above
    `explode_above` or below `vanish_below`, or with a non-finite statistic
    or probe loss, raises a `SignalAlarm`, which names the layer and the
    value. The forward pass is searched in execution order, then the
    backward pass in the order the gradient travels, so the alarm names the
    layer where the trouble starts. `on_explosion` decides what happens:
    `"warn"` (the default: thresholds are rules of thumb, and stopping a
    long run is for the user to choose) issues a `RuntimeWarning` when
    records start raising alarms; `"stop"` sets `model.stop_training` (Keras
    stops after the current step, or epoch for the record before the
    first step) and says why in a `RuntimeWarning`; `"ignore"` only
    records. `alarms` holds every alarm, `reason` the first one's message.

    Examples:

    >>> model = keras.Sequential([keras.Input((16,)),
    ...                           keras.layers.Dense(32, activation="relu", name="hidden"),
    ...                           keras.layers.Dense(4, name="logits")])
    >>> model.compile("sgd", "sparse_categorical_crossentropy")
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(64, 16)).astype("float32")
    >>> y = rng.integers(0, 4, size=64)
    >>> monitor = SignalMonitor((x[:32], y[:32]))
    >>> history = model.fit(x, y, epochs=2, verbose=0, callbacks=[monitor])
    >>> [(record.step, record.epoch) for record in monitor.history]
    [(0, 0), (2, 1), (4, 2)]
    >>> steps, values = monitor.series("norm_ratio")
    >>> values.shape  # records x layers
    (3, 2)
    >>> monitor.reason is None
    True

    With a forward ratio that must stay within a factor 2 of 1, and
    `on_explosion="stop"`, training stops at the first record (0.5 of the
    input's norm is left after one layer of 0.5 times the identity):

    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(
    ...     16, kernel_initializer=keras.initializers.Identity(0.5), name="half")])
    >>> model.compile("sgd", "mse")
    >>> monitor = SignalMonitor(x, on_explosion="stop", vanish_below=0.6)
    >>> history = model.fit(x, x, epochs=5, verbose=0, callbacks=[monitor])
    >>> len(history.epoch)
    1
    >>> print(monitor.reason)
    the forward signal vanishes at layer 'half' at step 0: ||h_l|| / ||x|| = 0.5 < \
vanish_below=0.6

    Args:
        data: The probe batch: an array, a dict of inputs, an `(x, y)` tuple
            (y for the loss; without it, labels or targets are drawn with
            `seed`, see `signal_report`), or a dataset or
            `keras.utils.PyDataset`, whose first batch is taken once, here.
        every_n_epochs: Record at the end of every this many epochs. The
            default, when `every_n_steps` is not given either, is 1.
        every_n_steps: Record after every this many training steps instead.
        record_initial: Also record before the first training step of each
            `fit` (unless the last record is of that same step).
        log_dir: Where to write TensorBoard's event files (in its
            subdirectory `signal`, a run next to Keras' `train`); needs the
            `tensorboard` package (`pip install keras-goodinit[tensorboard]`),
            not TensorFlow: it works on every backend.
        histograms: With `log_dir`, also write a histogram of a sample of
            each layer's output.
        csv_path: A CSV file to write: one row per record and layer
            (`kind="layer"`) or residual block (`kind="block"`).
        json_path: A JSON Lines file to write: one `SignalRecord.to_dict()`
            per line.
        on_explosion: `"warn"` (default), `"stop"` or `"ignore"`; see above.
        explode_above: The largest forward or backward ratio allowed; None
            for no bound.
        vanish_below: The smallest forward or backward ratio allowed; None
            for no bound.
        gradients: Also measure the backward pass (`signal_report`'s).
        loss: The loss of the backward pass (`signal_report`'s).
        layers: Only these layers (`signal_report`'s).
        seed: Seeds the labels drawn without `y`, and the output samples.
        training: Measure in training mode (`signal_report`'s).
        compile: `"auto"`, `"xla"`, `"compiled"` or `"eager"` (`signal_report`'s).

    Reference:
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
        - [Brock, De & Smith, 2021](https://arxiv.org/abs/2101.08692)
    """

    def __init__(self, data, *, every_n_epochs: int | None = None,
                 every_n_steps: int | None = None, record_initial: bool = True,
                 log_dir: str | os.PathLike | None = None, histograms: bool = True,
                 csv_path: str | os.PathLike | None = None,
                 json_path: str | os.PathLike | None = None, on_explosion: str = "warn",
                 explode_above: float | None = 1e3, vanish_below: float | None = 1e-3,
                 gradients: bool = True, loss=None,
                 layers: Sequence[keras.layers.Layer | str] | None = None, seed: int = 0,
                 training: bool = False, compile: str = "auto"):
        super().__init__()
        every_n_epochs = _validate.integer("every_n_epochs", every_n_epochs, minimum=1,
                                           allow_none=True)
        every_n_steps = _validate.integer("every_n_steps", every_n_steps, minimum=1,
                                          allow_none=True)
        if every_n_epochs is not None and every_n_steps is not None:
            raise ValueError("Pass `every_n_epochs` or `every_n_steps`, not both. Received: "
                             f"every_n_epochs={every_n_epochs}, every_n_steps={every_n_steps}")
        self.every_n_epochs = every_n_epochs or (1 if every_n_steps is None else None)
        self.every_n_steps = every_n_steps
        self.record_initial = _validate.boolean("record_initial", record_initial)
        self.histograms = _validate.boolean("histograms", histograms)
        self.log_dir = _path("log_dir", log_dir)
        self.csv_path = _path("csv_path", csv_path)
        self.json_path = _path("json_path", json_path)
        self.on_explosion = _validate.one_of("on_explosion", on_explosion, ON_EXPLOSION)
        self.explode_above = _validate.number("explode_above", explode_above, minimum=1,
                                              allow_none=True)
        self.vanish_below = _validate.number("vanish_below", vanish_below, positive=True,
                                             maximum=1, allow_none=True)
        x, y = _data.first_element(data)
        _data.check_batch(x)
        # NumPy copies: a fixed batch, whatever the dataset or backend it came from.
        x = keras.tree.map_structure(keras.ops.convert_to_numpy, x)
        y = None if y is None else keras.tree.map_structure(keras.ops.convert_to_numpy, y)
        self.data = x if y is None else (x, y)
        self.report_kwargs = {
            "gradients": _validate.boolean("gradients", gradients), "loss": loss,
            "layers": layers, "seed": _validate.seed(seed, allow_none=False),
            "training": _validate.boolean("training", training),
            "compile": _validate.one_of("compile", compile, _sweep.COMPILE_MODES)}
        if self.log_dir is not None:
            _tensorboard()  # a missing package fails here, not after the first epoch
        if self.every_n_steps is None:
            # Keras dispatches the batch hooks of callbacks that define none asynchronously
            # (on JAX): leave this one undefined when records are per epoch.
            self.on_train_batch_end = super().on_train_batch_end
        self.history: list[SignalRecord] = []
        self._writer = None
        self._started = False  # files are truncated at the first `fit`, appended after
        self._step = 0
        self._epoch = 0
        self._epoch_start = 0
        self._initial_due = False

    @property
    def alarms(self) -> list[SignalAlarm]:
        """The alarms of every record, in order."""
        return [record.alarm for record in self.history if record.alarm is not None]

    @property
    def reason(self) -> str | None:
        """The first alarm's message (what stopped training, with `"stop"`); None if none."""
        alarms = self.alarms
        return alarms[0].message if alarms else None

    def series(self, field: str) -> tuple[np.ndarray, np.ndarray]:
        """One statistic over training: `(steps, values)`, values of shape (records, rows).

        The rows are those of `names(field)`: the layers for a `LayerSignal`
        field, the residual blocks for a `BlockSignal` field, one column for
        `"loss"` (the probe loss).
        """
        field = _validate.one_of("field", field, ("loss", *LAYER_FIELDS, *BLOCK_FIELDS))
        steps = np.array([record.step for record in self.history], dtype="int64")
        if field == "loss":
            values = [[record.report.loss] for record in self.history]
        elif field in LAYER_FIELDS:
            values = [record.report.column(field) for record in self.history]
        else:
            values = [record.report.block_column(field) for record in self.history]
        if not values:
            return steps, np.empty((0, len(self.names(field))))
        return steps, np.array(values, dtype="float64").reshape(len(steps), -1)

    def names(self, field: str) -> list[str]:
        """The names of `series(field)`'s columns: layers, residual blocks, or `["loss"]`."""
        field = _validate.one_of("field", field, ("loss", *LAYER_FIELDS, *BLOCK_FIELDS))
        if not self.history or field == "loss":
            return ["loss"] if field == "loss" else []
        report = self.history[0].report
        return [r.name for r in (report.rows if field in LAYER_FIELDS else report.blocks)]

    # ------------------------------------------------------------------------------------
    # Training hooks.

    def on_train_begin(self, logs=None):
        iterations = getattr(getattr(self.model, "optimizer", None), "iterations", None)
        self._step = 0 if iterations is None else int(keras.ops.convert_to_numpy(iterations))
        self._initial_due = self.record_initial
        if not self._started:
            self._started = True
            for path in (self.csv_path, self.json_path):
                if path is not None and os.path.exists(path):
                    os.remove(path)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = self._step
        if self._initial_due:
            self._initial_due = False
            if not self.history or self.history[-1].step != self._step:
                self._record(epoch)

    def on_train_batch_end(self, batch, logs=None):
        # Only called with `every_n_steps` (see __init__); `batch` is the epoch's last
        # step so far (several per call with `steps_per_execution`).
        before, self._step = self._step, self._epoch_start + batch + 1
        if self._step // self.every_n_steps > before // self.every_n_steps:
            self._record(self._epoch)

    def on_epoch_end(self, epoch, logs=None):
        if self.every_n_steps is not None:
            return
        iterations = getattr(getattr(self.model, "optimizer", None), "iterations", None)
        if iterations is not None:  # exact, also where the epoch's length is unknown
            self._step = int(keras.ops.convert_to_numpy(iterations))
        if (epoch + 1) % self.every_n_epochs == 0:
            self._record(epoch + 1)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------------------------

    def _record(self, epoch: int) -> None:
        model = self.model
        sync = getattr(model, "jax_state_sync", None)
        if sync is not None:  # JAX's fit keeps the variables' values outside them
            sync()
        report = signal_report(model, self.data, **self.report_kwargs)
        samples, report.samples = report.samples, {}  # the history stays small
        record = SignalRecord(self._step, epoch, report)
        record.alarm = _alarm(report, self._step, self.explode_above, self.vanish_below)
        new_alarm = record.alarm is not None and (
            len(self.history) == 0 or self.history[-1].alarm is None)
        self.history.append(record)
        if self.log_dir is not None:
            if self._writer is None:
                self._writer = _EventWriter(os.path.join(self.log_dir, "signal"))
            self._writer.write(record, samples if self.histograms else {})
        if self.csv_path is not None:
            _append_csv(self.csv_path, record)
        if self.json_path is not None:
            with open(self.json_path, "a") as handle:
                handle.write(json.dumps(record.to_dict()) + "\n")
        if record.alarm is None or self.on_explosion == "ignore":
            return
        if self.on_explosion == "stop":
            model.stop_training = True
        if new_alarm:  # once per run of records with alarms, not once per record
            what = "stopping training: " if self.on_explosion == "stop" else ""
            warnings.warn(f"SignalMonitor: {what}{record.alarm.message}", RuntimeWarning,
                          stacklevel=2)

    # ------------------------------------------------------------------------------------

    def plot(self, path: str | os.PathLike | None = None, *,
             fields: Sequence[str] | None = None, title: str | None = None):
        """Draws each statistic over training, one line per layer or residual block.

        Lines go from dark (the first layer or block) to light (the last).
        Ratios and standard deviations are on a log scale.

        Args:
            path: Also write the figure there (PNG, or what the suffix says).
            fields: The statistics, one panel each; default: `"std"`,
                `"norm_ratio"`, `"grad_norm_ratio"`, `"weight_grad_std"`
                and, for a model with residual blocks, Brock et al.'s
                `"squared_mean"`, `"variance"` and `"branch_variance"`.
            title: The figure's title.

        Returns:
            The `matplotlib.figure.Figure`.
        """
        if fields is None:
            fields = ["std", "norm_ratio", "grad_norm_ratio", "weight_grad_std"]
            if self.history and self.history[0].report.blocks:
                fields += ["squared_mean", "variance", "branch_variance"]
        fields = [_validate.one_of("fields", f, ("loss", *LAYER_FIELDS, *BLOCK_FIELDS))
                  for f in fields]
        if not self.history:
            raise ValueError("SignalMonitor.plot needs records: train with the monitor first. "
                             "Received: a monitor with an empty history")
        try:
            from matplotlib import colormaps
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError("SignalMonitor.plot needs matplotlib: "
                              "`pip install keras-goodinit[examples]`.") from error
        columns = min(len(fields), 4)
        rows = math.ceil(len(fields) / columns)
        figure = Figure(figsize=(4 * columns, 3.2 * rows))
        for index, field in enumerate(fields):
            axis = figure.add_subplot(rows, columns, index + 1)
            steps, values = self.series(field)
            colors = colormaps["viridis"](np.linspace(0, 0.9, max(values.shape[1], 1)))
            positive = np.isfinite(values) & (values > 0)
            for column, color in zip(values.T, colors):
                axis.plot(steps, column, color=color, linewidth=1,
                          marker="o" if len(steps) == 1 else None, markersize=3)
            if field != "mean" and positive.any() and positive.sum() == np.isfinite(values).sum():
                axis.set_yscale("log")
            axis.set_xlabel("step")
            axis.set_title(_FORMULAS.get(field, field.replace("_", " ")), fontsize=9)
            axis.grid(True, alpha=0.3)
        if title:
            figure.suptitle(title)
        figure.tight_layout()
        if path is not None:
            figure.savefig(os.fspath(path), dpi=100)
        return figure


def _path(name: str, value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"Argument `{name}` must be a path (str or os.PathLike) or None. "
                         f"Received: {name}={value!r}")
    return os.fspath(value)


def _alarm(report: SignalReport, step: int, explode_above: float | None,
           vanish_below: float | None) -> SignalAlarm | None:
    """The first place where the signal leaves its bounds: forward in execution order,
    then the loss, then backward in the order the gradient travels; None if nowhere."""
    def out_of_bounds(value: float) -> str | None:
        if math.isinf(value) or (explode_above is not None and value > explode_above):
            return "explodes"
        if vanish_below is not None and value < vanish_below:
            return "vanishes"
        return None

    def alarm(way, layer, quantity, kind, value):
        bound = ("" if not math.isfinite(value) else
                 f" > explode_above={explode_above:g}" if kind == "explodes"
                 else f" < vanish_below={vanish_below:g}")
        where = f"at layer {layer!r} " if layer is not None else ""
        what = _FORMULAS.get(quantity, quantity)
        return SignalAlarm(step, layer, quantity, value, kind,
                           f"the {way} {kind} {where}at step {step}: {what} = {value:.4g}{bound}")

    measured = [row for row in report.rows if row.status == "ok"]  # skipped rows are NaN
    for row in measured:
        for quantity in ("std", "mean"):
            if not math.isfinite(getattr(row, quantity)):
                return alarm("forward signal", row.name, quantity, "explodes",
                             getattr(row, quantity))
        kind = out_of_bounds(row.norm_ratio)  # NaN (an all-zero batch) is in no bound
        if kind:
            return alarm("forward signal", row.name, "norm_ratio", kind, row.norm_ratio)
    if report.loss_name and not math.isfinite(report.loss):
        return alarm("probe loss", None, "loss", "explodes", report.loss)
    for row in reversed(measured):
        # NaN: the layer's output does not reach the loss.
        if math.isinf(row.weight_grad_std):
            return alarm("backward signal", row.name, "weight_grad_std", "explodes",
                         row.weight_grad_std)
        kind = out_of_bounds(row.grad_norm_ratio)
        if kind:
            return alarm("backward signal", row.name, "grad_norm_ratio", kind,
                         row.grad_norm_ratio)
    return None


def _csv_fields() -> list[str]:
    names = ["step", "epoch", "loss", "kind"]
    for cls in (LayerSignal, BlockSignal):
        names += [f.name for f in dataclasses.fields(cls) if f.name not in names]
    return names


def _append_csv(path: str, record: SignalRecord) -> None:
    fields = _csv_fields()
    new = not os.path.exists(path)
    common = {"step": record.step, "epoch": record.epoch, "loss": record.report.loss}
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fields, restval="")
        if new:
            writer.writeheader()
        for kind, rows in (("layer", record.report.rows), ("block", record.report.blocks)):
            for row in rows:
                writer.writerow({**common, "kind": kind, **dataclasses.asdict(row)})


def _tensorboard():
    """The `tensorboard` package's record writer and protocol buffers (no TensorFlow)."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError as error:
        raise ImportError("SignalMonitor(log_dir=...) needs the tensorboard package: "
                          "`pip install keras-goodinit[tensorboard]`.") from error
    return RecordWriter, event_pb2, summary_pb2


class _EventWriter:
    """A TensorBoard event file, written with the `tensorboard` package alone.

    The same records as TensorFlow's or torch's `SummaryWriter` write, to a
    local file: no TensorFlow in a JAX or PyTorch process.
    """

    def __init__(self, folder: str):
        record_writer, self._event_pb2, self._summary_pb2 = _tensorboard()
        os.makedirs(folder, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{id(self)}")
        self.path = os.path.join(folder, name)
        self._file = record_writer(open(self.path, "wb"))  # noqa: SIM115 - closed in close()
        self._add(file_version="brain.Event:2")

    def _add(self, **fields) -> None:
        event = self._event_pb2.Event(wall_time=time.time(), **fields)
        self._file.write(event.SerializeToString())

    def write(self, record: SignalRecord, samples: dict[str, np.ndarray]) -> None:
        summary = self._summary_pb2.Summary
        values = [summary.Value(tag=tag, simple_value=value)
                  for tag, value in record.scalars().items()]
        for name, sample in samples.items():
            histogram = self._histogram(np.asarray(sample, dtype="float64"))
            if histogram is not None:
                values.append(summary.Value(tag=f"activation/{name}", histo=histogram))
        self._add(step=record.step, summary=summary(value=values))
        self._file.flush()

    def _histogram(self, values: np.ndarray):
        """A `HistogramProto` of the finite values (None if there are none)."""
        values = values[np.isfinite(values)]
        if values.size == 0:
            return None
        counts, edges = np.histogram(values, bins=_HISTOGRAM_BINS)
        # TensorBoard's buckets: counts[i] between bucket_limit[i - 1] and bucket_limit[i].
        return self._summary_pb2.HistogramProto(
            min=float(values.min()), max=float(values.max()), num=float(values.size),
            sum=float(values.sum()), sum_squares=float(np.square(values).sum()),
            bucket_limit=edges[1:].tolist(), bucket=counts.astype("float64").tolist())

    def close(self) -> None:
        self._file.close()

