"""The sweep as one traced program (issue 9): same results as the eager sweep, traced once.

Each model kind is initialized twice from identical weights, once through the
compiled pass (`compile="auto"`, which is `tf.function` on a CPU) and once
eagerly: the scales, statistics and statuses must agree to float32 rounding.
The unit-variance claims themselves are checked independently in
test_lsuv.py, which runs on the compiled path by default.
"""

import logging
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from _rounding import assert_signal_agrees, longest_sum, magnitude, reordered  # noqa: E402
from keras import layers as L  # noqa: E402
from test_lsuv import (  # noqa: E402
    Shuffled,
    _Batches,
    counting_calls,
    image_zoo,
    kernel_layers,
    mlp,
    normal,
    sequence_zoo,
    small_resnet,
    two_input_model,
    wn_model,
)

from keras_goodinit import (  # noqa: E402
    WeightNormalization,
    _sweep,
    lsuv_init,
    signal_report,
    weightnorm_data_init,
)

# The two paths run the same float32 ops on the same values; only the order of
# float64 scalar ops and of graph-optimized float32 reductions may differ
# (tests/_rounding.py). LSUV renormalizes every layer, so a layer's statistic carries
# the rounding of two layers' sums, its own and the one that set its input's scale,
# not the whole chain's: 2 sqrt(n) eps with n = 2048 (the largest sum of squares here,
# over a 64 x 32 output) is 1.1e-5.
ROUNDING = 1e-5


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(4321)


def shared_model():
    shared = L.Dense(16, activation="relu", name="shared")
    inputs = keras.Input((16,))
    return keras.Model(inputs, L.Dense(3, name="head")(shared(shared(inputs))))


def masked_model():
    inputs = keras.Input((12,), dtype="int32")
    h = L.Embedding(20, 6, mask_zero=True, name="embed")(inputs)
    h = L.Dense(16, name="d0")(h)
    return keras.Model(inputs, L.Dense(4, name="out")(L.ReLU()(h)))


def masked_wn_model():
    inputs = keras.Input((12,), dtype="int32")
    h = L.Embedding(20, 6, mask_zero=True, name="embed")(inputs)
    return keras.Model(inputs, WeightNormalization(L.Dense(8), name="wn")(h))


def time_model():
    inputs = keras.Input((5, 6))
    h = L.TimeDistributed(WeightNormalization(L.Dense(8), name="wn"), name="td")(inputs)
    return keras.Model(inputs, L.Dense(3, name="out")(h))


def biased_mlp():
    """Biases of +-2: the pre-activation iteration takes several steps, not one."""
    model = mlp(depth=2)
    for name in ("d0", "d1"):
        bias = model.get_layer(name).bias
        bias.assign(np.where(np.arange(32) % 2 == 0, 2.0, -2.0).astype("float32"))
    return model


def tokens():
    rng = np.random.default_rng(4)
    lengths = rng.integers(2, 8, size=64)
    return np.where(np.arange(12) < lengths[:, None], rng.integers(1, 20, (64, 12)),
                    0).astype("int32")


KINDS = {
    "sequential": (lambda: mlp(depth=3), lambda: normal((64, 16), 1, scale=3.0)),
    "biased": (biased_mlp, lambda: normal((64, 16), 2)),
    "functional_nested": (two_input_model, lambda: {"a": normal((64, 12), 3),
                                                    "b": normal((64, 8), 4, scale=5.0)}),
    "subclassed": (Shuffled, lambda: normal((64, 16), 5, scale=0.2)),
    "image_zoo": (image_zoo, lambda: normal((16, 8, 8, 3), 6)),
    "sequence_zoo": (sequence_zoo, lambda: normal((16, 10, 4), 7)),
    "resnet_bn": (small_resnet, lambda: normal((16, 8, 8, 3), 8)),
    "shared": (shared_model, lambda: normal((64, 16), 9, scale=3.0)),
    "masked": (masked_model, tokens),
    "time_distributed": (time_model, lambda: normal((32, 5, 6), 10)),
}


