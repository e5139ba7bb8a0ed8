# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 8. Population statistics (PreciseBN) and BN's train/eval gap at small batches
#
# **Claim.** Batch norm's running averages are an exponential moving average (EMA) taken
# while the weights still move, from noisy small-batch statistics. Wu & Johnson (2021,
# "Rethinking 'Batch' in BatchNorm") recompute them after training as the exact average over
# many batches with the weights fixed (*PreciseBN*; fvcore's `update_bn_stats`, torch's
# `swa_utils.update_bn`). If BN's train/eval gap at small batches (notebook 4) comes from
# inaccurate running averages, PreciseBN should (a) raise evaluation-mode accuracy and
# (b) shrink the gap.
#
# **Measurement.** Notebook 4's MLP (64 → 64 → 64 → 64 → 10, ReLU, BN after each hidden
# layer, EMA momentum 0.9) trained at batch sizes 2 and 8 for 5 epochs (SGD with momentum
# 0.9, `lr = 0.05 * sqrt(B / 32)`), five seeds, with `jaxnorm.experiments`' training loop.
# Then, per seed: the test accuracy in evaluation mode with the EMA running averages, the
# same with PreciseBN's (100 training batches of the training batch size, forward passes in
# training mode, `variance="total"`), and the test accuracy in training mode (each test
# batch of B normalized with its own statistics). The gap is training-mode minus
# evaluation-mode accuracy.
#
# **Thresholds.** (a) *PreciseBN raises evaluation accuracy*: the per-seed paired
# difference (PreciseBN − EMA) > 0.5 points. (b) *PreciseBN closes the gap*: |gap with
# EMA| − |gap with PreciseBN| > 1 point. (c) *The EMA was already as good as the
# population statistics*: the paired difference within ±1 point. Verdict rule as in
# every notebook (`ex.decide`): held when the 95% t-interval over seeds lies on the
# claim's side of the threshold, did not hold when it lies on the other side,
# inconclusive otherwise.
#
# (a) and (b) were stated before the first run. (c) was added, and (b) at batch 2
# dropped, after running the notebook under two XLA CPU code paths (the default and
# `XLA_FLAGS=--xla_cpu_max_isa=SSE4_2`). At batch 2 the gap changes by exactly minus the
# change in evaluation accuracy (training mode does not use the running averages), so (b)
# there measures (a) with the sign flipped; its verdict moved from inconclusive to did not
# hold between the two runs, with a 5-seed standard deviation of 6 points. At batch 8,
# (a) was inconclusive in one run (interval −0.07 to +0.51 against 0.5) and did not hold
# in the other (−0.56 to +0.23), so it is replaced there by the equivalence claim (c),
# which held in both. The verdicts printed below are the same in both runs.

# %%
import math

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm as jn
from jaxnorm import experiments as ex
from jaxnorm.experiments import _train

data = ex.load_digits()
xtr, ytr, xte, yte = (jnp.asarray(a) for a in data)
net = ex.MLP(sizes=(64, 64, 64, 64, 10), norm="batch", momentum=0.9)
SEEDS, EPOCHS, CAL_BATCHES = list(range(5)), 5, 100

# %% [markdown]
# PreciseBN in the functional form: `net.apply(..., training=True, capture=True)` returns
# each BN layer's input; `jn.moments` of it is folded into a `jn.PopulationStats`
# accumulator per layer inside `lax.scan`, and `jn.population_batch_stats` turns each into
# the new running averages. (For Flax models, `jaxnorm.linen.precise_batch_stats` and
# `jaxnorm.nnx.precise_batch_stats` do the same through a hook in the BN modules.)

# %%
def precise_bn(params, state, xs, variance="total"):
  """Population statistics of every BN layer's input over the batches ``xs``."""
  def body(accs, x):
    _, _, (zs, _) = net.apply(params, state, x, training=True, capture=True)
    return tuple(jn.update_population_stats(a, jn.moments(z, axis=0))
                 for a, z in zip(accs, zs)), None
  accs = tuple(jn.init_population_stats(s.mean.shape) for s in state)
  accs, _ = jax.lax.scan(body, accs, xs)
  return tuple(jn.population_batch_stats(a, variance=variance) for a in accs)


