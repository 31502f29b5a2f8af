"""emax against its peers, with the settings that docs/migrating.md gives.

Every test runs emax with the setting the docs name for one peer, on the
inputs of ``tests/peer_numbers.py`` (``params_at(t)``: the params after step
``t``), and compares the average with the peer's own:

* TensorFlow, Keras, timm, ema-pytorch and EDM2: bit patterns recorded from the
  real libraries (recipes and versions in ``peer_numbers.py``; no peer is
  needed to run these tests);
* ``optax.incremental_update``, ``flax.nnx.EMA`` and hand-written JAX
  averages: run live, next to emax, in the same process.

"Bitwise" means every bit of the 37 float32 values; "N ulp" is the largest
distance in units in the last place. Where a setting matters, the test also
shows that the other choice is measurably off, so a wrong mapping cannot pass.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import emax
import peer_numbers as pn
from peer_numbers import params_at

P = np.stack([params_at(t) for t in range(3001)])  # P[t]: the params of step t


def ulps(a, b):
  """The distance between float32 arrays in units in the last place."""
  def key(x):
    i = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
    return np.where(i < 0, -2**31 - i, i)  # monotone in the float's value
  return np.abs(key(a) - key(b))


def max_ulps(a, bits):
  return int(ulps(a, pn.from_bits(bits)).max())


def assert_bitwise(a, bits):
  want = pn.from_bits(bits)
  got = np.asarray(a, np.float32)
  differ = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
  assert differ.size == 0, (
      f'{differ.size} of {want.size} values differ (up to'
      f' {int(ulps(got, want).max())} ulp), first at {differ[:5]}')


def average(steps, *, jit=True, start=0, **options):
  """emax's state after ``emax.update(..., **options)`` on P[start+1..steps].

  ``jit=True`` runs the steps in one jitted ``lax.scan`` (fast; the target
  network tests run emax as a jitted step per call instead, with the same
  settings), ``jit=False`` calls ``emax.update`` eagerly, op by op.
  """
  state = emax.init({'w': jnp.asarray(P[start])})

  def step(state, p):
    return emax.update(state, {'w': p}, **options), None

  if jit:
    scan = jax.jit(lambda s, ps: lax.scan(step, s, ps)[0])
    return scan(state, jnp.asarray(P[start + 1:steps + 1]))
  for t in range(start + 1, steps + 1):
    state = step(state, jnp.asarray(P[t]))[0]
  return state


# --- TensorFlow and Keras -----------------------------------------------------


def test_tf1_minimize_pattern_is_tf_decay_after_minimize():
  # ExponentialMovingAverage(0.95, num_updates=global_step) applied after
  # minimize(loss, global_step) reads the incremented step; so does
  # num_updates=optimizer.iterations after apply_gradients (TF2/Keras).
  got = average(200, decay=emax.tf_decay(0.95, after_minimize=True))
  assert_bitwise(got.average['w'], pn.TF1_MINIMIZE_095)
  assert_bitwise(got.average['w'], pn.TF2_ITERATIONS_095)
  off_by_one = average(200, decay=emax.tf_decay(0.95))
  assert max_ulps(off_by_one.average['w'], pn.TF1_MINIMIZE_095) > 1000


def test_tf2_counter_pattern_is_tf_decay():
  # num_updates = the number of applies before this one (a counter).
  got = average(200, decay=emax.tf_decay(0.95))
  assert_bitwise(got.average['w'], pn.TF2_COUNTER_095)
  # Shadows created by the first apply, from params_at(1): the warm-up
  # (decay 0.1 at k = 0) forgets the start, the same bits.
  assert_bitwise(got.average['w'], pn.TF2_COUNTER_LAZY_095)
  off_by_one = average(200, decay=emax.tf_decay(0.95, after_minimize=True))
  assert max_ulps(off_by_one.average['w'], pn.TF2_COUNTER_095) > 1000


def test_tf_constant_decay_is_bitwise_with_default_rounding():
  got = average(300, decay=0.9998)
  assert_bitwise(got.average['w'], pn.TF_CONSTANT_09998)
  # float32(1 - d) instead of TensorFlow's 1 - float32(d): measured 39 ulp.
  lerp = average(300, decay=0.9998, rounding='lerp')
  assert max_ulps(lerp.average['w'], pn.TF_CONSTANT_09998) >= 30


def test_tf_zero_debias_is_debias_true():
  # TF's zero_debias (tensors only) keeps a zero-started 'biased' variable and
  # reads biased / (1 - d ** t); emax's debias=True stores the same bits and
  # divides by the weight it accumulated (same recursion as the average).
  state = emax.init({'w': jnp.asarray(P[0])}, debias=True)
  step = jax.jit(lambda s, p: emax.update(s, {'w': p}, 0.9))
  for t in range(1, 51):
    state = step(state, jnp.asarray(P[t]))
    if t in pn.TF_ZERO_DEBIAS_09_BIASED:
      assert_bitwise(state.average['w'], pn.TF_ZERO_DEBIAS_09_BIASED[t])
      read = emax.ema_params(state)['w']
      assert max_ulps(read, pn.TF_ZERO_DEBIAS_09_AVERAGE[t]) <= 2, t


@pytest.mark.parametrize('jit', [False, True])
def test_tf_on_subnormal_inputs(jit):
  # TensorFlow and XLA both flush subnormal inputs and results of arithmetic
  # to zero on CPU, so every step with a decay above 0 is bitwise with TF,
  # float32 and float64 alike.
  for dtype, uint, want in ((np.float32, np.uint32, pn.TF_TINY_09_32),
                            (np.float64, np.uint64, pn.TF_TINY_09_64)):
    with jax.enable_x64(dtype == np.float64):
      state = emax.init({'w': jnp.asarray(pn.tiny_params_at(0, dtype))})
      update = jax.jit(emax.update) if jit else emax.update
      for t in range(1, 51):
        state = update(state, {'w': jnp.asarray(pn.tiny_params_at(t, dtype))},
                       0.9)
      got = np.asarray(state.average['w'])
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.view(uint), np.asarray(want, uint))
  # A decay of exactly 0 copies the params bit for bit (docs/migrating.md),
  # where TF computes v - (v - p): that differs from p on every subnormal p
  # (flushed to zero) and can differ where v - p rounds, nowhere else.
  v, p = pn.from_bits(pn.TF_TINY_09_32), pn.tiny_decay0_params()
  update = jax.jit(emax.update) if jit else emax.update
  copied = update(emax.init({'w': jnp.asarray(v)}), {'w': jnp.asarray(p)}, 0.0)
  assert_bitwise(copied.average['w'], pn.bits(p))
  tf = pn.from_bits(pn.TF_TINY_DECAY0_32)
  differ = tf.view(np.uint32) != p.view(np.uint32)
  subnormal = (p != 0) & (np.abs(p) < np.finfo(np.float32).tiny)
  rounds = (v - p).astype(np.float64) != v.astype(np.float64) - p
  assert subnormal.any() and (differ & rounds & ~subnormal).any()
  assert np.all(differ[subnormal]) and not np.any(differ & ~subnormal & ~rounds)


def test_keras_use_ema():
  # Keras: momentum * average + (1 - momentum) * var with a float32 momentum,
  # momentum 0 on the first step (a copy).
  options = dict(decay=np.float32(0.99), rounding='optax')
  # Eagerly, op by op as Keras runs: bitwise. (start=1: the state is set to
  # P[1], what start_step=1 does, without a recompiled lax.cond per eager
  # call.)
  eager = average(300, jit=False, start=1, **options)
  assert_bitwise(eager.average['w'], pn.KERAS_USE_EMA_099)
  jitted = average(300, start_step=1, **options)  # measured 2 ulp: XLA fuses
  assert max_ulps(jitted.average['w'], pn.KERAS_USE_EMA_099) <= 4
  # Keras under tf.function(jit_compile=True) fuses otherwise: measured 8 ulp
  # from 'optax', and bit for bit from a jitted 'nnx' rounding.
  assert max_ulps(jitted.average['w'], pn.KERAS_USE_EMA_099_XLA) <= 10
  xla = average(300, start_step=1, decay=np.float32(0.99), rounding='nnx')
  assert_bitwise(xla.average['w'], pn.KERAS_USE_EMA_099_XLA)
  # A Python float decay gives float32(1 - 0.99), not 1 - float32(0.99).
  py_float = average(300, decay=0.99, rounding='optax', start_step=1)
  assert max_ulps(py_float.average['w'], pn.KERAS_USE_EMA_099) >= 10


# --- timm ModelEmaV3 ----------------------------------------------------------


def test_timm_model_ema_v3_is_bitwise_with_lerp():
  # update(model, step=num_updates): step 1 copies, then a constant decay,
  # ema.lerp_(p, 1. - decay): a float64 step size, a fused multiply-add.
  got = average(300, decay=0.9998, rounding='lerp', start_step=1)
  assert_bitwise(got.average['w'], pn.TIMM_V3_09998)
  assert_bitwise(got.average['w'], pn.TIMM_V3_09998_NOFOREACH)
  no_step = average(300, decay=0.9998, rounding='lerp')  # update(model)
  assert_bitwise(no_step.average['w'], pn.TIMM_V3_09998_NOSTEP)
  # TensorFlow's rounding (1 - float32(d), two roundings): measured 80 ulp.
  tf_rounding = average(300, decay=0.9998, start_step=1)
  assert max_ulps(tf_rounding.average['w'], pn.TIMM_V3_09998) >= 30


@pytest.mark.parametrize('bits, decay', [
    (pn.TIMM_V3_WARMUP_09998, 0.9998),
    (pn.TIMM_V3_WARMUP_POWER34_0999, 0.999),
])
def test_timm_model_ema_v3_warmup(bits, decay):
  power = 0.75 if decay == 0.999 else 2 / 3
  schedule = emax.inverse_power_decay(decay, inv_gamma=1.0, power=power)
  got = average(300, decay=schedule, rounding='lerp')
  # timm computes the warm-up in float64, emax in float32: measured 1 ulp.
  assert max_ulps(got.average['w'], bits) <= 2


# --- ema-pytorch EMA, KarrasEMA / PostHocEMA ----------------------------------


def ema_pytorch_options(beta=0.9999, update_after_step=100, update_every=10,
                        inv_gamma=1.0, power=2 / 3):
  """emax's options for ema-pytorch's EMA (as in docs/migrating.md).

  Its warm-up is computed in float32, as ema-pytorch does, and given as a
  plain callable: emax then steps by 1 - float32(decay), as ema-pytorch does.
  The shifted warm-up is NaN before ``update_after_step``, on steps that copy
  or keep: a rate those steps do not use is not checked.
  """
  ramp = emax.inverse_power_decay(beta, inv_gamma=inv_gamma, power=power)
  start = update_every * (update_after_step // update_every) + 1
  return dict(
      decay=lambda n: ramp(n - update_after_step),
      rounding='lerp', start_step=start, first_update=start + update_every,
      update_every=update_every, per_update=True)


def test_ema_pytorch_defaults():
  # EMA(model): the first call copies; calls 1, 11, 21, ... up to 101 copy
  # (update_after_step=100), then every 10th averages with the warm-up.
  options = ema_pytorch_options()
  assert (options['start_step'], options['first_update']) == (101, 111)
  got = average(3000, **options)
  assert int(got.skipped) == 0  # the NaN warm-up before step 100 is unused
  # torch's float32 pow and XLA's differ by an ulp or so: measured 8 ulp.
  assert max_ulps(got.average['w'], pn.EMA_PYTORCH_DEFAULTS_3000) <= 10
  # With per_update=False the decay would be raised to the 10th power.
  compensated = average(3000, **dict(options, per_update=False))
  assert max_ulps(compensated.average['w'],
                  pn.EMA_PYTORCH_DEFAULTS_3000) > 1000


def test_ema_pytorch_at_its_ceiling_is_bitwise():
  options = ema_pytorch_options(0.99, update_after_step=0, update_every=1,
                                power=1.0)
  got = average(300, **options)
  assert_bitwise(got.average['w'], pn.EMA_PYTORCH_BETA099_POWER1)
  assert_bitwise(got.average['w'], pn.EMA_PYTORCH_BETA099_POWER1_FOREACH)
  # The schedule itself carries the step size float32(1 - 0.99); ema-pytorch
  # steps by 1 - float32(0.99) (its decay is a float32 tensor): measured 9 ulp.
  schedule = emax.inverse_power_decay(0.99, power=1.0)
  accurate = average(300, **dict(options, decay=schedule))
  assert max_ulps(accurate.average['w'], pn.EMA_PYTORCH_BETA099_POWER1) >= 5


def karras_decay(sigma_rel):
  """KarrasEMA's beta: EDM2's power function one step later."""
  edm2 = emax.power_function_decay(sigma_rel=sigma_rel)
  return emax.Schedule(lambda n: edm2(n + 1), lambda n: edm2.step_size(n + 1),
                       f'karras_decay({sigma_rel})')


def karras_options(update_every=100):
  """KarrasEMA's timing: the first call copies, then every update_every-th."""
  return dict(rounding='lerp', start_step=1, first_update=1 + update_every,
              update_every=update_every, per_update=True)


