"""Recurrent layers at initialization: mean-field moments over time, a data-free plan, LSUV.

A SimpleRNN, LSTM or GRU cell computes each gate's pre-activation as
`z_t = x_t W + h_{t-1} U + b`, with `W` the input kernel and `U` the
recurrent kernel, both `(fan_in, gates * units)`: one column block per gate
(SimpleRNN `h`; LSTM `i, f, c, o`; GRU `z, r, h`, whose candidate `h` adds
the reset gate: `x W_h + b_h + r * (h U_h + b'_h)` with `reset_after`, else
`x W_h + (r * h) U_h + b_h`).

**The mean-field recursion** (`RecurrentRule`, `predict`) follows, step by
step from the zero initial state, each gate's pre-activation mean and
variance per unit and the moments of the states `h_t` (and `c_t`), from the
input's per-entry second moment at each time step. What it assumes:

- Over random kernel directions each unit's pre-activation is Gaussian, with
  its bias as mean and variance `a_g E[x^2] + r_g E[h^2]`, `a_g` and `r_g`
  the gate block's mean squared column norms in `W` and `U` (the input's mean
  counts as spread across units, as `rules.KernelRule` counts it).
- The input `x_t`, the previous state and the gates are independent of each
  other (the gate blocks are different columns; one unit's own weight in `U`
  is one of `units`), so the moments of products are products of moments.
- The LSTM cell state `c_t` is Gaussian with its own mean and variance where
  `tanh(c_t)` is taken (a sum of many small terms); the gates' moments are
  exact Gaussian moments (`_moments.moments`).
- `U` mixes every unit, so the recurrent term sees the state's second moment
  averaged over units; units with other biases (LSTM's `unit_forget_bias`)
  keep moments of their own.
- Each step's gates are independent of earlier steps' gates. They are not
  quite: the recurrent term `h_{t-1} U` carries the state's persistence into
  them, and the LSTM cell state's second moment comes out above the
  prediction at the stationary state (measured +8-10% for `c`, +5-9% for
  `h`, at 16-128 units with the plan's gains), which a layer it feeds
  inherits. `MODEL_ERROR` allows for it where a measurement is compared.
- No mask (the graph has no data): every step counts. Time steps are
  followed one by one, so `return_sequences` gives a moment per step.

**The data-free plan** (`plan`, `write`) draws each gate block of `U` as an
orthogonal matrix (gain 1) and each block of `W` with orthogonal directions
and the column norm that puts the gate's pre-activation variance around its
bias at `target_var` at the stationary state of the recursion (the fixed
point of the state's moments under a constant input second moment). With
zero biases that is a second moment of `target_var`; a bias (LSTM's forget
bias 1) adds its square, which no kernel can remove.

**LSUV** (`lsuv_fit`) measures the gate pre-activations over every unmasked
time step of the layer's own recursion on a batch, and rescales each gate
block of `W` until its variance is within `tol` of `target_var`.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
from keras import layers as klayers
from keras import ops

from keras_goodinit import _moments, _sweep, rules
from keras_goodinit.initializers import GoodInit
from keras_goodinit.report import LayerRecord

CELLS = (klayers.SimpleRNNCell, klayers.LSTMCell, klayers.GRUCell)
_GATES = {klayers.SimpleRNNCell: ("h",), klayers.LSTMCell: ("i", "f", "c", "o"),
          klayers.GRUCell: ("z", "r", "h")}
# Relative error of a predicted gate or state moment that the neglected correlation of the
# gates across time can make (module docstring: measured up to 9% on `h`, 10% on `c`).
MODEL_ERROR = 0.1
# Fixed point of the state's moments: stop when a step changes them by less than this.
_SETTLED = 1e-10
_MAX_STEPS = 10_000


def gates(cell) -> tuple[str, ...]:
    """The gate names of a cell's column blocks, in the kernels' order."""
    for cls, names in _GATES.items():
        if isinstance(cell, cls):
            return names
    raise ValueError(f"Argument `cell` must be a SimpleRNNCell, LSTMCell or GRUCell. "
                     f"Received: cell={cell!r}")


def supported_cell(layer):
    """The cell of an RNN layer this module handles (one plain cell), else None."""
    if isinstance(layer, klayers.RNN) and isinstance(layer.cell, CELLS):
        return layer.cell
    return None


def sides(layer) -> list:
    """The RNN layers of `layer`: itself, or a `Bidirectional`'s forward and backward."""
    if isinstance(layer, klayers.Bidirectional):
        both = [layer.forward_layer, layer.backward_layer]
        if all(supported_cell(side) is not None for side in both):
            return both
    elif supported_cell(layer) is not None:
        return [layer]
    raise ValueError(
        "Argument `layer` must be a SimpleRNN, LSTM or GRU (or `keras.layers.RNN` of one "
        "SimpleRNNCell, LSTMCell or GRUCell), or a Bidirectional of them. "
        f"Received: layer={layer!r}")


def _numpy(variable) -> np.ndarray:
    return ops.convert_to_numpy(variable).astype("float64")


def _blocks(matrix: np.ndarray, count: int) -> list[np.ndarray]:
    return np.split(matrix, count, axis=-1)


def norms(cell) -> tuple[np.ndarray, np.ndarray]:
    """`(a, r)`: each gate block's mean squared column norm in `W` and in `U`."""
    count = len(gates(cell))
    mean_sq = lambda m: np.array([np.mean(np.sum(b * b, axis=0))  # noqa: E731
                                  for b in _blocks(m, count)])
    return mean_sq(_numpy(cell.kernel)), mean_sq(_numpy(cell.recurrent_kernel))


