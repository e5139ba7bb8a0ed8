"""Statistics of the global batch across devices: vmap, shard_map, pmap, sharded jit, hosts.

Every test compares a split computation with the same function on the
concatenated batch on one device.  The 8 fake CPU devices come from conftest.py;
a missing device fails the test (the `devices` fixture), never skips it.
"""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxnorm as jn

D = 8
RTOL = ATOL = 2e-5


def _close(a, b, tol=ATOL):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _data(shape=(64, 6), offset=3.0, seed=0):
  rng = np.random.default_rng(seed)
  return (offset + rng.standard_normal(shape)).astype(np.float32)


def _uneven_mask(n=64):
  """Per-sample mask leaving device shards (of n // 8 rows) with unequal counts, one with 0."""
  m = np.ones((n, 1), bool)
  rows = n // D
  m[rows:2 * rows] = False            # device 1: no valid sample
  m[2 * rows + 1:3 * rows] = False    # device 2: one valid sample
  m[5 * rows + 3:6 * rows] = False    # device 5: three valid samples
  return m


def _bn(axis_name=None, **kw):
  def f(x, mask, scale, bias):
    stats = jn.init_batch_stats(x.shape[-1])
    return jn.batch_norm(x, stats, scale, bias, training=True, momentum=0.9, where=mask,
                         axis_name=axis_name, **kw)
  return f


def _loss_and_grads(f):
  """Outputs, new stats and grads of sum(y * g) w.r.t. (x, scale, bias)."""
  def loss(x, mask, scale, bias):
    y, stats = f(x, mask, scale, bias)
    g = jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))
    return jnp.sum(y * g), (y, stats)
  return jax.value_and_grad(loss, argnums=(0, 2, 3), has_aux=True)


@pytest.fixture(scope="module")
def mesh(devices):
  return jax.make_mesh((D,), ("batch",), devices=devices)


def _params(c=6):
  return jnp.linspace(0.5, 1.5, c), jnp.linspace(-0.2, 0.3, c)


def _compare_with_global(split_result, x, mask):
  """split_result = ((loss, (y, stats)), grads) from a split computation, y in (n, c)."""
  (loss, (y, stats)), grads = split_result
  (loss1, (y1, stats1)), grads1 = jax.jit(_loss_and_grads(_bn()))(x, mask, *_params())
  _close(y, y1)
  _close(stats.mean, stats1.mean)
  _close(stats.var, stats1.var)
  for g, g1 in zip(grads, grads1):
    _close(g, g1, tol=1e-4)


@pytest.mark.parametrize("masked", [False, True], ids=["full", "uneven_mask"])
def test_vmap_axis_name_equals_global_batch(masked):
  x = _data()
  mask = _uneven_mask() if masked else np.ones((64, 1), bool)

  def split(x, mask, scale, bias):
    y, stats = jax.vmap(_bn("batch"), in_axes=(0, 0, None, None), axis_name="batch")(
        x.reshape(D, -1, 6), mask.reshape(D, -1, 1), scale, bias)
    return y.reshape(x.shape), jax.tree.map(lambda a: a[0], stats)

  _compare_with_global(jax.jit(_loss_and_grads(split))(x, mask, *_params()), x, mask)


@pytest.mark.parametrize("masked", [False, True], ids=["full", "uneven_mask"])
def test_shard_map_equals_global_batch(mesh, masked):
  x = _data()
  mask = _uneven_mask() if masked else np.ones((64, 1), bool)
  split = jax.shard_map(_bn("batch"), mesh=mesh, in_specs=(P("batch"), P("batch"), P(), P()),
                        out_specs=(P("batch"), P()))
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  scale, bias = _params()
  result = jax.jit(_loss_and_grads(split))(put(x, P("batch")), put(mask, P("batch")),
                                           put(scale, P()), put(bias, P()))
  _compare_with_global(result, x, mask)


def test_pmap_equals_global_batch(devices):
  x, mask = _data(), _uneven_mask()

  def split(x, mask, scale, bias):
    y, stats = jax.pmap(_bn("batch"), axis_name="batch", in_axes=(0, 0, None, None),
                        devices=devices)(x.reshape(D, -1, 6), mask.reshape(D, -1, 1), scale, bias)
    return y.reshape(x.shape), jax.tree.map(lambda a: a[0], stats)

  _compare_with_global(_loss_and_grads(split)(x, mask, *_params()), x, mask)


