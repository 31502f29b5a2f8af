"""The fast paths (packed layout, sum-first NaN guard) against the default path
and a NumPy reference; and a smoke run of the benchmark suite."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import emax
from emax import _layout

DECAYS = (0.9, 0.5, 0.99, 0.0)


def _params():
  """Odd sizes, every float dtype, scalars, non-float and None leaves."""
  rng = np.random.default_rng(0)

  def f(shape, dtype):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype)

  return {
      'odd': f((7,), jnp.float32),
      'one': f((1,), jnp.float32),
      'scalar': f((), jnp.float32),
      'mat': f((3, 11), jnp.float32),
      'bf16': f((5, 3), jnp.bfloat16),
      'f16': f((13,), jnp.float16),
      'c64': jnp.asarray(rng.standard_normal(9) + 1j * rng.standard_normal(9),
                         jnp.complex64),
      'big': f((300,), jnp.float32),  # above the pack size used below
      'int': jnp.arange(4, dtype=jnp.int32),
      'flag': jnp.array([True, False]),
      'none': None,
  }


PACK = 64  # leaves of at most 64 elements are packed: all but 'big'


def _packed_names(state, params):
  names = [path[0].key for path, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  return {names[i] for g in state.average.layout.groups for i in g}


def _numpy_ema(params_seq, decays, debias=False):
  """The average as TensorFlow defines it, in float32 NumPy (float leaves)."""
  def acc(x):
    x = np.asarray(x)
    return x.astype(np.complex64 if np.iscomplexobj(x) else np.float32)

  avg = {k: (acc(v) * 0 if debias else acc(v))
         for k, v in params_seq[0].items()
         if v is not None and jnp.issubdtype(v.dtype, jnp.inexact)}
  weight = np.float32(0 if debias else 1)
  for p, d in zip(params_seq[1:], decays):
    c = np.float32(1) - np.float32(d)
    for k in avg:
      avg[k] = avg[k] - c * (avg[k] - acc(p[k]))
    weight = weight - c * (weight - np.float32(1))
  return {k: v / weight if weight else v for k, v in avg.items()}


def _steps(params):
  out = [params]
  for i in range(len(DECAYS)):
    out.append(jax.tree.map(
        lambda x, i=i: x + jnp.asarray(0.25 * (i + 1), x.dtype)
        if jnp.issubdtype(x.dtype, jnp.inexact) else x + 1
        if x.dtype != jnp.bool_ else ~x, out[-1]))
  return out


@pytest.mark.parametrize('debias', [False, True])
def test_packed_update_equals_default_and_numpy(debias):
  seq = _steps(_params())
  step = jax.jit(emax.update, donate_argnums=0)
  plain = emax.init(seq[0], debias=debias)
  packed = emax.init(seq[0], debias=debias, pack=PACK)
  assert isinstance(packed.average, _layout.PackedTree)
  assert _packed_names(packed, seq[0]) == {'odd', 'one', 'scalar', 'mat', 'bf16', 'f16', 'c64'}
  for p, d in zip(seq[1:], DECAYS):
    plain = step(plain, p, jnp.float32(d))
    packed = step(packed, p, jnp.float32(d))
  a, b = emax.ema_params(plain), emax.ema_params(packed)
  assert jax.tree.structure(a) == jax.tree.structure(seq[0])
  for k in a:
    if a[k] is None:
      assert b[k] is None
      continue
    assert a[k].dtype == b[k].dtype == seq[0][k].dtype
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
  ref = _numpy_ema(seq, DECAYS, debias)
  for k, v in ref.items():
    tol = dict(bf16=1e-2, f16=1e-3).get(k, 1e-6)
    np.testing.assert_allclose(
        np.asarray(b[k]).astype(v.dtype), v.astype(np.asarray(b[k]).dtype),
        rtol=tol, atol=tol)
  np.testing.assert_array_equal(b['int'], seq[-1]['int'])
  np.testing.assert_array_equal(b['flag'], seq[-1]['flag'])
  assert float(plain.weight) == float(packed.weight)


def test_packed_transform_matches_plain_with_every_option():
  params = _params()
  grads = jax.tree.map(
      lambda x: jnp.ones_like(x)
      if jnp.issubdtype(x.dtype, jnp.inexact) else None, params)
  nan = jax.tree.map(lambda g: g * jnp.asarray(jnp.nan, g.dtype), grads)
  states = []
  for pack in (False, PACK):
    tx = optax.chain(optax.sgd(0.1), emax.ema(
        emax.tf_decay(0.9), debias=True, update_every=2, start_step=1,
        pack=pack))
    state, p = tx.init(params), params

    @jax.jit
    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return jax.tree.map(
          lambda p, u: p if u is None or p is None else (p + u).astype(p.dtype),
          p, u, is_leaf=lambda x: x is None), s

    for g in (grads, grads, grads, nan, grads):  # step 4 averages
      new_p, state = step(p, state, g)
      if g is grads:
        p = new_p
    states.append(emax.get_ema_state(state))
  plain, packed = states
  assert isinstance(packed.average, _layout.PackedTree)
  assert int(packed.skipped) == int(plain.skipped) == 1
  assert int(packed.count) == int(plain.count) == 5
  assert float(packed.weight) == float(plain.weight)
  for a, b in zip(jax.tree.leaves(emax.ema_params(plain)),
                  jax.tree.leaves(emax.ema_params(packed))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_and_replicated_leaves_are_never_packed():
  mesh = jax.make_mesh((8,), ('x',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  sharded = NamedSharding(mesh, P('x'))
  replicated = NamedSharding(mesh, P())
  params = {
      'sharded': jax.device_put(jnp.arange(16.0), sharded),
      'replicated': jax.device_put(jnp.ones(8), replicated),
      'local': jnp.ones(8),
      'local2': jnp.full((2, 3), 2.0),
  }
  state = emax.init(params, pack=True)
  abstract = jax.eval_shape(lambda p: emax.init(p, pack=True), params)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  assert _packed_names(state, params) == {'local', 'local2'}
  new = jax.tree.map(lambda x: x * 3, params)
  state = jax.jit(emax.update)(state, new, 0.5)
  avg = emax.ema_params(state)
  assert avg['sharded'].sharding == sharded
  assert avg['replicated'].sharding.is_equivalent_to(replicated, 1)
  for leaf in state.average.rest:
    assert (leaf.sharding.is_equivalent_to(sharded, 1)
            or leaf.sharding.is_equivalent_to(replicated, 1))
  for k, x in params.items():
    np.testing.assert_allclose(avg[k], np.asarray(x) * 2)


def test_packed_state_checkpoints_and_scans(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  params = _params()
  tx = emax.ema(0.5, pack=PACK)
  state = tx.init(params)

  ones = jax.tree.map(
      lambda x: jnp.ones_like(x)
      if jnp.issubdtype(x.dtype, jnp.inexact) else None, params)

  def body(s, _):
    return tx.update(ones, s, params)[1], None

  state, _ = jax.jit(lambda s: lax.scan(body, s, length=3))(state)
  assert int(state.count) == 3
  path = tmp_path / 'ckpt'
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, state)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(path, jax.eval_shape(tx.init, params))
  assert isinstance(restored.average, _layout.PackedTree)
  for a, b in zip(jax.tree.leaves(emax.ema_params(state)),
                  jax.tree.leaves(emax.ema_params(restored))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # 0.5 ** 3 of the start, the rest at params + 1.
  np.testing.assert_allclose(emax.ema_params(restored)['odd'],
                             params['odd'] + 0.875, rtol=1e-6)


def test_nan_guard_is_exact_for_sums_that_overflow():
  tx = emax.ema(0.5)
  huge = {'w': jnp.full((4,), 3e38, jnp.float32)}  # finite; its sum is inf
  state = tx.init(huge)
  zero = {'w': jnp.zeros(4)}
  _, state = jax.jit(tx.update)(zero, state, huge)
  assert int(state.skipped) == 0
  for bad in (jnp.inf, -jnp.inf, jnp.nan):
    _, s = jax.jit(tx.update)({'w': zero['w'].at[2].set(bad)}, state, huge)
    assert int(s.skipped) == 1
    np.testing.assert_array_equal(s.average['w'], state.average['w'])


def _positions(n):
  """Where a bad value is put: both ends, both sides of the first slice
  boundaries (8 slices of n // 8), and the first element of the tail."""
  width = n // 8
  tail = 8 * width
  return sorted({i for i in (0, 1, width - 1, width, width + 1,
                             2 * width - 1, 2 * width, tail - 1, tail, n - 1)
                 if 0 <= i < n})


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16,
                                   jnp.complex64])
