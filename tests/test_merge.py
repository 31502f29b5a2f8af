"""emax.merge_weights: checkpoint merges that emulate a learning-rate decay.

The identity is checked against an independent float64 NumPy transcription
of the path with its updates scaled; each shape's coefficients against values
derived by hand; the end-to-end merge through emax.checkpoint.average against
the float64 merge of the saved arrays.
"""

import csv
import functools
import math
import pathlib

import hypothesis
from hypothesis import strategies as st
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import emax
import emax.checkpoint
from helpers import load_example

SHAPES = ('linear', 'cosine', '1-sqrt')


def _update_weights(k, f):
  """w_i = f((i - 1) / k), i = 1..k: the scale of the i-th update."""
  return np.array([f((i - 1) / k) for i in range(1, k + 1)], np.float64)


_F = {'linear': lambda x: 1 - x,
      'cosine': lambda x: (1 + math.cos(math.pi * x)) / 2,
      '1-sqrt': lambda x: 1 - math.sqrt(x)}


# --- the identity --------------------------------------------------------------


@hypothesis.settings(deadline=None, max_examples=60)
@hypothesis.given(k=st.integers(1, 12), shape=st.sampled_from(SHAPES),
                  seed=st.integers(0, 2**31 - 1))
def test_merge_is_the_path_with_scaled_updates(k, shape, seed):
  rng = np.random.default_rng(seed)
  theta_n = rng.normal(size=(3, 5))
  updates = rng.normal(size=(k, 3, 5)) * rng.uniform(0.01, 10)
  # The constant-rate path: checkpoints theta_n, ..., theta_{n+k}.
  path = [theta_n]
  for u in updates:
    path.append(path[-1] + u)
  c = emax.merge_weights(k, shape)
  merged = sum(c_j * theta for c_j, theta in zip(c, path))
  # The same path, each update scaled by its weight.
  w = _update_weights(k, _F[shape])
  scaled = theta_n + sum(w_i * u for w_i, u in zip(w, updates))
  scale = np.abs(theta_n) + np.sum(np.abs(updates), axis=0)
  np.testing.assert_array_less(np.abs(merged - scaled),
                               8 * (k + 1) * np.finfo(np.float64).eps * scale
                               + 1e-300)


@hypothesis.settings(deadline=None, max_examples=40)
@hypothesis.given(k=st.integers(1, 10), power=st.floats(0.1, 5.0),
                  seed=st.integers(0, 2**31 - 1))
def test_identity_for_a_callable_shape(k, power, seed):
  f = lambda x: 1.0 - x ** power  # noqa: E731
  rng = np.random.default_rng(seed)
  updates = rng.normal(size=(k, 4))
  path = np.concatenate([np.zeros((1, 4)), np.cumsum(updates, axis=0)])
  c = emax.merge_weights(k, f)
  np.testing.assert_allclose(c @ path, _update_weights(k, f) @ updates,
                             rtol=0, atol=1e-13 * (1 + np.abs(updates).sum()))


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('k', [1, 2, 3, 7, 100, 1000])
def test_weights_are_float64_non_negative_and_sum_to_one(shape, k):
  c = emax.merge_weights(k, shape)
  assert isinstance(c, np.ndarray) and c.dtype == np.float64
  assert c.shape == (k + 1,)
  assert np.all(c >= 0)
  assert abs(c.sum() - 1) <= 4 * np.finfo(np.float64).eps
  assert c[0] == 0  # w_1 = f(0) = 1: the oldest checkpoint gets no weight
  # w_i is recovered as the tail sums of c.
  np.testing.assert_allclose(np.cumsum(c[::-1])[::-1][1:],
                             _update_weights(k, _F[shape]), rtol=0,
                             atol=4 * k * np.finfo(np.float64).eps)


# --- each shape by hand -------------------------------------------------------


def test_linear_is_the_uniform_average_of_the_last_k():
  assert emax.merge_weights(1).tolist() == [0.0, 1.0]
  assert emax.merge_weights(4).tolist() == [0.0, 0.25, 0.25, 0.25, 0.25]
  assert emax.merge_weights(4, 'linear').tolist() == [0, .25, .25, .25, .25]
  np.testing.assert_allclose(emax.merge_weights(3), [0, 1 / 3, 1 / 3, 1 / 3],
                             rtol=1e-15)


def test_cosine_by_hand():
  # k = 4: w = 1, (1 + cos(pi/4))/2, 1/2, (1 - cos(pi/4))/2.
  r = math.sqrt(2) / 4  # cos(pi / 4) / 2
  np.testing.assert_allclose(emax.merge_weights(4, 'cosine'),
                             [0, 0.5 - r, r, r, 0.5 - r], rtol=0, atol=4e-16)
  # k = 2: w = 1, 1/2; k = 3: w = 1, 3/4, 1/4 (cos(pi/3) = 1/2).
  np.testing.assert_allclose(emax.merge_weights(2, 'cosine'), [0, .5, .5],
                             rtol=0, atol=4e-16)
  np.testing.assert_allclose(emax.merge_weights(3, 'cosine'),
                             [0, .25, .5, .25], rtol=0, atol=4e-16)


