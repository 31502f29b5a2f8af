"""The options of emax's averages: one check for each kind of value.

Each check takes a value as the user gave it and returns it in the form the
rest of emax uses, or raises an error that says what was expected, what
came, and how to fix it. Every entry point (:func:`emax.init`,
:func:`emax.update`, :func:`emax.ema`, :func:`emax.with_ema`, the schedules,
BEMA, the checkpoint readers) validates its options with these. Trees
(structure, shapes, dtypes of leaves) are checked in :mod:`emax._tree`; the
BatchNorm policy, a flax matter, with the flax integration.

A *rate* is how one average moves on one step: the ``decay`` ``d`` (the
weight of the old average) or the ``step_size`` ``1 - d`` (the weight of the
new params, what ``optax.incremental_update`` calls ``step_size`` and RL code
``tau``), each a number, a 0-d array or a schedule ``count -> value``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

MAX_INT32 = int(np.iinfo(np.int32).max)

ROUNDINGS = ('tensorflow', 'lerp', 'optax', 'nnx')
"""The arithmetic of one averaging step (see :func:`emax.ema`)."""

PACK_MAX_SIZE = 1 << 15
"""Largest leaf (in elements) that ``pack=True`` packs."""

def _name_of(value: Any) -> str:
  return type(value).__name__


def check_bool(value: Any, name: str) -> bool:
  """A boolean option must be a bool (a string from a config is refused)."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  raise TypeError(
      f'{name} must be True or False, got {value!r} ({_name_of(value)})'
      f' instead. Strings such as "false" are not accepted: convert config'
      f' values with a real parser before passing them.')