def test_nan_guard_flag_against_numpy(dtype):
  """The guard's flag (both forms: 8 slices side by side on one device, a
  sum per array on several) against NumPy's float64 ``all(isfinite)``, for
  every size class (shorter than 8, exact slices, slices and a tail) and a
  NaN, +Inf or -Inf at each boundary, and on finite values near the dtype's maximum
  (whose sum overflows)."""
  from emax import _numerics  # pylint: disable=g-import-not-at-top
  big = float(jnp.finfo(dtype).max)
  def by_slices(x):
    flags, tail = _numerics._slice_flags(x)
    return jnp.all(flags) & tail

  # By slices (one device) and one reduction per array (several devices).
  check = {True: jax.jit(by_slices),
           False: jax.jit(lambda x: _numerics.all_finite([x]))}
  for n in (1, 31, 32, 33, 64, 32 * 7 + 5, 1000):
    base = np.full(n, big, np.float64)  # finite: every form says True
    cases = [base]
    for i in _positions(n):
      for bad in (np.nan, np.inf, -np.inf):
        x = base.copy()
        x[i] = bad
        cases.append(x)
    for x in cases:
      arr = jnp.asarray(x, dtype)
      if jnp.iscomplexobj(arr):  # a bad imaginary part alone counts too
        arr = jnp.asarray(1 + 1j * x.astype(np.complex128), dtype)
      want = bool(np.all(np.isfinite(np.asarray(arr).astype(
          np.complex128 if jnp.iscomplexobj(arr) else np.float64))))
      for slices, fn in check.items():
        assert bool(fn(arr.reshape(-1, 1) if n % 2 else arr)) == want, (
            n, slices, x)
  flags = [jnp.ones(40, dtype), jnp.full((3, 3), big, dtype)]
  assert bool(jax.jit(_numerics.all_finite)(flags))
  flags[1] = flags[1].at[2, 1].set(jnp.nan)
  assert not bool(jax.jit(_numerics.all_finite)(flags))


