"""emax benchmarks: EMA updates against peers and the memory-bandwidth limit.

Run from the repository root::

  python -m benchmarks.run --smoke          # seconds, tiny trees (the tests)
  python -m benchmarks.run --quick          # minutes, shrunk trees
  python -m benchmarks.run --full           # the published run (implies --docs)
  python -m benchmarks.run --gpu            # one GPU (sized for < 5 minutes)
  python -m benchmarks.run --quick --docs   # also rewrite docs/performance.md

Every run prints its report. Where it is written: ``--docs`` (implied by
``--full``) writes docs/performance.md and .png, the only results kept in
the repository (``--docs-dir DIR`` writes them elsewhere); ``--out DIR``
writes ``DIR/<mode>.json`` (every sample), ``.md`` and ``.png``.

Other options: ``--only ceiling,updates,train,options,averages,offload,share``,
``--tree NAME`` (repeatable; a tree's name or its start), ``--no-torch``,
``--threads N``, ``--from-json PATH`` (rewrite a saved run's report).
``--gpu`` refuses to run on a CPU backend unless ``EMAX_BENCH_GPU_ON_CPU=1``
(how the tests run its code path); ``--gpu --smoke`` is the GPU suite with
the smoke run's sizes.

The modules: :mod:`benchmarks.trees` (the trees), :mod:`benchmarks.rows`
(the rows' names), :mod:`benchmarks.peers` (the implementations, a registry
per table), :mod:`benchmarks.timing` (the one timer),
:mod:`benchmarks.suite` (the sections and modes), :mod:`benchmarks.offload`
(host offload), :mod:`benchmarks.share` (an average's share of a real train
step: in ``--full`` and ``--gpu``), :mod:`benchmarks.targets` and :mod:`benchmarks.report`
(JSON, Markdown, the docs page, the plot).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

if __package__ in (None, ''):  # run as `python benchmarks/run.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

import jax  # noqa: E402

from benchmarks import offload as offload_lib  # noqa: E402
from benchmarks import peers  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks import share as share_lib  # noqa: E402
from benchmarks import suite  # noqa: E402
from benchmarks import targets  # noqa: E402

GPU_ON_CPU = 'EMAX_BENCH_GPU_ON_CPU'
_FNS = dict(ceiling=suite.ceiling, updates=suite.updates, train=suite.train,
            options=suite.options, averages=suite.averages,
            offload=offload_lib.offload, share=share_lib.share)


def machine(threads: int) -> dict:
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
              devices=len(jax.devices()), versions=peers.environment())


def _load() -> str:
  try:
    return ', '.join(f'{x:.2f}' for x in os.getloadavg())
  except OSError:
    return '?'


def _finite(x):
  """The result with non-finite floats as None (strict JSON)."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  return x


def parse(argv=None):
  ap = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split('\n', 2)[2])
  sizes = ap.add_mutually_exclusive_group()
  for m in ('smoke', 'quick', 'full'):
    sizes.add_argument(f'--{m}', dest='mode', action='store_const', const=m,
                       help=f'the {m} run\'s sizes')
  ap.add_argument('--gpu', action='store_true',
                  help='the GPU suite: the default accelerator, GPU sizes'
                  ' (or those of --smoke/--quick/--full), host offload')
  ap.add_argument('--out', default=None, metavar='DIR',
                  help='also write <mode>.json (every sample), .md and .png'
                  ' into DIR')
  ap.add_argument('--docs', action='store_true',
                  help='write the docs page and its plot, performance.md and'
                  ' .png (implied by --full)')
  ap.add_argument('--docs-dir', default=str(report.DOCS_DIR), metavar='DIR',
                  help='where --docs writes (default: %(default)s)')
  ap.add_argument('--only', default=None,
                  help=f'comma list of sections: {",".join(suite.SECTIONS)}')
  ap.add_argument('--tree', dest='trees', action='append', default=None,
                  help='a tree of the per-tree tables, by its name or the'
                  ' start of it (repeat for several), e.g. --tree GPT-2'
                  ' --tree "ResNet-50-like, bf16"')
  ap.add_argument('--from-json', default=None, metavar='PATH',
                  help='measure nothing: rewrite the targets, the Markdown and'
                  ' the plot (and with --docs the docs page) from a saved'
                  ' <mode>.json')
  ap.add_argument('--threads', type=int, default=os.cpu_count(),
                  help='NumPy ceiling and torch CPU threads (default: all)')
  ap.add_argument('--no-torch', action='store_true',
                  help='leave torch out (its rows are listed as skipped)')
  return ap.parse_args(argv)


