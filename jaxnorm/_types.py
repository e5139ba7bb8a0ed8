"""Small state and statistics types: NamedTuple pytrees, safe under jit/vmap/scan/cond."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

Array = jax.Array
Axes = Union[int, Sequence[int]]
AxisName = Union[Any, tuple]  # a hashable axis name or a tuple of names
DType = Any
Shape = Sequence[int]


class Moments(NamedTuple):
  """Batch statistics of an array, reduced over some axes.

  Attributes:
    mean: ``E[x]`` over the reduced elements, float32 or wider.  Shape: the
      non-reduced shape (or the keep-dims shape when asked for).
    var: biased variance ``E[(x - E[x])^2]``, never negative.  Same shape.
    count: number of elements (after masking, summed across devices) that each
      statistic was computed from, as a float of the same dtype and shape.
      A count of 0 gives ``mean = var = 0``.
  """

  mean: Array
  var: Array
  count: Array


class BatchStats(NamedTuple):
  """Running averages of batch statistics, one entry per feature.

  Attributes:
    mean: exponential moving average of the batch mean; shape: feature shape;
      dtype float32 by default, kept whatever the input dtype.
    var: exponential moving average of the batch variance; same shape/dtype.
  """

  mean: Array
  var: Array


class CountedBatchStats(NamedTuple):
  """Running averages with the number of updates each feature has received.

  The state of the conventions that weight an update by how many came before:
  PyTorch's cumulative average (``momentum=None``) and Haiku's zero-debiased
  EMA (``debias=True``), see :func:`jaxnorm.update_batch_stats`.  ``mean`` and
  ``var`` are always the averages to normalize with (for the debiased EMA:
  Haiku's ``average``, not its ``hidden``), so evaluation reads them as it reads
  a :class:`BatchStats`.

  Attributes:
    mean: running average of the batch mean; shape: feature shape; float32 by default.
    var: running average of the batch variance; same shape/dtype.
    count: int32, same shape: how many updates entered each feature (0: none
      yet; ``mean``/``var`` then hold their initial values, which the first
      update replaces).  In a Flax module it is the ``batch_stats/count`` variable.
  """

  mean: Array
  var: Array
  count: Array


def init_batch_stats(feature_shape: int | Shape, dtype: DType = jnp.float32, *,
                     counted: bool = False) -> BatchStats | CountedBatchStats:
  """Fresh running averages: ``mean = 0`` and ``var = 1`` of ``feature_shape``.

  A complex ``dtype`` (for complex inputs) gives a complex mean and a real
  variance of the matching precision (complex64: float32).

  ``counted=True`` returns a :class:`CountedBatchStats` (with ``count = 0``), the
  state that ``momentum=None`` (cumulative average) and ``debias=True`` (Haiku's
  zero-debiased EMA) need.

  >>> import jaxnorm as jn
  >>> jn.init_batch_stats(3)
  BatchStats(mean=Array([0., 0., 0.], dtype=float32), var=Array([1., 1., 1.], dtype=float32))
  >>> jn.init_batch_stats(2, counted=True).count
  Array([0, 0], dtype=int32)
  """
  shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(f"init_batch_stats: dtype must be a floating or complex dtype, got "
                    f"{dtype}. Use jnp.float32 (the default) for running averages.")
  var_dtype = jnp.finfo(dtype).dtype  # complex64 -> complex mean, float32 var (real)
  if counted:
    return CountedBatchStats(mean=jnp.zeros(shape, dtype), var=jnp.ones(shape, var_dtype),
                             count=jnp.zeros(shape, jnp.int32))
  return BatchStats(mean=jnp.zeros(shape, dtype), var=jnp.ones(shape, var_dtype))