def test_flax_means_of_means_are_wrong_with_uneven_masks(mesh):
  """flax.linen.BatchNorm averages per-device means; jaxnorm reduces sums and counts."""
  nn = pytest.importorskip("flax.linen")
  x, mask = _data(offset=0.0), _uneven_mask()
  x[mask[:, 0]] += np.linspace(-2, 2, mask.sum(), dtype=np.float32)[:, None]
  bn = nn.BatchNorm(use_running_average=False, axis_name="batch", use_fast_variance=False,
                    momentum=0.9)
  variables = bn.init(jax.random.key(0), x[:8])

  def flax_fn(x, m):
    y, upd = bn.apply(variables, x, mask=m, mutable=["batch_stats"])
    return y, upd["batch_stats"]["mean"]

  def ours(x, m):
    y, stats = jn.batch_norm(x, jn.init_batch_stats(6), training=True, momentum=0.9, where=m,
                             axis_name="batch")
    return y, stats.mean

  split = lambda fn: jax.jit(jax.vmap(fn, axis_name="batch"))(x.reshape(D, -1, 6),
                                                              mask.reshape(D, -1, 1))
  y_ref, s_ref = jn.batch_norm(x, jn.init_batch_stats(6), training=True, momentum=0.9,
                               where=mask)
  y_ours, mean_ours = split(ours)
  y_flax, mean_flax = split(flax_fn)
  _close(np.asarray(y_ours).reshape(x.shape), y_ref)
  _close(mean_ours[0], s_ref.mean)
  # flax sees NaN (0/0) on the device without valid samples, or a biased mean.
  flax_err = np.nan_to_num(np.abs(np.asarray(mean_flax[0]) - np.asarray(s_ref.mean)), nan=np.inf)
  assert flax_err.max() > 1e-2, flax_err


def test_large_offset_accuracy_split_over_8_devices(mesh):
  rng = np.random.default_rng(0)
  x = (1e4 + rng.standard_normal((1024, 256))).astype(np.float32)
  x64 = x.astype(np.float64)
  ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
  f = jax.jit(jax.shard_map(
      lambda x: jn.batch_norm(x, jn.init_batch_stats(256), training=True, axis_name="batch")[0],
      mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))
  y = f(jax.device_put(x, NamedSharding(mesh, P("batch"))))
  err = np.abs(np.asarray(y, np.float64) - ref).max()
  assert err <= 1e-4, err


def _count_all_reduces(f, *args):
  hlo = jax.jit(f).lower(*args).compile().as_text()
  return hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")


@pytest.mark.parametrize("name, fn, expected", [
    ("batch_norm", lambda x: jn.batch_norm(x, jn.init_batch_stats(6), training=True,
                                           axis_name="batch"), 2),
    ("batch_norm_eval", lambda x: jn.batch_norm(x, jn.init_batch_stats(6), training=False,
                                                axis_name="batch"), 0),
    ("moments", lambda x: jn.moments(x, axis=0, axis_name="batch"), 2),
    ("layer_norm", lambda x: jn.layer_norm(x, reduction_axes=(0, 1), feature_axes=1,
                                           axis_name="batch"), 2),
    ("rms_norm", lambda x: jn.rms_norm(x, reduction_axes=(0, 1), feature_axes=1,
                                       axis_name="batch"), 1),
])
def test_all_reduce_count_matches_docs(mesh, name, fn, expected):
  """The number of all-reduces quoted in the `moments`/`batch_norm` docstrings."""
  f = jax.shard_map(fn, mesh=mesh, in_specs=P("batch"), out_specs=P(), check_vma=False)
  assert _count_all_reduces(f, jax.device_put(_data(), NamedSharding(mesh, P("batch")))) == expected


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_sharded_jit_needs_no_axis_name(devices, axis_type):
  """Under jit with the batch sharded over a mesh, XLA inserts the collectives itself."""
  mesh = jax.make_mesh((D,), ("batch",), devices=devices,
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  x, mask = _data(), _uneven_mask()
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("batch")))
  f = jax.jit(_loss_and_grads(_bn()))
  _compare_with_global(f(put(x), put(mask), *_params()), x, mask)


