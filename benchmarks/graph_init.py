"""Graph-level inits side by side: `mean_field_init`, residual-aware and plain LSUV, anyinit.

On the same models, from the same starting kernels:

- ResNet-56 and ResNet-110, CIFAR-style with no normalization
  (`wn_resnet((32, 32, 3), 10, N, weight_norm=False, init="orthogonal")`),
  and on request (`--models resnet1001`) the 1001-layer one, N = 166, at batch 16;
- a 50-layer tanh MLP (width 256, fused activations, 10 logits);
- `keras.applications.ResNet50V2(weights=None)` on 32x32x3 inputs (it has
  BatchNormalization; measured in inference mode, as LSUV measures, and in
  training mode, as `mean_field_init` predicts and a first training step sees).

Methods: `mean_field_init` (data-free), `lsuv_init(..., residual="scaled")`
(residual-aware LSUV, the default), plain LSUV (`residual=None`), and
anyinit's analytic mode (`anyinit.initialize(model,
mode="analytic")`, data-free; `pip install anyinit`, a benchmark-only
dependency: without it its rows say "not installed").

Columns, all on a held-out batch of N(0, 1) inputs (not the batch LSUV saw):

- `init / fwd`: the init's wall time over one warm compiled forward pass on
  the LSUV batch (`tf.function`, median of 5), measured side by side in this
  process; the init's first call, tracing included. Lower is better.
- `spread`: max / min of the pre-activation variance (over the whole output
  tensor, LSUV's statistic) over the kernel layers that are neither a
  residual branch end (meant to carry `1/N` of the stream) nor the last
  layer. 1 is best. `pre-act var range` shows the min and max themselves
  (issue 10's band for ResNets is [0.8, 1.25]).
- `logits var`: variance of the model's output. Closest to 1 is best.
- `max Add var`: the largest variance (whole tensor) at an `Add` output,
  the issue's "bounded residual stream" target (<= 3).

The last lines name, per model, the columns where `mean_field_init` or
residual-aware LSUV is not ahead of both other methods.

Usage:

    python benchmarks/graph_init.py                 # every model (about 5 min on 2 cores)
    python benchmarks/graph_init.py --models mlp50  # one model
    python benchmarks/graph_init.py --models resnet1001
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_goodinit as kg  # noqa: E402
from keras_goodinit import _graph, _sweep  # noqa: E402
from keras_goodinit.mean_field import measured_moments  # noqa: E402
from keras_goodinit.models import wn_resnet  # noqa: E402

BATCH = 64
SMALL_BATCH = {"resnet1001": 16}  # what fits a 1001-layer pass's activations comfortably
DEFAULT_MODELS = ("resnet56", "resnet110", "mlp50", "resnet50v2")
METHODS = ("mean_field", "lsuv_residual", "lsuv", "anyinit")
OURS = ("mean_field", "lsuv_residual")
# (column, its key, whether lower is better or closeness to this value).
COLUMNS = (("init / fwd", "time_ratio", "low"), ("spread", "spread", "low"),
           ("logits var", "logits_var", 1.0), ("max Add var", "max_add_var", "low"))


def _tanh_mlp(depth: int = 50, width: int = 256) -> keras.Model:
    inputs = keras.Input((width,))
    h = inputs
    for index in range(depth):
        h = keras.layers.Dense(width, activation="tanh", name=f"dense{index}")(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name="tanh_mlp_50")


MODELS: dict[str, tuple[Callable[[], keras.Model], tuple[int, ...], tuple[bool, ...]]] = {
    # name: (builder, input shape, training modes of the held-out measurement)
    "resnet56": (lambda: wn_resnet((32, 32, 3), 10, 9, init="orthogonal", weight_norm=False,
                                   seed=0), (32, 32, 3), (False,)),
    "resnet110": (lambda: wn_resnet((32, 32, 3), 10, 18, init="orthogonal", weight_norm=False,
                                    seed=0), (32, 32, 3), (False,)),
    # 166 blocks per stage: opt in with --models resnet1001 (batch 16, about 10 min on 2 cores).
    "resnet1001": (lambda: wn_resnet((32, 32, 3), 10, 166, init="orthogonal", weight_norm=False,
                                     seed=0), (32, 32, 3), (False,)),
    "mlp50": (_tanh_mlp, (256,), (False,)),
    "resnet50v2": (lambda: keras.applications.ResNet50V2(
        weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None),
        (32, 32, 3), (False, True)),
}


def _anyinit():
    try:
        import anyinit
    except ImportError:
        return None
    return anyinit


def _run_method(method: str, model: keras.Model, x: np.ndarray) -> str:
    """Initializes `model` with `method`; returns "" or why it could not run."""
    if method == "mean_field":
        kg.mean_field_init(model, seed=0, verbose=0)
    elif method == "lsuv_residual":
        kg.lsuv_init(model, x, residual="scaled", verbose=0)
    elif method == "lsuv":
        kg.lsuv_init(model, x, residual=None, verbose=0)
    else:
        anyinit = _anyinit()
        if anyinit is None:
            return "not installed (pip install anyinit)"
        anyinit.initialize(model, mode="analytic", seed=0)
    return ""


def _warm_forward_seconds(model: keras.Model, x: np.ndarray) -> float:
    forward = tf.function(lambda inputs: model(inputs, training=False))
    forward(x).numpy()
    forward(x).numpy()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        forward(x).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _branch_ends(model: keras.Model) -> set[str]:
    graph = _graph.flatten(model)
    kernels = {id(t.layer) for t in _sweep.find_targets(model)}
    blocks, _ = _graph.residual_blocks(graph, kernels)
    return {b.branch_end.layer.name for b in blocks if b.branch_end is not None}


def _add_names(model: keras.Model) -> list[str]:
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Add)]


def _held_out(model: keras.Model, x: np.ndarray, training: bool, branch_ends: set[str],
              adds: list[str]) -> dict:
    """Spread of the pre-activation variances, logits variance and the largest Add variance."""
    targets = _sweep.prepare(model, x)

    def policy(target, y, activation, state):
        if state is None:
            _, var = _sweep.cell_moments(y, tuple(range(len(y.shape))))
            state = {"var": float(np.mean(var))}
        return activation(y), state

    result = _sweep.sweep(model, x, targets, policy, training=training)
    order = [t for t in result.order if t.name not in branch_ends][:-1]  # not the logits
    variances = np.array([result.states[id(t)]["var"] for t in order])
    logits = keras.ops.convert_to_numpy(result.outputs).astype("float64")
    add_var = (max(v for _, v in measured_moments(model, x, adds, training=training).values())
               if adds else math.nan)
    return {"spread": float(variances.max() / variances.min()), "logits_var": float(logits.var()),
            "max_add_var": add_var, "var_range": (float(variances.min()), float(variances.max()))}


def measure(name: str) -> list[dict]:
    """One row per (method, training mode) on model `name`."""
    build, shape, modes = MODELS[name]
    keras.utils.set_random_seed(0)
    model = build()
    rng = np.random.default_rng(0)
    batch = SMALL_BATCH.get(name, BATCH)
    x = rng.normal(size=(batch, *shape)).astype("float32")
    held = rng.normal(size=(batch, *shape)).astype("float32")
    start = model.get_weights()
    forward_s = _warm_forward_seconds(model, x)
    branch_ends, adds = _branch_ends(model), _add_names(model)
    rows = []
    for method in METHODS:
        model.set_weights(start)
        t0 = time.perf_counter()
        skipped = _run_method(method, model, x)
        seconds = time.perf_counter() - t0
        for training in modes:
            row = {"model": name + (" (train-mode BN)" if training else ""), "method": method,
                   "skipped": skipped}
            if not skipped:
                row.update(seconds=seconds, time_ratio=seconds / forward_s,
                           **_held_out(model, held, training, branch_ends, adds))
            rows.append(row)
    return rows


def _score(row: dict, key: str, goal) -> float:
    value = row[key]
    if not math.isfinite(value):
        return math.inf
    return value if goal == "low" else abs(math.log(value / goal))


def verdicts(rows: list[dict]) -> list[str]:
    """Per model and column: where ours (mean_field_init, residual LSUV) is not ahead."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        group = {r["method"]: r for r in rows if r["model"] == model and not r["skipped"]}
        theirs = [m for m in group if m not in OURS]
        if not theirs:
            continue
        for label, key, goal in COLUMNS:
            if not any(math.isfinite(r[key]) for r in group.values()):
                continue  # no Add in the model
            best = min(theirs, key=lambda m: _score(group[m], key, goal))
            for method in (m for m in OURS if m in group):
                if _score(group[method], key, goal) > _score(group[best], key, goal):
                    lines.append(f"NOT AHEAD: {model}, {label}: {method} "
                                 f"{group[method][key]:.4g} vs {best} {group[best][key]:.4g}")
    return lines


