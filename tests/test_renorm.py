"""Batch Renorm, Ghost BN and EvoNorm-B0/S0 against float64 references from the papers.

Outputs, running averages and gradients (w.r.t. x, scale, bias, v1: ``jax.grad`` of
the float64 jnp reference in ``reference_renorm.py``, with stop-gradient on Batch
Renorm's r and d), masks, jit, bf16, traced limits, cross-device equality with the
global batch on the 8 fake devices, errors, and the linen/NNX modules.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
import reference_renorm as RR

F32_TOL = 2e-5


def _data(shape=(8, 3, 5), seed=0, loc=0.5):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = (loc + rng.standard_normal(shape) * np.linspace(0.5, 2.0, c)).astype(np.float32)
  params = dict(scale=(1 + 0.3 * rng.standard_normal(c)).astype(np.float32),
                bias=(0.2 * rng.standard_normal(c)).astype(np.float32),
                v1=(0.8 + 0.3 * rng.standard_normal(c)).astype(np.float32))
  # running averages far enough from the batch that r and d clip for some features
  stats = jn.BatchStats(mean=np.linspace(-1.5, 1.5, c).astype(np.float32),
                        var=np.resize([0.05, 1.0, 0.3, 6.0, 20.0], c).astype(np.float32))
  ct = rng.standard_normal(shape).astype(np.float32)
  return x, params, stats, ct


def _mask(kind, shape, seed=1):
  rng = np.random.default_rng(seed)
  if kind is None:
    return None
  if kind == "sample":
    return rng.random((shape[0],) + (1,) * (len(shape) - 1)) < 0.7
  return rng.random(shape) < 0.75


def _close(actual, desired, tol=F32_TOL, what=""):
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  scale = max(1.0, float(np.max(np.abs(desired))))
  np.testing.assert_allclose(actual, desired, rtol=0, atol=tol * scale, err_msg=what)


def _grads(f, x, params, ct, names):
  """Gradients of ``sum(f(x, **params) * ct)`` w.r.t. x and ``names``."""
  def loss(x, ps):
    return jnp.sum(f(x, **ps, **{k: v for k, v in params.items() if k not in ps}) * ct)
  return jax.grad(loss, argnums=(0, 1))(x, {k: params[k] for k in names})


def _ref_grads(f, x, params, ct, names):
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
    gx, gp = _grads(f, f64(x), {k: f64(v) for k, v in params.items()}, f64(ct), names)
    return np.asarray(gx), {k: np.asarray(v) for k, v in gp.items()}


def _check_grads(ours, ref, x, params, ct, names, tol=F32_TOL):
  gx, gp = _grads(ours, jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()},
                  jnp.asarray(ct), names)
  rx, rp = _ref_grads(ref, x, params, ct, names)
  _close(gx, rx, tol, "dx")
  for k in names:
    _close(gp[k], rp[k], tol, f"d{k}")


# ----------------------------------------------------------------------------- Batch Renorm


@pytest.mark.parametrize("mask", [None, "sample", "elem"])
def test_batch_renorm_matches_reference(mask):
  x, params, stats, ct = _data()
  where = _mask(mask, x.shape)
  hyper = dict(r_max=1.6, d_max=0.7, momentum=0.9, epsilon=1e-3)
  p = dict(scale=params["scale"], bias=params["bias"])
  y, new = jax.jit(functools.partial(jn.batch_renorm, training=True, where=where, **hyper))(
      x, stats, **p)
  ry, rm, rv = RR.batch_renorm(x, stats.mean, stats.var, **p, training=True, where=where,
                               **hyper)
  _close(y, ry, what="y")
  _close(new.mean, rm, what="mean")
  _close(new.var, rv, what="var")
  assert new.mean.dtype == jnp.float32 and type(new) is type(stats)
  # r and d clip for some features and not for others (else the test is weaker)
  s = RR.R.moments(np.float64(x), (0, 1), where)
  r = np.sqrt(s.var + 1e-3) / np.sqrt(stats.var + 1e-3)
  assert (r > 1.6).any() and ((r < 1.6) & (r > 1 / 1.6)).any() and (r < 1 / 1.6).any()

  if mask != "elem":  # gradients once, masked (each check compiles two programs)
    return
  ours = lambda x, scale, bias: jn.batch_renorm(x, stats, scale, bias, training=True,
                                                where=where, **hyper)[0]
  ref = lambda x, scale, bias: RR.batch_renorm(x, stats.mean, stats.var, scale, bias,
                                               training=True, where=where, xp=jnp,
                                               sg=lax.stop_gradient, **hyper)[0]
  _check_grads(ours, ref, x, p, ct, ("scale", "bias"))


def test_batch_renorm_evaluation_is_batch_norm_and_state_type_is_stable():
  x, params, stats, _ = _data()
  y, s = jn.batch_renorm(x, stats, params["scale"], params["bias"], training=False)
  yb, _ = jn.batch_norm(x, stats, params["scale"], params["bias"], training=False)
  np.testing.assert_array_equal(y, yb)
  assert s is not None and all(np.array_equal(a, b) for a, b in zip(s, stats))
  ry, _, _ = RR.batch_renorm(x, stats.mean, stats.var, params["scale"], params["bias"],
                             training=False, r_max=3, d_max=5)
  _close(y, ry)
  st = jax.tree.map(jnp.asarray, stats)
  out = lax.cond(True, lambda: jn.batch_renorm(x, st, training=True)[1],
                 lambda: jn.batch_renorm(x, st, training=False)[1])
  assert jax.tree.map(lambda a: (a.shape, a.dtype), out) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), st)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_renorm_with_r1_d0_is_batch_norm_exactly(affine):
  x, params, stats, ct = _data(seed=3)
  where = _mask("elem", x.shape)
  p = dict(scale=params["scale"], bias=params["bias"]) if affine else {}

  def both(x, p):
    a = jn.batch_renorm(x, stats, **p, training=True, r_max=1.0, d_max=0.0, where=where)
    b = jn.batch_norm(x, stats, **p, training=True, where=where)
    return a, b

  (ya, sa), (yb, sb) = jax.jit(both)(x, p)
  np.testing.assert_array_equal(ya, yb)
  for u, v in zip(sa, sb):
    np.testing.assert_array_equal(u, v)
  grad = lambda i: jax.jit(jax.grad(lambda x, p: jnp.sum(both(x, p)[i][0] * ct), (0, 1)))
  ga, gb = grad(0)(x, p), grad(1)(x, p)
  for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_array_equal(u, v)


def test_batch_renorm_traced_limits_and_schedule():
  x, params, stats, _ = _data()

  @jax.jit
  def f(step):
    r_max, d_max = jn.renorm_schedule(step, warmup_steps=10, r_max_steps=30, d_max_steps=20)
    return jn.batch_renorm(x, stats, training=True, r_max=r_max, d_max=d_max)[0]

  for step, (r, d) in [(0, (1.0, 0.0)), (20, (2.0, 5.0)), (99, (3.0, 5.0))]:
    want = jn.batch_renorm(x, stats, training=True, r_max=r, d_max=d)[0]
    _close(f(step), want, 1e-6)
  r, d = jn.renorm_schedule(15, warmup_steps=10, r_max_steps=30, d_max_steps=20)
  assert float(r) == pytest.approx(1.5) and float(d) == pytest.approx(2.5)
  _close(f(0), jn.batch_norm(x, stats, training=True)[0], 1e-6)


def test_batch_renorm_bf16_and_large_offset():
  x, params, stats, _ = _data(loc=0.0)
  xb = jnp.asarray(x, jnp.bfloat16)
  y, s = jax.jit(functools.partial(jn.batch_renorm, training=True, r_max=1.6, d_max=0.7))(
      xb, stats, params["scale"], params["bias"])
  assert y.dtype == jnp.bfloat16 and s.mean.dtype == jnp.float32
  ry, rm, _ = RR.batch_renorm(np.asarray(xb, np.float64), stats.mean, stats.var,
                              params["scale"], params["bias"], training=True, r_max=1.6,
                              d_max=0.7)
  _close(y, ry, 2 ** -7, "bf16 y")
  _close(s.mean, rm, 1e-6, "bf16 running mean")
  # |mean| >> std in float32: statistics must not cancel
  off = (1e4 + x).astype(np.float32)
  st = jn.BatchStats(mean=np.full(5, 1e4, np.float32), var=np.ones(5, np.float32))
  y, _ = jax.jit(functools.partial(jn.batch_renorm, training=True, r_max=2.0, d_max=1.0))(
      off, st)
  ry, _, _ = RR.batch_renorm(off, st.mean, st.var, training=True, r_max=2.0, d_max=1.0)
  _close(y, ry, 2e-3, "offset 1e4")


def _per_device(x, where):
  """(8, N/8, ...) shards of x and a mask that leaves devices with unequal counts."""
  return x.reshape((8, -1) + x.shape[1:]), where.reshape((8, -1) + where.shape[1:])


@pytest.mark.parametrize("fn", ["renorm", "evonorm_b0"])
def test_cross_device_equals_global_batch(devices, fn):
  x, params, stats, ct = _data(shape=(16, 3, 4))
  rng = np.random.default_rng(5)
  where = rng.random(x.shape) < np.linspace(0.3, 1.0, 16)[:, None, None]  # unequal counts
  if fn == "renorm":
    call = lambda x, w, axis_name=None: jn.batch_renorm(
        x, stats, params["scale"], params["bias"], training=True, r_max=1.5, d_max=0.5,
        where=w, axis_name=axis_name)
  else:
    call = lambda x, w, axis_name=None: jn.evonorm_b0(
        x, stats, params["scale"], params["bias"], params["v1"], training=True, where=w,
        axis_name=axis_name)
  yg, sg = call(x, where)
  xs, ws = _per_device(x, where)
  yv, sv = jax.vmap(functools.partial(call, axis_name="d"), axis_name="d")(xs, ws)
  _close(yv.reshape(x.shape), yg, 1e-5, "vmap y")
  for a, b in zip(sv, sg):
    _close(a[0], b, 1e-6, "vmap state")
  mesh = jax.make_mesh((8,), ("d",), devices=devices)
  sm = jax.shard_map(functools.partial(call, axis_name="d"), mesh=mesh,
                     in_specs=(P("d"), P("d")), out_specs=(P("d"), P()))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("d")))
  ys, ss = jax.jit(sm)(put(x), put(where))
  _close(ys, yg, 1e-5, "shard_map y")
  for a, b in zip(ss, sg):
    _close(a, b, 1e-6, "shard_map state")
  if fn != "renorm":  # gradients across devices: once (EvoNorm-B0's are plain autodiff)
    return
  gx = jax.grad(lambda x: jnp.sum(call(x, where)[0] * ct))(x)
  gs = jax.jit(jax.grad(lambda x: jnp.sum(sm(x, put(where))[0] * ct)))(put(x))
  _close(gs, gx, 1e-5, "shard_map dx")


def test_batch_renorm_degenerate_batch_uses_running_averages():
  x, params, stats, _ = _data()
  where = np.zeros(x.shape, bool)
  where[:, :, 0] = True  # only feature 0 has data
  y, s = jn.batch_renorm(x, stats, training=True, where=where)
  ye, _ = jn.batch_norm(x, stats, training=False)
  np.testing.assert_allclose(y[..., 1:], ye[..., 1:], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(s.mean[1:], stats.mean[1:])
  assert np.all(np.isfinite(y))


# ----------------------------------------------------------------------------- Ghost BN


@pytest.mark.parametrize("mask", [None, "sample", "elem"])
def test_ghost_batch_norm_matches_reference(mask):
  x, params, stats, ct = _data(shape=(12, 2, 3))
  where = _mask(mask, x.shape, seed=7)
  p = dict(scale=params["scale"][:3], bias=params["bias"][:3])
  st = jn.BatchStats(stats.mean[:3], stats.var[:3])
  kw = dict(training=True, virtual_batch_size=4, momentum=0.8, epsilon=1e-3, where=where)
  y, new = jax.jit(functools.partial(jn.ghost_batch_norm, **kw))(x, st, **p)
  ry, rm, rv = RR.ghost_batch_norm(x, st.mean, st.var, **p, **kw)
  _close(y, ry, what="y")
  _close(new.mean, rm, what="mean")
  _close(new.var, rv, what="var")
  if mask != "elem":  # gradients once, masked
    return
  ours = lambda x, scale, bias: jn.ghost_batch_norm(x, st, scale, bias, **kw)[0]
  ref = lambda x, scale, bias: RR.ghost_batch_norm(x, st.mean, st.var, scale, bias, xp=jnp,
                                                   **kw)[0]
  _check_grads(ours, ref, x, p, ct, ("scale", "bias"))


def test_ghost_batch_norm_per_sample_scale_and_eval():
  x, params, stats, _ = _data(shape=(6, 5))
  rng = np.random.default_rng(2)
  scale = (1 + rng.standard_normal((6, 1))).astype(np.float32)  # per-sample (FiLM)
  y, _ = jn.ghost_batch_norm(x, stats, scale, None, training=True, virtual_batch_size=3)
  ry, _, _ = RR.ghost_batch_norm(x, stats.mean, stats.var, scale, None, training=True,
                                 virtual_batch_size=3)
  _close(y, ry)
  y, s = jn.ghost_batch_norm(x, stats, training=False, virtual_batch_size=3)
  np.testing.assert_array_equal(y, jn.batch_norm(x, stats, training=False)[0])
  assert all(np.array_equal(a, b) for a, b in zip(s, stats))


def test_ghost_with_full_virtual_batch_is_batch_norm():
  x, params, stats, ct = _data()
  where = _mask("elem", x.shape)
  f = lambda x: jn.ghost_batch_norm(x, stats, params["scale"], params["bias"], training=True,
                                    virtual_batch_size=x.shape[0], where=where)
  g = lambda x: jn.batch_norm(x, stats, params["scale"], params["bias"], training=True,
                              where=where)
  (ya, sa), (yb, sb) = jax.jit(lambda x: (f(x), g(x)))(x)
  np.testing.assert_allclose(ya, yb, rtol=0, atol=1e-6)
  for u, v in zip(sa, sb):
    np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
  ga, gb = jax.jit(lambda x: (jax.grad(lambda x: jnp.sum(f(x)[0] * ct))(x),
                              jax.grad(lambda x: jnp.sum(g(x)[0] * ct))(x)))(x)
  np.testing.assert_allclose(ga, gb, rtol=0, atol=1e-5)


def test_ghost_empty_virtual_batch_gets_running_averages_and_weight_zero():
  x, params, stats, _ = _data(shape=(8, 5))
  where = np.ones((8, 1), bool)
  where[:4] = False  # the first virtual batch is empty
  (y, s), (ye, _), (yb, sb) = jax.jit(lambda x: (
      jn.ghost_batch_norm(x, stats, training=True, virtual_batch_size=4, where=where,
                          momentum=0.5),
      jn.batch_norm(x[:4], stats, training=False),
      jn.batch_norm(x[4:], stats, training=True, momentum=0.5)))(x)
  np.testing.assert_allclose(y[:4], ye, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y[4:], yb, rtol=0, atol=1e-6)
  for u, v in zip(s, sb):
    np.testing.assert_allclose(u, v, rtol=1e-6)


def test_ghost_cross_device_virtual_batches(devices):
  """With axis_name, virtual batch g spans the g-th chunk of every device's shard."""
  x, params, stats, _ = _data(shape=(16, 5))
  xs = x.reshape(8, 2, 5)  # per device: 2 samples = 2 virtual batches of 1
  yv, sv = jax.vmap(lambda a: jn.ghost_batch_norm(a, stats, training=True,
                                                  virtual_batch_size=1, axis_name="d"),
                    axis_name="d")(xs)
  # the same as the global batch rearranged so that each virtual batch is contiguous
  xg = xs.transpose(1, 0, 2).reshape(16, 5)
  yg, sg = jn.ghost_batch_norm(xg, stats, training=True, virtual_batch_size=8)
  _close(yv.transpose(1, 0, 2).reshape(16, 5), yg, 1e-5)
  for a, b in zip(sv, sg):
    _close(a[0], b, 1e-6)


