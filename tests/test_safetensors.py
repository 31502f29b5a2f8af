"""safetensors: export of any tree bit for bit, and post-hoc EMA from the
``NAME-STEP-SIGMA.safetensors`` snapshots of any framework, against an
independent float64 reference of EDM2's solve."""

import collections
import dataclasses
import gc
import os
import subprocess
import sys
import textwrap
import weakref

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import emax
from emax import _posthoc_files
from emax import _safetensors
from emax import posthoc
from helpers import assert_bitwise
from helpers import child_env
from helpers import run_cli
import reference_posthoc as ref


def _special_floats(dtype):
  """Values whose bits a conversion would change: -0, inf, NaN payloads."""
  values = np.array([0.0, -0.0, np.inf, -np.inf, 1.5, -3.25e-3], np.float32)
  out = values.astype(dtype)
  nan = np.array([0x7FC1, 0xFFC3], np.uint16) if np.dtype(dtype).itemsize == 2 \
      else np.array([0x7FC00001, 0xFFC00003], np.uint32)
  return np.concatenate([out, nan.view(dtype)])


Pair = collections.namedtuple('Pair', 'left right')


@dataclasses.dataclass
class Box:
  inner: object


jax.tree_util.register_dataclass(Box, data_fields=['inner'], meta_fields=[])


def _tree():
  rng = np.random.default_rng(0)
  return {
      'dense': {'kernel': rng.normal(size=(3, 4)).astype(np.float32),
                'bias': jnp.asarray(_special_floats(np.float32))},
      'bf16': jnp.asarray(_special_floats(ml_dtypes.bfloat16)),
      'half': _special_floats(np.float16),
      'f64': rng.normal(size=(2,)),
      'ints': {'i8': np.array([-128, 127], np.int8),
               'u8': np.array([0, 255], np.uint8),
               'i32': jnp.arange(5, dtype=jnp.int32),
               'i64': np.array([-(2**62), 2**62], np.int64)},
      'flag': np.array([True, False]),
      'scalar': np.float32(2.5),
      'empty': np.zeros((0, 3), np.float32),
      'transposed': rng.normal(size=(3, 5)).astype(np.float32).T,
      'fortran': np.asfortranarray(rng.normal(size=(4, 3))),
      'layers': [{'w': np.ones(2, np.float32)}, (np.zeros(1, np.int32),
                                                  np.ones(1, np.float16))],
      'pair': Pair(np.float32(1), Box(np.array([7], np.int16))),
      'gone': None,
  }


_NAMES = sorted([
    'dense.kernel', 'dense.bias', 'bf16', 'half', 'f64', 'ints.i8', 'ints.u8',
    'ints.i32', 'ints.i64', 'flag', 'scalar', 'empty', 'transposed',
    'fortran', 'layers.0.w', 'layers.1.0', 'layers.1.1', 'pair.left',
    'pair.right.inner'])


def test_export_round_trip_is_bitwise(tmp_path):
  tree = _tree()
  path = tmp_path / 'tree.safetensors'
  posthoc.save_safetensors(tree, path, metadata={'format': 'pt'})
  loaded = posthoc.load_safetensors(path)
  assert sorted(loaded) == _NAMES
  flat = {'.'.join(map(str, (_key(k) for k in p))): x for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]}
  for name in _NAMES:
    assert_bitwise(loaded[name], np.asarray(flat[name]))
  assert loaded['bf16'].dtype == ml_dtypes.bfloat16
  assert loaded['scalar'].shape == () and loaded['empty'].shape == (0, 3)
  with safe_open(path, 'np') as f:  # the metadata, and no temporary file
    assert f.metadata() == {'format': 'pt'}
  assert os.listdir(tmp_path) == ['tree.safetensors']


def _key(k):
  for attr in ('key', 'idx', 'name'):
    if hasattr(k, attr):
      return getattr(k, attr)
  raise AssertionError(k)


