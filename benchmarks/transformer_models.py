"""The models of issue 19's targets, as builders: KerasHub transformers and no-norm stacks.

Every builder seeds Keras itself and returns a fresh, built `keras.Model`;
`MODELS` maps a name to its `Spec`: how to build the model, feed it, where
its residual stream is summed and which kernels its blocks hold. Models:

- `gpt2`: `keras_hub.models.GPT2CausalLM` on a `GPT2Backbone` of 12 layers,
  d 128, 4 heads, MLP 512, vocabulary 256, sequence 32 (pre-LN); its logits
  are the tied `ReversibleEmbedding`'s.
- `bert`: `BertTextClassifier` (10 classes) on a 4-layer `BertBackbone`, d 128
  (post-LN).
- `vit`: `ViTImageClassifier` (10 classes) on a 6-layer `ViTBackbone`, d 128,
  32x32x3 images in 4x4 patches (pre-LN).
- `llama`: `LlamaCausalLM` on a 6-layer `LlamaBackbone`, d 128, 4 query and
  2 key-value heads (pre-RMSNorm, rotary embeddings).
- `postln32`: functional: `TokenAndPositionEmbedding` (vocabulary 256,
  sequence 32, d 128), 32 `keras_hub.layers.TransformerEncoder(512, 4,
  normalize_first=False)`, a `Dense(256)` head.
- `nonorm24`, `nonorm96`: issue 19's no-normalization pre-activation
  transformers, functional: token `Embedding(16, 64)` plus a learned
  `PositionEmbedding(16)` (reversal needs positions: attention alone is
  permutation-equivariant), then per block
  `h = Add([h, MultiHeadAttention(4, 16)(gelu(h), gelu(h))])` and
  `h = Add([h, Dense(64)(Dense(256, "gelu")(gelu(h)))])`, and a
  `Dense(16)` head on the last stream; sequence 16. The same models train
  on `reversal_batch`'s task.

Stream sums (`Spec.sums`): for the functional no-norm stacks, the block `Add`
layers' output tensors; inside KerasHub's blocks the sums are ops of the
blocks' own `call`, so they are read at their consumers: for a pre-LN block
the input of its feed-forward norm (the sum after attention) and the block's
output (the sum after the MLP); for a post-LN block the inputs of both norms.

Example:

    spec = transformer_models.MODELS["gpt2"]
    model = spec.build()
    x = spec.inputs(np.random.default_rng(0), 16)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import keras
import numpy as np

SEED = 0
TEXT_VOCAB, TEXT_LENGTH, WIDTH = 256, 32, 128
TASK_VOCAB, TASK_LENGTH = 16, 16  # issue 19's sequence-reversal task


class Sums(NamedTuple):
    """Where a model's residual stream is summed.

    Attributes:
        tensors: Output tensors of sums in the model's functional graph.
        inputs_of: Layers whose (first) input is a sum's output.
        outputs_of: Layers whose output is a sum's output.
    """

    tensors: list
    inputs_of: list
    outputs_of: list


class Spec(NamedTuple):
    """How to build one model, feed it, and read its stream and its blocks.

    Attributes:
        build: `build(seed)` returns a fresh, built model (same kernels per seed).
        data: `data(rng, batch)` draws a batch of the model's inputs.
        sums: `sums(model)` says where its residual stream is summed.
        blocks: `blocks(model)` lists `(block name, block layer or None)` of
            its residual blocks; with None, the block's kernels are the
            top-level layers named `block name + "_..."`.
        kind: `"keras_hub"` or `"functional"`.
    """

    build: Callable[[int], keras.Model]
    data: Callable[[np.random.Generator, int], object]
    sums: Callable[[keras.Model], Sums]
    blocks: Callable[[keras.Model], list]
    kind: str

    def inputs(self, rng: np.random.Generator, batch: int):
        """A batch of `batch` inputs drawn with `rng`."""
        return self.data(rng, batch)


# --- data -----------------------------------------------------------------------------


def _tokens(vocab: int, length: int, segments: bool = False):
    def data(rng: np.random.Generator, batch: int) -> dict:
        x = {"token_ids": rng.integers(0, vocab, (batch, length)).astype("int32"),
             "padding_mask": np.ones((batch, length), "int32")}
        if segments:
            x["segment_ids"] = np.zeros((batch, length), "int32")
        return x

    return data


def _images(rng: np.random.Generator, batch: int) -> np.ndarray:
    return rng.normal(size=(batch, 32, 32, 3)).astype("float32")


def _task_tokens(rng: np.random.Generator, batch: int) -> np.ndarray:
    return rng.integers(0, TASK_VOCAB, (batch, TASK_LENGTH)).astype("int32")


def reversal_batch(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """`(x, y)`: random sequences of `TASK_LENGTH` tokens and their reversals."""
    x = _task_tokens(rng, batch)
    return x, x[:, ::-1].copy()


# --- KerasHub -------------------------------------------------------------------------


def _keras_hub():
    import keras_hub  # imported here: a benchmark-only dependency

    return keras_hub


def gpt2(seed: int = SEED) -> keras.Model:
    hub = _keras_hub()
    keras.utils.set_random_seed(seed)
    backbone = hub.models.GPT2Backbone(
        vocabulary_size=TEXT_VOCAB, num_layers=12, num_heads=4, hidden_dim=WIDTH,
        intermediate_dim=4 * WIDTH, max_sequence_length=TEXT_LENGTH)
    return hub.models.GPT2CausalLM(backbone, preprocessor=None)


def bert(seed: int = SEED) -> keras.Model:
    hub = _keras_hub()
    keras.utils.set_random_seed(seed)
    backbone = hub.models.BertBackbone(
        vocabulary_size=TEXT_VOCAB, num_layers=4, num_heads=4, hidden_dim=WIDTH,
        intermediate_dim=4 * WIDTH, max_sequence_length=TEXT_LENGTH)
    return hub.models.BertTextClassifier(backbone, num_classes=10, preprocessor=None)


def vit(seed: int = SEED) -> keras.Model:
    hub = _keras_hub()
    keras.utils.set_random_seed(seed)
    backbone = hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=4, num_layers=6, num_heads=4, hidden_dim=WIDTH,
        mlp_dim=4 * WIDTH)
    return hub.models.ViTImageClassifier(backbone, num_classes=10, preprocessor=None)


def llama(seed: int = SEED) -> keras.Model:
    hub = _keras_hub()
    keras.utils.set_random_seed(seed)
    backbone = hub.models.LlamaBackbone(
        vocabulary_size=TEXT_VOCAB, num_layers=6, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=WIDTH, intermediate_dim=2 * WIDTH)
    return hub.models.LlamaCausalLM(backbone, preprocessor=None)


def postln32(seed: int = SEED, depth: int = 32) -> keras.Model:
    hub = _keras_hub()
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((TEXT_LENGTH,), dtype="int32", name="token_ids")
    h = hub.layers.TokenAndPositionEmbedding(TEXT_VOCAB, TEXT_LENGTH, WIDTH,
                                             name="embedding")(inputs)
    for index in range(depth):
        h = hub.layers.TransformerEncoder(4 * WIDTH, 4, normalize_first=False,
                                          name=f"block{index}")(h)
    return keras.Model(inputs, keras.layers.Dense(TEXT_VOCAB, name="head")(h),
                       name=f"postln{depth}")


def _postln_data(rng: np.random.Generator, batch: int) -> np.ndarray:
    return rng.integers(0, TEXT_VOCAB, (batch, TEXT_LENGTH)).astype("int32")


def _blocks_of(class_name: str) -> Callable[[keras.Model], list]:
    def blocks(model: keras.Model) -> list:
        return [(layer.name, layer) for layer in model._flatten_layers()
                if type(layer).__name__ == class_name]

    return blocks


def _block_sums(class_name: str, norms: tuple[str, ...], block_output: bool
                ) -> Callable[[keras.Model], Sums]:
    """The inputs of the blocks' `norms` sublayers (and the blocks' outputs) are sums."""
    def sums(model: keras.Model) -> Sums:
        blocks = [layer for _, layer in _blocks_of(class_name)(model)]
        return Sums([], [getattr(block, norm) for block in blocks for norm in norms],
                    blocks if block_output else [])

    return sums


# --- no-normalization pre-activation transformers -------------------------------------


def nonorm(num_blocks: int, seed: int = SEED, width: int = 64, heads: int = 4,
           mlp: int = 256) -> keras.Model:
    """Issue 19's no-norm pre-activation transformer: `num_blocks` blocks, 2 sums each."""
    hub = _keras_hub()
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((TASK_LENGTH,), dtype="int32", name="tokens")
    tokens = layers.Embedding(TASK_VOCAB, width, name="token_embedding")(inputs)
    positions = hub.layers.PositionEmbedding(TASK_LENGTH, name="position_embedding")(tokens)
    h = layers.Add(name="embedding_sum")([tokens, positions])
    for block in range(num_blocks):
        a = layers.Activation("gelu", name=f"block{block}_attention_gelu")(h)
        a = layers.MultiHeadAttention(heads, width // heads, name=f"block{block}_attention")(a, a)
        h = layers.Add(name=f"block{block}_attention_sum")([h, a])
        m = layers.Activation("gelu", name=f"block{block}_mlp_gelu")(h)
        m = layers.Dense(mlp, activation="gelu", name=f"block{block}_mlp_in")(m)
        m = layers.Dense(width, name=f"block{block}_mlp_out")(m)
        h = layers.Add(name=f"block{block}_mlp_sum")([h, m])
    return keras.Model(inputs, layers.Dense(TASK_VOCAB, name="head")(h),
                       name=f"nonorm{num_blocks}")


def _nonorm_sums(model: keras.Model) -> Sums:
    return Sums([layer.output for layer in model.layers
                 if isinstance(layer, keras.layers.Add) and layer.name.startswith("block")],
                [], [])


def _nonorm_blocks(model: keras.Model) -> list:
    names = sorted({layer.name.split("_")[0] for layer in model.layers
                    if layer.name.startswith("block")}, key=lambda n: int(n[5:]))
    return [(name, None) for name in names]


def block_kernels(spec: Spec, model: keras.Model) -> list[tuple[str, str]]:
    """`(block name, kernel layer name)` of every layer with a kernel inside the blocks."""
    found = []
    for block_name, block in spec.blocks(model):
        members = [block] if block is not None else [
            layer for layer in model.layers if layer.name.startswith(block_name + "_")]
        for member in members:
            for layer in member._flatten_layers():
                if hasattr(layer, "kernel") or hasattr(layer, "_kernel"):
                    found.append((block_name, layer.name))
    return found


PRE_LN_NORMS = ("_self_attention_layer_norm", "_feedforward_layer_norm")
MODELS: dict[str, Spec] = {
    "gpt2": Spec(gpt2, _tokens(TEXT_VOCAB, TEXT_LENGTH),
                 _block_sums("TransformerDecoder", PRE_LN_NORMS[1:], True),
                 _blocks_of("TransformerDecoder"), "keras_hub"),
    "bert": Spec(bert, _tokens(TEXT_VOCAB, TEXT_LENGTH, segments=True),
                 _block_sums("TransformerEncoder", PRE_LN_NORMS, False),
                 _blocks_of("TransformerEncoder"), "keras_hub"),
    "vit": Spec(vit, lambda rng, batch: _images(rng, batch),
                _block_sums("ViTEncoderBlock", ("layer_norm_2",), True),
                _blocks_of("ViTEncoderBlock"), "keras_hub"),
    "llama": Spec(llama, _tokens(TEXT_VOCAB, TEXT_LENGTH),
                  _block_sums("LlamaTransformerDecoder", ("_feedforward_layernorm",), True),
                  _blocks_of("LlamaTransformerDecoder"), "keras_hub"),
    "postln32": Spec(postln32, _postln_data,
                     _block_sums("TransformerEncoder", PRE_LN_NORMS, False),
                     _blocks_of("TransformerEncoder"), "keras_hub"),
    "nonorm24": Spec(lambda seed=SEED: nonorm(24, seed), _task_tokens, _nonorm_sums,
                     _nonorm_blocks, "functional"),
    "nonorm96": Spec(lambda seed=SEED: nonorm(96, seed), _task_tokens, _nonorm_sums,
                     _nonorm_blocks, "functional"),
}
TRAINED = ("nonorm24", "nonorm96")
