"""The normalizers: pure functions of arrays, with explicit state for batch norm.

All of them are one computation, :func:`jaxnorm._vjp.standardize`: statistics from
:func:`jaxnorm._stats.centered_moments`, then ``((x - mean) * rstd) * scale + bias``,
with an analytic backward.  They differ only in which axes are reduced and which
carry per-feature scale and bias.  This module validates inputs and lays out
axes; it has no math of its own.

Complex inputs (complex64/complex128, as ``flax.linen``): complex mean, real
variance ``E|x - mean|^2``, real running variance and complex running mean; scale
and bias may be real or complex.  They take the plain-autodiff path
(:func:`jaxnorm._vjp.standardize_reference`), so ``jax.grad`` of a real loss
follows JAX's complex convention.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp

from . import _axes, _vjp
from ._stats import Centered, real_dtype, stat_dtype, update_batch_stats
from ._types import Array, Axes, AxisName, BatchStats, CountedBatchStats, DType, Moments


def _any_complex(*arrays: Array | None) -> bool:
  return any(a is not None and jnp.iscomplexobj(a) for a in arrays)


def _to_complex(x: Array, *params: Array | None) -> Array:
  """A real ``x`` meeting complex statistics, scale or bias becomes complex (flax's
  promotion: the output is complex); its statistics are unchanged."""
  if jnp.iscomplexobj(x) or not _any_complex(*params):
    return x
  return x.astype(jnp.promote_types(x.dtype, jnp.complex64))


def normalize(x: Array, mean: Array, var: Array, scale: Array | None = None,
              bias: Array | None = None, *, epsilon: float = 1e-5,
              dtype: DType | None = None) -> Array:
  """``(x - mean) * rsqrt(var + epsilon) * scale + bias`` with given statistics.

  ``mean``, ``var``, ``scale`` and ``bias`` must broadcast against ``x`` with its
  rank (use ``keepdims=True`` in :func:`moments`).  Computed in at least float32;
  the result has ``dtype`` (default: the dtype of ``x``, complex when ``x``,
  ``mean``, ``scale`` or ``bias`` is complex; ``var`` must be real).

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> x = jnp.array([[1., 2.], [3., 6.]])
  >>> m = jn.moments(x, axis=0, keepdims=True)
  >>> jn.normalize(x, m.mean, m.var, epsilon=0.0)
  Array([[-1., -1.],
         [ 1.,  1.]], dtype=float32)
  """
  fn = "jaxnorm.normalize"
  x = _axes.check_floating(x, fn=fn, allow_complex=True)
  _axes.check_nonnegative(epsilon, fn=fn, name="epsilon")
  all_axes = tuple(range(x.ndim))
  p = {name: _axes.per_feature(v, name=name, x_shape=x.shape, feature_axes=all_axes, fn=fn,
                               allow_complex=True)
       for name, v in dict(mean=mean, var=var, scale=scale, bias=bias).items()}
  _axes.check_real(p["var"], fn=fn, name="var",
                   why="the variance E|x - mean|^2 is real also for complex x (see moments).")
  x = _to_complex(x, p["mean"], p["scale"], p["bias"])
  _axes.check_out_dtype(dtype, x.dtype, fn=fn)
  zero = jnp.zeros((), p["mean"].dtype)
  stats = Centered(shift=p["mean"], offset=zero, var=p["var"], count=zero)
  return _vjp.scale_shift(x, stats, p["scale"], p["bias"], epsilon, dtype)


def _standardize(x: Array, scale, bias, *, reduction_axes: Axes, feature_axes: Axes,
                 where, epsilon, axis_name, axis_index_groups, center: bool, dtype,
                 fn: str) -> Array:
  """Shared body of the feature-wise norms (layer, RMS, instance, group)."""
  x = _axes.check_floating(x, fn=fn, allow_complex=True)
  _axes.check_nonnegative(epsilon, fn=fn, name="epsilon")
  red = _axes.canonical_axes(reduction_axes, x.ndim, what="reduction_axes", fn=fn)
  feat = _axes.canonical_axes(feature_axes, x.ndim, what="feature_axes", fn=fn)
  if not red:
    raise ValueError(f"{fn}: reduction_axes must name at least one axis, got {reduction_axes!r}.")
  scale = _axes.per_feature(scale, name="scale", x_shape=x.shape, feature_axes=feat, fn=fn,
                            allow_complex=True)
  bias = _axes.per_feature(bias, name="bias", x_shape=x.shape, feature_axes=feat, fn=fn,
                           allow_complex=True)
  where = _axes.check_mask(where, x.shape, fn=fn)
  x = _to_complex(x, scale, bias)
  _axes.check_out_dtype(dtype, x.dtype, fn=fn)
  y, _, _ = _vjp.standardize(x, red, scale, bias, where=where, epsilon=epsilon,
                             axis_name=axis_name, axis_index_groups=axis_index_groups,
                             center=center, dtype=dtype)
  return y


_COMMON_DOC = """
  Args (shared by the feature-wise norms):
    scale, bias: optional; the feature shape (``x.shape`` at ``feature_axes``), or
      any array of ``x``'s rank that broadcasts to it (per-sample FiLM/AdaLN).
    where: optional boolean mask broadcastable to ``x``: only True elements enter
      the statistics (all elements are normalized).  A group with no True element
      has no statistics: its output is ``bias`` (0 without), with zero gradient.
    epsilon: added to the variance.
    axis_name, axis_index_groups: also reduce the statistics across these named
      device axes (e.g. sequence parallelism); sums and counts are reduced, so the
      result equals the unsplit computation.
    dtype: output dtype (default ``x.dtype``); statistics are at least float32.
    Complex ``x`` (or complex scale/bias): complex mean, real variance
      ``E|x - mean|^2``, complex output; gradients by plain autodiff.
