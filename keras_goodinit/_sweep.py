"""The graph sweep shared by LSUV, data-dependent WN init and the diagnostics.

One forward pass of the unmodified model, with every target layer's
activation replaced by a hook. The hook receives the layer's pre-activation
output, hands it to a policy (which may measure it and return a rescaled
version), then applies the real activation. So layers are met in execution
order, through nested and subclassed models alike, each target is evaluated
once, and the downstream layers see the rescaled signal without re-running
anything.

`run` traces that pass once into a `tf.function` (XLA where asked or where
Keras would use it on an accelerator) whose policies are TensorFlow ops: the
whole init is one compiled program, cached per model, input signature and
policy. `sweep` is the same pass executed eagerly, the fallback for models
that cannot be traced and the path the host-side diagnostics use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import types
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import keras
import numpy as np
from keras import layers as klayers
from keras import ops

from keras_goodinit import _backend, _graph, rules
from keras_goodinit._backend import tf  # TensorFlow, imported on first use
from keras_goodinit._compiled import per_signature
from keras_goodinit.weight_norm import WeightNormalization


@dataclasses.dataclass(eq=False)
class Target:
    """A layer that applies a kernel linearly, and the variables that scale it."""

    layer: keras.layers.Layer
    inner: keras.layers.Layer  # the layer that owns the activation and the bias
    # The Keras mask of the input of the call being hooked (e.g. Embedding(mask_zero=True)):
    # masked positions are padding and must not count in the statistics.
    mask: Any = None
    # The TimeDistributed wrapper the target sits in, if any: during a sweep it runs
    # its layer once on the merged batch x time input (see `_merged_time_call`).
    time_distributed: Any = None
    # The layer's path in the model ("block_0/attention/query"), set by `find_targets`.
    path: str = ""

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def path_name(self) -> str:
        """The name a report row carries: the path, unique where bare names repeat."""
        return self.path or self.layer.name

    @property
    def class_name(self) -> str:
        if self.is_weight_normalized:
            return f"WeightNormalization({type(self.inner).__name__})"
        return type(self.layer).__name__

    @property
    def is_weight_normalized(self) -> bool:
        return isinstance(self.layer, WeightNormalization)

    @property
    def rule(self) -> rules.LayerRule:
        """The kernel rule of the layer that holds the kernel (`inner`)."""
        return rules.rule_for(self.inner)

    @property
    def direction_variable(self) -> keras.Variable:
        """The kernel that sets the layer's directions (`v` under weight norm)."""
        # The layer's own rule: a wrapper's says `v`, whatever the wrapped layer's says.
        return rules.rule_for(self.layer).direction_variable(self.layer)

    @property
    def is_convolution(self) -> bool:
        """Its rule averages a receptive field (`KernelRule.conv`): it has spatial taps."""
        return getattr(self.rule, "conv", None) is not None

    @property
    def depthwise_variable(self) -> keras.Variable | None:
        """A depthwise kernel applied before `direction_variable` (SeparableConv's), or None."""
        return self.rule.depthwise_variable(self.inner)

    @property
    def fan_axes(self) -> tuple[list[int], list[int]] | None:
        """(fan-in axes, unit axes) of `direction_variable` where the rule places them (an
        EinsumDense's equation); None where `kernel_layout` does. Raises a ValueError for
        an equation without both."""
        return rules.rule_for(self.layer).fan_axes(self.layer, len(self.direction_variable.shape))

    @property
    def scale_variable(self) -> keras.Variable:
        """Multiplying this variable by c multiplies the pre-bias output by c (no LoRA)."""
        return self.layer.g if self.is_weight_normalized else self.direction_variable

    @property
    def is_lora(self) -> bool:
        return bool(getattr(self.inner, "lora_enabled", False))

    @property
    def scale_variables(self) -> list[keras.Variable]:
        """Multiplying these variables by c multiplies the pre-bias output by c.

        With LoRA the effective kernel is `kernel + (alpha / rank) A B`:
        scaling it by c is scaling the base kernel and `B` by c.
        """
        if self.is_lora and not self.is_weight_normalized:
            return [self.direction_variable, self.inner.lora_kernel_b]
        return [self.scale_variable]

    def unscalable_reason(self) -> str:
        """Why the sweep must not scale this layer, or "" if it can."""
        mode = getattr(self.inner, "quantization_mode", None)
        kernel = getattr(self.inner, "_kernel", None)
        if mode is not None or (kernel is not None and not keras.backend.is_float_dtype(
                kernel.dtype)):
            return (f"quantized ({mode or kernel.dtype}) kernel: a scale would be rounded "
                    "into the integer kernel; initialize before model.quantize()")
        if self.is_lora and self.is_weight_normalized:
            return ("LoRA inside WeightNormalization: g scales only the base kernel's "
                    "directions, not the LoRA update")
        return ""

    @property
    def kernel_layout(self) -> str:
        return self.rule.layout(self.inner)

    @property
    def bias(self) -> keras.Variable | None:
        return getattr(self.inner, "bias", None)

    @property
    def channel_axis(self) -> int:
        return rules.channel_axis(self.inner)

    def cell_axes(self, rank: int) -> tuple[int, ...]:
        """Output axes along which the bias is constant: statistics per cell suffice."""
        return self.rule.bias_cell_axes(self.inner, rank)

    def bias_cells(self, cell_shape: tuple[int, ...]) -> np.ndarray:
        """The bias as float64, in the keepdims shape of per-cell statistics."""
        bias = self.bias_tensor(cell_shape)
        return np.zeros(cell_shape) if bias is None else np.asarray(bias)

    def cell_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The keepdims shape of per-cell statistics of an output of this `shape`."""
        axes = self.cell_axes(len(shape))
        return tuple(1 if i in axes else d for i, d in enumerate(shape))

    def bias_tensor(self, cell_shape: tuple[int, ...]):
        """The bias as a float64 tensor of `cell_shape`, read when the (compiled) pass
        runs; None without a bias (see `with_zeros`)."""
        if self.bias is None:
            return None
        return ops.reshape(ops.cast(ops.convert_to_tensor(self.bias), _backend.wide()),
                           cell_shape)

    def variables(self) -> list[keras.Variable]:
        """Every variable an init policy may write."""
        found = [self.direction_variable, *self.scale_variables, self.bias]
        return [v for i, v in enumerate(found)
                if v is not None and all(v is not w for w in found[:i])]


def in_flight_is_exact(targets: Sequence[Target]) -> bool:
    """Whether the in-flight statistics are the rescaled model's own, to float32 rounding.

    They are when every target is one of Keras' linear layers as shipped
    (or our `WeightNormalization` of one), computing in float32 or wider:
    scaling its kernel by c is then exactly `c * (y - b) + b`. A subclass
    may compute anything from its kernel, and a float16 pass rounds the
    rescaled signal differently at every layer downstream: there, only a
    second pass measures what the model computes.
    """
    for target in targets:
        if not (rules.is_kernel(target.inner)
                and type(target.inner).__module__.startswith("keras.")):
            return False
        if target.is_weight_normalized and type(target.layer) is not WeightNormalization:
            return False
        for layer in (target.layer, target.inner):
            dtype = keras.backend.standardize_dtype(getattr(layer, "compute_dtype", None)
                                                    or "float32")
            if dtype not in ("float32", "float64"):
                return False
    return True


def with_zeros(bias, like):
    """`bias`, or float64 zeros shaped like `like` (per-cell statistics) without one.

    Made inside the compiled kernels rather than passed in: Grappler
    specializes a function for every call that gets a constant argument,
    which made the first call of a deep pass cost seconds.
    """
    return ops.zeros_like(like, _backend.wide()) if bias is None else bias


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


def followers(model: keras.layers.Layer, targets: Sequence[Target]) -> dict[int, Any]:
    """id(target) -> the activation step that alone takes its output, for those that have one.

    Keras' builders (and most Sequential models) put the non-linearity in a
    separate `ReLU`/`Activation` layer or a `keras.ops` call; a
    post-activation statistic must apply it. Found on the model's graph by
    `_graph.follower`, through steps that keep the values' signs
    (dropout, pooling, reshapes, padding), not through a normalization: the
    layer or op, callable on the output alone. None for a target with a
    fused activation, whose output goes anywhere else at any of its calls,
    or in a model with no graph.
    """
    graph = _graph_of(model)
    found = {}
    for target in targets:
        met = _followers_of(graph, target)
        layers = {id(f.step.layer): f.step.layer for f, _ in met if f.step is not None}
        if met and len(layers) == 1 and all(
                f.kind == "activation" and not _normalized(through)
                and f.step.args == (_graph.Ref(f.step.inputs[0]),) and not f.step.kwargs
                for f, through in met):
            found[id(target)] = next(iter(layers.values()))
    return found


def follower_key(targets: Sequence[Target], followers: dict) -> tuple:
    """`followers` for a cache key: by position, as each call makes new Target objects
    but the same model gives the same order."""
    return tuple((i, id(followers[id(t)])) for i, t in enumerate(targets) if id(t) in followers)


def followed_by_normalization(model: keras.layers.Layer, targets: Sequence[Target]) -> set:
    """id(target) of those whose output goes only into a normalization (BN, LN, GN...),
    through steps that do not change which (dropout, pooling, reshapes)."""
    graph = _graph_of(model)
    found = set()
    for target in targets:
        met = _followers_of(graph, target)
        if met and all(_normalized(through) for _, through in met):
            found.add(id(target))
    return found


def _normalized(steps) -> bool:
    return any(rules.rule_for(step.layer).family == "normalization" for step in steps)


def _graph_of(model):
    try:
        return _graph.flatten(model)
    except ValueError:  # a subclassed model that cannot be traced, an unbuilt Sequential
        return None


def _followers_of(graph, target: Target) -> list:
    """(`_graph.Follower`, the steps it looked through) for each call of the target's layer
    in `graph`; empty for a target with a fused activation or without a graph."""
    if graph is None or target.inner.activation not in (None, keras.activations.linear):
        return []
    found = []
    for step in graph.steps:
        if step.layer is target.layer and step.outputs:
            follower = _graph.follower(graph, step.outputs[0])
            key, through = step.outputs[0], []
            for _ in follower.through:  # the sole consumers it looked through, in order
                (after,) = graph.consumers[key]
                through.append(after)
                key = after.outputs[0]
            found.append((follower, through))
    return found


def _layer_paths(model: keras.layers.Layer) -> dict[int, str]:
    """`id(layer)` -> its path of names below `model` (the first, for a shared layer)."""
    paths: dict[int, str] = {}

    def walk(layer, prefix):
        for sub in layer._flatten_layers(include_self=False, recursive=False):
            if id(sub) in paths:
                continue
            paths[id(sub)] = f"{prefix}/{sub.name}" if prefix else sub.name
            walk(sub, paths[id(sub)])

    walk(model, "")
    return paths


def find_targets(model: keras.layers.Layer,
                 layers: Sequence[keras.layers.Layer | str] | None = None) -> list[Target]:
    """All linear-kernel layers under `model`, recursively, in registration order.

    A layer wrapped in `WeightNormalization` is represented by its wrapper.
    `layers` filters by layer object or name; unknown names raise.
    """
    found = []
    wrapped = set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, WeightNormalization) and rules.is_kernel(layer):
            found.append(Target(layer, layer.layer))
            wrapped.add(id(layer.layer))
        elif rules.is_kernel(layer):
            found.append(Target(layer, layer))
    found = [t for t in found if not (t.layer is t.inner and id(t.layer) in wrapped)]
    paths = _layer_paths(model)
    for target in found:
        target.path = paths.get(id(target.layer), target.layer.name)
    for wrapper in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(wrapper, klayers.TimeDistributed):
            inside = {id(layer) for layer in wrapper.layer._flatten_layers(
                include_self=True, recursive=True)}
            for target in found:
                if id(target.layer) in inside and target.time_distributed is None:
                    target.time_distributed = wrapper
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


def unscalable_layers(model: keras.layers.Layer,
                      targets: Sequence[Target]) -> list[tuple[keras.layers.Layer, str]]:
    """Layers under `model` with trainable weights of their own that are no target, and why.

    Normalization layers are left out: they are not kernels, by design. The
    reason is the layer's rule's (`rules.unscalable_reason`).
    """
    covered = set()
    for target in targets:
        covered.update(id(layer) for layer in target.layer._flatten_layers(
            include_self=True, recursive=True))
    found = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        rule = rules.rule_for(layer)
        if id(layer) in covered or (rule is not None and rule.family == "normalization"):
            continue
        if not getattr(layer, "_trainable_variables", None):
            continue
        found.append((layer, rules.unscalable_reason(layer)))
    return found


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


@dataclasses.dataclass(eq=False)
class Probe:
    """The variance of one call's output of `layer` (a residual stream), read by a policy.

    `layer` is a Keras layer or a `keras.ops` operation (a functional model
    calls both through their `call`), as `_graph.Graph.hooks` gives it;
    `call` counts its calls in execution order from 0 and `position` picks
    the output among its flattened outputs. `value` is a float64 scalar
    tensor once the pass has made that call, None before.
    """

    layer: Any
    call: int
    position: int = 0
    value: Any = None


@dataclasses.dataclass
class SweepResult:
    order: list[Target]  # targets in execution order
    states: dict[int, dict]  # id(target) -> state of its first call
    calls: dict[int, int]  # id(target) -> number of calls
    outputs: Any = None  # the model's outputs on the batch
    # id(target) of those met only inside traced code (vectorized_map, tf.function),
    # where no host-side policy can run: they pass through unchanged and unmeasured.
    traced: set = dataclasses.field(default_factory=set)
    # id(target) of those no hook met whose kernel the traced pass read all the same: called
    # inside a tf.function traced before the pass, whose cached program bypasses the hooks.
    read: set = dataclasses.field(default_factory=set)
    # How the pass ran: "xla", "compiled" or "eager", and why it is eager if it is.
    mode: str = "eager"
    note: str = ""
    # The graph the pass is traced into (None: eager); a hook met in any other graph
    # (a nested tf.function, vectorized_map, a while_loop) is in traced code.
    graph: Any = None
    # Whether the whole pass is being traced by JAX on purpose (a gradient): its hooks then
    # see tracers, and still run.
    traced_pass: bool = False
    # What `run`'s `program` returned: its tensors (as NumPy) and its trace-time values.
    extra: Any = None
    static: Any = None


@contextlib.contextmanager
def wrapped_calls(wrapping: Iterable[tuple[keras.layers.Layer, Callable[[Callable], Callable]]]):
    """Within the block, each `(layer, wrap)` layer's `call` is `wrap(its call)`.

    The instance attribute shadows the class's `call` (or someone else's wrapper,
    which is wrapped in turn) and is taken away again on exit, in reverse order.
    """
    saved = []
    try:
        for layer, wrap in wrapping:
            saved.append((layer, vars(layer).get("call")))
            layer.call = wrap(layer.call)
        yield
    finally:
        for layer, call in reversed(saved):
            if call is None:
                vars(layer).pop("call", None)  # the class's call shows through again
            else:
                layer.call = call


@contextlib.contextmanager
def _hooked(targets: Iterable[Target], policy: Policy, result: SweepResult,
            probes: Sequence[Probe] = ()):
    targets = list(targets)

    def make_hook(target, activation):
        def hook(y):
            key = id(target)
            if not _of_the_pass(result, y):
                result.traced.add(key)
                return activation(y)
            count = result.calls.get(key, 0)
            result.calls[key] = count + 1
            if count == 0:
                result.order.append(target)
            out, state = policy(target, y, activation, result.states.get(key))
            result.states.setdefault(key, state)
            return out
        return hook

    def masked(target):
        def wrap(call):
            def masked_call(inputs, *args, **kwargs):
                target.mask = _input_mask(inputs)
                return call(inputs, *args, **kwargs)
            return masked_call
        return wrap

    wrappers = {id(t.time_distributed): t.time_distributed for t in targets
                if t.time_distributed is not None}
    activations = [(target, target.inner.activation) for target in targets]
    try:
        for target, activation in activations:
            target.inner.activation = make_hook(target,
                                                activation or keras.activations.linear)
        with wrapped_calls([(w, lambda _, w=w: _merged_time_call(w)) for w in wrappers.values()]
                           + [(t.inner, masked(t)) for t in targets]), \
                _probing(probes, result):
            yield
    finally:
        for target, activation in activations:
            target.inner.activation = activation
            target.mask = None


def _probing(probes: Sequence[Probe], result: SweepResult):
    """Each probe's layer records its output's variance at the probe's call."""
    by_layer: dict[int, list[Probe]] = {}
    for probe in probes:
        probe.value = None
        by_layer.setdefault(id(probe.layer), []).append(probe)

    def probed(mine):
        def wrap(call):
            seen = [0]

            def probed_call(*args, **kwargs):
                outputs = call(*args, **kwargs)
                flat = keras.tree.flatten(outputs)
                if flat and _of_the_pass(result, flat[0]):
                    for probe in mine:
                        if probe.call == seen[0] and probe.position < len(flat) and hasattr(
                                flat[probe.position], "shape"):
                            probe.value = stream_variance(flat[probe.position])
                    seen[0] += 1
                return outputs
            return probed_call
        return wrap

    return wrapped_calls([(mine[0].layer, probed(mine)) for mine in by_layer.values()])


