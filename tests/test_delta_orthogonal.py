"""GoodInit(distribution="delta_orthogonal"): Xiao et al. (2018)'s delta-orthogonal kernels.

Bounds. The centre matrix comes from the same QR as `"orthogonal"`, whose
orthogonality error test_initializers.py bounds by 8 sqrt(m) eps (m the long
side); rounding each entry to float32 (eps/2 relative) moves a Gram entry by
at most eps times the product of two row or column norms: ORTHOGONALITY below.
A convolution's output is a sum of n products rounded in some order:
_rounding.reordered (sqrt(n) eps of the output's scale per layer).
A wrong tap, layout or scale is off by O(1), far above both.
"""

import math
import re

import keras
import numpy as np
import pytest
from _rounding import EPS, reordered

from keras_goodinit import GoodInit, _backend
from keras_goodinit.initializers import DISTRIBUTIONS

DELTA = "delta_orthogonal"

# (kernel shape, layout): Conv1D/2D/3D with square, tall (C_in > C_out) and wide channels;
# odd and even kernel sizes (the centre is (k - 1) // 2 either way).
DEFAULT_SHAPES = [
    (3, 8, 8), (3, 16, 8), (3, 8, 16), (2, 8, 8),
    (3, 3, 8, 8), (3, 3, 16, 8), (3, 3, 8, 16), (2, 4, 6, 6), (5, 5, 1, 12),
    (3, 3, 3, 4, 4), (2, 3, 3, 6, 4), (3, 2, 2, 4, 6),
]


def orthogonality(m: int, dtype: str = "float32") -> float:
    """Bound on |H^T H / g^2 - I| (module docstring): the QR's, then the rounding to dtype."""
    work = "float64" if dtype == "float64" else "float32"
    return 8 * math.sqrt(m) * EPS[work] + 2 * EPS[dtype]


def centre_index(spatial):
    return tuple((k - 1) // 2 for k in spatial)


def split(kernel):
    """(centre matrix, every other tap) of a kernel (*k, a, b)."""
    kernel = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(kernel, "float64")))
    spatial = kernel.shape[:-2]
    mask = np.zeros(spatial, dtype=bool)
    mask[centre_index(spatial)] = True
    return kernel[centre_index(spatial)], kernel[~mask]


def check_delta_orthogonal(kernel, g: float, dtype: str = "float32", transpose=False):
    """Every non-centre tap is exactly 0; the centre (C_in, C_out) matrix H has
    H^T H = g^2 I when C_in >= C_out, else H H^T = c^2 I with mean squared column norm g^2."""
    centre, others = split(kernel)
    assert np.all(others == 0.0), np.abs(others).max()
    h = centre.T if transpose else centre
    c_in, c_out = h.shape
    if c_in >= c_out:
        gram, scale = h.T @ h, g * g
    else:
        gram, scale = h @ h.T, g * g * c_out / c_in
        # One factor for the whole matrix: the mean squared unit norm is g^2.
        np.testing.assert_allclose(np.sum(h * h) / c_out, g * g,
                                   rtol=orthogonality(max(c_in, c_out), dtype))
    error = np.abs(gram / scale - np.eye(min(c_in, c_out))).max()
    assert error <= orthogonality(max(c_in, c_out), dtype), error
    return h


