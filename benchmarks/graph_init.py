"""Graph-level inits side by side: `mean_field_init`, residual-aware and plain LSUV, anyinit.

On the same models, from the same starting kernels, every model of
`benchmarks/graph_models.py` (issue 18's targets; its docstring lists them):

- CIFAR ResNet-56 and ResNet-110 with no normalization, their residual sums
  written four ways (`resnet56_add`, `_plus`, `_ops_add`, `_custom`; the
  `_add` ones are `wn_resnet((32, 32, 3), 10, N, weight_norm=False,
  init="orthogonal")`), and on request (`--models resnet1001`) the
  1001-layer `wn_resnet`, N = 166, at batch 16;
- 50-layer MLPs (width 256, fused gelu, silu or tanh, 10 logits);
- keras.applications ConvNeXtTiny, ResNet50V2, DenseNet121 and
  MobileNetV3Small (`weights=None`) on 32x32x3 inputs; those with
  BatchNormalization are measured in inference mode, as LSUV measures, and
  in training mode, as `fit` runs them (`train-mode BN` rows);
- the issue's reproducers (`mha_times_two`, `rescaling_tanh`,
  `scaled_branch`, `three_input_add`, `gated_branch`).

`resnet56`, `resnet110`, `mlp50` are the earlier names of `resnet56_add`,
`resnet110_add` and `mlp50_tanh`.

Methods: `mean_field_init` (data-free), `lsuv_init(..., residual="scaled")`
(residual-aware LSUV, the default), plain LSUV (`residual=None`), and
anyinit's analytic mode (`anyinit.initialize(model, mode="analytic",
seed=0)`, data-free; `pip install anyinit`, a benchmark-only dependency:
without it its rows say "not installed"). An init that raises is a row
with its error; the run goes on.

Columns, all on a held-out batch (not the batch LSUV saw; N(0, 1), or the
model's own `Spec.data`, such as 0-255 pixels):

- `init s`: the init's first call on this model, tracing and graph
  building included (the process has run every init once on a tiny model
  first, so no model pays the process's one-time costs); for the data-free
  inits (`mean_field`, `anyinit`) also the second call on the same model
  (`warm`). The target `mean_field_init s <= 1.5x anyinit s` compares the
  first calls.
- `init / fwd`: the init's first call over one warm compiled forward pass
  on the LSUV batch (`tf.function` on TensorFlow, `jax.jit` of
  `stateless_call` on JAX; median of 5). Lower is better.
- `spread`: max / min of the pre-activation variance (over the whole output
  tensor, LSUV's statistic) over the kernel layers that are neither a
  residual branch end (meant to carry `1/N` of the stream) nor the last
  layer. 1 is best. `pre-act var range` shows the min and max themselves.
- `all-layer var`: min and max of the same variance over every kernel
  layer, the logits included (the MLPs' "every layer in [0.9, 1.1]").
- `max pre-act m2`: the largest second moment `E[y^2]` of a kernel layer's
  output (before its activation), the logits excluded.
- `logits var`: variance of the model's output. Closest to 1 is best.
- `max Add var`: the largest variance (whole tensor) at a residual sum's
  output, the issue's "bounded residual stream" target (<= 3). A residual
  sum is a `keras.layers.Add` layer or a `keras.ops.add` / `+` op node of
  the functional graph with two or more tensor inputs (`x + 3.0` is not
  one), or the output of a `graph_models.ResidualBlock` layer; they are read
  with one probe model on the graph's own tensors.
- `blocks`: `len(signal_report(model, x).blocks)` / the blocks a reader of
  the code counts (`Spec.expected_blocks`).

Then, per model, the columns where `mean_field_init` or residual-aware LSUV
is not ahead of both other methods, and a `targets` section: PASS or MISS,
with the measured figure, per target of issue 18.

Usage:

    python benchmarks/graph_init.py                  # every model (about 13 min, 2 busy cores)
    python benchmarks/graph_init.py --models mlp50_tanh resnet56_plus
    python benchmarks/graph_init.py --models resnet56_plus --backend jax
    python benchmarks/graph_init.py --models resnet1001
    python benchmarks/graph_init.py --json benchmarks/results/graph_init.json
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import graph_models  # noqa: E402  (benchmarks/ is the script's folder, so on sys.path)
import keras  # noqa: E402
import numpy as np  # noqa: E402
from lsuv_speed import compiled_forward  # noqa: E402

import keras_goodinit as kg  # noqa: E402
from keras_goodinit import _sweep  # noqa: E402
from keras_goodinit.models import wn_resnet  # noqa: E402

BATCH = 64
SMALL_BATCH = {"resnet1001": 16}  # what fits a 1001-layer pass's activations comfortably
MODELS: dict[str, graph_models.Spec] = {
    **graph_models.MODELS,
    # 166 blocks per stage: opt in with --models resnet1001 (batch 16, about 10 min on 2 cores).
    "resnet1001": graph_models.Spec(
        lambda: wn_resnet((32, 32, 3), 10, 166, init="orthogonal", weight_norm=False, seed=0),
        (32, 32, 3), 3 * 166, "resnet"),
}
ALIASES = {"resnet56": "resnet56_add", "resnet110": "resnet110_add", "mlp50": "mlp50_tanh"}
DEFAULT_MODELS = tuple(name for name in graph_models.MODELS)
METHODS = ("mean_field", "lsuv_residual", "lsuv", "anyinit")
DATA_FREE = ("mean_field", "anyinit")
OURS = ("mean_field", "lsuv_residual")
# (column, its key, whether lower is better or closeness to this value).
COLUMNS = (("init / fwd", "time_ratio", "low"), ("spread", "spread", "low"),
           ("logits var", "logits_var", 1.0), ("max Add var", "max_add_var", "low"))


def _anyinit():
    try:
        import anyinit
    except ImportError:
        return None
    return anyinit


def _run_method(method: str, model: keras.Model, x: np.ndarray, training: bool = True) -> str:
    """Initializes `model` with `method`; returns "" or why it could not run.

    `mean_field_init` follows BatchNormalization in the mode it is measured in (`training`).
    """
    if method == "mean_field":
        kg.mean_field_init(model, seed=0, verbose=0, training=training)
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


def _warm_up_process() -> None:
    """Runs every method once on a tiny model: the first model measured pays no one-time cost.

    (Lazy imports, the backend's first compilation of the random draws...)
    """
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    for method in METHODS:
        _run_method(method, model, x)


def _warm_forward_seconds(model: keras.Model, x: np.ndarray) -> float:
    forward = compiled_forward(model)
    forward(x)
    forward(x)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        forward(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _has_batch_norm(model: keras.Model) -> bool:
    return any(isinstance(layer, keras.layers.BatchNormalization)
               for layer in model._flatten_layers())


# --- residual sums, read on the functional graph itself (independent of keras_goodinit) ---


def _nodes(model: keras.Model) -> list:
    return [node for nodes in model._nodes_by_depth.values() for node in nodes]


def _is_sum(operation) -> bool:
    from keras.src.ops.numpy import Add as AddOp  # the op node of `+` and `keras.ops.add`

    return isinstance(operation, (keras.layers.Add, AddOp))


def _ancestors(tensor, producer: dict) -> set[int]:
    """ids of `tensor` and of every tensor it is computed from."""
    seen, stack = set(), [tensor]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        node = producer.get(id(t))
        if node is not None:
            stack.extend(node.input_tensors)
    return seen


def _nearest_kernel(tensor, producer: dict, kernels: set[int]):
    """The tensors back through one-input non-kernel ops, and the kernel node ending them."""
    chain = [tensor]
    while True:
        node = producer.get(id(chain[-1]))
        if node is None:
            return chain, None
        if id(node.operation) in kernels:
            return chain, node
        if len(node.input_tensors) != 1:
            return chain, None
        chain.append(node.input_tensors[0])


def _is_skip(index: int, walks: list, ancestry: list[set[int]]) -> bool:
    """Whether every other input of a sum is computed from input `index` or its kernel's input."""
    chain, kernel_node = walks[index]
    sources = [id(t) for t in chain]
    if kernel_node is not None:
        sources.append(id(kernel_node.input_tensors[0]))
    others = [a for j, a in enumerate(ancestry) if j != index]
    return any(all(s in a for a in others) for s in sources)


def residual_sums(model: keras.Model, kernels: set[int]) -> tuple[list, set[int]]:
    """The output tensors of the residual sums of a functional model, and ids of branch ends.

    A sum's skip is the input (through pooling, reshapes, activations...) from
    which every other input is computed, or a kernel layer (a projection)
    whose input every other input is computed from; the nearest kernel layer
    of each other input is a branch end. `kernels` holds `id(layer)` of the
    kernel layers.
    """
    producer = {id(t): node for node in _nodes(model) for t in node.outputs}
    sums, ends = [], set()
    for node in _nodes(model):
        operation = node.operation
        if isinstance(operation, graph_models.ResidualBlock):
            sums.extend(node.outputs)
            ends.add(id(operation.conv2))
            continue
        inputs = node.input_tensors
        if not _is_sum(operation) or len(inputs) < 2:
            continue
        sums.extend(node.outputs)
        ancestry = [_ancestors(t, producer) for t in inputs]
        walks = [_nearest_kernel(t, producer, kernels) for t in inputs]
        skips = [i for i in range(len(inputs)) if _is_skip(i, walks, ancestry)]
        for index, (_, kernel_node) in enumerate(walks):
            if index not in skips[:1] and kernel_node is not None:
                ends.add(id(kernel_node.operation))
    return sums, ends


def _sum_variances(model: keras.Model, sums: list, x: np.ndarray, training: bool) -> float:
    """The largest whole-tensor variance at the residual sums' outputs on `x`."""
    if not sums:
        return math.nan
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    probe = keras.Model(inputs, sums)
    outputs = probe(x, training=training)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return max(float(np.var(keras.ops.convert_to_numpy(y).astype("float64"))) for y in outputs)


def _held_out(model: keras.Model, x: np.ndarray, training: bool, branch_ends: set[int],
              sums: list) -> dict:
    """Pre-activation variances and second moments, logits variance, largest residual sum."""
    targets = _sweep.prepare(model, x)

    def policy(target, y, activation, state):
        if state is None:
            mean, var = _sweep.cell_moments(y, tuple(range(len(y.shape))))
            state = {"var": float(np.mean(var)), "m2": float(np.mean(var + mean**2))}
        return activation(y), state

    result = _sweep.sweep(model, x, targets, policy, training=training)
    order = [t for t in result.order if id(t.layer) not in branch_ends][:-1]  # not the logits
    variances = np.array([result.states[id(t)]["var"] for t in order])
    every = np.array([result.states[id(t)]["var"] for t in result.order])
    logits = keras.ops.convert_to_numpy(result.outputs).astype("float64")
    m2 = [result.states[id(t)]["m2"] for t in result.order[:-1]]
    return {"spread": float(variances.max() / variances.min()), "logits_var": float(logits.var()),
            "max_add_var": _sum_variances(model, sums, x, training),
            "var_range": (float(variances.min()), float(variances.max())),
            "all_var_range": (float(every.min()), float(every.max())),
            "max_preact_m2": float(max(m2)) if m2 else math.nan}


def _error(error: BaseException) -> str:
    last = traceback.extract_tb(error.__traceback__)[-1]
    where = f"{os.path.basename(last.filename)}:{last.lineno}"
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160]} ({where})"


