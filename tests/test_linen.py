"""jaxnorm.linen against flax.linen (parity), the functional core (bit for bit) and
a float64 NumPy reference (the deliberate differences)."""

import functools
import subprocess
import sys

import pytest

pytest.importorskip("flax")  # the Flax frontends need the `flax` extra

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

import jaxnorm as jn
from jaxnorm import linen as jnn

from _frontend_reference import group_norm64, max_err, moments64, norm64, shapes_dtypes

BF16 = jnp.bfloat16
F32 = np.float32


def _x(shape, seed=0, loc=0.5, scale=2.0, dtype=jnp.float32):
  """Test data from NumPy (no per-shape compilation)."""
  r = np.random.default_rng(seed).standard_normal(shape)
  return jnp.asarray((loc + scale * r).astype(np.float32)).astype(dtype)


# (id, class name, constructor kwargs, input shape, input dtype)
CASES = [
    ("bn_nhwc", "BatchNorm", dict(momentum=0.9), (4, 3, 3, 5), F32),
    ("bn_nchw", "BatchNorm", dict(axis=1), (4, 5, 3, 2), F32),
    ("bn_two_axes", "BatchNorm", dict(axis=(1, 3)), (4, 3, 2, 5), F32),
    ("bn_no_affine", "BatchNorm", dict(use_bias=False, use_scale=False), (6, 4), F32),
    ("bn_out_bf16", "BatchNorm", dict(dtype=BF16), (6, 4), F32),
    ("bn_bf16_params", "BatchNorm", dict(param_dtype=BF16, force_float32_reductions=False),
     (6, 4), F32),
    ("ln", "LayerNorm", {}, (4, 6), F32),
    ("ln_bf16_in", "LayerNorm", {}, (4, 6), BF16),
    ("ln_multi", "LayerNorm", dict(reduction_axes=(1, 2), feature_axes=(1, 2)), (3, 4, 5), F32),
    ("ln_overlap", "LayerNorm", dict(reduction_axes=(1, 2, 3)), (2, 3, 4, 5), F32),
    ("ln_no_bias", "LayerNorm", dict(use_bias=False, epsilon=1e-3), (4, 6), F32),
    ("rms", "RMSNorm", {}, (4, 6), F32),
    ("rms_axes", "RMSNorm", dict(reduction_axes=(1, 2), feature_axes=1), (3, 4, 5), F32),
    ("gn", "GroupNorm", dict(num_groups=3), (2, 4, 4, 6), F32),
    ("gn_size", "GroupNorm", dict(num_groups=None, group_size=2), (2, 3, 6), F32),
    ("gn_axes", "GroupNorm", dict(num_groups=2, reduction_axes=(2, 3)), (2, 3, 4, 6), F32),
    ("in", "InstanceNorm", {}, (2, 4, 4, 3), F32),
    ("in_axes", "InstanceNorm", dict(feature_axes=(1, -1)), (2, 3, 4, 5), F32),
]
IDS = [c[0] for c in CASES]


def _modules(cls_name, kwargs, **extra):
  kw = dict(kwargs, **extra)
  if cls_name == "BatchNorm":
    kw.setdefault("use_running_average", False)
  return getattr(nn, cls_name)(**kw), getattr(jnn, cls_name)(**kw)