def stream_variance(y):
    """The variance of the whole tensor `y`, a float64 scalar."""
    rank = len(y.shape)
    _, var = moments(y, tuple(range(rank)))
    return ops.reshape(var, ())


def _of_the_pass(result: SweepResult, value) -> bool:
    """Whether a hook meets `value` in the pass itself, not in code traced inside it."""
    return (in_pass(result.graph) and not _backend.is_vectorized(value)
            and (result.traced_pass or not _backend.is_traced(value)))


def pass_graph():
    """The graph a pass is being traced into now; None when it runs eagerly."""
    if not _backend.is_tensorflow() or tf.executing_eagerly():
        return None
    return tf.compat.v1.get_default_graph()


def in_pass(graph) -> bool:
    """Whether a hook runs in the pass itself (traced into `graph`, or eager when None),
    not in code traced inside it (a nested tf.function, vectorized_map, a while_loop)."""
    if not _backend.is_tensorflow():
        return True  # the sweep is eager there; `_backend.is_traced` tells traced values
    if graph is None:
        return tf.executing_eagerly()
    current = tf.compat.v1.get_default_graph()
    # In a graph, vectorized_map (pfor) traces its function in place, under "loop_body".
    return current is graph and "loop_body" not in current.get_name_scope().split("/")


def _merged_time_call(wrapper):
    """TimeDistributed's call as one call of its layer on the (batch * time, ...) input.

    Keras' TimeDistributed calls its layer once per step (a host-side policy
    would then measure step 0 only) or inside `vectorized_map` (where a
    host-side policy cannot run). For a layer that treats samples
    independently (every kernel layer) one call on the merged axes computes
    the same outputs, and every step counts in the statistics.
    """
    from keras.src.backend import set_keras_mask

    def call(inputs, training=None, mask=None):
        shape = ops.shape(inputs)
        flat = ops.reshape(inputs, (-1, *inputs.shape[2:]))
        kwargs = {}
        if mask is not None:
            flat_mask = ops.reshape(mask, (-1, *mask.shape[2:]))
            set_keras_mask(flat, flat_mask)  # so that masked steps do not count
            if wrapper.layer._call_has_mask_arg:
                kwargs["mask"] = flat_mask
        if wrapper.layer._call_has_training_arg:
            kwargs["training"] = training
        outputs = wrapper.layer.call(flat, **kwargs)
        return ops.reshape(outputs, (shape[0], shape[1], *outputs.shape[1:]))

    return call


