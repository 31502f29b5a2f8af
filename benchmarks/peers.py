"""The implementations the suite compares: registries of rows.

Each table of the suite is a registry here; a row is one entry, registered
under its name from :mod:`benchmarks.rows`. To add a row, name it there,
then write a builder and register it::

  @update_impl(rows.MY_VARIANT)
  def _mine(tree):
    return jax_runner(rows.MY_VARIANT,
                      lambda s, p: emax.update(s, p, DECAY, mine=True),
                      emax.init(tree.params), tree.params, unit=tree.unit)

A builder returns a :class:`timing.Runner`, or raises :class:`Skip` with the
reason the row cannot run here (e.g. torch is not installed; printed and
listed in the results). The registries:

* ``UPDATES``: the per-tree tables (one EMA step on a param tree).
* ``OPTIONS``: ``emax.ema`` options, standalone ``tx.update``.
* ``TRAIN``: the jitted Adam train step.
* ``AVERAGES``: K averages of one tree (named averages vs K separate ones).

Traffic (``kind``), the minimal bytes a step must move per param, gives the
GB/s columns: ``'update'`` reads the param and the average and writes the
average; ``'transform'`` also reads the updates (``tx.update(updates, state,
params)`` averages ``params + updates``); ``'none'`` moves nothing useful
(the per-buffer floor).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import emax
from benchmarks import rows
from benchmarks import timing
from benchmarks.trees import tree_bytes

DECAY = 0.999
TORCH = dict(disabled=False)  # --no-torch sets it


class Skip(Exception):
  """A row that cannot run here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Impl:
  """A registered row: ``build(arg) -> timing.Runner``."""
  name: str
  build: Callable[..., timing.Runner]
  kind: str = 'update'
  where: Callable[[Any], bool] = lambda tree: True  # which trees
  extra: dict = dataclasses.field(default_factory=dict)


UPDATES: list[Impl] = []
OPTIONS: list[Impl] = []
TRAIN: list[Impl] = []
AVERAGES: list[Impl] = []


def _register(registry, name, kind='update', where=lambda tree: True,
              **extra):
  def deco(build):
    registry.append(Impl(name, build, kind, where, extra))
    return build
  return deco


def update_impl(name, **kw):
  return _register(UPDATES, name, **kw)


def option_impl(name, **kw):
  return _register(OPTIONS, name, kind='transform', **kw)


def train_impl(name, **kw):
  return _register(TRAIN, name, kind='train', **kw)


def averages_impl(name, **kw):
  return _register(AVERAGES, name, kind='averages', **kw)


# ------------------------------------------------------------- helpers


def acc_dtype(dtype):
  """The accumulator dtype emax uses by default: f32 for 16-bit floats."""
  dtype = jnp.dtype(dtype)
  return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def acc_copy(params):
  """A fresh copy of ``params`` in accumulator dtypes (a peer's average)."""
  return jax.tree.map(lambda x: jnp.array(x, acc_dtype(x.dtype), copy=True),
                      params)


# Programs compiled for a `program` key of `jax_runner`, by their input
# shapes: rows of two tables that run the same program on the same shapes
# compile it once. Emptied at the start of each run.
COMPILED: dict = {}


def jax_runner(name: str, fn: Callable, state, *args, unit: float,
               donate: bool = True, steps_per_call: int = 1,
               program=None) -> timing.Runner:
  """Compiles ``state = fn(state, *args)``; a runner that keeps the state.

  ``state`` is donated unless ``donate=False``; ``args`` are passed at each
  call (never closed over). ``unit`` is the bytes of one param tree: memory
  is reported in param trees. ``program``: a hashable key that says what
  ``fn`` computes; a runner with the same key and input shapes reuses the
  compiled program (and reports its compile time).
  """
  key = None
  if program is not None:
    leaves, treedef = jax.tree.flatten((state, args))
    key = (program, donate, treedef,
           tuple((x.shape, jnp.dtype(x.dtype).name) for x in leaves))
  if key is not None and key in COMPILED:
    compiled, compile_s = COMPILED[key]
  else:
    compiled, compile_s = timing.compile_jit(
        fn, state, *args, donate_argnums=(0,) if donate else ())
    if key is not None:
      COMPILED[key] = compiled, compile_s
  holder = [state]

  def step():
    holder[0] = compiled(holder[0], *args)
    return holder[0]

  peak = timing.peak_bytes(compiled)
  return timing.Runner(
      name, step, steps_per_call=steps_per_call,
      info=dict(compile_s=compile_s,
                steady_units=(tree_bytes(state) + tree_bytes(args)) / unit,
                peak_units=None if peak is None else peak / unit))


