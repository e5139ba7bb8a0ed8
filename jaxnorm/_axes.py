"""Axis canonicalisation and input validation.

Every error message users can see lives here.  Each one says what was expected,
what was received and how to fix it, and is raised at trace time.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._types import Array, Axes, BatchStats, CountedBatchStats, Shape


def canonical_axes(axes: Axes, ndim: int, *, what: str, fn: str) -> tuple[int, ...]:
  """Normalises ``axes`` (int or sequence) to sorted non-negative ints; rejects bad ones."""
  if isinstance(axes, (numbers.Integral, np.integer)):
    axes = (axes,)
  try:
    axes = tuple(axes)
  except TypeError:
    raise TypeError(f"{fn}: {what} must be an int or a sequence of ints, got {axes!r}.") from None
  if ndim == 0 and axes:
    raise ValueError(f"{fn}: the input is a scalar (rank 0), so it has no axis to use as "
                     f"{what} {axes!r}. Normalization needs an array with at least one axis.")
  out = []
  for a in axes:
    if not isinstance(a, (numbers.Integral, np.integer)) or isinstance(a, bool):
      raise TypeError(f"{fn}: {what} must contain ints, got {a!r} in {axes!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{fn}: {what} {a} is out of range for an input of rank {ndim} "
          f"(valid: {-ndim}..{ndim - 1}). Check the layout of your input, e.g. "
          "NHWC has the feature axis at -1 and NCHW at 1.")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{fn}: {what} {axes!r} names the same axis twice; list each axis once.")
  return tuple(sorted(out))


def other_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
  return tuple(a for a in range(ndim) if a not in axes)


_COMPLEX_FUNCTIONS = ("jaxnorm.moments, normalize, batch_norm, layer_norm, rms_norm, group_norm, "
                      "instance_norm and their linen/nnx modules")


def check_floating(x: Any, *, fn: str, name: str = "x", allow_complex: bool = False) -> Array:
  """``x`` as an array of a floating dtype (or complex, where ``allow_complex``).

  The suggested fixes never lose data: a complex array is never told to cast to a
  real dtype, and an integer one is pointed at a dtype that holds it exactly.
  """
  x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    if allow_complex:
      return x
    raise TypeError(
        f"{fn}: {name} is complex ({x.dtype}), which {fn} does not support; casting it to a "
        f"real dtype would drop the imaginary part. Complex inputs are supported by "
        f"{_COMPLEX_FUNCTIONS}. Here, pass the real and imaginary parts as separate "
        f"features instead, e.g. jnp.concatenate([{name}.real, {name}.imag], axis=-1).")
  kinds = ("bf16, f16, f32, f64, complex64, complex128" if allow_complex
           else "bf16, f16, f32, f64")
  if jnp.dtype(x.dtype).itemsize <= 2:  # bool, (u)int8, (u)int16: float32 is exact
    fix = f"Cast it first: {name}.astype(jnp.float32) holds every {x.dtype} value exactly."
  else:
    fix = (f"Cast it first: {name}.astype(jnp.float32) holds {x.dtype} values exactly up "
           f"to 2**24 in magnitude; for larger values use {name}.astype(jnp.float64) "
           "(with jax.config.update('jax_enable_x64', True)).")
  raise TypeError(f"{fn}: {name} must be a floating array ({kinds}), got dtype {x.dtype}. "
                  + fix)


def check_real(x: Array, *, fn: str, name: str, why: str) -> Array:
  """Rejects a complex ``x`` where the math needs a real value (e.g. a variance)."""
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise TypeError(f"{fn}: {name} must be real, got dtype {x.dtype}: {why}")
  return x


def check_training(training: Any, *, fn: str, name: str = "training") -> bool:
  """A static mode flag; ``name`` is how the caller spells it (e.g. ``use_running_average``)."""
  if isinstance(training, (bool, np.bool_)):
    return bool(training)
  raise TypeError(
      f"{fn}: `{name}` must be a Python bool, got {type(training).__name__} "
      f"({training!r}). It selects different computations, so it must be known at trace "
      f"time: pass it as a static argument (jax.jit(f, static_argnames='{name}')), or "
      f"switch with lax.cond(flag, lambda: f({name}=True), lambda: f({name}=False)).")


def _concrete_scalar(value: Any) -> Any:
  """A Python/NumPy number, or a concrete (non-traced) size-1 array as a float;
  anything else (a tracer, whose value is unknown at trace time) is returned as is."""
  if isinstance(value, numbers.Real):
    return value
  if isinstance(value, (np.ndarray, np.generic)) or (
      isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)):
    if np.size(value) == 1 and np.issubdtype(np.asarray(value).dtype, np.number):
      return float(np.asarray(value).reshape(()))
  return value


def check_nonnegative(value: Any, *, fn: str, name: str) -> None:
  """Range check at trace time when the value is known (numbers and concrete arrays)."""
  v = _concrete_scalar(value)
  if isinstance(v, numbers.Real) and not (v >= 0):  # also catches NaN
    raise ValueError(f"{fn}: {name} must be >= 0, got {value!r}. Typical values are 1e-5 or 1e-6.")


def check_momentum(momentum: Any, *, fn: str) -> None:
  m = _concrete_scalar(momentum)
  if isinstance(m, numbers.Real) and not (0.0 <= m <= 1.0):
    raise ValueError(
        f"{fn}: momentum must be in [0, 1] (new = momentum*old + (1-momentum)*batch), "
        f"got {momentum!r}. A PyTorch momentum m corresponds to jaxnorm momentum 1 - m.")


def broadcast_shape(x_shape: Shape, feature_axes: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of a per-feature array laid out to broadcast against ``x``."""
  return tuple(d if i in feature_axes else 1 for i, d in enumerate(x_shape))


