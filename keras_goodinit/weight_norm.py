"""Weight normalization (Salimans & Kingma, 2016) for Keras 3."""

from __future__ import annotations

import contextlib
import json
import warnings

import keras
from keras import ops

from keras_goodinit import _layouts

_REGISTERED_NAME = "keras_goodinit>WeightNormalization"


@contextlib.contextmanager
def _float32_reads():
    """Read variables in their own dtype, not the mixed-precision compute dtype."""
    from keras.src.backend.common.variables import AutocastScope

    with AutocastScope(None):
        yield


@contextlib.contextmanager
def substituted(variable, value):
    """Run layer code with `variable` reading as `value` (gradients flow into `value`).

    Nests inside an enclosing `StatelessScope` (the JAX trainer runs in one)
    by keeping its mapping for every other variable. Yields the list of
    losses that layers add inside (such as an activity regularizer's): a
    stateless scope keeps them from the layers, so the caller must hand them
    on (`WeightNormalization.call` does).
    """
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    parent = get_stateless_scope()
    scope = keras.StatelessScope(state_mapping=[(variable, value)], collect_losses=True)
    if parent is not None:
        scope.state_mapping = {**parent.state_mapping, **scope.state_mapping}
    with scope:
        yield scope.losses


def kernel_variable(layer) -> keras.Variable:
    """The variable holding a supported layer's kernel (not a LoRA-merged tensor)."""
    kernel = getattr(layer, "_kernel", None)
    if kernel is None:
        kernel = layer.kernel
    if not isinstance(kernel, keras.Variable):
        raise ValueError(
            "WeightNormalization needs the wrapped layer's kernel to be a plain variable; "
            f"quantized or LoRA kernels are not supported. Received: layer={layer.name!r}"
        )
    return kernel


def _computation_dtype(dtype) -> str:
    # Half-precision squares under- and overflow (a float16 1e-4 squared is 0), so the
    # norms are computed in float32, or float64 for float64 kernels.
    dtype = keras.backend.standardize_dtype(dtype)
    return "float64" if dtype == "float64" else "float32"


def _directions(kernel, layout: str):
    """`(u, sum_sq)`: each fan-in vector divided by its largest |entry|, and its squared norm.

    `v_j / ||v_j|| = u_j / ||u_j||` exactly, and a non-zero `u_j` has an entry
    of magnitude 1, so `sum_sq >= 1` unless the column is all zeros: no norm
    underflows, however small `v_j`, and only a true zero needs a guard. The
    divisor is a constant for the gradient, which is exact because the result
    does not depend on it.
    """
    kernel = ops.convert_to_tensor(kernel)
    kernel = ops.cast(kernel, _computation_dtype(kernel.dtype))
    axes = _layouts.norm_axes(len(kernel.shape), layout)
    peak = ops.stop_gradient(ops.max(ops.abs(kernel), axis=axes, keepdims=True))
    u = kernel / ops.where(peak > 0, peak, ops.ones_like(peak))
    return u, ops.sum(ops.square(u), axis=axes, keepdims=True), peak


def unit_norms(kernel, layout: str):
    """L2 norm of every output unit's fan-in vector, in the kernel's dtype.

    `layout` is `"default"` (Dense and Conv: the last axis indexes units),
    `"conv_transpose"` (the second-to-last axis does) or `"depthwise"` (the
    last two axes do). The norm is computed in float32 (or float64) and
    without underflow, so a float16 kernel's tiny columns get their norm.
    """
    _layouts.check_layout(layout)
    kernel = ops.convert_to_tensor(kernel)
    u, sum_sq, peak = _directions(kernel, layout)
    axes = _layouts.norm_axes(len(kernel.shape), layout)
    norms = ops.squeeze(peak * ops.sqrt(sum_sq), axis=axes)
    dtype = keras.backend.standardize_dtype(kernel.dtype)
    return ops.cast(norms, dtype) if "float" in dtype else norms


