r"""Post-hoc EMA: choose the averaging width after training.

Karras et al. (2024, EDM2, Section 3) train with two
power-function averages, save snapshots of them now and then, and after
training rebuild the average of any other relative width ``sigma_rel`` as a
least-squares combination of the snapshots (their Algorithm 3).

The average that :func:`emax.power_function_decay` tracks (decay
``(1 - 1 / (n + 1)) ** (gamma + 1)`` at the 0-based step ``n``) is, after
``t`` steps, ``sum_i w_i theta_i`` over the params ``theta_1 .. theta_t``
given to steps ``1 .. t``, with

.. math:: w_i = \frac{i^{\gamma + 1} - (i - 1)^{\gamma + 1}}{t^{\gamma + 1}}
   = \int_{i - 1}^{i} p_t(\tau)\, d\tau, \qquad
   p_t(\tau) = \frac{(\gamma + 1)\, \tau^\gamma}{t^{\gamma + 1}}
   \text{ on } [0, t]

(multiply the update by ``t**(gamma + 1)`` and sum). So param ``i`` holds the
interval ``(i - 1, i]`` of the continuous power-function profile ``p_t`` that
ends at ``t = EmaState.count``; the initial params (``theta_0``) get no weight
because the first decay is 0. EDM2 uses the same time: its trainer computes
``beta = (1 - batch / nimg) ** (gamma + 1)`` with ``nimg`` already counting
the current batch, and names each snapshot by that ``nimg``; with a batch of
one, ``nimg`` is ``EmaState.count``, not ``count + 1``. Because each weight is
a linear function (an integral) of the continuous profile, a combination of
snapshot profiles that matches the target profile matches its weights too, so
the closed-form inner products of the continuous profiles (Eq. 151) give the
reconstruction:

.. math:: \langle p_{t_a}, p_{t_b} \rangle
   = \frac{(\gamma_a + 1)(\gamma_b + 1)}{(\gamma_a + \gamma_b + 1)\,
   \max(t_a, t_b)} \left(\frac{\min(t_a, t_b)}{\max(t_a, t_b)}
   \right)^{\gamma_{\text{later}}}

where ``gamma_later`` is the exponent of the profile that ends later. The
weights solve ``A x = b`` with ``A`` the inner products among snapshots and
``b`` those with the target, then are scaled to sum to one.

Solving happens in float64 NumPy on the host; summing the snapshots streams,
one at a time, into float64 host accumulators (see :func:`reconstruct`):
memory is the sum (8 bytes per param) plus one loaded snapshot, whatever the
number of snapshots. With ``sharding=`` (:func:`reconstruct`,
:func:`from_checkpoints`) each snapshot is read into that sharding and summed
on the devices, shard by shard, in float32 (float64 with ``jax_enable_x64``),
so that no host or device holds a whole unsharded tree.

The snapshots come from memory (:func:`reconstruct`), from Orbax checkpoints
(:func:`from_checkpoints`) or from safetensors files that any framework saved
(:func:`from_files`); :func:`save_safetensors` exports any average for use
outside JAX. ``python -m emax.posthoc`` reconstructs from checkpoints or
files into files.
"""

from __future__ import annotations

from collections.abc import Sequence
import sys

import numpy as np

from emax import _posthoc_solve
from emax._posthoc_checkpoints import from_checkpoints
from emax._posthoc_cli import main
from emax._posthoc_files import from_files
from emax._posthoc_snapshots import reconstruct
from emax._safetensors import load_safetensors
from emax._safetensors import save_safetensors

__all__ = ('coefficients', 'from_checkpoints', 'from_files',
           'load_safetensors', 'reconstruct', 'save_safetensors')


def coefficients(steps: Sequence[float], sigma_rels: Sequence[float],
                 target_sigma_rel: float,
                 target_step: float | None = None) -> np.ndarray:
  r"""Weights that combine snapshots into an average of another width.

  The least-squares solution of EDM2's Algorithm 3 (Karras et al., 2024):
  with ``p_k`` the power-function profile of snapshot ``k`` and ``p`` the
  target's, it solves ``sum_k x_k <p_j, p_k> = <p_j, p>`` for every ``j``
  with the closed-form inner products of Eq. 151 (see :mod:`emax.posthoc`),
  in float64, and scales ``x`` to sum to one. The averaged snapshots
  ``sum_k x_k snapshot_k`` then approximate the average that
  ``emax.power_function_decay(sigma_rel=target_sigma_rel)`` would have
  tracked up to ``target_step``.

  Snapshots taken after ``target_step`` get weight 0 (they have seen later
  params), as in EDM2's ``reconstruct_phema.py``.

  Args:
    steps: one per snapshot, the number of optimizer steps it had averaged,
      as :attr:`emax.EmaState.count` counts them (a snapshot taken after
      ``t`` steps has step ``t``). Any time unit works if it is used
      throughout, for example images seen, as EDM2 counts.
    sigma_rels: one per snapshot, the relative width it was tracked with
      (``emax.power_function_decay(sigma_rel=...)``).
    target_sigma_rel: the width to reconstruct.
    target_step: the step to reconstruct at, one of ``steps``; the last
      snapshot's step by default.

  Returns:
    A 1-D float64 NumPy array of weights, one per snapshot in the order
    given, that sums to one.

  Raises:
    ValueError: if ``steps`` and ``sigma_rels`` differ in length or are
      empty; a step is not a finite number above 0; a ``sigma_rel`` (one of
      the snapshots' or the target's) is outside ``(0, 1/sqrt(12))``, the
      widths a power function can have; ``target_step`` is past the last
      snapshot or is not a snapshot step; two snapshots up to
      ``target_step`` share both step and ``sigma_rel``.

  Examples:
    >>> import numpy as np
    >>> import emax.posthoc
    >>> steps = [500, 500, 1000, 1000]
    >>> sigma_rels = [0.05, 0.10, 0.05, 0.10]
    >>> w = emax.posthoc.coefficients(steps, sigma_rels, 0.08)
    >>> w.round(3), round(float(w.sum()), 12)
    (array([ 0.   , -0.003,  0.258,  0.744]), 1.0)

    A width that was tracked is rebuilt from its own snapshot alone; snapshots
    after ``target_step`` get no weight:

    >>> w = emax.posthoc.coefficients(steps, sigma_rels, 0.10)
    >>> np.allclose(w, [0, 0, 0, 1], rtol=0, atol=1e-12)
    True
    >>> emax.posthoc.coefficients(steps, sigma_rels, 0.08, 500).round(3)
    array([0.258, 0.742, 0.   , 0.   ])
  """
  weights, _ = _posthoc_solve.solve(
      _posthoc_solve.vector(steps, 'steps'),
      _posthoc_solve.vector(sigma_rels, 'sigma_rels'), target_sigma_rel,
      target_step, ('steps', 'sigma_rels'))
  return weights


if __name__ == '__main__':
  sys.exit(main())