def biases(cell) -> tuple[np.ndarray, np.ndarray]:
    """`(input, recurrent)` biases, each `(gates, units)`; zeros where the cell has none."""
    count, units = len(gates(cell)), cell.units
    zero = np.zeros((count, units))
    if not cell.use_bias or cell.bias is None:
        return zero, zero
    bias = _numpy(cell.bias)
    if bias.ndim == 2:  # GRU with reset_after: (2, 3 units), input then recurrent
        return bias[0].reshape(count, units), bias[1].reshape(count, units)
    return bias.reshape(count, units), zero


def _spec(function, what: str, cell) -> _moments.ActivationSpec:
    spec, reason = _moments.function_spec(function)
    if spec is None:
        raise NotImplementedError(f"{cell.name}'s {what}: {reason}")
    return spec


class _Recursion:
    """One cell's mean-field step, on units grouped by their biases (usually one group).

    The state is a dict of arrays over groups: `h2`, `h` (E[h^2], E[h]) and,
    for an LSTM, `c2`, `c`. `step` returns the next state and, per gate,
    each group's pre-activation mean and variance, and the recurrent part
    `R` of that variance (`v = a p + R`).
    """

    def __init__(self, cell, a=None, r=None, dropout: bool = False):
        self.cell = cell
        self.names = gates(cell)
        self.kind = type(cell)
        for cls in _GATES:
            if isinstance(cell, cls):
                self.kind = cls
        measured = norms(cell)
        self.a = np.asarray(measured[0] if a is None else a, float)
        self.r = np.asarray(measured[1] if r is None else r, float)
        b_in, b_rec = biases(cell)
        rows = np.concatenate([b_in, b_rec]).T  # (units, 2 gates)
        values, counts = np.unique(rows, axis=0, return_counts=True)
        count = len(self.names)
        self.b_in, self.b_rec = values[:, :count].T, values[:, count:].T  # (gates, groups)
        self.w = counts / counts.sum()
        self.act = _spec(cell.activation, "activation", cell)
        self.rec = (None if self.kind is klayers.SimpleRNNCell
                    else _spec(cell.recurrent_activation, "recurrent_activation", cell))
        # Dropout in training mode multiplies kept entries by 1 / (1 - rate).
        self.keep_x = 1.0 - float(cell.dropout) if dropout else 1.0
        self.keep_h = 1.0 - float(cell.recurrent_dropout) if dropout else 1.0
        self.reset_after = bool(getattr(cell, "reset_after", False))

    def initial(self) -> dict:
        zero = np.zeros(len(self.w))
        return {"h2": zero, "h": zero, "c2": zero, "c": zero}

    def power(self, state) -> float:
        return float(np.sum(self.w * state["h2"]))

    def step(self, p: float, state: dict) -> tuple[dict, dict]:
        p = p / self.keep_x
        ph = self.power(state) / self.keep_h
        mean = self.b_in + self.b_rec
        rest = self.r[:, None] * ph * np.ones_like(mean)
        if self.kind is klayers.SimpleRNNCell:
            var = self.a[:, None] * p + rest
            h2, h = _moments.moments(self.act, mean[0], var[0])
            return {**state, "h2": h2, "h": h}, {"mean": mean, "var": var, "rest": rest}
        if self.kind is klayers.LSTMCell:
            var = self.a[:, None] * p + rest
            s2, s1 = _moments.moments(self.rec, mean[[0, 1, 3]], var[[0, 1, 3]])
            g2, g1 = _moments.moments(self.act, mean[2], var[2])
            (i2, f2, o2), (i1, f1, o1) = s2, s1
            c = f1 * state["c"] + i1 * g1
            c2 = f2 * state["c2"] + 2 * f1 * i1 * g1 * state["c"] + i2 * g2
            t2, t1 = _moments.moments(self.act, c, np.maximum(c2 - c * c, 0.0))
            return ({"h2": o2 * t2, "h": o1 * t1, "c2": c2, "c": c},
                    {"mean": mean, "var": var, "rest": rest})
        # GRU: update and reset gates, then the candidate through the reset gate.
        var_zr = self.a[:2, None] * p + rest[:2]
        s2, s1 = _moments.moments(self.rec, mean[:2], var_zr)
        (z2, r2), (z1, r1) = s2, s1
        if self.reset_after:
            mean_h = self.b_in[2] + r1 * self.b_rec[2]
            rest_h = r2 * (self.r[2] * ph + self.b_rec[2] ** 2) - (r1 * self.b_rec[2]) ** 2
        else:
            mean_h = self.b_in[2]
            rest_h = self.r[2] * np.sum(self.w * r2 * state["h2"]) / self.keep_h * np.ones_like(
                mean_h)
        var_h = self.a[2] * p + rest_h
        hh2, hh1 = _moments.moments(self.act, mean_h, var_h)
        h2 = z2 * state["h2"] + 2 * (z1 - z2) * state["h"] * hh1 + (1 - 2 * z1 + z2) * hh2
        h = z1 * state["h"] + (1 - z1) * hh1
        pre = {"mean": np.stack([mean[0], mean[1], mean_h]),
               "var": np.stack([var_zr[0], var_zr[1], var_h]),
               "rest": np.stack([rest[0], rest[1], rest_h])}
        return {**state, "h2": h2, "h": h}, pre

    def summary(self, pre: dict) -> tuple[np.ndarray, np.ndarray]:
        """Per gate: the pre-activation's second moment and its variance over all units."""
        second = np.sum(self.w * (pre["var"] + pre["mean"] ** 2), axis=1)
        first = np.sum(self.w * pre["mean"], axis=1)
        return second, second - first**2

    def stationary(self, p: float) -> tuple[dict, dict]:
        """The fixed point of the state's moments under a constant input second moment."""
        state = self.initial()
        for _ in range(_MAX_STEPS):
            new, pre = self.step(p, state)
            change = max(float(np.max(np.abs(new[k] - state[k]))) for k in state)
            state = new
            if change <= _SETTLED * max(1.0, self.power(state)):
                break
        return state, pre


