"""Data-free mean-field init of any built Sequential or functional model (Arpit et al., 2019)."""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
from keras import layers as klayers
from keras import ops

from keras_goodinit import (
    _data,
    _distribute,
    _graph,
    _layouts,
    _moments,
    _sweep,
    _validate,
)
from keras_goodinit.initializers import DISTRIBUTIONS, GoodInit
from keras_goodinit.report import InitReport, LayerRecord, format_table
from keras_goodinit.weight_norm import unit_norms

RESIDUAL = ("scaled", None)
_SEPARABLE = (klayers.SeparableConv1D, klayers.SeparableConv2D)
_TRANSPOSE = (klayers.Conv1DTranspose, klayers.Conv2DTranspose, klayers.Conv3DTranspose)
_CONV = (klayers.Conv1D, klayers.Conv2D, klayers.Conv3D, klayers.DepthwiseConv1D,
         klayers.DepthwiseConv2D, *_SEPARABLE)
_DROPOUT = (klayers.Dropout, klayers.SpatialDropout1D, klayers.SpatialDropout2D,
            klayers.SpatialDropout3D, klayers.GaussianDropout)
# Single-input layers that move entries around without changing their values.
_REARRANGE = (klayers.Flatten, klayers.Reshape, klayers.Permute, klayers.Cropping1D,
              klayers.Cropping2D, klayers.Cropping3D, klayers.UpSampling1D,
              klayers.UpSampling2D, klayers.UpSampling3D, klayers.RepeatVector,
              klayers.Identity, klayers.ActivityRegularization, klayers.Masking,
              klayers.InputLayer)
_POOL = (klayers.MaxPooling1D, klayers.MaxPooling2D, klayers.MaxPooling3D,
         klayers.AveragePooling1D, klayers.AveragePooling2D, klayers.AveragePooling3D)
_GLOBAL_POOL = (klayers.GlobalAveragePooling1D, klayers.GlobalAveragePooling2D,
                klayers.GlobalAveragePooling3D, klayers.GlobalMaxPooling1D,
                klayers.GlobalMaxPooling2D, klayers.GlobalMaxPooling3D)
_ZERO_PAD = (klayers.ZeroPadding1D, klayers.ZeroPadding2D, klayers.ZeroPadding3D)
# A non-homogeneous activation's pre-activations are set to this second moment.
TARGET_Q = 1.0


@dataclasses.dataclass
class Signal:
    """Per-entry second moment and mean of a tensor, averaged over channels.

    Both are arrays over the tensor's positions (its shape without the batch
    and channel axes, `()` for a vector), so that zero padding at borders and
    strides are followed exactly.
    """

    power: np.ndarray
    mean: np.ndarray

    @property
    def q(self) -> float:
        return float(np.mean(self.power))


@dataclasses.dataclass
class MeanFieldRecord(LayerRecord):
    """One kernel layer's row of a `mean_field_init` report.

    On top of `LayerRecord`'s fields (`var_after` is the measured
    pre-activation variance, NaN without `data`):

    Attributes:
        gamma: The gain used, `g = sqrt(gamma * C_in / C_out)`.
        predicted: Predicted pre-activation second moment E[y^2].
        measured: Measured E[y^2] on `data`'s first batch; NaN without data.
        num_blocks: N of a residual branch end's `gamma / N`; 0 otherwise.
    """

    gamma: float = math.nan
    predicted: float = math.nan
    measured: float = math.nan
    num_blocks: int = 0


