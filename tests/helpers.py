"""Assertions and references shared by the test files (no Flax needed)."""

import importlib.util
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_bitwise(a, b):
  """Equal to the bit (also the sign of zeros and NaN payloads), leaf by
  leaf, with the same tree structure, dtypes and shapes."""
  assert jax.tree.structure(a) == jax.tree.structure(b), (
      jax.tree.structure(a), jax.tree.structure(b))

  def leaf(x, y):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, (
        x.dtype, y.dtype, x.shape, y.shape)
    np.testing.assert_array_equal(x.view(f'u{x.itemsize}'),
                                  y.view(f'u{y.itemsize}'))
  jax.tree.map(leaf, a, b)


def max_diff(a, b):
  """The largest absolute difference between two trees, over all leaves."""
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
      a, b)))


def lerp(avg, new, decay):
  """tf.train.ExponentialMovingAverage's step, in float32 NumPy:
  ``avg - (1 - decay) * (avg - new)``, leaf by leaf."""
  one_minus = np.float32(1 - decay)
  return jax.tree.map(lambda a, p: a - one_minus * (a - p), avg, new)


def child_env():
  """The environment for a child Python: this checkout first on the path,
  JAX on CPU unless the caller chose a platform."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
  env.setdefault('JAX_PLATFORMS', 'cpu')
  return env


def load_example(name):
  """Imports ``examples/<name>.py`` once (its jitted functions stay warm)."""
  module_name = f'emax_example_{name}'
  if module_name not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        module_name, os.path.join(ROOT, 'examples', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses (flax Modules) look it up
    spec.loader.exec_module(module)
  return sys.modules[module_name]


def run_cli(capsys, *argv):
  """Runs ``python -m emax.posthoc ARGV --quiet`` in-process: (exit code,
  stdout, stderr)."""
  from emax import posthoc  # pylint: disable=g-import-not-at-top
  try:
    code = posthoc.main([str(a) for a in argv] + ['--quiet'])
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def worker_args(argv=None):
  """The arguments ``examples/multiprocess.py``'s ``launch`` gives a worker
  script (``script=``): ``--process-id``, ``--num-processes``, ``--devices``,
  ``--steps``, ``--timeout``, ``--coordinator`` and ``--out``."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser()
  for flag in ('--process-id', '--num-processes', '--devices', '--steps',
               '--timeout'):
    parser.add_argument(flag, type=int)
  parser.add_argument('--coordinator')
  parser.add_argument('--out')
  return parser.parse_args(argv)
