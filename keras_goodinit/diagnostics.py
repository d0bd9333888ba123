"""Diagnostics: how the signal travels forward and backward through a network at init."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import keras
import numpy as np
from keras import ops

from keras_goodinit import _backend, _data, _graph, _sweep, _validate
from keras_goodinit.report import format_table, json_safe

if TYPE_CHECKING:
    from keras_goodinit.spectrum import JacobianSpectrum

# Values kept per layer for the optional histograms.
_HISTOGRAM_SAMPLES = 4096


@dataclasses.dataclass
class LayerSignal:
    """Forward and backward statistics of one target layer's output.

    Attributes:
        name: The layer's name.
        class_name: Its class.
        mean: Mean of its output over the batch, after its activation: the
            fused one, or the activation layer (`Activation`, `ReLU`...) that
            alone consumes its output.
        std: Standard deviation of that output.
        norm_ratio: `||h_l|| / ||x||`, that output's norm over the input's.
        grad_norm_ratio: `||dL/dy_l|| / ||dL/dy_R||`, with `y_l` the layer's
            own output (after a fused activation, before a separate one), relative to the
            reference layer `R` (`SignalReport.grad_reference`): the last
            target, in execution order, whose output reaches the loss. NaN
            without gradients, and for a layer whose output does not reach
            the loss.
        weight_grad_std: Standard deviation of `dL/dkernel` (`dL/dv` for
            weight-normalized layers); NaN without gradients, and for a
            layer whose output does not reach the loss.
        status: `"ok"`, or `"skipped"` for a layer the pass could not
            measure (its statistics are NaN).
        reason: Why it was skipped (e.g. called only inside
            `keras.ops.vectorized_map`, or inside a `tf.function` traced
            before the pass); empty for `"ok"`.
    """

    name: str
    class_name: str
    mean: float
    std: float
    norm_ratio: float
    grad_norm_ratio: float = math.nan
    weight_grad_std: float = math.nan
    status: str = "ok"
    reason: str = ""


@dataclasses.dataclass
class BlockSignal:
    """The signal-propagation statistics of one residual block, `out = skip + branch`.

    "Average channel" statistics are taken per channel over the batch and
    the positions, then averaged over channels (Brock et al., 2021).

    Attributes:
        name: The path name of the block's sum: an `Add` layer, an `h + x`
            or `keras.ops.add` op, or a sum inside a subclassed layer
            (`block_3/add`).
        stage: Index of the block's stage (a run of blocks on one stream
            between two shape changes).
        num_blocks: Blocks in that stage (N of the `1/N` rule).
        squared_mean: Average channel squared mean of the block's output,
            `mean_c (mean of out_c)^2`.
        variance: Average channel variance of the block's output,
            `mean_c var(out_c)`.
        branch_variance: Average channel variance of the residual branch's
            output, as it enters the sum (for a sum of several branches,
            the sum of their variances).
        skip_variance: Average channel variance of the skip input of the
            sum (the stream entering the block, or its projection).
        status: `"ok"`; `"partial"` when the pass could read the block's
            output but not its branch or skip input; `"skipped"` when it
            could not read the output (its statistics are NaN).
        reason: Why a statistic is missing: the tensor is made inside a
            layer's own code (an op of a subclassed layer's `call`, which
            no pass can hook), or is a model input read by nothing.
    """

    name: str
    stage: int
    num_blocks: int
    squared_mean: float = math.nan
    variance: float = math.nan
    branch_variance: float = math.nan
    skip_variance: float = math.nan
    status: str = "ok"
    reason: str = ""


@dataclasses.dataclass
class SignalReport:
    """Per-layer signal statistics, in execution order, from `signal_report`.

    Attributes:
        rows: One `LayerSignal` per target layer: those the pass measured, in
            execution order, then those it could not (`status="skipped"`).
        input_norm: `||x||` of the batch.
        loss: The loss the gradients are of (NaN without gradients).
        training: The mode of the forward pass: `True` for training mode
            (batch statistics in BatchNormalization, active dropout),
            `False` for inference mode.
        loss_name: What `loss` is: per model output, the loss and what it
            was measured against; terms of a multi-output model are summed.
            Empty without gradients.
        grad_reference: The layer the backward ratios are relative to (None
            without gradients, or when no target's output reaches the loss).
        samples: Per layer, a sample of output values for histograms.
        blocks: One `BlockSignal` per residual block of the model's graph,
            in graph order (every sum found, those the pass could not read
            included, with their status); empty for a model whose graph
            cannot be built (a subclassed model whose `call` cannot be
            traced: `note` says so).
        mode: How the pass ran: `"xla"`, `"compiled"` or `"eager"`.
        note: Why it ran eagerly under `compile="auto"`, and how many layers
            it could not measure (empty when neither).
        spectrum: The singular value spectrum of the input-output Jacobian
            on the same batch (`jacobian_spectrum`), with
            `signal_report(..., spectrum=...)`; None otherwise.
    """

    rows: list[LayerSignal]
    input_norm: float
    loss: float = math.nan
    training: bool = False
    loss_name: str = ""
    grad_reference: str | None = None
    samples: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    blocks: list[BlockSignal] = dataclasses.field(default_factory=list)
    mode: str = "eager"
    note: str = ""
    spectrum: JacobianSpectrum | None = None

    def column(self, field: str) -> np.ndarray:
        """One statistic for every layer, e.g. `report.column("norm_ratio")`."""
        return np.array([getattr(row, field) for row in self.rows], dtype="float64")

    def block_column(self, field: str) -> np.ndarray:
        """One statistic for every residual block, e.g. `report.block_column("variance")`."""
        return np.array([getattr(block, field) for block in self.blocks], dtype="float64")

    def to_dict(self) -> dict:
        """A JSON-safe dict (non-finite floats become strings); samples are left out."""
        def safe(records):
            return [{k: json_safe(v) for k, v in dataclasses.asdict(r).items()} for r in records]

        return {"input_norm": json_safe(self.input_norm), "loss": json_safe(self.loss),
                "training": self.training, "loss_name": self.loss_name,
                "grad_reference": self.grad_reference, "mode": self.mode,
                "rows": safe(self.rows),
                "blocks": safe(self.blocks),
                "spectrum": None if self.spectrum is None else self.spectrum.to_dict()}

    def table(self) -> str:
        """The per-layer table, with the mode, the loss and the gradient reference below it.

        A model with residual blocks gets a second table: one row per block;
        a report with a Jacobian spectrum, its summary below.
        """
        header = ("layer", "class", "mean", "std", "||h||/||x||", "grad ratio", "dW std")
        lines = [(r.name, r.class_name, f"{r.mean:.3g}", f"{r.std:.3g}", f"{r.norm_ratio:.4g}",
                  f"{r.grad_norm_ratio:.4g}", f"{r.weight_grad_std:.3g}") for r in self.rows]
        mode = "training" if self.training else "inference"
        footer = f"training={self.training} ({mode} mode)"
        if self.loss_name:
            footer += (f"; loss {self.loss:.4g} = {self.loss_name}; grad ratio relative to "
                       f"{self.grad_reference or 'nothing (no output reaches the loss)'}")
        else:
            footer += "; no backward pass"
        skipped = [f"skipped {r.name}: {r.reason}" for r in self.rows if r.status != "ok"]
        spectrum = [] if self.spectrum is None else [self.spectrum.summary()]
        text = format_table(header, lines, "\n".join([footer, *skipped, *spectrum]))
        if not self.blocks:
            return text
        header = ("block", "stage", "N", "avg ch mean^2", "avg ch var", "branch var",
                  "skip var")
        lines = [(b.name, str(b.stage), str(b.num_blocks), f"{b.squared_mean:.4g}",
                  f"{b.variance:.4g}", f"{b.branch_variance:.4g}", f"{b.skip_variance:.4g}")
                 for b in self.blocks]
        missing = [f"{b.status} {b.name}: {b.reason}" for b in self.blocks if b.status != "ok"]
        return text + "\n\n" + format_table(
            header, lines, "\n".join(
                ["residual blocks: statistics per channel over batch and positions, averaged "
                 "over channels (Brock et al., 2021)", *missing]))

    def summary(self, print_fn: Callable[[str], None] | None = None) -> None:
        """Prints `table()`: the per-layer table, the mode and the loss."""
        (print_fn or print)(self.table())

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str, *, histograms: bool = False, max_histograms: int = 12,
             title: str | None = None) -> str:
        """Writes a PNG of the per-layer curves (and optionally output histograms).

        A model with residual blocks gets a second row: the signal propagation
        plots of Brock et al. (2021), per block, the output's average channel
        squared mean and variance and the branch's output variance. A report
        with a Jacobian spectrum gets its histogram beside the curves.

        Args:
            path: Where to write the PNG.
            histograms: Also draw histograms of the outputs of up to
                `max_histograms` evenly spaced layers.
            max_histograms: Most histograms drawn.
            title: Figure title.

        Returns:
            The path written.
        """
        histograms = _validate.boolean("histograms", histograms)
        max_histograms = _validate.integer("max_histograms", max_histograms, minimum=1)
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
        block_curves = [
            ("block output: avg channel squared mean", self.block_column("squared_mean")),
            ("block output: avg channel variance", self.block_column("variance")),
            ("residual branch: avg channel variance", self.block_column("branch_variance"))]
        panels = len(curves) + (self.spectrum is not None)
        columns = max(panels, min(len(picked), 6) or 1)
        curve_rows = 2 if self.blocks else 1
        rows = curve_rows + math.ceil(len(picked) / columns)
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
        if self.spectrum is not None:
            self.spectrum.plot(figure.add_subplot(rows, columns, len(curves) + 1))
        if self.blocks:
            blocks = np.arange(1, len(self.blocks) + 1)
            stages = self.block_column("stage")
            starts = blocks[1:][np.diff(stages) != 0]  # the first block of each later stage
            for index, (label, values) in enumerate(block_curves):
                axis = figure.add_subplot(rows, columns, columns + index + 1)
                finite = np.isfinite(values)
                axis.plot(blocks[finite], values[finite], marker="o", markersize=3)
                positive = values[finite & (values > 0)]
                # Linear, as Brock et al. draw them, unless the curve spans decades.
                if positive.size and np.all(values[finite] > 0) and (
                        positive.max() > 100 * positive.min()):
                    axis.set_yscale("log")
                for start in starts:
                    axis.axvline(start - 0.5, color="gray", linestyle=":", linewidth=1)
                axis.set_xlabel("residual block (dotted: new stage)")
                axis.set_title(label, fontsize=9)
                axis.grid(True, alpha=0.3)
        for index, name in enumerate(picked):
            axis = figure.add_subplot(rows, columns, curve_rows * columns + index + 1)
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


def _standing_in(targets, kernels):
    """Within the block, each target's kernel variable reads as its entry of `kernels`
    (a list aligned with `targets`; None: the variables themselves)."""
    if kernels is None:
        return contextlib.nullcontext()
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    scope = keras.StatelessScope(
        state_mapping=[(t.direction_variable, k) for t, k in zip(targets, kernels)])
    enclosing = get_stateless_scope()
    if enclosing is not None:  # the jitted pass's: every other variable keeps its value there
        scope.state_mapping = {**enclosing.state_mapping, **scope.state_mapping}
    return scope


def _ratio(norm: float, reference: float) -> float:
    """`norm / reference`; NaN when the reference is zero (an all-zero batch), not a crash."""
    return norm / reference if reference > 0 else math.nan


def _restore_changed(saved) -> None:
    """Puts back, bit for bit, every variable whose value differs from its snapshot."""
    for variable, value in saved:
        now = ops.convert_to_numpy(variable.value)
        # Bytes, not ==: NaN weights and integer seed states compare exactly too.
        if now.shape != value.shape or now.tobytes() != value.tobytes():
            variable.assign(value)


@dataclasses.dataclass(eq=False)
class _Read:
    """Where the pass reads one tensor of a block: a call of a layer or op (`Graph.hooks`).

    `where` is `("out", position)` for the call's output at that position,
    or `("arg", index)` for its index-th flattened positional argument (the
    sum's own inputs, read in its call). `factor` multiplies the variance
    (a constant factor between the tensor read and the one wanted).
    """

    layer: object
    call: int
    where: tuple
    block: int
    field: str  # "output", "skip" or "branch<i>"
    factor: float = 1.0


@dataclasses.dataclass
class _Blocks:
    """The residual blocks of a model's graph, and where the pass reads their tensors."""

    rows: list  # per block: (name, stage, num_blocks, why unreadable per field)
    reads: list
    note: str = ""


def _block_reads(model) -> _Blocks:
    """Every residual block of the model's graph (`_graph.residual_blocks`) and its reads.

    A sum the model calls (an `Add` layer, an `h + x` op node, an `Add`
    inside a subclassed layer) is read in its own call: its inputs and its
    output. A sum inside a subclassed layer's own code has no call of its
    own: each of its tensors is read where a call makes it (the layer's
    output for the sum's output, a sublayer's output for a branch, through
    scalar constant factors) or takes it (a sublayer called on the sum, as
    a post-norm block's normalization); what no call sees is reported
    missing.
    """
    try:
        graph = _graph.flatten(model)
    except ValueError as error:
        return _Blocks([], [], f"no residual blocks: the model has no graph to walk ({error})")
    blocks, _ = _graph.residual_blocks(graph)
    rows, reads = [], []
    for index, block in enumerate(blocks):
        keys = {"output": block.add.outputs[0], "skip": block.skip,
                **{f"branch{i}": key for i, key in enumerate(block.branches)}}
        missing = {}
        own = graph.hook(block.add.outputs[0]) if block.add.hookable else None
        flat = keras.tree.flatten(block.add.args)
        for field, key in keys.items():
            if own is not None and field == "output":
                reads.append(_Read(own[0], own[1], ("out", own[2]), index, field))
            elif own is not None and _graph.Ref(key) in flat:  # a positional input
                reads.append(_Read(own[0], own[1], ("arg", flat.index(_graph.Ref(key))),
                                   index, field))
            else:
                found, factor = _readable(graph, key)
                if isinstance(found, str):
                    missing[field] = found
                else:
                    reads.append(_Read(*found, index, field, factor))
        rows.append((block.add.name, block.stage, block.num_blocks, _channel_axis(block),
                     missing))
    return _Blocks(rows, reads)


def _readable(graph, key):
    """((layer, call, where), variance factor) of a call that makes `key` (up to a scalar
    factor) or takes it as a positional argument; or (why none does, factor)."""
    factor = 1.0
    while True:
        hook = graph.hook(key)
        if hook is not None:
            return (hook[0], hook[1], ("out", hook[2])), factor
        for user in graph.consumers.get(key, []):
            # A sublayer the inlined code calls on it: a post-norm `norm(x + f(x))`.
            flat = keras.tree.flatten(user.args)
            own = graph.hook(user.outputs[0]) if user.hookable and user.outputs else None
            if own is not None and own[0] is user.layer and _graph.Ref(key) in flat:
                return (user.layer, own[1], ("arg", flat.index(_graph.Ref(key)))), factor
        step = graph.producer.get(key)
        if step is None:
            return "a model input, which no call makes", factor
        rule = step.rule
        scale = None
        if rule is not None and len(set(step.inputs)) == 1:
            ctx = _graph.context(graph, step)
            if all(c.size == 1 for c in ctx.constants()):
                scale = rule.scale(ctx)
        if scale is None:
            where = step.path or "a layer"
            return (f"made by {type(step.layer).__name__} inside {where}'s own code, "
                    "which no pass can hook"), factor
        factor *= scale**2
        key = step.inputs[0]


def _channel_axis(block: _graph.Block) -> int:
    layer = next((end.layer for end in block.branch_ends if end is not None), None)
    inner = getattr(layer, "layer", layer)  # a WeightNormalization wrapper's layer
    return 1 if getattr(inner, "data_format", None) == "channels_first" else -1


def _channel_moments(y, axis: int):
    """(mean_c mean(y_c)^2, mean_c var(y_c)): moments per channel over all other axes."""
    rank = len(y.shape)
    axes = tuple(i for i in range(rank) if rank == 1 or i != axis % rank)
    mean, var = _sweep.moments(ops.stop_gradient(y), axes)
    return ops.mean(ops.square(mean)), ops.mean(var)


def _blocks_hooked(blocks: _Blocks, found: dict, graph):
    """While active, each read of the pass (traced into `graph`, or eager when None) puts
    `found[(block, field)]` = its statistics (tensors of the pass)."""
    by_layer: dict[int, list[_Read]] = {}
    for read in blocks.reads:
        by_layer.setdefault(id(read.layer), []).append(read)

    def watched(mine):
        def wrap(call):
            count = [0]

            def watched_call(*args, **kwargs):
                output = call(*args, **kwargs)
                index, count[0] = count[0], count[0] + 1
                if not _sweep.in_pass(graph):
                    return output
                outs, flat_args = keras.tree.flatten(output), keras.tree.flatten(args)
                for read in mine:
                    if read.call != index:
                        continue
                    kind, position = read.where
                    values = outs if kind == "out" else flat_args
                    if position >= len(values) or not hasattr(values[position], "shape"):
                        continue
                    axis = blocks.rows[read.block][3]
                    squared_mean, variance = _channel_moments(values[position], axis)
                    found[(read.block, read.field)] = (
                        {"squared_mean": squared_mean, "variance": variance}
                        if read.field == "output" else {"variance": variance * read.factor})
                return output
            return watched_call
        return wrap

    return _sweep.wrapped_calls([(mine[0].layer, watched(mine)) for mine in by_layer.values()])


def _block_rows(blocks: _Blocks, keys, values) -> list[BlockSignal]:
    """The `BlockSignal`s from the statistics the pass read (`keys` -> `values`)."""
    read = dict(zip((tuple(k) for k in keys), values, strict=True))
    rows = []
    for index, (name, stage, num_blocks, _, missing) in enumerate(blocks.rows):
        row = BlockSignal(name, stage, num_blocks)
        fields = [r.field for r in blocks.reads if r.block == index] + list(missing)
        why = dict(missing)
        for field in fields:
            if (index, field) not in read and field not in why:
                why[field] = "the pass did not meet the call that makes it"
        output = read.get((index, "output"))
        if output is not None:
            row.squared_mean = float(output["squared_mean"])
            row.variance = float(output["variance"])
        if (index, "skip") in read:
            row.skip_variance = float(read[(index, "skip")]["variance"])
        branches = [read.get((index, f)) for f in fields if f.startswith("branch")]
        if branches and all(b is not None for b in branches):
            row.branch_variance = float(sum(float(b["variance"]) for b in branches))
        if why:
            row.status = "skipped" if "output" in why else "partial"
            row.reason = "; ".join(f"{field}: {text}" for field, text in why.items())
        rows.append(row)
    return rows


# Relative rounding of one value in the output's dtype, for the "sums to 1" test.
_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}


def _sums_to_one(values, dtype: str):
    """Whether every row along the last axis is a probability distribution (a bool tensor)."""
    # A sum of k values, each rounded to relative eps, is off by at most eps * (sum = 1).
    tolerance = max(1e-3, 4 * _EPS.get(dtype, 2.0**-23))
    return ops.logical_and(ops.all(values >= 0),
                           ops.all(ops.abs(ops.sum(values, axis=-1) - 1.0) <= tolerance))


@dataclasses.dataclass(frozen=True)
class _LabelFacts:
    """What the default loss reads of one label array, on the host before the pass.

    The compared fields are part of the traced pass's cache key: labels
    with the same facts take the same loss, so a new batch reuses the trace.
    """

    shape: tuple[int, ...]
    one_hot: bool  # every row along the last axis is a distribution
    classes: int | None  # max + 1 when every value is an integer >= 0, else None
    low: float = dataclasses.field(default=math.nan, compare=False)
    high: float = dataclasses.field(default=math.nan, compare=False)


def _label_facts(y) -> _LabelFacts:
    array = np.asarray(ops.convert_to_numpy(y))
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"The default loss needs numeric labels: pass `loss=`. "
                         f"Received: y of dtype {array.dtype}")
    if array.size == 0:
        return _LabelFacts(array.shape, False, None)
    values = array.astype("float64")
    integral = bool(np.all(np.mod(values, 1) == 0) and np.all(values >= 0))
    return _LabelFacts(array.shape, bool(_sums_to_one(values, "float64")),
                       int(values.max()) + 1 if integral else None,
                       float(values.min()), float(values.max()))