def measure(name: str) -> list[dict]:
    """One row per (method, training mode) on model `name`; an error is a row, not a raise."""
    spec = MODELS[name]
    try:
        model = spec.build()
        rng = np.random.default_rng(0)
        batch = SMALL_BATCH.get(name, BATCH)
        x, held = spec.inputs(rng, batch), spec.inputs(rng, batch)
        start = model.get_weights()
        forward_s = _warm_forward_seconds(model, x)
        kernels = {id(t.layer) for t in _sweep.prepare(model, x)}
        sums, branch_ends = residual_sums(model, kernels)
        modes = (False, True) if _has_batch_norm(model) else (False,)
    except Exception as error:  # noqa: BLE001 (one model's failure is a row of the table)
        return [{"model": name, "method": "build", "skipped": f"raised {_error(error)}"}]
    try:
        found = len(kg.signal_report(model, held, gradients=False).blocks)
    except Exception as error:  # noqa: BLE001
        found = f"raised {_error(error)}"
    rows = []
    for method in METHODS:
        # mean_field_init runs once per BN mode, in the mode it is then measured in (the mode
        # its report states); the other methods run once and are measured in each mode.
        runs = [(t, (t,)) for t in modes] if method == "mean_field" else [(modes[0], modes)]
        for run_mode, measured_modes in runs:
            seconds, warm, skipped = _timed_init(method, model, start, x, run_mode)
            for training in measured_modes:
                rows.append(_measured_row(spec, name, method, training, model, x, held, sums,
                                          branch_ends, found, forward_s, seconds, warm,
                                          skipped))
    return rows


