"""Decay schedules: pure, jit-safe functions of the 0-based step count ``n``.

Each factory validates its Python hyper-parameters once and returns a
:class:`Schedule`: called with an int or array ``n`` (the number of steps
taken before the current one, as :func:`emax.ema` calls it) it gives the
decay as a float32 scalar, and its :meth:`Schedule.step_size` gives ``1 -
decay`` computed directly, to a fraction of an ulp, where ``1 - decay`` in
float32 would cancel (a decay of 0.99999 has only 8 correct bits left in
``1 - float32(0.99999)``). emax uses the step size whenever a schedule has one;
any other callable (an optax schedule) is used as a decay.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emax import _options

F32 = jnp.float32


class Schedule:
  """A decay schedule ``n -> decay`` that also knows its step size.

  Attributes:
    description: a short text, what ``repr`` shows.
  """

  def __init__(self, decay: Callable[[jax.Array], jax.Array],
               step_size: Callable[[jax.Array], jax.Array],
               description: str, **attributes: Any):
    self._decay = decay
    self._step_size = step_size
    self.description = description
    for key, value in attributes.items():
      setattr(self, key, value)

  def __call__(self, n: jax.typing.ArrayLike) -> jax.Array:
    """The decay at step count ``n``, float32 (shaped like ``n``)."""
    n = _count(n)
    return jnp.broadcast_to(jnp.asarray(self._decay(n), F32), n.shape)

  def step_size(self, n: jax.typing.ArrayLike) -> jax.Array:
    """``1 - decay`` at step count ``n``, float32, without cancellation."""
    n = _count(n)
    return jnp.broadcast_to(jnp.asarray(self._step_size(n), F32), n.shape)

  def __repr__(self) -> str:
    return f'emax.{self.description}'


def _count(n: jax.typing.ArrayLike) -> jax.Array:
  return jnp.asarray(n).astype(F32)


def tf_decay(decay: float, *, after_minimize: bool = False) -> Schedule:
  """TensorFlow's ``num_updates`` warm-up: ``min(decay, (1 + k) / (10 + k))``.

  What ``tf.train.ExponentialMovingAverage(decay, num_updates=k)`` uses, in
  float32 as TensorFlow computes it, so averages match TensorFlow's to the
  bit. Early steps average quickly (decay 0.1 at ``k = 0``), later ones at
  ``decay``. Which ``k`` TensorFlow sees depends on how it is called:

  * ``after_minimize=False`` (default): ``k`` is the number of steps taken
    before this one, as TF2's eager pattern (``ema.apply(...)`` with
    ``num_updates`` read before the optimizer step) and a counter of
    previous updates give it;
  * ``after_minimize=True``: TF1's standard pattern,
    ``ExponentialMovingAverage(d, num_updates=global_step)`` applied after
    ``optimizer.minimize(loss, global_step=global_step)``, which reads the
    global step already incremented by this step: ``k`` is one more.

  Args:
    decay: the ceiling, in ``[0, 1]``.
    after_minimize: count this step too (TF1's ``minimize`` pattern).

  Returns:
    A :class:`Schedule`.

  Examples:
    >>> import emax
    >>> schedule = emax.tf_decay(0.99)
    >>> schedule(0), schedule(10000)
    (Array(0.1, dtype=float32), Array(0.99, dtype=float32))
    >>> float(emax.tf_decay(0.99, after_minimize=True)(0))
    0.18181818723678589
  """
  given = _options.check_constant(decay, 'decay')
  ceiling = np.float32(given)
  shift = 1.0 if _options.check_bool(after_minimize, 'after_minimize') else 0.0

  def decay_at(n: jax.Array) -> jax.Array:
    k = n + shift
    return jnp.minimum(ceiling, (1.0 + k) / (10.0 + k))

  return Schedule(
      decay_at, lambda n: 1.0 - decay_at(n),  # TensorFlow's own order
      f'tf_decay({given!r}'
      f'{", after_minimize=True" if shift else ""})')


def inverse_power_decay(max_decay: float, *, inv_gamma: float = 1.0,
                        power: float = 2 / 3,
                        min_decay: float = 0.0) -> Schedule:
  """The warm-up of timm and diffusers: ``1 - (1 + n / inv_gamma) ** -power``.

  Clipped to ``[min_decay, max_decay]``. ``power=2/3`` suits runs of up to a
  few hundred thousand steps, ``power=3/4`` shorter ones. The step size is
  ``(1 + n / inv_gamma) ** -power`` itself, with no cancellation.

  Args:
    max_decay: the ceiling, in ``[0, 1]``.
    inv_gamma: the step scale of the warm-up, ``> 0``.
    power: the warm-up exponent, ``> 0``.
    min_decay: the floor, in ``[0, max_decay]``.

  Returns:
    A :class:`Schedule`.

  Examples:
    >>> import emax
    >>> schedule = emax.inverse_power_decay(0.9999, power=0.75)
    >>> float(schedule(0)), round(float(schedule(15)), 4)
    (0.0, 0.875)
  """
  max_decay = _options.check_constant(max_decay, 'max_decay')
  min_decay = _options.check_constant(min_decay, 'min_decay')
  if min_decay > max_decay:
    raise ValueError(
        f'min_decay ({min_decay}) must not exceed max_decay ({max_decay}).')
  inv_gamma = _options.positive(inv_gamma, 'inv_gamma')
  power = _options.positive(power, 'power')
  lo, hi = np.float32(1.0 - max_decay), np.float32(1.0 - min_decay)

  def step_size(n: jax.Array) -> jax.Array:
    return jnp.clip((1.0 + n / inv_gamma) ** -power, lo, hi)

  return Schedule(
      lambda n: 1.0 - step_size(n), step_size,
      f'inverse_power_decay({max_decay!r}, inv_gamma={inv_gamma!r},'
      f' power={power!r}, min_decay={min_decay!r})')


def sigma_rel_to_gamma(sigma_rel: float) -> float:
  """The power-function exponent ``gamma`` for a relative width ``sigma_rel``.

  Solves ``sigma_rel**2 = (gamma + 1) / ((gamma + 2)**2 (gamma + 3))`` as
  Karras et al. (2024, EDM2) do.

  Examples:
    >>> import emax
    >>> round(emax.sigma_rel_to_gamma(0.05), 2), round(emax.sigma_rel_to_gamma(0.10), 2)
    (16.97, 6.94)
  """
  sigma_rel = _options.check_sigma_rel(sigma_rel)
  t = sigma_rel ** -2
  roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
  return float(roots.real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
  """The relative width ``sigma_rel`` of a power-function EMA of ``gamma``.

  ``sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))``, the inverse of
  :func:`sigma_rel_to_gamma`.

  Examples:
    >>> import emax
    >>> round(emax.gamma_to_sigma_rel(6.94), 3)
    0.1
  """
  gamma = _options.positive(gamma, 'gamma')
  return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_function_decay(gamma: float | None = None, *,
                         sigma_rel: float | None = None) -> Schedule:
  """Karras et al.'s power-function EMA: ``(1 - 1 / (n + 1)) ** (gamma + 1)``.

  Its averaging window grows in proportion to the step, so the average covers
  a fixed fraction of the run (EDM2); after ``t`` steps it weights the params
  of step ``i`` in proportion to ``i ** gamma``. Give ``gamma`` or the
  relative width ``sigma_rel`` (0.05 gives ``gamma`` about 16.97, 0.10 about
  6.94). The decay is 0 at ``n = 0``: the first step copies the params. The
  step size is computed as ``-expm1((gamma + 1) log1p(-1 / (n + 1)))``, to
  about an ulp at every step count a run can reach (float32 ``(1 - 1/(n +
  1)) ** (gamma + 1)`` loses 1.5% of the step size at a million steps and
  reaches a decay of exactly 1 at ``2**25``). The schedule is invariant to
  the batch size: counting samples instead of steps at a constant batch
  gives the same decays (EDM2 counts images).

  Args:
    gamma: the exponent, ``> 0``.
    sigma_rel: the relative standard deviation of the averaging profile.

  Returns:
    A :class:`Schedule` (with attributes ``gamma`` and ``sigma_rel``).

  Raises:
    ValueError: unless exactly one of ``gamma`` and ``sigma_rel`` is given, or
      if it is out of range.

  Examples:
    >>> import emax
    >>> schedule = emax.power_function_decay(gamma=7.0)
    >>> float(schedule(0)), float(schedule(1))
    (0.0, 0.00390625)
  """
  if (gamma is None) == (sigma_rel is None):
    raise ValueError(
        'power_function_decay takes exactly one of gamma and sigma_rel, got'
        f' gamma={gamma!r}, sigma_rel={sigma_rel!r}.')
  if gamma is None:
    assert sigma_rel is not None
    gamma = sigma_rel_to_gamma(sigma_rel)
  gamma = _options.positive(gamma, 'gamma')
  exponent = np.float32(gamma + 1.0)

  def log_decay(n: jax.Array) -> jax.Array:
    return exponent * jnp.log1p(-1.0 / (n + 1.0))

  return Schedule(
      lambda n: jnp.exp(log_decay(n)), lambda n: -jnp.expm1(log_decay(n)),
      f'power_function_decay(gamma={gamma!r})', gamma=gamma,
      sigma_rel=gamma_to_sigma_rel(gamma))


def half_life_decay(half_life: float, *, batch_size: int | None = None,
                    rampup_ratio: float | None = None) -> Schedule:
  """A decay whose weights halve every ``half_life`` steps (or samples).

  ``0.5 ** (1 / half_life)``: a param's weight in the average falls to half
  after that many steps. With ``batch_size``, ``half_life`` counts samples
  (images, tokens) instead of steps, ``0.5 ** (batch_size / half_life)``, as
  EDM does (``ema_halflife_kimg``): the average then keeps its length in
  samples when the batch size changes, which is the EMA scaling rule of
  Busbridge et al. (2023). With ``rampup_ratio`` the half-life is at most
  that fraction of the samples seen before the step (EDM's
  ``ema_rampup_ratio``; the first step then copies), so early averages forget
  their random start quickly.

  Args:
    half_life: steps (or samples, with ``batch_size``), ``> 0``.
    batch_size: samples per step; ``None`` counts steps.
    rampup_ratio: optional, ``> 0``: the half-life is at most this fraction
      of the samples (or steps) seen before this step.

  Returns:
    A :class:`Schedule`.

  Examples:
    >>> import emax
    >>> emax.half_life_decay(1.0)(123)
    Array(0.5, dtype=float32)
    >>> float(emax.half_life_decay(500_000, batch_size=512)(10_000))
    0.9992904663085938
  """
  half_life = _options.positive(half_life, 'half_life')
  size = 1.0 if batch_size is None else float(_options.check_int(
      batch_size, 'batch_size', 1))
  ratio = (None if rampup_ratio is None else
           _options.positive(rampup_ratio, 'rampup_ratio'))
  log_half = math.log(0.5)

  def log_decay(n: jax.Array) -> jax.Array:
    life = jnp.asarray(half_life, F32)
    if ratio is not None:  # EDM: of the samples seen before this step
      life = jnp.minimum(life, n * size * ratio)
    return log_half * size / jnp.maximum(life, 1e-8)

  return Schedule(
      lambda n: jnp.exp(log_decay(n)), lambda n: -jnp.expm1(log_decay(n)),
      f'half_life_decay({half_life!r}'
      f'{f", batch_size={int(size)}" if batch_size is not None else ""}'
      f'{f", rampup_ratio={ratio!r}" if ratio is not None else ""})')


def scale_decay(decay: float | Callable[[jax.Array], jax.typing.ArrayLike],
                factor: float) -> float | Schedule:
  """The EMA scaling rule: a decay for a batch ``factor`` times larger.

  Busbridge et al. (2023, "How to Scale Your EMA"): when the batch size (and
  with it the learning rate, by the optimizer's own scaling rule) grows by a
  factor ``k``, an average over the same number of samples needs the decay
  ``d ** k``. For a float the result is computed in float64; for a schedule
  (decays ``d(n)``) a new schedule of ``d(n) ** k``, with the step size ``1
  - d ** k`` computed without cancellation.

  Args:
    decay: a float in ``[0, 1]`` or a schedule.
    factor: the batch-size ratio ``k > 0`` (may be fractional).

  Returns:
    A float, or a :class:`Schedule`.

  Examples:
    >>> import emax
    >>> round(emax.scale_decay(0.999, 4), 6)
    0.996006
    >>> float(emax.scale_decay(emax.half_life_decay(10.0), 2)(0))
    0.8705505728721619
  """
  factor = _options.positive(factor, 'factor')
  if not callable(decay):
    return _options.check_constant(decay, 'decay') ** factor
  step_of = getattr(decay, 'step_size', None)

  def log_decay(n: jax.Array) -> jax.Array:
    if step_of is not None:
      return factor * jnp.log1p(-step_of(n))
    return factor * jnp.log(jnp.asarray(decay(n), F32))

  return Schedule(
      lambda n: jnp.exp(log_decay(n)), lambda n: -jnp.expm1(log_decay(n)),
      f'scale_decay({decay!r}, {factor!r})')
