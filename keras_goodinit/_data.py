"""Turning the `data` argument of the init functions into model inputs."""

from __future__ import annotations

import numbers
import sys
from collections.abc import Iterator

import keras
import numpy as np


def split(element) -> tuple:
    """(x, y) of a batch; y is None when there are no targets."""
    # Keras convention: a tuple is (x, y[, sample_weight]); a list or dict is x.
    if isinstance(element, tuple):
        if not element:
            raise ValueError("Argument `data` yielded an empty tuple. Received: data=()")
        return element[0], (element[1] if len(element) > 1 else None)
    return element, None


class Replayable:
    """An iterator (e.g. a generator) that can be read from its start again.

    The init reads the first batch up front to build and check, and
    `new_batch_per_trial` reads the batches again from the first, as it does
    for a dataset; an iterator is consumed once, so what it yielded is kept.
    """

    def __init__(self, iterator: Iterator):
        self._iterator, self._seen = iterator, []

    def __iter__(self) -> Iterator:
        index = 0
        while True:
            if index == len(self._seen):
                try:
                    self._seen.append(next(self._iterator))
                except StopIteration:
                    return
            yield self._seen[index]
            index += 1


def replayable(data):
    """`data`, with an iterator wrapped so that it can be read from its start again."""
    return Replayable(data) if isinstance(data, Iterator) else data


def elements(data) -> Iterator:
    """Yields the batch itself (forever), or successive elements of a dataset."""
    # Data can only be a TensorFlow dataset where TensorFlow has been imported.
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(data, tf.distribute.DistributedDataset):
        raise ValueError(
            "Argument `data` must not be a distributed dataset: its elements are per-replica "
            "parts of a batch, and the init needs the global batch. Pass the tf.data.Dataset "
            f"itself (the sweep runs in cross-replica context). Received: data={data!r}"
        )
    if isinstance(data, Replayable) or (tf is not None and isinstance(data, tf.data.Dataset)):
        yield from data
    elif _is_torch_loader(data):
        # Read from its start each time, like a dataset. Its default collate turns an
        # (x, y) sample into a [x, y] list: Keras' `fit` reads that as (x, y), and so do we.
        for element in data:
            yield tuple(element) if isinstance(element, list) else element
    elif isinstance(data, Iterator):  # a generator: its elements, like a dataset's
        yield from data
    elif isinstance(data, keras.utils.PyDataset):
        for index in range(len(data)):
            yield data[index]
    elif data is None or isinstance(data, (str, bytes)):
        raise ValueError(
            "Argument `data` must be a batch (array, tensor, (x, y) tuple or dict of inputs), "
            "a tf.data.Dataset, a keras.utils.PyDataset, a torch DataLoader or an iterator "
            "of batches. "
            f"Received: data={data!r}"
        )
    else:
        while True:
            yield data


def _is_torch_loader(data) -> bool:
    """Whether `data` is a torch `DataLoader` (where torch has been imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(data, torch.utils.data.DataLoader)


def batches(data) -> Iterator:
    """Yields model inputs: the batch itself, or successive batches of a dataset."""
    for element in elements(data):
        yield split(element)[0]


def first_element(data) -> tuple:
    """(x, y) of the first batch of `data`."""
    for element in elements(data):
        return split(element)
    raise ValueError(f"Argument `data` yielded no batch. Received: data={data!r}")


def first_batch(data):
    return first_element(data)[0]


def check_batch(x) -> None:
    """Rejects batches whose statistics would be meaningless: empty, NaN or Inf."""
    leaves = keras.tree.flatten(x)
    if isinstance(x, (list, tuple)) and leaves and all(
            isinstance(leaf, (numbers.Number, str, bytes)) for leaf in leaves):
        # Keras reads a list as the inputs of a multi-input model, so a nested list of
        # numbers would be a model with one scalar per input: almost surely an array.
        raise ValueError(
            "Argument `data` must hold arrays or tensors with a batch axis; a list is read "
            "as the inputs of a multi-input model, and these are bare scalars (a list of "
            "lists? convert it with np.asarray). "
            f"Received: data of type {type(x).__name__} with {len(leaves)} scalar entries"
        )
    for leaf in leaves:
        array = keras.ops.convert_to_numpy(leaf)
        if np.iscomplexobj(array):
            raise ValueError(
                "Argument `data` must hold real numbers: the layers compute in real floats. "
                f"Received: data of dtype {array.dtype}, shape {array.shape}"
            )
        if array.ndim == 0:
            raise ValueError(
                "Argument `data` must hold a batch: an array or tensor with a batch axis. "
                f"Received: a scalar ({array!r})"
            )
        if array.shape[0] == 0:
            raise ValueError(
                "Argument `data` must hold a non-empty batch. "
                f"Received: a batch of shape {array.shape}"
            )
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise ValueError(
                "Argument `data` contains NaN or Inf, so no statistic of it is meaningful. "
                f"Received: a batch of shape {array.shape} with "
                f"{int(np.size(array) - np.isfinite(array).sum())} non-finite values"
            )
