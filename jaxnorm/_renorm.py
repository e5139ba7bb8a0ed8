"""Beyond batch norm: Batch Renormalization, Ghost (virtual-batch) BN and EvoNorm-B0/S0.

Each is a pure function with batch norm's contract: keyword-only hyperparameters,
``feature_axes``, ``where=``, ``axis_name``/``axis_index_groups`` for exact
cross-device statistics (sums and counts, through :func:`jaxnorm._stats.centered_moments`),
and for the stateful ones ``(y, new_stats)`` with the same :class:`~jaxnorm.BatchStats`
in training and in evaluation.  The state is batch norm's ``BatchStats(mean, var)``
everywhere, so evaluation-mode Batch Renorm and Ghost BN *are* batch norm with the
running averages, and anything that reads or writes batch-norm state (checkpoints,
the Flax variable tree ``batch_stats/{mean,var}``, folding, population statistics)
works unchanged.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _axes, _vjp
from ._norms import DegeneratePolicy, _split_channels, batch_norm, check_batch_norm_inputs
from ._stats import Centered, centered_moments, stat_dtype, update_batch_stats
from ._types import Array, Axes, AxisName, BatchStats, DType, Moments

# ----------------------------------------------------------------------------- validation


def _check_at_least(value: Any, lower: float, *, fn: str, name: str, hint: str) -> None:
  """``value >= lower`` when it is known at trace time (numbers, concrete arrays)."""
  v = _axes._concrete_scalar(value)
  if isinstance(v, numbers.Real) and not (v >= lower):  # also catches NaN
    raise ValueError(f"{fn}: {name} must be >= {lower:g}, got {value!r}. {hint}")
  if not isinstance(v, numbers.Real) and np.ndim(value) != 0:
    raise ValueError(f"{fn}: {name} must be a scalar (a number or a 0-d array, possibly traced "
                     f"from a schedule of the step), got shape {np.shape(value)}.")


def _check_renorm_limits(r_max: Any, d_max: Any, *, fn: str) -> None:
  _check_at_least(r_max, 1.0, fn=fn, name="r_max",
                  hint="r = clip(sigma_B / sigma, 1/r_max, r_max); r_max = 1 is batch norm "
                       "(the paper starts there and relaxes it to 3).")
  _check_at_least(d_max, 0.0, fn=fn, name="d_max",
                  hint="d = clip((mu_B - mu) / sigma, -d_max, d_max); d_max = 0 is batch norm "
                       "(the paper starts there and relaxes it to 5).")


def _check_virtual_batch(virtual_batch_size: Any, batch: int, *, fn: str) -> int:
  if (not isinstance(virtual_batch_size, (numbers.Integral, np.integer))
      or isinstance(virtual_batch_size, bool) or virtual_batch_size <= 0
      or batch % virtual_batch_size):
    raise ValueError(
        f"{fn}: virtual_batch_size={virtual_batch_size!r} must be a positive int dividing the "
        f"batch size {batch} (axis 0 of the input); divisors of {batch}: "
        f"{_axes._divisors(batch)}. Pick one of these, or pad the batch and mask the padding "
        "with `where`.")
  return int(virtual_batch_size)


def _moments_of(batch: Centered, fshape) -> Moments:
  flat = lambda v: v.reshape(fshape)
  return Moments(mean=flat(batch.shift + batch.offset), var=flat(batch.var),
                 count=flat(batch.count))


# ----------------------------------------------------------------------------- Batch Renorm


def batch_renorm(x: Array, stats: BatchStats, scale: Array | None = None,
                 bias: Array | None = None, *, training: bool, r_max: Any = 3.0,
                 d_max: Any = 5.0, feature_axes: Axes = -1, momentum: float = 0.99,
                 epsilon: float = 1e-5, where: Array | None = None,
                 axis_name: AxisName | None = None, axis_index_groups=None,
                 degenerate: DegeneratePolicy = "running", unbiased_var: bool = False,
                 dtype: DType | None = None) -> tuple[Array, BatchStats]:
  """Batch Renormalization (Ioffe 2017, arXiv:1702.03275) with explicit running averages.

  Training, with ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` the batch statistics
  (over every axis except ``feature_axes``, global across ``axis_name``) and
  ``mu``, ``sigma = sqrt(var + eps)`` the running averages::

    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = ((x - mu_B) / sigma_B * r + d) * scale + bias
    new_stats = momentum * stats + (1 - momentum) * (mu_B, var_B)

  Evaluation: batch norm with the running averages (``(x - mu) / sigma * scale +
  bias``; the state comes back unchanged).  ``r_max = 1, d_max = 0`` is batch norm,
  bit for bit.  The gradient treats ``r`` and ``d`` as constants, as the paper
  prescribes: the output is a batch-norm standardization with the per-feature
  affine ``scale' = r * scale``, ``bias' = d * scale + bias``, computed by
  jaxnorm's custom-VJP path (the batch statistics are taken once more, without
  gradient, to form ``r`` and ``d``: one extra reduction pass in the forward).

  State.  jaxnorm keeps batch norm's ``BatchStats(mean, var)`` and derives
  ``sigma = sqrt(var + eps)``; tf-keras (``renorm=True``) tracks a separate moving
  standard deviation next to its moving variance.  Keeping the variance makes
  evaluation exactly batch norm with the same variables, so checkpoints,
  converters, folding and population statistics apply unchanged; the two differ
  only in whether the average is taken of ``var`` or of ``sigma`` (by Jensen's
  inequality ``sqrt(E[var]) >= E[sigma]``: the difference is the spread of
  ``sigma_B`` across batches, small once the averages have converged).

  ``r_max`` and ``d_max`` may be traced scalars (a schedule of the step, see
  :func:`renorm_schedule`); concrete values are checked (``r_max >= 1``,
  ``d_max >= 0``) at trace time.  The defaults are the paper's final values.

  Args:
    x, stats, scale, bias, training, feature_axes, momentum, epsilon, where,
    axis_name, axis_index_groups, unbiased_var, dtype: as :func:`jaxnorm.batch_norm`.
    r_max, d_max: the clipping limits.
    degenerate: ``"running"`` (default): a feature whose batch statistics are
      unusable (fewer than 2 included elements, non-finite) is normalized with
      the running averages (``r = 1``, ``d = 0`` there) and keeps them;
      ``"batch"``: use the batch statistics regardless (an empty batch outputs
      ``bias``).

  Returns:
    ``(y, new_stats)``.

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> x = jnp.array([[1., 2.], [3., 6.]])
  >>> y, s = jn.batch_renorm(x, jn.init_batch_stats(2), training=True, r_max=1.5, d_max=1.,
  ...                        momentum=0.5, epsilon=0.)
  >>> y  # r = clip([1, 2], 1/1.5, 1.5), d = clip([2, 4], -1, 1)
  Array([[ 0. , -0.5],
         [ 2. ,  2.5]], dtype=float32)
  """
  fn = "jaxnorm.batch_renorm"
  training, x, feat, red, stats, scale, bias, where = check_batch_norm_inputs(
      x, stats, scale, bias, training=training, feature_axes=feature_axes, momentum=momentum,
      epsilon=epsilon, degenerate=degenerate, where=where, fn=fn)
  _check_renorm_limits(r_max, d_max, fn=fn)
  if not training:
    return batch_norm(x, stats, scale, bias, training=False, feature_axes=feat,
                      epsilon=epsilon, dtype=dtype)
  cdtype = stat_dtype(x.dtype)
  bshape = _axes.broadcast_shape(x.shape, feat)
  run_mean = stats.mean.reshape(bshape).astype(cdtype)
  run_var = stats.var.reshape(bshape).astype(cdtype)
  eps = jnp.asarray(epsilon, cdtype)
  r_max = jnp.asarray(r_max, cdtype)
  d_max = jnp.asarray(d_max, cdtype)

  # r and d: per-feature constants from the batch statistics (no gradient).
  b = centered_moments(lax.stop_gradient(x), red, where=where, axis_name=axis_name,
                       axis_index_groups=axis_index_groups)
  b = Centered(*(lax.stop_gradient(v) for v in b))
  rsigma = lax.rsqrt(run_var + eps)
  r = jnp.clip(jnp.sqrt(b.var + eps) * rsigma, 1 / r_max, r_max)
  d = jnp.clip(((b.shift - run_mean) + b.offset) * rsigma, -d_max, d_max)
  ok = _vjp.usable_stats(b) if degenerate == "running" else b.count > 0
  r = jnp.where(ok, r, 1)
  d = jnp.where(ok, d, 0)
  scale_r = r if scale is None else r * scale.astype(cdtype)
  bias_d = d if scale is None else d * scale.astype(cdtype)
  bias_d = bias_d if bias is None else bias_d + bias.astype(cdtype)

  y, batch, usable = _vjp.standardize(
      x, red, scale_r, bias_d, where=where, epsilon=epsilon, axis_name=axis_name,
      axis_index_groups=axis_index_groups, center=True, dtype=dtype,
      fallback=(run_mean, run_var) if degenerate == "running" else None)
  fshape = _axes.feature_shape(x.shape, feat)
  new_stats = update_batch_stats(stats, _moments_of(batch, fshape), momentum=momentum,
                                 where=None if usable is None else usable.reshape(fshape),
                                 unbiased_var=unbiased_var)
  return y, new_stats


def renorm_schedule(step: Any, *, r_max: float = 3.0, d_max: float = 5.0,
                    warmup_steps: int = 5000, r_max_steps: int = 40000,
                    d_max_steps: int = 25000) -> tuple[Array, Array]:
  """The paper's warm-up of Batch Renorm's limits, as a function of the step.

  ``(r_max(step), d_max(step))``: ``1`` and ``0`` (plain batch norm) for the first
  ``warmup_steps``, then linear ramps that reach ``r_max`` at ``r_max_steps`` and
  ``d_max`` at ``d_max_steps`` and stay there.  The defaults are Ioffe's (Inception
  on ImageNet, ~130k steps: batch norm for 5k steps, ``r_max = 3`` at 40k,
  ``d_max = 5`` at 25k); scale the step counts to your run (a common choice:
  warm up for ~5% of training, reach the limits by ~30%).  ``step`` may be traced
  (an optimizer's step count); the results are float32 scalars to pass to
  :func:`batch_renorm`.

  >>> import jaxnorm as jn
  >>> [tuple(round(float(v), 3) for v in jn.renorm_schedule(s)) for s in (0, 15000, 40000)]
  [(1.0, 0.0), (1.571, 2.5), (3.0, 5.0)]
  """
  fn = "jaxnorm.renorm_schedule"
  _check_renorm_limits(r_max, d_max, fn=fn)
  for name, end in (("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
    if not (isinstance(end, numbers.Real) and isinstance(warmup_steps, numbers.Real)
            and 0 <= warmup_steps < end):
      raise ValueError(f"{fn}: need 0 <= warmup_steps < {name}, got warmup_steps="
                       f"{warmup_steps!r}, {name}={end!r}. The limits ramp from the end of "
                       f"the warm-up to {name}.")
  t = jnp.asarray(step, jnp.float32)
  ramp = lambda end: jnp.clip((t - warmup_steps) / (end - warmup_steps), 0, 1)
  return 1 + (r_max - 1) * ramp(r_max_steps), d_max * ramp(d_max_steps)


# ----------------------------------------------------------------------------- Ghost BN


def ghost_batch_norm(x: Array, stats: BatchStats, scale: Array | None = None,
                     bias: Array | None = None, *, training: bool, virtual_batch_size: int,
                     feature_axes: Axes = -1, momentum: float = 0.99, epsilon: float = 1e-5,
                     where: Array | None = None, axis_name: AxisName | None = None,
                     axis_index_groups=None, degenerate: DegeneratePolicy = "running",
                     unbiased_var: bool = False,
                     dtype: DType | None = None) -> tuple[Array, BatchStats]:
  """Ghost (virtual-batch) batch norm (Hoffer et al. 2017, arXiv:1705.08741).

  Training: axis 0 (the batch) is cut into ``G = N / virtual_batch_size``
  virtual batches of consecutive samples; each is batch-normalized with its own
  statistics (over its samples and every other non-feature axis)::

    y[g] = (x[g] - mean_g) * rsqrt(var_g + eps) * scale + bias

  The running averages are updated once per call from the *mean of the virtual
  batches' statistics*, count-weighted (``n_g`` = included elements of virtual
  batch ``g``; with no mask all weights are ``1/G``)::

    mean_V = sum_g n_g mean_g / sum_g n_g     (= the mean of the whole batch)
    var_V  = sum_g n_g var_g  / sum_g n_g     (the within-virtual-batch variance)
    new_stats = momentum * stats + (1 - momentum) * (mean_V, var_V)

  (tf-keras' rule, mean of means and mean of variances, with counts.  With
  ``unbiased_var`` each ``var_g`` is first scaled by ``n_g / (n_g - 1)``.)  Under
  ``degenerate="running"`` a virtual batch whose statistics are unusable (fewer
  than 2 included elements, non-finite) is normalized with the running averages
  and gets weight 0; a feature with no usable virtual batch keeps its running
  averages.  Evaluation: batch norm with the running averages.
  ``virtual_batch_size = N`` is :func:`jaxnorm.batch_norm`.

  Across devices.  Without ``axis_name`` (e.g. inside ``shard_map``) each device
  cuts its own shard into virtual batches: the classic data-parallel ghost BN.
  The running averages are then per device; keep replicas equal with
  ``jax.lax.pmean(new_stats, axis)`` (the count-weighted rule when counts are
  equal).  With ``axis_name`` the ``g``-th virtual batch spans the ``g``-th chunk
  of every device's shard (sums and counts reduced exactly).  Statistics over a
  *group of devices* -- ghost BN where the device group is the virtual batch --
  are plain :func:`jaxnorm.batch_norm` with ``axis_name`` a sub-axis of a 2-D mesh
  (or ``axis_index_groups`` under ``pmap``).

  Args:
    virtual_batch_size: samples per virtual batch; must divide ``x.shape[0]``.
    others: as :func:`jaxnorm.batch_norm` (axis 0 must not be a feature axis;
      a per-sample ``scale``/``bias``/``where`` is split along axis 0 as ``x`` is).

  Returns:
    ``(y, new_stats)``.
  """
  fn = "jaxnorm.ghost_batch_norm"
  training, x, feat, red, stats, scale, bias, where = check_batch_norm_inputs(
      x, stats, scale, bias, training=training, feature_axes=feature_axes, momentum=momentum,
      epsilon=epsilon, degenerate=degenerate, where=where, fn=fn)
  if 0 in feat:
    raise ValueError(f"{fn}: axis 0 is the batch axis that is cut into virtual batches; it "
                     f"cannot be a feature axis (got feature_axes={feature_axes!r}).")
  v = _check_virtual_batch(virtual_batch_size, x.shape[0], fn=fn)
  if not training:
    return batch_norm(x, stats, scale, bias, training=False, feature_axes=feat,
                      epsilon=epsilon, dtype=dtype)
  groups = x.shape[0] // v
  cdtype = stat_dtype(x.dtype)
  split = lambda a: _split_channels(a, 0, groups)  # (N, ...) -> (G, V, ...); 1 -> (1, 1)
  xg = split(x)
  feat_g = (0,) + tuple(a + 1 for a in feat)
  red_g = _axes.other_axes(feat_g, xg.ndim)
  # the running averages in the statistics' keep-dims shape (G, 1, ..., features)
  bshape = (1,) + _axes.broadcast_shape(x.shape, feat)
  gshape = (groups,) + bshape[1:]
  run_mean = jnp.broadcast_to(stats.mean.reshape(bshape).astype(cdtype), gshape)
  run_var = jnp.broadcast_to(stats.var.reshape(bshape).astype(cdtype), gshape)
  yg, batch, usable = _vjp.standardize(
      xg, red_g, split(scale), split(bias), where=split(where), epsilon=epsilon,
      axis_name=axis_name, axis_index_groups=axis_index_groups, center=True, dtype=dtype,
      fallback=(run_mean, run_var) if degenerate == "running" else None)

  # Count-weighted mean over the virtual batches (axis 0) of their statistics.
  n = batch.count if usable is None else jnp.where(usable, batch.count, 0)
  var = batch.var
  if unbiased_var:
    var = var * jnp.where(batch.count > 1, batch.count / jnp.where(batch.count > 1,
                                                                   batch.count - 1, 1), 1)
  total = jnp.sum(n, axis=0, keepdims=True)
  w = n / jnp.where(total > 0, total, 1)
  mean_v = jnp.sum(w * (batch.shift + batch.offset), axis=0, keepdims=True)
  var_v = jnp.sum(w * var, axis=0, keepdims=True)
  fshape = _axes.feature_shape(x.shape, feat)
  flat = lambda a: a.reshape(fshape)
  moments = Moments(mean=flat(mean_v), var=flat(var_v), count=flat(total))
  new_stats = update_batch_stats(stats, moments, momentum=momentum,
                                 where=None if usable is None else flat(total > 0))
  return yg.reshape(x.shape), new_stats


# ----------------------------------------------------------------------------- EvoNorm


def _instance_axes(x_shape, feat, groups, fn):
  """Per-sample statistics' layout: ``(split, reduction_axes)``; ``split`` reshapes
  an array of ``x``'s layout so that channels come in groups (identity without)."""
  nd = len(x_shape)
  spatial = _axes.other_axes((0,) + feat, nd)
  if groups is None:
    if not spatial:
      raise ValueError(f"{fn}: an input of shape {tuple(x_shape)} has no spatial axis (besides "
                       f"the batch axis 0 and feature_axes {feat}) for the instance variance. "
                       "Give num_groups or group_size to take it over groups of channels.")
    return (lambda a: a), spatial
  (c,) = feat
  shift = lambda a: a + 1 if a > c else a
  red = tuple(shift(a) for a in spatial) + (c + 1,)
  return (lambda a: _split_channels(a, c, groups)), red


def _groups_for(x_shape, feat, num_groups, group_size, fn, *, required: bool):
  if num_groups is None and group_size is None and not required:
    return None
  if len(feat) != 1:
    raise ValueError(f"{fn}: groups of channels need a single channel axis, got feature_axes "
                     f"{feat}.")
  return _axes.check_groups(x_shape[feat[0]], num_groups, group_size, fn=fn)


def evonorm_b0(x: Array, stats: BatchStats, scale: Array | None, bias: Array | None,
               v1: Array, *, training: bool, feature_axes: Axes = -1,
               num_groups: int | None = None, group_size: int | None = None,
               momentum: float = 0.99, epsilon: float = 1e-5, where: Array | None = None,
               axis_name: AxisName | None = None, axis_index_groups=None,
               degenerate: DegeneratePolicy = "running", unbiased_var: bool = False,
               dtype: DType | None = None) -> tuple[Array, BatchStats]:
  """EvoNorm-B0 (Liu et al. 2020, arXiv:2004.02967), a batch-dependent normalization-activation.

  ::

    y = x / max(sqrt(var_B + eps), v1 * x + sqrt(var_I + eps)) * scale + bias

  ``var_B``: the batch variance per feature (over every axis except
  ``feature_axes``, global across ``axis_name``), replaced by the running average
  in evaluation; ``var_I``: the instance variance, per sample and channel over the
  spatial axes (every axis except 0 and ``feature_axes``), as in the paper's
  definition (``s^2_{w,h}``) and timm's ``EvoNorm2dB0``.  With ``num_groups`` or
  ``group_size`` it is taken per sample over the spatial axes and the channels of
  a group instead (a variant; it also allows inputs without spatial axes).  The
  running averages are ``BatchStats(mean, var)`` updated as batch norm's
  (``mean`` is tracked for a common state and variable tree; B0 uses only
  ``var``).  Statistics come from the accurate shifted one-pass moments; the
  gradient is plain autodiff.  ``v1``: per-feature, learned (initialised to 1).
  ``axis_name`` applies to the batch variance only (data parallelism).

  Degenerate batches (``degenerate``) as :func:`jaxnorm.batch_norm`: with
  ``"running"`` a feature with unusable batch statistics uses the running
  variance and keeps its running averages.  ``epsilon`` defaults to batch norm's
  1e-5 (timm's ``EvoNorm2dB0`` uses 1e-3).

  Returns:
    ``(y, new_stats)``.
  """
  fn = "jaxnorm.evonorm_b0"
  training, x, feat, red, stats, scale, bias, where = check_batch_norm_inputs(
      x, stats, scale, bias, training=training, feature_axes=feature_axes, momentum=momentum,
      epsilon=epsilon, degenerate=degenerate, where=where, fn=fn)
  if v1 is None:
    raise TypeError(f"{fn}: v1 (per-feature, learned; initialise it to ones) is required.")
  v1 = _axes.per_feature(v1, name="v1", x_shape=x.shape, feature_axes=feat, fn=fn)
  if 0 in feat:
    raise ValueError(f"{fn}: axis 0 is the batch axis and cannot be a feature axis "
                     f"(got feature_axes={feature_axes!r}).")
  groups = _groups_for(x.shape, feat, num_groups, group_size, fn, required=False)
  split, red_i = _instance_axes(x.shape, feat, groups, fn)
  cdtype = stat_dtype(x.dtype)
  xf = x.astype(cdtype)
  eps = jnp.asarray(epsilon, cdtype)
  bshape = _axes.broadcast_shape(x.shape, feat)
  run_var = stats.var.reshape(bshape).astype(cdtype)
  new_stats = stats
  if training:
    batch = centered_moments(xf, red, where=where, axis_name=axis_name,
                             axis_index_groups=axis_index_groups)
    usable = _vjp.usable_stats(batch) if degenerate == "running" else None
    var_b = batch.var if usable is None else jnp.where(usable, batch.var, run_var)
    fshape = _axes.feature_shape(x.shape, feat)
    new_stats = update_batch_stats(stats, _moments_of(batch, fshape), momentum=momentum,
                                   where=None if usable is None else usable.reshape(fshape),
                                   unbiased_var=unbiased_var)
  else:
    var_b = run_var
  inst = centered_moments(split(xf), red_i, where=None if where is None else split(where))
  std_i = _ungroup(jnp.sqrt(inst.var + eps), x.shape, feat, groups)
  den = jnp.maximum(jnp.sqrt(var_b + eps), v1.astype(cdtype) * xf + std_i)
  y = _affine(xf / den, scale, bias, cdtype)
  return y.astype(dtype or x.dtype), new_stats


def evonorm_s0(x: Array, scale: Array | None, bias: Array | None, v1: Array, *,
               num_groups: int | None = None, group_size: int | None = None,
               channel_axis: int = -1, where: Array | None = None, epsilon: float = 1e-5,
               axis_name: AxisName | None = None, axis_index_groups=None,
               dtype: DType | None = None) -> Array:
  """EvoNorm-S0 (Liu et al. 2020, arXiv:2004.02967), a batch-independent normalization-activation.

  ::

    y = x * sigmoid(v1 * x) / sqrt(var_G + eps) * scale + bias

  ``var_G``: the group variance, per sample over every axis except 0 and the
  channels of a group (give ``num_groups`` -- the paper uses 32 -- or
  ``group_size``), as group norm's.  ``v1``, ``scale``, ``bias``: per channel
  (``channel_axis``, default -1).  Statistics from the accurate shifted one-pass
  moments (with ``where``: only the included elements; across ``axis_name`` for a
  spatially sharded input); plain autodiff.
  """
  fn = "jaxnorm.evonorm_s0"
  x = _axes.check_floating(x, fn=fn)
  _axes.check_nonnegative(epsilon, fn=fn, name="epsilon")
  feat = _axes.canonical_axes(channel_axis, x.ndim, what="channel_axis", fn=fn)
  if 0 in feat:
    raise ValueError(f"{fn}: axis 0 is the batch axis and cannot be the channel axis.")
  if v1 is None:
    raise TypeError(f"{fn}: v1 (per-channel, learned; initialise it to ones) is required.")
  scale = _axes.per_feature(scale, name="scale", x_shape=x.shape, feature_axes=feat, fn=fn)
  bias = _axes.per_feature(bias, name="bias", x_shape=x.shape, feature_axes=feat, fn=fn)
  v1 = _axes.per_feature(v1, name="v1", x_shape=x.shape, feature_axes=feat, fn=fn)
  where = _axes.check_mask(where, x.shape, fn=fn)
  groups = _groups_for(x.shape, feat, num_groups, group_size, fn, required=True)
  split, red_g = _instance_axes(x.shape, feat, groups, fn)
  cdtype = stat_dtype(x.dtype)
  xf = x.astype(cdtype)
  g = centered_moments(split(xf), red_g, where=None if where is None else split(where),
                       axis_name=axis_name, axis_index_groups=axis_index_groups)
  rstd = _ungroup(lax.rsqrt(g.var + jnp.asarray(epsilon, cdtype)), x.shape, feat, groups)
  num = xf * jax.nn.sigmoid(v1.astype(cdtype) * xf)
  return _affine(num * rstd, scale, bias, cdtype).astype(dtype or x.dtype)


def _ungroup(v: Array, x_shape, feat, groups: int | None) -> Array:
  """Per-group statistics (keep-dims, channels split into groups) laid out against ``x``:
  repeated over the channels of each group, size 1 on the reduced axes."""
  if groups is None:
    return v
  (c,) = feat
  shape = v.shape[:c + 1] + (x_shape[c] // groups,) + v.shape[c + 2:]
  return jnp.broadcast_to(v, shape).reshape(v.shape[:c] + (x_shape[c],) + v.shape[c + 2:])


def _affine(z: Array, scale: Array | None, bias: Array | None, cdtype) -> Array:
  if scale is not None:
    z = z * scale.astype(cdtype)
  if bias is not None:
    z = z + bias.astype(cdtype)
  return z