# ----------------------------------------------------------------------------- EvoNorm


@pytest.mark.parametrize("training,mask", [(True, None), (True, "elem"), (False, "elem")])
def test_evonorm_b0_matches_reference(training, mask):
  x, params, stats, ct = _data(shape=(4, 3, 3, 5))
  where = _mask(mask, x.shape)
  kw = dict(training=training, momentum=0.9, epsilon=1e-3, where=where)
  y, new = jax.jit(functools.partial(jn.evonorm_b0, **kw))(x, stats, params["scale"],
                                                           params["bias"], params["v1"])
  ry, rm, rv = RR.evonorm_b0(x, stats.mean, stats.var, params["scale"], params["bias"],
                             params["v1"], **kw)
  _close(y, ry, what="y")
  _close(new.mean, rm, what="mean")
  _close(new.var, rv, what="var")
  xd = x.astype(np.float64)  # both branches of the max are taken somewhere
  left = np.sqrt(xd.var(axis=(0, 1, 2)) + 1e-3)
  right = params["v1"] * xd + np.sqrt(xd.var(axis=(1, 2), keepdims=True) + 1e-3)
  assert (left > right).any() and (left < right).any()
  if not (training and mask):  # gradients once, masked
    return
  ours = lambda x, scale, bias, v1: jn.evonorm_b0(x, stats, scale, bias, v1, **kw)[0]
  ref = lambda x, scale, bias, v1: RR.evonorm_b0(x, stats.mean, stats.var, scale, bias, v1,
                                                 xp=jnp, **kw)[0]
  _check_grads(ours, ref, x, params, ct, ("scale", "bias", "v1"))


