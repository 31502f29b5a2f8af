"""Float32 results recorded from the real peers, for ``tests/test_peers.py``.

The tests regenerate every input from ``params_at`` below and compare emax's
averages with these bit patterns, so they run without any peer installed.
Recorded once, on CPU (x86-64, AVX-512), in a separate virtualenv with
tensorflow-cpu 2.21.0 (Keras 3.15.1), torch 2.13.0+cpu, timm 1.0.31,
ema-pytorch 0.8.3 and NumPy 2.4.6, by small scripts that ran each peer's own
code as its users call it (the recipe of each constant is in the comment
above it) and printed ``bits(...)`` of the result. timm's package ``__init__``
imports torchvision, which had no build for that torch: ``ModelEmaV3`` was
loaded from timm's own ``timm/utils/model_ema.py`` (which imports only torch),
unchanged.

Each constant is a tuple of 37 float32 bit patterns (``from_bits`` turns it
back into an array): the peer's average of ``params_at(0), params_at(1),
...`` after the last step of its recipe.

How the inputs are made: ``params_at(t)`` is the float32 params vector a run
holds after step ``t`` (``t = 0``: the initial params). Integer arithmetic
scaled by a power of two, so every value is exact in float32 and the same on
every machine (no seed, no transcendental function); ``params_at(t - 1) -
params_at(t)`` is exact too, so an optimizer step ``w - g`` with that
gradient lands on ``params_at(t)`` to the bit (the TensorFlow and Keras
recordings train ``w`` with such gradients and check that it does).
"""

import numpy as np

SIZE = 37  # vector lanes (8 or 16) plus a scalar tail, on every CPU


def params_at(t):
  """The params after step ``t``: ``SIZE`` float32 values in (-1.1, 1.1)."""
  i = np.arange(SIZE, dtype=np.int64)
  t = np.int64(t)
  noise = (t * 7919 + i * 104729 + t * i * 31) % 65521 - 32760
  k = (i - 18) * 50000 + t * (i % 5 - 2) * 37 + noise
  return (k * 2.0 ** -20).astype(np.float32)  # |k| < 2**24: exact


def bits(x):
  """The float32 bit patterns of ``x``, as a tuple of Python ints."""
  x = np.asarray(x, np.float32)
  return tuple(int(b) for b in x.view(np.uint32).ravel())


def from_bits(b):
  """The float32 array whose bit patterns are ``b``."""
  return np.asarray(b, np.uint32).view(np.float32)


KARRAS_GAMMA = {
    0.05: 16.972198602303447,
    0.10: 6.937203937601809,
}
"""ema-pytorch's ``sigma_rel_to_gamma`` for sigma_rel 0.05 and 0.10."""

# --- TensorFlow 2.21.0, Keras 3.15.1 -----------------------------------------

# TF1 graph (tf.compat.v1, Session): w =
# get_variable(initializer=params_at(0)), global_step =
# get_or_create_global_step(), loss = reduce_sum(w * g) with g fed as
# params_at(t - 1) - params_at(t), GradientDescentOptimizer(1.0).minimize(loss,
# global_step) (w lands on params_at(t) exactly); ema =
# ExponentialMovingAverage(0.95, num_updates=global_step), ema.apply([w]) under
# control_dependencies([train_op]); one Session.run per step, t = 1..200; the
# constant is ema.average(w) after step 200.
TF1_MINIMIZE_095 = (
    0xbf5eed28, 0xbf5108b7, 0xbf438b9a, 0xbf360de6, 0xbf26c9f6, 0xbf22596c,
    0xbf1415e9, 0xbf067e51, 0xbeefd7cc, 0xbed6b21c, 0xbec89cdc, 0xbeae8348,
    0xbe923f34, 0xbe6ef3f2, 0xbe33cd84, 0xbe211e46, 0xbdd339b8, 0xbd3add8e,
    0x3ba617ce, 0x3d719f69, 0x3dabd486, 0x3e0bd018, 0x3e419f33, 0x3e7b49ce,
    0x3e98fa4e, 0x3ea4483a, 0x3ec0658a, 0x3edc2ae1, 0x3ef6cff8, 0x3f090b19,
    0x3f0fb7ad, 0x3f1d2a36, 0x3f2ae793, 0x3f390dba, 0x3f46bdd4, 0x3f4bca97,
    0x3f5a3976,
)

# TF2 eager, Keras 3 optimizer: w = tf.Variable(params_at(0)), opt =
# tf.keras.optimizers.SGD(1.0), ema = tf.train.ExponentialMovingAverage(0.95,
# num_updates=opt.iterations); per step t = 1..200: opt.apply_gradients with
# gradient params_at(t - 1) - params_at(t), then ema.apply([w]) (the shadow is
# created by the first apply, from params_at(1)); ema.average(w) after step
# 200. Equal to TF1_MINIMIZE_095 bit for bit: the warm-up forgets the start.
TF2_ITERATIONS_095 = (
    0xbf5eed28, 0xbf5108b7, 0xbf438b9a, 0xbf360de6, 0xbf26c9f6, 0xbf22596c,
    0xbf1415e9, 0xbf067e51, 0xbeefd7cc, 0xbed6b21c, 0xbec89cdc, 0xbeae8348,
    0xbe923f34, 0xbe6ef3f2, 0xbe33cd84, 0xbe211e46, 0xbdd339b8, 0xbd3add8e,
    0x3ba617ce, 0x3d719f69, 0x3dabd486, 0x3e0bd018, 0x3e419f33, 0x3e7b49ce,
    0x3e98fa4e, 0x3ea4483a, 0x3ec0658a, 0x3edc2ae1, 0x3ef6cff8, 0x3f090b19,
    0x3f0fb7ad, 0x3f1d2a36, 0x3f2ae793, 0x3f390dba, 0x3f46bdd4, 0x3f4bca97,
    0x3f5a3976,
)

