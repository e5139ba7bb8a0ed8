"""Group norm and instance norm backward on NHWC through one fused CPU kernel.

``x`` is viewed as ``(S, M, L)``: samples (the axes before the reduced run), the
reduced positions ``M`` (a contiguous run of axes) and ``L`` features after them, in
``G`` groups of ``Cg`` adjacent features -- group norm on ``(N, H, W, G, Cg)``
(positions ``(1, 2)`` and the last axis reduced), instance norm on ``(N, H, W, C)``
(``Cg = 1``).  The kernel (``groups.cc``) gives :mod:`jaxnorm._vjp`'s backward for
these layouts -- ``dx`` and the per-sample, per-feature sums ``t1 = sum(g)`` and
``t2 = sum(g * (x - mean))`` from which XLA forms ``dscale``, ``dbias`` and the
epsilon gradient -- reading each sample's ``x`` and ``g`` from memory once: one
sample fits in cache (:func:`max_sample_bytes`), so the ``dx`` pass reads it again
from there.  The XLA path reads them twice (the sums, then ``dx``).

Used where nothing has to happen between the sums and ``dx``: no ``axis_name`` (the
all-reduce of the sums), no mask, no fallback statistics, parameters varying along
the features only; and for at least ``MIN_SAMPLES`` samples of at most
:func:`max_sample_bytes` each.  The forward is unchanged (the column-sum kernel's statistics and
XLA's affine pass, which fuses with what follows it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.interpreters import batching

from .._types import Array
from ._prim import make_primitive, with_impl_jvp

CENTER, SCALE = 1, 2
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_FEATURES = 8  # fewer: the kernel's 8-wide vector loops would not run
MIN_SAMPLES = 4   # fewer: too few tasks for the threads (the XLA path splits rows)


def max_sample_bytes() -> int:
  """The most bytes of one sample's ``x`` and ``g`` the kernel takes: a quarter of the
  L3 cache, so the samples of two tasks at once stay in cache between the kernel's two
  passes.  Larger samples keep the column-sum path: on a 32 MiB L3, (2, 128, 128, 128)
  float32 (16 MiB a sample) took 5.8 floors fwd+bwd with the kernel and 4.3 without;
  (4, 128, 128, 64) (8 MiB) 3.4 with and 5.8 without."""
  from . import l3_cache_bytes
  return l3_cache_bytes() // 4


def layout(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, int, int] | None:
  """``(begin, end, Cg)`` when the reduced ``axes`` are a contiguous run ``[begin,
  end)`` with sample axes before it and features after it, plus optionally the last
  axis after at least one group axis (then ``Cg`` is its size, else 1); None
  otherwise."""
  axes = tuple(sorted(axes))
  nd = len(shape)
  cg = 1
  if len(axes) >= 2 and axes[-1] == nd - 1 and axes[-2] < nd - 2:
    cg, axes = shape[-1], axes[:-1]
  if not axes or axes != tuple(range(axes[0], axes[-1] + 1)):
    return None
  begin, end = axes[0], axes[-1] + 1
  if begin == 0 or end == nd:  # no sample axes (batch norm) or no features (rows)
    return None
  return begin, end, cg


def _split(shape, begin, end):
  return math.prod(shape[:begin]), math.prod(shape[begin:end]), math.prod(shape[end:])


def covers(x: Array, g: Array, axes: tuple[int, ...], scale: Array | None) -> bool:
  """Whether the backward of a standardization over ``axes`` fits the kernel (trace
  time; the caller checks: no ``axis_name``, mask or fallback)."""
  lay = layout(x.shape, tuple(axes))
  if lay is None or 0 in x.shape or g.shape != x.shape:
    return False
  begin, end, _ = lay
  if any(jnp.dtype(a.dtype) not in _DTYPES for a in (x, g)):
    return False
  if scale is not None and (scale.ndim != x.ndim or any(scale.shape[i] != 1
                                                        for i in range(end))):
    return False
  from ._rows import _explicitly_sharded
  if _explicitly_sharded(x) or _explicitly_sharded(g):
    return False
  s, m, l = _split(x.shape, begin, end)
  sample_bytes = m * l * (jnp.dtype(x.dtype).itemsize + jnp.dtype(g.dtype).itemsize)
  return s >= MIN_SAMPLES and l >= MIN_FEATURES and sample_bytes <= max_sample_bytes()


def _abstract(x, g, stats, scale, *, flags, begin, end, group):
  s, _, l = _split(x.shape, begin, end)
  t = jax.core.ShapedArray((s, l), jnp.float32)
  return jax.core.ShapedArray(x.shape, x.dtype), t, t


def _impl(x, g, stats, scale, *, flags, begin, end, group):
  """The kernel's math as JAX operations (partitioned computations, other platforms,
  derivatives)."""
  s, m, l = _split(x.shape, begin, end)
  grp = (s, m, l // group, group)
  xf = x.reshape(grp).astype(jnp.float32)
  gf = g.reshape(grp).astype(jnp.float32)
  k, d, rstd, ct_d, ct_v = (stats[i].reshape(s, 1, l // group, 1) for i in range(5))
  xc = (xf - k) - d if flags & CENTER else xf
  sc = scale.reshape(1, 1, l // group, group) if flags & SCALE else jnp.float32(1)
  t1 = jnp.sum(gf, axis=1, keepdims=True)
  t2 = jnp.sum(gf * xc, axis=1, keepdims=True)
  a1 = jnp.sum(t1 * sc, axis=3, keepdims=True)
  a2 = jnp.sum(t2 * sc, axis=3, keepdims=True)
  c0 = ct_d - rstd * a1 if flags & CENTER else 0
  c1 = 2 * ct_v - rstd * rstd * rstd * a2
  dx = gf * (sc * rstd) + (c0 + c1 * xc) * (1 / jnp.float32(m * group))
  return dx.astype(x.dtype).reshape(x.shape), t1.reshape(s, l), t2.reshape(s, l)


_p = make_primitive("jaxnorm_groups_bwd", _abstract, _impl,
                    attrs=("flags", "begin", "end", "group"))


def _batch(args, dims, *, flags, begin, end, group):
  """``vmap``: the batched axis goes first on ``x`` and ``g`` and joins the samples
  (one kernel call); a batched scale falls back to the JAX math."""
  params = dict(flags=flags, begin=begin, end=end, group=group)
  if dims[3] is not None:
    outs = jax.vmap(lambda *a: _impl(*a, **params), in_axes=dims)(*args)
    return outs, (0, 0, 0)
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  x, g, stats, scale = args
  x, g = (jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
          for a, d in ((x, dims[0]), (g, dims[1])))
  stats = (jnp.broadcast_to(stats[:, None], (5, size) + stats.shape[1:]) if dims[2] is None
           else jnp.moveaxis(stats, dims[2], 1))
  stats = stats.reshape((5, -1) + stats.shape[3:])
  dx, t1, t2 = _p.bind(x, g, stats, scale, flags=flags, begin=begin + 1, end=end + 1,
                       group=group)
  unmerge = lambda t: t.reshape((size, t.shape[0] // size) + t.shape[1:])
  return (dx, unmerge(t1), unmerge(t2)), (0, 0, 0)


batching.primitive_batchers[_p] = _batch
_call = with_impl_jvp(_p, _impl, nondiff=())


def backward(x: Array, g: Array, axes: tuple[int, ...], q: tuple[int, ...], k: Array,
             d: Array, rstd: Array, scale: Array | None, ct_d: Array | None, ct_v: Array,
             *, center: bool) -> tuple[Array, Array, Array]:
  """``(dx, t1, t2)``: the gradient of ``x`` and, keep-dims over ``q`` (float32; the
  reduced axes along which ``scale`` does not vary), ``t1 = sum_q(g)`` and
  ``t2 = sum_q(g * ((x - k) - d))`` (``g * x`` without centring).

  ``k``, ``d``, ``rstd``, ``ct_d``, ``ct_v``: the statistics used and the cotangents
  of the offset and variance, keep-dims over ``axes``; ``scale`` of ``x``'s rank or
  None.  Call only where :func:`covers`."""
  begin, end, cg = layout(x.shape, tuple(axes))
  s, _, l = _split(x.shape, begin, end)
  keep = tuple(1 if i in axes else n for i, n in enumerate(x.shape))
  zero = jnp.zeros((), jnp.float32)
  per_group = lambda v: jnp.broadcast_to(
      zero if v is None else v.astype(jnp.float32), keep).reshape(s, l // cg)
  stats = jnp.stack([per_group(v) for v in ((k, d) if center else (None, None))]
                    + [per_group(rstd), per_group(ct_d if center else None), per_group(ct_v)])
  sc = (jnp.zeros((1,), jnp.float32) if scale is None else
        jnp.broadcast_to(scale.astype(jnp.float32), (1,) * end + x.shape[end:]).reshape(l))
  flags = (CENTER if center else 0) | (SCALE if scale is not None else 0)
  params = (("flags", flags), ("begin", begin), ("end", end), ("group", cg))
  dx, t1, t2 = _call(params, x, g, stats, sc)
  run = tuple(1 if begin <= i < end else n for i, n in enumerate(x.shape))
  t1, t2 = t1.reshape(run), t2.reshape(run)
  if x.ndim - 1 in q and cg > 1:  # the last axis too (no scale along it)
    t1, t2 = (jnp.sum(t, axis=-1, keepdims=True) for t in (t1, t2))
  return dx, t1, t2
