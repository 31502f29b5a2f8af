"""What an average costs in a whole train step: the share section.

Two models, each a jitted, donated train step of Adam at a small batch,
timed with the suite's one timer, with each way of adding an average:

* a GPT-2-style transformer (token and position embeddings, pre-LayerNorm
  attention and MLP blocks, the output tied to the token embedding), its
  layers stacked and run by ``lax.scan`` (one layer to compile);
* a ResNet-50-style conv net (bottleneck blocks of 1x1, 3x3, 1x1
  convolutions with projections, stages of 3, 4, 6, 3 blocks; BatchNorm as a
  per-channel scale and bias, without running statistics).

Each row's share is its step over its base step (plain Adam, or
``clip + adam`` for the clipping route), minus one, as a percentage: the
median of the per-round ratios with its 95% CI (:mod:`benchmarks.timing`).
The sizes per mode are in :data:`benchmarks.suite.MODES` (``share``); on a
small CPU the models are scaled down, on a GPU they have their real sizes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import emax
from benchmarks import peers
from benchmarks import rows
from benchmarks import timing
from benchmarks import trees

NAMES = ('fast', 'slow')
DECAYS = {'fast': 0.999, 'slow': 0.9999}


@dataclasses.dataclass
class Model:
  """A model to train: its params, one batch and its loss."""
  name: str
  describe: str
  params: Any
  batch: tuple
  loss: Callable

  @property
  def n(self) -> int:
    return int(sum(x.size for x in jax.tree.leaves(self.params)))


def _normal(rng, shape, scale):
  return jnp.asarray(rng.standard_normal(shape, np.float32) * scale)


# ------------------------------------------------------------ transformer


def transformer(*, d: int, layers: int, vocab: int, seq: int, batch: int,
                seed: int = 0) -> Model:
  """GPT-2-style, ``d`` wide, ``layers`` deep, heads of 64 (or fewer)."""
  rng = np.random.default_rng(seed)
  w = lambda *s: _normal(rng, s, 0.02)  # noqa: E731
  ones, zeros = (lambda n: jnp.ones(n)), (lambda n: jnp.zeros(n))
  # The layers stacked, one leaf per kind with a leading axis of `layers`,
  # and run by `lax.scan`, as scanned models keep them: one layer to compile.
  stack = lambda make: jnp.stack([make() for _ in range(layers)])  # noqa
  params = dict(
      wte=w(vocab, d), wpe=w(seq, d), ln_g=ones(d), ln_b=zeros(d),
      blocks=dict(ln1_g=stack(lambda: ones(d)), ln1_b=stack(lambda: zeros(d)),
                  qkv=stack(lambda: w(d, 3 * d)),
                  qkv_b=stack(lambda: zeros(3 * d)),
                  proj=stack(lambda: w(d, d)), proj_b=stack(lambda: zeros(d)),
                  ln2_g=stack(lambda: ones(d)), ln2_b=stack(lambda: zeros(d)),
                  fc=stack(lambda: w(d, 4 * d)),
                  fc_b=stack(lambda: zeros(4 * d)),
                  out=stack(lambda: w(4 * d, d)),
                  out_b=stack(lambda: zeros(d))))
  heads = max(1, d // 64)
  tokens = jnp.asarray(rng.integers(0, vocab, (batch, seq + 1)), jnp.int32)

  def norm(x, g, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * g + b

  def loss(p, tokens):
    x_in, y = tokens[:, :-1], tokens[:, 1:]
    t = x_in.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))

    def layer(h, blk):
      a = norm(h, blk['ln1_g'], blk['ln1_b']) @ blk['qkv'] + blk['qkv_b']
      q, k, v = (z.reshape(*z.shape[:2], heads, -1)
                 for z in jnp.split(a, 3, axis=-1))
      s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
      s = jnp.where(mask, s, -1e9)
      o = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, -1), v)
      h = h + o.reshape(h.shape) @ blk['proj'] + blk['proj_b']
      m = norm(h, blk['ln2_g'], blk['ln2_b']) @ blk['fc'] + blk['fc_b']
      return h + jax.nn.gelu(m) @ blk['out'] + blk['out_b'], None

    h, _ = jax.lax.scan(layer, p['wte'][x_in] + p['wpe'][:t], p['blocks'])
    logits = norm(h, p['ln_g'], p['ln_b']) @ p['wte'].T
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return Model(
      'transformer', f'GPT-2-style transformer, d={d}, {layers} layers'
      f' (stacked, under lax.scan), vocab {vocab:,}, batch {batch} x {seq}'
      ' tokens', params, (tokens,),
      loss)


# --------------------------------------------------------------- conv net


def convnet(*, width: float, image: int, batch: int, classes: int = 1000,
            blocks: tuple = (3, 4, 6, 3), seed: int = 0) -> Model:
  """ResNet-50-style; ``width`` scales every channel count (1: ResNet-50's
  25.6M params); ``blocks`` per stage (fewer: a smaller program to compile,
  for the smoke run)."""
  rng = np.random.default_rng(seed)
  ch = lambda c: max(1, int(round(c * width)))  # noqa: E731

  def conv(k, cin, cout):
    return dict(w=_normal(rng, (k, k, cin, cout),
                          math.sqrt(2.0 / (k * k * cin))),
                g=jnp.ones(cout), b=jnp.zeros(cout))

  params = dict(stem=conv(7, 3, ch(64)), stages=[])
  cin = ch(64)
  for count, wd in zip(blocks, [64, 128, 256, 512]):
    stage = []
    for b in range(count):
      blk = dict(c1=conv(1, cin, ch(wd)), c2=conv(3, ch(wd), ch(wd)),
                 c3=conv(1, ch(wd), ch(4 * wd)))
      if b == 0:
        blk['proj'] = conv(1, cin, ch(4 * wd))
      stage.append(blk)
      cin = ch(4 * wd)
    params['stages'].append(stage)
  params['fc'] = dict(w=_normal(rng, (cin, classes), 1 / math.sqrt(cin)),
                      b=jnp.zeros(classes))
  x = _normal(rng, (batch, image, image, 3), 1.0)
  y = jnp.asarray(rng.integers(0, classes, batch), jnp.int32)

  def apply(c, x, stride=1, relu=True):
    x = jax.lax.conv_general_dilated(
        x, c['w'], (stride, stride), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    x = x * c['g'] + c['b']
    return jax.nn.relu(x) if relu else x

  def loss(p, x, y):
    h = apply(p['stem'], x, 2)
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                              (1, 2, 2, 1), 'SAME')
    for s, stage in enumerate(p['stages']):
      for b, blk in enumerate(stage):
        stride = 2 if (b == 0 and s > 0) else 1
        r = apply(blk['c1'], h)
        r = apply(blk['c2'], r, stride)
        r = apply(blk['c3'], r, relu=False)
        skip = apply(blk['proj'], h, stride, relu=False) if 'proj' in blk \
            else h
        h = jax.nn.relu(r + skip)
    logits = h.mean((1, 2)) @ p['fc']['w'] + p['fc']['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return Model(
      'conv net', f'ResNet-50-style conv net, channels x{width:g}, blocks'
      f" {'-'.join(map(str, blocks))}, {classes} classes, batch {batch} x"
      f' {image}x{image}x3', params,
      (x, y), loss)


# ----------------------------------------------------------------- routes


def _adam():
  return optax.adam(1e-4)


def _clip_adam():
  return optax.chain(optax.clip_by_global_norm(1.0), _adam())


# (row, base row, the optimizer, finite= from the grads, needs pinned_host)
ROUTES = (
    (rows.SHARE_NONE, None, _adam, None, False),
    (rows.SHARE_WITH_EMA, rows.SHARE_NONE,
     lambda: emax.with_ema(_adam(), peers.DECAY), None, False),
    (rows.SHARE_UNGUARDED, rows.SHARE_NONE,
     lambda: emax.with_ema(_adam(), peers.DECAY, skip_nonfinite=False),
     None, False),
    (rows.SHARE_NAMED, rows.SHARE_NONE,
     lambda: emax.with_ema(_adam(), DECAYS), None, False),
    (rows.SHARE_OFFLOAD, rows.SHARE_NONE,
     lambda: emax.with_ema(_adam(), peers.DECAY, offload=True), None, True),
    (rows.SHARE_CLIP, None, _clip_adam, None, False),
    (rows.SHARE_CLIP_FINITE, rows.SHARE_CLIP,
     lambda: emax.with_ema(_clip_adam(), peers.DECAY),
     lambda g: jnp.isfinite(optax.global_norm(g)), False),
)


def _runner(model: Model, name: str, tx, finite) -> timing.Runner:
  def step(carry, *batch):
    p, s = carry
    g = jax.grad(model.loss)(p, *batch)
    kw = {} if finite is None else dict(finite=finite(g))
    u, s = tx.update(g, s, p, **kw)
    return optax.apply_updates(p, u), s

  params = jax.tree.map(lambda x: jnp.array(x, copy=True), model.params)
  return peers.jax_runner(name, step, (params, tx.init(params)),
                          *model.batch, unit=trees.tree_bytes(params))


def share(ctx) -> dict:
  """One table per model: every route, timed together."""
  sizes = ctx.mode['share']
  memories = [m.kind for m in jax.devices()[0].addressable_memories()]
  out = dict(memories=memories, models=[])
  for model in (transformer(**sizes['transformer']),
                convnet(**sizes['convnet'])):
    table = f'share, {model.name}'
    ctx.log(f'\n{table}: {model.describe}, {model.n / 1e6:.2f}M params')
    runners, bases = [], {}
    for name, base, make_tx, finite, pinned in ROUTES:
      if pinned and 'pinned_host' not in memories:
        ctx.skip('share', table, name, f'{jax.devices()[0].platform} has no'
                 f' pinned_host memory (has {memories})')
        continue
      impl = peers.Impl(name, lambda m=model, n=name, t=make_tx, f=finite:
                        _runner(m, n, t(), f))
      r = ctx.build('share', table, impl)
      if r is not None:
        runners.append(r)
        bases[name] = base
    times = ctx.measure(runners, ctx.mode.get('share_rounds'))
    table_rows = []
    for r in runners:
      row = dict(impl=r.name, **timing.summary(times[r.name]),
                 compile_s=r.info.get('compile_s'),
                 peak_units=r.info.get('peak_units'))
      base = bases[r.name]
      if base is not None and base in times:
        ratio = timing.paired_ratio(times[r.name], times[base])
        row.update(base=base, share_pct=100 * (ratio['median'] - 1),
                   share_ci_pct=[100 * (c - 1) for c in ratio['ci']])
      table_rows.append(row)
      ctx.log(f"  {r.name:<48} {row['median_ms']:9.2f} ms"
              + (f"  {row['share_pct']:+6.1f}% [{row['share_ci_pct'][0]:+.1f},"
                 f" {row['share_ci_pct'][1]:+.1f}]" if 'share_pct' in row
                 else ''))
    out['models'].append(dict(model=model.name, describe=model.describe,
                              params=model.n, rows=table_rows))
    del runners, times
  return out
