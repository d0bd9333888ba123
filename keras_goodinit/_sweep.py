"""The graph sweep shared by LSUV, data-dependent WN init and the diagnostics.

One forward pass of the unmodified model, with every target layer's
activation replaced by a hook. The hook receives the layer's pre-activation
output, hands it to a policy (which may measure it and return a rescaled
version), then applies the real activation. So layers are met in execution
order, through nested and subclassed models alike, each target is evaluated
once, and the downstream layers see the rescaled signal without re-running
anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers as klayers
from keras import ops

from keras_goodinit import _layouts
from keras_goodinit.weight_norm import WeightNormalization, kernel_variable

_LINEAR_TYPES = (
    klayers.Dense, klayers.EinsumDense,
    klayers.Conv1D, klayers.Conv2D, klayers.Conv3D,
    klayers.Conv1DTranspose, klayers.Conv2DTranspose, klayers.Conv3DTranspose,
    klayers.DepthwiseConv1D, klayers.DepthwiseConv2D,
    klayers.SeparableConv1D, klayers.SeparableConv2D,
)


@dataclasses.dataclass(eq=False)
class Target:
    """A layer that applies a kernel linearly, and the variables that scale it."""

    layer: keras.layers.Layer
    inner: keras.layers.Layer  # the layer that owns the activation and the bias

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def class_name(self) -> str:
        if self.is_weight_normalized:
            return f"WeightNormalization({type(self.inner).__name__})"
        return type(self.layer).__name__

    @property
    def is_weight_normalized(self) -> bool:
        return isinstance(self.layer, WeightNormalization)

    @property
    def direction_variable(self) -> keras.Variable:
        """The kernel that sets the layer's directions (`v` under weight norm)."""
        if isinstance(self.inner, (klayers.SeparableConv1D, klayers.SeparableConv2D)):
            return self.inner.pointwise_kernel
        return kernel_variable(self.inner)

    @property
    def scale_variable(self) -> keras.Variable:
        """Multiplying this variable by c multiplies the pre-bias output by c."""
        return self.layer.g if self.is_weight_normalized else self.direction_variable

    @property
    def kernel_layout(self) -> str:
        if isinstance(self.inner, (klayers.EinsumDense, klayers.SeparableConv1D,
                                   klayers.SeparableConv2D)):
            return "default"
        return _layouts.layout_of(self.inner)

    @property
    def bias(self) -> keras.Variable | None:
        return getattr(self.inner, "bias", None)

    @property
    def channel_axis(self) -> int:
        return 1 if getattr(self.inner, "data_format", None) == "channels_first" else -1

    def cell_axes(self, rank: int) -> tuple[int, ...]:
        """Output axes along which the bias is constant: statistics per cell suffice."""
        bias = self.bias
        if bias is not None and isinstance(self.inner, klayers.EinsumDense):
            shape = (1,) * (rank - len(bias.shape)) + tuple(bias.shape)
            return tuple(i for i, d in enumerate(shape) if d == 1)
        channel = self.channel_axis % rank
        return tuple(i for i in range(rank) if i != channel)

    def bias_cells(self, cell_shape: tuple[int, ...]) -> np.ndarray:
        """The bias as float64, in the keepdims shape of per-cell statistics."""
        if self.bias is None:
            return np.zeros(cell_shape)
        return np.reshape(ops.convert_to_numpy(self.bias).astype("float64"), cell_shape)

    def variables(self) -> list[keras.Variable]:
        """Every variable an init policy may write."""
        found = [self.direction_variable, self.scale_variable, self.bias]
        return [v for i, v in enumerate(found)
                if v is not None and all(v is not w for w in found[:i])]


def check_layers(layers) -> list | None:
    """`layers` as a list of layers or names (or None); raises on anything else."""
    if layers is None:
        return None
    if isinstance(layers, (str, bytes, keras.layers.Layer)) or not isinstance(
            layers, (list, tuple)):
        raise ValueError(
            "Argument `layers` must be a list of layers or layer names, or None. "
            f"Received: layers={layers!r}"
        )
    for item in layers:
        if not isinstance(item, (str, keras.layers.Layer)):
            raise ValueError(
                "Every entry of argument `layers` must be a layer or a layer name. "
                f"Received: layers={layers!r} (entry {item!r})"
            )
    if not layers:
        # An empty selection is a mistake, not a request to do nothing.
        raise ValueError(
            "Argument `layers` must name at least one layer; pass None for every target. "
            f"Received: layers={layers!r}"
        )
    return list(layers)


_ACTIVATION_TYPES = (klayers.Activation, klayers.ReLU, klayers.LeakyReLU, klayers.ELU,
                     klayers.PReLU, klayers.Softmax)


def following_activation(target: Target) -> keras.layers.Layer | None:
    """The activation layer that alone consumes the target's output in the model graph.

    Keras' builders (and most Sequential models) put the non-linearity in a
    separate `ReLU`/`Activation` layer; a post-activation statistic must apply
    it. None when the target has a fused activation, or when its output goes
    anywhere else (or the graph is unknown, as in a subclassed model).
    """
    if target.inner.activation not in (None, keras.activations.linear):
        return None
    consumers = {id(node.operation): node.operation
                 for node in getattr(target.layer, "_outbound_nodes", [])}
    if len(consumers) != 1:
        return None
    (layer,) = consumers.values()
    return layer if isinstance(layer, _ACTIVATION_TYPES) else None


