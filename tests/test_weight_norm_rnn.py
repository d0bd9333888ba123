"""WeightNormalization of recurrent layers (issue 19): RNNs, their cells, Bidirectional, ConvLSTM.

Run as a script, this file is also the worker that checks the same facts under
another Keras backend (the mechanism of tests/_backend_worker.py, with
TensorFlow made unimportable):

    KERAS_BACKEND=jax python tests/test_weight_norm_rnn.py OUT.json
"""

import sys

if __name__ == "__main__":  # the worker: as if TensorFlow were not installed
    sys.modules["tensorflow"] = None

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _rounding import magnitude, reordered  # noqa: E402
from keras import layers as L  # noqa: E402

from keras_goodinit import WeightNormalization, bake_weight_norm  # noqa: E402

# name -> (layer factory, input shape without batch). Keras' defaults draw the kernels
# (Glorot uniform, orthogonal recurrent kernels); every layer returns sequences where it
# can, so every step's output is compared.
CASES = {
    "SimpleRNN": (lambda: L.SimpleRNN(6, return_sequences=True), (5, 4)),
    "LSTM": (lambda: L.LSTM(6, return_sequences=True), (5, 4)),
    "GRU": (lambda: L.GRU(6, return_sequences=True), (5, 4)),
    "GRU_reset_before": (lambda: L.GRU(6, reset_after=False, return_sequences=True), (5, 4)),
    "RNN_of_LSTMCell": (lambda: L.RNN(L.LSTMCell(6), return_sequences=True), (5, 4)),
    "ConvLSTM1D": (lambda: L.ConvLSTM1D(3, 3, padding="same", return_sequences=True),
                   (4, 7, 2)),
    "ConvLSTM2D": (lambda: L.ConvLSTM2D(3, 3, return_sequences=True), (3, 6, 6, 2)),
    "ConvLSTM3D": (lambda: L.ConvLSTM3D(2, 2, return_sequences=True), (3, 4, 4, 4, 2)),
    "Bidirectional": (lambda: L.Bidirectional(L.LSTM(6, return_sequences=True)), (5, 4)),
}
GATES = {"SimpleRNN": 1, "LSTM": 4, "GRU": 3, "GRU_reset_before": 3, "RNN_of_LSTMCell": 4,
         "ConvLSTM1D": 4, "ConvLSTM2D": 4, "ConvLSTM3D": 4, "Bidirectional": 4}


def numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


def _inputs(shape, batch=3, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, *shape)).astype("float32")


def _cells(wrapper):
    layer = wrapper.layer
    if isinstance(layer, L.Bidirectional):
        return [layer.forward_layer.cell, layer.backward_layer.cell]
    return [getattr(layer, "cell", layer)]


def _built(name, seed=0, **kwargs):
    """A wrapper of case `name` built on its input, every bias drawn non-zero."""
    keras.utils.set_random_seed(seed)
    factory, shape = CASES[name]
    wrapper = WeightNormalization(factory(), **kwargs)
    x = _inputs(shape, seed=seed)
    wrapper.build(x.shape)
    rng = np.random.default_rng(seed + 1)
    for cell in _cells(wrapper):
        cell.bias.assign(rng.normal(size=cell.bias.shape))
    return wrapper, x


def _rounding_bound(wrapper, x, expected) -> float:
    """What rounding alone lets the wrapper's output differ from the bare layer's.

    The wrapper computes with `w = g v/||v||`, g = ||v|| from the same float32
    routine, so each entry is v's to a few roundings, one more per log2 of the
    column length inside the norm: each step's pre-activation, a sum over the
    input and the recurrent kernel's fan-ins (n terms), moves by at most the
    random walk sqrt(n) eps times its size (tests/_rounding.py). Gates and tanh
    have slope <= 1 and the recurrent kernels are orthogonal, so the difference
    passed from step to step does not grow: it adds up over the T steps (depth
    T). The gated outputs are bounded by 1, and the pre-activations at these
    seeds are O(1): scale max(1, |y|).
    """
    cell = _cells(wrapper)[0]
    n = sum(int(np.prod(k.shape[:-1])) for k in (cell.kernel, cell.recurrent_kernel))
    steps = x.shape[1]
    return reordered(steps, n, max(1.0, magnitude(expected)))


def exactness(name) -> dict:
    """Max |wrapper - bare layer| at build (the bare one computes with v itself), and the bound."""
    wrapper, x = _built(name)
    expected = numpy(wrapper.layer(x))  # the bare layer: its kernels are v and u
    got = numpy(wrapper(x))
    return {"diff": float(np.abs(got - expected).max()),
            "bound": min(1e-6, _rounding_bound(wrapper, x, expected)),
            "shape": list(got.shape), "expected_shape": list(expected.shape)}


def _trained_like(model, seed=5):
    """Moves every g (and kernel) away from its build value, so that w != v."""
    rng = np.random.default_rng(seed)
    for variable in model.trainable_weights:
        variable.assign(numpy(variable) * rng.uniform(0.5, 1.5, size=variable.shape))


