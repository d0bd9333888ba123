"""Learning-rate schedules used in the experiments of Arpit et al. (2019)."""

from __future__ import annotations

import keras
from keras import ops

from keras_goodinit import _validate

_Schedule = keras.optimizers.schedules.LearningRateSchedule


# The schedule computes in float32: a larger rate would be infinite.
_MAX_RATE = 3.4028234663852886e38


def _non_negative(name: str, value) -> float:
    return _validate.number(name, value, minimum=0, maximum=_MAX_RATE,
                            expected="a non-negative number that float32 can hold")


@keras.saving.register_keras_serializable(package="keras_goodinit")
class QuadraticWarmup(_Schedule):
    """Quadratic learning-rate warmup, then an optional schedule.

    During the first `warmup_steps` optimizer steps the learning rate is

        lr_i = initial_learning_rate
               + alpha**2 * (target_learning_rate - initial_learning_rate)

    with `alpha = step / warmup_steps` the progress through the warmup. From
    `warmup_steps` on it is `after(step - warmup_steps)` when `after` is a
    schedule, `after` when it is a number, and `target_learning_rate` when it
    is `None`. For a warmup of `E` epochs, `warmup_steps = E * steps_per_epoch`.

    Examples:

    >>> steps_per_epoch = 391  # CIFAR-10 at batch size 128
    >>> decay = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=195 * steps_per_epoch)
    >>> schedule = QuadraticWarmup(0.0, 0.1, warmup_steps=5 * steps_per_epoch, after=decay)
    >>> optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=0.9)

    Args:
        initial_learning_rate: `lr_0`, the learning rate at step 0.
        target_learning_rate: The learning rate reached at the end of the
            warmup.
        warmup_steps: Length of the warmup in optimizer steps, a non-negative
            int; 0 skips it.
        after: What follows the warmup: `None` (stay at
            `target_learning_rate`), a number, or a `LearningRateSchedule`
            whose step count starts at 0 when the warmup ends.
        name: Name of the schedule.

    The numbers may be Python or NumPy scalars; anything else (a string, a
    bool, a negative or non-finite number) raises a `ValueError` naming the
    argument.

    Reference:
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
    """

    def __init__(
        self,
        initial_learning_rate: float,
        target_learning_rate: float,
        warmup_steps: int,
        after: float | _Schedule | None = None,
        name: str = "QuadraticWarmup",
    ):
        self.initial_learning_rate = _non_negative("initial_learning_rate",
                                                   initial_learning_rate)
        self.target_learning_rate = _non_negative("target_learning_rate", target_learning_rate)
        warmup_steps = _validate.integer("warmup_steps", warmup_steps, minimum=0,
                                         expected="a non-negative int")
        self.warmup_steps = warmup_steps
        if isinstance(after, dict):
            after = keras.optimizers.schedules.deserialize(after)
        if after is not None and not isinstance(after, _Schedule):
            after = _validate.number(
                "after", after, minimum=0, maximum=_MAX_RATE,
                expected="None, a non-negative number that float32 can hold or a "
                         "LearningRateSchedule")
        self.after = after
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if self.warmup_steps > 0:
            alpha = ops.minimum(step / self.warmup_steps, 1.0)
        else:
            alpha = ops.ones_like(step)
        warm = self.initial_learning_rate + ops.square(alpha) * (
            self.target_learning_rate - self.initial_learning_rate)
        if self.after is None:
            return warm
        if isinstance(self.after, _Schedule):
            # Clamped at 0 so `after` never sees a negative step during the warmup.
            later = ops.cast(self.after(ops.maximum(step - self.warmup_steps, 0.0)), "float32")
        else:
            later = ops.full_like(step, self.after)
        return ops.where(step < self.warmup_steps, warm, later)

    def get_config(self) -> dict:
        after = self.after
        if isinstance(after, _Schedule):
            after = keras.optimizers.schedules.serialize(after)
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "target_learning_rate": self.target_learning_rate,
            "warmup_steps": self.warmup_steps,
            "after": after,
            "name": self.name,
        }