def test_karras_gamma_is_emax_gamma():
  for sigma_rel, gamma in pn.KARRAS_GAMMA.items():
    assert emax.sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma,
                                                               rel=1e-12)


def test_karras_ema_and_post_hoc_ema_as_named_averages():
  # PostHocEMA(sigma_rels=(0.05, 0.10)) holds one KarrasEMA per width: emax
  # keeps both in one state, updated in one pass.
  state = emax.init({'w': jnp.asarray(P[0])}, names=('s005', 's010'))
  rates = {'s005': karras_decay(0.05), 's010': karras_decay(0.10)}
  step = jax.jit(lambda s, p: emax.update(s, {'w': p}, rates,
                                          **karras_options(update_every=1)))
  for t in range(1, 301):
    state = step(state, jnp.asarray(P[t]))
  # Measured 1 ulp: emax's float32 step size against beta in float64.
  assert max_ulps(emax.ema_params(state, 's005')['w'],
                  pn.KARRAS_SIGMA005_EVERY1) <= 2
  assert max_ulps(emax.ema_params(state, 's010')['w'],
                  pn.KARRAS_SIGMA010_EVERY1) <= 2
  # EDM2's own timing (one step earlier) is a different average.
  edm2 = average(300, decay=emax.power_function_decay(sigma_rel=0.05),
                 rounding='lerp')
  assert max_ulps(edm2.average['w'], pn.KARRAS_SIGMA005_EVERY1) > 100


