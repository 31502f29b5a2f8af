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
from flax_testlib import DECAY, MODEL, STEP, DenseBN, data, make_state
from flax_testlib import dense_bn_step as small_step
from helpers import assert_bitwise, lerp, max_diff

STEPS = 4


def host(tree):
  return jax.tree.map(np.array, tree)


def assert_trees_close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# --- the CNN with BatchNorm and Dropout, trained with a donated step ---------


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
                            'batch_stats': state.batch_stats}), DECAY)
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
  assert isinstance(state.opt_state, emax.WithEmaState)
  # After training, the average is not the raw params / live statistics.
  assert max_diff(got['params'], state.params) > 1e-3
  assert max_diff(got['batch_stats'], state.batch_stats) > 1e-3
  assert_trees_equal(got['params'], host(state.ema_params))
  x, _ = data()
  logits = MODEL.apply(state.eval_variables(), x[0], train=False)
  assert logits.shape == (8, 3) and bool(jnp.all(jnp.isfinite(logits)))


def test_state_is_donated(trained):
  assert all(trained['donated'])


def test_write_back_sets_params_to_the_average_bitwise(trained):
  state = trained['state']
  back = state.write_back()
  assert_bitwise(back.params, state.ema_params)
  assert_bitwise(back.batch_stats, state.eval_variables()['batch_stats'])
  # The optimizer's state (SGD momentum), the averages and step are kept.
  assert_bitwise(back.opt_state, state.opt_state)
  assert_bitwise(back.batch_stats_ema, state.batch_stats_ema)
  assert int(back.step) == int(state.step)
  assert max_diff(back.params, state.params) > 1e-3


def test_reset_ema_sets_the_averages_to_params_bitwise(trained):
  state = trained['state']
  reset = state.reset_ema()
  variables = reset.eval_variables()
  assert_bitwise(variables['params'], state.params)
  assert_bitwise(variables['batch_stats'], state.batch_stats)
  ema_state = emax.get_ema_state(reset.opt_state)
  assert int(ema_state.count) == STEPS  # counts are kept
  assert float(ema_state.weight) == 1.0
  assert_bitwise(reset.opt_state.inner_state, state.opt_state.inner_state)
  assert_bitwise(reset.params, state.params)


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


# --- a small Dense + BatchNorm model for the cheaper tests -------------------


SMALL = DenseBN()
X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 2)),
                jnp.float32) + jnp.arange(4.0, dtype=jnp.float32)[:, None,
                                                                   None]


def small_variables():
  return SMALL.init(jax.random.key(0), X[0], train=False)


def small_state(**kw):
  variables = small_variables()
  kw.setdefault('tx', optax.sgd(0.1))
  kw.setdefault('batch_stats', variables['batch_stats'])
  return emax.flax.EmaTrainState.create(
      apply_fn=SMALL.apply, params=variables['params'], **kw)


def small_run(state, steps=3):
  for i in range(steps):
    state = small_step(state, X[i % X.shape[0]])
  return state


def live(state):
  return host({'params': state.params, 'batch_stats': state.batch_stats})


def test_copy_policy_evaluates_with_live_batch_stats():
  state = small_run(small_state(ema=emax.ema(0.5), batch_stats_policy='copy'))
  assert state.batch_stats_ema is None
  got = state.eval_variables()
  assert_bitwise(got['batch_stats'], state.batch_stats)
  assert_bitwise(got['params'], emax.ema_params(state.opt_state))
  assert max_diff(got['params'], state.params) > 1e-3


def test_with_ema_route_averages_params_and_matches_the_reference():
  state = small_state(tx=emax.with_ema(optax.sgd(0.1), 0.5),
                      batch_stats_policy='copy')
  assert state.ema_tx is not None and state.batch_stats_ema is None
  ref = live(state)['params']
  for i in range(3):
    state = small_step(state, X[i])
    ref = lerp(ref, live(state)['params'], 0.5)
  assert_trees_close(host(state.ema_params), ref, rtol=1e-6)
  assert max_diff(state.ema_params, state.params) > 1e-3
  got = state.eval_variables()
  assert_bitwise(got['batch_stats'], state.batch_stats)  # 'copy'
  # tx=opt, ema=emax.ema(d) averages the params as with_ema(opt, d) does.
  ours = small_run(small_state(ema=emax.ema(0.5)))
  assert_bitwise(ours.params, state.params)
  assert_bitwise(ours.opt_state, state.opt_state)
  assert_bitwise(ours.ema_params, state.ema_params)


