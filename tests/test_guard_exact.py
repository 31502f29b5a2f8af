"""The NaN guard of a 16-bit param's ``p + u`` is exact: against float64 NumPy.

A standalone ``tx.update`` averages ``p + u`` rounded to the param's dtype
and skips the step when any rounded value is NaN or Inf. For bf16 and
float16 params the guard reads the float32 sum before its rounding and asks
``|sum| < bound`` (the least magnitude that rounds to Inf), so that XLA
computes ``p + u`` in the guard's own loop. These tests hold that check, and
the values the step writes, to a float64 NumPy reference of "round ``p + u``
to the param's dtype, skip if any is not finite": exhaustively over every
16-bit ``p`` against edge ``u`` (the largest values, the ones whose sum
rounds to Inf and the ones just short of it, NaN, Inf, zeros, subnormals),
with hypothesis over random bit patterns, and end to end through a jitted
``tx.update`` on one device.
"""

import subprocess
import sys

import hypothesis
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import strategies as st

import emax
from emax import _numerics
from emax import _tree
from helpers import child_env

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)

# (param dtype, update dtype) pairs; the sum is computed in the param's
# dtype when both agree, in float32 otherwise (JAX's promotion).
PAIRS = [(BF16, BF16), (F16, F16), (BF16, F32), (F16, F32), (BF16, F16)]


# --- the float64 reference ----------------------------------------------------


def _format(dtype):
  """(significand bits, least normal exponent, exponent that overflows)."""
  return {BF16: (8, -126, 128), F16: (11, -14, 16), F32: (24, -126, 128)}[
      np.dtype(dtype)]


def round_to(x, dtype):
  """``x`` (float64) rounded to nearest, ties to even, into ``dtype``'s
  values (subnormals kept, overflow to Inf), as float64."""
  bits, emin, emax_ = _format(dtype)
  x = np.asarray(x, np.float64)
  with np.errstate(invalid='ignore', over='ignore'):
    _, e = np.frexp(np.where(np.isfinite(x), x, 0.0))
    quantum = np.ldexp(1.0, np.maximum(e - 1, emin) - (bits - 1))
    r = np.round(x / quantum) * quantum  # np.round: ties to even
    r = np.where(np.abs(r) >= 2.0 ** emax_, np.copysign(np.inf, x), r)
  return np.where(np.isfinite(x), r, x)


def new_params(p, u):
  """``p + u`` as ``optax.apply_updates`` defines it: summed in the
  promoted dtype, rounded to the param's. (The float64 sum of two values of
  at most 24 bits rounds, to 24 bits or fewer, as the exact sum does.)"""
  pd, ud = p.dtype, u.dtype
  wide = pd if pd == ud else F32
  with np.errstate(invalid='ignore'):
    s = np.asarray(p, np.float64) + np.asarray(u, np.float64)
  return round_to(round_to(s, wide), pd)


def _subnormal(x, dtype):
  _, emin, _ = _format(dtype)
  with np.errstate(invalid='ignore'):
    x = np.abs(np.asarray(x, np.float64))
  return (x > 0) & (x < 2.0 ** emin)


# --- the values tried -----------------------------------------------------------


def every_value(dtype):
  """Every 16-bit pattern of ``dtype`` (NaNs included)."""
  return np.arange(1 << 16, dtype=np.uint16).view(dtype)


def edge_values(dtype, sum_dtype=None):
  """Values of ``dtype`` where the rounding of a sum of ``sum_dtype``
  (default: the 16-bit format it is added to, ``dtype`` itself) changes:
  the largest values, half an ulp of the largest and its neighbours, the
  float32 neighbours of that gap when ``dtype`` is float32 (their sums round
  to the bound in float32 first), zeros, subnormals, NaN and Inf."""
  narrow = np.dtype(sum_dtype or dtype)
  bits, emin, top = _format(narrow)
  big = (2.0 - 2.0 ** (1 - bits)) * 2.0 ** (top - 1)
  half = 2.0 ** (top - bits - 1)  # half an ulp of the largest
  vals = [0.0, 1.0, 1e-3, big, big / 2, 2.0 ** (top - 1), half, 2 * half,
          4 * half, half / 2, 2.0 ** emin, 2.0 ** (emin - 1),
          2.0 ** (emin - bits + 1), np.inf, np.nan]
  ulp = 2.0 ** (top - 1 - (bits - 1))
  vals += [big - k * ulp for k in range(1, 6)]
  ulp_h = 2.0 ** (top - bits - 1 - (bits - 1))
  vals += [half + k * ulp_h for k in (-3, -2, -1, 1, 2, 3)]
  if np.dtype(dtype) == F32:  # float32 updates: sums within the gap
    ulp32 = 2.0 ** (top - 1 - 23)
    vals += [half + k * ulp32 / 2 for k in range(-4, 5)]
  vals += [-v for v in vals]
  with np.errstate(over='ignore'):
    out = np.asarray(vals, np.float64).astype(np.float32).astype(dtype)
  return np.unique(out[~np.isnan(out.astype(np.float64))].tolist()
                   + [np.nan]).astype(dtype)