def _input_mask(inputs):
    from keras.src.backend import get_keras_mask

    try:
        return get_keras_mask(inputs)
    except (AttributeError, TypeError):  # not a tensor (e.g. a list of inputs)
        return None


def sweep(model: keras.layers.Layer, x, targets: Sequence[Target], policy: Policy, *,
          training: bool = False, probes: Sequence[Probe] = (),
          preserve: bool = True, traced: bool = False) -> SweepResult:
    """One eager forward pass of `model` on `x`, `policy` at each target; inference by default.

    The fallback of `run`, and the pass of host-side policies (`mean_field_init`'s
    measurement);
    the heavy per-layer statistics are compiled functions of the policies.
    Every weight of `model` ends as it was, unless `preserve=False` (for a
    caller that restores every variable itself). `traced=True`: the caller
    traces the whole pass (`jax.grad`), so the hooks run on its tracers.
    """
    result = SweepResult(order=[], states={}, calls={}, traced_pass=traced)
    with preserving(model) if preserve else contextlib.nullcontext(), \
            _hooked(targets, policy, result, probes):
        result.outputs = model(x, training=training)
    return result


def _peak_moments(y, axes, weights):
    y = ops.cast(y, "float32")
    # Divided by the peak before squaring, so neither 1e20 (overflow) nor 1e-20
    # (underflow) inputs break float32; float64 undoes it.
    # initial=0: an empty y (a replica's empty share of a batch) has peak 0, not an error.
    peak = ops.max(ops.abs(y), initial=0.0)
    peak = ops.where(peak > 0, peak, ops.ones_like(peak))
    z = y / peak
    if weights is None:
        mean = ops.mean(z, axes, keepdims=True)
        return mean, ops.mean(ops.square(z - ops.stop_gradient(mean)), axes, keepdims=True), peak
    # Frequency-weighted two-pass moments; a cell with no weight gets 0, not NaN.
    weights = weights + ops.zeros_like(z)
    total = ops.sum(weights, axes, keepdims=True)
    some = total > 0
    safe = ops.where(some, total, ops.ones_like(total))
    mean = ops.where(some, ops.sum(weights * z, axes, keepdims=True) / safe, 0.0)
    spread = ops.sum(weights * ops.square(z - ops.stop_gradient(mean)), axes, keepdims=True)
    return mean, ops.where(some, spread / safe, 0.0), peak