def check_int(value: Any, name: str, minimum: int,
              maximum: int = MAX_INT32) -> int:
  """An int option in ``[minimum, maximum]`` (steps are counted in int32)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, numbers.Integral):
    raise TypeError(
        f'{name} must be an int, got {value!r} ({_name_of(value)}) instead.')
  if not minimum <= int(value) <= maximum:
    raise ValueError(
        f'{name} must be an int in [{minimum}, {maximum}], got {value!r}'
        f' instead (steps are counted in int32).{_INT_HINTS.get(name, "")}')
  return int(value)


_INT_HINTS: dict[str, str] = {
    'first_update': (' Steps count from 1; leave first_update out (or pass 0)'
                     ' to average on steps update_every, 2 * update_every...'),
    'update_every': ' Leave it out (or pass 1) to average on every step.',
}


def check_accumulator_dtype(accumulator_dtype: Any) -> np.dtype | None:
  """``None`` (the default policy) or a real floating dtype."""
  if accumulator_dtype is None:
    return None
  try:
    dtype = jnp.dtype(accumulator_dtype)
  except TypeError as e:
    raise TypeError(
        'accumulator_dtype must be a floating dtype such as jnp.float32, got'
        f' {accumulator_dtype!r} instead.') from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        'accumulator_dtype must be a floating dtype such as jnp.float32, got'
        f' {dtype} instead. Non-float leaves are never averaged, so they need'
        ' no accumulator.')
  return dtype


def check_pack(pack: Any) -> int:
  """The largest leaf size to pack, 0 for no packing."""
  if pack is False or pack is None:
    return 0
  if pack is True:
    return PACK_MAX_SIZE
  if isinstance(pack, numbers.Integral) and not isinstance(
      pack, (bool, np.bool_)) and int(pack) > 0:
    return int(pack)
  raise ValueError(
      'pack must be False, True or the largest leaf size (in elements, > 0)'
      f' to pack, got {pack!r} instead.')


def check_layout(pack: Any, offload: Any) -> tuple[int, bool]:
  """``pack`` and ``offload`` together: returns ``(max_pack_size, offload)``.

  The two combine: packed buffers are offloaded like any other array.
  """
  return check_pack(pack), check_bool(offload, 'offload')


def check_rounding(rounding: Any) -> str:
  if rounding not in ROUNDINGS:
    raise ValueError(
        f'rounding must be one of {ROUNDINGS}, got {rounding!r} instead.'
        " 'tensorflow' (the default) rounds as tf.train.ExponentialMovingAverage"
        " does, 'lerp' as a jitted `ema + (1 - d) * (p - ema)`, 'optax' as"
        " optax.incremental_update, 'nnx' as flax.nnx.EMA and Keras"
        ' (`d * ema + (1 - d) * p`).')
  return rounding


def check_names(names: Any) -> tuple[str, ...] | None:
  """``None`` for one average, or a non-empty tuple of distinct strings."""
  if names is None:
    return None
  if isinstance(names, str) or not isinstance(names, (list, tuple)):
    raise TypeError(
        'names must be a list or tuple of strings, e.g. ("fast", "slow"), got'
        f' {names!r} instead.')
  names = tuple(names)
  bad = [n for n in names if not isinstance(n, str) or not n]
  if bad or not names:
    raise ValueError(
        'names must be a non-empty list of non-empty strings, got'
        f' {names!r} instead.')
  if len(set(names)) != len(names):
    raise ValueError(f'names must be distinct, got {names!r}.')
  return names


@dataclasses.dataclass(frozen=True)
class Rate:
  """One average's rate as the user gave it, validated.

  Attributes:
    kind: ``'decay'`` or ``'step_size'``.
    value: a Python float (a host constant), an array (possibly traced), or a
      schedule (a callable of the step count).
  """

  kind: str
  value: Any

  @property
  def is_constant(self) -> bool:
    return isinstance(self.value, float)


_HINTS: dict[str, str] = {
    'decay': (' A decay of 0.999 averages over about 1 / (1 - 0.999) = 1000'
              ' steps.'),
    'step_size': (' The step size is the weight of the new params, 1 - decay,'
                  ' e.g. 0.005 (tau) for a target network.'),
}


def _is_array(value: Any) -> bool:
  return isinstance(value, (jax.Array, np.ndarray)) and not isinstance(
      value, np.generic)


def in_unit_interval(value: Any, name: str) -> Any:
  """A real number in ``[0, 1]``: a Python float, or a 0-d array as it is.

  A concrete value is checked now; a traced 0-d array only for its shape and
  dtype (its value is checked at run time by the NaN guard and clipping).
  """
  if _is_array(value):
    shape, dtype = jnp.shape(value), jnp.result_type(value)
    if shape != ():
      raise ValueError(
          f'{name} must be a scalar, got an array of shape {shape} instead.')
    if not (jnp.issubdtype(dtype, jnp.floating) or
            jnp.issubdtype(dtype, jnp.integer)):
      raise TypeError(
          f'{name} must be a real number, got an array of dtype {dtype}.')
    if isinstance(value, jax.core.Tracer):
      return value
    number = float(np.asarray(value))
  elif isinstance(value, (bool, np.bool_)) or not isinstance(
      value, numbers.Real):
    raise TypeError(
        f'{name} must be a float in [0, 1], got {value!r}'
        f' ({_name_of(value)}) instead.')
  else:
    number = float(value)
  if not 0.0 <= number <= 1.0:  # also False for NaN
    raise ValueError(
        f'{name} must be in [0, 1], got {value!r} instead.'
        f'{_HINTS.get(name, "")}')
  return value if _is_array(value) else number


def check_constant(value: Any, name: str) -> float:
  """A concrete number in ``[0, 1]`` (a float, or a concrete 0-d array)."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f'{name} must be a concrete number here (a hyper-parameter fixed when'
        ' the transformation or schedule is built), got a traced value.')
  return float(in_unit_interval(value, name))


def check_rate_value(value: Any, name: str) -> Any:
  """A rate as a float, a 0-d array or a schedule; else a clear error."""
  if callable(value) and not isinstance(value, type) and not _is_array(value):
    return value
  try:
    return in_unit_interval(value, name)
  except TypeError:
    raise TypeError(
        f'{name} must be a float in [0, 1], a 0-d array, or a schedule'
        f' (a callable step -> {name}), got {value!r} ({_name_of(value)})'
        ' instead.') from None


RateLike = Union[float, jax.typing.ArrayLike,
                 Callable[[jax.Array], jax.typing.ArrayLike]]
"""One average's rate: a float, a 0-d array, or a schedule ``count -> rate``."""

RatesLike = Union[RateLike, Mapping[str, RateLike]]
"""A rate, or a mapping ``{name: rate}`` for named averages."""


