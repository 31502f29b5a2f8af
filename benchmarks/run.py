"""emax benchmarks: EMA updates against peers and the memory-bandwidth limit.

An EMA update of a float32 param reads the param and the average and writes
the average: 12 bytes, nothing to compute. Its limit is memory bandwidth, so
every time here is also given as GB/s of that minimal traffic and as a
percentage of the bandwidth ceiling measured in the same run.

Run from the repository root::

  python -m benchmarks.run --quick      # a few minutes, shrunk trees
  python -m benchmarks.run --full       # the README table
  python -m benchmarks.run --smoke      # seconds, tiny trees (the tests)

Results go to ``--out`` (default ``benchmarks/results``) as ``<mode>.json`` and
``<mode>.md``. Works on CPU and GPU alike (times sync with
``block_until_ready``; torch runs on CPU only and is skipped without torch).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import threading
import time
from typing import Any, Callable

if __package__ in (None, ''):  # run as `python benchmarks/run.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import emax
from benchmarks import trees

DECAY = 0.999
JAX_KERNEL = [1.0]  # bytes/s of the jitted donated add, set by main()

MODES = {
    # name: (shrink factor for the big trees, leaves of the small-leaf tree,
    #        repetitions, ceiling vector length)
    'smoke': dict(shrink=4000.0, small_leaves=12, reps=2, ceiling=1 << 16,
                  mlp=(32, 64, 10), batches=(8,), max_leaves=12,
                  pause=0.0),
    'quick': dict(shrink=8.0, small_leaves=2000, reps=7, ceiling=25_000_000,
                  mlp=(784, 2048, 2048, 10), batches=(32, 256)),
    'full': dict(shrink=1.0, small_leaves=20000, reps=15,
                 ceiling=100_000_000, mlp=(784, 2048, 2048, 10),
                 batches=(32, 256)),
}


# ----------------------------------------------------------------- timing


def _block(x):
  return jax.block_until_ready(x)


def time_loop(step: Callable[[Any], Any], state: Any, reps: int,
              sync: Callable[[Any], Any] = _block):
  """Runs ``state = step(state)`` ``reps`` times after one warm-up call.

  Returns the final state and the list of times in seconds.
  """
  state = sync(step(state))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    state = sync(step(state))
    times.append(time.perf_counter() - t)
  return state, times


def stats(times: list[float], nbytes: float, ceiling: float) -> dict:
  med = float(np.median(times))
  return dict(median_ms=med * 1e3, min_ms=min(times) * 1e3,
              max_ms=max(times) * 1e3, gbps=nbytes / med / 1e9,
              pct_ceiling=100.0 * nbytes / med / ceiling,
              pct_jax_kernel=100.0 * nbytes / med / JAX_KERNEL[0])


def tree_bytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------- ceiling


def numpy_ceiling(n: int, reps: int, threads: int) -> float:
  """GB/s of ``a += b`` on ``n`` float32, split over ``threads`` threads."""
  a = np.ones(n, np.float32)
  b = np.ones(n, np.float32)
  bounds = np.linspace(0, n, threads + 1).astype(np.int64)

  def work(lo, hi):
    np.add(a[lo:hi], b[lo:hi], out=a[lo:hi])

  def step(_):
    ts = [threading.Thread(target=work, args=(bounds[i], bounds[i + 1]))
          for i in range(threads)]
    for t in ts:
      t.start()
    for t in ts:
      t.join()

  _, times = time_loop(step, None, reps, sync=lambda x: x)
  return 12 * n / float(np.median(times))


def jax_ceiling(n: int, reps: int) -> float:
  """GB/s of a jitted, donated in-place ``a + b`` on ``n`` float32."""
  rng = np.random.default_rng(0)
  b = jnp.asarray(rng.standard_normal(n, np.float32))  # an argument, not a
  add = jax.jit(lambda a, b: a + b, donate_argnums=0)  # foldable constant
  a = jnp.asarray(rng.standard_normal(n, np.float32))
  _, times = time_loop(lambda a: add(a, b), a, reps)
  return 12 * n / float(np.median(times))


# ------------------------------------------------------ update variants


def _compile(fn, *args, donate=(0,)):
  jitted = jax.jit(fn, donate_argnums=donate)
  t = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t


def _peak_units(compiled, unit: int) -> float | None:
  try:
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes + m.temp_size_in_bytes)
    return peak / unit
  except Exception:  # noqa: BLE001 (not every backend reports it)
    return None


def _fresh(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def jax_variants(params) -> dict[str, tuple[Callable, Callable, bool]]:
  """name -> (make_state(params), step(state, params) -> state, donate)."""
  d = jnp.float32(DECAY)
  one_minus = jnp.float32(1 - DECAY)

  def lerp_tree(avg, p):
    return jax.tree.map(
        lambda a, x: a - one_minus.astype(a.dtype) * (a - x.astype(a.dtype)),
        avg, p)

  def acc_copy(p):
    return jax.tree.map(
        lambda x: jnp.array(x, emax._tree.accumulator_dtype_for(x.dtype),
                            copy=True), p)

  opt_ema = optax.ema(DECAY)

  def optax_ema_step(s, p):
    upd, s = opt_ema.update(p, s)
    return (upd, s)

  return {
      'emax.update': (lambda p: emax.init(p),
                      lambda s, p: emax.update(s, p, d), True),
      'emax.update pack=True': (lambda p: emax.init(p, pack=True),
                                lambda s, p: emax.update(s, p, d), True),
      'tree.map lerp, donated': (acc_copy, lerp_tree, True),
      'tree.map lerp, not donated': (acc_copy, lerp_tree, False),
      'optax.incremental_update': (
          acc_copy,
          lambda s, p: optax.incremental_update(
              jax.tree.map(lambda x, a: x.astype(a.dtype), p, s), s,
              one_minus), True),
      'optax.ema on params': (
          lambda p: (jax.tree.map(jnp.zeros_like, acc_copy(p)),
                     opt_ema.init(acc_copy(p))),
          lambda s, p: optax_ema_step(s[1], acc_copy(p)), True),
  }


def _timer(step, state, sync=_block):
  """A warmed-up ``run(k) -> times`` that keeps ``state`` between calls."""
  holder = [sync(step(state))]

  def run(k):
    times = []
    for _ in range(k):
      t = time.perf_counter()
      holder[0] = sync(step(holder[0]))
      times.append(time.perf_counter() - t)
    return times

  return run, holder


def jax_entry(name, make_state, step, donate, params, unit):
  """Compiles one variant; returns its timer and compile/memory figures."""
  state = make_state(params)
  compiled, compile_s = _compile(lambda s, p: step(s, p), state, params,
                                 donate=(0,) if donate else ())
  run, holder = _timer(lambda s: compiled(s, params), state)
  return dict(impl=name, run=run, holder=holder, compile_s=compile_s,
              peak_units=_peak_units(compiled, unit),
              steady=lambda: (tree_bytes(params) + tree_bytes(holder[0]))
              / unit)


def torch_entry(np_params, threads):
  """``torch._foreach_lerp_`` over the leaves (CPU), or None without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.set_num_threads(threads)
  ps = [torch.from_numpy(np.ascontiguousarray(x.astype(np.float32)))
        for x in np_params.values()]
  avgs = [p.clone() for p in ps]
  # _foreach_lerp_ needs one dtype: bf16 params are timed as f32 (the row
  # says so).
  w = 1 - DECAY
  run, holder = _timer(lambda s: torch._foreach_lerp_(avgs, ps, w), None,
                       sync=lambda x: x)
  return dict(impl='torch._foreach_lerp_', run=run, holder=holder,
              compile_s=0.0, peak_units=None, steady=lambda: None)


