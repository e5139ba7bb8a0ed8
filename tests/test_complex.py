"""Complex inputs (complex64/complex128), as flax.linen supports them.

The oracle is complex128 NumPy written from the definition (flax's convention):
``mean = E[x]`` (complex), ``var = E|x - mean|^2`` (real), ``y = (x - mean) *
rsqrt(var + eps) * scale + bias``; RMS norm uses ``E|x|^2``.  Gradients of a real
loss are checked against central finite differences of that oracle in float64,
in JAX's convention for complex inputs (``df/dre - i df/dim``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
from jaxnorm import _axes

C128 = np.complex128


# ----------------------------------------------------------------------------- the oracle


def ref_norm(x, axes, scale=None, bias=None, *, eps, where=None, center=True):
  """complex128 normalization over ``axes`` (keep-dims statistics), from the definition."""
  x = np.asarray(x).astype(C128)
  m = np.ones(x.shape, bool) if where is None else np.broadcast_to(where, x.shape)
  n = m.sum(axis=axes, keepdims=True)
  n1 = np.maximum(n, 1)  # a group with no included element: output bias (jaxnorm's policy)
  if center:
    mean = np.where(m, x, 0).sum(axis=axes, keepdims=True) / n1
    var = np.where(m, np.abs(x - mean) ** 2, 0).sum(axis=axes, keepdims=True) / n1
  else:
    mean = 0
    var = np.where(m, np.abs(x) ** 2, 0).sum(axis=axes, keepdims=True) / n1
  y = np.where(n > 0, (x - mean) / np.sqrt(var + eps), 0)
  if scale is not None:
    y = y * np.asarray(scale).astype(C128)
  if bias is not None:
    y = y + np.asarray(bias).astype(C128)
  return y, mean, var


def cnormal(key, shape, dtype=jnp.complex64):
  k1, k2 = jax.random.split(key)
  return (jax.random.normal(k1, shape) + 1j * jax.random.normal(k2, shape)).astype(dtype)


def err(a, b):
  """Max absolute error of ``a`` against the float64/complex128 ``b``, relative to max|b|."""
  a = np.asarray(a).astype(C128)
  b = np.asarray(b).astype(C128)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


X = cnormal(jax.random.key(0), (6, 4, 8)) * (1.5 - 0.5j) + (0.3 + 2j)
SCALE = cnormal(jax.random.key(1), (8,))
BIAS = cnormal(jax.random.key(2), (8,))
RSCALE = jax.random.normal(jax.random.key(3), (8,)) + 1.0
MASK = jax.random.bernoulli(jax.random.key(4), 0.7, (6, 4, 1)).at[0, 0].set(True)

# (name, jaxnorm call, reference reduction axes, centred) on X with scale/bias.
CASES = {
    "layer": (lambda x, s, b, w: jn.layer_norm(x, s, b, where=w, epsilon=1e-5), (2,), True),
    "rms": (lambda x, s, b, w: jn.rms_norm(x, s, where=w, epsilon=1e-5), (2,), False),
    "instance": (lambda x, s, b, w: jn.instance_norm(x, s, b, where=w, epsilon=1e-5), (1,),
                 True),
    "batch": (lambda x, s, b, w: jn.batch_norm(
        x, jn.init_batch_stats(8, jnp.complex64), s, b, training=True, where=w,
        epsilon=1e-5)[0], (0, 1), True),
}


def ref_case(name, x, s, b, w):
  _, axes, center = CASES[name]
  return ref_norm(x, axes, s, None if name == "rms" else b, eps=1e-5, where=w,
                  center=center)[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_match_complex128_reference(name):
  """Complex, real and no scale/bias; with and without a mask (empty rows -> bias)."""
  f, _, _ = CASES[name]
  combos = [(s, b, w) for w in (None, MASK) for s, b in ((SCALE, BIAS), (RSCALE, None),
                                                         (None, None))]
  ys = jax.jit(lambda combos: [f(X, s, b, w) for s, b, w in combos])(combos)  # one compile
  for y, (s, b, w) in zip(ys, combos):
    assert y.dtype == jnp.complex64
    assert err(y, ref_case(name, X, s, b, w)) < 2e-6, (name, s is SCALE, w is None)


def test_group_norm_matches_reference():
  # groups of 2 channels: the statistics run over the 4 positions and 2 channels
  y = jax.jit(lambda x, s, b: jn.group_norm(x, s, b, num_groups=4, epsilon=1e-5))(
      X, SCALE, BIAS)
  xg = np.asarray(X).reshape(6, 4, 4, 2)
  ref = ref_norm(xg, (1, 3), eps=1e-5)[0].reshape(6, 4, 8) * np.asarray(SCALE) + np.asarray(BIAS)
  assert y.dtype == jnp.complex64 and err(y, ref) < 2e-6


def test_moments_and_normalize():
  m = jn.moments(X, axis=(0, 1), where=MASK)
  _, mean, var = ref_norm(X, (0, 1), eps=0.0, where=MASK)
  assert m.mean.dtype == jnp.complex64 and m.var.dtype == jnp.float32
  assert m.count.dtype == jnp.float32
  assert err(m.mean, mean.reshape(8)) < 1e-6 and err(m.var, var.reshape(8)) < 1e-6
  assert np.all(np.asarray(m.var) >= 0)
  k = jn.moments(X, axis=(0, 1), where=MASK, keepdims=True)
  y = jn.normalize(X, k.mean, k.var, SCALE.reshape(1, 1, 8), BIAS.reshape(1, 1, 8),
                   epsilon=1e-5)
  assert err(y, ref_norm(X, (0, 1), SCALE, BIAS, eps=1e-5, where=MASK)[0]) < 2e-6
  # a real x meets a complex mean or scale: the output is complex (flax's promotion)
  xr = X.real
  yr = jn.normalize(xr, k.mean, k.var, epsilon=1e-5)
  assert yr.dtype == jnp.complex64
  assert err(yr, (np.asarray(xr) - np.asarray(k.mean)) / np.sqrt(np.asarray(k.var) + 1e-5)) < 1e-6


def test_complex128_under_x64():
  with jax.enable_x64(True):
    x = cnormal(jax.random.key(5), (5, 7), jnp.complex128) + (3 - 4j)
    yl, (y, s) = jax.jit(lambda x: (jn.layer_norm(x, epsilon=1e-6), jn.batch_norm(
        x, jn.init_batch_stats(7, jnp.complex128), training=True)))(x)
    assert yl.dtype == jnp.complex128
    assert err(yl, ref_norm(x, (1,), eps=1e-6)[0]) < 1e-14
    assert s.mean.dtype == jnp.complex128 and s.var.dtype == jnp.float64
    assert err(y, ref_norm(x, (0,), eps=1e-5)[0]) < 1e-14


def test_large_offset_one_pass_stays_accurate():
  """x = (1e4 + 1e4 j) + N: shifting by a complex data value keeps complex64 accurate,
  where E|x|^2 - |E x|^2 (flax's default fast variance) cancels catastrophically."""
  x = cnormal(jax.random.key(6), (64, 16)) + (1e4 + 1e4j)
  ref, mean, var = ref_norm(x, (0,), eps=1e-5)
  m, y, yl = jax.jit(lambda x: (
      jn.moments(x, axis=0),
      jn.batch_norm(x, jn.init_batch_stats(16, jnp.complex64), training=True)[0],
      jn.layer_norm(x.T, epsilon=1e-5)))(x)
  assert err(m.var, var.reshape(16)) < 1e-5  # measured: 5e-7
  assert err(y, ref) < 1e-5 and err(yl, ref.T) < 1e-5
  xs = np.asarray(x)  # complex64
  naive = np.mean(np.abs(xs) ** 2, 0) - np.abs(np.mean(xs, 0)) ** 2
  assert err(naive, var.reshape(16)) > 1.0  # what the shift avoids


def test_running_averages_several_steps():
  """Complex running mean, real running variance, dtypes kept, EMA as the reference."""
  step = jax.jit(functools.partial(jn.batch_norm, training=True, momentum=0.8))
  stats = jn.init_batch_stats(8, jnp.complex64)
  assert stats.mean.dtype == jnp.complex64 and stats.var.dtype == jnp.float32
  rm, rv = np.zeros(8, C128), np.ones(8)
  for i in range(3):
    x = cnormal(jax.random.key(10 + i), (5, 8)) * (i + 1) + 1j * i
    _, stats = step(x, stats, where=jnp.arange(5)[:, None] < 4)
    _, mean, var = ref_norm(np.asarray(x)[:4], (0,), eps=0.0)
    rm = 0.8 * rm + 0.2 * mean.reshape(8)
    rv = 0.8 * rv + 0.2 * var.reshape(8)
    assert stats.mean.dtype == jnp.complex64 and stats.var.dtype == jnp.float32
  assert err(stats.mean, rm) < 1e-6 and err(stats.var, rv) < 1e-6
  # evaluation with those averages, state returned unchanged (same type and dtypes)
  y, same = jn.batch_norm(X[0], stats, SCALE, BIAS, training=False, epsilon=1e-5)
  ref = (np.asarray(X[0]) - rm) / np.sqrt(rv + 1e-5) * np.asarray(SCALE) + np.asarray(BIAS)
  assert err(y, ref) < 2e-6
  assert jax.tree.map(lambda a: a.dtype, same) == jax.tree.map(lambda a: a.dtype, stats)
  # unbiased running variance (PyTorch's convention) is a real n/(n-1) factor
  _, s = jn.batch_norm(X[0], jn.init_batch_stats(8, jnp.complex64), training=True,
                       momentum=0.0, unbiased_var=True)
  assert err(s.var, ref_norm(X[0], (0,), eps=0.)[2].reshape(8) * 4 / 3) < 1e-6


def test_degenerate_batch_falls_back_to_complex_running_mean():
  stats = jn.BatchStats(mean=SCALE, var=jnp.full(8, 2.0))
  x = X[0, :1]  # a batch of one: unusable batch statistics
  y, new = jn.batch_norm(x, stats, training=True, epsilon=0.0)
  assert err(y, (np.asarray(x) - np.asarray(SCALE)) / np.sqrt(2.0)) < 1e-6
  assert np.array_equal(np.asarray(new.mean), np.asarray(SCALE))


def test_cross_device_equals_global_batch(devices):
  """vmap(axis_name) over 8 devices with unequal masked counts = the global batch."""
  x = cnormal(jax.random.key(20), (8, 3, 4)) + (5 - 2j)
  w = jnp.arange(24).reshape(8, 3, 1) % 5 != 1
  f = lambda x, w: jn.batch_norm(x, jn.init_batch_stats(4, jnp.complex64), SCALE[:4],
                                 BIAS[:4], training=True, where=w, axis_name="d",
                                 momentum=0.5)
  y, s = jax.jit(jax.vmap(f, axis_name="d"))(x, w)
  yg, sg = jax.jit(functools.partial(jn.batch_norm, training=True, momentum=0.5))(
      x.reshape(24, 4), jn.init_batch_stats(4, jnp.complex64), SCALE[:4], BIAS[:4],
      where=w.reshape(24, 1))
  assert err(y.reshape(24, 4), yg) < 1e-6
  assert err(s.mean[3], sg.mean) < 1e-6 and err(s.var[3], sg.var) < 1e-6


def _fd_grad(f, x, h=1e-6):
  """Central differences of a real f at complex x: df/dre - i df/dim (JAX's convention)."""
  x = np.asarray(x).astype(C128)
  g = np.zeros(x.shape, C128)
  for idx in np.ndindex(x.shape):
    for unit, part in ((1.0, 1.0), (1j, -1j)):
      e = np.zeros(x.shape, C128)
      e[idx] = unit * h
      g[idx] += part * (f(x + e) - f(x - e)) / (2 * h)
  return g


@pytest.mark.parametrize("name", ["layer", "batch", "rms"])
def test_grad_of_real_loss(name):
  """jax.grad of a real loss w.r.t. complex x, real scale and complex bias."""
  f, axes, center = CASES[name]
  x = cnormal(jax.random.key(30), (3, 1, 8))[:, 0] * (1 + 1j) + 0.5
  wt = np.asarray(jax.random.uniform(jax.random.key(31), (3, 8)))
  c = np.asarray(cnormal(jax.random.key(32), (3, 8)))
  s, b = np.asarray(RSCALE), np.asarray(BIAS)
  ax = (0,) if name == "batch" else (1,)  # on (3, 8)

  def loss_ref(x, s, b):
    y = ref_norm(x, ax, s, None if name == "rms" else b, eps=1e-5, center=center)[0]
    return float(np.sum(wt * np.abs(y) ** 2) + np.sum((y * c).real))

  def loss(x, s, b):
    y = f(x, s, b, None)
    return jnp.sum(wt * (y.real ** 2 + y.imag ** 2)) + jnp.sum((y * c).real)

  gx, gs, gb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, RSCALE, BIAS)
  assert gx.dtype == jnp.complex64 and gs.dtype == jnp.float32
  assert err(gx, _fd_grad(lambda v: loss_ref(v, s, b), x)) < 1e-4
  assert err(gs, _fd_grad(lambda v: loss_ref(x, v.real, b), s).real) < 1e-4
  if name != "rms":
    assert err(gb, _fd_grad(lambda v: loss_ref(x, s, v), b)) < 1e-4


