"""emax.checkpoint: Orbax save / restore / average of train states.

Saves are durable (a script may exit right after one), an interrupted save
never harms the last good checkpoint (a process is killed mid-save), restore
names a missing step and restores the step asked for, and checkpoint
averaging matches a float64 NumPy mean while holding one checkpoint at a time.
"""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import emax
import emax.checkpoint
from emax import _checkpoint_files
from helpers import child_env

HERE = os.path.dirname(os.path.abspath(__file__))
SAVE_AT, END = 3, 6
U32 = 2.0 ** -24  # float32 unit roundoff


def _assert_trees_identical(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- save / restore with a linen train state ----------------------------------
# (flax_testlib is imported inside them: the tests below need no Flax.)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """Trains to SAVE_AT, saves, trains on to END in this process."""
  from flax_testlib import make_state, run
  path = tmp_path_factory.mktemp('ckpt')
  state = run(make_state(), 0, SAVE_AT)
  with ocp.CheckpointManager(path) as manager:
    assert emax.checkpoint.save(manager, SAVE_AT, state)
  state = run(state, SAVE_AT, END)
  return path, state


def test_resume_in_a_new_process_is_bit_identical(saved, tmp_path):
  from flax_testlib import flat
  path, state = saved
  uninterrupted = flat(state)
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
  from flax_testlib import STEP, data
  path, state = saved
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
  assert ema_state.average['w'].sharding == sharded
  assert ema_state.average['w'].dtype == jnp.float32  # the accumulator
  assert int(ema_state.count) == 1
  # The uncommitted scalars come back replicated on the params' mesh.
  assert ema_state.weight.sharding == NamedSharding(mesh, P())
  averaged = emax.ema_params(restored['opt_state'])
  assert averaged['w'].dtype == jnp.bfloat16  # param_dtypes came back
  jax.tree.map(np.testing.assert_array_equal, averaged,
               emax.ema_params(opt_state))
  jax.tree.map(np.testing.assert_array_equal, restored, tree)


# --- durable saves ------------------------------------------------------------

_SAVE_AND_EXIT = textwrap.dedent('''
    import sys
    import numpy as np
    import orbax.checkpoint as ocp
    import emax.checkpoint
    manager = ocp.CheckpointManager(sys.argv[1])
    state = {'params': {'w': np.arange(4_000_000, dtype=np.float32)},
             'step': np.int32(3)}
    emax.checkpoint.save(manager, 3, state)
''')


def test_a_script_that_exits_right_after_save_keeps_the_checkpoint(tmp_path):
  # The child's last line is the save; it never closes the manager, whose
  # saves are asynchronous (Orbax's default).
  done = subprocess.run(
      [sys.executable, '-c', _SAVE_AND_EXIT, str(tmp_path)], env=child_env(),
      capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'Traceback' not in done.stderr, done.stderr[-3000:]
  manager = ocp.CheckpointManager(tmp_path)
  assert manager.latest_step() == 3
  assert not list(tmp_path.glob('*orbax-checkpoint-tmp*'))
  want = {'params': {'w': np.arange(4_000_000, dtype=np.float32)},
          'step': np.int32(3)}
  _assert_trees_identical(emax.checkpoint.restore(manager, want), want)


def test_save_returns_once_the_checkpoint_is_committed(tmp_path):
  state = {'w': np.arange(1000, dtype=np.float32)}
  manager = ocp.CheckpointManager(tmp_path)  # asynchronous by default
  assert emax.checkpoint.save(manager, 1, state)
  # Another manager reads the directory afresh: the step is there, final.
  assert ocp.CheckpointManager(tmp_path).all_steps() == [1]
  assert not list(tmp_path.glob('*orbax-checkpoint-tmp*'))
  # wait=False hands the wait to the caller.
  assert emax.checkpoint.save(manager, 2, state, wait=False)
  manager.wait_until_finished()
  assert ocp.CheckpointManager(tmp_path).all_steps() == [1, 2]
  # A step the manager's policy skips returns False (nothing written).
  assert not emax.checkpoint.save(manager, 2, state)
  with pytest.raises(TypeError, match=r"wait must be True or False, got 'no'"):
    emax.checkpoint.save(manager, 3, state, wait='no')
  manager.close()


# --- an interrupted save ------------------------------------------------------

_SAVE_UNTIL_KILLED = textwrap.dedent('''
    import sys, time
    import numpy as np
    import orbax.checkpoint as ocp
    import emax.checkpoint
    directory, mode = sys.argv[1], sys.argv[2]
    big = {'params': {f'w{i}': np.full((1024, 1024), i, np.float32)
                      for i in range(32)}}  # 128 MiB: a save takes a while
    if mode == 'at_commit':  # stop after every file is written, before commit
      atomic = ocp.path.atomicity.AtomicRenameTemporaryPath
      real_finalize = atomic.finalize
      async def finalize(self, *args, **kwargs):
        print('committing', flush=True)
        time.sleep(120)
        return await real_finalize(self, *args, **kwargs)
      atomic.finalize = finalize
    manager = ocp.CheckpointManager(directory)
    print('saving', flush=True)
    emax.checkpoint.save(manager, 2, big)
    print('saved', flush=True)
''')


def _good_state():
  rng = np.random.default_rng(7)
  params = {'dense': {'kernel': rng.standard_normal((8, 4)).astype(np.float32),
                      'bias': rng.standard_normal(4).astype(np.float32)},
            'embed': rng.standard_normal(6).astype(ml_dtypes.bfloat16)}
  opt_state = optax.adam(1e-3).init(params)
  return {'params': params, 'opt_state': jax.tree.map(np.asarray, opt_state),
          'step': np.int32(1)}


def _kill_mid_save(script, directory, mode, delay, log):
  """Starts a child that saves step 2; kills it ``delay`` s after ``mode``."""
  with open(log, 'w') as err:
    proc = subprocess.Popen(
        [sys.executable, script, str(directory), mode], env=child_env(),
        stdout=subprocess.PIPE, stderr=err, text=True)
    guard = threading.Timer(90, proc.kill)  # never hang the suite
    guard.start()
    try:
      cue = 'committing' if mode == 'at_commit' else 'saving'
      for line in proc.stdout:
        if line.strip() == cue:
          break
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    finally:
      guard.cancel()
      proc.stdout.close()
  with open(log) as f:
    assert proc.returncode == -signal.SIGKILL, f.read()[-3000:]


def _check_last_good_checkpoint_survived(directory, good):
  """Step 1 restores bit for bit in a new manager; step 2 is whole or absent."""
  manager = ocp.CheckpointManager(directory)
  assert manager.all_steps() in ([1], [1, 2])
  _assert_trees_identical(emax.checkpoint.restore(manager, good, step=1), good)
  if manager.all_steps() == [1, 2]:  # the save finished before the kill
    restored = emax.checkpoint.restore(manager, {'params': {
        f'w{i}': np.zeros((1024, 1024), np.float32) for i in range(32)}})
    for i in range(32):
      assert np.all(restored['params'][f'w{i}'] == i)
  return manager


def test_a_save_killed_midway_leaves_the_last_good_checkpoint(tmp_path):
  good = _good_state()
  base = tmp_path / 'base'
  with ocp.CheckpointManager(base) as manager:
    emax.checkpoint.save(manager, 1, good)
  script = tmp_path / 'save_until_killed.py'
  script.write_text(_SAVE_UNTIL_KILLED)

  # At a controlled point: every file of step 2 written, the rename not yet.
  run = tmp_path / 'at_commit'
  shutil.copytree(base, run)
  _kill_mid_save(script, run, 'at_commit', 0.0, tmp_path / 'at_commit.log')
  assert list(run.glob('2.orbax-checkpoint-tmp*'))  # the unfinished save
  manager = _check_last_good_checkpoint_survived(run, good)
  assert manager.latest_step() == 1
  # The next save of step 2 replaces the leftover and succeeds.
  emax.checkpoint.save(manager, 2, good)
  assert ocp.CheckpointManager(run).all_steps() == [1, 2]
  assert not list(run.glob('*orbax-checkpoint-tmp*'))

  # At a time: while the files are being written. Until one kill lands
  # mid-write (a temporary directory is left), try longer delays.
  landed = []
  for delay in (0.05, 0.15, 0.3, 0.6, 1.0):
    run = tmp_path / f'timed_{delay}'
    shutil.copytree(base, run)
    _kill_mid_save(script, run, 'timed', delay, tmp_path / f'{delay}.log')
    _check_last_good_checkpoint_survived(run, good)
    if list(run.glob('2.orbax-checkpoint-tmp*')):
      assert ocp.CheckpointManager(run).latest_step() == 1
      landed.append(delay)
      break
  assert landed, 'no kill landed while step 2 was being written'


# --- restore picks the step asked for -----------------------------------------


@pytest.fixture(scope='module')
def two_steps(tmp_path_factory):
  path = tmp_path_factory.mktemp('two_steps')
  states = {s: {'params': {'w': np.full(5, 10.0 * s, np.float32)},
                'step': np.int32(s)} for s in (1, 2)}
  with ocp.CheckpointManager(path) as manager:
    for s, state in states.items():
      emax.checkpoint.save(manager, s, state)
  return path, states


def test_restore_of_a_missing_step_names_it_and_the_saved_steps(two_steps):
  path, states = two_steps
  manager = ocp.CheckpointManager(path)
  with pytest.raises(FileNotFoundError,
                     match=r'No checkpoint for step 7 in .*; the saved steps'
                           r' are \[1, 2\]'):
    emax.checkpoint.restore(manager, states[1], step=7)


def test_restore_gets_the_step_asked_for_not_the_latest(two_steps):
  path, states = two_steps
  manager = ocp.CheckpointManager(path)
  assert manager.latest_step() == 2
  _assert_trees_identical(
      emax.checkpoint.restore(manager, states[2], step=1), states[1])
  _assert_trees_identical(
      emax.checkpoint.restore(manager, states[1]), states[2])


def test_restore_sees_a_step_saved_by_another_manager(tmp_path):
  reader = ocp.CheckpointManager(tmp_path)
  state = {'w': np.arange(3, dtype=np.float32)}
  with ocp.CheckpointManager(tmp_path) as writer:
    emax.checkpoint.save(writer, 4, state)
  _assert_trees_identical(emax.checkpoint.restore(reader, state, step=4),
                          state)


# --- checkpoint averaging -----------------------------------------------------


def _train_state(step, kernel_dtype=np.float32):
  """A plain train state, as a user saves it with Orbax (no EMA in it)."""
  rng = np.random.default_rng(100 + step)
  params = {
      'dense': {'kernel': rng.standard_normal((32, 16)).astype(kernel_dtype),
                'bias': (0.1 * rng.standard_normal(16)).astype(np.float32)},
      'head': [rng.standard_normal((16, 3)).astype(np.float32)],
  }
  opt_state = optax.adam(1e-3).init(params)
  return {'params': params, 'opt_state': jax.tree.map(np.asarray, opt_state),
          'step': step}


def _save_with_plain_orbax(directory, states):
  with ocp.CheckpointManager(directory) as manager:
    for step, state in states.items():
      manager.save(step, args=ocp.args.StandardSave(state))


def _reference(states, steps, weights=None):
  """The float64 (weighted) mean of the params, leaf by leaf."""
  stacked = [states[s]['params'] for s in steps]
  return jax.tree.map(
      lambda *xs: np.average(np.stack([np.asarray(x, np.float64) for x in xs]),
                             axis=0, weights=weights), *stacked)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('run')
  states = {s: _train_state(s) for s in (100, 200, 300, 400)}
  _save_with_plain_orbax(path, states)
  return path, states


def _assert_float32_rounding(got, want, states, steps):
  """|got - want| within the float32 roundings of the sum and the division.

  n products, n - 1 additions and one division, each off by at most half an
  ulp of a value at most the largest term: 2n unit roundoffs of it.
  """
  steps = list(steps)
  scale = jax.tree.map(
      lambda *xs: np.max(np.abs(np.stack(xs).astype(np.float64)), axis=0),
      *[states[s]['params'] for s in steps])
  for g, w, m in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                     jax.tree.leaves(scale)):
    assert g.dtype == np.float32
    err = np.abs(g.astype(np.float64) - w)
    assert np.all(err <= 2 * len(steps) * U32 * m), np.max(err / m) / U32


def test_average_of_three_checkpoints_is_the_float64_mean(run_dir):
  path, states = run_dir
  steps = [100, 200, 300]
  got = emax.checkpoint.average(path, steps)
  want = _reference(states, steps)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(got))
  _assert_float32_rounding(got, want, states, steps)
  # A float64 sum of float32 params is exact, and so the result is the exact
  # mean rounded once to float32: the float64 mean rounded, to the bit.
  exact = emax.checkpoint.average(path, steps, accumulator_dtype=jnp.float64)
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(g, w.astype(
      np.float32)), exact, want)
  # It really averaged: it is none of the checkpoints.
  assert not np.allclose(got['dense']['kernel'],
                         states[300]['params']['dense']['kernel'])