# In a loss description, where "probabilities" or "logits" goes once the pass has run.
_KIND = "{kind}"


def _from_values_or_logits(loss_fn, labels, pred, probabilities):
    """`loss_fn` from probabilities where `probabilities` (a bool tensor) holds, else from
    logits; a `cond`, so the branch not taken adds no gradient (nor NaN) of its own."""
    def from_logits():
        with warnings.catch_warnings():
            # Traced for a softmax output too, where Keras warns; that branch is then not taken.
            warnings.filterwarnings("ignore", message=".*received `from_logits=True`")
            return loss_fn(labels, pred, from_logits=True)

    return ops.cond(probabilities, lambda: loss_fn(labels, pred, from_logits=False),
                    from_logits)


def _default_term(pred, y, facts: _LabelFacts | None, rng: np.random.Generator, name: str):
    """The default loss of one output, what it is, and whether the output holds
    probabilities (a bool tensor; None where that does not matter): see `signal_report`."""
    dtype = keras.backend.standardize_dtype(pred.dtype)
    pred = ops.cast(pred, "float32")
    shape = tuple(pred.shape)
    units = shape[-1] if len(shape) >= 2 else 1
    if units < 2:
        # Cross-entropy over one unit is identically 0 (softmax of one logit is 1).
        if y is None:
            target = rng.standard_normal(shape).astype("float32")
            return (keras.losses.mean_squared_error(target, pred),
                    "mean_squared_error vs seeded N(0, 1) targets", None)
        if int(np.prod(facts.shape)) != int(np.prod(shape)):
            raise ValueError(
                f"The default loss pairs y{name} with an output of shape {shape}: they must have "
                f"as many values. Received: y of shape {facts.shape}")
        target = ops.reshape(ops.cast(y, "float32"), shape)
        return keras.losses.mean_squared_error(target, pred), "mean_squared_error vs y", None
    probabilities = _sums_to_one(pred, dtype)
    if y is None:
        labels = rng.integers(0, units, shape[:-1]).astype("int32")  # every backend has int32
        return (_from_values_or_logits(keras.losses.sparse_categorical_crossentropy, labels,
                                       pred, probabilities),
                f"sparse_categorical_crossentropy from {_KIND} vs seeded labels", probabilities)
    if facts.shape == shape and facts.one_hot:
        return (_from_values_or_logits(keras.losses.categorical_crossentropy,
                                       ops.cast(y, "float32"), pred, probabilities),
                f"categorical_crossentropy from {_KIND} vs y", probabilities)
    if facts.shape in (shape[:-1], shape[:-1] + (1,)):
        if facts.classes is None or facts.classes > units:
            raise ValueError(
                f"The default loss reads y{name} as class indices of an output with {units} "
                f"units: they must be integers in [0, {units}). Pass `loss=` otherwise. "
                f"Received: y with values in [{facts.low:g}, {facts.high:g}]")
        labels = ops.reshape(ops.cast(y, "int32"), shape[:-1])
        return (_from_values_or_logits(keras.losses.sparse_categorical_crossentropy, labels,
                                       pred, probabilities),
                f"sparse_categorical_crossentropy from {_KIND} vs y", probabilities)
    if facts.shape == shape:  # same shape, not distributions: regression targets
        return (keras.losses.mean_squared_error(ops.cast(y, "float32"), pred),
                "mean_squared_error vs y", None)
    raise ValueError(
        f"The default loss cannot pair y{name} with an output of shape {shape}: y must be class "
        "indices, one-hot rows or targets of the output's shape. Pass `loss=` otherwise. "
        f"Received: y of shape {facts.shape}")


