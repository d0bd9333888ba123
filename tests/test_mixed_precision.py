"""Every public feature under the `mixed_float16` and `mixed_bfloat16` global policies.

What must hold under a mixed policy: variables stay float32; the init
statistics are computed in float32 (a float16 variance of a representable
signal can overflow); a deep network has no inf/NaN after `lsuv_init`; and
the numbers the package reports match a float32 run on the same weights and
batch to about 1e-2 (relative).

Tolerances (MATCHES): the mixed run rounds every layer's input and kernel to
the compute dtype (unit roundoff u = 2**-11 for float16, 2**-8 for bfloat16)
and the statistics see that rounded signal. Over seeds 0-4 (MP_TEST_SEED) the
largest relative deviation of any reported quantity was 1.9e-3 for float16 and
1.5e-2 for bfloat16 (the data-init bias of a unit; 8.8e-3 for a 50-layer
LSUV var_before). So 1e-2 for float16 (5x margin) and 2e-2 for bfloat16, whose
u is 8x larger. signal_report's passes are not renormalized layer by layer, so its
bound grows with depth (SIGNAL_MATCHES). The measured deviations are printed at the end
of the module.
"""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _figures import emit  # noqa: E402
from keras import layers as L  # noqa: E402

from keras_goodinit import (  # noqa: E402
    GoodInit,
    LSUVCallback,
    WeightNormalization,
    bake_weight_norm,
    lsuv_init,
    signal_report,
    weightnorm_data_init,
)
from keras_goodinit.schedules import QuadraticWarmup  # noqa: E402

POLICIES = ["mixed_float16", "mixed_bfloat16"]
COMPUTE = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
# Relative deviation allowed between a mixed and a float32 run (module docstring).
MATCHES = {"mixed_float16": 1e-2, "mixed_bfloat16": 2e-2}
DEPTH = 50
# Bound on ||y_baked - y_wrapped|| / ||y_wrapped|| in units of the compute dtype's unit
# roundoff u (test_callback_fit_save_and_bake_under_the_policy): measured <= 11.6 u over
# seeds 0-4; a wrong baked kernel would give an O(1) error, i.e. 256 u (bf16) or 2048 u (f16).
RELATIVE_BAKE = 32.0
# signal_report compares passes that nothing renormalizes, so rounding compounds with depth.
# A TF build may round a bfloat16 result toward zero (TF's Eigen CPU kernels do: run with
# TF_ENABLE_ONEDNN_OPTS=0), which shrinks every value by up to eps = 2u, u/2..u on average,
# always in the same direction: the norm of layer l's output is then off by at most l*u
# relative, and a weight gradient (forward through l layers, backward through the rest) by
# (DEPTH + 1)*u. Builds that round to nearest give ~sqrt(l)*u. Measured over seeds 0-5:
# at most 0.137 = 0.69 (DEPTH + 1) u under Eigen, 5.9e-3 under oneDNN. float16 conversions round to
# nearest in both builds (5.8e-4 under Eigen), so float16 keeps the MATCHES bound.
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
SIGNAL_MATCHES = {"mixed_float16": MATCHES["mixed_float16"],
                  "mixed_bfloat16": (DEPTH + 1) * UNIT_ROUNDOFF["bfloat16"]}
SEED = int(os.environ.get("MP_TEST_SEED", 0))
FIGURES = {}


@pytest.fixture(scope="module", autouse=True)
def _figures(request):
    yield
    lines = [f"{'quantity':44s} {'policy':15s} max rel. deviation from float32"]
    for (quantity, policy), value in sorted(FIGURES.items()):
        lines.append(f"{quantity:44s} {policy:15s} {value:.2e}")
    emit(request, "mixed_precision", {f"{q} | {p}": v for (q, p), v in FIGURES.items()}, lines)


def record(quantity, policy, deviation):
    FIGURES[(quantity, policy)] = max(FIGURES.get((quantity, policy), 0.0), float(deviation))
    return deviation


def rel_dev(a, b):
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return float(np.max(np.abs(a - b) / np.abs(b)))


def normal(shape, seed=SEED, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype("float32")


def deep_mlp(depth=DEPTH, width=64, kernel_initializer="glorot_uniform"):
    return keras.Sequential(
        [keras.Input((width,))]
        + [L.Dense(width, activation="relu", kernel_initializer=kernel_initializer,
                   name=f"d{i}") for i in range(depth)]
        + [L.Dense(10, name="logits")])


def conv_wn():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv",
                 kernel_initializer=GoodInit("wn_relu", seed=1))(inputs)
    x = WeightNormalization(L.Conv2D(8, 3, padding="same", activation="relu",
                                     kernel_initializer=GoodInit("wn_relu", seed=2)),
                            name="wn_conv")(x)
    x = WeightNormalization(L.DepthwiseConv2D(3, padding="same", activation="relu"),
                            name="wn_depthwise")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = WeightNormalization(L.Dense(16, activation="relu"), name="wn_dense")(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x))


