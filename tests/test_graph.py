"""The op-level graph (`keras_goodinit._graph`): steps, inlining, hooks, residual blocks.

Every test builds a small model symbolically (no weights are read, no data
runs), flattens it and checks the steps, their arguments and the residual
blocks found on them. The two keras.applications models are built once per
module: building them is the slow part, flattening them takes milliseconds.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers, ops  # noqa: E402

from keras_goodinit import _graph, _sweep  # noqa: E402
from keras_goodinit._graph import Ref  # noqa: E402

# Float64 algebra on Python constants (0.1, 1 / 4): exact up to one or two roundings.
EXACT = 1e-12


# --- helpers -------------------------------------------------------------------------------

def by_name(graph, name):
    found = [s for s in graph.steps if s.name == name]
    assert len(found) == 1, [s.name for s in graph.steps]
    return found[0]


def of_type(graph, cls):
    return [s for s in graph.steps if isinstance(s.layer, cls)]


def block_at(blocks, step):
    found = [b for b in blocks if b.add is step]
    assert len(found) == 1, [b.add.name for b in blocks]
    return found[0]


def the_block(model):
    """The one residual block of `model` (and no plain sums)."""
    blocks, plain = _graph.residual_blocks(_graph.flatten(model))
    assert len(blocks) == 1 and not plain, ([b.add.name for b in blocks], plain)
    return blocks[0]


def operations(model):
    """Every layer and every op of a model (the ops of functional graphs, nested ones too)."""
    found, seen = [], set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for op in [layer] + list(getattr(layer, "_operations", [])):
            if id(op) not in seen:
                seen.add(id(op))
                found.append(op)
    return found


def node_counts(model):
    return {id(op): (op.name, len(op._inbound_nodes), len(op._outbound_nodes))
            for op in operations(model)}


def output_of(layer):
    """`layer.output`, or the type of the error it raises (a layer never called symbolically)."""
    try:
        return layer.output
    except (AttributeError, ValueError) as error:
        return type(error)


def stem(width=8, name="stem"):
    x = keras.Input((width,))
    return x, layers.Dense(width, name=name)(x)


def branch(s, width=8, prefix="f"):
    h = layers.Dense(width, activation="relu", name=f"{prefix}1")(s)
    return layers.Dense(width, name=f"{prefix}2")(h)


class Residual(layers.Layer):
    """`x + d(scale * x)`, written in `call`: a user's residual block."""

    def __init__(self, width=8, **kwargs):
        super().__init__(**kwargs)
        self.d = layers.Dense(width, name="d")
        self.scaled = False

    def call(self, x):
        if self.scaled:
            return x + 0.5 * self.d(x)
        h = x * 0.5
        return x + self.d(h)


class Outer(layers.Layer):
    """A block holding another custom block: `x + e(inner(x))`."""

    def __init__(self, width=8, **kwargs):
        super().__init__(**kwargs)
        self.inner = Residual(width, name="inner")
        self.e = layers.Dense(width, name="e")

    def call(self, x):
        return x + self.e(self.inner(x))


class Net(keras.Model):
    """A subclassed model: a stem, two custom residual blocks and a head."""

    def __init__(self):
        super().__init__()
        self.a = layers.Dense(8, name="a")
        self.r1 = Residual(name="r1")
        self.r2 = Residual(name="r2")
        self.o = layers.Dense(2, name="o")

    def call(self, x):
        return self.o(self.r2(self.r1(self.a(x))))


class HostCode(layers.Layer):
    """Reads a tensor's value on the host: cannot run on symbolic tensors."""

    def call(self, x):
        return x * float(np.mean(ops.convert_to_numpy(x)))

    def compute_output_shape(self, shape):
        return shape


class DataDependent(layers.Layer):
    """Python control flow on a tensor's value: cannot run on symbolic tensors."""

    def call(self, x):
        if ops.mean(x) > 0:
            return x
        return -x

    def compute_output_shape(self, shape):
        return shape


def mha_model():
    """The crash reproducer of issue 18: an op node, then MultiHeadAttention, then Dense."""
    inp = keras.Input((8, 16))
    h = inp * 2.0
    h = layers.MultiHeadAttention(2, 8, name="mha")(h, h)
    return keras.Model(inp, layers.Dense(4, name="head")(h))


