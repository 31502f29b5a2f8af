"""``EmaState``: what an average holds, how it starts, and how to find it.

The state of one or several averages of a params tree, :func:`init` to start
it, and the one place that looks for an :class:`EmaState` inside a larger
state (an optax state, a train state, a checkpoint restored without a target).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import Params

from emax import _layout
from emax import _offload
from emax import _options
from emax import _tree


class _InfoFields(NamedTuple):
  dtype_names: tuple[str, ...]
  names: tuple[str, ...] | None
  debias: bool


_EXTENDED: dict[str, Any] = {}
"""Dtypes that NumPy cannot parse back from their names (PRNG keys), by name."""


def _dtype_name(d: Any) -> str:
  name = str(d)
  if not isinstance(d, str) and not isinstance(d, np.dtype):
    _EXTENDED.setdefault(name, d)
  return name


def _dtype(name: str) -> Any:
  if name in _EXTENDED:
    return _EXTENDED[name]
  return np.dtype(name)


def _sequence(x: Any) -> Any:
  """A tuple from a sequence, or from flax's ``{'0': .., '1': ..}`` form."""
  if isinstance(x, dict):
    return tuple(x[str(i)] for i in range(len(x)))
  return tuple(x)


@jax.tree_util.register_static
class StateInfo(_InfoFields):
  """What an :class:`EmaState` knows statically (a pytree node, no leaves).

  It travels in the tree structure, so it survives ``jit``, ``eval_shape``,
  ``lax.scan`` and checkpoint restores with a target, and costs nothing at run
  time. A named tuple of strings and a bool: ``flax.serialization`` stores it
  and restores it from what was stored, so averages restored into a target
  whose names come in another order keep their stored order (and their
  names), never a swapped one.

  Attributes:
    dtype_names: the names of the dtypes of the averaged params, one per
      leaf (:attr:`param_dtypes` gives the dtypes), so that
      :func:`emax.ema_params` hands the average back in those dtypes.
    names: the names of the averages, or ``None`` for a single average.
    debias: whether the average started at zero weight (``debias=True``).
  """

  __slots__ = ()

  def __new__(cls, dtype_names: Any, names: Any = None,
              debias: bool = False) -> 'StateInfo':
    return super().__new__(
        cls, tuple(_dtype_name(d) for d in _sequence(dtype_names)),
        None if names is None else _sequence(names), bool(debias))

  @property
  def param_dtypes(self) -> tuple[Any, ...]:
    """The dtypes of the averaged params, one per leaf."""
    return tuple(_dtype(n) for n in self.dtype_names)

  def __repr__(self) -> str:
    dtypes = ', '.join(self.dtype_names)
    extra = f', names={self.names}' if self.names is not None else ''
    extra += ', debias=True' if self.debias else ''
    return f'StateInfo(param_dtypes=({dtypes}){extra})'

  def position(self, name: str | None, where: str) -> int | None:
    """The position of average ``name`` (``None`` for a single average)."""
    if self.names is None:
      if name is not None:
        raise ValueError(
            f'{where}: this state holds a single, unnamed average; got'
            f' name={name!r}. Call it without a name.')
      return None
    if name is None:
      if len(self.names) == 1:
        return 0
      raise ValueError(
          f'{where}: this state holds {len(self.names)} named averages,'
          f' {list(self.names)}; say which one, e.g. name={self.names[0]!r}.')
    if name not in self.names:
      raise ValueError(
          f'{where}: no average named {name!r}; this state holds'
          f' {list(self.names)}.')
    return self.names.index(name)


