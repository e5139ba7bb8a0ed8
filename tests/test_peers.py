"""Parity with the systems users come from, on the same inputs: flax.linen (and one
flax.nnx check), and torch.nn.functional where installed (skipped cleanly otherwise).

Flax runs with ``use_fast_variance=False`` (its two-pass variance): parity is about
semantics (axes, masks, momentum, epsilon, parameter layout), not about flax's
default cancellation-prone variance (see test_numerics.py for that).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn

nn = pytest.importorskip("flax.linen")

RTOL = ATOL = 2e-5


def _close(a, b, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol,
                             atol=atol)


def _x(shape, seed=0, offset=1.5):
  return jnp.asarray(offset + np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _mask(shape, keep=np.s_[:2], seed=1):
  """A random mask with ``m[keep] = True`` so that every statistic keeps >= 2 elements:
  flax gives NaN for empty groups, and a group of one has variance 0, where the output is
  (x - mean) / sqrt(eps) and any rounding in the variance is amplified by 1/eps."""
  m = np.random.default_rng(seed).random(shape) < 0.75
  m[keep] = True
  return jnp.asarray(m)


def _randomize(params, seed=2):
  """Replace flax's ones/zeros initial parameters with random ones of the same shapes."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.uniform(0.5, 1.5, p.shape), p.dtype), params)


def _flax(module, x, mask=None, **call_kw):
  variables = module.init(jax.random.key(0), x)
  variables = {**variables, "params": _randomize(variables["params"])}
  if "batch_stats" in variables:
    variables["batch_stats"] = {"mean": variables["batch_stats"]["mean"] + 0.3,
                                "var": variables["batch_stats"]["var"] * 1.7}
  apply = jax.jit(lambda v, x, m: module.apply(v, x, mask=m, mutable=["batch_stats"], **call_kw))
  y, updates = apply(variables, x, mask)
  return variables, y, updates


def _jit(fn, *args, **static):
  """jaxnorm under jit (one compile per case beats many eager first-time op compiles)."""
  return jax.jit(lambda *a: fn(*a, **static))(*args)


# ----------------------------------------------------------------------------- flax.linen


BN_LAYOUTS = {
    "nc": ((8, 5), -1),
    "nhwc": ((4, 3, 2, 5), -1),
    "nchw": ((4, 5, 3, 2), 1),
    "ntc-multi": ((4, 3, 5), (1, 2)),
}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", sorted(BN_LAYOUTS))
def test_flax_batch_norm(layout, training, masked):
  shape, axis = BN_LAYOUTS[layout]
  x = _x(shape)
  mask = _mask(shape) if masked else None
  mod = nn.BatchNorm(use_running_average=not training, axis=axis, momentum=0.8, epsilon=1e-4,
                     use_fast_variance=False)
  variables, y_flax, updates = _flax(mod, x, mask)
  p, s = variables["params"], variables["batch_stats"]
  y, new = _jit(lambda x, st, sc, b, w: jn.batch_norm(
      x, st, sc, b, where=w, training=training, feature_axes=axis, momentum=0.8, epsilon=1e-4),
      x, jn.BatchStats(s["mean"], s["var"]), p["scale"], p["bias"], mask)
  _close(y, y_flax)
  got = updates.get("batch_stats", s)
  _close(new.mean, got["mean"])
  _close(new.var, got["var"])
  assert new.mean.shape == got["mean"].shape and new.mean.dtype == got["mean"].dtype


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("axes", [(-1, -1), ((1, 2), (1, 2)), ((1, 2), -1), (-1, (1, 2))])
def test_flax_layer_norm(axes, masked):
  red, feat = axes
  x = _x((4, 3, 5))
  mask = _mask(x.shape, np.s_[..., :2]) if masked else None
  mod = nn.LayerNorm(reduction_axes=red, feature_axes=feat, epsilon=1e-5,
                     use_fast_variance=False)
  variables, y_flax, _ = _flax(mod, x, mask)
  p = variables["params"]
  y = _jit(lambda x, s, b, w: jn.layer_norm(x, s, b, where=w, reduction_axes=red,
                                            feature_axes=feat, epsilon=1e-5),
           x, p["scale"], p["bias"], mask)
  _close(y, y_flax)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("axes", [(-1, -1), ((1, 2), (1, 2))])
def test_flax_rms_norm(axes, masked):
  red, feat = axes
  x = _x((4, 3, 5))
  mask = _mask(x.shape, np.s_[..., :2]) if masked else None
  mod = nn.RMSNorm(reduction_axes=red, feature_axes=feat, epsilon=1e-5)
  variables, y_flax, _ = _flax(mod, x, mask)
  y = _jit(lambda x, s, w: jn.rms_norm(x, s, where=w, reduction_axes=red, feature_axes=feat,
                                       epsilon=1e-5), x, variables["params"]["scale"], mask)
  _close(y, y_flax)


