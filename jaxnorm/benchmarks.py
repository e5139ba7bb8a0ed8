"""Benchmarks: jaxnorm against the memory floor, flax.linen, flax.nnx and torch.

Run ``python -m jaxnorm.benchmarks`` (a few minutes), ``--quick`` (under a
minute, smaller shapes, ratios indicative only), ``--cases REGEX`` to select
cases, ``--markdown`` for the README, ``--glibc-tuned`` to re-run the process with
glibc's malloc keeping freed memory (see below), ``--help`` for the rest.

How a case is judged.  Normalization is memory-bound, so each case is timed
against a *floor*: a jitted ``x * 2 + 1`` on the same input, which reads it once
and writes one array of the same size.  All competitors of a case run
interleaved, round by round, in a freshly shuffled order each round (torch last,
followed by a 20 ms pause: its OpenMP threads spin after each call and would slow
the next competitor), after a warm-up that is not timed; the table gives the
median over the rounds, and ratios of medians measured in the same run (absolute
times on a shared machine drift by 2-4x within minutes; ratios within one run do
not).  For the JAX competitors it also gives XLA's deterministic figures:
``cost_analysis()`` bytes accessed and ``memory_analysis()`` temporary bytes of the
compiled executable.

Forward+backward ("fwd+bwd") is ``jax.grad`` of ``sum(y * g)`` with respect to
``x``, ``scale`` and ``bias`` (torch: ``torch.autograd.grad(y, (x, w, b), g)``).

Allocation.  XLA:CPU and torch allocate their outputs and temporaries on every
call; glibc returns blocks of 32 MiB or more to the OS on ``free``, so each call
page-faults them in again, which can cost more than the arithmetic.  With
``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736``
(which must be set before the process starts; ``--glibc-tuned`` re-executes the
harness with it) the timings show compute and memory traffic alone.  Run both:
the first is what users get, the second what the code does.

Paths of jaxnorm: ``jaxnorm`` is the public functions as they are (the
custom-VJP fast path of ``jaxnorm._vjp``); ``--reference`` adds ``jaxnorm-ref``
(the public functions traced inside ``jaxnorm.plain_autodiff()``: plain
autodiff of the same statistics).

The harness runs unchanged on a GPU (the floor is then device memory bandwidth;
torch stays on the CPU and is left out there unless ``--torch-on-cpu``).
Heavy imports (flax, torch) happen inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

GLIBC_TUNED = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
               "glibc.malloc.trim_threshold=68719476736")

TORCH_SETTLE_S = 0.02  # pause after each timed torch call (see run_case)
COMPETITORS = ("floor", "floor-ffi", "jaxnorm", "jaxnorm-xla", "flax.linen", "flax.nnx",
               "torch")
REF = "jaxnorm-ref"    # the plain reference path (--reference)
SHORT = {"floor-ffi": "ffi", "jaxnorm-xla": "xla", "flax.linen": "linen", "flax.nnx": "nnx",
         REF: "ref"}   # column headers of the summary (it fits 100 columns)


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark: a normalizer, a shape, a dtype, forward or forward+backward."""

  name: str                       # selector, e.g. "layer_norm/fwd+bwd/bf16"
  norm: str                       # batch_norm_{train,eval}, layer_norm, rms_norm, group_norm
  shape: tuple[int, ...]          # full size (the table)
  quick_shape: tuple[int, ...]    # --quick
  tiny_shape: tuple[int, ...]     # --tiny (tests)
  dtype: str = "float32"
  grad: bool = False
  target: float | None = None     # jaxnorm's target ratio to the floor (the CPU
                                  # kernel issue, #14; None: no target)
  passes: float | None = None     # pass-count limit: full-array passes needed at least,
                                  # in floors (the floor reads x and writes y: 2 arrays)

  def shape_for(self, size: str) -> tuple[int, ...]:
    return {"full": self.shape, "quick": self.quick_shape, "tiny": self.tiny_shape}[size]

  @property
  def has_bias(self) -> bool:
    return self.norm != "rms_norm"


NHWC, NHWC_Q, NHWC_T = (64, 32, 32, 64), (8, 32, 32, 64), (2, 4, 4, 8)
NC, NC_Q, NC_T = (4096, 1024), (512, 1024), (16, 32)
TOK, TOK_Q, TOK_T = (8192, 1024), (1024, 1024), (16, 32)
GN, GN_Q, GN_T = (32, 32, 32, 128), (4, 32, 32, 128), (2, 4, 4, 64)
BLK, BLK_Q, BLK_T = (8, 128, 256), (2, 64, 256), (2, 8, 32)          # (batch, tokens, width)
RES, RES_Q, RES_T = (8, 28, 28, 256), (2, 14, 14, 256), (2, 4, 4, 32)  # NHWC, 4x bottleneck
GRB, GRB_Q, GRB_T = (8, 32, 32, 64), (2, 16, 16, 64), (2, 4, 4, 64)  # NHWC, GN res block