class EmaState(NamedTuple):
  """The state of exponential moving averages of a pytree.

  A ``NamedTuple``: it checkpoints as plain arrays, is found by
  :func:`emax.get_ema_state` (and ``optax.tree.get(opt_state, 'average')``),
  and works as a ``lax.scan`` carry (no dtype or shape ever changes across
  updates).

  Attributes:
    count: int32 scalar, the number of steps taken (saturates at the int32
      maximum instead of wrapping).
    average: the stored averages, never debiased in place. By default a tree
      like the params: float leaves in their accumulator dtype (index it as
      the params, ``state.average['w']``); non-float leaves hold the latest
      value of the param. With named averages each float leaf has a leading
      axis, one entry per name in ``info.names`` order. With ``pack=True``
      it is a packed object that cannot be indexed: read any state with
      :func:`emax.ema_params`.
    weight: float32, the total weight each average has gathered (a scalar,
      or one per name): exactly ``1`` for an average that started as a copy
      of the params, ``1 - prod(decay)`` for one that started with
      ``debias=True``. The debiased average is ``average / weight``.
    step_size: float32, the step size ``1 - decay`` of the latest step that
      changed each average (a scalar, or one per name): 1 for a copy, 0
      before any step. What :func:`emax.metrics` reports.
    skipped: int32 scalar, steps whose new params (or rate) held a NaN or Inf
      and so left the averages as they were.
    info: static :class:`StateInfo` (no leaves): the params' dtypes, the
      names, whether the average is debiased.
  """

  count: jax.Array  # type: ignore[assignment]  # as optax's EmaState
  average: Params
  weight: jax.Array
  step_size: jax.Array
  skipped: jax.Array
  info: StateInfo


StateLike = Union[EmaState, optax.OptState]
"""An :class:`emax.EmaState`, or any state holding exactly one."""


def require_params(params: Any, where: str) -> None:
  if params is None:
    raise ValueError(
        f'{where} needs the params, got None. emax averages the parameters'
        ' themselves; call it with the current params (for an optax'
        ' transformation: tx.update(updates, opt_state, params)).')


def init(params: Params, *, names: Sequence[str] | None = None,
         debias: bool = False,
         accumulator_dtype: jax.typing.DTypeLike | None = None,
         offload: bool = False, pack: bool | int = False,
         mask: _tree.MaskLike | None = None) -> EmaState:
  """Starts an exponential moving average of ``params``.

  Args:
    params: any pytree of arrays (Python and NumPy scalars become arrays);
      ``None`` leaves are allowed.
    names: ``None`` for one average, or a sequence of names for several
      averages of the same params in one state, updated in one pass (give
      :func:`emax.update` one rate per name, as a mapping).
    debias: if ``False`` (as TensorFlow's shadow variables), each average
      starts as a copy of ``params`` with weight one. If ``True`` it starts
      with weight zero: the first averaging step then stores ``(1 - d) *
      params`` and reads are divided by the accumulated weight (Adam-style).
      Before that first step the stored average is the initial params, and
      reading it gives them back.
    accumulator_dtype: dtype of the float accumulators. By default float32
      for floats narrower than 32 bits (bf16, f16), the param's own dtype
      otherwise.
    offload: keep the averages in host memory (``memory_kind='pinned_host'``,
      same sharding otherwise), so they cost no accelerator memory between
      steps; each update brings them to the device and back. They are
      stored as raw bits, which carry no gradient: differentiating through
      :func:`emax.update` or :func:`emax.ema_params` with respect to the
      params raises a ``TypeError`` (use ``offload=False`` where a gradient
      must flow through the average).
    pack: store the averages of small float leaves (at most ``2**15``
      elements, or at most ``pack`` elements for an int) that sit on a single
      device in a few contiguous buffers, so that a step over many small
      leaves is a few kernels instead of one per leaf. Sharded and replicated
      leaves are never packed. ``state.average`` is then not indexable; read
      it with :func:`emax.ema_params`.
    mask: average only part of the params (the trainable ones, adapters),
      with optax's convention: a tree of bools like the params (or a prefix
      of them; ``True`` averages the leaf), or a callable ``params -> that
      tree``. Leaves outside the mask store nothing (``optax.MaskedNode`` in
      the average); readers fill them from the live params
      (``emax.ema_params(state, params=params)``).

  Returns:
    An :class:`EmaState`. Its arrays are fresh buffers: they never alias
    ``params``, so both can be donated to a jitted step. Each keeps the
    sharding of its param, eagerly and under ``jit``.

  Raises:
    ValueError: if ``params`` is ``None``, ``accumulator_dtype`` is not a
      floating dtype, ``names`` are not distinct, ``pack`` is not a bool or a
      positive int, or ``offload=True`` on devices without pinned host
      memory (``pack`` and ``offload`` combine).
    TypeError: if ``debias`` or ``offload`` is not a bool, ``names`` is not a
      sequence of strings, ``accumulator_dtype`` is not a dtype, or ``mask``
      holds a leaf that is not a bool.

  Examples:
    >>> import jax.numpy as jnp, emax
    >>> state = emax.init({'w': jnp.ones(2, jnp.bfloat16)})
    >>> state.average['w'].dtype, state.weight
    (dtype('float32'), Array(1., dtype=float32))
    >>> emax.init({'w': jnp.ones(2)}, names=('fast', 'slow')).average['w']
    Array([[1., 1.],
           [1., 1.]], dtype=float32)
  """
  require_params(params, 'emax.init')
  names = _options.check_names(names)
  debias = _options.check_bool(debias, 'debias')
  acc = _options.check_accumulator_dtype(accumulator_dtype)
  max_pack, offload = _options.check_layout(pack, offload)
  params = _tree.as_arrays(params)
  if mask is not None:
    params = _tree.apply_mask(mask, params)
  if offload:
    _offload.check_supported(params)
  count = None if names is None else len(names)
  average = _layout.build(
      params, lambda dtype: _tree.accumulator_dtype_for(dtype, acc),
      count=count, max_pack=max_pack)
  if offload:
    average = _offload.to_host(average)
  shape = () if count is None else (count,)
  info = StateInfo(tuple(p.dtype for p in jax.tree.leaves(params)), names,
                   debias)
  return fresh(average, info, shape)


