"""`LSUVCallback`: data-driven init at the start of `fit`, never over trained weights."""

from __future__ import annotations

import keras
from keras.src.utils.io_utils import print_msg

from keras_goodinit import _distribute, _freshness, _validate
from keras_goodinit.lsuv import (
    check_init_kwargs,
    lsuv_init,
    weightnorm_data_init,
    written_targets,
)

METHODS = {"lsuv": lsuv_init, "weightnorm_data_init": weightnorm_data_init}
_DONE = "_keras_goodinit_initialized"


def _optimizer_steps(model) -> int:
    optimizer = getattr(model, "optimizer", None)
    iterations = getattr(optimizer, "iterations", None)
    return 0 if iterations is None else int(keras.ops.convert_to_numpy(iterations))


def _stand_down_reason(model: keras.Model, method: str, layers=None,
                       embeddings: bool = True) -> str | None:
    """Why `LSUVCallback` must not initialize `model`, or None if its weights are fresh."""
    if getattr(model, _DONE, False):
        return "it was already initialized by keras-goodinit"
    if _optimizer_steps(model) > 0:
        return "its optimizer has already taken steps (trained or restored weights)"
    if not model.built:
        return None  # no weights yet: the init builds them
    # Last, as it is the only check that costs a re-draw of the weights.
    changed, checked = _freshness.verify(model)
    if changed is not None:
        return (f"its weight {changed!r} is not what its initializer drew when the model was "
                "built, so the weights were trained, set (set_weights), loaded (load_weights, "
                "load_model) or initialized since")
    # Fresh weights elsewhere say nothing about a layer the init would overwrite.
    blind = [name for name, variables in written_targets(model, method, layers, embeddings)
             if not any(id(v) in checked for v in variables)]
    if blind:
        return (f"no weight of its layer(s) {blind}, which the init would overwrite, can be "
                "checked (a kernel initializer that draws new values on every call, such as "
                "GoodInit(seed=None), and no bias or WeightNormalization g), so they may hold "
                "trained weights; give their initializers an int seed to let it check them")
    return None