def _paired(model, outputs, labels) -> list[tuple[str, object, object]]:
    """(name, output, its labels or None) for each model output, Keras' pairing."""
    if isinstance(outputs, dict):
        names, preds = list(outputs), list(outputs.values())
    else:
        preds = keras.tree.flatten(outputs)
        names = list(getattr(model, "output_names", None) or [])
        if len(names) != len(preds):
            names = [f"output {index}" for index in range(len(preds))]
    if len(preds) == 1:
        if isinstance(labels, (list, tuple, dict)) and len(labels) == 1:
            labels = next(iter(labels.values())) if isinstance(labels, dict) else labels[0]
        return [("", preds[0], labels)]
    if labels is None:
        return [(n, p, None) for n, p in zip(names, preds)]
    if isinstance(outputs, dict) and isinstance(labels, dict) and set(labels) == set(outputs):
        return [(n, p, labels[n]) for n, p in zip(names, preds)]
    if (not isinstance(outputs, dict) and isinstance(labels, (list, tuple))
            and len(labels) == len(preds)):
        return list(zip(names, preds, labels))
    what = (f"a dict with keys {sorted(labels)}" if isinstance(labels, dict) else
            f"a {type(labels).__name__} of length {len(labels)}"
            if isinstance(labels, (list, tuple)) else f"one array of shape {tuple(labels.shape)}")
    expected = (f"a dict with keys {sorted(outputs)}" if isinstance(outputs, dict)
                else f"a list or tuple of {len(preds)} arrays")
    raise ValueError(
        f"The model has {len(preds)} outputs, so `y` must be {expected}, one entry per output. "
        f"Received: y={what}")


