"""Initialization sensitivity: a weight-scale sweep with and without batch norm."""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import _common as C
from . import _nets, _train


def _init_signal(model, params, state, x):
  """Std of every hidden layer's output at initialization (training-mode forward)."""
  _, _, (_, hs) = model.apply(params, state, x, training=True, capture=True)
  return jnp.stack([h.std() for h in hs])


def initialization(*, norms: Sequence[str] = ("none", "batch", "layer"),
                   weight_scales: Sequence[float] = (0.1, 0.3, 1.0, 3.0, 10.0),
                   lr: float = 0.1, seeds=8, steps: int = 500, batch_size: int = 64,
                   eval_every: int = 50, hidden: Sequence[int] = (64,) * 6,
                   activation: str = "relu", good: float = 0.9, tolerance: float = 0.02,
                   quick: bool = False, progress: bool = True) -> C.Result:
  """A deep ReLU MLP whose initial weights are He's times ``weight_scale``.

  Every weight matrix (the output layer's too) is multiplied by the scale; all
  scales train at once in one program (same lr, same minibatches per seed).
  Reports the final test accuracy, the std of each hidden layer's output at
  initialization (the forward signal), and for each net the relative change of the
  hidden weights during training, ``||W_T - W_0|| / ||W_0||``.

  Claims tested (95% t-intervals over seeds, see :func:`jaxnorm.experiments.decide`):
  batch norm reduces the sensitivity to the initial weight scale (worst accuracy over
  the scales, BN minus none, > 0); with BN the scale does not matter (BN's best-scale
  minus worst-scale accuracy < ``tolerance``).  A scale is "good" for a net when its
  mean accuracy is at least ``good`` (reported).  Layer norm (also invariant to the
  scale of the weights before it) is shown alongside.
  """
  if quick:
    weight_scales, seeds, steps, eval_every, hidden = (0.3, 1.0, 3.0), 2, 40, 20, (32,) * 3
    norms = tuple(n for n in norms if n in ("none", "batch")) or norms
  t0 = time.time()
  data = C.load_digits()
  seeds = C.seeds_list(seeds)
  sizes = (64,) + tuple(hidden) + (10,)
  k = len(weight_scales)
  bar = C.progress_bar(steps * len(norms), "initialization", progress)
  final, curves, signal, moved = {}, {}, {}, {}
  for norm in norms:
    bar.set_postfix_str(_nets.label(norm))
    model = _nets.MLP(sizes=sizes, norm=norm, activation=activation)
    h = _train.train(model, data, seeds=seeds, lrs=[lr] * k, weight_scales=weight_scales,
                     steps=steps, batch_size=batch_size, eval_every=eval_every, bar=bar,
                     quick=quick)
    final[norm], curves[norm] = h.metrics["test_acc"][:, :, -1], h.metrics["test_acc"]
    p0, s0 = _train.init_carry(model, seeds, k, weight_scales)[:2]
    xte = jnp.asarray(data.x_test)
    sig = C.jit(jax.vmap(jax.vmap(lambda p, s: _init_signal(model, p, s, xte))), quick=quick)(
        p0, s0)
    signal[norm] = np.asarray(sig).mean(0)  # (K, layers), averaged over seeds

    def rel_change(pt, pi):
      num = sum(jnp.sum((a["w"] - b["w"]) ** 2) for a, b in zip(pt[:-1], pi[:-1]))
      den = sum(jnp.sum(b["w"] ** 2) for b in pi[:-1])
      return jnp.sqrt(num / den)

    moved[norm] = np.asarray(C.jit(jax.vmap(jax.vmap(rel_change)), quick=quick)(h.params, p0))
  bar.close()

  cols = ["weight scale"]
  for n in norms:
    cols += [f"{_nets.label(n)} test acc (%)", f"{_nets.label(n)} last-layer std at init",
             f"{_nets.label(n)} ||ΔW||/||W0||"]
  rows = []
  for j, s in enumerate(weight_scales):
    row = [f"{s:g}"]
    for n in norms:
      mv = moved[n][:, j]
      row += [C.pm(final[n][:, j], scale=100), f"{signal[n][j, -1]:.3g}",
              f"{np.mean(mv):.3g}" if np.isfinite(mv).all() else "diverged"]
    rows.append(row)
  table = C.Table(cols, rows, title=f"{len(hidden)}x{hidden[0]} {activation} MLP, lr={lr:g}, "
                                    f"{steps} steps, mean ± std over {len(seeds)} seeds")

  verdicts = []
  if "none" in norms and "batch" in norms:
    acc0 = {n: np.nan_to_num(final[n], nan=0.0) for n in norms}  # (S, K)
    worst = {n: acc0[n].min(axis=1) for n in norms}  # per seed, over scales
    m_b = acc0["batch"].mean(0)
    j_best, j_worst = int(np.argmax(m_b)), int(np.argmin(m_b))
    n_good = {n: int((acc0[n].mean(0) >= good).sum()) for n in norms}
    verdicts.append(C.decide(
        "Batch norm reduces sensitivity to the weight initialization",
        worst["batch"] - worst["none"],
        quantity="worst test accuracy over the weight scales (per seed), BN minus none",
        scale=100, unit=" pts",
        context=f"scales with mean accuracy ≥ {good:.0%}: BN {n_good['batch']}/{k}, none "
                f"{n_good['none']}/{k}"))
    s_w = weight_scales[j_worst]
    verdicts.append(C.decide(
        f"With batch norm the weight scale does not matter (every scale within "
        f"{tolerance * 100:.0f} pts of the best)",
        acc0["batch"][:, j_best] - acc0["batch"][:, j_worst],
        quantity=f"BN test accuracy at its best scale ({weight_scales[j_best]:g}) minus at its "
                 f"worst ({s_w:g})",
        threshold=tolerance, alternative="less", scale=100, unit=" pts",
        context=f"at scale {s_w:g} BN's hidden weights moved "
                f"{np.nanmean(moved['batch'][:, j_worst]):.2g} of their norm vs "
                f"{np.nanmean(moved['batch'][:, j_best]):.2g} at scale "
                f"{weight_scales[j_best]:g} (normalized layers are scale-invariant: a larger "
                f"weight norm shrinks the relative SGD step)"))
  config = dict(norms=list(norms), weight_scales=list(weight_scales), lr=lr, seeds=seeds,
                steps=steps, batch_size=batch_size, hidden=list(hidden), activation=activation,
                good=good, tolerance=tolerance, quick=quick)
  data_out = dict(steps=np.arange(1, steps // eval_every + 1) * eval_every, final_acc=final,
                  test_acc=curves, init_std=signal, weight_change=moved)
  from . import _plots
  return C.Result("initialization", config, {"initialization": table}, verdicts, data_out,
                  time.time() - t0, _plots.plot_initialization)