@dataclasses.dataclass
class MeanFieldReport(InitReport):
    """What `mean_field_init` did: one `MeanFieldRecord` per kernel layer.

    Attributes:
        passed_through: `(name, class_name, reason)` of every non-kernel
            layer whose effect on the second moment is not known; the sweep
            treated it as passing its input through.
        add_outputs: `{name: predicted second moment}` of every `Add` output.
    """

    passed_through: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    add_outputs: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["passed_through"] = [list(item) for item in self.passed_through]
        out["add_outputs"] = dict(self.add_outputs)
        return out

    def table(self) -> str:
        header = ("layer", "class", "gamma", "predicted q", "measured q", "status")
        lines = [(r.name, r.class_name, f"{r.gamma:.4g}", f"{r.predicted:.4g}",
                  f"{r.measured:.4g}", r.status + (f" ({r.reason})" if r.reason else ""))
                 for r in self.rows]
        footer = f"{self.method}: {len(self.rows)} kernel layers, " + (
            f"{sum(r.status == 'ok' for r in self.rows)} ok")
        if self.passed_through:
            footer += "; passed through: " + "; ".join(
                f"{name} ({reason})" for name, _, reason in self.passed_through)
        return format_table(header, lines, footer)


def mean_field_init(
    model: keras.Model,
    *,
    residual: str | None = "scaled",
    distribution: str | None = "orthogonal",
    input_variance: float = 1.0,
    data=None,
    seed: int | None = None,
    verbose: int = 1,
) -> MeanFieldReport:
    """Applies the paper's mean-field init to every kernel of a model, by walking its graph.

    Data-free: the second moment of every tensor is propagated through the
    layer graph (nested models included), and each kernel layer (Dense,
    Conv*, Conv*Transpose, DepthwiseConv*, SeparableConv*, EinsumDense with
    a matrix kernel, `WeightNormalization` wrappers) gets, for every output
    unit, a fan-in vector of norm `g = sqrt(gamma * C_in / C_out)`:

    - What follows the layer is found through dropout, pooling, reshapes,
      padding and normalization: a fused activation, or an `Activation`,
      `ReLU`, `LeakyReLU`, `ELU` or `PReLU` layer.
    - A *homogeneous* activation (relu, leaky_relu, prelu, linear) has a
      scale-free gain: `gamma = 1 / E[phi(z)^2]`, z ~ N(0, 1), exactly the
      paper's rule (2 for ReLU, 1 for a linear layer). So ReLU networks get
      the kernels of `GoodInit` and of `keras_goodinit.models` (and the
      paper's invariant: the activations' norm is that of the input).
    - Any other activation (gelu, silu, tanh, sigmoid, elu...) depends on
      the scale of its input, so `gamma` is chosen to make the predicted
      pre-activation second moment `q` exactly 1: with `P` the predicted
      second moment of the layer's input, `q = g^2 P + mean(b^2)`. Between
      equal-width layers this is `gamma = 1 / E[phi(z)^2]`, z ~ N(0, 1), phi
      the activation before the layer: the same formula as for ReLU, one
      layer on. `E[phi^2]` and `E[phi]` come from Gauss-Hermite quadrature
      (closed forms for the piecewise-linear activations).
    - `Add` with an identity or projection skip is a residual block. With
      `residual="scaled"` its branch's last kernel gets `gamma / N`, N the
      number of blocks of its stage (the run of blocks on one stream between
      two shape changes), so that the stream grows by at most
      `(1 + 1/N)^N < e` in second moment over a stage. `residual=None`
      treats every `Add` as a plain sum.

    How moments propagate: through a kernel with random directions
    `E[y_j^2] = ||w_j||^2 * P` (P averaged over the unit's receptive field,
    zero padding included) plus the bias; elementwise activations by their
    Gaussian moments (the mean is tracked, it counts in `E[phi^2]` and in
    sums); `Add` sums second moments and means (inputs taken independent),
    `Average` divides by the count squared, `Multiply` multiplies them,
    `Concatenate` weighs them by width. Normalization layers reset the
    second moment to what their gain gives (`mean(gamma^2 + beta^2)`;
    BatchNormalization with its batch statistics, as at the start of
    training), and dropout multiplies it by `1 / (1 - rate)` (training
    mode). Pooling keeps it (exact for max pooling of equal entries, an
    upper bound for averages). Layers it cannot reason about are listed in
    the report's `passed_through` and pass their input's moments on.

    Biases are kept; the WeightNormalization `g` is set and `v` is kept
    (with `distribution=None`) or re-drawn; the other weights are untouched.
    If anything raises, every weight is left exactly as it was.

    Subclassed models have no graph to walk: they raise a ValueError (use
    `GoodInit` per layer there). A kernel inside a subclassed layer of a
    functional model is reported as skipped and left as it is.

    Examples:

    >>> model = keras.Sequential([keras.Input((64,)),
    ...                           keras.layers.Dense(64, activation="tanh"),
    ...                           keras.layers.Dense(64, activation="gelu"),
    ...                           keras.layers.Dense(10)])
    >>> report = mean_field_init(model, seed=0, verbose=0)
    >>> [round(row.predicted, 3) for row in report.rows]  # the logits: (64 / 10) E[gelu^2]
    [1.0, 1.0, 2.721]
    >>> relu = keras.Sequential([keras.Input((32,)), keras.layers.Dense(32),
    ...                          keras.layers.ReLU(), keras.layers.Dense(8)])
    >>> [row.gamma for row in mean_field_init(relu, verbose=0).rows]
    [2.0, 1.0]

    Args:
        model: A built Sequential or functional model.
        residual: `"scaled"` (the paper's `1/N` for residual branch ends) or
            `None` (every `Add` is a plain sum).
        distribution: `"orthogonal"` or `"normal"` re-draws every kernel's
            directions; `None` keeps them and sets only the norms.
        input_variance: Second moment of the model's inputs' entries.
        data: Optional batch (or dataset: its first batch). If given, one
            forward pass (training mode, every other variable restored)
            measures each kernel layer's pre-activation second moment.
        seed: An int makes the re-drawn directions reproducible (each layer
            gets its own seed, in the order of the model's layers); `None`
            gives fresh ones.
        verbose: 0 silent, 1 or 2 prints the report.

    Returns:
        A `MeanFieldReport` (an `InitReport`) with one `MeanFieldRecord` per
        kernel layer, in execution order.

    Reference:
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"Argument `model` must be a keras.Model. Received: model={model!r}")
    residual = _validate.one_of("residual", residual, RESIDUAL)
    distribution = _validate.one_of("distribution", distribution, (*DISTRIBUTIONS, None))
    input_variance = _validate.number("input_variance", input_variance, positive=True)
    seed = _validate.seed(seed)
    verbose = _validate.verbose(verbose)
    if not model.built:
        raise ValueError("Argument `model` must be built (call it once, or give it a "
                         f"`keras.Input`). Received: model={model.name!r}")
    graph = _graph.flatten(model)
    targets = _sweep.find_targets(model)
    x = None
    if data is not None:
        x = _data.first_batch(data)
        _data.check_batch(x)
    plan = _Planner(graph, targets, residual, input_variance).run()
    rng = None if seed is None else np.random.default_rng(seed)
    seeds = {id(t): (None if rng is None else int(rng.integers(0, 2**31 - 1)),
                     None if rng is None else int(rng.integers(0, 2**31 - 1)))
             for t in targets}
    written = [v for t in targets for v in t.variables()]
    written += [t.inner.depthwise_kernel for t in targets if isinstance(t.inner, _SEPARABLE)]
    with _sweep.atomic(written):
        for target in targets:
            decision = plan.decisions.get(id(target))
            if decision is not None and decision.status == "ok":
                decision.scale = _write(target, decision, distribution, seeds[id(target)])
        # With seed=None every worker drew its own directions: all take the chief's.
        _distribute.broadcast_from_chief(written)
        if x is not None:
            _measure(model, x, targets, plan)
    report = MeanFieldReport("mean_field_init", plan.rows(targets),
                             batches=0 if x is None else 1,
                             passed_through=plan.passed_through,
                             add_outputs=plan.add_outputs)
    if verbose:
        report.summary()
    return report


@dataclasses.dataclass
class _Decision:
    target: _sweep.Target
    gamma: float = math.nan
    ratio: float = math.nan  # C_in / C_out
    predicted: float = math.nan
    measured: float = math.nan
    measured_var: float = math.nan
    status: str = "ok"
    reason: str = ""
    num_blocks: int = 0
    calls: int = 1
    scale: float = 1.0

    @property
    def norm(self) -> float:
        return math.sqrt(self.gamma * self.ratio)


class _Planner:
    """Propagates moments through the graph in execution order, deciding each kernel's gamma."""

    def __init__(self, graph, targets, residual, input_variance):
        self.graph = graph
        self.targets = {id(t.layer): t for t in targets}
        self.residual = residual
        self.kernels = set(self.targets)
        blocks, plain = _graph.residual_blocks(graph, self.kernels)
        self.branch_ends = {}
        self.block_notes = {}
        if residual == "scaled":
            for block in blocks:
                if block.branch_end is not None:
                    self.branch_ends[id(block.branch_end)] = block.num_blocks
                else:
                    self.block_notes[block.add.layer.name] = block.reason
        self.signals = {}
        for key in graph.inputs:
            shape = _map_shape(graph.shapes[key])
            self.signals[key] = Signal(np.full(shape, input_variance), np.zeros(shape))
        self.decisions: dict[int, _Decision] = {}
        self.passed_through: list[tuple[str, str, str]] = []
        self.add_outputs: dict[str, float] = {}
        self._in_graph = {id(s.layer) for s in graph.steps}

    def run(self) -> _Planner:
        for step in self.graph.steps:
            ins = [self.signals[k] for k in step.inputs]
            shapes = [self.graph.shapes[k] for k in step.outputs]
            if id(step.layer) in self.targets:
                outs = [self._kernel(step, ins[0])]
            else:
                outs, note = _propagate(step.layer, ins, [self.graph.shapes[k]
                                                          for k in step.inputs], shapes)
                if note and all(n != step.layer.name for n, _, _ in self.passed_through):
                    self.passed_through.append((step.layer.name, type(step.layer).__name__,
                                                note))
                if isinstance(step.layer, klayers.Add):
                    self.add_outputs[step.layer.name] = outs[0].q
            for key, signal, shape in zip(step.outputs, outs, shapes):
                self.signals[key] = _fit(signal, _map_shape(shape))
        return self

    def _kernel(self, step, signal: Signal) -> Signal:
        target = self.targets[id(step.layer)]
        inner = target.inner
        taps = _taps(inner, signal.power, self.graph.shapes[step.outputs[0]])
        bias = (np.zeros(1) if target.bias is None
                else ops.convert_to_numpy(target.bias).astype(float).ravel())
        decision = self.decisions.get(id(target))
        if decision is None:
            decision = self._decide(step, target, float(np.mean(taps)), bias)
            self.decisions[id(target)] = decision
        else:
            decision.calls += 1
        if decision.status != "ok":  # left as it is: its current norms
            norms = _current_gain(target)
        else:
            norms = decision.norm**2
        pre = Signal(norms * taps + np.mean(bias**2), np.full(taps.shape, np.mean(bias)))
        if decision.calls == 1:
            decision.predicted = pre.q
        spec, reason = _moments.function_spec(getattr(inner, "activation", None))
        if spec is None:
            return pre
        second, first = _moments.moments(spec, pre.mean, pre.power - pre.mean**2)
        return Signal(second, first)

    def _decide(self, step, target, taps: float, bias) -> _Decision:
        decision = _Decision(target)
        unscalable = target.unscalable_reason() or _unsupported(target)
        if unscalable:
            decision.status, decision.reason = "skipped", unscalable
            return decision
        decision.ratio = _fan_ratio(target)
        spec, why = self._following(step, target)
        num_blocks = self.branch_ends.get(id(step), 0)
        if spec.homogeneous or num_blocks:
            gain_spec = spec if spec.homogeneous else _moments.spec_of("linear")
            gamma = _moments.gamma(gain_spec)
            if not spec.homogeneous:
                why += "; the residual stream is linear: its gain counts"
        elif not taps > 0:
            decision.status, decision.reason = "skipped", "its input is predicted to be zero"
            return decision
        else:
            room = TARGET_Q - float(np.mean(bias**2))
            if not room > 0:
                gamma = _moments.gamma(spec)
                why += "; its bias alone exceeds q = 1: gamma at q = 1 used"
            else:
                gamma = room / taps / decision.ratio
                why += f"; q set to {TARGET_Q:g} (input second moment {taps:.3g})"
        if num_blocks:
            gamma /= num_blocks
            why += f"; residual branch end, N = {num_blocks}"
            decision.num_blocks = num_blocks
        decision.gamma, decision.reason = gamma, why
        return decision

    def _following(self, step, target) -> tuple[_moments.ActivationSpec, str]:
        activation = getattr(target.inner, "activation", None)
        spec, reason = _moments.function_spec(activation)
        if activation not in (None, keras.activations.linear):
            if spec is None:
                return _moments.spec_of("linear"), f"{reason}: treated as linear"
            return spec, f"{spec.name} follows (fused)"
        found = _graph.follower(self.graph, step.outputs[0], self.kernels)
        via = f" (through {', '.join(found.through)})" if found.through else ""
        if found.kind == "activation":
            spec, reason = _moments.layer_spec(found.step.layer)
            if spec is None:
                return _moments.spec_of("linear"), f"{reason}: treated as linear{via}"
            return spec, f"{spec.name} follows{via}"
        what = {"add": f"Add {found.step.layer.name!r} follows" if found.step else "",
                "kernel": "a kernel layer follows", "output": "model output",
                "fork": "its output feeds several layers",
                "other": f"{type(found.step.layer).__name__} follows" if found.step else ""}
        return _moments.spec_of("linear"), f"linear: {what[found.kind]}{via}"

    def rows(self, targets) -> list[MeanFieldRecord]:
        order = [self.targets[id(s.layer)] for s in self.graph.steps
                 if id(s.layer) in self.targets]
        seen, rows = set(), []
        for target in order + list(targets):
            if id(target) in seen:
                continue
            seen.add(id(target))
            d = self.decisions.get(id(target))
            if d is None:
                where = _container(target, self.graph)
                rows.append(MeanFieldRecord(target.name, target.class_name, math.nan, math.nan,
                                            0, 1.0, "skipped", where))
                continue
            reason = d.reason + (f"; called {d.calls} times, set at its first call"
                                 if d.calls > 1 else "")
            rows.append(MeanFieldRecord(target.name, target.class_name, math.nan,
                                        d.measured_var, 0, d.scale, d.status, reason,
                                        gamma=d.gamma, predicted=d.predicted,
                                        measured=d.measured, num_blocks=d.num_blocks))
        return rows


