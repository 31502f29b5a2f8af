"""Smoke test of examples/posthoc_digits.py, and the CLI on its checkpoints.

The example runs in a tiny configuration (a few epochs of a small MLP); the
command line ``python -m emax.posthoc`` then reads the checkpoints it wrote,
and what it writes restores to what ``emax.posthoc.from_checkpoints`` gives.
"""

import csv
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import emax
import emax.posthoc
from helpers import child_env, load_example

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / 'examples' / 'posthoc_digits.py'
LR, EPOCHS = 0.5, 3


@pytest.fixture(scope='module')
def example_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('posthoc')
  result = load_example('posthoc_digits').main([
      '--lr', str(LR), '--epochs', str(EPOCHS), '--hidden', '16',
      '--sigma-rels', '0.05', '0.08', '0.10', '0.2', '--out', str(out),
      '--no-progress'])
  return out, result


@pytest.mark.standard_promotion  # flax and optax code, as users run it
def test_example_writes_the_table_plot_and_checkpoints(example_run):
  out, result = example_run
  with open(result['csv']) as f:
    rows = list(csv.DictReader(f))
  assert [r['kind'] for r in rows] == ['raw'] + ['tracked'] * 2 + [
      'posthoc'] * 4
  assert [r['sigma_rel'] for r in rows[3:]] == ['0.05', '0.08', '0.1', '0.2']
  for r in rows:
    assert 0.0 <= float(r['test_acc']) <= 1.0 and float(r['test_loss']) > 0
  png = pathlib.Path(result['png'])
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and (
      png.stat().st_size > 10_000)
  [run] = result['runs']
  # One checkpoint per epoch, named by optimizer step, widths recorded.
  steps = [e * run['steps_per_epoch'] for e in range(1, EPOCHS + 1)]
  assert run['steps'] == steps
  directory = out / 'checkpoints' / f'lr_{LR:g}'
  with ocp.CheckpointManager(directory) as manager:
    assert list(manager.all_steps()) == steps
    record = manager.metadata(steps[-1]).custom_metadata['emax']
  [entry] = record['averages']
  assert entry['names'] == ['s05', 's10']
  np.testing.assert_allclose(entry['sigma_rels'], [0.05, 0.10], rtol=1e-12)
  # Rebuilt at a tracked width, the tracked average comes back (its own last
  # snapshot has weight one), so its test metrics are the tracked ones.
  assert run['tracked_error'] <= 1e-6
  by_width = {r['sigma_rel']: r for r in rows[3:]}
  assert by_width['0.05']['test_acc'] == rows[1]['test_acc']
  assert by_width['0.1']['test_acc'] == rows[2]['test_acc']


def test_cli_on_the_example_checkpoints(example_run, tmp_path):
  out, result = example_run
  [run] = result['runs']
  checkpoints = out / 'checkpoints' / f'lr_{LR:g}'
  target = run['steps'][-2]
  done = subprocess.run(
      [sys.executable, '-m', 'emax.posthoc', str(checkpoints), '--sigma-rel',
       '0.08', '0.15', '--out', str(tmp_path), '--step', str(target)],
      capture_output=True, text=True, timeout=300, env=child_env(),
      cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-4000:]
  assert 'checkpoints' in done.stderr  # the progress bar (tqdm)
  want = emax.posthoc.from_checkpoints(checkpoints, [0.08, 0.15],
                                       target_step=target)
  for sigma_rel, expected in zip(('0.08', '0.15'), want):
    written = tmp_path / f'sigma_rel_{float(sigma_rel):.3f}'
    assert f'sigma_rel {sigma_rel}: wrote {written}/{target}' in done.stdout
    with ocp.CheckpointManager(written) as manager:
      assert list(manager.all_steps()) == [target]
      restored = manager.restore(target)
      assert manager.metadata(target).custom_metadata['posthoc'][
          'sigma_rel'] == float(sigma_rel)
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, exp in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
      assert np.asarray(got).dtype == exp.dtype
      np.testing.assert_array_equal(np.asarray(got), exp)


def test_cli_errors_are_clear(example_run, tmp_path, capsys):
  out, _ = example_run
  checkpoints = str(out / 'checkpoints' / f'lr_{LR:g}')
  with pytest.raises(SystemExit) as e:
    emax.posthoc.main([checkpoints, '--sigma-rel', '0.08', '--out',
                       str(tmp_path), '--step', '7', '--quiet'])
  assert e.value.code == 1
  assert 'No checkpoint for target_step 7' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    emax.posthoc.main([checkpoints, '--sigma-rel', '0.5', '--out',
                       str(tmp_path), '--quiet'])
  assert 'target_sigma_rel[0] must be in' in capsys.readouterr().err
  # --tracked overrides the record: the averages in order.
  assert emax.posthoc.main([checkpoints, '--sigma-rel', '0.1', '--out',
                            str(tmp_path), '--tracked', 'none', '0.1',
                            '--quiet']) == 0
  assert 'sigma_rel 0.1: wrote' in capsys.readouterr().out
  with pytest.raises(SystemExit):  # the output exists now
    emax.posthoc.main([checkpoints, '--sigma-rel', '0.1', '--out',
                       str(tmp_path), '--quiet'])
  assert 'already exists; remove them or choose another --out' in (
      capsys.readouterr().err)