def twins(build, policy):
    """The same model built under float32 and under `policy`, with identical weights."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(SEED)
    reference = build()
    keras.config.set_dtype_policy(policy)
    mixed = build()
    mixed.set_weights(reference.get_weights())
    return reference, mixed


def assert_float32_and_finite(model):
    for variable in model.weights:
        assert variable.dtype == "float32", variable.path
        assert np.isfinite(keras.ops.convert_to_numpy(variable.value)).all(), variable.path


def as_float64(tensor):
    return keras.ops.convert_to_numpy(keras.ops.cast(tensor, "float32")).astype("float64")


# ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_goodinit_and_weight_norm_keep_float32_variables_with_exact_norms(policy):
    keras.config.set_dtype_policy(policy)
    model = conv_wn()
    assert_float32_and_finite(model)
    conv = model.get_layer("conv")
    assert conv.compute_dtype == COMPUTE[policy]
    # The kernel was drawn in float32: its unit norms are the float32 ones, not rounded to half.
    norms = np.linalg.norm(conv.kernel.numpy().reshape(-1, 8).astype("float64"), axis=0)
    np.testing.assert_allclose(norms, math.sqrt(2 * 3 / 8), rtol=1e-6)
    out = model(normal((4, 8, 8, 3)))
    assert keras.backend.standardize_dtype(out.dtype) == COMPUTE[policy]


@pytest.mark.parametrize("policy", POLICIES)
def test_deep_lsuv_has_no_inf_nan_and_matches_float32(policy):
    match = MATCHES[policy]
    reference, mixed = twins(deep_mlp, policy)
    x = normal((256, 64))
    ref = lsuv_init(reference, x, seed=7, verbose=0)
    report = lsuv_init(mixed, x, seed=7, verbose=0)
    assert len(report.rows) == DEPTH + 1 and report.ok, report
    assert_float32_and_finite(mixed)
    out = as_float64(mixed(x, training=False))
    assert np.isfinite(out).all()
    assert abs(out.var() - 1.0) < 0.1 + match  # the last (linear) layer is a target
    before = [r.var_before for r in report.rows]
    assert record("lsuv var_before (50-layer MLP)", policy,
                  rel_dev(before, [r.var_before for r in ref.rows])) < match
    assert record("lsuv scale (50-layer MLP)", policy,
                  rel_dev([r.scale for r in report.rows], [r.scale for r in ref.rows])) < match
    assert all(abs(r.var_after - 1.0) < 0.1 for r in report.rows)
    # The weights themselves: the kernels of the two runs.
    kernel_dev = max(rel_dev(np.linalg.norm(a), np.linalg.norm(b))
                     for a, b in zip(mixed.get_weights(), reference.get_weights())
                     if a.ndim == 2)
    assert record("lsuv kernel norms (50-layer MLP)", policy, kernel_dev) < match


@pytest.mark.parametrize("policy", POLICIES)
def test_signal_report_at_init_matches_float32(policy):
    match = SIGNAL_MATCHES[policy]
    reference, mixed = twins(lambda: deep_mlp(kernel_initializer=GoodInit("wn_relu", seed=3)),
                             policy)
    x = normal((256, 64))
    ref = signal_report(reference, x)
    got = signal_report(mixed, x)
    assert [r.name for r in got.rows] == [r.name for r in ref.rows]
    for field in ("std", "norm_ratio", "grad_norm_ratio", "weight_grad_std"):
        values = got.column(field)
        assert np.isfinite(values).all(), field
        assert record(f"signal_report {field} (50-layer MLP)", policy,
                      rel_dev(values, ref.column(field))) < match, field
    # Variances (std**2) are what the note quotes.
    record("signal_report variance (50-layer MLP)", policy,
           rel_dev(got.column("std") ** 2, ref.column("std") ** 2))
    assert math.isfinite(got.loss) and got.loss == pytest.approx(ref.loss, rel=match)


@pytest.mark.parametrize("policy", POLICIES)
def test_weightnorm_data_init_matches_float32(policy):
    match = MATCHES[policy]
    reference, mixed = twins(conv_wn, policy)
    x = normal((64, 8, 8, 3), scale=2.0)
    ref = weightnorm_data_init(reference, x, verbose=0)
    report = weightnorm_data_init(mixed, x, verbose=0)
    assert [r.status for r in report.rows] == [r.status for r in ref.rows]
    assert [r.status for r in report.rows] == ["skipped", "ok", "ok", "ok", "skipped"]
    assert_float32_and_finite(mixed)
    ok = [i for i, r in enumerate(report.rows) if r.status == "ok"]
    assert record("wn data-init var_before (CNN)", policy, rel_dev(
        [report.rows[i].var_before for i in ok], [ref.rows[i].var_before for i in ok])) < match
    for name in ("wn_conv", "wn_depthwise", "wn_dense"):
        g_mixed, g_ref = mixed.get_layer(name).g.numpy(), reference.get_layer(name).g.numpy()
        assert record("wn data-init g (CNN)", policy, rel_dev(g_mixed, g_ref)) < match, name
        # b = -mu/sigma: relative errors e_mu (of mu, in units of sigma) and e_sigma give
        # |db| <= |b| e_sigma + e_mu, so the bound is MATCHES * (|b| + 1).
        b_mixed = mixed.get_layer(name).layer.bias.numpy().astype("float64")
        b_ref = reference.get_layer(name).layer.bias.numpy().astype("float64")
        b_dev = float(np.max(np.abs(b_mixed - b_ref) / (np.abs(b_ref) + 1.0)))
        assert record("wn data-init b, |db|/(|b|+1) (CNN)", policy, b_dev) < match, name


def test_float16_statistics_would_overflow_but_float32_ones_do_not():
    match = MATCHES["mixed_float16"]
    # A first-layer output with std ~400 is representable in float16 (|y| < 65504), but its
    # squared deviations are not: tf.nn.moments in float16 returns var = inf. The package
    # measures in float32, so the layer is rescaled exactly as in float32.
    x = normal((256, 64), scale=400.0)
    y = keras.ops.cast(x, "float16")
    assert not np.isfinite(float(keras.ops.var(y)))
    reference, mixed = twins(lambda: deep_mlp(depth=2), "mixed_float16")
    ref = lsuv_init(reference, x, seed=1, verbose=0)
    report = lsuv_init(mixed, x, seed=1, verbose=0)
    assert report.ok and report.rows[0].var_before > 1e5
    assert rel_dev(report.rows[0].var_before, ref.rows[0].var_before) < match
    assert rel_dev(report.rows[0].scale, ref.rows[0].scale) < match


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("method", ["lsuv", "weightnorm_data_init"])
def test_a_small_live_signal_is_not_taken_for_a_dead_one(policy, method):
    match = MATCHES[policy]
    # An input of scale 3e-4 gives first-layer outputs with std ~3e-4: small, but as
    # representable in half precision as any other (float16 normals start at 6e-5) and far
    # from constant. In float32 every layer is initialized; a dead-layer test with an
    # absolute floor of eps(compute dtype)**2 (9.5e-7 for float16, 6.1e-5 for bfloat16)
    # skips these layers under a mixed policy instead.
    if method == "lsuv":
        build, x, init = lambda: deep_mlp(depth=2), normal((256, 64), scale=3e-4), lsuv_init
    else:
        build, x, init = conv_wn, normal((64, 8, 8, 3), scale=3e-4), weightnorm_data_init
    reference, mixed = twins(build, policy)
    # The same seed makes LSUV's orthogonal pre-init draw the same kernels in both twins.
    kwargs = {"seed": 1} if method == "lsuv" else {}
    ref = init(reference, x, verbose=0, **kwargs)
    report = init(mixed, x, verbose=0, **kwargs)
    assert all(r.status == "ok" for r in ref.rows if r.reason != "not weight-normalized")
    assert [(r.status, r.reason) for r in report.rows] == [(r.status, r.reason)
                                                          for r in ref.rows]
    ok = [i for i, r in enumerate(ref.rows) if r.status == "ok"]
    assert rel_dev([report.rows[i].var_before for i in ok],
                   [ref.rows[i].var_before for i in ok]) < match


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("method", ["lsuv", "weightnorm_data_init"])
def test_callback_fit_save_and_bake_under_the_policy(policy, method, tmp_path):
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(SEED)
    model = conv_wn()
    schedule = QuadraticWarmup(0.0, 0.05, warmup_steps=4)
    model.compile(keras.optimizers.SGD(schedule), "mse", jit_compile=False)
    x, y = normal((64, 8, 8, 3)), normal((64, 3), seed=SEED + 1)
    callback = LSUVCallback(x[:32], method=method, verbose=0)
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    assert callback.report is not None
    assert [r.status for r in callback.report.rows if r.name != "conv" and
            r.name != "logits"] == ["ok"] * 3
    assert np.isfinite(history.history["loss"]).all()
    assert_float32_and_finite(model)
    expected = model.predict(x, verbose=0)
    path = tmp_path / "mixed.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("conv").compute_dtype == COMPUTE[policy]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    baked = bake_weight_norm(model)
    assert_float32_and_finite(baked)
    for name in ("wn_conv", "wn_depthwise", "wn_dense"):
        wrapper = model.get_layer(name)  # baked into a copy of the layer it wraps
        effective = keras.ops.convert_to_numpy(wrapper.normalized_kernel())
        np.testing.assert_array_equal(baked.get_layer(wrapper.layer.name).kernel.numpy(),
                                      effective)
    # Same float32 weights; but the wrapper feeds its layer a float32 kernel while the baked
    # layer casts its kernel to half, so the two differ by half-precision roundings (unit
    # roundoff u) accumulated over five layers, bounded by RELATIVE_BAKE u in relative L2.
    expected, got = as_float64(model(x)), as_float64(baked(x))
    u = UNIT_ROUNDOFF[COMPUTE[policy]]
    error = np.linalg.norm(got - expected) / np.linalg.norm(expected) / u
    assert record(f"bake: output rel. L2 error / u ({method})", policy, error) < RELATIVE_BAKE
