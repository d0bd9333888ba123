"""The rules registry (`keras_goodinit.rules`): lookup, registration, and each family's moments.

Each `propagate` is checked against moments worked out by hand for the
layer or op it stands for. The inputs are `Signal`s of float64 arrays and
the expected values are closed forms, so the only differences are float64
roundings of a few operations: `EXACT` below. Where a check runs a real
Keras layer (float32) instead, its tolerance says so.
"""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _rounding import magnitude, reordered  # noqa: E402
from keras import layers, ops  # noqa: E402
from keras.src.ops import nn as knn  # noqa: E402
from keras.src.ops import numpy as knp  # noqa: E402

from keras_goodinit import WeightNormalization, _graph, lsuv_init, rules  # noqa: E402
from keras_goodinit.rules import Context, Input, LayerRule, Signal  # noqa: E402

# A handful of float64 operations on values of order 1: a few ulps (2.2e-16 each) apart.
EXACT = 1e-12


@pytest.fixture(autouse=True)
def _registry():
    """Every test leaves the registry as it found it."""
    saved = dict(rules._RULES)
    yield
    rules._RULES.clear()
    rules._RULES.update(saved)


def signal(power, mean):
    return Signal(np.asarray(power, float), np.asarray(mean, float))


def propagate(layer, args, ins, in_shapes, out_shapes, training=True, kwargs=None):
    ctx = Context(layer, tuple(args), kwargs or {}, list(in_shapes), list(out_shapes), training)
    (out,) = rules.rule_for(layer).propagate(ctx, ins)
    return out


def assert_signal(out, power, mean, rel=EXACT, abs=0.0):
    assert not out.unknown, out.unknown
    np.testing.assert_allclose(out.power, power, rtol=rel, atol=abs)
    np.testing.assert_allclose(out.mean, mean, rtol=rel, atol=abs)
    assert np.shape(out.power) == np.shape(power)


class Block(layers.Layer):
    """A user's residual block: `x + d(x)`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d = layers.Dense(8, name="d")

    def call(self, x):
        return x + self.d(x)


class Tripler(LayerRule):
    """A user's rule: the block triples the second moment and keeps the mean."""

    family = "other"

    def propagate(self, ctx, ins):
        return [Signal(3.0 * ins[0].power, ins[0].mean)]


# --- lookup and registration -------------------------------------------------------------------

def test_rule_for_takes_the_nearest_registered_base_class():
    class MyDense(layers.Dense):
        pass

    class Base(layers.Layer):
        pass

    class Child(Base):
        pass

    class GrandChild(Child):
        pass

    assert rules.rule_for(MyDense(4)) is rules.rule_for(layers.Dense(4))
    assert rules.rule_for(MyDense(4)).family == "kernel"
    assert rules.rule_for(GrandChild()) is None  # no rule anywhere up its classes
    base_rule, child_rule = Tripler(), Tripler()
    assert rules.register_layer_rule(Base, base_rule) is base_rule
    assert rules.rule_for(GrandChild()) is base_rule
    rules.register_layer_rule(Child, child_rule)
    assert rules.rule_for(Base()) is base_rule
    assert rules.rule_for(Child()) is child_rule
    assert rules.rule_for(GrandChild()) is child_rule
    # A user's rule for a subclass of a built-in layer wins over the built-in's.
    rules.register_layer_rule(MyDense, child_rule)
    assert rules.rule_for(MyDense(4)) is child_rule
    assert rules.rule_for(layers.Dense(4)).family == "kernel"
    assert rules.rule_for(keras.layers.Layer()) is None


def test_layers_and_ops_share_a_family_rule():
    assert rules.rule_for(layers.Add()) is rules.rule_for(knp.Add())
    assert isinstance(rules.rule_for(knp.Add()), rules.SumRule)
    assert isinstance(rules.rule_for(knp.Multiply()), rules.ProductRule)
    assert isinstance(rules.rule_for(knn.Relu()), rules.ActivationRule)
    assert rules.rule_for(layers.Dropout(0.5)).look_through
    assert rules.is_kernel(layers.Conv2D(4, 3)) and not rules.is_kernel(layers.ReLU())


@pytest.mark.parametrize("cls, shown", [
    ("Dense", "cls='Dense'"),
    (layers.Dense(4), "cls=<Dense"),
    (int, "cls=<class 'int'>"),
    (keras.layers.Layer, "cls=<class 'keras.src.layers.layer.Layer'>"),
    (keras.Model, "cls=<class 'keras.src.models.model.Model'>"),
])
def test_register_layer_rule_rejects_a_bad_cls(cls, shown):
    before = dict(rules._RULES)
    with pytest.raises(ValueError, match="Argument `cls`") as info:
        rules.register_layer_rule(cls, Tripler())
    assert f"Received: {shown}" in str(info.value)
    assert rules._RULES == before


