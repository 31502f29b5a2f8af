"""Named-tuple pytree nodes whose static part lives on their class.

The averages of a packed or offloaded state are pytree nodes with a static
part (where each leaf is packed; the structure and dtypes of the offloaded
leaves). :func:`typed` gives, for each value of that static part, one
subclass of a named tuple that carries it as the class attribute ``static``
and is registered with JAX (its fields are the children, the class is the
static part of the tree structure).

Because the node is a tuple with ``_fields``, ``flax.serialization`` stores
its fields and rebuilds it with ``type(target)(**fields)``, which keeps the
target's static part: the states round-trip through ``to_bytes`` /
``from_bytes`` without registering anything with flax, whatever the order in
which flax and emax are imported. Orbax sees the same fields as keys.
"""

from __future__ import annotations

from typing import Any

import jax

_TYPES: dict[tuple[type, Any], type] = {}


def typed(base: type, static: Any) -> type:
  """The subclass of named tuple ``base`` that carries ``static``.

  One class per ``(base, static)`` (``static`` must be hashable), registered
  with JAX once, so two nodes with equal static parts have equal tree
  structures.
  """
  key = (base, static)
  cls = _TYPES.get(key)
  if cls is not None:
    return cls
  fields = base._fields  # type: ignore[attr-defined]
  cls = type(base.__name__, (base,), {
      '__slots__': (), 'static': static, '__module__': base.__module__,
      '__qualname__': base.__qualname__})

  def flatten_with_keys(node: Any) -> tuple[Any, None]:
    return tuple((jax.tree_util.GetAttrKey(f), getattr(node, f))
                 for f in fields), None

  def flatten(node: Any) -> tuple[Any, None]:
    return tuple(getattr(node, f) for f in fields), None

  def unflatten(_: None, children: Any) -> Any:
    return tuple.__new__(cls, tuple(children))

  jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten,
                                          flatten)
  _TYPES[key] = cls
  return cls


def new(cls: type, base: type, static: Any, *fields: Any) -> Any:
  """A node of ``base`` with ``fields``; ``static=None`` keeps ``cls``'s.

  ``flax.serialization`` rebuilds a node as ``type(target)(**fields)``, with
  no static part: the target's class supplies it.
  """
  if static is None:
    static = getattr(cls, 'static', None)
    if static is None:
      raise TypeError(f'{base.__name__} needs its static part.')
  return tuple.__new__(typed(base, static), fields)
