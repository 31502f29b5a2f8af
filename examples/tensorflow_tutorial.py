"""The classic tf.train.ExponentialMovingAverage walkthrough, with emax.

TensorFlow 1 tutorials taught the moving average with one variable ``v1``, a
step counter and ``tf.train.ExponentialMovingAverage(0.99, num_updates=step)``,
printing ``[v1, ema.average(v1)]`` after each change. This script replays
those walkthroughs with emax's pure API (``emax.init``, ``emax.update``,
``emax.tf_decay``) in float32 and prints what TensorFlow printed:

    [0.0, 0.0]  [5.0, 4.5]  [10.0, 4.555]  [10.0, 4.60945]

The decay is ``min(0.99, (1 + step) / (10 + step))``: 0.1 at step 0, 0.99 at
step 10000, and ``101 / 110`` at step 100 (the second walkthrough). A last
section trains ``w`` on the loss ``(w + 1) ** 2`` from ``w = 5`` with plain
SGD and with an exponentially decaying learning rate, and prints ``w`` and
its moving average (``emax.ema`` in an optax chain) after each step.

    python examples/tensorflow_tutorial.py [--steps 10]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import emax


def _show(v1, average) -> list[float]:
  """Prints ``[v1, average]`` as TensorFlow 1 printed two float32 values."""
  pair = [np.float32(v1), np.float32(average)]
  print(f'[{pair[0]!s}, {pair[1]!s}]')  # str(): float32's shortest digits
  return [float(x) for x in pair]


def walkthrough(step_after: int, applies: int) -> list[list[float]]:
  """The TensorFlow tutorial, step by step.

  ``v1 = 0``, ``step = 0``; ``v1 := 5`` and one apply at step 0; then
  ``step := step_after``, ``v1 := 10`` and ``applies`` applies.

  Returns:
    Every printed ``[v1, average]`` pair, as Python floats.
  """
  # ExponentialMovingAverage(0.99, num_updates=step):
  decay = emax.tf_decay(0.99)
  v1 = jnp.float32(0.0)
  step = 0
  state = emax.init({'v1': v1})  # the shadow variable starts as v1's value
  printed = [_show(v1, state.average['v1'])]

  v1 = jnp.float32(5.0)
  state = emax.update(state, {'v1': v1}, decay(step))  # ema.apply([v1])
  printed.append(_show(v1, state.average['v1']))

  step = step_after
  v1 = jnp.float32(10.0)
  for _ in range(applies):
    state = emax.update(state, {'v1': v1}, decay(step))
    printed.append(_show(v1, state.average['v1']))
  return printed


def loss_fn(w):
  return (w + 1.0) ** 2


def train_w(learning_rate, steps: int) -> list[list[float]]:
  """Minimises ``(w + 1) ** 2`` from ``w = 5``; prints ``w`` and its EMA.

  The average is ``emax.ema(emax.tf_decay(0.99))`` chained after the
  optimizer: the ``num_updates`` warm-up of the walkthrough above.
  """
  tx = optax.chain(optax.sgd(learning_rate),
                   emax.ema(emax.tf_decay(0.99)))
  w = jnp.float32(5.0)
  opt_state = tx.init(w)

  @jax.jit
  def step(w, opt_state):
    grad = jax.grad(loss_fn)(w)
    updates, opt_state = tx.update(grad, opt_state, w)
    return optax.apply_updates(w, updates), opt_state

  printed = []
  for i in range(steps):
    w, opt_state = step(w, opt_state)
    average = emax.ema_params(opt_state)
    print(f'  step {i + 1:3d}: w = {np.float32(w)!s:<12} EMA = '
          f'{np.float32(average)!s}')
    printed.append([float(w), float(average)])
  return printed


def main(argv=None) -> dict[str, list[list[float]]]:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='\n'.join(__doc__.splitlines()[2:]))
  parser.add_argument(
      '--steps', type=int, default=10,
      help='training steps of the learning-rate section (default: 10)')
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f'--steps must be >= 1, got {args.steps}')

  print('ExponentialMovingAverage(0.99, num_updates=step); step := 10000:')
  tutorial = walkthrough(step_after=10000, applies=2)
  print('\nThe same with step := 100, decay min(0.99, 101 / 110), seven'
        ' applies:')
  tutorial_100 = walkthrough(step_after=100, applies=7)

  print('\nLoss (w + 1)^2 from w = 5, optax.sgd(0.2):')
  sgd = train_w(0.2, args.steps)
  print('\nThe same with optax.exponential_decay(0.1, 1, 0.99,'
        ' staircase=True):')
  schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.99,
                                     staircase=True)
  decayed = train_w(schedule, args.steps)
  return {'tutorial': tutorial, 'tutorial_100': tutorial_100, 'sgd': sgd,
          'exponential_decay': decayed}


if __name__ == '__main__':
  main()
