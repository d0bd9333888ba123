"""One op-level graph of what a model computes, shared by every graph-level feature.

Design. A *step* is one call of a Keras layer or of a `keras.ops` operation,
with integer keys for its input and output tensors; `flatten` lists a model's
steps in an order where every tensor is made before it is used. Functional
and Sequential models give their nodes directly: layers, and the op nodes
that tensor code such as `h + x`, `x * 2.0` or `keras.ops.add` records.
Nested functional models are walked into. A layer with no rule of its own in
`keras_goodinit.rules` (a subclassed layer or model: a KerasHub block, a
user's residual block, `MultiHeadAttention`) is *inlined*: its `call` is run
once on fresh `KerasTensor`s, where Keras records every op and sublayer call
as a node, and those nodes are walked in turn, recursively, so the residual
adds inside it are ordinary steps. A call that cannot be traced that way
(host code, Python control flow on tensor values, a backend-only function)
stays one *opaque* step whose `opaque` field says why; the rules then know
nothing about its output, and the reports say so rather than guess. A layer
whose `call` returns backend tensors made from its input's shape alone (a
position embedding's slice of its table) is an opaque step with no inputs,
so that no sum takes it for a branch of the tensor it was called on. What
each kind of step does (kernel, activation, sum, look-through...) is not
decided here but by the step's rule, the one place for that knowledge.
Residual blocks are found on the steps: any sum whose inputs are a skip and
one or more branches (`_graph.residual_blocks`).

Steps made by a model's own nodes, and the sublayer calls inside an inlined
layer, run as the same objects when the model runs, so a pass can hook them
(`Graph.hooks`); the ops inside an inlined layer's `call` do not exist at run
time, and have no hook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import types
import weakref
from typing import Any

import keras

from keras_goodinit import rules


@dataclasses.dataclass(eq=False)
class Step:
    """One call: `outputs = layer(*args, **kwargs)`, tensors named by integer keys.

    `layer` is the Keras layer or `keras.ops` operation called; `args` and
    `kwargs` are the call's arguments with each tensor replaced by its `Ref`
    (none, and no `inputs`, for a layer whose output its input's values do
    not make: see the module docstring).
    """

    layer: Any
    inputs: list[int]
    outputs: list[int]
    path: str = ""  # the enclosing nested models and inlined layers, "outer/inner"
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    opaque: str = ""  # why a layer without a rule could not be inlined
    hookable: bool = True  # runs as this object when the model runs

    @property
    def name(self) -> str:
        """The step's path name, unique for each layer object of a model."""
        return f"{self.path}/{self.layer.name}" if self.path else self.layer.name

    @property
    def rule(self):
        return rules.rule_for(self.layer)


@dataclasses.dataclass(frozen=True)
class Ref:
    """A tensor argument of a step: the key of the tensor."""

    key: int


@dataclasses.dataclass
class Graph:
    steps: list[Step]
    inputs: list[int]
    outputs: list[int]
    shapes: dict[int, tuple]  # key -> symbolic shape (batch axis included)
    producer: dict[int, Step]
    consumers: dict[int, list[Step]]
    # key -> (layer or op, its call index in the pass, output position): where a pass can
    # read the tensor; keys made inside an inlined layer's own code have none.
    hooks: dict[int, tuple[Any, int, int]] = dataclasses.field(default_factory=dict)
    # (path name, class name, why) of each layer kept opaque.
    opaque: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    # The length open sequence axes were traced at (`flatten`'s `length`).
    length: int = 8

    def hook(self, key: int) -> tuple[Any, int, int] | None:
        return self.hooks.get(key)


def functional_of(model) -> Any:
    """The functional graph behind a Sequential or functional model; None for others."""
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if isinstance(model, Functional):
        return model
    return None


# Why a layer is opaque whose `call`, on KerasTensors, returns backend tensors: values made
# from its inputs' shapes only (and its weights), as a position embedding's are. Its step
# has no inputs, so no sum takes it for a branch of the tensor it was called on.
_CONSTANT = ("its output is made from its input's shape alone, not from its values "
             "(a constant for the model's input shape)")
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OPEN_LENGTH = 8  # the length an inlined layer is traced at where the model leaves it open