CASES = (
    Case("batch_norm/train/fwd/nhwc", "batch_norm_train", NHWC, NHWC_Q, NHWC_T, target=1.4,
         passes=1.5),
    Case("batch_norm/train/fwd+bwd/nhwc", "batch_norm_train", NHWC, NHWC_Q, NHWC_T, grad=True,
         target=3.0, passes=2.5),
    Case("batch_norm/train/fwd/nc", "batch_norm_train", NC, NC_Q, NC_T, target=1.5,
         passes=1.5),
    Case("batch_norm/train/fwd+bwd/nc", "batch_norm_train", NC, NC_Q, NC_T, grad=True,
         passes=2.5),
    Case("batch_norm/eval/fwd/nhwc", "batch_norm_eval", NHWC, NHWC_Q, NHWC_T, target=0.75,
         passes=1.0),
    Case("layer_norm/fwd", "layer_norm", TOK, TOK_Q, TOK_T, target=1.1, passes=1.0),
    Case("layer_norm/fwd+bwd", "layer_norm", TOK, TOK_Q, TOK_T, grad=True, target=1.8,
         passes=1.5),
    Case("layer_norm/fwd/bf16", "layer_norm", TOK, TOK_Q, TOK_T, dtype="bfloat16", passes=1.0),
    Case("layer_norm/fwd+bwd/bf16", "layer_norm", TOK, TOK_Q, TOK_T, dtype="bfloat16",
         grad=True, target=1.8, passes=1.5),
    Case("rms_norm/fwd", "rms_norm", TOK, TOK_Q, TOK_T, passes=1.0),
    Case("rms_norm/fwd+bwd", "rms_norm", TOK, TOK_Q, TOK_T, grad=True, target=1.8, passes=1.5),
    Case("group_norm/fwd/nhwc", "group_norm", GN, GN_Q, GN_T, target=1.2, passes=1.0),
    Case("group_norm/fwd+bwd/nhwc", "group_norm", GN, GN_Q, GN_T, grad=True, target=1.9,
         passes=1.5),
    # BN folding (inference): 'jaxnorm' = conv3x3 with the folded kernel/bias + relu;
    # linen/nnx/torch = their conv3x3 + batch norm (eval) + relu, unfolded
    Case("fold/conv3x3+bn+relu/eval/nhwc", "conv_bn_relu", (16, 32, 32, 64), NHWC_Q, NHWC_T),
    # Model level (fwd+bwd): what the CPU kernels change next to XLA's fusions
    # ('jaxnorm' vs 'jaxnorm-xla'); flax.linen with its own norms alongside.
    Case("model/pre-ln-block/fwd+bwd", "transformer_block", BLK, BLK_Q, BLK_T, grad=True),
    Case("model/pre-ln-block/fwd+bwd/bf16", "transformer_block", BLK, BLK_Q, BLK_T,
         dtype="bfloat16", grad=True),
    Case("model/bottleneck/fwd+bwd/nhwc", "resnet_bottleneck", RES, RES_Q, RES_T, grad=True),
    Case("model/bottleneck/fwd+bwd/nhwc/bf16", "resnet_bottleneck", RES, RES_Q, RES_T,
         dtype="bfloat16", grad=True),
    Case("model/gn-resblock/fwd+bwd/nhwc", "gn_resblock", GRB, GRB_Q, GRB_T, grad=True),
    Case("model/gn-resblock/fwd+bwd/nhwc/bf16", "gn_resblock", GRB, GRB_Q, GRB_T,
         dtype="bfloat16", grad=True),
)
MODELS = ("transformer_block", "resnet_bottleneck", "gn_resblock")

BN_EPS, EPS, GROUPS, MOMENTUM = 1e-5, 1e-6, 32, 0.99


class Unavailable(Exception):
  """A competitor that cannot run here (not installed, unsupported); it is skipped."""


@dataclasses.dataclass
class Inputs:
  """The numbers every competitor of a case gets (float32 NumPy; cast per framework)."""

  x: np.ndarray
  scale: np.ndarray
  bias: np.ndarray
  g: np.ndarray
  run_mean: np.ndarray
  run_var: np.ndarray
  dtype: str

  @staticmethod
  def make(case: Case, shape: tuple[int, ...], seed: int) -> "Inputs":
    rng = np.random.default_rng(seed)
    c = shape[-1]
    f32 = np.float32
    return Inputs(
        x=(rng.standard_normal(shape) * 2 + 0.5).astype(f32),
        scale=(1 + 0.1 * rng.standard_normal(c)).astype(f32),
        bias=(0.1 * rng.standard_normal(c)).astype(f32),
        g=rng.standard_normal(shape).astype(f32),
        run_mean=(0.1 * rng.standard_normal(c)).astype(f32),
        run_var=(1 + rng.uniform(size=c)).astype(f32),
        dtype=case.dtype)


@dataclasses.dataclass
class Runner:
  """A ready-to-time competitor: ``call()`` runs once and returns when the result is ready."""

  name: str
  call: Callable[[], Any]
  outputs: Callable[[], list[np.ndarray]]  # y (fwd) or [dx, dscale, dbias] (fwd+bwd)
  compiled: Any = None                     # jax.stages.Compiled, for XLA's figures


@dataclasses.dataclass
class Result:
  case: Case
  shape: tuple[int, ...]
  times: dict[str, list[float]]            # seconds per call, per competitor
  skipped: dict[str, str]                  # competitor -> reason
  xla: dict[str, tuple[float | None, float | None]]  # competitor -> (bytes accessed, temp bytes)
  agree: dict[str, str]                    # competitor -> "ok" or the mismatch

  def median(self, name: str) -> float | None:
    t = self.times.get(name)
    return statistics.median(t) if t else None

  def ratio(self, name: str, other: str) -> float | None:
    a, b = self.median(name), self.median(other)
    return None if a is None or b is None else a / b

  def spread(self, name: str) -> float | None:
    """Interquartile range over median: how noisy this competitor was."""
    t = self.times.get(name)
    if not t or len(t) < 4:
      return None
    q = statistics.quantiles(t, n=4)
    return (q[2] - q[0]) / statistics.median(t)


# --------------------------------------------------------------------------- JAX competitors


def _jax_dtype(name: str):
  import jax.numpy as jnp
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _jax_runner(name: str, case: Case, inputs: Inputs, apply: Callable, params: Any,
                state: Any, grads_of: Callable[[Any, Any], list]) -> Runner:
  """Jits ``apply(x, params, state) -> (y, new_state)`` as the case asks and compiles it.

  Forward: returns ``(y, new_state)`` (the running-average update is part of a
  batch-norm training step).  Forward+backward: ``jax.grad`` of ``sum(y * g)``
  with respect to ``x`` and ``params``.  ``grads_of(dx, dparams)`` orders the
  gradients as ``[dx, dscale, dbias]`` for the cross-check.
  """
  import jax
  import jax.numpy as jnp
  dtype = _jax_dtype(inputs.dtype)
  x = jnp.asarray(inputs.x, dtype)
  g = jnp.asarray(inputs.g, dtype)
  if case.grad:
    def fn(x, params, state, g):
      loss = lambda x, params: jnp.sum(apply(x, params, state)[0] * g)
      return jax.grad(loss, argnums=(0, 1))(x, params)
    args = (x, params, state, g)
  else:
    fn = apply
    args = (x, params, state)
  compiled = jax.jit(fn).lower(*args).compile()

  def call():
    return jax.block_until_ready(compiled(*args))

  def outputs():
    out = compiled(*args)
    arrs = grads_of(*out) if case.grad else [out[0]]
    return [np.asarray(jnp.asarray(a, jnp.float32)) for a in arrs]

  return Runner(name, call, outputs, compiled)


