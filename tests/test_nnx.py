"""jaxnorm.nnx against flax.nnx (parity, transforms, checkpoints), the functional core
(bit for bit) and a float64 NumPy reference (the deliberate differences)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")  # the Flax frontends need the `flax` extra

from flax import nnx, serialization
from flax.nnx.nn import dtypes as nnx_dtypes

import jaxnorm as jn
from jaxnorm import nnx as jnnx

from _frontend_reference import group_norm64, max_err, moments64, norm64

BF16 = jnp.bfloat16
F32 = np.float32


def _x(shape, seed=0, loc=0.5, scale=2.0, dtype=jnp.float32):
  r = np.random.default_rng(seed).standard_normal(shape)
  return jnp.asarray((loc + scale * r).astype(np.float32)).astype(dtype)


def _flat(module):
  """``[(path, variable type, shape, dtype)]`` of a module's state."""
  return [(path, type(v).__name__, tuple(v.shape), np.dtype(v.dtype))
          for path, v in nnx.to_flat_state(nnx.state(module))]


def _randomize(*modules, seed=1):
  """Gives the modules the same non-trivial parameters and running averages."""
  rng = np.random.default_rng(seed)
  state = nnx.state(modules[0])
  for path, v in nnx.to_flat_state(state):
    r = rng.standard_normal(v.shape).astype(np.float32)
    r = 1 + 0.5 * np.abs(r) if path[-1] in ("var", "scale") else r
    v.set_value(jnp.asarray(r).astype(v.dtype))
  for m in modules:
    nnx.update(m, state)


@nnx.jit(static_argnames=("kw",))
def _call(m, x, kw=()):
  return m(x, **dict(kw))


# (id, class name, num_features, constructor kwargs, input shape, input dtype)
CASES = [
    ("bn_nhwc", "BatchNorm", 5, dict(momentum=0.9), (4, 3, 3, 5), F32),
    ("bn_nchw", "BatchNorm", 5, dict(axis=1), (4, 5, 3, 2), F32),
    ("bn_no_affine", "BatchNorm", 4, dict(use_bias=False, use_scale=False), (6, 4), F32),
    ("bn_out_bf16", "BatchNorm", 4, dict(dtype=BF16), (6, 4), F32),
    ("bn_bf16_in", "BatchNorm", 4, {}, (6, 4), BF16),
    ("ln", "LayerNorm", 6, {}, (4, 6), F32),
    ("ln_bf16_in", "LayerNorm", 6, {}, (4, 6), BF16),
    ("ln_multi", "LayerNorm", 20, dict(reduction_axes=(1, 2), feature_axes=(1, 2)), (3, 4, 5),
     F32),
    ("ln_no_bias", "LayerNorm", 6, dict(use_bias=False, epsilon=1e-3), (4, 6), F32),
    ("rms", "RMSNorm", 6, {}, (4, 6), F32),
    ("rms_axes", "RMSNorm", 4, dict(reduction_axes=(1, 2), feature_axes=1), (3, 4, 5), F32),
    ("gn", "GroupNorm", 6, dict(num_groups=3), (2, 4, 4, 6), F32),
    ("gn_size", "GroupNorm", 6, dict(num_groups=None, group_size=2), (2, 3, 6), F32),
    ("in", "InstanceNorm", 3, {}, (2, 4, 4, 3), F32),
    ("in_axes", "InstanceNorm", 15, dict(feature_axes=(1, -1)), (2, 3, 4, 5), F32),
]
IDS = [c[0] for c in CASES]


def _pair(cls_name, nf, kwargs, **extra):
  kw = dict(kwargs, **extra)
  return (getattr(nnx, cls_name)(nf, **kw, rngs=nnx.Rngs(0)),
          getattr(jnnx, cls_name)(nf, **kw, rngs=nnx.Rngs(0)))


def _core(cls_name, m, x):
  """The functional core on the same inputs as the module, promoted the same way inside
  one jit (as ``_call`` does: a cast inside or outside jit can fuse differently)."""
  val = lambda v: None if v is None else v[...]
  if cls_name == "BatchNorm":
    variables = (m.mean[...], m.var[...], val(m.scale), val(m.bias))
  elif cls_name == "RMSNorm":
    variables = (val(m.scale),)
  else:
    variables = (val(m.scale), val(m.bias))
  return jax.jit(functools.partial(_core_body, cls_name, m))(x, *variables)


