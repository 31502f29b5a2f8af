"""Checkpoint merges instead of a learning-rate decay (WSM), on real digits.

Trains the MLP of ``train_digits.py`` (scikit-learn's bundled 8x8 digits, no
download) with SGD at a constant learning rate, saving the params with Orbax
after every epoch of the final ``max(--windows)`` epochs. After training, for
each window length and each decay shape (``linear``, ``cosine``,
``1-sqrt``) it merges the window's checkpoints with
``emax.merge_weights`` through ``emax.checkpoint.average``, and compares the
merge with a run that really decays: the same constant-rate run branched at
the start of the window (the same init, the same batches and dropout) and
trained through the window with its learning rate scaled by the same shape,
step by step. Everything is evaluated on the test set, next to the last
constant-rate checkpoint, and repeated for each ``--seeds`` (a different
split, init and batch order each).

It prints a table and a sentence on what it found, and writes into ``--out``:

  wsm_digits.png  test loss along the window (constant rate, real decays)
                  with the merges at its end; merge against real decay per
                  window and shape; the merge weights
  wsm_digits.csv  the numbers behind it, one row per evaluated model

and the constant-rate runs' Orbax checkpoints into ``--checkpoints``
(``OUT/checkpoints`` by default), one folder per seed.

Runs are deterministic for a given ``--seeds``.

    python examples/wsm_digits.py [--lr 0.5] [--epochs 40] [--windows 5 20]
        [--seeds 0 1 2 3 4] [--out out/wsm]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

import emax
import emax.checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The model and data of train_digits.py, the folder check of posthoc_digits.py.
from train_digits import MLP, load_data, write_csv  # noqa: E402  pylint: disable=all
from posthoc_digits import fresh_directory  # noqa: E402  pylint: disable=all

SHAPES = ('linear', 'cosine', '1-sqrt')
_F = {'linear': lambda x: 1.0 - x,  # the shapes of emax.merge_weights
      'cosine': lambda x: 0.5 * (1.0 + np.cos(np.pi * x)),
      '1-sqrt': lambda x: 1.0 - np.sqrt(x)}


@functools.cache
def build(hidden: int, dropout: float, batch_size: int, steps_per_epoch: int):
  """Jitted ``create(key)``, ``train_epoch`` (SGD, one rate per step), eval."""
  model = MLP(hidden=hidden, dropout=dropout)

  @jax.jit
  def create(key):
    return model.init(key, jnp.zeros((1, 64), jnp.float32),
                      train=False)['params']

  def loss_fn(params, x, y, key):
    logits = model.apply({'params': params}, x, train=True,
                         rngs={'dropout': key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_epoch(params, rates, key, x_train, y_train):
    """An epoch of SGD steps; ``rates`` holds each step's learning rate."""
    perm_key, dropout_key = jax.random.split(key)
    order = jax.random.permutation(perm_key, x_train.shape[0])
    batches = order[:steps_per_epoch * batch_size].reshape(
        steps_per_epoch, batch_size)
    keys = jax.random.split(dropout_key, steps_per_epoch)

    def step(params, batch):
      idx, key, rate = batch
      grads = jax.grad(loss_fn)(params, x_train[idx], y_train[idx], key)
      return optax.apply_updates(
          params, jax.tree.map(lambda g: -rate * g, grads)), None

    params, _ = jax.lax.scan(step, params, (batches, keys, rates))
    return params

  @jax.jit
  def evaluate(params, x, y):
    logits = model.apply({'params': params}, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  return create, train_epoch, evaluate


def run_seed(args, seed: int) -> dict:
  """One constant-rate run with checkpoints, its merges and the real decays."""
  x_train, y_train, x_test, y_test = load_data(args.test_size, seed)
  batch_size = min(args.batch_size, len(x_train))
  spe = len(x_train) // batch_size  # optimizer steps per epoch
  create, train_epoch, evaluate = build(args.hidden, args.dropout, batch_size,
                                        spe)
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
  x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)

  def test(params):
    loss, acc = jax.device_get(evaluate(params, x_test, y_test))
    return float(loss), float(acc)

  init_key, train_key = jax.random.split(jax.random.key(seed))
  epoch_key = lambda epoch: jax.random.fold_in(train_key, epoch)  # noqa: E731
  constant = jnp.full((spe,), args.lr, jnp.float32)
  first_saved = args.epochs - max(args.windows)
  branch_at = {args.epochs - w: None for w in args.windows}
  directory = fresh_directory(os.path.join(args.checkpoints, f'seed_{seed}'))
  curves = {('constant', 0): {}}
  params = create(init_key)
  with ocp.CheckpointManager(directory) as manager:
    for epoch in range(args.epochs + 1):
      if epoch:
        params = train_epoch(params, constant, epoch_key(epoch), x_train,
                             y_train)
      if epoch >= first_saved:
        manager.save(epoch * spe, args=ocp.args.StandardSave(
            {'params': params}))
        curves[('constant', 0)][epoch] = test(params)
      if epoch in branch_at:
        branch_at[epoch] = params
  last = test(params)

  rows = [{'seed': seed, 'window': 0, 'shape': 'none', 'kind': 'constant',
           'test_loss': last[0], 'test_acc': last[1]}]
  for window in args.windows:
    start = args.epochs - window
    k = window  # one checkpoint interval per epoch
    steps = [(start + j) * spe for j in range(k + 1)]
    for shape in SHAPES:
      merged = emax.checkpoint.average(
          directory, steps=steps, weights=emax.merge_weights(k, shape))
      loss, acc = test(merged)
      rows.append({'seed': seed, 'window': window, 'shape': shape,
                   'kind': 'merge', 'test_loss': loss, 'test_acc': acc})
      # The real decay: branch at the window's start, rate lr * f(s / L).
      total = window * spe
      params = branch_at[start]
      curve = {start: curves[('constant', 0)][start]}
      for e in range(1, window + 1):
        s = np.arange((e - 1) * spe, e * spe, dtype=np.float64)
        rates = jnp.asarray(args.lr * _F[shape](s / total), jnp.float32)
        params = train_epoch(params, rates, epoch_key(start + e), x_train,
                             y_train)
        curve[start + e] = test(params)
      curves[(shape, window)] = curve
      loss, acc = curve[args.epochs]
      rows.append({'seed': seed, 'window': window, 'shape': shape,
                   'kind': 'decay', 'test_loss': loss, 'test_acc': acc})
  return {'seed': seed, 'rows': rows, 'curves': curves, 'spe': spe,
          'batch_size': batch_size, 'train_images': len(x_train),
          'test_images': len(x_test)}


