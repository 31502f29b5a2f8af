"""A checkpoint directory on disk, and Orbax's partial reads of it.

Where the finished checkpoints of an ``orbax.checkpoint.CheckpointManager``
directory are, where the saved pytree sits inside one step, and a
:class:`Reader` that reads some of its arrays alone (Orbax's partial
restore), one checkpoint at a time. ``orbax.checkpoint`` is imported only
when one of these runs.
"""

from __future__ import annotations

from collections.abc import Sequence
import gc
import os
import types
from typing import TYPE_CHECKING, Any, TypeAlias

import jax
import numpy as np
from jax.sharding import Sharding

from emax import _stored_tree

COLLECT_ABOVE_BYTES = 64 << 20
"""Above this many bytes per checkpoint, a :class:`Reader` runs a full garbage
collection after each one (about 0.2 s, against reading this much)."""


if TYPE_CHECKING:  # orbax is imported on first use, never at import
  import orbax.checkpoint as _ocp

Manager: TypeAlias = '_ocp.CheckpointManager'
"""An ``orbax.checkpoint.CheckpointManager`` (a name: orbax loads lazily)."""


def orbax() -> types.ModuleType:
  """``orbax.checkpoint``, or an ImportError that names the extra."""
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        'emax.checkpoint needs orbax-checkpoint: pip install "emax[flax]" or'
        ' pip install orbax-checkpoint.') from e
  return ocp


def restorable_step(manager: Manager, step: int | None) -> int:
  """``step``, or the latest, once the manager holds it (waits for saves)."""
  manager.wait_until_finished()
  steps = list(manager.all_steps())
  if (not steps) if step is None else (step not in steps):
    manager.reload()  # another process may have saved it since
    steps = list(manager.all_steps())
  if not steps:
    raise FileNotFoundError(
        f'No checkpoint to restore in {manager.directory}; save one first'
        ' with emax.checkpoint.save(manager, step, state).')
  if step is None:
    return manager.latest_step()
  if step not in steps:
    raise FileNotFoundError(
        f'No checkpoint for step {step} in {manager.directory}; the saved'
        f' steps are {sorted(steps)}. Pass one of them, or step=None for the'
        ' latest.')
  return step


def _directory_of(directory_or_manager: Any,
                  where: str) -> str | os.PathLike:
  """The directory of a manager, or the path given, made absolute."""
  if isinstance(directory_or_manager, (str, os.PathLike)):
    directory = os.fspath(directory_or_manager)
    if '://' in str(directory):  # a URL (gs://...): absolute already
      return directory
    return os.path.abspath(directory)  # Orbax refuses relative paths
  if (hasattr(directory_or_manager, 'directory')
      and hasattr(directory_or_manager, 'wait_until_finished')):
    directory_or_manager.wait_until_finished()  # include saves in flight
    return directory_or_manager.directory
  raise TypeError(
      f'{where} expected a checkpoint directory (a str or path) or an'
      ' orbax.checkpoint.CheckpointManager, got'
      f' {type(directory_or_manager).__name__}.')


def finished_steps(directory_or_manager: Any,
                   where: str) -> tuple[Any, dict[int, Any]]:
  """The directory (an absolute ``epath.Path``) and ``{step: step folder}``.

  The steps are those a ``CheckpointManager`` with default options lists
  (``all_steps()``): folders named by their step alone, whose save was
  finalized. Other folders (``samples_1000``, a temporary folder of an
  interrupted save) are not checkpoints. A manager's saves in flight are
  waited for first.

  Raises:
    TypeError: if ``directory_or_manager`` is neither a path nor a manager.
    FileNotFoundError: if the directory does not exist or holds no finished
      checkpoint.
  """
  ocp = orbax()
  from etils import epath  # pylint: disable=g-import-not-at-top
  directory = epath.Path(_directory_of(directory_or_manager, where))
  if not directory.is_dir():
    raise FileNotFoundError(
        f'No checkpoint directory {directory}: it does not exist.')
  found = {m.step: m.path for m in
           ocp.path.step.standard_name_format().find_all(directory)}
  if not found:
    others = sorted(p.name for p in directory.iterdir())
    unfinished = [n for n in others if ocp.path.step.TMP_DIR_SUFFIX in n]
    raise FileNotFoundError(
        f'No finished checkpoint in {directory}'
        + (f'; only interrupted saves: {unfinished}.' if unfinished else
           f'; it holds {others}, none a folder named by its step, as an'
           ' orbax.checkpoint.CheckpointManager saves them.' if others
           else ': it is empty.'))
  return directory, found


def _incomplete(step: int, step_dir: Any, what: str) -> FileNotFoundError:
  return FileNotFoundError(
      f'Checkpoint step {step} ({step_dir}) is incomplete: {what}. It was'
      ' perhaps copied partly or emptied. Copy it again, delete it, or leave'
      ' it out (steps=, or target_step= before it).')


def item_directory(step_dir: Any, item: str | None, step: int) -> Any:
  """The directory of the saved pytree inside one step's checkpoint."""
  if item is not None:
    if not (step_dir / item).is_dir():
      raise FileNotFoundError(
          f'Checkpoint step {step} ({step_dir}) has no item {item!r}; its'
          f' items are {_subdirectories(step_dir)}.')
    return step_dir / item
  if (step_dir / 'default').is_dir():  # what a single-item manager writes
    return step_dir / 'default'
  if (step_dir / '_METADATA').exists():  # a Checkpointer wrote it directly
    return step_dir
  items = _subdirectories(step_dir)
  if not items:
    raise _incomplete(step, step_dir,
                      f'it holds no saved item, only {_entries(step_dir)}')
  raise FileNotFoundError(
      f'Checkpoint step {step} ({step_dir}) saves several items {items};'
      ' pass item= one of them.')


