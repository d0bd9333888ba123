"""keras-goodinit: initializers, weight normalization and LSUV that make deep Keras nets train."""

# First: a clear ImportError where the backend Keras will use is not installed.
from keras_goodinit import _installed  # noqa: F401, I001
from keras_goodinit._moments import register_activation
from keras_goodinit.callbacks import LSUVCallback
from keras_goodinit.criticality import (CriticalInit, MeanFieldPhase, critical_point,
                                        mean_field_phase)
from keras_goodinit.diagnostics import BlockSignal, LayerSignal, SignalReport, signal_report
from keras_goodinit.initializers import GoodInit
from keras_goodinit.layers import ResidualGate
from keras_goodinit.lsuv import lsuv_init, weightnorm_data_init
from keras_goodinit.mean_field import MeanFieldRecord, MeanFieldReport, mean_field_init
from keras_goodinit.monitor import SignalAlarm, SignalMonitor, SignalRecord
from keras_goodinit.report import InitReport, LayerRecord
from keras_goodinit.rules import LayerRule, Signal, register_layer_rule
from keras_goodinit.spectrum import JacobianSpectrum, jacobian_spectrum
from keras_goodinit.weight_norm import WeightNormalization, bake_weight_norm

from keras_goodinit import _recurrent  # noqa: E402 - after rules: it imports the sweep

_recurrent.register()

__version__ = "0.1.0"

__all__ = [
    "BlockSignal",
    "CriticalInit",
    "GoodInit",
    "InitReport",
    "JacobianSpectrum",
    "LSUVCallback",
    "LayerSignal",
    "SignalAlarm",
    "SignalMonitor",
    "SignalRecord",
    "SignalReport",
    "Signal",
    "LayerRecord",
    "LayerRule",
    "MeanFieldPhase",
    "MeanFieldRecord",
    "MeanFieldReport",
    "ResidualGate",
    "WeightNormalization",
    "bake_weight_norm",
    "critical_point",
    "jacobian_spectrum",
    "lsuv_init",
    "mean_field_init",
    "mean_field_phase",
    "register_activation",
    "register_layer_rule",
    "signal_report",
    "weightnorm_data_init",
]
