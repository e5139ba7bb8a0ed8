"""The standard normalizers as Flax linen modules (see the package docstring)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as _dtypes
from jax.nn import initializers

from .. import _axes
from .._norms import batch_norm, group_norm, instance_norm, layer_norm, rms_norm
from .._stats import real_dtype
from .._types import Axes, BatchStats, CountedBatchStats, DType
from ._population import sow_batch_moments

Initializer = Any


def _running(count, *, mean, var) -> BatchStats | CountedBatchStats:
  """The running averages as the core takes them (with the update count if there is one)."""
  if count is None:
    return BatchStats(mean=mean, var=var)
  return CountedBatchStats(mean=mean, var=var, count=count.value)


def _param(mdl: nn.Module, name: str, init: Initializer, shape, param_dtype) -> jax.Array:
  """A per-feature parameter, created exactly as flax does (a list shape)."""
  return mdl.param(name, init, list(shape), param_dtype)


def _widen_mean(mean: jax.Array, x: jax.Array) -> jax.Array:
  """A real running mean (e.g. from flax's ``init``, which creates it float32) meeting a
  complex input is widened to complex (a cast; flax's mean turns complex on its first
  update the same way)."""
  if jnp.iscomplexobj(x) and not jnp.iscomplexobj(mean):
    return mean.astype(jnp.promote_types(mean.dtype, x.dtype))
  return mean


def _affine(mdl: nn.Module, x: jax.Array, fshape, *, use_scale: bool, use_bias: bool):
  """Creates ``scale`` then ``bias`` (flax's order) and returns them with flax's output dtype."""
  scale = _param(mdl, "scale", mdl.scale_init, fshape, mdl.param_dtype) if use_scale else None
  bias = _param(mdl, "bias", mdl.bias_init, fshape, mdl.param_dtype) if use_bias else None
  if not mdl.force_float32_reductions:  # flax keeps them in param_dtype: same thing here
    scale = None if scale is None else jnp.asarray(scale, mdl.param_dtype)
    bias = None if bias is None else jnp.asarray(bias, mdl.param_dtype)
  out_dtype = _dtypes.canonicalize_dtype(x, scale, bias, dtype=mdl.dtype)
  return scale, bias, out_dtype


class BatchNorm(nn.Module, kw_only=True):
  """Batch normalization with running averages in the ``batch_stats`` collection.

  Training (``use_running_average=False``)::

    mean_B, var_B = statistics of x over every axis except `axis` (and across `axis_name`)
    y = (x - mean_B) * rsqrt(var_B + epsilon) * scale + bias
    batch_stats <- momentum * batch_stats + (1 - momentum) * (mean_B, var_B)

  Evaluation (``use_running_average=True``): the same map with the running
  averages, which are left unchanged.  As in flax, the running averages are not
  updated while the module is being initialised (``self.is_initializing()``) and
  ``axis_name`` is not used then.  Computed by :func:`jaxnorm.batch_norm`.

  Attributes:
    use_running_average: if True, normalize with the running averages; may also
      be given at call time (exactly one of the two).
    axis: the feature axis or axes (default -1, NHWC); every other axis is reduced.
    momentum: ``new = momentum * old + (1 - momentum) * batch``.
    epsilon: added to the variance.
    dtype: output dtype; default: ``x`` promoted with ``scale``/``bias`` (flax's rule).
    param_dtype: dtype of ``scale`` and ``bias`` (and of the ``batch_stats`` when
      ``force_float32_reductions=False``).
    use_bias, use_scale, bias_init, scale_init: the affine parameters.
    axis_name, axis_index_groups: reduce statistics across devices (sums and
      counts, exact also with masks).
    use_fast_variance: accepted for compatibility; selects nothing (statistics
      are always accurate and one-pass).
    force_float32_reductions: only selects the ``batch_stats`` dtype (float32 if
      True, else ``param_dtype``); reductions are always at least float32.
    degenerate: ``"running"`` (jaxnorm default) or ``"batch"`` (flax behaviour)
      for features whose batch statistics are unusable; see :func:`jaxnorm.batch_norm`.
    unbiased_var: update the running variance with ``n / (n - 1)`` (PyTorch).
    debias: Haiku's zero-debiased EMA; ``momentum=None``: PyTorch's cumulative
      average (:func:`jaxnorm.update_batch_stats`).  Either adds the variable
      ``batch_stats/count`` (int32 per feature, updates so far); with the
      defaults the variables are exactly flax's.

  PreciseBN hook: in training mode, when the ``batch_moments`` collection is
  mutable, the input's batch moments are sown there (see
  :func:`jaxnorm.linen.precise_batch_stats`); otherwise nothing happens.

  >>> import jax, jax.numpy as jnp
  >>> from jaxnorm import linen as jnn
  >>> x = jnp.array([[1., 2.], [3., 6.]])
  >>> bn = jnn.BatchNorm(use_running_average=False, momentum=0.5, epsilon=0.)
  >>> variables = bn.init(jax.random.key(0), x)
  >>> y, updates = bn.apply(variables, x, mutable=['batch_stats'])
  >>> y
  Array([[-1., -1.],
         [ 1.,  1.]], dtype=float32)
  >>> updates['batch_stats']['mean'], updates['batch_stats']['var']
  (Array([1., 2.], dtype=float32), Array([1. , 2.5], dtype=float32))
  """

  use_running_average: bool | None = None
  axis: Axes = -1
  momentum: float | None = 0.99
  epsilon: float = 1e-5
  dtype: DType | None = None
  param_dtype: DType = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  degenerate: str = "running"
  unbiased_var: bool = False
  debias: bool = False

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    """Normalizes ``x``; ``mask`` (boolean, broadcastable to ``x``) selects the
    elements that enter the batch statistics."""
    fn = "jaxnorm.linen.BatchNorm"
    use_running_average = _axes.check_training(
        nn.merge_param("use_running_average", self.use_running_average, use_running_average),
        fn=fn, name="use_running_average")
    x = _axes.check_floating(x, fn=fn, allow_complex=True)
    feat = _axes.canonical_axes(self.axis, x.ndim, what="axis", fn=fn)
    fshape = _axes.feature_shape(x.shape, feat)
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    var_dtype = real_dtype(stats_dtype)  # complex input: complex mean, real var
    mean_dtype = jnp.promote_types(stats_dtype, x.dtype) if jnp.iscomplexobj(x) else var_dtype
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, mean_dtype),
                            list(fshape))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, var_dtype),
                           list(fshape))
    ra_count = (self.variable("batch_stats", "count", lambda s: jnp.zeros(s, jnp.int32),
                              list(fshape)) if self.momentum is None or self.debias else None)
    scale, bias, out_dtype = _affine(self, x, fshape, use_scale=self.use_scale,
                                     use_bias=self.use_bias)
    initializing = self.is_initializing()
    y, new_stats = batch_norm(
        x, _running(ra_count, mean=_widen_mean(ra_mean.value, x), var=ra_var.value), scale, bias,
        training=not use_running_average, feature_axes=feat, momentum=self.momentum,
        epsilon=self.epsilon, where=mask,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        degenerate=self.degenerate, unbiased_var=self.unbiased_var, debias=self.debias, dtype=out_dtype)
    if not use_running_average and not initializing:
      ra_mean.value = new_stats.mean
      ra_var.value = new_stats.var
      if ra_count is not None:
        ra_count.value = new_stats.count
    if not use_running_average:
      sow_batch_moments(self, x, feature_axes=feat, where=mask, axis_name=self.axis_name,
                        axis_index_groups=self.axis_index_groups)
    return y


class LayerNorm(nn.Module, kw_only=True):
  """Layer normalization: ``(x - E[x]) * rsqrt(Var[x] + epsilon) * scale + bias``.

  Statistics per example over ``reduction_axes`` (default: the last axis);
  ``scale`` and ``bias`` have the shape of ``x`` at ``feature_axes``.  Computed by
  :func:`jaxnorm.layer_norm`.  Fields as in ``flax.linen.LayerNorm``
  (``use_fast_variance`` selects nothing; reductions are always at least
  float32).

  >>> import jax, jax.numpy as jnp
  >>> from jaxnorm import linen as jnn
  >>> x = jnp.array([[1., 3.], [2., 6.]])
  >>> ln = jnn.LayerNorm(epsilon=0.)
  >>> variables = ln.init(jax.random.key(0), x)
  >>> jax.tree.map(jnp.shape, variables)
  {'params': {'bias': (2,), 'scale': (2,)}}
  >>> ln.apply(variables, x)
  Array([[-1.,  1.],
         [-1.,  1.]], dtype=float32)
  """

  epsilon: float = 1e-6
  dtype: DType | None = None
  param_dtype: DType = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    fn = "jaxnorm.linen.LayerNorm"
    x = _axes.check_floating(x, fn=fn, allow_complex=True)
    feat = _axes.canonical_axes(self.feature_axes, x.ndim, what="feature_axes", fn=fn)
    scale, bias, out_dtype = _affine(self, x, _axes.feature_shape(x.shape, feat),
                                     use_scale=self.use_scale, use_bias=self.use_bias)
    return layer_norm(x, scale, bias, reduction_axes=self.reduction_axes, feature_axes=feat,
                      where=mask, epsilon=self.epsilon, axis_name=self.axis_name,
                      axis_index_groups=self.axis_index_groups, dtype=out_dtype)


class RMSNorm(nn.Module, kw_only=True):
  """Root-mean-square normalization: ``x * rsqrt(E[x^2] + epsilon) * scale`` (no centring).

  Statistics per example over ``reduction_axes`` (default: the last axis);
  ``scale`` has the shape of ``x`` at ``feature_axes``.  Computed by
  :func:`jaxnorm.rms_norm`.  Fields as in ``flax.linen.RMSNorm``.

  >>> import jax, jax.numpy as jnp
  >>> from jaxnorm import linen as jnn
  >>> x = jnp.array([[1., 1., 1., 1.], [2., -2., 2., -2.]])
  >>> rms = jnn.RMSNorm(epsilon=0.)
  >>> rms.apply(rms.init(jax.random.key(0), x), x)
  Array([[ 1.,  1.,  1.,  1.],
         [ 1., -1.,  1., -1.]], dtype=float32)
  """

  epsilon: float = 1e-6
  dtype: DType | None = None
  param_dtype: DType = jnp.float32
  use_scale: bool = True
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    fn = "jaxnorm.linen.RMSNorm"
    x = _axes.check_floating(x, fn=fn, allow_complex=True)
    feat = _axes.canonical_axes(self.feature_axes, x.ndim, what="feature_axes", fn=fn)
    scale, _, out_dtype = _affine(self, x, _axes.feature_shape(x.shape, feat),
                                  use_scale=self.use_scale, use_bias=False)
    return rms_norm(x, scale, reduction_axes=self.reduction_axes, feature_axes=feat,
                    where=mask, epsilon=self.epsilon, axis_name=self.axis_name,
                    axis_index_groups=self.axis_index_groups, dtype=out_dtype)


class GroupNorm(nn.Module, kw_only=True):
  """Group normalization: the channels (last axis) are split into groups, and each
  group is normalized with the mean and variance over its channels and
  ``reduction_axes``::

    y[..., c] = (x[..., c] - mean_g(c)) * rsqrt(var_g(c) + epsilon) * scale[c] + bias[c]

  Give ``num_groups`` (default 32) or ``group_size`` (then pass
  ``num_groups=None``).  ``reduction_axes`` default to every axis except the
  first (batch) and must include the last; for an unbatched input pass them, e.g.
  ``reduction_axes=(0, 1, 2)`` for (H, W, C).  Computed by :func:`jaxnorm.group_norm`.

  >>> import jax, jax.numpy as jnp
  >>> from jaxnorm import linen as jnn
  >>> x = jnp.array([[1., 3., 10., 30.]])
  >>> gn = jnn.GroupNorm(num_groups=2, epsilon=0.)
  >>> gn.apply(gn.init(jax.random.key(0), x), x)
  Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """

  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-6
  dtype: DType | None = None
  param_dtype: DType = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes | None = None
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    fn = "jaxnorm.linen.GroupNorm"
    x = _axes.check_floating(x, fn=fn, allow_complex=True)
    if x.ndim == 0:
      raise ValueError(f"{fn}: the input must have a channel axis (the last), got a scalar.")
    scale, bias, out_dtype = _affine(self, x, x.shape[-1:], use_scale=self.use_scale,
                                     use_bias=self.use_bias)
    return group_norm(x, scale, bias, num_groups=self.num_groups, group_size=self.group_size,
                      reduction_axes=self.reduction_axes, channel_axis=-1, where=mask,
                      epsilon=self.epsilon, axis_name=self.axis_name,
                      axis_index_groups=self.axis_index_groups, dtype=out_dtype)


class InstanceNorm(nn.Module, kw_only=True):
  """Instance normalization: per example and per feature, over every other axis
  except the first (batch)::

    y = (x - E_spatial[x]) * rsqrt(Var_spatial[x] + epsilon) * scale + bias

  ``scale`` and ``bias`` have the shape of ``x`` at ``feature_axes`` (default -1).
  Computed by :func:`jaxnorm.instance_norm`.

  >>> import jax, jax.numpy as jnp
  >>> from jaxnorm import linen as jnn
  >>> x = jnp.array([[[1., 10.], [3., 30.]]])  # (N=1, L=2, C=2)
  >>> inorm = jnn.InstanceNorm(epsilon=0.)
  >>> inorm.apply(inorm.init(jax.random.key(0), x), x)
  Array([[[-1., -1.],
          [ 1.,  1.]]], dtype=float32)
  """

  epsilon: float = 1e-6
  dtype: DType | None = None
  param_dtype: DType = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  feature_axes: Axes = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    fn = "jaxnorm.linen.InstanceNorm"
    x = _axes.check_floating(x, fn=fn, allow_complex=True)
    feat = _axes.canonical_axes(self.feature_axes, x.ndim, what="feature_axes", fn=fn)
    scale, bias, out_dtype = _affine(self, x, _axes.feature_shape(x.shape, feat),
                                     use_scale=self.use_scale, use_bias=self.use_bias)
    return instance_norm(x, scale, bias, feature_axes=feat, where=mask, epsilon=self.epsilon,
                         axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
                         dtype=out_dtype)
