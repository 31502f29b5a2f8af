"""The fast paths (packed layout, sum-first NaN guard) against the default path
and a NumPy reference; and a smoke run of the benchmark suite."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import emax
from emax import _layout

DECAYS = (0.9, 0.5, 0.99, 0.0)


def _params():
  """Odd sizes, every float dtype, scalars, non-float and None leaves."""
  rng = np.random.default_rng(0)

  def f(shape, dtype):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype)

  return {
      'odd': f((7,), jnp.float32),
      'one': f((1,), jnp.float32),
      'scalar': f((), jnp.float32),
      'mat': f((3, 11), jnp.float32),
      'bf16': f((5, 3), jnp.bfloat16),
      'f16': f((13,), jnp.float16),
      'c64': jnp.asarray(rng.standard_normal(9) + 1j * rng.standard_normal(9),
                         jnp.complex64),
      'big': f((300,), jnp.float32),  # above the pack size used below
      'int': jnp.arange(4, dtype=jnp.int32),
      'flag': jnp.array([True, False]),
      'none': None,
  }


PACK = 64  # leaves of at most 64 elements are packed: all but 'big'


def _packed_names(state, params):
  names = [path[0].key for path, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  return {names[i] for g in state.average.layout.groups for i in g}


def _numpy_ema(params_seq, decays, debias=False):
  """The average as TensorFlow defines it, in float32 NumPy (float leaves)."""
  def acc(x):
    x = np.asarray(x)
    return x.astype(np.complex64 if np.iscomplexobj(x) else np.float32)

  avg = {k: (acc(v) * 0 if debias else acc(v))
         for k, v in params_seq[0].items()
         if v is not None and jnp.issubdtype(v.dtype, jnp.inexact)}
  weight = np.float32(0 if debias else 1)
  for p, d in zip(params_seq[1:], decays):
    c = np.float32(1) - np.float32(d)
    for k in avg:
      avg[k] = avg[k] - c * (avg[k] - acc(p[k]))
    weight = weight - c * (weight - np.float32(1))
  return {k: v / weight if weight else v for k, v in avg.items()}


def _steps(params):
  out = [params]
  for i in range(len(DECAYS)):
    out.append(jax.tree.map(
        lambda x, i=i: x + jnp.asarray(0.25 * (i + 1), x.dtype)
        if jnp.issubdtype(x.dtype, jnp.inexact) else x + 1
        if x.dtype != jnp.bool_ else ~x, out[-1]))
  return out


@pytest.mark.parametrize('debias', [False, True])
def test_packed_update_equals_default_and_numpy(debias):
  seq = _steps(_params())
  step = jax.jit(emax.update, donate_argnums=0)
  plain = emax.init(seq[0], debias=debias)
  packed = emax.init(seq[0], debias=debias, pack=PACK)
  assert isinstance(packed.average, _layout.PackedTree)
  assert _packed_names(packed, seq[0]) == {'odd', 'one', 'scalar', 'mat', 'bf16', 'f16', 'c64'}
  for p, d in zip(seq[1:], DECAYS):
    plain = step(plain, p, jnp.float32(d))
    packed = step(packed, p, jnp.float32(d))
  a, b = emax.ema_params(plain), emax.ema_params(packed)
  assert jax.tree.structure(a) == jax.tree.structure(seq[0])
  for k in a:
    if a[k] is None:
      assert b[k] is None
      continue
    assert a[k].dtype == b[k].dtype == seq[0][k].dtype
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
  ref = _numpy_ema(seq, DECAYS, debias)
  for k, v in ref.items():
    tol = dict(bf16=1e-2, f16=1e-3).get(k, 1e-6)
    np.testing.assert_allclose(
        np.asarray(b[k]).astype(v.dtype), v.astype(np.asarray(b[k]).dtype),
        rtol=tol, atol=tol)
  np.testing.assert_array_equal(b['int'], seq[-1]['int'])
  np.testing.assert_array_equal(b['flag'], seq[-1]['flag'])
  assert float(plain.weight) == float(packed.weight)


def test_packed_transform_matches_plain_with_every_option():
  params = _params()
  grads = jax.tree.map(
      lambda x: jnp.ones_like(x)
      if jnp.issubdtype(x.dtype, jnp.inexact) else None, params)
  nan = jax.tree.map(lambda g: g * jnp.asarray(jnp.nan, g.dtype), grads)
  states = []
  for pack in (False, PACK):
    tx = optax.chain(optax.sgd(0.1), emax.ema(
        emax.tf_decay(0.9), debias=True, update_every=2, start_step=1,
        pack=pack))
    state, p = tx.init(params), params

    @jax.jit
    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return jax.tree.map(
          lambda p, u: p if u is None or p is None else (p + u).astype(p.dtype),
          p, u, is_leaf=lambda x: x is None), s

    for g in (grads, grads, grads, nan, grads):  # step 4 averages
      new_p, state = step(p, state, g)
      if g is grads:
        p = new_p
    states.append(emax.get_ema_state(state))
  plain, packed = states
  assert isinstance(packed.average, _layout.PackedTree)
  assert int(packed.skipped) == int(plain.skipped) == 1
  assert int(packed.count) == int(plain.count) == 5
  assert float(packed.weight) == float(plain.weight)
  for a, b in zip(jax.tree.leaves(emax.ema_params(plain)),
                  jax.tree.leaves(emax.ema_params(packed))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_and_replicated_leaves_are_never_packed():
  mesh = jax.make_mesh((8,), ('x',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  sharded = NamedSharding(mesh, P('x'))
  replicated = NamedSharding(mesh, P())
  params = {
      'sharded': jax.device_put(jnp.arange(16.0), sharded),
      'replicated': jax.device_put(jnp.ones(8), replicated),
      'local': jnp.ones(8),
      'local2': jnp.full((2, 3), 2.0),
  }
  state = emax.init(params, pack=True)
  abstract = jax.eval_shape(lambda p: emax.init(p, pack=True), params)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  assert _packed_names(state, params) == {'local', 'local2'}
  new = jax.tree.map(lambda x: x * 3, params)
  state = jax.jit(emax.update)(state, new, 0.5)
  avg = emax.ema_params(state)
  assert avg['sharded'].sharding == sharded
  assert avg['replicated'].sharding.is_equivalent_to(replicated, 1)
  for leaf in state.average.rest:
    assert (leaf.sharding.is_equivalent_to(sharded, 1)
            or leaf.sharding.is_equivalent_to(replicated, 1))
  for k, x in params.items():
    np.testing.assert_allclose(avg[k], np.asarray(x) * 2)


def test_packed_state_checkpoints_and_scans(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  params = _params()
  tx = emax.ema(0.5, pack=PACK)
  state = tx.init(params)

  ones = jax.tree.map(
      lambda x: jnp.ones_like(x)
      if jnp.issubdtype(x.dtype, jnp.inexact) else None, params)

  def body(s, _):
    return tx.update(ones, s, params)[1], None

  state, _ = jax.jit(lambda s: lax.scan(body, s, length=3))(state)
  assert int(state.count) == 3
  path = tmp_path / 'ckpt'
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, state)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(path, jax.eval_shape(tx.init, params))
  assert isinstance(restored.average, _layout.PackedTree)
  for a, b in zip(jax.tree.leaves(emax.ema_params(state)),
                  jax.tree.leaves(emax.ema_params(restored))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # 0.5 ** 3 of the start, the rest at params + 1.
  np.testing.assert_allclose(emax.ema_params(restored)['odd'],
                             params['odd'] + 0.875, rtol=1e-6)


def test_nan_guard_is_exact_for_sums_that_overflow():
  tx = emax.ema(0.5)
  huge = {'w': jnp.full((4,), 3e38, jnp.float32)}  # finite; its sum is inf
  state = tx.init(huge)
  zero = {'w': jnp.zeros(4)}
  _, state = jax.jit(tx.update)(zero, state, huge)
  assert int(state.skipped) == 0
  for bad in (jnp.inf, -jnp.inf, jnp.nan):
    _, s = jax.jit(tx.update)({'w': zero['w'].at[2].set(bad)}, state, huge)
    assert int(s.skipped) == 1
    np.testing.assert_array_equal(s.average['w'], state.average['w'])


def test_pack_errors():
  with pytest.raises(ValueError, match='pack must be False, True or the'):
    emax.init({'w': jnp.ones(2)}, pack=-3)
  with pytest.raises(ValueError, match='pack must be False, True or the'):
    emax.ema(0.9, pack='yes')


def test_pack_without_small_leaves_is_the_plain_tree():
  state = emax.init({'w': jnp.ones(100)}, pack=10)
  assert isinstance(state.average, dict)


def test_benchmark_smoke(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parents[1]))
  from benchmarks import run  # pylint: disable=g-import-not-at-top
  result = run.main(['--smoke', '--no-torch', '--out', str(tmp_path)])
  data = json.loads((tmp_path / 'smoke.json').read_text())
  cases = {r['case'] for r in data['updates']}
  assert len(cases) == 6
  impls = {r['impl'] for r in data['updates']}
  assert {'emax.update', 'emax.update pack=True', 'tree.map lerp, donated',
          'tree.map lerp, not donated', 'optax.incremental_update',
          'optax.ema on params'} <= impls
  for r in data['updates']:
    assert r['min_ms'] <= r['median_ms'] <= r['max_ms']
    assert r['steady_units'] >= 2
  assert {r['impl'] for r in data['options']} >= {
      'skip_nonfinite=False', 'debias=True', 'update_every=4'}
  assert len(data['train']) == 4
  md = (tmp_path / 'smoke.md').read_text()
  assert '| tree | implementation |' in md and 'Targets:' in md
  assert result['ceiling']['gbps'] > 0
