"""KerasHub backbones in the op-level graph (`keras_goodinit._graph`).

Each backbone is built from a small explicit config (no preset, no
download), once per module, and flattened: every kernel inside its
transformer blocks must be a step that a pass can hook, and its residual
sums must be found as blocks, two per transformer layer (attention, MLP)
on one stream. `mean_field_init` and `lsuv_init` then run on it and set
every branch end from N = 2 * layers. KerasHub-free tests pin the cases
the backbones meet: a sublayer whose `compute_output_spec` cannot take
every argument of its `call` (`CachedMultiHeadAttention`), a layer whose
output is made from its input's shape alone (`PositionEmbedding`), and
post-LN blocks (BERT), one stage however many norms the stream passes.
"""

import os
import sys
from collections import Counter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import layers, ops  # noqa: E402

from keras_goodinit import _graph, lsuv_init, mean_field_init  # noqa: E402

LAYERS = 2  # transformer layers of each backbone (the encoder stack has DEEP)
DEEP = 32


def _keras_hub():
    # keras-hub needs Python 3.11+, so setup.cfg's test extra installs it only there.
    if sys.version_info < (3, 11):
        pytest.skip("keras-hub needs Python 3.11 or later")
    import keras_hub

    return keras_hub


def _tokens(batch=2, length=8, vocabulary=50):
    rng = np.random.default_rng(0)
    return {"token_ids": rng.integers(1, vocabulary, (batch, length)).astype("int32"),
            "padding_mask": np.ones((batch, length), "int32")}


def _bert_tokens():
    data = _tokens()
    data["segment_ids"] = np.zeros_like(data["token_ids"])
    return data


def _encoder_stack(hub, depth, width=16):
    """Post-LN `TransformerEncoder` layers (KerasHub's default) in a functional model.

    An input projection first, as an embedding would be: a stream that is the model's
    input itself is one residual LSUV cannot read in a pass.
    """
    inputs = keras.Input((None, width))
    h = layers.Dense(width, name="embed")(inputs)
    for index in range(depth):
        h = hub.layers.TransformerEncoder(32, num_heads=2, name=f"encoder_{index}")(h)
    return keras.Model(inputs, h)


def _gpt2(hub):
    return hub.models.GPT2Backbone(vocabulary_size=50, num_layers=LAYERS, num_heads=2,
                                   hidden_dim=16, intermediate_dim=32,
                                   max_sequence_length=16)


def _bert(hub):
    return hub.models.BertBackbone(vocabulary_size=50, num_layers=LAYERS, num_heads=2,
                                   hidden_dim=16, intermediate_dim=32,
                                   max_sequence_length=16)


def _vit(hub):
    return hub.models.ViTBackbone(image_shape=(16, 16, 3), patch_size=8, num_layers=LAYERS,
                                  num_heads=2, hidden_dim=16, mlp_dim=32)


def _llama(hub):
    return hub.models.LlamaBackbone(vocabulary_size=50, num_layers=LAYERS, num_query_heads=2,
                                    num_key_value_heads=1, hidden_dim=16, intermediate_dim=32)


def _gemma(hub):
    return hub.models.GemmaBackbone(vocabulary_size=50, num_layers=LAYERS, num_query_heads=2,
                                    num_key_value_heads=1, hidden_dim=16, intermediate_dim=32,
                                    head_dim=8)


def _images():
    return np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")


def _sequences():
    return np.random.default_rng(0).normal(size=(2, 8, 16)).astype("float32")


# name: (build, layers, data, (attention output, MLP output) path names of layer i)
BACKBONES = {
    "gpt2": (_gpt2, LAYERS, _tokens, lambda i: (
        f"transformer_layer_{i}/self_attention/attention_output",
        f"transformer_layer_{i}/feedforward_output_dense")),
    "bert": (_bert, LAYERS, _bert_tokens, lambda i: (
        f"transformer_layer_{i}/self_attention_layer/attention_output",
        f"transformer_layer_{i}/feedforward_output_dense")),
    "vit": (_vit, LAYERS, _images, lambda i: (
        f"vit_encoder/transformer_block_{i + 1}/mha/attention_output",
        f"vit_encoder/transformer_block_{i + 1}/mlp/dense_2")),
    "llama": (_llama, LAYERS, _tokens, lambda i: (
        f"transformer_layer_{i}/self_attention/attention_output",
        f"transformer_layer_{i}/feedforward_output_dense")),
    "gemma": (_gemma, LAYERS, _tokens, lambda i: (
        f"decoder_block_{i}/attention/attention_output",
        f"decoder_block_{i}/ffw_linear")),
    "post_ln_stack": (lambda hub: _encoder_stack(hub, DEEP), DEEP, _sequences, lambda i: (
        f"encoder_{i}/self_attention_layer/attention_output",
        f"encoder_{i}/feedforward_output_dense")),
}


