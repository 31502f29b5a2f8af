"""How to read one restored average: what the save recorded, and ``like``.

A restored :class:`emax.EmaState` dict (see :mod:`emax._restored`) holds
arrays; how to read them comes from elsewhere: the record that
:func:`emax.checkpoint.save` wrote into the step's metadata (or the
``'info'`` that flax serialization stores), and ``like``. :class:`Plan`
combines the two into one description: the names, the dtypes, the tree to
return, and the state to pour packed or offloaded leaves into.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from optax import Params

from emax import _checkpoint_record
from emax import _stored_tree
from emax._state import EmaState
from emax._state import StateInfo

_TARGET_HINT = (
    ' Pass like= the abstract state, e.g. like=jax.eval_shape(tx.init,'
    ' params) or emax.checkpoint.abstract_state(a freshly built state), or'
    ' restore with a target: emax.checkpoint.restore(manager, like).')


def is_inexact(x: Any) -> bool:
  dtype = x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype
  return bool(jnp.issubdtype(dtype, jnp.inexact))


class Plan:
  """How to read the averages of one restored EmaState dict.

  What the save recorded is the one description of the stored average: the
  entry that :func:`emax.checkpoint.save` wrote into the step's metadata, or
  the ``'info'`` that flax serialization stores with the state. ``like``
  gives the tree types, and for packed or offloaded averages the layout; it
  never renames what the record names. Without a record, ``like`` is all
  there is (names, dtypes); without either, the average is read as a plain
  tree in its stored dtypes, by index.

  Attributes:
    names: the names of the averages in stored order, or None (unknown, or
      a single one).
    count: how many averages it holds (1 for a single, unstacked one).
    stacked: whether float leaves have a leading axis, one per average.
    dtypes: per stored leaf of the average (``_stored_tree.flatten``
      order), the params' dtype; None where unknown (the stored dtype is
      kept).
    treedef: the params' treedef to return, or None (the stored structure).
    like_state: the abstract EmaState to pour the stored leaves into
      (packed, offloaded, or ``like`` given as a state), or None.
  """

  def __init__(self, node: dict[str, Any], path: tuple[Any, ...], *,
               like: Any, recorded: list[dict[str, Any]] | None,
               where: str) -> None:
    self.path = path
    self.treedef: Any = None
    self._average = node['average']  # its structure (arrays or metadata)
    weight = node['weight']
    shape = tuple(getattr(weight, 'shape', np.shape(weight)))
    count_shape = tuple(getattr(node['count'], 'shape', ()))
    if count_shape:
      raise ValueError(
          f'{where}: the average at {list(path)} has a count of shape'
          f' {count_shape}: it was saved replicated (jax.pmap), one copy per'
          ' device. Read one replica:'
          ' jax.tree.map(lambda x: x[0], restored).')
    self.stacked = len(shape) == 1
    self.count = shape[0] if self.stacked else 1
    record = _Record.of(node, path, recorded)
    self.like_state, params_like = _like_parts(like, path, where)
    if record is not None:
      self.names = record.names
      if self.like_state is not None:
        _same_names(record.names, self.like_state.info.names, path, where)
    else:
      self.names = (None if self.like_state is None
                    else self.like_state.info.names)
    if self.names is not None and len(self.names) != self.count:
      raise ValueError(
          f'{where}: the average at {list(path)} holds {self.count}'
          f' averages but its names are {list(self.names)}.')
    # The params' dtypes, one per params leaf (the like_state route).
    self.param_dtypes: list[Any] | None = (
        list(record.param_dtypes) if record is not None else
        None if self.like_state is None else
        list(self.like_state.info.param_dtypes))
    stored = _stored_tree.flatten(node['average'])
    if self.like_state is None and record is not None:
      record.check_plain(stored, path, where)
    self.dtypes: list[np.dtype | None] = [None] * len(stored)
    if record is not None:
      self.dtypes = record.dtypes(stored)
    # Where each of like's leaves is stored (None: outside a mask).
    self._stored_count = len(stored)
    self.order: list[int | None] = list(range(len(stored)))
    if params_like is not None:
      flat, treedef = jax.tree_util.tree_flatten_with_path(params_like)
      self.order = _order(flat, stored, path, where)
      if record is None:
        for (_, x), j in zip(flat, self.order):
          if j is not None:
            self.dtypes[j] = np.dtype(getattr(x, 'dtype',
                                              np.asarray(x).dtype))
      self.treedef = treedef

  def index(self, name: str | int | None,
            where: str) -> int | None:
    """The stored position of average ``name`` (None: a single one)."""
    if not self.stacked:
      if name is not None and name != 0:
        raise ValueError(
            f'{where}: the average at {list(self.path)} is a single, unnamed'
            f' average; got name={name!r}. Read it without a name.')
      return None
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
      if not 0 <= name < self.count:
        raise ValueError(
            f'{where}: name={name} is out of range: the state holds'
            f' {self.count} averages (indices 0 to {self.count - 1}).')
      return int(name)
    if name is None:
      if self.count == 1:
        return 0
      listed = (f'named {list(self.names)}' if self.names is not None else
                f'whose names were not saved (pass an index 0 to'
                f' {self.count - 1}, in the order given to emax.ema)')
      raise ValueError(
          f'{where}: the state holds {self.count} averages, {listed}; say'
          f' which one with name=.')
    if self.names is None:
      raise ValueError(
          f'{where}: got name={name!r}, but the names of the'
          f' {self.count} averages were not saved (Orbax drops them; save'
          ' with emax.checkpoint.save and pass metadata=, to read them by'
          f' name). Pass an index 0 to {self.count - 1} instead: the'
          ' averages are in the order given to emax.ema.')
    if name not in self.names:
      raise ValueError(
          f'{where}: no average named {name!r}; the state holds'
          f' {list(self.names)}.')
    return self.names.index(name)

  def like_name(self, index: int | None) -> str | None:
    """The name under which ``like_state`` holds stored position ``index``.

    The stored leaves are poured into ``like_state`` by position, so stored
    average ``index`` sits where ``like_state`` names its ``index``-th one,
    whatever name the record gives it.
    """
    assert self.like_state is not None
    names = self.like_state.info.names
    return None if index is None or names is None else names[index]

  def shape(self, leaves: Sequence[Any]) -> Params:
    """``leaves`` (stored order) as the params: ``like``'s tree or stored.

    In ``like``'s tree each leaf goes to its own path (a named tuple or a
    dataclass stores its fields by sorted name, and flattens in field
    order); a leaf outside the average's mask is ``None``.
    """
    if self.treedef is not None:
      return jax.tree.unflatten(
          self.treedef, [None if j is None else leaves[j] for j in self.order])
    return _stored_tree.rebuild(self._average, leaves)

  def like_order(self, values: Sequence[Any]) -> list[Any]:
    """One value per stored leaf, as the leaves of :meth:`shape`'s tree
    (``None`` leaves left out) are ordered."""
    return [values[j] for j in self.order if j is not None]

  def stored_order(self, values: Sequence[Any]) -> list[Any]:
    """The inverse of :meth:`like_order`."""
    out: list[Any] = [None] * self._stored_count
    for j, value in zip([j for j in self.order if j is not None], values):
      out[j] = value
    return out


class _Record:
  """What a save recorded about one average: names, dtypes, layout."""

  def __init__(self, info: StateInfo,
               param_paths: Sequence[Sequence[Any]] | None,
               layout: str | None) -> None:
    self.names = info.names
    self.param_dtypes = list(info.param_dtypes)
    self.param_paths = param_paths
    self.layout = layout  # None: not recorded (flax serialization's info)

  @classmethod
  def of(cls, node: dict[str, Any], path: tuple[Any, ...],
         recorded: list[dict[str, Any]] | None) -> _Record | None:
    """The record of the average at ``path``: the save's, or flax's info."""
    entry = _checkpoint_record.entry_at(recorded, path)
    if entry is not None:
      return cls(StateInfo(entry['param_dtypes'], entry.get('names'),
                           entry['debias']),
                 entry.get('param_paths'), entry['layout'])
    info = node.get('info')  # what flax serialization stores of StateInfo
    if isinstance(info, dict) and set(StateInfo._fields) <= set(info):
      return cls(StateInfo(*(info[f] for f in StateInfo._fields)), None, None)
    return None

  def check_plain(self, stored: list[tuple[tuple[Any, ...], Any]],
                  path: tuple[Any, ...], where: str) -> None:
    """Refuses a packed or offloaded average, which needs ``like``."""
    layout = self.layout
    if layout is None:  # no layout recorded: the leaves must fit the params
      fits = len(stored) == len(self.param_dtypes) and all(
          is_inexact(x) or not jnp.issubdtype(d, jnp.inexact)
          for (_, x), d in zip(stored, self.param_dtypes))
      layout = 'plain' if fits else 'packed or offloaded'
    if layout == 'plain':
      return
    how = {'packed': 'pack=True', 'offloaded': 'offload=True'}.get(
        layout, 'pack=True or offload=True')
    raise ValueError(
        f'{where}: the average at {list(path)} was stored {layout} ({how}):'
        ' where each param sits in it is static and is not in the'
        ' checkpoint.' + _TARGET_HINT)

  def dtypes(self, stored: list[tuple[tuple[Any, ...], Any]]
             ) -> list[np.dtype | None]:
    """The params' dtype of each stored leaf (None where not recorded)."""
    if self.param_paths is not None:
      by_path = {_stored_tree.path_key(p): d
                 for p, d in zip(self.param_paths, self.param_dtypes)}
      return [by_path.get(_stored_tree.path_key(p)) for p, _ in stored]
    if len(self.param_dtypes) == len(stored):
      return list(self.param_dtypes)
    return [None] * len(stored)