def table(rows: list[dict]) -> str:
    header = ("| model | method | init s | init / fwd | spread | pre-act var range | logits var "
              "| max Add var |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["skipped"]:
            lines.append(f"| {row['model']} | {row['method']} | {row['skipped']} | | | | | |")
            continue
        low, high = row["var_range"]
        lines.append(f"| {row['model']} | {row['method']} | {row['seconds']:.2f} "
                     f"| {row['time_ratio']:.3g} | {row['spread']:.3g} | {low:.3g}-{high:.3g} "
                     f"| {row['logits_var']:.3g} | {row['max_add_var']:.3g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"Comma-separated, from {', '.join(MODELS)} "
                             f"(default {','.join(DEFAULT_MODELS)}).")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        parser.error(f"--models must be a comma-separated list of {', '.join(MODELS)}. "
                     f"Received: {unknown or names}")
    rows = []
    for name in names:
        print(f"measuring {name} ...", flush=True)
        rows.extend(measure(name))
    print()
    print(table(rows))
    print()
    lines = verdicts(rows)
    print("\n".join(lines) if lines else "Ours is ahead on every column of every model.")
    missing = sorted({r["method"] for r in rows if r["skipped"]})
    if missing:
        print("Not compared: " + ", ".join(missing) + " (see the table).")


if __name__ == "__main__":
    main()
