"""Model builders for the experiments of Arpit et al. (2019).

Every builder returns a functional `keras.Model` that outputs logits. Hidden
layers are optionally wrapped in `WeightNormalization`; the final classifier
never is. Each kernel's initializer follows the layer's role: `GoodInit` gives
every output unit's fan-in vector the norm `g = sqrt(gamma * C_in / C_out)`,
with `gamma` set by what follows the layer (a ReLU halves the second moment,
hence 2; each of the N residual branches of a stage adds to the stream's
variance, hence 1/N for their last layer):

| role | where | proposed gamma |
|---|---|---|
| `"relu"` | hidden MLP/CNN layers, first conv of a residual branch | 2 |
| `"linear"` | stem conv (no ReLU after it), 1x1 projections, classifier | 1 |
| `"residual"` | last conv of a residual branch | 1/N, N = blocks per stage |
"""

from __future__ import annotations

import keras
import numpy as np

from keras_goodinit import _validate
from keras_goodinit.initializers import GoodInit
from keras_goodinit.weight_norm import WeightNormalization

INITS = (
    "he",
    "orthogonal",
    "he_proposed",
    "orthogonal_proposed",
    "he_datadep",
    "orthogonal_datadep",
    "lsuv",
)

# init name -> (direction distribution, whether the kernel follows the proposed rule)
_INIT_KINDS = {
    "he": ("normal", False),
    "orthogonal": ("orthogonal", False),
    "he_proposed": ("normal", True),
    "orthogonal_proposed": ("orthogonal", True),
    # The data-dependent and LSUV inits start from the baseline kernels; the caller
    # then runs `weightnorm_data_init` or `lsuv_init`.
    "he_datadep": ("normal", False),
    "orthogonal_datadep": ("orthogonal", False),
    "lsuv": ("orthogonal", False),
}
_SCHEMES = {"relu": "wn_relu", "linear": "wn_linear", "residual": "wn_residual"}

def _kernel_initializer(init: str, role: str, *, wrapped: bool, num_blocks: int | None,
                        seed: int | None) -> keras.initializers.Initializer:
    """The one place mapping (init name, layer role) to a kernel initializer."""
    distribution, proposed = _INIT_KINDS[init]
    if proposed:
        return GoodInit(_SCHEMES[role], num_blocks=num_blocks if role == "residual" else None,
                        distribution=distribution, seed=seed)
    if wrapped:
        # "Default WN": unit-norm fan-in vectors, so every unit starts at g = 1.
        return GoodInit("wn_relu_backward", gamma=1.0, distribution=distribution, seed=seed)
    if distribution == "normal":
        return keras.initializers.HeNormal(seed=seed)
    return keras.initializers.Orthogonal(seed=seed)


def _positive_int(name: str, value) -> int:
    return _validate.integer(name, value, minimum=1, expected="a positive int")


def _check_input_shape(input_shape, ranks: tuple[int, ...] | None) -> tuple[int, ...]:
    """`ranks=None` accepts any rank >= 1."""
    length = "" if ranks is None else f" of length {' or '.join(map(str, ranks))}"
    expected = ("a non-empty tuple of positive ints (without the batch dimension)"
                f"{length}")
    return _validate.shape("input_shape", input_shape, min_rank=1, ranks=ranks,
                           expected=expected)