# TF2 eager, a counter of the applies done before this one: w =
# tf.Variable(params_at(0)), step = tf.Variable(0, int64), ema =
# tf.train.ExponentialMovingAverage(0.95, num_updates=step), ema.apply([w])
# once before training (creates the shadow from params_at(0); step stays 0);
# per step t = 1..200: w.assign(params_at(t)), ema.apply([w]),
# step.assign_add(1); ema.average(w) after step 200.
TF2_COUNTER_095 = (
    0xbf5eed51, 0xbf5108c2, 0xbf438b71, 0xbf360dd5, 0xbf26ca02, 0xbf225953,
    0xbf141616, 0xbf067e76, 0xbeefd759, 0xbed6b1ea, 0xbec89d1f, 0xbeae838f,
    0xbe923f45, 0xbe6ef397, 0xbe33cd38, 0xbe211e8c, 0xbdd33aec, 0xbd3add0b,
    0x3ba62c45, 0x3d719f17, 0x3dabd477, 0x3e0bd014, 0x3e419eec, 0x3e7b49bc,
    0x3e98fab1, 0x3ea44812, 0x3ec0658d, 0x3edc2afc, 0x3ef6cfcb, 0x3f090b2f,
    0x3f0fb7b4, 0x3f1d2a1d, 0x3f2ae79d, 0x3f390df7, 0x3f46bdec, 0x3f4bca61,
    0x3f5a398d,
)

# As TF2_COUNTER_095 without the apply before training (the first apply creates
# the shadow from params_at(1)).
TF2_COUNTER_LAZY_095 = (
    0xbf5eed51, 0xbf5108c2, 0xbf438b71, 0xbf360dd5, 0xbf26ca02, 0xbf225953,
    0xbf141616, 0xbf067e76, 0xbeefd759, 0xbed6b1ea, 0xbec89d1f, 0xbeae838f,
    0xbe923f45, 0xbe6ef397, 0xbe33cd38, 0xbe211e8c, 0xbdd33aec, 0xbd3add0b,
    0x3ba62c45, 0x3d719f17, 0x3dabd477, 0x3e0bd014, 0x3e419eec, 0x3e7b49bc,
    0x3e98fab1, 0x3ea44812, 0x3ec0658d, 0x3edc2afc, 0x3ef6cfcb, 0x3f090b2f,
    0x3f0fb7b4, 0x3f1d2a1d, 0x3f2ae79d, 0x3f390df7, 0x3f46bdec, 0x3f4bca61,
    0x3f5a398d,
)

# TF2 eager, constant decay: ema = tf.train.ExponentialMovingAverage(0.9998)
# (no num_updates), ema.apply([w]) once before training, then per step t =
# 1..300: w.assign(params_at(t)), ema.apply([w]); ema.average(w) after step
# 300.
TF_CONSTANT_09998 = (
    0xbf636b43, 0xbf4e1c7c, 0xbf47e187, 0xbf329452, 0xbf2c570d, 0xbf177017,
    0xbf113459, 0xbf0af6e8, 0xbeeb51d6, 0xbedee89d, 0xbeb50fef, 0xbea8920a,
    0xbe9c18cd, 0xbe62fccc, 0xbe4a0a9a, 0xbdecde96, 0xbdbaf3a7, 0xbd891550,
    0x3c853713, 0x3d266487, 0x3dfa6fc2, 0x3e1629fc, 0x3e2f1c3e, 0x3e822888,
    0x3e8ea347, 0x3eb87106, 0x3ec4ea2f, 0x3ed164d3, 0x3efbff32, 0x3f043b60,
    0x3f19223e, 0x3f1f5f98, 0x3f259cff, 0x3f3ae95a, 0x3f4125eb, 0x3f560bfb,
    0x3f5c4aee,
)

# Keras 3 (TensorFlow backend), eager: w = tf.Variable(params_at(0)), opt =
# tf.keras.optimizers.SGD(1.0, use_ema=True, ema_momentum=0.99),
# opt.build([w]); per step t = 1..300: opt.apply_gradients with gradient
# params_at(t - 1) - params_at(t); the constant is
# opt._model_variables_moving_average[0] after step 300.
KERAS_USE_EMA_099 = (
    0xbf5fc954, 0xbf5106f2, 0xbf438581, 0xbf34f18a, 0xbf272079, 0xbf229975,
    0xbf1430d3, 0xbf0659ed, 0xbeef728d, 0xbed4d6ed, 0xbecbbffe, 0xbeae5d26,
    0xbe92cbe2, 0xbe6ac05f, 0xbe343e9c, 0xbe227c9f, 0xbdd04ea3, 0xbd459e5e,
    0x3c08c1fc, 0x3d7d15d3, 0x3da3b052, 0x3e0b8eba, 0x3e423cf9, 0x3e7ca73b,
    0x3e99f224, 0x3ea3103f, 0x3ec01f0e, 0x3edb6a58, 0x3ef8ac5c, 0x3f09ff88,
    0x3f0e6d9c, 0x3f1cfedf, 0x3f2adc46, 0x3f39242c, 0x3f46ee0d, 0x3f4b6466,
    0x3f5a20c2,
)