def test_states_created_apart_share_one_structure_and_compile_once():
  tx, ema = optax.sgd(0.1), emax.ema(0.5)
  a, b = small_state(tx=tx, ema=ema), small_state(tx=tx, ema=ema)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  small_step(a, X[0])
  compiled = small_step._cache_size()  # pylint: disable=protected-access
  small_step(b, X[0])
  assert small_step._cache_size() == compiled  # pylint: disable=W0212


def test_batch_stats_average_matches_the_reference():
  state = small_state(ema=emax.ema(0.5))
  ref = live(state)['batch_stats']
  for i in range(3):
    state = small_step(state, X[i])
    ref = lerp(ref, live(state)['batch_stats'], 0.5)
  got = host(state.eval_variables()['batch_stats'])
  assert_trees_close(got, ref, rtol=1e-6)
  assert max_diff(got, state.batch_stats) > 1e-3


def test_named_averages_each_equal_a_single_average_bitwise():
  decays = {'fast': 0.5, 'slow': 0.9}
  named = small_state(ema=emax.ema(decays))
  refs = {n: live(named) for n in decays}
  for i in range(3):
    named = small_step(named, X[i])
    refs = {n: lerp(refs[n], live(named), d) for n, d in decays.items()}
  for name in decays:
    assert_trees_close(host(named.eval_variables(name)), refs[name],
                       rtol=1e-6)
  # Bit for bit what a single average with that decay gives.
  single = small_run(small_state(ema=emax.ema(decays['slow'])))
  assert_bitwise(named.params, single.params)
  assert_bitwise(named.eval_variables('slow'), single.eval_variables())
  assert max_diff(named.eval_variables('fast'),
                  named.eval_variables('slow')) > 1e-3


def test_named_averages_errors_list_the_names():
  state = small_state(ema=emax.ema({'fast': 0.5, 'slow': 0.9}))
  with pytest.raises(ValueError, match=r"2 named averages, \['fast', 'slow'\]"
                     r'.*state.eval_variables\(name='):
    state.ema_params  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match=r"EmaTrainState.eval_variables.*"
                     r"\['fast', 'slow'\].*name='fast'"):
    state.eval_variables()
  with pytest.raises(ValueError, match=r"no average named 'medium'.*"
                     r"\['fast', 'slow'\]"):
    state.eval_variables('medium')
  with pytest.raises(ValueError, match=r"\['fast', 'slow'\]"):
    state.write_back()
  # One name: readers need no name.
  one = small_state(tx=emax.with_ema(optax.sgd(0.1), {'only': 0.5}),
                    batch_stats_policy='copy')
  assert_bitwise(one.ema_params, one.params)
  with pytest.raises(ValueError, match='single, unnamed average'):
    small_state(ema=emax.ema(0.5)).eval_variables('fast')


def test_named_write_back():
  state = small_run(small_state(ema=emax.ema({'fast': 0.5, 'slow': 0.9})))
  back = state.write_back('slow')
  slow = state.eval_variables('slow')
  assert_bitwise(back.params, slow['params'])
  assert_bitwise(back.batch_stats, slow['batch_stats'])


@jax.jit
def apply_step(state, grads, batch_stats):
  return state.apply_gradients(grads=grads, batch_stats=batch_stats)


def test_write_back_keeps_the_params_dtypes():
  params = {'w': jnp.asarray([1.0, 2.0, 3.0], jnp.bfloat16)}
  state = emax.flax.EmaTrainState.create(
      apply_fn=None, params=params, tx=emax.with_ema(optax.sgd(1.0), 0.9))
  state = state.apply_gradients(
      grads={'w': jnp.asarray([0.5, 0.25, 1.0], jnp.bfloat16)})
  back = state.write_back()
  assert back.params['w'].dtype == jnp.bfloat16
  assert_bitwise(back.params, state.ema_params)
  accumulated = emax.get_ema_state(state.opt_state).average['w']
  assert accumulated.dtype == jnp.float32  # rounded to bf16 once, on read
  np.testing.assert_array_equal(
      np.asarray(back.params['w'], np.float32),
      np.asarray(accumulated.astype(jnp.bfloat16), np.float32))


