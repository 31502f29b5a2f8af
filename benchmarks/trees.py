"""Parameter trees shaped like real models, for the benchmarks.

Only shapes and dtypes: the values are random, made with NumPy from a fixed
seed, so nothing is downloaded.
"""

from __future__ import annotations

import numpy as np


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


def transformer_2k():
  """A deep narrow transformer: 2,000 leaves, 33M params."""
  return transformer(128, 166, 2048, 256)[:2000]


def small_leaves(n: int = 20000, size: int = 256):
  """``n`` leaves of ``size`` floats each (per-leaf overhead dominates)."""
  return [(size,)] * n


def vector(n: int = 100_000_000):
  """One big vector."""
  return [(n,)]


def shrink(shapes, factor: float):
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
  """A dict of NumPy arrays ``{'p00000': ...}`` with the given shapes."""
  rng = np.random.default_rng(seed)
  width = len(str(len(shapes)))
  return {f'p{i:0{width}d}': rng.standard_normal(s, np.float32).astype(dtype)
          for i, s in enumerate(shapes)}
