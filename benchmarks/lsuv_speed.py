"""How long `lsuv_init` takes, next to one forward pass and to the naive sub-model loop.

For CIFAR ResNet-20, -56 and -110 (`wn_resnet(..., init="he", weight_norm=False,
batch_norm=False)`) on one batch of 128 32x32x3 images, each measurement in a
fresh process so that `lsuv_init` pays its tracing with cold `tf.function`
caches (3 processes per depth by default; the table shows their medians, since
a shared CPU makes single timings noisy):

- forward: one compiled inference pass, `tf.function(lambda x: model(x, training=False))`,
  warmed up, median of 5;
- lsuv: the first `lsuv_init(model, x)` call of the process, tracing included
  (default arguments; `verbose=0` only silences the progress bar);
- naive: what many LSUV implementations do: for every kernel layer in execution
  order, `keras.Model(model.input, layer.output)`, `predict` on the batch, divide
  the kernel by sqrt(var), predict again, until |var - 1| < 0.1 or 10 trials.

Targets: lsuv/forward <= 3 at ResNet-56 and roughly flat in depth (the largest
ratio at most twice the smallest); naive/lsuv >= 10 at ResNet-110; and those of
issue 9: the second (warm) lsuv call <= 2 warm compiled forwards, naive/lsuv >= 50
at ResNet-110. The first call against a first compiled forward, each in its own
fresh process, and the other models, methods and the pre-init alone are in
`benchmarks/zoo.py`. The script prints PASS/FAIL per target and exits 0 either
way.

`--backend jax|torch|tensorflow` (default tensorflow) runs every process on
that Keras backend. The compiled forward is then `jax.jit` of the model's
`stateless_call` on JAX and the eager forward on torch; `lsuv_init` runs its
`jax.jit` sweep on JAX and its eager sweep on torch. `--torch-compile` (torch
only) also times `torch.compile` of the forward, first call and warm, and
how many eager forwards its compilation costs: what a compiled sweep would
have to win back.

Usage:

    python benchmarks/lsuv_speed.py               # all depths, fresh subprocesses
    python benchmarks/lsuv_speed.py --processes 1 # one process per depth (faster)
    python benchmarks/lsuv_speed.py --depth 56    # one depth, prints one JSON line
    python benchmarks/lsuv_speed.py --backend jax --processes 1 --no-naive
    python benchmarks/lsuv_speed.py --backend torch --processes 1 --no-naive --torch-compile
    python benchmarks/lsuv_speed.py --processes 1 --no-naive \
        --json benchmarks/results/lsuv_speed_tensorflow.json  # for docs/gen_measurements.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEPTHS = (20, 56, 110)
BATCH = 128


def compiled_forward(model):
    """The backend's compiled inference pass of `model`, returning NumPy."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        forward = tf.function(lambda inputs: model(inputs, training=False))
        return lambda x: forward(x).numpy()
    if backend == "jax":
        import jax

        @jax.jit
        def forward(trainable, non_trainable, x):
            return model.stateless_call(trainable, non_trainable, x, training=False)[0]

        def call(x):
            trainable = [v.value for v in model.trainable_variables]
            non_trainable = [v.value for v in model.non_trainable_variables]
            return keras.ops.convert_to_numpy(forward(trainable, non_trainable, x))
        return call
    return lambda x: keras.ops.convert_to_numpy(model(x, training=False))


