"""Tests of examples/train.py. No test touches the network: TFDS runs on mock data."""

import csv
import importlib.util
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Imported, not importorskip'ed: the [examples] extra is part of the test setup, and a
# broken tensorflow_datasets install must fail here rather than skip the TFDS tests.
import tensorflow_datasets as tfds  # noqa: E402

import keras_goodinit as kg  # noqa: E402
from keras_goodinit import models  # noqa: E402
from keras_goodinit.schedules import QuadraticWarmup  # noqa: E402

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train.py"
# Imported once: the script defines absl flags, which may be defined only once per process.
_SPEC = importlib.util.spec_from_file_location("goodinit_train_example", _PATH)
# Registered under the name examples/compare_inits.py looks for, so that a test of that
# script in this process reuses this module rather than defining the absl flags twice.
train = sys.modules.setdefault(_SPEC.name, importlib.util.module_from_spec(_SPEC))
if not hasattr(train, "FLAGS"):
    _SPEC.loader.exec_module(train)

# The inits that run a data-dependent procedure after the build.
_DATA_INITS = ("he_datadep", "orthogonal_datadep", "lsuv")


def tiny_data(input_shape=(8, 8, 1), n_train=16, n_test=8, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return train.Data(
        rng.normal(size=(n_train, *input_shape)).astype("float32"),
        rng.integers(0, num_classes, n_train).astype("int32"),
        rng.normal(size=(n_test, *input_shape)).astype("float32"),
        rng.integers(0, num_classes, n_test).astype("int32"),
        num_classes, augment=False)


def run_main(**flag_values):
    argv = ["train.py"] + [f"--{name}={value}" for name, value in flag_values.items()]
    train.FLAGS(argv)
    try:
        train.main(argv[:1])
    finally:
        train.FLAGS.unparse_flags()


# (a) datasets ----------------------------------------------------------------------------------

def _prepare_metadata(name: str, data_dir, num_examples: int) -> None:
    """What `tfds build` leaves in `data_dir`, less the records: dataset_info.json and features.

    With these files, `builder.is_prepared()` is True, and under `tfds.testing.mock_data`
    the records are generated from them.
    """
    builder = tfds.builder(name, data_dir=str(data_dir))
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0)
        for split in ("train", "test")]))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)


@pytest.mark.parametrize("name, shape, augment", [
    ("mnist", (28, 28, 1), False), ("cifar10", (32, 32, 3), True)])