def test_phase_equivariance_and_torch_rms_differs():
  """|x|^2 statistics: normalizing e^{i t} x gives e^{i t} y.  torch.nn.functional.rms_norm
  on complex uses the complex square x*x instead (phase-dependent); jaxnorm follows flax."""
  rot = np.exp(0.7j).astype(np.complex64)
  fns = (jn.layer_norm, jn.rms_norm, lambda x: jn.group_norm(x, num_groups=2))
  ys, yrots = jax.jit(lambda x: ([f(x) for f in fns], [f(x * rot) for f in fns]))(X)
  for y, yrot in zip(ys, yrots):
    assert err(yrot, y * rot) < 1e-6
  torch = pytest.importorskip("torch")
  yt = torch.nn.functional.rms_norm(torch.from_numpy(np.array(X)), (8,), eps=1e-5).numpy()
  ref = ref_case("rms", X, None, None, None)
  assert err(jn.rms_norm(X, epsilon=1e-5), ref) < 1e-6
  assert err(yt, ref) > 0.1
  xt = np.asarray(X).astype(C128)
  assert err(yt, xt / np.sqrt(np.mean(xt * xt, -1, keepdims=True) + 1e-5)) < 1e-5


# ----------------------------------------------------------------------------- flax parity


def test_linen_parity_with_flax():
  nn = pytest.importorskip("flax.linen")
  from jaxnorm import linen as jnn
  cparams = dict(param_dtype=jnp.complex64)
  # (6, 4, 8): group norm's groups hold 4 * 2 elements
  cases = [(X, nn.LayerNorm(), jnn.LayerNorm()), (X, nn.RMSNorm(), jnn.RMSNorm()),
           (X, nn.GroupNorm(num_groups=4), jnn.GroupNorm(num_groups=4)),
           (X, nn.LayerNorm(**cparams), jnn.LayerNorm(**cparams)),
           (X.real, nn.LayerNorm(**cparams), jnn.LayerNorm(**cparams))]
  for x, theirs, ours in cases:
    v = theirs.init(jax.random.key(0), x)
    v = jax.tree.map(lambda p: p * (SCALE if jnp.iscomplexobj(p) else RSCALE), v)
    yf, yo = theirs.apply(v, x), ours.apply(v, x)
    assert yf.dtype == yo.dtype, (type(ours).__name__, yf.dtype, yo.dtype)
    assert err(yo, yf) < 2e-6, type(ours).__name__


