"""mean_field_init on the op-level graph: the reproducers of issue 18 as regression tests."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_goodinit import _graph
from keras_goodinit.mean_field import _SIGMAS, mean_field_init


def _normal(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _tolerance(batch):
    # The relative sampling error of a batch mean of squares is at most sqrt(2 / batch)
    # (Gaussian entries, a whole sample counted as one); _SIGMAS of them, as the report uses.
    return _SIGMAS * math.sqrt(2.0 / batch)


def _resnet(style, blocks=3, width=8, seed=0):
    """A no-normalization CIFAR-style ResNet, its residuals written in `style`."""
    keras.utils.set_random_seed(seed)

    @keras.saving.register_keras_serializable(package="test_mean_field_graph")
    class Block(keras.layers.Layer):
        def __init__(self, channels, **kwargs):
            super().__init__(**kwargs)
            self.conv1 = keras.layers.Conv2D(channels, 3, padding="same", activation="relu")
            self.conv2 = keras.layers.Conv2D(channels, 3, padding="same")

        def call(self, x):
            return ops.relu(x + self.conv2(self.conv1(x)))

    inputs = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="stem")(inputs)
    for stage, channels in enumerate((width, 2 * width)):
        for index in range(blocks):
            stride = 2 if stage and not index else 1
            if style == "custom" and stride == 1:
                h = Block(channels, name=f"block_{stage}_{index}")(h)
                continue
            y = keras.layers.Conv2D(channels, 3, strides=stride, padding="same",
                                    activation="relu")(h)
            y = keras.layers.Conv2D(channels, 3, padding="same")(y)
            skip = keras.layers.Conv2D(channels, 1, strides=stride)(h) if stride > 1 else h
            if style == "layer":
                h = keras.layers.ReLU()(keras.layers.Add()([skip, y]))
            elif style == "ops_add":
                h = ops.relu(ops.add(skip, y))
            else:
                h = ops.relu(skip + y)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))


@pytest.mark.parametrize("style", ["plus", "ops_add", "custom"])
def test_residuals_written_as_tensor_code_get_what_layers_add_gets(style):
    reference = mean_field_init(_resnet("layer"), seed=0, verbose=0)
    report = mean_field_init(_resnet(style), seed=0, verbose=0)
    # Same structure, same rules: every kernel gets the same gain, branch ends 1/N = 1/3.
    assert [r.gamma for r in report.rows] == [r.gamma for r in reference.rows]
    assert sorted(r.num_blocks for r in report.rows) == sorted(
        r.num_blocks for r in reference.rows)
    assert sum(r.num_blocks == 3 for r in report.rows) == 6  # one branch end per block
    # And the predicted stream: the sums' second moments, in graph order.
    assert list(report.add_outputs.values()) == pytest.approx(
        list(reference.add_outputs.values()), rel=1e-12)
    assert len(report.add_outputs) == 6


def test_the_crash_reproducer_runs_and_says_what_it_cannot_predict():
    inputs = keras.Input((8, 16))
    h = inputs * 2.0
    h = keras.layers.MultiHeadAttention(2, 8, name="attention")(h, h)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(h))
    report = mean_field_init(model, verbose=0, seed=0)
    names = [row.name for row in report.rows]
    assert names[:4] == ["attention/query", "attention/key", "attention/value",
                         "attention/attention_output"]
    # The attention has its rule (`rules.AttentionRule`): every row is predicted.
    assert report.ok and not report.unanalysed
    assert report["head"].status == "ok" and math.isfinite(report["head"].predicted)


def test_two_attention_layers_give_unique_names_and_an_ambiguous_name_raises():
    inputs = keras.Input((8, 16))
    h = keras.layers.MultiHeadAttention(2, 8, name="first")(inputs, inputs)
    h = keras.layers.MultiHeadAttention(2, 8, name="second")(h, h)
    report = mean_field_init(keras.Model(inputs, h), verbose=0, seed=0)
    names = [row.name for row in report.rows]
    assert len(names) == len(set(names)) == 8
    assert report["first/query"] is not report["second/query"]
    with pytest.raises(ValueError, match="ambiguous"):
        report["query"]


def test_a_constant_factor_counts_in_the_prediction():
    width = 256
    inputs = keras.Input((width,))
    b = keras.layers.Dense(width, name="b")(inputs)
    scaled = 0.1 * b
    h = keras.layers.Add(name="sum")([inputs, scaled])
    model = keras.Model(inputs, keras.layers.Dense(4, name="out")(h))
    x = _normal((512, width))
    report = mean_field_init(model, seed=0, verbose=0, data=x)
    # The input moments come from x; b is linear 1 : 1, so E[b^2] = E[x^2] = p; 0.1 b adds
    # 0.01 p to the identity skip's p: 1.01 p (the constant was ignored before: 2 p).
    power = float(np.mean(x.astype("float64") ** 2))
    assert report.add_outputs["sum"] == pytest.approx(1.01 * power, rel=1e-9)
    probe = keras.Model(inputs, model.get_layer("sum").output)
    measured = float(np.mean(ops.convert_to_numpy(probe(x)) ** 2))
    assert measured == pytest.approx(1.01 * power, rel=_tolerance(512))
    assert report.ok


def test_pixel_inputs_through_rescaling_are_followed_with_their_mean():
    inputs = keras.Input((64,))
    h = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    for index in range(3):
        h = keras.layers.Dense(64, activation="tanh", name=f"t{index}")(h)
    model = keras.Model(inputs, keras.layers.Dense(4, name="out")(h))
    pixels = np.random.default_rng(0).integers(0, 256, size=(512, 64)).astype("float32")
    report = mean_field_init(model, seed=0, verbose=0, data=pixels)
    for row in report.rows:
        assert row.status == "ok", row
        assert row.measured == pytest.approx(row.predicted, rel=_tolerance(512)), row
    # Data-free, the same from the moments of uniform 0..255 pixels.
    mean, var = 127.5, (256**2 - 1) / 12
    free = mean_field_init(model, seed=0, verbose=0, input_mean=mean, input_variance=var)
    assert free["t0"].predicted == pytest.approx(1.0, rel=1e-9)
    # The data's own second moment differs from the uniform law's by its sampling error:
    # relative std sqrt(Var(x^2)) / E[x^2] / sqrt(n) ~ 0.9 / sqrt(32768) = 5e-3; 4 of them.
    assert free["t0"].gamma == pytest.approx(report["t0"].gamma, rel=2e-2)


def test_an_activation_without_a_rule_is_unanalysed_not_ok():
    def odd(x):  # never registered
        return ops.exp(x) - 1

    inputs = keras.Input((32,))
    h = keras.layers.Dense(32, activation=odd, name="odd")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="out")(h))
    report = mean_field_init(model, seed=0, verbose=0, data=_normal((64, 32)))
    assert report["odd"].status == "unanalysed"
    assert "register" in report["odd"].reason
    assert report["out"].status == "unanalysed"
    assert not report.ok


def test_three_input_sums_and_gated_branches_are_blocks():
    inputs = keras.Input((16,))
    f = keras.layers.Dense(16, name="f")(keras.layers.Dense(16, activation="relu")(inputs))
    g = keras.layers.Dense(16, name="g")(keras.layers.Dense(16, activation="relu")(inputs))
    three = keras.layers.Add(name="three")([inputs, f, g])
    gate = keras.layers.Dense(16, activation="sigmoid", name="gate")(three)
    value = keras.layers.Dense(16, name="value")(keras.layers.Dense(16, activation="relu")(three))
    gated = three + gate * value
    model = keras.Model(inputs, keras.layers.Dense(2)(gated))
    blocks, plain = _graph.residual_blocks(_graph.flatten(model))
    assert plain == []
    assert [len(b.branches) for b in blocks] == [2, 1]
    assert [e.layer.name for e in blocks[0].branch_ends] == ["f", "g"]
    assert blocks[1].branch_end.layer.name == "value" and blocks[1].gates[0] is not None
    report = mean_field_init(model, seed=0, verbose=0)
    # One stage of two blocks: the three-input block's two branches share 1/N.
    assert report["f"].num_blocks == report["g"].num_blocks == 4
    assert report["value"].num_blocks == 2


def test_the_head_aims_at_unit_logits_and_the_paper_rule_stays_available():
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10, name="logits")])
    x = _normal((1024, 64))
    report = mean_field_init(model, seed=0, verbose=0, data=x)
    assert report["logits"].rule == "head"
    assert report["logits"].predicted == pytest.approx(1.0, rel=1e-9)
    # Held to the report's own tolerance: the batch's sampling error and the kernel draw's
    # (10 logits; a 1/pi share of a ReLU output's second moment is its mean).
    assert report["logits"].status == "ok"
    assert report["logits"].measured == pytest.approx(1.0, rel=report["logits"].tolerance)
    paper = mean_field_init(model, seed=0, verbose=0, head="paper")
    assert paper["logits"].gamma == 1.0 and paper["logits"].rule == "head_paper"
    assert paper["logits"].predicted == pytest.approx(64 / 10, rel=1e-9)
    with pytest.raises(ValueError, match="Received: head='unit'"):
        mean_field_init(model, head="unit")


def test_batchnorm_is_followed_in_the_mode_asked_for():
    inputs = keras.Input((64,))
    h = inputs
    for index in range(4):
        h = keras.layers.Dense(64, name=f"d{index}")(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))
    x = 3.0 * _normal((1024, 64))  # not unit inputs: inference-mode BN passes the scale on
    for training in (True, False):
        report = mean_field_init(model, seed=0, verbose=0, data=x, training=training)
        assert report.training is training
        assert ("training mode" if training else "inference mode") in report.notes[0]
        for row in report.rows:
            assert row.status == "ok", (training, row)
            assert row.measured == pytest.approx(row.predicted, rel=row.tolerance), row
    # In inference mode the scale of the inputs reaches the layers; in training mode not.
    # d0 gets gamma = 2 (a ReLU after its BN): 2 * 9 = 18 out, 9 after the ReLU (untrained
    # BN is the identity), where training-mode BN gives the ReLU unit inputs: 0.5. So d1,
    # gamma = 2 in both, sees 18 times more, less BN's epsilon (x / sqrt(1 + 1e-3)).
    inference = mean_field_init(model, seed=0, verbose=0, training=False, input_variance=9.0)
    training = mean_field_init(model, seed=0, verbose=0, input_variance=9.0)
    assert inference["d1"].predicted == pytest.approx(18 / 1.001 * training["d1"].predicted,
                                                       rel=1e-9)


def test_chi_verdict_for_gelu_and_none_for_tanh():
    def mlp(activation, depth=12):
        layers = [keras.Input((64,))]
        layers += [keras.layers.Dense(64, activation=activation) for _ in range(depth)]
        return keras.Sequential(layers + [keras.layers.Dense(4)])

    report = mean_field_init(mlp("gelu"), seed=0, verbose=0)
    slope, depth, drift = report.chi["gelu"]
    assert slope == pytest.approx(1.144, abs=1e-3)  # _moments.chi at q = 1
    assert depth == 12 and drift == pytest.approx(slope**12, rel=1e-12)
    assert any("lsuv_init" in note for note in report.notes)
    assert mean_field_init(mlp("tanh"), seed=0, verbose=0).chi == {}


def _kernel_outputs(model, report):
    """Each ok row's measured pre-activation second moment, through a probe model."""
    names = [row.name for row in report.rows if row.status == "ok"]
    layers = [model.get_layer(name) for name in names]
    probe = keras.Model(model.inputs, [layer.output for layer in layers])
    return names, layers, probe


