"""The one timer of the suite, and the statistics its samples are read with.

Everything the suite times goes through :func:`measure`: the compared
implementations of one table are warmed up, then run in **rounds**; in each
round every implementation runs once, in a fresh random order. Machine drift
(another process, clock changes, a neighbour's cache) then hits all of them
alike, and sample ``i`` of one implementation and sample ``i`` of another come
from the same round: a **pair**. Differences and ratios are taken pair by pair
(:func:`paired_diff`, :func:`paired_ratio`) and summarized by their median and
a distribution-free 95% confidence interval of that median
(:func:`median_ci`), so a difference that noise could explain is seen as such.

A sample ends when the step's output is ready (``jax.block_until_ready``, or
the runner's own ``sync``, e.g. ``torch.cuda.synchronize``). On an accelerator
a single call can be shorter than the launch and sync latency; with
``min_sample_s`` a sample runs ``k`` calls back to back (``k`` fixed per runner
at warm-up) and counts the mean time per call.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np


def block(x: Any) -> Any:
  """Waits until every array in ``x`` is computed."""
  return jax.block_until_ready(x)


@dataclasses.dataclass
class Runner:
  """One implementation, ready to be timed.

  Attributes:
    name: the row's name.
    step: runs one call (for a donated state it keeps the new state itself)
      and returns what ``sync`` waits on.
    sync: waits until the call's work is done.
    steps_per_call: how many EMA steps one call makes (``update_every=4``
      rows run four steps per call); times are reported per step.
    cooldown_s: a pause after each call of this runner, for peers whose
      worker threads keep spinning after a call (torch's OpenMP pool) and
      would otherwise slow down whatever runs next.
    info: what the row reports besides its times (compile seconds, memory,
      bytes per param...).
  """
  name: str
  step: Callable[[], Any]
  sync: Callable[[Any], Any] = block
  steps_per_call: int = 1
  cooldown_s: float = 0.0
  info: dict = dataclasses.field(default_factory=dict)


def measure(runners: Sequence[Runner], rounds: int, *, warmup: int = 2,
            min_sample_s: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
  """Times ``runners`` interleaved; returns ``name -> seconds per step``.

  Args:
    runners: the implementations of one table (names must be unique).
    rounds: samples per runner. Round ``i`` runs every runner once, in a
      random order, so that ``out[a][i]`` and ``out[b][i]`` are a pair.
    warmup: untimed calls per runner first (after compilation).
    min_sample_s: the shortest sample wanted; a runner whose single call is
      shorter runs ``k`` calls per sample and reports their mean.
    seed: of the random order.

  Returns:
    A dict from runner name to an array of ``rounds`` times in seconds per
    EMA step.
  """
  names = [r.name for r in runners]
  if len(set(names)) != len(names):
    raise ValueError(f'runner names must be unique, got {names}')
  calls = {}
  for r in runners:
    out = None
    for _ in range(max(1, warmup)):
      t = time.perf_counter()
      out = r.step()
      r.sync(out)
      one = time.perf_counter() - t
    calls[r.name] = (1 if min_sample_s <= 0 else
                     int(min(1000, max(1, math.ceil(min_sample_s
                                                    / max(one, 1e-9))))))
    if r.cooldown_s:
      time.sleep(r.cooldown_s)
  out_times = {r.name: np.empty(rounds) for r in runners}
  order = np.random.default_rng(seed)
  for i in range(rounds):
    for j in order.permutation(len(runners)):
      r = runners[j]
      k = calls[r.name]
      t = time.perf_counter()
      out = None
      for _ in range(k):
        out = r.step()
      r.sync(out)
      out_times[r.name][i] = ((time.perf_counter() - t)
                              / (k * r.steps_per_call))
      if r.cooldown_s:
        time.sleep(r.cooldown_s)
  return out_times


def compile_jit(fn: Callable, *args, donate_argnums=()) -> tuple[Any, float]:
  """``jax.jit(fn)`` lowered and compiled for ``args``; and the seconds taken.

  Args and other inputs are passed at call time, never closed over, so that
  XLA cannot constant-fold them away.
  """
  jitted = jax.jit(fn, donate_argnums=donate_argnums)
  t = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t


def peak_bytes(compiled) -> float | None:
  """Peak bytes of one call of a compiled function, as XLA plans them.

  Arguments + outputs - donated (aliased) + temporaries; None where the
  backend does not report it.
  """
  try:
    m = compiled.memory_analysis()
    return float(m.argument_size_in_bytes + m.output_size_in_bytes
                 - m.alias_size_in_bytes + m.temp_size_in_bytes)
  except Exception:  # noqa: BLE001 (not every backend reports it)
    return None


# ------------------------------------------------------------- statistics


def _binom_cdf(k: int, n: int) -> float:
  """P(X <= k) for X ~ Binomial(n, 1/2)."""
  return sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n


def median_ci(x, conf: float = 0.95) -> tuple[float, float]:
  """A distribution-free confidence interval of the median of ``x``.

  The order statistics ``x_(k), x_(n+1-k)`` with the largest ``k`` whose
  binomial tail is at most ``(1 - conf) / 2``. Below 6 samples no such ``k``
  exists and the interval is ``[min, max]`` (a lower confidence).
  """
  x = np.sort(np.asarray(x, np.float64))
  n = len(x)
  alpha = (1 - conf) / 2
  # The largest j with P(X <= j - 1) <= alpha gives [x_(j), x_(n+1-j)].
  j = 0
  while j < n // 2 and _binom_cdf(j, n) <= alpha:
    j += 1
  if j == 0:
    return float(x[0]), float(x[-1])
  return float(x[j - 1]), float(x[n - j])


def summary(seconds) -> dict:
  """Median, 95% CI of the median, min, max and the samples, in ms.

  The samples are kept in round order, so that any two rows of one table
  can be paired later (:func:`paired_ratio` on ``samples_ms``).
  """
  ms = np.asarray(seconds, np.float64) * 1e3
  lo, hi = median_ci(ms)
  return dict(median_ms=float(np.median(ms)), ci_ms=[lo, hi],
              min_ms=float(ms.min()), max_ms=float(ms.max()),
              samples_ms=[float(v) for v in ms])


def paired_diff(a, b) -> dict:
  """``a - b`` pair by pair (same rounds), in ms: median, CI and a verdict.

  Returns:
    ``resolved`` is True when the CI lies wholly above zero: ``a`` is
    measurably slower than ``b``. Otherwise the difference is inside the
    noise and ``median_ms`` is None: a difference that noise can explain is
    never reported as a number (in particular never as a negative time).
    ``ci_ms`` is clipped at zero from below for the same reason; ``raw``
    keeps the unclipped statistics (a difference, not a time).
  """
  d = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) * 1e3
  lo, hi = median_ci(d)
  med = float(np.median(d))
  resolved = lo > 0
  return dict(resolved=bool(resolved), median_ms=med if resolved else None,
              ci_ms=[max(lo, 0.0), max(hi, 0.0)],
              raw=dict(median=med, lo=lo, hi=hi))


def paired_ratio(a, b) -> dict:
  """``a / b`` pair by pair (same rounds): median and 95% CI."""
  r = np.asarray(a, np.float64) / np.asarray(b, np.float64)
  lo, hi = median_ci(r)
  return dict(median=float(np.median(r)), ci=[lo, hi])