def _core_body(cls_name, m, x, *variables):
  if cls_name == "BatchNorm":
    x, mean, var, scale, bias = nnx_dtypes.promote_dtype((x, *variables), dtype=m.dtype)
    mean, var = variables[:2]  # running averages keep their dtype
  elif cls_name == "RMSNorm":
    (x, scale), bias = nnx_dtypes.promote_dtype((x, *variables), dtype=m.dtype), None
  else:
    x, scale, bias = nnx_dtypes.promote_dtype((x, *variables), dtype=m.dtype)
  out_dtype = nnx_dtypes.canonicalize_dtype(x, scale, bias, dtype=m.dtype)
  eps = m.epsilon
  if cls_name == "BatchNorm":
    return jn.batch_norm(x, jn.BatchStats(mean, var), scale, bias,
                         training=not m.use_running_average, feature_axes=m.axis,
                         momentum=m.momentum, epsilon=eps, dtype=out_dtype)
  fshape = tuple(x.shape[a] for a in range(x.ndim)
                 if a in jn._axes.canonical_axes(getattr(m, "feature_axes", -1), x.ndim,
                                                 what="", fn=""))
  shaped = lambda p: None if p is None else p.reshape(fshape)
  if cls_name == "LayerNorm":
    f = functools.partial(jn.layer_norm, reduction_axes=m.reduction_axes,
                          feature_axes=m.feature_axes)
    args = (shaped(scale), shaped(bias))
  elif cls_name == "RMSNorm":
    f = functools.partial(jn.rms_norm, reduction_axes=m.reduction_axes,
                          feature_axes=m.feature_axes)
    args = (shaped(scale),)
  elif cls_name == "GroupNorm":
    f = functools.partial(jn.group_norm, num_groups=m.num_groups, reduction_axes=m.reduction_axes)
    args = (scale, bias)
  else:
    f = functools.partial(jn.instance_norm, feature_axes=m.feature_axes)
    args = (shaped(scale), shaped(bias))
  return f(x, *args, epsilon=eps, dtype=out_dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_attributes_and_rngs_match_flax(case):
  _, cls_name, nf, kwargs, _, _ = case
  init = dict(scale_init=nnx.initializers.normal(1.0), bias_init=nnx.initializers.normal(1.0))
  if cls_name == "RMSNorm":
    del init["bias_init"]
  rf, rj = nnx.Rngs(3), nnx.Rngs(3)
  fl = getattr(nnx, cls_name)(nf, **kwargs, **init, rngs=rf)
  jm = getattr(jnnx, cls_name)(nf, **kwargs, **init, rngs=rj)
  assert _flat(jm) == _flat(fl)
  # same keys drawn from rngs: same parameters, and the stream continues identically
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(jm)),
               nnx.to_pure_dict(nnx.state(fl)))
  np.testing.assert_array_equal(jax.random.key_data(rj.params()),
                                jax.random.key_data(rf.params()))
  # flax's attributes, with flax's values
  for name, value in vars(fl).items():
    if name.startswith("_") or isinstance(value, nnx.Variable) or value is None:
      continue
    assert getattr(jm, name) == value, name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_flax_and_core(case):
  """Outputs and running averages equal flax.nnx within float32 tolerance (flax with
  use_fast_variance=False), and the functional core bit for bit, under nnx.jit."""
  _, cls_name, nf, kwargs, shape, dtype = case
  fl, jm = _pair(cls_name, nf, kwargs, use_fast_variance=False)
  _randomize(fl, jm)
  x = _x(shape, dtype=dtype)
  low = kwargs.get("dtype") == BF16
  tol = 2e-2 if low else 2e-5
  modes = (False, True) if cls_name == "BatchNorm" else (None,)
  for ura in modes:
    if ura is not None:
      for m in (fl, jm):
        m.use_running_average = ura
    before = nnx.clone(jm)
    yf, yj = _call(fl, x), _call(jm, x)
    assert yj.dtype == yf.dtype and yj.shape == yf.shape
    np.testing.assert_allclose(np.asarray(yj, F32), np.asarray(yf, F32), rtol=tol, atol=tol)
    if ura is not None:
      np.testing.assert_allclose(jm.mean[...], fl.mean[...], rtol=2e-5, atol=2e-5)
      np.testing.assert_allclose(jm.var[...], fl.var[...], rtol=2e-5, atol=2e-5)
      assert jm.mean.dtype == jm.var.dtype == jnp.float32
      yc, sc = _core(cls_name, before, x)
      np.testing.assert_array_equal(jm.mean[...], sc.mean)
      np.testing.assert_array_equal(jm.var[...], sc.var)
    else:
      yc = _core(cls_name, jm, x)
    np.testing.assert_array_equal(yj, yc)