def _timed_init(method, model, start, x, training) -> tuple[float, float, str]:
    """(first-call seconds, second-call seconds for the data-free ones, why skipped)."""
    model.set_weights(start)
    seconds, warm, skipped = math.nan, math.nan, ""
    try:
        t0 = time.perf_counter()
        skipped = _run_method(method, model, x, training)
        seconds = time.perf_counter() - t0
        if method in DATA_FREE and not skipped:
            t0 = time.perf_counter()
            _run_method(method, model, x, training)  # same seed: the same kernels again
            warm = time.perf_counter() - t0
    except Exception as error:  # noqa: BLE001 (one method's failure is a row of the table)
        skipped = f"raised {_error(error)}"
    return seconds, warm, skipped


def _measured_row(spec, name, method, training, model, x, held, sums, branch_ends, found,
                  forward_s, seconds, warm, skipped) -> dict:
    row = {"model": name + (" (train-mode BN)" if training else ""), "method": method,
           "skipped": skipped, "training": training, "blocks_found": found,
           "blocks_expected": spec.expected_blocks, "residual_sums": len(sums)}
    if skipped:
        return row
    row.update(seconds=seconds, warm_seconds=warm, time_ratio=seconds / forward_s,
               forward_s=forward_s)
    try:
        row.update(_held_out(model, held, training, branch_ends, sums))
        if spec.kind == "mlp" and method.startswith("lsuv"):
            # Also on the batch LSUV saw: what it promises, before generalizing.
            row["own_batch_var_range"] = _held_out(model, x, training, branch_ends,
                                                   sums)["all_var_range"]
    except Exception as error:  # noqa: BLE001
        row["skipped"] = f"measuring raised {_error(error)}"
    return row


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
                continue  # no residual sum in the model
            best = min(theirs, key=lambda m: _score(group[m], key, goal))
            for method in (m for m in OURS if m in group):
                if _score(group[method], key, goal) > _score(group[best], key, goal):
                    lines.append(f"NOT AHEAD: {model}, {label}: {method} "
                                 f"{group[method][key]:.4g} vs {best} {group[best][key]:.4g}")
    return lines