class _Builder:
    """Makes the layers of one model: settings, per-layer seeds and the layer recipe."""

    def __init__(self, init: str, weight_norm: bool, batch_norm: bool, seed: int | None,
                 conv_rank: int = 2):
        _validate.one_of("init", init, INITS)
        weight_norm = _validate.boolean("weight_norm", weight_norm)
        batch_norm = _validate.boolean("batch_norm", batch_norm)
        seed = _validate.seed(seed)
        self.init = init
        self.weight_norm = weight_norm
        self.batch_norm = batch_norm
        # One stream of per-layer seeds: reproducible for an int, fresh kernels for None.
        self._rng = None if seed is None else np.random.default_rng(seed)
        self._conv = keras.layers.Conv1D if conv_rank == 1 else keras.layers.Conv2D
        self._pool = (keras.layers.GlobalAveragePooling1D if conv_rank == 1
                      else keras.layers.GlobalAveragePooling2D)

    def _next_seed(self) -> int | None:
        return None if self._rng is None else int(self._rng.integers(0, 2**31 - 1))

    def layer(self, x, units: int, *, name: str, role: str, relu: bool = False,
              kernel_size: int | None = None, strides: int = 1, num_blocks: int | None = None,
              classifier: bool = False):
        """Dense (kernel_size None) or conv, maybe weight-normalized, maybe + BN, maybe + ReLU."""
        wrapped = self.weight_norm and not classifier
        initializer = _kernel_initializer(self.init, role, wrapped=wrapped,
                                          num_blocks=num_blocks, seed=self._next_seed())
        inner_name = f"{name}_inner" if wrapped else name
        if kernel_size is None:
            layer = keras.layers.Dense(units, kernel_initializer=initializer, name=inner_name)
        else:
            layer = self._conv(units, kernel_size, strides=strides, padding="same",
                               kernel_initializer=initializer, name=inner_name)
        if wrapped:
            layer = WeightNormalization(layer, name=name)
        x = layer(x)
        if self.batch_norm and not classifier:
            x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
        if relu:
            # A separate ReLU layer, so LSUV and signal reports see pre-activations.
            x = keras.layers.ReLU(name=f"{name}_relu")(x)
        return x

    def classifier(self, x, num_classes: int):
        return self.layer(x, num_classes, name="classifier", role="linear", classifier=True)

    def pool(self, x):
        return self._pool(name="pool")(x)


def _check_builder_args(input_shape, num_classes, ranks, *positive) -> tuple:
    """`(input_shape, num_classes, *positive)` as plain ints; `positive` are (name, value)."""
    return (_check_input_shape(input_shape, ranks), _positive_int("num_classes", num_classes),
            *(_positive_int(name, value) for name, value in positive))


def wn_mlp(input_shape: tuple[int, ...], num_classes: int, depth: int, width: int = 128, *,
           init: str = "orthogonal_proposed", weight_norm: bool = True,
           batch_norm: bool = False, seed: int | None = None) -> keras.Model:
    """Builds the weight-normalized ReLU MLP of Arpit et al. (2019).

    Inputs of rank > 1 are flattened, then `depth` hidden Dense layers of
    `width` units with ReLU, then a Dense classifier that outputs logits.

    Examples:

    >>> model = wn_mlp((28, 28, 1), num_classes=10, depth=20)
    >>> logits = model(keras.ops.zeros((2, 28, 28, 1)))

    Args:
        input_shape: Shape of one example, without the batch dimension.
        num_classes: Number of logits.
        depth: Number of hidden layers.
        width: Units of every hidden layer.
        init: One of `INITS`. The `*_proposed` inits follow the paper; `"he"`
            and `"orthogonal"` are the baselines (with `weight_norm=True`,
            "default WN": `g = 1` for every unit); `"*_datadep"` and `"lsuv"`
            give baseline kernels that the caller then passes to
            `weightnorm_data_init` or `lsuv_init`.
        weight_norm: Wrap every hidden layer in `WeightNormalization`. The
            classifier is never wrapped.
        batch_norm: Put `BatchNormalization` after every hidden layer (before
            its ReLU).
        seed: An int makes the model reproducible (each layer gets its own
            seed derived from it); `None` gives fresh random kernels.

    Returns:
        A functional `keras.Model` named `wn_mlp_{depth}`.

    Reference:
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
    """
    input_shape, num_classes, depth, width = _check_builder_args(
        input_shape, num_classes, None, ("depth", depth), ("width", width))
    builder = _Builder(init, weight_norm, batch_norm, seed)
    inputs = keras.Input(input_shape, name="inputs")
    x = keras.layers.Flatten(name="flatten")(inputs) if len(input_shape) > 1 else inputs
    for i in range(1, depth + 1):
        x = builder.layer(x, width, name=f"dense{i}", role="relu", relu=True)
    return keras.Model(inputs, builder.classifier(x, num_classes), name=f"wn_mlp_{depth}")


