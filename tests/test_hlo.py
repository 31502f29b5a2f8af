"""The compiled step's mechanisms, read from the optimized HLO (not timed).

- The NaN guard costs one reduction per float array (and an exact fallback
  under a conditional that runs only when the fast check fails); the rest of
  the step is the guard-off step: the same elementwise passes, no copies.
- K named averages read each param once: one fusion per leaf writes all K.
- TensorFlow's rounding costs no extra pass over the params.
"""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import emax
from helpers import child_env


def _params(n=6, size=4096):
  return {f'p{i}': jnp.full((size,), float(i), jnp.float32) for i in range(n)}


def _hlo(fn, *args, **kw):
  return jax.jit(fn, **kw).lower(*args).compile().as_text()


def _entry(hlo):
  """The ENTRY computation's instructions (the top-level program)."""
  body = hlo.split('ENTRY', 1)[1]
  return body.split('\n}', 1)[0]


def _ops(text, op):
  return re.findall(rf'= [^ ]+ {op}\(', text)


def _fusions(text):
  return re.findall(r'= [^=]*? fusion\(', text)


LARGE = 1 << 15  # above emax._numerics.SMALL_ARRAY: reduced one by one


def test_the_guard_adds_one_reduction_per_array_and_no_copy():
  params = _params(size=LARGE)
  state = emax.init(params)
  on = _hlo(lambda s, p: emax.update(s, p, 0.99), state, params,
            donate_argnums=0)
  off = _hlo(lambda s, p: emax.update(s, p, 0.99, skip_nonfinite=False),
             state, params, donate_argnums=0)
  # One fast reduction per float array at the top level (a fusion whose
  # computation reduces), the exact ones only inside the conditional.
  assert len(_ops(_entry(on), 'conditional')) == 1
  reductions = re.findall(r'reduce(?:-window)?\(', on)
  assert len(reductions) >= len(params)
  big_copies = lambda text: [c for c in re.findall(r'= (\S+) copy\(', text)  # noqa
                              if '[]' not in c]
  assert not big_copies(_entry(on)) and not big_copies(_entry(off))
  # The averaging passes are the guard-off ones: one fusion per leaf.
  assert len([f for f in _fusions(_entry(off))]) >= len(params)


_ONE_BUFFER = r"""
import re
import jax, jax.numpy as jnp, numpy as np
import emax
assert jax.device_count() == 1
params = {f'b{i:03d}': jnp.full((64,), float(i)) for i in range(300)}
params['big'] = jnp.ones((LARGE_SIZE,))
params.update({f'big{i}': jnp.ones((LARGE_SIZE,)) for i in range(20)})
state = emax.init(params)
text = jax.jit(lambda s, p: emax.update(s, p, 0.99), donate_argnums=0).lower(
    state, params).compile().as_text()
entry = text.split('ENTRY', 1)[1].split('\n}', 1)[0]
# The small leaves are concatenated into a few buffers; one fusion reads
# those into flags, one the big leaf, and a short tree reduces each.
concatenations = re.findall(r'= f32\[\d+\]\{0\} concatenate\(', entry)
assert 1 <= len(concatenations) <= 4, concatenations
flag_passes = re.findall(r'= pred\[\d*\]\S* fusion\(', entry)
assert len(flag_passes) <= 12 + 21 * 4, flag_passes  # not one per leaf
assert len(re.findall(r'reduce(?:-window)?\(', entry)) == 0
# Each averaging pass takes the step's one flag, not a flag per big leaf
# (XLA fused a chain of 21 `&` into every pass: compiling was quadratic in
# the leaves, minutes for 2,000).
scalars = set(re.findall(r'(%\S+) = pred\[\] ', entry))
for line in re.findall(r'= f32\[\d+\]\S* fusion\((.*?)\)', entry):
  operands = re.findall(r'%[\w.-]+', line)
  assert len([o for o in operands if o in scalars]) <= 2, line
# And it still sees a NaN in any small leaf, on an averaging step.
bad = dict(params, b123=params['b123'].at[5].set(jnp.nan))
for p in (params, bad):
  state = jax.jit(lambda s, p: emax.update(s, p, 0.99))(state, p)
assert int(state.skipped) == 1
np.testing.assert_array_equal(state.average['b123'], params['b123'])
print('ok')
""".replace('LARGE_SIZE', str(LARGE))