def table(rows: list[dict], seeds: list[int], windows: list[int]) -> list[str]:
  """Markdown lines: per window and shape, merge vs decay, mean over seeds."""

  def mean(kind, window, shape, key):
    return statistics.fmean(r[key] for r in rows if r['kind'] == kind and (
        r['window'] == window and r['shape'] == shape))

  n = len(seeds)
  lines = [
      f'| window (epochs) | shape | merge: test loss | real decay: test loss'
      f' | merge: test accuracy | real decay: test accuracy | merge lower'
      f' loss (of {n} seeds) |',
      '|---:|---|---:|---:|---:|---:|---:|']
  for window in windows:
    for shape in SHAPES:
      merge = [r for r in rows if r['kind'] == 'merge'
               and r['window'] == window and r['shape'] == shape]
      decay = [r for r in rows if r['kind'] == 'decay'
               and r['window'] == window and r['shape'] == shape]
      wins = sum(m['test_loss'] < d['test_loss']
                 for m, d in zip(merge, decay))
      lines.append(
          f'| {window} | {shape} |'
          f' {mean("merge", window, shape, "test_loss"):.4f} |'
          f' {mean("decay", window, shape, "test_loss"):.4f} |'
          f' {mean("merge", window, shape, "test_acc"):.4f} |'
          f' {mean("decay", window, shape, "test_acc"):.4f} | {wins} |')
  lines.append(
      f'| constant rate, last checkpoint | |'
      f' {mean("constant", 0, "none", "test_loss"):.4f} | |'
      f' {mean("constant", 0, "none", "test_acc"):.4f} | | |')
  return lines


