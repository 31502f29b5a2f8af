"""The step: every update of every average goes through :func:`step`.

:func:`emax.update` and the optax transformations are thin doors onto
:func:`step`, so they accept the same options and behave the same. A step
reads top to bottom:

1. :func:`_arrive` (shared with :func:`reset`): the params checked against
   the state, the averages brought to the device (from host memory when
   offloaded), the new params arranged like the stored layout.
2. :func:`_plan`: what the step does to each average (copy, average or
   keep) and with which step size; decided on the host when the step count
   and the rates are known there.
3. :func:`_guard`: whether the new params (and the rates, when the step
   uses them) are free of NaN and Inf; ``None`` when nothing is checked.
4. :func:`_leaf`: one fused elementwise pass over each stored array.

:func:`_finish` then moves the weights and step sizes, counts, and puts the
averages back where they were.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from optax import Params

from emax import _layout
from emax import _numerics
from emax import _offload
from emax import _options
from emax import _state
from emax import _tree
from emax._state import EmaState

KEEP, COPY, AVERAGE = 0, 1, 2
"""What a step does to an average: leave it, set it to the params, average."""

Value = Union[np.ndarray, jax.Array]
"""A value of a step's plan: a NumPy constant when the host knows it before
tracing, an array otherwise."""


def _is_constant(x: Any) -> bool:
  return isinstance(x, (np.ndarray, np.generic))


def step(options: _options.StepOptions, state: Any, params: Params,
         updates: Params | None = None, *, where: str,
         finite: Any = None) -> EmaState:
  """One step of every average in ``state`` toward ``params + updates``.

  Args:
    options: validated step options (rates, schedule of steps, guard,
      rounding).
    state: an :class:`emax.EmaState`.
    params: the params (before ``updates`` when those are given).
    updates: optional updates; the averages then move toward
      ``params + updates``, computed as ``optax.apply_updates`` does.
    where: the public name of the caller, for error messages.
    finite: optional, a bool scalar the caller vouches for: whether the new
      params are free of NaN and Inf. Given, it replaces the guard's own
      check (a pass over the params); the rates are still checked.

  Returns:
    The new state.
  """
  state = _state.check_state(state, where)
  _check_finite(finite, where)
  rates = _ordered_rates(options, state.info, where)
  stored, values, unrounded = _arrive(state, params, updates, where)
  plan = _plan(options, rates, state.count, named=state.info.names is not None)
  ok = _guard(options, plan, values, unrounded, finite)
  # An average with no weight yet starts from zero on its first step that
  # moves it (step size > 0); until then it keeps the copy it reads as.
  fresh = ((state.weight == 0) & (jnp.asarray(plan.steps) > 0)
           if state.info.debias else None)
  leaf = functools.partial(_leaf, plan=plan, ok=ok, fresh=fresh,
                           rounding=options.rounding)
  return _finish(state, _layout.map_leaves(leaf, stored, values), plan, ok)


# --- 1. The preamble ---------------------------------------------------------


def _check_finite(finite: Any, where: str) -> None:
  """``finite`` must be ``None`` or a bool scalar (one flag for the step)."""
  if finite is None or isinstance(finite, (bool, np.bool_)):
    return
  try:
    shape, dtype = jnp.shape(finite), jnp.result_type(finite)
  except TypeError:
    shape, dtype = None, None
  if shape == () and dtype == jnp.bool_:
    return
  got = (f'an array of shape {shape} and dtype {dtype}'
         if isinstance(finite, (jax.Array, np.ndarray)) else
         f'{finite!r} ({type(finite).__name__})')
  raise ValueError(
      f'{where}: finite must be a bool scalar, one flag saying whether all'
      f' the new params are free of NaN and Inf, got {got} instead. Reduce'
      ' per-leaf or per-element flags to one, e.g. finite=jnp.all(flags) or'
      ' finite=jnp.isfinite(optax.global_norm(grads)), or leave finite out'
      ' and the guard checks the params itself.')


def _ordered_rates(options: _options.StepOptions,
                   info: _state.StateInfo, where: str) -> list[_options.Rate]:
  """The rates in the order of the state's averages (its names)."""
  _options.match_names(info.names, options.names, where)
  if info.names is None:
    return list(options.rates)
  by_name = dict(zip(options.names or (), options.rates))
  return [by_name[n] for n in info.names]


