"""The performance targets, read off one run's results.

Each target row says what is wanted, what was measured (with its 95% CI)
and a status:

* ``yes``: the measured value clears the threshold;
* ``NO``: it does not;
* ``noise``: the quantity the target is about cannot be told from zero in
  this run (an "added" time whose CI reaches 0): no verdict, and never a
  "yes";
* ``skipped``: not measured in this run; the row says why.

Ratios of two implementations are medians of per-round ratios (the two were
timed in the same rounds, see :mod:`benchmarks.timing`).
"""

from __future__ import annotations

from benchmarks import rows
from benchmarks import timing
from benchmarks import trees

_NOT_RUN = 'the tree is not in this run (see the run\'s --tree and mode)'


def _target(target, status, measured='', value=None, threshold=None, note='',
            above=False):
  """One row. ``above``: a proof row, met when the value is *above* the
  threshold (a floor that already exceeds a target)."""
  return dict(target=target, status=status, measured=measured, value=value,
              threshold=threshold, note=note, above=above)


def _floor_verdict(value, threshold):
  return 'yes' if value > threshold else 'NO'


def _verdict(value, threshold):
  return 'yes' if value <= threshold else 'NO'


def _ratio_text(r):
  return f"{r['median']:.3f}x [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"


def _skip_reason(result, row_prefix, table=None):
  for s in result.get('skipped', []):
    if s['row'].startswith(row_prefix) and (table is None
                                            or s['table'] == table):
      return s['reason']
  return 'not measured in this run'


def _get(table, name):
  """The row registered as ``name`` (its printed name may say more)."""
  return next((r for r in table if r.get('row', r['impl']) == name), None)


def _paired(a, b):
  return timing.paired_ratio(a['samples_ms'], b['samples_ms'])


_GUARDED_TREES = (trees.RESNET50, trees.GPT2_SMALL, trees.RESNET50_BF16,
                  trees.LLAMA_BF16)
# (row, its hand-written anchor, what the target calls it)
_GUARDED_ROWS = ((rows.EMA_TX, rows.HAND_GUARDED_TX,
                  '`emax.ema(d)` default standalone tx.update'),
                 (rows.EMAX_UPDATE, rows.HAND_GUARDED,
                  '`emax.update` default'))


