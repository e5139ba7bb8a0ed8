"""Property tests: jaxnorm agrees with the float64 oracle in ``reference.py``.

Random shapes (rank 2-4), layouts (channels-last, NCHW, several feature axes),
masks (elementwise, per-sample, lower-rank, feature-level, ones that empty whole
rows or features), dtypes (bf16, f16, f32, f64 under x64) and options.  For each
example: outputs, running averages and gradients (w.r.t. x, scale, bias, against
``jax.grad`` of the float64 jnp reference) within tolerances derived from an error
model (see ``Tol``), not from a fudge factor per test.

Each example compiles two small programs (jaxnorm's value-and-grad and the float64
reference's), so ``max_examples`` is kept modest, and the tests are parametrized by dtype
so that every dtype gets its share; ``derandomize=True`` makes the suite reproducible.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import jaxnorm as jn
import reference as R

# No shrinking: each example compiles, so shrinking a failure would take minutes; the
# failing example is printed in full (and reproducible: derandomize) instead.
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = ["bfloat16", "float16", "float32", "float64"]
K = 64  # rounding errors per operation chain; a wrong formula misses by orders more


def x64_if(dtype):
  return jax.enable_x64(True) if np.dtype(dtype) == np.float64 else contextlib.nullcontext()


def rounded(a, dtype):
  """``a`` rounded to ``dtype`` and back to float64: what jaxnorm actually receives."""
  return np.asarray(jnp.asarray(a, dtype), np.float64)


# ----------------------------------------------------------------------------- data


def make_mask(kind, shape, rng, feature_axes=()):
  nd = len(shape)
  if kind is None:
    return None
  if kind == "elem":  # sparse enough that some groups have 0 or 1 element
    return rng.random(shape) < rng.choice([0.25, 0.8])
  if kind == "sample":  # per-sample (N, 1, ..., 1), some samples out
    m = rng.random((shape[0],) + (1,) * (nd - 1)) < 0.6
    return m
  if kind == "lowrank":  # rank < x.ndim: broadcasts from the trailing axes
    return rng.random(shape[1:]) < 0.7
  if kind == "feature":  # constant along the non-feature axes: whole features out
    fshape = tuple(d if i in feature_axes else 1 for i, d in enumerate(shape))
    return rng.random(fshape) < 0.6
  if kind == "rows":  # elementwise, with whole leading-axis rows emptied
    m = rng.random(shape) < 0.7
    m[rng.random(shape[0]) < 0.5] = False
    return m
  raise ValueError(kind)


def make_x(rng, shape, dtype, offset, spread):
  x = offset + spread * rng.standard_normal(shape)
  return jnp.asarray(x, dtype)


def make_param(rng, kind, shape, feature_axes, dtype, *, positive=False):
  """None, a feature-shaped parameter, or a per-sample (FiLM) one of x's rank."""
  if kind is None:
    return None
  if kind == "feature":
    pshape = tuple(shape[a] for a in feature_axes)
  else:  # film: batch axis and feature axes
    pshape = tuple(d if (i == 0 or i in feature_axes) else 1 for i, d in enumerate(shape))
  p = rng.uniform(0.5, 2.0, pshape) if positive else rng.standard_normal(pshape)
  return jnp.asarray(p, dtype)


def f64(a):
  return None if a is None else np.asarray(a, np.float64)


# ----------------------------------------------------------------------------- error model


