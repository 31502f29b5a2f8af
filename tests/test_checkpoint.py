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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SAVE_AT, END = 3, 6
U32 = 2.0 ** -24  # float32 unit roundoff


def _average_of(ema_state):
  """The stored average of an EmaState, whatever its field is called."""
  return next(v for v in ema_state if isinstance(v, dict))


def _assert_trees_identical(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _child_env():
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
  env.setdefault('JAX_PLATFORMS', 'cpu')
  return env


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
  assert _average_of(ema_state)['w'].sharding == sharded
  assert _average_of(ema_state)['w'].dtype == jnp.float32  # the accumulator
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
      [sys.executable, '-c', _SAVE_AND_EXIT, str(tmp_path)], env=_child_env(),
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
        [sys.executable, script, str(directory), mode], env=_child_env(),
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
  monkeypatch.setattr(emax.checkpoint, '_COLLECT_ABOVE_BYTES', 0)
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
      saved[step] = np.asarray(_average_of(state)['w'], np.float64)
      manager.save(step, args=ocp.args.StandardSave(
          {'params': params, 'ema_state': state}))
  field = next(name for name, value in state._asdict().items()
               if isinstance(value, dict))
  got = emax.checkpoint.average(tmp_path, path=('ema_state', field))
  want = np.mean(np.stack(list(saved.values())), axis=0)
  assert got['w'].dtype == np.float32
  np.testing.assert_allclose(got['w'], want, rtol=0, atol=6 * U32 * np.max(
      np.abs(np.stack(list(saved.values())))))
  # A callable selects the same thing, in any structure it likes.
  both = emax.checkpoint.average(
      tmp_path, path=lambda t: {'avg': t['ema_state'][field],
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
    ({'steps': [100.0]}, TypeError, 'steps must be ints'),
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
    ({'last': 0}, ValueError, 'last must be a positive int, got 0'),
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
