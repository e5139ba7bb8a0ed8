"""The oracle: float64 normalization written independently of jaxnorm.

Every function takes an array module ``xp``: ``numpy`` (the default) gives the
float64 NumPy reference used to judge outputs and running averages; ``jax.numpy``
(inside ``with jax.enable_x64(True):``) gives the same straightforward math as
differentiable float64 JAX code, used to judge ``jax.grad`` of jaxnorm.

The math is the textbook one, on purpose: a two-pass mean and variance over the
included elements (``where`` True), the mask broadcast to the full input, the
group split done with a transpose to channels-last (jaxnorm reshapes in place),
and batch norm's running averages and "running" degenerate policy spelled out
per feature.  Nothing here imports jaxnorm.

Also here: the error model used to set dtype-appropriate tolerances
(:func:`ulp`, :func:`assert_within`).
"""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
import numpy as np

F64 = np.float64


# ----------------------------------------------------------------------------- helpers


def canon(axes, ndim):
  """int or sequence of ints -> sorted tuple of non-negative axes."""
  if isinstance(axes, (int, np.integer)):
    axes = (axes,)
  return tuple(sorted(int(a) % ndim for a in axes))


def full_mask(where, shape, xp=np):
  """The mask broadcast to ``shape`` (NumPy rules: leading 1s are added)."""
  if where is None:
    return xp.ones(shape, bool)
  where = xp.asarray(where).astype(bool)
  where = where.reshape((1,) * (len(shape) - where.ndim) + tuple(where.shape))
  return xp.broadcast_to(where, shape)


def per_feature(p, shape, feature_axes, xp=np):
  """A parameter of the feature shape laid out against ``shape``; rank-x arrays pass."""
  if p is None:
    return None
  p = xp.asarray(p).astype(F64)
  fshape = tuple(shape[a] for a in feature_axes)
  if tuple(p.shape) == fshape:
    return p.reshape(tuple(d if i in feature_axes else 1 for i, d in enumerate(shape)))
  assert p.ndim == len(shape), (p.shape, shape)
  return p


def affine(z, scale, bias):
  if scale is not None:
    z = z * scale
  if bias is not None:
    z = z + bias
  return z


# ----------------------------------------------------------------------------- statistics


class Stats(NamedTuple):
  mean: object   # keep-dims shape, float64
  var: object    # biased, two-pass
  count: object  # number of included elements (float64)


def moments(x, axes, where=None, xp=np) -> Stats:
  """Two-pass masked mean/variance (keep-dims) in float64; count 0 gives 0 and 0."""
  x = xp.asarray(x).astype(F64)
  axes = canon(axes, x.ndim)
  w = full_mask(where, x.shape, xp)
  n = xp.sum(w, axis=axes, keepdims=True).astype(F64)
  n_safe = xp.where(n > 0, n, 1.0)
  mean = xp.sum(xp.where(w, x, 0.0), axis=axes, keepdims=True) / n_safe
  dev = xp.where(w, x - mean, 0.0)
  var = xp.sum(dev * dev, axis=axes, keepdims=True) / n_safe
  return Stats(mean, var, n)


def mean_square(x, axes, where=None, xp=np) -> Stats:
  """RMS norm's statistic: ``E[x^2]`` over the included elements (as ``var``, mean 0)."""
  x = xp.asarray(x).astype(F64)
  axes = canon(axes, x.ndim)
  w = full_mask(where, x.shape, xp)
  n = xp.sum(w, axis=axes, keepdims=True).astype(F64)
  n_safe = xp.where(n > 0, n, 1.0)
  ms = xp.sum(xp.where(w, x * x, 0.0), axis=axes, keepdims=True) / n_safe
  return Stats(xp.zeros_like(ms), ms, n)


def standardize(x, mean, var, epsilon, xp=np, count=None):
  """``(x - mean) / sqrt(var + epsilon)``; 0 where ``count == 0`` (a group with no
  included element outputs ``bias``)."""
  z = (xp.asarray(x).astype(F64) - mean) / xp.sqrt(var + epsilon)
  return z if count is None else xp.where(count > 0, z, 0.0)


class Out(NamedTuple):
  """A reference output with the statistics that were used to produce it."""
  y: object
  mean: object   # statistics used (keep-dims, broadcast against x)
  var: object
  count: object


