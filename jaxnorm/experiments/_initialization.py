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
                   lr: float = 0.1, seeds=5, steps: int = 500, batch_size: int = 64,
                   eval_every: int = 50, hidden: Sequence[int] = (64,) * 6,
                   activation: str = "relu", good: float = 0.9, tolerance: float = 0.02,
                   quick: bool = False, progress: bool = True) -> C.Result:
  """A deep ReLU MLP whose initial weights are He's times ``weight_scale``.

  Every weight matrix (the output layer's too) is multiplied by the scale; all
  scales train at once in one program (same lr, same minibatches per seed).
  Reports the final test accuracy, the std of each hidden layer's output at
  initialization (the forward signal), and for each net the relative change of the
  hidden weights during training, ``||W_T - W_0|| / ||W_0||``.

  Claim tested: batch norm reduces the sensitivity to the initial weight scale.
  A scale is "good" for a net when its mean accuracy is at least ``good``.  Layer
  norm (also invariant to the scale of the weights before it) is shown alongside.
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

  def scales_ok(n):
    m = np.nan_to_num(final[n].mean(0), nan=0.0)
    return [s for s, a in zip(weight_scales, m) if a >= good], m

  verdicts = []
  if "none" in norms and "batch" in norms:
    ok_b, m_b = scales_ok("batch")
    ok_n, m_n = scales_ok("none")
    worst_b, worst_n = m_b.min(), m_n.min()
    shortfall = [(s, (m_b.max() - a)) for s, a in zip(weight_scales, m_b)
                 if m_b.max() - a > tolerance]
    if len(ok_b) > len(ok_n) and worst_b > worst_n:
      status = C.HELD if not shortfall else C.CONDITIONAL
    else:
      status = C.NOT_HELD
    fmt_scales = lambda ss: ", ".join(f"{s:g}" for s in ss) or "none"
    ev = (f"scales with mean test accuracy ≥ {good:.0%}: BN {fmt_scales(ok_b)} "
          f"({len(ok_b)}/{k}) vs none {fmt_scales(ok_n)} ({len(ok_n)}/{k}); worst accuracy over "
          f"scales: BN {worst_b * 100:.1f}% vs none {worst_n * 100:.1f}%")
    if shortfall:
      j_s = [list(weight_scales).index(s) for s, _ in shortfall]
      ev += ("; but BN trails its own best by more than "
             f"{tolerance * 100:.0f} pts at scale " + ", ".join(
                 f"{s:g} (-{d * 100:.1f} pts, weights moved {np.nanmean(moved['batch'][:, j]):.2g}"
                 f" of their norm vs {np.nanmean(moved['batch'][:, int(np.argmax(m_b))]):.2g} at "
                 f"its best scale)" for (s, d), j in zip(shortfall, j_s)))
    verdicts.append(C.Verdict("Batch norm reduces sensitivity to the weight initialization",
                              status, ev))
  config = dict(norms=list(norms), weight_scales=list(weight_scales), lr=lr, seeds=seeds,
                steps=steps, batch_size=batch_size, hidden=list(hidden), activation=activation,
                good=good, tolerance=tolerance)
  data_out = dict(steps=np.arange(1, steps // eval_every + 1) * eval_every, final_acc=final,
                  test_acc=curves, init_std=signal, weight_change=moved)
  from . import _plots
  return C.Result("initialization", config, {"initialization": table}, verdicts, data_out,
                  time.time() - t0, _plots.plot_initialization)
