"""Train-step overhead of WeightNormalization: wrapped vs plain, measured side by side.

Builds each network twice from the same kernels, plain and with every hidden
layer wrapped in `WeightNormalization` (the classifier never is), compiles both
with the same optimizer and loss, warms them up, then times interleaved
repeats of `train_on_batch` and reports the median time per step of each and
the median of the per-round wrapped / plain ratios (each round times the two
models back to back, so the pairing cancels drifts in machine speed):

- a 20-layer ReLU MLP, width 512, batch 128;
- a CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels),
  32x32x3 inputs, batch 64.

Prints PASS or FAIL against the target ratio (1.25) and always exits 0.

Usage:

    python benchmarks/weightnorm_overhead.py [--repeats 21] [--steps 5] [--jit-compile auto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_goodinit import models  # noqa: E402

TARGET_RATIO = 1.25
NUM_CLASSES = 10


def _pair(name: str):
    """(plain, wrapped, input shape, batch size) for one benchmark network."""
    if name == "mlp":
        def build(weight_norm):
            return models.wn_mlp((512,), NUM_CLASSES, depth=20, width=512,
                                 weight_norm=weight_norm, seed=0)
        return build(False), build(True), (512,), 128
    def build(weight_norm):
        return models.wn_resnet((32, 32, 3), NUM_CLASSES, num_blocks=3, width=16,
                                weight_norm=weight_norm, seed=0)
    return build(False), build(True), (32, 32, 3), 64


def _time_steps(model: keras.Model, x, y, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(x, y)
    float(np.asarray(loss))  # the step has really finished
    return (time.perf_counter() - start) / steps


def measure(name: str, repeats: int, steps: int, jit_compile) -> tuple[float, float, float]:
    """Median seconds per train step of the plain and the wrapped network, median ratio."""
    plain, wrapped, input_shape, batch = _pair(name)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, *input_shape)).astype("float32"))
    y = tf.constant(rng.integers(0, NUM_CLASSES, size=(batch,)))
    for model in (plain, wrapped):
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit_compile)
        _time_steps(model, x, y, 3)  # trace, compile and warm up
    times = {id(plain): [], id(wrapped): []}
    for repeat in range(repeats):
        # Alternate which model goes first, so drifts in machine speed hit both alike.
        order = (plain, wrapped) if repeat % 2 == 0 else (wrapped, plain)
        for model in order:
            times[id(model)].append(_time_steps(model, x, y, steps))
    plain_times, wrapped_times = times[id(plain)], times[id(wrapped)]
    ratios = [w / p for p, w in zip(plain_times, wrapped_times, strict=True)]
    return (statistics.median(plain_times), statistics.median(wrapped_times),
            statistics.median(ratios))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="Interleaved timing rounds.")
    parser.add_argument("--steps", type=int, default=5, help="Train steps per round.")
    parser.add_argument("--jit-compile", choices=("auto", "true", "false"), default="auto",
                        help="XLA: Keras' default 'auto' means off on CPU, on with a GPU.")
    args = parser.parse_args(argv)
    jit_compile = {"auto": "auto", "true": True, "false": False}[args.jit_compile]
    if args.repeats < 1 or args.steps < 1:
        parser.error(f"--repeats and --steps must be positive. Received: {args.repeats}, "
                     f"{args.steps}")

    print(f"WeightNormalization overhead per train step (medians over {args.repeats} rounds of "
          f"{args.steps} steps, jit_compile={args.jit_compile}, "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()} threads)")
    print("ratio = median over rounds of wrapped / plain, each round timing both back to back")
    print(f"{'network':<34}{'plain ms':>10}{'wrapped ms':>12}{'ratio':>8}"
          f"  target <= {TARGET_RATIO}")
    labels = {"mlp": "MLP, 20 x 512, batch 128", "resnet": "ResNet-20 (CIFAR), batch 64"}
    for name, label in labels.items():
        plain, wrapped, ratio = measure(name, args.repeats, args.steps, jit_compile)
        verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
        print(f"{label:<34}{plain * 1e3:>10.2f}{wrapped * 1e3:>12.2f}{ratio:>8.3f}  {verdict}")


if __name__ == "__main__":
    main()