def measure(depth: int, naive: bool = True, torch_compile: bool = False) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from keras_goodinit import lsuv_init
    from keras_goodinit.models import wn_resnet

    keras.utils.set_random_seed(0)
    model = wn_resnet((32, 32, 3), 10, num_blocks=(depth - 2) // 6, init="he",
                      weight_norm=False, batch_norm=False, seed=0)
    x = np.random.default_rng(0).normal(size=(BATCH, 32, 32, 3)).astype("float32")
    start = model.get_weights()

    # lsuv_init first, while every tf.function cache in the process is cold.
    t0 = time.perf_counter()
    report = lsuv_init(model, x, verbose=0)
    lsuv_s = time.perf_counter() - t0
    model.set_weights(start)
    t0 = time.perf_counter()
    lsuv_init(model, x, verbose=0)
    lsuv_warm_s = time.perf_counter() - t0

    def median_time(fn, repeats=5):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    forward = compiled_forward(model)
    t0 = time.perf_counter()
    forward(x)
    forward_first_s = time.perf_counter() - t0  # tracing included, for context
    forward(x)
    forward_s = median_time(lambda: forward(x))
    eager_s = median_time(lambda: keras.ops.convert_to_numpy(model(x, training=False)),
                          repeats=3)

    result = {"depth": depth, "backend": keras.backend.backend(), "mode": report.mode,
              "targets": len(report.rows), "lsuv_ok": report.ok,
              "forward_s": forward_s, "forward_first_s": forward_first_s, "eager_s": eager_s,
              "lsuv_s": lsuv_s, "lsuv_warm_s": lsuv_warm_s}
    if torch_compile:
        import torch

        compiled = torch.compile(lambda inputs: model(inputs, training=False))
        inputs = keras.ops.convert_to_tensor(x)
        with torch.no_grad():
            t0 = time.perf_counter()
            compiled(inputs)
            result["torch_compile_first_s"] = time.perf_counter() - t0
            result["torch_compile_s"] = median_time(lambda: compiled(inputs).cpu().numpy())
    if not naive:
        return result

    model.set_weights(start)
    kernels = [layer for layer in model.layers
               if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
    t0 = time.perf_counter()
    predictions = 0
    for layer in kernels:  # functional models list their layers in execution order
        sub = keras.Model(model.input, layer.output)
        var = float(np.var(sub.predict(x, batch_size=BATCH, verbose=0)))
        predictions += 1
        trials = 0
        while abs(var - 1.0) >= 0.1 and trials < 10:
            layer.kernel.assign(layer.kernel / np.sqrt(var))
            var = float(np.var(sub.predict(x, batch_size=BATCH, verbose=0)))
            predictions += 1
            trials += 1
    naive_s = time.perf_counter() - t0
    return {**result, "naive_s": naive_s, "naive_predictions": predictions}


def _child(depth: int, naive: bool, backend: str, torch_compile: bool) -> dict | None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": backend}
    command = ([sys.executable, __file__, "--depth", str(depth), "--backend", backend]
               + ([] if naive else ["--no-naive"])
               + (["--torch-compile"] if torch_compile else []))
    process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        print(f"ResNet-{depth} failed:\n{process.stdout[-2000:]}\n{process.stderr[-2000:]}")
        return None
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, choices=DEPTHS)
    parser.add_argument("--no-naive", action="store_true", help="skip the naive loop")
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"),
                        default="tensorflow", help="the Keras backend of every process")
    parser.add_argument("--processes", type=int, default=3,
                        help="fresh processes per depth; times are their medians (the "
                             "naive loop, 10-100x slower, runs in the first one only)")
    parser.add_argument("--torch-compile", action="store_true",
                        help="torch only: also time torch.compile of the forward")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the rows, machine and load as JSON (benchmarks/"
                             "results/ feeds docs/gen_measurements.py)")
    args = parser.parse_args()
    if args.torch_compile and args.backend != "torch":
        parser.error(f"--torch-compile needs --backend torch. Received: --backend "
                     f"{args.backend}")
    if args.depth:
        os.environ["KERAS_BACKEND"] = args.backend  # before keras is imported
        print("RESULT " + json.dumps(measure(args.depth, naive=not args.no_naive,
                                             torch_compile=args.torch_compile)), flush=True)
        return

    import statistics

    from _results import Recorder

    recorder = Recorder("lsuv_speed")
    rows = []
    for depth in DEPTHS:
        runs = [_child(depth, naive=i == 0 and not args.no_naive, backend=args.backend,
                       torch_compile=args.torch_compile) for i in range(args.processes)]
        runs = [r for r in runs if r is not None]
        if not runs:
            continue
        row = dict(runs[0])
        for key in ("forward_s", "forward_first_s", "eager_s", "lsuv_s", "lsuv_warm_s",
                    "torch_compile_first_s", "torch_compile_s"):
            if key in row:
                row[key] = statistics.median(r[key] for r in runs)
        row["lsuv_ok"] = all(r["lsuv_ok"] for r in runs)
        rows.append(row)

    print(f"backend: {args.backend}; lsuv_init mode: "
          f"{', '.join(sorted({r['mode'] for r in rows}))}")
    header = (f"{'depth':>5}  {'forward s':>9}  {'lsuv s':>7}  {'lsuv/forward':>12}  "
              f"{'naive s':>8}  {'naive/forward':>13}  {'naive/lsuv':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        naive = (f"{r['naive_s']:>8.1f}  {r['naive_s'] / r['forward_s']:>13.0f}  "
                 f"{r['naive_s'] / r['lsuv_s']:>10.1f}" if "naive_s" in r
                 else f"{'-':>8}  {'-':>13}  {'-':>10}")
        print(f"{r['depth']:>5}  {r['forward_s']:>9.3f}  {r['lsuv_s']:>7.2f}  "
              f"{r['lsuv_s'] / r['forward_s']:>12.1f}  {naive}")
    print()
    for r in rows:
        print(f"ResNet-{r['depth']}: {r['targets']} target layers (all ok: {r['lsuv_ok']}); "
              f"lsuv warm (2nd call) {r['lsuv_warm_s']:.2f} s "
              f"= {r['lsuv_warm_s'] / r['forward_s']:.1f} forward"
              + (f"; naive ran {r['naive_predictions']} predicts" if "naive_s" in r else ""))
        print(f"    context: compiled forward's first call (tracing) {r['forward_first_s']:.2f} s "
              f"= {r['forward_first_s'] / r['forward_s']:.1f} forward; one eager forward "
              f"{r['eager_s']:.3f} s = {r['eager_s'] / r['forward_s']:.1f} forward")
        if "torch_compile_s" in r:
            saved = r["eager_s"] - r["torch_compile_s"]
            print(f"    torch.compile forward: first call {r['torch_compile_first_s']:.1f} s "
                  f"= {r['torch_compile_first_s'] / r['lsuv_s']:.0f} first lsuv_init calls; "
                  f"warm {r['torch_compile_s']:.3f} s = "
                  f"{r['torch_compile_s'] / r['eager_s']:.2f} eager forward; its compilation "
                  "is won back after "
                  + (f"{r['torch_compile_first_s'] / saved:.0f} forwards" if saved > 0
                     else "no number of forwards"))

    by_depth = {r["depth"]: r for r in rows}
    ratios = {d: r["lsuv_s"] / r["forward_s"] for d, r in by_depth.items()}
    checks = []
    if 56 in ratios:
        checks.append(("lsuv/forward <= 3 at ResNet-56", ratios[56] <= 3,
                       f"{ratios[56]:.2f}"))
    if len(ratios) > 1:
        spread = max(ratios.values()) / min(ratios.values())
        checks.append(("lsuv/forward roughly flat in depth (max/min <= 2)", spread <= 2,
                       f"max/min = {spread:.2f}"))
    if 110 in by_depth and "naive_s" in by_depth[110]:
        r = by_depth[110]
        checks.append(("naive/lsuv >= 10 at ResNet-110", r["naive_s"] / r["lsuv_s"] >= 10,
                       f"{r['naive_s'] / r['lsuv_s']:.1f}"))
        checks.append(("naive/lsuv >= 50 at ResNet-110 (issue 9)",
                       r["naive_s"] / r["lsuv_s"] >= 50, f"{r['naive_s'] / r['lsuv_s']:.1f}"))
    for depth, r in by_depth.items():
        warm = r["lsuv_warm_s"] / r["forward_s"]
        checks.append((f"lsuv 2nd call <= 2 warm forwards at ResNet-{depth} (issue 9)",
                       warm <= 2, f"{warm:.1f}"))
    print()
    for name, passed, value in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {value}")
    if args.json:
        recorder.write(args.json, rows, backend=args.backend, processes=args.processes,
                       checks=[{"name": n, "passed": p, "value": v} for n, p, v in checks])


if __name__ == "__main__":
    main()
