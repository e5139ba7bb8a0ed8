"""The fast path: standardize-then-affine with an analytic backward (``jax.custom_vjp``).

Every normalizer in jaxnorm computes batch statistics with
:func:`jaxnorm._stats.centered_moments` (shift ``k``, offset ``d``, variance ``v``,
count ``n``; the mean is ``k + d``) and then ``y = ((x - k) - d) * rstd * scale +
bias`` with ``rstd = rsqrt(v + eps)``.  :func:`standardize` computes the same
values (equal up to rounding) in a form XLA fuses better, and defines the
gradient analytically instead of differentiating through the sums.  With
``xhat = (x - mean) * rstd``, ``gs = g * scale`` and ``m`` the mask::

    dx     = rstd * gs - (m / n) * rstd * (sum_R gs + xhat * sum_R(gs * xhat))
             + (m / n) * (ct_mean + 2 * ct_var * (x - mean))
    dscale = g * xhat summed over the axes scale is broadcast along
    dbias  = g summed over the axes bias is broadcast along

``sum_R`` runs over the statistics' axes and, with ``axis_name``, across devices:
one ``psum`` of four small arrays (the two sums and the cotangents of the global
mean and variance).  The backward saves only ``x``, the parameters and per-group
statistics, and recomputes ``x - k`` inside each fused pass.  What XLA:CPU does
with it (measured with ``python -m jaxnorm.benchmarks``):

* Forward: statistics, then :func:`affine`, ``((x - k) - d) * (rstd * scale) +
  bias``: XLA:CPU fuses the two into one pass over ``x`` plus the reductions.
* Non-contiguous statistics axes (group norm on NHWC: spatial axes and the
  channels of a group, with the groups in between) reduce several times slower
  than contiguous ones on XLA:CPU; the statistics are taken per channel and
  merged over the group with Chan's formulas (:func:`_moments`).
* Backward: ``g`` and ``g * (x - mean)`` are first reduced over the axes along
  which neither the statistics nor the parameters vary (batch norm: all reduced
  axes; group norm: the spatial axes), so batch and group norm need two full-size
  reductions in the backward instead of four.  Small operands reach each
  full-size pass through their own ``optimization_barrier`` so XLA does not merge
  the passes' common subexpressions into one materialised full-size array.

The backward is written with differentiable ``jnp``/``lax`` ops, so the fast path
is differentiable to any order in reverse mode (``grad`` of ``grad``,
``jax.hessian``).  Forward mode applied directly to it (``jax.jvp``, ``jax.jacfwd``
of the normalizer) is not available: that is a property of ``jax.custom_vjp``.
On the CPU, layer and RMS norm over trailing axes run on fused C++ kernels instead
(:mod:`jaxnorm._cpu`, XLA FFI custom calls behind their own custom VJP; see
:func:`_rows_cover`), and batch, group and instance norm with the features minor take
their statistics and the backward's two sums from one-pass column-sum kernels
(:mod:`jaxnorm._cpu._cols`); :func:`jaxnorm.no_kernels` and ``JAXNORM_KERNELS=0``
switch them off.
``ENABLED = False`` (read at trace time) switches every caller to
:func:`standardize_reference`, plain autodiff of ``centered_moments`` and
:func:`scale_shift` (the benchmarks' ``--reference`` rows).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Hashable

import jax
import jax.numpy as jnp
from jax import lax

from ._stats import Centered, centered_moments, column_kernel_covers, independent, stat_dtype
from ._types import Array, AxisName, DType

ENABLED = True
"""Use the custom-VJP path (read at trace time; ``False`` selects the reference)."""


@contextlib.contextmanager
def plain_autodiff():
  """Within this block, jaxnorm traces its plain-autodiff path instead of the custom VJP.

  The default path defines its gradient with ``jax.custom_vjp``: reverse mode to any
  order (``grad``, ``grad`` of ``grad``, ``jax.hessian``), but not forward mode
  applied to the normalizer itself (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``).
  This block gives the same values (up to rounding) through ordinary JAX autodiff,
  which supports every transformation, at the reference path's speed.  It applies
  to functions *traced* inside the block.  JAX's tracing cache does not know about
  the switch: a function already traced (``jax.jit(f)`` called before, even through
  a new ``jax.jit`` wrapper of the same ``f``) keeps its path; trace a new function
  object (e.g. a new ``lambda``) inside the block.

  >>> import jax, jax.numpy as jnp, jaxnorm as jn
  >>> with jn.plain_autodiff():
  ...   _, t = jax.jvp(jn.layer_norm, (jnp.array([1., 2., 4.]),), (jnp.ones(3),))
  >>> t
  Array([0., 0., 0.], dtype=float32)
  """
  global ENABLED
  saved, ENABLED = ENABLED, False
  try:
    yield
  finally:
    ENABLED = saved


def usable_stats(batch: Centered) -> Array:
  """Where batch statistics can normalize: at least 2 elements and finite values."""
  return ((batch.count >= 2) & jnp.isfinite(batch.shift + batch.offset)
          & jnp.isfinite(batch.var))


def standardize(x: Array, axes: tuple[int, ...], scale: Array | None = None,
                bias: Array | None = None, *, where: Array | None = None,
                epsilon: Any = 1e-6, axis_name: AxisName | None = None,
                axis_index_groups=None, center: bool = True, dtype: DType | None = None,
                fallback: tuple[Array, Array] | None = None
                ) -> tuple[Array, Centered, Array | None]:
  """``y = ((x - mean) * rsqrt(var + epsilon)) * scale + bias`` with batch statistics.

  Equals :func:`standardize_reference` (``scale_shift`` of ``centered_moments``)
  up to rounding, with an analytic backward.  Inputs must already be validated as the
  public functions do: ``axes`` sorted non-negative ints; ``scale``, ``bias``,
  ``where`` of ``x``'s rank, broadcasting to it.

  Args:
    fallback: optional running ``(mean, var)`` of the statistics' keep-dims
      shape (batch norm's ``degenerate="running"``): where the batch statistics
      are unusable (:func:`usable_stats`), normalize with these instead.

  Returns:
    ``(y, batch, usable)``: the output; the batch statistics (differentiable,
    for running averages and moments); the boolean :func:`usable_stats` mask if
    ``fallback`` was given, else None.
  """
  if not ENABLED or jnp.iscomplexobj(x):  # complex x: plain autodiff, see standardize_reference
    return standardize_reference(x, axes, scale, bias, where=where, epsilon=epsilon,
                                 axis_name=axis_name, axis_index_groups=axis_index_groups,
                                 center=center, dtype=dtype, fallback=fallback)
  kernels = _kernels_on()
  if kernels and _rows_cover(x, axes, scale, bias, where, axis_name, fallback, dtype):
    from ._cpu import _rows
    with _forward_mode_hint():
      y, batch = _rows.standardize_rows(x, len(axes), scale, bias, where,
                                        jnp.asarray(epsilon, jnp.float32), center=bool(center),
                                        out_dtype=jnp.dtype(dtype or x.dtype))
    return y, batch, None
  cdtype = stat_dtype(x.dtype)
  cfg = _Config(axes=tuple(axes), axis_name=_hashable(axis_name),
                axis_index_groups=_hashable(axis_index_groups), center=bool(center),
                out_dtype=jnp.dtype(dtype or x.dtype), fallback=fallback is not None,
                kernels=kernels)
  rm, rv = (None, None) if fallback is None else (jnp.asarray(fallback[0], cdtype),
                                                  jnp.asarray(fallback[1], cdtype))
  eps = jnp.asarray(epsilon, cdtype)
  y, shift, offset, var, count, usable = _standardize(cfg, x, scale, bias, where, rm, rv, eps)
  return y, Centered(shift=shift, offset=offset, var=var, count=count), usable


def _kernels_on() -> bool:
  """Whether jaxnorm's fused CPU kernels (:mod:`jaxnorm._cpu`) are switched on, built,
  and the default backend is the CPU (read at trace time)."""
  from . import _cpu
  if _cpu._disabled or not _cpu._env_enabled() or jax.default_backend() != "cpu":
    return False
  return _cpu.kernels_available()


def _rows_cover(x, axes, scale, bias, where, axis_name, fallback, dtype) -> bool:
  """Whether the row kernels take the whole call (layer/RMS norm over trailing axes,
  see :func:`jaxnorm._cpu._rows.covers`).  Otherwise, with the kernels on, the
  statistics and the backward's sums of batch, group and instance norm go through
  the column-sum kernel where it covers them (:mod:`jaxnorm._cpu._cols`)."""
  from ._cpu import _rows
  return _rows.covers(x, tuple(axes), scale, bias, where, axis_name=axis_name,
                      fallback=fallback, out_dtype=jnp.dtype(dtype or x.dtype))


def _groups_cover(x, g, axes, scale) -> bool:
  """Whether the fused backward kernel of group/instance norm with the features minor
  takes ``dx`` and the sums (:mod:`jaxnorm._cpu._groups`; the caller checks that no
  all-reduce, mask or fallback comes between them)."""
  from ._cpu import _groups
  return _groups.covers(x, g, tuple(axes), scale)


def standardize_reference(x: Array, axes: tuple[int, ...], scale: Array | None = None,
                          bias: Array | None = None, *, where: Array | None = None,
                          epsilon: Any = 1e-6, axis_name: AxisName | None = None,
                          axis_index_groups=None, center: bool = True,
                          dtype: DType | None = None,
                          fallback: tuple[Array, Array] | None = None
                          ) -> tuple[Array, Centered, Array | None]:
  """:func:`standardize` by plain autodiff of ``centered_moments`` + :func:`scale_shift`.

  ``x`` is cast to the statistics dtype once, so a bf16/f16 ``x`` gets its
  gradient accumulated in float32 and rounded once.  Complex ``x`` always takes
  this path (the analytic backward is written for real data): complex mean, real
  variance ``E|x - mean|^2``, gradients by JAX's complex autodiff.
  """
  cdtype = stat_dtype(x.dtype)
  xf = x.astype(cdtype)
  batch = centered_moments(xf, axes, where=where, axis_name=axis_name,
                           axis_index_groups=axis_index_groups, center=center)
  used, usable = with_fallback(batch, fallback)
  rstd = inverse_std(used, usable, jnp.asarray(epsilon, cdtype))
  y = affine(xf, used.shift, used.offset, rstd, scale, bias, jnp.dtype(dtype or x.dtype))
  return y, batch, usable


def with_fallback(batch: Centered, fallback: tuple[Array, Array] | None
                  ) -> tuple[Centered, Array | None]:
  """The statistics to normalize with: ``batch``, or where it is not
  :func:`usable_stats`, the running ``fallback = (mean, var)``.  Returns
  ``(used, usable)`` (``usable`` is None without a fallback)."""
  if fallback is None:
    return batch, None
  rm, rv = jnp.asarray(fallback[0], batch.shift.dtype), jnp.asarray(fallback[1], batch.var.dtype)
  usable = usable_stats(batch)
  used = Centered(shift=jnp.where(usable, batch.shift, rm),
                  offset=jnp.where(usable, batch.offset, 0),
                  var=jnp.where(usable, batch.var, rv), count=batch.count)
  return used, usable


def inverse_std(used: Centered, usable: Array | None, eps: Array) -> Array:
  """``rsqrt(var + eps)`` of the statistics used; 0 for a group with no included
  element (and no fallback), so that its output is ``bias`` -- not ``x / sqrt(eps)``,
  which overflows float16 -- with zero gradient."""
  rstd = lax.rsqrt(used.var + eps)
  return rstd if usable is not None else jnp.where(used.count > 0, rstd, 0)


def scale_shift(x: Array, stats: Centered, scale: Array | None, bias: Array | None,
                epsilon: Any, dtype: DType | None) -> Array:
  """``((x - shift) - offset) * rsqrt(var + epsilon) * scale + bias`` with given statistics
  (evaluation-mode batch norm, :func:`jaxnorm.normalize`, the reference path)."""
  cdtype = stat_dtype(x.dtype)
  rstd = lax.rsqrt(stats.var.astype(cdtype) + jnp.asarray(epsilon, cdtype))
  return affine(x, stats.shift, stats.offset, rstd, scale, bias, jnp.dtype(dtype or x.dtype))


def affine(x: Array, shift: Array, offset: Array, rstd: Array, scale: Array | None,
           bias: Array | None, out_dtype: Any) -> Array:
  """``((x - shift) - offset) * (rstd * scale) + bias``, in at least float32, one fused pass.

  ``x - shift`` is exact when the shift is close to the data, then one rounding
  per op.  (The algebraically equal ``(x - shift) * a + (bias - offset * a)`` with
  ``a = rstd * scale`` makes ``a`` -- a full-size outer product for layer and group
  norm -- a shared subexpression that XLA:CPU materialises, splitting the forward
  into four passes; this form is one.)
  """
  cdtype = stat_dtype(x.dtype)
  if _materialise_statistics(x, shift):
    shift, offset, rstd = lax.optimization_barrier((shift, offset, rstd))
  a = rstd.astype(cdtype) if scale is None else rstd.astype(cdtype) * scale.astype(cdtype)
  y = ((x.astype(cdtype) - shift.astype(cdtype)) - offset.astype(cdtype)) * a
  if bias is not None:
    y = y + bias.astype(cdtype)
  return y.astype(out_dtype)


def _materialise_statistics(x: Array, shift: Array) -> bool:
  """Whether to materialise the statistics before :func:`affine`'s pass (on the CPU).

  Statistics that vary along ``x``'s last (contiguous) axis -- batch norm with the
  features minor -- are otherwise recomputed by XLA:CPU for every element inside the
  fused loop (the shift's finiteness selects, the offset, the rsqrt), since they
  change in its innermost iteration.  Materialising them first (an optimisation
  barrier; same values, bit for bit) measured 0.92x the time for batch-norm training
  forward NHWC, 0.93x for evaluation, 0.98x/0.96x for a ResNet bottleneck fwd+bwd
  (f32/bf16).  Statistics constant along the last axis (layer norm, NCHW) are hoisted
  out of the inner loop anyway; there a barrier cost 5% (it splits XLA's fusion of the
  reduction with the output pass).
  """
  return (x.ndim > 0 and shift.ndim == x.ndim and shift.shape[-1] != 1
          and shift.size < x.size and jax.default_backend() == "cpu")


# --------------------------------------------------------------------------- implementation


@dataclasses.dataclass(frozen=True)
class _Config:
  """The static part of a call (hashable: a non-differentiable custom_vjp argument)."""

  axes: tuple[int, ...]
  axis_name: Hashable
  axis_index_groups: Hashable
  center: bool
  out_dtype: Any
  fallback: bool
  kernels: bool = False  # the CPU column-sum kernel may take the sums


def _hashable(v):
  if isinstance(v, list):
    return tuple(_hashable(a) for a in v)
  return v


def _psum(cfg: _Config, v: Array) -> Array:
  if cfg.axis_name is None:
    return v
  return lax.psum(v, cfg.axis_name, axis_index_groups=cfg.axis_index_groups)


def _psum_transpose(cfg: _Config, ct: Array, like: Array) -> Array:
  """The cotangent of ``psum(like)`` pulled back to ``like`` (as autodiff does it).

  Under ``vmap``/``pmap`` every device holds its own cotangent of the reduced
  value: they are summed.  Under ``shard_map`` (manual axes typed) the reduced
  value is replicated and so is its cotangent: it passes through unchanged, and
  only axes it still varies over are summed.
  """
  names = set(cfg.axis_name) if isinstance(cfg.axis_name, tuple) else {cfg.axis_name}
  if not (_vma(like) & names):  # untyped (vmap, pmap): the transpose of psum is psum
    return _psum(cfg, ct)
  varying = tuple(n for n in _vma(ct) if n in names)
  return lax.psum(ct, varying) if varying else ct


def _sum_to(v: Array, shape: tuple[int, ...]) -> Array:
  """Sums ``v`` down to ``shape`` (the shape it was broadcast from)."""
  lead = v.ndim - len(shape)  # a parameter of lower rank broadcasts from the right
  if lead:
    v = jnp.sum(v, axis=tuple(range(lead)))
  axes = tuple(a for a, (s, t) in enumerate(zip(shape, v.shape)) if s == 1 and t != 1)
  return jnp.sum(v, axis=axes, keepdims=True) if axes else v


def _split_axes(axes: tuple[int, ...], ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(outer, inner)`` when the reduced axes are not contiguous but end with the
  minor axis (group norm on (N, H, W, G, C/G): ``((1, 2), (4,))``), else ``(axes, ())``."""
  inner = []
  for a in range(ndim - 1, -1, -1):
    if a not in axes:
      break
    inner.insert(0, a)
  outer = tuple(a for a in axes if a not in inner)
  if not inner or not outer or max(outer) + 1 == min(inner):
    return tuple(axes), ()
  return outer, tuple(inner)


def _moments(cfg: _Config, x, where) -> tuple[Centered, Array]:
  """``centered_moments`` over ``cfg.axes``, in two stages when they are not contiguous.

  XLA:CPU reduces over non-contiguous axes (group norm's spatial axes and the
  channels of a group, with the groups in between) several times slower than
  over contiguous ones.  Then the statistics are taken per channel (over the
  outer axes, one shift per channel) and merged over the inner axes with Chan's
  formulas: with counts n_c, channel means m_c (relative to a common shift K near
  the data) and variances v_c, ``mean = sum n_c m_c / n`` and
  ``var = sum n_c (v_c + (m_c - mean)^2) / n``.  Exact in exact arithmetic and as
  accurate as one stage (every difference is between values near the data).

  Also returns the finest shift (per channel when split), which the backward
  uses to centre ``x`` in its per-channel reductions.
  """
  outer, inner = _split_axes(cfg.axes, x.ndim)
  per = centered_moments(x, outer, where=where, axis_name=cfg.axis_name,
                         axis_index_groups=cfg.axis_index_groups, center=cfg.center,
                         kernels=cfg.kernels)
  if not inner:
    return per, per.shift
  total = lambda v: jnp.sum(v, axis=inner, keepdims=True)
  n = total(per.count)
  n_safe = jnp.where(n > 0, n, 1)
  w = per.count / n_safe
  if not cfg.center:
    zero = jnp.zeros_like(n)
    return Centered(shift=zero, offset=zero, var=total(w * per.var), count=n), per.shift
  shift = lax.stop_gradient(total(w * per.shift))
  m_c = (per.shift - shift) + per.offset
  offset = total(w * m_c)
  var = jnp.maximum(total(w * (per.var + jnp.square(m_c - offset))), 0)
  return Centered(shift=shift, offset=offset, var=var, count=n), per.shift


def _statistics(cfg: _Config, x, where, rm, rv, eps):
  batch, fine_shift = _moments(cfg, x, where)
  used, usable = with_fallback(batch, None if rm is None else (rm, rv))
  return batch, usable, fine_shift, (used.shift, used.offset, inverse_std(used, usable, eps))


def _outputs(cfg, x, scale, bias, where, rm, rv, eps):
  x_stats, x_out = independent(x, x)  # bf16/f16: each pass converts x itself
  batch, usable, fine_shift, (k_u, d_u, rstd_u) = _statistics(cfg, x_stats, where, rm, rv,
                                                              eps)
  y = affine(x_out, k_u, d_u, rstd_u, scale, bias, cfg.out_dtype)
  return (y, *batch, usable), (batch, usable, fine_shift, k_u, d_u, rstd_u)


def _primal(cfg, x, scale, bias, where, rm, rv, eps):
  return _outputs(cfg, x, scale, bias, where, rm, rv, eps)[0]


def _fwd(cfg, x, scale, bias, where, rm, rv, eps):
  out, (batch, usable, fine_shift, k_u, d_u, rstd_u) = _outputs(cfg, x, scale, bias, where,
                                                                rm, rv, eps)
  residuals = (x, scale, bias, where, rm, rv, eps, batch.shift, batch.offset, batch.count,
               usable, fine_shift, k_u, d_u, rstd_u)
  return out, residuals


def _bwd(cfg, residuals, cts):
  (x, scale, bias, where, rm, rv, eps, k, d, n, usable, kf, k_u, d_u, rstd_u) = residuals
  g, _, ct_d, ct_v, _, _ = cts  # shift: constant (stop_gradient); count, usable: discrete
  cdtype = stat_dtype(x.dtype)
  s = None if scale is None else scale.astype(cdtype)

  # bf16/f16: every full-size pass converts x and g itself (see ``independent``); a
  # shared float32 copy would be materialised.
  low = x.dtype != cdtype or g.dtype != cdtype
  copies = independent(*(x, g) * 5) if low else ()
  copies = iter(zip(copies[0::2], copies[1::2]))

  def fresh_xg():
    x_, g_ = next(copies) if low else (x, g)
    return x_.astype(cdtype), g_.astype(cdtype)

  def flat(p, ax):  # p does not vary along axis ax of x
    ax -= x.ndim - (0 if p is None else p.ndim)
    return p is None or ax < 0 or p.shape[ax] == 1

  def centred(xf, k_, d_):  # x - mean, fused into whichever pass uses it
    return (xf - k_) - d_ if cfg.center else xf

  def reduce(v, axes):
    return jnp.sum(v, axis=axes, keepdims=True) if axes else v

  # q: reduced axes along which neither the statistics nor scale/bias vary.  Reduce
  # g and g * (x - mean) over them first (batch/group norm: two full-size passes).
  q = tuple(ax for ax in cfg.axes if flat(scale, ax) and flat(bias, ax))
  rest = tuple(ax for ax in cfg.axes if ax not in q)
  # t2 = sum_q(g * (x - k - d)), centred on the finest shift kf (constant along q:
  # per channel for group norm, faster to reduce) and corrected by (kf - k - d) * t1.
  if any(kf.shape[a] != 1 for a in q):  # the finest shift must be constant along q
    kf = k
  dx = None
  if (cfg.kernels and where is None and usable is None and cfg.axis_name is None
      and _groups_cover(x, g, cfg.axes, scale)):
    from ._cpu import _groups  # group/instance norm, NHWC: dx and both sums, one read
    dx, t1, t2 = _groups.backward(x, g, cfg.axes, q, k_u, d_u, rstd_u, scale, ct_d, ct_v,
                                  center=cfg.center)
  elif q and cfg.kernels and where is None and column_kernel_covers(x, q, g):
    from ._cpu import _cols  # both sums in one pass over g and x
    t1, t2 = _cols.shifted_sums(g, None, x, kf if cfg.center else None, q)
    if cfg.center:
      t2 = t2 + ((kf - k) - d) * t1
  else:
    t1 = reduce(fresh_xg()[1], q)
    xf, gf = fresh_xg()
    if not cfg.center:
      t2 = reduce(gf * xf, q)
    elif q:
      (kfq,) = independent(kf)
      t2 = reduce(gf * (xf - kfq), q) + ((kf - k) - d) * t1
    else:
      kq, dq = independent(k, d)
      t2 = gf * centred(xf, kq, dq)
  # a1 = sum_R(g * scale), a2 = sum_R(g * scale * (x - mean)), on this device.
  if s is None:
    a1, a2 = reduce(t1, rest), reduce(t2, rest)
  else:
    (s1,) = independent(s)
    a1, a2 = reduce(t1 * s1, rest), reduce(t2 * s, rest)
  # ... and over every device holding part of the group (one all-reduce).  The
  # cotangents of the global statistics go back through the transpose of that
  # all-reduce: a sum of per-device cotangents under vmap/pmap, the (replicated)
  # cotangent itself under shard_map.
  ct_v = ct_v.astype(cdtype)
  ct_d = ct_d.astype(cdtype) if cfg.center else None
  if cfg.axis_name is None:
    a1g, a2g, ct_dg, ct_vg = a1, a2, ct_d, ct_v
  elif cfg.center:
    local = jnp.stack([a1, a2])
    a1g, a2g = _psum(cfg, local)
    ct_dg, ct_vg = _psum_transpose(cfg, jnp.stack(jnp.broadcast_arrays(ct_d, ct_v)), local)
  else:
    a1g, ct_dg = None, None
    a2g = _psum(cfg, a2)
    ct_vg = _psum_transpose(cfg, jnp.broadcast_to(ct_v, a2.shape), a2)

  if dx is None:  # dx = rstd * g * scale + (m / n) * (c0 + c1 * (x - mean))
    c1 = -(rstd_u * rstd_u * rstd_u) * a2g
    c0 = -rstd_u * a1g if cfg.center else None
    if usable is not None:  # fallback features: no gradient through the batch statistics
      c1 = jnp.where(usable, c1, 0)
      c0 = None if c0 is None else jnp.where(usable, c0, 0)
    c1 = c1 + 2 * ct_vg
    if cfg.center:
      c0 = c0 + ct_dg
    inv_n = 1 / jnp.where(n > 0, n, 1)
    kx, dx_, c0x, c1x, inv_nx, rstdx, sx = independent(k, d, c0, c1, inv_n, rstd_u, s)
    xf, gf = fresh_xg()
    direct = gf * rstdx if s is None else gf * (sx * rstdx)
    corr = (c0x + c1x * centred(xf, kx, dx_)) if cfg.center else c1x * xf
    corr = corr * inv_nx
    if where is not None:
      corr = jnp.where(where, corr, 0)
    dx = (direct + corr).astype(x.dtype)

  # Parameter gradients; delta moves the centring from the batch mean to the used one.
  delta = None if usable is None else jnp.where(usable, 0, (k - k_u) + (d - d_u))
  dscale = dbias = None
  if scale is not None:
    if q:
      t2u = t2 if delta is None else t2 + delta * t1
      dscale = _sum_to(t2u * rstd_u, scale.shape)
    else:
      kb, db, rb = independent(k_u, d_u, rstd_u)
      xf, gf = fresh_xg()
      dscale = _sum_to(gf * (((xf - kb) - db) * rb if cfg.center else xf * rb), scale.shape)
    dscale = dscale.astype(scale.dtype)
  if bias is not None:
    dbias = _sum_to(t1 if q else fresh_xg()[1], bias.shape).astype(bias.dtype)

  # Epsilon and the fallback statistics (per group, this device's sums).
  a2u = a2 if delta is None else a2 + delta * a1
  rstd3 = rstd_u * rstd_u * rstd_u
  d_eps = jnp.sum(-0.5 * rstd3 * a2u).astype(eps.dtype)
  d_rm = d_rv = None
  if usable is not None:
    d_rm = jnp.where(usable, 0, -rstd_u * a1).astype(rm.dtype)
    d_rv = jnp.where(usable, 0, -0.5 * rstd3 * a2u).astype(rv.dtype)
  cts_in = (dx, dscale, dbias, None, d_rm, d_rv, d_eps)
  primals = (x, scale, bias, where, rm, rv, eps)
  return tuple(_match_vma(ct, p) for ct, p in zip(cts_in, primals))


def _vma(a) -> frozenset:
  """The manual mesh axes ``a`` varies over inside ``shard_map`` (empty elsewhere)."""
  aval = jax.typeof(a)
  mat = getattr(aval, "mat", None)  # jax >= 0.10: ManualAxisType
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", None) or ())  # older jax


def _match_vma(ct, primal):
  """Under ``shard_map`` a cotangent computed from per-device data varies over the
  manual axes; the cotangent of an input replicated over some of them (scale,
  bias, epsilon) is the sum over those devices, as autodiff's transpose of the
  implicit broadcast gives."""
  if ct is None or primal is None:
    return ct
  extra = tuple(_vma(ct) - _vma(primal))
  return lax.psum(ct, extra) if extra else ct


_standardize_vjp = jax.custom_vjp(_primal, nondiff_argnums=(0,))
_standardize_vjp.defvjp(_fwd, _bwd)


def _standardize(cfg, x, scale, bias, where, rm, rv, eps):
  with _forward_mode_hint():
    return _standardize_vjp(cfg, x, scale, bias, where, rm, rv, eps)


@contextlib.contextmanager
def _forward_mode_hint():
  """Replaces JAX's bare "can't apply forward-mode autodiff" error of a custom VJP
  (raised when ``jax.jvp``/``jacfwd`` traces it) with one that names the fix."""
  try:
    yield
  except TypeError as e:
    if "forward-mode" not in str(e):
      raise
    raise TypeError(
        "jaxnorm: forward-mode autodiff (jax.jvp, jax.jacfwd, jax.linearize) is not defined "
        "for jaxnorm's default path, which has a custom reverse-mode gradient "
        "(jax.custom_vjp). Trace the function inside `with jaxnorm.plain_autodiff():` "
        "(a new function object, e.g. a fresh lambda, so JAX's cache does not reuse an "
        "earlier trace); reverse mode (grad, hessian) works as is.") from e
