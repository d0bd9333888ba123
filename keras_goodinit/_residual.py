"""Residual-aware LSUV: which targets end a residual branch, and where their stream is read.

LSUV that sets every branch end to `target_var` makes the residual stream's
variance grow by about `target_var` per block. With `residual="scaled"`, the
last kernel of a residual branch instead targets `s / N`: `s` is
the variance of the block's skip input and `N` the number of blocks in its
stage (Arpit et al.'s 1/N rule, driven by data). For an identity skip `s` is
the stream's variance at the block's input, measured in the same pass; for a
projection skip that LSUV itself normalizes it is `target_var`, what that
projection is set to. Each block then multiplies the stream's variance by
about `1 + 1/N`, so a stage of N blocks grows it by at most `e`.

Blocks are those of `_graph.residual_blocks`, on the model's op-level graph:
`Add` layers, `h + x` and `keras.ops.add` op nodes, and the sums inside
subclassed layers and models, which the graph inlines. A sum of `k`
branches gives each branch end `s / (N k)`: the block still adds `s / N`.
A branch weighted by a constant `c` (`x + 0.1 f(x)`, a LayerScale) or by a
gate (`x + g f(x)`) keeps `s / N` at its last kernel, so it adds `c^2 s / N`
(less, gated): the 1/N rule sets the branch's last layer, and the factor is
the model's own choice of a smaller share (LayerScale, ReZero and SkipInit
start it near 0 on purpose); dividing by `c^2` would undo it. A note says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras

from keras_goodinit import _graph, _sweep

RESIDUAL_MODES = ("scaled", None)


@dataclasses.dataclass(eq=False)
class BranchEnd:
    """A target that ends a residual branch: where its skip's variance comes from, N."""

    # The stream at the block's input, measured in the pass; None for a projection skip
    # that is itself a target (its variance is then its own target, target_var).
    probe: _sweep.Probe | None
    num_blocks: int  # N: blocks in the stage, times the branches of the block's sum
    block: str  # the path name of the block's sum


def branch_ends(model: keras.layers.Layer,
                targets: Sequence[_sweep.Target]) -> tuple[dict[int, BranchEnd], list[str]]:
    """`id(target)` -> its `BranchEnd`, for the targets that end a residual branch; and notes.

    Blocks are found on the model's graph (`_graph.flatten`), counting every
    block of a stage, whichever targets `layers=` selected. A model whose
    graph cannot be built (a subclassed model that cannot be traced) keeps
    the plain target for every layer, and a note says so.
    """
    try:
        graph = _graph.flatten(model)
    except ValueError as error:
        return {}, [f"residual='scaled' found no residual blocks: the model has no graph to "
                    f"walk ({error}), so every layer targets target_var"]
    blocks, _ = _graph.residual_blocks(graph)
    by_layer = {id(t.layer): t for t in targets}
    ends, skipped, weighted, upstreams = {}, [], [], []
    for block in blocks:
        found = [(end, scale, gate) for end, scale, gate in
                 zip(block.branch_ends, block.scales, block.gates, strict=True)
                 if end is not None and id(end.layer) in by_layer]
        if not found:
            continue
        projected = block.projection is not None and id(block.projection.layer) in by_layer
        hook, upstream = (None, "") if projected else _stream_hook(graph, blocks, block.source)
        if upstream:
            upstreams.append(f"{block.add.name} (read at {upstream})")
        for end, scale, gate in found:
            target = by_layer[id(end.layer)]
            end_hook = graph.hook(end.outputs[0])
            if end_hook is None or end_hook[1] != 0:
                skipped.append(f"{end.name} (shared: measured at its first call, which is "
                               "not this branch's)")
            elif hook is None and not projected:
                where = ("a model input" if block.source in graph.inputs else
                         "a tensor made inside a layer's own code, which no pass can read")
                skipped.append(f"{end.name} (its block's stream is {where})")
            elif id(target) not in ends:
                probe = None if projected else _sweep.Probe(*hook)
                ends[id(target)] = BranchEnd(probe, block.num_blocks * len(block.branches),
                                             block.add.name)
                if gate is not None or scale != 1.0:
                    weighted.append((end.name, "gated" if gate is not None else
                                     f"times {scale:.3g}"))
    notes = []
    if ends:
        sizes = sorted({end.num_blocks for end in ends.values()})
        notes.append(f"residual='scaled': {len(ends)} residual branch ends target "
                     f"s / N (N = {', '.join(map(str, sizes))}: the blocks of the stage, times "
                     "the branches of a sum with several; s the variance of the block's skip "
                     "input)")
    if weighted:
        kinds = {}
        for name, kind in weighted:
            kinds.setdefault(kind, []).append(name)
        notes.append("residual branches weighted by the model keep s / N at their last "
                     "kernel, so they add c^2 s / N to the stream (less than s / N for c < 1): "
                     + "; ".join(f"{len(names)} {kind} (e.g. {names[0]})"
                                 for kind, names in kinds.items()))
    if upstreams:
        notes.append("the stream of these blocks is made inside a layer's own code (a "
                     "transformer block's sum after attention): s is read where the stream "
                     "last enters a pass, before the sums between (they add s / N each, so s is "
                     "low by at most that): " + "; ".join(upstreams[:3]) + (
                         f" and {len(upstreams) - 3} more" if len(upstreams) > 3 else ""))
    if skipped:
        notes.append("residual branch ends kept at target_var: " + "; ".join(skipped))
    return ends, notes


def _stream_hook(graph, blocks, key: int) -> tuple[tuple | None, str]:
    """Where a pass reads the stream `key`, or failing that the stream before it.

    Up the skips of the sums that made it (and the steps their rules look
    through): `(hook, "")` where `key` itself is readable, `(hook, name)` for
    the readable stream upstream, `(None, "")` where there is none.
    """
    made_by = {block.add.outputs[0]: block for block in blocks}
    current = key
    for _ in range(len(graph.steps) + 1):
        hook = graph.hook(current)
        if hook is not None:
            if current == key:
                return hook, ""
            producer = graph.producer.get(current)
            return hook, producer.name if producer is not None else "the model input"
        if current in made_by:
            current = made_by[current].skip
            continue
        step = graph.producer.get(current)
        if step is None or step.rule is None or not step.rule.look_through or len(
                step.inputs) != 1:
            return None, ""
        current = step.inputs[0]
    return None, ""
