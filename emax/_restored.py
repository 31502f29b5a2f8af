"""How a restored dict is read: :func:`emax.checkpoint.read_average`.

A checkpoint restored without a target gives plain dicts and lists: an
:class:`emax.EmaState` becomes a dict with the keys ``count``, ``average``,
``weight``, ``step_size`` and ``skipped``. This module finds such dicts in a
restored tree (:func:`found_states`, :func:`pick`), works out from the dict,
plans with :mod:`emax._restore_plan` how to read one (names, dtypes, tree,
layout) from what the save recorded and from ``like``, and reads an average
the way :func:`emax.ema_params` would: debiased as :func:`emax.ema_params`
debiases, in the params' dtypes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from optax import Params

from emax import _checkpoint_record
from emax import _restore_plan
from emax import _stored_tree
from emax._read import ema_params
from emax._state import EmaState

STATE_KEYS = ('count', 'average', 'weight', 'step_size', 'skipped')

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
  plan = _restore_plan.Plan(node, chosen_path, like=like,
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


def debiased(node: dict[str, Any], plan: _restore_plan.Plan,
             index: int | None, where: str) -> tuple[list[Any], Any]:
  """One average of ``node``, debiased, in its accumulator dtypes.

  Returns:
    The leaves, in the order of the params' leaves, and the params' treedef
    when the average is poured into ``plan.like_state`` (else None: the
    leaves are in the stored order, for :meth:`emax._restore_plan.Plan.shape`).
  """
  if plan.like_state is not None:
    tree = ema_params(pour(node, plan.like_state, where),
                      plan.like_name(index), dtypes='accumulator')
    leaves, treedef = jax.tree.flatten(tree)
    return leaves, treedef
  weight = node['weight'] if index is None else node['weight'][index]
  out = []
  for _, x in _stored_tree.flatten(node['average']):
    if _restore_plan.is_inexact(x):
      x = _debias(x if index is None else x[index], weight)
    out.append(x)
  return out, None


def _cast(x: Any, dtype: np.dtype | None) -> Any:
  if dtype is None or not _restore_plan.is_inexact(x):
    return x
  return x.astype(dtype)
