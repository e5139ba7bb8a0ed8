"""Checks shared by the CPU kernel tests (test_kernels*.py)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def assert_sharded_jit_does_not_gather(devices, loss, x, params, target: str, *,
                                       atol: float = 5e-5, rtol: float = 1e-4) -> None:
  """``jax.jit(value_and_grad(loss))`` with ``x`` sharded over ``devices`` along its first
  axis (no ``axis_name``): the compiled HLO has no all-gather and no kernel call
  (``target``: the kernels' math is lowered as XLA operations), the unsharded
  compilation does call the kernel, and both give the same value and gradients."""
  mesh = jax.sharding.Mesh(np.array(devices), ("b",))
  xs = jax.device_put(x, NamedSharding(mesh, P("b")))
  argnums = tuple(range(1 + len(params)))
  step = jax.jit(jax.value_and_grad(loss, argnums=argnums))
  hlo = step.lower(xs, *params).compile().as_text()
  assert "all-gather" not in hlo, "x was gathered"
  assert target not in hlo  # partitioned: the kernel's math as XLA operations
  single = jax.jit(jax.value_and_grad(loss, argnums=argnums))
  assert target in single.lower(np.asarray(x), *params).compile().as_text()
  v, g = step(xs, *params)
  v1, g1 = single(np.asarray(x), *params)
  np.testing.assert_allclose(v, v1, rtol=1e-5)
  for a, c in zip(g, g1):
    np.testing.assert_allclose(a, c, atol=atol, rtol=rtol)