class Tol:
  """Per-element tolerances for ``y = z * scale + bias``, ``z = (x - mean) / sqrt(var + eps)``.

  jaxnorm computes in at least float32 (``uc``) and rounds to the output dtype
  (``uo``).  A shifted one-pass variance errs by ``~uc (var + d^2)`` where ``d`` is
  the distance of the shift (an included element) to the mean: at most the largest
  deviation, ``zmax`` standard deviations.  Masks do not loosen anything.
  """

  def __init__(self, ref, x_dtype, scale, bias, epsilon, out_dtype=None):
    self.uc = R.compute_ulp(x_dtype)
    self.uo = R.ulp(out_dtype or x_dtype)
    var = np.asarray(ref.var)
    self.s = np.sqrt(var + epsilon)
    self.scale = 1.0 if scale is None else np.abs(scale)
    self.bias = 0.0 if bias is None else np.abs(bias)
    z = np.abs(ref.y_z)
    self.z = z
    self.zmax = float(np.nanmax(z)) if z.size else 0.0
    self.c = 1.0 + self.zmax ** 2

  def y(self, y_ref):
    return (K * self.uc * self.c * ((1 + self.z) * self.scale + self.bias)
            + self.uo * np.abs(y_ref))

  def dx(self, dx_ref, gmax, x_dtype):
    a = self.scale / self.s
    # float32 (or wider) arithmetic, then a single rounding to x's dtype
    return (K * self.uc * self.c * a * gmax * (1 + self.zmax) ** 2
            + R.ulp(x_dtype) * np.abs(dx_ref))

  def dparam(self, d_ref, n, gmax, p_dtype, with_z=True):
    cmax = float(np.max(self.c))
    zf = (1 + self.zmax) if with_z else 1.0
    return K * self.uc * cmax * n * gmax * zf + R.ulp(p_dtype) * np.abs(d_ref)


class RefOut:
  """A reference ``Out``/``BNOut`` plus the standardized values ``z``."""

  def __init__(self, out, x64, epsilon, center=True):
    self.out = out
    self.y = np.asarray(out.y)
    self.mean, self.var = np.asarray(out.mean), np.asarray(out.var)
    xm = x64 - self.mean if center else x64
    self.y_z = xm / np.sqrt(self.var + epsilon)


# ----------------------------------------------------------------------------- the check


def check_against_reference(fn, ref_fn, x, scale, bias, *, rng, epsilon, aux_check=None,
                            center=True, param_sum_n=None):
  """Runs jaxnorm's ``fn(x, scale, bias) -> (y, aux)`` and its value-and-grad; compares
  with ``ref_fn(xp, x, scale, bias) -> reference output`` (NumPy) and its jnp grad."""
  dtype = x.dtype
  g = jnp.asarray(rng.standard_normal(x.shape), dtype)  # cotangent, representable in dtype
  gmax = float(np.max(np.abs(np.asarray(g, np.float64))))

  def loss(x, scale, bias):
    y, aux = fn(x, scale, bias)
    return jnp.sum(y.astype(jnp.float32 if dtype != jnp.float64 else dtype) * g), (y, aux)

  (_, (y, aux)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      x, scale, bias)
  assert y.dtype == dtype, (y.dtype, dtype)
  assert grads[0].dtype == dtype
  for p, gp in zip((scale, bias), grads[1:]):
    if p is not None:
      assert gp.dtype == p.dtype

  x64, s64, b64, g64 = f64(x), f64(scale), f64(bias), f64(g)
  out = ref_fn(np, x64, s64, b64)
  ref = RefOut(out, x64, epsilon, center)
  s_b = None if scale is None else R.per_feature(s64, x.shape, ref_fn.feature_axes)
  b_b = None if bias is None else R.per_feature(b64, x.shape, ref_fn.feature_axes)
  tol = Tol(ref, dtype, s_b, b_b, epsilon)
  R.assert_within(y, ref.y, tol.y(ref.y), "y")
  if aux_check is not None:
    aux_check(aux, out, tol)

  with jax.enable_x64(True):
    def ref_loss(x, scale, bias):
      return jnp.sum(ref_fn(jnp, x, scale, bias).y * g64)
    args = tuple(None if a is None else jnp.asarray(a) for a in (x64, s64, b64))
    rgrads = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(*args)
    rgrads = [None if r is None else np.asarray(r) for r in rgrads]

  R.assert_within(grads[0], rgrads[0], tol.dx(rgrads[0], gmax, dtype), "d/dx")
  for name, p, gp, rp, with_z in (("d/dscale", scale, grads[1], rgrads[1], True),
                                  ("d/dbias", bias, grads[2], rgrads[2], False)):
    if p is not None:
      n = x.size / p.size
      R.assert_within(gp, rp, tol.dparam(rp, n, gmax, p.dtype, with_z), name)