def twins(build, x):
    """Two models with identical weights, both built on `x`."""
    first = build()
    first(x)
    second = build()
    second(x)
    second.set_weights(first.get_weights())
    return first, second


def _unnamed(reason):
    # The twins' auto-named layers differ ("add" and "add_2", in a path "block1/add" since
    # issue 18): compare what reasons say.
    return re.sub(r"'([\w/]*?)(_\d+)?'", r"'\1'", reason)


def assert_same_rows(compiled, eager):
    assert [r.name for r in compiled.rows] == [r.name for r in eager.rows]
    for a, b in zip(compiled.rows, eager.rows):
        assert (a.status, a.iterations, _unnamed(a.reason)) == (
            b.status, b.iterations, _unnamed(b.reason)), a.name
        for field in ("scale", "var_before", "var_after", "target_var"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=ROUNDING,
                                       err_msg=f"{a.name}.{field}")


def assert_same_weights(first, second, rtol=ROUNDING):
    for v, a, b in zip(first.weights, first.get_weights(), second.get_weights()):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-7, err_msg=v.path)


@pytest.mark.parametrize("measure", ["pre_activation", "post_activation"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_compiled_and_eager_sweeps_give_the_same_scales(kind, measure):
    build, data = KINDS[kind]
    x = data()
    compiled_model, eager_model = twins(build, x)
    compiled = lsuv_init(compiled_model, x, measure=measure, seed=1, verbose=0)
    eager = lsuv_init(eager_model, x, measure=measure, seed=1, compile="eager", verbose=0)
    assert compiled.mode == "compiled" and eager.mode == "eager"
    assert not compiled.notes or "eager" not in " ".join(compiled.notes)
    assert [r for r in compiled.rows if r.status == "ok"]  # something was initialized
    assert_same_rows(compiled, eager)
    assert_same_weights(compiled_model, eager_model)


@pytest.mark.parametrize("kind", ["time_distributed", "masked", "image_zoo"])
def test_weightnorm_data_init_compiled_and_eager_agree(kind):
    build, data = {"time_distributed": KINDS["time_distributed"],
                   "masked": (masked_wn_model, tokens),
                   "image_zoo": (wn_model, lambda: normal((32, 8, 8, 3), 11))}[kind]
    x = data()
    compiled_model, eager_model = twins(build, x)
    compiled = weightnorm_data_init(compiled_model, x, verbose=0)
    eager = weightnorm_data_init(eager_model, x, compile="eager", verbose=0)
    assert compiled.mode == "compiled" and eager.mode == "eager"
    assert any(r.status == "ok" for r in compiled.rows)
    assert_same_rows(compiled, eager)
    assert_same_weights(compiled_model, eager_model)


def test_new_batch_per_trial_compiled_and_eager_agree():
    xs = [normal((128, 16), 20 + i) for i in range(6)]
    compiled_model, eager_model = twins(biased_mlp, xs[0])
    compiled = lsuv_init(compiled_model, _Batches(xs), new_batch_per_trial=True, seed=3,
                         verbose=0)
    eager = lsuv_init(eager_model, _Batches(xs), new_batch_per_trial=True, seed=3,
                      compile="eager", verbose=0)
    assert compiled.mode == "compiled" and compiled.batches == eager.batches > 1
    assert_same_rows(compiled, eager)
    assert_same_weights(compiled_model, eager_model)


def test_xla_gives_the_same_scales():
    x = {"a": normal((64, 12), 12), "b": normal((64, 8), 13, scale=5.0)}
    xla_model, eager_model = twins(two_input_model, x)
    xla = lsuv_init(xla_model, x, compile="xla", seed=2, verbose=0)
    eager = lsuv_init(eager_model, x, compile="eager", seed=2, verbose=0)
    assert xla.mode == "xla" and xla.ok
    assert_same_rows(xla, eager)


# ----------------------------------------------------------------------------
# signal_report: forward, loss and backward as one traced function.

_SIGNAL_FIELDS = ("mean", "std", "norm_ratio", "grad_norm_ratio", "weight_grad_std")
_BLOCK_FIELDS = ("squared_mean", "variance", "branch_variance", "skip_variance")


def assert_same_signal(compiled, eager, n):
    """The two reports agree to the rounding of their passes (tests/_rounding.py), with
    `n` the longest sum of the pass; a residual block and the loss are at most L + 1 deep."""
    assert [r.name for r in compiled.rows] == [r.name for r in eager.rows]
    assert (compiled.loss_name, compiled.grad_reference) == (eager.loss_name,
                                                             eager.grad_reference)
    depth = len(eager.rows)
    np.testing.assert_allclose(compiled.loss, eager.loss, rtol=reordered(depth + 1, n))
    assert_signal_agrees({f: compiled.column(f) for f in _SIGNAL_FIELDS},
                         {f: eager.column(f) for f in _SIGNAL_FIELDS}, n)
    assert [b.name for b in compiled.blocks] == [b.name for b in eager.blocks]
    for field in _BLOCK_FIELDS:
        np.testing.assert_allclose(compiled.block_column(field), eager.block_column(field),
                                   rtol=reordered(depth + 1, n), err_msg=field)
    assert compiled.samples.keys() == eager.samples.keys()
    for j, row in enumerate(eager.rows, 1):  # the same positions, drawn from the seed
        if row.name in eager.samples:
            sample = eager.samples[row.name]
            np.testing.assert_allclose(compiled.samples[row.name], sample, rtol=0,
                                       atol=reordered(j, n, magnitude(sample)),
                                       err_msg=row.name)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_signal_report_compiled_and_eager_agree(kind):
    build, data = KINDS[kind]
    x = data()
    model = build()
    model(x)
    before = model.get_weights()
    compiled = signal_report(model, x, seed=3)
    eager = signal_report(model, x, seed=3, compile="eager")
    assert compiled.mode == "compiled" and eager.mode == "eager" and not compiled.note
    assert np.isfinite(compiled.column("grad_norm_ratio")).any()
    assert_same_signal(compiled, eager, longest_sum(model, x))
    if kind == "resnet_bn":
        assert compiled.blocks  # the residual curves come from the traced pass too
    assert_same_weights_as(model, before)


def assert_same_weights_as(model, values):
    for a, b in zip(model.get_weights(), values):
        assert a.tobytes() == b.tobytes()


def test_signal_report_xla_and_training_mode_agree_with_eager():
    x = normal((16, 8, 8, 3), 8)
    model = small_resnet()
    model(x)
    labels = np.arange(16) % 3
    for training in (False, True):
        xla = signal_report(model, (x, labels), training=training, compile="xla")
        eager = signal_report(model, (x, labels), training=training, compile="eager")
        assert xla.mode == "xla" and xla.training == training
        # XLA fuses and reorders the convolutions' and (training) batch norms' sums: on an
        # AVX2 CPU a sample of a depth-5 conv was off by 1.3e-6, here by up to 2.2e-6 over
        # seeds 0-2, against reordered(5, 8192, 2.2) = 1.2e-4 (_rounding.py); a wrong mode
        # or layer is off by O(1).
        assert_same_signal(xla, eager, longest_sum(model, x))


def _softmax_head(units=4):
    return keras.Sequential([keras.Input((16,)), L.Dense(16, activation="relu", name="d0"),
                             L.Dense(units, activation="softmax", name="probs")])


def test_signal_report_reuses_the_traced_pass_for_new_labels():
    model = _softmax_head()
    x = normal((32, 16), 30)
    targets = [layer for _, layer in kernel_layers(model)]
    first = signal_report(model, (x, np.arange(32) % 4))
    assert first.loss_name == "sparse_categorical_crossentropy from probabilities vs y"
    # New values of the same kind (class indices, all classes present): the cached function.
    with counting_calls(targets) as counts:
        second = signal_report(model, (x * 2, (np.arange(32) + 1) % 4))
    assert counts == {} and second.mode == "compiled"
    assert second.loss != pytest.approx(first.loss)
    assert second.loss_name == first.loss_name
    # One-hot rows are another loss: a new trace, and the right name.
    with counting_calls(targets) as counts:
        third = signal_report(model, (x, np.eye(4)[np.arange(32) % 4]))
    assert counts == {"d0": 1, "probs": 1}
    assert third.loss_name == "categorical_crossentropy from probabilities vs y"
    assert third.loss == pytest.approx(first.loss, rel=ROUNDING)


def test_signal_report_class_indices_out_of_range_are_refused_on_a_cached_pass():
    model = _softmax_head()
    x = normal((32, 16), 31)
    signal_report(model, (x, np.arange(32) % 4))
    with pytest.raises(ValueError, match=r"integers in \[0, 4\).*values in \[0, 4\]"):
        signal_report(model, (x, np.arange(32) % 5))


def test_signal_report_logits_and_probabilities_are_told_apart_in_the_pass():
    # One traced function serves both: whether the output sums to 1 is decided in the graph.
    model = keras.Sequential([keras.Input((4,)), L.Dense(4, use_bias=False, name="out",
                                                         kernel_initializer="identity")])
    rng = np.random.default_rng(32)
    logits = rng.normal(size=(16, 4)).astype("float32")
    probs = rng.dirichlet(np.ones(4), size=16).astype("float32")
    labels = np.arange(16) % 4
    got = {name: signal_report(model, (x, labels)) for name, x in
           (("logits", logits), ("probabilities", probs))}
    for kind, report in got.items():
        assert report.loss_name == f"sparse_categorical_crossentropy from {kind} vs y"
    expected = -np.mean(np.log(probs[np.arange(16), labels]))
    assert got["probabilities"].loss == pytest.approx(float(expected), rel=1e-5)


def test_signal_report_untraceable_model_or_loss_falls_back_to_eager():
    x = normal((64, 16), 33)
    model = _HostSideEffect()
    model(x)
    report = signal_report(model, x)
    assert report.mode == "eager" and "could not be traced" in report.note
    assert_same_signal(report, signal_report(model, x, compile="eager"), longest_sum(model, x))

    def host_loss(y_true, y_pred):  # a Python branch on a value: not traceable
        if float(keras.ops.max(y_pred)) > 1e30:
            return keras.ops.max(y_pred)
        return keras.ops.mean(keras.ops.square(y_pred - y_true))

    plain = mlp(depth=1)
    y = np.zeros((64, 4), "float32")
    report = signal_report(plain, (x, y), loss=host_loss)
    assert report.mode == "eager" and "could not be traced" in report.note
    assert np.all(np.isfinite(report.column("grad_norm_ratio")))  # differentiable eagerly
    # A forced compiled mode says what cannot be traced, and why (issue 17).
    with pytest.raises(ValueError, match=r"cannot be traced.*float\(\) argument.*"
                                         r"Received: compile='compiled'"):
        signal_report(plain, (x, y), loss=host_loss, compile="compiled")


# ----------------------------------------------------------------------------
# Traced once; no retracing warnings.


def test_a_second_init_reuses_the_traced_pass():
    model = two_input_model()
    x = {"a": normal((32, 12), 14), "b": normal((32, 8), 15)}
    model(x)
    targets = [layer for _, layer in kernel_layers(model)]
    with counting_calls(targets) as counts:
        first = lsuv_init(model, x, verbose=0)
    # Traced: each layer's Python runs once, for the init pass (no measuring pass is needed
    # for Keras' own float32 layers).
    assert counts == {layer.name: 1 for layer in targets}
    with counting_calls(targets) as counts:
        second = lsuv_init(model, x, pre_init=None, verbose=0)
    assert counts == {}  # no trace and no eager pass: the cached program ran
    assert second.mode == first.mode == "compiled" and first.ok
    # Already at unit variance: the cached program read the new weights, not the old ones.
    assert all(r.iterations == 0 and r.status == "ok" for r in second.rows), second
    # A new input signature is a new trace.
    with counting_calls(targets) as counts:
        lsuv_init(model, {k: v[:16] for k, v in x.items()}, verbose=0)
    assert counts == {layer.name: 1 for layer in targets}


def test_post_activation_through_a_separate_layer_reuses_the_traced_pass():
    # The follower layers are part of the cache key; new Target objects per call must not be.
    model = keras.Sequential([keras.Input((12,)), L.Dense(16, name="d0"), L.ReLU(),
                              L.Dense(16, name="d1"), L.ReLU(), L.Dense(3, name="out")])
    x = normal((32, 12), 16)
    targets = [layer for _, layer in kernel_layers(model)]
    lsuv_init(model, x, measure="post_activation", verbose=0)
    with counting_calls(targets) as counts:
        second = lsuv_init(model, x, measure="post_activation", pre_init=None, verbose=0)
    assert counts == {} and second.mode == "compiled"


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_no_retracing_warning_on_a_model_of_many_shapes():
    # Every layer a new output shape: a tf.function retraced per shape would warn.
    layers = [keras.Input((4,))] + [L.Dense(4 + i, activation="relu") for i in range(12)]
    model = keras.Sequential(layers)
    # Tall kernels of six shapes, (64, k) and (k, 64): the pre-init's QR per shape.
    tall = [keras.Input((64,))]
    for k in range(4, 28, 4):
        tall += [L.Dense(k, activation="relu"), L.Dense(64, activation="relu")]
    tall_model = keras.Sequential(tall)
    handler = _Collect()
    tf.get_logger().addHandler(handler)
    try:
        for function in (lsuv_init, weightnorm_data_init):
            for compile in ("auto", "eager"):
                function(model, normal((32, 4), 16), compile=compile, verbose=0)
        for seed in range(6):  # a new trace per seed, each its own tf.function
            signal_report(model, normal((32, 4), 16), seed=seed)
        lsuv_init(tall_model, normal((32, 64), 17), verbose=0)
    finally:
        tf.get_logger().removeHandler(handler)
    assert not [m for m in handler.messages if "retracing" in m], handler.messages


# ----------------------------------------------------------------------------
# Fallbacks and the compile argument.


class _HostSideEffect(keras.Model):
    """Reads a tensor on the host in `call`: it cannot be traced."""

    def __init__(self):
        super().__init__()
        self.first = L.Dense(16, activation="relu", name="first")
        self.head = L.Dense(2, name="head")
        self.peaks = []

    def call(self, x):
        h = self.first(x)
        self.peaks.append(float(keras.ops.convert_to_numpy(keras.ops.max(h))))
        return self.head(h)


def test_an_untraceable_model_falls_back_to_eager_and_says_so():
    x = normal((64, 16), 17, scale=2.0)
    auto_model, eager_model = twins(_HostSideEffect, x)
    report = lsuv_init(auto_model, x, seed=5, verbose=0)
    assert report.mode == "eager" and report.ok
    assert any("could not be traced" in note for note in report.notes), report.notes
    assert_same_rows(report, lsuv_init(eager_model, x, compile="eager", seed=5, verbose=0))
    assert_same_weights(auto_model, eager_model)
    # An explicit compiled mode raises instead, and changes nothing.
    before = auto_model.get_weights()
    # A ValueError that says the model cannot be traced, and why (issue 17).
    with pytest.raises(ValueError, match=r"cannot be traced.*Cannot convert a symbolic"):
        lsuv_init(auto_model, x, compile="compiled", verbose=0)
    for a, b in zip(before, auto_model.get_weights()):
        assert np.array_equal(a, b)


def test_under_a_distribution_strategy_the_sweep_is_compiled_and_matches_eager():
    # Two replicas are tested in their own process (test_distributed.py); one here.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    reports, weights = {}, {}
    for compile in ("auto", "eager"):
        keras.utils.set_random_seed(18)
        with strategy.scope():
            model = mlp(depth=1)
        reports[compile] = lsuv_init(model, normal((32, 16), 18), verbose=0, seed=1,
                                     compile=compile)
        weights[compile] = model.get_weights()
    assert reports["auto"].mode == "compiled" and reports["auto"].ok
    assert not any("eager" in note for note in reports["auto"].notes), reports["auto"].notes
    for a, b in zip(weights["auto"], weights["eager"]):
        # Each kernel is its start times an LSUV scale: as close as the scales (ROUNDING).
        np.testing.assert_allclose(a, b, rtol=ROUNDING, atol=0)


@pytest.mark.parametrize("value", ["jit", True, None])
def test_bad_compile_values_raise(value):
    model = mlp(depth=1)
    for function in (lsuv_init, weightnorm_data_init):
        with pytest.raises(ValueError, match="`compile`"):
            function(model, normal((8, 16)), compile=value, verbose=0)


# ----------------------------------------------------------------------------
# One pass where it is exact; a measuring pass where it is not.


def _features(model, names, x):
    outputs = [model.get_layer(n).output for n in names]
    return [keras.ops.convert_to_numpy(y).astype("float64")
            for y in keras.Model(model.inputs, outputs)(x)]


def test_keras_float32_layers_need_no_measuring_pass_and_report_the_true_variance():
    # Separate ReLU layers, so that each kernel layer's `.output` is its pre-activation.
    model = keras.Sequential([keras.Input((16,)), L.Dense(32, name="d0"), L.ReLU(),
                              L.Dense(32, name="d1"), L.ReLU(), L.Dense(4, name="out")])
    x = normal((128, 16), 31, scale=3.0)
    targets = [layer for _, layer in kernel_layers(model)]
    with counting_calls(targets) as counts:
        report = lsuv_init(model, x, verbose=0)
    assert counts == {layer.name: 1 for layer in targets}
    names = [layer.name for layer in targets]
    # The in-flight variance is the rescaled model's own: a fresh forward pass agrees to
    # float32 rounding of the scales (the 2e-5 MATCH of test_lsuv.py).
    for name, y in zip(names, _features(model, names, x)):
        assert float(np.var(y)) == pytest.approx(report[name].var_after, rel=2e-5), name


class _OwnCall(L.Dense):
    """A Dense subclass with a `call` of its own: the sweep cannot know what it computes."""

    def call(self, inputs):
        return super().call(inputs)


@pytest.mark.parametrize("case", ["subclass", "mixed_float16"])
def test_a_measuring_pass_follows_where_the_in_flight_estimate_may_differ(case):
    if case == "subclass":
        model = keras.Sequential([keras.Input((16,)), _OwnCall(32, name="d0"),
                                  L.Dense(4, name="out")])
    else:
        policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy("mixed_float16")
        try:
            model = mlp(depth=2)
        finally:
            keras.config.set_dtype_policy(policy)
    targets = [layer for _, layer in kernel_layers(model)]
    assert not _sweep.in_flight_is_exact(_sweep.find_targets(model))
    with counting_calls(targets) as counts:
        lsuv_init(model, normal((64, 16), 32), verbose=0)
    assert counts == {layer.name: 2 for layer in targets}


def test_the_closed_form_scale_is_where_the_lsuv_iteration_converges():
    from keras_goodinit import lsuv

    rng = np.random.default_rng(5)
    for trial in range(20):
        mean = tf.constant(rng.normal(size=(1, 8)) * rng.uniform(0, 3), tf.float64)
        var = tf.constant(rng.uniform(0.1, 4, size=(1, 8)) * 10.0 ** rng.uniform(-3, 3),
                          tf.float64)
        bias = tf.constant(rng.normal(size=(1, 8)) * rng.uniform(0, 0.5), tf.float64)
        coefficients = lsuv._quadratic(mean, var, bias)
        a, b, c = (float(v) for v in coefficients)
        closed = lsuv._solve_quadratic(coefficients, target_var=1.0, tol=0.1,
                                       dead=tf.constant(False))
        # The paper's iteration, run to float64 convergence.
        loop = lsuv._solve_scale(lambda s, a=a, b=b, c=c: (a * s + b) * s + c, tol=1e-12,
                                 target_var=1.0,
                                 max_iter=200, dead=tf.constant(False), max_step=np.inf)
        if abs((a + b + c) - 1.0) < 0.1:  # already within tol: no step
            assert float(closed["scale"]) == 1.0 and int(closed["iterations"]) == 0
            continue
        assert int(closed["code"]) == 0 and int(closed["iterations"]) == 1, trial
        assert float(closed["scale"]) == pytest.approx(float(loop["scale"]), rel=1e-9), trial
        assert float(closed["var_after"]) == pytest.approx(1.0, rel=1e-9)


def test_no_reachable_target_takes_one_step_and_says_why():
    from keras_goodinit import lsuv

    # Bias variance 4 alone exceeds the target 1, and a positive B keeps the curve above it.
    coefficients = tuple(tf.constant(v, tf.float64) for v in (2.0, 1.0, 4.0))
    state = lsuv._solve_quadratic(coefficients, target_var=1.0, tol=0.1,
                                  dead=tf.constant(False))
    assert float(state["scale"]) == pytest.approx(np.sqrt(1.0 / 7.0))
    assert lsuv._STATUS[int(state["code"])][0] == "max_iter"
    assert "no kernel scale reaches" in lsuv._STATUS[int(state["code"])][1]


# ----------------------------------------------------------------------------
# Issue 17: the cache of traced passes is keyed on the model's state, not only its weights.


def _rescaled_model():
    inputs = keras.Input((16,))
    h = L.Dense(32, name="d0")(inputs)
    h = L.Activation("relu", name="act")(h)
    h = L.Rescaling(1.0, name="rescale")(h)
    return keras.Model(inputs, L.Dense(8, name="d1")(h))


def test_a_changed_layer_config_is_not_served_a_stale_trace():
    x = normal((256, 16), 41)
    model = _rescaled_model()
    lsuv_init(model, x, verbose=0)
    model.get_layer("rescale").scale = 100.0  # d1's input variance grows 10^4-fold
    report = lsuv_init(model, x, verbose=0)
    assert report.mode == "compiled"
    # The second init reads the new scale: d1 is rescaled to unit variance again, and its
    # reported variance is the model's output variance (the old program reported 1.0 while
    # the output's was 10^4). Both are float32 moments of the same values: 1e-5 relative
    # (a 256-term mean, see ROUNDING).
    row = {r.name: r for r in report.rows}["d1"]
    output_var = float(np.var(keras.ops.convert_to_numpy(model(x)).astype("float64")))
    assert row.var_after == pytest.approx(output_var, rel=ROUNDING)
    assert abs(output_var - 1.0) < 0.1  # within LSUV's tol

    model = _rescaled_model()
    signal_report(model, x)
    for change in (lambda m: setattr(m.get_layer("rescale"), "scale", 100.0),
                   lambda m: setattr(m.get_layer("act"), "activation", keras.activations.tanh)):
        change(model)
        compiled = signal_report(model, x)
        assert compiled.mode == "compiled"
        assert_same_signal(compiled, signal_report(model, x, compile="eager"),
                           longest_sum(model, x))


def test_an_unchanged_model_keeps_one_trace_and_a_changed_one_drops_the_old():
    x = normal((32, 16), 42)
    model = _rescaled_model()
    targets = [layer for _, layer in kernel_layers(model)]
    signal_report(model, x)
    with counting_calls(targets) as counts:
        signal_report(model, x)
    assert counts == {}  # the fingerprint of an unchanged model is stable
    model.get_layer("rescale").scale = 2.0
    with counting_calls(targets) as counts:
        signal_report(model, x)
    assert counts == {"d0": 1, "d1": 1}  # traced again
    fingerprint, traces = _sweep._TRACED[model]
    assert fingerprint == _sweep.model_fingerprint(model) and len(traces) == 1