def build_floor(case: Case, inputs: Inputs) -> Runner:
  import jax
  import jax.numpy as jnp
  x = jnp.asarray(inputs.x, _jax_dtype(inputs.dtype))
  compiled = jax.jit(lambda x: x * 2 + 1).lower(x).compile()
  return Runner("floor", lambda: jax.block_until_ready(compiled(x)), lambda: [], compiled)


def build_floor_ffi(case: Case, inputs: Inputs) -> Runner:
  """The second floor: the same ``x * 2 + 1`` as a C++ FFI kernel (jaxnorm._cpu)."""
  import jax
  import jax.numpy as jnp

  import jaxnorm as jn
  if jax.default_backend() != "cpu" or not jn.kernels_available():
    raise Unavailable("needs jaxnorm's CPU kernels (jaxnorm.kernels_available() is False)")
  if inputs.dtype != "float32":
    raise Unavailable("float32 only")
  x = jnp.asarray(inputs.x)
  call = jax.ffi.ffi_call("jaxnorm_axpb", jax.ShapeDtypeStruct(x.shape, x.dtype))
  compiled = jax.jit(call).lower(x).compile()
  return Runner("floor-ffi", lambda: jax.block_until_ready(compiled(x)), lambda: [], compiled)


def _params(inputs: Inputs, case: Case) -> dict:
  import jax.numpy as jnp
  p = {"scale": jnp.asarray(inputs.scale)}
  if case.has_bias:
    p["bias"] = jnp.asarray(inputs.bias)
  return p


def _dict_grads(case: Case):
  def grads_of(dx, dp):
    return [dx, dp["scale"]] + ([dp["bias"]] if case.has_bias else [])
  return grads_of


def _jaxnorm_apply(case: Case, *, reference: bool = False, xla: bool = False):
  """``apply(x, params, state)`` through jaxnorm's public functions.

  ``reference``: the plain autodiff path (``_vjp`` switched off while tracing);
  ``xla``: the custom-VJP XLA path (the fused CPU kernels switched off).
  """
  import jaxnorm as jn
  norm = case.norm

  def apply(x, p, state):
    ctx = (jn.plain_autodiff() if reference else jn.no_kernels() if xla
           else contextlib.nullcontext())
    with ctx:
      if norm == "batch_norm_train":
        return jn.batch_norm(x, state, p["scale"], p["bias"], training=True, momentum=MOMENTUM,
                             epsilon=BN_EPS)
      if norm == "batch_norm_eval":
        return jn.batch_norm(x, state, p["scale"], p["bias"], training=False, epsilon=BN_EPS)
      if norm == "layer_norm":
        return jn.layer_norm(x, p["scale"], p["bias"], epsilon=EPS), state
      if norm == "rms_norm":
        return jn.rms_norm(x, p["scale"], epsilon=EPS), state
      if norm == "group_norm":
        return jn.group_norm(x, p["scale"], p["bias"], num_groups=GROUPS, epsilon=EPS), state
    raise ValueError(norm)
  return apply


def build_jaxnorm(case: Case, inputs: Inputs, *, reference: bool = False,
                  xla: bool = False) -> Runner:
  import jax.numpy as jnp

  import jaxnorm as jn
  state = None
  if case.norm.startswith("batch_norm"):
    state = jn.BatchStats(mean=jnp.asarray(inputs.run_mean), var=jnp.asarray(inputs.run_var))
  name = REF if reference else "jaxnorm-xla" if xla else "jaxnorm"
  apply = _jaxnorm_apply(case, reference=reference, xla=xla)
  return _jax_runner(name, case, inputs, apply, _params(inputs, case), state,
                     _dict_grads(case))


def build_linen(case: Case, inputs: Inputs) -> Runner:
  import jax
  import jax.numpy as jnp
  try:
    import flax.linen as nn
  except ImportError as e:
    raise Unavailable(f"flax is not installed ({e})") from None
  dtype = _jax_dtype(inputs.dtype)
  norm = case.norm
  if norm.startswith("batch_norm"):
    module = nn.BatchNorm(use_running_average=norm == "batch_norm_eval", momentum=MOMENTUM,
                          epsilon=BN_EPS, dtype=dtype)
  elif norm == "layer_norm":
    module = nn.LayerNorm(epsilon=EPS, dtype=dtype)
  elif norm == "rms_norm":
    module = nn.RMSNorm(epsilon=EPS, dtype=dtype)
  elif norm == "group_norm":
    module = nn.GroupNorm(num_groups=GROUPS, epsilon=EPS, dtype=dtype)
  else:
    raise ValueError(norm)
  state = None
  if norm.startswith("batch_norm"):
    state = {"mean": jnp.asarray(inputs.run_mean), "var": jnp.asarray(inputs.run_var)}

  def apply(x, p, state):
    if norm == "batch_norm_train":
      y, upd = module.apply({"params": p, "batch_stats": state}, x, mutable=["batch_stats"])
      return y, upd["batch_stats"]
    if norm == "batch_norm_eval":
      return module.apply({"params": p, "batch_stats": state}, x), state
    return module.apply({"params": p}, x), state

  variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1,) * (inputs.x.ndim - 1)
                                                                      + inputs.x.shape[-1:]))
  if set(variables["params"]) != set(_params(inputs, case)):
    raise Unavailable(f"unexpected flax.linen params {sorted(variables['params'])}")
  return _jax_runner("flax.linen", case, inputs, apply, _params(inputs, case), state,
                     _dict_grads(case))