@dataclasses.dataclass
class Trace:
    """What the recursion predicts for one RNN layer (one direction).

    Attributes:
        gates: The gate names.
        q: `(steps, gates)` pre-activation second moments per processing step.
        var: `(steps, gates)` their variances over every unit.
        h_power, h_mean: `(steps,)` moments of `h_t`.
        c_power, c_mean: `(steps,)` of the LSTM cell state (NaN otherwise).
    """

    gates: tuple
    q: np.ndarray
    var: np.ndarray
    h_power: np.ndarray
    h_mean: np.ndarray
    c_power: np.ndarray
    c_mean: np.ndarray


def predict(rnn, power, *, a=None, r=None, training: bool = False) -> Trace:
    """The mean-field recursion of an RNN layer over its input's time steps.

    Args:
        rnn: A SimpleRNN, LSTM or GRU layer (or `keras.layers.RNN` of one such
            cell), built.
        power: The input's per-entry second moment at each time step, in
            the input's order (the layer's `go_backwards` is applied here).
        a, r: Per gate block, the mean squared column norms of the input and
            recurrent kernels; by default the layer's own.
        training: Follow dropout as in training mode.

    Returns:
        A `Trace`, indexed by processing step.
    """
    cell = supported_cell(rnn)
    if cell is None:
        sides(rnn)  # raises the ValueError naming the argument
    power = np.atleast_1d(np.asarray(power, float))
    if power.ndim != 1 or not np.all(np.isfinite(power)) or np.any(power < 0):
        raise ValueError("Argument `power` must be non-negative finite second moments, one "
                         f"per time step. Received: power={power!r}")
    if rnn.go_backwards:
        power = power[::-1]
    recursion = _Recursion(cell, a, r, dropout=training)
    state = recursion.initial()
    rows = []
    for p in power:
        state, pre = recursion.step(float(p), state)
        q, var = recursion.summary(pre)
        w = recursion.w
        rows.append((q, var, np.sum(w * state["h2"]), np.sum(w * state["h"]),
                     np.sum(w * state["c2"]), np.sum(w * state["c"])))
    q, var, h2, h1, c2, c1 = (np.array(column) for column in zip(*rows))
    lstm = recursion.kind is klayers.LSTMCell
    nan = np.full(len(power), math.nan)
    return Trace(recursion.names, q, var, h2, h1, c2 if lstm else nan, c1 if lstm else nan)


def _input_power(signal: rules.Signal, steps: int | None) -> np.ndarray | None:
    """The input's second moment per time step; None when the number of steps is unknown."""
    power = np.asarray(signal.power, float)
    if steps is None:
        return None
    if power.ndim >= 1 and power.shape[0] == steps:
        return power.reshape(steps, -1).mean(axis=1)
    return np.full(steps, float(np.mean(power)))


def _side_signals(rnn, signal, steps, training, note, norms=None) -> list[rules.Signal]:
    """Output (and state) signals of one RNN layer, in Keras' output order.

    `norms`: `(a, r)` per gate to use instead of the layer's own (a plan's).
    """
    a, r = (None, None) if norms is None else norms
    power = _input_power(signal, steps)
    lstm = isinstance(rnn.cell, klayers.LSTMCell)
    if power is None:
        # Unknown length: the state's moments at the fixed point stand for every step.
        note("the number of time steps is unknown: the stationary state is used")
        recursion = _Recursion(rnn.cell, a, r, dropout=training)
        state, _ = recursion.stationary(signal.q)
        w = recursion.w
        h = rules.Signal(np.asarray(float(np.sum(w * state["h2"]))),
                         np.asarray(float(np.sum(w * state["h"]))))
        c = rules.Signal(np.asarray(float(np.sum(w * state["c2"]))),
                         np.asarray(float(np.sum(w * state["c"]))))
        return [h, h, *([c] if lstm else [])] if rnn.return_state else [h]
    trace = predict(rnn, power, a=a, r=r, training=training)
    if rnn.return_sequences:
        out = rules.Signal(trace.h_power.copy(), trace.h_mean.copy())
    else:
        out = rules.Signal(np.asarray(trace.h_power[-1]), np.asarray(trace.h_mean[-1]))
    if not rnn.return_state:
        return [out]
    states = [rules.Signal(np.asarray(trace.h_power[-1]), np.asarray(trace.h_mean[-1]))]
    if lstm:
        states.append(rules.Signal(np.asarray(trace.c_power[-1]), np.asarray(trace.c_mean[-1])))
    return [out, *states]