def test_karras_ema_update_every():
  # KarrasEMA(update_every=100): call 1 copies, calls 101, 201, ... average
  # with the beta of their own step, not raised to the 100th power.
  got = average(3000, decay=karras_decay(0.10), **karras_options(100))
  assert max_ulps(got.average['w'], pn.KARRAS_SIGMA010_EVERY100_3000) <= 2


# --- EDM2 ---------------------------------------------------------------------


@pytest.mark.parametrize('bits, sigma_rel', [
    (pn.EDM2_STD0050_BATCH1, 0.05),
    (pn.EDM2_STD0100_BATCH256, 0.10),  # the decays do not depend on the batch
])
def test_edm2_power_function_ema(bits, sigma_rel):
  schedule = emax.power_function_decay(sigma_rel=sigma_rel)
  got = average(300, decay=schedule, rounding='lerp')
  assert max_ulps(got.average['w'], bits) <= 2  # measured 1 ulp


def edm2_step_size(n, gamma):
  """EDM2's power_function_beta in float64 (phema.py), as 1 - beta.

  ``t_next`` counts the current step (``cur_nimg`` after ``+= batch``): with a
  batch of one, ``n + 1`` for emax's step count ``n``.
  """
  beta = (1.0 - 1.0 / np.float64(n + 1)) ** (gamma + 1.0)
  return 1.0 - beta


