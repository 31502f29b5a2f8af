"""The surface: with_ema's rules, checks at construction, lazy submodules,
no global change at import, flax serialization by name (the import orders
are in tests/test_flax_serialization.py)."""

import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import emax


def _run_micro_steps(tx, n, grad=-1.0):
  params = {'w': jnp.zeros(())}
  state = tx.init(params)
  with jax.numpy_dtype_promotion('standard'):  # optax.MultiSteps needs it
    for _ in range(n):
      updates, state = tx.update({'w': jnp.asarray(grad)}, state, params)
      params = optax.apply_updates(params, updates)
  return params, state


def _reference_multisteps(k, n, decay, lr=1.0):
  """float64: SGD on accumulated (mean) grads every k micro-steps, then an
  average of the params after each real step (TF's rule, starting as a copy)."""
  w, avg = 0.0, 0.0
  for step in range(1, n + 1):
    if step % k == 0:
      w = w + lr * 1.0  # grad -1, sgd(lr): w - lr * (-1)
      avg = avg - (1 - decay) * (avg - w)
  return w, avg


@pytest.mark.parametrize('outside', [True, False])
def test_with_ema_under_multisteps_moves_once_per_real_step(outside):
  if outside:
    tx = emax.with_ema(optax.MultiSteps(optax.sgd(1.0), 4), 0.5)
  else:
    tx = optax.MultiSteps(emax.with_ema(optax.sgd(1.0), 0.5), 4)
  params, state = _run_micro_steps(tx, 8)
  w, avg = _reference_multisteps(4, 8, 0.5)
  assert float(params['w']) == w == 2.0
  assert float(emax.ema_params(state)['w']) == avg == 1.25
  assert int(emax.get_ema_state(state).count) == 2


def test_with_ema_refuses_multisteps_below_the_top():
  tx = emax.with_ema(optax.chain(optax.MultiSteps(optax.sgd(1.0), 2)), 0.5)
  with pytest.raises(ValueError, match='MultiSteps the outermost'):
    tx.init({'w': jnp.zeros(())})


def test_with_ema_takes_the_average_by_keyword_only():
  bema = emax.bema()
  _, state = _run_micro_steps(emax.with_ema(optax.sgd(1.0), average=bema), 2)
  assert isinstance(state.ema_state, emax.BemaState)
  with pytest.raises(TypeError, match='pass it as average'):
    emax.with_ema(optax.sgd(1.0), bema)
  with pytest.raises(TypeError, match=r"average= and also \['decay'\]"):
    emax.with_ema(optax.sgd(1.0), 0.9, average=bema)
  with pytest.raises(TypeError, match='expected average to be'):
    emax.with_ema(optax.sgd(1.0), average=0.9)
  with pytest.raises(TypeError, match='unexpected keyword'):
    emax.with_ema(optax.sgd(1.0), 0.9, debais=True)


def test_with_ema_from_the_same_objects_compares_equal():
  opt, ema = optax.sgd(1.0), emax.ema(0.9)
  assert emax.with_ema(opt, average=ema) == emax.with_ema(opt, average=ema)


def test_with_ema_passes_finite_to_bema():
  tx = emax.with_ema(optax.sgd(1.0), average=emax.bema())
  params = {'w': jnp.zeros(2)}
  state = tx.init(params)
  _, state = tx.update({'w': jnp.ones(2)}, state, params,
                       finite=jnp.asarray(False))
  assert int(emax.get_ema_state(state).skipped) == 1


@pytest.mark.parametrize('kwargs, match', [
    (dict(write_back_name='slow'), 'not when: pass write_back_every'),
    (dict(write_back_every=2, write_back_name='zzz'),
     r"write_back_name='zzz' is not one of the averages \['fast', 'slow'\]"),
    (dict(write_back_every=2), r'say which one to write back, e.g.'
     r" write_back_name='slow'"),
])
def test_write_back_checked_when_built(kwargs, match):
  with pytest.raises(ValueError, match=match):
    emax.ema({'fast': 0.9, 'slow': 0.99}, **kwargs)
  with pytest.raises(ValueError, match=match):
    emax.with_ema(optax.sgd(1.0), {'fast': 0.9, 'slow': 0.99}, **kwargs)