def test_linen_batchnorm_parity_and_state():
  nn = pytest.importorskip("flax.linen")
  from jaxnorm import linen as jnn
  fb, jb = nn.BatchNorm(momentum=0.7), jnn.BatchNorm(momentum=0.7)
  x0 = X.reshape(24, 8)
  vf = fb.init(jax.random.key(0), x0, use_running_average=False)
  vj = jb.init(jax.random.key(0), x0, use_running_average=False)
  # flax creates a float32 mean that its first complex update turns complex64;
  # jaxnorm creates it complex64 from the start (the trained trees then agree)
  assert vf["batch_stats"]["mean"].dtype == jnp.float32
  assert vj["batch_stats"]["mean"].dtype == jnp.complex64
  assert vj["batch_stats"]["var"].dtype == jnp.float32
  for i in range(2):
    x = cnormal(jax.random.key(40 + i), (24, 8)) + 1j
    yf, vf_new = fb.apply(vf, x, use_running_average=False, mutable=["batch_stats"])
    yj, vj_new = jb.apply(vj, x, use_running_average=False, mutable=["batch_stats"])
    vf, vj = {**vf, **vf_new}, {**vj, **vj_new}
    assert err(yj, yf) < 2e-6
    for k in ("mean", "var"):
      assert vj["batch_stats"][k].dtype == vf["batch_stats"][k].dtype
      assert err(vj["batch_stats"][k], vf["batch_stats"][k]) < 1e-6
  ye = jb.apply(vj, x0, use_running_average=True)
  assert err(ye, fb.apply(vf, x0, use_running_average=True)) < 2e-6
  # flax's freshly initialised (float32-mean) variables load into jaxnorm: widened
  y, upd = jb.apply(fb.init(jax.random.key(0), x0, use_running_average=False), x0,
                    use_running_average=False, mutable=["batch_stats"])
  assert upd["batch_stats"]["mean"].dtype == jnp.complex64
  assert err(upd["batch_stats"]["mean"], 0.3 * jnp.mean(x0, 0)) < 1e-6


