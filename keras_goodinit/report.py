"""What an init sweep did to each layer."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

STATUSES = ("ok", "skipped", "max_iter", "drift", "unanalysed", "missed")


@dataclasses.dataclass
class LayerRecord:
    """One target layer's outcome.

    Attributes:
        name: The layer's name.
        class_name: Its class, e.g. `"Dense"` or `"WeightNormalization(Conv2D)"`.
        var_before: Variance of its output (whole tensor) before the init.
        var_after: Variance after the init on the same batch: that of the
            rescaled output in flight where it is the model's own to float32
            rounding (Keras' linear layers as shipped, in float32 or wider),
            else measured by one more forward pass.
        iterations: Scale steps taken.
        scale: Factor the layer's output was multiplied by (mean over units
            for per-unit inits).
        status: `"ok"`, `"skipped"` (left as it was, see `reason`),
            `"max_iter"` (stopped at the iteration cap), `"drift"` (the
            measured `var_after` departs from the in-flight estimate beyond
            rounding and misses the target, see `reason`); `mean_field_init`
            adds `"unanalysed"` (no rule could predict it) and `"missed"` (its
            measurement disagrees with the prediction).
        reason: Why a layer was skipped or capped, or a note; empty if none.
        target_var: The variance the layer aimed at (LSUV: `target_var`, or a
            residual branch end's `s / N`); NaN for inits without a variance
            target.
    """

    name: str
    class_name: str
    var_before: float
    var_after: float
    iterations: int
    scale: float
    status: str
    reason: str = ""
    target_var: float = math.nan


def json_safe(value):
    """A float JSON can hold: non-finite floats become strings."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def format_table(header: tuple[str, ...], lines: list[tuple[str, ...]],
                 footer: str | None = None) -> str:
    """Left-aligned columns under a header; the last column is not padded."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    widths[-1] = 0
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "-" * max(len(fmt.format(*line).rstrip()) for line in [header, *lines])
    rows = [fmt.format(*header).rstrip(), rule, *(fmt.format(*line).rstrip() for line in lines)]
    return "\n".join(rows + ([rule, footer] if footer else []))


@dataclasses.dataclass
class InitReport:
    """The per-layer outcome of `lsuv_init` or `weightnorm_data_init`.

    Attributes:
        method: `"lsuv"` or `"weightnorm_data_init"`.
        rows: One `LayerRecord` per target layer, in execution order.
        batches: Number of batches the sweep used.
        notes: Lines about the whole model (e.g. how many layers a
            normalization layer follows), printed under the table.
        mode: How the sweep ran: `"xla"` or `"compiled"` (one traced
            `tf.function`, with or without XLA) or `"eager"` (the model could
            not be traced, or `compile="eager"` was asked; `notes` says which).
    """

    method: str
    rows: list[LayerRecord]
    batches: int = 1
    notes: list[str] = dataclasses.field(default_factory=list)
    mode: str = "eager"

    def __getitem__(self, name: str) -> LayerRecord:
        """The row named `name`: its path (`"block_0/attention/query"`), or its last
        part where that is unique; a ValueError where several rows end so."""
        found = [row for row in self.rows if row.name == name] or [
            row for row in self.rows if row.name.rsplit("/", 1)[-1] == name]
        if len(found) > 1:
            raise ValueError(
                f"Argument `name` is ambiguous: {len(found)} rows are named by it "
                f"({', '.join(row.name for row in found)}); use the path. Received: name={name!r}")
        if not found:
            raise KeyError(name)
        return found[0]

    @property
    def ok(self) -> bool:
        """True if every layer reached its target."""
        return all(row.status == "ok" for row in self.rows)

    def to_dict(self) -> dict:
        """A JSON-safe dict (non-finite floats become strings)."""
        return {
            "method": self.method,
            "batches": self.batches,
            "mode": self.mode,
            "notes": list(self.notes),
            "rows": [
                {k: json_safe(v) for k, v in dataclasses.asdict(row).items()}
                for row in self.rows
            ],
        }

    def table(self) -> str:
        targets = any(math.isfinite(r.target_var) for r in self.rows)
        header = ("layer", "class", "var before", "var after", *(("target",) if targets else ()),
                  "iters", "scale", "status")
        lines = [(r.name, r.class_name, f"{r.var_before:.4g}", f"{r.var_after:.4g}",
                  *((f"{r.target_var:.4g}",) if targets else ()),
                  str(r.iterations), f"{r.scale:.4g}",
                  r.status + (f" ({r.reason})" if r.reason else "")) for r in self.rows]
        counts = {s: sum(r.status == s for r in self.rows) for s in STATUSES}
        counts = {s: n for s, n in counts.items() if n or s in STATUSES[:4]}
        footer = f"{self.method}: {len(self.rows)} layers, " + ", ".join(
            f"{n} {s}" for s, n in counts.items())
        return format_table(header, lines, "\n".join([footer, *self.notes]))

    def summary(self, print_fn: Callable[[str], None] | None = None) -> None:
        """Prints the per-layer table."""
        (print_fn or print)(self.table())

    def __str__(self) -> str:
        return self.table()
