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


@pytest.fixture(autouse=True)
def _strict_promotion():
  with jax.numpy_dtype_promotion('strict'):
    yield
