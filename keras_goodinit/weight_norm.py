"""Weight normalization (Salimans & Kingma, 2016) for Keras 3."""

from __future__ import annotations

import contextlib
import json
import warnings

import keras
import numpy as np
from keras import ops

from keras_goodinit import _backend, _layouts

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
    with _substituted([(variable, value)]) as losses:
        yield losses


@contextlib.contextmanager
def _substituted(pairs, carried=()):
    """`substituted` for a list of `(variable, value)` pairs.

    Assignments made inside to a variable of `carried` (a dropout seed's
    state, a stateful RNN's states) are made again outside, or handed to
    the enclosing stateless scope: the scope would otherwise drop them, and
    every call would draw the same dropout mask.
    """
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    parent = get_stateless_scope()
    scope = keras.StatelessScope(state_mapping=pairs, collect_losses=True)
    if parent is not None:
        scope.state_mapping = {**parent.state_mapping, **scope.state_mapping}
    before = dict(scope.state_mapping)
    with scope:
        yield scope.losses
    for variable in carried:
        value = scope.state_mapping.get(id(variable))
        if value is None or value is before.get(id(variable)):
            continue
        if parent is not None:
            parent.add_update((variable, value))
        else:
            variable.assign(value)


def _concrete(variable) -> bool:
    """Whether `variable` holds a value that can be read and assigned here, eagerly."""
    if keras.backend.backend() == "tensorflow":
        from keras_goodinit._backend import tf

        return tf.executing_eagerly()
    value = variable._value
    if value is None:  # Keras' JAX trainer holds the state while it runs
        return False
    if keras.backend.backend() == "jax":
        import jax

        return not isinstance(value, jax.core.Tracer)
    return True


def stored_dtype(variable) -> str:
    """The dtype `variable` stores (and its initializer drew in).

    Inside an autocast scope `variable.dtype` (and, under mixed precision,
    `variable.value`) name the scope's dtype (floatx under `_float32_reads`),
    so a float16, bfloat16 or float64 variable would read as another; Keras
    keeps the stored one in `_dtype`, whatever the scope.
    """
    return keras.backend.standardize_dtype(variable._dtype)


_SUPPORTED = ("Dense, Conv1D/2D/3D, Conv1D/2D/3DTranspose, DepthwiseConv1D/2D, SimpleRNN, LSTM, "
              "GRU, ConvLSTM1D/2D/3D, their cells, and Bidirectional of these RNNs")


def _cell_classes() -> tuple[type, ...]:
    """The recurrent cells whose `kernel` and `recurrent_kernel` the wrapper normalizes."""
    from keras.src.layers.rnn.conv_lstm import ConvLSTMCell  # not exported by Keras

    layers = keras.layers
    return (layers.SimpleRNNCell, layers.LSTMCell, layers.GRUCell, ConvLSTMCell)


def _recurrent_cells(layer) -> list | None:
    """The cells of a recurrent layer `WeightNormalization` can wrap; None for another layer.

    A cell, an RNN of one (SimpleRNN, LSTM, GRU, ConvLSTM1D/2D/3D,
    `keras.layers.RNN(cell)`) or a `Bidirectional` of two: forward first.
    Raises for a recurrent layer whose cell is not one of these (stacked or
    custom cells, an RNN of an already wrapped cell).
    """
    layers = keras.layers
    if isinstance(layer, _cell_classes()):
        return [layer]
    if isinstance(layer, layers.Bidirectional):
        sides = (layer.forward_layer, layer.backward_layer)
        if all(isinstance(side, layers.RNN) for side in sides):
            cells = [_recurrent_cells(side) for side in sides]
            return cells[0] + cells[1]
    elif isinstance(layer, layers.RNN) and isinstance(layer.cell, _cell_classes()):
        return [layer.cell]
    if isinstance(layer, (layers.RNN, layers.Bidirectional)):
        raise ValueError(
            f"Unsupported layer type {type(layer).__name__}: WeightNormalization wraps an "
            "RNN of one SimpleRNNCell, LSTMCell, GRUCell or ConvLSTM cell (not stacked, "
            f"custom or already wrapped cells). Supported: {_SUPPORTED}. "
            f"Received: layer={layer!r}")
    return None


def _bias_offset(cell) -> np.ndarray:
    """The part of a cell's input bias that the data init keeps, `(gates * units,)`.

    What the cell's bias initializer gives where that is a constant (Zeros,
    Ones, Constant: Keras' default is zeros), with the forget gate's block at
    1 where `unit_forget_bias` puts it there (LSTM, ConvLSTM); 0 for a random
    initializer, whose draw carries no meaning to keep. A GRU with
    `reset_after` keeps its first (input) row of a constant's value.
    """
    size = int(cell.kernel.shape[-1])
    initializer = cell.bias_initializer
    offset = np.zeros(size, "float64")
    # From the initializer's value, not a call: inside a traced step a call gives a
    # symbolic tensor.
    if isinstance(initializer, keras.initializers.Ones):
        offset[:] = 1.0
    elif isinstance(initializer, keras.initializers.Constant):
        value = initializer.value
        shape = tuple(cell.bias.shape)  # (2, size) for a GRU with reset_after
        try:
            full = np.broadcast_to(np.asarray(value, "float64"), shape)
        except ValueError:
            raise ValueError(
                "The data init keeps a constant `bias_initializer`'s value as the offset "
                f"of the input bias of layer {cell.name!r}, so the value must broadcast to "
                f"the bias shape {shape}. Received: bias_initializer=Constant(value={value!r}) "
                f"of shape {np.shape(value)}") from None
        offset[:] = full[0] if len(shape) == 2 else full
    if getattr(cell, "unit_forget_bias", False):
        units = size // 4
        offset[units:2 * units] = 1.0
    return offset


