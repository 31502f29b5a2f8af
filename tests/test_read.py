"""The readers: emax.ema_params (both dtypes), the flax readers, metrics."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import emax

NAMES = {'a': 0.5, 'b': 0.9}


def _named_state(decays=None, params=None, target=1.0, **init_options):
  """A named state started from ``params`` (zeros), one step to ``target``."""
  decays = NAMES if decays is None else decays
  params = ({'w': jnp.zeros(3), 'i': jnp.asarray(2)} if params is None
            else params)
  state = emax.init(params, names=tuple(decays), **init_options)
  new = jax.tree.map(lambda x: jnp.full_like(x, target), params)
  return emax.update(state, new, decays), new


# --- ema_params: one reader, two dtypes ------------------------------------


def test_accumulator_dtypes_are_the_same_values_unrounded():
  params = {'w': jnp.asarray([0.5, 1.0, 3.0], jnp.bfloat16),
            'n': jnp.asarray(3)}
  state = emax.init(params)
  new = {'w': jnp.asarray([0.7, 2.1, -1.3], jnp.bfloat16), 'n': jnp.asarray(4)}
  state = emax.update(state, new, 0.9)
  full = emax.ema_params(state, dtypes='accumulator')
  evaluated = emax.ema_params(state)
  assert full['w'].dtype == jnp.float32 and evaluated['w'].dtype == jnp.bfloat16
  assert full['n'].dtype == evaluated['n'].dtype == jnp.int32
  # float64 reference of the float32 average, from the bf16 inputs.
  p = np.asarray(params['w'], np.float64)
  x = np.asarray(new['w'], np.float64)
  np.testing.assert_allclose(np.asarray(full['w'], np.float64),
                             0.9 * p + 0.1 * x, rtol=1e-6)
  np.testing.assert_array_equal(evaluated['w'],
                                full['w'].astype(jnp.bfloat16))
  assert int(full['n']) == int(evaluated['n']) == 4


@pytest.mark.parametrize('bad', ['float32', 'param', None, jnp.float32, 1])
def test_bad_dtypes_is_refused_naming_the_choices(bad):
  state = emax.init({'w': jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"emax.ema_params: dtypes must be"
                     r" 'params' .* or 'accumulator' .*; got "):
    emax.ema_params(state, dtypes=bad)


# --- the flax readers agree with emax.ema_params on names ------------------


def _readers(decays):
  """Each reader as ``read(name)`` over states trained the same way."""
  pytest.importorskip('flax')
  from flax import nnx
  import emax.flax
  import emax.nnx

  tx = emax.with_ema(optax.sgd(1.0), decays)
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = nnx.grad(lambda m: m(jnp.ones((1, 2))).sum())(model)
  opt.update(model, grads)
  linen = emax.flax.EmaTrainState.create(
      apply_fn=lambda v, x: x, params=dict(params), tx=tx)
  linen = linen.apply_gradients(grads=dict(nnx.as_pure(grads)))
  return {
      'emax.ema_params': lambda name: emax.ema_params(linen.opt_state, name),
      'emax.nnx.ema_params': lambda name: emax.nnx.ema_params(opt, name),
      'emax.nnx.ema_model': lambda name: nnx.as_pure(nnx.state(
          emax.nnx.ema_model(model, opt, name), nnx.Param)),
      'EmaTrainState.eval_variables':
          lambda name: linen.eval_variables(name)['params'],
  }, linen


def _body(where, message):
  """The message without its ``where: `` prefix (the caller's name)."""
  assert message.startswith(where + ': '), (where, message)
  return message[len(where) + 2:]


def _values(tree):
  return {k: np.asarray(v) for k, v in dict(tree).items()}


def test_readers_agree_on_one_name():
  readers, linen = _readers({'only': 0.5})
  want = _values(emax.ema_params(linen.opt_state))
  for where, read in readers.items():
    for name in (None, 'only'):
      got = _values(read(name))
      assert got.keys() == want.keys(), where
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=where)
  got = _values(linen.ema_params)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize('name', [None, 'mid'])