# --- the checks -------------------------------------------------------------------


@jax.jit
def _flags(p, u):
  """The guard's elementwise question, and the new params themselves."""
  y = _tree.sum_before_rounding(p, u)
  return (_numerics._good(y, _tree.overflow_bound(p.dtype)),
          _tree.apply_update(p, u))


def _check_elementwise(p, u):
  flag, value = jax.device_get(_flags(jnp.asarray(p), jnp.asarray(u)))
  want = new_params(p, u)
  np.testing.assert_array_equal(flag, np.isfinite(want))
  # Values bitwise (NaN as NaN), except where XLA CPU flushes subnormals (an
  # input or the result): the guard's question is unaffected by flushing.
  normal = ~(_subnormal(p, p.dtype) | _subnormal(u, u.dtype)
             | _subnormal(want, p.dtype))
  got = np.asarray(value, np.float64)
  np.testing.assert_array_equal(got[normal], want[normal])


def test_the_bound_is_the_least_magnitude_that_rounds_to_inf():
  assert _tree.overflow_bound(BF16) == np.float32((2 - 2.0 ** -8) * 2.0 ** 127)
  assert _tree.overflow_bound(F16) == np.float32(65520.0)
  for dtype in (BF16, F16):
    t = _tree.overflow_bound(dtype)
    below = np.nextafter(t, np.float32(0))
    assert np.isinf(np.float32(t).astype(dtype))
    assert np.isfinite(below.astype(dtype))
    assert np.isinf(round_to(float(t), dtype))
    assert np.isfinite(round_to(float(below), dtype))