def test_weighted_average_last_and_all_steps(run_dir):
  path, states = run_dir
  steps, weights = [400, 100, 300], [3.0, 1.0, 0.5]
  got = emax.checkpoint.average(path, steps, weights)
  _assert_float32_rounding(got, _reference(states, steps, weights), states,
                           steps)
  # Weights are normalized: scaling them by 2 changes nothing, to the bit.
  again = emax.checkpoint.average(path, steps, [6.0, 2.0, 1.0])
  jax.tree.map(np.testing.assert_array_equal, again, got)
  exact = emax.checkpoint.average(path, steps, weights,
                                  accumulator_dtype=jnp.float64)
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(g, w.astype(
      np.float32)), exact, _reference(states, steps, weights))
  # steps=None: all of them; last=2: the two highest (LAWA).
  everything = emax.checkpoint.average(path)
  _assert_float32_rounding(everything, _reference(states, sorted(states)),
                           states, sorted(states))
  lawa = emax.checkpoint.average(path, last=2)
  _assert_float32_rounding(lawa, _reference(states, [300, 400]), states,
                           [300, 400])
  lawa_w = emax.checkpoint.average(path, last=2, weights=[1, 3])
  _assert_float32_rounding(lawa_w, _reference(states, [300, 400], [1, 3]),
                           states, [300, 400])
  # A zero weight: that checkpoint does not count.
  zero = emax.checkpoint.average(path, [100, 200], [0.0, 1.0])
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(g, w), zero,
               states[200]['params'])