def fixed_grads_run(state, steps):
  """``steps`` steps with grads that do not depend on the params."""
  rng = np.random.default_rng(5)
  states = []
  for _ in range(steps):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype),
        state.params)
    bs = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) ** 2, s.dtype),
        state.batch_stats)
    state = apply_step(state, grads, bs)
    states.append(state)
  return states


def assert_within_one_ulp(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_max_ulp(
      np.asarray(x), np.asarray(y), maxulp=1), a, b)


@pytest.mark.parametrize('route', ['with_ema', 'ema'])
def test_write_back_every_through_the_transformation(route):
  """Switch-EMA from the Flax route: params land on the average every 2."""
  tx = optax.sgd(0.1, momentum=0.9)
  if route == 'with_ema':
    make = lambda **kw: small_state(  # noqa: E731
        tx=emax.with_ema(tx, 0.5, **kw), batch_stats_policy='copy')
  else:
    make = lambda **kw: small_state(tx=tx, ema=emax.ema(0.5, **kw))  # noqa
  switched = fixed_grads_run(make(write_back_every=2), 4)
  plain = fixed_grads_run(make(), 2)
  for i, state in enumerate(switched, start=1):
    average = state.eval_variables()
    if i % 2:
      assert max_diff(state.params, average['params']) > 1e-3
      continue
    # params + (average - params) lands on the average to one ulp.
    assert_within_one_ulp(state.params, average['params'])
    if route == 'ema':
      assert_within_one_ulp(state.batch_stats, average['batch_stats'])
  # Up to the first write-back both runs took the same steps: the same
  # average, the same optimizer state (momentum untouched), other params.
  assert_bitwise(switched[1].opt_state.inner_state,
                 plain[1].opt_state.inner_state)
  assert_bitwise(plain[1].ema_params, switched[1].ema_params)
  assert_within_one_ulp(switched[1].params, plain[1].ema_params)
  assert max_diff(plain[1].params, switched[1].params) > 1e-3


def test_multisteps_average_moves_once_per_real_step():
  """``tx=optax.MultiSteps(opt, k), ema=...``: no move on micro-steps."""
  ema = emax.ema(DECAY)
  tx = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2)
  state = small_state(ema=ema, tx=tx)
  ref = live(state)
  # optax.MultiSteps itself multiplies a bool by an int32, which strict dtype
  # promotion (on in these tests) refuses; emax's part is strict-clean.
  with jax.numpy_dtype_promotion('standard'):
    for i in range(4):
      before = live(state)
      state = small_step(state, X[i])
      after = live(state)
      if i % 2 == 0:  # a micro-step: params still, the average must not move
        assert_trees_equal(after['params'], before['params'])
        assert max_diff(after['batch_stats'], before['batch_stats']) > 0
      else:
        assert max_diff(after['params'], before['params']) > 0
        ref = lerp(ref, after, DECAY)
      assert_trees_close(host(state.eval_variables()), ref, rtol=1e-6)
  assert int(emax.get_ema_state(state.opt_state).count) == 2
  assert int(state.batch_stats_ema.count) == 2

  # The same params' average as the average inside MultiSteps (another
  # program: XLA may round the gradients differently by an ulp).
  inside = small_state(tx=optax.MultiSteps(
      emax.with_ema(optax.sgd(0.1), DECAY), every_k_schedule=2),
                       batch_stats_policy='copy')
  with jax.numpy_dtype_promotion('standard'):
    inside = small_run(inside, 4)
  assert int(emax.get_ema_state(inside.opt_state).count) == 2
  assert_trees_close(host(inside.params), host(state.params), rtol=1e-6)
  assert_trees_close(host(inside.ema_params), host(state.ema_params),
                     rtol=1e-6)


def test_with_ema_tx_and_ema_argument_build_the_same_state():
  # tx=emax.with_ema(opt, average=e) is tx=opt, ema=e: batch_stats averaged.
  opt, ema = optax.sgd(0.1), emax.ema(0.5)
  a = small_run(small_state(tx=emax.with_ema(opt, average=ema)))
  b = small_run(small_state(tx=opt, ema=ema))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert a.batch_stats_ema is not None
  assert_bitwise(a.eval_variables(), b.eval_variables())
  assert max_diff(a.eval_variables()['batch_stats'], a.batch_stats) > 1e-4


