"""Figure 1 of Arpit et al. (2019): the checks science.md §1 says the theory predicts.

Real Keras networks built from the package's layers by `keras_goodinit.propagation`
(bias-free `WeightNormalization(Dense(..., kernel_initializer=GoodInit(...)))`),
untrained, fed x ~ N(0, I_500) (1000 samples); `norm_ratios` gives, with one
`tf.GradientTape` pass, forward[l] = ||h_l|| / ||x|| and
backward[l] = ||dh_l|| / ||dh_L|| for the loss sum(h_L * r), r a fixed Gaussian probe.

How every band below is derived
-------------------------------
Mean. Let a layer map h (width n_in) to relu(W^T h) (width n_out), with every
column of W of norm g and a random direction, independent of h. Then
E||W^T h||^2 = g^2 (n_out / n_in) ||h||^2 and, the sign of each pre-activation
being a fair coin independent of its size (W -> W D, D = diag(+-1), leaves the
distribution unchanged), the ReLU keeps half: E||h_out||^2 = g^2 n_out / (2 n_in) ||h||^2,
exactly, for any h. Multiplying over layers, E[forward_l^2] is the product of these
factors: a martingale with known mean ("center" below).

Spread. Relative variance of one layer's step ||h_out||^2 / ||h||^2, single input:
- sign coin: Var(sum_j eps_j z_j^2) / (E ...)^2 = sum E z_j^4 / (sum E z_j^2)^2 = 3 / n_out
  (E z^4 = 3 (E z^2)^2 for the near-Gaussian z_j);
- |z| part: 2 / n_out for Gaussian directions (chi-square); for orthonormal directions
  projecting onto a random n_out-dim subspace of R^n_in, Beta: 2 (1 - n_out/n_in) / n_out
  (about 0 when n_out > n_in: the rows are orthonormal and keep ||h||).
So at most 5 / n_out; backward (mask coin on n_out units, then W's n_in-dim image)
at most 3 / n_out + 2 / n_in. Both are <= v = 5 / min(n_in, n_out), used for every layer.
For a batch, Minkowski (sd of a sum <= sum of sds) keeps the relative spread of the
total energy below the single-input one. Martingale increments are uncorrelated, so
log(ratio^2) has variance <= sum v over the layers crossed, hence
    sd(log ratio) <= s = sqrt(sum v) / 2,  E log ratio in [log center - s^2, log center]
(lognormal: the log sits var/2 below the log of the mean square). The band is
[log center - s^2 - 3 s, log center + 3 s]. Why 3: for a Gaussian walk the chance of ever
leaving a +-3 s_l envelope within 20-40 steps is about 2% with s exact; s is an upper
bound (orthonormal directions give 3/n instead of 5/n, batch averaging less still), which
leaves well under 1%. Single steps (layer to layer) are checked at 4 sd: there are 480 of
them here (about 400 independent), for which 4 sd of a tight bound would give a
family-wise false-alarm rate of about 3% (Bonferroni); with the bound's slack
(4 bound-sd >= 5 true sd) it is below 0.1%.

Seeds are fixed: the results are deterministic; the bands say how far theory lets them be.
"""

import functools
import re

import keras
import numpy as np
import pytest

from keras_goodinit.propagation import mlp_chain, norm_ratios, residual_chain

INPUT_WIDTH = 500
SAMPLES = 1000
DEPTH = 20
NUM_BLOCKS = 40
BAND_SIGMAS = 3.0
STEP_SIGMAS = 4.0


@functools.cache
def _inputs() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((SAMPLES, INPUT_WIDTH)).astype("float32")


@functools.cache
def _mlp_widths(center: int) -> tuple[int, ...]:
    hidden = np.random.default_rng(center).integers(round(0.8 * center), round(1.2 * center) + 1,
                                                    size=DEPTH)
    return (INPUT_WIDTH, *(int(n) for n in hidden))


@functools.cache
def _mlp_ratios(center: int, proposed: bool):
    return norm_ratios(mlp_chain(_mlp_widths(center), proposed=proposed, seed=0), _inputs())


@functools.cache
def _resnet_ratios(branch_width: int, proposed: bool):
    model = residual_chain(INPUT_WIDTH, branch_width, NUM_BLOCKS, proposed=proposed, seed=0)
    return norm_ratios(model, _inputs())


def _band(log_center, variances):
    """Log-band for ratios whose log-variance accumulates `variances` (see module docstring)."""
    s = 0.5 * np.sqrt(np.asarray(variances))
    return log_center - s**2 - BAND_SIGMAS * s, log_center + BAND_SIGMAS * s


