"""Orbax checkpoints of train states that hold an emax average.

A checkpoint restored without a target comes back as plain dicts and lists:
the :class:`emax.EmaState` (a ``NamedTuple``), the optax states around it and
the static dtypes of the params are lost. Restore with the abstract state of
a freshly built one instead, and everything comes back typed and sharded as
saved. ``orbax.checkpoint`` is imported inside the functions that need it, so
importing this module costs nothing.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

PyTree = Any


def _ocp():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        'emax.checkpoint needs orbax-checkpoint: pip install "emax[flax]" or'
        ' pip install orbax-checkpoint.') from e
  return ocp


def abstract_state(state: PyTree) -> PyTree:
  """The restore target for ``state``: its tree with shapes, dtypes, shardings.

  Every array leaf becomes a ``jax.ShapeDtypeStruct`` with the leaf's shape,
  dtype and sharding; the tree structure, and with it the static parts
  (``EmaState`` types, ``param_dtypes``, ``apply_fn`` and ``tx`` of a train
  state), stays. Pass it to ``ocp.args.StandardRestore`` and the checkpoint
  comes back as the same types, on the same devices. ``state`` may itself be
  abstract (``jax.eval_shape`` of the function that builds it).

  Arrays that were never placed (uncommitted, e.g. the scalar counters of an
  :class:`emax.EmaState` made next to params sharded on a mesh) are restored
  replicated on that mesh when the tree uses exactly one, so that they can
  meet the sharded arrays in one computation; otherwise on their device.

  Args:
    state: any pytree: a train state, an optax state, an
      :class:`emax.EmaState`.

  Returns:
    A tree like ``state`` with ``jax.ShapeDtypeStruct`` leaves.

  Examples:
    >>> import jax.numpy as jnp, emax, emax.checkpoint
    >>> target = emax.checkpoint.abstract_state(emax.init({'w': jnp.ones(2)}))
    >>> type(target).__name__, target.ema['w'].shape, target.count.dtype
    ('EmaState', (2,), dtype('int32'))
  """
  meshes = {x.sharding.mesh for x in jax.tree.leaves(state)
            if isinstance(getattr(x, 'sharding', None), NamedSharding)}
  replicated = (NamedSharding(meshes.pop(), PartitionSpec())
                if len(meshes) == 1 else None)

  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      sharding = x.sharding
      if replicated is not None and not x.committed:
        sharding = replicated
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if isinstance(x, (np.ndarray, np.generic, numbers.Number)):
      x = np.asarray(x)
      return jax.ShapeDtypeStruct(x.shape, x.dtype)
    raise TypeError(
        f'abstract_state expected array leaves, got {type(x).__name__}.')

  return jax.tree.map(leaf, state)


def save(manager: Any, step: int, state: PyTree, **kwargs) -> bool:
  """Saves ``state`` at ``step`` with an ``orbax.checkpoint.CheckpointManager``.

  Same as ``manager.save(step, args=ocp.args.StandardSave(state))``. The
  save may finish in the background; ``manager.wait_until_finished()`` waits.

  Returns:
    Whether the manager saved (its ``save_interval_steps`` may skip a step).
  """
  ocp = _ocp()
  return manager.save(step, args=ocp.args.StandardSave(state), **kwargs)


def restore(manager: Any, like: PyTree, step: Optional[int] = None) -> PyTree:
  """Restores a checkpoint typed and sharded like ``like``.

  Args:
    manager: an ``orbax.checkpoint.CheckpointManager``.
    like: a state built as the saved one was (e.g. a fresh
      ``EmaTrainState.create(...)``), or its :func:`abstract_state`.
    step: the step to restore; the latest saved one by default.

  Returns:
    The restored state, with the types, static fields and shardings of
    ``like``: the average inside is an :class:`emax.EmaState` again.

  Raises:
    FileNotFoundError: if the manager holds no checkpoint.
  """
  ocp = _ocp()
  manager.wait_until_finished()
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(
          f'No checkpoint to restore in {manager.directory}; save one first'
          ' with emax.checkpoint.save(manager, step, state).')
  return manager.restore(
      step, args=ocp.args.StandardRestore(abstract_state(like)))
