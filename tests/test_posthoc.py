"""Tests of emax.posthoc against an independent float64 reference of EDM2."""

import functools
import os
import shutil
import tracemalloc
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import emax
import emax.checkpoint
from emax import posthoc
from emax import _checkpoint_files
from emax import _posthoc_checkpoints
from emax import _posthoc_solve
from helpers import run_cli
import reference_posthoc as ref

EVERY_100 = (np.repeat(np.arange(100, 1201, 100), 2), [0.05, 0.10] * 12)
IRREGULAR = (np.repeat([7, 30, 111, 512, 1000, 4096], 3), [0.02, 0.1, 0.2] * 6)
# EDM2 counts images; here the two widths are saved at alternate times.
IMAGES = (np.arange(1, 21) * 2**17, [0.05, 0.10] * 10)
GRIDS = {
    'every_100': (EVERY_100, [0.02, 0.05, 0.08, 0.12, 0.2], [None, 600, 100]),
    'irregular': (IRREGULAR, [0.01, 0.15, 0.25], [None, 1000, 7]),
    'images': (IMAGES, [0.03, 0.07, 0.15], [None, 10 * 2**17, 2**17]),
    'single': (([1000], [0.1]), [0.05, 0.1], [None]),
}


@pytest.mark.parametrize('grid', GRIDS)
def test_coefficients_equal_the_edm2_formula(grid):
  (steps, sigma_rels), targets, target_steps = GRIDS[grid]
  for target_sigma_rel in targets:
    for target_step in target_steps:
      got = posthoc.coefficients(steps, sigma_rels, target_sigma_rel,
                                 target_step)
      out = max(steps) if target_step is None else target_step
      want = ref.solve_posthoc_coefficients(steps, sigma_rels, out,
                                            target_sigma_rel)
      assert got.dtype == np.float64 and got.shape == (len(steps),)
      # Weights below ~1e-13 are round-off in both (the largest is ~1).
      np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-13)
      assert got.sum() == pytest.approx(1.0, abs=1e-12)
      np.testing.assert_array_equal(got[np.asarray(steps) > out], 0.0)


def test_reference_exponent_is_emax_exponent():
  for sigma_rel in (0.01, 0.05, 0.08, 0.1, 0.25):
    gamma = ref.std_to_exp(sigma_rel)
    assert ref.exp_to_std(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    assert emax.sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma,
                                                               rel=1e-12)


def test_a_tracked_width_is_rebuilt_from_its_own_snapshot():
  steps, sigma_rels = EVERY_100
  for k in (1, 10, 23):
    got = posthoc.coefficients(steps, sigma_rels, sigma_rels[k], steps[k])
    np.testing.assert_allclose(got, np.eye(len(steps))[k], rtol=0,
                               atol=1e-9)


def test_coefficients_do_not_depend_on_time_unit_or_order():
  steps, sigma_rels = IRREGULAR
  base = posthoc.coefficients(steps, sigma_rels, 0.13)
  scaled = posthoc.coefficients(np.asarray(steps) * 1000.0, sigma_rels, 0.13)
  np.testing.assert_allclose(scaled, base, rtol=1e-10, atol=1e-14)
  order = np.random.default_rng(0).permutation(len(steps))
  shuffled = posthoc.coefficients(np.asarray(steps)[order],
                                  np.asarray(sigma_rels)[order], 0.13)
  np.testing.assert_allclose(shuffled, base[order], rtol=1e-10, atol=1e-14)


def _one_hot_averages(sigma_rel, t_max, at):
  """emax's average of one-hot params theta_i = e_i, read after each t in at."""
  eye = np.eye(t_max + 1, dtype=np.float32)
  schedule = emax.power_function_decay(sigma_rel=sigma_rel)
  state = emax.init({'theta': jnp.asarray(eye[0])})
  out = {}
  for i in range(1, t_max + 1):
    decay = schedule(state.count)
    if i == 1:
      assert float(decay) == 0.0
    state = emax.update(state, {'theta': jnp.asarray(eye[i])}, decay)
    assert int(state.count) == i
    if i == 1:  # the first update copies theta_1
      np.testing.assert_array_equal(emax.ema_params(state)['theta'], eye[1])
    if i in at:
      out[i] = np.asarray(emax.ema_params(state)['theta'], np.float64)
  return out


@pytest.mark.parametrize('sigma_rel', [0.05, 0.10])
def test_time_convention(sigma_rel):
  """After t steps emax weights theta_i by the integral of p_t over (i-1, i].

  So the snapshot's time in Eq. 151 is t = EmaState.count, the same as EDM2's
  trainer (its beta uses cur_nimg after the batch), not t + 1.
  """
  at = (3, 10, 24)
  averages = _one_hot_averages(sigma_rel, 24, at)
  for t in at:
    got = averages[t][:t + 1]
    np.testing.assert_allclose(got, ref.tracked_weights(sigma_rel, t),
                               rtol=0, atol=2e-6)
    np.testing.assert_allclose(got, ref.profile_integrals(sigma_rel, t, t),
                               rtol=0, atol=2e-6)
    np.testing.assert_array_equal(averages[t][t + 1:], 0.0)
    # The other convention is far off: the test can tell them apart.
    other = ref.profile_integrals(sigma_rel, t, t, offset=1)
    assert np.abs(got - other).max() > 1e-3