def _same_names(recorded: tuple[str, ...] | None,
                like: tuple[str, ...] | None, path: tuple[Any, ...],
                where: str) -> None:
  """``like`` must hold the recorded averages (in any order)."""
  if recorded == like or (recorded is not None and like is not None
                          and sorted(recorded) == sorted(like)):
    return
  def show(names: tuple[str, ...] | None) -> str:
    return 'a single unnamed average' if names is None else str(list(names))
  raise ValueError(
      f'{where}: the average at {list(path)} was saved holding'
      f' {show(recorded)}, but like holds {show(like)}: like is not the'
      ' state that was saved. Build like with the averages the run had.')


def _like_parts(like: Any, path: tuple[Any, ...], where: str
                ) -> tuple[EmaState | None, Any]:
  """``(abstract EmaState or None, params-like tree or None)`` of ``like``."""
  if like is None:
    return None, None
  states = _checkpoint_record.states_at(like)
  if not states:
    return None, like
  if len(states) == 1:
    return states[0][1], None
  hit = _stored_tree.first_at(states, path)
  if hit is not None:
    return hit[1], None
  raise ValueError(
      f'{where}: like holds {len(states)} averages, at'
      f' {[list(p) for p, _ in states]}, none at {list(path)}.')


def _order(flat: list[tuple[Any, Any]], stored: list[tuple[tuple[Any, ...],
                                                          Any]],
           path: tuple[Any, ...], where: str) -> list[int | None]:
  """For each leaf of ``like`` (``flat``), the index of its stored leaf.

  By path where every stored leaf has one in ``like`` (leaves of ``like``
  not stored are outside the average's mask: ``None``); else by position,
  where the counts agree.
  """
  at = {_stored_tree.path_key(p): j for j, (p, _) in enumerate(stored)}
  keys = [_stored_tree.path_key(p) for p, _ in flat]
  if set(at) <= set(keys) and len(set(keys)) == len(keys):
    return [at.get(k) for k in keys]
  if len(flat) == len(stored):
    return list(range(len(stored)))
  raise ValueError(
      f'{where}: like has {len(flat)} leaves but the average at'
      f' {list(path)} has {len(stored)}, at other paths. Pass the params the'
      ' average was made of (or their emax.checkpoint.abstract_state), or'
      ' the abstract state.')