@pytest.mark.parametrize("groups", [dict(num_groups=3), dict(num_groups=1), dict(num_groups=None,
                                                                                  group_size=2)])
@pytest.mark.parametrize("shape,masked", [((4, 6), False), ((2, 3, 4, 6), False),
                                          ((2, 3, 4, 6), True)])
def test_flax_group_norm(shape, masked, groups):
  x = _x(shape)
  mask = _mask(x.shape, np.s_[:, 0, :2]) if masked else None  # 2 pixels of every channel
  mod = nn.GroupNorm(epsilon=1e-5, use_fast_variance=False, **groups)
  variables, y_flax, _ = _flax(mod, x, mask)
  p = variables["params"]
  kw = {k: v for k, v in groups.items() if v is not None}
  y = _jit(lambda x, s, b, w: jn.group_norm(x, s, b, where=w, epsilon=1e-5, **kw),
           x, p["scale"], p["bias"], mask)
  _close(y, y_flax)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("feat", [-1, 1, (1, -1)])
def test_flax_instance_norm(feat, masked):
  x = _x((3, 4, 3, 5))
  mask = _mask(x.shape, np.s_[:, :, :2]) if masked else None  # axis 2 is always reduced
  mod = nn.InstanceNorm(feature_axes=feat, epsilon=1e-5, use_fast_variance=False)
  variables, y_flax, _ = _flax(mod, x, mask)
  p = variables["params"]
  y = _jit(lambda x, s, b, w: jn.instance_norm(x, s, b, where=w, feature_axes=feat,
                                               epsilon=1e-5), x, p["scale"], p["bias"], mask)
  _close(y, y_flax)


def test_flax_batch_norm_several_steps():
  """Running averages agree after several steps (momentum compounding, same layout)."""
  mod = nn.BatchNorm(use_running_average=False, momentum=0.9, use_fast_variance=False)
  xs = [_x((6, 4), seed=s, offset=s) for s in range(4)]
  variables = mod.init(jax.random.key(0), xs[0])
  stats = jn.init_batch_stats(4)
  apply = jax.jit(lambda v, x: mod.apply(v, x, mutable=["batch_stats"]))
  for x in xs:
    y_flax, upd = apply(variables, x)
    variables = {**variables, **upd}
    y, stats = jn.batch_norm(x, stats, training=True, momentum=0.9)
    _close(y, y_flax)
  _close(stats.mean, variables["batch_stats"]["mean"])
  _close(stats.var, variables["batch_stats"]["var"])


def test_flax_nnx_batch_norm():
  nnx = pytest.importorskip("flax.nnx")
  bn = nnx.BatchNorm(5, momentum=0.7, epsilon=1e-4, use_fast_variance=False,
                     rngs=nnx.Rngs(0))
  x = _x((6, 5))
  y_nnx = bn(x)
  y, new = jn.batch_norm(x, jn.init_batch_stats(5), training=True, momentum=0.7, epsilon=1e-4)
  _close(y, y_nnx)
  _close(new.mean, bn.mean[...])
  _close(new.var, bn.var[...])


# ----------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def _t(torch, a):
  return torch.from_numpy(np.array(a, np.float32))


@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 3, 2), (4, 5, 3)])
def test_torch_batch_norm_running_stats(torch, shape):
  """PyTorch convention: momentum 0.1 is jaxnorm momentum 0.9, with unbiased_var=True."""
  F = torch.nn.functional
  C = shape[1]
  rng = np.random.default_rng(3)
  w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
  rm_t, rv_t = _t(torch, np.zeros(C)), _t(torch, np.ones(C))
  stats = jn.init_batch_stats(C)
  for step in range(3):
    x = _x(shape, seed=step, offset=step)
    y_t = F.batch_norm(_t(torch, x), rm_t, rv_t, _t(torch, w), _t(torch, b), training=True,
                       momentum=0.1, eps=1e-5)  # updates rm_t, rv_t in place
    y, stats = jn.batch_norm(x, stats, jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32),
                             training=True, feature_axes=1, momentum=1 - 0.1, epsilon=1e-5,
                             unbiased_var=True)
    _close(y, y_t.numpy())
    _close(stats.mean, rm_t.numpy())
    _close(stats.var, rv_t.numpy())
  # evaluation with the running statistics
  x = _x(shape, seed=9)
  y_t = F.batch_norm(_t(torch, x), rm_t, rv_t, _t(torch, w), _t(torch, b), training=False,
                     eps=1e-5)
  y, same = jn.batch_norm(x, stats, jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32),
                          training=False, feature_axes=1, epsilon=1e-5)
  _close(y, y_t.numpy())
  assert same is stats or all(np.array_equal(np.asarray(a), np.asarray(c))
                              for a, c in zip(same, stats))


