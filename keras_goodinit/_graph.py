"""The layer graph of a built Sequential or functional model, nested models inlined.

`flatten` turns the model into one list of steps in execution order, each a
layer call with integer keys for its input and output tensors, so that a
nested model's layers are steps like any other. On that list:
`follower` finds what consumes a kernel layer's output (looking through
dropout, pooling, reshapes, padding and normalization), and
`residual_blocks` finds the residual `Add`s, their branch's last kernel
and the number of blocks in each stage.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
from keras import layers as klayers

_ACTIVATIONS = (klayers.Activation, klayers.ReLU, klayers.LeakyReLU, klayers.ELU,
                klayers.PReLU, klayers.Softmax)
_NORMALIZATIONS = (klayers.BatchNormalization, klayers.LayerNormalization,
                   klayers.GroupNormalization, klayers.RMSNormalization)
# Layers that do not change which activation a kernel's output meets.
_LOOK_THROUGH = (
    klayers.Dropout, klayers.SpatialDropout1D, klayers.SpatialDropout2D,
    klayers.SpatialDropout3D, klayers.GaussianDropout, klayers.GaussianNoise,
    klayers.AlphaDropout, klayers.ActivityRegularization, klayers.Identity,
    klayers.MaxPooling1D, klayers.MaxPooling2D, klayers.MaxPooling3D,
    klayers.AveragePooling1D, klayers.AveragePooling2D, klayers.AveragePooling3D,
    klayers.GlobalAveragePooling1D, klayers.GlobalAveragePooling2D,
    klayers.GlobalAveragePooling3D, klayers.GlobalMaxPooling1D, klayers.GlobalMaxPooling2D,
    klayers.GlobalMaxPooling3D, klayers.Flatten, klayers.Reshape, klayers.Permute,
    klayers.ZeroPadding1D, klayers.ZeroPadding2D, klayers.ZeroPadding3D,
    klayers.Cropping1D, klayers.Cropping2D, klayers.Cropping3D,
    klayers.UpSampling1D, klayers.UpSampling2D, klayers.UpSampling3D, klayers.Masking,
)


@dataclasses.dataclass(eq=False)
class Step:
    """One layer call: `outputs = layer(*inputs)`, tensors named by integer keys."""

    layer: keras.layers.Layer
    inputs: list[int]
    outputs: list[int]
    path: str  # the names of the enclosing nested models, "outer/inner"


@dataclasses.dataclass
class Graph:
    steps: list[Step]
    inputs: list[int]
    outputs: list[int]
    shapes: dict[int, tuple]  # key -> symbolic shape (batch axis included)
    producer: dict[int, Step]
    consumers: dict[int, list[Step]]


def functional_of(model) -> Any:
    """The functional graph behind a Sequential or functional model; None for others."""
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if isinstance(model, Functional):
        return model
    return None


def flatten(model: keras.Model) -> Graph:
    """The steps of a built Sequential or functional model, nested models inlined.

    Raises a ValueError for a subclassed model (it has no graph to walk) or
    a Sequential model that has never been built.
    """
    graph = functional_of(model)
    if graph is None:
        what = ("a Sequential model that is not built (call it once, or give it an "
                "`keras.Input`)" if isinstance(model, keras.Sequential) else
                f"a subclassed model ({type(model).__name__}): its `call` is Python code, "
                "with no layer graph to walk")
        raise ValueError(
            "Argument `model` must be a built Sequential or functional model; this is "
            f"{what}. Initialize its layers with GoodInit instead. Received: model={model!r}")
    counter = iter(range(1 << 62))
    steps, shapes = [], {}

    def new_key(tensor) -> int:
        key = next(counter)
        shapes[key] = tuple(tensor.shape)
        return key

    inputs = [new_key(t) for t in keras.tree.flatten(graph.inputs)]
    outputs = _walk(graph, inputs, steps, new_key, model.name)
    producer = {k: s for s in steps for k in s.outputs}
    consumers: dict[int, list[Step]] = {}
    for step in steps:
        for key in step.inputs:
            consumers.setdefault(key, [])
            if step not in consumers[key]:
                consumers[key].append(step)
    return Graph(steps, inputs, outputs, shapes, producer, consumers)


def _walk(graph, in_keys, steps, new_key, path) -> list[int]:
    env = {id(t): k for t, k in zip(keras.tree.flatten(graph.inputs), in_keys)}
    by_depth = graph._nodes_by_depth
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            tensors = node.arguments.keras_tensors
            if any(id(t) not in env for t in tensors):
                continue  # not computable from the inputs, as in Keras' own run
            keys = [env[id(t)] for t in tensors]
            inner = functional_of(node.operation)
            if inner is not None and node.operation is not graph:
                outs = _walk(inner, keys, steps, new_key, f"{path}/{node.operation.name}")
            else:
                outs = [new_key(t) for t in node.outputs]
                steps.append(Step(node.operation, keys, outs, path))
            for tensor, key in zip(node.outputs, outs):
                env[id(tensor)] = key
    return [env[id(t)] for t in keras.tree.flatten(graph.outputs)]


def is_activation(layer) -> bool:
    return isinstance(layer, _ACTIVATIONS)


def is_normalization(layer) -> bool:
    return isinstance(layer, _NORMALIZATIONS)


def looks_through(layer) -> bool:
    return isinstance(layer, _LOOK_THROUGH) or type(layer).__name__ == "Cast"


@dataclasses.dataclass
class Follower:
    """What a kernel layer's output meets: an activation layer, an Add, or nothing."""

    kind: str  # "activation", "add", "kernel", "output", "fork", "other"
    step: Step | None = None
    through: tuple[str, ...] = ()  # names of the layers looked through


