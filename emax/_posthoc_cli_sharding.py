"""The sharded command line's flags: ``--mesh`` and ``--shard`` rules.

``python -m emax.posthoc --mesh data=2,model=4 --shard '.*kernel=data,model'``
gives :func:`emax.posthoc.from_checkpoints` a ``NamedSharding`` per param:
the mesh over all devices (:func:`make_mesh`), and for each param the spec
of the first rule whose regex matches its path, its keys joined by ``'/'``
(:func:`sharding_tree`, from the checkpoint's metadata: no array is read).
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from emax import _checkpoint_files
from emax import _posthoc_checkpoints


def parse_mesh(value: str) -> dict[str, int]:
  """``--mesh AXIS=SIZE[,AXIS=SIZE...]``: ``{axis: size}``, in order."""
  axes: dict[str, int] = {}
  for entry in value.split(','):
    name, _, size = entry.strip().partition('=')
    name = name.strip()
    if not (name.isidentifier() and size.strip().isdigit()
            and int(size) > 0) or name in axes:
      raise argparse.ArgumentTypeError(
          f'--mesh takes AXIS=SIZE entries joined by commas, each axis once'
          f' and each size a positive integer, e.g. --mesh data=2,model=4;'
          f' got {value!r}.')
    axes[name] = int(size)
  return axes


class Rule(NamedTuple):
  """One ``--shard REGEX=SPEC``: per dimension, its mesh axes or None."""
  text: str
  pattern: re.Pattern[str]
  spec: tuple[tuple[str, ...] | None, ...]

  def partition_spec(self) -> PartitionSpec:
    return PartitionSpec(*(None if a is None else a[0] if len(a) == 1 else a
                           for a in self.spec))


def parse_shard(value: str) -> Rule:
  """``--shard REGEX=SPEC``, e.g. ``'.*kernel=data,model'``."""
  regex, equals, spec = value.rpartition('=')
  if not equals or not regex:
    raise argparse.ArgumentTypeError(
        f'--shard takes REGEX=SPEC, e.g. --shard \'.*kernel=data,model\','
        f' got {value!r}.')
  try:
    pattern = re.compile(regex)
  except re.error as e:
    raise argparse.ArgumentTypeError(
        f'--shard {value!r}: {regex!r} is no regular expression ({e}).'
    ) from None
  dims: list[tuple[str, ...] | None] = []
  for entry in (spec.split(',') if spec.strip() else []):
    entry = entry.strip()
    if entry in ('', 'None'):
      dims.append(None)
      continue
    names = tuple(a.strip() for a in entry.split('+'))
    if not all(a.isidentifier() for a in names):
      raise argparse.ArgumentTypeError(
          f'--shard {value!r}: SPEC lists one entry per dimension, each a'
          ' mesh axis, axes joined by + (data+model), or None; got'
          f' {entry!r}.')
    dims.append(names)
  return Rule(value, pattern, tuple(dims))


def check_axes(rules: list[Rule], mesh: dict[str, int]) -> None:
  """Every axis a rule names is one of ``--mesh``'s, once per rule."""
  for rule in rules:
    named = [a for axes in rule.spec if axes for a in axes]
    unknown = sorted(set(named) - set(mesh))
    if unknown:
      raise ValueError(f'--shard {rule.text!r} names {unknown}, which --mesh'
                       f' does not have; its axes are {list(mesh)}.')
    twice = sorted({a for a in named if named.count(a) > 1})
    if twice:
      raise ValueError(f'--shard {rule.text!r} uses {twice} for two'
                       ' dimensions; a mesh axis can split one only.')


def make_mesh(axes: dict[str, int]) -> Mesh:
  """The ``--mesh`` over all devices (of every process)."""
  count = jax.device_count()
  if math.prod(axes.values()) != count:
    given = ','.join(f'{a}={n}' for a, n in axes.items())
    raise ValueError(
        f'--mesh {given} lays out {math.prod(axes.values())} devices, but'
        f' there are {count} (jax.device_count(), over all processes).'
        f' Give sizes that multiply to {count}, e.g. --mesh data={count}.')
  return jax.make_mesh(tuple(axes.values()), tuple(axes),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def _leaf_sharding(mesh: Mesh, rule: Rule | None, path: str,
                   shape: tuple[int, ...]) -> NamedSharding:
  """The sharding ``rule`` gives the leaf at ``path`` (replicated: None)."""
  if rule is None:
    return NamedSharding(mesh, PartitionSpec())
  if len(rule.spec) > len(shape):
    raise ValueError(
        f'--shard {rule.text!r} matches {path} (shape {shape}) but gives'
        f' {len(rule.spec)} dimensions, {rule.partition_spec()}, and it has'
        f' {len(shape)}. Give at most {len(shape)}, or a regex that leaves'
        ' it out.')
  for d, axes in enumerate(rule.spec):
    ways = math.prod(mesh.shape[a] for a in axes or ())
    if shape[d] % ways:
      raise ValueError(
          f'--shard {rule.text!r} splits dimension {d} of {path} (shape'
          f' {shape}) {ways} ways (over {"+".join(axes or ())}), and'
          f' {shape[d]} is not divisible by {ways}. Choose axes whose sizes'
          ' divide it, or None for that dimension.')
  return NamedSharding(mesh, rule.partition_spec())


def sharding_tree(mesh: Mesh, rules: list[Rule], directory: Any, *,
                  item: str | None, path: list[str] | None,
                  sigma_rels: Any) -> Any:
  """A ``NamedSharding`` per leaf of the params that
  :func:`emax.posthoc.from_checkpoints` rebuilds from ``directory``, from the
  ``--shard`` rules and each leaf's stored path and shape.

  Reads the metadata of the first checkpoint alone (no array), as the
  reconstruction does: every checkpoint it reads must hold the same leaves.
  ``item``, ``path`` and ``sigma_rels`` (``--tracked``) find the average.
  """
  _, found = _checkpoint_files.finished_steps(directory,
                                              'python -m emax.posthoc')
  first = min(found)
  with _checkpoint_files.Reader() as reader:
    c = _posthoc_checkpoints.Checkpoint(
        reader, first, found[first], item=item, path=path, like=None,
        sigma_rels=sigma_rels, sigma_rels_arg='--tracked')
  leaves = c.result_leaves()
  paths = ['/'.join(str(k) for k in leaf.path) for leaf in leaves]
  shapes = [leaf.shape for leaf in leaves]
  unused = [r.text for r in rules
            if not any(r.pattern.fullmatch(p) for p in paths)]
  if unused:
    shown = ', '.join(f'{p} {s}' for p, s in zip(paths, shapes))
    raise ValueError(
        f'--shard {", ".join(map(repr, unused))} matches no param; the'
        f' averaged params are (path shape): {shown}. A REGEX must match a'
        " whole path, e.g. '.*kernel'; params outside the average's mask"
        ' (mask=) are not averaged, so not rebuilt or sharded here.')
  return c.plan.shape([
      _leaf_sharding(mesh, next((r for r in rules if r.pattern.fullmatch(p)),
                                None), p, shape)
      for p, shape in zip(paths, shapes)])
