"""The optimizer that ``emax.flax.EmaTrainState`` runs, and its checks.

:meth:`EmaTrainState.create` gets the average in one of two ways: inside
``tx`` (``emax.with_ema``), or as ``ema`` beside a plain optimizer. Here that
choice is checked and turned into the one ``tx`` the state runs (``tx``
itself, or ``tx`` then ``ema`` with the state of :func:`emax.with_ema`),
such that under ``optax.MultiSteps`` an average moves once per real step,
never on micro-steps. :func:`on_real_steps` is that rule, for the params'
average here and for the ``batch_stats`` average in ``emax.flax``.

Plain optax and JAX: no flax here (``emax.flax`` holds the state itself).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, TypeVar

import jax
import jax.numpy as jnp
import optax
from jax import lax
from optax import Params

from emax import _state
from emax import _tree
from emax._state import EmaState
from emax._transform import WithEmaState

T = TypeVar('T')


def _is_multisteps(x: Any) -> bool:
  return isinstance(x, optax.MultiStepsState)


def on_real_steps(old: Any, new: Any, step: Callable[[], T],
                  unchanged: T) -> T:
  """``step()`` if the optimizer took a real step from ``old`` to ``new``.

  Any optimizer but ``optax.MultiSteps`` takes a real step every time:
  ``step()`` runs as it is. Under ``optax.MultiSteps`` (``old`` its state) a
  ``lax.cond`` on whether its ``gradient_step`` moved gives ``step()`` on
  real steps and ``unchanged`` on micro-steps.
  """
  if not _is_multisteps(old):
    return step()
  moved = new.gradient_step != old.gradient_step
  return lax.cond(moved, step, lambda: unchanged)


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


@dataclasses.dataclass(frozen=True)
class _Init:
  optimizer: Any
  ema: optax.GradientTransformation

  def __call__(self, params: Params) -> WithEmaState:
    inner = optax.with_extra_args_support(self.optimizer)
    return WithEmaState(inner.init(params), self.ema.init(params))


@dataclasses.dataclass(frozen=True)
class _Update:
  optimizer: Any
  ema: optax.GradientTransformation

  def __call__(self, updates: optax.Updates, state: WithEmaState,
               params: Optional[Params] = None, **extra_args: Any
               ) -> tuple[optax.Updates, WithEmaState]:
    if params is None:
      raise ValueError(
          'EmaTrainState\'s optimizer needs the params: call'
          ' state.tx.update(grads, state.opt_state, state.params).')
    inner = optax.with_extra_args_support(self.optimizer)
    updates, inner_state = inner.update(updates, state.inner_state, params,
                                        **extra_args)
    updates, ema_state = on_real_steps(
        state.inner_state, inner_state,
        lambda: self.ema.update(updates, state.ema_state, params),
        (updates, state.ema_state))
    return updates, WithEmaState(inner_state, ema_state)


def _average_after(optimizer: Any, ema: optax.GradientTransformation
                   ) -> optax.GradientTransformationExtraArgs:
  """``optimizer`` then ``ema``, as :func:`emax.with_ema` (same state type).

  Under ``optax.MultiSteps`` the average moves only on real steps (when the
  accumulated update is applied), never on micro-steps. Built from the same
  ``optimizer`` and ``ema`` objects, two results compare equal: states made
  by separate ``create`` calls share one tree structure, so a jitted step
  compiles once and a restore target matches.
  """
  return optax.GradientTransformationExtraArgs(_Init(optimizer, ema),
                                               _Update(optimizer, ema))


def _check_accumulation(abstract: Any, ema_given: bool) -> None:
  """The average must move once per real step under ``optax.MultiSteps``."""
  found = [x for x in jax.tree.leaves(abstract, is_leaf=_is_multisteps)
           if _is_multisteps(x)]
  if not found:
    return
  if ema_given:
    if not _is_multisteps(abstract):
      raise ValueError(
          'tx holds an optax.MultiSteps inside another transformation, so'
          ' EmaTrainState cannot tell micro-steps from real steps. Make'
          ' MultiSteps the outermost: tx=optax.MultiSteps(opt, k), with'
          ' ema=emax.ema(...).')
    return
  if not any(_state.all_states(ms.inner_opt_state) for ms in found):
    raise ValueError(
        'The average sits outside optax.MultiSteps, so it would move on every'
        ' micro-step. Put it inside: tx=optax.MultiSteps(emax.with_ema(opt,'
        ' decay), k); or pass tx=optax.MultiSteps(opt, k) and'
        ' ema=emax.ema(decay).')


def full_tx(tx: Any, ema: Optional[optax.GradientTransformation],
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
    _check_accumulation(abstract, ema_given=True)
    return _average_after(tx, ema)
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
  _check_accumulation(abstract, ema_given=False)
  return tx


def check_grads(params: Params, grads: Params) -> None:
  """``grads`` must be shaped like ``params`` before the optimizer runs."""
  pairs, missing, extra = _tree.leaves_by_key(
      params, grads, is_leaf=lambda x: x is None)
  if missing or extra:
    raise ValueError(
        'EmaTrainState.apply_gradients: grads do not match state.params'
        f' (missing from grads: {missing}; not in state.params:'
        f' {extra}). Pass the gradients with respect to state.params,'
        ' e.g. jax.grad(loss_fn)(state.params).')
  for key, p, g in pairs:
    if p is None or g is None or jnp.shape(p) == jnp.shape(g):
      continue
    raise ValueError(
        f'EmaTrainState.apply_gradients: grads leaf {key} has shape'
        f' {jnp.shape(g)} but state.params has shape {jnp.shape(p)} there.'
        ' Pass the gradients with respect to state.params, e.g.'
        ' jax.grad(loss_fn)(state.params).')
