"""Weight normalizers: functions of a layer's kernel rather than of its activations.

* :func:`weight_standardize` (Qiao et al. 2019, "Weight Standardization"; BiT's
  ``StdConv``): each output unit's fan-in standardized,
  ``w_hat = (w - mean(w)) * rsqrt(var(w) + epsilon)``.
* :func:`scaled_weight_standardize` (Brock et al. 2021, NF-ResNets/NFNets,
  DeepMind's ``WSConv2D``):
  ``w_hat = gain * (w - mean(w)) * rsqrt(max(var(w) * fan_in, epsilon))``.
* :func:`weight_norm` (Salimans & Kingma 2016): ``w = g * v / ||v||``, with
  :func:`weight_norm_scale` for the initialisation ``g = ||v||``.
* :func:`spectral_norm` (Miyato et al. 2018): ``w / sigma`` with ``sigma`` the
  largest singular value, estimated by power iteration whose state
  (:class:`SpectralState`) goes in and comes out; :func:`init_spectral_state`.

Layout.  Kernels follow Flax: the output features on the *last* axis (``Dense``:
``(in, out)``; ``Conv``: ``(*window, in // groups, out)``).  The fan-in (the
axes reduced per output unit) is every other axis by default and can be named
explicitly; a PyTorch weight (output axis 0) is handled with
``fan_in_axes=(1, 2, ...)``, ``feature_axes=0`` or ``out_axis=0``.

Statistics come from :func:`jaxnorm._stats.centered_moments` (accurate one-pass
shifted sums, in at least float32); results have the kernel's dtype unless
``dtype`` is given.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _axes, _vjp
from ._stats import centered_moments, stat_dtype
from ._types import Array, Axes, DType


class SpectralState(NamedTuple):
  """Power-iteration state of :func:`spectral_norm` (a pytree, like ``BatchStats``).

  Attributes:
    u: unit vector of shape ``(out,)`` (the size of the kernel's output axis),
      the current estimate of the leading left singular vector of the kernel
      laid out as an ``(out, in)`` matrix; float32 by default.
    sigma: scalar ``()``, the estimate of the largest singular value that
      evaluation divides by; same dtype as ``u``.
  """

  u: Array
  sigma: Array


# ----------------------------------------------------------------------------- validation


def _fan_in(w: Array, fan_in_axes: Axes | None, *, fn: str) -> tuple[tuple[int, ...],
                                                                      tuple[int, ...]]:
  """(fan-in axes, output axes) of a kernel; default fan-in: all but the last axis."""
  if w.ndim < 1:
    raise ValueError(f"{fn}: the kernel must have at least one axis, got a scalar. Pass the "
                     "weight array of a layer, e.g. a Dense kernel of shape (in, out).")
  if fan_in_axes is None:
    red = tuple(range(w.ndim - 1))
  else:
    red = _axes.canonical_axes(fan_in_axes, w.ndim, what="fan_in_axes", fn=fn)
  if not red:
    raise ValueError(
        f"{fn}: a kernel of shape {w.shape} has no fan-in axis to standardize over "
        f"(fan_in_axes={fan_in_axes!r}). A 1-D array has only the output axis; give a "
        "kernel of rank >= 2 or name the fan-in axes explicitly.")
  return red, _axes.other_axes(red, w.ndim)


def _gain(gain: Any, w: Array, feature_axes: tuple[int, ...], *, fn: str,
          name: str = "gain") -> Array | None:
  """A per-output-unit gain laid out against the kernel, with a message naming the layout."""
  if gain is None:
    return None
  gain = _axes.check_floating(gain, fn=fn, name=name)
  fshape = _axes.feature_shape(w.shape, feature_axes)
  if gain.shape == fshape:
    return gain.reshape(_axes.broadcast_shape(w.shape, feature_axes))
  if gain.ndim == w.ndim and all(g in (1, d) for g, d in zip(gain.shape, w.shape)):
    return gain
  raise ValueError(
      f"{fn}: {name} has shape {gain.shape}, but a kernel of shape {w.shape} with output "
      f"axes {feature_axes} needs one entry per output unit: shape {fshape} (or an array of "
      f"rank {w.ndim} that broadcasts to the kernel). Create it with that shape, e.g. "
      f"jnp.ones({fshape}).")


def _check_steps(n_steps: Any, *, fn: str, minimum: int) -> int:
  if (not isinstance(n_steps, (numbers.Integral, np.integer)) or isinstance(n_steps, bool)
      or n_steps < minimum):
    raise ValueError(
        f"{fn}: n_steps must be an int >= {minimum} (the number of power iterations), got "
        f"{n_steps!r}. One step per training call is usual: the estimate improves across "
        "calls because the state carries u.")
  return int(n_steps)


# ----------------------------------------------------------------------------- standardization


def weight_standardize(w: Array, gain: Array | None = None, *, fan_in_axes: Axes | None = None,
                       epsilon: float = 1e-6, dtype: DType | None = None) -> Array:
  """Weight Standardization: ``w_hat = (w - mean) * rsqrt(var + epsilon) [* gain]``.

  ``mean`` and the biased ``var`` are taken per output unit over ``fan_in_axes``
  (default: every axis but the last, Flax's ``(..., in, out)`` layout), in at
  least float32, through the same custom-VJP standardization as layer norm, so
  the result is differentiable in ``w`` (and ``gain``).  ``gain`` (optional) has
  one entry per output unit.  BiT's ``StdConv2d`` is ``epsilon=1e-10``; the
  default ``1e-6`` is timm's.

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> w = jnp.array([[1., 0.], [3., 4.]])            # (in=2, out=2)
  >>> jn.weight_standardize(w, epsilon=0.)
  Array([[-1., -1.],
         [ 1.,  1.]], dtype=float32)
  """
  fn = "jaxnorm.weight_standardize"
  w = _axes.check_floating(w, fn=fn, name="w")
  _axes.check_nonnegative(epsilon, fn=fn, name="epsilon")
  red, out = _fan_in(w, fan_in_axes, fn=fn)
  gain = _gain(gain, w, out, fn=fn)
  y, _, _ = _vjp.standardize(w, red, gain, None, epsilon=epsilon, dtype=dtype)
  return y


def scaled_weight_standardize(w: Array, gain: Array | None = None, *,
                              fan_in_axes: Axes | None = None, epsilon: float = 1e-4,
                              dtype: DType | None = None) -> Array:
  """Scaled Weight Standardization (NF-ResNets/NFNets, Brock et al. 2021).

  ``w_hat = gain * (w - mean) * rsqrt(max(var * fan_in, epsilon))``, where
  ``fan_in`` is the number of elements each output unit reduces over and
  ``mean``/``var`` (biased) are taken over ``fan_in_axes`` (default: all but the
  last axis).  Without the ``max`` this is ``gain * (w - mean) / (std * sqrt(fan_in))``:
  unit-variance outputs for unit-variance inputs, with the ``1 / sqrt(fan_in)``
  built in.  ``epsilon`` is a floor on ``var * fan_in`` (not added to it), as in
  DeepMind's ``WSConv2D`` (default ``1e-4``, theirs).  ``gain`` (optional, one per
  output unit) is the learned affine gain.  Statistics in at least float32;
  differentiable in ``w`` and ``gain``.

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> w = jnp.array([[1., 0.], [3., 4.]])
  >>> jn.scaled_weight_standardize(w, epsilon=0.)   # (w - mean) / (std * sqrt(2))
  Array([[-0.70710677, -0.70710677],
         [ 0.70710677,  0.70710677]], dtype=float32)
  """
  fn = "jaxnorm.scaled_weight_standardize"
  w = _axes.check_floating(w, fn=fn, name="w")
  _axes.check_nonnegative(epsilon, fn=fn, name="epsilon")
  red, out = _fan_in(w, fan_in_axes, fn=fn)
  gain = _gain(gain, w, out, fn=fn)
  cdtype = stat_dtype(w.dtype)
  wf = w.astype(cdtype)
  c = centered_moments(wf, red)
  rstd = lax.rsqrt(jnp.maximum(c.var * c.count, jnp.asarray(epsilon, cdtype)))
  return _vjp.affine(wf, c.shift, c.offset, rstd, gain, None, jnp.dtype(dtype or w.dtype))


# ----------------------------------------------------------------------------- weight norm


def _norm_axes(v: Array, feature_axes: Axes | None, *, fn: str
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(reduced axes, feature axes) of weight norm; ``feature_axes=None``: one norm."""
  if v.ndim < 1:
    raise ValueError(f"{fn}: v must have at least one axis, got a scalar.")
  feat = () if feature_axes is None else _axes.canonical_axes(
      feature_axes, v.ndim, what="feature_axes", fn=fn)
  red = _axes.other_axes(feat, v.ndim)
  if not red:
    raise ValueError(
        f"{fn}: feature_axes={feature_axes!r} keeps every axis of v (shape {v.shape}), so "
        "there is nothing to take the norm over. Keep only the output axis (-1 for Flax "
        "kernels, 0 for PyTorch weights), or None for one norm over the whole array.")
  return red, feat


def _sum_squares(vf: Array, red: tuple[int, ...]) -> Array:
  """``sum(v^2)`` over ``red`` (keep-dims), from the statistics module."""
  c = centered_moments(vf, red, center=False)
  return c.var * c.count


def weight_norm_scale(v: Array, *, feature_axes: Axes | None = -1,
                      epsilon: float = 1e-12) -> Array:
  """``g = sqrt(sum(v^2) + epsilon)`` per feature: the initial scale that makes
  :func:`weight_norm` return ``v`` itself (PyTorch's initialisation).

  Returns an array of the feature shape (``()`` for ``feature_axes=None``) in at
  least float32.

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> jn.weight_norm_scale(jnp.array([[3., 0.], [4., 1.]]), epsilon=0.)
  Array([5., 1.], dtype=float32)
  """
  fn = "jaxnorm.weight_norm_scale"
  v = _axes.check_floating(v, fn=fn, name="v")
  _axes.check_nonnegative(epsilon, fn=fn, name="epsilon")
  red, feat = _norm_axes(v, feature_axes, fn=fn)
  vf = v.astype(stat_dtype(v.dtype))
  norm = jnp.sqrt(_sum_squares(vf, red) + jnp.asarray(epsilon, vf.dtype))
  return norm.reshape(_axes.feature_shape(v.shape, feat))


def weight_norm(v: Array, g: Array | None = None, *, feature_axes: Axes | None = -1,
                epsilon: float = 1e-12, dtype: DType | None = None) -> Array:
  """Weight normalization: ``w = g * v * rsqrt(sum(v^2) + epsilon)``.

  The sum runs over every axis of ``v`` except ``feature_axes`` (default -1: one
  norm per output unit of a Flax kernel; ``0`` for a PyTorch weight, PyTorch's
  ``dim=0``; ``None``: one norm over the whole array).  ``g`` has the feature
  shape (``()`` for ``None``), or ``v``'s rank broadcasting to it; ``None``
  means ``g = 1`` (the direction only).  Gradients flow to both ``v`` and ``g``.
  :func:`weight_norm_scale` gives ``g = ||v||``, for which ``w == v``.

  >>> import jax.numpy as jnp, jaxnorm as jn
  >>> v = jnp.array([[3., 0.], [4., 2.]])
  >>> jn.weight_norm(v, jnp.array([10., 1.]), epsilon=0.)
  Array([[6., 0.],
         [8., 1.]], dtype=float32)
  """
  fn = "jaxnorm.weight_norm"
  v = _axes.check_floating(v, fn=fn, name="v")
  _axes.check_nonnegative(epsilon, fn=fn, name="epsilon")
  red, feat = _norm_axes(v, feature_axes, fn=fn)
  g = _gain(g, v, feat, fn=fn, name="g")
  cdtype = stat_dtype(v.dtype)
  vf = v.astype(cdtype)
  a = lax.rsqrt(_sum_squares(vf, red) + jnp.asarray(epsilon, cdtype))
  if g is not None:
    a = a * g.astype(cdtype)
  return (vf * a).astype(dtype or v.dtype)


# ----------------------------------------------------------------------------- spectral norm


def _matrix(w: Array, out_axis: int) -> Array:
  """The kernel as an ``(out, in)`` matrix: the output axis first, the rest flattened."""
  return jnp.moveaxis(w, out_axis, 0).reshape(w.shape[out_axis], -1)


def _l2_normalize(x: Array, epsilon: Array) -> Array:
  """``x / max(||x||, epsilon)`` (``torch.nn.functional.normalize``)."""
  return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x)), epsilon)