def _loss_name(loss) -> str:
    if isinstance(loss, str):
        return loss
    return getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__


def _total_loss(model, outputs, labels, facts, loss, seed: int):
    """The loss summed over the model's outputs, what each term is, and each term's
    probabilities flag (see `_default_term`)."""
    rng = np.random.default_rng(seed)
    loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss
    pairs = _paired(model, outputs, labels)
    facts = ([f for _, _, f in _paired(model, outputs, facts)] if loss is None
             else [None] * len(pairs))
    total, parts, flags = None, [], []
    for (name, pred, y), fact in zip(pairs, facts):
        where = f" of {name!r}" if name else ""
        if loss is None:
            values, what, flag = _default_term(pred, y, fact, rng, where)
        else:
            values, flag = _given_term(loss, loss_fn, y, pred), None
            what = f"{_loss_name(loss)} vs y"
        term = ops.mean(ops.cast(values, "float32"))
        total = term if total is None else total + term
        parts.append(f"{name}: {what}" if name else what)
        flags.append(flag)
    return total, parts, flags


def _no_gradient(loss, how: str) -> ValueError:
    return ValueError(
        f"Argument `loss` gives no gradient: {how}. Write it with `keras.ops` (or the "
        f"backend's tensor ops), or pass `gradients=False`. Received: loss={loss!r}")