@pytest.mark.parametrize("rule, shown", [
    (lambda ctx, ins: ins, "rule=<function"),
    (Tripler, "rule=<class"),
    (None, "rule=None"),
])
def test_register_layer_rule_rejects_a_bad_rule(rule, shown):
    before = dict(rules._RULES)
    with pytest.raises(ValueError, match="Argument `rule`") as info:
        rules.register_layer_rule(Block, rule)
    assert f"Received: {shown}" in str(info.value)
    assert rules._RULES == before


def block_model():
    x = keras.Input((8,))
    return keras.Model(x, layers.Dense(2, name="head")(Block(name="block")(x)))


def test_a_user_rule_makes_its_layer_one_step():
    inlined = _graph.flatten(block_model())
    names = [s.name for s in inlined.steps]
    assert names == ["block/d", f"block/{inlined.steps[1].layer.name}", "head"]
    rule = rules.register_layer_rule(Block, Tripler())
    graph = _graph.flatten(block_model())
    assert [s.name for s in graph.steps] == ["block", "head"]
    step = graph.steps[0]
    assert isinstance(step.layer, Block) and step.rule is rule
    assert not step.opaque and not graph.opaque
    assert not _graph.residual_blocks(graph)[0]  # its sum is inside the rule now
    # What a mean-field pass reads for the step: its context and the rule's propagation.
    ctx = _graph.context(graph, step, training=False)
    assert ctx.layer is step.layer and ctx.args == (Input(0),)
    assert ctx.in_shapes == [(None, 8)] and ctx.out_shapes == [(None, 8)] and not ctx.training
    (out,) = step.rule.propagate(ctx, [signal(2.0, 0.5)])
    assert_signal(out, 6.0, 0.5)


def test_a_rule_registered_after_flatten_is_seen():
    # `flatten` caches its graph per model; a new rule changes which layers are inlined.
    model = block_model()
    assert len(_graph.flatten(model).steps) == 3  # block/d, block/add, head
    rules.register_layer_rule(Block, Tripler())
    assert [s.name for s in _graph.flatten(model).steps] == ["block", "head"]


class Mixer(layers.Layer):
    """A user's kernel layer, `x A B + b`: scaling `B` (`mix`) scales its output."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units, self.activation = units, keras.activations.linear

    def build(self, input_shape):
        normal = keras.initializers.RandomNormal
        self.kernel = self.add_weight((input_shape[-1], self.units), normal(stddev=1.0, seed=1),
                                     name="kernel")
        # Output variance about 16 * 8 * 9: far from the target, so LSUV must rescale.
        self.mix = self.add_weight((self.units, self.units), normal(stddev=3.0, seed=2),
                                   name="mix")
        self.bias = self.add_weight((self.units,), "zeros", name="bias")

    def compute_output_shape(self, input_shape):  # for WeightNormalization
        return (*input_shape[:-1], self.units)

    def call(self, x):
        return self.activation(ops.matmul(ops.matmul(x, self.kernel), self.mix) + self.bias)


class MixerRule(rules.KernelRule):
    def direction_variable(self, layer):
        return layer.mix


def test_lsuv_scales_the_variable_a_user_kernel_rule_names():
    rules.register_layer_rule(Mixer, MixerRule())
    x = keras.Input((16,))
    model = keras.Model(x, Mixer(8, name="mixer")(x))
    layer = model.get_layer("mixer")
    kernel = ops.convert_to_numpy(layer.kernel)
    mix = ops.convert_to_numpy(layer.mix).astype("float64")
    batch = np.random.default_rng(0).normal(size=(256, 16)).astype("float32")
    report = lsuv_init(model, batch, pre_init=None, verbose=0)
    (row,) = report.rows
    # Measured on the batch by a second pass (a user's layer), within lsuv_init's tol.
    assert row.status == "ok" and abs(row.var_after - 1.0) <= 0.1, row
    # The default rule would have scaled `kernel`: it is as built, bit for bit.
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.kernel), kernel)
    after = ops.convert_to_numpy(layer.mix).astype("float64")
    c = float(np.sum(after * mix) / np.sum(mix * mix))
    assert c < 0.5, c
    # `mix` times one factor: a float32 rounding per rescale (max_iter=10) and one for c.
    np.testing.assert_allclose(after, c * mix, rtol=0, atol=reordered(11) * magnitude(after))


def test_weight_normalization_of_a_user_kernel_layer_normalizes_its_kernel():
    # Mixer's rule rescales `mix`; the wrapper normalizes `v` (Mixer's `kernel`), and g
    # scales the output through `v`: the sweep's direction variable under it is `v`.
    rules.register_layer_rule(Mixer, MixerRule())
    x = keras.Input((16,))
    wrapped = WeightNormalization(Mixer(8, name="mixer"))
    model = keras.Model(x, wrapped(x))
    assert rules.rule_for(wrapped).direction_variable(wrapped) is wrapped.layer.kernel
    kernel = ops.convert_to_numpy(wrapped.layer.kernel)
    mix = ops.convert_to_numpy(wrapped.layer.mix)
    batch = np.random.default_rng(0).normal(size=(256, 16)).astype("float32")
    (row,) = lsuv_init(model, batch, pre_init="orthogonal", seed=0, verbose=0).rows
    assert row.status == "ok", row
    np.testing.assert_array_equal(ops.convert_to_numpy(wrapped.layer.mix), mix)
    v = ops.convert_to_numpy(wrapped.layer.kernel).astype("float64")
    assert not np.array_equal(v, kernel)
    norms = np.linalg.norm(v, axis=0)
    # The pre-init drew v orthonormal (unit columns) and set g = ||v|| per unit (float32: a
    # sum of 16 squares and a square root), then LSUV multiplied g by one factor per rescale
    # (max_iter=10): g / ||v|| is one number to those roundings. Had the pre-init drawn
    # `mix`, g would be ||mix|| = 1 over the kernel's columns as built, ~10% apart.
    ratio = ops.convert_to_numpy(wrapped.g).astype("float64").reshape(-1) / norms
    np.testing.assert_allclose(ratio, ratio[0], rtol=reordered(1, n=16) + reordered(11),
                               atol=0)
    np.testing.assert_allclose(v.T @ v, np.eye(8), rtol=0, atol=reordered(2, n=16))


class PointwiseSeparable(layers.SeparableConv2D):
    """A user's subclass of a Keras layer whose rule subclasses the built-in rule."""