def test_average_of_bfloat16_params_is_bfloat16_rounded_to_nearest(tmp_path):
  states = {s: _train_state(s, kernel_dtype=ml_dtypes.bfloat16)
            for s in (1, 2, 3)}
  _save_with_plain_orbax(tmp_path, states)
  got = emax.checkpoint.average(tmp_path, weights=[1, 2, 4])
  want = _reference(states, [1, 2, 3], [1, 2, 4])
  kernel = got['dense']['kernel']
  assert kernel.dtype == ml_dtypes.bfloat16
  assert got['dense']['bias'].dtype == np.float32
  # Within half a bfloat16 ulp of the exact mean (float32 sum error aside):
  # a sum kept in bfloat16 would be off by several ulp.
  exact = want['dense']['kernel']
  k = kernel.astype(np.float64)
  ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), np.abs(k)))) - 7)
  scale = np.max(np.abs(np.stack([
      states[s]['params']['dense']['kernel'].astype(np.float64)
      for s in (1, 2, 3)])), axis=0)
  assert np.all(np.abs(k - exact) <= ulp / 2 + 6 * U32 * scale)
  # And not merely close: most entries are the nearest bfloat16 exactly.
  assert np.mean(kernel == exact.astype(ml_dtypes.bfloat16)) > 0.99


def test_average_reads_one_checkpoint_at_a_time(tmp_path, monkeypatch):
  leaves, size = 8, 128 * 1024  # 8 leaves of 512 KiB: 4 MiB of params
  rng = np.random.default_rng(0)
  states = {}
  for step in range(1, 7):
    params = {f'w{i}': rng.standard_normal(size).astype(np.float32)
              for i in range(leaves)}
    states[step] = {'params': params,
                    'opt_state': {'mu': params, 'nu': params}}
  _save_with_plain_orbax(tmp_path, states)
  ckpt_bytes = leaves * size * 4

  alive_at_read, read_leaves, refs = [], [], []
  real_restore = ocp.Checkpointer.restore

  def counting_restore(self, *args, **kwargs):
    alive_at_read.append(sum(r() is not None for r in refs))
    out = real_restore(self, *args, **kwargs)
    read_leaves.append(len(jax.tree.leaves(out)))
    refs.extend(weakref.ref(x) for x in jax.tree.leaves(out))
    return out

  monkeypatch.setattr(ocp.Checkpointer, 'restore', counting_restore)
  # As for checkpoints of 64 MiB and more: a full garbage collection after
  # each one frees the restored arrays that Orbax's reference cycles hold.
  monkeypatch.setattr(_checkpoint_files, 'COLLECT_ABOVE_BYTES', 0)
  tracemalloc.start()
  try:
    got = emax.checkpoint.average(tmp_path)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # Six reads; at each one no array of an earlier checkpoint is alive: the
  # arrays Orbax restored (which tracemalloc does not see) are one
  # checkpoint's at most.
  assert alive_at_read == [0] * 6
  # Only the params were read (a partial restore), not the optimizer state.
  assert read_leaves == [leaves] * 6
  # What average itself allocates (NumPy, seen by tracemalloc): the sum and
  # one leaf's temporaries, well under the sum plus one more checkpoint.
  leaf_bytes = size * 4
  assert peak < ckpt_bytes + 2 * leaf_bytes + (2 << 20), peak / ckpt_bytes
  _assert_float32_rounding(got, _reference(states, range(1, 7)), states,
                           range(1, 7))