def _merge(mode: str, forward: rules.Signal, backward: rules.Signal, units: tuple[int, int]):
    """A Bidirectional's merged output, the backward sequence already in input order."""
    pf, mf, pb, mb = forward.power, forward.mean, backward.power, backward.mean
    if mode == "concat":  # the per-entry average over both halves
        wf, wb = units[0] / sum(units), units[1] / sum(units)
        return rules.Signal(wf * pf + wb * pb, wf * mf + wb * mb)
    if mode in ("sum", "ave"):
        factor = 1.0 if mode == "sum" else 0.25
        return rules.Signal(factor * (pf + pb + 2 * mf * mb),
                            math.sqrt(factor) * (mf + mb))
    return rules.Signal(pf * pb, mf * mb)  # mul, the two directions independent


class RecurrentRule(rules.LayerRule):
    """SimpleRNN, LSTM, GRU (one plain cell) and their `Bidirectional`: the recursion over time.

    The output's moments per time step (`return_sequences=True`) or at the
    last step, and the final states' (`return_state=True`), from the
    mean-field recursion of the module docstring. An initial state given as
    an argument, a stateful layer or an unknown input gives unknown signals.
    """

    family = "recurrent"

    def propagate(self, ctx: rules.Context, ins: list[rules.Signal]) -> list[rules.Signal]:
        return _propagate(ctx, ins)


def planned_outputs(ctx: rules.Context, ins: list[rules.Signal], plan: dict) -> list[rules.Signal]:
    """`RecurrentRule.propagate` with the kernels `plan` will write (before `write` runs)."""
    norms = [(np.square(side["input_gain"]), np.square(side["recurrent_gain"]))
             for side in plan["sides"]]
    return _propagate(ctx, ins, norms)


def _propagate(ctx, ins, norms=None) -> list[rules.Signal]:
    layer = ctx.layer
    count = len(ctx.out_shapes)
    try:
        rnns = sides(layer)
    except ValueError:
        raise NotImplementedError(f"{layer.name}: no plain SimpleRNN/LSTM/GRU cell") from None
    why = ""
    if ins[0].unknown:
        why = ins[0].unknown
    elif len(ins) > 1:
        why = f"{layer.name}: an initial state is given; its moments are not followed"
    elif any(rnn.stateful for rnn in rnns):
        why = f"{layer.name}: stateful, its initial state is the last batch's"
    elif isinstance(layer, klayers.Bidirectional) and layer.merge_mode is None:
        why = f"{layer.name}: merge_mode=None is not followed"
    if why:
        return [rules.Signal.unknown_after(why, ctx.out_map(i)) for i in range(count)]
    steps = ctx.in_shapes[0][1] if len(ctx.in_shapes[0]) == 3 else None
    steps = steps if isinstance(steps, int) else None
    notes = []
    norms = norms or [None] * len(rnns)
    outs = [_side_signals(rnn, ins[0], steps, ctx.training, notes.append, side)
            for rnn, side in zip(rnns, norms)]
    for text in dict.fromkeys(notes):
        ctx.notes.append(text)
    if len(outs) == 1:
        signals = outs[0]
    else:
        forward, backward = outs
        first_b = backward[0]
        if rnns[1].return_sequences and np.ndim(first_b.power):  # back to input order
            first_b = rules.Signal(first_b.power[::-1], first_b.mean[::-1])
        merged = _merge(layer.merge_mode, forward[0], first_b,
                        (rnns[0].cell.units, rnns[1].cell.units))
        signals = [merged, *forward[1:], *backward[1:]]
    return [rules.fit(s, ctx.out_map(i)) for i, s in enumerate(signals[:count])]


# --- data-free plan --------------------------------------------------------------------------

def _check_target(target_var) -> float:
    if isinstance(target_var, bool) or not isinstance(target_var, (int, float, np.number)) or (
            not math.isfinite(target_var) or target_var <= 0):
        raise ValueError("Argument `target_var` must be a positive finite number. "
                         f"Received: target_var={target_var!r}")
    return float(target_var)


def _plan_side(rnn, p: float, power: np.ndarray | None, target: float) -> dict:
    """One direction's plan: input gains per gate for variance `target` at the fixed point."""
    cell = supported_cell(rnn)
    names = gates(cell)
    count = len(names)
    r = np.ones(count)  # orthogonal blocks: unit columns
    a = np.full(count, target / p)
    status, reason = "ok", ""
    # The gates' variance is the target at the fixed point whatever `a` was; so is the state:
    # one update of `a` from the state reached lands on it, a few more settle the rounding.
    for _ in range(20):
        recursion = _Recursion(cell, a, r)
        state, pre = recursion.stationary(p)
        rest = np.sum(recursion.w * pre["rest"], axis=1)
        new = (target - rest) / p
        if np.any(new <= 0):
            status = "unreachable"
            short = ", ".join(n for n, x in zip(names, new) if x <= 0)
            reason = (f"the recurrent part alone gives gates {short} a variance of at least "
                      f"target_var={target:g} at the fixed point")
            new = np.maximum(new, 0.0)
            a = new
            break
        settled = np.max(np.abs(new - a) / new) < 1e-9
        a = new
        if settled:
            break
    recursion = _Recursion(cell, a, r)
    state, pre = recursion.stationary(p)
    q, var = recursion.summary(pre)
    w = recursion.w
    side = {"name": rnn.name, "class_name": type(rnn).__name__, "gates": names,
            "input_gain": tuple(float(math.sqrt(x)) for x in a),
            "recurrent_gain": tuple(1.0 for _ in names),
            "input_power": p, "status": status, "reason": reason,
            "stationary": {"q": dict(zip(names, q.tolist())),
                           "var": dict(zip(names, var.tolist())),
                           "h_power": float(np.sum(w * state["h2"])),
                           "h_mean": float(np.sum(w * state["h"]))}}
    if power is not None:  # from the zero state, on the input's own moment per step
        side["per_step"] = predict(rnn, power, a=a, r=r)
    return side


