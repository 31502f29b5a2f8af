"""The optimizer that ``emax.flax.EmaTrainState`` runs, and its checks.

:meth:`EmaTrainState.create` gets the average in one of two ways: inside
``tx`` (``emax.with_ema``), or as ``ema`` beside a plain optimizer. Here that
choice is checked and turned into the one ``tx`` the state runs: ``tx``
itself, or ``emax.with_ema(tx, average=ema)``. Either way the average moves
once per real step under ``optax.MultiSteps``, by the rule of
:func:`emax.with_ema`.

Plain optax and JAX: no flax here (``emax.flax`` holds the state itself).
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from optax import Params

from emax import _state
from emax import _transform
from emax._state import EmaState


def check_ema(ema: Any, params: Params) -> None:
  """``ema`` must be an ``emax.ema(...)``: its state an :class:`EmaState`."""
  if not isinstance(ema, optax.GradientTransformation):
    raise TypeError(
        'EmaTrainState.create expected ema to be an emax.ema(...)'
        f' transformation, got {type(ema).__name__} instead. Pass for example'
        ' ema=emax.ema(0.999), not the decay itself.')
  abstract = jax.eval_shape(ema.init, params)
  if isinstance(abstract, EmaState):
    return
  if _state.all_states(abstract):
    raise ValueError(
        'EmaTrainState.create expected ema to be an emax.ema(...)'
        ' transformation, got one whose state holds the optimizer as well'
        f' ({type(abstract).__name__}). Pass it as tx instead:'
        ' tx=emax.with_ema(opt, decay), and leave ema out.')
  raise ValueError(
      'EmaTrainState.create expected ema to be an emax.ema(...)'
      ' transformation, got a GradientTransformation whose state is not an'
      ' emax.EmaState. Pass the optimizer as tx and the average as ema,'
      ' e.g. tx=optax.adam(1e-3), ema=emax.ema(0.999).')


def _check_accumulation(abstract: Any) -> None:
  """Under ``optax.MultiSteps`` the average in ``tx`` must skip micro-steps.

  It does inside ``optax.MultiSteps(emax.with_ema(opt, d), k)`` and in
  ``emax.with_ema(optax.MultiSteps(opt, k), d)``; anywhere else it would
  move on every micro-step.
  """
  if not _state.all_states(abstract, optax.MultiStepsState):
    return

  def skips_micro_steps(x: Any) -> bool:
    return _transform.is_multisteps(x) or (
        isinstance(x, _transform.WithEmaState)
        and _transform.is_multisteps(x.inner_state))

  covered = [s for x in jax.tree.leaves(abstract, is_leaf=skips_micro_steps)
             if skips_micro_steps(x) for s in _state.all_states(x)]
  if len(covered) < len(_state.all_states(abstract)):
    raise ValueError(
        'The average sits outside optax.MultiSteps, so it would move on every'
        ' micro-step. Use tx=emax.with_ema(optax.MultiSteps(opt, k), decay)'
        ' (or optax.MultiSteps(emax.with_ema(opt, decay), k)); or pass'
        ' tx=optax.MultiSteps(opt, k) and ema=emax.ema(decay).')


def split(tx: Any, params: Params
          ) -> tuple[Any, optax.GradientTransformation | None]:
  """``(optimizer, average)`` of ``tx = emax.with_ema(optimizer, ...)``.

  The two ways to give the average (``tx=emax.with_ema(opt, ...)``, or
  ``tx=opt`` and ``ema=emax.ema(...)``) then build the same state, which
  averages ``batch_stats`` too. Any other ``tx`` (or an average that is not
  an ``emax.ema``, e.g. BEMA) comes back as it is, with ``None``.
  """
  init = getattr(tx, 'init', None)
  if isinstance(init, _transform._Init) and isinstance(
      jax.eval_shape(init.average.init, params), EmaState):
    return init.optimizer, init.average
  return tx, None


def full_tx(tx: Any, ema: optax.GradientTransformation | None,
            params: Params, averages_batch_stats: bool) -> Any:
  """The optimizer the state runs: ``tx`` itself, or ``tx`` then ``ema``."""
  if not (hasattr(tx, 'init') and hasattr(tx, 'update')):
    raise TypeError(
        'EmaTrainState.create expected tx to be an optax optimizer, got'
        f' {type(tx).__name__} instead.')
  abstract = jax.eval_shape(tx.init, params)
  found = len(_state.all_states(abstract))
  if ema is not None:
    if found:
      raise ValueError(
          'EmaTrainState.create got an average twice: tx already holds one'
          ' (an emax.EmaState in its state, e.g. from emax.with_ema or'
          ' emax.ema) and ema gives another. Configure it once: either'
          ' tx=emax.with_ema(opt, decay, ...) and no ema, or tx=opt and'
          ' ema=emax.ema(decay, ...) (needed to average batch_stats; for'
          ' gradient accumulation, tx=optax.MultiSteps(opt, k)).')
    return _transform.with_ema(tx, average=ema)
  if found == 0:
    raise ValueError(
        'EmaTrainState.create got a tx that holds no average and no ema. Pass'
        ' tx=emax.with_ema(opt, decay, ...), or tx=opt with'
        ' ema=emax.ema(decay, ...).')
  if found > 1:
    raise ValueError(
        f'tx holds {found} emax averages; EmaTrainState reads exactly one.'
        ' For several decays keep named averages in one:'
        ' tx=emax.with_ema(opt, {"fast": 0.99, "slow": 0.999}).')
  if averages_batch_stats:
    raise ValueError(
        'EmaTrainState.create: batch_stats_policy=\'average\' averages the'
        ' batch_stats with the options of the params\' average, which cannot'
        ' be read back out of tx. Give them once, as ema: tx=opt,'
        ' ema=emax.ema(decay, ...) (the state then runs the average after'
        ' opt, as emax.with_ema does); or keep this tx and pass'
        ' batch_stats_policy=\'copy\' to evaluate with the live statistics.')
  _check_accumulation(abstract)
  return tx
