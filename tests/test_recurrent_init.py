"""Recurrent kernels: the mean-field recursion, the data-free plan and LSUV (issue 19, part 3b).

Measurements are independent of the package where it matters: the gate
pre-activations `lsuv_init` aimed at are recomputed here by a NumPy LSTM/GRU
written from Keras' equations (checked against the layer's own output), and
the plan is checked on the layer's own recursion.
"""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _rounding import reordered  # noqa: E402
from keras import layers as L  # noqa: E402

from keras_goodinit import _graph, lsuv_init, rules  # noqa: E402
from keras_goodinit import _recurrent as R  # noqa: E402

B, T, D, U = 512, 8, 32, 32
# A second moment over n independent Gaussian entries has relative std sqrt(2 / n). Here
# n = B * U per step and gate: with orthonormal gate blocks (D = U) the U entries of one
# sample are uncorrelated. 5 std keeps 4 * T comparisons per layer clear of chance.
SAMPLING = 5 * math.sqrt(2 / (B * U))


def _layers():
    return {
        "simple_rnn": L.SimpleRNN(U, return_sequences=True),
        "lstm": L.LSTM(U, return_sequences=True),  # unit_forget_bias: forget bias 1
        "gru": L.GRU(U, return_sequences=True),
        "gru_reset_before": L.GRU(U, return_sequences=True, reset_after=False, go_backwards=True),
    }


def _measured_q(layer, x):
    """Per processing step and gate: mean of z^2 over batch and units, from Keras' own cell."""
    parts = R.preactivations(layer.cell, x, R.unroll(layer, x))
    q = np.array([[np.mean((a + rest)[:, t] ** 2) for a, rest in parts.values()]
                  for t in range(x.shape[1])])
    return q[::-1] if layer.go_backwards else q


@pytest.mark.parametrize("kind", list(_layers()))
def test_the_recursion_predicts_every_gates_second_moment_at_every_step(kind):
    layer = _layers()[kind]
    layer.build((None, T, D))
    R.orthogonalize(layer, seed=3)
    std = np.linspace(0.5, 2.0, T)  # an input whose moment changes with time
    x = (np.random.default_rng(1).normal(size=(B, T, D)) * std[None, :, None]).astype("float32")
    trace = R.predict(layer, std**2)
    measured = _measured_q(layer, x)
    assert measured.shape == trace.q.shape == (T, len(R.gates(layer.cell)))
    assert np.max(np.abs(measured / trace.q - 1)) < SAMPLING, (measured, trace.q)
    # The test can fail: the input's moments one step late miss by more than the bound.
    late = R.predict(layer, np.r_[std[:1], std[:-1]] ** 2)
    assert np.max(np.abs(measured / late.q - 1)) > 3 * SAMPLING
    # The output's moments per step too (return_sequences=True), in Keras' output order.
    out = keras.ops.convert_to_numpy(layer(x)).astype(float)
    h_power = np.mean(out**2, axis=(0, 2))
    # The same sampling bound plus the recursion's model error: it takes the gates
    # independent across time (module docstring); measured here at most 4% over 8 steps.
    assert np.max(np.abs(h_power / trace.h_power - 1)) < SAMPLING + R.MODEL_ERROR


@pytest.fixture
def recurrent_rules():
    """RecurrentRule registered for the RNN layers, the registry restored afterwards."""
    saved = dict(rules._RULES)
    rule = R.RecurrentRule()
    for cls in (L.SimpleRNN, L.LSTM, L.GRU, L.Bidirectional):
        rules.register_layer_rule(cls, rule)
    yield rule
    rules._RULES.clear()
    rules._RULES.update(saved)
    rules._VERSION += 1  # graphs flattened with the rule are stale


