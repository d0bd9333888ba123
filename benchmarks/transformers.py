"""Inits on transformers side by side: Keras' default, ours (data-free and LSUV) and anyinit.

Issue 19's benchmark, on the models of `benchmarks/transformer_models.py`
(its docstring lists them: KerasHub GPT-2, BERT, ViT and Llama from small
configs, a 32-layer post-LN encoder stack, 24- and 96-block no-normalization
pre-activation transformers), for each init:

- `default`: the kernels as Keras and KerasHub draw them;
- `mean_field`: `mean_field_init(model, seed=0)` (data-free);
- `lsuv_residual`: `lsuv_init(model, x, residual="scaled")`;
- `lsuv`: plain LSUV, `lsuv_init(model, x, residual=None)`;
- `anyinit`: `anyinit.initialize(model, mode="analytic", seed=0)` (anyinit
  0.4.0, a benchmark-only dependency; "not installed" rows without it).

Columns of the init table, all measured on a held-out batch (not the batch
LSUV saw), inference mode:

- `rows`: of the kernels inside the residual blocks (`block_kernels`), how
  many have a row of the init's report with a rule's status (`ok`,
  `missed`, `max_iter`, `drift`), then `skipped` / `unanalysed` / without a
  row, each group with its first reason in `notes`; `-` for the inits with no
  report (`default`, `anyinit`).
- `pred`: `mean_field_init(model, seed=0, data=held-out batch)`'s report,
  run after the `mean_field` measurements: rows `ok` (measured second
  moment within its prediction) / rows with a prediction, `missed` counted
  apart, and the largest `measured / predicted`.
- `max sum var`: the largest variance (whole tensor) of a residual sum's
  output (`transformer_models.Sums`): the `Add` outputs of the functional
  stacks (read by `graph_init`'s probe model), and inside KerasHub's blocks
  the input of the norms that read the sums and the block outputs (read by
  wrapping those layers' `call` for one eager pass).
- `logits var`: variance of the model's output.
- `init s`: the init's call on this model (not its first in the process).

Cost table, per model, side by side in one process that has run every init
once on a tiny model first: the first call of a compiled forward
(`lsuv_speed.compiled_forward`: `tf.function` or `jax.jit`) of a fresh model
built like the measured one, `lsuv_init`'s first call on another fresh one
and `signal_report`'s (gradients included, as by default) on a third; the
ratios are over the forward's first call (both trace).

Training table (`nonorm24`, `nonorm96`): each init on each seed (the model
built with that seed, the inits seeded with it, LSUV on a batch of 64 task
inputs) trains on sequence reversal (16 tokens, vocabulary 16) with Adam
1e-3, no warmup, batches of 32 for `--steps` steps (`train_on_batch`, the
loss of each step); `acc` is per-token test accuracy on 1024 new sequences
(chance 1/16), `step<0.1` the first step (1-based) whose loss is below 0.1,
`max/start` the largest loss after step 10 over the first step's loss; a
spike is a ratio above 1.

Then, per model, where `mean_field` or `lsuv_residual` is not ahead of every
other init: on `max sum var` (log-distance to [1, 3]), on `logits var` (to 1)
and in training (the smallest test accuracy over the seeds); and issue 19's
targets, met or not, each beside the figure measured.

Usage:

    python benchmarks/transformers.py                          # everything, TensorFlow (*)
    python benchmarks/transformers.py --models gpt2 nonorm24 --no-train
    python benchmarks/transformers.py --models nonorm24 --seeds 0 --steps 400
    python benchmarks/transformers.py --backend jax            # transformers_jax.json

(*) Measured on 2 shared cores (load 4-7), TensorFlow: the init and cost
tables take about 25 min (`nonorm96` alone 15, anyinit's and LSUV's calls on
it about 1.5 min each); a 400-step run of `nonorm24` 2-3 min, so its 15 runs
about 40 min; a 50-step run of `nonorm96` 3.3 min (its first step traces the
96 blocks), so its 15 runs of 400 steps roughly 2-2.5 hours. `--models
nonorm96` in a process of its own lets the rest finish first.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import transformer_models  # noqa: E402  (benchmarks/ is the script's folder, so on sys.path)
from graph_init import _anyinit, _error, _score, _sum_variances, _warm_up_process  # noqa: E402
from lsuv_speed import compiled_forward  # noqa: E402

import keras_goodinit as kg  # noqa: E402

BATCH = 32
TASK_INIT_BATCH, TEST_SEQUENCES, TRAIN_BATCH = 64, 1024, 32
INITS = ("default", "mean_field", "lsuv_residual", "lsuv", "anyinit")
OURS = ("mean_field", "lsuv_residual")
RULE_STATUSES = ("ok", "missed", "max_iter", "drift")
COST_TARGET_MODELS = ("nonorm24", "gpt2")  # issue 19's cost targets name these two
SPIKE_AFTER = 10  # steps: Adam's first steps are not what "a spike" means


def initialize(method: str, model: keras.Model, x, seed: int = 0):
    """Applies init `method` to `model`; returns its report (None for default and anyinit).

    (graph_init's `_run_method` drops the reports and takes no seed.)
    """
    if method == "default":
        return None
    if method == "mean_field":
        return kg.mean_field_init(model, seed=seed, verbose=0)
    if method in ("lsuv_residual", "lsuv"):
        return kg.lsuv_init(model, x, residual="scaled" if method == "lsuv_residual" else None,
                            seed=seed, verbose=0)
    anyinit = _anyinit()
    if anyinit is None:
        raise ImportError("anyinit is not installed (pip install anyinit)")
    anyinit.initialize(model, mode="analytic", seed=seed)
    return None


# --- held-out measurements -------------------------------------------------------------


def _numpy(value) -> np.ndarray:
    return keras.ops.convert_to_numpy(value).astype("float64")


def _first(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


def _hooked_pass(model: keras.Model, x, sums: transformer_models.Sums):
    """One eager inference pass; returns (output, variances of the sums read at layers)."""
    captured, originals = [], []

    def wrap(layer, read_input: bool):
        original = layer.call

        def call(*args, **kwargs):
            out = original(*args, **kwargs)
            captured.append(np.var(_numpy(_first(args, kwargs) if read_input else out)))
            return out

        originals.append(layer)
        layer.call = call  # an instance attribute: Layer.__call__ looks `call` up on self

    try:
        for layer in sums.inputs_of:
            wrap(layer, True)
        for layer in sums.outputs_of:
            wrap(layer, False)
        output = model(x, training=False)
    finally:
        for layer in originals:
            del layer.call
    return _numpy(output), [float(v) for v in captured]


def held_out(spec: transformer_models.Spec, model: keras.Model, held) -> dict:
    """Logits variance and the largest residual-sum variance on the held-out batch."""
    sums = spec.sums(model)
    output, variances = _hooked_pass(model, held, sums)
    if sums.tensors:
        variances.append(_sum_variances(model, sums.tensors, held, False))
    return {"logits_var": float(output.var()),
            "max_sum_var": max(variances) if variances else math.nan,
            "sums_read": len(sums.tensors) + len(sums.inputs_of) + len(sums.outputs_of)}


def coverage(report, kernels: list[tuple[str, str]]) -> dict:
    """How the block kernels fare in `report`: counts per status and the first reasons.

    A kernel's row is the one whose path ends in the kernel's name and has a
    part that is the block's name or starts with it and `_` (`block3_attention/query`);
    where the report names rows by the layer's name alone (lsuv_init's), the
    next row of that name not yet taken (the counts per status are then right
    as long as only block kernels bear that name).
    """
    counts: dict[str, int] = {}
    reasons: dict[str, str] = {}
    taken: set[int] = set()
    for block, name in kernels:
        named = [r for r in report.rows if r.name.rsplit("/", 1)[-1] == name]
        rows = [r for r in named if any(part == block or part.startswith(block + "_")
                                        for part in r.name.split("/"))]
        rows = rows or [r for r in named if "/" not in r.name and id(r) not in taken][:1]
        taken.update(id(r) for r in rows)
        status = rows[0].status if rows else "no row"
        group = "rule" if status in RULE_STATUSES else status
        counts[group] = counts.get(group, 0) + 1
        if group != "rule" and group not in reasons:
            reasons[group] = (rows[0].reason if rows else f"{block}/{name}")[:200]
    return {"kernels": len(kernels), "rows": counts, "reasons": reasons}


def prediction_check(model: keras.Model, held) -> dict:
    """`mean_field_init(data=held)`'s verdict: rows whose measurement agrees with its prediction."""
    report = kg.mean_field_init(model, seed=0, data=held, verbose=0)
    predicted = [r for r in report.rows if math.isfinite(r.predicted)]
    ratios = [r.measured / r.predicted for r in predicted
              if math.isfinite(r.measured) and r.predicted > 0]
    missed = [r for r in report.rows if r.status == "missed"]
    return {"pred_rows": len(report.rows), "pred_predicted": len(predicted),
            "pred_ok": sum(r.status == "ok" for r in report.rows), "pred_missed": len(missed),
            "pred_worst_ratio": max(ratios, key=lambda v: abs(math.log(v)) if v > 0 else math.inf)
            if ratios else math.nan,
            "pred_first_miss": f"{missed[0].name}: {missed[0].reason}"[:200] if missed else ""}


