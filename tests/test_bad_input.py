"""Bad input and faults: a correct result or a clear error, and never a lost weight.

`GoodInit` is checked property-based (hypothesis) over its arguments, shapes and
dtypes against an independent oracle: either a kernel whose per-unit norms are
`g = sqrt(gamma * C_in / C_out)` (science.md §1) and which is orthonormal across
units when there are no more units than fan-in entries, or a `ValueError`
naming an argument that is actually invalid.

`lsuv_init` and `weightnorm_data_init` are fed every kind of bad batch and bad
model. Every call goes through `attempt`, which snapshots all `model.weights`
(np.array copies) and classifies the outcome; a weight is *lost* when the call
raised and any weight is not bit-identical to before, or when the call returned
and a weight that was finite is not any more. The tally is printed at the end
of the module (figures) and must show 0 lost.

Decisions recorded here: integer and bool batches are accepted (Keras casts
model inputs to the compute dtype) and give bit-identical weights to the same
values given as float32; string batches raise TensorFlow's cast error (a model
may legitimately take strings, e.g. behind a StringLookup, so the package does
not reject them up front); a batch of size 1 works for LSUV (the variance is
over the whole output tensor) and reports every weight-normalized layer as dead
for the per-unit data-dependent init (one sample has zero std).
"""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from _figures import emit  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from keras import layers as L  # noqa: E402

from keras_goodinit import (  # noqa: E402
    GoodInit,
    WeightNormalization,
    lsuv_init,
    signal_report,
    weightnorm_data_init,
)
from keras_goodinit.initializers import DISTRIBUTIONS, SCHEMES  # noqa: E402

FUNCTIONS = {"lsuv_init": lsuv_init, "weightnorm_data_init": weightnorm_data_init,
             "signal_report": signal_report}
TALLY = {}  # function name -> {"cases", "raised", "returned", "lost"}
LOST = []  # descriptions of the cases that lost weights


@pytest.fixture(scope="module", autouse=True)
def _figures(request):
    yield
    lines = [f"{'function':22s} {'cases':>6s} {'raised':>7s} {'returned':>9s} {'lost':>5s}"]
    total = {"cases": 0, "raised": 0, "returned": 0, "lost": 0}
    for name, counts in sorted(TALLY.items()):
        lines.append(f"{name:22s} {counts['cases']:6d} {counts['raised']:7d} "
                     f"{counts['returned']:9d} {counts['lost']:5d}")
        for key in total:
            total[key] += counts[key]
    lines.append(f"{'total':22s} {total['cases']:6d} {total['raised']:7d} "
                 f"{total['returned']:9d} {total['lost']:5d}")
    lines += [f"LOST: {case}" for case in LOST]
    emit(request, "bad_input", {"by_function": TALLY, "total": total, "lost": LOST}, lines)


def snapshot(model):
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.weights]


def attempt(function, model, data, case, **kwargs):
    """Calls `function(model, data, **kwargs)`; returns (result, error); tallies the outcome."""
    name = function.__name__
    counts = TALLY.setdefault(name, {"cases": 0, "raised": 0, "returned": 0, "lost": 0})
    weights = list(model.weights) if isinstance(model, keras.layers.Layer) else []
    before = snapshot(model) if weights else []
    result = error = None
    try:
        if name == "signal_report":
            result = function(model, data, **kwargs)
        else:
            result = function(model, data, verbose=0, **kwargs)
    except BaseException as caught:  # noqa: B036 - KeyboardInterrupt is a case too
        error = caught
    after = snapshot(model) if weights else []
    counts["cases"] += 1
    if error is not None:
        counts["raised"] += 1
        lost = len(before) != len(after) or not all(
            np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after))
    else:
        counts["returned"] += 1
        lost = any(np.isfinite(a).all() and not np.isfinite(b).all()
                   for a, b in zip(before, after))
    if lost:
        counts["lost"] += 1
        LOST.append(f"{name}: {case}: {type(error).__name__ if error else 'returned'}")
    assert not lost, f"{name}: {case} lost weights ({error!r})"
    return result, error