def _given_term(loss, loss_fn, y, pred):
    """`loss_fn(y, pred)`; a ValueError where it cannot give a gradient (a NumPy loss)."""
    try:
        values = loss_fn(y, pred)
    except _sweep.UNTRACEABLE_ERRORS as error:
        cause = _sweep.untraceable_cause(error)
        # JAX's tracer met NumPy: under jax.grad as under jax.jit, no gradient can flow.
        if type(cause).__name__ == "TracerArrayConversionError":
            raise _no_gradient(loss, f"it converts the prediction to NumPy "
                                     f"({_sweep.describe(error)})") from error
        raise
    if not ops.is_tensor(values) or _backend.cuts_gradient(values, pred):
        what = f"{type(values).__module__.split('.')[0]}.{type(values).__name__}"
        raise _no_gradient(loss, f"it returned a {what} cut off from the prediction "
                                 "(NumPy on the way cuts the gradient)")
    return values


def _output_statistics(out, rng: np.random.Generator) -> dict:
    """Mean, std and norm of a layer's output, and a sample of its values for histograms.

    The sample's positions are drawn on the host from the output's static
    size, as `rng.choice` draws them from the values themselves.
    """
    values = ops.reshape(ops.stop_gradient(out), (-1,))
    size = int(values.shape[0])
    mean, var = _sweep.moments(values, (0,))
    mean, var = ops.reshape(mean, ()), ops.reshape(var, ())
    positions = rng.choice(size, min(size, _HISTOGRAM_SAMPLES), replace=False)
    return {"mean": mean, "std": ops.sqrt(var),
            # ||h||^2 = n (var + mean^2), in float64: no float32 overflow of the squares.
            "norm": ops.sqrt(size * (var + ops.square(mean))),
            "sample": ops.take(ops.cast(values, "float32"), positions)}


