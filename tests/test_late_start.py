"""emax.checkpoint.restore(start_average=True): an average started late.

A run trained without an average; it resumes with one. Every array of its
checkpoint lands where it belongs in the new state (the optimizer's state
inside emax.WithEmaState or a chain), each average starts from the restored
params as emax.init starts it, and the next step moves it as the float64
rule ``avg + (1 - d) * (p - avg)`` says. Without the option, and in the
reverse direction, the error names it.
"""

import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

import emax
import emax.checkpoint
import emax.nnx
from emax import _checkpoint_files
from emax.flax import EmaTrainState
from helpers import assert_bitwise

DECAY = 0.75
OPT = optax.sgd(0.1, momentum=0.9)


def _params():
  return {'w': jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 7,
          'b': jnp.full((3,), 0.3, jnp.bfloat16)}


def _grads(params, k):
  return jax.tree.map(lambda x: jnp.full_like(x, 0.5 + k), params)


def _trained_without_average():
  """A flax TrainState (no average) after two steps, its batch_stats kept."""
  state = _TrainStateBS.create(apply_fn=None, params=_params(), tx=OPT,
                               batch_stats={'mean': jnp.full((3,), 2.0)})
  for k in range(2):
    state = state.apply_gradients(grads=_grads(state.params, k))
  return state.replace(batch_stats={'mean': jnp.full((3,), 5.0)})


class _TrainStateBS(train_state.TrainState):
  batch_stats: dict = flax.struct.field(default=None)


def _save(path, state, step=2):
  with ocp.CheckpointManager(os.path.abspath(path)) as manager:
    assert emax.checkpoint.save(manager, step, state)


def _restore(path, like, **kw):
  with ocp.CheckpointManager(os.path.abspath(path)) as manager:
    return emax.checkpoint.restore(manager, like, **kw)


@pytest.mark.parametrize('debias', [False, True])
def test_train_state_resumes_with_an_average(tmp_path, debias):
  old = _trained_without_average()
  _save(tmp_path, old)
  like = EmaTrainState.create(
      apply_fn=None, params=_params(), tx=OPT,
      ema=emax.ema(DECAY, debias=debias),
      batch_stats={'mean': jnp.zeros(3)})
  state = _restore(tmp_path, like, start_average=True)

  assert type(state) is EmaTrainState and int(state.step) == 2
  assert_bitwise(state.params, old.params)
  assert_bitwise(state.batch_stats, old.batch_stats)
  assert_bitwise(state.opt_state.inner_state, old.opt_state)
  ema = state.opt_state.ema_state
  assert int(ema.count) == 0 and int(ema.skipped) == 0
  assert float(ema.weight) == (0.0 if debias else 1.0)
  assert float(ema.step_size) == 0.0
  # Read now, the averages are the restored params and batch_stats.
  assert_bitwise(state.ema_params, old.params)
  assert_bitwise(state.batch_stats_ema.average, {'mean': np.full(3, 5.0,
                                                               np.float32)})

  # One more step moves the average by the float64 rule from the restored
  # params (debias: weight 1 - d, read divided by it).
  grads = _grads(state.params, 2)
  nxt = state.apply_gradients(grads=grads)
  for key in ('w',):
    p0 = np.asarray(old.params[key], np.float64)
    p1 = np.asarray(nxt.params[key], np.float64)
    if debias:
      want = (1 - DECAY) * p1 / (1 - DECAY)
    else:
      want = p0 + (1 - DECAY) * (p1 - p0)
    np.testing.assert_allclose(np.asarray(nxt.ema_params[key]), want,
                               rtol=2e-7)
  # The optimizer goes on from its restored moments: the same step as the
  # run without an average takes.
  assert_bitwise(nxt.params, old.apply_gradients(grads=grads).params)


@pytest.mark.parametrize('options', [
    {}, {'names': True}, {'pack': True}, {'offload': True},
    {'mask': {'w': True, 'b': False}}, {'accumulator_dtype': jnp.float64},
    {'optax_masked': {'w': True, 'b': False}}])
