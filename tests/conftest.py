"""Test setup: 8 fake CPU devices and strict dtype promotion everywhere."""

import os

# Must happen before anything imports jax.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_numpy_dtype_promotion', 'strict')

import hypothesis  # noqa: E402

# CI runs a fixed set of examples (no flaky landings); locally they vary.
hypothesis.settings.register_profile('ci', derandomize=True, database=None)
if os.environ.get('CI'):
  hypothesis.settings.load_profile('ci')


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'standard_promotion: run with standard dtype promotion, for'
      ' tests that drive optax code which is not strict-clean (adam, optax.ema)')


@pytest.fixture(autouse=True)
def _strict_promotion(request):
  mode = ('standard' if request.node.get_closest_marker('standard_promotion')
          else 'strict')
  with jax.numpy_dtype_promotion(mode):
    yield
