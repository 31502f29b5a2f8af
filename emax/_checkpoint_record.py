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

from collections.abc import Sequence
import numbers
from typing import Any

import jax
import numpy as np
from optax import Params

from emax import _checkpoint_files
from emax import _layout
from emax import _offload
from emax import _options
from emax._state import EmaState
from emax._stored_tree import same_path
from emax._stored_tree import stored_key

METADATA_KEY = 'emax'
"""The key of emax's record in a step's ``custom_metadata``."""

_FORMAT = 1


def save(manager: _checkpoint_files.Manager, step: int, state: Params, *,
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
  :class:`emax.EmaState` in ``state`` (where it sits in the tree, the names of
  its averages, the params' dtypes, ``debias``, its layout) and the
  ``sigma_rels`` given here go into the step's custom metadata, under the key
  ``'emax'`` (JSON, a few hundred bytes, next to any ``custom_metadata`` you
  pass). :func:`emax.checkpoint.read_average` and
  :func:`emax.posthoc.from_checkpoints` read it; Orbax's own restores, and
  :func:`emax.checkpoint.restore` and :func:`emax.checkpoint.average`, ignore
  it. A state without an average saves exactly as before.

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


def states_at(tree: Any) -> list[tuple[tuple[Any, ...], EmaState]]:
  """Every :class:`emax.EmaState` in ``tree``, with its path as Orbax stores it.

  The path is a tuple of keys (``str`` for dict keys and fields, ``int`` for
  list positions), as :func:`save` records it.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_ema_state)
  return [(tuple(stored_key(k) for k in p), x) for p, x in flat
          if _is_ema_state(x)]


def _layout_name(average: Any) -> str:
  """``'plain'``, ``'packed'`` (``pack=True``) or ``'offloaded'``."""
  if isinstance(average, _offload.OffloadedTree):
    return 'offloaded'
  if isinstance(average, _layout.PackedTree):
    return 'packed'
  return 'plain'


def width_of(value: Any, where: str) -> float:
  """A width as a float: a number, or a power-function schedule's."""
  if callable(value) and not isinstance(value, (jax.Array, np.ndarray)):
    if not isinstance(getattr(value, 'sigma_rel', None), numbers.Real):
      raise TypeError(
          f'{where}: {value!r} has no sigma_rel; only'
          ' emax.power_function_decay schedules do (post-hoc EMA needs'
          ' power-function averages). Give the width as a number, or leave'
          ' this average out.')
    value = value.sigma_rel
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Real, np.ndarray, jax.Array)):
    raise TypeError(f'{where} must be a number or a power_function_decay'
                    f' schedule, got {value!r}.')
  return _options.check_sigma_rel(value, where)


def _is_mapping(sigma_rels: Any) -> bool:
  return hasattr(sigma_rels, 'keys')


def _is_sequence(sigma_rels: Any) -> bool:
  return isinstance(sigma_rels, (list, tuple)) or (
      isinstance(sigma_rels, np.ndarray) and sigma_rels.ndim > 0)


def widths(sigma_rels: Any, names: Sequence[str] | None, count: int,
           what: str, arg: str = 'sigma_rels') -> list[float | None]:
  """One width (None: not a snapshot) per average of one state.

  The one reading of ``sigma_rels`` as a user gives it: ``{name: sigma_rel
  or power-function schedule}`` for named averages (a subset of the names),
  a sequence with one entry per average in stored order (``None`` leaves one
  out), or one number or schedule for a single average.

  Args:
    sigma_rels: as above.
    names: the averages' names, or None (a single one, or not recorded).
    count: how many averages the state holds.
    what: the averages, for messages (``'the 2 averages at [...]'``).
    arg: the argument's name, for messages (``'--tracked'`` on the command
      line).

  Raises:
    ValueError: if ``sigma_rels`` does not fit the averages, names one
      they do not have, or gives none a width.
    TypeError: for a schedule without a ``sigma_rel``, or a non-number.
  """
  named = f', named {list(names)}' if names is not None else ''
  if _is_mapping(sigma_rels):
    if names is None:
      raise ValueError(
          f'{arg} gives widths by name, but the names of {what} were not'
          f' saved. Give one width per average instead, in the order given'
          ' to emax.ema (None for an average to leave out).')
    unknown = [k for k in sigma_rels if k not in names]
    if unknown:
      raise ValueError(f'{arg} names {unknown}; {what} are named'
                       f' {list(names)}.')
    result = [width_of(sigma_rels[n], f'{arg}[{n!r}]') if n in sigma_rels
              else None for n in names]
  elif _is_sequence(sigma_rels):
    if len(sigma_rels) != count:
      raise ValueError(
          f'{arg} has {len(sigma_rels)} entries for {what}{named}; give one'
          ' per average (None for one to leave out).')
    result = [None if s is None else width_of(s, f'{arg}[{i}]')
              for i, s in enumerate(sigma_rels)]
  else:
    if count != 1:
      raise ValueError(
          f'{arg}: one sigma_rel for {what}{named}; give one per average:'
          ' {name: sigma_rel}, or a sequence in order.')
    result = [width_of(sigma_rels, arg)]
  if all(w is None for w in result):
    raise ValueError(f'{arg} gives no average a width.')
  return result