def feature_shape(x_shape: Shape, feature_axes: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(x_shape[a] for a in feature_axes)


def _broadcasts(shape: Shape, target: Shape) -> bool:
  return len(shape) == len(target) and all(s in (1, t) for s, t in zip(shape, target))


def per_feature(p: Any, *, name: str, x_shape: Shape, feature_axes: tuple[int, ...],
                fn: str, allow_complex: bool = False) -> Array | None:
  """Lays out a scale/bias/statistic for broadcasting against ``x``.

  Accepted: ``None``; an array of the feature shape (one entry per feature); or an
  array of the same rank as ``x`` that broadcasts to it (per-sample FiLM/AdaLN).
  """
  if p is None:
    return None
  p = check_floating(p, fn=fn, name=name, allow_complex=allow_complex)
  fshape = feature_shape(x_shape, feature_axes)
  if p.shape == fshape:
    return p.reshape(broadcast_shape(x_shape, feature_axes))
  if _broadcasts(p.shape, x_shape):
    return p
  raise ValueError(
      f"{fn}: {name} has shape {p.shape}, but the input {tuple(x_shape)} with feature axes "
      f"{feature_axes} needs the feature shape {fshape}, or an array of rank {len(x_shape)} "
      f"that broadcasts to {tuple(x_shape)} (e.g. per-sample FiLM). Reshape {name} to one of these.")


def check_mask(where: Any, x_shape: Shape, *, fn: str, target: str = "input") -> Array | None:
  """A boolean mask broadcastable to ``x_shape``, returned with that rank.

  ``target`` names what the shape belongs to in error messages (``"input"``, or
  ``"running statistics"`` for :func:`jaxnorm.update_batch_stats`'s per-feature mask).
  """
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise TypeError(f"{fn}: the mask `where` must be boolean (True = use this element), got "
                    f"dtype {where.dtype}. Use e.g. `where=mask.astype(bool)`.")
  if where.ndim > len(x_shape):
    raise ValueError(f"{fn}: the mask `where` has rank {where.ndim}, more than the {target}'s "
                     f"rank {len(x_shape)}.")
  padded = (1,) * (len(x_shape) - where.ndim) + tuple(where.shape)
  if not _broadcasts(padded, x_shape):
    raise ValueError(
        f"{fn}: the mask `where` of shape {where.shape} does not broadcast to the {target} "
        f"shape {tuple(x_shape)}. Give it that shape, or size 1 on the axes it does not "
        "vary along, e.g. (batch, 1) for a per-sample mask on (batch, features).")
  return where.reshape(padded)


def check_batch_stats(stats: Any, x_shape: Shape, feature_axes: tuple[int, ...], *,
                      fn: str) -> BatchStats | CountedBatchStats:
  """Running averages of the input's feature shape, returned with their own type.

  Only ``BatchStats`` and ``CountedBatchStats`` are accepted: a plain tuple would
  come back as a different pytree type and break a ``lax.scan``/``lax.cond`` carry.
  """
  fshape = feature_shape(x_shape, feature_axes)
  if not isinstance(stats, (BatchStats, CountedBatchStats)):
    what = (f"a {type(stats).__name__} of length {len(stats)}"
            if isinstance(stats, (tuple, list)) else type(stats).__name__)
    raise TypeError(f"{fn}: stats must be a jaxnorm.BatchStats(mean, var) (or a "
                    f"jaxnorm.CountedBatchStats(mean, var, count)), got {what}. The state "
                    f"comes back with the type it went in with, so wrap it: "
                    f"jaxnorm.BatchStats(mean, var), or create one with "
                    f"jaxnorm.init_batch_stats({fshape}).")
  for name, v in zip(stats._fields, stats):
    v = jnp.asarray(v) if not isinstance(v, jax.Array) else v
    if name == "count":
      bad = (ValueError if tuple(v.shape) != fshape else
             TypeError if not jnp.issubdtype(v.dtype, jnp.integer) else None)
      if bad is not None:
        raise bad(
            f"{fn}: the update count must be an integer array of the feature shape {fshape}, "
            f"got dtype {v.dtype} and shape {tuple(v.shape)}. Create the state with "
            f"jaxnorm.init_batch_stats({fshape}, counted=True).")
      continue
    if tuple(v.shape) != fshape:
      raise ValueError(
          f"{fn}: running {name} has shape {tuple(v.shape)}, but the input "
          f"{tuple(x_shape)} with feature axes {feature_axes} has features of shape {fshape}. "
          f"Check `feature_axes` (the layout) or re-create the state with "
          f"jaxnorm.init_batch_stats({fshape}).")
    if not jnp.issubdtype(v.dtype, jnp.inexact):  # complex: see check_complex_stats
      raise TypeError(f"{fn}: running {name} must be floating, got dtype {v.dtype}. "
                      "Re-create the state with jaxnorm.init_batch_stats (float32 by default).")
  return type(stats)(*(jnp.asarray(v) for v in stats))


def check_complex_stats(stats: BatchStats, x_dtype: Any, *, fn: str) -> None:
  """Running averages that fit a real or complex input: the variance ``E|x - mean|^2``
  is always real; the mean is complex exactly when ``x`` is."""
  fix = ("Create the state with jaxnorm.init_batch_stats(shape, dtype=jnp.complex64) "
         "(complex mean, float32 variance)")
  if jnp.issubdtype(stats.var.dtype, jnp.complexfloating):
    raise TypeError(f"{fn}: the running var must be real (the variance E|x - mean|^2 of complex "
                    f"data is real), got dtype {stats.var.dtype}. {fix}.")
  x_complex = jnp.issubdtype(x_dtype, jnp.complexfloating)
  mean_complex = jnp.issubdtype(stats.mean.dtype, jnp.complexfloating)
  if x_complex and not mean_complex:
    raise TypeError(f"{fn}: the input is complex ({jnp.dtype(x_dtype)}) but the running mean is "
                    f"real ({stats.mean.dtype}): updating it would drop the imaginary part. "
                    f"{fix}, or widen the mean: stats._replace(mean=stats.mean.astype("
                    "jnp.complex64)).")
  if mean_complex and not x_complex:
    raise TypeError(f"{fn}: the running mean is complex ({stats.mean.dtype}) but the input is "
                    f"real ({jnp.dtype(x_dtype)}). Use real running averages "
                    "(jaxnorm.init_batch_stats(shape)) for a real input.")


def check_groups(channels: int, num_groups: int | None, group_size: int | None, *,
                 fn: str) -> int:
  """Returns the number of groups, validating ``num_groups``/``group_size``."""
  if (num_groups is None) == (group_size is None):
    raise ValueError(f"{fn}: give exactly one of num_groups or group_size, got "
                     f"num_groups={num_groups!r}, group_size={group_size!r}.")
  if group_size is not None:
    if not isinstance(group_size, numbers.Integral) or group_size <= 0 or channels % group_size:
      raise ValueError(f"{fn}: group_size={group_size!r} must be a positive int dividing the "
                       f"number of channels {channels}; divisors: {_divisors(channels)}.")
    return channels // group_size
  if not isinstance(num_groups, numbers.Integral) or num_groups <= 0 or channels % num_groups:
    raise ValueError(f"{fn}: num_groups={num_groups!r} must be a positive int dividing the "
                     f"number of channels {channels}; divisors: {_divisors(channels)}.")
  return int(num_groups)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0][:16]


