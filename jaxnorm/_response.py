"""Filter Response Normalization and the Thresholded Linear Unit (Singh & Krishnan 2019).

FRN (arXiv:1911.09737) normalizes each channel of each sample by the mean square of
its responses over the spatial axes -- no mean subtraction, no batch dependence::

    nu2 = mean(x^2)                    over the spatial axes, per sample and channel
    y   = scale * x * rsqrt(nu2 + eps) + bias
    z   = max(y, tau)                  (TLU, the activation that comes with it)

``eps`` is ``epsilon + |learned_epsilon|``: a fixed floor (default 1e-6, must be
>= 0) plus, optionally, the absolute value of a learned scalar.  The paper's code
uses ``rsqrt(nu2 + |eps|)`` with ``eps`` "a scalar constant or learnable
variable", and learns it where the spatial extent is 1x1 (then ``nu2 = x^2`` and,
with a tiny fixed ``eps``, FRN is almost ``sign(x)``); a floor keeps a learned eps
from collapsing to 0.  This is TensorFlow Addons' ``FilterResponseNormalization``
(``|epsilon| + |eps_learned|``, learned part initialised to 1e-4).

The statistic is the uncentred second moment: :func:`jaxnorm._vjp.standardize`
with ``center=False`` (the same path as RMS norm), so masks, ``axis_name`` and the
analytic backward come for free, and gradients reach a traced ``learned_epsilon``.
"""

from __future__ import annotations

import jax.numpy as jnp

from . import _axes, _vjp
from ._types import Array, Axes, AxisName, DType


def _check_learned_epsilon(e, *, fn: str) -> Array | None:
  """A learned epsilon must be one number (its gradient is a scalar sum)."""
  if e is None:
    return None
  e = _axes.check_floating(e, fn=fn, name="learned_epsilon")
  if e.size != 1:
    raise ValueError(
        f"{fn}: learned_epsilon must be a single number (shape () or (1,)), got shape "
        f"{e.shape}. FRN learns one epsilon per layer; reshape it, e.g. "
        "learned_epsilon.reshape(()).")
  return e.reshape(())