def test_a_plain_kernel_rule_for_a_layer_without_kernel_names_the_layer():
    rules.register_layer_rule(PointwiseSeparable, rules.KernelRule("default", "conv"))
    x = keras.Input((8, 8, 3))
    model = keras.Model(x, PointwiseSeparable(4, 3, name="sep")(x))
    batch = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype("float32")
    with pytest.raises(ValueError, match=r"'sep' \(PointwiseSeparable\) has no `kernel`.*"
                       r"override the rule's `direction_variable`"):
        lsuv_init(model, batch, verbose=0)


class PerTokenEinsum(layers.EinsumDense):
    """A user's subclass of EinsumDense, whose bias varies over two output axes."""


@pytest.mark.parametrize("rule, error", [
    (rules.KernelRule(), r"'e' \(PerTokenEinsum\) has a bias of shape \(2, 3\), not one "
                         r"value per channel: override its rule's \(KernelRule\) "
                         r"`bias_cell_axes`"),
    (type("PerTokenEinsumRule", (rules.EinsumDenseRule,), {})(), None),
])
def test_an_einsum_subclass_needs_the_einsum_rules_bias_cells(rule, error):
    rules.register_layer_rule(PerTokenEinsum, rule)
    x = keras.Input((5, 6))
    model = keras.Model(x, PerTokenEinsum("abc,cde->abde", (5, 2, 3), bias_axes="de",
                                          name="e")(x))
    batch = np.random.default_rng(0).normal(size=(16, 5, 6)).astype("float32")
    if error is not None:
        with pytest.raises(ValueError, match=error):
            lsuv_init(model, batch, seed=0, verbose=0)
        return
    (row,) = lsuv_init(model, batch, seed=0, verbose=0).rows
    assert row.status == "ok" and abs(row.var_after - 1.0) <= 0.1, row


def test_a_subclass_of_the_separable_rule_sweeps_a_separable_subclass():
    class PointwiseSeparableRule(rules.SeparableConvRule):
        pass

    rules.register_layer_rule(PointwiseSeparable, PointwiseSeparableRule())
    x = keras.Input((8, 8, 3))
    # Output variance about (3 * 3 taps) * 9 * 3: far from the target, so LSUV must rescale.
    layer = PointwiseSeparable(4, 3, padding="same", name="sep",
                               depthwise_initializer=keras.initializers.RandomNormal(
                                   stddev=1.0, seed=1),
                               pointwise_initializer=keras.initializers.RandomNormal(
                                   stddev=3.0, seed=2))
    model = keras.Model(x, layer(x))
    depthwise = ops.convert_to_numpy(layer.depthwise_kernel)
    pointwise = ops.convert_to_numpy(layer.pointwise_kernel).astype("float64")
    batch = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype("float32")
    (row,) = lsuv_init(model, batch, pre_init=None, verbose=0).rows
    assert row.status == "ok" and abs(row.var_after - 1.0) <= 0.1, row
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.depthwise_kernel), depthwise)
    after = ops.convert_to_numpy(layer.pointwise_kernel).astype("float64")
    c = float(np.sum(after * pointwise) / np.sum(pointwise * pointwise))
    assert c < 0.5, c
    # The pointwise kernel times one factor: a float32 rounding per rescale and one for c.
    np.testing.assert_allclose(after, c * pointwise, rtol=0,
                               atol=reordered(11) * magnitude(after))


