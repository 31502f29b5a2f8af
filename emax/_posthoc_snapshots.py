"""Snapshots given in memory: the body of :func:`emax.posthoc.reconstruct`.

Each snapshot is a ``(step, sigma_rel, tree_or_loader)`` tuple. The tuples
are read once into a list and checked, the weights come from the EDM2 solve
(:mod:`emax._posthoc_solve`), and the snapshots with a weight are loaded one
at a time and added into a sum (:class:`emax._streaming_sum.TreeSum`: float64
on the host, or on the devices shard by shard with ``sharding=``) before the
next one is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import optax

from emax import _options
from emax import _posthoc_solve
from emax._streaming_sum import TreeSum

Snapshot = tuple[Any, Any, optax.Params | Callable[[], optax.Params]]


def reconstruct(snapshots: Iterable[Snapshot], target_sigma_rel: float,
                target_step: float | None = None, *,
                sharding: Any = None) -> optax.Params:
  """Rebuilds the average of another width from snapshots of averages.

  Reads ``snapshots`` once into a list, computes the weights with
  :func:`emax.posthoc.coefficients`, then adds the snapshots one at a time: each
  tree is loaded (if a loader is given), its float leaves are added, weighted,
  into float64 accumulators on the host (complex128 for complex leaves), and it
  is dropped before the next one is loaded. With loaders, at most one loaded
  snapshot is alive besides the running sum, whatever the number of snapshots.
  Snapshots taken after ``target_step`` have weight 0 and are never loaded.

  Float leaves come back rounded once from float64 to the snapshots' own
  dtypes (bf16 snapshots give a bf16 result). Non-float leaves (counters and
  the like) are taken from the latest snapshot used (the first given of
  those at that step), as :func:`emax.update` keeps the latest value of a
  non-float param. A leaf that is a
  ``jax.Array`` in the first snapshot used comes back as a ``jax.Array`` with
  its sharding; other leaves come back as NumPy arrays.

  With ``sharding``, nothing goes through the host: each snapshot's leaves
  are put on their target sharding (a no-op for arrays already there) and
  summed on the devices shard by shard, in float32 (complex64), or float64
  (complex128) when ``jax_enable_x64`` is on; every leaf comes back as a
  ``jax.Array`` on its target sharding.

  Args:
    snapshots: an iterable (a list, a generator...) of ``(step, sigma_rel,
      tree_or_loader)``: the step the snapshot was taken at
      (:attr:`emax.EmaState.count`), the ``sigma_rel`` it was tracked with,
      and its tree of arrays (for example ``emax.ema_params(state)``) or a
      function of no arguments that loads it. Any callable is taken as a
      loader. Without ``sharding`` arrays are read on the host, so jax
      arrays must be fully addressable (single process).
    target_sigma_rel: the width to reconstruct.
    target_step: the step to reconstruct at, one of the snapshots' steps;
      the last snapshot's step by default.
    sharding: ``None`` (the sum in float64 on the host), or where the
      result goes: a ``jax.sharding.Sharding``, or a tree shaped like the
      snapshots of shardings or of ``jax.Array`` or ``jax.ShapeDtypeStruct``
      leaves that have one (the params, or
      ``emax.checkpoint.abstract_state`` of them), as
      for :func:`emax.checkpoint.average`. Works under ``jax.distributed``
      with snapshots of global arrays.

  Returns:
    The reconstructed tree, structured like the snapshots.

  Raises:
    ValueError: for anything :func:`emax.posthoc.coefficients` rejects; if
      ``snapshots`` is not an iterable of 3-tuples; if a loader returns
      ``None``; if the snapshots' trees differ in structure, shapes or
      dtypes; or if ``sharding`` is not shaped like them or cannot hold a
      leaf (named).
    TypeError: if ``sharding`` holds something that is no sharding and has
      none, or a sharding over an ``AbstractMesh``.

  Examples:
    Snapshots given by loaders, from a generator; a width that was tracked
    comes back as its own snapshot:

    >>> import numpy as np
    >>> import emax.posthoc
    >>> def loader(value):
    ...   return lambda: {'w': np.full(2, value, np.float32)}
    >>> snapshots = ((step, sigma_rel, loader(step * 10 * sigma_rel))
    ...              for step in (500, 1000) for sigma_rel in (0.05, 0.10))
    >>> emax.posthoc.reconstruct(snapshots, 0.10)
    {'w': array([1000., 1000.], dtype=float32)}

    Trees work as well as loaders; snapshots after ``target_step`` are
    skipped:

    >>> snapshots = [(500, 0.05, {'w': np.float32(1.0)}),
    ...              (500, 0.10, {'w': np.float32(2.0)}),
    ...              (1000, 0.10, {'w': np.float32(9.0)})]
    >>> out = emax.posthoc.reconstruct(snapshots, 0.08, target_step=500)
    >>> out['w'].dtype, round(float(out['w']), 3)
    (dtype('float32'), 1.742)

    Summed on the devices instead (float32 there), into a sharding:

    >>> import jax
    >>> from jax.sharding import NamedSharding, PartitionSpec
    >>> mesh = jax.make_mesh((jax.device_count(),), ('data',))
    >>> replicated = NamedSharding(mesh, PartitionSpec())
    >>> out = emax.posthoc.reconstruct(snapshots, 0.08, target_step=500,
    ...                                sharding=replicated)
    >>> out['w'].sharding == replicated, round(float(out['w']), 3)
    (True, 1.742)
  """
  entries = _entries(snapshots)
  steps = _column(entries, 0, 'step')
  sigma_rels = _column(entries, 1, 'sigma_rel')
  [weights], used, latest = _posthoc_solve.solve_targets(
      steps, sigma_rels, [target_sigma_rel], target_step,
      ('snapshot steps', 'snapshot sigma_rels'))
  total = TreeSum(sharding)
  for k in used:
    where = f'snapshot {k} (step {steps[k]:g}, sigma_rel {sigma_rels[k]:g})'
    # The loaded tree lives only inside this call: it is gone before the next
    # loader runs.
    total.add(_load(entries[k][2], where), float(weights[k]), k == latest,
              where)
  return total.result()


def _entries(snapshots: Any) -> list[Snapshot]:
  """The snapshots as a list of 3-tuples (reads an iterator once)."""
  if isinstance(snapshots, (str, bytes)) or not isinstance(snapshots,
                                                           Iterable):
    raise ValueError(
        'snapshots must be an iterable of (step, sigma_rel, tree_or_loader)'
        f' tuples, got {type(snapshots).__name__}.')
  entries = list(snapshots)
  for k, entry in enumerate(entries):
    if not isinstance(entry, (tuple, list)) or len(entry) != 3:
      got = type(entry).__name__
      if isinstance(entry, (tuple, list)):
        got += f' of length {len(entry)}'
      raise ValueError(
          f'Snapshot {k} must be a (step, sigma_rel, tree_or_loader) tuple,'
          f' got {got}. Give the step it was taken at (EmaState.count), the'
          ' sigma_rel it was tracked with, and its params or a function that'
          ' loads them.')
  return entries


def _column(entries: list[Snapshot], k: int, name: str) -> np.ndarray:
  """Item ``k`` of every snapshot, as float64."""
  return np.array(
      [_options.finite_scalar(entry[k], f'the {name} of snapshot {j}')
       for j, entry in enumerate(entries)], np.float64).reshape(len(entries))


def _load(item: Any, where: str) -> Any:
  if not callable(item):
    return item
  tree = item()
  if tree is None:
    raise ValueError(
        f'The loader of {where} returned None; a loader must return the'
        ' snapshot\'s tree of arrays (did it forget a return?).')
  return tree
