"""The command line, ``python -m emax.posthoc``: post-hoc EMA to files.

Reads an Orbax checkpoint directory with :func:`emax.posthoc.from_checkpoints`
and writes one Orbax checkpoint of the params per reconstructed width; or a
folder of ``NAME-STEP-SIGMA.safetensors`` snapshots with
:func:`emax.posthoc.from_files` and writes one safetensors file per width.

With ``--mesh`` (and ``--shard`` rules), the checkpoints are read into a
``NamedSharding`` per param (``sharding=``) and the outputs saved sharded;
``--distributed`` runs that under ``jax.distributed``, one process per host.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
import json
import os
import sys
from typing import Any

import jax

from emax import _checkpoint_files
from emax import _checkpoint_record
from emax import _posthoc_checkpoints
from emax import _posthoc_cli_sharding
from emax import _posthoc_files
from emax import _safetensors

_CLI = '''\
Post-hoc EMA from the Orbax checkpoints or the safetensors snapshots of a
training run.

Reconstructs the average of each --sigma-rel at step --step (the latest by
default) from the snapshots in DIR, which holds either

- the checkpoints of an orbax.checkpoint.CheckpointManager whose states hold
  emax power-function averages, saved with emax.checkpoint.save(...,
  sigma_rels=...) or described with --tracked; writes, for each width,
  OUT_DIR/sigma_rel_<S>/<STEP>/, a CheckpointManager directory; restore with
      ocp.CheckpointManager(os.path.abspath("OUT_DIR/sigma_rel_<S>")).restore(
          STEP, args=ocp.args.StandardRestore())
  (<S>: the width with three decimals as EDM2 writes it, 0.100, or more if
  needed to tell it apart, 0.1234; ocp: orbax.checkpoint)

- or one safetensors file per snapshot, NAME-STEP-SIGMA.safetensors (EDM2's
  naming: STEP the steps the average had seen, an integer; SIGMA its
  sigma_rel, e.g. ema-0020000-0.050.safetensors), saved by any framework
  (safetensors.torch.save_file(ema.state_dict(), ...)); writes, for each
  width, OUT_DIR/NAME-STEP-<S>.safetensors with the same tensor names and
  dtypes (<S> as above).
  Needs safetensors: pip install "emax[safetensors]".

Params too large for one host (Orbax checkpoints only): --mesh lays the
devices out as a mesh and --shard says how each param is split over its
axes, e.g.
    --mesh data=2,model=4 --shard '.*kernel=data,model' '.*bias=model'
Each checkpoint is then read straight into that sharding (each device reads
its own shards) and summed on the devices, shard by shard, in float32
(float64 with JAX_ENABLE_X64=1); each output is saved sharded, every device
writing its own shards, and restores onto any mesh given a target
(ocp.args.StandardRestore(abstract params with shardings)). A --shard rule
is REGEX=SPEC: REGEX must match a param's path in full, its keys joined by
'/' (dense/kernel for params['dense']['kernel'], layers/0/w for
params['layers'][0]['w']); the first rule that matches a param gives its
spec; params no rule matches are replicated; a rule that matches none is an
error that lists the paths. SPEC lists one entry per leading dimension: a
mesh axis, several joined by '+' (data+model), or None (or nothing) for an
unsharded one: 'data,None' is PartitionSpec('data', None); an empty SPEC
replicates.

On several hosts, run the same command in every process with --distributed:
jax.distributed.initialize() then detects the coordinator, the number of
processes and this process's id on SLURM, Open MPI, Cloud TPU and
Kubernetes; elsewhere give them with --coordinator-address (or the
JAX_COORDINATOR_ADDRESS variable), --num-processes and --process-id (which
differs per process). --mesh then spans the devices of all processes; DIR
and OUT_DIR must be one shared folder (or gs://...) for all of them. Only
process 0 prints.
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


def _distinct(sigma_rels: list[float]) -> list[float]:
  """The widths, each given once (distinct floats get distinct outputs)."""
  repeated = sorted({s for s in sigma_rels if sigma_rels.count(s) > 1})
  if repeated:
    raise ValueError(f'--sigma-rel lists {repeated} more than once; give each'
                     ' width once.')
  return sigma_rels


def _out_dirs(out: str, sigma_rels: list[float]) -> list[str]:
  """One folder per width, ``sigma_rel_<S>``, ``<S>`` as the safetensors
  outputs name it (distinct floats get distinct folders)."""
  return [os.path.join(out, f'sigma_rel_{_posthoc_files.sigma_text(s)}')
          for s in sigma_rels]


def _print_progress(what: str) -> Callable[[list[Any]], Iterable[Any]]:
  def progress(items: list[Any]) -> Iterable[Any]:
    for k, item in enumerate(items, 1):
      print(f'{what} {k}/{len(items)} ({item})', file=sys.stderr, flush=True)
      yield item
  return progress


def _progress_bar(
    quiet: bool, what: str, unit: str
) -> Callable[[list[Any]], Iterable[Any]] | None:
  if quiet:
    return None
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return _print_progress(what)
  return lambda items: tqdm(items, desc=f'{what}s', unit=unit)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m emax.posthoc', description=_CLI,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('checkpoint_dir', metavar='DIR',
                      help='the checkpoint directory, or the folder of the'
                      ' snapshot files')
  parser.add_argument('--sigma-rel', type=float, nargs='+', required=True,
                      metavar='S', help='the widths to reconstruct')
  parser.add_argument('--out', required=True, metavar='OUT_DIR',
                      help='where to write one checkpoint or file per width')
  parser.add_argument('--step', type=int, default=None,
                      help='the checkpoint step, or the STEP of the snapshot'
                      ' files, to reconstruct at (default: the latest)')
  parser.add_argument('--name', default=None,
                      help='safetensors snapshots: the NAME of the files to'
                      ' read, when DIR holds several')
  parser.add_argument('--tracked', nargs='+', metavar='S',
                      help='Orbax checkpoints: the widths of the saved'
                      ' averages, when the checkpoints do not record them:'
                      ' one S per average, in the order given to emax.ema'
                      ' (none: leave one out); or NAME=S per name, to'
                      ' override widths that emax.checkpoint.save recorded'
                      ' with the names')
  parser.add_argument('--path', nargs='+', metavar='KEY',
                      help='Orbax checkpoints: keys from the root to the'
                      ' average, when the saved state holds several')
  parser.add_argument('--item', default=None,
                      help='Orbax checkpoints: the item, for managers that'
                      ' save several')
  parser.add_argument('--quiet', action='store_true',
                      help='no progress bar')
  sharded = parser.add_argument_group(
      'sharded (Orbax checkpoints; see above)')
  sharded.add_argument('--mesh', type=_posthoc_cli_sharding.parse_mesh,
                       metavar='AXIS=SIZE,...',
                       help='read, sum and save sharded over a mesh of all'
                       ' devices (sizes multiply to their number), e.g.'
                       ' data=2,model=4')
  sharded.add_argument('--shard', type=_posthoc_cli_sharding.parse_shard,
                       nargs='+', action='extend', metavar='REGEX=SPEC',
                       help="how params are split, e.g. '.*kernel=data,model'"
                       " '.*bias=model' (first match wins; default:"
                       ' replicated)')
  sharded.add_argument('--distributed', action='store_true',
                       help='call jax.distributed.initialize() first; run'
                       ' the same command in every process')
  sharded.add_argument('--coordinator-address', metavar='HOST:PORT',
                       help='with --distributed: process 0\'s address'
                       ' (default: JAX_COORDINATOR_ADDRESS, or detected)')
  sharded.add_argument('--num-processes', type=int, metavar='N',
                       help='with --distributed: the number of processes'
                       ' (default: detected)')
  sharded.add_argument('--process-id', type=int, metavar='I',
                       help='with --distributed: this process\'s id, 0 to'
                       ' N - 1 (default: detected)')
  return parser


def _check_sharded_flags(parser: argparse.ArgumentParser, args: Any) -> None:
  """The flags of a sharded run go together; raise before anything runs."""
  if args.shard and args.mesh is None:
    parser.error('--shard splits params over the axes of a mesh: give'
                 ' --mesh too, e.g. --mesh data=2,model=4.')
  if args.distributed and args.mesh is None:
    parser.error('--distributed needs --mesh: without one, every process'
                 ' would read the whole params into its host memory. Give'
                 ' --mesh over the devices of all processes, e.g. --mesh'
                 ' data=NUM_PROCESSES,model=DEVICES_PER_PROCESS.')
  alone = [f for f, v in (('--coordinator-address', args.coordinator_address),
                          ('--num-processes', args.num_processes),
                          ('--process-id', args.process_id)) if v is not None]
  if alone and not args.distributed:
    parser.error(f'{", ".join(alone)} configure{"s" * (len(alone) == 1)}'
                 ' jax.distributed: add --distributed.')
  if args.mesh is not None:
    try:
      _posthoc_cli_sharding.check_axes(args.shard or [], args.mesh)
    except ValueError as e:
      parser.error(str(e))


def _initialize(parser: argparse.ArgumentParser, args: Any) -> None:
  """``jax.distributed.initialize``, before anything touches the devices."""
  try:
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  except (ValueError, TypeError) as e:
    parser.exit(1, f'{parser.prog}: error: --distributed:'
                f' jax.distributed.initialize() failed ({e}). Outside a'
                ' cluster it detects (SLURM, Open MPI, Cloud TPU,'
                ' Kubernetes), give --coordinator-address HOST:PORT (or set'
                ' JAX_COORDINATOR_ADDRESS), --num-processes N and'
                ' --process-id I (0 to N - 1, one per process).\n')
  except RuntimeError as e:  # JAX ran already in this process
    parser.exit(1, f'{parser.prog}: error: --distributed: {e} Run the'
                ' command in a fresh process.\n')


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m emax.posthoc``: see ``python -m emax.posthoc --help``."""
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    sigma_rels = _distinct(list(args.sigma_rel))
  except ValueError as e:
    parser.error(str(e))
  _check_sharded_flags(parser, args)
  if _posthoc_files.holds_snapshots(args.checkpoint_dir):
    return _from_files(parser, args, sigma_rels)
  if args.name is not None:
    parser.error(f'--name picks among safetensors snapshot files, and'
                 f' {args.checkpoint_dir} holds no .safetensors file.')
  return _from_checkpoints(parser, args, sigma_rels)


