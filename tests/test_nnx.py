"""emax.nnx: an evaluation model with the averaged params, model untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import emax
import emax.nnx
from helpers import assert_bitwise, lerp, max_diff

DECAY = 0.5


class Net(nnx.Module):

  def __init__(self, rngs, width=4):
    self.linear = nnx.Linear(3, width, rngs=rngs)
    self.bn = nnx.BatchNorm(width, momentum=0.8, rngs=rngs)
    self.drop = nnx.Dropout(0.25, rngs=rngs)
    self.out = nnx.Linear(width, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(nnx.relu(self.bn(self.linear(x)))))


def host(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.array(x)


def pure(tree):
  return jax.tree.map(host, nnx.as_pure(tree))


def loss_fn(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def train_step(model, optimizer, x, y):
  optimizer.update(model, nnx.grad(loss_fn)(model, x, y))


@nnx.jit(donate_argnums=(0, 1))
def donated_step(model, optimizer, x, y):
  optimizer.update(model, nnx.grad(loss_fn)(model, x, y))


def batches(n=3, seed=0):
  rng = np.random.default_rng(seed)
  return [(jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
           jnp.asarray(rng.normal(size=(8, 2)), jnp.float32))
          for _ in range(n)]


def train(tx, decays, steps=3):
  """A model trained ``steps`` steps, and float32 references per decay."""
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  refs = {k: pure(nnx.state(model, nnx.Param)) for k in decays}
  for x, y in batches(steps):
    train_step(model, optimizer, x, y)
    new = pure(nnx.state(model, nnx.Param))
    refs = {k: lerp(refs[k], new, d) for k, d in decays.items()}
  return model, optimizer, refs


@pytest.fixture(scope='module')
def trained():
  model, optimizer, refs = train(optax.chain(optax.sgd(0.2), emax.ema(DECAY)),
                                 {None: DECAY})
  return model, optimizer, refs[None]


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


def test_ema_model_survives_donating_the_training_state():
  """No buffer of the eval model belongs to the training one."""
  model = Net(nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, emax.with_ema(optax.sgd(0.2), DECAY),
                            wrt=nnx.Param)
  data = batches(2, seed=1)
  donated_step(model, optimizer, *data[0])
  evaluated = emax.nnx.ema_model(model, optimizer)
  snapshot = pure(nnx.state(evaluated))
  training_arrays = [model.bn.mean.get_value(), model.bn.var.get_value(),
                     model.linear.kernel.get_value()]
  donated_step(model, optimizer, *data[1])
  assert all(x.is_deleted() for x in training_arrays)  # donation happened
  arrays = jax.tree.leaves(nnx.as_pure(nnx.state(evaluated)))
  assert not any(x.is_deleted() for x in arrays)
  jax.tree.map(np.testing.assert_array_equal, pure(nnx.state(evaluated)),
               snapshot)
  evaluated.eval()
  assert bool(jnp.all(jnp.isfinite(evaluated(jnp.ones((2, 3))))))


def test_with_ema_and_named_averages():
  decays = {'fast': 0.5, 'slow': 0.9}
  model, optimizer, refs = train(emax.with_ema(optax.sgd(0.2), decays),
                                 decays)
  for name in decays:
    got = pure(emax.nnx.ema_params(optimizer, name))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 got, refs[name])
    evaluated = emax.nnx.ema_model(model, optimizer, name)
    assert_bitwise(pure(nnx.state(evaluated, nnx.Param)), got)
  assert max_diff(refs['fast'], refs['slow']) > 1e-3
  # Each named average equals a single average with its decay, bit for bit.
  _, single, _ = train(emax.with_ema(optax.sgd(0.2), decays['slow']), {})
  assert_bitwise(pure(emax.nnx.ema_params(single)),
                 pure(emax.nnx.ema_params(optimizer, 'slow')))
  with pytest.raises(ValueError, match=r"2 named averages, \['fast', 'slow'\]"):
    emax.nnx.ema_params(optimizer)
  with pytest.raises(ValueError, match=r"no average named 'mid'.*"
                     r"\['fast', 'slow'\]"):
    emax.nnx.ema_model(model, optimizer, 'mid')


def test_pack_inside_an_nnx_optimizer():
  """pack=True in an nnx.Optimizer, with named averages."""
  decays = {'fast': 0.5, 'slow': 0.9}
  model, optimizer, refs = train(
      emax.with_ema(optax.sgd(0.2), decays, pack=True), decays)
  for name in decays:
    got = pure(emax.nnx.ema_params(optimizer, name))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 got, refs[name])
    evaluated = emax.nnx.ema_model(model, optimizer, name)
    assert_bitwise(pure(nnx.state(evaluated, nnx.Param)), got)


def test_ema_model_errors(trained):
  model, optimizer, _ = trained
  plain = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  with pytest.raises(ValueError, match='with none inside.*emax.with_ema'):
    emax.nnx.ema_model(model, plain)
  with pytest.raises(TypeError, match='expected an nnx.Optimizer'):
    emax.nnx.ema_model(model, optax.sgd(0.1))
  with pytest.raises(TypeError, match='expected an nnx.Optimizer'):
    emax.nnx.ema_params(optax.sgd(0.1))
  with pytest.raises(ValueError, match='single, unnamed average'):
    emax.nnx.ema_params(optimizer, 'slow')


def test_ema_model_checks_shapes_and_names_the_leaf(trained):
  """A model of other shapes is refused, not half-built."""
  _, optimizer, _ = trained
  wider = Net(nnx.Rngs(0), width=5)  # same structure, other shapes
  with pytest.raises(ValueError, match=r"model's \['bn'\]\['bias'\] has shape"
                     r' \(5,\) but its average has shape \(4,\).*the model'
                     ' this optimizer trains'):
    emax.nnx.ema_model(wider, optimizer)
  other = nnx.Linear(3, 4, rngs=nnx.Rngs(0))  # other structure
  with pytest.raises(ValueError, match=r"not the averaged ones.*\['linear'\]"
                     r"\['kernel'\]"):
    emax.nnx.ema_model(other, optimizer)


def test_ema_model_refuses_a_transposed_kernel(trained):
  """Same number of elements, other shape: refused, naming the kernel."""
  _, optimizer, _ = trained
  transposed = Net(nnx.Rngs(0))
  kernel = transposed.linear.kernel[...]
  assert kernel.shape == (3, 4)
  transposed.linear.kernel = nnx.Param(kernel.T)
  with pytest.raises(ValueError, match=r"model's \['linear'\]\['kernel'\] has"
                     r' shape \(4, 3\) but its average has shape \(3, 4\)'):
    emax.nnx.ema_model(transposed, optimizer)


# --- a decay of 0 is a bitwise copy -----------------------------------------


def schedule_zero(count):
  return jnp.where(count >= 0, 0.0, 0.5)  # 0, but traced through the count


def big_and_small(model):
  """Averages far from the params: ``a - (a - p) != p`` for many elements."""
  rng = np.random.default_rng(7)
  params = nnx.as_pure(nnx.state(model, nnx.Param))

  def draw(scale):
    return jax.tree.map(
        lambda x: jnp.asarray(scale * rng.random(x.shape), x.dtype), params)

  big, small = draw(1e8), draw(1.0)
  for a, p in zip(jax.tree.leaves(big), jax.tree.leaves(small)):
    a, p = np.asarray(a), np.asarray(p)
    assert np.any(a - (a - p) != p)  # arithmetic would not give p back
  return big, small


@pytest.mark.parametrize('decay', ['constant', 'schedule', 'traced'])
def test_decay_zero_is_a_bitwise_copy(decay):
  graphdef, state = nnx.split(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
  state = nnx.as_pure(state)  # arrays: merge builds fresh variables
  big, small = big_and_small(nnx.merge(graphdef, state))

  def run(d, big, small):
    model = nnx.merge(graphdef, state)
    nnx.update(model, big)
    optimizer = nnx.Optimizer(model, emax.with_ema(optax.sgd(1.0), d),
                              wrt=nnx.Param)  # the average starts at big
    nnx.update(model, small)
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    optimizer.update(model, zeros)  # sgd: small + (-0.0) == small
    return (nnx.as_pure(nnx.state(model, nnx.Param)),
            emax.nnx.ema_params(optimizer),
            nnx.as_pure(nnx.state(emax.nnx.ema_model(model, optimizer),
                                  nnx.Param)))

  if decay == 'traced':
    out = jax.jit(run)(jnp.float32(0.0), big, small)
  else:
    d = 0.0 if decay == 'constant' else schedule_zero
    out = jax.jit(lambda b, s: run(d, b, s))(big, small)
  params, averaged, evaluated = (pure(x) for x in out)
  assert_bitwise(params, pure(small))
  assert_bitwise(averaged, pure(small))
  assert_bitwise(evaluated, pure(small))
