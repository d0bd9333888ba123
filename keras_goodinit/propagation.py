"""Signal propagation at initialization: the networks and measurements of Figure 1.

Arpit, Campos & Bengio (2019) check their initialization by pushing Gaussian
inputs through deep, untrained, weight-normalized networks and watching how
the norms of the activations (forward) and of the gradients with respect to
them (backward) change with depth. This module builds those networks from the
package's own layers and measures the two norm ratios, so that the example
`examples/signal_propagation.py` and the tests share one implementation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from keras_goodinit import _backend, _graph, _sweep, _validate
from keras_goodinit.initializers import GoodInit
from keras_goodinit.models import _kernel_initializer
from keras_goodinit.weight_norm import WeightNormalization


def _check_common(proposed, distribution, seed) -> tuple[bool, int]:
    proposed = _validate.boolean("proposed", proposed)
    # The chains are Dense: delta-orthogonal is a convolution's (it would equal "orthogonal").
    _validate.one_of("distribution", distribution, ("orthogonal", "normal"))
    return proposed, _validate.seed(seed, allow_none=False)


def _layer_seeds(seed: int, count: int) -> list[int]:
    # SeedSequence spreads one seed into independent streams: every layer gets
    # its own kernel, and the proposed and g = 1 networks built from the same
    # seed share their directions (they differ only in the scales g).
    state = np.random.SeedSequence(int(seed)).generate_state(count)
    return [int(s >> 1) for s in state]  # fit a signed 32-bit seed


def _initializer(role: str, proposed: bool, distribution: str, seed: int,
                 num_blocks: int | None = None):
    # The builders' mapping, for weight-normalized layers: the proposed g, or g = 1.
    init = {"orthogonal": "orthogonal", "normal": "he"}[distribution]
    return _kernel_initializer(f"{init}_proposed" if proposed else init, role, wrapped=True,
                               num_blocks=num_blocks, seed=seed)


def _dense(units: int, init: GoodInit, activation: str | None, name: str) -> keras.layers.Layer:
    return WeightNormalization(
        keras.layers.Dense(units, activation=activation, use_bias=False, kernel_initializer=init),
        name=name,
    )


def mlp_chain(
    widths: Sequence[int],
    *,
    proposed: bool = True,
    distribution: str = "orthogonal",
    seed: int = 0,
) -> keras.Model:
    """A bias-free, weight-normalized ReLU MLP that outputs every layer's activation.

    Layer `l` computes `h_l = relu(W_l h_{l-1})` with `W_l` a
    `WeightNormalization(Dense(widths[l], use_bias=False))` whose kernel comes
    from `GoodInit`.

    Examples:

    >>> model = mlp_chain([500] + [200] * 20)
    >>> activations = model(np.random.normal(size=(8, 500)))  # 20 tensors

    Args:
        widths: The input width followed by the width of every layer, e.g.
            `[500] + [200] * 20` for 20 layers.
        proposed: `True` for the scales of Arpit et al. (`GoodInit("wn_relu")`,
            `g = sqrt(2 fan_in / fan_out)`), `False` for `g = 1`.
        distribution: Directions of the kernels, `"orthogonal"` or
            `"normal"` (He-like).
        seed: Non-negative int; each layer gets its own seed derived from it.

    Returns:
        A functional `keras.Model` mapping `(batch, widths[0])` inputs to the
        list `[h_1, ..., h_L]`.
    """
    widths = _validate.shape(
        "widths", widths, min_rank=2,
        expected="a sequence of at least two positive ints (the input's width, then one per "
                 "layer)")
    proposed, seed = _check_common(proposed, distribution, seed)
    seeds = _layer_seeds(seed, len(widths) - 1)
    inputs = keras.Input((widths[0],), name="x")
    h = inputs
    activations = []
    for index, (units, layer_seed) in enumerate(zip(widths[1:], seeds, strict=True), start=1):
        init = _initializer("relu", proposed, distribution, layer_seed)
        h = _dense(units, init, "relu", f"layer_{index}")(h)
        activations.append(h)
    return keras.Model(inputs, activations, name="mlp_chain")


def residual_chain(
    width: int,
    branch_width: int,
    num_blocks: int,
    *,
    proposed: bool = True,
    distribution: str = "orthogonal",
    seed: int = 0,
) -> keras.Model:
    """A bias-free, weight-normalized ResNet that outputs the stream after every block.

    Block `b` computes `h_b = h_{b-1} + W1 relu(W0 h_{b-1})`, with `W0` of
    shape `(width, branch_width)` and `W1` of shape `(branch_width, width)`,
    both `WeightNormalization(Dense(..., use_bias=False))`. There is no ReLU
    after the addition.

    Examples:

    >>> model = residual_chain(500, 200, 40)
    >>> streams = model(np.random.normal(size=(8, 500)))  # 40 tensors

    Args:
        width: Width of the residual stream (and of the input).
        branch_width: Width `m` of the hidden layer of each branch.
        num_blocks: Number of residual blocks `N`.
        proposed: `True` for the scales of Arpit et al.: `W0` gets
            `GoodInit("wn_relu")` (`g0 = sqrt(2 width / m)`) and `W1` gets
            `GoodInit("wn_residual", num_blocks=N)`
            (`g1 = sqrt(m / (N width))`); `False` for `g = 1` everywhere.
        distribution: Directions of the kernels, `"orthogonal"` or
            `"normal"` (He-like).
        seed: Non-negative int; each layer gets its own seed derived from it.

    Returns:
        A functional `keras.Model` mapping `(batch, width)` inputs to the list
        `[h_1, ..., h_N]`.
    """
    width, branch_width, num_blocks = (
        _validate.integer(name, value, minimum=1, expected="a positive int")
        for name, value in (("width", width), ("branch_width", branch_width),
                            ("num_blocks", num_blocks)))
    proposed, seed = _check_common(proposed, distribution, seed)
    seeds = _layer_seeds(seed, 2 * num_blocks)
    inputs = keras.Input((width,), name="x")
    h = inputs
    streams = []
    for block in range(1, num_blocks + 1):
        first = _initializer("relu", proposed, distribution, seeds[2 * block - 2])
        last = _initializer("residual", proposed, distribution, seeds[2 * block - 1],
                            num_blocks=num_blocks)
        branch = _dense(branch_width, first, "relu", f"block_{block}_in")(h)
        branch = _dense(width, last, None, f"block_{block}_out")(branch)
        h = keras.layers.Add(name=f"block_{block}_add")([h, branch])
        streams.append(h)
    return keras.Model(inputs, streams, name="residual_chain")


def norm_ratios(model: keras.Model, x, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Forward and backward norm ratios of a model that outputs its per-layer activations.

    With `h_0 = x` and `[h_1, ..., h_L] = model(x)`, and norms taken over the
    whole batch (Frobenius):

    - `forward[l] = ||h_l|| / ||x||`,
    - `backward[l] = ||dh_l|| / ||dh_L||`, where `dh_l` is the gradient of
      `sum(h_L * r)` with respect to `h_l` and `r` is a fixed standard
      Gaussian probe (so `dh_L = r`, independent of the network).

    The gradients come from the backend's own autodiff: a tape over one
    forward pass on TensorFlow and PyTorch; on JAX, `jax.grad` of zeros added
    to the layers' outputs in the pass (which needs a functional or
    Sequential model, whose layers are known).

    Examples:

    >>> x = np.random.default_rng(0).normal(size=(1000, 500)).astype("float32")
    >>> forward, backward = norm_ratios(mlp_chain([500] + [200] * 20), x)

    Args:
        model: A model whose output is the list of per-layer activations, such
            as `mlp_chain` or `residual_chain` return.
        x: Inputs of shape `(batch, input_width)`.
        seed: Seed of the Gaussian probe `r`, a non-negative int.

    Returns:
        Two float64 arrays of length `L + 1`, indexed by layer `l = 0..L`
        (`forward[0] = 1`, `backward[L] = 1`).
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"Argument `model` must be a keras.Model. Received: model={model!r}")
    seed = _validate.seed(seed, allow_none=False)
    x = ops.convert_to_tensor(x, dtype="float32")
    if len(x.shape) != 2 or x.shape[0] == 0:
        raise ValueError(
            f"Argument `x` must be a non-empty batch of shape (batch, width). "
            f"Received: x with shape {tuple(x.shape)}"
        )
    graph = _graph.flatten(model) if _graph.functional_of(model) is not None else None
    if graph is None and not _backend.has_none_gradients():
        raise ValueError(
            f"On Keras' {_backend.name()!r} backend, argument `model` must be a functional or "
            "Sequential model (its gradients are taken at its layers' outputs). "
            f"Received: model={model!r}")
    if graph is not None:
        _check_feeding(model, graph)

    def compute(wrt, perturbations):
        with _perturbed_outputs(graph, perturbations):
            activations = _activations(model, model(wrt[0], training=False))
        top = ops.cast(activations[-1], "float32")
        probe = np.random.default_rng(seed).standard_normal(tuple(top.shape)).astype("float32")
        return ops.sum(top * ops.convert_to_tensor(probe)), activations, None

    _, activations, _, gradients = _backend.loss_gradients(compute, [x])
    *gradients, input_gradient = gradients
    if graph is not None:
        # An output that is the input itself has the input's gradient (and no layer to
        # perturb on JAX); an output that reaches the top through dead units only, zero.
        gradients = [input_gradient if key in graph.inputs else
                     ops.zeros_like(h) if g is None else g
                     for key, g, h in zip(graph.outputs, gradients, activations, strict=True)]
    elif any(g is None for g in gradients):
        raise _not_feeding(model)
    forward = [_norm(h) for h in [x, *activations]]
    backward = [_norm(g) for g in [input_gradient, *gradients]]
    return np.asarray(forward) / forward[0], np.asarray(backward) / backward[-1]


def _activations(model, outputs) -> list:
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]  # Keras unwraps a one-layer list
    if not outputs or not all(hasattr(h, "shape") and hasattr(h, "dtype") for h in outputs):
        raise ValueError(
            "Argument `model` must output the list of its per-layer activations. "
            f"Received: model={model.name!r} with output {type(outputs).__name__}")
    return list(outputs)


def _check_feeding(model, graph) -> None:
    above = _graph.ancestors(graph)[graph.outputs[-1]]
    if not all(key in above for key in graph.outputs):
        raise _not_feeding(model)


def _not_feeding(model) -> ValueError:
    return ValueError("Every activation output by `model` must feed the last one. "
                      f"Received: model={model.name!r}")


def _perturbed_outputs(graph, perturbations):
    """Within the block, `perturbations[i]` is added to the model's i-th output where the
    layer making it returns it (so the layers after it see the sum); None: nothing."""
    if perturbations is None:
        return contextlib.nullcontext()
    # Each output where the call making it returns it (`Graph.hooks`): a layer or op called
    # several times makes outputs at several calls.
    made: dict[int, dict[tuple[int, int], list[int]]] = {}
    layers = {}
    for i, key in enumerate(graph.outputs):
        hook = graph.hook(key)
        if hook is None:
            continue  # a model input: its gradient is the input's
        layer, index, position = hook
        layers[id(layer)] = layer
        made.setdefault(id(layer), {}).setdefault((index, position), []).append(i)

    def adding(mine):
        def wrap(call):
            count = [0]

            def perturbed_call(*args, **kwargs):
                outputs = call(*args, **kwargs)
                flat = keras.tree.flatten(outputs)
                for (index, position), which in mine.items():
                    if index == count[0]:
                        flat[position] = flat[position] + sum(perturbations[i] for i in which)
                count[0] += 1
                return keras.tree.pack_sequence_as(outputs, flat)
            return perturbed_call
        return wrap

    return _sweep.wrapped_calls([(layers[k], adding(mine)) for k, mine in made.items()])


def _norm(tensor) -> float:
    return float(np.linalg.norm(ops.convert_to_numpy(ops.cast(tensor, "float32"))))
