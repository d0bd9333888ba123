import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from keras_goodinit.schedules import QuadraticWarmup  # noqa: E402


def _value(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


@pytest.mark.parametrize("step, expected", [
    (0, 0.01),                              # lr_0
    (25, 0.01 + 0.25**2 * (0.1 - 0.01)),    # a quarter of the way: alpha^2 = 1/16
    (50, 0.01 + 0.5**2 * (0.1 - 0.01)),
    (100, 0.1),                             # end of the warmup
    (1000, 0.1),                            # no `after`: stays at the target
])
def test_warmup_ramp_is_quadratic(step, expected):
    schedule = QuadraticWarmup(0.01, 0.1, warmup_steps=100)
    assert _value(schedule, step) == pytest.approx(expected, rel=1e-6)


def test_after_schedule_starts_when_warmup_ends():
    decay = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    schedule = QuadraticWarmup(0.0, 0.1, warmup_steps=20, after=decay)
    assert _value(schedule, 10) == pytest.approx(0.025, rel=1e-6)
    assert _value(schedule, 20) == pytest.approx(0.1, rel=1e-6)
    assert _value(schedule, 30) == pytest.approx(0.05, rel=1e-6)   # decay's step 10
    assert _value(schedule, 40) == pytest.approx(0.025, rel=1e-6)  # decay's step 20


def test_after_number_and_zero_warmup():
    assert _value(QuadraticWarmup(0.0, 0.1, 10, after=0.05), 5) == pytest.approx(0.025)
    assert _value(QuadraticWarmup(0.0, 0.1, 10, after=0.05), 10) == pytest.approx(0.05)
    decay = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=1, decay_rate=0.5)
    no_warmup = QuadraticWarmup(0.0, 0.2, 0, after=decay)
    assert _value(no_warmup, 0) == pytest.approx(0.2)
    assert _value(no_warmup, 1) == pytest.approx(0.1)


@pytest.mark.parametrize("after", [
    None,
    0.02,
    keras.optimizers.schedules.CosineDecay(0.1, decay_steps=50, alpha=0.1),
])
def test_config_round_trip(after):
    schedule = QuadraticWarmup(0.001, 0.1, warmup_steps=30, after=after, name="warm")
    config = keras.optimizers.schedules.serialize(schedule)
    assert config["registered_name"] == "keras_goodinit>QuadraticWarmup"
    restored = keras.optimizers.schedules.deserialize(config)
    assert isinstance(restored, QuadraticWarmup)
    assert restored.get_config() == schedule.get_config()
    for step in (0, 7, 30, 55, 80):
        assert _value(restored, step) == pytest.approx(_value(schedule, step), rel=1e-6)


def test_fit_uses_the_schedule_and_model_saves(tmp_path):
    schedule = QuadraticWarmup(0.0, 0.1, warmup_steps=8, after=0.04)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    x, y = np.ones((16, 3), "float32"), np.zeros((16, 2), "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # 4 steps: alpha = 0.5
    assert float(model.optimizer.learning_rate) == pytest.approx(0.025, rel=1e-6)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # 8 steps: the warmup is over
    assert float(model.optimizer.learning_rate) == pytest.approx(0.04, rel=1e-6)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path).optimizer.learning_rate
    assert float(restored) == pytest.approx(0.04, rel=1e-6)


@pytest.mark.parametrize("kwargs, name", [
    ({"initial_learning_rate": -0.1}, "initial_learning_rate"),
    ({"target_learning_rate": float("nan")}, "target_learning_rate"),
    ({"target_learning_rate": "0.1"}, "target_learning_rate"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_steps": 2.5}, "warmup_steps"),
    ({"after": "cosine"}, "after"),
    ({"after": -1.0}, "after"),
])
def test_bad_arguments(kwargs, name):
    args = {"initial_learning_rate": 0.0, "target_learning_rate": 0.1, "warmup_steps": 10}
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"Received: {name}="):
        QuadraticWarmup(**args)


def test_numpy_scalars_are_accepted_like_python_numbers():
    from_numpy = QuadraticWarmup(np.float32(0.0), np.float64(0.1), np.int64(10),
                                 after=np.float32(0.05))
    from_python = QuadraticWarmup(0.0, 0.1, 10, after=float(np.float32(0.05)))
    assert from_numpy.get_config() == from_python.get_config()
    config = from_numpy.get_config()
    assert type(config["warmup_steps"]) is int and type(config["target_learning_rate"]) is float
    for step in (0, 5, 10, 20):
        assert _value(from_numpy, step) == _value(from_python, step)


@pytest.mark.parametrize("kwargs, message", [
    ({"warmup_steps": np.float64(10.0)}, "Received: warmup_steps=np.float64(10.0)"),
    ({"warmup_steps": True}, "Received: warmup_steps=True"),
    ({"target_learning_rate": np.float32("inf")}, "Received: target_learning_rate=inf"),
    ({"target_learning_rate": 1e300}, "Received: target_learning_rate=1e+300"),
    ({"initial_learning_rate": np.bool_(False)}, "Received: initial_learning_rate=np.False_"),
    ({"after": 1e39}, "Received: after=1e+39"),
])
def test_bad_numpy_and_out_of_range_arguments(kwargs, message):
    args = {"initial_learning_rate": 0.0, "target_learning_rate": 0.1, "warmup_steps": 10}
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        QuadraticWarmup(**args)
    assert message in str(info.value) and str(info.value).startswith("Argument `")