def test_nnx_keeps_complex_running_mean():
  """flax.nnx.BatchNorm (0.12.8) drops the imaginary part of its running mean (a
  ComplexWarning); jaxnorm.nnx widens the mean to complex on the first complex call."""
  nnx = pytest.importorskip("flax.nnx")
  from jaxnorm import nnx as jnnx
  bn = jnnx.BatchNorm(8, momentum=0.5, rngs=nnx.Rngs(0))
  x = X.reshape(24, 8)
  y = nnx.jit(lambda m, x: m(x))(bn, x)
  assert err(y, ref_norm(x, (0,), eps=1e-5)[0]) < 2e-6
  assert bn.mean[...].dtype == jnp.complex64 and bn.var[...].dtype == jnp.float32
  assert err(bn.mean[...], 0.5 * np.asarray(x).mean(0)) < 1e-6
  ln, fl = jnnx.LayerNorm(8, rngs=nnx.Rngs(0)), nnx.LayerNorm(8, rngs=nnx.Rngs(0))
  assert err(ln(x), fl(x)) < 2e-6


# ----------------------------------------------------------------------------- errors


def test_bad_dtypes_raise_clear_errors():
  for bad, exact in ((jnp.arange(6.).astype(jnp.int32).reshape(2, 3), False),
                     (jnp.ones((2, 3), jnp.int8), True), (jnp.ones((2, 3), bool), True)):
    with pytest.raises(TypeError, match="must be a floating array") as e:
      jn.layer_norm(bad)
    assert "complex64" in str(e.value)
    assert ("exactly." in str(e.value)) == exact  # int32: points at float64 for big values
  # a function that does not support complex never suggests a real cast
  with pytest.raises(TypeError, match="imaginary part") as e:
    _axes.check_floating(X, fn="jaxnorm.some_norm")
  assert "astype(jnp.float32)" not in str(e.value) and "x.imag" in str(e.value)
  k = jn.moments(X, axis=0, keepdims=True)
  with pytest.raises(TypeError, match="var must be real"):
    jn.normalize(X, k.mean, k.var.astype(jnp.complex64))
  with pytest.raises(TypeError, match="running mean is real"):
    jn.batch_norm(X, jn.init_batch_stats(8), training=True)
  with pytest.raises(TypeError, match="running var must be real"):
    jn.batch_norm(X, jn.BatchStats(jnp.zeros(8, jnp.complex64), jnp.ones(8, jnp.complex64)),
                  training=False)
  with pytest.raises(TypeError, match="running mean is complex"):
    jn.batch_norm(X.real, jn.init_batch_stats(8, jnp.complex64), training=True)
  with pytest.raises(TypeError, match="drop the imaginary part"):
    jn.layer_norm(X, dtype=jnp.float32)
  with pytest.raises(TypeError, match="drop the imaginary part"):
    jn.update_batch_stats(jn.init_batch_stats(8), jn.moments(X, axis=(0, 1)), momentum=0.9)
  with pytest.raises(TypeError, match="floating or complex dtype"):
    jn.init_batch_stats(3, jnp.int32)


def test_instance_norm_without_spatial_axis_raises_with_alternatives():
  x = jnp.ones((10, 6))
  with pytest.raises(ValueError, match="no spatial axis") as e:
    jn.instance_norm(x)
  assert "layer_norm" in str(e.value) and "batch_norm" in str(e.value)
  nn = pytest.importorskip("flax.linen")
  from jaxnorm import linen as jnn
  with pytest.raises(ValueError, match="no spatial axis"):
    jnn.InstanceNorm().init(jax.random.key(0), x)
  # flax returns the bias here (each element normalized by itself)
  v = nn.InstanceNorm().init(jax.random.key(0), x)
  assert np.allclose(nn.InstanceNorm().apply(v, x * 3.0 + 1.0), 0.0)