@pytest.mark.parametrize("build", [
    lambda: _resnet("plus"),
    lambda: keras.Sequential([keras.Input((32,)), keras.layers.Dense(32, activation="tanh"),
                              keras.layers.Dense(32, activation="gelu"),
                              keras.layers.Dense(8)]),
])
def test_no_ok_row_misses_its_measured_moment(build):
    model = build()
    x = _normal((256, *model.inputs[0].shape[1:]))
    report = mean_field_init(model, seed=0, verbose=0, data=x)
    for row in report.rows:
        # The tolerance is the batch's sampling error plus the kernel draw's (at most
        # 2 / units more in relative variance: the whole input along its mean).
        units = model.get_layer(row.name).kernel.shape[-1]
        assert _tolerance(256) <= row.tolerance <= _SIGMAS * math.sqrt(2 / 256 + 2 / units)
        if row.status == "ok":
            assert abs(row.measured / row.predicted - 1) <= row.tolerance, row
        else:
            assert row.status in ("missed", "unanalysed", "skipped"), row
            assert row.reason, row


# The benchmark's models (benchmarks/graph_models.py) that build and run in seconds; the
# keras.applications ones are checked by `python benchmarks/graph_init.py`, which prints
# the same check, and MobileNetV3Small here.
_BENCHMARK_MODELS = ("resnet56_plus", "resnet56_custom", "mha_times_two", "rescaling_tanh",
                     "scaled_branch", "three_input_add", "gated_branch", "mobilenetv3_small")