def measure(name: str, methods=INITS) -> list[dict]:
    """One row per init of `methods` on model `name`; a failure is a row, not a raise."""
    spec = transformer_models.MODELS[name]
    try:
        model = spec.build(0)
        rng = np.random.default_rng(0)
        x, held = spec.inputs(rng, BATCH), spec.inputs(rng, BATCH)
        model(x, training=False)
        start = model.get_weights()
        kernels = transformer_models.block_kernels(spec, model)
    except Exception as error:  # noqa: BLE001 (one model's failure is a row of the table)
        return [{"model": name, "init": "build", "skipped": f"raised {_error(error)}"}]
    rows = []
    for method in methods:
        print(f"  {method} ...", flush=True)
        row = {"model": name, "init": method, "skipped": "", "block_kernels": len(kernels)}
        rows.append(row)
        model.set_weights(start)
        try:
            t0 = time.perf_counter()
            report = initialize(method, model, x)
            row["init_s"] = time.perf_counter() - t0
        except Exception as error:  # noqa: BLE001
            row["skipped"] = f"raised {_error(error)}"
            continue
        if report is not None:
            row["coverage"] = coverage(report, kernels)
            row["notes"] = [note[:300] for note in report.notes]
        try:
            row.update(held_out(spec, model, held))
            if method == "mean_field":
                row.update(prediction_check(model, held))
        except Exception as error:  # noqa: BLE001
            row["skipped"] = f"measuring raised {_error(error)}"
    return rows