def _container(target, graph) -> str:
    for step in graph.steps:
        inside = step.layer._flatten_layers(include_self=False, recursive=True)
        if any(layer is target.layer for layer in inside):
            return (f"inside {type(step.layer).__name__} {step.layer.name!r}, a layer with "
                    "no graph to walk: left as it is")
    return "not called in the model's graph: left as it is"


def _unsupported(target) -> str:
    if isinstance(target.inner, klayers.EinsumDense) and len(target.direction_variable.shape) != 2:
        return "EinsumDense with a kernel of rank > 2: its fans are not known"
    return ""


def _fan_ratio(target) -> float:
    """C_in / C_out of the layer (for a separable conv, of the whole layer)."""
    if isinstance(target.inner, _SEPARABLE):
        return target.inner.depthwise_kernel.shape[-2] / target.direction_variable.shape[-1]
    c_in, c_out = _layouts.channel_fans(tuple(target.direction_variable.shape),
                                        target.kernel_layout)
    return c_in / c_out


def _current_gain(target) -> float:
    """Mean squared norm of the layer's current effective fan-in vectors."""
    if target.is_weight_normalized:
        norms = ops.convert_to_numpy(target.layer.g).astype(float)
    else:
        norms = ops.convert_to_numpy(unit_norms(target.direction_variable.value,
                                                target.kernel_layout)).astype(float)
    gain = float(np.mean(norms**2))
    if isinstance(target.inner, _SEPARABLE):
        gain *= _depthwise_gain(target.inner)
    return gain


