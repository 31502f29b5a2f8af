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
import functools
import gc
import numbers
import os
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding
from optax import Params

__all__ = (
    'abstract_state',
    'average',
    'read_average',
    'restore',
    'save',
)


def _ocp():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        'emax.checkpoint needs orbax-checkpoint: pip install "emax[flax]" or'
        ' pip install orbax-checkpoint.') from e
  return ocp


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


def save(manager: Any, step: int, state: Params, *,
         sigma_rels: Any = None, wait: bool = True, **kwargs) -> bool:
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
  ocp = _ocp()
  if not isinstance(wait, bool):
    raise TypeError(
        f'wait must be True or False, got {wait!r} ({type(wait).__name__}).'
        ' Pass wait=False only to keep training while the checkpoint is'
        ' written, and then call manager.wait_until_finished() before the'
        ' process exits.')
  record = _record(state, sigma_rels)
  if record is not None:
    custom = kwargs.get('custom_metadata')
    if custom is None:
      custom = {}
    if not isinstance(custom, dict):
      raise TypeError(
          f'custom_metadata must be a dict, got {type(custom).__name__}.')
    if METADATA_KEY in custom:
      raise ValueError(
          f'custom_metadata has the key {METADATA_KEY!r}, which'
          ' emax.checkpoint.save fills with what it records about the'
          ' averages. Use another key for your own metadata.')
    kwargs['custom_metadata'] = {**custom, METADATA_KEY: record}
  saved = manager.save(step, args=ocp.args.StandardSave(state), **kwargs)
  if wait:
    manager.wait_until_finished()
  return saved


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
  ocp = _ocp()
  manager.wait_until_finished()
  steps = list(manager.all_steps())
  if (not steps) if step is None else (step not in steps):
    manager.reload()  # another process may have saved it since
    steps = list(manager.all_steps())
  if not steps:
    raise FileNotFoundError(
        f'No checkpoint to restore in {manager.directory}; save one first'
        ' with emax.checkpoint.save(manager, step, state).')
  if step is None:
    step = manager.latest_step()
  elif step not in steps:
    raise FileNotFoundError(
        f'No checkpoint for step {step} in {manager.directory}; the saved'
        f' steps are {sorted(steps)}. Pass one of them, or step=None for the'
        ' latest.')
  return manager.restore(
      step, args=ocp.args.StandardRestore(abstract_state(like)))


# --- checkpoint averaging -----------------------------------------------------

# Above this many bytes per checkpoint, average() runs a full garbage
# collection after each one (about 0.2 s, against reading this much).
_COLLECT_ABOVE_BYTES = 64 << 20


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
  ocp = _ocp()
  from etils import epath  # pylint: disable=g-import-not-at-top
  directory = _directory_of(directory_or_manager)
  found = _finished_steps(ocp, epath.Path(directory))
  chosen = _choose_steps(found, steps, last, directory)
  scaled, total_weight = _scaled_weights(weights, chosen)
  acc_floor = _check_accumulator_dtype(accumulator_dtype, sharding)
  path = _check_path(path)

  handler = ocp.PyTreeCheckpointHandler()
  checkpointer = ocp.Checkpointer(handler)
  try:
    # Read every selection's metadata first: a mismatch fails before any
    # array is read.
    plans = []
    for step in chosen:
      item_dir = _item_directory(found[step], item, step)
      stored = handler.metadata(item_dir)
      stored = getattr(stored, 'tree', stored)
      plans.append((step, item_dir, stored, _select(stored, path, step)))
    _, _, _, (treedef, keypaths, specs) = plans[0]
    for step, _, _, (other_treedef, other_keypaths, other_specs) in plans[1:]:
      _check_same(chosen[0], treedef, keypaths, specs,
                  step, other_treedef, other_keypaths, other_specs)
    shardings = _leaf_shardings(sharding, treedef, keypaths)
    selection_bytes = sum(int(np.prod(shape)) * dtype.itemsize
                          for shape, dtype in specs)
    acc_dtypes = [max(acc_floor, _leaf_floor(dtype), key=lambda d: d.itemsize)
                  for _, dtype in specs]

    sums = [None] * len(keypaths)
    for (step, item_dir, stored, _), w in zip(plans, scaled):
      if w == 0:
        continue  # nothing to add: do not read it
      target, restore_args = _partial_target(
          ocp, stored, keypaths, specs, shardings)
      restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))
      values = [_at(restored, k) for k in keypaths]
      del restored, target
      for i, acc_dtype in enumerate(acc_dtypes):
        weight = np.asarray(w, acc_dtype)
        sums[i] = _add(sums[i], values[i], weight)
        values[i] = None  # drop this leaf of the checkpoint now
      del values
      if selection_bytes >= _COLLECT_ABOVE_BYTES:
        # Orbax's restore leaves reference cycles (asyncio futures) that
        # hold on to a restored array until Python's next full collection.
        gc.collect()
  finally:
    checkpointer.close()
  leaves = [_finish(s, total_weight, dtype)
            for s, (_, dtype) in zip(sums, specs)]
  return jax.tree.unflatten(treedef, leaves)


