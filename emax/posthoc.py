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

import argparse
import gc
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import jax
import numpy as np
import optax

import emax

__all__ = ('coefficients', 'from_checkpoints', 'reconstruct')

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

  def result(self, dtypes: Sequence[Any] | None = None) -> Any:
    """The sum, each float leaf rounded once to its snapshots' dtype.

    ``dtypes``: one per leaf, the dtype to round to instead (None: keep).
    """
    leaves = []
    if dtypes is None:
      dtypes = [None] * len(self.specs)
    for total, kept, (_, _, dtype, sharding), wanted in zip(
        self.totals, self.latest, self.specs, dtypes):
      if wanted is not None:
        dtype = wanted
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


# --- snapshots that training saved with Orbax -------------------------------


def _targets(target_sigma_rel: Any) -> tuple[list[float], bool]:
  """The target widths as floats, and whether a single one was given."""
  if isinstance(target_sigma_rel, (list, tuple, np.ndarray)):
    targets = [_scalar(t, f'target_sigma_rel[{i}]')
               for i, t in enumerate(target_sigma_rel)]
    if not targets:
      raise ValueError('target_sigma_rel is empty; give a width, e.g. 0.1,'
                       ' or a list of them.')
    for i, t in enumerate(targets):
      _check_sigma_rel(t, f'target_sigma_rel[{i}]')
    return targets, False
  target = _scalar(target_sigma_rel, 'target_sigma_rel')
  _check_sigma_rel(target, 'target_sigma_rel')
  return [target], True


def _snapshot_widths(ckpt: Any, plan: Any, entry: Any, sigma_rels: Any,
                     where: str) -> list[float | None]:
  """The width of each average of one checkpoint (None: not a snapshot)."""
  names = (f', named {list(plan.names)}' if plan.names is not None else '')
  if sigma_rels is None:
    widths = entry.get('sigma_rels') if entry else None
    if not widths or all(w is None for w in widths):
      raise ValueError(
          f'{where}: no sigma_rel is recorded for the {plan.count}'
          f' average{"s" if plan.count > 1 else ""} at {list(plan.path)}'
          f'{names}. Save them with emax.checkpoint.save(manager, step,'
          ' state, sigma_rels=decays) (decays: the mapping given to'
          ' emax.ema), or pass sigma_rels= here: {name: sigma_rel}, or one'
          ' per average in the order given to emax.ema.')
    if len(widths) != plan.count:
      raise ValueError(
          f'{where}: the record lists {len(widths)} sigma_rels for'
          f' {plan.count} averages; the checkpoint is not what emax saved.')
    return [None if w is None else float(w) for w in widths]
  if hasattr(sigma_rels, 'keys'):
    if plan.names is None:
      raise ValueError(
          f'{where}: sigma_rels is a mapping, but the names of the'
          f' {plan.count} averages at {list(plan.path)} were not saved. Give'
          ' a sequence instead, one sigma_rel per average in the order given'
          ' to emax.ema (None for an average to leave out).')
    unknown = [k for k in sigma_rels if k not in plan.names]
    if unknown:
      raise ValueError(f'{where}: sigma_rels names {unknown}; the averages'
                       f' at {list(plan.path)} are named {list(plan.names)}.')
    widths = [ckpt._sigma_rel(sigma_rels[n], f'sigma_rels[{n!r}]')
              if n in sigma_rels else None for n in plan.names]
  elif isinstance(sigma_rels, (list, tuple, np.ndarray)):
    if len(sigma_rels) != plan.count:
      raise ValueError(
          f'{where}: sigma_rels has {len(sigma_rels)} entries, but the'
          f' checkpoint holds {plan.count} averages at {list(plan.path)}'
          f'{names}; give one per average (None for one to leave out).')
    widths = [None if s is None else ckpt._sigma_rel(s, f'sigma_rels[{i}]')
              for i, s in enumerate(sigma_rels)]
  else:
    if plan.count != 1:
      raise ValueError(
          f'{where}: one sigma_rel for {plan.count} averages{names}; give'
          ' one per average: {name: sigma_rel}, or a sequence.')
    widths = [ckpt._sigma_rel(sigma_rels, 'sigma_rels')]
  if all(w is None for w in widths):
    raise ValueError(f'{where}: sigma_rels gives no average a width.')
  return widths