def check_rates(decay: RatesLike | None, step_size: RatesLike | None
                ) -> tuple[tuple[str, ...] | None, tuple[Rate, ...]]:
  """``decay`` or ``step_size`` (one of them), each possibly a mapping.

  Returns:
    ``(names, rates)``: ``names`` is ``None`` for a single average, else the
    mapping's keys in order; ``rates`` has one :class:`Rate` per average.
  """
  if (decay is None) == (step_size is None):
    raise TypeError(
        'Give exactly one of decay and step_size (step_size = 1 - decay, the'
        f' weight of the new params), got decay={decay!r},'
        f' step_size={step_size!r}.')
  kind, value = ('decay', decay) if decay is not None else (
      'step_size', step_size)
  if isinstance(value, Mapping):
    names = check_names(tuple(value.keys()))
    assert names is not None
    return names, tuple(Rate(kind, _named_rate(value[n], kind, n))
                        for n in names)
  return None, (Rate(kind, check_rate_value(value, kind)),)


def _named_rate(value: Any, kind: str, name: str) -> Any:
  try:
    return check_rate_value(value, kind)
  except (TypeError, ValueError) as e:
    raise type(e)(f'For the average {name!r}: {e}') from None


def match_names(state_names: tuple[str, ...] | None,
                names: tuple[str, ...] | None, where: str) -> None:
  """The rates' names must be the state's names, in any order."""
  if state_names == names or (
      state_names is not None and names is not None and
      sorted(state_names) == sorted(names)):
    return
  if state_names is None:
    raise ValueError(
        f'{where} got rates for named averages {list(names or ())}, but the'
        ' state holds a single average. Give one decay, or initialise with'
        f' emax.init(params, names={list(names or ())!r}).')
  if names is None:
    raise ValueError(
        f'{where} got one rate, but the state holds the named averages'
        f' {list(state_names)}. Give a mapping with one rate per name, e.g.'
        f' {{{", ".join(repr(n) + ": 0.999" for n in state_names)}}}.')
  raise ValueError(
      f'{where} got rates for {list(names)}, but the state holds the'
      f' averages {list(state_names)}.')


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """The validated options of one kind of step (see :func:`emax.ema`)."""

  names: tuple[str, ...] | None
  rates: tuple[Rate, ...]
  update_every: int = 1
  first_update: int = 1
  start_step: int = 0
  per_update: bool = False
  skip_nonfinite: bool = True
  rounding: str = 'tensorflow'

  @property
  def every_step(self) -> bool:
    """Whether every step averages (no copy or keep steps by schedule)."""
    return self.update_every == 1 and self.first_update == 1 and (
        self.start_step == 0)


def step_options(decay: RatesLike | None = None,
                 step_size: RatesLike | None = None, *,
                 update_every: Any = 1, first_update: Any = None,
                 start_step: Any = 0, per_update: Any = False,
                 skip_nonfinite: Any = True,
                 rounding: Any = 'tensorflow') -> StepOptions:
  """Validates the options of a step; see :func:`emax.ema` for each."""
  names, rates = check_rates(decay, step_size)
  # None means the default (so that optax.inject_hyperparams, which turns
  # every int argument into an array hyperparameter, leaves them alone).
  update_every = 1 if update_every is None else check_int(
      update_every, 'update_every', 1)
  # 0 is the grid's own start: steps 0, update_every, 2 * update_every...
  # of which step 0 never happens (steps count from 1), so the default.
  first_update = update_every if first_update is None else check_int(
      first_update, 'first_update', 0) or update_every
  return StepOptions(
      names=names, rates=rates, update_every=update_every,
      first_update=first_update,
      start_step=0 if start_step is None else check_int(
          start_step, 'start_step', 0),
      per_update=check_bool(per_update, 'per_update'),
      skip_nonfinite=check_bool(skip_nonfinite, 'skip_nonfinite'),
      rounding=check_rounding(rounding))


