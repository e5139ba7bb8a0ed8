"""Population statistics (PreciseBN): the accumulator against float64 NumPy, across
devices, under lax.scan, and the linen/NNX helpers on a small model against a float64
reference and against torch.optim.swa_utils.update_bn."""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx

C = 3


def data(n=4, b=8, seed=0, offset=1e3):
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal((b, C)) * [1., 2., .1] + offset
           + rng.standard_normal(C)).astype(np.float32) for _ in range(n)]


def accumulate(xs, masks=None):
  acc = jn.init_population_stats(C)
  upd = jax.jit(lambda a, x, w: jn.update_population_stats(a, jn.moments(x, axis=0, where=w)))
  for i, x in enumerate(xs):
    acc = upd(acc, x, None if masks is None else masks[i])
  return acc


def ref(xs, masks=None):
  """float64: total mean/var of every included element; count-weighted batch variances."""
  xs = [np.asarray(x, np.float64) for x in xs]
  masks = masks or [np.ones_like(x, bool) for x in xs]
  out = {}
  for c in range(C):
    per = [x[m[:, c], c] for x, m in zip(xs, masks)]
    allv = np.concatenate(per)
    n = len(allv)
    out.setdefault("mean", []).append(allv.mean())
    out.setdefault("total", []).append(allv.var())
    out.setdefault("total_u", []).append(allv.var(ddof=1))
    out.setdefault("batch", []).append(sum(len(p) * p.var() for p in per if len(p)) / n)
    out.setdefault("batch_u", []).append(
        sum(len(p) * p.var(ddof=1) for p in per if len(p) > 1) / n)
  return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("masked", [False, True])
def test_accumulator_matches_float64(masked):
  xs = data()
  rng = np.random.default_rng(1)
  masks = [rng.random((8, C)) < 0.6 for _ in xs] if masked else None
  if masked:
    masks[2][:, 0] = False  # a batch that contributes nothing to feature 0
  acc = accumulate(xs, masks)
  r = ref(xs, masks)
  np.testing.assert_allclose(acc.count, sum(m.sum(0) for m in masks) if masked else 32)
  for variance, unbiased, key in [("total", False, "total"), ("total", True, "total_u"),
                                  ("batch", False, "batch"), ("batch", True, "batch_u")]:
    s = jn.population_batch_stats(acc, variance=variance, unbiased=unbiased)
    assert type(s) is jn.BatchStats
    # Means near 1e3 in float32 are known to half an ulp (3e-5) per batch; the total
    # variance's between-batch part sum n_b delta_b^2 inherits ~2 |delta| * 3e-5.
    np.testing.assert_allclose(s.mean, r["mean"], rtol=2e-7, atol=0)
    np.testing.assert_allclose(s.var, r[key], rtol=2e-5, atol=2e-4 if variance == "total" else 0,
                               err_msg=f"{variance} {unbiased}")


def test_order_free_and_scan():
  xs = data(n=6)
  acc = accumulate(xs)
  rev = accumulate(xs[::-1])
  for a, b in zip(acc, rev):  # m2 within float32 rounding of the means near 1e3
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)

  def body(a, x):
    return jn.update_population_stats(a, jn.moments(x, axis=0)), None

  scanned, _ = jax.lax.scan(body, jn.init_population_stats(C), jnp.asarray(np.stack(xs)))
  for a, b in zip(acc, scanned):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-4)


def test_empty_features_fall_back():
  acc = jn.init_population_stats(2)
  s = jn.population_batch_stats(acc, fallback=jn.BatchStats(jnp.array([5., 6.]),
                                                            jnp.array([7., 8.])))
  np.testing.assert_array_equal(s.mean, [5., 6.])
  np.testing.assert_array_equal(s.var, [7., 8.])
  np.testing.assert_array_equal(jn.population_batch_stats(acc).var, [1., 1.])


