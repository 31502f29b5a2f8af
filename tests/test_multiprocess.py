"""Two JAX processes (4 CPU devices each, gloo collectives) train with emax.

Runs ``examples/multiprocess.py``: its launcher starts the workers on
localhost with their own XLA_FLAGS (this process has 8 devices from
conftest.py; each worker has 4), they train on one mesh spanning both, save
and restore an Orbax checkpoint from both, and write their gathered results.
This test compares them with each other and with a one-process run of the
same steps on this process's 8 devices, and checks that a run without
``--out`` leaves nothing in the temporary folder.
"""

import importlib.util
import pathlib
import tempfile

import jax
import numpy as np
import pytest

EXAMPLE = pathlib.Path(__file__).parents[1] / 'examples' / 'multiprocess.py'
STEPS = 3


@pytest.fixture(scope='module')
def example():
  spec = importlib.util.spec_from_file_location('emax_multiprocess', EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def results(example, tmp_path_factory):
  out = tmp_path_factory.mktemp('multiprocess')
  files = example.launch(num_processes=2, devices=4, steps=STEPS,
                         out=str(out), timeout=240)
  return [dict(np.load(f)) for f in files], out


def test_two_processes_agree_with_each_other_and_with_one(example, results):
  (first, second), out = results
  assert int(first['process_index']) == 0 and int(second['process_index']) == 1
  assert int(first['num_devices']) == 8 and int(first['num_local_devices']) == 4
  # Saved by both (each its own shards) before the last step, committed.
  saved = out / 'checkpoint' / str(STEPS - 1) / 'default'
  assert sorted(saved.glob('ocdbt.process_*')) == [
      saved / 'ocdbt.process_0', saved / 'ocdbt.process_1']
  assert not list((out / 'checkpoint').glob('*orbax-checkpoint-tmp*'))
  keys = sorted(k for k in first if k.startswith(('ema/', 'params/')))
  assert keys == ['ema/b1', 'ema/w1', 'ema/w2', 'params/b1', 'params/w1',
                  'params/w2']
  for key in keys:  # both processes gathered the same global arrays
    np.testing.assert_array_equal(first[key], second[key])

  # The same steps in this one process, on a 2 x 4 mesh of its 8 devices.
  assert jax.device_count() == 8
  single = example.train(example.make_mesh(2), STEPS)
  for key in keys:
    np.testing.assert_allclose(first[key], single[key], rtol=1e-6, atol=1e-7)

  # Hand check of the debiased weight: 1 - 0.8 ** steps, count = steps.
  assert int(first['count']) == STEPS
  np.testing.assert_allclose(first['weight'], 1 - example.DECAY ** STEPS,
                             rtol=1e-6)
  # The average lags the params (it really averaged, not copied).
  assert not np.allclose(first['ema/w1'], first['params/w1'])


def test_launcher_kills_workers_that_outlive_the_timeout(example, tmp_path):
  with pytest.raises(RuntimeError, match=r'multi-process job timed out after'
                     r' 0.5 s; exit codes \[None, None\]'):
    example.launch(num_processes=2, devices=1, steps=1, out=str(tmp_path),
                   timeout=0.5)
  assert not list(tmp_path.glob('process_*.npz'))


def test_a_run_without_out_leaves_nothing_in_the_temp_folder(
    example, tmp_path, monkeypatch, capsys):
  temp = tmp_path / 'temp'  # the system temp folder, for this run and workers
  temp.mkdir()
  monkeypatch.setenv('TMPDIR', str(temp))
  monkeypatch.setattr(tempfile, 'tempdir', str(temp))
  results = example.main(['--num-processes', '1', '--devices', '2',
                          '--steps', '2', '--timeout', '180'])
  assert len(results) == 1 and int(results[0]['count']) == 2
  assert 'averages agree across processes' in capsys.readouterr().out
  assert not list(temp.iterdir())