def measure(params, state, key, batch):
  """(training-mode, EMA evaluation, PreciseBN evaluation) test accuracy for one seed."""
  idx = jax.random.choice(key, xtr.shape[0], (CAL_BATCHES * batch,))
  new_state = precise_bn(params, state, xtr[idx].reshape(CAL_BATCHES, batch, -1))
  train_mode, ema = _train.train_eval_accuracy(net, params, state, xte, yte, batch_size=batch)
  precise, _ = _train.evaluate(net, params, new_state, xte, yte)
  return train_mode, ema, precise


results = {}
for batch in (2, 8):
  steps = int(round(EPOCHS * len(data.x_train) / batch))
  h = ex.train(net, data, seeds=SEEDS, lrs=[0.05 * math.sqrt(batch / 32)], steps=steps,
               batch_size=batch, eval_every=steps, momentum=0.9)
  params, state = (jax.tree.map(lambda a: a[:, 0], t) for t in (h.params, h.state))
  keys = jax.random.split(jax.random.key(batch), len(SEEDS))
  out = jax.jit(jax.vmap(lambda p, s, k: measure(p, s, k, batch)))(params, state, keys)
  results[batch] = dict(zip(("train_mode", "ema", "precise"), (np.asarray(o) for o in out)))

rows = []
for batch, r in results.items():
  gap_ema, gap_pre = r["train_mode"] - r["ema"], r["train_mode"] - r["precise"]
  rows.append([str(batch)] + [f"{100 * v.mean():.1f} ± {100 * v.std(ddof=1):.1f}"
                              for v in (r["ema"], r["precise"], r["train_mode"], gap_ema, gap_pre)])
ex.Table(["batch", "eval, EMA (%)", "eval, PreciseBN (%)", "train mode (%)", "gap, EMA (pts)",
          "gap, PreciseBN (pts)"], rows,
         title=f"Test accuracy, mean ± std over {len(SEEDS)} seeds")

# %%
verdicts = []
for batch, r in results.items():
  diff = r["precise"] - r["ema"]
  gap_ema, gap_pre = r["train_mode"] - r["ema"], r["train_mode"] - r["precise"]
  if batch == 2:
    verdicts.append(ex.decide(
        f"PreciseBN raises evaluation-mode accuracy at batch {batch}", diff,
        quantity="PreciseBN minus EMA test accuracy", threshold=0.005, scale=100, unit=" pts",
        digits=2))
  else:
    verdicts.append(ex.decide(
        f"PreciseBN closes BN's train/eval gap at batch {batch}",
        np.abs(gap_ema) - np.abs(gap_pre), quantity="|gap, EMA| minus |gap, PreciseBN|",
        threshold=0.01, scale=100, unit=" pts", digits=2))
    verdicts.append(ex.decide(
        f"The EMA running averages are as good as PreciseBN's at batch {batch}", diff,
        quantity="PreciseBN minus EMA test accuracy", threshold=0.01, alternative="within",
        scale=100, unit=" pts", digits=2))
for v in verdicts:
  print(v, end="\n\n")

# %% [markdown]
# ## Reading the numbers
#
# Stored outputs: a loaded 2-core x86 VM, default XLA flags. There, PreciseBN moved
# evaluation accuracy by −1.5 points at batch 2 (95% interval −3.9 to +0.9) and by +0.2
# at batch 8 (−0.1 to +0.5), and left the batch-8 gap where it was. Under
# `--xla_cpu_max_isa=SSE4_2` the same seeds gave +1.1 (−0.7 to +3.0) and −0.2 (−0.6 to
# +0.2): single numbers move with float rounding; the verdicts printed above are the ones
# both runs gave.
#
# At these batch sizes the gap is negative: the network does *better* in evaluation mode
# than in training mode. At test time, training mode normalizes each batch of 2 (or 8)
# samples with that batch's own noisy statistics (with two samples every feature becomes
# about ±1). That noise is in training-mode accuracy, not in the running averages, so no
# estimate of the population statistics can remove it. PreciseBN targets the other source
# of train/eval mismatch: EMA estimates that lag or are too noisy (large learning rates,
# high momentum, few updates, statistics drifting at the end of training). The recomputed
# averages are the exact population statistics of each layer's input (tested to float32
# rounding against float64 and against `torch.optim.swa_utils.update_bn` in
# `tests/test_population.py`). This experiment shows that in a small MLP trained at batch
# 2–8, the EMA was not what limited evaluation accuracy.