"""


def layer_norm(x: Array, scale: Array | None = None, bias: Array | None = None, *,
               reduction_axes: Axes = -1, feature_axes: Axes = -1, where: Array | None = None,
               epsilon: float = 1e-6, axis_name: AxisName | None = None,
               axis_index_groups=None, dtype: DType | None = None) -> Array:
  """Layer normalization: ``(x - E[x]) * rsqrt(Var[x] + eps) * scale + bias``.

  Statistics are taken per sample over ``reduction_axes`` (default: the last
  axis); ``scale``/``bias`` are indexed by ``feature_axes``.
  """
  return _standardize(x, scale, bias, reduction_axes=reduction_axes, feature_axes=feature_axes,
                      where=where, epsilon=epsilon, axis_name=axis_name,
                      axis_index_groups=axis_index_groups, center=True, dtype=dtype,
                      fn="jaxnorm.layer_norm")


def rms_norm(x: Array, scale: Array | None = None, *, reduction_axes: Axes = -1,
             feature_axes: Axes = -1, where: Array | None = None, epsilon: float = 1e-6,
             axis_name: AxisName | None = None, axis_index_groups=None,
             dtype: DType | None = None) -> Array:
  """Root-mean-square normalization: ``x * rsqrt(E[x^2] + eps) * scale`` (no centring)."""
  return _standardize(x, scale, None, reduction_axes=reduction_axes, feature_axes=feature_axes,
                      where=where, epsilon=epsilon, axis_name=axis_name,
                      axis_index_groups=axis_index_groups, center=False, dtype=dtype,
                      fn="jaxnorm.rms_norm")


def instance_norm(x: Array, scale: Array | None = None, bias: Array | None = None, *,
                  feature_axes: Axes = -1, where: Array | None = None, epsilon: float = 1e-6,
                  axis_name: AxisName | None = None, axis_index_groups=None,
                  dtype: DType | None = None) -> Array:
  """Instance normalization: layer norm over every axis except the batch axis (0)
  and ``feature_axes`` — per sample and per channel, over the spatial axes."""
  fn = "jaxnorm.instance_norm"
  x = _axes.check_floating(x, fn=fn, allow_complex=True)
  feat = _axes.canonical_axes(feature_axes, x.ndim, what="feature_axes", fn=fn)
  if 0 in feat:
    raise ValueError(f"{fn}: axis 0 is the batch axis and cannot be a feature axis "
                     f"(got feature_axes={feature_axes!r}).")
  red = _axes.other_axes((0,) + feat, x.ndim)
  if not red:  # flax returns bias here: it normalizes each element by itself
    raise ValueError(
        f"{fn}: an input of shape {x.shape} has no spatial axis (no axis besides the batch axis "
        f"0 and feature_axes {feat}), so each instance statistic would cover a single element "
        "and the output would be just `bias` (what flax.linen.InstanceNorm returns). For "
        "(batch, features) input use jaxnorm.layer_norm (statistics over the features of a "
        "sample) or jaxnorm.batch_norm (over the batch); for a sequence add its axis, e.g. "
        "(batch, length, features).")
  return _standardize(x, scale, bias, reduction_axes=red, feature_axes=feat, where=where,
                      epsilon=epsilon, axis_name=axis_name, axis_index_groups=axis_index_groups,
                      center=True, dtype=dtype, fn=fn)


def _split_channels(a: Array | None, axis: int, groups: int) -> Array | None:
  """Reshapes axis ``axis`` of size C into (groups, C // groups); size 1 into (1, 1)."""
  if a is None:
    return None
  c = a.shape[axis]
  new = (groups, c // groups) if c != 1 else (1, 1)
  return a.reshape(a.shape[:axis] + new + a.shape[axis + 1:])


def group_norm(x: Array, scale: Array | None = None, bias: Array | None = None, *,
               num_groups: int | None = None, group_size: int | None = None,
               reduction_axes: Axes | None = None, channel_axis: int = -1,
               where: Array | None = None, epsilon: float = 1e-6,
               axis_name: AxisName | None = None, axis_index_groups=None,
               dtype: DType | None = None) -> Array:
  """Group normalization: channels split into groups, each normalized over
  ``reduction_axes`` and the channels of its group.

  Give ``num_groups`` or ``group_size``.  ``reduction_axes`` default to every axis
  except the first (batch); they must include ``channel_axis`` (default -1).  For
  an unbatched input pass them explicitly, e.g. ``reduction_axes=(0, 1, 2)`` for
  (H, W, C).  The channel axis is split by a reshape, not a transpose.
  """
  fn = "jaxnorm.group_norm"
  x = _axes.check_floating(x, fn=fn, allow_complex=True)
  (c_ax,) = _axes.canonical_axes(channel_axis, x.ndim, what="channel_axis", fn=fn)
  red = (_axes.canonical_axes(reduction_axes, x.ndim, what="reduction_axes", fn=fn)
         if reduction_axes is not None else tuple(range(1, x.ndim)))
  if c_ax not in red:
    raise ValueError(f"{fn}: reduction_axes {red} must include the channel axis {c_ax}: "
                     "statistics are shared within a group of channels. Add it, or use "
                     "instance_norm/layer_norm for other patterns.")
  groups = _axes.check_groups(x.shape[c_ax], num_groups, group_size, fn=fn)
  scale = _axes.per_feature(scale, name="scale", x_shape=x.shape, feature_axes=(c_ax,), fn=fn,
                            allow_complex=True)
  bias = _axes.per_feature(bias, name="bias", x_shape=x.shape, feature_axes=(c_ax,), fn=fn,
                           allow_complex=True)
  where = _axes.check_mask(where, x.shape, fn=fn)
  x = _to_complex(x, scale, bias)
  shift = lambda a: a + 1 if a > c_ax else a  # axis index after the split
  xg = _split_channels(x, c_ax, groups)
  red_g = tuple(shift(a) for a in red if a != c_ax) + (c_ax + 1,)
  y = _standardize(xg, _split_channels(scale, c_ax, groups), _split_channels(bias, c_ax, groups),
                   reduction_axes=red_g, feature_axes=tuple(range(xg.ndim)),
                   where=_split_channels(where, c_ax, groups), epsilon=epsilon,
                   axis_name=axis_name, axis_index_groups=axis_index_groups, center=True,
                   dtype=dtype, fn=fn)
  return y.reshape(x.shape)


DegeneratePolicy = Literal["running", "batch"]


def check_batch_norm_inputs(x, stats, scale, bias, *, training, feature_axes, momentum,
                            epsilon, degenerate, where, fn: str, allow_complex: bool = False):
  """Batch norm's validation, shared by the batch-statistics family (``_renorm``).

  Returns ``(training, x, feature_axes, reduced_axes, stats, scale, bias, where)``
  laid out for broadcasting against ``x``.
  """
  training = _axes.check_training(training, fn=fn)
  x = _axes.check_floating(x, fn=fn, allow_complex=allow_complex)
  _axes.check_nonnegative(epsilon, fn=fn, name="epsilon")
  _axes.check_momentum(momentum, fn=fn)
  _axes.check_choice(degenerate, ("running", "batch"), fn=fn, name="degenerate")
  feat = _axes.canonical_axes(feature_axes, x.ndim, what="feature_axes", fn=fn)
  red = _axes.other_axes(feat, x.ndim)
  if not red:
    raise ValueError(f"{fn}: feature_axes {feat} cover every axis of the input {x.shape}, "
                     "leaving nothing to reduce. Batch statistics need a batch axis.")
  stats = _axes.check_batch_stats(stats, x.shape, feat, fn=fn)
  scale, bias = (_axes.per_feature(p, name=name, x_shape=x.shape, feature_axes=feat, fn=fn,
                                   allow_complex=allow_complex)
                 for name, p in (("scale", scale), ("bias", bias)))
  where = _axes.check_mask(where, x.shape, fn=fn)
  return training, x, feat, red, stats, scale, bias, where


def batch_norm(x: Array, stats: BatchStats | CountedBatchStats, scale: Array | None = None,
               bias: Array | None = None, *, training: bool, feature_axes: Axes = -1,
               momentum: float | None = 0.99, epsilon: float = 1e-5, where: Array | None = None,
               axis_name: AxisName | None = None, axis_index_groups=None,
               degenerate: DegeneratePolicy = "running", unbiased_var: bool = False,
               debias: bool = False,
               dtype: DType | None = None) -> tuple[Array, BatchStats | CountedBatchStats]:
  """Batch normalization with explicit running averages.

  Training: ``y = (x - mean_B) * rsqrt(var_B + eps) * scale + bias`` with the
  batch statistics over every axis except ``feature_axes`` (global across
  ``axis_name``), and ``new_stats = momentum * stats + (1 - momentum) * batch``.
  Evaluation: the same map with the running averages, which come back unchanged.
  Either way the returned state has the type, shapes and dtypes of ``stats``.

  Degenerate batches.  A feature whose batch statistics are unusable — fewer than
  2 included elements (a batch of one, an all-masked batch: the variance is 0 or
  undefined) or non-finite statistics (NaN/Inf in the batch) — is handled by
  ``degenerate``:

  * ``"running"`` (default): that feature is normalized with the running
    averages and its running averages are left unchanged.  Nothing becomes NaN
    that was not NaN in the input, and no bad batch enters the running averages.
    (Compare ``new_stats`` with ``stats`` to detect it.)
  * ``"batch"``: use the batch statistics regardless, as flax does (a single
    element normalizes to ``bias``, and so does an empty batch; NaN propagates into
    the running averages).

  Args:
    x: floating input, any layout.
    stats: ``BatchStats`` with the feature shape (``x.shape`` at ``feature_axes``),
      or a ``CountedBatchStats`` (``init_batch_stats(shape, counted=True)``) for
      ``momentum=None``/``debias=True``.  A plain tuple is rejected (the state
      comes back with the type it went in with).
    scale, bias: optional per-feature arrays, or arrays of ``x``'s rank that
      broadcast to it.
    training: Python bool (static).  Use ``lax.cond`` to switch on a traced flag.
    feature_axes: the axes that are *not* reduced (default -1: NHWC, (N, C),
      (N, T, C)); e.g. 1 for NCHW.
    momentum: Flax convention; PyTorch's ``momentum=m`` is ``1 - m`` here.
      ``None``: PyTorch's cumulative average (see :func:`jaxnorm.update_batch_stats`).
    where: optional boolean mask broadcastable to ``x``: elements that enter the
      statistics (e.g. ``(N, 1)`` for padded samples).
    axis_name, axis_index_groups: reduce across devices (global-batch statistics)
      inside ``shard_map``/``pmap``/``vmap``: 2 all-reduces in training (see
      :func:`jaxnorm.moments`), none in evaluation.  Not needed under plain ``jit``
      with a sharded batch.  ``axis_index_groups`` works under ``pmap`` only.
    degenerate: ``"running"`` or ``"batch"``, see above.
    unbiased_var: update the running variance with ``n / (n - 1)`` (PyTorch).
    debias: Haiku's zero-debiased EMA (``hidden / (1 - momentum^t)``).
    dtype: output dtype (default ``x.dtype``).

  Returns:
    ``(y, new_stats)``.

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> x = jnp.array([[1., 2.], [3., 6.]])
  >>> y, s = jn.batch_norm(x, jn.init_batch_stats(2), training=True, momentum=0.5, epsilon=0.)
  >>> y
  Array([[-1., -1.],
         [ 1.,  1.]], dtype=float32)
  >>> s
  BatchStats(mean=Array([1., 2.], dtype=float32), var=Array([1. , 2.5], dtype=float32))
  """
  fn = "jaxnorm.batch_norm"
  training, x, feat, red, stats, scale, bias, where = check_batch_norm_inputs(
      x, stats, scale, bias, training=training, feature_axes=feature_axes, momentum=momentum,
      epsilon=epsilon, degenerate=degenerate, where=where, fn=fn, allow_complex=True)
  _axes.check_counted(stats, momentum, debias, fn=fn)
  _axes.check_complex_stats(stats, x.dtype, fn=fn)
  bshape = _axes.broadcast_shape(x.shape, feat)
  cdtype = stat_dtype(x.dtype)
  _axes.check_out_dtype(dtype, jnp.result_type(x, *(p for p in (scale, bias) if p is not None)),
                        fn=fn)
  complex_affine = None  # complex scale/bias on a real x: real statistics (as flax), then
  if not jnp.iscomplexobj(x) and _any_complex(scale, bias):  # the affine map in complex
    complex_affine, scale, bias, dtype = (scale, bias, dtype), None, None, cdtype
  run_mean = stats.mean.reshape(bshape).astype(cdtype)
  run_var = stats.var.reshape(bshape).astype(real_dtype(cdtype))
  if not training:
    zero = jnp.zeros((), cdtype)
    used = Centered(shift=run_mean, offset=zero, var=run_var, count=zero)
    y = _vjp.scale_shift(x, used, scale, bias, epsilon, dtype)
    return _apply_complex_affine(y, x.dtype, complex_affine), stats

  y, batch, usable = _vjp.standardize(
      x, red, scale, bias, where=where, epsilon=epsilon, axis_name=axis_name,
      axis_index_groups=axis_index_groups, center=True, dtype=dtype,
      fallback=(run_mean, run_var) if degenerate == "running" else None)
  fshape = _axes.feature_shape(x.shape, feat)
  flat = lambda v: v.reshape(fshape)
  batch_moments = Moments(mean=flat(batch.shift + batch.offset), var=flat(batch.var),
                          count=flat(batch.count))
  new_stats = update_batch_stats(stats, batch_moments, momentum=momentum,
                                 where=None if usable is None else flat(usable),
                                 unbiased_var=unbiased_var, debias=debias)
  return _apply_complex_affine(y, x.dtype, complex_affine), new_stats


def _apply_complex_affine(y: Array, x_dtype, complex_affine) -> Array:
  """``y * scale + bias`` with complex ``scale``/``bias`` deferred by :func:`batch_norm`
  (``y`` standardized in the real statistics dtype); output dtype as flax's promotion."""
  if complex_affine is None:
    return y
  scale, bias, dtype = complex_affine
  out = dtype or jnp.result_type(x_dtype, *(p for p in (scale, bias) if p is not None))
  y = y.astype(out)
  y = y if scale is None else y * scale.astype(out)
  return (y if bias is None else y + bias.astype(out)).astype(out)
