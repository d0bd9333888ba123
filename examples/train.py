r"""Trains the networks of Arpit et al. (2019) with keras-goodinit.

Reproduces the paper's experiments at any scale: weight-normalized MLPs and
CNNs of any depth, CIFAR ResNets and wide ResNets, each with the proposed init,
the default-WN / data-dependent / LSUV baselines, or BatchNorm.

Examples:

  # A 20-layer WN-MLP on the 8x8 digits of scikit-learn (no download), on CPU:
  python examples/train.py --dataset=digits --nn=mlp --depth=20 \
      --init=orthogonal_proposed --epochs=20 --output_dir=/tmp/digits_mlp20

  # ResNet-56 with the proposed init and a quadratic warmup, CIFAR-10 prepared
  # by tensorflow_datasets in /data/tfds (add --download to fetch it):
  python examples/train.py --dataset=cifar10 --data_dir=/data/tfds \
      --nn=resnet --num_blocks=9 --lr=0.1 --lr_schedule=step --warmup_epochs=5 --epochs=160 \
      --weight_decay=5e-4 --output_dir=/tmp/resnet56

  # WRN-40-10 with cutout:
  python examples/train.py --dataset=cifar10 --data_dir=/data/tfds \
      --nn=wrn --num_blocks=6 --wrn_k=10 \
      --cutout=16 --lr=0.1 --lr_schedule=cosine --warmup_epochs=5 --epochs=200

Writes to --output_dir: metrics.json (final and best test accuracy, final
train accuracy, the `diverged` flag, the init and signal reports and the flags),
history.csv (one row per epoch), init_signal.png (signal propagation at init)
and model.keras. --export_dir writes a TF SavedModel for serving.
"""

from __future__ import annotations

import json
import math
import os
import random
from typing import NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_goodinit as kg  # noqa: E402
from keras_goodinit import models  # noqa: E402
from keras_goodinit.schedules import QuadraticWarmup  # noqa: E402

DATASETS = ("digits", "mnist1d", "mnist", "cifar10", "cifar100")
NETWORKS = ("mlp", "cnn", "resnet", "wrn")
LR_SCHEDULES = ("constant", "cosine", "step")
# The train/test split of `digits` stays the same whatever --seed is.
_SPLIT_SEED = 0

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "digits", DATASETS, "Dataset to train on.")
flags.DEFINE_string("data_dir", None, "tensorflow_datasets data directory (mnist, cifar*) where "
                    "the dataset is prepared; tensorflow_datasets' default when unset.")
flags.DEFINE_bool("download", False, "Let tensorflow_datasets download and prepare a dataset "
                  "missing from --data_dir (needs network access); without it, a missing "
                  "dataset stops the script at once.")
flags.DEFINE_enum("nn", "mlp", NETWORKS, "Network: WN-MLP, WN-CNN, CIFAR ResNet or wide ResNet.")
flags.DEFINE_integer("depth", 3, "Hidden layers of the MLP, conv layers of the CNN.")
flags.DEFINE_integer("num_blocks", 1, "Residual blocks per stage (resnet: depth 6N+2; "
                     "wrn: n of WRN-(6n+4)-k).")
flags.DEFINE_integer("hidden_size", None, "Width of the MLP/CNN layers (default 128) or of "
                     "the ResNet's first stage (default 16). Ignored by wrn.")
flags.DEFINE_integer("wrn_k", 1, "Widening factor k of the wide ResNet.")
flags.DEFINE_bool("weight_norm", True, "Wrap the hidden layers in WeightNormalization.")
flags.DEFINE_bool("batch_norm", False, "Add BatchNormalization after every hidden layer.")
flags.DEFINE_enum("init", "orthogonal_proposed", models.INITS, "Initialization.")
flags.DEFINE_float("lr", 0.01, "Learning rate (SGD).")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay of the SGD optimizer.")
flags.DEFINE_enum("lr_schedule", "constant", LR_SCHEDULES,
                  "After the warmup: constant, cosine decay to 0, or /10 at 50% and 75%.")