def follower(graph: Graph, key: int, kernels: set[int]) -> Follower:
    """The first step that is neither a look-through layer nor a normalization.

    `kernels` holds `id(layer)` of the kernel layers.
    """
    through = []
    while True:
        users = graph.consumers.get(key, [])
        if key in graph.outputs and not users:
            return Follower("output", None, tuple(through))
        if len(users) != 1 or key in graph.outputs:
            return Follower("fork", None, tuple(through))
        (step,) = users
        layer = step.layer
        if is_activation(layer):
            return Follower("activation", step, tuple(through))
        if isinstance(layer, klayers.Add):
            return Follower("add", step, tuple(through))
        if id(layer) in kernels:
            return Follower("kernel", step, tuple(through))
        if (looks_through(layer) or is_normalization(layer)) and len(step.inputs) == 1:
            through.append(layer.name)
            key = step.outputs[0]
            continue
        return Follower("other", step, tuple(through))


@dataclasses.dataclass(eq=False)
class Block:
    """A residual `Add`: `add(skip, branch)`."""

    add: Step
    skip: int  # key of the skip input
    branch: int  # key of the branch input
    source: int  # key of the stream tensor the block starts from
    projection: Step | None  # the skip's kernel, if the skip is a projection
    branch_end: Step | None  # the branch's last kernel step
    stage: int = 0
    num_blocks: int = 0
    reason: str = ""  # why the branch end cannot be scaled, if it cannot


def ancestors(graph: Graph) -> dict[int, frozenset]:
    found: dict[int, frozenset] = {k: frozenset((k,)) for k in graph.inputs}
    for step in graph.steps:
        above = frozenset().union(*(found.get(k, frozenset((k,))) for k in step.inputs))
        for key in step.outputs:
            found[key] = above | {key}
    return found


def _chain(graph: Graph, key: int):
    """Yields (key, step that made it) back from `key` through single-input steps."""
    while True:
        step = graph.producer.get(key)
        yield key, step
        if step is None or len(step.inputs) != 1 or len(step.outputs) != 1:
            return
        key = step.inputs[0]


