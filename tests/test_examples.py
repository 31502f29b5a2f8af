"""Smoke tests of the examples, each in a tiny configuration.

The TensorFlow tutorial is checked against the numbers TensorFlow printed and
against a float32 NumPy transcription of TensorFlow's formulas; the training
examples are run for a few epochs/steps and their outputs checked.
"""

import contextlib
import csv
import io
import math
import pathlib

import jax
import numpy as np
import pytest

from helpers import load_example

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / 'examples'


# TensorFlow's float32 arithmetic, transcribed with NumPy (independent of emax).
F = np.float32


def tf_decay(step, ceiling=0.99):
  step = F(step)
  return np.minimum(F(ceiling), (F(1) + step) / (F(10) + step))


def tf_apply(average, value, decay):
  """TF's assign_moving_average: ``average -= (average - value) * (1 - d)``."""
  return F(average - (average - F(value)) * (F(1) - decay))


def tf_walkthrough(step_after, applies):
  printed = [[F(0), F(0)]]
  average = tf_apply(F(0), 5.0, tf_decay(0))
  printed.append([F(5), average])
  for _ in range(applies):
    average = tf_apply(average, 10.0, tf_decay(step_after))
    printed.append([F(10), average])
  return printed


@pytest.fixture(scope='module')
def tutorial_run():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = load_example('tensorflow_tutorial').main(['--steps', '5'])
  return result, out.getvalue()


def test_tensorflow_tutorial_prints_what_tensorflow_printed(tutorial_run):
  result, out = tutorial_run

  # The four lines of the original TensorFlow 1 walkthrough, verbatim.
  assert '[0.0, 0.0]\n[5.0, 4.5]\n[10.0, 4.555]\n[10.0, 4.60945]\n' in out
  expected = [[0.0, 0.0], [5.0, 4.5], [10.0, 4.555], [10.0, 4.60945]]
  assert np.array_equal(np.asarray(result['tutorial'], np.float32),
                        np.asarray(expected, np.float32))

  # step := 100: decay min(0.99, 101 / 110), seven applies of v1 = 10.
  assert F(tf_decay(100)) == F(101) / F(110)
  reference = tf_walkthrough(100, 7)
  assert len(result['tutorial_100']) == 9
  assert np.array_equal(np.asarray(result['tutorial_100'], np.float32),
                        np.asarray(reference, np.float32))
  lines = '\n'.join(f'[{v!s}, {a!s}]' for v, a in reference)
  assert lines in out
  assert '[10.0, 4.95]\n[10.0, 5.3631816]' in out  # by hand: 4.5 + 5.5 * 9/110


@pytest.mark.parametrize('section, learning_rate', [
    ('sgd', lambda step: F(0.2)),
    ('exponential_decay', lambda step: F(0.1) * F(0.99) ** F(step)),
])
def test_tensorflow_tutorial_learning_rate_section(tutorial_run, section,
                                                   learning_rate):
  result = tutorial_run[0][section]
  assert len(result) == 5
  w, average = F(5.0), F(5.0)
  for step, (got_w, got_average) in enumerate(result):
    w = F(w - learning_rate(step) * (F(2) * (w + F(1))))  # d/dw (w + 1)^2
    average = tf_apply(average, w, tf_decay(step))
    np.testing.assert_allclose(got_w, w, rtol=1e-6)
    np.testing.assert_allclose(got_average, average, rtol=1e-6)


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_train_digits_writes_plot_and_table(tmp_path, capsys):
  digits = load_example('train_digits')
  def argv(out):
    return ['--epochs', '3', '--last', '2', '--hidden', '32', '--no-progress',
            '--out', str(tmp_path / out)]

  result = digits.main(argv('a'))
  out = capsys.readouterr().out

  png = pathlib.Path(result['png'])
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert png.stat().st_size > 5000  # a real figure, not an empty canvas
  rows = read_csv(result['csv'])
  assert [int(r['epoch']) for r in rows] == [1, 2, 3]
  assert set(rows[0]) == {'epoch', 'train_loss', 'raw_test_loss',
                          'raw_test_acc', 'ema_test_loss', 'ema_test_acc',
                          'ema_decay', 'ema_window', 'ema_distance'}
  # emax.metrics: tf_decay(0.99) after 3 epochs of 42 steps is still warming
  # up: the last step used (1 + n) / (10 + n) at n = 125.
  assert float(rows[-1]['ema_decay']) == pytest.approx(126 / 135, abs=1e-6)
  assert float(rows[-1]['ema_window']) == pytest.approx(135 / 9, rel=1e-5)
  assert 0.0 < float(rows[-1]['ema_distance']) < 0.5
  assert 'EMA test accuracy after epochs 1-3' in out
  for row in rows:
    for kind in ('raw', 'ema'):
      assert 0.0 <= float(row[f'{kind}_test_acc']) <= 1.0
      assert 0.0 < float(row[f'{kind}_test_loss']) < 10.0
  # Ten classes: chance is 0.1; three epochs of SGD learn far more.
  assert float(rows[-1]['raw_test_acc']) > 0.5
  assert float(rows[-1]['ema_test_acc']) > 0.5
  # The average is not the raw weights.
  assert rows[-1]['raw_test_loss'] != rows[-1]['ema_test_loss']

  summary = result['summary']
  accs = [float(r['raw_test_acc']) for r in rows[-2:]]
  assert summary['raw']['mean_acc'] == pytest.approx(np.mean(accs), abs=1e-6)
  assert summary['raw']['std_acc'] == pytest.approx(
      np.std(accs, ddof=1), abs=1e-6)
  assert 'test accuracy, std over last 2' in out
  assert 'train_digits.png' in out

  # Deterministic for a given seed.
  again = digits.main(argv('b'))
  assert read_csv(again['csv']) == rows