def signal_report(
    model: keras.Model,
    data,
    *,
    gradients: bool = True,
    loss: Callable | str | None = None,
    layers: Sequence[keras.layers.Layer | str] | None = None,
    seed: int = 0,
    training: bool = False,
    compile: str = "auto",
    spectrum: bool | str = False,
) -> SignalReport:
    """Measures the signal through every target layer and residual block: one pass each way.

    For every layer with a kernel (the targets of `lsuv_init`), in execution
    order: the mean and std of its output, the norm ratio `||h_l|| / ||x||`
    and, with `gradients=True`, the backward ratio `||dL/dh_l|| / ||dL/dh_R||`
    and the std of the kernel's gradient. This is what Figure 1 of Arpit et
    al. plots: a well-initialized deep net keeps both ratios near 1.

    The reference layer `R` is the last target, in execution order, whose
    output reaches the loss: the last layer of a plain network, and never a
    head whose output the model discards (its ratio would be 0/0).

    Every residual block of the model's graph (a sum of a skip, identity or
    projection, and one or more branches: an `Add` layer, `h + x` or
    `keras.ops.add` in a functional model, a sum inside a subclassed layer
    or model, which the graph traces into; nested models included) also
    gets, in the same forward pass, the three signal propagation curves of
    Brock et al. (2021) in `SignalReport.blocks`: the average channel
    squared mean and the average channel variance of the block's output
    (the residual stream after the sum), and the average channel variance
    of the branch's output before it. A block whose tensors no call of the
    pass makes or takes (an op inside a subclassed layer's own code) is
    listed all the same, with `status` `"partial"` or `"skipped"` and why. A stream whose
    variance grows by about 1 per block has branches of unit variance; the
    `1/N` rule of `mean_field_init` keeps each branch near `1/N` of the
    stream.

    The report changes nothing: every variable of the model (kernels, BatchNormalization
    moving statistics, dropout seed states...) is, bit for bit, as it was
    before the call, also when the call raises. A model that is not built yet is
    built on the batch first, in inference mode.

    Examples:

    >>> model = keras.Sequential([keras.Input((16,)),
    ...                           keras.layers.Dense(32, activation="relu"),
    ...                           keras.layers.Dense(4, name="logits")])
    >>> x = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")
    >>> report = signal_report(model, x)
    >>> len(report.rows), report.training, report.grad_reference
    (2, False, 'logits')
    >>> report.loss_name
    'sparse_categorical_crossentropy from logits vs seeded labels'

    A one-unit output gets a squared error; `training=True` runs the pass
    with batch statistics:

    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8),
    ...                           keras.layers.BatchNormalization(), keras.layers.Dense(1)])
    >>> report = signal_report(model, x, training=True)
    >>> report.loss_name
    'mean_squared_error vs seeded N(0, 1) targets'
    >>> [float(v) for v in model.layers[1].moving_mean.numpy()[:2]]  # left as it was
    [0.0, 0.0]

    A residual block `h + 0.5 h`, whose statistics are those of the input
    times 1.5 (the output) and 0.5 (the branch):

    >>> inputs = keras.Input((16,))
    >>> branch = keras.layers.Dense(16, use_bias=False,
    ...                             kernel_initializer=keras.initializers.Identity(0.5))(inputs)
    >>> model = keras.Model(inputs, keras.layers.Add(name="add")([inputs, branch]))
    >>> block = signal_report(model, x, gradients=False).blocks[0]
    >>> block.name, block.num_blocks
    ('add', 1)
    >>> variance = float(np.mean(x.var(axis=0)))
    >>> round(block.variance / variance, 4), round(block.branch_variance / variance, 4)
    (2.25, 0.25)

    Args:
        model: A Keras model.
        data: A batch, `(x, y)` tuple, dict of inputs, `tf.data.Dataset` or
            `keras.utils.PyDataset` (first batch). For a model with several
            outputs, `y` is a list or tuple (a dict for dict outputs) with
            one entry per output.
        gradients: Also run the backward pass.
        loss: `loss(y_true, y_pred)` or a Keras loss name, applied to each
            output and summed over outputs (as Keras does with one loss for
            a multi-output model); needs `y`. Default, per output: for an
            output whose last axis has at least 2 units, softmax
            cross-entropy (from its values if they are probabilities, else
            from logits) against `y` (class indices or one-hot rows) or
            against labels drawn with `seed`; `y` of the output's shape that
            is not one-hot rows gets the mean squared error. For one unit,
            where cross-entropy is identically 0, the mean squared error
            against `y` or against N(0, 1) targets drawn with `seed`.
            `SignalReport.loss_name` says which was used.
        layers: Only these layers (objects or names).
        seed: Seeds the random labels and targets, and the histogram samples.
        training: Run the forward pass in training mode (BatchNormalization
            normalizes by the batch's statistics, dropout is active) rather
            than inference mode. The report records which.
        compile: `"auto"` (default): the forward pass, the loss and the
            backward pass as one traced `tf.function` (XLA on an
            accelerator), cached per model, input signature and layer
            configuration, falling back to eager where the model or `loss`
            cannot be traced; `"xla"`, `"compiled"` or `"eager"` force one,
            as for `lsuv_init` (a forced compiled mode raises a ValueError
            that says why the model cannot be traced).
            `SignalReport.mode` says which ran. On Keras' JAX
            backend the same is one `jax.jit` program (`"xla"`), with
            gradients by `jax.grad`; on PyTorch it runs eagerly, with
            gradients by its autograd. JAX differentiates by tracing, so a
            model that cannot be traced gets its forward statistics there
            and no backward pass (`SignalReport.note` says why).
        spectrum: `True`, or the name of a layer (the `output` of
            `jacobian_spectrum`: e.g. the last hidden layer before a
            classifier head), to also measure the singular value spectrum of
            the input-output Jacobian on the same batch, in the same `training`
            mode: `SignalReport.spectrum`, printed under the table. The model
            needs a single input and, for `True`, a single output.

    Returns:
        A `SignalReport`. A target the pass cannot measure (called only
        inside `keras.ops.vectorized_map`, or inside a `tf.function` traced
        before the pass) is a row with `status="skipped"` and its reason.

    Raises:
        ValueError: If `loss` gives no gradient (NumPy on the prediction).

    Reference:
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
        - [Brock, De & Smith, 2021](https://arxiv.org/abs/2101.08692)
    """
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(f"Argument `model` must be a Keras model. Received: model={model!r}")
    gradients = _validate.boolean("gradients", gradients)
    training = _validate.boolean("training", training)
    seed = _validate.seed(seed, allow_none=False)
    compile = _validate.one_of("compile", compile, _sweep.COMPILE_MODES)
    if loss is not None:
        bad_name = False
        if isinstance(loss, str):
            try:
                bad_name = not callable(keras.losses.get(loss))
            except ValueError:
                bad_name = True
        if bad_name or (not callable(loss) and not isinstance(loss, str)):
            raise ValueError("Argument `loss` must be a callable, a Keras loss name or None. "
                             f"Received: loss={loss!r}")
    if not isinstance(spectrum, (bool, str)):
        raise ValueError("Argument `spectrum` must be True, False or a layer name. "
                         f"Received: spectrum={spectrum!r}")
    if spectrum is not False:
        from keras_goodinit import spectrum as _spectrum  # it imports this module

        try:  # before the pass: a bad name should cost nothing and be called `spectrum`
            _spectrum._output_layer(model, None if spectrum is True else spectrum)
        except ValueError as error:
            raise ValueError(f"Argument `spectrum` names no usable output ({error}). "
                             f"Received: spectrum={spectrum!r}") from error
    x, labels = _data.first_element(data)
    _data.check_batch(x)
    if loss is not None and labels is None:
        raise ValueError(
            "A given `loss` needs labels: pass `data=(x, y)`. Received: data without y")
    # The default loss reads the labels on the host, before the pass.
    facts = (keras.tree.map_structure(_label_facts, labels)
             if gradients and loss is None and labels is not None else None)
    targets = _sweep.prepare(model, x, layers)  # also checks `layers`
    blocks = _block_reads(model)
    # With gradients the pass runs in a StatelessScope, which keeps its writes; without, the
    # BatchNormalization moving statistics and seed states move (in training mode, or in a
    # subclassed call that forces bn(x, training=True)). Either way, everything is put back.
    saved = _sweep.snapshot(model.variables)
    try:
        report = _measure(model, x, labels, facts, targets, blocks, gradients=gradients,
                          loss=loss, seed=seed, training=training, compile=compile)
    finally:
        _restore_changed(saved)
    if spectrum is not False:
        report.spectrum = _spectrum.jacobian_spectrum(
            model, x, output=None if spectrum is True else spectrum, training=training)
    return report