def fresh(average: Params, info: StateInfo,
          shape: tuple[int, ...]) -> EmaState:
  """A state of no step yet around ``average`` (stored as the params): a
  copy of weight one, or weight zero with ``info.debias``; ``shape`` is
  ``()`` or ``(number of names,)``."""
  return EmaState(
      count=jnp.zeros([], jnp.int32),
      average=average,
      weight=jnp.full(shape, 0.0 if info.debias else 1.0, jnp.float32),
      step_size=jnp.zeros(shape, jnp.float32),
      skipped=jnp.zeros([], jnp.int32),
      info=info,
  )


def is_masked(state: EmaState) -> bool:
  """Whether ``state`` averages part of the params only (``mask=``)."""
  average = state.average
  if isinstance(average, _offload.OffloadedTree):
    average = average.treedef.unflatten(average.leaves)
  return _tree.has_masked(_layout.param_shapes(average, None))


RESTORE_HINT = (
    ' A checkpoint restored without a target gives plain dicts like this one.'
    ' Restore with a target instead: emax.checkpoint.restore(manager, like)'
    ' with a freshly built state, or'
    ' ocp.args.StandardRestore(jax.eval_shape(tx.init, params)); or read the'
    ' average from the dict with emax.checkpoint.read_average(restored).')


def looks_restored(x: Any) -> bool:
  """Whether ``x`` is a dict shaped like an :class:`EmaState`."""
  return isinstance(x, dict) and {'count', 'average', 'weight'} <= set(x)


def check_state(state: Any, where: str) -> EmaState:
  """``state`` itself, or a clear error when it is not an :class:`EmaState`."""
  if isinstance(state, EmaState):
    return state
  hint = RESTORE_HINT if looks_restored(state) else ''
  raise ValueError(
      f'{where} expected an emax.EmaState, got {type(state).__name__}'
      f' instead.{hint}')


