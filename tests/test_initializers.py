"""GoodInit: scheme gains, exact per-unit norms for every kernel layout, seeds, config, errors."""

import math
import re

import keras
import numpy as np
import pytest

from keras_goodinit import GoodInit
from keras_goodinit.initializers import SCHEMES, scheme_gamma

# scheme -> (extra constructor arguments, gamma: 2 before a ReLU, 1 linear, 1/N residual)
SCHEME_GAMMAS = {
    "wn_relu": ({}, 2.0),
    "wn_linear": ({}, 1.0),
    "wn_residual": ({"num_blocks": 9}, 1.0 / 9),
    "wn_hanin": ({"block_index": 3}, 0.81**3),
    "wn_relu_backward": ({}, 2.0),
}

# (layout, kernel shape, axes one unit's fan-in vector spans, C_in, C_out)
LAYOUT_CASES = [
    ("default", (64, 32), (0,), 64, 32),  # Dense, more fan-in than units
    ("default", (16, 48), (0,), 16, 48),  # Dense, more units than fan-in
    ("default", (3, 8, 16), (0, 1), 8, 16),  # Conv1D
    ("default", (3, 3, 8, 16), (0, 1, 2), 8, 16),  # Conv2D
    ("default", (2, 2, 2, 4, 6), (0, 1, 2, 3), 4, 6),  # Conv3D
    ("conv_transpose", (3, 3, 16, 8), (0, 1, 3), 8, 16),  # (k, k, out, in)
    ("conv_transpose", (3, 4, 6), (0, 2), 6, 4),  # Conv1DTranspose
    ("depthwise", (3, 3, 8, 2), (0, 1), 8, 16),  # (k, k, in, mult): C_out = in * mult
    ("depthwise", (5, 4, 3), (0,), 4, 12),  # DepthwiseConv1D
]
LAYOUT_IDS = [f"{case[0]}-{'x'.join(map(str, case[1]))}" for case in LAYOUT_CASES]


def unit_norms(kernel, axes):
    kernel = np.asarray(kernel, dtype="float64")
    return np.sqrt(np.sum(np.square(kernel), axis=axes))


def as_matrix(kernel, axes):
    """(fan_in, units) view of a kernel: the fan-in axes first, flattened."""
    kernel = np.asarray(kernel, dtype="float64")
    units = [i for i in range(kernel.ndim) if i not in axes]
    moved = np.transpose(kernel, list(axes) + units)
    fan_in = math.prod(kernel.shape[i] for i in axes)
    return moved.reshape(fan_in, -1)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_has_the_gamma_of_the_table(scheme):
    kwargs, gamma = SCHEME_GAMMAS[scheme]
    assert GoodInit(scheme, **kwargs).gamma == pytest.approx(gamma, rel=1e-12)
    assert scheme_gamma(scheme, **kwargs) == pytest.approx(gamma, rel=1e-12)


@pytest.mark.parametrize("distribution", ["orthogonal", "normal"])
@pytest.mark.parametrize("scheme", ["wn_relu", "wn_linear", "wn_residual", "wn_hanin"])
@pytest.mark.parametrize(("layout", "shape", "axes", "c_in", "c_out"), LAYOUT_CASES,
                         ids=LAYOUT_IDS)
def test_every_unit_gets_the_exact_norm(layout, shape, axes, c_in, c_out, scheme, distribution):
    kwargs, gamma = SCHEME_GAMMAS[scheme]
    init = GoodInit(scheme, layout=layout, distribution=distribution, seed=1, **kwargs)
    kernel = keras.ops.convert_to_numpy(init(shape))
    assert kernel.shape == shape and kernel.dtype == np.float32
    expected = math.sqrt(gamma * c_in / c_out)
    assert init.unit_norm(shape) == pytest.approx(expected, rel=1e-12)
    norms = unit_norms(kernel, axes)
    assert norms.shape == tuple(d for i, d in enumerate(shape) if i not in axes)
    np.testing.assert_allclose(norms, expected, rtol=1e-5)


