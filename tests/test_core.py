"""emax.init / update / ema_params: the pure functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import emax

F32 = jnp.float32


def f32(x):
  return np.float32(x)


# --- TensorFlow semantics, to the bit -------------------------------------


def tf_shadow_update(shadow, value, decay):
  """``tf.train.ExponentialMovingAverage.apply`` in float32 NumPy.

  TF: decay is a float32 tensor; ``assign_moving_average`` computes
  ``update_delta = (variable - value) * (1 - decay)`` and
  ``variable.assign_sub(update_delta)``.
  """
  decay = np.float32(decay)
  one_minus = np.float32(np.float32(1.0) - decay)
  shadow = np.asarray(shadow, np.float32)
  delta = (shadow - np.asarray(value, np.float32)) * one_minus
  return (shadow - delta).astype(np.float32)


def test_tf_tutorial_numbers():
  # v1 = 0, step = 0; ema = ExponentialMovingAverage(0.99, num_updates=step)
  schedule = emax.tf_decay(0.99)
  state = emax.init({'v1': jnp.zeros((), F32)})
  assert float(state.average['v1']) == 0.0
  state = emax.update(state, {'v1': jnp.asarray(5.0, F32)}, schedule(0))
  assert state.average['v1'] == f32(4.5)
  state = emax.update(state, {'v1': jnp.asarray(10.0, F32)}, schedule(10000))
  assert state.average['v1'] == f32(4.555)
  state = emax.update(state, {'v1': jnp.asarray(10.0, F32)}, schedule(10000))
  assert state.average['v1'] == f32(4.60945)


@pytest.mark.parametrize('jit', [False, True])
def test_bitwise_equal_to_tensorflow_formula(jit):
  rng = np.random.default_rng(0)
  shape = (257, 3)
  params = rng.normal(size=shape).astype(np.float32) * 10
  shadow = params.copy()
  state = emax.init({'w': jnp.asarray(params)})
  update = jax.jit(emax.update) if jit else emax.update
  schedule = emax.tf_decay(0.999)
  for n in range(20):
    params = (params + rng.normal(size=shape).astype(np.float32)).astype(
        np.float32)
    decay = np.asarray(schedule(n))
    shadow = tf_shadow_update(shadow, params, decay)
    state = update(state, {'w': jnp.asarray(params)}, jnp.asarray(decay))
  np.testing.assert_array_equal(np.asarray(state.average['w']), shadow)
  assert np.asarray(state.average['w']).tobytes() == shadow.tobytes()


@pytest.mark.parametrize('skip_nonfinite', [False, True])
@pytest.mark.parametrize('decay', ['float', 'array', 'schedule'])
def test_tensorflow_rounding_under_jit_with_copy_and_keep_steps(
    decay, skip_nonfinite):
  # When the step's mode (copy, average or keep) is traced, TensorFlow's two
  # roundings must survive the select around them: start_step=1 is TF2's
  # shadows created by the first apply; update_every=3 averages every third
  # step. Each averaging step is tf.train.ExponentialMovingAverage's, bitwise
  # (a fused multiply-add was seen in 1,700 of 4,096 elements).
  rng = np.random.default_rng(1)
  params = [rng.normal(size=4096).astype(np.float32) for _ in range(8)]
  rate = {'float': 0.8, 'array': jnp.asarray(0.8, F32),
          'schedule': lambda n: jnp.full(jnp.shape(n), 0.8, F32)}[decay]
  for options in (dict(start_step=1), dict(update_every=3, per_update=True)):
    update = jax.jit(lambda s, p, o=options: emax.update(  # noqa: B023
        s, p, rate, skip_nonfinite=skip_nonfinite, **o))
    state = emax.init({'w': jnp.asarray(params[0])})
    shadow = params[0]
    for t, p in enumerate(params[1:], start=1):
      state = update(state, {'w': jnp.asarray(p)})
      if t <= options.get('start_step', 0):
        shadow = p
      elif (t - options.get('update_every', 1)) % options.get(
          'update_every', 1) == 0:
        shadow = tf_shadow_update(shadow, p, 0.8)
      got = np.asarray(state.average['w'])
      assert got.tobytes() == shadow.tobytes(), (options, t, int(np.sum(
          got != shadow)))


# --- init -----------------------------------------------------------------


def test_init_copy_start_and_dtypes():
  params = {
      'bf16': jnp.ones((2,), jnp.bfloat16),
      'f16': jnp.ones((2,), jnp.float16),
      'f32': jnp.ones((2,), F32),
      'int': jnp.arange(3, dtype=jnp.int32),
      'bool': jnp.array([True, False]),
      'key': jax.random.key(1),
      'none': None,
  }
  state = emax.init(params)
  assert state.average['bf16'].dtype == F32
  assert state.average['f16'].dtype == F32
  assert state.average['f32'].dtype == F32
  assert state.average['int'].dtype == jnp.int32
  assert state.average['bool'].dtype == jnp.bool_
  assert state.average['none'] is None
  assert jax.random.key_data(state.average['key']).tolist() == (
      jax.random.key_data(params['key']).tolist())
  assert state.count.dtype == jnp.int32 and int(state.count) == 0
  assert state.weight.dtype == F32 and float(state.weight) == 1.0
  assert state.skipped.dtype == jnp.int32
  np.testing.assert_array_equal(state.average['f32'], params['f32'])


def test_init_debias_starts_at_zero_weight():
  params = {'w': jnp.asarray([7.0, -2.0, 1e-42], F32)}
  state = emax.init(params, debias=True)
  assert float(state.weight) == 0.0
  # Nothing averaged yet: reading gives the initial params back, bit for bit
  # (a subnormal included), not zeros and not NaN.
  assert np.asarray(emax.ema_params(state)['w']).tobytes() == np.asarray(
      params['w']).tobytes()
  # The first averaging step starts from zero: it stores (1 - d) * p.
  state = emax.update(state, {'w': jnp.asarray([4.0, 8.0, 0.0], F32)}, 0.75)
  np.testing.assert_array_equal(state.average['w'], [1.0, 2.0, 0.0])
  assert float(state.weight) == 0.25
  np.testing.assert_array_equal(emax.ema_params(state)['w'], [4.0, 8.0, 0.0])


def test_init_accumulator_dtype_option():
  state = emax.init({'w': jnp.ones(2, F32), 'h': jnp.ones(2, jnp.bfloat16)},
                    accumulator_dtype=jnp.bfloat16)
  assert state.average['w'].dtype == jnp.bfloat16
  assert state.average['h'].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='floating dtype'):
    emax.init({'w': jnp.ones(2)}, accumulator_dtype=jnp.int32)


def test_init_never_aliases_params():
  params = {'w': jnp.ones((4,), F32), 'n': jnp.arange(2)}
  for debias in (False, True):
    for fn in (emax.init, jax.jit(emax.init, static_argnames='debias')):
      state = fn(params, debias=debias)
      for a, p in zip(jax.tree.leaves(state.average), jax.tree.leaves(params)):
        assert a.unsafe_buffer_pointer() != p.unsafe_buffer_pointer()


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 CPU devices')
@pytest.mark.parametrize('debias', [False, True])
def test_sharding_kept(debias):
  mesh = jax.make_mesh((4, 2), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  spec = jax.sharding.PartitionSpec('data', 'model')
  sharding = jax.sharding.NamedSharding(mesh, spec)
  params = {
      'w': jax.device_put(jnp.ones((8, 4), jnp.bfloat16), sharding),
      'b': jax.device_put(jnp.ones((8,), F32), jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec('data'))),
  }
  eager = emax.init(params, debias=debias)
  jitted = jax.jit(emax.init, static_argnames='debias')(params, debias=debias)
  for state in (eager, jitted):
    assert state.average['w'].sharding.is_equivalent_to(sharding, 2)
    assert state.average['b'].sharding.spec == jax.sharding.PartitionSpec('data')
    new = jax.jit(emax.update)(state, params, 0.9)
    assert new.average['w'].sharding.is_equivalent_to(sharding, 2)
    out = emax.ema_params(new)
    assert out['w'].sharding.is_equivalent_to(sharding, 2)
    assert out['w'].dtype == jnp.bfloat16
  assert jax.device_count() == 8


# --- update ---------------------------------------------------------------


def test_update_hand_computed_copy_start():
  state = emax.init({'w': jnp.asarray([1.0, -2.0])})
  state = emax.update(state, {'w': jnp.asarray([3.0, 2.0])}, 0.5)
  # 1 - 0.5 * (1 - 3) = 2 ; -2 - 0.5 * (-2 - 2) = 0
  np.testing.assert_array_equal(state.average['w'], [2.0, 0.0])
  state = emax.update(state, {'w': jnp.asarray([0.0, 4.0])}, 0.75)
  # 2 - 0.25 * 2 = 1.5 ; 0 - 0.25 * (0 - 4) = 1
  np.testing.assert_array_equal(state.average['w'], [1.5, 1.0])
  assert int(state.count) == 2 and float(state.weight) == 1.0


def test_update_hand_computed_debias_any_decay_sequence():
  state = emax.init({'w': jnp.asarray(0.0)}, debias=True)
  values, decays = [2.0, 4.0, 8.0], [0.5, 0.9, 0.0 + 0.25]
  for v, d in zip(values, decays):
    state = emax.update(state, {'w': jnp.asarray(v)}, d)
  # Weights of each value: (1-d_i) * prod_{j>i} d_j
  w = [0.5 * 0.9 * 0.25, 0.1 * 0.25, 0.75]
  expected = sum(wi * vi for wi, vi in zip(w, values)) / sum(w)
  assert float(state.weight) == pytest.approx(1 - 0.5 * 0.9 * 0.25)
  assert float(emax.ema_params(state)['w']) == pytest.approx(expected, 1e-6)
  # The stored average is never debiased.
  assert float(state.average['w']) == pytest.approx(sum(
      wi * vi for wi, vi in zip(w, values)), 1e-6)


def test_debias_constant_param_reads_exactly_that_param():
  state = emax.init({'w': jnp.zeros(())}, debias=True)
  for _ in range(5):
    state = emax.update(state, {'w': jnp.asarray(3.0)}, 0.999)
  assert float(emax.ema_params(state)['w']) == pytest.approx(3.0, 1e-5)


def test_ema_params_reads_accumulator_dtypes():
  params = {'w': jnp.asarray([0.5, 1.0], jnp.bfloat16), 'n': jnp.asarray(3),
            'z': None}
  state = emax.init(params, debias=True)
  state = emax.update(state, {'w': jnp.asarray([2.0, 4.0], jnp.bfloat16),
                              'n': jnp.asarray(5), 'z': None}, 0.5)
  out = emax.ema_params(state, dtypes='accumulator')
  assert out['w'].dtype == F32  # the accumulator, not bf16
  np.testing.assert_array_equal(out['w'], [2.0, 4.0])
  assert int(out['n']) == 5 and out['z'] is None
  # A weight of one is no arithmetic at all: a fresh state reads back its
  # params to the bit, subnormals included (XLA on CPU flushes them to zero
  # in arithmetic, so averaging steps do not keep them).
  x = {'w': jnp.asarray([0.1, 1e-40, 3e38], F32),
       'h': jnp.asarray([1e-40, -0.0], jnp.bfloat16)}
  for dtypes in ('accumulator', 'params'):
    got = emax.ema_params(emax.init(x), dtypes=dtypes)
    assert np.asarray(got['w']).tobytes() == np.asarray(x['w']).tobytes()
  got = emax.ema_params(emax.init(x))['h']
  assert np.asarray(got).tobytes() == np.asarray(x['h']).tobytes()


def test_non_float_leaves_follow_params_and_none_kept():
  params = {'w': jnp.ones(2), 'step': jnp.asarray(0, jnp.int32), 'z': None,
            'key': jax.random.key(0)}
  state = emax.init(params)
  new = {'w': jnp.zeros(2), 'step': jnp.asarray(7, jnp.int32), 'z': None,
         'key': jax.random.key(9)}
  state = emax.update(state, new, 0.9)
  out = emax.ema_params(state)
  assert int(out['step']) == 7 and out['step'].dtype == jnp.int32
  assert out['z'] is None
  np.testing.assert_array_equal(jax.random.key_data(out['key']),
                                jax.random.key_data(new['key']))
  np.testing.assert_allclose(out['w'], [0.9, 0.9])


def test_bf16_average_moves_with_f32_accumulator():
  # In bf16, 1 - 1e-4 * (1 - 0) rounds back to 1: the average never moves.
  p = jnp.ones((4,), jnp.bfloat16)
  state = emax.init(p)
  for _ in range(100):
    state = emax.update(state, jnp.zeros((4,), jnp.bfloat16), 0.9999)
  assert state.average.dtype == F32
  assert float(state.average[0]) == pytest.approx(0.9999 ** 100, rel=1e-4)
  assert emax.ema_params(state).dtype == jnp.bfloat16
  stuck = emax.init(p, accumulator_dtype=jnp.bfloat16)
  for _ in range(3):
    stuck = emax.update(stuck, jnp.zeros((4,), jnp.bfloat16), 0.9999)
  assert float(stuck.average[0]) == 1.0


def test_float64_stays_float64_under_x64():
  with jax.enable_x64(True):
    p = jnp.ones((3,), jnp.float64)
    state = emax.init(p)
    state = emax.update(state, jnp.zeros((3,), jnp.float64), 0.5)
    assert state.average.dtype == jnp.float64
    assert emax.ema_params(state).dtype == jnp.float64
    np.testing.assert_array_equal(state.average, [0.5] * 3)


def test_count_saturates_instead_of_overflowing():
  state = emax.init({'w': jnp.ones(1)})
  state = state._replace(count=jnp.asarray(np.iinfo(np.int32).max, jnp.int32))
  state = emax.update(state, {'w': jnp.ones(1)}, 0.9)
  assert int(state.count) == np.iinfo(np.int32).max


def test_lax_scan_carry():
  params = {'w': jnp.zeros((3,), jnp.bfloat16), 'n': jnp.asarray(0)}
  state = emax.init(params, debias=True)

  def body(state, x):
    new = {'w': jnp.full((3,), x, jnp.bfloat16), 'n': x.astype(jnp.int32)}
    return emax.update(state, new, 0.9), None

  xs = jnp.arange(1, 6, dtype=F32)
  final, _ = lax.scan(body, state, xs)
  ref = emax.init(params, debias=True)
  for x in xs:
    ref, _ = body(ref, x)
  np.testing.assert_array_equal(final.average['w'], ref.average['w'])
  assert int(final.average['n']) == 5 and int(final.count) == 5


def test_no_recompile_on_second_call():
  update = jax.jit(lambda s, p, d: emax.update(s, p, d))
  state = emax.init({'w': jnp.ones(3)})
  for d in (0.9, 0.8, 0.99):
    state = update(state, {'w': jnp.zeros(3)}, jnp.asarray(d, F32))
  assert update._cache_size() == 1


def test_no_host_reads():
  state = emax.init({'w': jnp.ones(3), 'n': jnp.asarray(1)}, debias=True)
  update = jax.jit(emax.update)
  read = jax.jit(emax.ema_params)
  new = {'w': jnp.ones(3), 'n': jnp.asarray(2)}
  decay = jnp.asarray(0.5, F32)
  state = update(state, new, decay)
  read(state)
  with jax.transfer_guard_device_to_host('disallow'):
    state = update(state, new, decay)
    read(state)
    emax.ema_params(state)
    emax.update(state, new, decay)


# --- errors -----------------------------------------------------------------


def test_error_update_without_params():
  state = emax.init({'w': jnp.ones(2)})
  with pytest.raises(ValueError, match='needs the params, got None'):
    emax.update(state, None, 0.9)
  with pytest.raises(ValueError, match='needs the params'):
    emax.init(None)


def test_error_structure_names_leaf_path():
  state = emax.init({'weight': jnp.ones(2)})
  with pytest.raises(ValueError, match=r"missing from params: \['weight'\]"
                     r".*not in the EMA state: \['bias_term'\]"):
    emax.update(state, {'bias_term': jnp.ones(2)}, 0.9)


def test_error_shape_names_leaf_path():
  state = emax.init({'bias_term': jnp.ones(2)})
  with pytest.raises(ValueError, match=r"\['bias_term'\] has shape \(3,\)"
                     r" but the EMA state holds shape \(2,\)"):
    emax.update(state, {'bias_term': jnp.ones(3)}, 0.9)


def test_error_dtype_kind_names_leaf_path():
  state = emax.init({'bias_term': jnp.ones(2)})
  with pytest.raises(ValueError, match=r"\['bias_term'\] has dtype int32.*"
                     'a float leaf'):
    emax.update(state, {'bias_term': jnp.ones(2, jnp.int32)}, 0.9)


def test_error_shape_under_jit():
  state = emax.init({'w': jnp.ones(2)})
  with pytest.raises(ValueError, match=r"\['w'\] has shape"):
    jax.jit(emax.update)(state, {'w': jnp.ones(5)}, 0.9)


@pytest.mark.parametrize('decay', [-0.1, 1.5, float('nan')])
def test_error_decay_out_of_range(decay):
  state = emax.init({'w': jnp.ones(2)})
  with pytest.raises(ValueError, match=r'decay must be in \[0, 1\]'):
    emax.update(state, {'w': jnp.ones(2)}, decay)


def test_error_non_scalar_decay():
  state = emax.init({'w': jnp.ones(2)})
  with pytest.raises(ValueError, match='decay must be a scalar'):
    emax.update(state, {'w': jnp.ones(2)}, jnp.ones(2))


@pytest.mark.parametrize('finite', [
    jnp.array([True, False]), jnp.asarray(1.0), np.ones((), np.int32), 'yes'])
def test_error_finite_not_a_bool_scalar_names_finite(finite):
  state = emax.init({'w': jnp.ones(2)})
  new = {'w': jnp.full(2, 2.0)}
  match = r'finite must be a bool scalar.*got .*jnp\.all'
  with pytest.raises(ValueError, match=match):
    emax.update(state, new, 0.9, finite=finite)
  if not isinstance(finite, str):  # traced: refused by shape and dtype
    with pytest.raises(ValueError, match='emax.update: ' + match):
      jax.jit(lambda s, f: emax.update(s, new, 0.9, finite=f))(state, finite)
  tx = emax.ema(0.9)
  with pytest.raises(ValueError, match='emax.ema: ' + match):
    tx.update(new, tx.init(state.average), state.average, finite=finite)
  for ok in (True, np.bool_(False), jnp.asarray(True)):  # one flag: taken
    emax.update(state, new, 0.9, finite=ok)


def test_error_state_restored_without_target():
  state = emax.init({'w': jnp.ones(2)})
  as_dict = dict(state._asdict(), info=None)
  with pytest.raises(ValueError, match=r'expected an emax.EmaState, got dict'
                     r'.*restored without a target.*jax.eval_shape'):
    emax.update(as_dict, {'w': jnp.ones(2)}, 0.9)
  with pytest.raises(ValueError, match=r'restored without a target.*'
                     r'jax.eval_shape\(tx.init, params\)'):
    emax.ema_params(as_dict)
