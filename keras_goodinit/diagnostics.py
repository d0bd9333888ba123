"""Diagnostics: how the signal travels forward and backward through a network at init."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_goodinit import _data, _sweep
from keras_goodinit.report import format_table, json_safe

# Values kept per layer for the optional histograms.
_HISTOGRAM_SAMPLES = 4096


@dataclasses.dataclass
class LayerSignal:
    """Forward and backward statistics of one target layer's output.

    Attributes:
        name: The layer's name.
        class_name: Its class.
        mean: Mean of its output (after its activation) over the batch.
        std: Standard deviation of its output.
        norm_ratio: `||h_l|| / ||x||`, the output's norm over the input's.
        grad_norm_ratio: `||dL/dh_l|| / ||dL/dh_L||`, relative to the last
            target layer (NaN without gradients).
        weight_grad_std: Standard deviation of `dL/dkernel` (`dL/dv` for
            weight-normalized layers); NaN without gradients.
    """

    name: str
    class_name: str
    mean: float
    std: float
    norm_ratio: float
    grad_norm_ratio: float = math.nan
    weight_grad_std: float = math.nan


@dataclasses.dataclass
class SignalReport:
    """Per-layer signal statistics, in execution order, from `signal_report`.

    Attributes:
        rows: One `LayerSignal` per target layer.
        input_norm: `||x||` of the batch.
        loss: The loss the gradients are of (NaN without gradients).
        samples: Per layer, a sample of output values for histograms.
    """

    rows: list[LayerSignal]
    input_norm: float
    loss: float = math.nan
    samples: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    def column(self, field: str) -> np.ndarray:
        """One statistic for every layer, e.g. `report.column("norm_ratio")`."""
        return np.array([getattr(row, field) for row in self.rows], dtype="float64")

    def to_dict(self) -> dict:
        """A JSON-safe dict (non-finite floats become strings); samples are left out."""
        return {"input_norm": json_safe(self.input_norm), "loss": json_safe(self.loss),
                "rows": [{k: json_safe(v) for k, v in dataclasses.asdict(row).items()}
                         for row in self.rows]}

    def table(self) -> str:
        header = ("layer", "class", "mean", "std", "||h||/||x||", "grad ratio", "dW std")
        lines = [(r.name, r.class_name, f"{r.mean:.3g}", f"{r.std:.3g}", f"{r.norm_ratio:.4g}",
                  f"{r.grad_norm_ratio:.4g}", f"{r.weight_grad_std:.3g}") for r in self.rows]
        return format_table(header, lines)

    def summary(self, print_fn: Callable[[str], None] | None = None) -> None:
        """Prints the per-layer table."""
        (print_fn or print)(self.table())

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str, *, histograms: bool = False, max_histograms: int = 12,
             title: str | None = None) -> str:
        """Writes a PNG of the per-layer curves (and optionally output histograms).

        Args:
            path: Where to write the PNG.
            histograms: Also draw histograms of the outputs of up to
                `max_histograms` evenly spaced layers.
            max_histograms: Most histograms drawn.
            title: Figure title.

        Returns:
            The path written.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(
                "SignalReport.plot needs matplotlib: `pip install keras-goodinit[examples]`."
            ) from error
        depth = np.arange(1, len(self.rows) + 1)
        curves = [("activation std", self.column("std"), False),
                  ("||h_l|| / ||x||", self.column("norm_ratio"), True),
                  ("||dL/dh_l|| / ||dL/dh_L||", self.column("grad_norm_ratio"), True)]
        picked = []
        if histograms and self.samples:
            step = max(1, math.ceil(len(self.rows) / max_histograms))
            picked = [r.name for r in self.rows[::step] if r.name in self.samples]
        columns = max(len(curves), min(len(picked), 6) or 1)
        rows = 1 + math.ceil(len(picked) / columns)
        figure = plt.figure(figsize=(4 * columns, 3.2 * rows))
        for index, (label, values, log) in enumerate(curves):
            axis = figure.add_subplot(rows, columns, index + 1)
            finite = np.isfinite(values) & ((values > 0) if log else True)
            axis.plot(depth[finite], values[finite], marker="o", markersize=3)
            if log and finite.any():
                axis.set_yscale("log")
            axis.set_xlabel("layer")
            axis.set_title(label)
            axis.grid(True, alpha=0.3)
        for index, name in enumerate(picked):
            axis = figure.add_subplot(rows, columns, columns + index + 1)
            axis.hist(self.samples[name], bins=50)
            axis.set_title(name, fontsize=8)
        if title:
            figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path


def _flat_norm(tensors) -> float:
    total = 0.0
    for leaf in keras.tree.flatten(tensors):
        total += float(ops.sum(ops.square(ops.cast(leaf, "float32"))))
    return math.sqrt(total)


def _standing_in(targets, kernels: dict, enabled: bool):
    """Within the block, each target's kernel variable reads as `kernels[id(target)]`."""
    if not enabled:
        return contextlib.nullcontext()
    return keras.StatelessScope(
        state_mapping=[(t.direction_variable, kernels[id(t)]) for t in targets])


def _ratio(norm: float, reference: float) -> float:
    """`norm / reference`; NaN when the reference is zero (an all-zero batch), not a crash."""
    return norm / reference if reference > 0 else math.nan


