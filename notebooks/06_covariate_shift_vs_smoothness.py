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
# # 6. Internal covariate shift vs a smoother loss landscape
#
# **Claims.** Ioffe & Szegedy (2015) introduced batch norm (BN) to reduce *internal
# covariate shift* (ICS): the change of each layer's input distribution as the layers
# before it train. Santurkar et al. (2018) argue that this is not why BN works: BN
# networks can have as much ICS, and BN's real effect is a smoother loss landscape, in
# which the gradient predicts the loss and the next gradient better.
#
# **Measurement.** A ReLU MLP (4 hidden layers of 64) trained with plain SGD at the same
# learning rate (0.1) in three versions: without BN; with BN; and with *noisy BN*
# (Santurkar et al.'s control): after every BN, each unit is multiplied by a random factor
# in [0.5, 1.5] and shifted by a random amount in [-0.5, 0.5], redrawn at every training
# step, so every layer's input distribution keeps moving on purpose. Every 30 steps we
# measure, on fixed data:
#
# * **input shift**: for every unit of every hidden layer's output (the next layer's input),
#   the 1-Wasserstein distance between its distributions over the test set at consecutive
#   evaluations (from 9 quantiles), divided by the layer's mean unit std: scale-free;
# * **ICS as Santurkar et al. define it**: `G_i`, the gradient of layer i's weights, and
#   `G'_i`, the same gradient after an SGD step of the layers before i only;
#   `||G_i - G'_i|| / ||G_i||` and `cos(G_i, G'_i)`;
# * **loss landscape along the gradient** `g`, at steps `η = lr × {0.25, 0.5, 1, 2, 4}`:
#   the range of the loss, `max ||∇L(θ - ηg) - g||` (gradient predictiveness), the
#   effective β-smoothness `max ||∇L(θ - ηg) - g|| / ||ηg||`, and the actual loss decrease of
#   a step at the training learning rate divided by its first-order prediction `lr ||g||²`.
#
# Five seeds.
#
# **Thresholds** (per seed, log10 ratios none / BN, > 0): input shift, Santurkar et al.'s
# ICS, and each of loss range, gradient change and β-smoothness (all three claimed).
# *Reducing ICS is why BN helps*: refuted (did not hold) when noisy BN has more input
# shift than no normalization (log10 ratio > 0) **and** still trains as well (accuracy
# minus none's > -1 point); supported (held) when it has more shift and trains worse;
# inconclusive otherwise.
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

sm = ex.smoothness(seeds=5)
sm.tables["smoothness"]

# %%
sm.tables["per_layer"]

# %%
figs = sm.figures()

# %%
for v in sm.verdicts:
  print(v, end="\n\n")
