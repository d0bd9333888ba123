r"""The depth frontier: networks of 10, 100 and 1,000 layers trained on `digits`.

Each network is trained with the same optimizer, steps and seeds at every
depth, from several inits:

- `tanh_cnn`: Conv2D(3x3, tanh) x depth, no skips, no normalization, a Dense
  head: `critical` (delta-orthogonal at tanh's edge of chaos) and `default`;
- `tanh_mlp`: Dense(tanh) x depth: `critical` (orthogonal, edge of chaos), `default`;
- `wn_mlp`: the paper's weight-normalized ReLU MLP: `proposed`
  (`mean_field_init(head="paper")`, the paper's rule) and `default`;
- `resnet`: `h + W2 relu(W1 h)` x depth blocks, no normalization:
  `mean_field` (the paper's 1/N), `skipinit`, `fixup` and `default`.

`default` is Keras' own (Glorot-uniform kernels, zero biases). It prints a
table (network, init, depth: test accuracy, steps until the training loss
falls below a threshold, the input-output Jacobian's mean squared singular
value and spread at init, from the first hidden layer's output to the last's:
the deep stack, whose input is at the fixed point), writes it as JSON, and
draws accuracy against depth.

Examples:

  # The whole study (what docs/depth-frontier.md reports; hours on 2 cores):
  python examples/depth_frontier.py --depths=10,100,1000 --seeds=0,1,2 \
      --output=benchmarks/results/depth_frontier.json --plot=docs/depth_frontier.png

  # The table and plot of runs made in several processes:
  python examples/depth_frontier.py --report=a.json,b.json --plot=docs/depth_frontier.png

  # The tanh networks with q* = 0.3 / depth and no biases (the isometric setting):
  python examples/depth_frontier.py --nets=tanh_cnn,tanh_mlp --q_star_depth=0.3 --nobias

  # One network, quickly:
  python examples/depth_frontier.py --nets=tanh_mlp --depths=10,100 --seeds=0

Each (network, depth) is built and compiled once; every init and seed then
re-initializes its weights and the optimizer's state, so a 1,000-layer model
pays its graph construction (about 1.5 minutes on 2 cores) once.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_goodinit as kg  # noqa: E402
from keras_goodinit import models  # noqa: E402
from keras_goodinit.weight_norm import unit_norms  # noqa: E402

# Keras builds and traces a model layer by layer with recursion: 1,000 layers need more
# than Python's default limit of 1,000 frames.
sys.setrecursionlimit(100_000)

NETS = {
    "tanh_cnn": ("critical", "default"),
    "tanh_mlp": ("critical", "default"),
    "wn_mlp": ("proposed", "default"),
    "resnet": ("mean_field", "skipinit", "fixup", "default"),
}

FLAGS = flags.FLAGS
flags.DEFINE_list("nets", list(NETS), "Networks to train: " + ", ".join(NETS))
flags.DEFINE_list("depths", ["10", "100", "1000"], "Depths (layers; blocks for resnet).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: each init is trained once per seed.")
flags.DEFINE_list("inits", None, "Only these inits (default: every init of each network).")
flags.DEFINE_integer("steps", 400, "SGD steps per run (batch 64); 0: the spectrum at init "
                     "only.")
flags.DEFINE_float("lr0", 0.1, "SGD (momentum 0.9) runs at learning rate lr0 / depth: the "
                   "neural tangent kernel of each of these networks grows like its depth, so "
                   "the stable step shrinks like 1 / depth.")
flags.DEFINE_integer("width", 64, "Units of the MLPs and of the ResNet's stream.")
flags.DEFINE_integer("channels", 8, "Channels of the CNN.")
_DEFAULT_Q_STAR = 0.01
flags.DEFINE_float("q_star", _DEFAULT_Q_STAR, "tanh's fixed point on the critical line.")
flags.DEFINE_float("q_star_depth", None, "If set, q* = q_star_depth / depth instead of "
                   "--q_star: the Jacobian's spread grows with depth x q* (Pennington et al. "
                   "2017), so q* ~ 1/depth keeps it bounded.")
flags.DEFINE_bool("bias", True, "Biases in the tanh networks. At q* ~ 1/depth a bias's gradient "
                  "is not scaled down with the signal (sqrt(q*)) as a kernel's is, so its step is "
                  "about 1/q* times larger: --nobias keeps such runs stable (the kernel alone "
                  "then holds q*, critical to O(q*^2) per layer).")
flags.DEFINE_float("threshold", 0.5, "The training loss (EMA, 0.9) whose first crossing is "
                   "reported as steps to threshold.")
flags.DEFINE_list("spectrum_seeds", None, "Measure the Jacobian's spectrum for these seeds "
                  "only (default: every seed); it costs about as much as 100 steps at depth "
                  "1,000.")
flags.DEFINE_string("output", None, "Write the rows as JSON here (merged with its rows).")
flags.DEFINE_string("plot", None, "Draw test accuracy against depth into this PNG.")
flags.DEFINE_list("report", None, "Train nothing: print the table of these JSON files' rows "
                  "together (and draw them with --plot).")

_BATCH = 64
_SPLIT_SEED = 0


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`sklearn`'s 8x8 digits (embedded: no download), standardized per pixel on train."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(x))
    x, y = x[order].astype("float32"), y[order].astype("int32")
    cut = int(0.8 * len(x))
    mean, std = x[:cut].mean(0), x[:cut].std(0)
    x = (x - mean) / np.where(std > 0, std, 1.0)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def build(net: str, depth: int) -> keras.Model:
    """The network `net` at `depth`, with Keras' default initializers."""
    width = FLAGS.width
    if net == "tanh_cnn":
        inputs = keras.Input((8, 8, 1))
        x = inputs
        for i in range(depth):
            x = keras.layers.Conv2D(FLAGS.channels, 3, padding="same", activation="tanh",
                                    use_bias=FLAGS.bias, name=f"conv{i + 1}")(x)
        x = keras.layers.Identity(name="features")(x)
        x = keras.layers.Flatten()(x)
        return keras.Model(inputs, keras.layers.Dense(10, name="head")(x))
    if net == "tanh_mlp":
        inputs = keras.Input((64,))
        x = inputs
        for i in range(depth):
            x = keras.layers.Dense(width, activation="tanh", use_bias=FLAGS.bias,
                                   name=f"dense{i + 1}")(x)
        x = keras.layers.Identity(name="features")(x)
        return keras.Model(inputs, keras.layers.Dense(10, name="head")(x))
    if net == "wn_mlp":
        return models.wn_mlp((64,), 10, depth, width, init="he", seed=0)  # its head: "logits"
    if net == "resnet":
        inputs = keras.Input((64,))
        h = keras.layers.Dense(width, name="stem")(inputs)
        for i in range(depth):
            y = keras.layers.Dense(width, activation="relu", name=f"block{i + 1}_a")(h)
            h = h + keras.layers.Dense(width, name=f"block{i + 1}_b")(y)
        h = keras.layers.Identity(name="features")(h)
        return keras.Model(inputs, keras.layers.Dense(10, name="head")(h))
    raise ValueError(f"Unknown network. Received: net={net!r}")


