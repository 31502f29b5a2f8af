"""Starting an average late: ``emax.checkpoint.restore(start_average=True)``.

A run that trained without an average and saved checkpoints, then resumes
with one (``tx=emax.with_ema(opt, ...)``, or ``optax.chain(opt, emax.ema(...))``)
restores into a state whose tree the checkpoint does not hold: the
optimizer's state moved (into :class:`emax.WithEmaState`, or into a chain's
tuple) and the averages are new. :func:`restore` maps every array of the
checkpoint to its place in ``like`` by taking the averages out of ``like``
(:func:`_without_averages`), reads the arrays alone with Orbax's partial
restore, each into ``like``'s sharding, and starts every average from the
restored params as :func:`emax.init` would have.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import numpy as np

from emax import _batch_stats
from emax import _checkpoint_files
from emax import _restored
from emax import _state
from emax import _step
from emax import _stored_tree
from emax._bema import BemaState
from emax._state import EmaState
from emax._transform import WithEmaState

OPTION = 'start_average=True'



def stored_tree(manager: _checkpoint_files.Manager, step: int,
                reader: _checkpoint_files.Reader) -> tuple[Any, Any]:
  """The item directory of ``step`` and its saved tree (metadata only);
  ``(None, None)`` where the step's folder is not named by its step."""
  _, found = _checkpoint_files.finished_steps(manager, 'emax.checkpoint.restore')
  if step not in found:  # a manager with its own step names: Orbax alone
    return None, None
  item_dir = _checkpoint_files.item_directory(found[step], None, step)
  return item_dir, reader.stored(item_dir, step)


def check(stored: Any, target: Any, step: int, start_average: bool) -> bool:
  """Whether the averages of ``target`` must be started (the checkpoint has
  none); raises where the checkpoint and ``target`` disagree on averages."""
  if stored is None:
    return False
  # Averages held as emax states, or as their fields (an nnx.State).
  in_like = [list(p) for p, _ in _restored.found_states(_as_stored(target))]
  in_checkpoint = [list(p) for p, _ in _restored.found_states(stored)]
  where = f'emax.checkpoint.restore (step {step})'
  if in_checkpoint and not in_like:
    raise ValueError(
        f'{where}: the checkpoint holds an emax average (at'
        f' {in_checkpoint}) but like holds none. {OPTION} starts an average'
        ' that a checkpoint lacks; it cannot drop one. Restore into a state'
        ' built with the average (the same tx, e.g. emax.with_ema(opt,'
        ' decay)), or read the params alone with emax.checkpoint.average('
        f'manager, steps=[{step}]) and the average with'
        ' emax.checkpoint.read_average.')
  if in_like and not in_checkpoint:
    if not _state.all_states(target):
      raise ValueError(
          f'{where}: like holds an emax average (at {in_like}) as plain'
          ' arrays, as an nnx.State holds an optimizer\'s state, and the'
          f' checkpoint holds none. {OPTION} starts the averages of optax'
          ' states (emax.WithEmaState, a chain). With Flax NNX, restore the'
          ' checkpoint into the model and old = nnx.Optimizer(model, opt,'
          ' wrt=...), built with the opt the run trained with; then build'
          ' new = nnx.Optimizer(model, emax.with_ema(opt, decay), wrt=...),'
          ' whose average starts from the restored params, and give it the'
          ' restored state: new.opt_state = new.opt_state._replace('
          'inner_state=old.opt_state); new.step.value = old.step.value.')
    if not start_average:
      raise ValueError(
          f'{where}: like holds an emax average but the checkpoint holds'
          ' none (it was saved by a run without one). To start the average'
          f' from the restored params, pass {OPTION}.')
    return True
  return False


def _as_stored(tree: Any) -> Any:
  """``tree`` as nested dicts keyed as a checkpoint stores it (no arrays
  copied), for :func:`emax._restored.found_states`."""
  out: dict[Any, Any] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [_stored_tree.stored_key(k) for k in path]
    if not keys:
      return leaf
    node = out
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = leaf
  return out


_AVERAGES = (EmaState, BemaState)
"""The states of an averaging transformation: what a chain's tuple loses."""


def _is_average(node: Any) -> bool:
  return isinstance(node, _AVERAGES)


def _averages_only(node: Any) -> bool:
  """Whether ``node`` is the state of an averaging transformation: an
  average's state, or a wrapper of one (``optax.masked(emax.ema(...))``'s
  ``MaskedState``, ``optax.inject_hyperparams(emax.ema)``'s state, whose
  own arrays start as ``like`` holds them)."""
  if _is_average(node):
    return True
  inner = getattr(node, 'inner_state', None)
  if inner is not None and not isinstance(node, WithEmaState):
    return _averages_only(inner)  # optax.inject_hyperparams(emax.ema)
  inside = jax.tree.leaves(node, is_leaf=_is_average)
  return bool(inside) and all(_is_average(x) for x in inside)


def _is_chain(node: Any) -> bool:
  return type(node) is tuple and any(_averages_only(c) for c in node)


def _without_averages(tree: Any, unwrap: bool) -> Any:
  """``tree`` as the optimizer without its averages keeps it.

  A :class:`WithEmaState` becomes its ``inner_state``; an
  :class:`EmaState` in a chain's tuple (alone, or in a wrapper that adds no
  array, as ``optax.masked``'s) leaves the tuple (with ``unwrap``, a
  tuple left with one entry becomes that entry: ``chain(opt, ema)`` after
  ``opt``); any other :class:`EmaState` (or BEMA state) becomes ``None``.
  """
  def special(x: Any) -> bool:
    return isinstance(x, WithEmaState) or _is_average(x) or _is_chain(x)

  def drop(x: Any) -> Any:
    if isinstance(x, WithEmaState):
      return _without_averages(x.inner_state, unwrap)
    if _is_average(x):
      return None
    if _is_chain(x):
      kept = tuple(_without_averages(c, unwrap) for c in x
                   if not _averages_only(c))
      return kept[0] if unwrap and len(kept) == 1 else kept
    return x

  return jax.tree.map(drop, tree, is_leaf=special)