def _randomize(variables, seed=1):
  """Non-trivial parameters and running averages (positive variances)."""
  leaves, treedef = jax.tree.flatten_with_path(variables)
  rng = np.random.default_rng(seed)
  out = []
  for path, v in leaves:
    r = rng.standard_normal(v.shape).astype(np.float32)
    r = 1 + 0.5 * np.abs(r) if path[-1].key in ("var", "scale") else r
    out.append(jnp.asarray(r).astype(v.dtype))
  return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_variable_tree_matches_flax(case):
  _, cls_name, kwargs, shape, dtype = case
  fl, jm = _modules(cls_name, kwargs)
  x = jax.ShapeDtypeStruct(shape, dtype)
  vf = jax.eval_shape(fl.init, jax.random.key(0), x)
  vj = jax.eval_shape(jm.init, jax.random.key(0), x)
  assert shapes_dtypes(vj) == shapes_dtypes(vf)
  # same insertion order too (collections, then scale before bias)
  assert [(c, list(v)) for c, v in vj.items()] == [(c, list(v)) for c, v in vf.items()]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_flax_and_core(case):
  """Outputs and running averages equal flax's within float32 tolerance (flax with
  its accurate use_fast_variance=False), and the core's bit for bit."""
  _, cls_name, kwargs, shape, dtype = case
  bn = cls_name == "BatchNorm"
  fl, jm = _modules(cls_name, kwargs, use_fast_variance=False,
                    **(dict(use_running_average=None) if bn else {}))
  x = _x(shape, dtype=dtype)
  init_kw = dict(use_running_average=False) if bn else {}
  variables = _randomize(jax.eval_shape(functools.partial(fl.init, **init_kw),
                                        jax.random.key(0), x))
  tol = 2e-2 if kwargs.get("dtype") == BF16 else 2e-5
  if bn:
    for ura in (False, True):
      apply = lambda m: jax.jit(functools.partial(m.apply, use_running_average=ura,
                                                  mutable=["batch_stats"]))
      yf, sf = apply(fl)(variables, x)
      yj, sj = apply(jm)(variables, x)
      assert yj.dtype == yf.dtype and yj.shape == yf.shape
      # flax evaluates var + eps and rsqrt in bf16 without force_float32_reductions
      ytol = 2e-2 if ura and not kwargs.get("force_float32_reductions", True) else tol
      np.testing.assert_allclose(np.asarray(yj, F32), np.asarray(yf, F32), rtol=ytol, atol=ytol)
      for k in ("mean", "var"):
        # running averages keep their dtype (flax.linen turns bf16 ones into f32 here)
        old = variables["batch_stats"][k]
        assert sj["batch_stats"][k].dtype == old.dtype
        stol = 2e-5 if old.dtype == F32 else 1e-2
        np.testing.assert_allclose(np.asarray(sj["batch_stats"][k], F32),
                                   np.asarray(sf["batch_stats"][k], F32), rtol=stol, atol=stol)
      p, bs = variables.get("params", {}), variables["batch_stats"]
      yc, sc = jax.jit(functools.partial(
          jn.batch_norm, training=not ura, feature_axes=kwargs.get("axis", -1),
          momentum=kwargs.get("momentum", 0.99), epsilon=1e-5, dtype=yf.dtype))(
              x, jn.BatchStats(bs["mean"], bs["var"]), p.get("scale"), p.get("bias"))
      np.testing.assert_array_equal(yj, yc)
      np.testing.assert_array_equal(sj["batch_stats"]["mean"], sc.mean)
      np.testing.assert_array_equal(sj["batch_stats"]["var"], sc.var)
    return
  yf = jax.jit(fl.apply)(variables, x)
  yj = jax.jit(jm.apply)(variables, x)
  assert yj.dtype == yf.dtype and yj.shape == yf.shape
  np.testing.assert_allclose(np.asarray(yj, F32), np.asarray(yf, F32), rtol=tol, atol=tol)
  p = variables["params"]
  eps = kwargs.get("epsilon", 1e-6)
  if cls_name == "LayerNorm":
    core = functools.partial(jn.layer_norm, reduction_axes=kwargs.get("reduction_axes", -1),
                             feature_axes=kwargs.get("feature_axes", -1))
    args = (p.get("scale"), p.get("bias"))
  elif cls_name == "RMSNorm":
    core = functools.partial(jn.rms_norm, reduction_axes=kwargs.get("reduction_axes", -1),
                             feature_axes=kwargs.get("feature_axes", -1))
    args = (p["scale"],)
  elif cls_name == "GroupNorm":
    core = functools.partial(jn.group_norm, num_groups=kwargs.get("num_groups", 32),
                             group_size=kwargs.get("group_size"),
                             reduction_axes=kwargs.get("reduction_axes"))
    args = (p["scale"], p["bias"])
  else:
    core = functools.partial(jn.instance_norm, feature_axes=kwargs.get("feature_axes", -1))
    args = (p["scale"], p["bias"])
  yc = jax.jit(functools.partial(core, epsilon=eps, dtype=yf.dtype))(x, *args)
  np.testing.assert_array_equal(yj, yc)


