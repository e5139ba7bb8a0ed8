"""Layer norm and RMS norm over trailing contiguous axes through the fused CPU kernels.

:func:`standardize_rows` is what :func:`jaxnorm._vjp.standardize` calls when
:func:`covers` says a call fits the kernels: the statistics axes are the trailing
axes of ``x`` (viewed as rows of length ``C``), no ``axis_name``, no fallback
statistics, a mask (if any) constant along each row, float32/bfloat16/float16.

Per row the forward kernel computes ``m = sum(x) / n`` then, with the row in L1,
``d = sum(x - m) / n`` and ``v = sum((x - m)^2) / n - d^2`` (two passes: accurate
also for ``|mean| >> std``), ``rstd = rsqrt(v + eps)`` and
``y = ((x - m) - d) * (rstd * scale) + bias``.  The statistics come back in
jaxnorm's shifted form (shift ``m``, offset ``d``).  The backward kernel gives
``dx = rstd * ((gs - a1 / n) - (rstd^2 a2 / n) * xc) + (ct_d + 2 ct_v xc) / n`` with
``xc = (x - m) - d``, ``gs = g * scale``, ``a1 = sum(gs)``, ``a2 = sum(gs * xc)``
(the formula of :mod:`jaxnorm._vjp`), plus partial sums of ``g * xc * rstd`` and
``g`` over fixed blocks of rows, which XLA adds up into ``dscale``/``dbias``.  It
recomputes each row's statistics from ``x`` with the forward kernel's code (bit for
bit the same; the row is in cache), so the only residuals are the inputs.  Under
differentiation the forward is traced as XLA operations (XLA:CPU fuses them into the
matmul that usually follows; see ``_fwd``) and the forward kernel serves the forward
that is not differentiated; when only gradients are used (``y`` and the statistics
are dead) XLA removes the forward: forward+backward is then one read of ``x`` and
``g`` and one write of ``dx``.

Transforms.  The kernels are two primitives with their own batching rule (``vmap``
adds a leading axis to every operand and stays one kernel call; parameters that are
not batched keep a size-1 axis), and a lowering that picks the kernel only when the
computation is not partitioned: under ``jit`` with operands sharded over several
devices (no ``axis_name``), and on other platforms, the same math is lowered as
plain JAX operations, which XLA partitions without gathering ``x``.  Each
primitive has a ``custom_jvp`` given by that JAX implementation, so the fast path
stays differentiable to any order in reverse mode: first-order gradients run the
kernels, higher orders differentiate the JAX implementation of the backward.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.interpreters import batching

from .._stats import Centered
from .._types import Array
from ._prim import make_primitive, with_impl_jvp

CENTER, SCALE, BIAS, MASK = 1, 2, 4, 8
BLOCK_ROWS = 64  # rows per block of the parameter-gradient partial sums
XLA_FORWARD_MIN = 1 << 16  # elements from which a differentiated forward is XLA's (_fwd)
_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# --------------------------------------------------------------------------- coverage


def covers(x: Array, axes: tuple[int, ...], scale, bias, where, *, axis_name, fallback,
           out_dtype) -> bool:
  """Whether a :func:`jaxnorm._vjp.standardize` call fits the row kernels (trace time)."""
  nd = x.ndim
  if (axis_name is not None or fallback is not None or nd == 0
      or tuple(axes) != tuple(range(nd - len(axes), nd))
      or jnp.dtype(x.dtype) not in _KERNEL_DTYPES
      or jnp.dtype(out_dtype) not in _KERNEL_DTYPES):
    return False
  if any(x.shape[a] == 0 for a in axes):
    return False
  if where is not None and any(where.shape[a] != 1 for a in axes):
    return False  # masks per row only
  for p in (scale, bias):
    if p is not None and (p.ndim != nd or jnp.iscomplexobj(p)):
      return False
  if _explicitly_sharded(x):
    return False
  lead = x.shape[:nd - len(axes)]
  p = _prefix(lead, scale, bias)
  rows = math.prod(lead)
  groups = math.prod(lead[:p])
  # parameters varying along late leading axes: per-group partial sums would be
  # nearly full-size; the XLA path reduces them better
  return not (p and groups and rows // groups < 8)


def _explicitly_sharded(x) -> bool:
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
  return (mesh is not None and not mesh.empty and spec is not None
          and any(s is not None for s in spec))


def _prefix(lead, scale, bias) -> int:
  """Number of leading axes the parameters vary along (the partial-sum groups)."""
  p = 0
  for par in (scale, bias):
    if par is not None:
      for i in range(len(lead)):
        if par.shape[i] != 1:
          p = max(p, i + 1)
  return p


# ------------------------------------------------------------------------ primitives


def _row_shape(x_shape):
  return tuple(x_shape[:-1]) + (1,)


def _fwd_abstract(x, scale, bias, mask, eps, *, flags, out_dtype):
  row = jax.core.ShapedArray(_row_shape(x.shape), jnp.float32)
  return (jax.core.ShapedArray(x.shape, out_dtype), row, row, row)


def _partial_shape(x_shape, p, nb, present):
  return tuple(x_shape[:p]) + (nb, x_shape[-1] if present else 0)


def _bwd_abstract(x, g, scale, mask, eps, ctd, ctv, *, flags, p, nb):
  row = jax.core.ShapedArray(_row_shape(x.shape), jnp.float32)
  ps = jax.core.ShapedArray(_partial_shape(x.shape, p, nb, flags & SCALE), jnp.float32)
  pb = jax.core.ShapedArray(_partial_shape(x.shape, p, nb, flags & BIAS), jnp.float32)
  return (jax.core.ShapedArray(x.shape, x.dtype), row, ps, pb)


def _stats_impl(xf, mask, eps, flags):
  """Per-row ``m, d, v, rstd`` as JAX operations (zero on masked-out rows)."""
  n = xf.shape[-1]
  if flags & CENTER:
    m = jnp.sum(xf, axis=-1, keepdims=True) / n
    xc = xf - m
    d = jnp.sum(xc, axis=-1, keepdims=True) / n
    v = jnp.maximum(jnp.sum(xc * xc, axis=-1, keepdims=True) / n - d * d, 0)
  else:
    m = d = jnp.zeros(_row_shape(xf.shape), jnp.float32)
    v = jnp.sum(xf * xf, axis=-1, keepdims=True) / n
  rstd = lax.rsqrt(v + eps)
  if flags & MASK:
    m, d, v, rstd = (jnp.where(mask, a, 0) for a in (m, d, v, rstd))
  return m, d, v, rstd


def _fwd_impl(x, scale, bias, mask, eps, *, flags, out_dtype):
  """The forward kernel's math as JAX operations (partitioned/other platforms, JVP)."""
  xf = x.astype(jnp.float32)
  m, d, v, rstd = _stats_impl(xf, mask, eps, flags)
  a = rstd * scale if flags & SCALE else rstd
  y = ((xf - m) - d) * a
  if flags & BIAS:
    y = y + bias
  return (y.astype(out_dtype), m, d, v)


