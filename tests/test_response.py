"""Filter Response Normalization + TLU against a float64 reference written from the paper
(Singh & Krishnan 2019, arXiv:1911.09737): outputs and gradients (x, scale, bias, tau,
learned epsilon), masks, no batch dependence, jit/vmap/bf16, axis_name, bad input, and
the linen/NNX modules (variables, a few optax steps, serialization round-trip)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnorm as jn

RNG = np.random.default_rng(0)


def frn_ref(x, scale, bias, tau, *, red, feat, where=None, eps=1e-6, learned=None, xp=np):
  """The paper's FRN + TLU in float64: nu2 = mean over `red` of x^2 (included elements);
  a statistic with no included element outputs bias (as every jaxnorm normalizer)."""
  x = xp.asarray(x, np.float64)
  nd = x.ndim
  lay = lambda p: None if p is None else xp.asarray(p, np.float64).reshape(
      tuple(d if i in feat else 1 for i, d in enumerate(x.shape)))
  w = xp.ones(x.shape, bool) if where is None else xp.broadcast_to(xp.asarray(where), x.shape)
  n = xp.sum(w, axis=red, keepdims=True).astype(np.float64)
  nu2 = xp.sum(xp.where(w, x * x, 0.0), axis=red, keepdims=True) / xp.where(n > 0, n, 1.0)
  e = eps if learned is None else eps + xp.abs(xp.asarray(learned, np.float64).reshape(()))
  y = xp.where(n > 0, x / xp.sqrt(nu2 + e), 0.0)
  if scale is not None:
    y = y * lay(scale)
  if bias is not None:
    y = y + lay(bias)
  if tau is not None:
    y = xp.maximum(y, lay(tau))
  assert y.ndim == nd
  return y


def _params(fshape, *, with_tau=True):
  scale = RNG.uniform(0.5, 2.0, fshape)
  bias = RNG.standard_normal(fshape) * 0.5
  tau = RNG.standard_normal(fshape) * 0.5 if with_tau else None
  return scale, bias, tau


# (name, x shape, feature_axes, reduction axes, mask kind, learned epsilon)
CASES = [
    ("nhwc", (3, 4, 5, 6), -1, (1, 2), None, None),
    ("nchw", (2, 3, 4, 5), 1, (2, 3), None, None),
    ("fc_1x1", (4, 6), -1, (), None, np.array([3e-3])),
    ("masked", (3, 7, 4), -1, (1,), "pad", None),
    ("learned_eps", (2, 2, 2, 3), -1, (1, 2), None, np.array([-0.05])),
]


def _mask(kind, shape):
  if kind is None:
    return None
  lengths = [shape[1], 3, 0][:shape[0]]  # a full sample, a padded one and an empty one
  return (np.arange(shape[1])[None, :] < np.asarray(lengths)[:, None])[:, :, None]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_float64_reference(case):
  _, shape, fa, red, mask_kind, learned = case
  x = RNG.standard_normal(shape) * 2.0 + 0.3
  feat = (fa % len(shape),)
  fshape = tuple(shape[a] for a in feat)
  scale, bias, tau = _params(fshape)
  where = _mask(mask_kind, shape)
  eps = 1e-6 if learned is None else 1e-4
  g = RNG.standard_normal(shape)

  def loss(f, x, scale, bias, tau, learned):
    return (f(x, scale, bias, tau, learned) * g).sum()

  def ours(x, scale, bias, tau, learned):
    return jn.filter_response_norm(x, scale, bias, tau=tau, feature_axes=fa, where=where,
                                   epsilon=eps, learned_epsilon=learned)

  def ref(x, scale, bias, tau, learned):
    return frn_ref(x, scale, bias, tau, red=red, feat=feat, where=where, eps=eps,
                   learned=learned, xp=jnp)

  argnums = (0, 1, 2, 3) if learned is None else (0, 1, 2, 3, 4)
  args32 = [jnp.asarray(a, jnp.float32) if a is not None else None
            for a in (x, scale, bias, tau, learned)]
  y32 = jax.jit(ours)(*args32)
  y_np = frn_ref(x, scale, bias, tau, red=red, feat=feat, where=where, eps=eps, learned=learned)
  assert y32.dtype == jnp.float32
  np.testing.assert_allclose(y32, y_np, rtol=2e-6, atol=2e-6)
  with jax.enable_x64(True):
    args64 = [None if a is None else jnp.asarray(a, jnp.float64)
              for a in (x, scale, bias, tau, learned)]
    grads = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums))(*args64)
    want = jax.jit(jax.grad(lambda *a: loss(ref, *a), argnums))(*args64)
    y64 = ours(*args64)
  np.testing.assert_allclose(y64, y_np, rtol=1e-12, atol=1e-12)
  for name, a, b in zip("x scale bias tau learned_epsilon".split(), grads, want):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10, err_msg=name)
  if mask_kind == "pad":  # the empty sample outputs max(bias, tau), with zero dx
    np.testing.assert_allclose(y32[2], np.broadcast_to(np.maximum(bias, tau), (7, 4)),
                               rtol=1e-6)
    assert not np.any(grads[0][2])
  if learned is not None:
    assert abs(float(grads[4][0])) > 0  # the learned epsilon gets a gradient


def test_masked_positions_do_not_change_the_statistic():
  x = RNG.standard_normal((2, 6, 3)).astype(np.float32)
  where = np.ones((2, 6, 1), bool)
  where[:, 4:] = False
  poked = x.copy()
  poked[:, 4:] = 1e6  # garbage in the padding
  y = jn.filter_response_norm(x, where=where)
  y_poked = jn.filter_response_norm(poked, where=where)
  np.testing.assert_array_equal(y[:, :4], y_poked[:, :4])
  np.testing.assert_allclose(y[:, :4], jn.filter_response_norm(x[:, :4]), rtol=1e-6)


def test_no_batch_dependence_jit_vmap_and_tlu():
  x = jnp.asarray(RNG.standard_normal((4, 3, 3, 2)), jnp.float32)
  scale, bias, tau = (jnp.asarray(p, jnp.float32) for p in _params((2,)))
  f = jax.jit(lambda x: jn.filter_response_norm(x, scale, bias, tau=tau))
  y = f(x)
  np.testing.assert_allclose(f(x[1:2]), y[1:2], rtol=1e-6)  # one sample alone: same output
  np.testing.assert_allclose(f(x.at[0].set(100.0))[1:], y[1:], rtol=0, atol=0)
  np.testing.assert_allclose(jn.filter_response_norm(x, scale, bias, tau=tau), y, rtol=1e-6)
  xs = jnp.stack([x, 3 * x + 1])
  ys = jax.vmap(lambda x: jn.filter_response_norm(x, scale, bias, tau=tau))(xs)
  np.testing.assert_allclose(ys[1], f(3 * x + 1), rtol=1e-6, atol=1e-6)
  # tau= is jn.tlu after FRN
  np.testing.assert_allclose(y, jn.tlu(jn.filter_response_norm(x, scale, bias), tau),
                             rtol=1e-6, atol=1e-7)
  assert float(jnp.min(y - tau.reshape(1, 1, 1, 2))) >= 0


def test_bfloat16_input():
  x = RNG.standard_normal((2, 4, 4, 3)) * 3.0
  scale, bias, tau = _params((3,))
  xb = jnp.asarray(x, jnp.bfloat16)
  y = jn.filter_response_norm(xb, jnp.asarray(scale, jnp.bfloat16),
                              jnp.asarray(bias, jnp.bfloat16), tau=jnp.asarray(tau, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  r = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
  want = frn_ref(r(x), r(scale), r(bias), r(tau), red=(1, 2), feat=(3,))
  err = np.abs(np.asarray(y, np.float64) - want)
  assert np.all(err <= 2 ** -8 * (np.abs(want) + 1e-3)), err.max()  # one bf16 rounding
  gx = jax.grad(lambda x: jn.filter_response_norm(x, tau=jnp.zeros(3)).astype(jnp.float32).sum())(xb)
  assert gx.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(gx)))


def test_axis_name_over_a_split_spatial_axis_equals_the_whole(devices):
  x = jnp.asarray(RNG.standard_normal((2, 8, 3, 4)), jnp.float32)
  where = jnp.asarray(RNG.random((2, 8, 3, 1)) < 0.6)
  scale, bias, tau = (jnp.asarray(p, jnp.float32) for p in _params((4,)))
  whole = jn.filter_response_norm(x, scale, bias, tau=tau, where=where)
  split = jax.vmap(lambda xc, wc: jn.filter_response_norm(
      xc, scale, bias, tau=tau, where=wc, reduction_axes=1, axis_name="s"),
      in_axes=1, out_axes=1, axis_name="s")(x, where)
  np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-6)
  # and on the 8 devices with shard_map
  mesh = jax.make_mesh((8,), ("s",), devices=devices)
  P, put = jax.sharding.PartitionSpec, jax.device_put
  spec = jax.sharding.NamedSharding(mesh, P(None, "s"))
  sharded = jax.jit(jax.shard_map(
      lambda xc, wc: jn.filter_response_norm(xc, scale, bias, tau=tau, where=wc,
                                             reduction_axes=(1, 2), axis_name="s"),
      mesh=mesh, in_specs=(P(None, "s"), P(None, "s")), out_specs=P(None, "s")))(
          put(x, spec), put(where, spec))
  np.testing.assert_allclose(sharded, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(tau=jnp.zeros(5)), ValueError, r"tau has shape \(5,\).*feature shape \(3,\)"),
    (dict(scale=jnp.zeros((2, 3))), ValueError, r"scale has shape \(2, 3\)"),
    (dict(learned_epsilon=jnp.ones(3)), ValueError, r"learned_epsilon must be a single number"),
    (dict(learned_epsilon=jnp.ones((), jnp.int32)), TypeError, r"learned_epsilon must be a floating"),
    (dict(reduction_axes=(1, 3)), ValueError, r"axes \[3\] are in both reduction_axes"),
    (dict(feature_axes=0), ValueError, r"axis 0 is the batch axis"),
    (dict(feature_axes=4), ValueError, r"feature_axes 4 is out of range"),
    (dict(epsilon=-1.0), ValueError, r"epsilon must be >= 0"),
    (dict(where=jnp.ones((2, 4, 4, 3))), TypeError, r"mask `where` must be boolean"),
])
def test_bad_input_raises_a_clear_error(kwargs, exc, match):
  x = jnp.ones((2, 4, 4, 3))
  with pytest.raises(exc, match=match):
    jn.filter_response_norm(x, **kwargs)


def test_bad_input_tlu_and_dtype():
  with pytest.raises(TypeError, match="must be a floating array"):
    jn.filter_response_norm(jnp.ones((2, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"tau has shape \(2,\)"):
    jn.tlu(jnp.ones((4, 3)), jnp.zeros(2))
  with pytest.raises(TypeError, match="tau is required"):
    jn.tlu(jnp.ones((4, 3)), None)


# ------------------------------------------------------------------------------ modules


def test_linen_module_variables_output_and_training():
  import flax.linen as nn
  from flax import serialization
  from jaxnorm import linen as jnn

  x = jnp.asarray(RNG.standard_normal((4, 5, 5, 2)), jnp.float32)
  frn = jnn.FilterResponseNorm(use_learned_epsilon=True)
  v = frn.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v) == {"params": {
      "scale": (2,), "bias": (2,), "tau": (2,), "learned_epsilon": (1,)}}
  np.testing.assert_allclose(v["params"]["learned_epsilon"], [1e-4])
  p = {k: jnp.asarray(RNG.standard_normal(s.shape), jnp.float32) for k, s in v["params"].items()}
  y = frn.apply({"params": p}, x)
  want = frn_ref(x, p["scale"], p["bias"], p["tau"], red=(1, 2), feat=(3,), eps=1e-6,
                 learned=p["learned_epsilon"])
  np.testing.assert_allclose(y, want, rtol=2e-6, atol=2e-6)
  plain = jnn.FilterResponseNorm(use_tlu=False, use_bias=False, feature_axes=1)
  assert jax.tree.map(jnp.shape, plain.init(jax.random.key(0), x)) == {"params": {"scale": (5,)}}

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = jnn.FilterResponseNorm()(nn.Conv(4, (3, 3), use_bias=False)(x))
      x = jnn.FilterResponseNorm(use_learned_epsilon=True)(nn.Dense(6)(x.mean(axis=(1, 2))))
      return nn.Dense(3)(x)

  labels = jnp.array([0, 1, 2, 1])
  net = Net()
  params = net.init(jax.random.key(1), x)["params"]
  tx = optax.adam(3e-2)
  state = (params, tx.init(params))

  @jax.jit
  def step(state):
    params, opt = state
    def loss(params):
      return optax.softmax_cross_entropy_with_integer_labels(net.apply({"params": params}, x),
                                                             labels).mean()
    l, g = jax.value_and_grad(loss)(params)
    upd, opt = tx.update(g, opt, params)
    return (optax.apply_updates(params, upd), opt), l, g

  losses = []
  for _ in range(6):
    state, l, g = step(state)
    losses.append(float(l))
  assert losses[-1] < losses[0]
  assert float(jnp.abs(g["FilterResponseNorm_1"]["learned_epsilon"]).max()) > 0
  assert float(jnp.abs(g["FilterResponseNorm_0"]["tau"]).max()) > 0
  blob = serialization.to_bytes(state[0])
  restored = serialization.from_bytes(jax.tree.map(jnp.zeros_like, state[0]), blob)
  jax.tree.map(np.testing.assert_array_equal, restored, state[0])
  np.testing.assert_array_equal(net.apply({"params": restored}, x),
                                net.apply({"params": state[0]}, x))


def test_nnx_module_matches_linen_and_trains():
  from flax import nnx, serialization
  from jaxnorm import linen as jnn
  from jaxnorm import nnx as jnnx

  x = jnp.asarray(RNG.standard_normal((3, 4, 4, 2)), jnp.float32)
  m = jnnx.FilterResponseNorm(2, use_learned_epsilon=True, rngs=nnx.Rngs(0))
  for name in ("scale", "bias", "tau", "learned_epsilon"):
    getattr(m, name)[...] = jnp.asarray(RNG.standard_normal(getattr(m, name)[...].shape),
                                        jnp.float32)
  params = {k: getattr(m, k)[...] for k in ("scale", "bias", "tau", "learned_epsilon")}
  lin = jnn.FilterResponseNorm(use_learned_epsilon=True)
  np.testing.assert_array_equal(m(x), lin.apply({"params": params}, x))
  none = jnnx.FilterResponseNorm(2, use_tlu=False, use_scale=False, rngs=nnx.Rngs(0))
  assert set(nnx.to_pure_dict(nnx.state(none, nnx.Param))) == {"bias"}

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 4, (3, 3), use_bias=False, rngs=rngs)
      self.frn = jnnx.FilterResponseNorm(4, use_learned_epsilon=True, rngs=rngs)
      self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(self.frn(self.conv(x)).mean(axis=(1, 2)))

  labels = jnp.array([0, 1, 2])
  model = Net(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()
    l, g = nnx.value_and_grad(loss)(model)
    opt.update(model, g)
    return l

  eps0 = float(model.frn.learned_epsilon[...][0])
  losses = [float(step(model, opt)) for _ in range(6)]
  assert losses[-1] < losses[0]
  assert float(model.frn.learned_epsilon[...][0]) != eps0  # trained
  state = nnx.to_pure_dict(nnx.state(model))
  restored = serialization.from_bytes(jax.tree.map(jnp.zeros_like, state),
                                      serialization.to_bytes(state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  fresh = Net(nnx.Rngs(7))
  nnx.replace_by_pure_dict(st := nnx.state(fresh), restored)
  nnx.update(fresh, st)
  np.testing.assert_array_equal(fresh(x), model(x))