def _assert_in_band(what, measured, low, high):
    log_measured = np.log(measured)
    bad = np.flatnonzero((log_measured < low) | (log_measured > high))
    assert bad.size == 0, (
        f"{what} leaves the theory band at index {bad.tolist()}: measured "
        f"{np.round(measured[bad], 5).tolist()}, band "
        f"{np.round(np.exp(low[bad]), 5).tolist()}..{np.round(np.exp(high[bad]), 5).tolist()}"
    )


def _assert_steps(what, ratios, log_step_center, step_variances):
    """Layer-to-layer factors within STEP_SIGMAS sd of theory.

    Backward factors are read against the direction they accumulate in, so the
    lognormal drift s^2 is allowed on either side.
    """
    steps = np.diff(np.log(ratios))
    s = 0.5 * np.sqrt(np.asarray(step_variances))
    low = log_step_center - s**2 - STEP_SIGMAS * s
    high = log_step_center + s**2 + STEP_SIGMAS * s
    bad = np.flatnonzero((steps < low) | (steps > high))
    assert bad.size == 0, (
        f"{what}: factors {np.round(np.exp(steps[bad]), 4).tolist()} at steps {bad.tolist()}, "
        f"theory {np.round(np.exp(log_step_center[bad]), 4).tolist()} "
        f"+- {STEP_SIGMAS} sd ({np.round(s[bad], 4).tolist()} in log)"
    )


def _mlp_theory(center):
    n = np.asarray(_mlp_widths(center), dtype=float)
    v = 5.0 / np.minimum(n[:-1], n[1:])  # v_l for layers l = 1..L
    forward_var = np.cumsum(v)  # layers 1..L, from the input up
    backward_var = np.cumsum(v[::-1])[::-1]  # layers 0..L-1, from the top down
    return n, v, forward_var, backward_var


# ------------------------------------------------------------------------------------------
# (a) 20-layer ReLU MLP
#
# Forward: with the proposed g^2 = 2 n_{l-1} / n_l every factor g^2 n_l / (2 n_{l-1}) is 1,
# so the center is 1 at every layer. With g = 1 the factor is n_l / (2 n_{l-1}), and the
# product telescopes: center_l = 2^(-l/2) sqrt(n_l / n_0) (~0.707 per layer, ~1e-3 at l = 20).
#
# Backward: dh_{l-1} = W_l (dh_l * m_l), m_l the 0/1 ReLU mask of layer l. Mean field
# (gradient independence): the mask keeps half of ||dh_l||^2, and W_l, n_l columns of norm
# g_l in random directions, gives E||W_l u||^2 = g_l^2 ||u||^2. So
#     E||dh_{l-1}||^2 = g_l^2 / 2 ||dh_l||^2 = (n_{l-1} / n_l) ||dh_l||^2   (proposed g),
# which telescopes to ||dh_l||^2 / ||dh_L||^2 = n_l / n_L: backward center sqrt(n_l / n_L).
# With g = 1 each layer halves the squared norm: center 2^(-(L - l)/2), ~1e-3 at the input.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("center", [200, 1000])
def test_mlp_proposed_g_keeps_forward_and_backward_norms_in_band(center):
    n, v, forward_var, backward_var = _mlp_theory(center)
    forward, backward = _mlp_ratios(center, True)

    _assert_in_band(f"width {center} forward", forward[1:], *_band(0.0, forward_var))
    _assert_steps(f"width {center} forward", forward, np.zeros(DEPTH), v)

    log_center = 0.5 * np.log(n[:-1] / n[-1])
    _assert_in_band(f"width {center} backward", backward[:-1], *_band(log_center, backward_var))
    _assert_steps(f"width {center} backward", backward, 0.5 * np.log(n[1:] / n[:-1]), v)


@pytest.mark.parametrize("center", [200, 1000])
def test_mlp_unit_g_decays_geometrically_and_gradients_collapse(center):
    n, v, forward_var, backward_var = _mlp_theory(center)
    forward, backward = _mlp_ratios(center, False)
    layers = np.arange(DEPTH + 1)

    log_center = -0.5 * layers[1:] * np.log(2.0) + 0.5 * np.log(n[1:] / n[0])
    _assert_in_band(f"width {center} g=1 forward", forward[1:], *_band(log_center, forward_var))
    _assert_steps(f"width {center} g=1 forward", forward, 0.5 * np.log(n[1:] / (2 * n[:-1])), v)
    # It leaves the proposed network's band.
    proposed_low = _band(0.0, forward_var)[0]
    assert np.log(forward[-1]) < proposed_low[-1], forward[-1]

    log_center = -0.5 * (DEPTH - layers[:-1]) * np.log(2.0)
    _assert_in_band(f"width {center} g=1 backward", backward[:-1],
                    *_band(log_center, backward_var))
    _assert_steps(f"width {center} g=1 backward", backward, np.full(DEPTH, 0.5 * np.log(2.0)), v)
    proposed_low = _band(0.5 * np.log(n[0] / n[-1]), backward_var[0])[0]
    assert np.log(backward[0]) < proposed_low, backward[0]