@pytest.mark.parametrize('target', [0.08, 0.15])
def test_snapshot_step_is_the_count_end_to_end(target):
  """Labelling snapshots with EmaState.count rebuilds emax's own average best.

  With a snapshot of each width after every step, the profiles are matched
  closely enough that labelling them with count + 1 or count - 1 (as if the
  time were off by one) is many times worse.
  """
  t_max, at = 12, tuple(range(2, 13))
  tracked = {s: _one_hot_averages(s, t_max, at) for s in (0.05, 0.10)}
  want = _one_hot_averages(target, t_max, (t_max,))[t_max]

  def error(shift):
    snapshots = [(t + shift, s, {'theta': tracked[s][t]}) for t in at
                 for s in tracked]
    got = posthoc.reconstruct(snapshots, target)['theta']
    return np.linalg.norm(got - want) / np.linalg.norm(want)

  right, later, earlier = error(0), error(1), error(-1)
  print(f'sigma_rel {target}: relative profile error {right:.1e} with step ='
        f' count, {later:.1e} with count + 1, {earlier:.1e} with count - 1')
  assert right < 0.1 * min(later, earlier)


def _params_sequence(kind, steps, seed):
  """theta_0 .. theta_steps of a train-like run, float32 leaves."""
  rng = np.random.default_rng(seed)
  shapes = {'dense': {'kernel': (16, 8), 'bias': (8,)}, 'scale': ()}
  leaves, treedef = jax.tree.flatten(
      shapes, is_leaf=lambda x: isinstance(x, tuple))
  size = sum(int(np.prod(s)) for s in leaves)
  theta = np.zeros((steps + 1, size))
  theta[0] = rng.normal(size=size)
  optimum = rng.normal(size=size)
  curvature = rng.uniform(0.05, 2.0, size=size)
  for i in range(1, steps + 1):
    noise = rng.normal(size=size)
    if kind == 'random_walk':
      theta[i] = theta[i - 1] + 0.02 * noise
    else:  # noisy gradient descent on a quadratic
      grad = curvature * (theta[i - 1] - optimum) + 0.5 * noise
      theta[i] = theta[i - 1] - 0.01 * grad
  splits = np.cumsum([int(np.prod(s)) for s in leaves])[:-1]
  parts = np.split(theta.astype(np.float32), splits, axis=1)
  return jax.tree.unflatten(
      treedef, [p.reshape((steps + 1,) + s) for p, s in zip(parts, leaves)])


SIGMAS = (0.05, 0.10, 0.08)
SCHEDULES = tuple(emax.power_function_decay(sigma_rel=s) for s in SIGMAS)


@jax.jit
def _train_chunk(states, chunk):
  def step(states, params):
    return tuple(emax.update(state, params, schedule(state.count))
                 for state, schedule in zip(states, SCHEDULES)), None

  return jax.lax.scan(step, states, chunk)[0]


def _global_norm(tree):
  return np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                     for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize('kind', ['random_walk', 'noisy_descent'])
def test_reconstruction_matches_a_tracked_average(kind):
  steps, every = 1200, 100
  sequence = _params_sequence(kind, steps, seed=1)
  states = tuple(emax.init(jax.tree.map(lambda x: x[0], sequence))
                 for _ in SIGMAS)
  snapshots = []
  for start in range(1, steps + 1, every):
    chunk = jax.tree.map(lambda x: x[start:start + every], sequence)
    states = _train_chunk(states, chunk)
    count = int(states[0].count)
    assert count == start + every - 1
    for state, sigma_rel in zip(states[:2], SIGMAS[:2]):
      snapshots.append((count, sigma_rel, emax.ema_params(state)))
  assert len(snapshots) == 24

  got = posthoc.reconstruct(snapshots, 0.08)
  tracked = emax.ema_params(states[2])
  final = jax.tree.map(lambda x: x[-1], sequence)
  error = _global_norm(jax.tree.map(np.subtract, got, tracked))
  distance = _global_norm(jax.tree.map(np.subtract, tracked, final))
  print(f'{kind}: |reconstructed - tracked| / |tracked - final params| ='
        f' {error / distance:.2e}')
  assert error <= 0.01 * distance
  assert jax.tree.map(lambda x: x.dtype, got) == jax.tree.map(
      lambda x: x.dtype, tracked)
  # Not vacuous: the 0.05 and 0.10 averages are each much farther away.
  for snapshot in snapshots[-2:]:
    other = _global_norm(jax.tree.map(np.subtract, snapshot[2], tracked))
    assert other > 20 * error


def _random_tree(rng, value_scale=1.0):
  return {
      'f32': (rng.normal(size=(5, 3)) * value_scale).astype(np.float32),
      'bf16': (rng.normal(size=(7,)) * value_scale).astype(ml_dtypes.bfloat16),
      'f64': rng.normal(size=(2, 2)) * value_scale,
      'nested': [rng.normal(size=()).astype(np.float16), None],
      'count': np.int32(rng.integers(1000)),
  }


def _reference_sum(weights, trees):
  def leaf(*xs):
    if not np.issubdtype(np.asarray(xs[0]).dtype, np.inexact) and (
        np.asarray(xs[0]).dtype != ml_dtypes.bfloat16):
      return None
    return sum(w * np.asarray(x, np.float64) for w, x in zip(weights, xs))

  return jax.tree.map(leaf, *trees)


def test_reconstruct_sums_in_float64_and_keeps_dtypes():
  rng = np.random.default_rng(2)
  steps, sigma_rels = EVERY_100
  trees = [_random_tree(rng) for _ in steps]
  got = posthoc.reconstruct(zip(steps, sigma_rels, trees), 0.07, 800)
  weights = ref.solve_posthoc_coefficients(steps, sigma_rels, 800, 0.07)
  want = _reference_sum(weights, trees)

  assert jax.tree.structure(got) == jax.tree.structure(trees[0])
  for name, rtol in (('f32', 1e-6), ('f64', 1e-9), ('bf16', 2**-8)):
    assert got[name].dtype == trees[0][name].dtype, name
    np.testing.assert_allclose(np.asarray(got[name], np.float64), want[name],
                               rtol=rtol, atol=1e-7, err_msg=name)
  assert got['nested'][0].dtype == np.float16
  np.testing.assert_allclose(float(got['nested'][0]), want['nested'][0],
                             rtol=2**-11)
  assert got['nested'][1] is None
  # Non-float leaves: from the latest snapshot used (step 800, first one).
  assert got['count'] == trees[14]['count']