def test_the_rule_follows_a_graph_of_recurrent_layers(recurrent_rules):
    inputs = keras.Input((T, D))
    h = L.LSTM(U, return_sequences=True, name="lstm")(inputs)
    h = L.Bidirectional(L.GRU(U, return_sequences=True), name="bi")(h)
    out, state = L.SimpleRNN(U, return_state=True, name="rnn")(h)
    model = keras.Model(inputs, [out, state])
    graph = _graph.flatten(model)
    steps = {step.layer.name: step for step in graph.steps}
    assert all(steps[n].rule is recurrent_rules for n in ("lstm", "bi", "rnn"))
    signal = rules.Signal(np.full(T, 2.0), np.zeros(T))
    found = {}
    for name in ("lstm", "bi", "rnn"):
        step = steps[name]
        outs = step.rule.propagate(_graph.context(graph, step), [signal])
        found[name] = outs
        signal = outs[0]
    lstm = model.get_layer("lstm")
    expected = R.predict(lstm, np.full(T, 2.0))
    np.testing.assert_allclose(found["lstm"][0].power, expected.h_power, rtol=1e-12)
    # Bidirectional: both directions, the backward one back in input order, concatenated.
    bi = model.get_layer("bi")
    forward = R.predict(bi.forward_layer, expected.h_power)
    backward = R.predict(bi.backward_layer, expected.h_power)
    np.testing.assert_allclose(found["bi"][0].power,
                               (forward.h_power + backward.h_power[::-1]) / 2, rtol=1e-12)
    # return_sequences=False with return_state: the last step, twice.
    assert [np.shape(s.power) for s in found["rnn"]] == [(), ()]
    last = R.predict(model.get_layer("rnn"), found["bi"][0].power).h_power[-1]
    assert found["rnn"][0].power == pytest.approx(last, rel=1e-12)
    assert found["rnn"][1].power == pytest.approx(last, rel=1e-12)


def test_the_rule_says_why_it_cannot_follow_an_initial_state(recurrent_rules):
    ctx = rules.Context(L.LSTM(4), in_shapes=[(None, T, D), (None, 4), (None, 4)],
                        out_shapes=[(None, 4)])
    known = rules.Signal(np.ones(T), np.zeros(T))
    (out,) = recurrent_rules.propagate(ctx, [known, known, known])
    assert "initial state" in out.unknown


