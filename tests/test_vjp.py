"""The custom-VJP fast path (jaxnorm._vjp.standardize) equals the reference path.

The reference is ``standardize_reference``: plain autodiff through
``centered_moments`` and ``scale_shift``.  Compared: outputs, batch statistics,
first- and second-order gradients (also through the statistics, as a running
average update uses them), masks, the batch-norm fallback, FiLM-style parameters,
non-contiguous (group norm) axes, ``axis_name`` under ``vmap`` with unequal
masked counts, low precision, and the large-offset accuracy case.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnorm as jn
from jaxnorm import _vjp

# name: (x shape, reduced axes, scale shape, bias shape, center, mask shape or None)
CASES = {
    "layer": ((6, 5, 8), (2,), (1, 1, 8), (1, 1, 8), True, None),
    "layer_two_axes": ((4, 6, 8), (1, 2), (1, 6, 8), (1, 6, 8), True, None),
    "layer_no_affine": ((6, 5, 8), (2,), None, None, True, None),
    "layer_film": ((6, 5, 8), (2,), (6, 1, 8), (6, 5, 1), True, None),
    "layer_masked": ((6, 5, 8), (2,), (1, 1, 8), (1, 1, 8), True, (6, 5, 8)),
    "rms": ((6, 5, 8), (2,), (1, 1, 8), None, False, None),
    "rms_masked": ((6, 5, 8), (2,), (1, 1, 8), None, False, (6, 5, 8)),
    "batch": ((6, 5, 8), (0, 1), (1, 1, 8), (1, 1, 8), True, None),
    "batch_nchw": ((6, 8, 5), (0, 2), (1, 8, 1), (1, 8, 1), True, None),
    "batch_masked": ((6, 5, 8), (0, 1), (1, 1, 8), (1, 1, 8), True, (6, 5, 1)),
    "batch_scale_only": ((6, 5, 8), (0, 1), (1, 1, 8), None, True, None),
    "instance": ((4, 5, 5, 3), (1, 2), (1, 1, 1, 3), (1, 1, 1, 3), True, None),
    "group": ((4, 3, 3, 4, 2), (1, 2, 4), (1, 1, 1, 4, 2), (1, 1, 1, 4, 2), True, None),
    "group_masked": ((4, 3, 3, 4, 2), (1, 2, 4), (1, 1, 1, 4, 2), (1, 1, 1, 4, 2), True,
                     (4, 3, 3, 1, 1)),
    "group_rms": ((4, 3, 3, 4, 2), (1, 2, 4), (1, 1, 1, 4, 2), None, False, None),
}


def _inputs(name, dtype=np.float64, seed=0):
  shape, axes, s_shape, b_shape, center, m_shape = CASES[name]
  rng = np.random.default_rng(seed)
  x = jnp.asarray((rng.standard_normal(shape) * 1.5 + 0.7).astype(dtype))
  s = None if s_shape is None else jnp.asarray((1 + 0.3 * rng.standard_normal(s_shape)))
  b = None if b_shape is None else jnp.asarray(0.3 * rng.standard_normal(b_shape))
  where = None
  if m_shape is not None:
    m = rng.uniform(size=m_shape) > 0.4
    m.reshape(m.shape[0], -1)[:, :2] = True  # >= 2 included elements: smooth statistics
    m[0] = True
    where = jnp.asarray(m)
  c = jnp.asarray(rng.standard_normal(shape))
  return x, s, b, where, c, dict(axes=axes, center=center)


def _loss(fn, axes, where, c, **kw):
  """A smooth scalar of the output and of the batch statistics."""
  def loss(x, s, b):
    y, batch, _ = fn(x, axes, s, b, where=where, **kw)
    mean = batch.shift + batch.offset
    return (jnp.sum(jnp.sin(y) * c.astype(y.dtype)) + jnp.sum(jnp.cos(mean))
            + jnp.sum(jnp.sqrt(batch.var + 1)))
  return loss


def _argnums(s, b):
  return (0,) + ((1,) if s is not None else ()) + ((2,) if b is not None else ())


def _close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                             rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_and_statistics_equal_reference(name):
  with jax.enable_x64(True):
    x, s, b, where, _, kw = _inputs(name)
    y, batch, usable = _vjp.standardize(x, kw["axes"], s, b, where=where, center=kw["center"])
    y_r, batch_r, usable_r = _vjp.standardize_reference(x, kw["axes"], s, b, where=where,
                                                        center=kw["center"])
    assert y.dtype == y_r.dtype and y.shape == y_r.shape
    assert usable is None and usable_r is None
    _close(y, y_r, 1e-12)
    _close(batch.shift + batch.offset, batch_r.shift + batch_r.offset, 1e-12)
    _close(batch.var, batch_r.var, 1e-12)
    _close(batch.count, batch_r.count, 0)


def _losses(name):
  x, s, b, where, c, kw = _inputs(name)
  fast = _loss(_vjp.standardize, kw["axes"], where, c, center=kw["center"])
  ref = _loss(_vjp.standardize_reference, kw["axes"], where, c, center=kw["center"])
  return fast, ref, (x, s, b), _argnums(s, b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_equal_reference(name):
  with jax.enable_x64(True):
    fast, ref, args, argnums = _losses(name)
    grad = lambda f: jax.jit(jax.grad(f, argnums))(*args)
    for g, g_r in zip(grad(fast), grad(ref)):
      _close(g, g_r, 1e-10)


SECOND_ORDER = ["layer", "layer_film", "rms_masked", "batch_masked", "batch_nchw",
                "group_masked", "group_rms"]


@pytest.mark.parametrize("name", SECOND_ORDER)
def test_second_order_gradients_equal_reference(name):
  with jax.enable_x64(True):
    fast, ref, (x, s, b), argnums = _losses(name)

    def second(loss):  # reverse over reverse: d/dv |d loss/dv|^2
      def sq(x, s, b):
        return sum(jnp.sum(g * g) for g in jax.grad(loss, argnums)(x, s, b))
      return jax.jit(jax.grad(sq, argnums))(x, s, b)
    for h, h_r in zip(second(fast), second(ref)):
      _close(h, h_r, 1e-8)


@pytest.mark.parametrize("name", ["layer_film", "rms", "batch_masked", "group_masked"])
def test_check_grads_second_order(name):
  with jax.enable_x64(True):
    x, s, b, where, c, kw = _inputs(name)
    fast = _loss(_vjp.standardize, kw["axes"], where, c, center=kw["center"])
    args = tuple(a for a in (x, s, b) if a is not None)
    present = _argnums(s, b)

    def f(*args):
      full = [None, None, None]
      for i, a in zip(present, args):
        full[i] = a
      return fast(*full)
    check_grads(jax.jit(f), args, order=2, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_hessian_equals_reference():
  with jax.enable_x64(True):
    x, s, b, where, c, kw = _inputs("layer")
    x = x[:2, :2]
    c = c[:2, :2]
    h = jax.hessian(lambda x: _loss(_vjp.standardize, (2,), None, c)(x, s, b))(x)
    h_r = jax.hessian(lambda x: _loss(_vjp.standardize_reference, (2,), None, c)(x, s, b))(x)
    _close(h, h_r, 1e-9)


# ------------------------------------------------------------------ batch norm's fallback


def _fallback_inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((6, 5, 8)) + 2
  m = np.ones((6, 5, 8), bool)
  m[:, :, 1] = False          # no element: count 0
  m[:, :, 2] = False
  m[0, 0, 2] = True           # one element: count 1
  x[3, 2, 5] = np.inf         # non-finite statistics
  run = (jnp.asarray(0.3 * rng.standard_normal((1, 1, 8))),
         jnp.asarray(1 + rng.uniform(size=(1, 1, 8))))
  s = jnp.asarray(1 + 0.3 * rng.standard_normal((1, 1, 8)))
  b = jnp.asarray(0.3 * rng.standard_normal((1, 1, 8)))
  return jnp.asarray(x), jnp.asarray(m), s, b, run, jnp.asarray(rng.standard_normal(x.shape))


def test_fallback_equals_reference_outputs_and_gradients():
  with jax.enable_x64(True):
    x, m, s, b, run, c = _fallback_inputs()
    out = _vjp.standardize(x, (0, 1), s, b, where=m, fallback=run)
    ref = _vjp.standardize_reference(x, (0, 1), s, b, where=m, fallback=run)
    np.testing.assert_array_equal(out[2], ref[2])
    assert not bool(out[2][0, 0, 1]) and not bool(out[2][0, 0, 2]) and not bool(out[2][0, 0, 5])
    _close(out[0], ref[0], 1e-12)

    def loss(fn):
      def f(x, s, b, rm, rv):
        y, batch, usable = fn(x, (0, 1), s, b, where=m, fallback=(rm, rv))
        y = jnp.where(jnp.isfinite(y), y, 0)
        mean = jnp.where(usable, batch.shift + batch.offset, 0)
        return jnp.sum(jnp.sin(y) * c) + jnp.sum(jnp.cos(mean))
      return f
    args = (x, s, b) + run
    g = jax.jit(jax.grad(loss(_vjp.standardize), argnums=(0, 1, 2, 3, 4)))(*args)
    g_r = jax.jit(jax.grad(loss(_vjp.standardize_reference), argnums=(0, 1, 2, 3, 4)))(*args)
    for a, r in zip(g, g_r):
      _close(a, r, 1e-10)
    # Features that fell back get no gradient through the batch statistics.
    assert np.all(np.isfinite(np.asarray(g[0])[:, :, [0, 1, 2, 3, 4, 6, 7]]))


# ------------------------------------------------------------------ across devices


def test_axis_name_under_vmap_equals_global_batch():
  """Batch norm split over 4 "devices" with unequal masked counts (one device has
  none) equals the unsplit batch: outputs and gradients, including the cotangents
  of the (global) statistics."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    d = 4
    x = jnp.asarray(rng.standard_normal((d, 3, 5, 8)) * 2 + 3)
    m = rng.uniform(size=(d, 3, 5, 1)) > 0.4
    m[1:, 0] = True
    m[0] = False
    m = jnp.asarray(m)
    s = jnp.asarray(1 + 0.3 * rng.standard_normal((1, 1, 8)))
    b = jnp.asarray(0.3 * rng.standard_normal((1, 1, 8)))
    c = jnp.asarray(rng.standard_normal(x.shape))

    def local(fn):
      def f(x, m, c, s, b):
        y, batch, _ = fn(x, (0, 1), s, b, where=m, axis_name="dev")
        return (jnp.sum(jnp.sin(y) * c) + jnp.sum(jnp.cos(batch.shift + batch.offset))
                + jnp.sum(jnp.sqrt(batch.var + 1)))
      return f

    def split(fn):
      y = jax.vmap(lambda x, m: fn(x, (0, 1), s, b, where=m, axis_name="dev")[0],
                   axis_name="dev")(x, m)
      g = jax.vmap(jax.grad(local(fn), argnums=(0, 3, 4)), in_axes=(0, 0, 0, None, None),
                   axis_name="dev")(x, m, c, s, b)
      return y, g[0], g[1].sum(0), g[2].sum(0)

    def whole(fn):
      xg, mg, cg = x.reshape(d * 3, 5, 8), m.reshape(d * 3, 5, 1), c.reshape(d * 3, 5, 8)

      def f(xg, s, b):  # every device's loss holds the statistics' terms once
        y, batch, _ = fn(xg, (0, 1), s, b, where=mg)
        return (jnp.sum(jnp.sin(y) * cg) + d * jnp.sum(jnp.cos(batch.shift + batch.offset))
                + d * jnp.sum(jnp.sqrt(batch.var + 1)))
      y = fn(xg, (0, 1), s, b, where=mg)[0]
      gx, gs, gb = jax.grad(f, argnums=(0, 1, 2))(xg, s, b)
      return y.reshape(x.shape), gx.reshape(x.shape), gs, gb

    for a, r in zip(split(_vjp.standardize), whole(_vjp.standardize_reference)):
      _close(a, r, 1e-10)
    for a, r in zip(split(_vjp.standardize), split(_vjp.standardize_reference)):
      _close(a, r, 1e-10)


