r"""Compares the inits of Arpit et al. (2019) on a deep weight-normalized MLP.

Trains the same deep WN-MLP once per initialization, on the same data and
with the same optimizer, and reports which inits train, which stall and which
diverge:

| `--inits` name | what it is |
|---|---|
| `orthogonal` | default WN: orthogonal directions, `g = 1` for every unit |
| `orthogonal_datadep` | data-dependent WN (Salimans & Kingma), fit on one batch |
| `he_proposed` | the paper's rule `g = sqrt(2 in/out)`, Gaussian directions |
| `orthogonal_proposed` | the paper's rule, orthogonal directions |
| `lsuv` | LSUV (Mishkin & Matas) on the default-WN network |

Any name of `keras_goodinit.models.INITS` is accepted. Everything but the
bookkeeping comes from `examples/train.py`: data loading, model building, the
data-dependent inits, the learning-rate schedule, divergence detection and
training.

Examples:

  # The default comparison: depth 100 on scikit-learn's digits (no download),
  # about 2-4 minutes on 2 CPU cores:
  python examples/compare_inits.py

  # Depth 50, where the proposed init and LSUV both reach ~0.9 in ~1 minute:
  python examples/compare_inits.py --depth=50 --output=/tmp/compare50.png

  # A smoke run (depth 10, 2 epochs) in well under a minute:
  python examples/compare_inits.py --quick --output=/tmp/quick.png

While it trains, prints the epoch and the training and test loss and accuracy
of every epoch (`--verbose=2`, the default), Keras' progress bar
(`--verbose=1`) or nothing (`--verbose=0`). At the end it prints a markdown
table (init, final train and test accuracy, best test
accuracy, whether and at which step the loss became NaN or infinite, the
largest per-epoch training loss, `||h_L|| / ||x||` at init and seconds), writes
a PNG of the curves to `--output` (the forward signal `||h_l|| / ||x||` at
init, the test accuracy and the training loss per epoch; a diverged run is
drawn up to its divergence, marked by a dotted line) and the results as JSON
next to it (`compare_inits.png` -> `compare_inits.json`).

Runs are seeded but not bit-reproducible: TensorFlow's CPU kernels sum in a
thread-dependent order, and a 100-layer network amplifies the difference.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from types import ModuleType

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_goodinit as kg  # noqa: E402
from keras_goodinit import models  # noqa: E402

# The name tests/test_train_example.py loads train.py under: absl then accepts that
# train.py's flags are defined twice when both modules live in one process.
_TRAIN_MODULE = "goodinit_train_example"


def _load_train_module() -> ModuleType:
    """Imports examples/train.py (examples/ is not a package) by its path."""
    if _TRAIN_MODULE in sys.modules:
        return sys.modules[_TRAIN_MODULE]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    spec = importlib.util.spec_from_file_location(_TRAIN_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_TRAIN_MODULE] = module
    spec.loader.exec_module(module)
    return module


train_lib = _load_train_module()

DEFAULT_INITS = ("orthogonal", "orthogonal_datadep", "he_proposed", "orthogonal_proposed",
                 "lsuv")
LABELS = {
    "he": "default WN, Gaussian (g = 1)",
    "orthogonal": "default WN (g = 1)",
    "he_datadep": "data-dependent WN, Gaussian",
    "orthogonal_datadep": "data-dependent WN",
    "he_proposed": "proposed, He (Gaussian)",
    "orthogonal_proposed": "proposed, orthogonal",
    "lsuv": "LSUV",
}
# --quick: a tiny network that still runs every init end to end.
_QUICK = {"depth": 10, "epochs": 2}
_DEFAULTS = {"depth": 100, "epochs": 20}
# Samples of the held-out batch the signal at init is measured on.
_SIGNAL_SAMPLES = 256


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line (argparse: train.py's absl flags use the same names)."""
    parser = argparse.ArgumentParser(
        description="Trains a deep WN-MLP with each init and compares the curves.")
    parser.add_argument("--depth", type=int, default=None,
                        help=f"Hidden layers (default {_DEFAULTS['depth']}, "
                             f"{_QUICK['depth']} with --quick).")
    parser.add_argument("--width", type=int, default=128, help="Units per hidden layer.")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"Training epochs (default {_DEFAULTS['epochs']}, "
                             f"{_QUICK['epochs']} with --quick).")
    parser.add_argument("--lr", type=float, default=0.001, help="Peak SGD learning rate.")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum.")
    parser.add_argument("--lr_schedule", choices=train_lib.LR_SCHEDULES, default="cosine",
                        help="After the warmup: constant, cosine decay to 0, or step.")
    parser.add_argument("--warmup_epochs", type=float, default=0.0,
                        help="Epochs of quadratic warmup from 0 to --lr.")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="Batch size; also the batch the data-dependent inits see.")
    parser.add_argument("--dataset", choices=("digits", "mnist1d"), default="digits",
                        help="Dataset, generated locally (no download).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the models and shuffling.")
    parser.add_argument("--inits", default=",".join(DEFAULT_INITS),
                        help=f"Comma-separated inits, from {', '.join(models.INITS)}.")
    parser.add_argument("--output", default="compare_inits.png",
                        help="Where to write the PNG; the JSON goes next to it.")
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), default=2,
                        help="Progress while training: 0 silent, 1 Keras' progress bar, "
                             "2 one line per epoch (default).")
    parser.add_argument("--quick", action="store_true",
                        help="Tiny smoke run: depth 10, 2 epochs (explicit flags win).")
    args = parser.parse_args(argv)
    for name, value in (_QUICK if args.quick else _DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.inits = [name.strip() for name in args.inits.split(",") if name.strip()]
    unknown = [name for name in args.inits if name not in models.INITS]
    if unknown or not args.inits:
        parser.error(f"--inits must be a comma-separated list of {', '.join(models.INITS)}. "
                     f"Received: {unknown or args.inits}")
    for name in ("depth", "width", "epochs", "batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive. Received: {getattr(args, name)}")
    return args


def _read_history(path: str) -> dict[str, list[float]]:
    """The per-epoch columns of a CSVLogger file, as floats."""
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows:
        return {}
    return {key: [float(row[key]) for row in rows] for key in rows[0]}


def run_init(init: str, data, args: argparse.Namespace, verbose: int = 0) -> dict:
    """Builds, initializes and trains the WN-MLP with `init`; returns its results.

    Args:
        init: One of `keras_goodinit.models.INITS`.
        data: A `train.Data`.
        args: The parsed flags.
        verbose: Keras verbosity of the training loop.

    Returns:
        A dict with the metrics of `train.train` (`final_train_accuracy`,
        `final_test_accuracy`, `best_test_accuracy`, `final_train_loss`,
        `epochs_run`, `diverged`), plus `init`, `label`, `diverged_at_step`
        (the 1-based training step whose loss was first NaN or infinite, or
        `None`), `seconds` (build, init and training), `history` (per-epoch
        `loss`, `accuracy`, `val_loss`, `val_accuracy`) and `signal`
        (`||h_l|| / ||x||` and `||dL/dh_l|| / ||dL/dh_L||` at init for every
        hidden layer, then the classifier, on a held-out training batch).
    """
    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    model = train_lib.build_model("mlp", data.x_train.shape[1:], data.num_classes,
                                  depth=args.depth, hidden_size=args.width, init=init,
                                  weight_norm=True, seed=args.seed)
    # As in train.py: one random training batch drives the data-dependent inits.
    order = np.random.default_rng(args.seed).permutation(len(data.x_train))
    init_batch = order[:args.batch_size]
    train_lib.prepare_init(model, init, data.x_train[init_batch], verbose=0)
    # The signal at init, on other samples: on their own batch the data-dependent
    # inits are normalized by construction, whatever they do to the rest of the data.
    held_out = order[args.batch_size:args.batch_size + _SIGNAL_SAMPLES]
    if len(held_out) == 0:
        held_out = init_batch
    signal = kg.signal_report(model, (data.x_train[held_out], data.y_train[held_out]),
                              seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="compare_inits_") as output_dir:
        metrics = train_lib.train(
            model, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            momentum=args.momentum, lr_schedule=args.lr_schedule,
            warmup_epochs=args.warmup_epochs, seed=args.seed, output_dir=output_dir,
            verbose=verbose)
        history = _read_history(os.path.join(output_dir, "history.csv"))
    # The optimizer also applies the step whose loss was not finite, so its
    # iteration count is that step's 1-based index.
    step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    return {
        "init": init,
        "label": LABELS.get(init, init),
        **metrics,
        "diverged_at_step": step if metrics["diverged"] else None,
        "seconds": time.perf_counter() - start,
        "history": {key: history.get(key, []) for key in
                    ("loss", "accuracy", "val_loss", "val_accuracy")},
        "signal": {
            "layers": [row.name for row in signal.rows],
            "norm_ratio": [row.norm_ratio for row in signal.rows],
            "grad_norm_ratio": [row.grad_norm_ratio for row in signal.rows],
        },
    }


def _last_hidden_ratio(result: dict) -> float:
    """`||h_L|| / ||x||` at init, at the last hidden layer (before the classifier)."""
    ratios = result["signal"]["norm_ratio"]
    return ratios[-2] if len(ratios) > 1 else ratios[-1]


def _max_loss(result: dict) -> float:
    """The largest finite per-epoch training loss: shows blow-ups that stay finite."""
    losses = [loss for loss in result["history"]["loss"] if math.isfinite(loss)]
    return max(losses) if losses else math.nan


def format_table(results: Sequence[dict]) -> str:
    """The results as a markdown table.

    Columns: the init, the final training accuracy (running mean over the last
    epoch), the final and best test accuracy, whether the loss became NaN or
    infinite and at which training step, the largest finite per-epoch
    training loss, `||h_L|| / ||x||` at the last hidden layer at init and the
    seconds taken (build, init and training).
    """
    header = ("| init | final train acc | final test acc | best test acc | diverged "
              "| max epoch loss | h_L/x at init | seconds |")
    lines = [header, "|---|---:|---:|---:|---|---:|---:|---:|"]
    for result in results:
        if result["diverged"]:
            diverged = f"yes, step {result['diverged_at_step']}"
        else:
            diverged = "no"
        lines.append(
            f"| {result['label']} (`{result['init']}`) "
            f"| {result['final_train_accuracy']:.3f} | {result['final_test_accuracy']:.3f} "
            f"| {result['best_test_accuracy']:.3f} | {diverged} "
            f"| {_max_loss(result):.3g} | {_last_hidden_ratio(result):.3g} "
            f"| {result['seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: Sequence[dict], path: str, *, title: str, steps_per_epoch: int) -> str:
    """Writes a PNG: signal at init, test accuracy and training loss per epoch.

    A diverged run is drawn over the epochs it completed, with a dotted
    vertical line where its loss first stopped being finite.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    signal_axis, accuracy_axis, loss_axis = axes
    for index, result in enumerate(results):
        color = f"C{index}"
        label = result["label"]
        # The hidden layers: the last row is the classifier.
        ratios = np.asarray(result["signal"]["norm_ratio"][:-1], dtype="float64")
        layers = np.arange(1, len(ratios) + 1)
        shown = np.isfinite(ratios) & (ratios > 0)
        signal_axis.plot(layers[shown], ratios[shown], color=color, label=label)

        history = result["history"]
        accuracy = np.asarray(history["val_accuracy"], dtype="float64")
        loss = np.asarray(history["loss"], dtype="float64")
        epochs = np.arange(1, len(loss) + 1)
        if result["diverged"]:
            # The last epoch was cut short by the divergence: leave it out.
            epochs, accuracy, loss = epochs[:-1], accuracy[:-1], loss[:-1]
            at = result["diverged_at_step"] / steps_per_epoch
            for axis in (accuracy_axis, loss_axis):
                axis.axvline(at, color=color, linestyle=":", linewidth=2,
                             label=f"{label}: diverged at step {result['diverged_at_step']}")
        if len(epochs) == 0:
            continue  # diverged in its first epoch: only the dotted line
        finite = np.isfinite(loss)
        accuracy_axis.plot(epochs, accuracy, color=color, marker="o", markersize=3, label=label)
        loss_axis.plot(epochs[finite], loss[finite], color=color, marker="o", markersize=3,
                       label=label)
    signal_axis.set_yscale("log")
    signal_axis.set_xlabel("hidden layer")
    signal_axis.set_title("||h_l|| / ||x|| at init (held-out batch)")
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_title("test accuracy")
    accuracy_axis.set_ylim(0.0, 1.0)
    loss_axis.set_yscale("log")  # a blow-up that stays finite reaches 1e19
    loss_axis.set_xlabel("epoch")
    loss_axis.set_title("training loss (running mean over the epoch)")
    for axis in axes:
        axis.grid(True, alpha=0.3)
        axis.set_xlim(left=0)
    signal_axis.legend(fontsize=8)
    accuracy_axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the comparison; returns one result dict per init (see `run_init`)."""
    args = parse_args(argv)
    output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    json_path = os.path.splitext(output)[0] + ".json"

    data = train_lib.load_data(args.dataset)
    steps_per_epoch = math.ceil(len(data.x_train) / args.batch_size)
    title = (f"WN-MLP depth {args.depth}, width {args.width} on {args.dataset}: SGD lr "
             f"{args.lr:g}, momentum {args.momentum:g}, {args.lr_schedule}, batch "
             f"{args.batch_size}, {args.epochs} epochs, seed {args.seed}")
    print(title, flush=True)
    results = []
    for init in args.inits:
        print(f"training {init} ...", flush=True)
        result = run_init(init, data, args, verbose=args.verbose)
        status = (f"DIVERGED at step {result['diverged_at_step']}" if result["diverged"]
                  else "done")
        print(f"  {status}: test accuracy {result['final_test_accuracy']:.3f} "
              f"(best {result['best_test_accuracy']:.3f}), {result['seconds']:.0f} s",
              flush=True)
        results.append(result)

    print()
    print(format_table(results))
    plot(results, output, title=title, steps_per_epoch=steps_per_epoch)
    config = {key: value for key, value in vars(args).items() if key != "output"}
    config["steps_per_epoch"] = steps_per_epoch
    with open(json_path, "w") as file:
        json.dump(train_lib._jsonable({"config": config, "results": results}), file, indent=2)
    print(f"\nwrote {output} and {json_path}")
    return results


if __name__ == "__main__":
    main()