@keras.saving.register_keras_serializable(package="keras_goodinit")
class WeightNormalization(keras.layers.Wrapper):
    """Reparameterizes a layer's kernel as `w_j = g_j * v_j / ||v_j||`.

    `v` is the wrapped layer's own kernel variable; `g` is a new trainable
    variable with one value per output unit. At build `g = ||v_j||`, so the
    wrapper computes exactly what the bare layer computes: with
    `kernel_initializer=GoodInit(...)` it starts as the init of Arpit et al.

    The effective kernel is computed in float32 (float64 for float64
    variables) whatever the dtype policy, and stays exact for any non-zero
    `v_j`, however small; an all-zero `v_j` gives a zero `w_j`, never NaN.
    The wrapped layer follows the wrapper's dtype policy (as in Keras'
    `TimeDistributed`): `WeightNormalization(layer, dtype="mixed_float16")`
    computes in float16 with float32 variables. Without `dtype`, the wrapper
    takes the wrapped layer's policy. Losses the wrapped layer adds (an
    `activity_regularizer`'s) are the wrapper's losses too.

    Quantization (`model.quantize(mode)`) first folds the effective kernel
    into `v`, so the layer's quantized kernel is `g * v / ||v||`; from then
    on the wrapper passes its inputs straight to the quantized layer and `g`
    is frozen. With LoRA (`wrapper.layer.enable_lora(rank)`) `v` is frozen
    and the effective kernel is `g * v / ||v||` plus the low-rank update;
    `g` and the LoRA factors train.

    Supported layers: Dense, Conv1D/2D/3D, Conv1D/2D/3DTranspose and
    DepthwiseConv1D/2D.

    Examples:

    >>> from keras_goodinit import GoodInit
    >>> dense = WeightNormalization(keras.layers.Dense(
    ...     256, activation="relu", kernel_initializer=GoodInit("wn_relu")))
    >>> y = dense(keras.ops.ones((4, 32)))
    >>> tuple(dense.g.shape)
    (256,)
    >>> half = WeightNormalization(keras.layers.Dense(3), dtype="mixed_float16")
    >>> keras.backend.standardize_dtype(half(np.ones((2, 4))).dtype)
    'float16'

    Args:
        layer: The layer to wrap.
        **kwargs: Base layer keyword arguments, such as `name` or `dtype`.

    Reference:
        - [Salimans & Kingma, 2016](https://arxiv.org/abs/1602.07868)
    """

    def __init__(self, layer: keras.layers.Layer, **kwargs):
        if not isinstance(layer, keras.layers.Layer):
            raise ValueError(
                "Argument `layer` must be a Keras layer. Supported: Dense, Conv1D/2D/3D, "
                f"Conv1D/2D/3DTranspose, DepthwiseConv1D/2D. Received: layer={layer!r}"
            )
        self.layout = _layouts.layout_of(layer)
        if kwargs.get("dtype") is None:
            kwargs["dtype"] = layer.dtype_policy
        super().__init__(layer, **kwargs)
        # A mask passes through the wrapper as it would pass through the layer itself.
        self.supports_masking = bool(getattr(layer, "supports_masking", False))
        # A quantized layer keeps its quantized policy (set when it was quantized).
        if layer.quantization_mode is None and layer.dtype_policy.name != self.dtype_policy.name:
            layer.dtype_policy = self.dtype_policy
        # Model.quantize() only calls leaf layers, so the wrapped layer's own method is
        # the one place to fold g into v before its kernel is quantized. (Keras' own
        # per-instance wrapper is kept once, even if the layer is wrapped again.)
        if "_keras_quantize" not in vars(layer):
            object.__setattr__(layer, "_keras_quantize", layer.quantize)
        object.__setattr__(layer, "quantize", self._quantize_layer)
        # Keras saves a LoRA layer with the update merged into its kernel; the merge must
        # start from the effective kernel (see `save_own_variables`).
        object.__setattr__(layer, "save_own_variables", self._save_layer_variables)

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        if self.layer.quantization_mode is not None:  # loaded quantized: g is unused
            shape = _layouts.unit_shape(tuple(self.layer.kernel.shape), self.layout)
            self.g = self.add_weight(name="g", shape=shape, initializer="ones",
                                     trainable=False, dtype=self.layer.variable_dtype)
        else:
            kernel = self.v
            self.g = self.add_weight(
                name="g",
                shape=_layouts.unit_shape(tuple(kernel.shape), self.layout),
                initializer=lambda shape, dtype: ops.cast(
                    unit_norms(kernel.value, self.layout), dtype),
                trainable=True,
                dtype=kernel.dtype,
            )
        self.built = True

    @property
    def v(self) -> keras.Variable:
        """The direction variable: the wrapped layer's own kernel."""
        return kernel_variable(self.layer)

    def normalized_kernel(self):
        """The effective kernel `g * v / ||v||`, in the variables' dtype."""
        # `.value`, read here: the TF backend's convert_to_tensor(variable) is the variable
        # itself, which would read (and autocast) later, in the caller's compute dtype.
        with _float32_reads():
            v = self.v.value
            g = self.g.value
        u, sum_sq, _ = _directions(v, self.layout)
        # sum_sq >= 1 for a non-zero column; 0 marks an all-zero one, whose u is 0.
        scale = ops.reshape(ops.cast(g, u.dtype), sum_sq.shape) * ops.rsqrt(
            ops.where(sum_sq > 0, sum_sq, ops.ones_like(sum_sq)))
        return ops.cast(u * scale, v.dtype)

    def call(self, inputs, *args, **kwargs):
        if self.layer.quantization_mode is not None:  # g was folded into the kernel
            return self.layer(inputs, *args, **kwargs)
        with substituted(self.v, self.normalized_kernel()) as losses:
            outputs = self.layer(inputs, *args, **kwargs)
        for loss in losses:  # re-added outside the scope, where Keras keeps them
            self.layer.add_loss(loss)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def effective_kernel_scope(self):
        """A context in which the wrapped layer's kernel reads as `g * v / ||v||`."""
        return substituted(self.v, self.normalized_kernel())

    def _lora_enabled(self) -> bool:
        return bool(getattr(self.layer, "lora_enabled", False)) and self.built

    def save_own_variables(self, store):
        # With LoRA, Keras saves the layer's kernel as its kernel plus the update (and
        # zeroes the update at load): here that kernel is `g v / ||v|| + update`, so g is
        # saved as its norms, for the loaded wrapper to compute that kernel.
        if not self._lora_enabled() or self.layer.quantization_mode is not None:
            return super().save_own_variables(store)
        layer_store = {}
        self._save_layer_variables(layer_store)
        store["0"] = ops.cast(unit_norms(layer_store["0"], self.layout), self.g.dtype)

    def _save_layer_variables(self, store):
        """The wrapped layer's `save_own_variables`, with LoRA merged into the effective kernel."""
        save = type(self.layer).save_own_variables.__get__(self.layer)
        if not self._lora_enabled() or self.layer.quantization_mode is not None:
            return save(store)
        values = {}
        with self.effective_kernel_scope():
            save(values)
            values = {key: ops.convert_to_numpy(value) for key, value in values.items()}
        for key, value in values.items():
            store[key] = value

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the wrapped layer, whose kernel becomes the effective `g * v / ||v||`."""
        self.layer.quantize(mode, type_check=type_check, config=config)

    def _quantize_layer(self, mode=None, *args, **kwargs):
        """The wrapped layer's `quantize`, run on the effective kernel `g * v / ||v||`."""
        layer = self.layer
        quantize = layer._keras_quantize
        if not (self.built and layer.built) or layer.quantization_mode is not None:
            return quantize(mode, *args, **kwargs)  # Keras raises its own error
        v, g = self.v, self.g
        saved = (ops.convert_to_numpy(v.value), ops.convert_to_numpy(g.value))
        # Folding keeps the output: v becomes the effective kernel and g its norms.
        v.assign(self.normalized_kernel())
        g.assign(ops.cast(unit_norms(v.value, self.layout), g.dtype))
        try:
            quantize(mode, *args, **kwargs)
        except BaseException:
            v.assign(saved[0])
            g.assign(saved[1])
            raise
        g.trainable = False