def test_train_eval_view_and_call_override():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.bn = jnnx.BatchNorm(3, momentum=0.5, rngs=rngs)
      self.ln = jnnx.LayerNorm(3, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
      return self.ln(self.bn(x))

  net = Net(nnx.Rngs(0))
  x = _x((5, 3))
  assert net.bn.use_running_average is False  # flax.nnx default
  net.eval()
  assert net.bn.use_running_average is True and net.drop.deterministic
  y = _call(net, x)
  np.testing.assert_array_equal(net.bn.mean[...], np.zeros(3))  # eval: unchanged
  ref = norm64(np.asarray(x, np.float64) / np.sqrt(1 + 1e-5), (1,), (), eps=1e-6)
  assert max_err(y, ref) < 1e-5
  net.train()
  assert net.bn.use_running_average is False
  _call(net, x)
  np.testing.assert_allclose(net.bn.mean[...], 0.5 * np.mean(np.asarray(x), 0), atol=1e-6)
  view = nnx.view(net, use_running_average=True)
  assert view.bn.use_running_average is True and net.bn.use_running_average is False
  # a call-time argument takes precedence over the attribute
  m0 = nnx.clone(net.bn.mean[...])
  net.bn(x, use_running_average=True)
  np.testing.assert_array_equal(net.bn.mean[...], m0)
  with pytest.raises(ValueError, match="use_running_average"):
    jnnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(x)
  with pytest.raises(TypeError, match="use_running_average"):
    jax.jit(lambda x, f: jnnx.BatchNorm(3, rngs=nnx.Rngs(0))(x, use_running_average=f))(x, True)


def test_split_merge_state_roundtrip():
  bn = jnnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))
  x = _x((6, 4))
  graphdef, state = nnx.split(bn)
  assert set(nnx.to_pure_dict(state)) == {"mean", "var", "scale", "bias"}
  assert nnx.state(bn, nnx.BatchStat).keys() == {"mean", "var"}
  assert nnx.state(bn, nnx.Param).keys() == {"scale", "bias"}
  mean0 = np.array(state["mean"][...])

  @jax.jit
  def pure_step(state, x):  # the functional API: split/merge inside plain jax.jit
    m = nnx.merge(graphdef, state)
    y = m(x)
    return y, nnx.state(m)

  y, new_state = pure_step(state, x)
  y2 = _call(bn, x)  # stateful, under nnx.jit
  np.testing.assert_array_equal(y, y2)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(new_state),
               nnx.to_pure_dict(nnx.state(bn)))
  assert not np.array_equal(new_state["mean"][...], mean0)


def _ensemble(ns, n=3):
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(rngs):
    return ns.BatchNorm(4, momentum=0.5, use_fast_variance=False,
                        scale_init=nnx.initializers.normal(1.0),
                        bias_init=nnx.initializers.normal(1.0), rngs=rngs)
  return create(nnx.Rngs(0))