# --- op nodes are steps ---------------------------------------------------------------------

def test_op_nodes_are_steps_with_their_arguments():
    x = keras.Input((8,))
    h = layers.Dense(8, name="d")(x)
    doubled = x * 2.0
    summed = h + x
    added = ops.add(summed, h)
    joined = ops.concatenate([added, doubled], axis=-1)
    sliced = joined[:, :4]
    shaped = ops.reshape(sliced, (-1, 2, 2))
    turned = ops.transpose(shaped, (0, 2, 1))
    flipped = 3.0 - x
    halved = x / 2.0
    graph = _graph.flatten(keras.Model(x, [turned, flipped, halved]))
    inp = graph.inputs[0]
    d = by_name(graph, "d")
    key = {id(s.layer): s for s in graph.steps}

    def step_making(tensor):
        return key[id(tensor._keras_history.operation)]

    mul = step_making(doubled)
    assert type(mul.layer).__name__ == "Multiply"
    assert mul.inputs == [inp] and mul.args == (Ref(inp), 2.0)
    add = step_making(summed)
    assert type(add.layer).__name__ == "Add"
    assert add.inputs == [d.outputs[0], inp]
    assert add.args == (Ref(d.outputs[0]), Ref(inp))
    add2 = step_making(added)
    assert add2.inputs == [add.outputs[0], d.outputs[0]]
    cat = step_making(joined)
    assert type(cat.layer).__name__ == "Concatenate"
    assert cat.inputs == [add2.outputs[0], mul.outputs[0]]
    assert cat.args == ([Ref(add2.outputs[0]), Ref(mul.outputs[0])],)
    assert cat.layer.axis == -1
    get = step_making(sliced)
    assert type(get.layer).__name__ == "GetItem"
    assert get.inputs == cat.outputs
    assert get.args == (Ref(cat.outputs[0]), (slice(None), slice(None, 4)))
    reshape = step_making(shaped)
    assert reshape.inputs == get.outputs and reshape.layer.newshape == (-1, 2, 2)
    transpose = step_making(turned)
    assert transpose.inputs == reshape.outputs and tuple(transpose.layer.axes) == (0, 2, 1)
    sub = step_making(flipped)
    assert type(sub.layer).__name__ == "Subtract"
    assert sub.args == (3.0, Ref(inp))  # the constant keeps its side
    div = step_making(halved)
    assert div.args == (Ref(inp), 2.0)
    # Shapes and producers: every step's outputs are keyed and made once, in order.
    assert graph.shapes[get.outputs[0]] == (None, 4)
    assert graph.shapes[transpose.outputs[0]] == (None, 2, 2)
    assert graph.outputs == [transpose.outputs[0], sub.outputs[0], div.outputs[0]]
    made = set(graph.inputs)
    for step in graph.steps:
        assert set(step.inputs) <= made, step.name
        made |= set(step.outputs)
    assert all(graph.producer[k] is s for s in graph.steps for k in s.outputs)
    assert {id(c) for c in graph.consumers[inp]} == {id(d), id(mul), id(add), id(sub), id(div)}
    assert graph.consumers[d.outputs[0]] == [add, add2]
    assert not graph.opaque and not any(s.opaque for s in graph.steps)


def test_issue_crash_reproducer_inlines_multi_head_attention():
    graph = _graph.flatten(mha_model())
    names = [s.name for s in graph.steps]
    for part in ("query", "key", "value", "attention_output"):
        step = by_name(graph, f"mha/{part}")
        assert isinstance(step.layer, layers.EinsumDense), part
        assert _graph.is_kernel(step)
    assert "mha" not in names  # inlined, not one step
    mul = graph.steps[0]
    assert type(mul.layer).__name__ == "Multiply" and mul.args == (Ref(graph.inputs[0]), 2.0)
    # Query, key and value all read the doubled input; the head reads the attention output.
    for part in ("query", "key", "value"):
        assert by_name(graph, f"mha/{part}").inputs == mul.outputs
    assert by_name(graph, "head").inputs == by_name(graph, "mha/attention_output").outputs
    assert graph.outputs == by_name(graph, "head").outputs
    assert not graph.opaque


