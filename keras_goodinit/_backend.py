"""What differs by Keras backend; the rest of the package uses `keras.ops`.

TensorFlow is imported on first use, not with the package, so that
`import keras_goodinit` works under `KERAS_BACKEND=jax` or `torch` without it.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import keras
from keras import ops

# The extras that bring each backend, for error messages.
EXTRAS = ("tf", "tf-cpu", "jax", "torch")


def name() -> str:
    """The Keras backend in use: "tensorflow", "jax", "torch" or "numpy"."""
    return keras.backend.backend()


def is_tensorflow() -> bool:
    return name() == "tensorflow"


class _Lazy:
    """A module imported on first attribute access (`tf.function`, `tf.Tensor`...)."""

    def __init__(self, module: str):
        self._name = module
        self._module = None

    def __getattr__(self, attribute: str) -> Any:
        if self._module is None:
            try:
                self._module = importlib.import_module(self._name)
            except ImportError as error:
                raise ImportError(
                    f"This part of keras-goodinit needs TensorFlow, which is not installed: "
                    f"`pip install keras-goodinit[tf]` (or `[tf-cpu]`). Keras runs on "
                    f"{name()!r}.") from error
        return getattr(self._module, attribute)


tf = _Lazy("tensorflow")


def dct_ortho(x):
    """The orthonormal DCT-II of `x` along its last axis."""
    backend = name()
    if backend == "tensorflow":
        return tf.signal.dct(x, type=2, norm="ortho")
    if backend == "jax":
        import jax

        return jax.scipy.fft.dct(x, type=2, norm="ortho")
    return _dct_by_fft(x)


def _dct_by_fft(x):
    """DCT-II by one FFT of the even-odd reordered signal (Makhoul, 1980), orthonormal."""
    m = x.shape[-1]
    # v = (x_0, x_2, x_4, ..., x_5, x_3, x_1): then DCT_k = Re(exp(-i pi k / 2m) FFT(v)_k).
    order = list(range(0, m, 2)) + [i for i in range(m - 1, 0, -1) if i % 2 == 1]
    v = ops.take(x, order, axis=-1)
    real, imag = ops.fft((v, ops.zeros_like(v)))
    k = ops.cast(ops.arange(m), x.dtype)
    angle = -math.pi * k / (2 * m)
    out = real * ops.cos(angle) - imag * ops.sin(angle)
    # Orthonormal scaling: sqrt(1/m) for k = 0, sqrt(2/m) otherwise.
    # Tensors of x's dtype: Python floats in `where` give float32 on torch, even for float64.
    scale = ops.where(k == 0, ops.full_like(k, math.sqrt(1.0 / m)),
                      ops.full_like(k, math.sqrt(2.0 / m)))
    return out * scale


def matmul(a, b):
    """`ops.matmul` in the inputs' dtype. Keras 3.15's torch backend computes a float64
    product in float32 (and returns float32), so there it is torch's own."""
    if name() == "torch":
        import torch

        return torch.matmul(ops.convert_to_tensor(a), ops.convert_to_tensor(b))
    return ops.matmul(a, b)


def gram(x):
    """`x^T x` over the last two axes, in `x`'s dtype, without writing out the transpose
    (a pass over `x` as large as the product's own reads on CPU)."""
    backend = name()
    if backend == "tensorflow":
        return tf.linalg.matmul(x, x, adjoint_a=True)
    if backend == "torch":
        import torch

        x = ops.convert_to_tensor(x)
        return torch.matmul(x.mT, x)
    return ops.matmul(ops.swapaxes(x, -1, -2), x)


def wide() -> str:
    """The dtype of statistics: float64, or float32 where the backend has none (JAX
    without `jax_enable_x64`, where a float64 request silently gives float32)."""
    if name() == "jax":
        import jax

        return "float64" if jax.config.jax_enable_x64 else "float32"
    return "float64"


def is_traced(value) -> bool:
    """Whether `value` belongs to code JAX is tracing (a `lax.scan` step, a jit), where
    no host-side policy can run. TensorFlow's traced code is told by its graph."""
    if name() == "jax":
        import jax

        return isinstance(value, jax.core.Tracer)
    return False


def is_vectorized(value) -> bool:
    """Whether `value` is one sample inside `keras.ops.vectorized_map` (JAX's vmap,
    PyTorch's torch.vmap), where batch statistics cannot be taken, even within a pass
    that is itself traced. TensorFlow's is told by its graph's name scope."""
    backend = name()
    if backend == "jax":
        return type(value).__name__ == "BatchTracer"
    if backend == "torch":
        import torch

        return isinstance(value, torch.Tensor) and torch._C._functorch.is_batchedtensor(value)
    return False


def to_numpy(value):
    """`value` as a NumPy array if it is a tensor of the backend, else itself."""
    if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, type):
        return ops.convert_to_numpy(value)
    return value


def has_none_gradients() -> bool:
    """Whether the backend's autodiff says None for what does not reach the loss. JAX
    differentiates functions and gives zeros instead."""
    return name() != "jax"


def cuts_gradient(value, source) -> bool:
    """Whether `value`, computed from `source`, is cut off from its gradient: on PyTorch,
    it does not require one while `source` does (NumPy on the way detaches it).
    TensorFlow's tape and JAX's tracer tell it otherwise (a None gradient; an error)."""
    if name() != "torch":
        return False
    return bool(getattr(source, "requires_grad", False)) and not value.requires_grad


def loss_gradients(compute, kernels):
    """The loss of a pass and its gradients with respect to the pass's outputs and `kernels`.

    `compute(kernels, perturbations)` runs the pass with `kernels` standing
    in for the kernel variables and returns `(loss, outputs, aux)`; with
    `perturbations` (JAX only) it adds each to the matching output. Returns
    `(loss, outputs, aux, gradients)`, the gradients of `outputs + kernels`,
    None where one does not reach the loss. TensorFlow and PyTorch record the
    pass on a tape. JAX differentiates functions: the pass runs once for its
    values, then once more under `jax.grad`, where each output's gradient is
    that of a zero added to it; JAX has no None gradient (`has_none_gradients`):
    the caller tells an all-zero one, in the traced program or out of it.
    """
    backend = name()
    if backend == "tensorflow":
        kernels = [tf.convert_to_tensor(k) for k in kernels]
        with tf.GradientTape() as tape:
            tape.watch(kernels)
            loss, outputs, aux = compute(kernels, None)
        return loss, outputs, aux, tape.gradient(loss, list(outputs) + kernels)
    if backend == "torch":
        import torch

        kernels = [ops.convert_to_tensor(k).detach().clone().requires_grad_(True)
                   for k in kernels]
        with torch.enable_grad():
            loss, outputs, aux = compute(kernels, None)
        wrt = list(outputs) + kernels
        if not loss.requires_grad:  # nothing the loss depends on was met
            return loss, outputs, aux, [None] * len(wrt)
        return loss, outputs, aux, list(torch.autograd.grad(loss, wrt, allow_unused=True))
    if backend == "jax":
        import jax

        loss, outputs, aux = compute(kernels, None)
        zeros = [ops.zeros_like(output) for output in outputs]
        kernel_grads, output_grads = jax.grad(lambda k, e: compute(k, e)[0], argnums=(0, 1))(
            [ops.convert_to_tensor(k) for k in kernels], zeros)
        return loss, outputs, aux, list(output_grads) + list(kernel_grads)
    raise NotImplementedError(f"Gradients on Keras' {backend!r} backend. Received: "
                              f"KERAS_BACKEND={backend!r}")
