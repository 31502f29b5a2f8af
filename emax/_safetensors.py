"""safetensors files: any tree of arrays out, flat mappings of arrays in.

A safetensors file holds a flat mapping of tensor names to arrays. A tree is
written under the names ``flax.traverse_util.flatten_dict(tree, sep='.')``
gives (``{'dense': {'kernel': x}}`` becomes ``'dense.kernel'``), extended to
every pytree: list and tuple entries by index, attributes by name. Only
safetensors' NumPy API is used (``safetensors.numpy``, ``safe_open(...,
framework='np')``): neither torch nor flax is imported, and safetensors itself
only when a file is read or written.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import types
from typing import Any

import jax
import numpy as np

from emax import _stored_tree
from emax import _tree

EXTRA = 'pip install "emax[safetensors]" (or pip install safetensors)'
"""How to install what this module needs, for error messages."""


def module() -> types.ModuleType:
  """``safetensors``, or an ImportError that names the extra."""
  try:
    import safetensors  # pylint: disable=g-import-not-at-top
    import safetensors.numpy  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError(
        f'Reading and writing safetensors files needs safetensors: {EXTRA}.'
        ) from e
  return safetensors


def flat_arrays(tree: Any, where: str) -> dict[str, np.ndarray]:
  """``{name: array}`` of a tree's leaves, names joined with ``'.'``.

  The names are those of ``flax.traverse_util.flatten_dict(tree, sep='.')``
  for nested dicts; list and tuple entries are named by index, attributes
  (dataclasses, named tuples, equinox modules) by name; a Flax NNX
  ``Variable`` by its place, as ``nnx.to_pure_dict`` names it (no
  ``.value``). ``None`` is no leaf. Each array is copied to the host and made
  C-contiguous (safetensors writes the bytes of a dense row-major array).

  Raises:
    ValueError: if the tree is a single array (no name to give it), or two
      leaves get the same name.
    TypeError: if a leaf is not an array of numbers or bools.
  """
  names: dict[str, tuple[Any, ...]] = {}
  arrays: dict[str, np.ndarray] = {}
  leaves = jax.tree_util.tree_flatten_with_path(_tree.unwrap_variables(tree))
  for path, leaf in leaves[0]:
    keys = tuple(_stored_tree.stored_key(k) for k in path)
    if not keys:
      raise ValueError(
          f'{where} got a single array, not a tree: safetensors names each'
          ' array. Pass a mapping, e.g. {"weight": x}.')
    name = '.'.join(map(str, keys))
    if name in names:
      raise ValueError(
          f'{where}: the leaves at {_stored_tree.keystr(names[name])} and'
          f' {_stored_tree.keystr(keys)} would both be named {name!r} (names'
          " are the keys joined with '.'). Rename a key that holds a '.'.")
    if jax.dtypes.issubdtype(getattr(leaf, 'dtype', None),
                             jax.dtypes.prng_key):
      raise TypeError(
          f'{where}: the leaf {name!r} is a PRNG key array, which safetensors'
          ' cannot store. Drop it from the tree, or store its bits:'
          ' jax.random.key_data(key).')
    array = np.asarray(leaf)
    if not (array.dtype.kind in 'biu' or _tree.is_float(array.dtype)):
      raise TypeError(
          f'{where}: the leaf {name!r} is {type(leaf).__name__} of dtype'
          f' {array.dtype}, not an array of numbers or bools; safetensors'
          ' stores arrays only. Drop it from the tree or make it an array.')
    if not array.flags.c_contiguous:
      array = array.copy(order='C')
    names[name] = keys
    arrays[name] = array
  return arrays


def _metadata(metadata: Any, where: str) -> dict[str, str] | None:
  if metadata is None:
    return None
  if not isinstance(metadata, Mapping) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
    raise TypeError(
        f'{where}: metadata must map str to str (safetensors stores text'
        f' only), got {metadata!r}. Convert values with str() or json.dumps.')
  return dict(metadata)


def save_safetensors(tree: Any, path: str | os.PathLike[str], *,
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes a tree of arrays to a safetensors file, for use outside JAX.

  The arrays are named as ``flax.traverse_util.flatten_dict(tree, sep='.')``
  names them: the keys from the root joined with ``'.'``
  (``{'dense': {'kernel': x}}`` gives ``'dense.kernel'``); list and tuple
  entries by index (``'layers.0.w'``), attributes of dataclasses, named
  tuples and equinox modules by name. A flat mapping (the result of
  :func:`from_files`, a PyTorch ``state_dict``'s names) keeps its names.
  Each array is written with its own dtype and shape, bit for bit (bf16 and
  float16 too); ``jax.Array`` leaves are copied to the host first.

  Any average emax reads can be exported this way: pass
  ``emax.ema_params(state)`` (or a name's), or the result of any function of
  :mod:`emax.posthoc`. The file is written under a temporary name and then
  renamed: an interrupted write leaves no partial file under ``path``.

  Args:
    tree: a pytree of arrays (nested dicts, lists, tuples, dataclasses...).
    path: the file to write (replaced if it exists); its folder must exist.
    metadata: text to store in the file's header, ``{str: str}``;
      ``safe_open(path, 'np').metadata()`` reads it back.

  Raises:
    ImportError: if safetensors is not installed (the message names the
      ``safetensors`` extra).
    FileNotFoundError: if the folder of ``path`` does not exist.
    IsADirectoryError: if ``path`` is a folder.
    ValueError: if ``tree`` is a single array, or two leaves get the same
      name.
    TypeError: if a leaf is not an array of numbers or bools, or
      ``metadata`` is not a mapping of str to str.

  Examples:
    >>> import os, tempfile
    >>> import jax.numpy as jnp
    >>> import emax.posthoc
    >>> params = {'dense': {'kernel': jnp.ones((2, 3), jnp.bfloat16),
    ...                     'bias': jnp.zeros(3)}, 'layers': [jnp.ones(2)]}
    >>> path = os.path.join(tempfile.mkdtemp(), 'ema.safetensors')
    >>> emax.posthoc.save_safetensors(params, path)
    >>> loaded = emax.posthoc.load_safetensors(path)
    >>> sorted(loaded)
    ['dense.bias', 'dense.kernel', 'layers.0']
    >>> loaded['dense.kernel'].dtype
    dtype(bfloat16)
  """
  where = 'emax.posthoc.save_safetensors'
  metadata = _metadata(metadata, where)
  safetensors = module()
  path = _destination(path, where)
  arrays = flat_arrays(tree, where)
  partial = f'{path}.partial'
  try:
    safetensors.numpy.save_file(arrays, partial, metadata=metadata)
    os.replace(partial, path)
  except safetensors.SafetensorError as e:  # e.g. a dtype it cannot store
    raise ValueError(f'{where} could not write {path}: {e}') from None
  finally:  # nothing left under the temporary name, whatever happened
    if os.path.exists(partial):
      os.remove(partial)