def _default_loss(outputs, labels, seed: int):
    """Cross-entropy from logits, against the batch's labels or seeded random ones."""
    if len(keras.tree.flatten(outputs)) != 1:
        raise ValueError(
            "signal_report's default cross-entropy needs a single-output model; pass `loss=`. "
            f"Received: {len(keras.tree.flatten(outputs))} outputs"
        )
    logits = ops.cast(keras.tree.flatten(outputs)[0], "float32")
    if labels is None:
        labels = np.random.default_rng(seed).integers(0, logits.shape[-1], logits.shape[:-1])
    labels = ops.convert_to_tensor(labels)
    if len(labels.shape) == len(logits.shape) and labels.shape[-1] == logits.shape[-1]:
        return ops.mean(keras.losses.categorical_crossentropy(labels, logits, from_logits=True))
    return ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


def signal_report(
    model: keras.Model,
    data,
    *,
    gradients: bool = True,
    loss: Callable | str | None = None,
    layers=None,
    seed: int = 0,
) -> SignalReport:
    """Measures the signal through every target layer: one forward, one backward pass.

    For every layer with a kernel (the targets of `lsuv_init`), in execution
    order: the mean and std of its output, the norm ratio `||h_l|| / ||x||`
    and, with `gradients=True`, the backward ratio `||dL/dh_l|| / ||dL/dh_L||`
    and the std of the kernel's gradient. This is what Figure 1 of Arpit et
    al. plots: a well-initialized deep net keeps both ratios near 1.

    Examples:

    >>> model = keras.Sequential([keras.Input((16,)),
    ...                           keras.layers.Dense(32, activation="relu"),
    ...                           keras.layers.Dense(4)])
    >>> x = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")
    >>> report = signal_report(model, x)
    >>> len(report.rows)
    2

    Args:
        model: A Keras model.
        data: A batch, `(x, y)` tuple, dict of inputs, `tf.data.Dataset` or
            `keras.utils.PyDataset` (first batch).
        gradients: Also run the backward pass.
        loss: `loss(y_true, y_pred)` or a Keras loss name. Default: softmax
            cross-entropy from logits, against `y` if the data has it, else
            against labels drawn with `seed`.
        layers: Only these layers (objects or names).
        seed: Seeds the random labels.

    Returns:
        A `SignalReport`.

    Reference:
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
    """
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(f"Argument `model` must be a Keras model. Received: model={model!r}")
    if not isinstance(gradients, bool):
        raise ValueError(f"Argument `gradients` must be a bool. Received: gradients={gradients!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Argument `seed` must be an int. Received: seed={seed!r}")
    if loss is not None and not callable(loss) and not isinstance(loss, str):
        raise ValueError(
            f"Argument `loss` must be a callable or a loss name. Received: loss={loss!r}")
    x, labels = _data.first_element(data)
    _data.check_batch(x)
    if loss is not None and labels is None:
        raise ValueError(
            "A given `loss` needs labels: pass `data=(x, y)`. Received: data without y")
    targets = _sweep.prepare(model, x, layers)

    def record(target, y, activation, state):
        out = activation(y)
        return out, state or {"output": out}

    # The kernel gradients are taken with respect to tensors that stand in for the kernel
    # variables during the pass: a variable mirrored by a tf.distribute strategy cannot be
    # watched in cross-replica context, where the sweep runs.
    kernels = ({id(t): tf.convert_to_tensor(t.direction_variable.value) for t in targets}
               if gradients else {})
    with tf.GradientTape() as tape, _standing_in(targets, kernels, gradients):
        tape.watch(list(kernels.values()))
        result = _sweep.sweep(model, x, targets, record)
        if gradients:
            if loss is None:
                loss_value = _default_loss(result.outputs, labels, seed)
            else:
                loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss
                loss_value = ops.mean(loss_fn(labels, result.outputs))
    outputs = [result.states[id(t)]["output"] for t in result.order]
    input_norm = _flat_norm(x)
    rows, samples = [], {}
    rng = np.random.default_rng(seed)
    for target, out in zip(result.order, outputs):
        values = ops.convert_to_numpy(ops.cast(out, "float32")).ravel()
        rows.append(LayerSignal(target.name, target.class_name, float(values.mean()),
                                float(values.std()), _ratio(float(np.linalg.norm(values)),
                                                            input_norm)))
        take = min(values.size, _HISTOGRAM_SAMPLES)
        samples[target.name] = rng.choice(values, take, replace=False)
    report = SignalReport(rows, input_norm, samples=samples)
    if not gradients:
        return report
    grads = tape.gradient(loss_value, outputs + [kernels[id(t)] for t in result.order])
    output_grads, kernel_grads = grads[:len(outputs)], grads[len(outputs):]
    norms = [_flat_norm(g) if g is not None else math.nan for g in output_grads]
    last = norms[-1] if norms and norms[-1] > 0 else math.nan
    for row, norm, grad in zip(rows, norms, kernel_grads):
        row.grad_norm_ratio = norm / last
        if grad is not None:
            row.weight_grad_std = float(ops.std(ops.cast(grad, "float32")))
    report.loss = float(loss_value)
    return report
