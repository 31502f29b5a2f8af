"""The implementations the suite compares: registries of rows.

Each table of the suite is a registry here; a row is one entry. To add a row,
write a builder and register it (see the ``HOOKS`` section at the end for the
rows of features that may not exist yet)::

  @update_impl('emax.update, my variant', requires=lambda: None)
  def _mine(tree):
    return jax_runner('emax.update, my variant',
                      lambda s, p: emax.update(s, p, DECAY, mine=True),
                      emax.init(tree.params), tree.params, unit=tree.unit)

A builder returns a :class:`timing.Runner`, or raises :class:`Skip` with the
reason the row cannot run here (printed and listed in the results). A
``requires`` callable returns such a reason before anything is built (e.g. a
keyword the installed emax does not have yet), or None. The registries:

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
import inspect
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import emax
from benchmarks import timing
from benchmarks.trees import tree_bytes
from emax import _numerics as emax_numerics

DECAY = 0.999
TORCH = dict(disabled=False)  # --no-torch sets it


class Skip(Exception):
  """A row that cannot run here; the message says why."""


def accepts(fn: Callable, name: str) -> bool:
  """Whether ``fn`` takes a parameter ``name`` (feature detection)."""
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def needs(fn_name: str, param: str | None = None) -> Callable[[], str | None]:
  """A ``requires`` check: ``emax.<fn_name>`` exists (and takes ``param``)."""
  def check():
    fn = getattr(emax, fn_name, None)
    if fn is None:
      return f'emax.{fn_name} does not exist in this emax'
    if param is not None and not accepts(fn, param):
      return f'emax.{fn_name} has no {param!r} argument in this emax'
    return None
  return check


def _always():
  return None


@dataclasses.dataclass(frozen=True)
class Impl:
  """A registered row: ``build(arg) -> timing.Runner``."""
  name: str
  build: Callable[..., timing.Runner]
  kind: str = 'update'
  requires: Callable[[], str | None] = _always
  where: Callable[[Any], bool] = lambda tree: True  # which trees
  extra: dict = dataclasses.field(default_factory=dict)


UPDATES: list[Impl] = []
OPTIONS: list[Impl] = []
TRAIN: list[Impl] = []
AVERAGES: list[Impl] = []


def _register(registry, name, kind='update', requires=_always,
              where=lambda tree: True, **extra):
  def deco(build):
    registry.append(Impl(name, build, kind, requires, where, extra))
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


def jax_runner(name: str, fn: Callable, state, *args, unit: float,
               donate: bool = True, steps_per_call: int = 1
               ) -> timing.Runner:
  """Compiles ``state = fn(state, *args)``; a runner that keeps the state.

  ``state`` is donated unless ``donate=False``; ``args`` are passed at each
  call (never closed over). ``unit`` is the bytes of one param tree: memory
  is reported in param trees.
  """
  compiled, compile_s = timing.compile_jit(
      fn, state, *args, donate_argnums=(0,) if donate else ())
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


@update_impl('emax.update')
def _emax_update(tree):
  return jax_runner('emax.update', lambda s, p: emax.update(s, p, DECAY),
                    emax.init(tree.params), tree.params, unit=tree.unit)


@update_impl('emax.update skip_nonfinite=False')
def _emax_update_unguarded(tree):
  # The arithmetic alone (TensorFlow's two roundings), without the NaN
  # guard's extra read of the params: what target 6 compares.
  return jax_runner('emax.update skip_nonfinite=False',
                    lambda s, p: emax.update(s, p, DECAY,
                                             skip_nonfinite=False),
                    emax.init(tree.params), tree.params, unit=tree.unit)


@update_impl('emax.update pack=True')
def _emax_update_packed(tree):
  return jax_runner('emax.update pack=True',
                    lambda s, p: emax.update(s, p, DECAY),
                    emax.init(tree.params, pack=True), tree.params,
                    unit=tree.unit)


def _ema_tx(tree, name, **kw):
  tx = emax.ema(DECAY, **kw)
  return jax_runner(name, lambda s, u, p: tx.update(u, s, p)[1],
                    tx.init(tree.params), tree.updates, tree.params,
                    unit=tree.unit)


@update_impl('emax.ema tx.update', kind='transform')
def _emax_ema_default(tree):
  return _ema_tx(tree, 'emax.ema tx.update')


@update_impl('emax.ema(skip_nonfinite=False) tx.update', kind='transform')
def _emax_ema_unguarded(tree):
  return _ema_tx(tree, 'emax.ema(skip_nonfinite=False) tx.update',
                 skip_nonfinite=False)


@update_impl('optax.apply_updates + incremental_update', kind='transform')
def _optax_apply_incremental(tree):
  c = jnp.float32(1 - DECAY)

  def step(avg, u, p):
    new = optax.apply_updates(p, u)
    return optax.incremental_update(
        jax.tree.map(lambda x, a: x.astype(a.dtype), new, avg), avg, c)

  return jax_runner('optax.apply_updates + incremental_update', step,
                    acc_copy(tree.params), tree.updates, tree.params,
                    unit=tree.unit)


def _lerp(avg, p):
  c = jnp.float32(1 - DECAY)
  return jax.tree.map(
      lambda a, x: a - c.astype(a.dtype) * (a - x.astype(a.dtype)), avg, p)


def _check_runner(name, leaves_of, tree, *args):
  """The NaN guard's own pass, alone: emax's finiteness check over the new
  params (``p`` for the pure update, ``p + u`` computed inside the reduction
  for ``tx.update``), timed as a row so that its cost can be added to the
  guard-off step (the floor of any exact guard, see benchmarks.targets)."""
  def fn(s, *a):
    return s + emax_numerics.all_finite(leaves_of(*a)).astype(s.dtype)
  return jax_runner(name, fn, jnp.zeros([], jnp.float32), *args,
                    unit=tree.unit)


@update_impl('one read of p and u: sum(p) + sum(u)', kind='none')
def _read_params_updates(tree):
  """The least an exact guard must add to a standalone ``tx.update``: one
  read-only pass over ``p`` and ``u`` (plain sums, nothing written)."""
  def fn(s, u, p):
    sums = [jnp.sum(x) for x in jax.tree.leaves((u, p))]
    return s + sum(sums).astype(s.dtype)
  return jax_runner('one read of p and u: sum(p) + sum(u)', fn,
                    jnp.zeros([], jnp.float32), tree.updates, tree.params,
                    unit=tree.unit)


@update_impl("the guard's pass alone: check p", kind='none')
def _check_params(tree):
  return _check_runner("the guard's pass alone: check p",
                       lambda p: jax.tree.leaves(p), tree, tree.params)


@update_impl("the guard's pass alone: check p + u", kind='none')
def _check_params_updates(tree):
  return _check_runner(
      "the guard's pass alone: check p + u",
      lambda u, p: jax.tree.leaves(optax.apply_updates(p, u)), tree,
      tree.updates, tree.params)


@update_impl('tree.map lerp, donated')
def _lerp_donated(tree):
  return jax_runner('tree.map lerp, donated', _lerp, acc_copy(tree.params),
                    tree.params, unit=tree.unit)


@update_impl('tree.map lerp, not donated')
def _lerp_not_donated(tree):
  return jax_runner('tree.map lerp, not donated', _lerp,
                    acc_copy(tree.params), tree.params, unit=tree.unit,
                    donate=False)


@update_impl('optax.incremental_update')
def _optax_incremental(tree):
  c = jnp.float32(1 - DECAY)
  return jax_runner(
      'optax.incremental_update',
      lambda s, p: optax.incremental_update(
          jax.tree.map(lambda x, a: x.astype(a.dtype), p, s), s, c),
      acc_copy(tree.params), tree.params, unit=tree.unit)


@update_impl('optax.ema on params')
def _optax_ema(tree):
  tx = optax.ema(DECAY)
  # The carried state holds the returned "updates" (the average) too, so
  # that the donated input and the output have the same structure.
  state = (jax.tree.map(jnp.zeros_like, acc_copy(tree.params)),
           tx.init(acc_copy(tree.params)))
  return jax_runner('optax.ema on params',
                    lambda s, p: tx.update(acc_copy(p), s[1]), state,
                    tree.params, unit=tree.unit)


@update_impl('torch._foreach_lerp_')
def _torch_lerp(tree):
  name = 'torch._foreach_lerp_'
  if np.dtype(tree.dtype) != np.float32:
    name += ' (f32 params)'
  r = torch_lerp_runner(name, tree.np_params, backend=tree.backend,
                        threads=tree.threads, cooldown_s=tree.cooldown_s)
  r.info['row'] = 'torch._foreach_lerp_'
  return r


@update_impl('jitted identity over the leaves', kind='none', where=_many)
def _identity(tree):
  """XLA's per-buffer floor: a donated identity over every leaf."""
  return jax_runner('jitted identity over the leaves', lambda s: s,
                    acc_copy(tree.params), unit=tree.unit)


