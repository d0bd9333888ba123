"""What `SignalMonitor` costs `fit`, at one record per epoch, side by side in one run.

The examples' models, on scikit-learn's digits (1347 training images, as in
examples/compare_inits.py: SGD with momentum 0.9, batch 32, softmax
cross-entropy from logits):

- `mlp`: the 100-layer weight-normalized ReLU MLP, width 128
  (`wn_mlp(..., depth=100, init="orthogonal_proposed")`);
- `resnet`: ResNet-20 without normalization (`wn_resnet(..., num_blocks=3,
  weight_norm=False, init="orthogonal")`, the ResNet row of compare_inits.py).

Each is built twice from the same seed: one trains plain, the other with
`SignalMonitor(probe)` (a fixed batch of `--probe` training images and
labels, 128 by default, a record at the end of every epoch, with gradients).
Both are compiled and trained for one epoch first (fit's trace and the
monitor's first record, its trace included: timed and printed apart, not in
the ratio). Then each round trains each for one more epoch (`fit(epochs=1)`:
one record), in alternating order, so drifts in machine speed hit both alike;
the result is the median of the per-round ratios of the monitored to the
plain epoch, with the ratio of the fastest epochs beside it. Two callbacks
around the monitor time its record itself, which gives `record / epoch`: on a
loaded machine a steadier estimate of the overhead than the difference of two
epochs. No validation data: the epochs are as short as `fit` makes them, which
makes the ratio the largest it can be.

A record is one forward and one backward pass of the probe batch, plus a read
of every weight (`signal_report` checks that it changed none): on digits, whose
epoch is only 1347 images, a probe of 128 images costs about a tenth of an
epoch's compute by itself; on a real dataset the same record is a far smaller
part of an epoch.

Prints a table and PASS or FAIL against the target (at most 10 % overhead)
and always exits 0. `--json PATH` also writes the figures with the machine
and its load (benchmarks/_results.py).

Usage:

    python benchmarks/monitor_overhead.py [--models mlp,resnet] [--rounds 7] [--probe 128]
        [--json PATH]
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


class _Clock(keras.callbacks.Callback):
    """Before and after the monitor in the callback list: how long its record took."""

    def __init__(self, marks: list, name: str):
        super().__init__()
        self.marks, self.name = marks, name

    def on_epoch_end(self, epoch, logs=None):
        self.marks.append((self.name, time.perf_counter()))


def _fit_seconds(model, x, y, callbacks) -> float:
    start = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=1, shuffle=True, verbose=0, callbacks=callbacks)
    return time.perf_counter() - start


def measure(name: str, x, y, rounds: int, probe: int) -> dict:
    plain, watched = _build(name), _build(name)
    monitor = SignalMonitor((x[:probe], y[:probe]))
    marks: list = []
    callbacks = [_Clock(marks, "before"), monitor, _Clock(marks, "after")]
    first_plain = _fit_seconds(plain, x, y, [])
    first_watched = _fit_seconds(watched, x, y, callbacks)
    plain_times, watched_times, records = [], [], []
    for round_ in range(rounds):
        # Alternate which goes first, so drifts in machine speed hit both alike.
        order = ("plain", "watched") if round_ % 2 == 0 else ("watched", "plain")
        for which in order:
            if which == "plain":
                plain_times.append(_fit_seconds(plain, x, y, []))
            else:
                del marks[:]
                watched_times.append(_fit_seconds(watched, x, y, callbacks))
                records.append(marks[1][1] - marks[0][1])
    ratios = [w / p for p, w in zip(plain_times, watched_times, strict=True)]
    # Every later epoch was one record: the first fit's two (before and after its epoch)
    # and one per round.
    assert len(monitor.history) == 2 + rounds, len(monitor.history)
    return {"model": name, "layers": len(monitor.history[0].report.rows),
            "blocks": len(monitor.history[0].report.blocks),
            "mode": monitor.history[0].report.mode, "rounds": rounds, "probe": probe,
            "first_plain_s": first_plain, "first_watched_s": first_watched,
            "epoch_plain_s": statistics.median(plain_times),
            "epoch_watched_s": statistics.median(watched_times),
            "record_s": statistics.median(records),
            "record_per_epoch": statistics.median(records) / statistics.median(plain_times),
            "ratio": statistics.median(ratios), "ratios": ratios,
            "ratio_of_fastest": min(watched_times) / min(plain_times)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,resnet",
                        help="Comma-separated, from mlp and resnet.")
    parser.add_argument("--rounds", type=int, default=7,
                        help="Timed epochs of each model, after the first.")
    parser.add_argument("--probe", type=int, default=PROBE,
                        help="Images in the probe batch (the first of the training split).")
    parser.add_argument("--json", default=None, help="Also write the figures there.")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if not names or set(names) - {"mlp", "resnet"} or args.rounds < 1 or args.probe < 1:
        parser.error(f"--models must name mlp and/or resnet, --rounds and --probe be >= 1. "
                     f"Received: --models={args.models} --rounds={args.rounds} "
                     f"--probe={args.probe}")
    recorder = Recorder("monitor_overhead")
    print(f"load average at start: {os.getloadavg()}")
    x, y = _digits()
    rows = [measure(name, x, y, args.rounds, args.probe) for name in names]
    print(f"\nprobe batch {args.probe}; medians of {args.rounds} rounds\n")
    print("| model | targets | blocks | record mode | 1st epoch plain s | 1st epoch with "
          "monitor s | epoch plain s | epoch with monitor s | record s | record / epoch "
          "| ratio (median) | ratio of fastest |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['layers']} | {r['blocks']} | {r['mode']} | "
              f"{r['first_plain_s']:.2f} | {r['first_watched_s']:.2f} | "
              f"{r['epoch_plain_s']:.2f} | {r['epoch_watched_s']:.2f} | {r['record_s']:.3f} | "
              f"{r['record_per_epoch']:.3f} | {r['ratio']:.3f} | {r['ratio_of_fastest']:.3f} |")
    print("\nper-round ratios: " + "; ".join(
        f"{r['model']}: " + ", ".join(f"{v:.3f}" for v in r["ratios"]) for r in rows))
    print(f"load average at end: {os.getloadavg()}")
    checks = [{"name": f"{r['model']}: fit with a record per epoch <= {TARGET_RATIO} x plain",
               "passed": r["ratio"] <= TARGET_RATIO, "value": f"{r['ratio']:.3f}"}
              for r in rows]
    for check in checks:
        print(f"{'PASS' if check['passed'] else 'FAIL'}: {check['name']} ({check['value']})")
    if args.json:
        recorder.write(args.json, rows, checks=checks, target=TARGET_RATIO)


if __name__ == "__main__":
    main()
