"""emax: exponential moving averages of parameters (any pytree) for JAX.

Pure functions (:func:`init`, :func:`update`, :func:`ema_params`,
:func:`reset`, :func:`metrics`) and optax transformations (:func:`with_ema`,
:func:`ema`) that follow any optimizer. Flax helpers live in :mod:`emax.flax`
and :mod:`emax.nnx`, Orbax helpers in :mod:`emax.checkpoint`, post-hoc EMA in
:mod:`emax.posthoc`: each is imported on first use (``emax.flax`` after
``import emax`` works), so ``import emax`` loads neither flax nor orbax and
changes nothing outside emax.
"""

import importlib as _importlib

from emax._bema import BemaState
from emax._bema import bema
from emax._bema import bema_params
from emax._merge import merge_weights
from emax._read import ema_params
from emax._read import get_ema_state
from emax._read import metrics
from emax._rl import target_network_options
from emax._schedules import Schedule
from emax._schedules import gamma_to_sigma_rel
from emax._schedules import half_life_decay
from emax._schedules import inverse_power_decay
from emax._schedules import power_function_decay
from emax._schedules import scale_decay
from emax._schedules import sigma_rel_to_gamma
from emax._schedules import tf_decay
from emax._state import EmaState
from emax._state import init
from emax._step import reset
from emax._step import update
from emax._transform import WithEmaState
from emax._transform import ema
from emax._transform import with_ema

__version__ = '0.2.0.dev0'

__all__ = (
    'BemaState',
    'EmaState',
    'Schedule',
    'WithEmaState',
    'bema',
    'bema_params',
    'ema',
    'ema_params',
    'gamma_to_sigma_rel',
    'get_ema_state',
    'half_life_decay',
    'init',
    'inverse_power_decay',
    'merge_weights',
    'metrics',
    'power_function_decay',
    'reset',
    'scale_decay',
    'sigma_rel_to_gamma',
    'target_network_options',
    'tf_decay',
    'update',
    'with_ema',
)

_SUBMODULES = {
    'checkpoint': 'pip install "emax[flax]" (orbax-checkpoint)',
    'flax': 'pip install "emax[flax]"',
    'nnx': 'pip install "emax[flax]"',
    'posthoc': 'pip install "emax[flax]" (orbax-checkpoint, for checkpoints)',
}


def __getattr__(name: str) -> object:
  """Imports ``emax.checkpoint``, ``emax.flax``... on first use (PEP 562)."""
  if name not in _SUBMODULES:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  try:
    return _importlib.import_module(f'{__name__}.{name}')
  except ModuleNotFoundError as e:
    if (e.name or 'emax').partition('.')[0] == 'emax':
      raise
    raise ImportError(
        f'emax.{name} needs {e.name}, which is not installed:'
        f' {_SUBMODULES[name]}.') from e


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_SUBMODULES))