def _power_iteration(m: Array, u: Array, n_steps: int, epsilon: Array) -> tuple[Array, Array]:
  """``n_steps`` of ``v = N(M^T u); u = N(M v)``, then ``v = N(M^T u)``; returns (u, v).

  The final ``v`` is the one PyTorch holds after a step (its step is
  ``u = N(M v); v = N(M^T u)``, with ``v`` carried in its state instead).
  """
  def step(_, u):
    return _l2_normalize(m @ _l2_normalize(m.T @ u, epsilon), epsilon)
  if n_steps <= 4:  # unrolled: the usual 1 step needs no loop
    for i in range(n_steps):
      u = step(i, u)
  else:
    u = lax.fori_loop(0, n_steps, step, u)
  return u, _l2_normalize(m.T @ u, epsilon)


def _out_axis(w: Array, out_axis: Any, *, fn: str) -> int:
  if w.ndim < 1:
    raise ValueError(f"{fn}: w must have at least one axis, got a scalar.")
  if not isinstance(out_axis, (numbers.Integral, np.integer)) or isinstance(out_axis, bool):
    raise TypeError(f"{fn}: out_axis must be a single int (the kernel's output axis: -1 "
                    f"for Flax, 0 for PyTorch), got {out_axis!r}.")
  (axis,) = _axes.canonical_axes(out_axis, w.ndim, what="out_axis", fn=fn)
  return axis


