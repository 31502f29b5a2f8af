"""Post-hoc EMA from Orbax checkpoints: :func:`emax.posthoc.from_checkpoints`.

Each checkpoint up to the target step gives one snapshot per power-function
average in it, at the step its ``count`` says, of the width its record (or
``sigma_rels``) says. Everything but the arrays is read first, so that a
mismatch fails before any array is read: each checkpoint's metadata and
record (:class:`Checkpoint`), then its ``count``. The weights come from the
EDM2 solve (:mod:`emax._posthoc_solve`), one set per target; then each
checkpoint with a weight has its averages alone read (a partial restore),
debiased (:mod:`emax._restored`) and added into one sum per target
(:class:`emax._streaming_sum.TreeSum`: float64 on the host, or on the
devices shard by shard with ``sharding=``) before the next one is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
from jax.sharding import Sharding

from emax import _checkpoint_files
from emax import _checkpoint_record
from emax import _options
from emax import _posthoc_files
from emax import _posthoc_solve
from emax import _restore_plan
from emax import _restored
from emax import _stored_tree
from emax import _streaming_sum
from emax._streaming_sum import TreeSum

_WHERE = 'emax.posthoc.from_checkpoints'


def from_checkpoints(directory: Any, target_sigma_rel: Any, *,
                     target_step: int | None = None, sigma_rels: Any = None,
                     path: Sequence[str | int] | None = None, like: Any = None,
                     item: str | None = None,
                     progress: Callable[[list[int]], Iterable[int]] | None
                     = None, sharding: Any = None) -> Any:
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
  cost one read of the checkpoints. With ``sharding``, the same happens on
  the devices, shard by shard.

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
    sharding: ``None`` (the sums in float64 on the host), or where the
      result goes, for params too large for one host: a
      ``jax.sharding.Sharding``, or a tree shaped like the result of
      shardings or of ``jax.Array`` or ``jax.ShapeDtypeStruct`` leaves that
      have one (the params, or
      ``emax.checkpoint.abstract_state`` of them), as for
      :func:`emax.checkpoint.average`. Each checkpoint's averages are then
      restored straight into that sharding (each device reads its own
      shards; the averages of several names with a leading, unsharded axis),
      debiased and summed on the devices shard by shard, in float32
      (complex64), or float64 (complex128) when ``jax_enable_x64`` is on:
      no host or device holds a whole unsharded tree. It runs as well under
      ``jax.distributed``, every process calling it with a sharding over all
      devices (see ``docs/scaling.md``). Plain averages only: ``like``
      must not be a state (``pack=True``, ``offload=True``).

  Returns:
    The reconstructed params in the params' dtypes (as recorded, or from
    ``like``; else the stored dtypes), NumPy arrays on the host
    (``jax.Array`` leaves on ``sharding`` when given), in the stored dicts
    and lists (``like``'s tree types when given); a list of them, one per
    target, when ``target_sigma_rel`` is a sequence.

  Raises:
    FileNotFoundError: if the directory holds no finished checkpoint or none
      at ``target_step`` (the message lists the steps).
    ValueError: for anything :func:`emax.posthoc.coefficients` rejects; if
      no average or no width is found (the message says what to save or
      pass), two
      checkpoints hold the same ``count``, or the checkpoints differ in what
      they hold; if the folder also holds ``.safetensors`` snapshot files;
      if ``sharding`` is not shaped like the result or cannot hold a leaf
      (named), or ``like`` is a state while ``sharding`` is given.
    TypeError: if ``sharding`` holds something that is no sharding and has
      none, or a sharding over an ``AbstractMesh``.

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
      progress=progress, sharding=sharding)


def reconstruct_checkpoints(
    directory: Any, target_sigma_rel: Any, *, target_step: int | None,
    sigma_rels: Any, path: Sequence[str | int] | None, like: Any,
    item: str | None,
    progress: Callable[[list[int]], Iterable[int]] | None,
    sigma_rels_arg: str = 'sigma_rels=', sharding: Any = None) -> Any:
  """:func:`from_checkpoints`, saying ``sigma_rels_arg`` in messages.

  The command line gives the widths as ``--tracked``: its messages name
  that, not the Python argument.
  """
  _checkpoint_files.orbax()
  targets, single = _posthoc_solve.targets(target_sigma_rel)
  root, found = _checkpoint_files.finished_steps(directory, _WHERE)
  _posthoc_files.refuse_mixed(root, root.iterdir(), _WHERE)
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
    checkpoints: list[Checkpoint] = []
    for step in chosen:
      checkpoints.append(Checkpoint(
          reader, step, found[step], item=item, path=path, like=like,
          sigma_rels=sigma_rels, sigma_rels_arg=sigma_rels_arg))
      checkpoints[-1].same_as(checkpoints[0])
    first = checkpoints[0]
    targets_at, read_at = _shardings(first, sharding)
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
    weights, used, latest = _posthoc_solve.solve_targets(
        steps, widths, targets, float(counts[-1]),
        ('snapshot steps (EmaState.count)', 'snapshot sigma_rels'))
    sums: list[Any]
    if targets_at is None:
      sums = [TreeSum() for _ in targets]
    else:  # one sum per leaf and target: leaves are debiased one at a time
      sums = [[TreeSum(s) for s in targets_at] for _ in targets]
    to_read = sorted({snapshots[k][0] for k in used})
    read_steps = [chosen[i] for i in to_read]
    index_of = {chosen[i]: i for i in to_read}
    out_treedef: Any = None
    for step in (progress(read_steps) if progress else read_steps):
      i = index_of[step]
      c = checkpoints[i]
      values = reader.read(c.item_dir, c.stored,
                           [c.path + p for p, _, _ in c.leaves], read_at)
      node = _stored_tree.rebuild(c.node, values)
      del values
      for k in (k for k in used if snapshots[k][0] == i):
        j = snapshots[k][1]
        index = j if c.plan.stacked else None
        where = f'checkpoint step {step}, average {j}'
        if targets_at is not None:
          _add_leaf_by_leaf(node, c.plan, index, sums,
                            [float(w[k]) for w in weights], k == latest, where)
          continue
        leaves, out_treedef = _restored.debiased(node, c.plan, index, _WHERE)
        arrays = [np.asarray(x) for x in leaves]  # on the host
        del leaves
        for total, w in zip(sums, weights):
          total.add(arrays, float(w[k]), k == latest, where)
        del arrays
      del node
      reader.done(c.nbytes)
  plan = first.plan
  if targets_at is not None:
    results = [plan.shape([s.result([d]) for s, d in zip(leaf_sums,
                                                         plan.dtypes)])
               for leaf_sums in sums]
  elif plan.like_state is not None:
    dtypes = plan.param_dtypes
    results = [jax.tree.unflatten(out_treedef, s.result(dtypes))
               for s in sums]
  else:
    results = [plan.shape(s.result(plan.dtypes)) for s in sums]
  return results[0] if single else results


class ResultLeaf(NamedTuple):
  """One leaf of the rebuilt params, as a checkpoint stores it."""
  stored: tuple[Any, ...]  # its path in the stored state, from 'average'
  path: tuple[Any, ...]  # its path in the params
  shape: tuple[int, ...]  # its shape in the result
  stacked: bool  # stored behind a first axis, one entry per named average


class Checkpoint:
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
    self.plan = _restore_plan.Plan(self.node, self.path, like=like,
                               recorded=recorded, where=where)
    self.widths = _snapshot_widths(
        self.plan, _checkpoint_record.entry_at(recorded, self.path),
        sigma_rels, where, sigma_rels_arg)
    self.leaves = [(p, tuple(m.shape), np.dtype(m.dtype))
                   for p, m in _stored_tree.flatten(self.node)]
    self.nbytes = sum(int(np.prod(s)) * d.itemsize for _, s, d in self.leaves)

  def result_leaves(self) -> list[ResultLeaf]:
    """The leaves of the rebuilt params, in order, from the stored average.

    With several named averages (a stacked state), float leaves are stored
    behind a first axis, one entry per average; the result drops it.
    """
    out = []
    for p, shape, dtype in self.leaves:
      if p[0] == 'average':
        stacked = self.plan.stacked and jnp.issubdtype(dtype, jnp.inexact)
        out.append(ResultLeaf(p, p[1:], shape[1:] if stacked else shape,
                              stacked))
    return out

  def same_as(self, other: Checkpoint) -> None:
    for what, a, b in (('where the average sits', self.path, other.path),
                       ('the names', self.plan.names, other.plan.names),
                       ('the sigma_rels', self.widths, other.widths),
                       ('the arrays (paths, shapes, dtypes)', self.leaves,
                        other.leaves)):
      if a != b:
        raise ValueError(
            f'Checkpoints {other.step} and {self.step} differ in {what}:'
            f' {b} against {a}. Reconstruct from the checkpoints of one run.')


def _add_leaf_by_leaf(node: dict[str, Any], plan: _restore_plan.Plan,
                      index: int | None, sums: list[list[TreeSum]],
                      weights: list[float], latest: bool, where: str) -> None:
  """Adds average ``index`` of ``node`` into per-leaf sums, leaf by leaf.

  Each leaf is debiased alone (by :func:`emax._restored.debiased`, on a node
  of that one leaf) and dropped before the next: beyond the sums and the
  checkpoint's read, the devices hold one leaf's temporaries.
  """
  for n, (_, x) in enumerate(_stored_tree.flatten(node['average'])):
    [y], _ = _restored.debiased({'average': x, 'weight': node['weight']},
                                plan, index, _WHERE)
    for leaf_sums, w in zip(sums, weights):
      leaf_sums[n].add(y, w, latest, where)
    del y


def _shardings(c: Checkpoint, sharding: Any
               ) -> tuple[list[Sharding | None] | None,
                          list[Sharding | None] | None]:
  """Where each result leaf goes, and where each leaf of ``c.leaves`` is read.

  ``(None, None)`` without ``sharding``: everything is read on the host. The
  averages of a stacked state (several named averages) are read with a
  leading axis unsharded; the ``count``, ``weight`` and other scalars on
  the host.
  """
  if sharding is None:
    return None, None
  if c.plan.like_state is not None:
    raise ValueError(
        f'{_WHERE}: sharding= reads a plain average straight into its'
        ' sharding, but like= is a state (as pack=True and offload=True'
        ' averages need): their stored buffers are not laid out like the'
        ' params. Pass like= a tree shaped like the params (or no like) for'
        ' a plain average, or sharding=None to reconstruct on the host and'
        ' jax.device_put the result.')
  leaves = c.result_leaves()
  stored_dtype = {p: dtype for p, _, dtype in c.leaves}
  treedef = jax.tree.structure(
      c.plan.shape([0] * len(leaves)))  # the result's tree
  targets = c.plan.stored_order(_streaming_sum.leaf_shardings(
      sharding, treedef, 'the reconstructed params',
      [(_stored_tree.keystr(leaf.path), leaf.shape, stored_dtype[leaf.stored])
       for leaf in c.plan.like_order(leaves)]))
  where = {leaf.stored: (leaf, s) for leaf, s in zip(leaves, targets)}
  read: list[Sharding | None] = []
  for p, shape, _ in c.leaves:
    leaf, s = where.get(p, (None, None))
    if s is not None and leaf is not None and leaf.stacked:
      s = _with_leading_axis(s, p, shape)
    read.append(s)
  return targets, read


def _with_leading_axis(s: Sharding, path: tuple[Any, ...],
                       shape: tuple[int, ...]) -> Sharding:
  """``s`` for the same array stacked behind a new, unsharded first axis."""
  if isinstance(s, NamedSharding):
    return NamedSharding(s.mesh, PartitionSpec(None, *s.spec),
                         memory_kind=s.memory_kind)
  if s.is_fully_replicated:
    return s
  raise TypeError(
      f'{_WHERE}: {_stored_tree.keystr(path)} (shape {shape}) stacks several'
      f' named averages on a first axis, and its target sharding {s} cannot'
      ' say how to shard that stack. Give a jax.sharding.NamedSharding'
      ' (its spec gets a leading None) or a replicated sharding.')


def _snapshot_widths(plan: _restore_plan.Plan, entry: dict[str, Any] | None,
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
