"""The optax doors onto the step: :func:`ema`, and :func:`with_ema` (an
optimizer, then an average of the params it produces, on real steps only)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import optax
from jax import lax
from optax import Params

from emax import _options
from emax import _read
from emax import _state
from emax import _step
from emax import _tree
from emax._state import EmaState


def _write_back(updates: Params, state: EmaState, params: Params,
                every: int, name: str | None) -> Params:
  """``updates`` that move ``params`` onto the average on write-back steps.

  On steps ``every, 2 every, ...`` each float update becomes ``average -
  params`` in the update's dtype (at least the param's), so that
  ``optax.apply_updates(params, updates)`` lands on the average in the
  params' dtype: exactly when the two are within a factor of two of each
  other (Sterbenz), else within one ulp.
  """
  on = (state.count % every == 0) & (state.count > 0)
  target = _read.read(state, name, where='emax.ema')  # masked leaves: none

  def leaf(t: Any, u: Any, p: Any) -> Any:
    if t is None or _tree.is_masked(t) or u is None or not _tree.is_float(
        p) or jnp.result_type(u) == jax.dtypes.float0:
      return u  # (outside a mask, the optimizer's update as it is)
    p = jnp.asarray(p)
    dtype = _tree.promote(jnp.result_type(u), p.dtype)
    moved = t.astype(dtype) - p.astype(dtype)
    return jnp.where(on, moved.astype(jnp.result_type(u)), u)

  return jax.tree.map(leaf, target, updates, params,
                      is_leaf=lambda x: x is None or _tree.is_masked(x))


def ema(decay: _options.RatesLike | None = None, *,
        step_size: _options.RatesLike | None = None, debias: bool = False,
        accumulator_dtype: jax.typing.DTypeLike | None = None,
        update_every: int | None = None,
        first_update: int | None = None,
        start_step: int | None = None, per_update: bool = False,
        skip_nonfinite: bool = True, offload: bool = False,
        pack: bool | int = False, rounding: str = 'tensorflow',
        write_back_every: int | None = None,
        write_back_name: str | None = None,
        mask: _tree.MaskLike | None = None
        ) -> optax.GradientTransformationExtraArgs:
  r"""Track exponential moving averages of the parameters.

  Place it last in an ``optax.chain`` (or use :func:`emax.with_ema`, which
  cannot be misplaced): it sees the final updates and the params before
  them, and averages the params as they will be after this step,
  ``params + updates``. Updates pass through unchanged (except on write-back
  steps). Read the average with :func:`emax.ema_params`.

  .. math:: \text{average}_t = \text{average}_{t-1} - (1 - d_t)(\text{average}_{t-1} - \theta_t)

  Args:
    decay: ``d`` in ``[0, 1]``: a float, a 0-d array, or a schedule
      ``count -> d`` (any optax schedule, or :func:`emax.tf_decay` and
      friends), called with the number of steps taken before this one (0 on
      the first); values a schedule returns are clipped into ``[0, 1]``. A
      mapping ``{name: decay}`` keeps one named average per entry in the same
      state, updated in one pass; read one with ``emax.ema_params(state,
      name)``. A decay of exactly 0 copies the params, bit for bit.
    step_size: instead of ``decay``, the weight of the new params, ``1 - d``
      (``tau``, as ``optax.incremental_update`` and RL code take it), in the
      same forms. A Python float is turned into a float32 step size once, in
      float64 on the host. A constant ``decay`` below 0.5 warns (it is most
      often a step size written in the wrong place); pass it as
      ``step_size=1 - decay`` to say it is meant.
    debias: start each average with zero weight and divide by the weight it
      has gathered when read (Adam-style bias correction), instead of
      starting it as a copy of the params (TensorFlow's default).
    accumulator_dtype: dtype of the averages of float params; by default
      float32 for bf16 and f16 params, the param's own dtype otherwise.
    update_every: average only on every ``update_every``-th step (see
      ``first_update``; ``None`` means 1). By default the decay stays per
      step: an averaging step uses ``d ** update_every`` (step size ``1 - (1
      - c) ** update_every``, computed without cancellation), so the time
      constant in steps stays that of averaging every step. Steps in between
      neither read the params nor write the average.
    first_update: the first averaging step (steps count from 1); averaging
      steps are then ``first_update + j * update_every``. Default (``None``
      or ``0``, the grid's start before the first step): ``update_every``.
    start_step: the first ``start_step`` steps copy the params into the
      average; averaging begins after them (``None`` means 0).
    per_update: apply the decay (or step size) as given on each averaging
      step, with no ``** update_every`` compensation: a target network's
      ``tau`` every ``update_every`` steps.
    skip_nonfinite: when any new float param (or the rate of this step) is
      NaN or Inf, leave every average as it was for the whole step and count
      the step in ``EmaState.skipped``. Training goes on; the average is never
      poisoned. Only steps that would change the average are checked.
    offload: keep the average in host memory (``memory_kind='pinned_host'``,
      the params' sharding otherwise) so it costs no accelerator memory
      between steps; each step moves it to the device and back.
      :func:`emax.ema_params` returns the average on the device. Stored as
      raw bits, it carries no gradient: differentiating through it raises a
      ``TypeError`` (use ``offload=False`` where a gradient must flow).
    pack: store the averages of small single-device float leaves (at most
      ``2**15`` elements, or ``pack`` elements for an int) in a few
      contiguous buffers: a step over many small leaves becomes a few kernels
      instead of one per leaf.
    rounding: how a step is rounded, to match a peer to the bit:
      ``'tensorflow'`` (default; ``tf.train.ExponentialMovingAverage``),
      ``'lerp'`` (``average + (1 - d) * (params - average)`` as XLA compiles
      it: hand-written jitted code, timm, ema-pytorch), ``'optax'``
      (``step_size * params + (1 - step_size) * average``, as
      ``optax.incremental_update``), ``'nnx'`` (``decay * average + (1 -
      decay) * params``, as ``flax.nnx.EMA`` and Keras).
    write_back_every: every this many steps, the updates returned move the
      params onto the average (Switch-EMA): ``params + updates`` then equals
      the average in the params' dtype (exactly when the two are within a
      factor of two, else within one ulp). The optimizer's own state (e.g.
      Adam's moments) is left as it is.
    write_back_name: with named averages, the name of the one to write
      back (required then, with ``write_back_every``).
    mask: average only part of the params (the trainable ones, adapters):
      a tree of bools like the params (or a prefix), or a callable ``params
      -> that tree``, as ``optax.masked`` takes it. Leaves outside it store
      nothing; read with ``emax.ema_params(state, params=params)``, which
      fills them from the live params. Updates pass through unchanged.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`emax.EmaState`. Its ``update(updates, state, params, *,
    finite=None)`` requires ``params``; ``finite``, an optional bool scalar
    the caller vouches for (are ``params + updates`` free of NaN and Inf?),
    replaces the NaN guard's own pass over the params (optax passes it
    through ``optax.chain`` as an extra argument).

  Raises:
    ValueError: if a rate is outside ``[0, 1]``, an int option is out of
      range, ``accumulator_dtype`` is not floating, ``rounding`` is unknown.
    TypeError: if both or neither of ``decay`` and ``step_size`` are given, a
      rate is neither a number, a 0-d array nor a callable, or a bool or int
      option has another type (a string ``'false'`` is refused).

  Examples:
    >>> import jax.numpy as jnp, optax, emax
    >>> params = {'w': jnp.array([1.0, 2.0])}
    >>> tx = optax.chain(optax.sgd(0.1), emax.ema(0.9))
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update({'w': jnp.array([1.0, 1.0])},
    ...                                opt_state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params['w'], emax.ema_params(opt_state)['w']
    (Array([0.9, 1.9], dtype=float32), Array([0.99, 1.99], dtype=float32))
  """
  options = _options.step_options(
      decay, step_size, update_every=update_every, first_update=first_update,
      start_step=start_step, per_update=per_update,
      skip_nonfinite=skip_nonfinite, rounding=rounding)
  debias = _options.check_bool(debias, 'debias')
  acc = _options.check_accumulator_dtype(accumulator_dtype)
  _options.check_layout(pack, offload)
  write_back_every = _options.check_write_back(
      write_back_every, write_back_name, options.names)
  _options.warn_if_step_size(decay)

  def init_fn(params: Params) -> EmaState:
    return _state.init(params, names=options.names, debias=debias,
                       accumulator_dtype=acc, offload=offload, pack=pack,
                       mask=mask)

  def update_fn(updates: optax.Updates, state: EmaState,
                params: Params | None = None, *, finite: Any = None,
                **extra_args: Any) -> tuple[optax.Updates, EmaState]:
    del extra_args  # other transformations' extra arguments
    state = _step.step(options, state, params, updates, where='emax.ema',
                       finite=finite)
    if write_back_every is not None:
      updates = _write_back(updates, state, params, write_back_every,
                            write_back_name)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


T = TypeVar('T')


def _is_transformation(x: Any) -> bool:
  return hasattr(x, 'init') and hasattr(x, 'update') and not isinstance(
      x, type)


def is_multisteps(x: Any) -> bool:
  """Whether ``x`` is the state of ``optax.MultiSteps``."""
  return isinstance(x, optax.MultiStepsState)


def on_real_steps(old: Any, new: Any, step: Callable[[], T],
                  unchanged: T) -> T:
  """``step()`` if the optimizer took a real step from state ``old`` to ``new``.

  Any optimizer but ``optax.MultiSteps`` takes a real step every time:
  ``step()`` runs as it is. Under ``optax.MultiSteps`` (``old`` its state) a
  ``lax.cond`` on whether its ``gradient_step`` moved gives ``step()`` on
  real steps and ``unchanged`` on micro-steps.
  """
  if not is_multisteps(old):
    return step()
  moved = new.gradient_step != old.gradient_step
  return lax.cond(moved, step, lambda: unchanged)


def check_real_steps(inner_state: Any) -> None:
  """The average must be able to tell real steps from micro-steps.

  An ``optax.MultiSteps`` anywhere but at the top of the optimizer's state
  would hide its micro-steps from :func:`on_real_steps`: refused.
  """
  if is_multisteps(inner_state):
    return
  if any(is_multisteps(x) for x in jax.tree.leaves(
      inner_state, is_leaf=is_multisteps)):
    raise ValueError(
        'The optimizer holds optax.MultiSteps inside another transformation,'
        ' so its average cannot tell micro-steps from real steps and would'
        ' move on every micro-step. Make MultiSteps the outermost'
        ' transformation of the optimizer: optax.MultiSteps(opt, k).')


class WithEmaState(NamedTuple):
  """The state of :func:`emax.with_ema`.

  Attributes:
    inner_state: the wrapped optimizer's state.
    ema_state: the state of the averages: an :class:`emax.EmaState` (or the
      state of the averaging transformation given as ``average``).
  """

  inner_state: optax.OptState
  ema_state: optax.OptState


def check_average(average: Any, where: str) -> None:
  """``average`` must be an averaging transformation (``emax.ema``...)."""
  if not isinstance(average, optax.GradientTransformation):
    raise TypeError(
        f'{where} expected average to be an averaging transformation such as'
        f' emax.ema(0.999) or emax.bema(), got {type(average).__name__}'
        ' instead. Pass a decay as decay=, a transformation as average=.')


@dataclasses.dataclass(frozen=True)
class _Init:
  optimizer: optax.GradientTransformation
  average: optax.GradientTransformation

  def __call__(self, params: Params) -> WithEmaState:
    inner_state = optax.with_extra_args_support(self.optimizer).init(params)
    check_real_steps(inner_state)
    return WithEmaState(inner_state, self.average.init(params))


@dataclasses.dataclass(frozen=True)
class _Update:
  optimizer: optax.GradientTransformation
  average: optax.GradientTransformation

  def __call__(self, updates: optax.Updates, state: WithEmaState,
               params: Params | None = None, **extra_args: Any
               ) -> tuple[optax.Updates, WithEmaState]:
    _state.require_params(params, 'emax.with_ema')
    _tree.check_updates(params, updates)  # before the optimizer's own error
    inner = optax.with_extra_args_support(self.optimizer)
    average = optax.with_extra_args_support(self.average)
    new_updates, inner_state = inner.update(updates, state.inner_state,
                                            params, **extra_args)
    new_updates, ema_state = on_real_steps(
        state.inner_state, inner_state,
        lambda: average.update(new_updates, state.ema_state, params,
                               **extra_args),
        (new_updates, state.ema_state))
    return new_updates, WithEmaState(inner_state, ema_state)


def with_ema(optimizer: optax.GradientTransformation,
             decay: _options.RatesLike | None = None, *,
             step_size: _options.RatesLike | None = None,
             average: optax.GradientTransformation | None = None,
             **options: Any) -> optax.GradientTransformationExtraArgs:
  """``optimizer`` followed by averages of the params it produces.

  The way to add an average to an optimizer: it runs ``optimizer.update``
  and then averages ``params + updates``, the params after the step, so it
  cannot be placed before a transformation that changes the updates. Under
  ``optax.MultiSteps`` (as ``optimizer``, or around the result) the average
  moves once per real step, never on micro-steps.

  Args:
    optimizer: any optax ``GradientTransformation`` (extra arguments of its
      ``update``, e.g. ``value`` for line searches, are passed through; so
      is ``finite=``, to the average).
    decay: as :func:`emax.ema`: a float, 0-d array, schedule, or a mapping
      ``{name: decay}`` for named averages.
    step_size: instead of ``decay``, as :func:`emax.ema`.
    average: instead of ``decay`` or ``step_size`` and the options, an
      averaging transformation used as it is: ``emax.ema(...)`` or
      ``emax.bema(...)``.
    **options: the options of :func:`emax.ema` (``debias``,
      ``update_every``, ``write_back_every``...), stated there once.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`emax.WithEmaState`; :func:`emax.ema_params` (and
    :func:`emax.bema_params`) read it directly. Built twice from the same
    ``optimizer`` and ``average`` objects, the results compare equal.

  Raises:
    TypeError: if ``optimizer`` is not an optax transformation, ``average``
      is not one or comes with a decay or options, or an option is unknown;
      otherwise as :func:`emax.ema`.
    ValueError: (at ``init``) if ``optimizer`` holds an ``optax.MultiSteps``
      below its top, where micro-steps cannot be told from real steps.

  Examples:
    >>> import jax.numpy as jnp, optax, emax
    >>> params = {'w': jnp.array([1.0, 2.0])}
    >>> tx = emax.with_ema(optax.sgd(0.1), 0.9)
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update({'w': jnp.array([1.0, 1.0])},
    ...                                opt_state, params)
    >>> emax.ema_params(opt_state)['w']
    Array([0.99, 1.99], dtype=float32)
    >>> tx = emax.with_ema(optax.sgd(0.1), average=emax.bema(burn_in=10))
  """
  if not _is_transformation(optimizer):
    raise TypeError(
        'emax.with_ema expected an optax optimizer (a GradientTransformation'
        f' such as optax.adam(1e-3)), got {type(optimizer).__name__} instead.')
  if average is None:
    if _is_transformation(decay):
      raise TypeError(
          'emax.with_ema got a transformation as decay; pass it as average:'
          ' emax.with_ema(opt, average=emax.bema()).')
    average = ema(decay, step_size=step_size, **options)
  else:
    check_average(average, 'emax.with_ema')
    given = [k for k, v in (('decay', decay), ('step_size', step_size))
             if v is not None] + sorted(options)
    if given:
      raise TypeError(
          f'emax.with_ema got average= and also {given}; give those to the'
          ' averaging transformation itself, e.g. emax.with_ema(opt,'
          ' average=emax.ema(0.999, debias=True)).')
  return optax.GradientTransformationExtraArgs(_Init(optimizer, average),
                                               _Update(optimizer, average))
