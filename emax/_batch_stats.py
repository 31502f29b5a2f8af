"""BatchNorm statistics as plain trees: averaged, and recomputed from data.

Two things that ``emax.flax`` does with a model's ``batch_stats``, without
flax (``emax.flax`` runs the model and hands the statistics here):

* ``EmaTrainState.batch_stats_ema``, their average, kept with the very
  ``emax.ema(...)`` transformation that averages the params: its check
  (:func:`checked`), one step (:func:`average`), :func:`read` and
  :func:`reset`;
* :func:`mean_over_batches`: the plain (momentum-free) mean over batches of
  each batch's statistics, which ``recompute_batch_stats`` takes, with
  :func:`check_recompute_args` for what it is given.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from optax import Params

from emax import _read
from emax import _state
from emax import _step
from emax._state import EmaState

STATE_FIELD = 'batch_stats_ema'
"""The field of ``emax.flax.EmaTrainState`` that holds their average."""

FIELD = f'EmaTrainState.{STATE_FIELD}'


POLICIES = ('average', 'copy')
"""What ``emax.flax.EmaTrainState`` evaluates the BatchNorm statistics with."""


def check_policy(policy: Any, where: str) -> str:
  """``policy`` if it is a known batch_stats policy, else a clear error."""
  if policy not in POLICIES:
    raise ValueError(
        f'{where}: batch_stats_policy must be one of {POLICIES},'
        f' got {policy!r} instead. \'average\' evaluates with an average of'
        ' the BatchNorm statistics, \'copy\' with the live ones.')
  return policy


def checked(state: Any) -> EmaState | None:
  """``None``, or the :class:`EmaState` of ``FIELD`` (an error if not one)."""
  return None if state is None else _state.check_state(state, FIELD)


def _negative_zeros(tree: Params) -> Params:
  """Updates that change nothing, to the bit: ``x + (-0.0) == x`` for all x."""
  return jax.tree.map(lambda x: jnp.full_like(x, -0.0), tree)


def average(ema_tx: optax.GradientTransformation, batch_stats: Params,
            state: EmaState) -> tuple[Params, EmaState]:
  """One step of ``ema_tx`` with ``batch_stats`` as its params.

  The updates are zeros, so the statistics pass through unchanged, except
  on the average's write-back steps, where they become their average.
  """
  updates, state = ema_tx.update(_negative_zeros(batch_stats), state,
                                 batch_stats)
  return optax.apply_updates(batch_stats, updates), state


def read(state: Any, name: str | None, where: str) -> Params:
  """The average ``name`` of the ``batch_stats``, to evaluate with."""
  if state is None:
    raise ValueError(
        f'{where}: batch_stats_policy is \'average\' but this state holds no'
        ' average of the batch_stats (it was created with'
        ' batch_stats_policy=\'copy\', or without ema). Create it with'
        ' ema=emax.ema(...) and batch_stats_policy=\'average\', or'
        ' evaluate with the live statistics: batch_stats_policy=\'copy\'.')
  return _read.ema_params(checked(state), name)


def reset(state: Any, batch_stats: Params, where: str) -> EmaState:
  """The average set to ``batch_stats``, as :func:`emax.reset` does."""
  return _step.reset(checked(state), batch_stats, where=where)


def check_recompute_args(variables: Any, batches: Any) -> None:
  """``variables`` must hold ``'batch_stats'``; ``batches`` a leading axis."""
  if not hasattr(variables, 'keys') or 'batch_stats' not in variables:
    got = list(variables) if hasattr(variables, 'keys') else type(
        variables).__name__
    raise ValueError(
        'recompute_batch_stats expected variables with a "batch_stats"'
        f' collection, got {got} instead. Pass the full variables, e.g.'
        ' state.eval_variables() or {"params": p, "batch_stats": s}.')
  leaves = jax.tree.leaves(batches)
  if not leaves or any(jnp.ndim(x) < 1 or jnp.shape(x)[0] < 1
                       for x in leaves):
    raise ValueError(
        'recompute_batch_stats expected batches stacked on a leading axis of'
        ' length >= 1, e.g. an array of shape (num_batches, batch_size, ...).')


def mean_over_batches(stats_of: Callable[[Any, dict | None], Params],
                      like: Params, batches: Any,
                      rngs: dict | None) -> Params:
  """The mean over ``i`` of ``stats_of(batches[i], keys_i)``, in one scan.

  Args:
    stats_of: ``(batch, rngs) -> statistics``, shaped like ``like``.
    like: statistics of the right structure, shapes and dtypes.
    batches: a pytree whose leaves' leading axis indexes the batches.
    rngs: ``None``, or ``{name: key}``; batch ``i`` gets
      ``jax.random.fold_in(key, i)`` for each key.

  Returns:
    The running mean ``avg + (new - avg) / (i + 1)``, in ``like``'s dtypes.
  """
  num = jax.tree.leaves(batches)[0].shape[0]

  def body(avg: Any, i_x: Any) -> tuple[Any, None]:
    i, x = i_x
    keys = None if rngs is None else {
        name: jax.random.fold_in(key, i) for name, key in rngs.items()}
    new = stats_of(x, keys)
    n = (i + 1).astype(jnp.float32)
    avg = jax.tree.map(lambda a, b: a + (b - a) / n.astype(a.dtype), avg, new)
    return avg, None

  start = jax.tree.map(jnp.zeros_like, like)
  avg, _ = lax.scan(body, start, (jnp.arange(num, dtype=jnp.int32), batches))
  return avg
