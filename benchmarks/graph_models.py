"""The models of issue 18's targets, as builders: residuals written every way Keras 3 allows.

Every builder seeds Keras itself and returns a fresh, built `keras.Model`;
`MODELS` maps a name to its `Spec`. Models (inputs without the batch axis):

- CIFAR ResNet-56 and ResNet-110 with no normalization (3x3 stem conv, 3
  stages of 9 or 18 basic blocks of 16, 32 and 64 channels, stride 2 and a
  1x1 projection skip at the start of stages 2 and 3, global average pool,
  `Dense(10)` logits), 32x32x3, in four residual styles:
  `resnet56_add` / `resnet110_add` (`keras.layers.Add`, built by
  `keras_goodinit.models.wn_resnet(..., weight_norm=False)`),
  `resnet56_plus` / `resnet110_plus` (`h = skip + branch` on tensors),
  `resnet56_ops_add` / `resnet110_ops_add` (`keras.ops.add(skip, branch)`)
  and `resnet56_custom` / `resnet110_custom` (one subclassed `ResidualBlock`
  layer per block, its convs as sublayers, `x + branch(x)` in its `call`).
  27 and 54 residual blocks.
- keras.applications with `weights=None`, 32x32x3, 10 logits:
  `convnext_tiny` (18 residual sums, written `inputs + x`),
  `resnet50v2` (16 `Add` layers), `densenet121` (none: it concatenates) and
  `mobilenetv3_small` (6 residual `Add` layers; its 9 other `add` ops are
  the `x + 3` of hard sigmoid and hard swish, not residual sums).
- `mlp50_gelu`, `mlp50_silu`, `mlp50_tanh`: 50 `Dense(256)` layers with the
  activation fused, then `Dense(10)` logits, on 256 inputs.
- The issue's reproducers: `mha_times_two` (an op node `x * 2.0` before a
  `MultiHeadAttention`: `mean_field_init` raised on it), `rescaling_tanh`
  (0-255 inputs through `Rescaling(1 / 127.5, offset=-1)` then tanh layers;
  its `Spec.data` draws such inputs), `scaled_branch` (`h + 0.1 * f(h)`),
  `three_input_add` (`Add()([h, f(h), g(h)])`) and `gated_branch`
  (`h + sigmoid(gate(h)) * f(h)`).

Example:

    from benchmarks import graph_models
    spec = graph_models.MODELS["resnet56_plus"]
    model = spec.build()
    x = spec.inputs(np.random.default_rng(0), 64)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import keras
import numpy as np

SEED = 0
CIFAR_SHAPE = (32, 32, 3)
CIFAR_STYLES = ("add", "plus", "ops_add", "custom")


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.normal(size=shape).astype("float32")


class Spec(NamedTuple):
    """How to build one model and feed it.

    Attributes:
        build: Returns a fresh, built model (same kernels on every call).
        input_shape: One example's shape (no batch axis).
        expected_blocks: Residual blocks a reader of the code counts.
        kind: `"resnet"`, `"application"`, `"mlp"` or `"reproducer"`.
        data: `data(rng, shape)` draws a batch of `shape`; N(0, 1) if None.
    """

    build: Callable[[], keras.Model]
    input_shape: tuple[int, ...]
    expected_blocks: int
    kind: str
    data: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray] | None = None

    def inputs(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        """A batch of `batch` inputs drawn with `rng`."""
        return (self.data or _normal)(rng, (batch, *self.input_shape))


# --- CIFAR ResNets --------------------------------------------------------------------


def _conv(filters: int, name: str, kernel_size: int = 3, strides: int = 1,
          activation=None) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same",
                               activation=activation, kernel_initializer="orthogonal",
                               name=name)


@keras.saving.register_keras_serializable(package="graph_models")
class ResidualBlock(keras.layers.Layer):
    """A no-normalization basic block `skip(x) + conv2(relu(conv1(x)))`, in keras.ops.

    `skip` is the identity, or a strided 1x1 conv where the block changes the
    shape. The sublayers are named after the block (`{name}_conv1`,
    `{name}_conv2`, `{name}_shortcut`), so their names are unique in a model.

    Args:
        filters: Output channels.
        strides: Stride of `conv1` and of the projection.
        project: Whether the skip is a 1x1 projection (else the identity).
    """

    def __init__(self, filters: int, strides: int = 1, project: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.strides, self.project = filters, strides, project
        self.conv1 = _conv(filters, f"{self.name}_conv1", strides=strides)
        self.conv2 = _conv(filters, f"{self.name}_conv2")
        self.shortcut = (_conv(filters, f"{self.name}_shortcut", 1, strides)
                         if project else None)

    def build(self, input_shape):
        self.conv1.build(input_shape)
        self.conv2.build(self.conv1.compute_output_shape(input_shape))
        if self.shortcut is not None:
            self.shortcut.build(input_shape)

    def call(self, x):
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + self.conv2(keras.ops.relu(self.conv1(x)))

    def compute_output_shape(self, input_shape):
        return self.conv1.compute_output_shape(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters, "strides": self.strides,
                "project": self.project}


def _cifar_resnet(num_blocks: int, style: str) -> keras.Model:
    """wn_resnet's layout and layer names, its residual sums written in `style`."""
    keras.utils.set_random_seed(SEED)
    if style == "add":
        # Imported here: benchmarks.graph_models imports keras and numpy only at module level.
        from keras_goodinit.models import wn_resnet

        return wn_resnet(CIFAR_SHAPE, 10, num_blocks, init="orthogonal", weight_norm=False,
                         seed=SEED)
    inputs = keras.Input(CIFAR_SHAPE, name="inputs")
    x = _conv(16, "stem")(inputs)
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(1, num_blocks + 1):
            prefix = f"stage{stage}_block{block}"
            strides = 2 if stage > 1 and block == 1 else 1
            project = strides != 1 or x.shape[-1] != filters
            if style == "custom":
                x = ResidualBlock(filters, strides, project, name=prefix)(x)
                continue
            skip = _conv(filters, f"{prefix}_shortcut", 1, strides)(x) if project else x
            y = _conv(filters, f"{prefix}_conv1", strides=strides)(x)
            y = keras.layers.ReLU(name=f"{prefix}_conv1_relu")(y)
            y = _conv(filters, f"{prefix}_conv2")(y)
            x = skip + y if style == "plus" else keras.ops.add(skip, y)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    logits = keras.layers.Dense(10, kernel_initializer="orthogonal", name="classifier")(x)
    return keras.Model(inputs, logits, name=f"resnet{6 * num_blocks + 2}_{style}")