_NO_NEW_PARAMS = r"""
import sys
import jax, jax.numpy as jnp, emax
assert jax.device_count() == 1
dtype = jnp.dtype(sys.argv[1])
pack = sys.argv[2] == 'pack'
params = {f'p{i}': jnp.ones((1 << 16,) if i else (3, 1 << 14), dtype)
          for i in range(4)}
if pack:  # small leaves go into the pack; the big ones stay out of it
  params.update({f's{i}': jnp.ones((100,), dtype) for i in range(3)})
updates = jax.tree.map(lambda x: x * jnp.asarray(1e-3, dtype), params)
tx = emax.ema(0.99, pack=pack)
compiled = jax.jit(lambda s, u, p: tx.update(u, s, p)[1],
                   donate_argnums=0).lower(tx.init(params), updates,
                                           params).compile()
nbytes = sum(x.nbytes for x in params.values())
temp = compiled.memory_analysis().temp_size_in_bytes
# The guard's flags take a byte per 8 elements (nbytes / 16 for 16-bit
# params); a copy of p + u would take nbytes or more.
assert temp < nbytes / 4, (temp, nbytes)
print('ok')
"""


@pytest.mark.parametrize('pack', ['plain', 'pack'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'float16'])
def test_a_standalone_guarded_tx_update_writes_no_new_params(dtype, pack):
  """A jitted ``tx.update`` alone computes ``p + u`` itself: the guard reads
  it in its own loop, as ``all(isfinite(p + u))`` written by hand does, and
  writes no copy of it (a float sum of ``p + u`` wrote all of it first on
  XLA CPU: 2x the hand-written guard). For 16-bit params the guard reads
  the float32 sum before its rounding: a check of the rounded ``p + u``
  wrote a copy of it for both passes (1.2x the hand-written guard on a
  bf16 Llama-like tree). With ``pack=True`` the leaves left out of the
  pack are read the same way. A child process with one device."""
  import subprocess  # pylint: disable=g-import-not-at-top
  from tests.helpers import child_env  # pylint: disable=g-import-not-at-top
  env = child_env()
  env['XLA_FLAGS'] = ''
  out = subprocess.run([sys.executable, '-c', _NO_NEW_PARAMS, dtype, pack],
                       env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-3000:]