def test_average_of_an_ema_subtree(tmp_path):
  rng = np.random.default_rng(3)
  params = {'w': jnp.asarray(rng.standard_normal(6), jnp.float32)}
  state = emax.init(params)
  saved = {}
  with ocp.CheckpointManager(tmp_path) as manager:
    for step in (1, 2, 3):
      params = {'w': params['w'] + jnp.asarray(rng.standard_normal(6),
                                               jnp.float32)}
      state = emax.update(state, params, 0.5)
      saved[step] = np.asarray(state.average['w'], np.float64)
      manager.save(step, args=ocp.args.StandardSave(
          {'params': params, 'ema_state': state}))
  got = emax.checkpoint.average(tmp_path, path=('ema_state', 'average'))
  want = np.mean(np.stack(list(saved.values())), axis=0)
  assert got['w'].dtype == np.float32
  np.testing.assert_allclose(got['w'], want, rtol=0, atol=6 * U32 * np.max(
      np.abs(np.stack(list(saved.values())))))
  # A callable selects the same thing, in any structure it likes.
  both = emax.checkpoint.average(
      tmp_path, path=lambda t: {'avg': t['ema_state']['average'],
                                'params': t['params']})
  np.testing.assert_array_equal(both['avg']['w'], got['w'])
  assert set(both) == {'avg', 'params'}


def test_average_into_a_sharding(run_dir):
  path, states = run_dir
  mesh = jax.make_mesh((8,), ('x',))
  replicated = NamedSharding(mesh, P())
  shardings = {'dense': {'kernel': NamedSharding(mesh, P('x')),
                         'bias': NamedSharding(mesh, P('x'))},
               'head': [replicated]}
  got = emax.checkpoint.average(path, [100, 200, 300], sharding=shardings)
  for leaf, sharding in zip(jax.tree.leaves(got), jax.tree.leaves(shardings)):
    assert isinstance(leaf, jax.Array)
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  _assert_float32_rounding(jax.tree.map(np.asarray, got),
                           _reference(states, [100, 200, 300]), states,
                           [100, 200, 300])
  one = emax.checkpoint.average(path, last=1, sharding=replicated)
  assert all(x.sharding.is_equivalent_to(replicated, x.ndim)
             for x in jax.tree.leaves(one))
  jax.tree.map(np.testing.assert_array_equal, one, states[400]['params'])


def test_average_of_a_manager_waits_for_its_save_in_flight(tmp_path):
  states = {s: _train_state(s) for s in (1, 2)}
  manager = ocp.CheckpointManager(tmp_path)
  emax.checkpoint.save(manager, 1, states[1])
  emax.checkpoint.save(manager, 2, states[2], wait=False)
  got = emax.checkpoint.average(manager)
  _assert_float32_rounding(got, _reference(states, [1, 2]), states, [1, 2])
  manager.close()


def test_average_of_one_item_among_several(tmp_path):
  states = {s: _train_state(s) for s in (1, 2)}
  with ocp.CheckpointManager(tmp_path, item_names=('state', 'meta')) as m:
    for s, state in states.items():
      m.save(s, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave({'step': s})))
  with pytest.raises(FileNotFoundError,
                     match=r"several items \['meta', 'state'\]; pass item="):
    emax.checkpoint.average(tmp_path)
  got = emax.checkpoint.average(tmp_path, item='state')
  _assert_float32_rounding(got, _reference(states, [1, 2]), states, [1, 2])


@pytest.mark.parametrize('kwargs, error, message', [
    ({'steps': [100, 7, 8]}, FileNotFoundError,
     r'No checkpoint for steps 7, 8 in .*; the saved steps are'
     r' \[100, 200, 300, 400\]'),
    ({'steps': [100, 100]}, ValueError, r'steps \[100\] appear more than once'),
    ({'steps': []}, ValueError, 'steps is empty'),
    ({'steps': [100.0]}, TypeError, 'steps must be an int, got 100.0'),
    ({'steps': [100, 200], 'weights': [1.0]}, ValueError,
     r'weights has shape \(1,\) but 2 checkpoints are averaged'
     r' \(steps \[100, 200\]\)'),
    ({'last': 2, 'weights': [1, 2, 3]}, ValueError,
     r'weights has shape \(3,\) but 2 checkpoints'),
    ({'weights': [1, -1, 1, 1]}, ValueError,
     r'finite and non-negative, got \[1.0, -1.0, 1.0, 1.0\]'),
    ({'weights': [1, float('nan'), 1, 1]}, ValueError, 'finite'),
    ({'weights': [0, 0, 0, 0]}, ValueError, 'weights sum to 0'),
    ({'last': 5}, ValueError,
     r'last=5 but there are only 4 checkpoints to average'),
    ({'last': 0}, ValueError, r'last must be an int in \[1, .*\], got 0'),
    ({'path': ('parameters',)}, KeyError,
     r"no path \('parameters',\): at \(\) it holds a dict with keys"
     r" \['opt_state', 'params', 'step'\], with no 'parameters'"),
    ({'path': ('params', 'dense', 'W')}, KeyError,
     r"at \('params', 'dense'\) it holds a dict with keys \['bias',"
     r" 'kernel'\]"),
    ({'path': ('params', 'head', 3)}, KeyError,
     r'a list of length 1, with no 3'),
    ({'path': ()}, TypeError,
     r"Cannot average \['opt_state'\]\[0\]\['count'\] .* not"
     r' floating-point'),
    ({'path': 3.5}, TypeError, 'path must be a key'),
    ({'path': lambda t: {'x': np.zeros(3)}}, ValueError,
     'must return parts of the tree it is given'),
    ({'accumulator_dtype': jnp.bfloat16}, ValueError,
     'accumulator_dtype must be jnp.float32 or jnp.float64'),
    ({'item': 'state'}, FileNotFoundError, r"has no item 'state'"),
])
def test_average_rejects_bad_input_clearly(run_dir, kwargs, error, message):
  path, _ = run_dir
  with pytest.raises(error, match=message):
    emax.checkpoint.average(path, **kwargs)