def mask_weights(y, mask):
    """The mask as float32 weights broadcastable to `y`, or None if it does not fit."""
    if mask is None:
        return None
    mask_shape, shape = tuple(mask.shape), tuple(y.shape)
    if len(mask_shape) > len(shape) or shape[:len(mask_shape)] != mask_shape:
        return None
    weights = ops.cast(mask, "float32")
    return ops.reshape(weights, mask_shape + (1,) * (len(shape) - len(mask_shape)))


def moments_of(y, weights, axes: tuple[int, ...]):
    """Per-cell float64 mean and variance (keepdims): the ops of `moments`, inline."""
    if weights is None:
        y = ops.cast(y, "float32")
        mean, var, fits = _direct_moments(y, axes)
        # Overflow (|y| > 1e19) or underflow (|y| < 1e-15) of the squares: divide by the
        # peak first. A cond, so that the extra passes run only where they are needed.
        return ops.cond(fits, lambda: (mean, var), lambda: _scaled_moments(y, None, axes))
    return _scaled_moments(y, weights, axes)


def _direct_moments(y, axes):
    """Two-pass float32 moments of `y` itself, and whether its squares stayed in range.

    Sums over the leading axes (channels-last statistics) run as one 2-D
    column reduction, which TensorFlow's CPU kernels do 1.5-2x faster than a
    reduction over several axes.
    """
    rank = len(y.shape)
    shape = ops.shape(y)  # dynamic sizes where the traced shape has None
    cells = [1 if i in axes else shape[i] for i in range(rank)]
    leading = rank > 1 and tuple(axes) == tuple(range(rank - 1))

    def column_mean(z):
        if leading:
            return ops.reshape(ops.mean(ops.reshape(z, (-1, shape[-1])), 0), cells)
        return ops.mean(z, axes, keepdims=True)

    mean = column_mean(y)
    var = column_mean(ops.square(y - ops.stop_gradient(mean)))
    wide = _backend.wide()
    mean, var = ops.cast(mean, wide), ops.cast(var, wide)
    fits = (ops.all(ops.isfinite(mean)) & ops.all(ops.isfinite(var))
            & (ops.max(var + ops.square(mean)) > 1e-30))
    return mean, var, fits


