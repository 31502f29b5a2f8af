"""emax.target_network_options against CleanRL's DQN loop, transcribed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import emax


def grads_at(global_step):
  """A made-up gradient for the training step at this env step."""
  rng = np.random.default_rng(global_step)
  return {'w': jnp.asarray(rng.normal(size=(3, 2)).astype(np.float32)),
          'b': jnp.asarray(rng.normal(size=2).astype(np.float32))}


PARAMS = {'w': jnp.full((3, 2), 0.25), 'b': jnp.zeros(2)}


def cleanrl_targets(learning_starts, train_frequency,
                    target_network_frequency, tau, total_env_steps,
                    incremental_update=optax.incremental_update):
  """CleanRL's dqn_jax.py loop: the target after every env step."""
  opt = optax.sgd(0.1)

  @jax.jit
  def update(params, opt_state, grads):
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state, target = PARAMS, opt.init(PARAMS), PARAMS
  targets = []
  for global_step in range(total_env_steps):
    if global_step > learning_starts:
      if global_step % train_frequency == 0:
        params, opt_state = update(params, opt_state, grads_at(global_step))
      if global_step % target_network_frequency == 0:
        target = incremental_update(params, target, tau)
    targets.append(target)
  return targets


def emax_targets(options, learning_starts, train_frequency, total_env_steps):
  tx = emax.with_ema(optax.sgd(0.1), **options)

  @jax.jit
  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = PARAMS, tx.init(PARAMS)
  targets = []
  for global_step in range(total_env_steps):
    if global_step > learning_starts and global_step % train_frequency == 0:
      params, opt_state = update(params, opt_state, grads_at(global_step))
    targets.append(emax.ema_params(opt_state))
  return targets


@pytest.mark.parametrize(
    'learning_starts, train_frequency, target_network_frequency, tau', [
        (100, 10, 500, 1.0),  # the first update on training step 40
        (0, 1, 1, 0.5),  # every env step trains and updates
        (5, 2, 6, 1.0),  # first training at env step 6: a target update
        (6, 2, 6, 0.25),  # learning_starts a multiple of the period
        (25, 4, 8, np.float32(0.1)),
        (13, 3, 12, 0.005),
    ])
def test_target_is_bitwise_with_cleanrl_loop(
    learning_starts, train_frequency, target_network_frequency, tau):
  total = learning_starts + 6 * target_network_frequency + 3
  # CleanRL calls incremental_update op by op; emax's update is jitted, and
  # XLA fuses one product of tau * new + (1 - tau) * old into a multiply-add
  # (1 ulp apart now and then). tau = 1 copies either way; for tau < 1 the
  # loop's update is jitted too, as a jitted port of it would be.
  incremental_update = (optax.incremental_update if tau == 1.0 else
                        jax.jit(optax.incremental_update, static_argnums=2))
  want = cleanrl_targets(learning_starts, train_frequency,
                         target_network_frequency, tau, total,
                         incremental_update)
  options = emax.target_network_options(
      learning_starts, train_frequency, target_network_frequency, tau)
  got = emax_targets(options, learning_starts, train_frequency, total)
  moved = 0
  for step, (g, w) in enumerate(zip(got, want)):
    for name in ('w', 'b'):
      np.testing.assert_array_equal(
          np.asarray(g[name]).view(np.uint32),
          np.asarray(w[name]).view(np.uint32),
          err_msg=f'target {name!r} after env step {step}')
    moved += bool((np.asarray(w['w']) != np.asarray(PARAMS['w'])).any())
  assert moved > 0  # the target did move


def test_a_wrong_first_update_diverges():
  # The check above is not vacuous: one training step off is visible.
  options = emax.target_network_options(100, 10, 500)
  options['first_update'] += 1
  want = cleanrl_targets(100, 10, 500, 1.0, 620)
  got = emax_targets(options, 100, 10, 620)
  assert (np.asarray(got[-1]['w']) != np.asarray(want[-1]['w'])).any()


def test_options_from_cleanrl_defaults():
  # learning_starts=10000, train_frequency=10, target_network_frequency=500:
  # env step 10500 is the 50th training step, as the default first_update.
  assert emax.target_network_options(10_000, 10, 500, 1.0) == dict(
      step_size=1.0, update_every=50, first_update=50, per_update=True,
      rounding='optax')


def test_counts_written_as_floats():
  # CleanRL writes learning_starts: int = 5e3 (a float at run time).
  assert emax.target_network_options(5e3, 1.0, 2, 0.005) == (
      emax.target_network_options(5000, 1, 2, 0.005))


@pytest.mark.parametrize('args, error, words', [
    ((100, 10, 505), ValueError, ['target_network_frequency', 'multiple',
                                   'train_frequency (10)', '500 or 510']),
    ((100, 10, 5), ValueError, ['multiple', '10 or 20']),
    ((-1, 10, 500), ValueError, ['learning_starts', '[0,']),
    ((100, 0, 500), ValueError, ['train_frequency', '[1,']),
    ((100, 10, 0), ValueError, ['target_network_frequency', '[1,']),
    ((100.5, 10, 500), TypeError, ['learning_starts must be an int']),
    ((100, True, 500), TypeError, ['train_frequency must be an int']),
    ((100, 10, 500, 1.5), ValueError, ['tau must be in [0, 1]']),
    ((100, 10, 500, '0.005'), TypeError, ['tau must be a float']),
])
def test_invalid_numbers_are_refused(args, error, words):
  with pytest.raises(error) as e:
    emax.target_network_options(*args)
  for w in words:
    assert w in str(e.value)