def _positions(y, axes):
    """The number of entries of `y` along `axes` (dynamic sizes too), as a wide float."""
    shape = ops.shape(y)
    count = ops.convert_to_tensor(1.0, _backend.wide())
    for axis in axes:
        count = count * ops.cast(shape[axis], _backend.wide())
    return count


def _sums_of(mean, var, count) -> tuple:
    """`(n, sum y, sum y^2)` of `n = count` terms with this mean and variance, wide.

    From the two-pass moments rather than summed in float32: the same sums,
    without the overflow or underflow of float32 squares of huge or tiny `y`.
    """
    wide = _backend.wide()
    mean, var, count = ops.cast(mean, wide), ops.cast(var, wide), ops.cast(count, wide)
    # No terms (a replica's empty share): its moments are NaN, its sums 0, not 0 * NaN.
    mean = ops.where(count > 0, mean, ops.zeros_like(mean))
    var = ops.where(count > 0, var, ops.zeros_like(var))
    return count, count * mean, count * (var + ops.square(mean))


def _moments_of_sums(count, first, second) -> tuple:
    """`(mean, var)` of the terms `_sums_of` summed (over replicas); 0 and 0 for none."""
    some = count > 0
    safe = ops.where(some, count, ops.ones_like(count))
    mean = ops.where(some, first / safe, ops.zeros_like(first))
    var = ops.where(some, second / safe - ops.square(mean), ops.zeros_like(second))
    # The difference of two sums can round below 0 for a constant unit: its variance is 0.
    return mean, ops.maximum(var, ops.zeros_like(var))