def test_pack_errors():
  with pytest.raises(ValueError, match='pack must be False, True or the'):
    emax.init({'w': jnp.ones(2)}, pack=-3)
  with pytest.raises(ValueError, match='pack must be False, True or the'):
    emax.ema(0.9, pack='yes')


def test_pack_without_small_leaves_is_the_plain_tree():
  state = emax.init({'w': jnp.ones(100)}, pack=10)
  assert isinstance(state.average, dict)


# --- the benchmark suite (benchmarks/): structure, never timings -------------

_BENCH_STATUSES = {'yes', 'NO', 'noise', 'skipped'}


def _bench_modules():
  """The benchmarks package (it sits beside tests/, not in emax)."""
  root = str(pathlib.Path(__file__).parents[1])
  if root not in sys.path:
    sys.path.insert(0, root)
  # pylint: disable-next=g-import-not-at-top
  from benchmarks import peers, rows, run, trees
  return peers, rows, run, trees


def _bench_update_rows():
  """The smoke run's trees and the rows each must show."""
  _, rows, _, trees = _bench_modules()
  return {
      trees.RESNET50: {
          rows.EMAX_UPDATE, rows.EMAX_UPDATE_UNGUARDED,
          rows.EMAX_UPDATE_PACKED, rows.EMAX_UPDATE_LERP, rows.EMA_TX,
          rows.EMA_TX_UNGUARDED, rows.OPTAX_APPLY_INCREMENTAL,
          rows.READ_PARAMS_UPDATES, rows.LERP_DONATED, rows.LERP_NOT_DONATED,
          rows.OPTAX_INCREMENTAL, rows.OPTAX_EMA, rows.TORCH_LERP,
          rows.HAND_GUARDED, rows.HAND_GUARDED_TX},
      trees.small_leaves_name(16): {
          rows.EMAX_UPDATE_PACKED, rows.TORCH_LERP, rows.IDENTITY,
          rows.STACKED},
      trees.RESNET50_BF16: {
          rows.EMAX_UPDATE, rows.EMAX_UPDATE_UNGUARDED,
          rows.OPTAX_INCREMENTAL, rows.TORCH_LERP, rows.HAND_GUARDED,
          rows.EMA_TX, rows.HAND_GUARDED_TX},
  }


def _bench_check_rows(data, section, table, got, expected):
  """Each expected row is there; only torch's may be skipped instead (when
  torch is not installed), with the reason."""
  _, rows, _, _ = _bench_modules()
  skipped = {s['row']: s for s in data['skipped']
             if s['section'] == section and s['table'] == table}
  for name in expected:
    present = [r for r in got if r.get('row', r['impl']) == name]
    if name == rows.TORCH_LERP and not present:
      assert skipped[name]['reason'], (table, name)
    else:
      assert len(present) == 1, (
          f'{table}: row {name!r} missing ({skipped.get(name)})')