def cost(name: str) -> dict:
    """First calls on fresh identical models: compiled forward, lsuv_init, signal_report."""
    spec = transformer_models.MODELS[name]
    row = {"model": name}
    x = spec.inputs(np.random.default_rng(0), BATCH)
    steps = (("forward_s", lambda m: compiled_forward(m)(x)),
             ("lsuv_s", lambda m: kg.lsuv_init(m, x, verbose=0)),
             ("signal_s", lambda m: kg.signal_report(m, x)))
    for key, call in steps:
        try:
            model = spec.build(0)
            t0 = time.perf_counter()
            call(model)
            row[key] = time.perf_counter() - t0
        except Exception as error:  # noqa: BLE001
            row[key] = math.nan
            row[key.replace("_s", "_error")] = _error(error)
    forward = row["forward_s"]
    row["lsuv_ratio"] = row["lsuv_s"] / forward
    row["signal_ratio"] = row["signal_s"] / forward
    return row


# --- training --------------------------------------------------------------------------


def train(name: str, method: str, seed: int, steps: int) -> dict:
    """One run of sequence reversal from init `method` on seed `seed`."""
    spec = transformer_models.MODELS[name]
    row = {"model": name, "init": method, "seed": seed, "skipped": ""}
    try:
        model = spec.build(seed)
        data = np.random.default_rng(1000 + seed)
        initialize(method, model, transformer_models.reversal_batch(data, TASK_INIT_BATCH)[0],
                   seed)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        losses = []
        t0 = time.perf_counter()
        for _ in range(steps):
            losses.append(float(model.train_on_batch(
                *transformer_models.reversal_batch(data, TRAIN_BATCH))))
        row["train_s"] = time.perf_counter() - t0
        x, y = transformer_models.reversal_batch(np.random.default_rng(5000 + seed),
                                                 TEST_SEQUENCES)
        predicted = np.argmax(_numpy(model.predict(x, batch_size=256, verbose=0)), axis=-1)
    except Exception as error:  # noqa: BLE001
        row["skipped"] = f"raised {_error(error)}"
        return row
    below = [i + 1 for i, loss in enumerate(losses) if loss < 0.1]
    later = losses[SPIKE_AFTER:]
    # A loss that is not finite counts as the largest: max() would skip NaN or not by order.
    finite = all(math.isfinite(v) for v in later)
    row.update(accuracy=float(np.mean(predicted == y)), first_below=below[0] if below else None,
               start_loss=losses[0], max_later_loss=max(later) if finite else math.inf,
               final_loss=losses[-1], diverged=not finite,
               losses=[round(v, 4) for v in losses])
    row["spike_ratio"] = row["max_later_loss"] / row["start_loss"]
    return row