def test_one_minus_sqrt_by_hand():
  # k = 4: w = 1, 1/2, 1 - sqrt(1/2), 1 - sqrt(3)/2.
  s2, s3 = math.sqrt(2) / 2, math.sqrt(3) / 2
  np.testing.assert_allclose(
      emax.merge_weights(4, '1-sqrt'),
      [0, 0.5, s2 - 0.5, s3 - s2, 1 - s3], rtol=0, atol=4e-16)
  # k = 9: w_2 = 1 - 1/3, the largest coefficient is c_1 = 1/3.
  c = emax.merge_weights(9, '1-sqrt')
  assert abs(c[1] - 1 / 3) < 4e-16 and np.argmax(c) == 1
  assert abs(c[-1] - (1 - math.sqrt(8 / 9))) < 4e-16


def test_a_callable_by_hand():
  np.testing.assert_allclose(emax.merge_weights(2, lambda x: 1 - x * x),
                             [0, 0.25, 0.75], rtol=0, atol=4e-16)
  # A step: full rate, then a tenth: half the weight on the middle one.
  step = lambda x: 1.0 if x < 0.5 else 0.1  # noqa: E731
  np.testing.assert_allclose(emax.merge_weights(4, step),
                             [0, 0, 0.9, 0, 0.1], rtol=0, atol=4e-16)
  # The constant shape: no decay, the newest checkpoint alone.
  assert emax.merge_weights(3, lambda x: 1.0).tolist() == [0, 0, 0, 1]
  # NumPy and JAX scalars are accepted.
  np.testing.assert_allclose(
      emax.merge_weights(4, lambda x: np.float32(1 - x)), [0, .25, .25, .25,
                                                           .25], atol=1e-7)


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize('k, error, match', [
    (0, ValueError, r'k must be an int in \[1, .*got 0.*len\(steps\) - 1'),
    (-3, ValueError, r'got -3'),
    (2.0, TypeError, r'k must be an int, got 2\.0 \(float\).*len\(steps\)'),
    (True, TypeError, r'k must be an int, got True'),
    ('4', TypeError, r"k must be an int, got '4'"),
])
def test_bad_k(k, error, match):
  with pytest.raises(error, match=match):
    emax.merge_weights(k)


def test_numpy_int_k():
  assert emax.merge_weights(np.int64(2)).tolist() == [0.0, 0.5, 0.5]


@pytest.mark.parametrize('decay, error, match', [
    ('exponential', ValueError,
     r"decay must be one of \['1-sqrt', 'cosine', 'linear'\] or a callable"
     r".*got 'exponential'.*f\(0\) = 1, non-increasing"),
    ('Cosine', ValueError, r"got 'Cosine'"),
    (0.5, TypeError, r'decay must be one of .* got 0\.5 \(float\)'),
    (None, TypeError, r'got None \(NoneType\)'),
    (float, TypeError, r'decay must be one of'),
])
def test_bad_decay_name_or_type(decay, error, match):
  with pytest.raises(error, match=match):
    emax.merge_weights(3, decay)


def half(x):
  return 0.5 * (1 - x)


def rises(x):
  return 1.0 if x == 0 else (0.2 if x < 0.5 else 0.6)


@pytest.mark.parametrize('f, error, match', [
    (half, ValueError, r'decay=half must have f\(0\) = 1.*got f\(0\) = 0\.5'
     r'.*Divide f by f\(0\)'),
    (lambda x: 2 * (1 - x), ValueError, r'f\(0\) = 2\.0'),
    (lambda x: 1 - 2 * x, ValueError,
     r'must take values in \[0, 1\], got f\(0\.6666666666666666\) ='
     r' -0\.33333'),
    (lambda x: 1.0 if x == 0 else math.nan, ValueError,
     r'must take values in \[0, 1\].*nan'),
    (rises, ValueError, r'decay=rises must be non-increasing.*'
     r'f\(0\.3333333333333333\) = 0\.2 < f\(0\.6666666666666666\) = 0\.6'),
    (lambda x: 'one', TypeError,
     r"must return a real number for a float x, got 'one' at x = 0\.0"),
    (lambda x: np.ones(2), TypeError, r'must return a real number'),
    (lambda x: True, TypeError, r'must return a real number'),
])
def test_bad_callable(f, error, match):
  with pytest.raises(error, match=match):
    emax.merge_weights(3, f)


