"""Writing one run's results: the docs page and its plot, or JSON too.

With ``--docs`` the page and the plot are ``docs/performance.md`` and
``docs/performance.png``: the only results kept in the repository,
generated, never edited by hand. With ``--out DIR``, ``DIR/<mode>.json``
holds everything (every sample, in round order) and ``DIR/<mode>.md`` and
``DIR/<mode>.png`` are the same page and plot.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

DOCS_DIR = pathlib.Path(__file__).resolve().parents[1] / 'docs'

_MEANING = """\
Every number on this page comes from one run of the suite on one machine
(above). An EMA step of a float32 param reads the param and the average and
writes the average: 12 bytes and nothing to compute, so its limit is memory
bandwidth. Each time is therefore also given as GB/s of that minimal traffic
(16 bytes when the step also reads the updates, as `tx.update` does) and as
a percentage of the ceiling, the faster of a jitted donated `a + b` and (on
CPU) NumPy's in-place add, measured in the same run.

How the times are taken: every implementation of a table is compiled and
warmed up, then all of them run in rounds, each once per round in a fresh
random order, so that machine drift hits all alike. A cell shows the median
over rounds and, in brackets, a 95% confidence interval of that median.
Comparisons (`x optax`, `x hand`, `x K separate`, "added", a share) are
taken pair by pair within a round, then summarized the same way. An "added"
time (a train step with the EMA minus plain Adam) whose interval reaches
zero is shown as
*noise*, never as a negative time, and never meets a target. A target is met
(`yes`) only when the measured value clears its threshold; `NO` when it does
not; `noise` when the run cannot tell; `skipped` with the reason when a row
could not run (a peer not installed, a feature not in this emax).

The ceiling is a lower bound on what this machine moves: kernels that
stream many arrays at once (K averages, several leaves in flight) can
exceed it, and then show more than 100% of it or less than 1.00x of their
roofline. Such a row meets its target, but says less than one close to 1.

Memory is in param trees: what XLA plans for one donated step (arguments +
outputs - donated + temporaries) over the bytes of the params; 2.00 means
the params and one average, nothing more.
"""

_FLOOR = """\
**Why the NaN guard and K averages targets carry proof rows.** The NaN
guard keeps the whole average unchanged when any new param is NaN or Inf,
and the average is updated in place (its buffer is donated). So every new
param must be read before the first average is written: the check cannot
share the averaging pass, whatever its formulation. It could only ride
along with the pass that *produces* the new params (the optimizer's
`apply_updates`, as one multi-output fusion), and XLA CPU does not fuse a
reduction into an elementwise pass (`tests/test_hlo.py` pins the separate
pass, and that in a train step the check reads the user's own new params,
with no copy). So an exact guard adds at least one read of the new params:

- in a standalone `tx.update`, a read of `p` and `u` (it must compute
  `p + u` itself): what the same check written by hand reads too, the
  anchor of that target (`x hand`). (A float sum of `p + u` is not such a
  read on XLA CPU: its sum kernel takes only arrays in memory, so `p + u`
  was written out first. emax checks with a boolean reduction of each
  array cut into 8 slices laid side by side, which reads `p` and `u` in its
  own vectorized loop and writes one flag per 8 elements.) The read-only pass over `p` and `u` is timed as its own row;