def test_evonorm_b0_groups():
  x, params, stats, _ = _data(shape=(4, 3, 3, 6))
  st = jn.BatchStats(np.zeros(6, np.float32), np.ones(6, np.float32))
  v1 = np.ones(6, np.float32)
  # group_size=1 is the per-channel instance variance (the paper)
  b0 = functools.partial(jn.evonorm_b0, training=True, epsilon=1e-3)
  a, b, y = jax.jit(lambda x: [b0(x, st, None, None, v1, **kw)[0] for kw in (
      dict(group_size=1), {}, dict(num_groups=2))])(x)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # y: 2 groups of 3 channels, instance variance over (H, W) and the group's channels
  xd = x.astype(np.float64)
  var_b = xd.var(axis=(0, 1, 2))
  var_g = xd.reshape(4, 3, 3, 2, 3).var(axis=(1, 2, 4))  # (N, G)
  std_i = np.repeat(np.sqrt(var_g + 1e-3), 3, axis=1)[:, None, None, :]
  want = xd / np.maximum(np.sqrt(var_b + 1e-3), xd + std_i)
  _close(y, want)


@pytest.mark.parametrize("mask", [None, "sample"])
def test_evonorm_s0_matches_reference(mask):
  x, params, _, ct = _data(shape=(3, 4, 2, 6))
  where = _mask(mask, x.shape)
  kw = dict(num_groups=2, epsilon=1e-4, where=where)
  y = jax.jit(functools.partial(jn.evonorm_s0, **kw))(x, params["scale"], params["bias"],
                                                      params["v1"])
  ry = RR.evonorm_s0(x, params["scale"], params["bias"], params["v1"], **kw)
  _close(y, ry, what="y")
  if mask is None:  # gradients once, masked
    return
  ours = lambda x, scale, bias, v1: jn.evonorm_s0(x, scale, bias, v1, **kw)
  ref = lambda x, scale, bias, v1: RR.evonorm_s0(x, scale, bias, v1, xp=jnp, **kw)
  _check_grads(ours, ref, x, params, ct, ("scale", "bias", "v1"))


