"""What each kind of layer or op does: one rule per family, in one registry.

Every graph-level feature (`mean_field_init`, residual-aware `lsuv_init`,
`signal_report`'s blocks) reads a step's rule and nothing else about the
layer's class:

- `propagate`: the per-entry mean and second moment of the outputs from
  those of the inputs (the mean-field rules of `docs/concepts.md`).
- `kernel`: a layer with a kernel applied linearly (Dense, Conv*, ...), and
  its kernel layout (which axes hold one unit's fan-in vector).
- `activation`: the elementwise function it applies, as an
  `ActivationSpec` with its Gaussian moments.
- `terms`: for a sum (a layer or an op, two or more tensors), the weight of
  each tensor input; residual blocks are found on these.
- `scale`: for a step that multiplies one tensor by a constant
  (`0.1 * h`, a `LayerScale`), the factor.
- `look_through`: the step does not change which activation a kernel's
  output meets (dropout, pooling, reshapes, padding, normalization).

A layer class with no rule (a subclassed layer) is traced into its ops and
sublayers by `_graph`; an op with no rule is *unanalysed*: the moments after
it are unknown and every row that depends on them says so.

Users teach the registry their own layers with `register_layer_rule`, as
AutoInit's estimator plug-ins do.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import layers as klayers
from keras import ops

from keras_goodinit import _moments

_nn = keras.src.ops.nn
_np = keras.src.ops.numpy
_core = keras.src.ops.core


@dataclasses.dataclass
class Signal:
    """Per-entry second moment and mean of a tensor, averaged over channels.

    Both are arrays over the tensor's positions (its shape without the batch
    and channel axes, `()` for a vector), so that zero padding at borders and
    strides are followed exactly. `unknown` says why they are not known
    ("" when they are): then `power` and `mean` are meaningless.

    Attributes:
        power: E[x^2] per position.
        mean: E[x] per position.
        unknown: Why the moments are not known, or "".
        gaussian: An activation's output: `(spec, mean, variance)` of its
            Gaussian input (max pooling commutes with it).
        mixture: A sum of one activation's output and an independent
            Gaussian rest (the stream `relu(h + f(h))`), followed exactly.
        scores: An unfused attention's logits or weights in flight (`Scores`).
        cross: E[x_i x_j] between two positions i != j along the first
            position axis (two tokens of a sequence), averaged over channels;
            None where it is not followed. The attention rules read it.
    """

    power: np.ndarray
    mean: np.ndarray
    unknown: str = ""
    # An activation's output also keeps its Gaussian input: (spec, mean, variance), so that
    # max pooling, which commutes with a non-decreasing activation, is followed exactly.
    gaussian: tuple | None = None
    # A sum `gain * phi(z) + g` of one activation's output and independent Gaussian rest:
    # (phi spec, mean of z, variance of z, gain, mean of g, variance of g), arrays over
    # positions or floats; an activation applied to it is followed exactly (`_sum_source`).
    mixture: tuple | None = None
    # An unfused attention's logits or weights in flight (`Scores`).
    scores: Any = None
    # E[x_i x_j] between two positions i != j along the first position axis (two tokens of
    # one sequence), averaged over channels and pairs; None where it is not followed. The
    # attention rule reads it: softmax averages tokens, which keeps what they share.
    cross: float | None = None

    @property
    def q(self) -> float:
        return float(np.mean(self.power))

    @classmethod
    def unknown_after(cls, why: str, shape=()) -> Signal:
        return cls(np.full(shape, math.nan), np.full(shape, math.nan), why)


@dataclasses.dataclass
class Context:
    """What a rule sees of one call: the layer or op, its arguments, shapes and mode.

    Attributes:
        layer: The Keras layer or `keras.ops` operation called.
        args: Positional arguments, each tensor replaced by the index of its
            `Signal` in the inputs (as `Input(i)`).
        kwargs: Keyword arguments, the same way.
        in_shapes: Symbolic shapes of the tensor inputs (batch axis first).
        out_shapes: Symbolic shapes of the outputs.
        training: The mode the moments are followed in (BatchNormalization's
            statistics, dropout).
        notes: A rule appends what it had to assume here.
    """

    layer: Any
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    in_shapes: list = dataclasses.field(default_factory=list)
    out_shapes: list = dataclasses.field(default_factory=list)
    training: bool = True
    # What a rule assumed where the graph does not say (a mask from the data, token
    # correlation): reports show these notes.
    notes: list = dataclasses.field(default_factory=list)
    # The values of tensor inputs the caller could compute (masks), by input index.
    values: list | None = None
    # The length the graph traced sequence axes the model leaves open at.
    length: int = 8

    def constants(self) -> list[np.ndarray]:
        """The numeric (non-tensor) positional arguments, as float64 arrays."""
        found = []
        for value in self.args:
            if isinstance(value, Input):
                continue
            array = _numeric(value)
            if array is not None:
                found.append(array)
        return found

    def out_map(self, index: int = 0) -> tuple:
        return map_shape(self.out_shapes[index])


@dataclasses.dataclass(frozen=True)
class Input:
    """A tensor argument of a call: the index of its `Signal` among the inputs."""

    index: int


class LayerRule:
    """The rule of one family of layers or ops; subclass it for your own layers.

    Override what applies: `propagate` for every rule (the default raises
    `NotImplementedError`, which the sweep reports as unanalysed), and the
    family's own method (`layout`, `activation`, `terms`, `scale`).

    The sweep that `lsuv_init`, the data-dependent weight-norm init and the
    diagnostics share reads a kernel layer's rule for which variable to
    rescale (`direction_variable`, after a `depthwise_variable`), which
    kernel axes hold a unit's fan-in where `layout` does not say
    (`fan_axes`), whether `WeightNormalization` can wrap it
    (`weight_norm_refusal`) and along which output axes its bias is
    constant (`bias_cell_axes`). For every layer with weights of its own,
    `build_initializer` says which initializer its `build` drew each weight
    from (`LSUVCallback` re-draws it to tell a fresh model from a trained
    one), and `unscalable_reason` why a layer that is no kernel target is
    left alone. Their defaults fit a layer with one `kernel` variable and
    channels on its last (or, under `data_format="channels_first"`, its
    first) output axis, and say "cannot tell" for any initializer.

    Attributes:
        family: `"kernel"`, `"activation"`, `"normalization"`, `"merge"`,
            `"scale"`, `"rearrange"`, `"dropout"`, `"pool"`, `"padding"`,
            `"embedding"` or `"other"`.
        look_through: The step keeps which activation a kernel output meets.
    """

    family = "other"
    look_through = False

    def propagate(self, ctx: Context, ins: list[Signal]) -> list[Signal]:
        raise NotImplementedError(f"no rule for {type(ctx.layer).__name__}")

    def layout(self, layer) -> str:
        raise NotImplementedError

    def direction_variable(self, layer) -> keras.Variable:
        """The kernel variable that sets `layer`'s output directions (a kernel layer).

        Multiplying it by `c` multiplies the layer's output before the bias
        by `c`: LSUV rescales it, and weight normalization's data init reads
        it. Default: the layer's `kernel` variable (the base kernel under LoRA);
        a ValueError for a layer without one.
        """
        from keras_goodinit.weight_norm import kernel_variable  # as `_builtin_rules` does

        try:
            return kernel_variable(layer)
        except AttributeError as error:
            # A subclass of SeparableConv (pointwise_kernel) given a plain KernelRule, say.
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) has no `kernel` variable "
                f"for its rule ({type(self).__name__}) to rescale: override the rule's "
                "`direction_variable`, or, for a subclass of a Keras layer, register a "
                "subclass of that layer's built-in rule (e.g. `rules.SeparableConvRule`). "
                f"Received: layer={layer.name!r}") from error

    def depthwise_variable(self, layer) -> keras.Variable | None:
        """A depthwise kernel `layer` applies before `direction_variable`, or None.

        SeparableConv's: its norms multiply the layer's gain, so the
        analytic init redraws it (unit-norm) and divides it out, and its
        spatial taps are the layer's receptive field. Default: None.
        """
        return None

    def fan_axes(self, layer, rank: int) -> tuple[list[int], list[int]] | None:
        """(fan-in axes, unit axes) of `layer`'s rank-`rank` kernel where the rule, not
        the `layout` table, places them; None where `layout` does.

        EinsumDense's equation places them (`einsum_axes`, which raises a
        ValueError for an equation without both). Default: None.
        """
        return None

    def weight_norm_refusal(self, layer) -> str:
        """Why `WeightNormalization` cannot wrap `layer`, a layer of this kernel rule; "" if
        it can. It normalizes one kernel variable whose fan-in axes `layout` gives.

        Asked of the layer before it is built. Default: "".
        """
        return ""

    def per_position(self, layer) -> bool:
        """Whether `layer` maps each position (token) of its input on its own, so that the
        cross moment between positions scales as the second moment does (the attention
        rules read it). Default: False, which follows no cross moment.
        """
        return False

    def bias_cell_axes(self, layer, rank: int) -> tuple[int, ...]:
        """The axes of a rank-`rank` output of `layer` along which its bias is constant.

        The sweep's statistics are taken per cell (over these axes), so that
        a layer's bias can centre each cell. Default: every axis but the
        channel axis (`channel_axis`); a ValueError for a bias that varies
        along more than one axis (an EinsumDense's, under a plain `KernelRule`).
        """
        bias = getattr(layer, "bias", None)
        if bias is not None and sum(d != 1 for d in bias.shape) > 1:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) has a bias of shape "
                f"{tuple(bias.shape)}, not one value per channel: override its rule's "
                f"({type(self).__name__}) `bias_cell_axes`, or, for a subclass of a Keras "
                "layer, register a subclass of that layer's built-in rule (e.g. "
                f"`rules.EinsumDenseRule`). Received: layer={layer.name!r}")
        channel = channel_axis(layer) % rank
        return tuple(i for i in range(rank) if i != channel)

    def build_initializer(self, layer, variable: keras.Variable):
        """The initializer `layer`'s `build` drew `variable` from; None where that is not known.

        `LSUVCallback` calls it again and compares, to tell weights still as
        built from trained or loaded ones, so it must be exactly what the
        build called: return None for a weight drawn from a copy, a wrapped
        initializer or a local function (the weight is then "cannot tell",
        never "changed"). Default: `layer.<name>_initializer` (or
        `<stem>_initializer` for a `<stem>_kernel`) where `layer` is built by
        one of the Keras layers' own `build` methods known to draw from
        these attributes (`_ATTRIBUTE_BUILDS`); None for any other layer.
        """
        name = variable.name
        names = [f"{name}_initializer"]
        if name.endswith("_kernel"):  # depthwise_kernel -> depthwise_initializer, ...
            names.append(f"{name[:-len('_kernel')]}_initializer")
        return _attribute_initializer(layer, names)

    def unscalable_reason(self, layer) -> str:
        """Why the sweep cannot set the output variance of `layer`, a layer of this rule
        with trainable weights of its own that is no kernel target (`lsuv_init` reports it).
        """
        if self.family == "embedding":
            return ("an embedding lookup, not a linear map of the layer's input: "
                    "no output variance a kernel scale sets")
        return f"no kernel the sweep can scale ({type(layer).__name__})"

    def activation(self, layer) -> tuple[_moments.ActivationSpec | None, str]:
        return None, f"{type(layer).__name__} is no activation"

    def terms(self, ctx: Context) -> list[float] | None:
        return None

    def scale(self, ctx: Context) -> float | None:
        return None


_RULES: dict[type, LayerRule] = {}
_VERSION = 0  # bumped by each registration: a cached graph may inline a layer that has a rule now


def register_layer_rule(cls: type, rule: LayerRule) -> LayerRule:
    """Teaches every graph-level feature what layers of class `cls` do.

    The rule applies to `cls` and its subclasses (the nearest registered
    class wins). A layer class with a rule is one step of the graph, never
    traced into.

    Examples:

    >>> class Doubler(keras.layers.Layer):
    ...     def call(self, x):
    ...         return 2.0 * x
    >>> class DoublerRule(LayerRule):
    ...     family = "scale"
    ...     def scale(self, ctx):
    ...         return 2.0
    ...     def propagate(self, ctx, ins):
    ...         return [Signal(4.0 * ins[0].power, 2.0 * ins[0].mean)]
    >>> _ = register_layer_rule(Doubler, DoublerRule())
    >>> rule_for(Doubler()).family
    'scale'

    Args:
        cls: A subclass of `keras.layers.Layer` or of Keras' `Operation`.
        rule: A `LayerRule` instance.

    Returns:
        `rule`.
    """
    from keras.src.ops.operation import Operation

    if not (isinstance(cls, type) and issubclass(cls, Operation)):
        raise ValueError(
            f"Argument `cls` must be a Keras layer or operation class. Received: cls={cls!r}")
    if cls in (keras.layers.Layer, Operation, keras.Model):
        raise ValueError(
            "Argument `cls` must be a specific layer class, not a base class every layer "
            f"shares. Received: cls={cls!r}")
    if not isinstance(rule, LayerRule):
        raise ValueError(f"Argument `rule` must be a LayerRule. Received: rule={rule!r}")
    global _VERSION
    _RULES[cls] = rule
    _VERSION += 1
    return rule


def rule_for(op) -> LayerRule | None:
    """The rule of a layer or op: its class's, or its nearest registered base class's."""
    for cls in type(op).__mro__:
        rule = _RULES.get(cls)
        if isinstance(rule, _WrappedKernelRule) and not is_kernel(op.layer):
            return rule_for(op.layer)  # WeightNormalization(LSTM): the LSTM's own (none)
        if rule is not None:
            return rule
    return None


def is_kernel(layer) -> bool:
    rule = rule_for(layer)
    return rule is not None and rule.family == "kernel"


def unscalable_reason(layer) -> str:
    """`LayerRule.unscalable_reason` from the rule of `layer`'s own class.

    Unlike `rule_for`, a `WeightNormalization` of a layer that is no kernel
    answers for itself, as the wrapper: its gains are its own weights.
    """
    for cls in type(layer).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule.unscalable_reason(layer)
    return LayerRule().unscalable_reason(layer)


def channel_axis(layer) -> int:
    """The channel axis of `layer`'s output: 1 under `data_format="channels_first"`, else -1."""
    return 1 if getattr(layer, "data_format", None) == "channels_first" else -1


def map_shape(shape) -> tuple:
    """The positions of a channels-last tensor: its shape without batch and channel axes."""
    inner = tuple(shape[1:-1])
    return inner if all(isinstance(d, int) for d in inner) else ()


def fit(signal: Signal, shape: tuple) -> Signal:
    """`signal` over `shape`: kept if it already fits, else its average everywhere."""
    if signal.unknown:
        return Signal.unknown_after(signal.unknown, shape)
    power, mean = np.asarray(signal.power, float), np.asarray(signal.mean, float)
    mixture = signal.mixture
    if mixture is not None and any(np.shape(part) not in ((), shape) for part in mixture[1:]):
        # Averaged over positions, as `gaussian` is.
        mixture = (mixture[0], *(float(np.mean(part)) for part in mixture[1:]))
    keep = dict(gaussian=signal.gaussian, mixture=mixture, cross=signal.cross,
                scores=signal.scores)
    if power.shape == shape and mean.shape == shape:
        return Signal(power, mean, **keep)
    if power.shape == shape:
        return Signal(power, np.full(shape, np.mean(mean)), **keep)
    return Signal(np.full(shape, np.mean(power)), np.full(shape, np.mean(mean)), **keep)


def cross_of(signal: Signal) -> float | None:
    """`signal.cross`, or None where the signal or its cross moment is unknown."""
    return None if signal.unknown or signal.cross is None else float(signal.cross)


def affine_cross(signal: Signal, scale_sq: float, scale_shift: float = 0.0,
                 shift_sq: float = 0.0) -> float | None:
    """The cross moment after `y = a x + b` per channel: E[a^2] c + 2 E[ab] m + E[b^2]."""
    cross = cross_of(signal)
    if cross is None:
        return None
    return scale_sq * cross + 2 * scale_shift * float(np.mean(signal.mean)) + shift_sq


def _numeric(value) -> np.ndarray | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float, np.ndarray, np.generic)) or isinstance(
            value, keras.Variable) or hasattr(value, "dtype") and hasattr(value, "shape"):
        try:
            array = np.asarray(ops.convert_to_numpy(value), float)
        except (TypeError, ValueError):
            return None
        return array
    return None


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") in ("channels_last", None)


