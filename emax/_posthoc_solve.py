r"""The EDM2 solve: weights that combine snapshots into another width.

Post-hoc EMA (Karras et al., 2024, Algorithm 3) writes the target average as a
least-squares combination of the snapshots' power-function profiles, with the
closed-form inner products of Eq. 151 (derived in :mod:`emax.posthoc`). This
module checks the steps and widths, builds and solves that system in float64
NumPy on the host, and scales the weights to sum to one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from emax import _options
from emax._schedules import sigma_rel_to_gamma

def vector(values: Any, name: str) -> np.ndarray:
  """``values`` as a 1-D float64 array of finite numbers."""
  try:
    array = np.asarray(values)
  except Exception as e:  # ragged lists and the like
    raise ValueError(
        f'{name} must be a 1-D sequence of numbers, got {values!r}, which'
        f' NumPy cannot read as one ({e}).') from None
  if array.dtype.kind not in 'iuf':
    raise ValueError(
        f'{name} must be a 1-D sequence of real numbers, got {values!r}'
        f' (dtype {array.dtype}). Pass plain ints or floats.')
  if array.ndim != 1:
    raise ValueError(
        f'{name} must be 1-D, one entry per snapshot, got an array of shape'
        f' {array.shape}. Flatten it, or wrap a single value in a list.')
  array = array.astype(np.float64)
  bad = np.flatnonzero(~np.isfinite(array))
  if bad.size:
    raise ValueError(f'{name}[{bad[0]}] is {array[bad[0]]}; every entry must'
                     ' be a finite number.')
  return array


def _inner(t_a: Any, g_a: Any, t_b: Any, g_b: Any) -> np.ndarray:
  """Eq. 151: the inner product of power-function profiles, elementwise."""
  t_a, g_a, t_b, g_b = np.broadcast_arrays(t_a, g_a, t_b, g_b)
  early, late = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
  g_late = np.where(t_a <= t_b, g_b, g_a)  # either one when t_a == t_b
  scale = (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * late)
  return scale * np.exp(g_late * np.log(early / late))


def solve(steps: np.ndarray, sigma_rels: np.ndarray, target_sigma_rel: Any,
           target_step: Any,
           names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
  """Validates everything; the weights and the indices of the used snapshots."""
  steps_name, sigma_name = names
  if steps.shape != sigma_rels.shape:
    raise ValueError(
        f'{steps_name} has {steps.size} entries but {sigma_name} has'
        f' {sigma_rels.size}; give one step and one sigma_rel per snapshot.')
  if steps.size == 0:
    raise ValueError(
        'No snapshots: post-hoc EMA needs at least one snapshot (step,'
        ' sigma_rel), and ideally snapshots of two widths every few percent'
        ' of training.')
  bad = np.flatnonzero(steps <= 0)
  if bad.size:
    raise ValueError(
        f'{steps_name}[{bad[0]}] is {steps[bad[0]]:g}, expected a step > 0:'
        ' a snapshot taken after t optimizer steps has step t'
        ' (EmaState.count), so one taken before any step holds no average.')
  for k, s in enumerate(sigma_rels):
    _options.check_sigma_rel(s, f'{sigma_name}[{k}]')
  target_sigma_rel = _options.check_sigma_rel(target_sigma_rel, 'target_sigma_rel')
  last = float(steps.max())
  if target_step is None:
    target_step = last
  target_step = _options.finite_scalar(target_step, 'target_step')
  if target_step > last:
    raise ValueError(
        f'target_step {target_step:g} is past the last snapshot (step'
        f' {last:g}): the params after it were never averaged. Reconstruct at'
        ' a snapshot step, or pass target_step=None for the last one.')
  if not np.any(steps == target_step):
    earlier = steps[steps < target_step]
    near = (f'; the nearest earlier one is {earlier.max():g}' if earlier.size
            else '')
    raise ValueError(
        f'target_step {target_step:g} is not the step of any snapshot{near}.'
        ' The params between the last snapshot before it and it appear in no'
        ' snapshot, so no combination can rebuild that average (EDM2 has the'
        ' same rule). Pass one of the snapshot steps.')
  used = np.flatnonzero(steps <= target_step)  # later ones saw later params
  pairs: dict[tuple[float, float], int] = {}
  for k in used.tolist():
    key = (float(steps[k]), float(sigma_rels[k]))
    if key in pairs:
      raise ValueError(
          f'Snapshots {pairs[key]} and {k} both have step {key[0]:g} and'
          f' sigma_rel {key[1]:g}: the same average twice makes the'
          ' least-squares system singular. Drop one of them.')
    pairs[key] = k

  gamma = {s: sigma_rel_to_gamma(float(s))
           for s in set(sigma_rels[used].tolist())}
  g = np.array([gamma[s] for s in sigma_rels[used].tolist()])
  g_target = sigma_rel_to_gamma(target_sigma_rel)
  t = steps[used] / target_step  # the weights do not depend on the time unit
  a = _inner(t[:, None], g[:, None], t[None, :], g[None, :])
  b = _inner(t, g, 1.0, g_target)
  try:
    x = np.linalg.solve(a, b)
  except np.linalg.LinAlgError as e:
    raise ValueError(
        f'The least-squares system of the {used.size} snapshots is singular'
        f' ({e}): some snapshots are (nearly) the same average. Drop'
        ' duplicates.') from None
  total = x.sum()
  if not (np.all(np.isfinite(x)) and np.isfinite(total) and total != 0):
    raise ValueError(
        'The least-squares weights are not finite: the snapshots are too'
        ' close to one another to tell apart. Drop near-duplicates (same step,'
        ' nearly equal sigma_rel).')
  weights = np.zeros(steps.shape, np.float64)
  weights[used] = x / total
  return weights, used


class Solved(NamedTuple):
  """The weights of several targets over one set of snapshots."""
  weights: list[np.ndarray]  # one per target, an entry per snapshot
  used: list[int]  # the snapshots that any target weights, in order
  latest: int  # the latest of them, the first given at its step


def solve_targets(steps: np.ndarray, sigma_rels: np.ndarray,
                  targets: list[float], target_step: Any,
                  names: tuple[str, str]) -> Solved:
  """:func:`solve` for each width in ``targets``, and what they use.

  The snapshots of any target are read once for all of them; the latest
  used (largest step, the first given of those at that step) gives the
  non-float leaves, as :func:`emax.update` keeps a non-float param's latest
  value.
  """
  weights, used = [], set()
  for target in targets:
    w, u = solve(steps, sigma_rels, target, target_step, names)
    weights.append(w)
    used |= set(u.tolist())
  order = sorted(used)
  return Solved(weights, order, max(order, key=lambda k: (steps[k], -k)))


def targets(target_sigma_rel: Any) -> tuple[list[float], bool]:
  """The target widths as floats, and whether a single one was given."""
  if isinstance(target_sigma_rel, (list, tuple)) or (
      isinstance(target_sigma_rel, np.ndarray) and target_sigma_rel.ndim):
    values = [_options.finite_scalar(t, f'target_sigma_rel[{i}]')
              for i, t in enumerate(target_sigma_rel)]
    if not values:
      raise ValueError('target_sigma_rel is empty; give a width, e.g. 0.1,'
                       ' or a list of them.')
    return [_options.check_sigma_rel(t, f'target_sigma_rel[{i}]')
            for i, t in enumerate(values)], False
  return [_options.check_sigma_rel(target_sigma_rel, 'target_sigma_rel')], True