def build_nnx(case: Case, inputs: Inputs) -> Runner:
  import jax
  import jax.numpy as jnp
  try:
    from flax import nnx
  except ImportError as e:
    raise Unavailable(f"flax is not installed ({e})") from None
  dtype = _jax_dtype(inputs.dtype)
  norm, c = case.norm, inputs.x.shape[-1]
  rngs = nnx.Rngs(0)
  if norm.startswith("batch_norm"):
    model = nnx.BatchNorm(c, use_running_average=norm == "batch_norm_eval", momentum=MOMENTUM,
                          epsilon=BN_EPS, dtype=dtype, rngs=rngs)
    model.mean[...] = jnp.asarray(inputs.run_mean)
    model.var[...] = jnp.asarray(inputs.run_var)
  elif norm == "layer_norm":
    model = nnx.LayerNorm(c, epsilon=EPS, dtype=dtype, rngs=rngs)
  elif norm == "rms_norm":
    model = nnx.RMSNorm(c, epsilon=EPS, dtype=dtype, rngs=rngs)
  elif norm == "group_norm":
    model = nnx.GroupNorm(c, num_groups=GROUPS, epsilon=EPS, dtype=dtype, rngs=rngs)
  else:
    raise ValueError(norm)
  model.scale[...] = jnp.asarray(inputs.scale)
  if case.has_bias:
    model.bias[...] = jnp.asarray(inputs.bias)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply(x, p, st):
    # Fresh Variables at the current trace level (nnx refuses to mutate a
    # BatchStat created under an outer trace, e.g. jit around grad).
    p, st = jax.tree.map(lambda a: a, (p, st))
    m = nnx.merge(graphdef, p, st)
    y = m(x)
    return y, nnx.split(m, nnx.Param, ...)[2]

  def grads_of(dx, dp):
    d = nnx.to_pure_dict(dp)
    return [dx, d["scale"]] + ([d["bias"]] if case.has_bias else [])

  return _jax_runner("flax.nnx", case, inputs, apply, params, rest, grads_of)


# --------------------------------------------------------------------------- torch


def build_torch(case: Case, inputs: Inputs, *, allow_off_cpu: bool = False) -> Runner:
  import jax
  if jax.default_backend() != "cpu" and not allow_off_cpu:
    raise Unavailable("JAX runs on an accelerator and torch on the CPU; pass --torch-on-cpu "
                      "to include it anyway")
  try:
    import torch
    import torch.nn.functional as F
  except ImportError as e:
    raise Unavailable(f"torch is not installed ({e})") from None
  torch.set_num_threads(_cores())
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[inputs.dtype]
  nhwc = inputs.x.ndim == 4

  def tensor(a, dtype=tdtype):
    t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
    # NHWC memory seen as NCHW with channels_last strides: torch's own NHWC layout.
    return t.permute(0, 3, 1, 2) if nhwc else t

  x, g = tensor(inputs.x), tensor(inputs.g)
  w, b = torch.from_numpy(inputs.scale.copy()), torch.from_numpy(inputs.bias.copy())
  rm, rv = torch.from_numpy(inputs.run_mean.copy()), torch.from_numpy(inputs.run_var.copy())
  c = inputs.x.shape[-1]
  norm = case.norm

  def forward(x, w, b):
    if norm == "batch_norm_train":
      return F.batch_norm(x, rm, rv, w, b, training=True, momentum=1 - MOMENTUM, eps=BN_EPS)
    if norm == "batch_norm_eval":
      return F.batch_norm(x, rm, rv, w, b, training=False, eps=BN_EPS)
    if norm == "layer_norm":
      return F.layer_norm(x, (c,), w, b, eps=EPS)
    if norm == "rms_norm":
      return F.rms_norm(x, (c,), w, eps=EPS)
    if norm == "group_norm":
      return F.group_norm(x, GROUPS, w, b, eps=EPS)
    raise ValueError(norm)

  try:
    with torch.no_grad():
      forward(x, w, b)
  except RuntimeError:  # e.g. no mixed bf16 input / f32 weight kernel: use bf16 weights
    w, b = w.to(tdtype), b.to(tdtype)
  params = [w, b] if case.has_bias else [w]

  if case.grad:
    x.requires_grad_(True)
    for p in params:
      p.requires_grad_(True)

    def call():
      y = forward(x, w, b)
      return torch.autograd.grad(y, [x] + params, g)
  else:
    def call():
      with torch.no_grad():
        return forward(x, w, b)

  def to_numpy(t):
    t = t.detach().float()
    return (t.permute(0, 2, 3, 1) if nhwc and t.ndim == 4 else t).contiguous().numpy()

  def outputs():
    out = call()
    return [to_numpy(t) for t in (out if case.grad else [out])]

  return Runner("torch", call, outputs)