def test_output_dtype_follows_flax_promotion():
  x16 = _x((4, 6), dtype=BF16)
  for kw, xin, expected in [({}, x16, jnp.float32),  # bf16 input, f32 params -> f32
                            (dict(param_dtype=BF16), x16, BF16),
                            (dict(dtype=BF16), _x((4, 6)), BF16),
                            (dict(use_scale=False, use_bias=False), x16, BF16)]:
    for mod in (nn, jnn):
      ln = mod.LayerNorm(**kw)
      assert ln.apply(ln.init(jax.random.key(0), xin), xin).dtype == expected, (mod, kw)


def test_masked_statistics_match_flax():
  x = _x((6, 4), seed=3)
  mask = jnp.array([True, False, True, True, False, True])[:, None]
  for name in ("BatchNorm", "LayerNorm"):
    m = mask if name == "BatchNorm" else jnp.array([[True, True, False, True]])
    fl, jm = _modules(name, {}, use_fast_variance=False)
    v = _randomize(fl.init(jax.random.key(0), x))
    kw = dict(mutable=["batch_stats"]) if name == "BatchNorm" else {}
    yf, yj = fl.apply(v, x, mask=m, **kw), jm.apply(v, x, mask=m, **kw)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5), yj, yf)
    red = (0,) if name == "BatchNorm" else (1,)
    ref = norm64(x, red, (1,), scale=v["params"]["scale"], bias=v["params"]["bias"],
                 eps=1e-5 if name == "BatchNorm" else 1e-6, mask=m)
    y = yj[0] if name == "BatchNorm" else yj
    assert max_err(y, ref) < 2e-5


