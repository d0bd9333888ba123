"""The attention rule and the cross moment between tokens (docs/science section 4).

Every bound is a sampling error: a mean of n independent terms of standard
deviation at most sigma is within 4 sigma / sqrt(n) of its expectation (about
1 in 16,000 to fail by chance; fixed seeds make each test deterministic).
"""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_goodinit import _moments, mean_field_init, rules
from keras_goodinit.rules import Signal


def test_relu_cross_moment_is_the_arc_cosine_kernel():
    # Cho & Saul 2009: E[relu(u) relu(v)] = var / (2 pi) (sin t + (pi - t) cos t), t = acos rho.
    relu = _moments.spec_of("relu")
    for rho in (0.0, 0.3, 0.9, 1.0):
        t = math.acos(rho)
        exact = 2.0 / (2 * math.pi) * (math.sin(t) + (math.pi - t) * math.cos(t))
        # The outer grid has 4001 points over +-10 sd: its error at the kink is below 1e-5.
        assert _moments.cross_moment(relu, 0.0, 2.0, 2.0 * rho) == pytest.approx(exact, rel=1e-5)


def test_cross_moment_of_independent_and_identical_positions():
    gelu = _moments.spec_of("gelu")
    second, first = _moments.moments(gelu, 0.3, 1.0)
    # Independent positions: E[phi]^2; identical ones: E[phi^2] (quadrature exact to 1e-12).
    assert _moments.cross_moment(gelu, 0.3, 1.0, 0.0) == pytest.approx(float(first) ** 2,
                                                                        rel=1e-10)
    assert _moments.cross_moment(gelu, 0.3, 1.0, 1.0) == pytest.approx(float(second), rel=1e-10)


def test_softmax_square_limits_and_two_keys():
    assert rules.softmax_square(1, 5.0) == 1.0
    assert rules.softmax_square(16, 0.0) == 1.0 / 16
    values = [rules.softmax_square(16, v) for v in (0.25, 1.0, 4.0, 64.0)]
    assert values == sorted(values) and 1 / 16 < values[0] and values[-1] < 1.0
    # Two keys: p = sigmoid(d), d ~ N(0, 2 var), so E[p^2 + (1 - p)^2] by quadrature. Each
    # draw lies in [1/2, 1] (sd <= 1/4) and 2^16 rows are drawn: 4 sd / 256 = 0.004.
    x, w = np.polynomial.hermite_e.hermegauss(200)
    p = 1.0 / (1.0 + np.exp(-math.sqrt(2.0) * x))
    exact = float(np.sum(w * (p**2 + (1 - p) ** 2)) / np.sum(w))
    assert rules.softmax_square(2, 1.0) == pytest.approx(exact, abs=0.004)


def _attention(query, key, value, **kwargs):
    """The rule's prediction of E[o^2] and the measured one, for numpy q, k, v."""
    op = keras.src.ops.nn.DotProductAttention(is_causal=kwargs.pop("is_causal", False))
    ins = [Signal(np.full(t.shape[1:3], np.mean(t**2)), np.full(t.shape[1:3], np.mean(t)),
                  cross=rules.measured_cross(t)) for t in (query, key, value)]
    ctx = rules.Context(op, (rules.Input(0), rules.Input(1), rules.Input(2)), kwargs,
                        [t.shape for t in (query, key, value)], [query.shape])
    (predicted,) = rules.AttentionRule().propagate(ctx, ins)
    measured = ops.convert_to_numpy(op(query, key, value, **kwargs))
    return predicted, measured, ctx


@pytest.mark.parametrize("logits", [0.2, 1.0, 4.0])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_rule_matches_independent_gaussian_tokens(logits, causal):
    rng = np.random.default_rng(0)
    batch, length, heads, depth = 256, 16, 4, 16
    shape = (batch, length, heads, depth)
    # Query and key entries of variance sqrt(logits): scale^2 d q_q q_k = logits.
    query = rng.normal(0, logits**0.25, shape).astype("float32")
    key = rng.normal(0, logits**0.25, shape).astype("float32")
    value = rng.normal(0.5, 1.0, shape).astype("float32")  # a mean survives the average
    predicted, measured, ctx = _attention(query, key, value, is_causal=causal)
    assert not ctx.notes
    # Per query position: a mean over batch * heads = 1024 independent softmax rows and d
    # value entries. o^2 <= max_j v_j^2, whose sd is below 3 (v ~ N(0.5, 1), 16 keys):
    # 4 * 3 / sqrt(1024 * 16) = 0.094 absolute, against values of 0.3-1.2.
    for i in range(length):
        assert np.mean(measured[:, i] ** 2) == pytest.approx(predicted.power[i, 0], abs=0.094)
    assert np.mean(measured) == pytest.approx(0.5, abs=0.02)
    # The cross moment between two query positions: the same bound, over pairs.
    assert rules.measured_cross(measured) == pytest.approx(predicted.cross, abs=0.094)


def test_attention_over_identical_tokens_keeps_the_values():
    rng = np.random.default_rng(1)
    shape = (64, 8, 2, 16)
    one = rng.normal(size=(64, 1, 2, 16)).astype("float32")
    same = np.broadcast_to(one, shape).copy()
    predicted, measured, _ = _attention(same, same, same)
    # Every key is the same: the output is the value itself (float32 rounding only).
    np.testing.assert_allclose(measured, same, rtol=1e-5, atol=1e-5)
    assert predicted.q == pytest.approx(np.mean(same**2), rel=1e-6)