# ----------------------------------------------------------------------------- normalizers


def normalize(x, mean, var, scale=None, bias=None, *, epsilon=1e-5, xp=np):
  x = xp.asarray(x).astype(F64)
  f = lambda p: None if p is None else xp.asarray(p).astype(F64)
  return affine(standardize(x, f(mean), f(var), epsilon, xp), f(scale), f(bias))


def layer_norm(x, scale=None, bias=None, *, reduction_axes=-1, feature_axes=-1, where=None,
               epsilon=1e-6, xp=np) -> Out:
  x = xp.asarray(x).astype(F64)
  feat = canon(feature_axes, x.ndim)
  s = moments(x, reduction_axes, where, xp)
  z = standardize(x, s.mean, s.var, epsilon, xp, s.count)
  y = affine(z, per_feature(scale, x.shape, feat, xp), per_feature(bias, x.shape, feat, xp))
  return Out(y, s.mean, s.var, s.count)


def rms_norm(x, scale=None, *, reduction_axes=-1, feature_axes=-1, where=None, epsilon=1e-6,
             xp=np) -> Out:
  x = xp.asarray(x).astype(F64)
  feat = canon(feature_axes, x.ndim)
  s = mean_square(x, reduction_axes, where, xp)
  z = standardize(x, s.mean, s.var, epsilon, xp, s.count)
  y = affine(z, per_feature(scale, x.shape, feat, xp), None)
  return Out(y, s.mean, s.var, s.count)


def instance_norm(x, scale=None, bias=None, *, feature_axes=-1, where=None, epsilon=1e-6,
                  xp=np) -> Out:
  x = xp.asarray(x).astype(F64)
  feat = canon(feature_axes, x.ndim)
  red = tuple(a for a in range(1, x.ndim) if a not in feat)
  return layer_norm(x, scale, bias, reduction_axes=red, feature_axes=feat, where=where,
                    epsilon=epsilon, xp=xp)


