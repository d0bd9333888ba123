"""keras-goodinit: initializers, weight normalization and LSUV that make deep Keras nets train."""

try:
    import tensorflow  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "keras-goodinit needs TensorFlow, which comes through an extra: "
        "`pip install keras-goodinit[tf]` (or `[tf-cpu]` for the CPU-only build; "
        "`tensorflow[and-cuda]` for GPUs)."
    ) from error

from keras_goodinit._moments import register_activation
from keras_goodinit.callbacks import LSUVCallback
from keras_goodinit.diagnostics import BlockSignal, LayerSignal, SignalReport, signal_report
from keras_goodinit.initializers import GoodInit
from keras_goodinit.lsuv import lsuv_init, weightnorm_data_init
from keras_goodinit.mean_field import MeanFieldRecord, MeanFieldReport, mean_field_init
from keras_goodinit.report import InitReport, LayerRecord
from keras_goodinit.weight_norm import WeightNormalization, bake_weight_norm

__version__ = "0.1.0"

__all__ = [
    "BlockSignal",
    "GoodInit",
    "InitReport",
    "LSUVCallback",
    "LayerSignal",
    "SignalReport",
    "LayerRecord",
    "MeanFieldRecord",
    "MeanFieldReport",
    "WeightNormalization",
    "bake_weight_norm",
    "lsuv_init",
    "mean_field_init",
    "register_activation",
    "signal_report",
    "weightnorm_data_init",
]