def test_evonorm_bf16_and_large_offset():
  x, params, stats, _ = _data(shape=(4, 3, 3, 6), loc=0.0)
  xb = jnp.asarray(x, jnp.bfloat16)
  y = jn.evonorm_s0(xb, None, None, params["v1"], group_size=3)
  assert y.dtype == jnp.bfloat16
  _close(y, RR.evonorm_s0(np.asarray(xb, np.float64), None, None, params["v1"], num_groups=2),
         2 ** -7)
  st = jn.BatchStats(np.zeros(6, np.float32), np.ones(6, np.float32))
  y, s = jn.evonorm_b0(xb, st, None, None, params["v1"], training=True)
  assert y.dtype == jnp.bfloat16 and s.var.dtype == jnp.float32
  # x = 1e4 + noise in float32: the statistics keep their digits
  off = (1e4 + x).astype(np.float32)
  v1 = np.zeros(6, np.float32)  # the instance branch would otherwise dominate
  y, _ = jn.evonorm_b0(off, st, None, None, v1, training=True)
  ry, _, _ = RR.evonorm_b0(off, st.mean, st.var, None, None, v1, training=True)
  _close(y, ry, 1e-5, "B0 offset")
  y = jn.evonorm_s0(off, None, None, v1, num_groups=2)
  _close(y, RR.evonorm_s0(off, None, None, v1, num_groups=2), 1e-5, "S0 offset")