def _scaled_moments(y, weights, axes):
    mean, var, peak = _peak_moments(y, axes, weights)
    wide = _backend.wide()
    peak = ops.cast(peak, wide)
    return ops.cast(mean, wide) * peak, ops.cast(var, wide) * peak**2


_moments = per_signature(lambda y, weights, axes: moments_of(y, weights, axes), any_shape=True)


def moments(y, axes: tuple[int, ...], mask=None):
    """Per-cell mean and (centered) variance of `y` as float64 tensors (keepdims).

    Two-pass float32 moments, on `y / max|y|` (rescaled in float64) where
    the squares of `y` itself would overflow or underflow, so any finite
    float32 scale survives; positions where `mask` (a Keras mask over the
    leading axes) is False do not count. Runs eagerly or inside a traced pass.
    """
    y = ops.convert_to_tensor(y)
    return _moments(y, mask_weights(y, mask), axes=tuple(axes))


def cell_moments(y, axes: tuple[int, ...], mask=None) -> tuple[np.ndarray, np.ndarray]:
    """`moments` as float64 NumPy arrays (for host-side policies)."""
    mean, var = moments(y, axes, mask)
    return ops.convert_to_numpy(mean), ops.convert_to_numpy(var)


def total_variance(mean, var):
    """Variance of the whole tensor from per-cell moments (cells of equal size)."""
    # Law of total variance.
    wide = _backend.wide()
    mean, var = ops.cast(mean, wide), ops.cast(var, wide)
    grand = ops.mean(mean)
    return ops.mean(var) + ops.mean(ops.square(mean - grand))


def affine(y, scale, shift):
    """`y * scale + shift` computed in float32, returned in `y`'s dtype."""
    scale, shift = ops.cast(scale, "float32"), ops.cast(shift, "float32")
    return ops.cast(ops.cast(y, "float32") * scale + shift, y.dtype)


COMPILE_MODES = ("auto", "xla", "compiled", "eager")

# What tracing a call that needs eager execution raises: `.numpy()` or NumPy on a
# symbolic tensor, a Python `if` on one, a tensor leaking out of its graph.
_UNTRACEABLE = (AttributeError, TypeError, NotImplementedError, ValueError)
# The same, less ValueError: what only a trace raises (a ValueError may be a bad input's).
UNTRACEABLE_ERRORS = (AttributeError, TypeError, NotImplementedError)

# model -> (its fingerprint, {key: (traced function, the trace-time record...)}); weak, so
# a model is not kept alive.
_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# `program(forward, x, aux) -> (tensors, static)`: a computation around the hooked pass
# (`forward(x)` runs it and returns its `SweepResult`), traced with it.
Program = Callable[[Callable[[Any], SweepResult], Any, Any], tuple[Any, Any]]