def _from_checkpoints(parser: argparse.ArgumentParser, args: Any,
                      sigma_rels: list[float]) -> int:
  """Orbax checkpoints in, one Orbax checkpoint per width out."""
  _checkpoint_files.orbax()  # the ImportError that names the extra, first
  try:
    _, found = _checkpoint_files.finished_steps(args.checkpoint_dir,
                                                parser.prog)
  except FileNotFoundError as e:
    parser.exit(1, f'{parser.prog}: error: {_no_snapshots(args, e)}\n')
  step = max(found) if args.step is None else args.step
  outs = _out_dirs(args.out, sigma_rels)
  try:
    tracked = _parse_tracked(args.tracked)
  except ValueError as e:
    parser.error(str(e))
  taken = [o for o in outs if os.path.isdir(o) and os.listdir(o)]
  if taken:
    parser.error(f'{", ".join(taken)} already exist{"s" * (len(taken) == 1)};'
                 ' remove them or choose another --out.')
  if not args.distributed:
    return _reconstruct_and_save(parser, args, step, sigma_rels, outs,
                                 tracked)
  _initialize(parser, args)
  try:
    return _reconstruct_and_save(parser, args, step, sigma_rels, outs,
                                 tracked)
  finally:
    jax.distributed.shutdown()


def _no_snapshots(args: Any, error: FileNotFoundError) -> str:
  """Why DIR holds nothing to read, naming both kinds of snapshot folder."""
  text = str(error)
  if not os.path.isdir(args.checkpoint_dir):
    return text
  text += (' DIR must hold either the checkpoints of an'
           ' orbax.checkpoint.CheckpointManager, or one safetensors file per'
           f' snapshot named {_posthoc_files.PATTERN} (e.g.'
           f' {_posthoc_files.EXAMPLE}).')
  pickles = sorted(n for n in os.listdir(args.checkpoint_dir)
                   if n.endswith('.pkl'))
  if pickles:
    text += (f' It holds .pkl files ({", ".join(pickles[:3])}'
             f'{", ..." if len(pickles) > 3 else ""}): EDM2 pickles its'
             ' snapshots, which this command does not read; convert them to'
             ' safetensors files first, as docs/pytorch.md shows (Converting'
             ' EDM2 snapshots), and pass that folder.')
  return text


