"""Keeping initialized weights identical across the workers of a tf.distribute cluster."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf


def _worker_count(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in spec.jobs if job in ("chief", "worker")) or 1


def broadcast_from_chief(variables: Sequence[keras.Variable]) -> None:
    """Under a multi-worker strategy, gives every worker the first replica's values.

    Within one worker a cross-replica `assign` already reaches every replica;
    across workers each one computed its init on its own data and random
    draws, so the first replica's result is all-reduced to everyone. Every
    worker must call this, in the same order, as collectives require.
    """
    if not variables:
        return
    # Callbacks run outside `strategy.scope()`: the variables know their strategy.
    strategy = getattr(variables[0].value, "distribute_strategy", None)
    strategy = strategy or tf.distribute.get_strategy()
    if _worker_count(strategy) < 2:
        return
    with strategy.scope():
        _broadcast(strategy, variables)


def _broadcast(strategy: tf.distribute.Strategy, variables: Sequence[keras.Variable]) -> None:
    values = [tf.convert_to_tensor(v.value) for v in variables]

    def keep_first(*local):
        context = tf.distribute.get_replica_context()
        first = tf.equal(context.replica_id_in_sync_group, 0)
        masked = [tf.where(first, value, tf.zeros_like(value)) for value in local]
        return context.all_reduce(tf.distribute.ReduceOp.SUM, masked)

    synced = tf.function(lambda: strategy.run(keep_first, args=tuple(values)))()
    for variable, value in zip(variables, synced):
        variable.assign(strategy.experimental_local_results(value)[0])