def _mixed_model(every_way=True):
    """Every way a recurrent layer is wrapped, in one functional model (or two of them)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((5, 4))
    h = L.Bidirectional(WeightNormalization(L.GRU(3, return_sequences=True)))(inputs)
    if every_way:
        h = WeightNormalization(L.Bidirectional(L.SimpleRNN(3, return_sequences=True)))(h)
        h = L.RNN(WeightNormalization(L.GRUCell(4)), return_sequences=True)(h)
    h = WeightNormalization(L.LSTM(3, dropout=0.25, recurrent_dropout=0.25),
                            recurrent=False)(h)
    outputs = L.Dense(2)(h)
    model = keras.Model(inputs, outputs)
    _trained_like(model)
    return model


def baking_and_saving(folder, every_way=True) -> dict:
    """The mixed model, baked and saved and loaded: max differences of their outputs."""
    model = _mixed_model(every_way)
    x = _inputs((5, 4), batch=4, seed=7)
    expected = numpy(model(x))
    baked = bake_weight_norm(model)
    path = os.path.join(folder, "rnn.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    return {"bake": float(np.abs(numpy(baked(x)) - expected).max()),
            "load": float(np.abs(numpy(loaded(x)) - expected).max()),
            "baked_classes": sorted({type(layer).__name__ for layer in baked._flatten_layers()}),
            # Four chained recurrent layers of 5 steps, fan-ins <= 6 + 6.
            "bound": reordered(4 * 5, 12, max(1.0, magnitude(expected)))}


def fit_with_dropout(bare=True) -> dict:
    """Two `fit` steps of WN(LSTM) with dropout (and of the bare LSTM): g moves, and the
    dropout seed's state ends where the bare layer's does."""
    seeds, facts = [], {}
    for wrap in (True, False)[:2 if bare else 1]:
        keras.utils.set_random_seed(4)
        layer = L.LSTM(4, dropout=0.5, recurrent_dropout=0.5)
        wrapper = WeightNormalization(layer) if wrap else layer
        model = keras.Sequential([keras.Input((5, 3)), wrapper, L.Dense(1)])
        model.compile("sgd", "mse")
        if wrap:
            before = [numpy(wrapper.g), numpy(wrapper.recurrent_g)]
            facts["seed_before"] = numpy(layer.non_trainable_variables[0]).tolist()
        x, y = _inputs((5, 3), batch=16, seed=8), np.ones((16, 1), "float32")
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        seeds.append(numpy(layer.non_trainable_variables[0]).tolist())
        if wrap:
            facts |= {"loss": float(history.history["loss"][-1]),
                     "g_moved": float(np.abs(numpy(wrapper.g) - before[0]).max()),
                     "recurrent_g_moved": float(np.abs(numpy(wrapper.recurrent_g)
                                                       - before[1]).max())}
    return {**facts, "seed": seeds[0], "bare_seed": seeds[-1]}


# The data init of a recurrent wrapper: the input part `x_t W + b` of every gate, with
# the offsets it keeps (LSTM's unit_forget_bias: 1 on the forget gate; zeros otherwise).
def _offset(cell) -> np.ndarray:
    size = int(cell.kernel.shape[-1])
    offset = np.zeros(size)
    if isinstance(cell, L.LSTMCell) or type(cell).__name__ == "ConvLSTMCell":
        offset[size // 4:size // 2] = 1.0
    return offset


def _conv_same_1d(x, kernel):
    """`padding="same"`, stride 1, channels-last 1-D convolution in float64."""
    taps = kernel.shape[0]
    pad = np.pad(x, ((0, 0), ((taps - 1) // 2, taps // 2), (0, 0)))
    return sum(pad[:, k:k + x.shape[1]] @ kernel[k] for k in range(taps))


def input_parts(wrapper, x, mask=None) -> list[np.ndarray]:
    """Per cell, float64 `x_t W + b - offset` at every unmasked (sample, step[, position]),
    `(positions, gates * units)`, from the wrapper's float32 effective kernel and bias."""
    keep = np.ones(x.shape[:2], bool) if mask is None else np.asarray(mask, bool)
    with wrapper.effective_kernel_scope():
        kernels = [numpy(cell.kernel).astype("float64") for cell in wrapper._cells]
    parts = []
    for cell, kernel in zip(wrapper._cells, kernels):
        flat = x.reshape(-1, *x.shape[2:]).astype("float64")[keep.reshape(-1)]
        y = _conv_same_1d(flat, kernel) if kernel.ndim == 3 else flat @ kernel
        if cell.use_bias:
            bias = numpy(cell.bias).astype("float64")
            y = y + (bias[0] if bias.ndim == 2 else bias) - _offset(cell)
        parts.append(y.reshape(-1, y.shape[-1]))
    return parts


def standardization_bound(wrapper, x, parts) -> tuple[float, float]:
    """Bounds on |mean| and |var - 1| per unit of `input_parts` after the init.

    The init standardizes the same batch, so only rounding is left: float32 entries of
    `g v/||v||` (a few roundings each), dot products of n = fan-in terms, and float32
    reductions over the N positions, chained: depth 3 of `reordered`, n the longer sum,
    at the size of the values m (the mean), or of their squares (the variance, twice:
    it is quadratic in the entries).
    """
    n = max(int(np.prod(wrapper._cells[0].kernel.shape[:-1])), parts[0].shape[0])
    m = max(magnitude(part) for part in parts)
    return reordered(3, n, m), 2 * reordered(3, n, m * m)