def _reconstruct_and_save(parser: argparse.ArgumentParser, args: Any,
                          step: int, sigma_rels: list[float],
                          outs: list[str], tracked: Any) -> int:
  """Reads the checkpoints (on the host, or sharded over ``--mesh``) and
  saves one checkpoint per width (every process its own shards)."""
  ocp = _checkpoint_files.orbax()
  lead = not args.distributed or jax.process_index() == 0
  try:
    sharding = None
    if args.mesh is not None:
      sharding = _posthoc_cli_sharding.sharding_tree(
          _posthoc_cli_sharding.make_mesh(args.mesh), args.shard or [],
          args.checkpoint_dir, item=args.item, path=args.path,
          sigma_rels=tracked)
    results = _posthoc_checkpoints.reconstruct_checkpoints(
        args.checkpoint_dir, sigma_rels, target_step=step,
        sigma_rels=tracked, path=args.path, like=None, item=args.item,
        progress=_progress_bar(args.quiet or not lead, 'checkpoint', 'ckpt'),
        sigma_rels_arg='--tracked', sharding=sharding)
  except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
    parser.exit(1, f'{parser.prog}: error: {e}\n')
  for sigma_rel, out, params in zip(sigma_rels, outs, results):
    with ocp.CheckpointManager(os.path.abspath(out)) as manager:
      _checkpoint_record.save(
          manager, step, params, sigma_rels=None, wait=True,
          custom_metadata={'posthoc': {
              'sigma_rel': sigma_rel, 'step': step,
              'checkpoints': os.path.abspath(args.checkpoint_dir)}})
    if lead:
      print(f'sigma_rel {sigma_rel!r}: wrote {out}/{step}')
  return 0