# ----------------------------------------------------------------------------- errors


def test_errors_are_clear():
  x, params, stats, _ = _data()
  with pytest.raises(ValueError, match=r"r_max must be >= 1.*got 0.5"):
    jn.batch_renorm(x, stats, training=True, r_max=0.5)
  with pytest.raises(ValueError, match=r"d_max must be >= 0.*got -1"):
    jn.batch_renorm(x, stats, training=True, d_max=-1.0)
  with pytest.raises(ValueError, match=r"r_max must be >= 1"):
    jn.batch_renorm(x, stats, training=True, r_max=jnp.asarray(0.9))
  with pytest.raises(ValueError, match=r"r_max must be >= 1"):
    jn.batch_renorm(x, stats, training=True, r_max=float("nan"))
  with pytest.raises(ValueError, match=r"r_max must be a scalar"):
    jn.batch_renorm(x, stats, training=True, r_max=np.ones(5))
  with pytest.raises(TypeError, match="training"):
    jax.jit(lambda t: jn.batch_renorm(x, stats, training=t))(True)
  with pytest.raises(ValueError, match=r"virtual_batch_size=3 must be a positive int dividing "
                                       r"the batch size 8.*divisors of 8: \[1, 2, 4, 8\]"):
    jn.ghost_batch_norm(x, stats, training=True, virtual_batch_size=3)
  with pytest.raises(ValueError, match="virtual_batch_size"):
    jn.ghost_batch_norm(x, stats, training=False, virtual_batch_size=0)
  with pytest.raises(ValueError, match="batch axis"):
    jn.ghost_batch_norm(x, jn.init_batch_stats((8, 5)), training=True, virtual_batch_size=2,
                        feature_axes=(0, 2))
  with pytest.raises(ValueError, match="no spatial axis"):
    jn.evonorm_b0(x[:, 0], stats, None, None, np.ones(5), training=True)
  with pytest.raises(ValueError, match="exactly one of num_groups or group_size"):
    jn.evonorm_s0(x, None, None, np.ones(5))
  with pytest.raises(ValueError, match=r"num_groups=2 must be a positive int dividing"):
    jn.evonorm_s0(x, None, None, np.ones(5), num_groups=2)
  with pytest.raises(TypeError, match="v1"):
    jn.evonorm_b0(x, stats, None, None, None, training=True)
  with pytest.raises(ValueError, match="v1 has shape"):
    jn.evonorm_s0(x, None, None, np.ones(4), num_groups=5)
  with pytest.raises(ValueError, match="warmup_steps < r_max_steps"):
    jn.renorm_schedule(0, warmup_steps=10, r_max_steps=5)
  with pytest.raises(ValueError, match="running mean has shape"):
    jn.batch_renorm(x, jn.init_batch_stats(4), training=True)


