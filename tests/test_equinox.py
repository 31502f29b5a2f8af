"""Equinox models: the arrays filtered out of the model, the average combined
back into it, and a clear error for a whole model passed as params."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import emax

eqx = pytest.importorskip('equinox')


def test_filtered_model_average_matches_reference():
  model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  tx = emax.with_ema(optax.sgd(0.1), 0.9)
  opt_state = tx.init(params)

  @eqx.filter_jit
  def step(params, opt_state, x, y):
    loss = lambda p: jnp.mean((eqx.combine(p, static)(x) - y) ** 2)
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return eqx.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(0)
  history = [params]
  for _ in range(5):
    x = jnp.asarray(rng.normal(size=(2,)).astype(np.float32))
    params, opt_state = step(params, opt_state, x, jnp.ones(1))
    history.append(params)

  average = emax.ema_params(opt_state)
  ema_model = eqx.combine(average, model)
  assert ema_model.activation is model.activation
  # Reference: the float64 average of the float32 param sequence.
  want = [np.asarray(l, np.float64) for l in jax.tree.leaves(history[0])]
  for p in history[1:]:
    want = [0.9 * w + 0.1 * np.asarray(l, np.float64)
            for w, l in zip(want, jax.tree.leaves(p))]
  got = jax.tree.leaves(eqx.filter(ema_model, eqx.is_inexact_array))
  assert len(got) == len(want) == 4
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-6,
                               atol=1e-7)
  assert ema_model(jnp.ones(2)).shape == (1,)


@pytest.mark.parametrize('entry', ['init', 'with_ema', 'update'])
def test_whole_model_is_refused_naming_the_leaves_and_the_filter(entry):
  model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
  params = eqx.filter(model, eqx.is_inexact_array)
  with pytest.raises(TypeError) as e:
    if entry == 'init':
      emax.init(model)
    elif entry == 'with_ema':
      emax.with_ema(optax.sgd(0.1), 0.9).init(model)
    else:
      emax.update(emax.init(params), model, 0.9)
  message = str(e.value)
  for words in ('.activation (custom_jvp)', '.final_activation (function)',
                'eqx.filter(model, eqx.is_inexact_array)', 'eqx.combine'):
    assert words in message


def test_non_array_leaf_in_a_dict_is_named():
  with pytest.raises(TypeError, match=r"\['name'\] \(str\).*arrays alone"):
    emax.init({'w': jnp.ones(2), 'name': 'dense'})
