"""Figures of the experiments (matplotlib, imported when a figure is drawn).

Every ``plot_*`` function takes a :class:`Result` and returns ``{stem: Figure}``;
``Result.figures()`` and ``Result.save_figures()`` call them.
"""

from __future__ import annotations

import numpy as np

from . import _common as C
from ._nets import label

COLORS = {"none": "tab:gray", "batch": "tab:blue", "layer": "tab:orange", "group": "tab:green",
          "rms": "tab:red", "batch+noise": "tab:purple", "sync": "tab:blue",
          "per-device": "tab:red", "global": "black"}


MARKERS = {"none": "o", "batch": "s", "layer": "^", "group": "v", "rms": "D",
           "batch+noise": "P", "sync": "s", "per-device": "o"}
LINESTYLES = {"none": "-", "batch": "-", "layer": "--", "group": "-.", "rms": ":",
              "batch+noise": "--", "sync": "-", "per-device": "--"}


def _plt():
  return C.require("matplotlib.pyplot")


def _style(n):
  """Colour, marker and line style of a variant: lines that coincide stay visible."""
  return dict(color=COLORS.get(n), marker=MARKERS.get(n, "o"), ls=LINESTYLES.get(n, "-"))


def _offsets(x, i, k, *, log=True, spread=0.04):
  """``x`` nudged sideways for the ``i``-th of ``k`` series (multiplicatively on a log
  axis), so error bars of equal values do not hide each other."""
  x = np.asarray(x, np.float64)
  d = spread * (i - (k - 1) / 2)
  return x * 10 ** d if log else x + d


def _errorbar(ax, x, samples, *, clip=None, label_=None, **style):
  """Mean over seeds (axis 0) with its 95% t-interval as the error bar, clipped to
  ``clip`` (accuracies: 0..100)."""
  m, lo, hi = C.ci_bounds(samples, clip=clip)
  ax.errorbar(x, m, yerr=np.stack([m - lo, hi - m]), capsize=3, label=label_, lw=1.4, ms=5,
              **style)


def _integer_ticks(ax, which="x"):
  from matplotlib.ticker import MaxNLocator
  (ax.xaxis if which == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def _band(ax, x, ys, *, color=None, label_=None, ls="-", log=False, clip=None):
  """Mean over the first axis (seeds) with a ±1 std band (clipped to ``clip``); with
  ``log``, the geometric mean with the min..max band (a std band can reach below zero)."""
  ys = np.asarray(ys, np.float64)
  if log:
    with np.errstate(divide="ignore", invalid="ignore"):
      m = np.exp(np.nanmean(np.log(ys), axis=0))
    lo, hi = np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
  else:
    m, s = np.nanmean(ys, axis=0), np.nanstd(ys, axis=0)
    lo, hi = m - s, m + s
    if clip is not None:
      lo, hi = np.clip(lo, *clip), np.clip(hi, *clip)
  ax.plot(x, m, ls, color=color, label=label_, lw=1.6)
  ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)


def _log_if_positive(ax, which="y"):
  """Log scale on an axis only when it holds some positive finite data."""
  vals = []
  for line in ax.get_lines():
    v = np.asarray(line.get_ydata() if which == "y" else line.get_xdata(), np.float64)
    vals.append(v[np.isfinite(v)])
  vals = np.concatenate(vals) if vals else np.array([])
  if (vals > 0).any():
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")


def _ref_lr_index(lrs, prefer=0.1):
  lrs = list(lrs)
  return lrs.index(prefer) if prefer in lrs else len(lrs) // 2


def plot_convergence(r):
  plt = _plt()
  d, cfg = r.data, r.config
  lrs, norms, steps = cfg["lrs"], cfg["norms"], d["steps"]
  j = _ref_lr_index(lrs)
  fig1, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for n in norms:
    _band(axes[0], steps, d["train_loss"][n][:, j], color=COLORS.get(n), label_=label(n),
          log=True)
    _band(axes[1], steps, d["test_acc"][n][:, j] * 100, color=COLORS.get(n), label_=label(n),
          ls=LINESTYLES.get(n, "-"), clip=(0, 100))
  axes[0].set(yscale="log", xlabel="step", ylabel="training loss",
              title=f"Training loss, lr={lrs[j]:g} (geo. mean, min..max)")
  axes[1].set(xlabel="step", ylabel="test accuracy (%)", ylim=(80, 100),
              title=f"Test accuracy, lr={lrs[j]:g} (mean ± std)")
  axes[1].axhline(cfg["target"] * 100, color="k", lw=0.7, ls=":",
                  label=f"target {cfg['target']:.0%}")
  axes[0].legend()
  axes[1].legend(loc="lower right")
  fig1.tight_layout()

  fig2, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for i, n in enumerate(norms):
    final = np.nan_to_num(d["test_acc"][n][:, :, -1], nan=0.1) * 100
    x = _offsets(lrs, i, len(norms))
    _errorbar(axes[0], x, final, clip=(0, 100), label_=label(n), **_style(n))
    reach = d["reach"][n]
    ok = np.isfinite(reach).sum(0) * 2 > reach.shape[0]
    med = np.where(ok, np.median(np.where(np.isfinite(reach), reach, np.nan), axis=0), np.nan)
    axes[1].plot(x, med, label=label(n), **_style(n))
  axes[0].axhline(cfg["target"] * 100, color="k", lw=0.7, ls=":",
                  label=f"target {cfg['target']:.0%}")
  axes[0].set(xscale="log", xlabel="learning rate (series nudged sideways)",
              ylabel="final test accuracy (%)",
              title="Learning-rate sweep (mean, 95% CI over seeds)")
  _log_if_positive(axes[1], "y")
  axes[1].set(xscale="log", xlabel="learning rate",
              ylabel=f"steps to {cfg['target']:.0%}",
              title="Steps to target (median; gaps: not reached)")
  axes[0].legend(fontsize="small")
  axes[1].legend(fontsize="small")
  fig2.tight_layout()
  return {"curves": fig1, "lr_sweep": fig2}