def test_chain_state_starts_as_init_would(tmp_path, options):
  old = _trained_without_average()
  _save(tmp_path, {'params': old.params, 'opt_state': old.opt_state})
  decay = {'fast': 0.5, 'slow': 0.9} if options.pop('names', False) else DECAY
  optax_mask = options.pop('optax_masked', None)
  if options.get('accumulator_dtype') is jnp.float64:
    pytest.importorskip('jax').config.update('jax_enable_x64', True)
  try:
    average = emax.ema(decay, **options)
    if optax_mask is not None:  # the mask given by optax instead of mask=
      average = optax.masked(average, optax_mask)
    tx = optax.chain(OPT, average)
    like = {'params': _params(), 'opt_state': tx.init(_params())}
    state = _restore(tmp_path, like, start_average=True)
    assert_bitwise(state['params'], old.params)
    assert_bitwise(state['opt_state'][0], old.opt_state)
    # The average is emax.init of the restored params, bit for bit (same
    # layout, dtypes, host memory for offload).
    assert_bitwise(state['opt_state'][1], tx.init(old.params)[1])
    assert (jax.tree.structure(state['opt_state'][1])
            == jax.tree.structure(like['opt_state'][1]))
    if options.get('offload'):
      kinds = {x.sharding.memory_kind
               for x in jax.tree.leaves(state['opt_state'][1].average)}
      assert kinds == {'pinned_host'}
  finally:
    jax.config.update('jax_enable_x64', False)


def test_opt_alone_and_chain_of_one_both_place(tmp_path):
  """A checkpoint of chain(opt) (a 1-tuple) or of opt itself."""
  old = _trained_without_average()
  tx = optax.chain(OPT, emax.ema(DECAY))
  like = {'params': _params(), 'opt_state': tx.init(_params())}
  for name, saved in (('alone', old.opt_state), ('one', (old.opt_state,))):
    _save(tmp_path / name, {'params': old.params, 'opt_state': saved})
    state = _restore(tmp_path / name, like, start_average=True)
    assert_bitwise(state['opt_state'][0], old.opt_state)


def test_sharded_like_restores_sharded(tmp_path):
  mesh = jax.make_mesh((8,), ('x',))
  sharding = NamedSharding(mesh, P('x'))
  params = {'w': jax.device_put(jnp.arange(16.0), sharding)}
  opt_state = OPT.init(params)
  _save(tmp_path, {'params': params, 'opt_state': opt_state})
  tx = emax.with_ema(OPT, DECAY)
  like = {'params': params, 'opt_state': tx.init(params)}
  state = _restore(tmp_path, like, start_average=True)
  for got in (state['params']['w'],
              state['opt_state'].ema_state.average['w'],
              state['opt_state'].inner_state[0].trace['w']):
    assert got.sharding == sharding
  np.testing.assert_array_equal(
      np.asarray(state['opt_state'].ema_state.average['w']), np.arange(16.0))


def test_without_the_option_the_error_names_it(tmp_path):
  old = _trained_without_average()
  _save(tmp_path, old)
  like = EmaTrainState.create(apply_fn=None, params=_params(), tx=OPT,
                              ema=emax.ema(DECAY),
                              batch_stats={'mean': jnp.zeros(3)})
  with pytest.raises(ValueError, match='start_average=True'):
    _restore(tmp_path, like)
  with pytest.raises(TypeError, match='start_average must be True or False'):
    _restore(tmp_path, like, start_average='yes')


def test_reverse_checkpoint_with_average_into_state_without(tmp_path):
  tx = emax.with_ema(OPT, DECAY)
  _save(tmp_path, {'params': _params(), 'opt_state': tx.init(_params())})
  like = {'params': _params(), 'opt_state': OPT.init(_params())}
  for option in (False, True):
    with pytest.raises(ValueError, match=r'start_average=True starts an'
                       r' average that a checkpoint lacks; it cannot drop'):
      _restore(tmp_path, like, start_average=option)


def test_other_optimizer_is_refused_with_both_sides(tmp_path):
  old = _trained_without_average()
  _save(tmp_path, {'params': old.params, 'opt_state': old.opt_state})
  tx = emax.with_ema(optax.adam(0.1), DECAY)
  like = {'params': _params(), 'opt_state': tx.init(_params())}
  with pytest.raises(ValueError, match=r'not like without its averages.*'
                     r"'mu'.*'trace'"):
    _restore(tmp_path, like, start_average=True)


def test_no_effect_when_the_checkpoint_has_the_average(tmp_path):
  tx = emax.with_ema(OPT, DECAY)
  state = {'params': _params(), 'opt_state': tx.init(_params())}
  state = {'params': state['params'],
           'opt_state': tx.update(_grads(_params(), 0), state['opt_state'],
                                  state['params'])[1]}
  _save(tmp_path, state)
  assert_bitwise(_restore(tmp_path, state, start_average=True), state)


def test_bema_starts_late(tmp_path):
  old = _trained_without_average()
  _save(tmp_path, {'params': old.params, 'opt_state': old.opt_state})
  tx = optax.chain(OPT, emax.bema(burn_in=1))
  like = {'params': _params(), 'opt_state': tx.init(_params())}
  state = _restore(tmp_path, like, start_average=True)
  assert_bitwise(state['opt_state'][0], old.opt_state)
  assert_bitwise(state['opt_state'][1], tx.init(old.params)[1])


