"""What `SignalMonitor` costs `fit`, at one record per epoch, side by side in one run.

The examples' models, on scikit-learn's digits (1347 training images, as in
examples/compare_inits.py: SGD with momentum 0.9, batch 32, softmax
cross-entropy from logits):

- `mlp`: the 100-layer weight-normalized ReLU MLP, width 128
  (`wn_mlp(..., depth=100, init="orthogonal_proposed")`);
- `resnet`: ResNet-20 without normalization (`wn_resnet(..., num_blocks=3,
  weight_norm=False, init="orthogonal")`, the ResNet row of compare_inits.py).

Each is built twice from the same seed: one trains plain, the other with
`SignalMonitor(probe)` (a fixed batch of 128 training images and labels, a
record at the end of every epoch, with gradients). Both are compiled and
trained for one epoch first (fit's trace and the monitor's first record, its
trace included: timed and printed apart, not in the ratio). Then each round
trains each for one more epoch (`fit(epochs=1)`: one record), in alternating
order, so drifts in machine speed hit both alike; the result is the median of
the per-round ratios of the monitored to the plain epoch. No validation data:
the epochs are as short as `fit` makes them, which makes the ratio the
largest it can be.

Prints a table and PASS or FAIL against the target (at most 10 % overhead)
and always exits 0. `--json PATH` also writes the figures with the machine
and its load (benchmarks/_results.py).

Usage:

    python benchmarks/monitor_overhead.py [--models mlp,resnet] [--rounds 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from keras_goodinit import SignalMonitor, models  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import Recorder  # noqa: E402

TARGET_RATIO = 1.10
PROBE = 128


def _digits():
    """The training split of examples/train.py's digits: 8x8x1 images, standardized."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, _, y, _ = train_test_split(digits.images[..., None].astype("float32"),
                                  digits.target.astype("int32"), test_size=0.25,
                                  random_state=0, stratify=digits.target)
    return (x - x.mean()) / x.std(), y


def _build(name: str) -> keras.Model:
    if name == "mlp":
        model = models.wn_mlp((8, 8, 1), 10, depth=100, width=128, init="orthogonal_proposed",
                              seed=0)
        lr = 0.001
    else:
        model = models.wn_resnet((8, 8, 1), 10, num_blocks=3, weight_norm=False,
                                 init="orthogonal", seed=0)
        lr = 0.01
    model.compile(keras.optimizers.SGD(lr, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _fit_seconds(model, x, y, callbacks) -> float:
    start = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=1, shuffle=True, verbose=0, callbacks=callbacks)
    return time.perf_counter() - start


def measure(name: str, x, y, rounds: int) -> dict:
    plain, watched = _build(name), _build(name)
    monitor = SignalMonitor((x[:PROBE], y[:PROBE]))
    first_plain = _fit_seconds(plain, x, y, [])
    first_watched = _fit_seconds(watched, x, y, [monitor])
    plain_times, watched_times = [], []
    for round_ in range(rounds):
        # Alternate which goes first, so drifts in machine speed hit both alike.
        order = ("plain", "watched") if round_ % 2 == 0 else ("watched", "plain")
        for which in order:
            if which == "plain":
                plain_times.append(_fit_seconds(plain, x, y, []))
            else:
                watched_times.append(_fit_seconds(watched, x, y, [monitor]))
    ratios = [w / p for p, w in zip(plain_times, watched_times, strict=True)]
    # Every later epoch was one record: the first fit's two (before and after its epoch)
    # and one per round.
    assert len(monitor.history) == 2 + rounds, len(monitor.history)
    return {"model": name, "layers": len(monitor.history[0].report.rows),
            "blocks": len(monitor.history[0].report.blocks),
            "mode": monitor.history[0].report.mode, "rounds": rounds,
            "first_plain_s": first_plain, "first_watched_s": first_watched,
            "epoch_plain_s": statistics.median(plain_times),
            "epoch_watched_s": statistics.median(watched_times),
            "ratio": statistics.median(ratios), "ratios": ratios}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,resnet",
                        help="Comma-separated, from mlp and resnet.")
    parser.add_argument("--rounds", type=int, default=5,
                        help="Timed epochs of each model, after the first.")
    parser.add_argument("--json", default=None, help="Also write the figures there.")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if not names or set(names) - {"mlp", "resnet"} or args.rounds < 1:
        parser.error(f"--models must name mlp and/or resnet and --rounds be >= 1. "
                     f"Received: --models={args.models} --rounds={args.rounds}")
    recorder = Recorder("monitor_overhead")
    print(f"load average at start: {os.getloadavg()}")
    x, y = _digits()
    rows = [measure(name, x, y, args.rounds) for name in names]
    print("\n| model | targets | blocks | record mode | 1st epoch plain s | 1st epoch with "
          "monitor s | epoch plain s | epoch with monitor s | ratio (median) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['layers']} | {r['blocks']} | {r['mode']} | "
              f"{r['first_plain_s']:.2f} | {r['first_watched_s']:.2f} | "
              f"{r['epoch_plain_s']:.2f} | {r['epoch_watched_s']:.2f} | {r['ratio']:.3f} |")
    print("\nper-round ratios: " + "; ".join(
        f"{r['model']}: " + ", ".join(f"{v:.3f}" for v in r["ratios"]) for r in rows))
    print(f"load average at end: {os.getloadavg()}")
    checks = [{"name": f"{r['model']}: fit with a record per epoch <= {TARGET_RATIO} x plain",
               "passed": r["ratio"] <= TARGET_RATIO, "value": f"{r['ratio']:.3f}"}
              for r in rows]
    for check in checks:
        print(f"{'PASS' if check['passed'] else 'FAIL'}: {check['name']} ({check['value']})")
    if args.json:
        recorder.write(args.json, rows, checks=checks, probe=PROBE, target=TARGET_RATIO)


if __name__ == "__main__":
    main()