# --------------------------------------------------------------- torch


def torch():
  """The torch module, or Skip with the reason."""
  if TORCH['disabled']:
    raise Skip('torch disabled (--no-torch)')
  try:
    import torch as t  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise Skip('torch is not installed (pip install torch to add its row)'
               ) from None
  return t


def torch_device(t, backend: str) -> str:
  """Where torch runs: CPU next to jax on CPU, CUDA next to jax on a GPU."""
  if backend == 'cpu':
    return 'cpu'
  if backend in ('gpu', 'cuda'):
    if t.version.cuda is None:
      raise Skip(f'jax runs on {backend}; torch {t.__version__} is built'
                 ' without CUDA (install a CUDA build of torch)')
    if not t.cuda.is_available():
      raise Skip(f'jax runs on {backend}; torch {t.__version__} sees no'
                 ' CUDA device')
    return 'cuda'
  raise Skip(f'jax runs on {backend}; torch is compared on CPU or CUDA only')


def torch_lerp_runner(name, np_params, *, backend, threads, cooldown_s):
  """``torch._foreach_lerp_(averages, params, 1 - d)``, in place."""
  t = torch()
  device = torch_device(t, backend)
  if device == 'cpu':
    t.set_num_threads(threads)
  # _foreach_lerp_ needs one dtype: 16-bit params are timed as float32 (the
  # row's name says so).
  ps = [t.from_numpy(np.ascontiguousarray(x, np.float32)).to(device)
        for x in np_params.values()]
  avgs = [p.clone() for p in ps]
  w = 1 - DECAY
  sync = ((lambda _: t.cuda.synchronize()) if device == 'cuda'
          else (lambda x: x))
  return timing.Runner(
      name, lambda: t._foreach_lerp_(avgs, ps, w), sync=sync,  # noqa: SLF001
      cooldown_s=cooldown_s if device == 'cpu' else 0.0,
      info=dict(compile_s=0.0, steady_units=None, peak_units=None,
                device=f'torch {t.__version__} on {device}'))


# ------------------------------------------------- UPDATES: per-tree rows
# Builders take a `trees.Tree` (params, np_params, updates, unit, ...).


def _many(tree):
  return tree.many_leaves


def _update_runner(name, tree, state, **kw):
  return jax_runner(name, lambda s, p: emax.update(s, p, DECAY, **kw), state,
                    tree.params, unit=tree.unit)


@update_impl(rows.EMAX_UPDATE)
def _emax_update(tree):
  return _update_runner(rows.EMAX_UPDATE, tree, emax.init(tree.params))


@update_impl(rows.EMAX_UPDATE_UNGUARDED)
def _emax_update_unguarded(tree):
  # The arithmetic alone (TensorFlow's two roundings), without the NaN
  # guard's extra read of the params.
  return _update_runner(rows.EMAX_UPDATE_UNGUARDED, tree,
                        emax.init(tree.params), skip_nonfinite=False)


@update_impl(rows.EMAX_UPDATE_PACKED)
def _emax_update_packed(tree):
  return _update_runner(rows.EMAX_UPDATE_PACKED, tree,
                        emax.init(tree.params, pack=True))


@update_impl(rows.EMAX_UPDATE_LERP)
def _emax_update_lerp(tree):
  return _update_runner(rows.EMAX_UPDATE_LERP, tree, emax.init(tree.params),
                        rounding='lerp', skip_nonfinite=False)