@update_impl('stacked into one array: emax.update', where=_many)
def _stacked(tree):
  """The same params as one (leaves, size) array, as stacked layers hold them
  (``nn.scan``, ``vmap``-ed init): one buffer instead of thousands."""
  stacked = jnp.asarray(np.stack(list(tree.np_params.values())))
  return jax_runner('stacked into one array: emax.update',
                    lambda s, p: emax.update(s, p, DECAY), emax.init(stacked),
                    stacked, unit=tree.unit)


# ----------------------------------------------- OPTIONS: emax.ema options
# Builders take a `trees.Tree` and return a runner of standalone tx.update.


def _option(name, steps_per_call=1, **kw):
  def build(tree):
    tx = emax.ema(**({'decay': DECAY} | kw))

    def calls(s, u, p):
      for _ in range(steps_per_call):  # update_every=k: time k steps
        s = tx.update(u, s, p)[1]
      return s

    return jax_runner(name, calls, tx.init(tree.params), tree.updates,
                      tree.params, unit=tree.unit,
                      steps_per_call=steps_per_call)
  return build


option_impl('skip_nonfinite=False', baseline=True)(
    _option('skip_nonfinite=False', skip_nonfinite=False))
option_impl('skip_nonfinite=True (default)')(
    _option('skip_nonfinite=True (default)'))
