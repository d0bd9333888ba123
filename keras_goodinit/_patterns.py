"""Normalizations and rotations written as ops: patterns one op's rule cannot see alone.

KerasHub's Llama and Gemma write RMSNorm as `x * rsqrt(mean(x^2) + eps)`
and rotary position embeddings as `x * cos + rotate_half(x) * sin`. Each op
of these has no rule of its own (a mean over channels, a split, a stack),
and their last step combines two tensors that share `x`, which the
independent-inputs rules refuse. As a whole each is simple: the RMSNorm
output has second moment `P / (P + eps)` at a position of second moment P,
and the rotation keeps it (`cos^2 + sin^2 = 1`). `find` matches them on the
graph; the steps inside a match are *internal*: their moments are not
needed, so they are neither followed nor reported unanalysed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_goodinit import rules

_CASTS = ("Cast",)


@dataclasses.dataclass
class Match:
    """A pattern ending at one step: what it is, its input tensor, its constants."""

    kind: str  # "rms" or "rotary"
    source: int  # key of the tensor normalized or rotated
    internal: set  # keys computed inside the pattern (no moments followed)
    epsilon: float = 0.0
    gain: np.ndarray | None = None  # rotary: per-position mean of cos^2 + sin^2


def _name(step) -> str:
    return type(step.layer).__name__


def _through_casts(graph, key: int, internal: set) -> int:
    step = graph.producer.get(key)
    while step is not None and _name(step) in _CASTS and len(step.inputs) == 1:
        internal.add(key)
        key = step.inputs[0]
        step = graph.producer.get(key)
    return key


def _constants(graph, step) -> list[np.ndarray]:
    from keras_goodinit import _graph

    return _graph.context(graph, step).constants()


def _inverse_rms(graph, key: int, internal: set) -> tuple[int, float] | None:
    """(x, eps) where `key` is 1 / sqrt(mean(x^2) + eps), casts aside."""
    key = _through_casts(graph, key, internal)
    step = graph.producer.get(key)
    if step is None or len(step.inputs) != 1:
        return None
    internal.add(key)
    if _name(step) == "Rsqrt":
        key = step.inputs[0]
    elif _name(step) == "Reciprocal":
        inner = graph.producer.get(_through_casts(graph, step.inputs[0], internal))
        if inner is None or _name(inner) != "Sqrt":
            return None
        internal.add(inner.outputs[0])
        key = inner.inputs[0]
    else:
        return None
    return _mean_square(graph, key, internal)


def _mean_square(graph, key: int, internal: set) -> tuple[int, float] | None:
    """(x, eps) where `key` is mean(x^2) + eps over the channel axis."""
    key = _through_casts(graph, key, internal)
    step = graph.producer.get(key)
    epsilon = 0.0
    if step is not None and _name(step) == "Add" and len(step.inputs) == 1:
        found = _constants(graph, step)
        if len(found) != 1 or found[0].size != 1:
            return None
        epsilon = float(found[0].ravel()[0])
        internal.add(key)
        key = _through_casts(graph, step.inputs[0], internal)
        step = graph.producer.get(key)
    if step is None or _name(step) != "Mean" or len(step.inputs) != 1:
        return None
    internal.add(key)
    key = _through_casts(graph, step.inputs[0], internal)
    step = graph.producer.get(key)
    if step is None:
        return None
    # The source itself (and its casts) is the signal: not internal.
    if _name(step) == "Square" and len(step.inputs) == 1:
        internal.add(key)
        return _through_casts(graph, step.inputs[0], set()), epsilon
    if _name(step) == "Power" and len(step.inputs) == 1:
        found = _constants(graph, step)
        if len(found) == 1 and float(found[0].ravel()[0]) == 2.0:
            internal.add(key)
            return _through_casts(graph, step.inputs[0], set()), epsilon
    return None


def _rms(graph, step) -> Match | None:
    if _name(step) != "Multiply" or len(step.inputs) != 2 or step.inputs[0] == step.inputs[1]:
        return None
    for x, scale in (step.inputs, step.inputs[::-1]):
        internal: set = set()
        found = _inverse_rms(graph, scale, internal)
        if found is not None and found[0] == _through_casts(graph, x, set()):
            return Match("rms", x, internal, epsilon=found[1])
    return None


def _rotary(graph, step) -> Match | None:
    """`x * C1 + P(x) * C2`, P a signed rearrangement of x's channels (split, negate,
    stack, reshape): the entries paired are different channels of x."""
    if _name(step) != "Add" or len(step.inputs) != 2:
        return None
    terms = []
    for key in step.inputs:
        made = graph.producer.get(key)
        if made is None or _name(made) != "Multiply" or len(made.inputs) != 1:
            return None
        found = _constants(graph, made)
        if len(found) != 1:
            return None
        terms.append((made.inputs[0], found[0]))
    (a, c1), (b, c2) = terms
    for plain, moved in ((a, b), (b, a)):
        internal: set = set()
        stack, reached = [moved], False
        while stack:
            key = stack.pop()
            if key == plain:
                reached = True
                continue
            made = graph.producer.get(key)
            if made is None or _name(made) not in (
                    "Split", "Negative", "Stack", "Reshape", "Concatenate", "Cast"):
                reached = False
                break
            internal.add(key)
            stack.extend(made.inputs)
        if reached:
            c1, c2 = np.broadcast_arrays(np.asarray(c1, float), np.asarray(c2, float))
            return Match("rotary", plain, internal, gain=c1**2 + c2**2)
    return None


def find(graph) -> dict[int, Match]:
    """`id(step)` -> its `Match`, for the steps that end a pattern."""
    matches = {}
    for step in graph.steps:
        match = _rms(graph, step) or _rotary(graph, step)
        if match is not None:
            matches[id(step)] = match
    return matches


def propagate(match: Match, source: rules.Signal, out_map: tuple) -> rules.Signal:
    """The pattern's output moments from its source's."""
    if source.unknown:
        return source
    if match.kind == "rms":
        # Per position: x / sqrt(mean_c x^2 + eps) has mean square P / (P + eps) over
        # channels (the channel mean of x^2 is P for wide layers).
        power = source.power / (source.power + match.epsilon)
        scale = 1.0 / np.sqrt(source.power + match.epsilon)
        cross = rules.cross_of(source)
        return rules.Signal(power, source.mean * scale, cross=None if cross is None or not (
            source.q > 0) else cross / (source.q + match.epsilon))
    # Rotary: independent channels paired, each position's gain cos^2 + sin^2 (1).
    gain = float(np.mean(match.gain))
    return rules.Signal(source.power * gain, np.zeros_like(source.mean))