def _kernel_layers(model):
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if hasattr(inner, "kernel"):
            yield layer, inner


def reinitialize(model: keras.Model, net: str, init: str, seed: int, x) -> None:
    """Sets every weight of `model` for (`init`, `seed`)."""
    keras.utils.set_random_seed(seed)
    generator = keras.random.SeedGenerator(seed)
    # Keras' defaults first (for every init: the head and what an init does not set).
    for layer, inner in _kernel_layers(model):
        inner.kernel.assign(keras.initializers.GlorotUniform(seed=generator)(inner.kernel.shape))
        if getattr(inner, "bias", None) is not None:
            inner.bias.assign(keras.ops.zeros(inner.bias.shape))
        if layer is not inner:  # WeightNormalization: g = ||v||, what the plain layer computes
            layer.g.assign(unit_norms(inner.kernel.value, layer.layout))
    if init == "default":
        return
    if init == "critical":
        # Every pre-activation aimed at tanh's fixed point q* on the critical line (the
        # first layer from the data's own scale), biases N(0, sigma_b2), orthogonal kernels
        # (delta-orthogonal for convolutions).
        distribution = "delta_orthogonal" if net == "tanh_cnn" else "orthogonal"
        kg.mean_field_init(model, criterion="critical", q_star=_q_star(model),
                           distribution=distribution, input_variance=float(np.mean(x**2)),
                           input_mean=float(np.mean(x)),
                           seed=seed, verbose=0)
        return
    if init == "proposed":
        kg.mean_field_init(model, head="paper", seed=seed, verbose=0)
        return
    residual = {"mean_field": "scaled", "skipinit": "skipinit", "fixup": "fixup"}[init]
    kg.mean_field_init(model, residual=residual, seed=seed, verbose=0)


def _q_star(model) -> float:
    depth = sum(1 for _ in _kernel_layers(model)) - 1  # the hidden layers
    return FLAGS.q_star if FLAGS.q_star_depth is None else FLAGS.q_star_depth / depth


