"""EmaState, init, update and bias correction: pure functions over pytrees."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from emax import _offload
from emax import _packed
from emax import _tree

PyTree = Any
ArrayLike = Any


class EmaState(NamedTuple):
  """The state of an exponential moving average of a pytree.

  A ``NamedTuple``: it checkpoints as plain arrays, is found by
  ``optax.tree.get(opt_state, 'ema')``, and works as a ``lax.scan`` carry (no
  dtype ever changes across updates).

  Attributes:
    count: int32 scalar, the number of steps taken (saturates at the int32
      maximum instead of wrapping).
    ema: the averages, a tree like the params. Float leaves are held in their
      accumulator dtype and are never debiased in place; non-float leaves hold
      the latest value of the param. With ``pack`` (see :func:`init`) it is a
      ``PackedTree`` that holds the small float leaves in a few contiguous
      buffers; :func:`emax.ema_params` reads either form.
    weight: float32 scalar, the total weight the average has accumulated:
      ``1 - prod(decay)`` over the averaging steps when it started at zero
      (``debias=True``), exactly ``1`` when it started as a copy of the params.
      The debiased average is ``ema / weight``, right for any decay sequence.
    skipped: int32 scalar, steps whose new params held a NaN or Inf and so
      left the average as it was.
    param_dtypes: static (not a leaf): the dtypes of the averaged params, so
      that :func:`emax.ema_params` returns them in those dtypes.
  """

  count: jax.Array
  ema: PyTree
  weight: jax.Array
  skipped: jax.Array
  param_dtypes: _tree.ParamDtypes


def _require_params(params: PyTree, where: str) -> None:
  if params is None:
    raise ValueError(
        f'{where} needs the params, got None. emax averages the parameters'
        ' themselves; call it with the current params (for an optax'
        ' transformation: tx.update(updates, opt_state, params)).'
    )


RESTORE_HINT = (
    ' A checkpoint restored without a target gives plain dicts like this one.'
    ' Restore with a target instead, for example'
    ' ocp.args.StandardRestore(jax.eval_shape(tx.init, params)) for an optax'
    ' state, or jax.eval_shape(emax.init, params) for a bare EmaState; for a'
    ' whole train state, emax.checkpoint.restore(manager, fresh_state) or'
    ' ocp.args.StandardRestore(emax.checkpoint.abstract_state(fresh_state)).'
)


def looks_restored(x: Any) -> bool:
  """Whether ``x`` is a dict shaped like an :class:`EmaState`."""
  return isinstance(x, dict) and {'count', 'ema', 'weight'} <= set(x)


def check_state(state: Any, where: str) -> EmaState:
  """Raises a clear error when ``state`` is not an :class:`EmaState`."""
  if isinstance(state, EmaState):
    return state
  hint = RESTORE_HINT if looks_restored(state) else ''
  raise ValueError(
      f'{where} expected an emax.EmaState, got {type(state).__name__}'
      f' instead.{hint}'
  )


def check_decay(decay: Any, name: str = 'decay') -> None:
  """Raises ``ValueError`` for a Python number decay outside ``[0, 1]``."""
  if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
    return
  if not 0.0 <= float(decay) <= 1.0:  # also False for NaN
    raise ValueError(
        f'{name} must be in [0, 1], got {decay!r} instead. A decay of 0.999'
        ' averages over about 1 / (1 - 0.999) = 1000 steps.'
    )


def check_layout(pack: Any, offload: bool) -> int:
  """Validates ``pack`` and ``offload``; returns the largest leaf to pack."""
  max_size = _packed.check_pack(pack)
  if max_size and offload:
    raise ValueError('pack and offload cannot be combined: pack speeds up'
                     ' steps on the device, offload keeps the average off'
                     ' it. Choose one.')
  return max_size


def init(params: PyTree, *, debias: bool = False,
         accumulator_dtype: Any = None, offload: bool = False,
         pack: bool | int = False) -> EmaState:
  """Starts an exponential moving average of ``params``.

  Args:
    params: any pytree of arrays; ``None`` leaves are allowed.
    debias: if ``False`` (as TensorFlow's shadow variables), the average
      starts as a copy of ``params``. If ``True`` it starts at zero and is read
      through :func:`bias_correction` (what :func:`ema_params` does).
    accumulator_dtype: dtype of the float accumulators. By default float32
      for floats narrower than 32 bits (bf16, f16), the param's own dtype
      otherwise.
    offload: keep the averages in host memory (``memory_kind='pinned_host'``,
      same sharding otherwise), so they cost no accelerator memory between
      steps. :func:`update` and :func:`ema_params` bring them to the device
      and back, whichever memory the state's arrays are in.
    pack: hold the averages of small float leaves (at most ``2**15``
      elements, or at most ``pack`` elements for an int) that sit on a single
      device in a few contiguous buffers, so that a step over many small
      leaves is a few kernels instead of one per leaf. ``state.ema`` is then
      a ``PackedTree`` (read it with :func:`ema_params`); sharded and
      replicated leaves are never packed. Not with ``offload``.

  Returns:
    An :class:`EmaState`. Its arrays are fresh buffers: they never alias
    ``params``, so both can be donated to a jitted step. Each keeps the
    sharding of its param, eagerly and under ``jit``.

  Raises:
    ValueError: if ``params`` is ``None``, ``accumulator_dtype`` is not a
      floating dtype, or ``offload=True`` on devices without pinned host
      memory.

  Examples:
    >>> import jax.numpy as jnp, emax
    >>> state = emax.init({'w': jnp.ones(2, jnp.bfloat16)})
    >>> state.ema['w'].dtype, state.weight
    (dtype('float32'), Array(1., dtype=float32))
  """
  _require_params(params, 'emax.init')
  acc = _tree.check_accumulator_dtype(accumulator_dtype)
  if offload:
    _offload.check_supported(params)
  max_size = check_layout(pack, offload)

  def leaf(p):
    p = jnp.asarray(p) if not isinstance(p, jax.Array) else p
    dtype = _tree.accumulator_dtype_for(p.dtype, acc)
    if debias and _tree.is_float(p):
      out = _tree.zeros_like_sharded(p, dtype)
    else:
      out = _tree.copy_leaf(p, dtype)
    return _offload.to_host(out) if offload else out

  leaves = jax.tree.leaves(params)
  dtypes = _tree.ParamDtypes(tuple(jnp.asarray(p).dtype for p in leaves))
  return EmaState(
      count=jnp.zeros([], jnp.int32),
      ema=_packed.pack_averages(jax.tree.map(leaf, params), params,
                                max_size),
      weight=jnp.asarray(0.0 if debias else 1.0, jnp.float32),
      skipped=jnp.zeros([], jnp.int32),
      param_dtypes=dtypes,
  )


def as_decay(decay: ArrayLike) -> jax.Array:
  """A decay as a float32 scalar, as TensorFlow converts it."""
  decay = jnp.asarray(decay)
  if decay.ndim != 0:
    raise ValueError(
        f'decay must be a scalar, got an array of shape {decay.shape}.'
    )
  return decay.astype(jnp.float32)


def lerp(average: jax.Array, param: jax.Array, one_minus_decay: jax.Array):
  """``average - (1 - decay) * (average - param)`` in the average's dtype.

  The exact expression of ``tf.train.ExponentialMovingAverage``, so float32
  results equal TensorFlow's to the bit.
  """
  dtype = average.dtype
  diff = average - param.astype(dtype)
  step = one_minus_decay.astype(dtype) * diff
  # XLA's CPU and GPU backends contract ``a - c * d`` into one fused
  # multiply-add, which rounds once where TensorFlow rounds twice. This select
  # is an identity (``c * d`` is NaN whenever ``d`` is) that the contraction
  # cannot see through; it costs no memory traffic.
  step = jnp.where(jnp.isnan(diff), diff, step)
  return average - step


KEEP, COPY, AVERAGE = 0, 1, 2
"""The three kinds of step :func:`select_step` chooses between."""


def select_step(state: EmaState, params: PyTree, decay: ArrayLike, mode):
  """The ``ema`` tree and ``weight`` for a step of kind ``mode``.

  ``mode`` is a scalar (traced or not): :data:`KEEP` leaves the average as it
  was, :data:`COPY` sets it to the params (and the weight to one),
  :data:`AVERAGE` takes one averaging step. The choice is a select inside the
  one fused elementwise pass, not a ``lax.cond`` around it: a conditional
  over the whole average makes XLA copy every buffer on every step, while a
  select with a scalar predicate costs nothing on the steps that keep.
  Non-float leaves always take the new param.
  """
  one_minus = 1 - as_decay(decay)
  params = _packed.like(state.ema, params)

  def pick(averaged, copied, kept):
    if isinstance(mode, int):  # known when tracing: no select at all
      return {AVERAGE: averaged, COPY: copied, KEEP: kept}[mode]()
    return jnp.where(mode == AVERAGE, averaged(),
                     jnp.where(mode == COPY, copied(), kept()))

  def leaf(a, p):
    if not _tree.is_float(a):
      return _tree.copy_leaf(p)
    return pick(lambda: lerp(a, p, one_minus), lambda: p.astype(a.dtype),
                lambda: a)

  ema = jax.tree.map(leaf, state.ema, params)
  one = jnp.ones([], jnp.float32)
  weight = pick(lambda: lerp(state.weight, one, one_minus), lambda: one,
                lambda: state.weight)
  return ema, weight


def update(state: EmaState, params: PyTree, decay: ArrayLike) -> EmaState:
  """One pure step of the moving average.

  Computes, in each float leaf's accumulator dtype, exactly what
  ``tf.train.ExponentialMovingAverage.apply`` does:

  .. math:: \\text{ema} \\leftarrow \\text{ema} - (1 - d)(\\text{ema} - p)

  Non-float leaves take the new value of the param. ``count`` goes up by one
  and ``weight`` moves toward one by the same rule, so
  :func:`bias_correction` is right for any sequence of decays.

  Args:
    state: an :class:`EmaState` from :func:`init`.
    params: the new params, a tree like the one given to :func:`init`.
    decay: a Python float in ``[0, 1]`` or a scalar array (used as float32,
      as TensorFlow does).

  Returns:
    The new :class:`EmaState`.

  Raises:
    ValueError: if ``params`` is ``None``, does not match the state
      (structure, shapes, or a float leaf that became non-float), if
      ``decay`` is a number outside ``[0, 1]``, or if ``state`` is not an
      :class:`EmaState`.

  Examples:
    >>> import jax.numpy as jnp, emax
    >>> state = emax.init({'w': jnp.zeros(())})
    >>> state = emax.update(state, {'w': jnp.array(5.0)}, 0.1)
    >>> state.ema['w']
    Array(4.5, dtype=float32)
  """
  state = check_state(state, 'emax.update')
  _require_params(params, 'emax.update')
  check_decay(decay)
  _tree.check_matches(_packed.shapes_of(state.ema), params,
                      state.param_dtypes)
  placed = state.ema  # host-offloaded leaves go to the device and back
  state = state._replace(ema=_offload.to_device(state.ema))
  ema, weight = select_step(state, params, decay, AVERAGE)
  return state._replace(count=optax.safe_increment(state.count),
                        ema=_offload.place_like(ema, placed), weight=weight)


def bias_correction(average: PyTree, weight: ArrayLike) -> PyTree:
  """Divides each float leaf of ``average`` by the accumulated ``weight``.

  ``weight`` is the weight the average has gathered, ``1 - prod(decay)`` for
  an average that started at zero (:attr:`EmaState.weight` tracks it for any
  decay sequence). A weight of exactly one leaves the values unchanged to the
  bit; a weight of zero (nothing averaged yet) returns the leaf unchanged
  rather than dividing by zero. Non-float leaves are returned as they are.

  Args:
    average: a tree of (biased) averages.
    weight: a scalar, the accumulated weight.

  Returns:
    The debiased tree, leaves in their own dtypes.

  Examples:
    >>> import jax.numpy as jnp, emax
    >>> emax.bias_correction({'w': jnp.array(0.9)}, 0.1 + 0.9 * 0.1)
    {'w': Array(4.736842, dtype=float32)}
  """
  weight = jnp.asarray(weight)

  def leaf(a):
    if not _tree.is_float(a):
      return a
    w = weight.astype(a.dtype)
    return jnp.where(w == 0, a, a / jnp.where(w == 0, jnp.ones_like(w), w))

  return jax.tree.map(leaf, average)


def read(state: EmaState) -> PyTree:
  """The (debiased) averages of ``state`` in the dtypes of the params."""
  state = check_state(state, 'emax.ema_params')
  debiased = bias_correction(_offload.to_device(state.ema), state.weight)
  debiased = _packed.unpack(debiased)
  leaves, treedef = jax.tree.flatten(debiased)
  out = [_tree.copy_leaf(x, dtype)
         for x, dtype in zip(leaves, state.param_dtypes.dtypes)]
  return jax.tree.unflatten(treedef, out)