def test_names_are_those_of_flax_flatten_dict(tmp_path):
  tree = {'params': {'Dense_0': {'kernel': np.ones((2, 2), np.float32),
                                 'bias': np.zeros(2, np.float32)},
                     'LayerNorm': {'scale': np.ones(2, np.float32)}},
          'step': np.array(3)}
  posthoc.save_safetensors(tree, tmp_path / 'a.safetensors')
  loaded = posthoc.load_safetensors(tmp_path / 'a.safetensors')
  want = flax.traverse_util.flatten_dict(tree, sep='.')
  assert sorted(loaded) == sorted(want)
  for name, x in want.items():
    assert_bitwise(loaded[name], x)
  # And back to the tree with flax, as the docstring says.
  back = flax.traverse_util.unflatten_dict(loaded, sep='.')
  assert_bitwise(back, tree)


def test_nnx_state_names_are_those_of_its_pure_dict(tmp_path):
  """An ``nnx.State`` of Variables is named as ``nnx.to_pure_dict`` and
  flax's ``flatten_dict`` name it: no ``.value`` added to each name."""
  nnx = pytest.importorskip('flax.nnx')
  model = nnx.Linear(2, 3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  posthoc.save_safetensors(state, tmp_path / 'm.safetensors')
  loaded = posthoc.load_safetensors(tmp_path / 'm.safetensors')
  want = flax.traverse_util.flatten_dict(nnx.to_pure_dict(state), sep='.')
  assert sorted(loaded) == sorted(want) == ['bias', 'kernel']
  assert_bitwise(loaded, {k: np.asarray(x) for k, x in want.items()})


def test_a_prng_key_leaf_is_named_in_the_error(tmp_path):
  with pytest.raises(TypeError, match=r"leaf 'rng' is a PRNG key.*key_data"):
    posthoc.save_safetensors({'w': np.ones(1), 'rng': jax.random.key(0)},
                             tmp_path / 'x.safetensors')
  assert os.listdir(tmp_path) == []


def test_export_of_an_emax_average_is_the_average_bit_for_bit(tmp_path):
  params = {'w': jnp.zeros((3, 2), jnp.bfloat16), 'b': [jnp.zeros(2)]}
  state = emax.init(params, names=('fast', 'slow'))
  for _ in range(3):
    params = jax.tree.map(lambda p: p + jnp.asarray(0.3, p.dtype), params)
    state = emax.update(state, params, {'fast': 0.5, 'slow': 0.9})
  slow = emax.ema_params(state, 'slow')
  assert slow['w'].dtype == jnp.bfloat16 and float(slow['b'][0][0]) != 0
  posthoc.save_safetensors(slow, tmp_path / 'slow.safetensors')
  loaded = posthoc.load_safetensors(tmp_path / 'slow.safetensors')
  assert_bitwise(loaded, {'b.0': np.asarray(slow['b'][0]),
                          'w': np.asarray(slow['w'])})
  assert loaded['w'].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize('tree, error, match', [
    (np.ones(2), ValueError, 'single array, not a tree'),
    ({'a.b': np.ones(1), 'a': {'b': np.ones(1)}}, ValueError,
     r"\['a'\]\['b'\] and \['a.b'\] would both be named 'a.b'"),
    ({'a': 'text'}, TypeError, "leaf 'a' is str"),
    ({'a': np.zeros(2, np.complex128)}, ValueError,
     'could not write .*complex128'),
])
def test_save_refuses_what_safetensors_cannot_hold(tmp_path, tree, error,
                                                   match):
  with pytest.raises(error, match=match):
    posthoc.save_safetensors(tree, tmp_path / 'x.safetensors')
  assert os.listdir(tmp_path) == []  # no partial file left behind


def test_save_names_a_missing_folder_or_a_folder_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'the folder .*none of .*'
                     r'does not exist; create it'):
    posthoc.save_safetensors({'a': np.ones(1)},
                             tmp_path / 'none' / 'x.safetensors')
  with pytest.raises(IsADirectoryError, match='is a folder; give the path'):
    posthoc.save_safetensors({'a': np.ones(1)}, tmp_path)
  assert os.listdir(tmp_path) == []
  assert not os.path.exists(f'{tmp_path}.partial')