def positive(value: Any, name: str, *, zero: bool = False) -> float:
  """A finite Python number ``> 0`` (``>= 0`` with ``zero=True``), a float."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, numbers.Real) or not math.isfinite(value) or not (
          float(value) > 0 or (zero and float(value) == 0)):
    raise ValueError(
        f'{name} must be a finite number {">=" if zero else ">"} 0, got'
        f' {value!r}.')
  return float(value)


def finite_scalar(value: Any, name: str) -> float:
  """``value`` as a finite float: one real number (or a 0-d array)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Real, np.ndarray, jax.Array)):
    raise ValueError(f'{name} must be a real number, got {value!r}.')
  array = np.asarray(value)
  if array.ndim != 0 or array.dtype.kind not in 'iuf':
    raise ValueError(
        f'{name} must be a real scalar, got {value!r}. Pass one number.')
  result = float(array)
  if not math.isfinite(result):
    raise ValueError(f'{name} must be finite, got {result}.')
  return result


SIGMA_REL_MAX = 1 / math.sqrt(12)  # gamma -> 0; gamma -> inf gives 0
"""The widths of power-function averages lie in ``(0, SIGMA_REL_MAX)``."""


def check_sigma_rel(value: Any, name: str = 'sigma_rel') -> float:
  """``value`` as a ``sigma_rel``: a real number in ``(0, SIGMA_REL_MAX)``."""
  result = finite_scalar(value, name)
  if not 0 < result < SIGMA_REL_MAX:
    raise ValueError(
        f'{name} must be in (0, {SIGMA_REL_MAX:.4f}) (a power-function'
        ' profile of exponent gamma > 0 has sigma_rel below 1/sqrt(12)), got'
        f' {result}. Typical values are 0.05 to 0.15; EDM2 trains with 0.05'
        ' and 0.10.')
  return result


def check_write_back(every: Any, name: Any,
                     names: tuple[str, ...] | None) -> int | None:
  """``write_back_every`` and ``write_back_name`` against the averages' names.

  Returns ``write_back_every`` as an int, or ``None`` (no write-back).
  """
  if every is not None:
    every = check_int(every, 'write_back_every', 1)
  if name is not None:
    if names is None:
      raise ValueError(
          f'write_back_name={name!r} names an average, but there is a single'
          ' unnamed one; leave write_back_name out.')
    if name not in names:
      raise ValueError(
          f'write_back_name={name!r} is not one of the averages {list(names)};'
          f' pass one of them, e.g. write_back_name={names[0]!r}.')
    if every is None:
      raise ValueError(
          f'write_back_name={name!r} says which average to write back, but'
          ' not when: pass write_back_every=N too (every N steps the params'
          ' are set to that average).')
  elif every is not None and names is not None and len(names) > 1:
    raise ValueError(
        f'write_back_every={every} with the named averages {list(names)}:'
        ' say which one to write back, e.g.'
        f' write_back_name={names[-1]!r}.')
  return every


LOW_DECAY = 0.5
"""Constant decays below this warn: they are most often a step size."""


def warn_if_step_size(decay: Any) -> None:
  """Warns once per call site when a constant decay looks like a step size.

  ``emax.ema(0.001)`` keeps 0.1% of the average each step: almost a copy of
  the params, and most often ``tau`` (a step size) written where the decay
  belongs. Passing the same rate as ``step_size=1 - d`` says it is meant.
  """
  values = decay.items() if isinstance(decay, Mapping) else [(None, decay)]
  for name, value in values:
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, numbers.Real) or not 0.0 < float(value) < LOW_DECAY:
      continue  # (a decay of exactly 0 is the documented copy)
    where = f' for the average {name!r}' if name is not None else ''
    warnings.warn(
        f'decay={float(value)!r}{where} keeps only {float(value):.1%} of the'
        ' average each step, so the average is nearly a copy of the params.'
        ' If this is a step size (tau, the weight of the new params), pass'
        f' step_size={float(value)!r} instead; if you mean this decay, pass'
        f' step_size={1.0 - float(value)!r} to say so.', UserWarning,
        stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
  """The ``stacklevel`` of the first caller outside emax (for warnings)."""
  level, frame = 1, sys._getframe(1)
  while frame is not None and frame.f_globals.get(
      '__name__', '').partition('.')[0] == 'emax':
    frame, level = frame.f_back, level + 1  # type: ignore[assignment]
  return level