def rewrite(args) -> dict:
  """``--from-json``: the report of a saved run, with today's report code."""
  with open(args.from_json) as f:
    result = json.load(f)
  result['targets'] = targets.targets(result)
  if args.out is None and not args.docs:
    raise SystemExit('--from-json rewrites a report: give --docs (the docs'
                     ' page), --out DIR, or both')
  paths = report.write(result, args.out, docs_dir=args.docs_dir if args.docs
                       else None)
  print('written: ' + ', '.join(str(p) for p in paths.values()))
  return result


def main(argv=None) -> dict:
  args = parse(argv)
  if args.from_json:
    return rewrite(args)
  started = time.perf_counter()
  mode_name = args.mode or ('gpu' if args.gpu else 'quick')
  mode = dict(suite.MODES[mode_name], name=mode_name)
  backend = jax.default_backend()
  if args.gpu and backend == 'cpu' and os.environ.get(GPU_ON_CPU) != '1':
    raise SystemExit(
        f'--gpu needs an accelerator, but jax {jax.__version__} runs on'
        f' {jax.devices()[0].platform}. Install jax for your GPU (pip install'
        f' -U "jax[cuda12]"), or set {GPU_ON_CPU}=1 to run the GPU suite\'s'
        ' code path on CPU (what the tests do).')
  if args.trees:
    mode['trees'] = tuple(args.trees)
  if args.gpu and mode_name != 'gpu':
    mode['min_sample_s'] = suite.MODES['gpu']['min_sample_s'] * 0.1
  # Host offload and the share of a real train step run on a GPU, in the
  # full run (share) or when asked (--only).
  extra = {'offload': args.gpu, 'share': args.gpu or mode_name == 'full'}
  sections = (args.only.split(',') if args.only else
              [s for s in suite.SECTIONS if extra.get(s, True)])
  unknown = sorted(set(sections) - set(suite.SECTIONS))
  if unknown:
    raise SystemExit(f'--only takes {",".join(suite.SECTIONS)}; got'
                     f' {",".join(unknown)}')
  if 'ceiling' not in sections:  # every GB/s needs it
    sections.insert(0, 'ceiling')
  peers.TORCH['disabled'] = args.no_torch
  peers.COMPILED.clear()  # compile times are this run's own
  log = lambda s: print(s, flush=True)  # noqa: E731
  info = machine(args.threads)
  info['load_before'] = _load()
  log(f"emax benchmarks, {mode_name}{' (GPU suite)' if args.gpu else ''}:"
      f' {info}')
  ctx = suite.Context(mode=mode, backend=backend, threads=args.threads,
                      log=log)
  result = dict(mode=mode_name, gpu=args.gpu,
                command=' '.join(['python -m benchmarks.run'] + list(
                    sys.argv[1:] if argv is None else argv)),
                date=datetime.date.today().isoformat(), machine=info,
                config={k: v for k, v in mode.items() if k != 'limits'},
                sections={})
  with jax.numpy_dtype_promotion('standard'):  # optax.ema and adam
    for name in suite.SECTIONS:
      result[name] = None  # a section not run
      if name in sections:
        result[name], seconds = suite.run_section(ctx, name, _FNS[name])
        result['sections'][name] = dict(wall_s=seconds)
        log(f'[{name}: {seconds:.1f} s]')
  info['load_after'] = _load()
  result['skipped'] = ctx.skipped
  result['wall_s'] = time.perf_counter() - started
  result['targets'] = targets.targets(result)
  result = _finite(result)
  docs = args.docs or (mode_name == 'full' and not args.gpu)
  paths = report.write(result, args.out,
                       docs_dir=args.docs_dir if docs else None, log=log)
  log('\n' + report.markdown(result, image=None))
  log('written: ' + (', '.join(str(p) for p in paths.values())
                     or 'nothing (give --docs or --out DIR to keep it)'))
  return result


if __name__ == '__main__':
  main()
