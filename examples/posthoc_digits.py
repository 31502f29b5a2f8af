"""Post-hoc EMA on real handwritten digits: choose the width after training.

Trains the MLP of ``train_digits.py`` (scikit-learn's bundled 8x8 digits, no
download) with two power-function averages of the weights kept in one state
(EDM2's ``sigma_rel`` 0.05 and 0.10, as named averages of
``emax.with_ema``), and saves a snapshot of both with Orbax after every
epoch (``emax.checkpoint.save`` records their widths). After training,
``emax.posthoc.from_checkpoints`` rebuilds the average of every width of a
sweep from those snapshots, in one pass over the checkpoints, and each is
evaluated on the test set, next to the raw weights and the two averages that
were tracked. It does so for each ``--lr`` (one training run each): which
width is best depends on the run, and is known only after it.

It prints a table and a sentence on what it found, and writes into ``--out``:

  posthoc_digits.png  test loss and accuracy against sigma_rel, per run
  posthoc_digits.csv  the numbers behind it, one row per evaluated model
  checkpoints/lr_*/   the Orbax checkpoints of each run (try:
                      python -m emax.posthoc out/posthoc/checkpoints/lr_0.1
                      --sigma-rel 0.08 --out out/posthoc/rebuilt)

Runs are deterministic for a given ``--seed``.

    python examples/posthoc_digits.py [--lr 0.1 0.5] [--epochs 40]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
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
import emax.posthoc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The model and data of train_digits.py, next to this file.
from train_digits import MLP, load_data, write_csv  # noqa: E402  pylint: disable=all

TRACKED = {'s05': 0.05, 's10': 0.10}  # the two averages kept in training
SWEEP = (0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.12, 0.15,
         0.20, 0.25)  # the widths rebuilt after training
read = jax.jit(emax.ema_params, static_argnums=1)  # one average, by name


@functools.cache
def build(hidden: int, dropout: float, lr: float, batch_size: int,
          steps_per_epoch: int):
  """The model, the optimizer with its two averages, and jitted functions."""
  model = MLP(hidden=hidden, dropout=dropout)
  decays = {name: emax.power_function_decay(sigma_rel=s)
            for name, s in TRACKED.items()}
  tx = emax.with_ema(optax.sgd(lr), decays)

  @jax.jit
  def create(key):
    params = model.init(key, jnp.zeros((1, 64), jnp.float32),
                        train=False)['params']
    return params, tx.init(params)

  def loss_fn(params, x, y, key):
    logits = model.apply({'params': params}, x, train=True,
                         rngs={'dropout': key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_epoch(params, opt_state, key, x_train, y_train):
    perm_key, dropout_key = jax.random.split(key)
    order = jax.random.permutation(perm_key, x_train.shape[0])
    batches = order[:steps_per_epoch * batch_size].reshape(
        steps_per_epoch, batch_size)

    def step(carry, batch):
      params, opt_state = carry
      idx, key = batch
      grads = jax.grad(loss_fn)(params, x_train[idx], y_train[idx], key)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    keys = jax.random.split(dropout_key, steps_per_epoch)
    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state),
                                          (batches, keys))
    return params, opt_state

  @jax.jit
  def evaluate(params, x, y):
    logits = model.apply({'params': params}, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  return decays, create, train_epoch, evaluate


def fresh_directory(path: str) -> str:
  """``path``, emptied if it holds only Orbax checkpoints of an earlier run."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    names = os.listdir(path)
    if not all(n.split('.')[0].isdigit() for n in names):
      raise SystemExit(
          f'{path} holds files other than Orbax checkpoints ({names[:5]});'
          ' choose another --out.')
    shutil.rmtree(path)
  return path


def train(args, data, lr: float) -> dict:
  """Trains, saving both averages after every ``--save-every`` epochs."""
  x_train, y_train, _, _ = data
  batch_size = min(args.batch_size, len(x_train))
  steps_per_epoch = len(x_train) // batch_size
  decays, create, train_epoch, _ = build(
      args.hidden, args.dropout, lr, batch_size, steps_per_epoch)
  init_key, train_key = jax.random.split(jax.random.key(args.seed))
  params, opt_state = create(init_key)
  directory = fresh_directory(
      os.path.join(args.out, 'checkpoints', f'lr_{lr:g}'))
  saved = []
  with ocp.CheckpointManager(directory) as manager:
    bar = tqdm(range(1, args.epochs + 1), desc=f'lr {lr:g}', unit='epoch',
               disable=args.no_progress)
    for epoch in bar:
      params, opt_state = train_epoch(
          params, opt_state, jax.random.fold_in(train_key, epoch),
          x_train, y_train)
      if epoch % args.save_every == 0 or epoch == args.epochs:
        step = epoch * steps_per_epoch  # optimizer steps so far
        emax.checkpoint.save(manager, step,
                             {'params': params, 'opt_state': opt_state},
                             sigma_rels=decays)
        saved.append(step)
    bar.close()
  return {'lr': lr, 'params': params, 'opt_state': opt_state,
          'directory': directory, 'steps': saved,
          'steps_per_epoch': steps_per_epoch, 'batch_size': batch_size}


