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
# # 9. Small batches: Batch Renorm and Ghost BN vs batch norm
#
# **Claims.** (1) Batch Renormalization (Ioffe 2017) trains better than batch norm (BN)
# at very small batches: its training-time output uses the running averages through the
# corrections `r` and `d`, so training and evaluation compute nearly the same function.
# (2) Ghost BN (Hoffer et al. 2017), which normalizes virtual batches smaller than the
# batch, is *not* a small-batch remedy: at batch B we give it virtual batches of B/2, so
# it can only add noise. We measure both against BN, with group norm (GN) as a
# batch-independent reference.
#
# **Measurement.** The MLP of notebook 4 (64 → 64 → 64 → 64 → 10, ReLU, digits) with BN,
# Batch Renorm, Ghost BN or GN (4 groups) after each hidden linear layer, at batch 2, 4
# and 8, for 4 epochs, SGD with momentum 0.9 and `lr = 0.05 * sqrt(B / 32)` (the
# square-root rule of notebook 4); 8 seeds, each giving every normalizer the same initial
# weights and minibatches (paired differences). Batch Renorm follows the paper's warm-up
# scaled to the run: BN (`r_max = 1`, `d_max = 0`) for the first 5% of the steps, then
# linear ramps to `r_max = 3` at 40% and `d_max = 5` at 25% of the steps
# (`jaxnorm.renorm_schedule`); momentum 0.9 for every running average. Ghost BN uses
# virtual batches of B/2 (not defined at batch 2: a virtual batch of one sample has no
# variance). We report test accuracy in evaluation mode (running averages).
#
# **Verdicts, stated in advance.** For each batch size, the paired difference
# (renorm − BN, ghost − BN) in test accuracy over seeds, with its 95% t-interval; the
# threshold is 0 points: "held" only when the interval lies above 0, "did not hold" when
# it lies below, else "inconclusive".

# %%
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm as jn
from jaxnorm import experiments as ex
from jaxnorm.experiments import _common as C
from jaxnorm.experiments import _nets, _train

t0 = time.time()


@dataclasses.dataclass(frozen=True)
class SmallBatchMLP(_nets.MLP):
  """notebook 4's MLP with Batch Renorm or Ghost BN in place of batch norm.

  ``variant``: ``"renorm"`` or ``"ghost"`` (``norm`` stays ``"batch"``, so the
  parameters and running averages are batch norm's).  The state carries the step
  count for Batch Renorm's warm-up: ``(per-layer BatchStats, step)``.
  """

  variant: str = "renorm"
  total_steps: int = 1
  virtual_batch_size: int = 0

  def init(self, seed):
    params, state = super().init(seed)
    return params, (state, np.zeros((), np.int32))

  def apply(self, params, state, x, *, training, key=None, axis_name=None):
    del key, axis_name
    stats, step = state
    t = self.total_steps
    r_max, d_max = jn.renorm_schedule(step, warmup_steps=0.05 * t, r_max_steps=0.4 * t,
                                      d_max_steps=0.25 * t)
    h, new_stats = x, []
    for i in range(self.n_hidden):
      p = params[i]
      z = h @ p["w"] + p["b"][None, :]
      n = p["norm"]
      if self.variant == "renorm":
        z, s = jn.batch_renorm(z, stats[i], n["scale"], n["bias"], training=training,
                               r_max=r_max, d_max=d_max, momentum=self.momentum)
      else:
        z, s = jn.ghost_batch_norm(z, stats[i], n["scale"], n["bias"], training=training,
                                   virtual_batch_size=self.virtual_batch_size,
                                   momentum=self.momentum)
      h = jax.nn.relu(z)
      new_stats.append(s)
    logits = h @ params[-1]["w"] + params[-1]["b"][None, :]
    return logits, (tuple(new_stats), step + 1 if training else step)


# %%
BATCHES, EPOCHS, SEEDS, BASE_LR, HIDDEN = (2, 4, 8), 4, list(range(8)), 0.05, (64, 64, 64)
data = C.load_digits()
n_train = len(data.x_train)
acc = {}  # (method, batch) -> (seeds,) test accuracy
for b in BATCHES:
  steps = int(round(EPOCHS * n_train / b))
  steps -= steps % 4
  lr = BASE_LR * math.sqrt(b / 32)
  sizes = (64,) + HIDDEN + (10,)
  models = {"BN": _nets.MLP(sizes=sizes, norm="batch"),
            "Renorm": SmallBatchMLP(sizes=sizes, norm="batch", variant="renorm",
                                    total_steps=steps),
            "GN": _nets.MLP(sizes=sizes, norm="group", groups=4)}
  if b >= 4:
    models["Ghost"] = SmallBatchMLP(sizes=sizes, norm="batch", variant="ghost",
                                    virtual_batch_size=b // 2)
  for name, model in models.items():
    h = _train.train(model, data, seeds=SEEDS, lrs=[lr], steps=steps, batch_size=b,
                     eval_every=steps, momentum=0.9)
    acc[name, b] = h.metrics["test_acc"][:, 0, -1]
  print(f"batch {b}: {steps} steps, lr {lr:.3g}, {time.time() - t0:.0f} s so far")

# %%
methods = ["BN", "Renorm", "Ghost", "GN"]
rows = []
for b in BATCHES:
  row = [str(b)]
  for m in methods:
    row.append(C.ci(acc[m, b], scale=100, clip=(0, 100)) if (m, b) in acc else "n/a")
  for m in ("Renorm", "Ghost"):
    row.append(C.ci(acc[m, b] - acc["BN", b], scale=100) if (m, b) in acc else "n/a")
  rows.append(row)
table = C.Table(["batch"] + [f"{m} (%)" for m in methods]
                + ["Renorm − BN (pts)", "Ghost − BN (pts)"], rows,
                title=f"Test accuracy (evaluation mode), MLP, {EPOCHS} epochs, mean [95% "
                      f"interval] over {len(SEEDS)} seeds")
table

# %%
verdicts = []
for m, claim in (("Renorm", "Batch Renorm beats BN"), ("Ghost", "Ghost BN (virtual batch B/2) "
                                                                 "beats BN")):
  parts = [C.decide(f"{claim} at batch {b}", acc[m, b] - acc["BN", b],
                    quantity=f"{m} − BN test accuracy", threshold=0.0, scale=100,
                    unit=" pts", digits=2)
           for b in BATCHES if (m, b) in acc]
  verdicts += parts
for v in verdicts:
  print(v, end="\n\n")
print(f"total {time.time() - t0:.0f} s")
