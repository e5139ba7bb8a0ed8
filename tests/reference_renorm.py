"""Float64 oracles for Batch Renorm, Ghost BN and EvoNorm-B0/S0, from the papers' formulas.

Written independently of jaxnorm, on top of ``reference.py``'s two-pass masked
moments.  Every function takes ``xp``: ``numpy`` for values, ``jax.numpy`` (under
``jax.enable_x64``) for gradients by autodiff; ``sg`` is the stop-gradient to use
(identity for NumPy).
"""

from __future__ import annotations

import numpy as np

import reference as R

F64 = np.float64


def _layout(x, feature_axes, xp):
  x = xp.asarray(x).astype(F64)
  feat = R.canon(feature_axes, x.ndim)
  red = tuple(a for a in range(x.ndim) if a not in feat)
  bshape = tuple(d if i in feat else 1 for i, d in enumerate(x.shape))
  fshape = tuple(x.shape[a] for a in feat)
  return x, feat, red, bshape, fshape


def batch_renorm(x, run_mean, run_var, scale=None, bias=None, *, training, r_max, d_max,
                 feature_axes=-1, momentum=0.99, epsilon=1e-5, where=None, xp=np,
                 sg=lambda v: v):
  """Ioffe 2017, Algorithm 1: returns ``(y, new_mean, new_var)``."""
  x, feat, red, bshape, fshape = _layout(x, feature_axes, xp)
  rm = xp.asarray(run_mean).astype(F64).reshape(bshape)
  rv = xp.asarray(run_var).astype(F64).reshape(bshape)
  sc, bi = R.per_feature(scale, x.shape, feat, xp), R.per_feature(bias, x.shape, feat, xp)
  sigma = xp.sqrt(rv + epsilon)
  if not training:
    return R.affine((x - rm) / sigma, sc, bi), rm.reshape(fshape), rv.reshape(fshape)
  s = R.moments(x, red, where, xp)
  sigma_b = xp.sqrt(s.var + epsilon)
  r = sg(xp.clip(sigma_b / sigma, 1 / r_max, r_max))
  d = sg(xp.clip((s.mean - rm) / sigma, -d_max, d_max))
  y = R.affine((x - s.mean) / sigma_b * r + d, sc, bi)
  new_mean, new_var = R.update_batch_stats(rm, rv, s.mean, s.var, s.count, momentum=momentum,
                                           xp=xp)
  return y, new_mean.reshape(fshape), new_var.reshape(fshape)


def ghost_batch_norm(x, run_mean, run_var, scale=None, bias=None, *, training,
                     virtual_batch_size, feature_axes=-1, momentum=0.99, epsilon=1e-5,
                     where=None, xp=np):
  """Hoffer et al. 2017: batch norm per virtual batch (a Python loop over them); running
  averages from the count-weighted mean of the virtual batches' means and variances."""
  x, feat, red, bshape, fshape = _layout(x, feature_axes, xp)
  if not training:
    return batch_renorm(x, run_mean, run_var, scale, bias, training=False, r_max=1, d_max=0,
                        feature_axes=feature_axes, epsilon=epsilon, xp=xp)
  w = R.full_mask(where, x.shape, xp)
  sc, bi = R.per_feature(scale, x.shape, feat, xp), R.per_feature(bias, x.shape, feat, xp)
  ys, means, vars_, counts = [], [], [], []
  for g in range(x.shape[0] // virtual_batch_size):
    sl = slice(g * virtual_batch_size, (g + 1) * virtual_batch_size)
    s = R.moments(x[sl], red, w[sl], xp)
    z = (x[sl] - s.mean) / xp.sqrt(s.var + epsilon)
    part = lambda p: None if p is None or p.shape[0] == 1 else p[sl]
    ys.append(R.affine(z, sc if part(sc) is None else part(sc),
                       bi if part(bi) is None else part(bi)))
    means.append(s.mean)
    vars_.append(s.var)
    counts.append(s.count)
  n = sum(counts)
  mean_v = sum(c * m for c, m in zip(counts, means)) / n
  var_v = sum(c * v for c, v in zip(counts, vars_)) / n
  rm = xp.asarray(run_mean).astype(F64).reshape(bshape)
  rv = xp.asarray(run_var).astype(F64).reshape(bshape)
  new_mean, new_var = R.ema(rm, mean_v, momentum), R.ema(rv, var_v, momentum)
  return xp.concatenate(ys, axis=0), new_mean.reshape(fshape), new_var.reshape(fshape)


def evonorm_b0(x, run_mean, run_var, scale, bias, v1, *, training, momentum=0.99,
               epsilon=1e-5, where=None, xp=np):
  """Liu et al. 2020, EvoNorm-B0 on channels-last (N, spatial..., C): batch variance over
  (N, spatial), instance variance per sample and channel over the spatial axes."""
  x, feat, red, bshape, fshape = _layout(x, -1, xp)
  rm = xp.asarray(run_mean).astype(F64).reshape(bshape)
  rv = xp.asarray(run_var).astype(F64).reshape(bshape)
  p = lambda a: R.per_feature(a, x.shape, feat, xp)
  if training:
    s = R.moments(x, red, where, xp)
    var_b = s.var
    new_mean, new_var = R.update_batch_stats(rm, rv, s.mean, s.var, s.count,
                                             momentum=momentum, xp=xp)
  else:
    var_b, new_mean, new_var = rv, rm, rv
  inst = R.moments(x, tuple(range(1, x.ndim - 1)), where, xp)
  den = xp.maximum(xp.sqrt(var_b + epsilon), p(v1) * x + xp.sqrt(inst.var + epsilon))
  return R.affine(x / den, p(scale), p(bias)), new_mean.reshape(fshape), new_var.reshape(fshape)


def evonorm_s0(x, scale, bias, v1, *, num_groups, epsilon=1e-5, where=None, xp=np):
  """Liu et al. 2020, EvoNorm-S0 on channels-last: ``x sigmoid(v1 x) / sqrt(var_G + eps)``,
  the group variance per sample over the spatial axes and the group's channels
  (computed with a Python loop over the groups)."""
  x, feat, _, _, _ = _layout(x, -1, xp)
  w = R.full_mask(where, x.shape, xp)
  c = x.shape[-1]
  size = c // num_groups
  outs = []
  for g in range(num_groups):
    xs, ws = x[..., g * size:(g + 1) * size], w[..., g * size:(g + 1) * size]
    s = R.moments(xs, tuple(range(1, x.ndim)), ws, xp)
    outs.append(xp.broadcast_to(xp.sqrt(s.var + epsilon), s.var.shape[:-1] + (size,)))
  std = xp.concatenate(outs, axis=-1)
  p = lambda a: R.per_feature(a, x.shape, feat, xp)
  z = x / (1 + xp.exp(-p(v1) * x)) / std
  return R.affine(z, p(scale), p(bias))