def test_tfds_datasets_on_mock_data(tmp_path, name, shape, augment):
    # The path a run with a prepared --data_dir takes: the builder finds the dataset
    # prepared, tfds.load reads it without downloading (mock_data supplies the records).
    _prepare_metadata(name, tmp_path, num_examples=12)
    with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path)):
        data = train.load_data(name, data_dir=str(tmp_path))
    assert data.x_train.shape == (12, *shape) and data.x_test.shape == (12, *shape)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert data.num_classes == 10 and data.augment == augment
    assert set(np.unique(data.y_train)) <= set(range(10))
    # Standardized per channel with the training statistics.
    np.testing.assert_allclose(data.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(data.x_train.std(axis=(0, 1, 2)), 1.0, atol=1e-3)


def test_download_flag_goes_through_tfds_download_path(tmp_path):
    # Nothing prepared: with download=True the builder downloads and prepares (mocked).
    with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
        data = train.load_data("cifar10", data_dir=str(tmp_path), download=True)
    assert data.x_train.shape == (6, 32, 32, 3) and data.augment


def test_tfds_download_path_resolves_its_imports(tmp_path):
    # Downloading starts by reading the builder's registered checksums, next to its code;
    # finding that code imports `importlib_resources`, which tensorflow-datasets 4.9.10
    # needs without declaring it (the [examples] extra brings it).
    builder_class = type(tfds.builder("cifar10", data_dir=str(tmp_path)))
    assert builder_class.code_path.suffix == ".py" and builder_class.code_path.exists()
    urls = builder_class.url_infos
    assert urls and all(url.startswith("https://") for url in urls)


def test_examples_extra_declares_importlib_resources():
    import configparser

    config = configparser.ConfigParser()
    config.read(_PATH.parents[1] / "setup.cfg")
    extra = config["options.extras_require"]["examples"].split()
    assert "importlib_resources" in extra and "tensorflow-datasets" in extra


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_missing_tfds_dataset_fails_fast_with_a_data_dir_hint(tmp_path, monkeypatch, name):
    def no_load(*args, **kwargs):
        raise AssertionError("tfds.load must not run for a dataset that is not prepared")

    monkeypatch.setattr(tfds, "load", no_load)
    start = time.monotonic()
    with pytest.raises(train.DatasetNotPreparedError,
                       match=f"Received: data_dir='{tmp_path}'") as info:
        train.load_data(name, data_dir=str(tmp_path))
    assert isinstance(info.value, ValueError)
    assert time.monotonic() - start < 30  # no network retries (they take minutes)
    message = str(info.value)
    assert "--data_dir" in message and "--download" in message
    assert str(tmp_path / name) in message and name in message


def test_main_exits_with_the_hint_for_a_missing_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds, "load", lambda *a, **k: pytest.fail("tfds.load was called"))
    with pytest.raises(SystemExit) as info:
        run_main(dataset="cifar10", data_dir=tmp_path / "empty", epochs=1,
                 output_dir=tmp_path / "out")
    # A string code: Python prints it to stderr and exits with status 1.
    assert isinstance(info.value.code, str) and info.value.code.startswith("train.py: ")
    assert "--data_dir" in info.value.code and "--download" in info.value.code
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_cifar_main_run_with_augmentation_on_mock_data(tmp_path):
    _prepare_metadata("cifar10", tmp_path / "tfds", num_examples=8)
    with tfds.testing.mock_data(num_examples=8, data_dir=str(tmp_path / "tfds")):
        run_main(dataset="cifar10", data_dir=tmp_path / "tfds", nn="cnn", depth=2,
                 hidden_size=4, cutout=8, epochs=1, batch_size=4, signal_plot=False,
                 output_dir=tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["flags"]["cutout"] == 8
    assert metrics["flags"]["download"] is False


def test_local_datasets():
    digits = train.load_data("digits")
    assert digits.x_train.shape == (1347, 8, 8, 1) and digits.x_test.shape == (450, 8, 8, 1)
    assert not digits.augment and digits.num_classes == 10
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    mnist1d = train.load_data("mnist1d")
    # mnist1d reseeds numpy's global RNG; load_data must give the caller its stream back.
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    assert mnist1d.x_train.shape == (4000, 40, 1) and mnist1d.x_test.shape == (1000, 40, 1)
    # The split does not depend on --seed: a second load gives the same arrays.
    np.testing.assert_array_equal(train.load_data("digits").y_test, digits.y_test)
    with pytest.raises(ValueError, match="Received: dataset='svhn'"):
        train.load_data("svhn")


def test_augmentation_and_cutout():
    x = np.ones((6, 32, 32, 3), "float32")
    y = np.arange(6, dtype="int32")
    dataset = train.make_dataset(x, y, batch_size=6, training=True, augment=True, cutout=8)
    images, labels = next(iter(dataset))
    assert images.shape == (6, 32, 32, 3) and sorted(labels.numpy()) == list(range(6))
    zeros = (images.numpy() == 0).all(axis=-1)  # padding of the crop and the cutout square
    assert zeros.any()
    square = train._cutout(tf.ones((32, 32, 3)), 8).numpy()
    holes = (square == 0).all(axis=-1)
    assert 16 <= holes.sum() <= 64  # an 8x8 square, clipped by the border at worst to 4x4
    rows, cols = np.nonzero(holes)
    assert holes.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # one rectangle
    test = train.make_dataset(x, y, batch_size=4, training=False)
    assert [b[1].numpy().tolist() for b in test] == [[0, 1, 2, 3], [4, 5]]  # in order, whole


# (b) every network x init x weight_norm x batch_norm -------------------------------------------

@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("weight_norm", [True, False])
@pytest.mark.parametrize("init", models.INITS)
@pytest.mark.parametrize("nn", train.NETWORKS)
def test_every_combination_takes_a_training_step(nn, init, weight_norm, batch_norm):
    data = tiny_data()
    model = train.build_model(nn, (8, 8, 1), 3, depth=2, num_blocks=1, hidden_size=4, wrn_k=1,
                              init=init, weight_norm=weight_norm, batch_norm=batch_norm, seed=0)
    report = train.prepare_init(model, init, data.x_train, verbose=0)
    assert (report is None) == (init not in _DATA_INITS)
    before = [w.copy() for w in model.get_weights()]
    # Eager: one traced step per combination would cost seconds; train() is tested below.
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=True)
    loss = model.train_on_batch(data.x_train, data.y_train)
    assert np.isfinite(loss)
    changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True)]
    assert any(changed)
    assert np.all(np.isfinite(model.predict_on_batch(data.x_test)))