@pytest.fixture(scope="module")
def backbones():
    hub = _keras_hub()
    return {name: build(hub) for name, (build, *_) in BACKBONES.items()}


def kernel_layers(model):
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, (layers.Dense, layers.EinsumDense))]


def kernel_names(model):
    """The path names of the model's kernel steps, sorted (what the reports name rows by)."""
    kernels = {id(layer) for layer in kernel_layers(model)}
    return sorted(s.name for s in _graph.flatten(model).steps if id(s.layer) in kernels)


# --- the graph -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKBONES)
def test_every_kernel_is_a_hooked_step(backbones, name):
    model = backbones[name]
    graph = _graph.flatten(model)
    kernels = kernel_layers(model)
    _, count, _, _ = BACKBONES[name]
    assert len(kernels) >= 6 * count  # q, k, v, output; two or three MLP kernels per layer
    steps = {id(s.layer): s for s in graph.steps}
    for layer in kernels:
        step = steps.get(id(layer))
        assert step is not None, (name, layer.name, graph.opaque)
        assert sum(s.layer is layer for s in graph.steps) == 1
        # What a pass reads: the layer's own first call.
        assert graph.hook(step.outputs[0]) == (layer, 0, 0), (name, step.name)
    # Nothing inside the blocks stays opaque; only a position embedding may (a constant).
    assert {cls for _, cls, _ in graph.opaque} <= {"PositionEmbedding"}


@pytest.mark.parametrize("name", BACKBONES)
def test_two_blocks_per_layer_on_one_stream(backbones, name):
    graph = _graph.flatten(backbones[name])
    _, count, _, ends = BACKBONES[name]
    blocks, _ = _graph.residual_blocks(graph)
    assert [b.branch_end.name for b in blocks] == [e for i in range(count) for e in ends(i)]
    assert {(b.stage, b.num_blocks) for b in blocks} == {(0, 2 * count)}
    for block in blocks:
        assert block.reason == "" and block.projection is None
        assert block.scales == [1.0] and block.gates == [None]
        # The skip is the stream: the sum before it, through nothing but normalizations,
        # dropout and casts (post-LN) or directly (pre-LN).
        assert block.skip == block.source
        assert graph.hook(block.branch_end.outputs[0]) is not None


def test_gpt2_position_embedding_is_a_constant_not_a_branch(backbones):
    graph = _graph.flatten(backbones["gpt2"])
    (step,) = [s for s in graph.steps if s.name == "position_embedding"]
    assert step.inputs == [] and step.args == () and step.opaque == _graph._CONSTANT
    _, plain = _graph.residual_blocks(graph)
    assert [s.name for s, _ in plain] == ["embeddings_add"]


def test_flatten_leaves_the_backbone_unchanged(backbones):
    model = backbones["gpt2"]
    everything = list(model._flatten_layers(include_self=True, recursive=True))
    _graph._CACHE.pop(model, None)
    before = [(len(x._inbound_nodes), len(x._outbound_nodes)) for x in everything]
    _graph.flatten(model)
    assert [(len(x._inbound_nodes), len(x._outbound_nodes)) for x in everything] == before
    # The spec override for CachedMultiHeadAttention lasts for the tracing only.
    assert not [x.name for x in everything if "compute_output_spec" in vars(x)]


# --- the inits run on them -----------------------------------------------------------------