option_impl('debias=True')(_option('debias=True', debias=True))
option_impl('update_every=4')(
    _option('update_every=4', steps_per_call=4, update_every=4))
option_impl('pack=True')(_option('pack=True', pack=True))


# ------------------------------------------------- TRAIN: jitted Adam step
# Builders take a `trees.TrainProblem` and return a runner of one donated
# step of the whole train state.


def _adam():
  return optax.adam(1e-3)


def _train_runner(problem, name, tx):
  def step(carry, x, y):
    p, s = carry
    g = jax.grad(problem.loss)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  params = problem.fresh_params()
  return jax_runner(name, step, (params, tx.init(params)), problem.x,
                    problem.y, unit=problem.unit)


@train_impl('adam', baseline=True)
def _train_adam(problem):
  return _train_runner(problem, 'adam', _adam())


@train_impl('adam + emax.ema')
def _train_emax(problem):
  return _train_runner(problem, 'adam + emax.ema',
                       optax.chain(_adam(), emax.ema(DECAY)))


@train_impl('adam + emax.ema(skip_nonfinite=False)')
def _train_emax_unguarded(problem):
  return _train_runner(
      problem, 'adam + emax.ema(skip_nonfinite=False)',
      optax.chain(_adam(), emax.ema(DECAY, skip_nonfinite=False)))


# With gradient clipping in the chain: the guard's signal for free. The
# norm `optax.clip_by_global_norm` computes is the same `optax.global_norm`
# the step passes as `finite=`, so XLA computes it once (tests/test_hlo.py).


def _clip_adam():
  return optax.chain(optax.clip_by_global_norm(1.0), _adam())


@train_impl('clip + adam')
def _train_clip_adam(problem):
  return _train_runner(problem, 'clip + adam', _clip_adam())


@train_impl('clip + adam + emax.ema(skip_nonfinite=False)', base='clip + adam')
def _train_clip_unguarded(problem):
  return _train_runner(
      problem, 'clip + adam + emax.ema(skip_nonfinite=False)',
      optax.chain(_clip_adam(), emax.ema(DECAY, skip_nonfinite=False)))