flags.DEFINE_float("warmup_epochs", 0.0, "Epochs of quadratic warmup from --warmup_lr to --lr.")
flags.DEFINE_float("warmup_lr", 0.0, "Learning rate at the start of the warmup.")
flags.DEFINE_integer("epochs", 10, "Training epochs.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("seed", 0, "Seed of the model, the shuffling and the augmentation.")
flags.DEFINE_integer("cutout", 0, "Side of the cutout square for CIFAR, 0 for none (DeVries "
                     "& Taylor use 16 on CIFAR-10, 8 on CIFAR-100).")
flags.DEFINE_bool("signal_plot", True, "Write init_signal.png (one forward and backward pass).")
flags.DEFINE_string("output_dir", None, "Where to write metrics, history, plot and model.")
flags.DEFINE_string("export_dir", None, "Where to export a TF SavedModel for serving.")

_FLAG_NAMES = ("dataset", "data_dir", "download", "nn", "depth", "num_blocks", "hidden_size",
               "wrn_k", "weight_norm", "batch_norm", "init", "lr", "momentum", "weight_decay",
               "lr_schedule", "warmup_epochs", "warmup_lr", "epochs", "batch_size", "seed",
               "cutout", "signal_plot", "output_dir", "export_dir")


class Data(NamedTuple):
    """A dataset as arrays, inputs standardized, labels as int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    augment: bool  # CIFAR-style random crop and flip


def _standardize(x_train: np.ndarray, x_test: np.ndarray):
    """Per-channel zero mean and unit variance, with the training set's statistics."""
    x_train = x_train.astype("float32")
    axes = tuple(range(x_train.ndim - 1))
    mean = x_train.mean(axis=axes)
    std = x_train.std(axis=axes) + 1e-7
    return (x_train - mean) / std, (x_test.astype("float32") - mean) / std


class DatasetNotPreparedError(ValueError):
    """A TFDS dataset is not prepared in the data directory and downloading was not asked for."""


def _load_tfds(name: str, data_dir: str | None, download: bool):
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    # Without data, tfds.load would try to download and, offline, retry for minutes.
    if not download and not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"Dataset {name!r} is not prepared in the tensorflow_datasets directory "
            f"{builder.data_dir}. Pass --data_dir=DIR with DIR a directory where it is "
            f"prepared (`tfds build {name} --data_dir=DIR` makes one, on a machine with "
            f"network access), or pass --download to let tensorflow_datasets download it "
            f"now. Received: data_dir={data_dir!r}"
        )
    arrays = []
    for split in ("train", "test"):
        dataset = tfds.load(name, split=split, as_supervised=True, data_dir=data_dir,
                            download=download)
        # Chunks rather than batch_size=-1, which tfds' mock data does not support.
        chunks = list(tfds.as_numpy(dataset.batch(10000)))
        arrays.append((np.concatenate([c[0] for c in chunks]),
                       np.concatenate([c[1] for c in chunks]).astype("int32")))
    return arrays


def load_data(dataset: str, data_dir: str | None = None, download: bool = False) -> Data:
    """Loads `dataset` (one of `DATASETS`) as standardized arrays.

    `digits` (scikit-learn's 8x8 images) and `mnist1d` are generated locally;
    `mnist`, `cifar10` and `cifar100` come through tensorflow_datasets, from
    `data_dir` (tensorflow_datasets' default directory when `None`). A TFDS
    dataset that is not prepared there raises `DatasetNotPreparedError` (a
    `ValueError`) at once, unless `download=True` lets tensorflow_datasets
    download and prepare it.
    """
    if dataset == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x_train, x_test, y_train, y_test = train_test_split(
            digits.images[..., None], digits.target.astype("int32"), test_size=0.25,
            random_state=_SPLIT_SEED, stratify=digits.target)
        x_train, x_test = _standardize(x_train, x_test)
        return Data(x_train, y_train, x_test, y_test, 10, augment=False)
    if dataset == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        # make_dataset reseeds the global RNGs: keep the caller's streams.
        numpy_state, python_state = np.random.get_state(), random.getstate()
        try:
            raw = make_dataset(get_dataset_args())
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
        # (length, 1): a sequence with one channel, for 1D convolutions.
        return Data(raw["x"][..., None].astype("float32"), raw["y"].astype("int32"),
                    raw["x_test"][..., None].astype("float32"), raw["y_test"].astype("int32"),
                    10, augment=False)
    if dataset in ("mnist", "cifar10", "cifar100"):
        (x_train, y_train), (x_test, y_test) = _load_tfds(dataset, data_dir, download)
        x_train, x_test = _standardize(x_train, x_test)
        num_classes = 100 if dataset == "cifar100" else 10
        return Data(x_train, y_train, x_test, y_test, num_classes,
                    augment=dataset.startswith("cifar"))
    raise ValueError(f"Unknown dataset. Expected one of {DATASETS}. Received: dataset={dataset!r}")