# As KERAS_USE_EMA_099 with the apply_gradients call inside
# tf.function(jit_compile=True) (what model.fit compiles with XLA).
KERAS_USE_EMA_099_XLA = (
    0xbf5fc951, 0xbf5106f3, 0xbf438582, 0xbf34f18a, 0xbf27207d, 0xbf22997c,
    0xbf1430d4, 0xbf0659ec, 0xbeef7290, 0xbed4d6ef, 0xbecbbff9, 0xbeae5d27,
    0xbe92cbda, 0xbe6ac05b, 0xbe343e9f, 0xbe227ca3, 0xbdd04ea5, 0xbd459e5e,
    0x3c08c1fc, 0x3d7d15db, 0x3da3b052, 0x3e0b8eb5, 0x3e423cfa, 0x3e7ca739,
    0x3e99f225, 0x3ea31040, 0x3ec01f09, 0x3edb6a59, 0x3ef8ac5d, 0x3f09ff8a,
    0x3f0e6d9d, 0x3f1cfedd, 0x3f2adc42, 0x3f39242a, 0x3f46ee07, 0x3f4b6464,
    0x3f5a20c3,
)

# --- TensorFlow zero_debias -----------------------------------------------

# TF1 graph: x = placeholder(float32, [37]) (a tensor: TF zero-debiases only
# averages of tensors, never of Variables), ema = ExponentialMovingAverage(0.9,
# zero_debias=True), op = ema.apply([x]); per step t = 1, 2, ...:
# Session.run(op, {x: params_at(t)}). AVERAGE[t] is ema.average(x) after step
# t, BIASED[t] TF's hidden 'biased' variable (the zero-started average before
# division by 1 - 0.9 ** t).
TF_ZERO_DEBIAS_09_AVERAGE = {
    1: (
        0xbf61cf30, 0xbf4c0370, 0xbf4636c0, 0xbf306b00, 0xbf2a9e51, 0xbf24dd2f,
        0xbf0f1170, 0xbf0944c0, 0xbee6f1ff, 0xbedb58a0, 0xbecfd660, 0xbea43ee0,
        0xbe98a580, 0xbe5a1c01, 0xbe42e940, 0xbe2be4c0, 0xbda96b80, 0xbd760bff,
        0x3ccd6000, 0x3d437b00, 0x3d8fc680, 0x3e1f1240, 0x3e364500, 0x3e86ba00,
        0x3e925360, 0x3e9dd5a0, 0x3ec96d20, 0x3ed50680, 0x3f004f00, 0x3f061bb0,
        0x3f0bdcd0, 0x3f21a88f, 0x3f27753f, 0x3f3d4101, 0x3f430db0, 0x3f48ced0,
        0x3f5e9a90,
    ),
    2: (
        0xbf60cd20, 0xbf4aff24, 0xbf453038, 0xbf37cd86, 0xbf29934e, 0xbf23d607,
        0xbf0e080a, 0xbf08391e, 0xbef5acd9, 0xbed93868, 0xbecdbddb, 0xbea221e3,
        0xbe96840a, 0xbe777d4f, 0xbe3e946e, 0xbe279f53, 0xbda0cec2, 0xbd64aebc,
        0xbb683af3, 0x3d551fd7, 0x3d987a20, 0x3e237503, 0x3e3ab0b5, 0x3e703b78,
        0x3e94922d, 0x3ea00cba, 0x3ecba8b3, 0x3ed7468c, 0x3ef20bee, 0x3f07402f,
        0x3f0cfd76, 0x3f22cb72, 0x3f289a5e, 0x3f35fd10, 0x3f443749, 0x3f49f48f,
        0x3f5fc28c,
    ),
    3: (
        0xbf5fc27e, 0xbf49f233, 0xbf4420f6, 0xbf3987bd, 0xbf287f6e, 0xbf22c620,
        0xbf0cf5d5, 0xbf072498, 0xbef916be, 0xbed7061f, 0xbecb9386, 0xbe9ff2ef,
        0xbe945076, 0xbe7e3c09, 0xbe3a1aca, 0xbe233597, 0xbd97e8cd, 0xbd52bdd7,
        0xbc24a93c, 0x3d675ab0, 0x3da177bd, 0x3e27fd0f, 0x3e3f4201, 0x3e69a6e1,
        0x3e96e411, 0x3ea256aa, 0x3ecdf742, 0x3ed999bb, 0x3eeecc2c, 0x3f086e66,
        0x3f0e27b3, 0x3f23f7fe, 0x3f29c93b, 0x3f346273, 0x3f456ac4, 0x3f4b2410,
        0x3f60f45d,
    ),
    10: (
        0xbf5c38f0, 0xbf4e7bf6, 0xbf443a9e, 0xbf37661d, 0xbf2b8471, 0xbf1f1314,
        0xbf115619, 0xbf0714c1, 0xbef48084, 0xbedcbd2b, 0xbec3da6f, 0xbea86079,
        0xbe93ddc9, 0xbe746993, 0xbe44e2e3, 0xbe131d6c, 0xbdb852ff, 0xbd4c9080,
        0x393779c9, 0x3d3ed23d, 0x3db309df, 0x3e186df2, 0x3e417352, 0x3e74c551,
        0x3e922601, 0x3ea70e30, 0x3ec682b2, 0x3edb0562, 0x3ef4ae62, 0x3f0638dc,
        0x3f10acf5, 0x3f206735, 0x3f2aa88d, 0x3f377d0d, 0x3f435eba, 0x3f4dd2d2,
        0x3f5d8d12,
    ),
    50: (
        0xbf5c1dc4, 0xbf4fea28, 0xbf43da27, 0xbf35bd2c, 0xbf2ac313, 0xbf1ffc58,
        0xbf12d39d, 0xbf075eef, 0xbef41a72, 0xbedbdf0f, 0xbec73e1f, 0xbeaa40f5,
        0xbe93e9fb, 0xbe741eb7, 0xbe3dde12, 0xbe153460, 0xbdb98b41, 0xbd438d2e,
        0x3add5145, 0x3d59f085, 0x3dba0910, 0x3e129afc, 0x3e4368e0, 0x3e73f404,
        0x3e96816c, 0x3ea83dc3, 0x3ec1d7f8, 0x3edc94de, 0x3ef4164e, 0x3f071728,
        0x3f1171c9, 0x3f1dd1ee, 0x3f2c50e4, 0x3f36d954, 0x3f43abf1, 0x3f4f76dd,
        0x3f5a8032,
    ),
}

