"""Running-average conventions: PyTorch's cumulative average (momentum=None), Haiku's
zero-debiased EMA (debias=True) and PyTorch's unbiased running variance.

Each is checked against a float64 reference written from the framework's documented
formula (Haiku's hidden/average form, not jaxnorm's reformulation), and against
torch.nn.BatchNorm1d where torch has the convention.  The default path and the Flax
variable trees must stay exactly as before.
"""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm as jn
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx

C = 3


def batches(n=5, b=6, seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal((b, C)) * [1., 3., .5] + [2., -1., 10.]).astype(np.float32)
          for _ in range(n)]


# ----------------------------------------------------------------------------- references


def ref_cumulative(xs, unbiased=False):
  """torch momentum=None: running = (1 - 1/t) running + (1/t) batch, t = batches so far."""
  mean, var = np.zeros(C), np.ones(C)
  for t, x in enumerate(xs, 1):
    x = np.asarray(x, np.float64)
    bv = x.var(0, ddof=1 if unbiased else 0)
    f = 1.0 / t
    mean, var = (1 - f) * mean + f * x.mean(0), (1 - f) * var + f * bv
  return mean, var


def ref_haiku(xs, decay):
  """hk.ExponentialMovingAverage(decay, zero_debias=True) as hk.BatchNorm uses it:
  counter += 1; hidden -= (hidden - value) * (1 - decay); average = hidden / (1 - decay**counter)."""
  hidden_m, hidden_v, counter = np.zeros(C), np.zeros(C), 0
  for x in xs:
    x = np.asarray(x, np.float64)
    counter += 1
    hidden_m = hidden_m - (hidden_m - x.mean(0)) * (1 - decay)
    hidden_v = hidden_v - (hidden_v - x.var(0)) * (1 - decay)
  return hidden_m / (1 - decay ** counter), hidden_v / (1 - decay ** counter)


def run_core(xs, **kw):
  stats = jn.init_batch_stats(C, counted=True)
  step = jax.jit(lambda s, x: jn.batch_norm(x, s, training=True, **kw))
  for x in xs:
    _, stats = step(stats, x)
  return stats


# ----------------------------------------------------------------------------- core


