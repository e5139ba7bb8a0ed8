"""Recurrent networks: a tanh RNN with layer norm, batch norm, or neither."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from . import _common as C
from . import _nets, _train
from ._convergence import usable_runs


def recurrent(*, norms: Sequence[str] = ("none", "layer", "batch"),
              lrs: Sequence[float] = (0.01, 0.03, 0.1, 0.3), seeds=8, steps: int = 1000,
              batch_size: int = 32, eval_every: int = 50, hidden: int = 64, seq_len: int = 16,
              momentum: float = 0.9, target: float = 0.95, tolerance: float = 0.005,
              quick: bool = False, progress: bool = True) -> C.Result:
  """Sequential digits: an Elman tanh RNN reads each image as ``seq_len`` chunks of
  pixels (16 steps of 4 pixels by default) and classifies from its last state.

  Normalizers act on the summed pre-activation at every time step: LN per sample
  (Ba et al. 2016), BN over the batch with separate statistics and running
  averages per time step (Cooijmans et al. 2017).  SGD with momentum, no gradient
  clipping, over a learning-rate sweep and several seeds.

  Claims tested (95% t-intervals over seeds of paired differences, see
  :func:`jaxnorm.experiments.decide`): layer norm helps a recurrent network (at least
  the accuracy of no normalization, within ``tolerance``, and more learning rates at
  which a seed ends at ``target``); layer norm suits it better than batch norm (higher
  accuracy, and no fewer such learning rates, within one step of the learning-rate grid).
  """
  if quick:
    lrs, seeds, steps, eval_every, hidden, seq_len = lrs[:2], 2, 40, 20, 16, 8
  t0 = time.time()
  data = C.load_digits()
  seeds = C.seeds_list(seeds)
  bar = C.progress_bar(steps * len(norms), "recurrent", progress)
  acc, gap, last_loss = {}, {}, {}
  for norm in norms:
    bar.set_postfix_str(_nets.label(norm))
    model = _nets.RNN(norm=norm, hidden=hidden, seq_len=seq_len)
    h = _train.train(model, data, seeds=seeds, lrs=lrs, steps=steps, batch_size=batch_size,
                     eval_every=eval_every, momentum=momentum, probe=_train.gap_probe(batch_size),
                     bar=bar, quick=quick)
    acc[norm] = h.metrics["test_acc"]
    last_loss[norm] = h.metrics["train_loss"][:, :, -1]
    steps_axis = h.steps
    gap[norm] = h.metrics["train_mode_acc"][:, :, -1] - h.metrics["eval_mode_acc"][:, :, -1]
  bar.close()

  final = {n: acc[n][:, :, -1] for n in norms}
  reach = {n: C.first_reach(steps_axis, acc[n], target) for n in norms}
  best = {n: int(np.argmax(np.nan_to_num(final[n].mean(0), nan=0.0))) for n in norms}
  trained = {n: usable_runs(final[n], last_loss[n], target) for n in norms}  # (S, L)
  ok = {n: [lr for j, lr in enumerate(lrs) if trained[n][:, j].all()] for n in norms}
  lr_cols = [f"lr={lr:g}" for lr in lrs]
  t_acc = C.Table(["norm"] + lr_cols + [f"usable lrs (every seed ≥ {target:.0%} at the end)"], [
      [_nets.label(n)] + [C.pm(final[n][:, j], scale=100) for j in range(len(lrs))]
      + [", ".join(f"{lr:g}" for lr in ok[n]) or "none"] for n in norms],
      title=f"Final test accuracy (%) after {steps} steps, tanh RNN ({seq_len} steps x "
            f"{64 // seq_len} pixels, {hidden} units), mean ± std over {len(seeds)} seeds")
  t_best = C.Table(
      ["norm", "best lr", "test acc (%)", f"steps to {target:.0%}", "train-mode − eval-mode (pts)"],
      [[_nets.label(n), f"{lrs[best[n]]:g}", C.pm(final[n][:, best[n]], scale=100),
        C.median_steps(reach[n][:, best[n]]), C.pm(gap[n][:, best[n]], scale=100)]
       for n in norms], title="Each normalizer at its best learning rate")

  verdicts = []
  best_acc = {n: np.nan_to_num(final[n][:, best[n]], nan=0.0) for n in norms}  # per seed
  n_trained = {n: trained[n].sum(axis=1).astype(np.float64) for n in norms}  # per seed
  ok_str = lambda n: ", ".join(f"{lr:g}" for lr in ok[n]) or "none"

  def vs(other, label_other, acc_margin, lr_margin):
    """LN against ``other``: accuracy at each one's best lr, and the number of learning
    rates at which a seed ends trained.  A margin of 0 claims LN is better; a positive
    margin claims it is no worse by more than the margin (non-inferiority)."""
    acc_claim = (f"LN is at least as accurate as {label_other} (within {acc_margin * 100:.1f} pts)"
                 if acc_margin else f"LN is more accurate than {label_other}")
    lr_claim = (f"LN ends trained at no fewer learning rates than {label_other} (within "
                f"{lr_margin:g} of the {len(lrs)} grid steps)" if lr_margin
                else f"LN ends trained at more learning rates than {label_other}")
    return [
        C.decide(acc_claim, best_acc["layer"] - best_acc[other],
                 quantity=f"test accuracy, LN at lr {lrs[best['layer']]:g} minus "
                          f"{label_other} at lr {lrs[best[other]]:g}",
                 threshold=-acc_margin if acc_margin else 0.0, scale=100, unit=" pts"),
        C.decide(lr_claim, n_trained["layer"] - n_trained[other],
                 quantity=f"learning rates (of {len(lrs)}) at which a seed ends at ≥ "
                          f"{target:.0%}, LN minus {label_other}",
                 threshold=-lr_margin if lr_margin else 0.0,
                 context=f"usable lrs (every seed): LN {ok_str('layer')}; {label_other} "
                         f"{ok_str(other)}")]

  if "layer" in norms and "none" in norms:
    verdicts.append(C.combine("Layer norm helps a recurrent network (vs no normalization)",
                              vs("none", "none", tolerance, 0)))
  if "layer" in norms and "batch" in norms:
    # The lr grid's resolution is one step (a factor of about 3): "more usable learning
    # rates" than BN by less than one step is below it, so this part is non-inferiority.
    verdicts.append(C.combine(
        "Layer norm suits recurrent networks better than batch norm",
        vs("batch", "BN", 0.0, 1),
        context=f"BN's train-mode minus eval-mode accuracy at its best lr: "
                f"{gap['batch'][:, best['batch']].mean() * 100:+.1f} pts (LN: "
                f"{gap['layer'][:, best['layer']].mean() * 100:+.1f})"))
  config = dict(norms=list(norms), lrs=list(lrs), seeds=seeds, steps=steps,
                batch_size=batch_size, hidden=hidden, seq_len=seq_len, momentum=momentum,
                target=target, quick=quick)
  from . import _plots
  return C.Result("recurrent", config, {"best": t_best, "final_accuracy": t_acc}, verdicts,
                  dict(steps=steps_axis, test_acc=acc, train_eval_gap=gap, best_lr_index=best),
                  time.time() - t0, _plots.plot_recurrent)