def _restore_leaves(ocp: Any, ckpt: Any, checkpointer: Any, item_dir: Any,
                    stored: Any, keypaths: list[tuple]) -> list[Any]:
  """The arrays at ``keypaths`` of one checkpoint, read alone (NumPy)."""
  specs = [(tuple(ckpt._at(stored, k).shape),
            np.dtype(ckpt._at(stored, k).dtype)) for k in keypaths]
  target, restore_args = ckpt._partial_target(ocp, stored, keypaths, specs,
                                              [None] * len(keypaths))
  restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True))
  return [ckpt._at(restored, k) for k in keypaths]


class _Checkpoint:
  """What one checkpoint holds: where its average is and how to read it."""

  def __init__(self, ocp, ckpt, handler, step, step_dir, *, item, path, like,
               sigma_rels, where):
    self.step = step
    self.item_dir = ckpt._item_directory(step_dir, item, step)
    stored = handler.metadata(self.item_dir)
    self.stored = getattr(stored, 'tree', stored)
    try:
      custom = ocp.metadata.get_step_metadata(step_dir).custom_metadata
    except (ValueError, FileNotFoundError):  # written without a manager
      custom = None
    recorded = ckpt._recorded(custom or {})
    where = f'{where} (checkpoint step {step})'
    self.path, self.node = ckpt._pick(ckpt._found_states(self.stored), path,
                                      self.stored, where)
    self.plan = ckpt._Plan(self.node, self.path, like=like,
                           recorded=recorded, where=where)
    self.widths = _snapshot_widths(ckpt, self.plan,
                                   ckpt._entry_at(recorded, self.path),
                                   sigma_rels, where)
    self.leaves = [(p, tuple(m.shape), np.dtype(m.dtype))
                   for p, m in ckpt._flatten(self.node)]
    self.nbytes = sum(int(np.prod(s)) * d.itemsize for _, s, d in self.leaves)

  def same_as(self, other: '_Checkpoint') -> None:
    for what, a, b in (('where the average sits', self.path, other.path),
                       ('the names', self.plan.names, other.plan.names),
                       ('the sigma_rels', self.widths, other.widths),
                       ('the arrays (paths, shapes, dtypes)', self.leaves,
                        other.leaves)):
      if a != b:
        raise ValueError(
            f'Checkpoints {other.step} and {self.step} differ in {what}:'
            f' {b} against {a}. Reconstruct from the checkpoints of one run.')


