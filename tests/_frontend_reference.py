"""Float64 NumPy oracles and small helpers shared by the Flax frontend tests."""

from __future__ import annotations

import jax
import numpy as np


def canon(axes, ndim) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted(a % ndim for a in axes))


def moments64(x, axes, *, mask=None, center=True):
  """Masked mean and biased variance over ``axes`` (keep-dims), in float64."""
  x = np.asarray(x, np.float64)
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
  n = m.sum(axis=axes, keepdims=True)
  mean = np.where(m, x, 0).sum(axis=axes, keepdims=True) / n if center else np.zeros_like(n, float)
  var = np.where(m, (x - mean) ** 2, 0).sum(axis=axes, keepdims=True) / n
  return mean, var, n


def affine64(y, scale, bias, feature_axes):
  """``y * scale + bias`` with per-feature parameters laid out along ``feature_axes``."""
  bshape = tuple(d if i in feature_axes else 1 for i, d in enumerate(y.shape))
  if scale is not None:
    y = y * np.asarray(scale, np.float64).reshape(bshape)
  if bias is not None:
    y = y + np.asarray(bias, np.float64).reshape(bshape)
  return y


def norm64(x, reduction_axes, feature_axes, *, scale=None, bias=None, eps, mask=None,
           center=True):
  """Layer/RMS/instance/batch normalization with batch statistics, float64."""
  x = np.asarray(x, np.float64)
  mean, var, _ = moments64(x, reduction_axes, mask=mask, center=center)
  return affine64((x - mean) / np.sqrt(var + eps), scale, bias, feature_axes)


def group_norm64(x, num_groups, reduction_axes, *, scale=None, bias=None, eps):
  """Group norm over the last (channel) axis split into groups, float64."""
  x = np.asarray(x, np.float64)
  c = x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (num_groups, c // num_groups))
  red = tuple(a for a in canon(reduction_axes, x.ndim) if a != x.ndim - 1) + (xg.ndim - 1,)
  mean, var, _ = moments64(xg, red)
  y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
  return affine64(y, scale, bias, (x.ndim - 1,))


def max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def shapes_dtypes(tree):
  """``(shape, dtype)`` of every leaf, for comparing variable trees."""
  return jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), tree)
