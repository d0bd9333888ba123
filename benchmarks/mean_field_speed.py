"""How long data-free `mean_field_init` takes, next to anyinit's analytic init.

Issue 18's target: `mean_field_init(model, seed=0, verbose=0)` (no `data=`)
takes at most 1.5x `anyinit.initialize(model, mode="analytic", seed=0)` on the
same model and backend. For each model, in one process per backend:

- first: the first call on a freshly built model (graph building and any
  per-model cache included);
- warm: the second call on the same model (median of `--repeats` calls).

Before the models, both inits run once on a small model, so that what every
process pays once (imports, the backend's first ops) is charged to neither.
Models: keras.applications ResNet50V2, ConvNeXtTiny (no preprocessing),
DenseNet121, MobileNetV3Small (all `weights=None`, 32x32x3 inputs, 10 classes,
no classifier activation), a CIFAR ResNet-56 (`wn_resnet`, orthogonal init,
no weight norm) and a 50-layer tanh MLP of width 256.

Usage:

    python benchmarks/mean_field_speed.py                      # TF and JAX, one process each
    python benchmarks/mean_field_speed.py --backend jax --models mlp_tanh50
    python benchmarks/mean_field_speed.py --json benchmarks/results/mean_field_speed.json

The script prints the table and exits 0 whether the targets are met or not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = ("resnet50v2", "convnext_tiny", "densenet121", "mobilenetv3small", "resnet56",
          "mlp_tanh50")
BACKENDS = ("tensorflow", "jax")
TARGET = 1.5


def build(name: str):
    """A freshly built model of the benchmark."""
    import keras

    common = {"weights": None, "input_shape": (32, 32, 3), "classes": 10,
              "classifier_activation": None}
    apps = keras.applications
    if name == "resnet50v2":
        return apps.ResNet50V2(**common)
    if name == "convnext_tiny":
        return apps.ConvNeXtTiny(include_preprocessing=False, **common)
    if name == "densenet121":
        return apps.DenseNet121(**common)
    if name == "mobilenetv3small":
        return apps.MobileNetV3Small(**common)
    if name == "resnet56":
        from keras_goodinit.models import wn_resnet

        return wn_resnet((32, 32, 3), 10, 9, init="orthogonal", weight_norm=False, seed=0)
    if name == "mlp_tanh50":
        inputs = keras.Input((256,))
        h = inputs
        for _ in range(50):
            h = keras.layers.Dense(256, activation="tanh")(h)
        return keras.Model(inputs, h)
    raise ValueError(f"Unknown model. Received: name={name!r}")


def _inits():
    import anyinit

    from keras_goodinit import mean_field_init

    return {
        "mean_field": lambda model: mean_field_init(model, seed=0, verbose=0),
        "anyinit": lambda model: anyinit.initialize(model, mode="analytic", seed=0),
    }


def _seconds(call, model) -> float:
    start = time.perf_counter()
    call(model)
    return time.perf_counter() - start


def measure(names, repeats: int) -> list[dict]:
    """Rows of first/warm seconds of both inits on `names`, in this process's backend."""
    import keras

    inits = _inits()
    small = build("mlp_tanh50")
    for call in inits.values():  # process-wide first costs, charged to neither
        call(small)
    rows = []
    for name in names:
        row = {"backend": keras.backend.backend(), "model": name}
        for label, call in inits.items():
            model = build(name)
            row[f"{label}_first_s"] = _seconds(call, model)
            row[f"{label}_warm_s"] = statistics.median(
                _seconds(call, model) for _ in range(repeats))
            del model
            keras.backend.clear_session()
        row["ratio_first"] = row["mean_field_first_s"] / row["anyinit_first_s"]
        row["ratio_warm"] = row["mean_field_warm_s"] / row["anyinit_warm_s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'backend':<11}{'model':<18}{'mf first':>9}{'mf warm':>9}{'any first':>10}"
             f"{'any warm':>10}{'first x':>9}{'warm x':>8}  target <= {TARGET}x"]
    for r in rows:
        met = "PASS" if max(r["ratio_first"], r["ratio_warm"]) <= TARGET else "FAIL"
        lines.append(
            f"{r['backend']:<11}{r['model']:<18}{r['mean_field_first_s']:>9.2f}"
            f"{r['mean_field_warm_s']:>9.2f}{r['anyinit_first_s']:>10.2f}"
            f"{r['anyinit_warm_s']:>10.2f}{r['ratio_first']:>9.2f}{r['ratio_warm']:>8.2f}  {met}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, action="append",
                        help="a Keras backend (repeatable; default: tensorflow and jax)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=1,
                        help="warm calls per init and model; their median is shown")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one backend, in this process: one JSON row per line
        measure(args.models, args.repeats)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _results

    recorder = _results.Recorder("mean_field_speed")
    rows = []
    for backend in args.backend or BACKENDS:
        env = dict(os.environ, KERAS_BACKEND=backend)
        command = [sys.executable, os.path.abspath(__file__), "--child", "--repeats",
                   str(args.repeats), "--models", *args.models]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        found = [json.loads(line) for line in done.stdout.splitlines()
                 if line.startswith("{")]
        if done.returncode != 0:
            print(f"{backend} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        rows.extend(found)
    print(table(rows))
    if args.json:
        recorder.write(args.json, rows, target=TARGET)


if __name__ == "__main__":
    main()
