"""Population statistics (PreciseBN) for Flax linen models.

The hook.  A module that keeps running averages in ``batch_stats/{mean, var}``
calls :func:`sow_batch_moments` on its input in training mode.  It does nothing
unless the ``batch_moments`` collection is mutable (so normal training pays
nothing); then it records the :class:`jaxnorm.Moments` of the input over the
module's reduction axes (with its mask and ``axis_name``) under
``batch_moments/<module path>/moments``.  :func:`precise_batch_stats` applies a
model with that collection mutable, folds each layer's moments over the batches
with :func:`jaxnorm.update_population_stats`, and writes the result into
``batch_stats/<module path>/{mean, var}``.  ``jaxnorm.linen.BatchNorm`` has the
hook; any module with the same variables can call it (e.g. Batch Renorm or
Ghost BN, whose population statistics are those of their input as well).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from .. import _axes
from .._population import (PopulationStats, init_population_stats, population_batch_stats,
                           update_population_stats)
from .._stats import moments
from .._types import Axes, AxisName, BatchStats

COLLECTION = "batch_moments"


def sow_batch_moments(module: nn.Module, x: jax.Array, *, feature_axes: Axes,
                      where: jax.Array | None = None, axis_name: AxisName | None = None,
                      axis_index_groups: Any = None) -> bool:
  """Records the batch moments of ``x`` (every axis but ``feature_axes``) for PreciseBN.

  A no-op returning False unless ``batch_moments`` is a mutable collection of
  this apply and the module is not initialising; otherwise sows
  ``jaxnorm.moments(x, axis=<the other axes>, where=where, axis_name=axis_name)``
  as ``batch_moments/<path>/moments`` (a tuple, one entry per call) and returns True.
  """
  if module.is_initializing() or not module.is_mutable_collection(COLLECTION):
    return False
  feat = _axes.canonical_axes(feature_axes, x.ndim, what="feature_axes",
                              fn="jaxnorm.linen.sow_batch_moments")
  m = moments(x, axis=_axes.other_axes(feat, x.ndim), where=where, axis_name=axis_name,
              axis_index_groups=axis_index_groups)
  return module.sow(COLLECTION, "moments", m)


def _layers(tree: Mapping) -> dict[tuple, tuple]:
  """``{module path: (Moments, ...)}`` from a ``batch_moments`` collection."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(tree), is_leaf=lambda k, v: not
                                    isinstance(v, Mapping))
  return {path[:-1]: v for path, v in flat.items() if path[-1] == "moments"}


def precise_batch_stats(apply_fn: Callable, variables: Mapping, batches: Iterable, *,
                        apply_kwargs: Mapping[str, Any] | None = None,
                        variance: str = "total", unbiased: bool = False,
                        jit: bool = True) -> Mapping:
  """Replaces every hooked layer's running averages by population statistics (PreciseBN).

  For each batch, calls ``apply_fn(variables, *args, mutable=[...], **apply_kwargs)``
  (``args = batch`` if it is a tuple, else ``(batch,)``), which must run the model
  in training mode (batch statistics, e.g. ``apply_kwargs={'train': True}``), with
  the parameters fixed; each layer's batch moments are accumulated with equal
  weight per sample (:func:`jaxnorm.update_population_stats`).  Returns
  ``variables`` with ``batch_stats/<layer>/mean`` and ``var`` replaced by
  :func:`jaxnorm.population_batch_stats` (``variance``, ``unbiased``), in their
  own dtype; everything else (and ``batch_stats/<layer>/count``, if any) is kept.

  Args:
    apply_fn: e.g. ``model.apply``.
    variables: the trained variables (``params``, ``batch_stats``, ...).
    batches: an iterable of model inputs (e.g. a few hundred training batches).
    apply_kwargs: extra keyword arguments of ``apply_fn``.
    variance: ``"total"`` (population variance) or ``"batch"`` (mean per-batch
      variance, fvcore's); see :func:`jaxnorm.population_batch_stats`.
    unbiased: ``n / (n - 1)`` corrections (torch's ``update_bn`` is ``"batch"``
      with ``unbiased=True``).
    jit: compile one step for all batches (they must share shapes).
  """
  fn = "jaxnorm.linen.precise_batch_stats"
  _axes.check_choice(variance, ("total", "batch"), fn=fn, name="variance")
  kwargs = dict(apply_kwargs or {})
  if "batch_stats" not in variables:
    raise ValueError(f"{fn}: variables have no 'batch_stats' collection (got "
                     f"{list(variables)}); there are no running averages to recompute.")

  def collect(variables, args):
    _, state = apply_fn(variables, *args, mutable=[COLLECTION, "batch_stats"], **kwargs)
    return _layers(state.get(COLLECTION, {}))

  def step(accs, variables, args):
    layers = collect(variables, args)
    return {path: _fold(accs[path], ms) for path, ms in layers.items()}

  step_fn = jax.jit(step) if jit else step
  accs = None
  for batch in batches:
    args = batch if isinstance(batch, tuple) else (batch,)
    if accs is None:
      shapes = jax.eval_shape(collect, variables, args)
      if not shapes:
        raise ValueError(
            f"{fn}: no layer recorded batch moments. apply_fn must run the model in training "
            "mode (batch statistics: pass e.g. apply_kwargs={'train': True} or "
            "{'use_running_average': False}), and its normalization layers must call "
            "jaxnorm.linen.sow_batch_moments (jaxnorm.linen.BatchNorm does).")
      accs = {path: init_population_stats(ms[0].mean.shape, ms[0].mean.dtype)
              for path, ms in shapes.items()}
    accs = step_fn(accs, variables, args)
  if accs is None:
    raise ValueError(f"{fn}: batches is empty; give at least one batch.")

  stats = traverse_util.flatten_dict(flax.core.unfreeze(variables["batch_stats"]))
  for path, acc in accs.items():
    mean_key, var_key = path + ("mean",), path + ("var",)
    if mean_key not in stats or var_key not in stats:
      raise ValueError(f"{fn}: layer {'/'.join(map(str, path))} recorded batch moments but "
                       "has no batch_stats mean/var to replace.")
    old_mean, old_var = stats[mean_key], stats[var_key]
    new = population_batch_stats(
        acc, variance=variance, unbiased=unbiased,
        fallback=_fallback(old_mean, old_var, acc.mean.shape))
    stats[mean_key] = new.mean.reshape(jnp.shape(old_mean)).astype(old_mean.dtype)
    stats[var_key] = new.var.reshape(jnp.shape(old_var)).astype(old_var.dtype)
  out = dict(flax.core.unfreeze(variables))
  out["batch_stats"] = traverse_util.unflatten_dict(stats)
  return flax.core.freeze(out) if isinstance(variables, flax.core.FrozenDict) else out


def _fold(acc: PopulationStats, ms: tuple) -> PopulationStats:
  for m in ms:  # a module called several times per apply sows several entries
    acc = update_population_stats(acc, m)
  return acc


def _fallback(mean, var, shape) -> BatchStats:
  return BatchStats(mean=jnp.reshape(mean, shape), var=jnp.reshape(var, shape))
