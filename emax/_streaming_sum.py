"""Weighted sums of trees that arrive one at a time.

Checkpoint averaging (:func:`emax.checkpoint.average`) and post-hoc EMA
(:mod:`emax.posthoc`) read one tree at a time, add it, weighted, into a
running sum and drop it before reading the next: memory holds the sum and
one tree, whatever the number of trees. :func:`add` adds one leaf, on the
host (NumPy) or on the devices where it was restored; :class:`TreeSum` sums
whole trees in float64 on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

from emax import _tree


@functools.partial(jax.jit, donate_argnums=0)
def _add_on_device(total: jax.Array, x: jax.Array,
                   weight: jax.Array) -> jax.Array:
  return total + weight * x.astype(total.dtype)


@jax.jit
def _scale_on_device(x: jax.Array, weight: jax.Array) -> jax.Array:
  return weight * x.astype(weight.dtype)


def add(total: Any, x: Any, weight: float, dtype: Any) -> Any:
  """``total + weight * x``, computed in ``dtype``; ``total`` may be None.

  A ``jax.Array`` ``x`` is added where it is (``total``'s buffer is donated);
  anything else on the host, into ``total`` in place. ``x`` itself is never
  changed.
  """
  w = np.asarray(weight, dtype)
  if isinstance(x, jax.Array):
    if total is None:
      return _scale_on_device(x, w)
    return _add_on_device(total, x, w)
  term = np.array(x, dtype=dtype)  # a copy, whatever x's dtype
  term *= w
  if total is None:
    return term
  total += term
  return total


@functools.partial(jax.jit, donate_argnums=0)
def _divide_on_device(total: jax.Array, total_weight: jax.Array) -> jax.Array:
  return total / total_weight


def finish(total: Any, total_weight: float, dtype: Any) -> Any:
  """``total / total_weight`` rounded once more, to the params' ``dtype``."""
  divisor = np.asarray(total_weight, total.dtype)
  if isinstance(total, jax.Array):
    return _divide_on_device(total, divisor).astype(dtype)
  total /= divisor
  return total.astype(dtype, copy=False)


class TreeSum:
  """A running weighted sum of trees: float64 (complex128) NumPy leaves.

  Every tree added must have the first one's structure, shapes and dtypes.
  Non-float leaves are not summed: :meth:`result` gives those of the tree
  added with ``latest=True``.
  """

  def __init__(self) -> None:
    self.treedef: Any = None
    # (path, shape, dtype, sharding or None) per leaf
    self.specs: list[tuple[Any, tuple[int, ...], np.dtype,
                           Sharding | None]] = []
    self.totals: list[np.ndarray | None] = []
    self.latest: list[np.ndarray | None] = []  # non-float leaves

  def add(self, tree: Any, weight: float, latest: bool, where: str) -> None:
    """Adds ``weight * tree``; keeps non-float leaves if ``latest``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    arrays = [np.asarray(leaf) for _, leaf in flat]
    if self.treedef is None:
      self.treedef = treedef
      self.specs = [(path, a.shape, a.dtype,
                     leaf.sharding if isinstance(leaf, jax.Array) else None)
                    for (path, leaf), a in zip(flat, arrays)]
      self.totals = [None] * len(arrays)
      self.latest = [None] * len(arrays)
    elif treedef != self.treedef:
      raise ValueError(
          f'{where} has a different tree structure from the first snapshot:'
          f' {treedef} versus {self.treedef}. All snapshots must hold the'
          ' same tree (the same params, saved the same way).')
    for j, (a, spec) in enumerate(zip(arrays, self.specs)):
      path, shape, dtype, _ = spec
      if a.shape != shape or a.dtype != dtype:
        raise ValueError(
            f'{where}: leaf {jax.tree_util.keystr(path)} has shape {a.shape}'
            f' and dtype {a.dtype}, but shape {shape} and dtype {dtype} in the'
            ' first snapshot. All snapshots must hold leaves of the same'
            ' shapes and dtypes; cast them alike before reconstructing.')
      if not _tree.is_float(dtype):
        if latest:
          self.latest[j] = a
        continue
      wide = (np.complex128 if np.issubdtype(dtype, np.complexfloating)
              else np.float64)
      self.totals[j] = add(self.totals[j], a, weight, wide)

  def result(self, dtypes: Sequence[Any] | None = None) -> Any:
    """The sum, each float leaf rounded once to its snapshots' dtype.

    ``dtypes``: one per leaf, the dtype to round to instead (None: keep).
    A leaf that was a ``jax.Array`` in the first tree is put back on its
    sharding.
    """
    leaves = []
    if dtypes is None:
      dtypes = [None] * len(self.specs)
    for total, kept, (_, _, dtype, sharding), wanted in zip(
        self.totals, self.latest, self.specs, dtypes):
      if wanted is not None:
        dtype = wanted
      leaf = kept if total is None else total.astype(dtype)
      if sharding is not None:
        leaf = jax.device_put(leaf, sharding)
      leaves.append(leaf)
    return jax.tree_util.tree_unflatten(self.treedef, leaves)