def test_save_refuses_metadata_that_is_not_text(tmp_path):
  with pytest.raises(TypeError, match='metadata must map str to str'):
    posthoc.save_safetensors({'a': np.ones(1)}, tmp_path / 'x.safetensors',
                             metadata={'step': 3})


def test_load_names_a_missing_or_broken_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='No safetensors file'):
    posthoc.load_safetensors(tmp_path / 'none.safetensors')
  (tmp_path / 'bad.safetensors').write_bytes(b'not a safetensors file')
  with pytest.raises(ValueError, match='cannot be read as a safetensors'):
    posthoc.load_safetensors(tmp_path / 'bad.safetensors')
  # safetensors writes float8 from NumPy but cannot read it back into NumPy.
  save_file({'q': np.zeros(2, ml_dtypes.float8_e4m3fn)},
            tmp_path / 'f8.safetensors')
  with pytest.raises(ValueError, match=r"tensor 'q' has dtype F8_E4M3, which"
                     ' safetensors cannot read into NumPy'):
    posthoc.load_safetensors(tmp_path / 'f8.safetensors')


# --- post-hoc EMA from snapshot files -----------------------------------------

STEPS = [100, 200, 300, 400]
WIDTHS = [0.05, 0.10]


def _snapshot(step, sigma_rel, shapes=None):
  """A snapshot as a PyTorch run would save it: float32, bf16, float16
  tensors and an integer buffer; values differ per snapshot."""
  rng = np.random.default_rng(int(step * 1000 + sigma_rel * 100))
  shapes = shapes or {'net.weight': (6, 4), 'net.bias': (4,)}
  out = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  out['norm.weight'] = rng.normal(size=(4,)).astype(ml_dtypes.bfloat16)
  out['head.weight'] = rng.normal(size=(3,)).astype(np.float16)
  out['norm.num_batches_tracked'] = np.array(step, np.int64)
  return out


def _save_run(directory, name='ema', steps=STEPS, widths=WIDTHS, **kwargs):
  """EDM2's naming: zero-padded step, three decimals."""
  os.makedirs(directory, exist_ok=True)
  for step in steps:
    for sigma_rel in widths:
      save_file(_snapshot(step, sigma_rel, **kwargs),
                os.path.join(directory,
                             f'{name}-{step:07d}-{sigma_rel:.3f}.safetensors'))


def _reference(target, out_step=max(STEPS), steps=STEPS, widths=WIDTHS):
  """``{name: (value, dtype)}``: for float tensors the float64 sum of EDM2's
  weights (an independent transcription) times the snapshots, not yet
  rounded; integers from the snapshot at the output step."""
  pairs = [(s, w) for s in steps for w in widths]
  weights = ref.solve_posthoc_coefficients(
      [s for s, _ in pairs], [w for _, w in pairs], out_step, target)
  snapshots = [_snapshot(s, w) for s, w in pairs]
  out = {}
  for name, first in snapshots[0].items():
    if np.issubdtype(first.dtype, np.integer):
      out[name] = _snapshot(out_step, widths[0])[name], first.dtype
      continue
    total = sum(w * x.astype(np.float64) for w, x in zip(weights, (
        s[name] for s in snapshots)))
    out[name] = np.asarray(total, np.float64), first.dtype
  return out


