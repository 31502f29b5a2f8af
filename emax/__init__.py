"""emax: exponential moving averages of parameters (any pytree) for JAX.

Pure functions (:func:`init`, :func:`update`, :func:`bias_correction`,
:func:`ema_params`) and an optax transformation (:func:`ema`) that chains after
any optimizer. Flax helpers live in :mod:`emax.flax` (imported on demand).
"""

from emax._core import EmaState
from emax._core import bias_correction
from emax._core import init
from emax._core import update
from emax._schedules import half_life_decay
from emax._schedules import inverse_power_decay
from emax._schedules import power_function_decay
from emax._schedules import sigma_rel_to_gamma
from emax._schedules import tf_decay
from emax._transform import ema
from emax._transform import ema_params
from emax._transform import get_ema_state

__version__ = '0.1.0'

__all__ = (
    'EmaState',
    'bias_correction',
    'ema',
    'ema_params',
    'get_ema_state',
    'half_life_decay',
    'init',
    'inverse_power_decay',
    'power_function_decay',
    'sigma_rel_to_gamma',
    'tf_decay',
    'update',
)
