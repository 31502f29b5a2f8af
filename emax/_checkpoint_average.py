"""How checkpoints are averaged: :func:`emax.checkpoint.average`.

The steps and weights are checked against the directory; then every
checkpoint's metadata is read (no arrays) and the selected subtrees compared,
so that a mismatch fails before any array is read; then each checkpoint's
selection alone is read (a partial restore), added, weighted, into a running
sum (:mod:`emax._streaming_sum`) and dropped before the next one is read.
Weights are scaled by a power of two only, and the sum is divided by their
total once, at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding
from jax.typing import DTypeLike
from optax import Params

from emax import _checkpoint_files
from emax import _options
from emax import _stored_tree
from emax import _streaming_sum
from emax import _tree

_WHERE = 'emax.checkpoint.average'

# (treedef, key paths of the leaves, (shape, dtype) of each leaf)
_Selection = tuple[Any, list[tuple[Any, ...]], list[tuple[tuple[int, ...],
                                                          np.dtype]]]


def average(directory_or_manager: str | os.PathLike | Any,
            steps: Sequence[int] | None = None,
            weights: Sequence[float] | None = None, *,
            last: int | None = None,
            path: (str | Sequence[str | int]
                   | Callable[[Any], Any]) = ('params',),
            item: str | None = None,
            sharding: Sharding | Any | None = None,
            accumulator_dtype: DTypeLike | None = None) -> Params:
  r"""Averages the params (or any subtree) of saved Orbax checkpoints.

  .. math:: \bar\theta = \sum_i \frac{w_i}{\sum_j w_j}\, \theta_{s_i}

  over the checkpoints at steps :math:`s_i`: a uniform average by default
  (uniform model soups; LAWA, Sanyal et al. 2023, with ``last=k``), or a
  weighted one. Works on any checkpoint of a pytree saved with
  ``ocp.args.StandardSave`` (or :func:`emax.checkpoint.save`), also one that
  never held an average: that is how a finished run gets one.

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
      ``jax.sharding.Sharding``, or a tree shaped like the result of
      shardings or of ``jax.Array``\ s / ``jax.ShapeDtypeStruct``\ s that
      have one (the params, or
      ``emax.checkpoint.abstract_state`` of them): each
      checkpoint's arrays are restored straight into that sharding, each
      device reading only its own shards, summed there shard by shard, and
      the result is ``jax.Array``\ s placed so. No host or device holds a
      whole unsharded array: per device, memory holds about one shard set
      of the sum and one of the checkpoint being read (see
      ``docs/scaling.md``). Works across processes (``jax.distributed``)
      with a sharding over all their devices.
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
      zero), a bad ``last``, repeated steps, checkpoints whose selections
      differ in structure, shape or dtype, or a ``sharding`` not shaped like
      the result or that cannot hold a leaf (named), before any array is read.

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
  directory, found = _checkpoint_files.finished_steps(directory_or_manager,
                                                      _WHERE)
  chosen = _choose_steps(found, steps, last, directory)
  scaled, total_weight = _scaled_weights(weights, chosen)
  acc_floor = _check_accumulator_dtype(accumulator_dtype, sharding)
  path = _check_path(path)

  with _checkpoint_files.Reader() as reader:
    # Read every selection's metadata first: a mismatch fails before any
    # array is read.
    plans = []
    for step in chosen:
      item_dir = _checkpoint_files.item_directory(found[step], item, step)
      stored = reader.stored(item_dir, step)
      plans.append((step, item_dir, stored, _select(stored, path, step)))
    first = plans[0][3]
    for step, _, _, selection in plans[1:]:
      _check_same(chosen[0], first, step, selection)
    treedef, keypaths, specs = first
    shardings = _streaming_sum.leaf_shardings(
        sharding, treedef, 'the averaged subtree',
        [(_stored_tree.keystr(k), shape, dtype)
         for k, (shape, dtype) in zip(keypaths, specs)])
    selection_bytes = sum(int(np.prod(shape)) * dtype.itemsize
                          for shape, dtype in specs)
    acc_dtypes = [max(acc_floor, _tree.accumulator_dtype_for(dtype),
                      key=lambda d: d.itemsize) for _, dtype in specs]

    sums: list[Any] = [None] * len(keypaths)
    for (step, item_dir, stored, _), w in zip(plans, scaled):
      if w == 0:
        continue  # nothing to add: do not read it
      values = reader.read(item_dir, stored, keypaths, shardings)
      for i, acc_dtype in enumerate(acc_dtypes):
        sums[i] = _streaming_sum.add(sums[i], values[i], w, acc_dtype)
        values[i] = None  # drop this leaf of the checkpoint now
      del values
      reader.done(selection_bytes)
  leaves = [_streaming_sum.finish(s, total_weight, dtype)
            for s, (_, dtype) in zip(sums, specs)]
  return jax.tree.unflatten(treedef, leaves)