def test_write_back_name_with_a_single_average_is_refused():
  with pytest.raises(ValueError, match='single unnamed one'):
    emax.ema(0.9, write_back_every=2, write_back_name='fast')


def test_write_back_of_a_named_average_lands_on_it():
  tx = emax.with_ema(optax.sgd(1.0), {'fast': 0.5, 'slow': 0.75},
                     write_back_every=2, write_back_name='slow')
  params, state = _run_micro_steps(tx, 2)
  # float64: params 1, 2; slow average 0 -> 0.25 -> 0.6875; written back.
  assert float(params['w']) == 0.6875


def test_low_decay_warns_once_and_step_size_says_it_is_meant():
  with pytest.warns(UserWarning, match=r'step_size=0.001 instead'):
    emax.with_ema(optax.sgd(1.0), 0.001)
  with pytest.warns(UserWarning, match=r"average 'b'"):
    emax.ema({'a': 0.99, 'b': 0.1})
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    emax.with_ema(optax.sgd(1.0), step_size=0.999)
    emax.ema(0.5)
    emax.ema(0.999)
    emax.ema(jnp.asarray(0.1))  # an array: a deliberate value


def test_first_update_zero_means_the_default():
  for every in (1, 3):
    zero = emax.ema(0.5, update_every=every, first_update=0)
    default = emax.ema(0.5, update_every=every)
    _, a = _run_micro_steps(optax.chain(optax.sgd(1.0), zero), 7)
    _, b = _run_micro_steps(optax.chain(optax.sgd(1.0), default), 7)
    assert float(emax.ema_params(a)['w']) == float(emax.ema_params(b)['w'])
  with pytest.raises(ValueError, match='leave first_update out'):
    emax.ema(0.5, first_update=-1)


def test_tf_decay_repr_shows_the_value_given():
  assert repr(emax.tf_decay(0.999)) == 'emax.tf_decay(0.999)'


def test_types_users_never_build_are_not_exported():
  assert 'StateInfo' not in emax.__all__ and 'BemaConfig' not in emax.__all__
  assert not hasattr(emax, 'bias_correction')


def _python(code):
  out = subprocess.run([sys.executable, '-c', textwrap.dedent(code)],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_import_emax_changes_nothing_outside_emax():
  out = _python("""
      import sys
      import chex, jax, numpy, optax  # emax's dependencies change their own
      before_path = list(sys.meta_path)
      before = set(sys.modules)
      import emax
      assert sys.meta_path == before_path, sys.meta_path
      new = {m.partition('.')[0] for m in set(sys.modules) - before}
      assert not new & {'flax', 'orbax'}, sorted(new & {'flax', 'orbax'})
      print(emax.posthoc.coefficients.__module__.startswith('emax'))
      print(type(emax.checkpoint).__name__, type(emax.nnx).__name__,
            type(emax.flax).__name__)
      print('flax' in sys.modules)
      """)
  assert out.split() == ['True', 'module', 'module', 'module', 'True']


def test_lazy_submodule_names_the_extra_when_missing():
  out = _python("""
      import sys
      sys.modules['flax'] = None  # as if flax were not installed
      import emax
      try:
        emax.nnx
      except ImportError as e:
        print(e)
      """)
  assert 'pip install "emax[flax]"' in out or 'emax[flax]' in out, out


def test_flax_from_bytes_into_reordered_names_keeps_each_average():
  import flax.serialization as fs
  params = {'w': jnp.zeros(2)}
  saved = emax.update(emax.init(params, names=('fast', 'slow')),
                      {'w': jnp.ones(2)}, {'fast': 0.5, 'slow': 0.75})
  target = emax.init(params, names=('slow', 'fast'))
  restored = fs.from_bytes(target, fs.to_bytes(saved))
  for name, expected in (('fast', 0.5), ('slow', 0.25)):
    np.testing.assert_array_equal(emax.ema_params(restored, name)['w'],
                                  np.full(2, expected, np.float32))