def _arrive(state: EmaState, params: Params, updates: Params | None,
            where: str) -> tuple[Params, Params, list[jax.Array | None]]:
  """``(stored, values, unrounded)``: the averages on the device, the new
  params (``params + updates``) arranged like them, after checking
  ``params`` and ``updates`` against the state (structure, shapes, float
  kinds), and what the guard reads for each float value (see
  :func:`_unrounded`)."""
  _state.require_params(params, where)
  params = _tree.as_arrays(params)
  info = state.info
  stored = _offload.to_device(state.average)
  count = None if info.names is None else len(info.names)
  shapes = _layout.param_shapes(stored, count)
  # A masked state (mask=) takes the leaves inside its mask only.
  params = _tree.masked_like(shapes, params)
  updates = _tree.masked_like(shapes, updates)
  _tree.check_matches(shapes, params, info.param_dtypes)
  if updates is not None:
    _tree.check_updates(params, updates)
  values = _layout.gather(stored, params, updates)
  return stored, values, _unrounded(values, params, updates)


def _unrounded(values: Params, params: Params,
               updates: Params | None) -> list[jax.Array | None]:
  """For each float value (in :func:`_layout.float_values`' order), the
  float32 sum ``p + u`` a 16-bit param was rounded from, or ``None``: the
  guard reads it in its own loop (see :func:`_numerics.all_finite`). A
  packed buffer is written once anyway: its rounded values are read; the
  leaves left out of the pack are read as unpacked ones are."""
  count = len(_layout.float_values(values))
  if updates is None:
    return [None] * count
  is_none = lambda x: x is None  # noqa: E731
  if isinstance(values, _layout.PackedTree):
    pairs = values.layout.unpacked(params, updates)
    out: list[jax.Array | None] = [
        None for b in values.buffers if _tree.is_float(b)]
    out += [_tree.sum_before_rounding(p, u)
            for (p, u), v in zip(pairs, values.rest) if _tree.is_float(v)]
  else:
    p_leaves, treedef_ = jax.tree.flatten(params, is_leaf=is_none)
    treedef: Any = treedef_  # flatten_up_to is not in jax's type stubs
    u_leaves = treedef.flatten_up_to(updates)
    v_leaves = treedef.flatten_up_to(values)
    out = [_tree.sum_before_rounding(p, u)
           for p, u, v in zip(p_leaves, u_leaves, v_leaves)
           if v is not None and _tree.is_float(v)]
  assert len(out) == count, (len(out), count)
  return out


# --- 2. The plan ---------------------------------------------------------------


class Plan(NamedTuple):
  """What one step does to each average (each field a :data:`Value`; with
  named averages, ``mode``, ``steps`` and ``keeps`` hold one per name).

  Attributes:
    scheduled: KEEP, COPY or AVERAGE by the step count alone (a scalar).
    mode: ``scheduled``, except that averaging with a step size of exactly
      one is a copy (a select, never arithmetic).
    steps: the step size ``c``, the weight of the new params (float32).
    keeps: the decay ``1 - c`` (float32).
  """

  scheduled: Value
  mode: Value
  steps: Value
  keeps: Value


def scheduled_mode(options: _options.StepOptions, count: jax.Array) -> Value:
  """What this step does by the step count alone (a constant when it can be).

  Steps are numbered from 1 (``count + 1``): steps up to ``start_step`` copy
  the params, then steps ``first_update, first_update + update_every, ...``
  average and the others keep. Once ``count`` has saturated at the int32
  maximum every step averages.
  """
  if options.every_step:
    return np.asarray(AVERAGE, np.int32)
  xp: Any = jnp
  if not isinstance(count, jax.core.Tracer):  # eager: decide on the host
    xp = np
  count = xp.asarray(count)
  saturated = count == _options.MAX_INT32
  number = xp.where(saturated, count, count + 1)
  first, every = options.first_update, options.update_every
  on_grid = (number >= first) & ((number - first) % every == 0)
  mode = xp.where(number <= options.start_step, COPY,
                  xp.where(on_grid, AVERAGE, KEEP))
  return xp.where(saturated, AVERAGE, mode).astype(np.int32)