@pytest.mark.parametrize("kind", ["simple_rnn", "lstm", "gru", "gru_reset_before"])
def test_the_plan_puts_every_gate_at_the_target_at_the_stationary_state(kind):
    layer = _layers()[kind]
    steps = 40
    layer.build((None, steps, D))
    power = 3.0
    plan = R.plan(layer, rules.Signal(np.full(steps, power), np.zeros(steps)))
    (side,) = plan["sides"]
    assert side["status"] == "ok"
    for gate, var in side["stationary"]["var"].items():
        assert var == pytest.approx(1.0, rel=1e-8), gate
    R.write(layer, plan, seed=5)
    names = R.gates(layer.cell)
    w = np.split(keras.ops.convert_to_numpy(layer.cell.kernel).astype(float), len(names), -1)
    u = np.split(keras.ops.convert_to_numpy(layer.cell.recurrent_kernel).astype(float),
                 len(names), -1)
    eye = np.eye(U)
    for gain, block, rec in zip(side["input_gain"], w, u):
        # Orthogonal directions at the planned norm, an orthogonal recurrent block: float32
        # rounding of a U-term dot product.
        np.testing.assert_allclose(block.T @ block, gain**2 * eye,
                                   atol=reordered(2, U, gain**2))
        np.testing.assert_allclose(rec.T @ rec, eye, atol=reordered(2, U))
    rng = np.random.default_rng(2)
    x = (math.sqrt(power) * rng.normal(size=(256, steps, D))).astype("float32")
    parts = R.preactivations(layer.cell, x, R.unroll(layer, x))
    late = slice(steps // 2, None) if not layer.go_backwards else slice(None, steps // 2)
    for gate, (a, rest) in parts.items():
        var = float(np.var((a + rest)[:, late]))
        # 256 * 20 steps * U entries, correlated across steps: the per-step bound at n = 256 U.
        assert abs(var - 1.0) < 5 * math.sqrt(2 / (256 * U)), (gate, var)


def test_write_leaves_every_weight_as_it_was_when_it_fails(monkeypatch):
    layer = L.Bidirectional(L.LSTM(8))
    layer.build((None, 5, 4))
    plan = R.plan(layer, rules.Signal(np.ones(5), np.zeros(5)))
    before = [keras.ops.convert_to_numpy(v).copy() for v in layer.weights]
    calls = []
    real = R._assign

    def failing(variable, blocks):
        calls.append(variable)
        if len(calls) == 3:  # the backward side's input kernel: the forward side is written
            raise RuntimeError("disk full")
        real(variable, blocks)

    monkeypatch.setattr(R, "_assign", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        R.write(layer, plan, seed=0)
    for variable, old in zip(layer.weights, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), old)


def _lstm_reference(cell, x, mask):
    """Gate pre-activations (i, f, c, o) and the output sequence, in NumPy from Keras' equations."""
    kernel, rec = (keras.ops.convert_to_numpy(v).astype(float)
                   for v in (cell.kernel, cell.recurrent_kernel))
    bias = keras.ops.convert_to_numpy(cell.bias).astype(float)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    h = np.zeros((x.shape[0], cell.units))
    c = np.zeros_like(h)
    zs, hs = [], []
    for t in range(x.shape[1]):
        z = x[:, t] @ kernel + h @ rec + bias
        i, f, g, o = np.split(z, 4, -1)
        c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h_new = sigmoid(o) * np.tanh(c_new)
        keep = mask[:, t, None]
        h, c = np.where(keep, h_new, h), np.where(keep, c_new, c)
        zs.append(z)
        hs.append(np.where(keep, h_new, 0.0))
    return np.stack(zs, 1), np.stack(hs, 1)


def _tokens(seed, n, steps, vocab):
    """Random tokens, zero-padded at the end to random lengths (at least half the steps)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(n, steps))
    for row, length in zip(tokens, rng.integers(steps // 2, steps, size=n)):
        row[length:] = 0
    return tokens.astype("int32")


def test_lsuv_init_sets_every_gate_over_the_unmasked_steps():
    keras.utils.set_random_seed(0)
    steps, vocab = 12, 20
    inputs = keras.Input((steps,), dtype="int32")
    h = L.Embedding(vocab, 16, mask_zero=True, name="embed")(inputs)
    h = L.Dense(16, name="project")(h)
    h = L.LSTM(24, return_sequences=True, name="lstm")(h)
    h = L.Bidirectional(L.GRU(12, return_sequences=True, name="gru"), name="bi")(h)
    h = L.SimpleRNN(16, name="rnn")(h)
    model = keras.Model(inputs, L.Dense(3, name="head")(h))
    tokens = _tokens(0, 128, steps, vocab)
    report = lsuv_init(model, tokens, verbose=0, seed=1)
    names = [row.name for row in report.rows]
    assert names == ["project", "lstm", "bi/forward_gru", "bi/backward_gru", "rnn", "head",
                     "embed"], names
    for row in report.rows[:-1]:
        assert row.status == "ok" and abs(row.var_after - 1.0) < 0.1, row
    # An independent measurement of the LSTM's gates over the unmasked steps only.
    sub = keras.Model(inputs, model.get_layer("project").output)
    x = keras.ops.convert_to_numpy(sub(tokens)).astype(float)
    mask = tokens != 0
    lstm = model.get_layer("lstm")
    z, h_ref = _lstm_reference(lstm.cell, x, mask)
    out = keras.ops.convert_to_numpy(keras.Model(inputs, lstm.output)(tokens)).astype(float)
    # The reference is Keras' LSTM: float32 against float64 over a 40-term sum per step.
    np.testing.assert_allclose(h_ref[mask], out[mask], atol=reordered(steps, 40, 1.0))
    variances = [float(np.var(block[mask])) for block in np.split(z, 4, -1)]
    for gate, var in zip("ifco", variances):
        assert abs(var - 1.0) < 0.1, (gate, var)
    # The row reports the gate farthest from the target: the same figure, but for float32
    # rounding of the package's unroll (relative ~1e-6 over 12 steps).
    worst = max(variances, key=lambda v: abs(v - 1.0))
    assert report["lstm"].var_after == pytest.approx(worst, rel=1e-4)
    # Padded steps are not the same statistics: counting them would change the figure.
    assert abs(float(np.var(z)) - float(np.var(z[mask]))) > 1e-3
    # Every recurrent kernel is orthogonal per gate block, to float32 rounding.
    for rnn, _, _ in R.model_layers(model):
        units = rnn.cell.units
        rec = keras.ops.convert_to_numpy(rnn.cell.recurrent_kernel).astype(float)
        for block in np.split(rec, len(R.gates(rnn.cell)), -1):
            np.testing.assert_allclose(block.T @ block, np.eye(units), atol=reordered(2, units))
    # The head was fitted to the recurrent layers' final output, not their first.
    head = keras.ops.convert_to_numpy(keras.Model(inputs, model.get_layer("head").output)(
        tokens)).astype(float)
    assert abs(float(np.var(head)) - 1.0) < 0.1


def test_a_layers_filter_leaves_recurrent_layers_alone():
    inputs = keras.Input((6, 4))
    h = L.Dense(4, name="d")(inputs)
    model = keras.Model(inputs, L.LSTM(3, name="lstm")(h))
    before = keras.ops.convert_to_numpy(model.get_layer("lstm").cell.kernel).copy()
    report = lsuv_init(model, np.ones((8, 6, 4), "float32"), layers=["d"], verbose=0)
    assert [r.name for r in report.rows] == ["d"]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(
        model.get_layer("lstm").cell.kernel), before)


def test_a_model_of_recurrent_layers_alone_is_initialized():
    model = keras.Sequential([keras.Input((10, 6)), L.LSTM(8, return_sequences=True, name="a"),
                              L.GRU(8, name="b")])
    x = np.random.default_rng(0).normal(size=(64, 10, 6)).astype("float32")
    report = lsuv_init(model, 3.0 * x, verbose=0, seed=0)
    assert [(row.name, row.status) for row in report.rows] == [("a", "ok"), ("b", "ok")]
    for row in report.rows:
        assert abs(row.var_after - 1.0) < 0.1, row
    # Before: the input's variance 9 through unit-norm columns; then an LSTM's small output.
    assert report["a"].var_before > 4 and report["b"].var_before < 0.5, report.rows


def _cross_entropy(logits, labels) -> float:
    logits = np.asarray(logits, float)
    logits = logits - logits.max(-1, keepdims=True)
    return float(np.mean(np.log(np.exp(logits).sum(-1))
                         - logits[np.arange(len(labels)), labels]))


def test_four_layer_lstms_learn_to_recall_the_first_token_after_lsuv_init():
    # Two independent 4-layer LSTM stacks side by side in one model: two draws for the cost
    # of one traced training step (Adam's steps are per parameter, so the towers do not
    # interact). Each must recall the first of 8 random tokens from its last state.
    steps, vocab, n = 8, 8, 512
    tokens = np.random.default_rng(0).integers(0, vocab, size=(n, steps)).astype("int32")
    labels = tokens[:, 0]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((steps,), dtype="int32")
    towers = []
    for k in range(2):
        h = L.Embedding(vocab, 16)(inputs)
        for i in range(4):
            h = L.LSTM(16, return_sequences=i < 3)(h)
        towers.append(L.Dense(vocab, name=f"tower{k}")(h))
    model = keras.Model(inputs, towers)
    report = lsuv_init(model, tokens[:128], verbose=0, seed=0)
    assert sum(row.class_name == "LSTM" and row.status == "ok" for row in report.rows) == 8
    start = [_cross_entropy(out, labels) for out in model(tokens)]
    model.compile(keras.optimizers.Adam(1e-2),
                  [keras.losses.SparseCategoricalCrossentropy(from_logits=True)] * 2,
                  jit_compile=False)
    model.fit(tokens, [labels, labels], batch_size=32, epochs=4, verbose=0, shuffle=False)
    end = [_cross_entropy(out, labels) for out in model(tokens)]
    # Measured (seeds 0 and 3, four towers): end / start 0.01-0.022 after these 64 steps;
    # with Keras' default init 0.18-0.68 (chance: ln 8 = 2.08).
    for before, after in zip(start, end):
        assert after < 0.1 * before, (start, end)


def test_bad_input_names_the_argument():
    layer = L.LSTM(4)
    layer.build((None, 3, 2))
    signal = rules.Signal(np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="`layer`"):
        R.plan(L.Dense(3), signal)
    with pytest.raises(ValueError, match="`target_var`"):
        R.plan(layer, signal, target_var=-1.0)
    with pytest.raises(ValueError, match="`signal`"):
        R.plan(layer, rules.Signal.unknown_after("no idea", (3,)))
    with pytest.raises(ValueError, match="`power`"):
        R.predict(layer, [1.0, -1.0])
    with pytest.raises(ValueError, match="`plan`"):
        R.write(layer, {"sides": []})
    with pytest.raises(ValueError, match="`seed`"):
        R.write(layer, R.plan(layer, signal), seed=-2)
    with pytest.raises(ValueError, match="built"):
        R.plan(L.GRU(3), signal)


def test_a_written_plan_measures_as_predicted_over_the_unmasked_steps(recurrent_rules):
    # What mean_field_init does with a recurrent layer: plan from the propagated signal,
    # follow the planned outputs downstream, write, then measure on data.
    steps, width = 16, 24
    inputs = keras.Input((steps, width))
    masked = L.Masking(0.0)(inputs)
    h = L.LSTM(U, return_sequences=True, name="lstm")(masked)
    h = L.Bidirectional(L.GRU(U, name="gru"), name="bi")(h)
    model = keras.Model(inputs, h)
    graph = _graph.flatten(model)
    signal = rules.Signal(np.full(steps, 2.0), np.zeros(steps))
    x = (math.sqrt(2.0) * np.random.default_rng(4).normal(size=(B, steps, width))).astype(
        "float32")
    x[: B // 2, steps - 4:] = 0.0  # half the samples end in 4 padded steps
    rows = []
    for step in graph.steps:
        if step.rule is not recurrent_rules:
            continue
        plan = R.plan(step.layer, signal)
        planned = R.planned_outputs(_graph.context(graph, step), [signal], plan)
        R.write(step.layer, plan, seed=7)
        # After writing, the layer's own kernels give the planned outputs (norms exact).
        own = step.rule.propagate(_graph.context(graph, step), [signal])
        np.testing.assert_allclose(own[0].power, planned[0].power, rtol=1e-5)
        signal = planned[0]
        rows += R.plan_rows(step.layer, plan, R.measure(model, x, step.layer, plan))
    assert [row["name"] for row in rows] == ["lstm", "bi/forward_gru", "bi/backward_gru"]
    for row in rows:
        assert row["status"] == "ok", row
        assert abs(row["measured"] / row["predicted"] - 1) < row["tolerance"], row


def test_mean_field_init_plans_a_recurrent_layer_and_checks_it_on_data():
    from keras_goodinit import mean_field_init

    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 8))
    model = keras.Model(inputs, keras.layers.LSTM(16, return_sequences=True, name="lstm")(inputs))
    x = np.random.default_rng(0).normal(size=(256, 10, 8)).astype("float32")
    report = mean_field_init(model, data=x, seed=0, verbose=0)
    row = report["lstm"]
    # One recurrent layer on unit Gaussian input: the recursion's gate predictions are the
    # ones measured within the row's tolerance (sampling error plus the model's bias).
    assert row.rule == "recurrent" and row.status == "ok", report.table()
    u = np.asarray(model.get_layer("lstm").cell.recurrent_kernel)
    for block in np.split(u, 4, axis=1):  # each gate's block orthogonal (float32 rounding)
        np.testing.assert_allclose(block.T @ block, np.eye(16), atol=1e-5)


def test_mean_field_init_without_redrawing_leaves_recurrent_layers_to_their_rule():
    from keras_goodinit import mean_field_init

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 4))
    lstm = keras.layers.LSTM(8, return_sequences=True, name="lstm")
    model = keras.Model(inputs, lstm(inputs))
    before = [np.array(v) for v in (lstm.cell.kernel, lstm.cell.recurrent_kernel)]
    report = mean_field_init(model, distribution=None, seed=0, verbose=0)
    # distribution=None redraws nothing: the recurrent kernels stay, and get no plan row.
    for old, variable in zip(before, (lstm.cell.kernel, lstm.cell.recurrent_kernel)):
        np.testing.assert_array_equal(np.array(variable), old)
    assert "lstm" not in [row.name for row in report.rows]
