"""Multi-process training with emax: jax.distributed on CPU, Orbax checkpoints.

Run it plainly and it starts its own workers on this machine (loopback only):

    python examples/multiprocess.py [--num-processes 2] [--devices 4]
        [--steps 4] [--out DIR] [--timeout 180]

Each worker is one JAX process with ``--devices`` CPU devices (fake ones, via
``XLA_FLAGS``) and CPU collectives over gloo. Together they form one mesh,
``('data', 'model')`` of shape ``(num_processes, devices)``, so the ``data``
axis spans the processes. They train a tiny MLP whose params are fully
sharded over both axes, with ``emax.ema`` chained after SGD, save the params
and the optax state (average included) with ``emax.checkpoint.save`` from
every process into ``DIR/checkpoint`` (a previous run's is replaced), restore
them into ``emax.checkpoint.abstract_state`` of the state, check the restored
state equals the saved one, take one more step, and write the gathered
averages to ``DIR/process_<i>.npz``. Without ``--out`` everything goes to a
temporary directory that is removed at the end.

On a real cluster start one worker per host yourself:

    python examples/multiprocess.py --process-id $RANK \
        --num-processes $WORLD --coordinator $HOST0:1234 --out /shared/dir

(drop ``--devices`` on GPUs/TPUs, and the gloo setting is for CPUs only).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

IN_DIM, HIDDEN, BATCH = 8, 16, 16
DECAY, LR = 0.8, 0.1


def _data(step: int):
  """The global batch of one step (the same on every process)."""
  rng = np.random.default_rng(1000 + step)
  x = rng.standard_normal((BATCH, IN_DIM)).astype(np.float32)
  y = np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)
  return x, y


def _init_params():
  rng = np.random.default_rng(0)
  return {
      'w1': (0.3 * rng.standard_normal((IN_DIM, HIDDEN))).astype(np.float32),
      'b1': np.zeros((HIDDEN,), np.float32),
      'w2': (0.3 * rng.standard_normal((HIDDEN, 1))).astype(np.float32),
  }


def _specs():
  from jax.sharding import PartitionSpec as P
  # FSDP-style: each weight sharded over both mesh axes.
  return {'w1': P('data', 'model'), 'b1': P('model'), 'w2': P('model', None)}


def make_mesh(num_processes: int):
  """A ``('data', 'model')`` mesh whose ``data`` axis spans the processes."""
  import jax
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  per_process = len(devices) // num_processes
  return jax.make_mesh(
      (num_processes, per_process), ('data', 'model'),
      axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def _global(mesh, host_value, spec):
  """A global array from a value every process holds in full."""
  import jax
  sharding = jax.sharding.NamedSharding(mesh, spec)
  return jax.make_array_from_callback(
      host_value.shape, sharding, lambda index: host_value[index])


def train(mesh, steps: int, checkpoint_dir: str | None = None):
  """Trains ``steps`` steps on ``mesh``; returns the gathered results.

  With ``checkpoint_dir``, saves params and optax state with Orbax after
  ``steps - 1`` steps (from every process), restores them into a fresh
  target, checks they round-trip, and takes the last step from the restored
  state. Returns numpy arrays every process agrees on.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P

  import emax

  specs = _specs()
  params = {k: _global(mesh, v, specs[k]) for k, v in _init_params().items()}
  tx = optax.chain(optax.sgd(LR), emax.ema(DECAY, debias=True))
  opt_state = tx.init(params)

  def loss_fn(p, x, y):
    h = jnp.tanh(x @ p['w1'] + p['b1'])
    return jnp.mean((h @ p['w2'] - y) ** 2)

  @jax.jit
  def train_step(p, s, x, y):
    grads = jax.grad(loss_fn)(p, x, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  def batch(step):
    x, y = _data(step)
    return _global(mesh, x, P('data', None)), _global(mesh, y, P('data', None))

  for step in range(steps):
    if checkpoint_dir is not None and step == steps - 1:
      params, opt_state = _checkpoint_round_trip(
          checkpoint_dir, step, params, opt_state)
    params, opt_state = train_step(params, opt_state, *batch(step))

  ema = emax.ema_params(opt_state)
  state = emax.get_ema_state(opt_state)
  for name, leaf in ema.items():  # the average keeps the params' sharding
    want = NamedSharding(mesh, specs[name])
    if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
      raise AssertionError(f'ema[{name!r}] sharding {leaf.sharding}')
  gather = multihost_utils.process_allgather
  out = {f'ema/{k}': gather(v, tiled=True) for k, v in ema.items()}
  out.update({f'params/{k}': gather(v, tiled=True)
              for k, v in params.items()})
  out['count'] = gather(state.count, tiled=True)
  out['weight'] = gather(state.weight, tiled=True)
  return {k: np.asarray(v) for k, v in out.items()}


def _checkpoint_round_trip(directory, step, params, opt_state):
  """Saves with Orbax from every process, restores into a typed target.

  ``emax.checkpoint.save`` returns once the checkpoint is committed (every
  process wrote its shards, and the step directory has its final name). The
  restore target is ``emax.checkpoint.abstract_state`` of the state: each
  array's shape, dtype and sharding, and the optax and emax state types.
  """
  import jax
  import orbax.checkpoint as ocp

  import emax.checkpoint

  state = {'params': params, 'opt_state': opt_state}
  path = os.path.join(os.path.abspath(directory), 'checkpoint')
  with ocp.CheckpointManager(path) as manager:
    if not emax.checkpoint.save(manager, step, state):
      raise RuntimeError(
          f'{path} already holds step {manager.latest_step()}: start from a'
          ' directory without a checkpoint folder.')
    target = emax.checkpoint.abstract_state(state)
    restored = emax.checkpoint.restore(manager, target, step=step)
  if jax.tree.structure(restored) != jax.tree.structure(state):
    raise AssertionError('the restored state has another structure')
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    if a.sharding != b.sharding:
      raise AssertionError(f'restored sharding {b.sharding} != {a.sharding}')
    for sa, sb in zip(a.addressable_shards, b.addressable_shards):
      np.testing.assert_array_equal(np.asarray(sa.data), np.asarray(sb.data))
  return restored['params'], restored['opt_state']


def worker(args) -> None:
  """One process of the job: initialise jax.distributed, train, write."""
  if args.devices:
    os.environ['XLA_FLAGS'] = (
        f'--xla_force_host_platform_device_count={args.devices}')
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax
  if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.config.update('jax_numpy_dtype_promotion', 'strict')
  jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      initialization_timeout=args.timeout,
      heartbeat_timeout_seconds=max(10, args.timeout // 2),
      shutdown_timeout_seconds=max(10, args.timeout // 2))
  try:
    mesh = make_mesh(args.num_processes)
    result = train(mesh, args.steps, checkpoint_dir=args.out)
    result['process_index'] = np.asarray(jax.process_index())
    result['num_devices'] = np.asarray(jax.device_count())
    result['num_local_devices'] = np.asarray(jax.local_device_count())
    path = os.path.join(args.out, f'process_{args.process_id}.npz')
    np.savez(path + '.tmp.npz', **result)
    os.replace(path + '.tmp.npz', path)
  finally:
    jax.distributed.shutdown()


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(num_processes: int = 2, devices: int = 4, steps: int = 4, *,
           out: str, timeout: float = 180.0,
           script: str | os.PathLike | None = None) -> list[str]:
  """Starts the workers on localhost, waits, and returns their result files.

  The workers write their results, logs and the checkpoint under ``out`` (a
  checkpoint there from an earlier run is removed first); nothing goes to the
  system's temporary folder.

  ``script`` is the worker to start, this file by default; another script
  gets the same arguments (``--process-id``, ``--num-processes``,
  ``--coordinator``, ``--devices``, ``--steps``, ``--out``, ``--timeout``),
  and ``XLA_FLAGS`` and ``JAX_PLATFORMS`` that give it ``devices`` CPUs.

  Raises:
    RuntimeError: if a worker fails or the job outlives ``timeout`` seconds;
      every worker still running is killed first, and the logs are quoted.
  """
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  shutil.rmtree(os.path.join(out, 'checkpoint'), ignore_errors=True)
  coordinator = f'127.0.0.1:{free_port()}'
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  procs, logs = [], []
  try:
    for i in range(num_processes):
      log = open(os.path.join(out, f'process_{i}.log'), 'w')
      logs.append(log)
      cmd = [sys.executable, os.path.abspath(script or __file__),
             '--process-id', str(i),
             '--num-processes', str(num_processes), '--coordinator',
             coordinator, '--devices', str(devices), '--steps', str(steps),
             '--out', out, '--timeout', str(int(timeout))]
      procs.append(subprocess.Popen(cmd, env=env, stdout=log,
                                    stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    timed_out = False
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break  # one failed: the others would wait for it forever
      if time.monotonic() > deadline:
        timed_out = True
        break
      time.sleep(0.2)
    codes = [p.poll() for p in procs]
  finally:
    for p in procs:  # never leave a worker behind
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  if any(c != 0 for c in codes):
    tails = []
    for i in range(num_processes):
      with open(os.path.join(out, f'process_{i}.log')) as f:
        tails.append(f'--- process {i} (exit {codes[i]}) ---\n'
                     + f.read()[-3000:])
    what = f'timed out after {timeout} s' if timed_out else 'failed'
    raise RuntimeError(f'multi-process job {what}; exit codes {codes}.\n'
                       + '\n'.join(tails))
  return [os.path.join(out, f'process_{i}.npz') for i in range(num_processes)]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num-processes', type=int, default=2)
  parser.add_argument('--devices', type=int, default=4,
                      help='CPU devices per process (0: the real devices)')
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--out', default=None,
                      help='folder for the results and the checkpoint'
                      ' (default: a temporary one, removed at the end)')
  parser.add_argument('--timeout', type=int, default=180)
  parser.add_argument('--process-id', type=int, default=None,
                      help='run as this worker instead of launching workers')
  parser.add_argument('--coordinator', default=None,
                      help='host:port of process 0 (workers only)')
  args = parser.parse_args(argv)
  if args.process_id is not None:
    if args.coordinator is None or args.out is None:
      parser.error('a worker needs --coordinator and --out')
    worker(args)
    return None
  if args.out is not None:
    return _run_and_report(args, args.out)
  with tempfile.TemporaryDirectory(prefix='emax_multiprocess_') as out:
    return _run_and_report(args, out)


def _run_and_report(args, out):
  """Launches the job into ``out``, prints a summary, returns the results."""
  files = launch(args.num_processes, args.devices, args.steps, out=out,
                 timeout=args.timeout)
  results = []
  for f in files:
    with np.load(f) as npz:
      results.append(dict(npz))
  for key in sorted(results[0]):
    if key.startswith('ema/') and not all(
        np.array_equal(results[0][key], r[key]) for r in results[1:]):
      raise SystemExit(f'processes disagree on {key}')
  print(f'{args.num_processes} processes x {results[0]["num_local_devices"]}'
        f' devices, {args.steps} steps: averages agree across processes.')
  for key in sorted(k for k in results[0] if k.startswith('ema/')):
    print(f'  {key}: shape {results[0][key].shape},'
          f' mean {results[0][key].mean():+.6f}')
  if args.out is not None:
    print(f'results in {out}')
  return results


if __name__ == '__main__':
  main()