TF_ZERO_DEBIAS_09_BIASED = {
    1: (
        0xbdb4a5c3, 0xbda335f6, 0xbd9e9236, 0xbd8d2269, 0xbd887ea9, 0xbd83e428,
        0xbd64e8b7, 0xbd5ba137, 0xbd38c19c, 0xbd2f7a1c, 0xbd26451c, 0xbd036582,
        0xbcf43c04, 0xbcae7cd0, 0xbc9bedcf, 0xbc8983cf, 0xbc078935, 0xbbc4d669,
        0x3b244ccf, 0x3b9c6269, 0x3be60a6a, 0x3c7e839e, 0x3c91d0cf, 0x3cd79003,
        0x3cea1f04, 0x3cfc8904, 0x3d21241c, 0x3d2a6b9c, 0x3d4d4b36, 0x3d5692b7,
        0x3d5fc7b7, 0x3d8153a8, 0x3d85f768, 0x3d976736, 0x3d9c0af6, 0x3da0a576,
        0x3db21543,
    ),
    2: (
        0xbe2ad959, 0xbe1a470a, 0xbe15dcfa, 0xbe0bb0b0, 0xbe00e09a, 0xbdf907e6,
        0xbdd7e347, 0xbdcf0f27, 0xbdbab694, 0xbda51667, 0xbd9c5d1a, 0xbd7670f7,
        0xbd64c8b7, 0xbd3c1792, 0xbd10d738, 0xbcfec93c, 0xbc746d7e, 0xbc2dcc7e,
        0xba307ebc, 0x3c21f97e, 0x3c67c3e4, 0x3cf87470, 0x3d0de278, 0x3d36939c,
        0x3d61d3f7, 0x3d734690, 0x3d9ac7e7, 0x3da39c07, 0x3db7f49a, 0x3dcd94c7,
        0x3dd64e14, 0x3df772b2, 0x3e002369, 0x3e0a4fb3, 0x3e151fca, 0x3e197c70,
        0x3e2a0ec0,
    ),
    3: (
        0xbe728e3e, 0xbe5ae8de, 0xbe549a88, 0xbe491d66, 0xbe36a6d2, 0xbe30726e,
        0xbe18cd0e, 0xbe127eb8, 0xbe070196, 0xbde91604, 0xbddcad3f, 0xbdad627d,
        0xbda0c5d3, 0xbd89cb8f, 0xbd49bccd, 0xbd30eb42, 0xbca4ab79, 0xbc6471a5,
        0xbb327e1f, 0x3c7ac9c0, 0x3caf07f4, 0x3d361980, 0x3d4f52d4, 0x3d7d475a,
        0x3da390d6, 0x3daff99b, 0x3ddf445e, 0x3debe108, 0x3e016da6, 0x3e13e43a,
        0x3e1a189d, 0x3e31bdfe, 0x3e380c53, 0x3e438975, 0x3e56000a, 0x3e5c346c,
        0x3e73d9ce,
    ),
    10: (
        0xbf0f6f85, 0xbf067cd6, 0xbeff9dc9, 0xbeeee740, 0xbedf6d0a, 0xbecf37a5,
        0xbebd5246, 0xbeaff663, 0xbe9f3fdc, 0xbe8fc5a5, 0xbe7f207e, 0xbe5b55c0,
        0xbe409dfb, 0xbe1f30eb, 0xbe003c7e, 0xbdbfa366, 0xbd701bd3, 0xbd053cbd,
        0x38ef00e0, 0x3cf89270, 0x3d69392f, 0x3dc68fad, 0x3dfbff39, 0x3e1f6cac,
        0x3e3e611a, 0x3e599d17, 0x3e814b51, 0x3e8ea734, 0x3e9f5dbc, 0x3eaed7f2,
        0x3ebc75f2, 0x3ed0f2b6, 0x3ede4e99, 0x3eef0521, 0x3efe7f59, 0x3f060eac,
        0x3f104d0e,
    ),
    50: (
        0xbf5afb5a, 0xbf4ed7d7, 0xbf42d7c0, 0xbf34cd64, 0xbf29e1c7, 0xbf1f2944,
        0xbf1211e5, 0xbf06ac54, 0xbef2d862, 0xbedabcf8, 0xbec6373f, 0xbea96054,
        0xbe9326d4, 0xbe72dca2, 0xbe3ce391, 0xbe146f85, 0xbdb89674, 0xbd428b2d,
        0x3adc2d45, 0x3d58d0fa, 0x3db9139d, 0x3e11d98f, 0x3e42670f, 0x3e72b227,
        0x3e95bada, 0x3ea75fca, 0x3ec0d838, 0x3edb71d7, 0x3ef2d444, 0x3f0664ec,
        0x3f10b1e4, 0x3f1d01b5, 0x3f2b6d8b, 0x3f35e815, 0x3f42a9c7, 0x3f4e6524,
        0x3f595fea,
    ),
}

