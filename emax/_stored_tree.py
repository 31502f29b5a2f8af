"""The plain trees a checkpoint holds: nested dicts and lists.

Orbax stores a pytree as nested dicts (dicts by key; named tuples and
dataclasses by field name) and lists (lists and tuples by position); a
checkpoint restored without a target, and Orbax's metadata of one, come back
in that form. flax serialization writes sequences as dicts keyed ``'0'`` to
``'n-1'``. These helpers walk such trees: the places in them are tuples of
keys (``str`` for dict keys, ``int`` for list positions), and ``1`` and
``'1'`` name the same place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax


def stored_key(key: Any) -> str | int:
  """A ``jax.tree_util`` path entry as Orbax names it in a stored tree."""
  tu = jax.tree_util
  if isinstance(key, tu.DictKey):
    key = key.key
  elif isinstance(key, tu.GetAttrKey):
    key = key.name
  elif isinstance(key, tu.SequenceKey):
    key = key.idx
  elif isinstance(key, tu.FlattenedIndexKey):
    key = key.key
  if isinstance(key, (str, int)) and not isinstance(key, bool):
    return key
  return str(key)


def path_key(path: Iterable[Any]) -> tuple[str, ...]:
  """A stored path, or a ``jax.tree_util`` key path, as a hashable key that
  is the same for every spelling of one place (``1`` and ``'1'`` alike)."""
  return tuple(str(stored_key(k)) for k in path)


def same_path(a: Sequence[Any] | None, b: Sequence[Any] | None) -> bool:
  """Whether two stored paths name the same place (``1`` and ``'1'`` alike)."""
  return a is not None and b is not None and path_key(a) == path_key(b)


def first_at(pairs: Sequence[tuple[Sequence[Any], Any]],
             path: Sequence[Any]) -> tuple[Any, Any] | None:
  """The first ``(p, x)`` of ``pairs`` whose ``p`` is ``path``, or None."""
  for pair in pairs:
    if same_path(pair[0], path):
      return pair
  return None


def children(node: Any) -> list[tuple[Any, Any]] | None:
  """(key, child) pairs of a stored tree's dict or list; None for a leaf."""
  if isinstance(node, dict):
    return list(node.items())
  if isinstance(node, (list, tuple)):
    return list(enumerate(node))
  return None


def child(node: Any, key: Any) -> Any:
  """The child of ``node`` at ``key`` (``1`` and ``'1'`` alike).

  Raises:
    KeyError: if ``node`` is a leaf or has no such child.
  """
  pairs = dict(children(node) or ())
  if key in pairs:
    return pairs[key]
  by_name = {str(k): v for k, v in pairs.items()}
  if str(key) in by_name:
    return by_name[str(key)]
  raise KeyError(key)


def at(tree: Any, keypath: Sequence[Any]) -> Any:
  """The node at ``keypath``, keys exactly as stored."""
  for key in keypath:
    tree = tree[key]
  return tree


def _digits(node: dict[Any, Any]) -> bool:
  """Whether a dict's keys are '0'..'n-1' (how flax serializes a sequence)."""
  keys = list(node)
  return bool(keys) and all(isinstance(k, str) and k.isdigit() for k in keys
                            ) and sorted(map(int, keys)) == list(
                                range(len(keys)))


def _children_in_order(node: Any) -> list[tuple[Any, Any]]:
  if isinstance(node, dict):
    keys = (sorted(node, key=int) if _digits(node)
            else sorted(node, key=lambda k: (str(type(k)), k)))
    return [(k, node[k]) for k in keys]
  return list(enumerate(node))


def flatten(tree: Any, path: tuple[Any, ...] = ()
            ) -> list[tuple[tuple[Any, ...], Any]]:
  """``[(path, leaf)]`` of a stored tree, in the params' order.

  Dicts by sorted key, as ``jax.tree`` flattens them, except dicts keyed
  ``'0'..'n-1'`` (flax serialization's sequences), by number. ``None`` is
  no leaf.
  """
  if isinstance(tree, (dict, list, tuple)):
    out = []
    for key, node in _children_in_order(tree):
      out.extend(flatten(node, path + (key,)))
    return out
  return [] if tree is None else [(path, tree)]


def rebuild(tree: Any, leaves: Sequence[Any]) -> Any:
  """``tree``'s dicts and lists, its leaves replaced (:func:`flatten` order)."""
  it = iter(leaves)

  def go(node: Any) -> Any:
    if isinstance(node, dict):
      new = {k: go(c) for k, c in _children_in_order(node)}
      return {k: new[k] for k in node}  # the stored key order
    if isinstance(node, (list, tuple)):
      return type(node)(go(c) for c in node)
    return None if node is None else next(it)

  return go(tree)


def describe(node: Any) -> str:
  """What ``node`` is, for error messages."""
  if isinstance(node, dict):
    return f'a dict with keys {sorted(map(str, node))}'
  if isinstance(node, (list, tuple)):
    return f'a list of length {len(node)}'
  if node is None:
    return 'None'
  shape, dtype = getattr(node, 'shape', None), getattr(node, 'dtype', None)
  return f'an array of shape {shape} and dtype {dtype}'


def keystr(keypath: Sequence[Any]) -> str:
  """``keypath`` as ``['a'][0]`` (``'the root'`` when empty)."""
  return ''.join(f'[{k!r}]' for k in keypath) or 'the root'
