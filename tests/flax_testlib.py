"""A tiny linen CNN with BatchNorm and Dropout, data, and a donated train step.

Shared by tests/test_flax.py, tests/test_flax_serialization.py and
tests/test_checkpoint.py; DenseBN and its step are the smallest model with
batch statistics. Run as a script it is the "new process" of the checkpoint
resume test:

  python tests/flax_testlib.py resume CKPT_DIR RESTORE_STEP END_STEP OUT.npz
"""

import os
import sys

if __name__ == '__main__':
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import emax  # noqa: E402
import emax.flax  # noqa: E402

DECAY = 0.5  # large steps of the average, so it clearly differs from params
NUM_CLASSES = 3


class CNN(nn.Module):
  """Conv -> BatchNorm -> relu -> pool -> Dropout -> Dense."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    x = nn.Dropout(0.25, deterministic=not train)(x)
    return nn.Dense(NUM_CLASSES)(x)


MODEL = CNN()


class DenseBN(nn.Module):
  """Dense -> BatchNorm: the smallest model with batch statistics."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(3)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)


@jax.jit
def dense_bn_step(state, x):
  """One step of a DenseBN train state on ``mean(out ** 2 + out)``, with its
  batch statistics updated."""
  def loss_fn(params):
    out, updated = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
        mutable=['batch_stats'])
    return jnp.mean(out ** 2 + out), updated['batch_stats']
  grads, batch_stats = jax.grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats)


def data(num_batches=4, batch=8):
  """Deterministic images (num_batches, batch, 6, 6, 1) and labels."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(num_batches, batch, 6, 6, 1)).astype(np.float32)
  x += np.arange(num_batches, dtype=np.float32)[:, None, None, None, None]
  y = rng.integers(0, NUM_CLASSES, size=(num_batches, batch)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def init_variables():
  x, _ = data()
  return MODEL.init(jax.random.key(0), x[0], train=False)


def make_state(ema=None, policy='average', tx=None):
  variables = init_variables()
  ema = emax.ema(DECAY) if ema is None else ema
  return emax.flax.EmaTrainState.create(
      apply_fn=MODEL.apply, params=variables['params'],
      tx=optax.sgd(0.1, momentum=0.9) if tx is None else tx, ema=ema,
      batch_stats=variables['batch_stats'], batch_stats_policy=policy)


def train_step(state, x, y):
  """One step; dropout's key is derived from the step, so resumes agree."""
  key = jax.random.fold_in(jax.random.key(1), state.step)

  def loss_fn(params):
    logits, updated = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
        mutable=['batch_stats'], rngs={'dropout': key})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updated['batch_stats']

  grads, batch_stats = jax.grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats)


STEP = jax.jit(train_step, donate_argnums=0)


def run(state, start, end):
  """Steps ``start`` .. ``end - 1`` on batch ``step % num_batches``."""
  x, y = data()
  for i in range(start, end):
    b = i % x.shape[0]
    state = STEP(state, x[b], y[b])
  return state


def flat(state):
  """Everything a resume must reproduce, as host numpy arrays by path."""
  ema_state = emax.get_ema_state(state.opt_state)
  tree = {
      'step': state.step,
      'params': state.params,
      'opt_state': state.opt_state,
      'batch_stats': state.batch_stats,
      'batch_stats_ema': state.batch_stats_ema,
      'count': ema_state.count,
      'weight': ema_state.weight,
  }
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _resume(ckpt_dir, restore_step, end_step, out):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import emax.checkpoint  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_numpy_dtype_promotion', 'strict')
  template = make_state()
  with ocp.CheckpointManager(ckpt_dir) as manager:
    state = emax.checkpoint.restore(manager, template, step=restore_step)
  assert isinstance(emax.get_ema_state(state.opt_state), emax.EmaState)
  state = run(state, restore_step, end_step)
  np.savez(out, **flat(state))


if __name__ == '__main__':
  _, mode, ckpt, restore_at, end_at, out_path = sys.argv
  assert mode == 'resume', mode
  _resume(ckpt, int(restore_at), int(end_at), out_path)