def test_axis_name_group_norm_split_axes_under_vmap():
  """Non-contiguous axes (two-stage statistics) with a sequence split over devices."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 2, 4, 3, 4, 2)) + 5)  # (dev, N, H, W, G, C/G)
    s = jnp.asarray(1 + 0.3 * rng.standard_normal((1, 1, 1, 4, 2)))
    b = jnp.asarray(0.3 * rng.standard_normal((1, 1, 1, 4, 2)))
    c = jnp.asarray(rng.standard_normal(x.shape))

    def f(fn):
      def loss(x, c, s, b):
        y, _, _ = fn(x, (1, 2, 4), s, b, axis_name="dev")
        return jnp.sum(jnp.sin(y) * c)
      return jax.vmap(jax.grad(loss, argnums=(0, 2)), in_axes=(0, 0, None, None),
                      axis_name="dev")(x, c, s, b)
    for a, r in zip(f(_vjp.standardize), f(_vjp.standardize_reference)):
      _close(a, r, 1e-10)


# ------------------------------------------------------------------ dtypes and accuracy


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("name", ["layer", "batch", "group", "rms"])
def test_low_precision_matches_reference_and_keeps_dtypes(name, dtype, tol):
  x, s, b, where, c, kw = _inputs(name, dtype=np.float32)
  x = x.astype(dtype)
  s = None if s is None else s.astype(jnp.float32)
  b = None if b is None else b.astype(jnp.float32)
  argnums = _argnums(s, b)
  y = _vjp.standardize(x, kw["axes"], s, b, center=kw["center"])[0]
  y_r = _vjp.standardize_reference(x, kw["axes"], s, b, center=kw["center"])[0]
  assert y.dtype == jnp.dtype(dtype)
  _close(y, y_r, tol)
  g = jax.grad(_loss(_vjp.standardize, kw["axes"], None, c, center=kw["center"]),
               argnums)(x, s, b)
  g_r = jax.grad(_loss(_vjp.standardize_reference, kw["axes"], None, c, center=kw["center"]),
                 argnums)(x, s, b)
  assert [a.dtype for a in g] == [a.dtype for a in g_r]
  assert g[0].dtype == jnp.dtype(dtype)
  scale = max(float(jnp.max(jnp.abs(a.astype(jnp.float32)))) for a in g_r)
  for a, r in zip(g, g_r):
    _close(np.asarray(a, np.float64) / scale, np.asarray(r, np.float64) / scale, tol)


@pytest.mark.parametrize("name,axes", [("layer", (1,)), ("batch", (0,)), ("group", (1, 3))])
def test_large_offset_accuracy_float32(name, axes):
  """x = 1e4 + N(0, 1) in float32: output and gradient within 1e-4 of float64."""
  rng = np.random.default_rng(0)
  shape = (256, 8, 32) if name == "group" else (512, 256)
  x32 = (1e4 + rng.standard_normal(shape)).astype(np.float32)
  c = rng.standard_normal(shape)
  if name == "group":
    x32 = x32.reshape(256, 8, 8, 4)
    c = c.reshape(x32.shape)
  fshape = tuple(1 if a in axes else d for a, d in enumerate(x32.shape))
  if name == "layer":
    fshape = (1,) + x32.shape[1:]
  if name == "group":
    fshape = (1, 1) + x32.shape[2:]
  s = 1 + 0.1 * rng.standard_normal(fshape)
  b = 0.1 * rng.standard_normal(fshape)

  def loss(x, s, b):
    y = _vjp.standardize(x, axes, s, b)[0]
    return jnp.sum(y * c.astype(y.dtype)), y

  (_, y), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      jnp.asarray(x32), jnp.asarray(s, jnp.float32), jnp.asarray(b, jnp.float32))
  with jax.enable_x64(True):
    def loss64(x, s, b):
      y = _vjp.standardize_reference(x, axes, s, b)[0]
      return jnp.sum(y * c), y
    (_, y64), g64 = jax.value_and_grad(loss64, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(x32, jnp.float64), jnp.asarray(s), jnp.asarray(b))
    y64, g64 = np.asarray(y64), [np.asarray(a) for a in g64]
  assert float(np.max(np.abs(np.asarray(y, np.float64) - y64))) <= 1e-4
  dx, dx64 = np.asarray(g[0], np.float64), g64[0]
  assert float(np.max(np.abs(dx - dx64))) <= 1e-4 * max(1.0, float(np.max(np.abs(dx64))))
  for a, r in zip(g[1:], g64[1:]):  # sums over many elements: relative to their size
    a = np.asarray(a, np.float64)
    assert float(np.max(np.abs(a - r))) <= 1e-4 * float(np.max(np.abs(r)))


def test_disabled_uses_reference(monkeypatch):
  x, s, b, _, _, kw = _inputs("layer", dtype=np.float32)
  monkeypatch.setattr(_vjp, "ENABLED", False)
  y = _vjp.standardize(x, kw["axes"], s, b)[0]
  np.testing.assert_array_equal(y, _vjp.standardize_reference(x, kw["axes"], s, b)[0])
  # The reference path supports forward mode; the custom VJP does not.
  jax.jvp(lambda x: _vjp.standardize(x, kw["axes"], s, b)[0], (x,), (x,))


def test_under_jit_matches_eager():
  x, s, b, where, _, kw = _inputs("group_masked", dtype=np.float32)
  f = lambda x: _vjp.standardize(x, kw["axes"], s, b, where=where)[0]
  _close(jax.jit(f)(x), f(x), 1e-6)


def test_shard_map_replicated_parameters_get_summed_gradients():
  """Under shard_map, scale/bias/epsilon are replicated: their cotangents are the
  sums over devices (the type system checks it), equal to the reference's."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  if len(jax.devices()) < 4:
    pytest.fail("needs 4 devices (tests/conftest.py sets jax_num_cpu_devices=8)")
  mesh = jax.make_mesh((4,), ("batch",))
  rng = np.random.default_rng(3)
  put = lambda a, spec: jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec))
  x = put(rng.standard_normal((16, 6)).astype(np.float32) + 3, P("batch"))
  m = rng.uniform(size=(16, 1)) > 0.3
  m[4:8] = False
  m = put(m, P("batch"))
  c = put(rng.standard_normal((16, 6)).astype(np.float32), P("batch"))
  s = put((1 + 0.2 * rng.standard_normal((1, 6))).astype(np.float32), P())
  b = put((0.2 * rng.standard_normal((1, 6))).astype(np.float32), P())

  def grads(fn):
    def local(x, m, c, s, b, eps):
      y, batch, _ = fn(x, (0,), s, b, where=m, epsilon=eps, axis_name="batch")
      return jnp.sum(y * c, keepdims=True)[0], batch.var  # (1,) per device; var global

    def loss(x, m, c, s, b, eps):
      per_device, var = jax.shard_map(local, mesh=mesh,
                                      in_specs=(P("batch"),) * 3 + (P(), P(), P()),
                                      out_specs=(P("batch"), P()))(x, m, c, s, b, eps)
      return jnp.sum(per_device) + jnp.sum(jnp.sqrt(var + 1))
    return jax.jit(jax.grad(loss, argnums=(0, 3, 4, 5)))(x, m, c, s, b, jnp.float32(1e-5))

  for a, r in zip(grads(_vjp.standardize), grads(_vjp.standardize_reference)):
    _close(a, r, 2e-5)