def plan(layer, signal: rules.Signal, target_var: float = 1.0) -> dict:
    """The data-free init of a recurrent layer: orthogonal `U`, input gains per gate.

    Each gate block of the recurrent kernel is an orthogonal matrix (gain 1);
    each block of the input kernel gets orthogonal directions with the
    column norm that puts the gate's pre-activation variance (around its
    bias) at `target_var` at the stationary state of the recursion, for an
    input of per-entry second moment `signal.q`. `write` draws it.

    Examples:

    >>> import keras
    >>> layer = keras.layers.LSTM(8)
    >>> layer.build((None, 5, 4))
    >>> p = plan(layer, rules.Signal(np.ones(5), np.zeros(5)))
    >>> p["sides"][0]["gates"]
    ('i', 'f', 'c', 'o')

    Args:
        layer: A built SimpleRNN, LSTM or GRU, or a `Bidirectional` of them.
        signal: The input's moments (`rules.Signal`), per time step or not.
        target_var: The gates' pre-activation variance at the fixed point.

    Returns:
        A dict: `"layer"` (its name), `"sides"` (one dict per direction:
        `gates`, `input_gain` and `recurrent_gain` per gate, `status`
        `"ok"` or `"unreachable"`, `reason`, the `stationary` figures: each
        gate's pre-activation `q` and `var`, `h_power`, `h_mean`; and
        `per_step`, a `Trace` from the zero state, when the number of steps
        is known) and `"outputs"` (the output signals, as `RecurrentRule`).
    """
    rnns = sides(layer)
    if any(not rnn.built for rnn in rnns):
        raise ValueError(f"Argument `layer` must be built. Received: layer={layer.name!r}")
    if not isinstance(signal, rules.Signal) or signal.unknown or not signal.q > 0 or (
            not math.isfinite(signal.q)):
        why = getattr(signal, "unknown", "") or "its second moment is not positive and finite"
        raise ValueError("Argument `signal` must be a known rules.Signal of positive second "
                         f"moment. Received: signal={signal!r} ({why})")
    target = _check_target(target_var)
    power = np.asarray(signal.power, float)
    steps = power.shape[0] if power.ndim >= 1 and power.shape[0] > 1 else None
    power = _input_power(signal, steps)
    side_plans = [_plan_side(rnn, signal.q, power, target) for rnn in rnns]
    outputs = []
    for side, rnn in zip(side_plans, rnns):
        if "per_step" in side:
            trace = side["per_step"]
            out = (rules.Signal(trace.h_power, trace.h_mean) if rnn.return_sequences else
                   rules.Signal(np.asarray(trace.h_power[-1]), np.asarray(trace.h_mean[-1])))
        else:
            out = rules.Signal(np.asarray(side["stationary"]["h_power"]),
                               np.asarray(side["stationary"]["h_mean"]))
        outputs.append(out)
    if len(outputs) == 2:
        backward = outputs[1]
        if np.ndim(backward.power):
            backward = rules.Signal(backward.power[::-1], backward.mean[::-1])
        outputs = [_merge(layer.merge_mode or "concat", outputs[0], backward,
                          (rnns[0].cell.units, rnns[1].cell.units))]
    return {"layer": layer.name, "target_var": target, "sides": side_plans, "outputs": outputs}


def _draw(cell, count: int, seed: int | None) -> tuple[list, list]:
    """Unit-norm orthogonal directions: `count` blocks of `W` and of `U` (orthogonal)."""
    fan_in, units = cell.kernel.shape[0], cell.units
    seeds = (None, None) if seed is None else (seed, seed + 1)
    w = GoodInit("wn_relu_backward", gamma=1.0, seed=seeds[0]).draw(
        (fan_in, units), "float32", count=count)
    u = GoodInit("wn_relu_backward", gamma=1.0, seed=seeds[1]).draw(
        (units, units), "float32", count=count)
    w, u = ops.convert_to_numpy(w).astype(float), ops.convert_to_numpy(u).astype(float)
    # Exactly orthogonal U blocks: unit-norm columns of orthogonal directions are one.
    return list(w), list(u)


def _assign(variable, blocks) -> None:
    value = np.concatenate(blocks, axis=-1)
    variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))


def write(layer, plan: dict, seed: int | None = None) -> None:
    """Draws `plan` into `layer`'s kernels: orthogonal `U` blocks, `W` blocks at the gains.

    Biases are left as they are (the plan counted them). If anything raises,
    every weight is left as it was.

    Args:
        layer: The layer `plan` was made for.
        plan: What `plan(layer, ...)` returned.
        seed: Makes the directions reproducible; `None` draws from Keras'
            global seed generator.
    """
    rnns = sides(layer)
    if not isinstance(plan, dict) or len(plan.get("sides", ())) != len(rnns) or any(
            side.get("gates") != gates(rnn.cell) for side, rnn in zip(plan["sides"], rnns)):
        raise ValueError(f"Argument `plan` must be `plan(layer, ...)` of this layer "
                         f"({layer.name!r}). Received: plan={plan!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"Argument `seed` must be a non-negative int or None. Received: "
                         f"seed={seed!r}")
    variables = [v for rnn in rnns for v in (rnn.cell.kernel, rnn.cell.recurrent_kernel)]
    with _sweep.atomic(variables):
        for index, (side, rnn) in enumerate(zip(plan["sides"], rnns)):
            count = len(side["gates"])
            w, u = _draw(rnn.cell, count, None if seed is None else seed + 2 * index)
            _assign(rnn.cell.kernel, [g * b for g, b in zip(side["input_gain"], w)])
            _assign(rnn.cell.recurrent_kernel, [g * b for g, b in zip(side["recurrent_gain"], u)])


