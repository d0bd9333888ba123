"""Embedding tables rescaled for the stream they start: one place for `mean_field_init` and LSUV.

A transformer's residual stream starts as the sum of its tables' lookups
(token, position, segment). Keras and KerasHub draw them small (uniform
+-0.05, or std 0.02: second moment 1e-3 to 4e-4), so the first kernels that
read the stream need gains of 30 or more to reach unit variance, and a tied
output projection gives logits of variance near 0.01. `plan` rescales each
table so that the stream starts at second moment 1, shared among the tables
summed into it; a table tied to the output logits (`tie_weights=True`,
KerasHub's `ReversibleEmbedding`) aims at `head / d` instead, so that after
a final normalization of unit variance the tied logits have second moment
`head`. A lookup's second moment is its table's (token frequencies aside), so
the same plan serves with or without data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_goodinit import _graph, rules
from keras_goodinit.rules import Signal


@dataclasses.dataclass
class Table:
    """One table's rescale: the variable, its factor, and the row a report shows."""

    name: str  # the step's path name
    class_name: str
    layer: Any
    variable: Any
    scale: float  # the factor the table is multiplied by
    target: float  # the second moment its output aims at
    status: str  # "ok", or "skipped" for a zero table
    reason: str
    signal: Signal  # its output's moments before the rescale


def is_reverse(step) -> bool:
    """A `ReversibleEmbedding` called with `reverse=True`: the output projection to logits."""
    return isinstance(step.rule, rules.EmbeddingRule) and bool(step.kwargs.get("reverse") or (
        len(step.args) > 1 and step.args[1] is True))


def is_table(step) -> bool:
    """An embedding lookup, or a layer whose output is made from its input's shape alone."""
    return (isinstance(step.rule, rules.EmbeddingRule) and not is_reverse(step)) or (
        not step.inputs and step.rule is None and isinstance(step.layer, keras.layers.Layer))


def reverse_output(step, hidden: Signal, tables: dict) -> Signal:
    """The logits `h W` of a reverse call: `E[logit^2] = d q_h E[W^2]` (W zero-mean,
    independent of h), W the tied table or the untied `reverse_embeddings`, rescaled."""
    layer = step.layer
    tied = bool(getattr(layer, "tie_weights", False))
    variable = layer.embeddings if tied else layer.reverse_embeddings
    table = tables.get((id(layer), "reverse")) or (tables.get(id(layer)) if tied else None)
    factor = 1.0 if table is None else table.scale
    weights = np.asarray(ops.convert_to_numpy(variable), float) * factor
    width = int(layer.embeddings.shape[-1])
    out = np.full(np.shape(hidden.power), width * hidden.q * float(np.mean(weights**2)))
    if hidden.unknown:
        return hidden
    return Signal(out, np.zeros(np.shape(hidden.power)))


def signal_of(graph, step, ctx) -> tuple[Signal | None, Any, str]:
    """(its output's moments, the one variable that scales it or None, why not known)."""
    if isinstance(step.rule, rules.EmbeddingRule):
        return step.rule.propagate(ctx, [])[0], step.layer.embeddings, ""
    # Made from the input's shape alone (a position embedding): computed.
    shape = tuple(1 if i == 0 else graph.length if d is None else d
                  for i, d in enumerate(graph.shapes[step.outputs[0]]))
    try:
        value = np.asarray(ops.convert_to_numpy(step.layer(np.zeros(shape, "float32"))), float)
    except Exception:  # noqa: BLE001 - whatever it needs, it cannot be computed alone
        value = None
    if value is None or value.ndim < 2 or value.shape[-1] != shape[-1]:
        return None, None, step.opaque or (
            "its output cannot be computed from its input's shape alone")
    axes = (0, value.ndim - 1)
    signal = Signal(np.mean(value**2, axis=axes), np.mean(value, axis=axes),
                    cross=rules.measured_cross(value) if value.ndim >= 3 else None)
    variables = [v for v in step.layer.trainable_variables
                 if keras.backend.is_float_dtype(v.dtype)]
    return signal, variables[0] if len(variables) == 1 else None, ""