def test_readers_refuse_a_missing_or_unknown_name_with_one_message(name):
  readers, linen = _readers({'fast': 0.5, 'slow': 0.75})
  bodies = set()
  for where, read in readers.items():
    with pytest.raises(ValueError, match=r"\['fast', 'slow'\]") as info:
      read(name)
    bodies.add(_body(where, str(info.value)))
  assert len(bodies) == 1, bodies  # one rule, one message
  body, = bodies
  expected = ("this state holds 2 named averages, ['fast', 'slow']; say which"
              " one, e.g. name='fast'." if name is None else
              "no average named 'mid'; this state holds ['fast', 'slow'].")
  assert body == expected
  if name is None:  # the property takes no name: same message, and the fix
    with pytest.raises(ValueError) as info:
      linen.ema_params  # pylint: disable=pointless-statement
    message = _body('EmaTrainState.ema_params', str(info.value))
    assert message.startswith(body)
    assert 'state.eval_variables(name=...)["params"]' in message
  # Each named average reads the same through every reader.
  for name in ('fast', 'slow'):
    want = _values(emax.ema_params(linen.opt_state, name))
    for where, read in readers.items():
      got = _values(read(name))
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=where)


# --- metrics ----------------------------------------------------------------


def test_metrics_counts_are_int32_and_the_rest_float32():
  params = {'w': jnp.ones(3, jnp.bfloat16), 'i': jnp.asarray(1)}
  for names in (None, ('a', 'b')):
    state = emax.init(params, names=names)
    rates = 0.5 if names is None else {'a': 0.5, 'b': 0.75}
    state = emax.update(state, params, rates)
    m = emax.metrics(state, params)
    for key, value in m.items():
      want = jnp.int32 if key in ('count', 'skipped') else jnp.float32
      assert value.dtype == want and value.shape == (), (names, key)


