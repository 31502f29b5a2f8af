"""Averages of sharded checkpoints, read and summed shard by shard.

On a 2 x 4 mesh of this process's 8 CPU devices (tests/conftest.py):
``emax.checkpoint.average``, ``emax.posthoc.from_checkpoints`` and
``emax.posthoc.reconstruct`` with ``sharding=`` against float64 NumPy sums of
the saved arrays (and the EDM2 reference, tests/reference_posthoc.py), the
result's shardings, the bytes each device holds while summing, an Orbax save
of the sharded result restored onto two meshes, and the reconstruction run by
two ``jax.distributed`` processes (the launcher of examples/multiprocess.py
starting this file as its workers).

Run as a script (``--process-id ...``), this file is one such worker.
"""

import collections
import gc
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import emax
import emax.checkpoint
import emax.posthoc
from emax import _checkpoint_files
from emax import _streaming_sum

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from helpers import load_example  # noqa: E402
from helpers import worker_args  # noqa: E402
import reference_posthoc  # noqa: E402  pylint: disable=g-import-not-at-top

HERE = pathlib.Path(__file__)
U = 2.0 ** -24  # float32 unit roundoff
SPECS = {'w1': P('data', 'model'), 'w2': P('model', 'data'),
         'b': P('model'), 'e': P(None, 'data')}
SHAPES = {'w1': (64, 128), 'w2': (128, 64), 'b': (128,), 'e': (32, 64)}
DECAYS = {'s05': emax.power_function_decay(sigma_rel=0.05),
          's10': emax.power_function_decay(sigma_rel=0.10)}