def test_vmap_and_scan_match_flax():
  xs = _x((3, 5, 4), seed=2)
  ef, ej = _ensemble(nnx), _ensemble(jnnx)
  assert _flat(ej) == _flat(ef)
  member = lambda e, i: jax.tree.map(lambda a: a[i], nnx.to_pure_dict(nnx.state(e)))
  s0 = member(ej, 1)
  # vmap: an ensemble of independent layers
  vm = nnx.jit(nnx.vmap(lambda m, x: m(x), in_axes=(0, 0)))
  yf, yj = vm(ef, xs), vm(ej, xs)
  np.testing.assert_allclose(yj, yf, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(ej.mean[...], ef.mean[...], rtol=2e-5, atol=2e-6)
  yc, sc = jn.batch_norm(xs[1], jn.BatchStats(s0["mean"], s0["var"]), s0["scale"], s0["bias"],
                         training=True, momentum=0.5)
  assert max_err(yj[1], yc) < 1e-6 and max_err(ej.var[...][1], sc.var) < 1e-6
  # scan: the layers applied in sequence
  scan = nnx.jit(nnx.scan(lambda m, x: (m(x),) * 2, in_axes=(0, nnx.Carry),
                          out_axes=(nnx.Carry, 0)))
  (cf, _), (cj, hj) = scan(ef, xs[0]), scan(ej, xs[0])
  np.testing.assert_allclose(cj, cf, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(ej.var[...], ef.var[...], rtol=2e-5, atol=2e-5)
  assert hj.shape == (3, 5, 4) and ej.mean[...].shape == (3, 4)


def test_vmap_axis_name_masked_statistics_are_exact():
  """Deliberate difference: 4 'devices' (an nnx.vmap axis) whose masks keep 3, 1, 0
  and 2 samples; the statistics are the global masked batch's."""
  x = _x((4, 3, 2), seed=9)
  mask = jnp.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1]], bool)[..., None]
  bn = jnnx.BatchNorm(2, axis_name="d", momentum=0., rngs=nnx.Rngs(0))
  y = nnx.vmap(lambda m, x, k: m(x, mask=k), in_axes=(None, 0, 0), axis_name="d")(bn, x, mask)
  xf, mf = x.reshape(12, 2), mask.reshape(12, 1)
  assert max_err(y.reshape(12, 2), norm64(xf, (0,), (1,), eps=1e-5, mask=mf)) < 2e-5
  mean64, var64, _ = moments64(xf, (0,), mask=mf)
  assert max_err(bn.mean[...], mean64[0]) < 1e-6 and max_err(bn.var[...], var64[0]) < 2e-6


def test_checkpoints_load_both_ways():
  class Net(nnx.Module):
    def __init__(self, ns, rngs):
      self.lin = nnx.Linear(5, 8, rngs=rngs)
      self.bn = ns.BatchNorm(8, rngs=rngs)
      self.ln = ns.LayerNorm(8, rngs=rngs)
      self.gn = ns.GroupNorm(8, num_groups=2, rngs=rngs)
      self.rms = ns.RMSNorm(8, rngs=rngs)
      self.inorm = ns.InstanceNorm(8, rngs=rngs)

    def __call__(self, x):
      h = self.lin(x)
      return (self.bn(h) + self.ln(h) + self.gn(h) + self.rms(h)
              + self.inorm(h.reshape(2, 3, 8)).reshape(6, 8))

  x = _x((6, 5))
  fm, jm = Net(nnx, nnx.Rngs(0)), Net(jnnx, nnx.Rngs(0))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(jm)),
               nnx.to_pure_dict(nnx.state(fm)))  # same init from the same Rngs
  jm2 = Net(jnnx, nnx.Rngs(5))
  _call(fm, x)  # non-trivial running averages
  # flax -> jaxnorm, through bytes
  blob = serialization.to_bytes(nnx.to_pure_dict(nnx.state(fm)))
  target = nnx.state(jm2)
  nnx.replace_by_pure_dict(target, serialization.from_bytes(nnx.to_pure_dict(target), blob))
  nnx.update(jm2, target)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(jm2)),
               nnx.to_pure_dict(nnx.state(fm)))
  fm.eval(); jm2.eval()
  np.testing.assert_allclose(_call(jm2, x), _call(fm, x), rtol=1e-5, atol=1e-5)
  # jaxnorm -> flax, through state dicts
  jm.train()
  _call(jm, x)
  fm2 = Net(nnx, nnx.Rngs(9))
  sd = serialization.to_state_dict(nnx.to_pure_dict(nnx.state(jm)))
  target = nnx.state(fm2)
  nnx.replace_by_pure_dict(target, serialization.from_state_dict(nnx.to_pure_dict(target), sd))
  nnx.update(fm2, target)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(fm2)),
               nnx.to_pure_dict(nnx.state(jm)))