def sweep(args, data, run) -> list[dict]:
  """Evaluates the raw weights, the tracked averages and the sweep."""
  _, _, x_test, y_test = data
  *_, evaluate = build(args.hidden, args.dropout, run['lr'],
                       run['batch_size'], run['steps_per_epoch'])

  def row(kind, sigma_rel, params):
    loss, acc = jax.device_get(evaluate(params, x_test, y_test))
    return {'lr': run['lr'], 'kind': kind, 'sigma_rel': sigma_rel,
            'test_acc': float(acc), 'test_loss': float(loss)}

  rows = [row('raw', '', run['params'])]
  for name, sigma_rel in TRACKED.items():
    rows.append(row('tracked', sigma_rel, read(run['opt_state'], name)))
  widths = sorted(set(args.sigma_rels))
  start = time.perf_counter()
  rebuilt = emax.posthoc.from_checkpoints(run['directory'], widths)
  run['posthoc_seconds'] = time.perf_counter() - start
  rows += [row('posthoc', s, params) for s, params in zip(widths, rebuilt)]
  # A tracked width is rebuilt from its own last snapshot: the same weights.
  errors = []
  for name, sigma_rel in TRACKED.items():
    if sigma_rel in widths:
      got = rebuilt[widths.index(sigma_rel)]
      want = read(run['opt_state'], name)
      errors += [float(np.max(np.abs(np.asarray(a, np.float64)
                                     - np.asarray(b, np.float64))))
                 for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
  run['tracked_error'] = max(errors) if errors else None
  return rows


def print_table(rows: list[dict]) -> dict:
  """The table of one run, and a sentence on it; returns its best row."""
  print('| weights | sigma_rel | test accuracy | test loss |')
  print('|---|---:|---:|---:|')
  for r in rows:
    sigma = f'{r["sigma_rel"]:.2f}' if r['sigma_rel'] != '' else ''
    print(f'| {r["kind"]} | {sigma} | {r["test_acc"]:.4f} |'
          f' {r["test_loss"]:.4f} |')
  posthoc = [r for r in rows if r['kind'] == 'posthoc']
  raw = rows[0]
  best = min(posthoc, key=lambda r: (r['test_loss'], -r['test_acc']))
  tracked = [r for r in rows if r['kind'] == 'tracked']
  print(f'\nlr {raw["lr"]:g}: the lowest test loss is at sigma_rel'
        f' {best["sigma_rel"]:.2f} (loss {best["test_loss"]:.4f}, accuracy'
        f' {best["test_acc"]:.4f}); raw weights '
        f'{raw["test_loss"]:.4f} / {raw["test_acc"]:.4f}, tracked '
        + ', '.join(f'{t["sigma_rel"]:.2f} {t["test_loss"]:.4f} /'
                    f' {t["test_acc"]:.4f}' for t in tracked)
        + f'; over the sweep the loss spans'
        f' {min(r["test_loss"] for r in posthoc):.4f} to'
        f' {max(r["test_loss"] for r in posthoc):.4f}.\n')
  return best


def write_plot(path: str, rows: list[dict], title: str,
               test_images: int) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
  lrs = list(dict.fromkeys(r['lr'] for r in rows))
  colors = ['tab:blue', 'tab:red', 'tab:green', 'tab:purple', 'tab:brown']
  handles = []
  for k, lr in enumerate(lrs):
    color = colors[k % len(colors)]
    run = [r for r in rows if r['lr'] == lr]
    posthoc = [r for r in run if r['kind'] == 'posthoc']
    tracked = [r for r in run if r['kind'] == 'tracked']
    raw = run[0]
    best = min(posthoc, key=lambda r: (r['test_loss'], -r['test_acc']))
    for ax, key in ((axes[0], 'test_loss'), (axes[1], 'test_acc')):
      ax.plot([r['sigma_rel'] for r in posthoc], [r[key] for r in posthoc],
              color=color, marker='o', ms=4, lw=1.8)
      ax.scatter([r['sigma_rel'] for r in tracked],
                 [r[key] for r in tracked], s=170, marker='*', color=color,
                 edgecolor='black', lw=0.6, zorder=3)
      ax.axhline(raw[key], color=color, ls='--', lw=1.1)
    axes[0].scatter([best['sigma_rel']], [best['test_loss']], s=110,
                    facecolor='none', edgecolor='black', lw=1.3, zorder=4)
    handles.append(Line2D([], [], color=color, marker='o', ms=4, lw=1.8,
                          label=f'SGD lr {lr:g}: post-hoc EMA'))
  handles += [
      Line2D([], [], color='gray', marker='*', ms=12, lw=0,
             markeredgecolor='black', label='tracked in training'),
      Line2D([], [], color='gray', ls='--', label='raw weights'),
      Line2D([], [], color='black', marker='o', ms=9, lw=0,
             markerfacecolor='none', label='lowest test loss'),
  ]
  axes[0].set_ylabel('test loss')
  axes[1].set_ylabel(f'test accuracy (of {test_images} images)')
  for ax in axes:
    ax.set_xlabel('sigma_rel (width of the average, relative to the run)')
    ax.grid(alpha=0.3)
  axes[0].legend(handles=handles, fontsize=8, loc='best')
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--lr', type=float, nargs='+', default=[0.1, 0.5],
                      help='SGD learning rates, one training run each')
  parser.add_argument('--epochs', type=int, default=40)
  parser.add_argument('--save-every', type=int, default=1,
                      help='save a snapshot every this many epochs')
  parser.add_argument('--sigma-rels', type=float, nargs='+',
                      default=list(SWEEP),
                      help='the widths to rebuild after training')
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--hidden', type=int, default=128)
  parser.add_argument('--dropout', type=float, default=0.2)
  parser.add_argument('--test-size', type=float, default=0.25)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=os.path.join('out', 'posthoc'),
                      help='folder for the plot, the CSV and checkpoints/')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  if args.epochs < 1 or args.save_every < 1:
    parser.error('--epochs and --save-every must be >= 1.')
  return args


