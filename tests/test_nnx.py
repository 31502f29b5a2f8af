"""emax.nnx: an evaluation model with the averaged params, model untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import emax
import emax.nnx

DECAY = 0.5


class Net(nnx.Module):

  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.8, rngs=rngs)
    self.drop = nnx.Dropout(0.25, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(nnx.relu(self.bn(self.linear(x)))))


def host(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.array(x)


def pure(tree):
  return jax.tree.map(host, nnx.as_pure(tree))


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)
  grads = nnx.grad(loss_fn)(model)
  optimizer.update(model, grads)


@pytest.fixture(scope='module')
def trained():
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, optax.chain(optax.sgd(0.2), emax.ema(DECAY)), wrt=nnx.Param)
  ref = pure(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(0)
  one_minus = np.float32(1 - DECAY)
  for _ in range(3):
    x = jnp.asarray(rng.normal(size=(8, 3)).astype(np.float32))
    y = jnp.asarray(rng.normal(size=(8, 2)).astype(np.float32))
    train_step(model, optimizer, x, y)
    ref = jax.tree.map(lambda a, p: a - one_minus * (a - p), ref,
                       pure(nnx.state(model, nnx.Param)))
  return model, optimizer, ref


def test_ema_model_carries_the_average_and_the_rest(trained):
  model, optimizer, ref = trained
  before = pure(nnx.state(model))
  evaluated = emax.nnx.ema_model(model, optimizer)
  assert type(evaluated) is Net
  got = pure(nnx.state(evaluated, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               got, ref)
  diff = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), got,
                      pure(nnx.state(model, nnx.Param)))
  assert max(jax.tree.leaves(diff)) > 1e-3  # the average, not the params
  jax.tree.map(np.testing.assert_array_equal,
               pure(nnx.state(evaluated, nnx.BatchStat)),
               pure(nnx.state(model, nnx.BatchStat)))
  jax.tree.map(np.testing.assert_array_equal,
               pure(emax.nnx.ema_params(optimizer)), ref)

  # Running the eval model in training mode changes its BatchNorm statistics
  # and RNG counts, never the training model's.
  evaluated.train()
  evaluated(jnp.ones((5, 3)))
  assert float(jnp.max(jnp.abs(evaluated.bn.mean[...] - model.bn.mean[...]))
               ) > 0
  jax.tree.map(np.testing.assert_array_equal, pure(nnx.state(model)), before)
  assert evaluated.bn.mean is not model.bn.mean
  assert evaluated.linear.kernel is not model.linear.kernel


def test_ema_model_errors(trained):
  model, _, _ = trained
  plain = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  with pytest.raises(ValueError, match='with none inside.*emax.with_ema'):
    emax.nnx.ema_model(model, plain)
  with pytest.raises(TypeError, match='Expected an nnx.Optimizer'):
    emax.nnx.ema_model(model, optax.sgd(0.1))
