"""mean_field_init's zero-init residual families: SkipInit/ReZero and Fixup; ResidualGate."""

import math

import keras
import numpy as np
import pytest
from _rounding import EPS
from keras import ops

from keras_goodinit import WeightNormalization, mean_field
from keras_goodinit.layers import ResidualGate
from keras_goodinit.mean_field import mean_field_init


def _normal(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _numpy(value):
    return np.asarray(ops.convert_to_numpy(value), dtype="float64")


def _mlp(blocks=4, width=32, m=2, gated=False, style="plus", seed=0):
    """A no-normalization residual MLP: blocks of `m` Dense layers; (model, [(skip, sum)])."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((width,))
    h = keras.layers.Dense(width, name="stem")(inputs)
    pairs = []
    for index in range(blocks):
        y = h
        for layer in range(m - 1):
            y = keras.layers.Dense(width, activation="relu", name=f"b{index}_in{layer}")(y)
        y = keras.layers.Dense(width, name=f"b{index}_end")(y)
        if gated:
            y = ResidualGate(1.0, name=f"b{index}_gate")(y)  # any start: the init sets 0
        skip = h
        h = keras.layers.Add(name=f"b{index}_add")([h, y]) if style == "add" else h + y
        pairs.append((skip, h))
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(h)), pairs


@keras.saving.register_keras_serializable(package="test_residual_families")
class _Block(keras.layers.Layer):
    """A subclassed residual block, its gate optional."""

    def __init__(self, channels, gated=True, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = keras.layers.Conv2D(channels, 3, padding="same", activation="relu",
                                         name="conv1")
        self.conv2 = keras.layers.Conv2D(channels, 3, padding="same", name="conv2")
        self.gate = ResidualGate(0.5, name="gate") if gated else None

    def call(self, x):
        y = self.conv2(self.conv1(x))
        return x + (self.gate(y) if self.gate is not None else y)


def _resnet(blocks=2, width=8, gated=False, seed=0):
    """A no-normalization ResNet: two stages, the second behind a strided projection skip,
    the first of subclassed blocks; (model, [(skip, sum)] of the functional blocks)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(width, 3, padding="same", name="stem")(inputs)
    for index in range(blocks):
        h = _Block(width, gated=gated, name=f"block_{index}")(h)
    pairs = []
    for index in range(blocks):
        stride = 2 if index == 0 else 1
        y = keras.layers.Conv2D(2 * width, 3, strides=stride, padding="same",
                                activation="relu", name=f"s1_{index}_conv1")(h)
        y = keras.layers.Conv2D(2 * width, 3, padding="same", name=f"s1_{index}_conv2")(y)
        if gated:
            y = ResidualGate(name=f"s1_{index}_gate")(y)
        skip = (keras.layers.Conv2D(2 * width, 1, strides=2, name="projection")(h)
                if stride > 1 else h)
        h = keras.layers.Add(name=f"s1_{index}_add")([skip, y])
        pairs.append((skip, h))
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(h)), pairs


def _streams(model, pairs, x):
    """Each block's (skip input, sum output) on `x`."""
    probe = keras.Model(model.input, [t for pair in pairs for t in pair])
    values = [ops.convert_to_numpy(v) for v in probe(x)]
    return list(zip(values[::2], values[1::2]))


def _gates(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, ResidualGate)]


# ---------------------------------------------------------------- ResidualGate


@pytest.mark.parametrize("initializer", ["zeros", 0.25, keras.initializers.Constant(-2.0)])
def test_residual_gate_config_round_trips(initializer):
    gate = ResidualGate(initializer, name="g")
    rebuilt = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(gate))
    assert isinstance(rebuilt, ResidualGate) and rebuilt.get_config() == gate.get_config()
    x = _normal((3, 5))
    np.testing.assert_array_equal(ops.convert_to_numpy(rebuilt(x)),
                                  ops.convert_to_numpy(gate(x)))
    expected = {"zeros": 0.0, 0.25: 0.25}.get(initializer if isinstance(initializer, (
        str, float)) else None, -2.0)
    assert float(ops.convert_to_numpy(gate.alpha)) == expected
    np.testing.assert_array_equal(ops.convert_to_numpy(gate(x)), np.float32(expected) * x)


def test_residual_gate_rejects_what_is_no_initializer():
    with pytest.raises(ValueError, match="initializer"):
        ResidualGate("no_such_initializer")


def test_a_bogus_residual_names_the_argument():
    model, _ = _mlp(blocks=1)
    with pytest.raises(ValueError, match="residual.*Received: residual='bogus'"):
        mean_field_init(model, residual="bogus", verbose=0)


# ---------------------------------------------------------------- SkipInit / ReZero