@pytest.mark.parametrize("shape", DEFAULT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scheme", ["wn_relu", "wn_linear"])
def test_only_the_centre_tap_is_nonzero_and_orthogonal(shape, scheme):
    init = GoodInit(scheme, distribution=DELTA, seed=3)
    kernel = init(shape)
    assert tuple(kernel.shape) == shape
    assert keras.backend.standardize_dtype(kernel.dtype) == "float32"
    gamma = {"wn_relu": 2.0, "wn_linear": 1.0}[scheme]
    g = math.sqrt(gamma * shape[-2] / shape[-1])
    assert init.unit_norm(shape) == pytest.approx(g, rel=1e-12)
    check_delta_orthogonal(kernel, g)


def test_wide_kernels_keep_orthogonality_where_orthogonal_rescales_units():
    """For C_in < C_out, "orthogonal" sets every unit norm to g, which breaks the rows'
    orthogonality; delta-orthogonal keeps H H^T = c^2 I and so unequal unit norms."""
    shape = (3, 3, 4, 16)
    h = split(GoodInit("wn_linear", distribution=DELTA, seed=0)(shape))[0]
    norms = np.linalg.norm(h, axis=0)
    assert norms.std() > 0.1 * norms.mean()  # a wide orthogonal row block's columns vary
    plain = keras.ops.convert_to_numpy(GoodInit("wn_linear", seed=0)((4, 16))).astype("float64")
    gram = plain @ plain.T
    # Equal-norm columns (4 of them per 16) cannot have orthogonal rows: O(1) off the identity.
    assert np.abs(gram / gram[0, 0] - np.eye(4)).max() > 100 * orthogonality(16)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("shape", [(3, 3, 16, 8), (3, 3, 8, 16)])
def test_other_float_dtypes(dtype, shape):
    kernel = GoodInit("wn_relu", distribution=DELTA, seed=4)(shape, dtype=dtype)
    # JAX without x64 gives float32 for a float64 request.
    dtype = _backend.wide() if dtype == "float64" else dtype
    assert keras.backend.standardize_dtype(kernel.dtype) == dtype
    check_delta_orthogonal(kernel, math.sqrt(2 * shape[-2] / shape[-1]), dtype)


def test_batched_draw_gives_independent_delta_orthogonal_kernels():
    shape = (3, 3, 8, 8)
    kernels = GoodInit("wn_linear", distribution=DELTA, seed=2).draw(shape, count=3)
    assert tuple(kernels.shape) == (3, *shape)
    centres = [check_delta_orthogonal(kernel, 1.0) for kernel in kernels]
    # Independent Haar matrices differ by O(1) entries.
    assert np.abs(centres[0] - centres[1]).max() > 0.1
    assert np.abs(centres[1] - centres[2]).max() > 0.1


def test_int_seed_reproduces_and_unseeded_or_generator_seeds_are_fresh():
    shape = (3, 3, 8, 8)
    fixed = GoodInit(distribution=DELTA, seed=5)
    np.testing.assert_array_equal(fixed(shape), fixed(shape))
    for seed in (None, keras.random.SeedGenerator(1)):
        init = GoodInit(distribution=DELTA, seed=seed)
        first, second = split(init(shape))[0], split(init(shape))[0]
        assert np.abs(first - second).max() > 0.1
        check_delta_orthogonal(init(shape), math.sqrt(2.0))  # wn_relu, square


# The convolution is the matmul by H --------------------------------------------------------

CONVS = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D}
TRANSPOSED = {1: keras.layers.Conv1DTranspose, 2: keras.layers.Conv2DTranspose}


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "conv_transpose"])
def test_same_padding_conv_is_the_matmul_by_the_centre_matrix(k, rank, transpose):
    """At every position, borders included (only the aligned tap is non-zero),
    `conv(x) = x @ H`. For even k a kernel centred at k // 2 would shift x by one."""
    c_in, c_out = 6, 10
    layout = "conv_transpose" if transpose else "default"
    init = GoodInit("wn_linear", distribution=DELTA, layout=layout, seed=7)
    layer = (TRANSPOSED if transpose else CONVS)[rank](
        c_out, k, padding="same", use_bias=False, kernel_initializer=init)
    x = np.random.default_rng(0).standard_normal((2,) + (7,) * rank + (c_in,)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x)).astype("float64")
    h = check_delta_orthogonal(layer.kernel, math.sqrt(c_in / c_out), transpose=transpose)
    expected = x.astype("float64") @ h
    assert y.shape == expected.shape
    # One layer's sum of k^rank * c_in products (the zero taps included).
    bound = reordered(1, n=k**rank * c_in, scale=np.abs(expected).max())
    assert np.abs(y - expected).max() <= bound, (np.abs(y - expected).max(), bound)


def _numpy(tensor):
    return keras.ops.convert_to_numpy(tensor).astype("float64")


