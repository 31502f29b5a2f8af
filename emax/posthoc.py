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
number of snapshots.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import jax
import numpy as np
import optax

import emax

__all__ = ('coefficients', 'reconstruct')

Snapshot = tuple[Any, Any, Union[optax.Params, Callable[[], optax.Params]]]

_SIGMA_REL_MAX = 1 / math.sqrt(12)  # gamma -> 0; gamma -> inf gives 0
_SIGMA_REL_RANGE = (
    f'in (0, {_SIGMA_REL_MAX:.4f}) (a power-function profile of exponent'
    ' gamma > 0 has sigma_rel below 1/sqrt(12))')


def _vector(values: Any, name: str) -> np.ndarray:
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


def _scalar(value: Any, name: str) -> float:
  if isinstance(value, bool) or not isinstance(
      value, (numbers.Real, np.ndarray, jax.Array, np.generic)):
    raise ValueError(f'{name} must be a real number, got {value!r}.')
  array = np.asarray(value)
  if array.ndim != 0 or array.dtype.kind not in 'iuf':
    raise ValueError(
        f'{name} must be a real scalar, got {value!r}. Pass one number.')
  result = float(array)
  if not math.isfinite(result):
    raise ValueError(f'{name} must be finite, got {result}.')
  return result


def _check_sigma_rel(value: float, name: str) -> None:
  if not 0 < value < _SIGMA_REL_MAX:
    raise ValueError(
        f'{name} must be {_SIGMA_REL_RANGE}, got {value}. Typical values are'
        ' 0.05 to 0.15; EDM2 trains with 0.05 and 0.10.')


def _inner(t_a, g_a, t_b, g_b):
  """Eq. 151: the inner product of power-function profiles, elementwise."""
  t_a, g_a, t_b, g_b = np.broadcast_arrays(t_a, g_a, t_b, g_b)
  early, late = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
  g_late = np.where(t_a <= t_b, g_b, g_a)  # either one when t_a == t_b
  scale = (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * late)
  return scale * np.exp(g_late * np.log(early / late))


def _solve(steps: np.ndarray, sigma_rels: np.ndarray, target_sigma_rel: Any,
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
    _check_sigma_rel(s, f'{sigma_name}[{k}]')
  target_sigma_rel = _scalar(target_sigma_rel, 'target_sigma_rel')
  _check_sigma_rel(target_sigma_rel, 'target_sigma_rel')
  last = float(steps.max())
  if target_step is None:
    target_step = last
  target_step = _scalar(target_step, 'target_step')
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
  pairs = {}
  for k in used:
    key = (steps[k], sigma_rels[k])
    if key in pairs:
      raise ValueError(
          f'Snapshots {pairs[key]} and {k} both have step {key[0]:g} and'
          f' sigma_rel {key[1]:g}: the same average twice makes the'
          ' least-squares system singular. Drop one of them.')
    pairs[key] = k

  gamma = {s: emax.sigma_rel_to_gamma(float(s))
           for s in set(sigma_rels[used].tolist())}
  g = np.array([gamma[s] for s in sigma_rels[used].tolist()])
  g_target = emax.sigma_rel_to_gamma(target_sigma_rel)
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
  weights, _ = _solve(_vector(steps, 'steps'),
                      _vector(sigma_rels, 'sigma_rels'), target_sigma_rel,
                      target_step, ('steps', 'sigma_rels'))
  return weights


def _read(snapshots: Any) -> list[Snapshot]:
  """The snapshots as a list of 3-tuples (reads an iterator once)."""
  if isinstance(snapshots, (str, bytes)) or not isinstance(snapshots,
                                                           Iterable):
    raise ValueError(
        'snapshots must be an iterable of (step, sigma_rel, tree_or_loader)'
        f' tuples, got {type(snapshots).__name__}.')
  entries = list(snapshots)
  for k, entry in enumerate(entries):
    if not isinstance(entry, (tuple, list)) or len(entry) != 3:
      got = type(entry).__name__
      if isinstance(entry, (tuple, list)):
        got += f' of length {len(entry)}'
      raise ValueError(
          f'Snapshot {k} must be a (step, sigma_rel, tree_or_loader) tuple,'
          f' got {got}. Give the step it was taken at (EmaState.count), the'
          ' sigma_rel it was tracked with, and its params or a function that'
          ' loads them.')
  return entries


def _column(entries: list[Snapshot], k: int, name: str) -> np.ndarray:
  """Item ``k`` of every snapshot, as float64."""
  return np.array(
      [_scalar(entry[k], f'the {name} of snapshot {j}')
       for j, entry in enumerate(entries)], np.float64).reshape(len(entries))


def _is_float(dtype: np.dtype) -> bool:
  return bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))