def _measure(model, x, labels, facts, targets, blocks, *, gradients, loss, seed, training,
             compile) -> SignalReport:
    outputs: dict[int, object] = {}  # id(target) -> its output, in the pass
    draws: dict[str, np.random.Generator] = {}
    # The statistics are of the output after its activation: a separate activation layer
    # (Keras' builders, most Sequential models) is applied to the measured copy.
    followers = _sweep.followers(model, targets)

    def record(target, y, activation, state):
        out = activation(y)
        if state is None:
            outputs[id(target)] = out
            follower = followers.get(id(target))
            state = _output_statistics(out if follower is None else follower(out),
                                       draws["samples"])
        return out, state

    def program(forward, x, labels):
        """The forward pass, the loss and the backward pass: traced as one function."""
        draws["samples"] = np.random.default_rng(seed)
        found: dict = {}
        with_loss = [gradients]  # whether `compute` computes the loss

        def compute(kernels, perturbations):
            """The pass with `kernels` standing in for the kernel variables: the loss, the
            targets' outputs in execution order, and what else the report needs."""
            with (_standing_in(targets, kernels), _blocks_hooked(
                    blocks, {} if perturbations is not None else found, _sweep.pass_graph())):
                if perturbations is None:
                    result = forward(x)
                else:  # JAX's gradient pass: each output plus a zero, to differentiate by
                    result = _sweep.sweep(model, x, targets, _adding(perturbations),
                                          training=training, preserve=False, traced=True)
                if not with_loss[0]:
                    return None, [], (result, [], [])
                total, parts, flags = _total_loss(model, result.outputs, labels, facts, loss,
                                                  seed)
            if perturbations is None:
                met = [outputs[id(t)] for t in result.order]
            else:
                met = [result.states[id(t)]["out"] for t in result.order]
            return total, met, (result, parts, flags)

        # Tensors that stand in for the kernel variables: a variable mirrored by a
        # tf.distribute strategy cannot be watched in cross-replica context, where the
        # sweep runs.
        kernels = [t.direction_variable.value for t in targets] if gradients else None
        no_gradients = ""
        if gradients:
            try:
                loss_value, _, (result, parts, flags), grads = _backend.loss_gradients(
                    compute, kernels)
            except _sweep.UNTRACEABLE_ERRORS as error:
                # Only a tracer error: a bug in the model or loss raises, as on TF and torch.
                if not (_differentiates_by_tracing(x) and type(
                        _sweep.untraceable_cause(error)).__module__.startswith("jax")):
                    raise
                # JAX differentiates a function by tracing it, eagerly too: a pass that
                # cannot be traced has no gradient there. The forward statistics stand.
                no_gradients = (f"no backward pass: JAX differentiates by tracing, and the "
                                f"model or loss cannot be traced ({_sweep.describe(error)})")
        if not gradients or no_gradients:
            found.clear()  # the failed gradient pass may have met blocks
            draws["samples"] = np.random.default_rng(seed)
            with_loss[0] = False
            loss_value, _, (result, parts, flags) = compute(None, None)
        extra = {"blocks": list(found.values())}
        static = {"blocks": list(found), "note": no_gradients}
        if not gradients or no_gradients:
            return extra, static
        if loss is not None and result.order and all(g is None for g in grads):
            # Nothing the report measures reaches the given loss: it is cut off (a NumPy
            # loss made into a tensor, say); TensorFlow and PyTorch then give None.
            raise _no_gradient(loss, "no layer's output reaches it (NumPy on the way cuts "
                                     "the gradient)")
        position = {id(t): i for i, t in enumerate(targets)}
        order = result.order
        output_grads = grads[:len(order)]
        kernel_grads = [grads[len(order) + position[id(t)]] for t in order]
        # A None gradient: the output never reaches the loss (a discarded head, say).
        static.update(parts=parts, reaching=[i for i, g in enumerate(output_grads)
                                             if g is not None],
                      kernel_grads=[i for i, g in enumerate(kernel_grads) if g is not None])
        output_grads = [g for g in output_grads if g is not None]
        kernel_grads = [g for g in kernel_grads if g is not None]
        extra.update(
            loss=loss_value, flags=[f for f in flags if f is not None],
            grad_norms=[_norm(g) for g in output_grads],
            weight_grad_std=[ops.std(ops.cast(g, "float32")) for g in kernel_grads])
        if not _backend.has_none_gradients():  # an unreached gradient is exactly zero there
            extra.update(reaches=[ops.any(g != 0) for g in output_grads],
                         kernel_reaches=[ops.any(g != 0) for g in kernel_grads])
        return extra, static

    aux = None if labels is None else keras.tree.map_structure(ops.convert_to_tensor, labels)
    key = ("signal_report", gradients, loss, seed,
           None if facts is None else tuple(keras.tree.flatten(facts)),
           _sweep.follower_key(targets, followers))
    result = _sweep.run(model, x, targets, record, key=key, compile=compile, training=training,
                        program=program, aux=aux)
    return _assembled(result, targets, _flat_norm(x), blocks, training=training)