def wn_cnn(input_shape: tuple[int, ...], num_classes: int, depth: int, width: int = 128, *,
           init: str = "orthogonal_proposed", weight_norm: bool = True,
           batch_norm: bool = False, seed: int | None = None) -> keras.Model:
    """Builds the plain weight-normalized ReLU CNN of Arpit et al. (2019).

    `depth` 3x3 convolutions of `width` channels, each followed by a ReLU, the
    first two with stride 2; then global average pooling and a Dense
    classifier that outputs logits. A rank-2 `input_shape` (length, channels)
    gives 1D convolutions, a rank-3 one (height, width, channels) 2D ones.

    Examples:

    >>> model = wn_cnn((32, 32, 3), num_classes=10, depth=25)
    >>> logits = model(keras.ops.zeros((2, 32, 32, 3)))

    Args:
        input_shape: `(height, width, channels)` or `(length, channels)`.
        num_classes: Number of logits.
        depth: Number of conv layers.
        width: Channels of every conv layer.
        init: One of `INITS` (see `wn_mlp`).
        weight_norm: Wrap every conv in `WeightNormalization`; the classifier
            is never wrapped.
        batch_norm: Put `BatchNormalization` after every conv (before its ReLU).
        seed: An int for a reproducible model, `None` for fresh kernels.

    Returns:
        A functional `keras.Model` named `wn_cnn_{depth}`.

    Reference:
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
    """
    input_shape, num_classes, depth, width = _check_builder_args(
        input_shape, num_classes, (2, 3), ("depth", depth), ("width", width))
    builder = _Builder(init, weight_norm, batch_norm, seed, conv_rank=len(input_shape) - 1)
    inputs = keras.Input(input_shape, name="inputs")
    x = inputs
    for i in range(1, depth + 1):
        x = builder.layer(x, width, name=f"conv{i}", role="relu", relu=True, kernel_size=3,
                          strides=2 if i <= 2 else 1)
    x = builder.pool(x)
    return keras.Model(inputs, builder.classifier(x, num_classes), name=f"wn_cnn_{depth}")


def _residual_network(builder: _Builder, input_shape, num_classes: int, stem_width: int,
                      stage_widths: tuple[int, ...], num_blocks: int, name: str) -> keras.Model:
    """Stem conv, stages of basic blocks (no ReLU after the addition), pool, classifier."""
    inputs = keras.Input(input_shape, name="inputs")
    # No ReLU after the stem: its output starts the residual stream, so gamma = 1.
    x = builder.layer(inputs, stem_width, name="stem", role="linear", kernel_size=3)
    for stage, filters in enumerate(stage_widths, start=1):
        for block in range(1, num_blocks + 1):
            prefix = f"stage{stage}_block{block}"
            strides = 2 if stage > 1 and block == 1 else 1
            shortcut = x
            if strides != 1 or x.shape[-1] != filters:
                shortcut = builder.layer(x, filters, name=f"{prefix}_shortcut", role="linear",
                                         kernel_size=1, strides=strides)
            y = builder.layer(x, filters, name=f"{prefix}_conv1", role="relu", relu=True,
                              kernel_size=3, strides=strides)
            y = builder.layer(y, filters, name=f"{prefix}_conv2", role="residual",
                              kernel_size=3, num_blocks=num_blocks)
            x = keras.layers.Add(name=f"{prefix}_add")([shortcut, y])
    x = builder.pool(x)
    return keras.Model(inputs, builder.classifier(x, num_classes), name=name)