- in a train step (where XLA shares `p + u` with the user's new params) and
  for K averages, 4 bytes per param more than the guard-off step: a floor in
  bytes, which is one in time as long as a read-only pass is not several
  times faster per byte than the averaging pass.

Where a floor is above a target, no exact guard on this backend can meet
it. The routes that do meet it skip the pass: a `finite=` flag the step
already has (for example from the loss or the gradient norm), or
`skip_nonfinite=False` (the rows without the guard).
"""

_RERUN = """\
```bash
python -m benchmarks.run --smoke          # seconds: tiny trees (the tests run this)
python -m benchmarks.run --quick          # minutes: trees shrunk 8x, 2,000 small leaves
python -m benchmarks.run --full           # the full run; rewrites this page and its plot
python -m benchmarks.run --gpu --docs     # the same tables on one GPU (sized for < 5 minutes)
```

This page and its plot are the only results kept in the repository.
`--out DIR` also writes `DIR/<mode>.json` (every sample), `<mode>.md` and
`<mode>.png`; `--from-json DIR/<mode>.json --docs` rewrites this page from
such a saved run. `--only updates,train` runs some sections; `--no-torch`
leaves torch out. Add a row by naming it in `benchmarks/rows.py` and
registering an implementation in `benchmarks/peers.py` (see its docstring).
"""


def _f(x, fmt, none='-'):
  return none if x is None else format(x, fmt)


def _ms(r):
  return (f"{r['median_ms']:.3f} [{r['ci_ms'][0]:.3f},"
          f" {r['ci_ms'][1]:.3f}]")


def _code(name):
  """A row name as Markdown code (``_foreach_lerp_`` is not emphasis)."""
  return f'`{name}`'


def _mem(r):
  if r.get('steady_units') is None:
    return '-'
  return (f"{r['steady_units']:.2f} / {_f(r.get('peak_units'), '.2f')}")


def _ratio(x):
  return '-' if x is None else f"{x['median']:.3f} [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}]"


def _bytes_per_param(r, params):
  return '-' if not r.get('bytes') else f"{r['bytes'] / params:g}"


def _updates(result):
  lines = []
  for tree in result.get('updates') or []:
    lines += ['', f"### {tree['case']}", '',
              f"{tree['leaves']:,} leaves, {tree['params'] / 1e6:.3f}M params,"
              f" {tree['dtype']}. `x optax`: per-round time ratio to"
              ' `optax.incremental_update` (rows that move 12 B/param) or to'
              ' `optax.apply_updates + incremental_update` (16 B/param).'
              ' `x hand`: the same to the NaN guard written by hand'
              ' (`all(isfinite)`, then `where(ok, incremental_update(...),'
              ' ema)`; for 16 B/param rows `apply_updates` first).', '',
              '| implementation | B/param | median ms [95% CI] | GB/s |'
              ' % ceiling | x optax | x hand | compile s |'
              ' memory steady / peak |',
              '|---|---:|---|---:|---:|---|---|---:|---|']
    for r in tree['rows']:
      lines.append(
          f"| {_code(r['impl'])} | {_bytes_per_param(r, tree['params'])} |"
          f" {_ms(r)} | {_f(r.get('gbps'), '.2f')} |"
          f" {_f(r.get('pct_ceiling'), '.0f')} |"
          f" {_ratio(r.get('vs_ref'))} | {_ratio(r.get('vs_hand'))} |"
          f" {_f(r.get('compile_s'), '.2f')} |"
          f' {_mem(r)} |')
  return lines


def _added(r):
  a = r.get('added')
  if a is None:
    return '-', '-'
  if not a['resolved']:
    return (f"noise (<= {a['ci_ms'][1]:.3f})", 'noise')
  ci = r['added_vs_ideal_ci']
  return (f"{a['median_ms']:.3f} [{a['ci_ms'][0]:.3f}, {a['ci_ms'][1]:.3f}]",
          f"{r['added_vs_ideal']:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}]")


def _train(result):
  t = result.get('train')
  if not t:
    return []
  lines = ['', f"A jitted, donated Adam step on an MLP {tuple(t['mlp'])}"
           f" ({t['params'] / 1e6:.2f}M params), with and without an average."
           ' "added": the step minus plain Adam (the `clip + adam + ...` rows:'
           ' minus `clip + adam`), pair by pair; the ideal is'
           f" 12 bytes/param at the ceiling = {t['ideal_ms']:.4f} ms."]
  for b in t['batches']:
    lines += ['', f"### Batch {b['batch']}", '',
              '| step | median ms [95% CI] | added ms [95% CI] | added / ideal'
              ' |', '|---|---|---|---|']
    for r in b['rows']:
      added, ratio = _added(r)
      lines.append(f"| {_code(r['impl'])} | {_ms(r)} | {added} | {ratio} |")
  return lines


def _options(result):
  o = result.get('options')
  if not o:
    return []
  lines = ['', f"`emax.ema(0.999, ...)`, standalone `tx.update` (donated) on"
           f" {o['case']} ({o['params'] / 1e6:.3f}M params); `x base`: per-round"
           f" ratio to `{o['baseline']}`.", '',
           '| option | median ms [95% CI] | GB/s | x base | compile s |',
           '|---|---|---:|---|---:|']
  for r in o['rows']:
    lines.append(f"| {_code(r['impl'])} | {_ms(r)} | {_f(r.get('gbps'), '.2f')}"
                 f" | {_ratio(r.get('vs_baseline'))} |"
                 f" {_f(r.get('compile_s'), '.2f')} |")
  return lines


def _averages(result):
  a = result.get('averages')
  if not a:
    return []
  lines = ['', f"K averages of {a['case']} ({a['params'] / 1e6:.3f}M params)"
           ' in the pure form (`emax.update`): one state of K named averages'
           ' against K separate states, all in one jitted, donated step. The'
           ' roofline moves (4 + 8K) bytes/param at the ceiling.', '',
           '| K | implementation | median ms [95% CI] | roofline ms |'
           ' x roofline | x K separate | memory steady / peak |',
           '|---:|---|---|---:|---:|---|---|']
  for t in a['tables']:
    for r in t['rows']:
      lines.append(f"| {t['k']} | {_code(r['impl'])} | {_ms(r)} |"
                   f" {t['roofline_ms']:.3f} | {r['vs_roofline']:.2f} |"
                   f" {_ratio(r.get('vs_separate'))} | {_mem(r)} |")
  return lines


def _offload(result):
  o = result.get('offload')
  if not o or not o.get('sizes'):
    return []
  lines = ['', f"`emax.ema(0.999, offload=True)` on {o['device']} (memories:"
           f" {', '.join(o['memories'])}); not donated. \"added\": over the"
           ' device row, pair by pair.', '',
           '| params | MB | row | median ms [95% CI] | added ms [95% CI] |'
           ' transfer GB/s |', '|---:|---:|---|---|---|---:|']
  for s in o['sizes']:
    for r in s['rows']:
      a = r.get('added')
      added = ('-' if a is None else f"noise (<= {a['ci_ms'][1]:.3f})"
               if not a['resolved'] else
               f"{a['median_ms']:.3f} [{a['ci_ms'][0]:.3f},"
               f" {a['ci_ms'][1]:.3f}]")
      lines.append(f"| {s['params']:,} | {s['mbytes']:.0f} | {r['impl']} |"
                   f" {_ms(r)} | {added} |"
                   f" {_f(r.get('transfer_gbps'), '.2f')} |")
  return lines


def _share(result):
  sh = result.get('share')
  if not sh or not sh.get('models'):
    return []
  lines = ['', 'What each way of keeping an average adds to a whole jitted,'
           ' donated train step (forward, backward, Adam at a small batch),'
           ' as a percentage of the same step without it (`clip + adam +'
           ' ...`: of `clip_by_global_norm + adam`): the median of per-round'
           ' ratios, minus one, with its 95% CI; all routes of a model timed'
           ' together. Decay 0.999 (named: 0.999 and 0.9999). Host memories'
           f" of this backend: {', '.join(sh['memories'])}."]
  for m in sh['models']:
    lines += ['', f"### {m['model'].capitalize()}", '',
              f"{m['describe']}: {m['params'] / 1e6:.2f}M params.", '',
              '| route | step ms [95% CI] | share of the step [95% CI] |'
              ' compile s | memory peak |', '|---|---|---|---:|---:|']
    for r in m['rows']:
      share = ('(base)' if 'share_pct' not in r else
               f"{r['share_pct']:+.1f}% [{r['share_ci_pct'][0]:+.1f},"
               f" {r['share_ci_pct'][1]:+.1f}]")
      lines.append(f"| {_code(r['impl'])} | {_ms(r)} | {share} |"
                   f" {_f(r.get('compile_s'), '.1f')} |"
                   f" {_f(r.get('peak_units'), '.2f')} |")
  return lines


def _targets(result):
  lines = ['', '| target | measured [95% CI] | status |', '|---|---|---|']
  group = None
  for t in result['targets']:
    if t['group'] != group:
      group = t['group']
      lines.append(f'| **{group}** | | |')
    measured = t['measured'] or t['note']
    if t['measured'] and t['note']:
      measured += f" ({t['note']})"
    lines.append(f"| {t['target']} | {measured} | {t['status']} |")
  return lines


def _skipped(result):
  if not result['skipped']:
    return []
  lines = ['', '## Rows not run', '', '| section | table | row | reason |',
           '|---|---|---|---|']
  for s in result['skipped']:
    reason = s['reason'].replace('|', '/').replace('\n', ' ')
    lines.append(f"| {s['section']} | {s['table']} | {_code(s['row'])} |"
                 f" {'ERROR: ' if s['error'] else ''}{reason} |")
  return lines


def markdown(result, image: str | None) -> str:
  """The page: targets first, then one section per table."""
  m = result['machine']
  c = result.get('ceiling') or {}
  head = [
      f"<!-- Generated by `python -m benchmarks.run` (--{result['mode']}"
      f"{' --gpu' if result.get('gpu') else ''}) on {result['date']}: do not"
      ' edit by hand; rerun it (see "How to rerun") to update this page and'
      ' its plot. -->', '',
      '# Performance', '',
      f"`{result.get('command', 'python -m benchmarks.run')}` on"
      f" {result['date']},"
      f" {result['wall_s']:.0f} s: {m['cpu']}"
      f" ({m['cores']} cores, {m['threads']} threads), backend"
      f" {m['backend']}; {', '.join(f'{k} {v}' for k, v in m['versions'].items() if v)};"
      f" load average {m['load_before']} before, {m['load_after']} after.",
  ]
  if c:
    head += ['', 'Ceiling: ' + ', '.join(
        f'{k} {v:.1f} GB/s' for k, v in c['sources'].items())
             + f"; percentages are of {c['gbps']:.1f} GB/s."]
  lines = head + ['', '## What the numbers mean', '', _MEANING.rstrip(),
                  '', '## How to rerun', '', _RERUN.rstrip(),
                  '', '## Targets'] + _targets(result) + [
                      '', _FLOOR.rstrip()]
  if result.get('updates'):
    lines += ['', '## Update step, per tree', '',
              'One EMA step of each tree, decay 0.999, the state donated'
              ' unless the row says otherwise.']
    if image:
      lines += ['', f'![GB/s per implementation and tree]({image})']
    lines += _updates(result)
  for title, fn in (('Train step', _train),
                    ('The average\'s share of a train step', _share),
                    ('Options', _options),
                    ('K averages', _averages), ('Host offload', _offload)):
    body = fn(result)
    if body:
      lines += ['', f'## {title}'] + body
  lines += _skipped(result)
  return '\n'.join(lines) + '\n'


def plot(result, path) -> bool:
  """GB/s per implementation, one panel per tree (matplotlib, Agg)."""
  trees = [t for t in result.get('updates') or []
           if any(r.get('gbps') for r in t['rows'])]
  if not trees:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cols = 2 if len(trees) > 1 else 1
  rows = -(-len(trees) // cols)
  height = max(len(t['rows']) for t in trees) * 0.28 + 1.2
  fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, height * rows),
                           squeeze=False)
  ceiling = (result.get('ceiling') or {}).get('gbps')
  for ax, tree in zip(axes.flat, trees):
    rs = [r for r in tree['rows'] if r.get('gbps')]
    names = [r['impl'] for r in rs]
    vals = [r['gbps'] for r in rs]
    colors = ['tab:blue' if n.startswith(('emax', 'stacked')) else
              'tab:orange' if n.startswith('torch') else 'tab:gray'
              for n in names]
    ax.barh(range(len(rs)), vals, color=colors)
    for i, v in enumerate(vals):
      ax.text(v, i, f' {v:.3g}', va='center', fontsize=6)
    ax.set_yticks(range(len(rs)), names, fontsize=7)
    ax.invert_yaxis()
    if ceiling:
      ax.axvline(ceiling, color='k', ls='--', lw=1, label='ceiling')
    ax.set_title(f"{tree['case']} ({tree['params'] / 1e6:.3g}M params)",
                 fontsize=9)
    ax.set_xlim(0, max(vals + [ceiling or 0]) * 1.15)
    ax.set_xlabel('GB/s of minimal traffic', fontsize=8)
    ax.tick_params(axis='x', labelsize=7)
  for ax in list(axes.flat)[len(trees):]:
    ax.axis('off')
  fig.suptitle(f"emax benchmarks, {result['mode']} run on"
               f" {result['machine']['backend']} (blue: emax, orange: torch,"
               ' dashed: ceiling)', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def write(result, out_dir=None, docs_dir=None, log=print) -> dict:
  """Writes the page and the plot into ``docs_dir`` (as ``performance.md``
  and ``.png``) and JSON, page and plot into ``out_dir`` (as
  ``<mode>.json``, ``.md`` and ``.png``); either may be None.

  Returns the paths written, by kind (``json``, ``md``, ``png``,
  ``docs_md``, ``docs_png``).
  """
  paths = {}
  pages = []  # (kind prefix, page, plot)
  if out_dir is not None:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result['mode'] + ('-gpu' if result.get('gpu') and
                             result['mode'] != 'gpu' else '')
    paths['json'] = out_dir / f'{stem}.json'
    with open(paths['json'], 'w') as f:
      json.dump(result, f, indent=1, default=str, allow_nan=False)
    pages.append(('', out_dir / f'{stem}.md', out_dir / f'{stem}.png'))
  if docs_dir is not None:
    docs_dir = pathlib.Path(docs_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    pages.append(('docs_', docs_dir / 'performance.md',
                  docs_dir / 'performance.png'))
  drawn = None  # the first plot written, copied for the other page
  for prefix, md, png in pages:
    if drawn is None:
      try:
        drawn = png if plot(result, png) else False
      except ImportError as e:
        log(f'no plot: {e} (pip install matplotlib)')
        drawn = False
    elif drawn:
      shutil.copyfile(drawn, png)
    if drawn:
      paths[prefix + 'png'] = png
    elif png.exists():
      os.remove(png)  # never a stale plot beside a new page
    paths[prefix + 'md'] = md
    md.write_text(markdown(result, png.name if drawn else None))
  return paths