# ----------------------------------------------------------------------------- strategies


def ranked_shapes(lo, hi):
  """(N, d1, ...) with rank in [lo, hi], N in 1..5 and the other dims in 1..4."""
  return st.integers(lo, hi).flatmap(
      lambda r: st.tuples(st.integers(1, 5), *[st.integers(1, 4)] * (r - 1)))


shapes = ranked_shapes(2, 4)
common = dict(
    seed=st.integers(0, 2**31 - 1),
    offset=st.sampled_from([0.0, 2.5]),
    spread=st.sampled_from([1.0, 0.05]),
    param_dtype=st.sampled_from(["float32", "x"]),
)


def _pdtype(param_dtype, dtype):
  return dtype if param_dtype == "x" else "float32"


# ----------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=10, **SETTINGS)
@given(shape=shapes, layout=st.sampled_from(["last", "nchw", "multi"]),
       mask=st.sampled_from(["elem", "sample", "rows", "feature", "lowrank", None]),
       params=st.sampled_from(["feature", None, "film"]),
       training=st.sampled_from([True, True, True, False]),
       degenerate=st.sampled_from(["running", "batch"]),
       unbiased=st.booleans(), momentum=st.floats(0.0, 1.0),
       epsilon=st.sampled_from([1e-5, 1e-3]), **common)
def test_batch_norm(shape, layout, mask, params, training, degenerate, unbiased, momentum,
                    epsilon, dtype, seed, offset, spread, param_dtype):
  r = len(shape)
  feat = {"last": (r - 1,), "nchw": (1,), "multi": (1, r - 1) if r >= 3 else (r - 1,)}[layout]
  event(f"mask={mask}")
  event(f"training={training}")
  rng = np.random.default_rng(seed)
  fshape = tuple(shape[a] for a in feat)
  with x64_if(dtype):
    x = make_x(rng, shape, dtype, offset, spread)
    where = make_mask(mask, shape, rng, feat)
    pd = _pdtype(param_dtype, dtype)
    scale = make_param(rng, params, shape, feat, pd, positive=True)
    bias = make_param(rng, params, shape, feat, pd)
    stats = jn.BatchStats(jnp.asarray(rng.standard_normal(fshape), jnp.float32),
                          jnp.asarray(rng.uniform(0.5, 2.0, fshape), jnp.float32))
    kw = dict(training=training, feature_axes=feat if layout != "last" else -1,
              momentum=momentum, epsilon=epsilon, degenerate=degenerate,
              unbiased_var=unbiased)

    def fn(x, scale, bias):
      return jn.batch_norm(x, stats, scale, bias, where=where, **kw)

    def ref_fn(xp, x, scale, bias):
      return R.batch_norm(x, f64(stats.mean), f64(stats.var), scale, bias, where=where,
                          xp=xp, **kw)
    ref_fn.feature_axes = feat

    def aux_check(new, out, tol):
      assert type(new) is jn.BatchStats
      for v, old in zip(new, stats):
        assert v.dtype == jnp.float32 and v.shape == fshape
      if not training:  # evaluation returns the running averages unchanged
        for v, old in zip(new, stats):
          np.testing.assert_array_equal(np.asarray(v), np.asarray(old))
        return
      us = max(tol.uc, R.ulp(np.float32))
      f = lambda a: np.asarray(a).reshape(fshape)
      c = f(np.max(np.broadcast_to(np.asarray(tol.c), shape),
                   axis=tuple(a for a in range(r) if a not in feat), keepdims=True))
      bm, bv = f(np.asarray(out.mean)), f(np.asarray(out.var))
      scale_n = np.where(f(out.count) > 1, f(out.count) / np.maximum(f(out.count) - 1, 1), 1)
      tol_m = K * us * (np.abs(f64(stats.mean)) + np.abs(bm) + np.sqrt(c * (bv + epsilon)))
      tol_v = K * us * (np.abs(f64(stats.var)) + c * (bv + epsilon) * scale_n)
      R.assert_within(new.mean, out.new_mean, tol_m, "running mean")
      R.assert_within(new.var, out.new_var, tol_v, "running var")
      unchanged = ~np.asarray(out.usable) if degenerate == "running" else np.zeros(fshape, bool)
      event(f"degenerate features: {bool(unchanged.any())}")
      if unchanged.any():  # degenerate features keep their running averages bit for bit
        np.testing.assert_array_equal(np.asarray(new.mean)[unchanged],
                                      np.asarray(stats.mean)[unchanged])
        np.testing.assert_array_equal(np.asarray(new.var)[unchanged],
                                      np.asarray(stats.var)[unchanged])

    check_against_reference(fn, ref_fn, x, scale, bias, rng=rng, epsilon=epsilon,
                            aux_check=aux_check)