def data_init_pairs(name, masked=False, batch=16, seed=11):
    """The same model twice, and a batch: one to init in `fit`, one by weightnorm_data_init.

    `masked`: a Masking layer before, and half the samples padded over their last two steps.
    Inputs are far from zero-mean (as features often are), so the bias has work to do.
    """
    factory, shape = CASES[name]
    x = _inputs(shape, batch=batch, seed=seed) * 2.0 + 1.0
    mask = None
    if masked:
        x[: batch // 2, -2:] = 0.0
        mask = np.any(x != 0, axis=tuple(range(2, x.ndim)))
    models = []
    for _ in range(2):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input(shape)
        h = L.Masking(0.0)(inputs) if masked else inputs
        wrapper = WeightNormalization(factory(), data_init=True)
        model = keras.Model(inputs, L.Dense(1)(L.Flatten()(wrapper(h))))
        models.append((model, wrapper))
    return models, x, mask


def data_init_in_fit_and_eagerly(name, masked=False) -> dict:
    """g and the bias after one `fit` step with `data_init=True` (learning rate 0, so the
    step moves nothing but the init), against `weightnorm_data_init` on the same batch."""
    from keras_goodinit import weightnorm_data_init

    ((fitted, a), (eager, b)), x, mask = data_init_pairs(name, masked)
    built = [numpy(v).astype("float64") for v in a._init_variables()]
    fitted.compile(keras.optimizers.SGD(0.0), "mse")
    fitted.fit(x, np.zeros((len(x), 1), "float32"), batch_size=len(x), epochs=1,
               shuffle=False, verbose=0)
    report = weightnorm_data_init(eager, x, verbose=0)
    _ = a.g  # an eager use: folds an init that Keras' JAX trainer left in the shifts
    values = [[numpy(v).astype("float64") for v in w._init_variables()] for w in (a, b)]
    parts = input_parts(a, x, mask)
    return {"diff": max(float(np.abs(p - q).max()) for p, q in zip(*values)),
            "scale": max(magnitude(v) for v in values[1]),
            "bound": standardization_bound(a, x, parts)[0],
            "flags": [bool(numpy(a.initialized)), bool(numpy(b.initialized))],
            "status": report[b.name].status,
            "moved": max(float(np.abs(p - q).max()) for p, q in zip(values[0], built))}


# ---------------------------------------------------------------------------------------
# The worker (run as a script under another backend). JAX compiles every eager RNN call
# (a scan): a few cases, one of each cell family and the Bidirectional, keep it short.
WORKER_CASES = ("LSTM", "GRU", "ConvLSTM1D", "Bidirectional")

if __name__ == "__main__":
    from _scenarios import recorder

    RESULTS, scenario = recorder(sys.argv[1])
    RESULTS["backend"] = keras.backend.backend()

    @scenario
    def exact_at_build():
        return {name: exactness(name) for name in WORKER_CASES}

    @scenario
    def bake_and_save():
        with tempfile.TemporaryDirectory() as folder:
            return baking_and_saving(folder, every_way=False)

    @scenario
    def fit():
        return fit_with_dropout(bare=False)  # the bare layer's seed: TensorFlow's test

    @scenario
    def data_init():
        return data_init_in_fit_and_eagerly("LSTM", masked=True)

    print("DONE", flush=True)
    sys.exit(0)


# ---------------------------------------------------------------------------------------
# TensorFlow, in this process.

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_goodinit.weight_norm import substituted  # noqa: E402


@pytest.mark.parametrize("name", CASES)
def test_the_wrapper_computes_what_the_bare_layer_computes_at_build(name):
    facts = exactness(name)
    assert facts["shape"] == facts["expected_shape"]
    assert facts["diff"] <= facts["bound"], facts


@pytest.mark.parametrize("name", CASES)
def test_both_kernels_get_one_trainable_gain_per_unit_and_gate(name):
    wrapper, _ = _built(name)
    cells = _cells(wrapper)
    kernels = [k for cell in cells for k in (cell.kernel, cell.recurrent_kernel)]
    gains = [w for w in wrapper.weights if w.path.split("/")[-1].endswith("g")
             and w.path.startswith(wrapper.path + "/") and w.path.count("/") == 1]
    expected_names = (["g", "recurrent_g", "backward_g", "backward_recurrent_g"]
                      if len(cells) == 2 else ["g", "recurrent_g"])
    assert [w.path.split("/")[-1] for w in gains] == expected_names
    # No second copy of any kernel or cell: the wrapper adds exactly its gains.
    assert list(wrapper._flatten_layers(include_self=False, recursive=False)) == [wrapper.layer]
    assert len(wrapper.weights) == len(wrapper.layer.weights) + len(gains)
    assert len({id(w) for w in wrapper.weights}) == len(wrapper.weights)
    units = cells[0].kernel.shape[-1] // GATES[name]
    for kernel, g in zip(kernels, gains):
        assert tuple(g.shape) == (GATES[name] * units,) and g.trainable
        v = numpy(kernel).astype("float64")
        norms = np.sqrt(np.sum(v**2, axis=tuple(range(v.ndim - 1))))
        np.testing.assert_allclose(numpy(g), norms, rtol=1e-6)  # float32 norms, ~sqrt(n) eps
    assert wrapper.g is gains[0] and wrapper.recurrent_g is gains[1]
    assert wrapper.v is cells[0].kernel and wrapper.recurrent_v is cells[0].recurrent_kernel


@pytest.mark.parametrize("name", ["SimpleRNN", "LSTM", "ConvLSTM2D"])
def test_only_directions_of_the_kernels_matter_and_the_gains_set_their_norms(name):
    wrapper, x = _built(name)
    before = numpy(wrapper(x))
    cell = _cells(wrapper)[0]
    columns = cell.recurrent_kernel.shape[-1]
    scale = np.random.default_rng(2).uniform(0.5, 2.0, size=columns).astype("float32")
    # Scaling each column of v or u by a positive number changes no direction.
    for kernel in (cell.kernel, cell.recurrent_kernel):
        kernel.assign(numpy(kernel) * scale)
    # Float32 scaling rounds each entry once: the same bound as at build.
    bound = min(1e-6, _rounding_bound(wrapper, x, before))
    assert np.abs(numpy(wrapper(x)) - before).max() <= bound
    # The recurrent gain alone changes the output (it is the recurrent kernel's norm).
    wrapper.recurrent_g.assign(numpy(wrapper.recurrent_g) * 1.5)
    assert np.abs(numpy(wrapper(x)) - before).max() > 1e-2


def test_recurrent_false_normalizes_the_input_kernel_only():
    wrapper, x = _built("LSTM", recurrent=False)
    cell = _cells(wrapper)[0]
    assert wrapper.recurrent_g is None
    assert [w.path.split("/")[-1] for w in wrapper._trainable_variables] == ["g"]
    assert WeightNormalization.from_config(wrapper.get_config()).recurrent is False
    before = numpy(wrapper(x))
    # The recurrent kernel is the layer's own: scaling it changes the output.
    cell.recurrent_kernel.assign(numpy(cell.recurrent_kernel) * 2.0)
    assert np.abs(numpy(wrapper(x)) - before).max() > 1e-2


@pytest.mark.parametrize("name", ["LSTM", "GRU", "ConvLSTM1D", "Bidirectional"])
def test_gradients_reach_every_gain_kernel_and_bias_and_are_orthogonal_to_v(name):
    wrapper, x = _built(name)
    rng = np.random.default_rng(3)
    for _, g in wrapper._gains:  # away from ||v||, so the effective kernels differ from v
        g.assign(rng.uniform(0.5, 2.0, size=g.shape))
    probe = rng.normal(size=wrapper(x).shape).astype("float32")
    variables = wrapper.trainable_weights
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(wrapper(x) * probe)
    grads = {v.path: np.asarray(g, "float64")
             for v, g in zip(variables, tape.gradient(loss, variables))}
    for path, grad in grads.items():
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0, path
    # The gradient of a normalized direction has no component along it (per column).
    for kernel, _ in wrapper._gains:
        v, grad = numpy(kernel).astype("float64"), grads[kernel.path]
        axes = tuple(range(v.ndim - 1))
        cosine = np.abs(np.sum(grad * v, axis=axes)) / (
            np.sqrt(np.sum(grad**2, axis=axes)) * np.sqrt(np.sum(v**2, axis=axes)))
        assert cosine.max() < 1e-5, (kernel.path, cosine)


GAINS = ("g", "recurrent_g", "backward_g", "backward_recurrent_g")


def _copy_into(bare, wrapped):
    """The bare layer's (or model's) kernels and biases into the wrapped one; g = ||v||."""
    targets = [w for w in wrapped.weights if w.path.split("/")[-1] not in GAINS]
    assert [tuple(w.shape) for w in targets] == [tuple(w.shape) for w in bare.weights]
    for source, target in zip(bare.weights, targets):
        target.assign(source)
    for layer in wrapped._flatten_layers():
        if isinstance(layer, WeightNormalization):
            for kernel, g in layer._gains:
                g.assign(np.sqrt(np.sum(numpy(kernel).astype("float64") ** 2, axis=0)))


def test_bidirectional_either_way_round_computes_the_bare_bidirectional():
    keras.utils.set_random_seed(1)
    x = _inputs((5, 4))
    bare = L.Bidirectional(L.LSTM(6, return_sequences=True))
    outer = WeightNormalization(L.Bidirectional(L.LSTM(6, return_sequences=True)))
    inner = L.Bidirectional(WeightNormalization(L.LSTM(6, return_sequences=True)))
    for layer in (bare, outer, inner):
        layer(x)
    assert inner.backward_layer.go_backwards and not inner.forward_layer.go_backwards
    assert inner.backward_layer.layer.go_backwards
    rng = np.random.default_rng(0)
    bare.set_weights([rng.normal(size=w.shape).astype("float32") * 0.5 for w in bare.weights])
    expected = numpy(bare(x))
    for layer in (outer, inner):
        _copy_into(bare, layer)
        # Two directions of 5 steps, fan-in 4 + 6, outputs bounded by 1.
        assert np.abs(numpy(layer(x)) - expected).max() <= min(1e-6, reordered(5, 10))
    # Backward really runs backward: the same weights in a forward-only layer differ.
    assert np.abs(expected[:, :, 6:] - expected[:, :, :6]).max() > 1e-2


def test_a_wrapped_cell_in_an_rnn_computes_the_bare_rnn():
    keras.utils.set_random_seed(2)
    x = _inputs((5, 4))
    wrapper = WeightNormalization(L.GRUCell(6))
    rnn = L.RNN(wrapper, return_sequences=True, return_state=True)
    got = [numpy(t) for t in rnn(x)]
    bare = L.RNN(wrapper.layer, return_sequences=True, return_state=True)  # the same cell
    expected = [numpy(t) for t in bare(x)]
    assert wrapper.state_size == wrapper.layer.state_size
    for a, b in zip(got, expected):
        assert np.abs(a - b).max() <= min(1e-6, reordered(5, 10))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_mask_reaches_the_wrapped_rnn(bidirectional):
    keras.utils.set_random_seed(3)
    x = _inputs((6, 4))
    x[0, 3:] = 0.0  # padding, masked out
    x[2, 5:] = 0.0

    def model(wrap):
        layer = L.LSTM(5)
        if wrap:
            layer = WeightNormalization(layer)
        if bidirectional:
            layer = L.Bidirectional(layer)
        return keras.Sequential([keras.Input((6, 4)), L.Masking(0.0), layer])

    bare, wrapped = model(False), model(True)
    _copy_into(bare, wrapped)
    expected = numpy(bare(x))
    unmasked = numpy(keras.Sequential([keras.Input((6, 4)), bare.layers[-1]])(x))
    assert np.abs(expected[0] - unmasked[0]).max() > 1e-3  # the mask matters here
    assert np.abs(numpy(wrapped(x)) - expected).max() <= min(1e-6, reordered(6, 9))


def test_dropout_masks_and_stateful_states_advance_as_without_the_wrapper():
    x = _inputs((5, 4), batch=2)
    outputs = {}
    for wrap in (False, True):
        keras.utils.set_random_seed(6)
        layer = L.LSTM(6, dropout=0.5, recurrent_dropout=0.5, stateful=True, seed=11)
        if wrap:
            layer = WeightNormalization(layer)
        layer.build((2, 5, 4))
        outputs[wrap] = [numpy(layer(x, training=True)) for _ in range(3)]
    bound = min(1e-6, reordered(3 * 5, 10))  # three calls chained by the state
    for got, expected in zip(outputs[True], outputs[False]):
        assert np.abs(got - expected).max() <= bound
    # New masks and a carried state at each call: the outputs differ call to call.
    assert np.abs(outputs[True][1] - outputs[True][0]).max() > 1e-2
    assert np.abs(outputs[True][2] - outputs[True][1]).max() > 1e-2


@pytest.mark.parametrize("name", ["LSTM", "Bidirectional"])
def test_the_wrapped_rnn_and_its_cells_follow_the_wrappers_dtype_policy(name):
    keras.utils.set_random_seed(0)
    factory, shape = CASES[name]
    wrapper = WeightNormalization(factory(), dtype="mixed_float16")
    x = _inputs(shape)
    got = numpy(wrapper(x))
    assert got.dtype == np.float16
    for cell in _cells(wrapper):
        assert cell.compute_dtype == "float16" and cell.variable_dtype == "float32"
    for _, g in wrapper._gains:
        assert keras.backend.standardize_dtype(g.dtype) == "float32"
    # The bare layer, with the same policy: kernels w and v differ by float32 rounding,
    # which float16 rounding of the kernels may turn into 1 float16 ulp; 5 steps, fan-in 10.
    expected = numpy(wrapper.layer(x))
    bound = reordered(5, 10, max(1.0, magnitude(expected)), "float16")
    assert np.abs(got.astype("float32") - expected.astype("float32")).max() <= bound


def test_a_failed_call_leaves_every_weight_as_it_was():
    wrapper, x = _built("LSTM")
    before = [numpy(w).copy() for w in wrapper.weights]
    with pytest.raises(Exception, match=r"(?i)incompatible|shape"):
        wrapper(np.ones((3, 5, 7), "float32"))  # built for 4 features
    for value, w in zip(before, wrapper.weights):
        np.testing.assert_array_equal(numpy(w), value, err_msg=w.path)
    np.testing.assert_array_equal(numpy(wrapper(x)), numpy(wrapper(x)))


def test_a_compiled_fit_moves_both_gains_and_advances_dropout():
    facts = fit_with_dropout()
    assert np.isfinite(facts["loss"])
    assert facts["g_moved"] > 0 and facts["recurrent_g_moved"] > 0
    assert facts["seed"] == facts["bare_seed"] != facts["seed_before"], facts


def test_bake_and_save_of_every_kind_of_wrapped_rnn(tmp_path):
    facts = baking_and_saving(tmp_path)
    assert "WeightNormalization" not in facts["baked_classes"]
    assert {"Bidirectional", "GRU", "GRUCell", "SimpleRNN", "LSTM", "RNN"} <= set(
        facts["baked_classes"])
    assert facts["bake"] <= facts["bound"], facts
    assert facts["load"] == 0.0, facts  # the same weights, the same graph


def test_a_masked_functional_model_bakes_with_its_mask():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6,), dtype="int32")
    h = L.Embedding(10, 4, mask_zero=True)(inputs)
    h = WeightNormalization(L.LSTM(5, return_sequences=True))(h)
    outputs = L.Bidirectional(WeightNormalization(L.GRU(3)))(h)
    model = keras.Model(inputs, outputs)
    _trained_like(model)
    tokens = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9]], "int32")
    expected = numpy(model(tokens))
    # The mask matters: the padded row differs from the same tokens with 1 as padding.
    assert np.abs(numpy(model(np.where(tokens == 0, 1, tokens)))[0] - expected[0]).max() > 1e-3
    baked = bake_weight_norm(model)
    # Two chained recurrent layers of 6 steps, fan-ins <= 5 + 5 (and 4 + 5).
    assert np.abs(numpy(baked(tokens)) - expected).max() <= reordered(2 * 6, 10)


