"""The optax doors onto the step: :func:`ema` and :func:`with_ema`."""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax import Params

from emax import _options
from emax import _read
from emax import _state
from emax import _step
from emax import _tree
from emax._state import EmaState


def _write_back(updates: Params, state: EmaState, params: Params,
                every: int, name: Optional[str]) -> Params:
  """``updates`` that move ``params`` onto the average on write-back steps.

  On steps ``every, 2 every, ...`` each float update becomes ``average -
  params`` in the update's dtype (at least the param's), so that
  ``optax.apply_updates(params, updates)`` lands on the average in the
  params' dtype: exactly when the two are within a factor of two of each
  other (Sterbenz), else within one ulp.
  """
  on = (state.count % every == 0) & (state.count > 0)
  target = _read.ema_params(state, name)
  is_none = lambda x: x is None  # noqa: E731

  def leaf(u: Any, p: Any, t: Any) -> Any:
    if u is None or not _tree.is_float(p) or (
        jnp.result_type(u) == jax.dtypes.float0):
      return u
    p = jnp.asarray(p)
    dtype = _tree.promote(jnp.result_type(u), p.dtype)
    moved = t.astype(dtype) - p.astype(dtype)
    return jnp.where(on, moved.astype(jnp.result_type(u)), u)

  return jax.tree.map(leaf, updates, params, target, is_leaf=is_none)


