"""Layouts: how the averages of a params tree are stored.

A layout is a private detail behind one small interface, used by the step
(:mod:`emax._step`) and the readers (:mod:`emax._read`) alike:

* :func:`build` stores a fresh copy of the params in a layout;
* :func:`param_shapes` gives back the shapes of the params it was built from;
* :func:`gather` arranges the new params (``params + updates``) like it;
* :func:`map_leaves` runs one elementwise function over every stored float
  array and its new values (non-float leaves take the new value);
* :func:`read` gives back one average as a tree shaped like the params.

Two layouts exist. The *plain* layout is a tree like the params. The *packed*
layout (``pack=True``) is a :class:`PackedTree`: the averages of small,
single-device float leaves live in one 1-D buffer per dtype (split into chunks
of at most :data:`CHUNK` elements), so a step over thousands of small leaves
is a handful of kernels instead of one per leaf. A leaf on more than one
device (sharded or replicated over a mesh) is never packed: its average keeps
its own sharding.

Either layout can hold ``K`` named averages: each stored float array then has
a leading axis of length ``K``, so one elementwise pass reads each param once
and writes all ``K`` averages (XLA does not fuse ``K`` separate loops that
share an input). Which leaves are packed depends on shapes, dtypes and
devices only, never on values, so ``jax.eval_shape`` of ``init`` gives the
same layout as the real one (what a checkpoint restore needs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from optax import Params

from emax import _node
from emax import _tree

CHUNK = 1 << 20
"""Largest packed buffer, in elements: bounds the per-step gather buffer."""

PACKED_HINT = (
    'This average is stored packed (pack=True): small leaves share a few'
    ' contiguous buffers, so it cannot be indexed like the params. Read it'
    ' with emax.ema_params(state) (params dtypes; dtypes=\'accumulator\' for the'
    ' accumulator dtypes): it returns a tree shaped like the params.')


def _size(shape: Sequence[int]) -> int:
  return math.prod(shape)


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """Where each leaf of the params lives in a :class:`PackedTree` (static).

  Attributes:
    treedef: the params' tree structure.
    shapes: the shape of every param leaf, in flattening order.
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
  def _key(self) -> tuple[Any, ...]:
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

  def unpacked(self, *trees: Any) -> list[tuple[Any, ...]]:
    """For each leaf left out of the pack, in flattening order, its leaves
    of ``trees`` (each shaped like the params, ``None`` leaves kept)."""
    columns = [self.treedef.flatten_up_to(t) for t in trees]
    return [leaves for leaves, slot in zip(zip(*columns), self.slots)
            if slot[0] < 0]

  def __repr__(self) -> str:
    packed = sum(len(g) for g in self.groups)
    return (f'Layout({packed} of {len(self.slots)} leaves packed in'
            f' {len(self.groups)} buffers)')


class _PackedFields(NamedTuple):
  buffers: tuple[jax.Array, ...]
  rest: tuple[Any, ...]


class PackedTree(_PackedFields):
  """Averages with their small float leaves packed (``pack=True``).

  Not a tree shaped like the params: read it with :func:`emax.ema_params`.
  A named tuple whose class carries the layout (see :mod:`emax._node`).

  Attributes:
    buffers: tuple of 1-D arrays (2-D, ``(K, n)``, for named averages).
    rest: tuple of the leaves that are not packed (big, sharded or non-float
      leaves), in flattening order.
    layout: static :class:`Layout`.
  """

  __slots__ = ()

  def __new__(cls, buffers: tuple[jax.Array, ...], rest: tuple[Any, ...],
              layout: Layout | None = None) -> 'PackedTree':
    return _node.new(cls, PackedTree, layout, buffers, rest)

  @property
  def layout(self) -> Layout:
    return type(self).static  # type: ignore[attr-defined]

  def __reduce__(self) -> Any:
    return PackedTree, (self.buffers, self.rest, self.layout)

  def __getitem__(self, key: Any) -> Any:
    raise TypeError(f'Cannot index a packed average with {key!r}. '
                    f'{PACKED_HINT}')

  def __iter__(self) -> Any:
    raise TypeError(f'Cannot iterate over a packed average. {PACKED_HINT}')