# ----------------------------------------------------------------------------- feature-wise norms


def _axes_subset(draw, r, allow_zero=True):
  pool = list(range(0 if allow_zero else 1, r))
  sub = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=len(pool), unique=True))
  return tuple(sorted(sub))


@st.composite
def feature_norm_axes(draw, shape):
  r = len(shape)
  red = _axes_subset(draw, r, allow_zero=draw(st.booleans()))
  feat = draw(st.sampled_from(["same", "last", "other"]))
  if feat == "same":
    feat = red
  elif feat == "last":
    feat = (r - 1,)
  else:  # feature axes not reduced (e.g. per-position scale)
    rest = [a for a in range(1, r) if a not in red]
    feat = (rest[-1],) if rest else red
  return red, feat


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=6, **SETTINGS)
@given(data=st.data(), shape=shapes,
       mask=st.sampled_from(["elem", "rows", "sample", "lowrank", None]),
       params=st.sampled_from(["feature", "film", None]),
       epsilon=st.sampled_from([1e-6, 1e-3]), rms=st.booleans(), **common)
def test_layer_and_rms_norm(data, shape, mask, params, epsilon, rms, dtype, seed, offset,
                            spread, param_dtype):
  red, feat = data.draw(feature_norm_axes(shape))
  rng = np.random.default_rng(seed)
  with x64_if(dtype):
    x = make_x(rng, shape, dtype, offset, spread)
    where = make_mask(mask, shape, rng)
    pd = _pdtype(param_dtype, dtype)
    scale = make_param(rng, params, shape, feat, pd, positive=True)
    bias = None if rms else make_param(rng, params, shape, feat, pd)
    kw = dict(reduction_axes=red, feature_axes=feat, epsilon=epsilon)
    if rms:
      fn = lambda x, scale, bias: (jn.rms_norm(x, scale, where=where, **kw), None)
      ref_fn = lambda xp, x, scale, bias: R.rms_norm(x, scale, where=where, xp=xp, **kw)
    else:
      fn = lambda x, scale, bias: (jn.layer_norm(x, scale, bias, where=where, **kw), None)
      ref_fn = lambda xp, x, scale, bias: R.layer_norm(x, scale, bias, where=where, xp=xp, **kw)
    ref_fn.feature_axes = feat
    check_against_reference(fn, ref_fn, x, scale, bias, rng=rng, epsilon=epsilon,
                            center=not rms)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=4, **SETTINGS)
@given(shape=ranked_shapes(3, 4), nchw=st.booleans(),
       mask=st.sampled_from(["elem", "sample", "rows", None]),
       params=st.sampled_from(["feature", "film", None]), **common)
def test_instance_norm(shape, nchw, mask, params, dtype, seed, offset, spread, param_dtype):
  feat = (1,) if nchw else (len(shape) - 1,)
  rng = np.random.default_rng(seed)
  with x64_if(dtype):
    x = make_x(rng, shape, dtype, offset, spread)
    where = make_mask(mask, shape, rng)
    pd = _pdtype(param_dtype, dtype)
    scale = make_param(rng, params, shape, feat, pd, positive=True)
    bias = make_param(rng, params, shape, feat, pd)
    kw = dict(feature_axes=feat[0] if nchw else -1)
    fn = lambda x, scale, bias: (jn.instance_norm(x, scale, bias, where=where, **kw), None)
    ref_fn = lambda xp, x, scale, bias: R.instance_norm(x, scale, bias, where=where, xp=xp, **kw)
    ref_fn.feature_axes = feat
    check_against_reference(fn, ref_fn, x, scale, bias, rng=rng, epsilon=1e-6)