def ema(decay: _options.RateArg = None, *, step_size: _options.RateArg = None,
        debias: bool = False, accumulator_dtype: Any = None,
        update_every: Optional[int] = None,
        first_update: Optional[int] = None,
        start_step: Optional[int] = None, per_update: bool = False,
        skip_nonfinite: bool = True, offload: bool = False,
        pack: bool | int = False, rounding: str = 'tensorflow',
        write_back_every: Optional[int] = None,
        write_back: Optional[str] = None
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
      float64 on the host.
    debias: start each average with zero weight and divide by the weight it
      has gathered when read (Adam-style bias correction), instead of
      starting it as a copy of the params (TensorFlow's default).
    accumulator_dtype: dtype of the averages of float params; by default
      float32 for bf16 and f16 params, the param's own dtype otherwise.
    update_every: average only on every ``update_every``-th step (see
      ``first_update``; ``None`` means 1). By default the decay stays per step: an averaging
      step uses ``d ** update_every`` (step size ``1 - (1 - c) **
      update_every``, computed without cancellation), so the time constant in
      steps stays that of averaging every step. Steps in between neither read
      the params nor write the average.
    first_update: the first averaging step (steps count from 1); averaging
      steps are then ``first_update + j * update_every``. Default:
      ``update_every``.
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
      :func:`emax.ema_params` returns the average on the device.
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
    write_back: with named averages, the name of the one to write back.

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
  if write_back_every is not None:
    write_back_every = _options.check_int(write_back_every,
                                          'write_back_every', 1)
  if write_back is not None and options.names is None:
    raise ValueError(
        f'write_back names an average ({write_back!r}), but there is a single'
        ' unnamed one; leave write_back out.')

  def init_fn(params: Params) -> EmaState:
    return _state.init(params, names=options.names, debias=debias,
                       accumulator_dtype=acc, offload=offload, pack=pack)

  def update_fn(updates: optax.Updates, state: EmaState,
                params: Optional[Params] = None, *, finite: Any = None,
                **extra_args: Any) -> tuple[optax.Updates, EmaState]:
    del extra_args  # other transformations' extra arguments
    if params is None:
      raise ValueError(
          'emax.ema needs the params: call tx.update(updates, opt_state,'
          ' params). It averages the params after this step, params +'
          ' updates, so it cannot work from the updates alone.')
    state = _step.step(options, state, params, updates, where='emax.ema',
                       finite=finite)
    if write_back_every is not None:
      updates = _write_back(updates, state, params, write_back_every,
                            write_back)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_transformation(x: Any) -> bool:
  return hasattr(x, 'init') and hasattr(x, 'update') and not isinstance(
      x, type)


_EMA_DEFAULTS = {
    name: p.default for name, p in inspect.signature(ema).parameters.items()
    if p.kind == inspect.Parameter.KEYWORD_ONLY}


def _is_default(value: Any, default: Any) -> bool:
  return value is default or (type(value) is type(default) and
                              value == default)


class WithEmaState(NamedTuple):
  """The state of :func:`emax.with_ema`.

  Attributes:
    inner_state: the wrapped optimizer's state.
    ema_state: the :class:`emax.EmaState` of the averages.
  """

  inner_state: optax.OptState
  ema_state: EmaState


def with_ema(optimizer: optax.GradientTransformation,
             decay: Any = None, *, step_size: _options.RateArg = None,
             debias: bool = False, accumulator_dtype: Any = None,
             update_every: Optional[int] = None,
             first_update: Optional[int] = None,
             start_step: Optional[int] = None, per_update: bool = False,
             skip_nonfinite: bool = True, offload: bool = False,
             pack: bool | int = False, rounding: str = 'tensorflow',
             write_back_every: Optional[int] = None,
             write_back: Optional[str] = None
             ) -> optax.GradientTransformationExtraArgs:
  """``optimizer`` followed by averages of the params it produces.

  The safe way to add an average to an optimizer: it runs
  ``optimizer.update`` and then averages ``params + updates``, the params
  after the step, so it cannot be placed before a transformation that
  changes the updates. Same as ``optax.chain(optimizer, emax.ema(decay,
  **options))`` placed right, with a state that says what it holds.

  Args:
    optimizer: any optax ``GradientTransformation`` (extra arguments of its
      ``update``, e.g. ``value`` for line searches, are passed through).
    decay: as :func:`emax.ema` (a float, 0-d array, schedule, or a mapping
      for named averages); or an averaging transformation built by
      :func:`emax.ema` or :func:`emax.bema`, used as it is.
    step_size: see :func:`emax.ema`; likewise every other option: debias,
      accumulator_dtype, update_every, first_update, start_step,
      per_update, skip_nonfinite, offload, pack, rounding,
      write_back_every, write_back.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`emax.WithEmaState`; :func:`emax.ema_params` (and
    :func:`emax.bema_params`) read it directly.

  Raises:
    TypeError: if ``optimizer`` is not an optax transformation; otherwise as
      :func:`emax.ema`.

  Examples:
    >>> import jax.numpy as jnp, optax, emax
    >>> params = {'w': jnp.array([1.0, 2.0])}
    >>> tx = emax.with_ema(optax.sgd(0.1), 0.9)
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update({'w': jnp.array([1.0, 1.0])},
    ...                                opt_state, params)
    >>> emax.ema_params(opt_state)['w']
    Array([0.99, 1.99], dtype=float32)
  """
  if not _is_transformation(optimizer):
    raise TypeError(
        'emax.with_ema expected an optax optimizer (a GradientTransformation'
        f' such as optax.adam(1e-3)), got {type(optimizer).__name__} instead.')
  inner = optax.with_extra_args_support(optimizer)
  options = dict(
      step_size=step_size, debias=debias, accumulator_dtype=accumulator_dtype,
      update_every=update_every, first_update=first_update,
      start_step=start_step, per_update=per_update,
      skip_nonfinite=skip_nonfinite, offload=offload, pack=pack,
      rounding=rounding, write_back_every=write_back_every,
      write_back=write_back)
  if _is_transformation(decay):
    given = sorted(k for k, v in options.items()
                   if not _is_default(v, _EMA_DEFAULTS[k]))
    if given:
      raise TypeError(
          'emax.with_ema got an averaging transformation and options'
          f' {given}; give the options to the transformation itself,'
          ' e.g. emax.with_ema(opt, emax.bema(burn_in=100)).')
    average: Any = decay
  else:
    average = ema(decay, **options)

  def init_fn(params: Params) -> WithEmaState:
    return WithEmaState(inner.init(params), average.init(params))

  def update_fn(updates: optax.Updates, state: WithEmaState,
                params: Optional[Params] = None,
                **extra_args: Any) -> tuple[optax.Updates, WithEmaState]:
    if params is None:
      raise ValueError(
          'emax.with_ema needs the params: call tx.update(grads, opt_state,'
          ' params). The average follows params + updates.')
    _tree.check_updates(params, updates)  # before the optimizer's own error
    updates, inner_state = inner.update(updates, state.inner_state, params,
                                        **extra_args)
    updates, ema_state = optax.with_extra_args_support(average).update(
        updates, state.ema_state, params, **extra_args)
    return updates, WithEmaState(inner_state, ema_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