def variables(layer) -> list:
    """The kernels `write` assigns: each direction's input and recurrent kernel."""
    return [v for rnn in sides(layer) for v in (rnn.cell.kernel, rnn.cell.recurrent_kernel)]


def measure(model, x, layer, plan: dict) -> list[dict]:
    """Per direction of a written plan: its gates measured on `x`, against the plan.

    Each gate's pre-activation variance over the batch's unmasked steps of
    the layer's input (as `model` computes it on `x`), and the plan's
    prediction over the same steps: its per-step trace from the zero state,
    weighted by how many samples each step has unmasked. `tolerance` is 5
    sampling standard deviations of a second moment over one step's
    `batch * units` entries, `sqrt(2 / n)` each (steps of one sample are
    correlated, so they are not counted as independent), plus `MODEL_ERROR`.

    Returns:
        One dict per direction: `measured` and `predicted` (gate -> variance)
        and `tolerance` (relative); empty dicts where the layer is not called
        on `x` or the plan has no per-step trace.
    """
    found = []
    for rnn, side in zip(sides(layer), plan["sides"]):
        seen = layer_input(model, x, rnn)
        trace = side.get("per_step")
        if seen is None or trace is None or seen["initial_state"] is not None:
            found.append({"measured": {}, "predicted": {}, "tolerance": math.nan})
            continue
        h_prev = unroll(rnn, seen["x"], seen["mask"])
        valid = _valid(seen["mask"], h_prev.shape)
        counts = valid.sum(axis=0).astype(float)
        if rnn.go_backwards:
            counts = counts[::-1]  # the trace is in processing order
        counts = counts[:len(trace.var)]
        parts = preactivations(rnn.cell, seen["x"], h_prev)
        measured = {g: float(np.var(a[valid] + rest[valid])) for g, (a, rest) in parts.items()}
        weights = counts / counts.sum()
        predicted = dict(zip(trace.gates, (weights @ trace.var).tolist()))
        tolerance = 5 * math.sqrt(2 / (h_prev.shape[0] * rnn.cell.units)) + MODEL_ERROR
        found.append({"measured": measured, "predicted": predicted, "tolerance": tolerance})
    return found


def plan_rows(layer, plan: dict, measured: list[dict] | None = None) -> list[dict]:
    """The fields of one `mean_field.MeanFieldRecord` per direction of a planned layer.

    `gamma` is the mean over gates of the input kernel's squared column norm
    (`g^2`, each gate's in `reason`); `predicted` and `measured` are the gate
    farthest from the plan's target (variances around each unit's bias);
    status `"missed"` where a measurement departs from its prediction by more
    than `tolerance`.
    """
    rows = []
    measured = measured or [None] * len(plan["sides"])
    labelled = isinstance(layer, klayers.Bidirectional)
    target = plan["target_var"]
    for side, found in zip(plan["sides"], measured):
        name = f"{layer.name}/{side['name']}" if labelled else layer.name
        class_name = (f"Bidirectional({side['class_name']})" if labelled
                      else side["class_name"])
        gains = "/".join(f"{g:.3g}" for g in side["input_gain"])
        stationary = ", ".join(f"{g} q {side['stationary']['q'][g]:.3g}"
                               for g in side["gates"])
        reason = (f"recurrent: U orthogonal per gate block; input gains {gains} "
                  f"(gates {', '.join(side['gates'])}) for gate variance {target:g} at the "
                  f"stationary state (input second moment {side['input_power']:.3g}; {stationary};"
                  f" h second moment {side['stationary']['h_power']:.3g})")
        status = "ok" if side["status"] == "ok" else "unanalysed"
        if side["reason"]:
            reason = f"{side['reason']}; {reason}"
        row = dict(name=name, class_name=class_name, var_before=math.nan, var_after=math.nan,
                   iterations=0, scale=1.0, status=status, reason=reason, target_var=target,
                   gamma=float(np.mean(np.square(side["input_gain"]))), rule="recurrent",
                   predicted=target, measured=math.nan, tolerance=math.nan)
        if found and found["measured"]:
            gaps = {g: found["measured"][g] / found["predicted"][g] - 1
                    for g in found["measured"]}
            worst = max(gaps, key=lambda g: abs(gaps[g]))
            row.update(var_after=found["measured"][worst], measured=found["measured"][worst],
                       predicted=found["predicted"][worst], tolerance=found["tolerance"])
            if abs(gaps[worst]) > found["tolerance"] and status == "ok":
                row["status"] = "missed"
                row["reason"] += (f"; gate {worst} measured {found['measured'][worst]:.3g}, "
                                  f"predicted {found['predicted'][worst]:.3g} over the "
                                  "batch's unmasked steps")
        rows.append(row)
    return rows


# --- LSUV ------------------------------------------------------------------------------------