def test_the_baked_kernels_are_the_effective_kernels():
    wrapper, x = _built("LSTM")
    model = keras.Sequential([keras.Input((5, 4)), wrapper])
    _trained_like(model)
    baked = bake_weight_norm(model)
    cell = baked.layers[0].cell
    with wrapper.effective_kernel_scope():
        effective = [numpy(wrapper.layer.cell.kernel), numpy(wrapper.layer.cell.recurrent_kernel)]
    np.testing.assert_array_equal(numpy(cell.kernel), effective[0])
    np.testing.assert_array_equal(numpy(cell.recurrent_kernel), effective[1])
    v = numpy(wrapper.recurrent_v).astype("float64")
    np.testing.assert_allclose(np.sqrt(np.sum(numpy(cell.recurrent_kernel) ** 2, axis=0)),
                               numpy(wrapper.recurrent_g), rtol=1e-6)
    assert np.abs(v).max() > 0


def test_init_tools_and_signal_report_leave_wrapped_rnns_as_they_are():
    # Not weightnorm_data_init: it does the data init of wrapped RNNs (tests below).
    from keras_goodinit import lsuv_init, mean_field_init, signal_report

    x = _inputs((5, 4), batch=16)
    tools = {"mean_field_init": lambda m: mean_field_init(m, verbose=0),
             "lsuv_init": lambda m: lsuv_init(m, x, verbose=0),
             "signal_report": lambda m: signal_report(m, x)}
    for name, tool in tools.items():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((5, 4)), WeightNormalization(L.LSTM(6, return_sequences=True)),
            L.Bidirectional(WeightNormalization(L.GRU(3))), WeightNormalization(L.Dense(3))])
        recurrent = model.layers[0].weights + model.layers[1].weights
        before = [numpy(w).copy() for w in recurrent]
        report = tool(model)
        for value, w in zip(before, recurrent):
            np.testing.assert_array_equal(numpy(w), value, err_msg=f"{name}: {w.path}")
        if name == "lsuv_init":
            assert report[model.layers[2].name].status == "ok", (name, str(report))
            row = report[model.layers[0].name]
            assert row.status == "skipped" and "recurrent" in row.reason, (name, str(report))