def from_checkpoints(directory: Any, target_sigma_rel: Any, *,
                     target_step: int | None = None, sigma_rels: Any = None,
                     path: Sequence[str | int] | None = None, like: Any = None,
                     item: str | None = None,
                     progress: Callable[[list[int]], Iterable[int]] | None
                     = None) -> Any:
  """Post-hoc EMA from the Orbax checkpoints that training wrote.

  Each checkpoint step up to ``target_step`` gives one snapshot per
  power-function average in it: its step is the :attr:`emax.EmaState.count`
  saved with it (not the checkpoint's step number), its width the
  ``sigma_rel`` that :func:`emax.checkpoint.save` recorded (or that
  ``sigma_rels`` gives). The weights come from :func:`coefficients`, for each
  target; then the checkpoints are read one at a time, each by a partial
  restore of its average alone (the params and the optimizer state are not
  read), and every snapshot is added, debiased as
  :func:`emax.bias_correction` reads it, into a float64 sum per target, as
  :func:`reconstruct` does. Host memory holds one float64 sum per target (8
  bytes per param) plus one checkpoint's averages, whatever the number of
  checkpoints; several targets cost one read of the checkpoints.

  Checkpoints whose average has seen no step (``count`` 0, e.g. saved
  before training) hold no snapshot and are skipped.

  Args:
    directory: the checkpoint directory of an ``orbax.checkpoint``
      ``CheckpointManager`` (or the manager; its saves in flight are waited
      for first).
    target_sigma_rel: the width to reconstruct, or a sequence of widths.
    target_step: the checkpoint step to reconstruct at (its ``count`` is the
      target time; later checkpoints are not read); the latest by default.
    sigma_rels: the widths of the saved averages, when the checkpoints do
      not record them or to override the record: ``{name: sigma_rel}`` (or
      the mapping given to :func:`emax.ema`: power-function schedules know
      their ``sigma_rel``), a sequence with one entry per average in the
      order given to :func:`emax.ema` (``None`` leaves one out), or one
      number for a single average.
    path: where the average sits in the saved tree (keys from the root,
      e.g. ``('opt_state', 'ema_state')``), when it holds several.
    like: the abstract state (``jax.eval_shape(tx.init, params)``), needed
      for ``pack=True`` and ``offload=True`` averages, or a tree shaped like
      the params (for their dtypes and tree types); see
      :func:`emax.checkpoint.read_average`.
    item: the item of a manager that saves several (``item_names``).
    progress: wraps the list of checkpoint steps read in the summing pass,
      e.g. ``tqdm.tqdm``, to show progress.

  Returns:
    The reconstructed params in the params' dtypes (as recorded, or from
    ``like``; else the stored dtypes), NumPy arrays on the host, in the
    stored dicts and lists (``like``'s tree types when given); a list of
    them, one per target, when ``target_sigma_rel`` is a sequence.

  Raises:
    FileNotFoundError: if the directory holds no finished checkpoint or none
      at ``target_step`` (the message lists the steps).
    ValueError: for anything :func:`coefficients` rejects; if no average or
      no width is found (the message says what to save or pass), two
      checkpoints hold the same ``count``, or the checkpoints differ in what
      they hold.

  Examples:
    Train with two power-function averages and save them now and then,
    recording their widths; after training, rebuild other widths:

    >>> import tempfile, jax, jax.numpy as jnp, optax, orbax.checkpoint as ocp
    >>> import emax, emax.checkpoint, emax.posthoc
    >>> decays = {'s05': emax.power_function_decay(sigma_rel=0.05),
    ...           's10': emax.power_function_decay(sigma_rel=0.10)}
    >>> tx = emax.with_ema(optax.sgd(1.0), decays)
    >>> params = {'w': jnp.zeros(2)}
    >>> opt_state = tx.init(params)
    >>> @jax.jit
    ... def train_step(params, opt_state):  # params['w'] becomes the step
    ...   updates, opt_state = tx.update({'w': -jnp.ones(2)}, opt_state, params)
    ...   return optax.apply_updates(params, updates), opt_state
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   with ocp.CheckpointManager(directory) as manager:
    ...     for step in range(1, 101):
    ...       params, opt_state = train_step(params, opt_state)
    ...       if step % 20 == 0:
    ...         _ = emax.checkpoint.save(manager, step, {'params': params,
    ...             'opt_state': opt_state}, sigma_rels=decays)
    ...   s10, s07 = emax.posthoc.from_checkpoints(directory, [0.10, 0.07])
    >>> print(s10['w'], emax.ema_params(opt_state, 's10')['w'], s07['w'])
    [89.30 89.30] [89.30 89.30] [92.81 92.81]

  A tracked width comes back as itself; a 0.07 average tracked during
  training would have been 92.94 (from ten snapshots, the reconstruction is
  close, not exact).
  """
  from emax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  ocp = ckpt._ocp()  # pylint: disable=protected-access
  from etils import epath  # pylint: disable=g-import-not-at-top
  where = 'emax.posthoc.from_checkpoints'
  targets, single = _targets(target_sigma_rel)
  root = epath.Path(ckpt._directory_of(directory))
  found = ckpt._finished_steps(ocp, root)
  if target_step is None:
    target_step = max(found)
  elif isinstance(target_step, bool) or not isinstance(
      target_step, (numbers.Integral, np.integer)):
    raise TypeError(f'target_step must be an int (a checkpoint step), got'
                    f' {target_step!r}.')
  elif target_step not in found:
    raise FileNotFoundError(
        f'No checkpoint for target_step {target_step} in {root}; the saved'
        f' steps are {sorted(found)}. Pass one of them, or None for the'
        ' latest.')
  chosen = sorted(s for s in found if s <= target_step)
  handler = ocp.PyTreeCheckpointHandler()
  checkpointer = ocp.Checkpointer(handler)
  try:
    # Metadata first (no arrays): a mismatch fails before anything is read.
    checkpoints = []
    for step in chosen:
      checkpoints.append(_Checkpoint(
          ocp, ckpt, handler, step, found[step], item=item,
          path=path, like=like, sigma_rels=sigma_rels, where=where))
      checkpoints[-1].same_as(checkpoints[0])
    first = checkpoints[0]
    counts = [int(np.asarray(_restore_leaves(
        ocp, ckpt, checkpointer, c.item_dir, c.stored,
        [c.path + ('count',)])[0])) for c in checkpoints]
    seen = {}
    for c, n in zip(checkpoints, counts):
      if n > 0 and n in seen:
        raise ValueError(
            f'Checkpoints {seen[n]} and {c.step} both hold averages after'
            f' {n} steps (EmaState.count): one snapshot twice. Reconstruct'
            ' from one run, or pass target_step= before the repeat.')
      seen[n] = c.step
    if counts[-1] <= 0:
      raise ValueError(
          f'{where}: the checkpoint at step {chosen[-1]} holds an average of'
          ' no step yet (count 0); reconstruct at a later checkpoint.')
    snapshots = [(i, j, counts[i], w) for i, c in enumerate(checkpoints)
                 if counts[i] > 0 for j, w in enumerate(c.widths)
                 if w is not None]
    steps = np.array([s[2] for s in snapshots], np.float64)
    widths = np.array([s[3] for s in snapshots], np.float64)
    weights, used = [], set()
    for target in targets:
      w, u = _solve(steps, widths, target, float(counts[-1]),
                    ('snapshot steps (EmaState.count)', 'snapshot sigma_rels'))
      weights.append(w)
      used |= set(u.tolist())
    latest = max(used, key=lambda k: (steps[k], -k))
    sums = [_Sum() for _ in targets]
    to_read = sorted({snapshots[k][0] for k in used})
    read_steps = [chosen[i] for i in to_read]
    index_of = {chosen[i]: i for i in to_read}
    out_treedef = None
    for step in (progress(read_steps) if progress else read_steps):
      i = index_of[step]
      c = checkpoints[i]
      values = _restore_leaves(ocp, ckpt, checkpointer, c.item_dir, c.stored,
                               [c.path + p for p, _, _ in c.leaves])
      node = ckpt._rebuild(c.node, values)
      del values
      for k in (k for k in sorted(used) if snapshots[k][0] == i):
        j = snapshots[k][1]
        snapshot = f'checkpoint step {step}, average {j}'
        if c.plan.like_state is not None:
          name = None if c.plan.names is None else c.plan.names[j]
          tree = emax.bias_correction(
              ckpt._pour(node, c.plan.like_state, where), name)
          leaves, out_treedef = jax.tree.flatten(tree)
          leaves = [np.asarray(x) for x in leaves]
          del tree
        else:
          leaves = [x for _, x in ckpt._accumulated(
              node, c.plan, j if c.plan.stacked else None)]
        for total, w in zip(sums, weights):
          total.add(leaves, float(w[k]), k == latest, snapshot)
        del leaves
      del node
      if c.nbytes >= ckpt._COLLECT_ABOVE_BYTES:
        gc.collect()  # Orbax's reference cycles hold restored arrays
  finally:
    checkpointer.close()
  plan = first.plan
  if plan.like_state is not None:
    dtypes = list(plan.like_state.info.param_dtypes)
    results = [out_treedef.unflatten(s.result(dtypes)) for s in sums]
  else:
    results = [s.result(plan.dtypes) for s in sums]
    if plan.treedef is not None:
      results = [plan.treedef.unflatten(r) for r in results]
    else:
      results = [ckpt._rebuild(first.node['average'], r) for r in results]
  return results[0] if single else results