# --- tables and targets ----------------------------------------------------------------


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return format(value, spec)


def _rows_cell(row: dict) -> str:
    cov = row.get("coverage")
    if cov is None:
        return "-"
    counts = cov["rows"]
    others = ", ".join(f"{n} {s}" for s, n in counts.items() if s != "rule")
    return f"{counts.get('rule', 0)}/{cov['kernels']}" + (f" ({others})" if others else "")


def _pred_cell(row: dict) -> str:
    if "pred_rows" not in row:
        return ""
    return (f"{row['pred_ok']}/{row['pred_rows']} ok, {row['pred_missed']} missed, "
            f"worst {_fmt(row['pred_worst_ratio'])}x")


def init_table(rows: list[dict]) -> str:
    lines = ["| model | init | rows (block kernels) | pred (mean_field data=) | max sum var "
             "| logits var | init s |", "|---|---|---|---|---:|---:|---:|"]
    for row in rows:
        if row["skipped"]:
            lines.append(f"| {row['model']} | {row['init']} | {row['skipped']} | | | | |")
            continue
        lines.append(f"| {row['model']} | {row['init']} | {_rows_cell(row)} | {_pred_cell(row)} "
                     f"| {_fmt(row['max_sum_var'])} | {_fmt(row['logits_var'])} "
                     f"| {_fmt(row['init_s'], '.2f')} |")
    notes = [f"  {row['model']} {row['init']}: {group}: {why}"
             for row in rows if row.get("coverage")
             for group, why in row["coverage"]["reasons"].items()]
    notes += [f"  {row['model']} mean_field data=: first miss {row['pred_first_miss']}"
              for row in rows if row.get("pred_first_miss")]
    return "\n".join(lines + (["notes (first reason per group):", *notes] if notes else []))


def cost_table(rows: list[dict]) -> str:
    lines = ["| model | forward 1st s | lsuv_init 1st s | ratio | signal_report 1st s | ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['model']} | {_fmt(row['forward_s'], '.2f')} "
                     f"| {_fmt(row['lsuv_s'], '.2f')} | {_fmt(row['lsuv_ratio'])} "
                     f"| {_fmt(row['signal_s'], '.2f')} | {_fmt(row['signal_ratio'])} |")
    errors = [f"  {row['model']}: {k}: {v}" for row in rows for k, v in row.items()
              if k.endswith("_error")]
    return "\n".join(lines + errors)


def _summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if not r["skipped"]]
    if not ok:
        return {"skipped": runs[0]["skipped"] if runs else "not run"}
    below = [r["first_below"] for r in ok]
    return {"skipped": "", "seeds": len(ok), "acc_min": min(r["accuracy"] for r in ok),
            "acc_max": max(r["accuracy"] for r in ok),
            "first_below": below, "spike_max": max(r["spike_ratio"] for r in ok),
            "spikes": sum(not r["spike_ratio"] <= 1 for r in ok),
            "train_s": sum(r["train_s"] for r in ok)}


def train_table(runs: list[dict]) -> str:
    lines = ["| model | init | seeds | test acc (min-max) | step<0.1 per seed "
             "| max/start loss (spikes) | train s |", "|---|---|---:|---|---|---|---:|"]
    for model in dict.fromkeys(r["model"] for r in runs):
        for method in dict.fromkeys(r["init"] for r in runs):
            s = _summary([r for r in runs if r["model"] == model and r["init"] == method])
            if s["skipped"]:
                lines.append(f"| {model} | {method} | 0 | {s['skipped']} | | | |")
                continue
            below = ", ".join("never" if b is None else str(b) for b in s["first_below"])
            lines.append(f"| {model} | {method} | {s['seeds']} | {s['acc_min']:.3f}-"
                         f"{s['acc_max']:.3f} | {below} | {s['spike_max']:.3g} ({s['spikes']}) "
                         f"| {s['train_s']:.0f} |")
    return "\n".join(lines)