def test_average_of_an_empty_or_interrupted_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    emax.checkpoint.average(tmp_path / 'nowhere')
  (tmp_path / '5.orbax-checkpoint-tmp').mkdir()
  with pytest.raises(FileNotFoundError,
                     match=r"No finished checkpoint in .*; only interrupted"
                           r" saves: \['5.orbax-checkpoint-tmp'\]"):
    emax.checkpoint.average(tmp_path)
  with pytest.raises(TypeError, match='a checkpoint directory'):
    emax.checkpoint.average(42)


def test_average_of_checkpoints_of_different_models(tmp_path):
  _save_with_plain_orbax(tmp_path, {1: _train_state(1)})
  other = _train_state(2)
  other['params']['dense']['bias'] = np.zeros(17, np.float32)
  _save_with_plain_orbax(tmp_path, {2: other})
  with pytest.raises(ValueError,
                     match=r"\['dense'\]\['bias'\] has shape \(16,\) and dtype"
                           r' float32 in checkpoint 1 but shape \(17,\)'):
    emax.checkpoint.average(tmp_path)


# --- what save records, and reading states restored without a target ---------

DECAYS = {'s05': emax.power_function_decay(sigma_rel=0.05),
          's10': emax.power_function_decay(sigma_rel=0.10)}


def _mixed_params(seed=0):
  """float32, bf16 and int leaves, a tuple among them."""
  rng = np.random.default_rng(seed)
  return {'dense': {'kernel': jnp.asarray(rng.standard_normal((5, 4)),
                                          jnp.float32),
                    'bias': jnp.asarray(rng.standard_normal(4), jnp.bfloat16)},
          'head': (jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),),
          'seen': jnp.asarray(7, jnp.int32)}