# ---------------------------------------------------------------------------------------
# The data-dependent init (`data_init=True` in fit, `weightnorm_data_init`).

DATA_INIT_CASES = ("SimpleRNN", "LSTM", "GRU", "GRU_reset_before", "ConvLSTM1D",
                   "Bidirectional")


@pytest.mark.parametrize("masked", [False, True], ids=["all_steps", "masked"])
@pytest.mark.parametrize("name", DATA_INIT_CASES)
def test_data_init_standardizes_every_gates_input_part_per_unit(name, masked):
    from keras_goodinit import weightnorm_data_init

    ((model, wrapper), _), x, mask = data_init_pairs(name, masked)
    report = weightnorm_data_init(model, x, verbose=0)
    assert report[wrapper.name].status == "ok", str(report)
    parts = input_parts(wrapper, x, mask)
    mean_bound, var_bound = standardization_bound(wrapper, x, parts)
    for part in parts:  # each direction of a Bidirectional on its own statistics
        np.testing.assert_allclose(part.mean(0), 0.0, rtol=0, atol=mean_bound)
        np.testing.assert_allclose(part.var(0), 1.0, rtol=0, atol=var_bound)
    if masked:  # the padded steps would move every unit's statistics if they counted
        everything = input_parts(wrapper, x)
        assert min(np.abs(p.mean(0)).min() for p in everything) > 100 * mean_bound
    assert bool(numpy(wrapper.initialized))


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_data_init_keeps_the_forget_bias_the_recurrent_row_and_gains(name):
    from keras_goodinit import weightnorm_data_init

    ((model, wrapper), _), x, _ = data_init_pairs(name)
    cell = wrapper._cells[0]
    kept = {"v": wrapper.v, "recurrent_v": wrapper.recurrent_v,
            "recurrent_g": wrapper.recurrent_g}
    before = {key: numpy(v).copy() for key, v in kept.items()}
    bias_before = numpy(cell.bias).copy()
    weightnorm_data_init(model, x, verbose=0)
    for key, variable in kept.items():
        np.testing.assert_array_equal(numpy(variable), before[key], err_msg=key)
    (part,) = input_parts(wrapper, x)
    mean_bound, _ = standardization_bound(wrapper, x, [part])
    units = cell.units
    if name == "LSTM":  # x W + b: the forget gate's units average 1 (unit_forget_bias)
        np.testing.assert_allclose((part + _offset(cell)).mean(0),
                                   np.repeat([0.0, 1.0, 0.0, 0.0], units), atol=mean_bound)
    else:  # reset_after: the recurrent bias row, inside the reset gate, is kept
        np.testing.assert_array_equal(numpy(cell.bias)[1], bias_before[1])
        assert np.abs(numpy(cell.bias)[0] - bias_before[0]).max() > 0.1