def init_spectral_state(key: Array, w: Array, *, out_axis: int = -1, n_steps: int = 15,
                        epsilon: float = 1e-12, dtype: DType = jnp.float32) -> SpectralState:
  """A fresh :class:`SpectralState` for the kernel ``w``.

  ``u`` starts as a normalized standard-normal vector from ``key``; ``n_steps``
  power iterations (default 15, as ``torch.nn.utils.parametrizations.spectral_norm``
  runs at registration) refine it, and ``sigma = u^T M v`` is stored, so that
  evaluation is meaningful before the first training step.  ``M`` is ``w`` as an
  ``(out, in)`` matrix (see :func:`spectral_norm`).  The state is not
  differentiable (it carries no gradient).

  >>> import jax, jax.numpy as jnp, jaxnorm as jn
  >>> s = jn.init_spectral_state(jax.random.key(0), jnp.diag(jnp.array([3., 1.])))
  >>> s.u.shape, round(float(s.sigma), 4)
  ((2,), 3.0)
  """
  fn = "jaxnorm.init_spectral_state"
  w = _axes.check_floating(w, fn=fn, name="w")
  axis = _out_axis(w, out_axis, fn=fn)
  n_steps = _check_steps(n_steps, fn=fn, minimum=0)
  _axes.check_nonnegative(epsilon, fn=fn, name="epsilon")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{fn}: dtype must be a floating dtype, got {dtype}. Use jnp.float32.")
  cdtype = jnp.promote_types(stat_dtype(w.dtype), dtype)
  m = lax.stop_gradient(_matrix(w.astype(cdtype), axis))
  eps = jnp.asarray(epsilon, cdtype)
  u = _l2_normalize(jax.random.normal(key, (w.shape[axis],), cdtype), eps)
  u, v = _power_iteration(m, u, n_steps, eps)
  return SpectralState(u=u.astype(dtype), sigma=(u @ (m @ v)).astype(dtype))