@pytest.mark.parametrize(("layout", "shape", "axes", "c_in", "c_out"), LAYOUT_CASES,
                         ids=LAYOUT_IDS)
def test_relu_backward_gives_sqrt_gamma_whatever_the_fans(layout, shape, axes, c_in, c_out):
    for gamma, expected in ((None, math.sqrt(2.0)), (1.0, 1.0), (0.3, math.sqrt(0.3))):
        init = GoodInit("wn_relu_backward", gamma=gamma, layout=layout, seed=2)
        np.testing.assert_allclose(unit_norms(init(shape), axes), expected, rtol=1e-5)


@pytest.mark.parametrize(("scheme", "kwargs"), [("wn_relu", {}),
                                                ("wn_residual", {"num_blocks": 4}),
                                                ("wn_hanin", {"block_index": 2})])
def test_explicit_gamma_overrides_the_scheme(scheme, kwargs):
    init = GoodInit(scheme, gamma=0.5, seed=3, **kwargs)
    assert init.gamma == 0.5
    np.testing.assert_allclose(unit_norms(init((40, 10)), (0,)), math.sqrt(0.5 * 40 / 10),
                               rtol=1e-5)


@pytest.mark.parametrize(("layout", "shape", "axes"), [
    ("default", (64, 32), (0,)),
    ("default", (32, 32), (0,)),
    ("default", (3, 3, 8, 16), (0, 1, 2)),
    ("conv_transpose", (3, 3, 16, 8), (0, 1, 3)),
    ("depthwise", (3, 3, 4, 2), (0, 1)),
])
def test_orthogonal_directions_are_orthonormal_across_units(layout, shape, axes):
    init = GoodInit("wn_relu", layout=layout, seed=4)
    matrix = as_matrix(init(shape), axes)
    assert matrix.shape[1] <= matrix.shape[0]
    g = init.unit_norm(shape)
    # K^T K = g^2 I, up to float32 rounding.
    np.testing.assert_allclose(matrix.T @ matrix, g**2 * np.eye(matrix.shape[1]),
                               atol=1e-5 * g**2)


def test_normal_directions_are_not_orthogonal_but_have_exact_norms():
    init = GoodInit("wn_relu", distribution="normal", seed=5)
    kernel = np.asarray(init((256, 64)), dtype="float64")
    g = init.unit_norm((256, 64))
    np.testing.assert_allclose(unit_norms(kernel, (0,)), g, rtol=1e-5)
    cosines = (kernel.T @ kernel) / g**2 - np.eye(64)
    # Random directions in 256 dims: cosines have sd 1/16, so some pair exceeds 0.1.
    assert np.abs(cosines).max() > 0.1
    # Directions are Gaussian: entries have mean ~0 and variance g^2 / fan_in.
    assert abs(kernel.mean()) < 4 * g / math.sqrt(kernel.size * 256)
    assert kernel.var() == pytest.approx(g**2 / 256, rel=0.05)


def test_int_seed_is_reproducible():
    first = keras.ops.convert_to_numpy(GoodInit("wn_relu", seed=11)((20, 30)))
    np.testing.assert_array_equal(first, GoodInit("wn_relu", seed=11)((20, 30)))
    init = GoodInit("wn_relu", seed=11)
    np.testing.assert_array_equal(init((20, 30)), init((20, 30)))
    assert not np.allclose(first, GoodInit("wn_relu", seed=12)((20, 30)))


@pytest.mark.parametrize("seed", [None, "generator"])
def test_unseeded_and_generator_seeds_give_fresh_kernels(seed):
    if seed == "generator":
        seed = keras.random.SeedGenerator(13)
    init = GoodInit("wn_relu", seed=seed)
    a, b = np.asarray(init((20, 30))), np.asarray(init((20, 30)))
    assert not np.allclose(a, b)
    np.testing.assert_allclose(unit_norms(b, (0,)), math.sqrt(2 * 20 / 30), rtol=1e-5)