class _Sum:
  """A running weighted sum of trees: float64 (complex128) NumPy leaves."""

  def __init__(self):
    self.treedef = None
    self.specs = None  # (path, shape, dtype, sharding or None) per leaf
    self.totals = None
    self.latest = None  # non-float leaves, from the latest snapshot

  def add(self, tree: Any, weight: float, latest: bool, where: str) -> None:
    """Adds ``weight * tree``; keeps non-float leaves if ``latest``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    arrays = [np.asarray(leaf) for _, leaf in flat]
    if self.treedef is None:
      self.treedef = treedef
      self.specs = [(path, a.shape, a.dtype,
                     leaf.sharding if isinstance(leaf, jax.Array) else None)
                    for (path, leaf), a in zip(flat, arrays)]
      self.totals = [None] * len(arrays)
      self.latest = [None] * len(arrays)
    elif treedef != self.treedef:
      raise ValueError(
          f'{where} has a different tree structure from the first snapshot:'
          f' {treedef} versus {self.treedef}. All snapshots must hold the'
          ' same tree (the same params, saved the same way).')
    for j, (a, spec) in enumerate(zip(arrays, self.specs)):
      path, shape, dtype, _ = spec
      if a.shape != shape or a.dtype != dtype:
        raise ValueError(
            f'{where}: leaf {jax.tree_util.keystr(path)} has shape {a.shape}'
            f' and dtype {a.dtype}, but shape {shape} and dtype {dtype} in the'
            ' first snapshot. All snapshots must hold leaves of the same'
            ' shapes and dtypes; cast them alike before reconstructing.')
      if not _is_float(dtype):
        if latest:
          self.latest[j] = a
        continue
      wide = np.complex128 if np.issubdtype(dtype, np.complexfloating) else (
          np.float64)
      term = a.astype(wide)
      term *= weight
      if self.totals[j] is None:
        self.totals[j] = term
      else:
        self.totals[j] += term

  def result(self) -> Any:
    leaves = []
    for total, kept, (_, _, dtype, sharding) in zip(self.totals, self.latest,
                                                    self.specs):
      leaf = kept if total is None else total.astype(dtype)
      if sharding is not None:
        leaf = jax.device_put(leaf, sharding)
      leaves.append(leaf)
    return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _load(item: Any, where: str) -> Any:
  if not callable(item):
    return item
  tree = item()
  if tree is None:
    raise ValueError(
        f'The loader of {where} returned None; a loader must return the'
        ' snapshot\'s tree of arrays (did it forget a return?).')
  return tree


def reconstruct(snapshots: Iterable[Snapshot], target_sigma_rel: float,
                target_step: float | None = None) -> optax.Params:
  """Rebuilds the average of another width from snapshots of averages.

  Reads ``snapshots`` once into a list, computes the weights with
  :func:`coefficients`, then adds the snapshots one at a time: each tree is
  loaded (if a loader is given), its float leaves are added, weighted, into
  float64 accumulators on the host (complex128 for complex leaves), and it is
  dropped before the next one is loaded. With loaders, at most one loaded
  snapshot is alive besides the running sum, whatever the number of
  snapshots. Snapshots taken after ``target_step`` have weight 0 and are
  never loaded.

  Float leaves come back rounded once from float64 to the snapshots' own
  dtypes (bf16 snapshots give a bf16 result). Non-float leaves (counters and
  the like) are taken from the latest snapshot used (the first given of
  those at that step), as :func:`emax.update` keeps the latest value of a
  non-float param. A leaf that is a
  ``jax.Array`` in the first snapshot used comes back as a ``jax.Array`` with
  its sharding; other leaves come back as NumPy arrays.

  Args:
    snapshots: an iterable (a list, a generator...) of ``(step, sigma_rel,
      tree_or_loader)``: the step the snapshot was taken at
      (:attr:`emax.EmaState.count`), the ``sigma_rel`` it was tracked with,
      and its tree of arrays (for example ``emax.ema_params(state)``) or a
      function of no arguments that loads it. Any callable is taken as a
      loader. Arrays are read on the host, so jax arrays must be fully
      addressable (single process).
    target_sigma_rel: the width to reconstruct.
    target_step: the step to reconstruct at, one of the snapshots' steps;
      the last snapshot's step by default.

  Returns:
    The reconstructed tree, structured like the snapshots.

  Raises:
    ValueError: for anything :func:`coefficients` rejects; if ``snapshots``
      is not an iterable of 3-tuples; if a loader returns ``None``; or if the
      snapshots' trees differ in structure, shapes or dtypes.

  Examples:
    Snapshots given by loaders, from a generator; a width that was tracked
    comes back as its own snapshot:

    >>> import numpy as np
    >>> import emax.posthoc
    >>> def loader(value):
    ...   return lambda: {'w': np.full(2, value, np.float32)}
    >>> snapshots = ((step, sigma_rel, loader(step * 10 * sigma_rel))
    ...              for step in (500, 1000) for sigma_rel in (0.05, 0.10))
    >>> emax.posthoc.reconstruct(snapshots, 0.10)
    {'w': array([1000., 1000.], dtype=float32)}

    Trees work as well as loaders; snapshots after ``target_step`` are
    skipped:

    >>> snapshots = [(500, 0.05, {'w': np.float32(1.0)}),
    ...              (500, 0.10, {'w': np.float32(2.0)}),
    ...              (1000, 0.10, {'w': np.float32(9.0)})]
    >>> out = emax.posthoc.reconstruct(snapshots, 0.08, target_step=500)
    >>> out['w'].dtype, round(float(out['w']), 3)
    (dtype('float32'), 1.742)
  """
  entries = _read(snapshots)
  steps = _column(entries, 0, 'step')
  sigma_rels = _column(entries, 1, 'sigma_rel')
  weights, used = _solve(steps, sigma_rels, target_sigma_rel, target_step,
                         ('snapshot steps', 'snapshot sigma_rels'))
  used = used.tolist()
  latest = max(used, key=lambda k: (steps[k], -k))
  total = _Sum()
  for k in used:
    where = f'snapshot {k} (step {steps[k]:g}, sigma_rel {sigma_rels[k]:g})'
    # The loaded tree lives only inside this call: it is gone before the next
    # loader runs.
    total.add(_load(entries[k][2], where), float(weights[k]), k == latest,
              where)
  return total.result()
