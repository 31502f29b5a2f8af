"""flax.serialization round trips of states holding an emax.EmaState.

``flax.serialization.to_bytes`` / ``from_bytes`` of an ``EmaTrainState`` and of a plain ``TrainState`` whose
``opt_state`` holds averages (single, named, packed), whatever the order in
which emax and flax were imported.
"""

import os
import subprocess
import sys

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import emax
import emax.flax
from flax_testlib import DenseBN
from flax_testlib import dense_bn_step as step
from helpers import assert_bitwise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


MODEL = DenseBN()
X = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6, 2)), jnp.float32)
VARIABLES = MODEL.init(jax.random.key(0), X[0], train=False)


@pytest.mark.parametrize('pack', [False, True])
def test_ema_train_state_round_trip(pack):
  tx = optax.sgd(0.1, momentum=0.9)
  ema = emax.ema({'fast': 0.5, 'slow': 0.9}, pack=pack)

  def fresh():
    return emax.flax.EmaTrainState.create(
        apply_fn=MODEL.apply, params=VARIABLES['params'], tx=tx, ema=ema,
        batch_stats=VARIABLES['batch_stats'])

  state = step(step(fresh(), X[0]), X[1])
  data = flax.serialization.to_bytes(state)
  restored = flax.serialization.from_bytes(fresh(), data)
  assert isinstance(restored, emax.flax.EmaTrainState)
  assert isinstance(emax.get_ema_state(restored.opt_state), emax.EmaState)
  assert isinstance(restored.batch_stats_ema, emax.EmaState)
  assert_bitwise(restored, state)
  for name in ('fast', 'slow'):
    assert_bitwise(restored.eval_variables(name), state.eval_variables(name))
  # Training goes on from the restored state exactly as from the original.
  assert_bitwise(step(restored, X[2]), step(state, X[2]))


@pytest.mark.parametrize('pack', [False, True])
@pytest.mark.parametrize('decay', [0.5, {'fast': 0.5, 'slow': 0.9}],
                         ids=['single', 'named'])
def test_plain_train_state_round_trip(decay, pack):
  params = {'w': jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3),
            'b': jnp.ones(3, jnp.bfloat16)}
  tx = emax.with_ema(optax.sgd(0.1), decay, pack=pack, debias=True)

  def fresh():
    return train_state.TrainState.create(apply_fn=None, params=params, tx=tx)

  state = fresh()
  grads = {'w': jnp.full((2, 3), 0.5, jnp.float32),
           'b': jnp.full(3, 0.25, jnp.bfloat16)}
  for _ in range(2):
    state = state.apply_gradients(grads=grads)
  restored = flax.serialization.from_bytes(
      fresh(), flax.serialization.to_bytes(state))
  assert_bitwise(restored, state)
  names = [None] if isinstance(decay, float) else list(decay)
  for name in names:
    got = emax.ema_params(restored.opt_state, name)
    assert got['b'].dtype == jnp.bfloat16  # the params' dtypes came back
    assert_bitwise(got, emax.ema_params(state.opt_state, name))


SCRIPT = r'''
import sys
mode = sys.argv[1]
if mode == 'flax_first':
  import flax.serialization
  import emax
else:
  import emax
  assert 'flax' not in sys.modules, 'import emax must not import flax'
  if mode == 'emax_first':
    import flax.serialization

import jax, numpy as np

# Named, packed averages: StateInfo and the packed layout both need flax
# to be taught about them.
state = emax.init({'w': np.arange(3.0, dtype=np.float32),
                   'b': np.ones(2, np.float32)}, names=('a', 'b'), pack=True)
if mode in ('emax.flax', 'emax.nnx'):
  # The state was built before flax was imported: importing emax's Flax
  # module must teach flax.serialization about it.
  import importlib
  importlib.import_module(mode)
  import flax.serialization
restored = flax.serialization.from_bytes(
    state, flax.serialization.to_bytes(state))
assert type(restored) is emax.EmaState, type(restored)
assert restored.info == state.info
assert jax.tree.structure(restored) == jax.tree.structure(state)
for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
  assert np.array_equal(np.asarray(x), np.asarray(y)), mode
# BEMA's static config and an int leaf travel too.
bema = emax.bema().init({'w': np.zeros(2, np.float32), 'i': np.arange(2)})
again = flax.serialization.from_bytes(bema, flax.serialization.to_bytes(bema))
assert jax.tree.structure(again) == jax.tree.structure(bema), mode
print('round trip ok', mode)
'''


def test_round_trip_in_any_import_order(tmp_path):
  script = tmp_path / 'order.py'
  script.write_text(SCRIPT)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
  env['JAX_PLATFORMS'] = 'cpu'
  env.pop('XLA_FLAGS', None)
  modes = ['emax_first', 'flax_first', 'emax.flax', 'emax.nnx']
  children = {mode: subprocess.Popen(
      [sys.executable, str(script), mode], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for mode in modes}
  for mode, child in children.items():
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, f'{mode}:\n{err[-3000:]}'
    assert f'round trip ok {mode}' in out