def _is_state(x: Any) -> bool:
  return isinstance(x, EmaState)


def all_states(tree: Any, kind: type = EmaState) -> list[Any]:
  """Every ``kind`` node (an :class:`EmaState` by default) inside ``tree``."""
  is_kind = lambda x: isinstance(x, kind)  # noqa: E731
  return [x for x in jax.tree.leaves(tree, is_leaf=is_kind) if is_kind(x)]


def _dicts(tree: Any) -> Any:
  """Every dict in a nested container (for error messages only)."""
  stack = [tree]
  while stack:
    x = stack.pop()
    if isinstance(x, dict):
      yield x
      stack.extend(x.values())
    elif isinstance(x, (list, tuple)):
      stack.extend(x)


def _has_arrays(tree: Any) -> bool:
  return any(x is not None for x in jax.tree.leaves(tree))


def _describe(member: Any) -> str:
  """The name of the first optax state with arrays inside ``member``."""
  stack = [member]
  while stack:
    x = stack.pop(0)
    if hasattr(x, '_fields') and _has_arrays(x):
      return type(x).__name__
    if isinstance(x, (list, tuple)):
      stack.extend(x)
    elif isinstance(x, dict):
      stack.extend(x.values())
  return type(member).__name__


def _followers(tree: Any) -> list[str]:
  """Stateful transformations placed after an EmaState in a chain's state.

  ``optax.chain`` keeps its members' states in a plain tuple, in order. An
  EmaState followed there by a member that has state (Adam's moments, a
  momentum trace) averaged the params before that member changed the
  updates: the wrong values. Stateless members cannot be seen.
  """
  out = []
  stack = [tree]
  while stack:
    x = stack.pop()
    if _is_state(x):
      continue
    if type(x) is tuple:  # an optax.chain state (NamedTuples are not)
      seen = False
      for member in x:
        if seen and _has_arrays(member) and not all_states(member):
          out.append(_describe(member))
        seen = seen or bool(all_states(member))
    if isinstance(x, (list, tuple)):
      stack.extend(x)
    elif isinstance(x, dict):
      stack.extend(x.values())
  return out


def find(tree: Any, where: str = 'emax.get_ema_state') -> EmaState:
  """The one :class:`EmaState` in ``tree``; a clear error for none or several.

  Warns when the state shows that the average was placed before a
  transformation with state (e.g. ``optax.chain(emax.ema(d), optax.adam(lr))``).
  """
  if _is_state(tree):
    return tree
  found = all_states(tree)
  if len(found) == 1:
    after = _followers(tree)
    if after:
      warnings.warn(
          f'{where}: the EMA is placed before {", ".join(after)} in an'
          ' optax.chain, so it averaged params + updates before those'
          ' transformations changed the updates: the wrong values. Put'
          ' emax.ema last in the chain, or use'
          ' emax.with_ema(optimizer, decay), which cannot be misplaced.',
          stacklevel=3)
    return found[0]
  if found:
    raise ValueError(
        f'{where}: found {len(found)} emax.EmaState in the state, expected'
        ' exactly one. Keep one average per optimizer (for several averages'
        ' of the same params, give emax.ema a mapping {name: decay}), or'
        ' pick the one you mean with emax.get_ema_state(optax.tree.get('
        'opt_state, ...)) before reading it.')
  restored = any(looks_restored(x) for x in _dicts(tree))
  hint = RESTORE_HINT if restored else (
      ' Put the average into the optimizer, e.g.'
      ' emax.with_ema(optax.adam(1e-3), 0.999).')
  raise ValueError(
      f'{where} expected an emax.EmaState or a state holding one, got'
      f' {type(tree).__name__} with none inside.{hint}')


def replace(tree: Any, new: EmaState) -> Any:
  """``tree`` with its one :class:`EmaState` replaced by ``new``."""
  find(tree)
  return jax.tree.map(lambda x: new if _is_state(x) else x, tree,
                      is_leaf=_is_state)
