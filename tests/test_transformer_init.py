"""Transformer blocks under `mean_field_init`: the 1/N rule on every branch of a stream.

A transformer layer has two residual branches (attention, MLP) on one
stream, so a stream of L layers has N = 2L branch ends, each given the
variance share 1/N (docs/science section 4). GPT-2's output-projection init,
std 0.02 / sqrt(2 L), is this rule in standard-deviation form: the test
checks that the branch ends' kernels are those of the plain kernels of the
same shape scaled by 1 / sqrt(2 L), exactly (float32 rounding), at two depths.
"""

import sys

import keras
import numpy as np
import pytest
from keras import ops

from keras_goodinit import mean_field_init


def _gpt2(layers: int):
    if sys.version_info < (3, 11):  # keras-hub needs Python 3.11+ (setup.cfg's test extra)
        pytest.skip("keras-hub needs Python 3.11 or later")
    import keras_hub

    keras.utils.set_random_seed(0)
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=layers, num_heads=2, hidden_dim=32,
        intermediate_dim=32, max_sequence_length=16, dropout=0.0)


def _unit_norms(layer, fan_in_axes: int) -> np.ndarray:
    """The norm of each output unit's fan-in vector (the first `fan_in_axes` axes)."""
    kernel = ops.convert_to_numpy(layer.kernel).astype(float)
    fan_in = int(np.prod(kernel.shape[:fan_in_axes]))
    return np.sqrt(np.sum(kernel.reshape(fan_in, -1) ** 2, axis=0))


@pytest.mark.parametrize("layers", [2, 4])
def test_gpt2_branch_ends_get_one_over_2L(layers):
    model = _gpt2(layers)
    report = mean_field_init(model, seed=0, verbose=0)
    ends = [r for r in report.rows if r.name.endswith(("attention_output",
                                                       "feedforward_output_dense"))]
    assert len(ends) == 2 * layers
    for row in ends:
        assert row.num_blocks == 2 * layers and row.rule == "residual", row
        assert row.gamma == pytest.approx(1.0 / (2 * layers), rel=1e-12)
    # The rule in standard-deviation form. The value projection (32 -> 2 heads x 16, linear)
    # and the output projection (2 x 16 -> 32, a branch end) both have C_in = C_out = 32, so
    # g = sqrt(gamma): 1 against 1 / (2L), each unit's norm exactly (float32: 1e-6 relative).
    for index in range(layers):
        attention = model.get_layer(f"transformer_layer_{index}")._self_attention_layer
        value = _unit_norms(attention._value_dense, 1)
        out = _unit_norms(attention._output_dense, 2)
        np.testing.assert_allclose(value, 1.0, rtol=1e-5)
        np.testing.assert_allclose(out, 1.0 / np.sqrt(2 * layers), rtol=1e-5)


def test_gpt2_stream_after_mean_field_is_bounded_and_rows_are_predicted():
    model = _gpt2(4)
    rng = np.random.default_rng(0)
    data = {"token_ids": rng.integers(0, 64, (64, 16)).astype("int32"),
            "padding_mask": np.ones((64, 16), "int32")}
    report = mean_field_init(model, data=data, seed=0, verbose=0)
    assert not report.unanalysed, report.unanalysed
    # Every kernel and table has a predicted row.
    assert all(np.isfinite(r.predicted) for r in report.rows), report.table()
    # The stream: 1 from the embeddings plus N shares of at most 1 each: below e.
    assert max(report.add_outputs.values()) < np.e


def test_gpt2_residual_lsuv_scales_both_branches_of_every_block():
    from keras_goodinit import lsuv_init

    layers = 3
    model = _gpt2(layers)
    rng = np.random.default_rng(1)
    data = {"token_ids": rng.integers(0, 64, (32, 16)).astype("int32"),
            "padding_mask": np.ones((32, 16), "int32")}
    report = lsuv_init(model, data, residual="scaled", verbose=0)
    ends = [r for r in report.rows if r.name.endswith(("attention_output",
                                                       "feedforward_output_dense"))]
    assert len(ends) == 2 * layers
    # The MLP's stream (the sum after attention) is made inside the block's own code: s is
    # read where the stream last enters a pass, and every branch end still gets s / N.
    for row in ends:
        assert "residual branch end" in row.reason and f"/ {2 * layers}" in row.reason, row
        assert row.target_var < 1.0
    assert not any("kept at target_var" in note for note in report.notes), report.notes