def unroll(rnn, x, mask=None, initial_state=None) -> np.ndarray:
    """`h_{t-1}` at every step of the layer's own recursion on `x`, in input order.

    The cell itself makes each step (inference mode); a masked step keeps the
    previous states, as Keras' RNN does.
    """
    cell = rnn.cell
    x = ops.convert_to_tensor(x, cell.compute_dtype)
    batch, steps = int(x.shape[0]), int(x.shape[1])
    if initial_state is None:
        states = cell.get_initial_state(batch_size=batch)
    else:
        states = list(initial_state) if isinstance(initial_state, (list, tuple)) else [
            initial_state]
    states = [ops.cast(s, cell.compute_dtype) for s in keras.tree.flatten(states)]
    mask = None if mask is None else ops.convert_to_tensor(mask, "bool")
    previous = [None] * steps
    order = range(steps - 1, -1, -1) if rnn.go_backwards else range(steps)
    for t in order:
        previous[t] = ops.convert_to_numpy(states[0]).astype(float)
        _, new = cell.call(x[:, t], states, training=False)
        new = keras.tree.flatten(new)
        if mask is not None:
            keep = mask[:, t][:, None]
            new = [ops.where(keep, n, s) for n, s in zip(new, states)]
        states = list(new)
    return np.stack(previous, axis=1)


def preactivations(cell, x, h_prev) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per gate, `(x W_g, rest)`: the input part and the rest, `z = x W_g + rest`.

    Float64, from the cell's weights: `rest` is `h U_g + b_g` (and the GRU
    candidate's reset gate). Scaling `W_g` by c gives `z = c x W_g + rest`.
    """
    names = gates(cell)
    count = len(names)
    x = np.asarray(ops.convert_to_numpy(x), float)
    xw = _blocks(x @ _numpy(cell.kernel), count)
    hu = _blocks(h_prev @ _numpy(cell.recurrent_kernel), count)
    b_in, b_rec = biases(cell)
    parts = {name: (xw[g], hu[g] + b_in[g] + b_rec[g]) for g, name in enumerate(names)}
    if isinstance(cell, klayers.GRUCell):
        pre_r = xw[1] + parts["r"][1]
        r = ops.convert_to_numpy(cell.recurrent_activation(
            ops.convert_to_tensor(pre_r, "float32"))).astype(float)
        if cell.reset_after:
            rest = b_in[2] + r * (hu[2] + b_rec[2])
        else:
            u_h = _blocks(_numpy(cell.recurrent_kernel), count)[2]
            rest = (r * h_prev) @ u_h + b_in[2]
        parts["h"] = (xw[2], rest)
    return parts


def _variances(parts, valid) -> dict[str, tuple[float, float, float]]:
    """Per gate: Var(x W), 2 Cov(x W, rest), Var(rest) over every unmasked entry."""
    found = {}
    for name, (a, rest) in parts.items():
        a, rest = a[valid], rest[valid]
        da, dr = a - a.mean(), rest - rest.mean()
        found[name] = (float(np.mean(da * da)), float(2 * np.mean(da * dr)),
                       float(np.mean(dr * dr)))
    return found


def _valid(mask, shape) -> np.ndarray:
    if mask is None:
        return np.ones(shape[:2], bool)
    return np.asarray(ops.convert_to_numpy(mask), bool).reshape(shape[:2])


def gate_variances(rnn, x, mask=None, initial_state=None) -> dict[str, float]:
    """Each gate's pre-activation variance over every unmasked step and unit, measured."""
    h_prev = unroll(rnn, x, mask, initial_state)
    valid = _valid(mask, h_prev.shape)
    return {name: float(np.var(a[valid] + rest[valid]))
            for name, (a, rest) in preactivations(rnn.cell, x, h_prev).items()}


def orthogonalize(rnn, seed: int | None = None) -> None:
    """LSUV's pre-init: orthogonal `U` blocks, unit-norm orthogonal `W` directions."""
    count = len(gates(rnn.cell))
    w, u = _draw(rnn.cell, count, seed)
    _assign(rnn.cell.kernel, w)
    _assign(rnn.cell.recurrent_kernel, u)