def _depthwise_gain(layer) -> float:
    norms = ops.convert_to_numpy(unit_norms(layer.depthwise_kernel.value, "depthwise"))
    return float(np.mean(norms.astype(float) ** 2))


def _map_shape(shape) -> tuple:
    inner = tuple(shape[1:-1])
    return inner if all(isinstance(d, int) for d in inner) else ()


def _fit(signal: Signal, shape: tuple) -> Signal:
    """`signal` over `shape`: kept if it already fits, else its average everywhere."""
    power, mean = np.asarray(signal.power, float), np.asarray(signal.mean, float)
    if power.shape == shape and mean.shape == shape:
        return Signal(power, mean)
    if power.shape == shape:
        return Signal(power, np.full(shape, np.mean(mean)))
    return Signal(np.full(shape, np.mean(power)), np.full(shape, np.mean(mean)))


def _taps(layer, power, out_shape) -> np.ndarray:
    """Mean of the input's second moment over each output position's receptive field."""
    power = np.asarray(power, float)
    out_map = _map_shape(out_shape)
    rank = len(power.shape)
    if not isinstance(layer, (*_CONV, *_TRANSPOSE)) or rank == 0:
        return power if power.shape == out_map else np.full(out_map, np.mean(power))
    kernel_size = tuple(layer.kernel_size)
    if (getattr(layer, "data_format", "channels_last") != "channels_last"
            or layer.padding == "causal" or len(kernel_size) != rank):
        return np.full(out_map, np.mean(power))
    x = ops.convert_to_tensor(power[None, ..., None], "float32")
    ones = np.full(kernel_size + (1, 1), 1.0 / math.prod(kernel_size), "float32")
    if isinstance(layer, _TRANSPOSE):
        y = ops.conv_transpose(x, ones, strides=layer.strides, padding=layer.padding,
                               output_padding=layer.output_padding,
                               dilation_rate=layer.dilation_rate)
    else:
        y = ops.conv(x, ones, strides=layer.strides, padding=layer.padding,
                     dilation_rate=layer.dilation_rate)
    y = ops.convert_to_numpy(y)[0, ..., 0].astype(float)
    return y if y.shape == out_map else np.full(out_map, float(np.mean(y)))