def test_two_layers_sharing_an_instance_get_different_kernels():
    for seed in (None, keras.random.SeedGenerator(14)):
        init = GoodInit("wn_relu", seed=seed)
        layers = [keras.layers.Dense(16, kernel_initializer=init) for _ in range(2)]
        for layer in layers:
            layer.build((None, 16))
        assert not np.allclose(np.asarray(layers[0].kernel), np.asarray(layers[1].kernel))


CONFIG_CASES = [
    dict(scheme="wn_relu"),
    dict(scheme="wn_linear", distribution="normal"),
    dict(scheme="wn_residual", num_blocks=5, layout="conv_transpose", seed=3),
    dict(scheme="wn_hanin", block_index=2, layout="depthwise", seed=None),
    dict(scheme="wn_relu_backward", gamma=1.0, seed=21),
    dict(scheme="wn_relu", gamma=0.7, distribution="normal", layout="default", seed=0),
]


@pytest.mark.parametrize("kwargs", CONFIG_CASES)
def test_config_round_trip_keeps_every_argument(kwargs):
    init = GoodInit(**kwargs)
    config = init.get_config()
    for key, value in kwargs.items():
        assert config[key] == value, key
    clone = GoodInit.from_config(config)
    assert clone.get_config() == config
    assert clone.gamma == init.gamma
    restored = keras.initializers.deserialize(keras.initializers.serialize(init))
    assert isinstance(restored, GoodInit) and restored.get_config() == config
    if isinstance(kwargs.get("seed"), int):
        shape = (3, 3, 4, 2)
        np.testing.assert_array_equal(init(shape), clone(shape))


def test_config_round_trip_keeps_a_seed_generator():
    init = GoodInit("wn_relu", seed=keras.random.SeedGenerator(99))
    clone = GoodInit.from_config(init.get_config())
    assert isinstance(clone.seed, keras.random.SeedGenerator)
    assert clone.get_config() == init.get_config()
    # The restored generator starts from the same seed: its first draw is a fresh
    # generator's first draw.
    fresh = GoodInit("wn_relu", seed=keras.random.SeedGenerator(99))
    np.testing.assert_array_equal(clone((8, 4)), fresh((8, 4)))


def test_model_with_goodinit_survives_keras_save_and_load(tmp_path):
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, activation="relu",
                            kernel_initializer=GoodInit("wn_relu", seed=1)),
        keras.layers.Flatten(),
        keras.layers.Dense(5, kernel_initializer=GoodInit("wn_residual", num_blocks=3,
                                                          distribution="normal")),
    ])
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    path = tmp_path / "x.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    for old, new in zip(model.layers, loaded.layers, strict=True):
        if hasattr(old, "kernel_initializer"):
            assert isinstance(new.kernel_initializer, GoodInit)
            assert new.kernel_initializer.get_config() == old.kernel_initializer.get_config()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_other_float_dtypes_keep_the_norms(dtype):
    init = GoodInit("wn_relu", seed=6)
    kernel = init((3, 3, 8, 16), dtype=dtype)
    assert keras.backend.standardize_dtype(kernel.dtype) == dtype
    # Rounding each entry to the nearest representable value changes it by at most
    # eps/2 relative, so the norm too; eps covers that and the float32 computation.
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float64": 1e-12}[dtype]
    values = keras.ops.convert_to_numpy(keras.ops.cast(kernel, "float64"))
    np.testing.assert_allclose(unit_norms(values, (0, 1, 2)), math.sqrt(2 * 8 / 16), rtol=eps)