# ----------------------------------------------------------------------------
# GoodInit, property-based.

VALID_SCHEMES = SCHEMES
LAYOUTS = ("default", "conv_transpose", "depthwise")
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _invalid_constructor_args(scheme, num_blocks, block_index, gamma, distribution, layout,
                              seed):
    bad = set()
    if scheme not in VALID_SCHEMES:
        bad.add("scheme")
    if scheme == "wn_residual" and not _positive_int(num_blocks):
        bad.add("num_blocks")
    if scheme == "wn_hanin" and not _positive_int(block_index):
        bad.add("block_index")
    if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float))
                              or not math.isfinite(gamma) or gamma <= 0):
        bad.add("gamma")
    if distribution not in DISTRIBUTIONS:
        bad.add("distribution")
    if layout not in LAYOUTS:
        bad.add("layout")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        bad.add("seed")
    return bad


def _invalid_call_args(shape, dtype, layout):
    bad = set()
    if len(shape) < 2 or (layout == "depthwise" and len(shape) < 3) or min(shape,
                                                                          default=0) <= 0:
        bad.add("shape")
    if dtype not in (None, "float16", "bfloat16", "float32", "float64"):
        bad.add("dtype")
    return bad


def _expected_norm(scheme, num_blocks, block_index, gamma, layout, shape):
    if gamma is None:
        gamma = {"wn_relu": 2.0, "wn_linear": 1.0, "wn_relu_backward": 2.0,
                 "wn_residual": 1.0 / (num_blocks or 1),
                 "wn_hanin": 0.81 ** (block_index or 1)}[scheme]
    if scheme == "wn_relu_backward":
        return math.sqrt(gamma)
    c_in, c_out = {"default": (shape[-2], shape[-1]),
                   "conv_transpose": (shape[-1], shape[-2]),
                   "depthwise": (shape[-2], shape[-2] * shape[-1])}[layout]
    return math.sqrt(gamma * c_in / c_out)


def _unit_vectors(kernel, layout):
    """(fan-in length, units) matrix, laid out per science.md §1's table."""
    rank = kernel.ndim
    if layout == "default":
        return kernel.reshape(-1, kernel.shape[-1])
    if layout == "conv_transpose":
        moved = np.moveaxis(kernel, -2, -1)  # (*k, in, out)
        return moved.reshape(-1, moved.shape[-1])
    spatial = int(np.prod(kernel.shape[: rank - 2]))
    return kernel.reshape(spatial, -1)  # depthwise: one unit per (channel, multiplier)


BAD_VALUES = {
    "scheme": st.sampled_from(["relu", "", "WN_RELU"]),
    "num_blocks": st.sampled_from([None, 0, -1, 2.5, True, "3"]),
    "block_index": st.sampled_from([None, 0, -2, 1.0, False]),
    "gamma": st.sampled_from([0.0, -1.0, math.nan, math.inf, "2", True]),
    "distribution": st.sampled_from(["uniform", "Orthogonal", None]),
    "layout": st.sampled_from(["channels_first", "transpose", ""]),
    "seed": st.sampled_from(["abc", 1.5, True]),
    "shape": st.one_of(st.lists(st.integers(1, 6), max_size=1).map(tuple),
                       st.lists(st.integers(0, 4), min_size=2, max_size=4).map(tuple)),
    "dtype": st.sampled_from(["int32", "bool", "uint8", "string"]),
}