def _propagate(layer, ins: list[Signal], in_shapes, out_shapes) -> tuple[list[Signal], str]:
    """The output moments of a non-kernel layer, and a note if it was not understood."""
    first = ins[0] if ins else Signal(np.ones(()), np.zeros(()))
    out_map = _map_shape(out_shapes[0])
    if _graph.is_activation(layer):
        spec, reason = _moments.layer_spec(layer)
        if spec is None:
            return [first], reason
        second, mean = _moments.moments(spec, first.mean, first.power - first.mean**2)
        return [Signal(second, mean)], ""
    if isinstance(layer, (klayers.Add, klayers.Subtract, klayers.Average)):
        return [_sum(layer, ins)], ""
    if isinstance(layer, klayers.Multiply):
        power, mean = np.ones(()), np.ones(())
        for signal in ins:
            power, mean = power * signal.power, mean * signal.mean
        return [Signal(power, mean)], ""
    if isinstance(layer, klayers.Concatenate):
        return _concatenate(layer, ins, in_shapes, out_shapes)
    if _graph.is_normalization(layer):
        return [_normalized(layer, first)], ""
    if isinstance(layer, _DROPOUT):
        # Inverted dropout x * mask / (1 - rate), or GaussianDropout's x * N(1, rate / (1 - rate)):
        # the mean is kept and E[y^2] = E[x^2] / (1 - rate) in both.
        rate = float(layer.rate)
        return [Signal(first.power / (1 - rate), first.mean)], ""
    if isinstance(layer, klayers.GaussianNoise):
        return [Signal(first.power + float(layer.stddev) ** 2, first.mean)], ""
    if isinstance(layer, klayers.Rescaling):
        scale, offset = float(np.mean(layer.scale)), float(np.mean(layer.offset))
        return [Signal(scale**2 * first.power + 2 * scale * offset * first.mean + offset**2,
                       scale * first.mean + offset)], ""
    if isinstance(layer, _ZERO_PAD):
        return [_zero_padded(layer, first, out_map)], ""
    if isinstance(layer, _POOL):
        return [_pooled(layer, first, out_map)], ""
    if isinstance(layer, _GLOBAL_POOL):
        return [Signal(np.full(out_map, first.q), np.full(out_map, np.mean(first.mean)))], ""
    if isinstance(layer, klayers.Embedding):
        table = ops.convert_to_numpy(layer.embeddings).astype(float)
        return [Signal(np.full(out_map, np.mean(table**2)), np.full(out_map, np.mean(table)))], ""
    if isinstance(layer, (*_REARRANGE, klayers.AlphaDropout)) or type(layer).__name__ == "Cast":
        return [first] * len(out_shapes), ""
    kind = type(layer).__name__
    return [first] * len(out_shapes), f"{kind}: its effect on the second moment is not known"


