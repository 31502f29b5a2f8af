"""Host offload: keeping the average in host memory between steps.

An offloaded average lives in the ``pinned_host`` memory of each device that
holds a shard of it (same mesh, same partition spec, only the memory kind
differs), so it costs no accelerator memory between steps. A step brings it
to the device, averages there, and puts the result back; under ``jit`` both
moves are ``device_put`` annotations XLA turns into DMA transfers.

Placement is read from the arrays themselves (their ``memory_space``), so any
state works: one built with ``offload=True``, or one restored from a
checkpoint into a host-placed target.
"""

from __future__ import annotations

from typing import Any

import jax
from optax import Params
HOST = jax.memory.Space.Host
DEVICE = jax.memory.Space.Device
HOST_KIND = 'pinned_host'


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


def to_host(tree: Params) -> Params:
  """Moves every array leaf of ``tree`` to pinned host memory (a new buffer)."""
  return jax.tree.map(
      lambda x: x if on_host(x) else jax.device_put(x, HOST), tree)


def to_device(tree: Params) -> Params:
  """Brings the host-resident leaves of ``tree`` to device memory."""
  return jax.tree.map(
      lambda x: jax.device_put(x, DEVICE) if on_host(x) else x, tree)


def place_like(tree: Params, placed: Params) -> Params:
  """Moves each leaf of ``tree`` to host memory where ``placed``'s leaf is."""
  return jax.tree.map(
      lambda x, old: jax.device_put(x, HOST)
      if on_host(old) and not on_host(x) else x, tree, placed)
