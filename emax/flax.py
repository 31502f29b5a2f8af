"""Flax linen integration: :class:`EmaTrainState` and BatchNorm statistics.

The only module of emax that imports ``flax.linen`` / ``flax.training``. Two
routes, pick one:

* :class:`EmaTrainState`: a ``TrainState`` that keeps the average of the params
  (and of the BatchNorm ``batch_stats``), hands out
  ``eval_variables()``, and can write the average back or reset it;
* a plain ``flax.training.train_state.TrainState`` with
  ``tx=emax.with_ema(optimizer, decay)``, read with
  ``emax.ema_params(state.opt_state)`` (no batch_stats average).

Both states round-trip through ``flax.serialization.to_bytes`` /
``from_bytes`` (every emax state is made of named tuples and arrays, which
flax serializes as they are).

:func:`recompute_batch_stats` recomputes BatchNorm statistics for averaged
weights from data, as ``torch.optim.swa_utils.update_bn`` does.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from optax import Params

try:
  import flax.linen as nn
  from flax import struct
  from flax.training import train_state
except ImportError as e:  # pragma: no cover - depends on the install
  raise ImportError(
      f'emax.flax needs flax ({e}): pip install "emax[flax]" or'
      ' pip install flax.') from e

from emax import _batch_stats
from emax import _read
from emax import _state
from emax import _step
from emax import _train_state_tx
from emax import _transform
from emax import _tree
from emax._state import EmaState

__all__ = (
    'EmaTrainState',
    'recompute_batch_stats',
)

POLICIES = _batch_stats.POLICIES


class EmaTrainState(train_state.TrainState):
  """A ``TrainState`` that keeps exponential moving averages of the params.

  Configure the average once, in ``tx``: ``tx=emax.with_ema(opt, decay,
  **options)``. The state runs ``opt`` and then the average (``opt_state``
  is an :class:`emax.WithEmaState`), and averages the ``batch_stats`` with
  the same decays and options, on the same steps
  (``batch_stats_policy='average'``, the default). For gradient accumulation
  pass ``tx=emax.with_ema(optax.MultiSteps(opt, k), decay)``: both averages
  then move once per real step, never on micro-steps.

  ``tx=opt, ema=emax.ema(decay, **options)`` builds the same state. Any other
  ``tx`` whose state holds exactly one :class:`emax.EmaState` (e.g.
  ``optax.MultiSteps(emax.with_ema(opt, decay), k)``) works for the params;
  its ``batch_stats`` can then only be evaluated live
  (``batch_stats_policy='copy'``), as the average cannot be read out of it.

  A ``tx`` that already holds an average together with ``ema`` is refused
  (``ValueError``): the state never keeps two configurations. Named averages
  (a mapping ``{name: decay}``) work either way; the ``batch_stats`` then get
  one average per name too, and every reader takes ``name``.

  The optimizer's own state is never touched by the average: writing the
  average back (:meth:`write_back`, or ``write_back_every`` in the average's
  options) changes the params, not Adam's moments.

  Attributes:
    batch_stats: the live BatchNorm statistics (``None`` without BatchNorm).
    batch_stats_ema: the :class:`emax.EmaState` of ``batch_stats`` under the
      ``'average'`` policy, else ``None``.
    ema_tx: the averaging transformation (static): ``ema``, or the one of a
      ``tx`` built by :func:`emax.with_ema`; ``None`` for another ``tx``
      holding the average.
    batch_stats_policy: ``'average'`` or ``'copy'`` (static; checked
      whenever the state is built or replaced).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, emax, emax.flax
    >>> import flax.linen as nn
    >>> model = nn.Dense(1)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 2)))['params']
    >>> state = emax.flax.EmaTrainState.create(
    ...     apply_fn=model.apply, params=params,
    ...     tx=emax.with_ema(optax.sgd(1.0), 0.5))
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> state = jax.jit(lambda s: s.apply_gradients(grads=grads))(state)
    >>> state.params['bias'], state.ema_params['bias']
    (Array([-1.], dtype=float32), Array([-0.5], dtype=float32))
    >>> state.write_back().params['bias']  # Switch-EMA: params := average
    Array([-0.5], dtype=float32)

    With BatchNorm, give the average as ``ema`` so that the statistics are
    averaged too:

    >>> bn = nn.BatchNorm(use_running_average=False, momentum=0.5)
    >>> variables = bn.init(jax.random.key(0), jnp.ones((2, 1)))
    >>> state = emax.flax.EmaTrainState.create(
    ...     apply_fn=bn.apply, params=variables['params'], tx=optax.sgd(1.0),
    ...     ema=emax.ema({'fast': 0.5, 'slow': 0.75}),
    ...     batch_stats=variables['batch_stats'])
    >>> _, new = bn.apply(variables, jnp.array([[1.0], [3.0]]),
    ...                   mutable=['batch_stats'])
    >>> grads = jax.tree.map(jnp.zeros_like, state.params)
    >>> state = state.apply_gradients(grads=grads,
    ...                               batch_stats=new['batch_stats'])
    >>> state.batch_stats['mean']  # BatchNorm's own running mean: 0 -> 1
    Array([1.], dtype=float32)
    >>> state.eval_variables(name='slow')['batch_stats']['mean']
    Array([0.25], dtype=float32)
  """

  batch_stats: Params | None = None
  batch_stats_ema: EmaState | None = None
  ema_tx: optax.GradientTransformation | None = struct.field(
      pytree_node=False, default=None)
  batch_stats_policy: str = struct.field(pytree_node=False, default='average')

  def __post_init__(self) -> None:
    # Runs on every construction: create, replace, tree unflattening and
    # flax.serialization restores. A typo never silently changes evaluation.
    _batch_stats.check_policy(self.batch_stats_policy, 'EmaTrainState')

  @classmethod
  def create(cls, *, apply_fn: Callable, params: Params,
             tx: optax.GradientTransformation,
             ema: optax.GradientTransformation | None = None,
             batch_stats: Params | None = None,
             batch_stats_policy: str = 'average',
             **kwargs: Any) -> 'EmaTrainState':
    """A new state at step 0, the averages started from ``params``.

    Args:
      apply_fn: usually ``model.apply``.
      params: the model's ``'params'`` collection.
      tx: the optimizer with its average: ``emax.with_ema(opt, decay,
        ...)`` (or any ``tx`` holding exactly one average) when ``ema`` is
        left out; a plain optimizer when ``ema`` is given.
      ema: an ``emax.ema(...)`` transformation (any options): the same as
        ``tx=emax.with_ema(tx, average=ema)``; refused when ``tx`` already
        holds an average.
      batch_stats: the model's ``'batch_stats'`` collection, if any.
      batch_stats_policy: ``'average'`` (evaluate with an average of the
        statistics, same decays and options as the params) or
        ``'copy'`` (evaluate with the live statistics). Ignored without
        ``batch_stats``.
      **kwargs: other fields of a subclass.

    Returns:
      The new :class:`EmaTrainState`.

    Raises:
      TypeError: if ``ema`` is not a GradientTransformation or ``tx`` not an
        optimizer.
      ValueError: if ``ema`` is not an ``emax.ema``; the average is given
        twice (in ``tx`` and as ``ema``) or not at all, or ``tx`` holds
        several; ``batch_stats`` are to be averaged without ``ema``; the
        policy is unknown; or the average would move on ``optax.MultiSteps``
        micro-steps.
    """
    _batch_stats.check_policy(batch_stats_policy,
                                      'EmaTrainState.create')
    if ema is None:
      tx, ema = _train_state_tx.split(tx, params)
    if ema is not None:
      _train_state_tx.check_ema(ema, params)
    averages_bs = batch_stats is not None and batch_stats_policy == 'average'
    if averages_bs and ema is not None and _state.is_masked(
        jax.eval_shape(ema.init, params)):
      raise ValueError(
          'EmaTrainState.create: the average has a mask (mask=), which'
          ' selects params, so it cannot average the batch_stats too. Pass'
          ' batch_stats_policy=\'copy\' to evaluate with the live'
          ' statistics.')
    full_tx = _train_state_tx.full_tx(tx, ema, params, averages_bs)
    bs_ema = ema.init(batch_stats) if averages_bs and ema is not None else None
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

  def apply_gradients(self, *, grads: Params,
                      batch_stats: Params | None = None,
                      **kwargs: Any) -> 'EmaTrainState':
    """One optimizer step; the averages follow.

    Args:
      grads: gradients like ``params`` (checked before the optimizer sees
        them).
      batch_stats: the new live BatchNorm statistics from this step's forward
        pass (``mutable=['batch_stats']``), if the model has any.
      **kwargs: other fields to ``replace``.

    Returns:
      The new state: params updated by ``tx``, the params' average updated,
      ``batch_stats`` stored and (under ``'average'``) averaged on the same
      steps as the params. On write-back steps (``write_back_every`` in
      ``ema``'s options) the live ``batch_stats`` are set to their average as
      the params are.

    Raises:
      ValueError: if ``opt_state`` holds no :class:`emax.EmaState` (e.g. a
        checkpoint restored without a target), ``grads`` are not shaped like
        ``params``, or ``batch_stats`` are given to a state created without
        them.
    """
    where = 'EmaTrainState.apply_gradients'
    _batch_stats.check_policy(self.batch_stats_policy, where)
    _state.find(self.opt_state, where)
    if batch_stats is not None and self.batch_stats is None:
      raise ValueError(
          'apply_gradients got batch_stats, but this EmaTrainState was'
          ' created without them. Pass batch_stats=variables["batch_stats"]'
          ' to EmaTrainState.create.')
    bs_ema = _batch_stats.checked(self.batch_stats_ema)
    _tree.check_updates(
        self.params, grads, 'grads',
        'Pass the gradients with respect to state.params, e.g.'
        ' jax.grad(loss_fn)(state.params).')
    new = super().apply_gradients(grads=grads, **kwargs)
    if batch_stats is None:
      return new
    if bs_ema is not None and self.ema_tx is not None:
      batch_stats, bs_ema = _transform.on_real_steps(
          getattr(self.opt_state, 'inner_state', None),
          getattr(new.opt_state, 'inner_state', None),
          functools.partial(_batch_stats.average, self.ema_tx, batch_stats,
                            bs_ema),
          (batch_stats, bs_ema))
    return new.replace(batch_stats=batch_stats, batch_stats_ema=bs_ema)

  def _ema_state(self, where: str) -> EmaState:
    return _state.find(self.opt_state, where)

  @property
  def ema_params(self) -> Params:
    """The averaged params, as :func:`emax.ema_params` gives them.

    A property takes no name: with several named averages it raises, and
    ``eval_variables(name=...)['params']`` reads one.
    """
    return _read.read(
        self.opt_state, None, where='EmaTrainState.ema_params',
        name_hint='This property takes no name: read one with'
        ' state.eval_variables(name=...)["params"].',
        params=self.params, fill=True)

  def eval_variables(self, name: str | None = None) -> dict[str, Params]:
    """The variables to evaluate with: ``{'params': average, ...}``.

    Args:
      name: which named average (required when there are several).

    Returns:
      ``{'params': ...}``, with ``'batch_stats'`` too when the state has
      them: their average under the ``'average'`` policy (the average of
      the same name), a copy of the live ones under ``'copy'``. All arrays
      are fresh, so donating the state afterwards leaves them valid.

    Raises:
      ValueError: if the policy is unknown, ``name`` is missing or unknown
        (the message lists the names), or the state holds no average.
    """
    where = 'EmaTrainState.eval_variables'
    _batch_stats.check_policy(self.batch_stats_policy, where)
    variables = {'params': _read.read(self.opt_state, name, where=where,
                                      params=self.params, fill=True)}
    if self.batch_stats is not None:
      if self.batch_stats_policy == 'average':
        variables['batch_stats'] = _batch_stats.read(self.batch_stats_ema,
                                                     name, where)
      else:
        variables['batch_stats'] = jax.tree.map(jnp.copy, self.batch_stats)
    return variables

  def write_back(self, name: str | None = None) -> 'EmaTrainState':
    """The state with its params set to their average (Switch-EMA).

    The params become, bit for bit, what :attr:`ema_params` (or
    ``eval_variables(name)['params']``) returns, in the params' dtypes;
    under the ``'average'`` policy the live ``batch_stats`` become their
    average too. The averages, ``step`` and the optimizer's state (e.g.
    Adam's moments) are left as they are.

    Args:
      name: which named average to write back (required when there are
        several).

    Returns:
      The new state.

    Raises:
      ValueError: if ``name`` is missing or unknown, or the state holds no
        average.
    """
    where = 'EmaTrainState.write_back'
    _batch_stats.check_policy(self.batch_stats_policy, where)
    ema_state = self._ema_state(where)
    ema_state.info.position(name, where)
    batch_stats = self.batch_stats
    if batch_stats is not None and self.batch_stats_policy == 'average':
      batch_stats = _batch_stats.read(self.batch_stats_ema, name, where)
    return self.replace(params=_read.ema_params(ema_state, name,
                                                params=self.params),
                        batch_stats=batch_stats)

  def reset_ema(self) -> 'EmaTrainState':
    """The state with every average set to the current params (and stats).

    Bitwise copies (as :func:`emax.reset`), weight one; ``count`` and the
    optimizer's own state are left as they are. The ``batch_stats`` average,
    if any, is reset to the live ``batch_stats``.
    """
    where = 'EmaTrainState.reset_ema'
    opt_state = _step.reset(self.opt_state, self.params, where=where)
    bs_ema = self.batch_stats_ema
    if bs_ema is not None and self.batch_stats is not None:
      bs_ema = _batch_stats.reset(bs_ema, self.batch_stats, where)
    return self.replace(opt_state=opt_state, batch_stats_ema=bs_ema)


def _momentum_free(next_fun: Callable, args: Any, kwargs: Any,
                   context: Any) -> Any:
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
                          *, rngs: dict | None = None,
                          **apply_kwargs: Any) -> dict:
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
    rngs: optional PRNG keys for the call (e.g. ``{'dropout': key}``). Batch
      ``i`` gets ``jax.random.fold_in(key, i)`` for each key, so every batch
      draws its own dropout mask.
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
  _batch_stats.check_recompute_args(variables, batches)
  kwargs = tuple(sorted(apply_kwargs.items()))
  return _recompute(apply_fn, kwargs, dict(variables), batches, rngs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _recompute(apply_fn: Callable, kwargs: Any, variables: dict,
               batches: Any, rngs: dict | None) -> dict:
  kwargs = dict(kwargs)

  def batch_stats_of(x: Any, keys: dict | None) -> Any:
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

  avg = _batch_stats.mean_over_batches(batch_stats_of,
                                       variables['batch_stats'], batches, rngs)
  return {**variables, 'batch_stats': avg}