def flatten(model: keras.layers.Layer, input_shape: tuple | None = None,
            length: int | None = None) -> Graph:
    """The steps of a built model, nested models walked into and subclassed layers inlined.

    Cached per model until its structure changes (`_sweep.model_fingerprint`).
    A subclassed model is inlined like a subclassed layer, from the input
    shape it was built with, or else `input_shape` (Keras does not record it
    where a model was built by an eager call, as on JAX when a symbolic build
    fails). Sequence axes the model leaves open are traced at `length`
    (`_OPEN_LENGTH` by default): what depends on the length (a causal mask,
    an attention's average) is then that of sequences of this length. Raises
    a ValueError for a Sequential model that has never been built, or a
    subclassed model that cannot be traced.
    """
    from keras_goodinit import _sweep  # a cycle at import time otherwise

    # The shape matters only where the model itself does not say it (see `_subclassed`).
    shape_key = input_shape if functional_of(model) is None and not getattr(
        model, "_build_shapes_dict", None) else None
    length = _OPEN_LENGTH if length is None else int(length)
    key = (rules._VERSION, _sweep.model_fingerprint(model), shape_key, length)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    graph = _build(model, input_shape, length)
    _CACHE[model] = (key, graph)
    return graph


class _Builder:
    def __init__(self, length: int = _OPEN_LENGTH):
        self.length = length
        self.steps: list[Step] = []
        self.shapes: dict[int, tuple] = {}
        self.opaque: list[tuple[str, str, str]] = []
        self.containers: list[tuple[Any, list[int]]] = []  # inlined layer calls, in order
        self._next = 0
        self.tracked: set[int] = set()  # ids of the model's own layers

    def new_key(self, tensor) -> int:
        key = self._next
        self._next += 1
        self.shapes[key] = tuple(tensor.shape)
        return key

    def walk(self, nodes, env: dict, path: str, hookable: bool) -> None:
        """Adds the steps of `nodes` (in a valid order); `env` maps id(tensor) -> key."""
        for node in nodes:
            if not node.operation or node.is_input:
                continue
            tensors = node.arguments.keras_tensors
            if any(id(t) not in env for t in tensors):
                continue  # not computable from the inputs, as in Keras' own run
            keys = [env[id(t)] for t in tensors]
            for tensor, key in zip(node.outputs, self.call(node, keys, env, path, hookable)):
                env[id(tensor)] = key

    def call(self, node, keys, env, path, hookable) -> list[int]:
        op = node.operation
        inner = functional_of(op)
        if inner is not None:
            return self.functional(inner, keys, _join(path, op.name), hookable)
        if isinstance(op, keras.layers.Layer) and rules.rule_for(op) is None:
            outs, why = self.inline(op, node.arguments, len(node.outputs), keys,
                                    _join(path, op.name))
            if not why:
                if hookable or id(op) in self.tracked:  # runs as itself, even nested
                    self.containers.append((op, outs))
                return outs
            self.opaque.append((_join(path, op.name), type(op).__name__, why))
        else:
            why = ""
        outs = [self.new_key(t) for t in node.outputs]
        args, kwargs = _refs(node.arguments.args, env), _refs(node.arguments.kwargs, env)
        if why == _CONSTANT:  # no input: its output is not computed from theirs
            keys, args, kwargs = [], (), {}
        # A layer called inside an inlined `call` runs as itself only if the model tracks it
        # (one made inside `call` is a new object at every run).
        self.steps.append(Step(op, keys, outs, path, args, kwargs, why,
                               hookable or id(op) in self.tracked))
        return outs

    def functional(self, graph, in_keys, path, hookable) -> list[int]:
        env = {id(t): k for t, k in zip(keras.tree.flatten(graph.inputs), in_keys)}
        nodes = [node for depth in sorted(graph._nodes_by_depth, reverse=True)
                 for node in graph._nodes_by_depth[depth]]
        self.walk(nodes, env, path, hookable)
        return [env[id(t)] for t in keras.tree.flatten(graph.outputs)]

    def inline(self, layer, arguments, count, keys, path) -> tuple[list[int], str]:
        """Runs `layer.call` on fresh KerasTensors and walks the nodes it records.

        `arguments` holds the call's `args`, `kwargs` and `keras_tensors` (as a
        Keras node's); `count` is the number of outputs expected (None: any).
        """
        # Concrete sizes where the model leaves them open: code that builds tensors from
        # `ops.shape(x)` (masks, positions) cannot take None. A batch of 1; a sequence of
        # _OPEN_LENGTH, or of 1 where the layer does not accept that many.
        for length in (self.length, 1):
            fresh = {}
            for tensor in arguments.keras_tensors:
                shape = tuple(tensor.shape)
                shape = tuple(1 if i == 0 and d is None else length if d is None else d
                              for i, d in enumerate(shape))
                fresh.setdefault(id(tensor), keras.KerasTensor(shape, tensor.dtype))
            args = _substituted(arguments.args, fresh)
            kwargs = _substituted(arguments.kwargs, fresh)
            try:
                outputs = layer.call(*args, **kwargs)
                break
            except Exception as error:  # noqa: BLE001 - any failure means: not traceable
                failure = error
        else:
            return [], _untraceable(failure)
        flat = keras.tree.flatten(outputs)
        if flat and not any(isinstance(t, keras.KerasTensor) for t in flat) and all(
                keras.ops.is_tensor(t) for t in flat):
            return [], _CONSTANT  # made without the inputs' values: from shapes and weights
        if not flat or not all(isinstance(t, keras.KerasTensor) for t in flat):
            return [], "its call returns something other than tensors computed by Keras ops"
        inputs = {id(fresh[id(t)]): k for t, k in zip(arguments.keras_tensors, keys)}
        nodes, why = _recorded_nodes(flat, inputs)
        if why:
            return [], why
        inner_env = dict(inputs)
        self.walk(nodes, inner_env, path, hookable=False)
        if (count is not None and len(flat) != count) or any(
                id(t) not in inner_env for t in flat):
            return [], "its outputs are not all computed from its inputs"
        return [inner_env[id(t)] for t in flat], ""