def _sum(layer, ins: list[Signal]) -> Signal:
    signs = [1.0] * len(ins)
    if isinstance(layer, klayers.Subtract):
        signs = [1.0, -1.0]
    power = sum(s.power for s in ins)
    mean = sum(sign * s.mean for sign, s in zip(signs, ins))
    # Independent inputs: E[(a + b)^2] = E[a^2] + E[b^2] + 2 E[a] E[b].
    for i in range(len(ins)):
        for j in range(i + 1, len(ins)):
            power = power + 2 * signs[i] * signs[j] * ins[i].mean * ins[j].mean
    if isinstance(layer, klayers.Average):
        count = len(ins)
        power, mean = power / count**2, mean / count
    return Signal(power, mean)


def _concatenate(layer, ins, in_shapes, out_shapes):
    rank = len(out_shapes[0])
    axis = layer.axis % rank
    if axis == rank - 1:
        widths = [shape[-1] for shape in in_shapes]
        if all(isinstance(w, int) for w in widths):
            total = sum(widths)
            power = sum(w * s.power for w, s in zip(widths, ins)) / total
            mean = sum(w * s.mean for w, s in zip(widths, ins)) / total
            return [Signal(power, mean)], ""
    elif all(s.power.ndim == rank - 2 and s.mean.shape == s.power.shape for s in ins):
        return [Signal(np.concatenate([s.power for s in ins], axis - 1),
                       np.concatenate([s.mean for s in ins], axis - 1))], ""
    power = np.mean([s.q for s in ins])
    return [Signal(np.asarray(power), np.asarray(np.mean([np.mean(s.mean) for s in ins])))], (
        "Concatenate of inputs of unknown widths: their average second moment is used")


