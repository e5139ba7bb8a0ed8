"""The contract every public function keeps, run over all of them.

jit equals eager; vmap over an extra leading axis equals a loop; dtypes (output in
the input's dtype, statistics in at least float32, running averages in their own
dtype); ``jax.eval_shape``; finite gradients; ``check_grads`` to second order in
float64; the state of every stateful function is type-stable between training and
evaluation (``lax.cond``) and over steps (``lax.scan``); and ``vmap(...,
axis_name=...)`` over a split batch equals the unsplit batch, also when masks leave
the parts with unequal counts.

Cases are named ``"<public function>"`` or ``"<public function>:<variant>"``;
``test_every_public_function_is_covered`` fails when a public function has neither a
case nor an entry (with its reason) in ``EXCLUDED``.
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
  dtypes of the output.  ``grad_order``: the order ``check_grads`` checks (0: not
  checked; each such case says why).  ``state``: for a stateful function, the name
  of its state argument; its ``fn`` then takes ``training`` (default True) unless
  ``has_training`` is False, and ``state_out(out)`` picks the new state.
  ``check_grads_on`` picks the output leaves ``check_grads`` compares (default all).
  """
  make: Callable
  fn: Callable
  diff: tuple
  out_dtypes: Callable
  grad_order: int = 2
  state: str | None = None
  has_training: bool = True
  state_out: Callable = lambda out: out[1]
  check_grads_on: Callable = lambda leaves: leaves


