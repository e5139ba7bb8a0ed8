"""Batch size: BN vs LN vs GN from batch 2 to 256, and BN's train/eval gap."""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np

from . import _common as C
from . import _nets, _train


def batch_size(*, norms: Sequence[str] = ("batch", "layer", "group"),
               batch_sizes: Sequence[int] = (2, 4, 8, 16, 32, 64, 128, 256), epochs: float = 20,
               base_lr: float = 0.05, base_batch: int = 32, momentum: float = 0.9, seeds=5,
               model: str = "mlp", hidden: Sequence[int] = (64, 64, 64), groups: int = 4,
               evals: int = 4, drop: float = 0.05, quick: bool = False,
               progress: bool = True) -> C.Result:
  """Trains with each normalizer at each batch size for the same number of epochs.

  The learning rate follows the square-root scaling rule, ``base_lr *
  sqrt(B / base_batch)`` (SGD with momentum), so every batch size sees the same
  data.  ``model="mlp"`` normalizes (batch, features) activations, so BN's
  statistics come from exactly B samples; ``model="cnn"`` uses a small conv net,
  where BN also pools over the 8x8 (then 4x4) positions.

  Reports test accuracy in evaluation mode (BN: running averages) and BN's
  train/eval gap: accuracy in training mode (the statistics of each test batch of
  size B, as the network saw during training) minus evaluation mode, on the same
  test samples (the first ``360 // B * B``).  "BN train-mode" in the table is the
  evaluation-mode accuracy plus that gap.

  Claims tested (95% t-intervals over seeds of paired differences, see
  :func:`jaxnorm.experiments.decide`): BN degrades at very small batch sizes (its
  accuracy at its best batch size minus at the smallest > ``drop``); LN and GN do not
  depend on the batch size (their best minus worst batch size < ``drop``); BN's
  train/eval gap grows at small batches (|gap| at the smallest minus at the largest
  batch > 2 pts).
  """
  if quick:
    batch_sizes, epochs, seeds, hidden, evals = (4, 16), 0.1, 2, (16,), 1
    norms = tuple(n for n in norms if n in ("batch", "group")) or norms
  t0 = time.time()
  data = C.load_digits()
  seeds = C.seeds_list(seeds)
  n_train = len(data.x_train)
  plan = []
  for b in batch_sizes:
    chunk = max(1, int(round(epochs * n_train / b / evals)))
    plan.append((b, chunk * evals, chunk, base_lr * math.sqrt(b / base_batch)))
  total = sum(p[1] for p in plan) * len(norms)
  bar = C.progress_bar(total, "batch size", progress)
  eval_acc, train_acc, gap = {}, {}, {}
  for norm in norms:
    if model == "mlp":
      net = _nets.MLP(sizes=(64,) + tuple(hidden) + (10,), norm=norm, groups=groups)
    elif model == "cnn":
      net = _nets.CNN(norm=norm, groups=groups)
    else:
      raise ValueError(f"batch_size: model must be 'mlp' or 'cnn', got {model!r}.")
    ev, tr = [], []
    for b, steps, chunk, lr in plan:
      bar.set_postfix_str(f"{_nets.label(norm)} B={b}")
      h = _train.train(net, data, seeds=seeds, lrs=[lr], steps=steps, batch_size=b,
                       eval_every=chunk, momentum=momentum, probe=_train.gap_probe(b), bar=bar,
                       quick=quick)
      ev.append(h.metrics["test_acc"][:, 0, -1])
      tr.append(h.metrics["train_mode_acc"][:, 0, -1] - h.metrics["eval_mode_acc"][:, 0, -1])
    eval_acc[norm], gap[norm] = np.stack(ev, 1), np.stack(tr, 1)  # (S, B)
    train_acc[norm] = eval_acc[norm] + gap[norm]
  bar.close()

  cols = ["batch", "lr", "steps"] + [f"{_nets.label(n)} (%)" for n in norms]
  if "batch" in norms:
    cols += ["BN train-mode (%)", "BN gap (pts)"]
  rows = []
  for i, (b, steps, _, lr) in enumerate(plan):
    row = [str(b), f"{lr:.3g}", str(steps)] + [C.pm(eval_acc[n][:, i], scale=100) for n in norms]
    if "batch" in norms:
      row += [C.pm(train_acc["batch"][:, i], scale=100), C.pm(gap["batch"][:, i], scale=100)]
    rows.append(row)
  table = C.Table(cols, rows, title=f"Test accuracy (evaluation mode), {model.upper()}, "
                                    f"{epochs} epochs, mean ± std over {len(seeds)} seeds")

  verdicts = []
  mean = {n: eval_acc[n].mean(0) for n in norms}
  bs = list(batch_sizes)
  if "batch" in norms:
    m = mean["batch"]
    best = int(np.argmax(m))
    others = [n for n in norms if n != "batch"]
    verdicts.append(C.decide(
        f"Batch norm degrades at very small batch sizes (batch {bs[0]})",
        eval_acc["batch"][:, best] - eval_acc["batch"][:, 0],
        quantity=f"BN test accuracy at batch {bs[best]} (its best) minus at batch {bs[0]}",
        threshold=drop, scale=100, unit=" pts",
        context=f"BN {m[0] * 100:.1f}% at batch {bs[0]} vs {m[best] * 100:.1f}% at batch "
                f"{bs[best]}" + "".join(f"; {_nets.label(n)} {mean[n][0] * 100:.1f}% at batch "
                                        f"{bs[0]}" for n in others)))
    if others:
      parts = []
      for n in others:
        a = eval_acc[n]
        hi, lo = int(np.argmax(mean[n])), int(np.argmin(mean[n]))
        parts.append(C.decide(
            f"{_nets.label(n)} does not depend on the batch size", a[:, hi] - a[:, lo],
            quantity=f"{_nets.label(n)} test accuracy at its best batch size ({bs[hi]}) minus "
                     f"at its worst ({bs[lo]})",
            threshold=drop, alternative="less", scale=100, unit=" pts"))
      names = " and ".join({"layer": "layer norm", "group": "group norm"}.get(n, _nets.label(n))
                           for n in others)
      verdicts.append(C.combine(
          f"{names[0].upper() + names[1:]} {'do' if len(others) > 1 else 'does'} not depend on "
          "the batch size", parts))
    g = np.abs(gap["batch"])
    verdicts.append(C.decide(
        "BN's train/eval gap grows at small batches", g[:, 0] - g[:, -1],
        quantity=f"|train-mode minus eval-mode test accuracy| at batch {bs[0]} minus at batch "
                 f"{bs[-1]}", threshold=0.02, scale=100, unit=" pts",
        context=f"mean gap {gap['batch'][:, 0].mean() * 100:+.1f} pts at batch {bs[0]}, "
                f"{gap['batch'][:, -1].mean() * 100:+.1f} pts at batch {bs[-1]}"))
  config = dict(norms=list(norms), batch_sizes=bs, epochs=epochs, base_lr=base_lr,
                base_batch=base_batch, momentum=momentum, seeds=seeds, model=model,
                hidden=list(hidden), groups=groups, quick=quick)
  from . import _plots
  return C.Result("batch_size", config, {"batch_size": table}, verdicts,
                  dict(eval_acc=eval_acc, train_mode_acc=train_acc, gap=gap), time.time() - t0,
                  _plots.plot_batch_size)