def _chain(depth: int, channels: int, distribution: str, seed: int) -> keras.Sequential:
    return keras.Sequential(
        [keras.Input((8, 8, channels))]
        + [keras.layers.Conv2D(channels, 3, padding="same", use_bias=False,
                               kernel_initializer=GoodInit("wn_linear", distribution=distribution,
                                                           seed=seed + i))
           for i in range(depth)])


def test_a_deep_delta_orthogonal_chain_keeps_every_positions_norm():
    """30 linear Conv2D layers, square, gamma = 1: each maps every position's channel
    vector by an orthogonal H, so its norm is kept at every position to rounding: per
    layer H's orthogonality error and the conv's rounding, adding up linearly with depth."""
    depth, channels = 30, 8
    x = np.random.default_rng(1).standard_normal((2, 8, 8, channels)).astype("float32")
    before = np.linalg.norm(x.astype("float64"), axis=-1)
    after = np.linalg.norm(_numpy(_chain(depth, channels, DELTA, 0)(x)), axis=-1)
    per_layer = orthogonality(channels) + reordered(1, n=9 * channels)
    bound = depth * per_layer * before.max()
    assert np.abs(after - before).max() <= bound, (np.abs(after - before).max(), bound)
    # The same chain with "orthogonal" 3x3 kernels (orthogonal over all 72 fan-in entries)
    # mixes neighbouring positions: per-position norms move by O(1).
    mixed = np.linalg.norm(_numpy(_chain(depth, channels, "orthogonal", 0)(x)), axis=-1)
    assert np.abs(mixed - before).max() > 100 * bound


# Other layouts, the Dense fallback ---------------------------------------------------------

# At least 12 units each, so that all signs equal has probability <= 2^-11.
@pytest.mark.parametrize("shape", [(3, 3, 6, 2), (2, 4, 3), (3, 3, 3, 16, 1)])
def test_depthwise_centre_is_plus_or_minus_g_per_unit(shape):
    init = GoodInit("wn_relu", distribution=DELTA, layout="depthwise", seed=8)
    kernel = init(shape)
    centre, others = split(kernel)
    assert np.all(others == 0.0)
    g = math.sqrt(2.0 / shape[-1])  # C_out = C_in * multiplier
    g32 = float(np.float32(g))
    np.testing.assert_array_equal(np.abs(centre), g32)
    assert (centre > 0).any() and (centre < 0).any()  # random signs, not a constant


def test_depthwise_conv_scales_each_channel_by_its_centre():
    init = GoodInit("wn_linear", distribution=DELTA, layout="depthwise", seed=9)
    layer = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False,
                                         depthwise_initializer=init)
    x = np.random.default_rng(2).standard_normal((2, 5, 5, 4)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x)).astype("float64")
    centre = split(layer.kernel)[0]  # (channels, multiplier)
    # Output channel c * multiplier + m is x_c times centre[c, m]: one product, one rounding.
    expected = (x.astype("float64")[..., :, None] * centre).reshape(y.shape)
    np.testing.assert_allclose(y, expected, rtol=EPS["float32"], atol=0)


@pytest.mark.parametrize("shape", [(64, 32), (16, 48), (20, 20)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_kernels_are_exactly_the_orthogonal_ones(shape, dtype):
    for count in (None, 2):
        delta = GoodInit("wn_relu", distribution=DELTA, seed=11).draw(shape, dtype, count=count)
        plain = GoodInit("wn_relu", distribution="orthogonal", seed=11).draw(shape, dtype,
                                                                             count=count)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.ops.cast(delta, "float32")),
                                      keras.ops.convert_to_numpy(keras.ops.cast(plain, "float32")))


def test_a_dense_layer_with_delta_orthogonal_gets_the_orthogonal_kernel():
    layers = [keras.layers.Dense(8, kernel_initializer=GoodInit(distribution=d, seed=1))
              for d in (DELTA, "orthogonal")]
    for layer in layers:
        layer.build((None, 12))
    np.testing.assert_array_equal(*(keras.ops.convert_to_numpy(layer.kernel) for layer in layers))


# Config, registry, bad input ---------------------------------------------------------------

