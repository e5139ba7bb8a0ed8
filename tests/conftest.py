"""Test configuration: 8 fake CPU devices and strict numerics, set before JAX is used."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
  """The 8 fake CPU devices; fails (not skips) when they are missing."""
  devs = jax.devices()
  assert len(devs) >= 8, (
      f"expected 8 CPU devices, found {len(devs)}: JAX was initialised before "
      "tests/conftest.py could set jax_num_cpu_devices")
  return devs[:8]


# Run as a subprocess by test_distributed.py, never imported by pytest.
collect_ignore = ["_distributed_worker.py"]