def _find(rows: list[dict], model: str, method: str) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["init"] == method), None)


def targets(rows: list[dict], costs: list[dict], runs: list[dict]) -> list[tuple]:
    """(target, met, measured figure) for every issue-19 target the run allows judging."""
    checks = []

    def check(name, row, key, test, fmt=_fmt):
        if row is None or row.get("skipped") or key not in row:
            checks.append((name, False, (row or {}).get("skipped") or "not measured"))
        else:
            checks.append((name, bool(test(row[key])), fmt(row[key])))

    for model in dict.fromkeys(r["model"] for r in rows):
        for method in OURS:
            row = _find(rows, model, method)
            if row is None:  # not asked for (--inits)
                continue
            if not row["skipped"] and "coverage" in row:
                cov = row["coverage"]
                full = cov["rows"].get("rule", 0) == cov["kernels"]
                checks.append((f"{model}: every block kernel has a row after {method}", full,
                               _rows_cell(row)))
            else:
                checks.append((f"{model}: every block kernel has a row after {method}", False,
                               row["skipped"] or "no report"))
            check(f"{model}: max residual-sum var <= 3 after {method}", row, "max_sum_var",
                  lambda v: v <= 3)
            check(f"{model}: logits var in [0.5, 2] after {method}", row, "logits_var",
                  lambda v: 0.5 <= v <= 2)
        row = _find(rows, model, "mean_field")
        if row is not None and "pred_rows" in row:
            checks.append((f"{model}: every row's measured moment within its prediction",
                           row["pred_ok"] == row["pred_rows"], _pred_cell(row)))
    for row in costs:
        if row["model"] in COST_TARGET_MODELS:
            check(f"{row['model']}: lsuv_init 1st call <= 3x compiled forward 1st call", row,
                  "lsuv_ratio", lambda v: v <= 3)
            check(f"{row['model']}: signal_report 1st call <= 5x compiled forward 1st call", row,
                  "signal_ratio", lambda v: v <= 5)
    for model in dict.fromkeys(r["model"] for r in runs):
        group = {m: _summary([r for r in runs if r["model"] == model and r["init"] == m])
                 for m in dict.fromkeys(r["init"] for r in runs)}
        for method in OURS:
            s = group.get(method)
            if s is None:
                continue
            if s["skipped"]:
                checks.append((f"{model}: {method} learns (acc >= 0.9, no spike)", False,
                               s["skipped"]))
                continue
            checks.append((f"{model}: {method} learns (acc >= 0.9 on {s['seeds']} seeds, no "
                           "spike above the starting loss)",
                           s["acc_min"] >= 0.9 and s["spikes"] == 0,
                           f"acc {s['acc_min']:.3f}-{s['acc_max']:.3f}, max/start "
                           f"{s['spike_max']:.3g}"))
        s = group.get("default")
        if s is not None and not s["skipped"]:
            checks.append((f"{model}: Keras default does not learn (acc < 0.9)",
                           s["acc_max"] < 0.9, f"acc {s['acc_min']:.3f}-{s['acc_max']:.3f}"))
    return checks


def _stream_score(row: dict, key: str, goal) -> float:
    """Log-distance of the largest sum variance to [1, 3]: a stream that neither fades
    below the unit scale it starts at nor passes the target's 3 (lower is not better here:
    KerasHub's default embeddings start the stream near 0)."""
    value = row[key]
    if not (math.isfinite(value) and value > 0):
        return math.inf
    return max(0.0, math.log(1 / value), math.log(value / 3))


def init_not_ahead(rows: list[dict]) -> list[str]:
    """Per model: where an init of ours is not ahead of every other on a held-out column."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        group = {r["init"]: r for r in rows if r["model"] == model and not r["skipped"]}
        for label, key, score in (("max sum var (distance to [1, 3])", "max_sum_var",
                                   _stream_score),
                                  ("logits var", "logits_var", _score)):
            theirs = [m for m in group if m not in OURS and math.isfinite(group[m][key])]
            if not theirs:
                continue
            best = min(theirs, key=lambda m: score(group[m], key, 1.0))
            for method in (m for m in OURS if m in group):
                if score(group[method], key, 1.0) > score(group[best], key, 1.0):
                    lines.append(f"NOT AHEAD: {model}, {label}: {method} "
                                 f"{group[method][key]:.4g} vs {best} {group[best][key]:.4g}")
    return lines


def not_ahead(runs: list[dict]) -> list[str]:
    """Where an init of ours trains no better than anyinit or plain LSUV (min accuracy)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in runs):
        group = {m: _summary([r for r in runs if r["model"] == model and r["init"] == m])
                 for m in dict.fromkeys(r["init"] for r in runs)}
        theirs = {m: s for m, s in group.items() if m not in OURS and not s["skipped"]}
        for method in OURS:
            ours = group.get(method)
            if ours is None or ours["skipped"]:
                continue
            for other, s in theirs.items():
                if s["acc_min"] >= ours["acc_min"]:
                    lines.append(f"NOT AHEAD: {model}: {method} min acc {ours['acc_min']:.3f} "
                                 f"vs {other} {s['acc_min']:.3f}")
    return lines