# ----------------------------------------------------------------------------- modules


def _train_linen(module, x, steps=3):
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt = optax.sgd(0.1)
  state = opt.init(params)

  @jax.jit
  def step(params, batch_stats, state):
    def loss(params):
      y, upd = module.apply({"params": params, "batch_stats": batch_stats}, x,
                            use_running_average=False, mutable=["batch_stats"])
      return jnp.mean((y - 1.0) ** 2), upd["batch_stats"]
    (l, bs), g = jax.value_and_grad(loss, has_aux=True)(params)
    upd, state = opt.update(g, state)
    return optax.apply_updates(params, upd), bs, state, l

  losses = []
  for _ in range(steps):
    params, batch_stats, state, l = step(params, batch_stats, state)
    losses.append(float(l))
  return {"params": params, "batch_stats": batch_stats}, losses


@pytest.mark.parametrize("name", ["BatchRenorm", "GhostBatchNorm", "EvoNormB0"])
def test_linen_modules_train_and_load_batchnorm_checkpoints(name):
  from flax import serialization
  from jaxnorm import linen as jnn
  x = jnp.asarray(_data(shape=(8, 2, 2, 4))[0])
  extra = {"GhostBatchNorm": dict(virtual_batch_size=4)}.get(name, {})
  module = getattr(jnn, name)(momentum=0.5, **extra)
  variables, losses = _train_linen(module, x)
  assert losses[-1] < losses[0]
  assert not np.allclose(variables["batch_stats"]["var"], 1.0)
  # the variable tree is BatchNorm's (plus v1 for EvoNorm): BatchNorm checkpoints load
  bn = jnn.BatchNorm().init(jax.random.key(0), x, use_running_average=True)
  want = jax.tree.structure(bn)
  got = {"params": {k: v for k, v in variables["params"].items() if k != "v1"},
         "batch_stats": variables["batch_stats"]}
  assert jax.tree.structure(got) == want
  restored = serialization.from_bytes(variables, serialization.to_bytes(variables))
  y1 = module.apply(variables, x, use_running_average=True)
  y2 = module.apply(restored, x, use_running_average=True)
  np.testing.assert_array_equal(y1, y2)
  core = {"BatchRenorm": lambda: jn.batch_renorm, "GhostBatchNorm": lambda: jn.ghost_batch_norm,
          "EvoNormB0": lambda: jn.evonorm_b0}[name]()
  st = jn.BatchStats(**variables["batch_stats"])
  p = variables["params"]
  args = (p["scale"], p["bias"]) + ((p["v1"],) if "v1" in p else ())
  want_y, _ = core(x, st, *args, training=False, **extra)
  np.testing.assert_array_equal(y1, want_y)