def custom_metadata(step_dir: Any, step: int) -> dict[str, Any] | None:
  """The ``custom_metadata`` saved with one step, or None.

  None also where the step has no step metadata: a checkpoint written by an
  ``orbax.checkpoint.Checkpointer`` rather than a manager.

  Raises:
    FileNotFoundError: if the step's metadata file is there but unreadable.
  """
  path = step_dir / '_CHECKPOINT_METADATA'
  if not path.exists():
    return None
  try:
    return orbax().metadata.get_step_metadata(step_dir).custom_metadata
  except (ValueError, FileNotFoundError) as e:
    raise _incomplete(step, step_dir, f'its {path.name} cannot be read'
                      f' ({e})') from None


def manager_custom_metadata(manager: Manager,
                            step: int) -> dict[str, Any] | None:
  """The ``custom_metadata`` a manager saved with ``step``, or None."""
  try:
    return manager.metadata(step).custom_metadata
  except (ValueError, FileNotFoundError, AttributeError):  # none saved
    return None


def _entries(directory: Any) -> list[str]:
  return sorted(p.name for p in directory.iterdir())


def _subdirectories(directory: Any) -> list[str]:
  return sorted(p.name for p in directory.iterdir() if p.is_dir())


def _partial_target(ocp: types.ModuleType, stored: Any,
                    keypaths: Sequence[tuple[Any, ...]],
                    shardings: Sequence[Sharding | None]
                    ) -> tuple[Any, Any]:
  """The stored tree cut down to ``keypaths``, for Orbax's partial restore.

  Dicts keep only the keys on a path to a selected leaf; lists keep their
  length, with None where nothing is selected (Orbax reads no array there).
  A leaf without a sharding is read into host memory, as NumPy.
  """
  wanted = {k: (_stored_tree.at(stored, k), s)
            for k, s in zip(keypaths, shardings)}
  on_path = {k[:i] for k in keypaths for i in range(len(k) + 1)}

  def nothing(node: Any) -> Any:
    pairs = _stored_tree.children(node)
    if pairs is None:
      return None
    if isinstance(node, dict):
      return {key: nothing(c) for key, c in pairs}
    return [nothing(c) for _, c in pairs]

  def cut(node: Any, prefix: tuple[Any, ...]) -> Any:
    if prefix in wanted:
      meta, s = wanted[prefix]
      return jax.ShapeDtypeStruct(tuple(meta.shape), np.dtype(meta.dtype),
                                  sharding=s)
    pairs = _stored_tree.children(node) or []
    if isinstance(node, dict):
      return {key: cut(c, prefix + (key,)) for key, c in pairs
              if prefix + (key,) in on_path}
    return [cut(c, prefix + (i,)) if prefix + (i,) in on_path
            else nothing(c) for i, c in pairs]

  target = cut(stored, ())

  def restore_args(x: jax.ShapeDtypeStruct) -> Any:
    if x.sharding is None:
      return ocp.RestoreArgs(restore_type=np.ndarray)
    return ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=x.sharding,
                                global_shape=x.shape)

  return target, jax.tree.map(restore_args, target)


class Reader:
  """Reads parts of the saved pytrees of checkpoints, one at a time.

  A context manager: Orbax's checkpointer is closed on exit.

  After a checkpoint of at least :data:`COLLECT_ABOVE_BYTES` is dropped
  (:meth:`done`), it runs a full garbage collection: Orbax's restore leaves
  reference cycles (asyncio futures) that hold on to a restored array until
  Python's next full collection.
  """

  def __init__(self) -> None:
    self._ocp = orbax()
    self._handler = self._ocp.PyTreeCheckpointHandler()
    self._checkpointer = self._ocp.Checkpointer(self._handler)

  def __enter__(self) -> Reader:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self._checkpointer.close()

  def stored(self, item_dir: Any, step: int) -> Any:
    """The saved tree, its leaves Orbax's array metadata (reads no array).

    Raises:
      FileNotFoundError: naming the step, if its ``_METADATA`` or the
        metadata of its arrays is missing or cannot be read (a truncated or
        partial copy).
    """
    try:
      stored = self._handler.metadata(item_dir)
    except (ValueError, FileNotFoundError) as e:  # JSONDecodeError too
      raise _incomplete(step, item_dir, 'its _METADATA, or the metadata of'
                        f' its arrays, is missing or cannot be read'
                        f' ({type(e).__name__}: {e})') from None
    return getattr(stored, 'tree', stored)

  def read(self, item_dir: Any, stored: Any,
           keypaths: Sequence[tuple[Any, ...]],
           shardings: Sequence[Sharding | None] | None = None
           ) -> list[Any]:
    """The arrays at ``keypaths`` of ``stored``, read alone.

    Each goes into its sharding (a ``jax.Array``), or into host memory as
    NumPy where it has none (``shardings=None``: all of them).
    """
    if shardings is None:
      shardings = [None] * len(keypaths)
    target, restore_args = _partial_target(self._ocp, stored, keypaths,
                                           shardings)
    restored = self._checkpointer.restore(
        item_dir, args=self._ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
    return [_stored_tree.at(restored, k) for k in keypaths]

  def done(self, nbytes: int) -> None:
    """Says that a checkpoint of ``nbytes`` read bytes is dropped."""
    if nbytes >= COLLECT_ABOVE_BYTES:
      gc.collect()  # Orbax's reference cycles hold restored arrays