def _ema_tx(tree, name, steps_per_call=1, **kw):
  """``steps_per_call`` standalone ``tx.update`` calls of ``emax.ema(**kw)``
  (decay ``DECAY`` unless ``kw`` says otherwise)."""
  kw = {'decay': DECAY} | kw
  tx = emax.ema(**kw)

  def calls(s, u, p):
    for _ in range(steps_per_call):  # update_every=k: time k steps
      s = tx.update(u, s, p)[1]
    return s

  return jax_runner(name, calls, tx.init(tree.params), tree.updates,
                    tree.params, unit=tree.unit, steps_per_call=steps_per_call,
                    program=('emax.ema tx.update', steps_per_call,
                             tuple(sorted(kw.items()))))


@update_impl(rows.EMA_TX, kind='transform')
def _emax_ema_default(tree):
  return _ema_tx(tree, rows.EMA_TX)


@update_impl(rows.EMA_TX_UNGUARDED, kind='transform')
def _emax_ema_unguarded(tree):
  return _ema_tx(tree, rows.EMA_TX_UNGUARDED, skip_nonfinite=False)


@update_impl(rows.OPTAX_APPLY_INCREMENTAL, kind='transform')
def _optax_apply_incremental(tree):
  c = jnp.float32(1 - DECAY)

  def step(avg, u, p):
    new = optax.apply_updates(p, u)
    return optax.incremental_update(
        jax.tree.map(lambda x, a: x.astype(a.dtype), new, avg), avg, c)

  return jax_runner(rows.OPTAX_APPLY_INCREMENTAL, step, acc_copy(tree.params),
                    tree.updates, tree.params, unit=tree.unit)


def _hand_guarded(new, avg):
  """``optax.incremental_update`` of ``avg`` toward ``new`` where every new
  param is finite, else ``avg`` unchanged: the NaN guard written by hand."""
  c = jnp.float32(1 - DECAY)
  ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                          for x in jax.tree.leaves(new)]))
  moved = optax.incremental_update(
      jax.tree.map(lambda x, a: x.astype(a.dtype), new, avg), avg, c)
  return jax.tree.map(lambda m, a: jnp.where(ok, m, a), moved, avg)


def _few_leaves(tree):
  """Trees of fewer than 1,000 leaves: XLA compiles the hand-written guard
  (a reduction per leaf, their flags stacked) for minutes on 2,000."""
  return len(tree.shapes) < 1000


@update_impl(rows.HAND_GUARDED, where=_few_leaves)
def _hand_guarded_update(tree):
  return jax_runner(rows.HAND_GUARDED, _hand_guarded, acc_copy(tree.params),
                    tree.params, unit=tree.unit)


@update_impl(rows.HAND_GUARDED_TX, kind='transform', where=_few_leaves)
def _hand_guarded_tx(tree):
  return jax_runner(
      rows.HAND_GUARDED_TX,
      lambda avg, u, p: _hand_guarded(optax.apply_updates(p, u), avg),
      acc_copy(tree.params), tree.updates, tree.params, unit=tree.unit)


def _lerp(avg, p):
  c = jnp.float32(1 - DECAY)
  return jax.tree.map(
      lambda a, x: a - c.astype(a.dtype) * (a - x.astype(a.dtype)), avg, p)


@update_impl(rows.READ_PARAMS_UPDATES, kind='none')
def _read_params_updates(tree):
  """The least an exact NaN guard must add to a standalone ``tx.update``:
  one read-only pass over ``p`` and ``u`` (plain sums, nothing written)."""
  def fn(s, u, p):
    sums = [jnp.sum(x) for x in jax.tree.leaves((u, p))]
    return s + sum(sums).astype(s.dtype)
  return jax_runner(rows.READ_PARAMS_UPDATES, fn, jnp.zeros([], jnp.float32),
                    tree.updates, tree.params, unit=tree.unit)


@update_impl(rows.LERP_DONATED)
def _lerp_donated(tree):
  return jax_runner(rows.LERP_DONATED, _lerp, acc_copy(tree.params),
                    tree.params, unit=tree.unit)


@update_impl(rows.LERP_NOT_DONATED)
def _lerp_not_donated(tree):
  return jax_runner(rows.LERP_NOT_DONATED, _lerp, acc_copy(tree.params),
                    tree.params, unit=tree.unit, donate=False)