@pytest.mark.parametrize("name,masked", [("LSTM", True), ("GRU", False),
                                         ("Bidirectional", True)])
def test_the_init_in_fit_sets_what_weightnorm_data_init_sets_on_the_same_batch(name, masked):
    facts = data_init_in_fit_and_eagerly(name, masked)
    assert facts["flags"] == [True, True] and facts["status"] == "ok", facts
    assert facts["moved"] > 0.1, facts  # the init did something
    # Same float32 statistics of the same batch through two graphs (the train step's and
    # the eager pass's): rounding order only, at the size of the values.
    assert facts["diff"] <= facts["bound"] * facts["scale"], facts


def test_the_init_in_fit_runs_once_and_a_second_weightnorm_data_init_is_a_no_op():
    from keras_goodinit import weightnorm_data_init

    ((model, wrapper), _), x, _ = data_init_pairs("LSTM")
    weightnorm_data_init(model, x, verbose=0)
    first = [numpy(v).astype("float64") for v in wrapper._init_variables()]
    # The offset is kept, not added again: the same batch gives the same values. The
    # second init finds the first one's parts standardized up to rounding, |mean| <=
    # mean_bound and |var - 1| <= var_bound (standardization_bound), and sets
    # g' = g / sigma and b' - o = (b - o - mu) / sigma: g moves by var_bound relative
    # (sigma = sqrt(var) moves by half that), the bias by mean_bound plus as much.
    mean_bound, var_bound = standardization_bound(wrapper, x, input_parts(wrapper, x))
    weightnorm_data_init(model, x, verbose=0)
    second = [numpy(v) for v in wrapper._init_variables()]
    for value, variable in zip(first, second):
        assert np.all(np.abs(variable - value) <= mean_bound + var_bound * np.abs(value)), (
            np.abs(variable - value).max(), mean_bound, var_bound)
    assert max(np.abs(a - b).max() for a, b in zip(first, second)) > 0  # a real recompute
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(x + 5.0, np.zeros((len(x), 1), "float32"), epochs=1, verbose=0)
    for value, variable in zip(second, wrapper._init_variables()):  # `initialized` was set
        np.testing.assert_array_equal(numpy(variable), value)


def test_weightnorm_data_init_does_the_rnn_of_a_wrapped_cell_and_orders_layers():
    from keras_goodinit import weightnorm_data_init

    keras.utils.set_random_seed(2)
    x = _inputs((5, 4), batch=16, seed=3) * 2.0 + 1.0
    model = keras.Sequential([
        keras.Input((5, 4)), WeightNormalization(L.Dense(4)),
        L.RNN(WeightNormalization(L.GRUCell(3)), return_sequences=True),
        L.Bidirectional(WeightNormalization(L.LSTM(3)))])
    report = weightnorm_data_init(model, x, verbose=0)
    assert [row.status for row in report.rows] == ["ok"] * 4, str(report)
    # Each recurrent layer's statistics are of its input after the layers before it were
    # initialized: recompute them on that input.
    h = model.layers[0](x)
    for wrapper, inputs in ((model.layers[1].cell, h),
                            (model.layers[2].forward_layer, model.layers[1](h))):
        parts = input_parts(wrapper, numpy(inputs))
        mean_bound, var_bound = standardization_bound(wrapper, numpy(inputs), parts)
        for part in parts:
            np.testing.assert_allclose(part.mean(0), 0.0, atol=mean_bound)
            np.testing.assert_allclose(part.var(0), 1.0, atol=var_bound)


def test_a_failed_weightnorm_data_init_leaves_every_weight_as_it_was(monkeypatch):
    from keras_goodinit import lsuv, weightnorm_data_init

    ((model, _), _), x, _ = data_init_pairs("Bidirectional")
    model = keras.Sequential([model.layers[0], model.layers[1],
                              WeightNormalization(L.LSTM(2, return_sequences=True)),
                              L.Dense(1)])
    before = [numpy(w).copy() for w in model.weights]
    calls = []
    original = lsuv._recurrent_data_init

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first wrapper is done by now
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(lsuv, "_recurrent_data_init", failing)
    with pytest.raises(RuntimeError, match="boom"):
        weightnorm_data_init(model, x, verbose=0)
    assert len(calls) == 2
    for value, w in zip(before, model.weights):
        np.testing.assert_array_equal(numpy(w), value, err_msg=w.path)


def test_data_init_on_a_cell_raises_and_points_at_the_rnn():
    with pytest.raises(ValueError, match=r"wrap the RNN layer instead.*"
                                         r"Received: data_init=True"):
        WeightNormalization(L.LSTMCell(2), data_init=True)


def test_weightnorm_data_init_names_a_bad_layers_entry():
    from keras_goodinit import weightnorm_data_init

    ((model, _), _), x, _ = data_init_pairs("LSTM")
    with pytest.raises(ValueError, match=r"Received: layers entry 'nope'"):
        weightnorm_data_init(model, x, layers=["nope"], verbose=0)


