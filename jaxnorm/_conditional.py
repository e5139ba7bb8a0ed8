"""Conditional normalization: per-sample scale and shift computed from a condition.

The math behind FiLM, AdaLN, AdaLN-Zero (DiT) and conditional batch norm, as pure
functions.  The Flax modules (``jaxnorm.linen``/``jaxnorm.nnx``: ``FiLM``,
``AdaLN``, ``AdaLNZero``, ``ConditionalBatchNorm``) only create the projections and
tables and call these.

Conventions (DiT's, Peebles & Xie 2023, ``facebookresearch/DiT``)::

    modulate(x, shift, scale) = x * (1 + scale) + shift
    adaptive_norm(x, shift, scale) = modulate(norm(x), shift, scale)   (norm: no affine)
    gated_residual(x, h, gate) = x + gate * h

``shift``, ``scale`` and ``gate`` are *per sample*: shape ``(N, *feature_shape)``
with ``N = x.shape[0]`` (the batch axis is 0), laid out against ``x`` by
:func:`per_sample` (so an (N, D) modulation of an (N, T, D) input acts on every
token, as DiT's ``unsqueeze(1)``).  The ``1 + scale`` form makes a zero modulation
the identity: FiLM's "predict Δγ, γ = 1 + Δγ" (Perez et al. 2018), and, with a
zero gate, AdaLN-Zero's identity block at initialisation.

The normalization inside :func:`adaptive_norm` is fused with the modulation: the
per-sample ``1 + scale`` and ``shift`` enter jaxnorm's normalizers as their (per
sample) ``scale`` and ``bias``, so it is one pass over ``x`` with the analytic
backward of :func:`jaxnorm._vjp.standardize`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from . import _axes
from ._norms import batch_norm, group_norm, instance_norm, layer_norm, rms_norm
from ._stats import stat_dtype
from ._types import Array, Axes, AxisName, BatchStats, DType

NormKind = Literal["layer", "rms", "instance", "group"]
NORMS = ("layer", "rms", "instance", "group", None)


# ----------------------------------------------------------------------------- validation


def per_sample(p: Any, *, name: str, x_shape, feature_axes: tuple[int, ...],
               fn: str) -> Array | None:
  """Lays out a per-sample modulation against ``x``.

  Accepted: ``None``; ``(N, *feature_shape)`` (one row per sample, ``N =
  x_shape[0]``); the feature shape (the same for every sample); or an array of
  ``x``'s rank that broadcasts to it.
  """
  if p is None:
    return None
  p = _axes.check_floating(p, fn=fn, name=name)
  fshape = _axes.feature_shape(x_shape, feature_axes)
  nd = len(x_shape)
  if 0 not in feature_axes and nd and p.shape == (x_shape[0],) + fshape:
    layout = tuple(d if (i == 0 or i in feature_axes) else 1 for i, d in enumerate(x_shape))
    return p.reshape(layout)
  if p.shape == fshape:
    return p.reshape(_axes.broadcast_shape(x_shape, feature_axes))
  if p.ndim == nd and all(s in (1, t) for s, t in zip(p.shape, x_shape)):
    return p
  per = (x_shape[0],) + fshape if nd and 0 not in feature_axes else fshape
  raise ValueError(
      f"{fn}: {name} has shape {p.shape}, but the input {tuple(x_shape)} with feature axes "
      f"{feature_axes} needs one row per sample {per} (batch axis 0), the feature shape "
      f"{fshape}, or an array of rank {nd} that broadcasts to the input. Reshape {name}.")


def check_condition(cond: Any, *, batch: int, fn: str, features: int | None = None) -> Array:
  """A conditioning vector per sample: floating, shape ``(batch, features)``."""
  cond = _axes.check_floating(cond, fn=fn, name="cond")
  want = f"({batch}, {'cond_features' if features is None else features})"
  if cond.ndim != 2:
    raise ValueError(
        f"{fn}: the conditioning vector `cond` must have shape {want} (batch, features), "
        f"got rank {cond.ndim} shape {cond.shape}. Embed or flatten it per sample first "
        "(e.g. cond.reshape(batch, -1); an unbatched vector: cond[None]).")
  if cond.shape[0] != batch:
    raise ValueError(
        f"{fn}: `cond` has {cond.shape[0]} rows but the input has batch size {batch} "
        f"(axis 0); give one conditioning vector per sample, shape {want}.")
  if features is not None and cond.shape[1] != features:
    raise ValueError(
        f"{fn}: `cond` has {cond.shape[1]} features but the module was built with "
        f"cond_features={features}; expected shape {want}.")
  return cond


def split_modulation(p: Array, num_chunks: int, feature_shape, *, fn: str) -> tuple[Array, ...]:
  """Splits a projection output ``(N, num_chunks * F)`` into ``num_chunks`` arrays of
  ``(N, *feature_shape)`` (DiT's ``.chunk(k, dim=1)``), ``F = prod(feature_shape)``."""
  f = math.prod(feature_shape)
  if p.ndim != 2 or p.shape[1] != num_chunks * f:
    raise ValueError(f"{fn}: the modulation projection has shape {p.shape}, expected "
                     f"(batch, {num_chunks} * {f}) for {num_chunks} chunks of the feature "
                     f"shape {tuple(feature_shape)}. Check num_features against the input.")
  return tuple(c.reshape((p.shape[0],) + tuple(feature_shape))
               for c in jnp.split(p, num_chunks, axis=1))


def _check_norm(norm: Any, *, fn: str) -> Any:
  if norm not in NORMS:
    raise ValueError(f"{fn}: norm must be one of {list(NORMS)}, got {norm!r}.")
  return norm


def check_labels(labels: Any, num_classes: int, batch: int, *, fn: str) -> Array:
  """Integer class labels of shape ``(batch,)``; range-checked when concrete."""
  labels = jnp.asarray(labels) if not isinstance(labels, jax.Array) else labels
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{fn}: labels must be an integer array of class indices, got dtype "
                    f"{labels.dtype}. Use e.g. labels.astype(jnp.int32) (one-hot labels: "
                    "jnp.argmax(onehot, axis=-1)).")
  if labels.shape != (batch,):
    raise ValueError(f"{fn}: labels must have shape ({batch},), one class per sample of "
                     f"the input's batch axis 0, got {labels.shape}.")
  if not isinstance(labels, jax.core.Tracer) and labels.size:
    lo, hi = int(np.min(np.asarray(labels))), int(np.max(np.asarray(labels)))
    if lo < 0 or hi >= num_classes:
      raise ValueError(f"{fn}: labels must be in [0, {num_classes}) (num_classes="
                       f"{num_classes}), got values in [{lo}, {hi}].")
  return labels


