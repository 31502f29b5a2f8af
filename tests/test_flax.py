"""emax.flax: EmaTrainState, batch_stats policies, recompute_batch_stats."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import emax
import emax.flax
from flax_testlib import DECAY, MODEL, STEP, data, make_state, run

STEPS = 4


def host(tree):
  return jax.tree.map(np.array, tree)


def lerp(avg, new, decay=DECAY):
  """tf.train.ExponentialMovingAverage's step, in float32 numpy."""
  one_minus = np.float32(1 - decay)
  return jax.tree.map(lambda a, p: a - one_minus * (a - p), avg, new)


def assert_trees_close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
      a, b)))


@pytest.fixture(scope='module')
def trained():
  """The CNN trained STEPS steps, with a hand-tracked reference average."""
  state = make_state()
  first = host(state.eval_variables())
  start = host({'params': state.params, 'batch_stats': state.batch_stats})
  ref = start
  x, y = data()
  donated = []
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # e.g. "donated buffers were not usable"
    for i in range(STEPS):
      old_leaf = jax.tree.leaves(state.params)[0]
      state = STEP(state, x[i], y[i])
      donated.append(old_leaf.is_deleted())
      ref = lerp(ref, host({'params': state.params,
                            'batch_stats': state.batch_stats}))
  return dict(state=state, first=first, start=start, ref=ref,
              donated=donated)


def test_step0_eval_variables_are_a_copy(trained):
  assert_trees_equal(trained['first'], trained['start'])


def test_eval_variables_hold_the_average(trained):
  state = trained['state']
  got = host(state.eval_variables())
  assert_trees_close(got, trained['ref'], rtol=1e-5, atol=1e-6)
  assert int(emax.get_ema_state(state.opt_state).count) == STEPS
  assert int(state.step) == STEPS
  # After training, the average is not the raw params / live statistics.
  assert max_diff(got['params'], state.params) > 1e-3
  assert max_diff(got['batch_stats'], state.batch_stats) > 1e-3
  assert_trees_equal(got['params'], host(state.ema_params))
  x, _ = data()
  logits = MODEL.apply(state.eval_variables(), x[0], train=False)
  assert logits.shape == (8, 3) and bool(jnp.all(jnp.isfinite(logits)))


def test_state_is_donated(trained):
  assert all(trained['donated'])


def test_copy_policy_evaluates_with_live_batch_stats():
  state = run(make_state(policy='copy'), 0, 2)
  assert state.batch_stats_ema is None
  got = state.eval_variables()
  assert_trees_equal(got['batch_stats'], state.batch_stats)
  assert_trees_equal(got['params'], emax.ema_params(state.opt_state))
  assert max_diff(got['params'], state.params) > 1e-3


def test_multisteps_average_moves_once_per_real_step():
  ema = emax.ema(DECAY)
  tx = optax.MultiSteps(optax.chain(optax.sgd(0.1), ema), every_k_schedule=2)
  state = make_state(ema=ema, tx=tx)
  ref = host({'params': state.params, 'batch_stats': state.batch_stats})
  x, y = data()
  # optax.MultiSteps itself multiplies a bool by an int32, which strict dtype
  # promotion (on in these tests) refuses; emax's part is strict-clean.
  with jax.numpy_dtype_promotion('standard'):
    for i in range(4):
      before = host(state.params)
      state = STEP(state, x[i], y[i])
      after = host({'params': state.params, 'batch_stats': state.batch_stats})
      if i % 2 == 0:  # a micro-step: params still, the average must not move
        assert_trees_equal(after['params'], before)
      else:
        assert max_diff(after['params'], before) > 0
        ref = lerp(ref, after)
  assert int(emax.get_ema_state(state.opt_state).count) == 2
  assert int(state.batch_stats_ema.count) == 2
  assert_trees_close(host(state.eval_variables()), ref, rtol=1e-5, atol=1e-6)


def test_multisteps_without_the_average_inside_is_refused():
  with pytest.raises(ValueError, match=r'MultiSteps without the average.*'
                     r'optax.MultiSteps\(optax.chain\(opt, ema\), k\)'):
    make_state(tx=optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2))