def test_multisteps_misplacements_are_refused():
  with pytest.raises(ValueError, match=r'outside optax.MultiSteps.*'
                     r'emax.with_ema\(optax.MultiSteps\(opt'):
    small_state(tx=optax.chain(optax.MultiSteps(optax.sgd(0.1), 2),
                               emax.ema(0.5)),
                batch_stats_policy='copy')
  with pytest.raises(ValueError, match='MultiSteps the outermost'):
    small_state(tx=optax.chain(optax.MultiSteps(optax.sgd(0.1), 2)),
                ema=emax.ema(0.5))


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
      tx=emax.with_ema(optax.sgd(0.1), 0.5))
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
  create = emax.flax.EmaTrainState.create
  with pytest.raises(TypeError, match='expected ema to be an emax.ema'):
    create(ema=0.99, **kw)
  with pytest.raises(ValueError, match='state is not an emax.EmaState'):
    create(ema=optax.sgd(0.1), **kw)
  with pytest.raises(ValueError, match=r'Pass it as tx instead'):
    create(ema=emax.with_ema(optax.sgd(0.1), 0.9), **kw)
  with pytest.raises(ValueError, match=r"batch_stats_policy must be one of.*"
                     r"got 'median'"):
    create(ema=emax.ema(0.9), batch_stats_policy='median', **kw)
  with pytest.raises(ValueError, match='holds no average and no ema'):
    create(**kw)
  with pytest.raises(TypeError, match='expected tx to be an optax optimizer'):
    create(apply_fn=None, params=params, tx=0.1, ema=emax.ema(0.9))
  with pytest.raises(ValueError, match='tx holds 2 emax averages.*named'):
    create(apply_fn=None, params=params,
           tx=optax.chain(emax.ema(0.9), emax.ema(0.8)))
  # A policy without batch_stats is fine: there is nothing to average.
  state = create(ema=emax.ema(0.9), batch_stats_policy='copy', **kw)
  with pytest.raises(ValueError, match='created without them'):
    state.apply_gradients(grads=params, batch_stats={'mean': jnp.ones(2)})


@pytest.mark.parametrize('tx', [
    optax.chain(optax.sgd(0.1), emax.ema(0.5)),
    emax.with_ema(optax.sgd(0.1), 0.5),
    optax.MultiSteps(emax.with_ema(optax.sgd(0.1), 0.5), 2),
])
@pytest.mark.parametrize('with_batch_stats', [False, True])
def test_an_average_in_tx_and_another_as_ema_is_refused(tx, with_batch_stats):
  """Never two averages with two configurations, silently."""
  params = {'w': jnp.ones(2)}
  kw = dict(batch_stats={'mean': jnp.zeros(2)}) if with_batch_stats else {}
  with pytest.raises(ValueError, match='got an average twice') as info:
    emax.flax.EmaTrainState.create(apply_fn=None, params=params, tx=tx,
                                   ema=emax.ema(0.9), **kw)
  assert 'state[1]' not in str(info.value)
  assert 'tx=emax.with_ema(opt, decay' in str(info.value)


def test_averaging_batch_stats_needs_an_average_it_can_read():
  # The average sits inside MultiSteps, out of reach: refused with the fix.
  with pytest.raises(ValueError, match=r"batch_stats_policy='average'.*"
                     r'ema=emax.ema\(decay.*batch_stats_policy=.copy.'):
    small_state(tx=optax.MultiSteps(emax.with_ema(optax.sgd(0.1), 0.5), 2))


