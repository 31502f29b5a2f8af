"""Weighted sums of trees that arrive one at a time.

Checkpoint averaging (:func:`emax.checkpoint.average`) and post-hoc EMA
(:mod:`emax.posthoc`) read one tree at a time, add it, weighted, into a
running sum and drop it before reading the next: memory holds the sum and
one tree, whatever the number of trees. :func:`add` adds one leaf, on the
host (NumPy) or on the devices where it was restored; :class:`TreeSum` sums
whole trees, in float64 on the host or, given target shardings
(:func:`leaf_shardings`), on the devices shard by shard, so that no host or
device holds a whole unsharded tree.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh
from jax.sharding import NamedSharding
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


def leaf_shardings(sharding: Any, treedef: Any, what: str = 'the result',
                   leaves: Sequence[tuple[str, tuple[int, ...], Any]]
                   | None = None) -> list[Sharding | None]:
  """One target sharding per leaf of ``treedef`` (None: host memory).

  ``sharding`` is None, one ``jax.sharding.Sharding`` for every leaf, or a
  tree shaped like ``treedef`` whose leaves are shardings or anything that
  has one (``jax.Array``, ``jax.ShapeDtypeStruct`` with a sharding): the
  params themselves, or :func:`emax.checkpoint.abstract_state` of them, say
  where each leaf goes. Where ``treedef`` has None (a leaf outside an
  average's mask), the tree may hold anything.

  ``leaves``: ``(name, shape, dtype or None)`` per leaf; each sharding is
  checked to fit its leaf's shape, and a 64-bit leaf (float64, int64,
  complex128) to have ``jax_enable_x64`` on (without it, devices hold it in
  32 bits).

  Raises:
    ValueError: if the tree is not shaped like ``treedef``, or a sharding
      cannot hold its leaf (a spec longer than its rank, or a dimension its
      mesh axes do not divide), or a 64-bit leaf would go on devices with
      ``jax_enable_x64`` off.
    TypeError: if a leaf is neither a sharding nor has one, or its sharding
      is over an ``AbstractMesh`` (as ``jax.eval_shape`` gives).
  """
  if sharding is None:
    return [None] * treedef.num_leaves
  if isinstance(sharding, Sharding):
    entries = [sharding] * treedef.num_leaves
  else:
    # None in the result is a leaf here: the params hold an array there.
    full = jax.tree.unflatten(treedef, [True] * treedef.num_leaves)
    positions: Any = jax.tree.structure(full,
                                        is_leaf=lambda x: x is None)
    try:
      entries = positions.flatten_up_to(sharding)
    except (ValueError, TypeError) as e:
      raise ValueError(
          'sharding must be None, a jax.sharding.Sharding, or a tree of them'
          ' (or of jax.Arrays or jax.ShapeDtypeStructs that have one) shaped'
          f' like {what} ({treedef}): {e}') from e
    entries = [e for e, kept in zip(
        entries, jax.tree.leaves(full, is_leaf=lambda x: x is None)) if kept]
  shardings: list[Sharding | None] = []
  for leaf in entries:
    s = leaf if isinstance(leaf, Sharding) else getattr(leaf, 'sharding', None)
    if not isinstance(s, Sharding):
      raise TypeError(
          'sharding must hold jax.sharding.Sharding leaves (or jax.Arrays or'
          f' jax.ShapeDtypeStructs with a sharding), got {leaf!r}. Build one'
          ' with jax.sharding.NamedSharding(mesh, PartitionSpec(...)).')
    if isinstance(s, NamedSharding) and isinstance(s.mesh, AbstractMesh):
      raise TypeError(
          f'sharding holds {s}, over an AbstractMesh (jax.eval_shape gives'
          ' those), which says no devices to read onto. Pass the params'
          ' themselves, emax.checkpoint.abstract_state(params), or'
          ' NamedSharding(mesh, spec) with a concrete jax.sharding.Mesh.')
    shardings.append(s)
  for (name, shape, dtype), target in zip(leaves or (), shardings):
    if (target is not None and dtype is not None
        and jax.dtypes.canonicalize_dtype(dtype).itemsize
        < np.dtype(dtype).itemsize):
      raise ValueError(
          f'{name} is {np.dtype(dtype)}, which devices hold in 32 bits while'
          ' jax_enable_x64 is off. Call jax.config.update("jax_enable_x64",'
          ' True) first (JAX_ENABLE_X64=1 for the command line), or read on'
          ' the host with its dtype kept (floats summed in float64):'
          ' sharding=None (no --mesh).')
    try:
      if isinstance(target, NamedSharding) and len(target.spec) > len(shape):
        raise ValueError(f'its spec {target.spec} has more dimensions')
      if target is not None:
        target.shard_shape(tuple(shape))
    except ValueError as e:
      raise ValueError(
          f'The sharding {target} cannot hold {name} (shape {tuple(shape)}):'
          f' {e}.'
          ' Give that leaf a spec of at most its rank whose mesh axes divide'
          ' its dimensions (PartitionSpec() replicates it).') from None
  return shardings


def device_sum_dtype(dtype: Any) -> np.dtype:
  """The dtype of a sum on devices: float32 (complex64), or float64
  (complex128) when ``jax_enable_x64`` is on."""
  wide = bool(jax.config.read('jax_enable_x64'))
  if np.issubdtype(dtype, np.complexfloating):
    return np.dtype(np.complex128 if wide else np.complex64)
  return np.dtype(np.float64 if wide else np.float32)


class TreeSum:
  """A running weighted sum of trees, leaf by leaf.

  Without ``sharding``: float64 (complex128) NumPy leaves on the host, and a
  leaf that was a ``jax.Array`` in the first tree goes back to its sharding
  in :meth:`result`. With ``sharding`` (see :func:`leaf_shardings`, shaped
  like the trees added): every leaf is put on its target sharding (a no-op
  for one restored there) and summed on the devices, shard by shard, in
  :func:`device_sum_dtype`.

  Every tree added must have the first one's structure, shapes and dtypes.
  Non-float leaves are not summed: :meth:`result` gives those of the tree
  added with ``latest=True``.
  """

  def __init__(self, sharding: Any = None) -> None:
    self.sharding = sharding
    self.treedef: Any = None
    # (path, shape, dtype, sharding or None) per leaf
    self.specs: list[tuple[Any, tuple[int, ...], np.dtype,
                           Sharding | None]] = []
    self.totals: list[Any] = []  # NumPy, or jax.Arrays with a sharding
    self.latest: list[Any] = []  # non-float leaves

  def add(self, tree: Any, weight: float, latest: bool, where: str) -> None:
    """Adds ``weight * tree``; keeps non-float leaves if ``latest``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if self.treedef is None:
      targets = leaf_shardings(
          self.sharding, treedef, 'the snapshots',
          [(jax.tree_util.keystr(path), np.shape(leaf),
            getattr(leaf, 'dtype', None)) for path, leaf in flat])
    else:
      targets = [spec[3] for spec in self.specs]
    if self.sharding is None:
      arrays = [np.asarray(leaf) for _, leaf in flat]
    else:  # each leaf where it belongs; never through the host
      arrays = [jax.device_put(leaf, s) for (_, leaf), s in zip(flat, targets)]
    if self.treedef is None:
      self.treedef = treedef
      self.specs = [(path, a.shape, np.dtype(a.dtype),
                     s if self.sharding is not None else
                     leaf.sharding if isinstance(leaf, jax.Array) else None)
                    for (path, leaf), a, s in zip(flat, arrays, targets)]
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
      if self.sharding is not None:
        wide = device_sum_dtype(dtype)
      else:
        wide = np.dtype(np.complex128 if np.issubdtype(
            dtype, np.complexfloating) else np.float64)
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