def _mesh(shape=(2, 4)):
  return jax.make_mesh(shape, ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _shardings(mesh):
  return {k: NamedSharding(mesh, s) for k, s in SPECS.items()}


def _shard_set_bytes(mesh):
  """The bytes of one float32 tree's shards on one device (the most on any)."""
  return sum(math.prod(NamedSharding(mesh, SPECS[k]).shard_shape(s)) * 4
             for k, s in SHAPES.items())


def _tree_bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _bytes_per_device():
  """Bytes of every live jax.Array, per device that holds a shard of it."""
  out = collections.Counter()
  for a in jax.live_arrays():
    shard = math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
    for d in a.sharding.addressable_devices:
      out[d] += shard
  return out


class _Probe:
  """The most bytes any device held beyond ``baseline``, seen at each read
  (after it returns) and at each add into the running sum (before it)."""

  def __init__(self, monkeypatch):
    self.peak = 0
    self.snapshots = 0
    gc.collect()  # Orbax's reference cycles may hold arrays of earlier reads
    self.baseline = _bytes_per_device()
    real_add, real_read = _streaming_sum.add, _checkpoint_files.Reader.read

    def add(*args, **kwargs):
      self.look()
      return real_add(*args, **kwargs)

    def read(reader, *args, **kwargs):
      out = real_read(reader, *args, **kwargs)
      self.look()
      return out

    monkeypatch.setattr(_streaming_sum, 'add', add)
    monkeypatch.setattr(_checkpoint_files.Reader, 'read', read)

  def look(self):
    now = _bytes_per_device()
    self.snapshots += 1
    self.peak = max([self.peak] + [now[d] - self.baseline[d] for d in now])


# --- emax.checkpoint.average --------------------------------------------------


@pytest.fixture(scope='module')
def soup(tmp_path_factory):
  """Three checkpoints of sharded float32 params; their NumPy copies."""
  directory = tmp_path_factory.mktemp('soup')
  shardings = _shardings(_mesh())
  saved = {}
  rng = np.random.default_rng(0)
  with ocp.CheckpointManager(directory) as manager:
    for step in (10, 20, 30):
      host = {k: rng.standard_normal(s).astype(np.float32) * (1 + step)
              for k, s in SHAPES.items()}
      params = {k: jax.device_put(v, shardings[k]) for k, v in host.items()}
      manager.save(step, args=ocp.args.StandardSave(
          {'params': params, 'step': step}))
      saved[step] = host
  return directory, saved


def test_sharded_average_of_two_is_the_float64_mean_rounded(soup):
  directory, saved = soup
  shardings = _shardings(_mesh())
  got = emax.checkpoint.average(directory, [10, 30], sharding=shardings)
  for k, leaf in got.items():
    assert isinstance(leaf, jax.Array) and leaf.dtype == np.float32
    assert leaf.sharding.is_equivalent_to(shardings[k], leaf.ndim)
    want = ((saved[10][k].astype(np.float64) + saved[30][k]) / 2).astype(
        np.float32)  # the exact mean, rounded once: float32 gives it too
    np.testing.assert_array_equal(np.asarray(leaf), want)


@pytest.mark.parametrize('weights', [None, [1.0, 3.0, 0.5]])
def test_sharded_average_is_within_the_float32_bound(soup, weights):
  directory, saved = soup
  mesh = _mesh()
  # The params themselves (or jax.eval_shape of them) say where to put it.
  like = {k: jax.ShapeDtypeStruct(s, jnp.float32,
                                  sharding=NamedSharding(mesh, SPECS[k]))
          for k, s in SHAPES.items()}
  got = emax.checkpoint.average(directory, weights=weights, sharding=like)
  host = emax.checkpoint.average(directory, weights=weights)
  w = np.ones(3) if weights is None else np.asarray(weights)
  w = w / w.sum()
  for k in SHAPES:
    assert got[k].sharding.is_equivalent_to(like[k].sharding, got[k].ndim)
    terms = [wi * saved[s][k].astype(np.float64)
             for wi, s in zip(w, (10, 20, 30))]
    want = np.sum(terms, axis=0)
    bound = (len(terms) + 3) * U * np.sum(np.abs(terms), axis=0)
    for x in (np.asarray(got[k]), host[k]):
      assert np.all(np.abs(x - want) <= bound)


def test_sharded_average_reads_and_sums_shard_by_shard(soup, monkeypatch):
  directory, _ = soup
  shardings = _shardings(_mesh())
  one_tree = sum(math.prod(s) * 4 for s in SHAPES.values())
  one_shard_set = _shard_set_bytes(_mesh())
  probe = _Probe(monkeypatch)
  got = emax.checkpoint.average(directory, sharding=shardings)
  # 3 reads, 3 x 4 adds: at most the float32 sum and one checkpoint's
  # shards per device; the whole tree is 6 shard sets.
  assert probe.snapshots == 3 + 3 * 4
  print(f'checkpoint.average: peak {probe.peak} bytes per device; one shard'
        f' set {one_shard_set}, the whole tree {one_tree}')
  assert probe.peak <= 2 * one_shard_set
  assert probe.peak >= one_shard_set  # not vacuous: the probe sees them
  assert _tree_bytes(got) == one_tree


def test_a_sharded_result_saves_sharded_and_restores_onto_other_meshes(
    soup, tmp_path):
  directory, saved = soup
  got = emax.checkpoint.average(directory, [10, 30],
                                sharding=_shardings(_mesh()))
  with ocp.CheckpointManager(tmp_path / 'soup') as manager:
    manager.save(0, args=ocp.args.StandardSave(got))  # each device's shards
  for shape in ((2, 4), (4, 2), (1, 1)):
    mesh = _mesh(shape)
    target = {k: jax.ShapeDtypeStruct(SHAPES[k], jnp.float32,
                                      sharding=NamedSharding(mesh, SPECS[k]))
              for k in SHAPES}
    with ocp.CheckpointManager(tmp_path / 'soup') as manager:
      back = manager.restore(0, args=ocp.args.StandardRestore(target))
    for k in SHAPES:
      assert back[k].sharding.is_equivalent_to(target[k].sharding, 2)
      np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(got[k]))


# --- emax.posthoc.from_checkpoints and reconstruct ----------------------------


