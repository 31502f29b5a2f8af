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

from collections.abc import Callable, Iterable, Sequence
import sys
from typing import Any

import numpy as np
import optax

from emax import _posthoc_checkpoints
from emax import _posthoc_snapshots
from emax import _posthoc_solve
from emax import checkpoint as _checkpoint
from emax._posthoc_cli import main
from emax._posthoc_snapshots import Snapshot

__all__ = ('coefficients', 'from_checkpoints', 'reconstruct')


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
  return _posthoc_snapshots.reconstruct(snapshots, target_sigma_rel,
                                        target_step)


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
  # One garbage-collection threshold for every checkpoint reader: its knob.
  collect = _checkpoint._COLLECT_ABOVE_BYTES  # pylint: disable=protected-access
  return _posthoc_checkpoints.from_checkpoints(
      directory, target_sigma_rel, target_step=target_step,
      sigma_rels=sigma_rels, path=path, like=like, item=item,
      progress=progress, collect_above_bytes=collect)


if __name__ == '__main__':
  sys.exit(main())
