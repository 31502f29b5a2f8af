"""Every layout behind every reader: plain trees out, the same values.

Layouts are private (plain, packed, offloaded, both, named): whatever the
state holds, every public reader returns trees shaped like the params, equal
to what the plain layout gives; a NaN anywhere skips the step in each; the
README's recipe runs with each.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import emax
import emax.checkpoint

LAYOUTS = {
    'plain': {},
    'packed': {'pack': True},
    'offloaded': {'offload': True},
    'packed+offloaded': {'pack': True, 'offload': True},
}
DECAYS = {'single': 0.75, 'named': {'fast': 0.5, 'slow': emax.tf_decay(0.9)}}


def _params():
  rng = np.random.default_rng(0)
  return {'w': jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
          'b': jnp.asarray(rng.normal(size=(3,)), jnp.bfloat16),
          'big': jnp.asarray(rng.normal(size=(300,)), jnp.float32),
          'n': jnp.asarray(3, jnp.int32)}


def _grads(params, k):
  return jax.tree.map(
      lambda p: (jnp.full(p.shape, 0.1 * k, p.dtype)
                 if jnp.issubdtype(p.dtype, jnp.floating) else None), params)


def _apply(params, updates):
  return jax.tree.map(lambda p, u: p if u is None else (p + u).astype(p.dtype),
                      params, updates, is_leaf=lambda x: x is None)


def _train(layout, decay, steps=3, nan_at=None):
  options = dict(LAYOUTS[layout])
  if options.get('pack'):
    options['pack'] = 64  # 'w' and 'b' packed, 'big' not: both kinds
  tx = emax.with_ema(optax.sgd(1.0), decay, **options)
  params = _params()
  opt_state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return _apply(params, updates), opt_state

  for k in range(steps):
    grads = _grads(params, k + 1)
    if k == nan_at:
      grads['big'] = grads['big'].at[7].set(jnp.nan)
    params, opt_state = step(params, opt_state, grads)
  return params, opt_state


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize('kind', ['single', 'named'])
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_every_reader_returns_plain_trees_equal_to_the_plain_layout(
    layout, kind):
  decay = DECAYS[kind]
  names = [None] if kind == 'single' else ['fast', 'slow']
  ref_params, ref = _train('plain', decay)
  params, state = _train(layout, decay)
  assert _bits(params) == _bits(ref_params)
  structure = jax.tree.structure(_params())
  for name in names:
    for dtypes in ('params', 'accumulator'):
      got = emax.ema_params(state, name, dtypes=dtypes)
      want = emax.ema_params(ref, name, dtypes=dtypes)
      assert jax.tree.structure(got) == structure
      assert _bits(got) == _bits(want), (dtypes, name)
    reset = emax.reset(state, params)
    assert _bits(emax.ema_params(reset, name)) == _bits(params)
  got, want = emax.metrics(state, params), emax.metrics(ref, params)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
  stored = emax.get_ema_state(state).average
  if layout != 'plain':  # not indexable, and says what to call instead
    with pytest.raises(TypeError, match=r'emax\.ema_params\(state\)'):
      stored['w']  # pylint: disable=pointless-statement


@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_a_nan_anywhere_skips_the_step_in_every_layout(layout):
  decay = DECAYS['named']
  _, clean = _train(layout, decay, steps=2)
  _, skipped = _train(layout, decay, steps=3, nan_at=2)
  assert int(emax.get_ema_state(skipped).skipped) == 1
  for name in ('fast', 'slow'):
    assert _bits(emax.ema_params(skipped, name)) == _bits(
        emax.ema_params(clean, name))


@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_checkpoints_restore_every_layout(layout, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  _, state = _train(layout, DECAYS['named'])
  manager = ocp.CheckpointManager(pathlib.Path(tmp_path).absolute())
  emax.checkpoint.save(manager, 3, state)
  restored = emax.checkpoint.restore(manager, state)
  for name in ('fast', 'slow'):
    assert _bits(emax.ema_params(restored, name)) == _bits(
        emax.ema_params(state, name))
    plain = manager.restore(3)  # no target: plain dicts
    got = emax.checkpoint.read_average(
        plain, name=name, like=jax.eval_shape(lambda: state))
    np.testing.assert_allclose(
        np.asarray(got['w'], np.float32),
        np.asarray(emax.ema_params(state, name)['w'], np.float32),
        rtol=1e-6)


@pytest.mark.standard_promotion  # optax.adamw is not strict-clean
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_the_readme_recipe_runs_with_every_layout(layout):
  """The README's train_step / eval_step, with the layout's options."""
  def loss_fn(params, batch):
    x, y = batch
    return jnp.mean((x @ params['w'] + params['b'] - y) ** 2)

  params = {'w': jnp.zeros((3, 1)), 'b': jnp.zeros((1,))}
  batch = (jnp.ones((8, 3)), jnp.ones((8, 1)))
  tx = emax.with_ema(optax.adamw(1e-3), decay=0.999, **LAYOUTS[layout])
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def eval_step(opt_state, batch):
    return loss_fn(emax.ema_params(opt_state), batch)

  for _ in range(3):
    params, opt_state = train_step(params, opt_state, batch)
  assert np.isfinite(float(eval_step(opt_state, batch)))


def test_pack_n_packs_leaves_of_exactly_n_elements():
  state = emax.init({'a': jnp.zeros(4), 'b': jnp.zeros(3), 'c': jnp.zeros(5)},
                    pack=4)
  layout = state.average.layout
  assert [len(g) for g in layout.groups] == [2]  # 'a' (4) and 'b' (3)
  assert len(state.average.rest) == 1  # 'c' (5 > 4) keeps its own array
  assert state.average.buffers[0].shape == (7,)


@pytest.mark.parametrize('layout', list(LAYOUTS))
@pytest.mark.parametrize('jit', [False, True])
def test_named_averages_of_non_scalar_int_leaves(layout, jit):
  # Int leaves are never averaged: every name reads the latest param, in its
  # own shape (no names axis), whatever the layout. A scalar int leaf would
  # hide a names axis taken from its first dimension.
  from reference import NumpyEma  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(7)

  def params_at(t):
    return {'w': rng.normal(size=(2, 3)).astype(np.float32),
            'i': np.arange(3, dtype=np.int32) * (t + 1),
            'm': np.full((2, 2), t, np.int32)}

  p0 = params_at(0)
  names = ('fast', 'slow')
  state = emax.init(jax.tree.map(jnp.asarray, p0), names=names,
                    **LAYOUTS[layout])
  ref = NumpyEma(jax.tree.leaves(p0), names=list(names))
  decays = {'fast': 0.5, 'slow': 0.9}
  update = jax.jit(emax.update) if jit else emax.update
  for t in range(1, 4):
    p = params_at(t)
    state = update(state, jax.tree.map(jnp.asarray, p), decays)
    ref.step(jax.tree.leaves(p), decays)
  for name in names:
    got = emax.ema_params(state, name)
    want = jax.tree.unflatten(jax.tree.structure(p0), ref.read(name))
    for key in p0:
      assert got[key].shape == p0[key].shape, (name, key)
      assert got[key].dtype == p0[key].dtype, (name, key)
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  reset = emax.reset(state, jax.tree.map(jnp.asarray, p0))
  for name in names:
    assert _bits(emax.ema_params(reset, name)) == _bits(p0)
