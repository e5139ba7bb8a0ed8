"""Population statistics (PreciseBN) for Flax NNX models.

The hook.  A module that keeps running averages in ``self.mean``/``self.var``
(``nnx.BatchStat``) calls :func:`sow_batch_moments` on its input in training
mode.  It does nothing unless the call runs under
``nnx.capture(..., BatchMoments)`` (so normal training pays nothing); then it
sows the :class:`jaxnorm.Moments` of the input over the module's reduction axes
(with its mask and ``axis_name``) as the intermediate ``batch_moments``.
:func:`precise_batch_stats` runs a model under that capture, folds each
layer's moments over the batches with :func:`jaxnorm.update_population_stats`,
and writes the result into the layer's ``mean`` and ``var`` in place.
``jaxnorm.nnx.BatchNorm`` has the hook; any module with the same variables can
call it (e.g. Batch Renorm or Ghost BN).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from .. import _axes
from .._population import init_population_stats, population_batch_stats, update_population_stats
from .._stats import moments
from .._types import Axes, AxisName, BatchStats

NAME = "batch_moments"


class BatchMoments(nnx.Intermediate):
  """The intermediate that hooked layers sow their batch moments into (PreciseBN)."""


def sow_batch_moments(module: nnx.Module, x: jax.Array, *, feature_axes: Axes,
                      where: jax.Array | None = None, axis_name: AxisName | None = None,
                      axis_index_groups: Any = None) -> bool:
  """Records the batch moments of ``x`` (every axis but ``feature_axes``) for PreciseBN.

  A no-op returning False unless the call runs under
  ``nnx.capture(..., jaxnorm.nnx.BatchMoments)``; otherwise sows
  ``jaxnorm.moments(x, axis=<the other axes>, where=where, axis_name=axis_name)``
  as the ``batch_moments`` intermediate (a tuple, one entry per call) and
  returns True.
  """
  captures = getattr(module, "__captures__", ())  # set by nnx.capture for its duration
  if not any(type(c) is BatchMoments for c in captures):
    return False
  feat = _axes.canonical_axes(feature_axes, x.ndim, what="feature_axes",
                              fn="jaxnorm.nnx.sow_batch_moments")
  m = moments(x, axis=_axes.other_axes(feat, x.ndim), where=where, axis_name=axis_name,
              axis_index_groups=axis_index_groups)
  return module.sow(BatchMoments, NAME, m)


def _hooked(model: nnx.Module) -> dict[tuple, nnx.Module]:
  return {path: m for path, m in nnx.iter_modules(model)
          if isinstance(getattr(m, "mean", None), nnx.BatchStat)
          and isinstance(getattr(m, "var", None), nnx.BatchStat)
          and hasattr(m, "use_running_average")}


def precise_batch_stats(model: nnx.Module, batches: Iterable, *,
                        forward: Callable | None = None, variance: str = "total",
                        unbiased: bool = False, jit: bool = True) -> nnx.Module:
  """Replaces every hooked layer's ``mean``/``var`` by population statistics, in place.

  Every layer with ``mean``/``var`` batch stats and a ``use_running_average``
  attribute is switched to training mode for the passes (and back after); the
  other modules keep their mode (set it yourself, e.g. ``model.eval()`` to turn
  dropout off first: the layers here are switched regardless).  For each batch
  ``forward(model, batch)`` (default: ``model(*batch)`` for a tuple, else
  ``model(batch)``) runs under ``nnx.capture(..., BatchMoments)``; each layer's
  batch moments are accumulated with equal weight per sample
  (:func:`jaxnorm.update_population_stats`).  Then ``mean`` and ``var`` are set
  to :func:`jaxnorm.population_batch_stats` (``variance``, ``unbiased``) in their
  own dtype; every other variable, ``count`` included, is restored to its value
  before the passes.  Returns ``model``.

  Args:
    model: the trained model (parameters are not changed).
    batches: an iterable of model inputs.
    forward: ``forward(model, batch)``, for models called another way.
    variance: ``"total"`` (population variance) or ``"batch"`` (mean per-batch
      variance, fvcore's); see :func:`jaxnorm.population_batch_stats`.
    unbiased: ``n / (n - 1)`` corrections (torch's ``update_bn`` is ``"batch"``
      with ``unbiased=True``).
    jit: compile the forward pass once (``nnx.jit``) for all batches.
  """
  fn = "jaxnorm.nnx.precise_batch_stats"
  _axes.check_choice(variance, ("total", "batch"), fn=fn, name="variance")
  if forward is None:
    forward = lambda m, b: m(*b) if isinstance(b, tuple) else m(b)
  layers = _hooked(model)
  if not layers:
    raise ValueError(f"{fn}: the model has no layer with mean/var batch stats (e.g. "
                     "jaxnorm.nnx.BatchNorm); there is nothing to recompute.")
  saved_state = nnx.clone(nnx.state(model, nnx.BatchStat))
  saved_modes = {path: m.use_running_average for path, m in layers.items()}

  def collect(model, batch):
    _, sown = nnx.capture(forward, BatchMoments)(model, batch)
    return {path: value.get_value() for path, value in _flat(sown)}

  run = nnx.jit(collect) if jit else collect
  accs: dict = {}
  try:
    for m in layers.values():
      m.use_running_average = False
    for batch in batches:
      for path, ms in run(model, batch).items():
        for mom in ms:
          if path not in accs:
            accs[path] = init_population_stats(mom.mean.shape, mom.mean.dtype)
          accs[path] = update_population_stats(accs[path], mom)
  finally:
    nnx.update(model, saved_state)
    for path, m in layers.items():
      m.use_running_average = saved_modes[path]
  if not accs:
    raise ValueError(
        f"{fn}: no layer recorded batch moments (were there any batches?). The layers must "
        "call jaxnorm.nnx.sow_batch_moments (jaxnorm.nnx.BatchNorm does).")
  for path, acc in accs.items():
    layer = layers.get(path)
    if layer is None:
      raise ValueError(f"{fn}: module {'/'.join(map(str, path))} recorded batch moments but "
                       "has no mean/var batch stats to replace.")
    old_mean, old_var = layer.mean[...], layer.var[...]
    fallback = BatchStats(mean=old_mean.reshape(acc.mean.shape),
                          var=old_var.reshape(acc.mean.shape))
    new = population_batch_stats(acc, variance=variance, unbiased=unbiased, fallback=fallback)
    layer.mean[...] = new.mean.reshape(old_mean.shape).astype(old_mean.dtype)
    layer.var[...] = new.var.reshape(old_var.shape).astype(old_var.dtype)
  return model


def _flat(state) -> list[tuple[tuple, Any]]:
  """``(module path, BatchMoments variable)`` pairs of a captured state."""
  out = []
  for path, v in nnx.to_flat_state(state):
    if path and path[-1] == NAME:
      out.append((tuple(path[:-1]), v))
  return out
