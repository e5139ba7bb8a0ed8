"""The column-sum CPU kernel (jaxnorm._cpu._cols): batch, group and instance norm.

It takes the two statistics sums (forward) and the backward's ``sum(g)`` and
``sum(g * (x - shift))`` in one pass.  Compared with the float64 oracle
(tests/reference.py) and with the XLA path (kernels off): outputs, running
averages and gradients over layouts (NHWC, NC, NCHW), dtypes, odd sizes (one
feature column short of the cut-off, row counts across the kernel's 128-row
blocks), a large offset, the degenerate-batch fallback, NaN input, second order,
vmap, axis_name across devices, sharded jit (no all-gather of x), and what stays
on the XLA path (masks, fewer than 32 summed rows, non-contiguous axes, float64).  Skipped when the kernels cannot be built here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
from jaxnorm import _cpu
from jaxnorm._cpu import _cols

import reference as ref
from kernel_checks import assert_sharded_jit_does_not_gather

pytestmark = pytest.mark.skipif(not jn.kernels_available(),
                                reason=f"kernels not built: {_cpu.build_error()}")

F64 = np.float64
KERNEL = "jaxnorm_column_sums"


def calls(f, *args) -> int:
  return str(jax.make_jaxpr(f)(*args)).count(KERNEL + "[")


def data(shape, dtype=np.float32, seed=0, loc=0.0, scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray((loc + scale * rng.normal(size=shape)).astype(dtype))


def bn(x, s, b, axis=-1):
  c = x.shape[axis]
  y, st = jn.batch_norm(x, jn.BatchStats(jnp.full((c,), 0.1), jnp.full((c,), 2.0)), s, b,
                        training=True, feature_axes=axis)
  return y, st.mean, st.var


def bn_oracle(x, s, b, axis=-1):
  c = x.shape[axis]
  o = ref.batch_norm(x, np.full(c, 0.1), np.full(c, 2.0), s, b,
                     training=True, feature_axes=axis, xp=jnp)
  return o.y, o.new_mean, o.new_var


def gn(x, s, b):
  return (jn.group_norm(x, s, b, num_groups=4),)


def gn_oracle(x, s, b):
  return (ref.group_norm(x, s, b, num_groups=4, xp=jnp).y,)


def inorm(x, s, b):
  return (jn.instance_norm(x, s, b),)


def in_oracle(x, s, b):
  return (ref.instance_norm(x, s, b, xp=jnp).y,)


def nchw(x, s, b):
  return bn(x, s, b, axis=1)


def nchw_oracle(x, s, b):
  return bn_oracle(x, s, b, axis=1)


CASES = {  # name: (fn, oracle, shape)
    "bn_nhwc": (bn, bn_oracle, (3, 5, 7, 16)),
    "bn_nc_rows_across_blocks": (bn, bn_oracle, (300, 9)),
    "bn_two_rows_xla_path": (bn, bn_oracle, (2, 1023)),  # fewer than MIN_ROWS summed
    # statistics per (c, h, w) over N, merged over (h, w); the backward's sums over
    # (N, H, W) are not one contiguous run: XLA path
    "bn_nchw": (nchw, nchw_oracle, (32, 8, 2, 5)),
    "gn_nhwc": (gn, gn_oracle, (2, 8, 4, 16)),
    "in_nhwc": (inorm, in_oracle, (2, 6, 6, 8)),
}


def _grads(f, x, s, b, w):
  loss = lambda x, s, b: jnp.sum(f(x, s, b)[0].astype(jnp.float32) * w)
  return jax.grad(loss, argnums=(0, 1, 2))(x, s, b)


def _oracle_grads(o, x, s, b, w):
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(a, F64)) for a in (x, s, b)]
    w64 = jnp.asarray(np.asarray(w, F64))
    outs = o(*args)
    grads = jax.grad(lambda *a: jnp.sum(o(*a)[0] * w64), argnums=(0, 1, 2))(*args)
    return [np.asarray(v) for v in outs], [np.asarray(g) for g in grads]


def _params(x, f):
  axis = 1 if f is nchw else -1
  c = x.shape[axis]
  return data((c,), seed=1, loc=1.0, scale=0.2), data((c,), seed=2, scale=0.1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_matches_oracle_and_xla_path(name):
  f, o, shape = CASES[name]
  x = data(shape, loc=0.5, scale=2.0)
  s, b = _params(x, f)
  w = data(shape, seed=3)
  expected = {"bn_nchw": 1, "bn_two_rows_xla_path": 0}.get(name, 2)  # statistics, backward
  assert calls(lambda x: _grads(f, x, s, b, w), x) == expected
  outs = jax.jit(f)(x, s, b)
  grads = jax.jit(lambda x, s, b: _grads(f, x, s, b, w))(x, s, b)
  with jn.no_kernels():
    outs_x = jax.jit(lambda x, s, b: f(x, s, b))(x, s, b)
    grads_x = jax.jit(lambda x, s, b: _grads(f, x, s, b, w))(x, s, b)
    assert calls(lambda x: _grads(f, x, s, b, w), x) == 0
  outs64, grads64 = _oracle_grads(o, x, s, b, w)
  for i, (v, vx, v64) in enumerate(zip(outs, outs_x, outs64)):
    ref.assert_within(v, v64, 3e-6 * (1 + np.abs(v64)), f"{name} output {i}")
    ref.assert_within(v, vx, 3e-6 * (1 + np.abs(v64)), f"{name} output {i} vs XLA path")
  n = np.prod(shape) / shape[1 if f is nchw else -1]
  for what, g, gx, g64 in zip(("dx", "dscale", "dbias"), grads, grads_x, grads64):
    tol = 1e-5 * np.sqrt(n) * (1 + np.abs(g64))
    ref.assert_within(g, g64, tol, f"{name} {what}")
    ref.assert_within(g, gx, tol + np.abs(np.asarray(gx, F64) - g64), f"{name} {what} vs XLA")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
  x = data((4, 3, 3, 16), dtype, loc=0.5)
  s, b = _params(x, bn)
  w = data(x.shape, dtype, seed=3)
  y, m, v = jax.jit(bn)(x, s, b)
  dx, ds, db = jax.jit(lambda x: _grads(bn, x, s, b, w))(x)
  assert y.dtype == dtype and dx.dtype == dtype and m.dtype == jnp.float32
  (y64, m64, v64), g64 = _oracle_grads(bn_oracle, x, s, b, w)
  u = ref.ulp(dtype)
  ref.assert_within(y, y64, 2 * u * np.abs(y64) + 1e-5, "y")
  ref.assert_within(m, m64, 1e-6, "running mean")
  ref.assert_within(v, v64, 1e-6 * (1 + v64), "running var")
  ref.assert_within(dx, g64[0], 2 * u * np.abs(g64[0]) + 2e-4, "dx")
  ref.assert_within(ds, g64[1], 1e-4 * (1 + np.abs(g64[1])), "dscale")


def test_large_offset_is_accurate():
  # x = 1e4 + N(0, 1): the statistics sums are taken about a data value (the shift)
  x = data((64, 4, 4, 16), loc=1e4)
  s, b = _params(x, bn)
  y, m, v = jax.jit(bn)(x, s, b)
  (y64, m64, v64), _ = _oracle_grads(bn_oracle, x, s, b, x)
  assert np.max(np.abs(np.asarray(y, F64) - y64)) <= 1e-5  # y ~ N(0, 1)
  assert np.max(np.abs(np.asarray(v, F64) - v64) / v64) <= 1e-5
  (yg,) = jax.jit(gn)(x, s, b)
  ref.assert_within(yg, _oracle_grads(gn_oracle, x, s, b, x)[0][0], 1e-5, "group norm")


def test_degenerate_batch_nan_and_mask():
  s, b = _params(jnp.ones((1, 16)), bn)
  # one row: the running statistics are used (degenerate="running"), as on the XLA path
  x1 = data((1, 16))
  y, m, v = jax.jit(bn)(x1, s, b)
  with jn.no_kernels():
    y_x, m_x, v_x = jax.jit(lambda *a: bn(*a))(x1, s, b)
  np.testing.assert_allclose(y, y_x, atol=1e-6)
  np.testing.assert_array_equal(m, m_x)
  # a NaN in one feature: that feature keeps its running statistics, the others update
  xn = data((6, 16)).at[2, 3].set(jnp.nan)
  y, m, v = jax.jit(bn)(xn, s, b)
  with jn.no_kernels():
    y_x, m_x, v_x = jax.jit(lambda *a: bn(*a))(xn, s, b)
  np.testing.assert_array_equal(np.isnan(y), np.isnan(y_x))
  np.testing.assert_allclose(m, m_x, atol=1e-6)
  np.testing.assert_allclose(v, v_x, atol=1e-6)
  assert float(m[3]) == pytest.approx(0.1)
  # a mask: the XLA path (the kernel takes unmasked sums only)
  xm = data((6, 16))
  f = lambda x: jn.batch_norm(x, jn.init_batch_stats(16), training=True, where=x > -3)[0]
  assert calls(f, xm) == 0


def test_second_order_and_vmap():
  x = data((8, 4, 16))
  s, b = _params(x, bn)
  h = lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(bn(x, s, b)[0] ** 3))(x) * x)
  hvp = jax.grad(h)(x)
  with jn.no_kernels():
    hvp_x = jax.grad(lambda x: h(x))(x)
  np.testing.assert_allclose(hvp, hvp_x, atol=2e-4, rtol=1e-4)
  # vmap over a leading axis: one kernel call per sum, equal to the loop
  xs = data((3, 8, 4, 16), seed=5)
  g = jax.vmap(lambda x: _grads(bn, x, s, b, x))
  assert calls(g, xs) == 2
  gv = g(xs)
  for i in range(3):
    gi = _grads(bn, xs[i], s, b, xs[i])
    for a, c in zip(gv, gi):
      np.testing.assert_allclose(a[i], c, atol=2e-5, rtol=1e-5)


def test_axis_name_keeps_kernels_and_global_statistics(devices):
  # the kernel takes each device's sums; the psum stays in JAX between kernel calls
  x = data((8, 4, 8, 16), loc=0.5)
  s, b = _params(x, bn)

  def step(x):
    def loss(x, s, b):
      y, st = jn.batch_norm(x, jn.init_batch_stats(16), s, b, training=True, axis_name="d")
      return jnp.sum(y * x), st
    (_, st), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, s, b)
    return st.mean, st.var, g

  f = jax.vmap(step, axis_name="d")
  assert calls(f, x) == 2
  mean, var, (dx, ds, db) = f(x)
  flat = lambda x: jnp.sum(jn.batch_norm(x, jn.init_batch_stats(16), s, b,
                                         training=True)[0] * x)
  gx = jax.grad(flat)(x)
  (_, st1) = jn.batch_norm(x, jn.init_batch_stats(16), s, b, training=True)
  np.testing.assert_allclose(mean[0], st1.mean, atol=1e-6)
  np.testing.assert_allclose(var[0], st1.var, rtol=1e-5)
  np.testing.assert_allclose(dx, gx, atol=2e-5)


def test_sharded_jit_does_not_gather_x(devices):
  x = data((16, 4, 4, 32))
  loss = lambda x, s, b: jnp.sum(bn(x, s, b)[0] ** 2)
  assert_sharded_jit_does_not_gather(devices, loss, x, _params(x, bn), KERNEL)


def test_layouts_it_does_not_take():
  # reduced axes not contiguous, fewer than MIN_COLUMNS features, float64: XLA path
  assert _cols.layout((2, 3, 4, 5), (0, 2)) is None
  assert _cols.layout((2, 3, 4, 5), (1, 2)) == (2, 12, 5)
  x = data((8, 4))
  assert calls(lambda x: jn.batch_norm(x, jn.init_batch_stats(4), training=True)[0], x) == 0
  with jax.enable_x64(True):
    x64 = jnp.ones((8, 16), jnp.float64)
    assert calls(lambda x: jn.batch_norm(x, jn.init_batch_stats(16, dtype=jnp.float64),
                                         training=True)[0], x64) == 0
