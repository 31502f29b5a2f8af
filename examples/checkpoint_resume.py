"""Save a run with Orbax, stop, restore it in a fresh process, and continue.

Trains a small Flax MLP on scikit-learn's digits with an
``emax.flax.EmaTrainState`` three ways:

1. uninterrupted for ``--steps`` steps (the reference);
2. for ``--stop-at`` steps, then saved to disk with Orbax and dropped;
3. in a new Python process (or, with ``--same-process``, here from disk
   alone): restored from the checkpoint into a target built from scratch,
   and trained on to ``--steps``.

It prints whether the resumed run equals the uninterrupted one: raw weights,
optimizer state, step and the moving average (its ``count`` and ``weight``
too). They match to the bit, because the average lives in ``opt_state`` and
the batch order and dropout keys come from the step number.

    python examples/checkpoint_resume.py [--steps 200] [--stop-at 120]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from sklearn.datasets import load_digits

import emax
import emax.checkpoint
from emax.flax import EmaTrainState

BATCH = 32


class MLP(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(10)(x)


def load_data():
  digits = load_digits()
  x = jnp.asarray((digits.data / 16.0).astype(np.float32))
  y = jnp.asarray(digits.target.astype(np.int32))
  return x, y


def make_create_state(args):
  """A jitted ``key -> EmaTrainState`` at step 0, the same for the same flags.

  The model and optimizer are built once, so every state it makes has the
  same static parts and ``train_step`` compiles once.
  """
  model = MLP()
  tx = optax.sgd(args.lr, momentum=0.9)
  ema = emax.ema(emax.tf_decay(args.decay))

  @jax.jit
  def create_state(key):
    params = model.init(key, jnp.zeros((1, 64)), train=False)['params']
    return EmaTrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                ema=ema)

  return create_state


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state, key, x, y):
  """One step; the batch and dropout key come from ``state.step``."""
  key = jax.random.fold_in(key, state.step)
  batch_key, dropout_key = jax.random.split(key)
  idx = jax.random.randint(batch_key, (BATCH,), 0, x.shape[0])

  def loss_fn(params):
    logits = state.apply_fn({'params': params}, x[idx], train=True,
                            rngs={'dropout': dropout_key})
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, y[idx]).mean()

  grads = jax.grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads)


def train(state, until: int, args, data):
  key = jax.random.key(args.seed + 1)
  while int(state.step) < until:
    state = train_step(state, key, *data)
  return state


def manager_for(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=3))


def resume(args, data, create_state) -> EmaTrainState:
  """Phase 3: restore from disk into a freshly built target and go on."""
  manager = manager_for(args.ckpt_dir)
  # The target: the shapes, dtypes and types of a state built from scratch
  # (jax.eval_shape makes no arrays). Without it Orbax would hand back plain
  # dicts instead of an EmaTrainState holding an emax.EmaState.
  target = jax.eval_shape(create_state, jax.random.key(args.seed))
  state = emax.checkpoint.restore(manager, target, step=args.stop_at)
  print(f'restored step {int(state.step)} from {args.ckpt_dir}; the average'
        f' has seen {int(emax.get_ema_state(state.opt_state).count)} steps')
  state = train(state, args.steps, args, data)
  emax.checkpoint.save(manager, args.steps, state)
  manager.wait_until_finished()
  manager.close()
  return state


def _max_diff(a, b) -> float:
  diffs = [float(jnp.max(jnp.abs(x - y))) if x.size else 0.0
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return max(diffs, default=0.0)


def compare(reference: EmaTrainState, resumed: EmaTrainState) -> dict:
  """Bitwise comparison of the two runs, part by part."""
  ref_ema = emax.get_ema_state(reference.opt_state)
  res_ema = emax.get_ema_state(resumed.opt_state)
  parts = {
      'step': (reference.step, resumed.step),
      'params': (reference.params, resumed.params),
      'opt_state': (reference.opt_state, resumed.opt_state),
      'ema_params': (reference.ema_params, resumed.ema_params),
      'ema count and weight': ((ref_ema.count, ref_ema.weight),
                               (res_ema.count, res_ema.weight)),
  }
  result = {}
  for name, (a, b) in parts.items():
    same_tree = jax.tree.structure(a) == jax.tree.structure(b)
    equal = same_tree and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    result[name] = equal
    detail = '' if equal or not same_tree else (
        f' (max abs difference {_max_diff(a, b):.3g})')
    print(f'  {name:<22} {"equal" if equal else "DIFFERENT"}{detail}')
  return result


def evaluate(state, data) -> tuple[float, float]:
  x, y = data

  @jax.jit
  def accuracy(variables):
    logits = state.apply_fn(variables, x, train=False)
    return jnp.mean(jnp.argmax(logits, -1) == y)

  return (float(accuracy({'params': state.params})),
          float(accuracy(state.eval_variables())))


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--steps', type=int, default=200,
                      help='total training steps')
  parser.add_argument('--stop-at', type=int, default=120,
                      help='the step at which the interrupted run is saved')
  parser.add_argument('--decay', type=float, default=0.99,
                      help='EMA decay ceiling of emax.tf_decay')
  parser.add_argument('--lr', type=float, default=0.05,
                      help='SGD learning rate (momentum 0.9)')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the init, batches and dropout')
  parser.add_argument('--ckpt-dir', default=None,
                      help='checkpoint folder; None: a temporary one,'
                      ' deleted at the end')
  parser.add_argument('--same-process', action='store_true',
                      help='restore in this process (still from disk, into a'
                      ' new target) instead of a fresh Python process')
  parser.add_argument('--phase', choices=('all', 'resume'), default='all',
                      help=argparse.SUPPRESS)  # 'resume': the child process
  args = parser.parse_args(argv)
  if not 0 < args.stop_at < args.steps:
    parser.error(f'need 0 < --stop-at < --steps, got --stop-at'
                 f' {args.stop_at} and --steps {args.steps}.')
  if args.phase == 'resume' and args.ckpt_dir is None:
    parser.error('--phase resume needs --ckpt-dir.')
  return args


def main(argv=None) -> dict:
  """Runs the three phases; returns what matched and the accuracies."""
  args = parse_args(argv)
  data = load_data()
  create_state = make_create_state(args)
  if args.phase == 'resume':
    resume(args, data, create_state)
    return {}

  temporary = args.ckpt_dir is None
  if temporary:
    args.ckpt_dir = tempfile.mkdtemp(prefix='emax_ckpt_')
  key = jax.random.key(args.seed)
  try:
    print(f'1. uninterrupted: {args.steps} steps')
    reference = train(create_state(key), args.steps, args, data)

    print(f'2. interrupted: {args.stop_at} steps, saved to {args.ckpt_dir}')
    state = train(create_state(key), args.stop_at, args, data)
    manager = manager_for(args.ckpt_dir)
    emax.checkpoint.save(manager, args.stop_at, state)
    manager.wait_until_finished()
    manager.close()
    del state  # nothing of the interrupted run stays in memory

    if args.same_process:
      print(f'3. resumed in this process, from disk, to step {args.steps}')
      resumed = resume(args, data, create_state)
    else:
      print(f'3. resumed in a fresh process, to step {args.steps}')
      child = [sys.executable, os.path.abspath(__file__), '--phase', 'resume',
               '--ckpt-dir', args.ckpt_dir, '--steps', str(args.steps),
               '--stop-at', str(args.stop_at), '--decay', str(args.decay),
               '--lr', str(args.lr), '--seed', str(args.seed)]
      proc = subprocess.run(child, capture_output=True, text=True)
      print(proc.stdout, end='')
      if proc.returncode:
        raise RuntimeError(f'the resumed process failed:\n{proc.stderr}')
      # The child saved its final state; read it back to compare.
      manager = manager_for(args.ckpt_dir)
      target = jax.eval_shape(create_state, key)
      resumed = emax.checkpoint.restore(manager, target, step=args.steps)
      manager.close()

    print('resumed run vs uninterrupted run:')
    result = compare(reference, resumed)
    equal = all(result.values())
    raw_acc, ema_acc = evaluate(resumed, data)
    if equal:
      print('The resumed run equals the uninterrupted one, bit for bit: the'
            ' average survived the restart.')
    else:
      print('The resumed run DIFFERS from the uninterrupted one.')
    print(f'accuracy on the 1797 digits it trained on, step {args.steps}: raw'
          f' {raw_acc:.4f}, EMA {ema_acc:.4f}')
    return {'equal': equal, 'parts': result, 'raw_acc': raw_acc,
            'ema_acc': ema_acc, 'step': int(resumed.step),
            'reference': reference, 'resumed': resumed}
  finally:
    if temporary:
      shutil.rmtree(args.ckpt_dir, ignore_errors=True)


if __name__ == '__main__':
  main()