# --- kernels -------------------------------------------------------------------------------

class KernelRule(LayerRule):
    """A kernel applied linearly: `E[y^2] = ||w||^2 E[x^2]` per unit, plus the bias.

    Register it (or a subclass) for a kernel layer of your own, which
    applies `self.activation` to its output as Keras' layers do: `lsuv_init`,
    `mean_field_init` and the diagnostics then treat it as one of theirs.
    Override `direction_variable` where scaling the `kernel` variable does
    not scale the output (SeparableConv's rule returns the pointwise
    kernel), `depthwise_variable` where a depthwise kernel comes first
    (SeparableConv), `fan_axes` where the layout table does not place the
    fan-in axes (EinsumDense's equation does), `weight_norm_refusal` where
    `WeightNormalization` cannot wrap the layer, `bias_cell_axes` where the
    bias is not one value per channel (EinsumDense's rule reads the bias's
    shape), and `build_initializer` where `LSUVCallback` can re-draw a
    weight from the initializer its build used.

    Args:
        layout: How the kernel holds one unit's fan-in vector:
            `"default"` (all axes but the last), `"conv_transpose"` or
            `"depthwise"` (see `GoodInit`'s `layout`).
        conv: `"conv"` or `"transpose"` for a convolution, whose receptive
            field `taps` averages; None for a map of each position alone.

    Examples:

    >>> class Mixer(keras.layers.Layer):
    ...     def __init__(self, units, **kwargs):
    ...         super().__init__(**kwargs)
    ...         self.units, self.activation = units, keras.activations.linear
    ...     def build(self, input_shape):
    ...         self.kernel = self.add_weight((input_shape[-1], self.units), name="kernel")
    ...         self.mix = self.add_weight((self.units, self.units), name="mix")
    ...     def call(self, x):
    ...         return self.activation(ops.matmul(ops.matmul(x, self.kernel), self.mix))
    >>> class MixerRule(KernelRule):
    ...     def direction_variable(self, layer):
    ...         return layer.mix  # LSUV rescales `mix`, and leaves `kernel` as it is
    >>> _ = register_layer_rule(Mixer, MixerRule())
    >>> layer = Mixer(4)
    >>> layer.build((None, 3))
    >>> rule_for(layer).direction_variable(layer).name
    'mix'
    """

    family = "kernel"

    def __init__(self, layout: str = "default", conv: str | None = None):
        self._layout = layout
        self.conv = conv  # "conv", "transpose" or None: how a receptive field is averaged

    def layout(self, layer) -> str:
        return self._layout

    def taps(self, layer, power, out_shape, profile=None) -> np.ndarray:
        """Mean of the input's second moment over each output position's receptive field.

        `profile` weighs the taps (an array of the kernel's spatial shape summing to
        1: the share of the kernel's energy at each tap); None weighs them alike, as
        a freshly drawn orthogonal or Gaussian kernel does on average. A
        delta-orthogonal kernel has all of it at the centre: no border loss.
        """
        power = np.asarray(power, float)
        out_map = map_shape(out_shape)
        rank = len(power.shape)
        if self.conv is None or rank == 0:
            return power if power.shape == out_map else np.full(out_map, np.mean(power))
        kernel_size = tuple(layer.kernel_size)
        if not _channels_last(layer) or layer.padding == "causal" or len(kernel_size) != rank:
            return np.full(out_map, np.mean(power))
        if self.conv == "conv":
            y = _window_mean(power, kernel_size, _tuple(layer.strides, rank),
                             _tuple(layer.dilation_rate, rank), layer.padding, profile)
            return y if y.shape == out_map else np.full(out_map, float(np.mean(y)))
        x = ops.convert_to_tensor(power[None, ..., None], "float32")
        ones = (np.full(kernel_size, 1.0 / math.prod(kernel_size)) if profile is None
                else np.asarray(profile, float)).astype("float32")[..., None, None]
        if self.conv == "transpose":
            y = ops.conv_transpose(x, ones, strides=layer.strides, padding=layer.padding,
                                   output_padding=layer.output_padding,
                                   dilation_rate=layer.dilation_rate)
        else:
            y = ops.conv(x, ones, strides=layer.strides, padding=layer.padding,
                         dilation_rate=layer.dilation_rate)
        y = ops.convert_to_numpy(y)[0, ..., 0].astype(float)
        return y if y.shape == out_map else np.full(out_map, float(np.mean(y)))


