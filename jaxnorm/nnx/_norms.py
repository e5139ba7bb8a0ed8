"""The standard normalizers as Flax nnx modules (see the package docstring)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes as _dtypes

from .. import _axes
from .._norms import batch_norm, group_norm, instance_norm, layer_norm, rms_norm
from .._types import Axes, BatchStats, CountedBatchStats, DType
from ._population import sow_batch_moments

Initializer = Any
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _make_affine(mdl: nnx.Module, num_features: int, rngs: nnx.Rngs, *, use_scale: bool,
                 use_bias: bool, scale_init, bias_init, param_dtype, scale_metadata,
                 bias_metadata) -> None:
  """``scale`` then ``bias``, each from its own ``rngs.params()`` key, as flax.nnx does."""
  shape = (num_features,)
  if use_scale:
    mdl.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
  else:
    mdl.scale = nnx.data(None)
  if use_bias:
    mdl.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
  else:
    mdl.bias = nnx.data(None)


def _value(v) -> jax.Array | None:
  return None if v is None else v[...]


def _fit(p: jax.Array | None, fshape: tuple[int, ...]) -> jax.Array | None:
  """Lays a flat ``(num_features,)`` variable out in the feature shape (a reshape).

  A size mismatch is left to the core, whose error names both shapes.
  """
  if p is None or p.shape == fshape or p.size != _axes.size(fshape, range(len(fshape))):
    return p
  return p.reshape(fshape)


def _running(mdl: nnx.Module, *, mean, var) -> BatchStats | CountedBatchStats:
  """The running averages as the core takes them (with the update count if there is one)."""
  count = getattr(mdl, "count", None)
  if count is None:
    return BatchStats(mean=mean, var=var)
  return CountedBatchStats(mean=mean, var=var, count=count[...].reshape(mean.shape))


class BatchNorm(nnx.Module):
  """Batch normalization with running averages in ``nnx.BatchStat`` variables.

  Training (``use_running_average=False``, set by ``model.train()``)::

    mean_B, var_B = statistics of x over every axis except `axis` (and across `axis_name`)
    y = (x - mean_B) * rsqrt(var_B + epsilon) * scale + bias
    self.mean, self.var <- momentum * (mean, var) + (1 - momentum) * (mean_B, var_B)

  Evaluation (``use_running_average=True``, set by ``model.eval()``): the same map
  with the running averages, kept in their own dtype (float32) even when
  ``dtype`` is lower.  Computed by :func:`jaxnorm.batch_norm`.

  Args:
    num_features: the number of features (the size of ``x`` at ``axis``).
    use_running_average: default mode; a call-time argument takes precedence.
    axis, momentum, epsilon, dtype, param_dtype, use_bias, use_scale, bias_init,
    scale_init, axis_name, axis_index_groups, promote_dtype, rngs, bias_metadata,
    scale_metadata: as in ``flax.nnx.BatchNorm``.
    use_fast_variance: accepted for compatibility; selects nothing.
    degenerate: ``"running"`` (default) or ``"batch"`` (flax); see :func:`jaxnorm.batch_norm`.
    unbiased_var: update the running variance with ``n / (n - 1)`` (PyTorch).
    debias: Haiku's zero-debiased EMA; ``momentum=None``: PyTorch's cumulative
      average (:func:`jaxnorm.update_batch_stats`).  Either adds ``self.count``
      (an int32 ``nnx.BatchStat`` per feature); with the defaults the state is
      exactly flax.nnx's.

  PreciseBN hook: in training mode under ``nnx.capture(..., jaxnorm.nnx.BatchMoments)``
  the input's batch moments are sown (see :func:`jaxnorm.nnx.precise_batch_stats`);
  otherwise nothing happens.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxnorm import nnx as jnnx
  >>> bn = jnnx.BatchNorm(2, momentum=0.5, epsilon=0., rngs=nnx.Rngs(0))
  >>> x = jnp.array([[1., 2.], [3., 6.]])
  >>> bn(x)
  Array([[-1., -1.],
         [ 1.,  1.]], dtype=float32)
  >>> bn.mean[...], bn.var[...]
  (Array([1., 2.], dtype=float32), Array([1. , 2.5], dtype=float32))
  >>> bn.eval(); bn.use_running_average
  True
  """

  def __init__(self, num_features: int, *, use_running_average: bool | None = False,
               axis: Axes = -1, momentum: float | None = 0.99, epsilon: float = 1e-5,
               dtype: DType | None = None, param_dtype: DType = jnp.float32,
               use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(),
               axis_name: Any = None, axis_index_groups: Any = None,
               use_fast_variance: bool = True,
               promote_dtype=_dtypes.promote_dtype, rngs: nnx.Rngs,
               bias_metadata: Mapping[str, Any] = _NO_METADATA,
               scale_metadata: Mapping[str, Any] = _NO_METADATA,
               degenerate: str = "running", unbiased_var: bool = False,
               debias: bool = False):
    fn = "jaxnorm.nnx.BatchNorm"
    _axes.check_choice(degenerate, ("running", "batch"), fn=fn, name="degenerate")
    feature_shape = (num_features,)
    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    if momentum is None or debias:  # only then: the default state is flax.nnx's
      self.count = nnx.BatchStat(jnp.zeros(feature_shape, jnp.int32))
    _make_affine(self, num_features, rngs, use_scale=use_scale, use_bias=use_bias,
                 scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype,
                 scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.degenerate = degenerate
    self.unbiased_var = unbiased_var
    self.debias = debias

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    """Normalizes ``x``; ``mask`` (boolean, broadcastable to ``x``) selects the
    elements that enter the batch statistics."""
    fn = "jaxnorm.nnx.BatchNorm"
    use_running_average = _axes.check_training(first_from(
        use_running_average, self.use_running_average,
        error_msg=(f"{fn}: no `use_running_average` was given. Pass it to the constructor "
                   "or the call, or set it with model.train() / model.eval() / "
                   "nnx.view(model, use_running_average=...).")),
        fn=fn, name="use_running_average")
    mean, var = self.mean[...], self.var[...]
    if jnp.iscomplexobj(x) and not jnp.iscomplexobj(mean):  # complex input: complex mean,
      mean = mean.astype(jnp.promote_types(mean.dtype, x.dtype))  # stored so below
    x, _, _, scale, bias = self.promote_dtype(
        (x, mean, var, _value(self.scale), _value(self.bias)), dtype=self.dtype)
    x = _axes.check_floating(x, fn=fn, allow_complex=True)
    out_dtype = _dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    feat = _axes.canonical_axes(self.axis, x.ndim, what="axis", fn=fn)
    fshape = _axes.check_num_features(self.num_features, x.shape, feat, fn=fn, field="axis")
    y, new_stats = batch_norm(
        x, _running(self, mean=_fit(mean, fshape), var=_fit(var, fshape)), _fit(scale, fshape),
        _fit(bias, fshape), training=not use_running_average, feature_axes=feat,
        momentum=self.momentum, epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, degenerate=self.degenerate,
        unbiased_var=self.unbiased_var, debias=self.debias, dtype=out_dtype)
    if not use_running_average:
      # as flax.nnx: no gradient flows into the running averages
      if self.mean._can_update or self.var._can_update:
        stop_gradient = jax.lax.stop_gradient
      else:
        stop_gradient = lambda v: v
      new_mean = stop_gradient(new_stats.mean.reshape(mean.shape))
      if new_mean.dtype != self.mean[...].dtype:  # widened to complex: a new dtype (flax.nnx
        self.mean.set_value(new_mean)             # would drop the imaginary part here)
      else:
        self.mean[...] = new_mean
      self.var[...] = stop_gradient(new_stats.var.reshape(var.shape))
      if isinstance(new_stats, CountedBatchStats):
        self.count[...] = new_stats.count.reshape(self.count.shape)
      sow_batch_moments(self, x, feature_axes=feat, where=mask, axis_name=self.axis_name,
                        axis_index_groups=self.axis_index_groups)
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view(model, use_running_average=...)``."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


class LayerNorm(nnx.Module):
  """Layer normalization: ``(x - E[x]) * rsqrt(Var[x] + epsilon) * scale + bias``.

  Statistics per example over ``reduction_axes`` (default: the last axis);
  ``scale``/``bias`` hold ``num_features`` entries laid out along ``feature_axes``.
  Arguments as in ``flax.nnx.LayerNorm``.  Computed by :func:`jaxnorm.layer_norm`.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxnorm import nnx as jnnx
  >>> ln = jnnx.LayerNorm(2, epsilon=0., rngs=nnx.Rngs(0))
  >>> ln(jnp.array([[1., 3.], [2., 6.]]))
  Array([[-1.,  1.],
         [-1.,  1.]], dtype=float32)
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-6,
               dtype: DType | None = None, param_dtype: DType = jnp.float32,
               use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(),
               reduction_axes: Axes = -1, feature_axes: Axes = -1,
               axis_name: Any = None, axis_index_groups: Any = None,
               use_fast_variance: bool = True,
               promote_dtype=_dtypes.promote_dtype, rngs: nnx.Rngs,
               bias_metadata: Mapping[str, Any] = _NO_METADATA,
               scale_metadata: Mapping[str, Any] = _NO_METADATA):
    _make_affine(self, num_features, rngs, use_scale=use_scale, use_bias=use_bias,
                 scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype,
                 scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: jax.Array | None = None):
    fn = "jaxnorm.nnx.LayerNorm"
    x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)),
                                        dtype=self.dtype)
    x = _axes.check_floating(x, fn=fn, allow_complex=True)
    feat = _axes.canonical_axes(self.feature_axes, x.ndim, what="feature_axes", fn=fn)
    fshape = _axes.check_num_features(self.num_features, x.shape, feat, fn=fn,
                                      field="feature_axes")
    return layer_norm(x, _fit(scale, fshape), _fit(bias, fshape),
                      reduction_axes=self.reduction_axes, feature_axes=feat, where=mask,
                      epsilon=self.epsilon, axis_name=self.axis_name,
                      axis_index_groups=self.axis_index_groups,
                      dtype=_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype))