F32 = jnp.dtype(jnp.float32)
I32 = jnp.dtype(jnp.int32)


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
    "batch_norm:train": Case(
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), stats=_stats(rng, 5),
                                  scale=_p(rng, 5, True), bias=_p(rng, 5),
                                  where=_mask(rng, SHAPE)),
        fn=lambda x, stats, scale, bias, where: jn.batch_norm(
            x, stats, scale, bias, training=True, where=where, momentum=0.9),
        diff=("x", "stats", "scale", "bias"), out_dtypes=lambda dt: [dt, F32, F32]),
    "batch_norm:train_nchw": Case(
        make=lambda rng, dt: dict(x=_x(rng, (4, 3, 2, 2), dt), stats=_stats(rng, 3),
                                  scale=_p(rng, 3, True), bias=_p(rng, 3)),
        fn=lambda x, stats, scale, bias: jn.batch_norm(
            x, stats, scale, bias, training=True, feature_axes=1, unbiased_var=True),
        diff=("x", "stats", "scale", "bias"), out_dtypes=lambda dt: [dt, F32, F32]),
    "batch_norm:eval": Case(
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


# ----------------------------------------------------------------------------- later families


def _far_stats(rng, n):
  """Running averages far from the batch's (mean ~1.5, var ~1): Batch Renorm's ``r``
  (~0.1 < 1 / r_max = 0.5) and ``d`` (> 0.85 > d_max = 0.5) sit at their clip limits, so these stop-gradient constants are locally
  constant and the numerical derivatives in check_grads see the same function."""
  return jn.BatchStats(jnp.asarray(rng.uniform(-12, -8, n), jnp.float32),
                       jnp.asarray(rng.uniform(50, 100, n), jnp.float32))


def _counted(rng, n):
  return jn.CountedBatchStats(_p(rng, n), _p(rng, n, True),
                              jnp.asarray(rng.integers(1, 5, n), jnp.int32))


def _labels(rng, n, classes=3):
  return jnp.asarray(rng.integers(0, classes, n), jnp.int32)


def _tlu_input(rng, tau, shape, dtype):
  """``tau + (+-)[0.2, 1]``: every element at least 0.2 from TLU's kink."""
  sign = rng.choice([-1.0, 1.0], shape)
  return jnp.asarray(np.asarray(tau) + sign * rng.uniform(0.2, 1, shape), dtype)


def _v1_b0(rng, n):
  """EvoNorm-B0's ``v1`` as ``+-[0.8, 1.2] * 2``: with ``x`` in [1, 2] a feature with
  ``v1 > 0`` takes the instance branch of the max everywhere (``v1 x + std_I >= 1.6
  > sqrt(var_B + eps) ~ 0.3``), one with ``v1 < 0`` the batch branch (``<= -1.6 +
  std_I``): both branches are exercised, away from the kink."""
  sign = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
  return jnp.asarray(2 * sign * rng.uniform(0.8, 1.2, n), jnp.float32)


def _spectral(rng, out, fan_in):
  """A kernel ``(fan_in, out)`` whose leading singular value is 4x the next (the power
  iteration converges fast) and a unit ``u``."""
  a = np.linalg.qr(rng.standard_normal((fan_in, fan_in)))[0]
  b = np.linalg.qr(rng.standard_normal((out, out)))[0]
  s = np.zeros((fan_in, out))
  s[np.arange(min(fan_in, out)), np.arange(min(fan_in, out))] = [4.0, 1.0, 0.7, 0.5][:min(
      fan_in, out)]
  u = rng.standard_normal(out)
  return a @ s @ b.T, jn.SpectralState(jnp.asarray(u / np.linalg.norm(u), jnp.float32),
                                        jnp.asarray(rng.uniform(2, 5), jnp.float32))


def _population(rng, n):
  c = rng.uniform(5, 10, n)
  return jn.PopulationStats(*(jnp.asarray(v, jnp.float32) for v in (
      c, rng.standard_normal(n), c * rng.uniform(0.5, 2, n), c * rng.uniform(0.5, 1, n),
      c * rng.uniform(1, 1.5, n), rng.uniform(1, 3, n))))


def _spectral_make(rng, dt):
  w, state = _spectral(rng, 4, 6)
  return dict(w=jnp.asarray(w, dt), state=state)


CASES.update({
    "batch_norm:counted_cumulative": Case(  # PyTorch's momentum=None
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), stats=_counted(rng, 5),
                                  scale=_p(rng, 5, True), where=_mask(rng, SHAPE)),
        fn=lambda x, stats, scale, where, training=True: jn.batch_norm(
            x, stats, scale, training=training, where=where, momentum=None, unbiased_var=True),
        diff=("x", "stats", "scale"), out_dtypes=lambda dt: [dt, F32, F32, I32], state="stats"),
    "batch_norm:counted_debias": Case(  # Haiku's zero-debiased EMA
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), stats=_counted(rng, 5), bias=_p(rng, 5)),
        fn=lambda x, stats, bias, training=True: jn.batch_norm(
            x, stats, None, bias, training=training, momentum=0.9, debias=True),
        diff=("x", "stats", "bias"), out_dtypes=lambda dt: [dt, F32, F32, I32], state="stats"),
    "batch_renorm": Case(
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), stats=_far_stats(rng, 5),
                                  scale=_p(rng, 5, True), bias=_p(rng, 5),
                                  where=_mask(rng, SHAPE)),
        fn=lambda x, stats, scale, bias, where, training=True: jn.batch_renorm(
            x, stats, scale, bias, training=training, where=where, momentum=0.9, r_max=2.0,
            d_max=0.5),
        diff=("x", "stats", "scale", "bias"), out_dtypes=lambda dt: [dt, F32, F32],
        state="stats"),
    "ghost_batch_norm": Case(
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), stats=_stats(rng, 5),
                                  scale=_p(rng, 5, True), bias=_p(rng, 5),
                                  where=_mask(rng, SHAPE)),
        fn=lambda x, stats, scale, bias, where, training=True: jn.ghost_batch_norm(
            x, stats, scale, bias, training=training, virtual_batch_size=2, where=where,
            momentum=0.9, unbiased_var=True),
        diff=("x", "stats", "scale", "bias"), out_dtypes=lambda dt: [dt, F32, F32],
        state="stats"),
    "evonorm_b0": Case(
        make=lambda rng, dt: dict(x=jnp.asarray(rng.uniform(1, 2, SHAPE), dt),
                                  stats=_stats(rng, 5), scale=_p(rng, 5, True), bias=_p(rng, 5),
                                  v1=_v1_b0(rng, 5), where=_mask(rng, SHAPE)),
        fn=lambda x, stats, scale, bias, v1, where, training=True: jn.evonorm_b0(
            x, stats, scale, bias, v1, training=training, where=where, momentum=0.9),
        diff=("x", "stats", "scale", "bias", "v1"), out_dtypes=lambda dt: [dt, F32, F32],
        state="stats"),
    "evonorm_s0": Case(
        make=lambda rng, dt: dict(x=_x(rng, (4, 3, 6), dt), scale=_p(rng, 6, True),
                                  bias=_p(rng, 6), v1=_p(rng, 6, True),
                                  where=_mask(rng, (4, 3, 6))),
        fn=lambda x, scale, bias, v1, where: jn.evonorm_s0(x, scale, bias, v1, num_groups=3,
                                                           where=where),
        diff=("x", "scale", "bias", "v1"), out_dtypes=lambda dt: [dt]),
    "filter_response_norm": Case(
        # tau = +-8 lies outside |y| <= sqrt(3) * 2 + |bias|: each feature is entirely on
        # one side of TLU's kink (identity or constant), so check_grads is smooth.
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), scale=_p(rng, 5, True),
                                  bias=jnp.asarray(rng.uniform(-1, 1, 5), jnp.float32),
                                  tau=jnp.asarray([-8.0, 8.0, -8.0, -8.0, 8.0]),
                                  eps=jnp.asarray(rng.uniform(0.3, 0.6), jnp.float32),
                                  where=_mask(rng, SHAPE)),
        fn=lambda x, scale, bias, tau, eps, where: jn.filter_response_norm(
            x, scale, bias, tau=tau, learned_epsilon=eps, where=where),
        diff=("x", "scale", "bias", "tau", "eps"), out_dtypes=lambda dt: [dt]),
    "tlu": Case(
        make=lambda rng, dt: (lambda tau: dict(y=_tlu_input(rng, tau, SHAPE, dt), tau=tau))(
            _p(rng, 5)),
        fn=lambda y, tau: jn.tlu(y, tau),
        diff=("y", "tau"), out_dtypes=lambda dt: [dt]),
    "modulate": Case(
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), shift=_p(rng, 20).reshape(4, 5),
                                  scale=_p(rng, 20).reshape(4, 5)),
        fn=lambda x, shift, scale: jn.modulate(x, shift, scale),
        diff=("x", "shift", "scale"), out_dtypes=lambda dt: [dt]),
    "gated_residual": Case(
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), h=_x(rng, SHAPE, dt),
                                  gate=_p(rng, 20).reshape(4, 5)),
        fn=lambda x, h, gate: jn.gated_residual(x, h, gate),
        diff=("x", "h", "gate"), out_dtypes=lambda dt: [dt]),
    "adaptive_norm:layer": Case(
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), shift=_p(rng, 20).reshape(4, 5),
                                  scale=_p(rng, 20).reshape(4, 5), where=_mask(rng, SHAPE)),
        fn=lambda x, shift, scale, where: jn.adaptive_norm(x, shift, scale, where=where),
        diff=("x", "shift", "scale"), out_dtypes=lambda dt: [dt]),
    "adaptive_norm:rms": Case(
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), shift=_p(rng, 20).reshape(4, 5),
                                  scale=_p(rng, 20).reshape(4, 5)),
        fn=lambda x, shift, scale: jn.adaptive_norm(x, shift, scale, norm="rms"),
        diff=("x", "shift", "scale"), out_dtypes=lambda dt: [dt]),
    "conditional_batch_norm": Case(
        make=lambda rng, dt: dict(x=_x(rng, SHAPE, dt), stats=_stats(rng, 5),
                                  labels=_labels(rng, 4), scale_table=_p(rng, 15).reshape(3, 5),
                                  bias_table=_p(rng, 15).reshape(3, 5), where=_mask(rng, SHAPE)),
        fn=lambda x, stats, labels, scale_table, bias_table, where, training=True:
            jn.conditional_batch_norm(x, stats, labels, scale_table, bias_table,
                                      training=training, where=where, momentum=0.9),
        diff=("x", "stats", "scale_table", "bias_table"), out_dtypes=lambda dt: [dt, F32, F32],
        state="stats"),
    "weight_standardize": Case(
        make=lambda rng, dt: dict(w=_x(rng, (2, 3, 4), dt), gain=_p(rng, 4, True)),
        fn=lambda w, gain: jn.weight_standardize(w, gain),
        diff=("w", "gain"), out_dtypes=lambda dt: [dt]),
    "scaled_weight_standardize": Case(  # var * fan_in >> epsilon: away from the floor's kink
        make=lambda rng, dt: dict(w=_x(rng, (2, 3, 4), dt), gain=_p(rng, 4, True)),
        fn=lambda w, gain: jn.scaled_weight_standardize(w, gain),
        diff=("w", "gain"), out_dtypes=lambda dt: [dt]),
    "weight_norm": Case(
        make=lambda rng, dt: dict(v=_x(rng, (3, 4), dt), g=_p(rng, 4, True)),
        fn=lambda v, g: jn.weight_norm(v, g),
        diff=("v", "g"), out_dtypes=lambda dt: [dt]),
    "weight_norm_scale": Case(
        make=lambda rng, dt: dict(v=_x(rng, (3, 4), dt)),
        fn=lambda v: jn.weight_norm_scale(v),
        diff=("v",), out_dtypes=lambda dt: [_stat(dt)]),
    "spectral_norm:train": Case(
        # First order only: u and v are stop_gradient constants, so autodiff's
        # d sigma / dW = u v^T equals the numerical derivative only where the power
        # iteration has converged (n_steps=20, singular values 4 : 1); the second
        # derivative of sigma involves d(u, v)/dW, which the paper's (and PyTorch's)
        # gradient deliberately drops.
        make=_spectral_make,
        fn=lambda w, state, training=True: jn.spectral_norm(w, state, training=training,
                                                            n_steps=20),
        # The new state (u, sigma) is stop_gradient by design (a buffer, as PyTorch's), so
        # check_grads compares the normalized kernel only.
        diff=("w",), out_dtypes=lambda dt: [dt, F32, F32], grad_order=1, state="state",
        check_grads_on=lambda leaves: leaves[:1]),
    "spectral_norm:eval": Case(
        make=_spectral_make,
        fn=lambda w, state: jn.spectral_norm(w, state, training=False),
        diff=("w",), out_dtypes=lambda dt: [dt, F32, F32]),
    "fold_batch_norm": Case(
        make=lambda rng, dt: dict(kernel=_x(rng, (2, 3, 4), dt), bias=_x(rng, (4,), dt),
                                  stats=_stats(rng, 4), scale=_p(rng, 4, True),
                                  bn_bias=_p(rng, 4)),
        fn=lambda kernel, bias, stats, scale, bn_bias: jn.fold_batch_norm(kernel, bias, stats,
                                                                          scale, bn_bias),
        diff=("kernel", "bias", "stats", "scale", "bn_bias"), out_dtypes=lambda dt: [dt, dt]),
    "fold_batch_norm_into_next": Case(  # a grouped conv: (window 2, in 6 / 2 groups, out 4)
        make=lambda rng, dt: dict(kernel=_x(rng, (2, 3, 4), dt), bias=_x(rng, (4,), dt),
                                  stats=_stats(rng, 6), scale=_p(rng, 6, True),
                                  bn_bias=_p(rng, 6)),
        fn=lambda kernel, bias, stats, scale, bn_bias: jn.fold_batch_norm_into_next(
            kernel, bias, stats, scale, bn_bias, feature_group_count=2),
        diff=("kernel", "bias", "stats", "scale", "bn_bias"), out_dtypes=lambda dt: [dt, dt]),
    "update_population_stats": Case(
        make=lambda rng, dt: dict(acc=_population(rng, 5), x=_x(rng, SHAPE, dt),
                                  where=_mask(rng, SHAPE)),
        fn=lambda acc, x, where: jn.update_population_stats(
            acc, jn.moments(x, axis=(0, 1), where=where)),
        diff=("acc", "x"), out_dtypes=lambda dt: [F32] * 6,
        state="acc", has_training=False, state_out=lambda out: out),
    "population_batch_stats": Case(
        # every variance the accumulator defines; ``batches`` (a count of batches for the
        # user, read by none of them) is held constant
        make=lambda rng, dt: (lambda acc: dict(acc=acc[:5], batches=acc.batches))(
            _population(rng, 5)),
        fn=lambda acc, batches: tuple(
            jn.population_batch_stats(jn.PopulationStats(*acc, batches), variance=v,
                                      unbiased=u)
            for v, u in (("total", True), ("batch", False), ("batch", True))),
        diff=("acc",), out_dtypes=lambda dt: [F32] * 6),
})
NAMES = sorted(CASES)
STATEFUL = sorted(n for n in NAMES if CASES[n].state is not None)