def _from_files(parser: argparse.ArgumentParser, args: Any,
                sigma_rels: list[float]) -> int:
  """``NAME-STEP-SIGMA.safetensors`` files in, one such file per width out.
  """
  orbax_only = [f for f, v in (('--tracked', args.tracked),
                               ('--path', args.path), ('--item', args.item),
                               ('--mesh', args.mesh), ('--shard', args.shard),
                               ('--distributed', args.distributed or None))
                if v is not None]
  if orbax_only:
    parser.error(
        f'{", ".join(orbax_only)} read{"s" * (len(orbax_only) == 1)} Orbax'
        f' checkpoints, but {args.checkpoint_dir} holds safetensors snapshots,'
        ' whose file names give their widths (NAME-STEP-SIGMA.safetensors).'
        ' Leave it out.')
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    parser.error(f'--out {args.out} is a file; give a folder to write the'
                 ' reconstructions into.')
  if os.path.isdir(args.out) and os.path.samefile(args.out,
                                                  args.checkpoint_dir):
    parser.error('--out is the snapshot folder itself; the outputs would be'
                 ' read as snapshots next time. Choose another --out.')
  try:
    read = _posthoc_files.read(
        args.checkpoint_dir, sigma_rels, target_step=args.step,
        name=args.name, where=parser.prog, name_arg='--name ',
        progress=_progress_bar(args.quiet, 'snapshot', 'file'))
    outs = [os.path.join(args.out, _posthoc_files.file_name(read.target, s))
            for s in sigma_rels]
  except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
    parser.exit(1, f'{parser.prog}: error: {e}\n')
  taken = [o for o in outs if os.path.exists(o)]
  if taken:
    one = len(taken) == 1
    parser.exit(1, f'{parser.prog}: error: {", ".join(taken)} already'
                f' exist{"s" * one}; remove {"it" if one else "them"} or'
                ' choose another --out.\n')
  os.makedirs(args.out, exist_ok=True)
  for sigma_rel, out, arrays in zip(sigma_rels, outs, read.results):
    record = {'sigma_rel': sigma_rel, 'step': read.target.step,
              'snapshots': os.path.abspath(args.checkpoint_dir)}
    _safetensors.save_safetensors(
        arrays, out, metadata={**(read.metadata or {}),
                               'emax.posthoc': json.dumps(record)})
    print(f'sigma_rel {sigma_rel!r}: wrote {out}')
  return 0
