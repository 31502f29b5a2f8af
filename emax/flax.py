"""Flax linen integration: :class:`EmaTrainState` and BatchNorm statistics.

The only module of emax that imports ``flax.linen`` / ``flax.training``. Two
routes, pick one:

* :class:`EmaTrainState`: a ``TrainState`` that keeps the average of the params
  (and of BatchNorm ``batch_stats``) and hands out ``eval_variables()``;
* a plain ``flax.training.train_state.TrainState`` with
  ``tx=optax.chain(optimizer, emax.ema(...))``, read with
  ``emax.ema_params(state.opt_state)`` (no batch_stats average).

:func:`recompute_batch_stats` recomputes BatchNorm statistics for averaged
weights from data, as ``torch.optim.swa_utils.update_bn`` does.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

try:
  import flax.linen as nn
  from flax import struct
  from flax.training import train_state
except ImportError as e:  # pragma: no cover - depends on the install
  raise ImportError(
      f'emax.flax needs flax ({e}): pip install "emax[flax]" or'
      ' pip install flax.') from e

from emax import _read
from emax import _state

__all__ = (
    'EmaTrainState',
    'recompute_batch_stats',
)

PyTree = Any

POLICIES = ('average', 'copy')


def _is_ema_state(x: Any) -> bool:
  return isinstance(x, _state.EmaState)


def _count_in(tree: Any, kind: type) -> int:
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
  return sum(isinstance(x, kind) for x in leaves)


def _check_ema(ema: Any, params: PyTree) -> None:
  if not isinstance(ema, optax.GradientTransformation):
    raise TypeError(
        'EmaTrainState.create expected ema to be an emax.ema(...)'
        f' transformation, got {type(ema).__name__} instead. Pass for example'
        ' ema=emax.ema(0.999), not the decay itself.')
  if not _is_ema_state(jax.eval_shape(ema.init, params)):
    raise ValueError(
        'EmaTrainState.create expected ema to be an emax.ema(...)'
        ' transformation, got a GradientTransformation whose state is not an'
        ' emax.EmaState. Pass the optimizer as tx and the average as ema,'
        ' e.g. tx=optax.adam(1e-3), ema=emax.ema(0.999).')


def _full_tx(tx: Any, ema: optax.GradientTransformation,
             params: PyTree) -> Any:
  """``chain(tx, ema)``, or ``tx`` itself when it already holds the average."""
  if not (hasattr(tx, 'init') and hasattr(tx, 'update')):
    raise TypeError(
        'EmaTrainState.create expected tx to be an optax optimizer, got'
        f' {type(tx).__name__} instead.')
  abstract = jax.eval_shape(tx.init, params)
  found = _count_in(abstract, _state.EmaState)
  if found == 1:
    return tx  # e.g. optax.MultiSteps(optax.chain(opt, ema), k)
  if found > 1:
    raise ValueError(
        f'tx already holds {found} emax averages; EmaTrainState keeps exactly'
        ' one. Pass the optimizer alone as tx and the average as ema.')
  if _count_in(abstract, optax.MultiStepsState):
    raise ValueError(
        'tx is an optax.MultiSteps without the average inside, so the average'
        ' would move on every micro-step. Put it inside instead:'
        ' tx=optax.MultiSteps(optax.chain(opt, ema), k), ema=ema (the same'
        ' ema, used again for batch_stats).')
  return optax.chain(tx, ema)


class EmaTrainState(train_state.TrainState):
  """A ``TrainState`` that keeps an exponential moving average of the params.

  ``tx`` is stored as ``optax.chain(tx, ema)`` so ``opt_state`` holds the
  :class:`emax.EmaState` (``emax.ema_params(state.opt_state)`` works as for a
  plain ``TrainState``). With ``batch_stats`` (BatchNorm), a second
  :class:`emax.EmaState` averages them with the same decay, schedule and
  options as the params (``batch_stats_policy='average'``); with ``'copy'``
  evaluation uses the live statistics. Under gradient accumulation pass
  ``tx=optax.MultiSteps(optax.chain(opt, ema), k)`` and the same ``ema``: both
  averages then move once per real step.

  Attributes:
    batch_stats: the live BatchNorm statistics (``None`` without BatchNorm).
    batch_stats_ema: the :class:`emax.EmaState` of ``batch_stats`` under the
      ``'average'`` policy, else ``None``.
    ema_tx: the ``emax.ema(...)`` transformation (static).
    batch_stats_policy: ``'average'`` or ``'copy'`` (static).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, emax, emax.flax
    >>> import flax.linen as nn
    >>> model = nn.Dense(1)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 2)))['params']
    >>> state = emax.flax.EmaTrainState.create(
    ...     apply_fn=model.apply, params=params, tx=optax.sgd(1.0),
    ...     ema=emax.ema(0.5))
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> state = jax.jit(lambda s: s.apply_gradients(grads=grads))(state)
    >>> state.params['bias'], state.ema_params['bias']
    (Array([-1.], dtype=float32), Array([-0.5], dtype=float32))
  """

  batch_stats: Optional[PyTree] = None
  batch_stats_ema: Optional[_state.EmaState] = None
  ema_tx: Optional[optax.GradientTransformation] = struct.field(
      pytree_node=False, default=None)
  batch_stats_policy: str = struct.field(pytree_node=False, default='average')

  @classmethod
  def create(cls, *, apply_fn: Callable, params: PyTree, tx: Any,
             ema: optax.GradientTransformation,
             batch_stats: Optional[PyTree] = None,
             batch_stats_policy: str = 'average', **kwargs) -> 'EmaTrainState':
    """A new state at step 0, the averages started from ``params``.

    Args:
      apply_fn: usually ``model.apply``.
      params: the model's ``'params'`` collection.
      tx: the optimizer. If it already holds an ``emax.ema`` (for example
        ``optax.MultiSteps(optax.chain(opt, ema), k)``) it is used as it is;
        otherwise the state uses ``optax.chain(tx, ema)``.
      ema: an ``emax.ema(...)`` transformation (any options).
      batch_stats: the model's ``'batch_stats'`` collection, if any.
      batch_stats_policy: ``'average'`` (evaluate with an average of the
        statistics, same decay and options as ``ema``) or ``'copy'``
        (evaluate with the live statistics). Ignored without batch_stats.
      **kwargs: other fields of a subclass.

    Returns:
      The new :class:`EmaTrainState`.

    Raises:
      TypeError: if ``ema`` is not a GradientTransformation or ``tx`` not an
        optimizer.
      ValueError: if ``ema`` is not an ``emax.ema``, the policy is unknown,
        or ``tx`` is a ``MultiSteps`` without the average inside.
    """
    if batch_stats_policy not in POLICIES:
      raise ValueError(
          f'batch_stats_policy must be one of {POLICIES}, got'
          f' {batch_stats_policy!r} instead.')
    _check_ema(ema, params)
    full_tx = _full_tx(tx, ema, params)
    bs_ema = None
    if batch_stats is not None and batch_stats_policy == 'average':
      bs_ema = ema.init(batch_stats)
    return cls(
        step=jnp.zeros([], jnp.int32),
        apply_fn=apply_fn,
        params=params,
        tx=full_tx,
        opt_state=full_tx.init(params),
        batch_stats=batch_stats,
        batch_stats_ema=bs_ema,
        ema_tx=ema,
        batch_stats_policy=batch_stats_policy,
        **kwargs,
    )

  def apply_gradients(self, *, grads: PyTree,
                      batch_stats: Optional[PyTree] = None,
                      **kwargs) -> 'EmaTrainState':
    """One optimizer step; the averages follow.

    Args:
      grads: gradients like ``params``.
      batch_stats: the new live BatchNorm statistics from this step's forward
        pass (``mutable=['batch_stats']``), if the model has any.
      **kwargs: other fields to ``replace``.

    Returns:
      The new state: params updated by ``tx``, the params' average updated,
      ``batch_stats`` stored and (under ``'average'``) averaged, on the same
      steps as the params' average.

    Raises:
      ValueError: if ``opt_state`` holds no :class:`emax.EmaState` (e.g. a
        checkpoint restored without a target), or ``batch_stats`` is given to
        a state created without them.
    """
    old = _read.get_ema_state(self.opt_state)
    if batch_stats is not None and self.batch_stats is None:
      raise ValueError(
          'apply_gradients got batch_stats, but this EmaTrainState was'
          ' created without them. Pass batch_stats=variables["batch_stats"]'
          ' to EmaTrainState.create.')
    bs_ema = self.batch_stats_ema
    if bs_ema is not None:
      bs_ema = _state.check_state(bs_ema, 'EmaTrainState.batch_stats_ema')
    new = super().apply_gradients(grads=grads, **kwargs)
    if batch_stats is None:
      return new
    if bs_ema is not None:
      moved = _read.get_ema_state(new.opt_state).count != old.count
      zeros = jax.tree.map(jnp.zeros_like, batch_stats)
      _, updated = self.ema_tx.update(zeros, bs_ema, batch_stats)
      bs_ema = jax.tree.map(lambda n, o: jnp.where(moved, n, o), updated,
                            bs_ema)
    return new.replace(batch_stats=batch_stats, batch_stats_ema=bs_ema)

  @property
  def ema_params(self) -> PyTree:
    """The averaged params, as :func:`emax.ema_params` gives them."""
    return _read.ema_params(self.opt_state)

  def eval_variables(self) -> dict:
    """The variables to evaluate with: ``{'params': ema_params, ...}``.

    Holds ``'batch_stats'`` too when the state has them: their average under
    the ``'average'`` policy, a copy of the live ones under ``'copy'``. All
    arrays are fresh, so donating the state afterwards leaves them valid.
    """
    variables = {'params': self.ema_params}
    if self.batch_stats is not None:
      if self.batch_stats_policy == 'average':
        variables['batch_stats'] = _read.ema_params(
            _state.check_state(self.batch_stats_ema,
                              'EmaTrainState.batch_stats_ema'))
      else:
        variables['batch_stats'] = jax.tree.map(jnp.copy, self.batch_stats)
    return variables


def _momentum_free(next_fun, args, kwargs, context):
  """Runs ``nn.BatchNorm`` with momentum 0: its output stats are the batch's."""
  module = context.module
  if not (isinstance(module, nn.BatchNorm) and
          context.method_name == '__call__'):
    return next_fun(*args, **kwargs)
  momentum = module.momentum
  object.__setattr__(module, 'momentum', 0.0)
  try:
    return next_fun(*args, **kwargs)
  finally:
    object.__setattr__(module, 'momentum', momentum)


