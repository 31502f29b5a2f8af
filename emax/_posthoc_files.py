"""Post-hoc EMA from snapshot files: :func:`emax.posthoc.from_files`.

A directory of ``NAME-STEP-SIGMA.safetensors`` files, one snapshot each: the
naming of EDM2's ``reconstruct_phema.py`` (which reads ``.pkl`` files), so
that any framework's snapshots, saved with safetensors, can be combined.
The file names are read first and checked, the weights come from the EDM2
solve (:mod:`emax._posthoc_solve`), one set per target, then every file's
header (names, dtypes and shapes, no array) is compared with the first's;
then the files with a weight are read one at a time and added into one
float64 sum per target (:class:`emax._streaming_sum.TreeSum`) before the next
one is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import os
import re
import sys
from typing import Any, NamedTuple

import numpy as np

from emax import _options
from emax import _posthoc_solve
from emax import _safetensors
from emax._streaming_sum import TreeSum

SUFFIX = '.safetensors'
PATTERN = f'NAME-STEP-SIGMA{SUFFIX}'
_FILE_NAME = re.compile(
    r'(?P<name>.+)-(?P<step>\d+)-(?P<sigma>\d+\.\d+)' + re.escape(SUFFIX))
EXAMPLE = ('ema-0001000-0.050.safetensors: the snapshot after 1000 steps of'
            ' the average of sigma_rel 0.05')

FlatArrays = dict[str, np.ndarray]
"""A snapshot as safetensors holds it: ``{tensor name: array}``."""


class SnapshotFile(NamedTuple):
  """One ``NAME-STEP-SIGMA.safetensors`` file."""
  path: str
  name: str
  step: int
  step_text: str  # as written (EDM2 pads it with zeros)
  sigma_rel: float


def sigma_text(sigma_rel: float) -> str:
  """A width as a file name gives it: three decimals as EDM2 writes them
  (``0.050``), or as many as tell it apart from any other float."""
  text = f'{sigma_rel:.3f}'
  if float(text) == sigma_rel:
    return text
  return np.format_float_positional(sigma_rel, unique=True, trim='-')


def file_name(like: SnapshotFile, sigma_rel: float) -> str:
  """``NAME-STEP-SIGMA.safetensors`` for ``sigma_rel`` at ``like``'s step."""
  return f'{like.name}-{like.step_text}-{sigma_text(sigma_rel)}{SUFFIX}'


def _files(entries: Iterable[Any]) -> list[Any]:
  """The ``.safetensors`` files among a folder's entries."""
  return [e for e in entries if e.name.endswith(SUFFIX) and e.is_file()]


def holds_snapshots(directory: Any) -> bool:
  """Whether ``directory`` is a folder holding a ``.safetensors`` file."""
  if not isinstance(directory, (str, os.PathLike)) or not os.path.isdir(
      directory):
    return False
  with os.scandir(os.fspath(directory)) as entries:
    return bool(_files(entries))


def refuse_mixed(root: Any, entries: Iterable[Any], where: str) -> None:
  """Refuses a folder that holds both Orbax checkpoint steps and snapshot
  files: whichever way it were read, the other snapshots would be ignored.

  ``entries`` are the folder's entries, ``os.DirEntry`` or paths (``name``,
  ``is_file()``, ``is_dir()``).
  """
  entries = list(entries)
  files = sorted(e.name for e in _files(entries))
  if not files:  # the usual case: no folder is asked whether it is one
    return
  steps = sorted((e.name for e in entries
                  if e.name.isdigit() and e.is_dir()), key=int)
  if steps:
    raise ValueError(
        f'{where}: {root} holds both Orbax checkpoint steps ({_some(steps)})'
        f' and safetensors files ({_some(files)}). Keep the snapshots of one'
        ' run, saved one way, in a folder of their own.')