def _llama(causal_lm: bool = False):
    """A 2-layer Llama backbone (or its causal LM, whose output projection is untied)."""
    if sys.version_info < (3, 11):
        pytest.skip("keras-hub needs Python 3.11 or later")
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=64, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=64, intermediate_dim=128)
    return keras_hub.models.LlamaCausalLM(backbone, preprocessor=None) if causal_lm else backbone


def test_llama_rmsnorm_and_rotary_written_as_ops_are_followed():
    model = _llama()
    rng = np.random.default_rng(0)
    data = {"token_ids": rng.integers(0, 64, (32, 16)).astype("int32"),
            "padding_mask": np.ones((32, 16), "int32")}
    report = mean_field_init(model, data=data, seed=0, verbose=0)
    # RMSNorm as x * rsqrt(mean(x^2) + eps) and the rotary x cos + rotate(x) sin are
    # matched whole (keras_goodinit._patterns): nothing is left without a rule, and every
    # row's measurement agrees with its prediction within the row's sampling tolerance.
    assert not report.unanalysed, report.unanalysed
    assert [r.status for r in report.rows] == ["ok"] * len(report.rows), report.table()
    # The query and key reach their einsum through the rotation: aimed at the logits.
    assert {r.rule for r in report.rows if r.name.endswith(("query", "key"))} == {"attention"}


def test_deepnorm_scales_branch_kernels_but_queries_and_keys():
    if sys.version_info < (3, 11):
        pytest.skip("keras-hub needs Python 3.11 or later")
    import keras_hub

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 16))
    h = inputs
    for index in range(4):  # post-LN encoder layers: two sums each, L = 4
        h = keras_hub.layers.TransformerEncoder(32, num_heads=2, name=f"encoder_{index}")(h)
    model = keras.Model(inputs, h)
    scaled = mean_field_init(model, residual="deepnorm", seed=0, verbose=0)
    plain = mean_field_init(model, residual=None, seed=0, verbose=0)
    beta_sq = (8 * 4) ** -0.5  # Wang et al. 2022, encoder: beta = (8 L)^(-1/4)
    for row in scaled.rows:
        reference = plain[row.name].gamma
        if row.name.endswith(("query", "key")):
            # Aimed at the attention logits as without DeepNorm (their gain reads the
            # tokens' correlation, which the scaled branches upstream change).
            assert row.rule == "attention", row
        else:
            # After a post-LN norm every kernel's input is the same: only beta^2 differs.
            assert row.rule == "deepnorm" and row.gamma == pytest.approx(
                reference * beta_sq, rel=1e-12), row
    assert any("alpha = 1.6818" in note for note in scaled.notes)  # (2 L)^(1/4) = 8^(1/4)


def test_an_untied_output_projection_aims_the_logits():
    model = _llama(causal_lm=True)
    report = mean_field_init(model, seed=0, verbose=0)
    (row,) = [r for r in report.rows if r.name.endswith("reverse_embeddings")]
    assert row.rule == "embedding" and row.predicted == pytest.approx(1 / 64)
    rng = np.random.default_rng(5)
    data = {"token_ids": rng.integers(0, 64, (32, 16)).astype("int32"),
            "padding_mask": np.ones((32, 16), "int32")}
    logits = ops.convert_to_numpy(model.predict(data, verbose=0))
    # After the final RMSNorm (unit second moment) the logits' variance is 64 * E[w^2] = 1.
    # The 64 drawn columns' squared norms average to it within sqrt(2 / 64) / 8 = 0.022
    # relative (one sd); 0.25 leaves room for the hidden state's own anisotropy.
    assert float(np.var(logits)) == pytest.approx(1.0, rel=0.25)