# --- keras.applications ---------------------------------------------------------------


def _application(name: str, **kwargs) -> Callable[[], keras.Model]:
    def build() -> keras.Model:
        keras.utils.set_random_seed(SEED)
        return getattr(keras.applications, name)(
            weights=None, input_shape=CIFAR_SHAPE, classes=10, classifier_activation=None,
            **kwargs)

    return build


# --- MLPs and reproducers -------------------------------------------------------------


def _mlp(activation: str, depth: int = 50, width: int = 256) -> Callable[[], keras.Model]:
    def build() -> keras.Model:
        keras.utils.set_random_seed(SEED)
        inputs = keras.Input((width,))
        h = inputs
        for index in range(depth):
            h = keras.layers.Dense(width, activation=activation, name=f"dense{index}")(h)
        return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h),
                           name=f"mlp{depth}_{activation}")

    return build


def mha_times_two() -> keras.Model:
    """The issue's crash reproducer: an op node (`* 2.0`) and a subclassed layer's kernels."""
    keras.utils.set_random_seed(SEED)
    inputs = keras.Input((8, 16))
    h = inputs * 2.0
    h = keras.layers.MultiHeadAttention(2, 8)(h, h)
    return keras.Model(inputs, keras.layers.Dense(4)(h), name="mha_times_two")