def test_group_statistics_from_a_2d_mesh(devices):
  """Naming the inner axis of a (groups, per_group) mesh gives per-group statistics."""
  mesh = jax.make_mesh((2, 4), ("group", "batch"), devices=devices)
  x, mask = _data(), _uneven_mask()
  f = jax.jit(jax.shard_map(
      lambda x, m: jn.batch_norm(x, jn.init_batch_stats(6), training=True, where=m,
                                 axis_name="batch")[0],
      mesh=mesh, in_specs=P(("group", "batch")), out_specs=P(("group", "batch"))))
  spec = NamedSharding(mesh, P(("group", "batch")))
  y = f(jax.device_put(x, spec), jax.device_put(mask, spec))
  for g in range(2):
    rows = slice(32 * g, 32 * (g + 1))
    y_ref, _ = jn.batch_norm(x[rows], jn.init_batch_stats(6), training=True, where=mask[rows])
    _close(np.asarray(y)[rows], y_ref)


def test_axis_index_groups_under_pmap(devices):
  x = _data()
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  y, _ = jax.pmap(lambda x: jn.batch_norm(x, jn.init_batch_stats(6), training=True,
                                          axis_name="b", axis_index_groups=groups),
                  axis_name="b", devices=devices)(x.reshape(D, -1, 6))
  y = np.asarray(y).reshape(x.shape)
  for g in range(2):
    y_ref, _ = jn.batch_norm(x[32 * g:32 * (g + 1)], jn.init_batch_stats(6), training=True)
    _close(y[32 * g:32 * (g + 1)], y_ref)


def test_axis_index_groups_under_shard_map_is_a_clear_error(mesh):
  f = jax.jit(jax.shard_map(
      lambda x: jn.batch_norm(x, jn.init_batch_stats(6), training=True, axis_name="batch",
                              axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]])[0],
      mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))
  with pytest.raises(ValueError, match="2-D mesh"):
    f(jax.device_put(_data(), NamedSharding(mesh, P("batch"))))


@pytest.mark.parametrize("norm", ["layer", "rms", "group", "instance"])
def test_feature_wise_norms_with_split_reduction_axis(norm):
  """Feature-wise norms whose reduced axis is split across devices (e.g. sequence
  parallelism) equal the unsplit computation; masks leave parts with unequal counts."""
  rng = np.random.default_rng(1)
  x = (5 + rng.standard_normal((2, 16, 8))).astype(np.float32)   # (batch, tokens, channels)
  mask = rng.random((2, 16, 1)) > 0.4
  mask[:, 2:4] = False  # one part entirely masked
  kw = dict(where=mask)
  fns = {
      "layer": lambda x, axis_name=None, **kw: jn.layer_norm(
          x, reduction_axes=(1, 2), feature_axes=2, axis_name=axis_name, **kw),
      "rms": lambda x, axis_name=None, **kw: jn.rms_norm(
          x, reduction_axes=(1, 2), feature_axes=2, axis_name=axis_name, **kw),
      "group": lambda x, axis_name=None, **kw: jn.group_norm(
          x, num_groups=4, axis_name=axis_name, **kw),
      "instance": lambda x, axis_name=None, **kw: jn.instance_norm(
          x, axis_name=axis_name, **kw),
  }
  fn = fns[norm]
  y_ref = fn(x, **kw)
  split = lambda x, m: fn(x, axis_name="seq", where=m)
  y = jax.jit(jax.vmap(split, in_axes=(1, 1), out_axes=1, axis_name="seq"))(
      x.reshape(2, D, 2, 8), mask.reshape(2, D, 2, 1))
  _close(np.asarray(y).reshape(x.shape), y_ref)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_with_jax_distributed(tmp_path):
  """2 local processes x 4 CPU devices: synchronized batch norm over the global mesh
  equals the single-process computation on the global batch."""
  here = os.path.dirname(__file__)
  port, out = _free_port(), tmp_path / "result.npz"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  procs = [subprocess.Popen([sys.executable, os.path.join(here, "_distributed_worker.py"),
                             str(port), str(i), "2", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
  sys.path.insert(0, here)
  from _distributed_data import global_batch
  x, mask = global_batch()
  got = np.load(out)
  y_ref, stats_ref = jn.batch_norm(x, jn.init_batch_stats(x.shape[-1]), training=True,
                                   where=mask, momentum=0.9)
  _close(got["y"], y_ref, tol=1e-4)
  _close(got["mean"], stats_ref.mean, tol=1e-4)
  _close(got["var"], stats_ref.var, tol=1e-4)