def test_nnx_state_is_refused_with_the_nnx_recipe(tmp_path):
  """An nnx.State keeps the optimizer's state as Variables, not as emax
  states: start_average cannot place it, and the error shows the NNX way,
  which this test follows."""
  nnx = pytest.importorskip('flax.nnx')
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, OPT, wrt=nnx.Param)
  grads = nnx.grad(lambda m: m(jnp.ones((1, 2))).sum())(model)
  opt.update(model, grads)
  _save(tmp_path, nnx.state({'model': model, 'optimizer': opt}))

  model2 = nnx.Linear(2, 3, rngs=nnx.Rngs(1))
  new = nnx.Optimizer(model2, emax.with_ema(OPT, DECAY), wrt=nnx.Param)
  like = nnx.state({'model': model2, 'optimizer': new})
  for option in (False, True):
    with pytest.raises(ValueError, match=r"(?s)opt_state.*nnx\.Optimizer\("
                       r".*_replace\(inner_state="):
      _restore(tmp_path, like, start_average=option)

  # The way the message gives: restore with the optimizer trained with, then
  # a new nnx.Optimizer around it whose average starts from those params.
  plain = nnx.Optimizer(model2, OPT, wrt=nnx.Param)
  nnx.update({'model': model2, 'optimizer': plain}, _restore(
      tmp_path, nnx.state({'model': model2, 'optimizer': plain})))
  new = nnx.Optimizer(model2, emax.with_ema(OPT, DECAY), wrt=nnx.Param)
  new.opt_state = new.opt_state._replace(inner_state=plain.opt_state)
  new.step.value = plain.step.value
  assert int(new.step.value) == 1
  assert_bitwise(nnx.as_pure(new.opt_state.inner_state),
                 nnx.as_pure(opt.opt_state))
  assert_bitwise(emax.nnx.ema_params(new), nnx.as_pure(nnx.state(model)))


def test_nnx_state_with_its_average_restores_as_before(tmp_path):
  """An nnx.State holds its average as plain fields: not taken for a state
  without one."""
  nnx = pytest.importorskip('flax.nnx')
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, emax.with_ema(OPT, DECAY), wrt=nnx.Param)
  grads = nnx.grad(lambda m: m(jnp.ones((1, 2))).sum())(model)
  opt.update(model, grads)
  saved = nnx.state({'model': model, 'optimizer': opt})
  _save(tmp_path, saved)
  model2 = nnx.Linear(2, 3, rngs=nnx.Rngs(1))
  opt2 = nnx.Optimizer(model2, emax.with_ema(OPT, DECAY), wrt=nnx.Param)
  for option in (False, True):
    restored = _restore(tmp_path, nnx.state({'model': model2,
                                             'optimizer': opt2}),
                        start_average=option)
    assert_bitwise(nnx.to_pure_dict(restored), nnx.to_pure_dict(saved))


def test_like_without_params_is_refused_before_any_array_is_read(
    tmp_path, monkeypatch):
  old = _trained_without_average()
  _save(tmp_path, {'model': old.params, 'opt_state': old.opt_state})
  tx = emax.with_ema(OPT, DECAY)
  like = {'model': _params(), 'opt_state': tx.init(_params())}

  def no_read(*args, **kwargs):
    raise AssertionError('an array was read before the check')
  monkeypatch.setattr(_checkpoint_files.Reader, 'read', no_read)
  with pytest.raises(ValueError, match=r"restored 'params'.*like \(dict\)"
                     r" has no 'params'"):
    _restore(tmp_path, like, start_average=True)


@pytest.mark.standard_promotion  # optax's inject_hyperparams, mixed dtypes
def test_inject_hyperparams_around_the_average(tmp_path):
  """The wrapper's own arrays (count, hyperparams) start as like's."""
  old = _trained_without_average()
  _save(tmp_path, {'params': old.params, 'opt_state': old.opt_state})
  tx = optax.chain(OPT, optax.inject_hyperparams(emax.ema)(decay=DECAY))
  like = {'params': _params(), 'opt_state': tx.init(_params())}
  state = _restore(tmp_path, like, start_average=True)
  assert_bitwise(state['opt_state'][0], old.opt_state)
  assert_bitwise(state['opt_state'][1], tx.init(old.params)[1])
  abstract = emax.checkpoint.abstract_state(like)
  with pytest.raises(ValueError,
                     match=r'\[1\]\.count.*Pass the freshly built'):
    _restore(tmp_path, abstract, start_average=True)