def _conv_bn_relu_runner(name: str, case: Case, inputs: Inputs) -> Runner:
  """The BN-folding case: ``relu(BN_eval(conv3x3(x)))`` on NHWC, C -> C channels.

  ``jaxnorm`` runs it folded (:func:`jaxnorm.fold_batch_norm`: one conv with the
  folded kernel and bias, then relu); ``flax.linen``, ``flax.nnx`` and ``torch`` run
  their conv, their batch norm in evaluation and relu, unfolded.  The report
  prints the speed-up (unfolded / folded); the outputs are cross-checked.
  """
  if name in ("floor", "floor-ffi"):
    return (build_floor if name == "floor" else build_floor_ffi)(case, inputs)
  if name not in ("jaxnorm", "flax.linen", "flax.nnx", "torch"):
    raise Unavailable("not applicable to the folding case")
  c = inputs.x.shape[-1]
  rng = np.random.default_rng(1)
  w = (rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c)).astype(np.float32)  # HWIO
  b = (0.1 * rng.standard_normal(c)).astype(np.float32)
  if name == "torch":
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(_cores())
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    x = t(inputs.x).permute(0, 3, 1, 2)  # NHWC memory as channels_last NCHW
    tw = t(w.transpose(3, 2, 0, 1)).contiguous(memory_format=torch.channels_last)
    bn = [t(a) for a in (inputs.run_mean, inputs.run_var, inputs.scale, inputs.bias)]

    def call():
      with torch.no_grad():
        return F.relu(F.batch_norm(F.conv2d(x, tw, t(b), padding=1), *bn[:2], *bn[2:],
                                   training=False, eps=BN_EPS))
    return Runner("torch", call, lambda: [call().permute(0, 2, 3, 1).contiguous().numpy()])
  import jax
  import jax.numpy as jnp
  if name == "jaxnorm":
    import jaxnorm as jn
    stats = jn.BatchStats(mean=jnp.asarray(inputs.run_mean), var=jnp.asarray(inputs.run_var))
    kernel, bias = jn.fold_batch_norm(w, b, stats, inputs.scale, inputs.bias, epsilon=BN_EPS)
    params = {"kernel": kernel, "bias": bias}

    def apply(x, p, state):
      y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return jax.nn.relu(y + p["bias"].reshape(1, 1, 1, c)), state
    return _jax_runner(name, case, inputs, apply, params, None, lambda *a: [])
  bn_vars = dict(scale=inputs.scale, bias=inputs.bias, mean=inputs.run_mean, var=inputs.run_var)
  if name == "flax.linen":
    import flax.linen as nn
    conv = nn.Conv(c, (3, 3), padding="SAME")
    bn = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS)
    params = {"conv": {"kernel": w, "bias": b},
              "bn": {k: bn_vars[k] for k in ("scale", "bias")}}
    stats = {k: bn_vars[k] for k in ("mean", "var")}

    def apply(x, p, state):
      y = conv.apply({"params": p["conv"]}, x)
      return nn.relu(bn.apply({"params": p["bn"], "batch_stats": state}, y)), state
    return _jax_runner(name, case, inputs, apply, jax.tree.map(jnp.asarray, params),
                       jax.tree.map(jnp.asarray, stats), lambda *a: [])
  from flax import nnx
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(nnx.Conv(c, c, (3, 3), padding="SAME", rngs=rngs),
                         nnx.BatchNorm(c, use_running_average=True, epsilon=BN_EPS, rngs=rngs),
                         nnx.relu)
  model.layers[0].kernel[...], model.layers[0].bias[...] = jnp.asarray(w), jnp.asarray(b)
  for k, v in bn_vars.items():
    getattr(model.layers[1], k)[...] = jnp.asarray(v)
  graphdef, state = nnx.split(model)
  return _jax_runner(name, case, inputs, lambda x, p, st: (nnx.merge(graphdef, st)(x), st),
                     None, state, lambda *a: [])


