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


def frozen_body_trained_head(x, y, *, epochs: int, learning_rate_after: float, **compile_kw):
    """A fresh frozen body (checkable), a bias-free unseeded GoodInit head (not), trained.

    Recompiled with a new optimizer at step 0, so that its step count no longer says the
    head was trained: the case where only the head's own weights can tell.
    """
    from keras_goodinit import GoodInit

    layers = keras.layers
    keras.utils.set_random_seed(0)
    body = keras.Sequential([keras.Input((x.shape[-1],)), layers.LayerNormalization(),
                             layers.Dense(32, activation="relu", name="body_dense")],
                            name="body")
    body.trainable = False
    model = keras.Sequential([body, layers.Dense(y.shape[-1], use_bias=False, name="head",
                                                 kernel_initializer=GoodInit("wn_linear"))])
    model.compile(keras.optimizers.Adam(1e-2), "mse", **compile_kw)
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0)
    model.compile(keras.optimizers.Adam(learning_rate_after), "mse", **compile_kw)
    return model
