"""BEMA: an exponential moving average without the lag (Block and Zhang, 2025).

An EMA lags behind the params it averages. BEMA ("EMA Without the Lag:
Bias-Corrected Iterate Averaging Schemes") corrects the lag at read time:

.. math:: \\theta^{\\text{BEMA}}_t = \\alpha_t (\\theta_t - \\theta_0) + \\text{EMA}_t

with :math:`\\alpha_t = (\\rho + \\gamma t)^{-\\eta}`, where the EMA uses the
step size :math:`\\beta_t = (\\rho + \\gamma t)^{-\\kappa}` and
:math:`\\theta_0` is a snapshot of the params taken at the end of the burn-in.

Here it is one emax state with two named averages, updated by the one step
function: ``'ema'`` with step size :math:`\\beta_t` and ``'snapshot'`` with
step size 0 (it only ever copies, during the burn-in). The conventions follow
TRL's ``BEMACallback``: ``t`` is the number of optimizer steps taken (the
global step), the first ``burn_in`` steps copy the params into both, and
updates happen on steps ``burn_in + k * update_every``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import Params

from emax import _options
from emax import _read
from emax import _state
from emax import _transform
from emax import _tree
from emax._state import EmaState

NAMES = ('ema', 'snapshot')


class _BemaFields(NamedTuple):
  kappa: float = 0.5
  eta: float = 0.2
  rho: float = 10.0
  gamma: float = 1.0
  burn_in: int = 0
  update_every: int = 1
  min_step_size: float = 0.0


@jax.tree_util.register_static
class BemaConfig(_BemaFields):
  """The hyper-parameters of a BEMA average (static: no leaves).

  Attributes:
    kappa: the EMA's step-size exponent.
    eta: the bias correction's exponent.
    rho: the lag, the offset of the step count.
    gamma: the multiplier of the step count.
    burn_in: steps before the snapshot (``tau``).
    update_every: steps between updates (``phi``).
    min_step_size: a floor of the EMA's step size.
  """

  __slots__ = ()

  def step_size(self, count: jax.typing.ArrayLike) -> jax.Array:
    """``beta`` of the update after ``count`` steps (at step ``count + 1``)."""
    t = jnp.asarray(count).astype(jnp.float32) + 1.0
    return jnp.maximum((self.rho + self.gamma * t) ** -self.kappa,
                       jnp.float32(self.min_step_size))

  def correction(self, count: jax.typing.ArrayLike) -> jax.Array:
    """``alpha`` after ``count`` steps."""
    t = jnp.asarray(count).astype(jnp.float32)
    return (self.rho + self.gamma * t) ** -self.eta


class BemaState(NamedTuple):
  """The state of :func:`emax.bema`.

  Attributes:
    ema_state: an :class:`emax.EmaState` with the named averages ``'ema'``
      (the EMA) and ``'snapshot'`` (the params at the end of the burn-in).
    config: static :class:`BemaConfig`.
  """

  ema_state: EmaState
  config: BemaConfig


def bema(*, kappa: float = 0.5, eta: float = 0.2, rho: float = 10.0,
         gamma: float = 1.0, burn_in: int = 0, update_every: int = 1,
         min_step_size: float = 0.0,
         **options: Any) -> optax.GradientTransformationExtraArgs:
  r"""A BEMA average of the params (Block and Zhang, 2025).

  Keeps an EMA with step size :math:`\beta_t = (\rho + \gamma t)^{-\kappa}` and
  a snapshot :math:`\theta_0` of the params at the end of the burn-in; read
  with :func:`emax.bema_params`, which removes the EMA's lag:
  :math:`\alpha_t (\theta_t - \theta_0) + \text{EMA}_t`,
  :math:`\alpha_t = (\rho + \gamma t)^{-\eta}`. ``t`` counts optimizer steps
  (the first step is ``t = 1``), as TRL's ``BEMACallback`` does; its
  defaults are these (and ``update_every=400``). Place it last in a chain,
  or pass it to :func:`emax.with_ema` as the average.

  Args:
    kappa: the EMA's step-size exponent, ``>= 0``.
    eta: the bias correction's exponent, ``>= 0``.
    rho: the lag, ``> 0``.
    gamma: the multiplier of the step count, ``> 0``.
    burn_in: the first ``burn_in`` steps copy the params into the EMA and the
      snapshot (``tau``); the reads give the params themselves until then.
    update_every: update the EMA every this many steps after the burn-in
      (``phi``), with the step size of that step.
    min_step_size: a floor for :math:`\beta_t` (TRL's
      ``min_ema_multiplier``).
    **options: options of :func:`emax.ema` that make sense here:
      ``accumulator_dtype``, ``skip_nonfinite``, ``offload``, ``pack``,
      ``rounding``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`emax.BemaState`.

  Raises:
    ValueError: for an out-of-range hyper-parameter; TypeError for an
      option that does not apply (``decay``, ``update_every`` of the EMA...).

  Examples:
    >>> import jax.numpy as jnp, optax, emax
    >>> params = {'w': jnp.zeros(2)}
    >>> tx = emax.with_ema(optax.sgd(1.0), average=emax.bema())
    >>> opt_state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, opt_state = tx.update({'w': -jnp.ones(2)}, opt_state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> emax.bema_params(opt_state, params)['w']
    Array([3.2003694, 3.2003694], dtype=float32)
  """
  allowed = {'accumulator_dtype', 'skip_nonfinite', 'offload', 'pack',
             'rounding'}
  extra = sorted(set(options) - allowed)
  if extra:
    raise TypeError(
        f'emax.bema got options it does not take: {extra}. It sets the EMA\'s'
        f' rates and schedule of steps itself; it takes {sorted(allowed)}.')
  config = BemaConfig(
      kappa=_options.positive(kappa, 'kappa', zero=True),
      eta=_options.positive(eta, 'eta', zero=True),
      rho=_options.positive(rho, 'rho'),
      gamma=_options.positive(gamma, 'gamma'),
      burn_in=_options.check_int(burn_in, 'burn_in', 0),
      update_every=_options.check_int(update_every, 'update_every', 1),
      min_step_size=_options.check_constant(min_step_size, 'min_step_size'))
  average = _transform.ema(
      step_size={'ema': config.step_size, 'snapshot': 0.0},
      start_step=config.burn_in, update_every=config.update_every,
      first_update=config.burn_in + config.update_every, per_update=True,
      **options)

  def init_fn(params: Params) -> BemaState:
    return BemaState(average.init(params), config)

  def update_fn(updates: optax.Updates, state: BemaState,
                params: Params | None = None, *,
                finite: jax.typing.ArrayLike | None = None,
                **extra_args: Any) -> tuple[optax.Updates, BemaState]:
    del extra_args  # other transformations' extra arguments
    if not isinstance(state, BemaState):
      raise ValueError(
          f'emax.bema expected its BemaState, got {type(state).__name__}.')
    updates, ema_state = average.update(updates, state.ema_state, params,
                                        finite=finite)
    return updates, BemaState(ema_state, state.config)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def bema_params(state: optax.OptState, params: Params) -> Params:
  r"""The BEMA params: the EMA with its lag removed, in the params' dtypes.

  :math:`\alpha_t (\theta_t - \theta_0) + \text{EMA}_t` with the current
  params :math:`\theta_t`, computed in the accumulator dtype. Before the
  burn-in ends this is the params themselves. One call in an ``eval_step``;
  jittable.

  Args:
    state: a :class:`emax.BemaState`, or any state holding exactly one (the
      state of ``emax.with_ema(optimizer, average=emax.bema())``, an optax
      chain).
    params: the current params (after the latest step).

  Returns:
    A tree shaped like the params, in their dtypes.

  Raises:
    ValueError: if ``state`` holds no :class:`emax.BemaState` or several, or
      ``params`` do not match it.
  """
  found = _state.all_states(state, BemaState)
  if len(found) != 1:
    raise ValueError(
        'emax.bema_params expected a BemaState or a state holding exactly'
        f' one (from emax.bema()), found {len(found)}.')
  bema_state = found[0]
  ema_state = _state.check_state(bema_state.ema_state, 'emax.bema_params')
  _state.require_params(params, 'emax.bema_params')
  params = _tree.as_arrays(params)
  ema = _read.ema_params(ema_state, 'ema', dtypes='accumulator')
  snapshot = _read.ema_params(ema_state, 'snapshot',
                             dtypes='accumulator')
  _tree.check_matches(ema, params, ema_state.info.param_dtypes)
  alpha = bema_state.config.correction(ema_state.count)

  def leaf(e: Any, s: Any, p: Any, dtype: Any) -> Any:
    if not _tree.is_float(e):
      return _tree.copy_leaf(p, dtype)
    a = alpha.astype(e.dtype)
    return (a * (p.astype(e.dtype) - s) + e).astype(dtype)

  leaves, treedef = jax.tree.flatten(ema)
  return jax.tree.unflatten(treedef, [
      leaf(e, s, p, dtype) for e, s, p, dtype in zip(
          leaves, jax.tree.leaves(snapshot), jax.tree.leaves(params),
          ema_state.info.param_dtypes)])
