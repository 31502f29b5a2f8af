"""Snapshots given in memory: the body of :func:`emax.posthoc.reconstruct`.

Each snapshot is a ``(step, sigma_rel, tree_or_loader)`` tuple. The tuples
are read once into a list and checked, the weights come from the EDM2 solve
(:mod:`emax._posthoc_solve`), and the snapshots with a weight are loaded one
at a time and added into a float64 sum (:class:`emax._streaming_sum.TreeSum`)
before the next one is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Union

import numpy as np
import optax

from emax import _posthoc_solve
from emax._streaming_sum import TreeSum

Snapshot = tuple[Any, Any, Union[optax.Params, Callable[[], optax.Params]]]


def reconstruct(snapshots: Iterable[Snapshot], target_sigma_rel: Any,
                target_step: Any) -> optax.Params:
  """:func:`emax.posthoc.reconstruct`; see its docstring."""
  entries = _entries(snapshots)
  steps = _column(entries, 0, 'step')
  sigma_rels = _column(entries, 1, 'sigma_rel')
  weights, used = _posthoc_solve.solve(
      steps, sigma_rels, target_sigma_rel, target_step,
      ('snapshot steps', 'snapshot sigma_rels'))
  latest = max(used.tolist(), key=lambda k: (steps[k], -k))
  total = TreeSum()
  for k in used.tolist():
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
      [_posthoc_solve.scalar(entry[k], f'the {name} of snapshot {j}')
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