# --- TensorFlow 2.21.0 on subnormal inputs ------------------------------------

def tiny_params_at(t, dtype=np.float32):
  """``params_at(t)`` with lanes ``4i`` scaled into the subnormals and lanes
  ``4i + 1`` to tiny normal values (by powers of two: exact)."""
  x = params_at(t).astype(dtype)
  i = np.arange(SIZE)
  sub, small = (-126, -100) if dtype == np.float32 else (-1022, -1000)
  x = np.where(i % 4 == 0, x * dtype(2.0 ** sub), x)
  x = np.where(i % 4 == 1, x * dtype(2.0 ** small), x)
  return x.astype(dtype)


def tiny_decay0_params():
  """The params of the decay-0 step below: ``tiny_params_at(51)`` with lanes
  ``4i + 2`` scaled by ``2 ** -30`` (so that ``v - p`` rounds there)."""
  p = tiny_params_at(51)
  return np.where(np.arange(SIZE) % 4 == 2, p * np.float32(2.0 ** -30),
                  p).astype(np.float32)


# TF2 eager, float32 (_32) and float64 (_64): w =
# tf.Variable(tiny_params_at(0, dtype)), ema =
# tf.train.ExponentialMovingAverage(0.9), ema.apply([w]) once before training,
# then per step t = 1..50: w.assign(tiny_params_at(t, dtype)), ema.apply([w]);
# ema.average(w) after step 50 (TF flushes subnormals to zero on CPU: every
# lane 4i is +-0). TF_TINY_DECAY0_32: from that float32 average v, one step with
# a decay of 0 (a tf.Variable decay, assigned 0.0, a fresh
# ExponentialMovingAverage whose shadow starts as v) toward tiny_decay0_params():
# TF's v - (v - p). The _64 constant holds float64 bit patterns.
TF_TINY_09_32 = (
    0x80000000, 0x8d4fe78f, 0xbf43dfd6, 0xbf35b8bd, 0x80000000, 0x8d1ff040,
    0xbf12d140, 0xbf07640f, 0x80000000, 0x8cdbe3b0, 0xbec72481, 0xbeaa3e55,
    0x80000000, 0x8c74072b, 0xbe3def95, 0xbe150898, 0x80000000, 0x8b43fb55,
    0x3ae7a091, 0x3d59a6a8, 0x00000000, 0x0c12a06f, 0x3e434c77, 0x3e740a7d,
    0x00000000, 0x0ca854b1, 0x3ec1dc60, 0x3edc8542, 0x00000000, 0x0d0712fe,
    0x3f117cb3, 0x3f1dd425, 0x00000000, 0x0d36dee3, 0x3f43a836, 0x3f4f804e,
    0x00000000,
)
TF_TINY_09_64 = (
    0x8000000000000000, 0x8169fcf1ecb0ba3a, 0xbfe87bfac49142d0,
    0xbfe6b717bacdedb8, 0x8000000000000000, 0x8163fe07f8fc742d,
    0xbfe25a27f01444a5, 0xbfe0ec81c6ac39eb, 0x8000000000000000,
    0x815b7c761ce3857a, 0xbfd8e490096744e1, 0xbfd547ca8364e8bd,
    0x8000000000000000, 0x814e80e56697965a, 0xbfc7bdf2b4ea1a32,
    0xbfc2a1131ab7ac8b, 0x8000000000000000, 0x81287f6aa54d3f15,
    0x3f5cf4124aaf70be, 0x3fab34d4f61ef08f, 0x0000000000000000,
    0x0142540e1203ed72, 0x3fc8698ebf15b8b9, 0x3fce814f98533559,
    0x0000000000000000, 0x01550a9647825d24, 0x3fd83b8c022ebb4d,
    0x3fdb90a837b3145b, 0x0000000000000000, 0x0160e25fb303ec0c,
    0x3fe22f96575e12d4, 0x3fe3ba8491bb2e89, 0x0000000000000000,
    0x0166dbdc3fccbe68, 0x3fe87506a5432daa, 0x3fe9f009ca91a278,
    0x0000000000000000,
)
TF_TINY_DECAY0_32 = (
    0x80000000, 0x8d4b65b0, 0x00000000, 0xbf3e2350, 0x80000000, 0x8d232f90,
    0x00000000, 0xbf05ee20, 0x80000000, 0x8cd15960, 0x00000000, 0xbebb7000,
    0x80000000, 0x8c80ed20, 0x00000000, 0xbe160b40, 0x80000000, 0x8b041600,
    0x00000000, 0x3da80080, 0x00000000, 0x0bffa600, 0x00000000, 0x3e74d8c0,
    0x00000000, 0x0cb053e0, 0x00000000, 0x3eead6c0, 0x00000000, 0x0d02adc0,
    0x00000000, 0x3f1da180, 0x00000000, 0x0d3ae2f0, 0x00000000, 0x3f55d6b0,
    0x00000000,
)