def test_small_arrays_are_checked_as_one_buffer_on_one_device():
  """Hundreds of small leaves on one device: one concatenation and one
  reduction, not one chain of reductions per leaf (which compiled for tens
  of seconds on CPU). A child process with a single device."""
  env = child_env()
  env['XLA_FLAGS'] = ''
  out = subprocess.run([sys.executable, '-c', _ONE_BUFFER], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-3000:]


def test_small_arrays_are_summed_where_they_lie_on_several_devices():
  """With several devices a param's sharding is unknown under jit, and a
  concatenation of sharded leaves would be gathered: each array is reduced
  where it lies (tests/test_collectives.py counts the collectives)."""
  assert jax.device_count() > 1
  params = {f'b{i:03d}': jnp.full((64,), float(i)) for i in range(20)}
  entry = _entry(_hlo(lambda s, p: emax.update(s, p, 0.99), emax.init(params),
                      params, donate_argnums=0))
  assert 'concatenate' not in entry
  bad = dict(params, b007=params['b007'].at[5].set(jnp.inf))
  state = emax.init(params)
  for p in (params, bad):
    state = jax.jit(lambda s, p: emax.update(s, p, 0.99))(state, p)
  assert int(state.skipped) == 1


def test_named_averages_read_each_param_once():
  params = _params(n=3, size=8192)
  state = emax.init(params, names=('a', 'b', 'c', 'd'))
  hlo = _hlo(lambda s, p: emax.update(
      s, p, {'a': 0.9, 'b': 0.99, 'c': 0.999, 'd': 0.5},
      skip_nonfinite=False), state, params, donate_argnums=0)
  entry = _entry(hlo)
  # Each param is an operand of exactly one fusion, which writes the
  # stacked (4, n) average of all four names.
  for i in range(3):
    name = re.search(rf'%(\S+) = f32\[8192\]\S* parameter\(\d+\).*p{i}',
                     entry)
    assert name, entry
    users = re.findall(rf'fusion\([^)]*%{re.escape(name.group(1))}[,)]',
                       entry)
    assert len(users) == 1, (i, users)
  assert len(re.findall(r'f32\[4,8192\]\S* fusion\(', entry)) == 3


def test_tensorflow_rounding_costs_no_extra_pass():
  params = _params()
  state = emax.init(params)
  tf = _entry(_hlo(lambda s, p: emax.update(s, p, 0.99, skip_nonfinite=False),
                   state, params, donate_argnums=0))
  lerp = _entry(_hlo(lambda s, p: emax.update(
      s, p, 0.99, rounding='lerp', skip_nonfinite=False), state, params,
                     donate_argnums=0))
  big = lambda text: [f for f in _fusions(text) if 'f32[4096]' in f]  # noqa
  assert len(big(tf)) == len(big(lerp)) == len(params)


def test_a_finite_flag_replaces_the_guards_pass():
  params = _params()
  state = emax.init(params)
  flagged = _entry(_hlo(lambda s, p, ok: emax.update(s, p, 0.99, finite=ok),
                        state, params, jnp.asarray(True), donate_argnums=0))
  assert not _ops(flagged, 'conditional')
  assert not re.findall(r'reduce\(', flagged)
  # And it is obeyed: a False flag skips the step.
  out = emax.update(state, params, 0.0, finite=jnp.asarray(False))
  assert int(out.skipped) == 1
  np.testing.assert_array_equal(out.average['p1'], params['p1'])
  tx = emax.with_ema(optax.sgd(1.0), 0.5)
  opt_state = tx.init(params)
  _, skipped = tx.update(params, opt_state, params, finite=jnp.asarray(False))
  assert int(emax.get_ema_state(skipped).skipped) == 1


def _param_users(entry, leaf, size):
  """The top-level instructions that read the param ``leaf`` of ``p``."""
  name = re.search(rf'%(\S+) = f32\[{size}\]\S* parameter\(\d+\).*'
                   rf'p\[.{{0,2}}{leaf}', entry)
  assert name, entry
  return re.findall(rf'\n\s*%\S+ = [^\n]*\([^\n]*%{re.escape(name.group(1))}'
                    r'[,)]', entry)