# Public names without a case, and why.
EXCLUDED = {
    # types and state constructors: no computation to check (their use is checked
    # through the functions that take them: batch_norm, spectral_norm, ...)
    "BatchStats": "type", "Moments": "type", "CountedBatchStats": "type",
    "SpectralState": "type", "PopulationStats": "type", "Converted": "type",
    "init_batch_stats": "state constructor (zeros/ones of a shape)",
    "init_spectral_state": "state constructor (a random unit vector); its output is the state "
                           "the spectral_norm cases use",
    "init_population_stats": "state constructor (zeros of a shape)",
    # configuration, not array functions
    "plain_autodiff": "context manager switching the gradient implementation (test_vjp.py)",
    "kernels_available": "returns a bool: whether the fused CPU kernels load (test_kernels.py)",
    "no_kernels": "context manager disabling the fused CPU kernels (test_kernels.py)",
    "renorm_schedule": "a scalar schedule of an integer step count, not an array function "
                       "(traced and jitted steps tested in test_renorm.py)",
    # checkpoint converters: NumPy dicts/arrays in and out, host-side, never traced
    # (tests/test_convert.py runs them against real torch modules and the Keras and
    # Haiku formats)
    "from_torch": "converter (test_convert.py)", "to_torch": "converter (test_convert.py)",
    "from_keras": "converter (test_convert.py)", "to_keras": "converter (test_convert.py)",
    "from_haiku": "converter (test_convert.py)", "to_haiku": "converter (test_convert.py)",
    "conv_kernel_from_torch": "NumPy transpose of a kernel, host-side (test_convert.py)",
    "conv_kernel_to_torch": "NumPy transpose of a kernel, host-side (test_convert.py)",
}


