"""An independent float64 NumPy reference of BEMA, step by step.

BEMA (Block and Zhang 2025, "EMA Without the Lag: Bias-Corrected Iterate
Averaging Schemes", arXiv 2508.00180) reads an EMA of the params plus a
correction along the displacement from a snapshot ``theta_0``::

  beta_t  = max((rho + gamma * t) ** -kappa, min_beta)   # EMA step size
  alpha_t = (rho + gamma * t) ** -eta                    # correction weight
  ema_t   = (1 - beta_t) * ema_{t-1} + beta_t * theta_t
  bema_t  = alpha_t * (theta_t - theta_0) + ema_t

Transcribed from TRL's ``BEMACallback`` (huggingface/trl,
``trl/trainer/callbacks.py``, lines 691-755 at commit f2cd577) and the paper's
Figure 1 snippet, not from any emax code. /work/notes/BEMA.md has the sources,
line by line, and where the paper and the authors' own code differ from TRL.

Conventions (TRL's, the default):

* ``params_seq[0]`` is theta at step 0 (the params before any optimizer step,
  what TRL copies in ``on_train_begin``); ``params_seq[n]`` for ``n >= 1`` is
  the params after the n-th optimizer step (TRL's ``state.global_step == n``
  in ``on_step_end``). The result is aligned: ``out[n]`` is the state after
  step ``n``.
* Burn-in ``tau``: for every ``n <= tau`` the snapshot and the EMA are set to
  ``theta_n`` (so after step ``tau`` both equal ``theta_tau``; with ``tau = 0``
  both are ``theta_0``). TRL copies only at ``n == tau`` (and, for ``tau = 0``,
  at train begin); the state from step ``tau`` on is the same.
* Updates happen at steps ``n > tau`` with ``(n - tau) % update_every == 0``.
  The EMA is updated first, with the new params ``theta_n``, then the BEMA
  estimate is formed from that EMA and the same ``theta_n``.
* ``t`` in ``alpha_t`` and ``beta_t`` is the global step ``n`` itself (TRL
  passes ``state.global_step``), 1-based, counting every optimizer step, not
  only the update steps and not from the burn-in. ``count_from='burn_in'``
  uses ``t = n - tau`` instead (see BEMA.md: the paper's reading is not
  certain).
"""

from typing import Any, NamedTuple, Optional

import numpy as np


class BemaStep(NamedTuple):
  """The reference's state after one step; ``out[n][:2]`` is ``(ema, bema)``.

  Attributes:
    ema: the EMA after step n (float64 leaves).
    bema: TRL's output after step n: the BEMA estimate of the last update
      step; before the first update, ``theta_0`` (the step-0 params TRL copied
      into its running model at train begin).
    theta0: the snapshot after step n.
    read: ``alpha(t_n) * (theta_n - theta0) + ema`` with the current params and
      the current step's ``t``: ``theta_n`` during burn-in (``n <= tau``, where
      snapshot and EMA equal ``theta_n``), and equal to ``bema`` on every
      update step. Between update steps (``update_every > 1``) it is the value
      an eval-time read with the current params gives; that choice is emax's
      design, neither TRL nor the paper computes it.
    step: n.
    updated: whether step n updated the EMA.
    t: the ``t`` used for ``alpha``/``beta`` at step n (None during burn-in).
    alpha: ``alpha_t`` at step n (None during burn-in).
    beta: ``beta_t`` at step n, after the ``min_beta`` floor (None during
      burn-in).
  """
  ema: Any
  bema: Any
  theta0: Any
  read: Any
  step: int
  updated: bool
  t: Optional[float]
  alpha: Optional[float]
  beta: Optional[float]


def _map(fn, *trees):
  """Applies ``fn`` leaf by leaf over dicts, lists, tuples and arrays."""
  first = trees[0]
  if isinstance(first, dict):
    return {k: _map(fn, *(t[k] for t in trees)) for k in first}
  if isinstance(first, (list, tuple)):
    return type(first)(_map(fn, *leaves) for leaves in zip(*trees))
  return fn(*trees)


def _f64(tree):
  return _map(lambda x: np.array(x, dtype=np.float64), tree)


def bema_t(step, *, burn_in=0, count_from='step'):
  """The ``t`` that enters ``alpha_t`` and ``beta_t`` at global step ``step``."""
  if count_from == 'step':
    return float(step)
  if count_from == 'burn_in':
    return float(step - burn_in)
  raise ValueError(
      f"count_from must be 'step' (TRL) or 'burn_in', got {count_from!r}.")