def _single_device(x: Any) -> bool:
  """Whether ``x`` sits on one device (so packing cannot lose a sharding)."""
  if isinstance(x, jax.core.Tracer):
    sharding = getattr(jax.typeof(x), 'sharding', None)
    mesh = getattr(sharding, 'mesh', None)
    return mesh is None or mesh.empty or mesh.size == 1
  sharding = getattr(x, 'sharding', None)
  return sharding is None or len(sharding.device_set) == 1


def _plan(params: Params, max_size: int, acc: Callable[[Any], Any]) -> Layout:
  """Which leaves to pack: float, single-device, ``size <= max_size``."""
  leaves, treedef = jax.tree.flatten(params)
  by_dtype: dict[Any, list[list[int]]] = {}
  used: dict[Any, int] = {}  # elements in the last chunk of each dtype
  slots: list[Any] = []
  n_rest = 0
  for i, p in enumerate(leaves):
    size = _size(jnp.shape(p))
    if _tree.is_float(p) and size <= max_size and _single_device(p):
      key = (p.dtype, acc(p.dtype))
      chunks = by_dtype.setdefault(key, [[]])
      if chunks[-1] and used.get(key, 0) + size > CHUNK:
        chunks.append([])
        used[key] = 0
      chunks[-1].append(i)
      used[key] = used.get(key, 0) + size
      slots.append(None)
    else:
      slots.append((-1, n_rest))
      n_rest += 1
  keyed = [(key[0], tuple(g)) for key, chunks in by_dtype.items()
           for g in chunks if g]
  groups = tuple(g for _, g in keyed)
  for b, group in enumerate(groups):
    offset = 0
    for i in group:
      slots[i] = (b, offset)
      offset += _size(jnp.shape(leaves[i]))
  return Layout(treedef, tuple(tuple(jnp.shape(p)) for p in leaves),
                tuple(slots), groups, tuple(d for d, _ in keyed))


def _ravel_as(x: Any, dtype: Any) -> jax.Array:
  """``x`` flat, in ``dtype`` (no operation where none is needed: with
  thousands of leaves, tracing no-op casts took seconds)."""
  x = _tree.raveled(jnp.asarray(x))
  return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def _concat(layout: Layout, leaves: list[Any], group: tuple[int, ...],
            dtype: Any) -> jax.Array:
  """The leaves of ``group``, raveled, cast and concatenated (one buffer).

  A ``None`` leaf (an optax update for a frozen param) counts as zeros.
  """
  parts = [jnp.zeros(_size(layout.shapes[i]), dtype) if leaves[i] is None
           else _ravel_as(leaves[i], dtype) for i in group]
  return _tree.concat_raveled(parts)


def _stored(p: Any, dtype: Any, count: int | None) -> jax.Array:
  """A fresh stored copy of ``p`` in ``dtype``, stacked ``count`` times."""
  if count is None:
    return _tree.copy_leaf(p, dtype)
  p = jnp.asarray(p).astype(dtype)
  return jnp.broadcast_to(p[None], (count,) + p.shape)


def build(params: Params, acc: Callable[[Any], Any], *,
          count: int | None = None, max_pack: int = 0) -> Params:
  """A fresh copy of ``params`` in a layout (never an alias of them).

  Args:
    params: a tree of arrays.
    acc: maps a param dtype to its accumulator dtype.
    count: ``None`` for one average, else the number ``K`` of named averages
      (float leaves get a leading axis of length ``K``).
    max_pack: pack float leaves of at most this many elements (0: plain).
  """
  def stored(p: Any) -> Any:
    if not _tree.is_float(p):
      return _tree.copy_leaf(p)
    return _stored(p, acc(jnp.result_type(p)), count)

  if max_pack:
    params = _tree.unwrap_variables(params)
    layout = _plan(params, max_pack, acc)
    if layout.groups:
      leaves = layout.treedef.flatten_up_to(params)
      buffers = []
      for group, dtype in zip(layout.groups, layout.dtypes):
        flat = _concat(layout, leaves, group, dtype)
        buffers.append(_stored(flat, acc(dtype), count))
      rest = tuple(stored(x) for (x,) in layout.unpacked(params))
      return PackedTree(tuple(buffers), rest, layout)
  return jax.tree.map(stored, params)