def _directory_of(directory_or_manager):
  if isinstance(directory_or_manager, (str, os.PathLike)):
    return directory_or_manager
  if (hasattr(directory_or_manager, 'directory')
      and hasattr(directory_or_manager, 'wait_until_finished')):
    directory_or_manager.wait_until_finished()  # include saves in flight
    return directory_or_manager.directory
  raise TypeError(
      'average expected a checkpoint directory (a str or path) or an'
      ' orbax.checkpoint.CheckpointManager, got'
      f' {type(directory_or_manager).__name__}.')


def _finished_steps(ocp, directory):
  """{step: step directory} of the finished checkpoints in ``directory``."""
  if not directory.is_dir():
    raise FileNotFoundError(
        f'No checkpoint directory {directory}: it does not exist.')
  found = {}
  for step_dir in ocp.path.step.checkpoint_steps_paths(directory):
    step = ocp.path.step.step_from_checkpoint_name(step_dir.name)
    if step in found:
      raise ValueError(
          f'Two checkpoints for step {step} in {directory}: {found[step].name}'
          f' and {step_dir.name}. Average from a directory that holds one'
          ' run.')
    found[step] = step_dir
  if not found:
    unfinished = sorted(p.name for p in directory.iterdir()
                        if ocp.path.step.TMP_DIR_SUFFIX in p.name)
    raise FileNotFoundError(
        f'No finished checkpoint in {directory}'
        + (f'; only interrupted saves: {unfinished}.' if unfinished else '.'))
  return found


def _choose_steps(found, steps, last, directory):
  """The steps to average, checked against those in the directory."""
  if steps is None:
    chosen = sorted(found)
  else:
    if isinstance(steps, (str, bytes)) or not isinstance(
        steps, (Sequence, np.ndarray, range)):
      raise TypeError(
          f'steps must be a sequence of ints (e.g. [100, 200]), got {steps!r}.')
    chosen = []
    for s in steps:
      if isinstance(s, (bool, np.bool_)) or not isinstance(
          s, (numbers.Integral, np.integer)):
        raise TypeError(f'steps must be ints, got {s!r} in {list(steps)!r}.')
      chosen.append(int(s))
    if not chosen:
      raise ValueError(
          'steps is empty; pass the steps to average, or None for all of'
          f' them ({sorted(found)}).')
    repeated = sorted({s for s in chosen if chosen.count(s) > 1})
    if repeated:
      raise ValueError(
          f'steps {repeated} appear more than once in {chosen}; give each'
          ' step once, and use weights to count one more.')
    missing = [s for s in chosen if s not in found]
    if missing:
      raise FileNotFoundError(
          f'No checkpoint for step{"s" if len(missing) > 1 else ""}'
          f' {", ".join(map(str, missing))} in {directory}; the saved steps'
          f' are {sorted(found)}.')
  if last is not None:
    if isinstance(last, bool) or not isinstance(
        last, (numbers.Integral, np.integer)) or last < 1:
      raise ValueError(f'last must be a positive int, got {last!r}.')
    if last > len(chosen):
      raise ValueError(
          f'last={last} but there are only {len(chosen)} checkpoints to'
          f' average (steps {sorted(chosen)}).')
    chosen = sorted(chosen)[-int(last):]
  return chosen


def _scaled_weights(weights, chosen):
  """One float64 weight per chosen step and their sum, the largest in [1, 2).

  The weights are scaled by a power of two only, which is exact: a sum in
  float64 of float32 params times small integer or dyadic weights is exact,
  and the one division by the total at the end rounds it once.
  """
  n = len(chosen)
  if weights is None:
    return [1.0] * n, float(n)
  try:
    w = np.asarray(weights, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f'weights must be a sequence of numbers, got {weights!r}.') from e
  if w.shape != (n,):
    raise ValueError(
        f'weights has shape {w.shape} but {n} checkpoint'
        f'{"s are" if n > 1 else " is"} averaged (steps {chosen}); give one'
        ' weight per step, in that order.')
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError(
        f'weights must be finite and non-negative, got {w.tolist()}.')
  if not np.any(w > 0):
    raise ValueError(
        f'weights sum to 0 ({w.tolist()}); give at least one checkpoint a'
        ' positive weight.')
  w = np.ldexp(w, -int(np.floor(np.log2(w.max()))))
  return w.tolist(), float(w.sum())