def frn_axes(x_shape, reduction_axes: Axes | None, feature_axes: Axes, *,
             fn: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(reduction_axes, feature_axes)`` canonicalised; the default reduction axes
  are the spatial ones: every axis except the batch axis 0 and ``feature_axes``."""
  ndim = len(x_shape)
  feat = _axes.canonical_axes(feature_axes, ndim, what="feature_axes", fn=fn)
  if reduction_axes is None:
    if 0 in feat:
      raise ValueError(f"{fn}: axis 0 is the batch axis and cannot be a feature axis "
                       f"(got feature_axes={feature_axes!r}); pass reduction_axes "
                       "explicitly for an unbatched input.")
    return _axes.other_axes((0,) + feat, ndim), feat
  red = _axes.canonical_axes(reduction_axes, ndim, what="reduction_axes", fn=fn)
  both = sorted(set(red) & set(feat))
  if both:
    raise ValueError(f"{fn}: axes {both} are in both reduction_axes {red} and feature_axes "
                     f"{feat}. FRN normalizes each feature over the other (spatial) axes; "
                     "list each axis in one of them.")
  return red, feat


def tlu(y: Array, tau: Array, *, feature_axes: Axes = -1) -> Array:
  """Thresholded Linear Unit: ``max(y, tau)`` with a learned per-feature threshold.

  ``tau`` has the feature shape (``y.shape`` at ``feature_axes``) or ``y``'s rank
  and broadcasts to it.  The result has ``y``'s dtype (``tau`` is rounded to it,
  which gives the same result as rounding after the max: rounding is monotone).

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> jn.tlu(jnp.array([[-2., 0.5], [1., -1.]]), jnp.array([-1., 0.]))
  Array([[-1. ,  0.5],
         [ 1. ,  0. ]], dtype=float32)
  """
  fn = "jaxnorm.tlu"
  y = _axes.check_floating(y, fn=fn, name="y")
  feat = _axes.canonical_axes(feature_axes, y.ndim, what="feature_axes", fn=fn)
  tau = _axes.per_feature(tau, name="tau", x_shape=y.shape, feature_axes=feat, fn=fn)
  if tau is None:
    raise TypeError(f"{fn}: tau is required (an array of the feature shape "
                    f"{_axes.feature_shape(y.shape, feat)}), got None.")
  return jnp.maximum(y, tau.astype(y.dtype))


def filter_response_norm(x: Array, scale: Array | None = None, bias: Array | None = None, *,
                         tau: Array | None = None, reduction_axes: Axes | None = None,
                         feature_axes: Axes = -1, where: Array | None = None,
                         epsilon: float = 1e-6, learned_epsilon: Array | None = None,
                         axis_name: AxisName | None = None, axis_index_groups=None,
                         dtype: DType | None = None) -> Array:
  """Filter Response Normalization, optionally followed by TLU::

    nu2 = mean(x^2 over reduction_axes)       (included elements only, with `where`)
    y   = x * rsqrt(nu2 + epsilon + |learned_epsilon|) * scale + bias
    z   = max(y, tau)                          (only when `tau` is given)

  No mean is subtracted and nothing is shared between samples, so the output of a
  sample never depends on the rest of the batch.

  Args:
    x: floating input, e.g. NHWC (the defaults) or NCHW (``feature_axes=1``).
    scale, bias, tau: optional; the feature shape (``x.shape`` at
      ``feature_axes``), or arrays of ``x``'s rank that broadcast to it.
    reduction_axes: default: every axis except the batch axis 0 and
      ``feature_axes`` (the spatial axes).  For an (N, C) input there are none:
      then ``nu2 = x^2`` elementwise, as in the paper's 1x1 case (learn epsilon
      there, or FRN is nearly ``sign(x)``).
    where: optional boolean mask broadcastable to ``x`` (padded positions False):
      only True elements enter ``nu2``; every element is normalized.  A
      statistic with no True element outputs ``bias`` (then TLU), zero gradient.
    epsilon: the fixed part of eps, >= 0.
    learned_epsilon: optional learned scalar; eps = epsilon + |learned_epsilon|.
    axis_name, axis_index_groups: also reduce ``nu2`` across these named device
      axes (spatially sharded inputs): sums and counts, exact.
    dtype: output dtype (default ``x.dtype``); ``nu2`` is at least float32.

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> x = jnp.array([[[3.], [-4.]]])        # (N=1, L=2, C=1): nu2 = 12.5
  >>> jn.filter_response_norm(x, epsilon=0.)
  Array([[[ 0.84852815],
          [-1.1313709 ]]], dtype=float32)
  >>> jn.filter_response_norm(x, tau=jnp.array([-1.]), epsilon=0.)
  Array([[[ 0.84852815],
          [-1.        ]]], dtype=float32)
  """
  fn = "jaxnorm.filter_response_norm"
  x = _axes.check_floating(x, fn=fn)
  _axes.check_nonnegative(epsilon, fn=fn, name="epsilon")
  red, feat = frn_axes(x.shape, reduction_axes, feature_axes, fn=fn)
  scale = _axes.per_feature(scale, name="scale", x_shape=x.shape, feature_axes=feat, fn=fn)
  bias = _axes.per_feature(bias, name="bias", x_shape=x.shape, feature_axes=feat, fn=fn)
  tau = _axes.per_feature(tau, name="tau", x_shape=x.shape, feature_axes=feat, fn=fn)
  where = _axes.check_mask(where, x.shape, fn=fn)
  learned = _check_learned_epsilon(learned_epsilon, fn=fn)
  eps = epsilon if learned is None else epsilon + jnp.abs(learned)
  y, _, _ = _vjp.standardize(x, red, scale, bias, where=where, epsilon=eps,
                             axis_name=axis_name, axis_index_groups=axis_index_groups,
                             center=False, dtype=dtype)
  if tau is not None:
    y = jnp.maximum(y, tau.astype(y.dtype))
  return y