def plot_ioffe_szegedy(r):
  plt = _plt()
  d, cfg = r.data, r.config
  lrs, steps = cfg["lrs"], d["steps"]
  j = len(lrs) // 2
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for n in ("none", "batch"):
    _band(axes[0], steps, d["test_acc"][n][:, j] * 100, color=COLORS[n], clip=(0, 100),
          label_="with BN" if n == "batch" else "without BN")
  axes[0].set(xlabel="step", ylabel="test accuracy (%)", title=f"(a) test accuracy, lr={lrs[j]:g}")
  axes[0].legend()
  for ax, n, t in ((axes[1], "none", "(b) without BN"), (axes[2], "batch", "(c) with BN")):
    p = d["percentiles"][n][0, j, :, 0, :]  # seed 0, unit 0: (E, 3)
    for q, ls, name in zip(range(3), (":", "-", "--"), ("15th", "50th", "85th")):
      ax.plot(steps, p[:, q], ls, color=COLORS[n], label=f"{name} percentile")
    ax.set(xlabel="step", ylabel="sigmoid input", title=f"{t}: 15/50/85th pct, one unit")
    ax.legend(fontsize="small")
  lo = min(axes[1].get_ylim()[0], axes[2].get_ylim()[0])
  hi = max(axes[1].get_ylim()[1], axes[2].get_ylim()[1])
  axes[1].set_ylim(lo, hi)
  axes[2].set_ylim(lo, hi)
  fig.tight_layout()
  return {"figure1": fig}