def test_init_does_not_update_running_averages():
  """As flax: init in training mode leaves mean=0, var=1, and ignores axis_name."""
  x = _x((5, 3))
  for mod in (nn, jnn):
    bn = mod.BatchNorm(use_running_average=False, axis_name="batch")  # no such axis here
    v = bn.init(jax.random.key(0), x)
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3))
  # and outside init, the update happens (and only with a mutable collection)
  bn = jnn.BatchNorm(use_running_average=False, momentum=0.5)
  v = bn.init(jax.random.key(0), x)
  _, s = bn.apply(v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(s["batch_stats"]["mean"], 0.5 * np.mean(np.asarray(x), 0),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(flax.errors.ModifyScopeVariableError):
    bn.apply(v, x)


def test_keyword_only_and_naming():
  with pytest.raises(TypeError):
    jnn.LayerNorm(12)  # would be epsilon=12 in flax.linen
  with pytest.raises(TypeError):
    jnn.BatchNorm(True)
  with pytest.raises(TypeError):
    jnn.GroupNorm(4)
  assert jnn.LayerNorm(epsilon=12.).epsilon == 12.
  # every flax field exists with the same default
  for name in ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"):
    f_fields = {k: v.default for k, v in getattr(nn, name).__dataclass_fields__.items()}
    j_fields = {k: v.default for k, v in getattr(jnn, name).__dataclass_fields__.items()}
    for k, default in f_fields.items():
      assert k in j_fields, (name, k)
      if k != "parent":
        assert j_fields[k] is default or j_fields[k] == default, (name, k)

  def net(mod):
    class Net(nn.Module):
      def setup(self):
        self.pre = mod.LayerNorm(name="custom")

      @nn.compact
      def __call__(self, x, train):
        x = self.pre(x)
        x = mod.BatchNorm(use_running_average=not train)(x)
        x = mod.BatchNorm(use_running_average=not train, name="bn_named")(x)
        return mod.RMSNorm()(x)
    return Net()

  x = _x((3, 4))
  vf = jax.eval_shape(lambda k, x: net(nn).init(k, x, True), jax.random.key(0), x)
  vj = jax.eval_shape(lambda k, x: net(jnn).init(k, x, True), jax.random.key(0), x)
  assert shapes_dtypes(vj) == shapes_dtypes(vf)
  assert set(vj["params"]) == {"custom", "BatchNorm_0", "bn_named", "RMSNorm_0"}


def test_use_running_average_errors():
  x = _x((4, 3))
  bn = jnn.BatchNorm()
  with pytest.raises(ValueError):  # given nowhere (flax: same)
    bn.init(jax.random.key(0), x)
  with pytest.raises(ValueError):  # given twice (flax: same)
    jnn.BatchNorm(use_running_average=True).init(jax.random.key(0), x, use_running_average=True)
  v = bn.init(jax.random.key(0), x, use_running_average=True)
  with pytest.raises(TypeError, match="use_running_average"):
    jax.jit(lambda v, x, f: bn.apply(v, x, use_running_average=f))(v, x, True)


def test_checkpoints_load_both_ways():
  def model(mod):
    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, train):
        x = nn.Dense(8)(x)
        return (mod.BatchNorm(use_running_average=not train)(x) + mod.LayerNorm()(x)
                + mod.GroupNorm(num_groups=2)(x) + mod.RMSNorm()(x)
                + mod.InstanceNorm()(x.reshape(2, 3, 8)).reshape(6, 8))
    return Net()

  x = _x((6, 5))
  fm, jm = model(nn), model(jnn)
  init = lambda m, seed: jax.jit(lambda x: m.init(jax.random.key(seed), x, False))(x)
  train = lambda m, v: dict(v, **jax.jit(
      lambda v, x: m.apply(v, x, True, mutable=["batch_stats"])[1])(v, x))
  infer = lambda m, v: jax.jit(lambda v, x: m.apply(v, x, False))(v, x)
  vf = train(fm, init(fm, 0))  # non-trivial running averages
  vj = init(jm, 7)
  # flax -> jaxnorm
  loaded = serialization.from_bytes(vj, serialization.to_bytes(vf))
  jax.tree.map(np.testing.assert_array_equal, loaded, vf)
  np.testing.assert_allclose(infer(jm, loaded), infer(fm, vf), rtol=1e-5, atol=1e-5)
  # jaxnorm -> flax (state dicts)
  vj2 = train(jm, vj)
  back = serialization.from_state_dict(vf, serialization.to_state_dict(vj2))
  jax.tree.map(np.testing.assert_array_equal, back, vj2)
  np.testing.assert_allclose(infer(fm, back), infer(jm, vj2), rtol=1e-5, atol=1e-5)


def test_axis_index_groups_under_pmap(devices):
  """axis_name/axis_index_groups pass through: equal to flax under pmap (equal counts)."""
  x = _x((8, 3, 4), seed=5)
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  outs = []
  for mod in (nn, jnn):
    bn = mod.BatchNorm(use_running_average=False, axis_name="d", axis_index_groups=groups,
                       momentum=0.5, use_fast_variance=False)
    v = bn.init(jax.random.key(0), x[0])
    outs.append(jax.pmap(lambda x: bn.apply(v, x, mutable=["batch_stats"]), axis_name="d",
                         devices=devices)(x))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5), *outs)
  y, s = outs[1]
  ref = norm64(x[:4].reshape(12, 4), (0,), (1,), eps=1e-5).reshape(4, 3, 4)
  assert max_err(y[:4], ref) < 2e-5
  np.testing.assert_allclose(s["batch_stats"]["mean"][5],
                             0.5 * np.asarray(x[4:], np.float64).mean((0, 1)), atol=1e-6)


