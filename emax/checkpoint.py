"""Orbax checkpoints of train states that hold an emax average.

Three verbs on an ``orbax.checkpoint.CheckpointManager``:

* :func:`save` writes a state and, by default, returns only once the
  checkpoint is on disk, so that a script may exit right after it.
* :func:`restore` reads one back typed and sharded like a given state
  (:func:`abstract_state` makes the target), named averages by name. A
  checkpoint restored without a target comes back as plain dicts and lists:
  the :class:`emax.EmaState` (a ``NamedTuple``), the optax states around it
  and the static dtypes of the params are lost; :func:`read_average` reads
  the average from such a tree, with what :func:`save` recorded.
* :func:`average` averages the params (or any subtree) of checkpoints that
  already exist, one checkpoint at a time: LAWA, uniform model soups, or an
  average attached after the fact to a run that never had one.

What is safe when. Orbax writes each checkpoint into a temporary directory
(``<step>.orbax-checkpoint-tmp``) and gives it its final name ``<step>`` by a
rename only after every file is written (on object stores without atomic
renames, such as GCS, it writes a ``commit_success.txt`` last instead). A
save interrupted at any point, by an exception, a kill or a crash, leaves the
checkpoints saved before it untouched and a temporary directory that every
reader ignores and that the next save of that step replaces. A manager saves
asynchronously by default: its ``save`` returns once the arrays are copied
off the accelerators, and background threads write and rename; those threads
die with the process, so a script that exits right after such a save loses
it. :func:`save` therefore waits by default. Once it returns, the checkpoint
is complete and committed and the files are in the operating system's hands:
they survive the process exiting or being killed. Orbax does not ``fsync``
them, so a power loss or kernel crash right after the save may still lose the
newest checkpoint on file systems that buffer writes.

``orbax.checkpoint`` is imported inside the functions that need it, so
importing this module costs nothing.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from optax import Params

from emax import _checkpoint_files
from emax import _checkpoint_record
from emax import _late_start
from emax import _options
from emax._checkpoint_average import average
from emax._checkpoint_record import save
from emax._restored import read_average

__all__ = (
    'abstract_state',
    'average',
    'read_average',
    'restore',
    'save',
)


def abstract_state(state: Params) -> Params:
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

  Raises:
    TypeError: if a leaf is not an array or a number.

  Examples:
    >>> import jax.numpy as jnp, emax, emax.checkpoint
    >>> target = emax.checkpoint.abstract_state(emax.init({'w': jnp.ones(2)}))
    >>> type(target).__name__, target.count.shape, target.count.dtype
    ('EmaState', (), dtype('int32'))
  """
  meshes = {x.sharding.mesh for x in jax.tree.leaves(state)
            if isinstance(getattr(x, 'sharding', None), NamedSharding)}
  replicated = (NamedSharding(meshes.pop(), PartitionSpec())
                if len(meshes) == 1 else None)

  def leaf(x: Any) -> jax.ShapeDtypeStruct:
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


def restore(manager: _checkpoint_files.Manager, like: Params,
            step: int | None = None, *, start_average: bool = False
            ) -> Params:
  """Restores a checkpoint typed and sharded like ``like``.

  Waits first for the manager's own saves still in flight, so it never reads
  a checkpoint that is being written; the restored arrays are complete when
  it returns.

  Args:
    manager: an ``orbax.checkpoint.CheckpointManager``.
    like: a state built as the saved one was (e.g. a fresh
      ``EmaTrainState.create(...)``), or its :func:`abstract_state`.
    step: the step to restore; the latest saved one by default.
    start_average: start the averages of ``like`` from the restored params
      when the checkpoint holds none (a run that trained without an average
      and resumes with one: ``tx=emax.with_ema(opt, ...)`` or
      ``optax.chain(opt, emax.ema(...))`` around the ``opt`` it saved with).
      Every array of the checkpoint goes to its place in ``like`` without
      its averages (the optimizer's state out of its
      :class:`emax.WithEmaState` or chain), and each average starts as
      :func:`emax.init` starts it, from the restored ``params`` (an
      attribute or key at the top of the state; the ``batch_stats`` average
      of an :class:`emax.flax.EmaTrainState` from its ``batch_stats``):
      count 0, a copy, or weight 0 with ``debias=True``. No effect when the
      checkpoint holds the averages.

  Named averages are restored by name: where :func:`emax.checkpoint.save`
  recorded them in another order than ``like`` lists them (the mapping
  given to :func:`emax.ema` was reordered), the restored state keeps the
  saved order, each average under its own name (a step matches its rates to
  the averages by name). Without a record (a plain Orbax save) the arrays
  are restored by position, as Orbax does.

  Returns:
    The restored state, with the types, static fields and shardings of
    ``like``: the average inside is an :class:`emax.EmaState` again.

  Raises:
    FileNotFoundError: if the manager holds no checkpoint, or none at
      ``step``; the message lists the steps it holds.
    ValueError: if :func:`emax.checkpoint.save` recorded other names for an
      average than ``like`` holds (the message shows both); if ``like``
      holds an average and the checkpoint none, without
      ``start_average=True``; if the checkpoint holds an average and
      ``like`` none (restore into a state with the average, or read the
      params alone with :func:`average`).
  """
  ocp = _checkpoint_files.orbax()
  step = _checkpoint_files.restorable_step(manager, step)
  start_average = _options.check_bool(start_average, 'start_average')
  abstract = abstract_state(like)
  with _checkpoint_files.Reader() as reader:
    item_dir, stored = _late_start.stored_tree(manager, step, reader)
    if _late_start.check(stored, abstract, step, start_average):
      return _late_start.restore(item_dir, stored, like, abstract, step,
                                 reader)
  target = _checkpoint_record.in_recorded_order(
      _checkpoint_record.recorded(
          _checkpoint_files.manager_custom_metadata(manager, step)),
      abstract, f'emax.checkpoint.restore (step {step})')
  return manager.restore(step, args=ocp.args.StandardRestore(target))