def snapshot_files(directory: Any, name: str | None, where: str,
                   name_arg: str = 'name=') -> list[SnapshotFile]:
  """The snapshots of ``name`` in ``directory``, by step, then width.

  Files saved at step 0 (before any training) hold no average and are left
  out, as EDM2 leaves them out.
  """
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(f'{where} expected a directory (a str or path), got'
                    f' {type(directory).__name__}.')
  root = os.fspath(directory)
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f'No snapshot directory {root}: it does not exist.')
  with os.scandir(root) as it:
    entries = sorted(it, key=lambda e: e.name)
  refuse_mixed(root, entries, where)
  named = _files(entries)
  bad = [e.name for e in named if not _FILE_NAME.fullmatch(e.name)]
  if bad:
    raise ValueError(
        f'{where}: {root} holds safetensors files not named {PATTERN}'
        f' (STEP an integer, SIGMA the sigma_rel with a decimal point):'
        f' {_some(bad)}. Rename them, e.g. {EXAMPLE}, or move them out.')
  files = []
  for e in named:
    m = _FILE_NAME.fullmatch(e.name)
    assert m is not None
    files.append(SnapshotFile(e.path, m['name'], int(m['step']), m['step'],
                              float(m['sigma'])))
  if not files:
    raise FileNotFoundError(
        f'{where}: no {PATTERN} file in {root}; it holds'
        f' {_some([e.name for e in entries]) or "nothing"}. Save one'
        f' snapshot per file, e.g. {EXAMPLE}.')
  names = sorted({f.name for f in files})
  if name is None and len(names) > 1:
    raise ValueError(
        f'{where}: {root} holds the snapshots of {len(names)} names'
        f' {names}; pass {name_arg}one of them.')
  if name is not None and name not in names:
    raise ValueError(
        f'{where}: no {PATTERN} file in {root} has the NAME {name!r}; the'
        f' names there are {names}.')
  chosen = [f for f in files if f.name == (name or names[0])]
  seen: dict[tuple[int, float], str] = {}
  for f in chosen:
    base = os.path.basename(f.path)
    _options.check_sigma_rel(f.sigma_rel, f'The sigma_rel of {base}')
    key = (f.step, f.sigma_rel)
    if key in seen:
      raise ValueError(
          f'{where}: {seen[key]} and {base} are both the snapshot of step'
          f' {f.step} and sigma_rel {f.sigma_rel:g}; keep one of them.')
    seen[key] = base
  trained = [f for f in chosen if f.step > 0]
  if not trained:
    raise ValueError(
        f'{where}: every snapshot in {root} is of step 0, saved before'
        ' training: none holds an average.')
  return sorted(trained, key=lambda f: (f.step, f.sigma_rel))


def _some(names: list[str], most: int = 5) -> str:
  shown = ', '.join(names[:most])
  return shown + (f' and {len(names) - most} more' if len(names) > most
                  else '')


class Read(NamedTuple):
  """The reconstructions, and the snapshot they are dated by."""
  results: list[FlatArrays]
  target: SnapshotFile  # the snapshot at the target step, the latest used
  metadata: dict[str, str] | None  # that file's safetensors metadata


def _header(safetensors: Any, path: str) -> tuple[dict[str, Any],
                                                  dict[str, str] | None]:
  """``{tensor name: (dtype, shape)}`` of a file, and its metadata."""
  with _safetensors.open_file(safetensors, path) as f:
    specs = {}
    for key in f.keys():
      view = f.get_slice(key)
      specs[key] = (view.get_dtype(), tuple(view.get_shape()))
    return specs, f.metadata()


def _same(specs: dict[str, Any], first: dict[str, Any], base: str,
          first_base: str, where: str) -> None:
  if specs == first:
    return
  missing = [k for k in first if k not in specs]
  extra = [k for k in specs if k not in first]
  differ = [f'{k} ({first[k][0]} {list(first[k][1])} against {specs[k][0]}'
            f' {list(specs[k][1])})' for k in first
            if k in specs and specs[k] != first[k]]
  what = '; '.join(
      text for text in (
          missing and f'it lacks {_some(missing)}',
          extra and f'it has {_some(extra)} besides',
          differ and f'dtypes or shapes differ: {_some(differ, 3)}') if text)
  raise ValueError(
      f'{where}: {base} does not hold the tensors of {first_base}: {what}.'
      ' All snapshots must hold the same tensors (names, dtypes, shapes);'
      ' reconstruct from the snapshots of one run.')


def read(directory: Any, targets: list[float], *, target_step: Any,
         name: str | None, progress: Callable[[list[str]], Iterable[str]]
         | None, where: str, name_arg: str = 'name=') -> Read:
  """The reconstruction of each width in ``targets``, reading each file once.
  """
  safetensors = _safetensors.module()
  files = snapshot_files(directory, name, where, name_arg)
  if target_step is not None:
    target_step = _options.check_int(target_step, 'target_step', 0,
                                     sys.maxsize)
  steps = np.array([f.step for f in files], np.float64)
  sigma_rels = np.array([f.sigma_rel for f in files], np.float64)
  weights, order, latest = _posthoc_solve.solve_targets(
      steps, sigma_rels, targets, target_step,
      ('snapshot steps', 'snapshot sigma_rels'))
  # Headers first (no arrays): a mismatch fails before anything is read.
  first: dict[str, Any] = {}
  metadata = None
  for k in order:
    specs, meta = _header(safetensors, files[k].path)
    if k == order[0]:
      first = specs
    _same(specs, first, os.path.basename(files[k].path),
          os.path.basename(files[order[0]].path), where)
    if k == latest:
      metadata = meta
  sums = [TreeSum() for _ in targets]
  index = {files[k].path: k for k in order}
  paths = list(index)
  for path in (progress(paths) if progress else paths):
    k = index[path]
    arrays = _safetensors.load_safetensors(path)
    for total, w in zip(sums, weights):
      total.add(arrays, float(w[k]), k == latest, os.path.basename(path))
    del arrays  # gone before the next file is read
  results = []
  for total in sums:
    result = total.result()
    results.append({key: result[key] for key in first})  # sorted by name
  return Read(results, files[latest], metadata)