def _destination(path: str | os.PathLike[str], where: str) -> str:
  """``path`` as a str, checked before any array is copied to the host."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(
        f'{where}: {path} is a folder; give the path of the file to write,'
        ' e.g. os.path.join(folder, "ema.safetensors").')
  folder = os.path.dirname(path) or os.curdir
  if not os.path.isdir(folder):
    raise FileNotFoundError(
        f'{where}: the folder {folder} of {path} does not exist; create it'
        ' first (os.makedirs(folder, exist_ok=True)).')
  return path


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads a safetensors file into a flat dict of NumPy arrays.

  The inverse of :func:`save_safetensors`, bit for bit, and the reader of
  any safetensors file (``safetensors.torch.save_file`` writes them too):
  ``{name: array}`` with the names, dtypes (bf16 as ``ml_dtypes.bfloat16``)
  and shapes stored. Needs no torch. To get nested dicts back, use
  ``flax.traverse_util.unflatten_dict(flat, sep='.')`` (list entries come
  back as dicts keyed ``'0'``, ``'1'``...).

  Args:
    path: a ``.safetensors`` file.

  Returns:
    ``{name: np.ndarray}``, sorted by name.

  Raises:
    ImportError: if safetensors is not installed (the message names the
      ``safetensors`` extra).
    FileNotFoundError: if there is no such file.
    ValueError: if the file is not a safetensors file, or holds a dtype that
      safetensors cannot give to NumPy (float8 types).

  Examples:
    See :func:`save_safetensors`.
  """
  safetensors = module()
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No safetensors file {path}: it does not exist.')
  with open_file(safetensors, path) as f:
    return {name: tensor(f, name, path) for name in f.keys()}


def open_file(safetensors: types.ModuleType, path: str) -> Any:
  """``safe_open(path, framework='np')``, a bad file named in the error."""
  try:
    return safetensors.safe_open(path, framework='np')
  except Exception as e:  # safetensors' own error types, a bad header
    raise ValueError(
        f'{path} cannot be read as a safetensors file ({type(e).__name__}:'
        f' {e}). Was it written completely?') from None


def tensor(f: Any, name: str, path: str) -> np.ndarray:
  """One tensor of an open file, a dtype NumPy lacks named in the error."""
  try:
    return f.get_tensor(name)
  except (AttributeError, TypeError) as e:  # e.g. numpy has no float8 types
    dtype = f.get_slice(name).get_dtype()
    raise ValueError(
        f'{path}: tensor {name!r} has dtype {dtype}, which safetensors cannot'
        f' read into NumPy ({e}). Save it as float32, float16 or bfloat16.'
        ) from None
