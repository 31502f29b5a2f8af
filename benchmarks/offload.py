"""What host offload costs: the offload section of the suite.

For each param count (a few leaves of unequal size, like a small network's),
timed together with the suite's one timer, per step:

* ``device``: ``emax.ema`` ``tx.update`` with the average in device memory;
* ``offload``: the same with ``offload=True`` (the average goes device-ward
  and back inside the step);
* ``offload, update_every=4``: the transfers still happen every step; only
  the arithmetic is skipped on three steps of four;
* ``round trip``: ``device_put`` of the average to the device and back to
  pinned host memory, outside any step: the transfer cost on its own.

On CPU "device" and "pinned_host" are the same RAM, so the offload rows
measure a memcpy, not a bus. On a GPU expect the round trip to cost about
``2 * bytes / host-link bandwidth`` (e.g. 2 x 4 GB / ~50 GB/s = ~160 ms per
step for 1e9 float32 params over PCIe 5).

The steps are not donated: a donated pinned-host buffer can be paired with
a device output of the same shape unless ``jit`` is given both shardings
(see the docs' scaling page).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import emax
from benchmarks import peers
from benchmarks import rows
from benchmarks import timing
from benchmarks import trees


def _params(n):
  sizes = [n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8]
  return {f'w{i}': jnp.full((s,), 0.5, jnp.float32)
          for i, s in enumerate(sizes)}


def _step_runner(name, params, **kw):
  tx = emax.ema(peers.DECAY, **kw)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
  return peers.jax_runner(name, lambda s, g, p: tx.update(g, s, p)[1],
                          tx.init(params), grads, params,
                          unit=trees.tree_bytes(params), donate=False)


def _round_trip_runner(params):
  host = jax.device_put(params, jax.memory.Space.Host)

  def step():
    on_device = jax.device_put(host, jax.memory.Space.Device)
    return jax.device_put(on_device, jax.memory.Space.Host)

  return timing.Runner(rows.ROUND_TRIP, step, info=dict(compile_s=0.0))


def offload(ctx) -> dict:
  """The offload table: one block of rows per param count."""
  device = jax.devices()[0]
  kinds = [m.kind for m in device.addressable_memories()]
  out = dict(device=f'{device.platform} ({device.device_kind})',
             memories=kinds, sizes=[])
  if 'pinned_host' not in kinds:
    ctx.skip('offload', 'offload', rows.WHOLE_SECTION,
             f'{device.platform} has no pinned_host memory (has {kinds})')
    return out
  ctx.log(f'\noffload: {out["device"]}, memories {kinds}')
  for n in ctx.mode['offload_sizes']:
    n = int(n)
    params = _params(n)
    table = f'offload, {n:,} params'
    builders = [
        (rows.ON_DEVICE, lambda p=params: _step_runner(rows.ON_DEVICE, p)),
        (rows.OFFLOAD, lambda p=params: _step_runner(rows.OFFLOAD, p,
                                                     offload=True)),
        (rows.OFFLOAD_UPDATE_EVERY, lambda p=params: _step_runner(
            rows.OFFLOAD_UPDATE_EVERY, p, offload=True, update_every=4)),
        (rows.ROUND_TRIP, lambda p=params: _round_trip_runner(p)),
    ]
    runners = []
    for name, build in builders:
      r = ctx.build('offload', table, peers.Impl(name, build))
      if r is not None:
        runners.append(r)
    times = ctx.measure(runners)
    table_rows = []
    nbytes = 4 * n
    for r in runners:
      row = dict(impl=r.name, **timing.summary(times[r.name]),
                 compile_s=r.info.get('compile_s'))
      if r.name == rows.ROUND_TRIP:
        row['transfer_gbps'] = 2 * nbytes / (row['median_ms'] / 1e3) / 1e9
      if rows.ON_DEVICE in times and r.name != rows.ON_DEVICE:
        row['added'] = timing.paired_diff(times[r.name],
                                          times[rows.ON_DEVICE])
      table_rows.append(row)
      ctx.log(f"  {n:>12,} {r.name:<40} {row['median_ms']:9.3f} ms")
    out['sizes'].append(dict(params=n, mbytes=nbytes / 1e6, rows=table_rows))
    del runners, times, params, builders
  return out