def _check_accumulator_dtype(accumulator_dtype, sharding):
  if accumulator_dtype is None:
    return jnp.dtype(jnp.float32)
  try:
    dtype = jnp.dtype(accumulator_dtype)
  except TypeError as e:
    raise TypeError(
        'accumulator_dtype must be jnp.float32 or jnp.float64, got'
        f' {accumulator_dtype!r}.') from e
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
    raise ValueError(
        'accumulator_dtype must be jnp.float32 or jnp.float64 (a sum in a'
        f' narrower dtype loses the average), got {dtype}.')
  if (dtype == jnp.float64 and sharding is not None
      and not jax.config.jax_enable_x64):
    raise ValueError(
        'accumulator_dtype=float64 on devices needs'
        ' jax.config.update("jax_enable_x64", True); or pass sharding=None to'
        ' sum on the host in float64.')
  return dtype


def _leaf_floor(dtype):
  """The accumulator a leaf needs: float32, or float64 for float64 leaves."""
  return jnp.dtype(jnp.float64 if jnp.dtype(dtype).itemsize > 4
                   else jnp.float32)


def _check_path(path):
  if callable(path):
    return path
  if isinstance(path, (str, int)) and not isinstance(path, bool):
    return (path,)
  if isinstance(path, Sequence) and all(
      isinstance(k, (str, int)) and not isinstance(k, bool) for k in path):
    return tuple(path)
  raise TypeError(
      'path must be a key, a sequence of keys (str for dict keys, int for'
      " list positions), e.g. ('opt_state', 1, 'average'), or a callable"
      f' that selects a subtree; got {path!r}.')


def _item_directory(step_dir, item, step):
  """The directory of the saved pytree inside one step's checkpoint."""
  if item is not None:
    if not (step_dir / item).is_dir():
      raise FileNotFoundError(
          f'Checkpoint step {step} ({step_dir}) has no item {item!r}; its'
          f' items are {_subdirectories(step_dir)}.')
    return step_dir / item
  if (step_dir / 'default').is_dir():  # what a single-item manager writes
    return step_dir / 'default'
  if (step_dir / '_METADATA').exists():  # a Checkpointer wrote it directly
    return step_dir
  raise FileNotFoundError(
      f'Checkpoint step {step} ({step_dir}) saves several items'
      f' {_subdirectories(step_dir)}; pass item= one of them.')


def _subdirectories(directory):
  return sorted(p.name for p in directory.iterdir() if p.is_dir())


def _children(node):
  """(key, child) pairs of a stored tree's dict or list; None for a leaf."""
  if isinstance(node, dict):
    return list(node.items())
  if isinstance(node, (list, tuple)):
    return list(enumerate(node))
  return None


def _describe(node):
  if isinstance(node, dict):
    return f'a dict with keys {sorted(map(str, node))}'
  if isinstance(node, (list, tuple)):
    return f'a list of length {len(node)}'
  if node is None:
    return 'None'
  shape, dtype = getattr(node, 'shape', None), getattr(node, 'dtype', None)
  return f'an array of shape {shape} and dtype {dtype}'


def _select(stored, path, step):
  """The selection's treedef, the key paths of its leaves and their specs."""
  if callable(path):
    selected = path(stored)
  else:
    selected = stored
    for depth, key in enumerate(path):
      children = dict(_children(selected) or ())
      if isinstance(selected, (list, tuple)) and isinstance(key, str):
        children = {str(k): v for k, v in children.items()}
      if key not in children:
        raise KeyError(
            f'Checkpoint step {step} has no path {path!r}: at'
            f' {path[:depth]!r} it holds {_describe(selected)}, with no'
            f' {key!r}. Pass path= a sequence of those keys (or a callable'
            ' that selects the subtree).')
      selected = children[key]
  where = {}

  def walk(node, prefix):
    children = _children(node)
    if children is None:
      if node is not None:
        where[id(node)] = (prefix, node)
      return
    for key, child in children:
      walk(child, prefix + (key,))

  walk(stored, ())
  leaves, treedef = jax.tree.flatten(selected)
  if not leaves:
    raise ValueError(
        f'path {path!r} selects no arrays in checkpoint step {step}'
        f' (it selects {_describe(selected)}).')
  keypaths, specs = [], []
  for leaf in leaves:
    if id(leaf) not in where:
      raise ValueError(
          'The path callable must return parts of the tree it is given (its'
          f' leaves are Orbax metadata), got a leaf {leaf!r}.')
    keypath, meta = where[id(leaf)]
    dtype = getattr(meta, 'dtype', None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f'Cannot average {_keystr(keypath)} of checkpoint step {step}: it'
          f' holds {_describe(meta)}, not floating-point. Narrow path= to'
          ' the float arrays (the params, or an average).')
    keypaths.append(keypath)
    specs.append((tuple(meta.shape), jnp.dtype(dtype)))
  return treedef, keypaths, specs