def _wrappable_layout(layer) -> str:
    """The kernel layout of a layer `WeightNormalization` can wrap; raises for others.

    Its rule must be a kernel rule (`_layouts.layout_of`) that does not
    refuse the wrapper (`LayerRule.weight_norm_refusal`: SeparableConv's two
    kernels, EinsumDense's equation, a wrapper already).
    """
    from keras_goodinit import rules  # rules imports this module

    layout, why = None, ""
    with contextlib.suppress(ValueError):
        layout = _layouts.layout_of(layer)
    if layout is not None:
        why = rules.rule_for(layer).weight_norm_refusal(layer)
    if layout is None or why:
        raise ValueError(
            f"Unsupported layer type {type(layer).__name__}{': ' + why if why else ''}. "
            f"Supported: {_SUPPORTED}. Received: layer={layer!r}"
        )
    return layout


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

    Supported layers: Dense, Conv1D/2D/3D, Conv1D/2D/3DTranspose,
    DepthwiseConv1D/2D, and the recurrent SimpleRNN, LSTM, GRU and
    ConvLSTM1D/2D/3D, their cells (`keras.layers.RNN(WeightNormalization(
    keras.layers.LSTMCell(8)))`, a cell without dropout) and `Bidirectional`
    either way round: `Bidirectional(WeightNormalization(LSTM(8)))` (each
    direction gets its own wrapper) and `WeightNormalization(Bidirectional(
    LSTM(8)))` (one wrapper, with `g`, `recurrent_g`, `backward_g` and
    `backward_recurrent_g`) compute the same.

    Recurrent layers: a cell computes each gate as `x W + h U + b`, with the
    input kernel `W` and the recurrent kernel `U` both of shape
    `(*k, fan_in, gates * units)` (gates: 1 SimpleRNN, 4 LSTM and ConvLSTM,
    3 GRU). Every column of each, one unit of one gate, is a fan-in vector
    as a Dense kernel's is, and is normalized on its own: `W_j = g_j v_j /
    ||v_j||` and `U_j = r_j u_j / ||u_j||`, with `g` (the `g` variable) and
    `r` (`recurrent_g`) one value per unit and gate, `(gates * units,)`. Both
    by default (`recurrent=True`): Salimans & Kingma reparameterize every
    weight vector a unit's pre-activation is a dot product with, and the
    recurrent one is where a learnt scale matters most, since the norms of
    `U`'s columns set the gain of the step-to-step Jacobian `dh_t/dh_{t-1}`,
    which decides whether signals and gradients shrink or grow over time;
    with `r` apart from `U`'s direction, the optimizer moves that gain
    directly. `recurrent=False` normalizes `W` only (`U` stays the
    layer's own variable), for a model that should keep the plain
    recurrent kernel. (tensorflow-addons normalized only the cell's
    `recurrent_kernel`, as a single gain per column, and `W` not at all.)
    At build `g = ||v||` and `r = ||u||`, so the wrapped RNN computes what
    the bare one computes.

    The data init of a recurrent layer (`data_init=True`, or
    `weightnorm_data_init`) standardizes the input part of every gate. The
    whole pre-activation `x_t W + h_{t-1} U + b` has no per-unit statistic
    one batch could fix, as the state it depends on moves with the init;
    the input part has: per gate and unit, the mean mu and std sigma of
    `x_t . v/||v||` over the batch and every time step (every position of a
    ConvLSTM's output too), leaving out the steps the layer's Keras mask
    pads, then `g = 1/sigma` and the input bias `b = o - mu/sigma`, so that
    `x_t W + b - o` has zero mean and unit variance per unit on that batch,
    without dropout. `o` is the offset the cell's bias carries by design,
    kept on top: the 1 that `unit_forget_bias` puts on the forget gate
    (LSTM, ConvLSTM), plus a constant `bias_initializer`'s value (Keras'
    default is zeros; a random initializer counts as 0). The same batch
    gives the same values again. A GRU with `reset_after` keeps its second
    bias row: that recurrent bias sits inside the reset gate's product with
    `h U`, the recurrent part. The recurrent gains `r` stay as they are:
    they set the gain of the step-to-step Jacobian, and Salimans & Kingma
    advise against a data-dependent scale of recurrent weights
    (tensorflow-addons warned so, then rescaled the recurrent gains by the
    statistics of the layer's output, tiled over the gates). Each direction
    of a `Bidirectional` gets the statistics of its own kernel. A wrapped
    cell sees one step at a time, so `data_init=True` on it raises (wrap
    the RNN; `weightnorm_data_init` does an RNN of a wrapped cell).
    The wrapper forwards what `keras.layers.RNN` asks of a cell and
    `Bidirectional` of an RNN (`state_size`, `return_sequences`,
    `go_backwards`...), and the wrapped layer's dropout and stateful states
    advance as without the wrapper.

    With `data_init=True` the wrapper does the data-dependent init of
    Salimans & Kingma once, on the first batch it sees in training (as
    tensorflow-addons' `WeightNormalization` did): it computes what
    `weightnorm_data_init` computes, `g = 1/sigma` and `bias = -mu/sigma`
    for the mean mu and std sigma of each unit's `x . v/||v||` on that batch,
    so that the layer's pre-activation output has zero mean and unit
    variance per unit; that batch's output and gradients already use the new
    values. A non-trainable boolean `initialized` records that it was done:
    it is saved with the model's weights, so a reloaded model does not redo
    it, and `weightnorm_data_init` sets it too. Under a `tf.distribute`
    strategy the statistics are those of the global batch, so every replica
    gets the same `g` and bias: each replica counts the positions of its
    share (a recurrent layer's unmasked steps) and sums `y` and `y^2` over
    them, the counts and sums are added across replicas, and mu and sigma
    come from the totals, exact however unequal the shares. Keras' JAX trainer
    (any stateless scope) keeps only the non-trainable variables a forward
    pass assigns: there the init goes into the non-trainable `g_shift` and
    `bias_shift`, which the layer adds to `g` and the bias, and which its
    next eager use (reading `wrapper.g`, calling it, saving, baking) folds
    into them; the layer computes the same before and after. Statistics of
    a layer that is not recurrent count every position of the batch (a
    Keras mask is not applied). A wrapper that is quantized or has LoRA
    enabled does no data init (its `g` is frozen, or its output is not
    linear in `g`).

    The default is `data_init=False`, unlike tensorflow-addons' `True`:
    a model of this package built before `data_init` existed, or loaded
    from a file saved then, has no `initialized` flag and would otherwise
    have its trained `g` and bias overwritten by the first batch of a
    fine-tuning `fit`. Code ported from tensorflow-addons that relied on
    the default passes `data_init=True`.

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
    >>> tfa_style = WeightNormalization(keras.layers.Dense(3), data_init=True)
    >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    >>> _ = tfa_style(x, training=True)  # the first training batch: init
    >>> bool(tfa_style.initialized.numpy())
    True
    >>> pre = x @ keras.ops.convert_to_numpy(tfa_style.normalized_kernel()) + (
    ...     keras.ops.convert_to_numpy(tfa_style.layer.bias))
    >>> bool(np.allclose(pre.mean(0), 0, atol=1e-5) and np.allclose(pre.std(0), 1, atol=1e-4))
    True

    >>> lstm = WeightNormalization(keras.layers.LSTM(8))
    >>> h = lstm(np.ones((2, 5, 3)))
    >>> tuple(lstm.g.shape), tuple(lstm.recurrent_g.shape)  # 4 gates x 8 units
    ((32,), (32,))

    >>> rnn = WeightNormalization(keras.layers.LSTM(4), data_init=True)
    >>> seq = np.random.default_rng(0).normal(1.0, 2.0, size=(16, 5, 3))
    >>> _ = rnn(seq, training=True)  # the first training batch: init
    >>> cell = rnn.layer.cell
    >>> with rnn.effective_kernel_scope():
    ...     kernel = keras.ops.convert_to_numpy(cell.kernel)
    >>> part = seq.reshape(-1, 3) @ kernel + keras.ops.convert_to_numpy(cell.bias)
    >>> np.round(part.mean(0).reshape(4, 4).mean(1), 4) + 0.0  # per gate: i, f, c, o
    array([0., 1., 0., 0.])
    >>> bool(np.allclose(part.std(0), 1, atol=1e-4))
    True

    Args:
        layer: The layer to wrap.
        data_init: Whether to do the data-dependent init on the first
            training batch (see above). Defaults to `False`; `True` raises
            for a recurrent cell on its own (wrap its RNN).
        recurrent: For recurrent layers, whether the recurrent kernel is
            normalized too (see above); `False` is an error for other
            layers. Defaults to `True`.
        **kwargs: Base layer keyword arguments, such as `name` or `dtype`.

    Reference:
        - [Salimans & Kingma, 2016](https://arxiv.org/abs/1602.07868)
    """

    def __init__(self, layer: keras.layers.Layer, data_init: bool = False,
                 recurrent: bool = True, **kwargs):
        if not isinstance(layer, keras.layers.Layer):
            raise ValueError(
                f"Argument `layer` must be a Keras layer. Supported: {_SUPPORTED}. "
                f"Received: layer={layer!r}"
            )
        for name, value in (("data_init", data_init), ("recurrent", recurrent)):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(
                    f"Argument `{name}` must be True or False. Received: {name}={value!r}")
        self.data_init = bool(data_init)
        self.recurrent = bool(recurrent)
        # `Bidirectional` makes its backward copy from this wrapper's config, with
        # `go_backwards=True` added: it is the wrapped RNN's.
        go_backwards = kwargs.pop("go_backwards", None)
        cells = _recurrent_cells(layer)
        # Not tracked: the cells are sublayers of the wrapped layer, not the wrapper's own.
        object.__setattr__(self, "_cells", None if cells is None else tuple(cells))
        if self._cells is None:
            if not self.recurrent:
                raise ValueError(
                    "Argument `recurrent` applies to recurrent layers only (it says whether "
                    "their recurrent kernel is normalized too). Received: recurrent=False "
                    f"for layer={layer!r}")
            if go_backwards is not None:
                raise ValueError(
                    "Argument `go_backwards` applies to recurrent layers only. Received: "
                    f"go_backwards={go_backwards!r} for layer={layer!r}")
            self.layout = _wrappable_layout(layer)
        else:
            self.layout = "default"  # both kernels: (*k, fan_in, gates * units)
            self._check_recurrent(layer)
            if go_backwards is not None:
                layer.go_backwards = bool(go_backwards)
        if kwargs.get("dtype") is None:
            kwargs["dtype"] = layer.dtype_policy
        super().__init__(layer, **kwargs)
        # A mask passes through the wrapper as it would pass through the layer itself.
        self.supports_masking = bool(getattr(layer, "supports_masking", False))
        if not (self._cells is not None and layer._call_has_mask_arg):
            # Keras hands a mask to a `call` that names one, and a functional model records
            # it with the call: only a wrapped RNN takes it (a baked Dense could not).
            signature = self._call_signature
            self._call_signature = signature.replace(parameters=[
                p for p in signature.parameters.values() if p.name != "mask"])
            self.call_signature_parameters.remove("mask")
            self._call_has_mask_arg = False
        # A quantized layer keeps its quantized policy (set when it was quantized).
        if layer.quantization_mode is None and layer.dtype_policy.name != self.dtype_policy.name:
            layer.dtype_policy = self.dtype_policy
            # An RNN's cells (and a Bidirectional's layers) compute: they follow it too.
            for sublayer in layer._flatten_layers(include_self=False) if self._cells else ():
                sublayer.dtype_policy = self.dtype_policy
        # Model.quantize() only calls leaf layers, so the wrapped layer's own method is
        # the one place to fold g into v before its kernel is quantized. (Keras' own
        # per-instance wrapper is kept once, even if the layer is wrapped again.)
        if "_keras_quantize" not in vars(layer):
            object.__setattr__(layer, "_keras_quantize", layer.quantize)
        object.__setattr__(layer, "quantize", self._quantize_layer)
        # Keras saves a LoRA layer with the update merged into its kernel; the merge must
        # start from the effective kernel (see `save_own_variables`).
        object.__setattr__(layer, "save_own_variables", self._save_layer_variables)

    def _check_recurrent(self, layer) -> None:
        """Raises for what a recurrent wrapper cannot do (see the class docstring)."""
        if self.data_init and layer is self._cells[0]:
            raise ValueError(
                "Argument `data_init=True` needs the whole sequence, and a wrapped cell sees "
                "one time step at a time: wrap the RNN layer instead "
                "(`WeightNormalization(keras.layers.RNN(cell), data_init=True)`), or call "
                "`weightnorm_data_init(model, x)`, which handles an RNN of a wrapped cell. "
                f"Received: data_init=True for layer={layer!r}")
        if layer is self._cells[0] and (getattr(layer, "dropout", 0)
                                        or getattr(layer, "recurrent_dropout", 0)):
            raise ValueError(
                "A recurrent cell with dropout cannot be wrapped on its own: "
                "`keras.layers.RNN` resets a cell's dropout masks after each sequence only "
                "when the cell is its direct child, so a wrapped cell would reuse its first "
                "masks. Wrap the RNN layer instead. Received: "
                f"layer={layer!r} (dropout={layer.dropout}, "
                f"recurrent_dropout={layer.recurrent_dropout})")

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        if self._cells is not None:
            self._build_recurrent()
        elif self.layer.quantization_mode is not None:  # loaded quantized: g is unused
            shape = _layouts.unit_shape(tuple(self.layer.kernel.shape), self.layout)
            self._g = self.add_weight(name="g", shape=shape, initializer="ones",
                                      trainable=False, dtype=self.layer.variable_dtype)
        else:
            kernel = self.v
            self._g = self.add_weight(
                name="g",
                shape=_layouts.unit_shape(tuple(kernel.shape), self.layout),
                initializer=lambda shape, dtype: ops.cast(
                    unit_norms(kernel.value, self.layout), dtype),
                trainable=True,
                dtype=kernel.dtype,
            )
        if self.data_init:
            # Assigned in a replica's forward pass under a tf.distribute strategy, with the
            # same value on every replica.
            self.initialized = self.add_weight(
                name="initialized", shape=(), initializer="zeros", dtype="bool",
                trainable=False, aggregation="only_first_replica")
            # Where a forward pass cannot keep an assignment to g and the bias (Keras' JAX
            # trainer), the init goes here, and into g and the bias at the next eager use.
            shifts = []  # (variable, its shift), in `_init_targets` order
            sides = ("", "backward_") if self._cells is not None and len(self._cells) == 2 \
                else ("",)
            for side, (g, bias) in zip(sides, self._init_targets()):
                for kind, variable in (("g", g), ("bias", bias)):
                    if variable is not None:
                        shifts.append((variable, self.add_weight(
                            name=f"{side}{kind}_shift", shape=variable.shape,
                            initializer="zeros", dtype=variable.dtype, trainable=False,
                            aggregation="only_first_replica")))
            # Not tracked: the shifts are tracked as weights; g and the bias belong elsewhere.
            object.__setattr__(self, "_shifts", tuple(shifts))
            self._g_shift = shifts[0][1]
            bias = getattr(self.layer, "bias", None) if self._cells is None else None
            self._bias_shift = shifts[1][1] if bias is not None else None
            self._shift_pending = False
        self.built = True

    def _build_recurrent(self) -> None:
        """One gain per normalized kernel: `g` (input), `recurrent_g`; `backward_` ones."""
        gains = []  # (kernel variable, its g)
        sides = ("", "backward_") if len(self._cells) == 2 else ("",)
        for side, cell in zip(sides, self._cells):
            kinds = (("", "kernel"), ("recurrent_", "recurrent_kernel"))
            for kind, attribute in kinds[:2 if self.recurrent else 1]:
                kernel = getattr(cell, attribute)
                g = self.add_weight(
                    name=f"{side}{kind}g",
                    shape=(kernel.shape[-1],),
                    initializer=lambda shape, dtype, kernel=kernel: ops.cast(
                        unit_norms(kernel.value, self.layout), dtype),
                    trainable=True,
                    dtype=kernel.dtype,
                )
                gains.append((kernel, g))
        # Not tracked: the kernels are the wrapped layer's variables, not the wrapper's own.
        object.__setattr__(self, "_gains", tuple(gains))
        self._g = gains[0][1]

    def _init_targets(self) -> list[tuple]:
        """`(g, bias)` per side that the data init sets; bias None where there is none.

        The layer's: its g and bias. A recurrent layer's, per cell (forward
        first): the gain of its input kernel and its bias (the recurrent
        gains are not set).
        """
        if self._cells is None:
            return [(self._g, getattr(self.layer, "bias", None))]
        step = 2 if self.recurrent else 1
        return [(self._gains[i * step][1], cell.bias if cell.use_bias else None)
                for i, cell in enumerate(self._cells)]

    def _shifted(self, variable):
        """The variable's value plus its data init shift not yet folded into it, if any."""
        value = variable.value
        if self.data_init:
            for target, shift in self._shifts:
                if target is variable:
                    return value + shift.value
        return value

    @property
    def g(self) -> keras.Variable:
        """The gain variable: the norm of each unit's effective kernel."""
        self._fold_shift()
        return self._g

    @property
    def v(self) -> keras.Variable:
        """The direction variable: the wrapped layer's own kernel.

        For a recurrent layer, its (forward) cell's input `kernel`.
        """
        if self._cells is not None:
            return self._cells[0].kernel
        return kernel_variable(self.layer)

    @property
    def recurrent_g(self) -> keras.Variable | None:
        """The gain of the (forward) cell's `recurrent_kernel`; None where it is not normalized."""
        if self._cells is None or not self.recurrent:
            return None
        return self._gains[1][1]

    @property
    def recurrent_v(self) -> keras.Variable | None:
        """The (forward) cell's `recurrent_kernel`, or None for a non-recurrent layer."""
        return None if self._cells is None else self._cells[0].recurrent_kernel

    def _effective_g(self):
        """g, plus the init not yet folded into it (`data_init` under a stateless trainer)."""
        return self._shifted(self._g)

    def normalized_kernel(self):
        """The effective kernel `g * v / ||v||`, in the variables' dtype."""
        # `.value`, read here: the TF backend's convert_to_tensor(variable) is the variable
        # itself, which would read (and autocast) later, in the caller's compute dtype.
        mode = self.layer.quantization_mode
        if mode is not None:
            raise ValueError(
                f"WeightNormalization layer {self.name!r} is quantized ({mode}): g was folded "
                "into its kernel when it was quantized, so the wrapped layer's quantized "
                "kernel is the effective kernel, and there is no float `g * v / ||v||` to "
                f"compute. Received: layer={self.layer.name!r}")
        self._fold_shift()
        with _float32_reads():
            return self._normalized(self.v.value, self._effective_g())

    def _normalized(self, v, g):
        """`g * v / ||v||` for the values `v` and `g`, in v's dtype."""
        u, sum_sq, _ = _directions(v, self.layout)
        # sum_sq >= 1 for a non-zero column; 0 marks an all-zero one, whose u is 0.
        scale = ops.reshape(ops.cast(g, u.dtype), sum_sq.shape) * ops.rsqrt(
            ops.where(sum_sq > 0, sum_sq, ops.ones_like(sum_sq)))
        return ops.cast(u * scale, v.dtype)

    def _substitutions(self):
        """(variable, value) pairs under which the wrapped layer computes this layer."""
        if self._cells is not None:
            with _float32_reads():
                pairs = [(kernel, self._normalized(kernel.value, self._shifted(g)))
                         for kernel, g in self._gains]
        else:
            pairs = [(self.v, self.normalized_kernel())]
        if self.data_init:
            with _float32_reads():
                pairs += [(bias, self._shifted(bias)) for _, bias in self._init_targets()
                          if bias is not None]
        return pairs

    def call(self, inputs, *args, training=None, mask=None, **kwargs):
        if training is not None:
            kwargs["training"] = training
        if mask is not None and self.layer._call_has_mask_arg:
            kwargs["mask"] = mask
        if self.layer.quantization_mode is not None:  # g was folded into the kernel
            return self.layer(inputs, *args, **kwargs)
        if self.data_init and not keras.backend.is_keras_tensor(inputs):
            self._fold_shift()
            if training and not self._lora_enabled():
                self._data_init_once(inputs, args, kwargs)
        with _substituted(self._substitutions(), self._carried()) as losses:
            outputs = self.layer(inputs, *args, **kwargs)
        for loss in losses:  # re-added outside the scope, where Keras keeps them
            self.layer.add_loss(loss)
        return outputs

    def _carried(self) -> list:
        """Variables the wrapped layer assigns in a forward pass (see `_substituted`)."""
        if self._cells is None:
            return []
        carried = list(self.layer.non_trainable_variables)  # dropout seeds
        for layer in self.layer._flatten_layers():
            if isinstance(layer, keras.layers.RNN) and layer.stateful and layer.states:
                carried.extend(keras.tree.flatten(layer.states))
        return carried

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return self.layer.compute_output_shape(input_shape, *args, **kwargs)

    # What `keras.layers.RNN` asks of a cell and `Bidirectional` of an RNN, from the
    # wrapped one: `RNN(WeightNormalization(LSTMCell(4)))` and
    # `Bidirectional(WeightNormalization(LSTM(4)))` work as without the wrapper.
    def _recurrent_attribute(self, name):
        if self._cells is None or not hasattr(self.layer, name):
            raise AttributeError(
                f"{type(self).__name__} of {type(self.layer).__name__} has no `{name}`")
        return getattr(self.layer, name)

    state_size = property(lambda self: self._recurrent_attribute("state_size"))
    output_size = property(lambda self: self._recurrent_attribute("output_size"))
    get_initial_state = property(lambda self: self._recurrent_attribute("get_initial_state"))
    return_sequences = property(lambda self: self._recurrent_attribute("return_sequences"))
    return_state = property(lambda self: self._recurrent_attribute("return_state"))
    go_backwards = property(lambda self: self._recurrent_attribute("go_backwards"))
    stateful = property(lambda self: self._recurrent_attribute("stateful"))
    states = property(lambda self: self._recurrent_attribute("states"))
    reset_state = property(lambda self: self._recurrent_attribute("reset_state"))
    reset_states = property(lambda self: self._recurrent_attribute("reset_states"))

    @property
    def zero_output_for_mask(self):
        return self._recurrent_attribute("zero_output_for_mask")

    @zero_output_for_mask.setter
    def zero_output_for_mask(self, value):
        self._recurrent_attribute("zero_output_for_mask")
        self.layer.zero_output_for_mask = value

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def get_config(self):
        config = super().get_config()
        # Left out when False (the default), so that such a file still loads with a
        # keras-goodinit from before data_init existed.
        if self.data_init:
            config["data_init"] = True
        if not self.recurrent:
            config["recurrent"] = False
        return config

    def effective_kernel_scope(self):
        """A context in which the wrapped layer's kernel reads as `g * v / ||v||`."""
        self._fold_shift()
        return _substituted(self._substitutions())

    def mark_data_initialized(self) -> None:
        """Records that the data-dependent init was done (as `weightnorm_data_init` does)."""
        if self.data_init and self.built:
            self._fold_shift()
            self.initialized.assign(True)

    def _data_init_once(self, inputs, args, kwargs) -> None:
        """`data_init`: sets g and the bias from this batch unless `initialized` says done.

        Three ways, by where the forward pass runs:
        - In a stateless scope (Keras' JAX trainer, `stateless_call`) only
          non-trainable assignments are kept: the init goes into `g_shift`
          and `bias_shift`, which the forward pass adds, and which the next
          eager use folds into g and the bias (`_fold_shift`).
        - TensorFlow branches on the flag with a `cond`, so a `tf.function`
          (XLA included) runs the init only on its first call. A strategy's
          cross-replica sum and assignment are synchronization points, which
          TensorFlow does not allow inside a `cond`: with several replicas the
          `cond` only computes the local count and sums (zeros once done),
          and the values from their all-reduced totals are assigned on every
          step (the current ones once done).
        - Eager JAX and torch: a Python branch.
        """
        from keras.src.backend.common.stateless_scope import in_stateless_scope

        backend = keras.backend.backend()
        done = ops.convert_to_tensor(self.initialized)

        def values():
            return self._data_init_values(
                [(mean, var) for mean, var, _ in self._pre_activation_stats(inputs, args, kwargs)])

        if in_stateless_scope():
            self._shift_pending = True

            def init():
                with _float32_reads():
                    return [value - variable.value
                            for (variable, _), value in zip(self._shifts, values())]

            def keep():
                return [shift.value for _, shift in self._shifts]

            shifts = ops.cond(done, keep, init)
            for (_, shift), value in zip(self._shifts, shifts):
                shift.assign(value)
            self.initialized.assign(True)
            return
        if backend != "tensorflow":
            if not bool(ops.convert_to_numpy(done)):
                self._assign_data_init(values())
            return
        from keras_goodinit._backend import tf

        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            def init_now():
                self._assign_data_init(values())
                return tf.constant(True)

            tf.cond(done, lambda: tf.constant(False), init_now)
            return
        # Per side, the count and the first two sums over this replica's share (zeros once
        # done), summed over the replicas: exact whatever the shares, a masked sequence's
        # unmasked steps included.
        shapes = self._stat_shapes(inputs)
        zeros = [(tf.zeros((), tf.float64), tf.zeros(shape, tf.float64),
                  tf.zeros(shape, tf.float64)) for shape in shapes]
        sums = tf.cond(done, lambda: zeros, lambda: [
            _sums_of(*stats) for stats in self._pre_activation_stats(inputs, args, kwargs)])
        sums = context.all_reduce("SUM", sums)
        new = self._data_init_values([_moments_of_sums(*side) for side in sums])
        with _float32_reads():
            new = [tf.where(done, variable.value, value)
                   for (variable, _), value in zip(self._shifts, new)]
        self._assign_data_init(new)

    def _stat_shapes(self, inputs) -> list[tuple]:
        """Per side of `_init_targets`, the shape of `_pre_activation_stats`' mean."""
        if self._cells is not None:
            return [(int(cell.kernel.shape[-1]),) for cell in self._cells]
        return [self._target().cell_shape(
            tuple(self.layer.compute_output_shape(tuple(inputs.shape))))]

    def _target(self):
        from keras_goodinit import _sweep

        return _sweep.Target(self, self.layer)

    def _pre_activation_stats(self, inputs, args, kwargs) -> list[tuple]:
        """Per side of `_init_targets`, `(mean, var, count)` (float64 where the backend has
        it) of this batch's pre-activation output per unit: the mean and variance
        over the `count` positions that count.

        A recurrent layer's: of its input part (`_input_part_stats`).
        """
        from keras_goodinit import _sweep

        if self._cells is not None:
            return self._input_part_stats(inputs, kwargs.get("mask"))
        layer, activation = self.layer, self.layer.activation
        layer.activation = keras.activations.linear
        try:
            # Losses the layer adds here (on a pre-activation output) are dropped.
            with _substituted(self._substitutions()):
                y = layer(inputs, *args, **kwargs)
        finally:
            layer.activation = activation
        y = ops.stop_gradient(y)
        axes = self._target().cell_axes(len(y.shape))
        return [(*_sweep.moments_of(y, None, axes), _positions(y, axes))]

    def _input_part_moments(self, inputs, mask=None) -> list[tuple]:
        """Per cell (forward first), the per-unit mean and variance of `x_t W + b - o`
        (`_input_part_stats` without the counts)."""
        return [(mean, var) for mean, var, _ in self._input_part_stats(inputs, mask)]

    def _input_part_stats(self, inputs, mask=None) -> list[tuple]:
        """Per cell (forward first), the per-unit `(mean, var, count)` of `x_t W + b - o`.

        Over the batch and every time step the mask keeps (and every position
        of a ConvLSTM's output), with `W = g v/||v||` the effective input
        kernel, `b` the input bias and `o` the offset the init keeps
        (`_bias_offset`). `inputs`: the sequence the layer is called on,
        `(batch, steps, ...)`; `mask`: `(batch, steps)`, or None for the
        inputs' Keras mask, if any. Without dropout, whatever the mode. `count`:
        the number of (sample, step, position) terms of each unit's statistics.
        """
        from keras_goodinit import _sweep

        x = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        x = ops.convert_to_tensor(x)
        if mask is None:
            mask = _sweep._input_mask(x)
        if mask is not None:
            mask = ops.convert_to_tensor(mask, "bool")
        flat = ops.reshape(x, (-1,) + tuple(x.shape[2:]))  # every step a sample
        moments = []
        for cell, (g, bias) in zip(self._cells, self._init_targets()):
            kernel = cell.kernel
            with _float32_reads():
                w = self._normalized(kernel.value, self._shifted(g))
            w = ops.stop_gradient(w)
            z = ops.cast(flat, w.dtype)
            if isinstance(cell, _cell_classes()[-1]):  # ConvLSTM: the cell's own convolution
                y = cell.input_conv(z, w, padding=cell.padding)
                if cell.data_format == "channels_first":
                    y = ops.moveaxis(y, 1, -1)
            else:
                y = ops.matmul(z, w)
            if bias is not None:
                with _float32_reads():
                    b = ops.cast(self._input_row(self._shifted(bias)), w.dtype)
                y = y + ops.stop_gradient(b) - ops.cast(_bias_offset(cell), w.dtype)
            weights = None
            if mask is not None:
                if len(mask.shape) > 2:  # a Masking layer's on a ConvLSTM's input: a step
                    mask = ops.any(mask, axis=tuple(range(2, len(mask.shape))))  # counts if any
                weights = ops.reshape(ops.cast(mask, "float32"),
                                      (-1,) + (1,) * (len(y.shape) - 1))
            axes = tuple(range(len(y.shape) - 1))
            mean, var = _sweep.moments_of(y, weights, axes)
            count = _positions(y, axes)
            if weights is not None:  # the unmasked steps, times each one's positions
                count = ops.sum(ops.cast(weights, _backend.wide())) * _positions(y, axes[1:])
            moments.append((ops.reshape(mean, (-1,)), ops.reshape(var, (-1,)), count))
        return moments

    @staticmethod
    def _input_row(bias):
        """The input bias of a cell's bias (a GRU with `reset_after` has two rows)."""
        return bias[0] if len(bias.shape) == 2 else bias

    def _init_variables(self) -> list:
        """The variables the data init sets (`_init_targets`, flat: g, bias, g, bias...)."""
        return [v for pair in self._init_targets() for v in pair if v is not None]

    def _data_init_values(self, moments, states=None) -> list:
        """New values of the `_init_variables`, in their order, from the pre-activation
        moments of each side, by `weightnorm_data_init`'s rule; each side's
        `lsuv._unit_init` state is appended to `states` if given."""
        from keras_goodinit import _sweep, lsuv

        floor = lsuv._relative_floor(self.layer.compute_dtype)
        cells = self._cells if self._cells is not None else [None]
        new = []
        for cell, (g_var, bias_var), (mean, var) in zip(cells, self._init_targets(), moments):
            shape = tuple(mean.shape)
            bias = full = None
            offset = 0.0
            with _float32_reads():
                g = ops.reshape(ops.cast(self._shifted(g_var), mean.dtype), shape)
                if bias_var is not None:
                    full = ops.cast(self._shifted(bias_var), mean.dtype)
            if bias_var is not None:
                if cell is not None:
                    offset = ops.cast(_bias_offset(cell), mean.dtype)
                bias = ops.reshape(self._input_row(full) - offset, shape)
            state = lsuv._unit_init(mean, var, _sweep.with_zeros(bias, mean), g, floor,
                                    has_bias=bias is not None)
            if states is not None:
                states.append(state)
            new.append(ops.cast(ops.reshape(state["g"], g_var.shape), stored_dtype(g_var)))
            if bias_var is not None:
                value = ops.reshape(state["bias"], (-1,)) + offset
                if len(bias_var.shape) == 2:  # the recurrent row is the recurrent part's
                    value = ops.stack([value, full[1]])
                new.append(ops.cast(ops.reshape(value, bias_var.shape),
                                    stored_dtype(bias_var)))
        return new

    def _assign_data_init(self, values) -> None:
        """Assigns the `_shifts` variables' new values and the flag (through the strategy's
        update under TF)."""
        pairs = [(variable, value) for (variable, _), value in zip(self._shifts, values)]
        pairs.append((self.initialized, ops.convert_to_tensor(True)))
        if keras.backend.backend() != "tensorflow":
            for variable, value in pairs:
                variable.assign(value)
            return
        from keras_goodinit._backend import tf

        def update(strategy, values):
            for (variable, _), value in zip(pairs, values):
                with _float32_reads():
                    target = variable.value
                strategy.extended.update(target, lambda var, val: var.assign(val),
                                         args=(value,), group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            update, tf.distribute.get_strategy(), [value for _, value in pairs])

    def _fold_shift(self) -> None:
        """Moves an init held in the shifts (`g_shift`...) into g and the bias, where it can.

        Only eagerly and outside a stateless scope, where an assignment to g
        is kept; the pair's sum, which the layer computes with, is unchanged.
        """
        if not (self.data_init and self.built and self._shift_pending):
            return
        from keras.src.backend.common.stateless_scope import in_stateless_scope

        if in_stateless_scope() or not _concrete(self._g_shift):
            return
        values = [(ops.convert_to_numpy(v.value), ops.convert_to_numpy(s.value))
                  for v, s in self._shifts]
        for (variable, shift), (value, offset) in zip(self._shifts, values):
            if np.any(offset != 0):
                variable.assign(value + offset)
                shift.assign(np.zeros_like(offset))
        self._shift_pending = False

    def load_own_variables(self, store):
        super().load_own_variables(store)
        if self.data_init:
            self._shift_pending = True  # a file saved by a stateless trainer may hold one

    def _lora_enabled(self) -> bool:
        return bool(getattr(self.layer, "lora_enabled", False)) and self.built

    def save_own_variables(self, store):
        # With LoRA, Keras saves the layer's kernel as its kernel plus the update (and
        # zeroes the update at load): here that kernel is `g v / ||v|| + update`, so g is
        # saved as its norms, for the loaded wrapper to compute that kernel.
        self._fold_shift()
        if not self._lora_enabled() or self.layer.quantization_mode is not None:
            return super().save_own_variables(store)
        layer_store = {}
        self._save_layer_variables(layer_store)
        store["0"] = ops.cast(unit_norms(layer_store["0"], self.layout), self.g.dtype)
        for i, variable in enumerate(self._non_trainable_variables, 1):  # data_init's
            store[str(i)] = variable.numpy()

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
        if (not (self.built and layer.built) or layer.quantization_mode is not None
                or self._cells is not None):
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

    The two layer trees are walked together, each layer's direct sublayers
    in the order saving finds them (`_flatten_layers`), except where a
    layer names its sublayers' roles: a `Bidirectional`'s forward and
    backward layers, an RNN's cell, a wrapper's layer (a rebuilt
    `Bidirectional` may list its backward layer first). A baked wrapper
    stands in the original for its wrapped layer, whose kernels (and its
    sublayers': an RNN's cells') then read as the effective kernels while
    they are saved.
    """
    kept: list[str] = []
    _copy_tree(model, baked, contextlib.nullcontext, kept, model.name)
    return kept


def _copy_tree(source, twin, scope, kept: list[str], model_name: str) -> None:
    """`_copy_weights` for `source` and its sublayers, under the context `scope()`."""
    if isinstance(source, WeightNormalization):
        if isinstance(twin, WeightNormalization):
            kept.append(source.path)
        else:
            # A quantized layer's kernel already is the effective kernel (g was
            # folded in when it was quantized): its variables are copied as they are.
            if source.layer.quantization_mode is None:
                scope = source.effective_kernel_scope
            source = source.layer
    # By type, not name: a sublayer a custom layer creates itself gets a new name.
    if twin is None or type(twin) is not type(source):
        raise ValueError(
            "bake_weight_norm could not match the rebuilt model's layers to the "
            f"original's: {source.path!r} ({type(source).__name__}) has no twin (found "
            f"{getattr(twin, 'path', None)!r}). Received: model={model_name!r}"
        )
    store = {}
    with scope():
        source.save_own_variables(store)
        store = {key: ops.convert_to_numpy(value) for key, value in store.items()}
    twin.load_own_variables(store)
    children, twins = _sublayers(source), _sublayers(twin)
    for i, child in enumerate(children):
        _copy_tree(child, twins[i] if i < len(twins) else None, scope, kept, model_name)


def _sublayers(layer) -> list:
    """A layer's direct sublayers, in the order `_copy_tree` pairs them."""
    if isinstance(layer, keras.layers.Bidirectional):
        return [layer.forward_layer, layer.backward_layer]
    if isinstance(layer, keras.layers.Wrapper):
        return [layer.layer]
    if isinstance(layer, keras.layers.RNN):
        return [layer.cell]
    return list(layer._flatten_layers(include_self=False, recursive=False))


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
