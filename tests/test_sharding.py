"""The average on 1-D and 2-D meshes: shardings kept, no collectives, memory.

Runs on the 8 fake CPU devices that conftest.py asks for.
"""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import emax

F32 = jnp.float32
COLLECTIVE = re.compile(
    r'= (\S+|\([^)]*\)) (all-gather|all-reduce|collective-permute|all-to-all'
    r'|reduce-scatter|collective-broadcast)(-start)?\(')

# name -> (shape, dtype, spec on the 2-D mesh, spec on the 1-D mesh)
LEAVES = {
    'w': ((8, 16), F32, P('data', 'model'), P('data', None)),  # FSDP x TP
    'b': ((16,), F32, P('model'), P('data')),
    'flat': ((32,), jnp.bfloat16, P(('data', 'model')), P('data')),
    'scalar': ((), F32, P(), P()),
    'step': ((8,), jnp.int32, P('data'), P()),
}


def _mesh(ndim, axis_type):
  if ndim == 1:
    return jax.make_mesh((8,), ('data',), axis_types=(axis_type,))
  return jax.make_mesh((2, 4), ('data', 'model'), axis_types=(axis_type,) * 2)


def _params(mesh, offset=0.0):
  col = 2 if len(mesh.axis_names) == 2 else 3
  out = {}
  for i, (name, spec) in enumerate(LEAVES.items()):
    shape, dtype = spec[0], spec[1]
    value = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    value = (value / 7.0 + i + offset).astype(dtype)
    out[name] = jax.device_put(value, NamedSharding(mesh, spec[col]))
  out['none'] = None
  return out


def _new_params(params):
  """Float leaves moved, int leaves advanced: what a train step does."""
  return jax.tree.map(
      lambda x: (x * 0.5 - 1.0).astype(x.dtype) if jnp.issubdtype(
          x.dtype, jnp.floating) else x + 1, params)


def _grads(params):
  """Ones for float params, None (no update) for the others."""
  return jax.tree.map(
      lambda x: jnp.ones_like(x) if jnp.issubdtype(x.dtype, jnp.floating)
      else None, params)


def _assert_sharded_like(tree, params):
  for name, leaf in tree.items():
    if params[name] is None:
      assert leaf is None
      continue
    p = params[name]
    assert leaf.sharding.is_equivalent_to(p.sharding, p.ndim), (
        name, leaf.sharding, p.sharding)
    assert leaf.sharding.memory_kind == p.sharding.memory_kind
    assert [s.data.shape for s in leaf.addressable_shards] == [
        s.data.shape for s in p.addressable_shards], name


def _collectives(compiled_text):
  """(result type, op) of every collective in compiled HLO text."""
  return [(m.group(1), m.group(2)) for m in COLLECTIVE.finditer(
      compiled_text)]


MESHES = [pytest.param((n, t), id=f'{n}d-{t.name}')
          for n in (1, 2) for t in (AxisType.Auto, AxisType.Explicit)]


@pytest.fixture(params=MESHES, scope='module')
def mesh(request):
  return _mesh(*request.param)


def test_pure_functions_keep_sharding(mesh):
  debias = mesh.axis_types[0] == AxisType.Explicit  # both, over the meshes
  with jax.set_mesh(mesh):
    params = _params(mesh)
    new = _new_params(params)
    eager = (functools.partial(emax.init, debias=debias), emax.update,
             emax.ema_params)
    jitted = tuple(jax.jit(f) for f in eager)
    for init, update, ema_params in (eager, jitted):
      state = init(params)
      _assert_sharded_like(state.average, params)
      stepped = update(state, new, 0.75)
      _assert_sharded_like(stepped.average, params)
      averaged = ema_params(stepped)
      _assert_sharded_like(averaged, params)
      # Values: one hand-computed step (weight 1 - 0.75 = 0.25 if debiased).
      w = np.float32(np.asarray(params['w']))
      w_new = np.float32(np.asarray(new['w']))
      want = w_new if debias else 0.75 * w + 0.25 * w_new
      np.testing.assert_allclose(np.asarray(averaged['w']), want, rtol=1e-6,
                                 atol=1e-6)
      np.testing.assert_array_equal(np.asarray(averaged['step']),
                                    np.asarray(new['step']))


@pytest.mark.parametrize('kw', [{}, {'debias': True, 'update_every': 2,
                                     'start_step': 1}])
def test_transform_keeps_sharding_under_jit_and_eagerly(mesh, kw):
  tx = optax.chain(optax.sgd(0.1), emax.ema(0.9, **kw))
  with jax.set_mesh(mesh):
    params = _params(mesh)
    grads = _grads(params)
    opt_state = tx.init(params)
    _assert_sharded_like(emax.get_ema_state(opt_state).average, params)
    step = jax.jit(tx.update)
    _, eager = tx.update(grads, opt_state, params)
    _, jitted = step(grads, opt_state, params)
    for s in (eager, jitted):
      _assert_sharded_like(emax.get_ema_state(s).average, params)
      _assert_sharded_like(emax.ema_params(s), params)
    _assert_sharded_like(jax.jit(emax.ema_params)(jitted), params)
    np.testing.assert_allclose(np.asarray(emax.ema_params(eager)['w']),
                               np.asarray(emax.ema_params(jitted)['w']))