def _ema_run(decay, steps=3, seed=0, **options):
  """``steps`` updates of optax.chain(identity, emax.ema(decay, ...))."""
  params = _mixed_params(seed)
  tx = optax.chain(optax.identity(), emax.ema(decay, **options))
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(seed + 1)
  history = []
  for _ in range(steps):
    updates = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype)
        if jnp.issubdtype(p.dtype, jnp.floating) else jnp.ones_like(p),
        params)
    _, opt_state = update(updates, opt_state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return tx, params, opt_state, history


def _save_and_restore_raw(directory, state, **save_kwargs):
  """Saves with emax.checkpoint.save; restores with no target."""
  with ocp.CheckpointManager(directory) as manager:
    emax.checkpoint.save(manager, 1, state, **save_kwargs)
  with ocp.CheckpointManager(directory) as manager:
    raw = manager.restore(1, args=ocp.args.StandardRestore())
    metadata = manager.metadata(1)
  return raw, metadata


def _flax_serialization():
  """Imports flax.serialization, as a program that uses it does first.

  emax teaches flax its static parts when flax is already imported as a
  state is built (emax never imports flax itself): import it first.
  """
  import flax.serialization  # pylint: disable=g-import-not-at-top
  return flax.serialization


def _flax_raw(state):
  serialization = _flax_serialization()
  return serialization.msgpack_restore(serialization.to_bytes(state))


def test_save_records_where_the_averages_are_and_their_widths(tmp_path):
  params = _mixed_params()
  tx = emax.with_ema(optax.adam(1e-3), DECAYS)
  bs_state = emax.init({'mean': jnp.zeros(3)})  # a second, unnamed average
  state = {'params': params, 'opt_state': tx.init(params),
           'batch_stats_ema': bs_state}
  raw, metadata = _save_and_restore_raw(
      tmp_path, state, sigma_rels={'s10': DECAYS['s10'], 's05': 0.05},
      custom_metadata={'run': 'mine'})
  assert metadata.custom_metadata['run'] == 'mine'  # the user's stays
  record = metadata.custom_metadata['emax']
  assert record['format'] == 1
  by_path = {tuple(a['path']): a for a in record['averages']}
  assert set(by_path) == {('opt_state', 'ema_state'), ('batch_stats_ema',)}
  named = by_path['opt_state', 'ema_state']
  assert named['names'] == ['s05', 's10'] and named['layout'] == 'plain'
  assert named['debias'] is False
  np.testing.assert_allclose(named['sigma_rels'], [0.05, 0.10], rtol=1e-12)
  # One dtype per param leaf, in the params' order, with the stored path.
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  assert named['param_dtypes'] == [str(x.dtype) for _, x in flat]
  assert [tuple(p) for p in named['param_paths']] == [
      ('dense', 'bias'), ('dense', 'kernel'), ('head', 0), ('seen',)]
  assert by_path['batch_stats_ema',]['names'] is None
  assert by_path['batch_stats_ema',]['sigma_rels'] is None
  # The recorded paths are where Orbax put the averages.
  assert set(raw['opt_state']['ema_state']) >= {'count', 'average', 'weight'}
  # restore() with a target and average() do not see the record.
  with ocp.CheckpointManager(tmp_path) as manager:
    back = emax.checkpoint.restore(manager, state)
  _assert_trees_identical(back, state)
  soup = emax.checkpoint.average(tmp_path, path=('params', 'dense'))
  np.testing.assert_array_equal(soup['kernel'], params['dense']['kernel'])


def test_save_without_an_average_records_nothing(tmp_path):
  _, metadata = _save_and_restore_raw(tmp_path, {'w': jnp.ones(2)})
  assert 'emax' not in (metadata.custom_metadata or {})


def test_save_records_packed_offloaded_and_single_averages(tmp_path):
  for k, options in enumerate([{'pack': True}, {'offload': True}]):
    _, _, opt_state, _ = _ema_run(DECAYS, steps=1, **options)
    _, metadata = _save_and_restore_raw(tmp_path / str(k), opt_state,
                                        sigma_rels=DECAYS)
    [entry] = metadata.custom_metadata['emax']['averages']
    assert entry['path'] == [1]
    assert entry['layout'] == ('packed' if 'pack' in options else 'offloaded')
    assert entry['param_paths'] is None  # the layout is not the params'
  _, _, opt_state, _ = _ema_run(emax.power_function_decay(sigma_rel=0.2),
                                steps=1, debias=True)
  _, metadata = _save_and_restore_raw(
      tmp_path / 'single', opt_state,
      sigma_rels=emax.power_function_decay(sigma_rel=0.2))
  [entry] = metadata.custom_metadata['emax']['averages']
  assert entry['names'] is None and entry['debias'] is True
  assert entry['sigma_rels'] == [pytest.approx(0.2, rel=1e-12)]


@pytest.mark.parametrize('state, kwargs, error, message', [
    ('named', {'sigma_rels': {'s05': emax.tf_decay(0.99)}}, TypeError,
     r"sigma_rels\['s05'\]: emax.tf_decay.* has no sigma_rel; only"
     r' emax.power_function_decay'),
    ('named', {'sigma_rels': {'s07': 0.07}}, ValueError,
     r"sigma_rels names \['s07'\], but the averages in the state are named"
     r" \[\['s05', 's10'\]\]"),
    ('named', {'sigma_rels': {'s05': 0.5}}, ValueError,
     r"sigma_rels\['s05'\] must be in \(0, 0.2887\) .*, got 0.5. Typical"
     r' values are 0.05 to 0.15'),
    ('named', {'sigma_rels': 0.05}, ValueError,
     r'sigma_rels=0.05 names no average: only a single unnamed average takes'
     r" a width without a name, and the state holds no unnamed averages; the"
     r" named ones are \[\['s05', 's10'\]\]"),
    ('named', {'sigma_rels': [0.05, 0.1]}, ValueError,
     r'sigma_rels=\[0.05, 0.1\] names no average'),
    ('named', {'sigma_rels': {'s05': 'wide'}}, TypeError,
     r"sigma_rels\['s05'\] must be a number"),
    ('named', {'custom_metadata': {'emax': 1}}, ValueError,
     r"custom_metadata has the key 'emax'"),
    ('plain', {'sigma_rels': 0.05}, ValueError,
     'sigma_rels was given, but the state holds no emax.EmaState'),
])
def test_save_rejects_bad_sigma_rels(tmp_path, state, kwargs, error, message):
  if state == 'named':
    params = {'w': jnp.ones(2)}
    state = {'params': params,
             'opt_state': emax.with_ema(optax.sgd(0.1), DECAYS).init(params)}
  else:
    state = {'w': jnp.ones(2)}
  with ocp.CheckpointManager(tmp_path) as manager:
    with pytest.raises(error, match=message):
      emax.checkpoint.save(manager, 1, state, **kwargs)
    assert manager.all_steps() == []  # nothing was written


def _reference_debiased(history, decay, initial):
  """float64 transcription: sum_i (1-d) d^(t-i) p_i / (1 - d^t), leafwise.

  A debias=True average (Adam-style): zero weight at first, each step adds
  (1 - d) p_i and multiplies what was there by d.
  """
  t = len(history)
  if t == 0:
    return jax.tree.map(lambda x: np.asarray(x, np.float64), initial)
  weights = [(1 - decay) * decay ** (t - i) for i in range(1, t + 1)]
  total = 1 - decay ** t
  return jax.tree.map(
      lambda *xs: sum(w * np.asarray(x, np.float64)
                      for w, x in zip(weights, xs)) / total, *history)


@pytest.mark.parametrize('source', ['orbax', 'flax'])
def test_read_average_of_named_debiased_bf16_averages(tmp_path, source):
  _flax_serialization()
  decays = {'fast': 0.5, 'slow': 0.9}
  _, params, opt_state, history = _ema_run(decays, steps=3, debias=True)
  state = {'params': params, 'opt_state': opt_state}
  if source == 'orbax':
    raw, metadata = _save_and_restore_raw(tmp_path, state)
  else:
    raw, metadata = _flax_raw(state), None
  stored = raw['opt_state'][1] if source == 'orbax' else raw['opt_state']['1']
  for k, (name, decay) in enumerate(decays.items()):
    weight = np.float32(np.asarray(opt_state[1].weight)[k])
    assert weight not in (0.0, 1.0)  # the division is exercised
    want = emax.ema_params(opt_state, name)  # the peer reader
    for key in (name, k):  # a name, or its index
      got = emax.checkpoint.read_average(raw, name=key, metadata=metadata)
      assert jax.tree.structure(got) == jax.tree.structure(
          _as_stored(want, source))
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype  # bf16 params come back as bf16
        if source == 'orbax':  # jax.Arrays: divided on the device, as emax
          np.testing.assert_array_equal(g, w)
        else:  # NumPy divides correctly rounded; XLA on CPU may not (1 ulp)
          ulp = np.spacing(np.abs(w)).astype(np.float64) if (
              jnp.issubdtype(w.dtype, jnp.floating)) else 0
          assert np.all(np.abs(g.astype(np.float64) - w) <= ulp)
    # The stored average divided by the weight, correctly rounded (a float64
    # quotient of float32 numbers rounds to the nearest float32 quotient).
    got = emax.checkpoint.read_average(raw, name=name, metadata=metadata)
    for path, stored_leaf in (('kernel', stored['average']['dense']['kernel']),
                              ('bias', stored['average']['dense']['bias'])):
      quotient = (np.asarray(stored_leaf[k], np.float64) / np.float64(weight)
                  ).astype(np.float32)
      dtype = params['dense'][path].dtype
      if source == 'flax':
        np.testing.assert_array_equal(
            got['dense'][path], quotient.astype(dtype))
    # And against the debiasing formula in float64: the stored float32 sum and
    # the quotient each round once (a few float32 ulps), then the params'
    # dtype rounds once more (one ulp of it).
    reference = _reference_debiased(history, decay, None)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(reference)):
      g = np.asarray(g)
      if g.dtype == np.int32:
        np.testing.assert_array_equal(g, np.asarray(params['seen']))
        continue
      ulp = np.spacing(np.abs(r).astype(g.dtype)).astype(np.float64)
      assert np.all(np.abs(g.astype(np.float64) - r)
                    <= ulp + 8 * U32 * np.abs(r)), (g, r)