def _bench_times(node, key=''):
  """Every number stored under a time key (``*_ms``, ``*_s``)."""
  if isinstance(node, dict):
    for k, v in node.items():
      yield from _bench_times(v, k)
  elif isinstance(node, list):
    for v in node:
      yield from _bench_times(v, key)
  elif key.endswith(('_ms', '_s')) and node is not None:
    yield key, node


def _bench_load(path):
  def no_nan(word):
    raise AssertionError(f'{path.name} holds {word}: not valid JSON')
  return json.loads(path.read_text(), parse_constant=no_nan)


def _bench_common(data):
  assert not [s for s in data['skipped'] if s['error']], data['skipped']
  assert all(s['reason'] for s in data['skipped'])
  for key, value in _bench_times(data):
    assert isinstance(value, (int, float)) and value >= 0, (key, value)
  for t in data['targets']:
    assert t['status'] in _BENCH_STATUSES, t
    assert t['measured'] or t['note'], t  # a value, or why there is none
    if t['status'] == 'yes':  # met: measured, and the value clears it
      assert t['value'] is not None, t
      if t['above']:  # a proof: the floor is above the target
        assert t['value'] > t['threshold'], t
      else:
        assert t['value'] <= t['threshold'], t


def test_benchmark_smoke(tmp_path):
  """`python -m benchmarks.run --smoke --docs`: every table, row and target."""
  peers, _, run, _ = _bench_modules()
  out, docs = tmp_path / 'results', tmp_path / 'docs'
  run.main(['--smoke', '--out', str(out), '--docs', '--docs-dir', str(docs)])
  data = _bench_load(out / 'smoke.json')
  _bench_common(data)
  assert data['ceiling']['gbps'] > 0
  trees = {t['case']: t for t in data['updates']}
  expected_rows = _bench_update_rows()
  assert set(trees) == set(expected_rows)
  for case, expected in expected_rows.items():
    _bench_check_rows(data, 'updates', case, trees[case]['rows'], expected)
    for r in trees[case]['rows']:
      assert r['min_ms'] <= r['median_ms'] <= r['max_ms'], r
      assert r['ci_ms'][0] <= r['median_ms'] <= r['ci_ms'][1], r
      assert len(r['samples_ms']) == data['config']['rounds'], r
  train = data['train']
  assert [b['batch'] for b in train['batches']] == [32]
  for b in train['batches']:
    _bench_check_rows(data, 'train', f"train step, batch {b['batch']}",
                      b['rows'], {i.name for i in peers.TRAIN})
    for r in b['rows']:
      if r['impl'] != train['baseline']:  # "added": a time, or noise
        a = r['added']
        assert (a['median_ms'] is None) == (not a['resolved']), r
  _bench_check_rows(data, 'options', 'options', data['options']['rows'],
                    {i.name for i in peers.OPTIONS})
  (table,) = data['averages']['tables']
  _bench_check_rows(data, 'averages', 'K=2', table['rows'],
                    {i.name for i in peers.AVERAGES})
  groups = {t['group'] for t in data['targets']}
  assert len(groups) == 4 and not any('GPU' in g for g in groups), groups
  names = ' '.join(t['target'] for t in data['targets'])
  for phrase in ('ResNet-50-like: `emax.ema(d)` default',
                 'batch 32: default `emax.ema` adds <= 1.05x',
                 'batch 32: default `emax.ema` adds <= 1.25x',
                 '16 leaves x 256: fastest emax', 'compiles in < 10 s',
                 'jitted identity over the 4 buffers', 'the stacked route',
                 'K=2: named averages <= 1.1x', 'faster than K separate',
                 'ResNet-50-like: `emax.ema(d)` default standalone tx.update <= 1.10x',
                 'ResNet-50-like, bf16 params: `emax.update` default <= 1.10x',
                 'batch 32: the step with default `emax.ema` <= 1.05x',
                 'train step: proof (traffic)', 'K=2: proof (traffic)',
                 'batch 32, route: with `clip_by_global_norm`',
                 'K=2: the layout alone',
                 'hold 1 + K param trees',
                 'ResNet-50-like, bf16 params: `emax.update skip_nonfinite=False`'
                 ' <= 1.05x'):
    assert phrase in names, phrase
  page = (docs / 'performance.md').read_text()
  assert page.startswith('<!-- Generated by `python -m benchmarks.run`')
  assert 'do not edit by hand' in page.splitlines()[0]
  for heading in ('# Performance', '## What the numbers mean',
                  '## How to rerun', '## Targets', '## Update step, per tree',
                  *(f'### {case}' for case in trees), '## Train step',
                  '### Batch 32', '## Options', '## K averages',
                  '![GB/s per implementation and tree](performance.png)'):
    assert f'\n{heading}\n' in page, heading
  assert (out / 'smoke.md').read_text().replace(
      'smoke.png', 'performance.png') == page
  for png in (out / 'smoke.png', docs / 'performance.png'):
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_benchmark_gpu_suite_code_path_on_cpu(tmp_path, monkeypatch):
  """`--gpu` (with the smoke run's sizes), on CPU by the documented switch."""
  _, rows, run, trees = _bench_modules()
  monkeypatch.delenv(run.GPU_ON_CPU, raising=False)
  with pytest.raises(SystemExit, match=run.GPU_ON_CPU):
    run.main(['--gpu', '--out', str(tmp_path)])  # refuses CPU, says how
  monkeypatch.setenv(run.GPU_ON_CPU, '1')
  run.main(['--gpu', '--smoke', '--only', 'updates,offload,share', '--tree',
            trees.RESNET50_BF16, '--out', str(tmp_path)])
  data = _bench_load(tmp_path / 'smoke-gpu.json')
  _bench_common(data)
  assert data['gpu'] and data['config']['min_sample_s'] > 0
  assert data['train'] is None and data['options'] is None  # not asked for
  (tree,) = data['updates']
  _bench_check_rows(data, 'updates', tree['case'], tree['rows'],
                    _bench_update_rows()[tree['case']])
  (size,) = data['offload']['sizes']
  assert [r['impl'] for r in size['rows']] == [
      rows.ON_DEVICE, rows.OFFLOAD, rows.OFFLOAD_UPDATE_EVERY,
      rows.ROUND_TRIP]
  assert size['rows'][-1]['transfer_gbps'] > 0
  share = {m['model']: m for m in data['share']['models']}
  assert set(share) == {'transformer', 'conv net'}
  for m in share.values():
    got = {r['impl']: r for r in m['rows']}
    assert set(got) == {rows.SHARE_NONE, rows.SHARE_WITH_EMA,
                        rows.SHARE_UNGUARDED, rows.SHARE_NAMED,
                        rows.SHARE_OFFLOAD, rows.SHARE_CLIP,
                        rows.SHARE_CLIP_FINITE}
    for name, r in got.items():  # a share against its base, or the base
      base = name in (rows.SHARE_NONE, rows.SHARE_CLIP)
      assert ('share_pct' in r) != base, r
      if not base:
        lo, hi = r['share_ci_pct']
        assert lo <= r['share_pct'] <= hi, r
  (gpu_target,) = [t for t in data['targets'] if 'GPU' in t['group']]
  assert gpu_target['status'] in {'yes', 'NO'}
  page = (tmp_path / 'smoke-gpu.md').read_text()
  assert '\n## Host offload\n' in page and '(--smoke --gpu)' in page
  for heading in ("## The average's share of a train step", '### Transformer',
                  '### Conv net'):
    assert f'\n{heading}\n' in page, heading