def _assert_close_to(got, want):
  """Each float tensor is the float64 reference rounded once to its dtype
  (float32, bf16, float16 alike): the docs' "rounded once from float64".

  emax's float64 sum adds the same products in another order, with weights
  equal to the reference's to float64 round-off, so the two sums differ by a
  few float64 ulps. Rounded to the tensor's dtype they are equal, except
  where the sum lies within that round-off of a rounding midpoint: there
  the result may be the neighbour, one ulp away, and nowhere else.
  """
  assert sorted(got) == sorted(want)
  for name, (x, dtype) in want.items():
    assert got[name].dtype == dtype and got[name].shape == x.shape, name
    if np.issubdtype(dtype, np.integer):
      np.testing.assert_array_equal(got[name], x)
      continue
    rounded = x.astype(dtype).astype(np.float64)
    value = got[name].astype(np.float64)
    differ = value != rounded
    midpoint = (value[differ] + rounded[differ]) / 2
    assert np.all(np.abs(x[differ] - midpoint)
                  <= 1e-12 * np.abs(x[differ])), (
        name, value[differ], rounded[differ], x[differ])


def test_from_files_matches_the_edm2_reference(tmp_path):
  _save_run(tmp_path)
  several = posthoc.from_files(tmp_path, [0.03, 0.08, 0.15])
  assert isinstance(several, list) and len(several) == 3
  for target, got in zip([0.03, 0.08, 0.15], several):
    _assert_close_to(got, _reference(target))
  single = posthoc.from_files(tmp_path, 0.08)
  assert isinstance(single, dict)
  assert_bitwise(single, several[1])


def test_from_files_at_an_earlier_step(tmp_path):
  _save_run(tmp_path)
  got = posthoc.from_files(tmp_path, 0.12, target_step=200)
  _assert_close_to(got, _reference(0.12, out_step=200))
  assert int(got['norm.num_batches_tracked']) == 200


def test_a_tracked_width_comes_back_as_its_snapshot(tmp_path):
  _save_run(tmp_path)
  got = posthoc.from_files(tmp_path, 0.10)
  want = _snapshot(400, 0.10)
  for name in ('net.weight', 'net.bias'):  # float32: equal to round-off
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


class _Reads:
  """Wraps the file reader: which files are read, and whether the float
  arrays of an earlier one are still alive when the next is read."""

  def __init__(self, monkeypatch):
    self.paths, self.alive_at_read, self.refs = [], [], []
    read = _safetensors.load_safetensors

    def counting(path):
      gc.collect()
      self.alive_at_read.append(sum(r() is not None for r in self.refs))
      self.paths.append(os.path.basename(path))
      arrays = read(path)
      self.refs += [weakref.ref(x) for x in arrays.values()
                    if np.issubdtype(x.dtype, np.inexact)
                    or x.dtype == ml_dtypes.bfloat16]
      return arrays

    monkeypatch.setattr(_safetensors, 'load_safetensors', counting)


def test_from_files_streams_one_snapshot_at_a_time(tmp_path, monkeypatch):
  _save_run(tmp_path)
  reads = _Reads(monkeypatch)
  posthoc.from_files(tmp_path, [0.03, 0.08, 0.15], target_step=300)
  # Each file up to the target step read once for all three targets, in
  # order; the later ones never; no earlier snapshot alive at each read.
  assert reads.paths == [f'ema-{s:07d}-{w:.3f}.safetensors'
                         for s in STEPS[:3] for w in WIDTHS]
  assert reads.alive_at_read == [0] * 6
  gc.collect()
  assert sum(r() is not None for r in reads.refs) == 0


def test_files_that_differ_are_refused_before_any_array_is_read(
    tmp_path, monkeypatch):
  _save_run(tmp_path)
  save_file(_snapshot(300, 0.05, shapes={'net.weight': (6, 4),
                                         'net.extra': (2,)}),
            tmp_path / 'ema-0000300-0.050.safetensors')
  reads = _Reads(monkeypatch)
  with pytest.raises(ValueError, match=r'ema-0000300-0.050.safetensors does'
                     r' not hold the tensors of ema-0000100-0.050.safetensors:'
                     r' it lacks net.bias; it has net.extra besides'):
    posthoc.from_files(tmp_path, 0.08)
  assert reads.paths == []


