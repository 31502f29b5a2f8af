"""Averages of part of the params (mask=): what is stored, what is read,
against a float64 NumPy reference; with names, pack, offload, debias,
write-back, metrics, Flax, NNX and Orbax checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import emax

LR, DECAY = 0.5, 0.75


def _params():
  return {'backbone': {'w': jnp.linspace(-1.0, 1.0, 64).reshape(8, 8),
                       'b': jnp.zeros(8)},
          'adapter': {'a': jnp.full((8, 2), 0.5), 'b': jnp.zeros((2, 8))}}


MASK = {'backbone': False, 'adapter': True}


def _grads(step):
  return jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (step + 1)), _params())


def _reference(steps, debias=False):
  """float64: SGD on the grads above; the adapters averaged by TF's rule
  (or debiased from zero), the backbone not averaged (the live params)."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), _params())
  avg = jax.tree.map(np.copy, params['adapter'])
  weight = 0.0 if debias else 1.0
  if debias:
    avg = jax.tree.map(np.zeros_like, avg)
  for step in range(steps):
    grads = jax.tree.map(lambda x: np.asarray(x, np.float64), _grads(step))
    params = jax.tree.map(lambda p, g: p - LR * g, params, grads)
    avg = jax.tree.map(lambda a, p: a - (1 - DECAY) * (a - p), avg,
                       params['adapter'])
    weight = weight + (1 - DECAY) * (1 - weight)
  avg = jax.tree.map(lambda a: a / weight, avg)
  return params, {'backbone': params['backbone'], 'adapter': avg}


def _run(tx, steps):
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  for i in range(steps):
    updates, state = step(_grads(i), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


LAYOUTS = [{}, {'pack': True}, {'offload': True}, {'debias': True}]


@pytest.mark.parametrize('kw', LAYOUTS, ids=lambda kw: ','.join(kw) or 'plain')
@pytest.mark.parametrize('as_callable', [False, True])
def test_masked_average_matches_float64_reference(kw, as_callable):
  mask = (lambda p: {'backbone': jax.tree.map(lambda _: False, p['backbone']),
                     'adapter': jax.tree.map(lambda _: True, p['adapter'])}
          ) if as_callable else MASK
  tx = emax.with_ema(optax.sgd(LR), DECAY, mask=mask, **kw)
  params, state = _run(tx, 3)
  ref_params, ref_avg = _reference(3, debias=kw.get('debias', False))
  got = emax.ema_params(state, params=params)
  for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
    want = ref_avg
    for key in path:
      want = want[key.key]
    np.testing.assert_allclose(np.asarray(g), want, rtol=2e-6, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  # Outside the mask the reader hands back copies of the live params.
  np.testing.assert_array_equal(got['backbone']['w'],
                                params['backbone']['w'])
  assert got['backbone']['w'] is not params['backbone']['w']


def _bytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_a_frozen_backbone_costs_nothing():
  """The state's memory is the adapters' only (a 1M-param backbone)."""
  params = {'backbone': {'w': jnp.zeros((1000, 1000))},
            'adapter': {'a': jnp.zeros((1000, 4)), 'b': jnp.zeros((4, 1000))}}
  for kw in ({}, {'pack': True}, {'names': ('fast', 'slow')}):
    state = emax.init(params, mask=MASK, **kw)
    per_name = 2 if 'names' in kw else 1
    assert _bytes(state.average) == per_name * _bytes(params['adapter']), kw
    assert _bytes(params) > 100 * _bytes(state.average) / per_name


def test_reading_a_masked_state_needs_the_params():
  state = emax.init(_params(), mask=MASK)
  with pytest.raises(ValueError, match=r'mask=.*emax.ema_params\(state,'
                     r' params=params\)'):
    emax.ema_params(state)
  with pytest.raises(ValueError, match='params do not fit'):
    emax.ema_params(state, params={'adapter': _params()['adapter']})


@pytest.mark.parametrize('mask, match', [
    ({'backbone': False, 'adapter': 1}, 'True or False at each leaf'),
    ({'backbone': False}, 'tree of bools shaped like the params'),
    ({'backbone': False, 'adapter': False}, 'leaves every param out'),
])
def test_bad_masks_are_refused_at_init(mask, match):
  with pytest.raises((TypeError, ValueError), match=match):
    emax.ema(0.9, mask=mask).init(_params())


def test_named_averages_write_back_and_metrics_with_a_mask():
  tx = emax.with_ema(optax.sgd(LR), {'fast': 0.5, 'slow': DECAY}, mask=MASK,
                     write_back_every=2, write_back_name='slow')
  params, state = _run(tx, 2)
  _, ref_avg = _reference(2)
  # Step 2 wrote the slow average back into the adapters; the backbone
  # kept the optimizer's update.
  np.testing.assert_allclose(params['adapter']['a'], ref_avg['adapter']['a'],
                             rtol=1e-6)
  ref_params, _ = _reference(2)
  np.testing.assert_allclose(params['backbone']['w'],
                             ref_params['backbone']['w'], rtol=1e-6)
  m = emax.metrics(state, params)
  assert set(m) >= {'distance/fast', 'distance/slow'}
  assert float(m['distance/slow']) == 0.0  # just written back
  with pytest.raises(ValueError, match='do not match'):
    emax.metrics(state, {'adapter': params['adapter']})


def test_ema_train_state_fills_from_its_params():
  import flax.linen as nn
  import emax.flax

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name='adapter')(nn.Dense(4, name='backbone')(x))

  model = Model()
  params = model.init(jax.random.key(0), jnp.ones((1, 3)))['params']
  mask = {'backbone': False, 'adapter': True}
  state = emax.flax.EmaTrainState.create(
      apply_fn=model.apply, params=params,
      tx=emax.with_ema(optax.sgd(0.1), 0.5, mask=mask))
  grads = jax.tree.map(jnp.ones_like, params)
  state = jax.jit(lambda s: s.apply_gradients(grads=grads))(state)
  averaged = state.ema_params
  np.testing.assert_array_equal(averaged['backbone']['kernel'],
                                state.params['backbone']['kernel'])
  np.testing.assert_allclose(averaged['adapter']['bias'], -0.05, rtol=1e-6)
  assert jax.tree.structure(state.eval_variables()['params']) == (
      jax.tree.structure(params))
  written = state.write_back()
  np.testing.assert_array_equal(written.params['adapter']['bias'],
                                averaged['adapter']['bias'])
  with pytest.raises(ValueError, match="batch_stats_policy='copy'"):
    emax.flax.EmaTrainState.create(
        apply_fn=model.apply, params=params, tx=optax.sgd(0.1),
        ema=emax.ema(0.5, mask=mask), batch_stats={'mean': jnp.zeros(2)})


def test_checkpoint_round_trip_of_a_masked_state(tmp_path):
  import orbax.checkpoint as ocp
  import emax.checkpoint

  tx = emax.with_ema(optax.sgd(LR), DECAY, mask=MASK)
  params, state = _run(tx, 2)
  manager = ocp.CheckpointManager(tmp_path / 'ckpt')
  emax.checkpoint.save(manager, 2, state)
  manager.wait_until_finished()
  restored = emax.checkpoint.restore(manager, tx.init(_params()))
  np.testing.assert_array_equal(
      emax.ema_params(restored, params=params)['adapter']['a'],
      emax.ema_params(state, params=params)['adapter']['a'])