@st.composite
def group_norm_case(draw):
  r = draw(st.integers(2, 4))
  C = draw(st.sampled_from([2, 4, 6]))
  other = [draw(st.integers(1, 3)) for _ in range(r - 2)]
  nchw = draw(st.booleans()) and r >= 3
  n = draw(st.integers(1, 3))
  shape = (n, C, *other) if nchw else (n, *other, C)
  c_ax = 1 if nchw else r - 1
  divisors = [d for d in range(1, C + 1) if C % d == 0]
  by_groups = draw(st.booleans())
  k = draw(st.sampled_from(divisors))
  red = None
  if draw(st.booleans()):  # explicit reduction axes containing the channel axis
    red = tuple(sorted({c_ax} | set(_axes_subset(draw, r))))
  return shape, c_ax, (dict(num_groups=k) if by_groups else dict(group_size=k)), red


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=5, **SETTINGS)
@given(case=group_norm_case(), mask=st.sampled_from(["elem", "sample", "rows", None]),
       params=st.sampled_from(["feature", "film", None]), **common)
def test_group_norm(case, mask, params, dtype, seed, offset, spread, param_dtype):
  shape, c_ax, groups, red = case
  rng = np.random.default_rng(seed)
  with x64_if(dtype):
    x = make_x(rng, shape, dtype, offset, spread)
    where = make_mask(mask, shape, rng)
    pd = _pdtype(param_dtype, dtype)
    scale = make_param(rng, params, shape, (c_ax,), pd, positive=True)
    bias = make_param(rng, params, shape, (c_ax,), pd)
    kw = dict(channel_axis=c_ax if c_ax == 1 else -1, reduction_axes=red, **groups)
    fn = lambda x, scale, bias: (jn.group_norm(x, scale, bias, where=where, **kw), None)
    ref_fn = lambda xp, x, scale, bias: R.group_norm(x, scale, bias, where=where, xp=xp, **kw)
    ref_fn.feature_axes = (c_ax,)
    check_against_reference(fn, ref_fn, x, scale, bias, rng=rng, epsilon=1e-6)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=5, **SETTINGS)
@given(data=st.data(), shape=shapes,
       mask=st.sampled_from(["elem", "rows", "sample", "lowrank", None]),
       keepdims=st.booleans(), seed=st.integers(0, 2**31 - 1),
       offset=st.sampled_from([0.0, 2.5, 300.0]))
def test_moments(data, shape, mask, keepdims, dtype, seed, offset):
  axes = _axes_subset(data.draw, len(shape))
  rng = np.random.default_rng(seed)
  with x64_if(dtype):
    x = make_x(rng, shape, dtype, offset, 1.0)
    where = make_mask(mask, shape, rng)
    m = jax.jit(lambda x: jn.moments(x, axis=axes, where=where, keepdims=keepdims))(x)
    ref = R.moments(f64(x), axes, where)
    sdt = jnp.promote_types(dtype, jnp.float32)
    assert type(m) is jn.Moments
    assert all(v.dtype == sdt for v in m), [v.dtype for v in m]
    sq = (lambda a: a) if keepdims else (lambda a: np.squeeze(a, axis=axes))
    assert all(v.shape == sq(ref.mean).shape for v in m)
    uc = R.compute_ulp(dtype)
    dev = np.where(R.full_mask(where, shape), np.abs(f64(x) - ref.mean), 0)
    maxdev = np.max(dev, axis=axes, keepdims=True)
    np.testing.assert_array_equal(np.asarray(m.count), sq(ref.count))
    R.assert_within(m.mean, sq(ref.mean), sq(K * uc * (np.abs(ref.mean) + maxdev)), "mean")
    R.assert_within(m.var, sq(ref.var), sq(K * uc * (ref.var + maxdev ** 2)), "var")
    assert (np.asarray(m.var) >= 0).all()