def _as_stored(tree, source):
  """``tree`` with tuples as Orbax (lists) or flax ('0', '1'...) store them."""
  def convert(x):
    if isinstance(x, tuple):
      items = [convert(v) for v in x]
      return items if source == 'orbax' else {str(i): v for i, v in
                                              enumerate(items)}
    if isinstance(x, dict):
      return {k: convert(v) for k, v in x.items()}
    return x
  return convert(tree)


def test_read_average_without_names_or_dtypes(tmp_path):
  decays = {'fast': 0.5, 'slow': 0.9}
  _, params, opt_state, _ = _ema_run(decays, steps=2)
  with ocp.CheckpointManager(tmp_path) as manager:  # plain Orbax: no record
    manager.save(1, args=ocp.args.StandardSave(opt_state))
    manager.wait_until_finished()
    raw = manager.restore(1, args=ocp.args.StandardRestore())
  assert isinstance(raw, list)
  stored = raw[1]['average']
  # Index 1 is 'slow'; without dtypes the stored float32 comes back, as is
  # (weight 1: no division), bit for bit.
  got = emax.checkpoint.read_average(raw, name=1)
  assert got['dense']['bias'].dtype == jnp.float32
  np.testing.assert_array_equal(got['dense']['bias'],
                                stored['dense']['bias'][1])
  np.testing.assert_array_equal(
      got['dense']['bias'],
      emax.ema_params(opt_state, 'slow', dtypes='accumulator')['dense']['bias'])
  with pytest.raises(ValueError, match=r"got name='slow', but the names of"
                     r' the 2 averages were not saved .* Pass an index 0 to'
                     ' 1 instead'):
    emax.checkpoint.read_average(raw, name='slow')
  with pytest.raises(ValueError, match=r'holds 2 averages, whose names were'
                     ' not saved'):
    emax.checkpoint.read_average(raw)
  with pytest.raises(ValueError, match='name=2 is out of range'):
    emax.checkpoint.read_average(raw, name=2)
  # like= a params tree gives the dtypes and the tree types (the tuple).
  got = emax.checkpoint.read_average(raw, name=1, like=params)
  want = emax.ema_params(opt_state, 'slow')
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(
      np.asarray(g), np.asarray(w)), got, want)
  assert got['dense']['bias'].dtype == jnp.bfloat16


def test_read_average_of_weights_zero_and_one(tmp_path):
  _flax_serialization()
  # debias=True before any step: weight 0, the stored initial params.
  _, params, opt_state, _ = _ema_run(0.9, steps=0, debias=True)
  raw = _flax_raw(opt_state)
  assert float(raw['1']['weight']) == 0.0
  got = emax.checkpoint.read_average(raw)
  for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    assert g.dtype == p.dtype
    np.testing.assert_array_equal(g, np.asarray(p))
  # Without debias: weight 1, the stored value itself.
  _, _, opt_state, _ = _ema_run(0.9, steps=2)
  raw, metadata = _save_and_restore_raw(tmp_path, {'opt_state': opt_state})
  got = emax.checkpoint.read_average(raw, metadata=metadata)
  np.testing.assert_array_equal(
      got['dense']['kernel'], raw['opt_state'][1]['average']['dense']['kernel'])
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(
      np.asarray(g), np.asarray(w)), got,
               _as_stored(emax.ema_params(opt_state), 'orbax'))


@pytest.mark.parametrize('layout', ['pack', 'offload'])
@pytest.mark.parametrize('source', ['orbax', 'flax'])
def test_read_average_of_packed_and_offloaded_needs_like(tmp_path, layout,
                                                         source):
  _flax_serialization()
  tx, params, opt_state, _ = _ema_run({'fast': 0.5, 'slow': 0.9}, steps=2,
                                      debias=True, **{layout: True})
  if source == 'orbax':
    raw, metadata = _save_and_restore_raw(tmp_path, opt_state)
  else:
    raw, metadata = _flax_raw(opt_state), None
  # Orbax: the layout save recorded; flax: the leaves do not fit the params.
  stored, option = (('packed', 'pack') if layout == 'pack' else
                    ('offloaded', 'offload'))
  if source == 'flax':
    stored, option = 'packed or offloaded', 'pack=True or offload'
  with pytest.raises(ValueError, match=rf'was stored {stored} \({option}=True'
                     r'\).* Pass like= the abstract state'):
    emax.checkpoint.read_average(raw, name='slow', metadata=metadata)
  like = jax.eval_shape(tx.init, params)
  for name in ('fast', 'slow', 1):
    got = emax.checkpoint.read_average(raw, name=name, like=like)
    want = emax.ema_params(opt_state, ('fast', 'slow')[name] if isinstance(
        name, int) else name)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(
        np.asarray(g), np.asarray(w)), got, want)
    assert got['dense']['bias'].dtype == jnp.bfloat16
  other = jax.eval_shape(optax.chain(optax.identity(), emax.ema(
      {'fast': 0.5, 'slow': 0.9})).init, params)  # plain, not packed
  with pytest.raises(ValueError, match='like is not the state that was saved'):
    emax.checkpoint.read_average(raw, name='slow', like=other)


