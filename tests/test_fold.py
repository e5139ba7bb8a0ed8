"""Batch-norm folding: float64 reference, exactness of folded layers on real trained
weights (linen and NNX), PyTorch's fuse_*_bn_weights parity, and errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jaxnorm as jn

RNG = np.random.default_rng(0)


def bn_params(c, rng=RNG):
  """Non-trivial evaluation-mode batch norm numbers (float32)."""
  f = lambda *v: np.asarray(v[0], np.float32)
  return (jn.BatchStats(mean=f(rng.normal(size=c) * 2), var=f(rng.uniform(0.1, 3, size=c))),
          f(rng.normal(size=c)), f(rng.normal(size=c)))


def ref_affine(stats, scale, bias, eps):
  """float64: BN(z) = a z + c."""
  m, v = (np.asarray(t, np.float64) for t in stats)
  a = np.asarray(scale, np.float64) / np.sqrt(v + eps)
  return a, np.asarray(bias, np.float64) - m * a


def conv(x, w, *, groups=1, padding="VALID", transpose=False, strides=1):
  nd = w.ndim - 2
  dn = lax.conv_dimension_numbers(x.shape, w.shape,
                                  ("N" + "DHW"[3 - nd:] + "C", "DHW"[3 - nd:] + "IO",
                                   "N" + "DHW"[3 - nd:] + "C"))
  if transpose:
    return np.asarray(lax.conv_transpose(x, w, (strides,) * nd, padding, dimension_numbers=dn,
                                         precision="highest"))
  return np.asarray(lax.conv_general_dilated(x, w, (strides,) * nd, padding,
                                             dimension_numbers=dn, feature_group_count=groups,
                                             precision="highest"))


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("case", ["dense", "conv1d", "conv2d", "conv3d", "grouped", "depthwise"])
def test_fold_preceding_matches_reference_and_output(case):
  rng = np.random.default_rng(1)
  cin, cout, groups = {"grouped": (4, 6, 2), "depthwise": (3, 6, 3)}.get(case, (3, 5, 1))
  window = {"dense": (), "conv1d": (3,), "conv3d": (2, 2, 2)}.get(case, (3, 3))
  w = rng.normal(size=window + (cin // groups, cout)).astype(np.float32)
  b = rng.normal(size=cout).astype(np.float32)
  stats, g, beta = bn_params(cout, rng)
  eps = 1e-3
  k2, b2 = (np.asarray(v) for v in jn.fold_batch_norm(w, b, stats, g, beta, epsilon=eps))
  a, c = ref_affine(stats, g, beta, eps)
  np.testing.assert_allclose(k2, w.astype(np.float64) * a, rtol=2e-7, atol=0)
  np.testing.assert_allclose(b2, b * a + c, rtol=1e-6, atol=1e-6)
  assert k2.dtype == w.dtype and b2.dtype == b.dtype and k2.shape == w.shape
  x = rng.normal(size=(2,) + (5,) * len(window) + (cin,)).astype(np.float32)
  lin = (lambda w: x @ w) if case == "dense" else (lambda w: conv(x, w, groups=groups))
  y_ref = (np.asarray(lin(w), np.float64) + b) * a + c
  assert rel_err(lin(k2) + b2, y_ref) < 2e-6


def test_fold_preceding_conv_transpose_both_kernel_layouts():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  stats, g, beta = bn_params(5, rng)
  a, c = ref_affine(stats, g, beta, 1e-5)
  w = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)  # (*window, in, out)
  y_ref = np.asarray(conv(x, w, transpose=True, strides=2), np.float64) * a + c
  k2, b2 = (np.asarray(v) for v in jn.fold_batch_norm(w, None, stats, g, beta))
  assert rel_err(conv(x, k2, transpose=True, strides=2) + b2, y_ref) < 2e-6
  # transpose_kernel=True layout (*window, out, in): the output axis is -2
  wt = np.ascontiguousarray(np.swapaxes(w, -1, -2))
  k3, b3 = jn.fold_batch_norm(wt, None, stats, g, beta, out_axis=-2)
  np.testing.assert_array_equal(np.swapaxes(k3, -1, -2), k2)
  np.testing.assert_array_equal(b3, b2)


@pytest.mark.parametrize("case", ["dense", "conv_valid", "grouped_valid", "conv_circular",
                                  "same_1x1"])
def test_fold_following_matches_output(case):
  rng = np.random.default_rng(3)
  groups = 2 if case == "grouped_valid" else 1
  cin, cout = 4, 6
  window = () if case == "dense" else ((1, 1) if case == "same_1x1" else (3, 3))
  padding = {"conv_circular": "CIRCULAR", "same_1x1": "SAME"}.get(case, "VALID")
  w = rng.normal(size=window + (cin // groups, cout)).astype(np.float32)
  b = rng.normal(size=cout).astype(np.float32)
  stats, g, beta = bn_params(cin, rng)
  eps = 1e-5
  k2, b2 = (np.asarray(v) for v in jn.fold_batch_norm_into_next(
      w, b, stats, g, beta, epsilon=eps, feature_group_count=groups, padding=padding))
  a, c = ref_affine(stats, g, beta, eps)
  x = rng.normal(size=(2, 6, 6, cin)).astype(np.float32) * 3 + 1
  z = (x * a + c).astype(np.float32)  # BN(x) in float32
  if case == "dense":
    y_ref, y = z @ w + b, x @ k2 + b2
  elif case == "conv_circular":
    wrap = lambda v: np.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")
    y_ref, y = conv(wrap(z), w) + b, conv(wrap(x), k2) + b2
  else:
    y_ref = conv(z, w, groups=groups, padding=padding) + b
    y = conv(x, k2, groups=groups, padding=padding) + b2
  assert rel_err(y, y_ref) < 3e-6
  # the kernel: a[i] scales input channel i of its group
  a_j = a.reshape(groups, cin // groups).T  # (in_g, groups)
  w_r = w.reshape(window + (cin // groups, groups, cout // groups)).astype(np.float64)
  np.testing.assert_allclose(np.asarray(k2).reshape(w_r.shape), w_r * a_j[:, :, None],
                             rtol=2e-7)


def test_fold_jit_no_bias_bf16_and_x64():
  rng = np.random.default_rng(4)
  stats, g, beta = bn_params(4, rng)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.bfloat16)
  k2, b2 = jax.jit(jn.fold_batch_norm)(w, None, stats, g, beta)
  assert k2.dtype == jnp.bfloat16 and b2.dtype == jnp.bfloat16 and b2.shape == (4,)
  a, c = ref_affine(stats, g, beta, 1e-5)
  np.testing.assert_allclose(np.asarray(k2, np.float64),
                             np.asarray(w, np.float64) * a, rtol=2 ** -8)
  np.testing.assert_allclose(np.asarray(b2, np.float64), c, rtol=2 ** -8, atol=1e-2)
  # no scale/bias on the BN; float64 stays float64
  with jax.enable_x64(True):
    w64 = jnp.asarray(rng.normal(size=(4, 4)))
    k3, b3 = jn.fold_batch_norm(w64, None, jn.BatchStats(*(jnp.asarray(t, jnp.float64)
                                                           for t in stats)))
    a0, c0 = ref_affine(stats, np.ones(4), np.zeros(4), 1e-5)
    assert k3.dtype == jnp.float64
    np.testing.assert_allclose(k3, np.asarray(w64) * a0, rtol=1e-14)
    np.testing.assert_allclose(b3, c0, rtol=1e-14)


def test_fold_errors():
  stats, g, beta = bn_params(4)
  w = np.ones((3, 3, 4, 6), np.float32)
  with pytest.raises(ValueError, match=r"padding='SAME'.*reads zero padding.*VALID"):
    jn.fold_batch_norm_into_next(w, None, stats, g, beta, padding="SAME")
  with pytest.raises(ValueError, match=r"padding=\(\(1, 1\), \(1, 1\)\)"):
    jn.fold_batch_norm_into_next(w, None, stats, g, beta, padding=((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="input_dilation=2 inserts zeros"):
    jn.fold_batch_norm_into_next(w, None, stats, g, beta, input_dilation=2)
  with pytest.raises(ValueError, match=r"has 6 channels.*must be \(6,\)"):
    jn.fold_batch_norm(w, None, stats, g, beta)  # BN over 4 features, conv has 6 outputs
  with pytest.raises(ValueError, match="feature_group_count=4 must divide the kernel's 6"):
    jn.fold_batch_norm_into_next(w, None, stats, g, beta, feature_group_count=4)
  with pytest.raises(ValueError, match="epsilon must be >= 0"):
    jn.fold_batch_norm(np.ones((2, 4), np.float32), None, stats, epsilon=-1.0)
  with pytest.raises(TypeError, match="kernel must be a floating array"):
    jn.fold_batch_norm(np.ones((2, 4), np.int32), None, stats)
  with pytest.raises(TypeError, match="stats must be a jaxnorm.BatchStats"):
    jn.fold_batch_norm(np.ones((2, 4), np.float32), None, {"mean": 0})
  with pytest.raises(ValueError, match=r"the layer's bias has shape \(3,\)"):
    jn.fold_batch_norm(np.ones((2, 4), np.float32), np.ones(3, np.float32), stats)


def test_fold_matches_torch_fuse_weights():
  torch = pytest.importorskip("torch")
  from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights
  rng = np.random.default_rng(5)
  stats, g, beta = bn_params(6, rng)
  t = lambda a: torch.from_numpy(np.asarray(a, np.float32))
  eps = 1e-3
  # Conv2d: torch OIHW, groups=2
  w = rng.normal(size=(6, 2, 3, 3)).astype(np.float32)
  b = rng.normal(size=6).astype(np.float32)
  tw, tb = fuse_conv_bn_weights(t(w), t(b), t(stats.mean), t(stats.var), eps, t(g), t(beta))
  k2, b2 = jn.fold_batch_norm(jn.conv_kernel_from_torch(w), b, stats, g, beta, epsilon=eps)
  np.testing.assert_allclose(jn.conv_kernel_to_torch(k2), tw.detach().numpy(), rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(b2, tb.detach().numpy(), rtol=1e-6, atol=1e-6)
  # Linear without bias
  w = rng.normal(size=(6, 5)).astype(np.float32)
  tw, tb = fuse_linear_bn_weights(t(w), None, t(stats.mean), t(stats.var), eps, t(g), t(beta))
  k2, b2 = jn.fold_batch_norm(jn.conv_kernel_from_torch(w), None, stats, g, beta, epsilon=eps)
  np.testing.assert_allclose(k2.T, tw.detach().numpy(), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(b2, tb.detach().numpy(), rtol=1e-6, atol=1e-6)
  # ConvTranspose2d: torch (in, out, kH, kW); flax transpose_kernel=True layout, out axis -2
  w = rng.normal(size=(3, 6, 2, 2)).astype(np.float32)
  tw, tb = fuse_conv_bn_weights(t(w), t(b), t(stats.mean), t(stats.var), eps, t(g), t(beta),
                                transpose=True)
  k2, b2 = jn.fold_batch_norm(jn.conv_kernel_from_torch(w), b, stats, g, beta, epsilon=eps,
                              out_axis=-2)
  np.testing.assert_allclose(jn.conv_kernel_to_torch(k2), tw.detach().numpy(), rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(b2, tb.detach().numpy(), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- linen, trained


@functools.lru_cache(maxsize=None)
def trained_linen_cnn():
  """A small CNN with jaxnorm.linen.BatchNorm trained for 25 steps on sklearn digits."""
  import flax.linen as nn
  from sklearn.datasets import load_digits

  from jaxnorm import linen as jnn

  class Net(nn.Module):
    folded: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
      bn = lambda name: (lambda h: h) if self.folded else jnn.BatchNorm(
          use_running_average=not train, momentum=0.8, epsilon=1e-3, name=name)
      x = nn.relu(bn("bn1")(nn.Conv(8, (3, 3), use_bias=self.folded, name="conv1")(x)))
      x = nn.relu(bn("bn2")(nn.Conv(8, (3, 3), feature_group_count=4, name="conv2")(x)))
      x = bn("bn3")(nn.ConvTranspose(6, (2, 2), strides=(2, 2), name="up")(x))
      x = x.reshape(x.shape[0], -1)
      x = nn.relu(bn("bn4")(nn.Dense(16, name="fc1")(x)))
      return nn.Dense(10, name="out")(x)

  digits = load_digits()
  x = (digits.images[:, :, :, None] / 16.0).astype(np.float32)
  y = digits.target
  model = Net()
  variables = jax.jit(model.init)(jax.random.key(0), x[:2])  # eager init is slow
  tx = optax.adam(3e-3)
  params, stats = variables["params"], variables["batch_stats"]
  opt = tx.init(params)

  @jax.jit
  def step(params, stats, opt, xb, yb):
    def loss(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, xb, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd
    (l, upd), gr = jax.value_and_grad(loss, has_aux=True)(params)
    u, opt = tx.update(gr, opt)
    return optax.apply_updates(params, u), upd["batch_stats"], opt, l

  rng = np.random.default_rng(0)
  for _ in range(25):
    idx = rng.choice(len(x), 64, replace=False)
    params, stats, opt, l = step(params, stats, opt, x[idx], y[idx])
  return Net, {"params": params, "batch_stats": stats}, x[:256], float(l)


def test_linen_fold_trained_cnn_exact():
  Net, variables, x, loss = trained_linen_cnn()
  assert loss < 1.6  # it trained (chance: log(10) = 2.3)
  stats = variables["batch_stats"]
  assert float(jnp.max(jnp.abs(stats["bn1"]["mean"]))) > 1e-2  # non-trivial running stats
  from jaxnorm import linen as jnn
  y0 = jax.jit(Net().apply)(variables, x)
  pairs = [("conv1", "bn1"), ("conv2", "bn2"), ("up", "bn3"), ("fc1", "bn4")]
  folded = jnn.fold_batch_norms(variables, pairs, epsilon=1e-3)
  assert "batch_stats" not in folded and set(folded["params"]) == {"conv1", "conv2", "up",
                                                                   "fc1", "out"}
  assert "bn1" in variables["params"]  # input untouched
  y1 = jax.jit(Net(folded=True).apply)(folded, x)
  err = rel_err(y1, y0)
  assert err < 1e-5, err
  # the shapes are exactly what the BN-free model initialises
  shapes = jax.tree.map(jnp.shape, jax.eval_shape(Net(folded=True).init, jax.random.key(0),
                                                  x[:1]))
  assert jax.tree.map(jnp.shape, folded) == shapes


def test_linen_fold_errors_and_per_bn_epsilon():
  from jaxnorm import linen as jnn
  Net, variables, x, _ = trained_linen_cnn()
  with pytest.raises(KeyError, match="no batch norm batch_stats.*'bn9'"):
    jnn.fold_batch_norms(variables, [("conv1", "bn9")])
  with pytest.raises(KeyError, match="no 'kernel'"):
    jnn.fold_batch_norms(variables, [("bn1", "bn1")])
  with pytest.raises(ValueError, match="appears in two pairs"):
    jnn.fold_batch_norms(variables, [("conv1", "bn1"), ("conv2", "bn1")])
  # a mapping of epsilons: a wrong one for bn1 changes the result, the default 1e-5 too
  f1 = jnn.fold_batch_norms(variables, [("conv1", "bn1")], epsilon={"bn1": 1e-3})
  f2 = jnn.fold_batch_norms(variables, [("conv1", "bn1")])
  assert "bn2" in f1["batch_stats"] and "bn1" not in f1["params"]
  assert not np.allclose(f1["params"]["conv1"]["kernel"], f2["params"]["conv1"]["kernel"],
                         rtol=1e-7, atol=0)


# ----------------------------------------------------------------------------- NNX


def test_nnx_fold_in_place_exact():
  from flax import nnx

  from jaxnorm import nnx as jnnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
      self.bn = jnnx.BatchNorm(8, momentum=0.5, rngs=rngs)
      self.dw = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
      self.bns = nnx.List([nnx.BatchNorm(8, momentum=0.5, epsilon=1e-3, rngs=rngs)])
      self.up = nnx.ConvTranspose(8, 4, (2, 2), strides=(2, 2), transpose_kernel=True,
                                  rngs=rngs)
      self.bn3 = jnnx.BatchNorm(4, momentum=0.5, use_scale=False, rngs=rngs)
      self.fc = nnx.Linear(4, 3, rngs=rngs)
      self.bn4 = jnnx.BatchNorm(3, momentum=0.5, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.bn(self.conv(x)))
      x = nnx.relu(self.bns[0](self.dw(x)))
      x = self.bn3(self.up(x))
      return self.bn4(self.fc(x))

  model = Net(nnx.Rngs(0))
  rng = np.random.default_rng(6)
  call = nnx.jit(lambda m, x: m(x))
  for _ in range(4):  # training-mode steps: non-trivial running statistics
    call(model, jnp.asarray(rng.normal(size=(8, 6, 6, 3)) * 2 + 1, jnp.float32))
  # make the affine parameters non-trivial too
  for bn in (model.bn, model.bns[0], model.bn4):
    bn.scale[...] = jnp.asarray(rng.uniform(0.5, 2, size=bn.scale.shape), jnp.float32)
    bn.bias[...] = jnp.asarray(rng.normal(size=bn.bias.shape), jnp.float32)
  model.eval()
  x = jnp.asarray(rng.normal(size=(4, 6, 6, 3)) * 2 + 1, jnp.float32)
  y0 = call(model, x)
  out = jnnx.fold_batch_norms(model, [("conv", "bn"), ("dw", "bns/0"), ("up", "bn3"),
                                      ("fc", "bn4")])
  assert out is model
  assert isinstance(model.bn, jnnx.Identity) and isinstance(model.bns[0], jnnx.Identity)
  assert model.conv.use_bias and model.conv.bias[...].shape == (8,)
  assert rel_err(call(model, x), y0) < 1e-5  # jitted
  assert rel_err(model(x), y0) < 1e-5
  with pytest.raises(ValueError, match="already folded"):
    jnnx.fold_batch_norms(model, [("conv", "bn")])
  with pytest.raises(KeyError, match="no batch norm at 'nope'"):
    jnnx.fold_batch_norms(model, [("conv", "nope")])
  with pytest.raises(TypeError, match="without a kernel"):
    jnnx.fold_batch_norms(Net(nnx.Rngs(1)), [("bn", "bn3")])


def test_benchmark_case_runs_and_agrees(capsys):
  pytest.importorskip("flax")
  from jaxnorm import benchmarks
  argv = ["--tiny", "--rounds", "2", "--max-seconds", "0", "--quiet", "--cases", "^fold/",
          "--competitors", "floor,jaxnorm,flax.linen,flax.nnx,torch"]
  assert benchmarks.main(argv) == 0
  out = capsys.readouterr().out
  assert "fold/conv3x3+bn+relu/eval/nhwc" in out and "BN folding speed-up" in out
  assert "DIFFERS:" not in out  # the folded block computes what the unfolded ones do
  assert out.count(" ok") >= 3
