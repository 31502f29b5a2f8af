"""Leaf kinds, the accumulator dtype policy and the checks on incoming trees.

A leaf of a parameter tree is one of three kinds:

* a *float* leaf (any inexact dtype: bf16, f16, f32, f64, complex), which is
  averaged in its accumulator dtype;
* a *non-float* leaf (ints, bools, PRNG keys), which is never averaged and
  simply follows the latest value of the parameter;
* ``None``, an empty subtree, kept as it is.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, Union

import chex
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax
from optax import Params


def is_float(x_or_dtype: Any) -> bool:
  """Whether a leaf (or dtype) is averaged: any inexact dtype."""
  dtype = getattr(x_or_dtype, 'dtype', x_or_dtype)
  return bool(jnp.issubdtype(dtype, jnp.inexact))


def leaves_by_key(first: Any, second: Any, is_leaf: Any = None
                  ) -> tuple[list[tuple[str, Any, Any]], list[str],
                             list[str]]:
  """Two trees' leaves paired by key path, and the key paths of each that
  the other lacks (the first five; both empty when the paths agree, and only
  then are there pairs)."""
  flat_a = jax.tree_util.tree_flatten_with_path(first, is_leaf=is_leaf)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(second, is_leaf=is_leaf)[0]
  keys_a = [jax.tree_util.keystr(path) for path, _ in flat_a]
  keys_b = [jax.tree_util.keystr(path) for path, _ in flat_b]
  if keys_a != keys_b:
    only_a = [k for k in keys_a if k not in set(keys_b)]
    only_b = [k for k in keys_b if k not in set(keys_a)]
    if not only_a and not only_b:  # the same keys in another order
      only_a, only_b = keys_a, keys_b
    return [], only_a[:5], only_b[:5]
  return [(k, a, b) for k, (_, a), (_, b) in zip(keys_a, flat_a, flat_b)
          ], [], []


CONCAT_FAN_IN = 128
"""The most operands of one concatenation (see :func:`concat_raveled`)."""


def raveled(x: jax.Array) -> jax.Array:
  """``x`` as a 1-D array (itself when it already is one)."""
  return x if x.ndim == 1 else lax.reshape(x, (x.size,))


def concat_raveled(arrays: Sequence[jax.Array]) -> jax.Array:
  """The arrays (of one dtype), raveled and concatenated: one buffer.

  In rounds of at most :data:`CONCAT_FAN_IN` operands, each round's buffers
  materialized (a barrier): XLA CPU compiles one concatenation of thousands
  of operands, fused into its consumer, in time that grows much faster than
  the number of operands (about 50 s for 20,000 leaves, against 4 s in
  rounds of 128). The extra copies are those of the rounds' small buffers.
  """
  parts = [raveled(x) for x in arrays]
  while len(parts) > CONCAT_FAN_IN:
    parts = [lax.optimization_barrier(jnp.concatenate(chunk))
             if len(chunk) > 1 else chunk[0]
             for chunk in (parts[i:i + CONCAT_FAN_IN]
                           for i in range(0, len(parts), CONCAT_FAN_IN))]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def accumulator_dtype_for(param_dtype: Any,
                          accumulator_dtype: np.dtype | None = None) -> Any:
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


_ARRAY_TYPES = (jax.Array, jax.core.Tracer, jax.ShapeDtypeStruct)


def _as_array(x: Any) -> Any:
  return x if isinstance(x, _ARRAY_TYPES) else jnp.asarray(x)


def as_arrays(tree: Params) -> Params:
  """``tree`` with Python and NumPy scalar leaves turned into arrays.

  Raises:
    TypeError: naming the leaves that are not arrays or numbers (functions,
      strings, objects: what a whole model object carries besides its
      arrays), and how to pass the arrays alone.
  """
  try:
    return jax.tree.map(_as_array, tree)
  except TypeError:
    bad = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      try:
        _as_array(x)
      except TypeError:
        bad.append(f'{jax.tree_util.keystr(path) or "the root"}'
                   f' ({type(x).__name__})')
    if not bad:
      raise
    raise TypeError(
        'emax averages arrays, but these leaves of the params are not arrays'
        f' or numbers: {_fmt(bad)}. A model object holds functions and'
        ' settings beside its arrays: pass the arrays alone. With Equinox,'
        ' params = eqx.filter(model, eqx.is_inexact_array), and rebuild a'
        ' model from an average with eqx.combine(average, model).') from None


def unwrap_variables(tree: Params) -> Params:
  """``tree`` with Flax NNX ``Variable`` wrappers replaced by their values.

  ``nnx.Optimizer`` initialises its transformation with Variable-wrapped
  params and updates it with plain arrays; a layout that records the tree
  structure must be planned on the plain one. Nothing happens unless
  ``flax.nnx`` is imported (emax never imports it).
  """
  nnx = sys.modules.get('flax.nnx')
  variable = getattr(nnx, 'Variable', None)
  if variable is None:
    return tree
  is_variable = lambda x: isinstance(x, variable)  # noqa: E731
  return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree,
                      is_leaf=is_variable)


def _paths(tree: Params) -> list[str]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [jax.tree_util.keystr(path) for path, _ in leaves]


def _fmt(paths: list[str], limit: int = 5) -> str:
  shown = ', '.join(paths[:limit])
  more = len(paths) - limit
  return shown + (f' and {more} more' if more > 0 else '')


def _check_structure(expected: Params, got: Params, what: str,
                     against: str, fix: str, none_leaves: bool = False,
                     label: str = '') -> None:
  is_leaf = (lambda x: x is None) if none_leaves else None
  exp_def: Any = jax.tree.structure(expected, is_leaf=is_leaf)
  got_def: Any = jax.tree.structure(got, is_leaf=is_leaf)
  if exp_def == got_def:
    return
  exp_paths, got_paths = _paths(expected), _paths(got)
  missing = [p for p in exp_paths if p not in set(got_paths)]
  extra = [p for p in got_paths if p not in set(exp_paths)]
  detail = []
  if missing:
    detail.append(f'missing from {what}: {_fmt(missing)}')
  if extra:
    detail.append(f'not in {label or against}: {_fmt(extra)}')
  if not detail:
    detail.append(f'expected the structure {exp_def}, got {got_def}')
  raise ValueError(
      f'The {what} do not match {against} ({"; ".join(detail)}). {fix}')


def check_matches(shapes: Params, params: Params,
                  param_dtypes: Sequence[Any], what: str = 'params') -> None:
  """Checks at trace time that ``params`` fit the state's params.

  Args:
    shapes: a tree like the params the state was built from, with a
      ``shape`` on each leaf (arrays or ``ShapeDtypeStruct``).
    params: the incoming tree.
    param_dtypes: the dtypes of the params the state was built from.
    what: how to call ``params`` in the message.

  Raises:
    ValueError: naming the leaf path, when the tree structure, a leaf shape or
      a leaf's dtype kind (float or not) differs.
  """
  _check_structure(
      shapes, params, what, 'the tree the EMA state was initialised with',
      'Pass the same tree that was given to init, or re-initialise the EMA'
      ' state for the new params.', label='the EMA state')
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  for (path, a), p, dtype in zip(flat, jax.tree.leaves(params),
                                 param_dtypes):
    name = jax.tree_util.keystr(path)
    chex.assert_equal_shape(
        [a, p],
        custom_message=(
            f'{what} leaf {name} has shape {jnp.shape(p)} but the EMA state'
            f' holds shape {jnp.shape(a)}.'),
        exception_type=ValueError)
    if is_float(dtype) != is_float(p):
      kind = 'a float' if is_float(dtype) else 'a non-float'
      raise ValueError(
          f'{what} leaf {name} has dtype {jnp.result_type(p)}, but the EMA'
          f' state was initialised with {kind} leaf ({dtype}) there. Float'
          ' leaves are averaged and other leaves are copied, so a leaf cannot'
          ' change kind; re-initialise the EMA state if it must.')


UPDATES_FIX = ('The updates must be shaped like the params, as the optimizer'
               ' returns them (None where a param gets no update).')


def check_updates(params: Params, updates: Params, what: str = 'updates',
                  fix: str = UPDATES_FIX) -> None:
  """Checks that ``updates`` (or grads: ``what``) fit ``params``.

  ``None`` leaves are allowed on either side. Raises a ``ValueError`` that
  names the leaf path and ends with ``fix``.
  """
  is_none = lambda x: x is None  # noqa: E731
  _check_structure(params, updates, what, 'the params', fix,
                   none_leaves=True)
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_none)[0]
  for (path, p), u in zip(flat, jax.tree.leaves(updates, is_leaf=is_none)):
    if p is None or u is None:
      continue
    if jnp.shape(p) != jnp.shape(u):
      raise ValueError(
          f'{what} leaf {jax.tree_util.keystr(path)} has shape'
          f' {jnp.shape(u)} but the param has shape {jnp.shape(p)}. {fix}')


def promote(a: Any, b: Any) -> Any:
  """The dtype ``a + b`` has under JAX's standard promotion.

  What ``optax.apply_updates`` computes in (``p + u``), stated explicitly so
  that emax itself runs under ``jax_numpy_dtype_promotion='strict'``.
  """
  with jax.numpy_dtype_promotion('standard'):
    return jnp.promote_types(a, b)


def apply_update(p: Any, u: Any) -> Any:
  """``p + u`` for one leaf, exactly as ``optax.apply_updates`` computes it.

  Non-float params whose update is ``None`` or float0 (what ``jax.grad``
  gives for int inputs) keep their value.
  """
  if p is None:
    return None
  p = jnp.asarray(p)
  if not _adds(p, u):
    return p
  dtype = promote(p.dtype, jnp.result_type(u))
  out = (p.astype(dtype) + jnp.asarray(u).astype(dtype)).astype(p.dtype)
  return round_narrow(out)


def _adds(p: jax.Array, u: Any) -> bool:
  """Whether :func:`apply_update` adds ``u`` to ``p`` (or keeps ``p``)."""
  return not (u is None or jnp.result_type(u) == jax.dtypes.float0 or (
      not is_float(p) and not jnp.issubdtype(jnp.result_type(u),
                                             jnp.number)))


ROUNDS_TO_INF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
"""The 16-bit float dtypes whose rounding overflows to infinity (IEEE-like:
round to nearest, ties to even; 8-bit floats may saturate or give NaN)."""


def overflow_bound(dtype: Any) -> np.float32:
  """The least magnitude that rounds to infinity in ``dtype`` (one of
  :data:`ROUNDS_TO_INF`): halfway between its largest finite value and the
  next power of two, where ties to even go up (the largest value's last bit
  is odd). Exact in float32: 65520 for float16, ``(2 - 2**-8) * 2**127``
  for bfloat16."""
  info = jnp.finfo(dtype)
  bound = float(info.max) + 2.0 ** (int(info.maxexp) - int(info.nmant) - 2)
  return np.float32(bound)


def sum_before_rounding(p: Any, u: Any) -> jax.Array | None:
  """``p + u`` in float32 where :func:`apply_update` rounds it to a 16-bit
  float param's dtype: the value whose rounding is the new param, so that
  the new param is finite exactly where ``|sum| < overflow_bound``.

  A 16-bit sum (both in the param's dtype) is the float32 sum rounded once:
  float32 carries at least twice the 16-bit significand plus two bits, so
  rounding the sum of two 16-bit numbers to float32 first and then to 16
  bits gives the correctly rounded 16-bit sum (double rounding is innocuous
  for addition at that precision). ``None`` for other leaves (float32 and
  wider params, no update, or a sum in float64, whose conversion to 16 bits
  may go through float32).
  """
  if p is None or u is None:
    return None
  p = jnp.asarray(p)
  if p.dtype not in ROUNDS_TO_INF or not _adds(p, u):
    return None
  u = jnp.asarray(u)
  dtype = promote(p.dtype, u.dtype)
  if dtype not in (*ROUNDS_TO_INF, jnp.dtype(jnp.float32)):
    return None
  f32 = jnp.float32  # the operands as apply_update casts them, then widened
  return p.astype(dtype).astype(f32) + u.astype(dtype).astype(f32)


def round_narrow(x: jax.Array) -> jax.Array:
  """``x`` rounded to its own dtype even inside a fused XLA computation.

  XLA may keep bf16 and f16 intermediates in float32 (excess precision), so
  a fused ``(p + u).astype(bf16).astype(f32)`` can skip the rounding the
  user's params get. ``reduce_precision`` to the dtype's own bits forces it:
  the average is of the params as they are stored, in every layout.
  """
  dtype = jnp.dtype(x.dtype)
  if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize >= 4:
    return x
  info = jnp.finfo(dtype)
  return lax.reduce_precision(x, exponent_bits=info.nexp,
                              mantissa_bits=info.nmant)


def copy_leaf(x: Any, dtype: Any = None) -> jax.Array:
  """A real copy of ``x`` (never an alias), optionally cast to ``dtype``."""
  x = jnp.asarray(x)
  if dtype is not None and dtype != x.dtype:
    return x.astype(dtype)
  return jnp.copy(x)


# --- masks: averages of part of the params ---------------------------------


def is_masked(x: Any) -> bool:
  """Whether ``x`` marks a leaf left out by a mask (optax's ``MaskedNode``)."""
  return isinstance(x, optax.MaskedNode)


def has_masked(tree: Any) -> bool:
  return any(is_masked(x) for x in jax.tree.leaves(tree, is_leaf=is_masked))


MaskLike = Union[Params, Callable[[Params], Params]]
"""A pytree of bools like the params (or a prefix of them), or a callable
``params -> that tree``: optax's convention for ``optax.masked``."""


def apply_mask(mask: MaskLike, params: Params) -> Params:
  """``params`` with every leaf outside ``mask`` replaced by ``MaskedNode``.

  ``MaskedNode`` is an empty pytree node: a masked-out leaf stores nothing
  in the average, and the structure still says where it was.
  """
  tree = mask(params) if callable(mask) else mask
  masks = jax.tree.leaves(tree)
  bad = [m for m in masks if not isinstance(m, (bool, np.bool_))]
  if bad:
    raise TypeError(
        f'mask must hold True or False at each leaf, got {bad[0]!r}'
        f' ({type(bad[0]).__name__}). Pass a tree of bools like the params'
        ' (True: average this leaf), or a callable params -> that tree.')
  try:
    out = jax.tree.map(
        lambda m, p: p if m else optax.MaskedNode(), tree, params)
  except ValueError as e:
    raise ValueError(
        'mask must be a tree of bools shaped like the params (or a prefix'
        f' of them), got one that does not fit: {e}') from None
  if not any(bool(m) for m in masks):
    raise ValueError(
        'mask leaves every param out, so there is nothing to average.'
        ' True marks a leaf to average.')
  return out


def masked_like(template: Params, tree: Params | None) -> Params | None:
  """``tree`` with ``MaskedNode`` wherever ``template`` (a masked params
  tree) has one; ``tree`` itself when there is no mask or it does not fit
  (the structure check then says how)."""
  if tree is None or not has_masked(template):
    return tree
  try:
    return jax.tree.map(lambda t, x: t if is_masked(t) else x, template,
                        tree, is_leaf=is_masked)
  except ValueError:
    return tree


def fill_masked(tree: Params, params: Params | None, where: str) -> Params:
  """``tree`` with the leaves outside the mask taken from ``params``.

  Raises:
    ValueError: naming ``params=`` when ``tree`` has masked-out leaves and
      ``params`` is ``None``, or ``params`` does not fit.
  """
  if not has_masked(tree):
    return tree
  if params is None:
    raise ValueError(
        f'{where}: this average holds only the params inside its mask'
        ' (mask=), so it stores nothing for the others. Pass the live params'
        f' to fill them: {where}(state, params=params).')
  params = as_arrays(params)
  try:
    return jax.tree.map(
        lambda a, p: jax.tree.map(copy_leaf, p) if is_masked(a) else a,
        tree, params, is_leaf=is_masked)
  except ValueError as e:
    raise ValueError(
        f'{where}: params do not fit the average ({e}). Pass the live params,'
        ' the whole tree the mask was applied to.') from None
