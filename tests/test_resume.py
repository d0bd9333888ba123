"""`LSUVCallback` with `BackupAndRestore` and `ModelCheckpoint`: init never overwrites training.

Each scenario trains, is interrupted (an exception raised from a callback, as a
preempted job or a Ctrl-C would) or saved, and is then resumed the way a user
would resume it: the same model object (a notebook), or a fresh model object
built by the same code (a restarted job), or a model loaded from a checkpoint.
A `Peek` callback placed *after* every other callback records the weights that
training actually starts from; they must be bit-identical to the trained ones.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _training import Peek, same, values  # noqa: E402
from keras import layers as L  # noqa: E402

from keras_goodinit import GoodInit, LSUVCallback, WeightNormalization  # noqa: E402

X = np.random.default_rng(0).normal(size=(64, 16)).astype("float32") * 3.0
Y = np.random.default_rng(1).normal(size=(64, 4)).astype("float32")
BATCH = 16  # 4 steps per epoch


def build(seed=0):
    """The same architecture every time (a job's model-building code); weights depend on seed."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((16,)),
        WeightNormalization(L.Dense(32, activation="relu",
                                    kernel_initializer=GoodInit("wn_relu")), name="wn"),
        L.Dense(16, activation="relu", name="hidden"),
        L.Dense(4, name="out"),
    ], name="job")
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "mse", jit_compile=False)
    return model


class Interrupt(keras.callbacks.Callback):
    """Raises at the end of epoch `epoch` (or of batch `batch` of the first epoch)."""

    def __init__(self, epoch=None, batch=None):
        super().__init__()
        self.epoch, self.batch = epoch, batch
        self.weights = None

    def _stop(self):
        self.weights = values(self.model)
        raise RuntimeError("preempted")

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self._stop()

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            self._stop()


def interrupted_run(backup_dir, interrupt, save_freq="epoch"):
    model = build()
    with pytest.raises(RuntimeError, match="preempted"):
        model.fit(X, Y, batch_size=BATCH, epochs=5, verbose=0, shuffle=False, callbacks=[
            LSUVCallback(X[:32], verbose=0),
            keras.callbacks.BackupAndRestore(str(backup_dir), save_freq=save_freq),
            interrupt])
    return model


@pytest.mark.parametrize("order", ["lsuv_first", "backup_first"])
@pytest.mark.parametrize("method", ["lsuv", "weightnorm_data_init"])
def test_restarted_job_resumes_from_the_backup_not_from_a_new_init(tmp_path, order, method):
    interrupt = Interrupt(epoch=1)
    interrupted_run(tmp_path / "backup", interrupt)
    assert interrupt.weights is not None
    # A restarted job: a fresh model object (optimizer at step 0, not marked as initialized).
    model = build()
    init = LSUVCallback(X[:32], method=method, verbose=0)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    peek = Peek()
    callbacks = [init, backup] if order == "lsuv_first" else [backup, init]
    history = model.fit(X, Y, batch_size=BATCH, epochs=5, verbose=0, shuffle=False,
                        callbacks=callbacks + [peek])
    assert same(peek.weights, interrupt.weights)
    assert peek.steps == 2 * (64 // BATCH)  # the optimizer state came back too
    assert history.epoch == [2, 3, 4]
    if order == "backup_first":
        assert init.report is None  # it saw the restored optimizer steps and stood down


def test_the_same_model_object_resumes_without_a_new_init(tmp_path):
    interrupt = Interrupt(epoch=2)
    model = interrupted_run(tmp_path / "backup", interrupt)
    init, peek = LSUVCallback(X[:32], verbose=0), Peek()
    history = model.fit(X, Y, batch_size=BATCH, epochs=5, verbose=0, shuffle=False, callbacks=[
        init, keras.callbacks.BackupAndRestore(str(tmp_path / "backup")), peek])
    assert init.report is None and same(peek.weights, interrupt.weights)
    assert history.epoch == [3, 4]


def test_interruption_mid_epoch_resumes_from_the_batch_backup(tmp_path):
    interrupt = Interrupt(batch=2)  # after steps 1, 2, 3; backups every 3 steps... see below
    interrupted_run(tmp_path / "backup", interrupt, save_freq=3)
    model = build()
    init, peek = LSUVCallback(X[:32], verbose=0), Peek()
    model.fit(X, Y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False, callbacks=[
        init, keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), save_freq=3), peek])
    # Batch index 2 is the 3rd step: the backup taken there holds the interrupted weights.
    assert peek.steps == 3 and same(peek.weights, interrupt.weights)