def find_targets(model: keras.layers.Layer,
                 layers: Sequence[keras.layers.Layer | str] | None = None) -> list[Target]:
    """All linear-kernel layers under `model`, recursively, in registration order.

    A layer wrapped in `WeightNormalization` is represented by its wrapper.
    `layers` filters by layer object or name; unknown names raise.
    """
    found = []
    wrapped = set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, WeightNormalization):
            found.append(Target(layer, layer.layer))
            wrapped.add(id(layer.layer))
        elif isinstance(layer, _LINEAR_TYPES):
            found.append(Target(layer, layer))
    found = [t for t in found if not (t.layer is t.inner and id(t.layer) in wrapped)]
    layers = check_layers(layers)
    if layers is None:
        return found
    wanted, chosen = list(layers), []
    for item in wanted:
        match = [t for t in found if (t.name == item if isinstance(item, str)
                                      else item is t.layer or item is t.inner)]
        if not match:
            raise ValueError(
                "Every entry of `layers` must be a linear-kernel layer of the model "
                f"(Dense, EinsumDense, Conv*, WeightNormalization...). Received: layers entry "
                f"{item if isinstance(item, str) else item.name!r}; targets are "
                f"{[t.name for t in found]}"
            )
        chosen.extend(t for t in match if t not in chosen)
    return chosen


def prepare(model: keras.layers.Layer, x,
            layers: Sequence[keras.layers.Layer | str] | None = None) -> list[Target]:
    """Builds `model` on `x` if needed, and returns its targets; raises if there are none."""
    if not model.built:
        model(x, training=False)  # creates the variables eagerly, before anything is hooked
    targets = find_targets(model, layers)
    if not targets:
        raise ValueError(
            "The model has no layer with a kernel (Dense, EinsumDense, Conv*, "
            f"WeightNormalization...). Received: model={model.name!r}"
        )
    return targets


# A policy maps (target, pre-activation output, activation, state) to (output, state).
# `state` is None on a target's first call; a layer called again gets its first
# call's state back, so it is transformed the same way and measured once.
Policy = Callable[[Target, Any, Callable, dict | None], tuple[Any, dict]]


@dataclasses.dataclass
class SweepResult:
    order: list[Target]  # targets in execution order
    states: dict[int, dict]  # id(target) -> state of its first call
    calls: dict[int, int]  # id(target) -> number of calls
    outputs: Any = None  # the model's outputs on the batch


@contextlib.contextmanager
def _hooked(targets: Iterable[Target], policy: Policy, result: SweepResult):
    patched = []

    def make_hook(target, activation):
        def hook(y):
            key = id(target)
            count = result.calls.get(key, 0)
            result.calls[key] = count + 1
            if count == 0:
                result.order.append(target)
            out, state = policy(target, y, activation, result.states.get(key))
            result.states.setdefault(key, state)
            return out
        return hook

    try:
        for target in targets:
            activation = target.inner.activation or keras.activations.linear
            patched.append((target.inner, target.inner.activation))
            target.inner.activation = make_hook(target, activation)
        yield
    finally:
        for layer, activation in patched:
            layer.activation = activation


def sweep(model: keras.layers.Layer, x, targets: Sequence[Target], policy: Policy, *,
          training: bool = False) -> SweepResult:
    """One eager forward pass of `model` on `x`, `policy` at each target; inference by default.

    Eager, because the policies decide on host-side numbers between layers;
    the heavy per-layer statistics are compiled functions of the policies.
    """
    result = SweepResult(order=[], states={}, calls={})
    with _hooked(targets, policy, result):
        result.outputs = model(x, training=training)
    return result


# Compiled per output shape: one dispatch per layer instead of a dozen eager ops.
@tf.function
def _cell_moments(y, axes):
    return tf.nn.moments(tf.cast(y, tf.float32), axes, keepdims=True)


def cell_moments(y, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell mean and (centered) variance, computed in float32, returned as float64."""
    mean, var = _cell_moments(y, axes)
    return (ops.convert_to_numpy(mean).astype("float64"),
            ops.convert_to_numpy(var).astype("float64"))


@tf.function
def _affine(y, scale, shift):
    return tf.cast(tf.cast(y, tf.float32) * scale + shift, y.dtype)


def affine(y, scale, shift):
    """`y * scale + shift` computed in float32, returned in `y`'s dtype."""
    # Arrays, not Python floats, so that tf.function does not retrace per value.
    return _affine(y, np.asarray(scale, "float32"), np.asarray(shift, "float32"))


def snapshot(variables: Iterable[keras.Variable]) -> list[tuple[keras.Variable, Any]]:
    """Copies of the variables' values, to restore on failure."""
    return [(v, ops.convert_to_numpy(v.value)) for v in variables]


def restore(saved: list[tuple[keras.Variable, Any]]) -> None:
    for variable, value in saved:
        variable.assign(value)


@contextlib.contextmanager
def atomic(variables: Iterable[keras.Variable]):
    """Restore every variable exactly as it was if the block raises."""
    saved = snapshot(variables)
    try:
        yield
    except BaseException:
        restore(saved)
        raise


@contextlib.contextmanager
def guarded(model: keras.layers.Layer, written: Iterable[keras.Variable]):
    """`written` restored if the block raises; every other variable of `model` always.

    A forward pass can move state the init does not own (a subclassed model
    calling `bn(x, training=True)` updates moving statistics; layers advance
    seed generators): that state ends exactly as it was, success or failure.
    """
    written = list(written)
    ids = {id(v) for v in written}
    others = snapshot(v for v in model.variables if id(v) not in ids)
    try:
        with atomic(written):
            yield
    finally:
        restore(others)