def test_weightnorm_data_init_takes_a_bidirectional_of_wrappers_as_both_sides():
    from keras_goodinit import weightnorm_data_init

    x = _inputs((5, 3), batch=8, seed=4) * 2.0 + 1.0

    def model():
        keras.utils.set_random_seed(6)
        inputs = keras.Input((5, 3))
        bi = L.Bidirectional(WeightNormalization(L.GRU(2)), name="bi")
        return keras.Model(inputs, L.Dense(1, name="head")(bi(inputs))), bi

    reference, bi = model()
    weightnorm_data_init(reference, x, layers=None, verbose=0)
    expected = [numpy(w) for w in bi.weights]
    for entry in ("bi", "object"):
        built, bi = model()
        report = weightnorm_data_init(built, x, layers=[bi if entry == "object" else "bi"],
                                      verbose=0)
        assert [row.status for row in report.rows] == ["ok", "ok"], str(report)
        for value, w in zip(expected, bi.weights):  # the same eager pass as layers=None
            np.testing.assert_array_equal(numpy(w), value, err_msg=f"{entry}: {w.path}")
    # A bad entry's error lists the recurrent entries beside the kernel targets.
    with pytest.raises(ValueError, match=r"targets are \['head'\]; weight-normalized "
                                         r"recurrent layers .*'bi'"):
        weightnorm_data_init(built, x, layers=["nope"], verbose=0)


def test_a_constant_bias_initializer_is_kept_row_by_row_or_refused_by_name():
    from keras_goodinit import weightnorm_data_init

    # A GRU with reset_after has a (2, 3 units) bias: the input row of the value is kept.
    value = np.arange(12.0).reshape(2, 6) / 4.0
    keras.utils.set_random_seed(7)
    wrapper = WeightNormalization(L.GRU(2, bias_initializer=keras.initializers.Constant(
        value)))
    model = keras.Sequential([keras.Input((5, 3)), wrapper])
    x = _inputs((5, 3), batch=16, seed=8) * 2.0 + 1.0
    assert weightnorm_data_init(model, x, verbose=0).rows[0].status == "ok"
    (part,) = input_parts(wrapper, x)  # x W + b, GRU: no offset of _offset's
    mean_bound, _ = standardization_bound(wrapper, x, [part])
    np.testing.assert_allclose(part.mean(0), value[0], rtol=0, atol=mean_bound)
    np.testing.assert_array_equal(numpy(wrapper.layer.cell.bias)[1], value[1])
    # Keras builds this bias with shape (1, 8), which is not the cell's (8,): refused.
    lstm = L.LSTM(2, unit_forget_bias=False, name="odd",
                  bias_initializer=keras.initializers.Constant(np.ones((1, 8))))
    odd = WeightNormalization(lstm, data_init=True)
    with pytest.raises(ValueError, match=r"layer 'lstm_cell.*'.*bias shape \(8,\)\. "
                                         r"Received: bias_initializer=Constant\(value="):
        odd(x, training=True)


# ---------------------------------------------------------------------------------------
# tensorflow-addons' own RNN cases (tensorflow_addons/layers/tests/wrappers_test.py), as
# this package does them: `remove()` is `bake_weight_norm`, `.h5` weights are
# `.weights.h5`, and `data_init=True` (TFA: a warning that the paper advises against it,
# then g rescaled by the statistics of the RNN's output) is the data init of the input part
# on the first training batch here (tests above).
TFA_RNNS = {
    "SimpleRNN": (lambda: L.SimpleRNN(1), [10, 10]),
    "LSTM": (lambda: L.LSTM(1), [10, 10]),
}


@pytest.mark.parametrize("name", TFA_RNNS)
def test_tfa_serialization(name):
    base = TFA_RNNS[name][0]()
    wrapper = WeightNormalization(base, False)
    new = keras.layers.deserialize(keras.layers.serialize(wrapper))
    assert new.data_init == wrapper.data_init is False
    assert new.recurrent is True and isinstance(new.layer, type(base))


@pytest.mark.parametrize("data_init", [False, True])
@pytest.mark.parametrize("name,shape", [("SimpleRNN", [None, 10]), ("LSTM", [10, 10])])
def test_tfa_model_build(name, shape, data_init):
    model = keras.Sequential([keras.Input(shape), WeightNormalization(TFA_RNNS[name][0](),
                                                                      data_init)])
    model.build()
    assert model.built and model.output_shape == (None, 1)


@pytest.mark.parametrize("name", TFA_RNNS)
def test_tfa_save_weights_file(name, tmp_path):
    factory, shape = TFA_RNNS[name]
    model = keras.Sequential([WeightNormalization(factory())])
    model.build([None] + shape)
    _trained_like(model)
    model.save_weights(tmp_path / "wrapper_test_model.weights.h5")
    other = keras.Sequential([WeightNormalization(factory())])
    other.build([None] + shape)
    other.load_weights(tmp_path / "wrapper_test_model.weights.h5")
    x = np.ones([1] + shape, "float32")
    np.testing.assert_array_equal(numpy(other(x)), numpy(model(x)))