# --- the command line ---------------------------------------------------------

_CLI = '''\
Post-hoc EMA from the Orbax checkpoints of a training run.

Reads the checkpoints in CHECKPOINT_DIR (an orbax.checkpoint.CheckpointManager
directory whose states hold emax power-function averages, saved with
emax.checkpoint.save(..., sigma_rels=...) or described with --tracked),
reconstructs the average of each --sigma-rel at checkpoint --step (the latest
by default), and writes, for each, an Orbax checkpoint of the params:

  OUT_DIR/sigma_rel_<S>/<STEP>/   a CheckpointManager directory; restore with
      orbax.checkpoint.CheckpointManager("OUT_DIR/sigma_rel_<S>").restore(STEP)
'''


def _parse_tracked(values: list[str] | None) -> Any:
  """``--tracked``: ``NAME=S ...`` (a mapping) or ``S ...`` (in order)."""
  if not values:
    return None
  if all('=' in v for v in values):
    return {k: float(v) for k, v in (x.split('=', 1) for x in values)}
  if any('=' in v for v in values):
    raise ValueError('--tracked takes either NAME=SIGMA_REL entries or plain'
                     f' SIGMA_REL values, not both: {values}.')
  return [None if v.lower() == 'none' else float(v) for v in values]


def _print_progress(steps: list[int]) -> Iterable[int]:
  for k, step in enumerate(steps, 1):
    print(f'checkpoint {k}/{len(steps)} (step {step})', file=sys.stderr,
          flush=True)
    yield step


