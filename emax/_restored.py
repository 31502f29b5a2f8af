"""How a restored dict is read: :func:`emax.checkpoint.read_average`.

A checkpoint restored without a target gives plain dicts and lists: an
:class:`emax.EmaState` becomes a dict with the keys ``count``, ``average``,
``weight``, ``step_size`` and ``skipped``. This module finds such dicts in a
restored tree (:func:`found_states`, :func:`pick`), works out from the dict,
from what the save recorded (:mod:`emax._checkpoint_record`) and from
``like`` how to read one (:class:`Plan`: names, dtypes, tree, layout), and
reads an average the way :func:`emax.ema_params` would: debiased as
:func:`emax.bias_correction` debiases, in the params' dtypes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union, cast

import jax
import jax.numpy as jnp
import numpy as np
from optax import Params

from emax import _checkpoint_record
from emax import _stored_tree
from emax._read import bias_correction
from emax._read import ema_params
from emax._state import EmaState

STATE_KEYS = ('count', 'average', 'weight', 'step_size', 'skipped')
_TARGET_HINT = (
    ' Pass like= the abstract state, e.g. like=jax.eval_shape(tx.init,'
    ' params) or emax.checkpoint.abstract_state(a freshly built state), or'
    ' restore with a target: emax.checkpoint.restore(manager, like).')

_Found = tuple[tuple[Any, ...], Any]  # (path in the tree, state dict)


def read_average(restored: Any, *, name: Optional[Union[str, int]],
                 like: Any, path: Optional[Sequence[Union[str, int]]],
                 metadata: Any) -> Params:
  """:func:`emax.checkpoint.read_average`; see its docstring."""
  where = 'emax.checkpoint.read_average'
  chosen_path, node = pick(found_states(restored), path, restored, where)
  if isinstance(node, EmaState):
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
      names = node.info.names or ()
      name = names[name] if 0 <= name < len(names) else name
    # An index out of range stays an int: ema_params names the averages.
    return ema_params(node, cast(Optional[str], name))
  plan = Plan(node, chosen_path, like=like,
              recorded=_checkpoint_record.recorded(metadata), where=where)
  if plan.like_state is not None:
    state = pour(node, plan.like_state, where)
    return ema_params(state, plan.name_at(plan.index(name, where)))
  leaves, _ = debiased(node, plan, plan.index(name, where), where)
  return plan.shape([_cast(x, d) for x, d in zip(leaves, plan.dtypes)])


def found_states(tree: Any) -> list[_Found]:
  """``[(path, node)]``: every dict shaped like an EmaState, or EmaState."""
  found: list[_Found] = []

  def walk(node: Any, path: tuple[Any, ...]) -> None:
    if isinstance(node, EmaState):
      found.append((path, node))
    elif isinstance(node, dict):
      if set(STATE_KEYS) <= set(node):
        found.append((path, node))
        return
      for key, child in node.items():
        walk(child, path + (key,))
    elif isinstance(node, (list, tuple)):
      for i, child in enumerate(node):
        walk(child, path + (i,))

  walk(tree, ())
  return found


def _describe_top(tree: Any) -> str:
  if isinstance(tree, dict):
    return f'its top-level keys were {sorted(map(str, tree))}'
  if isinstance(tree, (list, tuple)):
    return f'it was a {type(tree).__name__} of length {len(tree)}'
  return f'it was {_stored_tree.describe(tree)}'


def pick(found: list[_Found], path: Optional[Sequence[Union[str, int]]],
         tree: Any, where: str) -> _Found:
  """The one found state at ``path`` (or the only one)."""
  if not found:
    raise ValueError(
        f'{where}: found no dict with keys {"/".join(STATE_KEYS)} (an'
        f' emax.EmaState restored without a target); {_describe_top(tree)}.'
        ' Pass the state that holds the average (the whole restored'
        ' checkpoint, or its opt_state).')
  if path is not None:
    path = (path,) if isinstance(path, (str, int)) else tuple(path)
    hit = _stored_tree.first_at(found, path)
    if hit is not None:
      return hit
    raise ValueError(
        f'{where}: no average at path {list(path)}; the averages are at'
        f' {[list(p) for p, _ in found]}.')
  if len(found) > 1:
    raise ValueError(
        f'{where}: found {len(found)} averages, at'
        f' {[list(p) for p, _ in found]}; pass path= the one to read, e.g.'
        f' path={list(found[0][0])}.')
  return found[0]


def _is_inexact(x: Any) -> bool:
  dtype = x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype
  return bool(jnp.issubdtype(dtype, jnp.inexact))


def _stored_layout(average: Any) -> str:
  """The layout a restored ``average`` dict looks like it was stored in."""
  if isinstance(average, dict):
    keys = set(average)
    if keys == {'buffers', 'rest'}:
      return 'packed'
    if keys == {'leaves'} and any(
        jnp.issubdtype(getattr(x, 'dtype', np.int8), jnp.unsignedinteger)
        for _, x in _stored_tree.flatten(average)):
      return 'offloaded'
  return 'plain'


class Plan:
  """How to read the averages of one restored EmaState dict.

  Attributes:
    names: the names of the averages, or None (unknown, or a single one).
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
               like: Any, recorded: Optional[list[dict[str, Any]]],
               where: str) -> None:
    self.path = path
    self.treedef: Any = None
    self.like_state: Optional[EmaState] = None
    self._average = node['average']  # its structure (arrays or metadata)
    entry = _checkpoint_record.entry_at(recorded, path)
    info = node.get('info') if isinstance(node.get('info'), dict) else None
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
    names: Optional[tuple[str, ...]] = None
    if info is not None and info.get('names') is not None:
      names = tuple(info['names'])
    elif entry is not None and entry.get('names') is not None:
      names = tuple(entry['names'])
    layout = entry['layout'] if entry else _stored_layout(node['average'])
    like_state, params_like = _like_parts(like, path, where)
    if like_state is not None:
      self.like_state = like_state
      names = like_state.info.names
    elif layout != 'plain':
      raise ValueError(
          f'{where}: the average at {list(path)} was stored {layout}'
          f' ({"pack=True" if layout == "packed" else "offload=True"}): where'
          ' each param sits in it is static and is not in the checkpoint.'
          + _TARGET_HINT)
    if names is not None and len(names) != self.count:
      raise ValueError(
          f'{where}: the average at {list(path)} holds {self.count}'
          f' averages but its names are {list(names)}.')
    self.names = names
    stored = _stored_tree.flatten(node['average'])
    self.dtypes: list[Optional[np.dtype]] = [None] * len(stored)
    if params_like is not None:
      leaves, treedef = jax.tree.flatten(params_like)
      if len(leaves) != len(stored):
        raise ValueError(
            f'{where}: like has {len(leaves)} leaves but the average at'
            f' {list(path)} has {len(stored)}. Pass the params the average'
            ' was made of (or their jax.eval_shape), or the abstract state.')
      self.dtypes = [np.dtype(getattr(x, 'dtype', np.asarray(x).dtype))
                     for x in leaves]
      self.treedef = treedef
    elif entry is not None and entry.get('param_paths') is not None:
      by_path = {tuple(map(str, p)): d for p, d in zip(
          entry['param_paths'], entry['param_dtypes'])}
      self.dtypes = [_dtype(by_path.get(tuple(map(str, p))))
                     for p, _ in stored]
    elif info is not None and info.get('param_dtypes') is not None:
      dtypes = info['param_dtypes']
      if len(dtypes) == len(stored):
        self.dtypes = [_dtype(d) for d in dtypes]

  def index(self, name: Optional[Union[str, int]],
            where: str) -> Optional[int]:
    """The position of average ``name`` (None for a single, unstacked one)."""
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
          ' with emax.checkpoint.save to record them). Pass an index 0 to'
          f' {self.count - 1} instead: the averages are in the order given'
          ' to emax.ema.')
    if name not in self.names:
      raise ValueError(
          f'{where}: no average named {name!r}; the state holds'
          f' {list(self.names)}.')
    return self.names.index(name)

  def name_at(self, index: Optional[int]) -> Optional[str]:
    """The name of the average at ``index`` (None: unnamed or unknown)."""
    return None if index is None or self.names is None else self.names[index]

  def shape(self, leaves: Sequence[Any]) -> Params:
    """``leaves`` (stored order) as the params: ``like``'s tree or stored."""
    if self.treedef is not None:
      return jax.tree.unflatten(self.treedef, leaves)
    return _stored_tree.rebuild(self._average, leaves)