def _setting(net: str, init: str) -> str:
    """How the run differs from the defaults, where it does ("" if not): part of its label."""
    if not net.startswith("tanh"):
        return ""
    parts = []
    if init == "critical" and FLAGS.q_star_depth is not None:
        parts = [f"q* = {FLAGS.q_star_depth:g}/depth"]
    elif init == "critical" and FLAGS.q_star != _DEFAULT_Q_STAR:
        parts = [f"q* = {FLAGS.q_star:g}"]
    return ", ".join(parts + ([] if FLAGS.bias else ["no bias"]))


def _label(row: dict) -> str:
    return row["init"] + (f" ({row['setting']})" if row.get("setting") else "")


def _order(net: str, label: str) -> int:
    """Where a label's init stands among its network's (rows from elsewhere go last)."""
    init = label.split(" (")[0]
    return NETS[net].index(init) if init in NETS.get(net, ()) else len(NETS.get(net, ()))


def _reset_optimizer(model) -> None:
    for variable in model.optimizer.variables:
        if not variable.path.endswith("learning_rate"):  # the step count and momenta
            variable.assign(keras.ops.zeros(variable.shape, variable.dtype))


def train(model, data, seed: int) -> dict:
    """`FLAGS.steps` SGD steps from the model's current weights; the run's figures."""
    x_train, y_train, x_test, y_test = data
    _reset_optimizer(model)
    rng = np.random.default_rng(1000 + seed)
    order = np.array([], dtype=int)
    ema, reached, losses = None, None, []
    start = time.perf_counter()
    for step in range(1, FLAGS.steps + 1):
        if len(order) < _BATCH:
            order = np.concatenate([order, rng.permutation(len(x_train))])
        batch, order = order[:_BATCH], order[_BATCH:]
        loss = float(model.train_on_batch(x_train[batch], y_train[batch]))
        losses.append(loss)
        if not math.isfinite(loss):
            break
        ema = loss if ema is None else 0.9 * ema + 0.1 * loss
        if reached is None and ema < FLAGS.threshold:
            reached = step
    seconds = time.perf_counter() - start
    finite = all(math.isfinite(v) for v in losses)
    accuracy = float(np.mean(np.argmax(model.predict(x_test, verbose=0), -1) == y_test)) \
        if finite else 0.1
    return {"test_accuracy": accuracy, "steps_to_threshold": reached, "diverged": not finite,
            "final_loss": losses[-1], "max_loss": max(losses), "train_seconds": seconds,
            "steps": len(losses)}


def _first_hidden(model):
    return next(layer for layer, _ in _kernel_layers(model))


def _features(model):
    names = [layer.name for layer in model.layers]
    # wn_mlp (the package's builder) has no "features" layer: its head's input is the last one.
    return model.get_layer("features").output if "features" in names else \
        model.layers[-2].output


def spectrum_of(model, x) -> dict:
    """The Jacobian's spectrum at init from the first hidden layer's output to the last's."""
    first = _first_hidden(model)
    hidden = keras.Model(model.input, first.output)(x)
    deep = keras.Model(first.output, _features(model))
    found = kg.jacobian_spectrum(deep, hidden)
    return {"mean_squared": float(found.mean_squared), "spread": float(found.spread)}


