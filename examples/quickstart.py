"""A small optax training run that prints raw and EMA results.

Fits a linear classifier with noisy SGD on a synthetic two-class problem and
compares the test loss of the raw weights with that of their moving average.

    python examples/quickstart.py [--steps 300] [--decay 0.98]
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import emax


def make_data(key, n):
  k1, k2 = jax.random.split(key)
  x = jax.random.normal(k1, (n, 16))
  w_true = jnp.linspace(-1.0, 1.0, 16)
  logits = x @ w_true
  y = (jax.random.uniform(k2, (n,)) < jax.nn.sigmoid(logits)).astype(
      jnp.float32)
  return x, y


def loss_fn(params, x, y):
  logits = x @ params['w'] + params['b']
  return optax.sigmoid_binary_cross_entropy(logits, y).mean()


def accuracy(params, x, y):
  pred = (x @ params['w'] + params['b']) > 0
  return jnp.mean(pred == (y > 0.5))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--decay', type=float, default=0.98)
  parser.add_argument('--lr', type=float, default=0.5)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)

  key = jax.random.key(args.seed)
  k_train, k_test, k_init = jax.random.split(key, 3)
  x_train, y_train = make_data(k_train, 4096)
  x_test, y_test = make_data(k_test, 4096)
  params = {'w': 0.01 * jax.random.normal(k_init, (16,)), 'b': jnp.zeros(())}

  tx = optax.chain(optax.sgd(args.lr), emax.ema(emax.tf_decay(args.decay)))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, key):
    idx = jax.random.randint(key, (8,), 0, x_train.shape[0])  # tiny batches
    grads = jax.grad(loss_fn)(params, x_train[idx], y_train[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def evaluate(params):
    return loss_fn(params, x_test, y_test), accuracy(params, x_test, y_test)

  keys = jax.random.split(jax.random.key(args.seed + 1), args.steps)
  for i in range(args.steps):
    params, opt_state = train_step(params, opt_state, keys[i])

  raw_loss, raw_acc = evaluate(params)
  ema_loss, ema_acc = evaluate(emax.ema_params(opt_state))
  print(f'after {args.steps} steps of SGD (batch 8, lr {args.lr}),'
        f' tf_decay({args.decay}):')
  print(f'  raw weights: test loss {float(raw_loss):.4f}  accuracy'
        f' {float(raw_acc):.4f}')
  print(f'  EMA weights: test loss {float(ema_loss):.4f}  accuracy'
        f' {float(ema_acc):.4f}')
  return {'raw_loss': float(raw_loss), 'ema_loss': float(ema_loss),
          'raw_acc': float(raw_acc), 'ema_acc': float(ema_acc)}


if __name__ == '__main__':
  main()
