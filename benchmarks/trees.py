"""Parameter trees shaped like real models, for the benchmarks.

Only shapes and dtypes: the values are random, made with NumPy from a fixed
seed, so nothing is downloaded. :func:`cases` lists the suite's trees;
:class:`Tree` and :class:`TrainProblem` are what the registered rows of
:mod:`benchmarks.peers` receive.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


# The names of the suite's trees (a table's key in the results).
RESNET50 = 'ResNet-50-like'
RESNET50_BF16 = 'ResNet-50-like, bf16 params'
LLAMA_BF16 = 'Llama-1B-like / 8, bf16 params'
LLAMA_SHRINK = 8.0
"""The Llama-like tree's own scale: its largest dimensions are divided by
this (and by the mode's ``shrink``): 1.2B bf16 params and their float32
average would not fit a small machine's run."""
GPT2_SMALL = 'GPT-2-small-like'
TRANSFORMER_2K = 'transformer, 2k leaves'
_SMALL_LEAVES = 'leaves x 256'


def small_leaves_name(n: int) -> str:
  """The name of the tree of ``n`` small leaves."""
  return f'{n:,} {_SMALL_LEAVES}'


def is_small_leaves(name: str) -> bool:
  """Whether ``name`` is a tree of many small leaves."""
  return name.endswith(_SMALL_LEAVES)


def resnet50() -> list[tuple[int, ...]]:
  """ResNet-50 (161 leaves, 25.6M params): convs, BatchNorm scale/bias, fc."""
  shapes = [(7, 7, 3, 64), (64,), (64,)]
  cin = 64
  for blocks, width in zip([3, 4, 6, 3], [64, 128, 256, 512]):
    for b in range(blocks):
      convs = [(1, 1, cin, width), (3, 3, width, width),
               (1, 1, width, 4 * width)]
      if b == 0:
        convs.append((1, 1, cin, 4 * width))
      for s in convs:
        shapes += [s, (s[-1],), (s[-1],)]
      cin = 4 * width
  return shapes + [(2048, 1000), (1000,)]


def transformer(d: int, layers: int, vocab: int, ctx: int):
  """GPT-2-style: embeddings, per layer 2 LayerNorms, qkv, proj, MLP."""
  shapes = [(vocab, d), (ctx, d)]
  for _ in range(layers):
    shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
               (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
  return shapes + [(d,), (d,)]


def gpt2_small():
  """GPT-2 small (148 leaves, 124M params)."""
  return transformer(768, 12, 50257, 1024)


def llama_1b():
  """Llama-3.2-1B's shapes (147 leaves, 1.24B params): embeddings, per layer
  two RMSNorm scales, q/k/v/o (grouped-query: k and v 512 wide), the gated
  MLP; the final norm and an untied output layer."""
  d, layers, ff, vocab, kv = 2048, 16, 8192, 128256, 512
  shapes = [(vocab, d)]
  for _ in range(layers):
    shapes += [(d,), (d, d), (d, kv), (d, kv), (d, d), (d,), (d, ff),
               (d, ff), (ff, d)]
  return shapes + [(d,), (d, vocab)]


def transformer_2k():
  """A deep narrow transformer: 2,000 leaves, 33M params."""
  return transformer(128, 166, 2048, 256)[:2000]


def small_leaves_shapes(n: int = 20000, size: int = 256):
  """``n`` leaves of ``size`` floats each (per-leaf overhead dominates)."""
  return [(size,)] * n


def vector(n: int = 100_000_000):
  """One big vector."""
  return [(n,)]


def shrink_shapes(shapes, factor: float):
  """Each shape with its largest dimension divided by ``factor`` (>= 1)."""
  out = []
  for s in shapes:
    s = list(s)
    if s:
      i = int(np.argmax(s))
      s[i] = max(1, int(s[i] / factor))
    out.append(tuple(s))
  return out


def size(shapes) -> int:
  return int(sum(np.prod(s, dtype=np.int64) for s in shapes))


def make(shapes, dtype, seed: int = 0):
  """A dict of NumPy arrays ``{'p00000': ...}`` with the given shapes.

  ``dtype`` may be ``'bfloat16'`` (through ``ml_dtypes``, which jax brings).
  """
  if dtype == 'bfloat16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    dtype = ml_dtypes.bfloat16
  rng = np.random.default_rng(seed)
  width = len(str(len(shapes)))
  # Uniform in [0, 1): finite, no subnormals, and cheaper to draw than
  # normals (the GPU run draws a 2 GB vector). Values do not change a step's
  # cost.
  return {f'p{i:0{width}d}': rng.random(s, np.float32).astype(dtype)
          for i, s in enumerate(shapes)}


def cases(*, shrink: float, small_leaves: int, vector_size: int,
          max_leaves: int | None = None, only=None):
  """The suite's trees: ``[(name, shapes, dtype)]``.

  Args:
    shrink: divides each leaf's largest dimension (1: the real sizes).
    small_leaves: leaves of the small-leaf tree (20,000 in the full run).
    vector_size: params of the one-vector tree.
    max_leaves: keep at most this many leaves per tree (the smoke run).
    only: names to keep (None: all); a name may be given by its prefix.
  """
  all_cases = [
      (RESNET50, shrink_shapes(resnet50(), shrink), np.float32),
      (GPT2_SMALL, shrink_shapes(gpt2_small(), shrink), np.float32),
      (TRANSFORMER_2K, shrink_shapes(transformer_2k(), shrink), np.float32),
      (small_leaves_name(small_leaves), small_leaves_shapes(small_leaves),
       np.float32),
      (f'one {vector_size / 1e6:g}M vector', vector(vector_size), np.float32),
      (RESNET50_BF16, shrink_shapes(resnet50(), shrink), 'bfloat16'),
      (LLAMA_BF16, shrink_shapes(llama_1b(), shrink * LLAMA_SHRINK),
       'bfloat16'),
  ]
  return [(name, shapes[:max_leaves], dtype)
          for name, shapes, dtype in all_cases
          if only is None or any(name.startswith(o) for o in only)]


def tree_bytes(tree) -> int:
  """Bytes of the arrays of a pytree."""
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class Tree:
  """One tree to measure, as the UPDATES builders receive it.

  Attributes:
    params, updates: the jax arrays (updates: ``1e-3`` everywhere).
    np_params: the same params in NumPy (for torch and the stacked route).
    n: params; unit: bytes of one param tree; pbytes: bytes per param;
      abytes: bytes per accumulator element (float32 for 16-bit params).
    many_leaves: a tree of many small leaves (its own extra rows).
    backend, threads, cooldown_s: where and how peers run.
  """
  name: str
  shapes: list
  dtype: Any
  np_params: dict
  params: dict
  updates: dict
  n: int
  unit: int
  pbytes: int
  abytes: int
  many_leaves: bool
  backend: str
  threads: int
  cooldown_s: float

  @classmethod
  def make(cls, name, shapes, dtype, *, backend, threads, cooldown_s,
           many_leaves=False):
    np_params = make(shapes, dtype)
    params = jax.tree.map(jnp.asarray, np_params)
    updates = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
    pbytes = np.dtype(np_params[next(iter(np_params))].dtype).itemsize
    return cls(name=name, shapes=shapes, dtype=dtype, np_params=np_params,
               params=params, updates=updates, n=size(shapes),
               unit=tree_bytes(params), pbytes=pbytes,
               abytes=max(4, pbytes), many_leaves=many_leaves,
               backend=backend, threads=threads, cooldown_s=cooldown_s)


@dataclasses.dataclass
class TrainProblem:
  """The MLP and batch of the train-step table, as TRAIN builders get it."""
  sizes: tuple
  params: list
  x: Any
  y: Any
  unit: int

  @classmethod
  def make(cls, sizes, batch, seed=0):
    rng = np.random.default_rng(seed)
    params = [dict(w=jnp.asarray(rng.standard_normal((a, b), np.float32)
                                 / np.float32(np.sqrt(a))),
                   b=jnp.zeros(b, jnp.float32))
              for a, b in zip(sizes[:-1], sizes[1:])]
    x = jnp.asarray(rng.standard_normal((batch, sizes[0]), np.float32))
    y = jnp.asarray(rng.integers(0, sizes[-1], batch), jnp.int32)
    return cls(tuple(sizes), params, x, y, tree_bytes(params))

  @staticmethod
  def loss(params, x, y):
    h = x
    for i, layer in enumerate(params):
      h = h @ layer['w'] + layer['b']
      if i < len(params) - 1:
        h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

  def fresh_params(self):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), self.params)