def _stack(values: list[Any]) -> Value:
  if all(_is_constant(v) for v in values):
    return np.asarray(values, np.float32)
  return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])


def _plan(options: _options.StepOptions, rates: list[_options.Rate],
          count: jax.Array, *, named: bool) -> Plan:
  """This step's :class:`Plan`: its mode and the step size of each rate."""
  power = 1 if options.per_update else options.update_every
  pairs = [_numerics.coefficients(r, count, options.rounding, power)
           for r in rates]
  steps = _stack([s for s, _ in pairs])
  keeps = _stack([k for _, k in pairs])
  if not named:
    steps, keeps = steps[0], keeps[0]
  scheduled = scheduled_mode(options, count)
  copies = (scheduled == AVERAGE) & (steps == 1)
  mode: Value
  if _is_constant(steps) and _is_constant(scheduled):
    mode = np.where(copies, COPY, scheduled).astype(np.int32)
  else:
    mode = jnp.where(copies, COPY, scheduled)
  return Plan(scheduled, mode, steps, keeps)


def _always(mode: Value, kind: int) -> bool:
  """Whether ``mode`` is known on the host to be ``kind`` for every average."""
  return _is_constant(mode) and bool(np.all(mode == kind))


def _select(mode: Value, averaged: Callable[[], jax.Array],
            copied: Callable[[], jax.Array],
            kept: Callable[[], jax.Array]) -> jax.Array:
  """The value for ``mode``: a select when it is traced, none when constant."""
  for kind, value in ((AVERAGE, averaged), (COPY, copied), (KEEP, kept)):
    if _always(mode, kind):
      return value()
  return jnp.where(mode == AVERAGE, averaged(),
                   jnp.where(mode == COPY, copied(), kept()))


# --- 3. The guard --------------------------------------------------------------


def _guard(options: _options.StepOptions, plan: Plan, values: Params,
           unrounded: list[jax.Array | None],
           finite: Any) -> jax.Array | None:
  """Whether this step may change the averages; ``None``: nothing checked.

  Nothing is checked without the guard (``skip_nonfinite=False``) or on a
  step the host knows keeps (it reads no params). Otherwise a bool scalar,
  the same on every shard: whether the new params are free of NaN and Inf
  (``finite``, when the caller vouches for it) and, on a step that averages,
  so are the rates.
  """
  if not options.skip_nonfinite:
    return None
  check = functools.partial(_all_finite, plan, values, unrounded, finite)
  if _is_constant(plan.scheduled):
    return None if plan.scheduled == KEEP else check()
  return lax.cond(plan.scheduled != KEEP, check, lambda: jnp.asarray(True))


def _all_finite(plan: Plan, values: Params, unrounded: list[jax.Array | None],
                finite: Any) -> jax.Array:
  if finite is None:
    flag = _numerics.all_finite(_layout.float_values(values), unrounded)
  else:
    flag = jnp.asarray(finite, bool).reshape(())
  # A rate counts only on a step that averages: a copy step does not use it
  # (a schedule shifted by `start_step` may be NaN before it starts).
  if not _is_constant(plan.steps) and not _always(plan.scheduled, COPY):
    rates_ok = jnp.all(jnp.isfinite(plan.steps) & jnp.isfinite(plan.keeps))
    if not _always(plan.scheduled, AVERAGE):
      rates_ok |= plan.scheduled != AVERAGE
    flag &= rates_ok
  return _numerics.everywhere(flag)


def _guarded(ok: jax.Array | None, value: jax.Array,
             old: jax.Array) -> jax.Array:
  """``value`` where the guard passed (or checked nothing), else ``old``."""
  return value if ok is None else jnp.where(ok, value, old)