def _progress_bar(quiet: bool) -> Callable[[list[int]], Iterable[int]] | None:
  if quiet:
    return None
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return _print_progress
  return lambda steps: tqdm(steps, desc='checkpoints', unit='ckpt')


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m emax.posthoc``: see ``python -m emax.posthoc --help``."""
  parser = argparse.ArgumentParser(
      prog='python -m emax.posthoc', description=_CLI,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('checkpoint_dir', metavar='CHECKPOINT_DIR')
  parser.add_argument('--sigma-rel', type=float, nargs='+', required=True,
                      metavar='S', help='the widths to reconstruct')
  parser.add_argument('--out', required=True, metavar='OUT_DIR',
                      help='where to write one checkpoint per width')
  parser.add_argument('--step', type=int, default=None,
                      help='the checkpoint step to reconstruct at (default:'
                      ' the latest)')
  parser.add_argument('--tracked', nargs='+', metavar='NAME=S',
                      help='the widths of the saved averages, when the'
                      ' checkpoints do not record them: NAME=S per named'
                      ' average, or one S per average in order')
  parser.add_argument('--path', nargs='+', metavar='KEY',
                      help='keys from the root to the average, when the'
                      ' saved state holds several')
  parser.add_argument('--item', default=None,
                      help='the item, for managers that save several')
  parser.add_argument('--quiet', action='store_true',
                      help='no progress bar')
  args = parser.parse_args(argv)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from emax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  outs = [os.path.join(args.out, f'sigma_rel_{s:g}') for s in args.sigma_rel]
  taken = [o for o in outs if os.path.isdir(o) and os.listdir(o)]
  if taken:
    parser.error(f'{", ".join(taken)} already exist{"s" * (len(taken) == 1)};'
                 ' remove them or choose another --out.')
  try:
    results = from_checkpoints(
        args.checkpoint_dir, list(args.sigma_rel), target_step=args.step,
        sigma_rels=_parse_tracked(args.tracked), path=args.path,
        item=args.item, progress=_progress_bar(args.quiet))
  except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
    parser.exit(1, f'{parser.prog}: error: {e}\n')
  step = args.step
  if step is None:  # from_checkpoints found them: the latest
    from etils import epath  # pylint: disable=g-import-not-at-top
    step = max(ckpt._finished_steps(ocp, epath.Path(args.checkpoint_dir)))
  for sigma_rel, out, params in zip(args.sigma_rel, outs, results):
    with ocp.CheckpointManager(os.path.abspath(out)) as manager:
      ckpt.save(manager, step, params, custom_metadata={'posthoc': {
          'sigma_rel': sigma_rel, 'step': step,
          'checkpoints': os.path.abspath(args.checkpoint_dir)}})
    print(f'sigma_rel {sigma_rel:g}: wrote {out}/{step}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