def _placed(stored: Any, indices: Any, step: int
            ) -> list[tuple[tuple[Any, ...], int]]:
  """``[(stored path, index of like's leaf)]`` for every saved array.

  Tries the chain's tuple kept and unwrapped; raises if neither is the
  checkpoint's tree.
  """
  saved = {_stored_tree.path_key(p): p
           for p, _ in _stored_tree.flatten(stored)}
  for unwrap in (False, True):
    flat = jax.tree_util.tree_flatten_with_path(
        _without_averages(indices, unwrap))[0]
    placed = {_stored_tree.path_key(path): i for path, i in flat}
    if placed.keys() == saved.keys():
      return [(saved[k], i) for k, i in placed.items()]
  missing = sorted(set(placed) - set(saved))[:3]
  extra = sorted(set(saved) - set(placed))[:3]
  raise ValueError(
      f'emax.checkpoint.restore (step {step}): the checkpoint is not like'
      f' without its averages, so {OPTION} cannot place its arrays. like'
      f' without averages has {[list(k) for k in missing]} that the'
      f' checkpoint lacks, and the checkpoint has {[list(k) for k in extra]}'
      ' that it lacks. Build like with the optimizer the run trained with'
      ' (emax.with_ema(opt, ...) or optax.chain(opt, emax.ema(...)) around'
      ' the same opt).')


def _params_for(path: tuple[Any, ...]) -> str:
  """Where the params of the average at ``path`` (a like path) are."""
  first = _stored_tree.stored_key(path[0]) if path else None
  return 'batch_stats' if first == _batch_stats.STATE_FIELD else 'params'


def _field(tree: Any, name: str, step: int) -> Any:
  if isinstance(tree, dict) and name in tree:
    return tree[name]
  if hasattr(tree, name):
    return getattr(tree, name)
  raise ValueError(
      f'emax.checkpoint.restore (step {step}): {OPTION} starts each average'
      f' from the restored {name!r} (an attribute or key at the top of the'
      f' state, as in a TrainState or {{"params": ..., "opt_state": ...}}),'
      f' but like ({type(tree).__name__}) has no {name!r}. Keep the params'
      f' under {name!r} at the top of the state, in the checkpoint and in'
      ' like alike.')


def _started(abstract: EmaState, params: Any) -> EmaState:
  """The state :func:`emax.init` gives ``params``, in ``abstract``'s layout."""
  zeros = jax.tree.map(  # host memory kinds too (offload=True)
      lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding),
      abstract)
  copied = _step.reset(zeros, params, where='emax.checkpoint.restore')
  return _state.fresh(copied.average, abstract.info, abstract.weight.shape)


def restore(item_dir: Any, stored: Any, like: Any, target: Any, step: int,
            reader: _checkpoint_files.Reader) -> Any:
  """The checkpoint's arrays in ``target``'s places, averages started.

  ``target`` is :func:`emax.checkpoint.abstract_state` of ``like``. What
  neither the checkpoint nor an average's start gives (the arrays of a
  wrapper around an average, as ``optax.inject_hyperparams``'s) is
  ``like``'s own value.
  """
  leaves, treedef = jax.tree.flatten(target)
  counter = itertools.count()
  indices = jax.tree.unflatten(treedef, [next(counter) for _ in leaves])
  placed = _placed(stored, indices, step)
  is_state = lambda x: isinstance(x, EmaState)  # noqa: E731
  averages = [  # (an average's indices, those of the params it starts from)
      (node, _field(indices, _params_for(path), step))
      for path, node in jax.tree_util.tree_flatten_with_path(
          indices, is_leaf=is_state)[0] if is_state(node)]
  values = reader.read(item_dir, stored, [p for p, _ in placed],
                       [getattr(leaves[i], 'sharding', None)
                        for _, i in placed])
  out: list[Any] = [None] * len(leaves)
  for (path, i), value in zip(placed, values):
    want = leaves[i]
    if tuple(np.shape(value)) != tuple(want.shape):
      raise ValueError(
          f'emax.checkpoint.restore (step {step}): the array at {list(path)}'
          f' has shape {np.shape(value)} in the checkpoint but'
          f' {tuple(want.shape)} in like.')
    out[i] = value.astype(want.dtype) if value.dtype != want.dtype else value

  for node, params_at in averages:
    params = jax.tree.map(lambda i: out[i], params_at)
    abstract = jax.tree.map(lambda i: leaves[i], node)
    started = _started(abstract, params)
    for i, x in zip(jax.tree.leaves(node), jax.tree.leaves(started)):
      out[i] = x
  left = [i for i, x in enumerate(out) if x is None]
  if left:
    given = jax.tree.leaves(like)
    for i in left:
      if isinstance(given[i], jax.ShapeDtypeStruct):
        path = jax.tree_util.tree_flatten_with_path(target)[0][i][0]
        raise ValueError(
            f'emax.checkpoint.restore (step {step}): {OPTION} starts'
            f' {jax.tree_util.keystr(path)}, which belongs to the state around'
            ' an average and is not in the checkpoint, from like; like is'
            ' abstract there. Pass the freshly built state as like, not its'
            ' abstract_state or jax.eval_shape.')
      out[i] = given[i]
  return jax.tree.unflatten(treedef, out)

