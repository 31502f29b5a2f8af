"""Checkpoint merges that stand in for a learning-rate decay (WSM).

:func:`merge_weights` turns a decay shape into the weights of a merge of
checkpoints; :func:`emax.checkpoint.average` applies them.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Union

import numpy as np

from emax import _options

SHAPES: dict[str, Callable[[float], float]] = {
    'linear': lambda x: 1.0 - x,
    'cosine': lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    '1-sqrt': lambda x: 1.0 - math.sqrt(x),
}
"""The named decay shapes ``f`` on ``[0, 1]``, each with ``f(0) = 1``."""


def merge_weights(k: int, decay: Union[str, Callable[[float], float]]
                  = 'linear') -> np.ndarray:
  r"""The weights of a checkpoint merge that emulates a learning-rate decay.

  Warmup-Stable-Merge (WSM; Tian et al., 2025) trains at a constant learning
  rate and gets the effect of a decay afterwards, by merging the last
  checkpoints. With checkpoints :math:`\theta_n, \dots, \theta_{n+k}` taken
  at equal intervals, :math:`u_i = \theta_{n+i} - \theta_{n+i-1}` the
  update of the :math:`i`-th interval and weights :math:`w_i` of the
  updates, the merge

  .. math::

    \sum_{j=0}^{k} c_j\, \theta_{n+j} = \theta_n + \sum_{i=1}^{k} w_i\, u_i,
    \qquad c_0 = 1 - w_1,\quad c_j = w_j - w_{j+1},\quad c_k = w_k,

  is the constant-rate path with its :math:`i`-th update scaled by
  :math:`w_i` (:math:`w_i = \sum_{j \ge i} c_j`). emax takes
  :math:`w_i = f\big(\tfrac{i-1}{k}\big)` for a decay shape :math:`f` on
  :math:`[0, 1]` with :math:`f(0) = 1`, non-increasing, so that the
  coefficients are non-negative and sum to 1.

  How this discretization relates to the paper's: WSM's mapping from
  :math:`w` to :math:`c` is the one above and holds for any non-increasing
  :math:`1 \ge w_1 \ge \dots \ge w_k \ge 0` (its merged model is
  :math:`\theta_n` minus the gradients weighted by :math:`w_i`); emax fixes
  how :math:`w` is sampled from a shape: :math:`f` at the start of each
  interval, a staircase that holds :math:`f((i-1)/k)` through the
  :math:`i`-th interval and lies on or above the continuous decay. So the
  first interval keeps the full rate (:math:`w_1 = f(0) = 1`, hence
  :math:`c_0 = 0`: the oldest checkpoint anchors the identity but gets no
  weight), and ``'linear'`` is the uniform average of the last ``k``
  checkpoints. Sampling at the end of each interval instead,
  :math:`f(i/k)`, would give the newest checkpoint the weight
  :math:`f(1)`, which is 0 for the three named shapes. When a checkpoint
  interval spans many optimizer steps, the emulated decay is constant
  within each interval.

  The identity is exact for the updates that were taken; a run that really
  decays its learning rate takes other updates (its gradients are taken
  elsewhere), so the merge emulates that run, it does not reproduce it.

  Args:
    k: the number of checkpoint intervals merged, an int ``>= 1``: the merge
      reads the ``k + 1`` checkpoints ``n, ..., n + k`` at equal intervals.
    decay: the decay shape ``f``: ``'linear'`` (``1 - x``), ``'cosine'``
      (``(1 + cos(pi x)) / 2``), ``'1-sqrt'`` (``1 - sqrt(x)``), or a
      callable taking a float ``x`` in ``[0, 1)`` and returning ``f(x)`` in
      ``[0, 1]``, with ``f(0) = 1`` and non-increasing.

  Returns:
    The ``k + 1`` coefficients :math:`c_0, \dots, c_k` as a float64 NumPy
    array, oldest checkpoint first, non-negative, summing to 1 (to
    rounding). Pass them as ``weights=`` to :func:`emax.checkpoint.average`
    with ``steps=`` the ``k + 1`` steps, oldest first (the first step must
    be saved, though its weight 0 means it is not read).

  Raises:
    TypeError: if ``k`` is not an int, or ``decay`` is neither a name nor a
      callable, or it returns something that is not a real number.
    ValueError: if ``k < 1``, ``decay`` is an unknown name, or ``f(0) != 1``,
      a value of ``f`` is outside ``[0, 1]``, or ``f`` increases.

  References:
    Tian et al., *WSM: Decay-Free Learning Rate Schedule via Checkpoint
    Merging for LLM Pre-training*, 2025 (arXiv:2507.17634).

  Examples:
    >>> import emax
    >>> emax.merge_weights(4)  # linear: the last four, uniformly
    array([0.  , 0.25, 0.25, 0.25, 0.25])
    >>> emax.merge_weights(4, 'cosine').round(6)
    array([0.      , 0.146447, 0.353553, 0.353553, 0.146447])
    >>> emax.merge_weights(2, lambda x: 1 - x ** 2)
    array([0.  , 0.25, 0.75])

    With checkpoints saved every 100 steps, the merge of steps 1000 to 1400
    that emulates a cosine decay over those 400 steps::

      params = emax.checkpoint.average(
          directory, steps=[1000, 1100, 1200, 1300, 1400],
          weights=emax.merge_weights(4, 'cosine'))
  """
  k = _check_k(k)
  f, name = _check_decay(decay)
  x = np.arange(k, dtype=np.float64) / k
  w = np.array([_value(f, name, xi) for xi in x.tolist()], dtype=np.float64)
  _check_shape(w, x, name)
  coefficients = np.empty(k + 1, dtype=np.float64)
  coefficients[0] = 1.0 - w[0]
  coefficients[1:k] = w[:-1] - w[1:]
  coefficients[k] = w[-1]
  return coefficients


def _check_k(k: object) -> int:
  try:
    return _options.check_int(k, 'k', 1)
  except (TypeError, ValueError) as e:
    raise type(e)(
        f'{e} k is the number of checkpoint intervals merged: pass'
        ' len(steps) - 1 for steps n, ..., n + k, e.g. k=4 for five'
        ' checkpoints.') from None


def _check_decay(decay: object) -> tuple[Callable[[float], float], str]:
  """The shape as a callable, and how messages name it."""
  if isinstance(decay, str):
    if decay not in SHAPES:
      raise ValueError(
          f'decay must be one of {sorted(SHAPES)} or a callable x -> f(x),'
          f' got {decay!r} instead. For another shape pass a function of x'
          ' in [0, 1] with f(0) = 1, non-increasing.')
    return SHAPES[decay], f'decay={decay!r}'
  if callable(decay) and not isinstance(decay, type):
    return decay, f'decay={getattr(decay, "__name__", repr(decay))}'
  raise TypeError(
      f'decay must be one of {sorted(SHAPES)} or a callable x -> f(x), got'
      f' {decay!r} ({type(decay).__name__}) instead.')


def _value(f: Callable[[float], float], name: str, x: float) -> float:
  """``f(x)`` as a float; a clear error if it is not a real number."""
  value = f(float(x))
  array = np.asarray(value)
  if (array.shape != () or isinstance(value, (bool, np.bool_)) or not (
      np.issubdtype(array.dtype, np.floating)
      or np.issubdtype(array.dtype, np.integer))):
    raise TypeError(
        f'{name} must return a real number for a float x, got {value!r} at'
        f' x = {x!r}. Return a Python float (or a 0-d array).')
  return float(array)


def _check_shape(w_array: np.ndarray, x_array: np.ndarray, name: str
                 ) -> None:
  """``f(0) = 1``, every value in ``[0, 1]``, non-increasing."""
  w, x = w_array.tolist(), x_array.tolist()  # Python floats, for messages
  if w[0] != 1.0:
    raise ValueError(
        f'{name} must have f(0) = 1 (the decay starts at the full learning'
        f' rate), got f(0) = {w[0]!r}. Divide f by f(0).')
  outside = np.flatnonzero(~((w_array >= 0.0) & (w_array <= 1.0)))  # NaN included
  if outside.size:
    i = int(outside[0])
    raise ValueError(
        f'{name} must take values in [0, 1], got f({x[i]!r}) = {w[i]!r}.'
        ' Clip f to [0, 1].')
  rises = np.flatnonzero(w_array[1:] > w_array[:-1])
  if rises.size:
    i = int(rises[0])
    raise ValueError(
        f'{name} must be non-increasing (a merge cannot undo a decay: a'
        f' rise gives a negative weight), got f({x[i]!r}) = {w[i]!r} <'
        f' f({x[i + 1]!r}) = {w[i + 1]!r}.')