def _bwd_impl(x, g, scale, mask, eps, ctd, ctv, *, flags, p, nb):
  """The backward kernel's math as JAX operations (the statistics recomputed from
  ``x``); partial sums all in block 0."""
  xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
  n = x.shape[-1]
  k, d, _, rstd = _stats_impl(xf, mask, eps, flags)
  xc = (xf - k) - d if flags & CENTER else xf
  gs = gf * scale if flags & SCALE else gf
  a1 = jnp.sum(gs, axis=-1, keepdims=True)
  a2 = jnp.sum(gs * xc, axis=-1, keepdims=True)
  mg = a1 / n if flags & CENTER else 0
  e0 = ctd / n if flags & CENTER else 0
  dx = rstd * ((gs - mg) - (rstd * rstd * a2 / n) * xc) + (e0 + (2 * ctv / n) * xc)
  if flags & MASK:
    dx = jnp.where(mask, dx, 0)
    a2 = jnp.where(mask, a2, 0)

  def partial(v, present):
    shape = _partial_shape(x.shape, p, nb, present)
    if not present or nb == 0:
      return jnp.zeros(shape, jnp.float32)
    lead = x.shape[:-1]
    total = jnp.sum(v.reshape(lead[:p] + (-1, x.shape[-1])), axis=-2, keepdims=True)
    return jnp.concatenate([total, jnp.zeros(shape[:p] + (nb - 1, shape[-1]), jnp.float32)],
                           axis=-2)

  ps = partial(gf * (xc * rstd), flags & SCALE)
  pb = partial(gf, flags & BIAS)
  return (dx.astype(x.dtype), -0.5 * (rstd * rstd * rstd) * a2, ps, pb)