def _keystr(keypath):
  return ''.join(f'[{k!r}]' for k in keypath) or 'the root'


def _check_same(step0, treedef0, keypaths0, specs0, step, treedef, keypaths,
                specs):
  if treedef != treedef0 or keypaths != keypaths0:
    raise ValueError(
        f'Checkpoints {step0} and {step} hold different trees at the selected'
        f' path: {treedef0} with leaves {list(map(_keystr, keypaths0))}'
        f' against {treedef} with {list(map(_keystr, keypaths))}. Average'
        ' checkpoints of one model.')
  for keypath, spec0, spec in zip(keypaths0, specs0, specs):
    if spec != spec0:
      raise ValueError(
          f'{_keystr(keypath)} has shape {spec0[0]} and dtype {spec0[1]} in'
          f' checkpoint {step0} but shape {spec[0]} and dtype {spec[1]} in'
          f' checkpoint {step}. Average checkpoints of one model.')


def _leaf_shardings(sharding, treedef, keypaths):
  if sharding is None:
    return [None] * len(keypaths)
  if isinstance(sharding, Sharding):
    return [sharding] * len(keypaths)
  try:
    shardings = treedef.flatten_up_to(sharding)
  except (ValueError, TypeError) as e:
    raise ValueError(
        'sharding must be None, a jax.sharding.Sharding, or a tree of them'
        f' shaped like the averaged subtree ({treedef}): {e}') from e
  bad = [s for s in shardings if not isinstance(s, Sharding)]
  if bad:
    raise TypeError(
        f'sharding must hold jax.sharding.Sharding leaves, got {bad[0]!r}.')
  return shardings


def _partial_target(ocp, stored, keypaths, specs, shardings):
  """The stored tree cut down to the selection, for Orbax's partial restore.

  Dicts keep only the keys on a path to a selected leaf; lists keep their
  length, with None where nothing is selected (Orbax reads no array there).
  """
  wanted = {k: (spec, s) for k, spec, s in zip(keypaths, specs, shardings)}
  on_path = {k[:i] for k in keypaths for i in range(len(k) + 1)}

  def nothing(node):
    children = _children(node)
    if children is None:
      return None
    if isinstance(node, dict):
      return {key: nothing(child) for key, child in children}
    return [nothing(child) for _, child in children]

  def cut(node, prefix):
    if prefix in wanted:
      (shape, dtype), s = wanted[prefix]
      return jax.ShapeDtypeStruct(shape, dtype, sharding=s)
    children = _children(node)
    if isinstance(node, dict):
      return {key: cut(child, prefix + (key,)) for key, child in children
              if prefix + (key,) in on_path}
    return [cut(child, prefix + (i,)) if prefix + (i,) in on_path
            else nothing(child) for i, child in children]

  target = cut(stored, ())

  def restore_args(x):
    if x.sharding is None:
      return ocp.RestoreArgs(restore_type=np.ndarray)
    return ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=x.sharding,
                                global_shape=x.shape)

  return target, jax.tree.map(restore_args, target)


def _at(tree, keypath):
  for key in keypath:
    tree = tree[key]
  return tree


@functools.partial(jax.jit, donate_argnums=0)
def _add_on_device(total, x, weight):
  return total + weight * x.astype(total.dtype)


@jax.jit
def _scale_on_device(x, weight):
  return weight * x.astype(weight.dtype)


def _add(total, x, weight):
  """``total + weight * x`` in ``weight``'s dtype; ``total`` may be None."""
  if isinstance(x, jax.Array):
    if total is None:
      return _scale_on_device(x, weight)
    return _add_on_device(total, x, weight)
  term = np.multiply(np.asarray(x, weight.dtype), weight)
  if total is None:
    return term
  total += term
  return total


@functools.partial(jax.jit, donate_argnums=0)
def _divide_on_device(total, total_weight):
  return total / total_weight


def _finish(total, total_weight, dtype):
  """``total / total_weight`` rounded once more, to the params' ``dtype``."""
  total_weight = np.asarray(total_weight, total.dtype)
  if isinstance(total, jax.Array):
    return _divide_on_device(total, total_weight).astype(dtype)
  total /= total_weight
  return total.astype(dtype, copy=False)


# --- what training records, and states restored without a target ------------

METADATA_KEY = 'emax'
"""The key of emax's record in a step's ``custom_metadata``."""

_FORMAT = 1
_STATE_KEYS = ('count', 'average', 'weight', 'step_size', 'skipped')
_SIGMA_REL_MAX = 1 / np.sqrt(12)
_TARGET_HINT = (
    ' Pass like= the abstract state, e.g. like=jax.eval_shape(tx.init,'
    ' params) or emax.checkpoint.abstract_state(a freshly built state), or'
    ' restore with a target: emax.checkpoint.restore(manager, like).')