@pytest.mark.parametrize("nn", train.NETWORKS)
def test_train_runs_one_epoch(nn):
    model = train.build_model(nn, (8, 8, 1), 3, depth=2, hidden_size=4, seed=0)
    metrics = train.train(model, tiny_data(), epochs=1, batch_size=8, lr=0.01,
                          lr_schedule="cosine", warmup_epochs=0.5, verbose=0)
    assert metrics["epochs_run"] == 1 and metrics["diverged"] is False
    assert 0.0 <= metrics["final_test_accuracy"] <= metrics["best_test_accuracy"] <= 1.0
    assert 0.0 <= metrics["final_train_accuracy"] <= 1.0
    assert model.optimizer.iterations.numpy() == 2  # 16 samples, batch 8


def test_make_schedule():
    assert train.make_schedule(0.1, "constant", 10, 5) == 0.1
    warm = train.make_schedule(0.1, "cosine", 10, 5, warmup_epochs=2, warmup_lr=0.01)
    assert isinstance(warm, QuadraticWarmup) and warm.warmup_steps == 10
    assert float(warm(0)) == pytest.approx(0.01)
    assert float(warm(10)) == pytest.approx(0.1)
    assert float(warm(50)) == pytest.approx(0.0, abs=1e-6)  # cosine reaches 0 at the end
    step = train.make_schedule(0.1, "step", 4, 10)  # 40 steps: /10 at 20, /100 at 30
    assert [float(step(s)) for s in (0, 21, 31)] == pytest.approx([0.1, 0.01, 0.001])


# (c) export ------------------------------------------------------------------------------------

def test_export_serves_the_same_predictions(tmp_path):
    run_main(dataset="digits", nn="resnet", num_blocks=1, hidden_size=4, batch_norm=True,
             epochs=1, batch_size=256, signal_plot=False, output_dir=tmp_path / "out",
             export_dir=tmp_path / "export")
    x = train.load_data("digits").x_test[:16]
    model = keras.saving.load_model(tmp_path / "out" / "model.keras")
    # Keep the loaded object referenced: its variables die with it.
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    served = loaded.serve(tf.constant(x)).numpy()
    expected = model.predict(x, verbose=0)
    assert served.shape == (16, 10)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)


# (d) divergence --------------------------------------------------------------------------------

def test_nan_loss_stops_training_and_is_recorded():
    model = train.build_model("mlp", (8, 8, 1), 3, depth=2, hidden_size=16, seed=0)
    data = tiny_data(n_train=32)
    metrics = train.train(model, data, epochs=5, batch_size=8, lr=1e10, verbose=0)
    assert metrics["diverged"] is True
    assert metrics["epochs_run"] == 1  # stopped during the first epoch
    assert not np.isfinite(metrics["final_train_loss"])
    calm = train.train(train.build_model("mlp", (8, 8, 1), 3, depth=2, hidden_size=16, seed=0),
                       data, epochs=1, batch_size=8, lr=0.01, verbose=0)
    assert calm["diverged"] is False


# (e) the whole script --------------------------------------------------------------------------

def test_main_writes_metrics_history_and_model(tmp_path):
    out = tmp_path / "run"
    run_main(dataset="digits", nn="mlp", depth=3, hidden_size=32, epochs=2, batch_size=128,
             lr=0.05, warmup_epochs=1, signal_plot=False, output_dir=out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["diverged"] is False and metrics["init_report"] is None
    assert metrics["flags"]["depth"] == 3 and metrics["flags"]["init"] == "orthogonal_proposed"
    assert metrics["best_test_accuracy"] >= metrics["final_test_accuracy"] > 0.2  # chance 0.1
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(metrics["final_test_accuracy"])
    model = keras.saving.load_model(out / "model.keras")
    assert isinstance(model.get_layer("dense1"), kg.WeightNormalization)
    assert not (out / "init_signal.png").exists()


def test_main_writes_signal_plot(tmp_path):
    run_main(dataset="digits", nn="mlp", depth=2, hidden_size=8, epochs=1, batch_size=64,
             output_dir=tmp_path)
    assert (tmp_path / "init_signal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    signal = json.loads((tmp_path / "metrics.json").read_text())["signal_report"]
    assert [row["name"] for row in signal["rows"]] == ["dense1", "dense2", "classifier"]


@pytest.mark.parametrize("init", ["lsuv", "orthogonal_datadep"])
def test_main_records_init_report(tmp_path, init):
    run_main(dataset="digits", nn="cnn", depth=2, hidden_size=8, init=init, epochs=1,
             batch_size=64, signal_plot=False, output_dir=tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert isinstance(metrics["init_report"], dict) and metrics["init_report"]


def test_main_rejects_cutout_outside_cifar(tmp_path):
    from absl import app

    with pytest.raises(app.UsageError, match="--cutout"):
        run_main(dataset="digits", cutout=8, output_dir=tmp_path)