def wn_resnet(input_shape: tuple[int, ...], num_classes: int, num_blocks: int, width: int = 16,
              *, init: str = "orthogonal_proposed", weight_norm: bool = True,
              batch_norm: bool = False, seed: int | None = None) -> keras.Model:
    """Builds a weight-normalized CIFAR ResNet of depth `6 * num_blocks + 2`.

    A 3x3 stem conv of `width` channels (no ReLU after it), then 3 stages of
    `num_blocks` basic blocks `h <- shortcut(h) + conv(relu(conv(h)))` with
    `width`, `2 * width` and `4 * width` channels, stride 2 at the start of
    stages 2 and 3, a 1x1 projection shortcut where the shape changes and no
    ReLU after the addition; then global average pooling and a Dense
    classifier that outputs logits. `num_blocks=9` is ResNet-56,
    `num_blocks=18` ResNet-110.

    Layers are named `stem`, `stage{s}_block{b}_conv1`, `..._conv2`,
    `..._shortcut`, `..._add` and `classifier`.

    Examples:

    >>> resnet56 = wn_resnet((32, 32, 3), num_classes=10, num_blocks=9)
    >>> logits = resnet56(keras.ops.zeros((2, 32, 32, 3)))

    Args:
        input_shape: `(height, width, channels)` or `(length, channels)`.
        num_classes: Number of logits.
        num_blocks: Basic blocks per stage (N of the `1/N` residual gamma).
        width: Channels of the stem and the first stage.
        init: One of `INITS` (see `wn_mlp`).
        weight_norm: Wrap every conv in `WeightNormalization`; the classifier
            is never wrapped.
        batch_norm: Put `BatchNormalization` after every conv (before the ReLU
            of a branch's first conv, after its last conv, after the stem and
            the projections).
        seed: An int for a reproducible model, `None` for fresh kernels.

    Returns:
        A functional `keras.Model` named `wn_resnet_{6 * num_blocks + 2}`.

    Reference:
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
        - [He et al., 2016](https://arxiv.org/abs/1512.03385)
    """
    input_shape, num_classes, num_blocks, width = _check_builder_args(
        input_shape, num_classes, (2, 3), ("num_blocks", num_blocks), ("width", width))
    builder = _Builder(init, weight_norm, batch_norm, seed, conv_rank=len(input_shape) - 1)
    return _residual_network(builder, input_shape, num_classes, width,
                             (width, 2 * width, 4 * width), num_blocks,
                             name=f"wn_resnet_{6 * num_blocks + 2}")


def wn_wide_resnet(input_shape: tuple[int, ...], num_classes: int, n: int, k: int, *,
                   init: str = "orthogonal_proposed", weight_norm: bool = True,
                   batch_norm: bool = False, seed: int | None = None) -> keras.Model:
    """Builds a weight-normalized wide ResNet WRN-(6n+4)-k.

    A 3x3 stem conv of 16 channels (no ReLU after it), then 3 stages of `n`
    basic blocks with `16k`, `32k` and `64k` channels (the same blocks as
    `wn_resnet`: no ReLU after the addition, 1x1 projection where the shape
    changes, stride 2 at the start of stages 2 and 3), global average pooling
    and a Dense classifier that outputs logits. `n=6, k=10` is WRN-40-10.

    Examples:

    >>> wrn = wn_wide_resnet((32, 32, 3), num_classes=10, n=6, k=10)  # WRN-40-10

    Args:
        input_shape: `(height, width, channels)` or `(length, channels)`.
        num_classes: Number of logits.
        n: Basic blocks per stage (N of the `1/N` residual gamma).
        k: Widening factor.
        init: One of `INITS` (see `wn_mlp`).
        weight_norm: Wrap every conv in `WeightNormalization`; the classifier
            is never wrapped.
        batch_norm: Put `BatchNormalization` after every conv (see `wn_resnet`).
        seed: An int for a reproducible model, `None` for fresh kernels.

    Returns:
        A functional `keras.Model` named `wrn_{6n+4}_{k}`.

    Reference:
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
        - [Zagoruyko & Komodakis, 2016](https://arxiv.org/abs/1605.07146)
    """
    input_shape, num_classes, n, k = _check_builder_args(input_shape, num_classes, (2, 3),
                                                         ("n", n), ("k", k))
    builder = _Builder(init, weight_norm, batch_norm, seed, conv_rank=len(input_shape) - 1)
    return _residual_network(builder, input_shape, num_classes, 16, (16 * k, 32 * k, 64 * k), n,
                             name=f"wrn_{6 * n + 4}_{k}")