def run(model: keras.layers.Layer, x, targets: Sequence[Target], policy: Policy, *,
        key: tuple, compile: str = "auto", training: bool = False,
        probes: Sequence[Probe] = (), program: Program | None = None,
        aux=()) -> SweepResult:
    """The sweep as one compiled program where it can be; states come back as NumPy.

    `policy` must be written with TensorFlow ops (it then runs eagerly too).
    `compile` is `"auto"` (XLA where Keras would use it on an accelerator,
    else `tf.function`; eager when the model cannot be traced, or on another
    Keras backend than TensorFlow), `"xla"`, `"compiled"` (`tf.function` without
    XLA) or `"eager"`; an explicit compiled mode raises if it cannot run (a
    ValueError that says why, for a model that cannot be traced). The
    traced function is cached per model, input signature, targets, model
    variables, the model's `model_fingerprint` (its layers' attributes: a
    changed `Rescaling.scale` is a new trace) and `key` (which must name
    every option the policy bakes in): a second call reuses it.
    `SweepResult.mode` says which ran. `probes`
    measure the variance of other layers' outputs for the policy to read.

    With a `program` (a loss and its gradients, say), the traced function is
    `program(forward, x, aux)` instead of the pass alone; `aux` (tensors, such
    as labels) are inputs of the function, so new values reuse the trace. Its
    tensors come back in `SweepResult.extra` as NumPy, its trace-time Python
    values in `SweepResult.static`.
    """
    def eager():
        def forward(inputs):
            return sweep(model, inputs, targets, policy, training=training, probes=probes)
        if program is None:
            return forward(x)
        result = SweepResult(order=[], states={}, calls={})

        def recorded(inputs):
            nonlocal result
            result = forward(inputs)
            return result
        extra, static = program(recorded, x, aux)
        result.extra, result.static = extra, static
        return result

    if compile == "eager":
        return _on_host(eager())
    if not _backend.is_tensorflow():
        return _off_tensorflow(model, x, targets, policy, key=key, compile=compile,
                               training=training, probes=probes, program=program, aux=aux,
                               eager=eager)
    modes = [compile] if compile != "auto" else (
        ["xla", "compiled"] if _xla_by_default(model) else ["compiled"])
    for mode in modes:
        try:
            return _compiled_sweep(model, x, targets, policy, key, mode, training, probes,
                                   program, aux)
        except tf.errors.OpError as error:  # XLA could not compile an op
            if compile != "auto" or mode != "xla":
                raise
            reason = error
        except _UNTRACEABLE as error:
            if compile != "auto":
                raise cannot_trace(error, compile) from error
            reason = error
            break  # tf.function without XLA traces the same Python
    return _on_host(eager(), note=_untraced(reason))


def untraceable_cause(error: BaseException) -> BaseException:
    """The error that made tracing fail, behind Keras' re-raise of it.

    Keras' traceback filter re-raises a layer's error as `type(error)(message)`,
    which JAX's tracer errors do not accept: what comes out is an
    `AttributeError: 'str' object has no attribute '_error_repr'`, with the
    real error (`ConcretizationTypeError`, `TracerArrayConversionError`...) as
    its context.
    """
    seen, current = [], error
    while current is not None and all(current is not e for e in seen):
        seen.append(current)
        if type(current).__module__.startswith("jax"):
            return current
        current = current.__cause__ or current.__context__
    return error


def describe(error: BaseException) -> str:
    """`Type: first line of the message` of the error that made tracing fail."""
    cause = untraceable_cause(error)
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).splitlines()
             if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Exception encountered when calling"):
        lines = [f"{lines[0]} {lines[1]}"]  # Keras' wrapper line, then the error's own
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"


def cannot_trace(error: BaseException, compile: str) -> Exception:
    """What a forced compiled mode raises for a model (or loss) that cannot be traced.

    A ValueError raised while tracing is already one of ours, or the user's,
    with its own reason: it passes through unchanged.
    """
    if isinstance(error, ValueError):
        return error
    return ValueError(
        f"The model (or the loss) cannot be traced into one compiled program, as "
        f"compile={compile!r} asks: {describe(error)}. A Python branch on a tensor's value, "
        "NumPy on a tensor or another host-side step needs eager execution: pass "
        f"compile='auto' (which falls back to eager) or 'eager'. Received: compile={compile!r}")


def _untraced(reason: Exception) -> str:
    """The note of an eager sweep that ran because the compiled one could not trace."""
    return f"eager sweep: the model could not be traced ({describe(reason)})"


def _off_tensorflow(model, x, targets, policy, *, key, compile, training, probes, program,
                    aux, eager) -> SweepResult:
    """`run` on Keras' JAX or PyTorch backend: `jax.jit` on JAX, eager otherwise."""
    backend = _backend.name()
    jitted = backend == "jax"
    if compile not in ("auto", "xla") or (compile == "xla" and not jitted):
        raise NotImplementedError(
            f"On Keras' {backend!r} backend the sweep runs "
            + ("through jax.jit (XLA) or eagerly" if jitted else "eagerly")
            + f". Received: compile={compile!r}")
    if not jitted:
        return _on_host(eager(), note="eager sweep: the compiled sweep is for TensorFlow and "
                                      f"JAX, and Keras runs on {backend!r}")
    try:
        return _jitted_sweep(model, x, targets, policy, key, training, probes, program, aux)
    except _UNTRACEABLE as error:
        if compile != "auto":
            raise cannot_trace(error, compile) from error
        reason = error
    return _on_host(eager(), note=_untraced(reason))


def _jitted_sweep(model, x, targets, policy, key, training, probes, program,
                  aux) -> SweepResult:
    """The sweep (and `program`) as one `jax.jit` program of the variables' values and inputs."""
    import jax

    inputs = keras.tree.map_structure(lambda t: None if t is None else ops.convert_to_tensor(t),
                                      (x, aux))
    cache, full_key = _cached(model, targets, probes, key, "xla", training, inputs)
    traced = cache.get(full_key)
    if traced is None:
        model_ref = weakref.ref(model)
        record = SweepResult(order=[], states={}, calls={}, traced_pass=True)
        body = _traced_body(model_ref, record, targets, policy, training, probes, program)

        def stateless(values, x, aux):
            # The variables' values are arguments, so a cached program reads the weights of
            # the call, and writes (BatchNorm statistics) stay in the scope.
            with keras.StatelessScope(state_mapping=list(zip(model_ref().variables, values))):
                return body(x, aux)

        traced = (jax.jit(stateless), record)
    function, record = traced
    states, extra = function([v.value for v in model.variables], *inputs)  # traced on 1st call
    cache[full_key] = traced
    return _on_host(_of_targets(record, states, targets, extra=extra, static=record.static),
                    mode="xla")


