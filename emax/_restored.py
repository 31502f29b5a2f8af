"""How a restored dict is read: :func:`emax.checkpoint.read_average`.

A checkpoint restored without a target gives plain dicts and lists: an
:class:`emax.EmaState` becomes a dict with the keys ``count``, ``average``,
``weight``, ``step_size`` and ``skipped``. This module finds such dicts in a
restored tree (:func:`found_states`, :func:`pick`), works out from the dict,
from what the save recorded (:mod:`emax._checkpoint_record`) and from
``like`` how to read one (:class:`Plan`: names, dtypes, tree, layout), and
reads an average the way :func:`emax.ema_params` would: debiased as
:func:`emax.ema_params` debiases, in the params' dtypes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from optax import Params

from emax import _checkpoint_record
from emax import _stored_tree
from emax._read import ema_params
from emax._state import EmaState
from emax._state import StateInfo

STATE_KEYS = ('count', 'average', 'weight', 'step_size', 'skipped')
_TARGET_HINT = (
    ' Pass like= the abstract state, e.g. like=jax.eval_shape(tx.init,'
    ' params) or emax.checkpoint.abstract_state(a freshly built state), or'
    ' restore with a target: emax.checkpoint.restore(manager, like).')

_Found = tuple[tuple[Any, ...], Any]  # (path in the tree, state dict)


def read_average(restored: Params, *, name: str | int | None = None,
                 like: Params | None = None,
                 path: Sequence[str | int] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> Params:
  """The average in a checkpoint restored without a target, to evaluate with.

  A checkpoint restored without a target (``manager.restore(step)`` with no
  ``args``, ``ocp.args.StandardRestore()``, or
  ``flax.serialization.msgpack_restore``) gives plain dicts and lists: the
  :class:`emax.EmaState` is a dict with the keys ``count``, ``average``,
  ``weight``, ``step_size`` and ``skipped``, wherever it sat (in an optax
  chain's list, under ``opt_state``, under ``ema_state`` of
  :func:`emax.with_ema`). This finds it and returns the average as
  :func:`emax.ema_params` would have: debiased and in the params' dtypes.

  Debiasing follows :func:`emax.ema_params`: the stored average divided
  by its ``weight``, in the stored dtype; a weight of exactly 1 (an average
  that started as a copy) or 0 (``debias=True`` before its first averaging
  step, which still holds the initial params) gives the stored value itself.
  The division happens where the arrays are: NumPy arrays (flax
  serialization) are divided by NumPy, correctly rounded; ``jax.Array``
  leaves (Orbax) on their devices, as :func:`emax.ema_params` divides
  (XLA on CPU rounds about a third of the quotients one ulp away from the
  correctly rounded one).

  What the dicts lose comes back from what the save recorded, the one
  description of the stored average: the ``metadata`` that
  :func:`emax.checkpoint.save` wrote, or the ``'info'`` that flax
  serialization stores in the state dict. It gives the names of the
  averages in their stored order (an average is read by its recorded name,
  whatever order ``like`` lists the names in), the params' dtypes (a bf16
  param averaged in float32 comes back as bf16) and, from ``save``, the
  layout. Without a record, ``like`` gives the names and dtypes; without
  either, pick an average by its index (``name=0``, ``1``..., in the order
  the mapping given to :func:`emax.ema` listed them); it comes back in its
  stored dtype. Where each param sits in a ``pack=True`` or
  ``offload=True`` average is saved nowhere: those need ``like``.

  To read a state restored with a target (:func:`emax.checkpoint.restore`),
  use :func:`emax.ema_params`.

  Args:
    restored: the restored tree, or any part of it holding the average.
    name: which named average: a name, or an index in the stored order.
    like: the abstract state, such as ``jax.eval_shape(tx.init, params)`` or
      :func:`emax.checkpoint.abstract_state` of a freshly built state
      (needed for packed and offloaded averages; it gives the params' own
      tree types, and the names and dtypes where nothing was recorded); or
      a tree shaped like the params (arrays or ``jax.ShapeDtypeStruct``),
      for their tree types (and dtypes where none were recorded).
    path: where the average sits in ``restored`` (keys from the root, e.g.
      ``('opt_state', 1)``), when it holds several (an ``EmaTrainState`` that
      also averages ``batch_stats``).
    metadata: what Orbax gives for the step, ``manager.metadata(step)`` or
      its ``custom_metadata``: what :func:`emax.checkpoint.save` recorded.

  Returns:
    A tree shaped like the params: the stored dicts and lists (flax
    serialization's ``'0'``, ``'1'``... keys for tuples stay), or ``like``'s
    tree types when ``like`` is given; arrays of the restored kind (NumPy
    for flax serialization, ``jax.Array`` for Orbax), or what
    :func:`emax.ema_params` returns when ``like`` is a state.

  Raises:
    ValueError: if no (or more than one, without ``path``) average is found
      (the message says what the tree held), the average found is already
      an :class:`emax.EmaState`, ``name`` is missing, unknown or out of
      range, the average is packed or offloaded and ``like`` is missing, or
      ``like`` does not fit the checkpoint (other names than the record's,
      another layout, other shapes).

  Examples:
    A flax-serialized state, restored without a target; the names and bf16
    dtype come back from the saved ``'info'``:

    >>> import flax.serialization, jax.numpy as jnp, optax, emax
    >>> import emax.checkpoint
    >>> params = {'w': jnp.ones(2, jnp.bfloat16)}
    >>> tx = emax.with_ema(optax.sgd(0.1), {'fast': 0.5, 'slow': 0.9})
    >>> opt_state = tx.init(params)
    >>> _, opt_state = tx.update({'w': jnp.ones(2, jnp.bfloat16)}, opt_state,
    ...                          params)
    >>> raw = flax.serialization.msgpack_restore(
    ...     flax.serialization.to_bytes({'params': params,
    ...                                  'opt_state': opt_state}))
    >>> fast = emax.checkpoint.read_average(raw, name='fast')
    >>> print(type(raw), fast['w'].dtype, fast['w'])
    <class 'dict'> bfloat16 [0.949219 0.949219]
  """
  where = 'emax.checkpoint.read_average'
  chosen_path, node = pick(found_states(restored), path, restored, where)
  if isinstance(node, EmaState):
    raise ValueError(
        f'{where}: the average at {list(chosen_path)} is an emax.EmaState'
        ' already (restored with a target): read it with'
        ' emax.ema_params(state, name).')
  plan = Plan(node, chosen_path, like=like,
              recorded=_checkpoint_record.recorded(metadata), where=where)
  if plan.like_state is not None:
    state = pour(node, plan.like_state, where)
    return ema_params(state, plan.like_name(plan.index(name, where)))
  leaves, _ = debiased(node, plan, plan.index(name, where), where)
  return plan.shape([_cast(x, d) for x, d in zip(leaves, plan.dtypes)])


def found_states(tree: Any) -> list[_Found]:
  """``[(path, node)]``: every dict shaped like an EmaState, or EmaState.

  An EmaState found is returned too, so that the caller can say that it is
  typed already.
  """
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


def pick(found: list[_Found], path: Sequence[str | int] | None,
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
    if params_like is not None:
      leaves, treedef = jax.tree.flatten(params_like)
      if len(leaves) != len(stored):
        raise ValueError(
            f'{where}: like has {len(leaves)} leaves but the average at'
            f' {list(path)} has {len(stored)}. Pass the params the average'
            ' was made of (or their jax.eval_shape), or the abstract state.')
      if record is None:
        self.dtypes = [np.dtype(getattr(x, 'dtype', np.asarray(x).dtype))
                       for x in leaves]
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
    """``leaves`` (stored order) as the params: ``like``'s tree or stored."""
    if self.treedef is not None:
      return jax.tree.unflatten(self.treedef, leaves)
    return _stored_tree.rebuild(self._average, leaves)


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
          _is_inexact(x) or not jnp.issubdtype(d, jnp.inexact)
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
      by_path = {tuple(map(str, p)): d
                 for p, d in zip(self.param_paths, self.param_dtypes)}
      return [by_path.get(tuple(map(str, p))) for p, _ in stored]
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
  """The rule of :func:`emax.ema_params`: ``average / weight``.

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


def debiased(node: dict[str, Any], plan: Plan, index: int | None,
             where: str) -> tuple[list[Any], Any]:
  """One average of ``node``, debiased, in its accumulator dtypes.

  Returns:
    The leaves, in the order of the params' leaves, and the params' treedef
    when the average is poured into ``plan.like_state`` (else None: the
    leaves are in the stored order, for :meth:`Plan.shape`).
  """
  if plan.like_state is not None:
    tree = ema_params(pour(node, plan.like_state, where),
                      plan.like_name(index), dtypes='accumulator')
    leaves, treedef = jax.tree.flatten(tree)
    return leaves, treedef
  weight = node['weight'] if index is None else node['weight'][index]
  out = []
  for _, x in _stored_tree.flatten(node['average']):
    if _is_inexact(x):
      x = _debias(x if index is None else x[index], weight)
    out.append(x)
  return out, None


def _cast(x: Any, dtype: np.dtype | None) -> Any:
  if dtype is None or not _is_inexact(x):
    return x
  return x.astype(dtype)
