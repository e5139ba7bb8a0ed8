"""Convergence and learning rate; and Ioffe & Szegedy's MNIST figure on the digits."""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import _common as C
from . import _nets, _train


def usable_runs(final_acc, final_loss, target: float) -> np.ndarray:
  """Which runs ended trained: final test accuracy ``>= target`` and a finite final loss
  (elementwise).  A learning rate is *usable* when every seed's run ended trained,
  ``usable_runs(...).all(axis=0)`` over seeds; one diverged seed makes it unusable."""
  acc = np.nan_to_num(np.asarray(final_acc, np.float64), nan=0.0)
  return (acc >= target) & np.isfinite(np.asarray(final_loss, np.float64))


def diverged_runs(final_acc, final_loss, *, chance: float = 0.2) -> np.ndarray:
  """Which runs diverged: a non-finite final loss or a final accuracy below ``chance``."""
  acc = np.nan_to_num(np.asarray(final_acc, np.float64), nan=0.0)
  return (acc < chance) | ~np.isfinite(np.asarray(final_loss, np.float64))


def seed_max_lr(trained, lrs) -> np.ndarray:
  """Per seed, log10 of the largest learning rate at which that seed ended trained
  (``trained``: (S, L)); a seed trained at none counts one sweep step below the smallest
  rate (``lrs[0]**2 / lrs[1]``)."""
  lrs = np.asarray(lrs, np.float64)
  below = lrs[0] ** 2 / lrs[1] if len(lrs) > 1 else lrs[0] / 3
  out = np.full(trained.shape[0], np.log10(below))
  for s in range(trained.shape[0]):
    ok = np.flatnonzero(trained[s])
    if ok.size:
      out[s] = np.log10(lrs[ok].max())
  return out


def _usable(s, lrs):
  return [lr for lr in lrs if lr in s["ok"]]


def _higher_lr_verdict(claim, norm, summ, lrs, target):
  d = summ[norm]["seed_max_lr"] - summ["none"]["seed_max_lr"]
  return C.decide(
      claim, d, quantity=f"log10 of the largest lr at which a seed ends at ≥ {target:.0%}, "
      f"{_nets.label(norm)} minus none (paired by seed; 0.5 = one step of the sweep)",
      threshold=0.0,
      context=f"usable lrs (every seed trained): {_nets.label(norm)} "
              f"{_lrs_str(summ[norm], lrs, True)}, none {_lrs_str(summ['none'], lrs, True)}")


def _lrs_str(s, lrs, braces=False):
  ok = _usable(s, lrs)
  if braces:
    return "{" + ", ".join(f"{lr:g}" for lr in ok) + "}"
  return ", ".join(f"{lr:g}" for lr in ok) if ok else "none"


