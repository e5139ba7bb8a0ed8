"""The fused group/instance norm backward kernel (jaxnorm._cpu._groups), NHWC.

It gives ``dx`` and the per-sample, per-feature sums ``sum(g)`` and
``sum(g * (x - mean))`` reading each sample's ``x`` and ``g`` from memory once.
Compared with the float64 oracle (tests/reference.py) and with the XLA path
(kernels off): gradients over group sizes (1, 4, the last group axis reduced with
or without a scale), row counts across the kernel's 128-row blocks, features not a
multiple of 8, dtypes, a large offset, NaN input, the statistics' own cotangents,
no centring, second order, vmap, sharded jit (no all-gather of x), and what stays
on the XLA path.  Skipped when the kernels cannot be built here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
from jaxnorm import _cpu, _vjp
from jaxnorm._cpu import _groups

import reference as ref
from kernel_checks import assert_sharded_jit_does_not_gather

pytestmark = pytest.mark.skipif(not jn.kernels_available(),
                                reason=f"kernels not built: {_cpu.build_error()}")

F64 = np.float64
KERNEL = "jaxnorm_groups_bwd"


def calls(f, *args) -> int:
  # a fresh function: make_jaxpr caches traces by function, and the kernel switches
  # act at trace time
  return str(jax.make_jaxpr(lambda *a: f(*a))(*args)).count(KERNEL + "[")


def data(shape, dtype=np.float32, seed=0, loc=0.0, scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray((loc + scale * rng.normal(size=shape)).astype(dtype))


def gn(groups):
  return (lambda x, s, b: jn.group_norm(x, s, b, num_groups=groups),
          lambda x, s, b: ref.group_norm(x, s, b, num_groups=groups, xp=jnp).y)


def inorm():
  return (lambda x, s, b: jn.instance_norm(x, s, b),
          lambda x, s, b: ref.instance_norm(x, s, b, xp=jnp).y)


CASES = {  # name: (fn, oracle, shape)
    "gn_groups_of_4": (*gn(4), (4, 8, 4, 16)),
    "gn_groups_of_1": (*gn(16), (4, 5, 3, 16)),
    "gn_rows_across_blocks": (*gn(2), (5, 20, 15, 8)),  # 300 rows: 128-row blocks
    "in_features_not_multiple_of_8": (*inorm(), (4, 6, 6, 13)),
    "in_3d": (*inorm(), (6, 7, 9)),
}


def _grads(f, x, s, b, w, argnums=(0, 1, 2)):
  loss = lambda x, s, b: jnp.sum(f(x, s, b).astype(jnp.float32) * w)
  return jax.grad(loss, argnums=argnums)(x, s, b)


def _oracle_grads(o, x, s, b, w):
  with jax.enable_x64(True):
    args = [None if a is None else jnp.asarray(np.asarray(a, F64)) for a in (x, s, b)]
    w64 = jnp.asarray(np.asarray(w, F64))
    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    grads = jax.grad(lambda x, s, b: jnp.sum(o(x, s, b) * w64), argnums=argnums)(*args)
    return [np.asarray(g) for g in grads]


def _params(c):
  return data((c,), seed=1, loc=1.0, scale=0.2), data((c,), seed=2, scale=0.1)


@pytest.mark.parametrize("with_params", [True, False])
@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_matches_oracle_and_xla_path(name, with_params):
  f, o, shape = CASES[name]
  x = data(shape, loc=0.5, scale=2.0)
  s, b = _params(shape[-1]) if with_params else (None, None)
  w = data(shape, seed=3)
  argnums = (0, 1, 2) if with_params else (0,)
  g = lambda x, s, b: _grads(f, x, s, b, w, argnums)
  assert calls(g, x, s, b) == 1
  grads = jax.jit(g)(x, s, b)
  with jn.no_kernels():
    grads_x = jax.jit(lambda *a: g(*a))(x, s, b)
    assert calls(g, x, s, b) == 0
  grads64 = _oracle_grads(o, x, s, b, w)
  n = np.prod(shape[1:-1])  # summed per feature
  for what, v, vx, v64 in zip(("dx", "dscale", "dbias"), grads, grads_x, grads64):
    tol = 1e-5 * np.sqrt(n) * (1 + np.abs(v64))
    ref.assert_within(v, v64, tol, f"{name} {what}")
    ref.assert_within(v, vx, tol + np.abs(np.asarray(vx, F64) - v64), f"{name} {what} vs XLA")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
  f, o, shape = CASES["gn_groups_of_4"]
  x = data(shape, dtype, loc=0.5)
  s, b = _params(shape[-1])
  w = data(shape, dtype, seed=3)
  dx, ds, db = jax.jit(lambda x: _grads(f, x, s, b, w))(x)
  assert dx.dtype == dtype and ds.dtype == jnp.float32
  g64 = _oracle_grads(o, x, s, b, w)
  u = ref.ulp(dtype)
  ref.assert_within(dx, g64[0], 2 * u * np.abs(g64[0]) + 2e-4, "dx")
  ref.assert_within(ds, g64[1], 1e-4 * (1 + np.abs(g64[1])), "dscale")
  ref.assert_within(db, g64[2], 1e-4 * (1 + np.abs(g64[2])), "dbias")


def test_large_offset_is_accurate():
  # x = 1e4 + N(0, 1): the sums are taken about the group's mean
  f, o, shape = CASES["gn_groups_of_4"]
  x = data(shape, loc=1e4)
  s, b = _params(shape[-1])
  w = data(shape, seed=3)
  grads = jax.jit(lambda x: _grads(f, x, s, b, w))(x)
  for what, v, v64 in zip(("dx", "dscale", "dbias"), grads, _oracle_grads(o, x, s, b, w)):
    ref.assert_within(v, v64, 1e-4 * (1 + np.abs(v64)), what)


def test_nan_input_like_xla_path():
  f, _, shape = CASES["gn_groups_of_4"]
  x = data(shape).at[1, 2, 3, 5].set(jnp.nan)  # sample 1, group 1
  s, b = _params(shape[-1])
  dx = jax.jit(lambda x: _grads(f, x, s, b, x)[0])(x)
  with jn.no_kernels():
    dx_x = jax.jit(lambda x: _grads(f, x, s, b, x)[0])(x)
  np.testing.assert_array_equal(np.isnan(dx), np.isnan(dx_x))
  assert np.isnan(dx[1, :, :, 4:8]).all() and not np.isnan(dx[0]).any()


@pytest.mark.parametrize("center", [True, False])
def test_statistics_cotangents_and_centring(center):
  """The statistics' own cotangents (ct_d, ct_v: a loss using the mean and variance)
  and ``center=False``, through jaxnorm._vjp.standardize on (N, H, W, G, Cg)."""
  x = data((4, 6, 5, 3, 4), loc=0.5, scale=1.5)
  s, b = (p.reshape(1, 1, 1, 3, 4) for p in _params(12))
  w = data(x.shape, seed=3)

  def loss(x, s, b):
    y, st, _ = _vjp.standardize(x, (1, 2, 4), s, b, epsilon=1e-5, center=center)
    return jnp.sum(y * w) + jnp.sum(jnp.sin(st.offset)) + jnp.sum(jnp.sqrt(st.var + 1))

  g = jax.grad(loss, argnums=(0, 1, 2))
  assert calls(g, x, s, b) == 1
  grads = jax.jit(g)(x, s, b)
  with jn.no_kernels():
    grads_x = jax.jit(lambda *a: g(*a))(x, s, b)
  for what, v, vx in zip(("dx", "dscale", "dbias"), grads, grads_x):
    np.testing.assert_allclose(v, vx, atol=2e-5 * (1 + float(jnp.max(jnp.abs(vx)))),
                               err_msg=what)


def test_second_order_and_vmap():
  f, _, shape = CASES["gn_groups_of_4"]
  x = data(shape)
  s, b = _params(shape[-1])
  h = lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(f(x, s, b) ** 3))(x) * x)
  hvp = jax.grad(h)(x)
  with jn.no_kernels():
    hvp_x = jax.grad(lambda x: h(x))(x)
  np.testing.assert_allclose(hvp, hvp_x, atol=2e-4, rtol=1e-4)
  # vmap over a leading axis: one kernel call, equal to the loop
  xs = data((3,) + shape, seed=5)
  g = jax.vmap(lambda x: _grads(f, x, s, b, x))
  assert calls(g, xs) == 1
  gv = g(xs)
  for i in range(3):
    gi = _grads(f, xs[i], s, b, xs[i])
    for a, c in zip(gv, gi):
      np.testing.assert_allclose(a[i], c, atol=2e-5, rtol=1e-5)


def test_sharded_jit_does_not_gather_x(devices):
  f, _, _ = CASES["gn_groups_of_4"]
  loss = lambda x, s, b: jnp.sum(f(x, s, b) ** 2)
  assert_sharded_jit_does_not_gather(devices, loss, data((16, 4, 4, 16)), _params(16), KERNEL)


def test_what_stays_on_the_xla_path(monkeypatch):
  f, _, shape = CASES["gn_groups_of_4"]
  x = data(shape)
  s, b = _params(shape[-1])
  # layouts: batch norm (no sample axis), rows (no features after), NCHW
  assert _groups.layout((4, 5, 6, 8), (0, 1, 2)) is None
  assert _groups.layout((4, 5, 6, 8), (1, 2, 3)) is None
  assert _groups.layout((4, 2, 4, 6, 5), (2, 3, 4)) is None
  assert _groups.layout((4, 5, 6, 2, 4), (1, 2, 4)) == (1, 3, 4)
  assert _groups.layout((4, 5, 6, 8), (1, 2)) == (1, 3, 1)
  # fewer than MIN_SAMPLES samples, samples over max_sample_bytes(), a mask, per-sample
  # scales, axis_name
  assert calls(lambda x: _grads(f, x, s, b, x), x[:2]) == 0
  sample = math.prod(shape[1:]) * 2 * 4  # x and g, float32
  assert 0 < _groups.max_sample_bytes() and calls(lambda x: _grads(f, x, s, b, x), x) == 1
  monkeypatch.setattr(_groups, "max_sample_bytes", lambda: sample - 1)
  assert calls(lambda x: _grads(f, x, s, b, x), x) == 0
  monkeypatch.setattr(_groups, "max_sample_bytes", lambda: sample)
  assert calls(lambda x: _grads(f, x, s, b, x), x) == 1
  monkeypatch.undo()
  masked = lambda x, s, b: jn.group_norm(x, s, b, num_groups=4, where=x > -2)
  assert calls(lambda x: _grads(masked, x, s, b, x), x) == 0
  film = lambda x, s, b: jn.instance_norm(x) * s[:, None, None, :] + b[:, None, None, :]
  s4 = data((4, 16), seed=4)
  per_sample = lambda x, s: jax.grad(lambda x, s: jnp.sum(
      _vjp.standardize(x, (1, 2), s[:, None, None, :])[0] ** 2), argnums=(0, 1))(x, s)
  assert calls(per_sample, x, s4) == 0
  assert calls(lambda x: jax.grad(lambda x: jnp.sum(film(x, s4, s4) ** 2))(x), x) == 1
  named = jax.vmap(lambda x: jax.grad(lambda x: jnp.sum(jn.group_norm(
      x, num_groups=4, axis_name="d") ** 2))(x), axis_name="d")
  assert calls(named, jnp.stack([x, x])) == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_streaming_stores_change_no_bit(monkeypatch, dtype):
  """Non-temporal stores of dx (JAXNORM_STREAM_BYTES=0: always) write the same bits
  as plain stores, for features not a multiple of 8 (rows not 32-byte aligned)."""
  for shape, f in ((CASES["gn_groups_of_4"][2], CASES["gn_groups_of_4"][0]),
                   ((4, 5, 3, 13), CASES["in_features_not_multiple_of_8"][0])):
    x = data(shape, dtype, loc=0.5)
    s, b = _params(shape[-1])
    w = data(shape, seed=3)
    g = jax.jit(lambda x, s, b: _grads(f, x, s, b, w))
    out = {}
    for mode in ("0", "-1"):
      monkeypatch.setenv("JAXNORM_STREAM_BYTES", mode)
      out[mode] = jax.tree.map(np.asarray, g(x, s, b))
    jax.tree.map(np.testing.assert_array_equal, out["0"], out["-1"])