def test_several_names_need_one_chosen(tmp_path):
  _save_run(tmp_path, name='ema')
  _save_run(tmp_path, name='my-run', steps=[100, 200])
  with pytest.raises(ValueError, match=r"2 names \['ema', 'my-run'\]; pass"
                     r' name=one of them'):
    posthoc.from_files(tmp_path, 0.08)
  got = posthoc.from_files(tmp_path, 0.08, name='my-run')
  _assert_close_to(got, _reference(0.08, out_step=200, steps=[100, 200]))
  with pytest.raises(ValueError, match="has the NAME 'other'"):
    posthoc.from_files(tmp_path, 0.08, name='other')


@pytest.mark.parametrize('files, match', [
    (['ema-100.safetensors'], r'not named NAME-STEP-SIGMA.safetensors.*'
     r'ema-100.safetensors. Rename them, e.g. ema-0001000-0.050'),
    (['ema-100-5e-2.safetensors'], 'not named NAME-STEP-SIGMA'),
    (['ema-100-0.300.safetensors'], r'The sigma_rel of ema-100-0.300'
     r'.safetensors must be in \(0, 0.2887\)'),
    (['ema-100-0.05.safetensors', 'ema-0100-0.050.safetensors'],
     r'ema-0100-0.050.safetensors and ema-100-0.05.safetensors are both the'
     ' snapshot of step 100'),
    (['ema-0-0.05.safetensors'], 'every snapshot .* is of step 0'),
])
def test_bad_file_names_are_refused(tmp_path, files, match):
  for f in files:
    save_file(_snapshot(100, 0.05), tmp_path / f)
  with pytest.raises(ValueError, match=match):
    posthoc.from_files(tmp_path, 0.08)


def test_other_files_and_step_0_are_left_out(tmp_path, monkeypatch):
  _save_run(tmp_path)
  save_file(_snapshot(100, 0.05), tmp_path / 'ema-0000000-0.050.safetensors')
  (tmp_path / 'README.txt').write_text('notes')
  (tmp_path / 'samples').mkdir()
  reads = _Reads(monkeypatch)
  got = posthoc.from_files(tmp_path, 0.08)
  assert 'ema-0000000-0.050.safetensors' not in reads.paths
  _assert_close_to(got, _reference(0.08))


def test_a_folder_with_orbax_steps_and_snapshot_files_is_refused(tmp_path,
                                                                  capsys):
  _save_run(tmp_path / 'run')
  (tmp_path / 'run' / '1000').mkdir()  # what a CheckpointManager writes
  with pytest.raises(ValueError, match=r'holds both Orbax checkpoint steps'
                     r' \(1000\) and safetensors files'):
    posthoc.from_files(tmp_path / 'run', 0.08)
  code, _, err = run_cli(capsys, tmp_path / 'run', '--sigma-rel', 0.08, '--out',
                         tmp_path / 'out')
  assert code == 1 and 'holds both Orbax checkpoint steps' in err