def test_subclassed_layers_are_inlined_recursively_with_their_sums():
    x = keras.Input((8,))
    model = keras.Model(x, Outer(name="outer")(x))
    graph = _graph.flatten(model)
    assert [s.name for s in graph.steps] == [
        "outer/inner/multiply", "outer/inner/d", f"outer/inner/{graph.steps[2].layer.name}",
        "outer/e", f"outer/{graph.steps[4].layer.name}"]
    inp = graph.inputs[0]
    mul, d, inner_add, e, outer_add = graph.steps
    assert mul.args == (Ref(inp), 0.5)
    assert inner_add.inputs == [inp, d.outputs[0]]
    assert outer_add.inputs == [inp, e.outputs[0]]
    blocks, plain = _graph.residual_blocks(graph)
    assert not plain
    inner, outer = block_at(blocks, inner_add), block_at(blocks, outer_add)
    assert inner.skip == inp and inner.branch_end is d and inner.scales == [1.0]
    assert outer.skip == inp and outer.branch_end is e


def test_nested_functional_models_get_path_names():
    i = keras.Input((8,))
    core = keras.Model(i, layers.Dense(8, name="d")(i), name="core")
    j = keras.Input((8,))
    middle = keras.Model(j, core(j) + j, name="middle")
    x = keras.Input((8,))
    model = keras.Model(x, layers.Dense(2, name="head")(middle(x)))
    graph = _graph.flatten(model)
    names = [s.name for s in graph.steps]
    assert names[0] == "middle/core/d" and names[-1] == "head"
    assert names[1].startswith("middle/") and type(graph.steps[1].layer).__name__ == "Add"
    # A residual around a whole sub-model: its branch ends inside the sub-model.
    block = the_block(model)
    assert block.skip == graph.inputs[0]
    assert block.branch_end is by_name(graph, "middle/core/d")


def test_subclassed_model_built_by_calling_it_flattens():
    net = Net()
    net(np.zeros((2, 8), "float32"))
    graph = _graph.flatten(net)
    names = [s.name for s in graph.steps]
    assert names[0] == "a" and names[-1] == "o"
    assert "r1/d" in names and "r2/d" in names
    assert graph.outputs == by_name(graph, "o").outputs
    blocks, plain = _graph.residual_blocks(graph)
    assert len(blocks) == 2 and not plain
    assert [b.branch_end.name for b in blocks] == ["r1/d", "r2/d"]
    assert blocks[0].skip == by_name(graph, "a").outputs[0]
    assert blocks[1].skip == blocks[0].add.outputs[0]


def test_unbuilt_models_raise_a_value_error():
    with pytest.raises(ValueError, match="model="):
        _graph.flatten(keras.Sequential([layers.Dense(4)]))
    with pytest.raises(ValueError, match="model="):
        _graph.flatten(Net())


@pytest.mark.parametrize("cls, why", [(HostCode, "NumPy"), (DataDependent, "boolean")])
def test_untraceable_layer_is_one_opaque_step(cls, why):
    x = keras.Input((8,))
    h = layers.Dense(8, name="before")(x)
    h = cls(name="odd")(h)
    model = keras.Model(x, layers.Dense(2, name="after")(h))
    graph = _graph.flatten(model)
    assert [s.name for s in graph.steps] == ["before", "odd", "after"]
    odd = by_name(graph, "odd")
    assert isinstance(odd.layer, cls) and odd.rule is None
    assert "could not be traced" in odd.opaque and why in odd.opaque
    assert graph.opaque == [("odd", cls.__name__, odd.opaque)]
    assert odd.inputs == by_name(graph, "before").outputs
    assert by_name(graph, "after").inputs == odd.outputs


def test_a_subclassed_model_that_cannot_be_traced_raises():
    class Odd(keras.Model):
        def call(self, x):  # runs eagerly; on symbolic tensors it has no value to read
            return x * float(np.mean(ops.convert_to_numpy(x)))

    model = Odd()
    model(np.ones((2, 4), "float32"))
    with pytest.raises(ValueError, match="cannot be traced.*NumPy.*Received: model="):
        _graph.flatten(model)