def _fresh_optimizer_state(model) -> list:
    """(variable, value) pairs that put a built optimizer back as a fresh build leaves it.

    Step 0 and zero (or initial) slots; the learning rate, set by the user or
    a callback, is kept. Empty when the optimizer is not built yet. Computed
    before the init runs, so that nothing is written if it cannot be done.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not getattr(optimizer, "built", False):
        return []
    # A twin built on the same variables holds exactly what a fresh build gives each slot
    # (zeros, Adagrad's initial accumulator...), in the same order.
    twin = type(optimizer).from_config(optimizer.get_config())
    twin.build(optimizer._trainable_variables)
    mine, fresh = optimizer.variables, twin.variables
    if len(mine) != len(fresh) or any(tuple(a.shape) != tuple(b.shape)
                                      for a, b in zip(mine, fresh)):
        raise ValueError(
            "LSUVCallback(force=True) cannot reset this optimizer's state: a fresh build of "
            f"it has other variables. Received: optimizer={type(optimizer).__name__}")
    learning_rate = getattr(optimizer, "_learning_rate", None)
    return [(variable, new.value) for variable, new in zip(mine, fresh)
            if variable is not learning_rate]


class LSUVCallback(keras.callbacks.Callback):
    """Runs `lsuv_init` (or `weightnorm_data_init`) once, at the start of training.

    It never re-initializes weights that were trained, set or loaded. At the
    start of `fit` it stands down, unless `force=True`, when:

    1. this package already initialized the model (a second `fit`);
    2. the optimizer has already taken steps (a resumed run, a
       `BackupAndRestore` restore, a `.keras` file saved with its optimizer);
    3. a weight is not what its own initializer drew when the model was
       built. Keras' built-in initializers re-draw the same values when
       called again, so the callback calls each layer's initializer once more,
       in the weight's own dtype, and compares to a few ulps of that dtype:
       weights given by `set_weights`, `load_weights` or `load_model`
       (including after `clone_model`, `compile=False` or a custom training
       loop) or trained in any way do not match;
    4. a layer the init would overwrite (for `"lsuv"` every target kernel,
       recurrent layer and rescaled embedding table, for
       `"weightnorm_data_init"` every `WeightNormalization` layer, recurrent
       ones included, within `layers` if given) has no weight that can be
       checked.

    Weights whose initializer draws new values on every call
    (`GoodInit(seed=None)`, a `SeedGenerator` seed, a custom initializer)
    cannot be checked. A layer is still checked through its zero bias or
    `WeightNormalization`'s `g` (which starts as `||v||`). Without either
    (a bias-free `Dense(kernel_initializer=GoodInit())`, say) nothing tells a
    fresh kernel from a trained one, and untouched weights elsewhere in the
    model say nothing about it (a fresh frozen body under a trained head), so
    rule 4 stands down rather than risk overwriting training: seed such
    initializers (`GoodInit(seed=0)`) or pass `force=True` for a model known
    to be fresh. The check re-draws each checkable weight once, which costs
    about what building the weights cost, and nothing is stored in the
    model, so its weights and checkpoints are unchanged. Under a
    `tf.distribute` strategy the sweep runs in cross-replica context on the
    whole batch, and the resulting weights are written to every replica.

    With `force=True` the re-initialized model also starts a fresh
    optimization: the optimizer's step count and slot variables (Adam's
    moments, momentum...) are reset to what a new build of it holds; its
    learning rate is kept.

    After the init, the optimizer and any weight constraint still act on the
    weights: a kernel constraint (`UnitNorm`, `MaxNorm`...) on a target is
    applied after every training step and can undo its scale, so the
    report's row for such a layer says so.

    After `fit`, `report` holds the `InitReport` (None if it stood down) and
    `reason` says why it stood down (None if it ran).

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

    The same weights set into a new model are recognized as not fresh:

    >>> twin = keras.models.clone_model(model)
    >>> twin.set_weights(model.get_weights())
    >>> twin.compile("sgd", "mse")
    >>> again = LSUVCallback(x[:32], verbose=0)
    >>> history = twin.fit(x, y, epochs=1, verbose=0, callbacks=[again])
    >>> again.report is None
    True

    Args:
        data: The batch (or dataset) to initialize on; see `lsuv_init`.
        method: `"lsuv"` (default) or `"weightnorm_data_init"`.
        force: Initialize even if the weights were trained, set, loaded or
            initialized before, or cannot be checked; also resets the
            optimizer's step count and slot variables.
        verbose: 0 silent, 1 or 2 a progress bar, the report's table and
            why the callback stood down.
        **lsuv_kwargs: Passed to `lsuv_init` (`tol`, `max_iter`, `residual`, ...);
            `weightnorm_data_init` takes only `layers` and `compile`.

    Reference:
        - [Mishkin & Matas, 2016](https://arxiv.org/abs/1511.06422)
    """

    def __init__(self, data, method: str = "lsuv", force: bool = False, verbose: int = 1,
                 **lsuv_kwargs):
        super().__init__()
        method = _validate.one_of("method", method, tuple(METHODS))
        force = _validate.boolean("force", force)
        verbose = _validate.verbose(verbose)
        # Names and values, so a bad `tol` fails here rather than when `fit` starts.
        check_init_kwargs(method, lsuv_kwargs)
        self.data = data
        self.method = method
        self.force = force
        self.verbose = verbose
        self.kwargs = lsuv_kwargs
        self.report = None
        self.reason = None

    def on_train_begin(self, logs=None):
        model = self.model
        self.reason = None if self.force else _stand_down_reason(
            model, self.method, self.kwargs.get("layers"), self.kwargs.get("embeddings", True))
        # Workers hold the chief's initial values but re-draw from their own seeds: the
        # chief's verdict is the one that matches the weights, and all must agree on it.
        if not _distribute.chief_decides(self.reason is None, model.weights):
            self.reason = self.reason or "the chief worker found the weights not fresh"
        elif self.reason:
            self.reason = None
        if self.reason:
            if self.verbose:
                print_msg(f"LSUVCallback: not re-initializing {model.name!r}: {self.reason}. "
                          "Pass force=True to initialize anyway.")
            return
        reset = _fresh_optimizer_state(model) if self.force else []
        self.report = METHODS[self.method](model, self.data, verbose=self.verbose, **self.kwargs)
        setattr(model, _DONE, True)
        # New weights start a new optimization: Adam's moments and step count (its bias
        # correction) from an earlier run belong to the weights just replaced.
        for variable, value in reset:
            variable.assign(value)
        if self.verbose:
            self.report.summary(print_fn=print_msg)
