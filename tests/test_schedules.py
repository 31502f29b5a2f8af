"""Decay schedules: values, jit safety, argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import emax


def test_tf_decay_values_in_float32():
  s = emax.tf_decay(0.99)
  assert s(0) == np.float32(0.1)
  n = np.float32(100)
  assert s(100) == np.minimum(np.float32(0.99), (np.float32(1) + n) /
                              (np.float32(10) + n))
  assert s(10000) == np.float32(0.99)
  assert s(jnp.asarray(5, jnp.int32)).dtype == jnp.float32


def test_inverse_power_decay_values():
  s = emax.inverse_power_decay(0.999, inv_gamma=1.0, power=2 / 3)
  for n in (0, 1, 10, 1000):
    want = min(0.999, max(0.0, 1 - (1 + n) ** (-2 / 3)))
    assert float(s(n)) == pytest.approx(want, rel=1e-6, abs=1e-7)
  assert float(s(10**9)) == pytest.approx(0.999)
  floor = emax.inverse_power_decay(0.999, min_decay=0.5, inv_gamma=10.0)
  assert float(floor(0)) == 0.5
  assert float(floor(100)) == pytest.approx(1 - 11 ** (-2 / 3), rel=1e-6)


def test_power_function_decay_values_and_sigma_rel():
  s = emax.power_function_decay(gamma=6.94)
  for n in (0, 1, 7, 500):
    assert float(s(n)) == pytest.approx((1 - 1 / (n + 1)) ** 7.94, rel=1e-5)
  assert emax.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
  assert emax.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
  # The conversion inverts the paper's formula.
  g = emax.sigma_rel_to_gamma(0.07)
  assert ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 == pytest.approx(0.07)
  by_sigma = emax.power_function_decay(sigma_rel=0.05)
  assert float(by_sigma(9)) == pytest.approx(0.9 ** (1 + emax.sigma_rel_to_gamma(
      0.05)), rel=1e-5)


def test_half_life_decay():
  s = emax.half_life_decay(100)
  assert float(s(0)) ** 100 == pytest.approx(0.5, rel=1e-5)
  assert s(jnp.arange(3)).shape == (3,)


@pytest.mark.parametrize('schedule', [
    emax.tf_decay(0.999), emax.inverse_power_decay(0.9999),
    emax.power_function_decay(sigma_rel=0.1), emax.half_life_decay(10.0),
    optax.linear_schedule(0.9, 0.999, 100)])
def test_schedules_jit_and_drive_ema(schedule):
  values = jax.jit(jax.vmap(schedule))(jnp.arange(50, dtype=jnp.int32))
  assert values.dtype == jnp.float32
  assert bool(jnp.all((values >= 0) & (values <= 1)))
  tx = emax.ema(schedule)
  params = {'w': jnp.ones(2)}
  _, state = jax.jit(tx.update)(params, tx.init(params), params)
  assert int(state.count) == 1


def test_schedule_values_outside_unit_interval_are_clipped():
  tx = emax.ema(lambda n: jnp.asarray(1.5, jnp.float32))
  params = {'w': jnp.asarray(1.0)}
  _, state = tx.update({'w': jnp.asarray(1.0)}, tx.init(params), params)
  assert float(state.average['w']) == 1.0  # decay 1: the average stays


@pytest.mark.parametrize('make, match', [
    (lambda: emax.tf_decay(1.2), r'decay must be in \[0, 1\]'),
    (lambda: emax.inverse_power_decay(0.9, min_decay=0.95),
     'min_decay .* must not exceed max_decay'),
    (lambda: emax.inverse_power_decay(0.9, power=0), 'power must be'),
    (lambda: emax.inverse_power_decay(0.9, inv_gamma=-1), 'inv_gamma must'),
    (lambda: emax.power_function_decay(), 'exactly one of gamma and sigma_rel'),
    (lambda: emax.power_function_decay(7.0, sigma_rel=0.1), 'exactly one'),
    (lambda: emax.power_function_decay(sigma_rel=0.5), r'sigma_rel must be in'),
    (lambda: emax.power_function_decay(gamma=-2.0), 'gamma must be'),
    (lambda: emax.half_life_decay(0), 'half_life must be'),
])
def test_schedule_argument_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def _edm_beta(n, batch_size, half_life_kimg, rampup_ratio):
  """EDM's training loop (Karras et al. 2022), float64, transcribed:
  ema_halflife_nimg = min(halflife, cur_nimg * rampup);
  ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8)), with
  cur_nimg the images seen before the step."""
  half_life = half_life_kimg * 1000
  if rampup_ratio is not None:
    half_life = min(half_life, n * batch_size * rampup_ratio)
  return 0.5 ** (batch_size / max(half_life, 1e-8))


@pytest.mark.parametrize('rampup', [None, 0.05])
def test_half_life_in_samples_matches_edm(rampup):
  schedule = emax.half_life_decay(500_000, batch_size=512, rampup_ratio=rampup)
  for n in (0, 1, 10, 100, 1000, 20_000):
    want = _edm_beta(n, 512, 500, rampup)
    np.testing.assert_allclose(float(schedule(n)), want, rtol=2e-6, atol=0)
    np.testing.assert_allclose(float(schedule.step_size(n)), 1 - want,
                               rtol=2e-6, atol=1e-30)
  if rampup is not None:  # the first step copies, bit for bit
    assert float(schedule.step_size(0)) == 1.0


def test_scale_decay_is_the_power_rule():
  for d, k in ((0.999, 4), (0.9999, 0.5), (0.9, 8)):
    assert emax.scale_decay(d, k) == pytest.approx(np.float64(d) ** k,
                                                   rel=1e-15)
    scaled = emax.scale_decay(emax.half_life_decay(100.0), k)
    base = 0.5 ** (1 / 100)
    np.testing.assert_allclose(float(scaled(3)), base ** k, rtol=1e-6)
    np.testing.assert_allclose(float(scaled.step_size(3)), 1 - base ** k,
                               rtol=1e-5)
  with pytest.raises(ValueError, match='factor must be a finite number > 0'):
    emax.scale_decay(0.9, 0)


def test_scale_decay_of_a_plain_callable_applies_the_factor():
  # An optax schedule or a lambda has no step_size: the rule still applies.
  for k in (2.0, 0.5, 3):
    scaled = emax.scale_decay(lambda n: 0.9, k)
    np.testing.assert_allclose(float(scaled(0)), 0.9 ** k, rtol=1e-6)
    np.testing.assert_allclose(float(scaled.step_size(0)), 1 - 0.9 ** k,
                               rtol=1e-5)
  schedule = optax.linear_schedule(0.5, 0.9, 10)
  scaled = emax.scale_decay(schedule, 2.0)
  np.testing.assert_allclose(float(scaled(5)), 0.7 ** 2, rtol=1e-6)
