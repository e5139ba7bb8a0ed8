"""Internal covariate shift vs loss-landscape smoothness (Santurkar et al., 2018)."""

from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import _common as C
from . import _nets, _train

QUANTILES = tuple(np.linspace(0.1, 0.9, 9))


def _norm2(tree) -> jax.Array:
  return sum(jnp.sum(a.astype(jnp.float32) ** 2) for a in jax.tree.leaves(tree))


def _landscape_probe(model, params, state, lr, key, xtr, ytr, xte, yte, *, multipliers,
                     probe_batch):
  """All measurements at one checkpoint (inside the jitted program).

  * ``quantiles`` (layers, units, 9) and ``unit_std`` (layers, units): the
    distribution over the test set of every hidden layer's output, i.e. the input
    of the next layer, in training mode (with this step's noise for noisy BN).
  * ``ics_rel``, ``ics_cos`` (layers - 1,): Santurkar et al.'s ICS of layer i:
    ``G_i`` the gradient of layer i's weights; ``G'_i`` the same after an SGD step
    (learning rate ``lr``) of the layers before i only.  Reported as
    ``||G_i - G'_i|| / ||G_i||`` and ``cos(G_i, G'_i)``.
  * ``loss_range``, ``grad_change``, ``beta`` and ``pred_ratio``: along the
    gradient ``g`` at steps ``eta = lr * multipliers``: max-min of the loss
    (including eta = 0), ``max ||g(θ - ηg) - g||``, ``max ||g(θ - ηg) - g|| / ||ηg||``
    (effective β-smoothness), and the loss decrease of a step of size ``lr``
    divided by its first-order prediction ``lr ||g||^2`` (1 = the gradient
    predicts the loss change exactly).

  Everything uses a fixed batch (the first ``probe_batch`` training samples) in
  training mode with one noise draw, so only the parameters change between
  evaluations.
  """
  del yte
  kd, kl = jax.random.split(jax.random.fold_in(key, 12345))
  _, _, (_, hs) = model.apply(params, state, xte, training=True, key=kd, capture=True)
  qs = jnp.asarray(QUANTILES, jnp.float32)
  out = {"quantiles": jnp.stack([jnp.quantile(h, qs, axis=0).T for h in hs]),
         "unit_std": jnp.stack([h.std(axis=0) for h in hs])}

  x, y = xtr[:probe_batch], ytr[:probe_batch]
  loss = lambda p: _train.loss_fn(model, p, state, x, y, kl)[0]
  vg = jax.value_and_grad(loss)
  l0, g = vg(params)
  gn2 = _norm2(g)

  # Santurkar et al.'s ICS, one layer at a time (layer 0 has no predecessor).
  rel, cos = [], []
  for i in range(1, len(params)):
    moved = tuple(jax.tree.map(lambda a, b: a - lr * b, params[j], g[j]) if j < i else params[j]
                  for j in range(len(params)))
    gi = jax.grad(loss)(moved)[i]["w"]
    g0 = g[i]["w"]
    d = jnp.sqrt(jnp.sum((gi - g0) ** 2))
    n0 = jnp.sqrt(jnp.sum(g0 ** 2))
    rel.append(d / n0)
    cos.append(jnp.sum(gi * g0) / (n0 * jnp.sqrt(jnp.sum(gi ** 2))))
  out["ics_rel"], out["ics_cos"] = jnp.stack(rel), jnp.stack(cos)

  etas = lr * jnp.asarray(multipliers, jnp.float32)

  def along(eta):
    p = jax.tree.map(lambda a, b: a - eta * b, params, g)
    lv, gv = vg(p)
    return lv, jnp.sqrt(_norm2(jax.tree.map(lambda a, b: a - b, gv, g)))

  ls, dg = jax.vmap(along)(etas)
  out["loss_range"] = jnp.maximum(ls.max(), l0) - jnp.minimum(ls.min(), l0)
  out["grad_change"] = dg.max()
  out["beta"] = jnp.max(dg / (etas * jnp.sqrt(gn2)))
  l_lr, _ = vg(jax.tree.map(lambda a, b: a - lr * b, params, g))
  out["pred_ratio"] = (l0 - l_lr) / (lr * gn2)
  return out


@functools.lru_cache(maxsize=None)
def _probe(multipliers: tuple, probe_batch: int):
  return functools.partial(_landscape_probe, multipliers=multipliers, probe_batch=probe_batch)


def _shift(quantiles: np.ndarray, unit_std: np.ndarray) -> np.ndarray:
  """Distribution shift between consecutive evaluations, per layer.

  For every unit, the 1-Wasserstein distance between its distributions at two
  consecutive evaluations (approximated by the mean absolute difference of 9
  quantiles), averaged over units and divided by the layer's mean unit std at the
  earlier evaluation: scale-free, comparable across networks.
  (..., E, layers, units, 9) -> (..., E - 1, layers).
  """
  w1 = np.abs(np.diff(quantiles, axis=-4)).mean(axis=(-1, -2))
  scale = unit_std[..., :-1, :, :].mean(axis=-1)
  return w1 / (scale + 1e-6)