def convergence(*, norms: Sequence[str] = ("none", "batch", "layer", "group", "rms"),
                lrs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0), seeds=10,
                steps: int = 500, batch_size: int = 64, eval_every: int = 25,
                hidden: Sequence[int] = (100, 100, 100), activation: str = "relu",
                target: float = 0.96, quick: bool = False, progress: bool = True) -> C.Result:
  """Same MLP with each normalizer, over a learning-rate sweep and several seeds.

  Plain SGD on minibatches of ``batch_size``; accuracy on the held-out test set
  (evaluation mode) every ``eval_every`` steps.  Reports the final accuracy, the
  steps to reach ``target`` test accuracy, and the usable learning rates: those at
  which every seed ends at ``target`` or above with a finite loss
  (:func:`usable_runs`).

  Claims tested (each a paired difference over seeds with its 95% t-interval, see
  :func:`jaxnorm.experiments.decide`): BN speeds up convergence (steps to ``target``,
  none minus BN, > 0); BN allows higher learning rates (log10 of each seed's largest
  trained lr, BN minus none, > 0); so do LN, GN and RMSNorm.
  """
  if quick:
    lrs, seeds, steps, eval_every, hidden = lrs[1::2], 2, 40, 20, (16,)
    norms = tuple(norms[:2])
  t0 = time.time()
  data = C.load_digits()
  seeds = C.seeds_list(seeds)
  sizes = (64,) + tuple(hidden) + (10,)
  bar = C.progress_bar(steps * len(norms), "convergence", progress)
  acc, loss, tloss = {}, {}, {}
  for norm in norms:
    bar.set_postfix_str(_nets.label(norm))
    model = _nets.MLP(sizes=sizes, norm=norm, activation=activation)
    h = _train.train(model, data, seeds=seeds, lrs=lrs, steps=steps, batch_size=batch_size,
                     eval_every=eval_every, bar=bar, quick=quick)
    acc[norm], loss[norm], tloss[norm] = (h.metrics["test_acc"], h.metrics["train_loss"],
                                          h.metrics["test_loss"])
    steps_axis = h.steps
  bar.close()

  reach = {n: C.first_reach(steps_axis, acc[n], target) for n in norms}  # (S, L)
  final = {n: acc[n][:, :, -1] for n in norms}  # (S, L)
  trained = {n: usable_runs(final[n], loss[n][:, :, -1], target) for n in norms}  # (S, L)
  n_seeds = len(seeds)
  # steps to target with "never" censored at one evaluation past the budget (per seed)
  censored = {n: np.where(np.isfinite(reach[n]), reach[n], steps + eval_every) for n in norms}

  lr_cols = [f"lr={lr:g}" for lr in lrs]
  t_acc = C.Table(["norm"] + lr_cols, [
      [_nets.label(n)] + [C.pm(final[n][:, j], scale=100) for j in range(len(lrs))]
      for n in norms], title=f"Final test accuracy (%) after {steps} steps, mean ± std over "
                             f"{n_seeds} seeds")
  t_steps = C.Table(["norm"] + lr_cols, [
      [_nets.label(n)] + [C.median_steps(reach[n][:, j]) for j in range(len(lrs))]
      for n in norms], title=f"Steps to {target:.0%} test accuracy: median over seeds "
                             f"(seeds that got there)")

  def summary(n):
    mean_final = np.nan_to_num(final[n].mean(0), nan=0.0)
    best = int(np.argmax(mean_final))
    fastest = int(np.argmin(np.median(censored[n], axis=0)))
    ok = [lr for j, lr in enumerate(lrs) if trained[n][:, j].all()]
    diverged = [lr for j, lr in enumerate(lrs) if diverged_runs(final[n][:, j],
                                                                  loss[n][:, j, -1]).any()]
    return dict(best_lr=lrs[best], best_acc=final[n][:, best], fastest_lr=lrs[fastest],
                fastest_j=fastest, fastest=np.median(censored[n][:, fastest]),
                ok=ok, max_ok=max(ok) if ok else None, min_ok=min(ok) if ok else None, n_ok=len(ok),
                diverged=diverged, seed_max_lr=seed_max_lr(trained[n], lrs))

  summ = {n: summary(n) for n in norms}
  never = steps + eval_every
  t_sum = C.Table(
      ["norm", "best lr", "test acc at best lr (%, 95% CI)", f"fewest steps to {target:.0%} (lr)",
       f"usable lrs (every seed ≥ {target:.0%} at the end)", "lrs where a seed diverged"],
      [[_nets.label(n), f"{s['best_lr']:g}", C.ci(s["best_acc"], scale=100, clip=(0, 100)),
        (f"{s['fastest']:.0f} ({s['fastest_lr']:g})" if s["fastest"] < never
         else "never"),
        f"{_lrs_str(s, lrs)} ({s['n_ok']}/{len(lrs)})",
        ", ".join(f"{lr:g}" for lr in s["diverged"]) or "none"]
       for n, s in summ.items()],
      title=f"Summary per normalizer ({n_seeds} seeds; a learning rate is usable when every "
            f"seed ends at ≥ {target:.0%} test accuracy with a finite loss)")

  verdicts = []
  if "none" in norms and "batch" in norms:
    b, o = summ["batch"], summ["none"]
    d_steps = censored["none"][:, o["fastest_j"]] - censored["batch"][:, b["fastest_j"]]
    verdicts.append(C.decide(
        "Batch norm speeds up convergence", d_steps,
        quantity=f"steps to {target:.0%} without normalization minus with BN, each at its "
                 f"fastest lr (none {o['fastest_lr']:g}, BN {b['fastest_lr']:g}; a seed that "
                 f"never gets there counts {never})",
        threshold=0.0, unit=" steps"))
    verdicts.append(_higher_lr_verdict("Batch norm allows higher learning rates", "batch",
                                       summ, lrs, target))
    others = [n for n in norms if n not in ("none", "batch")]
    if others:
      verdicts.append(C.combine(
          "The per-sample normalizers (" + ", ".join(_nets.label(n) for n in others)
          + ") also widen the usable learning-rate range",
          [_higher_lr_verdict(f"{_nets.label(n)} allows higher learning rates", n, summ, lrs,
                              target) for n in others]))

  config = dict(norms=list(norms), lrs=list(lrs), seeds=seeds, steps=steps,
                batch_size=batch_size, hidden=list(hidden), activation=activation,
                target=target, optimizer="SGD", quick=quick)
  data_out = dict(steps=steps_axis, test_acc=acc, train_loss=loss, test_loss=tloss, reach=reach,
                  usable={n: trained[n].all(0) for n in norms})
  from . import _plots
  return C.Result("convergence", config, {"summary": t_sum, "final_accuracy": t_acc,
                                          "steps_to_target": t_steps},
                  verdicts, data_out, time.time() - t0, _plots.plot_convergence)