def test_the_reference_rounding_is_ml_dtypes_on_float32_values():
  """The reference rounding against ml_dtypes' single rounding of float32
  values (edge values and random bit patterns)."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(
      np.uint32).view(np.float32)
  x = np.concatenate([x, edge_values(F32, BF16), edge_values(F32, F16)])
  x = x[~np.isnan(x)]
  for dtype in (BF16, F16):
    with np.errstate(over='ignore'):
      want = x.astype(dtype).astype(np.float64)
    np.testing.assert_array_equal(round_to(x.astype(np.float64), dtype), want)


@pytest.mark.parametrize('pdtype,udtype', PAIRS,
                         ids=[f'{a.name}+{b.name}' for a, b in PAIRS])
def test_every_16_bit_param_against_edge_updates(pdtype, udtype):
  p = every_value(pdtype)
  u = edge_values(udtype, pdtype)
  _check_elementwise(np.repeat(p, u.size), np.tile(u, p.size))
  # And edge updates against edge params (both ways round the gap).
  q = edge_values(pdtype)
  _check_elementwise(np.repeat(q, u.size), np.tile(u, q.size))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.sampled_from(PAIRS), st.data())
def test_random_bit_patterns(pair, data):
  pdtype, udtype = pair
  n = 257
  p = np.asarray(data.draw(st.lists(st.integers(0, (1 << 16) - 1),
                                    min_size=n, max_size=n)),
                 np.uint16).view(pdtype)
  width = 8 * udtype.itemsize
  u = np.asarray(data.draw(st.lists(st.integers(0, (1 << width) - 1),
                                    min_size=n, max_size=n)),
                 np.uint64).astype(f'u{udtype.itemsize}').view(udtype)
  _check_elementwise(p, u)


@pytest.mark.parametrize('pdtype,udtype', PAIRS[:3],
                         ids=[f'{a.name}+{b.name}' for a, b in PAIRS[:3]])
def test_slice_flags_with_a_bound_against_numpy(pdtype, udtype):
  """The one-device check (8 slices side by side, then the tail; small
  arrays concatenated) reads the unrounded sums: its flags per position and
  for the whole equal the reference's, with at most one edge pair per
  array."""
  width = 20  # 8 slices of 20, then a tail of 7
  base_p = np.ones(8 * width + 7, pdtype)
  base_u = np.zeros(8 * width + 7, udtype)
  flags = jax.jit(lambda p, u: _numerics._slice_flags(
      _tree.sum_before_rounding(p, u), _tree.overflow_bound(p.dtype)))
  whole = jax.jit(lambda p, u, q: _numerics._slices_finite(
      [_tree.apply_update(p, u), q], [_tree.sum_before_rounding(p, u), None]))
  ones = jnp.ones(40, jnp.float32)
  edges_p, edges_u = edge_values(pdtype), edge_values(udtype, pdtype)
  for i, (a, b) in enumerate((a, b) for a in edges_p for b in edges_u):
    if i % 7:  # a seventh of the pairs, at every position class in turn
      continue
    k = (0, width - 1, width, width + 1, 8 * width - 1, 8 * width,
         8 * width + 6)[i // 7 % 7]
    p, u = base_p.copy(), base_u.copy()
    p[k], u[k] = a, b
    ok = bool(np.all(np.isfinite(new_params(p, u))))
    got_flags, tail = flags(p, u)
    want_flags = np.isfinite(new_params(p, u)[:8 * width]).reshape(
        8, width).all(0)
    np.testing.assert_array_equal(got_flags, want_flags)
    assert bool(tail) == bool(np.isfinite(new_params(p, u)[8 * width:]).all())
    assert bool(whole(p, u, ones)) == ok, (a, b, k)


# --- end to end: a jitted standalone tx.update on one device ------------------

_BIG = _numerics.SMALL_ARRAY + 5  # checked by itself; 'small': concatenated


def end_to_end():
  """Runs in a child with one device: for edge pairs ``(p, u)`` put in a
  large or a small leaf, ``emax.ema(0.5)``'s jitted ``tx.update`` skips
  exactly when the reference has a non-finite new param, and writes the
  reference's average otherwise (TensorFlow's two float32 roundings)."""
  assert jax.device_count() == 1
  tx = emax.ema(0.5)
  bad = []
  for pdtype, udtype in PAIRS:
    params = {'big': np.ones(_BIG, pdtype), 'small': np.ones(37, pdtype)}
    zeros = {k: np.zeros(v.shape, udtype) for k, v in params.items()}
    state = tx.init(jax.tree.map(jnp.asarray, params))
    update = jax.jit(lambda u, s, p: tx.update(u, s, p)[1])
    pairs = [(a, b) for a in edge_values(pdtype)
             for b in edge_values(udtype, pdtype)]
    for i, (a, b) in enumerate(pairs):
      leaf, k = (('big', _BIG - 3), ('small', 33), ('big', 0))[i % 3]
      p = {n: v.copy() for n, v in params.items()}
      u = {n: v.copy() for n, v in zeros.items()}
      p[leaf][k], u[leaf][k] = a, b
      new = {n: new_params(p[n], u[n]) for n in p}
      skip = not all(np.isfinite(v).all() for v in new.values())
      out = update(u, state, p)
      if int(out.skipped) != int(skip):
        bad.append((pdtype.name, udtype.name, float(a), float(b), 'flag'))
        continue
      if _subnormal(a, pdtype) or _subnormal(b, udtype) or _subnormal(
          new[leaf][k], pdtype):
        continue  # XLA CPU flushes subnormals; the flag is what is checked
      one, half = np.float32(1), np.float32(0.5)
      for n in p:
        want = (np.ones_like(new[n], np.float32) if skip else
                one - half * (one - new[n].astype(np.float32)))
        got = np.asarray(out.average[n])
        if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
          bad.append((pdtype.name, udtype.name, float(a), float(b), n))
  bad += _mixed_tree_cases()
  assert not bad, bad[:10]
  return len(PAIRS)


def _mixed_tree_cases():
  """A tree of every kind of leaf (None, int, float32, bf16, float16; a
  mask leaving a bf16 leaf out; a pack of the leaves under 64 elements,
  which leaves a bf16 leaf of 100 out): the sums line up with their leaves,
  and the step is skipped exactly when a new param inside the mask is not
  finite (or rounds to Inf)."""
  params = {'a': np.ones(40, BF16), 'i': np.arange(3, dtype=np.int32),
            'n': None, 'f': np.ones(5, F32), 'h': np.ones(33, F16),
            'out': np.ones(7, BF16), 'big': np.ones(100, BF16)}
  mask = {'a': True, 'i': True, 'n': True, 'f': True, 'h': True,
          'out': False, 'big': True}
  zeros = {k: None if v is None else np.zeros_like(v)
           for k, v in params.items()}
  bad = []
  for tx, masked in ((emax.ema(0.5), False),
                    (emax.ema(0.5, mask=mask), True),
                    (emax.ema(0.5, pack=64), False)):
    state = tx.init(params)
    update = jax.jit(lambda u, s, p, tx=tx: tx.update(u, s, p)[1])
    for leaf, dtype in (('a', BF16), ('f', F32), ('h', F16), ('out', BF16),
                        ('big', BF16)):
      for a, b in ((np.inf, 0.0), (np.nan, 0.0), (60000.0, 5520.0),
                   (60000.0, 5504.0), (3e38, 3e38), (3e38, -3e38)):
        p = dict(params, **{leaf: params[leaf].copy()})
        u = dict(zeros, **{leaf: zeros[leaf].copy()})
        with np.errstate(over='ignore'):
          p[leaf][3], u[leaf][3] = a, b
        new = new_params(p[leaf], u[leaf])
        inside = not (masked and leaf == 'out')
        skip = inside and not np.isfinite(new).all()
        out = update(u, state, p)
        if int(emax.get_ema_state(out).skipped) != int(skip):
          bad.append(('mixed', leaf, a, b, dtype.name))
  return bad


def test_a_jitted_standalone_tx_update_end_to_end_on_one_device():
  env = child_env()
  env['XLA_FLAGS'] = ''
  code = ('import sys; sys.path.insert(0, "tests"); import test_guard_exact'
          ' as t; print("ok", t.end_to_end())')
  out = subprocess.run([sys.executable, '-c', code], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and out.stdout.split()[:1] == ['ok'], (
      out.stdout[-2000:] + out.stderr[-3000:])
