"""Small networks in plain JAX with a choice of jaxnorm normalizer.

Parameters are explicit pytrees (tuples of dicts) and batch-norm running averages
are explicit state (``jaxnorm.BatchStats``), so every model is two pure functions,
``init(key) -> (params, state)`` and ``apply(params, state, x, *, training) ->
(logits, new_state)``.  The model descriptions are frozen dataclasses, hashable,
so they are static arguments of the jitted training loops.  ``init`` takes an
integer seed and draws with NumPy: nothing to compile, and the same seed gives the
same weights to every model with the same shapes.

The normalizer sits between the linear map and the nonlinearity (Ioffe & Szegedy's
placement).  Statistics are over every axis except the batch axis for the
feature-wise norms (layer, group, RMS) and over every axis except the channel axis
for batch norm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxnorm as jn

NORMS = ("none", "batch", "layer", "group", "rms")
LABELS = {"none": "none", "batch": "BN", "layer": "LN", "group": "GN", "rms": "RMSNorm",
          "batch+noise": "BN+noise"}
ACTIVATIONS = {"relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh}
GAINS = {"relu": math.sqrt(2.0), "sigmoid": 1.0, "tanh": 1.0}


def label(norm: str) -> str:
  """Display name of a normalizer (``"batch"`` -> ``"BN"``)."""
  return LABELS.get(norm, norm)


def _check(norm: str, allowed, where: str) -> None:
  if norm not in allowed:
    raise ValueError(f"{where}: norm must be one of {tuple(allowed)}, got {norm!r}.")


def _stats(shape) -> jn.BatchStats:
  """Fresh running averages (mean 0, var 1), as NumPy arrays (no device work)."""
  return jn.BatchStats(mean=np.zeros(shape, np.float32), var=np.ones(shape, np.float32))


def init_norm(norm: str, n: int) -> tuple[dict, Any]:
  """Parameters (scale/bias) and state (``BatchStats`` or ``()``) for ``n`` features."""
  params: dict = {}
  if norm != "none":
    params["scale"] = np.ones((n,), np.float32)
  if norm in ("batch", "layer", "group"):
    params["bias"] = np.zeros((n,), np.float32)
  state = _stats((n,)) if norm == "batch" else ()
  return params, state


def apply_norm(norm: str, z: jax.Array, p: dict, s: Any, *, training: bool, momentum: float,
               groups: int, axis_name=None) -> tuple[jax.Array, Any]:
  """Normalizes ``z`` (batch first, features last) with the functional API."""
  per_sample = tuple(range(1, z.ndim))
  if norm == "none":
    return z, s
  if norm == "batch":
    return jn.batch_norm(z, s, p["scale"], p["bias"], training=training, momentum=momentum,
                         axis_name=axis_name)
  if norm == "layer":
    return jn.layer_norm(z, p["scale"], p["bias"], reduction_axes=per_sample), s
  if norm == "group":
    return jn.group_norm(z, p["scale"], p["bias"], num_groups=groups), s
  if norm == "rms":
    return jn.rms_norm(z, p["scale"], reduction_axes=per_sample), s
  raise ValueError(f"unknown norm {norm!r}")


def _normal(rng: np.random.Generator, shape, std: float) -> np.ndarray:
  return (std * rng.standard_normal(shape)).astype(np.float32)


def _dense_init(rng: np.random.Generator, fan_in: int, fan_out: int, std: float) -> dict:
  return {"w": _normal(rng, (fan_in, fan_out), std), "b": np.zeros((fan_out,), np.float32)}


def _dense(p: dict, h: jax.Array) -> jax.Array:
  return h @ p["w"] + p["b"][None, :]


@dataclasses.dataclass(frozen=True)
class MLP:
  """Fully connected network: ``sizes = (in, hidden..., out)``.

  Attributes:
    norm: ``none``, ``batch``, ``layer``, ``group`` or ``rms`` after every hidden
      linear layer.
    activation: ``relu``, ``sigmoid`` or ``tanh``.
    weight_scale: multiplies the standard deviation of every weight matrix at
      initialization (He for ReLU, LeCun otherwise, 1/sqrt(fan_in) for the output).
    groups: number of groups for group norm.
    momentum: running-average momentum of batch norm (Flax convention).
    noise: Santurkar et al.'s "noisy BN": after each batch norm, multiply every
      unit by a random factor in ``[1 - noise, 1 + noise]`` and add a random shift
      in ``[-noise, noise]``, both redrawn at every training step, so the next
      layer's input distribution keeps moving.  0 disables it.
  """

  sizes: tuple[int, ...] = (64, 100, 100, 100, 10)
  norm: str = "none"
  activation: str = "relu"
  weight_scale: float = 1.0
  groups: int = 4
  momentum: float = 0.9
  noise: float = 0.0

  def __post_init__(self):
    _check(self.norm, NORMS, "MLP")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"MLP: activation must be one of {tuple(ACTIVATIONS)}, "
                       f"got {self.activation!r}.")
    if self.noise and self.norm != "batch":
      raise ValueError("MLP: noise is injected after batch norm; use norm='batch'.")

  @property
  def n_hidden(self) -> int:
    return len(self.sizes) - 2

  def init(self, seed: int) -> tuple[tuple, tuple]:
    """``(params, state)`` as NumPy pytrees, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    params, state = [], []
    gain = GAINS[self.activation]
    for i, (a, b) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
      last = i == len(self.sizes) - 2
      std = self.weight_scale * (1.0 if last else gain) / math.sqrt(a)
      p = _dense_init(rng, a, b, std)
      if not last:
        p["norm"], s = init_norm(self.norm, b)
        state.append(s)
      params.append(p)
    return tuple(params), tuple(state)

  def apply(self, params, state, x, *, training: bool, key=None, axis_name=None,
            capture: bool = False):
    """Logits and new state; with ``capture``, also each hidden layer's
    pre-normalization ``z`` and output ``h`` (the next layer's input)."""
    act = ACTIVATIONS[self.activation]
    h, new_state, zs, hs = x, [], [], []
    noisy = self.noise > 0 and training and key is not None
    keys = jax.random.split(key, self.n_hidden) if noisy else [None] * self.n_hidden
    for i in range(self.n_hidden):
      p = params[i]
      z = _dense(p, h)
      zs.append(z)
      z, s = apply_norm(self.norm, z, p["norm"], state[i], training=training,
                        momentum=self.momentum, groups=self.groups, axis_name=axis_name)
      if noisy:
        ka, kb = jax.random.split(keys[i])
        mult = jax.random.uniform(ka, (1, z.shape[-1]), minval=1 - self.noise,
                                  maxval=1 + self.noise)
        add = jax.random.uniform(kb, (1, z.shape[-1]), minval=-self.noise, maxval=self.noise)
        z = z * mult + add
      h = act(z)
      hs.append(h)
      new_state.append(s)
    logits = _dense(params[-1], h)
    if capture:
      return logits, tuple(new_state), (zs, hs)
    return logits, tuple(new_state)


