"""Layers that deep-network inits rely on: a residual branch's scalar gate."""

from __future__ import annotations

import numbers

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_goodinit")
class ResidualGate(keras.layers.Layer):
    """Multiplies a residual branch by one trainable scalar `alpha`.

    The gate of SkipInit (De & Smith, 2020) and ReZero (Bachlechner et al.,
    2020): written as `h = h + ResidualGate()(branch(h))`, every block starts
    as the identity (`alpha = 0`), so a network of any depth starts as the
    identity map too, and `alpha` then learns how much of the branch to let
    in (its gradient is the branch's output, nonzero from the first step).
    Initialized at 1, it is Fixup's scalar multiplier (Zhang et al., 2019).

    `mean_field_init(model, residual="skipinit")` sets every gate it finds at
    the end of a residual branch to 0; `residual="scaled"` keeps its value and
    counts it in the predictions.

    Examples:

    >>> inputs = keras.Input((16,))
    >>> h = inputs
    >>> for _ in range(4):
    ...     branch = keras.layers.Dense(16, activation="relu")(h)
    ...     h = h + ResidualGate()(keras.layers.Dense(16)(branch))
    >>> model = keras.Model(inputs, h)
    >>> x = np.ones((2, 16), "float32")
    >>> bool(np.all(model(x) == x))  # every gate starts at 0
    True

    Args:
        initializer: The initializer of `alpha`: `"zeros"` (the default), a
            float (a constant), or any Keras initializer or its name.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Reference:
        - [De & Smith, 2020](https://arxiv.org/abs/2002.10444)
        - [Bachlechner et al., 2020](https://arxiv.org/abs/2003.04887)
        - [Zhang, Dauphin & Ma, 2019](https://arxiv.org/abs/1901.09321)
    """

    def __init__(self, initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        if isinstance(initializer, numbers.Real) and not isinstance(initializer, bool):
            self._constant = float(initializer)
            self.initializer = keras.initializers.Constant(self._constant)
        else:
            self._constant = None
            try:
                self.initializer = keras.initializers.get(initializer)
            except ValueError as error:
                raise ValueError("Argument `initializer` must be a float or a Keras "
                                 f"initializer. Received: initializer={initializer!r}") from error
        self.supports_masking = True

    def build(self, input_shape=None):
        self.alpha = self.add_weight(name="alpha", shape=(), initializer=self.initializer,
                                     trainable=True)

    def call(self, inputs):
        return ops.cast(self.alpha, inputs.dtype) * inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config["initializer"] = (self._constant if self._constant is not None
                                 else keras.initializers.serialize(self.initializer))
        return config