def _sigmoid_inputs(model, params, state, lr, key, xtr, ytr, xte, yte):
  """{15, 50, 85}th percentiles over the test set of the input of every sigmoid of the
  last hidden layer (after batch norm when there is one), in evaluation mode."""
  del lr, key, xtr, ytr, yte
  h = xte
  for i in range(model.n_hidden):
    p = params[i]
    z = h @ p["w"] + p["b"][None, :]
    z, _ = _nets.apply_norm(model.norm, z, p["norm"], state[i], training=False,
                            momentum=model.momentum, groups=model.groups)
    h = jax.nn.sigmoid(z)
  q = jnp.percentile(z, jnp.array([15.0, 50.0, 85.0]), axis=0)  # (3, units)
  return {"sigmoid_input_percentiles": q.T}


def ioffe_szegedy(*, lrs: Sequence[float] = (0.3, 1.0, 3.0), seeds=8, steps: int = 2000,
                  batch_size: int = 60, eval_every: int = 50, early_fraction: float = 0.1,
                  quick: bool = False, progress: bool = True) -> C.Result:
  """Ioffe & Szegedy (2015), Figure 1, on the digits: 3 fully connected hidden layers
  of 100 sigmoid units, with and without batch norm, minibatches of 60, plain SGD.

  Measures test accuracy over training and the {15, 50, 85}th percentiles of the
  input to every last-layer sigmoid over training (Figure 1 b, c).  The input
  distribution's movement ("drift") is the distance of those percentiles from
  their values at the end of training, averaged over the evaluations, the units and
  the three percentiles: how far, on average, the distribution a sigmoid saw during
  training was from the one it ends with (in units of the sigmoid's input).
  """
  if quick:
    lrs, seeds, steps, eval_every = lrs[:1], 2, 40, 20
  t0 = time.time()
  data = C.load_digits()
  seeds = C.seeds_list(seeds)
  norms = ("none", "batch")
  bar = C.progress_bar(steps * 2, "ioffe-szegedy", progress)
  acc, pct = {}, {}
  for norm in norms:
    bar.set_postfix_str(_nets.label(norm))
    model = _nets.MLP(sizes=(64, 100, 100, 100, 10), norm=norm, activation="sigmoid")
    h = _train.train(model, data, seeds=seeds, lrs=lrs, steps=steps, batch_size=batch_size,
                     eval_every=eval_every, probe=_sigmoid_inputs, bar=bar, quick=quick)
    acc[norm], pct[norm] = h.metrics["test_acc"], h.metrics["sigmoid_input_percentiles"]
    steps_axis = h.steps
  bar.close()

  e_early = max(0, int(round(early_fraction * len(steps_axis))) - 1)
  # mean distance from the final percentiles: (S, L, E, units, 3) -> (S, L)
  drift = {n: np.abs(pct[n] - pct[n][:, :, -1:]).mean(axis=(2, 3, 4)) for n in norms}
  rows = []
  for j, lr in enumerate(lrs):
    for n in norms:
      rows.append([f"{lr:g}", _nets.label(n),
                   C.pm(acc[n][:, j, e_early], scale=100),
                   C.pm(acc[n][:, j, -1], scale=100),
                   C.pm(drift[n][:, j], digits=2)])
  table = C.Table(["lr", "net", f"test acc at step {steps_axis[e_early]} (%)",
                   f"test acc at step {steps} (%)", "sigmoid-input percentile drift"], rows,
                  title=f"3x100 sigmoid MLP, batch {batch_size}, mean ± std over "
                        f"{len(seeds)} seeds")

  step_e = steps_axis[e_early]
  faster, higher, steadier = [], [], []
  for j, lr in enumerate(lrs):
    faster.append(C.decide(
        f"lr {lr:g}: BN is ahead at step {step_e}",
        acc["batch"][:, j, e_early] - acc["none"][:, j, e_early],
        quantity=f"test accuracy at step {step_e}, BN minus none", scale=100, unit=" pts"))
    higher.append(C.decide(
        f"lr {lr:g}: BN ends higher", acc["batch"][:, j, -1] - acc["none"][:, j, -1],
        quantity=f"test accuracy at step {steps}, BN minus none", scale=100, unit=" pts"))
    with np.errstate(divide="ignore", invalid="ignore"):
      log_ratio = np.log10(drift["none"][:, j] / drift["batch"][:, j])
    steadier.append(C.decide(
        f"lr {lr:g}: BN's sigmoid inputs drift less", log_ratio,
        quantity="log10(drift without BN / drift with BN)",
        context=f"drift none {np.mean(drift['none'][:, j]):.3g}, BN "
                f"{np.mean(drift['batch'][:, j]):.3g}"))
  v1 = C.combine("With BN the sigmoid network trains faster (Ioffe & Szegedy Fig. 1a)", faster)
  v1b = C.combine("With BN the sigmoid network reaches higher test accuracy (Fig. 1a)", higher)
  v2 = C.combine("With BN the input distribution of the sigmoids moves less during training "
                 "(Fig. 1b, c)", steadier)
  v3 = C.combine(
      "The qualitative result of Ioffe & Szegedy's MNIST figure (faster training, steadier "
      "sigmoid inputs) reproduces on the digits",
      [C.Verdict("trains faster", v1.status, "verdict above"),
       C.Verdict("steadier sigmoid inputs", v2.status, "verdict above")])
  verdicts = [v1, v1b, v2, v3]
  config = dict(lrs=list(lrs), seeds=seeds, steps=steps, batch_size=batch_size,
                hidden=[100, 100, 100], activation="sigmoid", optimizer="SGD", quick=quick)
  data_out = dict(steps=steps_axis, test_acc=acc, percentiles=pct, drift=drift)
  from . import _plots
  return C.Result("ioffe_szegedy", config, {"ioffe_szegedy": table}, verdicts, data_out,
                  time.time() - t0, _plots.plot_ioffe_szegedy)