@pytest.mark.parametrize("style", ["plus", "add"])
def test_skipinit_sets_every_gate_to_zero_and_each_block_starts_as_the_identity(style):
    model, pairs = _mlp(blocks=6, gated=True, style=style)
    x = _normal((256, 32))
    report = mean_field_init(model, residual="skipinit", seed=0, verbose=0, data=x)
    assert [float(_numpy(g.alpha)) for g in _gates(model)] == [0.0] * 6
    assert report.gates == {f"b{i}_gate": 0.0 for i in range(6)}
    for index in range(6):
        row = report[f"b{index}_end"]
        # Gated: the end keeps the gain of an unscaled branch (linear: gamma = 1), no 1/N.
        assert row.rule == "skipinit" and row.gamma == 1.0 and row.num_blocks == 0
        assert f"b{index}_gate" in row.reason
    for skip, total in _streams(model, pairs, x):
        np.testing.assert_array_equal(total, skip)  # 0 * branch adds exactly 0
    # The stream's predicted second moment stays its input's; every row checks on data.
    stem = report["stem"].predicted
    assert list(report.add_outputs.values()) == pytest.approx([stem] * 6, rel=1e-12)
    assert report.ok and all(row.status == "ok" for row in report.rows), report.table()


def test_skipinit_without_a_gate_zeroes_each_branch_end_and_rezero_is_the_same_init():
    model, pairs = _mlp(blocks=4, m=3)
    x = _normal((128, 32))
    report = mean_field_init(model, residual="skipinit", seed=0, verbose=0, data=x)
    for index in range(4):
        end = model.get_layer(f"b{index}_end")
        assert not np.any(_numpy(end.kernel)) and not np.any(_numpy(end.bias))
        row = report[f"b{index}_end"]
        assert row.rule == "skipinit" and row.gamma == 0 and row.predicted == 0
        assert row.measured == 0 and row.status == "ok" and "zero" in row.reason
        # The inner kernels keep the mean-field init: relu's gamma = 2.
        assert report[f"b{index}_in0"].gamma == report[f"b{index}_in1"].gamma == 2.0
    for skip, total in _streams(model, pairs, x):
        np.testing.assert_array_equal(total, skip)
    assert report.ok and any("4 branch ends zero (no ResidualGate): add (end b0_end)" in note
                             for note in report.notes)
    again, _ = _mlp(blocks=4, m=3)
    rezero = mean_field_init(again, residual="rezero", seed=0, verbose=0, data=x)
    for a, b in zip(model.weights, again.weights):
        np.testing.assert_array_equal(_numpy(a), _numpy(b))
    assert [r.reason for r in rezero.rows] == [r.reason for r in report.rows]


@pytest.mark.parametrize("gated", [False, True])
def test_skipinit_on_a_conv_resnet_with_subclassed_blocks(gated):
    model, pairs = _resnet(gated=gated)
    x = _normal((32, 8, 8, 3))
    report = mean_field_init(model, residual="skipinit", seed=0, verbose=0, data=x)
    ends = ["block_0/conv2", "block_1/conv2", "s1_0_conv2", "s1_1_conv2"]
    if gated:  # the subclassed blocks' gates too, found by path
        assert report.gates == {"block_0/gate": 0.0, "block_1/gate": 0.0,
                                "s1_0_gate": 0.0, "s1_1_gate": 0.0}
        assert all(float(_numpy(g.alpha)) == 0.0 for g in _gates(model))
        assert all(report[name].rule == "skipinit" and report[name].gamma == 1.0
                   for name in ends)
    else:
        assert report.gates == {}
        for name in ends:
            layer = (model.get_layer(name) if "/" not in name
                     else model.get_layer(name.split("/")[0]).conv2)
            assert not np.any(_numpy(layer.kernel)) and not np.any(_numpy(layer.bias))
            assert report[name].predicted == 0 and report[name].measured == 0
    for skip, total in _streams(model, pairs, x):
        np.testing.assert_array_equal(total, skip)
    assert report.ok and all(row.status == "ok" for row in report.rows), report.table()


# ---------------------------------------------------------------- Fixup


