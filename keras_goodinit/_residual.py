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
    num_blocks: int
    block: str  # the name of the block's Add layer


def branch_ends(model: keras.layers.Layer,
                targets: Sequence[_sweep.Target]) -> tuple[dict[int, BranchEnd], list[str]]:
    """`id(target)` -> its `BranchEnd`, for the targets that end a residual branch; and notes.

    Blocks are found on the graph of a Sequential or functional model as for
    `mean_field_init` (an `Add` whose inputs are a skip and a branch with a
    kernel layer), counting every kernel layer of the model, whichever
    targets `layers=` selected. A subclassed model has no graph to walk: its
    layers all keep the plain target, and a note says so.
    """
    if _graph.functional_of(model) is None:
        return {}, ["residual='scaled' found no residual blocks: a subclassed model has no "
                    "layer graph to walk, so every layer targets target_var"]
    graph = _graph.flatten(model)
    kernels = {id(t.layer) for t in _sweep.find_targets(model)}
    blocks, _ = _graph.residual_blocks(graph, kernels)
    by_layer = {id(t.layer): t for t in targets}
    calls = _call_index(graph)
    ends, skipped = {}, []
    for block in blocks:
        end = block.branch_end
        target = by_layer.get(id(end.layer)) if end is not None else None
        if target is None:
            continue
        source = graph.producer.get(block.source)
        projected = block.projection is not None and id(block.projection.layer) in by_layer
        if calls[id(end)] != 0:
            skipped.append(f"{end.layer.name} (shared: measured at its first call, which "
                           "is not this branch's)")
        elif source is None and not projected:
            skipped.append(f"{end.layer.name} (its block starts at a model input)")
        elif id(target) not in ends:
            probe = None if projected else _sweep.Probe(source.layer, calls[id(source)])
            ends[id(target)] = BranchEnd(probe, block.num_blocks, block.add.layer.name)
    notes = []
    if ends:
        sizes = sorted({end.num_blocks for end in ends.values()})
        notes.append(f"residual='scaled': {len(ends)} residual branch ends target "
                     f"s / N (N = {', '.join(map(str, sizes))} blocks per stage; "
                     "s the variance of the block's skip input)")
    if skipped:
        notes.append("residual branch ends kept at target_var: " + "; ".join(skipped))
    return ends, notes


def _call_index(graph: _graph.Graph) -> dict[int, int]:
    """id(step) -> how many earlier steps call the same layer (its call index in the pass)."""
    seen: dict[int, int] = {}
    index = {}
    for step in graph.steps:
        index[id(step)] = seen.get(id(step.layer), 0)
        seen[id(step.layer)] = index[id(step)] + 1
    return index