def test_from_files_errors_for_bad_arguments(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    posthoc.from_files(tmp_path / 'none', 0.08)
  with pytest.raises(FileNotFoundError, match=r"no NAME-STEP-SIGMA.safetensors"
                     r" file in .*; it holds nothing"):
    posthoc.from_files(tmp_path, 0.08)
  _save_run(tmp_path)
  with pytest.raises(TypeError, match='target_step must be an int'):
    posthoc.from_files(tmp_path, 0.08, target_step=200.5)
  with pytest.raises(ValueError, match='target_step 250 is not the step of'
                     ' any snapshot; the nearest earlier one is 200'):
    posthoc.from_files(tmp_path, 0.08, target_step=250)
  with pytest.raises(ValueError, match='target_sigma_rel must be in'):
    posthoc.from_files(tmp_path, 0.5)


def test_sigma_text_matches_edm2_and_tells_widths_apart():
  text = _posthoc_files.sigma_text
  assert [text(s) for s in (0.05, 0.1, 0.15)] == ['0.050', '0.100', '0.150']
  assert text(0.1234) == '0.1234' and text(0.1000001) == '0.1000001'
  for s in (0.05, 0.1234, 0.1000001, 1e-5):
    assert float(text(s)) == s and _posthoc_files._FILE_NAME.fullmatch(
        f'a-1-{text(s)}.safetensors')


# --- the command line -----------------------------------------------------------


def test_cli_writes_one_file_per_width(tmp_path, capsys):
  _save_run(tmp_path / 'run')
  # The metadata a torch save_model writes is carried over.
  path = tmp_path / 'run' / 'ema-0000400-0.050.safetensors'
  save_file(_snapshot(400, 0.05), path, metadata={'format': 'pt'})
  code, out, err = run_cli(capsys, tmp_path / 'run', '--sigma-rel', 0.08,
                           0.1234, '--out', tmp_path / 'out')
  assert code == 0, err
  names = ['ema-0000400-0.080.safetensors', 'ema-0000400-0.1234.safetensors']
  assert sorted(os.listdir(tmp_path / 'out')) == names
  assert f"sigma_rel 0.08: wrote {tmp_path / 'out' / names[0]}" in out
  want = posthoc.from_files(tmp_path / 'run', [0.08, 0.1234])
  for name, arrays in zip(names, want):
    assert_bitwise(posthoc.load_safetensors(tmp_path / 'out' / name), arrays)
  with safe_open(tmp_path / 'out' / names[0], 'np') as f:
    assert f.metadata()['format'] == 'pt'
    assert '"sigma_rel": 0.08' in f.metadata()['emax.posthoc']
  # --step, and outputs are never overwritten.
  code, out, err = run_cli(capsys, tmp_path / 'run', '--sigma-rel', 0.08,
                           '--step', 200, '--out', tmp_path / 'out')
  assert code == 0, err and 'ema-0000200-0.080.safetensors' in out
  code, _, err = run_cli(capsys, tmp_path / 'run', '--sigma-rel', 0.08,
                         '--out', tmp_path / 'out')
  assert code == 1 and 'already exists; remove it or choose another' in err


def test_cli_errors_name_the_flag(tmp_path, capsys):
  _save_run(tmp_path / 'run')
  _save_run(tmp_path / 'run', name='other', steps=[100])
  code, _, err = run_cli(capsys, tmp_path / 'run', '--sigma-rel', 0.08,
                         '--out', tmp_path / 'out')
  assert code == 1 and "pass --name one of them" in err
  code, _, err = run_cli(capsys, tmp_path / 'run', '--sigma-rel', 0.08,
                         '--out', tmp_path / 'out', '--name', 'ema',
                         '--tracked', 0.05, 0.1)
  assert code == 2 and '--tracked reads Orbax checkpoints' in err
  code, _, err = run_cli(capsys, tmp_path / 'run', '--sigma-rel', 0.08,
                         '--out', tmp_path / 'run', '--name', 'ema')
  assert code == 2 and '--out is the snapshot folder itself' in err
  code, _, err = run_cli(capsys, tmp_path / 'run', '--sigma-rel', 0.1, 0.1,
                         '--out', tmp_path / 'out', '--name', 'ema')
  assert code == 2 and '--sigma-rel lists [0.1] more than once' in err
  (tmp_path / 'file').write_text('')
  code, _, err = run_cli(capsys, tmp_path / 'run', '--sigma-rel', 0.1,
                         '--out', tmp_path / 'file', '--name', 'ema')
  assert code == 2 and 'is a file; give a folder' in err
  (tmp_path / 'empty').mkdir()
  code, _, err = run_cli(capsys, tmp_path / 'empty', '--sigma-rel', 0.1,
                         '--out', tmp_path / 'out', '--name', 'ema')
  assert code == 2 and '--name picks among safetensors snapshot files' in err


def test_cli_on_a_folder_of_neither_kind_names_both(tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  code, _, err = run_cli(capsys, tmp_path / 'empty', '--sigma-rel', 0.1,
                         '--out', tmp_path / 'out')
  err = ' '.join(err.split())
  assert code == 1 and 'No finished checkpoint in' in err, err
  assert ('DIR must hold either the checkpoints of an'
          ' orbax.checkpoint.CheckpointManager, or one safetensors file per'
          ' snapshot named NAME-STEP-SIGMA.safetensors (e.g.'
          ' ema-0001000-0.050.safetensors') in err
  assert '.pkl' not in err
  # EDM2's own snapshots are pickles: convert them first.
  edm2 = tmp_path / 'edm2'
  edm2.mkdir()
  for name in ('edm2-img512-xs-0134217-0.050.pkl',
               'edm2-img512-xs-0134217-0.100.pkl'):
    (edm2 / name).write_bytes(b'')
  code, _, err = run_cli(capsys, edm2, '--sigma-rel', 0.1, '--out',
                         tmp_path / 'out')
  err = ' '.join(err.split())
  assert code == 1 and 'NAME-STEP-SIGMA.safetensors' in err, err
  assert ('It holds .pkl files (edm2-img512-xs-0134217-0.050.pkl,'
          ' edm2-img512-xs-0134217-0.100.pkl): EDM2 pickles its snapshots,'
          ' which this command does not read; convert them to safetensors'
          ' files first, as docs/pytorch.md shows') in err
  assert not (tmp_path / 'out').exists()


def test_edm2_kimg_names_as_docs_posthoc_md_says():
  """STEP is used as written: EDM2's kimg, rounded down, moves the weights
  by what the docs say; the step in batches of 1024 gives EDM2's weights.
  """
  def edm2(nimg, sigma_rels, target):  # EDM2's own solve, in images
    return ref.solve_posthoc_coefficients(nimg, sigma_rels, nimg[-1],
                                          target)
  for interval, count, target, most, total in (
      (8 << 20, 256, 0.03, 2e-5, 1.3e-4),  # an img512 run: 2 Gi images
      (8 << 20, 256, 0.15, 2e-5, 1.3e-4),
      (1 << 20, 32, 0.03, 5.1e-4, 1.6e-3)):
    nimg = np.repeat(np.arange(1, count + 1) * interval, 2)
    sigma_rels = np.tile([0.05, 0.10], count)
    kimg = nimg // 1000
    np.testing.assert_array_equal((kimg * 1000 + 999) // 1024 * 1024, nimg)
    want = edm2(nimg, sigma_rels, target)
    got = posthoc.coefficients(kimg, sigma_rels, target)
    assert np.abs(got - want).max() < most
    assert np.abs(got - want).sum() < total
    # As docs/pytorch.md converts: the same weights but for the rounding of
    # a solve of up to 512 snapshots (far below the kimg error above).
    batches = (kimg * 1000 + 999) // 1024
    np.testing.assert_allclose(
        posthoc.coefficients(batches, sigma_rels, target), want, rtol=0,
        atol=1e-9)


def test_python_dash_m_runs_and_a_missing_safetensors_names_the_extra(
    tmp_path):
  _save_run(tmp_path / 'run', steps=[100, 200])
  done = subprocess.run(
      [sys.executable, '-m', 'emax.posthoc', str(tmp_path / 'run'),
       '--sigma-rel', '0.08', '--out', str(tmp_path / 'out'), '--quiet'],
      capture_output=True, text=True, timeout=120, env=child_env())
  assert done.returncode == 0, done.stderr[-3000:]
  assert os.listdir(tmp_path / 'out') == ['ema-0000200-0.080.safetensors']
  script = textwrap.dedent(f'''
      import sys
      sys.modules['safetensors'] = None  # as if not installed
      import emax.posthoc
      for call in (lambda: emax.posthoc.save_safetensors({{'a': 1.0}}, 'x'),
                   lambda: emax.posthoc.from_files({str(tmp_path / 'run')!r},
                                                   0.1)):
        try:
          call()
        except ImportError as e:
          print(e)
      ''')
  done = subprocess.run([sys.executable, '-c', script], capture_output=True,
                        text=True, timeout=120, env=child_env())
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.strip().splitlines()
  assert len(lines) == 2 and all(
      'pip install "emax[safetensors]"' in line for line in lines), lines
