"""Conditional normalization against float64 references written from the papers: DiT's
modulate / AdaLN / AdaLN-Zero (Peebles & Xie 2023), FiLM (Perez et al. 2018) and
class-conditional batch norm: outputs, running averages and gradients; identity at
initialisation; one class == batch_norm; jit/vmap/bf16; cross-device conditional BN;
bad input; linen/NNX modules (a few optax steps, serialization round-trip)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnorm as jn

RNG = np.random.default_rng(0)
F64 = np.float64


# ----------------------------------------------------------------------------- references


def layout(p, x_shape, feat, xp=np):
  """(N, *fshape) per-sample rows laid out against x (batch axis 0)."""
  return xp.asarray(p, F64).reshape(
      tuple(d if (i == 0 or i in feat) else 1 for i, d in enumerate(x_shape)))


def modulate_ref(x, shift, scale, feat=(-1,), xp=np):
  x = xp.asarray(x, F64)
  feat = tuple(a % x.ndim for a in feat)
  return x * (1 + layout(scale, x.shape, feat, xp)) + layout(shift, x.shape, feat, xp)


def norm_ref(x, kind, *, eps, num_groups=None, xp=np):
  """Parameter-free layer/rms/instance/group norm of a channels-last input, float64."""
  x = xp.asarray(x, F64)
  if kind is None:
    return x
  if kind == "group":
    xg = x.reshape(x.shape[:-1] + (num_groups, x.shape[-1] // num_groups))
    red = tuple(range(1, x.ndim - 1)) + (xg.ndim - 1,)
    m = xg.mean(axis=red, keepdims=True)
    v = ((xg - m) ** 2).mean(axis=red, keepdims=True)
    return ((xg - m) / xp.sqrt(v + eps)).reshape(x.shape)
  red = {"layer": (-1,), "rms": (-1,), "instance": tuple(range(1, x.ndim - 1))}[kind]
  m = 0.0 if kind == "rms" else x.mean(axis=red, keepdims=True)
  v = ((x - m) ** 2).mean(axis=red, keepdims=True)
  return (x - m) / xp.sqrt(v + eps)


def cbn_ref(x, run_mean, run_var, labels, scale_t, bias_t, *, training, momentum, eps, xp=np):
  """Class-conditional BN, channels last: statistics over every axis but the last."""
  x = xp.asarray(x, F64)
  red = tuple(range(x.ndim - 1))
  if training:
    m, v = x.mean(axis=red), x.var(axis=red)
    new = (momentum * run_mean + (1 - momentum) * m, momentum * run_var + (1 - momentum) * v)
  else:
    m, v = xp.asarray(run_mean, F64), xp.asarray(run_var, F64)
    new = (run_mean, run_var)
  keep = (1,) * (x.ndim - 1) + (-1,)
  z = (x - m.reshape(keep)) / xp.sqrt(v.reshape(keep) + eps)
  s = layout(xp.asarray(scale_t, F64)[labels], x.shape, (x.ndim - 1,), xp)
  b = layout(xp.asarray(bias_t, F64)[labels], x.shape, (x.ndim - 1,), xp)
  return z * s + b, new


def silu(v):
  return v / (1 + np.exp(-v))


# ----------------------------------------------------------------------------- core


# (norm, x shape, extra kwargs); features last
NORM_CASES = [
    (None, (2, 3, 4), {}),
    ("layer", (3, 5, 4), {}),
    ("rms", (2, 3, 6), {}),
    ("instance", (2, 3, 3, 4), {}),
    ("group", (2, 3, 2, 6), {"num_groups": 3}),
]


@pytest.mark.parametrize("norm, shape, kw", NORM_CASES, ids=[str(c[0]) for c in NORM_CASES])
def test_adaptive_norm_matches_float64_reference(norm, shape, kw):
  x = RNG.standard_normal(shape) * 1.5 + 0.5
  shift = RNG.standard_normal((shape[0], shape[-1])) * 0.5
  scale = RNG.standard_normal((shape[0], shape[-1])) * 0.5
  g = RNG.standard_normal(shape)
  eps = 1e-6

  def ours(x, shift, scale):
    return jn.adaptive_norm(x, shift, scale, norm=norm, epsilon=eps, **kw)

  def ref(x, shift, scale, xp=jnp):
    return modulate_ref(norm_ref(x, norm, eps=eps, xp=xp, **kw), shift, scale, xp=xp)

  y32 = jax.jit(ours)(*(jnp.asarray(a, jnp.float32) for a in (x, shift, scale)))
  want = ref(x, shift, scale, xp=np)
  assert y32.dtype == jnp.float32
  np.testing.assert_allclose(y32, want, rtol=5e-6, atol=5e-6)
  with jax.enable_x64(True):
    a64 = [jnp.asarray(a, jnp.float64) for a in (x, shift, scale)]
    loss = lambda f: lambda *a: (f(*a) * g).sum()
    got = jax.jit(jax.grad(loss(ours), (0, 1, 2)))(*a64)
    exp = jax.jit(jax.grad(loss(ref), (0, 1, 2)))(*a64)
  for name, a, b in zip(("x", "shift", "scale"), got, exp):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10, err_msg=name)
  # zero modulation: exactly the plain normalizer
  zero = jnp.zeros((shape[0], shape[-1]))
  plain = {None: lambda x: x, "layer": jn.layer_norm, "rms": jn.rms_norm,
           "instance": jn.instance_norm,
           "group": lambda x: jn.group_norm(x, num_groups=kw.get("num_groups"))}[norm]
  xf = jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(jn.adaptive_norm(xf, zero, zero, norm=norm, **kw), plain(xf),
                             rtol=1e-6, atol=1e-6)


def test_modulate_and_gated_residual():
  x = RNG.standard_normal((3, 4, 5))
  shift, scale, gate = (RNG.standard_normal((3, 5)) for _ in range(3))
  h = RNG.standard_normal((3, 4, 5))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  np.testing.assert_allclose(jn.modulate(f32(x), f32(shift), f32(scale)),
                             modulate_ref(x, shift, scale), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jn.gated_residual(f32(x), f32(h), f32(gate)),
                             x + layout(gate, x.shape, (2,)) * h, rtol=1e-6, atol=1e-6)
  # a zero gate returns x bit for bit, whatever the branch computed
  np.testing.assert_array_equal(jn.gated_residual(f32(x), f32(h) * 1e30, jnp.zeros((3, 5))),
                                f32(x))
  # other layouts: feature shape (shared by all samples), rank-x arrays, NCHW
  np.testing.assert_allclose(jn.modulate(f32(x), f32(shift[0]), None),
                             x + shift[0], rtol=1e-6)
  xc = RNG.standard_normal((3, 5, 2, 2))
  np.testing.assert_allclose(jn.modulate(f32(xc), None, f32(scale), feature_axes=1),
                             xc * (1 + scale[:, :, None, None]), rtol=1e-6)
  with jax.enable_x64(True):
    a = [jnp.asarray(v, jnp.float64) for v in (x, h, gate, shift, scale)]
    f = lambda x, h, gate, shift, scale: jn.gated_residual(
        x, jn.modulate(h, shift, scale), gate).sum()
    r = lambda x, h, gate, shift, scale: (x + layout(gate, x.shape, (2,), jnp)
                                          * modulate_ref(h, shift, scale, xp=jnp)).sum()
    for u, v in zip(jax.jit(jax.grad(f, tuple(range(5))))(*a),
                    jax.jit(jax.grad(r, tuple(range(5))))(*a)):
      np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)
  # bf16: computed in float32, rounded once
  xb, sb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(scale, jnp.bfloat16)
  yb = jn.modulate(xb, None, sb)
  assert yb.dtype == jnp.bfloat16
  want = np.asarray(xb, F64) * (1 + np.asarray(sb, F64)[:, None, :])
  assert np.all(np.abs(np.asarray(yb, F64) - want) <= 2 ** -8 * np.abs(want) + 1e-30)
  # vmap over an extra leading axis
  ys = jax.vmap(lambda x: jn.modulate(x, f32(shift), f32(scale)))(jnp.stack([f32(x), f32(h)]))
  np.testing.assert_allclose(ys[1], modulate_ref(h, shift, scale), rtol=1e-6, atol=1e-6)


def test_adaptive_norm_bf16_and_mask():
  x = RNG.standard_normal((2, 6, 8)) + 3.0
  shift, scale = RNG.standard_normal((2, 8)), RNG.standard_normal((2, 8)) * 0.3
  xb = jnp.asarray(x, jnp.bfloat16)
  ada = jax.jit(jn.adaptive_norm, static_argnames="norm")
  y = ada(xb, jnp.asarray(shift, jnp.bfloat16), jnp.asarray(scale, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  r = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), F64)
  want = modulate_ref(norm_ref(r(x), "layer", eps=1e-6), r(shift), r(scale))
  assert np.abs(np.asarray(y, F64) - want).max() <= 2 ** -8 * np.abs(want).max() * 2
  # a mask selects the elements of the statistics (instance norm over padded tokens)
  where = np.arange(6)[None, :, None] < np.array([6, 4])[:, None, None]
  xf = jnp.asarray(x, jnp.float32)
  ym = ada(xf, shift, scale, norm="instance", where=where)
  np.testing.assert_allclose(ym[1, :4], ada(xf[1:, :4], shift[1:], scale[1:],
                                            norm="instance")[0], rtol=1e-5, atol=1e-5)


def test_conditional_batch_norm_matches_reference_and_batch_norm():
  x = RNG.standard_normal((6, 3, 4)) * 2 + 1
  labels = np.array([0, 2, 1, 2, 0, 1])
  st, bt = RNG.uniform(0.5, 2, (3, 4)), RNG.standard_normal((3, 4))
  rm, rv = RNG.standard_normal(4), RNG.uniform(0.5, 2, 4)
  stats = jn.BatchStats(jnp.asarray(rm, jnp.float32), jnp.asarray(rv, jnp.float32))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  for training in (True, False):
    y, new = jax.jit(lambda x, s, l, st, bt, training=training: jn.conditional_batch_norm(
        x, s, l, st, bt, training=training, momentum=0.9))(f32(x), stats, labels, f32(st), f32(bt))
    want, (nm, nv) = cbn_ref(x, rm, rv, labels, st, bt, training=training, momentum=0.9,
                             eps=1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean, nm, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.var, nv, rtol=1e-6, atol=1e-6)
    assert type(new) is jn.BatchStats and new.mean.dtype == jnp.float32
  # gradients w.r.t. x and both tables (classes absent from the batch get zero)
  g = RNG.standard_normal(x.shape)
  with jax.enable_x64(True):
    lab = np.array([0, 2, 0, 2, 0, 2])
    a = [jnp.asarray(v, jnp.float64) for v in (x, st, bt)]
    s64 = jn.BatchStats(jnp.asarray(rm), jnp.asarray(rv))
    ours = lambda x, st, bt: (jn.conditional_batch_norm(x, s64, lab, st, bt, training=True)[0]
                              * g).sum()
    ref = lambda x, st, bt: (cbn_ref(x, rm, rv, lab, st, bt, training=True, momentum=0.99,
                                     eps=1e-5, xp=jnp)[0] * g).sum()
    got, exp = jax.jit(jax.grad(ours, (0, 1, 2)))(*a), jax.jit(jax.grad(ref, (0, 1, 2)))(*a)
  for name, u, v in zip(("x", "scale_table", "bias_table"), got, exp):
    np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-10, err_msg=name)
  assert not np.any(got[1][1]) and not np.any(got[2][1])
  # one class: exactly batch_norm with that class's scale and bias
  y1, s1 = jn.conditional_batch_norm(f32(x), stats, np.zeros(6, np.int32), f32(st[:1]),
                                     f32(bt[:1]), training=True)
  y0, s0 = jn.batch_norm(f32(x), stats, f32(st[0]), f32(bt[0]), training=True)
  np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, s1, s0)


def test_conditional_batch_norm_across_devices_equals_global_batch(devices):
  x = jnp.asarray(RNG.standard_normal((16, 3)), jnp.float32)
  labels = jnp.asarray(RNG.integers(0, 4, 16), jnp.int32)
  where = jnp.asarray(RNG.random((16, 1)) < 0.7)
  st, bt = jnp.asarray(RNG.uniform(0.5, 2, (4, 3)), jnp.float32), jnp.zeros((4, 3))
  stats = jn.init_batch_stats(3)
  fn = lambda x, l, w, axis_name=None: jn.conditional_batch_norm(
      x, stats, l, st, bt, training=True, where=w, axis_name=axis_name)
  y, s = fn(x, labels, where)
  mesh = jax.make_mesh((8,), ("b",), devices=devices)
  P = jax.sharding.PartitionSpec
  spec = jax.sharding.NamedSharding(mesh, P("b"))
  ys, ss = jax.jit(jax.shard_map(lambda x, l, w: fn(x, l, w, axis_name="b"), mesh=mesh,
                                 in_specs=P("b"), out_specs=(P("b"), P())))(
      *(jax.device_put(a, spec) for a in (x, labels, where)))
  np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ss.mean, s.mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(ss.var, s.var, rtol=1e-5, atol=1e-7)


def test_traced_out_of_range_label_gives_nan_not_a_clamped_class():
  x = jnp.asarray(RNG.standard_normal((4, 2)), jnp.float32)
  st = jnp.ones((3, 2))
  y, _ = jax.jit(lambda l: jn.conditional_batch_norm(x, jn.init_batch_stats(2), l, st, None,
                                                     training=True))(jnp.array([0, 1, 5, 2]))
  assert np.all(np.isnan(y[2])) and np.all(np.isfinite(np.delete(np.asarray(y), 2, 0)))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: jn.conditional_batch_norm(jnp.ones((4, 2)), jn.init_batch_stats(2),
                                       jnp.array([0, 1, 3, 0]), jnp.ones((3, 2)), None,
                                       training=True),
     ValueError, r"labels must be in \[0, 3\).*got values in \[0, 3\]"),
    (lambda: jn.conditional_batch_norm(jnp.ones((4, 2)), jn.init_batch_stats(2),
                                       jnp.array([0., 1., 1., 0.]), jnp.ones((3, 2)), None,
                                       training=True),
     TypeError, r"labels must be an integer array"),
    (lambda: jn.conditional_batch_norm(jnp.ones((4, 2)), jn.init_batch_stats(2),
                                       jnp.array([0, 1]), jnp.ones((3, 2)), None,
                                       training=True),
     ValueError, r"labels must have shape \(4,\)"),
    (lambda: jn.conditional_batch_norm(jnp.ones((4, 2)), jn.init_batch_stats(2),
                                       jnp.array([0, 1, 1, 0]), jnp.ones((3, 5)), None,
                                       training=True),
     ValueError, r"scale_table has shape \(3, 5\), expected \(num_classes, 2\)"),
    (lambda: jn.conditional_batch_norm(jnp.ones((4, 2)), jn.init_batch_stats(2),
                                       jnp.array([0, 1, 1, 0]), jnp.ones((3, 2)),
                                       jnp.ones((2, 2)), training=True),
     ValueError, r"scale_table has 3 classes but bias_table has 2"),
    (lambda: jn.modulate(jnp.ones((4, 3, 2)), jnp.ones((3, 2))),
     ValueError, r"shift has shape \(3, 2\).*one row per sample \(4, 2\)"),
    (lambda: jn.adaptive_norm(jnp.ones((4, 3, 2)), None, jnp.ones((4, 3))),
     ValueError, r"scale has shape \(4, 3\)"),
    (lambda: jn.adaptive_norm(jnp.ones((4, 2)), norm="batch"),
     ValueError, r"norm must be one of"),
    (lambda: jn.gated_residual(jnp.ones((4, 2)), jnp.ones((4, 3)), jnp.ones((4, 2))),
     ValueError, r"h has shape \(4, 3\).*x has \(4, 2\)"),
])
def test_bad_input_raises_a_clear_error(call, exc, match):
  with pytest.raises(exc, match=match):
    call()


# ------------------------------------------------------------------------------ linen


def _linen_ref_projection(params, c, act):
  k, b = (np.asarray(params["projection"][n], F64) for n in ("kernel", "bias"))
  c = np.asarray(c, F64)
  return (act(c) if act else c) @ k + b


def test_linen_modules_match_reference_and_identity_at_init():
  import flax.linen as nn
  from jaxnorm import linen as jnn

  x = jnp.asarray(RNG.standard_normal((3, 5, 4)), jnp.float32)
  c = jnp.asarray(RNG.standard_normal((3, 6)), jnp.float32)
  key = jax.random.key(0)
  ln = np.asarray(jn.layer_norm(x), F64)
  # AdaLN-Zero: zero projection, zero gate; a DiT-style block is the identity at init
  ada0 = jnn.AdaLNZero()
  v0 = jax.jit(ada0.init)(key, x, c)
  assert jax.tree.map(jnp.shape, v0) == {"params": {"projection": {"kernel": (6, 12),
                                                                   "bias": (12,)}}}
  h, gate = jax.jit(ada0.apply)(v0, x, c)
  np.testing.assert_allclose(h, ln, rtol=1e-6, atol=1e-6)
  assert gate.shape == (3, 1, 4) and not np.any(gate)

  class DiTBlock(nn.Module):
    @nn.compact
    def __call__(self, x, c):
      h, gate = jnn.AdaLNZero(name="mod_attn")(x, c)
      x = jn.gated_residual(x, nn.MultiHeadDotProductAttention(num_heads=2)(h), gate)
      h, gate = jnn.AdaLNZero(name="mod_mlp")(x, c)
      return x + gate * nn.Dense(4)(nn.gelu(nn.Dense(8)(h)))

  blk = DiTBlock()
  np.testing.assert_array_equal(jax.jit(blk.apply)(jax.jit(blk.init)(key, x, c), x, c), x)
  # random projections: outputs against the float64 reference (DiT chunk order)
  for mod, k, act, norm in ((jnn.AdaLNZero(kernel_init=nn.initializers.normal(0.3)), 3,
                             silu, "layer"),
                            (jnn.AdaLN(), 2, silu, "layer"),
                            (jnn.FiLM(), 2, None, None),
                            (jnn.FiLM(norm="rms"), 2, None, "rms")):
    v = jax.jit(mod.init)(key, x, c)
    p = _linen_ref_projection(v["params"], c, act)
    chunks = np.split(p, k, axis=1)
    shift, scale = (chunks[1], chunks[0]) if isinstance(mod, jnn.FiLM) else chunks[:2]
    want = modulate_ref(norm_ref(x, norm, eps=1e-6), shift, scale)
    out = jax.jit(mod.apply)(v, x, c)
    y = out[0] if k == 3 else out
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5, err_msg=type(mod).__name__)
    if k == 3:
      np.testing.assert_allclose(out[1], layout(chunks[2], x.shape, (2,)), rtol=1e-5, atol=1e-6)
  # FiLM / AdaLN with a zero projection: the plain normalizer (FiLM without norm: x)
  z = dict(kernel_init=nn.initializers.zeros)
  for mod, want in ((jnn.FiLM(**z), x), (jnn.FiLM(norm="layer", **z), ln),
                    (jnn.AdaLN(**z), ln)):
    np.testing.assert_allclose(jax.jit(mod.apply)(jax.jit(mod.init)(key, x, c), x, c), want, rtol=1e-6,
                               atol=1e-6)
  # conditional batch norm with one class is BatchNorm, variables included (scale (1, C))
  cbn = jnn.ConditionalBatchNorm(num_classes=1, momentum=0.9)
  bn = jnn.BatchNorm(momentum=0.9)
  labels = jnp.zeros(3, jnp.int32)
  vc, vb = cbn.init(key, x, labels, False), bn.init(key, x, False)
  assert jax.tree.map(jnp.shape, vc) == {"params": {"scale": (1, 4), "bias": (1, 4)},
                                         "batch_stats": {"mean": (4,), "var": (4,)}}
  yc, uc = cbn.apply(vc, x, labels, False, mutable=["batch_stats"])
  yb, ub = bn.apply(vb, x, False, mutable=["batch_stats"])
  np.testing.assert_allclose(yc, yb, rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, uc, ub)
  ye = cbn.apply({**vc, **uc}, x, labels, use_running_average=True)
  np.testing.assert_allclose(ye, bn.apply({**vb, **ub}, x, use_running_average=True),
                             rtol=1e-6, atol=1e-6)


def test_linen_bad_condition_is_a_clear_error():
  from jaxnorm import linen as jnn
  x, key = jnp.ones((3, 5, 4)), jax.random.key(0)
  with pytest.raises(ValueError, match=r"`cond` must have shape \(3, cond_features\).*rank 3"):
    jnn.AdaLNZero().init(key, x, jnp.ones((3, 1, 6)))
  with pytest.raises(ValueError, match=r"`cond` has 2 rows but the input has batch size 3"):
    jnn.FiLM().init(key, x, jnp.ones((2, 6)))
  with pytest.raises(TypeError, match=r"cond must be a floating array"):
    jnn.AdaLN().init(key, x, jnp.ones((3, 6), jnp.int32))
  v = jnn.AdaLN().init(key, x, jnp.ones((3, 6)))
  with pytest.raises(Exception):  # the Dense kernel no longer fits: flax's shape error
    jnn.AdaLN().apply(v, x, jnp.ones((3, 7)))
  with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
    jnn.ConditionalBatchNorm(num_classes=2, use_running_average=False).init(
        key, x, jnp.array([0, 1, 2]))


def test_linen_conditional_model_trains_and_round_trips():
  import flax.linen as nn
  from flax import serialization
  from jaxnorm import linen as jnn

  x = jnp.asarray(RNG.standard_normal((6, 4, 4, 3)), jnp.float32)
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  target = jnp.asarray(RNG.standard_normal((6, 5, 8)), jnp.float32)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, labels, train: bool):
      x = nn.Conv(8, (3, 3))(x)
      x = jnn.ConditionalBatchNorm(num_classes=3, use_running_average=not train)(x, labels)
      c = nn.Embed(3, 6)(labels)
      t = nn.Dense(8)(x.reshape(6, -1, 8)[:, :5])  # (N, 5 tokens, 8)
      h, gate = jnn.AdaLNZero()(t, c)
      t = t + gate * nn.Dense(8)(h)
      return jnn.FiLM(norm="layer")(t, c)

  net = Net()
  variables = jax.jit(net.init, static_argnums=3)(jax.random.key(0), x, labels, False)
  tx = optax.adam(1e-2)
  state = dict(variables, opt=tx.init(variables["params"]))

  @jax.jit
  def step(state):
    def loss(params):
      out, upd = net.apply({"params": params, "batch_stats": state["batch_stats"]}, x, labels,
                           True, mutable=["batch_stats"])
      return jnp.mean((out - target) ** 2), upd["batch_stats"]
    (l, bs), g = jax.value_and_grad(loss, has_aux=True)(state["params"])
    upd, opt = tx.update(g, state["opt"], state["params"])
    return dict(params=optax.apply_updates(state["params"], upd), batch_stats=bs, opt=opt), l

  losses = []
  for _ in range(6):
    state, l = step(state)
    losses.append(float(l))
  assert losses[-1] < losses[0]
  assert np.any(state["params"]["AdaLNZero_0"]["projection"]["kernel"])  # left zero init
  assert not np.allclose(state["batch_stats"]["ConditionalBatchNorm_0"]["var"], 1.0)
  restored = serialization.from_bytes(jax.tree.map(jnp.zeros_like, state),
                                      serialization.to_bytes(state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  ev = jax.jit(lambda s: net.apply({"params": s["params"], "batch_stats": s["batch_stats"]},
                                   x, labels, False))
  np.testing.assert_array_equal(ev(restored), ev(state))


# -------------------------------------------------------------------------------- NNX


def test_nnx_modules_match_linen_identity_at_init_and_errors():
  from flax import nnx
  from jaxnorm import linen as jnn
  from jaxnorm import nnx as jnnx

  x = jnp.asarray(RNG.standard_normal((3, 5, 4)), jnp.float32)
  c = jnp.asarray(RNG.standard_normal((3, 6)), jnp.float32)
  ada0 = jnnx.AdaLNZero(4, 6, rngs=nnx.Rngs(0))
  h, gate = ada0(x, c)
  np.testing.assert_allclose(h, jn.layer_norm(x), rtol=1e-6, atol=1e-6)
  assert gate.shape == (3, 1, 4) and not np.any(gate)
  for ncls, lcls, kw in ((jnnx.AdaLNZero, jnn.AdaLNZero, {}), (jnnx.AdaLN, jnn.AdaLN, {}),
                         (jnnx.FiLM, jnn.FiLM, {}),
                         (jnnx.FiLM, jnn.FiLM, {"norm": "instance"})):
    m = ncls(4, 6, rngs=nnx.Rngs(1), **kw)
    m.projection.kernel[...] = jnp.asarray(RNG.standard_normal(m.projection.kernel[...].shape)
                                           * 0.3, jnp.float32)
    m.projection.bias[...] = jnp.asarray(RNG.standard_normal(m.projection.bias[...].shape)
                                         * 0.3, jnp.float32)
    params = {"projection": {"kernel": m.projection.kernel[...],
                             "bias": m.projection.bias[...]}}
    got, want = m(x, c), lcls(**kw).apply({"params": params}, x, c)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)
  with pytest.raises(ValueError, match=r"`cond` has 7 features but the module was built with "
                                       r"cond_features=6"):
    ada0(x, jnp.ones((3, 7)))
  with pytest.raises(ValueError, match=r"`cond` must have shape \(3, 6\)"):
    ada0(x, jnp.ones((6,)))
  with pytest.raises(ValueError, match=r"built with num_features=4"):
    ada0(jnp.ones((3, 5, 5)), c)
  with pytest.raises(ValueError, match=r"norm must be one of"):
    jnnx.FiLM(4, 6, norm="batch", rngs=nnx.Rngs(0))
  # conditional batch norm: one class equals BatchNorm; train/eval; bad labels
  cbn = jnnx.ConditionalBatchNorm(4, 1, momentum=0.9, rngs=nnx.Rngs(0))
  bn = jnnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))
  labels = jnp.zeros(3, jnp.int32)
  np.testing.assert_allclose(cbn(x, labels), bn(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(cbn.var[...], bn.var[...])
  cbn.eval()
  bn.eval()
  np.testing.assert_allclose(cbn(x, labels), bn(x), rtol=1e-6, atol=1e-6)
  with pytest.raises(TypeError, match="labels must be an integer array"):
    cbn(x, jnp.zeros(3))
  with pytest.raises(ValueError, match="num_classes must be a positive int"):
    jnnx.ConditionalBatchNorm(4, 0, rngs=nnx.Rngs(0))


def test_nnx_conditional_model_trains_and_round_trips():
  from flax import nnx, serialization
  from jaxnorm import nnx as jnnx

  x = jnp.asarray(RNG.standard_normal((6, 5, 8)), jnp.float32)
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  target = jnp.asarray(RNG.standard_normal((6, 5, 8)), jnp.float32)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(3, 6, rngs=rngs)
      self.cbn = jnnx.ConditionalBatchNorm(8, 3, rngs=rngs)
      self.mod = jnnx.AdaLNZero(8, 6, rngs=rngs)
      self.mlp = nnx.Linear(8, 8, rngs=rngs)
      self.film = jnnx.FiLM(8, 6, norm="layer", rngs=rngs)

    def __call__(self, x, labels):
      c = self.embed(labels)
      x = self.cbn(x, labels)
      h, gate = self.mod(x, c)
      return self.film(x + gate * self.mlp(h), c)

  model = Net(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss(model):
      return jnp.mean((model(x, labels) - target) ** 2)
    l, g = nnx.value_and_grad(loss)(model)
    opt.update(model, g)
    return l

  losses = [float(step(model, opt)) for _ in range(6)]
  assert losses[-1] < losses[0]
  assert np.any(model.mod.projection.kernel[...])
  model.eval()
  state = nnx.to_pure_dict(nnx.state(model))
  restored = serialization.from_bytes(jax.tree.map(jnp.zeros_like, state),
                                      serialization.to_bytes(state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  fresh = Net(nnx.Rngs(5))
  fresh.eval()
  st = nnx.state(fresh)
  nnx.replace_by_pure_dict(st, restored)
  nnx.update(fresh, st)
  np.testing.assert_array_equal(fresh(x, labels), model(x, labels))
