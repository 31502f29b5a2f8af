"""Post-hoc EMA from Orbax checkpoints: :func:`emax.posthoc.from_checkpoints`.

Each checkpoint up to the target step gives one snapshot per power-function
average in it, at the step its ``count`` says, of the width its record (or
``sigma_rels``) says. Everything but the arrays is read first, so that a
mismatch fails before any array is read: each checkpoint's metadata and
record (:class:`_Checkpoint`), then its ``count``. The weights come from the
EDM2 solve (:mod:`emax._posthoc_solve`), one set per target; then each
checkpoint with a weight has its averages alone read (a partial restore),
debiased (:mod:`emax._restored`) and added into one float64 sum per target
(:class:`emax._streaming_sum.TreeSum`) before the next one is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from emax import _checkpoint_files
from emax import _checkpoint_record
from emax import _options
from emax import _posthoc_solve
from emax import _restored
from emax import _stored_tree
from emax._streaming_sum import TreeSum

_WHERE = 'emax.posthoc.from_checkpoints'


def from_checkpoints(directory: Any, target_sigma_rel: Any, *,
                     target_step: int | None = None, sigma_rels: Any = None,
                     path: Sequence[str | int] | None = None, like: Any = None,
                     item: str | None = None,
                     progress: Callable[[list[int]], Iterable[int]] | None
                     = None) -> Any:
  """Post-hoc EMA from the Orbax checkpoints that training wrote.

  Each checkpoint step up to ``target_step`` gives one snapshot per
  power-function average in it: its step is the :attr:`emax.EmaState.count`
  saved with it (not the checkpoint's step number), its width the ``sigma_rel``
  that :func:`emax.checkpoint.save` recorded (or that ``sigma_rels`` gives). The
  weights come from :func:`emax.posthoc.coefficients`, for each target; then the
  checkpoints are read one at a time, each by a partial restore of its average
  alone (the params and the optimizer state are not read), and every snapshot is
  added, debiased as ``emax.ema_params(..., dtypes='accumulator')`` reads it,
  into a float64 sum per target, as :func:`emax.posthoc.reconstruct` does. Host
  memory holds one float64 sum per target (8 bytes per param) plus one
  checkpoint's averages, whatever the number of checkpoints; several targets
  cost one read of the checkpoints.

  Checkpoints whose average has seen no step (``count`` 0, e.g. saved
  before training) hold no snapshot and are skipped.

  Args:
    directory: the checkpoint directory of an ``orbax.checkpoint``
      ``CheckpointManager`` (or the manager; its saves in flight are waited
      for first).
    target_sigma_rel: the width to reconstruct, or a sequence of widths.
    target_step: the checkpoint step to reconstruct at (its ``count`` is the
      target time; later checkpoints are not read); the latest by default.
    sigma_rels: the widths of the saved averages, when the checkpoints do
      not record them or to override the record: ``{name: sigma_rel}`` (or
      the mapping given to :func:`emax.ema`: power-function schedules know
      their ``sigma_rel``), a sequence with one entry per average in the
      order given to :func:`emax.ema` (``None`` leaves one out), or one
      number for a single average.
    path: where the average sits in the saved tree (keys from the root,
      e.g. ``('opt_state', 'ema_state')``), when it holds several.
    like: the abstract state (``jax.eval_shape(tx.init, params)``), needed
      for ``pack=True`` and ``offload=True`` averages, or a tree shaped like
      the params (for their dtypes and tree types); see
      :func:`emax.checkpoint.read_average`.
    item: the item of a manager that saves several (``item_names``).
    progress: wraps the list of checkpoint steps read in the summing pass,
      e.g. ``tqdm.tqdm``, to show progress.

  Returns:
    The reconstructed params in the params' dtypes (as recorded, or from
    ``like``; else the stored dtypes), NumPy arrays on the host, in the
    stored dicts and lists (``like``'s tree types when given); a list of
    them, one per target, when ``target_sigma_rel`` is a sequence.

  Raises:
    FileNotFoundError: if the directory holds no finished checkpoint or none
      at ``target_step`` (the message lists the steps).
    ValueError: for anything :func:`emax.posthoc.coefficients` rejects; if
      no average or no width is found (the message says what to save or
      pass), two
      checkpoints hold the same ``count``, or the checkpoints differ in what
      they hold.

  Examples:
    Train with two power-function averages and save them now and then,
    recording their widths; after training, rebuild other widths:

    >>> import tempfile, jax, jax.numpy as jnp, optax, orbax.checkpoint as ocp
    >>> import emax, emax.checkpoint, emax.posthoc
    >>> decays = {'s05': emax.power_function_decay(sigma_rel=0.05),
    ...           's10': emax.power_function_decay(sigma_rel=0.10)}
    >>> tx = emax.with_ema(optax.sgd(1.0), decays)
    >>> params = {'w': jnp.zeros(2)}
    >>> opt_state = tx.init(params)
    >>> @jax.jit
    ... def train_step(params, opt_state):  # params['w'] becomes the step
    ...   updates, opt_state = tx.update({'w': -jnp.ones(2)}, opt_state, params)
    ...   return optax.apply_updates(params, updates), opt_state
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   with ocp.CheckpointManager(directory) as manager:
    ...     for step in range(1, 101):
    ...       params, opt_state = train_step(params, opt_state)
    ...       if step % 20 == 0:
    ...         _ = emax.checkpoint.save(manager, step, {'params': params,
    ...             'opt_state': opt_state}, sigma_rels=decays)
    ...   s10, s07 = emax.posthoc.from_checkpoints(directory, [0.10, 0.07])
    >>> print(s10['w'], emax.ema_params(opt_state, 's10')['w'], s07['w'])
    [89.30 89.30] [89.30 89.30] [92.81 92.81]

  A tracked width comes back as itself; a 0.07 average tracked during
  training would have been 92.94 (from ten snapshots, the reconstruction is
  close, not exact).
  """
  return reconstruct_checkpoints(
      directory, target_sigma_rel, target_step=target_step,
      sigma_rels=sigma_rels, path=path, like=like, item=item,
      progress=progress)


def reconstruct_checkpoints(
    directory: Any, target_sigma_rel: Any, *, target_step: int | None,
    sigma_rels: Any, path: Sequence[str | int] | None, like: Any,
    item: str | None,
    progress: Callable[[list[int]], Iterable[int]] | None,
    sigma_rels_arg: str = 'sigma_rels=') -> Any:
  """:func:`from_checkpoints`, saying ``sigma_rels_arg`` in messages.

  The command line gives the widths as ``--tracked``: its messages name
  that, not the Python argument.
  """
  _checkpoint_files.orbax()
  targets, single = _posthoc_solve.targets(target_sigma_rel)
  root, found = _checkpoint_files.finished_steps(directory, _WHERE)
  if target_step is None:
    target_step = max(found)
  elif _options.check_int(target_step, 'target_step', 0) not in found:
    raise FileNotFoundError(
        f'No checkpoint for target_step {target_step} in {root}; the saved'
        f' steps are {sorted(found)}. Pass one of them, or None for the'
        ' latest.')
  chosen = sorted(s for s in found if s <= target_step)
  with _checkpoint_files.Reader() as reader:
    # Metadata first (no arrays): a mismatch fails before anything is read.
    checkpoints: list[_Checkpoint] = []
    for step in chosen:
      checkpoints.append(_Checkpoint(
          reader, step, found[step], item=item, path=path, like=like,
          sigma_rels=sigma_rels, sigma_rels_arg=sigma_rels_arg))
      checkpoints[-1].same_as(checkpoints[0])
    first = checkpoints[0]
    counts = [int(np.asarray(reader.read(c.item_dir, c.stored,
                                         [c.path + ('count',)])[0]))
              for c in checkpoints]
    seen: dict[int, int] = {}
    for c, n in zip(checkpoints, counts):
      if n > 0 and n in seen:
        raise ValueError(
            f'Checkpoints {seen[n]} and {c.step} both hold averages after'
            f' {n} steps (EmaState.count): one snapshot twice. Reconstruct'
            ' from one run, or pass target_step= before the repeat.')
      seen[n] = c.step
    if counts[-1] <= 0:
      raise ValueError(
          f'{_WHERE}: the checkpoint at step {chosen[-1]} holds an average of'
          ' no step yet (count 0); reconstruct at a later checkpoint.')
    # (checkpoint index, average index, count, width) per snapshot
    snapshots = [(i, j, counts[i], w) for i, c in enumerate(checkpoints)
                 if counts[i] > 0 for j, w in enumerate(c.widths)
                 if w is not None]
    steps = np.array([s[2] for s in snapshots], np.float64)
    widths = np.array([s[3] for s in snapshots], np.float64)
    weights, used = [], set()
    for target in targets:
      w, u = _posthoc_solve.solve(
          steps, widths, target, float(counts[-1]),
          ('snapshot steps (EmaState.count)', 'snapshot sigma_rels'))
      weights.append(w)
      used |= set(u.tolist())
    latest = max(used, key=lambda k: (steps[k], -k))
    sums = [TreeSum() for _ in targets]
    to_read = sorted({snapshots[k][0] for k in used})
    read_steps = [chosen[i] for i in to_read]
    index_of = {chosen[i]: i for i in to_read}
    out_treedef: Any = None
    for step in (progress(read_steps) if progress else read_steps):
      i = index_of[step]
      c = checkpoints[i]
      values = reader.read(c.item_dir, c.stored,
                           [c.path + p for p, _, _ in c.leaves])
      node = _stored_tree.rebuild(c.node, values)
      del values
      for k in (k for k in sorted(used) if snapshots[k][0] == i):
        j = snapshots[k][1]
        leaves, treedef = _restored.debiased(
            node, c.plan, j if c.plan.stacked else None, _WHERE)
        out_treedef = treedef
        arrays = [np.asarray(x) for x in leaves]  # on the host
        del leaves
        for total, w in zip(sums, weights):
          total.add(arrays, float(w[k]), k == latest,
                    f'checkpoint step {step}, average {j}')
        del arrays
      del node
      reader.done(c.nbytes)
  plan = first.plan
  if plan.like_state is not None:
    dtypes = plan.param_dtypes
    results = [jax.tree.unflatten(out_treedef, s.result(dtypes))
               for s in sums]
  else:
    results = [plan.shape(s.result(plan.dtypes)) for s in sums]
  return results[0] if single else results


class _Checkpoint:
  """What one checkpoint holds: where its average is and how to read it."""

  def __init__(self, reader: _checkpoint_files.Reader, step: int,
               step_dir: Any, *, item: str | None,
               path: Sequence[str | int] | None, like: Any,
               sigma_rels: Any, sigma_rels_arg: str) -> None:
    self.step = step
    self.item_dir = _checkpoint_files.item_directory(step_dir, item, step)
    self.stored = reader.stored(self.item_dir, step)
    recorded = _checkpoint_record.recorded(
        _checkpoint_files.custom_metadata(step_dir, step))
    where = f'{_WHERE} (checkpoint step {step})'
    self.path, self.node = _restored.pick(
        _restored.found_states(self.stored), path, self.stored, where)
    self.plan = _restored.Plan(self.node, self.path, like=like,
                               recorded=recorded, where=where)
    self.widths = _snapshot_widths(
        self.plan, _checkpoint_record.entry_at(recorded, self.path),
        sigma_rels, where, sigma_rels_arg)
    self.leaves = [(p, tuple(m.shape), np.dtype(m.dtype))
                   for p, m in _stored_tree.flatten(self.node)]
    self.nbytes = sum(int(np.prod(s)) * d.itemsize for _, s, d in self.leaves)

  def same_as(self, other: _Checkpoint) -> None:
    for what, a, b in (('where the average sits', self.path, other.path),
                       ('the names', self.plan.names, other.plan.names),
                       ('the sigma_rels', self.widths, other.widths),
                       ('the arrays (paths, shapes, dtypes)', self.leaves,
                        other.leaves)):
      if a != b:
        raise ValueError(
            f'Checkpoints {other.step} and {self.step} differ in {what}:'
            f' {b} against {a}. Reconstruct from the checkpoints of one run.')


def _snapshot_widths(plan: _restored.Plan, entry: dict[str, Any] | None,
                     sigma_rels: Any, where: str,
                     arg: str) -> list[float | None]:
  """The width of each average of one checkpoint (None: not a snapshot)."""
  what = (f'the {plan.count} average{"s" if plan.count > 1 else ""} at'
          f' {list(plan.path)}')
  if sigma_rels is None:
    widths = entry.get('sigma_rels') if entry else None
    if not widths or all(w is None for w in widths):
      named = (f', named {list(plan.names)}' if plan.names is not None
               else '')
      by_name = ('{name: sigma_rel}, or' if arg.endswith('=') else
                 ' NAME=SIGMA_REL per name, or')
      raise ValueError(
          f'{where}: no sigma_rel is recorded for {what}{named}. Save them'
          ' with emax.checkpoint.save(manager, step, state,'
          ' sigma_rels=decays) (decays: the mapping given to emax.ema), or'
          f' give them here with {arg}{by_name if plan.names else ""} one'
          ' per average in the order given to emax.ema.')
    if len(widths) != plan.count:
      raise ValueError(
          f'{where}: the record lists {len(widths)} sigma_rels for'
          f' {plan.count} averages; the checkpoint is not what emax saved.')
    return [None if w is None else float(w) for w in widths]
  try:
    return _checkpoint_record.widths(sigma_rels, plan.names, plan.count,
                                     what, arg.rstrip('='))
  except (TypeError, ValueError) as e:
    raise type(e)(f'{where}: {e}') from None