def bake_weight_norm(model: keras.Model) -> keras.Model:
    """Returns an equivalent model where every `WeightNormalization` is a plain layer.

    The model is rebuilt from its config as a `.keras` file would be, with
    each wrapper's config replaced by its wrapped layer's (wherever it sits:
    in a Sequential or functional model, a nested model, or a wrapper such as
    `TimeDistributed`). The wrapped layer's kernel becomes the effective
    `g * v / ||v||`; every other layer gets its weights unchanged. This
    package's initializers are dropped from the configs (the layers'
    defaults take over; they only matter for re-initialization), so the
    baked model loads where keras-goodinit is not installed. The baked model
    is not compiled.

    A custom layer that creates a `WeightNormalization` in its `__init__`
    (not in its config) recreates it when rebuilt: that wrapper keeps its
    weights and is not baked, and a `UserWarning` lists the paths of such
    wrappers (the baked model then still needs this package to load).

    Examples:

    >>> model = keras.Sequential([keras.Input((8,)),
    ...                           WeightNormalization(keras.layers.Dense(4))])
    >>> plain = bake_weight_norm(model)
    >>> [type(layer).__name__ for layer in plain.layers]
    ['Dense']
    >>> x = np.ones((2, 8))
    >>> bool(np.allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6))
    True

    Args:
        model: A built model that can be saved to a `.keras` file.

    Returns:
        A new model with identical outputs and no `WeightNormalization` layers.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"Argument `model` must be a keras.Model. Received: model={model!r}")
    if not model.built:
        raise ValueError(
            "Argument `model` must be built (call it on data or give it an Input). "
            f"Received: model={model.name!r}, which is not built"
        )
    from keras.src.saving.serialization_lib import ObjectSharingScope

    # What `.keras` saving writes, JSON included, so that bake works wherever saving does.
    with ObjectSharingScope():
        config = json.loads(json.dumps(keras.saving.serialize_keras_object(model)))
    config = _baked_config(config)
    config["compile_config"] = None
    # Custom classes resolve as they do for the model's own `.keras` file; a Lambda is the
    # caller's own code, so safe mode has nothing to guard against here.
    # Only non-Keras classes: a name such as "Add" must still resolve to Keras' own op.
    custom_objects = {type(layer).__name__: type(layer) for layer in model._flatten_layers()
                      if not type(layer).__module__.startswith("keras.")}
    try:
        with ObjectSharingScope():
            baked = keras.saving.deserialize_keras_object(
                config, custom_objects=custom_objects, safe_mode=False)
    except Exception as error:
        raise ValueError(
            "bake_weight_norm rebuilds the model from its config, as loading a `.keras` "
            f"file does, and that failed: {error}. Received: model={model.name!r}"
        ) from error
    kept = _copy_weights(model, baked)
    if kept:
        warnings.warn(
            "bake_weight_norm could not bake these WeightNormalization layers, which a "
            f"custom layer creates itself (not from its config): {', '.join(kept)}. They "
            "keep their weights, so the outputs are unchanged, but loading the model needs "
            "keras-goodinit.", UserWarning, stacklevel=2)
    return baked


def _is_weight_norm(config) -> bool:
    return isinstance(config, dict) and config.get("registered_name") == _REGISTERED_NAME


def _baked_config(config):
    """The serialized tree with every WeightNormalization replaced by its wrapped layer."""
    if isinstance(config, list):
        return [_baked_config(item) for item in config]
    if not isinstance(config, dict):
        return config
    if _is_weight_norm(config):
        inner = _baked_config(config["config"]["layer"])
        # A functional model's layer entry also carries the wiring, under the wrapper's
        # name until `_rename_in_graph` points it at the wrapped layer's.
        for key in ("name", "inbound_nodes"):
            if key in config:
                inner[key] = config[key]
        return inner
    config = {key: _baked_config(value) for key, value in config.items()}
    inner_config = config.get("config")
    if isinstance(inner_config, dict):
        config["config"] = _without_package_objects(inner_config)
        _rename_in_graph(config["config"])
    return config


def _rename_in_graph(config: dict) -> None:
    """Points a functional config's wiring at the baked layers' names (WN's name is gone)."""
    layers = config.get("layers")
    if not (isinstance(layers, list) and "output_layers" in config):
        return
    renamed = {}
    for entry in layers:
        name = entry.get("config", {}).get("name")
        if "name" in entry and name is not None and entry["name"] != name:
            renamed[entry["name"]] = name
            entry["name"] = name
    if not renamed:
        return

    def rename(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "keras_history" and isinstance(value, list) and value:
                    value[0] = renamed.get(value[0], value[0])
                else:
                    rename(value)
        elif isinstance(node, list):
            if len(node) == 3 and isinstance(node[0], str) and isinstance(node[1], int):
                node[0] = renamed.get(node[0], node[0])  # [name, node_index, tensor_index]
            else:
                for item in node:
                    rename(item)

    for entry in layers:
        rename(entry.get("inbound_nodes", []))
    rename(config.get("input_layers", []))
    rename(config.get("output_layers", []))


def _copy_weights(model: keras.Model, baked: keras.Model) -> list[str]:
    """Copies every layer's own variables into its rebuilt twin; returns unbaked WN paths.

    The two models are walked in the same order (`_flatten_layers`, which
    saving uses too): a baked wrapper stands in the original for its wrapped
    layer, whose kernel then reads as the effective kernel while it is saved.
    """
    twins = iter(baked._flatten_layers())
    skip, kept = set(), []
    for layer in model._flatten_layers():
        if id(layer) in skip:
            continue
        twin = next(twins, None)
        source, scope = layer, contextlib.nullcontext()
        if isinstance(layer, WeightNormalization):
            if isinstance(twin, WeightNormalization):
                kept.append(layer.path)
            else:
                source = layer.layer
                skip.add(id(source))
                scope = layer.effective_kernel_scope()
        # By type, not name: a sublayer a custom layer creates itself gets a new name.
        if twin is None or type(twin) is not type(source):
            raise ValueError(
                "bake_weight_norm could not match the rebuilt model's layers to the "
                f"original's: {source.path!r} ({type(source).__name__}) has no twin (found "
                f"{getattr(twin, 'path', None)!r}). Received: model={model.name!r}"
            )
        store = {}
        with scope:
            source.save_own_variables(store)
            store = {key: ops.convert_to_numpy(value) for key, value in store.items()}
        twin.load_own_variables(store)
    return kept


def _without_package_objects(config: dict) -> dict:
    """The layer config minus this package's objects (GoodInit initializers).

    The baked weights are set right after rebuilding, so an initializer only
    matters for re-initialization; dropping ours (the layer's default takes
    over) lets the baked model load where keras-goodinit is not installed.
    """
    def ours(value) -> bool:
        return (isinstance(value, dict) and not _is_weight_norm(value)
                and str(value.get("registered_name") or "").startswith("keras_goodinit>"))

    return {key: value for key, value in config.items() if not ours(value)}