@update_impl(rows.OPTAX_INCREMENTAL)
def _optax_incremental(tree):
  c = jnp.float32(1 - DECAY)
  return jax_runner(
      rows.OPTAX_INCREMENTAL,
      lambda s, p: optax.incremental_update(
          jax.tree.map(lambda x, a: x.astype(a.dtype), p, s), s, c),
      acc_copy(tree.params), tree.params, unit=tree.unit)


@update_impl(rows.OPTAX_EMA)
def _optax_ema(tree):
  tx = optax.ema(DECAY)
  # The carried state holds the returned "updates" (the average) too, so
  # that the donated input and the output have the same structure.
  state = (jax.tree.map(jnp.zeros_like, acc_copy(tree.params)),
           tx.init(acc_copy(tree.params)))
  return jax_runner(rows.OPTAX_EMA,
                    lambda s, p: tx.update(acc_copy(p), s[1]), state,
                    tree.params, unit=tree.unit)


@update_impl(rows.TORCH_LERP)
def _torch_lerp(tree):
  name = rows.TORCH_LERP
  if np.dtype(tree.dtype) != np.float32:
    name += ' (f32 params)'
  return torch_lerp_runner(name, tree.np_params, backend=tree.backend,
                           threads=tree.threads, cooldown_s=tree.cooldown_s)


@update_impl(rows.IDENTITY, kind='none', where=_many)
def _identity(tree):
  """XLA's per-buffer floor: a donated identity over every leaf."""
  return jax_runner(rows.IDENTITY, lambda s: s, acc_copy(tree.params),
                    unit=tree.unit)


@update_impl(rows.STACKED, where=_many)
def _stacked(tree):
  """The same params as one (leaves, size) array, as stacked layers hold them
  (``nn.scan``, ``vmap``-ed init): one buffer instead of thousands."""
  stacked = jnp.asarray(np.stack(list(tree.np_params.values())))
  return jax_runner(rows.STACKED, lambda s, p: emax.update(s, p, DECAY),
                    emax.init(stacked), stacked, unit=tree.unit)


# ----------------------------------------------- OPTIONS: emax.ema options
# Builders take a `trees.Tree` and return a runner of standalone tx.update.


def _option(name, steps_per_call=1, baseline=False, **kw):
  """Registers the row ``name``: ``emax.ema(DECAY, **kw)``'s tx.update."""
  option_impl(name, baseline=baseline)(
      lambda tree: _ema_tx(tree, name, steps_per_call, **kw))


_option(rows.OPT_UNGUARDED, baseline=True, skip_nonfinite=False)
_option(rows.OPT_DEFAULT)
_option(rows.OPT_DEBIAS, debias=True)
_option(rows.OPT_UPDATE_EVERY, steps_per_call=4, update_every=4)
_option(rows.OPT_PACK, pack=True)
_option(rows.OPT_ROUNDING_LERP, rounding='lerp')
_option(rows.OPT_ROUNDING_OPTAX, rounding='optax')
_option(rows.OPT_STEP_SIZE, decay=None, step_size=1 - DECAY)


# ------------------------------------------------- TRAIN: jitted Adam step
# Builders take a `trees.TrainProblem` and return a runner of one donated
# step of the whole train state.


def _adam():
  return optax.adam(1e-3)


def _train_runner(problem, name, tx, finite=None):
  """``finite``: a function of the grads whose value is passed as
  ``finite=`` to ``tx.update`` (None: not passed)."""
  def step(carry, x, y):
    p, s = carry
    g = jax.grad(problem.loss)(p, x, y)
    kw = {} if finite is None else dict(finite=finite(g))
    u, s = tx.update(g, s, p, **kw)
    return optax.apply_updates(p, u), s

  params = problem.fresh_params()
  return jax_runner(name, step, (params, tx.init(params)), problem.x,
                    problem.y, unit=problem.unit)


def _train(name, tx_fn, **extra):
  """Registers the row ``name``: an Adam step with ``tx_fn()``."""
  train_impl(name, **extra)(lambda problem: _train_runner(problem, name,
                                                          tx_fn()))