def smoothness(*, variants: Sequence[str] = ("none", "batch", "batch+noise"), lr: float = 0.1,
               seeds=5, steps: int = 600, eval_every: int = 30, batch_size: int = 64,
               hidden: Sequence[int] = (64, 64, 64, 64), noise: float = 0.5,
               multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0), probe_batch: int = 256,
               target: float = 0.95, tie: float = 0.01, quick: bool = False,
               progress: bool = True) -> C.Result:
  """Santurkar et al. (2018) on the digits: does BN work by reducing internal
  covariate shift, or by making the loss landscape smoother?

  A ReLU MLP trained with plain SGD at the same learning rate without BN, with
  BN, and with "noisy BN" (BN followed by a random per-unit scale and shift that
  is redrawn at every step, which makes every layer's input distribution move on
  purpose).  At every evaluation :func:`_landscape_probe` measures the movement of
  each layer's input distribution, Santurkar et al.'s gradient-based ICS, and the
  smoothness of the loss along the gradient.

  Claims tested (95% t-intervals over seeds, see :func:`jaxnorm.experiments.decide`):
  BN reduces the movement of layer input distributions; BN reduces ICS as Santurkar
  et al. define it; reducing ICS is why BN helps (tested with noisy BN: more shift
  than no normalization, yet accuracy within ``tie`` or better, refutes it); BN makes
  the loss landscape smoother (log ratios none / BN of three measures, > 0).
  """
  if quick:
    variants = tuple(v for v in variants if v in ("none", "batch")) or variants
    seeds, steps, eval_every, hidden, multipliers, probe_batch = 2, 40, 20, (16,), (0.5, 2.0), 64
  t0 = time.time()
  data = C.load_digits()
  seeds = C.seeds_list(seeds)
  sizes = (64,) + tuple(hidden) + (10,)
  probe = _probe(tuple(float(m) for m in multipliers), int(probe_batch))
  bar = C.progress_bar(steps * len(variants), "smoothness", progress)
  m = {}
  for v in variants:
    bar.set_postfix_str(_nets.label(v))
    norm = "none" if v == "none" else "batch"
    model = _nets.MLP(sizes=sizes, norm=norm, noise=noise if v == "batch+noise" else 0.0)
    h = _train.train(model, data, seeds=seeds, lrs=[lr], steps=steps, batch_size=batch_size,
                     eval_every=eval_every, probe=probe, bar=bar, quick=quick)
    m[v] = {k: a[:, 0] for k, a in h.metrics.items()}  # (S, E, ...)
    steps_axis = h.steps
  bar.close()

  shift = {v: _shift(m[v]["quantiles"], m[v]["unit_std"]) for v in variants}  # (S, E-1, layers)
  reach = {v: C.first_reach(steps_axis, m[v]["test_acc"], target) for v in variants}
  summary = {}
  for v in variants:
    summary[v] = dict(
        acc=m[v]["test_acc"][:, -1], reach=reach[v],
        shift=shift[v].mean(axis=(1, 2)),  # per seed
        ics_rel=m[v]["ics_rel"].mean(axis=(1, 2)), ics_cos=m[v]["ics_cos"].mean(axis=(1, 2)),
        loss_range=np.median(m[v]["loss_range"], axis=1),
        grad_change=np.median(m[v]["grad_change"], axis=1),
        beta=np.median(m[v]["beta"], axis=1), pred_ratio=np.median(m[v]["pred_ratio"], axis=1))
  cols = ["net", "test acc (%)", f"steps to {target:.0%}", "input shift", "ICS ||G-G'||/||G||",
          "ICS cos(G,G')", "loss range", "grad change", "β-smoothness", "actual/predicted Δloss"]
  rows = [[_nets.label(v), C.pm(s["acc"], scale=100), C.median_steps(s["reach"]),
           C.pm(s["shift"], digits=3), C.pm(s["ics_rel"], digits=3),
           C.pm(s["ics_cos"], digits=3), C.pm(s["loss_range"], digits=3),
           C.pm(s["grad_change"], digits=3), C.pm(s["beta"], digits=2),
           C.pm(s["pred_ratio"], digits=2)] for v, s in summary.items()]
  table = C.Table(cols, rows, title=(
      f"{len(hidden)}x{hidden[0]} ReLU MLP, SGD lr={lr:g}, {steps} steps; shift and ICS: mean "
      f"over layers and training; landscape: median over training; mean ± std over "
      f"{len(seeds)} seeds"))
  per_layer = C.Table(
      ["net"] + [f"layer {i + 1} shift" for i in range(len(hidden))],
      [[_nets.label(v)] + [C.pm(shift[v][:, :, i].mean(1), digits=3) for i in range(len(hidden))]
       for v in variants], title="Input-distribution shift per layer (input of layer i+1)")

  verdicts = []
  mean = lambda v, k: float(np.mean(summary[v][k]))

  def log_ratio(a, b, k):  # per seed log10(a / b) of summary key k
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.log10(np.asarray(summary[a][k]) / np.asarray(summary[b][k]))

  if "none" in variants and "batch" in variants:
    sn, sb = mean("none", "shift"), mean("batch", "shift")
    verdicts.append(C.decide(
        "BN reduces the movement of each layer's input distribution",
        log_ratio("none", "batch", "shift"),
        quantity="log10(input shift without BN / with BN)",
        context=f"mean input shift between evaluations: BN {sb:.3g} vs none {sn:.3g}"))
    inb, inn = mean("batch", "ics_rel"), mean("none", "ics_rel")
    verdicts.append(C.decide(
        "BN reduces internal covariate shift as Santurkar et al. define it (the change of a "
        "layer's gradient caused by updating the layers before it)",
        log_ratio("none", "batch", "ics_rel"),
        quantity="log10(||G - G'|| / ||G|| without BN / with BN)",
        context=f"||G - G'|| / ||G||: BN {inb:.3g} vs none {inn:.3g}; cos(G, G'): BN "
                f"{mean('batch', 'ics_cos'):.3f} vs none {mean('none', 'ics_cos'):.3f}"))
    if "batch+noise" in variants:
      sz = mean("batch+noise", "shift")
      az, an, ab = (mean("batch+noise", "acc"), mean("none", "acc"), mean("batch", "acc"))
      more = C.decide(
          "noisy BN moves the layer inputs more than no normalization",
          log_ratio("batch+noise", "none", "shift"),
          quantity="log10(input shift of noisy BN / without normalization)",
          context=f"{sz:.3g} vs {sn:.3g}")
      well = C.decide(
          f"noisy BN trains as well as no normalization (within {tie * 100:.0f} pts)",
          summary["batch+noise"]["acc"] - summary["none"]["acc"],
          quantity="test accuracy, noisy BN minus none", threshold=-tie, scale=100,
          unit=" pts", context=f"noisy BN {az * 100:.1f}%, none {an * 100:.1f}%, BN "
                               f"{ab * 100:.1f}%")
      # the claim predicts: more shift -> worse training.  Refuted when noisy BN has more
      # shift and still trains as well; supported when it has more shift and trains worse.
      if more.status == C.HELD and well.status == C.HELD:
        status = C.NOT_HELD
      elif more.status == C.HELD and well.status == C.NOT_HELD:
        status = C.HELD
      else:
        status = C.INCONCLUSIVE
      verdicts.append(C.Verdict(
          "BN helps because it reduces internal covariate shift", status,
          f"did not hold if noisy BN has more input shift than no normalization and still "
          f"trains as well, held if it has more and trains worse, else inconclusive: "
          f"[{more.status}] {more.claim}: {more.evidence}; [{well.status}] {well.claim}: "
          f"{well.evidence}; median steps to {target:.0%}: noisy BN "
          f"{C.fmt(float(np.median(reach['batch+noise'])))}, none "
          f"{C.fmt(float(np.median(reach['none'])))}, BN {C.fmt(float(np.median(reach['batch'])))}",
          parts=[more, well]))
    keys = ("loss_range", "grad_change", "beta")
    verdicts.append(C.combine(
        "BN makes the loss landscape smoother (Santurkar et al.)",
        [C.decide(f"BN has a smaller {k.replace('_', ' ')}", log_ratio("none", "batch", k),
                  quantity=f"log10({k.replace('_', ' ')} without BN / with BN), medians over "
                           "training", context=f"BN {mean('batch', k):.3g} vs none "
                                               f"{mean('none', k):.3g}")
         for k in keys],
        context=f"actual/predicted loss decrease at the training lr: BN "
                f"{mean('batch', 'pred_ratio'):.2f} vs none {mean('none', 'pred_ratio'):.2f}"))
  config = dict(variants=list(variants), lr=lr, seeds=seeds, steps=steps, batch_size=batch_size,
                hidden=list(hidden), noise=noise, multipliers=list(multipliers),
                probe_batch=probe_batch, target=target, tie=tie, quick=quick)
  data_out = dict(steps=steps_axis, shift=shift, test_acc={v: m[v]["test_acc"] for v in variants},
                  **{k: {v: m[v][k] for v in variants}
                     for k in ("loss_range", "grad_change", "beta", "pred_ratio", "ics_rel",
                               "ics_cos", "quantiles")})
  from . import _plots
  return C.Result("smoothness", config, {"smoothness": table, "per_layer": per_layer}, verdicts,
                  data_out, time.time() - t0, _plots.plot_smoothness)