def _raises(match, **kwargs):
    return pytest.raises(ValueError, match=re.escape(match), **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(scheme="bogus"), "Received: scheme='bogus'"),
    (dict(scheme="wn_residual"), "Received: num_blocks=None"),
    (dict(scheme="wn_residual", num_blocks=0), "Received: num_blocks=0"),
    (dict(scheme="wn_residual", num_blocks=-2), "Received: num_blocks=-2"),
    (dict(scheme="wn_residual", num_blocks=2.5), "Received: num_blocks=2.5"),
    (dict(scheme="wn_residual", num_blocks=True), "Received: num_blocks=True"),
    (dict(scheme="wn_hanin"), "Received: block_index=None"),
    (dict(scheme="wn_hanin", block_index=0), "Received: block_index=0"),
    (dict(gamma=0.0), "Received: gamma=0.0"),
    (dict(gamma=-1), "Received: gamma=-1"),
    (dict(gamma=float("nan")), "Received: gamma=nan"),
    (dict(gamma=float("inf")), "Received: gamma=inf"),
    (dict(gamma="2"), "Received: gamma='2'"),
    (dict(distribution="uniform"), "Received: distribution='uniform'"),
    (dict(layout="channels_first"), "Received: layout='channels_first'"),
    (dict(seed="abc"), "Received: seed='abc'"),
    (dict(seed=1.5), "Received: seed=1.5"),
])
def test_bad_arguments_raise_naming_argument_and_value(kwargs, message):
    with _raises(message):
        GoodInit(**kwargs)


def test_unknown_scheme_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        GoodInit("relu")
    for scheme in SCHEMES:
        assert scheme in str(info.value)
    assert "scheme" in str(info.value)


@pytest.mark.parametrize(("shape", "kwargs", "message"), [
    ((5,), {}, "Received: shape=(5,)"),
    ((), {}, "Received: shape=()"),
    ((4, 0), {}, "Received: shape=(4, 0)"),
    ((4, 3), {"dtype": "int32"}, "Received: dtype=int32"),
    ((4, 3), {"dtype": "bool"}, "Received: dtype=bool"),
])
def test_bad_call_arguments_raise_naming_argument_and_value(shape, kwargs, message):
    with _raises(message):
        GoodInit("wn_relu", seed=0)(shape, **kwargs)


def test_depthwise_layout_needs_rank_three():
    with _raises("Received: shape=(4, 3)"):
        GoodInit("wn_relu", layout="depthwise")((4, 3))


# NumPy scalars, extreme gammas, float shapes ---------------------------------------------------

def test_numpy_scalars_are_accepted_like_python_numbers():
    from_numpy = GoodInit("wn_residual", num_blocks=np.int64(3), gamma=np.float32(0.5),
                          seed=np.int64(4))
    from_python = GoodInit("wn_residual", num_blocks=3, gamma=float(np.float32(0.5)), seed=4)
    assert from_numpy.get_config() == from_python.get_config()
    # Plain Python types in the config, so it serializes to JSON.
    assert type(from_numpy.get_config()["num_blocks"]) is int
    assert type(from_numpy.get_config()["seed"]) is int
    assert type(from_numpy.gamma) is float
    shape = (np.int64(16), np.int32(8))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(from_numpy(shape)),
                                  keras.ops.convert_to_numpy(from_python((16, 8))))
    stacked = from_numpy.draw((4, 3), count=np.int64(2))
    assert tuple(stacked.shape) == (2, 4, 3)
    hanin = GoodInit("wn_hanin", block_index=np.int16(2))
    assert hanin.gamma == pytest.approx(0.81**2) and hanin.block_index == 2
    assert scheme_gamma("wn_residual", num_blocks=np.uint8(4)) == 0.25


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(seed=-1), "Received: seed=-1"),
    (dict(seed=np.int64(-3)), "Received: seed=-3"),
    (dict(seed=np.float64(2.0)), "Received: seed=np.float64(2.0)"),
    (dict(gamma=np.float32("nan")), "Received: gamma=nan"),
    (dict(gamma=np.bool_(True)), "Received: gamma=np.True_"),
    (dict(scheme="wn_residual", num_blocks=np.float64(2.0)),
     "Received: num_blocks=np.float64(2.0)"),
    (dict(scheme="wn_hanin", block_index=np.int64(0)), "Received: block_index=0"),
    (dict(scheme="wn_hanin", block_index=10**6), "Received: block_index=1000000"),
    (dict(scheme="wn_residual", num_blocks=10**400), "underflows to 0"),
    (dict(distribution=np.str_("uniform")), "Received: distribution="),
])
def test_bad_numpy_and_extreme_arguments_name_argument_and_value(kwargs, message):
    with _raises(message) as info:
        GoodInit(**kwargs)
    assert str(info.value).startswith("Argument `")


