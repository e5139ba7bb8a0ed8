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
# # 4. Batch size: batch norm vs layer norm vs group norm
#
# **Claims.** Batch norm (BN) degrades at very small batch sizes, where its statistics
# are noisy; layer norm (LN) and group norm (GN) normalize each sample on its own and do
# not depend on the batch size (Wu & He, 2018). At small batches BN also behaves
# differently in training (batch statistics) and evaluation (running averages).
#
# **Measurement.** A ReLU MLP (64 → 64 → 64 → 64 → 10) with BN, LN or GN (4 groups) after
# each hidden linear layer, trained at batch sizes 2, 4, ..., 256 for the same number of
# epochs (20), SGD with momentum 0.9 and the square-root scaling rule
# `lr = 0.05 * sqrt(B / 32)`; ten seeds. We report test accuracy in evaluation mode
# and BN's *train/eval gap*: test accuracy in training mode (each test batch of size B
# normalized with its own statistics, as in training) minus evaluation mode, on the same
# test images.
#
# **Thresholds.** *BN degrades*: BN's accuracy at its best batch size minus at batch 2,
# > 5 points. *LN / GN do not depend on the batch size*: each one's best minus worst
# batch size, < 5 points. *BN's gap grows*: |gap| at batch 2 minus at batch 256, > 2 points.
#
# **Verdict rule** (`ex.decide`, the same for every claim): a claim is a statement about a measured
# quantity per seed, usually a paired difference (a seed gives every variant the same initial
# weights and minibatches). It **held** when the 95% t-interval of the mean over seeds lies on the
# claim's side of the threshold stated below, **did not hold** when it lies on the other side,
# and is **inconclusive** when it contains the threshold; a claim made of parts (`ex.combine`) is
# *held only under conditions* when every part was decided and some held, some did not. Single
# numbers move between CPUs (float rounding differs, and small trainings amplify it); a verdict
# should not.

# %%
from jaxnorm import experiments as ex

bs = ex.batch_size(seeds=10)
bs.table

# %%
figs = bs.figures()

# %%
for v in bs.verdicts:
  print(v, end="\n\n")

# %% [markdown]
# ## Condition: statistics pooled over positions
#
# In the MLP, BN's statistics at batch size B come from exactly B numbers per feature. In
# a convolutional network they also pool over the spatial positions (here 8x8, then 4x4),
# so even a batch of 2 gives each channel 32 to 128 values. The same measurement with a
# small CNN (3x3 convolutions with 16, 32, 32 channels, global average pooling), BN vs
# GN, batch 2 vs 32, 5 epochs, twenty seeds (see the check at the end for why twenty):

# %%
cnn = ex.batch_size(model="cnn", norms=("batch", "group"), batch_sizes=(2, 32), epochs=5,
                    seeds=20)
cnn.table

# %%
for v in cnn.verdicts:
  print(v, end="\n\n")

# %% [markdown]
# ### Summary computed from both runs

# %%
drop_mlp = bs.data["eval_acc"]["batch"].mean(0)
drop_cnn = cnn.data["eval_acc"]["batch"].mean(0)
print(f"BN, MLP: batch {bs.config['batch_sizes'][0]} reaches {drop_mlp[0]:.1%} vs "
      f"{drop_mlp.max():.1%} at its best batch size")
print(f"BN, CNN: batch {cnn.config['batch_sizes'][0]} reaches {drop_cnn[0]:.1%} vs "
      f"{drop_cnn.max():.1%} at its best batch size")
print(ex.combine("Batch norm degrades at very small batch sizes, in an MLP and in a CNN",
                 [bs.verdicts[0], cnn.verdicts[0]],
                 context="MLP: B values per statistic; CNN: statistics also over positions"))

# %% [markdown]
# **Checked on another code path.** Run again with `XLA_FLAGS=--xla_cpu_max_isa=SSE4_2`
# (same machine, same seeds), every verdict of this notebook is the same. How we got there,
# in order: at five seeds three verdicts moved between the two paths; the seed count was
# raised to ten (thresholds unchanged), after which only the CNN's "BN's train/eval gap
# grows" moved (3.3 [2.2, 4.4] points, held, vs 2.9 [1.95, 3.7], inconclusive). The CNN was
# then raised to twenty seeds: 2.8 [1.95, 3.7] points on the default path and 2.6 [1.8, 3.5]
# on the SSE4.2 path (CPU kernels off there), and 2.4 [1.8, 3.1] in the run stored above
# (default path, with the CPU column-sum kernel now taking batch and group norm's
# statistics) — **inconclusive** every time against the 2-point threshold: BN's gap in the
# CNN is 2.5–3 points and the data cannot say whether it exceeds 2. The other two CNN
# verdicts agree at twenty seeds (BN degrades: did not hold; GN does not depend on the batch
# size: held), and the MLP's verdicts are unchanged by the kernels (its "gap grows": 7.1
# [2.6, 11.7] points, held). Raising the seed count after seeing a verdict move is
# sequential testing; every stage is reported here, and the reading of that claim is
# "inconclusive" either way.