def test_the_guards_pass_is_separate_from_the_averaging_pass():
  """The premise of the benchmarks' floor rows for the NaN guard.

  All or nothing, in place: every new param is read by the check before any
  average is written, so the check cannot share the averaging pass. Here
  XLA reads each param in two top-level instructions (the check's reduction
  and the averaging fusion) and does not fuse them into one multi-output
  pass. If a future XLA fuses them this fails: revisit the floor.
  """
  params = _params(size=LARGE)
  state = emax.init(params)
  on = _entry(_hlo(lambda s, p: emax.update(s, p, 0.99), state, params,
                   donate_argnums=0))
  off = _entry(_hlo(lambda s, p: emax.update(s, p, 0.99,
                                             skip_nonfinite=False),
                    state, params, donate_argnums=0))
  for leaf in params:
    guarded = _param_users(on, leaf, LARGE)
    plain = _param_users(off, leaf, LARGE)
    assert len(plain) == 1, plain
    # The averaging fusion, the reduction, and the conditional's operand
    # (the exact fallback, run only when the fast check fails).
    readers = [u for u in guarded if 'tuple(' not in u]
    assert len(readers) == 2, guarded
    assert sum(f'f32[{LARGE}]' in u.split('=')[1].split('(')[0]
               for u in readers) == 1  # one writes the average, one reduces


def test_in_a_train_step_the_guard_reads_the_users_new_params():
  """Inside a jitted, donated train step the guard checks ``p + u`` as the
  user's ``optax.apply_updates`` computes it (one shared buffer): no copy of
  the params and no temporary tree over the guard-off step."""
  params = _params(size=1 << 16)

  def compiled(tx):
    def step(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    with jax.numpy_dtype_promotion('standard'):  # optax.adam's own mixing
      return jax.jit(step, donate_argnums=0).lower(
          (params, tx.init(params)), params).compile()

  on = compiled(optax.chain(optax.adam(1e-3), emax.ema(0.99)))
  off = compiled(optax.chain(optax.adam(1e-3),
                             emax.ema(0.99, skip_nonfinite=False)))
  tree_bytes = sum(x.nbytes for x in params.values())
  extra = (on.memory_analysis().temp_size_in_bytes
           - off.memory_analysis().temp_size_in_bytes)
  assert extra < tree_bytes / 8, (extra, tree_bytes)
  copies = [c for c in re.findall(r'= (\S+) copy\(', _entry(on.as_text()))
            if '[]' not in c]
  assert not copies



def test_the_clipping_norm_as_the_finite_flag_costs_no_pass():
  """``finite=jnp.isfinite(optax.global_norm(grads))`` next to
  ``optax.clip_by_global_norm``: XLA computes the norm once for both, so the
  guarded step has no reduction more than the step without an average
  (docs/scaling.md recommends it)."""
  params = _params(size=LARGE)

  def reductions(tx, finite):
    def step(carry, g):
      p, s = carry
      kw = {'finite': jnp.isfinite(optax.global_norm(g))} if finite else {}
      u, s = tx.update(g, s, p, **kw)
      return optax.apply_updates(p, u), s
    with jax.numpy_dtype_promotion('standard'):
      text = jax.jit(step, donate_argnums=0).lower(
          (params, tx.init(params)), params).compile().as_text()
    return len([line for line in _entry(text).split('\n')
                if 'reduce' in line and 'fusion(' in line])

  clip_adam = lambda: optax.chain(optax.clip_by_global_norm(1.0),  # noqa
                                  optax.adam(1e-3))
  plain = reductions(clip_adam(), finite=False)
  assert plain >= 1  # the clipping norm itself
  assert reductions(optax.chain(clip_adam(), emax.ema(0.99)),
                    finite=True) == plain
  assert reductions(optax.chain(clip_adam(), emax.ema(0.99)),
                    finite=False) > plain  # the guard's own pass


def test_16_bit_params_are_not_copied_to_float32_for_the_guard():
  """``jnp.sum`` converts bf16 to float32, the conversion the averaging
  pass makes too: merged, XLA wrote a float32 copy of every param for both
  (7x the guard-off step on a bf16 ResNet-50). Each conversion stays fused
  into its own pass: no temporary the size of the params. (float16 is not
  covered: XLA CPU writes the float32 copy for any float16 sum.)"""
  for dtype in (jnp.bfloat16,):
    params = {'w': jnp.ones((LARGE,), dtype), 'v': jnp.ones((64, 512), dtype)}
    state = emax.init(params)
    compiled = jax.jit(lambda s, p: emax.update(s, p, 0.99),
                       donate_argnums=0).lower(state, params).compile()
    nbytes = sum(x.size * 4 for x in params.values())
    assert compiled.memory_analysis().temp_size_in_bytes < nbytes / 8
    bad = dict(params, v=params['v'].at[3, 7].set(jnp.inf))
    out = jax.jit(lambda s, p: emax.update(s, p, 0.5))(state, bad)
    assert int(out.skipped) == 1
    np.testing.assert_array_equal(out.average['v'], np.ones((64, 512)))
