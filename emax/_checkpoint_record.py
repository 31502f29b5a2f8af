"""What a save records: the static parts of each average, as JSON.

A checkpoint holds arrays. What else is needed to read an average back
without a target (where each :class:`emax.EmaState` sits in the tree, the
names of its averages, the params' dtypes and paths, ``debias``, its layout)
and to rebuild other widths after training (the ``sigma_rel`` of each
power-function average) is static: :func:`save` writes it into the step's
``custom_metadata`` under :data:`METADATA_KEY`, and :func:`recorded` reads it
back.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import jax
import numpy as np
from optax import Params

from emax import _checkpoint_files
from emax import _layout
from emax import _offload
from emax._posthoc_solve import SIGMA_REL_MAX
from emax._state import EmaState
from emax._stored_tree import same_path
from emax._stored_tree import stored_key

METADATA_KEY = 'emax'
"""The key of emax's record in a step's ``custom_metadata``."""

_FORMAT = 1


def save(manager: Any, step: int, state: Params, *,
         sigma_rels: Any = None, wait: bool = True, **kwargs: Any) -> bool:
  """Saves ``state`` at ``step``; by default returns once it is on disk.

  Runs ``manager.save(step, args=ocp.args.StandardSave(state), **kwargs)``
  and then, with ``wait=True``, ``manager.wait_until_finished()``. When it
  returns, the checkpoint is complete and committed under its final name: a
  manager opened afterwards, in this process or another, lists it in
  ``all_steps()``, and the script may exit. A save interrupted before that
  (an exception, a kill) leaves the earlier checkpoints as they were; see the
  module docstring for what Orbax guarantees.

  What a checkpoint cannot hold, it records. The static parts of every
  :class:`emax.EmaState` in ``state`` (where it sits in the tree, the names
  of its averages, the params' dtypes, ``debias``, its layout) and the
  ``sigma_rels`` given here go into the step's custom metadata, under the
  key ``'emax'`` (JSON, a few hundred bytes, next to any
  ``custom_metadata`` you pass). :func:`emax.checkpoint.read_average` and
  :func:`emax.posthoc.from_checkpoints` read it; Orbax's own restores, and
  :func:`emax.checkpoint.restore` and :func:`emax.checkpoint.average`, ignore it. A state without an
  average saves exactly as before.

  Args:
    manager: an ``orbax.checkpoint.CheckpointManager``.
    step: the step to save under.
    state: any pytree of arrays: a train state, ``{'params': ...,
      'opt_state': ...}``, an :class:`emax.EmaState`.
    sigma_rels: the widths of the power-function averages in ``state``, for
      post-hoc EMA (:mod:`emax.posthoc`): the mapping given to
      :func:`emax.ema` (``{name: emax.power_function_decay(sigma_rel=...)}``:
      each schedule knows its ``sigma_rel``), or ``{name: sigma_rel}`` (a
      subset of the names is fine: other averages get none); for a single
      unnamed average, one number or schedule. ``None``: record none.
    wait: ``True`` (the default): block until the checkpoint is written and
      committed, also when the manager saves asynchronously (Orbax's
      default); earlier asynchronous saves of the manager finish too.
      ``False``: return as soon as Orbax lets training go on (after the
      arrays are copied off the devices) while the files are written in
      background threads. The checkpoint is then **not** safely written when
      this returns: call ``manager.wait_until_finished()`` or
      ``manager.close()`` (or leave the manager's ``with`` block) before the
      process exits, or the checkpoint is lost, and expect an interrupted
      background save to leave only a temporary directory.
    **kwargs: passed on to ``manager.save``: ``metrics``, ``force``,
      ``custom_metadata`` (a dict; the key ``'emax'`` is emax's).

  Returns:
    Whether the manager saved: ``False`` when its policy skips ``step``
    (``save_interval_steps``, a step not after its latest one); with
    ``wait=True`` the pending saves are written even then.

  Raises:
    TypeError: if ``wait`` is not a bool, or ``sigma_rels`` holds a schedule
      without a ``sigma_rel`` (only :func:`emax.power_function_decay` has
      one) or something that is not a number.
    ValueError: if ``sigma_rels`` names an average ``state`` does not hold,
      a width is outside ``(0, 1/sqrt(12))``, or ``custom_metadata`` already
      has the key ``'emax'``.
    ImportError: if orbax-checkpoint is not installed.

  Examples:
    >>> import tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> import emax.checkpoint
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   with ocp.CheckpointManager(directory) as manager:
    ...     emax.checkpoint.save(manager, 1, {'w': jnp.ones(2)})
    ...   ocp.CheckpointManager(directory).latest_step()
    True
    1

    With two power-function averages, record their widths for
    :func:`emax.posthoc.from_checkpoints`:

    >>> import optax, emax
    >>> decays = {'s05': emax.power_function_decay(sigma_rel=0.05),
    ...           's10': emax.power_function_decay(sigma_rel=0.10)}
    >>> tx = emax.with_ema(optax.sgd(0.1), decays)
    >>> state = {'params': {'w': jnp.ones(2)}}
    >>> state['opt_state'] = tx.init(state['params'])
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   with ocp.CheckpointManager(directory) as manager:
    ...     _ = emax.checkpoint.save(manager, 1, state, sigma_rels=decays)
    ...     record = manager.metadata(1).custom_metadata['emax']
    >>> [(a['path'], a['names'], a['sigma_rels']) for a in record['averages']]
    [(['opt_state', 'ema_state'], ['s05', 's10'], [0.05, 0.1])]
  """
  ocp = _checkpoint_files.orbax()
  if not isinstance(wait, bool):
    raise TypeError(
        f'wait must be True or False, got {wait!r} ({type(wait).__name__}).'
        ' Pass wait=False only to keep training while the checkpoint is'
        ' written, and then call manager.wait_until_finished() before the'
        ' process exits.')
  record = _record(state, sigma_rels)
  if record is not None:
    custom = kwargs.get('custom_metadata')
    if custom is None:
      custom = {}
    if not isinstance(custom, dict):
      raise TypeError(
          f'custom_metadata must be a dict, got {type(custom).__name__}.')
    if METADATA_KEY in custom:
      raise ValueError(
          f'custom_metadata has the key {METADATA_KEY!r}, which'
          ' emax.checkpoint.save fills with what it records about the'
          ' averages. Use another key for your own metadata.')
    kwargs['custom_metadata'] = {**custom, METADATA_KEY: record}
  saved = manager.save(step, args=ocp.args.StandardSave(state), **kwargs)
  if wait:
    manager.wait_until_finished()
  return bool(saved)


def _is_ema_state(x: Any) -> bool:
  return isinstance(x, EmaState)


def _layout_name(average: Any) -> str:
  """``'plain'``, ``'packed'`` (``pack=True``) or ``'offloaded'``."""
  if isinstance(average, _offload.OffloadedTree):
    return 'offloaded'
  if isinstance(average, _layout.PackedTree):
    return 'packed'
  return 'plain'


def width_of(value: Any, where: str) -> float:
  """A width as a float: a number, or a schedule's ``sigma_rel``."""
  if callable(value) and not isinstance(value, (jax.Array, np.ndarray)):
    if not isinstance(getattr(value, 'sigma_rel', None), numbers.Real):
      raise TypeError(
          f'{where}: {value!r} has no sigma_rel; only'
          ' emax.power_function_decay schedules do (post-hoc EMA needs'
          ' power-function averages). Give the width as a number, or leave'
          ' this average out.')
    value = value.sigma_rel
  if isinstance(value, bool) or not isinstance(
      value, (numbers.Real, np.number, np.ndarray, jax.Array)) or getattr(
          value, 'ndim', 0) != 0:
    raise TypeError(f'{where} must be a number or a power_function_decay'
                    f' schedule, got {value!r}.')
  value = float(value)
  if not 0 < value < SIGMA_REL_MAX:
    raise ValueError(
        f'{where} is {value}, but a power-function average has sigma_rel in'
        f' (0, {SIGMA_REL_MAX:.4f}); typical values are 0.05 to 0.15.')
  return value


def _widths(names: Optional[tuple[str, ...]], sigma_rels: Any,
            where: str) -> tuple[list[Optional[float]], set[str]]:
  """One width (or None) per average of a state, and the keys used."""
  count = 1 if names is None else len(names)
  if sigma_rels is None:
    return [None] * count, set()
  if isinstance(sigma_rels, dict) or hasattr(sigma_rels, 'keys'):
    if names is None:
      return [None], set()
    used = [n for n in names if n in sigma_rels]
    return ([width_of(sigma_rels[n], f'{where}[{n!r}]') if n in sigma_rels
             else None for n in names], set(used))
  if isinstance(sigma_rels, (list, tuple)):
    if names is None or len(sigma_rels) != count:
      return [None] * count, set()
    return [None if s is None else width_of(s, f'{where}[{i}]')
            for i, s in enumerate(sigma_rels)], {'*'}
  if names is not None:
    return [None] * count, set()
  return [width_of(sigma_rels, where)], {'*'}


def _record(state: Any, sigma_rels: Any) -> Optional[dict[str, Any]]:
  """What :func:`save` records about the averages in ``state`` (or None)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state,
                                                 is_leaf=_is_ema_state)
  averages: list[dict[str, Any]] = []
  used: set[str] = set()
  for path, x in flat:
    if not _is_ema_state(x):
      continue
    info = x.info
    names = None if info.names is None else list(info.names)
    widths, keys = _widths(info.names, sigma_rels, 'sigma_rels')
    used |= keys
    layout = _layout_name(x.average)
    param_paths = None
    if layout == 'plain':
      param_paths = [[stored_key(k) for k in p] for p, _ in
                     jax.tree_util.tree_flatten_with_path(x.average)[0]]
    averages.append({
        'path': [stored_key(k) for k in path],
        'names': names,
        'debias': bool(info.debias),
        'layout': layout,
        'param_dtypes': [str(np.dtype(d)) for d in info.param_dtypes],
        'param_paths': param_paths,
        'sigma_rels': widths if any(w is not None for w in widths) else None,
    })
  if sigma_rels is not None:
    if not averages:
      raise ValueError(
          'sigma_rels was given, but the state holds no emax.EmaState to'
          ' record it for. Save the state that holds the averages (e.g.'
          ' {"params": params, "opt_state": opt_state}).')
    named = [a['names'] for a in averages if a['names'] is not None]
    if isinstance(sigma_rels, dict) or hasattr(sigma_rels, 'keys'):
      unknown = sorted(set(map(str, sigma_rels)) - used)
      if unknown:
        raise ValueError(
            f'sigma_rels names {unknown}, but the averages in the state are'
            f' named {named or "nothing (a single unnamed average)"}. Give'
            ' one entry per named average, e.g. the mapping given to'
            ' emax.ema.')
    elif not used:
      raise ValueError(
          f'sigma_rels={sigma_rels!r} fits no average in the state: a single'
          ' number or schedule is for a single unnamed average, a sequence'
          ' for named ones (one per name, in order); these are named'
          f' {named}. Give a mapping {{name: sigma_rel}}.')
  if not averages:
    return None
  return {'format': _FORMAT, 'averages': averages}


def recorded(metadata: Any) -> Optional[list[dict[str, Any]]]:
  """The list of recorded averages in ``metadata``, or None."""
  if metadata is None:
    return None
  metadata = getattr(metadata, 'custom_metadata', metadata)
  if not isinstance(metadata, dict):
    raise TypeError(
        'metadata must be what Orbax gives for a step:'
        ' manager.metadata(step) or its .custom_metadata dict; got'
        f' {type(metadata).__name__}.')
  record = metadata.get(METADATA_KEY, metadata)
  if not isinstance(record, dict) or 'averages' not in record:
    return None
  if record.get('format') != _FORMAT:
    raise ValueError(
        f'The checkpoint\'s emax record has format {record.get("format")!r};'
        f' this emax reads format {_FORMAT}. Upgrade emax.')
  return record['averages']


def check_names(recorded_averages: Optional[list[dict[str, Any]]],
                like: Any, where: str) -> None:
  """Refuses a target whose averages are named otherwise than the record.

  A restore with a target reads the stored arrays by position: averages
  saved as ``('fast', 'slow')`` restored into a state built as ``('slow',
  'fast')`` would come back under each other's names.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(like, is_leaf=_is_ema_state)
  for keypath, x in flat:
    if not _is_ema_state(x):
      continue
    path = tuple(stored_key(k) for k in keypath)
    entry = entry_at(recorded_averages, path)
    if entry is None:
      continue
    saved = None if entry.get('names') is None else tuple(entry['names'])
    if saved == x.info.names:
      continue
    def show(names: Optional[tuple[str, ...]]) -> str:
      return 'one unnamed average' if names is None else f'{list(names)}'
    raise ValueError(
        f'{where}: the averages at {list(path)} were saved as {show(saved)},'
        f' in that order, but like holds {show(x.info.names)}. A restore'
        ' reads the arrays by position, so they would come back under each'
        ' other\'s names. Build like as the run was built (the mapping given'
        f' to emax.ema with the names in the order {show(saved)}), or read'
        ' one average by its name with emax.checkpoint.read_average('
        'manager.restore(step, args=ocp.args.StandardRestore()), name=...,'
        ' metadata=manager.metadata(step)).')


def entry_at(recorded_averages: Optional[list[dict[str, Any]]],
             path: tuple[Any, ...]) -> Optional[dict[str, Any]]:
  """The recorded entry of the average at ``path``, or None."""
  for entry in recorded_averages or ():
    if same_path(entry.get('path'), path):
      return entry
  return None