@pytest.mark.parametrize('kw', [{}, {'update_every': 4, 'start_step': 2,
                                     'debias': True}])
def test_compiled_update_has_no_collective(mesh, kw):
  tx = optax.chain(optax.sgd(1e-3),
                   emax.ema(emax.tf_decay(0.99), skip_nonfinite=False, **kw))
  with jax.set_mesh(mesh):
    params = _params(mesh)
    opt_state = tx.init(params)
    hlo = jax.jit(tx.update).lower(_grads(params), opt_state, params).compile()
    assert _collectives(hlo.as_text()) == []
    if not kw:
      state = emax.init(params)
      update = functools.partial(emax.update, skip_nonfinite=False)
      hlo = jax.jit(update).lower(state, params, 0.9).compile()
      assert _collectives(hlo.as_text()) == []


def test_nan_guard_costs_only_scalar_all_reduces():
  # The default skip_nonfinite=True asks "is every new param finite?", a
  # reduction over all shards: XLA reduces each shard locally (a sum of
  # x - x, zero or NaN), then all-reduces scalars. Never a gather of params.
  mesh = _mesh(2, AxisType.Explicit)
  tx = emax.ema(0.9)
  with jax.set_mesh(mesh):
    params = _params(mesh)
    hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile()
  found = _collectives(hlo.as_text())
  assert found, 'a sharded all-finite check needs an all-reduce'
  for result_type, op in found:
    assert op == 'all-reduce', (result_type, op)
    # Scalars (or a tuple of scalars): one value per reduction, no array.
    assert re.fullmatch(r'\(?(pred|[bf]\w*)\[\](, (pred|[bf]\w*)\[\])*\)?',
                        result_type), result_type


def _bytes_per_device(tree):
  out = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] += shard.data.nbytes
  return out


def test_average_costs_each_device_what_the_params_cost(mesh):
  with jax.set_mesh(mesh):
    params = {k: v for k, v in _params(mesh).items()
              if v is not None and v.dtype != jnp.bfloat16}
    tx = emax.ema(0.9, debias=True)
    _, opt_state = jax.jit(tx.update)(params, tx.init(params), params)
    per_device = _bytes_per_device(params)
    assert len(per_device) == 8
    assert _bytes_per_device(opt_state.average) == per_device
    # The fully sharded 'w' costs each device 1/8 (2-D) or 1/8 (1-D rows).
    w_shards = {s.data.nbytes for s in opt_state.average['w'].addressable_shards}
    assert w_shards == {8 * 16 * 4 // 8}


def test_bf16_params_cost_twice_in_the_float32_accumulator(mesh):
  with jax.set_mesh(mesh):
    params = {'flat': _params(mesh)['flat']}
    state = emax.init(params)
    assert state.average['flat'].dtype == F32
    params_bytes = _bytes_per_device(params)
    assert _bytes_per_device(state.average) == {
        d: 2 * b for d, b in params_bytes.items()}


def test_the_nan_guard_is_global_inside_shard_map():
  """Inside `shard_map` each shard sees its own slice of the params; the
  guard's flag is all-reduced over the axes it varies on, so a NaN in one
  shard leaves every shard's average unchanged (all or nothing), and a
  finite step equals the unsharded update bit for bit."""
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))
  params = {'w': jnp.arange(32.0), 'b': jnp.ones(())}
  new = {'w': jnp.arange(32.0) * 1.5 + 1.0, 'b': jnp.full((), 3.0)}
  bad = {'w': new['w'].at[3].set(jnp.nan), 'b': new['b']}
  state = emax.init(params)
  spec = jax.tree.map(lambda x: P('data') if x.ndim else P(), state)
  pspec = {'w': P('data'), 'b': P()}
  put = lambda tree, specs: jax.tree.map(  # noqa: E731
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)
  step = jax.jit(jax.shard_map(lambda s, p: emax.update(s, p, 0.9),
                               mesh=mesh, in_specs=(spec, pspec),
                               out_specs=spec))
  sharded = put(state, spec)
  skipped = step(sharded, put(bad, pspec))
  assert int(skipped.skipped) == 1
  np.testing.assert_array_equal(jax.device_get(skipped.average['w']),
                                np.asarray(params['w']))
  np.testing.assert_array_equal(jax.device_get(skipped.average['b']), 1.0)
  moved = step(sharded, put(new, pspec))
  want = emax.update(state, new, 0.9)
  assert int(moved.skipped) == 0
  for k in params:
    np.testing.assert_array_equal(jax.device_get(moved.average[k]),
                                  np.asarray(want.average[k]))