_train(rows.ADAM, _adam, baseline=True)
_train(rows.ADAM_EMA, lambda: optax.chain(_adam(), emax.ema(DECAY)))
_train(rows.ADAM_EMA_UNGUARDED, lambda: optax.chain(
    _adam(), emax.ema(DECAY, skip_nonfinite=False)))
_train(rows.ADAM_EMA_LERP, lambda: optax.chain(
    _adam(), emax.ema(DECAY, rounding='lerp')))
_train(rows.ADAM_WITH_EMA, lambda: emax.with_ema(_adam(), DECAY))


# With gradient clipping in the chain: the guard's signal for free. The
# norm `optax.clip_by_global_norm` computes is the same `optax.global_norm`
# the step passes as `finite=`, so XLA computes it once (tests/test_hlo.py).


def _clip_adam():
  return optax.chain(optax.clip_by_global_norm(1.0), _adam())


_train(rows.CLIP_ADAM, _clip_adam)
_train(rows.CLIP_ADAM_EMA_UNGUARDED, lambda: optax.chain(
    _clip_adam(), emax.ema(DECAY, skip_nonfinite=False)),
       base=rows.CLIP_ADAM)


@train_impl(rows.CLIP_ADAM_EMA_FINITE, base=rows.CLIP_ADAM)
def _train_clip_finite(problem):
  return _train_runner(problem, rows.CLIP_ADAM_EMA_FINITE,
                       optax.chain(_clip_adam(), emax.ema(DECAY)),
                       finite=lambda g: jnp.isfinite(optax.global_norm(g)))


@train_impl(rows.ADAM_OPTAX_INCREMENTAL)
def _train_optax(problem):
  tx = _adam()
  c = jnp.float32(1 - DECAY)

  def step(carry, x, y):
    p, s, avg = carry
    g = jax.grad(problem.loss)(p, x, y)
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    return p, s, optax.incremental_update(p, avg, c)

  params = problem.fresh_params()
  return jax_runner(rows.ADAM_OPTAX_INCREMENTAL, step,
                    (params, tx.init(params), problem.fresh_params()),
                    problem.x, problem.y, unit=problem.unit)


# --------------------------------------------- AVERAGES: K of one tree
# Pure update form. Builders take (tree, k). Traffic: the param read once
# (4 B) + K averages read and written (8K B): the (4 + 8K) bytes/param
# roofline.


def _decays(k):
  return [1 - 10.0 ** -(3 + i / 2) for i in range(k)]


def _named_runner(name, tree, k, **kw):
  names = tuple(f'a{i}' for i in range(k))
  decays = dict(zip(names, _decays(k)))
  return jax_runner(f'{name}, K={k}',
                    lambda s, p: emax.update(s, p, decays, **kw),
                    emax.init(tree.params, names=names), tree.params,
                    unit=tree.unit)


@averages_impl(rows.NAMED)
def _named(tree, k):
  return _named_runner(rows.NAMED, tree, k)


@averages_impl(rows.NAMED_UNGUARDED)
def _named_unguarded(tree, k):
  """The same without the NaN guard: the layout's own traffic, (4 + 8K)."""
  return _named_runner(rows.NAMED_UNGUARDED, tree, k, skip_nonfinite=False)


@averages_impl(rows.SEPARATE, baseline=True)
def _separate(tree, k):
  decays = _decays(k)
  states = tuple(emax.init(tree.params) for _ in range(k))
  return jax_runner(
      f'{rows.SEPARATE}, K={k}',
      lambda ss, p: tuple(emax.update(s, p, d) for s, d in zip(ss, decays)),
      states, tree.params, unit=tree.unit)


def environment() -> dict:
  """Versions of the compared libraries (for the report)."""
  out = dict(jax=jax.__version__, optax=optax.__version__,
             emax=getattr(emax, '__version__', '?'),
             python=sys.version.split()[0])
  t = sys.modules.get('torch')
  if t is not None:
    out['torch'] = t.__version__
  out['omp_num_threads'] = os.environ.get('OMP_NUM_THREADS')
  return out