def test_a_mask_from_the_data_is_assumed_all_visible_and_said():
    op = keras.src.ops.nn.DotProductAttention()
    ins = [Signal(np.ones((8, 2)), np.zeros((8, 2)), cross=0.0)] * 3 + [
        Signal(np.ones((8, 8)), np.ones((8, 8)))]
    ctx = rules.Context(op, (rules.Input(0), rules.Input(1), rules.Input(2)),
                        {"mask": rules.Input(3)}, [(1, 8, 2, 4)] * 3 + [(1, 8, 8)],
                        [(1, 8, 2, 4)])
    rules.AttentionRule().propagate(ctx, ins)
    assert ctx.notes == ["a mask tensor from the data taken as all keys visible"]


def _query_key(model, name, x):
    attention = model.get_layer(name)
    q = ops.convert_to_numpy(attention._query_dense(x))
    k = ops.convert_to_numpy(attention._key_dense(x))
    return q, k, attention._inverse_sqrt_key_dim


@pytest.mark.parametrize("target", [0.5, 1.0, 3.0])
def test_mean_field_sets_query_and_key_for_the_logits_variance(target):
    inputs = keras.Input((16, 64))
    h = keras.layers.MultiHeadAttention(4, 16, name="attention")(inputs, inputs)
    model = keras.Model(inputs, keras.layers.Dense(8, name="head")(h))
    report = mean_field_init(model, attention_logits=target, seed=0, verbose=0)
    assert report.ok and report["attention/query"].rule == "attention"
    x = np.random.default_rng(2).normal(size=(128, 16, 64)).astype("float32")
    q, k, scale = _query_key(model, "attention", x)
    logits = scale * np.einsum("bthd,bshd->bhts", q, k)
    # The variance over one query's keys, averaged over 128 * 4 * 16 = 8192 rows of 16
    # logits. Fan-in 64 unit-norm rows on N(0, 1) tokens: exact in expectation; the 64
    # drawn directions per head spread it by about sqrt(2 / 64) = 0.18 relative (the
    # kernel draw), which dominates: 4 sd = 0.71 relative.
    measured = float(np.mean(np.var(logits, axis=-1, ddof=1)))
    assert measured == pytest.approx(target, rel=0.71)


def test_mean_field_on_the_crash_reproducer_predicts_every_row():
    inputs = keras.Input((8, 16))
    h = inputs * 2.0
    h = keras.layers.MultiHeadAttention(2, 8, name="attention")(h, h)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(h))
    x = np.random.default_rng(3).normal(size=(256, 8, 16)).astype("float32")
    report = mean_field_init(model, data=x, seed=0, verbose=0)
    assert [row.status for row in report.rows] == ["ok"] * 5, report.table()
    assert not report.unanalysed


class _Positions(keras.layers.Layer):
    """A learned position embedding made from its input's shape alone (as KerasHub's)."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=(input_shape[1], input_shape[2]),
                                     initializer="uniform")

    def call(self, x):
        return ops.broadcast_to(self.table, ops.shape(x))


def _no_norm_block(dropout: float, causal: bool):
    keras.utils.set_random_seed(0)  # the tables keep their draws: one fixed draw
    tokens = keras.Input((16,), dtype="int32")
    h = keras.layers.Embedding(10, 32, name="tokens")(tokens)
    h = h + _Positions(name="positions")(h)
    a = keras.layers.MultiHeadAttention(4, 8, dropout=dropout, name="attention")(
        h, h, use_causal_mask=causal)
    h = keras.layers.Add()([h, a])
    return keras.Model(tokens, keras.layers.Dense(10, name="head")(h))


# (Dropout with a causal mask cannot be traced on symbolic tensors: MultiHeadAttention's
# projections leave the length open and its causal mask needs it; the rows say so.)
@pytest.mark.parametrize("dropout,causal", [(0.0, True), (0.0, False), (0.25, False)])
def test_fused_and_einsum_attention_predict_what_runs(dropout, causal):
    # Dropout makes MultiHeadAttention take its einsum-and-softmax path (EinsumRule,
    # SoftmaxRule); without it, dot_product_attention (AttentionRule).
    model = _no_norm_block(dropout, causal)
    x = np.random.default_rng(4).integers(0, 10, (256, 16)).astype("int32")
    report = mean_field_init(model, data=x, seed=0, verbose=0)
    assert not report.unanalysed, report.table()
    assert all(row.status == "ok" for row in report.rows), report.table()
    # The embeddings start the stream at 1, half each (the rows say so).
    assert report["tokens"].predicted == pytest.approx(0.5)
    assert report["positions"].predicted == pytest.approx(0.5)
    for table in (model.get_layer("tokens").embeddings, model.get_layer("positions").table):
        # float32 rounding of one rescale: relative 1e-5 is 80 epsilons.
        assert np.mean(ops.convert_to_numpy(table) ** 2) == pytest.approx(0.5, rel=1e-5)


def test_embeddings_false_leaves_tables_alone():
    model = _no_norm_block(0.0, False)
    before = ops.convert_to_numpy(model.get_layer("tokens").embeddings).copy()
    report = mean_field_init(model, embeddings=False, seed=0, verbose=0)
    np.testing.assert_array_equal(ops.convert_to_numpy(model.get_layer("tokens").embeddings),
                                  before)
    assert "tokens" not in [row.name for row in report.rows]


def test_kerashub_gelu_approximate_is_known_by_name():
    def gelu_approximate(x):
        return keras.activations.gelu(x, approximate=True)

    gelu_approximate.__module__ = "keras_hub.src.utils.keras_utils"
    spec = _moments.spec_of(gelu_approximate)
    assert spec is not None and spec.name == "gelu_approximate"
    exact = _moments.moments(_moments.spec_of("gelu"), 0.0, 1.0)[0]
    # tanh-approximate GELU is within 1e-3 of GELU pointwise; its second moment likewise.
    assert float(_moments.moments(spec, 0.0, 1.0)[0]) == pytest.approx(float(exact), abs=1e-3)