def _choose_steps(found: dict[int, Any], steps: Any, last: Any,
                  directory: Any) -> list[int]:
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
      chosen.append(_options.check_int(s, 'steps', 0))
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
    last = _options.check_int(last, 'last', 1)
    if last > len(chosen):
      raise ValueError(
          f'last={last} but there are only {len(chosen)} checkpoints to'
          f' average (steps {sorted(chosen)}).')
    chosen = sorted(chosen)[-last:]
  return chosen


def _scaled_weights(weights: Any, chosen: list[int]
                    ) -> tuple[list[float], float]:
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


def _check_accumulator_dtype(accumulator_dtype: Any,
                             sharding: Any) -> np.dtype:
  dtype = _options.check_accumulator_dtype(accumulator_dtype)
  if dtype is None:
    return jnp.dtype(jnp.float32)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
    raise ValueError(
        'accumulator_dtype must be jnp.float32 or jnp.float64 (a sum in a'
        f' narrower dtype loses the average), got {dtype}.')
  if (dtype == jnp.float64 and sharding is not None
      and not getattr(jax.config, 'jax_enable_x64')):
    raise ValueError(
        'accumulator_dtype=float64 on devices needs'
        ' jax.config.update("jax_enable_x64", True); or pass sharding=None to'
        ' sum on the host in float64.')
  return dtype


def _check_path(path: Any) -> tuple[Any, ...] | Callable[[Any], Any]:
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


def _select(stored: Any, path: tuple[Any, ...] | Callable[[Any], Any],
            step: int) -> _Selection:
  """The selection's treedef, the key paths of its leaves and their specs."""
  if callable(path):
    selected = path(stored)
  else:
    selected = stored
    for depth, key in enumerate(path):
      try:
        selected_child = _stored_tree.child(selected, key)
      except KeyError:
        raise KeyError(
            f'Checkpoint step {step} has no path {path!r}: at'
            f' {path[:depth]!r} it holds {_stored_tree.describe(selected)},'
            f' with no {key!r}. Pass path= a sequence of those keys (or a'
            ' callable that selects the subtree).') from None
      selected = selected_child
  where = {id(leaf): (keypath, leaf)
           for keypath, leaf in _stored_tree.flatten(stored)}
  leaves, treedef = jax.tree.flatten(selected)
  if not leaves:
    raise ValueError(
        f'path {path!r} selects no arrays in checkpoint step {step}'
        f' (it selects {_stored_tree.describe(selected)}).')
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
          f'Cannot average {_stored_tree.keystr(keypath)} of checkpoint step'
          f' {step}: it holds {_stored_tree.describe(meta)}, not'
          ' floating-point. Narrow path= to the float arrays (the params, or'
          ' an average).')
    keypaths.append(keypath)
    specs.append((tuple(meta.shape), jnp.dtype(dtype)))
  return treedef, keypaths, specs


def _check_same(step0: int, selection0: _Selection, step: int,
                selection: _Selection) -> None:
  treedef0, keypaths0, specs0 = selection0
  treedef, keypaths, specs = selection
  keystr = _stored_tree.keystr
  if treedef != treedef0 or keypaths != keypaths0:
    raise ValueError(
        f'Checkpoints {step0} and {step} hold different trees at the selected'
        f' path: {treedef0} with leaves {list(map(keystr, keypaths0))}'
        f' against {treedef} with {list(map(keystr, keypaths))}. Average'
        ' checkpoints of one model.')
  for keypath, spec0, spec in zip(keypaths0, specs0, specs):
    if spec != spec0:
      raise ValueError(
          f'{keystr(keypath)} has shape {spec0[0]} and dtype {spec0[1]} in'
          f' checkpoint {step0} but shape {spec[0]} and dtype {spec[1]} in'
          f' checkpoint {step}. Average checkpoints of one model.')