def _xla_by_default(model) -> bool:
    """As Keras' `jit_compile="auto"`, but only on an accelerator: XLA's CPU compile
    time would cost more than the one pass it speeds up."""
    return bool(tf.config.list_physical_devices("GPU")) and all(
        getattr(layer, "supports_jit", True) for layer in model._flatten_layers())


def _on_host(result: SweepResult, *, mode: str = "eager", note: str = "") -> SweepResult:
    """`result` with every tensor of its states as a NumPy array (one sync, at the end)."""
    result.states = {k: keras.tree.map_structure(_numpy, state)
                     for k, state in result.states.items()}
    result.extra = keras.tree.map_structure(_numpy, result.extra)
    result.mode, result.note, result.graph = mode, note, None
    return result


def _numpy(value):
    return _backend.to_numpy(value)


def _compiled_sweep(model, x, targets, policy, key, mode, training, probes, program,
                    aux) -> SweepResult:
    inputs = keras.tree.map_structure(lambda t: None if t is None else tf.convert_to_tensor(t),
                                      (x, aux))
    cache, full_key = _cached(model, targets, probes, key, mode, training, inputs)
    traced = cache.get(full_key) or _trace(model, inputs, targets, policy, mode, training,
                                           probes, program)
    function, record, writes = traced
    # Only a pass that writes variables (as a forced `bn(x, training=True)` does) needs
    # every weight put back: reading and restoring them all costs as much as a small pass.
    with preserving(model) if writes else contextlib.nullcontext():
        states, extra = function(*inputs)  # XLA compiles here, on the first call
    cache[full_key] = traced  # only once it ran
    return _on_host(_of_targets(record, states, targets, extra=extra, static=record.static),
                    mode=mode)


def _cached(model, targets, probes, key, mode, training, inputs) -> tuple[dict, tuple]:
    """The model's cache of traced passes, and the key of this pass in it.

    The cache holds the traces of the model's current state only: when its
    fingerprint changed (`Rescaling.scale = 100`, an `Activation` switched to
    tanh), the old programs are dropped, not kept beside the new ones.
    """
    fingerprint = model_fingerprint(model)
    held = _TRACED.get(model)
    if held is None or held[0] != fingerprint:
        held = _TRACED[model] = (fingerprint, {})
    return held[1], _cache_key(model, targets, probes, key, mode, training, inputs)


def _cache_key(model, targets, probes, key, mode, training, inputs) -> tuple:
    """What a traced pass depends on besides the model's fingerprint: `key`, the mode, the
    inputs' signature, the targets, variables and probes."""
    signature = repr(keras.tree.map_structure(
        lambda t: None if t is None else (tuple(t.shape),
                                          keras.backend.standardize_dtype(t.dtype)), inputs))
    # A new LoRA, quantization or activation changes the traced program: part of the key.
    structure = (tuple(id(t.layer) for t in targets),
                 tuple(id(t.inner.activation) for t in targets),
                 tuple(id(v) for v in model.variables),
                 tuple((id(p.layer), p.call, p.position) for p in probes))
    return key, mode, bool(training), signature, structure


def model_fingerprint(model: keras.layers.Layer) -> tuple:
    """What a traced pass read of the model besides its variables' values, as a hashable.

    Per layer (nested ones included, in order): its identity and class, the
    dtype policy, `trainable`, and every attribute whose value is plain data
    (numbers, strings, small arrays, tuples, lists and dicts of them) or a
    function (by identity). That is where Keras' layers keep what their
    `get_config` returns (`Rescaling.scale`, `Activation.activation`,
    `Dropout.rate`...) and where a subclassed model keeps its flags. No
    tensor is read: it costs microseconds per layer, far less than a pass.
    """
    parts = []
    skipped = _bookkeeping()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        policy = getattr(layer, "dtype_policy", None)
        fields = [(name, frozen) for name, value in vars(layer).items()
                  if name not in skipped
                  and (frozen := _frozen(value, _FINGERPRINT_DEPTH)) is not _OPAQUE]
        parts.append((id(layer), type(layer).__qualname__, getattr(policy, "name", None),
                      bool(getattr(layer, "trainable", True)), tuple(fields)))
    return tuple(parts)


@functools.cache
def _bookkeeping() -> frozenset:
    """Attributes that change without changing what a pass computes (a changed one would
    only cost a new trace): those every Keras layer and model has (call and tracking
    bookkeeping; `trainable` and the dtype policy enter the fingerprint apart), save
    `autocast` and masking support, and the training state of a compiled model. An
    instance `call` is left out too: that is where a wrapper observes a layer's calls
    (counting them, as the tests do) around the class's `call`, which it runs."""
    base = set(vars(keras.layers.Layer())) | set(vars(keras.Model()))
    return frozenset(base - {"autocast", "_supports_masking"}) | {
        "_called", "built", "compiled", "train_function", "test_function", "predict_function",
        "stop_training", "stop_predicting", "_eval_epoch_iterator", "_compile_loss",
        "_compile_metrics", "_loss_tracker", "_jit_compile", "_run_eagerly", "optimizer",
        "loss", "steps_per_execution", "_build_shapes_dict", "_self_update_uid", "call"}


_FINGERPRINT_DEPTH = 3
# Arrays up to this many values enter a fingerprint by content, larger ones by identity.
_FINGERPRINT_ARRAY = 4096


class _Opaque:
    """The fingerprint of a value it does not read (a layer, a tensor, a tracker...)."""


