"""The step's semantics: copies, step sizes, schedules of steps, the guard.

Each test pins one documented behaviour, against hand values, an independent
NumPy computation, or the peer's own rule.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import emax
from emax import _layout
from reference import NumpyEma

F32 = jnp.float32
MAX = np.iinfo(np.int32).max


def _apart():
  """An average and params where ``a - (a - p) != p`` for many elements."""
  rng = np.random.default_rng(0)
  a = (rng.normal(size=256) * 1e8).astype(np.float32)
  p = rng.normal(size=256).astype(np.float32)
  assert np.sum((a - (a - p)) != p) > 100
  return a, p


def _bits(x):
  return np.asarray(x).tobytes()


def _counted_jit(fn):
  """``jax.jit(fn)`` and a list that grows by one at every trace."""
  traces = []

  def traced(*args):
    traces.append(1)
    return fn(*args)

  return jax.jit(traced), traces


# --- a decay of exactly 0 is a bitwise copy, on every route --------------


@pytest.mark.parametrize('route', ['pure', 'pure-jit', 'traced', 'schedule',
                                   'step_size', 'optax', 'packed',
                                   'offloaded', 'named', 'lerp', 'optax-rnd'])
def test_decay_zero_copies_bit_for_bit(route):
  a, p = _apart()
  start, new = {'w': jnp.asarray(a)}, {'w': jnp.asarray(p)}
  kw = {}
  if route == 'packed':
    kw = {'pack': True}
  elif route == 'offloaded':
    kw = {'offload': True}
  names = ('x', 'y') if route == 'named' else None
  state = emax.init(start, names=names, **kw)
  if route in ('pure', 'packed', 'offloaded'):
    out = emax.update(state, new, 0.0)
  elif route == 'pure-jit':
    out = jax.jit(emax.update)(state, new, 0.0)
  elif route == 'traced':
    out = jax.jit(emax.update)(state, new, jnp.asarray(0.0))
  elif route == 'schedule':
    out = emax.update(state, new, lambda n: jnp.zeros([], F32))
  elif route == 'step_size':
    out = emax.update(state, new, step_size=1.0)
  elif route == 'named':
    out = emax.update(state, new, {'x': 0.0, 'y': 0.5})
  elif route == 'lerp':
    out = emax.update(state, new, 0.0, rounding='lerp')
  elif route == 'optax-rnd':
    out = emax.update(state, new, step_size=1.0, rounding='optax')
  else:
    tx = emax.ema(0.0)
    _, out = jax.jit(tx.update)({'w': jnp.zeros(256)}, tx.init(new), start)
    out = jax.tree.map(lambda x: x, out)
    # The transformation averaged params + updates = start: copy of start.
    assert _bits(emax.ema_params(out)['w']) == _bits(a)
    return
  got = emax.ema_params(out, 'x' if names else None)['w']
  assert _bits(got) == _bits(p)
  if names:  # the other name averaged normally
    half = emax.ema_params(out, 'y')['w']
    np.testing.assert_allclose(half, a - np.float32(0.5) * (a - p), rtol=1e-6)


def test_start_step_and_reset_copy_bit_for_bit():
  a, p = _apart()
  tx = emax.ema(0.9, start_step=2)
  state = tx.init({'w': jnp.asarray(a)})
  _, state = tx.update({'w': jnp.zeros(256)}, state, {'w': jnp.asarray(p)})
  assert _bits(emax.ema_params(state)['w']) == _bits(p)
  state = emax.init({'w': jnp.asarray(a)}, debias=True)
  state = emax.update(state, {'w': jnp.asarray(a)}, 0.9)
  reset = emax.reset(state, {'w': jnp.asarray(p)})
  assert _bits(emax.ema_params(reset)['w']) == _bits(p)
  assert float(reset.weight) == 1.0 and int(reset.count) == 1
  # On an optax state: the same kind of thing comes back.
  opt_state = emax.with_ema(optax.sgd(0.1), 0.9).init({'w': jnp.asarray(a)})
  again = emax.reset(opt_state, {'w': jnp.asarray(p)})
  assert isinstance(again, emax.WithEmaState)
  assert _bits(emax.ema_params(again)['w']) == _bits(p)


@pytest.mark.parametrize('jit', [False, True])
def test_debias_after_start_step_copies_starts_from_the_copy(jit):
  # debias=True with start_step=2: the copies set the weight to exactly one,
  # so the averaging steps after them start from the copy (not from zero)
  # and reads are not divided; the NumPy reference follows the same rule.
  rng = np.random.default_rng(5)
  ps = [rng.normal(size=6).astype(np.float32) for _ in range(6)]
  ref = NumpyEma([ps[0]], debias=True, start_step=2)
  state = emax.init({'w': jnp.asarray(ps[0])}, debias=True)
  update = functools.partial(emax.update, start_step=2)
  update = jax.jit(update) if jit else update
  for t, p in enumerate(ps[1:], start=1):
    state = update(state, {'w': jnp.asarray(p)}, 0.8)
    ref.step([p], 0.8)
    assert float(state.weight) == float(ref.weight[None]), t
    np.testing.assert_array_equal(state.average['w'], ref.average[None][0])
    np.testing.assert_array_equal(emax.ema_params(state)['w'], ref.read()[0])
    if t <= 2:  # copies: weight one, the params bit for bit, step size one
      assert float(state.weight) == 1.0 and float(state.step_size) == 1.0
      assert _bits(emax.ema_params(state)['w']) == _bits(p)


# --- step sizes as users write them ------------------------------------------


def test_step_size_forms_and_their_precision():
  params = {'w': jnp.ones(3)}
  state = emax.init(params)
  cases = [
      # (kwargs, the float32 step size expected)
      (dict(decay=0.9998), np.float32(1) - np.float32(0.9998)),  # TF order
      (dict(decay=0.9998, rounding='lerp'), np.float32(1.0 - 0.9998)),
      (dict(step_size=2e-4), np.float32(2e-4)),
      (dict(step_size=2e-4, rounding='optax'), np.float32(2e-4)),
      (dict(decay=jnp.float32(0.9998)),
       np.float32(1) - np.float32(0.9998)),
  ]
  for kw, want in cases:
    got = emax.update(state, params, **kw).step_size
    assert np.float32(got) == want, (kw, float(got), float(want))
  # TensorFlow's order loses most bits of a step size near 1e-6; the float64
  # host form keeps it to a float32 rounding.
  tf_order = float(np.float32(1) - np.float32(0.999999))
  exact = float(emax.update(state, params, 0.999999, rounding='lerp').step_size)
  assert abs(tf_order / 1e-6 - 1) > 0.01
  assert abs(exact / 1e-6 - 1) < 1e-7


def test_update_every_compensates_accurately_or_per_update():
  params = {'w': jnp.ones(2)}
  state = emax.init(params)
  kw = dict(update_every=4, first_update=1)
  got = float(emax.update(state, params, 0.999, **kw).step_size)
  np.testing.assert_allclose(got, 1 - 0.999 ** 4, rtol=1e-7)
  got = float(emax.update(state, params, 0.999, per_update=True,
                          **kw).step_size)
  assert got == np.float32(1) - np.float32(0.999)
  # Traced decays: the float32 step size 1 - d ** 4 without cancellation.
  got = float(jax.jit(functools.partial(emax.update, **kw))(
      state, params, jnp.float32(0.9999)).step_size)
  np.testing.assert_allclose(got, 1 - np.float64(np.float32(0.9999)) ** 4,
                             rtol=1e-6)


@pytest.mark.parametrize('rounding', ['tensorflow', 'lerp', 'optax', 'nnx'])
@pytest.mark.parametrize('jit', [False, True])
def test_schedule_rates_under_update_every_match_reference(rounding, jit):
  # A schedule's rate (traced under jit: the count is) stands for
  # update_every=3 steps: step size 1 - d ** 3 and decay d ** 3, as the
  # NumPy reference computes them in float64 (emax in float32, without
  # cancellation: an ulp or so apart). Both forms of schedule: a plain
  # callable (a decay) and an emax.Schedule (decay and step size).
  table = np.asarray([0.5, 0.9, 0.99, 0.75, 0.999, 0.6, 0.8], np.float32)
  def plain(n):  # emax.Schedule passes n as float32
    return jnp.asarray(table)[jnp.asarray(n).astype(jnp.int32) % 7]

  schedule = emax.Schedule(plain, lambda n: 1 - plain(n), 'table')
  rng = np.random.default_rng(11)
  ps = [rng.normal(size=5).astype(np.float32) for _ in range(16)]
  for decay in (plain, schedule):
    ref = NumpyEma([ps[0]], update_every=3, first_update=1)
    state = emax.init({'w': jnp.asarray(ps[0])})
    update = functools.partial(emax.update, decay=decay, update_every=3,
                               first_update=1, rounding=rounding)
    update = jax.jit(update) if jit else update
    for t, p in enumerate(ps[1:]):
      state = update(state, {'w': jnp.asarray(p)})
      ref.step([p], table[t % 7], rounding=rounding)
      np.testing.assert_allclose(state.average['w'], ref.average[None][0],
                                 rtol=2e-6, atol=1e-7)
      if t % 3 == 0:  # an averaging step: its step size is recorded
        np.testing.assert_allclose(
            float(state.step_size), 1 - np.float64(table[t % 7]) ** 3,
            rtol=1e-6)


@pytest.mark.parametrize('every, first, start', [(3, None, 0), (3, 1, 0),
                                                 (5, 7, 2), (1, 4, 0)])
def test_schedule_of_steps_matches_reference(every, first, start):
  rng = np.random.default_rng(every * 10 + (first or 0))
  p0 = rng.normal(size=(4,)).astype(np.float32)
  ref = NumpyEma([p0], update_every=every, start_step=start,
                 first_update=first, per_update=True)
  state = emax.init({'w': jnp.asarray(p0)})
  step, traces = _counted_jit(functools.partial(
      emax.update, update_every=every, first_update=first, start_step=start,
      per_update=True))
  for _ in range(17):
    p = rng.normal(size=(4,)).astype(np.float32)
    state = step(state, {'w': jnp.asarray(p)}, 0.75)
    ref.step([p], 0.75)
    np.testing.assert_array_equal(state.average['w'], ref.average[None][0])
  assert len(traces) == 1


# --- rates: validation, NaN, schedules in the pure API -------------------------


BAD_ARRAYS = [jnp.asarray(1.5), jnp.asarray(jnp.nan), np.array(-0.5)]


@pytest.mark.parametrize('bad', BAD_ARRAYS, ids=['1.5', 'nan', '-0.5'])
def test_concrete_array_rates_out_of_range_are_refused(bad):
  params = {'w': jnp.ones(2)}
  with pytest.raises(ValueError, match=r'decay must be in \[0, 1\]'):
    emax.update(emax.init(params), params, bad)
  with pytest.raises(ValueError, match=r'decay must be in \[0, 1\]'):
    emax.ema(bad)
  with pytest.raises(ValueError, match=r'decay must be in \[0, 1\]'):
    emax.tf_decay(bad)
  with pytest.raises(ValueError, match=r'step_size must be in \[0, 1\]'):
    emax.with_ema(optax.sgd(0.1), step_size=bad)


@pytest.mark.parametrize('bad, error, match', [
    ('0.999', TypeError, 'decay must be a float in'),
    (True, TypeError, 'decay must be a float in'),
    (None, TypeError, 'exactly one of decay and step_size'),
    (1.5, ValueError, r'decay must be in \[0, 1\]'),
    (jnp.ones(2), ValueError, 'decay must be a scalar'),
    ({'a': 0.9, 'b': 'x'}, TypeError, "For the average 'b'"),
])
def test_every_entry_point_validates_the_decay_the_same_way(bad, error, match):
  params = {'w': jnp.ones(2)}
  for make in (lambda: emax.ema(bad), lambda: emax.with_ema(optax.sgd(1), bad),
               lambda: emax.update(emax.init(params), params, bad)):
    with pytest.raises(error, match=match):
      make()
  if not isinstance(bad, dict) and bad is not None:
    with pytest.raises((TypeError, ValueError)):
      emax.tf_decay(bad)


def test_schedule_returning_nan_is_skipped_and_counted():
  table = jnp.asarray([0.5, jnp.nan, 0.5], F32)
  tx = emax.ema(lambda n: table[n])
  params = {'w': jnp.ones(2)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for target in (3.0, 100.0, 5.0):
    _, state = update({'w': jnp.full(2, target - 1.0)}, state, params)
  assert int(state.skipped) == 1
  # 1 -> 2 (half way to 3), the NaN step skipped, then half way to 5.
  np.testing.assert_array_equal(emax.ema_params(state)['w'], [3.5, 3.5])


def timm_model_ema_v3(params, decay, update_after_step, warmup_gamma=1.0,
                      warmup_power=2 / 3):
  """timm's ``ModelEmaV3(use_warmup=True, update_after_step=k)`` with
  ``update(model, step=t)`` for ``t = 1, 2, ...``, in float64 NumPy: its
  ``get_decay`` and ``lerp_(p, 1 - decay)`` transcribed (a decay of 0
  copies)."""
  ema = np.asarray(params[0], np.float64)
  for t, p in enumerate(params[1:], start=1):
    step = max(0, t - update_after_step - 1)
    d = 0.0
    if step > 0:
      d = 1 - (1 + step / warmup_gamma) ** -warmup_power
      d = max(min(d, decay), 0.0)
    ema = ema + (1 - d) * (np.asarray(p, np.float64) - ema)
  return ema


@pytest.mark.parametrize('jit', [False, True])
def test_a_nan_rate_on_a_copy_step_does_not_stop_the_copy(jit):
  # timm's warm-up shifted by update_after_step=k, written the natural way:
  # the schedule is NaN before step k, where start_step copies and the rate
  # is not used. Those copies happen and are not counted as skipped.
  k, decay = 5, 0.999
  warmup = emax.inverse_power_decay(decay, inv_gamma=1.0, power=2 / 3)
  assert np.isnan(warmup(jnp.asarray(-3)))
  rng = np.random.default_rng(3)
  params = [rng.normal(size=8).astype(np.float32) for _ in range(21)]
  options = dict(decay=lambda n: warmup(n - k), start_step=k + 1,
                 rounding='lerp')
  update = jax.jit(functools.partial(emax.update, **options)) if jit else (
      functools.partial(emax.update, **options))
  state = emax.init({'w': jnp.asarray(params[0])})
  for p in params[1:]:
    state = update(state, {'w': jnp.asarray(p)})
  want = timm_model_ema_v3(params, decay, update_after_step=k)
  np.testing.assert_allclose(emax.ema_params(state)['w'], want, rtol=1e-5,
                             atol=1e-6)
  assert int(state.skipped) == 0
  # The same rate on a step that averages (no start_step) is skipped and
  # counted; on a keep step (update_every=2) it is not looked at.
  fresh = emax.init({'w': jnp.asarray(params[0])})
  step = {'w': jnp.asarray(params[1])}
  for kw, skipped in ((dict(start_step=0), 1),
                      (dict(start_step=0, update_every=2), 0)):
    one = functools.partial(emax.update, **dict(options, **kw))
    out = (jax.jit(one) if jit else one)(fresh, step)
    assert int(out.skipped) == skipped, kw
    assert _bits(out.average['w']) == _bits(params[0])


def test_schedule_in_the_pure_update_is_called_with_the_count():
  seen = []
  params = {'w': jnp.ones(2)}
  state = emax.init(params)
  for _ in range(3):
    state = emax.update(state, params,
                        lambda n: (seen.append(int(n)), jnp.float32(0.5))[1])
  assert seen == [0, 1, 2]
  via_tx = emax.ema(emax.tf_decay(0.9))
  s_tx = via_tx.init(params)
  s_pure = emax.init(params)
  for k in range(4):
    new = {'w': jnp.full(2, float(k))}
    _, s_tx = via_tx.update(jax.tree.map(lambda a, b: a - b, new, params),
                            s_tx, params)
    s_pure = emax.update(s_pure, new, emax.tf_decay(0.9))
  np.testing.assert_array_equal(s_tx.average['w'], s_pure.average['w'])


def test_injectable_decay():
  tx = optax.inject_hyperparams(emax.ema)(decay=0.5)
  params = {'w': jnp.zeros(2)}
  state = tx.init(params)
  update, traces = _counted_jit(tx.update)
  _, state = update({'w': jnp.full(2, 4.0)}, state, params)
  np.testing.assert_array_equal(emax.ema_params(state)['w'], [2.0, 2.0])
  state.hyperparams['decay'] = jnp.asarray(0.75, F32)
  _, state = update({'w': jnp.full(2, 4.0)}, state, params)
  np.testing.assert_array_equal(emax.ema_params(state)['w'], [2.5, 2.5])
  assert len(traces) == 1
  np.testing.assert_array_equal(
      emax.ema_params(emax.ema(jnp.float32(0.5)).init(params))['w'], 0.0)


@pytest.mark.parametrize('kw, match', [
    (dict(debias='false'), 'debias must be True or False'),
    (dict(offload='no'), 'offload must be True or False'),
    (dict(skip_nonfinite=1), 'skip_nonfinite must be True or False'),
    (dict(per_update='yes'), 'per_update must be True or False'),
    (dict(update_every=2 ** 31), r'update_every must be an int in \[1, '),
    (dict(start_step=2 ** 31), r'start_step must be an int in \[0, '),
    (dict(update_every=2.0), 'update_every must be an int'),
    (dict(rounding='tf'), 'rounding must be one of'),
])
def test_option_types_are_checked_at_construction(kw, match):
  with pytest.raises((TypeError, ValueError), match=match):
    emax.ema(0.9, **kw)


def test_power_function_decay_keeps_moving_at_every_step_count():
  for gamma in (6.94, 16.97):
    schedule = emax.power_function_decay(gamma)
    for n in (1e5, 1e6, 1e7, 2.0 ** 25, 2.0 ** 30):
      want = -np.expm1((gamma + 1) * np.log1p(-1 / (n + 1)))  # float64
      got = float(schedule.step_size(jnp.asarray(n, F32)))
      nf = float(np.float32(n))  # the count as float32 sees it
      want = -np.expm1((gamma + 1) * np.log1p(-1 / (nf + 1)))
      assert abs(got / want - 1) < 1e-6, (gamma, n, got, want)
      if n <= 2 ** 25:  # below, float32 can still tell the decay from 1
        assert float(schedule(jnp.asarray(n, F32))) < 1.0


# --- trees: Python scalars, packed updates, mixed dtypes, many chunks ---------


def test_python_scalar_leaves_update_like_arrays():
  state = emax.init({'lr': 0.5, 'n': 3})
  state = emax.update(state, {'lr': 1.0, 'n': 4}, 0.5)
  out = emax.ema_params(state)
  assert float(out['lr']) == 0.75 and int(out['n']) == 4


@pytest.mark.parametrize('pack', [False, True])
def test_updates_of_another_shape_are_refused_naming_the_leaf(pack):
  params = {'a': jnp.ones((2, 3)), 'b': jnp.ones((6,))}
  tx = emax.ema(0.9, pack=pack)
  state = tx.init(params)
  updates = {'a': jnp.ones((3, 2)), 'b': jnp.ones((6,))}  # same total size
  with pytest.raises(ValueError, match=r"updates leaf \['a'\] has shape"):
    tx.update(updates, state, params)


@pytest.mark.standard_promotion  # optax.apply_updates mixes bf16 and f32
def test_packed_params_plus_updates_in_mixed_dtypes_as_optax_computes():
  rng = np.random.default_rng(1)
  params = {'h': jnp.asarray(rng.normal(size=7), jnp.bfloat16),
            'g': jnp.asarray(rng.normal(size=5), jnp.bfloat16)}
  updates = {'h': jnp.asarray(rng.normal(size=7) * 1e-3, F32),  # f32 update
             'g': jnp.asarray(rng.normal(size=5) * 1e-3, jnp.bfloat16)}
  want = optax.apply_updates(params, updates)
  for pack in (False, True):
    tx = emax.ema(0.0, pack=pack, skip_nonfinite=False)
    _, state = tx.update(updates, tx.init(params), params)
    got = emax.ema_params(state)
    for k in params:
      assert _bits(got[k]) == _bits(want[k]), (pack, k)


def test_packed_layout_with_several_chunks(monkeypatch):
  monkeypatch.setattr(_layout, 'CHUNK', 16)
  rng = np.random.default_rng(2)
  params = {f'p{i}': jnp.asarray(rng.normal(size=(5,)), F32)
            for i in range(9)}
  packed, plain = emax.init(params, pack=True), emax.init(params)
  assert len(packed.average.buffers) >= 3
  for _ in range(3):
    new = {k: jnp.asarray(rng.normal(size=(5,)), F32) for k in params}
    packed = jax.jit(emax.update)(packed, new, 0.7)
    plain = emax.update(plain, new, 0.7)
  for k in params:
    assert _bits(emax.ema_params(packed)[k]) == _bits(
        emax.ema_params(plain)[k])


# --- counting: saturation, NaN on keep steps ------------------------------------


def test_count_saturates_and_later_steps_still_average():
  params = {'w': jnp.zeros(2)}
  state = emax.init(params)._replace(count=jnp.asarray(MAX - 2, jnp.int32))
  step = jax.jit(functools.partial(emax.update, update_every=3,
                                   start_step=5))
  for k in range(5):
    state = step(state, {'w': jnp.full(2, float(k + 1))}, 0.5)
  assert int(state.count) == MAX
  # Steps MAX-1 (on the grid? no) ... then saturated steps average: never a
  # copy, and the average moved toward the latest params.
  w = float(emax.ema_params(state)['w'][0])
  assert 0.0 < w < 5.0


def test_nan_on_a_keep_step_is_neither_checked_nor_counted():
  tx = emax.ema(0.5, update_every=3)
  params = {'w': jnp.ones(2)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  nan = {'w': jnp.asarray([jnp.nan, 0.0])}
  zero = {'w': jnp.zeros(2)}
  _, state = update(nan, state, params)  # step 1: keep
  _, state = update(zero, state, params)  # step 2: keep
  assert int(state.skipped) == 0
  _, state = update(nan, state, params)  # step 3: averages -> skipped
  assert int(state.skipped) == 1
  np.testing.assert_array_equal(state.average['w'], [1.0, 1.0])


# --- named averages ----------------------------------------------------------


@pytest.mark.parametrize('kw', [{}, {'debias': True}, {'pack': True},
                                {'update_every': 2, 'start_step': 1},
                                {'offload': True},
                                {'accumulator_dtype': jnp.float64}])
def test_named_averages_equal_single_averages_bit_for_bit(kw):
  rng = np.random.default_rng(3)
  params = {'w': jnp.asarray(rng.normal(size=(6, 4)), jnp.bfloat16),
            'b': jnp.asarray(rng.normal(size=(3,)), F32),
            'n': jnp.asarray(1, jnp.int32)}
  decays = {'fast': 0.9, 'slow': emax.power_function_decay(sigma_rel=0.1),
            'tf': emax.tf_decay(0.99)}
  kw = dict(kw)
  with jax.enable_x64(bool(kw.get('accumulator_dtype'))):
    multi = emax.ema(decays, **kw)
    singles = {k: emax.ema(d, **kw) for k, d in decays.items()}
    m_state = multi.init(params)
    s_states = {k: t.init(params) for k, t in singles.items()}
    m_update, traces = _counted_jit(multi.update)
    s_updates = {k: jax.jit(t.update) for k, t in singles.items()}
    for _ in range(5):
      grads = {'w': jnp.asarray(rng.normal(size=(6, 4)), jnp.bfloat16),
               'b': jnp.asarray(rng.normal(size=(3,)), F32), 'n': None}
      _, m_state = m_update(grads, m_state, params)
      for k in singles:
        _, s_states[k] = s_updates[k](grads, s_states[k], params)
      params = {'w': (params['w'] + grads['w']).astype(jnp.bfloat16),
                'b': params['b'] + grads['b'], 'n': params['n'] + 1}
    assert len(traces) == 1
    for k in decays:
      for dtypes in ('params', 'accumulator'):
        got = emax.ema_params(m_state, k, dtypes=dtypes)
        want = emax.ema_params(s_states[k], dtypes=dtypes)
        for leaf in ('w', 'b'):
          assert _bits(got[leaf]) == _bits(want[leaf]), (k, leaf, dtypes)
      assert float(m_state.weight[m_state.info.names.index(k)]) == float(
          s_states[k].weight)


def test_named_average_errors_list_the_names():
  params = {'w': jnp.ones(2)}
  state = emax.init(params, names=('fast', 'slow'))
  with pytest.raises(ValueError, match=r"2 named averages, \['fast', 'slow'\]"):
    emax.ema_params(state)
  with pytest.raises(ValueError, match=r"no average named 'mid'.*\['fast'"):
    emax.ema_params(state, 'mid')
  with pytest.raises(ValueError, match=r'one rate, but the state holds the'
                     r" named averages \['fast', 'slow'\]"):
    emax.update(state, params, 0.9)
  with pytest.raises(ValueError, match=r"rates for \['fast'\], but the state"):
    emax.update(state, params, {'fast': 0.9})
  with pytest.raises(ValueError, match='single, unnamed average'):
    emax.ema_params(emax.init(params), 'fast')
  with pytest.raises(ValueError, match='names must be distinct'):
    emax.init(params, names=['a', 'a'])
  # Any order of the mapping: rates are matched by name.
  out = emax.update(state, {'w': jnp.zeros(2)}, {'slow': 0.9, 'fast': 0.5})
  np.testing.assert_allclose(emax.ema_params(out, 'fast')['w'], 0.5)
  np.testing.assert_allclose(emax.ema_params(out, 'slow')['w'], 0.9)


def test_named_averages_keep_sharding():
  mesh = jax.make_mesh((4,), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  params = {'w': jax.device_put(jnp.arange(16.0), sharding)}
  state = emax.init(params, names=('a', 'b'))
  assert state.average['w'].shape == (2, 16)
  assert state.average['w'].sharding.spec == jax.sharding.PartitionSpec(
      None, 'data')
  stepped = jax.jit(emax.update)(state, params, {'a': 0.5, 'b': 0.9})
  assert stepped.average['w'].sharding.spec == jax.sharding.PartitionSpec(
      None, 'data')
  assert emax.ema_params(stepped, 'a')['w'].sharding.spec == (
      jax.sharding.PartitionSpec('data'))


# --- the wrapper, write-back, metrics, pmap --------------------------------------


@pytest.mark.standard_promotion  # optax.adam is not strict-clean
def test_with_ema_equals_the_right_chain_and_not_the_wrong_one():
  rng = np.random.default_rng(4)
  params = {'w': jnp.asarray(rng.normal(size=(5,)), F32)}
  wrapped = emax.with_ema(optax.adam(0.1), 0.9)
  right = optax.chain(optax.adam(0.1), emax.ema(0.9))
  wrong = optax.chain(emax.ema(0.9), optax.adam(0.1))
  states = [t.init(params) for t in (wrapped, right, wrong)]
  ps = [params] * 3
  for _ in range(4):
    g = {'w': jnp.asarray(rng.normal(size=(5,)), F32)}
    for i, t in enumerate((wrapped, right, wrong)):
      u, states[i] = jax.jit(t.update)(g, states[i], ps[i])
      ps[i] = optax.apply_updates(ps[i], u)
  read = [emax.ema_params(s)['w'] for s in states[:2]]
  assert _bits(read[0]) == _bits(read[1])
  with pytest.warns(UserWarning, match='placed before ScaleByAdamState'):
    misplaced = emax.ema_params(states[2])['w']
  assert not np.allclose(misplaced, read[0])


@pytest.mark.standard_promotion
def test_with_ema_inside_multisteps_and_around_inject_hyperparams():
  params = {'w': jnp.zeros(2)}
  tx = optax.MultiSteps(emax.with_ema(optax.sgd(1.0), 0.5), every_k_schedule=2)
  state = tx.init(params)
  for _ in range(4):  # two real steps of -1 each
    u, state = tx.update({'w': jnp.ones(2)}, state, params)
    params = optax.apply_updates(params, u)
  assert int(emax.get_ema_state(state).count) == 2
  np.testing.assert_allclose(emax.ema_params(state)['w'], [-1.25, -1.25])
  # An injected optimizer inside: its learning rate can change, the average
  # is found.
  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  tx = emax.with_ema(inner, 0.5)
  s = tx.init({'w': jnp.zeros(2)})
  update, traces = _counted_jit(tx.update)
  _, s = update({'w': jnp.ones(2)}, s, {'w': jnp.zeros(2)})
  s.inner_state.hyperparams['learning_rate'] = jnp.asarray(2.0, F32)
  u, s = update({'w': jnp.ones(2)}, s, {'w': jnp.full(2, -1.0, F32)})
  np.testing.assert_allclose(u['w'], [-2.0, -2.0])
  np.testing.assert_allclose(emax.ema_params(s)['w'], [-1.75, -1.75])
  assert len(traces) == 1


@pytest.mark.parametrize('scale', [1.0, 1e3])
def test_write_back_moves_params_onto_the_average(scale):
  rng = np.random.default_rng(5)
  params = {'w': jnp.asarray(rng.normal(size=(64,)) * scale, F32),
            'h': jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16)}
  tx = emax.with_ema(optax.sgd(0.1), 0.9, write_back_every=3)
  state = tx.init(params)
  for n in range(1, 7):
    g = {'w': jnp.asarray(rng.normal(size=(64,)) * scale, F32),
         'h': jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16)}
    u, state = jax.jit(tx.update)(g, state, params)
    before, params = params, optax.apply_updates(params, u)
    if n % 3 == 0:
      avg = emax.ema_params(state)
      for k in params:
        p = np.asarray(params[k], np.float64)
        a = np.asarray(avg[k], np.float64)
        # Within one ulp of the larger of the average and the params before
        # the step (Sterbenz: bitwise where the two are within a factor 2).
        old = np.asarray(before[k], np.float64)
        ulp = np.spacing(np.maximum(np.abs(a), np.abs(old)).astype(
            np.asarray(params[k]).dtype)).astype(np.float64)
        assert np.all(np.abs(p - a) <= ulp), k
        close = (np.abs(a) <= 2 * np.abs(old)) & (np.abs(old) <= 2 * np.abs(a))
        close &= np.sign(a) == np.sign(old)
        assert np.all(p[close] == a[close]), k
  with pytest.raises(ValueError, match='write_back_name=.fast. names an'):
    emax.ema(0.9, write_back_every=2, write_back_name='fast')


def test_metrics_values_and_one_compile():
  params = {'w': jnp.asarray([1.0, 2.0]), 'i': jnp.asarray(3)}
  tx = emax.ema({'a': 0.75, 'b': 0.5})
  state = tx.init(params)
  new = {'w': jnp.asarray([3.0, 4.0]), 'i': jnp.asarray(3)}
  _, state = tx.update(jax.tree.map(lambda a, b: a - b, new, params), state,
                       params)
  metrics, traces = _counted_jit(emax.metrics)
  got = metrics(state, new)
  got = metrics(state, new)  # no second trace
  assert len(traces) == 1
  assert float(got['decay/a']) == 0.75 and float(got['window/b']) == 2.0
  assert int(got['count']) == 1 and int(got['skipped']) == 0
  avg = np.asarray([1.5, 2.5])  # a: 1 -> 3 a quarter of the way
  want = np.linalg.norm(avg - [3.0, 4.0]) / np.linalg.norm([3.0, 4.0])
  np.testing.assert_allclose(float(got['distance/a']), want, rtol=1e-6)
  fresh = emax.metrics(emax.init(params))
  assert float(fresh['window']) == np.inf and 'distance' not in fresh


def test_readers_on_a_pmap_replicated_state():
  n = 2
  params = {'w': jnp.arange(4.0)}
  state = emax.init(params)
  # What flax.jax_utils.replicate gives: a leading device axis everywhere.
  replicated = jax.pmap(lambda s: s)(
      jax.tree.map(lambda x: jnp.stack([x] * n), state))

  @functools.partial(jax.pmap, axis_name='i')
  def step(s):
    return emax.update(s, {'w': jnp.full(4, 8.0)}, 0.5)

  stepped = step(replicated)
  out = emax.ema_params(stepped)
  assert out['w'].shape == (n, 4)
  np.testing.assert_array_equal(out['w'], np.tile([4.0, 4.5, 5.0, 5.5],
                                                  (n, 1)))
  assert emax.ema_params(stepped, dtypes='accumulator')['w'].shape == (n, 4)


@pytest.mark.parametrize('rounding', ['tensorflow', 'lerp', 'optax', 'nnx'])
def test_every_rounding_skips_nan_on_average_and_copy_steps(rounding):
  params = {'w': jnp.asarray([1.0, -0.0, 3.0])}
  nan = {'w': jnp.asarray([0.0, jnp.nan, 1.0])}
  for kw in ({}, {'start_step': 1}, {'decay': 0.0}):
    kw = dict({'decay': 0.5}, **kw)
    out = jax.jit(functools.partial(emax.update, rounding=rounding, **kw))(
        emax.init(params), nan)
    assert int(out.skipped) == 1, kw
    assert _bits(out.average['w']) == _bits(params['w']), kw