def param_shapes(storage: Params, count: int | None) -> Params:
  """A tree shaped like the params (``ShapeDtypeStruct`` leaves), for checks."""
  def unstacked(x: Any) -> Any:
    shape = jnp.shape(x)
    if count is not None and _tree.is_float(x):
      shape = shape[1:]
    return jax.ShapeDtypeStruct(shape, jnp.result_type(x))

  if not isinstance(storage, PackedTree):
    return jax.tree.map(unstacked, storage)
  layout = storage.layout
  out = []
  for shape, (b, at) in zip(layout.shapes, layout.slots):
    out.append(unstacked(storage.rest[at]) if b < 0 else
               jax.ShapeDtypeStruct(shape, storage.buffers[b].dtype))
  return layout.treedef.unflatten(out)


def gather(storage: Params, params: Params,
           updates: Params | None = None) -> Params:
  """The new params, ``params + updates``, arranged like ``storage``.

  Without ``updates``, ``params`` themselves. Values come in the params'
  dtypes: ``p + u`` is computed as ``optax.apply_updates`` does (for a packed
  group, in the dtype ``p + u`` promotes to over the group, then rounded to
  the params' dtype: the same values, one add per buffer). Stored averages are
  not stacked here: one value per param element.
  """
  is_none = lambda x: x is None  # noqa: E731
  if not isinstance(storage, PackedTree):
    if updates is None:
      return params
    return jax.tree.map(_tree.apply_update, params, updates, is_leaf=is_none)
  layout = storage.layout
  p_leaves = layout.treedef.flatten_up_to(params)
  u_leaves = (layout.treedef.flatten_up_to(updates) if updates is not None
              else [None] * len(p_leaves))
  buffers = []
  for group, pdtype in zip(layout.groups, layout.dtypes):
    p_buf = _concat(layout, p_leaves, group, pdtype)
    present = [u_leaves[i] for i in group if u_leaves[i] is not None]
    if present:
      udtype = jnp.dtype(pdtype)
      for u in present:
        udtype = _tree.promote(udtype, jnp.result_type(u))
      u_buf = _concat(layout, u_leaves, group, udtype)
      p_buf = (p_buf.astype(udtype) + u_buf).astype(pdtype)
    # One buffer, written once: left to itself XLA fuses the concatenation
    # of thousands of leaves into each consumer (the average and the NaN
    # guard's sum), and compiling that took minutes for 20,000 leaves.
    buffers.append(lax.optimization_barrier(p_buf))
  rest = tuple(p for (p,) in layout.unpacked(params)) if updates is None else (
      tuple(_tree.apply_update(p, u)
            for p, u in layout.unpacked(params, updates)))
  return PackedTree(tuple(buffers), rest, layout)


def float_values(values: Params) -> list[jax.Array]:
  """The float arrays of gathered ``values`` (what the NaN guard checks)."""
  if isinstance(values, PackedTree):
    leaves = list(values.buffers) + list(values.rest)
  else:
    leaves = jax.tree.leaves(values)
  return [jnp.asarray(x) for x in leaves if _tree.is_float(x)]


def map_leaves(fn: Callable[[jax.Array, jax.Array], jax.Array],
               storage: Params, values: Params) -> Params:
  """``fn(stored, value)`` on every stored float array; others take ``value``.

  ``values`` come from :func:`gather` on the same storage.
  """
  def leaf(a: Any, v: Any) -> Any:
    if not _tree.is_float(a):
      return _tree.copy_leaf(v)
    return fn(a, jnp.asarray(v))

  if not isinstance(storage, PackedTree):
    return jax.tree.map(leaf, storage, values)
  buffers = tuple(fn(a, v) for a, v in zip(storage.buffers, values.buffers))
  rest = tuple(leaf(a, v) for a, v in zip(storage.rest, values.rest))
  return PackedTree(buffers, rest, storage.layout)


def read(storage: Params, index: int | None = None) -> Params:
  """One average as a tree shaped like the params (accumulator dtypes).

  Args:
    storage: the stored averages.
    index: which of ``K`` named averages, or ``None`` for a single one.
  """
  def take(x: Any) -> Any:
    if index is None or not _tree.is_float(x):
      return x
    return x[index]

  if not isinstance(storage, PackedTree):
    return jax.tree.map(take, storage)
  layout = storage.layout
  out = []
  for shape, (b, at) in zip(layout.shapes, layout.slots):
    if b < 0:
      out.append(take(storage.rest[at]))
    else:
      buf = take(storage.buffers[b])
      out.append(buf[at:at + _size(shape)].reshape(shape))
  return layout.treedef.unflatten(out)
