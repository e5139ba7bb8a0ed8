"""Convergence and learning rate; and Ioffe & Szegedy's MNIST figure on the digits."""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import _common as C
from . import _nets, _train


def convergence(*, norms: Sequence[str] = ("none", "batch", "layer", "group", "rms"),
                lrs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0), seeds=5,
                steps: int = 500, batch_size: int = 64, eval_every: int = 25,
                hidden: Sequence[int] = (100, 100, 100), activation: str = "relu",
                target: float = 0.96, quick: bool = False, progress: bool = True) -> C.Result:
  """Same MLP with each normalizer, over a learning-rate sweep and several seeds.

  Plain SGD on minibatches of ``batch_size``; accuracy on the held-out test set
  (evaluation mode) every ``eval_every`` steps.  Reports the final accuracy, the
  steps to reach ``target`` test accuracy, and the largest learning rate at which
  every seed reaches it.

  Claims tested: BN speeds up convergence; BN allows higher learning rates.
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
  n_seeds = len(seeds)

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
    med = np.array([np.median(reach[n][:, j]) if np.isfinite(reach[n][:, j]).sum() * 2 > n_seeds
                    else np.inf for j in range(len(lrs))])
    fastest = int(np.argmin(med))
    ok = [lr for j, lr in enumerate(lrs) if np.isfinite(reach[n][:, j]).all()]
    diverged = [lr for j, lr in enumerate(lrs) if np.isnan(loss[n][:, j, -1]).any()
                or (final[n][:, j] < 0.2).any()]
    return dict(best_lr=lrs[best], best_acc=final[n][:, best], fastest_lr=lrs[fastest],
                fastest=med[fastest], med=med, max_ok=max(ok) if ok else None,
                min_ok=min(ok) if ok else None, n_ok=len(ok), diverged=diverged)

  summ = {n: summary(n) for n in norms}
  t_sum = C.Table(
      ["norm", "best lr", "test acc at best lr (%)", f"fewest steps to {target:.0%} (lr)",
       f"lrs where all seeds reach {target:.0%}", "lrs that diverged (any seed)"],
      [[_nets.label(n), f"{s['best_lr']:g}", C.pm(s["best_acc"], scale=100),
        f"{C.fmt(s['fastest'])} ({s['fastest_lr']:g})",
        (f"{s['min_ok']:g} .. {s['max_ok']:g} ({s['n_ok']}/{len(lrs)})" if s["n_ok"] else "none"),
        ", ".join(f"{lr:g}" for lr in s["diverged"]) or "none"]
       for n, s in summ.items()],
      title="Summary per normalizer")

  verdicts = []
  if "none" in norms and "batch" in norms:
    b, o = summ["batch"], summ["none"]
    j_ref = list(lrs).index(o["fastest_lr"])
    b_same, o_same = b["med"][j_ref], o["med"][j_ref]
    faster_best = b["fastest"] < o["fastest"]
    faster_same = b_same < o_same
    status = (C.HELD if faster_best and faster_same else
              C.CONDITIONAL if faster_best or faster_same else C.NOT_HELD)
    verdicts.append(C.Verdict(
        "Batch norm speeds up convergence",
        status,
        f"median steps to {target:.0%}: BN {C.fmt(b['fastest'])} at its fastest lr "
        f"{b['fastest_lr']:g} vs none {C.fmt(o['fastest'])} at its fastest lr "
        f"{o['fastest_lr']:g}; at the same lr {o['fastest_lr']:g}: BN {C.fmt(b_same)} vs "
        f"none {C.fmt(o_same)}"))
    b_max = b["max_ok"] if b["max_ok"] is not None else 0.0
    o_max = o["max_ok"] if o["max_ok"] is not None else 0.0
    verdicts.append(C.Verdict(
        "Batch norm allows higher learning rates",
        C.HELD if b_max > o_max else C.NOT_HELD,
        f"largest lr at which every seed reaches {target:.0%}: BN {C.fmt(b_max)} vs none "
        f"{C.fmt(o_max)}; lrs where some seed diverged: BN "
        f"{', '.join(f'{lr:g}' for lr in b['diverged']) or 'none'}, none "
        f"{', '.join(f'{lr:g}' for lr in o['diverged']) or 'none'}"))
    others = [n for n in norms if n not in ("none", "batch")]
    if others:
      better = [n for n in others if (summ[n]["max_ok"] or 0.0) > o_max]
      verdicts.append(C.Verdict(
          "The per-sample normalizers (LN, GN, RMSNorm) also widen the usable learning-rate "
          "range",
          C.HELD if len(better) == len(others) else C.CONDITIONAL if better else C.NOT_HELD,
          "largest lr with every seed at target: " + ", ".join(
              f"{_nets.label(n)} {C.fmt(summ[n]['max_ok'] or 0.0)}" for n in others)
          + f" vs none {C.fmt(o_max)}"))

  config = dict(norms=list(norms), lrs=list(lrs), seeds=seeds, steps=steps,
                batch_size=batch_size, hidden=list(hidden), activation=activation,
                target=target, optimizer="SGD")
  data_out = dict(steps=steps_axis, test_acc=acc, train_loss=loss, test_loss=tloss, reach=reach)
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


def ioffe_szegedy(*, lrs: Sequence[float] = (0.3, 1.0, 3.0), seeds=5, steps: int = 2000,
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

  early_gap = np.array([acc["batch"][:, j, e_early].mean() - acc["none"][:, j, e_early].mean()
                        for j in range(len(lrs))])
  final_gap = np.array([acc["batch"][:, j, -1].mean() - acc["none"][:, j, -1].mean()
                        for j in range(len(lrs))])
  drift_ratio = np.array([drift["batch"][:, j].mean() / drift["none"][:, j].mean()
                          for j in range(len(lrs))])
  n_lr = len(lrs)
  n_faster = int(((early_gap > 0) & (final_gap >= 0)).sum())
  lr_list = ", ".join(f"{lr:g}" for lr in lrs)
  v1 = C.Verdict(
      "With BN the sigmoid network trains faster and reaches higher test accuracy "
      "(Ioffe & Szegedy Fig. 1a)",
      C.HELD if n_faster == n_lr else C.CONDITIONAL if n_faster else C.NOT_HELD,
      f"BN minus none, test accuracy at step {steps_axis[e_early]}: "
      + ", ".join(f"{g * 100:+.1f} pts" for g in early_gap)
      + f"; at step {steps}: " + ", ".join(f"{g * 100:+.1f} pts" for g in final_gap)
      + f" (lr = {lr_list})")
  n_stable = int((drift_ratio < 1).sum())
  v2 = C.Verdict(
      "With BN the input distribution of the sigmoids moves less during training "
      "(Fig. 1b, c)",
      C.HELD if n_stable == n_lr else C.CONDITIONAL if n_stable else C.NOT_HELD,
      "percentile drift BN / none: " + ", ".join(f"{r:.2f}" for r in drift_ratio)
      + f" (lr = {lr_list})")
  reproduced = v1.status == C.HELD and v2.status == C.HELD
  v3 = C.Verdict(
      "The qualitative result of Ioffe & Szegedy's MNIST figure reproduces on the digits",
      C.HELD if reproduced else (C.CONDITIONAL if C.HELD in (v1.status, v2.status)
                                 or C.CONDITIONAL in (v1.status, v2.status) else C.NOT_HELD),
      f"faster/higher accuracy: {v1.status}; more stable sigmoid inputs: {v2.status}")
  config = dict(lrs=list(lrs), seeds=seeds, steps=steps, batch_size=batch_size,
                hidden=[100, 100, 100], activation="sigmoid", optimizer="SGD")
  data_out = dict(steps=steps_axis, test_acc=acc, percentiles=pct, drift=drift)
  from . import _plots
  return C.Result("ioffe_szegedy", config, {"ioffe_szegedy": table}, [v1, v2, v3], data_out,
                  time.time() - t0, _plots.plot_ioffe_szegedy)