def test_a_recurrent_cell_called_on_its_own_is_one_step_without_moments():
    from keras.src.layers.rnn.conv_lstm import ConvLSTMCell

    cell = layers.GRUCell(4)
    with pytest.raises(NotImplementedError, match="GRUCell: a recurrent cell called on its "
                       "own, not by its RNN layer: no moment rule for one step"):
        rules.rule_for(cell).propagate(Context(cell), [])
    # ConvLSTM's cell has the other cells' rule: its build draws as LSTMCell's does.
    conv = ConvLSTMCell(2, filters=3, kernel_size=3)
    conv.build((None, 6, 6, 2))
    rule = rules.rule_for(conv)
    assert rule is rules.rule_for(cell)
    assert rule.build_initializer(conv, conv.kernel) is conv.kernel_initializer
    assert rule.build_initializer(conv, conv.recurrent_kernel) is conv.recurrent_initializer
    assert rule.build_initializer(conv, conv.bias) is None  # unit_forget_bias: a local function
    assert rules.unscalable_reason(conv).startswith("recurrent cell")


def test_kernel_rules_say_what_the_kernel_layout_does_not():
    x = keras.Input((6, 5, 3))
    separable = layers.SeparableConv2D(4, 3, depth_multiplier=2)
    einsum = layers.EinsumDense("abcd,de->abce", (6, 5, 4))
    dense = layers.Dense(4)
    keras.Model(x, [separable(x), einsum(x), dense(x)])
    rule = rules.rule_for(separable)
    assert rule.direction_variable(separable) is separable.pointwise_kernel
    assert rule.depthwise_variable(separable) is separable.depthwise_kernel
    assert rules.rule_for(einsum).fan_axes(einsum, 2) == ([0], [1])
    assert rules.rule_for(dense).fan_axes(dense, 2) is None
    assert rules.rule_for(dense).depthwise_variable(dense) is None
    wrapped = WeightNormalization(layers.Dense(4))
    assert rules.rule_for(wrapped).weight_norm_refusal(wrapped) == "already weight-normalized"


@pytest.mark.parametrize("layer, expected", [
    (layers.Dense(4), True),
    (WeightNormalization(layers.Dense(4)), True),
    (layers.EinsumDense("abc,cd->abd", (None, 4)), True),  # each position on its own
    (layers.EinsumDense("abc,bd->acd", (None, 4)), False),  # contracts the positions
    (layers.Conv1D(4, 3), False),
    (layers.ReLU(), False),
])
def test_per_position_is_the_rules(layer, expected):
    assert rules.per_position(layer) is expected


def test_a_user_rule_says_its_layer_is_per_position():
    rules.register_layer_rule(Mixer, MixerRule())
    assert not rules.per_position(Mixer(4))

    class PositionwiseMixerRule(MixerRule):
        def per_position(self, layer):
            return True

    rules.register_layer_rule(Mixer, PositionwiseMixerRule())
    assert rules.per_position(Mixer(4))


@pytest.mark.parametrize("layer, why", [
    (layers.SeparableConv2D(4, 3), "two kernels"),
    (layers.SeparableConv1D(4, 3), "two kernels"),
    (layers.EinsumDense("ab,bc->ac", 4), "its equation"),
    (WeightNormalization(layers.Dense(4)), "already weight-normalized"),
])
def test_weight_normalization_refuses_what_the_rule_refuses(layer, why):
    with pytest.raises(ValueError, match=f"Unsupported layer type {type(layer).__name__}: {why}"):
        WeightNormalization(layer)