@pytest.mark.parametrize("name", _BENCHMARK_MODELS)
def test_no_ok_row_misses_its_measured_moment_on_the_benchmark_models(name):
    from benchmarks import graph_models

    spec = graph_models.MODELS[name]
    model = spec.build()
    x = spec.inputs(np.random.default_rng(0), 64)
    report = mean_field_init(model, seed=0, verbose=0, data=x)
    assert any(row.status == "ok" for row in report.rows)
    for row in report.rows:
        if row.status == "ok":
            assert abs(row.measured / row.predicted - 1) <= row.tolerance, row
            # Never looser than the batch's and the kernel draw's worst case (one unit).
            assert row.tolerance <= _SIGMAS * math.sqrt(2 / 64 + 2), row
        else:
            assert row.status in ("missed", "unanalysed", "skipped") and row.reason, row
    assert report.ok == all(row.status == "ok" for row in report.rows)


def test_a_tensor_times_itself_is_followed_exactly():
    inputs = keras.Input((64,))
    h = keras.layers.Dense(64, name="h")(inputs)
    out = keras.layers.Dense(64, activation="tanh", name="after")(h * h)
    x = _normal((1024, 64))
    report = mean_field_init(keras.Model(inputs, out), seed=0, verbose=0, data=x)
    # E[h^4] = 3 q^2 for a zero-mean Gaussian h (was q^2, as if independent: 3x off).
    assert report["after"].status == "ok", report["after"]
    assert report["after"].measured == pytest.approx(1.0, rel=report["after"].tolerance)