def test_across_devices_equals_global(devices):
  xs = data(n=3, b=16)
  rng = np.random.default_rng(2)
  masks = [rng.random((16, C)) < 0.5 for _ in xs]  # unequal counts per device
  whole = accumulate(xs, masks)
  mesh = jax.sharding.Mesh(np.array(devices), ("d",))

  @jax.jit
  def step(a, x, w):
    f = jax.shard_map(lambda x, w: jn.update_population_stats(
        a, jn.moments(x, axis=0, where=w, axis_name="d")), mesh=mesh,
        in_specs=(P("d"), P("d")), out_specs=P())
    return f(x, w)

  acc = jn.init_population_stats(C)
  for x, w in zip(xs, masks):
    acc = step(acc, x, w)
  for a, b in zip(acc, whole):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  vm = jn.init_population_stats(C)
  for x, w in zip(xs, masks):
    vm = jax.vmap(lambda x, w: jn.update_population_stats(
        vm, jn.moments(x, axis=0, where=w, axis_name="d")), axis_name="d")(
            x.reshape(8, 2, C), w.reshape(8, 2, C))
    vm = jax.tree.map(lambda v: v[0], vm)
  for a, b in zip(vm, whole):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_errors():
  acc = jn.init_population_stats(C)
  with pytest.raises(ValueError, match=r"batch mean has shape \(2,\).*feature shape \(3,\)"):
    jn.update_population_stats(acc, jn.moments(jnp.ones((4, 2)), axis=0))
  with pytest.raises(TypeError, match="jaxnorm.Moments"):
    jn.update_population_stats(acc, (jnp.ones(C), jnp.ones(C), jnp.ones(C)))
  with pytest.raises(TypeError, match="PopulationStats"):
    jn.population_batch_stats(jn.init_batch_stats(C))
  with pytest.raises(ValueError, match="variance must be one of"):
    jn.population_batch_stats(acc, variance="ema")
  with pytest.raises(TypeError, match="floating"):
    jn.init_population_stats(C, jnp.int32)


# ----------------------------------------------------------------------------- models

D_IN, H = 4, 5


class LinenNet(fnn.Module):
  momentum: float | None = 0.9

  @fnn.compact
  def __call__(self, x, train: bool):
    x = fnn.Dense(H)(x)
    x = jnn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)
    x = jax.nn.relu(x)
    x = fnn.Dense(H)(x)
    x = jnn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)
    return x


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(D_IN, H, rngs=rngs)
    self.bn1 = jnnx.BatchNorm(H, momentum=0.9, rngs=rngs)
    self.l2 = nnx.Linear(H, H, rngs=rngs)
    self.bn2 = jnnx.BatchNorm(H, momentum=None, rngs=rngs)  # counted: count is restored

  def __call__(self, x):
    return self.bn2(self.l2(jax.nn.relu(self.bn1(self.l1(x)))))


def model_batches(n=5, b=8, seed=3):
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal((b, D_IN)) * 2 + 1).astype(np.float32) for _ in range(n)]


def ref_model_stats(p, xs, variance="total", unbiased=False):
  """float64 PreciseBN of the two-layer net (training mode, batch statistics)."""
  w1, b1, s1, c1 = (np.asarray(p[k], np.float64) for k in ("w1", "b1", "s1", "c1"))
  w2, b2 = np.asarray(p["w2"], np.float64), np.asarray(p["b2"], np.float64)
  z1s, z2s = [], []
  for x in xs:
    z1 = np.asarray(x, np.float64) @ w1 + b1
    h = np.maximum((z1 - z1.mean(0)) / np.sqrt(z1.var(0) + 1e-5) * s1 + c1, 0)
    z1s.append(z1)
    z2s.append(h @ w2 + b2)
  out = []
  for zs in (z1s, z2s):
    allz = np.concatenate(zs)
    if variance == "total":
      var = allz.var(0, ddof=1 if unbiased else 0)
    else:
      var = np.mean([z.var(0, ddof=1 if unbiased else 0) for z in zs], 0)
    out.append((allz.mean(0), var))
  return out


def linen_params(v):
  p = v["params"]
  return dict(w1=p["Dense_0"]["kernel"], b1=p["Dense_0"]["bias"],
              s1=p["BatchNorm_0"]["scale"], c1=p["BatchNorm_0"]["bias"],
              w2=p["Dense_1"]["kernel"], b2=p["Dense_1"]["bias"])


