"""Reading averages: the params to evaluate with, and what to log.

Every reader takes an :class:`emax.EmaState`, or any state that holds exactly
one (an optax state, the state of :func:`emax.with_ema`), and returns plain
trees shaped like the params, whatever the layout the average is stored in.
A state replicated by ``jax.pmap`` (a leading device axis on every array) is
read replica by replica and comes back with that axis.
"""

from __future__ import annotations

from typing import Callable, Literal, TypeVar

import jax
import jax.numpy as jnp
from optax import Params

from emax import _layout
from emax import _numerics
from emax import _offload
from emax import _options
from emax import _state
from emax import _tree
from emax._state import EmaState
from emax._state import StateLike

Dtypes = Literal['params', 'accumulator']
"""Which dtypes a reader returns: the params' or the accumulators'."""
_DTYPES = ('params', 'accumulator')

T = TypeVar('T')


def _replicated(state: EmaState) -> bool:
  """Whether ``state`` carries a leading ``pmap`` axis (``count`` not 0-d)."""
  return jnp.ndim(state.count) == 1


def _debiased(state: EmaState, index: int | None) -> Params:
  """Average ``index``, debiased, shaped like the params, accumulator dtypes."""
  tree = _layout.read(_offload.to_device(state.average), index)
  weight = state.weight if index is None else state.weight[index]
  return jax.tree.map(
      lambda x: _numerics.debias(x, weight) if _tree.is_float(x)
      else _tree.copy_leaf(x), tree)


def _per_replica(fn: Callable[[EmaState], T], state: EmaState) -> T:
  if _replicated(state):
    return jax.vmap(fn)(state)
  return fn(state)


def read(state: StateLike, name: str | None, *, where: str,
         dtypes: Dtypes = 'params', name_hint: str = '',
         params: Params | None = None, fill: bool = False) -> Params:
  """The one reader behind :func:`ema_params` and the flax readers.

  ``where`` is the caller's public name, for error messages; the name is
  looked up by ``StateInfo.position``, whoever reads. ``name_hint``
  ends the message of a missing or unknown name (how this caller takes one).
  With ``fill``, the leaves outside a mask are taken from ``params``
  (required then); without, they stay ``optax.MaskedNode``.
  """
  if not isinstance(dtypes, str) or dtypes not in _DTYPES:
    raise ValueError(
        f"{where}: dtypes must be 'params' (the averaged params in the"
        " params' dtypes, to evaluate with) or 'accumulator' (the same"
        ' values in the dtypes the average is accumulated in, full'
        f' precision); got {dtypes!r}.')
  ema_state = _state.find(state, where)
  try:
    index = ema_state.info.position(name, where)
  except ValueError as e:
    if not name_hint:
      raise
    raise ValueError(f'{e} {name_hint}') from None

  def one(s: EmaState) -> Params:
    tree = _debiased(s, index)
    if dtypes == 'accumulator':
      return tree
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [
        _tree.copy_leaf(x, dtype)
        for x, dtype in zip(leaves, s.info.param_dtypes)])

  out = _per_replica(one, ema_state)
  return _tree.fill_masked(out, params, where) if fill else out


