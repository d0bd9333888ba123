"""Keeping initialized weights identical across the workers of a tf.distribute cluster."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from keras_goodinit import _backend
from keras_goodinit._backend import tf  # TensorFlow, imported on first use


def _worker_count(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in spec.jobs if job in ("chief", "worker")) or 1


def _strategy_of(variable: keras.Variable) -> tf.distribute.Strategy:
    # Callbacks run outside `strategy.scope()`: the variables know their strategy.
    strategy = getattr(variable.value, "distribute_strategy", None)
    return strategy or tf.distribute.get_strategy()


def broadcast_from_chief(variables: Sequence[keras.Variable]) -> None:
    """Under a multi-worker strategy, gives every worker the first replica's values.

    Within one worker a cross-replica `assign` already reaches every replica;
    across workers each one computed its init on its own data and random
    draws, so the first replica's result is all-reduced to everyone. Every
    worker must call this, in the same order, as collectives require.
    """
    if not variables or not _backend.is_tensorflow():
        return
    strategy = _strategy_of(variables[0])
    if _worker_count(strategy) < 2:
        return
    with strategy.scope():
        synced = _broadcast(strategy, [tf.convert_to_tensor(v.value) for v in variables])
    for variable, value in zip(variables, synced):
        variable.assign(value)


def chief_decides(flag: bool, variables: Sequence[keras.Variable]) -> bool:
    """Under a multi-worker strategy, the first replica's `flag`, so every worker agrees.

    A decision taken from each worker's own view (its data, its random draws)
    can differ between workers; if some then run collectives and others do
    not, the collectives hang or mismatch. `variables` tells the strategy.
    """
    if not variables or not _backend.is_tensorflow():
        return flag
    strategy = _strategy_of(variables[0])
    if _worker_count(strategy) < 2:
        return flag
    with strategy.scope():
        synced = _broadcast(strategy, [tf.constant(1.0 if flag else 0.0)])
    return bool(synced[0] > 0.5)


def _broadcast(strategy: tf.distribute.Strategy, values: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """The first replica's `values`, on every replica (local results of the first)."""

    def keep_first(*local):
        context = tf.distribute.get_replica_context()
        first = tf.equal(context.replica_id_in_sync_group, 0)
        masked = [tf.where(first, value, tf.zeros_like(value)) for value in local]
        return context.all_reduce(tf.distribute.ReduceOp.SUM, masked)

    synced = tf.function(lambda: strategy.run(keep_first, args=tuple(values)))()
    return [strategy.experimental_local_results(value)[0] for value in synced]
