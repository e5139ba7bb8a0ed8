"""The contract every public function keeps, run over all of them.

jit equals eager; vmap over an extra leading axis equals a loop; dtypes (output in
the input's dtype, statistics in at least float32, running averages in their own
dtype); ``jax.eval_shape``; finite gradients; ``check_grads`` to second order in
float64; batch norm's state is type-stable (``lax.cond``, ``lax.scan``); and
``vmap(..., axis_name=...)`` over a split batch equals the unsplit batch, also when
masks leave the parts with unequal counts.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import jaxnorm as jn
import reference as R

LOWP = ["bfloat16", "float16", "float32"]


@dataclasses.dataclass(frozen=True)
class Case:
  """A public function on small inputs.

  ``make(rng, dtype)`` returns a dict of arrays; ``fn(**arrays)`` the output pytree;
  ``diff`` names the differentiable inputs; ``out_dtypes(dtype)`` the expected leaf
  dtypes of the output.
  """
  make: Callable
  fn: Callable
  diff: tuple
  out_dtypes: Callable


F32 = jnp.dtype(jnp.float32)


def _stat(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _x(rng, shape, dtype):
  return jnp.asarray(rng.standard_normal(shape) + 1.5, dtype)


def _p(rng, n, positive=False):
  return jnp.asarray(rng.uniform(0.5, 2, n) if positive else rng.standard_normal(n), jnp.float32)


def _stats(rng, n):
  return jn.BatchStats(_p(rng, n), _p(rng, n, positive=True))


def _mask(rng, shape):
  m = rng.random(shape) < 0.8
  m[:2] = True  # every statistic has >= 2 elements: smooth for check_grads
  return jnp.asarray(m)


SHAPE = (4, 3, 5)

CASES = {
    "moments": Case(
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), where=_mask(rng, SHAPE)),
        fn=lambda x, where: jn.moments(x, axis=(0, 1), where=where),
        diff=("x",), out_dtypes=lambda dt: [_stat(dt)] * 3),
    "normalize": Case(
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt),
                                  mean=_p(rng, 5).reshape(1, 1, 5),
                                  var=_p(rng, 5, True).reshape(1, 1, 5),
                                  scale=_p(rng, 5, True).reshape(1, 1, 5),
                                  bias=_p(rng, 5).reshape(1, 1, 5)),
        fn=lambda x, mean, var, scale, bias: jn.normalize(x, mean, var, scale, bias),
        diff=("x", "mean", "var", "scale", "bias"), out_dtypes=lambda dt: [dt]),
    "update_batch_stats": Case(
        make=lambda rng, dt: dict(stats=_stats(rng, 5), mean=_x(rng, (5,), dt),
                                  var=jnp.asarray(rng.uniform(0.5, 2, 5), dt)),
        fn=lambda stats, mean, var: jn.update_batch_stats(
            stats, jn.Moments(mean, var, jnp.full(mean.shape, 8.0, mean.dtype)), momentum=0.9,
            unbiased_var=True),
        diff=("stats", "mean", "var"), out_dtypes=lambda dt: [F32, F32]),
    "batch_norm_train": Case(
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), stats=_stats(rng, 5),
                                  scale=_p(rng, 5, True), bias=_p(rng, 5),
                                  where=_mask(rng, SHAPE)),
        fn=lambda x, stats, scale, bias, where: jn.batch_norm(
            x, stats, scale, bias, training=True, where=where, momentum=0.9),
        diff=("x", "stats", "scale", "bias"), out_dtypes=lambda dt: [dt, F32, F32]),
    "batch_norm_train_nchw": Case(
        make=lambda rng, dt: dict(x=_x(rng, (4, 3, 2, 2), dt), stats=_stats(rng, 3),
                                  scale=_p(rng, 3, True), bias=_p(rng, 3)),
        fn=lambda x, stats, scale, bias: jn.batch_norm(
            x, stats, scale, bias, training=True, feature_axes=1, unbiased_var=True),
        diff=("x", "stats", "scale", "bias"), out_dtypes=lambda dt: [dt, F32, F32]),
    "batch_norm_eval": Case(
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), stats=_stats(rng, 5),
                                  scale=_p(rng, 5, True), bias=_p(rng, 5)),
        fn=lambda x, stats, scale, bias: jn.batch_norm(x, stats, scale, bias, training=False),
        diff=("x", "stats", "scale", "bias"), out_dtypes=lambda dt: [dt, F32, F32]),
    "layer_norm": Case(
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), scale=_p(rng, 5, True),
                                  bias=_p(rng, 5), where=_mask(rng, SHAPE)),
        fn=lambda x, scale, bias, where: jn.layer_norm(x, scale, bias, where=where),
        diff=("x", "scale", "bias"), out_dtypes=lambda dt: [dt]),
    "rms_norm": Case(
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), scale=_p(rng, 15, True).reshape(3, 5)),
        fn=lambda x, scale: jn.rms_norm(x, scale, reduction_axes=(1, 2), feature_axes=(1, 2)),
        diff=("x", "scale"), out_dtypes=lambda dt: [dt]),
    "group_norm": Case(
        make=lambda rng, dt: dict(x=_x(rng, (4, 3, 6), dt), scale=_p(rng, 6, True),
                                  bias=_p(rng, 6)),
        fn=lambda x, scale, bias: jn.group_norm(x, scale, bias, num_groups=3),
        diff=("x", "scale", "bias"), out_dtypes=lambda dt: [dt]),
    "instance_norm": Case(
        make=lambda rng, dt: dict(x=_x(rng, (2, 3, 2, 2), dt), scale=_p(rng, 3, True),
                                  bias=_p(rng, 3)),
        fn=lambda x, scale, bias: jn.instance_norm(x, scale, bias, feature_axes=1),
        diff=("x", "scale", "bias"), out_dtypes=lambda dt: [dt]),
}
NAMES = sorted(CASES)
PUBLIC = {"moments", "normalize", "update_batch_stats", "batch_norm", "layer_norm", "rms_norm",
          "group_norm", "instance_norm"}


def test_every_public_function_is_covered():
  callables = {n for n in dir(jn) if not n.startswith("_") and callable(getattr(jn, n))
               and n not in ("BatchStats", "Moments", "init_batch_stats", "plain_autodiff")}
  assert callables == PUBLIC, callables ^ PUBLIC
  covered = {n.replace("_train_nchw", "").replace("_train", "").replace("_eval", "")
             for n in NAMES}
  assert covered == PUBLIC


def _args(name, dtype="float32", seed=0):
  return CASES[name].make(np.random.default_rng(seed), jnp.dtype(dtype))


def _run(name, args, transform=lambda f: f):
  return transform(lambda a: CASES[name].fn(**a))(args)


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert u.shape == v.shape and u.dtype == v.dtype
    np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64),
                               rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- transformations


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_eager(name):
  args = _args(name)
  _assert_trees_close(_run(name, args, jax.jit), _run(name, args))


@pytest.mark.parametrize("name", NAMES)
def test_vmap_equals_loop(name):
  parts = [_args(name, seed=s) for s in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *parts)
  batched = _run(name, stacked, jax.vmap)
  looped = jax.tree.map(lambda *a: jnp.stack(a), *[_run(name, p) for p in parts])
  _assert_trees_close(batched, looped)


@pytest.mark.parametrize("name", NAMES)
def test_eval_shape(name):
  args = _args(name, "bfloat16")
  shapes = jax.eval_shape(lambda a: CASES[name].fn(**a), args)
  out = _run(name, args, jax.jit)
  assert jax.tree.structure(shapes) == jax.tree.structure(out)
  for s, o in zip(jax.tree.leaves(shapes), jax.tree.leaves(out)):
    assert (s.shape, s.dtype) == (o.shape, o.dtype)


@pytest.mark.parametrize("dtype", LOWP + ["float64"])
@pytest.mark.parametrize("name", NAMES)
def test_dtypes(name, dtype):
  """Output in the input's dtype; statistics >= float32; running stats keep float32."""
  with jax.enable_x64(dtype == "float64"):
    out = _run(name, _args(name, dtype), jax.jit)
    got = [leaf.dtype for leaf in jax.tree.leaves(out)]
    assert got == CASES[name].out_dtypes(jnp.dtype(dtype)), got