# --- 4. The per-leaf update ----------------------------------------------------


def _per_name(x: Value, ndim: int) -> Value:
  """``x`` (a scalar, or one value per name) shaped to broadcast over a
  stored array of ``ndim`` dimensions (names first)."""
  if np.ndim(x) == 0:
    return x
  return x.reshape((-1,) + (1,) * (ndim - 1))


def _copied(old: jax.Array, new: jax.Array) -> jax.Array:
  """``new`` in ``old``'s dtype and shape: a bitwise copy, no arithmetic."""
  return jnp.broadcast_to(new.astype(old.dtype), old.shape)


def _leaf(old: jax.Array, new: jax.Array, *, plan: Plan,
          ok: jax.Array | None, fresh: jax.Array | None,
          rounding: str) -> jax.Array:
  """The new value of one stored float array ``old`` (names first, for
  named averages) from its new params ``new``. ``fresh``: with
  ``debias=True``, whether each average still has weight zero (its first
  averaging step starts from zero, not from the stored copy of the params).
  """
  n = old.ndim
  start = old
  if fresh is not None:
    start = jnp.where(_per_name(fresh, n), jnp.zeros((), old.dtype), old)
  c, k, moving = _per_name(plan.steps, n), _per_name(plan.keeps, n), new
  # A form with two products is fused by XLA into one multiply-add, and which
  # product it fuses depends on what surrounds the sum. For 'nnx'
  # (`d * old + (1 - d) * new`) a select on the result (the guard) changes
  # the choice, so that form takes the guard on its inputs (weights 0 and 1,
  # the old value for the new: `0 * old + 1 * old` is the old value to the
  # bit) and compiles as the hand-written expression does; the others select
  # on the result. Both choices are pinned by bitwise tests against the
  # peers (tests/test_peers.py).
  inputs_ok = ok if rounding == 'nnx' else None
  if inputs_ok is not None:
    c, k = jnp.where(inputs_ok, c, 0.0), jnp.where(inputs_ok, k, 1.0)
    moving = jnp.where(inputs_ok, new.astype(old.dtype), old)
  value = _select(
      _per_name(plan.mode, n),
      lambda: _numerics.average(start, moving, c, k, rounding),
      lambda: _copied(old, new), lambda: old)
  if inputs_ok is not None and _always(plan.mode, AVERAGE):
    return value  # guarded already (a copy of NaN params is refused below)
  return _guarded(ok, value, old)


def _finish(state: EmaState, average: Params, plan: Plan,
            ok: jax.Array | None) -> EmaState:
  """The new state: ``average`` put back where the old one was, the weight
  and step size of each average moved as it was, the counts."""
  weight = state.weight
  one = jnp.ones([], jnp.float32)
  new_weight = _guarded(ok, _select(
      plan.mode, lambda: _numerics.average(weight, one, plan.steps,
                                           plan.keeps, 'tensorflow'),
      lambda: jnp.broadcast_to(one, weight.shape), lambda: weight), weight)
  step_size = _guarded(ok, _select(
      plan.mode, lambda: jnp.broadcast_to(jnp.asarray(plan.steps, jnp.float32),
                                          weight.shape),
      lambda: jnp.broadcast_to(one, weight.shape),
      lambda: state.step_size), state.step_size)
  skipped = state.skipped
  if ok is not None:  # counted: a step that would have changed the averages
    counted = jnp.logical_not(ok) & (plan.scheduled != KEEP)
    skipped = jnp.where(counted, optax.safe_increment(skipped), skipped)
  return state._replace(
      count=optax.safe_increment(state.count),
      average=_offload.place_like(average, state.average),
      weight=jnp.asarray(new_weight, jnp.float32),
      step_size=jnp.asarray(step_size, jnp.float32),
      skipped=skipped)


