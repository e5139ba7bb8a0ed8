"""Proven in use: small models built from jaxnorm's Flax modules train step for step
like the same models built from flax's layers (linen under jax.jit, NNX under
nnx.jit), evaluate with the running averages, and round-trip through
flax.serialization bit for bit."""

import functools

import pytest

pytest.importorskip("flax")  # the Flax frontends need the `flax` extra

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, serialization

from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx

STEPS = 5
RNG = np.random.default_rng(0)
IMAGES = jnp.asarray(RNG.standard_normal((8, 6, 6, 2)).astype(np.float32))
LABELS = jnp.asarray(RNG.integers(0, 3, 8))
TOKENS = jnp.asarray(RNG.standard_normal((4, 5, 8)).astype(np.float32))
TARGETS = jnp.asarray(RNG.standard_normal((4, 1)).astype(np.float32))


def _assert_trees_equal(a, b):
  """Same structure, dtypes and bits."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(u).dtype == np.asarray(v).dtype
    np.testing.assert_array_equal(u, v)


def _assert_trees_close(a, b, tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------ linen


def linen_cnn(mod):
  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      for features in (4, 8):
        x = nn.Conv(features, (3, 3), use_bias=False)(x)  # BN provides the bias
        x = mod.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
      return nn.Dense(3)(x.mean(axis=(1, 2)))
  return CNN()


def linen_transformer(mod):
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      h = mod.LayerNorm()(x)  # pre-LN attention
      x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h)
      h = mod.RMSNorm()(x)  # pre-RMSNorm MLP
      x = x + nn.Dense(8)(nn.gelu(nn.Dense(16)(h)))
      return nn.Dense(1)(mod.LayerNorm()(x).mean(axis=1))
  return Block()


def _optimizer():
  # SGD, not Adam: Adam rescales gradients that are zero up to rounding (e.g. the
  # attention key bias) into full-size steps, so two correct implementations would
  # part ways on rounding noise alone.
  return optax.sgd(0.05, momentum=0.9)


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _mse(pred, y):
  return jnp.mean((pred - y) ** 2)


def train_linen(model, x, y, loss):
  """STEPS of SGD with momentum under jax.jit; returns losses, running averages per step, the
  final state and the evaluation output."""
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  tx = _optimizer()
  state = dict(variables, opt_state=tx.init(variables["params"]))
  state.setdefault("batch_stats", {})

  @jax.jit
  def step(state, x, y):
    def loss_fn(params):
      out, upd = model.apply({"params": params, "batch_stats": state["batch_stats"]}, x,
                             train=True, mutable=["batch_stats"])
      return loss(out, y), upd.get("batch_stats", {})
    (l, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return dict(params=optax.apply_updates(state["params"], updates), batch_stats=stats,
                opt_state=opt_state), l

  losses, stats = [], []
  for _ in range(STEPS):
    state, l = step(state, x, y)
    losses.append(float(l))
    stats.append(state["batch_stats"])
  evaluate = jax.jit(lambda s, x: model.apply(
      {"params": s["params"], "batch_stats": s["batch_stats"]}, x, train=False))
  return variables, losses, stats, state, evaluate


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_linen_model_trains_like_flax(name):
  build, x, y, loss = ((linen_cnn, IMAGES, LABELS, _ce) if name == "cnn"
                       else (linen_transformer, TOKENS, TARGETS, _mse))
  vf, lf, sf, statef, evalf = train_linen(build(nn), x, y, loss)
  vj, lj, sj, statej, evalj = train_linen(build(jnn), x, y, loss)
  _assert_trees_equal(vj, vf)  # same variables, same initial values
  np.testing.assert_allclose(lj, lf, rtol=1e-5)
  assert lj[-1] < lj[0]
  for a, b in zip(sj, sf):  # running averages, step by step
    _assert_trees_close(a, b, 1e-5)
  _assert_trees_close(statej["params"], statef["params"], 1e-5)
  # evaluation: flax's output, from the running averages (independent of the batch)
  ej = evalj(statej, x)
  np.testing.assert_allclose(ej, evalf(statef, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(evalj(statej, x[:1]), ej[:1], rtol=1e-5, atol=1e-6)
  if name == "cnn":
    assert not np.allclose(statej["batch_stats"]["BatchNorm_0"]["var"], 1.0)
  # flax.serialization round-trips the full state (params, running averages, optimizer)
  restored = serialization.from_bytes(jax.tree.map(jnp.zeros_like, statej),
                                      serialization.to_bytes(statej))
  _assert_trees_equal(restored, statej)
  np.testing.assert_array_equal(evalj(restored, x), ej)


# -------------------------------------------------------------------------------- NNX


class NNXCNN(nnx.Module):
  def __init__(self, ns, rngs):
    self.conv1 = nnx.Conv(2, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = ns.BatchNorm(4, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(4, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = ns.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(x.mean(axis=(1, 2)))


class NNXTransformer(nnx.Module):
  def __init__(self, ns, rngs):
    self.ln1 = ns.LayerNorm(8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, 8, 8, decode=False, rngs=rngs)
    self.rms = ns.RMSNorm(8, rngs=rngs)
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 8, rngs=rngs)
    self.ln_out = ns.LayerNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    x = x + self.down(nnx.gelu(self.up(self.rms(x))))
    return self.head(self.ln_out(x).mean(axis=1))


@nnx.jit(static_argnames="loss")
def _nnx_step(model, opt, x, y, loss):
  def loss_fn(model):
    return loss(model(x), y)
  l, grads = nnx.value_and_grad(loss_fn)(model)
  opt.update(model, grads)
  return l


@nnx.jit
def _nnx_eval(model, x):
  return model(x)


def train_nnx(cls, ns, x, y, loss):
  model = cls(ns, nnx.Rngs(0))
  init = nnx.to_pure_dict(nnx.clone(nnx.state(model)))
  opt = nnx.Optimizer(model, _optimizer(), wrt=nnx.Param)
  model.train()
  losses, stats = [], []
  for _ in range(STEPS):
    losses.append(float(_nnx_step(model, opt, x, y, loss)))
    stats.append(nnx.to_pure_dict(nnx.clone(nnx.state(model, nnx.BatchStat))))
  model.eval()
  return model, opt, init, losses, stats


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_nnx_model_trains_like_flax(name):
  cls, x, y, loss = ((NNXCNN, IMAGES, LABELS, _ce) if name == "cnn"
                     else (NNXTransformer, TOKENS, TARGETS, _mse))
  mf, _, initf, lf, sf = train_nnx(cls, nnx, x, y, loss)
  mj, optj, initj, lj, sj = train_nnx(cls, jnnx, x, y, loss)
  _assert_trees_equal(initj, initf)  # same variables drawn from the same Rngs
  np.testing.assert_allclose(lj, lf, rtol=1e-5)
  assert lj[-1] < lj[0]
  for a, b in zip(sj, sf):
    _assert_trees_close(a, b, 1e-5)
  _assert_trees_close(nnx.to_pure_dict(nnx.state(mj, nnx.Param)),
                      nnx.to_pure_dict(nnx.state(mf, nnx.Param)), 1e-5)
  # model.eval(): the running averages, untouched by the evaluation
  before = nnx.to_pure_dict(nnx.clone(nnx.state(mj)))
  ej = _nnx_eval(mj, x)
  _assert_trees_equal(nnx.to_pure_dict(nnx.state(mj)), before)
  np.testing.assert_allclose(ej, _nnx_eval(mf, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_nnx_eval(mj, x[:1]), ej[:1], rtol=1e-5, atol=1e-6)
  if name == "cnn":
    assert not np.allclose(mj.bn1.var[...], 1.0)
  # flax.serialization round-trips the model and optimizer state bit for bit
  full = {"model": nnx.to_pure_dict(nnx.state(mj)), "opt": nnx.to_pure_dict(nnx.state(optj))}
  blob = serialization.to_bytes(full)
  restored = serialization.from_bytes(jax.tree.map(jnp.zeros_like, full), blob)
  _assert_trees_equal(restored, full)
  fresh = cls(jnnx, nnx.Rngs(42))
  fresh.eval()
  target = nnx.state(fresh)
  nnx.replace_by_pure_dict(target, restored["model"])
  nnx.update(fresh, target)
  np.testing.assert_array_equal(_nnx_eval(fresh, x), ej)