def guard(result):
  """The NaN guard against the same semantics written by hand (standalone),
  and in a train step against the guard off."""
  out = []
  by_case = {t['case']: t for t in result.get('updates') or []}
  for case in _GUARDED_TREES:
    for row, hand, what in _GUARDED_ROWS:
      name = (f'{case}: {what} <= 1.10x the hand-written guard'
              ' (`all(isfinite)`, `where(ok, incremental_update)`'
              + (', `apply_updates` first)' if hand == rows.HAND_GUARDED_TX
                 else ')'))
      tree = by_case.get(case)
      if tree is None:
        out.append(_target(name, 'skipped', note=_NOT_RUN))
        continue
      mine, ref = _get(tree['rows'], row), _get(tree['rows'], hand)
      if mine is None or ref is None:
        out.append(_target(name, 'skipped', note=_skip_reason(
            result, row if mine is None else hand, tree['case'])))
        continue
      r = _paired(mine, ref)
      out.append(_target(
          name, _verdict(r['median'], 1.10),
          f"{_ratio_text(r)} ({mine['median_ms']:.3f} vs"
          f" {ref['median_ms']:.3f} ms)", r['median'], 1.10))
  train = result.get('train')
  if not train:
    out.append(_target('train step: default `emax.ema` adds <= 1.05x what'
                       ' `skip_nonfinite=False` adds, and <= 1.25x the ideal',
                       'skipped', note='the train section did not run'))
  for b in (train or {}).get('batches', []):
    dflt = _get(b['rows'], rows.ADAM_EMA)
    off = _get(b['rows'], rows.ADAM_EMA_UNGUARDED)
    name = (f"train step, batch {b['batch']}: default `emax.ema` adds <="
            ' 1.05x what `skip_nonfinite=False` adds')
    name2 = (f"train step, batch {b['batch']}: default `emax.ema` adds <="
             ' 1.25x the 12 bytes/param ideal')
    if dflt is None or off is None:
      out.append(_target(name, 'skipped', note='a train-step row is missing'))
      out.append(_target(name2, 'skipped',
                         note='a train-step row is missing'))
      continue
    r = _paired(dflt, off)
    out.append(_target(
        f"train step, batch {b['batch']}: the step with default `emax.ema`"
        ' <= 1.05x the step with `skip_nonfinite=False`',
        _verdict(r['median'], 1.05), _ratio_text(r), r['median'], 1.05))
    da, do = dflt['added'], off['added']
    text = f'default {_added_text(da)}; guard off {_added_text(do)}'
    if not (da['resolved'] and do['resolved']):
      out.append(_target(name, 'noise', text, note='an added time is inside'
                         ' the noise: no verdict'))
    else:
      v = da['median_ms'] / do['median_ms']
      out.append(_target(name, _verdict(v, 1.05), f'{v:.2f}x ({text})', v,
                         1.05))
    if not da['resolved']:
      out.append(_target(name2, 'noise', f'added {_added_text(da)}; ideal'
                         f" {train['ideal_ms']:.4f} ms",
                         note='the added time is inside the noise'))
    else:
      v = dflt['added_vs_ideal']
      ci = dflt['added_vs_ideal_ci']
      out.append(_target(name2, _verdict(v, 1.25),
                         f'{v:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}] (added'
                         f" {_added_text(da)}, ideal"
                         f" {train['ideal_ms']:.4f} ms)", v, 1.25))
  for b in (train or {}).get('batches', []):
    out.append(_finite_route(b))
  if train:
    floor = (12 + 4) / 12
    out.append(_target(
        'train step: proof (traffic): an exact guard reads the new params'
        ' once more, so it moves at least (12 + 4) / 12 of the bytes of the'
        ' guard-off EMA and of the ideal, > 1.05x and > 1.25x',
        _floor_verdict(floor, 1.25), f'{floor:.3f}x', floor, 1.25,
        above=True))
  return out


def _finite_route(batch):
  """The route that meets the NaN guard target in a train step: with
  ``optax.clip_by_global_norm`` in the chain, ``finite=`` from its norm."""
  name = (f"train step, batch {batch['batch']}, route: with"
          ' `clip_by_global_norm`, `finite=` from its norm adds <= 1.05x what'
          ' `skip_nonfinite=False` adds (sound when the params going in were'
          ' finite: docs/scaling.md)')
  route = _get(batch['rows'], rows.CLIP_ADAM_EMA_FINITE)
  off = _get(batch['rows'], rows.CLIP_ADAM_EMA_UNGUARDED)
  if route is None or off is None or 'added' not in route or (
      'added' not in off):
    return _target(name, 'skipped', note='a clip row is missing')
  dr, do = route['added'], off['added']  # each minus `clip + adam`
  text = f'finite= {_added_text(dr)}; guard off {_added_text(do)}'
  if not (dr['resolved'] and do['resolved']):
    return _target(name, 'noise', text, note='an added time is inside the'
                   ' noise: no verdict')
  v = dr['median_ms'] / do['median_ms']
  return _target(name, _verdict(v, 1.05), f'{v:.2f}x ({text})', v, 1.05)


def _added_text(a):
  if not a['resolved']:
    return f"noise (<= {a['ci_ms'][1]:.3f} ms)"
  return f"{a['median_ms']:.3f} ms [{a['ci_ms'][0]:.3f}, {a['ci_ms'][1]:.3f}]"


