"""Weight normalizers: weight standardization (plain, scaled), weight norm, spectral norm.

The oracle is written here from the papers' definitions, in float64, with an array
module argument: NumPy for outputs, ``jax.numpy`` under ``jax.enable_x64`` for the
reference gradients (autodiff of the same straightforward math).  PyTorch's
``torch.nn.utils.parametrizations.{weight_norm, spectral_norm}`` are the parity
targets (skipped cleanly without torch).  The Flax frontends are checked against
the layers they wrap, trained a few optax steps, and round-tripped through a
checkpoint; the flax bugs of issue 11 are tested as fixed.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization

import jaxnorm as jn
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx

F64 = np.float64


# ----------------------------------------------------------------------------- float64 oracle


def ref_ws(w, gain=None, fan_in=None, eps=1e-6, xp=np):
  """(w - mean) / sqrt(var + eps) [* gain], two-pass statistics over the fan-in."""
  fan_in = tuple(range(w.ndim - 1)) if fan_in is None else fan_in
  mean = xp.mean(w, axis=fan_in, keepdims=True)
  var = xp.mean((w - mean) ** 2, axis=fan_in, keepdims=True)
  y = (w - mean) / xp.sqrt(var + eps)
  return y if gain is None else y * gain


def ref_sws(w, gain=None, fan_in=None, eps=1e-4, xp=np):
  """gain * (w - mean) / sqrt(max(var * N, eps)) (Brock et al. 2021)."""
  fan_in = tuple(range(w.ndim - 1)) if fan_in is None else fan_in
  n = np.prod([w.shape[a] for a in fan_in])
  mean = xp.mean(w, axis=fan_in, keepdims=True)
  var = xp.mean((w - mean) ** 2, axis=fan_in, keepdims=True)
  y = (w - mean) / xp.sqrt(xp.maximum(var * n, eps))
  return y if gain is None else y * gain


def ref_wn(v, g=None, red=None, eps=1e-12, xp=np):
  """g * v / ||v|| with the norm over ``red`` (default: all but the last axis)."""
  red = tuple(range(v.ndim - 1)) if red is None else red
  y = v / xp.sqrt(xp.sum(v * v, axis=red, keepdims=True) + eps)
  return y if g is None else y * g


def ref_power(m, u, n_steps, eps=1e-12):
  """Power iteration on the (out, in) matrix m from u (float64): returns (u, v, sigma)."""
  def nrm(x):
    return x / max(np.linalg.norm(x), eps)
  for _ in range(n_steps):
    u = nrm(m @ nrm(m.T @ u))
  v = nrm(m.T @ u)
  return u, v, u @ m @ v


def to_matrix(w, out_axis):
  return np.moveaxis(w, out_axis, 0).reshape(w.shape[out_axis], -1)


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, F64) - np.asarray(b, F64))))


def rng_array(shape, seed=0, loc=0.0, scale=1.0):
  return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


# ----------------------------------------------------------------------------- standardization

WS_CASES = [  # (shape, fan_in_axes): Flax conv, Dense, PyTorch conv (output axis 0)
    ((3, 3, 2, 4), None),
    ((5, 3), (0,)),
    ((4, 2, 3, 3), (1, 2, 3)),
]


def _gain_for(shape, fan_in):
  fan_in = tuple(range(len(shape) - 1)) if fan_in is None else fan_in
  out = tuple(d for i, d in enumerate(shape) if i not in fan_in)
  bshape = tuple(1 if i in fan_in else d for i, d in enumerate(shape))
  g = rng_array(out, seed=3, loc=1.0, scale=0.3)
  return g, g.reshape(bshape)


@pytest.mark.parametrize("scaled,shape,fan_in", [
    (False,) + WS_CASES[0], (False,) + WS_CASES[1], (False,) + WS_CASES[2],
    (True,) + WS_CASES[0], (True,) + WS_CASES[2]])
def test_standardize_matches_float64(scaled, shape, fan_in):
  """Outputs and gradients (w, gain) against the float64 oracle; large offsets too."""
  fn = jn.scaled_weight_standardize if scaled else jn.weight_standardize
  ref = ref_sws if scaled else ref_ws
  eps = 1e-4 if scaled else 1e-6
  g, gb = _gain_for(shape, fan_in)
  r = rng_array(shape, seed=7)
  f = jax.jit(lambda w, g: fn(w, g, fan_in_axes=fan_in))
  for loc in (0.0, 1e3):  # |mean| >> std: the shifted one-pass statistics stay accurate
    w = rng_array(shape, seed=1, loc=loc, scale=0.05)
    y = f(w, g)
    y_ref = ref(w.astype(F64), gb.astype(F64), fan_in, eps)
    assert y.dtype == jnp.float32
    assert max_err(y, y_ref) < 2e-5 * np.max(np.abs(y_ref)), (loc, max_err(y, y_ref))

  w = rng_array(shape, seed=1, scale=0.05)
  gw, gg = jax.jit(jax.grad(lambda w, g: jnp.sum(f(w, g) * r), (0, 1)))(w, g)
  with jax.enable_x64(True):
    rw, rg = jax.jit(jax.grad(lambda w, g: jnp.sum(ref(w, g.reshape(gb.shape), fan_in, eps,
                                                       xp=jnp) * r.astype(F64)), (0, 1)))(
        jnp.asarray(w, F64), jnp.asarray(g, F64))
  assert max_err(gw, rw) < 1e-4 * np.max(np.abs(rw))
  assert max_err(gg, rg) < 1e-5 * np.max(np.abs(rg))


def test_scaled_ws_epsilon_is_a_floor():
  """max(var * fan_in, eps): a constant kernel (var 0) gives 0, not NaN; the formula
  has the fixed 1/sqrt(fan_in) (unit variance in, unit variance out)."""
  w = jnp.full((3, 3, 2, 4), 0.7)
  np.testing.assert_array_equal(jn.scaled_weight_standardize(w), np.zeros(w.shape))
  w = rng_array((64, 8), seed=2)
  y = np.asarray(jn.scaled_weight_standardize(w, epsilon=0.0), F64)
  np.testing.assert_allclose(np.sum(y ** 2, axis=0), 1.0, rtol=1e-5)  # unit-norm columns


def test_standardize_transforms_and_bf16():
  w = rng_array((3, 3, 2, 4), seed=4)
  for fn in (jn.weight_standardize, jn.scaled_weight_standardize):
    np.testing.assert_allclose(jax.jit(fn)(w), fn(w), rtol=1e-6, atol=1e-6)
    stack = np.stack([w, 2 * w + 1])  # an ensemble of kernels
    out = jax.vmap(fn)(stack)
    np.testing.assert_allclose(out[0], fn(w), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[1], fn(2 * w + 1), rtol=1e-5, atol=1e-5)
    wb = jnp.asarray(w, jnp.bfloat16)
    yb = fn(wb)
    assert yb.dtype == jnp.bfloat16
    ref = (ref_sws if fn is jn.scaled_weight_standardize else ref_ws)(
        np.asarray(wb, F64))
    assert max_err(yb, ref) < 2 ** -7 * np.max(np.abs(ref))  # one bf16 rounding
    assert fn(w, dtype=jnp.bfloat16).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- weight norm


@pytest.mark.parametrize("feature_axes", [-1, (0, 2), None])
def test_weight_norm_matches_float64(feature_axes):
  v = rng_array((3, 2, 4), seed=5)
  feat = () if feature_axes is None else tuple(
      a % 3 for a in np.atleast_1d(feature_axes))
  red = tuple(a for a in range(3) if a not in feat)
  fshape = tuple(v.shape[a] for a in feat)
  bshape = tuple(v.shape[a] if a in feat else 1 for a in range(3))
  g = rng_array(fshape, seed=6, loc=1.0)
  f = jax.jit(lambda v, g: jn.weight_norm(v, g, feature_axes=feature_axes))
  y = f(v, g)
  y_ref = ref_wn(v.astype(F64), g.reshape(bshape).astype(F64), red)
  assert max_err(y, y_ref) < 1e-6 * np.max(np.abs(y_ref))
  # g = ||v|| reproduces v (PyTorch's initialisation)
  g0 = jn.weight_norm_scale(v, feature_axes=feature_axes)
  assert g0.shape == fshape
  assert max_err(f(v, g0), v) < 1e-6
  r = rng_array(v.shape, seed=8)
  gv, gg = jax.jit(jax.grad(lambda v, g: jnp.sum(f(v, g) * r), (0, 1)))(v, g)
  with jax.enable_x64(True):
    rv, rg = jax.jit(jax.grad(lambda v, g: jnp.sum(ref_wn(v, g.reshape(bshape), red, xp=jnp)
                                                   * r.astype(F64)), (0, 1)))(
        jnp.asarray(v, F64), jnp.asarray(g, F64))
  assert max_err(gv, rv) < 2e-6 * np.max(np.abs(rv))
  assert max_err(gg, rg) < 2e-6 * np.max(np.abs(rg))


def test_weight_norm_torch_parity():
  """Same (g, v): equal weights and equal gradients for g and v (Linear, dim=0 and the
  Flax layout; Conv2d)."""
  torch = pytest.importorskip("torch")
  from torch.nn.utils.parametrizations import weight_norm as torch_wn
  torch.manual_seed(0)
  for layer in (torch.nn.Linear(3, 5), torch.nn.Conv2d(2, 4, 3)):
    layer = torch_wn(layer, dim=0)
    p = layer.parametrizations.weight
    with torch.no_grad():  # a g different from ||v||, so that g matters
      p.original0.mul_(torch.linspace(0.5, 2.0, p.original0.shape[0]).reshape(
          p.original0.shape))
    g_t, v_t = p.original0.detach().numpy(), p.original1.detach().numpy()
    r = rng_array(v_t.shape, seed=9)
    loss = (layer.weight * torch.from_numpy(r)).sum()
    loss.backward()
    w_t = layer.weight.detach().numpy()
    # torch layout (output axis 0) ...
    f = jax.jit(lambda v, g: jn.weight_norm(v, g, feature_axes=0))
    w = f(v_t, g_t.reshape(-1))
    assert max_err(w, w_t) < 1e-6
    gv, gg = jax.jit(jax.grad(lambda v, g: jnp.sum(f(v, g) * r), (0, 1)))(v_t, g_t.reshape(-1))
    assert max_err(gv, p.original1.grad.numpy()) < 1e-5
    assert max_err(gg, p.original0.grad.numpy().reshape(-1)) < 1e-5
    # ... and the Flax layout (output axis last) of the same weight
    perm = tuple(range(2, v_t.ndim)) + (1, 0)  # torch (O, I, *window) -> Flax layout
    w_flax = jn.weight_norm(np.transpose(v_t, perm), g_t.reshape(-1))
    assert max_err(w_flax, np.transpose(w_t, perm)) < 1e-6


# ----------------------------------------------------------------------------- spectral norm


def test_spectral_norm_train_matches_float64():
  """Training output, new state and gradient against the float64 power iteration."""
  w = rng_array((3, 3, 2, 5), seed=10)
  m = to_matrix(w.astype(F64), -1)
  state = jn.init_spectral_state(jax.random.key(0), w, n_steps=0)
  f = jax.jit(jn.spectral_norm, static_argnames=("training", "n_steps"))
  for n_steps in (1, 3):
    y, new = f(w, state, training=True, n_steps=n_steps)
    u_ref, v_ref, s_ref = ref_power(m, np.asarray(state.u, F64), n_steps)
    assert max_err(new.u, u_ref) < 1e-5 and abs(float(new.sigma) - s_ref) < 1e-5 * s_ref
    assert max_err(y, w / s_ref) < 1e-5
    assert new.u.dtype == new.sigma.dtype == jnp.float32
    assert new.u.shape == (5,) and new.sigma.shape == ()
  # d/dW sum(r * W / sigma(W)) with u, v constants (sigma = u^T M v)
  r = rng_array(w.shape, seed=11)
  g = jax.jit(jax.grad(lambda w: jnp.sum(f(w, state, training=True)[0] * r)))(w)
  u_ref, v_ref, _ = ref_power(m, np.asarray(state.u, F64), 1)
  with jax.enable_x64(True):
    u64, v64 = jnp.asarray(u_ref), jnp.asarray(v_ref)
    def ref_loss(w):
      mm = jnp.moveaxis(w, -1, 0).reshape(w.shape[-1], -1)
      return jnp.sum(w / (u64 @ mm @ v64) * r.astype(F64))
    g_ref = jax.jit(jax.grad(ref_loss))(jnp.asarray(w, F64))
  assert max_err(g, g_ref) < 1e-5 * np.max(np.abs(g_ref))


def test_spectral_norm_converges_to_largest_singular_value():
  w = rng_array((6, 4), seed=12)
  s_max = np.linalg.svd(w.astype(F64), compute_uv=False)[0]
  state = jn.init_spectral_state(jax.random.key(1), w, n_steps=50)
  assert abs(float(state.sigma) - s_max) < 1e-5 * s_max
  _, state = jn.spectral_norm(w, state, training=True)
  assert abs(float(state.sigma) - s_max) < 1e-5 * s_max


def test_spectral_norm_eval_uses_stored_sigma_exactly():
  """flax.linen's SpectralNorm iterates in evaluation; here evaluation is W / sigma_stored,
  bit for bit, with the state returned unchanged and no gradient through sigma."""
  w = rng_array((4, 6), seed=13)
  state = jn.SpectralState(u=jnp.asarray(rng_array((6,), seed=14)), sigma=jnp.float32(2.5))
  y, new = jn.spectral_norm(w, state, training=False)
  np.testing.assert_array_max_ulp(y, np.asarray(w) / np.float32(2.5), maxulp=1)
  assert all(a is b for a, b in zip(new, state))
  g = jax.grad(lambda w: jnp.sum(jn.spectral_norm(w, state, training=False)[0]))(w)
  np.testing.assert_allclose(g, np.full(w.shape, 1 / 2.5), rtol=1e-6)
  # the same state type under lax.cond in both modes
  out = jax.lax.cond(True, lambda: jn.spectral_norm(w, state, training=True),
                     lambda: jn.spectral_norm(w, state, training=False))
  assert jax.tree.structure(out) == jax.tree.structure((y, state))


def test_spectral_norm_torch_parity():
  """From torch's registered (u, v): training step (weight, new u, gradient) and the
  evaluation that follows, for Linear (torch's layout) and Conv2d (Flax's layout)."""
  torch = pytest.importorskip("torch")
  from torch.nn.utils.parametrizations import spectral_norm as torch_sn
  torch.manual_seed(0)
  f = jax.jit(jn.spectral_norm, static_argnames=("training", "out_axis"))
  for layer in (torch.nn.Linear(4, 5), torch.nn.Conv2d(2, 3, 3)):
    layer = torch_sn(layer)  # 15 power iterations at registration
    p = layer.parametrizations.weight[0]
    w_t = layer.parametrizations.weight.original.detach().numpy()
    u0 = p._u.detach().numpy().copy()
    state0 = jn.SpectralState(u=jnp.asarray(u0), sigma=jnp.float32(1.0))
    r = rng_array(w_t.shape, seed=15)
    layer.train()
    w_train = layer.weight
    (w_train * torch.from_numpy(r)).sum().backward()
    w_train = w_train.detach().numpy()
    grad_t = layer.parametrizations.weight.original.grad.numpy()
    u1 = p._u.detach().numpy()
    layer.eval()
    w_eval = layer.weight.detach().numpy()
    perm = tuple(range(2, w_t.ndim)) + (1, 0)  # torch (O, I, *window) -> Flax (*window, I, O)
    inverse = tuple(np.argsort(perm))
    layouts = ((w_t, 0, r, lambda a: np.asarray(a)),  # torch's layout for Linear,
               (np.transpose(w_t, perm), -1, np.transpose(r, perm),  # Flax's for Conv2d
                lambda a: np.transpose(a, inverse)))
    for w, out_axis, rr, back in layouts[:1] if w_t.ndim == 2 else layouts[1:]:
      y, s1 = f(w, state0, training=True, out_axis=out_axis)
      assert max_err(back(y), w_train) < 1e-6
      assert max_err(s1.u, u1) < 1e-6
      g = jax.jit(jax.grad(lambda w: jnp.sum(f(w, state0, training=True,
                                               out_axis=out_axis)[0] * rr)))(w)
      assert max_err(back(g), grad_t) < 1e-5
      y_eval, s2 = jn.spectral_norm(w, s1, training=False, out_axis=out_axis)
      assert max_err(back(y_eval), w_eval) < 1e-6
      assert all(a is b for a, b in zip(s2, s1))  # eager: the very same arrays


def test_spectral_norm_transforms_and_bf16():
  w = rng_array((3, 5), seed=16)
  state = jn.init_spectral_state(jax.random.key(2), w)
  f = jax.jit(jn.spectral_norm, static_argnames=("training", "n_steps"))
  for training in (True, False):
    a, b = f(w, state, training=training), jn.spectral_norm(w, state, training=training)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  ws = np.stack([w, 3 * w])
  states = jax.vmap(lambda k, w: jn.init_spectral_state(k, w))(jax.random.split(
      jax.random.key(3), 2), ws)
  ys, new = jax.vmap(lambda w, s: jn.spectral_norm(w, s, training=True))(ws, states)
  np.testing.assert_allclose(ys[1], ys[0], rtol=1e-5, atol=1e-6)  # scale invariant
  np.testing.assert_allclose(new.sigma[1], 3 * new.sigma[0], rtol=1e-5)
  wb = jnp.asarray(w, jnp.bfloat16)
  yb, sb = jn.spectral_norm(wb, state, training=True)
  assert yb.dtype == jnp.bfloat16 and sb.u.dtype == sb.sigma.dtype == jnp.float32
  _, _, s_ref = ref_power(to_matrix(np.asarray(wb, F64), -1), np.asarray(state.u, F64), 1)
  assert max_err(yb, np.asarray(wb, F64) / s_ref) < 2 ** -7 * np.max(np.abs(yb))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call,exc,match", [
    (lambda: jn.weight_standardize(jnp.ones((3, 4)), jnp.ones(3)), ValueError,
     r"gain has shape \(3,\).*needs one entry per output unit: shape \(4,\)"),
    (lambda: jn.scaled_weight_standardize(jnp.ones((3, 4)), jnp.ones((2, 4))), ValueError,
     r"gain has shape \(2, 4\)"),
    (lambda: jn.weight_standardize(jnp.ones((3, 4)), fan_in_axes=2), ValueError,
     r"fan_in_axes 2 is out of range for an input of rank 2"),
    (lambda: jn.weight_standardize(jnp.ones(4)), ValueError, r"no fan-in axis"),
    (lambda: jn.weight_standardize(jnp.ones((3, 4), jnp.int32)), TypeError,
     r"must be a floating array"),
    (lambda: jn.weight_norm(jnp.ones((3, 4)), jnp.ones(3)), ValueError,
     r"g has shape \(3,\).*shape \(4,\)"),
    (lambda: jn.weight_norm(jnp.ones((3, 4)), feature_axes=(0, 1)), ValueError,
     r"nothing to take the norm over"),
    (lambda: jn.weight_norm(jnp.ones((3, 4)), feature_axes=5), ValueError, r"out of range"),
    (lambda: jn.spectral_norm(jnp.ones((3, 4)), jn.SpectralState(jnp.ones(4), jnp.ones(())),
                              training=True, n_steps=0), ValueError,
     r"n_steps must be an int >= 1"),
    (lambda: jn.spectral_norm(jnp.ones((3, 4)), jn.SpectralState(jnp.ones(4), jnp.ones(())),
                              training=True, out_axis=2), ValueError,
     r"out_axis 2 is out of range"),
    (lambda: jn.spectral_norm(jnp.ones((3, 4)), jn.SpectralState(jnp.ones(3), jnp.ones(())),
                              training=True), ValueError,
     r"state.u has shape \(3,\).*needs \(4,\).*out_axis"),
    (lambda: jn.spectral_norm(jnp.ones((3, 4)), jn.SpectralState(jnp.ones(4), jnp.ones(())),
                              training=jnp.bool_(True)), TypeError, r"must be a Python bool"),
    (lambda: jn.spectral_norm(jnp.ones((3, 4)), {"u": 1}, training=True), TypeError,
     r"jaxnorm.SpectralState\(u, sigma\)"),
    (lambda: jn.init_spectral_state(jax.random.key(0), jnp.ones((3, 4)), n_steps=-1),
     ValueError, r"n_steps must be an int >= 0"),
    (lambda: jnnx.WeightNorm(nnx.Dropout(0.1)), ValueError,
     r"Dropout has no parameter 'kernel'"),
    (lambda: jnnx.SpectralNorm(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), n_steps=0,
                               rngs=nnx.Rngs(0)), ValueError, r"n_steps must be"),
    (lambda: jnn.WeightNorm(layer_instance=nn.Dropout(0.1)).init(
        jax.random.key(0), jnp.ones((2, 3)), deterministic=True), ValueError,
     r"no parameter of the wrapped layer Dropout matches"),
    (lambda: jnn.SpectralNorm(layer_instance=nn.Dense(3)).init(
        jax.random.key(0), jnp.ones((2, 3)), update_stats=1), TypeError,
     r"`update_stats` must be a Python bool"),
    (lambda: jnn.WSConv(4, (3, 3)).apply(
        {"params": {"kernel": jnp.ones((3, 3, 2, 4)), "gain": jnp.ones(3),
                    "bias": jnp.zeros(4)}}, jnp.ones((1, 5, 5, 2))),
     flax.errors.ScopeParamShapeError, r'"gain".*expected to generate shape \(4,\)'),
])
def test_bad_input_raises_clear_errors(call, exc, match):
  with pytest.raises(exc, match=match):
    call()


# ----------------------------------------------------------------------------- linen


X_IMG = rng_array((2, 6, 6, 3), seed=20)


@pytest.mark.parametrize("cls,base,core", [
    (jnn.StdConv, nn.Conv, jn.weight_standardize),
    (jnn.WSConv, nn.Conv, jn.scaled_weight_standardize),
])
def test_linen_standardized_conv_is_conv_with_standardized_kernel(cls, base, core):
  kw = dict(features=4, kernel_size=(3, 3), strides=2, padding="VALID", feature_group_count=1)
  variables = cls(**kw).init(jax.random.key(0), X_IMG)
  plain = base(**kw).init(jax.random.key(0), X_IMG)
  extra = {"gain"} if cls is jnn.WSConv else set()
  assert set(variables["params"]) == set(plain["params"]) | extra
  for k in plain["params"]:  # same initialisation as the wrapped layer
    np.testing.assert_array_equal(variables["params"][k], plain["params"][k])
  p = dict(variables["params"])
  if extra:
    p["gain"] = jnp.linspace(0.5, 1.5, 4)
  y = cls(**kw).apply({"params": p}, X_IMG)
  k_hat = core(p["kernel"], p["gain"]) if extra else core(p["kernel"])
  y_ref = base(**kw).apply({"params": {"kernel": k_hat, "bias": p["bias"]}}, X_IMG)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)


def test_linen_standardized_dense():
  x = X_IMG[:, 0, 0]
  for cls, core in ((jnn.StdDense, jn.weight_standardize),
                    (jnn.WSDense, jn.scaled_weight_standardize)):
    v = cls(5, use_bias=False).init(jax.random.key(0), x)
    assert set(v["params"]) == ({"kernel", "gain"} if cls is jnn.WSDense else {"kernel"})
    k_hat = core(v["params"]["kernel"])
    np.testing.assert_allclose(cls(5, use_bias=False).apply(v, x), x @ k_hat, rtol=1e-5,
                               atol=1e-6)


def test_linen_weight_norm_initial_function_unchanged():
  """scale = ||v|| at init (flax.linen initialises 1, flax#4138); the stored kernel is the
  layer's own initialisation (not overwritten); scale_init=ones is flax's variant."""
  x = X_IMG
  wn = jnn.WeightNorm(layer_instance=nn.Conv(4, (3, 3)))
  v = wn.init(jax.random.key(0), x)
  params = v["params"]
  assert params["layer_instance/kernel/scale"].shape == (4,)
  y_plain = nn.Conv(4, (3, 3)).apply({"params": params["layer_instance"]}, x)
  np.testing.assert_allclose(wn.apply(v, x), y_plain, rtol=1e-5, atol=1e-6)
  wn1 = jnn.WeightNorm(layer_instance=nn.Conv(4, (3, 3)), scale_init=nn.initializers.ones)
  v1 = wn1.init(jax.random.key(0), x)
  np.testing.assert_array_equal(v1["params"]["layer_instance"]["kernel"],
                                params["layer_instance"]["kernel"])
  k_hat = jn.weight_norm(params["layer_instance"]["kernel"], jnp.ones(4))
  np.testing.assert_allclose(
      wn1.apply(v1, x), nn.Conv(4, (3, 3)).apply(
          {"params": {"kernel": k_hat, "bias": params["layer_instance"]["bias"]}}, x),
      rtol=1e-5, atol=1e-6)


def test_linen_spectral_norm_eval_is_frozen_and_init_keeps_kernel():
  x = X_IMG[:, 0, 0]
  sn = jnn.SpectralNorm(layer_instance=nn.Dense(4))
  v = sn.init(jax.random.key(0), x, update_stats=True)
  kernel = v["params"]["layer_instance"]["kernel"]
  plain = nn.Dense(4).init(jax.random.key(0), x)  # same key path? compare statistics instead
  assert kernel.shape == plain["params"]["kernel"].shape
  stats = v["batch_stats"]
  s0 = stats["layer_instance/kernel/sigma"]
  # init stored the raw kernel (flax.linen's SpectralNorm stores W / sigma there, whose
  # largest singular value is 1)
  assert abs(float(s0) - np.linalg.svd(np.asarray(kernel, F64), compute_uv=False)[0]) < 1e-3
  assert abs(float(s0) - 1) > 0.05
  y, upd = sn.apply(v, x, update_stats=False, mutable=["batch_stats"])
  for k in stats:
    np.testing.assert_array_equal(upd["batch_stats"][k], stats[k])
  y_ref = x @ (np.asarray(kernel) / np.float32(s0)) + np.asarray(
      v["params"]["layer_instance"]["bias"])
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  y, upd = sn.apply(v, x, update_stats=True, mutable=["batch_stats"])
  u_ref, _, s_ref = ref_power(to_matrix(np.asarray(kernel, F64), -1),
                              np.asarray(stats["layer_instance/kernel/u"], F64).ravel(), 1)
  assert abs(float(upd["batch_stats"]["layer_instance/kernel/sigma"]) - s_ref) < 1e-5
  assert max_err(upd["batch_stats"]["layer_instance/kernel/u"].ravel(), u_ref) < 1e-5


class _LinenNet(nn.Module):  # dense layers only: the convolutions are tested above
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(jnn.WSDense(8)(x))
    x = nn.relu(jnn.StdDense(8)(x))
    x = nn.relu(jnn.WeightNorm(layer_instance=nn.Dense(8))(x))
    return jnn.SpectralNorm(layer_instance=nn.Dense(2))(x, update_stats=train)


def test_linen_model_trains_and_checkpoint_round_trips():
  model = _LinenNet()
  x, t = jnp.asarray(rng_array((4, 3), seed=20)), jnp.asarray(rng_array((4, 2), seed=21))
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x, train=False)
  tx = optax.adam(1e-2)
  opt_state = tx.init(variables["params"])

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(params):
      y, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                           mutable=["batch_stats"])
      return jnp.mean((y - t) ** 2), upd["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss, grads

  params, stats = variables["params"], variables["batch_stats"]
  losses = []
  for _ in range(5):
    params, stats, opt_state, loss, grads = step(params, stats, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  for leaf in jax.tree.leaves(grads):  # every parameter (gain, scale) gets a gradient
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)
  trained = {"params": params, "batch_stats": stats}
  restored = serialization.from_bytes(variables, serialization.to_bytes(trained))
  evaluate = jax.jit(lambda v: model.apply(v, x, train=False))
  np.testing.assert_array_equal(evaluate(restored), evaluate(trained))


# ----------------------------------------------------------------------------- nnx


@pytest.mark.parametrize("cls,base,core", [
    (jnnx.StdConv, nnx.Conv, jn.weight_standardize),
    (jnnx.WSConv, nnx.Conv, jn.scaled_weight_standardize),
    (jnnx.StdLinear, nnx.Linear, jn.weight_standardize),
    (jnnx.WSLinear, nnx.Linear, jn.scaled_weight_standardize),
])
def test_nnx_standardized_layers(cls, base, core):
  conv = base is nnx.Conv
  args = (3, 4, (3, 3)) if conv else (3, 4)
  kw = dict(strides=2, padding="VALID") if conv else {}
  x = X_IMG if conv else X_IMG[:, 0, 0]
  m, plain = cls(*args, **kw, rngs=nnx.Rngs(0)), base(*args, **kw, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(m.kernel[...], plain.kernel[...])  # same keys
  scaled = core is jn.scaled_weight_standardize
  if scaled:
    m.gain[...] = jnp.linspace(0.5, 1.5, 4)
  kernel = m.kernel[...]
  y = m(x)
  np.testing.assert_array_equal(m.kernel[...], kernel)  # never overwritten
  plain.kernel[...] = core(kernel, m.gain[...]) if scaled else core(kernel)
  np.testing.assert_allclose(y, plain(x), rtol=1e-6, atol=1e-6)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)
  for name in ("kernel", "bias") + (("gain",) if scaled else ()):
    assert np.any(np.asarray(grads[name][...]) != 0), name


def test_nnx_weight_norm_scale_is_trained_and_kernel_not_overwritten():
  """flax.nnx's WeightNorm keeps its scales as raw arrays (never trained) and writes
  g * v / ||v|| into the kernel (flax#5576/#5577); here the scale is an nnx.Param that
  receives a gradient and changes under an optimizer step, and v stays v."""
  layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  x = X_IMG[:, 0, 0]
  y_plain = layer(x)
  wn = jnnx.WeightNorm(layer)
  np.testing.assert_allclose(wn(x), y_plain, rtol=1e-5, atol=1e-6)  # g = ||v|| at init
  v0 = layer.kernel[...]
  np.testing.assert_array_equal(layer.kernel[...], v0)
  optimizer = nnx.Optimizer(wn, optax.sgd(0.1), wrt=nnx.Param)
  g0 = wn.scale[...]

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)
    return grads

  grads = step(wn, optimizer)
  assert np.all(np.asarray(grads["scale"][...]) != 0)
  assert np.all(np.asarray(wn.scale[...]) != np.asarray(g0))
  assert not np.allclose(layer.kernel[...], v0)  # v trained through w
  np.testing.assert_allclose(  # the layer runs with g v / ||v||, v = its own kernel
      wn(x), x @ jn.weight_norm(layer.kernel[...], wn.scale[...]) + layer.bias[None],
      rtol=1e-5, atol=1e-6)
  wn1 = jnnx.WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), scale_init=nnx.initializers.ones,
                        rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(wn1.scale[...], np.ones(4))


def test_nnx_spectral_norm_train_eval():
  layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  sn = jnnx.SpectralNorm(layer, rngs=nnx.Rngs(1))
  x = X_IMG[:, 0, 0]
  w = layer.kernel[...]
  u0 = np.asarray(sn.u[...])
  y = sn(x)  # training by default
  u_ref, _, s_ref = ref_power(to_matrix(np.asarray(w, F64), -1), u0.astype(F64), 1)
  assert max_err(sn.u[...], u_ref) < 1e-5 and abs(float(sn.sigma[...]) - s_ref) < 1e-5
  np.testing.assert_array_equal(layer.kernel[...], w)  # never overwritten
  sn.eval()
  u1, s1 = sn.u[...], sn.sigma[...]
  y = sn(x)
  np.testing.assert_array_equal(sn.u[...], u1)
  np.testing.assert_array_equal(sn.sigma[...], s1)
  np.testing.assert_allclose(y, x @ (np.asarray(w) / np.float32(s1)) + np.asarray(layer.bias[...]),
                             rtol=1e-6, atol=1e-6)
  sn.u[...] = jnp.asarray(rng_array((4,), seed=23))  # far from converged: must change
  y_train = sn(x, update_stats=True)  # the call argument wins over eval()
  assert not np.array_equal(sn.u[...], rng_array((4,), seed=23))


class _NnxNet(nnx.Module):  # linear layers only: the convolutions are tested above
  def __init__(self, rngs):
    self.fc1 = jnnx.WSLinear(3, 8, rngs=rngs)
    self.fc2 = jnnx.StdLinear(8, 8, rngs=rngs)
    self.fc3 = jnnx.WeightNorm(nnx.Linear(8, 8, rngs=rngs))
    self.out = jnnx.SpectralNorm(nnx.Linear(8, 2, rngs=rngs), rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.fc2(nnx.relu(self.fc1(x))))
    return self.out(nnx.relu(self.fc3(x)))


def test_nnx_model_trains_and_checkpoint_round_trips():
  model = _NnxNet(nnx.Rngs(0))
  x, t = jnp.asarray(rng_array((4, 3), seed=20)), jnp.asarray(rng_array((4, 2), seed=22))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - t) ** 2))(model)
    optimizer.update(model, grads)
    return loss, grads

  losses = []
  for _ in range(5):
    loss, grads = step(model, optimizer)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  for leaf in jax.tree.leaves(nnx.state(grads)):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)
  model.eval()
  evaluate = nnx.jit(lambda m: m(x))
  y = evaluate(model)
  graphdef, state = nnx.split(model)
  restored_state = serialization.from_bytes(
      jax.tree.map(jnp.zeros_like, state.to_pure_dict()),
      serialization.to_bytes(state.to_pure_dict()))
  fresh = _NnxNet(nnx.Rngs(1))
  nnx.replace_by_pure_dict(state2 := nnx.state(fresh), restored_state)
  nnx.update(fresh, state2)
  fresh.eval()
  np.testing.assert_array_equal(evaluate(fresh), y)
