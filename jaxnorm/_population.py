"""Population statistics (PreciseBN): exact averages of batch statistics over many batches.

Batch norm's running averages are an EMA over training steps, taken while the
weights were still moving, and at small batch sizes each batch's statistics are
noisy.  Wu & Johnson (2021, "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576)
recompute them after training, with the weights fixed: run the model in
training mode over ``N`` batches and replace each layer's running averages by the
average of its batch statistics with equal weight per sample (fvcore's
``update_bn_stats``, torch's ``torch.optim.swa_utils.update_bn``).

The accumulator here is a small NamedTuple folded over batches (``lax.scan``
friendly): count-weighted sums merged with Chan et al.'s formulas, so it is exact
in any order and in float32 does not lose the variance to cancellation.  Feed it
:func:`jaxnorm.moments` computed with ``axis_name`` to accumulate the global
batch across devices exactly.

Two variances are on offer (:func:`population_batch_stats`):

* ``variance="total"`` (default): the variance of all samples seen,
  ``sum_b [n_b var_b + n_b (mean_b - mean)^2] / n``: the population variance of
  the layer's input, what evaluation on the whole data set would compute.
* ``variance="batch"``: the average per-batch variance ``sum_b n_b var_b / n``
  (fvcore's choice; torch's ``update_bn`` averages torch's unbiased running
  variances, i.e. ``unbiased=True``).  It omits the spread of the batch means,
  so it matches the variance the layer saw in training mode.

With equal batch sizes both weightings coincide with torch's per-batch average;
with a ragged last batch, jaxnorm weights every sample equally where torch
weights every batch equally.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from . import _axes
from ._stats import stat_dtype
from ._types import Array, BatchStats, DType, Moments, Shape


class PopulationStats(NamedTuple):
  """Accumulated statistics of many batches (per feature).

  Attributes:
    count: number of elements seen, ``n = sum_b n_b`` (float).
    mean: their mean.
    m2: sum of squared deviations from ``mean`` over every element seen
      (``n * total variance``), merged with Chan's formula.
    within: ``sum_b n_b var_b``: the within-batch sum of squares.
    within_unbiased: ``sum_b n_b var_b n_b / (n_b - 1)`` (batches of one element
      contribute 0): each batch's unbiased variance, weighted by its size.
    batches: number of batches that contributed (float).
  All have the feature shape and a float dtype of at least float32.
  """

  count: Array
  mean: Array
  m2: Array
  within: Array
  within_unbiased: Array
  batches: Array


def init_population_stats(feature_shape: int | Shape,
                          dtype: DType = jnp.float32) -> PopulationStats:
  """An empty accumulator (everything 0) for ``feature_shape``.

  >>> import jaxnorm as jn
  >>> jn.init_population_stats(2).count
  Array([0., 0.], dtype=float32)
  """
  shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"jaxnorm.init_population_stats: dtype must be a floating dtype, got "
                    f"{dtype}. Use jnp.float32 (the default).")
  zeros = jnp.zeros(shape, stat_dtype(dtype))
  return PopulationStats(*(zeros,) * 6)


def update_population_stats(acc: PopulationStats, batch_moments: Moments) -> PopulationStats:
  """Adds one batch's statistics (from :func:`jaxnorm.moments`) to the accumulator.

  Chan et al.'s merge of ``(n_a, mean_a, m2_a)`` with the batch ``(n_b, mean_b,
  n_b var_b)``::

    n = n_a + n_b;   delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    m2 = m2_a + n_b var_b + delta^2 n_a n_b / n

  A feature with ``n_b = 0`` (all masked) is left unchanged.  Pass moments
  computed with ``axis_name`` to accumulate the global batch across devices.

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> acc = jn.init_population_stats(1)
  >>> for b in (jnp.array([[1.], [3.]]), jnp.array([[5.], [7.]])):
  ...   acc = jn.update_population_stats(acc, jn.moments(b, axis=0))
  >>> acc.mean, acc.m2 / acc.count
  (Array([4.], dtype=float32), Array([5.], dtype=float32))
  """
  fn = "jaxnorm.update_population_stats"
  if not isinstance(acc, PopulationStats):
    raise TypeError(f"{fn}: acc must be a jaxnorm.PopulationStats (from "
                    f"jaxnorm.init_population_stats), got {type(acc).__name__}.")
  if not isinstance(batch_moments, Moments):
    raise TypeError(f"{fn}: batch_moments must be a jaxnorm.Moments (from jaxnorm.moments), "
                    f"got {type(batch_moments).__name__}.")
  for name, v in zip(batch_moments._fields, batch_moments):
    if jnp.shape(v) != jnp.shape(acc.mean):
      raise ValueError(
          f"{fn}: the batch {name} has shape {jnp.shape(v)}, but the accumulator has the "
          f"feature shape {jnp.shape(acc.mean)}. Compute the moments over every non-feature "
          "axis, without keepdims, or create the accumulator with "
          f"jaxnorm.init_population_stats({jnp.shape(v)}).")
  dtype = acc.mean.dtype
  n_b, mean_b, var_b = (jnp.asarray(v).astype(dtype) for v in
                        (batch_moments.count, batch_moments.mean, batch_moments.var))
  n_a = acc.count
  n = n_a + n_b
  n_safe = jnp.where(n > 0, n, 1)
  delta = mean_b - acc.mean
  mean = acc.mean + delta * (n_b / n_safe)
  m2 = acc.m2 + n_b * var_b + delta * delta * (n_a * n_b / n_safe)
  unbiased = jnp.where(n_b > 1, n_b * var_b * n_b / jnp.where(n_b > 1, n_b - 1, 1), 0)
  seen = (n_b > 0).astype(dtype)
  return PopulationStats(count=n, mean=mean, m2=m2, within=acc.within + n_b * var_b,
                         within_unbiased=acc.within_unbiased + unbiased,
                         batches=acc.batches + seen)


def population_batch_stats(acc: PopulationStats, *, variance: str = "total",
                           unbiased: bool = False, fallback: BatchStats | None = None,
                           dtype: DType | None = None) -> BatchStats:
  """The running averages that the accumulated batches define.

  ``mean`` is the mean of every element seen.  ``var``:

  * ``variance="total"``: ``m2 / n`` (``m2 / (n - 1)`` with ``unbiased``): the
    population variance of the layer's input.
  * ``variance="batch"``: ``sum_b n_b var_b / n`` (with ``unbiased``, each
    batch's ``n_b / (n_b - 1)``-corrected variance, as torch's ``update_bn``
    averages them): the average within-batch variance.

  Features that saw no element keep ``fallback`` (default: ``mean = 0``,
  ``var = 1``, fresh running averages).  ``dtype``: of the result (default: the
  accumulator's; pass the running averages' dtype to write them back).

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> acc = jn.init_population_stats(1)
  >>> for b in (jnp.array([[1.], [3.]]), jnp.array([[5.], [7.]])):
  ...   acc = jn.update_population_stats(acc, jn.moments(b, axis=0))
  >>> jn.population_batch_stats(acc)
  BatchStats(mean=Array([4.], dtype=float32), var=Array([5.], dtype=float32))
  >>> jn.population_batch_stats(acc, variance="batch").var
  Array([1.], dtype=float32)
  """
  fn = "jaxnorm.population_batch_stats"
  if not isinstance(acc, PopulationStats):
    raise TypeError(f"{fn}: acc must be a jaxnorm.PopulationStats (from "
                    f"jaxnorm.init_population_stats), got {type(acc).__name__}.")
  _axes.check_choice(variance, ("total", "batch"), fn=fn, name="variance")
  n = acc.count
  if variance == "total":
    denom = n - 1 if unbiased else n
    var = acc.m2 / jnp.where(denom > 0, denom, 1)
  else:
    var = (acc.within_unbiased if unbiased else acc.within) / jnp.where(n > 0, n, 1)
  if fallback is None:
    fallback = BatchStats(mean=jnp.zeros_like(acc.mean), var=jnp.ones_like(acc.mean))
  seen = n > 0
  dtype = acc.mean.dtype if dtype is None else dtype
  mean = jnp.where(seen, acc.mean, jnp.asarray(fallback.mean).astype(acc.mean.dtype))
  var = jnp.where(seen, var, jnp.asarray(fallback.var).astype(acc.mean.dtype))
  return BatchStats(mean=mean.astype(dtype), var=var.astype(dtype))
