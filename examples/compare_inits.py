r"""Compares the inits of Arpit et al. (2019) on a deep WN-MLP and a no-BN ResNet.

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

Any name of `keras_goodinit.models.INITS` is accepted. Then (the ResNet row)
a CIFAR-style ResNet without normalization, ResNet-20 by default
(`wn_resnet(..., weight_norm=False)`, `--resnet_blocks` blocks per stage), on
the same data as 8x8x1 images, once per graph-level init:

| `--resnet_inits` name | what it is |
|---|---|
| `default` | orthogonal kernels of gain 1 (Glorot's scale), no data |
| `mean_field` | `mean_field_init`: the paper's rule found from the graph, `1/N` branch ends |
| `lsuv_residual` | residual-aware LSUV, `lsuv_init(..., residual="scaled")` |
| `lsuv` | plain LSUV: every layer, branch ends included, to variance 1 |

The ResNet table adds the largest average channel variance of the residual
stream (the `Add` outputs) at init, on the held-out batch.

Everything but the bookkeeping comes from `examples/train.py`: data loading,
model building, the data-dependent inits, the learning-rate schedule,
divergence detection and training.

Examples:

  # The default: depth 50 for 10 epochs on scikit-learn's digits (no download),
  # then ResNet-20 for 2 epochs; about 3 minutes on 2 idle CPU cores:
  python examples/compare_inits.py

  # The full table of the README and the docs: depth 100 for 20 epochs, then
  # ResNet-20 for 10 epochs; about 6 minutes on 2 idle cores:
  python examples/compare_inits.py --full

  # The spread over seeds, summarized as JSON (min, median and max per init):
  python examples/compare_inits.py --seeds=0,1,2,3,4 --json=/tmp/spread.json

  # Only the MLP:
  python examples/compare_inits.py --resnet_inits=

  # A smoke run (depth 10, 2 epochs; ResNet-8, 1 epoch), as the tests run it:
  python examples/compare_inits.py --quick --output=/tmp/quick.png

Before each run it prints which run of how many it starts, the time elapsed
and an estimate of the time left (from the runs done so far, each weighted by
its depth and epochs). While it trains, it prints the training and test loss
and accuracy of every epoch (`--verbose=2`, the default), Keras' progress bar
(`--verbose=1`) or nothing (`--verbose=0`). At the end it prints a markdown
table (init, final train and test accuracy, best test accuracy, whether and
at which step the loss became NaN or infinite, the largest per-epoch training
loss, `||h_L|| / ||x||` at init and seconds), writes a PNG of the curves to
`--output` (the forward signal `||h_l|| / ||x||` at init, the test accuracy
and the training loss per epoch; a diverged run is drawn up to its
divergence, marked by a dotted line) and the results as JSON next to it
(`compare_inits.png` -> `compare_inits.json`); the ResNet's curves and its
residual stream at init go to a second row of the PNG and to the JSON's
`resnet_results`. With several `--seeds` it also prints the spread per init
(min, median and max) and plots the first seed. `--json PATH` writes a
summary without the curves (one row per run, the spread, the machine, its
load and the versions), as the benchmarks do for the documentation's
Measurements page.

Runs are reproducible on one machine: the same seed, code and versions give
the same numbers to the last bit, without TensorFlow's op determinism (two runs
of a seed, and a run with one intra-op thread, gave identical loss histories
on a 2-core AMD EPYC). Another CPU (AVX-512 or not, oneDNN or not) or other
versions round the initial kernels and the sums differently, and a deep
network amplifies that: compare the spread over seeds (`--seeds`), not single
numbers.
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
RESNET_INITS = ("default", "mean_field", "lsuv_residual", "lsuv")
RESNET_LABELS = {
    "default": "default (orthogonal, gain 1)",
    "mean_field": "mean_field_init",
    "lsuv_residual": "residual-aware LSUV",
    "lsuv": "plain LSUV",
}
# The presets of the sizes: `--quick` (a smoke run: tiny networks that still run every
# init end to end), the default (about 3 minutes on 2 idle cores; at depth 50 default WN
# and data-dependent WN stay at chance while the proposed init and LSUV train, as at
# depth 100) and `--full` (the table of the README and the docs). Explicit flags win.
PRESETS = {
    "quick": {"depth": 10, "epochs": 2, "resnet_blocks": 1, "resnet_epochs": 1},
    "default": {"depth": 50, "epochs": 10, "resnet_blocks": 3, "resnet_epochs": 2},
    "full": {"depth": 100, "epochs": 20, "resnet_blocks": 3, "resnet_epochs": 10},
}
# What a run costs besides its epochs (build, init, signal report, tracing), in epochs
# of the same network: measured on 2 CPU cores, for the estimate of the time left.
_SETUP_EPOCHS = 19.0
# What a layer of the ResNet costs against one of the MLP, for the same estimate.
_RESNET_LAYER_COST = 0.8
# Samples of the held-out batch the signal at init is measured on.
_SIGNAL_SAMPLES = 256


def _preset_text(preset: str) -> str:
    sizes = PRESETS[preset]
    return (f"depth {sizes['depth']}, {sizes['epochs']} epochs; "
            f"ResNet-{6 * sizes['resnet_blocks'] + 2}, {sizes['resnet_epochs']} epochs")


def _preset_help(name: str) -> str:
    return (f"{PRESETS['default'][name]}, {PRESETS['quick'][name]} with --quick, "
            f"{PRESETS['full'][name]} with --full")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line (argparse: train.py's absl flags use the same names)."""
    parser = argparse.ArgumentParser(
        description="Trains a deep WN-MLP with each init and compares the curves.")
    parser.add_argument("--depth", type=int, default=None,
                        help="Hidden layers (default " + _preset_help("depth") + ").")
    parser.add_argument("--width", type=int, default=128, help="Units per hidden layer.")
    parser.add_argument("--epochs", type=int, default=None,
                        help="Training epochs (default " + _preset_help("epochs") + ").")
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
    parser.add_argument("--seeds", default=None,
                        help="Comma-separated seeds: the whole comparison once per seed, then "
                             "the spread (min, median, max) per init. Overrides --seed.")
    parser.add_argument("--inits", default=",".join(DEFAULT_INITS),
                        help=f"Comma-separated inits, from {', '.join(models.INITS)}.")
    parser.add_argument("--resnet_inits", default=",".join(RESNET_INITS),
                        help="Comma-separated inits of the no-BN ResNet, from "
                             f"{', '.join(RESNET_INITS)}; empty for no ResNet.")
    parser.add_argument("--resnet_blocks", type=int, default=None,
                        help="Blocks per stage of the ResNet (depth 6N + 2; default "
                             + _preset_help("resnet_blocks") + ").")
    parser.add_argument("--resnet_epochs", type=int, default=None,
                        help="Training epochs of the ResNet (default "
                             + _preset_help("resnet_epochs") + ").")
    parser.add_argument("--resnet_lr", type=float, default=0.01,
                        help="Peak SGD learning rate of the ResNet.")
    parser.add_argument("--output", default="compare_inits.png",
                        help="Where to write the PNG; the JSON goes next to it.")
    parser.add_argument("--json", default=None,
                        help="Also write a summary here: per run its accuracies, divergence, "
                             "signal at init and seconds, the spread over the seeds per init, "
                             "and the machine, its load and the versions.")
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), default=2,
                        help="Progress while training: 0 silent, 1 Keras' progress bar, "
                             "2 one line per epoch (default).")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true",
                       help="Tiny smoke run: " + _preset_text("quick") + " (explicit flags win).")
    sizes.add_argument("--full", action="store_true",
                       help="The full table of the README and the docs: "
                            + _preset_text("full") + " (explicit flags win).")
    args = parser.parse_args(argv)
    args.preset = "quick" if args.quick else "full" if args.full else "default"
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.seeds is None:
        args.seeds = [args.seed]
    else:
        try:
            args.seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
        except ValueError:
            parser.error(f"--seeds must be comma-separated integers. Received: {args.seeds}")
        if not args.seeds:
            parser.error(f"--seeds must name at least one seed. Received: {args.seeds}")
        args.seed = args.seeds[0]
    args.inits = [name.strip() for name in args.inits.split(",") if name.strip()]
    unknown = [name for name in args.inits if name not in models.INITS]
    if unknown or not args.inits:
        parser.error(f"--inits must be a comma-separated list of {', '.join(models.INITS)}. "
                     f"Received: {unknown or args.inits}")
    args.resnet_inits = [name.strip() for name in args.resnet_inits.split(",")
                         if name.strip()]
    unknown = [name for name in args.resnet_inits if name not in RESNET_INITS]
    if unknown:
        parser.error(f"--resnet_inits must be a comma-separated list of "
                     f"{', '.join(RESNET_INITS)}, or empty. Received: {unknown}")
    for name in ("depth", "width", "epochs", "batch_size", "resnet_blocks", "resnet_epochs"):
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