def _train_and_save(directory, mesh, *, steps=60, every=10, snapshots=True):
  """Trains sharded params with two power-function averages, saving every
  ``every`` steps; returns the snapshots as emax reads them, in NumPy."""
  shardings = _shardings(mesh)
  params = {k: jax.device_put(np.zeros(s, np.float32), shardings[k])
            for k, s in SHAPES.items()}
  tx = emax.with_ema(optax.identity(), DECAYS)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    keys = dict(zip(SHAPES, jax.random.split(key, len(SHAPES))))
    updates = {k: 0.1 * jax.random.normal(keys[k], p.shape) + 0.02
               for k, p in params.items()}
    updates, opt_state = tx.update(updates, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  kept = []
  with ocp.CheckpointManager(directory) as manager:
    for t in range(1, steps + 1):
      params, opt_state = step(params, opt_state, jax.random.key(t))
      if t % every == 0:
        emax.checkpoint.save(manager, t, {'params': params,
                                          'opt_state': opt_state},
                             sigma_rels=DECAYS)
        for name, decay in (DECAYS.items() if snapshots else ()):
          kept.append((t, decay.sigma_rel, jax.tree.map(
              np.asarray, emax.ema_params(opt_state, name,
                                          dtypes='accumulator'))))
  return params, kept


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  directory = tmp_path_factory.mktemp('posthoc')
  params, snapshots = _train_and_save(directory, _mesh())
  return directory, params, snapshots


def _edm2(snapshots, target):
  """EDM2's float64 reconstruction of the snapshots, and its error bound."""
  steps = np.array([s[0] for s in snapshots], np.float64)
  widths = np.array([s[1] for s in snapshots], np.float64)
  w = reference_posthoc.solve_posthoc_coefficients(steps, widths, steps[-1],
                                                   target)
  out, bound = {}, {}
  n = int(np.sum(w != 0))
  for k in SHAPES:
    terms = [wi * s[2][k].astype(np.float64) for wi, s in zip(w, snapshots)]
    out[k] = np.sum(terms, axis=0)
    bound[k] = (n + 3) * U * np.sum(np.abs(terms), axis=0)
  return out, bound


def test_sharded_from_checkpoints_matches_edm2_and_the_host_path(run):
  directory, params, snapshots = run
  got = emax.posthoc.from_checkpoints(directory, [0.08, 0.2], sharding=params)
  host = emax.posthoc.from_checkpoints(directory, [0.08, 0.2])
  for target, g, h in zip((0.08, 0.2), got, host):
    want, bound = _edm2(snapshots, target)
    for k in SHAPES:
      assert g[k].sharding.is_equivalent_to(params[k].sharding, g[k].ndim)
      assert g[k].dtype == np.float32
      assert np.all(np.abs(np.asarray(g[k]) - want[k]) <= bound[k]), k
      # The host path sums in float64: the reference rounded (or one ulp
      # off, where the float64 sum of the snapshots is itself a tie).
      np.testing.assert_allclose(h[k], want[k], rtol=2 * U, atol=0)


def test_sharded_reconstruct_matches_edm2(run):
  _, params, snapshots = run
  shardings = _shardings(_mesh())
  on_device = [(t, s, jax.tree.map(jax.device_put, tree, shardings))
               for t, s, tree in snapshots]
  got = emax.posthoc.reconstruct(on_device, 0.08, sharding=shardings)
  from_numpy = emax.posthoc.reconstruct(snapshots, 0.08, sharding=params)
  want, bound = _edm2(snapshots, 0.08)
  for k in SHAPES:
    for x in (got[k], from_numpy[k]):
      assert x.sharding.is_equivalent_to(shardings[k], x.ndim)
      assert np.all(np.abs(np.asarray(x) - want[k]) <= bound[k])


def test_sharded_sums_are_float64_with_x64(run, monkeypatch):
  directory, _, snapshots = run
  mesh = _mesh()
  dtypes = []
  real_add = _streaming_sum.add

  def add(total, x, weight, dtype):
    dtypes.append(np.dtype(dtype))
    return real_add(total, x, weight, dtype)

  monkeypatch.setattr(_streaming_sum, 'add', add)
  with jax.enable_x64(True):
    got = emax.posthoc.from_checkpoints(directory, 0.08,
                                        sharding=_shardings(mesh))
  assert set(dtypes) == {np.dtype(np.float64)}
  want, _ = _edm2(snapshots, 0.08)
  for k in SHAPES:
    assert got[k].dtype == np.float32
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=4 * U,
                               atol=4 * U * np.abs(want[k]).max())
  dtypes.clear()
  emax.posthoc.from_checkpoints(directory, 0.08, sharding=_shardings(mesh))
  assert set(dtypes) == {np.dtype(np.float32)}


def test_sharded_from_checkpoints_reads_and_sums_shard_by_shard(
    run, monkeypatch):
  directory, params, _ = run
  one_shard_set = _shard_set_bytes(_mesh())
  probe = _Probe(monkeypatch)
  emax.posthoc.from_checkpoints(directory, 0.08, sharding=params)
  # Per device: the float32 sum, the checkpoint's two averages (stacked)
  # and one leaf being added, debiased: 3 shard sets (6 = one whole tree).
  print(f'posthoc.from_checkpoints: peak {probe.peak} bytes per device; one'
        f' shard set {one_shard_set}')
  one_leaf = max(math.prod(NamedSharding(_mesh(), SPECS[k]).shard_shape(s)) * 4
                 for k, s in SHAPES.items())
  assert one_shard_set <= probe.peak <= 3 * one_shard_set + one_leaf