def _batch_rule(prim, n_full):
  """``vmap``: the batched axis goes first on every operand; full-size operands that
  are not batched are broadcast, the others get a size-1 axis (the kernels broadcast
  it).  The parameter-group prefix ``p`` grows by one."""

  def batch(args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    out = []
    for i, (a, d) in enumerate(zip(args, dims)):
      if d is None:
        a = (jnp.broadcast_to(a, (size,) + a.shape) if i < n_full
             else jnp.expand_dims(a, 0))
      else:
        a = jnp.moveaxis(a, d, 0)
      out.append(a)
    if "p" in params:
      params = dict(params, p=params["p"] + 1)
    outs = prim.bind(*out, **params)
    return outs, (0,) * len(outs)

  return batch


_fwd_p = make_primitive("jaxnorm_rows_fwd", _fwd_abstract, _fwd_impl)
_bwd_p = make_primitive("jaxnorm_rows_bwd", _bwd_abstract, _bwd_impl)
batching.primitive_batchers[_fwd_p] = _batch_rule(_fwd_p, 1)
batching.primitive_batchers[_bwd_p] = _batch_rule(_bwd_p, 2)
_fwd_call = with_impl_jvp(_fwd_p, _fwd_impl, nondiff=(3,))      # mask
_bwd_call = with_impl_jvp(_bwd_p, _bwd_impl, nondiff=(3,))      # mask


# ------------------------------------------------------------------------- custom VJP


@dataclasses.dataclass(frozen=True)
class _Cfg:
  flags: int
  out_dtype: Any
  p: int
  nb: int
  x_shape: tuple[int, ...]
  scale_shape: tuple[int, ...] | None
  bias_shape: tuple[int, ...] | None
  scale_dtype: Any
  bias_dtype: Any


def _params_f32(cfg, scale, bias):
  c = cfg.x_shape[-1]
  nd = len(cfg.x_shape)
  one = jnp.zeros((1,) * nd, jnp.float32)
  s = one if scale is None else jnp.broadcast_to(scale.astype(jnp.float32),
                                                 scale.shape[:-1] + (c,))
  b = one if bias is None else jnp.broadcast_to(bias.astype(jnp.float32), bias.shape[:-1] + (c,))
  return s, b


def _primal(cfg, x, scale, bias, mask, eps):
  """Not differentiated (inference, evaluation): the forward kernel."""
  s, b = _params_f32(cfg, scale, bias)
  return _fwd_call((("flags", cfg.flags), ("out_dtype", cfg.out_dtype)), x, s, b, mask, eps)


def _fwd(cfg, x, scale, bias, mask, eps):
  """Differentiated (a training step): from XLA_FORWARD_MIN elements on, the forward as
  XLA operations and only the backward on the kernel.  In a model the normalized rows
  feed a matmul, and XLA:CPU fuses the XLA-path layer norm into that dot; a custom call
  cannot join the fusion.  Measured (fwd+bwd, paired in-process rounds, time of this
  vs the forward kernel): a pre-LN transformer block (8, 128, 256) 0.99 (f32) / 0.98
  (bf16); an MLP of LN -> ReLU -> matmul layers 0.95 at (256, 256), 0.97-1.03 from
  (1024, 256) to (1024, 1024), but 1.22 at (8, 64) and 1.05 at (64..256, 64), where
  the XLA forward's several small loops cost more than one kernel call: those keep it.
  Only the inputs are kept: the backward kernel recomputes the row statistics, so when
  only gradients are wanted XLA drops the forward altogether.
  """
  s, b = _params_f32(cfg, scale, bias)
  if math.prod(cfg.x_shape) >= XLA_FORWARD_MIN:
    out = _fwd_impl(x, s, b, mask, eps, flags=cfg.flags, out_dtype=cfg.out_dtype)
  else:
    out = _fwd_call((("flags", cfg.flags), ("out_dtype", cfg.out_dtype)), x, s, b, mask, eps)
  return out, (x, s, mask, eps)


def _bwd(cfg, res, cts):
  x, s, mask, eps = res
  g, _, ct_d, ct_v = cts  # the shift is a constant (stop_gradient)
  params = (("flags", cfg.flags), ("p", cfg.p), ("nb", cfg.nb))
  dx, deps, ps, pb = _bwd_call(params, x, g, s, mask, eps, ct_d.astype(jnp.float32),
                               ct_v.astype(jnp.float32))
  nd = len(cfg.x_shape)

  def param_grad(partial, shape, dtype):
    if shape is None:
      return None
    total = jnp.sum(partial, axis=-2)  # (lead[:p]..., C), in block order
    total = total.reshape(total.shape[:-1] + (1,) * (nd - 1 - cfg.p) + total.shape[-1:])
    axes = tuple(i for i in range(nd) if shape[i] == 1 and total.shape[i] != 1)
    total = jnp.sum(total, axis=axes, keepdims=True) if axes else total
    return total.astype(dtype)

  dscale = param_grad(ps, cfg.scale_shape, cfg.scale_dtype)
  dbias = param_grad(pb, cfg.bias_shape, cfg.bias_dtype)
  d_eps = jnp.sum(deps).reshape((1,) * nd)
  return dx, dscale, dbias, None, d_eps


_rows_vjp = jax.custom_vjp(_primal, nondiff_argnums=(0,))
_rows_vjp.defvjp(_fwd, _bwd)


def standardize_rows(x: Array, n_axes: int, scale: Array | None, bias: Array | None,
                     where: Array | None, eps: Array, *, center: bool, out_dtype
                     ) -> tuple[Array, Centered]:
  """``y`` and the statistics over the last ``n_axes`` axes, through the kernels.

  ``scale``, ``bias`` and ``where`` have ``x``'s rank (``where`` constant along the
  reduced axes); ``eps`` is a float32 scalar.  Call only where :func:`covers`.
  """
  shape = x.shape
  lead = shape[:x.ndim - n_axes]
  c = math.prod(shape[x.ndim - n_axes:])
  x2 = x.reshape(lead + (c,))

  def rows(p):  # parameters: full trailing axes merged into one
    if p is None:
      return None
    p = jnp.broadcast_to(p, p.shape[:x.ndim - n_axes] + shape[x.ndim - n_axes:])
    return p.reshape(p.shape[:x.ndim - n_axes] + (c,))

  scale2, bias2 = rows(scale), rows(bias)
  mask2 = (jnp.ones((1,) * x2.ndim, bool) if where is None
           else where.reshape(where.shape[:x.ndim - n_axes] + (1,)))
  flags = ((CENTER if center else 0) | (SCALE if scale is not None else 0)
           | (BIAS if bias is not None else 0) | (MASK if where is not None else 0))
  p = _prefix(lead, scale2, bias2)
  groups = math.prod(lead[:p])
  rows_per_group = math.prod(lead) // groups if groups else 0
  nb = -(-rows_per_group // BLOCK_ROWS) if flags & (SCALE | BIAS) else 0
  cfg = _Cfg(flags=flags, out_dtype=jnp.dtype(out_dtype), p=p, nb=nb, x_shape=x2.shape,
             scale_shape=None if scale2 is None else scale2.shape,
             bias_shape=None if bias2 is None else bias2.shape,
             scale_dtype=None if scale is None else scale.dtype,
             bias_dtype=None if bias is None else bias.dtype)
  eps2 = jnp.asarray(eps, jnp.float32).reshape((1,) * x2.ndim)
  y, k, d, v = _rows_vjp(cfg, x2, scale2, bias2, mask2, eps2)
  if where is None:
    count = jnp.full(k.shape, c, jnp.float32)
  else:
    count = jnp.where(jnp.broadcast_to(mask2, k.shape), jnp.float32(c), jnp.float32(0))
  keep = lead + (1,) * n_axes
  stats = Centered(shift=lax.stop_gradient(k).reshape(keep), offset=d.reshape(keep),
                   var=v.reshape(keep), count=count.reshape(keep))
  return y.reshape(shape), stats
