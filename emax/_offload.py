"""Host offload: keeping the average in host memory between steps.

An offloaded average lives in the ``pinned_host`` memory of each device that
holds a shard of it (same mesh, same partition spec, only the memory kind
differs), so it costs no accelerator memory between steps. A step brings it
to the device, averages there, and puts the result back; under ``jit`` both
moves are ``device_put`` annotations XLA turns into DMA transfers.

``offload=True`` stores the float arrays of the average as an
:class:`OffloadedTree`: their bits, as unsigned integers of the same width, in
host memory. The reason is donation. ``jax.jit`` pairs a donated input with
an output by shape and dtype alone when its output shardings are not given
(jax 0.10), so a donated host buffer of float32 ``(n,)`` could be handed to a
device output of float32 ``(n,)`` (a param), and the process aborts ("memory
kind does not match"). No param is an unsigned integer of the average's
shape, so the host bits can only pair with their own new value.

Non-float leaves of the average (copies of int params) stay on the device:
they are never averaged and are small. Any state with plain host arrays (one
restored from a checkpoint into a host-placed target) works too: placement is
read from the arrays themselves.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from optax import Params

from emax import _node


HOST = jax.memory.Space.Host
DEVICE = jax.memory.Space.Device
HOST_KIND = 'pinned_host'

HINT = (
    'This average is offloaded to host memory (offload=True) and stored as'
    ' raw bits, so it cannot be indexed like the params. Read it with'
    ' emax.ema_params(state) (params dtypes; dtypes=\'accumulator\' for the'
    ' accumulator dtypes): it returns arrays on the device.')

_BITS = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


class _OffloadedFields(NamedTuple):
  leaves: tuple[Any, ...]


class OffloadedTree(_OffloadedFields):
  """An average kept in host memory (``offload=True``).

  A named tuple whose class carries the static part (see :mod:`emax._node`).

  Attributes:
    leaves: the leaves of the average in flattening order: float arrays as
      their bits (unsigned integers) in pinned host memory, others as they
      are, on the device.
    treedef: static, the structure of the average (plain or packed).
    dtypes: static, the dtype of each leaf before it was stored as bits.
  """

  __slots__ = ()

  def __new__(cls, leaves: tuple[Any, ...], treedef: Any = None,
              dtypes: tuple[Any, ...] | None = None) -> 'OffloadedTree':
    static = None if treedef is None else (treedef, tuple(dtypes or ()))
    return _node.new(cls, OffloadedTree, static, leaves)

  @property
  def treedef(self) -> Any:
    return type(self).static[0]  # type: ignore[attr-defined]

  @property
  def dtypes(self) -> tuple[Any, ...]:
    return type(self).static[1]  # type: ignore[attr-defined]

  def __reduce__(self) -> Any:
    return OffloadedTree, (self.leaves, self.treedef, self.dtypes)

  def __getitem__(self, key: Any) -> Any:
    raise TypeError(f'Cannot index an offloaded average with {key!r}. {HINT}')

  def __iter__(self) -> Any:
    raise TypeError(f'Cannot iterate over an offloaded average. {HINT}')


def on_host(x: Any) -> bool:
  """Whether array (or tracer) ``x`` lives in host memory."""
  if x is None:
    return False
  return getattr(jax.typeof(x), 'memory_space', DEVICE) == HOST


def memory_kinds(device: Any) -> list[str]:
  """The memory kinds of ``device`` (``'device'``, ``'pinned_host'``...)."""
  return [m.kind for m in device.addressable_memories()]


def check_supported(params: Params) -> None:
  """Raises a clear error when a device of ``params`` has no pinned host memory.

  Only concrete arrays are checked (under ``jit`` the compiler reports it).
  """
  for x in jax.tree.leaves(params):
    sharding = getattr(x, 'sharding', None)
    if sharding is None or isinstance(x, jax.core.Tracer):
      continue
    for device in sharding.device_set:
      kinds = memory_kinds(device)
      if HOST_KIND not in kinds:
        raise ValueError(
            f'offload=True needs {HOST_KIND!r} memory, but device {device}'
            f' has only {kinds}. Use offload=False on this platform.')
    return  # all leaves share a platform; one check is enough


def _offloadable(x: Any) -> bool:
  dtype = jnp.result_type(x)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize in _BITS


NO_GRADIENT = (
    'Cannot differentiate through an offloaded average (offload=True): it is'
    ' stored in host memory as raw bits, which carry no gradient, so the'
    ' derivative would silently be zero. Differentiate through an average'
    ' kept on the device (offload=False), or stop the gradient of the params'
    ' that reach the average (jax.lax.stop_gradient) where none is needed.')


@jax.custom_jvp
def _bits(x: jax.Array) -> jax.Array:
  """The bits of float array ``x`` as unsigned integers of its width."""
  return lax.bitcast_convert_type(x, _BITS[jnp.dtype(x.dtype).itemsize])


@functools.partial(_bits.defjvp, symbolic_zeros=True)
def _bits_jvp(primals: tuple[Any, ...],
              tangents: tuple[Any, ...]) -> tuple[Any, Any]:
  # Reached only when a derivative is taken through `x` (a tangent that is
  # not a symbolic zero): refuse, rather than returning a zero derivative.
  if not isinstance(tangents[0], jax.custom_derivatives.SymbolicZero):
    raise TypeError(NO_GRADIENT)
  out = _bits(*primals)
  return out, np.zeros(out.shape, jax.dtypes.float0)


def to_host(average: Params) -> OffloadedTree:
  """``average`` as an :class:`OffloadedTree` (float bits in host memory).

  Raises:
    TypeError: when differentiated through (the bits carry no gradient).
  """
  leaves, treedef = jax.tree.flatten(average)
  stored, dtypes = [], []
  for x in leaves:
    dtype = jnp.result_type(x)
    dtypes.append(dtype)
    if _offloadable(x):
      bits = _bits(x)
      x = bits if on_host(bits) else jax.device_put(bits, HOST)
    stored.append(x)
  return OffloadedTree(tuple(stored), treedef, tuple(dtypes))


def _on_device(x: Any) -> Any:
  return jax.device_put(x, DEVICE) if on_host(x) else x


def to_device(stored: Params) -> Params:
  """The average on the device, whatever memory ``stored`` is in."""
  if not isinstance(stored, OffloadedTree):
    return jax.tree.map(_on_device, stored)
  leaves = []
  for x, dtype in zip(stored.leaves, stored.dtypes):
    x = _on_device(x)
    if jnp.result_type(x) != dtype:
      x = lax.bitcast_convert_type(x, dtype)
    leaves.append(x)
  return stored.treedef.unflatten(leaves)


def place_like(average: Params, stored: Params) -> Params:
  """``average`` put where ``stored`` (the state's previous average) was."""
  if isinstance(stored, OffloadedTree):
    return to_host(average)
  return jax.tree.map(
      lambda x, old: jax.device_put(x, HOST)
      if on_host(old) and not on_host(x) else x, average, stored)