# ---------------------------------------------------------------- deliberate differences


def test_large_offset_statistics_are_accurate_whatever_use_fast_variance():
  """x = 1e4 + N(0, 1) in float32: jaxnorm matches the float64 reference with either
  setting of use_fast_variance (bit-identical: the field selects nothing)."""
  x = _x((64, 4), seed=2, loc=1e4, scale=1.0)
  xt = x.T  # (4, 64) for the per-example norms
  for cls, inp, red in (("BatchNorm", x, (0,)), ("LayerNorm", xt, (1,)),
                        ("InstanceNorm", x.reshape(2, 32, 4), (1,))):
    ys = []
    for fast in (True, False):
      m = getattr(jnn, cls)(use_fast_variance=fast)
      kw = dict(use_running_average=False, mutable=["batch_stats"]) if cls == "BatchNorm" else {}
      out = m.apply(m.init(jax.random.key(0), inp, **({"use_running_average": False}
                                                       if cls == "BatchNorm" else {})), inp, **kw)
      ys.append(out[0] if cls == "BatchNorm" else out)
    np.testing.assert_array_equal(ys[0], ys[1])
    eps = 1e-5 if cls == "BatchNorm" else 1e-6
    assert max_err(ys[0], norm64(inp, red, (), eps=eps)) < 1e-5, cls
  # the running mean keeps the offset's digits
  bn = jnn.BatchNorm(use_running_average=False, momentum=0.)
  _, s = bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  mean64, var64, _ = moments64(x, (0,))
  assert max_err(s["batch_stats"]["mean"], mean64[0]) < 2e-3
  assert max_err(s["batch_stats"]["var"], var64[0]) < 1e-3 * float(np.max(var64))


def test_reductions_are_float32_even_without_force_float32_reductions():
  """bf16 input, force_float32_reductions=False: flax reduces in bfloat16; jaxnorm in
  float32.  The batch_stats still get flax's dtype (param_dtype)."""
  x = _x((32, 4), seed=4, loc=100.0, scale=1.0, dtype=BF16)
  bn = jnn.BatchNorm(use_running_average=False, force_float32_reductions=False,
                     param_dtype=BF16, momentum=0.)
  v = bn.init(jax.random.key(0), x)
  assert v["batch_stats"]["mean"].dtype == BF16
  y, s = bn.apply(v, x, mutable=["batch_stats"])
  assert y.dtype == BF16
  ref = norm64(x, (0,), (), eps=1e-5)
  # only the final rounding to bfloat16 remains: |y| <= ~3, bf16 spacing 2^-7 there
  assert max_err(y, ref) <= 2 ** -7 + 1e-6
  # evaluation with bf16 running averages: var + eps and rsqrt in float32 too
  v = _randomize(v)
  ye = bn.clone(use_running_average=True).apply(v, x.astype(jnp.float32))
  bs, p = v["batch_stats"], v["params"]
  f64 = lambda a: np.asarray(a, np.float64)
  ref = ((f64(x) - f64(bs["mean"])) / np.sqrt(f64(bs["var"]) + 1e-5) * f64(p["scale"])
         + f64(p["bias"]))
  assert ye.dtype == jnp.float32 and max_err(ye, ref) < 1e-3
  ln = jnn.LayerNorm(force_float32_reductions=False, param_dtype=BF16, dtype=jnp.float32)
  yl = ln.apply(ln.init(jax.random.key(0), x.T), x.T)
  assert max_err(yl, norm64(x.T, (1,), (), eps=1e-6)) < 1e-4