@train_impl('clip + adam + emax.ema, finite= the norm', base='clip + adam')
def _train_clip_finite(problem):
  tx = optax.chain(_clip_adam(), emax.ema(DECAY))

  def step(carry, x, y):
    p, s = carry
    g = jax.grad(problem.loss)(p, x, y)
    u, s = tx.update(g, s, p, finite=jnp.isfinite(optax.global_norm(g)))
    return optax.apply_updates(p, u), s

  params = problem.fresh_params()
  return jax_runner('clip + adam + emax.ema, finite= the norm', step,
                    (params, tx.init(params)), problem.x, problem.y,
                    unit=problem.unit)


@train_impl('adam + optax.incremental_update')
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
  return jax_runner('adam + optax.incremental_update', step,
                    (params, tx.init(params), problem.fresh_params()),
                    problem.x, problem.y, unit=problem.unit)


# =====================================================================
# HOOKS: rows of features that land with the core rewrite. Each is guarded
# by feature detection (`requires`): before the API exists the row is
# skipped with the printed reason; once it exists the row appears by itself.
# Add new feature rows here, the same way.
# =====================================================================

_ROUNDING = needs('ema', 'rounding')


@update_impl("emax.update rounding='lerp' skip_nonfinite=False",
             requires=needs('update', 'rounding'))
def _emax_update_lerp(tree):
  return jax_runner("emax.update rounding='lerp' skip_nonfinite=False",
                    lambda s, p: emax.update(s, p, DECAY, rounding='lerp',
                                             skip_nonfinite=False),
                    emax.init(tree.params), tree.params, unit=tree.unit)


option_impl("rounding='lerp'", requires=_ROUNDING)(
    _option("rounding='lerp'", rounding='lerp'))
option_impl("rounding='optax'", requires=_ROUNDING)(
    _option("rounding='optax'", rounding='optax'))
option_impl('step_size=1 - d (instead of decay)',
            requires=needs('ema', 'step_size'))(
                _option('step_size=1 - d (instead of decay)', decay=None,
                        step_size=1 - DECAY))


@train_impl('adam + emax.ema(rounding=\'lerp\')', requires=_ROUNDING)
def _train_emax_lerp(problem):
  return _train_runner(
      problem, "adam + emax.ema(rounding='lerp')",
      optax.chain(_adam(), emax.ema(DECAY, rounding='lerp')))


@train_impl('emax.with_ema(adam)', requires=needs('with_ema'))
def _train_with_ema(problem):
  return _train_runner(problem, 'emax.with_ema(adam)',
                       emax.with_ema(_adam(), DECAY))


# AVERAGES: K averages of one tree, pure update form. Builders take
# (tree, k). Traffic: the param read once (4 B) + K averages read and written
# (8K B): the (4 + 8K) bytes/param roofline.


def _decays(k):
  return [1 - 10.0 ** -(3 + i / 2) for i in range(k)]


@averages_impl('named averages (one state)', requires=needs('init', 'names'))
def _named(tree, k):
  names = tuple(f'a{i}' for i in range(k))
  decays = dict(zip(names, _decays(k)))
  return jax_runner(f'named averages, K={k}',
                    lambda s, p: emax.update(s, p, decays),
                    emax.init(tree.params, names=names), tree.params,
                    unit=tree.unit)


@averages_impl('named averages, skip_nonfinite=False',
               requires=needs('init', 'names'))
def _named_unguarded(tree, k):
  """The same without the NaN guard: the layout's own traffic, (4 + 8K)."""
  names = tuple(f'a{i}' for i in range(k))
  decays = dict(zip(names, _decays(k)))
  return jax_runner(f'named averages, K={k}, skip_nonfinite=False',
                    lambda s, p: emax.update(s, p, decays,
                                             skip_nonfinite=False),
                    emax.init(tree.params, names=names), tree.params,
                    unit=tree.unit)


@averages_impl('K separate averages (K emax.update)', baseline=True)
def _separate(tree, k):
  decays = _decays(k)
  states = tuple(emax.init(tree.params) for _ in range(k))
  return jax_runner(
      f'K separate averages, K={k}',
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