@pytest.mark.parametrize("combine", [lambda h: h + 0.5 * h, lambda h: h * ops.sigmoid(h)])
def test_a_sum_or_product_of_dependent_inputs_is_unanalysed(combine):
    inputs = keras.Input((64,))
    h = keras.layers.Dense(64, name="h")(inputs)
    out = keras.layers.Dense(64, activation="tanh", name="after")(combine(h))
    report = mean_field_init(keras.Model(inputs, out), seed=0, verbose=0)
    # Independence is what the sum and product rules assume: h shares itself.
    assert report["h"].status == "ok"
    assert report["after"].status == "unanalysed", report["after"]
    assert "not independent" in report.unanalysed[0][2]


def test_input_moments_from_a_dict_batch_follow_the_input_names():
    a = keras.Input((32,), name="zz")
    b = keras.Input((32,), name="aa")
    h = keras.layers.Concatenate()([keras.layers.Dense(32, name="from_zz")(a),
                                    keras.layers.Dense(32, name="from_aa")(b)])
    model = keras.Model([a, b], keras.layers.Dense(4, name="out")(h))
    rng = np.random.default_rng(0)
    batch = {"zz": 5 * rng.normal(size=(512, 32)).astype("float32"),
             "aa": rng.normal(size=(512, 32)).astype("float32")}
    report = mean_field_init(model, seed=0, verbose=0, data=batch)
    for name in ("from_zz", "from_aa"):
        assert report[name].status == "ok", report[name]
    # The data's own moments: a Dense 1 : 1 keeps the input's second moment.
    assert report["from_zz"].predicted == pytest.approx(
        float(np.mean(batch["zz"].astype("float64") ** 2)), rel=1e-9)


def test_integer_features_are_not_folded_as_constants():
    # Masks and positions made from integer inputs are computed (for sequences without
    # padding); a float feature made from them is the signal, not a mask: unanalysed.
    inputs = keras.Input((8,), dtype="int32")
    counts = keras.layers.CategoryEncoding(10, output_mode="count", name="counts")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(counts))
    report = mean_field_init(model, seed=0, verbose=0)
    assert report["head"].status == "unanalysed", report.table()
    assert [name for name, _, _ in report.unanalysed] == ["counts"]