class Transposed(layers.Layer):
    """A user's kernel layer whose kernel is `(units, fan_in)`: `x K^T`."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units, self.activation = units, keras.activations.linear

    def build(self, input_shape):
        self.kernel = self.add_weight((self.units, input_shape[-1]), name="kernel")

    def call(self, x):
        return self.activation(ops.matmul(x, ops.transpose(self.kernel)))


class TransposedRule(rules.KernelRule):
    def fan_axes(self, layer, rank):
        return [1], [0]

    def weight_norm_refusal(self, layer):
        return "its units are the kernel's first axis"


def test_a_user_rules_fan_axes_place_the_orthogonal_pre_init():
    rules.register_layer_rule(Transposed, TransposedRule())
    x = keras.Input((8,))
    model = keras.Model(x, Transposed(16, name="t")(x))
    batch = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    lsuv_init(model, batch, pre_init="orthogonal", seed=0, verbose=0)
    kernel = ops.convert_to_numpy(model.get_layer("t").kernel).astype("float64")
    # Each unit's fan-in vector (a row) is drawn to one norm, then all are scaled by one
    # factor. Float32 roundings of each row's norm: the draw's normalization (a sum of 8
    # squares, a square root, a division) and up to 10 rescales (max_iter), 21 in all.
    # Read as the default layout (units on the last axis), the rows of 8 orthonormal
    # columns would differ in norm by far more.
    norms = np.linalg.norm(kernel, axis=1)
    np.testing.assert_allclose(norms, norms[0], rtol=reordered(21), atol=0)
    with pytest.raises(ValueError, match="its units are the kernel's first axis"):
        WeightNormalization(Transposed(4))


# --- sums --------------------------------------------------------------------------------------

A = signal([[2.0, 1.0], [4.0, 3.0]], [[0.5, -1.0], [1.0, 0.0]])
B = signal([[3.0, 2.0], [1.0, 5.0]], [[-1.0, 0.5], [0.5, 2.0]])
C = signal([[1.0, 1.0], [2.0, 2.0]], [[0.25, 0.0], [-0.5, 1.0]])
SHAPE = (None, 2, 2, 4)


def test_sum_of_independent_tensors():
    # E[(a + b)^2] = E[a^2] + E[b^2] + 2 E[a] E[b], entry by entry.
    out = propagate(layers.Add(), [[Input(0), Input(1)]], [A, B], [SHAPE] * 2, [SHAPE])
    assert_signal(out, A.power + B.power + 2 * A.mean * B.mean, A.mean + B.mean)
    out = propagate(knp.Add(), [Input(0), Input(1)], [A, B], [SHAPE] * 2, [SHAPE])
    assert_signal(out, A.power + B.power + 2 * A.mean * B.mean, A.mean + B.mean)
    out = propagate(layers.Add(), [[Input(0), Input(1), Input(2)]], [A, B, C], [SHAPE] * 3,
                    [SHAPE])
    cross = A.mean * B.mean + A.mean * C.mean + B.mean * C.mean
    assert_signal(out, A.power + B.power + C.power + 2 * cross, A.mean + B.mean + C.mean)


def test_difference_and_average():
    for layer, args in ((layers.Subtract(), [[Input(0), Input(1)]]),
                        (knp.Subtract(), [Input(0), Input(1)])):
        out = propagate(layer, args, [A, B], [SHAPE] * 2, [SHAPE])
        assert_signal(out, A.power + B.power - 2 * A.mean * B.mean, A.mean - B.mean)
    out = propagate(layers.Average(), [[Input(0), Input(1)]], [A, B], [SHAPE] * 2, [SHAPE])
    assert_signal(out, (A.power + B.power + 2 * A.mean * B.mean) / 4, (A.mean + B.mean) / 2)


def test_sum_terms():
    def terms(layer, args):
        return rules.rule_for(layer).terms(Context(layer, tuple(args)))

    assert terms(layers.Add(), [[Input(0), Input(1), Input(2)]]) == [1.0, 1.0, 1.0]
    assert terms(layers.Subtract(), [[Input(0), Input(1)]]) == [1.0, -1.0]
    assert terms(layers.Average(), [[Input(0), Input(1)]]) == [0.5, 0.5]
    assert terms(knp.Subtract(), [Input(0), Input(1)]) == [1.0, -1.0]
    assert terms(knp.Add(), [Input(0), 2.0]) is None  # a shift, not a sum of tensors


@pytest.mark.parametrize("layer, args, shift_sign, x_sign", [
    (knp.Add(), (Input(0), 2.0), 1.0, 1.0),        # x + 2
    (knp.Add(), (2.0, Input(0)), 1.0, 1.0),        # 2 + x
    (knp.Subtract(), (2.0, Input(0)), 1.0, -1.0),  # 2 - x
    (knp.Subtract(), (Input(0), 2.0), -1.0, 1.0),  # x - 2
], ids=["x_plus_2", "2_plus_x", "2_minus_x", "x_minus_2"])
def test_sum_with_a_constant(layer, args, shift_sign, x_sign):
    # y = x_sign x + c: E[y] = x_sign m + c, E[y^2] = p + 2 x_sign m c + c^2.
    c = 2.0 * shift_sign
    out = propagate(layer, args, [A], [SHAPE], [SHAPE])
    assert_signal(out, A.power + 2 * x_sign * A.mean * c + c**2, x_sign * A.mean + c)


def test_sum_of_a_tensor_with_itself():
    # h + h is 2h exactly: E[(2h)^2] = 4 E[h^2], whatever h is; not two independent terms.
    out = propagate(knp.Add(), [Input(0), Input(0)], [A, A], [SHAPE] * 2, [SHAPE])
    assert_signal(out, 4 * A.power, 2 * A.mean)


# --- products ----------------------------------------------------------------------------------

def test_product_by_a_constant_scale():
    for args in ((0.1, Input(0)), (Input(0), 0.1)):
        layer = knp.Multiply()
        out = propagate(layer, args, [A], [SHAPE], [SHAPE])
        assert_signal(out, 0.01 * A.power, 0.1 * A.mean)
        assert rules.rule_for(layer).scale(Context(layer, args)) == pytest.approx(0.1, rel=EXACT)


def test_product_by_a_per_channel_constant():
    gamma = np.array([0.5, -1.0, 2.0, 1.0])  # a LayerScale-like vector
    layer = knp.Multiply()
    out = propagate(layer, (Input(0), gamma), [A], [SHAPE], [SHAPE])
    assert_signal(out, np.mean(gamma**2) * A.power, np.mean(gamma) * A.mean)
    assert rules.rule_for(layer).scale(Context(layer, (Input(0), gamma))) == pytest.approx(
        math.sqrt(np.mean(gamma**2)), rel=EXACT)


def test_division():
    layer = knp.TrueDivide()
    out = propagate(layer, (Input(0), 4.0), [A], [SHAPE], [SHAPE])
    assert_signal(out, A.power / 16, A.mean / 4)
    assert rules.rule_for(layer).scale(Context(layer, (Input(0), 4.0))) == pytest.approx(
        0.25, rel=EXACT)
    # 1 / x has no moments from those of x: unknown, with the reason, and not a scale.
    out = propagate(layer, (4.0, Input(0)), [A], [SHAPE], [SHAPE])
    assert out.unknown and "divides" in out.unknown
    assert rules.rule_for(layer).scale(Context(layer, (4.0, Input(0)))) is None
    out = propagate(layer, (Input(0), Input(1)), [A, B], [SHAPE] * 2, [SHAPE])
    assert out.unknown


def test_product_of_two_tensors():
    # Independent: E[(ab)^2] = E[a^2] E[b^2], E[ab] = E[a] E[b].
    for layer, args in ((knp.Multiply(), (Input(0), Input(1))),
                        (layers.Multiply(), ([Input(0), Input(1)],))):
        out = propagate(layer, args, [A, B], [SHAPE] * 2, [SHAPE])
        assert_signal(out, A.power * B.power, A.mean * B.mean)
        assert rules.rule_for(layer).scale(Context(layer, args)) is None


# --- concatenation -----------------------------------------------------------------------------

def test_concatenate_weights_channels_by_width():
    narrow, wide = signal(1.0, 0.0), signal(3.0, 1.0)
    for layer, args in ((layers.Concatenate(), ([Input(0), Input(1)],)),
                        (knp.Concatenate(axis=-1), ([Input(0), Input(1)],))):
        out = propagate(layer, args, [narrow, wide], [(None, 4), (None, 12)], [(None, 16)])
        assert_signal(out, (4 * 1.0 + 12 * 3.0) / 16, (12 * 1.0) / 16)


def test_concatenate_on_a_spatial_axis_joins_the_profiles():
    top = signal([[1.0, 2.0, 3.0]], [[0.0, 0.5, 1.0]])
    bottom = signal([[4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    out = propagate(layers.Concatenate(axis=1), ([Input(0), Input(1)],), [top, bottom],
                    [(None, 1, 3, 4), (None, 2, 3, 4)], [(None, 3, 3, 4)])
    assert_signal(out, np.concatenate([top.power, bottom.power]),
                  np.concatenate([top.mean, bottom.mean]))


def test_concatenate_on_the_batch_axis_keeps_the_moments():
    # `ops.concatenate` defaults to axis 0, the batch: entries keep their moments (any mix
    # of two equal signals is that signal) and the positions their shape.
    same = signal([[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.5], [1.0, 1.5]])
    out = propagate(knp.Concatenate(), ([Input(0), Input(1)],), [same, same],
                    [(None, 2, 2, 4)] * 2, [(None, 2, 2, 4)])
    assert_signal(out, same.power, same.mean)
    flat = signal(2.0, 0.5)
    out = propagate(knp.Concatenate(), ([Input(0), Input(1)],), [flat, flat],
                    [(None, 4)] * 2, [(None, 4)])
    assert_signal(out, flat.power, flat.mean)


# --- dropout, normalization, rescaling ---------------------------------------------------------

def test_dropout_in_training_and_inference():
    layer = layers.Dropout(0.25)
    out = propagate(layer, (Input(0),), [A], [SHAPE], [SHAPE], training=True)
    assert_signal(out, A.power / 0.75, A.mean)  # inverted dropout: x * mask / (1 - rate)
    out = propagate(layer, (Input(0),), [A], [SHAPE], [SHAPE], training=False)
    assert_signal(out, A.power, A.mean)


def batch_norm(gamma, beta, moving_mean, moving_variance):
    layer = layers.BatchNormalization()
    layer.build((None, len(gamma)))
    for variable, value in ((layer.gamma, gamma), (layer.beta, beta),
                            (layer.moving_mean, moving_mean),
                            (layer.moving_variance, moving_variance)):
        variable.assign(np.asarray(value, "float32"))
    return layer


def test_batch_norm_in_training_mode():
    gamma, beta = [2.0, 1.0], [0.5, -0.5]
    layer = batch_norm(gamma, beta, [0.5, -1.0], [4.0, 0.25])  # moving stats unused here
    flat = signal(np.full((2, 2), 7.0), np.full((2, 2), 3.0))
    out = propagate(layer, (Input(0),), [flat], [(None, 2, 2, 2)], [(None, 2, 2, 2)])
    # Per channel c, y = gamma_c z + beta_c with z standardized: E[y^2] = gamma_c^2 + beta_c^2,
    # averaged over channels: (4 + 1) / 2 + (0.25 + 0.25) / 2. Mean: mean(beta) = 0.
    assert_signal(out, np.full((2, 2), 2.75), np.zeros((2, 2)), abs=EXACT)
    # Statistics pooled over positions: a profile over positions survives, scaled.
    profile = signal([[1.0, 3.0], [2.0, 2.0]], np.zeros((2, 2)))
    out = propagate(layer, (Input(0),), [profile], [(None, 2, 2, 2)], [(None, 2, 2, 2)])
    assert_signal(out, 2.5 * profile.power / 2.0 + 0.25, np.zeros((2, 2)), abs=EXACT)


def test_batch_norm_in_inference_mode_is_its_affine_map():
    gamma, beta, moving_mean, moving_variance = [2.0, 1.0], [0.5, -0.5], [0.5, -1.0], [4.0, 0.25]
    layer = batch_norm(gamma, beta, moving_mean, moving_variance)
    power, mean = 3.0, 1.0
    out = propagate(layer, (Input(0),), [signal(power, mean)], [(None, 2)], [(None, 2)],
                    training=False)
    # A two-point input with these moments in every channel (m -+ s, s^2 = p - m^2) run
    # through the layer itself: y is affine in x, so the batch averages of y and y^2 are
    # E[y] and E[y^2] for any input with these moments. The layer computes in float32:
    # a few roundings of 2^-24 each on values of order 1, so 1e-6 relative.
    s = math.sqrt(power - mean**2)
    x = np.array([[mean - s] * 2, [mean + s] * 2], "float32")
    y = ops.convert_to_numpy(layer(x, training=False)).astype(float)
    assert_signal(out, np.mean(y**2), np.mean(y), rel=1e-6)
    # And by hand: a_c = gamma_c / sqrt(v_c + eps), b_c = beta_c - a_c m_c.
    a = np.array(gamma) / np.sqrt(np.array(moving_variance) + layer.epsilon)
    b = np.array(beta) - a * np.array(moving_mean)
    expected = np.mean((a * (mean - s) + b) ** 2 + (a * (mean + s) + b) ** 2) / 2
    assert_signal(out, expected, np.mean(a * mean + b), rel=1e-6)  # eps is float32 too
    # Not the training-mode answer (gamma^2 + beta^2 = 2.75), which the moving stats change.
    assert abs(float(out.power) - 2.75) > 1.0


def test_layer_normalization():
    layer = layers.LayerNormalization()
    layer.build((None, 4))
    layer.gamma.assign(np.array([1.0, 2.0, 0.5, 1.0], "float32"))
    layer.beta.assign(np.array([0.5, 0.0, -0.5, 1.0], "float32"))
    out = propagate(layer, (Input(0),), [signal(9.0, 2.0)], [(None, 4)], [(None, 4)])
    assert_signal(out, (1 + 4 + 0.25 + 1) / 4 + (0.25 + 0 + 0.25 + 1) / 4, 1.0 / 4)


def test_rescaling_with_an_offset():
    # 0-255 pixels, uniform on [0, 255]: E[x] = 127.5, E[x^2] = 255^2 / 3. After
    # x / 127.5 - 1, uniform on [-1, 1]: mean 0 and second moment 1/3. The power is
    # 4/3 - 2 + 1: terms of order 1, so the rounding is absolute, a few 1e-16.
    layer = layers.Rescaling(1 / 127.5, offset=-1)
    out = propagate(layer, (Input(0),), [signal(255.0**2 / 3, 127.5)], [(None, 4)],
                    [(None, 4)])
    assert_signal(out, 1 / 3, 0.0, abs=EXACT)
    assert rules.rule_for(layer).scale(Context(layer, (Input(0),))) is None  # not a pure scale
    plain = layers.Rescaling(0.5)
    assert rules.rule_for(plain).scale(Context(plain, (Input(0),))) == 0.5
    out = propagate(plain, (Input(0),), [A], [SHAPE], [SHAPE])
    assert_signal(out, A.power / 4, A.mean / 2)


# --- activations, pooling, padding -------------------------------------------------------------

def test_relu_op_on_a_centred_gaussian():
    # z ~ N(0, q): E[relu(z)^2] = q / 2 and E[relu(z)] = sqrt(q / (2 pi)), exactly.
    q = 2.5
    out = propagate(knn.Relu(), (Input(0),), [signal(q, 0.0)], [(None, 4)], [(None, 4)])
    assert_signal(out, q / 2, math.sqrt(q / (2 * math.pi)))


def test_relu_on_a_shifted_gaussian():
    # z ~ N(m, s^2): E[relu^2] = (m^2 + s^2) Phi(m/s) + m s phi(m/s),
    # E[relu] = m Phi(m/s) + s phi(m/s); erf is accurate to a few ulps.
    m, s = 0.7, 1.3
    cdf = 0.5 * (1 + math.erf(m / s / math.sqrt(2)))
    pdf = math.exp(-0.5 * (m / s) ** 2) / math.sqrt(2 * math.pi)
    for layer in (knn.Relu(), layers.ReLU(), layers.Activation("relu")):
        out = propagate(layer, (Input(0),), [signal(m**2 + s**2, m)], [(None, 4)], [(None, 4)])
        assert_signal(out, (m**2 + s**2) * cdf + m * s * pdf, m * cdf + s * pdf)


def test_global_average_pooling_averages_the_profile():
    profile = signal([[1.0, 2.0, 3.0], [4.0, 5.0, 9.0]], [[0.0, 1.0, 2.0], [0.5, 0.5, 2.0]])
    out = propagate(layers.GlobalAveragePooling2D(), (Input(0),), [profile], [(None, 2, 3, 4)],
                    [(None, 4)])
    assert_signal(out, 4.0, 1.0)  # 24 / 6 and 6 / 6


def test_global_max_pooling_of_two_positions():
    # M = max(z1, z2), z iid N(0, s^2): M^2 + min^2 = z1^2 + z2^2 and, by symmetry, M^2 and
    # min^2 have one law, so E[M^2] = s^2; E[M] = s / sqrt(pi). The rule integrates on a
    # 12,001-point grid: a sum of 12,001 float64 terms, at most 12,001 eps = 2.7e-12 apart.
    q = 2.0
    out = propagate(layers.GlobalMaxPooling2D(), (Input(0),), [signal(np.full((1, 2), q), 0.0)],
                    [(None, 1, 2, 4)], [(None, 4)])
    assert_signal(out, q, math.sqrt(q / math.pi), rel=1e-11)


def test_zero_padding_profile():
    layer = layers.ZeroPadding2D(((1, 2), (0, 1)))
    inner = signal(np.full((2, 3), 2.0), np.full((2, 3), 0.5))
    out = propagate(layer, (Input(0),), [inner], [(None, 2, 3, 4)], [(None, 5, 4, 4)])
    power = np.zeros((5, 4))
    power[1:3, 0:3] = 2.0
    mean = np.zeros((5, 4))
    mean[1:3, 0:3] = 0.5
    assert_signal(out, power, mean)


def test_unknown_inputs_stay_unknown():
    unknown = Signal.unknown_after("opaque: HostCode", (2, 2))
    for layer, args in ((knp.Add(), (Input(0), Input(1))), (knp.Multiply(), (Input(0), 0.5)),
                        (knn.Relu(), (Input(0),)), (layers.Dropout(0.5), (Input(0),))):
        ins = [unknown, A][:len([a for a in args if isinstance(a, Input)])]
        out = propagate(layer, args, ins, [SHAPE] * len(ins), [SHAPE])
        assert out.unknown == "opaque: HostCode"


@pytest.mark.parametrize("shape, kernel, strides, dilation, padding", [
    ((9, 9), (3, 3), (1, 1), (1, 1), "same"), ((9, 8), (3, 3), (2, 2), (1, 1), "same"),
    ((10, 10), (3, 5), (1, 1), (1, 2), "valid"), ((7, 7), (7, 7), (2, 2), (1, 1), "same"),
    ((16,), (3,), (1,), (2,), "same"), ((8, 8), (1, 1), (2, 2), (1, 1), "valid")])
def test_receptive_field_means_are_a_convolution_with_a_flat_kernel(shape, kernel, strides,
                                                                    dilation, padding):
    from keras_goodinit.rules import _window_mean

    power = np.random.default_rng(0).uniform(size=shape)
    x = ops.convert_to_tensor(power[None, ..., None], "float32")
    flat = np.full(kernel + (1, 1), 1.0 / math.prod(kernel), "float32")
    expected = ops.convert_to_numpy(ops.conv(x, flat, strides=strides, padding=padding,
                                             dilation_rate=dilation))[0, ..., 0]
    # The convolution sums at most 49 float32 terms of size <= 1: within 64 eps32.
    np.testing.assert_allclose(_window_mean(power, kernel, strides, dilation, padding),
                               expected, rtol=0, atol=64 * np.finfo("float32").eps)