def _model_runner(name: str, case: Case, inputs: Inputs) -> Runner:
  """Model-level cases, forward+backward (``jax.grad`` of ``sum(out * g)`` w.r.t. x and
  every parameter; the cross-check compares dx).

  ``transformer_block``: pre-LN block ``h = x + attn(LN1(x))``, ``out = h +
  mlp(LN2(h))`` (8 heads, MLP 4x, gelu).  ``resnet_bottleneck``: NHWC ``relu(x +
  BN3(conv1x1(relu(BN2(conv3x3(relu(BN1(conv1x1(x)))))))))`` with C/4 inner channels,
  batch norm in training mode.  ``gn_resblock`` (a diffusion U-Net's block): NHWC
  ``x + conv3x3(silu(GN2(conv3x3(silu(GN1(x))))))``, 32 groups.  The norms are jaxnorm's (``jaxnorm``: CPU kernels
  where they apply, ``jaxnorm-xla``: kernels off) or flax.linen's.
  """
  if name in ("floor", "floor-ffi"):
    return (build_floor if name == "floor" else build_floor_ffi)(case, inputs)
  if name not in ("jaxnorm", "jaxnorm-xla", "flax.linen"):
    raise Unavailable("model cases compare jaxnorm (kernels on/off) with flax.linen")
  import jax
  import jax.numpy as jnp
  dtype = _jax_dtype(inputs.dtype)
  rng = np.random.default_rng(2)
  c = inputs.x.shape[-1]
  dense = lambda i, o, *k: jnp.asarray(rng.standard_normal((*k, i, o)) / np.sqrt(i * max(
      1, math.prod(k))), jnp.float32)
  ones, zeros = jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)
  if name == "flax.linen":
    import flax.linen as nn
  else:
    import jaxnorm as jn
  xla = name == "jaxnorm-xla"

  def layer_norm(x, s, b):
    if name == "flax.linen":
      return nn.LayerNorm(epsilon=EPS, dtype=dtype).apply({"params": {"scale": s, "bias": b}}, x)
    with jn.no_kernels() if xla else contextlib.nullcontext():
      return jn.layer_norm(x, s, b, epsilon=EPS)

  def group_norm(x, s, b):
    if name == "flax.linen":
      return nn.GroupNorm(num_groups=GROUPS, epsilon=EPS, dtype=dtype).apply(
          {"params": {"scale": s, "bias": b}}, x)
    with jn.no_kernels() if xla else contextlib.nullcontext():
      return jn.group_norm(x, s, b, num_groups=GROUPS, epsilon=EPS)

  def batch_norm(x, s, b, st):
    if name == "flax.linen":
      y, upd = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=BN_EPS,
                            dtype=dtype).apply({"params": {"scale": s, "bias": b},
                                                "batch_stats": st}, x, mutable=["batch_stats"])
      return y, upd["batch_stats"]
    with jn.no_kernels() if xla else contextlib.nullcontext():
      y, new = jn.batch_norm(x, jn.BatchStats(**st), s, b, training=True, momentum=MOMENTUM,
                             epsilon=BN_EPS)
    return y, {"mean": new.mean, "var": new.var}

  mm = lambda a, w: jnp.dot(a, w.astype(a.dtype))
  conv = lambda a, w: jax.lax.conv_general_dilated(
      a, w.astype(a.dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if case.norm == "transformer_block":
    heads = 8
    params = {"ln1": (ones, zeros), "ln2": (ones, zeros), "qkv": dense(c, 3 * c),
              "o": dense(c, c), "w1": dense(c, 4 * c), "w2": dense(4 * c, c)}
    state = None

    def apply(x, p, state):
      bsz, t, _ = x.shape
      q, k, v = jnp.split(mm(layer_norm(x, *p["ln1"]), p["qkv"]), 3, axis=-1)
      split = lambda a: a.reshape(bsz, t, heads, c // heads)
      att = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", split(q), split(k))
                           / np.sqrt(c // heads).astype(np.float32), axis=-1)
      o = jnp.einsum("bhts,bshd->bthd", att, split(v)).reshape(bsz, t, c)
      h = x + mm(o, p["o"])
      return h + mm(jax.nn.gelu(mm(layer_norm(h, *p["ln2"]), p["w1"])), p["w2"]), state
  elif case.norm == "gn_resblock":
    params = {"w1": dense(c, c, 3, 3), "w2": dense(c, c, 3, 3), "gn1": (ones, zeros),
              "gn2": (ones, zeros)}
    state = None

    def apply(x, p, state):
      h = conv(jax.nn.silu(group_norm(x, *p["gn1"])), p["w1"])
      return x + conv(jax.nn.silu(group_norm(h, *p["gn2"])), p["w2"]), state
  elif case.norm == "resnet_bottleneck":
    ci = c // 4
    bn_p = lambda n: (jnp.ones((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    params = {"w1": dense(c, ci, 1, 1), "w2": dense(ci, ci, 3, 3), "w3": dense(ci, c, 1, 1),
              "bn1": bn_p(ci), "bn2": bn_p(ci), "bn3": bn_p(c)}
    st = lambda n: {"mean": jnp.zeros((n,), jnp.float32), "var": jnp.ones((n,), jnp.float32)}
    state = {"bn1": st(ci), "bn2": st(ci), "bn3": st(c)}

    def apply(x, p, state):
      new = {}
      h = x
      for i, w in ((1, "w1"), (2, "w2"), (3, "w3")):
        h, new[f"bn{i}"] = batch_norm(conv(h, p[w]), *p[f"bn{i}"], state[f"bn{i}"])
        h = jax.nn.relu(h) if i < 3 else h
      return jax.nn.relu(x + h), new

  return _jax_runner(name, case, inputs, apply, params, state, lambda dx, dp: [dx])


# --------------------------------------------------------------------------- running


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _xla_figures(compiled) -> tuple[float | None, float | None]:
  """(bytes accessed, temporary bytes) of a compiled executable, None where unknown."""
  accessed = temp = None
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    if cost:
      accessed = cost.get("bytes accessed")
  except Exception:  # noqa: BLE001 - figures are optional on some backends
    pass
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      temp = float(mem.temp_size_in_bytes)
  except Exception:  # noqa: BLE001
    pass
  return accessed, temp


def _check(reference: list[np.ndarray], other: list[np.ndarray], dtype: str) -> str:
  """Whether a competitor computed the same thing as jaxnorm: the largest difference
  of each output relative to that output's largest magnitude (loose: it catches
  layout bugs and inaccurate low-precision accumulation, not rounding)."""
  if len(reference) != len(other):
    return f"DIFFERS: {len(other)} outputs vs {len(reference)}"
  tol = 3e-2 if dtype == "bfloat16" else 1e-3
  names = ["y"] if len(reference) == 1 else ["dx", "dscale", "dbias"]
  bad = []
  for name, r, o in zip(names, reference, other):
    if r.shape != o.shape:
      return f"DIFFERS: {name} shape {o.shape} vs {r.shape}"
    err = float(np.max(np.abs(r - o)) / max(float(np.max(np.abs(r))), 1e-30)) if r.size else 0.0
    if not err <= tol:
      bad.append(f"{name} {err:.0e}")
  return "ok" if not bad else "DIFFERS: " + ", ".join(bad)


def run_case(case: Case, competitors: Sequence[str], *, size: str, rounds: int,
             max_seconds: float, seed: int, torch_on_cpu: bool = False,
             log: Callable[[str], None] = lambda s: None) -> Result:
  """Builds, warms up, cross-checks and times every competitor of one case."""
  import random
  shape = case.shape_for(size)
  inputs = Inputs.make(case, shape, seed)
  builders = {
      "floor": build_floor,
      "floor-ffi": build_floor_ffi,
      "jaxnorm": build_jaxnorm,
      "jaxnorm-xla": lambda c, i: build_jaxnorm(c, i, xla=True),
      REF: lambda c, i: build_jaxnorm(c, i, reference=True),
      "flax.linen": build_linen,
      "flax.nnx": build_nnx,
      "torch": lambda c, i: build_torch(c, i, allow_off_cpu=torch_on_cpu),
  }
  runners: list[Runner] = []
  skipped: dict[str, str] = {}
  for name in competitors:
    try:
      runners.append(_conv_bn_relu_runner(name, case, inputs) if case.norm == "conv_bn_relu"
                     else _model_runner(name, case, inputs) if case.norm in MODELS
                     else builders[name](case, inputs))
    except Unavailable as e:
      skipped[name] = str(e)
  for r in runners:  # warm-up (compilation already done; first-call allocations, caches)
    r.call()
    r.call()
  ref = next((r for r in runners if r.name == "jaxnorm"), None)
  agree: dict[str, str] = {}
  if ref is not None:
    ref_out = ref.outputs()
    for r in runners:
      if r.name not in ("floor", "floor-ffi", "jaxnorm"):
        agree[r.name] = _check(ref_out, r.outputs(), inputs.dtype)
  times: dict[str, list[float]] = {r.name: [] for r in runners}
  order = list(runners)
  rng = random.Random(seed)
  start = time.perf_counter()
  gc_was_enabled = gc.isenabled()
  gc.disable()
  try:
    for i in range(rounds):
      rng.shuffle(order)
      # torch last in each round, then a pause: after each call its OpenMP workers
      # spin for milliseconds (libgomp's default spin count) and took a core from
      # whichever competitor came next (JAX calls timed right after torch ran up to
      # ~2x slower, IQR 40-80%)
      for r in sorted(order, key=lambda r: r.name == "torch"):
        t0 = time.perf_counter()
        r.call()
        times[r.name].append(time.perf_counter() - t0)
        if r.name == "torch":
          time.sleep(TORCH_SETTLE_S)
      if i + 1 >= min(rounds, 5) and time.perf_counter() - start > max_seconds:
        break
  finally:
    if gc_was_enabled:
      gc.enable()
  xla = {r.name: _xla_figures(r.compiled) for r in runners if r.compiled is not None}
  res = Result(case, shape, times, skipped, xla, agree)
  log(f"  {case.name} {shape}: {len(next(iter(times.values()), []))} rounds, "
      + ", ".join(f"{n} {1e3 * res.median(n):.2f} ms" for n in times))
  return res


# --------------------------------------------------------------------------- reporting


def header(args: argparse.Namespace) -> list[str]:
  import jax
  lines = [f"jaxnorm benchmarks, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  lines.append(f"machine: {platform.system()} {platform.machine()}, {cpu}, {_cores()} cores "
               f"available, python {platform.python_version()}")
  devs = jax.devices()
  lines.append(f"jax {jax.__version__}, backend {jax.default_backend()} "
               f"({len(devs)} x {devs[0].device_kind})")
  try:
    import flax
    lines.append(f"flax {flax.__version__}")
  except ImportError:
    lines.append("flax: not installed")
  try:
    import torch
    lines.append(f"torch {torch.__version__} ({_cores()} threads)")
  except ImportError:
    lines.append("torch: not installed")
  tun = os.environ.get("GLIBC_TUNABLES")
  if tun == GLIBC_TUNED:
    lines.append("malloc: GLIBC_TUNABLES set (freed memory kept: compute and traffic alone)")
  else:
    lines.append(f"malloc: default (GLIBC_TUNABLES={tun or 'unset'}); --glibc-tuned re-runs "
                 f"with GLIBC_TUNABLES={GLIBC_TUNED}")
  mode = {"full": "full size", "quick": "--quick: leading dims reduced 8x, few rounds; "
          "ratios are indicative only", "tiny": "--tiny: toy shapes (a smoke test; "
          "timings meaningless)"}[args.size]
  lines.append(f"mode: {mode}; up to {args.rounds} rounds (at most ~{args.max_seconds:g} s "
               "per case), competitors interleaved in a shuffled order each round (torch last, "
               "then a 20 ms pause), warm-up excluded, medians")
  lines.append("ratios: median / median of the named competitor in the same run; floor = "
               "jitted x*2+1 (read x once, write one array)")
  return lines


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
  return "-" if v is None else f"{v:{spec}}{suffix}"


def _mib(v: float | None) -> str:
  return "-" if v is None or v < 0 else f"{v / 2**20:.1f}"


def _table(headers: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
  if markdown:
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(headers)]
  line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def summary_table(results: Sequence[Result], markdown: bool, main: str = "jaxnorm") -> list[str]:
  """One row per case: every competitor as a ratio to the floor, the pass-count
  limit, the target and whether jaxnorm met it."""
  names = [n for n in ("floor-ffi", main, "jaxnorm-xla", REF, "flax.linen", "flax.nnx", "torch")
           if any(n in r.times for r in results)]
  headers = (["case", "floor"] + [SHORT.get(n, n) for n in names]
             + ["limit", "target", "met", "beaten by"])
  rows = []
  for r in results:
    ratios = [r.ratio(n, "floor") for n in names]
    best = r.ratio(main, "floor")
    met = "-" if r.case.target is None or best is None else (
        "yes" if best <= r.case.target * 1.02 else "no")
    rows.append([r.case.name, _fmt(1e3 * (r.median("floor") or math.nan), ".2f")]
                + [_fmt(v, ".2f") for v in ratios]
                + [_fmt(r.case.passes, ".1f"),
                   _fmt(r.case.target, ".2f", "x"), met, _beaten_by(r, main)])
  return _table(headers, rows, markdown)


def _beaten_by(r: Result, main: str) -> str:
  """Which of flax.linen and torch (those that ran) beat ``main`` in this run:
  'none', 'linen', 'torch' or 'both'; '-' for the folding case (a different
  computation) or when no peer ran.  Short values: the summary fits 100 columns."""
  peers = [n for n in ("flax.linen", "torch") if r.median(n) is not None]
  if r.case.norm == "conv_bn_relu" or not peers or r.median(main) is None:
    return "-"
  faster = [SHORT.get(n, n) for n in peers if r.median(n) < r.median(main)]
  return "both" if len(faster) == 2 else faster[0] if faster else "none"


def _skipped_everywhere(results: Sequence[Result]) -> dict[str, str]:
  """Competitors skipped in every case, with the first reason (said once)."""
  out = {}
  for n in {n for r in results for n in r.skipped}:
    if all(n in r.skipped for r in results):
      out[n] = results[0].skipped[n]
  return out


def detail_table(results: Sequence[Result], markdown: bool) -> list[str]:
  """Per case and competitor: ms, ratios, noise, XLA figures, agreement.

  Text: one block per case (its name and shape as a heading), 100 columns wide;
  markdown: one table with a case column."""
  headers = ["impl", "ms", "x floor", "x linen", "x torch", "IQR", "bytes MiB", "temp MiB",
             "check"]
  everywhere = _skipped_everywhere(results)
  out: list[str] = []
  md_rows = []
  for r in results:
    rows = []
    for n in r.times:
      acc, tmp = r.xla.get(n, (None, None))
      rows.append([n, _fmt(1e3 * r.median(n), ".2f"),
                   _fmt(r.ratio(n, "floor"), ".2f"), _fmt(r.ratio(n, "flax.linen"), ".2f"),
                   _fmt(r.ratio(n, "torch"), ".2f"), _fmt(r.spread(n), ".0%"),
                   _mib(acc), _mib(tmp), r.agree.get(n, "")])
    for n, why in r.skipped.items():
      if n not in everywhere:
        rows.append([n, "skipped", "", "", "", "", "", "", why[:40]])
    if markdown:
      md_rows += [[r.case.name] + row for row in rows]
    else:
      out += [f"{r.case.name} {'x'.join(map(str, r.shape))} {r.case.dtype}"]
      out += ["  " + ln for ln in _table(headers, rows, False)] + [""]
  if markdown:
    return _table(["case"] + headers, md_rows, True)
  return out


def report(results: Sequence[Result], args: argparse.Namespace) -> str:
  md = args.markdown
  out = []
  head = header(args)
  everywhere = _skipped_everywhere(results)
  head += [f"{n}: not run ({why})" for n, why in sorted(everywhere.items())]
  if not md:  # fit 100 columns
    import textwrap
    head = [w for h in head for w in textwrap.wrap(h, 100, subsequent_indent="  ",
                                                   break_on_hyphens=False)]
  out += ([f"- {h}" for h in head] if md else head) + [""]
  legend = [
      "Summary: time as a multiple of the floor (floor = jitted x*2+1, its ms in 'floor';",
      "'ffi' = the same x*2+1 as a C++ FFI kernel; 'xla' = jaxnorm with its CPU kernels off,",
      "'ref' = jaxnorm's plain-autodiff path). 'limit' = the pass-count limit: full-array",
      "memory passes the case needs at least, in floors. 'met' = jaxnorm within 2% of the",
      "CPU-kernel issue's target ratio (yes/no; '-' = no target). 'beaten by' = which of",
      "flax.linen and torch was faster than jaxnorm in this run (none, linen, torch, both).",
  ]
  out += ([" ".join(legend)] if md else legend) + [""]
  out += summary_table(results, md) + [""]
  for r in results:  # BN folding: the inference speed-up (measured, never asserted)
    if r.case.norm == "conv_bn_relu":
      ups = [f"{n} {1 / v:.2f}x" for n in ("flax.linen", "flax.nnx", "torch")
             if (v := r.ratio("jaxnorm", n)) is not None]
      out += [f"BN folding speed-up ({r.case.name}: unfolded time / folded jaxnorm time): "
              + (", ".join(ups) or "no unfolded competitor ran"), ""]
  legend = [
      "Detail: 'bytes'/'temp' = XLA's compiled.cost_analysis() bytes accessed and",
      "memory_analysis() temporary bytes; IQR = interquartile range / median (noise);",
      "'check' = whether the competitor's outputs agree with jaxnorm's: 'ok', or which output",
      "is off and its largest difference relative to the output's largest magnitude.",
  ]
  out += ([" ".join(legend)] if md else legend) + [""]
  out += detail_table(results, md)
  return "\n".join(out)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m jaxnorm.benchmarks",
      description="Times jaxnorm against the memory floor, flax.linen, flax.nnx and torch.")
  p.add_argument("--quick", action="store_const", dest="size", const="quick",
                 help="under a minute: leading dimensions reduced 8x, few rounds")
  p.add_argument("--tiny", action="store_const", dest="size", const="tiny",
                 help="toy shapes, for checking that the harness works (tests)")
  p.add_argument("--cases", default="", help="regular expression selecting cases by name")
  p.add_argument("--competitors", default=",".join(COMPETITORS),
                 help=f"comma-separated subset of {','.join(COMPETITORS)}")
  p.add_argument("--reference", action="store_true",
                 help=f"add '{REF}': jaxnorm with the custom-VJP path switched off")
  p.add_argument("--rounds", type=int, default=None, help="rounds per case (default 40; quick 6)")
  p.add_argument("--max-seconds", type=float, default=None,
                 help="stop a case's rounds after this long (default 20; quick 2)")
  p.add_argument("--markdown", action="store_true", help="markdown tables (for the README)")
  p.add_argument("--glibc-tuned", action="store_true",
                 help="re-execute with GLIBC_TUNABLES set so glibc keeps freed memory")
  p.add_argument("--torch-on-cpu", action="store_true",
                 help="time torch (CPU) even when JAX runs on an accelerator")
  p.add_argument("--list", action="store_true", help="list the cases and exit")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
  p.set_defaults(size="full")
  args = p.parse_args(argv)
  small = args.size != "full"
  args.rounds = args.rounds or (6 if small else 40)
  args.max_seconds = args.max_seconds if args.max_seconds is not None else (2.0 if small else 20.0)
  return args


def select(pattern: str) -> list[Case]:
  rx = re.compile(pattern)
  return [c for c in CASES if rx.search(c.name)]


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.list:
    for c in CASES:
      print(f"{c.name:34s} {c.shape} {c.dtype}" + (f" target {c.target}x" if c.target else ""))
    return 0
  if args.glibc_tuned and os.environ.get("GLIBC_TUNABLES") != GLIBC_TUNED:
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNED)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "jaxnorm.benchmarks", *argv], env)
  competitors = [c.strip() for c in args.competitors.split(",") if c.strip()]
  unknown = sorted(set(competitors) - set(COMPETITORS))
  if unknown:
    print(f"unknown competitors {unknown}; choose from {list(COMPETITORS)}", file=sys.stderr)
    return 2
  if "floor" not in competitors:
    competitors.insert(0, "floor")
  if args.reference:
    competitors.append(REF)
  cases = select(args.cases)
  if not cases:
    print(f"no case matches {args.cases!r}; --list shows them", file=sys.stderr)
    return 2
  log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
  log(f"running {len(cases)} cases ({args.size}) with {', '.join(competitors)}")
  results = [run_case(c, competitors, size=args.size, rounds=args.rounds,
                      max_seconds=args.max_seconds, seed=args.seed,
                      torch_on_cpu=args.torch_on_cpu, log=log) for c in cases]
  print(report(results, args))
  return 0


if __name__ == "__main__":
  sys.exit(main())
