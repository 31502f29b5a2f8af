"""BEMA against a float64 NumPy transcription of TRL's BEMACallback."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import emax
import reference_bema


def _walk(steps, seed=0, scale=1.0):
  """A random walk of params (float32): theta_0 .. theta_steps."""
  rng = np.random.default_rng(seed)
  theta = {'w': rng.normal(size=(7, 3)).astype(np.float32) * scale,
           'b': rng.normal(size=(5,)).astype(np.float32) * scale}
  out = [theta]
  for _ in range(steps):
    theta = {k: (v + rng.normal(size=v.shape).astype(np.float32) * 0.1 *
                 scale).astype(np.float32) for k, v in theta.items()}
    out.append(theta)
  return out


@pytest.mark.parametrize('burn_in, update_every, kw', [
    (0, 1, {}),
    (5, 1, {}),
    (3, 4, {}),
    (7, 3, {'kappa': 0.7, 'eta': 0.3, 'rho': 4.0, 'gamma': 2.0}),
    (0, 2, {'min_step_size': 0.12}),
])
def test_matches_reference_over_200_steps(burn_in, update_every, kw):
  seq = _walk(200, seed=burn_in + update_every)
  ref_kw = dict(kw)
  if 'min_step_size' in ref_kw:
    ref_kw['min_beta'] = ref_kw.pop('min_step_size')
  ref = reference_bema.bema_reference(seq, burn_in=burn_in,
                                      update_every=update_every, **ref_kw)
  tx = emax.bema(burn_in=burn_in, update_every=update_every, **kw)
  state = tx.init({k: jnp.asarray(v) for k, v in seq[0].items()})

  @jax.jit
  def step(state, new, old):
    updates = jax.tree.map(lambda n, o: n - o, new, old)
    _, state = tx.update(updates, state, old)
    return state, emax.bema_params(state, new)

  read0 = emax.bema_params(state, seq[0])
  np.testing.assert_array_equal(read0['w'], seq[0]['w'])
  for n in range(1, 201):
    new = {k: jnp.asarray(v) for k, v in seq[n].items()}
    # optax.apply_updates(old, new - old) is new up to a rounding: average
    # toward exactly seq[n] by handing the params themselves.
    old = {k: jnp.asarray(v) for k, v in seq[n - 1].items()}
    state, got = step(state, new, old)
    want = ref[n].read
    scale = max(np.abs(v).max() for v in seq[n].values())
    for k in want:
      np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k],
                                 rtol=0, atol=2e-6 * scale,
                                 err_msg=f'step {n}, leaf {k}')
    if ref[n].updated:  # TRL's own output on update steps
      for k in want:
        np.testing.assert_allclose(np.asarray(got[k], np.float64),
                                   ref[n].bema[k], rtol=0, atol=2e-6 * scale)
  assert step._cache_size() == 1


def test_reads_the_params_during_burn_in_and_keeps_the_snapshot_after():
  tx = emax.bema(burn_in=3)
  params = {'w': jnp.zeros(2)}
  state = tx.init(params)
  for n in range(1, 6):
    new = {'w': jnp.full(2, float(n))}
    _, state = tx.update(jax.tree.map(lambda a, b: a - b, new, params),
                         state, params)
    params = new
    if n <= 3:
      np.testing.assert_array_equal(emax.bema_params(state, params)['w'], n)
  # The snapshot is the params at step 3, bit for bit, for good.
  np.testing.assert_array_equal(
      emax.ema_params(state.ema_state, 'snapshot')['w'], [3.0, 3.0])


def test_nan_step_moves_neither_ema_nor_snapshot():
  tx = emax.bema(burn_in=2)
  params = {'w': jnp.ones(3)}
  state = tx.init(params)
  bad = {'w': jnp.asarray([0.0, jnp.nan, 0.0])}
  _, skipped = tx.update(bad, state, params)
  assert int(skipped.ema_state.skipped) == 1
  for name in ('ema', 'snapshot'):
    np.testing.assert_array_equal(
        emax.ema_params(skipped.ema_state, name)['w'], 1.0)


def test_bema_params_in_params_dtype_and_errors():
  params = {'w': jnp.ones(4, jnp.bfloat16), 'i': jnp.arange(2)}
  tx = emax.with_ema(optax.sgd(0.5), average=emax.bema())
  opt_state = tx.init(params)
  grads = {'w': jnp.ones(4, jnp.bfloat16), 'i': None}
  updates, opt_state = tx.update(grads, opt_state, params)
  params = {'w': (params['w'] + updates['w']).astype(jnp.bfloat16),
            'i': params['i']}
  out = emax.bema_params(opt_state, params)
  assert out['w'].dtype == jnp.bfloat16 and out['i'].dtype == params['i'].dtype
  with pytest.raises(ValueError, match='expected a BemaState'):
    emax.bema_params(emax.init(params), params)
  with pytest.raises(TypeError, match='does not take.*decay'):
    emax.bema(decay=0.9)
  with pytest.raises(ValueError, match='rho must be a finite number > 0'):
    emax.bema(rho=0.0)
  with pytest.raises(TypeError, match=r"average= and also \['debias'\]"):
    emax.with_ema(optax.sgd(0.1), average=emax.bema(), debias=True)
  with pytest.raises(TypeError, match='pass it as average'):
    emax.with_ema(optax.sgd(0.1), emax.bema())