@pytest.mark.parametrize("name", TFA_RNNS)
def test_tfa_forward_pass(name):
    factory, shape = TFA_RNNS[name]
    x = np.ones([1] + shape, dtype=np.float32)
    base = factory()
    base_output = numpy(base(x))
    wn_output = numpy(WeightNormalization(base, False)(x))
    np.testing.assert_allclose(base_output, wn_output, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("data_init", [False, True])
@pytest.mark.parametrize("name", TFA_RNNS)
def test_tfa_removal(name, data_init):
    factory, shape = TFA_RNNS[name]
    x = np.ones([1] + shape, dtype=np.float32)
    base = factory()
    model = keras.Sequential([keras.Input(shape), WeightNormalization(base, data_init)])
    _trained_like(model)
    wn_output = numpy(model(x))
    removed = bake_weight_norm(model)
    assert isinstance(removed.layers[0], type(base))
    # One unit, 10 steps, fan-in 10 + 1: the effective kernel is copied, not recomputed.
    np.testing.assert_allclose(numpy(removed(x)), wn_output, rtol=0, atol=reordered(10, 11))


# ---------------------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize("value", ["yes", 1, None])
def test_recurrent_must_be_a_bool(value):
    with pytest.raises(ValueError, match=re.escape(f"Received: recurrent={value!r}")):
        WeightNormalization(L.LSTM(2), recurrent=value)


def test_recurrent_false_on_a_non_recurrent_layer_raises():
    with pytest.raises(ValueError, match=r"`recurrent` applies to recurrent layers only.*"
                                         r"Received: recurrent=False"):
        WeightNormalization(L.Dense(2), recurrent=False)


def test_a_cell_with_dropout_raises_and_points_at_the_rnn():
    with pytest.raises(ValueError, match=r"Wrap the RNN layer instead.*dropout=0.5"):
        WeightNormalization(L.LSTMCell(2, dropout=0.5))


@pytest.mark.parametrize("layer", [
    L.RNN(L.StackedRNNCells([L.LSTMCell(2), L.LSTMCell(2)])),
    L.RNN(WeightNormalization(L.LSTMCell(2))),
    WeightNormalization(L.LSTM(2)),
], ids=["stacked_cells", "rnn_of_a_wrapped_cell", "wrapped_twice"])
def test_unsupported_recurrent_layers_raise_listing_the_supported(layer):
    with pytest.raises(ValueError, match=r"Supported: Dense.*SimpleRNN, LSTM, GRU, "
                                         r"ConvLSTM1D/2D/3D.*Received: layer=") as info:
        WeightNormalization(layer)
    assert type(layer).__name__ in str(info.value)


def test_rnn_attributes_of_a_non_recurrent_wrapper_are_missing():
    wrapper = WeightNormalization(L.Dense(2))
    for name in ("state_size", "return_sequences", "go_backwards", "get_initial_state"):
        assert getattr(wrapper, name, None) is None
    with pytest.raises(ValueError, match=r"Received: go_backwards=True"):
        WeightNormalization(L.Dense(2), go_backwards=True)


def test_substituted_kernels_do_not_leak_out_of_the_call():
    wrapper, x = _built("LSTM")
    cell = _cells(wrapper)[0]
    wrapper.recurrent_g.assign(numpy(wrapper.recurrent_g) * 2.0)
    before = [numpy(cell.kernel), numpy(cell.recurrent_kernel)]
    wrapper(x)
    np.testing.assert_array_equal(numpy(cell.kernel), before[0])
    np.testing.assert_array_equal(numpy(cell.recurrent_kernel), before[1])
    with substituted(cell.kernel, np.zeros(cell.kernel.shape, "float32")):
        assert float(np.abs(numpy(cell.kernel.value)).max()) == 0.0
    np.testing.assert_array_equal(numpy(cell.kernel), before[0])


# ---------------------------------------------------------------------------------------
# JAX and PyTorch, each in its own process running this file as the worker.

BACKENDS = ("jax", "torch")


@pytest.fixture(scope="module", autouse=True)
def started(request, tmp_path_factory):
    """The workers, started with this module's first test, to run beside the others
    (not at all when no selected test needs them)."""
    processes = {}
    if not any("workers" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield processes
        return
    folder = tmp_path_factory.mktemp("rnn_workers")
    for backend in BACKENDS:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
               "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
        out, log = folder / f"{backend}.json", folder / f"{backend}.log"
        with open(log, "w") as handle:
            processes[backend] = (subprocess.Popen(
                [sys.executable, str(Path(__file__)), str(out)], stdout=handle,
                stderr=subprocess.STDOUT, text=True, env=env,
                cwd=str(Path(__file__).parent)), out, log)
    yield processes
    for process, _, _ in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def workers(started):
    """backend -> (the facts its worker recorded, its log)."""
    processes, results = started, {}
    for backend, (process, out, log) in processes.items():
        try:
            process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        results[backend] = (json.loads(out.read_text()) if out.exists() else {},
                            log.read_text())
    return results


def _fact(workers, backend, name):
    results, log = workers[backend]
    assert "DONE" in log and results.get("backend") == backend, log[-4000:]
    result = results[name]
    assert "error" not in result, f"{result['error']}\n{result.get('traceback', '')}"
    return result


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_backends_compute_what_the_bare_layer_computes_at_build(workers, backend):
    facts = _fact(workers, backend, "exact_at_build")
    assert set(facts) == set(WORKER_CASES)
    for name, fact in facts.items():
        assert fact["shape"] == fact["expected_shape"], name
        assert fact["diff"] <= fact["bound"], (name, fact)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_backends_bake_save_and_fit(workers, backend):
    facts = _fact(workers, backend, "bake_and_save")
    assert "WeightNormalization" not in facts["baked_classes"]
    assert facts["bake"] <= facts["bound"] and facts["load"] == 0.0, facts
    fit = _fact(workers, backend, "fit")
    assert np.isfinite(fit["loss"]) and fit["g_moved"] > 0 and fit["recurrent_g_moved"] > 0
    # Keras' JAX trainer runs the step in a stateless scope, whose seed update the
    # wrapper must hand on; PyTorch's dropout keeps no state in the seed (bare layers too).
    if backend == "jax":
        assert fit["seed"] != fit["seed_before"], fit


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_backends_do_the_data_init_in_fit_as_weightnorm_data_init_does(workers, backend):
    facts = _fact(workers, backend, "data_init")
    assert facts["flags"] == [True, True] and facts["status"] == "ok", facts
    assert facts["moved"] > 0.1, facts
    assert facts["diff"] <= facts["bound"] * facts["scale"], facts


def test_an_empty_share_of_a_batch_adds_nothing_to_the_summed_statistics():
    # Under tf.distribute a replica can get no examples (a batch smaller than the replica
    # count): its moments must neither raise nor poison the sum with 0 * NaN.
    from keras_goodinit import _sweep
    from keras_goodinit.weight_norm import _moments_of_sums, _sums_of

    mean, var = _sweep.moments_of(keras.ops.zeros((0, 3)), None, (0,))
    empty = [np.asarray(keras.ops.convert_to_numpy(v)) for v in _sums_of(mean, var, 0.0)]
    assert [float(np.max(np.abs(v))) for v in empty] == [0.0, 0.0, 0.0]
    y = np.random.default_rng(0).normal(3.0, 2.0, size=(64, 3)).astype("float32")
    full = _sums_of(*_sweep.moments_of(keras.ops.convert_to_tensor(y), None, (0,)), 64.0)
    got_mean, got_var = (np.asarray(keras.ops.convert_to_numpy(v)) for v in
                         _moments_of_sums(*(a + b for a, b in zip(full, empty))))
    # The empty share changes nothing: exactly the 64 values' own moments.
    alone_mean, alone_var = (np.asarray(keras.ops.convert_to_numpy(v)) for v in
                             _moments_of_sums(*full))
    np.testing.assert_array_equal(got_mean, alone_mean)
    np.testing.assert_array_equal(got_var, alone_var)