# ------------------------------------------------------------------------------------------
# (b) 40-block ResNet h <- h + F(h), F(h) = W1^T relu(W0^T h), stream n = 500, branch m.
#
# Mean: the branch scales the energy by c = E||F||^2 / ||h||^2. Proposed:
# g0^2 m / (2n) = 1 and g1^2 n / m = 1/N, so c = 1/N; g = 1: (m / 2n) (n / m) = 1/2.
# W1 is independent of h and u = relu(W0^T h), so E<h, F> = 0 and
# E||h_b||^2 = (1 + c) ||h_{b-1}||^2: center (1 + c)^(b/2), sqrt(1.025^40) = 1.64 at
# block 40 (proposed), sqrt(1.5) per block (g = 1). Backward, dh_{b-1} = dh_b + J_F^T dh_b
# with E||J_F^T d||^2 = g1^2 (1/2) g0^2 ||d||^2 = c ||d||^2: the same (1 + c) per block,
# counted from the top.
#
# Spread per block, relative to ||h||^2: the cross term 2<h, F> = 2 sum_k h_k (w1_k . u)
# has variance 4 ||h||^2 g1^2 ||u||^2 / m = 4 c ||h||^4 / n; ||F||^2 = c ||h||^2 (1 + delta)
# with Var(delta) <= 10 / min(m, n) (two layers, 5 / min(m, n) each, as for the MLP). So
# sd(step) <= sqrt(4c/n) + c sqrt(10 / min(m, n)), divided by (1 + c) for the log. The
# backward cross term d^T W0 (mask * W1 d) has the same variance (4 c / n).
# ------------------------------------------------------------------------------------------


def _resnet_theory(branch_width, c):
    sd = np.sqrt(4 * c / INPUT_WIDTH) + c * np.sqrt(10.0 / min(branch_width, INPUT_WIDTH))
    v = np.full(NUM_BLOCKS, (sd / (1 + c)) ** 2)
    return v, np.cumsum(v), np.cumsum(v[::-1])[::-1]


@pytest.mark.parametrize("branch_width", [200, 1000])
@pytest.mark.parametrize("proposed", [True, False], ids=["proposed", "g=1"])
def test_resnet_norms_follow_one_plus_c_per_block(branch_width, proposed):
    c = 1.0 / NUM_BLOCKS if proposed else 0.5
    v, forward_var, backward_var = _resnet_theory(branch_width, c)
    forward, backward = _resnet_ratios(branch_width, proposed)
    blocks = np.arange(NUM_BLOCKS + 1)
    step = 0.5 * np.log1p(c)
    what = f"m={branch_width} {'proposed' if proposed else 'g=1'}"

    _assert_in_band(f"{what} forward", forward[1:], *_band(blocks[1:] * step, forward_var))
    _assert_steps(f"{what} forward", forward, np.full(NUM_BLOCKS, step), v)
    _assert_in_band(f"{what} backward", backward[:-1],
                    *_band((NUM_BLOCKS - blocks[:-1]) * step, backward_var))
    _assert_steps(f"{what} backward", backward, np.full(NUM_BLOCKS, -step), v)

    # Bounded vs exploding: each network's value at the last block lies outside the other
    # network's band (1.64 vs 3325 at the centers).
    other_c = 0.5 if proposed else 1.0 / NUM_BLOCKS
    other_low, other_high = _band(NUM_BLOCKS * 0.5 * np.log1p(other_c),
                                  _resnet_theory(branch_width, other_c)[1][-1])
    for ratio in (forward[-1], backward[0]):
        if proposed:
            assert np.log(ratio) < other_low, ratio
        else:
            assert np.log(ratio) > other_high, ratio


# ------------------------------------------------------------------------------------------
# The measuring tools themselves.
# ------------------------------------------------------------------------------------------


def _kernels_and_scales(model):
    wrappers = [layer for layer in model.layers if hasattr(layer, "g")]
    return ([np.asarray(w.v) for w in wrappers], [np.asarray(w.g) for w in wrappers])