def test_jax_array_leaves_come_back_with_their_sharding():
  mesh = jax.make_mesh((8,), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      'data'))
  rng = np.random.default_rng(3)
  steps, sigma_rels = EVERY_100
  values = [rng.normal(size=(16, 4)).astype(np.float32) for _ in steps]
  snapshots = [(s, r, {'w': jax.device_put(v.astype(jnp.bfloat16), sharding)})
               for s, r, v in zip(steps, sigma_rels, values)]
  got = posthoc.reconstruct(snapshots, 0.09)['w']
  assert isinstance(got, jax.Array) and got.dtype == jnp.bfloat16
  assert got.sharding == sharding
  weights = ref.solve_posthoc_coefficients(steps, sigma_rels, 1200, 0.09)
  want = _reference_sum(weights, [{'w': s[2]['w']} for s in snapshots])['w']
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2**-8,
                             atol=1e-6)


def test_generator_input_equals_list_input():
  rng = np.random.default_rng(4)
  steps, sigma_rels = IRREGULAR
  trees = [_random_tree(rng) for _ in steps]
  from_list = posthoc.reconstruct(list(zip(steps, sigma_rels, trees)), 0.12)
  from_generator = posthoc.reconstruct(
      ((s, r, t) for s, r, t in zip(steps, sigma_rels, trees)), 0.12)
  jax.tree.map(np.testing.assert_array_equal, from_generator, from_list)


class _Loaders:
  """Loaders that record, at each load, how many earlier snapshots live."""

  def __init__(self, steps, make_array, keep=False):
    self.steps = steps
    self.make_array = make_array
    self.refs = []  # per loaded snapshot: weak references to its leaves
    self.calls = []
    self.alive_at_load = []
    self.kept = [] if keep else None

  def alive(self):
    return sum(any(r() is not None for r in refs) for refs in self.refs)

  def loader(self, k):
    def load():
      self.alive_at_load.append(self.alive())
      self.calls.append(k)
      rng = np.random.default_rng(k)
      tree = {'a': self.make_array(rng.normal(size=(64, 32))),
              'b': [self.make_array(rng.normal(size=(32,)))]}
      self.refs.append([weakref.ref(x) for x in jax.tree.leaves(tree)])
      if self.kept is not None:
        self.kept.append(tree)
      return tree

    return load


MAKERS = {
    'numpy': lambda x: x.astype(np.float32),
    'jax': lambda x: jnp.asarray(x, jnp.float32),
}


@pytest.mark.parametrize('kind', MAKERS)
def test_loaders_keep_at_most_one_snapshot_alive(kind):
  steps, sigma_rels = EVERY_100
  loaders = _Loaders(steps, MAKERS[kind])
  snapshots = ((s, r, loaders.loader(k))
               for k, (s, r) in enumerate(zip(steps, sigma_rels)))
  got = posthoc.reconstruct(snapshots, 0.08, target_step=1000)

  used = [k for k, s in enumerate(steps) if s <= 1000]
  assert loaders.calls == used  # each once, later snapshots never loaded
  assert loaders.alive_at_load == [0] * len(used)
  assert loaders.alive() == 0  # the result holds none of the loaded arrays

  weights = ref.solve_posthoc_coefficients(steps, sigma_rels, 1000, 0.08)
  trees = [loaders.loader(k)() for k in used]
  want = _reference_sum(weights[used], trees)
  np.testing.assert_allclose(got['a'], want['a'], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got['b'][0], want['b'][0], rtol=1e-6, atol=1e-7)


def test_the_liveness_probe_sees_kept_snapshots():
  steps, sigma_rels = EVERY_100
  loaders = _Loaders(steps, MAKERS['numpy'], keep=True)
  posthoc.reconstruct([(s, r, loaders.loader(k))
                       for k, (s, r) in enumerate(zip(steps, sigma_rels))],
                      0.08)
  assert loaders.alive_at_load == list(range(len(steps)))



W = {'w': np.zeros(3, np.float32)}
BAD_COEFFICIENTS = [
    (([100, 200], [0.05], 0.1), {}, r'steps has 2 entries but sigma_rels'
     r' has 1; give one step and one sigma_rel per snapshot'),
    (([], [], 0.1), {}, r'No snapshots'),
    (([100, 0], [0.05, 0.1], 0.1), {}, r'steps\[1\] is 0, expected a step >'
     r' 0.*EmaState.count'),
    (([-5], [0.1], 0.1), {}, r'steps\[0\] is -5, expected a step > 0'),
    (([100, np.nan], [0.05, 0.1], 0.1), {}, r'steps\[1\] is nan; every entry'
     r' must be a finite number'),
    (('abc', [0.1], 0.1), {}, r'steps must be a 1-D sequence of real'
     r' numbers, got .abc.'),
    (([True], [0.1], 0.1), {}, r'steps must be a 1-D sequence of real'),
    (([[100]], [0.1], 0.1), {}, r'steps must be 1-D, one entry per snapshot,'
     r' got an array of shape \(1, 1\)'),
    (([100, [200]], [0.1, 0.1], 0.1), {}, r'steps must be a 1-D sequence'),
    (([100], [0.3], 0.1), {}, r'sigma_rels\[0\] must be in \(0, 0.2887\).*'
     r' got 0.3\. Typical values'),
    (([100, 200], [0.05, 0.0], 0.1), {}, r'sigma_rels\[1\] must be in'),
    (([100], [0.1], 0.29), {}, r'target_sigma_rel must be in \(0, 0.2887\)'
     r'.* got 0.29'),
    (([100], [0.1], -0.1), {}, r'target_sigma_rel must be in'),
    (([100], [0.1], np.nan), {}, r'target_sigma_rel must be finite'),
    (([100], [0.1], '0.1'), {}, r'target_sigma_rel must be a real number,'
     r" got '0.1'"),
    (([100], [0.1], [0.1]), {}, r'target_sigma_rel must be a real number'),
    (([100, 200], [0.1, 0.1], 0.1), {'target_step': 300},
     r'target_step 300 is past the last snapshot \(step 200\).*target_step='
     r'None'),
    (([100, 200], [0.1, 0.1], 0.1), {'target_step': 150},
     r'target_step 150 is not the step of any snapshot; the nearest earlier'
     r' one is 100.*Pass one of the snapshot steps'),
    (([100, 200], [0.1, 0.1], 0.1), {'target_step': 50},
     r'target_step 50 is not the step of any snapshot\. '),
    (([100, 200], [0.1, 0.1], 0.1), {'target_step': 0},
     r'target_step 0 is not the step of any snapshot'),
    (([100, 200], [0.1, 0.1], 0.1), {'target_step': True},
     r'target_step must be a real number, got True'),
    (([100, 100, 200], [0.1, 0.1, 0.05], 0.1), {},
     r'Snapshots 0 and 1 both have step 100 and sigma_rel 0.1.*Drop one'),
]


