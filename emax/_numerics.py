"""The arithmetic of one averaging step: rates, rounding, the guard, debiasing.

Every step of an average is ``new = old - c (old - p)``: ``c``, the *step
size*, is the weight of the new params and ``1 - c`` the decay. How ``c`` is
obtained and how the expression is rounded decide which peer a float32
average matches to the bit:

* ``rounding='tensorflow'`` (the default): ``c = 1 - float32(d)`` in float32,
  then ``old - fl(c * fl(old - p))``, two roundings, exactly as
  ``tf.train.ExponentialMovingAverage``;
* ``rounding='lerp'``: ``c = float32(1 - d)`` computed in float64 on the host
  (for a constant), then ``old + c * (p - old)`` as XLA compiles it (fused
  into one multiply-add where XLA fuses it): what a hand-written jitted EMA,
  timm's ``ModelEmaV3`` and ema-pytorch compute, to a few ulp;
* ``rounding='optax'``: ``c * p + (1 - c) * old`` with both weights computed
  in float64 on the host for a constant, as ``optax.incremental_update``;
* ``rounding='nnx'``: ``d * old + (1 - d) * p``, the decay's product first, as
  ``flax.nnx.EMA`` and Keras write it (XLA fuses the first product it meets
  into a multiply-add, so the order of the two products matters under jit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from emax import _tree
from emax._options import Rate

F32 = jnp.float32


def _clip(x: jax.typing.ArrayLike) -> jax.Array:
  """A rate as a float32 scalar in ``[0, 1]`` (NaN stays NaN: the guard)."""
  x = jnp.asarray(x)
  if jnp.ndim(x) != 0:
    raise ValueError(
        f'A decay or step size must be a scalar, got shape {jnp.shape(x)}'
        ' from the schedule.')
  return jnp.clip(x.astype(F32), 0.0, 1.0)


def _host_coefficients(rate: Rate, rounding: str,
                       power: int) -> tuple[np.float32, np.float32]:
  """``(step, keep)`` for a Python float rate, computed on the host."""
  value = rate.value
  if rate.kind == 'decay' and power == 1:
    decay = np.float32(value)
    if rounding == 'tensorflow':
      return np.float32(1.0) - decay, decay  # TensorFlow's order, in float32
    return np.float32(1.0 - value), decay  # 1 - d in float64, as Python does
  tau = 1.0 - value if rate.kind == 'decay' else value
  if power > 1:
    # 1 - (1 - tau) ** power, without cancellation.
    tau = 1.0 if tau >= 1.0 else -math.expm1(power * math.log1p(-tau))
  return np.float32(tau), np.float32(1.0 - tau)


def coefficients(rate: Rate, count: jax.Array, rounding: str,
                 power: int) -> tuple[Any, Any]:
  """The step size ``c`` and the decay ``1 - c`` of one step, float32.

  Host constants (NumPy float32) for a Python float rate, arrays otherwise.

  Args:
    rate: the validated rate.
    count: the number of steps taken before this one (a schedule's input).
    rounding: one of :data:`emax._options.ROUNDINGS`.
    power: the number of steps one averaging step stands for: the decay is
      raised to it (``update_every`` steps at once), the step size becomes
      ``1 - (1 - c) ** power``.
  """
  if rate.is_constant:
    return _host_coefficients(rate, rounding, power)
  value = rate.value
  if callable(value):
    value_at = value(count)
    if rate.kind == 'decay' and hasattr(value, 'step_size'):
      step, keep = _clip(value.step_size(count)), _clip(value_at)
    elif rate.kind == 'decay':
      keep = _clip(value_at)
      step = 1.0 - keep
    else:
      step = _clip(value_at)
      keep = 1.0 - step
  elif rate.kind == 'decay':
    keep = _clip(value)
    step = 1.0 - keep
  else:
    step = _clip(value)
    keep = 1.0 - step
  if power > 1:
    step = -jnp.expm1(power * jnp.log1p(-step))
    keep = 1.0 - step
  return step, keep


def average(old: jax.Array, new: jax.Array, step: jax.typing.ArrayLike,
            keep: jax.typing.ArrayLike, rounding: str) -> jax.Array:
  """One averaging step of ``old`` toward ``new``, in ``old``'s dtype.

  ``step`` and ``keep`` are float32 (scalars, or arrays that broadcast
  against ``old``); they are cast to ``old``'s dtype, as TensorFlow casts
  ``1 - decay`` to the variable's dtype.

  For ``'tensorflow'``: XLA's CPU and GPU backends contract ``old - c * d``
  into one fused multiply-add, which rounds once where TensorFlow rounds
  twice. The product goes through a select on ``isnan(d)``, an identity
  (``c * d`` is NaN whenever ``d`` is) that the contraction cannot see
  through, whatever surrounds it; it costs no memory traffic. (A zero
  computed from the step count, subtracted from the product, was seen
  through by LLVM's range analysis under a traced copy/keep select.)
  """
  dtype = old.dtype
  new = new.astype(dtype)
  c = jnp.asarray(step).astype(dtype)
  if rounding == 'tensorflow':
    diff = old - new
    return old - jnp.where(jnp.isnan(diff), diff, c * diff)
  if rounding == 'lerp':
    return old + c * (new - old)
  k = jnp.asarray(keep).astype(dtype)
  if rounding == 'nnx':
    return k * old + c * new
  return c * new + k * old


SMALL_ARRAY = 1 << 14
"""Arrays below this many elements are checked together (see
:func:`all_finite`)."""


def _unsharded_type(x: jax.Array) -> bool:
  """Whether ``x``'s type carries no sharding (explicit sharding refuses to
  concatenate differently sharded operands; such leaves are summed alone)."""
  spec = getattr(getattr(jax.typeof(x), 'sharding', None), 'spec', None)
  return spec is None or all(axis is None for axis in spec)


Bound = Union[np.float32, None]
"""What the guard asks of an array's elements: ``None``, finite; a bound,
a magnitude below it (see :func:`all_finite`)."""


def _fewer_arrays(arrays: list[tuple[jax.Array, Bound]]
                  ) -> list[tuple[jax.Array, Bound]]:
  """The arrays to reduce on one device: the large ones as they are, the
  small ones of each dtype and bound concatenated into one buffer.

  A reduction over a small array compiles on XLA CPU into its own chain of
  loop fusions, and a tree of a thousand small leaves compiled for tens of
  seconds (24 s for the 1,330 small leaves of a 2,000-leaf transformer,
  2 s once they are one buffer). Copying them costs little: they are small.
  """
  small: dict[Any, list[jax.Array]] = {}
  out = []
  for x, bound in arrays:
    if x.size < SMALL_ARRAY and _unsharded_type(x):
      small.setdefault((x.dtype, bound), []).append(x)
    else:
      out.append((x, bound))
  # The barrier keeps the buffer: XLA would otherwise split the sum of a
  # concatenation back into one sum per operand.
  return out + [(lax.optimization_barrier(_tree.concat_raveled(xs)), bound)
                for (_, bound), xs in small.items()]


_SLICES = 8
"""How many slices the guard's first reduction lays side by side (see
:func:`_slice_flags`)."""


def _good(x: jax.Array, bound: Bound) -> jax.Array:
  """Elementwise: finite, or (given a bound) of a magnitude below it (NaN
  compares false)."""
  return jnp.isfinite(x) if bound is None else jnp.abs(x) < bound


def _slice_flags(x: jax.Array,
                 bound: Bound = None) -> tuple[jax.Array, jax.Array]:
  """``x`` flattened, cut into 8 equal slices and a tail: a flag per
  position (whether the element there is free of NaN and Inf, or below
  ``bound`` in magnitude, in every slice) and one for the tail (True when
  there is none).

  The slices are laid side by side, ``(8, n / 8)``, and reduced over that
  leading axis: a reduction XLA CPU vectorizes along the kept axis, which
  read twice as fast as rows of 32 reduced along their own axis (each row
  a horizontal reduction), in a train step and in a standalone
  ``tx.update`` alike. Eight slices keep eight streams in flight; more
  read slower."""
  flat = x.reshape(-1)
  n = flat.size // _SLICES * _SLICES
  flags = jnp.all(_good(flat[:n].reshape(_SLICES, -1), bound), axis=0)
  tail = jnp.all(_good(flat[n:], bound)) if n < flat.size else None
  return flags, (jnp.asarray(True) if tail is None else tail)


def _total(sums: list[jax.Array]) -> jax.Array:
  """The sum of per-array scalar sums, as float32 (the real and imaginary
  parts of complex ones added: a non-finite part stays non-finite)."""
  total = jnp.zeros([], F32)
  for x in sums:
    if jnp.iscomplexobj(x):
      x = jnp.real(x) + jnp.imag(x)
    total = total + x.astype(F32)
  return total


def _own_sum_input(x: jax.Array) -> jax.Array:
  """``x``, behind a barrier when it is a 16-bit float: ``jnp.sum`` converts
  it to float32 first, the conversion the averaging pass makes of the same
  param, and XLA would otherwise write that float32 copy out once for both."""
  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
    return lax.optimization_barrier(x)
  return x


def _sums_finite(arrays: list[jax.Array]) -> jax.Array:
  """The check on several devices, where an array cannot be cut into slices
  without moving it between devices, and a boolean reduction over a whole
  array writes a byte per element first on XLA CPU: the total of each
  array's float sum, each reduced where it lies (a scalar all-reduce for a
  sharded one). A finite total means finite elements; only when it is not
  (a NaN or Inf, or finite values whose sum overflows) does the exact check
  run, ``sum(x - x)``: zero for finite arrays, NaN otherwise."""
  arrays = [_own_sum_input(x) for x in arrays]
  fast = jnp.isfinite(_total([jnp.sum(x) for x in arrays]))

  def exact() -> jax.Array:
    return jnp.isfinite(_total([jnp.sum(x - x) for x in arrays]))

  if not isinstance(fast, jax.core.Tracer):  # eager: decide on the host
    return fast if bool(fast) else exact()
  # `fast` itself (True) rather than a constant: under `shard_map` both
  # branches then vary over the same mesh axes.
  return lax.cond(fast, lambda: fast, exact)


def all_finite(arrays: list[jax.Array],
               unrounded: Sequence[jax.Array | None] | None = None
               ) -> jax.Array:
  """Whether every array is free of NaN and Inf (a bool scalar).

  One exact pass over each array, no branch: ``all(isfinite(x))``, which
  cannot overflow and whose reduction fuses its producer (``p + u``, a
  16-bit param's conversion) into its own loop. (A float sum or max would
  not: XLA CPU runs those as a library kernel that takes only an array
  already in memory, so ``sum(p + u)`` in a standalone ``tx.update`` wrote
  all of ``p + u`` first.)

  On one device each array is reduced as 8 slices side by side, in the
  loop that reads it (one flag per position is written, an eighth of the
  elements, see :func:`_slice_flags`), and each array's flags are then
  reduced on their own. (Concatenated first, XLA CPU fused the first
  reductions into the concatenation, a loop it does not vectorize: several
  times slower. A long boolean reduction straight over a whole array XLA
  CPU splits into a tree whose first stage it writes at full size, a byte
  per element.) On several devices see :func:`_sums_finite`.

  ``unrounded``: optional, one entry per array, ``None`` or the float32
  values a 16-bit float array was rounded from
  (:func:`emax._tree.sum_before_rounding`). On one device the check then
  reads those, ``|y| < bound`` with the least magnitude that rounds to
  infinity (:func:`emax._tree.overflow_bound`): exactly whether the
  rounded array is finite, and the loop computes ``p + u`` itself where a
  check of the rounded array would read a copy of it written for both
  passes (the rounding, a ``reduce_precision``, keeps XLA from computing
  it in both). On several devices the rounded arrays are summed.
  """
  if not arrays:
    return jnp.asarray(True)
  if jax.device_count() > 1:
    # Under jit a param's sharding is not in its type (unless mesh axes are
    # explicit): concatenating or reshaping sharded leaves would make XLA
    # gather them. Each array is summed where it lies, so the check adds no
    # collective but scalar all-reduces. (pack=True packs single-device
    # leaves, decided when the state is built: the same few reductions.)
    return _sums_finite(arrays)
  return _slices_finite(arrays, unrounded)


def _slices_finite(arrays: list[jax.Array],
                   unrounded: Sequence[jax.Array | None] | None) -> jax.Array:
  """The check on one device (see :func:`all_finite`)."""
  if unrounded is None:
    unrounded = [None] * len(arrays)
  if len(unrounded) != len(arrays):
    raise ValueError(f'Expected one unrounded entry per array'
                     f' ({len(arrays)}), got {len(unrounded)}.')
  checks: list[tuple[jax.Array, Bound]] = [
      (x, None) if y is None else (y, _tree.overflow_bound(x.dtype))
      for x, y in zip(arrays, unrounded)]
  oks = []
  for x, bound in _fewer_arrays(checks):
    flags, tail = _slice_flags(x, bound)
    # The barrier keeps the two reductions apart: XLA would merge them back
    # into one over the whole array.
    oks += [tail, jnp.all(lax.optimization_barrier(flags))]
  # One reduction of the per-array flags, behind a barrier: without it XLA
  # turns the reduction of a stack into a chain of `&` and fuses that chain
  # into every averaging pass (each pass then takes every array's flag, and
  # compiling took minutes for a tree of 2,000 leaves instead of seconds).
  return jnp.all(lax.optimization_barrier(jnp.stack(oks)))


def everywhere(flag: jax.Array) -> jax.Array:
  """``flag`` on every shard of a ``shard_map``: true only where it is true
  on all the shards it varies over (one scalar all-reduce), so that every
  shard keeps or skips the step together. Outside ``shard_map``, ``flag``."""
  aval = jax.typeof(flag)
  # Where jax keeps the set of mesh axes a value varies over: `vma` until
  # mid-2025, `manual_axis_type.varying` since.
  varying = getattr(getattr(aval, 'manual_axis_type', None), 'varying',
                    None)
  if varying is None:
    varying = getattr(aval, 'vma', None)
  axes = tuple(sorted(varying or ()))
  if not axes:
    return flag
  bad = lax.psum(jnp.logical_not(flag).astype(jnp.int32), axes)
  return bad == 0


def debias(stored: jax.Array, weight: jax.Array) -> jax.Array:
  """``stored / weight``; the stored value itself where ``weight`` is 0 or 1.

  A weight of one (an average that started as a copy) leaves the value
  unchanged to the bit, with no arithmetic at all (so no flushing of
  subnormals); a weight of zero means nothing was averaged yet, and the
  stored value is the initial params.
  """
  w = weight.astype(stored.dtype)
  exact = (w == 1) | (w == 0)
  return jnp.where(exact, stored, stored / jnp.where(exact, jnp.ones_like(w),
                                                     w))
