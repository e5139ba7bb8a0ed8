"""Across devices: synchronized vs per-device batch norm under ``jax.shard_map``.

Needs several JAX devices.  On a CPU-only machine, create fake ones before JAX is
first used::

  import jax
  jax.config.update("jax_num_cpu_devices", 8)

(``python -m jaxnorm.experiments devices`` does this for you.)
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm as jn

from . import _common as C
from . import _nets, _train

AXIS = "data"


def _mesh(n_devices: int):
  """A 1-D mesh over ``n_devices`` devices of the default backend, or of the CPU
  backend when the default one (e.g. a single GPU) has fewer."""
  devs = jax.devices()
  if len(devs) < n_devices:
    devs = jax.devices("cpu")
  if len(devs) < n_devices:
    raise RuntimeError(
        f"the devices experiment needs {n_devices} JAX devices but found {len(devs)}. On a "
        f"CPU, run `jax.config.update(\"jax_num_cpu_devices\", {n_devices})` before JAX is "
        "first used (first cell of the notebook / top of the script), or use "
        "`python -m jaxnorm.experiments devices`, which does it.")
  return jax.make_mesh((n_devices,), (AXIS,), devices=devs[:n_devices])


def _put(mesh, a, spec):
  return jax.device_put(a, NamedSharding(mesh, spec))


def _reference(x, scale, w, keep, momentum, epsilon):
  """Float64 NumPy oracle: batch norm of the global batch (mask ``keep``), its running
  averages, and the gradients of ``L = sum(y * w)`` w.r.t. ``x`` and ``scale``."""
  x, scale, w = (np.asarray(a, np.float64) for a in (x, scale, w))
  k = np.broadcast_to(keep, x.shape)
  n = k.sum(0)
  m = np.where(k, x, 0).sum(0) / n
  v = np.where(k, (x - m) ** 2, 0).sum(0) / n
  sd = np.sqrt(v + epsilon)
  xh = (x - m) / sd
  y = xh * scale
  sw, swx = w.sum(0), (w * xh).sum(0)
  gx = scale / sd * (w - k * (sw / n + xh * swx / n))
  return y, momentum * 0 + (1 - momentum) * m, momentum * 1 + (1 - momentum) * v, gx, swx


def exactness(*, n_devices: int = 8, per_device: int = 4, features: int = 6,
              offset: float = 100.0, seed: int = 0, masks: Sequence[bool] = (False, True),
              quick: bool = False) -> C.Table:
  """Batch norm of a batch split over ``n_devices`` against a float64 NumPy oracle
  computed on the whole batch: outputs, running averages and gradients.

  The data have a large common offset (``(offset + N(0, 1)) * per-feature scale``),
  a hard case for the statistics.  Rows: one device holding the global batch;
  synchronized statistics (``axis_name``) under ``shard_map`` and under
  ``vmap(axis_name=...)``; per-device statistics (no ``axis_name``) for contrast;
  each without and with a mask that drops samples from the first devices only
  (unequal counts per device, and the very first sample excluded).  Entries are the
  largest absolute error divided by the largest absolute reference value, in
  float32.
  """
  mesh = _mesh(n_devices)
  rng = np.random.default_rng(seed)
  n = n_devices * per_device
  momentum, epsilon = 0.5, 1e-5
  scales = np.geomspace(0.1, 10.0, features).astype(np.float32)
  x = (offset + rng.standard_normal((n, features)).astype(np.float32)) * scales[None, :]
  w = rng.standard_normal((n, features)).astype(np.float32)
  keep = np.ones((n, 1), bool)
  keep[: n // 2: 3] = False
  stats = jn.init_batch_stats(features)
  scale = rng.uniform(0.5, 1.5, features).astype(np.float32)

  def bn(x, scale, where, axis_name):
    return jn.batch_norm(x, stats, scale, training=True, momentum=momentum, epsilon=epsilon,
                         where=where, axis_name=axis_name)

  def loss(x, scale, w, where, axis_name):
    return jnp.sum(bn(x, scale, where, axis_name)[0] * w)

  def everything(x, scale, w, where, axis_name):
    y, s = bn(x, scale, where, axis_name)
    gx, gs = jax.grad(loss, argnums=(0, 1))(x, scale, w, where, axis_name)
    return y, s.mean, s.var, gx, gs

  rows = []
  jit = functools.partial(C.jit, quick=quick)
  for masked in masks:
    where = keep if masked else None
    ref = _reference(x, scale, w, keep if masked else np.ones_like(keep), momentum, epsilon)
    results = {}
    results["one device, global batch"] = jit(
        functools.partial(everything, axis_name=None))(x, scale, w, where)

    spec_w = P(AXIS) if masked else None
    args = (_put(mesh, x, P(AXIS)), _put(mesh, scale, P()), _put(mesh, w, P(AXIS)),
            None if where is None else _put(mesh, where, P(AXIS)))
    sm = jax.shard_map(functools.partial(everything, axis_name=AXIS), mesh=mesh,
                       in_specs=(P(AXIS), P(), P(AXIS), spec_w),
                       out_specs=(P(AXIS), P(), P(), P(AXIS), P()))
    results["shard_map + axis_name (sync)"] = jit(sm)(*args)

    # vmap(axis_name) over a leading device axis, on one device.  Each member's
    # gradient w.r.t. the shared scale is its share: the total is their sum.
    split = lambda a: None if a is None else a.reshape((n_devices, per_device) + a.shape[1:])
    vm = jax.vmap(functools.partial(everything, axis_name=AXIS), axis_name=AXIS,
                  in_axes=(0, None, 0, None if where is None else 0))
    y, mu, var, gx, gs = jit(vm)(split(x), scale, split(w), split(where))
    results["vmap + axis_name (sync)"] = (y.reshape(n, -1), mu[0], var[0], gx.reshape(n, -1),
                                          gs.sum(0))

    # per-device statistics (no axis_name); running averages averaged over devices
    def pd_fn(*a):
      y, mu, var, gx, gs = everything(*a, axis_name=None)
      return y, mu[None], var[None], gx, gs

    pd = jax.shard_map(pd_fn, mesh=mesh, in_specs=(P(AXIS), P(), P(AXIS), spec_w),
                       out_specs=(P(AXIS), P(AXIS), P(AXIS), P(AXIS), P()))
    y, mu, var, gx, gs = jit(pd)(*args)
    results["shard_map, no axis_name (per-device)"] = (y, mu.mean(0), var.mean(0), gx, gs)

    for name, got in results.items():
      errs = [np.max(np.abs(np.asarray(g, np.float64) - r)) / np.max(np.abs(r))
              for g, r in zip(got, ref)]
      rows.append([name, "yes" if masked else "no"] + [f"{e:.1e}" for e in errs])
  return C.Table(["method", "mask", "y", "running mean", "running var", "dL/dx", "dL/dscale"],
                 rows, title=f"Relative error vs a float64 oracle on the global batch: BN over "
                             f"{n_devices} devices x {per_device} samples (float32, data = "
                             f"({offset:g} + N(0,1)) x scale)")


@functools.lru_cache(maxsize=None)
def _dp_program(model, mesh, chunk: int, momentum: float, sync: bool, quick: bool):
  """A data-parallel training chunk under ``shard_map``; parameters replicated,
  minibatch indices sharded over devices; vmapped over seeds."""
  axis_name = AXIS if sync else None
  n_dev = mesh.shape[AXIS]

  def local_loss(params, state, x, y):
    logits, new_state = model.apply(params, state, x, training=True, axis_name=axis_name)
    logp = jax.nn.log_softmax(logits)
    total = -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1))
    # this device's share of the global mean; jax.grad w.r.t. the replicated
    # parameters sums the shares over devices (the transpose of the implicit pvary).
    return total / (x.shape[0] * n_dev), new_state

  def step(carry, idx, lr, xtr, ytr):
    params, state, vel = carry
    (loss, state), g = jax.value_and_grad(local_loss, has_aux=True)(params, state, xtr[idx],
                                                                     ytr[idx])
    if not sync:  # per-device running averages differ: average them (Flax's usual recipe)
      state = lax.pmean(state, AXIS)
    vel = jax.tree.map(lambda v, gi: momentum * v + gi, vel, g)
    params = jax.tree.map(lambda p, v: p - lr * v, params, vel)
    return (params, state, vel), lax.psum(loss, AXIS)

  def chunk_fn(params, state, vel, idx, lr, xtr, ytr):
    def one_seed(params, state, vel, idx):
      carry, losses = lax.scan(lambda c, i: step(c, i, lr, xtr, ytr), (params, state, vel), idx)
      return carry + (losses.mean(),)
    return jax.vmap(one_seed)(params, state, vel, idx)

  sm = jax.shard_map(chunk_fn, mesh=mesh,
                     in_specs=(P(), P(), P(), P(None, None, AXIS), P(), P(), P()),
                     out_specs=(P(), P(), P(), P()))
  return C.jit(sm, quick=quick)


def devices(*, n_devices: int = 8, per_device_batch: Sequence[int] = (2, 4, 16), seeds=5,
            steps: int = 300, eval_every: int = 100, lr: float = 0.1, momentum: float = 0.9,
            hidden: Sequence[int] = (64, 64, 64), exact_tol: float = 1e-5, quick: bool = False,
            progress: bool = True) -> C.Result:
  """Synchronized vs per-device batch norm, data-parallel over ``n_devices``.

  1. Exactness (:func:`exactness`): synchronized BN under ``shard_map`` and
     ``vmap(axis_name)`` against the global batch on one device.
  2. Training: the same ReLU MLP with BN, data-parallel over the devices with
     ``per_device_batch`` samples per device, with statistics synchronized across
     devices (``axis_name``) or per device (none; running averages averaged across
     devices after every step).  Gradients are exact global-batch gradients in both
     cases.  Reports test accuracy (evaluation mode) and the train/eval gap
     (training mode uses statistics over the batch each device saw: the global
     batch for synchronized BN, ``per_device_batch`` samples otherwise).

  Claims tested: synchronized BN equals BN on the global batch; with small
  per-device batches per-device BN loses accuracy and synchronizing recovers it.
  """
  if quick:
    per_device_batch, seeds, steps, eval_every, hidden = (2,), 2, 20, 20, (16,)
  t0 = time.time()
  mesh = _mesh(n_devices)
  t_exact = exactness(n_devices=n_devices, masks=(True,) if quick else (False, True),
                      quick=quick)
  data = C.load_digits()
  seeds = C.seeds_list(seeds)
  model = _nets.MLP(sizes=(64,) + tuple(hidden) + (10,), norm="batch")
  bar = C.progress_bar(steps * 2 * len(per_device_batch), "devices", progress)
  eval_acc = {"sync": [], "per-device": []}
  gap = {"sync": [], "per-device": []}
  loss = {"sync": [], "per-device": []}
  rep = lambda t: jax.tree.map(lambda a: _put(mesh, a, P()), t)
  xtr, ytr = rep(jnp.asarray(data.x_train)), rep(jnp.asarray(data.y_train))
  for b in per_device_batch:
    gb = b * n_devices
    idx_all = np.stack([_train.batch_indices(s, len(data.x_train), steps, gb) for s in seeds])
    for mode in ("sync", "per-device"):
      bar.set_postfix_str(f"{mode} b={b}")
      run = _dp_program(model, mesh, eval_every, float(momentum), mode == "sync", quick)
      params, state, vel, _ = jax.tree.map(lambda a: a[:, 0], _train.init_carry(model, seeds, 1))
      params, state, vel = rep(params), rep(state), rep(vel)
      lr_ = rep(jnp.asarray(lr, jnp.float32))
      for c in range(steps // eval_every):
        idx = _put(mesh, jnp.asarray(idx_all[:, c * eval_every:(c + 1) * eval_every]),
                   P(None, None, AXIS))
        params, state, vel, l = run(params, state, vel, idx, lr_, xtr, ytr)
        bar.update(eval_every)
      params, state = jax.device_get((params, state))
      stat_batch = gb if mode == "sync" else b
      f = lambda p, s: (_train.evaluate(model, p, s, data.x_test, data.y_test)[0],
                        *_train.train_eval_accuracy(model, p, s, data.x_test, data.y_test,
                                                    batch_size=stat_batch))
      ev, t_mode, e_mode = C.jit(jax.vmap(f), quick=quick)(params, state)
      eval_acc[mode].append(np.asarray(ev))
      gap[mode].append(np.asarray(t_mode) - np.asarray(e_mode))
      loss[mode].append(np.asarray(l))
  bar.close()
  eval_acc = {k: np.stack(v, 1) for k, v in eval_acc.items()}  # (S, P)
  gap = {k: np.stack(v, 1) for k, v in gap.items()}
  rows = [[str(b), str(b * n_devices), C.pm(eval_acc["sync"][:, i], scale=100),
           C.pm(eval_acc["per-device"][:, i], scale=100), C.pm(gap["sync"][:, i], scale=100),
           C.pm(gap["per-device"][:, i], scale=100)] for i, b in enumerate(per_device_batch)]
  t_train = C.Table(["per-device batch", "global batch", "sync BN test acc (%)",
                     "per-device BN test acc (%)", "sync train/eval gap (pts)",
                     "per-device train/eval gap (pts)"], rows,
                    title=f"Data-parallel training on {n_devices} devices, {steps} steps, "
                          f"mean ± std over {len(seeds)} seeds")

  err = lambda pred: max(float(c) for r in t_exact.rows if pred(r[0]) for c in r[2:])
  worst_sync, worst_one = err(lambda m: "sync" in m), err(lambda m: "one device" in m)
  worst_pd = err(lambda m: "per-device" in m)
  verdicts = [C.Verdict(
      "Synchronized BN (axis_name) equals BN on the global batch, masks and gradients included",
      C.HELD if worst_sync < exact_tol else C.NOT_HELD,
      f"largest relative error vs the float64 oracle over outputs, running averages and "
      f"gradients (shard_map and vmap, with and without a mask): sync {worst_sync:.1e} (held "
      f"if below {exact_tol:.0e}, stated in advance; a deterministic float32 check, no seeds: "
      f"float32 rounding is ~1e-7); one device holding the global batch {worst_one:.1e}; "
      f"per-device statistics {worst_pd:.1e}")]
  b0 = per_device_batch[0]
  verdicts.append(C.decide(
      f"With small per-device batches (b={b0}) per-device BN loses accuracy and synchronized "
      f"BN recovers it", eval_acc["sync"][:, 0] - eval_acc["per-device"][:, 0],
      quantity=f"test accuracy at b={b0}, sync minus per-device", threshold=0.02, scale=100,
      unit=" pts",
      context="mean difference " + ", ".join(
          f"{d * 100:+.1f} pts at b={b}" for d, b in
          zip(eval_acc["sync"].mean(0) - eval_acc["per-device"].mean(0), per_device_batch))
      + f"; train/eval gap at b={b0}: sync {gap['sync'][:, 0].mean() * 100:+.1f} pts, "
        f"per-device {gap['per-device'][:, 0].mean() * 100:+.1f} pts"))
  config = dict(n_devices=n_devices, per_device_batch=list(per_device_batch), seeds=seeds,
                steps=steps, lr=lr, momentum=momentum, hidden=list(hidden), quick=quick)
  from . import _plots
  return C.Result("devices", config, {"training": t_train, "exactness": t_exact}, verdicts,
                  dict(eval_acc=eval_acc, gap=gap), time.time() - t0, _plots.plot_devices)