def test_an_untraceable_layer_inside_a_subclassed_model_is_opaque():
    class Holder(keras.Model):
        def __init__(self):
            super().__init__()
            self.odd = HostCode(name="odd")
            self.d = layers.Dense(4, name="d")

        def call(self, x):
            return self.d(self.odd(x))

    model = Holder()
    model(np.ones((2, 4), "float32"))
    # On JAX the symbolic build fails on `odd` and Keras builds by the eager call, which
    # records no input shape: then the caller gives it (mean_field_init: from `data`).
    graph = _graph.flatten(model, input_shape=(2, 4))
    assert [s.name for s in graph.steps] == ["odd", "d"]
    assert graph.opaque == [("odd", "HostCode", graph.steps[0].opaque)]
    assert "NumPy" in graph.steps[0].opaque


# --- the model is left as it was -------------------------------------------------------------

def test_flatten_leaves_the_model_unchanged():
    x = keras.Input((8, 16))
    h = x * 2.0
    h = layers.MultiHeadAttention(2, 8, name="mha")(h, h)
    h = layers.Reshape((128,))(h)
    h = Outer(128, name="outer")(h)
    model = keras.Model(x, layers.Dense(4, name="head")(h))
    before = node_counts(model)
    outer = model.get_layer("outer")
    mha = model.get_layer("mha")
    watched = [outer.inner.d, outer.e, mha._query_dense, model.get_layer("head")]
    outputs = [output_of(layer) for layer in watched]
    # Sublayers are never called on Keras tensors while the model is built: no output.
    assert outputs[:3] == [AttributeError] * 3 and isinstance(outputs[3], keras.KerasTensor)
    graph = _graph.flatten(model)
    assert by_name(graph, "outer/inner/d") and by_name(graph, "mha/query")
    assert node_counts(model) == before
    assert all(output_of(layer) is was for layer, was in zip(watched, outputs))


def test_flatten_of_a_subclassed_model_leaves_it_unchanged():
    net = Net()
    net(np.zeros((2, 8), "float32"))
    before = node_counts(net)
    _graph.flatten(net)
    assert node_counts(net) == before
    assert output_of(net.r1.d) is AttributeError


# --- cache -----------------------------------------------------------------------------------

def test_flatten_is_cached_until_the_structure_changes():
    x = keras.Input((8,))
    model = keras.Model(x, Residual(name="res")(x))
    first = _graph.flatten(model)
    assert _graph.flatten(model) is first
    fingerprint = _sweep.model_fingerprint(model)
    model.get_layer("res").scaled = True  # `call` now computes x + 0.5 * d(x)
    assert _sweep.model_fingerprint(model) != fingerprint
    second = _graph.flatten(model)
    assert second is not first
    assert _graph.flatten(model) is second
    assert [type(s.layer).__name__ for s in first.steps] == ["Multiply", "Dense", "Add"]
    assert [type(s.layer).__name__ for s in second.steps] == ["Dense", "Multiply", "Add"]
    assert the_block(model).scales == pytest.approx([0.5], rel=EXACT)


# --- hooks -----------------------------------------------------------------------------------

def test_hooks_for_functional_steps_and_sublayer_calls_only():
    graph = _graph.flatten(mha_model())
    mul = graph.steps[0]
    assert graph.hook(mul.outputs[0]) == (mul.layer, 0, 0)  # an op of the model itself
    head = by_name(graph, "head")
    assert graph.hook(head.outputs[0]) == (head.layer, 0, 0)
    for part in ("query", "key", "value", "attention_output"):
        step = by_name(graph, f"mha/{part}")
        assert step.hookable
        assert graph.hook(step.outputs[0]) == (step.layer, 0, 0), part
    # The attention op runs inside MultiHeadAttention's own code: nothing to hook at run time.
    (attention,) = [s for s in graph.steps if type(s.layer).__name__ == "DotProductAttention"]
    assert not attention.hookable
    assert graph.hook(attention.outputs[0]) is None


def test_hooks_inside_an_inlined_layer():
    x = keras.Input((8,))
    block = Residual(name="res")
    model = keras.Model(x, block(x))
    graph = _graph.flatten(model)
    mul, d, add = graph.steps
    assert not mul.hookable and graph.hook(mul.outputs[0]) is None  # `x * 0.5` in call
    assert graph.hook(d.outputs[0]) == (block.d, 0, 0)
    # The block's output is the inlined layer's own output: hooked on the block's call.
    assert graph.hook(add.outputs[0]) == (block, 0, 0)


