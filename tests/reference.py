"""An independent NumPy reference of emax's averaging rules, step by step.

Written from the specification (TensorFlow's shadow-variable update in the
accumulator dtype; copy / keep / average steps; the NaN guard), not from the
library code, and run leaf by leaf in NumPy.
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


class NumpyEma:
  """The reference: a list of leaves, plain NumPy arithmetic."""

  def __init__(self, leaves, debias=False, update_every=1, start_step=0,
               skip_nonfinite=True):
    self.dtypes = [np.asarray(x).dtype for x in leaves]
    self.ema = []
    for x in leaves:
      x = np.asarray(x)
      acc = acc_dtype(x.dtype)
      if debias and is_float(x.dtype):
        self.ema.append(np.zeros(x.shape, acc))
      else:
        self.ema.append(x.astype(acc))
    self.weight = np.float32(0.0 if debias else 1.0)
    self.count = 0
    self.skipped = 0
    self.k, self.s, self.skip = update_every, start_step, skip_nonfinite

  def step(self, leaves, decay):
    """``decay`` is the float32 decay for this step (before ** k)."""
    step = self.count + 1
    self.count += 1
    leaves = [np.asarray(x) for x in leaves]
    finite = all(np.all(np.isfinite(x.astype(np.float32)))
                 for x in leaves if is_float(x.dtype))
    if step <= self.s:
      mode = 'copy'
    elif step % self.k == 0:
      mode = 'average'
    else:
      mode = 'keep'
    if self.skip and not finite and mode != 'keep':
      # Only a step that would change the average is checked and skipped.
      self.skipped += 1
      mode = 'keep'
    d = np.float32(decay) ** np.int32(self.k) if self.k > 1 else np.float32(
        decay)
    d = np.float32(d)
    one_minus = np.float32(np.float32(1.0) - d)
    new = []
    for a, p in zip(self.ema, leaves):
      if not is_float(a.dtype):
        new.append(p.copy())
      elif mode == 'copy':
        new.append(p.astype(a.dtype))
      elif mode == 'average':
        c = one_minus.astype(a.dtype)
        new.append((a - c * (a - p.astype(a.dtype))).astype(a.dtype))
      else:
        new.append(a)
    self.ema = new
    if mode == 'copy':
      self.weight = np.float32(1.0)
    elif mode == 'average':
      self.weight = np.float32(
          self.weight - one_minus * (self.weight - np.float32(1.0)))

  def read(self):
    out = []
    for a, dtype in zip(self.ema, self.dtypes):
      if is_float(a.dtype) and self.weight != 0:
        a = a / self.weight.astype(a.dtype)
      out.append(np.asarray(a).astype(dtype))
    return out