def _check_state(state: Any, w: Array, axis: int, *, fn: str) -> SpectralState:
  if not isinstance(state, SpectralState):
    if isinstance(state, tuple) and len(state) == 2:
      state = SpectralState(*state)
    else:
      raise TypeError(f"{fn}: state must be a jaxnorm.SpectralState(u, sigma), got "
                      f"{type(state).__name__}. Create one with "
                      f"jaxnorm.init_spectral_state(key, w, out_axis={axis}).")
  original = state
  u, sigma = (jnp.asarray(a) for a in state)
  for name, a, shape in (("u", u, (w.shape[axis],)), ("sigma", sigma, ())):
    if a.shape != shape:
      raise ValueError(
          f"{fn}: state.{name} has shape {a.shape}, but a kernel of shape {w.shape} with "
          f"out_axis={axis} needs {shape}. Check out_axis (-1 for Flax kernels, 0 for "
          f"PyTorch weights) or re-create the state with "
          f"jaxnorm.init_spectral_state(key, w, out_axis={axis}).")
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"{fn}: state.{name} must be floating, got dtype {a.dtype}. Re-create "
                      "the state with jaxnorm.init_spectral_state.")
  if all(isinstance(a, jax.Array) for a in original):
    return original  # evaluation returns the very state it was given
  return SpectralState(u=u, sigma=sigma)