def residual_blocks(graph: Graph, kernels: set[int]) -> tuple[list[Block], list[tuple]]:
    """The residual `Add`s of the graph with their stages; and the `Add`s that are not.

    An `Add` of two inputs is a residual block if one input is an ancestor of
    the other (identity skip) or if both reach a common tensor through
    chains of single-input layers, the skip's chain holding fewer kernels
    (a projection) than the branch's. Blocks chain into a stream when a
    block's source is the previous block's output (through single-input
    layers that keep its shape); a stage ends where the shape changes.

    Returns:
        `(blocks, plain)`: `plain` lists `(add step, reason)` for the `Add`s
        treated as plain sums.
    """
    above = ancestors(graph)
    blocks, plain = [], []
    for step in graph.steps:
        if not isinstance(step.layer, klayers.Add):
            continue
        if len(step.inputs) != 2:
            plain.append((step, f"Add of {len(step.inputs)} inputs: treated as a plain sum"))
            continue
        block = _block(graph, step, above, kernels)
        if isinstance(block, str):
            plain.append((step, block))
        else:
            blocks.append(block)
    _stages(graph, blocks)
    return blocks, plain


def _block(graph, step, ancestors, kernels):
    a, b = step.inputs
    if a == b:
        return "Add of a tensor with itself: treated as a plain sum"
    if a in ancestors[b]:
        skip, branch, source, projection = a, b, a, None
    elif b in ancestors[a]:
        skip, branch, source, projection = b, a, b, None
    else:
        paths = {}
        for mine, other in ((a, b), (b, a)):
            count, meet, last_kernel = 0, None, None
            for key, made_by in _chain(graph, mine):
                if key in ancestors[other]:
                    meet = key
                    break
                if made_by is not None and id(made_by.layer) in kernels:
                    count += 1
                    last_kernel = made_by
            paths[mine] = (count, meet, last_kernel)
        (ca, ma, _), (cb, mb, _) = paths[a], paths[b]
        if ma is None or mb is None or ma != mb:
            return "Add of two paths that do not start from one tensor: treated as a plain sum"
        if ca == cb:
            return (f"Add of two paths with {ca} kernel layer(s) each: no skip to tell from "
                    "the branch; treated as a plain sum")
        skip, branch = (a, b) if ca < cb else (b, a)
        source = ma
        projection = paths[skip][2] if paths[skip][0] == 1 else None
        if paths[skip][0] > 1:
            return "Add whose shorter path has several kernel layers: treated as a plain sum"
    end, reason = None, ""
    for _key, made_by in _chain(graph, branch):
        if made_by is None:
            reason = "the branch has no kernel layer"
            break
        if id(made_by.layer) in kernels:
            end = made_by
            break
        if len(made_by.inputs) != 1:
            reason = (f"the branch ends in {type(made_by.layer).__name__} "
                      f"{made_by.layer.name!r}, a merge, before any kernel")
            break
    if end is not None and len(graph.consumers.get(end.outputs[0], [])) != 1:
        end, reason = None, "the branch's last kernel also feeds other layers"
    return Block(step, skip, branch, source, projection, end, reason=reason)


def _stages(graph: Graph, blocks: list[Block]) -> None:
    by_output = {b.add.outputs[0]: b for b in blocks}
    stage_of: dict[int, int] = {}
    counts: dict[int, int] = {}
    next_stage = 0
    for block in blocks:  # execution order: a predecessor comes first
        previous = None
        out_shape = graph.shapes[block.add.outputs[0]][1:]
        for key, made_by in _chain(graph, block.source):
            if key in by_output:
                previous = by_output[key]
                break
            if made_by is None or graph.shapes[key][1:] != out_shape:
                break
        if (previous is None or graph.shapes[block.source][1:] != out_shape
                or graph.shapes[previous.add.outputs[0]][1:] != out_shape):
            stage_of[id(block)] = next_stage
            next_stage += 1
        else:
            stage_of[id(block)] = stage_of[id(previous)]
        counts[stage_of[id(block)]] = counts.get(stage_of[id(block)], 0) + 1
    for block in blocks:
        block.stage = stage_of[id(block)]
        block.num_blocks = counts[block.stage]
