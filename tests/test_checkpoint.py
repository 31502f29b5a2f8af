"""emax.checkpoint: Orbax save / restore of train states holding an average."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import emax
import emax.checkpoint
import emax.flax
from flax_testlib import STEP, data, flat, make_state, run

SAVE_AT, END = 3, 6
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """Trains to SAVE_AT, saves, trains on to END in this process."""
  path = tmp_path_factory.mktemp('ckpt')
  state = run(make_state(), 0, SAVE_AT)
  with ocp.CheckpointManager(path) as manager:
    assert emax.checkpoint.save(manager, SAVE_AT, state)
    manager.wait_until_finished()
  state = run(state, SAVE_AT, END)
  return path, flat(state), state


def test_resume_in_a_new_process_is_bit_identical(saved, tmp_path):
  path, uninterrupted, _ = saved
  out = tmp_path / 'resumed.npz'
  subprocess.run(
      [sys.executable, os.path.join(HERE, 'flax_testlib.py'), 'resume',
       str(path), str(SAVE_AT), str(END), str(out)],
      check=True, env=dict(os.environ), timeout=300)
  resumed = dict(np.load(out))
  assert resumed.keys() == uninterrupted.keys()
  for name, value in uninterrupted.items():
    np.testing.assert_array_equal(resumed[name], value, err_msg=name)
  assert int(uninterrupted["['count']"]) == END
  assert int(uninterrupted["['step']"]) == END


def test_restore_without_target_gives_the_clear_error(saved):
  path, _, state = saved
  with ocp.CheckpointManager(path) as manager:
    raw = manager.restore(SAVE_AT, args=ocp.args.StandardRestore())
  assert isinstance(raw, dict)
  bad = state.replace(opt_state=raw['opt_state'])
  hint = r'restored without a target.*emax\.checkpoint\.restore'
  with pytest.raises(ValueError, match=hint):
    bad.ema_params  # pylint: disable=pointless-statement
  x, y = data()
  with pytest.raises(ValueError, match=hint):
    jax.jit(lambda s: STEP.__wrapped__(s, x[0], y[0]))(bad)
  with pytest.raises(ValueError, match=hint):
    emax.ema_params(raw['opt_state'])
  bad_bs = state.replace(batch_stats_ema=raw['batch_stats_ema'])
  with pytest.raises(ValueError, match=hint):
    bad_bs.eval_variables()


def test_restore_keeps_types_dtypes_and_shardings(tmp_path):
  mesh = jax.make_mesh((8,), ('x',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  sharded = NamedSharding(mesh, P('x'))
  params = {'w': jax.device_put(jnp.arange(16, dtype=jnp.bfloat16), sharded),
            'b': jnp.ones(3, jnp.float32)}
  tx = optax.chain(optax.sgd(0.5), emax.ema(0.5, debias=True))
  opt_state = tx.init(params)
  grads = {'w': jnp.ones(16, jnp.bfloat16), 'b': jnp.ones(3, jnp.float32)}
  updates, opt_state = tx.update(grads, opt_state, params)
  tree = {'params': optax.apply_updates(params, updates),
          'opt_state': opt_state}
  with ocp.CheckpointManager(tmp_path) as manager:
    emax.checkpoint.save(manager, 1, tree)
    with pytest.raises(FileNotFoundError, match='No checkpoint'):
      emax.checkpoint.restore(ocp.CheckpointManager(tmp_path / 'empty'), tree)
    like = {'params': params, 'opt_state': tx.init(params)}  # fresh, step 0
    restored = emax.checkpoint.restore(manager, like)
  ema_state = emax.get_ema_state(restored['opt_state'])
  assert isinstance(ema_state, emax.EmaState)
  assert ema_state.ema['w'].sharding == sharded
  assert ema_state.ema['w'].dtype == jnp.float32  # the accumulator
  assert int(ema_state.count) == 1
  # The uncommitted scalars come back replicated on the params' mesh.
  assert ema_state.weight.sharding == NamedSharding(mesh, P())
  averaged = emax.ema_params(restored['opt_state'])
  assert averaged['w'].dtype == jnp.bfloat16  # param_dtypes came back
  jax.tree.map(np.testing.assert_array_equal, averaged,
               emax.ema_params(opt_state))
  jax.tree.map(np.testing.assert_array_equal, restored, tree)