def test_plain_autodiff_gives_forward_mode():
  """The custom VJP has no forward mode; ``jaxnorm.plain_autodiff()`` traces the
  reference path, whose jvp equals the custom path's reverse-mode Jacobian."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), jnp.float32)
  t = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5)), jnp.float32)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(jn.layer_norm, (x,), (t,))
  with jn.plain_autodiff():
    assert not _vjp.ENABLED
    _, jvp = jax.jvp(jn.layer_norm, (x,), (t,))
  assert _vjp.ENABLED  # restored
  jac = jax.jacrev(jn.layer_norm)(x)  # (3, 5, 3, 5), through the custom VJP
  _close(jvp, jnp.einsum("ijkl,kl->ij", jac, t), 1e-5)


MEMORY_CASES = {  # (x shape, normalizer); XLA:CPU sizes its fusions by shape, so full size
    "layer_norm": ((4096, 1024), lambda x, s, b: jn.layer_norm(x, s, b)),
    "rms_norm": ((4096, 1024), lambda x, s, b: jn.rms_norm(x, s)),
    "batch_norm": ((64, 16, 16, 128), lambda x, s, b: jn.batch_norm(
        x, jn.init_batch_stats(128), s, b, training=True)[0]),
    "group_norm": ((64, 16, 16, 128), lambda x, s, b: jn.group_norm(x, s, b, num_groups=32)),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(MEMORY_CASES))
def test_forward_backward_has_no_full_size_temporary(name, dtype):
  """Compiled (never run) ``jax.grad`` of ``sum(y * g)`` w.r.t. x, scale and bias, as
  the benchmarks time it: XLA's temporaries stay far below one input-sized array.  Plain autodiff of the same statistics
  (``plain_autodiff``) needs 2-8 input-sized temporaries here on XLA:CPU: saved
  normalized copies and float32 copies of bf16 inputs."""
  shape, fn = MEMORY_CASES[name]
  c = shape[-1]
  spec = jax.ShapeDtypeStruct
  args = (spec(shape, dtype), spec((c,), jnp.float32), spec((c,), jnp.float32), spec(shape, dtype))

  def loss(x, s, b, g):
    return jnp.sum(fn(x, s, b).astype(jnp.float32) * g.astype(jnp.float32))

  compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  x_bytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
  assert temp < x_bytes / 8, f"{temp / 2**20:.1f} MiB of temporaries for a {x_bytes / 2**20:.0f} MiB x"


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_statistics_materialised_before_affine_only_when_minor(monkeypatch, layout):
  """On the CPU, statistics that vary along x's last axis (batch norm NHWC) go through
  an optimization barrier before the affine pass (XLA:CPU would recompute them per
  element); NCHW's are constant along it.  The barrier changes no bit."""
  if jax.default_backend() != "cpu":
    pytest.skip("CPU-only rule")
  nhwc = layout == "nhwc"
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5, 8) if nhwc else (6, 8, 5)),
                  jnp.float32) + 3
  feat = -1 if nhwc else 1
  stats = jn.init_batch_stats((8,))

  def run():
    def f(x):
      y, new = jn.batch_norm(x, stats, training=True, feature_axes=feat)
      return jnp.sum(jnp.sin(y)), (y, new.mean, new.var)
    return jax.tree.map(np.asarray, jax.jit(jax.value_and_grad(f, has_aux=True))(x))

  rule, seen = _vjp._materialise_statistics, []
  monkeypatch.setattr(_vjp, "_materialise_statistics",
                      lambda x, s: seen.append(rule(x, s)) or seen[-1])
  with_rule = run()
  assert seen and all(v == nhwc for v in seen)
  monkeypatch.setattr(_vjp, "_materialise_statistics", lambda x, s: False)
  jax.tree.map(np.testing.assert_array_equal, with_rule, run())