# ----------------------------------------------------------------- cases


def cases(mode: dict) -> list[tuple[str, list, Any]]:
  f = mode['shrink']
  n_small = mode['small_leaves']
  vec = int(100_000_000 / f)
  cut = mode.get('max_leaves')  # smoke: few leaves, so it compiles fast
  return [(name, shapes[:cut], dtype) for name, shapes, dtype in [
      ('ResNet-50-like', trees.shrink(trees.resnet50(), f), np.float32),
      ('GPT-2-small-like', trees.shrink(trees.gpt2_small(), f), np.float32),
      ('transformer, 2k leaves', trees.shrink(trees.transformer_2k(), f),
       np.float32),
      (f'{n_small:,} leaves x 256', trees.small_leaves(n_small), np.float32),
      (f'one {vec / 1e6:g}M vector', trees.vector(vec), np.float32),
      ('ResNet-50-like, bf16 params', trees.shrink(trees.resnet50(), f),
       jnp.bfloat16),
  ]]


def bench_updates(mode, ceiling, reps, threads, skip, log):
  rows = []
  for case, shapes, dtype in cases(mode):
    np_params = trees.make(shapes, dtype)
    params = jax.tree.map(jnp.asarray, np_params)
    n = trees.size(shapes)
    unit = tree_bytes(params)
    pbytes = np.dtype(dtype).itemsize
    abytes = 4
    nbytes = n * (pbytes + 2 * abytes)
    log(f'\n{case}: {len(shapes)} leaves, {n / 1e6:.2f}M params,'
        f' {nbytes / 1e6:.0f} MB per update')
    entries = []
    for name, (make_state, step, donate) in jax_variants(params).items():
      if not any(s in name for s in skip.get(case, ())):
        entries.append(jax_entry(name, make_state, step, donate, params,
                                 unit))
    t = torch_entry(np_params, threads)
    if t is not None:
      if dtype != np.float32:
        t['impl'] += ' (f32 params)'
      entries.append(t)
    # Interleaved rounds in a shuffled order, so that no variant gains or
    # loses from its neighbours (torch's OpenMP threads spin for a while
    # after a call; hence also the pause between variants).
    rounds = 3
    times = {e['impl']: [] for e in entries}
    order = np.random.default_rng(0)
    for _ in range(rounds):
      for j in order.permutation(len(entries)):
        e = entries[j]
        times[e['impl']] += e['run'](max(1, -(-reps // rounds)))
        time.sleep(mode.get('pause', 0.3))
    for e in entries:
      r = stats(times[e['impl']], nbytes, ceiling)
      r.update(case=case, impl=e['impl'], leaves=len(shapes), params=n,
               compile_s=e['compile_s'], steady_units=e['steady'](),
               peak_units=e['peak_units'])
      rows.append(r)
      log(_fmt_row(r))
    del entries
    gc.collect()
    del params, np_params
    gc.collect()
  return rows


def _fmt_row(r):
  def f(x, fmt):
    return '-' if x is None else format(x, fmt)
  return (f"  {r['impl']:<32} {r['median_ms']:9.3f} ms"
          f" [{r['min_ms']:.3f}, {r['max_ms']:.3f}]"
          f" {r['gbps']:6.1f} GB/s {r['pct_ceiling']:5.0f}%"
          f"  compile {r['compile_s']:.2f} s"
          f"  mem {f(r['steady_units'], '.2f')}/{f(r['peak_units'], '.2f')}")


# ------------------------------------------------------------ train step


def mlp_params(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [dict(w=jnp.asarray(rng.standard_normal((a, b), np.float32)
                             / np.sqrt(a)),
               b=jnp.zeros(b, jnp.float32))
          for a, b in zip(sizes[:-1], sizes[1:])]


def _loss(params, x, y):
  h = x
  for i, layer in enumerate(params):
    h = h @ layer['w'] + layer['b']
    if i < len(params) - 1:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def bench_train_step(mode, ceiling, reps, log):
  """A jitted Adam step on an MLP with and without the EMA in the chain."""
  sizes = mode['mlp']
  params = mlp_params(sizes)
  n = sum(x.size for x in jax.tree.leaves(params))
  ideal_ms = 12 * n / ceiling * 1e3
  variants = {
      'adam': optax.adam(1e-3),
      'adam + emax.ema': optax.chain(optax.adam(1e-3), emax.ema(DECAY)),
      'adam + emax.ema(skip_nonfinite=False)': optax.chain(
          optax.adam(1e-3), emax.ema(DECAY, skip_nonfinite=False)),
      'adam + optax.incremental_update': None,
  }
  rows = []
  rng = np.random.default_rng(1)
  log(f'\ntrain step: MLP {sizes}, {n / 1e6:.2f}M params; 12 B/param at the'
      f' ceiling = {ideal_ms:.3f} ms')
  for batch in mode['batches']:
    x = jnp.asarray(rng.standard_normal((batch, sizes[0]), np.float32))
    y = jnp.asarray(rng.integers(0, sizes[-1], batch), jnp.int32)
    base = None
    for name, tx in variants.items():
      if tx is None:
        tx = optax.adam(1e-3)

        def step(carry, tx=tx):
          p, s, avg = carry
          g = jax.grad(_loss)(p, x, y)
          u, s = tx.update(g, s, p)
          p = optax.apply_updates(p, u)
          return p, s, optax.incremental_update(p, avg, 1 - DECAY)

        carry = (_fresh(params), tx.init(params), _fresh(params))
      else:
        def step(carry, tx=tx):
          p, s = carry
          g = jax.grad(_loss)(p, x, y)
          u, s = tx.update(g, s, p)
          return optax.apply_updates(p, u), s

        carry = (_fresh(params), tx.init(params))
      compiled, compile_s = _compile(step, carry)
      _, times = time_loop(compiled, carry, reps)
      med = float(np.median(times)) * 1e3
      r = dict(batch=batch, impl=name, median_ms=med, min_ms=min(times) * 1e3,
               max_ms=max(times) * 1e3, compile_s=compile_s, params=n,
               ideal_ema_ms=ideal_ms)
      if base is None:
        base = med
      else:
        r['added_ms'] = med - base
        r['added_vs_ideal'] = (med - base) / ideal_ms
      rows.append(r)
      extra = ('' if 'added_ms' not in r else
               f"  added {r['added_ms']:.3f} ms ="
               f" {r['added_vs_ideal']:.2f}x the ideal EMA time")
      log(f'  batch {batch:4d} {name:<40} {med:8.3f} ms{extra}')
  return rows


# ------------------------------------------------------- option costs


def bench_options(mode, ceiling, reps, log):
  """Cost of skip_nonfinite, debias and update_every in ``emax.ema``."""
  shapes = trees.shrink(trees.resnet50(), mode['shrink'])
  shapes = shapes[:mode.get('max_leaves')]
  params = jax.tree.map(jnp.asarray, trees.make(shapes, np.float32))
  n = trees.size(shapes)
  updates = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
  variants = {
      'skip_nonfinite=False': dict(skip_nonfinite=False),
      'skip_nonfinite=True (default)': dict(),
      'debias=True': dict(debias=True),
      'update_every=4': dict(update_every=4),
      'pack=True': dict(pack=True),
  }
  rows = []
  base = None
  log(f'\noptions: emax.ema on ResNet-50-like ({n / 1e6:.2f}M params),'
      ' standalone tx.update, donated state')
  for name, kw in variants.items():
    tx = emax.ema(DECAY, **kw)

    def step(s, u, p, tx=tx):  # params as arguments: no constant folding
      return tx.update(u, s, p)[1]

    state = tx.init(params)
    compiled, compile_s = _compile(step, state, updates, params)
    # update_every=4: time 4 consecutive steps, report the mean per step.
    k = kw.get('update_every', 1)

    def run(s, compiled=compiled, k=k):
      for _ in range(k):
        s = compiled(s, updates, params)
      return s

    _, times = time_loop(run, state, reps)
    times = [t / k for t in times]
    med = float(np.median(times)) * 1e3
    r = dict(impl=name, median_ms=med, min_ms=min(times) * 1e3,
             max_ms=max(times) * 1e3, compile_s=compile_s, params=n,
             gbps=16 * n / (med / 1e3) / 1e9)
    if base is None:
      base = med
    r['vs_skip_off_pct'] = 100.0 * (med - base) / base
    rows.append(r)
    log(f"  {name:<32} {med:8.3f} ms ({r['vs_skip_off_pct']:+.0f}%)")
  return rows


# --------------------------------------------------------------- report


def targets(update_rows, train_rows, option_rows):
  """The issue's targets, each with the measured value and a verdict."""
  out = []

  def get(case, impl):
    for r in update_rows:
      if r['case'] == case and r['impl'].startswith(impl):
        return r
    return None

  for case in ('ResNet-50-like', 'GPT-2-small-like'):
    best = max((r for r in update_rows if r['case'] == case
                and r['impl'].startswith('emax')),
               key=lambda r: r['pct_ceiling'], default=None)
    if best is None:
      continue
    out.append((f'{case}: emax >= 90% of ceiling',
                f"{best['impl']}: {best['pct_ceiling']:.0f}%",
                best['pct_ceiling'] >= 90))
    for peer in ('optax.incremental_update', 'torch._foreach_lerp_'):
      r = get(case, peer)
      if r is not None:
        out.append((f'{case}: faster than {peer}',
                    f"{best['median_ms']:.2f} vs {r['median_ms']:.2f} ms",
                    best['median_ms'] < r['median_ms']))
  small = [r for r in update_rows if 'leaves x 256' in r['case']]
  packed = [r for r in small if r['impl'] == 'emax.update pack=True']
  torch_r = [r for r in small if r['impl'].startswith('torch')]
  if packed:
    p = packed[0]
    out.append((f"{p['case']}: pack=True compiles in < 10 s",
                f"{p['compile_s']:.1f} s", p['compile_s'] < 10))
    if torch_r:
      ratio = torch_r[0]['median_ms'] / p['median_ms']
      out.append((f"{p['case']}: pack=True >= 5x faster than torch",
                  f'{ratio:.1f}x', ratio >= 5))
  for r in update_rows:
    if r['impl'] == 'emax.update' and r['peak_units'] is not None:
      out.append((f"{r['case']}: emax.update peak memory = 2 param trees"
                  ' (f32)' if 'bf16' not in r['case'] else
                  f"{r['case']}: emax.update peak = 1 + 2 (f32 average)",
                  f"{r['peak_units']:.3f}",
                  abs(r['peak_units'] - (3 if 'bf16' in r['case'] else 2))
                  < 0.02))
  for r in train_rows:
    if r['impl'] == 'adam + emax.ema(skip_nonfinite=False)' or (
        r['impl'] == 'adam + emax.ema'):
      out.append((f"train step batch {r['batch']}, {r['impl']}: added <="
                  ' 1.25x ideal', f"{r['added_vs_ideal']:.2f}x",
                  r['added_vs_ideal'] <= 1.25))
  for r in option_rows:
    if r['impl'].startswith('skip_nonfinite=True'):
      out.append(('skip_nonfinite costs <= 10% of an update',
                  f"{r['vs_skip_off_pct']:+.0f}%", r['vs_skip_off_pct'] <= 10))
  return out


def markdown(result) -> str:
  m = result['machine']
  lines = [
      f"Mode `{result['mode']}`; {m['cpu']} ({m['cores']} cores, "
      f"{m['threads']} threads), {m['backend']}, jax {m['jax']}; load"
      f" average {m['load_before']} before, {m['load_after']} after.",
      '',
      f"Ceiling: NumPy in-place add {result['ceiling']['numpy_gbps']:.1f}"
      f" GB/s, jitted donated add {result['ceiling']['jax_gbps']:.1f} GB/s;"
      f" '% ceiling' is of {result['ceiling']['gbps']:.1f} GB/s (the higher),"
      " '% jitted add' of the jitted add (what XLA reaches on this machine).",
      '',
      '| tree | implementation | median ms [min, max] | GB/s | % ceiling |'
      ' % jitted add | compile s | memory steady / peak (param trees) |',
      '|---|---|---|---|---|---|---|---|',
  ]
  for r in result['updates']:
    mem = ('-' if r['steady_units'] is None else
           f"{r['steady_units']:.2f} / {r['peak_units']:.2f}"
           if r['peak_units'] is not None else f"{r['steady_units']:.2f} / -")
    lines.append(
        f"| {r['case']} | {r['impl']} | {r['median_ms']:.2f} "
        f"[{r['min_ms']:.2f}, {r['max_ms']:.2f}] | {r['gbps']:.1f} |"
        f" {r['pct_ceiling']:.0f}% | {r['pct_jax_kernel']:.0f}% |"
        f" {r['compile_s']:.2f} | {mem} |")
  if result['train']:
    lines += ['', 'Train step (jitted Adam step, donated; "added" is the time'
              ' over plain Adam against 12 bytes/param at the ceiling):', '',
              '| batch | step | median ms [min, max] | added ms | added /'
              ' ideal |', '|---|---|---|---|---|']
    for r in result['train']:
      lines.append(
          f"| {r['batch']} | {r['impl']} | {r['median_ms']:.2f} "
          f"[{r['min_ms']:.2f}, {r['max_ms']:.2f}] | "
          f"{r.get('added_ms', 0):.2f} | "
          f"{r['added_vs_ideal']:.2f}x |" if 'added_ms' in r else
          f"| {r['batch']} | {r['impl']} | {r['median_ms']:.2f} "
          f"[{r['min_ms']:.2f}, {r['max_ms']:.2f}] | - | - |")
  if result['options']:
    lines += ['', 'Options (`emax.ema` standalone `tx.update`, ResNet-50-like;'
              ' % against `skip_nonfinite=False`):', '',
              '| option | median ms [min, max] | vs skip_nonfinite=False |',
              '|---|---|---|']
    for r in result['options']:
      lines.append(f"| {r['impl']} | {r['median_ms']:.2f} [{r['min_ms']:.2f},"
                   f" {r['max_ms']:.2f}] | {r['vs_skip_off_pct']:+.0f}% |")
  lines += ['', 'Targets:', '', '| target | measured | met |', '|---|---|---|']
  for name, value, ok in result['targets']:
    lines.append(f"| {name} | {value} | {'yes' if ok else 'NO'} |")
  return '\n'.join(lines) + '\n'


def machine(threads):
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  dev = jax.devices()[0]
  return dict(cpu=cpu, cores=os.cpu_count(), threads=threads,
              backend=f'{dev.platform} ({dev.device_kind})',
              jax=jax.__version__, python=sys.version.split()[0])


def _load():
  try:
    return ', '.join(f'{x:.2f}' for x in os.getloadavg())
  except OSError:
    return '?'


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  g = ap.add_mutually_exclusive_group()
  for m in MODES:
    g.add_argument(f'--{m}', dest='mode', action='store_const', const=m)
  ap.add_argument('--out', default=os.path.join('benchmarks', 'results'))
  ap.add_argument('--threads', type=int, default=os.cpu_count())
  ap.add_argument('--no-torch', action='store_true')
  ap.add_argument('--only', default='updates,train,options',
                  help='comma list of sections to run')
  args = ap.parse_args(argv)
  mode_name = args.mode or 'quick'
  mode = MODES[mode_name]
  reps = mode['reps']
  if args.no_torch:
    sys.modules['torch'] = None  # makes `import torch` fail: skipped
  log = lambda s: print(s, flush=True)  # noqa: E731
  info = machine(args.threads)
  info['load_before'] = _load()
  log(f'emax benchmarks, mode {mode_name}: {info}')
  numpy_gbps = numpy_ceiling(mode['ceiling'], reps, args.threads) / 1e9
  jax_gbps = jax_ceiling(mode['ceiling'], reps) / 1e9
  ceiling = max(numpy_gbps, jax_gbps) * 1e9
  JAX_KERNEL[0] = jax_gbps * 1e9
  log(f'ceiling: numpy {numpy_gbps:.1f} GB/s, jax {jax_gbps:.1f} GB/s')
  sections = set(args.only.split(','))
  # The 20k-leaf tree compiles for about a minute per jitted variant; two
  # variants that add nothing new there (the non-donated lerp and optax.ema)
  # are skipped to keep the run short. Listed in the JSON as 'skipped'.
  skip = {f"{mode['small_leaves']:,} leaves x 256":
          ('not donated', 'optax.ema')} if mode_name == 'full' else {}
  with jax.numpy_dtype_promotion('standard'):  # optax.ema, adam
    updates = (bench_updates(mode, ceiling, reps, args.threads, skip, log)
               if 'updates' in sections else [])
    train = (bench_train_step(mode, ceiling, reps, log)
             if 'train' in sections else [])
    options = (bench_options(mode, ceiling, reps, log)
               if 'options' in sections else [])
  info['load_after'] = _load()
  result = dict(mode=mode_name, machine=info,
                ceiling=dict(numpy_gbps=numpy_gbps, jax_gbps=jax_gbps,
                             gbps=ceiling / 1e9),
                updates=updates, train=train, options=options,
                skipped={k: list(v) for k, v in skip.items()})
  result['targets'] = targets(updates, train, options)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f'{mode_name}.json'), 'w') as f:
    json.dump(result, f, indent=1, default=str)
  md = markdown(result)
  with open(os.path.join(args.out, f'{mode_name}.md'), 'w') as f:
    f.write(md)
  log('\n' + md)
  return result


if __name__ == '__main__':
  main()
