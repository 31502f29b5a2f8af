"""Flax NNX integration: an evaluation model that carries the averaged params.

Train with ``nnx.Optimizer(model, optax.chain(tx, emax.ema(...)), wrt=...)``:
the optimizer's state then holds the :class:`emax.EmaState`.
:func:`ema_model` builds a separate model for evaluation from it.
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

__all__ = (
    'ema_model',
    'ema_params',
)

M = TypeVar('M')


def ema_params(optimizer: nnx.Optimizer) -> nnx.State:
  """The averaged params held by ``optimizer``, as a pure ``nnx.State``.

  Args:
    optimizer: an ``nnx.Optimizer`` whose ``tx`` chains an ``emax.ema``.

  Returns:
    An ``nnx.State`` of arrays shaped like ``nnx.state(model, optimizer.wrt)``.

  Raises:
    TypeError: if ``optimizer`` is not an ``nnx.Optimizer``.
    ValueError: if its state holds no :class:`emax.EmaState`.
  """
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
        'Expected an nnx.Optimizer built with optax.chain(tx, emax.ema(...)),'
        f' got {type(optimizer).__name__} instead.')
  return _read.ema_params(nnx.as_pure(optimizer.opt_state))


def ema_model(model: M, optimizer: nnx.Optimizer) -> M:
  """A new model for evaluation: the averaged params, the rest of ``model``.

  The variables ``optimizer`` trains (its ``wrt`` filter, usually
  ``nnx.Param``) take their averaged values; every other variable (BatchNorm
  statistics, RNG state, ...) is a copy of ``model``'s. The training model is
  not touched, and the new model shares no variable and no buffer with it:
  running it (even in training mode) or donating the training state leaves
  both intact. Build it when you evaluate; it is a snapshot.

  Args:
    model: the training model, the one ``optimizer`` updates.
    optimizer: ``nnx.Optimizer(model, optax.chain(tx, emax.ema(...)),
      wrt=nnx.Param)``.

  Returns:
    A model of the same type as ``model``.

  Raises:
    TypeError: if ``optimizer`` is not an ``nnx.Optimizer``.
    ValueError: if its state holds no :class:`emax.EmaState`, or the average
      does not fit ``model``'s ``wrt`` variables.

  Examples:
    >>> import jax.numpy as jnp, optax, emax, emax.nnx
    >>> from flax import nnx
    >>> model = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    >>> opt = nnx.Optimizer(model, optax.chain(optax.sgd(1.0), emax.ema(0.5)),
    ...                     wrt=nnx.Param)
    >>> grads = nnx.grad(lambda m: m(jnp.ones((1, 1))).sum())(model)
    >>> _ = opt.update(model, grads)
    >>> model.bias[...], emax.nnx.ema_model(model, opt).bias[...]
    (Array([-1.], dtype=float32), Array([-0.5], dtype=float32))
  """
  averaged = ema_params(optimizer)
  graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)
  if jax.tree.structure(nnx.as_pure(params)) != jax.tree.structure(averaged):
    raise ValueError(
        'The average held by the optimizer does not fit the model\'s'
        f' {optimizer.wrt} variables. Pass the model this optimizer trains.')
  rest = jax.tree.map(jnp.copy, nnx.as_pure(rest))
  return nnx.merge(graphdef, averaged, rest)