def run_net(net: str, depth: int, data, seeds, inits, rows: list) -> None:
    start = time.perf_counter()
    model = build(net, depth)
    model.compile(keras.optimizers.SGD(FLAGS.lr0 / depth, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x_spec = data[0][:32].reshape((32, 8, 8, 1)) if net == "tanh_cnn" else data[0][:32]
    built = time.perf_counter() - start
    for init in inits:
        for seed in seeds:
            t0 = time.perf_counter()
            reinitialize(model, net, init, seed, data[0])
            init_seconds = time.perf_counter() - t0
            spectrum = (spectrum_of(model, x_spec) if FLAGS.spectrum_seeds is None
                        or str(seed) in FLAGS.spectrum_seeds else {})
            row = {"net": net, "init": init, "setting": _setting(net, init), "depth": depth,
                   "seed": seed,
                   "lr": FLAGS.lr0 / depth, "batch": _BATCH, "width": FLAGS.width,
                   "channels": FLAGS.channels, "q_star": _q_star(model),
                   "build_seconds": built, "init_seconds": init_seconds,
                   **spectrum, **(train(model, data, seed) if FLAGS.steps else {})}
            # The process's peak resident memory so far (Linux: KiB): what this depth needs.
            row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append(row)
            print(json.dumps(row), flush=True)
            built = 0.0


def summarize(rows: list) -> str:
    spectra = [r for r in rows if "test_accuracy" not in r]
    rows = [r for r in rows if "test_accuracy" in r]
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["net"], _label(row), row["depth"]), []).append(row)
    lines = ["| network | init | depth | test accuracy (mean, min-max) | steps to loss < "
             f"{FLAGS.threshold} | Jacobian mean sq. | spread | s/step | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (net, init, depth), group in sorted(groups.items(),
                                            key=lambda item: (list(NETS).index(item[0][0]),
                                                              item[0][1], item[0][2])):
        acc = [r["test_accuracy"] for r in group]
        steps = [r["steps_to_threshold"] for r in group]
        reached = [s for s in steps if s is not None]
        steps_text = (f"{np.median(reached):.0f}" if len(reached) == len(steps)
                      else f"{len(reached)}/{len(steps)} reached" +
                      (f" (median {np.median(reached):.0f})" if reached else ""))
        ms = [r.get("mean_squared") for r in group if r.get("mean_squared") is not None]
        spread = [r.get("spread") for r in group if r.get("spread") is not None]
        per_step = np.median([r["train_seconds"] / max(r["steps"], 1) for r in group])
        lines.append(
            f"| {net} | {init} | {depth} | {np.mean(acc):.3f} ({min(acc):.3f}-{max(acc):.3f}) | "
            f"{steps_text} | {np.median(ms):.3g} | {np.median(spread):.3g} | "
            f"{per_step:.3f} | {len(group)} |" if ms else
            f"| {net} | {init} | {depth} | {np.mean(acc):.3f} ({min(acc):.3f}-{max(acc):.3f}) | "
            f"{steps_text} | - | - | {per_step:.3f} | {len(group)} |")
    if spectra:
        lines += ["", "| network | init | depth | q* | Jacobian mean sq. | spread |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['net']} | {_label(r)} | {r['depth']} | {r['q_star']:.3g} | "
                  f"{r['mean_squared']:.3g} | {r['spread']:.3g} |"
                  for r in sorted(spectra, key=lambda r: (r["net"], r["depth"]))]
    return "\n".join(lines)


def plot(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if "test_accuracy" in r]  # not the spectrum-only rows
    nets = [n for n in NETS if any(r["net"] == n for r in rows)]
    fig, axes = plt.subplots(1, len(nets), figsize=(4 * len(nets), 3.4), squeeze=False)
    for ax, net in zip(axes[0], nets):
        labels = sorted({_label(r) for r in rows if r["net"] == net},
                        key=lambda label: (_order(net, label), label))
        for init in labels:
            mine = [r for r in rows if r["net"] == net and _label(r) == init]
            depths = sorted({r["depth"] for r in mine})
            if not depths:
                continue
            acc = [[r["test_accuracy"] for r in mine if r["depth"] == d] for d in depths]
            ax.errorbar(depths, [np.mean(a) for a in acc],
                        yerr=[[max(np.mean(a) - min(a), 0.0) for a in acc],
                              [max(max(a) - np.mean(a), 0.0) for a in acc]],
                        marker="o", capsize=3, label=init)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.axhline(0.1, color="grey", lw=0.8, ls=":")
        ax.set_title(net)
        ax.set_xlabel("depth")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv) -> None:
    del argv
    for net in FLAGS.nets:
        if net not in NETS:
            raise ValueError(f"Unknown network in --nets. Received: nets={FLAGS.nets!r}")
    if FLAGS.report:
        rows = []
        for path in FLAGS.report:
            with open(path) as f:
                rows += json.load(f)["rows"]
        print(summarize(rows))
        if FLAGS.plot:
            plot(rows, FLAGS.plot)
        return
    data = digits()
    seeds = [int(s) for s in FLAGS.seeds]
    rows = []
    if FLAGS.output and os.path.exists(FLAGS.output):
        with open(FLAGS.output) as f:
            rows = json.load(f)["rows"]
    for depth in [int(d) for d in FLAGS.depths]:
        for net in FLAGS.nets:
            inits = [i for i in NETS[net] if FLAGS.inits is None or i in FLAGS.inits]
            if not inits:
                continue
            mine = (data if net != "tanh_cnn" else
                    (data[0].reshape(-1, 8, 8, 1), data[1], data[2].reshape(-1, 8, 8, 1),
                     data[3]))
            rows = [r for r in rows if not (
                r["net"] == net and r["depth"] == depth and r["init"] in inits
                and r["seed"] in seeds and r.get("setting", "") == _setting(net, r["init"]))]
            run_net(net, depth, mine, seeds, inits, rows)
            if FLAGS.output:
                with open(FLAGS.output, "w") as f:
                    json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    print(summarize(rows))
    if FLAGS.plot:
        plot(rows, FLAGS.plot)


if __name__ == "__main__":
    app.run(main)
