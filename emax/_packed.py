"""The packed layout: small float averages held in a few contiguous buffers.

An EMA step is pure memory traffic, but on a tree of many small leaves each
leaf costs a kernel launch (and, under ``jit``, compile time) that dwarfs its
bytes: 20,000 leaves of 256 floats take over 100 ms per step and about a
minute to compile as separate leaves. With ``pack=True`` the averages of small,
single-device float leaves live in one 1-D buffer per accumulator dtype (split
into chunks of at most :data:`CHUNK` elements), so a step is a handful of
kernels. The params stay the user's tree; each step gathers the small ones
into the buffers' order (one pass over small leaves only, never the big ones:
copying big params every step costs more than it saves).

The packed average is a :class:`PackedTree` in ``EmaState.ema``: a pytree of
the buffers and the unpacked leaves, with a static :class:`Layout` (the params'
tree structure and where each leaf lives). It checkpoints, scans and
``eval_shape``\\ s like any pytree; :func:`emax.ema_params` unpacks it.

Which leaves are packed depends on shapes, dtypes and the devices only, never
on values, so ``jax.eval_shape(tx.init, params)`` gives the same layout as the
real ``init`` (what a checkpoint restore needs). A leaf on more than one device
(sharded or replicated over a mesh) is never packed: its average keeps its own
``NamedSharding``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emax import _tree

PyTree = Any

MAX_SIZE = 1 << 15
"""Default largest leaf (in elements) that ``pack=True`` packs."""

CHUNK = 1 << 20
"""Largest packed buffer, in elements: bounds the per-step gather buffer."""


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """Where each leaf of the params lives in a :class:`PackedTree` (static).

  Attributes:
    treedef: the params' tree structure.
    shapes: the shape of every leaf, in flattening order.
    slots: per leaf, ``(-1, j)`` for the ``j``-th unpacked leaf, or
      ``(b, offset)`` for a leaf packed in buffer ``b`` at ``offset``.
    groups: per buffer, the indices of the leaves packed in it, in order.
    dtypes: per buffer, the dtype of the params packed in it (a buffer holds
      leaves of one param dtype and one accumulator dtype).
  """

  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  slots: tuple[tuple[int, int], ...]
  groups: tuple[tuple[int, ...], ...]
  dtypes: tuple[Any, ...]

  # A static pytree node is hashed and compared on every jitted call; with
  # 20,000 leaves that is milliseconds, so the hash is computed once and the
  # same object compares equal without looking inside.
  def _key(self):
    return (self.treedef, self.shapes, self.slots, self.groups, self.dtypes)

  def __hash__(self) -> int:
    h = self.__dict__.get('_hash')
    if h is None:
      h = hash(self._key())
      object.__setattr__(self, '_hash', h)
    return h

  def __eq__(self, other: Any) -> bool:
    if self is other:
      return True
    if not isinstance(other, Layout) or hash(self) != hash(other):
      return False
    return self._key() == other._key()

  def __repr__(self) -> str:
    packed = sum(len(g) for g in self.groups)
    return (f'Layout({packed} of {len(self.slots)} leaves packed in'
            f' {len(self.groups)} buffers)')


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedTree:
  """A tree of averages with its small float leaves packed (``pack=True``).

  Attributes:
    buffers: tuple of 1-D arrays, the packed averages.
    rest: tuple of the leaves that are not packed (big, sharded or non-float
      leaves), in flattening order.
    layout: static :class:`Layout`.
  """

  buffers: tuple[jax.Array, ...]
  rest: tuple[Any, ...]
  layout: Layout = dataclasses.field(metadata=dict(static=True))


def check_pack(pack: Any) -> int:
  """The largest leaf size to pack (0: no packing) for a ``pack`` option."""
  if pack is False or pack is None:
    return 0
  if pack is True:
    return MAX_SIZE
  if isinstance(pack, (int, np.integer)) and not isinstance(pack, bool) and (
      pack > 0):
    return int(pack)
  raise ValueError(
      'pack must be False, True or the largest leaf size (in elements, > 0)'
      f' to pack, got {pack!r} instead.')


def single_device(x: Any) -> bool:
  """Whether ``x`` sits on one device (so packing cannot lose a sharding)."""
  if isinstance(x, jax.core.Tracer):
    sharding = getattr(jax.typeof(x), 'sharding', None)
    mesh = getattr(sharding, 'mesh', None)
    return mesh is None or mesh.empty or mesh.size == 1
  sharding = getattr(x, 'sharding', None)
  return sharding is None or len(sharding.device_set) == 1


def make_layout(averages: PyTree, params: PyTree, max_size: int) -> Layout:
  """Plans which leaves to pack: float, single-device, ``size <= max_size``."""
  avg_leaves, treedef = jax.tree.flatten(averages)
  par_leaves = treedef.flatten_up_to(params)
  by_dtype: dict[Any, list[list[int]]] = {}
  used: dict[Any, int] = {}  # elements in the last chunk of each dtype
  slots: list[Any] = []
  n_rest = 0
  for i, (a, p) in enumerate(zip(avg_leaves, par_leaves)):
    size = int(np.prod(jnp.shape(a), dtype=np.int64))
    if (_tree.is_float(a) and size <= max_size and single_device(p)
        and single_device(a)):
      dtype = (jnp.dtype(jnp.result_type(p)), jnp.dtype(a.dtype))
      chunks = by_dtype.setdefault(dtype, [[]])
      if chunks[-1] and used.get(dtype, 0) + size > CHUNK:
        chunks.append([])
        used[dtype] = 0
      chunks[-1].append(i)
      used[dtype] = used.get(dtype, 0) + size
      slots.append(None)
    else:
      slots.append((-1, n_rest))
      n_rest += 1
  keyed = [(key[0], tuple(g)) for key, chunks in by_dtype.items()
           for g in chunks if g]
  groups = tuple(g for _, g in keyed)
  slots_out = list(slots)
  for b, group in enumerate(groups):
    offset = 0
    for i in group:
      slots_out[i] = (b, offset)
      offset += int(np.prod(avg_leaves[i].shape, dtype=np.int64))
  return Layout(treedef, tuple(tuple(jnp.shape(a)) for a in avg_leaves),
                tuple(slots_out), groups, tuple(d for d, _ in keyed))


def _ravel_as(x: Any, dtype: Any) -> jax.Array:
  return jnp.ravel(jnp.asarray(x)).astype(dtype)


def _gather(layout: Layout, leaves: list[Any], group: tuple[int, ...],
            dtype: Any) -> jax.Array:
  """The leaves of ``group``, raveled, cast and concatenated (one buffer)."""
  parts = [
      jnp.zeros(int(np.prod(layout.shapes[i])), dtype) if leaves[i] is None
      else _ravel_as(leaves[i], dtype) for i in group]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def pack(layout: Layout, tree: PyTree, dtypes: tuple[Any, ...]) -> PackedTree:
  """``tree`` (shaped like the params) in ``layout``; buffers in ``dtypes``.

  A leaf of ``tree`` may be ``None`` where the params have a leaf (an optax
  update for a frozen param); a packed one then counts as zeros.
  """
  leaves = layout.treedef.flatten_up_to(tree)
  buffers = [_gather(layout, leaves, group, dtype)
             for group, dtype in zip(layout.groups, dtypes)]
  rest = tuple(x for x, slot in zip(leaves, layout.slots) if slot[0] < 0)
  return PackedTree(tuple(buffers), rest, layout)


def like(average: PyTree, tree: PyTree) -> PyTree:
  """Params ``tree`` in the layout of ``average`` (a plain tree passes).

  The buffers hold the params in their own dtypes (a concatenation, exact);
  the average's step casts them as it does unpacked leaves.
  """
  if not isinstance(average, PackedTree) or isinstance(tree, PackedTree):
    return tree
  return pack(average.layout, tree, average.layout.dtypes)


def apply_updates(average: PyTree, params: PyTree, updates: PyTree,
                  leaf_fn: Any) -> PyTree:
  """``params + updates`` in the layout of ``average``.

  Unpacked leaves go through ``leaf_fn(p, u)``. A packed group adds in the
  dtype ``p + u`` promotes to (over the group) and rounds to the params'
  dtype, as ``optax.apply_updates`` does leaf by leaf, so the result is the
  same to the bit; it takes two gathers and one add per buffer instead of an
  add per leaf.
  """
  if not isinstance(average, PackedTree):
    return jax.tree.map(leaf_fn, params, updates, is_leaf=lambda x: x is None)
  layout = average.layout
  p_leaves = layout.treedef.flatten_up_to(params)
  u_leaves = layout.treedef.flatten_up_to(updates)
  buffers = []
  for group, pdtype in zip(layout.groups, layout.dtypes):
    udtype = jnp.dtype(pdtype)
    for i in group:
      if u_leaves[i] is not None:
        udtype = jnp.promote_types(udtype, jnp.result_type(u_leaves[i]))
    p_buf = _gather(layout, p_leaves, group, pdtype)
    u_buf = _gather(layout, u_leaves, group, udtype)
    buffers.append((p_buf.astype(udtype) + u_buf).astype(pdtype))
  rest = tuple(leaf_fn(p, u) for p, u, slot in
               zip(p_leaves, u_leaves, layout.slots) if slot[0] < 0)
  return PackedTree(tuple(buffers), rest, layout)


def pack_averages(averages: PyTree, params: PyTree, max_size: int) -> PyTree:
  """Packs a fresh tree of averages (from ``init``) if ``max_size > 0``."""
  if not max_size:
    return averages
  layout = make_layout(averages, params, max_size)
  if not layout.groups:
    return averages  # nothing small enough: the plain tree is the same thing
  leaves = jax.tree.leaves(averages)
  dtypes = tuple(jnp.dtype(leaves[g[0]].dtype) for g in layout.groups)
  return pack(layout, averages, dtypes)


def unpack(average: PyTree) -> PyTree:
  """A tree shaped like the params from ``average`` (plain trees pass)."""
  if not isinstance(average, PackedTree):
    return average
  layout = average.layout
  out = []
  for shape, (b, at) in zip(layout.shapes, layout.slots):
    if b < 0:
      out.append(average.rest[at])
    else:
      size = int(np.prod(shape, dtype=np.int64))
      out.append(average.buffers[b][at:at + size].reshape(shape))
  return layout.treedef.unflatten(out)


def shapes_of(average: PyTree) -> PyTree:
  """A params-shaped tree (arrays or ``ShapeDtypeStruct``) for checks only."""
  if not isinstance(average, PackedTree):
    return average
  layout = average.layout
  out = []
  for shape, (b, at) in zip(layout.shapes, layout.slots):
    out.append(average.rest[at] if b < 0 else
               jax.ShapeDtypeStruct(shape, average.buffers[b].dtype))
  return layout.treedef.unflatten(out)