@pytest.mark.parametrize('momentum', [None, 0.9])
@pytest.mark.parametrize('route', ['with_ema', 'ema'])
def test_grads_of_other_shapes_get_emax_error_first(momentum, route):
  """The error names the leaf, before the optimizer fails."""
  tx = optax.sgd(0.1, momentum=momentum)
  if route == 'with_ema':
    state = small_state(tx=emax.with_ema(tx, 0.5), batch_stats_policy='copy')
  else:
    state = small_state(tx=tx, ema=emax.ema(0.5))
  grads = jax.tree.map(jnp.zeros_like, state.params)
  grads['Dense_0']['kernel'] = jnp.zeros((5, 3))  # params: (2, 3)
  pattern = (r"grads leaf \['Dense_0'\]\['kernel'\] has shape \(5, 3\) but"
             r' the param has shape \(2, 3\).*respect to state.params')
  with pytest.raises(ValueError, match=pattern):
    state.apply_gradients(grads=grads)
  with pytest.raises(ValueError, match=pattern):
    jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
  del grads['Dense_0']['bias']
  with pytest.raises(ValueError, match=r"grads do not match the params"
                     r" \(missing from grads: \['Dense_0'\]\['bias'\]\)\..*"
                     r'with respect to state.params'):
    state.apply_gradients(grads=grads)


def test_batch_stats_policy_is_validated_wherever_it_is_set():
  """A typo never silently evaluates with live statistics."""
  state = small_state(ema=emax.ema(0.5))
  with pytest.raises(ValueError, match=r"batch_stats_policy must be one of"
                     r".*got 'avg'"):
    state.replace(batch_stats_policy='avg')
  with pytest.raises(ValueError, match="got 'avg'"):
    emax.flax.EmaTrainState(**{
        **{f: getattr(state, f) for f in state.__dataclass_fields__},
        'batch_stats_policy': 'avg'})
  # Switching to 'average' without an average of the statistics: an error
  # that says so, not the live statistics.
  copy = small_state(ema=emax.ema(0.5), batch_stats_policy='copy')
  average = copy.replace(batch_stats_policy='average')
  with pytest.raises(ValueError, match='holds no average of the batch_stats'):
    average.eval_variables()
  # And the policy survives jit (it is static) and flax's state dicts.
  out = small_step(copy, X[0])
  assert out.batch_stats_policy == 'copy'


# --- a decay of 0 is a bitwise copy ----------------------------------------


def big_and_small():
  """Averages far from the params: ``a - (a - p) != p`` for many elements."""
  rng = np.random.default_rng(7)
  variables = small_variables()

  def draw(scale):
    return jax.tree.map(
        lambda x: jnp.asarray(scale * rng.random(x.shape), x.dtype),
        variables)

  big, small = draw(1e8), draw(1.0)
  for a, p in zip(jax.tree.leaves(big), jax.tree.leaves(small)):
    a, p = np.asarray(a), np.asarray(p)
    assert np.any(a - (a - p) != p)  # arithmetic would not give p back
  return big, small


def schedule_zero(count):
  return jnp.where(count >= 0, 0.0, 0.5)  # 0, but traced through the count


def copy_step(big, small, make):
  """Averages start at ``big``; one step to ``small``: the new averages."""
  state = make(big)
  state = state.replace(params=small['params'])
  zeros = jax.tree.map(jnp.zeros_like, small['params'])  # sgd: p + (-0.0)
  state = state.apply_gradients(grads=zeros,
                                batch_stats=small['batch_stats'])
  return state.params, state.eval_variables()


@pytest.mark.parametrize('route,decay', [
    ('with_ema', 'constant'), ('with_ema', 'schedule'), ('with_ema', 'traced'),
    ('ema', 'constant'), ('ema', 'schedule'), ('ema', 'traced'),
    ('pack', 'traced'), ('offload', 'traced'),
])
def test_decay_zero_is_a_bitwise_copy(route, decay):
  big, small = big_and_small()

  def make(variables, d):
    kw = dict(apply_fn=SMALL.apply, params=variables['params'],
              batch_stats=variables['batch_stats'])
    if route == 'with_ema':
      return emax.flax.EmaTrainState.create(
          tx=emax.with_ema(optax.sgd(1.0), d), batch_stats_policy='copy',
          **kw)
    ema = emax.ema(d, pack=route == 'pack', offload=route == 'offload')
    return emax.flax.EmaTrainState.create(tx=optax.sgd(1.0), ema=ema, **kw)

  if decay == 'traced':
    params, got = jax.jit(
        lambda d, b, s: copy_step(b, s, lambda v: make(v, d)))(
            jnp.float32(0.0), big, small)
  else:
    d = 0.0 if decay == 'constant' else schedule_zero
    params, got = jax.jit(
        lambda b, s: copy_step(b, s, lambda v: make(v, d)))(big, small)
  assert_bitwise(params, small['params'])  # sgd: p + (-0.0) == p
  assert_bitwise(got['params'], small['params'])
  assert_bitwise(got['batch_stats'], small['batch_stats'])