def _dtype(name: Optional[str]) -> Optional[np.dtype]:
  return None if name is None else jnp.dtype(name)


def _like_parts(like: Any, path: tuple[Any, ...], where: str
                ) -> tuple[Optional[EmaState], Any]:
  """``(abstract EmaState or None, params-like tree or None)`` of ``like``."""
  if like is None:
    return None, None
  flat, _ = jax.tree_util.tree_flatten_with_path(
      like, is_leaf=lambda x: isinstance(x, EmaState))
  states = [(tuple(_stored_tree.stored_key(k) for k in p), x) for p, x in flat
            if isinstance(x, EmaState)]
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


def pour(node: dict[str, Any], like_state: EmaState, where: str) -> EmaState:
  """The stored leaves of ``node`` as an EmaState shaped like ``like_state``."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(like_state)
  leaves = []
  for keypath, spec in flat:
    value: Any = node
    try:
      for key in keypath:
        value = _stored_tree.child(value, _stored_tree.stored_key(key))
    except KeyError:
      raise ValueError(
          f'{where}: the restored average has no'
          f' {jax.tree_util.keystr(keypath)}, which like has: like is not'
          ' the state that was saved (check pack=, offload=, the names and'
          ' the params).') from None
    shape = tuple(getattr(spec, 'shape', np.shape(spec)))
    if tuple(np.shape(value)) != shape:
      raise ValueError(
          f'{where}: {jax.tree_util.keystr(keypath)} has shape'
          f' {tuple(np.shape(value))} in the checkpoint but {shape} in like:'
          ' like is not the state that was saved.')
    leaves.append(jnp.asarray(value))
  return jax.tree.unflatten(treedef, leaves)


def _debias(x: Any, weight: Any) -> Any:
  """The rule of :func:`emax.bias_correction`: ``average / weight``.

  A weight of 1 (an average that started as a copy) or 0 (``debias=True``
  before its first averaging step, which still holds the initial params)
  leaves the stored value as it is, to the bit; any other weight divides,
  in the stored (accumulator) dtype.
  """
  w = float(weight)
  if w in (0.0, 1.0):
    return x
  if isinstance(x, jax.Array):
    return x / jnp.asarray(w, x.dtype)
  x = np.asarray(x)
  return x / np.asarray(w, x.dtype)


def debiased(node: dict[str, Any], plan: Plan, index: Optional[int],
             where: str) -> tuple[list[Any], Any]:
  """One average of ``node``, debiased, in its accumulator dtypes.

  Returns:
    The leaves, in the order of the params' leaves, and the params' treedef
    when the average is poured into ``plan.like_state`` (else None: the
    leaves are in the stored order, for :meth:`Plan.shape`).
  """
  if plan.like_state is not None:
    tree = bias_correction(pour(node, plan.like_state, where),
                           plan.name_at(index))
    leaves, treedef = jax.tree.flatten(tree)
    return leaves, treedef
  weight = node['weight'] if index is None else node['weight'][index]
  out = []
  for _, x in _stored_tree.flatten(node['average']):
    if _is_inexact(x):
      x = _debias(x if index is None else x[index], weight)
    out.append(x)
  return out, None


def _cast(x: Any, dtype: Optional[np.dtype]) -> Any:
  if dtype is None or not _is_inexact(x):
    return x
  return x.astype(dtype)
