"""Kernel layouts: which axes hold one output unit's fan-in vector.

Shared by the initializers, the weight-norm wrapper and the sweeps, so this
table lives in exactly one place (which layout a layer class has is its rule's,
in `keras_goodinit.rules`):

| layout | kernel shape | one unit's fan-in vector | C_in | C_out |
|---|---|---|---|---|
| `"default"` (Dense, ConvND) | `(*k, in, out)` | all axes but the last | `in` | `out` |
| `"conv_transpose"` | `(*k, out, in)` | all axes but -2 | `in` | `out` |
| `"depthwise"` | `(*k, in, mult)` | the spatial axes `k` | `in` | `in * mult` |

`GoodInit` gives each such vector the norm `g = sqrt(gamma * C_in / C_out)`;
the kernel size `k` cancels from the fan ratio.
"""

from __future__ import annotations

LAYOUTS = ("default", "conv_transpose", "depthwise")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(
            f"Invalid value for argument `layout`. Expected one of {LAYOUTS}. "
            f"Received: layout={layout!r}"
        )
    return layout


def norm_axes(rank: int, layout: str) -> tuple[int, ...]:
    """Axes summed over to get the norm of each unit's fan-in vector."""
    if layout == "default":
        return tuple(range(rank - 1))
    if layout == "conv_transpose":
        return tuple(range(rank - 2)) + (rank - 1,)
    return tuple(range(rank - 2))  # depthwise: spatial axes only


def unit_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """Shape of a per-unit quantity (such as `g`), the kernel with norm axes removed."""
    axes = set(norm_axes(len(shape), layout))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def channel_fans(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """(C_in, C_out) of the fan ratio `C_in / C_out` in `g`; the kernel size cancels."""
    if layout == "default":
        return shape[-2], shape[-1]
    if layout == "conv_transpose":
        return shape[-1], shape[-2]
    return shape[-2], shape[-2] * shape[-1]  # depthwise: C_out = C_in * multiplier


def layout_of(layer) -> str:
    """The layout of a kernel layer's kernel: its rule's (`keras_goodinit.rules`).

    Raises a ValueError for a layer whose rule is no kernel rule.
    """
    from keras_goodinit import rules  # rules imports the weight-norm wrapper, which needs us

    rule = rules.rule_for(layer)
    if rule is None or rule.family != "kernel":
        raise ValueError(
            f"Unsupported layer type {type(layer).__name__}: no kernel rule for it in "
            "keras_goodinit.rules (Dense, EinsumDense, Conv*, SeparableConv*, "
            "DepthwiseConv*, or a class given one with `register_layer_rule`). "
            f"Received: layer={layer!r}"
        )
    return rule.layout(layer)