def _split(data, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the init batch and of the held-out batch the signal at init is measured on.

    As in train.py, one random training batch drives the data-dependent inits;
    the signal is measured on other samples: on their own batch the
    data-dependent inits are normalized by construction, whatever they do to
    the rest of the data.
    """
    order = np.random.default_rng(args.seed).permutation(len(data.x_train))
    init_batch = order[:args.batch_size]
    held_out = order[args.batch_size:args.batch_size + _SIGNAL_SAMPLES]
    return init_batch, held_out if len(held_out) else init_batch


def _train_and_record(model: keras.Model, init: str, label: str, data, args, *, epochs: int,
                      lr: float, held_out: np.ndarray, start: tuple[float, float],
                      verbose: int) -> dict:
    """The signal at init on `held_out`, then training: the result dict of `run_init`."""
    signal = kg.signal_report(model, (data.x_train[held_out], data.y_train[held_out]),
                              seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="compare_inits_") as output_dir:
        metrics = train_lib.train(
            model, data, epochs=epochs, batch_size=args.batch_size, lr=lr,
            momentum=args.momentum, lr_schedule=args.lr_schedule,
            warmup_epochs=args.warmup_epochs, seed=args.seed, output_dir=output_dir,
            verbose=verbose)
        history = _read_history(os.path.join(output_dir, "history.csv"))
    # The optimizer also applies the step whose loss was not finite, so its
    # iteration count is that step's 1-based index.
    step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    result = {
        "init": init,
        "label": label,
        **metrics,
        "diverged_at_step": step if metrics["diverged"] else None,
        "seed": args.seed,
        "seconds": time.perf_counter() - start[0],
        # CPU time of every thread: with the wall time, how busy the machine was.
        "cpu_seconds": time.process_time() - start[1],
        "history": {key: history.get(key, []) for key in
                    ("loss", "accuracy", "val_loss", "val_accuracy")},
        "signal": {
            "layers": [row.name for row in signal.rows],
            "norm_ratio": [row.norm_ratio for row in signal.rows],
            "grad_norm_ratio": [row.grad_norm_ratio for row in signal.rows],
        },
    }
    if signal.blocks:
        result["signal"]["blocks"] = [block.name for block in signal.blocks]
        result["signal"]["stream_variance"] = signal.block_column("variance").tolist()
        result["signal"]["branch_variance"] = signal.block_column("branch_variance").tolist()
        result["max_stream_variance"] = float(np.max(signal.block_column("variance")))
    return result


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
        `epochs_run`, `diverged`), plus `init`, `label`,
        `diverged_at_step` (the 1-based training step whose loss was first
        NaN or infinite, or `None`), `seed`, `seconds` (build, init and
        training, wall clock) and `cpu_seconds` (the same, CPU time of all
        threads),
        `history` (per-epoch `loss`, `accuracy`, `val_loss`, `val_accuracy`)
        and `signal` (`||h_l|| / ||x||` and `||dL/dh_l|| / ||dL/dh_L||` at
        init for every hidden layer, then the classifier, on a held-out
        training batch).
    """
    start = (time.perf_counter(), time.process_time())
    keras.utils.set_random_seed(args.seed)
    model = train_lib.build_model("mlp", data.x_train.shape[1:], data.num_classes,
                                  depth=args.depth, hidden_size=args.width, init=init,
                                  weight_norm=True, seed=args.seed)
    init_batch, held_out = _split(data, args)
    train_lib.prepare_init(model, init, data.x_train[init_batch], verbose=0)
    return _train_and_record(model, init, LABELS.get(init, init), data, args,
                             epochs=args.epochs, lr=args.lr, held_out=held_out, start=start,
                             verbose=verbose)


def run_resnet_init(init: str, data, args: argparse.Namespace, verbose: int = 0) -> dict:
    """Builds, initializes and trains the no-BN ResNet with `init` (one of `RESNET_INITS`).

    The ResNet is `wn_resnet(..., weight_norm=False, init="orthogonal")`: its
    kernels start orthogonal with gain 1 (`default`), then `mean_field_init`
    or `lsuv_init` (on the init batch) rescales them.

    Returns:
        The dict of `run_init`, whose `signal` also holds, per residual block
        at init, `blocks` (the `Add` names), `stream_variance` and
        `branch_variance` (average channel variances), with
        `max_stream_variance` their largest stream variance.
    """
    label = RESNET_LABELS[init]
    start = (time.perf_counter(), time.process_time())
    keras.utils.set_random_seed(args.seed)
    model = models.wn_resnet(data.x_train.shape[1:], data.num_classes, args.resnet_blocks,
                             init="orthogonal", weight_norm=False, seed=args.seed)
    init_batch, held_out = _split(data, args)
    if init == "mean_field":
        kg.mean_field_init(model, seed=args.seed, verbose=0)
    elif init.startswith("lsuv"):
        kg.lsuv_init(model, data.x_train[init_batch], verbose=0,
                     residual="scaled" if init == "lsuv_residual" else None)
    return _train_and_record(model, init, label, data, args, epochs=args.resnet_epochs,
                             lr=args.resnet_lr, held_out=held_out, start=start,
                             verbose=verbose)


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
    seconds taken (build, init and training). Results with residual blocks
    (the ResNet's) add the largest average channel variance of the residual
    stream at init, before the seconds.
    """
    streams = any("max_stream_variance" in result for result in results)
    extra = " max stream var at init |" if streams else ""
    header = ("| init | final train acc | final test acc | best test acc | diverged "
              f"| max epoch loss | h_L/x at init |{extra} seconds |")
    lines = [header, "|---|---:|---:|---:|---|---:|---:|" + ("---:|" if streams else "")
             + "---:|"]
    seeds = len({result.get("seed") for result in results}) > 1
    for result in results:
        name = f"| {result['label']} (`{result['init']}`) "
        if seeds:
            name += f"seed {result['seed']} "
        if result["diverged"]:
            diverged = f"yes, step {result['diverged_at_step']}"
        else:
            diverged = "no"
        stream = f"| {result.get('max_stream_variance', math.nan):.3g} " if streams else ""
        lines.append(
            name + f"| {result['final_train_accuracy']:.3f} | {result['final_test_accuracy']:.3f} "
            f"| {result['best_test_accuracy']:.3f} | {diverged} "
            f"| {_max_loss(result):.3g} | {_last_hidden_ratio(result):.3g} "
            f"{stream}| {result['seconds']:.0f} |")
    return "\n".join(lines)


def _plot_row(axes, results: Sequence[dict], *, steps_per_epoch: int, signal_key: str) -> None:
    """One row of the PNG: the signal at init, test accuracy and training loss per epoch."""
    signal_axis, accuracy_axis, loss_axis = axes
    for index, result in enumerate(results):
        color = f"C{index}"
        label = result["label"]
        # MLP: the hidden layers (the last row is the classifier). ResNet: every block.
        values = result["signal"][signal_key]
        values = np.asarray(values[:-1] if signal_key == "norm_ratio" else values,
                            dtype="float64")
        depth = np.arange(1, len(values) + 1)
        shown = np.isfinite(values) & (values > 0)
        signal_axis.plot(depth[shown], values[shown], color=color, label=label)

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


def plot(results: Sequence[dict], path: str, *, title: str, steps_per_epoch: int,
         resnet_results: Sequence[dict] = (), resnet_title: str = "") -> str:
    """Writes a PNG: signal at init, test accuracy and training loss per epoch.

    A diverged run is drawn over the epochs it completed, with a dotted
    vertical line where its loss first stopped being finite. ResNet results
    get a second row, whose signal panel is the residual stream's average
    channel variance per block at init.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if resnet_results else 1
    figure, axes = plt.subplots(rows, 3, figsize=(16, 4.6 * rows), squeeze=False)
    _plot_row(axes[0], results, steps_per_epoch=steps_per_epoch, signal_key="norm_ratio")
    axes[0][0].set_xlabel("hidden layer")
    axes[0][0].set_title("||h_l|| / ||x|| at init (held-out batch)")
    axes[0][1].set_title(f"{title}\ntest accuracy", fontsize=9)
    if resnet_results:
        _plot_row(axes[1], resnet_results, steps_per_epoch=steps_per_epoch,
                  signal_key="stream_variance")
        axes[1][0].set_xlabel("residual block")
        axes[1][0].set_title("residual stream: avg channel variance at init")
        axes[1][1].set_title(f"{resnet_title}\ntest accuracy", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _print_outcome(result: dict) -> None:
    status = (f"DIVERGED at step {result['diverged_at_step']}" if result["diverged"]
              else "done")
    print(f"  {status}: test accuracy {result['final_test_accuracy']:.3f} "
          f"(best {result['best_test_accuracy']:.3f}), {result['seconds']:.0f} s", flush=True)


def _clock(seconds: float) -> str:
    """`seconds` as m:ss."""
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}:{seconds:02d}"


class _Progress:
    """Prints `[run i of n, elapsed, about ... left]` before each run.

    The time left is the time per unit of work of the runs done so far, times
    the work left; a run's work is its layers times its epochs plus
    `_SETUP_EPOCHS` (build, init, signal report and tracing cost about that
    many epochs of the same network).
    """

    def __init__(self, work: Sequence[float]):
        self.work = list(work)
        self.done = 0
        self.start = time.perf_counter()

    def begin(self, what: str) -> None:
        elapsed = time.perf_counter() - self.start
        if self.done:
            work_done = sum(self.work[:self.done])
            left = elapsed / work_done * sum(self.work[self.done:])
            timing = f"{_clock(elapsed)} elapsed, about {_clock(left)} left"
        else:
            timing = "time left estimated after this run"
        print(f"[run {self.done + 1} of {len(self.work)}, {timing}] {what}", flush=True)

    def end(self) -> None:
        self.done += 1


def _run_work(layers: int, epochs: int) -> float:
    return layers * (epochs + _SETUP_EPOCHS)


def _spread(results: Sequence[dict], network: str) -> list[dict]:
    """Per init, over the seeds: min, median and max of the accuracies, and the divergences."""
    spread = []
    for init in dict.fromkeys(result["init"] for result in results):
        runs = [result for result in results if result["init"] == init]
        row = {"network": network, "init": init, "label": runs[0]["label"],
               "seeds": [run["seed"] for run in runs],
               "diverged": sum(run["diverged"] for run in runs)}
        for key in ("final_test_accuracy", "best_test_accuracy", "final_train_accuracy"):
            values = np.asarray([run[key] for run in runs], dtype="float64")
            row[key] = {"min": float(np.min(values)), "median": float(np.median(values)),
                        "max": float(np.max(values))}
        spread.append(row)
    return spread


def format_spread(spread: Sequence[dict]) -> str:
    """The spread over the seeds as a markdown table: min, median and max per init."""
    lines = ["| init | seeds | final test acc (min / median / max) "
             "| best test acc (min / median / max) | diverged |",
             "|---|---:|---|---|---:|"]
    for row in spread:
        cells = [" / ".join(f"{row[key][stat]:.3f}" for stat in ("min", "median", "max"))
                 for key in ("final_test_accuracy", "best_test_accuracy")]
        lines.append(f"| {row['label']} (`{row['init']}`) | {len(row['seeds'])} | {cells[0]} "
                     f"| {cells[1]} | {row['diverged']} of {len(row['seeds'])} |")
    return "\n".join(lines)


def _summary_row(result: dict, network: str) -> dict:
    """One run for the `--json` summary: its figures, without the curves."""
    row = {"network": network}
    row.update({key: result[key] for key in (
        "init", "label", "seed", "final_train_accuracy", "final_test_accuracy",
        "best_test_accuracy", "diverged", "diverged_at_step", "epochs_run", "seconds",
        "cpu_seconds")})
    row["h_L_over_x_at_init"] = _last_hidden_ratio(result)
    if "max_stream_variance" in result:
        row["max_stream_variance_at_init"] = result["max_stream_variance"]
    return row


def _load_recorder():
    """benchmarks/_results.py's `Recorder`, which writes the files the docs are made from."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "_results.py")
    spec = importlib.util.spec_from_file_location("goodinit_benchmark_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Recorder


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Runs the comparison, once per seed of `--seeds`.

    Returns:
        `{"results": [...], "resnet_results": [...]}`: one result dict per
        init and seed (see `run_init` and `run_resnet_init`), and with several
        seeds `"spread"` (see `format_spread`).
    """
    args = parse_args(argv)
    recorder = _load_recorder()("compare_inits") if args.json else None
    output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    json_path = os.path.splitext(output)[0] + ".json"
    cpu_start = time.process_time()

    data = train_lib.load_data(args.dataset)
    steps_per_epoch = math.ceil(len(data.x_train) / args.batch_size)
    seeds = ", ".join(map(str, args.seeds))
    common = (f"SGD momentum {args.momentum:g}, {args.lr_schedule}, batch {args.batch_size}, "
              f"seed{'s' if len(args.seeds) > 1 else ''} {seeds}")
    title = (f"WN-MLP depth {args.depth}, width {args.width} on {args.dataset}: lr "
             f"{args.lr:g}, {args.epochs} epochs, {common}")
    # digits as 8x8x1 images; mnist1d as (length, 1) sequences, for a 1D ResNet.
    resnet_depth = 6 * args.resnet_blocks + 2
    resnet_title = (f"no-BN ResNet-{resnet_depth} on {args.dataset} "
                    f"({'x'.join(map(str, data.x_train.shape[1:]))}): lr {args.resnet_lr:g}, "
                    f"{args.resnet_epochs} epochs, {common}")
    # A ResNet layer costs about _RESNET_LAYER_COST MLP layers (a convolution on 8x8).
    work = ([_run_work(args.depth, args.epochs)] * len(args.inits)
            + [_run_work(resnet_depth, args.resnet_epochs) * _RESNET_LAYER_COST]
            * len(args.resnet_inits)) * len(args.seeds)
    progress = _Progress(work)
    print(f"{title}\nthen {resnet_title}" if args.resnet_inits else title, flush=True)
    results, resnet_results = [], []
    for seed in args.seeds:
        seed_args = argparse.Namespace(**{**vars(args), "seed": seed})
        for init in args.inits:
            progress.begin(f"training {init} (MLP depth {args.depth}, seed {seed}) ...")
            results.append(run_init(init, data, seed_args, verbose=args.verbose))
            progress.end()
            _print_outcome(results[-1])
        for init in args.resnet_inits:
            progress.begin(f"training ResNet {init} (ResNet-{resnet_depth}, seed {seed}) ...")
            resnet_results.append(run_resnet_init(init, data, seed_args, verbose=args.verbose))
            progress.end()
            _print_outcome(resnet_results[-1])

    print()
    print(title)
    print(format_table(results))
    if resnet_results:
        print(f"\n{resnet_title}")
        print(format_table(resnet_results))
    spread = _spread(results, "mlp") + _spread(resnet_results, "resnet")
    if len(args.seeds) > 1:
        print(f"\nSpread over seeds {seeds}: WN-MLP depth {args.depth}")
        print(format_spread([row for row in spread if row["network"] == "mlp"]))
        if resnet_results:
            print(f"\nSpread over seeds {seeds}: no-BN ResNet-{resnet_depth}")
            print(format_spread([row for row in spread if row["network"] == "resnet"]))
    # The curves of the first seed.
    first = args.seeds[0]
    plot([r for r in results if r["seed"] == first], output, title=title,
         steps_per_epoch=steps_per_epoch,
         resnet_results=[r for r in resnet_results if r["seed"] == first],
         resnet_title=resnet_title)
    config = {key: value for key, value in vars(args).items() if key not in ("output", "json")}
    config["steps_per_epoch"] = steps_per_epoch
    report = {"config": config, "results": results, "resnet_results": resnet_results}
    if len(args.seeds) > 1:
        report["spread"] = spread
    with open(json_path, "w") as file:
        json.dump(train_lib._jsonable(report), file, indent=2)
    print(f"\nwrote {output} and {json_path}")
    if recorder is not None:
        rows = ([_summary_row(r, "mlp") for r in results]
                + [_summary_row(r, "resnet") for r in resnet_results])
        recorder.write(args.json, train_lib._jsonable(rows),
                       **train_lib._jsonable({"preset": args.preset, "config": config,
                                              "cpu_s": time.process_time() - cpu_start,
                                              "spread": spread}))
    return report


if __name__ == "__main__":
    main()
