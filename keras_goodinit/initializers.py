"""Mean-field initializers for weight-normalized networks (Arpit et al., 2019)."""

from __future__ import annotations

import math

import keras
from keras import ops
from keras.saving import deserialize_keras_object, serialize_keras_object

from keras_goodinit import _layouts

SCHEMES = ("wn_relu", "wn_linear", "wn_residual", "wn_hanin", "wn_relu_backward")
DISTRIBUTIONS = ("orthogonal", "normal")


def _positive_int(name: str, value, scheme: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"Scheme {scheme!r} requires `{name}` to be a positive integer. "
            f"Received: {name}={value!r}"
        )
    return value


def scheme_gamma(scheme: str, *, num_blocks: int | None = None,
                 block_index: int | None = None) -> float:
    """The gain gamma of science.md §1 for a scheme: `g = sqrt(gamma * fan_in / fan_out)`."""
    if scheme not in SCHEMES:
        raise ValueError(
            f"Invalid value for argument `scheme`. Expected one of {SCHEMES}. "
            f"Received: scheme={scheme!r}"
        )
    if scheme == "wn_residual":
        return 1.0 / _positive_int("num_blocks", num_blocks, scheme)
    if scheme == "wn_hanin":
        return 0.81 ** _positive_int("block_index", block_index, scheme)
    return 1.0 if scheme == "wn_linear" else 2.0