def test_every_public_function_is_covered():
  public = {n for n in dir(jn) if not n.startswith("_") and callable(getattr(jn, n))}
  covered = {n.split(":")[0] for n in NAMES}
  assert not covered & set(EXCLUDED), covered & set(EXCLUDED)
  missing = public - covered - set(EXCLUDED)
  assert not missing, f"public functions without a contract Case or EXCLUDED entry: {missing}"
  stale = (covered | set(EXCLUDED)) - public
  assert not stale, f"cases/exclusions for names that are not public: {stale}"


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
  """Output in the input's dtype; statistics >= float32; running stats keep float32.

  Read from ``jax.eval_shape`` (no compile); ``test_eval_shape`` checks that it
  agrees with what the jitted function returns."""
  with jax.enable_x64(dtype == "float64"):
    out = jax.eval_shape(lambda a: CASES[name].fn(**a), _args(name, dtype))
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


def _inexact(a):
  return jnp.issubdtype(a.dtype, jnp.inexact)


def _loss_of(name, args):
  """``(f, leaves)``: ``f(*leaves)`` maps the floating leaves of the differentiable
  inputs to the floating leaves of the output (the rest, e.g. an int32 update count,
  held constant)."""
  case = CASES[name]
  const = {k: v for k, v in args.items() if k not in case.diff}
  leaves, treedef = jax.tree.flatten({k: args[k] for k in case.diff})
  floating = [i for i, leaf in enumerate(leaves) if _inexact(leaf)]

  def f(*diff):
    new = list(leaves)
    for i, v in zip(floating, diff):
      new[i] = v
    out = case.fn(**const, **jax.tree.unflatten(treedef, new))
    return [leaf for leaf in jax.tree.leaves(out) if _inexact(leaf)]

  return f, tuple(leaves[i] for i in floating)


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


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].grad_order])
def test_check_grads_float64(name):
  with jax.enable_x64(True):
    args = jax.tree.map(lambda a: a.astype(jnp.float64) if _inexact(a) else a,
                        _args(name, "float64"))
    f, diff = _loss_of(name, args)
    g = lambda *d: CASES[name].check_grads_on(f(*d))
    check_grads(jax.jit(g), diff, order=CASES[name].grad_order, modes=["rev"], atol=1e-5,
                rtol=1e-5)