@pytest.mark.parametrize(("shape", "count", "message"), [
    ((2.5, 3), None, "Received: shape=(2.5, 3)"),
    ((4, 3.0), None, "Received: shape=(4, 3.0)"),
    ((4, True), None, "Received: shape=(4, True)"),
    ("43", None, "Received: shape='43'"),
    (7, None, "Received: shape=7"),
    ((4, 3), 0, "Received: count=0"),
    ((4, 3), 2.0, "Received: count=2.0"),
    ((4, 3), True, "Received: count=True"),
])
def test_bad_shape_or_count_raises_instead_of_truncating(shape, count, message):
    with _raises(message):
        GoodInit("wn_relu", seed=0).draw(shape, count=count)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_gamma_range_follows_the_dtype(dtype):
    """g must lie in [tiny * sqrt(n), max / 2]; at both ends the kernel is finite and non-zero."""
    import ml_dtypes

    info = ml_dtypes.finfo(dtype)
    shape, n, ratio = (64, 32), 64, 2.0  # g = sqrt(gamma * C_in / C_out)
    low, high = float(info.tiny) * math.sqrt(n), float(info.max) / 2
    for g in (low * 1.01, high * 0.99):
        gamma = g * g / ratio
        if gamma == 0.0 or not math.isfinite(gamma):
            assert dtype == "float64"  # only float64's range outreaches a Python float gamma
            continue
        kernel = GoodInit("wn_linear", gamma=gamma, seed=0)(shape, dtype=dtype)
        values = keras.ops.convert_to_numpy(keras.ops.cast(kernel, "float64"))
        assert np.isfinite(values).all()
        assert (np.abs(values).max(axis=0) > 0).all()  # no unit is all zero
        norms = unit_norms(values, (0,))
        if g > 1:
            np.testing.assert_allclose(norms, g, rtol=2e-2)
        else:  # at the bottom of the range most entries are subnormal: only a rough norm
            assert (norms > 0.5 * g).all() and (norms < 1.01 * g).all()
    for g in (low * 0.99, high * 1.01):
        gamma = g * g / ratio
        if gamma == 0.0 or not math.isfinite(gamma):
            assert dtype == "float64"
            continue
        with _raises(f"Received: gamma={gamma!r}") as info_error:
            GoodInit("wn_linear", gamma=gamma, seed=0)(shape, dtype=dtype)
        assert dtype in str(info_error.value)


def test_issue_gammas_no_longer_give_inf_or_zero_kernels():
    with _raises("Received: gamma=1e+80") as info:
        GoodInit(gamma=1e80)((64, 32))
    assert "overflows float32" in str(info.value)
    with _raises("Received: gamma=1e-90") as info:
        GoodInit(gamma=1e-90)((64, 32))
    assert "underflows float32" in str(info.value)
    # float64 holds both.
    for gamma in (1e80, 1e-90):
        kernel = keras.ops.convert_to_numpy(GoodInit(gamma=gamma, seed=0)((64, 32), "float64"))
        assert np.isfinite(kernel).all() and (np.abs(kernel).max(axis=0) > 0).all()