def bema_coefficients(t, *, kappa=0.5, eta=0.2, rho=10.0, gamma=1.0,
                      min_beta=0.0):
  """``(alpha_t, beta_t)`` in float64, as TRL's ``_bema_alpha``/``_ema_beta``."""
  base = float(rho) + float(gamma) * float(t)
  beta = max(base ** -float(kappa), float(min_beta))
  alpha = base ** -float(eta)
  return alpha, beta


def bema_read(theta, theta0, ema, alpha):
  """``alpha * (theta - theta0) + ema``, leaf by leaf, in float64."""
  return _map(lambda p, p0, e: e + alpha * (p - p0),
              _f64(theta), _f64(theta0), _f64(ema))


def bema_reference(params_seq, *, kappa=0.5, eta=0.2, rho=10.0, gamma=1.0,
                   burn_in=0, update_every=1, min_beta=0.0, count_from='step'):
  """Runs BEMA over a trajectory of params, in float64.

  Args:
    params_seq: ``[theta_0, theta_1, ..., theta_T]``: the params at step 0
      (before any optimizer step) followed by the params after each optimizer
      step. Each element is an array or a (nested) dict/list/tuple of arrays.
    kappa: EMA power (TRL ``ema_power``).
    eta: bias power (TRL ``bias_power``).
    rho: lag (TRL ``lag``).
    gamma: multiplier (TRL ``multiplier``).
    burn_in: ``tau`` (TRL ``update_after``): the snapshot and the EMA are taken
      at step ``tau``; the first update is at step ``tau + update_every``.
    update_every: ``phi`` (TRL ``update_freq``).
    min_beta: floor on ``beta_t`` (TRL ``min_ema_multiplier``, default 0).
    count_from: ``'step'`` (TRL: ``t = n``) or ``'burn_in'`` (``t = n - tau``).

  Returns:
    A list of ``BemaStep``, ``len(params_seq)`` long; entry ``n`` is the state
    after step ``n`` (entry 0: the initial state).
  """
  if not params_seq:
    raise ValueError('params_seq must hold at least theta_0, got an empty list.')
  if update_every < 1 or burn_in < 0:
    raise ValueError(
        f'Expected update_every >= 1 and burn_in >= 0, got update_every='
        f'{update_every}, burn_in={burn_in}.')
  theta = _f64(params_seq[0])
  theta0 = theta
  ema = theta
  bema = theta  # TRL's running model: a copy of the step-0 model.
  out = [BemaStep(ema=ema, bema=bema, theta0=theta0, read=theta, step=0,
                  updated=False, t=None, alpha=None, beta=None)]
  for n in range(1, len(params_seq)):
    theta = _f64(params_seq[n])
    if n <= burn_in:
      # Burn-in: snapshot and EMA follow the params; TRL's output is untouched.
      theta0 = theta
      ema = theta
      out.append(BemaStep(ema=ema, bema=bema, theta0=theta0, read=theta,
                          step=n, updated=False, t=None, alpha=None, beta=None))
      continue
    t = bema_t(n, burn_in=burn_in, count_from=count_from)
    alpha, beta = bema_coefficients(t, kappa=kappa, eta=eta, rho=rho,
                                    gamma=gamma, min_beta=min_beta)
    updated = (n - burn_in) % update_every == 0
    if updated:
      ema = _map(lambda e, p, b=beta: (1.0 - b) * e + b * p, ema, theta)
      bema = bema_read(theta, theta0, ema, alpha)
    read = bema_read(theta, theta0, ema, alpha)
    out.append(BemaStep(ema=ema, bema=bema, theta0=theta0, read=read, step=n,
                        updated=updated, t=t, alpha=alpha,
                        beta=beta if updated else None))
  return out