# ----------------------------------------------------------------------------- batch norm state


def _bn_args(dtype="float32"):
  return _args("batch_norm:train", dtype)


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


def _types_shapes_dtypes(tree):
  return (jax.tree.structure(tree), [type(tree)],
          [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(tree)])


@pytest.mark.parametrize("name", STATEFUL)
def test_state_type_stable_cond_and_scan(name):
  """Training and evaluation return the same pytree (type, shapes, dtypes), so both fit
  ``lax.cond``'s branches; the new state fed back as the carry of ``lax.scan``
  (3 steps) equals a Python loop and keeps its type."""
  case = CASES[name]
  a = _args(name)
  if case.has_training:
    train, evals = case.fn(**a, training=True), case.fn(**a, training=False)
    assert _types_shapes_dtypes(train) == _types_shapes_dtypes(evals)
    assert _types_shapes_dtypes(case.state_out(train)) == _types_shapes_dtypes(a[case.state])
    step = jax.jit(lambda flag, a: lax.cond(flag, lambda: case.fn(**a, training=True),
                                            lambda: case.fn(**a, training=False)))
    for flag, want in ((True, train), (False, evals)):
      _assert_trees_close(step(jnp.asarray(flag), a), want, rtol=1e-5, atol=1e-6)

  steps = [_args(name, seed=s) for s in range(1, 4)]
  xs = jax.tree.map(lambda *v: jnp.stack(v),
                    *[{k: v for k, v in s.items() if k != case.state} for s in steps])

  def body(state, inputs):
    new = case.state_out(case.fn(**inputs, **{case.state: state}))
    return new, None

  final, _ = jax.jit(lambda s, xs: lax.scan(body, s, xs))(a[case.state], xs)
  state = a[case.state]
  for s in steps:
    state = body(state, {k: v for k, v in s.items() if k != case.state})[0]
  assert _types_shapes_dtypes(final) == _types_shapes_dtypes(a[case.state])
  _assert_trees_close(final, state, rtol=1e-5, atol=1e-6)


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