@st.composite
def goodinit_arguments(draw):
    """Valid arguments, with (two times in five) one or two of them replaced by a bad value."""
    args = {
        "scheme": draw(st.sampled_from(SCHEMES)),
        "num_blocks": draw(st.integers(1, 12)),
        "block_index": draw(st.integers(1, 12)),
        "gamma": draw(st.one_of(st.none(), st.none(), st.floats(0.01, 10.0), st.integers(1, 3))),
        "distribution": draw(st.sampled_from(DISTRIBUTIONS)),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "seed": draw(st.one_of(st.none(), st.integers(0, 2**31 - 1))),
        "shape": tuple(draw(st.lists(st.integers(1, 6), min_size=3, max_size=5))
                       if draw(st.booleans()) else draw(st.lists(st.integers(1, 40), min_size=2,
                                                                 max_size=2))),
        "dtype": draw(st.sampled_from([None, "float32", "float16", "bfloat16", "float64"])),
    }
    if args["scheme"] not in ("wn_residual",):
        args["num_blocks"] = draw(st.sampled_from([None, args["num_blocks"]]))
    if args["scheme"] not in ("wn_hanin",):
        args["block_index"] = draw(st.sampled_from([None, args["block_index"]]))
    if draw(st.integers(0, 4)) < 2:
        for name in draw(st.lists(st.sampled_from(sorted(BAD_VALUES)), min_size=1,
                                  max_size=2, unique=True)):
            args[name] = draw(BAD_VALUES[name])
    return args


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(args=goodinit_arguments())
def test_goodinit_gives_a_correct_kernel_or_names_the_bad_argument(args):
    scheme, num_blocks, block_index, gamma, distribution, layout, seed, shape, dtype = (
        args[k] for k in ("scheme", "num_blocks", "block_index", "gamma", "distribution",
                          "layout", "seed", "shape", "dtype"))
    bad = _invalid_constructor_args(scheme, num_blocks, block_index, gamma, distribution,
                                    layout, seed)
    kwargs = dict(num_blocks=num_blocks, block_index=block_index, gamma=gamma,
                  distribution=distribution, layout=layout, seed=seed)
    if bad:
        event("invalid constructor argument")
        with pytest.raises(ValueError) as info:
            GoodInit(scheme, **kwargs)
        assert any(f"{name}=" in str(info.value) for name in bad), (bad, str(info.value))
        return
    init = GoodInit(scheme, **kwargs)
    bad = _invalid_call_args(shape, dtype, layout)
    if bad:
        event("invalid shape or dtype")
        with pytest.raises(ValueError) as info:
            init(shape, dtype=dtype)
        assert any(f"{name}=" in str(info.value) for name in bad), (bad, str(info.value))
        return
    kernel = init(shape, dtype=dtype)
    event(f"valid kernel ({distribution})")
    expected_dtype = dtype or "float32"
    assert keras.backend.standardize_dtype(kernel.dtype) == expected_dtype
    assert tuple(kernel.shape) == shape
    values = keras.ops.convert_to_numpy(keras.ops.cast(kernel, "float64"))
    assert np.isfinite(values).all()
    units = _unit_vectors(values, layout)
    norms = np.linalg.norm(units, axis=0)
    g = _expected_norm(scheme, num_blocks, block_index, gamma, layout, shape)
    # Rounding each entry to the dtype changes the norm by at most eps/2 relative; float32
    # also carries the QR and scaling error (a few ulp): 64 eps.
    eps = EPS[expected_dtype]
    rtol = eps if expected_dtype in ("float16", "bfloat16") else 64 * eps
    c_in, c_out = (shape[-1], shape[-2]) if layout == "conv_transpose" else shape[-2:]
    if distribution == "delta_orthogonal" and len(shape) > 2 and layout != "depthwise" \
            and c_in < c_out:
        # A wide centre matrix keeps its rows orthogonal, scaled by one factor: only the
        # mean squared unit norm is g^2 (squaring doubles the relative error).
        np.testing.assert_allclose(np.mean(norms**2), g * g, rtol=2 * rtol)
    else:
        np.testing.assert_allclose(norms, g, rtol=rtol)
    if distribution == "orthogonal" and units.shape[1] <= units.shape[0]:
        # Directions are orthonormal: |<u_i, u_j>| <= 2 (eps/2) after rounding each entry.
        directions = units / norms
        event("orthonormality checked")
        gram = directions.T @ directions
        np.testing.assert_allclose(gram, np.eye(units.shape[1]), atol=2 * eps + 1e-6)


# ----------------------------------------------------------------------------
# Models for the init functions.


def wn_mlp():
    return keras.Sequential([keras.Input((16,)),
                             WeightNormalization(L.Dense(16, activation="relu"), name="wn1"),
                             L.Dense(8, activation="relu", name="plain"),
                             WeightNormalization(L.Dense(4), name="wn2")])