def _summed(graph, step) -> list:
    """The table steps the sum after `step` adds, `step` included; `[step]` where no sum
    follows."""
    found = _graph.follower(graph, step.outputs[0])
    if found.kind != "add":
        return [step]
    tables = []
    for key in found.step.inputs:
        producer = graph.producer.get(key)
        while producer is not None and producer.rule is not None and (
                producer.rule.look_through) and len(producer.inputs) == 1:
            producer = graph.producer.get(producer.inputs[0])
        if producer is not None and is_table(producer):
            tables.append(producer)
    return tables or [step]


def _tied(step) -> bool:
    return bool(getattr(step.layer, "tie_weights", False))


def plan(graph, head: float | str = 1.0) -> dict[int, Table]:
    """`id(layer)` -> its `Table`, for every table of the graph that one variable makes."""
    tables: dict = {}
    for step in graph.steps:
        if is_reverse(step) and not getattr(step.layer, "tie_weights", False) and (
                (id(step.layer), "reverse") not in tables):
            tables[(id(step.layer), "reverse")] = _output_table(step, head)
            continue
        if not is_table(step) or id(step.layer) in tables:
            continue
        signal, variable, _ = signal_of(graph, step, _graph.context(graph, step))
        if signal is None or variable is None:
            continue
        width = int(variable.shape[-1])
        aim = 1.0 if head == "paper" else float(head)
        if _tied(step):
            target = aim / width
            why = (f"tied to the output logits: E[e^2] = {aim:g} / {width}, so that the "
                   f"logits after a unit-variance normalization have second moment {aim:g}")
        else:
            # The stream starts at 1: what tied tables summed with this one leave, shared.
            summed = _summed(graph, step)
            tied = sum(aim / int(t.layer.embeddings.shape[-1]) for t in summed
                       if _tied(t) and hasattr(t.layer, "embeddings"))
            untied = sum(not _tied(t) for t in summed)
            target = max(1.0 - tied, 0.5) / max(untied, 1)
            why = ("the stream starts at second moment 1" + (
                f", shared among the {len(summed)} tables summed into it"
                if len(summed) > 1 else ""))
        if signal.q > 0:
            scale, status = math.sqrt(target / signal.q), "ok"
        else:
            scale, status, why, target = 1.0, "skipped", "its table is zero: left as it is", 0.0
        tables[id(step.layer)] = Table(step.name, type(step.layer).__name__, step.layer,
                                       variable, scale, target, status, why, signal)
    return tables


def _output_table(step, head) -> Table:
    """An untied output projection (`reverse_embeddings`) aimed like a tied table: after a
    final normalization of unit variance the logits have second moment `head`."""
    variable = step.layer.reverse_embeddings
    width = int(variable.shape[0])
    aim = 1.0 if head == "paper" else float(head)
    target = aim / width
    value = np.asarray(ops.convert_to_numpy(variable), float)
    power = float(np.mean(value**2))
    signal = Signal(np.asarray(power), np.asarray(float(np.mean(value))))
    if power > 0:
        return Table(f"{step.name}/reverse_embeddings", type(step.layer).__name__, step.layer,
                     variable, math.sqrt(target / power), target, "ok",
                     f"the output projection: E[w^2] = {aim:g} / {width}, so that the logits "
                     f"after a unit-variance normalization have second moment {aim:g}", signal)
    return Table(f"{step.name}/reverse_embeddings", type(step.layer).__name__, step.layer,
                 variable, 1.0, 0.0, "skipped", "its table is zero: left as it is", signal)


def write(tables: dict) -> None:
    """Rescales each planned table (inside the caller's `_sweep.atomic`)."""
    for table in tables.values():
        table.variable.assign(table.variable * ops.cast(table.scale, table.variable.dtype))
