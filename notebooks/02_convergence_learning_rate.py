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
# # 2. Convergence and learning rate
#
# **Claims.** Batch norm (BN) speeds up convergence, and it allows higher learning rates
# (Ioffe & Szegedy, 2015). Do layer norm (LN), group norm (GN) and RMSNorm do the same?
#
# **Measurement.** The same ReLU MLP (64 → 100 → 100 → 100 → 10) on scikit-learn's digits
# (1437 training, 360 test images), with no normalization, BN, LN, GN (4 groups) or
# RMSNorm after every hidden linear layer; plain SGD, minibatches of 64, 500 steps, a
# learning-rate sweep from 0.01 to 3, ten seeds (seed = initial weights and minibatch
# order, shared by all variants). Test accuracy (evaluation mode) every 25 steps. We
# report the final accuracy, the median number of steps to reach 96% test accuracy, and
# the *usable* learning rates: those at which **every** seed ends at ≥ 96% test accuracy
# with a finite loss (a rate where any seed diverged is not usable).
#
# **Thresholds, stated in advance.** *Speeds up convergence*: steps to 96% without
# normalization minus with BN, each at its fastest learning rate (a seed that never gets
# there counts 525), > 0. *Allows higher learning rates*: log10 of the largest learning
# rate at which a seed ends trained, BN minus none (0.5 = one step of the sweep), > 0;
# the same for LN, GN and RMSNorm (all three claimed).
#
# **Verdict rule** (`ex.decide`, the same for every claim): a claim is a statement about a measured
# quantity per seed, usually a paired difference (a seed gives every variant the same initial
# weights and minibatches). It **held** when the 95% t-interval of the mean over seeds lies on the
# claim's side of the threshold stated below, **did not hold** when it lies on the other side,
# and is **inconclusive** when it contains the threshold; a claim made of parts (`ex.combine`) is
# *held only under conditions* when every part was decided and some held, some did not. Single
# numbers move between CPUs (float rounding differs, and small trainings amplify it); a verdict
# should not.
#
# All numbers below are computed when the notebook runs; the verdicts are derived from
# them by `jaxnorm.experiments.convergence` (see its source for the rules).

# %%
from jaxnorm import experiments as ex

# %%
conv = ex.convergence(seeds=10)

# %%
conv.tables["summary"]

# %%
conv.tables["final_accuracy"]

# %%
conv.tables["steps_to_target"]

# %%
figs = conv.figures()  # training curves at lr=0.1, and the learning-rate sweep

# %% [markdown]
# ### Verdicts

# %%
for v in conv.verdicts:
  print(v, end="\n\n")

# %% [markdown]
# ## Ioffe & Szegedy's MNIST figure, on the digits
#
# **Claim** (Ioffe & Szegedy 2015, Figure 1): a network of 3 fully connected hidden layers
# of 100 sigmoid units trains faster and reaches higher test accuracy with BN, and the
# distribution of the inputs to its sigmoids is much more stable during training
# (the paper plots their 15th, 50th and 85th percentiles).
#
# **Measurement.** That network on the digits (their MNIST is not bundled with any
# package; the digits are 8x8 instead of 28x28), minibatches of 60 as in the paper, plain
# SGD for 2000 steps at three learning rates, eight seeds. Test accuracy every 50 steps,
# and the {15, 50, 85}th percentiles over the test set of the input of every sigmoid in
# the last hidden layer. The *drift* of a sigmoid's input distribution is the distance of
# those percentiles from their end-of-training values, averaged over evaluations, units
# and percentiles.
#
# **Thresholds.** At every learning rate, per seed: test accuracy at step 200, BN minus
# none, > 0 (trains faster); at step 2000, > 0 (ends higher); log10(drift without BN /
# drift with BN) > 0 (steadier inputs).

# %%
iss = ex.ioffe_szegedy(seeds=8)
iss.table

# %%
figs = iss.figures()  # (a) test accuracy, (b, c) percentiles of one sigmoid's input

# %%
for v in iss.verdicts:
  print(v, end="\n\n")