def reset(state: _state.StateLike, params: Params, *,
          where: str = 'emax.reset') -> _state.StateLike:
  """Every average set to ``params`` (bitwise copies), weight one.

  ``state`` may be an :class:`EmaState` or any state holding one (an optax
  state); the same kind of thing comes back. ``count`` and ``skipped`` are
  left as they are.
  """
  ema_state = _state.find(state, where)
  stored, values, _ = _arrive(ema_state, params, None, where)
  new = ema_state._replace(
      average=_offload.place_like(_layout.map_leaves(_copied, stored, values),
                                  ema_state.average),
      weight=jnp.ones_like(ema_state.weight),
      step_size=jnp.ones_like(ema_state.step_size))
  return new if isinstance(state, EmaState) else _state.replace(state, new)


def update(state: EmaState, params: Params,
           decay: _options.RatesLike | None = None, *,
           step_size: _options.RatesLike | None = None,
           skip_nonfinite: bool = True,
           rounding: str = 'tensorflow', update_every: int = 1,
           first_update: int | None = None, start_step: int = 0,
           per_update: bool = False,
           finite: jax.typing.ArrayLike | None = None) -> EmaState:
  r"""One pure step of the moving average(s) toward ``params``.

  Computes, in each float leaf's accumulator dtype, exactly what
  ``tf.train.ExponentialMovingAverage.apply`` does (by default):

  .. math:: \text{average} \leftarrow \text{average} - (1 - d)(\text{average} - p)

  Non-float leaves take the new value of the param. ``count`` goes up by one
  and ``weight`` moves toward one by the same rule, so reading the average
  debiases it right for any sequence of decays. Takes the same options as
  :func:`emax.ema` (see there); schedules are called with ``state.count``.

  Args:
    state: an :class:`EmaState` from :func:`emax.init`.
    params: the new params, a tree like the one given to :func:`emax.init`.
    decay: ``d`` in ``[0, 1]``: a float, a 0-d array (used as float32, as
      TensorFlow does), a schedule ``count -> d``, or, for a state with named
      averages, a mapping ``{name: decay}``. A decay of exactly 0 copies the
      params bit for bit.
    step_size: instead of ``decay``, the weight of the new params, ``1 - d``
      (``tau``, as ``optax.incremental_update`` takes it), in the same forms.
    skip_nonfinite: leave every average as it was when a new float param (or
      the rate) is NaN or Inf, and count the step in ``state.skipped``.
    rounding: ``'tensorflow'``, ``'lerp'``, ``'optax'`` or ``'nnx'``: see
      :func:`emax.ema`.
    update_every: see :func:`emax.ema`.
    first_update: see :func:`emax.ema`.
    start_step: see :func:`emax.ema`.
    per_update: see :func:`emax.ema`.
    finite: optional bool scalar: whether ``params`` are free of NaN and Inf,
      a signal the caller already has (e.g. ``jnp.isfinite(grad_norm)``
      when the previous params were finite). Given, the NaN guard uses it
      instead of reading every param again.

  Returns:
    The new :class:`EmaState`.

  Raises:
    ValueError: if ``params`` is ``None`` or does not match the state
      (structure, shapes, or a float leaf that became non-float), a rate is
      outside ``[0, 1]``, the rates' names are not the state's, ``finite``
      is not a bool scalar, or ``state`` is not an :class:`EmaState`.
    TypeError: if both or neither of ``decay`` and ``step_size`` are given,
      a rate is not a number, array or schedule, or an option has the wrong
      type.

  Examples:
    >>> import jax.numpy as jnp, emax
    >>> state = emax.init({'w': jnp.zeros(())})
    >>> state = emax.update(state, {'w': jnp.array(5.0)}, 0.1)
    >>> state.average['w']
    Array(4.5, dtype=float32)
    >>> state = emax.update(state, {'w': jnp.array(jnp.nan)}, 0.1)
    >>> state.average['w'], state.skipped
    (Array(4.5, dtype=float32), Array(1, dtype=int32))
  """
  options = _options.step_options(
      decay, step_size, update_every=update_every, first_update=first_update,
      start_step=start_step, per_update=per_update,
      skip_nonfinite=skip_nonfinite, rounding=rounding)
  return step(options, state, params, where='emax.update', finite=finite)
