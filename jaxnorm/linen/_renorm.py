"""Batch Renorm, Ghost BN and EvoNorm as Flax linen modules (variables only; math in the core).

``BatchRenorm``, ``GhostBatchNorm`` and ``EvoNormB0`` take every field of
:class:`jaxnorm.linen.BatchNorm` (they subclass it) plus their own, and create the
same variables (``params/scale``, ``params/bias``, ``batch_stats/mean``,
``batch_stats/var``; EvoNorm adds ``params/v1``), so a BatchNorm checkpoint loads
into them and back.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.nn import initializers

from .. import _axes
from .._renorm import batch_renorm, evonorm_b0, evonorm_s0, ghost_batch_norm
from .._types import BatchStats, DType
from ._norms import BatchNorm, Initializer, _affine, _param
from ._population import sow_batch_moments


def _with_batch_stats(mdl: BatchNorm, x, use_running_average, mask, fn: str,
                      core: Callable, **hyper) -> jax.Array:
  """BatchNorm's variables and call convention around ``core(x, stats, scale, bias, ...)``.

  ``hyper`` holds the family's own arguments; ``v1`` among them (EvoNorm-B0) is
  created here as a parameter after ``scale`` and ``bias``.
  """
  _axes.check_ema_only(mdl.momentum, mdl.debias, fn=fn)
  use_running_average = _axes.check_training(
      nn.merge_param("use_running_average", mdl.use_running_average, use_running_average),
      fn=fn, name="use_running_average")
  x = _axes.check_floating(x, fn=fn)
  feat = _axes.canonical_axes(mdl.axis, x.ndim, what="axis", fn=fn)
  fshape = _axes.feature_shape(x.shape, feat)
  stats_dtype = jnp.float32 if mdl.force_float32_reductions else mdl.param_dtype
  ra_mean = mdl.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype),
                         list(fshape))
  ra_var = mdl.variable("batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), list(fshape))
  scale, bias, out_dtype = _affine(mdl, x, fshape, use_scale=mdl.use_scale,
                                   use_bias=mdl.use_bias)
  args = (scale, bias)
  if "v1" in hyper:
    args += (_param(mdl, "v1", hyper.pop("v1"), fshape, mdl.param_dtype),)
  initializing = mdl.is_initializing()
  y, new_stats = core(
      x, BatchStats(mean=ra_mean.value, var=ra_var.value), *args,
      training=not use_running_average, feature_axes=feat, momentum=mdl.momentum,
      epsilon=mdl.epsilon, where=mask, axis_name=None if initializing else mdl.axis_name,
      axis_index_groups=None if initializing else mdl.axis_index_groups,
      degenerate=mdl.degenerate, unbiased_var=mdl.unbiased_var, dtype=out_dtype, **hyper)
  if not use_running_average and not initializing:
    ra_mean.value = new_stats.mean
    ra_var.value = new_stats.var
  if not use_running_average:  # the PreciseBN hook (a no-op unless collected)
    sow_batch_moments(mdl, x, feature_axes=feat, where=mask, axis_name=mdl.axis_name,
                      axis_index_groups=mdl.axis_index_groups)
  return y


class BatchRenorm(BatchNorm, kw_only=True):
  """Batch Renormalization (Ioffe 2017) with running averages in ``batch_stats``.

  Training::

    r = sg(clip(sigma_B / sigma, 1/r_max, r_max)),  d = sg(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = ((x - mu_B) / sigma_B * r + d) * scale + bias

  with ``sigma = sqrt(var + epsilon)`` from the running averages; evaluation is
  :class:`BatchNorm`'s.  Fields: :class:`BatchNorm`'s plus ``r_max`` and ``d_max``
  (defaults: the paper's final 3 and 5).  To warm them up, pass the call-time
  ``r_max``/``d_max`` (traced scalars are fine), e.g. from
  :func:`jaxnorm.renorm_schedule` of the step.  Computed by :func:`jaxnorm.batch_renorm`.
  """

  r_max: float = 3.0
  d_max: float = 5.0

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None, r_max: Any = None, d_max: Any = None):
    return _with_batch_stats(self, x, use_running_average, mask, "jaxnorm.linen.BatchRenorm",
                             batch_renorm, r_max=self.r_max if r_max is None else r_max,
                             d_max=self.d_max if d_max is None else d_max)


class GhostBatchNorm(BatchNorm, kw_only=True):
  """Ghost (virtual-batch) batch norm (Hoffer et al. 2017).

  In training the batch (axis 0) is cut into virtual batches of
  ``virtual_batch_size`` consecutive samples, each normalized with its own
  statistics; the running averages are updated from the count-weighted mean of
  the virtual batches' means and variances.  Evaluation is :class:`BatchNorm`'s.
  Fields: :class:`BatchNorm`'s plus ``virtual_batch_size`` (required).  Computed
  by :func:`jaxnorm.ghost_batch_norm`.
  """

  virtual_batch_size: int | None = None

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    fn = "jaxnorm.linen.GhostBatchNorm"
    if self.virtual_batch_size is None:
      raise TypeError(f"{fn}: give virtual_batch_size (samples per virtual batch), e.g. "
                      "GhostBatchNorm(virtual_batch_size=32).")
    return _with_batch_stats(self, x, use_running_average, mask, fn, ghost_batch_norm,
                             virtual_batch_size=self.virtual_batch_size)


class EvoNormB0(BatchNorm, kw_only=True):
  """EvoNorm-B0 (Liu et al. 2020): ``y = x / max(sqrt(var_B + eps), v1 x + sqrt(var_I + eps))
  * scale + bias``; a normalization-activation layer (use it without a ReLU).

  ``var_B`` is the batch variance (running average in evaluation, kept in
  ``batch_stats/var`` as :class:`BatchNorm` does); ``var_I`` the instance variance
  over the spatial axes per sample and channel (the paper), or per group of
  channels with ``num_groups``/``group_size``.  Fields: :class:`BatchNorm`'s plus
  ``v1_init`` (ones) and ``num_groups``/``group_size``; parameters ``scale``,
  ``bias``, ``v1``.  Computed by :func:`jaxnorm.evonorm_b0`.
  """

  v1_init: Initializer = initializers.ones
  num_groups: int | None = None
  group_size: int | None = None

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    return _with_batch_stats(self, x, use_running_average, mask, "jaxnorm.linen.EvoNormB0",
                             evonorm_b0, v1=self.v1_init, num_groups=self.num_groups,
                             group_size=self.group_size)


class EvoNormS0(nn.Module, kw_only=True):
  """EvoNorm-S0 (Liu et al. 2020): ``y = x * sigmoid(v1 x) / sqrt(var_G + eps) * scale + bias``
  with the group variance per sample (over every axis but the first and the
  channels of a group), channels last.  Batch-independent: no ``batch_stats``.
  Give ``num_groups`` (default 32, the paper's) or ``group_size`` (then
  ``num_groups=None``).  Computed by :func:`jaxnorm.evonorm_s0`.
  """

  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-5
  dtype: DType | None = None
  param_dtype: DType = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  v1_init: Initializer = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    fn = "jaxnorm.linen.EvoNormS0"
    x = _axes.check_floating(x, fn=fn)
    if x.ndim < 2:
      raise ValueError(f"{fn}: the input needs a batch axis and a channel axis (the last), "
                       f"got shape {x.shape}.")
    scale, bias, out_dtype = _affine(self, x, x.shape[-1:], use_scale=self.use_scale,
                                     use_bias=self.use_bias)
    v1 = _param(self, "v1", self.v1_init, x.shape[-1:], self.param_dtype)
    return evonorm_s0(x, scale, bias, v1, num_groups=self.num_groups,
                      group_size=self.group_size, channel_axis=-1, where=mask,
                      epsilon=self.epsilon, axis_name=self.axis_name,
                      axis_index_groups=self.axis_index_groups, dtype=out_dtype)
