"""Host offload: the average lives in pinned host memory between steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import emax
from emax import _offload

F32 = jnp.float32


@pytest.fixture(scope='module')
def mesh():
  return jax.make_mesh((2, 4), ('data', 'model'),
                       axis_types=(AxisType.Explicit,) * 2)


def _params(mesh):
  specs = {'w': P('data', 'model'), 'h': P('model'), 'i': P(), 'k': P()}
  values = {'w': jnp.arange(128, dtype=F32).reshape(8, 16) / 16.0,
            'h': jnp.linspace(-1.0, 1.0, 8).astype(jnp.bfloat16),
            'i': jnp.arange(3, dtype=jnp.int32), 'k': jax.random.key(0)}
  out = {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
         for k, v in values.items()}
  out['none'] = None
  return out


def _grads(params, step):
  return jax.tree.map(
      lambda x: jnp.full(x.shape, 0.5 * step - 1.0, x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating) else None, params)


def _raw(average):
  """The stored leaves of an offloaded average, keyed like the params."""
  if isinstance(average, _offload.OffloadedTree):
    return average.treedef.unflatten(average.leaves)
  return average


def _kinds(tree):
  return {k: (None if v is None else v.sharding.memory_kind)
          for k, v in _raw(tree).items()}


def _equal(a, b):
  """Equal values (floats to a rounding: XLA may fuse the paths apart)."""
  assert a.dtype == b.dtype
  if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
    a, b = jax.random.key_data(a), jax.random.key_data(b)
  if jnp.issubdtype(a.dtype, jnp.floating):
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=1e-6)
  else:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cpu_devices_have_pinned_host_memory():
  kinds = _offload.memory_kinds(jax.devices()[0])
  assert 'pinned_host' in kinds and 'device' in kinds


@pytest.mark.parametrize('kw', [{}, {'debias': True, 'update_every': 3},
                                {'start_step': 2, 'decay': 'schedule'}])
def test_offloaded_average_stays_on_host_and_matches_device_path(mesh, kw):
  kw = dict(kw)
  decay = emax.tf_decay(0.9) if kw.pop('decay', None) else 0.9
  on_host = optax.chain(optax.sgd(0.1), emax.ema(decay, offload=True, **kw))
  on_device = optax.chain(optax.sgd(0.1), emax.ema(decay, **kw))
  with jax.set_mesh(mesh):
    params = _params(mesh)
    host_state, dev_state = on_host.init(params), on_device.init(params)
    host_ema = emax.get_ema_state(host_state)
    # Float averages go to host memory (as bits); copies of non-float
    # params stay on the device.
    assert _kinds(host_ema.average) == {'w': 'pinned_host', 'h': 'pinned_host',
                                        'i': 'device', 'k': 'device',
                                        'none': None}
    assert _raw(host_ema.average)['w'].dtype == jnp.uint32
    assert host_ema.count.sharding.memory_kind == 'device'
    step_host, step_dev = jax.jit(on_host.update), jax.jit(on_device.update)
    for step in range(5):
      grads = _grads(params, step)
      if step == 0:  # eagerly once, then under jit
        _, host_state = on_host.update(grads, host_state, params)
        updates, dev_state = on_device.update(grads, dev_state, params)
      else:
        _, host_state = step_host(grads, host_state, params)
        updates, dev_state = step_dev(grads, dev_state, params)
      params = jax.tree.map(lambda p, u: p if u is None else p + u, params,
                            updates, is_leaf=lambda x: x is None)
      ema = emax.get_ema_state(host_state).average
      assert _kinds(ema)['w'] == _kinds(ema)['h'] == 'pinned_host'
      assert _raw(ema)['w'].sharding.spec == P('data', 'model')
    averaged = emax.ema_params(host_state)
    assert set(_kinds(averaged).values()) == {'device', None}
    assert averaged['w'].sharding.spec == P('data', 'model')
    for name, want in emax.ema_params(dev_state).items():
      if want is not None:
        _equal(averaged[name], want)
    assert int(emax.get_ema_state(host_state).count) == 5
    jitted = jax.jit(emax.ema_params)(host_state)
    _equal(jitted['w'], averaged['w'])
    assert jitted['w'].sharding.memory_kind == 'device'


def test_compiled_step_outputs_the_average_in_host_memory(mesh):
  tx = emax.ema(0.9, offload=True)
  with jax.set_mesh(mesh):
    params = {'w': _params(mesh)['w']}
    state = tx.init(params)
    compiled = jax.jit(tx.update).lower(params, state, params).compile()
  out_state = compiled.output_shardings[1]
  assert _raw(out_state.average)['w'].memory_kind == 'pinned_host'
  assert _raw(out_state.average)['w'].spec == P('data', 'model')
  assert out_state.count.memory_kind == 'device'


def test_pure_functions_offload(mesh):
  with jax.set_mesh(mesh):
    params = {'w': _params(mesh)['w']}
    state = emax.init(params, offload=True, debias=True)
    assert _kinds(state.average)['w'] == 'pinned_host'
    # debias: the stored start is the params, with weight zero.
    np.testing.assert_array_equal(
        np.asarray(emax.ema_params(state, dtypes='accumulator')['w']), np.asarray(params['w']))
    assert float(state.weight) == 0.0
    new = {'w': params['w'] * 2.0}
    for update in (emax.update, jax.jit(emax.update)):
      stepped = update(state, new, 0.75)
      assert _kinds(stepped.average)['w'] == 'pinned_host'
      # Hand computation: 0.25 * new, weight 0.25, debiased: new.
      stored = jax.lax.bitcast_convert_type(
          jax.device_put(_raw(stepped.average)['w'], jax.memory.Space.Device),
          F32)
      np.testing.assert_allclose(np.asarray(stored),
                                 0.25 * np.asarray(new['w']), rtol=1e-6)
      np.testing.assert_allclose(np.asarray(emax.ema_params(stepped)['w']),
                                 np.asarray(new['w']), rtol=1e-6)
    jitted_init = jax.jit(lambda p: emax.init(p, offload=True))(params)
    assert _kinds(jitted_init.average)['w'] == 'pinned_host'
    _equal(emax.ema_params(jitted_init)['w'], params['w'])


def test_a_state_placed_on_host_by_hand_is_updated_there():
  # Placement follows the arrays: e.g. a checkpoint restored into a target
  # whose shardings say pinned_host.
  params = {'w': jnp.ones(4)}
  state = emax.init(params)
  state = state._replace(average=jax.device_put(state.average, jax.memory.Space.Host))
  stepped = emax.update(state, {'w': jnp.zeros(4)}, 0.5)
  assert stepped.average['w'].sharding.memory_kind == 'pinned_host'
  np.testing.assert_array_equal(np.asarray(stepped.average['w']), 0.5)


def test_differentiating_through_an_offloaded_average_is_refused():
  # Without offload, d ema_params(update(state, p, 0.9)) / dp is 1 - 0.9.
  # Offloaded, the average is stored as raw bits, which carry no gradient:
  # a derivative through it is refused instead of silently zero.
  def read(state):
    return lambda p: emax.ema_params(emax.update(state, {'w': p}, 0.9))[
        'w'].sum()

  p = jnp.ones(3)
  grad = jax.grad(read(emax.init({'w': jnp.zeros(3)})))(p)
  np.testing.assert_allclose(grad, np.full(3, 0.1), rtol=1e-6)
  offloaded = read(emax.init({'w': jnp.zeros(3)}, offload=True))
  for differentiate in (jax.grad, lambda f: jax.grad(jax.jit(f)),
                        lambda f: jax.jit(jax.grad(f))):
    with pytest.raises(TypeError, match=r'offloaded average \(offload=True'
                       r'\).*raw bits.*offload=False.*stop_gradient'):
      differentiate(offloaded)(p)
  # Values, and derivatives that do not pass through the average, still work.
  assert float(offloaded(p)) == pytest.approx(0.3, rel=1e-6)
  also = lambda p: offloaded(jax.lax.stop_gradient(p)) + p.sum()  # noqa
  np.testing.assert_array_equal(jax.grad(also)(p), np.ones(3))


def test_offload_on_devices_without_host_memory_says_so(monkeypatch):
  monkeypatch.setattr(_offload, 'memory_kinds', lambda device: ['device'])
  with pytest.raises(ValueError, match=r"offload=True needs 'pinned_host'"
                     r" memory, but device .* has only \['device'\]\. Use"
                     r' offload=False'):
    emax.ema(0.9, offload=True).init({'w': jnp.ones(2)})


def _train_step(tx):
  def step(params, opt_state):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


@pytest.mark.standard_promotion  # optax.adam is not strict-clean
@pytest.mark.parametrize('how', ['params and state', 'state, with shardings'])
def test_donated_offloaded_state(how):
  # Donation pairs buffers by shape and dtype; these two ways pair the host
  # average with its own output (see the offload docstring).
  tx = optax.chain(optax.adam(0.1), emax.ema(0.5, offload=True))
  params = {'w': jnp.ones(8), 'b': jnp.zeros(8)}
  opt_state = tx.init(params)
  if how == 'params and state':
    step = jax.jit(_train_step(tx), donate_argnums=(0, 1))
  else:
    shardings = jax.tree.map(lambda a: a.sharding, (params, opt_state))
    step = jax.jit(_train_step(tx), donate_argnums=1,
                   in_shardings=shardings, out_shardings=shardings)
  on_device = optax.chain(optax.adam(0.1), emax.ema(0.5))
  dev_params = {'w': jnp.ones(8), 'b': jnp.zeros(8)}
  dev_state = on_device.init(dev_params)
  dev_step = jax.jit(_train_step(on_device))
  for _ in range(3):
    old = _raw(emax.get_ema_state(opt_state).average)['w']
    params, opt_state = step(params, opt_state)
    assert old.is_deleted()
    assert _kinds(emax.get_ema_state(opt_state).average)['w'] == 'pinned_host'
    dev_params, dev_state = dev_step(dev_params, dev_state)
  for name in ('w', 'b'):
    np.testing.assert_allclose(np.asarray(emax.ema_params(opt_state)[name]),
                               np.asarray(emax.ema_params(dev_state)[name]),
                               rtol=1e-6)
  # Adam's first steps move every param by the learning rate: -0.1 a step.
  # ema = 0.5 ema + 0.5 p, from p0: p0 - 0.05, then p0 - 0.125, p0 - 0.2125.
  np.testing.assert_allclose(np.asarray(emax.ema_params(opt_state)['w']),
                             np.ones(8) - 0.2125, rtol=1e-5)


def test_donating_only_the_optax_state_does_not_abort(tmp_path):
  # jax pairs donated buffers with outputs by shape and dtype alone when no
  # out_shardings are given: a donated float32 (8,) host average used to be
  # handed to the float32 (8,) params output, and the process died with
  # SIGABRT ("memory kind does not match"). Run it in a child process.
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  script = tmp_path / 'donate.py'
  script.write_text('''
import jax, jax.numpy as jnp, optax, emax
tx = optax.chain(optax.sgd(0.1), emax.ema(0.5, offload=True))
params = {'w': jnp.ones(8), 'b': jnp.zeros(8), 'i': jnp.arange(8)}
opt_state = tx.init(params)
def step(params, opt_state):
  grads = {'w': jnp.ones(8), 'b': jnp.ones(8), 'i': None}
  updates, opt_state = tx.update(grads, opt_state, params)
  new = {k: params[k] if updates[k] is None else params[k] + updates[k]
         for k in params}
  return new, opt_state
step = jax.jit(step, donate_argnums=(1,))
for _ in range(3):
  params, opt_state = step(params, opt_state)
print(float(emax.ema_params(opt_state)['w'][0]))
''')
  result = subprocess.run([sys.executable, str(script)], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  # w: 1 -> 0.9 -> 0.8 -> 0.7; ema 1 -> 0.95 -> 0.875 -> 0.7875.
  assert abs(float(result.stdout.split()[-1]) - 0.7875) < 1e-6