def from_files(directory: str | os.PathLike[str], target_sigma_rel: Any, *,
               target_step: int | None = None, name: str | None = None,
               progress: Callable[[list[str]], Iterable[str]] | None = None
               ) -> FlatArrays | list[FlatArrays]:
  """Post-hoc EMA from snapshot files that any framework saved.

  ``directory`` holds one safetensors file per snapshot, named
  ``NAME-STEP-SIGMA.safetensors`` as EDM2 names its ``.pkl`` snapshots:
  ``NAME`` any prefix, ``STEP`` the number of optimizer steps (or images,
  any unit used throughout) the average had seen, an integer, and ``SIGMA``
  the ``sigma_rel`` of its power-function average, with a decimal point
  (``ema-0020000-0.050.safetensors``). Each file is a flat mapping of tensor
  names to arrays: what ``safetensors.torch.save_file(ema.state_dict(),
  ...)`` writes, or :func:`save_safetensors`. Files of step 0 (saved before
  training) hold no average and are left out.

  The weights come from :func:`emax.posthoc.coefficients` for each target;
  then the files up to ``target_step`` are read one at a time and added,
  weighted, into a float64 sum per target: host memory holds the sums (8
  bytes per param each) and one snapshot, whatever the number of snapshots;
  several targets cost one read of the files. Float tensors come back in
  their stored dtypes, rounded once from float64; other tensors (counters,
  integer buffers) are those of the snapshot at the target step. Needs
  safetensors (the ``safetensors`` extra), not torch.

  Args:
    directory: the folder of the snapshot files.
    target_sigma_rel: the width to reconstruct, or a sequence of widths.
    target_step: the ``STEP`` to reconstruct at, one of the files'; the
      latest by default. Later files are not read.
    name: the ``NAME`` of the snapshots to read, when the folder holds
      several.
    progress: wraps the list of the files read in the summing pass, e.g.
      ``tqdm.tqdm``, to show progress.

  Returns:
    ``{tensor name: np.ndarray}`` with the snapshots' names, dtypes and
    shapes, sorted by name; a list of them, one per target, when
    ``target_sigma_rel`` is a sequence. :func:`save_safetensors` writes one
    to a file.

  Raises:
    ImportError: if safetensors is not installed (the message names the
      extra).
    FileNotFoundError: if the directory does not exist or holds no snapshot
      file.
    ValueError: for anything :func:`emax.posthoc.coefficients` rejects; if a
      ``.safetensors`` file is not named ``NAME-STEP-SIGMA.safetensors``,
      the folder also holds Orbax checkpoint steps, holds several names and
      ``name`` is not given, two files are the same snapshot, or the files
      differ in their tensors' names, dtypes or shapes.

  Examples:
    Snapshots of two widths every 500 steps; a width that was tracked comes
    back as its own snapshot:

    >>> import tempfile
    >>> import numpy as np
    >>> import emax.posthoc
    >>> directory = tempfile.mkdtemp()
    >>> for step in (500, 1000):
    ...   for sigma_rel in (0.05, 0.10):
    ...     snapshot = {'w': np.full(2, step * sigma_rel, np.float32),
    ...                 'count': np.array(step)}
    ...     emax.posthoc.save_safetensors(
    ...         snapshot, f'{directory}/ema-{step}-{sigma_rel:.3f}.safetensors')
    >>> s10, s08 = emax.posthoc.from_files(directory, [0.10, 0.08])
    >>> s10
    {'count': array(1000), 'w': array([100., 100.], dtype=float32)}
    >>> s08['w'].round(2)
    array([87.21, 87.21], dtype=float32)
    >>> emax.posthoc.from_files(directory, 0.10, target_step=500)['w']
    array([50., 50.], dtype=float32)
  """
  targets, single = _posthoc_solve.targets(target_sigma_rel)
  results = read(directory, targets, target_step=target_step, name=name,
                 progress=progress, where='emax.posthoc.from_files').results
  return results[0] if single else results