def _build(model, input_shape, length: int = _OPEN_LENGTH) -> Graph:
    graph = functional_of(model)
    builder = _Builder(length)
    layers = list(model._flatten_layers(include_self=True, recursive=True))
    saved = [(layer, len(layer._inbound_nodes), len(layer._outbound_nodes)) for layer in layers]
    builder.tracked = {id(layer) for layer in layers}
    try:
        with _specs_from_call(layers):
            if graph is not None:
                inputs = [builder.new_key(t) for t in keras.tree.flatten(graph.inputs)]
                outputs = builder.functional(graph, inputs, "", True)
            else:
                inputs, outputs = _subclassed(model, builder, input_shape)
    finally:
        # Tracing calls the sublayers on KerasTensors, which records nodes on them: the
        # model must come out as it went in (`layer.output` and friends read those).
        for layer, inbound, outbound in saved:
            del layer._inbound_nodes[inbound:]
            del layer._outbound_nodes[outbound:]
    producer = {k: s for s in builder.steps for k in s.outputs}
    consumers: dict[int, list[Step]] = {}
    for step in builder.steps:
        for key in step.inputs:
            users = consumers.setdefault(key, [])
            if step not in users:
                users.append(step)
    return Graph(builder.steps, inputs, outputs, builder.shapes, producer, consumers,
                 _hooks(builder), builder.opaque, length)


@contextlib.contextmanager
def _specs_from_call(layers):
    """Lets a sublayer called while tracing take every argument its `call` takes.

    A layer called on KerasTensors gets its output spec from
    `compute_output_spec`; an override of it that takes fewer arguments than
    `call` (KerasHub's `CachedMultiHeadAttention` adds `cache` to
    `MultiHeadAttention.call`, not to its `compute_output_spec`) raises where
    the enclosing layer's code passes them. A functional build never meets
    this: it traces the enclosing layer on backend tensors. For such a layer,
    and for the time of the tracing only, a call whose arguments the override
    cannot take gets its spec from `call` itself: run on the KerasTensors, or
    where that fails, in a backend graph (Keras' default spec).
    """
    from keras.src.ops.operation import Operation

    patched = []
    for layer in layers:
        spec = type(layer).compute_output_spec
        if spec is Operation.compute_output_spec or spec is keras.layers.Layer.compute_output_spec:
            continue
        try:
            taken = inspect.signature(spec).parameters
            wanted = inspect.signature(type(layer).call).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind is p.VAR_KEYWORD for p in taken.values()) or set(wanted) <= set(taken):
            continue
        object.__setattr__(layer, "compute_output_spec", _spec_or_call(layer))
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            object.__delattr__(layer, "compute_output_spec")