# --- timm 1.0.31 ModelEmaV3, torch 2.13.0+cpu --------------------------------

# timm ModelEmaV3(net, decay=0.9998) (foreach=True, its default), net holding
# one float32 Parameter initialised to params_at(0); per step t = 1..300: net's
# param set to params_at(t), ema.update(net, step=t) (timm's train.py:
# num_updates += 1, then update(model, step=num_updates)); the constant is
# ema.module's param after step 300.
TIMM_V3_09998 = (
    0xbf619d82, 0xbf4c4ab9, 0xbf460bc3, 0xbf30ba94, 0xbf2a792d, 0xbf24a9cb,
    0xbf0f5978, 0xbf09180c, 0xbee78c1d, 0xbedb1ad7, 0xbecf7112, 0xbea4ca08,
    0xbe9848d9, 0xbe5b4cc9, 0xbe424a80, 0xbe2b0d1b, 0xbdab8aae, 0xbd73184d,
    0x3cc3db31, 0x3d45f6de, 0x3d917d17, 0x3e1e02fb, 0x3e370554, 0x3e86250e,
    0x3e92a7cc, 0x3e9e469a, 0x3ec8e8e9, 0x3ed56b9a, 0x3f0006fb, 0x3f0646c6,
    0x3f0c1627, 0x3f216816, 0x3f27a980, 0x3f3cf9d1, 0x3f433a78, 0x3f490902,
    0x3f5e5c8e,
)

# As TIMM_V3_09998 with foreach=False (Tensor.lerp_ per tensor).
TIMM_V3_09998_NOFOREACH = (
    0xbf619d82, 0xbf4c4ab9, 0xbf460bc3, 0xbf30ba94, 0xbf2a792d, 0xbf24a9cb,
    0xbf0f5978, 0xbf09180c, 0xbee78c1d, 0xbedb1ad7, 0xbecf7112, 0xbea4ca08,
    0xbe9848d9, 0xbe5b4cc9, 0xbe424a80, 0xbe2b0d1b, 0xbdab8aae, 0xbd73184d,
    0x3cc3db31, 0x3d45f6de, 0x3d917d17, 0x3e1e02fb, 0x3e370554, 0x3e86250e,
    0x3e92a7cc, 0x3e9e469a, 0x3ec8e8e9, 0x3ed56b9a, 0x3f0006fb, 0x3f0646c6,
    0x3f0c1627, 0x3f216816, 0x3f27a980, 0x3f3cf9d1, 0x3f433a78, 0x3f490902,
    0x3f5e5c8e,
)

# As TIMM_V3_09998 with ema.update(net) (no step: the decay from step 1).
TIMM_V3_09998_NOSTEP = (
    0xbf636b3f, 0xbf4e1c7f, 0xbf47e185, 0xbf329454, 0xbf2c570d, 0xbf17701f,
    0xbf11345b, 0xbf0af6e9, 0xbeeb51d9, 0xbedee89a, 0xbeb50ff8, 0xbea8920c,
    0xbe9c18cb, 0xbe62fcd4, 0xbe4a0a90, 0xbdecdeb3, 0xbdbaf3b4, 0xbd891535,
    0x3c8536ec, 0x3d2664ab, 0x3dfa6fa0, 0x3e1629fb, 0x3e2f1c4b, 0x3e822888,
    0x3e8ea34c, 0x3eb870fa, 0x3ec4ea2e, 0x3ed164de, 0x3efbff2f, 0x3f043b63,
    0x3f192239, 0x3f1f5f96, 0x3f259d02, 0x3f3ae958, 0x3f4125f0, 0x3f560bf7,
    0x3f5c4aed,
)

# As TIMM_V3_09998 with use_warmup=True (warmup_gamma=1, warmup_power=2/3).
TIMM_V3_WARMUP_09998 = (
    0xbf609072, 0xbf5182d1, 0xbf437137, 0xbf34d239, 0xbf262320, 0xbf231d4b,
    0xbf14c6f5, 0xbf0627d2, 0xbeef44ed, 0xbed28156, 0xbecd8a87, 0xbeafee40,
    0xbe929b0f, 0xbe692a49, 0xbe301d5a, 0xbe253081, 0xbdd4dc80, 0xbd42dd11,
    0x3c145e10, 0x3d85e7df, 0x3d9e7edf, 0x3e08f7e7, 0x3e425fba, 0x3e7d2a9e,
    0x3e9bf99b, 0x3ea1f422, 0x3ebee73c, 0x3edbcd17, 0x3ef95b5c, 0x3f0b0a03,
    0x3f0db892, 0x3f1c5e2d, 0x3f2b2fa3, 0x3f3927d8, 0x3f47c6c2, 0x3f4aacf5,
    0x3f599bd8,
)