def small_leaves(result):
  """Many small leaves: against torch, compile time, the per-buffer floor."""
  out = []
  small = [t for t in result.get('updates') or []
           if trees.is_small_leaves(t['case'])]
  if not small:
    return [_target('small leaves: emax vs torch, compile time, the'
                    ' per-buffer floor, the stacked route', 'skipped',
                    note=_NOT_RUN)]
  for tree in small:
    case, table = tree['case'], tree['rows']
    torch_row = _get(table, rows.TORCH_LERP)
    emax_rows = [r for r in table if r['impl'].startswith('emax.')
                 and r.get('kind') == 'update']  # torch's work, no more
    best = min(emax_rows, key=lambda r: r['median_ms'], default=None)
    packed = _get(table, rows.EMAX_UPDATE_PACKED)
    ident = _get(table, rows.IDENTITY)
    stacked = _get(table, rows.STACKED)
    name = f'{case}: fastest emax row at least as fast as torch'
    if best is None or torch_row is None:
      out.append(_target(name, 'skipped', note=_skip_reason(
          result, rows.TORCH_LERP if torch_row is None else 'emax', case)))
    else:
      r = _paired(best, torch_row)
      out.append(_target(name, _verdict(r['median'], 1.0),
                         f"{best['impl']}: {_ratio_text(r)} of torch"
                         f" ({best['median_ms']:.2f} vs"
                         f" {torch_row['median_ms']:.2f} ms)",
                         r['median'], 1.0))
    name = f'{case}: `pack=True` compiles in < 10 s'
    if packed is None:
      out.append(_target(name, 'skipped', note=_skip_reason(
          result, rows.EMAX_UPDATE_PACKED, case)))
    else:
      out.append(_target(name, _verdict(packed['compile_s'], 10.0),
                         f"{packed['compile_s']:.2f} s", packed['compile_s'],
                         10.0))
    name = (f'{case}: proof: a jitted identity over the {tree["leaves"]:,}'
            ' buffers is itself slower than torch (XLA\'s per-buffer floor)')
    if ident is None or torch_row is None:
      out.append(_target(name, 'skipped', note=_skip_reason(
          result, rows.TORCH_LERP if torch_row is None else rows.IDENTITY,
          case)))
    else:
      r = _paired(torch_row, ident)  # <= 1: the floor alone is slower
      out.append(_target(name, _verdict(r['median'], 1.0),
                         f"torch / identity {_ratio_text(r)}: identity"
                         f" {ident['median_ms']:.3f} ms (compile"
                         f" {ident['compile_s']:.1f} s), torch"
                         f" {torch_row['median_ms']:.3f} ms", r['median'],
                         1.0))
    name = (f'{case}: the stacked route (one array) at least as fast as'
            ' torch')
    if stacked is None or torch_row is None:
      out.append(_target(name, 'skipped', note=_skip_reason(
          result, rows.TORCH_LERP if torch_row is None else rows.STACKED,
          case)))
    else:
      r = _paired(stacked, torch_row)
      out.append(_target(name, _verdict(r['median'], 1.0),
                         f"{_ratio_text(r)} ({stacked['median_ms']:.3f} vs"
                         f" {torch_row['median_ms']:.2f} ms)", r['median'],
                         1.0))
  return out