@pytest.mark.parametrize("stats_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("dtype", LOWP)
def test_running_stats_keep_their_dtype(dtype, stats_dtype):
  x = _x(np.random.default_rng(0), SHAPE, dtype)
  stats = jn.init_batch_stats(5, stats_dtype)
  for training in (True, False):
    y, new = jn.batch_norm(x, stats, training=training)
    assert y.dtype == x.dtype
    assert [v.dtype for v in new] == [jnp.dtype(stats_dtype)] * 2
  with jax.enable_x64(True):
    s64 = jn.init_batch_stats(5, jnp.float64)
    _, new = jn.batch_norm(_x(np.random.default_rng(0), SHAPE, "float32"), s64, training=True)
    assert [v.dtype for v in new] == [jnp.dtype(jnp.float64)] * 2
    _, new = jn.batch_norm(_x(np.random.default_rng(0), SHAPE, "float64"),
                           jn.init_batch_stats(5), training=True)
    assert [v.dtype for v in new] == [F32] * 2


# ----------------------------------------------------------------------------- gradients


def _loss_of(name, args):
  """A scalar function of the differentiable inputs (the rest closed over)."""
  case = CASES[name]
  const = {k: v for k, v in args.items() if k not in case.diff}

  def f(*diff):
    out = case.fn(**const, **dict(zip(case.diff, diff)))
    return out

  return f, tuple(args[k] for k in case.diff)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite(name, dtype):
  f, diff = _loss_of(name, _args(name, dtype))

  def loss(*d):
    leaves = jax.tree.leaves(f(*d))
    return sum(jnp.sum(jnp.sin(leaf.astype(jnp.float32) * (i + 1)))
               for i, leaf in enumerate(leaves))

  grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(diff)))))(*diff)
  for g, d in zip(grads, diff):
    assert jax.tree.structure(g) == jax.tree.structure(d)
    for gl, dl in zip(jax.tree.leaves(g), jax.tree.leaves(d)):
      assert gl.dtype == dl.dtype
      assert np.isfinite(np.asarray(gl, np.float32)).all()
      assert np.abs(np.asarray(gl, np.float32)).max() > 0  # the gradient reaches every input