def _blocks(row: dict) -> str:
    found = row["blocks_found"]
    return f"{found} / {row['blocks_expected']}" if isinstance(found, int) else str(found)


def table(rows: list[dict]) -> str:
    header = ("| model | method | init s (warm) | init / fwd | spread | pre-act var range "
              "| all-layer var | max pre-act m2 | logits var | max Add var | blocks |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["skipped"]:
            blocks = _blocks(row) if "blocks_found" in row else ""
            lines.append(f"| {row['model']} | {row['method']} | {row['skipped']} "
                         f"| | | | | | | | {blocks} |")
            continue
        low, high = row["var_range"]
        every_low, every_high = row["all_var_range"]
        warm = f" ({row['warm_seconds']:.2f})" if math.isfinite(row["warm_seconds"]) else ""
        lines.append(f"| {row['model']} | {row['method']} | {row['seconds']:.2f}{warm} "
                     f"| {row['time_ratio']:.3g} | {row['spread']:.3g} | {low:.3g}-{high:.3g} "
                     f"| {every_low:.3g}-{every_high:.3g} | {row['max_preact_m2']:.3g} "
                     f"| {row['logits_var']:.3g} | {row['max_add_var']:.3g} | {_blocks(row)} |")
    return "\n".join(lines)


# --- issue 18's targets ---------------------------------------------------------------


def _row(rows: list[dict], name: str, method: str, training: bool = False) -> dict | None:
    for row in rows:
        if row["model"].split(" ")[0] == name and row["method"] == method \
                and row.get("training", False) == training:
            return row
    return None


def _figure(row: dict | None, key: str) -> tuple[float | None, str]:
    """The row's value, or None and why there is none."""
    if row is None:
        return None, "not run"
    if row["skipped"]:
        return None, row["skipped"]
    value = row[key]
    if isinstance(value, float) and math.isnan(value):
        return None, f"no {key}"
    return value, ""


def _check(checks: list, name: str, row: dict | None, key: str, test, fmt=None) -> None:
    value, why = _figure(row, key)
    if value is None:
        checks.append((name, False, why))
        return
    text = fmt(value) if fmt else (f"{value:.4g}" if isinstance(value, float) else str(value))
    checks.append((name, bool(test(value)), text))


def targets(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """(target, met, measured figure) for every issue-18 target the rows allow judging."""
    names = list(dict.fromkeys(r["model"].split(" ")[0] for r in rows))
    checks: list[tuple[str, bool, str]] = []
    for name in names:
        spec = MODELS[name]
        has_bn = _row(rows, name, "mean_field", training=True) is not None
        if spec.expected_blocks or spec.kind == "application":
            first = next(r for r in rows if r["model"].split(" ")[0] == name)
            if "blocks_found" in first:
                _check(checks, f"{name}: every residual block found by signal_report", first,
                       "blocks_found", lambda v, e=spec.expected_blocks: v == e,
                       lambda v, e=spec.expected_blocks: f"{v} / {e}")
        if spec.kind == "resnet":
            for method in OURS:
                _check(checks, f"{name}: max residual-sum var <= 3 after {method}",
                       _row(rows, name, method), "max_add_var", lambda v: v <= 3)
        if name in ("convnext_tiny", "resnet50v2"):
            for training in (False, True) if has_bn else (False,):
                mode = " (train-mode BN)" if training else ""
                _check(checks, f"{name}{mode}: stream (max residual-sum var) <= 3 after "
                       "lsuv_residual", _row(rows, name, "lsuv_residual", training),
                       "max_add_var", lambda v: v <= 3)
                _check(checks, f"{name}{mode}: logits var in [0.5, 2] after mean_field",
                       _row(rows, name, "mean_field", training), "logits_var",
                       lambda v: 0.5 <= v <= 2)
        if name in ("densenet121", "mobilenetv3_small"):
            for training in (False, True):
                mode = "train-mode BN" if training else "inference-mode BN"
                row = _row(rows, name, "mean_field", training)
                _check(checks, f"{name} ({mode}): max pre-act 2nd moment <= 10 after mean_field",
                       row, "max_preact_m2", lambda v: v <= 10)
                _check(checks, f"{name} ({mode}): logits var >= 1e-2 after mean_field", row,
                       "logits_var", lambda v: v >= 1e-2)
        if name in ("mlp50_gelu", "mlp50_silu"):
            row = _row(rows, name, "lsuv_residual")
            own = (row or {}).get("own_batch_var_range")
            note = f" (on LSUV's own batch: {own[0]:.3g}-{own[1]:.3g})" if own else ""
            _check(checks, f"{name}: every layer's pre-act var in [0.9, 1.1] after lsuv_init",
                   row, "all_var_range", lambda v: 0.9 <= v[0] and v[1] <= 1.1,
                   lambda v, note=note: f"{v[0]:.3g}-{v[1]:.3g}{note}")
        if name == "mlp50_tanh":
            _check(checks, f"{name}: hidden pre-act var in [0.7, 1.4] after mean_field",
                   _row(rows, name, "mean_field"), "var_range",
                   lambda v: 0.7 <= v[0] and v[1] <= 1.4, lambda v: f"{v[0]:.3g}-{v[1]:.3g}")
        if name == "mha_times_two":
            row = _row(rows, name, "mean_field")
            checks.append((f"{name}: mean_field_init runs", row is not None and not row["skipped"],
                           "ran" if row is not None and not row["skipped"]
                           else (row or {}).get("skipped", "not run")))
        ours, theirs = _row(rows, name, "mean_field"), _row(rows, name, "anyinit")
        if ours is not None and theirs is not None:
            a, why_a = _figure(ours, "seconds")
            b, why_b = _figure(theirs, "seconds")
            if a is None or b is None:
                checks.append((f"{name}: mean_field_init s <= 1.5x anyinit s", False,
                               why_a or why_b))
            else:
                checks.append((f"{name}: mean_field_init s <= 1.5x anyinit s", a <= 1.5 * b,
                               f"{a:.2f} s vs {b:.2f} s = {a / b:.2f}x (warm "
                               f"{ours['warm_seconds']:.2f} vs {theirs['warm_seconds']:.2f})"))
    return checks


def _names(values: list[str], parser: argparse.ArgumentParser) -> list[str]:
    names = [ALIASES.get(n.strip(), n.strip()) for value in values for n in value.split(",")
             if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        parser.error(f"--models takes names from {', '.join([*MODELS, *ALIASES])}. "
                     f"Received: {unknown or names}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="Names, space- or comma-separated (default: every model of "
                             "graph_models.py).")
    parser.add_argument("--backend", choices=("tensorflow", "jax"), default=None,
                        help="Run on this Keras backend (a fresh process where it is not "
                             "the current one).")
    parser.add_argument("--json", default=None, help="Write every row to this JSON file.")
    parser.add_argument("--note", default="", help="Stored in the JSON (what code was run).")
    args = parser.parse_args()
    names = _names(args.models, parser)
    if args.backend and args.backend != keras.backend.backend():
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
        env = {**os.environ, "KERAS_BACKEND": args.backend}
        sys.exit(subprocess.run(command, env=env).returncode)

    from _results import Recorder

    recorder = Recorder("graph_init")
    print(f"backend: {keras.backend.backend()}", flush=True)
    _warm_up_process()
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
        print("Not compared or failed: " + ", ".join(missing) + " (see the table).")
    checks = targets(rows)
    print("\ntargets (issue 18):")
    for name, passed, value in checks:
        print(f"{'PASS' if passed else 'MISS'}  {name}: {value}")
    if args.json:
        recorder.write(args.json, rows, backend=keras.backend.backend(), note=args.note,
                       checks=[{"name": n, "passed": p, "value": v} for n, p, v in checks])


if __name__ == "__main__":
    main()