def _pixels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Integer pixel values 0..255, as floats."""
    return rng.integers(0, 256, size=shape).astype("float32")


def rescaling_tanh(depth: int = 4, width: int = 64) -> keras.Model:
    """0-255 inputs mapped to [-1, 1] by `Rescaling`, then tanh layers: inputs not zero-mean."""
    keras.utils.set_random_seed(SEED)
    inputs = keras.Input((width,))
    h = keras.layers.Rescaling(1 / 127.5, offset=-1, name="rescaling")(inputs)
    for index in range(depth):
        h = keras.layers.Dense(width, activation="tanh", name=f"dense{index}")(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name="rescaling_tanh")


def _residual_mlp(name: str, num_blocks: int, sum_of: Callable, width: int = 64
                  ) -> keras.Model:
    """A Dense stem, `num_blocks` residual sums `sum_of(h, block)`, Dense(10) logits."""
    keras.utils.set_random_seed(SEED)
    inputs = keras.Input((width,))
    h = keras.layers.Dense(width, name="stem")(inputs)
    for block in range(1, num_blocks + 1):
        h = sum_of(h, f"block{block}", width)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name=name)


def _branch(h, prefix: str, width: int):
    h = keras.layers.Dense(width, activation="relu", name=f"{prefix}_dense1")(h)
    return keras.layers.Dense(width, name=f"{prefix}_dense2")(h)


def scaled_branch(num_blocks: int = 4) -> keras.Model:
    """`h + 0.1 * f(h)`: a constant factor on the branch."""
    return _residual_mlp("scaled_branch", num_blocks,
                         lambda h, prefix, width: h + 0.1 * _branch(h, prefix, width))


def three_input_add(num_blocks: int = 4) -> keras.Model:
    """`Add()([h, f(h), g(h)])`: one skip, two branches, one three-input sum."""
    return _residual_mlp("three_input_add", num_blocks, lambda h, prefix, width: (
        keras.layers.Add(name=f"{prefix}_add")(
            [h, _branch(h, f"{prefix}_f", width), _branch(h, f"{prefix}_g", width)])))


def gated_branch(num_blocks: int = 4) -> keras.Model:
    """`h + sigmoid(gate(h)) * f(h)`: a branch ending in a gate."""
    def gated(h, prefix, width):
        gate = keras.ops.sigmoid(keras.layers.Dense(width, name=f"{prefix}_gate")(h))
        return h + gate * _branch(h, prefix, width)

    return _residual_mlp("gated_branch", num_blocks, gated)


MODELS: dict[str, Spec] = {
    **{f"resnet{6 * n + 2}_{style}": Spec(
        lambda n=n, style=style: _cifar_resnet(n, style), CIFAR_SHAPE, 3 * n, "resnet")
       for n in (9, 18) for style in CIFAR_STYLES},
    "convnext_tiny": Spec(_application("ConvNeXtTiny", include_preprocessing=False),
                          CIFAR_SHAPE, 18, "application"),
    "resnet50v2": Spec(_application("ResNet50V2"), CIFAR_SHAPE, 16, "application"),
    "densenet121": Spec(_application("DenseNet121"), CIFAR_SHAPE, 0, "application"),
    "mobilenetv3_small": Spec(_application("MobileNetV3Small", include_preprocessing=False,
                                           minimalistic=False), CIFAR_SHAPE, 6, "application"),
    **{f"mlp50_{activation}": Spec(_mlp(activation), (256,), 0, "mlp")
       for activation in ("gelu", "silu", "tanh")},
    "mha_times_two": Spec(mha_times_two, (8, 16), 0, "reproducer"),
    "rescaling_tanh": Spec(rescaling_tanh, (64,), 0, "reproducer", data=_pixels),
    "scaled_branch": Spec(scaled_branch, (64,), 4, "reproducer"),
    "three_input_add": Spec(three_input_add, (64,), 4, "reproducer"),
    "gated_branch": Spec(gated_branch, (64,), 4, "reproducer"),
}