def test_keyword_only():
  with pytest.raises(TypeError):
    jnnx.LayerNorm(12, 1e-3, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError):
    jnnx.BatchNorm(6, True, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError):  # flax.nnx takes num_groups positionally; jaxnorm does not
    jnnx.GroupNorm(6, 3, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError):
    jnnx.LayerNorm(6)  # rngs is required, as in flax.nnx
  with pytest.raises(ValueError, match="num_groups"):
    jnnx.GroupNorm(6, num_groups=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="degenerate"):
    jnnx.BatchNorm(6, degenerate="nan", rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- deliberate differences


def test_groupnorm_unbatched_and_non_default_axes():
  """flax.nnx 0.12.8 repeats group statistics along a hard-coded axis 1."""
  gn = jnnx.GroupNorm(6, num_groups=3, reduction_axes=(0, 1, 2), rngs=nnx.Rngs(0))
  _randomize(gn)
  p = nnx.to_pure_dict(nnx.state(gn))
  x = _x((4, 4, 6), seed=10)  # unbatched (H, W, C)
  assert max_err(_call(gn, x), group_norm64(x, 3, (0, 1, 2), scale=p["scale"],
                                            bias=p["bias"], eps=1e-6)) < 2e-5
  x = _x((2, 3, 4, 6), seed=11)  # statistics per (sample, row): reduce W and C
  gn.reduction_axes = (2, 3)
  assert max_err(_call(gn, x), group_norm64(x, 3, (2, 3), scale=p["scale"], bias=p["bias"],
                                            eps=1e-6)) < 2e-5


def test_batchnorm_bf16_eval_keeps_running_averages_in_float32():
  """dtype=bfloat16 in evaluation: the running mean is not rounded to bfloat16 before
  the subtraction, so only the final rounding of y remains."""
  bn = jnnx.BatchNorm(4, dtype=BF16, use_running_average=True, rngs=nnx.Rngs(0))
  bn.mean[...] = jnp.array([300.3, -41.7, 1000.9, 7.1], jnp.float32)
  bn.var[...] = jnp.array([1.0, 0.25, 4.0, 0.01], jnp.float32)
  x = (bn.mean[...][None] + jnp.sqrt(bn.var[...])[None] * _x((64, 4), seed=12, loc=0.,
                                                              scale=1.)).astype(BF16)
  y = _call(bn, x)
  assert y.dtype == BF16
  f64 = lambda a: np.asarray(a, np.float64)
  ref = (f64(x) - f64(bn.mean[...])[None]) / np.sqrt(f64(bn.var[...])[None] + 1e-5)
  # |ref| <= ~30 here (x is rounded to bf16); bf16 output rounding <= |ref| * 2^-9
  err = np.abs(f64(y) - ref)
  assert np.all(err <= np.abs(ref) * 2 ** -8 + 1e-6), float(np.max(err))


def test_large_offset_is_accurate_whatever_use_fast_variance():
  x = _x((64, 4), seed=2, loc=1e4, scale=1.0)
  outs = []
  for fast in (True, False):
    bn = jnnx.BatchNorm(4, use_fast_variance=fast, momentum=0., rngs=nnx.Rngs(0))
    ln = jnnx.LayerNorm(64, use_fast_variance=fast, rngs=nnx.Rngs(0))
    outs.append((_call(bn, x), _call(ln, x.T), bn.var[...]))
  jax.tree.map(np.testing.assert_array_equal, outs[0], outs[1])  # the flag selects nothing
  yb, yl, var = outs[0]
  assert max_err(yb, norm64(x, (0,), (), eps=1e-5)) < 1e-5
  assert max_err(yl, norm64(x.T, (1,), (), eps=1e-6)) < 1e-5
  _, var64, _ = moments64(x, (0,))
  assert max_err(var, var64[0]) < 1e-3


def test_batch_of_one_uses_running_averages():
  bn = jnnx.BatchNorm(3, rngs=nnx.Rngs(0))
  _randomize(bn)
  s0 = nnx.to_pure_dict(nnx.clone(nnx.state(bn)))
  x1 = _x((1, 3), seed=13)
  y = _call(bn, x1)
  f64 = lambda a: np.asarray(a, np.float64)
  ref = (f64(x1) - f64(s0["mean"])) / np.sqrt(f64(s0["var"]) + 1e-5) * f64(s0["scale"]) + f64(
      s0["bias"])
  assert max_err(y, ref) < 1e-5
  np.testing.assert_array_equal(bn.mean[...], s0["mean"])
  bn.degenerate = "batch"  # flax's behaviour: normalizes to the bias
  assert max_err(_call(bn, x1), f64(s0["bias"])[None]) < 1e-6