class RMSNorm(nnx.Module):
  """Root-mean-square normalization: ``x * rsqrt(E[x^2] + epsilon) * scale``.

  Statistics per example over ``reduction_axes`` (default: the last axis).
  Arguments as in ``flax.nnx.RMSNorm``.  Computed by :func:`jaxnorm.rms_norm`.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxnorm import nnx as jnnx
  >>> rms = jnnx.RMSNorm(4, epsilon=0., rngs=nnx.Rngs(0))
  >>> rms(jnp.array([[2., -2., 2., -2.]]))
  Array([[ 1., -1.,  1., -1.]], dtype=float32)
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-6,
               dtype: DType | None = None, param_dtype: DType = jnp.float32,
               use_scale: bool = True, scale_init: Initializer = initializers.ones,
               reduction_axes: Axes = -1, feature_axes: Axes = -1,
               axis_name: Any = None, axis_index_groups: Any = None,
               use_fast_variance: bool = True,
               promote_dtype=_dtypes.promote_dtype, rngs: nnx.Rngs,
               scale_metadata: Mapping[str, Any] = _NO_METADATA):
    if use_scale:
      self.scale = nnx.Param(scale_init(rngs.params(), (num_features,), param_dtype),
                             **scale_metadata)
    else:
      self.scale = nnx.data(None)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, mask: jax.Array | None = None):
    fn = "jaxnorm.nnx.RMSNorm"
    x, scale = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
    x = _axes.check_floating(x, fn=fn, allow_complex=True)
    feat = _axes.canonical_axes(self.feature_axes, x.ndim, what="feature_axes", fn=fn)
    fshape = _axes.check_num_features(self.num_features, x.shape, feat, fn=fn,
                                      field="feature_axes")
    return rms_norm(x, _fit(scale, fshape),
                    reduction_axes=self.reduction_axes, feature_axes=feat, where=mask,
                    epsilon=self.epsilon, axis_name=self.axis_name,
                    axis_index_groups=self.axis_index_groups,
                    dtype=_dtypes.canonicalize_dtype(x, scale, dtype=self.dtype))


class GroupNorm(nnx.Module):
  """Group normalization: the channels (last axis) are split into groups, each
  normalized over its channels and ``reduction_axes``::

    y[..., c] = (x[..., c] - mean_g(c)) * rsqrt(var_g(c) + epsilon) * scale[c] + bias[c]

  Give ``num_groups`` (default 32) or ``group_size`` (then ``num_groups=None``),
  as keywords.  ``reduction_axes`` default to every axis but the first (batch)
  and may be any axes that include the last one, e.g. ``(0, 1, 2)`` for an
  unbatched (H, W, C) input.  Computed by :func:`jaxnorm.group_norm`.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxnorm import nnx as jnnx
  >>> gn = jnnx.GroupNorm(4, num_groups=2, epsilon=0., rngs=nnx.Rngs(0))
  >>> gn(jnp.array([[1., 3., 10., 30.]]))
  Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """

  def __init__(self, num_features: int, *, num_groups: int | None = 32,
               group_size: int | None = None, epsilon: float = 1e-6,
               dtype: DType | None = None, param_dtype: DType = jnp.float32,
               use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(),
               reduction_axes: Axes | None = None,
               axis_name: Any = None, axis_index_groups: Any = None,
               use_fast_variance: bool = True,
               promote_dtype=_dtypes.promote_dtype, rngs: nnx.Rngs,
               bias_metadata: Mapping[str, Any] = _NO_METADATA,
               scale_metadata: Mapping[str, Any] = _NO_METADATA):
    self.feature_axis = -1
    groups = _axes.check_groups(num_features, num_groups, group_size, fn="jaxnorm.nnx.GroupNorm")
    self.num_groups = groups
    self.group_size = num_features // groups
    _make_affine(self, num_features, rngs, use_scale=use_scale, use_bias=use_bias,
                 scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype,
                 scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: jax.Array | None = None):
    fn = "jaxnorm.nnx.GroupNorm"
    x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)),
                                        dtype=self.dtype)
    x = _axes.check_floating(x, fn=fn, allow_complex=True)
    c_ax = _axes.canonical_axes(self.feature_axis, x.ndim, what="feature_axis", fn=fn)
    _axes.check_num_features(self.num_features, x.shape, c_ax, fn=fn, field="feature_axis")
    return group_norm(x, scale, bias, num_groups=self.num_groups,
                      reduction_axes=self.reduction_axes, channel_axis=self.feature_axis,
                      where=mask, epsilon=self.epsilon, axis_name=self.axis_name,
                      axis_index_groups=self.axis_index_groups,
                      dtype=_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype))


class InstanceNorm(nnx.Module):
  """Instance normalization: per example and per feature, over every other axis
  except the first (batch): ``(x - E[x]) * rsqrt(Var[x] + epsilon) * scale + bias``.

  Arguments as in ``flax.nnx.InstanceNorm``.  Computed by :func:`jaxnorm.instance_norm`.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxnorm import nnx as jnnx
  >>> inorm = jnnx.InstanceNorm(2, epsilon=0., rngs=nnx.Rngs(0))
  >>> inorm(jnp.array([[[1., 10.], [3., 30.]]]))
  Array([[[-1., -1.],
          [ 1.,  1.]]], dtype=float32)
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-6,
               dtype: DType | None = None, param_dtype: DType = jnp.float32,
               use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros,
               scale_init: Initializer = initializers.ones,
               feature_axes: Axes = -1, axis_name: Any = None,
               axis_index_groups: Any = None, use_fast_variance: bool = True,
               promote_dtype=_dtypes.promote_dtype, rngs: nnx.Rngs,
               bias_metadata: Mapping[str, Any] = _NO_METADATA,
               scale_metadata: Mapping[str, Any] = _NO_METADATA):
    _make_affine(self, num_features, rngs, use_scale=use_scale, use_bias=use_bias,
                 scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype,
                 scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: jax.Array | None = None):
    fn = "jaxnorm.nnx.InstanceNorm"
    x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)),
                                        dtype=self.dtype)
    x = _axes.check_floating(x, fn=fn, allow_complex=True)
    feat = _axes.canonical_axes(self.feature_axes, x.ndim, what="feature_axes", fn=fn)
    fshape = _axes.check_num_features(self.num_features, x.shape, feat, fn=fn,
                                      field="feature_axes")
    return instance_norm(x, _fit(scale, fshape), _fit(bias, fshape), feature_axes=feat,
                         where=mask, epsilon=self.epsilon, axis_name=self.axis_name,
                         axis_index_groups=self.axis_index_groups,
                         dtype=_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype))
