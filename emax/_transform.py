"""``ema()``: the optax GradientTransformation, and reading its average."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

from emax import _core
from emax import _offload
from emax import _packed
from emax import _tree

PyTree = Any
Decay = Union[float, Callable[[jax.Array], jax.typing.ArrayLike]]


def _check_int(value: Any, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
      value < minimum):
    raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}.')
  return int(value)


def _apply_leaf(p: Any, u: Any) -> Any:
  if p is None:
    return None
  p = jnp.asarray(p)
  if u is None or jnp.result_type(u) == jax.dtypes.float0 or (
      not _tree.is_float(p) and not jnp.issubdtype(
          jnp.result_type(u), jnp.number)):
    return p
  return jnp.asarray(p + u).astype(p.dtype)


def apply_updates(params: PyTree, updates: PyTree,
                  average: PyTree = None) -> PyTree:
  """``params + updates`` as ``optax.apply_updates`` computes it.

  Non-float params whose update is ``None`` or float0 (what ``jax.grad``
  gives for int inputs) keep their value. Given a packed ``average``, the
  result comes in its layout (the same values, gathered).
  """
  return _packed.apply_updates(average, params, updates, _apply_leaf)


def _all_finite(tree: PyTree) -> jax.Array:
  """Whether every float leaf is free of NaN and Inf (a bool scalar).

  ``x - x`` is exactly zero for a finite ``x`` and NaN otherwise, so the sum
  of ``x - x`` is finite exactly when all of ``x`` is; it cannot overflow.
  XLA on CPU reduces a float sum about twice as fast as ``all(isfinite)``.
  """
  flags = [jnp.isfinite(jnp.sum(x - x)) for x in jax.tree.leaves(tree)
           if _tree.is_float(x)]
  if not flags:
    return jnp.asarray(True)
  return jnp.stack(flags).all()


def ema(decay: Decay, *, debias: bool = False, accumulator_dtype: Any = None,
        update_every: int = 1, start_step: int = 0,
        skip_nonfinite: bool = True, offload: bool = False,
        pack: bool | int = False) -> optax.GradientTransformation:
  r"""Track an exponential moving average of the parameters.

  Place it last in an ``optax.chain``: it sees the final updates and the
  params before them, and averages the params as they will be after this
  step, ``params + updates``. Updates pass through unchanged. Read the
  average with :func:`emax.ema_params`.

  .. math:: \text{ema}_t = \text{ema}_{t-1} - (1 - d_t)(\text{ema}_{t-1} - \theta_t)

  Args:
    decay: ``d`` in ``[0, 1]``, or a schedule ``step -> d`` (any optax
      schedule, or :func:`emax.tf_decay` and friends), called with the number
      of steps taken before this one (0 on the first). Values a schedule
      returns are clipped into ``[0, 1]``.
    debias: start the average at zero and divide it by the accumulated weight
      when read (Adam-style bias correction), instead of starting it as a copy
      of the params (TensorFlow's default).
    accumulator_dtype: dtype of the averages of float params; by default
      float32 for bf16 and f16 params, the param's own dtype otherwise.
    update_every: average only on steps ``k, 2k, 3k, ...`` (counting from 1),
      with decay ``d ** k``, so that the time constant in steps stays that of
      averaging every step. Steps in between neither read the params nor
      write the average (a select with a scalar predicate, no copy).
    start_step: the first ``start_step`` steps copy the params into the
      average; averaging begins with step ``start_step + 1``.
    skip_nonfinite: when any new float param is NaN or Inf, leave the average
      as it was for the whole step and count the step in
      ``EmaState.skipped``. Training goes on; the average is never poisoned.
      Only steps that would change the average are checked (not the steps
      in between ``update_every`` steps).
    offload: keep the average in host memory (``memory_kind='pinned_host'``,
      the params' sharding otherwise) so it costs no accelerator memory
      between steps. Each step moves it to the device, averages, and moves it
      back: two transfers of the average per step, also with
      ``update_every > 1`` (the move is outside the step's control flow).
      :func:`emax.ema_params` returns the average on the device. When
      donating to ``jit``, donate the params and the optax state together
      in a step that returns them in the same order, or give ``jit`` both
      ``in_shardings`` and ``out_shardings``: otherwise jax 0.10.2 may pair a
      donated host buffer with a device output of the same shape.
    pack: hold the averages of small single-device float leaves (at most
      ``2**15`` elements, or ``pack`` elements for an int) in a few
      contiguous buffers: a step over many small leaves becomes a few kernels
      instead of one per leaf (see :func:`emax.init`). The state's ``ema`` is
      then a packed tree; read it with :func:`emax.ema_params`.

  Returns:
    An ``optax.GradientTransformation`` whose state is an
    :class:`emax.EmaState`. Its ``update`` requires ``params``.

  Raises:
    ValueError: if ``decay`` is a number outside ``[0, 1]``, or
      ``update_every`` / ``start_step`` / ``accumulator_dtype`` are invalid.
    TypeError: if ``decay`` is neither a number nor a callable.

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
  if callable(decay):
    schedule = decay
  elif isinstance(decay, numbers.Real) and not isinstance(decay, bool):
    _core.check_decay(decay)
    schedule = None
  else:
    raise TypeError(
        'decay must be a float in [0, 1] or a schedule step -> decay, got'
        f' {type(decay).__name__} instead.')
  update_every = _check_int(update_every, 'update_every', 1)
  start_step = _check_int(start_step, 'start_step', 0)
  acc = _tree.check_accumulator_dtype(accumulator_dtype)
  _core.check_layout(pack, offload)
  debias = bool(debias)

  def decay_at(count):
    if schedule is None:
      d = jnp.asarray(decay, jnp.float32)
    else:
      d = jnp.clip(_core.as_decay(schedule(count)), 0.0, 1.0)
    return d ** update_every if update_every > 1 else d

  def init_fn(params):
    return _core.init(params, debias=debias, accumulator_dtype=acc,
                      offload=offload, pack=pack)

  def update_fn(updates, state, params=None):
    state = _core.check_state(state, 'emax.ema')
    if params is None:
      raise ValueError(
          'emax.ema needs the params: call tx.update(updates, opt_state,'
          ' params). It averages the params after this step, params +'
          ' updates, so it cannot work from the updates alone.')
    if isinstance(state.ema, _packed.PackedTree):
      _tree.check_matches(_packed.shapes_of(state.ema), params,
                          state.param_dtypes)
      new_params = apply_updates(params, updates, state.ema)
    else:
      new_params = apply_updates(params, updates)
      _tree.check_matches(state.ema, new_params, state.param_dtypes)
    placed = state.ema  # host-offloaded leaves go to the device and back
    state = state._replace(ema=_offload.to_device(state.ema))
    step = state.count + 1  # 1-based number of this step (int32).
    d = decay_at(state.count)
    if update_every == 1 and start_step == 0:
      scheduled = _core.AVERAGE  # static: every step averages
    else:
      scheduled = jnp.where(
          step <= start_step, _core.COPY,
          jnp.where(step % update_every == 0, _core.AVERAGE, _core.KEEP))
    if not skip_nonfinite:
      ok = jnp.asarray(True)
    elif isinstance(scheduled, int):
      # Inside a train step XLA computes params + updates once, for the
      # user's new params, this check and the average alike. (Keeping the
      # check's sum apart behind an optimization barrier halved its cost in
      # a standalone tx.update but tripled it inside a train step.)
      ok = _all_finite(apply_updates(params, updates))
    else:  # steps that keep the average need not read the params at all
      ok = lax.cond(scheduled != _core.KEEP,
                    lambda: _all_finite(apply_updates(params, updates)),
                    lambda: jnp.asarray(True))
    mode = jnp.where(ok, scheduled, _core.KEEP) if skip_nonfinite else (
        scheduled)
    ema, weight = _core.select_step(state, new_params, d, mode)

    new_state = state._replace(
        count=optax.safe_increment(state.count),
        ema=_offload.place_like(ema, placed),
        weight=weight,
        skipped=jnp.where(ok, state.skipped,
                          optax.safe_increment(state.skipped)),
    )
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def get_ema_state(opt_state: Any) -> _core.EmaState:
  """The one :class:`emax.EmaState` inside an optax state.

  Looks through any nesting of optax states (``chain``, ``named_chain``,
  ``masked``, ``MultiSteps``, ``inject_hyperparams``, dicts, lists).

  Raises:
    ValueError: if ``opt_state`` holds no :class:`EmaState` (for example a
      checkpoint restored without a target, which gives plain dicts) or more
      than one.

  Examples:
    >>> import jax.numpy as jnp, optax, emax
    >>> tx = optax.chain(optax.adam(1e-3), emax.ema(0.999))
    >>> emax.get_ema_state(tx.init({'w': jnp.zeros(3)})).count
    Array(0, dtype=int32)
  """
  if isinstance(opt_state, _core.EmaState):
    return opt_state
  found = [x for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, _core.EmaState))
           if isinstance(x, _core.EmaState)]
  if len(found) == 1:
    return found[0]
  if found:
    raise ValueError(
        f'Found {len(found)} emax.EmaState in the optax state, expected'
        ' exactly one. Pass the one you mean, e.g. emax.ema_params(state[1])'
        ' or emax.ema_params(optax.tree.get(state, ...)).')
  restored = any(_core.looks_restored(x) for x in _dicts(opt_state))
  hint = _core.RESTORE_HINT if restored else (
      ' Chain emax.ema(...) into the optimizer, e.g.'
      ' optax.chain(optax.adam(1e-3), emax.ema(0.999)).')
  raise ValueError(
      f'Expected an emax.EmaState or an optax state holding one, got'
      f' {type(opt_state).__name__} with none inside.{hint}')


def _dicts(tree: Any):
  """Every dict in a nested container (for error messages only)."""
  stack = [tree]
  while stack:
    x = stack.pop()
    if isinstance(x, dict):
      yield x
      stack.extend(x.values())
    elif isinstance(x, (list, tuple)):
      stack.extend(x)


def ema_params(state: Any) -> PyTree:
  """The averaged params to evaluate with.

  Debiased when the average was started with ``debias=True``, and in the
  dtypes of the params that were averaged (a bf16 param accumulated in
  float32 comes back as bf16). The arrays are fresh: donating the state
  afterwards does not invalidate them.

  Args:
    state: an :class:`emax.EmaState`, or any optax state that holds exactly
      one (inside ``chain``, ``masked``, ``MultiSteps``,
      ``inject_hyperparams``, named chains...).

  Returns:
    A tree like the params.

  Raises:
    ValueError: if ``state`` holds no :class:`EmaState`, or several.

  Examples:
    >>> import jax.numpy as jnp, emax
    >>> state = emax.init({'w': jnp.ones(2, jnp.bfloat16)}, debias=True)
    >>> state = emax.update(state, {'w': jnp.ones(2, jnp.bfloat16)}, 0.9)
    >>> emax.ema_params(state)
    {'w': Array([1, 1], dtype=bfloat16)}
  """
  return _core.read(get_ema_state(state))
