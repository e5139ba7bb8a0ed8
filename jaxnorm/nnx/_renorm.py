"""Batch Renorm, Ghost BN and EvoNorm as Flax NNX modules (variables only; math in the core).

``BatchRenorm``, ``GhostBatchNorm`` and ``EvoNormB0`` take every argument of
:class:`jaxnorm.nnx.BatchNorm` (they subclass it) plus their own, hold the same
variables (``scale``, ``bias`` as ``nnx.Param``; ``mean``, ``var`` as
``nnx.BatchStat``; EvoNorm adds ``v1``) and follow ``model.train()`` /
``model.eval()``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes as _dtypes

from .. import _axes
from .._renorm import batch_renorm, evonorm_b0, evonorm_s0, ghost_batch_norm
from .._types import BatchStats, DType
from ._norms import BatchNorm, Initializer, _fit, _make_affine, _value
from ._population import sow_batch_moments

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _with_batch_stats(mdl: BatchNorm, x, use_running_average, mask, fn: str,
                      core: Callable, *extra_params, **hyper) -> jax.Array:
  """BatchNorm's call convention around ``core(x, stats, scale, bias, *extra_params, ...)``."""
  _axes.check_ema_only(mdl.momentum, mdl.debias, fn=fn)
  use_running_average = _axes.check_training(first_from(
      use_running_average, mdl.use_running_average,
      error_msg=(f"{fn}: no `use_running_average` was given. Pass it to the constructor "
                 "or the call, or set it with model.train() / model.eval() / "
                 "nnx.view(model, use_running_average=...).")),
      fn=fn, name="use_running_average")
  mean, var = mdl.mean[...], mdl.var[...]
  x, _, _, scale, bias, *extra = mdl.promote_dtype(
      (x, mean, var, _value(mdl.scale), _value(mdl.bias), *extra_params), dtype=mdl.dtype)
  x = _axes.check_floating(x, fn=fn)
  out_dtype = _dtypes.canonicalize_dtype(x, scale, bias, dtype=mdl.dtype)
  feat = _axes.canonical_axes(mdl.axis, x.ndim, what="axis", fn=fn)
  fshape = _axes.check_num_features(mdl.num_features, x.shape, feat, fn=fn, field="axis")
  y, new_stats = core(
      x, BatchStats(mean=_fit(mean, fshape), var=_fit(var, fshape)), _fit(scale, fshape),
      _fit(bias, fshape), *(_fit(p, fshape) for p in extra),
      training=not use_running_average, feature_axes=feat, momentum=mdl.momentum,
      epsilon=mdl.epsilon, where=mask, axis_name=mdl.axis_name,
      axis_index_groups=mdl.axis_index_groups, degenerate=mdl.degenerate,
      unbiased_var=mdl.unbiased_var, dtype=out_dtype, **hyper)
  if not use_running_average:
    # as flax.nnx: no gradient flows into the running averages
    if mdl.mean._can_update or mdl.var._can_update:
      stop_gradient = jax.lax.stop_gradient
    else:
      stop_gradient = lambda v: v
    mdl.mean[...] = stop_gradient(new_stats.mean.reshape(mean.shape))
    mdl.var[...] = stop_gradient(new_stats.var.reshape(var.shape))
    sow_batch_moments(mdl, x, feature_axes=feat, where=mask, axis_name=mdl.axis_name,
                      axis_index_groups=mdl.axis_index_groups)  # the PreciseBN hook
  return y


class BatchRenorm(BatchNorm):
  """Batch Renormalization (Ioffe 2017) with running averages in ``nnx.BatchStat``.

  Training: ``y = ((x - mu_B) / sigma_B * r + d) * scale + bias`` with
  ``r = sg(clip(sigma_B / sigma, 1/r_max, r_max))``, ``d = sg(clip((mu_B - mu) /
  sigma, -d_max, d_max))``; evaluation is :class:`BatchNorm`'s.  Arguments:
  :class:`BatchNorm`'s plus ``r_max``, ``d_max`` (defaults 3 and 5, the paper's
  final values); warm them up by assigning ``module.r_max``/``module.d_max`` or
  passing them at call time (traced scalars are fine, e.g.
  :func:`jaxnorm.renorm_schedule` of the step).  Computed by :func:`jaxnorm.batch_renorm`.
  """

  def __init__(self, num_features: int, *, r_max: float = 3.0, d_max: float = 5.0,
               rngs: nnx.Rngs, **kwargs):
    super().__init__(num_features, rngs=rngs, **kwargs)
    self.r_max = r_max
    self.d_max = d_max

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None, r_max: Any = None, d_max: Any = None):
    return _with_batch_stats(self, x, use_running_average, mask, "jaxnorm.nnx.BatchRenorm",
                             batch_renorm, r_max=self.r_max if r_max is None else r_max,
                             d_max=self.d_max if d_max is None else d_max)


