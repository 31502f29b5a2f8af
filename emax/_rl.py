"""Target networks: the timing of a DQN-style loop as options of an average.

A DQN loop counts environment steps: it trains every ``train_frequency`` env
steps once more than ``learning_starts`` have passed, and moves the target
network toward the online one every ``target_network_frequency`` env steps.
An average inside the optimizer counts training steps instead; this module
turns the one count into the other.
"""

from __future__ import annotations

from typing import Any

from emax import _options


def _count(value: Any, name: str, minimum: int) -> int:
  """An env-step count; a float with an int value too (CleanRL's defaults
  are written ``5e3``)."""
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  return _options.check_int(value, name, minimum)


def target_network_options(learning_starts: int, train_frequency: int,
                           target_network_frequency: int,
                           tau: float = 1.0) -> dict[str, Any]:
  """The options of :func:`emax.with_ema` for a DQN-style target network.

  Reproduces this loop (CleanRL's ``dqn_jax.py``), which counts env steps
  ``global_step = 0, 1, 2, ...``::

    if global_step > learning_starts:
      if global_step % train_frequency == 0:
        params = train(params)
      if global_step % target_network_frequency == 0:
        target = optax.incremental_update(params, target, tau)

  with the target as an average of the params taken inside the training
  step: ``emax.with_ema(optimizer, **options)``, read with
  ``emax.ema_params(opt_state)``. The target starts as a copy of the params,
  as the loop's does. emax moves the target inside a training step, so each
  target update must fall on an env step that trains:
  ``target_network_frequency`` must be a multiple of ``train_frequency``.
  The average is then taken every ``target_network_frequency //
  train_frequency`` training steps, the first one on the training step at
  the first multiple of ``target_network_frequency`` after
  ``learning_starts``.

  The options are ``step_size=tau`` (the weight of the new params, applied
  as given on each target update: ``per_update=True``), ``update_every``,
  ``first_update`` and ``rounding='optax'``, which computes ``tau * params
  + (1 - tau) * target`` as ``optax.incremental_update`` does (``tau=1`` is
  an exact copy). Add others as keywords, e.g. ``emax.with_ema(opt,
  **options, skip_nonfinite=False)`` to take a non-finite step in as the
  loop would.

  Args:
    learning_starts: env steps before training starts (the loop trains on
      env steps strictly greater than it); an int >= 0, or a float with an
      int value (``5e3``), as for the other two counts.
    train_frequency: train every this many env steps; an int >= 1 (1 for a
      loop that trains on every env step, as SAC and TD3 do).
    target_network_frequency: update the target every this many env steps;
      a multiple of ``train_frequency``.
    tau: the step size of a target update, in ``[0, 1]``; 1 (the default)
      copies the params. Passed on as given: ``np.float32(tau)`` where the
      loop holds ``tau`` as a float32.

  Returns:
    A dict of keyword arguments for :func:`emax.with_ema` (or
    :func:`emax.ema`).

  Raises:
    TypeError: if a count is not an int (or a float with an int value), or
      ``tau`` not a number.
    ValueError: if a count is out of range, ``target_network_frequency`` is
      not a multiple of ``train_frequency``, or ``tau`` is outside ``[0,
      1]``.

  Examples:
    >>> import optax, emax
    >>> options = emax.target_network_options(
    ...     learning_starts=100, train_frequency=10,
    ...     target_network_frequency=500)
    >>> options
    {'step_size': 1.0, 'update_every': 50, 'first_update': 40,
     'per_update': True, 'rounding': 'optax'}
    >>> tx = emax.with_ema(optax.adam(1e-3), **options)

    The first target update is at env step 500, the 40th training step
    (env steps 110, 120, ..., 500); then every 50 training steps.
  """
  starts = _count(learning_starts, 'learning_starts', 0)
  every = _count(train_frequency, 'train_frequency', 1)
  target_every = _count(target_network_frequency, 'target_network_frequency',
                        1)
  _options.check_constant(tau, 'tau')  # passed on as given: a float32 stays
  if target_every % every:
    lower = max(every, target_every - target_every % every)
    raise ValueError(
        f'target_network_frequency must be a multiple of train_frequency'
        f' ({every}), got {target_every} instead: the target is updated'
        ' inside a training step, so its updates must fall on training steps'
        f' at a fixed period. Use e.g. {lower} or {lower + every}.')
  period = target_every // every
  # Training step n (from 1) runs at env step every * (starts // every + n);
  # it updates the target when that env step is a multiple of target_every.
  first = period - (starts // every) % period
  return dict(step_size=tau, update_every=period, first_update=first,
              per_update=True, rounding='optax')