def test_metrics_distance_of_each_named_average_from_its_own_average():
  """Each name's distance is its own average's, as the decays say."""
  decays = {'a': 0.5, 'b': 0.9, 'c': 0.99}
  params = {'w': jnp.zeros(3), 'v': jnp.zeros((2, 2), jnp.bfloat16)}
  state, new = _named_state(decays, params)
  got = emax.metrics(state, new)
  for name, d in decays.items():
    # float64: one step from zeros toward ones leaves d * 0 + (1 - d) * 1.
    target = np.ones(7)
    average = (1 - d) * target
    want = np.linalg.norm(average - target) / np.linalg.norm(target)
    np.testing.assert_allclose(float(got[f'distance/{name}']), want,
                               rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(float(got[f'decay/{name}']), d, rtol=1e-6)
    np.testing.assert_allclose(float(got[f'window/{name}']), 1 / (1 - d),
                               rtol=1e-6)


@pytest.mark.parametrize('decay', [0.999, 0.9, 0.5])
@pytest.mark.parametrize('every', [1, 2, 4, 10])
@pytest.mark.parametrize('per_update', [False, True])
def test_metrics_window_counts_steps(decay, every, per_update):
  params = {'w': jnp.ones(2)}
  state = emax.update(emax.init(params), params, decay, update_every=every,
                      first_update=1, per_update=per_update)
  got = emax.metrics(state, update_every=every)
  # float64: the step size of one averaging step, then the decay per step
  # that gives it over `every` steps; the window is 1 / (1 - that decay).
  per_step = decay ** (1 / every) if per_update else decay
  step = 1 - (per_step ** every)
  np.testing.assert_allclose(float(got['decay']), 1 - step, rtol=1e-6)
  np.testing.assert_allclose(float(got['window']), 1 / (1 - per_step),
                             rtol=2e-5)


def test_metrics_window_with_update_every_4_spans_1000_steps():
  state = emax.update(emax.init({'w': jnp.ones(2)}), {'w': jnp.ones(2)},
                      0.999, update_every=4, first_update=1)
  assert float(emax.metrics(state)['window']) == pytest.approx(250.4, 1e-3)
  assert float(emax.metrics(state, update_every=4)['window']) == (
      pytest.approx(1000.0, 1e-5))
  fresh = emax.metrics(emax.init({'w': jnp.ones(2)}), update_every=4)
  assert float(fresh['window']) == np.inf
  copied = emax.metrics(emax.update(emax.init({'w': jnp.ones(2)}),
                                    {'w': jnp.ones(2)}, 0.0), update_every=4)
  assert float(copied['window']) == 1.0
  with pytest.raises(ValueError, match='update_every must be an int in'):
    emax.metrics(state, update_every=0)
  with pytest.raises(TypeError, match='update_every must be an int'):
    emax.metrics(state, update_every=4.0)


def test_metrics_checks_params_as_update_does():
  state, new = _named_state(params={'w': jnp.zeros(3), 'b': jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"missing from params: \['b'\]"):
    emax.metrics(state, {'w': new['w']})
  with pytest.raises(ValueError, match=r"params leaf \['w'\] has shape \(1,\)"
                     r' but the EMA state holds shape \(3,\)'):
    emax.metrics(state, {'w': jnp.ones(1), 'b': new['b']})
  with pytest.raises(ValueError, match=r"not in the EMA state: \['z'\]"):
    emax.metrics(state, dict(new, z=jnp.ones(1)))
  single = emax.update(emax.init({'w': jnp.zeros(3)}), {'w': jnp.ones(3)}, 0.5)
  with pytest.raises(ValueError, match=r"params leaf \['w'\] has shape \(\)"):
    jax.jit(emax.metrics)(single, {'w': jnp.ones(())})


def _stack(*trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


@pytest.mark.parametrize('pack', [False, True])
def test_metrics_reads_a_replicated_named_state_per_replica(pack):
  # Two replicas that differ: one stepped toward ones, one toward threes.
  one, p1 = _named_state(target=1.0, pack=pack)
  three, p3 = _named_state(target=3.0, pack=pack)
  replicated, params = _stack(one, three), _stack(p1, p3)
  assert replicated.step_size.shape == (2, 2)  # replicas x names
  assert isinstance(replicated.average, dict) != pack  # packed: not a dict
  for got, singles in ((emax.metrics(replicated),
                        [emax.metrics(one), emax.metrics(three)]),
                       (emax.metrics(replicated, params),
                        [emax.metrics(one, p1), emax.metrics(three, p3)]),
                       (jax.jit(emax.metrics)(replicated, params),
                        [emax.metrics(one, p1), emax.metrics(three, p3)])):
    assert got.keys() == singles[0].keys()
    for key in got:
      assert got[key].shape == (2,), key
      for r, single in enumerate(singles):
        np.testing.assert_array_equal(got[key][r], single[key], err_msg=key)
  m = emax.metrics(replicated, params)
  np.testing.assert_array_equal(m['decay/a'], [0.5, 0.5])
  np.testing.assert_array_equal(m['decay/b'], np.float32([0.9, 0.9]))
  # float64: each replica's average is (1 - d) * target; distance is d.
  np.testing.assert_allclose(m['distance/b'], [0.9, 0.9], rtol=1e-6)
  with pytest.raises(ValueError, match=r"replicated over 2 devices.*params"
                     r" leaf \['i'\] has shape \(\)"):
    emax.metrics(replicated, p1)


def test_metrics_on_a_pmap_replicated_state():
  n = 2
  state, params = _named_state()
  replicated = jax.pmap(lambda s: s)(_stack(*[state] * n))
  params = jax.pmap(lambda p: p)(_stack(*[params] * n))
  got = emax.metrics(replicated, params)
  want = emax.metrics(state, jax.tree.map(lambda x: x[0], params))
  for key in want:
    np.testing.assert_array_equal(got[key], np.stack([want[key]] * n),
                                  err_msg=key)


def test_every_reader_agrees_on_a_replicated_state():
  one, _ = _named_state(target=1.0)
  three, _ = _named_state(target=3.0)
  replicated = _stack(one, three)
  for name in NAMES:
    for dtypes in ('params', 'accumulator'):
      got = emax.ema_params(replicated, name, dtypes=dtypes)
      for r, single in enumerate((one, three)):
        want = emax.ema_params(single, name, dtypes=dtypes)
        for k in want:
          np.testing.assert_array_equal(got[k][r], want[k])
  with pytest.raises(ValueError, match=re.escape(
      "emax.ema_params: this state holds 2 named averages, ['a', 'b']")):
    emax.ema_params(replicated)