def test_batch_of_one_and_empty_batch_use_running_averages():
  """degenerate="running" (default): no NaN, no bad update; "batch" restores flax."""
  x1 = _x((1, 4), seed=6)
  fl = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
  v = _randomize(fl.init(jax.random.key(0), x1))
  bs = v["batch_stats"]
  scale, bias = np.asarray(v["params"]["scale"], np.float64), np.asarray(v["params"]["bias"])
  eval_ref = ((np.asarray(x1, np.float64) - np.asarray(bs["mean"], np.float64))
              / np.sqrt(np.asarray(bs["var"], np.float64) + 1e-5) * scale + bias)
  y, s = jnn.BatchNorm(use_running_average=False).apply(v, x1, mutable=["batch_stats"])
  assert max_err(y, eval_ref) < 1e-5
  jax.tree.map(np.testing.assert_array_equal, s["batch_stats"], bs)
  # flax: a batch of one normalizes to the bias and pulls the variance towards 0
  yf, sf = fl.apply(v, x1, mutable=["batch_stats"])
  yb, sb = jnn.BatchNorm(use_running_average=False, degenerate="batch").apply(
      v, x1, mutable=["batch_stats"])
  assert max_err(yf, bias[None]) < 1e-6 and max_err(yb, yf) < 1e-6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), sb, sf)
  # all-masked batch: flax gives NaN everywhere; jaxnorm the running-average output
  x = _x((3, 4), seed=7)
  none = jnp.zeros((3, 1), bool)
  y, s = jnn.BatchNorm(use_running_average=False).apply(v, x, mask=none,
                                                        mutable=["batch_stats"])
  yev = jnn.BatchNorm(use_running_average=True).apply(v, x)
  np.testing.assert_array_equal(y, yev)
  jax.tree.map(np.testing.assert_array_equal, s["batch_stats"], bs)


def test_unbiased_var_option():
  x = _x((5, 3), seed=8)
  bn = jnn.BatchNorm(use_running_average=False, momentum=0.9, unbiased_var=True)
  _, s = bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  expected = 0.9 + 0.1 * np.var(np.asarray(x, np.float64), axis=0, ddof=1)
  np.testing.assert_allclose(s["batch_stats"]["var"], expected, rtol=1e-5)


def test_masked_statistics_across_devices_are_exact():
  """4 'devices' (vmap axis) with masks leaving 3, 1, 0 and 2 samples: jaxnorm equals
  the global masked batch; flax averages per-device means (and gets NaN from the
  empty device)."""
  x = _x((4, 3, 2), seed=9)
  mask = jnp.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1]], bool)[..., None]
  bn = jnn.BatchNorm(use_running_average=False, axis_name="d", momentum=0.)
  v = bn.init(jax.random.key(0), x[0])
  y, s = jax.vmap(lambda x, m: bn.apply(v, x, mask=m, mutable=["batch_stats"]),
                  axis_name="d")(x, mask)
  xf, mf = x.reshape(12, 2), mask.reshape(12, 1)
  assert max_err(y.reshape(12, 2), norm64(xf, (0,), (1,), eps=1e-5, mask=mf)) < 2e-5
  mean64, var64, _ = moments64(xf, (0,), mask=mf)
  assert max_err(s["batch_stats"]["mean"][2], mean64[0]) < 1e-6
  assert max_err(s["batch_stats"]["var"][2], var64[0]) < 2e-6


def test_mask_must_be_boolean():
  x = _x((4, 3))
  ln = jnn.LayerNorm()
  v = ln.init(jax.random.key(0), x)
  with pytest.raises(TypeError, match="boolean"):
    ln.apply(v, x, mask=jnp.ones((4, 3), jnp.int32))


def test_groupnorm_unbatched_reference():
  x = _x((4, 4, 6), seed=10)
  gn = jnn.GroupNorm(num_groups=3, reduction_axes=(0, 1, 2))
  y = gn.apply(gn.init(jax.random.key(0), x), x)
  assert max_err(y, group_norm64(x, 3, (0, 1, 2), eps=1e-6)) < 2e-5


def test_import_jaxnorm_does_not_import_flax():
  code = "import sys, jaxnorm; assert 'flax' not in sys.modules, sorted(sys.modules)"
  subprocess.run([sys.executable, "-c", code], check=True)
