"""The global batch shared by the multi-process test and its single-process reference."""

import numpy as np


def global_batch():
  rng = np.random.default_rng(7)
  x = (1e3 + 2.0 * rng.standard_normal((32, 6))).astype(np.float32)
  mask = np.ones((32, 1), bool)
  mask[3:11] = False  # process 0's devices see unequal (and one device zero) valid counts
  return x, mask