def test_linen_batch_renorm_call_time_limits_and_s0():
  from jaxnorm import linen as jnn
  x = jnp.asarray(_data(shape=(8, 2, 2, 4))[0])
  m = jnn.BatchRenorm(use_running_average=False)
  v = m.init(jax.random.key(0), x)
  y, _ = m.apply(v, x, r_max=1.0, d_max=0.0, mutable=["batch_stats"])
  yb, _ = jnn.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
  np.testing.assert_array_equal(y, yb)
  s0 = jnn.EvoNormS0(num_groups=2)
  vs = s0.init(jax.random.key(0), x)
  assert set(vs["params"]) == {"scale", "bias", "v1"}
  np.testing.assert_array_equal(s0.apply(vs, x),
                                jn.evonorm_s0(x, *(vs["params"][k] for k in ("scale", "bias",
                                                                             "v1")),
                                              num_groups=2))


@pytest.mark.parametrize("name", ["BatchRenorm", "GhostBatchNorm", "EvoNormB0", "EvoNormS0"])
def test_nnx_modules_train_and_round_trip(name):
  from flax import nnx
  from jaxnorm import nnx as jnnx
  x = jnp.asarray(_data(shape=(8, 2, 2, 4))[0])
  extra = {"GhostBatchNorm": dict(virtual_batch_size=4, momentum=0.5),
           "EvoNormS0": dict(num_groups=2)}.get(name, dict(momentum=0.5))
  model = getattr(jnnx, name)(4, rngs=nnx.Rngs(0), **extra)
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss(model):
      return jnp.mean((model(x) - 1.0) ** 2)
    l, g = nnx.value_and_grad(loss)(model)
    opt.update(model, g)
    return l

  losses = [float(step(model, opt)) for _ in range(3)]
  assert losses[-1] < losses[0]
  if name != "EvoNormS0":
    assert not np.allclose(model.var[...], 1.0)
    model.eval()
    assert model.use_running_average
  graphdef, state = nnx.split(model)
  clone = nnx.merge(graphdef, jax.tree.map(jnp.array, state))
  np.testing.assert_array_equal(clone(x), model(x))
  if name == "EvoNormS0":
    return
  # the same BatchStat/Param names as jaxnorm.nnx.BatchNorm: its state loads
  bn = jnnx.BatchNorm(4, rngs=nnx.Rngs(0))
  bn_state = nnx.state(bn)
  st = nnx.state(model)
  assert set(bn_state.keys()) <= set(st.keys())
  nnx.update(model, bn_state)
  np.testing.assert_array_equal(model.var[...], bn.var[...])