@pytest.mark.parametrize('n', [10**5, 10**6, 10**7, 2**25, 2**30])
@pytest.mark.parametrize('sigma_rel', [0.05, 0.10])
def test_power_function_step_size_precision(n, sigma_rel):
  gamma = emax.sigma_rel_to_gamma(sigma_rel)
  schedule = emax.power_function_decay(gamma)
  want = edm2_step_size(n, gamma)
  got = float(schedule.step_size(n))
  assert abs(got / want - 1) < 1e-6
  if n <= 2**25:  # beyond, 1 - step rounds to 1 in float32; emax steps by
    assert float(schedule(n)) < 1.0  # the step size, so the average moves
  # The same rule computed in float32, as (1 - 1/(n+1)) ** (gamma + 1),
  # misses by 0.1% (n = 1e5) to 100% (a decay of exactly 1 from 2**25).
  f32 = np.float32
  naive = f32(1) - (f32(1) - f32(1) / f32(n + 1)) ** f32(gamma + 1)
  assert abs(float(naive) / want - 1) > 1e-4


# --- flax.nnx.EMA -------------------------------------------------------------


def nnx_ema(decay, steps, jit):
  nnx = pytest.importorskip('flax.nnx')

  class Model(nnx.Module):

    def __init__(self):
      self.w = nnx.Param(jnp.asarray(P[0]))

  model = Model()
  ema = nnx.EMA(model, decay=decay)

  def train_step(model, ema, p):
    model.w[...] = p  # the optimizer's step
    ema.update(model)

  if jit:
    train_step = nnx.jit(train_step)
  for t in range(1, steps + 1):
    train_step(model, ema, jnp.asarray(P[t]))
  return np.asarray(ema.params['w'][...])