def test_crash_before_the_first_backup_starts_over_with_a_fresh_init(tmp_path):
    interrupt = Interrupt(batch=0)  # no backup yet (saves at epoch end)
    interrupted_run(tmp_path / "backup", interrupt)
    model = build()
    built = values(model)
    init, peek = LSUVCallback(X[:32], verbose=0), Peek()
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup")), init, peek])
    assert init.report is not None and init.report.ok
    assert peek.steps == 0 and not same(peek.weights, built)


@pytest.mark.parametrize("method", ["lsuv", "weightnorm_data_init"])
@pytest.mark.parametrize("load", [
    "keras_file", "weights_h5_optimizer_built",
    # The optimizer's state is not restored in these two (its step count reads 0), so only
    # the weights themselves tell the callback that they are not fresh.
    "weights_h5", "keras_file_compile_false",
])
def test_model_reloaded_from_a_checkpoint_keeps_its_weights(tmp_path, method, load):
    model = build()
    weights_only = load.startswith("weights_h5")
    path = str(tmp_path / ("ckpt.weights.h5" if weights_only else "ckpt.keras"))
    init = LSUVCallback(X[:32], method=method, verbose=0)
    model.fit(X, Y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[
        init, keras.callbacks.ModelCheckpoint(path, save_weights_only=weights_only)])
    assert init.report is not None
    trained = values(model)
    if weights_only:
        restored = build(seed=1)  # other starting weights, overwritten by the file
        if load == "weights_h5_optimizer_built":  # the optimizer state can then load too
            restored.optimizer.build(restored.trainable_variables)
        restored.load_weights(path)
    elif load == "keras_file_compile_false":
        restored = keras.saving.load_model(path, compile=False)
        restored.compile(keras.optimizers.SGD(0.01, momentum=0.9), "mse", jit_compile=False)
    else:
        restored = keras.saving.load_model(path)
    assert same(values(restored), trained)
    again, peek = LSUVCallback(X[:32], method=method, verbose=0), Peek()
    restored.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[again, peek])
    assert again.report is None
    assert same(peek.weights, trained)
    # load_weights before the optimizer is built skips the optimizer's variables (Keras warns).
    restored_steps = load in ("keras_file", "weights_h5_optimizer_built")
    assert peek.steps == (2 * (64 // BATCH) if restored_steps else 0)
    expected = "optimizer has already taken steps" if restored_steps else (
        "not what its initializer drew")
    assert expected in again.reason


def test_a_second_fit_and_a_new_optimizer_do_not_reinitialize():
    model = build()
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0,
              callbacks=[LSUVCallback(X[:32], verbose=0)])
    # The user recompiles (new optimizer, steps back at 0) and fits again, callback included.
    model.compile(keras.optimizers.Adam(1e-3), "mse", jit_compile=False)
    trained = values(model)
    init, peek = LSUVCallback(X[:32], verbose=0), Peek()
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[init, peek])
    assert init.report is None and peek.steps == 0 and same(peek.weights, trained)


def test_verbose_callback_prints_the_report_and_why_it_stands_down(capsys):
    model = build()
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0,
              callbacks=[LSUVCallback(X[:32], verbose=1)])
    printed = capsys.readouterr().out
    assert "lsuv: 3 layers" in printed
    model.fit(X, Y, batch_size=BATCH, epochs=1, verbose=0,
              callbacks=[LSUVCallback(X[:32], verbose=1)])
    assert "not re-initializing 'job'" in capsys.readouterr().out