# --- command line ----------------------------------------------------------------------


def _names(values: list[str], known, flag: str, parser) -> list[str]:
    names = [n.strip() for value in values for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"{flag} takes names from {', '.join(known)}. Received: {unknown or names}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(transformer_models.MODELS),
                        help="Names, space- or comma-separated (default: every model).")
    parser.add_argument("--inits", nargs="+", default=list(INITS),
                        help=f"Inits, from {', '.join(INITS)} (default: all).")
    parser.add_argument("--seeds", type=int, default=3, help="Training seeds (0..seeds-1).")
    parser.add_argument("--steps", type=int, default=400, help="Training steps per run.")
    parser.add_argument("--no-train", action="store_true", help="Skip the training table.")
    parser.add_argument("--no-cost", action="store_true", help="Skip the cost table.")
    parser.add_argument("--backend", choices=("tensorflow", "jax"), default=None,
                        help="Run on this Keras backend (a fresh process where it is not "
                             "the current one).")
    parser.add_argument("--json", default=None,
                        help="Where to write the rows (default: benchmarks/results/"
                             "transformers.json, or transformers_jax.json on JAX).")
    parser.add_argument("--note", default="", help="Stored in the JSON (what code was run).")
    args = parser.parse_args()
    names = _names(args.models, transformer_models.MODELS, "--models", parser)
    methods = _names(args.inits, INITS, "--inits", parser)
    if args.seeds < 1 or args.steps <= SPIKE_AFTER:
        parser.error(f"--seeds must be >= 1 and --steps > {SPIKE_AFTER}. "
                     f"Received: seeds={args.seeds}, steps={args.steps}")
    if args.backend and args.backend != keras.backend.backend():
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
        env = {**os.environ, "KERAS_BACKEND": args.backend}
        sys.exit(subprocess.run(command, env=env).returncode)

    from _results import Recorder

    recorder = Recorder("transformers")
    backend = keras.backend.backend()
    print(f"backend: {backend}", flush=True)
    _warm_up_process()
    rows, costs, runs = [], [], []
    for name in names:
        print(f"measuring {name} ...", flush=True)
        rows.extend(measure(name, methods))
        if not args.no_cost:
            costs.append(cost(name))
    if not args.no_train:
        for name in (n for n in names if n in transformer_models.TRAINED):
            for method in methods:
                for seed in range(args.seeds):
                    print(f"training {name} {method} seed {seed} ...", flush=True)
                    runs.append(train(name, method, seed, args.steps))
    print()
    print(init_table(rows))
    # Both sides run, or there is nothing to compare.
    others = set(methods) - set(OURS) and set(methods) & set(OURS)
    lines = init_not_ahead(rows)
    print("\n".join(lines) if lines else "Ours is ahead on both held-out columns of every model."
          if others else "No other init run to compare with.")
    if costs:
        print()
        print(cost_table(costs))
    if runs:
        print()
        print(train_table(runs))
        lines = not_ahead(runs)
        print("\n".join(lines) if lines else "Ours is ahead of every other init in training."
              if others else "No other init trained to compare with.")
    checks = targets(rows, costs, runs)
    print("\ntargets (issue 19):")
    for name, met, value in checks:
        print(f"{'met    ' if met else 'NOT MET'}  {name}: {value}")
    default = "transformers.json" if backend == "tensorflow" else f"transformers_{backend}.json"
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     default)
    recorder.write(path, rows, backend=backend, note=args.note, costs=costs, training=runs,
                   checks=[{"name": n, "passed": p, "value": v} for n, p, v in checks])


if __name__ == "__main__":
    main()