def test_flax_nnx_ema_eager_is_bitwise_with_optax_rounding():
  decay = 0.9998
  # decay * ema + (1.0 - decay) * p, each op rounded on its own.
  want = pn.bits(nnx_ema(decay, 300, jit=False))
  assert_bitwise(average(300, jit=False, decay=decay,
                         rounding='optax').average['w'], want)
  assert_bitwise(average(300, jit=False, decay=decay,
                         rounding='nnx').average['w'], want)
  # Under jit emax's 'optax' form fuses only the small product: same bits.
  assert_bitwise(average(300, decay=decay, rounding='optax').average['w'],
                 want)


def keep_first(decay):
  """The hand-written ``decay * ema + (1 - decay) * new``, jitted."""
  return jax.jit(lambda e, p: decay * e + (1 - decay) * p)


@pytest.mark.parametrize('peer', ['nnx.EMA under nnx.jit', 'hand-written'])
def test_keep_first_form_under_jit_is_bitwise_with_nnx_rounding(peer):
  decay = 0.999
  if peer == 'hand-written':
    f, e = keep_first(decay), jnp.asarray(P[0])
    for t in range(1, 301):
      e = f(e, jnp.asarray(P[t]))
    want = pn.bits(e)
  else:
    want = pn.bits(nnx_ema(decay, 300, jit=True))
  # XLA fuses the first product written, decay * ema, into a multiply-add:
  # 'nnx' writes the same order; 'optax' (the other order) is measurably off.
  got = average(300, decay=decay, rounding='nnx')
  assert_bitwise(got.average['w'], want)
  other = average(300, decay=decay, rounding='optax')
  assert max_ulps(other.average['w'], want) >= 10


# --- optax.incremental_update: target networks --------------------------------


def sgd_to(j):
  """A gradient that takes SGD(1.0) from P[j - 1] to P[j] exactly."""
  return {'w': jnp.asarray(P[j - 1] - P[j])}


