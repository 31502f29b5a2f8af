"""An EMA step adds no collective beyond one scalar all-reduce (the NaN
guard's flag), whatever the sharding: counted in the compiled HLO of a whole
optimizer step on a 2x4 mesh of CPU devices, for implicit NamedSharding,
explicit mesh axes, FSDP and tensor-parallel specs, shard_map, pack=True and
named averages."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import emax

COLLECTIVE = re.compile(
    r'= (\S+|\([^)]*\)) (all-gather|all-reduce|collective-permute|all-to-all'
    r'|reduce-scatter|collective-broadcast)(-start)?\(')

SCALARS = re.compile(r'\(?(pred|[subf]\w*)\[\](, (pred|[subf]\w*)\[\])*\)?')

FSDP = {'w1': P('data', 'model'), 'w2': P('model', None), 'b': P('model'),
        's': P()}
TENSOR_PARALLEL = {'w1': P(None, 'model'), 'w2': P('model', None),
                   'b': P('model'), 's': P()}
SHAPES = {'w1': (16, 32), 'w2': (32, 16), 'b': (32,), 's': ()}


def _mesh(axis_type=AxisType.Auto):
  return jax.make_mesh((2, 4), ('data', 'model'),
                       axis_types=(axis_type, axis_type))


def _params(mesh, specs):
  return {k: jax.device_put(jnp.linspace(-1.0, 1.0, int(np.prod(s))
                                         ).reshape(s),
                            NamedSharding(mesh, specs[k]))
          for k, s in SHAPES.items()}


def _collectives(compiled):
  return [(m.group(1), m.group(2)) for m in COLLECTIVE.finditer(
      compiled.as_text())]


def _assert_only_the_flag(found, guard=True):
  """No collective but all-reduces of scalars; none without the guard."""
  if not guard:
    assert found == [], found
    return
  assert found, 'the guard flag of sharded params needs an all-reduce'
  for result_type, op in found:
    assert op == 'all-reduce' and SCALARS.fullmatch(result_type), found


def _step_collectives(params, tx):
  grads = jax.tree.map(jnp.ones_like, params)
  with jax.numpy_dtype_promotion('standard'):  # optax.adamw needs it
    return _collectives(jax.jit(tx.update).lower(
        grads, tx.init(params), params).compile())


@pytest.mark.parametrize('specs', [FSDP, TENSOR_PARALLEL],
                         ids=['fsdp', 'tensor-parallel'])
@pytest.mark.parametrize('kw', [{}, {'pack': True},
                                {'debias': True, 'update_every': 2},
                                {'skip_nonfinite': False}],
                         ids=['default', 'pack', 'debias', 'no-guard'])
def test_implicit_sharding_adds_only_the_flag(specs, kw):
  params = _params(_mesh(), specs)
  tx = optax.chain(optax.adamw(1e-3),
                   emax.ema(emax.tf_decay(0.999), **kw))
  _assert_only_the_flag(_step_collectives(params, tx),
                        kw.get('skip_nonfinite', True))


def test_named_averages_and_with_ema_add_only_the_flag():
  params = _params(_mesh(), FSDP)
  tx = emax.with_ema(optax.adamw(1e-3), {'fast': 0.99, 'slow': 0.999})
  _assert_only_the_flag(_step_collectives(params, tx))


def test_explicit_mesh_axes_add_only_the_flag():
  mesh = _mesh(AxisType.Explicit)
  with jax.set_mesh(mesh):
    params = _params(mesh, FSDP)
    tx = optax.chain(optax.adamw(1e-3), emax.ema(0.999, debias=True))
    _assert_only_the_flag(_step_collectives(params, tx))


def test_shard_map_adds_only_the_flag():
  mesh = _mesh()
  params = _params(mesh, FSDP)
  tx = emax.ema(0.999)
  state = tx.init(params)
  specs = dict(FSDP)
  state_specs = jax.tree.map(lambda _: P(), state)
  state_specs = state_specs._replace(average=specs)

  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(specs, state_specs, specs),
                     out_specs=(specs, state_specs))
  def step(updates, state, params):
    return tx.update(updates, state, params)

  grads = jax.tree.map(jnp.ones_like, params)
  found = _collectives(jax.jit(step).lower(grads, state, params).compile())
  _assert_only_the_flag(found)
  # And every shard agrees: a NaN on one shard skips the step everywhere.
  bad = dict(params, w1=params['w1'].at[0, 0].set(jnp.nan))
  _, new = jax.jit(step)(grads, state, bad)
  assert int(new.skipped) == 1
