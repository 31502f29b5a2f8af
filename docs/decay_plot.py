"""Draws docs/decay.png: emax's decay schedules against the step.

Run from the repository root after changing a schedule::

  python docs/decay_plot.py            # writes docs/decay.png
  python docs/decay_plot.py OUT.png    # writes elsewhere
"""

import pathlib
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import emax  # noqa: E402

# The schedules of docs/decay.md, with the same arguments.
SCHEDULES = {
    'constant 0.999': lambda n: np.full(n.shape, 0.999, np.float32),
    'tf_decay(0.999)': emax.tf_decay(0.999),
    'inverse_power_decay(0.9999, power=3/4)': emax.inverse_power_decay(
        0.9999, power=3 / 4),
    'power_function_decay(sigma_rel=0.05)': emax.power_function_decay(
        sigma_rel=0.05),
}


def main(out: pathlib.Path) -> None:
  steps = np.unique(np.geomspace(1, 1e6, 400).astype(np.int64))
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for label, schedule in SCHEDULES.items():
    n = steps - 1  # a schedule is called with the steps before this one
    decay = np.asarray(schedule(n), np.float64)
    # emax's schedules give 1 - decay directly, without float32 cancellation.
    size = getattr(schedule, 'step_size', lambda n: 1 - decay)(n)
    left.plot(steps, decay, label=label)
    right.plot(steps, 1 / np.asarray(size, np.float64), label=label)
  left.set(xscale='log', xlabel='step', ylabel='decay', ylim=(0, 1.02),
           title='decay')
  right.set(xscale='log', yscale='log', xlabel='step',
            ylabel='1 / (1 - decay), steps', title='window of the average')
  right.plot(steps, steps, color='grey', linestyle=':', label='the whole run')
  for ax in (left, right):
    ax.grid(True, which='major', alpha=0.3)
  right.legend(fontsize=8, loc='upper left')
  fig.tight_layout()
  fig.savefig(out, dpi=100)


if __name__ == '__main__':
  main(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else
       pathlib.Path(__file__).resolve().parent / 'decay.png')
