"""The step: every update of every average goes through :func:`step`.

One function owns the whole update: it validates the incoming trees, brings
host-offloaded averages to the device, arranges the new params like the
stored layout, chooses what this step does (copy, average or keep, per
average), checks the new params for NaN and Inf, runs one fused elementwise
pass over every stored array, counts, and puts the averages back where they
were. :func:`emax.update` and the optax transformations are thin doors onto
it, so they accept the same options and behave the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

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


def scheduled_mode(options: _options.StepOptions, count: jax.Array) -> Any:
  """What this step does by the step count alone (a constant when it can be).

  Steps are numbered from 1 (``count + 1``): steps up to ``start_step`` copy
  the params, then steps ``first_update, first_update + update_every, ...``
  average and the others keep. Once ``count`` has saturated at the int32
  maximum every step averages.
  """
  if options.every_step:
    return np.int32(AVERAGE)
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


def _is_constant(x: Any) -> bool:
  return isinstance(x, (np.ndarray, np.generic))


def _select(mode: Any, averaged: Callable[[], jax.Array],
            copied: Callable[[], jax.Array],
            kept: Callable[[], jax.Array]) -> jax.Array:
  """The value for ``mode``: a select when it is traced, none when constant."""
  if _is_constant(mode) and np.all(mode == np.ravel(mode)[0]):
    return {AVERAGE: averaged, COPY: copied, KEEP: kept}[
        int(np.ravel(mode)[0])]()
  return jnp.where(mode == AVERAGE, averaged(),
                   jnp.where(mode == COPY, copied(), kept()))


def _stack(values: list[Any]) -> Any:
  if all(_is_constant(v) for v in values):
    return np.asarray(values, np.float32)
  return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])


def _ordered_rates(options: _options.StepOptions,
                   info: _state.StateInfo, where: str) -> list[_options.Rate]:
  _options.match_names(info.names, options.names, where)
  if info.names is None:
    return list(options.rates)
  by_name = dict(zip(options.names or (), options.rates))
  return [by_name[n] for n in info.names]


def step(options: _options.StepOptions, state: Any, params: Params,
         updates: Optional[Params] = None, *, where: str,
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
  _state.require_params(params, where)
  info = state.info
  rates = _ordered_rates(options, info, where)
  named = info.names is not None
  params = _tree.as_arrays(params)
  stored = _offload.to_device(state.average)
  _tree.check_matches(_layout.param_shapes(stored, len(rates) if named
                                           else None),
                      params, info.param_dtypes)
  if updates is not None:
    _tree.check_updates(params, updates)
  values = _layout.gather(stored, params, updates)
  count = state.count

  power = 1 if options.per_update else options.update_every
  pairs = [_numerics.coefficients(r, count, options.rounding, power)
           for r in rates]
  steps = _stack([s for s, _ in pairs])
  keeps = _stack([k for _, k in pairs])
  if not named:
    steps, keeps = steps[0], keeps[0]

  scheduled = scheduled_mode(options, count)
  # A step size of exactly one is a copy (a select, never arithmetic).
  mode = (np.where((scheduled == AVERAGE) & (steps == 1), COPY,
                   scheduled).astype(np.int32)
          if _is_constant(steps) and _is_constant(scheduled) else
          jnp.where((scheduled == AVERAGE) & (steps == 1), COPY, scheduled))

  ok: Any = True
  if options.skip_nonfinite:
    def check() -> jax.Array:
      if finite is None:
        flags = _numerics.all_finite(_layout.float_values(values))
      else:
        flags = jnp.asarray(finite, bool).reshape(())
      if not _is_constant(steps):
        flags &= jnp.all(jnp.isfinite(steps) & jnp.isfinite(keeps))
      return _numerics.everywhere(flags)

    if _is_constant(scheduled):  # steps that keep read no params at all
      ok = check() if scheduled != KEEP else True
    else:
      ok = lax.cond(scheduled != KEEP, check, lambda: jnp.asarray(True))

  def guarded(value: jax.Array, old: jax.Array) -> jax.Array:
    return value if ok is True else jnp.where(ok, value, old)

  weight = state.weight
  zero = (_numerics.runtime_zero(count) if options.rounding == 'tensorflow'
          else 0.0)

  def per_name(x: Any, ndim: int) -> Any:
    """``x`` (one value per name) shaped to broadcast over stored arrays."""
    if not named:
      return x
    return x.reshape((-1,) + (1,) * (ndim - 1))

  # A form with two products is fused by XLA into one multiply-add, and which
  # product it fuses depends on what surrounds the sum. For 'nnx'
  # (`d * old + (1 - d) * new`) a select on the result (the guard) changes
  # the choice, so that form takes the guard on its inputs (weights 1 and 0,
  # the old value for the new: exactly the old value) and compiles as the
  # hand-written expression does; the others select on the result. Both
  # choices are pinned by bitwise tests against the peers (tests/test_peers).
  on_inputs = options.rounding == 'nnx' and ok is not True

  def leaf(old: jax.Array, new: jax.Array) -> jax.Array:
    n = old.ndim
    start = old
    if info.debias:  # a zero-weight average starts from zero, not its copy
      start = jnp.where(per_name(weight == 0, n), jnp.zeros((), old.dtype),
                        old)
    c, k = per_name(steps, n), per_name(keeps, n)
    moving = new
    if on_inputs:  # 0 * old + 1 * old is old, to the bit
      c, k = jnp.where(ok, c, 0.0), jnp.where(ok, k, 1.0)
      moving = jnp.where(ok, new.astype(old.dtype), old)
    value = _select(
        per_name(mode, n),
        lambda: _numerics.average(start, moving, c, k, options.rounding,
                                  zero),
        lambda: jnp.broadcast_to(new.astype(old.dtype), old.shape),
        lambda: old)
    unguarded = on_inputs and _is_constant(mode) and bool(
        np.all(mode == AVERAGE))  # (a copy of NaN params must be refused)
    return value if unguarded else guarded(value, old)

  average = _layout.map_leaves(leaf, stored, values)
  one = jnp.ones([], jnp.float32)
  new_weight = guarded(_select(
      mode, lambda: _numerics.average(weight, one, steps, keeps,
                                      'tensorflow', zero),
      lambda: jnp.broadcast_to(one, weight.shape), lambda: weight), weight)

  new_step_size = guarded(_select(
      mode, lambda: jnp.broadcast_to(jnp.asarray(steps, jnp.float32),
                                     weight.shape),
      lambda: jnp.broadcast_to(one, weight.shape),
      lambda: state.step_size), state.step_size)

  skipped = state.skipped
  if ok is not True:
    counted = jnp.logical_not(ok) & (scheduled != KEEP)
    skipped = jnp.where(counted, optax.safe_increment(skipped), skipped)
  return state._replace(
      count=optax.safe_increment(count),
      average=_offload.place_like(average, state.average),
      weight=jnp.asarray(new_weight, jnp.float32),
      step_size=jnp.asarray(new_step_size, jnp.float32),
      skipped=skipped)


def reset(state: Any, params: Params, *, where: str = 'emax.reset') -> Any:
  """Every average set to ``params`` (bitwise copies), weight one.

  ``state`` may be an :class:`EmaState` or any state holding one (an optax
  state); the same kind of thing comes back. ``count`` and ``skipped`` are
  left as they are.
  """
  ema_state = _state.find(state, where)
  _state.require_params(params, where)
  params = _tree.as_arrays(params)
  info = ema_state.info
  stored = _offload.to_device(ema_state.average)
  _tree.check_matches(_layout.param_shapes(
      stored, None if info.names is None else len(info.names)),
                      params, info.param_dtypes)
  values = _layout.gather(stored, params)
  average = _layout.map_leaves(
      lambda old, new: jnp.broadcast_to(new.astype(old.dtype), old.shape),
      stored, values)
  new = ema_state._replace(
      average=_offload.place_like(average, ema_state.average),
      weight=jnp.ones_like(ema_state.weight),
      step_size=jnp.ones_like(ema_state.step_size))
  return new if isinstance(state, EmaState) else _state.replace(state, new)


def update(state: EmaState, params: Params,
           decay: _options.RateArg = None, *,
           step_size: _options.RateArg = None, skip_nonfinite: bool = True,
           rounding: str = 'tensorflow', update_every: int = 1,
           first_update: Optional[int] = None, start_step: int = 0,
           per_update: bool = False, finite: Any = None) -> EmaState:
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
    rounding: ``'tensorflow'``, ``'lerp'`` or ``'optax'``: see
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
      outside ``[0, 1]``, the rates' names are not the state's, or ``state``
      is not an :class:`EmaState`.
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