# ----------------------------------------------------------------------------- math


def modulate(x: Array, shift: Array | None = None, scale: Array | None = None, *,
             feature_axes: Axes = -1, dtype: DType | None = None) -> Array:
  """DiT's modulation ``x * (1 + scale) + shift``, per sample.

  ``shift``/``scale``: ``(N, *feature_shape)`` with ``N = x.shape[0]``, the
  feature shape, or ``x``'s rank (see :func:`per_sample`).  Computed in at
  least float32; the result has ``dtype`` (default ``x.dtype``).

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> x = jnp.ones((2, 3, 2))                  # (N, T, D)
  >>> jn.modulate(x, shift=jnp.array([[0., 1.], [2., 3.]]),
  ...             scale=jnp.array([[1., 0.], [0., -1.]]))[:, 0]
  Array([[2., 1.],
         [3., 3.]], dtype=float32)
  """
  fn = "jaxnorm.modulate"
  x = _axes.check_floating(x, fn=fn)
  feat = _axes.canonical_axes(feature_axes, x.ndim, what="feature_axes", fn=fn)
  shift = per_sample(shift, name="shift", x_shape=x.shape, feature_axes=feat, fn=fn)
  scale = per_sample(scale, name="scale", x_shape=x.shape, feature_axes=feat, fn=fn)
  cdtype = stat_dtype(x.dtype)
  y = x.astype(cdtype)
  if scale is not None:
    y = y * (1 + scale.astype(cdtype))
  if shift is not None:
    y = y + shift.astype(cdtype)
  return y.astype(dtype or x.dtype)


