"""A float64 NumPy reference for post-hoc EMA, independent of emax.

Transcribed from Karras et al. (2024), "Analyzing and Improving the Training
Dynamics of Diffusion Models" (EDM2), and the formulas of its code
(``training/phema.py``, ``reconstruct_phema.py``), in the paper's own form:
the ``t_ratio ** t_exp`` form of Eq. 151 with its sign switch, Algorithm 2's
cubic for the exponent, Algorithm 3's solve, EDM2's trainer-side ``beta``
(Eq. 127) and its rule that only snapshots up to the output time take part.
Nothing here imports emax.
"""

import numpy as np


def std_to_exp(std):
  """Algorithm 2 (Eq. 126): the exponent gamma of a relative width."""
  t = np.float64(std) ** -2
  return np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max()


def exp_to_std(exp):
  """Eq. 123: the relative width of a power-function profile."""
  exp = np.float64(exp)
  return np.sqrt((exp + 1) / (exp + 2) ** 2 / (exp + 3))


def power_function_correlation(a_ofs, a_exp, b_ofs, b_exp):
  """Eq. 151: the inner product of two power-function profiles."""
  t_ratio = a_ofs / b_ofs
  t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)
  t_max = np.maximum(a_ofs, b_ofs)
  num = (a_exp + 1) * (b_exp + 1) * t_ratio ** t_exp
  den = (a_exp + b_exp + 1) * t_max
  return num / den


def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std):
  """Algorithm 3, one output: weights per input, zero for inputs after it.

  As ``reconstruct_phema.py`` does, only inputs with ``0 < ofs <= out_ofs``
  take part; the solve is ``A x = B`` over those, normalized to sum to one.
  """
  in_ofs = np.float64(in_ofs)
  in_std = np.float64(in_std)
  keep = (in_ofs > 0) & (in_ofs <= out_ofs)
  ofs, exp = in_ofs[keep], np.array([std_to_exp(s) for s in in_std[keep]])
  rv = lambda x: np.float64(x).reshape(-1, 1)
  cv = lambda x: np.float64(x).reshape(1, -1)
  a = power_function_correlation(rv(ofs), rv(exp), cv(ofs), cv(exp))
  b = power_function_correlation(rv(ofs), rv(exp), cv(out_ofs),
                                 cv(std_to_exp(out_std)))
  x = np.linalg.solve(a, b)
  x = x / np.sum(x, axis=0)
  out = np.zeros(in_ofs.shape)
  out[keep] = x[:, 0]
  return out


def power_function_beta(std, t_next, t_delta):
  """Eq. 127: EDM2's decay for the batch that brings time to ``t_next``."""
  return (1 - t_delta / t_next) ** (std_to_exp(std) + 1)


def tracked_weights(std, t):
  """Weights of ``theta_0 .. theta_t`` in EDM2's tracked average at time t.

  Runs EDM2's ``PowerFunctionEMA`` in float64 with a batch of one: the average
  starts as a copy of ``theta_0``; then each step trains, advances
  ``cur_nimg`` by one and lerps toward the new params by ``1 - beta`` with
  ``beta = power_function_beta(std, t_next=cur_nimg, t_delta=1)``. The params
  are one-hot, so the average is the weight vector.
  """
  eye = np.eye(t + 1)
  ema = eye[0].copy()
  for cur_nimg in range(1, t + 1):
    beta = power_function_beta(std, t_next=cur_nimg, t_delta=1)
    ema = ema + (eye[cur_nimg] - ema) * (1 - beta)
  return ema


def profile_integrals(std, t, n, offset=0):
  """``int p_t`` over ``(i - 1 + offset, i + offset]`` for ``i = 0 .. n``.

  ``p_t(tau) = (gamma + 1) tau**gamma / t**(gamma + 1)`` on ``[0, t]`` is the
  continuous power-function profile (Eq. 121 with ``ofs = t``); its
  antiderivative is ``(tau / t)**(gamma + 1)``. ``offset=0`` gives param
  ``i`` the interval ``(i - 1, i]``; ``offset=1`` is the other convention one
  might guess, ``(i, i + 1]`` with the profile ending at ``t + 1``.
  """
  exp = std_to_exp(std)
  end = t + offset
  cdf = lambda tau: (np.clip(tau, 0, end) / end) ** (exp + 1)
  i = np.arange(n + 1, dtype=np.float64)
  return cdf(i + offset) - cdf(i - 1 + offset)