@pytest.mark.parametrize('args,kwargs,match', BAD_COEFFICIENTS)
def test_coefficients_reject_bad_inputs(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    posthoc.coefficients(*args, **kwargs)


def test_duplicates_after_the_target_step_are_ignored():
  got = posthoc.coefficients([100, 200, 200], [0.1, 0.1, 0.1], 0.05, 100)
  np.testing.assert_array_equal(got, [1.0, 0.0, 0.0])


def test_several_targets_use_the_union_and_date_by_the_first_latest():
  steps = np.array([200., 100., 200., 300.])
  sigma_rels = np.array([0.05, 0.1, 0.1, 0.1])
  solved = _posthoc_solve.solve_targets(steps, sigma_rels, [0.08, 0.12], 200,
                                        ('steps', 'sigma_rels'))
  assert solved.used == [0, 1, 2]  # the one after step 200 is not read
  assert solved.latest == 0  # step 200, and given before snapshot 2
  for weights, target in zip(solved.weights, (0.08, 0.12)):
    np.testing.assert_array_equal(
        weights, posthoc.coefficients(steps, sigma_rels, target, 200))
  # reconstruct takes the counters of that snapshot.
  snapshots = [(s, w, {'w': np.float32(k), 'n': np.int32(k)})
               for k, (s, w) in enumerate(zip(steps, sigma_rels))]
  assert posthoc.reconstruct(snapshots, 0.08, 200)['n'] == 0


BAD_SNAPSHOTS = [
    (5, r'snapshots must be an iterable of \(step, sigma_rel,'
     r' tree_or_loader\) tuples, got int'),
    ('abc', r'snapshots must be an iterable'),
    ([(100, 0.1)], r'Snapshot 0 must be a \(step, sigma_rel, tree_or_loader\)'
     r' tuple, got tuple of length 2'),
    ([(100, 0.1, W), W], r'Snapshot 1 must be a .* got dict'),
    ([('x', 0.1, W)], r'the step of snapshot 0 must be a real number, got'
     r" 'x'"),
    ([(100, None, W)], r'the sigma_rel of snapshot 0 must be a real number'),
    ([(100, 0.1, W), (200, 0.5, W)], r'snapshot sigma_rels\[1\] must be in'),
    ([(0, 0.1, W)], r'snapshot steps\[0\] is 0, expected a step > 0'),
    ([(100, 0.1, lambda: None)], r'The loader of snapshot 0 \(step 100,'
     r' sigma_rel 0.1\) returned None'),
    ([(100, 0.1, W), (100, 0.05, {'v': W['w']})], r'snapshot 1 \(step 100,'
     r' sigma_rel 0.05\) has a different tree structure'),
    ([(100, 0.1, W), (100, 0.05, {'w': np.zeros(4, np.float32)})],
     r"snapshot 1 .*: leaf \['w'\] has shape \(4,\) and dtype float32, but"
     r' shape \(3,\) and dtype float32 in the first snapshot'),
    ([(100, 0.1, W), (100, 0.05, {'w': np.zeros(3, np.float16)})],
     r"leaf \['w'\] has shape \(3,\) and dtype float16.*cast them alike"),
]


@pytest.mark.parametrize('snapshots,match', BAD_SNAPSHOTS)
def test_reconstruct_rejects_bad_inputs(snapshots, match):
  with pytest.raises(ValueError, match=match):
    posthoc.reconstruct(snapshots, 0.08)


def test_public_names():
  assert posthoc.__all__ == ('coefficients', 'from_checkpoints', 'from_files',
                             'load_safetensors', 'reconstruct',
                             'save_safetensors')
  for name in posthoc.__all__:
    assert getattr(posthoc, name).__doc__


# --- from_checkpoints: snapshots that training saved with Orbax -------------

DECAYS = {'s05': emax.power_function_decay(sigma_rel=0.05),
          's10': emax.power_function_decay(sigma_rel=0.10)}
WIDTHS = tuple(d.sigma_rel for d in DECAYS.values())  # as recorded


def _small_params(dtype=jnp.float32):
  return {'a': jnp.zeros((16, 8), dtype), 'b': [jnp.zeros(5, jnp.float32)],
          'n': jnp.zeros((), jnp.int32)}


@functools.cache
def _tx(decays, options):
  """The optimizer for ``dict(decays)``, built once (its step compiles once)."""
  return emax.with_ema(optax.identity(), dict(decays), **dict(options))


@functools.cache
def _step_fn(tx):
  @jax.jit
  def step(params, opt_state, key):
    def noise(p, k):
      if not jnp.issubdtype(p.dtype, jnp.floating):
        return jnp.ones_like(p)  # an int param: follows the params
      return (0.1 * jax.random.normal(k, p.shape) + 0.02).astype(p.dtype)

    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    updates = treedef.unflatten([noise(p, k) for p, k in zip(leaves, keys)])
    updates, opt_state = tx.update(updates, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def _train_and_save(directory, *, steps=120, every=20, decays=DECAYS,
                    record=DECAYS, params=None, options=(), plain=False,
                    save_at=()):
  """Trains with named averages and saves every ``every`` steps.

  Returns the final state and the snapshots as emax reads them in memory:
  ``(count, sigma_rel, emax.ema_params(opt_state, name, dtypes='accumulator'))`` for every
  saved step and every name of ``record``, in that order.
  """
  params = _small_params() if params is None else params
  tx = _tx(tuple(decays.items()), tuple(dict(options).items()))
  opt_state = tx.init(params)
  step = _step_fn(tx)
  snapshots = []
  with ocp.CheckpointManager(directory) as manager:
    for t in range(steps + 1):
      if t:
        params, opt_state = step(params, opt_state, jax.random.key(t))
      if (t and t % every == 0) or t in save_at:
        state = {'params': params, 'opt_state': opt_state}
        if plain:
          manager.save(t, args=ocp.args.StandardSave(state))
        else:
          emax.checkpoint.save(manager, t, state, sigma_rels=record)
        count = int(emax.get_ema_state(opt_state).count)
        assert count == t
        for name in (record or ()):
          if t:
            snapshots.append((count, record[name].sigma_rel, jax.tree.map(
                np.asarray, emax.ema_params(opt_state, name,
                                            dtypes='accumulator',
                                            params=params))))
  return tx, params, opt_state, snapshots


def _assert_same(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert isinstance(g, np.ndarray) and g.dtype == np.asarray(w).dtype
    np.testing.assert_array_equal(g, np.asarray(w))


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
  directory = tmp_path_factory.mktemp('run')
  return (directory,) + _train_and_save(directory)


def test_from_checkpoints_equals_reconstruct_of_the_same_snapshots(saved_run):
  directory, _, params, _, snapshots = saved_run
  assert len(snapshots) == 12  # 6 checkpoints x 2 averages
  got = posthoc.from_checkpoints(directory, 0.08)
  # The same weights, the same float64 sums in the same order: to the bit.
  want = posthoc.reconstruct(snapshots, 0.08)
  _assert_same(got, want)
  # Orbax stored the params' list as a list, and the int leaf follows the
  # params (the target checkpoint's).
  assert isinstance(got['b'], list) and int(got['n']) == int(params['n'])
  # Several targets in one pass: the same as one at a time.
  several = posthoc.from_checkpoints(directory, [0.03, 0.08, 0.2])
  assert isinstance(several, list) and len(several) == 3
  _assert_same(several[1], got)
  _assert_same(several[2], posthoc.reconstruct(snapshots, 0.2))
  # An earlier target step: only the snapshots up to it.
  early = posthoc.from_checkpoints(directory, 0.08, target_step=60)
  _assert_same(early, posthoc.reconstruct(
      [s for s in snapshots if s[0] <= 60], 0.08))


def test_from_checkpoints_reads_one_average_at_a_time(tmp_path, monkeypatch):
  leaves, size = 8, 64 * 1024  # 8 leaves of 256 KiB: 2 MiB of params
  params = {f'w{i}': jnp.zeros(size, jnp.float32) for i in range(leaves)}
  _train_and_save(tmp_path, steps=4, every=1, params=params)
  average_bytes = 2 * leaves * size * 4  # two averages per checkpoint

  alive_at_read, read_leaves, refs, targets = [], [], [], []
  real_restore = ocp.Checkpointer.restore

  def counting_restore(self, directory, *args, **kwargs):
    alive_at_read.append(sum(r() is not None for r in refs))
    targets.append(directory.parent.name)
    out = real_restore(self, directory, *args, **kwargs)
    arrays = [x for x in jax.tree.leaves(out) if isinstance(x, np.ndarray)]
    read_leaves.append(len(arrays))
    refs.extend(weakref.ref(x) for x in arrays if x.size > 1)
    return out

  monkeypatch.setattr(ocp.Checkpointer, 'restore', counting_restore)
  monkeypatch.setattr(_checkpoint_files, 'COLLECT_ABOVE_BYTES', 0)
  tracemalloc.start()
  try:
    got = posthoc.from_checkpoints(tmp_path, 0.08)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # First the counts (one scalar per checkpoint), then each checkpoint's
  # average alone: its leaves and the four scalars, never the params.
  assert read_leaves == [1] * 4 + [leaves + 4] * 4
  assert targets == [str(s) for s in range(1, 5)] * 2
  # At each read no array of an earlier checkpoint is alive.
  assert alive_at_read == [0] * 8
  # What from_checkpoints allocates (NumPy, seen by tracemalloc): the float64
  # sum (8 bytes per param), one checkpoint's two averages and one leaf's
  # temporaries; all four checkpoints would be 4 * average_bytes.
  sum_bytes = leaves * size * 8
  print(f'peak {peak / 2**20:.1f} MiB; sum {sum_bytes / 2**20:.0f} MiB, one'
        f' checkpoint\'s averages {average_bytes / 2**20:.0f} MiB')
  assert peak < sum_bytes + average_bytes + 4 * size * 8 + (1 << 20)
  assert set(got) == set(params)


def test_from_checkpoints_matches_a_tracked_average(tmp_path):
  """EDM2's check, through Orbax: snapshots of 0.05 and 0.10 every 100 steps
  over 1,200 steps rebuild a directly tracked 0.08 average to within 1% of
  its distance to the final params. The 0.08 average is saved too, but has
  no recorded width, so it is no snapshot."""
  decays = dict(DECAYS, s08=emax.power_function_decay(sigma_rel=0.08))
  _, params, opt_state, _ = _train_and_save(
      tmp_path, steps=1200, every=100, decays=decays, record=DECAYS)
  got = posthoc.from_checkpoints(tmp_path, 0.08)
  tracked = emax.ema_params(opt_state, 's08')
  error = _global_norm(jax.tree.map(np.subtract, got, tracked))
  distance = _global_norm(jax.tree.map(np.subtract, tracked, params))
  print(f'|rebuilt - tracked| / |tracked - final params| ='
        f' {error / distance:.2e}')
  assert error <= 0.01 * distance
  for name in ('s05', 's10'):  # not vacuous: the snapshots are far
    other = emax.ema_params(opt_state, name)
    assert _global_norm(jax.tree.map(np.subtract, other, tracked)) > (
        20 * error)


def test_from_checkpoints_of_bf16_params_and_unrecorded_widths(tmp_path):
  params = _small_params(jnp.bfloat16)
  _, _, _, snapshots = _train_and_save(tmp_path / 'recorded', steps=60,
                                       params=params)
  got = posthoc.from_checkpoints(tmp_path / 'recorded', 0.08)
  assert got['a'].dtype == jnp.bfloat16 and got['b'][0].dtype == np.float32
  # Summed from the float32 accumulators, rounded once to bf16.
  want = posthoc.reconstruct(snapshots, 0.08)  # float32 snapshots
  np.testing.assert_array_equal(got['b'][0], want['b'][0])
  exact = np.asarray(want['a'], np.float64)
  ulp = np.spacing(np.abs(got['a'])).astype(np.float64)
  assert np.all(np.abs(got['a'].astype(np.float64) - exact) <= ulp / 2 + (
      1e-6 * np.abs(exact)))

  # Saved by plain Orbax: no record, so the widths must be given.
  _train_and_save(tmp_path / 'plain', steps=60, params=params, plain=True)
  with pytest.raises(ValueError, match=r'no sigma_rel is recorded for the 2'
                     r" averages at \['opt_state', 'ema_state'\].*"
                     r'sigma_rels=decays'):
    posthoc.from_checkpoints(tmp_path / 'plain', 0.08)
  with pytest.raises(ValueError, match='sigma_rels gives widths by name, but'
                     ' the names of the 2 averages .* were not saved'):
    posthoc.from_checkpoints(tmp_path / 'plain', 0.08, sigma_rels=DECAYS)
  plain = posthoc.from_checkpoints(tmp_path / 'plain', 0.08,
                                   sigma_rels=list(DECAYS.values()))
  assert plain['a'].dtype == np.float32  # the stored dtype: no record
  np.testing.assert_array_equal(plain['a'], want['a'])
  typed = posthoc.from_checkpoints(tmp_path / 'plain', 0.08,
                                   sigma_rels=list(DECAYS.values()),
                                   like=params)
  _assert_same(typed, got)
  # Leaving one average out: the 0.10 average alone rebuilds only itself.
  alone = posthoc.from_checkpoints(tmp_path / 'plain', 0.10,
                                   sigma_rels=[None, WIDTHS[1]])
  np.testing.assert_array_equal(alone['a'], snapshots[-1][2]['a'])


def test_from_checkpoints_of_packed_averages_needs_like(tmp_path):
  tx, params, _, snapshots = _train_and_save(tmp_path,
                                             options={'pack': True})
  with pytest.raises(ValueError, match=r'was stored packed \(pack=True\).*'
                     'Pass like= the abstract state'):
    posthoc.from_checkpoints(tmp_path, 0.08)
  got = posthoc.from_checkpoints(tmp_path, 0.08,
                                 like=jax.eval_shape(tx.init, params))
  _assert_same(got, posthoc.reconstruct(snapshots, 0.08))
  assert isinstance(got['b'], list)  # like's tree types


def test_from_checkpoints_with_like_returns_the_params_dtypes(tmp_path):
  """pack=True bf16 params: rounded once from float64 to bf16, as they were."""
  params = _small_params(jnp.bfloat16)
  tx, _, _, snapshots = _train_and_save(tmp_path, steps=60, params=params,
                                        options={'pack': True})
  got = posthoc.from_checkpoints(tmp_path, 0.08,
                                 like=jax.eval_shape(tx.init, params))
  want = posthoc.reconstruct(snapshots, 0.08)  # float32 snapshots
  assert want['a'].dtype == np.float32
  assert got['a'].dtype == jnp.bfloat16 and got['b'][0].dtype == np.float32
  np.testing.assert_array_equal(got['a'],
                                want['a'].astype(ml_dtypes.bfloat16))
  # The same float64 sum, rounded to bf16 once (not via float32): compare
  # with the float64 reference sum of the same snapshots.
  weights = ref.solve_posthoc_coefficients(
      [s[0] for s in snapshots], [s[1] for s in snapshots], 60, 0.08)
  exact = sum(w * np.asarray(s[2]['a'], np.float64)
              for w, s in zip(weights, snapshots))
  np.testing.assert_array_equal(got['a'], exact.astype(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(got['b'][0], want['b'][0])


def test_from_checkpoints_skips_unaveraged_checkpoints_and_shows_progress(
    tmp_path):
  _, _, _, snapshots = _train_and_save(tmp_path, steps=60, save_at=(0,))
  seen = []

  def progress(steps):
    seen.append(list(steps))
    return steps

  got = posthoc.from_checkpoints(tmp_path, 0.08, progress=progress)
  assert seen == [[20, 40, 60]]  # step 0 (count 0) holds no snapshot
  _assert_same(got, posthoc.reconstruct(snapshots, 0.08))


def test_from_checkpoints_rejects_bad_input_clearly(saved_run, tmp_path):
  directory = saved_run[0]
  cases = [
      ({'target_step': 70}, FileNotFoundError,
       r'No checkpoint for target_step 70 in .*; the saved steps are'
       r' \[20, 40, 60, 80, 100, 120\]'),
      ({'target_step': 60.0}, TypeError, 'target_step must be an int'),
      ({'sigma_rels': {'s07': 0.07}}, ValueError,
       r"sigma_rels names \['s07'\]; the 2 averages at \['opt_state',"
       r" 'ema_state'\] are named \['s05', 's10'\]"),
      ({'sigma_rels': [0.05]}, ValueError,
       r'sigma_rels has 1 entries for the 2 averages'),
      ({'sigma_rels': 0.05}, ValueError, r'one sigma_rel for the 2 averages'),
      ({'sigma_rels': [None, None]}, ValueError,
       'sigma_rels gives no average a width'),
      ({'sigma_rels': [0.05, emax.tf_decay(0.9)]}, TypeError,
       r'has no sigma_rel; only emax.power_function_decay'),
      ({'path': ('params',)}, ValueError,
       r"no average at path \['params'\]; the averages are at"
       r" \[\['opt_state', 'ema_state'\]\]"),
  ]
  for kwargs, error, message in cases:
    with pytest.raises(error, match=message):
      posthoc.from_checkpoints(directory, 0.08, **kwargs)
  for target, message in ((0.3, r'target_sigma_rel must be in'),
                          ([0.1, 0.5], r'target_sigma_rel\[1\] must be in'),
                          ([], 'target_sigma_rel is empty')):
    with pytest.raises(ValueError, match=message):
      posthoc.from_checkpoints(directory, target)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    posthoc.from_checkpoints(tmp_path / 'nowhere', 0.08)

  # Checkpoints of two runs in one directory: the same count twice.
  shutil.copytree(directory, tmp_path / 'two', dirs_exist_ok=True)
  shutil.copytree(directory / '20', tmp_path / 'two' / '130')
  with pytest.raises(ValueError, match=r'Checkpoints 20 and 130 both hold'
                     r' averages after 20 steps'):
    posthoc.from_checkpoints(tmp_path / 'two', 0.08)


def test_from_checkpoints_with_two_averages_in_the_state(tmp_path):
  params = {'w': jnp.arange(4.0)}
  tx = emax.with_ema(optax.identity(), DECAYS)
  opt_state = tx.init(params)
  other = emax.init(params, names=('s05', 's10'))
  update = jax.jit(tx.update)
  update_other = jax.jit(lambda s, p: emax.update(
      s, p, {n: d(s.count) for n, d in DECAYS.items()}))
  with ocp.CheckpointManager(tmp_path) as manager:
    for t in (1, 2):
      _, opt_state = update({'w': jnp.full(4, float(t))}, opt_state, params)
      other = update_other(other, {'w': jnp.full(4, -1.0)})
      emax.checkpoint.save(manager, t, {'opt_state': opt_state,
                                        'extra': other}, sigma_rels=DECAYS)
  with pytest.raises(ValueError, match=r"found 2 averages, at \[\['extra'\],"
                     r" \['opt_state', 'ema_state'\]\]; pass path="):
    posthoc.from_checkpoints(tmp_path, 0.08)
  got = posthoc.from_checkpoints(tmp_path, 0.08, path=['extra'])
  np.testing.assert_allclose(got['w'], -1.0, rtol=1e-6)


def test_from_checkpoints_reads_only_what_orbax_calls_a_checkpoint(
    saved_run, tmp_path, monkeypatch):
  directory = tmp_path / 'run'
  shutil.copytree(saved_run[0], directory)
  want = posthoc.from_checkpoints(saved_run[0], 0.08)
  # A folder that is no checkpoint beside them: CheckpointManager ignores it.
  (directory / 'samples_1000').mkdir()
  assert 1000 not in ocp.CheckpointManager(directory).all_steps()
  _assert_same(posthoc.from_checkpoints(directory, 0.08), want)
  _assert_same(emax.checkpoint.average(directory, path=('params', 'a')),
               emax.checkpoint.average(saved_run[0], path=('params', 'a')))
  # A relative path works as the absolute one.
  monkeypatch.chdir(tmp_path)
  _assert_same(posthoc.from_checkpoints('run', 0.08), want)
  _assert_same(emax.checkpoint.average('run', path=('params', 'a')),
               emax.checkpoint.average(saved_run[0], path=('params', 'a')))


def test_an_incomplete_checkpoint_is_named(saved_run, tmp_path):
  directory = tmp_path / 'run'
  shutil.copytree(saved_run[0], directory)
  (directory / '140').mkdir()  # empty: Orbax lists it as step 140
  for read in (lambda: posthoc.from_checkpoints(directory, 0.08),
               lambda: emax.checkpoint.average(directory, path=('params', 'a'))):
    with pytest.raises(FileNotFoundError, match=(
        r'Checkpoint step 140 \(.*140\) is incomplete: it holds no saved'
        r' item, only \[\]')):
      read()
  shutil.rmtree(directory / '140')
  # A truncated _METADATA names its step and path, not a bare JSON error.
  metadata = directory / '60' / 'default' / '_METADATA'
  metadata.write_text(metadata.read_text()[:100])
  for read in (lambda: posthoc.from_checkpoints(directory, 0.08),
               lambda: emax.checkpoint.average(directory, path=('params', 'a'))):
    with pytest.raises(FileNotFoundError, match=(
        r'Checkpoint step 60 \(.*60/default\) is incomplete: its _METADATA,'
        r' or the metadata of its arrays, is missing or cannot be read'
        r' \(JSONDecodeError')):
      read()
  # So does a truncated step metadata (where save records the widths).
  shutil.rmtree(directory)
  shutil.copytree(saved_run[0], directory)
  step_metadata = directory / '40' / '_CHECKPOINT_METADATA'
  step_metadata.write_text(step_metadata.read_text()[:50])
  with pytest.raises(FileNotFoundError, match=(
      r'Checkpoint step 40 \(.*40\) is incomplete: its _CHECKPOINT_METADATA'
      ' cannot be read')):
    posthoc.from_checkpoints(directory, 0.08)


def test_result_leaves_drop_the_axis_of_several_averages(saved_run):
  _, found = _checkpoint_files.finished_steps(saved_run[0], 'test')
  with _checkpoint_files.Reader() as reader:
    c = _posthoc_checkpoints.Checkpoint(
        reader, 20, found[20], item=None, path=None, like=None,
        sigma_rels=None, sigma_rels_arg='sigma_rels=')
  stored = {p: shape for p, shape, _ in c.leaves}
  # Two named averages: float leaves are stored stacked, the int one not.
  assert [(leaf.path, stored[leaf.stored], leaf.shape, leaf.stacked)
          for leaf in c.result_leaves()] == [
              (('a',), (2, 16, 8), (16, 8), True),
              (('b', 0), (2, 5), (5,), True),
              (('n',), (), (), False)]


def test_from_checkpoints_refuses_a_folder_with_snapshot_files_too(
    saved_run, tmp_path):
  shutil.copytree(saved_run[0], tmp_path / 'run')
  posthoc.save_safetensors({'w': np.zeros(2, np.float32)},
                           tmp_path / 'run' / 'ema-0000100-0.050.safetensors')
  with pytest.raises(ValueError, match=r'emax.posthoc.from_checkpoints: .*'
                     r' holds both Orbax checkpoint steps \(20, 40, 60, 80,'
                     r' 100 and 1 more\) and safetensors files \(ema-0000100'):
    posthoc.from_checkpoints(tmp_path / 'run', 0.08)


def test_from_checkpoints_takes_a_0d_array_as_one_target(saved_run):
  directory = saved_run[0]
  _assert_same(posthoc.from_checkpoints(directory, np.asarray(0.08)),
               posthoc.from_checkpoints(directory, 0.08))
  several = posthoc.from_checkpoints(directory, np.asarray([0.08, 0.1]))
  assert isinstance(several, list) and len(several) == 2


# --- the command line ----------------------------------------------------------


def test_cli_takes_relative_paths_and_writes_readable_checkpoints(
    saved_run, tmp_path, monkeypatch, capsys, caplog):
  shutil.copytree(saved_run[0], tmp_path / 'run')
  monkeypatch.chdir(tmp_path)
  code, out, err = run_cli(capsys, 'run', '--sigma-rel', 0.08, '--out',
                           'rebuilt')
  assert code == 0, err
  # The folder names the width as the safetensors outputs do (EDM2's 0.080).
  assert 'sigma_rel 0.08: wrote rebuilt/sigma_rel_0.080/120' in out
  # The documented way to read it back: absolute path, StandardRestore(),
  # and Orbax logs nothing about items it could not restore.
  with caplog.at_level('INFO'):
    with ocp.CheckpointManager(
        os.path.abspath('rebuilt/sigma_rel_0.080')) as manager:
      restored = manager.restore(120, args=ocp.args.StandardRestore())
  assert 'could not be restored' not in caplog.text
  _assert_same(jax.tree.map(np.asarray, restored),
               posthoc.from_checkpoints(saved_run[0], 0.08))


def test_cli_gives_distinct_widths_distinct_folders(saved_run, tmp_path,
                                                    capsys):
  code, out, err = run_cli(capsys, saved_run[0], '--sigma-rel', 0.1, 0.1000001,
                           '--out', tmp_path)
  assert code == 0, err
  for width, text in (('0.1', '0.100'), ('0.1000001', '0.1000001')):
    assert f'sigma_rel {width}: wrote {tmp_path}/sigma_rel_{text}/120' in out
    with ocp.CheckpointManager(tmp_path / f'sigma_rel_{text}') as manager:
      assert manager.metadata(120).custom_metadata['posthoc'][
          'sigma_rel'] == float(width)
  code, _, err = run_cli(capsys, saved_run[0], '--sigma-rel', 0.1, 0.1,
                         '--out', tmp_path / 'again')
  assert code == 2 and '--sigma-rel lists [0.1] more than once' in err


def test_cli_errors_name_the_flag(tmp_path, capsys):
  params = _small_params()
  _train_and_save(tmp_path / 'plain', steps=40, params=params, plain=True)
  code, _, err = run_cli(capsys, tmp_path / 'plain', '--sigma-rel', 0.08,
                         '--out', tmp_path / 'out', '--tracked', 's05=abc')
  assert code == 2 and "--tracked takes numbers, got 'abc'" in err
  # Plain Orbax saves record neither widths nor names.
  code, _, err = run_cli(capsys, tmp_path / 'plain', '--sigma-rel', 0.08,
                         '--out', tmp_path / 'out')
  assert code == 1
  assert 'or give them here with --tracked one per average' in err
  assert 'with sigma_rels=' not in err
  code, _, err = run_cli(capsys, tmp_path / 'plain', '--sigma-rel', 0.08,
                         '--out', tmp_path / 'out', '--tracked', 's05=0.05',
                         's10=0.10')
  assert code == 1
  assert ('--tracked gives widths by name, but the names of the 2 averages'
          in err)
  code, _, err = run_cli(capsys, tmp_path / 'plain', '--sigma-rel', 0.08,
                         '--out', tmp_path / 'out', '--tracked', 0.05, 0.10)
  assert code == 0, err


def test_from_checkpoints_of_a_masked_run(tmp_path):
  """An average of part of the params (mask=): the post-hoc average covers
  the leaves inside the mask, as reconstruct of the same snapshots does;
  the leaves outside it come back as None (nothing was averaged there)."""
  def mask(params):  # (a callable: the cached optimizer hashes its options)
    return {'a': True, 'b': [True], 'n': False}

  _, _, _, snapshots = _train_and_save(tmp_path, steps=60, every=20,
                                       options=(('mask', mask),))
  got = posthoc.from_checkpoints(tmp_path, 0.08)
  want = posthoc.reconstruct(snapshots, 0.08)
  _assert_same({k: got[k] for k in ('a', 'b')},
               {k: want[k] for k in ('a', 'b')})
  assert got['n'] is None