def test_one_average_of_bf16_params_into_one_replicated_sharding(tmp_path):
  mesh = _mesh()
  shardings = _shardings(mesh)
  params = {k: jax.device_put(np.zeros(s, jnp.bfloat16), shardings[k])
            for k, s in SHAPES.items()}
  tx = emax.with_ema(optax.identity(),
                     emax.power_function_decay(sigma_rel=0.10))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    updates = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, opt_state = tx.update(updates, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  with ocp.CheckpointManager(tmp_path) as manager:
    for t in range(1, 31):
      params, opt_state = step(params, opt_state)
      if t % 10 == 0:
        emax.checkpoint.save(manager, t, {'params': params,
                                          'opt_state': opt_state})
  replicated = NamedSharding(mesh, P())
  got = emax.posthoc.from_checkpoints(tmp_path, 0.1, sigma_rels=0.1,
                                      sharding=replicated)
  host = emax.posthoc.from_checkpoints(tmp_path, 0.1, sigma_rels=0.1)
  for k in SHAPES:
    assert got[k].dtype == jnp.bfloat16 == host[k].dtype
    assert got[k].sharding.is_equivalent_to(replicated, got[k].ndim)
    # float32 against float64 sums, each rounded to bf16: one bf16 ulp.
    np.testing.assert_allclose(np.asarray(got[k], np.float32),
                               host[k].astype(np.float32), rtol=2 ** -7)
  with pytest.raises(ValueError, match='like= is a state'):
    emax.posthoc.from_checkpoints(
        tmp_path, 0.1, sigma_rels=0.1, sharding=replicated,
        like=jax.eval_shape(tx.init, params))


def test_sharding_errors_say_what_to_pass(run):
  directory, params, _ = run
  with pytest.raises(ValueError, match='shaped like the reconstructed params'):
    emax.posthoc.from_checkpoints(directory, 0.08, sharding={'w1': None})
  with pytest.raises(TypeError, match='NamedSharding'):
    emax.posthoc.from_checkpoints(
        directory, 0.08, sharding=jax.tree.map(lambda _: 'x', params))



def test_the_params_say_where_a_masked_average_goes(tmp_path):
  """Leaves outside the mask come back None; the params hold arrays there."""
  mesh = _mesh()
  params = {'w': jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, P('data'))),
            'b': jax.device_put(jnp.zeros(4), NamedSharding(mesh, P()))}
  tx = emax.with_ema(optax.identity(), DECAYS, mask={'w': True, 'b': False})
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  with ocp.CheckpointManager(tmp_path) as manager:
    for t in range(1, 4):
      updates, opt_state = update(jax.tree.map(jnp.ones_like, params),
                                  opt_state, params)
      params = optax.apply_updates(params, updates)
      emax.checkpoint.save(manager, t, {'params': params,
                                        'opt_state': opt_state},
                           sigma_rels=DECAYS)
  host = emax.posthoc.from_checkpoints(tmp_path, 0.08)
  got = emax.posthoc.from_checkpoints(tmp_path, 0.08, sharding=params)
  assert host['b'] is None and got['b'] is None
  assert got['w'].sharding.is_equivalent_to(params['w'].sharding, 2)
  np.testing.assert_allclose(np.asarray(got['w']), host['w'], rtol=8 * U)
  snapshots = [(t, 0.1, {'w': np.full((8, 4), t, np.float32), 'b': None})
               for t in (1, 2)]
  got = emax.posthoc.reconstruct(snapshots, 0.1, sharding=params)
  assert got['b'] is None
  assert got['w'].sharding.is_equivalent_to(params['w'].sharding, 2)


def test_a_sharding_that_cannot_hold_a_leaf_is_named_before_reading(
    soup, monkeypatch):
  directory, _ = soup
  monkeypatch.setattr(_checkpoint_files.Reader, 'read', None)  # never read
  one = NamedSharding(_mesh(), P('data', 'model'))
  with pytest.raises(ValueError, match=r"\['b'\] \(shape \(128,\)\)"):
    emax.checkpoint.average(directory, sharding=one)
  with pytest.raises(ValueError, match=r"\['b'\] \(shape \(128,\)\)"):
    emax.checkpoint.average(directory, sharding={**_shardings(_mesh()),
                                                 'b': one})