def _spec_or_call(layer):
    from keras.src.ops.operation import Operation

    own = layer.compute_output_spec
    signature = inspect.signature(own)

    def compute_output_spec(*args, **kwargs):
        try:
            signature.bind(*args, **kwargs)
        except TypeError:
            pass
        else:
            return own(*args, **kwargs)
        # `call` on the KerasTensors themselves first: Keras only records it, where the
        # default spec traces it in a backend graph (0.14 s for a GPT-2 attention layer).
        try:
            outputs = layer.call(*args, **kwargs)
        except Exception:  # noqa: BLE001 - code that needs backend tensors
            outputs = None
        flat = keras.tree.flatten(outputs)
        if flat and all(isinstance(t, keras.KerasTensor) for t in flat):
            return keras.tree.map_structure(
                lambda t: keras.KerasTensor(t.shape, t.dtype, sparse=t.sparse), outputs)
        return Operation.compute_output_spec(layer, *args, **kwargs)

    return compute_output_spec


def _subclassed(model, builder, input_shape) -> tuple[list[int], list[int]]:
    if isinstance(model, keras.Sequential):
        raise ValueError(
            "Argument `model` must be built: this is a Sequential model that is not built "
            f"(call it once, or give it a `keras.Input`). Received: model={model!r}")
    shapes = getattr(model, "_build_shapes_dict", None) or {}
    if not shapes and input_shape is not None:
        shapes = {"input_shape": tuple(input_shape)}
    if not model.built or len(shapes) != 1:
        raise ValueError(
            "Argument `model` must be a built Sequential or functional model, or a subclassed "
            "model built on one input (its graph is traced from that input's shape, which "
            "Keras records at a symbolic build; where it did not, pass data); this is "
            f"{type(model).__name__}, built on {shapes or 'nothing'}. Received: model={model!r}")
    (shape,) = shapes.values()
    if not (isinstance(shape, (tuple, list)) and all(
            d is None or isinstance(d, int) for d in shape)):
        raise ValueError(
            "Argument `model` must be a subclassed model built on one input tensor to be "
            f"traced; {type(model).__name__} was built on {shape!r}. Received: model={model!r}")
    tensor = keras.KerasTensor((None, *tuple(shape)[1:]), "float32")
    arguments = types.SimpleNamespace(keras_tensors=[tensor], args=(tensor,), kwargs={})
    inputs = [builder.new_key(tensor)]
    outs, why = builder.inline(model, arguments, None, inputs, "")
    if why:
        raise ValueError(
            f"Argument `model` is a subclassed model whose `call` cannot be traced: {why}. "
            f"Received: model={model!r}")
    return inputs, outs


def _hooks(builder: _Builder) -> dict[int, tuple[Any, int, int]]:
    """Where each tensor can be read in a pass: the call that makes it at run time."""
    calls: dict[int, int] = {}
    hooks: dict[int, tuple[Any, int, int]] = {}
    made = [(s.layer, s.outputs) for s in builder.steps if s.hookable]
    for op, outputs in made + builder.containers:
        index = calls[id(op)] = calls.get(id(op), -1) + 1
        for position, key in enumerate(outputs):
            hooks.setdefault(key, (op, index, position))
    return hooks


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def _refs(structure, env):
    return keras.tree.map_structure(
        lambda v: Ref(env[id(v)]) if isinstance(v, keras.KerasTensor) and id(v) in env else v,
        structure)


def _substituted(structure, fresh):
    return keras.tree.map_structure(
        lambda v: fresh.get(id(v), v) if isinstance(v, keras.KerasTensor) else v, structure)


def _recorded_nodes(outputs, inputs: dict) -> tuple[list, str]:
    """The nodes between `inputs` (id -> key) and `outputs`, each after the ones it uses."""
    order, state = [], {}
    stack = [(t, False) for t in reversed(outputs)]
    while stack:
        tensor, expanded = stack.pop()
        if id(tensor) in inputs:
            continue
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            return [], "it uses a tensor that is not computed from its inputs"
        node = history.operation._inbound_nodes[history.node_index]
        if expanded:
            if state.get(id(node)) != "done":
                state[id(node)] = "done"
                order.append(node)
            continue
        if state.get(id(node)):
            continue
        state[id(node)] = "open"
        stack.append((tensor, True))
        stack.extend((t, False) for t in reversed(node.arguments.keras_tensors))
    return order, ""