# --- recompute_batch_stats ---------------------------------------------------


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


class DropoutThenBN(nn.Module):
  """Dropout BEFORE BatchNorm: the statistics depend on each batch's mask."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(3)(x)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)


def test_recompute_batch_stats_gives_each_batch_its_own_dropout_key():
  """Against a non-jitted loop that computes BN by hand."""
  model = DropoutThenBN()
  rng = np.random.default_rng(2)
  batches = jnp.asarray(rng.normal(size=(4, 16, 2)) + 1.0, jnp.float32)
  variables = model.init(jax.random.key(0), batches[0], train=False)
  key = jax.random.key(11)
  new = emax.flax.recompute_batch_stats(model.apply, variables, batches,
                                        train=True, rngs={'dropout': key})

  @jax.jit
  def dropout_output(x, key):
    _, inter = model.apply(
        variables, x, train=True, rngs={'dropout': key},
        mutable=['batch_stats', 'intermediates'], capture_intermediates=True)
    return inter['intermediates']['Dropout_0']['__call__'][0]

  def reference(key_of):
    """Mean over batches of each batch's mean/var of the dropout output."""
    means, variances = [], []
    for i in range(batches.shape[0]):  # one call per batch, no scan
      h = np.asarray(dropout_output(batches[i], key_of(i)), np.float64)
      means.append(h.mean(axis=0))
      variances.append(((h - h.mean(axis=0)) ** 2).mean(axis=0))
    return np.mean(means, axis=0), np.mean(variances, axis=0)

  mean, var = reference(lambda i: jax.random.fold_in(key, i))
  stats = new['batch_stats']['BatchNorm_0']
  np.testing.assert_allclose(stats['mean'], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], var, rtol=1e-4, atol=1e-6)
  # One key for every batch gives other statistics: the key matters here.
  same_mean, same_var = reference(lambda i: jax.random.fold_in(key, 0))
  assert np.max(np.abs(same_mean - mean)) + np.max(
      np.abs(same_var - var)) > 1e-2


class _Boxed(nn.Module):
  """Params boxed with Flax partitioning metadata, as MaxText-style code
  keeps them at init."""

  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.with_partitioning(nn.initializers.ones,
                                             ('data', 'model')), (2, 3))
    b = self.param('b', nn.with_logical_partitioning(nn.initializers.zeros,
                                                     ('embed',)), (3,))
    return x @ w + b


@pytest.mark.parametrize('kw', [{}, {'pack': True}, {'offload': False,
                                                     'debias': True}])
def test_partitioning_metadata_is_averaged_and_kept(kw):
  params = _Boxed().init(jax.random.key(0), jnp.ones((1, 2)))['params']
  tx = emax.with_ema(optax.sgd(0.5), 0.5, **kw)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(tx.update)
  for _ in range(2):
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  average = emax.ema_params(state)
  assert jax.tree.structure(average) == jax.tree.structure(params)
  assert isinstance(average['w'], nn.Partitioned)
  assert average['w'].names == ('data', 'model')
  assert isinstance(average['b'], nn.LogicallyPartitioned)
  assert average['b'].names == ('embed',)
  # float64: params 1 -> 0.5 -> 0.0 (w), 0 -> -0.5 -> -1.0 (b).
  if kw.get('debias'):  # weights 0.5 then 0.75: (0.25 * 0.5 + 0.5 * 0) / 0.75
    w, b = (0.5 * 0.5 * 0.5 + 0.5 * 0.0) / 0.75, (0.25 * -0.5 + 0.5 * -1.0) / 0.75
  else:  # TF: 1 -> 0.75 -> 0.375; 0 -> -0.25 -> -0.625
    w, b = 0.375, -0.625
  np.testing.assert_allclose(average['w'].value, np.full((2, 3), w),
                             rtol=1e-6)
  np.testing.assert_allclose(average['b'].value, np.full(3, b), rtol=1e-6)
