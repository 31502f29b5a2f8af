"""Leaf kinds, the accumulator dtype policy and the checks on incoming trees.

A leaf of a parameter tree is one of three kinds:

* a *float* leaf (any inexact dtype: bf16, f16, f32, f64, complex), which is
  averaged in its accumulator dtype;
* a *non-float* leaf (ints, bools, PRNG keys), which is never averaged and
  simply follows the latest value of the parameter;
* ``None``, an empty subtree, kept as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def is_float(x_or_dtype: Any) -> bool:
  """Whether a leaf (or dtype) is averaged: any inexact dtype."""
  dtype = getattr(x_or_dtype, 'dtype', x_or_dtype)
  return bool(jnp.issubdtype(dtype, jnp.inexact))


def check_accumulator_dtype(accumulator_dtype: Any) -> np.dtype | None:
  """Validates the ``accumulator_dtype`` option; returns it as a dtype."""
  if accumulator_dtype is None:
    return None
  try:
    dtype = jnp.dtype(accumulator_dtype)
  except TypeError as e:
    raise TypeError(
        'accumulator_dtype must be a floating dtype such as jnp.float32, got'
        f' {accumulator_dtype!r} instead.'
    ) from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        'accumulator_dtype must be a floating dtype such as jnp.float32, got'
        f' {dtype} instead. Non-float leaves are never averaged, so they need'
        ' no accumulator.'
    )
  return dtype


def accumulator_dtype_for(param_dtype: Any, accumulator_dtype: Any = None):
  """The dtype a leaf is accumulated in.

  Real floats narrower than 32 bits (bf16, f16) accumulate in float32, any
  other float in its own dtype, unless ``accumulator_dtype`` is given, which
  then applies to every real floating leaf. Complex leaves keep their dtype;
  non-float leaves keep theirs (they are copied, not averaged).
  """
  if not jnp.issubdtype(param_dtype, jnp.floating):
    return param_dtype
  dtype = jnp.dtype(param_dtype)
  if accumulator_dtype is not None:
    return jnp.dtype(accumulator_dtype)
  if dtype.itemsize < 4:
    return jnp.dtype(jnp.float32)
  return dtype


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ParamDtypes:
  """The dtypes of the averaged params, one per leaf of the average.

  A static pytree node (no leaves): it travels in the tree structure, so it
  survives ``jit``, ``eval_shape``, ``lax.scan`` and checkpoint restores with a
  target, and costs nothing at run time. :func:`emax.ema_params` uses it to
  hand the average back in the dtypes the params had.
  """

  dtypes: tuple[np.dtype, ...]

  def __repr__(self) -> str:
    return f'ParamDtypes({", ".join(str(d) for d in self.dtypes)})'


def _paths(tree: PyTree) -> list[str]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [jax.tree_util.keystr(path) for path, _ in leaves]


def _fmt(paths: list[str], limit: int = 5) -> str:
  shown = ', '.join(paths[:limit])
  more = len(paths) - limit
  return shown + (f' and {more} more' if more > 0 else '')


def check_matches(average: PyTree, params: PyTree, dtypes: ParamDtypes,
                  what: str = 'params') -> None:
  """Checks at trace time that ``params`` fit the stored ``average``.

  Raises:
    ValueError: naming the leaf path, when the tree structure, a leaf shape or
      a leaf's dtype kind (float or not) differs from the state's.
  """
  avg_def = jax.tree.structure(average)
  par_def = jax.tree.structure(params)
  if avg_def != par_def:
    avg_paths, par_paths = _paths(average), _paths(params)
    missing = [p for p in avg_paths if p not in set(par_paths)]
    extra = [p for p in par_paths if p not in set(avg_paths)]
    detail = []
    if missing:
      detail.append(f'missing from {what}: {_fmt(missing)}')
    if extra:
      detail.append(f'not in the EMA state: {_fmt(extra)}')
    if not detail:
      detail.append(f'expected the structure {avg_def}, got {par_def}')
    raise ValueError(
        f'The {what} do not match the tree the EMA state was initialised'
        f' with ({"; ".join(detail)}). Pass the same tree that was given to'
        ' init, or re-initialise the EMA state for the new params.'
    )
  flat_avg = jax.tree_util.tree_flatten_with_path(average)[0]
  flat_par = jax.tree.leaves(params)
  for (path, a), p, dtype in zip(flat_avg, flat_par, dtypes.dtypes):
    name = jax.tree_util.keystr(path)
    chex.assert_equal_shape(
        [a, p],
        custom_message=(
            f'{what} leaf {name} has shape {jnp.shape(p)} but the EMA state'
            f' holds shape {jnp.shape(a)}.'
        ),
        exception_type=ValueError,
    )
    if is_float(dtype) != is_float(p):
      kind = 'a float' if is_float(dtype) else 'a non-float'
      raise ValueError(
          f'{what} leaf {name} has dtype {jnp.result_type(p)}, but the EMA'
          f' state was initialised with {kind} leaf ({dtype}) there. Float'
          ' leaves are averaged and other leaves are copied, so a leaf cannot'
          ' change kind; re-initialise the EMA state if it must.'
      )


def copy_leaf(x: jax.Array, dtype: Any = None) -> jax.Array:
  """A real copy of ``x`` (never an alias), optionally cast to ``dtype``."""
  x = jnp.asarray(x)
  if dtype is not None and dtype != x.dtype:
    return x.astype(dtype)
  return jnp.copy(x)


def zeros_like_sharded(x: jax.Array, dtype: Any) -> jax.Array:
  """Zeros shaped and sharded like ``x``, also under ``jit``.

  ``jnp.zeros_like`` has no data dependency on ``x``, so under ``jit`` the
  compiler is free to place it on one device; a select against ``x`` lets
  sharding propagate from ``x`` at no run-time cost worth mentioning.
  """
  x = jnp.asarray(x).astype(dtype)
  return jnp.where(jnp.zeros(x.shape, dtype=bool), x, jnp.zeros((), dtype))