_OPAQUE = _Opaque()
_PLAIN = frozenset({type(None), bool, int, float, str})
_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, types.MethodType,
              functools.partial)


def _frozen(value, depth: int):
    """`value` as a hashable of plain data, or `_OPAQUE` if it holds anything else."""
    if type(value) in _PLAIN:
        return value if value == value else "nan"  # NaN != NaN: make equal prints equal
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return "nan"  # NaN != NaN: equal fingerprints must compare equal
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return value
    if isinstance(value, _FUNCTIONS):
        return ("function", id(value))  # the object is kept alive by the layer
    if isinstance(value, np.ndarray):
        if value.size > _FINGERPRINT_ARRAY or value.dtype == object:
            return ("array", id(value), value.shape)
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if depth == 0:
        return _OPAQUE
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return _OPAQUE
        keys, value = tuple(value), tuple(value.values())
    else:
        keys = None
    if not isinstance(value, (tuple, list)) or len(value) > _FINGERPRINT_ARRAY:
        return _OPAQUE
    items = []
    for item in value:  # stops at the first opaque item (a list of layers, say)
        item = _frozen(item, depth - 1)
        if item is _OPAQUE:
            return _OPAQUE
        items.append(item)
    return (type(value).__name__, keys, tuple(items))


def unmet_reason(target: Target, result: SweepResult) -> str:
    """Why the pass did not measure `target`, a target it did not meet."""
    if id(target) in result.traced:
        return ("called only inside traced code (e.g. keras.ops.vectorized_map), where its "
                "output cannot be measured")
    if id(target) in result.read:
        return ("called inside a tf.function traced before this pass: its cached program "
                "runs the layer without the sweep's hooks, so its output cannot be measured "
                "(call the layer outside that tf.function)")
    if result.mode == "compiled" or (result.mode == "xla" and _backend.is_tensorflow()):
        return "not called in the forward pass"  # the traced graph does not read its kernel
    return ("not called in the forward pass, or only inside a tf.function or jax.jit traced "
            "before it, whose cached program runs without the sweep's hooks")


def _cleared(record: SweepResult) -> None:
    for part in (record.order, record.states, record.calls, record.traced, record.read):
        part.clear()


def _by_position(record: SweepResult, targets) -> dict:
    """At the end of a trace: the record in target positions, and its states by position.

    A cached pass then serves new Target objects of the same layers.
    """
    index = {id(t): i for i, t in enumerate(targets)}
    record.order[:] = [index[id(t)] for t in record.order]
    record.calls = {index[k]: count for k, count in record.calls.items()}
    record.traced = {index[k] for k in record.traced}
    states, record.states = record.states, {}
    return {str(index[k]): state for k, state in states.items()}


def _of_targets(record: SweepResult, states: dict, targets, **fields) -> SweepResult:
    """A traced pass's record and states (by position) as a result of these `targets`."""
    return SweepResult(
        order=[targets[i] for i in record.order],
        calls={id(targets[i]): count for i, count in record.calls.items()},
        traced={id(targets[i]) for i in record.traced},
        read={id(targets[i]) for i in record.read},
        states={id(targets[int(i)]): state for i, state in states.items()}, **fields)


def _traced_body(model_ref, record, targets, policy, training, probes, program):
    """The function a compiled sweep traces: `(x, aux) -> (states by position, program's
    tensors)`, with the trace-time facts in `record`. Shared by tf.function and jax.jit."""
    def forward(x):
        _cleared(record)
        record.graph = pass_graph()
        with _hooked(targets, policy, record, probes):
            record.outputs = model_ref()(x, training=training)
        record.graph = None
        return record

    def body(x, aux):
        if program is None:
            forward(x)
            extra = None
        else:
            extra, record.static = program(forward, x, aux)
        record.outputs = None  # traced tensors must not outlive the trace
        return _by_position(record, targets), extra

    return body


def _trace(model, inputs, targets, policy, mode, training, probes, program):
    """A tf.function of the hooked pass, traced now, and its trace-time record."""
    model_ref = weakref.ref(model)  # the cache must not keep the model alive
    record = SweepResult(order=[], states={}, calls={})
    body = _traced_body(model_ref, record, targets, policy, training, probes, program)
    function = tf.function(body, jit_compile=mode == "xla", autograph=False)
    concrete = function.get_concrete_function(*inputs)
    # A target no hook met, whose kernel the graph reads: a nested tf.function ran it.
    read = {id(getattr(v, "_value", v)) for v in concrete.graph.variables}
    met = set(record.order) | record.traced
    record.read = {i for i, t in enumerate(targets) if i not in met and id(getattr(
        t.direction_variable, "_value", t.direction_variable)) in read}
    return function, record, _writes_variables(concrete.graph.as_graph_def())


def _writes_variables(graph_def) -> bool:
    """Whether a traced graph, or any function it calls, assigns to a variable."""
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    return any(node.op in _WRITE_OPS or node.op.startswith(("ResourceScatter", "ResourceApply",
                                                            "ResourceSparseApply"))
               for node in nodes)


_WRITE_OPS = {"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
              "ResourceStridedSliceAssign", "Assign", "AssignAdd", "AssignSub"}


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
def preserving(model: keras.layers.Layer):
    """Every weight of `model` ends exactly as it was, whatever the block does.

    A forward pass can move state the init does not own (a subclassed model
    calling `bn(x, training=True)` updates moving statistics). Seed
    generator states are left to advance, as after any forward pass: under
    a multi-worker strategy, assigning them issues collectives of their own.
    """
    saved = snapshot(model.weights)
    try:
        yield
    finally:
        restore(saved)