def _self_check():
  """Runs the reference on random data and checks it against closed forms."""
  rng = np.random.default_rng(0)
  steps = 200
  walk = np.cumsum(rng.normal(size=(steps + 1, 3, 4)), axis=0)
  params_seq = [{'w': walk[n], 'b': walk[n, 0] * 0.5} for n in range(steps + 1)]

  out = bema_reference(params_seq)
  print('defaults (kappa .5, eta .2, rho 10, gamma 1, tau 0, phi 1):')
  for n in (0, 1, 2, 10, 200):
    s = out[n]
    print(f'  n={n:3d} t={s.t} alpha={s.alpha} beta={s.beta} '
          f'ema[0,0]={s.ema["w"][0, 0]:+.12f} bema[0,0]={s.bema["w"][0, 0]:+.12f}')
  # Step 1, by hand: beta_1 = 11**-.5, alpha_1 = 11**-.2.
  b1, a1 = 11.0 ** -0.5, 11.0 ** -0.2
  ema1 = (1 - b1) * walk[0] + b1 * walk[1]
  np.testing.assert_allclose(out[1].ema['w'], ema1, rtol=0, atol=1e-12)
  np.testing.assert_allclose(out[1].bema['w'], ema1 + a1 * (walk[1] - walk[0]),
                             rtol=0, atol=1e-12)
  # The EMA as an explicit weighted sum of the iterates (weights sum to 1).
  betas = np.array([11.0 ** -0.5] + [(10.0 + n) ** -0.5
                                     for n in range(2, steps + 1)])
  weights = np.zeros(steps + 1)
  weights[0] = np.prod(1 - betas)
  for i in range(1, steps + 1):
    weights[i] = betas[i - 1] * np.prod(1 - betas[i:])
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=0, atol=1e-12)
  np.testing.assert_allclose(out[-1].ema['w'],
                             np.tensordot(weights, walk, axes=1),
                             rtol=0, atol=1e-9)
  for s in out[1:]:
    np.testing.assert_array_equal(s.read['w'], s.bema['w'])

  # Burn-in and update frequency: TRL's schedule of update steps.
  out = bema_reference(params_seq[:10], burn_in=3, update_every=2)
  print('tau=3, phi=2: update steps', [s.step for s in out if s.updated],
        '(TRL test_update_frequency_2: 5, 7, 9)')
  assert [s.step for s in out if s.updated] == [5, 7, 9]
  assert out[5].t == 5.0  # t is the global step, not the step since burn-in.
  np.testing.assert_array_equal(out[4].theta0['w'], walk[3])
  np.testing.assert_array_equal(out[4].bema['w'], walk[0])  # TRL: stale copy.
  np.testing.assert_array_equal(out[2].read['w'], walk[2])  # burn-in read.
  out = bema_reference(params_seq[:10], update_every=3)
  assert [s.step for s in out if s.updated] == [3, 6, 9]

  # Against TRL's control flow, branch for branch (on_train_begin, then
  # on_step_end with state.global_step = n), on flat arrays.
  for tau in (0, 1, 3, 5):
    for phi in (1, 2, 3):
      out = bema_reference(params_seq[:30], burn_in=tau, update_every=phi,
                           min_beta=0.2)
      theta0 = ema = running = walk[0]
      for n in range(1, 30):
        if n < tau:
          pass
        elif n == tau:
          theta0 = ema = walk[n]
        elif (n - tau) % phi == 0:
          beta = max((10 + 1.0 * n) ** -0.5, 0.2)
          alpha = (10 + 1.0 * n) ** -0.2
          ema = ema * (1 - beta) + beta * walk[n]
          running = ema + alpha * (walk[n] - theta0)
        np.testing.assert_allclose(out[n].bema['w'], running, rtol=0,
                                   atol=1e-12)
        if n >= tau:
          np.testing.assert_allclose(out[n].ema['w'], ema, rtol=0, atol=1e-12)
          np.testing.assert_array_equal(out[n].theta0['w'], theta0)

  # What an emax-style float32 implementation gets over 200 steps:
  # avg -= c * (avg - p) with c = beta in float32, read in float32.
  out = bema_reference(params_seq)
  p32 = [{k: v.astype(np.float32) for k, v in p.items()} for p in params_seq]
  avg = dict(p32[0])
  theta0 = dict(p32[0])
  worst = 0.0
  for n in range(1, steps + 1):
    base = np.float32(10.0) + np.float32(n)
    c = base ** np.float32(-0.5)
    a = base ** np.float32(-0.2)
    avg = {k: avg[k] - c * (avg[k] - p32[n][k]) for k in avg}
    read = {k: avg[k] + a * (p32[n][k] - theta0[k]) for k in avg}
    scale = max(np.max(np.abs(v)) for v in params_seq[n].values())
    worst = max(worst, max(np.max(np.abs(read[k] - out[n].bema[k]))
                           for k in read) / scale)
  print(f'float32 emax-style vs float64 reference, 200 steps: max |diff| / '
        f'max |theta| = {worst:.2e} (float32 eps {np.finfo(np.float32).eps:.2e})')
  print('self-check passed')


if __name__ == '__main__':
  _self_check()