def ema_params(state: StateLike, name: str | None = None, *,
               dtypes: Dtypes = 'params',
               params: Params | None = None) -> Params:
  """The averaged params to evaluate with.

  Debiased (for ``debias=True``): the stored average divided by the weight
  it has gathered (``state.weight``), right for any sequence of decays; an
  average that started as a copy of the params has weight one and comes back
  unchanged, to the bit. By default in the dtypes of the params that were
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
    dtypes: ``'params'`` (default) for the params' dtypes, or
      ``'accumulator'`` for the same debiased values in the dtypes the
      average is accumulated in (float32 for bf16 params by default), when
      you want the full precision.
    params: the live params, for an average of part of them (``mask=``):
      the leaves outside the mask are copies of these. Required then;
      ignored otherwise.

  Returns:
    A tree shaped like the params.

  Raises:
    ValueError: if ``state`` holds no :class:`emax.EmaState` or several,
      ``name`` is missing (several named averages) or unknown (the message
      lists the names), ``dtypes`` is neither ``'params'`` nor
      ``'accumulator'``, or the state is masked and ``params`` is missing.

  Examples:
    >>> import jax.numpy as jnp, emax
    >>> state = emax.init({'w': jnp.ones(2, jnp.bfloat16)}, debias=True)
    >>> state = emax.update(state, {'w': jnp.ones(2, jnp.bfloat16)}, 0.9)
    >>> emax.ema_params(state)
    {'w': Array([1, 1], dtype=bfloat16)}
    >>> emax.ema_params(state, dtypes='accumulator')
    {'w': Array([1., 1.], dtype=float32)}
  """
  return read(state, name, where='emax.ema_params', dtypes=dtypes,
              params=params, fill=True)


def get_ema_state(state: StateLike) -> EmaState:
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


def _window(step: jax.Array, update_every: int) -> jax.Array:
  """``1 / s``, ``s`` the step size per step of ``step`` per averaging step.

  Averaging every ``update_every`` steps with step size ``c`` moves the
  average as ``update_every`` steps of ``s = 1 - (1 - c) ** (1 /
  update_every)`` would; ``s`` is computed without cancellation.
  """
  c = step.astype(jnp.float32)
  if update_every > 1:
    c = -jnp.expm1(jnp.log1p(-c) / update_every)
  return jnp.where(c > 0, 1.0 / jnp.where(c > 0, c, 1.0),
                   jnp.inf).astype(jnp.float32)


def _metrics(ema_state: EmaState, params: Params | None,
             update_every: int) -> dict[str, jax.Array]:
  """:func:`metrics` of one (not replicated) state."""
  info = ema_state.info
  out = {'count': ema_state.count.astype(jnp.int32),
         'skipped': ema_state.skipped.astype(jnp.int32)}
  if params is not None:  # the params' norm once, for every average
    norm = jnp.sqrt(_norm_sq([p for p in jax.tree.leaves(params)
                              if _tree.is_float(p)]))
    norm = jnp.where(norm > 0, norm, 1.0)
  names = [None] if info.names is None else list(info.names)
  for i, name in enumerate(names):
    index = None if name is None else i
    suffix = '' if name is None else f'/{name}'
    c = ema_state.step_size if index is None else ema_state.step_size[index]
    out['decay' + suffix] = (1.0 - c).astype(jnp.float32)
    out['window' + suffix] = _window(c, update_every)
    out['weight' + suffix] = (ema_state.weight if index is None else
                              ema_state.weight[index]).astype(jnp.float32)
    if params is not None:
      average = _debiased(ema_state, index)
      diffs = [a - p.astype(a.dtype) for a, p in zip(
          jax.tree.leaves(average), jax.tree.leaves(params))
               if _tree.is_float(a)]
      out['distance' + suffix] = jnp.sqrt(_norm_sq(diffs)) / norm
  return out


def _check_params(ema_state: EmaState, params: Params, where: str) -> Params:
  """``params`` must fit the state, as :func:`emax.update` checks them.

  A replicated state (a leading ``pmap`` axis) takes params replicated the
  same way. Returns ``params`` without the leaves outside a mask.
  """
  info = ema_state.info
  stored = _offload.to_device(ema_state.average)
  count = None if info.names is None else len(info.names)
  params = _tree.masked_like(_layout.param_shapes(stored, count), params)
  checked = params
  if _replicated(ema_state):
    replicas = jnp.shape(ema_state.count)[0]
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
      if jnp.ndim(p) == 0 or jnp.shape(p)[0] != replicas:
        raise ValueError(
            f'{where}: the state is replicated over {replicas} devices (a'
            ' leading axis on every array, as jax.pmap leaves it), so the'
            ' params must be too; params leaf'
            f' {jax.tree_util.keystr(path)} has shape {jnp.shape(p)}. Pass'
            ' the replicated params the state was updated with.')
    stored = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        jnp.shape(x)[1:], jnp.result_type(x)), stored)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        jnp.shape(x)[1:], jnp.result_type(x)), params)
  _tree.check_matches(_layout.param_shapes(stored, count), params,
                      info.param_dtypes)
  return checked


