"""Weight normalization (Salimans & Kingma, 2016) for Keras 3."""

from __future__ import annotations

import contextlib

import keras
from keras import ops

from keras_goodinit import _layouts

# Guards the norm of an all-zero fan-in vector; far below any real kernel's squared norm.
_NORM_EPSILON = 1e-12


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
    by keeping its mapping for every other variable.
    """
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    parent = get_stateless_scope()
    scope = keras.StatelessScope(state_mapping=[(variable, value)])
    if parent is not None:
        scope.state_mapping = {**parent.state_mapping, **scope.state_mapping}
    with scope:
        yield


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


def unit_norms(kernel, layout: str):
    """L2 norm of every output unit's fan-in vector (science.md §1's table)."""
    kernel = ops.convert_to_tensor(kernel)
    axes = _layouts.norm_axes(len(kernel.shape), layout)
    return ops.sqrt(ops.sum(ops.square(kernel), axis=axes))


@keras.saving.register_keras_serializable(package="keras_goodinit")
class WeightNormalization(keras.layers.Wrapper):
    """Reparameterizes a layer's kernel as `w_j = g_j * v_j / ||v_j||`.

    `v` is the wrapped layer's own kernel variable; `g` is a new trainable
    variable with one value per output unit. At build `g = ||v_j||`, so the
    wrapper computes exactly what the bare layer computes: with
    `kernel_initializer=GoodInit(...)` it starts as the init of Arpit et al.
    The effective kernel is computed in float32 under mixed precision.

    Supported layers: Dense, Conv1D/2D/3D, Conv1D/2D/3DTranspose and
    DepthwiseConv1D/2D.

    Examples:

    >>> from keras_goodinit import GoodInit
    >>> dense = WeightNormalization(keras.layers.Dense(
    ...     256, activation="relu", kernel_initializer=GoodInit("wn_relu")))
    >>> y = dense(keras.ops.ones((4, 32)))

    Args:
        layer: The layer to wrap.
        **kwargs: Base layer keyword arguments, such as `name`.

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
        super().__init__(layer, **kwargs)

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
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
        with _float32_reads():
            v = ops.convert_to_tensor(self.v)
            g = ops.convert_to_tensor(self.g)
        sum_sq = ops.sum(ops.square(v), axis=_layouts.norm_axes(len(v.shape), self.layout),
                         keepdims=True)
        scale = ops.reshape(g, sum_sq.shape) * ops.rsqrt(ops.maximum(sum_sq, _NORM_EPSILON))
        return v * scale

    def call(self, inputs, *args, **kwargs):
        with substituted(self.v, self.normalized_kernel()):
            return self.layer(inputs, *args, **kwargs)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


def bake_weight_norm(model: keras.Model) -> keras.Model:
    """Returns an equivalent model where every `WeightNormalization` is a plain layer.

    Each wrapped layer becomes a copy of the layer it wraps, whose kernel is the
    effective `g * v / ||v||`; every other layer is copied with its weights.
    Use it to export or serve a trained model without this package.

    Examples:

    >>> model = keras.Sequential([keras.Input((8,)),
    ...                           WeightNormalization(keras.layers.Dense(4))])
    >>> plain = bake_weight_norm(model)

    Args:
        model: A built Sequential or functional model (nested models are
            baked too). Subclassed models cannot be cloned by Keras.

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
    copies = []

    def clone(layer):
        source = layer.layer if isinstance(layer, WeightNormalization) else layer
        new = source.__class__.from_config(_without_package_objects(source.get_config()))
        copies.append((layer, new))
        return new

    try:
        baked = keras.models.clone_model(model, clone_function=clone, recursive=True)
    except ValueError as error:
        raise ValueError(
            "bake_weight_norm works on Sequential and functional models. "
            f"Received: model={model.name!r} ({type(model).__name__}): {error}"
        ) from error
    for old, new in copies:
        if isinstance(old, WeightNormalization):
            effective = kernel_variable(old.layer)
            kernel = ops.convert_to_numpy(old.normalized_kernel())
            values = [kernel if w is effective else w.numpy() for w in old.layer.weights]
        else:
            values = old.get_weights()
        new.set_weights(values)
    return baked


def _without_package_objects(config: dict) -> dict:
    """The layer config minus this package's objects (GoodInit initializers).

    The baked weights are set right after cloning, so an initializer only
    matters for re-initialization; dropping ours (the layer's default takes
    over) lets the baked model load where keras-goodinit is not installed.
    """
    def ours(value) -> bool:
        return (isinstance(value, dict)
                and str(value.get("registered_name") or "").startswith("keras_goodinit>"))

    return {key: value for key, value in config.items() if not ours(value)}