def test_torch_batch_norm_module_default_momentum(torch):
  bn = torch.nn.BatchNorm1d(4)  # momentum=0.1, eps=1e-5, biased normalization, unbiased EMA
  x = _x((10, 4), offset=3.0)
  with torch.no_grad():
    y_t = bn(_t(torch, x))
  y, new = jn.batch_norm(x, jn.init_batch_stats(4), training=True, feature_axes=1,
                         momentum=0.9, unbiased_var=True)
  _close(y, y_t.numpy())
  _close(new.mean, bn.running_mean.numpy())
  _close(new.var, bn.running_var.numpy())


@pytest.mark.parametrize("k", [1, 2])
def test_torch_layer_norm(torch, k):
  x = _x((4, 3, 6))
  nshape = x.shape[-k:]
  rng = np.random.default_rng(4)
  w, b = rng.uniform(0.5, 1.5, nshape), rng.standard_normal(nshape)
  y_t = torch.nn.functional.layer_norm(_t(torch, x), nshape, _t(torch, w), _t(torch, b),
                                       eps=1e-5)
  axes = tuple(range(3 - k, 3))
  y = jn.layer_norm(x, jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32),
                    reduction_axes=axes, feature_axes=axes, epsilon=1e-5)
  _close(y, y_t.numpy())


@pytest.mark.parametrize("k", [1, 2])
def test_torch_rms_norm(torch, k):
  F = torch.nn.functional
  if not hasattr(F, "rms_norm"):
    pytest.skip("torch.nn.functional.rms_norm needs torch >= 2.4")
  x = _x((4, 3, 6))
  nshape = x.shape[-k:]
  w = np.random.default_rng(5).uniform(0.5, 1.5, nshape)
  y_t = F.rms_norm(_t(torch, x), nshape, _t(torch, w), eps=1e-5)
  axes = tuple(range(3 - k, 3))
  y = jn.rms_norm(x, jnp.asarray(w, jnp.float32), reduction_axes=axes, feature_axes=axes,
                  epsilon=1e-5)
  _close(y, y_t.numpy())


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", [(4, 6), (2, 6, 3, 2)])
def test_torch_group_norm(torch, shape, groups):
  x = _x(shape)
  rng = np.random.default_rng(6)
  w, b = rng.uniform(0.5, 1.5, 6), rng.standard_normal(6)
  y_t = torch.nn.functional.group_norm(_t(torch, x), groups, _t(torch, w), _t(torch, b),
                                       eps=1e-5)
  y = _jit(jn.group_norm, x, jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32),
           num_groups=groups, channel_axis=1, epsilon=1e-5)
  _close(y, y_t.numpy())


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 4, 3, 2)])
def test_torch_instance_norm(torch, shape):
  x = _x(shape)
  rng = np.random.default_rng(7)
  w, b = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
  y_t = torch.nn.functional.instance_norm(_t(torch, x), weight=_t(torch, w), bias=_t(torch, b),
                                          eps=1e-5)
  y = _jit(jn.instance_norm, x, jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32),
           feature_axes=1, epsilon=1e-5)
  _close(y, y_t.numpy())


def test_torch_gradients_match(torch):
  """Backward parity for batch norm in training (NCHW): d/dx, d/dscale, d/dbias."""
  x = _x((4, 3, 2, 2))
  rng = np.random.default_rng(8)
  w, b = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
  g = rng.standard_normal(x.shape)
  xt = _t(torch, x).requires_grad_()
  wt, bt = _t(torch, w).requires_grad_(), _t(torch, b).requires_grad_()
  yt = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-5)
  (yt * _t(torch, g)).sum().backward()

  def loss(x, w, b):
    y, _ = jn.batch_norm(x, jn.init_batch_stats(3), w, b, training=True, feature_axes=1)
    return jnp.sum(y * jnp.asarray(g, jnp.float32))

  dx, dw, db = jax.grad(loss, argnums=(0, 1, 2))(x, jnp.asarray(w, jnp.float32),
                                                 jnp.asarray(b, jnp.float32))
  _close(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4)
  _close(dw, wt.grad.numpy(), rtol=1e-4, atol=1e-4)
  _close(db, bt.grad.numpy(), rtol=1e-4, atol=1e-4)