def write_plot(path: str, runs: list[dict], args, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  colors = {'linear': 'tab:blue', 'cosine': 'tab:red', '1-sqrt': 'tab:green'}
  styles = dict(zip(sorted(args.windows), ('--', '-', ':', '-.')))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=100,
                           gridspec_kw={'width_ratios': [1.6, 1.2, 1]})
  run = runs[0]  # the curves of the first seed
  ax = axes[0]
  const = run['curves'][('constant', 0)]
  ax.plot(list(const), [v[0] for v in const.values()], color='black', lw=1.4,
          marker='.', ms=4, label='constant rate')
  for (shape, window), curve in run['curves'].items():
    if shape == 'constant':
      continue
    ax.plot(list(curve), [v[0] for v in curve.values()], color=colors[shape],
            ls=styles[window], lw=1.4,
            label=f'real {shape} decay, last {window} epochs')
  merges = [r for r in run['rows'] if r['kind'] == 'merge']
  for i, r in enumerate(merges):
    ax.scatter([args.epochs + 0.4 + 0.25 * (i % len(SHAPES))],
               [r['test_loss']], color=colors[r['shape']], s=60,
               marker='o' if r['window'] == min(args.windows) else 's',
               edgecolor='black', lw=0.6, zorder=3)
  ax.set_xlabel('epoch (circles / squares: merges of the short / long'
                ' window)')
  ax.set_ylabel('test loss')
  ax.set_title(f'seed {run["seed"]}: along the window', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='upper right')

  ax = axes[1]  # merge and real decay against the constant rate, per seed
  labels = []
  groups = [(w, s) for w in args.windows for s in SHAPES]
  for i, (window, shape) in enumerate(groups):
    for run in runs:
      base = run['rows'][0]['test_loss']  # the last constant-rate checkpoint
      [merge, decay] = [r['test_loss'] - base for r in run['rows']
                        if r['window'] == window and r['shape'] == shape]
      ax.plot([i - 0.15, i + 0.15], [merge, decay], color='gray', lw=0.6)
      ax.scatter([i - 0.15], [merge], s=28, color=colors[shape], marker='o',
                 zorder=3)
      ax.scatter([i + 0.15], [decay], s=28, color=colors[shape], marker='^',
                 edgecolor='black', lw=0.5, zorder=3)
    labels.append(f'{shape}\n{window} ep')
  ax.axhline(0.0, color='black', lw=0.8, ls='--')
  ax.set_xticks(range(len(labels)), labels, fontsize=7)
  ax.set_ylabel('test loss minus the last constant-rate checkpoint\'s')
  ax.set_title(f'{len(runs)} seeds: merge (circle) vs real decay (triangle),'
               '\nlinked by seed; below 0: better than no decay', fontsize=9)
  ax.grid(alpha=0.3, axis='y')

  ax = axes[2]  # the merge weights of the long window
  k = max(args.windows)
  for shape in SHAPES:
    ax.plot(range(k + 1), emax.merge_weights(k, shape), color=colors[shape],
            marker='.', label=shape)
  ax.set_xlabel(f'checkpoint j (epoch {args.epochs - k} + j)')
  ax.set_ylabel('c_j')
  ax.set_title(f'emax.merge_weights({k}, shape)', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--lr', type=float, default=0.5,
                      help='the constant SGD learning rate')
  parser.add_argument('--epochs', type=int, default=40)
  parser.add_argument('--windows', type=int, nargs='+', default=[5, 20],
                      help='window lengths in epochs: the last this many'
                      ' epochs are merged (one checkpoint per epoch), or'
                      ' decayed')
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4],
                      help='one run per seed (split, init, batches)')
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--hidden', type=int, default=128)
  parser.add_argument('--dropout', type=float, default=0.2)
  parser.add_argument('--test-size', type=float, default=0.25)
  parser.add_argument('--out', default=os.path.join('out', 'wsm'),
                      help='folder for the plot and the CSV')
  parser.add_argument('--checkpoints', default=None,
                      help='folder for the checkpoints (default:'
                      ' OUT/checkpoints)')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  args.windows = sorted(set(args.windows))
  if args.checkpoints is None:
    args.checkpoints = os.path.join(args.out, 'checkpoints')
  if args.epochs < 1 or not all(1 <= w <= args.epochs for w in args.windows):
    parser.error(f'--windows must be in [1, --epochs], got {args.windows}'
                 f' with --epochs {args.epochs}.')
  return args


def main(argv=None) -> dict:
  """Runs the experiment; returns the rows, the runs and the paths."""
  args = parse_args(argv)
  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  runs = []
  for seed in tqdm(args.seeds, desc='seeds', unit='seed',
                   disable=args.no_progress):
    runs.append(run_seed(args, seed))
  seconds = time.perf_counter() - start
  rows = [r for run in runs for r in run['rows']]
  first = runs[0]
  print(f'\nDigits: {first["train_images"]} train / {first["test_images"]}'
        f' test images; MLP {args.hidden}x2, dropout {args.dropout}; SGD at'
        f' a constant rate {args.lr}, batch {first["batch_size"]},'
        f' {args.epochs} epochs ({first["spe"]} steps each), a checkpoint'
        f' per epoch; windows {args.windows} epochs; seeds {args.seeds};'
        f' {seconds:.1f} s.\n')
  lines = table(rows, args.seeds, args.windows)
  print('\n'.join(lines))
  merge = [r for r in rows if r['kind'] == 'merge']
  decay = [r for r in rows if r['kind'] == 'decay']
  wins = sum(m['test_loss'] < d['test_loss'] for m, d in zip(merge, decay))
  const = statistics.fmean(r['test_loss'] for r in rows
                           if r['kind'] == 'constant')
  print(f'\nThe merge has the lower test loss in {wins} of {len(merge)}'
        f' (seed, window, shape) pairs; the merges average'
        f' {statistics.fmean(r["test_loss"] for r in merge):.4f}, the real'
        f' decays {statistics.fmean(r["test_loss"] for r in decay):.4f}, the'
        f' last constant-rate checkpoints {const:.4f}.')
  csv_path = os.path.join(args.out, 'wsm_digits.csv')
  png_path = os.path.join(args.out, 'wsm_digits.png')
  write_csv(csv_path, rows)
  write_plot(png_path, runs, args,
             f'WSM on sklearn digits (MLP + dropout, SGD rate {args.lr},'
             f' {args.epochs} epochs): merged checkpoints vs a real decay')
  print(f'\nWrote {png_path} and {csv_path}; checkpoints in'
        f' {args.checkpoints}')
  return {'rows': rows, 'runs': runs, 'table': lines, 'csv': csv_path,
          'png': png_path, 'seconds': seconds}


if __name__ == '__main__':
  main()