class Linear(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(x)


def test_plain_train_state_route_matches_ema_train_state():
  model = Linear()
  x = jnp.arange(6.0, dtype=jnp.float32).reshape(3, 2)
  params = model.init(jax.random.key(0), x)['params']
  plain = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=optax.chain(optax.sgd(0.1), emax.ema(0.5)))
  ours = emax.flax.EmaTrainState.create(
      apply_fn=model.apply, params=jax.tree.map(jnp.copy, params),
      tx=optax.sgd(0.1), ema=emax.ema(0.5))
  assert ours.eval_variables().keys() == {'params'}

  def step(state):
    grads = jax.grad(lambda p: jnp.sum(state.apply_fn({'params': p}, x)**2))(
        state.params)
    return state.apply_gradients(grads=grads)

  step = jax.jit(step, donate_argnums=0)
  ref = host(params)
  for _ in range(3):
    plain, ours = step(plain), step(ours)
    ref = lerp(ref, host(plain.params), 0.5)
  assert_trees_equal(plain.params, ours.params)
  assert_trees_equal(emax.ema_params(plain.opt_state), ours.ema_params)
  assert_trees_close(host(ours.ema_params), ref, rtol=1e-6)
  assert max_diff(ours.ema_params, ours.params) > 1e-3


def test_create_validates_its_arguments():
  params = {'w': jnp.ones(2)}
  kw = dict(apply_fn=None, params=params, tx=optax.sgd(0.1))
  with pytest.raises(TypeError, match='expected ema to be an emax.ema'):
    emax.flax.EmaTrainState.create(ema=0.99, **kw)
  with pytest.raises(ValueError, match='state is not an emax.EmaState'):
    emax.flax.EmaTrainState.create(ema=optax.sgd(0.1), **kw)
  with pytest.raises(ValueError, match=r"batch_stats_policy must be one of.*"
                     r"got 'median'"):
    emax.flax.EmaTrainState.create(ema=emax.ema(0.9),
                                   batch_stats_policy='median', **kw)
  with pytest.raises(ValueError, match='already holds 2 emax averages'):
    emax.flax.EmaTrainState.create(
        apply_fn=None, params=params, ema=emax.ema(0.9),
        tx=optax.chain(emax.ema(0.9), emax.ema(0.8)))
  # A policy without batch_stats is fine: there is nothing to average.
  state = emax.flax.EmaTrainState.create(ema=emax.ema(0.9),
                                         batch_stats_policy='copy', **kw)
  with pytest.raises(ValueError, match='created without them'):
    state.apply_gradients(grads=params, batch_stats={'mean': jnp.ones(2)})


class TinyBN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(2)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)


def test_recompute_batch_stats_matches_hand_computation():
  model = TinyBN()
  rng = np.random.default_rng(1)
  batches = rng.normal(size=(3, 5, 2)).astype(np.float32) * 2 + 1
  variables = model.init(jax.random.key(0), jnp.asarray(batches[0]),
                         train=False)
  variables = {'params': variables['params'],
               'batch_stats': jax.tree.map(lambda s: s + 7.0,
                                           variables['batch_stats'])}
  new = emax.flax.recompute_batch_stats(model.apply, variables,
                                        jnp.asarray(batches), train=True)
  kernel = np.asarray(variables['params']['Dense_0']['kernel'], np.float64)
  bias = np.asarray(variables['params']['Dense_0']['bias'], np.float64)
  h = batches.astype(np.float64) @ kernel + bias  # (3, 5, 2)
  means = h.mean(axis=1)
  variances = ((h - means[:, None]) ** 2).mean(axis=1)
  stats = new['batch_stats']['BatchNorm_0']
  np.testing.assert_allclose(stats['mean'], means.mean(0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(stats['var'], variances.mean(0), rtol=1e-5)
  assert_trees_equal(new['params'], variables['params'])
  # Without train=True the model uses running averages: a clear error.
  with pytest.raises(ValueError, match='did not compute batch statistics.*'
                     'train=True'):
    emax.flax.recompute_batch_stats(model.apply, variables,
                                    jnp.asarray(batches), train=False)
  with pytest.raises(ValueError, match='expected variables with a'
                     ' "batch_stats" collection'):
    emax.flax.recompute_batch_stats(model.apply,
                                    {'params': variables['params']},
                                    jnp.asarray(batches), train=True)


def test_recompute_batch_stats_on_the_cnn_with_dropout(trained):
  x, _ = data()
  variables = trained['state'].eval_variables()
  new = emax.flax.recompute_batch_stats(
      MODEL.apply, variables, x, train=True,
      rngs={'dropout': jax.random.key(3)})
  # BatchNorm comes before Dropout: the mean is the mean of the conv outputs
  # over all batches, computed here with the model's own conv.
  conv = nn.Conv(4, (3, 3))
  h = conv.apply({'params': variables['params']['Conv_0']},
                 x.reshape(-1, 6, 6, 1))
  np.testing.assert_allclose(new['batch_stats']['BatchNorm_0']['mean'],
                             np.asarray(h).mean(axis=(0, 1, 2)), rtol=1e-4,
                             atol=1e-5)