def _is_ema_state(x):
  from emax import EmaState  # pylint: disable=g-import-not-at-top
  return isinstance(x, EmaState)


def _stored_key(key):
  """A ``jax.tree_util`` path entry as Orbax names it in a stored tree."""
  tu = jax.tree_util
  if isinstance(key, tu.DictKey):
    key = key.key
  elif isinstance(key, tu.GetAttrKey):
    key = key.name
  elif isinstance(key, tu.SequenceKey):
    key = key.idx
  elif isinstance(key, tu.FlattenedIndexKey):
    key = key.key
  if isinstance(key, (str, int)) and not isinstance(key, bool):
    return key
  return str(key)


def _same_path(a, b):
  """Whether two stored paths name the same place (``1`` and ``'1'`` alike)."""
  return (a is not None and b is not None and len(a) == len(b)
          and all(str(x) == str(y) for x, y in zip(a, b)))


def _layout_name(average):
  """``'plain'``, ``'packed'`` (``pack=True``) or ``'offloaded'``."""
  from emax import _layout, _offload  # pylint: disable=g-import-not-at-top
  if isinstance(average, _offload.OffloadedTree):
    return 'offloaded'
  if isinstance(average, _layout.PackedTree):
    return 'packed'
  return 'plain'


def _sigma_rel(value, where):
  """A width as a float: a number, or a schedule's ``sigma_rel``."""
  if callable(value) and not isinstance(value, (jax.Array, np.ndarray)):
    if not isinstance(getattr(value, 'sigma_rel', None), numbers.Real):
      raise TypeError(
          f'{where}: {value!r} has no sigma_rel; only'
          ' emax.power_function_decay schedules do (post-hoc EMA needs'
          ' power-function averages). Give the width as a number, or leave'
          ' this average out.')
    value = value.sigma_rel
  if isinstance(value, bool) or not isinstance(
      value, (numbers.Real, np.number, np.ndarray, jax.Array)) or np.ndim(
          value) != 0:
    raise TypeError(f'{where} must be a number or a power_function_decay'
                    f' schedule, got {value!r}.')
  value = float(value)
  if not 0 < value < _SIGMA_REL_MAX:
    raise ValueError(
        f'{where} is {value}, but a power-function average has sigma_rel in'
        f' (0, {_SIGMA_REL_MAX:.4f}); typical values are 0.05 to 0.15.')
  return value


def _widths(names, sigma_rels, where):
  """One width (or None) per average of a state, and the keys used."""
  count = 1 if names is None else len(names)
  if sigma_rels is None:
    return [None] * count, set()
  if isinstance(sigma_rels, dict) or hasattr(sigma_rels, 'keys'):
    if names is None:
      return [None], set()
    used = [n for n in names if n in sigma_rels]
    return ([_sigma_rel(sigma_rels[n], f'{where}[{n!r}]') if n in sigma_rels
             else None for n in names], set(used))
  if isinstance(sigma_rels, (list, tuple)):
    if names is None or len(sigma_rels) != count:
      return [None] * count, set()
    return [None if s is None else _sigma_rel(s, f'{where}[{i}]')
            for i, s in enumerate(sigma_rels)], {'*'}
  if names is not None:
    return [None] * count, set()
  return [_sigma_rel(sigma_rels, where)], {'*'}


