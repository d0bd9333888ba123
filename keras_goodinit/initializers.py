"""Mean-field initializers for weight-normalized networks (Arpit et al., 2019)."""

from __future__ import annotations

import math

import keras
import ml_dtypes
import numpy as np
from keras import ops
from keras.saving import deserialize_keras_object, serialize_keras_object

from keras_goodinit import _backend, _layouts, _validate

SCHEMES = ("wn_relu", "wn_linear", "wn_residual", "wn_hanin", "wn_relu_backward")
DISTRIBUTIONS = ("orthogonal", "normal", "delta_orthogonal")


def _scheme_count(name: str, value, scheme: str) -> int:
    return _validate.integer(name, value, minimum=1,
                             expected=f"a positive int (scheme {scheme!r} requires it)")


def scheme_gamma(scheme: str, *, num_blocks: int | None = None,
                 block_index: int | None = None) -> float:
    """The gain `gamma` of a scheme, in `g = sqrt(gamma * C_in / C_out)`.

    `g` is the L2 norm that every output unit's fan-in vector gets. The mean
    field analysis of Arpit et al. (2019) gives `gamma = 2` for a layer
    followed by a ReLU (it halves the second moment), `gamma = 1` for a
    linear layer, and `gamma = 1 / num_blocks` for the last layer of each of
    the `num_blocks` residual branches of a stage, so that the stage's output
    variance stays that of its input. `"wn_hanin"` is the baseline of Hanin &
    Rolnick (2018), `gamma = 0.81 ** block_index`.

    Examples:

    >>> scheme_gamma("wn_relu")
    2.0
    >>> scheme_gamma("wn_residual", num_blocks=4)
    0.25

    Args:
        scheme: One of `SCHEMES`.
        num_blocks: Residual blocks per stage; required by `"wn_residual"`,
            ignored otherwise.
        block_index: 1-based index of the block in its stage; required by
            `"wn_hanin"`, ignored otherwise.

    Returns:
        `gamma` as a positive Python float.

    Reference:
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
        - [Hanin & Rolnick, 2018](https://arxiv.org/abs/1803.01719)
    """
    _validate.one_of("scheme", scheme, SCHEMES)
    if scheme == "wn_residual":
        num_blocks = _scheme_count("num_blocks", num_blocks, scheme)
        try:
            gamma = 1.0 / num_blocks
        except OverflowError:  # an int too large for a float
            gamma = 0.0
        if gamma == 0.0:
            raise ValueError(
                f"Argument `num_blocks` is so large that gamma = 1/num_blocks underflows to 0. "
                f"Received: num_blocks={num_blocks!r}")
        return gamma
    if scheme == "wn_hanin":
        block_index = _scheme_count("block_index", block_index, scheme)
        try:
            gamma = 0.81 ** block_index
        except OverflowError:  # an int too large for a float
            gamma = 0.0
        if gamma == 0.0:
            raise ValueError(
                "Argument `block_index` is so large that gamma = 0.81**block_index underflows "
                f"to 0. Received: block_index={block_index!r}")
        return gamma
    return 1.0 if scheme == "wn_linear" else 2.0