@pytest.mark.parametrize("m", [2, 3])
def test_fixup_zeroes_branch_ends_and_scales_the_other_kernels_by_l_to_the_minus_1_over_2m_2(m):
    blocks = 5
    model, pairs = _mlp(blocks=blocks, m=m)
    x = _normal((256, 32))
    report = mean_field_init(model, residual="fixup", seed=0, verbose=0, data=x)
    factor = blocks ** (-1.0 / (2 * m - 2))  # on the weights: L^(-1/(2m-2)), L = 5 branches
    for index in range(blocks):
        end = model.get_layer(f"b{index}_end")
        assert not np.any(_numpy(end.kernel)) and not np.any(_numpy(end.bias))
        assert report[f"b{index}_end"].rule == "fixup" and report[f"b{index}_end"].gamma == 0
        for layer in range(m - 1):
            name = f"b{index}_in{layer}"
            row = report[name]
            # relu's mean-field gamma is 2 (32 -> 32: C_in / C_out = 1): unit norms sqrt(2).
            assert row.rule == "fixup" and row.gamma == pytest.approx(2 * factor**2, rel=1e-15)
            norms = np.linalg.norm(_numpy(model.get_layer(name).kernel), axis=0)
            # An orthogonal draw's unit norms are exact to float32 rounding of 32 terms.
            np.testing.assert_allclose(norms, math.sqrt(2) * factor,
                                       rtol=2 * math.sqrt(32) * EPS["float32"])
    for skip, total in _streams(model, pairs, x):
        np.testing.assert_array_equal(total, skip)
    assert report.ok and all(row.status == "ok" for row in report.rows), report.table()


def test_fixup_counts_every_branch_of_the_network_and_leaves_gates_as_they_are():
    model, pairs = _resnet(gated=True)
    x = _normal((32, 8, 8, 3))
    report = mean_field_init(model, residual="fixup", seed=0, verbose=0, data=x)
    # L = 4 branches over both stages, m = 2: the inner conv's weights times 4^(-1/2).
    for name in ("block_0/conv1", "block_1/conv1", "s1_0_conv1", "s1_1_conv1"):
        assert report[name].rule == "fixup"
        assert "L = 4 residual branches, m = 2" in report[name].reason
    plain = mean_field_init(_resnet(gated=True)[0], residual=None, seed=0, verbose=0)
    assert report["s1_0_conv1"].gamma == pytest.approx(plain["s1_0_conv1"].gamma / 4,
                                                      rel=1e-15)
    assert report["projection"].gamma == plain["projection"].gamma  # a skip: not a branch
    # Fixup's multiplier is the model's: gates keep their values (0.5 and 0 here).
    assert report.gates == {}
    assert sorted(float(_numpy(g.alpha)) for g in _gates(model)) == [0.0, 0.0, 0.5, 0.5]
    for skip, total in _streams(model, pairs, x):
        np.testing.assert_array_equal(total, skip)
    assert report.ok, report.table()


# ---------------------------------------------------------------- atomicity, training


@pytest.mark.parametrize("residual", ["skipinit", "fixup"])
def test_a_failure_leaves_every_weight_as_it_was(residual, monkeypatch):
    model, _ = _mlp(blocks=3, gated=True)
    before = [_numpy(v).copy() for v in model.weights]
    calls = []
    real = mean_field._write_bias

    def failing(target, decision, seed):
        calls.append(target)
        if len(calls) == len(model.layers) - 4:  # gates, kernels, zeros already written
            raise RuntimeError("disk full")
        real(target, decision, seed)

    monkeypatch.setattr(mean_field, "_write_bias", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        mean_field_init(model, residual=residual, seed=0, verbose=0)
    assert len(calls) > 3
    for variable, old in zip(model.weights, before):
        np.testing.assert_array_equal(_numpy(variable), old)


@pytest.mark.parametrize("gated", [False, True])
def test_one_training_step_opens_the_zeroed_branches(gated):
    model, pairs = _mlp(blocks=3, gated=gated)
    mean_field_init(model, residual="skipinit", seed=0, verbose=0)
    x, y = _normal((64, 32)), _normal((64, 4), seed=1)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.train_on_batch(x, y)
    if gated:
        # alpha's gradient is <dL/dh, branch>: nonzero, so each gate leaves 0.
        assert all(float(_numpy(g.alpha)) != 0.0 for g in _gates(model))
    else:
        # A zero end's kernel gradient is its input times dL/dh: nonzero.
        assert all(np.any(_numpy(model.get_layer(f"b{i}_end").kernel)) for i in range(3))
    assert all(np.any(total != skip) for skip, total in _streams(model, pairs, x))


def test_a_weight_normalized_branch_end_starts_at_zero_through_g():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    y = WeightNormalization(keras.layers.Dense(16, activation="relu"), name="inner")(inputs)
    y = WeightNormalization(keras.layers.Dense(16), name="end")(y)
    h = inputs + y
    model = keras.Model(inputs, h)
    x = _normal((64, 16))
    report = mean_field_init(model, residual="fixup", seed=0, verbose=0, data=x)
    end = model.get_layer("end")
    # g = 0 (v / ||v|| needs v: it keeps its directions); the bias zero.
    assert not np.any(_numpy(end.g)) and np.all(np.linalg.norm(_numpy(end.layer.kernel), axis=0))
    assert not np.any(_numpy(end.layer.bias))
    np.testing.assert_array_equal(ops.convert_to_numpy(model(x)), x)
    assert report["end"].gamma == 0 and report["end"].status == "ok"
