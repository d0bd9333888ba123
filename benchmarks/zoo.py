"""`lsuv_init`, `weightnorm_data_init` and `signal_report` across a model zoo, next to a forward.

Models (batch 32, random inputs):

- CIFAR ResNet-20/56/110 (`wn_resnet(..., init="he", weight_norm=False,
  batch_norm=False)`, 32x32x3);
- keras.applications VGG16, ResNet50, MobileNetV2, EfficientNetB0
  (`weights=None`, 96x96x3, 10 classes);
- a hand-built transformer encoder (sequence 64, width 128, 2 blocks of
  `MultiHeadAttention` with 4 heads and a 256-wide ReLU MLP, mean pooling, 10
  logits).

Every measurement runs in a fresh process, so that whatever it times pays its
tracing with cold `tf.function` caches:

- forward: a compiled inference pass `tf.function(lambda x: model(x, training=False))`
  of a fresh model: its first call (tracing included) and the median of 5 warm calls;
- lsuv / wn / signal: the first and the second call (weights restored in
  between) of `lsuv_init(model, x)` (default arguments, orthogonal pre-init
  included), of `weightnorm_data_init` on a copy of the model with every
  Dense/Conv*/DepthwiseConv* wrapped in `WeightNormalization` (cloned with
  `keras.models.clone_model(..., clone_function=...)`, its forward measured the
  same way), and of `signal_report(model, x)` (forward and backward);
- pre-init: the orthogonal pre-init alone, as `lsuv_init` draws it (one
  batched `GoodInit.draw` per kernel shape), with the draw of this version
  (CholeskyQR2 for tall samples, a structured random orthogonal matrix for
  kernels whose QR would cost over 1e10 flops) and with the Householder QR of
  every sample that earlier versions ran, side by side in one process;
- naive (ResNet-110 only): for every kernel layer in execution order,
  `keras.Model(model.input, layer.output)`, predict, divide the kernel by
  sqrt(var), predict again, until |var - 1| < 0.1 or 10 trials.

Targets (issue 9): first call <= 1.5x a first compiled forward, second call <=
2x a warm compiled forward, naive/lsuv >= 50 at ResNet-110. The script prints a
table of ratios (medians over `--repeats` processes), PASS/FAIL per target,
and exits 0 either way.

Usage:

    python benchmarks/zoo.py                              # everything, 3 processes each
    python benchmarks/zoo.py --models resnet20 vgg16 --repeats 1
    python benchmarks/zoo.py --methods lsuv --no-naive    # quick
    python benchmarks/zoo.py --preinit-only               # the pre-init table alone
    python benchmarks/zoo.py --json benchmarks/results/zoo.json  # for docs/gen_measurements.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CIFAR = {"resnet20": 20, "resnet56": 56, "resnet110": 110}
APPLICATIONS = {"vgg16": "VGG16", "resnet50": "ResNet50", "mobilenetv2": "MobileNetV2",
                "efficientnetb0": "EfficientNetB0"}
MODELS = (*CIFAR, *APPLICATIONS, "transformer")
METHODS = ("lsuv", "wn", "signal")
BATCH = 32
IMAGE = 96


def build(name: str, weight_norm: bool = False):
    """The model `name` and a batch for it; wrapped in WeightNormalization if asked."""
    import keras
    import numpy as np

    from keras_goodinit.models import wn_resnet

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if name in CIFAR:
        model = wn_resnet((32, 32, 3), 10, num_blocks=(CIFAR[name] - 2) // 6, init="he",
                          weight_norm=False, batch_norm=False, seed=0)
        x = rng.normal(size=(BATCH, 32, 32, 3))
    elif name in APPLICATIONS:
        model = getattr(keras.applications, APPLICATIONS[name])(
            weights=None, input_shape=(IMAGE, IMAGE, 3), classes=10)
        x = rng.uniform(0, 255, size=(BATCH, IMAGE, IMAGE, 3))
    else:
        model = transformer_encoder()
        x = rng.normal(size=(BATCH, 64, 128))
    if weight_norm:
        model = wrap_weight_norm(model)
    return model, x.astype("float32")


def transformer_encoder(seq: int = 64, width: int = 128, heads: int = 4, mlp: int = 256,
                        blocks: int = 2, classes: int = 10):
    """A small pre-norm transformer encoder over (seq, width) embeddings."""
    import keras
    from keras import layers

    inputs = keras.Input((seq, width))
    h = inputs
    for i in range(blocks):
        a = layers.LayerNormalization(name=f"ln_att_{i}")(h)
        a = layers.MultiHeadAttention(heads, width // heads, name=f"attention_{i}")(a, a)
        h = layers.Add(name=f"add_att_{i}")([h, a])
        m = layers.LayerNormalization(name=f"ln_mlp_{i}")(h)
        m = layers.Dense(mlp, activation="relu", name=f"mlp_in_{i}")(m)
        m = layers.Dense(width, name=f"mlp_out_{i}")(m)
        h = layers.Add(name=f"add_mlp_{i}")([h, m])
    h = layers.GlobalAveragePooling1D()(layers.LayerNormalization(name="ln_out")(h))
    return keras.Model(inputs, layers.Dense(classes, name="logits")(h), name="encoder")


def wrap_weight_norm(model):
    """A copy of `model` with each layer WeightNormalization supports wrapped in it."""
    import keras

    from keras_goodinit import WeightNormalization

    supported = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D,
                 keras.layers.Conv3D, keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)

    def clone(layer):
        copy = layer.__class__.from_config(layer.get_config())
        # SeparableConv subclasses none of these; EinsumDense (inside attention) is not wrapped.
        if isinstance(layer, supported):
            return WeightNormalization(copy, name=f"wn_{layer.name}")
        return copy

    return keras.models.clone_model(model, clone_function=clone)


def _median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_forward(name: str, weight_norm: bool) -> dict:
    import tensorflow as tf

    model, x = build(name, weight_norm)
    forward = tf.function(lambda inputs: model(inputs, training=False))
    t0 = time.perf_counter()
    forward(x).numpy()
    first = time.perf_counter() - t0
    forward(x).numpy()
    return {"first_s": first, "warm_s": _median_time(lambda: forward(x).numpy())}


def measure_method(name: str, method: str) -> dict:
    from keras_goodinit import lsuv_init, signal_report, weightnorm_data_init

    model, x = build(name, weight_norm=method == "wn")
    model(x[:1], training=False)  # built, as a user's model is
    call = {"lsuv": lambda: lsuv_init(model, x, verbose=0),
            "wn": lambda: weightnorm_data_init(model, x, verbose=0),
            "signal": lambda: signal_report(model, x)}[method]
    start = model.get_weights()
    t0 = time.perf_counter()
    report = call()
    first = time.perf_counter() - t0
    model.set_weights(start)
    t0 = time.perf_counter()
    call()
    second = time.perf_counter() - t0
    ok = getattr(report, "ok", None)
    return {"first_s": first, "warm_s": second, "mode": getattr(report, "mode", "n/a"),
            "ok": ok if isinstance(ok, bool) else None, "rows": len(report.rows)}


def measure_preinit(name: str) -> dict:
    """The pre-init's draws with this version's factorization and with Householder QR only."""
    import tensorflow as tf
    from keras import ops

    from keras_goodinit import GoodInit, _data, initializers, lsuv

    model, x = build(name)
    model(x[:1], training=False)
    targets = lsuv._prepare(model, _data.replayable(x), None)[1]
    groups = {}
    for target in targets:
        if not target.is_lora:
            shape, layout, count, _ = lsuv._draw_plan(target)
            key = (shape, target.direction_variable.dtype, layout)
            groups[key] = groups.get(key, 0) + count

    def draw_all():
        for index, ((shape, dtype, layout), count) in enumerate(groups.items()):
            init = GoodInit("wn_relu_backward", gamma=1.0, layout=layout, seed=index)
            ops.convert_to_numpy(init.draw(shape, dtype, count=count)[:1, :1])

    householder = tf.function(initializers._householder, autograph=False)
    new, threshold = initializers._orthonormal, initializers._STRUCTURED_FLOPS
    t0 = time.perf_counter()
    draw_all()  # tracing included
    new_first = time.perf_counter() - t0
    new_warm = _median_time(draw_all, 2)
    # Earlier versions: Householder QR of every sample, the largest included.
    initializers._orthonormal, initializers._STRUCTURED_FLOPS = householder, float("inf")
    try:
        draw_all()
        old_warm = _median_time(draw_all, 2)
    finally:
        initializers._orthonormal, initializers._STRUCTURED_FLOPS = new, threshold
    forward = tf.function(lambda inputs: model(inputs, training=False))
    forward(x).numpy()
    return {"new_first_s": new_first, "new_s": new_warm, "householder_s": old_warm,
            "forward_s": _median_time(lambda: forward(x).numpy(), 3), "groups": len(groups),
            "kernels": sum(groups.values())}


def measure_naive(name: str) -> dict:
    import keras
    import numpy as np

    from keras_goodinit import lsuv_init

    model, x = build(name)
    start = model.get_weights()
    t0 = time.perf_counter()
    lsuv_init(model, x, verbose=0)
    lsuv_s = time.perf_counter() - t0
    model.set_weights(start)
    kernels = [layer for layer in model.layers
               if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
    t0 = time.perf_counter()
    for layer in kernels:  # functional models list their layers in execution order
        sub = keras.Model(model.input, layer.output)
        var = float(np.var(sub.predict(x, batch_size=BATCH, verbose=0)))
        trials = 0
        while abs(var - 1.0) >= 0.1 and trials < 10:
            layer.kernel.assign(layer.kernel / np.sqrt(var))
            var = float(np.var(sub.predict(x, batch_size=BATCH, verbose=0)))
            trials += 1
    return {"lsuv_s": lsuv_s, "naive_s": time.perf_counter() - t0}


def child(kind: str, name: str) -> dict:
    if kind in ("forward", "forward_wn"):
        return measure_forward(name, weight_norm=kind == "forward_wn")
    if kind == "preinit":
        return measure_preinit(name)
    if kind == "naive":
        return measure_naive(name)
    return measure_method(name, kind)


def _spawn(kind: str, name: str) -> dict | None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, __file__, "--child", kind, name]
    try:
        process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    except subprocess.TimeoutExpired:
        print(f"{name} {kind}: timed out", flush=True)
        return None
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        print(f"{name} {kind} failed:\n{process.stdout[-1500:]}\n{process.stderr[-1500:]}",
              flush=True)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def _median_of(kind: str, name: str, repeats: int) -> dict | None:
    runs = [r for r in (_spawn(kind, name) for _ in range(repeats)) if r is not None]
    if not runs:
        return None
    row = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            row[key] = statistics.median(r[key] for r in runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per figure")
    parser.add_argument("--no-naive", action="store_true", help="skip the ResNet-110 naive loop")
    parser.add_argument("--no-preinit", action="store_true", help="skip the pre-init table")
    parser.add_argument("--preinit-only", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="PATH",
                        help="also write the rows, machine and load as JSON (benchmarks/"
                             "results/ feeds docs/gen_measurements.py)")
    args = parser.parse_args()
    if args.child:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        print("RESULT " + json.dumps(child(*args.child)), flush=True)
        return

    from _results import Recorder

    recorder = Recorder("zoo")
    checks, rows, preinit, naive_row = [], [], [], None
    if not args.preinit_only:
        header = (f"{'model':<15}{'method':<8}{'mode':<10}{'fwd 1st s':>10}{'1st s':>9}"
                  f"{'1st/fwd':>9}{'fwd warm s':>11}{'2nd s':>8}{'2nd/warm':>9}  ok")
        print(header)
        print("-" * len(header), flush=True)
        for name in args.models:
            forwards = {}
            for method in args.methods:
                kind = "forward_wn" if method == "wn" else "forward"
                if kind not in forwards:
                    forwards[kind] = _median_of(kind, name, args.repeats)
                fwd, run = forwards[kind], _median_of(method, name, args.repeats)
                if fwd is None or run is None:
                    continue
                first, warm = run["first_s"] / fwd["first_s"], run["warm_s"] / fwd["warm_s"]
                print(f"{name:<15}{method:<8}{run['mode']:<10}{fwd['first_s']:>10.2f}"
                      f"{run['first_s']:>9.2f}{first:>9.2f}{fwd['warm_s']:>11.3f}"
                      f"{run['warm_s']:>8.2f}{warm:>9.2f}  {run['ok']}", flush=True)
                rows.append({"model": name, "method": method, "mode": run["mode"],
                             "ok": run["ok"], "forward_first_s": fwd["first_s"],
                             "first_s": run["first_s"], "forward_warm_s": fwd["warm_s"],
                             "warm_s": run["warm_s"]})
                checks.append((f"{name} {method}: first call <= 1.5x first compiled forward",
                               first <= 1.5, f"{first:.2f}"))
                checks.append((f"{name} {method}: second call <= 2x warm compiled forward",
                               warm <= 2.0, f"{warm:.2f}"))
        if not args.no_naive and "resnet110" in args.models and "lsuv" in args.methods:
            naive = _spawn("naive", "resnet110")
            if naive is not None:
                naive_row = naive
                ratio = naive["naive_s"] / naive["lsuv_s"]
                print(f"\nResNet-110 naive sub-model loop {naive['naive_s']:.1f} s, lsuv_init "
                      f"{naive['lsuv_s']:.2f} s (first call): naive/lsuv = {ratio:.1f}")
                checks.append(("naive/lsuv >= 50 at ResNet-110", ratio >= 50, f"{ratio:.1f}"))
    if not args.no_preinit:
        print(f"\n{'model':<15}{'kernels':>8}{'shapes':>7}{'fwd warm s':>11}{'householder s':>14}"
              f"{'now s':>8}{'now 1st s':>10}{'speedup':>8}{'now/fwd':>8}")
        for name in args.models:
            r = _spawn("preinit", name)
            if r is not None:
                preinit.append({"model": name, **r})
                print(f"{name:<15}{r['kernels']:>8}{r['groups']:>7}{r['forward_s']:>11.3f}"
                      f"{r['householder_s']:>14.2f}{r['new_s']:>8.2f}{r['new_first_s']:>10.2f}"
                      f"{r['householder_s'] / r['new_s']:>8.2f}"
                      f"{r['new_s'] / r['forward_s']:>8.2f}", flush=True)
    print()
    for label, passed, value in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {label}: {value}")
    if args.json:
        recorder.write(args.json, rows, repeats=args.repeats, preinit=preinit, naive=naive_row,
                       checks=[{"name": n, "passed": p, "value": v} for n, p, v in checks])


if __name__ == "__main__":
    main()