def _record(state, sigma_rels):
  """What :func:`save` records about the averages in ``state`` (or None)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state,
                                                 is_leaf=_is_ema_state)
  averages, used = [], set()
  for path, x in flat:
    if not _is_ema_state(x):
      continue
    info = x.info
    names = None if info.names is None else list(info.names)
    widths, keys = _widths(info.names, sigma_rels, 'sigma_rels')
    used |= keys
    layout = _layout_name(x.average)
    param_paths = None
    if layout == 'plain':
      param_paths = [[_stored_key(k) for k in p] for p, _ in
                     jax.tree_util.tree_flatten_with_path(x.average)[0]]
    averages.append({
        'path': [_stored_key(k) for k in path],
        'names': names,
        'debias': bool(info.debias),
        'layout': layout,
        'param_dtypes': [str(np.dtype(d)) for d in info.param_dtypes],
        'param_paths': param_paths,
        'sigma_rels': widths if any(w is not None for w in widths) else None,
    })
  if sigma_rels is not None:
    if not averages:
      raise ValueError(
          'sigma_rels was given, but the state holds no emax.EmaState to'
          ' record it for. Save the state that holds the averages (e.g.'
          ' {"params": params, "opt_state": opt_state}).')
    named = [a['names'] for a in averages if a['names'] is not None]
    if isinstance(sigma_rels, dict) or hasattr(sigma_rels, 'keys'):
      unknown = sorted(set(map(str, sigma_rels)) - used)
      if unknown:
        raise ValueError(
            f'sigma_rels names {unknown}, but the averages in the state are'
            f' named {named or "nothing (a single unnamed average)"}. Give'
            ' one entry per named average, e.g. the mapping given to'
            ' emax.ema.')
    elif not used:
      raise ValueError(
          f'sigma_rels={sigma_rels!r} fits no average in the state: a single'
          ' number or schedule is for a single unnamed average, a sequence'
          ' for named ones (one per name, in order); these are named'
          f' {named}. Give a mapping {{name: sigma_rel}}.')
  if not averages:
    return None
  return {'format': _FORMAT, 'averages': averages}


def _recorded(metadata):
  """The list of recorded averages in ``metadata``, or None."""
  if metadata is None:
    return None
  metadata = getattr(metadata, 'custom_metadata', metadata)
  if not isinstance(metadata, dict):
    raise TypeError(
        'metadata must be what Orbax gives for a step:'
        ' manager.metadata(step) or its .custom_metadata dict; got'
        f' {type(metadata).__name__}.')
  record = metadata.get(METADATA_KEY, metadata)
  if not isinstance(record, dict) or 'averages' not in record:
    return None
  if record.get('format') != _FORMAT:
    raise ValueError(
        f'The checkpoint\'s emax record has format {record.get("format")!r};'
        f' this emax reads format {_FORMAT}. Upgrade emax.')
  return record['averages']


def _found_states(tree):
  """``[(path, node)]``: every dict shaped like an EmaState, or EmaState."""
  found = []

  def walk(node, path):
    if _is_ema_state(node):
      found.append((path, node))
    elif isinstance(node, dict):
      if set(_STATE_KEYS) <= set(node):
        found.append((path, node))
        return
      for key, child in node.items():
        walk(child, path + (key,))
    elif isinstance(node, (list, tuple)):
      for i, child in enumerate(node):
        walk(child, path + (i,))

  walk(tree, ())
  return found


def _describe_top(tree):
  if isinstance(tree, dict):
    return f'its top-level keys were {sorted(map(str, tree))}'
  if isinstance(tree, (list, tuple)):
    return f'it was a {type(tree).__name__} of length {len(tree)}'
  return f'it was {_describe(tree)}'


def _pick(found, path, tree, where):
  """The one found state at ``path`` (or the only one)."""
  if not found:
    raise ValueError(
        f'{where}: found no dict with keys {"/".join(_STATE_KEYS)} (an'
        f' emax.EmaState restored without a target); {_describe_top(tree)}.'
        ' Pass the state that holds the average (the whole restored'
        ' checkpoint, or its opt_state).')
  if path is not None:
    path = (path,) if isinstance(path, (str, int)) else tuple(path)
    for p, node in found:
      if _same_path(p, path):
        return p, node
    raise ValueError(
        f'{where}: no average at path {list(path)}; the averages are at'
        f' {[list(p) for p, _ in found]}.')
  if len(found) > 1:
    raise ValueError(
        f'{where}: found {len(found)} averages, at'
        f' {[list(p) for p, _ in found]}; pass path= the one to read, e.g.'
        f' path={list(found[0][0])}.')
  return found[0]


def _entry_at(recorded, path):
  for entry in recorded or ():
    if _same_path(entry.get('path'), path):
      return entry
  return None


def _digits(node):
  """Whether a dict's keys are '0'..'n-1' (how flax serializes a sequence)."""
  keys = list(node)
  return bool(keys) and all(isinstance(k, str) and k.isdigit() for k in keys
                            ) and sorted(map(int, keys)) == list(
                                range(len(keys)))


def _children_in_order(node):
  if isinstance(node, dict):
    keys = (sorted(node, key=int) if _digits(node)
            else sorted(node, key=lambda k: (str(type(k)), k)))
    return [(k, node[k]) for k in keys]
  return list(enumerate(node))


def _flatten(tree, path=()):
  """``[(path, leaf)]`` of a restored tree, in the params' order.

  Dicts by sorted key, as ``jax.tree`` flattens them, except dicts keyed
  ``'0'..'n-1'`` (flax serialization's sequences), by number.
  """
  if isinstance(tree, (dict, list, tuple)):
    out = []
    for key, child in _children_in_order(tree):
      out.extend(_flatten(child, path + (key,)))
    return out
  return [] if tree is None else [(path, tree)]


def _rebuild(tree, leaves):
  """``tree``'s dicts and lists, its leaves replaced (in ``_flatten`` order)."""
  it = iter(leaves)

  def go(node):
    if isinstance(node, dict):
      new = {k: go(child) for k, child in _children_in_order(node)}
      return {k: new[k] for k in node}  # the stored key order
    if isinstance(node, (list, tuple)):
      return type(node)(go(child) for child in node)
    return None if node is None else next(it)

  return go(tree)


