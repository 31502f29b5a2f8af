"""What the suite measures, section by section, and the run modes.

Each section builds the registered rows of :mod:`benchmarks.peers`, times
them together with the one timer of :mod:`benchmarks.timing`, and returns
plain rows (dicts) for :mod:`benchmarks.targets` and
:mod:`benchmarks.report`. A row that cannot run is recorded in ``skipped``
with its reason, and printed; a row that fails with an unexpected error is
recorded there too, with ``error: True`` (the smoke test fails on those), so
that one broken row never costs a long run its other tables.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import peers
from benchmarks import rows
from benchmarks import timing
from benchmarks import trees

# GPT-2 small's width with 6 of its 12 layers and a 16k vocabulary (55M
# params: seven routes, each with params, Adam's two moments and averages,
# are alive at once in the interleaved timer; 124M ran out of this machine's
# 23 GB), and ResNet-50 itself at 64x64 images.
SHARE_FULL = dict(transformer=dict(d=768, layers=6, vocab=16384, seq=32,
                                   batch=1),
                  convnet=dict(width=1.0, image=64, batch=2))
SHARE_FULL_ROUNDS = 21

# Sizes and repetitions per mode. `limits`: trees with at least that many
# leaves run only the listed rows (a per-leaf program over that many
# separate buffers compiles slowly; each row's compile seconds are in the
# report); the rest are listed as skipped.
_FEW_ON_MANY = (rows.EMAX_UPDATE_PACKED, rows.TORCH_LERP, rows.IDENTITY,
                rows.STACKED, rows.EMAX_UPDATE, rows.OPTAX_INCREMENTAL)
MODES = {
    # Seconds: every table and every registered row at least once, on tiny
    # trees (compiling dominates: the other trees run a few rows).
    'smoke': dict(shrink=4000.0, small_leaves=16, vector=1 << 16,
                  max_leaves=4, rounds=7, warmup=1, ceiling=1 << 16,
                  mlp=(8, 10), batches=(32,), cooldown_s=0.0,
                  min_sample_s=0.0, averages_k=(2,),
                  trees=(trees.RESNET50, trees.small_leaves_name(16),
                         trees.RESNET50_BF16),
                  rows={trees.RESNET50_BF16: (
                      rows.EMAX_UPDATE, rows.EMAX_UPDATE_UNGUARDED,
                      rows.OPTAX_INCREMENTAL, rows.TORCH_LERP,
                      rows.HAND_GUARDED, rows.EMA_TX,
                      rows.HAND_GUARDED_TX),
                        trees.small_leaves_name(16): _FEW_ON_MANY[:4]},
                  offload_sizes=(4096,), limits=(),
                  share=dict(transformer=dict(d=32, layers=1, vocab=64,
                                              seq=8, batch=2),
                             convnet=dict(width=1 / 16, image=16, batch=2,
                                          classes=10, blocks=(1, 1, 1, 1)))),
    'quick': dict(shrink=8.0, small_leaves=2000, vector=25_000_000,
                  rounds=9, warmup=2, ceiling=25_000_000,
                  mlp=(784, 2048, 2048, 10), batches=(32, 256),
                  cooldown_s=0.05, min_sample_s=0.0, averages_k=(1, 2, 4),
                  offload_sizes=(1_000_000, 16_000_000), limits=(),
                  share=dict(transformer=dict(d=256, layers=4, vocab=8192,
                                              seq=64, batch=2),
                             convnet=dict(width=0.25, image=32, batch=4))),
    'full': dict(shrink=1.0, small_leaves=20000, vector=100_000_000,
                 rounds=15, warmup=2, ceiling=100_000_000,
                 train_rounds=61,
                 mlp=(784, 2048, 2048, 10), batches=(32, 256),
                 cooldown_s=0.05, min_sample_s=0.0, averages_k=(1, 2, 4),
                 offload_sizes=(1_000_000, 16_000_000),
                 # CPU: scaled (see SHARE_FULL), a step in about a second.
                 share=SHARE_FULL, share_rounds=SHARE_FULL_ROUNDS,
                 # On 20,000 separate buffers: the packed route, the proof
                 # (an identity), the stacked route and torch only.
                 limits=((10_000, _FEW_ON_MANY[:4]),)),
    # One H100/H200-class GPU, sized for under 5 minutes (a target the
    # report checks): real tree sizes, a 2 GB vector, an MLP big enough that
    # the EMA's share of a step is measurable, samples of at least 2 ms
    # (launch and sync latency amortized). XLA:GPU compiles many-leaf
    # programs slowly: those trees run fewer rows.
    'gpu': dict(shrink=1.0, small_leaves=20000, vector=500_000_000,
                rounds=21, warmup=3, ceiling=500_000_000,
                mlp=(4096, 8192, 8192, 4096), batches=(32, 256),
                cooldown_s=0.0, min_sample_s=2e-3, averages_k=(1, 2, 4),
                offload_sizes=(100_000_000, 500_000_000),
                # GPT-2 small and ResNet-50 at their real sizes.
                share=dict(transformer=dict(d=768, layers=12, vocab=50257,
                                            seq=256, batch=8),
                           convnet=dict(width=1.0, image=224, batch=32)),
                limits=((1_000, _FEW_ON_MANY),
                        (10_000, _FEW_ON_MANY[:4]))),
}
SECTIONS = ('ceiling', 'updates', 'train', 'options', 'averages', 'offload',
            'share')


@dataclasses.dataclass
class Context:
  """What every section needs: the mode, the machine, where skips go."""
  mode: dict
  backend: str
  threads: int
  log: Callable[[str], None]
  ceiling_gbps: float = 0.0
  xla_add_gbps: float = 0.0
  skipped: list = dataclasses.field(default_factory=list)

  def skip(self, section, table, row, reason, error=False):
    self.skipped.append(dict(section=section, table=table, row=row,
                             reason=reason, error=error))
    self.log(f'  {"ERROR" if error else "skipped"}: {row}: {reason}')

  def build(self, section, table, impl, *args):
    """``impl.build(*args)``, or None with the reason recorded."""
    try:
      return impl.build(*args)
    except peers.Skip as e:
      self.skip(section, table, impl.name, str(e))
    except Exception as e:  # noqa: BLE001 (one broken row: keep the run)
      traceback.print_exc()
      self.skip(section, table, impl.name, f'{type(e).__name__}: {e}',
                error=True)
    return None

  def measure(self, runners, rounds=None):
    return timing.measure(runners, rounds or self.mode['rounds'],
                          warmup=self.mode['warmup'],
                          min_sample_s=self.mode['min_sample_s'])


def traffic(kind: str, n: int, pbytes: int, abytes: int, k: int = 1):
  """Minimal bytes moved by one step of a row of ``kind`` (None: none)."""
  return {'update': n * (pbytes + 2 * abytes),
          'transform': n * (2 * pbytes + 2 * abytes),
          'averages': n * (pbytes + 2 * k * abytes)}.get(kind)


def _free():
  gc.collect()


# ---------------------------------------------------------------- ceiling


def ceiling(ctx: Context) -> dict:
  """The bandwidth ceiling: 12 bytes per float32 of ``a += b``.

  A jitted, donated ``a + b`` (what XLA reaches on this backend) and, on
  CPU, NumPy's ``np.add(a, b, out=a)`` split over the threads.
  """
  n = int(ctx.mode['ceiling'])
  b = jnp.full(n, 0.5, jnp.float32)  # an argument, not a foldable constant
  add = jax.jit(lambda a, b: a + b, donate_argnums=0)
  holder = [jnp.zeros(n, jnp.float32)]

  def xla_step():
    holder[0] = add(holder[0], b)
    return holder[0]

  runners = [timing.Runner(rows.CEILING_XLA, xla_step)]
  if ctx.backend == 'cpu':
    na = np.ones(n, np.float32)
    nb = np.ones(n, np.float32)
    bounds = np.linspace(0, n, ctx.threads + 1).astype(np.int64)

    def work(lo, hi):
      np.add(na[lo:hi], nb[lo:hi], out=na[lo:hi])

    def np_step():
      ts = [threading.Thread(target=work, args=(bounds[i], bounds[i + 1]))
            for i in range(ctx.threads)]
      for t in ts:
        t.start()
      for t in ts:
        t.join()

    runners.append(timing.Runner(rows.CEILING_NUMPY, np_step,
                                 sync=lambda x: x))
  times = ctx.measure(runners)
  out = {name: 12 * n / float(np.median(t)) / 1e9
         for name, t in times.items()}
  ctx.xla_add_gbps = out[rows.CEILING_XLA]
  ctx.ceiling_gbps = max(out.values())
  ctx.log(f'ceiling: {out} GB/s on {n / 1e6:g}M float32')
  return dict(elements=n, gbps=ctx.ceiling_gbps, sources=out,
              xla_add_gbps=ctx.xla_add_gbps)


# ------------------------------------------------------- per-tree updates


def _tree(ctx, name, shapes, dtype, many_leaves=False):
  return trees.Tree.make(name, shapes, dtype, backend=ctx.backend,
                         threads=ctx.threads,
                         cooldown_s=ctx.mode['cooldown_s'],
                         many_leaves=many_leaves)


def _allowed(ctx, name, leaves):
  """The rows a tree runs in this mode (None: all), and why not the rest."""
  for tree, names in ctx.mode.get('rows', {}).items():
    if name == tree:
      return names, (f"--{ctx.mode['name']} times fewer rows on this tree"
                     ' (compile time)')
  allowed = None
  for threshold, names in ctx.mode['limits']:
    if leaves >= threshold:
      allowed = names
  return allowed, (f"not run on {leaves:,} leaves in --{ctx.mode['name']}"
                   ' (compile time); --quick runs it on fewer leaves')


def _row(ctx, runner, times, nbytes):
  r = dict(impl=runner.name, **timing.summary(times))
  r.update(runner.info)
  med_s = r['median_ms'] / 1e3
  r['bytes'] = nbytes
  if nbytes:
    r['gbps'] = nbytes / med_s / 1e9
    r['pct_ceiling'] = 100.0 * r['gbps'] / ctx.ceiling_gbps
    r['pct_xla_add'] = 100.0 * r['gbps'] / ctx.xla_add_gbps
  else:
    r['gbps'] = r['pct_ceiling'] = r['pct_xla_add'] = None
  return r


REFERENCES = {'update': rows.OPTAX_INCREMENTAL,
              'transform': rows.OPTAX_APPLY_INCREMENTAL}
# The NaN guard's semantics written by hand, per kind: the anchor of the
# guarded rows (`x hand-written`).
HAND_WRITTEN = {'update': rows.HAND_GUARDED,
                'transform': rows.HAND_GUARDED_TX}


def updates(ctx: Context) -> list[dict]:
  """One table per tree: every UPDATES row, timed together."""
  m = ctx.mode
  out = []
  for name, shapes, dtype in trees.cases(
      shrink=m['shrink'], small_leaves=m['small_leaves'],
      vector_size=m['vector'], max_leaves=m.get('max_leaves'),
      only=m.get('trees')):
    many = trees.is_small_leaves(name)
    tree = _tree(ctx, name, shapes, dtype, many_leaves=many)
    ctx.log(f'\n{name}: {len(shapes)} leaves, {tree.n / 1e6:.3f}M params,'
            f' {np.dtype(dtype).name}')
    allowed, why = _allowed(ctx, name, len(shapes))
    runners, kinds = [], {}
    for impl in peers.UPDATES:
      if not impl.where(tree):
        continue
      if allowed is not None and impl.name not in allowed:
        ctx.skip('updates', name, impl.name, why)
        continue
      r = ctx.build('updates', name, impl, tree)
      if r is not None:
        runners.append(r)
        kinds[r.name] = (impl.kind, impl.name)
    times = ctx.measure(runners)
    table_rows = []
    for r in runners:
      kind, row_id = kinds[r.name]
      row = _row(ctx, r, times[r.name],
                 traffic(kind, tree.n, tree.pbytes, tree.abytes))
      row.update(kind=kind, row=row_id)
      ref = REFERENCES.get(kind)
      if ref in times and ref != r.name:
        row['vs_ref'] = dict(ref=ref, **timing.paired_ratio(
            times[r.name], times[ref]))
      hand = HAND_WRITTEN.get(kind)
      if hand in times and hand != r.name:
        row['vs_hand'] = dict(ref=hand, **timing.paired_ratio(
            times[r.name], times[hand]))
      table_rows.append(row)
      ctx.log(_fmt(row))
    out.append(dict(case=name, leaves=len(shapes), params=tree.n,
                    dtype=np.dtype(dtype).name, rows=table_rows))
    del runners, tree, times
    _free()
  return out


def _fmt(r):
  gb = '-' if r.get('gbps') is None else f"{r['gbps']:7.2f} GB/s"
  vs = (f"  x{r['vs_ref']['median']:.3f} vs ref" if 'vs_ref' in r else '')
  if 'vs_hand' in r:
    vs += f"  x{r['vs_hand']['median']:.3f} vs hand"
  return (f"  {r['impl']:<44} {r['median_ms']:9.3f} ms"
          f" [{r['ci_ms'][0]:.3f}, {r['ci_ms'][1]:.3f}] {gb}"
          f"  compile {r.get('compile_s') or 0:.2f} s{vs}")


# ------------------------------------------------------------- train step


def train(ctx: Context) -> dict:
  """A jitted, donated Adam step with and without an EMA, per batch size.

  "added" is the median over rounds of (variant - adam) from the same round,
  with its 95% CI; inside the noise it is None, never negative.
  """
  sizes = ctx.mode['mlp']
  n = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
  ideal_ms = 12 * n / (ctx.ceiling_gbps * 1e9) * 1e3
  ctx.log(f'\ntrain step: MLP {sizes}, {n / 1e6:.2f}M params; 12 B/param at'
          f' the ceiling = {ideal_ms:.4f} ms')
  batches = []
  base_name = next(i.name for i in peers.TRAIN if i.extra.get('baseline'))
  for batch in ctx.mode['batches']:
    problem = trees.TrainProblem.make(sizes, batch)
    table = f'train step, batch {batch}'
    built = [(impl, ctx.build('train', table, impl, problem))
             for impl in peers.TRAIN]
    runners = [r for _, r in built if r is not None]
    bases = {r.name: impl.extra.get('base', base_name)
             for impl, r in built if r is not None}
    # An EMA adds a few percent to a step: more rounds to resolve it.
    times = ctx.measure(runners, ctx.mode.get('train_rounds'))
    table_rows = []
    for r in runners:
      row = dict(impl=r.name, **timing.summary(times[r.name]), **r.info)
      base = bases[r.name]
      if r.name != base and base in times and r.name != base_name:
        row['base'] = base
        added = timing.paired_diff(times[r.name], times[base])
        row['added'] = added
        row['added_vs_ideal'] = (None if not added['resolved'] else
                                 added['median_ms'] / ideal_ms)
        row['added_vs_ideal_ci'] = [c / ideal_ms for c in added['ci_ms']]
      table_rows.append(row)
      ctx.log(f"  batch {batch:4d} {r.name:<44} {row['median_ms']:8.3f} ms"
              + _fmt_added(row))
    batches.append(dict(batch=batch, rows=table_rows))
    del runners, times
    _free()
  return dict(mlp=list(sizes), params=n, ideal_ms=ideal_ms,
              baseline=base_name, batches=batches)


def _fmt_added(row):
  a = row.get('added')
  if a is None:
    return ''
  if not a['resolved']:
    return f"  added: noise (<= {a['ci_ms'][1]:.3f} ms)"
  return (f"  added {a['median_ms']:.3f} ms [{a['ci_ms'][0]:.3f},"
          f" {a['ci_ms'][1]:.3f}] = {row['added_vs_ideal']:.2f}x ideal")


# ---------------------------------------------------------------- options


def _resnet_tree(ctx):
  m = ctx.mode
  (name, shapes, dtype), = trees.cases(
      shrink=m['shrink'], small_leaves=1, vector_size=1,
      max_leaves=m.get('max_leaves'), only=(trees.RESNET50,))[:1]
  return _tree(ctx, name, shapes, dtype)


def options(ctx: Context) -> dict:
  """``emax.ema`` options, standalone ``tx.update`` on ResNet-50-like."""
  tree = _resnet_tree(ctx)
  ctx.log(f'\noptions: emax.ema, standalone tx.update, ResNet-50-like'
          f' ({tree.n / 1e6:.3f}M params)')
  runners = [r for r in (ctx.build('options', 'options', impl, tree)
                         for impl in peers.OPTIONS) if r is not None]
  base = next(i.name for i in peers.OPTIONS if i.extra.get('baseline'))
  times = ctx.measure(runners)
  table_rows = []
  for r in runners:
    row = _row(ctx, r, times[r.name],
               traffic('transform', tree.n, tree.pbytes, tree.abytes))
    if base in times and r.name != base:
      row['vs_baseline'] = timing.paired_ratio(times[r.name], times[base])
    table_rows.append(row)
    ctx.log(_fmt(row) + (f"  x{row['vs_baseline']['median']:.2f} vs {base}"
                         if 'vs_baseline' in row else ''))
  return dict(case=tree.name, params=tree.n, baseline=base, rows=table_rows)


# --------------------------------------------------------------- averages


def averages(ctx: Context) -> dict:
  """K averages of GPT-2-small-like: one named state vs K separate ones."""
  m = ctx.mode
  (name, shapes, dtype), = trees.cases(
      shrink=m['shrink'], small_leaves=1, vector_size=1,
      max_leaves=m.get('max_leaves'), only=(trees.GPT2_SMALL,))
  tree = _tree(ctx, name, shapes, dtype)
  ctx.log(f'\nK averages of {name} ({tree.n / 1e6:.3f}M params), pure'
          ' update form')
  out = []
  base = next(i.name for i in peers.AVERAGES if i.extra.get('baseline'))
  for k in m['averages_k']:
    table = f'K={k}'
    built = [(impl, ctx.build('averages', table, impl, tree, k))
             for impl in peers.AVERAGES]
    built = [(i, r) for i, r in built if r is not None]
    times = ctx.measure([r for _, r in built])
    nbytes = traffic('averages', tree.n, tree.pbytes, tree.abytes, k)
    roof_ms = nbytes / (ctx.ceiling_gbps * 1e9) * 1e3
    base_r = next((r for i, r in built if i.name == base), None)
    table_rows = []
    for impl, r in built:
      row = _row(ctx, r, times[r.name], nbytes)
      row.update(row=impl.name, k=k, roofline_ms=roof_ms,
                 vs_roofline=row['median_ms'] / roof_ms,
                 expected_units=1 + k)
      if base_r is not None and impl.name == rows.NAMED:
        row['vs_separate'] = timing.paired_ratio(times[r.name],
                                                 times[base_r.name])
      table_rows.append(row)
      ctx.log(_fmt(row) + f"  {row['vs_roofline']:.2f}x roofline")
    out.append(dict(k=k, roofline_ms=roof_ms, rows=table_rows))
    del built, times
    _free()
  return dict(case=name, params=tree.n, tables=out)


def run_section(ctx: Context, name: str, fn: Callable[[Context], Any]):
  """Runs one section; times it; an unexpected error skips the section."""
  t = time.perf_counter()
  try:
    result = fn(ctx)
  except Exception as e:  # noqa: BLE001 (keep the other sections)
    traceback.print_exc()
    ctx.skip(name, name, rows.WHOLE_SECTION, f'{type(e).__name__}: {e}',
             error=True)
    result = None
  return result, time.perf_counter() - t