def two_inputs():
    a, b = keras.Input((6,), name="a"), keras.Input((4,), name="b")
    h = L.Concatenate()([WeightNormalization(L.Dense(8, activation="relu"), name="wa")(a),
                         L.Dense(8, activation="relu", name="db")(b)])
    return keras.Model({"a": a, "b": b}, WeightNormalization(L.Dense(2), name="out")(h))


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = WeightNormalization(L.Dense(12, activation="relu"), name="hidden")
        self.head = L.Dense(3, name="head")

    def call(self, x):
        return self.head(self.hidden(x))


def dead_by_bias():
    """Every ReLU of the first layer is dead, so every later layer sees a constant."""
    return keras.Sequential([
        keras.Input((16,)),
        WeightNormalization(L.Dense(16, activation="relu",
                                    bias_initializer=keras.initializers.Constant(-100.0)),
                            name="wn1"),
        L.Dense(8, activation="relu", name="plain"),
        WeightNormalization(L.Dense(4), name="wn2")])


def dead_by_zero_kernels():
    """Every kernel is zero (so g = ||v|| = 0 too): every output is its bias, a constant."""
    zeros = keras.initializers.Zeros()
    return keras.Sequential([
        keras.Input((16,)),
        WeightNormalization(L.Dense(16, activation="relu", kernel_initializer=zeros), name="z1"),
        L.Dense(8, activation="relu", kernel_initializer=zeros, name="z2"),
        WeightNormalization(L.Dense(4, kernel_initializer=zeros), name="z3")])


def no_targets():
    return keras.Sequential([keras.Input((16,)), L.BatchNormalization(), L.Activation("relu")])


