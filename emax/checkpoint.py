"""Orbax checkpoints of train states that hold an emax average.

Three verbs on an ``orbax.checkpoint.CheckpointManager``:

* :func:`save` writes a state and, by default, returns only once the
  checkpoint is on disk, so that a script may exit right after it.
* :func:`restore` reads one back typed and sharded like a given state. A
  checkpoint restored without a target comes back as plain dicts and lists:
  the :class:`emax.EmaState` (a ``NamedTuple``), the optax states around it
  and the static dtypes of the params are lost; :func:`abstract_state` makes
  the target.
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

from collections.abc import Callable, Sequence
import numbers
import os
from typing import Any, Optional, Union

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding
from optax import Params

from emax import _checkpoint_average
from emax import _checkpoint_files
from emax import _checkpoint_record
from emax import _restored
from emax._checkpoint_record import METADATA_KEY

__all__ = (
    'abstract_state',
    'average',
    'read_average',
    'restore',
    'save',
)

# Above this many bytes per checkpoint, average() (and
# emax.posthoc.from_checkpoints) run a full garbage collection after each one
# (about 0.2 s, against reading this much): Orbax's reference cycles hold the
# restored arrays until then.
_COLLECT_ABOVE_BYTES = _checkpoint_files.COLLECT_ABOVE_BYTES


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


def save(manager: Any, step: int, state: Params, *,
         sigma_rels: Any = None, wait: bool = True, **kwargs: Any) -> bool:
  """Saves ``state`` at ``step``; by default returns once it is on disk.

  Runs ``manager.save(step, args=ocp.args.StandardSave(state), **kwargs)``
  and then, with ``wait=True``, ``manager.wait_until_finished()``. When it
  returns, the checkpoint is complete and committed under its final name: a
  manager opened afterwards, in this process or another, lists it in
  ``all_steps()``, and the script may exit. A save interrupted before that
  (an exception, a kill) leaves the earlier checkpoints as they were; see the
  module docstring for what Orbax guarantees.

  What a checkpoint cannot hold, it records. The static parts of every
  :class:`emax.EmaState` in ``state`` (where it sits in the tree, the names
  of its averages, the params' dtypes, ``debias``, its layout) and the
  ``sigma_rels`` given here go into the step's custom metadata, under the
  key ``'emax'`` (JSON, a few hundred bytes, next to any
  ``custom_metadata`` you pass). :func:`read_average` and
  :func:`emax.posthoc.from_checkpoints` read it; Orbax's own restores, and
  :func:`restore` and :func:`average`, ignore it. A state without an
  average saves exactly as before.

  Args:
    manager: an ``orbax.checkpoint.CheckpointManager``.
    step: the step to save under.
    state: any pytree of arrays: a train state, ``{'params': ...,
      'opt_state': ...}``, an :class:`emax.EmaState`.
    sigma_rels: the widths of the power-function averages in ``state``, for
      post-hoc EMA (:mod:`emax.posthoc`): the mapping given to
      :func:`emax.ema` (``{name: emax.power_function_decay(sigma_rel=...)}``:
      each schedule knows its ``sigma_rel``), or ``{name: sigma_rel}`` (a
      subset of the names is fine: other averages get none); for a single
      unnamed average, one number or schedule. ``None``: record none.
    wait: ``True`` (the default): block until the checkpoint is written and
      committed, also when the manager saves asynchronously (Orbax's
      default); earlier asynchronous saves of the manager finish too.
      ``False``: return as soon as Orbax lets training go on (after the
      arrays are copied off the devices) while the files are written in
      background threads. The checkpoint is then **not** safely written when
      this returns: call ``manager.wait_until_finished()`` or
      ``manager.close()`` (or leave the manager's ``with`` block) before the
      process exits, or the checkpoint is lost, and expect an interrupted
      background save to leave only a temporary directory.
    **kwargs: passed on to ``manager.save``: ``metrics``, ``force``,
      ``custom_metadata`` (a dict; the key ``'emax'`` is emax's).

  Returns:
    Whether the manager saved: ``False`` when its policy skips ``step``
    (``save_interval_steps``, a step not after its latest one); with
    ``wait=True`` the pending saves are written even then.

  Raises:
    TypeError: if ``wait`` is not a bool, or ``sigma_rels`` holds a schedule
      without a ``sigma_rel`` (only :func:`emax.power_function_decay` has
      one) or something that is not a number.
    ValueError: if ``sigma_rels`` names an average ``state`` does not hold,
      a width is outside ``(0, 1/sqrt(12))``, or ``custom_metadata`` already
      has the key ``'emax'``.
    ImportError: if orbax-checkpoint is not installed.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> import emax.checkpoint
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   with ocp.CheckpointManager(directory) as manager:
    ...     emax.checkpoint.save(manager, 1, {'w': jnp.ones(2)})
    ...   ocp.CheckpointManager(directory).latest_step()
    True
    1

    With two power-function averages, record their widths for
    :func:`emax.posthoc.from_checkpoints`:

    >>> import optax, emax
    >>> decays = {'s05': emax.power_function_decay(sigma_rel=0.05),
    ...           's10': emax.power_function_decay(sigma_rel=0.10)}
    >>> tx = emax.with_ema(optax.sgd(0.1), decays)
    >>> state = {'params': {'w': jnp.ones(2)}}
    >>> state['opt_state'] = tx.init(state['params'])
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   with ocp.CheckpointManager(directory) as manager:
    ...     _ = emax.checkpoint.save(manager, 1, state, sigma_rels=decays)
    ...     record = manager.metadata(1).custom_metadata['emax']
    >>> [(a['path'], a['names'], a['sigma_rels']) for a in record['averages']]
    [(['opt_state', 'ema_state'], ['s05', 's10'], [0.05, 0.1])]
  """
  return _checkpoint_record.save(manager, step, state, sigma_rels=sigma_rels,
                                 wait=wait, **kwargs)


def restore(manager: Any, like: Params, step: Optional[int] = None) -> Params:
  """Restores a checkpoint typed and sharded like ``like``.

  Waits first for the manager's own saves still in flight, so it never reads
  a checkpoint that is being written; the restored arrays are complete when
  it returns.

  Args:
    manager: an ``orbax.checkpoint.CheckpointManager``.
    like: a state built as the saved one was (e.g. a fresh
      ``EmaTrainState.create(...)``), or its :func:`abstract_state`.
    step: the step to restore; the latest saved one by default.

  Returns:
    The restored state, with the types, static fields and shardings of
    ``like``: the average inside is an :class:`emax.EmaState` again.

  Raises:
    FileNotFoundError: if the manager holds no checkpoint, or none at
      ``step``; the message lists the steps it holds.
  """
  ocp = _checkpoint_files.orbax()
  step = _checkpoint_files.restorable_step(manager, step)
  return manager.restore(
      step, args=ocp.args.StandardRestore(abstract_state(like)))


def average(directory_or_manager: Union[str, os.PathLike, Any],
            steps: Optional[Sequence[int]] = None,
            weights: Optional[Sequence[float]] = None, *,
            last: Optional[int] = None,
            path: Union[str, Sequence[Union[str, int]],
                        Callable[[Any], Any]] = ('params',),
            item: Optional[str] = None,
            sharding: Optional[Union[Sharding, Any]] = None,
            accumulator_dtype: Optional[Any] = None) -> Params:
  r"""Averages the params (or any subtree) of saved Orbax checkpoints.

  .. math:: \bar\theta = \sum_i \frac{w_i}{\sum_j w_j}\, \theta_{s_i}

  over the checkpoints at steps :math:`s_i`: a uniform average by default
  (uniform model soups; LAWA, Sanyal et al. 2023, with ``last=k``), or a
  weighted one. Works on any checkpoint of a pytree saved with
  ``ocp.args.StandardSave`` (or :func:`save`), also one that never held an
  average: that is how a finished run gets one.

  Streams: for each checkpoint only the selected arrays are read from disk
  (Orbax's partial restore), added into the running sum and dropped before
  the next checkpoint is read, so memory holds the sum and at most one
  checkpoint's selection. The weighted sum is kept in float32 (float64 for
  float64 leaves) or ``accumulator_dtype`` and divided by the total weight
  at the end; each leaf is then rounded to its saved dtype (bf16 params give
  bf16). In float64 the result is the exact mean rounded once, for uniform
  and small integer weights.

  Args:
    directory_or_manager: the checkpoint directory (the manager's
      ``directory``), or an ``orbax.checkpoint.CheckpointManager`` (its saves
      still in flight are waited for first).
    steps: the steps to average, in any order; ``None``: every finished
      checkpoint in the directory.
    weights: one non-negative weight per averaged step, not all zero, in
      the order of ``steps`` (of the sorted steps when ``steps`` is None or
      ``last`` is given); normalized to sum to 1. ``None``: uniform.
    last: average only the ``last`` highest of those steps (LAWA).
    path: what to average, in the tree as Orbax stored it (dicts by key;
      lists, tuples and the fields of named tuples and dataclasses as Orbax
      wrote them: lists by index, named tuples and dataclasses as dicts by
      field name). A key, a sequence of keys from the root (``('params',)``,
      ``('opt_state', 1, 'average')``; ``()``: everything), or a callable
      that takes the stored tree (nested dicts and lists whose leaves are
      Orbax's array metadata, with ``shape`` and ``dtype``) and returns parts
      of it, in any structure (``lambda t: {'p': t['params'], 'b':
      t['batch_stats']}``). Every selected leaf must be floating-point.
    item: the item of a manager that saves several (``item_names``); by
      default the single item that a ``CheckpointManager`` saves.
    sharding: where the arrays go. ``None``: host memory; the result is
      NumPy arrays (``jax.device_put`` them where they belong). A
      ``jax.sharding.Sharding``, or a tree of them shaped like the result:
      each checkpoint is restored straight into that sharding, summed there,
      and the result is ``jax.Array``\ s placed so (for models that do not
      fit in one host's memory).
    accumulator_dtype: ``None``, ``jnp.float32`` or ``jnp.float64``: the
      least precise dtype of the running sum (float64 leaves always sum in
      float64). float64 with ``sharding`` needs ``jax_enable_x64``.

  Returns:
    The average, in the structure that ``path`` selects (the stored tree's
    dicts and lists: a Flax ``params`` dict is a dict again), each leaf in its
    saved dtype.

  Raises:
    FileNotFoundError: if the directory holds no finished checkpoint or not
      every step asked for (the message lists the steps there are).
    KeyError: if ``path`` is not in a checkpoint (the message says what is
      there instead).
    TypeError: if a selected leaf is not floating-point, or an argument has
      the wrong type.
    ValueError: for bad ``weights`` (wrong length, negative, not finite, all
      zero), a bad ``last``, repeated steps, or checkpoints whose selections
      differ in structure, shape or dtype.

  Examples:
    >>> import tempfile, numpy as np, orbax.checkpoint as ocp
    >>> import emax.checkpoint
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   with ocp.CheckpointManager(directory) as manager:
    ...     for step in (1, 2, 3):
    ...       _ = emax.checkpoint.save(
    ...           manager, step, {'params': {'w': np.full(2, step, np.float32)},
    ...                           'step': step})
    ...   soup = emax.checkpoint.average(directory)
    ...   lawa = emax.checkpoint.average(directory, last=2)
    ...   late = emax.checkpoint.average(directory, [1, 3], weights=[1, 3])
    >>> print(soup['w'], lawa['w'], late['w'], soup['w'].dtype)
    [2. 2.] [2.5 2.5] [2.5 2.5] float32
  """
  return _checkpoint_average.average(
      directory_or_manager, steps, weights, last=last, path=path, item=item,
      sharding=sharding, accumulator_dtype=accumulator_dtype,
      collect_above_bytes=_COLLECT_ABOVE_BYTES)


def read_average(restored: Any, *, name: Optional[Union[str, int]] = None,
                 like: Any = None,
                 path: Optional[Sequence[Union[str, int]]] = None,
                 metadata: Any = None) -> Params:
  """The average in a checkpoint restored without a target, to evaluate with.

  A checkpoint restored without a target (``manager.restore(step)`` with no
  ``args``, ``ocp.args.StandardRestore()``, or
  ``flax.serialization.msgpack_restore``) gives plain dicts and lists: the
  :class:`emax.EmaState` is a dict with the keys ``count``, ``average``,
  ``weight``, ``step_size`` and ``skipped``, wherever it sat (in an optax
  chain's list, under ``opt_state``, under ``ema_state`` of
  :func:`emax.with_ema`). This finds it and returns the average as
  :func:`emax.ema_params` would have: debiased and in the params' dtypes.

  Debiasing follows :func:`emax.bias_correction`: the stored average divided
  by its ``weight``, in the stored dtype; a weight of exactly 1 (an average
  that started as a copy) or 0 (``debias=True`` before its first averaging
  step, which still holds the initial params) gives the stored value itself.
  The division happens where the arrays are: NumPy arrays (flax
  serialization) are divided by NumPy, correctly rounded; ``jax.Array``
  leaves (Orbax) on their devices, as :func:`emax.bias_correction` divides
  (XLA on CPU rounds about a third of the quotients one ulp away from the
  correctly rounded one).

  What the dicts lose, and where it comes back from:

  * the params' dtypes (a bf16 param is averaged in float32): from the
    ``'info'`` entry that flax serialization writes, from what
    :func:`save` recorded (``metadata``), or from ``like``; without any of
    them the average comes back in its stored dtype (float32 for bf16
    params).
  * the names of named averages: from ``'info'``, ``metadata`` or ``like``;
    without them pick an average by its index, ``name=0``, ``1``..., in the
    order the mapping given to :func:`emax.ema` listed them.
  * the layout of ``pack=True`` and ``offload=True`` averages (which leaf
    sits where) is saved nowhere: those need ``like``.

  Args:
    restored: the restored tree (or any part of it holding the average), or
      an already typed state (then this is :func:`emax.ema_params`).
    name: which named average: a name, or an index into the names.
    like: the abstract state, such as ``jax.eval_shape(tx.init, params)`` or
      :func:`abstract_state` of a freshly built state (needed for packed and
      offloaded averages; it gives names, dtypes and the params' own tree
      types); or a tree shaped like the params (arrays or
      ``jax.ShapeDtypeStruct``), for their dtypes and tree types.
    path: where the average sits in ``restored`` (keys from the root, e.g.
      ``('opt_state', 1)``), when it holds several (an ``EmaTrainState`` that
      also averages ``batch_stats``).
    metadata: what Orbax gives for the step, ``manager.metadata(step)`` or
      its ``custom_metadata``: the names and dtypes :func:`save` recorded.

  Returns:
    A tree shaped like the params: the stored dicts and lists (flax
    serialization's ``'0'``, ``'1'``... keys for tuples stay), or ``like``'s
    tree types when ``like`` is given; arrays of the restored kind (NumPy
    for flax serialization, ``jax.Array`` for Orbax), or what
    :func:`emax.ema_params` returns when ``like`` is a state.

  Raises:
    ValueError: if no (or more than one, without ``path``) average is found
      (the message says what the tree held), ``name`` is missing, unknown
      or out of range, the average is packed or offloaded and ``like`` is
      missing, or ``like`` does not fit the checkpoint.

  Examples:
    A flax-serialized state, restored without a target; the names and bf16
    dtype come back from the saved ``'info'``:

    >>> import flax.serialization, jax.numpy as jnp, optax, emax
    >>> import emax.checkpoint
    >>> params = {'w': jnp.ones(2, jnp.bfloat16)}
    >>> tx = emax.with_ema(optax.sgd(0.1), {'fast': 0.5, 'slow': 0.9})
    >>> opt_state = tx.init(params)
    >>> _, opt_state = tx.update({'w': jnp.ones(2, jnp.bfloat16)}, opt_state,
    ...                          params)
    >>> raw = flax.serialization.msgpack_restore(
    ...     flax.serialization.to_bytes({'params': params,
    ...                                  'opt_state': opt_state}))
    >>> fast = emax.checkpoint.read_average(raw, name='fast')
    >>> print(type(raw), fast['w'].dtype, fast['w'])
    <class 'dict'> bfloat16 [0.949219 0.949219]
  """
  return _restored.read_average(restored, name=name, like=like, path=path,
                                metadata=metadata)