def test_chains_give_every_layer_its_own_kernel_and_the_right_scales():
    widths = [12, 10, 10, 10]
    proposed = mlp_chain(widths, seed=3)
    unit = mlp_chain(widths, proposed=False, seed=3)
    assert len(proposed.outputs) == 3
    kernels, scales = _kernels_and_scales(proposed)
    unit_kernels, unit_scales = _kernels_and_scales(unit)
    assert not np.allclose(kernels[1], kernels[2])  # same shape, own seed
    for n_in, n_out, kernel, g, unit_kernel, unit_g in zip(
            widths[:-1], widths[1:], kernels, scales, unit_kernels, unit_scales, strict=True):
        np.testing.assert_allclose(g, np.sqrt(2 * n_in / n_out), rtol=1e-5)
        np.testing.assert_allclose(unit_g, 1.0, rtol=1e-5)
        # Same directions, different scale.
        np.testing.assert_allclose(unit_kernel * np.sqrt(2 * n_in / n_out), kernel, atol=1e-5)

    resnet = residual_chain(8, 4, 3, seed=1)
    assert len(resnet.outputs) == 3
    scales = _kernels_and_scales(resnet)[1]
    np.testing.assert_allclose(np.concatenate(scales[0::2]), np.sqrt(2 * 8 / 4), rtol=1e-5)
    np.testing.assert_allclose(np.concatenate(scales[1::2]), np.sqrt(4 / (3 * 8)), rtol=1e-5)
    unit_scales = _kernels_and_scales(residual_chain(8, 4, 3, proposed=False, seed=1))[1]
    np.testing.assert_allclose(np.concatenate(unit_scales), 1.0, rtol=1e-5)


def test_norm_ratios_are_normalized_at_their_reference_layer():
    x = np.random.default_rng(0).standard_normal((16, 12)).astype("float32")
    forward, backward = norm_ratios(mlp_chain([12, 10, 14, 14], seed=3), x)
    assert forward.shape == backward.shape == (4,)
    assert forward[0] == 1.0 and backward[-1] == 1.0
    assert np.all(np.isfinite(forward)) and np.all(backward > 0)
    # One layer: Keras returns a bare tensor rather than a one-element list.
    forward, backward = norm_ratios(mlp_chain([12, 10], seed=3), x)
    assert forward.shape == backward.shape == (2,)


def _side_branch_model():
    """Outputs [h1, side, h2] where `side` is computed from h1 but feeds nothing."""
    inputs = keras.Input((6,))
    h1 = keras.layers.Dense(5, activation="relu", name="h1")(inputs)
    side = keras.layers.Dense(4, name="side")(h1)
    h2 = keras.layers.Dense(3, name="h2")(h1)
    return keras.Model(inputs, [h1, side, h2])


def test_norm_ratios_reject_an_activation_that_does_not_feed_the_last():
    model = _side_branch_model()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="must feed the last one.*Received: model="):
        norm_ratios(model, np.ones((4, 6), "float32"))
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_norm_ratios_of_an_output_that_is_the_input():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(4, name="h")(inputs)
    x = np.random.default_rng(1).standard_normal((8, 6)).astype("float32")
    forward, backward = norm_ratios(keras.Model(inputs, [inputs, h]), x)
    # h_1 = x itself: its forward ratio is 1 and its gradient is x's.
    assert forward[1] == 1.0 and backward[1] == backward[0]


def test_norm_ratios_reject_an_output_that_is_no_activation_list():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(4)(inputs)
    with pytest.raises(ValueError, match="list of its per-layer activations"):
        norm_ratios(keras.Model(inputs, {"h": h}), np.ones((2, 6), "float32"))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: mlp_chain([500]), "widths=[500]"),
    (lambda: mlp_chain("abc"), "widths='abc'"),
    (lambda: mlp_chain([5, 0, 3]), "widths=[5, 0, 3]"),
    (lambda: mlp_chain([5, 2.5]), "widths=[5, 2.5]"),
    (lambda: mlp_chain([5, 3], proposed="yes"), "proposed='yes'"),
    (lambda: mlp_chain([5, 3], distribution="uniform"), "distribution='uniform'"),
    (lambda: mlp_chain([5, 3], seed=-1), "seed=-1"),
    (lambda: mlp_chain([5, 3], seed=True), "seed=True"),
    (lambda: residual_chain(0, 4, 3), "width=0"),
    (lambda: residual_chain(8, -4, 3), "branch_width=-4"),
    (lambda: residual_chain(8, 4, 2.0), "num_blocks=2.0"),
    (lambda: residual_chain(8, 4, 3, seed=1.5), "seed=1.5"),
    (lambda: norm_ratios("model", np.zeros((2, 3))), "model='model'"),
    (lambda: norm_ratios(mlp_chain([3, 2]), np.zeros((3,))), "x with shape (3,)"),
])
def test_propagation_rejects_bad_arguments(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