def plot_initialization(r):
  plt = _plt()
  d, cfg = r.data, r.config
  scales, norms = cfg["weight_scales"], cfg["norms"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for i, n in enumerate(norms):
    final = np.nan_to_num(d["final_acc"][n], nan=0.1) * 100  # (S, K)
    _errorbar(axes[0], _offsets(scales, i, len(norms)), final, clip=(0, 100), label_=label(n),
              **_style(n))
    std = d["init_std"][n]  # (K, layers)
    for k, s in enumerate(scales):
      axes[1].plot(np.arange(1, std.shape[1] + 1), std[k], marker=".", color=COLORS.get(n),
                   alpha=0.3 + 0.7 * k / max(1, len(scales) - 1),
                   label=f"{label(n)}" if k == len(scales) - 1 else None)
  axes[0].set(xscale="log", xlabel="weight scale (× He init)", ylabel="final test accuracy (%)",
              title=f"After {cfg['steps']} steps, lr={cfg['lr']:g} (mean, 95% CI)")
  _integer_ticks(axes[1])
  axes[0].legend()
  axes[1].set(yscale="log", xlabel="hidden layer", ylabel="std of activations at init",
              title="Forward signal at init (darker = larger scale)")
  axes[1].legend()
  fig.tight_layout()
  return {"sweep": fig}


def plot_batch_size(r):
  plt = _plt()
  d, cfg = r.data, r.config
  bss, norms = cfg["batch_sizes"], cfg["norms"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for i, n in enumerate(norms):
    a = d["eval_acc"][n] * 100  # (S, B)
    _errorbar(axes[0], _offsets(bss, i, len(norms)), a, clip=(0, 100), label_=label(n),
              **_style(n))
  axes[0].set(xscale="log", xlabel="batch size", ylabel="test accuracy (%)",
              title="Test accuracy (evaluation mode; mean, 95% CI)")
  axes[0].set_xticks(bss, [str(b) for b in bss])
  axes[0].legend()
  if "batch" in norms:
    tr, ev = d["train_mode_acc"]["batch"] * 100, d["eval_acc"]["batch"] * 100
    _errorbar(axes[1], _offsets(bss, 0, 2), tr, clip=(0, 100), marker="o", ls="--",
              color="tab:cyan", label_="BN, batch statistics (train mode)")
    _errorbar(axes[1], _offsets(bss, 1, 2), ev, clip=(0, 100), marker="s", ls="-",
              color=COLORS["batch"], label_="BN, running averages (eval mode)")
    axes[1].set(xscale="log", xlabel="batch size", ylabel="test accuracy (%)",
                title="BN train/eval gap")
    axes[1].set_xticks(bss, [str(b) for b in bss])
    axes[1].legend()
  fig.tight_layout()
  return {"sweep": fig}


def plot_recurrent(r):
  plt = _plt()
  d, cfg = r.data, r.config
  lrs, norms, steps = cfg["lrs"], cfg["norms"], d["steps"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for i, n in enumerate(norms):
    final = np.nan_to_num(d["test_acc"][n][:, :, -1], nan=0.1) * 100
    _errorbar(axes[0], _offsets(lrs, i, len(norms)), final, clip=(0, 100), label_=label(n),
              **_style(n))
    j = d["best_lr_index"][n]
    _band(axes[1], steps, d["test_acc"][n][:, j] * 100, color=COLORS.get(n), clip=(0, 100),
          ls=LINESTYLES.get(n, "-"), label_=f"{label(n)} (lr={lrs[j]:g})")
  axes[0].set(xscale="log", xlabel="learning rate", ylabel="final test accuracy (%)",
              title="tanh RNN: learning-rate sweep (mean, 95% CI)")
  axes[1].set(xlabel="step", ylabel="test accuracy (%)", ylim=(50, 100),
              title="Each at its best learning rate (mean ± std)")
  axes[0].legend()
  axes[1].legend()
  fig.tight_layout()
  return {"sweep": fig}


def plot_smoothness(r):
  plt = _plt()
  d, cfg = r.data, r.config
  variants, steps = cfg["variants"], d["steps"]
  fig, axes = plt.subplots(2, 3, figsize=(14, 7))
  ax = axes.ravel()
  for v in variants:
    c = COLORS.get(v)
    _band(ax[0], steps, d["test_acc"][v] * 100, color=c, label_=label(v), clip=(0, 100))
    ax[1].plot(np.arange(1, d["shift"][v].shape[-1] + 1), d["shift"][v].mean(axis=(0, 1)),
               label=label(v), **_style(v))
    _band(ax[2], steps[1:], d["shift"][v].mean(-1), color=c, label_=label(v), log=True)
    _band(ax[3], steps, d["loss_range"][v], color=c, label_=label(v), log=True)
    _band(ax[4], steps, d["grad_change"][v], color=c, label_=label(v), log=True)
    _band(ax[5], steps, d["beta"][v], color=c, label_=label(v), log=True)
  ax[0].set(xlabel="step", ylabel="test accuracy (%)", ylim=(50, 100), title="Test accuracy")
  ax[1].set(xlabel="layer (input of)", ylabel="distribution shift",
            title="Input-distribution shift per layer\n(mean over training)")
  ax[2].set(xlabel="step", ylabel="distribution shift", yscale="log",
            title="Shift between evaluations (mean over layers)")
  ax[3].set(xlabel="step", ylabel="max - min loss", yscale="log",
            title="Loss variation along the gradient")
  ax[4].set(xlabel="step", ylabel="max ||g(θ) - g(θ - ηg)||", yscale="log",
            title="Gradient change along the gradient")
  ax[5].set(xlabel="step", ylabel="max ||Δg|| / ||Δθ||", yscale="log",
            title="Effective β-smoothness")
  _integer_ticks(ax[1])
  for a in ax:
    a.legend(fontsize="small")
  fig.tight_layout()
  return {"smoothness": fig}


def plot_devices(r):
  plt = _plt()
  d, cfg = r.data, r.config
  pdb = cfg["per_device_batch"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for i, mode in enumerate(("sync", "per-device")):
    a = d["eval_acc"][mode] * 100  # (S, P)
    x = _offsets(pdb, i, 2)
    _errorbar(axes[0], x, a, clip=(0, 100), label_=f"{mode} BN", **_style(mode))
    g = d["gap"][mode] * 100
    _errorbar(axes[1], x, g, clip=(-100, 100), label_=f"{mode} BN", **_style(mode))
  axes[1].axhline(0, color="k", lw=0.5, ls=":", label="no gap")
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xticks(pdb, [str(b) for b in pdb])
    ax.set_xlabel(f"per-device batch ({cfg['n_devices']} devices)")
    ax.legend()
  axes[0].set(ylabel="test accuracy (%)", title="Test accuracy (eval mode; mean, 95% CI)")
  axes[1].set(ylabel="train-mode − eval-mode accuracy (pts)", title="Train/eval gap")
  fig.tight_layout()
  return {"devices": fig}