def _normalized(layer, signal: Signal) -> Signal:
    """A normalization layer's output: unit second moment per unit, times its gain."""
    def weight(name, default):
        variable = getattr(layer, name, None)
        if variable is None:
            return np.full(1, default)
        return ops.convert_to_numpy(variable).astype(float).ravel()

    if isinstance(layer, klayers.RMSNormalization):
        gain, shift = weight("scale", 1.0), np.zeros(1)
    else:
        gain, shift = weight("gamma", 1.0), weight("beta", 0.0)
    power = np.mean(gain**2) + np.mean(shift**2)
    mean = np.mean(shift)
    if isinstance(layer, (klayers.BatchNormalization, klayers.GroupNormalization)):
        # Statistics pooled over positions: the profile over positions survives.
        profile = signal.power / signal.q if signal.q > 0 else np.ones(signal.power.shape)
        return Signal(np.mean(gain**2) * profile + np.mean(shift**2),
                      np.full(signal.power.shape, mean))
    return Signal(np.full(signal.power.shape, power), np.full(signal.power.shape, mean))


def _zero_padded(layer, signal: Signal, out_map) -> Signal:
    padding = layer.padding
    if (signal.power.ndim != len(out_map) or signal.power.ndim == 0
            or getattr(layer, "data_format", "channels_last") != "channels_last"):
        return _fit(signal, out_map)
    pads = [tuple(p) if isinstance(p, (tuple, list)) else (p, p) for p in padding]
    if len(pads) != signal.power.ndim:
        return _fit(signal, out_map)
    return Signal(np.pad(signal.power, pads), np.pad(signal.mean, pads))