# --- end to end: saved checkpoints, merged by emax.checkpoint.average ---------


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_checkpoint_average_with_merge_weights(tmp_path, dtype):
  k, interval, first = 5, 10, 40
  steps = [first + interval * j for j in range(k + 1)]
  rng = np.random.default_rng(0)
  trees = {}
  params = {'dense': {'kernel': rng.normal(size=(3, 4)),
                      'bias': rng.normal(size=(4,))}, 'scale': rng.normal()}
  for step in steps:
    params = {'dense': {'kernel': params['dense']['kernel']
                        + rng.normal(size=(3, 4)),
                        'bias': params['dense']['bias'] + rng.normal(size=4)},
              'scale': params['scale'] + rng.normal()}
    trees[step] = {'params': {
        'dense': {n: np.asarray(v, dtype) for n, v in params['dense'].items()},
        'scale': np.asarray(params['scale'], dtype)}, 'step': step}
  with ocp.CheckpointManager(tmp_path) as manager:
    for step, tree in trees.items():
      manager.save(step, args=ocp.args.StandardSave(tree))

  weights = emax.merge_weights(k, 'cosine')
  got = emax.checkpoint.average(tmp_path, steps=steps, weights=weights)
  # The cosine coefficients by hand: c_0 = 0, c_j = w_j - w_{j+1}, c_k = w_k
  # with w_i = (1 + cos(pi (i - 1) / k)) / 2.
  c = ([0.0] + [(math.cos(math.pi * (j - 1) / k)
                 - math.cos(math.pi * j / k)) / 2 for j in range(1, k)]
       + [(1 + math.cos(math.pi * (k - 1) / k)) / 2])
  np.testing.assert_allclose(weights, c, rtol=0, atol=1e-15)

  def leaf(tree, path):
    for key in path:
      tree = tree[key]
    return np.asarray(tree)

  for path in (('dense', 'kernel'), ('dense', 'bias'), ('scale',)):
    saved = [leaf(trees[s]['params'], path).astype(np.float64) for s in steps]
    want = sum(cj * x for cj, x in zip(c, saved))  # the float64 merge
    result = leaf(got, path)
    assert result.dtype == dtype and result.shape == want.shape
    # float64 leaves sum in float64; float32 leaves in float32 (k + 1 terms).
    eps = np.finfo(dtype).eps
    bound = 4 * (k + 1) * eps * np.max(np.abs(saved))
    np.testing.assert_allclose(result.astype(np.float64), want, rtol=0,
                               atol=bound)


def test_linear_merge_is_the_checkpoint_average_of_the_last_k(tmp_path):
  steps = [0, 1, 2, 3]
  with ocp.CheckpointManager(tmp_path) as manager:
    for s in steps:
      manager.save(s, args=ocp.args.StandardSave(
          {'params': {'w': np.full(2, 2.0 ** s)}}))
  got = emax.checkpoint.average(tmp_path, steps=steps,
                                weights=emax.merge_weights(3))
  lawa = emax.checkpoint.average(tmp_path, last=3)
  np.testing.assert_array_equal(got['w'], lawa['w'])
  np.testing.assert_array_equal(got['w'], np.full(2, 14.0 / 3))


# --- the example, at a reduced size --------------------------------------------


@pytest.mark.standard_promotion  # flax and optax code, as users run it
def test_example_at_a_reduced_size(tmp_path):
  epochs, windows = 4, (1, 3)
  result = load_example('wsm_digits').main([
      '--epochs', str(epochs), '--windows', *map(str, windows), '--seeds',
      '0', '--hidden', '16', '--out', str(tmp_path), '--no-progress'])
  with open(result['csv']) as f:
    rows = list(csv.DictReader(f))
  assert [(r['kind'], r['window'], r['shape']) for r in rows] == [
      ('constant', '0', 'none')] + [
          (kind, str(w), s) for w in windows for s in SHAPES
          for kind in ('merge', 'decay')]
  for r in rows:
    assert 0 <= float(r['test_acc']) <= 1 and float(r['test_loss']) > 0
  png = pathlib.Path(result['png'])
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and (
      png.stat().st_size > 10_000)
  assert len(result['table']) == 2 + len(windows) * len(SHAPES) + 1
  # A window of one interval: every shape's weights are [0, 1], so the merge
  # is the last checkpoint, and evaluates as the constant-rate run does.
  constant = rows[0]
  for r in rows:
    if r['kind'] == 'merge' and r['window'] == '1':
      assert (r['test_loss'], r['test_acc']) == (constant['test_loss'],
                                                  constant['test_acc'])
  # The checkpoints are one per epoch of the longest window, by step; the
  # example's cosine merge of the long window is their float64 merge.
  [run] = result['runs']
  steps = [e * run['spe'] for e in range(epochs - max(windows), epochs + 1)]
  directory = tmp_path / 'checkpoints' / 'seed_0'
  with ocp.CheckpointManager(directory) as manager:
    assert list(manager.all_steps()) == steps
    saved = [manager.restore(s)['params'] for s in steps]
  merged = emax.checkpoint.average(directory, steps=steps,
                                   weights=emax.merge_weights(3, 'cosine'),
                                   accumulator_dtype=np.float64)
  c = emax.merge_weights(3, 'cosine')
  for path, leaf in jax.tree_util.tree_flatten_with_path(merged)[0]:
    want = sum(cj * np.asarray(
        functools.reduce(lambda t, key: t[key.key], path, tree), np.float64)
               for cj, tree in zip(c, saved))
    assert leaf.dtype == np.float32  # the float64 merge, rounded once
    np.testing.assert_allclose(leaf, want, rtol=2.0**-24, atol=0)