@pytest.mark.parametrize("unbiased", [False, True])
def test_cumulative_matches_reference(unbiased):
  xs = batches()
  s = run_core(xs, momentum=None, unbiased_var=unbiased)
  mean, var = ref_cumulative(xs, unbiased)
  np.testing.assert_allclose(s.mean, mean, rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(s.var, var, rtol=2e-6)
  assert type(s) is jn.CountedBatchStats and s.count.dtype == jnp.int32
  np.testing.assert_array_equal(s.count, len(xs))
  # the plain average of the batch statistics, whatever the init
  all_means = np.stack([np.asarray(x, np.float64).mean(0) for x in xs])
  np.testing.assert_allclose(s.mean, all_means.mean(0), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_debiased_matches_haiku_formula(decay):
  xs = batches(n=6)
  s = run_core(xs, momentum=decay, debias=True)
  mean, var = ref_haiku(xs, decay)
  np.testing.assert_allclose(s.mean, mean, rtol=3e-6, atol=3e-6)
  np.testing.assert_allclose(s.var, var, rtol=3e-6)


def test_debias_limits():
  """decay -> 1 is the cumulative average; decay = 0 keeps the last batch; the first
  update replaces the initial values exactly."""
  xs = batches(n=4)
  near = run_core(xs, momentum=1.0, debias=True)
  cum = run_core(xs, momentum=None)
  np.testing.assert_allclose(near.mean, cum.mean, rtol=1e-6)
  np.testing.assert_allclose(run_core(xs, momentum=0.0, debias=True).mean,
                             np.asarray(xs[-1], np.float64).mean(0), rtol=1e-6)
  first = run_core(xs[:1], momentum=0.9, debias=True)
  m = jn.moments(jnp.asarray(xs[0]), axis=0)
  np.testing.assert_allclose(first.mean, m.mean, rtol=1e-6)  # w_0 = 1: the init is gone
  np.testing.assert_allclose(first.var, m.var, rtol=1e-6)


def test_counted_plain_ema_equals_default():
  """A CountedBatchStats with the default convention is today's EMA that counts."""
  xs = batches(n=3)
  plain = jn.init_batch_stats(C)
  counted = run_core(xs, momentum=0.9)
  for x in xs:
    _, plain = jn.batch_norm(jnp.asarray(x), plain, training=True, momentum=0.9)
  np.testing.assert_allclose(counted.mean, plain.mean, rtol=1e-6)  # jit vs eager rounding
  np.testing.assert_allclose(counted.var, plain.var, rtol=1e-6)
  np.testing.assert_array_equal(counted.count, 3)


def test_masked_features_keep_value_and_count():
  s0 = jn.CountedBatchStats(jnp.asarray([1., 2., 3.]), jnp.asarray([4., 5., 6.]),
                            jnp.asarray([2, 2, 2], jnp.int32))
  m = jn.Moments(jnp.asarray([10., 10., 10.]), jnp.asarray([1., 1., 1.]), jnp.full(3, 4.))
  s = jn.update_batch_stats(s0, m, momentum=None, where=jnp.array([True, False, True]))
  np.testing.assert_allclose(s.mean, [4., 2., 3 + 7 / 3], rtol=1e-6)
  np.testing.assert_array_equal(s.count, [3, 2, 3])
  # degenerate batch (one element) in batch_norm: running averages and count unchanged
  _, s1 = jn.batch_norm(jnp.ones((1, 3)), s0, training=True, momentum=None)
  np.testing.assert_array_equal(s1.count, s0.count)
  np.testing.assert_array_equal(s1.mean, s0.mean)


def test_scan_eval_and_bf16():
  xs = jnp.asarray(np.stack(batches(n=4)))

  def body(s, x):
    y, s = jn.batch_norm(x, s, training=True, momentum=0.9, debias=True)
    return s, y

  s, ys = jax.lax.scan(body, jn.init_batch_stats(C, counted=True), xs)
  assert type(s) is jn.CountedBatchStats
  mean, _ = ref_haiku(list(np.asarray(xs)), 0.9)
  np.testing.assert_allclose(s.mean, mean, rtol=3e-6, atol=3e-6)
  y, s_eval = jn.batch_norm(xs[0], s, training=False, debias=True, momentum=0.9)
  assert jax.tree.structure(s_eval) == jax.tree.structure(s)
  yb, sb = jn.batch_norm(xs[0].astype(jnp.bfloat16), s, training=True, momentum=None)
  assert yb.dtype == jnp.bfloat16 and sb.mean.dtype == jnp.float32 and sb.count.dtype == jnp.int32


def test_vmap_axis_name_equals_global():
  x = jnp.asarray(np.concatenate(batches(n=1, b=16)))
  s0 = jn.init_batch_stats(C, counted=True)
  _, whole = jn.batch_norm(x, s0, training=True, momentum=None, unbiased_var=True)
  _, split = jax.vmap(lambda xi: jn.batch_norm(xi, s0, training=True, momentum=None,
                                                unbiased_var=True, axis_name="d"),
                      axis_name="d")(x.reshape(8, 2, C))
  for a, b in zip(whole, split):
    np.testing.assert_allclose(b, np.broadcast_to(a, b.shape), rtol=1e-6)


def test_default_state_and_repr_unchanged():
  s = jn.init_batch_stats(2)
  assert type(s) is jn.BatchStats and s._fields == ("mean", "var")
  _, new = jn.batch_norm(jnp.ones((4, 2)), s, training=True)
  assert type(new) is jn.BatchStats
  assert repr(new).startswith("BatchStats(mean=")


# ----------------------------------------------------------------------------- errors


def test_errors():
  x = jnp.ones((4, C))
  with pytest.raises(TypeError, match=r"momentum=None \(cumulative average\).*count.*counted=True"):
    jn.batch_norm(x, jn.init_batch_stats(C), training=True, momentum=None)
  with pytest.raises(TypeError, match=r"debias=True.*counted=True"):
    jn.update_batch_stats(jn.init_batch_stats(C), jn.moments(x, axis=0), momentum=0.9,
                          debias=True)
  with pytest.raises(TypeError, match=r"tuple of length 2.*jaxnorm.BatchStats\(mean, var\)"):
    jn.batch_norm(x, (jnp.zeros(C), jnp.ones(C)), training=True)
  with pytest.raises(TypeError, match=r"tuple of length 2"):
    jn.batch_norm(x, (jnp.zeros(C), jnp.ones(C)), training=False)
  bad = jn.CountedBatchStats(jnp.zeros(C), jnp.ones(C), jnp.zeros(C))
  with pytest.raises(TypeError, match=r"count must be an integer array.*float32"):
    jn.batch_norm(x, bad, training=True, momentum=None)
  bad = jn.CountedBatchStats(jnp.zeros(C), jnp.ones(C), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match=r"count must be an integer array.*\(2,\)"):
    jn.batch_norm(x, bad, training=True, momentum=None)
  with pytest.raises(TypeError, match="debias must be a Python bool"):
    jn.batch_norm(x, jn.init_batch_stats(C, counted=True), training=True, debias="yes")


# ----------------------------------------------------------------------------- torch parity


@pytest.mark.parametrize("torch_momentum", [None, 0.1])
def test_torch_batchnorm1d_parity(torch_momentum):
  torch = pytest.importorskip("torch")
  xs = batches(n=5)
  tbn = torch.nn.BatchNorm1d(C, momentum=torch_momentum, eps=1e-5).double()
  tbn.train()
  stats = jn.init_batch_stats(C, counted=True)
  momentum = None if torch_momentum is None else 1 - torch_momentum
  step = jax.jit(lambda s, x: jn.batch_norm(x, s, training=True, momentum=momentum,
                                            unbiased_var=True))
  for x in xs:
    ty = tbn(torch.from_numpy(x.astype(np.float64))).detach().numpy()
    y, stats = step(stats, x)
    np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats.mean, tbn.running_mean.numpy(), rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(stats.var, tbn.running_var.numpy(), rtol=2e-6)
  np.testing.assert_array_equal(stats.count, int(tbn.num_batches_tracked))
  tbn.eval()
  ty = tbn(torch.from_numpy(xs[0].astype(np.float64))).detach().numpy()
  y, _ = jn.batch_norm(jnp.asarray(xs[0]), stats, training=False, momentum=momentum)
  np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- flax frontends


def test_linen_trees_and_cumulative():
  x = jnp.asarray(batches(n=1)[0])
  default = jnn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  flax_vars = fnn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, default) == jax.tree.map(jnp.shape, flax_vars)
  bn = jnn.BatchNorm(use_running_average=False, momentum=None, unbiased_var=True)
  v = bn.init(jax.random.key(0), x)
  assert set(v["batch_stats"]) == {"mean", "var", "count"}
  assert v["batch_stats"]["count"].dtype == jnp.int32
  xs = batches()
  apply = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
  for xb in xs:
    _, upd = apply(v, xb)
    v = {**v, **upd}
  mean, var = ref_cumulative(xs, unbiased=True)
  np.testing.assert_allclose(v["batch_stats"]["mean"], mean, rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(v["batch_stats"]["var"], var, rtol=2e-6)
  np.testing.assert_array_equal(v["batch_stats"]["count"], len(xs))


def test_nnx_state_and_debias():
  flax_bn = nnx.BatchNorm(C, rngs=nnx.Rngs(0))
  ours = jnnx.BatchNorm(C, rngs=nnx.Rngs(0))
  shapes = lambda m: jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(m)))
  assert shapes(ours) == shapes(flax_bn)
  bn = jnnx.BatchNorm(C, momentum=0.9, debias=True, rngs=nnx.Rngs(0))
  assert set(nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat))) == {"mean", "var", "count"}
  xs = batches(n=4)
  for xb in xs:
    bn(jnp.asarray(xb))
  mean, var = ref_haiku(xs, 0.9)
  np.testing.assert_allclose(bn.mean[...], mean, rtol=3e-6, atol=3e-6)
  np.testing.assert_allclose(bn.var[...], var, rtol=3e-6)
  np.testing.assert_array_equal(bn.count[...], 4)