def lsuv_fit(rnn, x, mask=None, initial_state=None, *, target_var: float = 1.0,
             tol: float = 0.1, max_iter: int = 10, name: str | None = None,
             class_name: str | None = None) -> LayerRecord:
    """LSUV on one RNN layer: scales each gate block of `W` to pre-activation variance `target_var`.

    Each trial unrolls the layer on `x` (its input, `(batch, steps, features)`),
    measures every gate's pre-activation `z_t = x_t W + h_{t-1} U + b` over
    the unmasked steps and units, and solves `Var(c x W_g + rest) = target`
    for each gate's scale c with the states held (a quadratic in c, as
    `lsuv._solve_quadratic`); the states then move with the new kernel, so it
    measures again, until every gate is within `tol * target_var` or
    `max_iter` trials. The row's `var_before`/`var_after` are the gate
    farthest from the target; `reason` lists every gate.
    """
    from keras_goodinit import lsuv  # noqa: PLC0415  (lsuv imports this module)

    cell = rnn.cell
    names = gates(cell)
    name = name or rnn.name
    class_name = class_name or type(rnn).__name__
    floor = lsuv._relative_floor(cell.compute_dtype)
    scales = np.ones(len(names))
    before = None
    iterations = 0
    valid = None
    original = _numpy(cell.kernel)  # a layer it skips keeps the kernel it came with
    while True:
        h_prev = unroll(rnn, x, mask, initial_state)
        valid = _valid(mask, h_prev.shape) if valid is None else valid
        parts = preactivations(cell, x, h_prev)
        coefficients = _variances(parts, valid)
        current = {g: sum(c) for g, c in coefficients.items()}
        if before is None:
            before = current
        values = np.array(list(current.values()))
        if not np.all(np.isfinite(values)):
            cell.kernel.assign(original)
            return _row(name, class_name, before, current, iterations, np.ones(len(names)),
                        "skipped", "non-finite gate variance", target_var, valid)
        dead = [g for g, (a, _, _) in coefficients.items()
                if not a > floor * max(float(np.mean(np.square(parts[g][0][valid]))), 1e-300)]
        if dead:
            cell.kernel.assign(original)
            return _row(name, class_name, before, current, iterations, np.ones(len(names)),
                        "skipped",
                        f"the input part of gates {', '.join(dead)} is zero (dead or constant "
                        "input)", target_var, valid)
        if np.all(np.abs(values - target_var) < tol * target_var):
            return _row(name, class_name, before, current, iterations, scales, "ok", "",
                        target_var, valid)
        if iterations >= max_iter:
            return _row(name, class_name, before, current, iterations, scales, "max_iter",
                        "reached max_iter", target_var, valid)
        blocks = _blocks(_numpy(cell.kernel), len(names))
        unreachable = []
        for g, gate in enumerate(names):
            state = lsuv._solve_quadratic(
                tuple(ops.convert_to_tensor(c, "float64") for c in coefficients[gate]),
                target_var=target_var, tol=tol, dead=ops.convert_to_tensor(False))
            scale = float(state["scale"])
            if int(state["code"]) == lsuv._UNREACHABLE:
                unreachable.append(gate)
            blocks[g] = blocks[g] * scale
            scales[g] *= scale
        _assign(cell.kernel, blocks)
        iterations += 1
        if unreachable and iterations >= 1 and all(
                coefficients[g][2] >= target_var * (1 + tol) for g in unreachable):
            current = gate_variances(rnn, x, mask, initial_state)
            return _row(name, class_name, before, current, iterations, scales, "max_iter",
                        f"no input-kernel scale reaches target_var for gates "
                        f"{', '.join(unreachable)}: the recurrent part and bias alone give "
                        "more variance; took one LSUV step", target_var, valid)


def _row(name, class_name, before, after, iterations, scales, status, reason, target,
         valid) -> LayerRecord:
    def worst(values):
        return max(values.values(), key=lambda v: abs(v - target) if math.isfinite(v) else
                   math.inf)

    listing = ", ".join(f"{g} {before[g]:.3g} -> {after[g]:.3g}" for g in before)
    steps = int(valid.sum())
    note = (f"gate pre-activation variances over {steps} unmasked (sample, step) pairs: "
            f"{listing}; input-kernel scales "
            + "/".join(f"{s:.3g}" for s in scales))
    if status == "skipped":
        note = reason + "; " + note
    elif reason:
        note = reason + "; " + note
    return LayerRecord(name, class_name, worst(before), worst(after), iterations,
                       float(np.exp(np.mean(np.log(np.maximum(scales, 1e-300))))), status,
                       note, target_var=target)


def model_layers(model) -> list[tuple]:
    """`(rnn, row name, row class)` for every plain RNN under `model` (each side of a
    Bidirectional), leaving out those inside a `WeightNormalization` wrapper."""
    from keras_goodinit.weight_norm import WeightNormalization  # noqa: PLC0415

    wrapped = set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, WeightNormalization):
            wrapped.update(id(inner) for inner in layer._flatten_layers(
                include_self=False, recursive=True))
    found, seen = [], set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if id(layer) in wrapped or id(layer) in seen:
            continue
        if isinstance(layer, klayers.Bidirectional):
            try:
                both = sides(layer)
            except ValueError:
                continue
            for rnn in both:
                seen.add(id(rnn))
                found.append((rnn, f"{layer.name}/{rnn.name}",
                              f"Bidirectional({type(rnn).__name__})"))
        elif supported_cell(layer) is not None:
            seen.add(id(layer))
            found.append((layer, layer.name, type(layer).__name__))
    return found


class _Collected(Exception):
    """Stops a forward pass once the layer looked for has its input."""


def call_order(model, x, layers) -> list:
    """`layers` in the order of their first call in a forward pass of `model` on `x`."""
    order = []

    def wrap(layer):
        def wrapper(call):
            def recording(*args, **kwargs):
                if all(seen is not layer for seen in order):
                    order.append(layer)
                return call(*args, **kwargs)
            return recording
        return wrapper

    with _sweep.preserving(model), _sweep.wrapped_calls([(layer, wrap(layer)) for layer in layers]):
        model(x, training=False)
    return order


def layer_input(model, x, rnn) -> dict | None:
    """The input, mask and initial state of `rnn`'s first call in a forward pass on `x`.

    The pass stops there; None if `rnn` is not called.
    """
    seen = {}

    def wrapper(call):
        def recording(sequences, initial_state=None, mask=None, *args, **kwargs):
            if mask is None:
                mask = _sweep._input_mask(sequences)
            seen.update(x=sequences, mask=mask, initial_state=initial_state)
            raise _Collected
        return recording

    with _sweep.preserving(model), _sweep.wrapped_calls([(rnn, wrapper)]):
        try:
            model(x, training=False)
        except _Collected:
            pass
    return seen or None


def register() -> None:
    """Registers `RecurrentRule` for Keras' recurrent layers (from the package's `__init__`:
    this module imports the sweep, which imports `rules`, so `rules` cannot import it).
    `RNN` itself too: ConvLSTM and custom cells are then one step, unanalysed, not traced."""
    rule = RecurrentRule()
    for cls in (keras.layers.SimpleRNN, keras.layers.LSTM, keras.layers.GRU, keras.layers.RNN,
                keras.layers.Bidirectional):
        rules.register_layer_rule(cls, rule)