def normal(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype("float32")


X = normal((32, 16))


def with_value(value, index=(3, 4)):
    x = X.copy()
    x[index] = value
    return x


class _Interrupt(L.Layer):
    """Raises KeyboardInterrupt once armed: an interrupted notebook cell."""

    armed = False

    def call(self, x):
        if self.armed:
            raise KeyboardInterrupt
        return x


def interrupted():
    bomb = _Interrupt()
    model = keras.Sequential([keras.Input((16,)),
                              WeightNormalization(L.Dense(16, activation="relu"), name="wn1"),
                              bomb, L.Dense(4, name="out")])
    model(X)
    bomb.armed = True
    return model


# (case, model factory, data factory, kwargs, expected): expected is "raise", "ok" (every
# applicable layer initialized) or "skipped" (every row skipped with a reason).
RAISE, OK, SKIPPED = "raise", "ok", "skipped"
CASES = [
    ("NaN in the batch", wn_mlp, lambda: with_value(np.nan), {}, RAISE),
    ("+Inf in the batch", wn_mlp, lambda: with_value(np.inf), {}, RAISE),
    ("-Inf in one input of a dict", two_inputs,
     lambda: {"a": normal((8, 6)), "b": np.full((8, 4), -np.inf, "float32")}, {}, RAISE),
    ("NaN in a float16 batch", wn_mlp, lambda: with_value(np.nan).astype("float16"), {}, RAISE),
    ("NaN in the first batch of a tf.data.Dataset", wn_mlp,
     lambda: tf.data.Dataset.from_tensor_slices(with_value(np.nan)).batch(32), {}, RAISE),
    ("NaN in (x, y)'s y only (y is not used)", wn_mlp,
     lambda: (X, np.full((32, 4), np.nan, "float32")), {}, OK),
    ("empty batch", wn_mlp, lambda: X[:0], {}, RAISE),
    ("empty dataset", wn_mlp, lambda: tf.data.Dataset.from_tensor_slices(X).batch(8).take(0),
     {}, RAISE),
    ("empty tuple", wn_mlp, lambda: (), {}, RAISE),
    ("data=None", wn_mlp, lambda: None, {}, RAISE),
    ("data is a string", wn_mlp, lambda: "batch.npy", {}, RAISE),
    ("a scalar", wn_mlp, lambda: np.float32(1.0), {}, RAISE),
    ("batch of size 1", wn_mlp, lambda: X[:1], {}, "size1"),
    ("wrong feature count", wn_mlp, lambda: normal((32, 12)), {}, RAISE),
    ("wrong rank", wn_mlp, lambda: normal((32, 16, 3)), {}, RAISE),
    ("dict missing an input", two_inputs, lambda: {"a": normal((8, 6))}, {}, RAISE),
    ("dict inputs of different batch sizes", two_inputs,
     lambda: {"a": normal((8, 6)), "b": normal((5, 4))}, {}, RAISE),
    ("string dtype", wn_mlp, lambda: np.full((8, 16), "x"), {}, RAISE),
    ("object dtype", wn_mlp, lambda: np.array([[None] * 16] * 4, dtype=object), {}, RAISE),
    ("int32 batch", wn_mlp, lambda: np.round(X * 3).astype("int32"), {}, OK),
    ("bool batch", wn_mlp, lambda: X > 0, {}, OK),
    ("float64 batch", wn_mlp, lambda: X.astype("float64"), {}, OK),
    ("all-zero batch", wn_mlp, lambda: np.zeros((32, 16), "float32"), {}, SKIPPED),
    # Moments are taken of y / max|y|, so no finite float32 scale overflows them.
    ("finite but huge batch (1e30)", wn_mlp, lambda: X * 1e30, {}, OK),
    ("finite but tiny batch (1e-30)", wn_mlp, lambda: X * 1e-30, {}, OK),
    ("no target layers", no_targets, lambda: X, {}, RAISE),
    ("unbuilt Sequential (no Input)", lambda: keras.Sequential(
        [WeightNormalization(L.Dense(8, activation="relu")), L.Dense(2)]), lambda: X, {}, OK),
    ("unbuilt subclassed model", Subclassed, lambda: X, {}, OK),
    ("unbuilt Sequential given strings", lambda: keras.Sequential(
        [WeightNormalization(L.Dense(8)), L.Dense(2)]), lambda: np.full((4, 16), "x"), {},
     RAISE),
    ("every ReLU after the first layer dead (bias -100)", dead_by_bias, lambda: X,
     {"pre_init": None}, "dead_after_first"),
    ("every kernel zero", dead_by_zero_kernels, lambda: X, {"pre_init": None}, SKIPPED),
    ("model is not a model", lambda: "model.keras", lambda: X, {}, RAISE),
    ("layers names an unknown layer", wn_mlp, lambda: X, {"layers": ["nope"]}, RAISE),
    ("layers is a bare string", wn_mlp, lambda: X, {"layers": "wn1"}, RAISE),
    ("KeyboardInterrupt in the middle of the sweep", interrupted, lambda: X, {}, RAISE),
    ("tol=nan", wn_mlp, lambda: X, {"tol": math.nan}, RAISE),
    ("target_var=inf", wn_mlp, lambda: X, {"target_var": math.inf}, RAISE),
    ("max_iter=1.5", wn_mlp, lambda: X, {"max_iter": 1.5}, RAISE),
    ("seed='a'", wn_mlp, lambda: X, {"seed": "a"}, RAISE),
    ("tol as a NumPy float32", wn_mlp, lambda: X, {"tol": np.float32(0.1)}, OK),
    ("max_iter as a NumPy int64", wn_mlp, lambda: X, {"max_iter": np.int64(5)}, OK),
    ("seed as a NumPy int64", wn_mlp, lambda: X, {"seed": np.int64(2)}, OK),
    ("seed=-1", wn_mlp, lambda: X, {"seed": -1}, RAISE),
    ("layers=[1]", wn_mlp, lambda: X, {"layers": [1]}, RAISE),
    ("layers=5", wn_mlp, lambda: X, {"layers": 5}, RAISE),
    ("layers=[]", wn_mlp, lambda: X, {"layers": []}, RAISE),
    ("a generator of batches", wn_mlp, lambda: (b for b in (X, 3 * X)), {}, OK),
    ("an empty generator", wn_mlp, lambda: (b for b in ()), {}, RAISE),
    ("a list of lists", wn_mlp, lambda: X.tolist(), {}, RAISE),
    ("NaN in the 3rd batch of new_batch_per_trial", wn_mlp,
     lambda: tf.data.Dataset.from_tensor_slices(
         np.concatenate([X * 5, X * 3, with_value(np.nan)])).batch(32),
     {"new_batch_per_trial": True, "tol": 1e-6}, RAISE),
]
LSUV_ONLY = {"pre_init", "tol", "target_var", "max_iter", "seed", "new_batch_per_trial"}


def _cases():
    for case, model, data, kwargs, expected in CASES:
        for name in ("lsuv_init", "weightnorm_data_init"):
            if name == "weightnorm_data_init" and set(kwargs) & LSUV_ONLY - {"pre_init"}:
                continue
            yield pytest.param(name, model, data, kwargs, expected, id=f"{name}-{case}")


def _applicable(report):
    return [r for r in report.rows if r.reason != "not weight-normalized"]


@pytest.mark.parametrize("name, make_model, make_data, kwargs, expected", list(_cases()))
def test_bad_input_raises_cleanly_or_reports_and_keeps_weights(name, make_model, make_data,
                                                               kwargs, expected):
    keras.utils.set_random_seed(0)
    if name == "weightnorm_data_init":
        kwargs = {k: v for k, v in kwargs.items() if k not in LSUV_ONLY}
    model, data = make_model(), make_data()
    case = f"{make_model.__name__ if hasattr(make_model, '__name__') else 'model'}: {kwargs}"
    report, error = attempt(FUNCTIONS[name], model, data, case, **kwargs)
    if expected == RAISE:
        assert error is not None, report
        if isinstance(error, KeyboardInterrupt):
            return
        # A clear error: a ValueError naming the argument, or Keras/TensorFlow's own error
        # for a batch the model itself cannot take (wrong shape, structure or dtype).
        assert isinstance(error, (ValueError, TypeError, tf.errors.UnimplementedError,
                                  tf.errors.InvalidArgumentError)), repr(error)
        assert str(error)
        if isinstance(error, ValueError) and str(error).startswith("Argument"):
            # The package's own checks name the argument and the value received.
            assert any(word in str(error) for word in
                       ("`data`", "model=", "`layers`", "tol=", "target_var=", "max_iter=",
                        "seed=")) and "Received" in str(error), str(error)
        return
    assert error is None, repr(error)
    rows = _applicable(report)
    assert rows
    for variable in model.weights:
        assert np.isfinite(keras.ops.convert_to_numpy(variable.value)).all(), variable.path
    if expected == OK:
        assert all(r.status == "ok" for r in rows), report
    elif expected == SKIPPED:
        assert all(r.status == "skipped" and r.reason for r in rows), report
    elif expected == "dead_after_first":
        if name == "lsuv_init":  # the layers after the dead ReLUs see a constant
            assert [r.status for r in rows] == ["ok", "skipped", "skipped"], report
            assert all("dead" in r.reason for r in rows[1:]), report
        else:  # b = -mu/sigma re-centres the first layer: its ReLUs live again
            assert all(r.status == "ok" for r in rows), report
    else:  # a batch of size 1
        want = "ok" if name == "lsuv_init" else "skipped"
        assert all(r.status == want for r in rows), report
        if want == "skipped":
            assert all("zero std" in r.reason for r in rows), report


@pytest.mark.parametrize("kwargs, message", [
    ({"tol": np.float32(-0.1)}, "Argument `tol` must be a finite number > 0. Received: tol=-0.1"),
    ({"max_iter": np.int64(0)}, "Argument `max_iter` must be an int >= 1. Received: max_iter=0"),
    ({"seed": -1}, "Argument `seed` must be a non-negative int or None. Received: seed=-1"),
    ({"layers": 5}, "Argument `layers` must be a list of layers or layer names, or None. "
                    "Received: layers=5"),
    ({"layers": [1]}, "Every entry of argument `layers` must be a layer or a layer name. "
                      "Received: layers=[1]"),
    ({"layers": []}, "Argument `layers` must name at least one layer"),
])
def test_bad_values_get_one_message_that_names_them(kwargs, message):
    # The message states the rule and the value; a NumPy scalar is judged by its value.
    for function in (lsuv_init, weightnorm_data_init):
        if function is weightnorm_data_init and "layers" not in kwargs:
            continue
        model = wn_mlp()
        _, error = attempt(function, model, X, f"message {kwargs}", **kwargs)
        assert isinstance(error, ValueError) and str(error).startswith(message), repr(error)


def test_a_generator_is_read_like_a_dataset():
    # Its first element is the batch; with new_batch_per_trial, its elements in turn.
    results = []
    for data in (X, (b for b in (X, 3 * X)), tf.data.Dataset.from_tensors(X)):
        keras.utils.set_random_seed(0)
        model = wn_mlp()
        report, error = attempt(lsuv_init, model, data, "generator vs array", seed=1)
        assert error is None and report.ok, repr(error)
        results.append(snapshot(model))
    for a, b, c in zip(*results):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    model = wn_mlp()
    report, error = attempt(lsuv_init, model, (b for b in (X, 3 * X, 9 * X)), "trials",
                            new_batch_per_trial=True, tol=1e-3)
    assert error is None and report.batches >= 2


def test_a_list_of_lists_is_named_not_called_empty():
    _, error = attempt(lsuv_init, wn_mlp(), X.tolist(), "list of lists")
    assert isinstance(error, ValueError) and "np.asarray" in str(error)
    assert "empty" not in str(error)


@pytest.mark.parametrize("name", ["lsuv_init", "weightnorm_data_init"])
@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool"])
def test_integer_and_bool_batches_act_as_their_float32_values(name, dtype):
    if dtype == "bool":
        batch = X > 0
    else:
        batch = np.clip(np.round(X * 3), 0 if dtype == "uint8" else -10, 10).astype(dtype)
    results = []
    for data in (batch, batch.astype("float32")):
        keras.utils.set_random_seed(0)
        model = wn_mlp()
        kwargs = {"seed": 1} if name == "lsuv_init" else {}
        report, error = attempt(FUNCTIONS[name], model, data, f"{dtype} vs float32", **kwargs)
        assert error is None and all(r.status == "ok" for r in _applicable(report))
        results.append(snapshot(model))
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def test_a_failed_build_leaves_an_unbuilt_model_usable():
    model = keras.Sequential([WeightNormalization(L.Dense(8, activation="relu")), L.Dense(2)])
    _, error = attempt(lsuv_init, model, np.full((4, 16), "x"), "unbuilt, strings")
    assert error is not None
    report, error = attempt(lsuv_init, model, X, "unbuilt, then a good batch")
    assert error is None and report.ok


def test_string_model_inputs_work():
    # A model whose first layer takes strings: the batch is legitimately not numeric.
    lookup = L.StringLookup(vocabulary=["a", "b", "c", "d"])
    inputs = keras.Input((4,), dtype="string")
    x = L.Flatten()(L.Embedding(5, 8)(lookup(inputs)))
    x = WeightNormalization(L.Dense(8, activation="relu"), name="wn")(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(x))
    words = np.random.default_rng(0).choice(["a", "b", "c", "d", "zz"], size=(64, 4))
    report, error = attempt(lsuv_init, model, words, "StringLookup model, strings")
    assert error is None, error
    # Every weight-bearing layer is listed; the Embedding's table is rescaled for the stream
    # it starts (embeddings=True), with embeddings=False it is no kernel LSUV scales.
    assert [(r.class_name, r.status) for r in report.rows] == [
        ("WeightNormalization(Dense)", "ok"), ("Dense", "ok"), ("Embedding", "ok")]
    report, error = attempt(lsuv_init, model, words,
                            "StringLookup model, strings, tables left alone", embeddings=False)
    assert error is None and report.rows[-1].status == "skipped", report.rows
    report, error = attempt(weightnorm_data_init, model, words, "StringLookup model, strings")
    assert error is None and report["wn"].status == "ok"


@pytest.mark.parametrize("case, data", [
    ("NaN", lambda: with_value(np.nan)), ("empty", lambda: X[:0]), ("None", lambda: None),
    ("wrong shape", lambda: normal((8, 12))), ("strings", lambda: np.full((8, 16), "x")),
    ("all zeros", lambda: np.zeros((8, 16), "float32")),
])
def test_signal_report_bad_input_never_touches_weights(case, data):
    model = wn_mlp()
    report, error = attempt(signal_report, model, data(), case)
    if case == "all zeros":  # ||h|| / ||x|| is undefined: NaN, not a ZeroDivisionError
        assert error is None, repr(error)
        assert np.isfinite(report.column("std")).all()
        assert np.isnan(report.column("norm_ratio")).all()
    else:
        assert error is not None


# ----------------------------------------------------------------------------
# Property-based batches.


@st.composite
def batches(draw):
    batch = draw(st.integers(0, 4))
    features = draw(st.sampled_from([16, 16, 16, 15, 17]))
    dtype = draw(st.sampled_from(["float32", "float16", "float64", "int32", "bool"]))
    scale = draw(st.sampled_from([0.0, 1e-30, 1.0, 1.0, 1e3, 1e30]))
    poison = draw(st.sampled_from([None, None, np.nan, np.inf, -np.inf]))
    x = normal((batch, features), seed=draw(st.integers(0, 3)), scale=scale)
    if poison is not None and batch and dtype.startswith("float"):
        x[draw(st.integers(0, batch - 1)), draw(st.integers(0, features - 1))] = poison
    else:
        poison = None
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(dtype) if dtype != "bool" else x > 0, poison


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(function=st.sampled_from(["lsuv_init", "weightnorm_data_init"]), drawn=batches())
def test_random_batches_raise_or_init_and_never_lose_weights(function, drawn):
    x, poison = drawn
    model = wn_mlp()
    model(np.zeros((1, 16), "float32"))
    report, error = attempt(FUNCTIONS[function], model, x, f"hypothesis {x.dtype}{x.shape}")
    non_finite = x.dtype.kind == "f" and not np.isfinite(x).all()  # also float16 overflow
    must_raise = x.shape[0] == 0 or x.shape[1] != 16 or poison is not None or non_finite
    if must_raise:
        assert error is not None
        assert isinstance(error, ValueError), repr(error)
    else:
        assert error is None, repr(error)
        assert all(r.status in ("ok", "skipped", "max_iter") for r in report.rows)
        assert all(r.reason for r in report.rows if r.status != "ok")


def test_huge_ints_and_arrays_are_named_not_overflowed():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    x = np.ones((8, 4), "float32")
    with pytest.raises(ValueError, match=r"Received: tol=10000"):
        lsuv_init(model, x, tol=10**400, verbose=0)
    with pytest.raises(ValueError, match=r"Argument `measure`"):
        lsuv_init(model, x, measure=np.array(["pre_activation", "post_activation"]), verbose=0)


def test_signal_plot_checks_its_arguments(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    report = signal_report(model, np.ones((8, 4), "float32"), gradients=False)
    with pytest.raises(ValueError, match=r"Received: max_histograms=0"):
        report.plot(str(tmp_path / "p.png"), histograms=True, max_histograms=0)
    with pytest.raises(ValueError, match=r"Received: histograms='no'"):
        report.plot(str(tmp_path / "p.png"), histograms="no")


# ----------------------------------------------------------------------------
# Issue 17: complex data was accepted silently.


@pytest.mark.parametrize("name", ["lsuv_init", "weightnorm_data_init", "signal_report"])
@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_complex_data_is_rejected_naming_the_dtype(name, dtype):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), WeightNormalization(L.Dense(4)), L.Dense(2)])
    x = np.random.default_rng(0).normal(size=(16, 8)).astype(dtype)
    _, error = attempt(FUNCTIONS.get(name, signal_report), model, x, f"{dtype} data")
    assert isinstance(error, ValueError), error
    assert "real" in str(error) and f"Received: data of dtype {dtype}" in str(error)