def test_modules_reject_counted_conventions_and_feed_precise_bn():
  """The counted conventions are BatchNorm's only (a clear error, not silently ignored),
  and the PreciseBN helpers see Batch Renorm layers through the same hook as BatchNorm."""
  import flax.linen as nn
  from flax import nnx
  from jaxnorm import linen as jnn
  from jaxnorm import nnx as jnnx
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 3)) + 2.0, jnp.float32)
  for kw in (dict(debias=True), dict(momentum=None)):
    with pytest.raises(ValueError, match="BatchNorm only"):
      jnn.BatchRenorm(use_running_average=False, **kw).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="BatchNorm only"):
      jnnx.GhostBatchNorm(3, virtual_batch_size=4, rngs=nnx.Rngs(0), **kw)(x)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      return jnn.BatchRenorm(use_running_average=not train)(x)

  batches = [x, x * 2.0 + 1.0]
  v = Net().init(jax.random.key(0), x, train=False)
  v = jnn.precise_batch_stats(Net().apply, v, batches, apply_kwargs={"train": True})
  both = np.concatenate([np.asarray(b, np.float64) for b in batches])
  np.testing.assert_allclose(v["batch_stats"]["BatchRenorm_0"]["mean"], both.mean(0), rtol=1e-5)
  np.testing.assert_allclose(v["batch_stats"]["BatchRenorm_0"]["var"], both.var(0), rtol=1e-4)
  m = jnnx.BatchRenorm(3, rngs=nnx.Rngs(0))
  jnnx.precise_batch_stats(m, batches)
  np.testing.assert_allclose(m.mean[...], both.mean(0), rtol=1e-5)