def gated_residual(x: Array, h: Array, gate: Array, *, feature_axes: Axes = -1,
                   dtype: DType | None = None) -> Array:
  """AdaLN-Zero's residual update ``x + gate * h`` with a per-sample ``gate``.

  DiT: ``x = x + gate_msa.unsqueeze(1) * attn(modulate(norm1(x), shift, scale))``
  is ``gated_residual(x, attn(h), gate)``.  ``h`` has ``x``'s shape; ``gate`` is laid
  out as in :func:`modulate`.  A zero gate (AdaLN-Zero at initialisation) returns
  ``x`` exactly.

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> jn.gated_residual(jnp.ones((2, 2)), jnp.full((2, 2), 5.), jnp.array([[0., 0.], [1., 0.5]]))
  Array([[1. , 1. ],
         [6. , 3.5]], dtype=float32)
  """
  fn = "jaxnorm.gated_residual"
  x = _axes.check_floating(x, fn=fn)
  h = _axes.check_floating(h, fn=fn, name="h")
  if h.shape != x.shape:
    raise ValueError(f"{fn}: the branch output h has shape {h.shape}, but the residual x "
                     f"has {x.shape}; they must match.")
  feat = _axes.canonical_axes(feature_axes, x.ndim, what="feature_axes", fn=fn)
  gate = per_sample(gate, name="gate", x_shape=x.shape, feature_axes=feat, fn=fn)
  if gate is None:
    raise TypeError(f"{fn}: gate is required, got None.")
  cdtype = stat_dtype(jnp.result_type(x.dtype, h.dtype))
  y = x.astype(cdtype) + gate.astype(cdtype) * h.astype(cdtype)
  return y.astype(dtype or x.dtype)


def adaptive_norm(x: Array, shift: Array | None = None, scale: Array | None = None, *,
                  norm: NormKind | None = "layer", reduction_axes: Axes | None = None,
                  feature_axes: Axes = -1, num_groups: int | None = None,
                  group_size: int | None = None, where: Array | None = None,
                  epsilon: float = 1e-6, axis_name: AxisName | None = None,
                  axis_index_groups=None, dtype: DType | None = None) -> Array:
  """A normalization without its own affine, then the per-sample modulation::

    y = norm(x) * (1 + scale) + shift

  ``norm="layer"`` is AdaLN (DiT: ``modulate(norm1(x), shift, scale)`` with
  ``LayerNorm(elementwise_affine=False, eps=1e-6)``); ``"instance"`` is AdaIN;
  ``"rms"`` and ``"group"`` (``num_groups``/``group_size``, channel axis
  ``feature_axes``) are the same with those normalizers; ``None`` is FiLM on
  ``x`` itself, :func:`modulate`.  ``1 + scale`` and ``shift`` are passed to the
  normalizer as per-sample scale and bias: one fused pass.

  Args:
    x: floating input, batch axis 0.
    shift, scale: ``(N, *feature_shape)`` per sample, the feature shape, or
      ``x``'s rank; ``None`` = 0.
    reduction_axes: the normalizer's (layer/rms default -1; group: every axis
      but 0; instance: the spatial axes, not configurable).
    where, epsilon, axis_name, axis_index_groups: as in :func:`jaxnorm.layer_norm`.
    dtype: output dtype (default ``x.dtype``).

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> x = jnp.array([[1., 3.], [2., 6.]])
  >>> jn.adaptive_norm(x, shift=jnp.array([[0., 0.], [1., 1.]]),
  ...                  scale=jnp.array([[0., 0.], [1., 1.]]), epsilon=0.)
  Array([[-1.,  1.],
         [-1.,  3.]], dtype=float32)
  """
  fn = "jaxnorm.adaptive_norm"
  x = _axes.check_floating(x, fn=fn)
  _check_norm(norm, fn=fn)
  feat = _axes.canonical_axes(feature_axes, x.ndim, what="feature_axes", fn=fn)
  shift = per_sample(shift, name="shift", x_shape=x.shape, feature_axes=feat, fn=fn)
  scale = per_sample(scale, name="scale", x_shape=x.shape, feature_axes=feat, fn=fn)
  if norm is None:
    return modulate(x, shift, scale, feature_axes=feat, dtype=dtype)
  cdtype = stat_dtype(x.dtype)
  gain = None if scale is None else 1 + scale.astype(cdtype)
  kw = dict(where=where, epsilon=epsilon, axis_name=axis_name,
            axis_index_groups=axis_index_groups)
  if norm == "layer":
    return layer_norm(x, gain, shift, reduction_axes=-1 if reduction_axes is None
                      else reduction_axes, feature_axes=feat, dtype=dtype, **kw)
  if norm == "instance":
    if reduction_axes is not None:
      raise ValueError(f"{fn}: norm='instance' reduces every axis but 0 and feature_axes; "
                       f"reduction_axes must be None, got {reduction_axes!r}.")
    return instance_norm(x, gain, shift, feature_axes=feat, dtype=dtype, **kw)
  if norm == "group":
    if len(feat) != 1:
      raise ValueError(f"{fn}: norm='group' needs a single channel axis in feature_axes, "
                       f"got {feat}.")
    return group_norm(x, gain, shift, num_groups=num_groups, group_size=group_size,
                      reduction_axes=reduction_axes, channel_axis=feat[0], dtype=dtype, **kw)
  # rms: no bias in the normalizer; the shift is added in float32 before rounding
  y = rms_norm(x, gain, reduction_axes=-1 if reduction_axes is None else reduction_axes,
               feature_axes=feat, dtype=cdtype, **kw)
  if shift is not None:
    y = y + shift.astype(cdtype)
  return y.astype(dtype or x.dtype)