def group_norm(x, scale=None, bias=None, *, num_groups=None, group_size=None,
               reduction_axes=None, channel_axis=-1, where=None, epsilon=1e-6, xp=np) -> Out:
  """Channels-last transpose, split C into (G, C/G), reduce, undo."""
  x = xp.asarray(x).astype(F64)
  nd = x.ndim
  c = channel_axis % nd
  red = canon(reduction_axes, nd) if reduction_axes is not None else tuple(range(1, nd))
  assert c in red
  C = x.shape[c]
  G = num_groups if num_groups is not None else C // group_size
  w = full_mask(where, x.shape, xp)
  to_last = lambda a: xp.moveaxis(a, c, -1)
  split = lambda a: a.reshape(a.shape[:-1] + (G, C // G))
  xs, ws = split(to_last(x)), split(to_last(w))
  # axis a != c sits at a (a < c) or a - 1 (a > c) after moveaxis; then G and C/G
  red_s = tuple(a if a < c else a - 1 for a in red if a != c) + (nd,)
  s = moments(xs, red_s, ws, xp)
  zs = standardize(xs, s.mean, s.var, epsilon, xp, s.count)
  back = lambda a: xp.moveaxis(xp.broadcast_to(a, xs.shape).reshape(xs.shape[:-2] + (C,)), -1, c)
  z = back(zs)
  y = affine(z, per_feature(scale, x.shape, (c,), xp), per_feature(bias, x.shape, (c,), xp))
  return Out(y, back(s.mean), back(s.var), back(s.count))


class BNOut(NamedTuple):
  y: object
  mean: object      # statistics used to normalize (broadcast shape)
  var: object
  count: object     # batch count (broadcast shape)
  new_mean: object  # running averages after the step (feature shape)
  new_var: object
  usable: object    # features whose batch statistics were used (feature shape)


def ema(old, batch, momentum):
  return momentum * old + (1.0 - momentum) * batch


def update_batch_stats(mean, var, batch_mean, batch_var, count, *, momentum, where=None,
                       unbiased_var=False, xp=np):
  """Flax momentum: ``new = momentum * old + (1 - momentum) * batch``; optional n/(n-1)."""
  mean, var = xp.asarray(mean).astype(F64), xp.asarray(var).astype(F64)
  batch_mean, batch_var = xp.asarray(batch_mean).astype(F64), xp.asarray(batch_var).astype(F64)
  count = xp.asarray(count).astype(F64)
  if unbiased_var:
    batch_var = xp.where(count > 1, batch_var * count / xp.where(count > 1, count - 1, 1.0),
                         batch_var)
  new_mean, new_var = ema(mean, batch_mean, momentum), ema(var, batch_var, momentum)
  if where is not None:
    new_mean, new_var = xp.where(where, new_mean, mean), xp.where(where, new_var, var)
  return new_mean, new_var


def batch_norm(x, run_mean, run_var, scale=None, bias=None, *, training, feature_axes=-1,
               momentum=0.99, epsilon=1e-5, where=None, degenerate="running",
               unbiased_var=False, xp=np) -> BNOut:
  x = xp.asarray(x).astype(F64)
  feat = canon(feature_axes, x.ndim)
  red = tuple(a for a in range(x.ndim) if a not in feat)
  bshape = tuple(d if i in feat else 1 for i, d in enumerate(x.shape))
  fshape = tuple(x.shape[a] for a in feat)
  rm = xp.asarray(run_mean).astype(F64).reshape(bshape)
  rv = xp.asarray(run_var).astype(F64).reshape(bshape)
  sc, bi = per_feature(scale, x.shape, feat, xp), per_feature(bias, x.shape, feat, xp)
  if not training:
    y = affine(standardize(x, rm, rv, epsilon, xp), sc, bi)
    return BNOut(y, rm, rv, xp.zeros(bshape), rm.reshape(fshape), rv.reshape(fshape),
                 xp.zeros(fshape, bool))
  s = moments(x, red, where, xp)
  if degenerate == "running":
    usable = (s.count >= 2) & xp.isfinite(s.mean) & xp.isfinite(s.var)
  else:
    usable = xp.ones(bshape, bool)
  m = xp.where(usable, s.mean, rm)
  v = xp.where(usable, s.var, rv)
  y = affine(standardize(x, m, v, epsilon, xp, xp.where(usable, s.count, 1.0)), sc, bi)
  new_mean, new_var = update_batch_stats(
      rm, rv, s.mean, s.var, s.count, momentum=momentum,
      where=usable if degenerate == "running" else None, unbiased_var=unbiased_var, xp=xp)
  return BNOut(y, m, v, s.count, new_mean.reshape(fshape), new_var.reshape(fshape),
               usable.reshape(fshape))


# ----------------------------------------------------------------------------- tolerances


def ulp(dtype) -> float:
  """Unit roundoff of a dtype (half the gap above 1)."""
  return float(ml_dtypes.finfo(np.dtype(dtype)).eps) / 2


def compute_ulp(dtype) -> float:
  """Roundoff of the arithmetic jaxnorm must use: at least float32."""
  return min(ulp(dtype), ulp(np.float32))


def assert_within(actual, desired, tol, what=""):
  """Elementwise ``|actual - desired| <= tol`` (NaNs must match), with a useful report."""
  a = np.asarray(np.asarray(actual, dtype=np.float64))
  d = np.asarray(desired, dtype=np.float64)
  a, d = np.broadcast_arrays(a, d)
  tol = np.broadcast_to(np.asarray(tol, np.float64), d.shape)
  nan_a, nan_d = np.isnan(a), np.isnan(d)
  if not np.array_equal(nan_a, nan_d):
    raise AssertionError(f"{what}: NaN pattern differs; actual NaNs at {np.argwhere(nan_a)[:5]}, "
                         f"desired NaNs at {np.argwhere(nan_d)[:5]}")
  ok = nan_d | (a == d) | (np.abs(a - d) <= tol)
  if not ok.all():
    err = np.where(ok, 0, np.abs(a - d))
    i = np.unravel_index(np.argmax(err), err.shape)
    raise AssertionError(
        f"{what}: {int((~ok).sum())}/{ok.size} elements off; worst at {i}: actual {a[i]!r}, "
        f"desired {d[i]!r}, |diff| {abs(a[i] - d[i]):.3g} > tol {tol[i]:.3g}")


def max_ratio(actual, desired, tol) -> float:
  """max |actual - desired| / tol, for reporting how tight a tolerance is."""
  a, d = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  return float(np.nanmax(np.abs(a - d) / np.maximum(tol, 1e-300)))