def _check_seed(seed):
    if isinstance(seed, dict):
        seed = deserialize_keras_object(seed)
    if isinstance(seed, keras.random.SeedGenerator):
        return seed
    return _validate.integer("seed", seed, minimum=0, allow_none=True,
                             expected="a non-negative int, None or a keras.random.SeedGenerator")


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

    Once `keras_goodinit` is imported, Keras finds the initializer by name:
    `keras.initializers.get("GoodInit")` and
    `keras.initializers.get({"class_name": "GoodInit", "config": {...}})`
    work, and so does `kernel_initializer="GoodInit"`.

    `distribution="delta_orthogonal"` gives the delta-orthogonal kernels of
    Xiao et al. (2018), with which vanilla CNNs (no skips, no normalization)
    of 10,000 layers train: every spatial tap is zero except the centre one,
    index `(k - 1) // 2` along each spatial axis, which holds an orthogonal
    `(C_in, C_out)` matrix `H`. With `padding="same"` and stride 1 the
    convolution then maps each position's channels by `x -> x @ H`, like an
    orthogonal Dense layer, at the borders too. When `C_in >= C_out` the
    columns of `H` are orthogonal with norm `g`, as for `"orthogonal"`. When
    `C_in < C_out` columns cannot be both orthogonal and of equal norm: the
    rows are kept orthogonal, `H H^T = c^2 I`, with the one factor
    `c = g sqrt(C_out / C_in)` that makes the mean squared unit norm `g^2`;
    the unit norms then differ from `g`, but the layer is an exact isometry
    (times `c`), which is what signal propagation through thousands of such
    layers needs. With `layout="depthwise"` each unit's centre tap is `+-g`.
    A rank-2 kernel (Dense) has no taps: it gets exactly the `"orthogonal"`
    kernel of the same seed.

    Examples:

    >>> init = GoodInit("wn_relu", seed=0)
    >>> kernel = init(shape=(64, 32))
    >>> layer = keras.layers.Dense(32, activation="relu", kernel_initializer=init)
    >>> last = GoodInit("wn_residual", num_blocks=9)
    >>> same = keras.initializers.get({"class_name": "GoodInit",
    ...                                "config": {"scheme": "wn_linear"}})

    A delta-orthogonal convolution keeps the norm of every position's channels,
    at the borders too:

    >>> delta = GoodInit("wn_linear", distribution="delta_orthogonal", seed=0)
    >>> conv = keras.layers.Conv2D(16, 3, padding="same", use_bias=False,
    ...                            kernel_initializer=delta)
    >>> x = keras.random.normal((2, 8, 8, 16), seed=1)
    >>> gain = keras.ops.norm(conv(x), axis=-1) / keras.ops.norm(x, axis=-1)
    >>> bool(keras.ops.all(keras.ops.abs(gain - 1.0) < 1e-5))
    True

    Args:
        scheme: One of `"wn_relu"`, `"wn_linear"`, `"wn_residual"`,
            `"wn_hanin"`, `"wn_relu_backward"`.
        num_blocks: Residual blocks per stage, a positive int; required by
            `"wn_residual"`, ignored by the other schemes.
        block_index: 1-based index of the block within its stage, a positive
            int; required by `"wn_hanin"`, ignored by the other schemes.
        gamma: Overrides the scheme's gamma. A positive finite number; when
            a kernel is drawn, `g` must also be representable in the
            kernel's dtype (see `draw`).
        distribution: `"orthogonal"` (default) or `"normal"` directions, or
            `"delta_orthogonal"` convolution kernels (see above).
            Orthogonal directions are Haar-distributed (the QR of a Gaussian
            sample), except for kernels so large that the QR would cost more
            than 1e10 flops (`m n^2`, e.g. a 4608 x 4096 Dense): those get a
            structured random orthogonal matrix, exactly orthonormal and
            spread like a Haar one, at `O(n m log m)`. A delta-orthogonal
            kernel's centre matrix is drawn the same way.
        layout: Where the output units sit in the kernel: `"default"` (last
            axis: Dense, ConvND), `"conv_transpose"` (axis -2) or
            `"depthwise"` (the last two axes). An initializer only sees the
            shape, so the caller must say which applies.
        seed: A non-negative int for reproducible kernels, `None` or a
            `keras.random.SeedGenerator` for fresh kernels on every call.

    NumPy scalars are accepted wherever a Python int or float is.

    Reference:
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
        - [Xiao, Bahri, Sohl-Dickstein, Schoenholz & Pennington, 2018](https://arxiv.org/abs/1806.05393):
          Dynamical Isometry and a Mean Field Theory of CNNs, Algorithm 2
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
        seed = _check_seed(seed)
        gamma = _validate.number("gamma", gamma, positive=True, allow_none=True,
                                 expected="a positive finite number or None")
        _validate.one_of("distribution", distribution, DISTRIBUTIONS)
        scheme_value = scheme_gamma(scheme, num_blocks=num_blocks, block_index=block_index)
        self.scheme = scheme
        # Validated (and made plain ints) by `scheme_gamma` where the scheme uses them.
        self.num_blocks = int(num_blocks) if scheme == "wn_residual" else num_blocks
        self.block_index = int(block_index) if scheme == "wn_hanin" else block_index
        self.gamma = gamma if gamma is not None else scheme_value
        self._gamma_arg = gamma
        self.distribution = distribution
        self.layout = _layouts.check_layout(layout)
        self.seed = seed

    def unit_norm(self, shape) -> float:
        """The norm `g` that every unit's fan-in vector gets for this shape.

        For a delta-orthogonal kernel with fewer input than output channels
        it is the root mean square of the unit norms (see the class).
        """
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

        The kernel is finite and has no all-zero unit whenever `g` lies in
        `[tiny * sqrt(n), max / 2]`, with `n` the length of a unit's fan-in
        vector and `tiny`, `max` the smallest normal and the largest finite
        value of `dtype`: no entry exceeds `g` in magnitude (the factor 2
        leaves room for rounding), and the largest entry of a unit is at least
        `g / sqrt(n)`. A `gamma` (or a scheme's gamma) that puts `g` outside
        this range raises a `ValueError` rather than returning an infinite or
        zero kernel. For a delta-orthogonal kernel, `n` counts the centre
        tap's entries only, and a wide centre matrix's factor
        `c = g sqrt(C_out / C_in)` takes the place of `g` in the upper bound.

        Args:
            shape: The kernel shape, a tuple of positive ints of rank >= 2
                (rank >= 3 for `layout="depthwise"`).
            dtype: A float dtype; `keras.config.floatx()` when `None`.
            count: `None` for one kernel, or a positive int.

        Returns:
            A tensor of shape `shape`, or `(count, *shape)`.
        """
        min_rank = 3 if self.layout == "depthwise" else 2
        expected = ("a kernel shape (*kernel_size, channels, multiplier) of rank >= 3 with "
                    "positive int dimensions" if min_rank == 3 else
                    "a kernel shape of rank >= 2 (fan-in and fan-out) with positive int "
                    "dimensions")
        shape = _validate.shape("shape", shape, min_rank=min_rank, expected=expected)
        dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
        if not keras.backend.is_float_dtype(dtype):
            raise ValueError(f"GoodInit only makes float kernels. Received: dtype={dtype}")
        count = _validate.integer("count", count, minimum=1, allow_none=True,
                                  expected="a positive int or None")

        axes = _layouts.norm_axes(len(shape), self.layout)
        units = [i for i in range(len(shape)) if i not in axes]
        # Lay the kernel out as (fan_in, units), the layout QR and the norms work on.
        perm = list(axes) + units
        moved = [shape[i] for i in perm]
        # A delta-orthogonal kernel is non-zero at one spatial tap: its matrix is the
        # kernel there, the norm axes after the spatial ones (the first rank - 2).
        spatial = len(shape) - 2 if self.distribution == "delta_orthogonal" else 0
        fan_in = math.prod(moved[spatial: len(axes)])
        n_units = math.prod(moved[len(axes):])
        wide = spatial > 0 and self.layout != "depthwise" and fan_in < n_units
        # A wide matrix's rows get the norm c = g sqrt(units / fan_in) (`_delta_orthogonal`).
        peak = math.sqrt(n_units / fan_in) if wide else 1.0
        norm = self._checked_unit_norm(shape, dtype, fan_in, peak)
        lead = () if count is None else (count,)
        # Draw and factor in float32 at least: QR in half precision is inaccurate.
        work_dtype = "float64" if dtype == "float64" else "float32"
        if spatial:
            kernel = self._delta_orthogonal(lead, moved, spatial, (fan_in, n_units),
                                            norm * peak, work_dtype)
        else:
            matrix = self._directions(lead, fan_in, n_units, work_dtype)
            norms = ops.sqrt(ops.sum(ops.square(matrix), axis=-2, keepdims=True))
            matrix = matrix * (norm / norms)
            kernel = ops.reshape(matrix, lead + tuple(moved))
        if perm != sorted(perm):  # a transpose copies even when it has nothing to move
            offset = len(lead)
            kernel = ops.transpose(kernel, list(range(offset))
                                   + [offset + i for i in _inverse(perm)])
        return ops.cast(kernel, dtype)

    def _checked_unit_norm(self, shape: tuple[int, ...], dtype: str, fan_in: int,
                           peak: float = 1.0) -> float:
        """`unit_norm(shape)`, or a ValueError when `dtype` cannot hold such a kernel.

        `fan_in` is the number of non-zero entries a unit's vector may have;
        `peak * g` bounds the kernel's largest entry.
        """
        info = ml_dtypes.finfo(dtype)
        low, high = float(info.tiny) * math.sqrt(fan_in), float(info.max) / 2 / peak
        try:
            norm = self.unit_norm(shape)
        except OverflowError:
            norm = math.inf
        if low <= norm <= high:
            return norm
        # g = sqrt(gamma * ratio): the range of gamma that keeps g in [low, high].
        if self.scheme == "wn_relu_backward":
            ratio = 1.0
        else:
            c_in, c_out = _layouts.channel_fans(shape, self.layout)
            ratio = c_in / c_out
        problem = "overflows" if norm > high else "underflows"
        if self._gamma_arg is not None or self.scheme not in ("wn_residual", "wn_hanin"):
            name, value = "gamma", self.gamma
        elif self.scheme == "wn_residual":
            name, value = "num_blocks", self.num_blocks
        else:
            name, value = "block_index", self.block_index
        raise ValueError(
            f"Argument `{name}` gives the units of a {dtype} kernel of shape {shape} the "
            f"norm g = {norm:.3g}, which {problem} {dtype}: a finite kernel with no zero unit "
            f"needs {low:.3g} <= g <= {high:.3g}, i.e. {low * low / ratio:.3g} <= gamma <= "
            f"{high * high / ratio:.3g} for this shape (gamma = {self.gamma:.3g} here). "
            f"Received: {name}={value!r}"
        )

    def _delta_orthogonal(self, lead: tuple[int, ...], moved: list[int], spatial: int,
                          matrix_shape: tuple[int, int], scale: float, dtype: str):
        """A kernel in the `(*k, fan-in, units)` layout, zero except at the centre tap.

        The centre holds a `(fan_in, units)` matrix: orthogonal columns of norm
        `scale` when `fan_in >= units`, else orthogonal rows of norm `scale`;
        for `"depthwise"`, one `+-scale` per unit (each sees one channel).
        """
        fan_in, n_units = matrix_shape
        if self.layout == "depthwise":
            sample = keras.random.normal(lead + (1, n_units), dtype=dtype, seed=self.seed)
            signs = ops.where(ops.convert_to_tensor(sample) < 0, -1.0, 1.0)
            matrix = ops.cast(signs, dtype) * scale
        else:
            matrix = self._directions(lead, fan_in, n_units, dtype)
            # Exact norms along the short side, which QR made orthonormal.
            axis = -2 if fan_in >= n_units else -1
            norms = ops.sqrt(ops.sum(ops.square(matrix), axis=axis, keepdims=True))
            matrix = matrix * (scale / norms)
        centre = ops.reshape(matrix, lead + (1,) * spatial + tuple(moved[spatial:]))
        # Tap (k - 1) // 2 is the one `padding="same"` aligns with each output position
        # (the middle for odd k), so the conv is `x @ matrix` away from the borders.
        mask = np.zeros(tuple(moved[:spatial]) + (1,) * (len(moved) - spatial), dtype=bool)
        mask[tuple((k - 1) // 2 for k in moved[:spatial])] = True
        return ops.where(ops.convert_to_tensor(mask), centre, ops.zeros_like(centre))

    def _directions(self, lead: tuple[int, ...], fan_in: int, n_units: int, dtype: str):
        if self.distribution == "normal":
            return keras.random.normal(lead + (fan_in, n_units), dtype=dtype, seed=self.seed)
        tall = fan_in >= n_units
        m, n = max(fan_in, n_units), min(fan_in, n_units)
        if m * n * n > _STRUCTURED_FLOPS:
            q = _structured_orthonormal(lead, m, n, dtype, self.seed)
        else:
            # The sample is drawn eagerly, exactly as before, so every seed keeps its stream.
            sample = keras.random.normal(lead + (m, n), dtype=dtype, seed=self.seed)
            q = _orthonormal(ops.convert_to_tensor(sample))
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


# CholeskyQR2 is used when the sample has at least this many rows per column.
# A Gaussian (m, n) sample then has condition number about
# (sqrt(m) + sqrt(n)) / (sqrt(m) - sqrt(n)) <= 5.8, its fluctuations above that
# are exponentially unlikely, and one Cholesky pass already leaves Q^T Q within
# kappa^2 * eps ~ 4e-6 of I in float32: the second pass brings it to rounding.
_CHOLESKY_ASPECT = 2


# Above this many flops of factorization (m n^2 for an (m, n) sample), a structured
# random orthogonal matrix replaces the QR of a Gaussian sample. VGG16's first Dense
# at 96x96 inputs, (4608, 4096), took 8.7 s of Householder QR on 2 CPU cores and 1.5 s
# this way; a (4608, 512) conv kernel (1.2e9) still takes the QR.
_STRUCTURED_FLOPS = 1e10
_STRUCTURED_ROUNDS = 3


def _structured_orthonormal(lead: tuple[int, ...], m: int, n: int, dtype: str, seed):
    """n orthonormal columns in R^m (m >= n) at O(n m log m): no Gaussian sample, no QR.

    The first n basis vectors go through three rounds of random signs, a
    random permutation and an orthonormal DCT-II, then one more sign flip
    and permutation: an exactly orthogonal map (to rounding), whose
    columns spread over every coordinate like a Haar matrix's (the
    structured orthogonal embeddings of Choromanski et al., 2017, with a
    DCT for the Hadamard transform, which needs no power-of-two size). Its
    randomness comes from one uniform draw with `seed`, so an int seed is
    reproducible and each stacked kernel gets its own.
    """
    rounds = _STRUCTURED_ROUNDS
    noise = ops.convert_to_tensor(keras.random.uniform(lead + (2 * rounds + 2, m),
                                                       dtype="float32", seed=seed))
    # Rows: e_1 ... e_n of R^m.
    z = ops.broadcast_to(ops.eye(n, m, dtype=dtype), lead + (n, m))

    def sign_and_permute(z, row):
        signs = ops.where(noise[..., row:row + 1, :] < 0.5, -1.0, 1.0)
        order = ops.argsort(noise[..., row + 1, :], axis=-1)
        order = ops.broadcast_to(ops.expand_dims(order, -2), lead + (n, m))
        return ops.take_along_axis(z * ops.cast(signs, dtype), order, axis=-1)

    for step in range(rounds):
        z = _backend.dct_ortho(sign_and_permute(z, 2 * step))
    return ops.swapaxes(sign_and_permute(z, 2 * rounds), -1, -2)


def _householder(sample):
    """Q of the QR of `sample` (..., m, n), m >= n, with the sign fix that makes it Haar."""
    q, r = ops.qr(sample)
    # The sign fix makes Q Haar-distributed rather than biased by QR's convention.
    return q * ops.expand_dims(ops.sign(ops.diagonal(r, axis1=-2, axis2=-1)), -2)


def _cholesky_qr2(sample):
    """Q of the QR of a well-conditioned `sample` with R's diagonal positive: CholeskyQR2.

    Each pass factors the Gram matrix `A^T A = R^T R` (Cholesky, `R` upper
    triangular with a positive diagonal) and sets `A <- A R^-1`, all matrix
    products (BLAS 3) rather than Householder QR's column-by-column
    reflections. The product of the passes' `R`s is upper triangular with a
    positive diagonal, so the result is the unique QR factor with positive
    `R` diagonal, the same matrix that sign-fixed Householder QR gives (up
    to rounding), hence the same Haar distribution.
    """
    n = sample.shape[-1]
    eye = ops.broadcast_to(ops.eye(n, dtype=sample.dtype), tuple(sample.shape[:-2]) + (n, n))
    q = sample
    for _ in range(2):
        lower = ops.cholesky(_backend.gram(q))  # A^T A = L L^T
        # R^-1 = (L^T)^-1 = (L^-1)^T; one triangular solve on n x n, then a matmul.
        inverse_r = ops.swapaxes(ops.solve_triangular(lower, eye, lower=True), -1, -2)
        q = _backend.matmul(q, inverse_r)
    return q


def _orthonormal(sample):
    """Orthonormal columns for a Gaussian `sample` (..., m, n), m >= n, Haar-distributed.

    Eager: a traced function per kernel shape cost more to trace than the
    dozen ops it runs (a first `lsuv_init` meets many shapes). A tall sample (`m >= 2 n`) goes
    through CholeskyQR2, about 2-3x faster on CPU than Householder QR for
    conv kernels such as (4608, 512); a squarer one, whose condition number
    grows like `n` (a square Gaussian's is about 4.6 n), through Householder
    QR, which stays accurate at any condition number.
    """
    m, n = sample.shape[-2], sample.shape[-1]
    if m >= _CHOLESKY_ASPECT * n:
        return _cholesky_qr2(sample)
    return _householder(sample)


def _inverse(perm: list[int]) -> list[int]:
    inverse = [0] * len(perm)
    for position, axis in enumerate(perm):
        inverse[axis] = position
    return inverse


# Plain names, so `keras.initializers.get("GoodInit")` and configs without the
# "keras_goodinit>" package prefix find the class (Keras' own initializers also
# answer to their snake_case names).
keras.saving.get_custom_objects().update({"GoodInit": GoodInit, "good_init": GoodInit})