def _tuple(value, rank: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * rank


def _window_mean(power: np.ndarray, kernel, strides, dilation, padding,
                 profile=None) -> np.ndarray:
    """The mean of `power` over each output position's receptive field, zero padding
    counted, as a convolution with `padding` ("valid" or "same") places its windows;
    weighted by `profile` (the taps' shares, summing to 1) where given.

    NumPy on the small position map: no backend op (and no compile) per layer.
    """
    pads = []
    for n, k, s, d in zip(power.shape, kernel, strides, dilation):
        span = d * (k - 1) + 1
        if padding == "same":
            out = -(-n // s)
            total = max((out - 1) * s + span - n, 0)
            pads.append((total // 2, total - total // 2))
        else:
            pads.append((0, 0))
    padded = np.pad(power, pads)
    spans = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    windows = np.lib.stride_tricks.sliding_window_view(padded, spans)
    rank = power.ndim
    windows = windows[tuple(slice(None, None, s) for s in strides)
                      + tuple(slice(None, None, d) for d in dilation)]
    if profile is None:
        return windows.mean(axis=tuple(range(rank, 2 * rank)))
    return np.tensordot(windows, np.asarray(profile, float), axes=rank)


# --- activations ---------------------------------------------------------------------------

def activation_output(spec: _moments.ActivationSpec, signal: Signal) -> Signal:
    """An elementwise activation's output moments.

    The input is taken Gaussian, unless it is a sum carrying a `mixture` (one
    activation's output plus an independent Gaussian rest, as the stream
    `relu(h + f(h))` of a post-activation ResNet): then the moments are those
    of that law, exactly (`_moments.sum_moments`), and the output's Gaussian
    source is the moment-matched one (`_moments.match_moments`).
    """
    if signal.unknown:
        return signal
    var = signal.power - signal.mean**2
    plain = (spec, float(np.mean(signal.mean)), float(np.mean(var)))
    if signal.mixture is None:
        second, first = _moments.moments(spec, signal.mean, var)
        cross = None
        if signal.cross is not None:  # two positions as a correlated Gaussian pair
            cross = _moments.cross_moment(spec, plain[1], plain[2], signal.cross - plain[1]**2)
        return Signal(np.asarray(second, float), np.asarray(first, float), gaussian=plain,
                      cross=cross)
    if _moments._affine_identity(spec):  # a linear activation keeps the law
        return Signal(signal.power, signal.mean, gaussian=plain, mixture=signal.mixture,
                      cross=signal.cross)
    source, mean, source_var, gain, other_mean, other_var = signal.mixture
    second, first = _moments.sum_moments(source, mean, source_var, gain, spec, other_mean,
                                         other_var)
    second = np.broadcast_to(second, np.shape(signal.power)).astype(float)
    first = np.broadcast_to(first, np.shape(signal.power)).astype(float)
    matched = _moments.match_moments(spec, second, first)
    if matched is not None:
        plain = (spec, float(np.mean(matched[0])), float(np.mean(matched[1])))
    return Signal(second, first, gaussian=plain)


def _is_gaussian(signal: Signal) -> bool:
    """The entries are Gaussian (a kernel's output) or their law is not known: no source."""
    return signal.mixture is None and (
        signal.gaussian is None or _moments._affine_identity(signal.gaussian[0]))


def _sum_source(terms: list[tuple[float, Signal]], shape: tuple) -> tuple | None:
    """The `mixture` of a weighted sum of independent tensors, or None.

    One term, an activation's output (its `gaussian`) or a sum that is one
    already (its `mixture`), keeps its law; the others are taken Gaussian,
    their means and variances adding. Of several such terms the one of most
    second moment keeps its law. The source is rescaled to each position's
    second moment where its activation is homogeneous (zero padding's borders).
    """
    candidates = [(w**2 * s.q, i) for i, (w, s) in enumerate(terms) if not _is_gaussian(s)]
    if not candidates:
        return None
    chosen = max(candidates)[1]
    weight, signal = terms[chosen]
    other_mean, other_var = np.zeros(shape), np.zeros(shape)
    for i, (w, s) in enumerate(terms):
        if i != chosen:
            other_mean = other_mean + w * s.mean
            other_var = other_var + w**2 * np.maximum(s.power - s.mean**2, 0.0)
    if signal.mixture is not None:
        source, mean, var, gain, mean_g, var_g = signal.mixture
        return (source, mean, var, weight * gain, weight * np.asarray(mean_g) + other_mean,
                weight**2 * np.asarray(var_g) + other_var)
    source, mean, var = signal.gaussian
    mean, var = np.full(shape, float(mean)), np.full(shape, float(var))
    reference = float(_moments.moments(source, mean.flat[0], var.flat[0])[0])
    if source.homogeneous and reference > 0:
        scale = np.sqrt(np.broadcast_to(signal.power, shape) / reference)
        mean, var = scale * mean, scale**2 * var
    return (source, mean, var, weight, other_mean, other_var)


class ActivationRule(LayerRule):
    """An elementwise function: its Gaussian moments (`_moments`)."""

    family = "activation"

    def __init__(self, spec: Callable[[Any], tuple] | None = None):
        self._spec = spec

    def activation(self, layer):
        if self._spec is not None:
            return self._spec(layer)
        return _moments.layer_spec(layer)

    def propagate(self, ctx, ins):
        spec, reason = self.activation(ctx.layer)
        if spec is None:
            return [Signal.unknown_after(f"{ctx.layer.name}: {reason}", ctx.out_map())]
        return [activation_output(spec, ins[0])]


def _op_spec(name: str, function=None, pieces=None, homogeneous=False):
    """The spec maker of an activation op: piecewise forms where exact, else its own call."""
    def spec(op):
        if pieces is not None:
            return _moments.ActivationSpec(name, None, pieces(op), homogeneous(op)
                                           if callable(homogeneous) else homogeneous), ""
        if function is not None:
            return _moments.spec_of(function), ""
        return _moments.ActivationSpec(name, op.call), ""
    return spec


# --- normalization -------------------------------------------------------------------------

class NormalizationRule(LayerRule):
    """Output of unit second moment per unit, times the layer's gain (and shift)."""

    family = "normalization"
    look_through = True

    def propagate(self, ctx, ins):
        layer, signal = ctx.layer, ins[0]
        gain, shift = self._affine(layer)
        if isinstance(layer, klayers.BatchNormalization) and not ctx.training:
            return [self._inference(layer, signal, gain, shift)]
        mean = float(np.mean(shift))
        shape = signal.power.shape if not signal.unknown else ctx.out_map()
        cross = self._cross(layer, signal, gain, shift)
        if isinstance(layer, (klayers.BatchNormalization, klayers.GroupNormalization)) and (
                not signal.unknown):
            # Statistics pooled over positions: the profile over positions survives.
            profile = signal.power / signal.q if signal.q > 0 else np.ones(shape)
            return [Signal(np.mean(gain**2) * profile + np.mean(shift**2), np.full(shape, mean),
                           cross=cross)]
        power = np.mean(gain**2) + np.mean(shift**2)
        return [Signal(np.full(shape, power), np.full(shape, mean), cross=cross)]

    @staticmethod
    def _cross(layer, signal, gain, shift) -> float | None:
        """Two positions after normalizing: their correlation, centred unless RMS, times the
        gain, plus the shift (wide layers: the statistics are close to their expectations)."""
        cross = cross_of(signal)
        if cross is None or not signal.q > 0:
            return None
        centre = 0.0 if isinstance(layer, klayers.RMSNormalization) else float(
            np.mean(signal.mean)) ** 2
        spread = signal.q - centre
        if not spread > 0:
            return None
        rho = min(max((cross - centre) / spread, -1.0), 1.0)
        return float(np.mean(gain**2) * rho + np.mean(shift**2))

    @staticmethod
    def _affine(layer):
        def weight(name, default):
            variable = getattr(layer, name, None)
            if variable is None:
                return np.full(1, default)
            return ops.convert_to_numpy(variable).astype(float).ravel()

        if isinstance(layer, klayers.RMSNormalization):
            return weight("scale", 1.0), np.zeros(1)
        return weight("gamma", 1.0), weight("beta", 0.0)

    @staticmethod
    def _inference(layer, signal, gain, shift):
        """BatchNormalization with its moving statistics: a fixed affine map per channel."""
        if signal.unknown:
            return signal
        moving_mean = ops.convert_to_numpy(layer.moving_mean).astype(float).ravel()
        moving_var = ops.convert_to_numpy(layer.moving_variance).astype(float).ravel()
        a = gain / np.sqrt(moving_var + float(layer.epsilon))
        b = shift - a * moving_mean
        # Per channel y = a x + b, with x's moments the same in every channel.
        power = (np.mean(a**2) * signal.power + 2 * np.mean(a * b) * signal.mean
                 + np.mean(b**2))
        return Signal(power, np.mean(a) * signal.mean + np.mean(b),
                      cross=affine_cross(signal, np.mean(a**2), np.mean(a * b), np.mean(b**2)))


# --- merges and ops ------------------------------------------------------------------------

def _tensor_inputs(ctx) -> list[int]:
    return [v.index for v in keras.tree.flatten((ctx.args, ctx.kwargs)) if isinstance(v, Input)]


class SumRule(LayerRule):
    """A weighted sum of tensors (and constants): inputs taken independent."""

    family = "merge"

    def __init__(self, sign: float = 1.0, average: bool = False):
        self.sign, self.average = sign, average

    def terms(self, ctx):
        count = len(_tensor_inputs(ctx))
        if isinstance(ctx.layer, keras.layers.Layer):  # Add, Subtract, Average: a list
            weights = [1.0] + [self.sign] * (count - 1)
        else:
            weights = [1.0, self.sign] if count == 2 else [1.0]
        if self.average:
            weights = [w / count for w in weights]
        return weights if count >= 2 else None

    def propagate(self, ctx, ins):
        known = [s for s in ins if not s.unknown]
        if len(known) < len(ins):
            return [next(s for s in ins if s.unknown)]
        weights = self.terms(ctx)
        if weights is None:  # one tensor and a constant: a shift
            constants = ctx.constants()
            tensor_first = not ctx.args or isinstance(ctx.args[0], Input)
            # x - c shifts by -c; c - x negates x.
            shift = (self.sign if tensor_first else 1.0) * sum(
                float(np.mean(c)) for c in constants)
            signal = ins[0]
            sign = 1.0 if tensor_first else self.sign
            mean = sign * signal.mean + shift
            power = signal.power + 2 * sign * signal.mean * shift + shift**2
            return [Signal(power, mean, cross=affine_cross(signal, 1.0, sign * shift, shift**2))]
        # A tensor that enters twice (h + h) is one term with the summed weight.
        total: dict[int, float] = {}
        for w, index in zip(weights, _tensor_inputs(ctx)):
            total[index] = total.get(index, 0.0) + w
        terms = [(w, ins[i]) for i, w in total.items()]
        power = sum(w**2 * s.power for w, s in terms)
        mean = sum(w * s.mean for w, s in terms)
        # Independent inputs: E[(a + b)^2] = E[a^2] + E[b^2] + 2 E[a] E[b].
        for i in range(len(terms)):
            for j in range(i + 1, len(terms)):
                power = power + 2 * terms[i][0] * terms[j][0] * terms[i][1].mean * terms[j][1].mean
        power, mean = (np.array(a) for a in np.broadcast_arrays(np.asarray(power, float),
                                                                np.asarray(mean, float)))
        try:
            mixture = _sum_source(terms, power.shape)
        except ValueError:  # inputs over positions that do not broadcast
            mixture = None
        cross = None
        if all(cross_of(s) is not None for _, s in terms):
            cross = sum(w**2 * s.cross for w, s in terms) + 2 * sum(
                terms[i][0] * terms[j][0] * float(np.mean(terms[i][1].mean))
                * float(np.mean(terms[j][1].mean))
                for i in range(len(terms)) for j in range(i + 1, len(terms)))
        return [Signal(power, mean, mixture=mixture, cross=cross)]


class ProductRule(LayerRule):
    """A product of independent tensors, or a tensor times constants (a scale)."""

    family = "merge"

    def __init__(self, divide: bool = False):
        self.divide = divide

    def scale(self, ctx):
        if len(_tensor_inputs(ctx)) != 1:
            return None
        constants = ctx.constants()
        if len(constants) != 1 or constants[0].size == 0:
            return None
        # A per-channel factor (a LayerScale's gamma) scales the second moment by mean(c^2).
        value = (float(constants[0].ravel()[0]) if constants[0].size == 1
                 else float(np.sqrt(np.mean(constants[0] ** 2))))
        if self.divide:
            if not isinstance(ctx.args[0], Input) or value == 0:
                return None
            return 1.0 / value
        return value

    def propagate(self, ctx, ins):
        for signal in ins:
            if signal.unknown:
                return [signal]
        if self.divide and len(ins) != 1:
            return [Signal.unknown_after(f"{ctx.layer.name}: a ratio of two tensors",
                                         ctx.out_map())]
        power, mean, cross = np.ones(()), np.ones(()), 1.0
        counts: dict[int, int] = {}
        for index in _tensor_inputs(ctx):
            counts[index] = counts.get(index, 0) + 1
        for index, count in counts.items():
            signal = ins[index]
            if count == 1:
                power, mean = power * signal.power, mean * signal.mean
                # Independent factors: the cross moments multiply too.
                cross = None if cross is None or cross_of(signal) is None else (
                    cross * signal.cross)
            elif count == 2:  # x * x: the Gaussian's fourth and second moments
                cross = None
                var = signal.power - signal.mean**2
                power = power * (3 * var**2 + 6 * signal.mean**2 * var + signal.mean**4)
                mean = mean * signal.power
            else:
                return [Signal.unknown_after(f"{ctx.layer.name}: a power of a tensor",
                                             ctx.out_map())]
        for constant in ctx.constants():
            if self.divide:
                if isinstance(ctx.args[0], Input) and np.all(constant != 0):
                    constant = 1.0 / constant
                else:
                    return [Signal.unknown_after(f"{ctx.layer.name}: divides by a tensor",
                                                 ctx.out_map())]
            # A per-channel constant: the channel average of c^2 and of c.
            power, mean = power * float(np.mean(constant**2)), mean * float(np.mean(constant))
            cross = None if cross is None else cross * float(np.mean(constant**2))
        scores = None
        if len(counts) == 1 and ins[next(iter(counts))].scores is not None:
            # Attention logits scaled after the query-key einsum (Llama): their spread too.
            scores = ins[next(iter(counts))].scores
            if scores.stage == "logits":
                factor = float(power / ins[next(iter(counts))].power.mean()) if np.all(
                    ins[next(iter(counts))].power > 0) else 1.0
                scores = dataclasses.replace(scores, spread=scores.spread * float(
                    np.mean(factor)))
        return [Signal(power, mean, cross=cross, scores=scores)]


class ConcatenateRule(LayerRule):
    family = "merge"

    def propagate(self, ctx, ins):
        for signal in ins:
            if signal.unknown:
                return [signal]
        layer = ctx.layer
        rank = len(ctx.out_shapes[0])
        axis = getattr(layer, "axis", ctx.kwargs.get("axis", -1))
        if not isinstance(axis, int):
            axis = -1
        if len(ctx.args) > 1 and isinstance(ctx.args[1], int):
            axis = ctx.args[1]
        axis %= rank
        if axis == 0:  # the batch axis: every entry keeps its moments
            power = np.mean([s.power for s in ins], axis=0)
            return [fit(Signal(power, np.mean([s.mean for s in ins], axis=0)), ctx.out_map())]
        if axis == rank - 1:
            widths = [shape[-1] for shape in ctx.in_shapes]
            if all(isinstance(w, int) for w in widths):
                total = sum(widths)
                power = sum(w * s.power for w, s in zip(widths, ins)) / total
                mean = sum(w * s.mean for w, s in zip(widths, ins)) / total
                cross = None if any(cross_of(s) is None for s in ins) else sum(
                    w * s.cross for w, s in zip(widths, ins)) / total
                return [Signal(power, mean, cross=cross)]
        elif all(s.power.ndim == rank - 2 and s.mean.shape == s.power.shape for s in ins):
            return [Signal(np.concatenate([s.power for s in ins], axis - 1),
                           np.concatenate([s.mean for s in ins], axis - 1))]
        return [Signal(np.asarray(np.mean([s.q for s in ins])),
                       np.asarray(np.mean([np.mean(s.mean) for s in ins])))]


class NegativeRule(LayerRule):
    family = "scale"

    def scale(self, ctx):
        return -1.0

    def propagate(self, ctx, ins):
        signal = ins[0]
        return [signal if signal.unknown else Signal(signal.power, -signal.mean,
                                                      cross=signal.cross)]


class ResidualGateRule(LayerRule):
    """A `layers.ResidualGate`: its input times the gate's scalar `alpha` as it is now."""

    family = "scale"

    def scale(self, ctx):
        return float(ops.convert_to_numpy(ctx.layer.alpha))

    def propagate(self, ctx, ins):
        return [scaled(ins[0], self.scale(ctx))]


def scaled(signal: Signal, factor: float) -> Signal:
    """The moments of `factor * x`."""
    if signal.unknown:
        return signal
    return Signal(factor**2 * signal.power, factor * signal.mean,
                  cross=affine_cross(signal, factor**2))


# --- single-input rearrangements, dropout, pooling, padding ---------------------------------

class RearrangeRule(LayerRule):
    """Moves entries around without changing their values: the moments pass."""

    family = "rearrange"
    look_through = True

    def propagate(self, ctx, ins):
        signal = ins[0]
        if signal.cross is not None and not _keeps_positions(ctx):
            signal = dataclasses.replace(signal, cross=None)
        return [signal] * max(1, len(ctx.out_shapes))


def _keeps_positions(ctx) -> bool:
    """The first position axis (axis 1) still holds the same positions after the step."""
    layer = ctx.layer
    if isinstance(layer, (_np.Transpose, _np.Moveaxis, _np.Swapaxes, klayers.Permute,
                          klayers.Flatten, klayers.RepeatVector, _np.Repeat, _np.Tile,
                          _np.GetItem)) or "Cropping" in type(layer).__name__ or (
                              "UpSampling" in type(layer).__name__):
        axes = getattr(layer, "axes", None)
        if isinstance(layer, _np.Transpose) and axes is not None and len(axes) > 1:
            return axes[0] == 0 and axes[1] == 1
        return False
    ins, outs = ctx.in_shapes, ctx.out_shapes
    if not ins or not outs or len(ins[0]) < 3 or len(outs[0]) < 3:
        return not isinstance(layer, (klayers.Reshape, _np.Reshape, _np.ExpandDims,
                                      _np.Squeeze))
    return ins[0][1] == outs[0][1] and ins[0][0] == outs[0][0]


class DropoutRule(LayerRule):
    """Noise in training mode, the identity in inference mode."""

    family = "dropout"
    look_through = True

    def propagate(self, ctx, ins):
        signal = ins[0]
        if signal.unknown or not ctx.training:
            return [signal]
        return [self.noisy(signal, ctx.layer)]

    def noisy(self, signal: Signal, layer) -> Signal:
        # Inverted dropout x * mask / (1 - rate), or GaussianDropout's x * N(1, rate / (1 -
        # rate)): the mean is kept and E[y^2] = E[x^2] / (1 - rate) in both.
        # Independent masks: two positions' product keeps its expectation.
        rate = float(layer.rate)
        scores = signal.scores
        if scores is not None:  # attention weights: the mask's E[m^2] = 1 / (1 - rate)
            scores = dataclasses.replace(scores, dropout=scores.dropout / (1 - rate))
        return Signal(signal.power / (1 - rate), signal.mean, cross=signal.cross, scores=scores)


class NoiseRule(DropoutRule):
    """GaussianNoise: an independent N(0, stddev^2) added in training mode."""

    def noisy(self, signal: Signal, layer) -> Signal:
        return Signal(signal.power + float(layer.stddev) ** 2, signal.mean, cross=signal.cross)


def _max_of(signal: Signal, count: int) -> Signal:
    """The largest of `count` independent entries: exact for an activation's output whose
    Gaussian input is known (the activation commutes with max), else the entries are
    taken Gaussian themselves. Neighbours are in fact correlated, so this is an upper bound."""
    if signal.gaussian is not None:
        spec, mean, var = signal.gaussian
    else:
        spec, mean = _moments.spec_of("linear"), float(np.mean(signal.mean))
        var = max(signal.q - mean**2, 0.0)
    power, first = _moments.max_moments(spec, mean, var, max(int(count), 1))
    return Signal(np.asarray(power), np.asarray(first))


class PoolRule(LayerRule):
    """Local pooling: averages follow the profile over positions; max pooling takes the
    largest of each window's entries (`_max_of`)."""

    family = "pool"
    look_through = True

    def __init__(self, maximum: bool = False):
        self.maximum = maximum

    def propagate(self, ctx, ins):
        layer, signal, out_map = ctx.layer, ins[0], ctx.out_map()
        if signal.unknown:
            return [fit(signal, out_map)]
        if self.maximum:
            return [fit(_max_of(signal, math.prod(layer.pool_size)), out_map)]
        if signal.power.ndim == 0 or not _channels_last(layer):
            return [fit(signal, out_map)]

        def pool(values):
            x = ops.convert_to_tensor(values[None, ..., None], "float32")
            y = ops.average_pool(x, layer.pool_size, strides=layer.strides,
                                 padding=layer.padding)
            return ops.convert_to_numpy(y)[0, ..., 0].astype(float)
        return [fit(Signal(pool(signal.power), pool(signal.mean)), out_map)]


class GlobalPoolRule(LayerRule):
    """Global pooling: an average keeps the second moment of the entries (an upper bound:
    exact for identical entries); a maximum takes the largest of them (`_max_of`)."""

    family = "pool"
    look_through = True

    def __init__(self, maximum: bool = False):
        self.maximum = maximum

    def propagate(self, ctx, ins):
        signal, out_map = ins[0], ctx.out_map()
        if signal.unknown:
            return [Signal.unknown_after(signal.unknown, out_map)]
        if self.maximum:
            positions = math.prod(d for d in ctx.in_shapes[0][1:-1] if isinstance(d, int))
            return [fit(_max_of(signal, positions), out_map)]
        return [Signal(np.full(out_map, signal.q), np.full(out_map, np.mean(signal.mean)))]


class ZeroPaddingRule(LayerRule):
    family = "padding"
    look_through = True

    def propagate(self, ctx, ins):
        layer, signal, out_map = ctx.layer, ins[0], ctx.out_map()
        if (signal.unknown or signal.power.ndim != len(out_map) or signal.power.ndim == 0
                or not _channels_last(layer)):
            return [fit(signal, out_map)]
        pads = [tuple(p) if isinstance(p, (tuple, list)) else (p, p) for p in layer.padding]
        if len(pads) != signal.power.ndim:
            return [fit(signal, out_map)]
        return [Signal(np.pad(signal.power, pads), np.pad(signal.mean, pads),
                       gaussian=signal.gaussian)]


class RescalingRule(LayerRule):
    """`x * scale + offset`, per channel where they are vectors (channel averages)."""

    family = "scale"

    def scale(self, ctx):
        scale, offset = self._affine(ctx.layer)
        return float(np.sqrt(np.mean(scale**2))) if not np.any(offset) else None

    def propagate(self, ctx, ins):
        signal = ins[0]
        if signal.unknown:
            return [signal]
        scale, offset = self._affine(ctx.layer)
        return [Signal(np.mean(scale**2) * signal.power
                       + 2 * np.mean(scale * offset) * signal.mean + np.mean(offset**2),
                       np.mean(scale) * signal.mean + np.mean(offset),
                       cross=affine_cross(signal, np.mean(scale**2), np.mean(scale * offset),
                                          np.mean(offset**2)))]

    @staticmethod
    def _affine(layer):
        scale = np.asarray(ops.convert_to_numpy(layer.scale), float).ravel()
        offset = np.asarray(ops.convert_to_numpy(layer.offset), float).ravel()
        scale, offset = np.broadcast_arrays(scale, offset)
        return scale, offset


class EmbeddingRule(LayerRule):
    family = "embedding"

    def propagate(self, ctx, ins):
        table = ops.convert_to_numpy(ctx.layer.embeddings).astype(float)
        out_map = ctx.out_map()
        # Two positions holding independent ids, uniform over the vocabulary (an assumption
        # the data may break): E[e_a e_b] per channel is that channel's mean squared.
        return [Signal(np.full(out_map, np.mean(table**2)), np.full(out_map, np.mean(table)),
                       cross=float(np.mean(np.mean(table, axis=0) ** 2)))]


class ConstantRule(LayerRule):
    """`ones_like` and friends: a tensor of one known value."""

    family = "other"

    def __init__(self, value: float):
        self.value = value

    def propagate(self, ctx, ins):
        out_map = ctx.out_map()
        return [Signal(np.full(out_map, self.value**2), np.full(out_map, self.value),
                       cross=self.value**2)]


# --- attention -----------------------------------------------------------------------------

_ATTENTION_ARGS = ("query", "key", "value", "bias", "mask", "scale")


def attention_arguments(ctx) -> dict:
    """The arguments of a `dot_product_attention` call by name (tensors as `Input`)."""
    bound = dict(zip(_ATTENTION_ARGS, ctx.args))
    bound.update({k: v for k, v in ctx.kwargs.items() if k in _ATTENTION_ARGS})
    return bound


_SAMPLES = 1 << 17  # logits drawn per estimate: the estimate's relative error is ~1e-3
_SQUARES: dict = {}


def softmax_square(count: int, var: float) -> float:
    """`E[sum_j p_j^2]` for p = softmax of `count` independent N(0, var) logits.

    From 1/count (uniform attention, var = 0) up to 1 (one-hot, large var).
    Estimated with fixed random numbers (seed 0, 2^17 logits), so the same
    arguments give the same value on every machine up to float rounding.

    Examples:

    >>> softmax_square(16, 0.0)  # uniform: 1 / 16
    0.0625
    >>> 0.1 < softmax_square(16, 1.0) < 0.2  # about e / 16 for many keys
    True

    Args:
        count: The number of keys a query sees.
        var: The variance of its logits over those keys.

    Returns:
        The expected sum of the squared weights, in [1 / count, 1].
    """
    count = max(int(count), 1)
    if count == 1 or var <= 0:
        return 1.0 / count
    key = (count, round(float(var), 6))
    if key not in _SQUARES:
        rows = max(_SAMPLES // count, 256)
        z = np.random.default_rng(0).standard_normal((rows, count)) * math.sqrt(var)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        _SQUARES[key] = float(np.mean(np.sum(p * p, axis=1)))
    return _SQUARES[key]


_HERMITE_X, _HERMITE_W = np.polynomial.hermite_e.hermegauss(8)
_HERMITE_W = _HERMITE_W / _HERMITE_W.sum()


def _softmax_square_over_queries(count: int, logits: float, depth: int) -> float:
    """`softmax_square` averaged over the query's own squared norm.

    One query's logits have variance `logits * |q|^2 / (d E[q^2])`: a chi-square
    with d degrees of freedom over d for Gaussian queries, taken here by the
    Wilson-Hilferty cube of a normal (8 Gauss-Hermite nodes), so that the
    rule is exact for independent Gaussian queries, keys and values.
    """
    d = max(int(depth), 1)
    spread = math.sqrt(2.0 / (9.0 * d))
    factors = np.maximum(1.0 - 2.0 / (9.0 * d) + spread * _HERMITE_X, 0.0) ** 3
    return float(sum(w * softmax_square(count, logits * f)
                     for w, f in zip(_HERMITE_W, factors)))


def _visible_keys(ctx, mask, queries: int, keys: int, causal: bool) -> np.ndarray:
    """Which keys each query sees, a (queries, keys) array of 0/1 (averaged over a batch).

    A mask computed from the model's inputs counts where the caller computed it
    (`ctx.values`); its own length then wins over the graph's.
    """
    visible = np.ones((queries, keys))
    array = None
    if isinstance(mask, Input):
        if ctx.values is not None and ctx.values[mask.index] is not None:
            array = np.asarray(ctx.values[mask.index])
            ctx.notes.append("its mask computed for sequences without padding")
        else:
            ctx.notes.append("a mask tensor from the data taken as all keys visible")
    elif mask is not None:
        array = _numeric(mask)
    if array is not None and array.ndim >= 2:
        visible = np.mean(array.reshape(-1, *array.shape[-2:]) != 0, axis=0)
        queries, keys = visible.shape
    if causal:
        # Query i sees the keys up to its own position (with a cache: the later queries).
        visible = visible * np.tri(queries, keys, keys - queries)
    return visible


def _lengths(ctx, queries, keys) -> tuple[int, int]:
    if queries is None or keys is None:
        ctx.notes.append(f"sequence length open in the graph: {ctx.length} taken")
        queries = ctx.length if queries is None else queries
        keys = queries if keys is None else keys
    return int(queries), int(keys)


def _spread(query: Signal, key: Signal, depth: int, ctx) -> float:
    """The variance of one query's logits `q.k` over its keys (the scale inside `query`)."""
    key_cross = cross_of(key)
    if key_cross is None:
        ctx.notes.append("tokens taken independent (their correlation is not followed here)")
        key_cross = float(np.mean(key.mean)) ** 2
    return depth * query.q * max(key.q - key_cross, 0.0)


@dataclasses.dataclass(frozen=True)
class Scores:
    """Attention logits (`stage="logits"`) or weights (`"weights"`) of an unfused attention,
    carried by a `Signal` from the query-key einsum through the softmax to the value einsum.

    Attributes:
        spread: The variance of one query's logits over its keys.
        depth: The size the logits sum over (the head dimension).
        queries: The number of query positions.
        keys: The number of key positions.
        stage: `"logits"` before the softmax, `"weights"` after it.
        visible: After the softmax, which keys each query sees (queries x keys).
        dropout: E[m^2] / E[m]^2 of a dropout mask on the weights (1: none).
    """

    spread: float
    depth: int
    queries: int
    keys: int
    stage: str = "logits"
    visible: Any = None
    dropout: float = 1.0


def _attention_output(value: Signal, visible: np.ndarray, squares: np.ndarray,
                      out_map: tuple, dropout: float = 1.0) -> Signal:
    """`o_i = sum_j p_ij v_j`: `E[o_i^2] = c_v + (f q_v - c_v) E[sum_j p_ij^2]` (f the
    dropout mask's E[m^2]), and two queries share `c_v + (q_v - c_v) |V_i & V_i'| /
    (n_i n_i')` (their weights taken independent)."""
    value_cross = cross_of(value)
    if value_cross is None:
        value_cross = float(np.mean(value.mean)) ** 2
    power = value_cross + (dropout * value.q - value_cross) * squares  # per query
    counts = visible.sum(axis=1)
    overlap = (visible @ visible.T) / np.maximum(np.outer(counts, counts), 1)
    pairs = len(counts) * (len(counts) - 1)
    cross = value_cross + max(value.q - value_cross, 0.0) * (
        (overlap.sum() - np.trace(overlap)) / pairs if pairs else 0.0)
    shape = out_map if out_map else ()
    power = power.reshape((-1,) + (1,) * (len(shape) - 1)) if shape else np.mean(power)
    if shape and np.shape(power)[0] != shape[0]:
        power = np.mean(power)
    return Signal(np.broadcast_to(power, shape).astype(float),
                  np.full(shape, float(np.mean(value.mean))), cross=float(cross))


def _squares(visible: np.ndarray, spread: float, depth: int) -> np.ndarray:
    return np.array([_softmax_square_over_queries(n, spread, depth)
                     for n in visible.sum(axis=1)])


class AttentionRule(LayerRule):
    """`dot_product_attention`: softmax(scale Q K^T + mask) V at init.

    (docs/concepts.md, "Attention and transformer blocks".)

    The output at query i is a weighted average of the visible values, so
    `E[o_i^2] = c_v + (q_v - c_v) E[sum_j p_ij^2]` (c_v the values' cross
    moment between tokens). The logits of one query over its keys have variance
    `scale^2 d q_q (q_k - c_k)`: what varies from key to key. The weights are
    taken as a softmax of independent Gaussian logits (`softmax_square`), and two
    queries' weights as independent (their overlap `|V_i & V_i'| / (n_i n_i')`
    sets the output's cross moment). A mask tensor computed from the data
    (padding) is taken as all keys visible, and the report says so. The same
    rule, split in three (`EinsumRule`, `SoftmaxRule`, `EinsumRule`), follows
    attentions written as einsums and a softmax layer.
    """

    family = "attention"

    def propagate(self, ctx, ins):
        bound = attention_arguments(ctx)
        roles = {}
        for name in ("query", "key", "value"):
            if not isinstance(bound.get(name), Input):
                raise NotImplementedError(f"{name} is not a tensor")
            roles[name] = ins[bound[name].index]
        for signal in roles.values():
            if signal.unknown:
                return [signal]
        out_map = ctx.out_map()
        if isinstance(bound.get("bias"), Input):
            return [Signal.unknown_after(
                f"{ctx.layer.name}: an additive attention bias (no rule)", out_map)]
        q_shape = ctx.in_shapes[bound["query"].index]
        k_shape = ctx.in_shapes[bound["key"].index]
        depth = q_shape[-1]
        queries, keys = _lengths(ctx, q_shape[1], k_shape[1])
        scale = _numeric(bound.get("scale"))
        scale = 1.0 / math.sqrt(depth) if scale is None else float(scale.ravel()[0])
        visible = _visible_keys(ctx, bound.get("mask"), queries, keys,
                                bool(getattr(ctx.layer, "is_causal", False)))
        if getattr(ctx.layer, "attn_logits_soft_cap", None):
            ctx.notes.append("the logits' soft cap taken as the identity")
        spread = scale**2 * _spread(roles["query"], roles["key"], depth, ctx)
        return [_attention_output(roles["value"], visible, _squares(visible, spread, depth),
                                  out_map)]


def _einsum_parts(ctx) -> tuple[list[str], str, list[int]] | None:
    """(operand subscripts, output subscripts, operand input indices) of a two-tensor einsum."""
    equation = getattr(ctx.layer, "subscripts", None)  # the Einsum op keeps it
    operands = list(ctx.args)
    if equation is None and operands and isinstance(operands[0], str):
        equation, operands = operands[0], operands[1:]
    if not isinstance(equation, str) or "..." in equation or "->" not in equation:
        return None
    if len(operands) != 2 or not all(isinstance(a, Input) for a in operands):
        return None
    inputs, output = equation.replace(" ", "").split("->")
    return inputs.split(","), output, [a.index for a in operands]


def einsum_role(ctx, operand: int) -> tuple[str, int] | None:
    """("query" or "key", the size summed over) of operand `operand` (its index among the
    step's inputs) of a query-key einsum; ("value", 0) of a weights-value one; else None."""
    parts = _einsum_parts(ctx)
    if parts is None:
        return None
    subscripts, output, indices = parts
    if operand not in indices:
        return None
    position = indices.index(operand)
    key_letter = output[-1]
    owners = [i for i, sub in enumerate(subscripts) if key_letter in sub]
    summed = [c for c in set(subscripts[0]) & set(subscripts[1]) if c not in output]
    if len(owners) != 1 or not summed or len(subscripts[owners[0]]) < 3 or (
            subscripts[owners[0]][1] != key_letter):
        return ("value", 0) if len(subscripts[position]) >= 3 else None
    shape = ctx.in_shapes[indices[owners[0]]]
    depth = 1
    for c in summed:
        size = shape[subscripts[owners[0]].index(c)]
        depth *= size if isinstance(size, int) else 1
    return ("key" if position == owners[0] else "query"), depth


class EinsumRule(LayerRule):
    """`ops.einsum` of two tensors where it is half an attention (`AttentionRule`):
    query-key logits (the output's last axis runs over one operand's positions, a
    size is summed over), or softmax weights times values."""

    family = "other"

    def propagate(self, ctx, ins):
        parts = _einsum_parts(ctx)
        if parts is None:
            raise NotImplementedError("no rule for an einsum other than an attention's")
        subscripts, output, indices = parts
        signals = [ins[i] for i in indices]
        for signal in signals:
            if signal.unknown:
                return [signal]
        shapes = [ctx.in_shapes[i] for i in indices]
        weighted = [i for i, s in enumerate(signals) if s.scores is not None
                    and s.scores.stage == "weights"]
        if weighted:
            (w,) = weighted[:1]
            scores, value = signals[w].scores, signals[1 - w]
            squares = _squares(scores.visible, scores.spread, scores.depth)
            return [_attention_output(value, scores.visible, squares, ctx.out_map(),
                                      scores.dropout)]
        key_letter = output[-1]
        owners = [i for i, sub in enumerate(subscripts) if key_letter in sub]
        summed = [c for c in set(subscripts[0]) & set(subscripts[1]) if c not in output]
        if len(owners) != 1 or not summed or len(subscripts[owners[0]]) < 3 or (
                subscripts[owners[0]][1] != key_letter):
            raise NotImplementedError("no rule for an einsum other than an attention's")
        k = owners[0]
        q = 1 - k
        depth = 1
        for c in summed:
            size = shapes[k][subscripts[k].index(c)]
            depth *= size if isinstance(size, int) else 1
        queries, keys = _lengths(ctx, shapes[q][1], shapes[k][1])
        spread = _spread(signals[q], signals[k], depth, ctx)
        out_map = ctx.out_map()
        power = depth * signals[q].q * signals[k].q
        mean = depth * float(np.mean(signals[q].mean)) * float(np.mean(signals[k].mean))
        return [Signal(np.full(out_map, power), np.full(out_map, mean),
                       scores=Scores(spread, depth, queries, keys))]


class SoftmaxRule(ActivationRule):
    """A softmax: attention weights where its input carries logits (`Scores`); otherwise
    not elementwise, so no rule."""

    def propagate(self, ctx, ins):
        signal = ins[0]
        scores = signal.scores
        if signal.unknown or scores is None or scores.stage != "logits":
            return super().propagate(ctx, ins)
        mask = ctx.kwargs.get("mask", ctx.args[1] if len(ctx.args) > 1 else None)
        visible = _visible_keys(ctx, mask, scores.queries, scores.keys, False)
        squares = _squares(visible, scores.spread, scores.depth)
        keys = max(visible.shape[1], 1)
        out_map = ctx.out_map()
        # Per entry over all keys (a masked key's weight is 0): E[p^2] = E[sum p^2] / keys.
        return [Signal(np.full(out_map, float(np.mean(squares)) / keys),
                       np.full(out_map, 1.0 / keys),
                       scores=dataclasses.replace(scores, stage="weights", visible=visible))]


class DenseRule(KernelRule):
    """The rule of Keras' `Dense`: a map of each position alone (`per_position`).

    Subclass it for the rule of a subclass of `Dense`, as for every Keras
    kernel layer's built-in rule: a plain `KernelRule` would lose what this
    one knows of the layer.
    """

    def per_position(self, layer):
        return True


class SeparableConvRule(KernelRule):
    """The rule of Keras' `SeparableConv1D` and `SeparableConv2D`: a depthwise kernel, then
    a pointwise one that mixes the channels.

    The pointwise kernel is the `direction_variable` and the depthwise one
    the `depthwise_variable`; `WeightNormalization` refuses the two kernels.
    A layer of this rule has no `kernel`: register it, or a subclass, for a
    subclass of a SeparableConv layer.

    Args:
        layout: As `KernelRule`'s (the pointwise kernel's).
        conv: As `KernelRule`'s (the depthwise kernel's receptive field).

    Examples:

    >>> class MySeparable(keras.layers.SeparableConv2D):
    ...     pass
    >>> _ = register_layer_rule(MySeparable, SeparableConvRule())
    >>> layer = MySeparable(4, 3)
    >>> layer.build((None, 8, 8, 3))
    >>> rule = rule_for(layer)
    >>> rule.direction_variable(layer).name, rule.depthwise_variable(layer).name
    ('pointwise_kernel', 'depthwise_kernel')
    """

    def __init__(self, layout: str = "default", conv: str | None = "conv"):
        super().__init__(layout, conv)

    def direction_variable(self, layer):
        # The pointwise kernel sets the output's directions; scaling it scales the output.
        return layer.pointwise_kernel

    def depthwise_variable(self, layer):
        return layer.depthwise_kernel

    def weight_norm_refusal(self, layer):
        return "two kernels (depthwise, then pointwise)"


class DepthwiseConvRule(KernelRule):
    """The rule of Keras' `DepthwiseConv1D` and `DepthwiseConv2D`: one kernel per input
    channel, drawn from `depthwise_initializer` (`build_initializer`).

    Args:
        layout: As `KernelRule`'s.
        conv: As `KernelRule`'s.
    """

    def __init__(self, layout: str = "depthwise", conv: str | None = "conv"):
        super().__init__(layout, conv)

    def build_initializer(self, layer, variable):
        if variable.name != "kernel":
            return super().build_initializer(layer, variable)
        # Keras names the variable `kernel` but its initializer `depthwise_initializer`.
        return _attribute_initializer(layer, ["depthwise_initializer"])


class EinsumDenseRule(KernelRule):
    """The rule of Keras' `EinsumDense`: its equation places the kernel's fan-in axes
    (`fan_axes`, from `einsum_axes`), its bias's shape the bias's axes (`bias_cell_axes`).

    Register it, or a subclass, for a subclass of `EinsumDense`: a plain
    `KernelRule` would take the kernel's axes from the layout table, not
    from the equation.
    """

    def fan_axes(self, layer, rank):
        return einsum_axes(layer.equation, rank)

    def per_position(self, layer):
        # Position-wise where the input's position axis (its second letter, or `...`) is
        # carried to the output's and not contracted with the kernel.
        inputs, output = layer.equation.split("->")
        letters = inputs.split(",")[0]
        if letters.startswith("...") or len(letters) < 3:
            return letters.startswith("...") or len(letters) == 2
        return len(output) > 1 and output[1] == letters[1] and letters[1] not in (
            inputs.split(",")[1])

    def weight_norm_refusal(self, layer):
        return "its equation, not a kernel layout, places the kernel's fan-in axes"

    def bias_cell_axes(self, layer, rank):
        bias = getattr(layer, "bias", None)
        if bias is None:
            return super().bias_cell_axes(layer, rank)
        # The bias broadcasts against the output's last axes: constant where it has size 1.
        shape = (1,) * (rank - len(bias.shape)) + tuple(bias.shape)
        return tuple(i for i, d in enumerate(shape) if d == 1)

    def build_initializer(self, layer, variable):
        initializer = super().build_initializer(layer, variable)
        if (variable.name == "kernel"
                and isinstance(initializer, keras.initializers.VarianceScaling)
                and (initializer.input_axes is None or initializer.output_axes is None)):
            return None  # EinsumDense.build draws from a copy given the einsum's fan axes.
        return initializer


class _RecurrentCellRule(LayerRule):
    """SimpleRNNCell, LSTMCell, GRUCell, ConvLSTMCell: a cell's weights, met inside its RNN
    layer (whose rule, `_recurrent.RecurrentRule`, follows the moments through time)."""

    def propagate(self, ctx, ins):
        # Called by a layer of its own (one step), the cell is one step with no moments.
        raise NotImplementedError(
            f"{type(ctx.layer).__name__}: a recurrent cell called on its own, not by its "
            "RNN layer: no moment rule for one step")

    def build_initializer(self, layer, variable):
        if variable.name == "bias" and getattr(layer, "unit_forget_bias", False):
            return None  # LSTMCell builds this bias with a local function, not the attribute.
        return super().build_initializer(layer, variable)

    def unscalable_reason(self, layer):
        return ("recurrent cell: its kernels act through time, so one scale does not "
                "set its output variance")


def _attribute_builds() -> frozenset:
    """`build` methods known to draw each weight `name` from `layer.<name>_initializer`.

    A layer whose build draws from something else (a cloned or wrapped
    initializer) would look changed while fresh, so other layers, and
    subclasses that override `build`, count as "cannot tell"
    (`LayerRule.build_initializer`).
    """
    classes = (klayers.Dense, klayers.EinsumDense, klayers.Conv1D, klayers.Conv2D,
               klayers.Conv3D, klayers.Conv1DTranspose, klayers.Conv2DTranspose,
               klayers.Conv3DTranspose, klayers.DepthwiseConv1D, klayers.DepthwiseConv2D,
               klayers.SeparableConv1D, klayers.SeparableConv2D, klayers.BatchNormalization,
               klayers.LayerNormalization, klayers.GroupNormalization, klayers.Embedding,
               klayers.PReLU)
    from keras_goodinit.weight_norm import _cell_classes  # Keras' cells, ConvLSTMCell too

    return frozenset(cls.build for cls in classes + _cell_classes())


_ATTRIBUTE_BUILDS = _attribute_builds()


def _attribute_initializer(layer, names):
    """The first of `layer`'s attributes `names` that holds an initializer, where `layer`'s
    `build` is one of `_ATTRIBUTE_BUILDS`; else None."""
    if type(layer).build not in _ATTRIBUTE_BUILDS:
        return None
    for name in names:
        initializer = getattr(layer, name, None)
        if isinstance(initializer, keras.initializers.Initializer):
            return initializer
    return None


def _builtin_rules() -> None:
    a = keras.activations
    _RULES[klayers.Dense] = DenseRule()
    _RULES[klayers.EinsumDense] = EinsumDenseRule()  # its fans: `einsum_axes`
    for cls in (klayers.Conv1D, klayers.Conv2D, klayers.Conv3D):
        _RULES[cls] = KernelRule("default", "conv")
    for cls in (klayers.SeparableConv1D, klayers.SeparableConv2D):
        _RULES[cls] = SeparableConvRule()
    for cls in (klayers.Conv1DTranspose, klayers.Conv2DTranspose, klayers.Conv3DTranspose):
        _RULES[cls] = KernelRule("conv_transpose", "transpose")
    for cls in (klayers.DepthwiseConv1D, klayers.DepthwiseConv2D):
        _RULES[cls] = DepthwiseConvRule()
    from keras_goodinit.weight_norm import WeightNormalization, _cell_classes

    # Inside its RNN layer (`_recurrent.RecurrentRule`, one step); called on its own, one step
    # without moments.
    cell = _RecurrentCellRule()
    for cls in _cell_classes():
        _RULES[cls] = cell
    _RULES[WeightNormalization] = _WrappedKernelRule()

    activation = ActivationRule()
    for cls in (klayers.Activation, klayers.ReLU, klayers.LeakyReLU, klayers.ELU,
                klayers.PReLU, klayers.Softmax):
        _RULES[cls] = activation
    relu_like = {
        _nn.Relu: _op_spec("relu", a.relu),
        _nn.Relu6: _op_spec("relu6", a.relu6),
        _nn.LeakyRelu: _op_spec("leaky_relu", pieces=lambda op: _moments.relu_pieces(
            float(op.negative_slope)), homogeneous=True),
    }
    for cls in (_nn.Sigmoid, _nn.Softplus, _nn.Softsign, _nn.Silu, _nn.LogSigmoid,
                _nn.HardSigmoid, _nn.HardSilu, _nn.Elu, _nn.Selu, _nn.Gelu, _nn.Celu,
                _nn.TanhShrink, _nn.HardTanh, _nn.HardShrink, _nn.SoftShrink,
                _nn.SparsePlus, _nn.Squareplus, _nn.SparseSigmoid, _np.Tanh):
        relu_like[cls] = _op_spec(cls.__name__.lower())
    for cls, spec in relu_like.items():
        _RULES[cls] = ActivationRule(spec)

    normalization = NormalizationRule()
    for cls in (klayers.BatchNormalization, klayers.LayerNormalization,
                klayers.GroupNormalization, klayers.RMSNormalization):
        _RULES[cls] = normalization

    _RULES[klayers.Add] = _RULES[_np.Add] = SumRule()
    _RULES[klayers.Subtract] = _RULES[_np.Subtract] = SumRule(-1.0)
    _RULES[klayers.Average] = SumRule(average=True)
    _RULES[klayers.Multiply] = _RULES[_np.Multiply] = ProductRule()
    _RULES[_np.Divide] = _RULES[_np.TrueDivide] = ProductRule(divide=True)
    _RULES[klayers.Concatenate] = _RULES[_np.Concatenate] = ConcatenateRule()
    _RULES[_np.Negative] = NegativeRule()
    from keras_goodinit.layers import ResidualGate
    _RULES[ResidualGate] = ResidualGateRule()
    _RULES[_np.OnesLike] = ConstantRule(1.0)
    _RULES[_np.ZerosLike] = ConstantRule(0.0)

    rearrange = RearrangeRule()
    for cls in (klayers.Flatten, klayers.Reshape, klayers.Permute, klayers.Cropping1D,
                klayers.Cropping2D, klayers.Cropping3D, klayers.UpSampling1D,
                klayers.UpSampling2D, klayers.UpSampling3D, klayers.RepeatVector,
                klayers.Identity, klayers.ActivityRegularization, klayers.Masking,
                klayers.InputLayer, klayers.AlphaDropout, _np.Reshape, _np.Transpose,
                _np.ExpandDims, _np.Squeeze, _np.GetItem, _core.Cast, _np.Moveaxis,
                _np.Swapaxes, _np.Repeat, _np.Tile, _np.BroadcastTo):
        _RULES[cls] = rearrange
    from keras.src.layers.core.identity import Identity
    _RULES[Identity] = rearrange
    cast = getattr(keras.src.layers, "Cast", None)  # not in every Keras 3 release
    if cast is not None:
        _RULES[cast] = rearrange
    dropout = DropoutRule()
    for cls in (klayers.Dropout, klayers.SpatialDropout1D, klayers.SpatialDropout2D,
                klayers.SpatialDropout3D, klayers.GaussianDropout):
        _RULES[cls] = dropout
    _RULES[klayers.GaussianNoise] = NoiseRule()
    for cls in (klayers.MaxPooling1D, klayers.MaxPooling2D, klayers.MaxPooling3D):
        _RULES[cls] = PoolRule(maximum=True)
    for cls in (klayers.AveragePooling1D, klayers.AveragePooling2D, klayers.AveragePooling3D):
        _RULES[cls] = PoolRule()
    for cls in (klayers.GlobalAveragePooling1D, klayers.GlobalAveragePooling2D,
                klayers.GlobalAveragePooling3D):
        _RULES[cls] = GlobalPoolRule()
    for cls in (klayers.GlobalMaxPooling1D, klayers.GlobalMaxPooling2D,
                klayers.GlobalMaxPooling3D):
        _RULES[cls] = GlobalPoolRule(maximum=True)
    padding = ZeroPaddingRule()
    for cls in (klayers.ZeroPadding1D, klayers.ZeroPadding2D, klayers.ZeroPadding3D):
        _RULES[cls] = padding
    _RULES[klayers.Rescaling] = RescalingRule()
    _RULES[klayers.Embedding] = EmbeddingRule()
    _RULES[_nn.DotProductAttention] = AttentionRule()
    _RULES[_np.Einsum] = EinsumRule()
    _RULES[klayers.Softmax] = _RULES[_nn.Softmax] = SoftmaxRule()


def einsum_axes(equation: str, rank: int) -> tuple[list[int], list[int]]:
    """Kernel axes an EinsumDense equation contracts with its input, and its output axes."""
    inputs, output = equation.replace("...", "").split("->")
    _, kernel = inputs.split(",")
    units = [i for i, letter in enumerate(kernel) if letter in output]
    fan_in = [i for i in range(rank) if i not in units]
    if not units or not fan_in or len(kernel) != rank:
        raise ValueError(
            "An EinsumDense kernel needs both fan-in and output axes. "
            f"Received: equation={equation!r}")
    return fan_in, units


class _WrappedKernelRule(KernelRule):
    """`WeightNormalization`: the wrapped layer's kernel rule."""

    def layout(self, layer) -> str:
        return rule_for(layer.layer).layout(layer.layer)

    def taps(self, layer, power, out_shape, profile=None):
        return rule_for(layer.layer).taps(layer.layer, power, out_shape, profile)

    def direction_variable(self, layer):
        # The wrapper normalizes `v` (the wrapped layer's `kernel`), whichever variable the
        # wrapped layer's rule rescales on its own: g scales the output through `v`.
        return layer.v

    def bias_cell_axes(self, layer, rank):
        return rule_for(layer.layer).bias_cell_axes(layer.layer, rank)

    def depthwise_variable(self, layer):
        return rule_for(layer.layer).depthwise_variable(layer.layer)

    def fan_axes(self, layer, rank):
        # The wrapped rule's axes are those of its own direction variable: `v`'s only where
        # that is `v`; else the layout places them, as the wrapper's norms do.
        rule = rule_for(layer.layer)
        if rule.direction_variable(layer.layer) is not layer.v:
            return None
        return rule.fan_axes(layer.layer, rank)

    def per_position(self, layer):
        return rule_for(layer.layer).per_position(layer.layer)

    def weight_norm_refusal(self, layer):
        return "already weight-normalized"

    def unscalable_reason(self, layer):
        # A wrapper is a target where it wraps a kernel layer; it wraps nothing else but
        # recurrent layers and cells (`weight_norm._recurrent_cells`).
        return ("weight-normalized recurrent layer: its gains act through time, so one "
                "scale does not set its output variance")


_builtin_rules()


def per_position(layer) -> bool:
    """`LayerRule.per_position` from `layer`'s rule (False for a layer without one)."""
    rule = rule_for(layer)
    return rule is not None and rule.per_position(layer)


def measured_cross(array: np.ndarray) -> float:
    """The cross moment along axis 1 of a batch (batch, positions, ..., channels)."""
    array = np.asarray(array, float)
    total = np.sum(array, axis=1)
    pairs = np.sum(total**2) - np.sum(array**2)  # sum over i != j of x_i x_j
    count = array.shape[1] * (array.shape[1] - 1) * (array.size // array.shape[1])
    return float(pairs / count)