class GhostBatchNorm(BatchNorm):
  """Ghost (virtual-batch) batch norm (Hoffer et al. 2017): in training, batch norm per
  virtual batch of ``virtual_batch_size`` consecutive samples; running averages
  from the count-weighted mean of their means and variances.  Arguments:
  :class:`BatchNorm`'s plus ``virtual_batch_size``.  Computed by
  :func:`jaxnorm.ghost_batch_norm`.
  """

  def __init__(self, num_features: int, *, virtual_batch_size: int, rngs: nnx.Rngs,
               **kwargs):
    super().__init__(num_features, rngs=rngs, **kwargs)
    self.virtual_batch_size = virtual_batch_size

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    return _with_batch_stats(self, x, use_running_average, mask, "jaxnorm.nnx.GhostBatchNorm",
                             ghost_batch_norm, virtual_batch_size=self.virtual_batch_size)


class EvoNormB0(BatchNorm):
  """EvoNorm-B0 (Liu et al. 2020): ``y = x / max(sqrt(var_B + eps), v1 x + sqrt(var_I + eps))
  * scale + bias``, a normalization-activation layer (use it without a ReLU).

  Arguments: :class:`BatchNorm`'s plus ``v1_init`` (ones; ``v1`` is an
  ``nnx.Param`` drawn after ``scale`` and ``bias``) and ``num_groups``/``group_size``
  for a grouped instance variance (default: per channel, as in the paper).
  Computed by :func:`jaxnorm.evonorm_b0`.
  """

  def __init__(self, num_features: int, *, v1_init: Initializer = initializers.ones_init(),
               num_groups: int | None = None, group_size: int | None = None,
               rngs: nnx.Rngs, v1_metadata: Mapping[str, Any] = _NO_METADATA, **kwargs):
    super().__init__(num_features, rngs=rngs, **kwargs)
    self.v1 = nnx.Param(v1_init(rngs.params(), (num_features,), self.param_dtype),
                        **v1_metadata)
    self.num_groups = num_groups
    self.group_size = group_size

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    return _with_batch_stats(self, x, use_running_average, mask, "jaxnorm.nnx.EvoNormB0",
                             evonorm_b0, self.v1[...], num_groups=self.num_groups,
                             group_size=self.group_size)


class EvoNormS0(nnx.Module):
  """EvoNorm-S0 (Liu et al. 2020): ``y = x * sigmoid(v1 x) / sqrt(var_G + eps) * scale + bias``
  with the group variance per sample, channels last; batch-independent (no
  ``BatchStat``).  Give ``num_groups`` (default 32) or ``group_size`` (then
  ``num_groups=None``).  Computed by :func:`jaxnorm.evonorm_s0`.
  """

  def __init__(self, num_features: int, *, num_groups: int | None = 32,
               group_size: int | None = None, epsilon: float = 1e-5,
               dtype: DType | None = None, param_dtype: DType = jnp.float32,
               use_bias: bool = True, use_scale: bool = True,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(),
               v1_init: Initializer = initializers.ones_init(),
               axis_name: Any = None, axis_index_groups: Any = None,
               promote_dtype=_dtypes.promote_dtype, rngs: nnx.Rngs,
               bias_metadata: Mapping[str, Any] = _NO_METADATA,
               scale_metadata: Mapping[str, Any] = _NO_METADATA,
               v1_metadata: Mapping[str, Any] = _NO_METADATA):
    groups = _axes.check_groups(num_features, num_groups, group_size,
                                fn="jaxnorm.nnx.EvoNormS0")
    _make_affine(self, num_features, rngs, use_scale=use_scale, use_bias=use_bias,
                 scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype,
                 scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.v1 = nnx.Param(v1_init(rngs.params(), (num_features,), param_dtype), **v1_metadata)
    self.num_features = num_features
    self.num_groups = groups
    self.group_size = num_features // groups
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: jax.Array | None = None):
    fn = "jaxnorm.nnx.EvoNormS0"
    x, scale, bias, v1 = self.promote_dtype(
        (x, _value(self.scale), _value(self.bias), self.v1[...]), dtype=self.dtype)
    x = _axes.check_floating(x, fn=fn)
    if x.ndim < 2:
      raise ValueError(f"{fn}: the input needs a batch axis and a channel axis (the last), "
                       f"got shape {x.shape}.")
    _axes.check_num_features(self.num_features, x.shape, (x.ndim - 1,), fn=fn,
                             field="the channel axis")
    return evonorm_s0(x, scale, bias, v1, num_groups=self.num_groups, channel_axis=-1,
                      where=mask, epsilon=self.epsilon, axis_name=self.axis_name,
                      axis_index_groups=self.axis_index_groups,
                      dtype=_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype))