# As TIMM_V3_09998 with decay=0.999, use_warmup=True, warmup_power=0.75.
TIMM_V3_WARMUP_POWER34_0999 = (
    0xbf6022d0, 0xbf517300, 0xbf4366d2, 0xbf34f793, 0xbf268207, 0xbf22de9a,
    0xbf14a731, 0xbf062ce1, 0xbeef70cf, 0xbed37cb3, 0xbecc829f, 0xbeaf5e7b,
    0xbe92856d, 0xbe6a79a3, 0xbe31b6b8, 0xbe23b3b0, 0xbdd3e0b0, 0xbd43135f,
    0x3c08df8b, 0x3d834fb2, 0x3da178d6, 0x3e09b13e, 0x3e42b2cb, 0x3e7c9b61,
    0x3e9b3577, 0x3ea28fb2, 0x3ebf4cca, 0x3edbbb5c, 0x3ef8c3d5, 0x3f0aa62b,
    0x3f0e1f9a, 0x3f1c8b8c, 0x3f2b12a2, 0x3f3913d8, 0x3f47843d, 0x3f4b13a8,
    0x3f59b48d,
)

# --- ema-pytorch 0.8.3 EMA and KarrasEMA, torch 2.13.0+cpu -------------------

# ema-pytorch EMA(net) with every default (beta=0.9999, update_after_step=100,
# update_every=10, inv_gamma=1, power=2/3, use_foreach=False); per call t =
# 1..3000: net's param set to params_at(t), ema.update(); the constant is
# ema.ema_model's param after call 3000.
EMA_PYTORCH_DEFAULTS_3000 = (
    0xbf7a8769, 0xbf5ed606, 0xbf4344b5, 0xbf27ddc3, 0xbf0c2966, 0xbf3d66df,
    0xbf21f137, 0xbf0633ca, 0xbed58345, 0xbe9f3cda, 0xbf00490e, 0xbec9c170,
    0xbe925406, 0xbe36ae56, 0xbd91f849, 0xbe86630e, 0xbe1f0d70, 0xbd443d23,
    0x3d774632, 0x3e2bca09, 0xbccd7423, 0x3dab0f62, 0x3e433eea, 0x3e984fc8,
    0x3ed010d6, 0x3e5b86ef, 0x3ea51663, 0x3edb8eb3, 0x3f094999, 0x3f251fae,
    0x3ee7d912, 0x3f0f4653, 0x3f2ae40e, 0x3f467b01, 0x3f61e215, 0x3f30ef6b,
    0x3f4c76b8,
)

# ema-pytorch EMA(net, beta=0.99, update_after_step=0, update_every=1,
# power=1.0): reaches the ceiling 0.99 at its 99th averaging step; calls t =
# 1..300 as above.
EMA_PYTORCH_BETA099_POWER1 = (
    0xbf5f8634, 0xbf513462, 0xbf435fbc, 0xbf3541bb, 0xbf271ab5, 0xbf22556d,
    0xbf146040, 0xbf0637d6, 0xbef020bc, 0xbed4dc02, 0xbecb38e2, 0xbeaeb470,
    0xbe927d76, 0xbe6bfcc3, 0xbe342525, 0xbe216140, 0xbdd1a252, 0xbd433122,
    0x3bea6ff3, 0x3d7d9201, 0x3da5cc0c, 0x3e0adf40, 0x3e42de07, 0x3e7b6fbe,
    0x3e9a0420, 0x3ea39cac, 0x3ebfc6f8, 0x3edbc02e, 0x3ef81878, 0x3f0a0a44,
    0x3f0eb4c0, 0x3f1cd6d8, 0x3f2b0858, 0x3f38dac5, 0x3f46f98f, 0x3f4bad61,
    0x3f59fab1,
)

# As EMA_PYTORCH_BETA099_POWER1 with use_foreach=True.
EMA_PYTORCH_BETA099_POWER1_FOREACH = (
    0xbf5f8634, 0xbf513462, 0xbf435fbc, 0xbf3541bb, 0xbf271ab5, 0xbf22556d,
    0xbf146040, 0xbf0637d6, 0xbef020bc, 0xbed4dc02, 0xbecb38e2, 0xbeaeb470,
    0xbe927d76, 0xbe6bfcc3, 0xbe342525, 0xbe216140, 0xbdd1a252, 0xbd433122,
    0x3bea6ff3, 0x3d7d9201, 0x3da5cc0c, 0x3e0adf40, 0x3e42de07, 0x3e7b6fbe,
    0x3e9a0420, 0x3ea39cac, 0x3ebfc6f8, 0x3edbc02e, 0x3ef81878, 0x3f0a0a44,
    0x3f0eb4c0, 0x3f1cd6d8, 0x3f2b0858, 0x3f38dac5, 0x3f46f98f, 0x3f4bad61,
    0x3f59fab1,
)

# ema-pytorch KarrasEMA(net, sigma_rel=0.05, update_every=1); per call t =
# 1..300: net's param set to params_at(t), ema.update(); ema.ema_model's param
# after call 300.
KARRAS_SIGMA005_EVERY1 = (
    0xbf6151c3, 0xbf514a9c, 0xbf4397b8, 0xbf34bf5d, 0xbf25a197, 0xbf22f7b3,
    0xbf14cf53, 0xbf065bc8, 0xbeef4103, 0xbed0c1db, 0xbecec7d8, 0xbeb16c64,
    0xbe932a33, 0xbe664e8b, 0xbe2df408, 0xbe271b4b, 0xbdd5045a, 0xbd3fffbb,
    0x3c1acba9, 0x3d881ffe, 0x3d9afdd1, 0x3e086316, 0x3e41661c, 0x3e7d106f,
    0x3e9d0a0f, 0x3ea156cd, 0x3ebe2990, 0x3edbeec6, 0x3efad1dd, 0x3f0b8088,
    0x3f0d252e, 0x3f1c28c7, 0x3f2bbb89, 0x3f393815, 0x3f47d990, 0x3f4a1697,
    0x3f59c4e9,
)