def test_shared_layer_hooks_count_its_calls():
    x = keras.Input((8,))
    shared = layers.Dense(8, name="shared")
    model = keras.Model(x, shared(shared(x)))
    graph = _graph.flatten(model)
    first, second = graph.steps
    assert graph.hook(first.outputs[0]) == (shared, 0, 0)
    assert graph.hook(second.outputs[0]) == (shared, 1, 0)


def test_hooks_for_custom_blocks_inside_a_subclassed_model():
    # r1 and r2 are sublayers called by the (inlined) model's `call`: they run as themselves
    # when the model runs, so their outputs, the residual sums, can be hooked there.
    net = Net()
    net(np.zeros((2, 8), "float32"))
    graph = _graph.flatten(net)
    blocks, _ = _graph.residual_blocks(graph)
    assert graph.hook(blocks[0].add.outputs[0]) == (net.r1, 0, 0)
    assert graph.hook(blocks[1].add.outputs[0]) == (net.r2, 0, 0)


def test_hooks_for_a_custom_block_inside_a_custom_block():
    x = keras.Input((8,))
    outer = Outer(name="outer")
    graph = _graph.flatten(keras.Model(x, outer(x)))
    inner_add = graph.steps[2]
    assert graph.hook(inner_add.outputs[0]) == (outer.inner, 0, 0)
    assert graph.hook(graph.steps[-1].outputs[0]) == (outer, 0, 0)


