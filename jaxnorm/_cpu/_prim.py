"""What every kernel primitive shares: the lowering choice and differentiation.

A kernel is a JAX primitive with two lowerings: on the CPU the FFI custom call, unless
the computation is partitioned over several devices (then, and on other platforms,
the same math as plain JAX operations, ``impl``, which XLA partitions without
gathering the operands).  :func:`with_impl_jvp` gives it a JVP through ``impl``, so
code using the kernels stays differentiable to any order.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir


def partitioned(ctx) -> bool:
  """Whether this lowering is for a computation XLA partitions over several devices."""
  try:
    from jax._src import sharding_impls as si
  except ImportError:  # pragma: no cover - private module moved: be conservative
    return True
  ac = ctx.module_context.axis_context
  if isinstance(ac, si.ShardingContext):
    return ac.num_devices > 1
  if isinstance(ac, si.SPMDAxisContext):  # shard_map: partitioned if any auto axis left
    shape = dict(ac.mesh.shape)
    return any(size > 1 for name, size in shape.items() if name not in ac.manual_axes)
  return False  # pmap / replicas: each device runs its own copy


def make_primitive(name: str, abstract, impl, attrs: tuple[str, ...] = ("flags",)) -> Primitive:
  """A multiple-result primitive lowered to the FFI target ``name`` on the CPU (the
  parameters named in ``attrs`` become its int32 attributes) and to ``impl`` (its
  math in JAX) elsewhere."""
  prim = Primitive(name)
  prim.multiple_results = True
  prim.def_abstract_eval(lambda *avals, **params: abstract(*avals, **params))
  prim.def_impl(lambda *args, **params: jax.jit(functools.partial(prim.bind, **params))(*args))

  def lower_xla(ctx, *args, **params):
    return mlir.lower_fun(functools.partial(impl, **params), multiple_results=True)(ctx, *args)

  def lower_cpu(ctx, *args, **params):
    if partitioned(ctx):
      return lower_xla(ctx, *args, **params)
    return jax.ffi.ffi_lowering(name)(ctx, *args, **{a: np.int32(params[a]) for a in attrs})

  mlir.register_lowering(prim, lower_xla)
  mlir.register_lowering(prim, lower_cpu, platform="cpu")
  return prim


def with_impl_jvp(prim: Primitive, impl, nondiff: tuple[int, ...]):
  """``prim.bind`` with a JVP given by the JAX implementation (for higher orders).

  Returns ``call(params, *args)`` with ``params`` a hashable tuple of items."""

  @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
  def call(params, *args):
    return tuple(prim.bind(*args, **dict(params)))

  @call.defjvp
  def _jvp(params, primals, tangents):
    keep = [i for i in range(len(primals)) if i not in nondiff]

    def f(*diff):
      full = list(primals)
      for i, v in zip(keep, diff):
        full[i] = v
      return impl(*full, **dict(params))

    out = call(params, *primals)
    _, t_out = jax.jvp(f, tuple(primals[i] for i in keep), tuple(tangents[i] for i in keep))
    return out, t_out

  return call