def averages(result):
  """K named averages against the roofline and K separate averages."""
  section = result.get('averages')
  if not section:
    return [_target('K averages', 'skipped',
                    note=_skip_reason(result, rows.WHOLE_SECTION, 'averages'))]
  out = []
  for t in section['tables']:
    k = t['k']
    named = _get(t['rows'], rows.NAMED)
    unguarded = _get(t['rows'], rows.NAMED_UNGUARDED)
    sep = _get(t['rows'], rows.SEPARATE)
    names = [f'K={k}: named averages <= 1.1x the (4 + 8K) bytes/param'
             ' roofline',
             f'K={k}: named averages faster than K separate averages',
             f'K={k}: named averages hold 1 + K param trees (steady and peak)']
    if named is None:
      reason = _skip_reason(result, rows.NAMED, f'K={k}')
      out += [_target(n, 'skipped', note=reason) for n in names]
      continue
    v = named['vs_roofline']
    out.append(_target(names[0], _verdict(v, 1.1),
                       f"{v:.2f}x ({named['median_ms']:.3f} vs"
                       f" {t['roofline_ms']:.3f} ms)", v, 1.1))
    floor = (8 + 8 * k) / (4 + 8 * k)  # the guard reads the params again
    out.append(_target(
        f'K={k}: proof (traffic): with the guard (one more read of the'
        ' params) a step moves (8 + 8K) / (4 + 8K) of the roofline\'s bytes,'
        ' > 1.1x',
        _floor_verdict(floor, 1.1), f'{floor:.3f}x', floor, 1.1,
        above=True))
    if unguarded is not None:
      v = unguarded['vs_roofline']
      out.append(_target(
          f'K={k}: the layout alone (`skip_nonfinite=False`) <= 1.1x the'
          ' (4 + 8K) roofline', _verdict(v, 1.1),
          f"{v:.2f}x ({unguarded['median_ms']:.3f} vs"
          f" {t['roofline_ms']:.3f} ms)", v, 1.1))
    if sep is None:
      out.append(_target(names[1], 'skipped', note='no K-separate row'))
    else:
      r = _paired(named, sep)
      out.append(_target(names[1], 'yes' if r['median'] < 1 else 'NO',
                         _ratio_text(r), r['median'], 1.0))
    peak, steady = named.get('peak_units'), named.get('steady_units')
    if peak is None:
      out.append(_target(names[2], 'skipped',
                         note='the backend reports no memory analysis'))
    else:
      worst = max(peak, steady)
      out.append(_target(names[2], _verdict(worst, (1 + k) * 1.02),
                         f'steady {steady:.3f}, peak {peak:.3f} (want'
                         f' {1 + k})', worst, 1 + k))
  return out


def bare_update(result):
  """``emax.update``'s arithmetic at the lerp's speed.

  The row without the NaN guard: the guard (on by default) reads the params
  once more, which :func:`guard` measures.
  """
  out = []
  large = [t for t in result.get('updates') or []
           if not trees.is_small_leaves(t['case'])]
  if not large:
    return [_target('every large tree: `emax.update skip_nonfinite=False`'
                    ' <= 1.05x'
                    ' `optax.incremental_update` (donated)', 'skipped',
                    note='the updates section did not run on a large tree')]
  row = rows.EMAX_UPDATE_UNGUARDED
  for tree in large:
    name = (f"{tree['case']}: `{row}` <= 1.05x"
            ' `optax.incremental_update` (donated)')
    mine = _get(tree['rows'], row)
    if mine is None or 'vs_ref' not in mine:
      out.append(_target(name, 'skipped', note=_skip_reason(
          result, row if mine is None else rows.OPTAX_INCREMENTAL,
          tree['case'])))
      continue
    r = mine['vs_ref']
    out.append(_target(name, _verdict(r['median'], 1.05),
                       f"{_ratio_text(r)}", r['median'], 1.05))
  return out


def gpu_suite(result):
  """The GPU suite runs in under 5 minutes (gpu mode only)."""
  if not result.get('gpu'):
    return []
  return [_target('`--gpu` runs in under 5 minutes',
                  _verdict(result['wall_s'], 300.0),
                  f"{result['wall_s']:.0f} s on {result['machine']['backend']}",
                  result['wall_s'], 300.0)]


GROUPS = (('the NaN guard for free', guard),
          ('small leaves', small_leaves),
          ('K averages', averages),
          ('GPU-ready suite', gpu_suite),
          ('the bare update at the lerp\'s speed', bare_update))


def targets(result) -> list[dict]:
  """Every target row, each with its group and a status."""
  out = []
  for group, fn in GROUPS:
    for t in fn(result):
      out.append(dict(group=group, **t))
  return out