def test_shardings_over_an_abstract_mesh_are_refused_with_the_fix(soup):
  directory, _ = soup
  mesh = jax.make_mesh((2, 4), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  params = {k: jax.device_put(np.zeros(s, np.float32),
                              NamedSharding(mesh, SPECS[k]))
            for k, s in SHAPES.items()}
  abstract = jax.eval_shape(lambda p: p, params)  # over an AbstractMesh
  with pytest.raises(TypeError, match='abstract_state'):
    emax.checkpoint.average(directory, sharding=abstract)
  got = emax.checkpoint.average(
      directory, sharding=emax.checkpoint.abstract_state(params))
  assert got['w1'].sharding.is_equivalent_to(params['w1'].sharding, 2)



def test_float64_leaves_on_devices_need_x64(tmp_path):
  with ocp.CheckpointManager(tmp_path) as manager:
    for step in (1, 2):
      manager.save(step, args=ocp.args.StandardSave(
          {'params': {'w': np.full(8, step + 2.0 ** -40, np.float64)}}))
  one = NamedSharding(_mesh(), P('data'))
  with pytest.raises(ValueError, match=r"\['params'\]\['w'\].*jax_enable_x64"):
    emax.checkpoint.average(tmp_path, sharding=one)
  with pytest.raises(ValueError, match=r"\['w'\].*jax_enable_x64"):
    emax.posthoc.reconstruct(
        [(1, 0.1, {'w': np.ones(8)}), (2, 0.1, {'w': np.ones(8)})], 0.1,
        sharding=one)
  # An int64 leaf (the latest snapshot's, not summed) would come back int32.
  with pytest.raises(ValueError, match=r"\['n'\] is int64.*jax_enable_x64"):
    emax.posthoc.reconstruct(
        [(s, 0.1, {'w': np.ones(8, np.float32), 'n': np.full(8, s, np.int64)})
         for s in (1, 2)], 0.1, sharding=one)
  with jax.enable_x64(True):
    got = emax.checkpoint.average(tmp_path, sharding=one)
  assert got['w'].dtype == np.float64
  assert np.asarray(got['w'])[0] == 1.5 + 2.0 ** -40


# --- two processes -----------------------------------------------------------


def worker(args):
  """One process: train on a mesh over both, reconstruct sharded, save."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=args.coordinator, num_processes=args.num_processes,
      process_id=args.process_id, initialization_timeout=args.timeout)
  try:
    example = load_example('multiprocess')
    mesh = example.make_mesh(args.num_processes)
    directory = os.path.join(args.out, 'checkpoint')
    params, _ = _train_and_save(directory, mesh, steps=40, snapshots=False)
    got = emax.posthoc.from_checkpoints(directory, 0.08, sharding=params)
    soup = emax.checkpoint.average(directory, path=('params',),
                                   sharding=params)
    for k in SHAPES:
      for leaf in (got[k], soup[k]):
        assert leaf.sharding.is_equivalent_to(params[k].sharding, leaf.ndim)
        assert not leaf.is_fully_addressable
    with ocp.CheckpointManager(os.path.join(args.out, 'result')) as manager:
      manager.save(0, args=ocp.args.StandardSave(got))
    with ocp.CheckpointManager(os.path.join(args.out, 'result')) as manager:
      back = manager.restore(0, args=ocp.args.StandardRestore(
          jax.tree.map(lambda x: jax.ShapeDtypeStruct(
              x.shape, x.dtype, sharding=x.sharding), got)))
    def gather(x):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    out = {f'soup/{k}': gather(v) for k, v in soup.items()}
    for k in SHAPES:
      out[k] = gather(got[k])
      np.testing.assert_array_equal(gather(back[k]), out[k])
    path = os.path.join(args.out, f'process_{args.process_id}.npz')
    np.savez(path + '.tmp.npz', **out)
    os.replace(path + '.tmp.npz', path)
  finally:
    jax.distributed.shutdown()


def test_two_processes_reconstruct_sharded_and_save_it(tmp_path):
  files = load_example('multiprocess').launch(
      num_processes=2, devices=4, steps=1, out=str(tmp_path), timeout=120,
      script=HERE)
  first, second = (dict(np.load(f)) for f in files)
  saved = tmp_path / 'result' / '0' / 'default'
  assert sorted(p.name for p in saved.glob('ocdbt.process_*')) == [
      'ocdbt.process_0', 'ocdbt.process_1']  # each wrote its own shards
  host = emax.posthoc.from_checkpoints(tmp_path / 'checkpoint', 0.08)
  soup = emax.checkpoint.average(tmp_path / 'checkpoint')
  for k in SHAPES:
    np.testing.assert_array_equal(first[k], second[k])
    np.testing.assert_array_equal(first[f'soup/{k}'], second[f'soup/{k}'])
    np.testing.assert_allclose(first[f'soup/{k}'], soup[k], rtol=0,
                               atol=8 * U * np.abs(soup[k]).max())
    np.testing.assert_allclose(first[k], host[k], rtol=0,
                               atol=64 * U * np.abs(host[k]).max())


if __name__ == '__main__':
  worker(worker_args())


class _FieldsNotSorted(collections.namedtuple('_FieldsNotSorted',
                                              ['zeta', 'alpha'])):
  """Params whose fields flatten in another order than Orbax stores them
  (by sorted name)."""


@pytest.mark.parametrize('with_sharding', [False, True])
def test_like_whose_fields_are_not_in_sorted_order(tmp_path, with_sharding):
  """Each field gets its own average back, not its neighbour's."""
  mesh = _mesh()
  params = _FieldsNotSorted(
      jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, P('data'))),
      jax.device_put(jnp.zeros((4, 8)), NamedSharding(mesh, P(None, 'model'))))
  decays = {'a': emax.power_function_decay(sigma_rel=0.05),
            'b': emax.power_function_decay(sigma_rel=0.10)}
  tx = emax.with_ema(optax.sgd(1.0), decays)
  state = tx.init(params)
  history = []
  with ocp.CheckpointManager(tmp_path) as manager:
    for t in range(1, 4):
      updates = _FieldsNotSorted(-jnp.ones((8, 4)), -2 * jnp.ones((4, 8)))
      updates, state = tx.update(updates, state, params)
      params = optax.apply_updates(params, updates)
      history.append(params)
      emax.checkpoint.save(manager, t, {'params': params, 'opt_state': state},
                           sigma_rels=decays)
  kw = {'sharding': params} if with_sharding else {}
  got = emax.posthoc.from_checkpoints(tmp_path, 0.08, like=params, **kw)
  assert type(got) is _FieldsNotSorted
  assert got.zeta.shape == (8, 4) and got.alpha.shape == (4, 8)
  # alpha moves twice as fast as zeta in every step: so does its average.
  np.testing.assert_allclose(np.asarray(got.alpha),
                             2 * np.asarray(got.zeta)[0, 0], rtol=1e-6)
  if with_sharding:
    assert got.zeta.sharding.spec == P('data')
    assert got.alpha.sharding.spec == P(None, 'model')
  with ocp.CheckpointManager(tmp_path) as manager:
    restored = manager.restore(3, args=ocp.args.StandardRestore())
  read = emax.checkpoint.read_average(restored, name=1, like=params)
  want = emax.ema_params(state, 'b')
  assert read.zeta.shape == (8, 4)
  np.testing.assert_array_equal(np.asarray(read.zeta), np.asarray(want.zeta))
  np.testing.assert_array_equal(np.asarray(read.alpha), np.asarray(want.alpha))


def test_masked_average_read_with_the_params_as_like(tmp_path):
  """like= the whole params of a masked average: leaves outside the mask
  come back None, the others under their own names."""
  params = {'frozen': jnp.ones((4,)), 'lora': jnp.zeros((2, 3))}
  decays = {'s05': emax.power_function_decay(sigma_rel=0.05)}
  tx = emax.with_ema(optax.sgd(1.0), decays,
                     mask={'frozen': False, 'lora': True})
  state = tx.init(params)
  with ocp.CheckpointManager(tmp_path) as manager:
    for t in range(1, 3):
      grads = {'frozen': jnp.zeros((4,)), 'lora': -jnp.ones((2, 3))}
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      emax.checkpoint.save(manager, t, {'params': params, 'opt_state': state},
                           sigma_rels=decays)
  got = emax.posthoc.from_checkpoints(tmp_path, 0.05, like=params)
  assert got['frozen'] is None and got['lora'].shape == (2, 3)
  np.testing.assert_allclose(
      np.asarray(got['lora']),
      np.asarray(emax.ema_params(state, 's05', params=params)['lora']),
      rtol=1e-6)