def main(argv=None) -> dict:
  """Runs the experiment; returns the rows, the runs and the paths."""
  args = parse_args(argv)
  start = time.perf_counter()
  x_train, y_train, x_test, y_test = load_data(args.test_size, args.seed)
  data = tuple(jnp.asarray(a) for a in (x_train, y_train, x_test, y_test))
  os.makedirs(args.out, exist_ok=True)
  runs, rows = [], []
  for lr in args.lr:
    run = train(args, data, lr)
    run['rows'] = sweep(args, data, run)
    runs.append(run)
    rows += run['rows']
  seconds = time.perf_counter() - start
  first = runs[0]
  print(f'\nDigits: {len(x_train)} train / {len(x_test)} test images; MLP'
        f' {args.hidden}x2, dropout {args.dropout}; SGD, batch'
        f' {first["batch_size"]}, {args.epochs} epochs'
        f' ({first["steps_per_epoch"]} steps each); averages sigma_rel 0.05'
        f' and 0.10 saved {len(first["steps"])} times per run;'
        f' {len(set(args.sigma_rels))} widths rebuilt per run in'
        f' {max(r["posthoc_seconds"] for r in runs):.1f} s or less; seed'
        f' {args.seed}; {seconds:.1f} s in all.\n')
  for run in runs:
    run['best'] = print_table(run['rows'])
  if len(runs) > 1:
    print('The best width depends on the run: '
          + ', '.join(f'sigma_rel {r["best"]["sigma_rel"]:.2f} at lr'
                      f' {r["lr"]:g}' for r in runs)
          + '. Post-hoc EMA finds it after training, from the snapshots of'
          ' two tracked widths.')
  errors = [r['tracked_error'] for r in runs if r['tracked_error'] is not None]
  if errors:
    print(f'Rebuilt at a tracked width, the weights differ from the tracked'
          f' average by at most {max(errors):.1e}.')
  csv_path = os.path.join(args.out, 'posthoc_digits.csv')
  png_path = os.path.join(args.out, 'posthoc_digits.png')
  write_csv(csv_path, rows, exact=('lr', 'sigma_rel'))
  write_plot(png_path, rows,
             f'Post-hoc EMA on sklearn digits (MLP + dropout, SGD,'
             f' {args.epochs} epochs, seed {args.seed}): {len(first["steps"])}'
             ' snapshots of sigma_rel 0.05 and 0.10 per run', len(x_test))
  print(f'\nWrote {png_path} and {csv_path}; checkpoints in'
        f' {os.path.join(args.out, "checkpoints")}')
  return {'rows': rows, 'runs': runs, 'csv': csv_path, 'png': png_path,
          'seconds': seconds}


if __name__ == '__main__':
  main()