def test_block_index_that_underflows_the_dtype_is_named():
    # 0.81**300 ~ 3e-28 is a fine float32 gamma; 0.81**900 ~ 3e-83 is not (g ~ 5e-42).
    GoodInit("wn_hanin", block_index=300, seed=0)((8, 8))
    with _raises("Received: block_index=900"):
        GoodInit("wn_hanin", block_index=900, seed=0)((8, 8))


# Keras' registry ----------------------------------------------------------------------------

def test_keras_initializers_get_finds_goodinit_by_name():
    assert isinstance(keras.initializers.get("GoodInit"), GoodInit)
    assert isinstance(keras.initializers.get("good_init"), GoodInit)
    init = keras.initializers.get({"class_name": "GoodInit",
                                   "config": {"scheme": "wn_residual", "num_blocks": 4,
                                              "seed": 2}})
    assert isinstance(init, GoodInit) and init.gamma == 0.25 and init.seed == 2
    # The package-qualified name of a saved config keeps working too.
    saved = keras.initializers.serialize(init)
    assert saved["registered_name"] == "keras_goodinit>GoodInit"
    assert keras.initializers.get(saved).get_config() == init.get_config()
    layer = keras.layers.Dense(4, kernel_initializer="GoodInit")
    layer.build((None, 8))
    np.testing.assert_allclose(unit_norms(keras.ops.convert_to_numpy(layer.kernel), (0,)),
                               math.sqrt(2 * 8 / 4), rtol=1e-5)


# Fast orthonormal factorization (issue 9) ------------------------------------------------------

F32_EPS = float(np.finfo("float32").eps)


def _reference_q(sample):
    """Sign-fixed Householder QR of the sample in float64: the Haar Q that `draw` must match."""
    q, r = np.linalg.qr(np.asarray(sample, dtype="float64"))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize(("shape", "count"), [
    ((1152, 128), 2),  # tall (9 rows per column): CholeskyQR2
    ((3, 3, 64, 128), None),  # a conv kernel, (576, 128): CholeskyQR2
    ((256, 128), None),  # exactly 2 rows per column: CholeskyQR2
    ((300, 200), 3),  # squarer: Householder QR
    ((96, 96), None),  # square: Householder QR
])
def test_orthonormal_draw_has_small_orthogonality_error(shape, count):
    """max |Q^T Q - I| stays at float32 rounding, whichever factorization ran.

    The second CholeskyQR pass starts from a Q1 whose Gram matrix is already
    within kappa^2 eps ~ 34 eps of I (kappa <= 5.8 for a sample with 2 rows per
    column), so what remains is the rounding of one Gram product, one Cholesky
    and one triangular solve and product, each a sum of at most m = rows terms:
    a random-walk error of about sqrt(m) eps per entry. 8 sqrt(m) eps bounds
    both that and Householder QR's error (measured: 0.5-4e-6 at m = 4608, where
    the bound is 6.5e-5); a single Cholesky pass would leave ~kappa^2 eps and a
    plain Gaussian matrix O(1).
    """
    init = GoodInit("wn_relu_backward", gamma=1.0, seed=8)
    kernels = keras.ops.convert_to_numpy(init.draw(shape, "float32", count=count))
    kernels = kernels.reshape((-1, *shape)).astype("float64")
    rows = max(math.prod(shape[:-1]), shape[-1])
    bound = 8 * math.sqrt(rows) * F32_EPS
    for kernel in kernels:
        matrix = as_matrix(kernel, tuple(range(len(shape) - 1)))
        error = np.abs(matrix.T @ matrix - np.eye(matrix.shape[1])).max()
        assert error < bound, (error, bound)
        # wn_relu_backward with gamma=1: every unit's fan-in vector has norm exactly 1.
        np.testing.assert_allclose(unit_norms(kernel, tuple(range(len(shape) - 1))), 1.0,
                                   rtol=1e-5)