def spectral_norm(w: Array, state: SpectralState, *, training: bool, n_steps: int = 1,
                  out_axis: int = -1, epsilon: float = 1e-12, dtype: DType | None = None
                  ) -> tuple[Array, SpectralState]:
  """Spectral normalization: ``(w / sigma, new_state)``.

  ``w`` is read as the ``(out, in)`` matrix ``M`` (``out_axis`` moved first, the
  other axes flattened; ``out_axis=-1`` for Flax kernels, ``0`` for PyTorch
  weights: the same ``u`` and ``sigma`` either way).

  Training (``training=True``): ``n_steps`` power iterations from ``state.u``,
  ``v = N(M^T u); u = N(M v)`` (``N(x) = x / max(||x||, epsilon)``), then
  ``v = N(M^T u)`` and ``sigma = u^T M v``.  ``u`` and ``v`` are constants under
  autodiff (``stop_gradient``), so ``d sigma / d M = u v^T``: the gradient flows
  through ``sigma`` as in Miyato et al. and PyTorch.  Returns the new
  ``SpectralState(u, sigma)``.

  Evaluation (``training=False``): ``w / state.sigma`` with the stored ``sigma``
  (a constant), no iteration, and ``state`` returned unchanged.  (flax.linen's
  ``SpectralNorm`` stores sigma but iterates in evaluation too; PyTorch
  recomputes ``u^T M v`` from its stored vectors.)

  A ``sigma`` of 0 (a zero kernel) divides by 1 instead.  The power iteration
  runs in at least float32; the output has ``w``'s dtype (or ``dtype``) and the
  new state the dtypes of ``state``.

  >>> import jax, jax.numpy as jnp, jaxnorm as jn
  >>> w = jnp.diag(jnp.array([4., 1.]))
  >>> s = jn.init_spectral_state(jax.random.key(0), w)
  >>> y, s = jn.spectral_norm(w, s, training=True)
  >>> y.round(4)
  Array([[1.  , 0.  ],
         [0.  , 0.25]], dtype=float32)
  """
  fn = "jaxnorm.spectral_norm"
  training = _axes.check_training(training, fn=fn)
  w = _axes.check_floating(w, fn=fn, name="w")
  axis = _out_axis(w, out_axis, fn=fn)
  n_steps = _check_steps(n_steps, fn=fn, minimum=1)
  _axes.check_nonnegative(epsilon, fn=fn, name="epsilon")
  state = _check_state(state, w, axis, fn=fn)
  out_dtype = jnp.dtype(dtype or w.dtype)
  cdtype = stat_dtype(jnp.promote_types(w.dtype, state.u.dtype))
  wf = w.astype(cdtype)
  if not training:
    sigma = lax.stop_gradient(state.sigma.astype(cdtype))
    return (wf / jnp.where(sigma != 0, sigma, 1)).astype(out_dtype), state
  m = _matrix(wf, axis)
  eps = jnp.asarray(epsilon, cdtype)
  u, v = _power_iteration(lax.stop_gradient(m), state.u.astype(cdtype), n_steps, eps)
  u, v = lax.stop_gradient(u), lax.stop_gradient(v)
  sigma = u @ (m @ v)
  y = (wf / jnp.where(sigma != 0, sigma, 1)).astype(out_dtype)
  new_state = SpectralState(u=u.astype(state.u.dtype),
                            sigma=lax.stop_gradient(sigma).astype(state.sigma.dtype))
  return y, new_state
