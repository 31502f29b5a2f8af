"""emax.ema (the optax transformation), ema_params and get_ema_state."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import emax
from tests.reference import NumpyEma

F32 = jnp.float32


def run(tx, params, grads_seq, jit=False):
  """Applies ``tx`` along a sequence of gradients; returns params, state."""
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  if jit:
    step = jax.jit(step)
  for grads in grads_seq:
    params, state = step(params, state, grads)
  return params, state


def const_updates(value, n):
  """An ``optax`` transformation replacing updates by ``value[i]``."""
  del n

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    new = jax.tree.map(lambda u: value[state.count].astype(u.dtype), updates)
    return new, optax.ScaleByScheduleState(count=state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


# --- hand-computed first steps of every mode ------------------------------


def sgd_run(ema_tx, grads, w0=0.0):
  tx = optax.chain(optax.sgd(1.0), ema_tx)
  params = {'w': jnp.asarray(w0, F32)}
  history = []
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update({'w': jnp.asarray(g, F32)}, state, params)
    params = optax.apply_updates(params, updates)
    history.append(float(emax.ema_params(state)['w']))
  return history, emax.get_ema_state(state)


def test_averages_params_after_the_step():
  # sgd(1.0) with grads -1: params 0 -> 1 -> 2 -> 3.
  hist, state = sgd_run(emax.ema(0.5), [-1.0, -1.0, -1.0])
  # ema: 0 -> 0.5*0 + 0.5*1 = 0.5 -> 0.5*0.5 + 0.5*2 = 1.25 -> 2.125
  assert hist == [0.5, 1.25, 2.125]
  assert int(state.count) == 3 and float(state.weight) == 1.0


def test_debias_mode():
  hist, state = sgd_run(emax.ema(0.5, debias=True), [-1.0, -1.0])
  # biased: 0.5*1 = 0.5, weight 0.5 -> 1 ; then 0.25 + 1 = 1.25, w 0.75
  assert hist == [1.0, pytest.approx(1.25 / 0.75)]
  assert float(state.average['w']) == 1.25 and float(state.weight) == 0.75


def test_schedule_called_with_steps_taken_before():
  seen = []

  def schedule(n):
    seen.append(n)
    return jnp.where(n == 0, 0.0, 0.5)

  hist, _ = sgd_run(emax.ema(schedule), [-1.0, -1.0])
  assert int(seen[0]) == 0
  # step 1: decay 0 -> ema = params = 1; step 2: 0.5*1 + 0.5*2 = 1.5
  assert hist == [1.0, 1.5]


def test_update_every_mode():
  hist, state = sgd_run(emax.ema(0.5, update_every=2), [-1.0] * 4)
  # params 1, 2, 3, 4. Average on steps 2 and 4 with 0.5**2 = 0.25:
  # step 2: 0 - 0.75 * (0 - 2) = 1.5 ; step 4: 1.5 - 0.75 * (1.5 - 4) = 3.375
  assert hist == [0.0, 1.5, 1.5, 3.375]
  assert int(state.count) == 4


def test_start_step_mode():
  hist, _ = sgd_run(emax.ema(0.5, start_step=2), [-1.0] * 4)
  # steps 1, 2 copy (1, 2); step 3: 0.5*2 + 0.5*3 = 2.5 ; step 4: 3.25
  assert hist == [1.0, 2.0, 2.5, 3.25]


def test_start_step_with_debias_reads_the_copy():
  hist, state = sgd_run(emax.ema(0.5, start_step=1, debias=True), [-1.0] * 2)
  assert hist == [1.0, 1.5]
  assert float(state.weight) == 1.0


def test_skip_nonfinite_mode():
  tx = emax.ema(0.5)
  params = {'w': jnp.asarray([1.0, 2.0]), 'n': jnp.asarray(0)}
  state = tx.init(params)
  bad = {'w': jnp.asarray([jnp.nan, 0.0]), 'n': jnp.asarray(1)}
  _, state = tx.update(bad, state, params)
  np.testing.assert_array_equal(state.average['w'], [1.0, 2.0])
  assert int(state.skipped) == 1 and int(state.count) == 1
  assert int(state.average['n']) == 1  # non-float leaves still follow
  inf = {'w': jnp.asarray([0.0, jnp.inf]), 'n': jnp.asarray(1)}
  _, state = jax.jit(tx.update)(inf, state, params)
  assert int(state.skipped) == 2
  good = {'w': jnp.asarray([1.0, 2.0]), 'n': jnp.asarray(0)}
  _, state = tx.update(good, state, params)
  np.testing.assert_array_equal(state.average['w'], [1.5, 3.0])
  assert int(state.skipped) == 2 and int(state.count) == 3


def test_skip_nonfinite_off_lets_nan_through():
  tx = emax.ema(0.5, skip_nonfinite=False)
  params = {'w': jnp.asarray([1.0])}
  state = tx.init(params)
  _, state = tx.update({'w': jnp.asarray([jnp.nan])}, state, params)
  assert np.isnan(state.average['w'][0]) and int(state.skipped) == 0


def test_skip_with_update_every_and_start_step():
  tx = emax.ema(0.5, update_every=2, start_step=1)
  params = {'w': jnp.asarray(0.0)}
  state = tx.init(params)
  _, state = tx.update({'w': jnp.asarray(jnp.nan)}, state, params)
  assert float(state.average['w']) == 0.0 and int(state.skipped) == 1


def test_updates_pass_through_unchanged():
  tx = emax.ema(0.9)
  params = {'w': jnp.ones(3)}
  updates = {'w': jnp.asarray([0.1, 0.2, 0.3])}
  out, _ = tx.update(updates, tx.init(params), params)
  assert out is updates


# --- against a NumPy reference, by hypothesis -----------------------------

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.bool_]


@st.composite
def trees(draw):
  n = draw(st.integers(1, 4))
  leaves = []
  for _ in range(n):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(1, 5), max_size=2)))
    leaves.append((dtype, shape))
  return leaves


def make_leaves(spec, rng):
  out = []
  for dtype, shape in spec:
    if dtype == jnp.bool_:
      out.append(rng.random(shape) < 0.5)
    elif dtype == jnp.int32:
      out.append(rng.integers(-5, 5, shape).astype(np.int32))
    else:
      out.append(np.asarray(jnp.asarray(rng.normal(size=shape) * 4, dtype)))
  return out


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    spec=trees(),
    decays=st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=6),
    debias=st.booleans(),
    update_every=st.integers(1, 3),
    start_step=st.integers(0, 2),
    nan_step=st.one_of(st.none(), st.integers(0, 5)),
    seed=st.integers(0, 2**16),
)
def test_matches_numpy_reference(spec, decays, debias, update_every,
                                 start_step, nan_step, seed):
  rng = np.random.default_rng(seed)
  leaves0 = make_leaves(spec, rng)
  table = jnp.asarray(decays, F32)
  tx = emax.ema(lambda n: table[jnp.minimum(n, len(decays) - 1)],
                debias=debias, update_every=update_every,
                start_step=start_step)
  params = {f'p{i}': jnp.asarray(x) for i, x in enumerate(leaves0)}
  params['none'] = None
  state = tx.init(params)
  ref = NumpyEma(leaves0, debias=debias, update_every=update_every,
                 start_step=start_step)
  for step, d in enumerate(decays):
    new = make_leaves(spec, rng)
    if nan_step == step:
      for i, (dtype, _) in enumerate(spec):
        if jnp.issubdtype(dtype, jnp.floating):
          new[i] = new[i].copy()
          new[i].reshape(-1)[0] = np.nan
          break
    new_params = {f'p{i}': jnp.asarray(x) for i, x in enumerate(new)}
    new_params['none'] = None
    zeros = jax.tree.map(jnp.zeros_like, params)
    # Updates that take params exactly to new_params (non-floats via None).
    updates = jax.tree.map(
        lambda n, z: n if jnp.issubdtype(n.dtype, jnp.inexact) else None,
        new_params, zeros)
    zero_params = jax.tree.map(
        lambda p: jnp.zeros_like(p) if jnp.issubdtype(p.dtype, jnp.inexact)
        else p, new_params)
    _, state = tx.update(updates, state, zero_params)
    ref.step(new, np.float32(d))
  ema_state = emax.get_ema_state(state)
  got = emax.ema_params(state)
  assert got['none'] is None
  assert int(ema_state.count) == ref.count
  assert int(ema_state.skipped) == ref.skipped
  exact = update_every == 1
  if exact:
    assert np.float32(ema_state.weight) == ref.weight[None]
  else:
    np.testing.assert_allclose(ema_state.weight, ref.weight[None], rtol=1e-5)
  for i, (want_avg, want) in enumerate(zip(ref.average[None], ref.read())):
    have_avg = np.asarray(ema_state.average[f'p{i}'])
    have = np.asarray(got[f'p{i}'])
    assert have.dtype == want.dtype and have_avg.dtype == want_avg.dtype
    if exact:
      # The stored average follows TensorFlow's arithmetic to the bit; the
      # debiased read divides, which XLA may do within an ulp.
      np.testing.assert_array_equal(have_avg, want_avg)
      if ema_state.weight == 1 or not jnp.issubdtype(have.dtype, jnp.inexact):
        np.testing.assert_array_equal(have, want)
      else:
        rtol = 8e-3 if have.dtype.itemsize == 2 else 4e-7  # one ulp
        np.testing.assert_allclose(have.astype(np.float32),
                                   want.astype(np.float32), rtol=rtol)
    else:
      np.testing.assert_allclose(have_avg.astype(np.float32),
                                 want_avg.astype(np.float32), rtol=1e-5,
                                 atol=1e-6)


def test_reference_under_jit_bitwise():
  rng = np.random.default_rng(3)
  leaves0 = [rng.normal(size=(33, 7)).astype(np.float32),
             np.asarray(jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16))]
  params = [jnp.asarray(x) for x in leaves0]
  tx = emax.ema(emax.tf_decay(0.9))
  ref = NumpyEma(leaves0)
  state = tx.init(params)
  update = jax.jit(lambda u, s, p: tx.update(u, s, p)[1])
  for n in range(12):
    new = [rng.normal(size=(33, 7)).astype(np.float32),
           np.asarray(jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16))]
    zeros = [jnp.zeros_like(x) for x in params]
    state = update([jnp.asarray(x) for x in new], state, zeros)
    ref.step(new, np.asarray(emax.tf_decay(0.9)(n)))
  for have, want in zip(state.average, ref.average[None]):
    np.testing.assert_array_equal(np.asarray(have), want)
  assert update._cache_size() == 1


# --- against optax.ema -----------------------------------------------------


@pytest.mark.standard_promotion
def test_debias_equals_optax_ema_on_params():
  rng = np.random.default_rng(1)
  seq = [{'w': jnp.asarray(rng.normal(size=(4, 3)), F32),
          'b': jnp.asarray(rng.normal(size=(3,)), F32)} for _ in range(10)]
  ours = emax.ema(0.9, debias=True)
  theirs = optax.ema(0.9, debias=True)
  zero = jax.tree.map(jnp.zeros_like, seq[0])
  s1, s2 = ours.init(zero), theirs.init(zero)
  for p in seq:
    _, s1 = ours.update(p, s1, zero)  # params after step = p
    debiased, s2 = theirs.update(p, s2)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7),
        emax.ema_params(s1), debiased)


# --- inside optax containers -------------------------------------------------


@pytest.mark.standard_promotion
def test_multisteps_moves_once_per_real_step():
  k = 3
  tx = optax.MultiSteps(optax.chain(optax.sgd(1.0), emax.ema(0.5)), k)
  params = {'w': jnp.asarray(0.0)}
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  values = []
  for _ in range(2 * k):
    updates, state = step({'w': jnp.asarray(-1.0)}, state, params)
    params = optax.apply_updates(params, updates)
    values.append(float(emax.ema_params(state)['w']))
  # params: 0,0,1,1,1,2 ; average moves only on real steps (3rd and 6th).
  assert values == [0.0, 0.0, 0.5, 0.5, 0.5, 1.25]
  assert int(emax.get_ema_state(state).count) == 2


@pytest.mark.standard_promotion
def test_ema_params_found_in_optax_containers():
  params = {'w': jnp.ones(2), 'b': jnp.ones(1)}
  txs = [
      optax.chain(optax.adam(1e-2), emax.ema(0.9)),
      optax.named_chain(('adam', optax.adam(1e-2)), ('ema', emax.ema(0.9))),
      optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
      optax.masked(emax.ema(0.9), {'w': True, 'b': False}),
      optax.MultiSteps(optax.chain(optax.sgd(0.1), emax.ema(0.9)), 2),
  ]
  txs[2] = optax.chain(txs[2], emax.ema(0.9))
  for tx in txs:
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, state, params)
    out = emax.ema_params(state, params=params)
    assert isinstance(emax.get_ema_state(state), emax.EmaState)
    assert 'w' in out
  # optax.masked averages part of the params, as mask= does: reading it
  # needs the live params for the rest.
  masked = txs[3].update(grads, txs[3].init(params), params)[1]
  with pytest.raises(ValueError, match='params='):
    emax.ema_params(masked)


def test_optax_tree_get_finds_the_average():
  tx = optax.chain(optax.sgd(0.1), emax.ema(0.9))
  state = tx.init({'w': jnp.ones(2)})
  np.testing.assert_array_equal(optax.tree.get(state, 'average')['w'], [1, 1])


def test_error_several_ema_states():
  tx = optax.chain(emax.ema(0.9), emax.ema(0.99))
  state = tx.init({'w': jnp.ones(2)})
  with pytest.raises(ValueError, match='found 2 emax.EmaState'):
    emax.ema_params(state)


def test_error_no_ema_state():
  state = optax.adam(1e-3).init({'w': jnp.ones(2)})
  with pytest.raises(ValueError, match='with none inside.*emax.with_ema'):
    emax.ema_params(state)


def test_error_restored_dict_state_in_chain():
  tx = optax.chain(optax.sgd(0.1), emax.ema(0.9))
  params = {'w': jnp.ones(2)}
  state = tx.init(params)
  restored = (state[0], state[1]._asdict())
  with pytest.raises(ValueError, match=r'restored without a target.*'
                     r'jax.eval_shape\(tx.init, params\)'):
    emax.ema_params(restored)
  with pytest.raises(ValueError, match=r'emax.ema expected an emax.EmaState'
                     r', got dict.*restored without a target'):
    tx.update(params, restored, params)


def test_error_update_without_params():
  tx = emax.ema(0.9)
  state = tx.init({'w': jnp.ones(2)})
  with pytest.raises(ValueError, match=r'emax.ema needs the params, got None.*'
                     r'tx.update\(updates, opt_state, params\)'):
    tx.update({'w': jnp.ones(2)}, state)
  with_ema = emax.with_ema(optax.sgd(1.0), 0.9)
  with pytest.raises(ValueError, match=r'emax.with_ema needs the params'):
    with_ema.update({'w': jnp.ones(2)}, with_ema.init({'w': jnp.ones(2)}))


@pytest.mark.parametrize('decay', [1.0001, -0.5, float('nan'), 2])
def test_error_decay_at_construction(decay):
  with pytest.raises(ValueError, match=r'decay must be in \[0, 1\], got'):
    emax.ema(decay)


def test_error_bad_options():
  with pytest.raises(TypeError, match='decay must be a float in'):
    emax.ema('0.9')
  with pytest.raises(ValueError, match=r'update_every must be an int in \[1, '):
    emax.ema(0.9, update_every=0)
  with pytest.raises(ValueError, match=r'start_step must be an int in \[0, '):
    emax.ema(0.9, start_step=-1)
  with pytest.raises(ValueError, match='accumulator_dtype must be a floating'):
    emax.ema(0.9, accumulator_dtype=jnp.int8)


def test_error_params_mismatch_names_path():
  tx = emax.ema(0.9)
  state = tx.init({'w': jnp.ones(2)})
  p = {'w': jnp.ones(2), 'bias_term': jnp.ones(1)}
  with pytest.raises(ValueError, match=r"not in the EMA state: \['bias_term'"):
    tx.update(p, state, p)


# --- jit, donation, scan, recompiles -----------------------------------------


def mlp_params(key):
  k1, k2 = jax.random.split(key)
  return {'net': {'w1': jax.random.normal(k1, (8, 16)), 'b1': jnp.zeros(16),
                  'w2': jax.random.normal(k2, (16, 1)).astype(jnp.bfloat16)},
          'step': jnp.zeros([], jnp.int32)}


def loss_fn(net, x):
  h = jnp.tanh(x @ net['w1'] + net['b1'])
  return jnp.mean((h @ net['w2'].astype(F32)) ** 2)


@pytest.mark.standard_promotion
@pytest.mark.parametrize('kw', [{}, {'debias': True},
                                {'update_every': 2, 'start_step': 1}])
def test_jit_with_whole_train_state_donated(kw):
  # The int 'step' leaf rides along: masked out of adam, its update is +1.
  tx = optax.chain(optax.masked(optax.adam(1e-2), {'net': True, 'step': False}),
                   emax.ema(emax.tf_decay(0.99), **kw))
  params = mlp_params(jax.random.key(0))
  train_state = (params, tx.init(params))

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(train_state, x):
    params, opt_state = train_state
    grads = {'net': jax.grad(loss_fn)(params['net'], x),
             'step': jnp.ones([], jnp.int32)}
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  x = jnp.ones((4, 8))
  for _ in range(4):
    old = train_state
    train_state = train_step(train_state, x)
    # Every float buffer was donated and reused (a copied int leaf of the
    # average may be left alone by XLA, which is harmless).
    kept = [p for p, leaf in jax.tree_util.tree_flatten_with_path(old)[0]
            if jnp.issubdtype(leaf.dtype, jnp.inexact)
            and not leaf.is_deleted()]
    assert not kept, kept
  assert train_step._cache_size() == 1
  params, opt_state = train_state
  averaged = emax.ema_params(opt_state)
  assert averaged['net']['w2'].dtype == jnp.bfloat16
  assert int(averaged['step']) == int(params['step']) == 4
  assert not np.allclose(averaged['net']['w1'], params['net']['w1'])


def test_inside_lax_scan_over_train_steps():
  tx = optax.chain(optax.sgd(0.1), emax.ema(0.9, debias=True))
  params = {'w': jnp.ones(3, jnp.bfloat16)}
  state = tx.init(params)

  def body(carry, g):
    params, state = carry
    updates, state = tx.update({'w': g.astype(jnp.bfloat16)}, state, params)
    return (optax.apply_updates(params, updates), state), None

  gs = jnp.ones((6, 3), F32)
  (params_s, state_s), _ = lax.scan(body, (params, state), gs)
  carry = (params, state)
  for g in gs:
    carry, _ = jax.jit(body)(carry, g)
  np.testing.assert_array_equal(emax.get_ema_state(state_s).average['w'],
                                emax.get_ema_state(carry[1]).average['w'])


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 CPU devices')
@pytest.mark.standard_promotion
def test_transform_keeps_sharding():
  mesh = jax.make_mesh((8,), ('fsdp',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      'fsdp'))
  params = {'w': jax.device_put(jnp.ones((16, 4)), sharding)}
  tx = optax.chain(optax.adam(1e-3), emax.ema(0.99, debias=True))
  state = jax.jit(tx.init)(params)
  assert emax.get_ema_state(state).average['w'].sharding.is_equivalent_to(
      sharding, 2)
  _, state = jax.jit(tx.update)(params, state, params)
  assert emax.get_ema_state(state).average['w'].sharding.is_equivalent_to(
      sharding, 2)
  assert emax.ema_params(state)['w'].sharding.is_equivalent_to(sharding, 2)
