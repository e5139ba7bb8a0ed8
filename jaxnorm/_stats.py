"""Batch statistics and running averages.

This is the only module that communicates across devices: every statistic in
jaxnorm is computed by :func:`centered_moments`, which reduces *sums and counts*
(never means of means), so the result is the statistic of the global batch, also
when masks leave devices with unequal counts.

Numerics.  The textbook one-pass formula ``E[x^2] - E[x]^2`` loses everything
when ``|mean| >> std`` (for ``x = 1e4 + N(0, 1)`` in float32 it is off by ~1e3).
jaxnorm uses *shifted data*: with a reference value ``k`` taken from the data
itself (so ``|mean - k|`` is a few standard deviations at most),

    d   = sum(x - k) / n             (the mean, relative to k)
    var = sum((x - k)^2) / n - d^2   (no catastrophic cancellation)

which is still a single fused pass over ``x``.  The mean is kept as the pair
``(k, d)``: rounding ``k + d`` to float32 alone costs up to half an ulp of the
offset (5e-4 at 1e4), so the normalisation subtracts ``k`` and ``d`` separately.
``k`` is a constant under autodiff (``stop_gradient``); the statistics do not
depend on it mathematically, so gradients are exact.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from . import _axes
from ._types import Array, Axes, AxisName, BatchStats, CountedBatchStats, Moments


class Centered(NamedTuple):
  """Statistics in the shifted representation used internally (keep-dims shapes).

  ``mean = shift + offset``; ``var`` is centred (or the raw second moment when
  the statistics were computed with ``center=False``, in which case shift and
  offset are zero).
  """

  shift: Array
  offset: Array
  var: Array
  count: Array


def stat_dtype(dtype) -> Any:
  """Statistics are computed in at least float32 (float64 stays float64, complex64
  and complex128 stay complex)."""
  return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype) -> Any:
  """The real dtype of ``dtype``'s values: float32 for complex64, else ``dtype`` itself.
  Variances and counts are real also for complex data."""
  return jnp.finfo(dtype).dtype


def abs_sq(v: Array) -> Array:
  """``|v|^2``, real: ``re^2 + im^2`` for complex ``v`` (as flax's ``_abs_sq``)."""
  if jnp.iscomplexobj(v):
    return jnp.square(v.real) + jnp.square(v.imag)
  return jnp.square(v)


def independent(*arrays: Array | None) -> tuple[Array | None, ...]:
  """The same arrays through one ``optimization_barrier`` (``None`` passes through).

  Expressions built from different outputs are not common subexpressions, so each
  full-size pass fuses its own ``x - shift`` or bf16-to-float32 convert, where XLA:CPU
  would otherwise materialise one shared full-size array for several passes to
  read.  Nothing is copied.  (One barrier for all copies: separate barriers on the
  same value would be merged.)
  """
  present = [a for a in arrays if a is not None]
  out = iter(lax.optimization_barrier(tuple(present)) if present else ())
  return tuple(None if a is None else next(out) for a in arrays)


def _count(where: Array | None, x_shape, axes, keep_shape, dtype) -> Array:
  """Number of included elements per statistic, without broadcasting the mask to x."""
  if where is None:
    return jnp.full(keep_shape, _axes.size(x_shape, axes), dtype)
  summed = tuple(a for a in axes if where.shape[a] != 1)
  factor = _axes.size(x_shape, [a for a in axes if where.shape[a] == 1])
  c = jnp.sum(where, axis=summed, keepdims=True, dtype=dtype) * factor
  return jnp.broadcast_to(c, keep_shape)


def _reference_value(xf: Array, axes, where: Array | None, keep_shape) -> tuple[Array, Array]:
  """A value close to the data for each statistic, and how many elements it came from.

  The first element along the reduced axes; masked, the first included one
  (0 with count 0 when there is none).
  Under ``jit`` with explicitly sharded inputs (``jax.make_mesh``'s default),
  slicing a sharded axis is done in auto mode, where XLA broadcasts the element.
  """
  sharding = getattr(jax.typeof(xf), "sharding", None)
  spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
  if mesh is not None and not mesh.empty and any(
      a < len(spec) and spec[a] is not None for a in axes):
    out_spec = P(*(None if a in axes or a >= len(spec) else spec[a] for a in range(xf.ndim)))

    @jax.jit  # also traced (not dispatched op by op) when called eagerly
    def auto(xf, where):
      with jax.sharding.use_abstract_mesh(jax.typeof(xf).sharding.mesh):
        return jax.sharding.auto_axes(
            lambda xf, where: _local_reference_value(xf, axes, where, keep_shape),
            axes=mesh.axis_names, out_sharding=(out_spec, out_spec))(xf, where)
    return auto(xf, where)
  return _local_reference_value(xf, axes, where, keep_shape)


def _local_reference_value(xf, axes, where, keep_shape):
  """The first element along ``axes`` (the first *included* one when masked)."""
  if where is None:
    ref = lax.slice(xf, (0,) * xf.ndim, keep_shape)
    return ref, jnp.ones(keep_shape, real_dtype(xf.dtype))
  # Flat index of the first True of the mask over the reduced axes it varies along
  # (0 when there is none: then the count is 0 and the value is not used).
  masked = tuple(a for a in axes if where.shape[a] != 1)
  w = jnp.moveaxis(where, masked, tuple(range(where.ndim - len(masked), where.ndim)))
  w = w.reshape(w.shape[:where.ndim - len(masked)] + (-1,))
  first = jnp.argmax(w, axis=-1)
  found = jnp.take_along_axis(w, first[..., None], axis=-1)[..., 0]
  first, found = (jnp.expand_dims(v, masked) for v in (first, found))
  sizes = [where.shape[a] for a in masked]
  position = dict(zip(masked, jnp.unravel_index(first, sizes) if masked else ()))
  index = tuple(position[a] if a in position
                else (0 if a in axes else lax.broadcasted_iota(jnp.int32, keep_shape, a))
                for a in range(xf.ndim))
  found = jnp.broadcast_to(found, keep_shape)
  ref = jnp.where(found, xf[index], 0)  # 0 for an empty group: its mean is then 0
  return ref, found.astype(real_dtype(xf.dtype))


def centered_moments(x: Array, axes: tuple[int, ...], *, where: Array | None = None,
                     axis_name: AxisName | None = None, axis_index_groups=None,
                     center: bool = True, kernels: bool = False) -> Centered:
  """Mean and variance over ``axes`` (keep-dims), in the shifted representation.

  ``x`` must already be validated; ``where`` has the rank of ``x``.  Complex ``x``
  (as flax): complex mean and shift (a data value), real ``var = E|x - mean|^2``
  and count.  With
  ``axis_name`` the sums and counts are added across those named axes: one
  all-reduce for ``center=False``, two for ``center=True`` (a small one that
  agrees on the shift ``k`` across devices, then one of ``[sum, sum_sq, count]``).
  ``kernels=True`` (the caller checked that the CPU kernels are on) takes this
  device's two sums in one pass with :mod:`jaxnorm._cpu._cols` where it covers the
  layout (contiguous reduced axes, features after them, no mask).
  """
  dtype = stat_dtype(x.dtype)
  rdtype = real_dtype(dtype)  # of var and count (complex x: complex mean, real var)
  keep_shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
  # bf16/f16: each pass converts x itself (see ``independent``)
  x_ref, x1, x2 = independent(x, x, x) if x.dtype != dtype else (x, x, x)

  def all_reduce(v):
    if axis_name is None:
      return v
    try:
      return lax.psum(v, axis_name, axis_index_groups=axis_index_groups)
    except NameError as e:
      raise NameError(
          f"jaxnorm: axis_name={axis_name!r} is not bound here: it names a device axis of an "
          "enclosing jax.shard_map, jax.pmap or jax.vmap(..., axis_name=...), and the "
          "normalizer was called outside one (or with another name). Under plain jax.jit "
          "with sharded inputs no axis_name is needed (the statistics are already global); "
          "otherwise call it inside shard_map/pmap/vmap with that axis name.") from e
    except NotImplementedError as e:
      if axis_index_groups is None:
        raise
      raise ValueError(
          f"axis_index_groups={axis_index_groups!r} is not supported here (JAX implements "
          "it only under jax.pmap). Under shard_map or jit, get statistics per group of "
          "devices from a 2-D mesh instead, e.g. jax.make_mesh((groups, per_group), "
          "('group', 'batch')) with the batch sharded over both axes and "
          "axis_name='batch'.") from e

  if center:
    ref, ref_n = _reference_value(x_ref.astype(dtype), axes, where, keep_shape)
    if axis_name is not None:  # every device must shift by the same value
      tot, n = all_reduce(jnp.stack([ref * ref_n, ref_n.astype(dtype)]))
      ref = tot / jnp.maximum(n.real, 1)
    shift = lax.stop_gradient(ref)
  else:
    shift = jnp.zeros(keep_shape, dtype)

  # Each sum gets its own copy of the shift: with one shared ``x - shift``, XLA:CPU
  # materialises it as a full-size array that both reductions read.
  k1, k2 = independent(shift, shift) if center else (None, None)

  def sum_of(f, x, k):
    """``sum(f(x - k))`` over the included elements."""
    v = x.astype(dtype) - k if center else x.astype(dtype)
    v = v if where is None else jnp.where(where, v, 0)  # before f: excluded inf/NaN
    return jnp.sum(f(v), axis=axes, keepdims=True)      # get no NaN gradient

  if kernels and where is None and column_kernel_covers(x, axes):
    from ._cpu import _cols
    s1, s2 = _cols.shifted_sums(x, shift if center else None, None, None, axes)
    s1 = s1 if center else None
  else:
    s2 = sum_of(abs_sq, x2, k2)
    s1 = sum_of(lambda v: v, x1, k1) if center else None
  n = _count(where, x.shape, axes, keep_shape, rdtype)
  if axis_name is not None:
    if center:  # complex s1: one complex all-reduce; s2 and n come back real
      s1, s2, n = all_reduce(jnp.stack([s1, s2.astype(dtype), n.astype(dtype)]))
      s2, n = s2.real, n.real
    else:
      s2, n = all_reduce(jnp.stack([s2, n]))
  n_safe = jnp.where(n > 0, n, 1)  # also keeps gradients finite when n == 0
  if center:
    offset = s1 / n_safe
    var = jnp.maximum(s2 / n_safe - abs_sq(offset), 0)
  else:
    offset = jnp.zeros_like(s2)
    var = s2 / n_safe
  return Centered(shift=shift, offset=offset, var=var, count=n)


def column_kernel_covers(x: Array, axes: tuple[int, ...], *others: Array) -> bool:
  """Whether the CPU column-sum kernel covers sums of ``x`` (and ``others``, of its
  shape) over ``axes`` (:func:`jaxnorm._cpu._cols.covers`; imported on first use)."""
  from ._cpu import _cols
  return _cols.covers(x, tuple(axes), *others)


def moments(x: Array, *, axis: Axes, where: Array | None = None,
            axis_name: AxisName | None = None, axis_index_groups=None,
            keepdims: bool = False) -> Moments:
  """Mean, biased variance and element count of ``x`` over ``axis``.

  Math (``m`` = mask, ``n = sum(m)``): ``mean = sum(m x) / n``,
  ``var = sum(m (x - mean)^2) / n``, computed in one accurate pass (shifted
  data, see module docs) in at least float32.  Complex ``x``: complex ``mean``,
  real ``var = sum(m |x - mean|^2) / n`` (flax's convention).  With ``axis_name`` (a name or a
  tuple of names, inside ``shard_map``/``pmap``/``vmap``) the sums and counts are
  reduced across devices, so the result is exactly the global batch's, also when
  masks leave devices with unequal or zero counts.  Collectives: 2 all-reduces
  (2 floats per statistic to agree on the shift, then ``[sum, sum_sq, count]``);
  under plain ``jit`` with sharded inputs no ``axis_name`` is needed.

  Args:
    x: floating array.
    axis: axis or axes to reduce.
    where: optional boolean mask broadcastable to ``x``; True = included.
    axis_name: named axis/axes to reduce across devices.
    axis_index_groups: optional device groups for ``pmap`` (see ``lax.psum``).
    keepdims: keep the reduced axes with size 1.

  Returns:
    ``Moments(mean, var, count)``; where ``count == 0``, mean and var are 0.

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> m = jn.moments(jnp.array([[1., 2.], [3., 6.]]), axis=0)
  >>> m.mean, m.var, m.count
  (Array([2., 4.], dtype=float32), Array([1., 4.], dtype=float32), Array([2., 2.], dtype=float32))
  """
  fn = "jaxnorm.moments"
  x = _axes.check_floating(x, fn=fn, allow_complex=True)
  axes = _axes.canonical_axes(axis, x.ndim, what="axis", fn=fn)
  if not axes:
    raise ValueError(f"{fn}: axis must name at least one axis to reduce, got {axis!r}.")
  where = _axes.check_mask(where, x.shape, fn=fn)
  c = centered_moments(x, axes, where=where, axis_name=axis_name,
                       axis_index_groups=axis_index_groups)
  out = Moments(mean=c.shift + c.offset, var=c.var, count=c.count)
  if keepdims:
    return out
  return Moments(*(jnp.squeeze(v, axis=axes) for v in out))


def update_batch_stats(stats: BatchStats | CountedBatchStats, batch_moments: Moments, *,
                       momentum: float | None, where: Array | None = None,
                       unbiased_var: bool = False,
                       debias: bool = False) -> BatchStats | CountedBatchStats:
  """Running averages of batch statistics, in the convention of your framework.

  * Flax/Keras EMA (default): ``new = momentum * old + (1 - momentum) * batch``.
    PyTorch's ``momentum=m`` is ``momentum=1 - m`` here, together with
    ``unbiased_var=True`` (the batch variance enters as ``var * n / (n - 1)``, as
    ``torch.nn.BatchNorm`` does).
  * ``momentum=None``: PyTorch's cumulative moving average,
    ``new = old + (batch - old) / (t + 1)`` after ``t`` earlier updates: the
    running averages are the plain mean of every batch statistic seen so far.
  * ``debias=True``: Haiku's zero-debiased EMA (``hk.ExponentialMovingAverage``,
    used by ``hk.BatchNorm``) with ``decay = momentum``:
    ``hidden <- decay * hidden + (1 - decay) * batch`` from ``hidden = 0``, and
    the average is ``hidden / (1 - decay^t)``.  The state keeps that average,
    updated as ``new = old + w_t (batch - old)`` with
    ``w_t = (1 - decay) / (1 - decay^(t + 1))``, which is the same number for a
    constant ``decay`` (``w_0 = 1``; ``decay -> 1`` gives the cumulative average).

  The last two weight an update by how many came before, so they need a
  :class:`CountedBatchStats` (``jaxnorm.init_batch_stats(shape, counted=True)``);
  its ``count`` goes up by one per update.  A ``CountedBatchStats`` with the
  default convention is an EMA that counts its updates.  Features where ``where``
  is False keep their old values and count.  The result has the type and dtypes
  of ``stats``.

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> s = jn.init_batch_stats(2)
  >>> m = jn.moments(jnp.array([[1., 2.], [3., 6.]]), axis=0)
  >>> jn.update_batch_stats(s, m, momentum=0.9).mean
  Array([0.2, 0.4], dtype=float32)
  >>> c = jn.update_batch_stats(jn.init_batch_stats(2, counted=True), m, momentum=None)
  >>> c.mean, c.count
  (Array([2., 4.], dtype=float32), Array([1, 1], dtype=int32))
  """
  fn = "jaxnorm.update_batch_stats"
  if momentum is not None:
    _axes.check_momentum(momentum, fn=fn)
  _axes.check_counted(stats, momentum, debias, fn=fn)
  counted = isinstance(stats, CountedBatchStats)
  where = _axes.check_mask(where, jnp.shape(stats.mean), fn=fn, target="running statistics")
  for name, old, new in zip(("mean", "var"), stats, batch_moments[:2]):
    if jnp.shape(old) != jnp.shape(new):
      raise ValueError(f"{fn}: running {name} has shape {jnp.shape(old)} but the batch {name} "
                       f"has shape {jnp.shape(new)}. Compute the moments without keepdims, "
                       "reducing every non-feature axis.")
  if jnp.iscomplexobj(batch_moments.mean) and not jnp.iscomplexobj(stats.mean):
    raise TypeError(f"{fn}: the batch mean is complex but the running mean is real "
                    f"({jnp.result_type(stats.mean)}): the update would drop the imaginary part. "
                    "Use jaxnorm.init_batch_stats(shape, dtype=jnp.complex64).")
  batch_var = batch_moments.var
  if unbiased_var:
    n = batch_moments.count
    batch_var = batch_var * jnp.where(n > 1, n / jnp.where(n > 1, n - 1, 1), 1)

  if momentum is None or debias:
    t = stats.count.astype(stat_dtype(stats.var.dtype))  # earlier updates (var: real)
    if momentum is None:
      weight = 1 / (t + 1)
    else:  # (1 - d) / (1 - d^(t+1)), accurate for d near 1; d == 1 is the cumulative limit
      d = jnp.asarray(momentum, t.dtype)
      denom = -jnp.expm1((t + 1) * jnp.log(d))
      weight = jnp.where(denom > 0, (1 - d) / jnp.where(denom > 0, denom, 1), 1 / (t + 1))
      weight = jnp.where(t == 0, 1, weight)  # exactly: the first update replaces the init
    mix = lambda old, new: (1 - weight) * old + weight * new
  else:
    mix = lambda old, new: momentum * old + (1 - momentum) * new

  def ema(old, new):
    dtype = stat_dtype(old.dtype)
    out = mix(old.astype(dtype), new.astype(dtype))
    if where is not None:
      out = jnp.where(where, out, old.astype(dtype))
    return out.astype(old.dtype)

  mean, var = ema(stats.mean, batch_moments.mean), ema(stats.var, batch_var)
  if not counted:
    return BatchStats(mean=mean, var=var)
  step = jnp.ones_like(stats.count) if where is None else where.astype(stats.count.dtype)
  return CountedBatchStats(mean=mean, var=var, count=stats.count + step)