def test_config_round_trip_and_keras_get_by_dict():
    init = GoodInit("wn_residual", num_blocks=4, distribution=DELTA, layout="conv_transpose",
                    seed=12)
    config = init.get_config()
    assert config["distribution"] == DELTA
    again = GoodInit.from_config(config)
    assert again.get_config() == config
    shape = (3, 3, 8, 4)
    np.testing.assert_array_equal(init(shape), again(shape))
    found = keras.initializers.get({"class_name": "GoodInit", "config": config})
    assert isinstance(found, GoodInit) and found.get_config() == config
    np.testing.assert_array_equal(init(shape), found(shape))
    saved = keras.initializers.serialize(init)
    assert keras.initializers.get(saved).get_config() == config


def test_a_model_with_delta_orthogonal_survives_save_and_load(tmp_path):
    model = _chain(2, 4, DELTA, 3)
    path = str(tmp_path / "delta.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    for old, new in zip(model.layers, loaded.layers, strict=True):
        assert new.kernel_initializer.get_config() == old.kernel_initializer.get_config()
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(new.kernel),
                                      keras.ops.convert_to_numpy(old.kernel))


def test_delta_orthogonal_is_a_listed_distribution():
    assert DELTA in DISTRIBUTIONS


@pytest.mark.parametrize("value", ["delta", "Delta_Orthogonal", None])
def test_a_bad_distribution_names_the_argument(value):
    with pytest.raises(ValueError, match=re.escape(f"Received: distribution={value!r}")):
        GoodInit(distribution=value)


def test_a_wide_centre_that_would_overflow_names_gamma():
    """A wide centre's entries reach c = g sqrt(C_out / C_in), above g: the dtype check
    covers c. Here g = 1e4 fits float16 (max 65504) but c = 8e4 would not."""
    shape, gamma = (3, 3, 1, 64), 1e8 * 64  # g = sqrt(gamma / 64) = 1e4, c = 8 g
    plain = GoodInit("wn_linear", gamma=gamma, seed=0)(shape, dtype="float16")
    assert np.isfinite(keras.ops.convert_to_numpy(keras.ops.cast(plain, "float32"))).all()
    with pytest.raises(ValueError, match=re.escape(f"Received: gamma={gamma!r}")):
        GoodInit("wn_linear", gamma=gamma, distribution=DELTA, seed=0)(shape, dtype="float16")


def test_a_bad_shape_still_names_the_shape():
    with pytest.raises(ValueError, match=re.escape("Received: shape=(3,)")):
        GoodInit(distribution=DELTA)((3,))


def test_mean_field_init_follows_delta_kernels_to_the_borders():
    """mean_field_init(distribution="delta_orthogonal"): the widening stem (1 -> 16
    channels) gets an orthogonal kernel over its 9 taps, every other conv a delta
    kernel, and the predictions know a delta kernel loses nothing at the borders of a
    'same' convolution (a rule averaging all 9 taps predicts 16% less per layer on an
    8x8 map: 0.84^4 = 0.5 after four layers, which the bound below would catch)."""
    from keras_goodinit import mean_field_init

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", name="stem")(inputs)
    for i in range(4):
        x = keras.layers.Conv2D(16, 3, padding="same", name=f"c{i}")(x)
    model = keras.Model(inputs, x)
    data = np.random.default_rng(0).normal(size=(512, 8, 8, 1)).astype("float32")
    report = mean_field_init(model, distribution=DELTA, head="paper", seed=0, verbose=0,
                             data=data)
    assert [row.status for row in report.rows] == ["ok"] * 5
    stem = keras.ops.convert_to_numpy(model.get_layer("stem").kernel)
    assert np.count_nonzero(stem[[0, 2]]) > 0  # not a delta kernel
    for i in range(4):
        kernel = keras.ops.convert_to_numpy(model.get_layer(f"c{i}").kernel)
        off = kernel.copy()
        off[1, 1] = 0
        assert not off.any()
    # A linear chain: the delta layers keep every position's norm exactly, so each
    # measures what the stem does; the stem's second moment over 512 examples of 64
    # positions has a relative std of at most sqrt(2 / 512) = 0.06 (positions only add
    # information): 0.1 leaves room, and 0.5 (a border loss) would not fit.
    for row in report.rows:
        assert abs(row.measured / row.predicted - 1) < 0.1, row