def conditional_batch_norm(x: Array, stats: BatchStats, labels: Array,
                           scale_table: Array | None = None, bias_table: Array | None = None,
                           *, training: bool, feature_axes: Axes = -1, momentum: float = 0.99,
                           epsilon: float = 1e-5, where: Array | None = None,
                           axis_name: AxisName | None = None, axis_index_groups=None,
                           degenerate: str = "running", unbiased_var: bool = False,
                           dtype: DType | None = None) -> tuple[Array, BatchStats]:
  """Batch norm whose scale and bias are looked up per sample by class label::

    y[i] = (x[i] - mean_B) * rsqrt(var_B + epsilon) * scale_table[labels[i]]
           + bias_table[labels[i]]

  (de Vries et al. 2017; Dumoulin et al. 2017; the class-conditional BN of
  BigGAN/SNGAN).  Statistics and running averages are exactly
  :func:`jaxnorm.batch_norm`'s (shared by all classes); only the affine
  parameters depend on the class.  With one class it *is* ``batch_norm``.

  Args:
    stats: ``BatchStats`` of the feature shape.
    labels: integer array ``(N,)``, ``N = x.shape[0]`` (the batch axis is 0).
      Concrete labels out of ``[0, num_classes)`` raise ``ValueError``; traced ones
      cannot be checked at trace time and give NaN for that sample (never a
      silently clamped class).
    scale_table, bias_table: optional ``(num_classes, *feature_shape)``.
    Everything else: as in :func:`jaxnorm.batch_norm`.

  Returns:
    ``(y, new_stats)``, as :func:`jaxnorm.batch_norm`.

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> x = jnp.array([[1., 2.], [3., 6.]])
  >>> y, _ = jn.conditional_batch_norm(x, jn.init_batch_stats(2), jnp.array([0, 1]),
  ...                                  jnp.array([[1., 1.], [2., 3.]]), None,
  ...                                  training=True, epsilon=0.)
  >>> y
  Array([[-1., -1.],
         [ 2.,  3.]], dtype=float32)
  """
  fn = "jaxnorm.conditional_batch_norm"
  x = _axes.check_floating(x, fn=fn)
  feat = _axes.canonical_axes(feature_axes, x.ndim, what="feature_axes", fn=fn)
  if 0 in feat:
    raise ValueError(f"{fn}: axis 0 is the batch axis (one label per sample) and cannot be "
                     f"a feature axis (got feature_axes={feature_axes!r}).")
  fshape = _axes.feature_shape(x.shape, feat)
  tables = {}
  num_classes = None
  for name, t in (("scale_table", scale_table), ("bias_table", bias_table)):
    if t is None:
      tables[name] = None
      continue
    t = _axes.check_floating(t, fn=fn, name=name)
    if t.ndim != 1 + len(fshape) or tuple(t.shape[1:]) != fshape:
      raise ValueError(f"{fn}: {name} has shape {t.shape}, expected (num_classes, "
                       f"{', '.join(map(str, fshape))}): one row of the feature shape "
                       f"{fshape} per class.")
    if num_classes is not None and t.shape[0] != num_classes:
      raise ValueError(f"{fn}: scale_table has {num_classes} classes but bias_table has "
                       f"{t.shape[0]}; they must have the same number of rows.")
    num_classes = t.shape[0]
    tables[name] = t
  if num_classes is not None:
    labels = check_labels(labels, num_classes, x.shape[0], fn=fn)

  def lookup(t):
    if t is None:
      return None
    # out-of-range traced labels read NaN rather than a clamped row
    rows = jnp.take(t, labels, axis=0, mode="fill", fill_value=jnp.nan)
    return per_sample(rows, name="table rows", x_shape=x.shape, feature_axes=feat, fn=fn)

  return batch_norm(x, stats, lookup(tables["scale_table"]), lookup(tables["bias_table"]),
                    training=training, feature_axes=feat, momentum=momentum,
                    epsilon=epsilon, where=where, axis_name=axis_name,
                    axis_index_groups=axis_index_groups, degenerate=degenerate,
                    unbiased_var=unbiased_var, dtype=dtype)

