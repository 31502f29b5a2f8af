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


def save(manager: Any, step: int, state: Params, *, wait: bool = True,
         **kwargs) -> bool:
  """Saves ``state`` at ``step``; by default returns once it is on disk.

  Runs ``manager.save(step, args=ocp.args.StandardSave(state), **kwargs)``
  and then, with ``wait=True``, ``manager.wait_until_finished()``. When it
  returns, the checkpoint is complete and committed under its final name: a
  manager opened afterwards, in this process or another, lists it in
  ``all_steps()``, and the script may exit. A save interrupted before that
  (an exception, a kill) leaves the earlier checkpoints as they were; see the
  module docstring for what Orbax guarantees.

  Args:
    manager: an ``orbax.checkpoint.CheckpointManager``.
    step: the step to save under.
    state: any pytree of arrays: a train state, ``{'params': ...,
      'opt_state': ...}``, an :class:`emax.EmaState`.
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
      ``custom_metadata``.

  Returns:
    Whether the manager saved: ``False`` when its policy skips ``step``
    (``save_interval_steps``, a step not after its latest one); with
    ``wait=True`` the pending saves are written even then.

  Raises:
    TypeError: if ``wait`` is not a bool.
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
  """
  ocp = _ocp()
  if not isinstance(wait, bool):
    raise TypeError(
        f'wait must be True or False, got {wait!r} ({type(wait).__name__}).'
        ' Pass wait=False only to keep training while the checkpoint is'
        ' written, and then call manager.wait_until_finished() before the'
        ' process exits.')
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