def metrics(state: StateLike, params: Params | None = None, *,
            update_every: int = 1) -> dict[str, jax.Array]:
  """Scalars to log every few steps: what the average(s) are doing.

  Cheap: without ``params`` it reads only scalars of the state; with them,
  one pass over the params and the averages for the distance. Jittable.

  Args:
    state: an :class:`emax.EmaState`, or any state holding exactly one. A
      state replicated by ``jax.pmap`` is read per replica: every value
      comes back with the leading replica axis.
    params: optional, the current params, for the distance; checked against
      the state as :func:`emax.update` checks them (replicated too when the
      state is).
    update_every: the ``update_every`` the average runs with (as given to
      :func:`emax.ema`, :func:`emax.with_ema` or :func:`emax.update`). The
      state records the step size of an averaging step, not how often
      averaging steps come, so ``'window'`` needs it to count steps. A
      Python int (static under ``jax.jit``).

  Returns:
    A flat dict of scalars: ``'count'`` and ``'skipped'`` (steps taken,
    steps skipped by the NaN guard) as int32, and per average, as float32:
    ``'decay'`` (``1 - c``, ``c`` the step size of the latest averaging step
    that changed it: with ``update_every=k`` and a decay ``d`` compensated
    for the interval, ``d ** k``), ``'window'`` (the effective length of the
    average in steps, ``1 / (1 - (1 - c) ** (1 / update_every))``: ``1 /
    (1 - d)`` for a decay ``d`` per step, ``inf`` before any step),
    ``'weight'`` (the accumulated weight) and, with ``params``,
    ``'distance'``, ``||average - params|| / ||params||`` over all float
    leaves (debiased). For named averages the per-average keys are
    ``'decay/NAME'`` and so on.

  Raises:
    ValueError: if ``state`` holds no :class:`emax.EmaState` or several,
      ``params`` do not fit it (a missing or extra leaf, another shape; the
      message names the leaf), or ``update_every`` is below 1.
    TypeError: if ``update_every`` is not an int.

  Examples:
    >>> import jax.numpy as jnp, emax
    >>> state = emax.init({'w': jnp.ones(2)})
    >>> state = emax.update(state, {'w': jnp.full(2, 3.0)}, 0.75)
    >>> m = emax.metrics(state, {'w': jnp.full(2, 3.0)})
    >>> float(m['decay']), float(m['window']), float(m['distance'])
    (0.75, 4.0, 0.5)
    >>> m['count'].dtype, m['decay'].dtype
    (dtype('int32'), dtype('float32'))

    Every 4th step with decay 0.999 (compensated: ``0.999 ** 4`` per
    averaging step), the average spans about 1,000 steps:

    >>> state = emax.update(emax.init({'w': jnp.ones(2)}), {'w': jnp.ones(2)},
    ...                     0.999, update_every=4, first_update=1)
    >>> round(float(emax.metrics(state, update_every=4)['window']))
    1000
  """
  where = 'emax.metrics'
  update_every = _options.check_int(update_every, 'update_every', 1)
  ema_state = _state.find(state, where)
  if params is None:
    return _per_replica(lambda s: _metrics(s, None, update_every), ema_state)
  params = _check_params(ema_state, _tree.as_arrays(params), where)
  if _replicated(ema_state):
    return jax.vmap(lambda s, p: _metrics(s, p, update_every))(
        ema_state, params)
  return _metrics(ema_state, params, update_every)