def _cutout(image, size: int):
    """Zeroes (the mean, after standardization) a size x size square at a random center."""
    shape = tf.shape(image)
    center_y = tf.random.uniform([], 0, shape[0], dtype=tf.int32)
    center_x = tf.random.uniform([], 0, shape[1], dtype=tf.int32)
    rows = tf.range(shape[0])[:, None] - (center_y - size // 2)
    cols = tf.range(shape[1])[None, :] - (center_x - size // 2)
    inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    return image * tf.cast(~inside, image.dtype)[..., None]


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, *, training: bool,
                 augment: bool = False, cutout: int = 0, seed: int = 0) -> tf.data.Dataset:
    """A tf.data pipeline: shuffle (training), augment (training), batch, prefetch.

    Augmentation pads 4 pixels, crops back at random and flips left-right
    (`augment=True`), then cuts out a `cutout` x `cutout` square.
    """
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)

        def augment_fn(image, label):
            if augment:
                height, width = image.shape[0], image.shape[1]
                image = tf.image.resize_with_crop_or_pad(image, height + 8, width + 8)
                image = tf.image.random_crop(image, (height, width, image.shape[2]))
                image = tf.image.random_flip_left_right(image)
            if cutout:
                image = _cutout(image, cutout)
            return image, label

        if augment or cutout:
            dataset = dataset.map(augment_fn, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def build_model(nn: str, input_shape: tuple[int, ...], num_classes: int, *, depth: int = 3,
                num_blocks: int = 1, hidden_size: int | None = None, wrn_k: int = 1,
                init: str = "orthogonal_proposed", weight_norm: bool = True,
                batch_norm: bool = False, seed: int | None = None) -> keras.Model:
    """Builds one of `NETWORKS` with the builders of `keras_goodinit.models`."""
    common = {"init": init, "weight_norm": weight_norm, "batch_norm": batch_norm, "seed": seed}
    if nn == "mlp":
        return models.wn_mlp(input_shape, num_classes, depth, width=hidden_size or 128, **common)
    if nn == "cnn":
        return models.wn_cnn(input_shape, num_classes, depth, width=hidden_size or 128, **common)
    if nn == "resnet":
        return models.wn_resnet(input_shape, num_classes, num_blocks, width=hidden_size or 16,
                                **common)
    if nn == "wrn":
        return models.wn_wide_resnet(input_shape, num_classes, n=num_blocks, k=wrn_k, **common)
    raise ValueError(f"Unknown network. Expected one of {NETWORKS}. Received: nn={nn!r}")


def prepare_init(model: keras.Model, init: str, batch: np.ndarray, verbose: int = 1):
    """Runs the data-dependent part of `init` on one batch of inputs.

    `*_datadep` runs `weightnorm_data_init`, `lsuv` runs `lsuv_init`; the other
    inits are complete once the model is built.

    Returns:
        The `InitReport` of the procedure, or `None` when there is none.
    """
    if init.endswith("_datadep"):
        return kg.weightnorm_data_init(model, batch, verbose=verbose)
    if init == "lsuv":
        return kg.lsuv_init(model, batch, verbose=verbose)
    return None


def make_schedule(lr: float, lr_schedule: str, epochs: int, steps_per_epoch: int,
                  warmup_epochs: float = 0.0, warmup_lr: float = 0.0):
    """The learning rate (float or schedule): optional quadratic warmup, then `lr_schedule`."""
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    decay_steps = max(epochs * steps_per_epoch - warmup_steps, 1)
    after = None
    if lr_schedule == "cosine":
        after = keras.optimizers.schedules.CosineDecay(lr, decay_steps)
    elif lr_schedule == "step":
        # He et al. (2016): divide by 10 at 50% and 75% of training.
        first = max(decay_steps // 2, 1)
        second = max(3 * decay_steps // 4, first + 1)
        after = keras.optimizers.schedules.PiecewiseConstantDecay(
            [first, second], [lr, lr * 0.1, lr * 0.01])
    elif lr_schedule != "constant":
        raise ValueError(f"Unknown schedule. Expected one of {LR_SCHEDULES}. "
                         f"Received: lr_schedule={lr_schedule!r}")
    if warmup_steps > 0:
        return QuadraticWarmup(warmup_lr, lr, warmup_steps, after=after)
    return lr if after is None else after


class DivergenceMonitor(keras.callbacks.TerminateOnNaN):
    """Stops training at the first NaN or infinite loss and remembers that it did."""

    def __init__(self):
        super().__init__()
        self.diverged = False

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.diverged = True
        super().on_batch_end(batch, logs)


def train(model: keras.Model, data: Data, *, epochs: int, batch_size: int, lr: float,
          momentum: float = 0.9, weight_decay: float = 0.0, lr_schedule: str = "constant",
          warmup_epochs: float = 0.0, warmup_lr: float = 0.0, cutout: int = 0, seed: int = 0,
          output_dir: str | None = None, verbose: int = 1) -> dict:
    """Trains `model` with SGD on `data`, evaluating on the test split every epoch.

    Returns:
        A dict with `final_test_accuracy`, `best_test_accuracy`,
        `final_train_accuracy` (the last epoch's running accuracy),
        `final_train_loss`, `epochs_run` and `diverged` (a NaN or infinite loss
        stopped training).
    """
    steps_per_epoch = math.ceil(len(data.x_train) / batch_size)
    optimizer = keras.optimizers.SGD(
        make_schedule(lr, lr_schedule, epochs, steps_per_epoch, warmup_epochs, warmup_lr),
        momentum=momentum, weight_decay=weight_decay or None)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    # Create the optimizer's and the metrics' variables now: Keras (TF, no distribution
    # strategy) defers that to the first trace of the train step, and a trace that
    # creates variables is traced again, which doubles the first epoch of a deep model.
    model.optimizer.build(model.trainable_variables)
    model.compute_metrics(None, data.y_train[:1], model(data.x_train[:1]), sample_weight=None)
    model.reset_metrics()
    monitor = DivergenceMonitor()
    callbacks = [monitor]
    if output_dir:
        callbacks.append(keras.callbacks.CSVLogger(os.path.join(output_dir, "history.csv")))
    train_data = make_dataset(data.x_train, data.y_train, batch_size, training=True,
                              augment=data.augment, cutout=cutout, seed=seed)
    test_data = make_dataset(data.x_test, data.y_test, batch_size, training=False)
    # shuffle=False: the pipeline shuffles; Keras would only warn that it cannot.
    history = model.fit(train_data, epochs=epochs, validation_data=test_data, shuffle=False,
                        callbacks=callbacks, verbose=verbose).history
    test_accuracy = [a for a in history.get("val_accuracy", []) if np.isfinite(a)]
    return {
        "final_test_accuracy": float(history["val_accuracy"][-1]),
        "best_test_accuracy": float(max(test_accuracy)) if test_accuracy else float("nan"),
        "final_train_accuracy": float(history["accuracy"][-1]),
        "final_train_loss": float(history["loss"][-1]),
        "epochs_run": len(history["loss"]),
        "diverged": monitor.diverged,
    }


def _jsonable(value):
    """Plain JSON: numpy values as Python ones, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.cutout and not FLAGS.dataset.startswith("cifar"):
        raise app.UsageError(f"--cutout is a CIFAR augmentation. Received: "
                             f"--cutout={FLAGS.cutout} with --dataset={FLAGS.dataset}")
    tf.get_logger().setLevel("WARNING")  # no INFO chatter from model.export
    keras.utils.set_random_seed(FLAGS.seed)
    output_dir = FLAGS.output_dir
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)

    try:
        data = load_data(FLAGS.dataset, FLAGS.data_dir, download=FLAGS.download)
    except DatasetNotPreparedError as error:
        # The message and exit status 1, without a traceback or the flags' help.
        raise SystemExit(f"train.py: {error}") from None
    model = build_model(FLAGS.nn, data.x_train.shape[1:], data.num_classes, depth=FLAGS.depth,
                        num_blocks=FLAGS.num_blocks, hidden_size=FLAGS.hidden_size,
                        wrn_k=FLAGS.wrn_k, init=FLAGS.init, weight_norm=FLAGS.weight_norm,
                        batch_norm=FLAGS.batch_norm, seed=FLAGS.seed)
    # One random training batch drives the data-dependent inits and the signal report.
    order = np.random.default_rng(FLAGS.seed).permutation(len(data.x_train))
    batch = order[:FLAGS.batch_size]
    init_report = prepare_init(model, FLAGS.init, data.x_train[batch])
    if init_report is not None:
        init_report.summary()
    signal = None
    if FLAGS.signal_plot and output_dir:
        signal = kg.signal_report(model, (data.x_train[batch], data.y_train[batch]),
                                  gradients=True, seed=FLAGS.seed)
        signal.plot(os.path.join(output_dir, "init_signal.png"),
                    title=f"{model.name}, init={FLAGS.init}, at initialization")
        signal.summary()

    metrics = train(model, data, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, lr=FLAGS.lr,
                    momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay,
                    lr_schedule=FLAGS.lr_schedule, warmup_epochs=FLAGS.warmup_epochs,
                    warmup_lr=FLAGS.warmup_lr, cutout=FLAGS.cutout, seed=FLAGS.seed,
                    output_dir=output_dir)
    metrics["init_report"] = None if init_report is None else init_report.to_dict()
    metrics["signal_report"] = None if signal is None else signal.to_dict()
    metrics["flags"] = {name: FLAGS[name].value for name in _FLAG_NAMES}
    if output_dir:
        with open(os.path.join(output_dir, "metrics.json"), "w") as file:
            json.dump(_jsonable(metrics), file, indent=2)
        model.save(os.path.join(output_dir, "model.keras"))
    if FLAGS.export_dir:
        model.export(FLAGS.export_dir, format="tf_saved_model", verbose=False)
    status = "DIVERGED" if metrics["diverged"] else "done"
    print(f"{model.name} {FLAGS.init}: {status}; test accuracy "
          f"{metrics['final_test_accuracy']:.4f} (best {metrics['best_test_accuracy']:.4f}), "
          f"train accuracy {metrics['final_train_accuracy']:.4f}")


if __name__ == "__main__":
    app.run(main)
