"""Flax NNX integration: an evaluation model that carries the averaged params.

Train with ``nnx.Optimizer(model, emax.with_ema(tx, decay), wrt=nnx.Param)``
(or ``optax.chain(tx, emax.ema(decay))``): the optimizer's state then holds
the :class:`emax.EmaState`. :func:`ema_model` builds a separate model for
evaluation from it, :func:`ema_params` reads the averaged params. Named
averages work with both (pass ``name``).
"""

from __future__ import annotations

from typing import TypeVar

import jax
import jax.numpy as jnp

try:
  from flax import nnx
except ImportError as e:  # pragma: no cover - depends on the install
  raise ImportError(
      f'emax.nnx needs flax ({e}): pip install "emax[flax]" or'
      ' pip install flax.') from e

from emax import _read
from emax import _tree

__all__ = (
    'ema_model',
    'ema_params',
)

M = TypeVar('M')


def _check_optimizer(optimizer: nnx.Optimizer, where: str) -> None:
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
        f'{where} expected an nnx.Optimizer built with'
        ' emax.with_ema(tx, decay) (or optax.chain(tx, emax.ema(decay))),'
        f' got {type(optimizer).__name__} instead.')


def ema_params(optimizer: nnx.Optimizer, name: str | None = None, *,
               params: nnx.State | None = None) -> nnx.State:
  """The averaged params held by ``optimizer``, as a pure ``nnx.State``.

  Args:
    optimizer: an ``nnx.Optimizer`` whose ``tx`` holds an average
      (``emax.with_ema(tx, decay)``, or ``emax.ema`` last in a chain).
    name: which named average (required when there are several).
    params: for an average of part of the params (``mask=``), the live
      ``nnx.state(model, optimizer.wrt)``, which fills the leaves outside the
      mask (:func:`ema_model` does this by itself).

  Returns:
    An ``nnx.State`` of fresh arrays shaped like
    ``nnx.state(model, optimizer.wrt)``, in the params' dtypes.

  Raises:
    TypeError: if ``optimizer`` is not an ``nnx.Optimizer``.
    ValueError: if its state holds no :class:`emax.EmaState`, or ``name`` is
      missing or unknown (the message lists the names).

  Examples:
    >>> import jax.numpy as jnp, optax, emax, emax.nnx
    >>> from flax import nnx
    >>> model = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    >>> tx = emax.with_ema(optax.sgd(1.0), {'fast': 0.5, 'slow': 0.75})
    >>> opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> grads = nnx.grad(lambda m: m(jnp.ones((1, 1))).sum())(model)
    >>> _ = opt.update(model, grads)
    >>> emax.nnx.ema_params(opt, 'slow')['bias']
    Array([-0.25], dtype=float32)
  """
  where = 'emax.nnx.ema_params'
  _check_optimizer(optimizer, where)
  return _read.read(nnx.as_pure(optimizer.opt_state), name, where=where,
                    params=None if params is None else nnx.as_pure(params),
                    fill=True)


def _check_fits(averaged: nnx.State, params: nnx.State, wrt: object) -> None:
  """The average must have the variables and leaf shapes of the model's."""
  fix = (f' The average does not fit the model\'s {wrt} variables: pass the'
         ' model this optimizer trains.')
  pairs, missing, extra = _tree.leaves_by_key(averaged, params)
  if missing or extra:
    raise ValueError(
        'emax.nnx.ema_model: the model\'s variables are not the averaged'
        f' ones (averaged but not in the model: {missing}; in the model'
        f' but not averaged: {extra}).{fix}')
  for key, a, p in pairs:
    if jnp.shape(a) != jnp.shape(p):
      raise ValueError(
          f'emax.nnx.ema_model: the model\'s {key} has shape {jnp.shape(p)}'
          f' but its average has shape {jnp.shape(a)}.{fix}')


def ema_model(model: M, optimizer: nnx.Optimizer,
              name: str | None = None) -> M:
  """A new model for evaluation: the averaged params, the rest of ``model``.

  The variables ``optimizer`` trains (its ``wrt`` filter, usually
  ``nnx.Param``) take their averaged values; every other variable (BatchNorm
  statistics, RNG state, ...) is a copy of ``model``'s. The training model is
  not touched, and the new model shares no variable and no buffer with it:
  running it (even in training mode) or donating the training state to a
  jitted step leaves both intact. Build it when you evaluate; it is a
  snapshot.

  Args:
    model: the training model, the one ``optimizer`` updates.
    optimizer: ``nnx.Optimizer(model, emax.with_ema(tx, decay),
      wrt=nnx.Param)``.
    name: which named average (required when there are several).

  Returns:
    A model of the same type as ``model``.

  Raises:
    TypeError: if ``optimizer`` is not an ``nnx.Optimizer``.
    ValueError: if its state holds no :class:`emax.EmaState`, ``name`` is
      missing or unknown, or the average does not fit ``model``'s ``wrt``
      variables (other variables, or a leaf of another shape; the message
      names the leaf).

  Examples:
    >>> import jax.numpy as jnp, optax, emax, emax.nnx
    >>> from flax import nnx
    >>> model = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    >>> opt = nnx.Optimizer(model, emax.with_ema(optax.sgd(1.0), 0.5),
    ...                     wrt=nnx.Param)
    >>> grads = nnx.grad(lambda m: m(jnp.ones((1, 1))).sum())(model)
    >>> _ = opt.update(model, grads)
    >>> model.bias[...], emax.nnx.ema_model(model, opt).bias[...]
    (Array([-1.], dtype=float32), Array([-0.5], dtype=float32))
  """
  where = 'emax.nnx.ema_model'
  _check_optimizer(optimizer, where)
  graphdef, params, rest = nnx.split(  # type: ignore[misc]
      model, optimizer.wrt, ...)
  averaged = _read.read(nnx.as_pure(optimizer.opt_state), name, where=where,
                        params=nnx.as_pure(params), fill=True)
  _check_fits(averaged, nnx.as_pure(params), optimizer.wrt)
  rest = jax.tree.map(jnp.copy, nnx.as_pure(rest))
  return nnx.merge(graphdef, averaged, rest)