def test_read_average_of_a_train_state_with_two_averages(saved):
  """EmaTrainState averages params and batch_stats: path= picks one."""
  from flax_testlib import make_state
  path, _ = saved
  with ocp.CheckpointManager(path) as manager:
    raw = manager.restore(SAVE_AT, args=ocp.args.StandardRestore())
    typed = emax.checkpoint.restore(manager, make_state(), SAVE_AT)
  with pytest.raises(ValueError, match=(
      r"found 2 averages, at \[\['batch_stats_ema'\], \['opt_state',"
      r" 'ema_state'\]\]; pass path=")):
    emax.checkpoint.read_average(raw)
  got = emax.checkpoint.read_average(raw, path=('opt_state', 'ema_state'))
  want = typed.ema_params
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(
      np.asarray(g), np.asarray(w)), got, want)
  stats = emax.checkpoint.read_average(raw, path=['batch_stats_ema'])
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(
      np.asarray(g), np.asarray(w)), stats,
               typed.eval_variables()['batch_stats'])
  with pytest.raises(ValueError, match=r"no average at path \['nowhere'\]"):
    emax.checkpoint.read_average(raw, path='nowhere')
  # A typed state is read with emax.ema_params, not here.
  with pytest.raises(ValueError, match=r'is an emax.EmaState already .* read'
                     r' it with emax.ema_params\(state, name\)'):
    emax.checkpoint.read_average(typed.opt_state)


def test_read_average_names_what_it_could_not_find():
  _flax_serialization()
  with pytest.raises(ValueError, match=r'found no dict with keys'
                     r' count/average/weight/step_size/skipped .*; its'
                     r" top-level keys were \['opt_state', 'params'\]"):
    emax.checkpoint.read_average({'params': {'w': np.ones(2)},
                                  'opt_state': [{'mu': np.ones(2)}]})
  with pytest.raises(ValueError, match='it was a list of length 0'):
    emax.checkpoint.read_average([])
  single = _flax_raw(emax.init({'w': jnp.ones(2)}))
  with pytest.raises(ValueError, match=r"a single, unnamed average; got"
                     r" name='fast'"):
    emax.checkpoint.read_average(single, name='fast')
  named = _flax_raw(emax.init({'w': jnp.ones(2)}, names=('a', 'b')))
  with pytest.raises(ValueError, match=r"no average named 'c'; the state"
                     r" holds \['a', 'b'\]"):
    emax.checkpoint.read_average(named, name='c')
  replicated = jax.tree.map(lambda x: np.stack([x, x]), named)
  with pytest.raises(ValueError, match=r'count of shape \(2,\): it was saved'
                     r' replicated \(jax.pmap\)'):
    emax.checkpoint.read_average(replicated, name='a')


# --- averages are read by their recorded names, whatever the target's order ---


def _fast_slow_run(names):
  """One step of emax.ema with decays named in the order of ``names``."""
  decays = {'fast': 0.5, 'slow': 0.9}
  tx = emax.ema({n: decays[n] for n in names})
  params = {'w': jnp.zeros(2)}
  state = tx.init(params)
  _, state = tx.update({'w': jnp.ones(2)}, state, params)
  return tx, params, state


def test_restore_reads_averages_by_their_recorded_names(tmp_path):
  tx, params, state = _fast_slow_run(('fast', 'slow'))
  reordered_tx, _, _ = _fast_slow_run(('slow', 'fast'))
  reordered = {'ema': reordered_tx.init(params)}
  with ocp.CheckpointManager(tmp_path) as manager:
    emax.checkpoint.save(manager, 1, {'ema': state})
    restored = emax.checkpoint.restore(manager, reordered)['ema']
    other = {'ema': emax.ema({'a': 0.5, 'b': 0.9}).init(params)}
    with pytest.raises(ValueError, match=(
        r"restore \(step 1\): the averages at \['ema'\] were saved as"
        r" \['fast', 'slow'\], but like holds \['a', 'b'\]")):
      emax.checkpoint.restore(manager, other)
  assert restored.info.names == ('fast', 'slow')  # the saved order
  fast = np.asarray(emax.ema_params(state, 'fast')['w'])
  slow = np.asarray(emax.ema_params(state, 'slow')['w'])
  assert not np.array_equal(fast, slow)
  np.testing.assert_array_equal(emax.ema_params(restored, 'fast')['w'], fast)
  np.testing.assert_array_equal(emax.ema_params(restored, 'slow')['w'], slow)
  # The reordered run goes on from it as the original run does.
  _, going_on = reordered_tx.update({'w': jnp.ones(2)}, restored, params)
  _, original = tx.update({'w': jnp.ones(2)}, state, params)
  for name in ('fast', 'slow'):
    np.testing.assert_array_equal(emax.ema_params(going_on, name)['w'],
                                  emax.ema_params(original, name)['w'])


@pytest.mark.parametrize('source', ['orbax', 'flax'])
def test_read_average_reads_by_the_recorded_names_not_like(tmp_path, source):
  _, params, state = _fast_slow_run(('fast', 'slow'))
  reordered_tx, _, _ = _fast_slow_run(('slow', 'fast'))
  like = jax.eval_shape(reordered_tx.init, params)
  if source == 'orbax':
    raw, metadata = _save_and_restore_raw(tmp_path, {'ema': state})
  else:
    raw, metadata = _flax_raw({'ema': state}), None
  fast = np.asarray(emax.ema_params(state, 'fast')['w'])
  slow = np.asarray(emax.ema_params(state, 'slow')['w'])
  assert not np.array_equal(fast, slow)
  for name, want in (('slow', slow), ('fast', fast)):
    got = emax.checkpoint.read_average(raw, name=name, like=like,
                                       metadata=metadata)
    np.testing.assert_array_equal(np.asarray(got['w']), want)
  other = jax.eval_shape(emax.ema({'a': 0.5, 'b': 0.9}).init, params)
  with pytest.raises(ValueError, match=(
      r"was saved holding \['fast', 'slow'\], but like holds \['a', 'b'\]")):
    emax.checkpoint.read_average(raw, name='fast', like=other,
                                 metadata=metadata)