@pytest.mark.parametrize("name", NAMES)
def test_check_grads_float64(name):
  with jax.enable_x64(True):
    args = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype != bool else a,
                        _args(name, "float64"))
    f, diff = _loss_of(name, args)
    check_grads(jax.jit(f), diff, order=2, modes=["rev"], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- batch norm state


def _bn_args(dtype="float32"):
  return _args("batch_norm_train", dtype)


@pytest.mark.parametrize("dtype", LOWP)
def test_batch_norm_state_type_stable(dtype):
  a = _bn_args(dtype)
  train = jn.batch_norm(a["x"], a["stats"], a["scale"], a["bias"], training=True)
  evals = jn.batch_norm(a["x"], a["stats"], a["scale"], a["bias"], training=False)
  assert jax.tree.structure(train) == jax.tree.structure(evals)
  assert type(train[1]) is type(evals[1]) is jn.BatchStats
  for t, e in zip(jax.tree.leaves(train), jax.tree.leaves(evals)):
    assert (t.shape, t.dtype) == (e.shape, e.dtype)


def test_batch_norm_in_lax_cond_both_branches():
  a = _bn_args()

  @jax.jit
  def step(flag, x, stats):
    return lax.cond(flag,
                    lambda: jn.batch_norm(x, stats, a["scale"], a["bias"], training=True),
                    lambda: jn.batch_norm(x, stats, a["scale"], a["bias"], training=False))

  for flag in (True, False):
    got = step(jnp.asarray(flag), a["x"], a["stats"])
    want = jn.batch_norm(a["x"], a["stats"], a["scale"], a["bias"], training=flag)
    _assert_trees_close(got, want)


def test_batch_norm_in_lax_scan():
  rng = np.random.default_rng(1)
  xs = jnp.asarray(rng.standard_normal((6, 8, 5)) * 2 + 1, jnp.bfloat16)
  stats = jn.init_batch_stats(5)

  def body(s, x):
    y, s = jn.batch_norm(x, s, training=True, momentum=0.8)
    return s, y

  final, ys = jax.jit(lambda s, xs: lax.scan(body, s, xs))(stats, xs)
  s = stats
  for i in range(xs.shape[0]):
    y, s = jn.batch_norm(xs[i], s, training=True, momentum=0.8)
    np.testing.assert_allclose(np.asarray(ys[i], np.float32), np.asarray(y, np.float32),
                               rtol=1e-2, atol=1e-2)
  _assert_trees_close(final, s, rtol=1e-5)
  assert [v.dtype for v in final] == [F32, F32]
  assert not np.allclose(np.asarray(final.mean), 0)


def test_import_does_not_import_flax():
  code = "import sys, jaxnorm; sys.exit(1 if 'flax' in sys.modules else 0)"
  assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ----------------------------------------------------------------------------- vmap(axis_name)


P = 3  # parts of the batch


def _part_masks():
  """Per-sample masks for 3 parts of 4 rows: 4, 1 and 0 rows included (unequal counts)."""
  m = np.zeros((P, 4), bool)
  m[0] = True
  m[1, 2] = True
  return m


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("masked", [False, True])
def test_vmap_axis_name_moments(masked, offset):
  rng = np.random.default_rng(2)
  x = jnp.asarray(offset + rng.standard_normal((P * 4, 2, 3)), jnp.float32)
  w = _part_masks().reshape(P * 4, 1, 1) if masked else np.ones((P * 4, 1, 1), bool)
  if masked:  # an elementwise mask too, so counts differ per feature
    w = w & (rng.random((P * 4, 2, 3)) < 0.7) | (np.arange(P * 4) == 0)[:, None, None]
  split = lambda a: a.reshape((P, 4) + a.shape[1:])
  f = lambda x, w: jn.moments(x, axis=(0, 1), where=w, axis_name="b")
  parts = jax.jit(jax.vmap(f, axis_name="b"))(split(x), split(jnp.asarray(w)))
  whole = jn.moments(x, axis=(0, 1), where=w)
  ref = R.moments(np.asarray(x, np.float64), (0, 1), w)
  for p in range(P):
    np.testing.assert_array_equal(np.asarray(parts.count[p]), np.asarray(whole.count))
    np.testing.assert_allclose(np.asarray(parts.mean[p]), np.asarray(whole.mean), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(parts.var[p]), np.asarray(whole.var), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(parts.var[p]), ref.var.reshape(3), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(whole.count), ref.count.reshape(3))


def test_vmap_axis_name_tuple_of_names():
  """Nested vmaps reduced over both names at once (a 2-D device mesh)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 3, 5, 4)) + 5, jnp.float32)
  w = jnp.asarray(rng.random((2, 3, 5, 1)) < 0.6)
  f = lambda x, w: jn.moments(x, axis=0, where=w, axis_name=("i", "j"))
  parts = jax.vmap(jax.vmap(f, axis_name="j"), axis_name="i")(x, w)
  whole = jn.moments(x.reshape(30, 4), axis=0, where=w.reshape(30, 1))
  for leaf, want in zip(parts, whole):
    np.testing.assert_allclose(np.asarray(leaf).reshape(6, 4),
                               np.broadcast_to(np.asarray(want), (6, 4)), rtol=1e-5)


@pytest.mark.parametrize("degenerate", ["running", "batch"])
@pytest.mark.parametrize("masked", [False, True])
def test_vmap_axis_name_batch_norm(masked, degenerate):
  rng = np.random.default_rng(4)
  x = jnp.asarray(3 + rng.standard_normal((P * 4, 5)), jnp.float32)
  w = _part_masks().reshape(P * 4, 1) if masked else None
  stats = _stats(rng, 5)
  kw = dict(training=True, momentum=0.7, unbiased_var=True, degenerate=degenerate)
  split = lambda a: None if a is None else jnp.asarray(a).reshape((P, 4) + a.shape[1:])
  f = lambda x, w: jn.batch_norm(x, stats, where=w, axis_name="b", **kw)
  y, new = jax.jit(jax.vmap(f, axis_name="b"))(split(x), split(w))
  y_whole, new_whole = jn.batch_norm(x, stats, where=w, **kw)
  np.testing.assert_allclose(np.asarray(y).reshape(P * 4, 5), np.asarray(y_whole),
                             rtol=1e-5, atol=1e-5)
  for p in range(P):
    _assert_trees_close(jax.tree.map(lambda a: a[p], new), new_whole, rtol=1e-5)
  ref = R.batch_norm(x, stats.mean, stats.var, where=w, **kw)
  np.testing.assert_allclose(np.asarray(new_whole.var), ref.new_var, rtol=1e-5)


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("masked", [False, True])
def test_vmap_axis_name_feature_norms(fn, masked):
  """Sequence/tensor parallelism: the normalized axis is split over a mapped axis."""
  rng = np.random.default_rng(5)
  B, F = 4, 6
  x = jnp.asarray(2 + rng.standard_normal((B, P * F)), jnp.float32)
  scale = _p(rng, P * F, True)
  w = np.ones((B, P * F), bool)
  if masked:  # part 0: everything; part 1: one element per row; part 2: nothing
    w[:, F:] = False
    w[:, F + 2] = True
  split = lambda a: jnp.moveaxis(jnp.asarray(a).reshape(a.shape[:-1] + (P, F)), -2, 0)
  if fn == "layer_norm":
    g = lambda x, s, w: jn.layer_norm(x, s, s - 1, where=w, axis_name="b")
    whole = jn.layer_norm(x, scale, scale - 1, where=w)
  else:
    g = lambda x, s, w: jn.rms_norm(x, s, where=w, axis_name="b")
    whole = jn.rms_norm(x, scale, where=w)
  parts = jax.jit(jax.vmap(g, axis_name="b"))(split(x), split(scale), split(w))
  joined = jnp.moveaxis(parts, 0, -2).reshape(B, P * F)
  np.testing.assert_allclose(np.asarray(joined), np.asarray(whole), rtol=1e-5, atol=1e-5)