@pytest.mark.parametrize("shape", [(1152, 128), (256, 128), (300, 200)])
def test_orthonormal_draw_is_the_sign_fixed_qr_of_its_gaussian_sample(shape):
    """CholeskyQR2 gives the same Q as sign-fixed Householder QR, hence a Haar kernel.

    Both are the unique QR factor with a positive R diagonal of the same
    Gaussian sample (an int seed draws the same sample), so they differ only by
    rounding: a perturbation of the sample of relative size ~sqrt(m) eps moves Q
    by at most about kappa times that, kappa <= 5.8 at 2 rows per column and
    ~(sqrt(300) + sqrt(200)) / (sqrt(300) - sqrt(200)) ~ 10 at (300, 200); the
    entries are ~1/sqrt(m), so 20 kappa sqrt(m) eps / sqrt(m) is a tight bound.
    A Q that is orthonormal but not the QR factor (any other basis of the same
    span, or columns with flipped signs) differs in O(1/sqrt(m)).
    """
    m, n = shape
    init = GoodInit("wn_relu_backward", gamma=1.0, seed=5)
    kernel = keras.ops.convert_to_numpy(init(shape)).astype("float64")
    sample = keras.random.normal(shape, dtype="float32", seed=5)
    reference = _reference_q(sample)
    kappa = (math.sqrt(m) + math.sqrt(n)) / (math.sqrt(m) - math.sqrt(n))
    assert np.abs(kernel - reference).max() < 20 * kappa * F32_EPS
    assert np.abs(reference).max() > 0.1 / math.sqrt(m)  # the bound is not vacuous


def test_float64_draw_is_orthonormal_to_float64_rounding():
    init = GoodInit("wn_relu_backward", gamma=1.0, seed=3)
    matrix = keras.ops.convert_to_numpy(init((1024, 64), dtype="float64"))
    assert matrix.dtype == np.float64
    # As above with float64's eps: 8 sqrt(1024) eps_64 ~ 6e-14, far below float32's 1e-7.
    error = np.abs(matrix.T @ matrix - np.eye(64)).max()
    assert error < 8 * math.sqrt(1024) * float(np.finfo("float64").eps)


def test_batched_draw_gives_independent_orthonormal_kernels():
    kernels = keras.ops.convert_to_numpy(
        GoodInit("wn_relu_backward", gamma=1.0, seed=2).draw((512, 64), count=3))
    for i in range(3):
        assert np.abs(kernels[i].T @ kernels[i] - np.eye(64)).max() < 8 * math.sqrt(512) * F32_EPS
    # Independent draws: cross inner products are those of random unit vectors, sd 1/sqrt(512).
    assert np.abs(kernels[0].T @ kernels[1]).max() > 0.05


# ----------------------------------------------------------------------------
# Large kernels: a structured random orthogonal matrix instead of the QR.


@pytest.fixture
def structured_everywhere(monkeypatch):
    """Every orthogonal draw takes the structured path (normally only above 1e10 flops)."""
    from keras_goodinit import initializers

    monkeypatch.setattr(initializers, "_STRUCTURED_FLOPS", 0)


@pytest.mark.parametrize(("lead", "m", "n"), [((), 300, 96), ((2,), 500, 360), ((3,), 128, 128)])
def test_structured_draw_is_orthonormal_and_spread_like_haar(lead, m, n):
    """Orthonormal columns to rounding, and no coordinate singled out.

    The map is a product of DCTs, signs and permutations, each orthogonal:
    what remains of Q^T Q - I is the rounding of three length-m DCTs, a
    random walk of about sqrt(m) eps per entry, under the QR test's 8 sqrt(m)
    eps. Spread: a Haar column's entries are about N(0, 1/m), whose largest
    of m n is about sqrt(2 ln(m n) / m); 2x that bound fails for a
    permutation-like matrix (entries 1) or one concentrated on few
    coordinates.
    """
    from keras_goodinit.initializers import _structured_orthonormal

    q = keras.ops.convert_to_numpy(_structured_orthonormal(lead, m, n, "float32", 3))
    assert q.shape == (*lead, m, n)
    stacked = q.reshape((-1, m, n)).astype("float64")
    for matrix in stacked:
        error = np.abs(matrix.T @ matrix - np.eye(n)).max()
        assert error < 8 * math.sqrt(m) * F32_EPS, error
        assert np.abs(matrix).max() < 2 * math.sqrt(2 * math.log(m * n) / m)
    if len(stacked) > 1:  # stacked kernels are distinct draws
        assert not np.allclose(stacked[0], stacked[1])