@dataclasses.dataclass(frozen=True)
class CNN:
  """A small ReLU conv net on the 8x8 digits: 3x3 convolutions (SAME padding) with
  a normalizer after each, global average pooling and a linear classifier.

  Attributes:
    norm: ``none``, ``batch``, ``layer`` (over H, W, C per sample), ``group`` or ``rms``.
    channels, strides: one entry per convolution.
    groups: number of groups for group norm.
  """

  norm: str = "batch"
  channels: tuple[int, ...] = (16, 32, 32)
  strides: tuple[int, ...] = (1, 2, 1)
  groups: int = 4
  momentum: float = 0.9
  classes: int = 10

  def __post_init__(self):
    _check(self.norm, NORMS, "CNN")
    if len(self.channels) != len(self.strides):
      raise ValueError("CNN: channels and strides must have the same length.")

  def init(self, seed: int):
    """``(params, state)`` as NumPy pytrees, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    params, state, cin = [], [], 1
    for c in self.channels:
      p = {"w": _normal(rng, (3, 3, cin, c), math.sqrt(2.0 / (9 * cin))),
           "b": np.zeros((c,), np.float32)}
      p["norm"], s = init_norm(self.norm, c)
      params.append(p)
      state.append(s)
      cin = c
    params.append(_dense_init(rng, cin, self.classes, 1.0 / math.sqrt(cin)))
    return tuple(params), tuple(state)

  def apply(self, params, state, x, *, training: bool, key=None, axis_name=None):
    del key
    h = x.reshape(x.shape[0], 8, 8, 1)
    new_state = []
    for p, s, stride in zip(params[:-1], state, self.strides):
      h = lax.conv_general_dilated(h, p["w"], (stride, stride), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
      h = h + p["b"][None, None, None, :]
      h, s = apply_norm(self.norm, h, p["norm"], s, training=training, momentum=self.momentum,
                        groups=self.groups, axis_name=axis_name)
      h = jax.nn.relu(h)
      new_state.append(s)
    return _dense(params[-1], h.mean(axis=(1, 2))), tuple(new_state)


@dataclasses.dataclass(frozen=True)
class RNN:
  """An Elman (tanh) RNN reading each 8x8 digit as ``seq_len`` chunks of pixels.

  ``h_t = tanh(norm(x_t W_x + h_{t-1} W_h + b))``; the class is read from ``h_T``.

  Attributes:
    norm: ``none``; ``layer`` (Ba et al. 2016: statistics per sample and time step,
      over the hidden units); or ``batch`` (statistics over the batch, separately for
      each time step, with running averages per time step, as in Cooijmans et al.
      2017).
    hidden: number of hidden units.
    seq_len: number of time steps (a divisor of 64).
  """

  norm: str = "none"
  hidden: int = 64
  seq_len: int = 16
  momentum: float = 0.9
  classes: int = 10

  def __post_init__(self):
    _check(self.norm, ("none", "layer", "batch"), "RNN")
    if 64 % self.seq_len:
      raise ValueError(f"RNN: seq_len must divide 64, got {self.seq_len}.")

  def init(self, seed: int):
    """``(params, state)`` as NumPy pytrees, drawn from ``seed``; ``W_h`` orthogonal."""
    rng = np.random.default_rng(seed)
    d, n = 64 // self.seq_len, self.hidden
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    p = {"wx": _normal(rng, (d, n), 1.0 / math.sqrt(d)),
         "wh": (q * np.sign(np.diag(r))[None, :]).astype(np.float32),
         "b": np.zeros((n,), np.float32)}
    p["norm"], _ = init_norm(self.norm, n)
    out = _dense_init(rng, n, self.classes, 1.0 / math.sqrt(n))
    state = _stats((self.seq_len, n)) if self.norm == "batch" else ()
    return (p, out), state

  def apply(self, params, state, x, *, training: bool, key=None, axis_name=None):
    del key
    p, out = params
    xs = jnp.swapaxes(x.reshape(x.shape[0], self.seq_len, -1), 0, 1)  # (T, B, d)

    def cell(h, inp):
      x_t, s_t = inp
      a = x_t @ p["wx"] + h @ p["wh"] + p["b"][None, :]
      a, s_t = apply_norm(self.norm, a, p["norm"], s_t, training=training,
                          momentum=self.momentum, groups=1, axis_name=axis_name)
      return jnp.tanh(a), s_t

    h0 = jnp.zeros((x.shape[0], self.hidden), x.dtype)
    h, new_state = lax.scan(cell, h0, (xs, state))
    return _dense(out, h), new_state
