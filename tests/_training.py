"""Shared by the callback and resume tests: what weights training starts from.

Not a test module (no `test_` prefix).
"""

import keras
import numpy as np


def values(model):
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.weights]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


class Peek(keras.callbacks.Callback):
    """Weights and optimizer steps at the start of training, after the other callbacks."""

    def on_train_begin(self, logs=None):
        self.weights = values(self.model)
        self.steps = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
