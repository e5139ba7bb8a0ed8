"""Folding an evaluation-mode batch norm into a neighbouring Dense or Conv layer.

In evaluation a batch norm is a per-channel affine map,

    BN(z) = (z - mu) * a + beta,    a = gamma / sqrt(sigma^2 + epsilon),

so it can be absorbed into the linear layer before it (``y = BN(x W + b)``)::

    W' = W * a      (per output channel)
    b' = (b - mu) * a + beta

or, where that is exact, into the layer after it (``y = BN(x) W + b``)::

    W' = diag(a) W  (per input channel)
    b' = b + (beta - mu * a) W  (summed over input channels and kernel positions)

The second form is exact for Dense layers and for convolutions that never see a
zero-padded border (``padding="VALID"``, or ``"CIRCULAR"``/``"REFLECT"``, which
pad with input values): a zero pad is 0 *after* the batch norm in the original
model but would be 0 *before* it in the folded one.  Such cases raise.

Kernels are in Flax's layout, outputs last: Dense ``(in, out)``, Conv
``(*window, in // feature_group_count, out)`` (HWIO for 2-D), ConvTranspose
``(*window, in, out)`` (``(*window, out, in)`` with ``transpose_kernel=True``:
pass ``out_axis=-2``).  The folded weights are computed in at least float32 and
returned in the dtypes of the kernel and bias.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import _axes
from ._stats import stat_dtype
from ._types import Array, BatchStats

_ZERO_PAD_OK = ("VALID", "CIRCULAR", "REFLECT")


def _bn_affine(stats: Any, scale: Array | None, bias: Array | None, epsilon: Any,
               channels: int, *, fn: str, dtype) -> tuple[Array, Array]:
  """``(a, c)`` with ``BN(z) = a * z + c``, per channel, in ``dtype``."""
  _axes.check_nonnegative(epsilon, fn=fn, name="epsilon")
  named = dict(mean=stats.mean, var=stats.var, scale=scale, bias=bias)
  for name, v in named.items():
    if v is None:
      continue
    v = _axes.check_floating(v, fn=fn, name=name)
    if v.shape != (channels,):
      raise ValueError(
          f"{fn}: the batch norm's {name} has shape {v.shape}, but the layer has {channels} "
          f"channels on the folded side, so it must be ({channels},). Check that this batch "
          "norm really follows (or precedes) this layer, and the kernel layout (Flax: outputs "
          "last; convert PyTorch kernels with jaxnorm.conv_kernel_from_torch).")
    named[name] = v.astype(dtype)
  a = lax.rsqrt(named["var"] + jnp.asarray(epsilon, dtype))
  if named["scale"] is not None:
    a = a * named["scale"]
  c = -named["mean"] * a
  if named["bias"] is not None:
    c = c + named["bias"]
  return a, c


def _as_stats(stats: Any, *, fn: str) -> BatchStats:
  """``BatchStats`` from running averages (``BatchStats``, ``CountedBatchStats``, a pair)."""
  if isinstance(stats, tuple) and hasattr(stats, "mean") and hasattr(stats, "var"):
    return BatchStats(mean=stats.mean, var=stats.var)
  if isinstance(stats, tuple) and len(stats) == 2:
    return BatchStats(*stats)
  raise TypeError(f"{fn}: stats must be a jaxnorm.BatchStats(mean, var) (the batch norm's "
                  f"running averages), got {type(stats).__name__}.")


def _compute_dtype(*arrays) -> Any:
  return stat_dtype(jnp.result_type(*(a for a in arrays if a is not None)))


def fold_batch_norm(kernel: Array, bias: Array | None, stats: BatchStats,
                    scale: Array | None = None, bn_bias: Array | None = None, *,
                    epsilon: float = 1e-5, out_axis: int = -1) -> tuple[Array, Array]:
  """Folds a batch norm that FOLLOWS a Dense/Conv/ConvTranspose layer into its weights.

  ``BN(x W + b)`` in evaluation equals ``x W' + b'`` with ``a = scale * rsqrt(var + eps)``::

    W' = W * a            (along the kernel's output axis)
    b' = (b - mean) * a + bn_bias

  This holds for any convolution (any spatial rank, strides, dilation, padding,
  ``feature_group_count``, transposed), since ``a`` scales whole output channels.

  Args:
    kernel: the layer's kernel, Flax layout (outputs at ``out_axis``, default last).
    bias: the layer's bias ``(out,)``, or ``None`` for a layer without one (the
      folded layer needs one: create it with ``use_bias=True``).
    stats: the batch norm's running averages ``BatchStats(mean, var)``, ``(out,)``.
    scale, bn_bias: the batch norm's ``scale`` and ``bias`` (``None`` if absent).
    epsilon: the batch norm's epsilon (jaxnorm/flax default 1e-5, PyTorch 1e-5,
      Keras 1e-3).
    out_axis: the kernel's output-channel axis: -1 for Dense, Conv and
      ConvTranspose, -2 for ``ConvTranspose(transpose_kernel=True)``.

  Returns:
    ``(kernel', bias')`` in the dtypes of ``kernel`` and ``bias`` (``kernel``'s
    if ``bias`` is None), computed in at least float32.

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> w, b = jnp.array([[1., 2.], [3., 4.]]), jnp.array([0.5, -1.])
  >>> stats = jn.BatchStats(mean=jnp.array([1., 0.]), var=jnp.array([4., 1.]))
  >>> jn.fold_batch_norm(w, b, stats, epsilon=0.)
  (Array([[0.5, 2. ],
         [1.5, 4. ]], dtype=float32), Array([-0.25, -1.  ], dtype=float32))
  """
  fn = "jaxnorm.fold_batch_norm"
  stats = _as_stats(stats, fn=fn)
  kernel = _axes.check_floating(kernel, fn=fn, name="kernel")
  if kernel.ndim < 2:
    raise ValueError(f"{fn}: kernel must have rank >= 2 (Dense (in, out), Conv "
                     f"(*window, in, out)), got shape {kernel.shape}.")
  (oax,) = _axes.canonical_axes(out_axis, kernel.ndim, what="out_axis", fn=fn)
  channels = kernel.shape[oax]
  if bias is not None:
    bias = _axes.check_floating(bias, fn=fn, name="bias")
    if bias.shape != (channels,):
      raise ValueError(f"{fn}: the layer's bias has shape {bias.shape}, but its kernel "
                       f"{kernel.shape} has {channels} outputs on axis {out_axis}.")
  dtype = _compute_dtype(kernel, bias, *stats, scale, bn_bias)
  a, c = _bn_affine(stats, scale, bn_bias, epsilon, channels, fn=fn, dtype=dtype)
  bshape = tuple(channels if i == oax else 1 for i in range(kernel.ndim))
  new_kernel = (kernel.astype(dtype) * a.reshape(bshape)).astype(kernel.dtype)
  new_bias = c if bias is None else bias.astype(dtype) * a + c
  return new_kernel, new_bias.astype(kernel.dtype if bias is None else bias.dtype)


def _check_padding(padding: Any, window: tuple[int, ...], input_dilation: Any, *,
                   fn: str) -> None:
  """Raises unless a convolution never reads a zero-padded (or zero-inserted) input."""
  if not (input_dilation is None or input_dilation == 1 or (
      not isinstance(input_dilation, (str, numbers.Integral))
      and all(d == 1 for d in input_dilation))):
    raise ValueError(
        f"{fn}: input_dilation={input_dilation!r} inserts zeros between input elements, "
        "which the batch norm would have mapped to its bias, so a batch norm BEFORE this "
        "layer cannot be folded into it. Fold it into the layer before the batch norm "
        "(jaxnorm.fold_batch_norm) instead.")
  if isinstance(padding, str):
    p = padding.upper()
    if p in _ZERO_PAD_OK or (p in ("SAME", "SAME_LOWER", "CAUSAL")
                             and all(k == 1 for k in window)):
      return
    zero_pad = True
  elif isinstance(padding, numbers.Integral):
    zero_pad = padding != 0
  else:
    try:
      flat = [q for p in padding for q in ((p,) if isinstance(p, numbers.Integral) else p)]
    except TypeError:
      raise TypeError(f"{fn}: padding must be a string, an int or a sequence of (low, high) "
                      f"pairs, got {padding!r}.") from None
    zero_pad = any(q != 0 for q in flat)
  if zero_pad:
    raise ValueError(
        f"{fn}: a convolution with padding={padding!r} (window {window}) reads zero padding. "
        "In the original model the padded zeros come after the batch norm; folded, they "
        "would be normalized values, so the border outputs would change. This fold is exact "
        "only for padding='VALID', 'CIRCULAR' or 'REFLECT', explicit zero-width padding, or a "
        "1x1 window. Fold the batch norm into the layer before it (jaxnorm.fold_batch_norm), "
        "or keep it.")


def fold_batch_norm_into_next(kernel: Array, bias: Array | None, stats: BatchStats,
                              scale: Array | None = None, bn_bias: Array | None = None, *,
                              epsilon: float = 1e-5, feature_group_count: int = 1,
                              padding: Any = "VALID",
                              input_dilation: Any = 1) -> tuple[Array, Array]:
  """Folds a batch norm that PRECEDES a Dense/Conv layer into that layer's weights.

  With ``BN(x) = a * x + c`` (``a = scale * rsqrt(var + eps)``,
  ``c = bn_bias - mean * a``), ``BN(x) W + b = x W' + b'``::

    W'[..., i, o] = a[i] * W[..., i, o]
    b'[o]         = b[o] + sum over the window and i of c[i] * W[..., i, o]

  Exact for Dense kernels ``(in, out)`` and for convolutions ``(*window, in //
  groups, out)`` whose input is never zero-padded (see ``padding``); with
  ``feature_group_count = g`` the input channel of kernel row ``j`` in the group
  of output ``o`` is ``(o // (out // g)) * (in // g) + j``.  Transposed
  convolutions insert zeros (strides), so they are not accepted here.

  Args:
    kernel: Dense ``(in, out)`` or Conv ``(*window, in // feature_group_count, out)``.
    bias: the layer's bias ``(out,)`` or ``None`` (the folded layer needs one).
    stats, scale, bn_bias, epsilon: the batch norm's, over the ``in`` channels.
    feature_group_count: the convolution's (grouped / depthwise); 1 for Dense.
    padding: the convolution's padding (ignored for a rank-2 Dense kernel).
      Accepted: ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``, zero-width explicit
      padding, or any padding with a window of ones; anything that pads with
      zeros raises ``ValueError``.
    input_dilation: the convolution's; anything but 1 raises ``ValueError``.

  Returns:
    ``(kernel', bias')`` in the dtypes of ``kernel`` and ``bias``.
  """
  fn = "jaxnorm.fold_batch_norm_into_next"
  stats = _as_stats(stats, fn=fn)
  kernel = _axes.check_floating(kernel, fn=fn, name="kernel")
  if kernel.ndim < 2:
    raise ValueError(f"{fn}: kernel must have rank >= 2 (Dense (in, out), Conv "
                     f"(*window, in, out)), got shape {kernel.shape}.")
  g = feature_group_count
  if not isinstance(g, numbers.Integral) or isinstance(g, bool) or g < 1:
    raise ValueError(f"{fn}: feature_group_count must be a positive int, got {g!r}.")
  if kernel.ndim == 2 and g != 1:
    raise ValueError(f"{fn}: a rank-2 (Dense) kernel has no feature groups, got "
                     f"feature_group_count={g}.")
  window, in_g, out = kernel.shape[:-2], kernel.shape[-2], kernel.shape[-1]
  if out % g:
    raise ValueError(f"{fn}: feature_group_count={g} must divide the kernel's {out} outputs.")
  if kernel.ndim > 2:
    _check_padding(padding, window, input_dilation, fn=fn)
  channels = in_g * g
  if bias is not None:
    bias = _axes.check_floating(bias, fn=fn, name="bias")
    if bias.shape != (out,):
      raise ValueError(f"{fn}: the layer's bias has shape {bias.shape}, but its kernel "
                       f"{kernel.shape} has {out} outputs (last axis).")
  dtype = _compute_dtype(kernel, bias, *stats, scale, bn_bias)
  a, c = _bn_affine(stats, scale, bn_bias, epsilon, channels, fn=fn, dtype=dtype)
  # (*window, in_g, g, out_g) with the batch norm's channel g * in_g + j at [.., j, g, :]
  w = kernel.astype(dtype).reshape(window + (in_g, g, out // g))
  rank = (1,) * len(window)  # the per-channel factors with the kernel's rank
  a_r, c_r = (v.reshape(g, in_g).T.reshape(rank + (in_g, g, 1)) for v in (a, c))
  new_kernel = (w * a_r).reshape(kernel.shape).astype(kernel.dtype)
  shift = jnp.sum(w * c_r, axis=tuple(range(len(window) + 1))).reshape(out)
  new_bias = shift if bias is None else bias.astype(dtype) + shift
  return new_kernel, new_bias.astype(kernel.dtype if bias is None else bias.dtype)
