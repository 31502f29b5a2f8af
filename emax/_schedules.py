"""Decay schedules: pure, jit-safe functions of the 0-based step ``n``.

Each factory validates its Python hyper-parameters once and returns a
``schedule(n) -> decay`` that gives a float32 scalar for an int or array ``n``.
Any of them (or any optax schedule) can be passed as ``decay`` to
:func:`emax.ema`, which calls it with the number of steps taken before the
current one.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from emax import _core

Schedule = Callable[[jax.typing.ArrayLike], jax.Array]


def _step(n) -> jax.Array:
  return jnp.asarray(n).astype(jnp.float32)


def _positive(value, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
      math.isfinite(value) and value > 0):
    raise ValueError(f'{name} must be a finite number > 0, got {value!r}.')
  return float(value)


def tf_decay(decay: float) -> Schedule:
  """TensorFlow's ``num_updates`` warm-up: ``min(decay, (1 + n) / (10 + n))``.

  What ``tf.train.ExponentialMovingAverage(decay, num_updates=n)`` uses, in
  float32 as TensorFlow computes it, so averages match TensorFlow's to the
  bit. Early steps average quickly (0.1 at ``n = 0``), later ones at ``decay``.

  Args:
    decay: the ceiling, in ``[0, 1]``.

  Returns:
    A schedule ``n -> decay``.

  Examples:
    >>> import emax
    >>> schedule = emax.tf_decay(0.99)
    >>> schedule(0), schedule(10000)
    (Array(0.1, dtype=float32), Array(0.99, dtype=float32))
  """
  _core.check_decay(decay)
  ceiling = np.float32(decay)

  def schedule(n):
    n = _step(n)
    return jnp.minimum(ceiling, (1.0 + n) / (10.0 + n))

  return schedule


def inverse_power_decay(max_decay: float, *, inv_gamma: float = 1.0,
                        power: float = 2 / 3,
                        min_decay: float = 0.0) -> Schedule:
  """The warm-up of timm and diffusers: ``1 - (1 + n / inv_gamma) ** -power``.

  Clipped to ``[min_decay, max_decay]``. ``power=2/3`` suits runs of up to a
  few hundred thousand steps, ``power=3/4`` shorter ones.

  Args:
    max_decay: the ceiling, in ``[0, 1]``.
    inv_gamma: the step scale of the warm-up, ``> 0``.
    power: the warm-up exponent, ``> 0``.
    min_decay: the floor, in ``[0, max_decay]``.

  Returns:
    A schedule ``n -> decay``.

  Examples:
    >>> import emax
    >>> schedule = emax.inverse_power_decay(0.9999, power=0.75)
    >>> float(schedule(0)), round(float(schedule(15)), 4)
    (0.0, 0.875)
  """
  _core.check_decay(max_decay, 'max_decay')
  _core.check_decay(min_decay, 'min_decay')
  if min_decay > max_decay:
    raise ValueError(
        f'min_decay ({min_decay}) must not exceed max_decay ({max_decay}).')
  inv_gamma = _positive(inv_gamma, 'inv_gamma')
  power = _positive(power, 'power')

  def schedule(n):
    value = 1.0 - (1.0 + _step(n) / inv_gamma) ** -power
    return jnp.clip(value, np.float32(min_decay), np.float32(max_decay))

  return schedule


def sigma_rel_to_gamma(sigma_rel: float) -> float:
  """The power-function exponent ``gamma`` for a relative width ``sigma_rel``.

  Solves ``sigma_rel**2 = (gamma + 1) / ((gamma + 2)**2 (gamma + 3))`` as
  Karras et al. (2024, EDM2) do.

  Examples:
    >>> import emax
    >>> round(emax.sigma_rel_to_gamma(0.05), 2), round(emax.sigma_rel_to_gamma(0.10), 2)
    (16.97, 6.94)
  """
  sigma_rel = _positive(sigma_rel, 'sigma_rel')
  if sigma_rel >= 1 / math.sqrt(12):  # gamma -> 0 gives sigma_rel**2 -> 1/12
    raise ValueError(
        f'sigma_rel must be in (0, {1 / math.sqrt(12):.4f}), got {sigma_rel}.'
        ' Typical values are 0.05 to 0.10.')
  t = sigma_rel ** -2
  roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
  return float(roots.real.max())


def power_function_decay(gamma: float | None = None, *,
                         sigma_rel: float | None = None) -> Schedule:
  """Karras et al.'s power-function EMA: ``(1 - 1 / (n + 1)) ** (gamma + 1)``.

  Its averaging window grows with training in proportion to the step, so the
  average covers a fixed fraction of the run (EDM2). Give ``gamma`` or the
  relative width ``sigma_rel`` (0.05 gives ``gamma`` about 16.97, 0.10 about
  6.94). The decay is 0 at ``n = 0``: the first step copies the params.

  Args:
    gamma: the exponent, ``> 0``.
    sigma_rel: the relative standard deviation of the averaging profile.

  Returns:
    A schedule ``n -> decay``.

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
    gamma = sigma_rel_to_gamma(sigma_rel)
  gamma = _positive(gamma, 'gamma')
  exponent = np.float32(gamma + 1.0)

  def schedule(n):
    n = _step(n)
    return (1.0 - 1.0 / (n + 1.0)) ** exponent

  return schedule


def half_life_decay(half_life_steps: float) -> Schedule:
  """A constant decay whose weights halve every ``half_life_steps`` steps.

  ``0.5 ** (1 / half_life_steps)``: a param's weight in the average falls to
  half after that many steps.

  Examples:
    >>> import emax
    >>> schedule = emax.half_life_decay(1.0)
    >>> schedule(123)
    Array(0.5, dtype=float32)
  """
  half_life_steps = _positive(half_life_steps, 'half_life_steps')
  decay = np.float32(0.5 ** (1.0 / half_life_steps))

  def schedule(n):
    return jnp.full(jnp.shape(n), decay, jnp.float32)

  return schedule