def test_soft_target_update_in_a_jitted_step_is_bitwise():
  # SAC: target = incremental_update(params, target, tau) after each step,
  # inside the jitted update.
  tau, sgd = 0.005, optax.sgd(1.0)

  @jax.jit
  def reference(params, target, opt_state, grads):
    updates, opt_state = sgd.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, optax.incremental_update(params, target, tau), opt_state

  tx = optax.chain(optax.sgd(1.0), emax.ema(step_size=tau, rounding='optax'))

  @jax.jit
  def ported(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = {'w': jnp.asarray(P[0])}
  ref = (params, params, sgd.init(params))
  state = (params, tx.init(params))
  for j in range(1, 1001):
    ref = reference(*ref, sgd_to(j))
    state = ported(*state, sgd_to(j))
  assert_bitwise(state[0]['w'], pn.bits(P[1000]))
  assert_bitwise(emax.ema_params(state[1])['w'], pn.bits(ref[1]['w']))
  lerp = average(1000, step_size=tau, rounding='lerp')  # measured 23 ulp
  assert max_ulps(lerp.average['w'], pn.bits(ref[1]['w'])) >= 10


def test_soft_target_update_eager_is_bitwise():
  tau = 0.005
  target = {'w': jnp.asarray(P[0])}
  for t in range(1, 301):
    target = optax.incremental_update({'w': jnp.asarray(P[t])}, target, tau)
  got = average(300, jit=False, step_size=tau, rounding='optax')
  assert_bitwise(got.average['w'], pn.bits(target['w']))


def test_td3_soft_update_every_second_step_is_bitwise():
  # TD3: the targets move with tau on every policy_frequency-th step only.
  tau, every = 0.005, 2
  inc = jax.jit(functools.partial(optax.incremental_update, step_size=tau))
  target = jnp.asarray(P[0])
  for j in range(1, 1001):
    if j % every == 0:
      target = inc(jnp.asarray(P[j]), target)
  got = average(1000, step_size=tau, rounding='optax', update_every=every,
                per_update=True)
  assert_bitwise(got.average['w'], pn.bits(target))


@pytest.mark.parametrize('learning_starts, first_update', [
    (100, 40),    # first target update at env step 500: training step 40
    (10000, None),  # CleanRL's default: at 10500, step 50 = update_every
])
def test_dqn_hard_target_update_every_500_env_steps_is_bitwise(
    learning_starts, first_update):
  # CleanRL's dqn_jax loop: train every 10 env steps after learning_starts,
  # target_params = incremental_update(params, target_params, 1.0) from
  # Python every 500 env steps. Env steps 10 and 500 map to training steps:
  # 500 / 10 = 50 training steps between target updates.
  train_frequency, target_frequency = 10, 500
  sgd = optax.sgd(1.0)
  tx = optax.chain(optax.sgd(1.0), emax.ema(
      step_size=1.0, update_every=target_frequency // train_frequency,
      first_update=first_update, per_update=True))

  @jax.jit
  def train(params, opt_state, grads):  # one training step of the port
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def train_reference(params, opt_state, grads):
    updates, opt_state = sgd.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = {'w': jnp.asarray(P[0])}
  ref_params, ref_opt, ref_target = params, sgd.init(params), params
  port = (params, tx.init(params))
  j, compared = 0, 0
  for global_step in range(learning_starts + 10 * 1000 + 1):
    if global_step > learning_starts:
      if global_step % train_frequency == 0:
        j += 1
        ref_params, ref_opt = train_reference(ref_params, ref_opt, sgd_to(j))
        port = train(*port, sgd_to(j))
      if global_step % target_frequency == 0:
        ref_target = optax.incremental_update(ref_params, ref_target, 1.0)
      if global_step % train_frequency == 0:
        assert_bitwise(emax.ema_params(port[1])['w'],
                       pn.bits(ref_target['w']))
        compared += 1
  assert j == compared == 1000
  assert not np.array_equal(ref_target['w'], P[0])
  # The wrong first update (the default, step 50, for learning_starts=100)
  # would copy 10 training steps late.
  if first_update is not None:
    late = average(1000, step_size=1.0, update_every=50, per_update=True)
    assert not np.array_equal(late.average['w'], ref_target['w'])


@pytest.mark.parametrize('offset, first_update', [
    (0, None),  # steps = the steps taken so far (flax's state.step after
                # apply_gradients): copies on steps 50, 100, ...
    (-1, 1),    # steps = the steps taken before this one: 1, 51, 101, ...
])
def test_optax_periodic_update_is_bitwise(offset, first_update):
  period, steps = 50, 990
  update = jax.jit(optax.periodic_update, static_argnums=3)
  target = jnp.asarray(P[0])
  for j in range(1, steps + 1):
    target = update(jnp.asarray(P[j]), target, j + offset, period)
  got = average(steps, step_size=1.0, update_every=period,
                first_update=first_update, per_update=True)
  assert_bitwise(got.average['w'], pn.bits(target))
  assert not np.array_equal(target, P[steps])  # the last copy was earlier


# --- a hand-written diffusion EMA ---------------------------------------------

RATE = 0.9999


def hand_written(ema, new):
  return ema + (1 - RATE) * (new - ema)  # 1 - RATE in float64, a lerp


def test_diffusion_ema_jitted_is_bitwise_with_lerp():
  f, want = jax.jit(hand_written), jnp.asarray(P[0])
  for t in range(1, 301):
    want = f(want, jnp.asarray(P[t]))
  want = pn.bits(want)
  assert_bitwise(average(300, decay=RATE, rounding='lerp').average['w'], want)
  assert_bitwise(average(300, step_size=1 - RATE,
                         rounding='lerp').average['w'], want)
  # TensorFlow's rounding (the default): measured 35 ulp.
  assert max_ulps(average(300, decay=RATE).average['w'], want) >= 30


def test_diffusion_ema_under_pmap_and_scan_is_bitwise_with_lerp():
  devices = jax.local_devices()[:2]
  assert len(devices) == 2
  substeps = jnp.broadcast_to(jnp.asarray(P[1:301]), (2, 300, pn.SIZE))

  @functools.partial(jax.pmap, devices=devices)
  def reference(ema, news):
    return lax.scan(lambda e, p: (hand_written(e, p), None), ema, news)[0]

  @functools.partial(jax.pmap, devices=devices)
  def ported(state, news):
    def substep(state, p):
      return emax.update(state, {'w': p}, RATE, rounding='lerp'), None
    return lax.scan(substep, state, news)[0]

  start = jnp.broadcast_to(jnp.asarray(P[0]), (2, pn.SIZE))
  want = reference(start, substeps)
  state = jax.tree.map(lambda x: jnp.stack([x, x]),
                       emax.init({'w': jnp.asarray(P[0])}))
  state = ported(state, substeps)
  averaged = emax.ema_params(state)['w']  # a pmap-replicated state reads too
  for device in range(2):
    assert_bitwise(averaged[device], pn.bits(want[device]))
