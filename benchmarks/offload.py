"""What host offload costs: one jitted EMA step with the average on the device
versus in pinned host memory (``emax.ema(..., offload=True)``).

    python benchmarks/offload.py [--sizes 1e6 16e6] [--repeats 20]

For each param count it times, per step (median over ``--repeats``):

* ``device``: ``tx.update`` with the average in device memory;
* ``offload``: the same with ``offload=True`` (the average goes device-ward
  and back inside the step);
* ``offload, every 4``: ``offload=True, update_every=4`` (the transfers
  still happen every step; only the arithmetic is skipped);
* ``round trip``: ``device_put`` of the average to the device and back to
  host, outside any step: the transfer cost on its own.

On CPU "device" and "pinned_host" are the same RAM, so the offload columns
measure a memcpy, not a bus. On a GPU expect the round trip to cost about
``2 * bytes / host-link bandwidth`` (e.g. 2 x 4 GB / ~50 GB/s = ~160 ms per
step for 1e9 float32 params over PCIe 5); nothing here was measured on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import emax


def _time(fn, repeats):
  out = fn()  # compile and warm up
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _params(n):
  # A few leaves of unequal size, like a small network's.
  sizes = [n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8]
  return {f'w{i}': jnp.full((s,), 0.5, jnp.float32)
          for i, s in enumerate(sizes)}


def _step_time(params, repeats, **kw):
  tx = emax.ema(0.999, **kw)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
  # Not donated: with jax 0.10.2 a donated host buffer can be paired with a
  # device output of the same shape (the updates) unless jit is given both
  # in_shardings and out_shardings; see the README's Scaling section.
  step = jax.jit(tx.update)
  state = [tx.init(params)]

  def run():
    _, state[0] = step(grads, state[0], params)
    return state[0]

  return _time(run, repeats)


def _round_trip_time(params, repeats):
  host = jax.device_put(params, jax.memory.Space.Host)

  def run():
    on_device = jax.device_put(host, jax.memory.Space.Device)
    return jax.device_put(on_device, jax.memory.Space.Host)

  return _time(run, repeats)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', type=float, nargs='+', default=[1e6, 16e6])
  parser.add_argument('--repeats', type=int, default=20)
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  print(f'jax {jax.__version__}, {device.platform} ({device.device_kind}),'
        f' memories: {[m.kind for m in device.addressable_memories()]}')
  print('| params | MB | device | offload | offload, every 4 | round trip |')
  print('|---:|---:|---:|---:|---:|---:|')
  rows = []
  for n in (int(s) for s in args.sizes):
    params = _params(n)
    row = {
        'params': n,
        'device_ms': 1e3 * _step_time(params, args.repeats),
        'offload_ms': 1e3 * _step_time(params, args.repeats, offload=True),
        'offload_every4_ms': 1e3 * _step_time(
            params, args.repeats, offload=True, update_every=4),
        'round_trip_ms': 1e3 * _round_trip_time(params, args.repeats),
    }
    rows.append(row)
    print(f'| {n:,} | {4 * n / 1e6:.0f} | {row["device_ms"]:.2f} ms |'
          f' {row["offload_ms"]:.2f} ms | {row["offload_every4_ms"]:.2f} ms |'
          f' {row["round_trip_ms"]:.2f} ms |')
  return rows


if __name__ == '__main__':
  main()