@pytest.mark.parametrize("name", BACKBONES)
def test_mean_field_init_sets_every_branch_end_from_n(backbones, name):
    model = backbones[name]
    _, count, _, ends = BACKBONES[name]
    report = mean_field_init(model, verbose=0, seed=0)
    assert set(kernel_names(model)) <= {r.name for r in report.rows}
    branch = [r for r in report.rows if r.num_blocks]
    assert [r.name for r in branch] == [e for i in range(count) for e in ends(i)]
    assert {r.num_blocks for r in branch} == {2 * count}


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "llama", "gemma"])
def test_lsuv_init_runs(backbones, name):
    model = backbones[name]
    _, count, data, _ = BACKBONES[name]
    report = lsuv_init(model, data(), verbose=0, seed=0)
    # Its rows are named by path; their last parts are the kernels' names, every one.
    missing = Counter(x.name for x in kernel_layers(model)) - Counter(
        r.name.rsplit("/", 1)[-1] for r in report.rows)
    assert not missing
    assert len({r.name for r in report.rows}) == len(report.rows)  # paths are unique
    # Every branch end, the MLP's too (its stream is a sum inside the block's own code).
    scaled = f"{2 * count} residual branch ends target s / N (N = {2 * count}:"
    assert any(note.startswith(f"residual='scaled': {scaled}") for note in report.notes), (
        report.notes)


def test_lsuv_init_runs_on_a_post_ln_stack():
    # Fewer layers than the flattened stack: a pass per layer is the slow part.
    model = _encoder_stack(_keras_hub(), 4)
    report = lsuv_init(model, _sequences(), verbose=0, seed=0)
    kernels = [r.name.rsplit("/", 1)[-1] for r in report.rows if "Embedding" not in r.class_name]
    assert sorted(kernels) == sorted(x.name for x in kernel_layers(model))
    scaled = "8 residual branch ends target s / N (N = 8:"
    assert any(note.startswith(f"residual='scaled': {scaled}") for note in report.notes), (
        report.notes)


# --- the two tracing cases, without KerasHub ---------------------------------------------

class _Projection(layers.Layer):
    """A layer whose `call` takes an argument that its `compute_output_spec` does not."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(8, name="dense")

    def call(self, x, cache=None):
        return self.dense(x)

    def compute_output_spec(self, x):
        return keras.KerasTensor(x.shape[:-1] + (8,), x.dtype)


class _Block(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = _Projection(name="inner")

    def call(self, x):
        return x + self.inner(x, cache=None)


def test_a_spec_override_that_cannot_take_the_call_arguments_is_traced_from_call():
    inputs = keras.Input((8,))
    model = keras.Model(inputs, _Block(name="block")(inputs))
    graph = _graph.flatten(model)
    assert not graph.opaque
    (dense,) = [s for s in graph.steps if s.name == "block/inner/dense"]
    assert graph.hook(dense.outputs[0]) == (model.get_layer("block").inner.dense, 0, 0)
    (block,) = _graph.residual_blocks(graph)[0]
    assert block.branch_end is dense and block.skip == graph.inputs[0]


class _Positions(layers.Layer):
    """Adds nothing of its input but its shape: a learned table, sliced to the length."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=(16, input_shape[-1]), initializer="ones")

    def call(self, x):
        table = ops.slice(ops.convert_to_tensor(self.table), (0, 0), ops.shape(x)[1:])
        return ops.broadcast_to(table, ops.shape(x))

    def compute_output_shape(self, input_shape):
        return input_shape


def test_a_layer_made_from_its_input_shape_is_a_step_without_inputs():
    inputs = keras.Input((None, 8))
    h = layers.Dense(8, name="embed")(inputs)
    model = keras.Model(inputs, h + _Positions(name="positions")(h))
    graph = _graph.flatten(model)
    (step,) = [s for s in graph.steps if s.name == "positions"]
    assert (step.inputs, step.args, step.kwargs) == ([], (), {})
    assert graph.opaque == [("positions", "_Positions", _graph._CONSTANT)]
    assert graph.hook(step.outputs[0]) == (model.get_layer("positions"), 0, 0)
    blocks, plain = _graph.residual_blocks(graph)
    assert not blocks and [s.name for s, _ in plain] == ["add"]


def test_post_ln_blocks_are_one_stage():
    # x <- LayerNorm(x + f(x)): the norm after each sum keeps the stream, so the stage goes on
    # (a Dense between two sums, a transition, would end it: test_graph's two-stage ResNet).
    inputs = keras.Input((8,))
    h = inputs
    for index in range(3):
        f = layers.Dense(8, name=f"f{index}")(layers.Dense(8, "relu")(h))
        h = layers.LayerNormalization(name=f"norm{index}")(layers.Add()([h, f]))
    blocks, plain = _graph.residual_blocks(_graph.flatten(keras.Model(inputs, h)))
    assert not plain
    assert [(b.branch_end.name, b.stage, b.num_blocks) for b in blocks] == [
        (f"f{index}", 0, 3) for index in range(3)]
