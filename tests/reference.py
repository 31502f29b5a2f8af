"""An independent NumPy reference of emax's averaging rules, step by step.

Written from the specification (TensorFlow's shadow-variable update in the
accumulator dtype; copy / keep / average steps; named averages; the NaN
guard; the step size of each rate form), not from the library code, and run
leaf by leaf in NumPy. Rates are float32 decays (what a schedule returns) or
Python floats (host constants, whose step size is formed in float64).
"""

import ml_dtypes
import numpy as np


def acc_dtype(dtype):
  dtype = np.dtype(dtype)
  if not np.issubdtype(dtype, np.floating) and dtype != ml_dtypes.bfloat16:
    return dtype
  if dtype.itemsize < 4:
    return np.dtype(np.float32)
  return dtype


def is_float(dtype):
  dtype = np.dtype(dtype)
  return np.issubdtype(dtype, np.inexact) or dtype == ml_dtypes.bfloat16


def coefficients(rate, kind='decay', rounding='tensorflow', power=1):
  """``(step, keep)`` as float32 for one rate.

  ``rate`` is a Python float (host constant) or a float32 (a traced value).
  """
  if isinstance(rate, np.floating) and rate.dtype == np.float32:
    keep = np.float32(rate) if kind == 'decay' else np.float32(1) - rate
    c = np.float32(np.float32(1) - keep) if kind == 'decay' else rate
    if power > 1:
      c = np.float32(1.0 - (1.0 - np.float64(c)) ** power)
      keep = np.float32(np.float32(1) - c)
    return np.float32(c), np.float32(keep)
  if kind == 'decay' and power == 1:
    d = np.float32(rate)
    if rounding == 'tensorflow':
      return np.float32(np.float32(1) - d), d
    return np.float32(1.0 - rate), d
  tau = 1.0 - rate if kind == 'decay' else float(rate)
  tau = 1.0 - (1.0 - tau) ** power
  return np.float32(tau), np.float32(1.0 - tau)


class NumpyEma:
  """The reference: per name, a list of leaves; plain NumPy arithmetic."""

  def __init__(self, leaves, debias=False, update_every=1, start_step=0,
               skip_nonfinite=True, names=None, first_update=None,
               per_update=False):
    self.names = names or [None]
    self.dtypes = [np.asarray(x).dtype for x in leaves]
    self.init = [np.asarray(x) for x in leaves]
    self.average = {n: [np.asarray(x).astype(acc_dtype(np.asarray(x).dtype))
                        for x in leaves] for n in self.names}
    w = np.float32(0.0 if debias else 1.0)
    self.weight = {n: w for n in self.names}
    self.count = 0
    self.skipped = 0
    self.k, self.s, self.skip = update_every, start_step, skip_nonfinite
    self.first = update_every if first_update is None else first_update
    self.power = 1 if per_update else update_every

  def mode(self, number):
    if number <= self.s:
      return 'copy'
    if number >= self.first and (number - self.first) % self.k == 0:
      return 'average'
    return 'keep'

  def step(self, leaves, rates, kind='decay', rounding='tensorflow'):
    """``rates``: one rate, or a dict name -> rate."""
    if not isinstance(rates, dict):
      rates = {self.names[0]: rates}
    self.count += 1
    mode = self.mode(self.count)
    leaves = [np.asarray(x) for x in leaves]
    coef = {n: coefficients(rates[n], kind, rounding, self.power)
            for n in self.names}
    finite = all(np.all(np.isfinite(x.astype(np.float64)))
                 for x in leaves if is_float(x.dtype)) and all(
                     np.isfinite(c) and np.isfinite(k)
                     for c, k in coef.values())
    if self.skip and not finite and mode != 'keep':
      # Only a step that would change the average is checked and skipped.
      self.skipped += 1
      mode = 'keep'
    for n in self.names:
      c, keep = coef[n]
      m = 'copy' if mode == 'average' and c == 1 else mode
      new = []
      for a, p in zip(self.average[n], leaves):
        if not is_float(a.dtype):
          new.append(p.copy())
        elif m == 'copy':
          new.append(p.astype(a.dtype))
        elif m == 'average':
          # A zero-weight average starts from zero on the first step that
          # moves it (c > 0); a step of size 0 leaves it as it reads.
          start = np.zeros_like(a) if self.weight[n] == 0 and c > 0 else a
          cc = np.asarray(c).astype(a.dtype)
          pp = p.astype(a.dtype)
          if rounding == 'tensorflow':
            out = start - (cc * (start - pp)).astype(a.dtype)
          elif rounding == 'optax':
            out = cc * pp + np.asarray(keep).astype(a.dtype) * start
          elif rounding == 'nnx':
            out = np.asarray(keep).astype(a.dtype) * start + cc * pp
          else:
            out = start + cc * (pp - start)
          new.append(np.asarray(out).astype(a.dtype))
        else:
          new.append(a)
      self.average[n] = new
      if m == 'copy':
        self.weight[n] = np.float32(1.0)
      elif m == 'average':
        w = self.weight[n]
        self.weight[n] = np.float32(w - np.float32(c * (w - np.float32(1))))

  def read(self, name=None):
    name = self.names[0] if name is None else name
    w = self.weight[name]
    out = []
    for a, i, dtype in zip(self.average[name], self.init, self.dtypes):
      if is_float(a.dtype) and w == 0:
        a = i  # nothing averaged yet: the initial params
      elif is_float(a.dtype) and w != 1:
        a = a / w.astype(a.dtype)
      out.append(np.asarray(a).astype(dtype))
    return out
