"""Shifted column sums through the CPU kernel (``cols.cc``): two sums, one pass.

Batch norm (features minor), group norm and instance norm on NHWC reduce over a run
of contiguous axes with the features after it.  Their statistics need
``sum(x - k)`` and ``sum((x - k)^2)``, their backward ``sum(g)`` and
``sum(g * (x - k))``: XLA:CPU computes each sum as its own pass over memory; the
kernel computes a pair in one.  Everything else (the shift, the all-reduce across
devices, the affine and ``dx`` passes, which XLA fuses with their neighbours such as
a ReLU) stays in JAX, so ``axis_name``, the degenerate-batch fallback and every
transform work as on the XLA path.

:func:`shifted_sums` views ``a`` as ``(S, M, L)`` (``M``: the reduced axes, which
must be contiguous) and returns, keep-dims,
``s1 = sum_M(a - ka)`` and ``s2 = sum_M((a - ka) * (b - kb))``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.interpreters import batching

from .._types import Array
from ._prim import make_primitive, with_impl_jvp

SAME = 1  # b is a and kb is ka: s2 = sum((a - ka)^2), a read once
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_COLUMNS = 8  # fewer columns: a row reduction, which XLA does well
MIN_ROWS = 32    # fewer summed rows: little to gain, and the kernel's double-precision
                 # block totals (16 bytes per column) would reach half the input's size


def layout(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, int, int] | None:
  """``(S, M, L)`` when ``axes`` are one contiguous run of ``shape``, else None."""
  axes = tuple(sorted(axes))
  if not axes or axes != tuple(range(axes[0], axes[-1] + 1)):
    return None
  return (math.prod(shape[:axes[0]]), math.prod(shape[axes[0]:axes[-1] + 1]),
          math.prod(shape[axes[-1] + 1:]))


def covers(x: Array, axes: tuple[int, ...], *others: Array) -> bool:
  """Whether sums over ``axes`` of ``x`` (and of ``others`` of its shape) fit the kernel."""
  lay = layout(x.shape, axes)
  if lay is None or lay[1] < MIN_ROWS or lay[2] < MIN_COLUMNS or lay[0] == 0:
    return False
  from ._rows import _explicitly_sharded
  return all(jnp.dtype(a.dtype) in _DTYPES and a.shape == x.shape
             and not _explicitly_sharded(a) for a in (x, *others))


def _split(shape, begin, end):
  return math.prod(shape[:begin]), math.prod(shape[begin:end]), math.prod(shape[end:])


def _abstract(a, ka, b, kb, *, flags, begin, end):
  s, _, l = _split(a.shape, begin, end)
  out = jax.core.ShapedArray((s, 1, l), jnp.float32)
  return out, out


def _impl(a, ka, b, kb, *, flags, begin, end):
  """The kernel's math as JAX operations (partitioned computations, other platforms,
  derivatives)."""
  lay = _split(a.shape, begin, end)
  u = a.reshape(lay).astype(jnp.float32) - ka
  v = u if flags & SAME else b.reshape(lay).astype(jnp.float32) - kb
  return jnp.sum(u, axis=1, keepdims=True), jnp.sum(u * v, axis=1, keepdims=True)


# a and b keep their own shapes (axes [begin, end) reduced): reshaping them to 3-D
# here can make XLA:CPU copy x before the call (a fusion of two bitcasts)
_p = make_primitive("jaxnorm_column_sums", _abstract, _impl, attrs=("flags", "begin", "end"))


def _batch(args, dims, *, flags, begin, end):
  """``vmap``: the batched axis goes first and joins ``S`` (still one kernel call)."""
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  a0, d0 = args[0], dims[0]
  shape = a0.shape if d0 is None else tuple(n for i, n in enumerate(a0.shape) if i != d0)
  s = math.prod(shape[:begin])
  out = []
  for i, (a, d) in enumerate(zip(args, dims)):
    if i in (0, 2):  # a, b: batched axis first
      out.append(jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0))
      continue
    if d is None:  # a shift (S or 1, 1, L or 1)
      if a.shape[0] == 1:
        out.append(a)  # broadcast along S: stays broadcast
        continue
      a = jnp.broadcast_to(a, (size,) + a.shape)
    else:
      a = jnp.moveaxis(a, d, 0)
      if a.shape[1] == 1 and s != 1:
        a = jnp.broadcast_to(a, (size, s) + a.shape[2:])
    out.append(a.reshape((size * a.shape[1],) + a.shape[2:]))
  s1, s2 = _p.bind(*out, flags=flags, begin=begin + 1, end=end + 1)
  unmerge = lambda r: r.reshape((size, s) + r.shape[1:])
  return (unmerge(s1), unmerge(s2)), (0, 0)


batching.primitive_batchers[_p] = _batch
_call = with_impl_jvp(_p, _impl, nondiff=())


def shifted_sums(a: Array, ka: Array | None, b: Array | None, kb: Array | None,
                 axes: tuple[int, ...]) -> tuple[Array, Array]:
  """``(sum(a - ka), sum((a - ka) * (b - kb)))`` over ``axes``, keep-dims, float32.

  ``b=None`` means ``b = a`` and ``kb = ka`` (moments).  Shifts are float32 (or None
  for 0) of the keep-dims shape or broadcastable to it.  Call only where
  :func:`covers`.
  """
  axes = tuple(sorted(axes))
  s, m, l = layout(a.shape, axes)
  keep = tuple(1 if i in axes else d for i, d in enumerate(a.shape))

  def shift(k):
    if k is None:
      return jnp.zeros((1, 1, 1), jnp.float32)
    return jnp.broadcast_to(k.astype(jnp.float32), keep).reshape(s, 1, l)

  same = b is None
  ka3 = shift(ka)
  b, kb3 = (a, ka3) if same else (b, shift(kb))
  params = (("flags", SAME if same else 0), ("begin", axes[0]), ("end", axes[-1] + 1))
  s1, s2 = _call(params, a, ka3, b, kb3)
  return s1.reshape(keep), s2.reshape(keep)
