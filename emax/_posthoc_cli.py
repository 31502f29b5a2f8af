"""The command line, ``python -m emax.posthoc``: post-hoc EMA to files.

Reads a checkpoint directory with :func:`emax.posthoc.from_checkpoints` and
writes one Orbax checkpoint of the params per reconstructed width.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
import os
import sys
from typing import Any

from emax import _checkpoint_files
from emax import _checkpoint_record
from emax import _posthoc_checkpoints

_CLI = '''\
Post-hoc EMA from the Orbax checkpoints of a training run.

Reads the checkpoints in CHECKPOINT_DIR (an orbax.checkpoint.CheckpointManager
directory whose states hold emax power-function averages, saved with
emax.checkpoint.save(..., sigma_rels=...) or described with --tracked),
reconstructs the average of each --sigma-rel at checkpoint --step (the latest
by default), and writes, for each, an Orbax checkpoint of the params:

  OUT_DIR/sigma_rel_<S>/<STEP>/   a CheckpointManager directory; restore with
      ocp.CheckpointManager(os.path.abspath("OUT_DIR/sigma_rel_<S>")).restore(
          STEP, args=ocp.args.StandardRestore())
  (<S>: the width as Python writes it, 0.1 for 0.10; ocp: orbax.checkpoint)
'''


def _number(value: str, flag: str) -> float:
  try:
    return float(value)
  except ValueError:
    raise ValueError(
        f'{flag} takes numbers, got {value!r}: e.g. {flag} s05=0.05'
        f' s10=0.10 (by name), or {flag} 0.05 0.10 (one per average, in'
        ' the order given to emax.ema).') from None


def _parse_tracked(values: list[str] | None) -> Any:
  """``--tracked``: ``NAME=S ...`` (a mapping) or ``S ...`` (in order)."""
  if not values:
    return None
  if all('=' in v for v in values):
    return {k: _number(v, '--tracked')
            for k, v in (x.split('=', 1) for x in values)}
  if any('=' in v for v in values):
    raise ValueError('--tracked takes either NAME=SIGMA_REL entries or plain'
                     f' SIGMA_REL values, not both: {values}.')
  return [None if v.lower() == 'none' else _number(v, '--tracked')
          for v in values]


def _out_dirs(out: str, sigma_rels: list[float]) -> list[str]:
  """One folder per width, named by the width as given (distinct widths,
  distinct folders: ``repr`` of a float tells any two floats apart)."""
  repeated = sorted({s for s in sigma_rels if sigma_rels.count(s) > 1})
  if repeated:
    raise ValueError(f'--sigma-rel lists {repeated} more than once; give each'
                     ' width once.')
  return [os.path.join(out, f'sigma_rel_{s!r}') for s in sigma_rels]


def _print_progress(steps: list[int]) -> Iterable[int]:
  for k, step in enumerate(steps, 1):
    print(f'checkpoint {k}/{len(steps)} (step {step})', file=sys.stderr,
          flush=True)
    yield step


def _progress_bar(
    quiet: bool) -> Callable[[list[int]], Iterable[int]] | None:
  if quiet:
    return None
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return _print_progress
  return lambda steps: tqdm(steps, desc='checkpoints', unit='ckpt')


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m emax.posthoc``: see ``python -m emax.posthoc --help``."""
  parser = argparse.ArgumentParser(
      prog='python -m emax.posthoc', description=_CLI,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('checkpoint_dir', metavar='CHECKPOINT_DIR')
  parser.add_argument('--sigma-rel', type=float, nargs='+', required=True,
                      metavar='S', help='the widths to reconstruct')
  parser.add_argument('--out', required=True, metavar='OUT_DIR',
                      help='where to write one checkpoint per width')
  parser.add_argument('--step', type=int, default=None,
                      help='the checkpoint step to reconstruct at (default:'
                      ' the latest)')
  parser.add_argument('--tracked', nargs='+', metavar='S',
                      help='the widths of the saved averages, when the'
                      ' checkpoints do not record them: one S per average,'
                      ' in the order given to emax.ema (none: leave one'
                      ' out); or NAME=S per name, to override widths that'
                      ' emax.checkpoint.save recorded with the names')
  parser.add_argument('--path', nargs='+', metavar='KEY',
                      help='keys from the root to the average, when the'
                      ' saved state holds several')
  parser.add_argument('--item', default=None,
                      help='the item, for managers that save several')
  parser.add_argument('--quiet', action='store_true',
                      help='no progress bar')
  args = parser.parse_args(argv)
  ocp = _checkpoint_files.orbax()
  try:
    outs = _out_dirs(args.out, list(args.sigma_rel))
    tracked = _parse_tracked(args.tracked)
  except ValueError as e:
    parser.error(str(e))
  taken = [o for o in outs if os.path.isdir(o) and os.listdir(o)]
  if taken:
    parser.error(f'{", ".join(taken)} already exist{"s" * (len(taken) == 1)};'
                 ' remove them or choose another --out.')
  try:
    results = _posthoc_checkpoints.reconstruct_checkpoints(
        args.checkpoint_dir, list(args.sigma_rel), target_step=args.step,
        sigma_rels=tracked, path=args.path, like=None, item=args.item,
        progress=_progress_bar(args.quiet), sigma_rels_arg='--tracked')
  except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
    parser.exit(1, f'{parser.prog}: error: {e}\n')
  step = args.step
  if step is None:  # from_checkpoints found them: the latest
    step = max(_checkpoint_files.finished_steps(
        args.checkpoint_dir, parser.prog)[1])
  for sigma_rel, out, params in zip(args.sigma_rel, outs, results):
    with ocp.CheckpointManager(os.path.abspath(out)) as manager:
      _checkpoint_record.save(
          manager, step, params, sigma_rels=None, wait=True,
          custom_metadata={'posthoc': {
              'sigma_rel': sigma_rel, 'step': step,
              'checkpoints': os.path.abspath(args.checkpoint_dir)}})
    print(f'sigma_rel {sigma_rel!r}: wrote {out}/{step}')
  return 0