def _is_inexact(x):
  return jnp.issubdtype(getattr(x, 'dtype', np.asarray(x).dtype), jnp.inexact)


def _stored_layout(average):
  """The layout a restored ``average`` dict looks like it was stored in."""
  if isinstance(average, dict):
    keys = set(average)
    if keys == {'buffers', 'rest'}:
      return 'packed'
    if keys == {'leaves'} and any(
        jnp.issubdtype(getattr(x, 'dtype', np.int8), jnp.unsignedinteger)
        for _, x in _flatten(average)):
      return 'offloaded'
  return 'plain'


class _Plan:
  """How to read the averages of one restored EmaState dict.

  Attributes:
    names: the names of the averages, or None (unknown, or a single one).
    count: how many averages it holds (1 for a single, unstacked one).
    stacked: whether float leaves have a leading axis, one per average.
    dtypes: per stored leaf of the average (``_flatten`` order), the params'
      dtype; None where unknown (the stored dtype is kept).
    treedef: the params' treedef to return, or None (the stored structure).
    like_state: the abstract EmaState to pour the stored leaves into
      (packed, offloaded, or ``like`` given as a state), or None.
  """

  def __init__(self, node, path, *, like, recorded, where):
    self.path = path
    self.treedef = None
    self.like_state = None
    entry = _entry_at(recorded, path)
    info = node.get('info') if isinstance(node.get('info'), dict) else None
    weight = node['weight']
    shape = tuple(getattr(weight, 'shape', np.shape(weight)))
    count_shape = tuple(getattr(node['count'], 'shape', ()))
    if count_shape:
      raise ValueError(
          f'{where}: the average at {list(path)} has a count of shape'
          f' {count_shape}: it was saved replicated (jax.pmap), one copy per'
          ' device. Read one replica:'
          ' jax.tree.map(lambda x: x[0], restored).')
    self.stacked = len(shape) == 1
    self.count = shape[0] if self.stacked else 1
    names = None
    if info is not None and info.get('names') is not None:
      names = tuple(info['names'])
    elif entry is not None and entry.get('names') is not None:
      names = tuple(entry['names'])
    layout = entry['layout'] if entry else _stored_layout(node['average'])
    like_state, params_like = _like_parts(like, path, where)
    if like_state is not None:
      self.like_state = like_state
      names = like_state.info.names
    elif layout != 'plain':
      raise ValueError(
          f'{where}: the average at {list(path)} was stored {layout}'
          f' ({"pack=True" if layout == "packed" else "offload=True"}): where'
          ' each param sits in it is static and is not in the checkpoint.'
          + _TARGET_HINT)
    if names is not None and len(names) != self.count:
      raise ValueError(
          f'{where}: the average at {list(path)} holds {self.count}'
          f' averages but its names are {list(names)}.')
    self.names = names
    stored = _flatten(node['average'])
    self.dtypes = [None] * len(stored)
    if params_like is not None:
      leaves, treedef = jax.tree.flatten(params_like)
      if len(leaves) != len(stored):
        raise ValueError(
            f'{where}: like has {len(leaves)} leaves but the average at'
            f' {list(path)} has {len(stored)}. Pass the params the average'
            ' was made of (or their jax.eval_shape), or the abstract state.')
      self.dtypes = [np.dtype(getattr(x, 'dtype', np.asarray(x).dtype))
                     for x in leaves]
      self.treedef = treedef
    elif entry is not None and entry.get('param_paths') is not None:
      by_path = {tuple(map(str, p)): d for p, d in zip(
          entry['param_paths'], entry['param_dtypes'])}
      self.dtypes = [_dtype(by_path.get(tuple(map(str, p))))
                     for p, _ in stored]
    elif info is not None and info.get('param_dtypes') is not None:
      dtypes = info['param_dtypes']
      if len(dtypes) == len(stored):
        self.dtypes = [_dtype(d) for d in dtypes]

  def index(self, name, where):
    """The position of average ``name`` (None for a single, unstacked one)."""
    if not self.stacked:
      if name is not None and name != 0:
        raise ValueError(
            f'{where}: the average at {list(self.path)} is a single, unnamed'
            f' average; got name={name!r}. Read it without a name.')
      return None
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
      if not 0 <= name < self.count:
        raise ValueError(
            f'{where}: name={name} is out of range: the state holds'
            f' {self.count} averages (indices 0 to {self.count - 1}).')
      return int(name)
    if name is None:
      if self.count == 1:
        return 0
      listed = (f'named {list(self.names)}' if self.names is not None else
                f'whose names were not saved (pass an index 0 to'
                f' {self.count - 1}, in the order given to emax.ema)')
      raise ValueError(
          f'{where}: the state holds {self.count} averages, {listed}; say'
          f' which one with name=.')
    if self.names is None:
      raise ValueError(
          f'{where}: got name={name!r}, but the names of the'
          f' {self.count} averages were not saved (Orbax drops them; save'
          ' with emax.checkpoint.save to record them). Pass an index 0 to'
          f' {self.count - 1} instead: the averages are in the order given'
          ' to emax.ema.')
    if name not in self.names:
      raise ValueError(
          f'{where}: no average named {name!r}; the state holds'
          f' {list(self.names)}.')
    return self.names.index(name)