def _untraceable(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return (f"its call could not be traced on symbolic tensors ({type(error).__name__}: "
            f"{first[:160]})")


def dependent(graph: Graph, step: Step) -> str:
    """Why `step`'s tensor inputs are not independent, or "" if they are taken to be.

    Two inputs are dependent where both reach one tensor through steps that
    are not kernels (`h + 0.5 * h`, `h * sigmoid(h)`): a kernel's random
    directions are what makes its output independent of what it shares with
    a skip, so a residual sum's skip and branch are independent.
    """
    if len(set(step.inputs)) < 2:
        return ""
    seen: dict[int, int] = {}
    for position, key in enumerate(dict.fromkeys(step.inputs)):
        stack = [key]
        while stack:
            key = stack.pop()
            owner = seen.setdefault(key, position)
            if owner != position:
                return (f"its inputs are not independent: they share "
                        f"{_tensor_name(graph, key)} with no kernel between")
            made_by = graph.producer.get(key)
            if made_by is not None and not is_kernel(made_by):
                stack.extend(k for k in made_by.inputs if seen.get(k) != position)
    return ""


def _tensor_name(graph: Graph, key: int) -> str:
    made_by = graph.producer.get(key)
    return "a model input" if made_by is None else f"the output of {made_by.name}"


def ancestors(graph: Graph) -> dict[int, frozenset]:
    found: dict[int, frozenset] = {k: frozenset((k,)) for k in graph.inputs}
    for step in graph.steps:
        above = frozenset().union(*(found.get(k, frozenset((k,))) for k in step.inputs))
        for key in step.outputs:
            found[key] = above | {key}
    return found


def context(graph: Graph, step: Step, training: bool = True) -> rules.Context:
    """What `step`'s rule sees: its arguments with each tensor as its input's index."""
    def as_input(value):
        return rules.Input(step.inputs.index(value.key)) if isinstance(value, Ref) else value

    return rules.Context(step.layer, keras.tree.map_structure(as_input, step.args),
                         keras.tree.map_structure(as_input, step.kwargs),
                         [graph.shapes[k] for k in step.inputs],
                         [graph.shapes[k] for k in step.outputs], training,
                         length=graph.length)


def is_kernel(step: Step) -> bool:
    return rules.is_kernel(step.layer)


def _family(step: Step) -> str:
    rule = step.rule
    return "opaque" if rule is None else rule.family


@dataclasses.dataclass
class Follower:
    """What a kernel layer's output meets: an activation, a sum, or nothing."""

    kind: str  # "activation", "add", "kernel", "output", "fork", "other"
    step: Step | None = None
    through: tuple[str, ...] = ()  # names of the steps looked through


def follower(graph: Graph, key: int) -> Follower:
    """The first step after `key` that its rule does not look through."""
    through = []
    while True:
        users = graph.consumers.get(key, [])
        if key in graph.outputs and not users:
            return Follower("output", None, tuple(through))
        if len(users) != 1 or key in graph.outputs:
            return Follower("fork", None, tuple(through))
        (step,) = users
        rule = step.rule
        if rule is not None and rule.family == "activation":
            return Follower("activation", step, tuple(through))
        if rule is not None and rule.terms(context(graph, step)) is not None:
            return Follower("add", step, tuple(through))
        if rule is not None and rule.family == "kernel":
            return Follower("kernel", step, tuple(through))
        if rule is not None and rule.look_through and len(step.inputs) == 1:
            through.append(step.layer.name)
            key = step.outputs[0]
            continue
        return Follower("other", step, tuple(through))


@dataclasses.dataclass(eq=False)
class Block:
    """A residual sum: `sum(skip, *branches)`, each branch weighted by its scale."""

    add: Step  # the sum (an `Add` layer or an add op)
    skip: int  # key of the skip input
    branches: list[int]  # keys of the branch inputs
    source: int  # key of the stream tensor the block starts from
    projection: Step | None  # the skip's kernel, if the skip is a projection
    branch_ends: list[Step | None]  # each branch's last kernel step
    scales: list[float]  # each branch's constant factor (1.0: none), its weight in the sum too
    gates: list[Step | None]  # each branch's gating product (`g * f(x)`), if any
    stage: int = 0
    num_blocks: int = 0
    reason: str = ""  # why a branch end cannot be scaled, if one cannot
    # Each branch's `ResidualGate` steps (`rules.ResidualGateRule`), nearest the sum first.
    residual_gates: list[list[Step]] = dataclasses.field(default_factory=list)

    @property
    def branch(self) -> int:
        return self.branches[0]

    @property
    def branch_end(self) -> Step | None:
        return self.branch_ends[0] if len(self.branch_ends) == 1 else None


def _chain(graph: Graph, key: int):
    """Yields (key, step that made it) back from `key` through single-input steps."""
    while True:
        step = graph.producer.get(key)
        yield key, step
        if step is None or len(set(step.inputs)) != 1 or len(step.outputs) != 1:
            return
        key = step.inputs[0]


def residual_blocks(graph: Graph) -> tuple[list[Block], list[tuple[Step, str]]]:
    """The residual sums of the graph with their stages; and the sums that are not.

    A sum (any step whose rule has `terms`: `Add`, `h + x`, `keras.ops.add`,
    `Subtract`, `Average`...) is a residual block if one input is an ancestor
    of all the others (identity skip), or, for two inputs, if both reach a
    common tensor through chains of single-input steps, the skip's chain
    holding at most one kernel (a projection) and fewer than the branch's.
    Each branch is walked back to its last kernel through single-input
    steps, collecting constant factors (`0.1 * f(x)`) and looking through a
    gate (`g * f(x)`, g a sigmoid-like output). Stages: see `_stages`.

    Returns:
        `(blocks, plain)`: `plain` lists `(sum step, why)` for the sums that
        are treated as plain sums.
    """
    above = ancestors(graph)
    blocks, plain = [], []
    for step in graph.steps:
        rule = step.rule
        if rule is None:
            continue
        weights = rule.terms(context(graph, step))
        if weights is None:
            continue
        block = _block(graph, step, weights, above)
        if isinstance(block, str):
            plain.append((step, block))
        else:
            blocks.append(block)
    _stages(graph, blocks)
    return blocks, plain


def _block(graph, step, weights, above):
    keys = step.inputs
    if len(set(keys)) != len(keys):
        return f"{step.name}: a sum with a repeated input: treated as a plain sum"
    projection = None
    skips = [k for k in keys if all(k in above[o] for o in keys if o != k)]
    if skips:
        skip = skips[0]
        source = skip
    elif len(keys) == 2:
        found = _projection(graph, keys, above)
        if isinstance(found, str):
            return f"{step.name}: {found}"
        skip, source, projection = found
    else:
        return (f"{step.name}: a sum of {len(keys)} inputs none of which is the skip of the "
                "others: treated as a plain sum")
    branches = [k for k in keys if k != skip]
    skip_weight = weights[keys.index(skip)]
    if skip_weight <= 0:
        return f"{step.name}: the skip enters with weight {skip_weight:g}: a plain sum"
    ends, scales, gates, reasons, residual_gates = [], [], [], [], []
    for branch in branches:
        found = []
        end, scale, gate, reason = _branch(graph, branch, above, skip, found)
        ends.append(end)
        scales.append(scale * weights[keys.index(branch)] / skip_weight)
        gates.append(gate)
        residual_gates.append(found)
        if reason:
            reasons.append(reason)
    return Block(step, skip, branches, source, projection, ends, scales, gates,
                 reason="; ".join(reasons), residual_gates=residual_gates)


def _projection(graph, keys, above):
    """(skip, source, projection step) of a two-input sum whose skip is not an ancestor."""
    paths = {}
    a, b = keys
    for mine, other in ((a, b), (b, a)):
        count, meet, last_kernel = 0, None, None
        for key, made_by in _chain(graph, mine):
            if key in above[other]:
                meet = key
                break
            if made_by is not None and is_kernel(made_by):
                count += 1
                last_kernel = made_by
        paths[mine] = (count, meet, last_kernel)
    (ca, ma, _), (cb, mb, _) = paths[a], paths[b]
    if ma is None or mb is None or ma != mb:
        return "a sum of two paths that do not start from one tensor: treated as a plain sum"
    if ca == cb:
        return (f"a sum of two paths with {ca} kernel layer(s) each: no skip to tell from the "
                "branch; treated as a plain sum")
    skip = a if ca < cb else b
    if paths[skip][0] > 1:
        return "a sum whose shorter path has several kernel layers: treated as a plain sum"
    return skip, ma, paths[skip][2] if paths[skip][0] == 1 else None


def _branch(graph, key, above, skip, residual_gates=None):
    """(last kernel step, constant factor, gate step, why no kernel) of a branch.

    The `ResidualGate` steps met on the way (their factor is their `alpha`)
    are appended to `residual_gates`, nearest the sum first.
    """
    scale, gate = 1.0, None
    while True:
        made_by = graph.producer.get(key)
        if made_by is None:
            return None, scale, gate, "the branch has no kernel layer"
        if is_kernel(made_by):
            if len(graph.consumers.get(made_by.outputs[0], [])) != 1:
                return None, scale, gate, "the branch's last kernel also feeds other steps"
            return made_by, scale, gate, ""
        rule = made_by.rule
        if rule is None:
            why = made_by.opaque or "it has no rule"
            return None, scale, gate, f"the branch passes {made_by.name} ({why})"
        if rule.family == "normalization":  # a kernel before it cannot set the branch's scale
            return None, scale, gate, (f"the branch ends in the normalization "
                                       f"{made_by.name}: its gain sets the branch's scale")
        if len(set(made_by.inputs)) == 1:
            if isinstance(rule, rules.ResidualGateRule) and residual_gates is not None:
                residual_gates.append(made_by)
            factor = rule.scale(context(graph, made_by))
            if factor is not None:
                scale *= factor
            key = made_by.inputs[0]
            continue
        if isinstance(rule, rules.ProductRule) and len(made_by.inputs) == 2 and gate is None:
            gated = [k for k in made_by.inputs if _is_gate(graph, k)]
            if len(gated) == 1:
                gate = made_by
                key = next(k for k in made_by.inputs if k not in gated)
                continue
        if rule.terms(context(graph, made_by)) is not None:
            return None, scale, gate, (f"the branch ends in the sum {made_by.name} (a nested "
                                       "residual: its own blocks are scaled)")
        return None, scale, gate, (f"the branch ends in {type(made_by.layer).__name__} "
                                   f"{made_by.name}, a merge, before any kernel")


_GATES = ("sigmoid", "hard_sigmoid", "sparse_sigmoid", "softmax", "hardsigmoid",
          "sparsesigmoid")


def _is_gate(graph, key) -> bool:
    """Whether `key` is a gate: the output of a sigmoid-like activation (values in [0, 1])."""
    for _, made_by in _chain(graph, key):
        if made_by is None or made_by.rule is None:
            return False
        if made_by.rule.family == "activation":
            spec, _ = made_by.rule.activation(made_by.layer)
            name = spec.name if spec is not None else type(made_by.layer).__name__.lower()
            return name.split("(")[0] in _GATES or (
                spec is not None and getattr(spec.fn, "__name__", "") in _GATES)
        if made_by.rule.family == "kernel":  # a fused activation decides
            inner = getattr(made_by.layer, "layer", made_by.layer)
            return getattr(getattr(inner, "activation", None), "__name__", "") in _GATES
    return False


def _stages(graph: Graph, blocks: list[Block]) -> None:
    """Groups blocks into stages: runs of blocks on one stream.

    A block continues the stage of the block whose sum its source comes from
    (through single-input steps that are not kernels: activations, pooling,
    reshapes, dropout, normalizations) unless its skip is a projection: a
    projection re-sets the stream, so it starts a stage. So a block whose
    identity skip is strided or pooled (ResNet50V2's last block of a stage)
    stays in the stage of the stream it consumes, and a stage ends where a
    kernel (a transition convolution) or a projection skip changes the stream.
    A normalization of the stream after each sum (post-LN transformers, BERT)
    does not: a branch end at `s / N` keeps the part of the stream that came
    through the skips at `(1 + 1/N)^-N > 1/e` of it over the stage, where a
    stage per block (N = 1) would halve it at every sum.
    """
    by_output = {b.add.outputs[0]: b for b in blocks}
    stage_of: dict[int, int] = {}
    counts: dict[int, int] = {}
    next_stage = 0
    for block in blocks:  # graph order: a predecessor comes first
        previous = None
        if block.projection is None:
            for key, made_by in _chain(graph, block.source):
                if key in by_output:
                    previous = by_output[key]
                    break
                if made_by is None or _family(made_by) in ("kernel", "opaque"):
                    break
        if previous is None or id(previous) not in stage_of:
            stage_of[id(block)] = next_stage
            next_stage += 1
        else:
            stage_of[id(block)] = stage_of[id(previous)]
        counts[stage_of[id(block)]] = counts.get(stage_of[id(block)], 0) + 1
    for block in blocks:
        block.stage = stage_of[id(block)]
        block.num_blocks = counts[block.stage]