@pytest.mark.parametrize("variance,unbiased", [("total", False), ("batch", True)])
def test_linen_helper_matches_float64(variance, unbiased):
  xs = model_batches()
  net = LinenNet()
  v = net.init(jax.random.key(0), xs[0], train=False)
  # some EMA training first, so the running averages differ from the answer
  _, upd = net.apply(v, xs[0], train=True, mutable=["batch_stats"])
  v = {**v, **upd}
  new = jnn.precise_batch_stats(net.apply, v, xs, apply_kwargs={"train": True},
                                variance=variance, unbiased=unbiased)
  assert jax.tree.structure(new) == jax.tree.structure(v)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), v)
  want = ref_model_stats(linen_params(v), xs, variance, unbiased)
  for name, (m, var) in zip(("BatchNorm_0", "BatchNorm_1"), want):
    np.testing.assert_allclose(new["batch_stats"][name]["mean"], m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"][name]["var"], var, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(new["params"]["Dense_0"]["kernel"], v["params"]["Dense_0"]["kernel"])


def test_linen_errors_and_no_cost_by_default():
  xs = model_batches(n=1)
  net = LinenNet()
  v = net.init(jax.random.key(0), xs[0], train=False)
  with pytest.raises(ValueError, match="training mode"):
    jnn.precise_batch_stats(net.apply, v, xs, apply_kwargs={"train": False})
  with pytest.raises(ValueError, match="batches is empty"):
    jnn.precise_batch_stats(net.apply, v, [], apply_kwargs={"train": True})
  # nothing is sown unless the collection is mutable; the default tree is flax's
  _, upd = net.apply(v, xs[0], train=True, mutable=["batch_stats"])
  assert set(upd) == {"batch_stats"}
  assert set(v["batch_stats"]["BatchNorm_0"]) == {"mean", "var"}


def test_nnx_helper_matches_linen_and_restores():
  xs = model_batches()
  model = NnxNet(nnx.Rngs(0))
  model.train()
  model(xs[0])  # one EMA step: the running averages and the count move
  count_before = model.bn2.count[...]
  p = dict(w1=model.l1.kernel[...], b1=model.l1.bias[...], s1=model.bn1.scale[...],
           c1=model.bn1.bias[...], w2=model.l2.kernel[...], b2=model.l2.bias[...])
  model.eval()
  jnnx.precise_batch_stats(model, xs)
  assert model.bn1.use_running_average and model.bn2.use_running_average
  np.testing.assert_array_equal(model.bn2.count[...], count_before)
  want = ref_model_stats(p, xs)
  for bn, (m, var) in zip((model.bn1, model.bn2), want):
    np.testing.assert_allclose(bn.mean[...], m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.var[...], var, rtol=1e-4, atol=1e-6)
  assert not any(hasattr(m, "batch_moments") for _, m in nnx.iter_modules(model))
  model(xs[0])  # plain calls stay hook-free (eval mode)


def test_torch_update_bn_parity():
  torch = pytest.importorskip("torch")
  from torch.optim.swa_utils import update_bn
  xs = model_batches(n=4)
  net = LinenNet()
  v = net.init(jax.random.key(1), xs[0], train=False)
  p = linen_params(v)
  tnet = torch.nn.Sequential(torch.nn.Linear(D_IN, H), torch.nn.BatchNorm1d(H),
                             torch.nn.ReLU(), torch.nn.Linear(H, H), torch.nn.BatchNorm1d(H))
  with torch.no_grad():
    tnet[0].weight.copy_(torch.from_numpy(np.asarray(p["w1"]).T.copy()))
    tnet[0].bias.copy_(torch.from_numpy(np.array(p["b1"])))
    tnet[3].weight.copy_(torch.from_numpy(np.asarray(p["w2"]).T.copy()))
    tnet[3].bias.copy_(torch.from_numpy(np.array(p["b2"])))
  update_bn([torch.from_numpy(x) for x in xs], tnet)
  new = jnn.precise_batch_stats(net.apply, v, xs, apply_kwargs={"train": True},
                                variance="batch", unbiased=True)
  for name, bn in (("BatchNorm_0", tnet[1]), ("BatchNorm_1", tnet[4])):
    np.testing.assert_allclose(new["batch_stats"][name]["mean"], bn.running_mean.numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"][name]["var"], bn.running_var.numpy(),
                               rtol=1e-4, atol=1e-6)
