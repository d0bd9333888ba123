"""`LSUVCallback`: data-driven init at the start of `fit`, never over trained weights."""

from __future__ import annotations

import inspect

import keras
from keras.src.utils.io_utils import print_msg

from keras_goodinit.lsuv import lsuv_init, weightnorm_data_init

METHODS = {"lsuv": lsuv_init, "weightnorm_data_init": weightnorm_data_init}
_DONE = "_keras_goodinit_initialized"


def _optimizer_steps(model) -> int:
    optimizer = getattr(model, "optimizer", None)
    iterations = getattr(optimizer, "iterations", None)
    return 0 if iterations is None else int(keras.ops.convert_to_numpy(iterations))


class LSUVCallback(keras.callbacks.Callback):
    """Runs `lsuv_init` (or `weightnorm_data_init`) once, at the start of training.

    It never re-initializes trained weights: if the optimizer has already
    taken steps (a resumed run, a `BackupAndRestore` restore, a loaded
    checkpoint) or this package already initialized the model (a second
    `fit`), it does nothing unless `force=True`. Under a
    `tf.distribute` strategy the sweep runs in cross-replica context on the
    whole batch, and the resulting weights are written to every replica.

    Examples:

    >>> model = keras.Sequential([keras.Input((16,)),
    ...                           keras.layers.Dense(32, activation="relu"),
    ...                           keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> x = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")
    >>> y = np.zeros((64, 1), "float32")
    >>> callback = LSUVCallback(x[:32], verbose=0)
    >>> history = model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    >>> callback.report.rows[0].status
    'ok'

    Args:
        data: The batch (or dataset) to initialize on; see `lsuv_init`.
        method: `"lsuv"` (default) or `"weightnorm_data_init"`.
        force: Initialize even if the model was trained or initialized before.
        verbose: 0 silent, 1 progress bar and the report's table.
        **lsuv_kwargs: Passed to `lsuv_init` (`tol`, `max_iter`, ...);
            `weightnorm_data_init` takes only `layers`.

    Reference:
        - [Mishkin & Matas, 2016](https://arxiv.org/abs/1511.06422)
    """

    def __init__(self, data, method: str = "lsuv", force: bool = False, verbose: int = 1,
                 **lsuv_kwargs):
        super().__init__()
        if method not in METHODS:
            raise ValueError(
                f"Argument `method` must be one of {tuple(METHODS)}. Received: method={method!r}"
            )
        accepted = set(inspect.signature(METHODS[method]).parameters) - {"model", "data",
                                                                          "verbose"}
        unknown = sorted(set(lsuv_kwargs) - accepted)
        if unknown:
            raise ValueError(
                f"Unknown keyword arguments for method={method!r}: {unknown}. "
                f"Accepted: {sorted(accepted)}. Received: {lsuv_kwargs}"
            )
        self.data = data
        self.method = method
        self.force = bool(force)
        self.verbose = verbose
        self.kwargs = lsuv_kwargs
        self.report = None

    def on_train_begin(self, logs=None):
        model = self.model
        if not self.force:
            reason = None
            if getattr(model, _DONE, False):
                reason = "it was already initialized by keras-goodinit"
            elif _optimizer_steps(model) > 0:
                reason = "its optimizer has already taken steps (trained or restored weights)"
            if reason:
                if self.verbose:
                    print_msg(
                        f"LSUVCallback: not re-initializing {model.name!r}: {reason}. "
                        "Pass force=True to override.")
                return
        self.report = METHODS[self.method](model, self.data, verbose=self.verbose, **self.kwargs)
        setattr(model, _DONE, True)
        if self.verbose:
            self.report.summary(print_fn=print_msg)