def _split_fns(rng):
  """Batch-statistics functions of ``(x, where, labels, axis_name)`` (training)."""
  stats, scale, bias = _stats(rng, 5), _p(rng, 5, True), _p(rng, 5)
  table = _p(rng, 15).reshape(3, 5)
  kw = dict(training=True, momentum=0.7, unbiased_var=True)
  return {
      "batch_renorm": lambda x, w, lab, axis_name=None: jn.batch_renorm(
          x, stats, scale, bias, where=w, r_max=1.5, d_max=0.5, axis_name=axis_name, **kw),
      "conditional_batch_norm": lambda x, w, lab, axis_name=None: jn.conditional_batch_norm(
          x, stats, lab, table, table - 1, where=w, axis_name=axis_name, **kw),
      "evonorm_b0": lambda x, w, lab, axis_name=None: jn.evonorm_b0(
          x, stats, scale, bias, _v1_b0(np.random.default_rng(0), 5), where=w,
          axis_name=axis_name, **kw),
      # Ghost BN: with axis_name the g-th virtual batch is the g-th chunk of every part
      # (its docstring), so the unsplit batch is laid out virtual batch by virtual batch:
      # whole row g * P * V + p * V + j is row g * V + j of part p, and the whole batch
      # uses virtual_batch_size = P * V.
      "ghost_batch_norm": lambda x, w, lab, axis_name=None: jn.ghost_batch_norm(
          x, stats, scale, bias, where=w, axis_name=axis_name,
          virtual_batch_size=2 if axis_name else 2 * P, **kw),
  }


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", ["batch_renorm", "conditional_batch_norm", "evonorm_b0",
                                  "ghost_batch_norm"])
def test_vmap_axis_name_split_batch(name, masked):
  """``vmap(axis_name)`` over 3 parts of 4 samples equals the 12-sample batch (output
  and new state); masked: the parts include 4, 1 and 0 samples."""
  rng = np.random.default_rng(6)
  f = _split_fns(rng)[name]
  n, V = P * 4, 2
  if name == "ghost_batch_norm":  # idx[p, g * V + j] = g * P * V + p * V + j
    g, j = np.divmod(np.arange(4), V)
    idx = g[None] * P * V + np.arange(P)[:, None] * V + j[None]
  else:
    idx = np.arange(n).reshape(P, 4)
  x = jnp.asarray(rng.uniform(1, 2, (n, 2, 5)) + rng.standard_normal(5), jnp.float32)
  lab = jnp.asarray(rng.integers(0, 3, n), jnp.int32)
  w = np.ones((n, 1, 1), bool)
  if masked:
    w[idx.reshape(-1)] = _part_masks().reshape(n, 1, 1)
  w = jnp.asarray(w)
  y_parts, new_parts = jax.jit(jax.vmap(lambda x, w, lab: f(x, w, lab, axis_name="b"),
                                        axis_name="b"))(x[idx], w[idx], lab[idx])
  y, new = f(x, w, lab)
  np.testing.assert_allclose(np.asarray(y_parts), np.asarray(y)[idx], rtol=1e-5, atol=1e-5)
  for p in range(P):
    _assert_trees_close(jax.tree.map(lambda a: a[p], new_parts), new, rtol=1e-5)
