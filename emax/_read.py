"""Reading averages: the params to evaluate with, and what to log.

Every reader takes an :class:`emax.EmaState`, or any state that holds exactly
one (an optax state, the state of :func:`emax.with_ema`), and returns plain
trees shaped like the params, whatever the layout the average is stored in.
A state replicated by ``jax.pmap`` (a leading device axis on every array) is
read replica by replica and comes back with that axis.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from optax import Params

from emax import _layout
from emax import _numerics
from emax import _offload
from emax import _state
from emax import _tree
from emax._state import EmaState


def _replicated(state: EmaState) -> bool:
  """Whether ``state`` carries a leading ``pmap`` axis (``count`` not 0-d)."""
  return jnp.ndim(state.count) == 1


def _debiased(state: EmaState, name: Optional[str], where: str) -> Params:
  """One average, debiased, shaped like the params, in accumulator dtypes."""
  index = state.info.index(name, where)
  tree = _layout.read(_offload.to_device(state.average), index)
  weight = state.weight if index is None else state.weight[index]
  return jax.tree.map(
      lambda x: _numerics.debias(x, weight) if _tree.is_float(x)
      else _tree.copy_leaf(x), tree)


def _per_replica(fn: Any, state: EmaState) -> Any:
  if _replicated(state):
    return jax.vmap(fn)(state)
  return fn(state)


def bias_correction(state: Any, name: Optional[str] = None) -> Params:
  """The debiased average, in the accumulator dtypes it is stored in.

  The stored average divided by the weight it has gathered (``state.weight``),
  right for any sequence of decays; an average that started as a copy of the
  params has weight one and comes back unchanged, to the bit. Use it when you
  want the full accumulator precision; :func:`ema_params` gives the same
  values in the params' dtypes.

  Args:
    state: an :class:`emax.EmaState`, or any state holding exactly one.
    name: which named average (required when the state holds several).

  Returns:
    A tree shaped like the params, float leaves in their accumulator dtypes;
    fresh arrays.

  Raises:
    ValueError: if ``state`` holds no :class:`emax.EmaState` or several, or
      ``name`` is missing or unknown.

  Examples:
    >>> import jax.numpy as jnp, emax
    >>> state = emax.init({'w': jnp.zeros(())}, debias=True)
    >>> state = emax.update(state, {'w': jnp.array(2.0)}, 0.5)
    >>> state.average['w'], emax.bias_correction(state)['w']
    (Array(1., dtype=float32), Array(2., dtype=float32))
  """
  state = _state.find(state, 'emax.bias_correction')
  return _per_replica(
      lambda s: _debiased(s, name, 'emax.bias_correction'), state)


def ema_params(state: Any, name: Optional[str] = None) -> Params:
  """The averaged params to evaluate with.

  Debiased (for ``debias=True``), and in the dtypes of the params that were
  averaged: a bf16 param accumulated in float32 comes back as bf16. The
  arrays are fresh: donating the state afterwards does not invalidate them.
  Before the first averaging step of a ``debias=True`` average this is the
  params the average was started from.

  Args:
    state: an :class:`emax.EmaState`, or any state that holds exactly one:
      an optax state (inside ``chain``, ``masked``, ``MultiSteps``,
      ``inject_hyperparams``, named chains...), the state of
      :func:`emax.with_ema`. A state replicated by ``jax.pmap`` is read per
      replica and keeps its leading axis.
    name: which average, for a state holding named averages (optional when
      there is one).

  Returns:
    A tree shaped like the params.

  Raises:
    ValueError: if ``state`` holds no :class:`emax.EmaState` or several, or
      ``name`` is missing (several named averages) or unknown; the message
      lists the names.

  Examples:
    >>> import jax.numpy as jnp, emax
    >>> state = emax.init({'w': jnp.ones(2, jnp.bfloat16)}, debias=True)
    >>> state = emax.update(state, {'w': jnp.ones(2, jnp.bfloat16)}, 0.9)
    >>> emax.ema_params(state)
    {'w': Array([1, 1], dtype=bfloat16)}
  """
  state = _state.find(state, 'emax.ema_params')

  def read(s: EmaState) -> Params:
    tree = _debiased(s, name, 'emax.ema_params')
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [
        _tree.copy_leaf(x, dtype)
        for x, dtype in zip(leaves, s.info.param_dtypes)])

  return _per_replica(read, state)


def get_ema_state(state: Any) -> EmaState:
  """The one :class:`emax.EmaState` inside an optax (or any) state.

  Looks through any nesting of optax states (``chain``, ``named_chain``,
  ``masked``, ``MultiSteps``, ``inject_hyperparams``, dicts, lists) and the
  state of :func:`emax.with_ema`.

  Raises:
    ValueError: if ``state`` holds no :class:`emax.EmaState` (for example a
      checkpoint restored without a target, which gives plain dicts) or more
      than one.

  Examples:
    >>> import jax.numpy as jnp, optax, emax
    >>> tx = emax.with_ema(optax.adam(1e-3), 0.999)
    >>> emax.get_ema_state(tx.init({'w': jnp.zeros(3)})).count
    Array(0, dtype=int32)
  """
  return _state.find(state, 'emax.get_ema_state')


def _norm_sq(arrays: list[jax.Array]) -> jax.Array:
  total = jnp.zeros([], jnp.float32)
  for x in arrays:
    x = x.astype(_tree.promote(x.dtype, jnp.float32))
    total += jnp.sum(jnp.real(x * jnp.conj(x))).astype(jnp.float32)
  return total


def metrics(state: Any, params: Optional[Params] = None) -> dict[str, Any]:
  """Scalars to log every few steps: what the average(s) are doing.

  Cheap: without ``params`` it reads only scalars of the state; with them,
  one pass over the params and the averages for the distance. Jittable.

  Args:
    state: an :class:`emax.EmaState`, or any state holding exactly one.
    params: optional, the current params, for the distance.

  Returns:
    A flat dict of float32 scalars (int32 for counts): ``'count'`` and
    ``'skipped'`` (steps taken, steps skipped by the NaN guard), and per
    average ``'decay'`` (``1 - step size`` of the latest step that changed
    it), ``'window'`` (``1 / step size``, its effective length in steps,
    ``inf`` before any step), ``'weight'`` (the accumulated weight) and, with
    ``params``, ``'distance'``, ``||average - params|| / ||params||`` over all
    float leaves (debiased). For named averages the per-average keys are
    ``'decay/NAME'`` and so on.

  Examples:
    >>> import jax.numpy as jnp, emax
    >>> state = emax.init({'w': jnp.ones(2)})
    >>> state = emax.update(state, {'w': jnp.full(2, 3.0)}, 0.75)
    >>> m = emax.metrics(state, {'w': jnp.full(2, 3.0)})
    >>> float(m['decay']), float(m['window']), float(m['distance'])
    (0.75, 4.0, 0.5)
  """
  ema_state = _state.find(state, 'emax.metrics')
  info = ema_state.info
  names = info.names
  out: dict[str, Any] = {'count': ema_state.count,
                         'skipped': ema_state.skipped}
  suffixes = [''] if names is None else [f'/{n}' for n in names]
  if params is not None:  # the params' norm once, for every average
    params = _tree.as_arrays(params)
    norm = jnp.sqrt(_norm_sq([p for p in jax.tree.leaves(params)
                              if _tree.is_float(p)]))
    norm = jnp.where(norm > 0, norm, 1.0)
  for i, suffix in enumerate(suffixes):
    index = None if names is None else i
    c = ema_state.step_size if index is None else ema_state.step_size[index]
    out['decay' + suffix] = 1.0 - c
    out['window' + suffix] = jnp.where(c > 0, 1.0 / jnp.where(
        c > 0, c, 1.0), jnp.inf).astype(jnp.float32)
    out['weight' + suffix] = (ema_state.weight if index is None
                              else ema_state.weight[index])
    if params is not None:
      average = _debiased(ema_state, None if names is None else names[i],
                          'emax.metrics')
      diffs = [a - p.astype(a.dtype) for a, p in zip(
          jax.tree.leaves(average), jax.tree.leaves(params))
               if _tree.is_float(a)]
      out['distance' + suffix] = jnp.sqrt(_norm_sq(diffs)) / norm
  return out

