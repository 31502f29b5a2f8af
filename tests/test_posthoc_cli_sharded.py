"""``python -m emax.posthoc --mesh ... --shard ...``: the command line, sharded.

In-process on this process's 8 CPU devices (tests/conftest.py): the outputs
of a 2x4 mesh run, each leaf restored with the sharding its ``--shard`` rule
gave, against the float64 EDM2 reference (tests/reference_posthoc.py), the
host run of the same command and the Python API with ``sharding=``; every
error of the sharded flags; and one run of the command by two
``jax.distributed`` processes of four devices each (the launcher of
examples/multiprocess.py starting this file as its workers).

Run as a script (``--process-id ...``), this file is one such worker.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import emax
import emax.checkpoint
import emax.posthoc

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from helpers import load_example  # noqa: E402
from helpers import run_cli  # noqa: E402
from helpers import worker_args  # noqa: E402
# The run of sharded params and its EDM2 reference, shared with the tests of
# the Python API.
from test_sharded_checkpoints import (
    DECAYS, SHAPES, U, _edm2, _mesh, _shardings, _train_and_save)

HERE = pathlib.Path(__file__)
ROOT = HERE.parents[1]
# SPECS as --shard rules: an empty entry is None; one rule for two leaves.
RULES = ['w1=data,model', 'w2=model,data', 'b=model', 'e=,data']
MESH = 'data=2,model=4'
TARGETS = (0.08, 0.2)


def _restore(out_dir, target_sigma_rel, step, target=None):
  """One output of the command, as docs/posthoc.md restores it."""
  path = os.path.abspath(
      os.path.join(out_dir, f'sigma_rel_{target_sigma_rel:.3f}'))
  with ocp.CheckpointManager(path) as manager:
    return manager.restore(step, args=ocp.args.StandardRestore(target))


def _like(shardings):
  return {k: jax.ShapeDtypeStruct(SHAPES[k], jnp.float32, sharding=s)
          for k, s in shardings.items()}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  directory = tmp_path_factory.mktemp('cli_sharded') / 'run'
  params, snapshots = _train_and_save(directory, _mesh(), steps=40)
  return directory, params, snapshots


@pytest.fixture(scope='module')
def sharded(run, tmp_path_factory):
  """The outputs of the command on a 2x4 mesh, and of the host command."""
  directory = run[0]
  out = tmp_path_factory.mktemp('cli_sharded_out')
  for name, extra in (('sharded', ['--mesh', MESH, '--shard', *RULES]),
                      ('host', [])):
    code = emax.posthoc.main([str(directory), '--sigma-rel',
                              *map(str, TARGETS), '--out', str(out / name),
                              '--quiet', *extra])
    assert code == 0
  return out


def test_each_leaf_restores_with_its_rule_s_sharding_within_the_bound(
    run, sharded):
  directory, _, snapshots = run
  shardings = _shardings(_mesh())
  api = emax.posthoc.from_checkpoints(directory, list(TARGETS),
                                      sharding=shardings)
  for target, from_api in zip(TARGETS, api):
    saved_as = _restore(sharded / 'sharded', target, 40)  # saved shardings
    got = _restore(sharded / 'sharded', target, 40, target=_like(shardings))
    host = _restore(sharded / 'host', target, 40)
    want, bound = _edm2(snapshots, target)
    for k in SHAPES:
      assert saved_as[k].sharding.is_equivalent_to(shardings[k],
                                                    len(SHAPES[k])), k
      assert got[k].dtype == np.float32
      x = np.asarray(got[k])
      # The command is the Python API with sharding=: the same sums.
      np.testing.assert_array_equal(x, np.asarray(from_api[k]))
      np.testing.assert_array_equal(np.asarray(saved_as[k]), x)
      # float32 sums on the devices: within (n + 3) u sum |w theta| of the
      # float64 reference (docs/scaling.md); the host run sums in float64.
      assert np.all(np.abs(x - want[k]) <= bound[k]), k
      np.testing.assert_allclose(np.asarray(host[k]), want[k], rtol=2 * U,
                                 atol=0)
      assert np.all(np.abs(x - np.asarray(host[k]))
                    <= bound[k] + 2 * U * np.abs(want[k])), k


def test_first_rule_wins_and_unmatched_leaves_are_replicated(
    run, tmp_path, capsys):
  directory = run[0]
  code, out, err = run_cli(capsys, directory, '--sigma-rel', 0.08, '--out',
                           tmp_path, '--mesh', 'data=2,model=4', '--shard',
                           'w1=model,data', '--shard', 'w.=data+model')
  assert code == 0, err
  assert f'sigma_rel 0.08: wrote {tmp_path}/sigma_rel_0.080/40' in out
  saved = _restore(tmp_path, 0.08, 40)
  mesh = _mesh()
  want = {'w1': P('model', 'data'), 'w2': P(('data', 'model')), 'b': P(),
          'e': P()}
  for k, spec in want.items():
    assert saved[k].sharding.is_equivalent_to(NamedSharding(mesh, spec),
                                              len(SHAPES[k])), k


def _small_run(directory, shape):
  """Two checkpoints of one param of ``shape``, with DECAYS recorded."""
  params = {'k': jnp.zeros(shape)}
  tx = emax.with_ema(optax.identity(), DECAYS)
  opt_state = tx.init(params)
  with ocp.CheckpointManager(directory) as manager:
    for t in (1, 2):
      updates, opt_state = tx.update({'k': jnp.ones(shape)}, opt_state, params)
      params = optax.apply_updates(params, updates)
      emax.checkpoint.save(manager, t, {'params': params,
                                        'opt_state': opt_state},
                           sigma_rels=DECAYS)


ERRORS = [  # (flags, exit code, what stderr says)
    (['--shard', 'w1=data'], 2,
     '--shard splits params over the axes of a mesh: give --mesh too'),
    (['--mesh', 'data=2,model'], 2,
     ('--mesh takes AXIS=SIZE entries joined by commas, each axis once and'
      ' each size a positive integer, e.g. --mesh data=2,model=4; got'
      " 'data=2,model'")),
    (['--mesh', 'data=0'], 2, "got 'data=0'"),
    (['--mesh', 'data=2,data=4'], 2, "got 'data=2,data=4'"),
    (['--mesh', 'data=2,model=3'], 1,
     ('--mesh data=2,model=3 lays out 6 devices, but there are 8'
      ' (jax.device_count(), over all processes). Give sizes that multiply'
      ' to 8, e.g. --mesh data=8.')),
    (['--mesh', MESH, '--shard', 'w1'], 2,
     "--shard takes REGEX=SPEC, e.g. --shard '.*kernel=data,model', got 'w1'"),
    (['--mesh', MESH, '--shard', '(w1=data'], 2,
     "--shard '(w1=data': '(w1' is no regular expression"),
    (['--mesh', MESH, '--shard', 'w1=data-x'], 2,
     ('SPEC lists one entry per dimension, each a mesh axis, axes joined by'
      " + (data+model), or None; got 'data-x'")),
    (['--mesh', MESH, '--shard', 'w1=data,fsdp'], 2,
     ("--shard 'w1=data,fsdp' names ['fsdp'], which --mesh does not have;"
      " its axes are ['data', 'model']")),
    (['--mesh', MESH, '--shard', 'w1=data,data'], 2,
     "--shard 'w1=data,data' uses ['data'] for two dimensions"),
    (['--mesh', MESH, '--shard', 'w1=data', '.*kernel=model'], 1,
     ("--shard '.*kernel=model' matches no param; the averaged params are"
      ' (path shape): b (128,), e (32, 64), w1 (64, 128), w2 (128, 64). A'
      " REGEX must match a whole path, e.g. '.*kernel'; params outside the"
      " average's mask (mask=) are not averaged")),
    (['--mesh', MESH, '--shard', 'b=data,model'], 1,
     ("--shard 'b=data,model' matches b (shape (128,)) but gives 2"
      " dimensions, P('data', 'model'), and it has 1. Give at most 1, or a"
      ' regex that leaves it out.')),
    (['--distributed'], 2, '--distributed needs --mesh'),
    (['--process-id', '1', '--num-processes', '2'], 2,
     ('--num-processes, --process-id configure jax.distributed: add'
      ' --distributed.')),
    (['--mesh', MESH, '--distributed'], 1,  # JAX ran in this process
     ('--distributed: jax.distributed.initialize() must be called before',
      'Run the command in a fresh process.')),
]


@pytest.mark.parametrize('flags, code, message', ERRORS)
def test_errors_say_what_to_give(run, tmp_path, capsys, flags, code,
                                 message):
  got, out, err = run_cli(capsys, run[0], '--sigma-rel', 0.08, '--out',
                          tmp_path, *flags)
  assert (got, out) == (code, ''), err
  for part in (message,) if isinstance(message, str) else message:
    assert part in ' '.join(err.split()), err
  assert not list(tmp_path.iterdir())  # nothing written


def test_a_dimension_the_mesh_does_not_divide_is_named(tmp_path, capsys):
  _small_run(tmp_path / 'run', (6, 4))
  code, _, err = run_cli(capsys, tmp_path / 'run', '--sigma-rel', 0.08,
                         '--out', tmp_path / 'out', '--mesh', 'data=4,model=2',
                         '--shard', 'k=data')
  assert code == 1
  assert ("--shard 'k=data' splits dimension 0 of k (shape (6, 4)) 4 ways"
          ' (over data), and 6 is not divisible by 4. Choose axes whose'
          ' sizes divide it, or None for that dimension.') in ' '.join(
              err.split())


def test_sharded_flags_refuse_safetensors_snapshots(tmp_path, capsys):
  pytest.importorskip('safetensors')
  emax.posthoc.save_safetensors({'w': np.zeros(2, np.float32)},
                                tmp_path / 'ema-0000010-0.050.safetensors')
  code, _, err = run_cli(capsys, tmp_path, '--sigma-rel', 0.05, '--out',
                         tmp_path / 'out', '--mesh', 'data=8', '--distributed')
  assert code == 2
  assert '--mesh, --distributed read Orbax checkpoints' in err


def test_distributed_outside_a_cluster_says_which_flags_to_give(tmp_path):
  env = {k: v for k, v in os.environ.items()  # no cluster to detect
         if not k.startswith(('JAX_COORDINATOR', 'SLURM_', 'OMPI_',
                              'KUBERNETES_', 'TPU_'))}
  env['JAX_PLATFORMS'] = 'cpu'
  _small_run(tmp_path / 'run', (2,))  # checkpoints are found before it fails
  result = subprocess.run(
      [sys.executable, '-m', 'emax.posthoc', str(tmp_path / 'run'),
       '--sigma-rel', '0.08', '--out', str(tmp_path / 'out'), '--mesh',
       'data=1', '--distributed'], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=120, check=False)
  assert result.returncode == 1, result.stderr
  assert ('--distributed: jax.distributed.initialize() failed'
          ' (coordinator_address should be defined.). Outside a cluster it'
          ' detects (SLURM, Open MPI, Cloud TPU, Kubernetes), give'
          ' --coordinator-address HOST:PORT (or set JAX_COORDINATOR_ADDRESS),'
          ' --num-processes N and --process-id I') in ' '.join(
              result.stderr.split())


# --- two processes -----------------------------------------------------------


def worker(args):
  """One process of the job: the command line, as every process runs it.

  The coordinator comes from JAX_COORDINATOR_ADDRESS (as a cluster would set
  it), the process count and id from the flags.
  """
  os.environ['JAX_COORDINATOR_ADDRESS'] = args.coordinator
  return emax.posthoc.main([
      os.path.join(args.out, 'run'), '--sigma-rel', *map(str, TARGETS),
      '--out', os.path.join(args.out, 'sharded'), '--mesh', MESH,
      '--shard', *RULES, '--distributed', '--num-processes',
      str(args.num_processes), '--process-id', str(args.process_id)])


def test_two_processes_run_the_command_under_jax_distributed(
    run, sharded, tmp_path):
  directory = run[0]
  shutil.copytree(directory, tmp_path / 'run')
  load_example('multiprocess').launch(num_processes=2, devices=4,
                                      out=str(tmp_path), timeout=60,
                                      script=HERE)
  shardings = _shardings(_mesh())
  for target in TARGETS:
    saved = tmp_path / 'sharded' / f'sigma_rel_{target:.3f}' / '40' / 'default'
    assert sorted(p.name for p in saved.glob('ocdbt.process_*')) == [
        'ocdbt.process_0', 'ocdbt.process_1']  # each wrote its own shards
    got = _restore(tmp_path / 'sharded', target, 40,
                   target=_like(shardings))
    one_process = _restore(sharded / 'sharded', target, 40,
                           target=_like(shardings))
    for k in SHAPES:  # the same sums, shard by shard, as on one process
      np.testing.assert_array_equal(np.asarray(got[k]),
                                    np.asarray(one_process[k]))
  logs = [(tmp_path / f'process_{i}.log').read_text() for i in (0, 1)]
  assert (f'sigma_rel 0.2: wrote {tmp_path}/sharded/sigma_rel_0.200/40'
          in logs[0])
  progress = ('ckpt', 'checkpoint 1/')  # tqdm's bar, or the plain lines
  assert any(p in logs[0] for p in progress), logs[0]
  assert not any(p in logs[1] for p in progress + ('wrote',)), logs[1]


if __name__ == '__main__':
  sys.exit(worker(worker_args()))