@keras.saving.register_keras_serializable(package="keras_goodinit")
class GoodInit(keras.initializers.Initializer):
    """Mean-field initializer for (weight-normalized) ReLU networks and ResNets.

    Every output unit's fan-in vector gets the same L2 norm
    `g = sqrt(gamma * fan_in / fan_out)`, with `fan_in / fan_out = C_in / C_out`
    (the kernel size cancels), and a random direction: orthonormal across units
    when there are no more units than fan-in entries, or Gaussian. Wrapping the
    layer in `WeightNormalization` keeps these norms as the initial `g`, so the
    same kernel gives the paper's proposed init with and without the wrapper.

    | scheme | gamma | use it for |
    |---|---|---|
    | `"wn_relu"` | 2 | layers followed by a ReLU |
    | `"wn_linear"` | 1 | layers with no non-linearity after them |
    | `"wn_residual"` | 1/num_blocks | last layer of a residual branch |
    | `"wn_hanin"` | 0.81**block_index | the stage-wise Hanin baseline |
    | `"wn_relu_backward"` | 2 | `g = sqrt(gamma)` whatever the fans |

    Unlike Keras' built-in initializers, `seed=None` (or a
    `keras.random.SeedGenerator`) gives fresh values on every call, so layers
    that share one instance get different kernels. An int seed gives the same
    kernel on every call, for reproducibility.

    Examples:

    >>> init = GoodInit("wn_relu", seed=0)
    >>> kernel = init(shape=(64, 32))
    >>> layer = keras.layers.Dense(32, activation="relu", kernel_initializer=init)
    >>> last = GoodInit("wn_residual", num_blocks=9)

    Args:
        scheme: One of `"wn_relu"`, `"wn_linear"`, `"wn_residual"`,
            `"wn_hanin"`, `"wn_relu_backward"`.
        num_blocks: Residual blocks per stage; required by `"wn_residual"`.
        block_index: 1-based index of the block within its stage; required by
            `"wn_hanin"`.
        gamma: Overrides the scheme's gamma. Must be positive.
        distribution: `"orthogonal"` (default) or `"normal"` directions.
        layout: Where the output units sit in the kernel: `"default"` (last
            axis: Dense, ConvND), `"conv_transpose"` (axis -2) or
            `"depthwise"` (the last two axes). An initializer only sees the
            shape, so the caller must say which applies.
        seed: An int for reproducible kernels, `None` or a
            `keras.random.SeedGenerator` for fresh kernels on every call.

    Reference:
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
    """

    def __init__(
        self,
        scheme: str = "wn_relu",
        *,
        num_blocks: int | None = None,
        block_index: int | None = None,
        gamma: float | None = None,
        distribution: str = "orthogonal",
        layout: str = "default",
        seed: int | keras.random.SeedGenerator | None = None,
    ):
        if isinstance(seed, dict):
            seed = deserialize_keras_object(seed)
        if seed is not None and (isinstance(seed, bool)
                                 or not isinstance(seed, (int, keras.random.SeedGenerator))):
            raise ValueError(
                "Argument `seed` must be an int, None or a keras.random.SeedGenerator. "
                f"Received: seed={seed!r}"
            )
        if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float))
                                  or not math.isfinite(gamma) or gamma <= 0):
            raise ValueError(
                f"Argument `gamma` must be a positive finite number. Received: gamma={gamma!r}"
            )
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"Invalid value for argument `distribution`. Expected one of {DISTRIBUTIONS}. "
                f"Received: distribution={distribution!r}"
            )
        scheme_value = scheme_gamma(scheme, num_blocks=num_blocks, block_index=block_index)
        self.scheme = scheme
        self.num_blocks = num_blocks
        self.block_index = block_index
        self.gamma = float(gamma) if gamma is not None else scheme_value
        self._gamma_arg = gamma
        self.distribution = distribution
        self.layout = _layouts.check_layout(layout)
        self.seed = seed

    def unit_norm(self, shape) -> float:
        """The norm `g` that every unit's fan-in vector gets for this shape."""
        if self.scheme == "wn_relu_backward":
            return math.sqrt(self.gamma)
        fan_in, fan_out = _layouts.channel_fans(tuple(shape), self.layout)
        return math.sqrt(self.gamma * fan_in / fan_out)

    def __call__(self, shape, dtype=None):
        return self.draw(shape, dtype)

    def draw(self, shape, dtype=None, *, count: int | None = None):
        """Like calling the initializer; with `count`, that many kernels stacked on axis 0.

        The stacked kernels come from one batched factorization, which is much
        faster than `count` calls when many layers share a kernel shape.
        """
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2:
            raise ValueError(
                "GoodInit needs a kernel shape of rank >= 2 (fan-in and fan-out). "
                f"Received: shape={shape}"
            )
        if self.layout == "depthwise" and len(shape) < 3:
            raise ValueError(
                "layout='depthwise' needs a kernel shape (*kernel_size, channels, "
                f"multiplier) of rank >= 3. Received: shape={shape}"
            )
        dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
        if not keras.backend.is_float_dtype(dtype):
            raise ValueError(f"GoodInit only makes float kernels. Received: dtype={dtype}")
        if any(d <= 0 for d in shape):
            raise ValueError(
                f"Every dimension of `shape` must be positive. Received: shape={shape}")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                  or count < 1):
            raise ValueError(f"Argument `count` must be a positive int. Received: count={count!r}")

        axes = _layouts.norm_axes(len(shape), self.layout)
        units = [i for i in range(len(shape)) if i not in axes]
        # Lay the kernel out as (fan_in, units), the layout QR and the norms work on.
        perm = list(axes) + units
        moved = [shape[i] for i in perm]
        fan_in = math.prod(moved[: len(axes)])
        n_units = math.prod(moved[len(axes):])
        lead = () if count is None else (count,)
        # Draw and factor in float32 at least: QR in half precision is inaccurate.
        work_dtype = "float64" if dtype == "float64" else "float32"
        matrix = self._directions(lead, fan_in, n_units, work_dtype)
        norms = ops.sqrt(ops.sum(ops.square(matrix), axis=-2, keepdims=True))
        matrix = matrix * (self.unit_norm(shape) / norms)
        offset = len(lead)
        kernel = ops.transpose(ops.reshape(matrix, lead + tuple(moved)),
                               list(range(offset)) + [offset + i for i in _inverse(perm)])
        return ops.cast(kernel, dtype)

    def _directions(self, lead: tuple[int, ...], fan_in: int, n_units: int, dtype: str):
        if self.distribution == "normal":
            return keras.random.normal(lead + (fan_in, n_units), dtype=dtype, seed=self.seed)
        tall = fan_in >= n_units
        sample = keras.random.normal(lead + (max(fan_in, n_units), min(fan_in, n_units)),
                                     dtype=dtype, seed=self.seed)
        q, r = ops.qr(sample)
        # The sign fix makes Q Haar-distributed rather than biased by QR's convention.
        q = q * ops.expand_dims(ops.sign(ops.diagonal(r, axis1=-2, axis2=-1)), -2)
        return q if tall else ops.swapaxes(q, -1, -2)

    def get_config(self) -> dict:
        return {
            "scheme": self.scheme,
            "num_blocks": self.num_blocks,
            "block_index": self.block_index,
            "gamma": self._gamma_arg,
            "distribution": self.distribution,
            "layout": self.layout,
            "seed": serialize_keras_object(self.seed),
        }


def _inverse(perm: list[int]) -> list[int]:
    inverse = [0] * len(perm)
    for position, axis in enumerate(perm):
        inverse[axis] = position
    return inverse