def check_out_dtype(dtype: Any, x_dtype: Any, *, fn: str) -> None:
  """A requested output dtype must not drop the imaginary part of a complex result."""
  if (dtype is not None and jnp.issubdtype(x_dtype, jnp.complexfloating)
      and not jnp.issubdtype(dtype, jnp.complexfloating)):
    raise TypeError(f"{fn}: the output is complex (the input or its statistics/scale/bias are "
                    f"{jnp.dtype(x_dtype)}), but dtype={jnp.dtype(dtype)} is real and would drop "
                    "the imaginary part. Pass a complex dtype (or none), and take y.real or "
                    "jnp.abs(y) yourself if that is what you want.")


def check_choice(value: Any, choices: Sequence[str], *, fn: str, name: str) -> str:
  if value not in choices:
    raise ValueError(f"{fn}: {name} must be one of {list(choices)}, got {value!r}.")
  return value


def size(shape: Shape, axes: Sequence[int]) -> int:
  return math.prod(shape[a] for a in axes)


def check_num_features(num_features: int, x_shape: Shape, feature_axes: tuple[int, ...], *,
                       fn: str, field: str) -> tuple[int, ...]:
  """The feature shape of ``x``, checked against the ``num_features`` a module was built with."""
  fshape = feature_shape(x_shape, feature_axes)
  if math.prod(fshape) != num_features:
    cls = fn.rsplit(".", 1)[-1]
    raise ValueError(
        f"{fn}: this module was built with num_features={num_features}, but the input of "
        f"shape {tuple(x_shape)} has {math.prod(fshape)} features along {field}="
        f"{feature_axes} (feature shape {fshape}). Build it with {cls}({math.prod(fshape)}, "
        f"...), or check `{field}` (NHWC has the features at -1, NCHW at 1).")
  return fshape


def check_ema_only(momentum: Any, debias: bool, *, fn: str) -> None:
  """The batch-statistics modules other than BatchNorm keep a plain EMA state."""
  if momentum is None or debias:
    raise ValueError(f"{fn}: momentum=None and debias=True (the counted running-average "
                     "conventions) are implemented for BatchNorm only; give this module a "
                     "numeric momentum and debias=False.")


def check_counted(stats: Any, momentum: Any, debias: bool, *, fn: str) -> None:
  """``momentum=None`` and ``debias=True`` need a state that counts its updates."""
  if not isinstance(debias, (bool, np.bool_)):
    raise TypeError(f"{fn}: debias must be a Python bool, got {debias!r}.")
  if (momentum is None or debias) and not isinstance(stats, CountedBatchStats):
    option = "momentum=None (cumulative average)" if momentum is None else "debias=True"
    raise TypeError(
        f"{fn}: {option} weights each update by the number of earlier updates, so the state "
        f"must carry a count: got {type(stats).__name__}. Create it with "
        f"jaxnorm.init_batch_stats(shape, counted=True), or convert with "
        f"jaxnorm.CountedBatchStats(mean, var, count=jnp.zeros(mean.shape, jnp.int32)).")