def test_train_digits_help_and_bad_flags(capsys):
  digits = load_example('train_digits')
  with pytest.raises(SystemExit) as exit_info:
    digits.main(['--help'])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for flag in ('--decay', '--schedule', '--debias', '--epochs', '--lr',
               '--seed', '--out'):
    assert flag in text
  with pytest.raises(SystemExit):
    digits.main(['--decay', '1.5'])
  assert '--decay must be in [0, 1], got 1.5' in capsys.readouterr().err


def test_train_digits_schedules():
  digits = load_example('train_digits')
  assert digits.make_decay('constant', 0.9, 0.1) == 0.9
  assert float(digits.make_decay('tf', 0.99, 0.1)(0)) == pytest.approx(0.1)
  assert float(digits.make_decay('inverse_power', 0.99, 0.1)(0)) == 0.0
  assert float(digits.make_decay('power_function', 0.99, 0.1)(0)) == 0.0


@pytest.fixture(scope='module')
def resumed_run():
  """checkpoint_resume.py as run by default: the resume in a new process."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = load_example('checkpoint_resume').main(
        ['--steps', '9', '--stop-at', '4'])
  return result, out.getvalue()


def test_checkpoint_resume_equals_uninterrupted(resumed_run):
  result, out = resumed_run
  assert 'resumed in a fresh process' in out
  assert 'restored step 4' in out and 'the average has seen 4 steps' in out
  assert result['equal'], out
  assert result['step'] == 9
  assert all(result['parts'].values())
  assert 'equals the uninterrupted one' in out
  assert 0.0 <= result['raw_acc'] <= 1.0 and 0.0 <= result['ema_acc'] <= 1.0


def test_checkpoint_resume_compare_detects_a_difference(resumed_run, capsys):
  resume = load_example('checkpoint_resume')
  state = resumed_run[0]['resumed']
  nudged = state.replace(params=jax.tree.map(lambda p: p + 1e-3,
                                             state.params))
  result = resume.compare(state, nudged)
  assert result['params'] is False
  assert result['step'] is True and result['ema_params'] is True
  assert 'DIFFERENT (max abs difference 0.001)' in capsys.readouterr().out


def test_quickstart_runs():
  quickstart = load_example('quickstart')
  result = quickstart.main(['--steps', '50'])
  for value in result.values():
    assert math.isfinite(value)
  assert 0.0 <= result['raw_acc'] <= 1.0
  assert 0.0 <= result['ema_acc'] <= 1.0
  assert result['ema_loss'] > 0.0


def test_readme_shows_the_committed_plot():
  root = EXAMPLES.parent
  readme = (root / 'README.md').read_text()
  assert '](docs/train_digits.png)' in readme
  png = root / 'docs' / 'train_digits.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