def _dtype(name):
  return None if name is None else jnp.dtype(name)


def _like_parts(like, path, where):
  """``(abstract EmaState or None, params-like tree or None)`` of ``like``."""
  if like is None:
    return None, None
  flat, _ = jax.tree_util.tree_flatten_with_path(like, is_leaf=_is_ema_state)
  states = [(tuple(_stored_key(k) for k in p), x) for p, x in flat
            if _is_ema_state(x)]
  if not states:
    return None, like
  if len(states) == 1:
    return states[0][1], None
  for p, x in states:
    if _same_path(p, path):
      return x, None
  raise ValueError(
      f'{where}: like holds {len(states)} averages, at'
      f' {[list(p) for p, _ in states]}, none at {list(path)}.')


def _pour(node, like_state, where):
  """The stored leaves of ``node`` as an EmaState shaped like ``like_state``."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(like_state)
  leaves = []
  for keypath, spec in flat:
    value = node
    for key in map(_stored_key, keypath):
      children = dict(_children(value) or ())
      if key not in children:
        children = {str(k): v for k, v in children.items()}
        key = str(key)
      if key not in children:
        raise ValueError(
            f'{where}: the restored average has no'
            f' {jax.tree_util.keystr(keypath)}, which like has: like is not'
            ' the state that was saved (check pack=, offload=, the names and'
            ' the params).')
      value = children[key]
    shape = tuple(getattr(spec, 'shape', np.shape(spec)))
    if tuple(np.shape(value)) != shape:
      raise ValueError(
          f'{where}: {jax.tree_util.keystr(keypath)} has shape'
          f' {tuple(np.shape(value))} in the checkpoint but {shape} in like:'
          ' like is not the state that was saved.')
    leaves.append(jnp.asarray(value))
  return jax.tree.unflatten(treedef, leaves)


def _debias(x, weight):
  """The rule of :func:`emax.bias_correction`: ``average / weight``.

  A weight of 1 (an average that started as a copy) or 0 (``debias=True``
  before its first averaging step, which still holds the initial params)
  leaves the stored value as it is, to the bit; any other weight divides,
  in the stored (accumulator) dtype.
  """
  weight = float(weight)
  if weight in (0.0, 1.0):
    return x
  if isinstance(x, jax.Array):
    return x / jnp.asarray(weight, x.dtype)
  x = np.asarray(x)
  return x / np.asarray(weight, x.dtype)


def _accumulated(node, plan, index):
  """One average of ``node``, debiased, as ``[(path, leaf)]`` (acc dtypes)."""
  weight = node['weight'] if index is None else node['weight'][index]
  out = []
  for path, x in _flatten(node['average']):
    if _is_inexact(x):
      x = _debias(x if index is None else x[index], weight)
    out.append((path, x))
  return out


def _cast(x, dtype):
  if dtype is None or not _is_inexact(x):
    return x
  return x.astype(dtype)


def _read(node, plan, name, where):
  """One average of a found state dict, debiased, in the params' dtypes."""
  from emax import ema_params  # pylint: disable=g-import-not-at-top
  if plan.like_state is not None:
    state = _pour(node, plan.like_state, where)
    index = plan.index(name, where)
    return ema_params(state, None if index is None or plan.names is None
                      else plan.names[index])
  leaves = [_cast(x, d) for (_, x), d in zip(
      _accumulated(node, plan, plan.index(name, where)), plan.dtypes)]
  if plan.treedef is not None:
    return jax.tree.unflatten(plan.treedef, leaves)
  return _rebuild(node['average'], leaves)


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
  where = 'emax.checkpoint.read_average'
  found = _found_states(restored)
  chosen_path, node = _pick(found, path, restored, where)
  if _is_ema_state(node):
    from emax import ema_params  # pylint: disable=g-import-not-at-top
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
      names = node.info.names or ()
      name = names[name] if 0 <= name < len(names) else name
    return ema_params(node, name)
  plan = _Plan(node, chosen_path, like=like, recorded=_recorded(metadata),
               where=where)
  return _read(node, plan, name, where)