def test_structured_goodinit_kernels_are_orthonormal_with_unit_norm_units(
        structured_everywhere):
    init = GoodInit("wn_relu_backward", gamma=1.0, seed=3)
    kernels = keras.ops.convert_to_numpy(init.draw((3, 3, 40, 64), "float32", count=2))
    for kernel in kernels.astype("float64"):
        matrix = kernel.reshape(360, 64)
        assert np.abs(matrix.T @ matrix - np.eye(64)).max() < 8 * math.sqrt(360) * F32_EPS


def test_structured_draw_is_reproducible_by_seed(structured_everywhere):
    draw = lambda seed: keras.ops.convert_to_numpy(  # noqa: E731
        GoodInit("wn_relu", seed=seed).draw((200, 64), "float32"))
    np.testing.assert_array_equal(draw(5), draw(5))
    assert not np.allclose(draw(5), draw(6))


def test_only_large_kernels_take_the_structured_path(monkeypatch):
    from keras_goodinit import initializers

    # The default threshold: VGG16's first Dense at 96x96 inputs, (4608, 4096), costs 7.7e10
    # flops of QR; a 3x3x512x512 conv kernel, (4608, 512), 1.2e9, keeps the Haar QR.
    assert 4608 * 512**2 < initializers._STRUCTURED_FLOPS < 4608 * 4096**2
    # The dispatch, with the threshold between two small shapes' m n^2.
    taken = []
    real = initializers._structured_orthonormal
    monkeypatch.setattr(initializers, "_STRUCTURED_FLOPS", 300 * 40**2)
    monkeypatch.setattr(initializers, "_structured_orthonormal",
                        lambda *args: taken.append(args[1:3]) or real(*args))
    GoodInit("wn_relu", seed=1).draw((300, 40), "float32")  # 300 * 40^2: at the threshold
    GoodInit("wn_relu", seed=1).draw((41, 300), "float32")  # wide: m = 300, n = 41, above it
    assert taken == [(300, 41)]


@pytest.mark.parametrize("path", ["cholesky_qr2", "householder", "structured"])
def test_float64_directions_are_orthonormal_to_float64_rounding(path, monkeypatch):
    # Issue 17: on torch a float64 product ran in float32, leaving 2e-7. The worker runs
    # the same check on JAX and torch (tests/_backend_worker.py).
    from keras_goodinit import initializers

    shape = {"cholesky_qr2": (256, 64), "householder": (48, 40), "structured": (96, 40)}[path]
    if path == "structured":
        monkeypatch.setattr(initializers, "_STRUCTURED_FLOPS", 0)
    kernel = keras.ops.convert_to_numpy(GoodInit("wn_linear", seed=3)(shape, dtype="float64"))
    assert kernel.dtype == np.float64
    q = kernel / np.linalg.norm(kernel, axis=0)
    # Orthonormal to rounding: an m-term float64 dot product errs by about sqrt(m) eps per
    # pass, and the draw takes a few passes (8 sqrt(m) eps, as for float32 above).
    bound = 8 * math.sqrt(shape[0]) * np.finfo("float64").eps
    assert np.abs(q.T @ q - np.eye(shape[1])).max() < bound