# As KARRAS_SIGMA005_EVERY1 with sigma_rel=0.10.
KARRAS_SIGMA010_EVERY1 = (
    0xbf60b5f1, 0xbf518509, 0xbf437626, 0xbf34c7b1, 0xbf260463, 0xbf232d49,
    0xbf14cf2a, 0xbf0626c1, 0xbeef3b4f, 0xbed22a5d, 0xbecde5ff, 0xbeb02560,
    0xbe92a53d, 0xbe68ada4, 0xbe2f9452, 0xbe25adf9, 0xbdd520c4, 0xbd42b9b7,
    0x3c17f100, 0x3d86b70a, 0x3d9d84dc, 0x3e08bc38, 0x3e423d2b, 0x3e7d53a0,
    0x3e9c3abc, 0x3ea1c410, 0x3ebec12a, 0x3edbd600, 0x3ef99479, 0x3f0b2a4a,
    0x3f0d9657, 0x3f1c4f64, 0x3f2b3d08, 0x3f392d4b, 0x3f47d972, 0x3f4a8b0b,
    0x3f5996ca,
)

# KarrasEMA(net, sigma_rel=0.10) with its default update_every=100; calls t =
# 1..3000.
KARRAS_SIGMA010_EVERY100_3000 = (
    0xbf6460d3, 0xbf4e77d8, 0xbf456631, 0xbf30a5c8, 0xbf26b462, 0xbf2729c4,
    0xbf124d27, 0xbf0847d7, 0xbee6aaf4, 0xbed546c0, 0xbed40899, 0xbea9d766,
    0xbe960495, 0xbe5a20e2, 0xbe344c19, 0xbe335ca4, 0xbdc08b3a, 0xbd6bdfb7,
    0x3ce32cdd, 0x3d792be3, 0x3d72143a, 0x3e154665, 0x3e3a424a, 0x3e8658cf,
    0x3e9aaba8, 0x3e99ab36, 0x3ec3260e, 0x3ed67f32, 0x3f008510, 0x3f0a83f4,
    0x3f096e1f, 0x3f1ec73c, 0x3f289e07, 0x3f3d5f94, 0x3f46ee03, 0x3f46f872,
    0x3f5bc641,
)

# --- EDM2's power-function EMA on torch 2.13.0+cpu lerp_ ---------------------

# EDM2 (NVlabs/edm2 training/phema.py, PowerFunctionEMA.update as the trainer
# calls it): a float32 torch tensor ema = params_at(0); per step t = 1..300:
# cur_nimg += batch_size (1), beta = power_function_beta(std=0.050,
# t_next=cur_nimg, t_delta=batch_size) in float64 (transcribed: (1 - t_delta /
# t_next) ** (std_to_exp(std) + 1)), then ema.lerp_(params_at(t), 1 - beta)
# with torch; ema after step 300.
EDM2_STD0050_BATCH1 = (
    0xbf615278, 0xbf514a23, 0xbf4397da, 0xbf34bf62, 0xbf25a13c, 0xbf22f726,
    0xbf14cf4e, 0xbf065c2a, 0xbeef4128, 0xbed0c042, 0xbecec855, 0xbeb16dee,
    0xbe932b19, 0xbe664bd9, 0xbe2df2b9, 0xbe271c77, 0xbdd50362, 0xbd3fface,
    0x3c1ac5a6, 0x3d881ffb, 0x3d9afc1b, 0x3e086337, 0x3e416505, 0x3e7d0f5e,
    0x3e9d0abc, 0x3ea15690, 0x3ebe28f8, 0x3edbeec9, 0x3efad370, 0x3f0b80cd,
    0x3f0d24bf, 0x3f1c28a8, 0x3f2bbc45, 0x3f393819, 0x3f47d95d, 0x3f4a1620,
    0x3f59c54b,
)

# As EDM2_STD0050_BATCH1 with std=0.100 and batch_size=256.
EDM2_STD0100_BATCH256 = (
    0xbf60b6a2, 0xbf518502, 0xbf437643, 0xbf34c78b, 0xbf2603db, 0xbf232d7a,
    0xbf14cf42, 0xbf0626c5, 0xbeef3b31, 0xbed228c0, 0xbecde79b, 0xbeb02685,
    0xbe92a57b, 0xbe68ab2f, 0xbe2f91e3, 0xbe25b02c, 0xbdd521b6, 0xbd42b89a,
    0x3c17ff7e, 0x3d86ba71, 0x3d9d808e, 0x3e08bb39, 0x3e423c70, 0x3e7d5431,
    0x3e9c3be4, 0x3ea1c343, 0x3ebec06f, 0x3edbd62b, 0x3ef995a1, 0x3f0b2ad8,
    0x3f0d95bb, 0x3f1c4f26, 0x3f2b3d5c, 0x3f392d60, 0x3f47d9b5, 0x3f4a8a70,
    0x3f5996c6,
)
