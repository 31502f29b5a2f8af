"""The names of the suite's rows, each defined once.

A row's name is its key everywhere: the registries of
:mod:`benchmarks.peers` and :mod:`benchmarks.offload` register rows under
these names, :mod:`benchmarks.suite` picks rows per mode by them,
:mod:`benchmarks.targets` reads its targets off them, and the tests check
that each is there. A name is also what the report prints.
"""

# --- ceiling: the bandwidth a plain `a += b` reaches -------------------------
CEILING_XLA = 'jitted donated add'
CEILING_NUMPY = 'NumPy in-place add'

# --- updates: one EMA step of a param tree, one table per tree ---------------
EMAX_UPDATE = 'emax.update'
EMAX_UPDATE_UNGUARDED = 'emax.update skip_nonfinite=False'
EMAX_UPDATE_PACKED = 'emax.update pack=True'
EMAX_UPDATE_LERP = "emax.update rounding='lerp' skip_nonfinite=False"
EMA_TX = 'emax.ema tx.update'
EMA_TX_UNGUARDED = 'emax.ema(skip_nonfinite=False) tx.update'
OPTAX_APPLY_INCREMENTAL = 'optax.apply_updates + incremental_update'
OPTAX_INCREMENTAL = 'optax.incremental_update'
OPTAX_EMA = 'optax.ema on params'
# What a user writes by hand for the NaN guard's semantics: the average moves
# only when every new param is finite (the `tx.update` form adds the updates
# first, as `optax.apply_updates`).
HAND_GUARDED = ('hand-written guard: all(isfinite(p)),'
                ' where(ok, incremental_update)')
HAND_GUARDED_TX = ('hand-written guard: apply_updates, all(isfinite),'
                   ' where(ok, incremental_update)')
READ_PARAMS_UPDATES = 'one read of p and u: sum(p) + sum(u)'
LERP_DONATED = 'tree.map lerp, donated'
LERP_NOT_DONATED = 'tree.map lerp, not donated'
TORCH_LERP = 'torch._foreach_lerp_'
IDENTITY = 'jitted identity over the leaves'
STACKED = 'stacked into one array: emax.update'

# --- options: emax.ema(0.999, <option>), standalone tx.update ----------------
OPT_UNGUARDED = 'skip_nonfinite=False'
OPT_DEFAULT = 'skip_nonfinite=True (default)'
OPT_DEBIAS = 'debias=True'
OPT_UPDATE_EVERY = 'update_every=4'
OPT_PACK = 'pack=True'
OPT_ROUNDING_LERP = "rounding='lerp'"
OPT_ROUNDING_OPTAX = "rounding='optax'"
OPT_STEP_SIZE = 'step_size=1 - d (instead of decay)'

# --- train: a jitted, donated Adam step on an MLP ----------------------------
ADAM = 'adam'
ADAM_EMA = 'adam + emax.ema'
ADAM_EMA_UNGUARDED = 'adam + emax.ema(skip_nonfinite=False)'
ADAM_EMA_LERP = "adam + emax.ema(rounding='lerp')"
ADAM_WITH_EMA = 'emax.with_ema(adam)'
ADAM_OPTAX_INCREMENTAL = 'adam + optax.incremental_update'
CLIP_ADAM = 'clip + adam'
CLIP_ADAM_EMA_UNGUARDED = 'clip + adam + emax.ema(skip_nonfinite=False)'
CLIP_ADAM_EMA_FINITE = 'clip + adam + emax.ema, finite= the norm'

# --- averages: K averages of one tree ----------------------------------------
NAMED = 'named averages (one state)'
NAMED_UNGUARDED = 'named averages, skip_nonfinite=False'
SEPARATE = 'K separate averages (K emax.update)'

# --- offload: the average in host memory -------------------------------------
ON_DEVICE = 'device'
OFFLOAD = 'offload'
OFFLOAD_UPDATE_EVERY = 'offload, update_every=4'
ROUND_TRIP = 'round trip (device_put there and back)'

# --- share: an average's share of a whole train step (Adam, small batch) ---
SHARE_NONE = 'adam, no average'
SHARE_WITH_EMA = 'emax.with_ema(adam, d)'
SHARE_UNGUARDED = 'emax.with_ema(adam, d, skip_nonfinite=False)'
SHARE_NAMED = 'emax.with_ema(adam, {2 names: d})'
SHARE_OFFLOAD = 'emax.with_ema(adam, d, offload=True)'
SHARE_CLIP = 'clip_by_global_norm + adam, no average'
SHARE_CLIP_FINITE = ('emax.with_ema(clip + adam, d), finite= from the'
                     ' clipping norm')

# A whole section that did not run, in the list of rows not run.
WHOLE_SECTION = '(whole section)'