def _differentiates_by_tracing(x) -> bool:
    """Whether gradients of the eager pass on `x` come from tracing it again: on JAX,
    outside a traced program (where `x` is concrete)."""
    leaves = [leaf for leaf in keras.tree.flatten(x) if leaf is not None]
    return _backend.name() == "jax" and not any(_backend.is_traced(leaf) for leaf in leaves)


def _adding(perturbations):
    """A policy adding `perturbations[i]` to the i-th target output met (first calls)."""
    def policy(target, y, activation, state):
        if state is not None:
            return activation(y), state
        out = activation(y) + perturbations[policy.met]
        policy.met += 1
        return out, {"out": out}

    policy.met = 0
    return policy


def _norm(tensor):
    return ops.sqrt(ops.sum(ops.square(ops.cast(tensor, "float32"))))


def _assembled(result: _sweep.SweepResult, targets, input_norm: float, found_blocks: _Blocks,
               *, training: bool) -> SignalReport:
    """The report from what the pass returned (NumPy values and trace-time facts)."""
    rows, samples = [], {}
    for target in result.order:
        state = result.states[id(target)]
        rows.append(LayerSignal(target.path_name, target.class_name, float(state["mean"]),
                                float(state["std"]), _ratio(float(state["norm"]), input_norm)))
        samples[target.path_name] = state["sample"]
    met = {id(t) for t in result.order}
    unmet = [LayerSignal(t.path_name, t.class_name, math.nan, math.nan, math.nan,
                         status="skipped", reason=_sweep.unmet_reason(t, result))
             for t in targets if id(t) not in met]
    extra, static = result.extra, result.static
    blocks = _block_rows(found_blocks, static["blocks"], extra["blocks"])
    skipped = (f"{len(unmet)} of {len(targets)} target layers could not be measured (rows "
               f"with status 'skipped' say why)" if unmet else "")
    unread = sum(b.status != "ok" for b in blocks)
    unread = (f"{unread} of {len(blocks)} residual blocks could not be fully measured "
              "(their status and reason say why)" if unread else "")
    note = "; ".join(n for n in (result.note, static.get("note", ""), skipped,
                                 found_blocks.note, unread) if n)
    report = SignalReport(rows + unmet, input_norm, training=training, samples=samples,
                          blocks=blocks, mode=result.mode, note=note)
    if "loss" not in extra:
        return report
    reaching = _reaching(static["reaching"], extra["grad_norms"], extra.get("reaches"))
    reference = reaching[-1][1] if reaching else math.nan
    for index, norm in reaching:
        rows[index].grad_norm_ratio = _ratio(norm, reference)
    for index, std in _reaching(static["kernel_grads"], extra["weight_grad_std"],
                                extra.get("kernel_reaches")):
        rows[index].weight_grad_std = std
    flags = iter(extra["flags"])
    report.loss = float(extra["loss"])
    report.loss_name = " + ".join(
        part.replace(_KIND, "probabilities" if bool(next(flags)) else "logits")
        if _KIND in part else part for part in static["parts"])
    report.grad_reference = result.order[reaching[-1][0]].name if reaching else None
    return report


def _reaching(indices, values, reaches) -> list[tuple[int, float]]:
    """`(row index, value)` of the gradients that reach the loss: those that are not None
    (`indices`) and, where a backend has no None gradient, not exactly zero (`reaches`)."""
    reaches = [True] * len(indices) if reaches is None else [bool(r) for r in reaches]
    return [(i, float(v)) for i, v, r in zip(indices, values, reaches, strict=True) if r]