def recompute_batch_stats(apply_fn: Callable, variables: dict, batches: Any,
                          *, rngs: Optional[dict] = None,
                          **apply_kwargs) -> dict:
  """Recomputes BatchNorm statistics for (averaged) weights from data.

  As ``torch.optim.swa_utils.update_bn``: every ``nn.BatchNorm`` runs in
  training mode with its momentum set to zero, and the statistics are the
  plain (momentum-free) mean, over the batches, of each batch's mean and
  variance. One jitted ``lax.scan``; compiled once per ``apply_fn`` and
  ``apply_kwargs``.

  Args:
    apply_fn: usually ``model.apply`` (hashable: it is a static argument).
    variables: ``{'params': ..., 'batch_stats': ..., ...}``, e.g.
      ``state.eval_variables()``; the incoming ``batch_stats`` only give the
      structure.
    batches: an array (or pytree of arrays) whose leading axis indexes the
      batches; ``batches[i]`` is passed as the model's input.
    rngs: optional PRNG keys for the call (e.g. ``{'dropout': key}``), folded
      with the batch index.
    **apply_kwargs: static keyword arguments that put the model in training
      mode, e.g. ``train=True``.

  Returns:
    ``variables`` with ``'batch_stats'`` replaced by the recomputed ones.

  Raises:
    ValueError: if ``variables`` has no ``'batch_stats'``, or the call did
      not compute batch statistics (the model ran with running averages).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, emax.flax
    >>> model = nn.BatchNorm(use_running_average=False)
    >>> variables = model.init(jax.random.key(0), jnp.ones((2, 1)))
    >>> batches = jnp.array([[[0.0], [2.0]], [[4.0], [6.0]]])  # 2 batches
    >>> new = emax.flax.recompute_batch_stats(model.apply, variables, batches)
    >>> new['batch_stats']['mean'], new['batch_stats']['var']
    (Array([3.], dtype=float32), Array([1.], dtype=float32))
  """
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
  kwargs = tuple(sorted(apply_kwargs.items()))
  return _recompute(apply_fn, kwargs, dict(variables), batches, rngs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _recompute(apply_fn, kwargs, variables, batches, rngs):
  kwargs = dict(kwargs)
  num = jax.tree.leaves(batches)[0].shape[0]

  def batch_stats_of(i, x):
    keys = None if rngs is None else {
        name: jax.random.fold_in(key, i) for name, key in rngs.items()}
    with nn.intercept_methods(_momentum_free):
      _, updated = apply_fn(variables, x, mutable=['batch_stats'], rngs=keys,
                            **kwargs)
    new = updated['batch_stats']
    if all(a is b for a, b in zip(jax.tree.leaves(new),
                                  jax.tree.leaves(variables['batch_stats']))):
      raise ValueError(
          'recompute_batch_stats: the model did not compute batch statistics'
          ' (BatchNorm used its running averages). Pass the keyword that puts'
          ' it in training mode, e.g. recompute_batch_stats(model.apply,'
          ' variables, batches, train=True).')
    return new

  def body(avg, i_x):
    i, x = i_x
    new = batch_stats_of(i, x)
    n = (i + 1).astype(jnp.float32)
    avg = jax.tree.map(lambda a, b: a + (b - a) / n.astype(a.dtype), avg, new)
    return avg, None

  start = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
  avg, _ = lax.scan(body, start, (jnp.arange(num, dtype=jnp.int32), batches))
  return {**variables, 'batch_stats': avg}