def _record(state: Any, sigma_rels: Any) -> dict[str, Any] | None:
  """What :func:`save` records about the averages in ``state`` (or None)."""
  states = states_at(state)
  if sigma_rels is not None and not states:
    raise ValueError(
        'sigma_rels was given, but the state holds no emax.EmaState to'
        ' record it for. Save the state that holds the averages (e.g.'
        ' {"params": params, "opt_state": opt_state}).')
  recorded_widths = _widths_by_state(states, sigma_rels)
  averages: list[dict[str, Any]] = []
  for (path, x), state_widths in zip(states, recorded_widths):
    info = x.info
    layout = _layout_name(x.average)
    param_paths = None
    if layout == 'plain':
      param_paths = [[stored_key(k) for k in p] for p, _ in
                     jax.tree_util.tree_flatten_with_path(x.average)[0]]
    averages.append({
        'path': list(path),
        'names': None if info.names is None else list(info.names),
        'debias': bool(info.debias),
        'layout': layout,
        'param_dtypes': [str(np.dtype(d)) for d in info.param_dtypes],
        'param_paths': param_paths,
        'sigma_rels': state_widths,
    })
  if not averages:
    return None
  return {'format': _FORMAT, 'averages': averages}


def _widths_by_state(states: list[tuple[tuple[Any, ...], EmaState]],
                     sigma_rels: Any) -> list[list[Any] | None]:
  """The widths to record for each state (None: none), via :func:`widths`.

  A mapping may name the averages of several states; a number (or a
  schedule) is for the one unnamed average.
  """
  if sigma_rels is None:
    return [None] * len(states)
  names = [x.info.names for _, x in states]
  if _is_mapping(sigma_rels):
    every = [n for state_names in names for n in state_names or ()]
    unknown = sorted(set(map(str, sigma_rels)) - set(every))
    if unknown:
      raise ValueError(
          f'sigma_rels names {unknown}, but the averages in the state are'
          f' named {[list(n) for n in names if n is not None] or "nothing"}.'
          ' Give'
          ' one entry per named average, e.g. the mapping given to'
          ' emax.ema.')
    return [widths({k: v for k, v in sigma_rels.items() if k in n}, n,
                   len(n), f'the averages at {list(path)}')
            if n is not None and any(k in n for k in sigma_rels) else None
            for (path, _), n in zip(states, names)]
  unnamed = [k for k, n in enumerate(names) if n is None]
  if len(unnamed) != 1:
    raise ValueError(
        f'sigma_rels={sigma_rels!r} names no average: only a single unnamed'
        f' average takes a width without a name, and the state holds'
        f' {len(unnamed) or "no"} unnamed averages; the named ones are'
        f' {[list(n) for n in names if n is not None]}. Give a mapping'
        ' {name: sigma_rel}, e.g. the mapping given to emax.ema.')
  out: list[list[Any] | None] = [None] * len(states)
  out[unnamed[0]] = widths(sigma_rels, None, 1,
                           f'the average at {list(states[unnamed[0]][0])}')
  return out


def recorded(metadata: Any) -> list[dict[str, Any]] | None:
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


def in_recorded_order(recorded_averages: list[dict[str, Any]] | None,
                      like: Any, where: str) -> Any:
  """``like`` with each average's names in the order the save recorded.

  A restore with a target reads the stored arrays by position. Averages
  saved as ``('fast', 'slow')`` and restored into a state built as
  ``('slow', 'fast')`` would come back under each other's names; with the
  target's names put in the recorded order, each array comes back under its
  own name (a step matches rates to averages by name, in any order).

  Raises:
    ValueError: if ``like`` holds other names than the record (the message
      shows both).
  """
  def show(names: tuple[str, ...] | None) -> str:
    return 'one unnamed average' if names is None else f'{list(names)}'

  order: dict[tuple[Any, ...], tuple[str, ...]] = {}
  for path, x in states_at(like):
    entry = entry_at(recorded_averages, path)
    if entry is None:
      continue
    saved = None if entry.get('names') is None else tuple(entry['names'])
    if saved == x.info.names:
      continue
    if saved is None or x.info.names is None or sorted(saved) != sorted(
        x.info.names):
      raise ValueError(
          f'{where}: the averages at {list(path)} were saved as'
          f' {show(saved)}, but like holds {show(x.info.names)}. Build like'
          ' as the run was built (the averages it saved), or read one'
          ' average with emax.checkpoint.read_average(manager.restore(step,'
          ' args=ocp.args.StandardRestore()), name=...,'
          ' metadata=manager.metadata(step)).')
    order[path] = saved
  if not order:
    return like

  def renamed(keypath: Any, x: Any) -> Any:
    path = tuple(stored_key(k) for k in keypath)
    if not _is_ema_state(x) or path not in order:
      return x
    return x._replace(info=x.info._replace(names=order[path]))

  return jax.tree_util.tree_map_with_path(renamed, like,
                                          is_leaf=_is_ema_state)


def entry_at(recorded_averages: list[dict[str, Any]] | None,
             path: tuple[Any, ...]) -> dict[str, Any] | None:
  """The recorded entry of the average at ``path``, or None."""
  for entry in recorded_averages or ():
    if same_path(entry.get('path'), path):
      return entry
  return None