def _pooled(layer, signal: Signal, out_map) -> Signal:
    if signal.power.ndim == 0 or getattr(layer, "data_format", "channels_last") != (
            "channels_last"):
        return _fit(signal, out_map)
    def pool(values):
        x = ops.convert_to_tensor(values[None, ..., None], "float32")
        y = ops.average_pool(x, layer.pool_size, strides=layer.strides, padding=layer.padding)
        return ops.convert_to_numpy(y)[0, ..., 0].astype(float)
    power, mean = pool(signal.power), pool(signal.mean)
    return _fit(Signal(power, mean), out_map)


def _write(target, decision: _Decision, distribution, seeds) -> float:
    """Sets the target's unit norms to `decision.norm`; returns new / old mean norm."""
    old = math.sqrt(_current_gain(target))
    layout = target.kernel_layout
    kernel = target.direction_variable
    norm = decision.norm
    if isinstance(target.inner, _SEPARABLE):
        depthwise = target.inner.depthwise_kernel
        if distribution is not None:
            multiplier = depthwise.shape[-1]
            # Unit-norm depthwise vectors (gamma = multiplier gives g = 1 there).
            depthwise.assign(GoodInit("wn_linear", gamma=float(multiplier), layout="depthwise",
                                      distribution=distribution, seed=seeds[1]).draw(
                tuple(depthwise.shape), depthwise.dtype))
        norm = norm / math.sqrt(_depthwise_gain(target.inner))
        c_in, c_out = _layouts.channel_fans(tuple(kernel.shape), "default")
        gamma = norm**2 * c_out / c_in
    else:
        gamma = decision.gamma
    if distribution is not None:
        drawn = GoodInit("wn_linear", gamma=gamma, distribution=distribution, layout=layout,
                         seed=seeds[0]).draw(tuple(kernel.shape), kernel.dtype)
        kernel.assign(drawn)
        if target.is_weight_normalized:
            g = target.layer.g
            g.assign(ops.cast(unit_norms(drawn, layout), g.dtype))
    elif target.is_weight_normalized:
        g = target.layer.g
        g.assign(np.full(tuple(g.shape), norm, keras.backend.standardize_dtype(g.dtype)))
    else:
        values = ops.convert_to_numpy(kernel.value).astype("float64")
        axes = _layouts.norm_axes(len(values.shape), layout)
        norms = np.sqrt(np.sum(np.square(values), axis=axes, keepdims=True))
        factor = np.where(norms > 0, norm / np.where(norms > 0, norms, 1.0), 1.0)
        kernel.assign((values * factor).astype(keras.backend.standardize_dtype(kernel.dtype)))
    new = math.sqrt(_current_gain(target))
    return new / old if old > 0 else math.inf


def _measure(model, x, targets, plan: _Planner) -> None:
    """One forward pass (training mode): each kernel layer's pre-activation moments."""
    def policy(target, y, activation, state):
        if state is None:
            mean, var = _sweep.cell_moments(y, tuple(range(len(y.shape))), target.mask)
            state = {"second": float(np.mean(var) + np.mean(np.square(mean))),
                     "var": float(np.mean(var))}
        return activation(y), state

    result = _sweep.sweep(model, x, targets, policy, training=True)
    for target in targets:
        decision = plan.decisions.get(id(target))
        state = result.states.get(id(target))
        if decision is not None and state is not None:
            decision.measured, decision.measured_var = state["second"], state["var"]


def measured_moments(model: keras.Model, x, layer_names, *,
                     training: bool = False) -> dict[str, tuple[float, float]]:
    """`{name: (second moment, variance)}` of the named layers' outputs on the batch `x`.

    A helper for checking a prediction (such as `MeanFieldReport.add_outputs`)
    on data; `model` must be functional or Sequential.
    """
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    probe = keras.Model(inputs, [model.get_layer(name).output for name in layer_names])
    outputs = probe(x, training=training)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    found = {}
    for name, y in zip(layer_names, outputs):
        y = ops.convert_to_numpy(y).astype("float64")
        found[name] = (float(np.mean(y**2)), float(np.var(y)))
    return found