class MakesItsAdd(layers.Layer):
    """`x + d(x)` through an `Add` layer made inside `call`: a new object at every run."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d = layers.Dense(8, name="d")

    def call(self, x):
        return layers.Add(name="made_in_call")([x, self.d(x)])


def test_hooks_name_only_what_runs_when_the_model_runs():
    x = keras.Input((8,))
    block = MakesItsAdd(name="block")
    model = keras.Model(x, block(x))
    graph = _graph.flatten(model)
    d, add = graph.steps
    assert add.name == "block/made_in_call"
    assert graph.hook(d.outputs[0]) == (block.d, 0, 0)
    # The Add that tracing made never runs again; the block's own call makes this tensor.
    assert graph.hook(add.outputs[0]) == (block, 0, 0)
    runs = {id(op) for op in operations(model)}
    assert all(id(op) in runs for op, _, _ in graph.hooks.values())


def test_two_attention_layers_give_distinct_path_names():
    x = keras.Input((4, 8))
    h = layers.MultiHeadAttention(2, 4, name="m1")(x, x)
    h = layers.MultiHeadAttention(2, 4, name="m2")(h, h)
    graph = _graph.flatten(keras.Model(x, h))
    names = [s.name for s in graph.steps]
    assert len(set(names)) == len(names)
    assert {"m1/query", "m2/query", "m1/attention_output", "m2/attention_output"} <= set(names)
    assert by_name(graph, "m2/query").inputs == by_name(graph, "m1/attention_output").outputs


def test_sequential_with_a_custom_block():
    model = keras.Sequential([keras.Input((8,)), layers.Dense(8, name="a"),
                              Residual(name="res"), layers.Dense(2, name="o")])
    graph = _graph.flatten(model)
    assert [s.name for s in graph.steps][:3] == ["a", "res/multiply", "res/d"]
    assert graph.steps[-1].name == "o"
    block = the_block(model)
    assert block.skip == by_name(graph, "a").outputs[0]
    assert block.branch_end is by_name(graph, "res/d")


def test_follower_looks_through_dropout_and_reshapes():
    x = keras.Input((8,))
    h = layers.Dense(8, name="k")(x)
    h = layers.Dropout(0.1, name="drop")(h)
    h = ops.relu(layers.Reshape((8,), name="shape")(h))
    j = layers.Dense(8, name="k2")(h)
    graph = _graph.flatten(keras.Model(x, [j + h, layers.Dense(2, name="k3")(j)]))
    found = _graph.follower(graph, by_name(graph, "k").outputs[0])
    assert found.kind == "activation" and type(found.step.layer).__name__ == "Relu"
    assert found.through == ("drop", "shape")
    assert _graph.follower(graph, by_name(graph, "k2").outputs[0]).kind == "fork"
    last = _graph.follower(graph, by_name(graph, "k3").outputs[0])
    assert last.kind == "output" and last.step is None


# --- residual blocks -------------------------------------------------------------------------

@pytest.mark.parametrize("write", [
    lambda s, f: s + f,
    lambda s, f: f + s,
    lambda s, f: ops.add(s, f),
    lambda s, f: layers.Add()([s, f]),
], ids=["plus", "plus_reversed", "ops_add", "layers_Add"])
def test_identity_skip(write):
    x, s = stem()
    model = keras.Model(x, write(s, branch(s)))
    graph = _graph.flatten(model)
    block = the_block(model)
    assert block.skip == by_name(graph, "stem").outputs[0] == block.source
    assert block.branches == by_name(graph, "f2").outputs
    assert block.branch_end is by_name(graph, "f2")
    assert block.projection is None and block.gates == [None] and block.scales == [1.0]
    assert block.reason == "" and (block.stage, block.num_blocks) == (0, 1)


def test_projection_skip():
    x, s = stem()
    projected = layers.Dense(16, name="proj")(s)
    model = keras.Model(x, projected + branch(s, 16))
    graph = _graph.flatten(model)
    block = the_block(model)
    assert block.projection is by_name(graph, "proj")
    assert block.skip == by_name(graph, "proj").outputs[0]
    assert block.source == by_name(graph, "stem").outputs[0]
    assert block.branch_end is by_name(graph, "f2")


@pytest.mark.parametrize("write, scale", [
    (lambda s, f: s + 0.1 * f, 0.1),
    (lambda s, f: s + f * 0.1, 0.1),
    (lambda s, f: s + f / 4.0, 0.25),
    (lambda s, f: s - f, -1.0),
    (lambda s, f: layers.Average()([s, f]), 1.0),
], ids=["times", "times_right", "divided", "minus", "average"])
def test_constant_factor_on_the_branch(write, scale):
    x, s = stem()
    model = keras.Model(x, write(s, branch(s)))
    block = the_block(model)
    assert block.scales == pytest.approx([scale], rel=EXACT)
    assert block.branch_end is not None and block.branch_end.layer.name == "f2"


@pytest.mark.parametrize("gate", [
    lambda s: ops.sigmoid(layers.Dense(8, name="g")(s)),
    lambda s: layers.Activation("sigmoid")(layers.Dense(8, name="g")(s)),
    lambda s: layers.Dense(8, activation="sigmoid", name="g")(s),
], ids=["ops_sigmoid", "activation_layer", "fused"])
def test_gated_branch(gate):
    x, s = stem()
    model = keras.Model(x, s + gate(s) * branch(s))
    graph = _graph.flatten(model)
    block = the_block(model)
    (product,) = [st for st in graph.steps if type(st.layer).__name__ == "Multiply"]
    assert block.gates == [product]
    assert block.branch_end is by_name(graph, "f2")  # the f kernel, not the gate's
    assert block.skip == by_name(graph, "stem").outputs[0]


def test_three_input_sum_has_two_branches():
    x, s = stem()
    f, g = branch(s, prefix="f"), branch(s, prefix="g")
    model = keras.Model(x, layers.Add(name="sum3")([s, f, g]))
    graph = _graph.flatten(model)
    block = the_block(model)
    assert block.skip == by_name(graph, "stem").outputs[0]
    assert block.branches == [by_name(graph, "f2").outputs[0], by_name(graph, "g2").outputs[0]]
    assert block.branch_ends == [by_name(graph, "f2"), by_name(graph, "g2")]
    assert block.branch_end is None  # several branches: no single end
    assert block.scales == [1.0, 1.0] and block.gates == [None, None]


def test_nested_residual():
    x, s = stem()
    a = layers.Dense(8, name="a")(s)
    inner = a + branch(a)
    model = keras.Model(x, s + inner)
    graph = _graph.flatten(model)
    blocks, plain = _graph.residual_blocks(graph)
    assert len(blocks) == 2 and not plain
    inner_block = [b for b in blocks if b.skip == by_name(graph, "a").outputs[0]][0]
    outer_block = [b for b in blocks if b is not inner_block][0]
    assert inner_block.branch_end is by_name(graph, "f2")
    assert outer_block.skip == by_name(graph, "stem").outputs[0]
    assert outer_block.branch_end is None
    assert inner_block.add.name in outer_block.reason and "nested" in outer_block.reason


def test_two_kernels_from_one_tensor_are_a_plain_sum():
    x, s = stem()
    model = keras.Model(x, layers.Dense(8)(s) + layers.Dense(8)(s))
    blocks, plain = _graph.residual_blocks(_graph.flatten(model))
    assert not blocks and len(plain) == 1 and "no skip" in plain[0][1]


def small_resnet(blocks_per_stage=3):
    """A 2-stage ResNet without normalization, residuals written with `+`."""
    x = keras.Input((16, 16, 3))
    h = layers.Conv2D(8, 3, padding="same", name="stem")(x)
    for stage, width in enumerate((8, 16)):
        for index in range(blocks_per_stage):
            strides = 2 if stage and not index else 1
            f = layers.Activation("relu")(h)
            f = layers.Conv2D(width, 3, strides, padding="same")(f)
            f = layers.Activation("relu")(f)
            f = layers.Conv2D(width, 3, padding="same")(f)
            skip = h
            if strides != 1 or h.shape[-1] != width:
                skip = layers.Conv2D(width, 1, strides, name=f"proj{stage}")(h)
            h = skip + f
    h = layers.GlobalAveragePooling2D()(layers.Activation("relu")(h))
    return keras.Model(x, layers.Dense(10)(h))


def test_stages_of_a_two_stage_resnet():
    graph = _graph.flatten(small_resnet(3))
    blocks, plain = _graph.residual_blocks(graph)
    assert not plain
    assert [(b.stage, b.num_blocks) for b in blocks] == [(0, 3)] * 3 + [(1, 3)] * 3
    assert [b.projection is not None for b in blocks] == [False] * 3 + [True] + [False] * 2
    assert blocks[3].projection is by_name(graph, "proj1")
    assert all(b.branch_end is not None and b.scales == [1.0] for b in blocks)


# --- keras.applications ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet50v2():
    return keras.applications.ResNet50V2(weights=None, input_shape=(32, 32, 3), classes=10)


@pytest.fixture(scope="module")
def convnext_tiny():
    return keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3), classes=10,
                                           include_preprocessing=False)


def stage_sizes(blocks):
    """Blocks per stage, in order; each block's `num_blocks` must be its stage's size."""
    stages = [b.stage for b in blocks]
    assert stages == sorted(stages)  # a stage is one run of consecutive blocks
    sizes = {s: stages.count(s) for s in stages}
    assert all(b.num_blocks == sizes[b.stage] for b in blocks)
    return [sizes[s] for s in sorted(sizes)]


def test_resnet50v2_stages(resnet50v2):
    graph = _graph.flatten(resnet50v2)
    blocks, plain = _graph.residual_blocks(graph)
    assert len(blocks) == 16 and not plain and not graph.opaque
    assert stage_sizes(blocks) == [3, 4, 6, 3]
    # A projection opens each stage; the strided identity block that ends it stays in it.
    assert [b.projection is not None for b in blocks] == (
        [True, False, False] + [True] + [False] * 3 + [True] + [False] * 5 + [True, False, False])
    for block in blocks:
        assert block.branch_end is not None and block.branch_end.name.endswith("_3_conv")


def test_convnext_tiny_stages(convnext_tiny):
    graph = _graph.flatten(convnext_tiny)
    blocks, plain = _graph.residual_blocks(graph)
    assert len(blocks) == 18 and not plain and not graph.opaque
    assert stage_sizes(blocks) == [3, 3, 9, 3]
    for block in blocks:
        assert block.projection is None
        assert block.branch_end.name.endswith("_pointwise_conv_2")
        # The LayerScale's gamma, 1e-6 stored in float32: relative rounding 2^-24.
        assert block.scales == pytest.approx([1e-6], rel=2.0**-24)