@settings(max_examples=15, **SETTINGS)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1),
       params=st.sampled_from([None, "feature"]), epsilon=st.sampled_from([0.0, 1e-5]))
def test_normalize(shape, dtype, seed, params, epsilon):
  rng = np.random.default_rng(seed)
  feat = (len(shape) - 1,)
  with x64_if(dtype):
    x = make_x(rng, shape, dtype, 1.0, 1.0)
    mean = jnp.asarray(rng.standard_normal((1,) * (len(shape) - 1) + shape[-1:]), jnp.float32)
    var = jnp.asarray(rng.uniform(0.5, 2, mean.shape), jnp.float32)
    lay = lambda p: None if p is None else p.reshape(mean.shape)
    scale = lay(make_param(rng, params, shape, feat, jnp.float32, positive=True))
    bias = lay(make_param(rng, params, shape, feat, jnp.float32))
    y = jax.jit(lambda *a: jn.normalize(*a, epsilon=epsilon))(x, mean, var, scale, bias)
    assert y.dtype == x.dtype
    ref = R.normalize(f64(x), f64(mean), f64(var), f64(scale), f64(bias), epsilon=epsilon)
    z = (f64(x) - f64(mean)) / np.sqrt(f64(var) + epsilon)
    s = 1.0 if scale is None else f64(scale)
    b = 0.0 if bias is None else np.abs(f64(bias))
    tol = K * R.compute_ulp(dtype) * ((1 + np.abs(z)) * s + b) + R.ulp(dtype) * np.abs(ref)
    R.assert_within(y, ref, tol, "normalize")


@settings(max_examples=15, **SETTINGS)
@given(n=st.integers(0, 4), momentum=st.floats(0.0, 1.0), unbiased=st.booleans(),
       masked=st.booleans(), stats_dtype=st.sampled_from(["float32", "bfloat16", "float64"]),
       seed=st.integers(0, 2**31 - 1))
def test_update_batch_stats(n, momentum, unbiased, masked, stats_dtype, seed):
  rng = np.random.default_rng(seed)
  with x64_if(stats_dtype):
    stats = jn.BatchStats(jnp.asarray(rng.standard_normal(5), stats_dtype),
                          jnp.asarray(rng.uniform(0.5, 2, 5), stats_dtype))
    m = jn.Moments(jnp.asarray(rng.standard_normal(5), jnp.float32),
                   jnp.asarray(rng.uniform(0, 3, 5), jnp.float32),
                   jnp.asarray(np.full(5, float(n)), jnp.float32))
    where = jnp.asarray(rng.random(5) < 0.5) if masked else None
    new = jax.jit(lambda s, m, w: jn.update_batch_stats(s, m, momentum=momentum, where=w,
                                                        unbiased_var=unbiased))(stats, m, where)
    assert type(new) is jn.BatchStats
    assert all(v.dtype == jnp.dtype(stats_dtype) and v.shape == (5,) for v in new)
    rm, rv = R.update_batch_stats(f64(stats.mean), f64(stats.var), f64(m.mean), f64(m.var),
                                  f64(m.count), momentum=momentum, unbiased_var=unbiased,
                                  where=None if where is None else np.asarray(where))
    us = max(R.ulp(stats_dtype), R.ulp(np.float32))
    R.assert_within(new.mean, rm, 4 * us * (np.abs(f64(stats.mean)) + np.abs(f64(m.mean))), "mean")
    R.assert_within(new.var, rv, 4 * us * (np.abs(f64(stats.var)) + 2 * np.abs(f64(m.var))), "var")
    if where is not None:
      keep = ~np.asarray(where)
      for v, old in zip(new, stats):
        np.testing.assert_array_equal(np.asarray(v)[keep], np.asarray(old)[keep])
