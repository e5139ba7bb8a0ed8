"""The numbers the issue asks for: large offsets, negative/zero variance, low precision,
and degenerate batches (batch of one, all masked, NaN/Inf) under both policies.

Run with ``-s`` to see the measured errors (they are worth quoting in docs).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
import reference as R

BIG = (4096, 1024)
OFFSET = 1e4
BN_EPS, LN_EPS = 1e-5, 1e-6  # jaxnorm's (and flax's) defaults


# ----------------------------------------------------------------------------- large offset


@pytest.fixture(scope="module")
def big():
  """x = 1e4 + N(0, 1) in float32, and float64 results on that same float32 input."""
  rng = np.random.default_rng(0)
  x = (OFFSET + rng.standard_normal(BIG)).astype(np.float32)
  x64 = x.astype(np.float64)
  bn = R.batch_norm(x64, np.zeros(BIG[1]), np.ones(BIG[1]), training=True, feature_axes=-1,
                    epsilon=BN_EPS, momentum=0.9)
  ln = R.layer_norm(x64, epsilon=LN_EPS)
  return dict(x=x, bn=bn, ln=ln, errors={})


def _err(y, ref):
  return float(np.max(np.abs(np.asarray(y, np.float64) - ref)))


def _report(errors, title):
  print(f"\n{title} (max abs error vs float64 on the same float32 input, x = 1e4 + N(0,1), "
        f"shape {BIG}):")
  for k, v in errors.items():
    print(f"  {k:<46s} {v:.3g}")


def _flax_linen():
  """flax.linen if installed (a comparison row), else None: the suite runs without flax."""
  try:
    import flax.linen as nn
  except ModuleNotFoundError:
    return None
  return nn


def test_large_offset_batch_norm(big):
  x, ref = big["x"], big["bn"]
  xj = jnp.asarray(x)
  errors = {}
  y, new = jax.jit(lambda x: jn.batch_norm(x, jn.init_batch_stats(BIG[1]), training=True,
                                           momentum=0.9))(xj)
  errors["jaxnorm.batch_norm"] = _err(y, ref.y)
  m = jax.jit(lambda x: jn.moments(x, axis=0))(xj)
  var_rel = float(np.max(np.abs(np.asarray(m.var) - ref.var.ravel()) / ref.var.ravel()))
  mean_err = float(np.max(np.abs(np.asarray(m.mean) - ref.mean.ravel())))

  nn = _flax_linen()
  for fast in (True, False) if nn else ():
    mod = nn.BatchNorm(use_running_average=False, use_fast_variance=fast, epsilon=BN_EPS)
    variables = mod.init(jax.random.key(0), xj[:2])
    yf, _ = jax.jit(lambda v, x: mod.apply(v, x, mutable=["batch_stats"]))(variables, xj)
    errors[f"flax.linen.BatchNorm(use_fast_variance={fast})"] = _err(yf, ref.y)

  mu = jnp.mean(xj, axis=0, keepdims=True)  # plain two-pass float32
  var = jnp.mean(jnp.square(xj - mu), axis=0, keepdims=True)
  errors["two-pass float32"] = _err((xj - mu) * jax.lax.rsqrt(var + BN_EPS), ref.y)
  try:
    import torch
    yt = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True,
                                        eps=BN_EPS)
    errors["torch.nn.functional.batch_norm"] = _err(yt.numpy(), ref.y)
  except ImportError:
    pass
  _report(errors, "batch norm, reducing axis 0")
  print(f"  jaxnorm.moments: mean abs err {mean_err:.3g}, var rel err {var_rel:.3g}")

  ours = errors.pop("jaxnorm.batch_norm")
  assert ours <= 1e-4
  assert var_rel <= 1e-5 and mean_err <= 1e-3  # 1e-3 = 1 ulp of float32 at 1e4
  for name, e in errors.items():
    assert ours < e, f"jaxnorm ({ours:.3g}) does not beat {name} ({e:.3g})"
  # the running averages see the same accurate statistics
  np.testing.assert_allclose(np.asarray(new.var), ref.new_var, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new.mean), ref.new_mean, rtol=1e-7)


def test_large_offset_layer_norm(big):
  x, ref = big["x"], big["ln"]
  xj = jnp.asarray(x)
  errors = {"jaxnorm.layer_norm": _err(jax.jit(jn.layer_norm)(xj), ref.y)}
  nn = _flax_linen()
  for fast in (True, False) if nn else ():
    mod = nn.LayerNorm(use_fast_variance=fast, epsilon=LN_EPS)
    variables = mod.init(jax.random.key(0), xj[:2])
    errors[f"flax.linen.LayerNorm(use_fast_variance={fast})"] = _err(
        jax.jit(mod.apply)(variables, xj), ref.y)
  mu = jnp.mean(xj, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xj - mu), axis=-1, keepdims=True)
  errors["two-pass float32"] = _err((xj - mu) * jax.lax.rsqrt(var + LN_EPS), ref.y)
  try:
    import torch
    yt = torch.nn.functional.layer_norm(torch.from_numpy(x), (BIG[1],), eps=LN_EPS)
    errors["torch.nn.functional.layer_norm"] = _err(yt.numpy(), ref.y)
  except ImportError:
    pass
  _report(errors, "layer norm, reducing axis -1")
  ours = errors.pop("jaxnorm.layer_norm")
  assert ours <= 1e-4
  for name, e in errors.items():
    assert ours < e, f"jaxnorm ({ours:.3g}) does not beat {name} ({e:.3g})"


@pytest.mark.parametrize("fn", ["batch_norm", "layer_norm"])
def test_large_offset_masked(fn):
  rng = np.random.default_rng(1)
  x = (OFFSET + rng.standard_normal((512, 64))).astype(np.float32)
  if fn == "batch_norm":  # padding rows at the front of the batch
    where = np.ones((512, 1), bool)
    where[:3] = False
    y, _ = jn.batch_norm(jnp.asarray(x), jn.init_batch_stats(64), training=True, where=where)
    ref = R.batch_norm(x, np.zeros(64), np.ones(64), training=True, where=where).y
  else:  # left-padded sequences
    where = np.ones((512, 64), bool)
    where[:, :5] = False
    y = jn.layer_norm(jnp.asarray(x), where=where)
    ref = R.layer_norm(x, where=where).y
  assert not np.isnan(np.asarray(y)).any()
  assert _err(y, ref) <= 1e-4


# ----------------------------------------------------------------------------- variance >= 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_variance_never_negative(dtype):
  rng = np.random.default_rng(2)
  base = {"float32": 1e4, "bfloat16": 3e2, "float16": 3e3}[dtype]
  cases = [base + 1e-3 * rng.standard_normal((64, 16)),    # std far below one ulp of the mean
           np.full((64, 16), base), -base + rng.random((64, 16)) * 1e-2,
           np.repeat(base + rng.standard_normal((1, 16)), 64, axis=0)]
  masks = [None, rng.random((64, 16)) < 0.3, np.arange(64)[:, None] >= 1]
  for x in cases:
    xj = jnp.asarray(x, dtype)
    for w in masks:
      for axis in (0, 1, (0, 1)):
        m = jn.moments(xj, axis=axis, where=w)
        v = np.asarray(m.var)
        assert (v >= 0).all() and np.isfinite(v).all(), (axis, v.min())
      y, _ = jn.batch_norm(xj, jn.init_batch_stats(16), training=True, where=w)
      assert np.isfinite(np.asarray(y, np.float32)).all()
      # also fully masked rows: they output bias (0), not x / sqrt(eps) (inf in float16)
      y = np.asarray(jn.layer_norm(xj, where=w), np.float32)
      assert np.isfinite(y).all()


@pytest.mark.parametrize("plain", [False, True], ids=["custom_vjp", "plain_autodiff"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm", "group_norm", "batch_norm"])
def test_empty_group_outputs_bias_with_zero_gradient(fn, dtype, plain):
  """A group with no included element has no statistics: it outputs bias, and x gets
  no gradient through it (batch norm: with degenerate="batch"; the default uses the
  running averages, tested below).  Both autodiff paths."""
  x = jnp.asarray(1e3 + np.random.default_rng(0).standard_normal((4, 6)), dtype)
  w = jnp.asarray([[True], [False], [True], [True]])  # row 1 excluded
  b = jnp.asarray(np.arange(6) * 0.5, dtype)
  s = jnp.asarray(np.arange(6) + 1.0, dtype)
  call = {
      "layer_norm": lambda x, s: jn.layer_norm(x, s, b, where=w),
      "rms_norm": lambda x, s: jn.rms_norm(x, s, where=w) + b[None],
      "group_norm": lambda x, s: jn.group_norm(x, s, b, num_groups=2, where=w),
      "batch_norm": lambda x, s: jn.batch_norm(x, jn.init_batch_stats(6), s, b,
                                               training=True, where=False,
                                               degenerate="batch")[0],
  }[fn]
  rows = slice(None) if fn == "batch_norm" else 1  # batch norm: every feature is empty
  with jn.plain_autodiff() if plain else contextlib.nullcontext():  # eager: traced anew
    y = call(x, s)
    dx, ds = jax.grad(lambda x, s: jnp.sum(call(x, s).astype(jnp.float32) ** 2), (0, 1))(x, s)
  np.testing.assert_array_equal(np.asarray(y)[rows], np.broadcast_to(b, y.shape)[rows])
  np.testing.assert_array_equal(np.asarray(dx)[rows], 0)
  if fn == "batch_norm":
    np.testing.assert_array_equal(np.asarray(ds), 0)
  assert np.isfinite(np.asarray(dx, np.float32)).all()


# ----------------------------------------------------------------------------- constant input


@pytest.mark.parametrize("value", [0.0, 3.7, -1e4 + 0.5, 1e4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_constant_channel_normalizes_to_exactly_zero(value, dtype):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((6, 5, 4))
  x[..., 1] = value  # a constant channel
  xj = jnp.asarray(x, dtype)
  bias = jnp.arange(4, dtype=jnp.float32)
  y, new = jn.batch_norm(xj, jn.init_batch_stats(4), None, bias, training=True)
  y = np.asarray(y, np.float32)
  assert not np.isnan(y).any()
  np.testing.assert_array_equal(y[..., 1], 1.0)  # exactly the bias
  assert np.asarray(new.var)[1] == pytest.approx(0.99)  # var 0 entered the average
  # masked (a per-sample mask; the first sample in, see below for the other case)
  w = np.ones((6, 1, 1), bool)
  w[3] = False
  y, _ = jn.batch_norm(xj, jn.init_batch_stats(4), None, bias, training=True, where=w)
  np.testing.assert_array_equal(np.asarray(y, np.float32)[..., 1], 1.0)
  # feature-wise norms: a constant row / instance / group
  xc = jnp.full((3, 5, 4), value, dtype)
  for out in (jn.layer_norm(xc), jn.layer_norm(xc, where=np.arange(4) > 0),
              jn.instance_norm(xc), jn.group_norm(xc, num_groups=2),
              jn.layer_norm(xc, reduction_axes=(1, 2))):
    out = np.asarray(out, np.float32)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out, 0.0)
  m = jn.moments(xc, axis=(0, 1))
  np.testing.assert_array_equal(np.asarray(m.var), 0.0)


def test_constant_channel_masked_first_sample_out():
  x = np.full((6, 5, 4), 3.7, np.float32)
  w = np.ones((6, 1, 1), bool)
  w[0] = False
  y, _ = jn.batch_norm(jnp.asarray(x), jn.init_batch_stats(4), training=True, where=w)
  np.testing.assert_array_equal(np.asarray(y), 0.0)


# ----------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype,offset", [("bfloat16", 1e2), ("float16", 1e3),
                                          ("bfloat16", 1e3), ("float16", 1e4)])
def test_low_precision_large_offset_keeps_variance(dtype, offset):
  rng = np.random.default_rng(4)
  x = jnp.asarray(offset + 4 * rng.standard_normal((256, 32)), dtype)
  x64 = np.asarray(x, np.float64)  # the same rounded input, in float64
  m = jn.moments(x, axis=0)
  assert m.var.dtype == jnp.float32
  ref = R.moments(x64, 0)
  assert ref.var.min() > 1.0  # the rounded input still has its variance ...
  np.testing.assert_allclose(np.asarray(m.var), ref.var.ravel(), rtol=1e-5)  # ... and we see it
  np.testing.assert_allclose(np.asarray(m.mean), ref.mean.ravel(), rtol=1e-6)
  y, new = jn.batch_norm(x, jn.init_batch_stats(32), training=True, momentum=0.0)
  assert y.dtype == x.dtype and new.var.dtype == jnp.float32
  rb = R.batch_norm(x64, np.zeros(32), np.ones(32), training=True, momentum=0.0)
  R.assert_within(y, rb.y, 2 * R.ulp(dtype) * np.abs(rb.y) + 1e-5, "batch_norm y")
  np.testing.assert_allclose(np.asarray(new.var), rb.new_var, rtol=1e-5)
  yl = jn.layer_norm(x.T)
  rl = R.layer_norm(x64.T, epsilon=1e-6)
  R.assert_within(yl, rl.y, 2 * R.ulp(dtype) * np.abs(rl.y) + 1e-5, "layer_norm y")


def test_low_precision_gradient_rounded_once():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
  x64 = np.asarray(x, np.float64)
  z = R.layer_norm(x64, epsilon=1e-6).y
  g = jnp.asarray(z, jnp.bfloat16)  # cotangent ~ y: the exact d/dx nearly cancels
  dx = jax.grad(lambda x: jnp.sum(jn.layer_norm(x).astype(jnp.float32) * g))(x)
  with jax.enable_x64(True):
    g64 = jnp.asarray(np.asarray(g, np.float64))
    ref = np.asarray(jax.grad(lambda x: jnp.sum(R.layer_norm(x, xp=jnp).y * g64))(
        jnp.asarray(x64)))
  # float32 arithmetic, then one rounding to bf16
  R.assert_within(dx, ref, R.ulp(jnp.bfloat16) * np.abs(ref) + 1e-4, "d/dx")


# ----------------------------------------------------------------------------- degenerate batches


def _bn(x, stats, scale=None, bias=None, **kw):
  return jn.batch_norm(jnp.asarray(x), stats, scale, bias, training=True, **kw)


STATS = jn.BatchStats(jnp.asarray([0.5, -1.0, 2.0], jnp.float32),
                      jnp.asarray([4.0, 0.25, 1.0], jnp.float32))
SCALE = jnp.asarray([1.0, 2.0, 0.5], jnp.float32)
BIAS = jnp.asarray([0.1, -0.2, 0.3], jnp.float32)


def _eval(x):
  return np.asarray(jn.batch_norm(jnp.asarray(x), STATS, SCALE, BIAS, training=False)[0])


def _same(a, b):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batch_of_one_default_uses_running_stats():
  x = np.asarray([[1.0, 2.0, 3.0]], np.float32)
  y, new = _bn(x, STATS, SCALE, BIAS)
  assert np.isfinite(np.asarray(y)).all()
  np.testing.assert_allclose(np.asarray(y), _eval(x), rtol=1e-6)
  _same(new.mean, STATS.mean)
  _same(new.var, STATS.var)
  # a single image (1, H, W, C) is not degenerate: H*W elements per feature, batch statistics
  x4 = np.random.default_rng(6).standard_normal((1, 2, 2, 3)).astype(np.float32)
  y4, new4 = _bn(x4, STATS)
  assert not np.allclose(np.asarray(new4.mean), np.asarray(STATS.mean))
  np.testing.assert_allclose(np.asarray(y4).mean(axis=(0, 1, 2)), 0, atol=1e-6)


def test_batch_of_one_batch_policy():
  x = np.asarray([[1.0, 2.0, 3.0]], np.float32)
  y, new = _bn(x, STATS, SCALE, BIAS, degenerate="batch", momentum=0.9)
  _same(y, np.broadcast_to(np.asarray(BIAS), (1, 3)))  # x - mean = 0 exactly -> bias
  np.testing.assert_allclose(np.asarray(new.mean), 0.9 * np.asarray(STATS.mean) + 0.1 * x[0],
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new.var), 0.9 * np.asarray(STATS.var), rtol=1e-6)
  # unbiased_var with n = 1 must not divide by zero
  _, new = _bn(x, STATS, degenerate="batch", unbiased_var=True)
  assert np.isfinite(np.asarray(new.var)).all()


@pytest.mark.parametrize("degenerate", ["running", "batch"])
def test_all_masked_batch(degenerate):
  x = np.random.default_rng(7).standard_normal((5, 3)).astype(np.float32)
  where = np.zeros((5, 1), bool)
  y, new = _bn(x, STATS, SCALE, BIAS, where=where, degenerate=degenerate, momentum=0.9,
               unbiased_var=True)
  assert np.isfinite(np.asarray(y)).all()
  assert np.isfinite(np.asarray(new.mean)).all() and np.isfinite(np.asarray(new.var)).all()
  if degenerate == "running":
    np.testing.assert_allclose(np.asarray(y), _eval(x), rtol=1e-6)
    _same(new.mean, STATS.mean)
    _same(new.var, STATS.var)
  else:  # documented: mean 0, variance 0, like flax
    ref = R.batch_norm(x, STATS.mean, STATS.var, SCALE, BIAS, training=True, where=where,
                       degenerate="batch", momentum=0.9)
    np.testing.assert_allclose(np.asarray(y), ref.y, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.mean), 0.9 * np.asarray(STATS.mean), rtol=1e-6)


def test_partially_degenerate_features_default():
  """Per feature: 0, 1 and 3 included elements."""
  x = np.random.default_rng(8).standard_normal((4, 3)).astype(np.float32)
  where = np.asarray([[0, 1, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]], bool)
  y, new = _bn(x, STATS, SCALE, BIAS, where=where, momentum=0.5)
  ref = R.batch_norm(x, STATS.mean, STATS.var, SCALE, BIAS, training=True, where=where,
                     momentum=0.5)
  np.testing.assert_array_equal(ref.usable, [False, False, True])
  np.testing.assert_allclose(np.asarray(y), ref.y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(y)[:, :2], _eval(x)[:, :2], rtol=1e-6)
  _same(np.asarray(new.mean)[:2], np.asarray(STATS.mean)[:2])
  _same(np.asarray(new.var)[:2], np.asarray(STATS.var)[:2])
  np.testing.assert_allclose(np.asarray(new.var)[2], ref.new_var[2], rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("row", [0, 2])  # the first row feeds the shift
def test_nonfinite_in_batch_default(bad, row):
  x = np.random.default_rng(9).standard_normal((5, 3)).astype(np.float32)
  x[row, 0] = bad
  y, new = _bn(x, STATS, SCALE, BIAS, momentum=0.5)
  y = np.asarray(y)
  nan_in = np.isnan(x)
  assert not np.isnan(y[~nan_in]).any(), "a NaN appeared that was not in the input"
  assert np.isfinite(np.delete(y[:, 0], row)).all()
  # feature 0 fell back to the running averages, which are untouched
  np.testing.assert_allclose(np.delete(y[:, 0], row), np.delete(_eval(x)[:, 0], row), rtol=1e-6)
  assert np.asarray(new.mean)[0] == STATS.mean[0] and np.asarray(new.var)[0] == STATS.var[0]
  # the other features are normal
  ref = R.batch_norm(x[:, 1:], STATS.mean[1:], STATS.var[1:], SCALE[1:], BIAS[1:],
                     training=True, momentum=0.5)
  np.testing.assert_allclose(y[:, 1:], ref.y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new.var)[1:], ref.new_var, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new.mean)[1:], ref.new_mean, rtol=1e-6, atol=1e-7)


def test_overflowing_variance_default():
  """Finite input whose float32 variance overflows: the mean is finite, the variance is not;
  the default policy must not let inf into the running variance."""
  x = np.random.default_rng(13).standard_normal((4, 3)).astype(np.float32)
  x[:, 0] = [1e20, -1e20, 1e20, -1e20]
  m = jn.moments(jnp.asarray(x), axis=0)
  # (the float32 variance is inf - inf = NaN here, not inf: either way not finite)
  assert np.isfinite(np.asarray(m.mean)).all() and not np.isfinite(np.asarray(m.var)[0])
  y, new = _bn(x, STATS, SCALE, BIAS, momentum=0.5)
  assert np.isfinite(np.asarray(y)).all()
  assert np.asarray(new.var)[0] == STATS.var[0] and np.asarray(new.mean)[0] == STATS.mean[0]
  assert np.isfinite(np.asarray(new.var)).all()


def test_nonfinite_in_batch_batch_policy_propagates():
  """Documented behaviour of degenerate="batch": NaN spreads to the feature and its stats."""
  x = np.random.default_rng(10).standard_normal((5, 3)).astype(np.float32)
  x[2, 0] = np.nan
  y, new = _bn(x, STATS, degenerate="batch")
  assert np.isnan(np.asarray(y)[:, 0]).all() and np.isfinite(np.asarray(y)[:, 1:]).all()
  assert np.isnan(np.asarray(new.mean)[0]) and np.isnan(np.asarray(new.var)[0])
  assert np.isfinite(np.asarray(new.var)[1:]).all()


@pytest.mark.parametrize("row", [0, 3])
def test_masked_out_nan_is_ignored(row):
  x = np.random.default_rng(11).standard_normal((5, 3)).astype(np.float32)
  x[row] = np.nan
  where = np.ones((5, 1), bool)
  where[row] = False
  for degenerate in ("running", "batch"):
    y, new = _bn(x, STATS, where=where, degenerate=degenerate, momentum=0.5)
    ref = R.batch_norm(x, STATS.mean, STATS.var, training=True, where=where, momentum=0.5)
    keep = np.arange(5) != row
    np.testing.assert_allclose(np.asarray(y)[keep], ref.y[keep], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.var), ref.new_var, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.mean), ref.new_mean, rtol=1e-6, atol=1e-7)
  m = jn.moments(jnp.asarray(x), axis=0, where=where)
  assert np.isfinite(np.asarray(m.var)).all()
  yl = jn.layer_norm(jnp.asarray(x.T), where=where.T)
  assert np.isfinite(np.asarray(yl)[:, keep]).all()


ALL_MASKED_CASES = {
    "batch_norm/running": lambda x, s, b, w: jn.batch_norm(x, STATS, s, b, training=True,
                                                           where=w)[0],
    "batch_norm/batch": lambda x, s, b, w: jn.batch_norm(x, STATS, s, b, training=True,
                                                         where=w, degenerate="batch")[0],
    "batch_norm/stats": lambda x, s, b, w: sum(jn.batch_norm(
        x, STATS, s, b, training=True, where=w, degenerate="batch", unbiased_var=True)[1]),
    "layer_norm": lambda x, s, b, w: jn.layer_norm(x, s, b, where=w),
    "rms_norm": lambda x, s, b, w: jn.rms_norm(x, s, where=w),
    "instance_norm": lambda x, s, b, w: jn.instance_norm(x[:, None], s, b, where=w[:, None]),
    "group_norm": lambda x, s, b, w: jn.group_norm(x, s, b, num_groups=1, where=w),
    "moments": lambda x, s, b, w: sum(jn.moments(x * s[None] + b[None], axis=0, where=w)[:2]),
}


@pytest.mark.parametrize("name", sorted(ALL_MASKED_CASES))
@pytest.mark.parametrize("masked", ["all", "one"])
def test_gradients_finite_when_degenerate(name, masked):
  """All-masked batches (and a single included element) keep gradients finite."""
  fn = ALL_MASKED_CASES[name]
  x = jnp.asarray(np.random.default_rng(12).standard_normal((4, 3)), jnp.float32)
  w = np.zeros((4, 3), bool)
  if masked == "one":
    w[1, :] = True  # one element per feature (batch norm); one row (feature-wise norms)

  def loss(x, s, b):
    out = fn(x, s, b, w)
    return jnp.sum(out * jnp.arange(1.0, 1.0 + out.size).reshape(out.shape))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, SCALE, BIAS)
  for gr in grads:
    assert np.isfinite(np.asarray(gr)).all(), (name, gr)
