"""Float tolerances for two computations of the same value (not collected: no test_).

Two paths that compute the same value with the same dtype, XLA and eager, a
traced graph and eager, TensorFlow and JAX or torch, one CPU and another
(AVX2 sums 8 float32 lanes at a time, AVX-512 16; oneDNN on or off), differ
only in the order of their roundings. A sum of n terms rounded in another
order changes by at most ~n eps times the size of its terms, and in practice
(rounding errors unbiased and independent) by a random walk, ~sqrt(n) eps.
Through a chain of `depth` such layers each layer passes on the difference in
its input with a gain of about 1 (the networks in the tests are initialized to
keep the signal's scale) and adds its own, so the differences add at most
linearly with depth, as the bfloat16 bound in test_mixed_precision.py does:

    |a - b| <= depth * sqrt(n) * eps * scale

with n the longest sum one layer takes (a fan-in; a statistic over a layer's
output, `longest_sum`) and `scale` the size of the values compared (their
largest magnitude). A wrong result (another layer, mode, or weight) is off by O(scale),
orders of magnitude above this bound for the depths and sums in the tests.
"""

from __future__ import annotations

import math

import numpy as np

EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


def reordered(depth: int, n: int = 1, scale: float = 1.0, dtype: str = "float32") -> float:
    """Bound on |a - b| of two evaluations that differ only in rounding order (see above)."""
    return depth * math.sqrt(n) * EPS[dtype] * float(scale)


def magnitude(values) -> float:
    """The scale of `values` for `reordered`: their largest magnitude (1 if all zero)."""
    values = np.abs(np.asarray(values, dtype="float64"))
    return float(values.max()) if values.size and values.max() > 0 else 1.0


def longest_sum(model, x) -> int:
    """The n of `reordered` for `model` on the batch `x`.

    The longest of its kernels' fan-ins and of the statistics over a layer's
    output, whose size is at most the batch's positions (every axis but the last
    of a float input; every token of an integer one) times the widest kernel
    (for models that do not upsample).
    """
    kernels = [w.shape for w in model.weights if len(w.shape) >= 2]  # kernels, v, tables
    arrays = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else [x]
    positions = max(int(np.size(a)) if np.issubdtype(np.asarray(a).dtype, np.integer)
                    else int(np.prod(np.shape(a)[:-1])) for a in arrays)
    return max([int(np.prod(shape[:-1])) for shape in kernels]
               + [positions * max((shape[-1] for shape in kernels), default=1)])


def assert_signal_agrees(got, expected, n: int, err_msg: str = "") -> None:
    """Two `signal_report` passes' columns (field -> per-row values) agree to rounding.

    Rows are in execution order: row j's output is a chain of j layers, so its
    statistics differ by reordered(j, n) relative (std, norm_ratio), or times the
    output's rms for its mean, whose zero-mean terms cancel. A gradient goes
    forward through every row and back to row j: depth 2L. NaN (no gradient) must
    be NaN in both.
    """
    std = np.asarray(expected["std"], "float64")
    forward = np.array([reordered(j, n) for j in range(1, len(std) + 1)])
    scales = {"std": std, "norm_ratio": np.asarray(expected["norm_ratio"], "float64"),
              "mean": np.hypot(std, np.asarray(expected["mean"], "float64"))}
    for field, scale in scales.items():
        diff = np.abs(np.asarray(got[field], "float64") - np.asarray(expected[field], "float64"))
        assert np.all(diff <= forward * scale), (f"{err_msg} {field}", diff, forward * scale)
    for field in ("grad_norm_ratio", "weight_grad_std"):
        np.testing.assert_allclose(np.asarray(got[field], "float64"),
                                   np.asarray(expected[field], "float64"),
                                   rtol=reordered(2 * len(std), n), atol=0,
                                   err_msg=f"{err_msg} {field}")
