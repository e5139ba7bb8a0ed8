"""Weight normalizers as Flax NNX modules: standardized convolutions and linear
layers, and weight/spectral-norm wrappers around any layer with a kernel.

``StdConv``/``WSConv``/``StdLinear``/``WSLinear`` subclass ``flax.nnx.Conv`` and
``flax.nnx.Linear`` (every constructor argument and behaviour inherited); their
``__call__`` runs the parent's with the standardized kernel.  ``WeightNorm`` and
``SpectralNorm`` hold the wrapped layer and their own variables.  No module ever
writes a normalized weight into a parameter (flax.nnx's ``WeightNorm`` and
``SpectralNorm`` overwrite the wrapped kernel in place, and keep weight norm's
scales as plain arrays that are never trained: flax#5576/#5577): the layer runs
on a *view* of itself whose kernel is the normalized array, so the stored
parameter stays the raw weight and receives the gradient.  The math is in
:mod:`jaxnorm._weights`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes as _dtypes

from .. import _axes
from .._types import Axes, DType
from .._weights import (SpectralState, init_spectral_state, scaled_weight_standardize,
                        spectral_norm, weight_norm, weight_norm_scale, weight_standardize)

Initializer = Any


def _kernel(layer: nnx.Module, name: str, *, fn: str) -> nnx.Variable:
  """The layer's parameter ``name``, or an error naming what the layer has."""
  var = getattr(layer, name, None)
  if not isinstance(var, nnx.Variable):
    have = sorted(k for k, v in vars(layer).items() if isinstance(v, nnx.Variable))
    raise ValueError(
        f"{fn}: the wrapped layer {type(layer).__name__} has no parameter {name!r} to "
        f"normalize (its variables: {have or 'none'}). Wrap a layer with a kernel "
        "(e.g. nnx.Linear, nnx.Conv) or name its weight with param_name=...")
  return var


def _run_with(layer: nnx.Module, name: str, value: jax.Array, args, kwargs, call=None):
  """Calls ``layer`` as if its variable ``name`` held ``value``, without writing to it.

  The call runs on a shallow view of the layer: a new object of the same class
  sharing every attribute except ``name``, which is a fresh variable of the same
  type holding ``value``.  The layer's own variable is neither read by the call
  nor modified.  ``call``: the unbound ``__call__`` to run (default: the layer's own;
  a subclass passes its parent's).
  """
  view = object.__new__(type(layer))
  view.__dict__.update(vars(layer))
  view.__dict__[name] = type(getattr(layer, name))(value)
  return (call or type(layer).__call__)(view, *args, **kwargs)


# ----------------------------------------------------------------------------- standardized layers


class StdConv(nnx.Conv):
  """``flax.nnx.Conv`` with Weight Standardization (Qiao et al. 2019; BiT's ``StdConv2d``).

  ``kernel_hat = (kernel - mean) * rsqrt(var + epsilon)``, per output channel over
  ``(*window, in // groups)`` (:func:`jaxnorm.weight_standardize`), on every call.
  Takes every argument of ``nnx.Conv`` plus keyword ``epsilon``; holds the same
  variables (``kernel``: the raw weight, ``bias``).

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxnorm import nnx as jnnx
  >>> conv = jnnx.StdConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  >>> conv(jnp.ones((1, 8, 8, 3))).shape
  (1, 8, 8, 4)
  """

  def __init__(self, *args, epsilon: float = 1e-6, **kwargs):
    super().__init__(*args, **kwargs)
    self.epsilon = epsilon

  def __call__(self, inputs, *args, **kwargs):
    w = weight_standardize(self.kernel[...], epsilon=self.epsilon)
    return _run_with(self, "kernel", w, (inputs,) + args, kwargs,
                     call=nnx.Conv.__call__)


class WSConv(nnx.Conv):
  """``flax.nnx.Conv`` with Scaled Weight Standardization and a learned gain (NFNets).

  ``kernel_hat = gain * (kernel - mean) * rsqrt(max(var * fan_in, epsilon))``
  (:func:`jaxnorm.scaled_weight_standardize`, DeepMind's ``WSConv2D``).  Takes
  every argument of ``nnx.Conv`` plus keyword ``epsilon`` (default 1e-4) and
  ``gain_init`` (default ones); holds ``nnx.Conv``'s variables plus ``gain``, an
  ``nnx.Param`` of shape ``(out_features,)`` (drawn after the kernel and bias, so
  those get the same keys as in ``nnx.Conv``).
  """

  def __init__(self, *args, epsilon: float = 1e-4,
               gain_init: Initializer = initializers.ones_init(), rngs: nnx.Rngs, **kwargs):
    super().__init__(*args, rngs=rngs, **kwargs)
    self.epsilon = epsilon
    self.gain = nnx.Param(gain_init(rngs.params(), (self.out_features,), self.param_dtype))

  def __call__(self, inputs, *args, **kwargs):
    w = scaled_weight_standardize(self.kernel[...], self.gain[...], epsilon=self.epsilon)
    return _run_with(self, "kernel", w, (inputs,) + args, kwargs,
                     call=nnx.Conv.__call__)


class StdLinear(nnx.Linear):
  """``flax.nnx.Linear`` with Weight Standardization of its ``(in, out)`` kernel
  over ``in`` (see :class:`StdConv`); same variables as ``nnx.Linear``."""

  def __init__(self, *args, epsilon: float = 1e-6, **kwargs):
    super().__init__(*args, **kwargs)
    self.epsilon = epsilon

  def __call__(self, inputs, *args, **kwargs):
    w = weight_standardize(self.kernel[...], epsilon=self.epsilon)
    return _run_with(self, "kernel", w, (inputs,) + args, kwargs,
                     call=nnx.Linear.__call__)


class WSLinear(nnx.Linear):
  """``flax.nnx.Linear`` with Scaled Weight Standardization of its ``(in, out)``
  kernel and a learned ``gain`` of shape ``(out_features,)`` (see :class:`WSConv`)."""

  def __init__(self, *args, epsilon: float = 1e-4,
               gain_init: Initializer = initializers.ones_init(), rngs: nnx.Rngs, **kwargs):
    super().__init__(*args, rngs=rngs, **kwargs)
    self.epsilon = epsilon
    self.gain = nnx.Param(gain_init(rngs.params(), (self.out_features,), self.param_dtype))

  def __call__(self, inputs, *args, **kwargs):
    w = scaled_weight_standardize(self.kernel[...], self.gain[...], epsilon=self.epsilon)
    return _run_with(self, "kernel", w, (inputs,) + args, kwargs,
                     call=nnx.Linear.__call__)


# ----------------------------------------------------------------------------- wrappers


class WeightNorm(nnx.Module):
  """Weight normalization (Salimans & Kingma 2016) of a wrapped layer's kernel.

  The layer runs with ``w = scale * v / ||v||`` (:func:`jaxnorm.weight_norm`) in
  place of its parameter ``param_name`` (default ``'kernel'``), where ``v`` is that
  parameter itself -- never overwritten, it is trained through ``w`` -- and
  ``||v||`` is taken over every axis except ``feature_axes`` (default -1; ``None``:
  one norm).  ``scale`` is this module's own ``nnx.Param`` (so it is trained,
  unlike flax.nnx's raw-array scales), of the feature shape.

  Initialisation: ``scale_init=None`` (default) sets ``scale = ||v||``, so the
  wrapped layer's initial function is unchanged (PyTorch); pass
  ``scale_init=nnx.initializers.ones`` (with ``rngs``) for flax's ``scale = 1``.
  ``use_scale=False`` uses the direction ``v / ||v||`` alone.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxnorm import nnx as jnnx
  >>> layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  >>> wn = jnnx.WeightNorm(layer)
  >>> x = jnp.ones((2, 3))
  >>> bool(jnp.allclose(wn(x), layer(x)))
  True
  """

  def __init__(self, layer_instance: nnx.Module, *, param_name: str = "kernel",
               feature_axes: Axes | None = -1, use_scale: bool = True,
               scale_init: Initializer | None = None, epsilon: float = 1e-12,
               dtype: DType | None = None, param_dtype: DType = jnp.float32,
               promote_dtype=_dtypes.promote_dtype, rngs: nnx.Rngs | None = None):
    fn = "jaxnorm.nnx.WeightNorm"
    v = _kernel(layer_instance, param_name, fn=fn)[...]
    self.layer_instance = layer_instance
    self.param_name = param_name
    self.feature_axes = feature_axes
    self.use_scale = use_scale
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype
    if not use_scale:
      self.scale = nnx.data(None)
      return
    g = weight_norm_scale(v, feature_axes=feature_axes, epsilon=epsilon)
    if scale_init is not None:
      if rngs is None:
        raise ValueError(f"{fn}: scale_init needs rngs=nnx.Rngs(...) for its key; the "
                         "default scale_init=None (scale = ||v||) needs none.")
      g = scale_init(rngs.params(), g.shape, param_dtype)
    self.scale = nnx.Param(jnp.asarray(g, param_dtype))

  def __call__(self, *args, **kwargs):
    v = _kernel(self.layer_instance, self.param_name, fn="jaxnorm.nnx.WeightNorm")[...]
    g = None if self.scale is None else self.scale[...]
    v, g = self.promote_dtype((v, g), dtype=self.dtype)
    w = weight_norm(v, g, feature_axes=self.feature_axes, epsilon=self.epsilon,
                    dtype=_dtypes.canonicalize_dtype(v, g, dtype=self.dtype))
    return _run_with(self.layer_instance, self.param_name, w, args, kwargs)


class SpectralNorm(nnx.Module):
  """Spectral normalization (Miyato et al. 2018) of a wrapped layer's kernel.

  The layer runs with ``w / sigma`` (:func:`jaxnorm.spectral_norm`; ``w`` read as
  an ``(out, in)`` matrix with ``out_axis`` first) in place of its parameter
  ``param_name`` (default ``'kernel'``), which is never overwritten.  The power
  iteration state lives in this module as ``nnx.BatchStat`` variables ``u``
  (shape ``(out,)``) and ``sigma`` (``()``), created by
  :func:`jaxnorm.init_spectral_state` (``n_init_steps`` iterations, key from
  ``rngs.params()``).

  Training (``update_stats=True``; ``model.train()``): ``n_steps`` power
  iterations, ``sigma`` differentiable through ``w``, ``u`` and ``sigma`` updated.
  Evaluation (``update_stats=False``; ``model.eval()``): ``w / sigma`` with the
  stored ``sigma``, no iteration, nothing updated.  ``update_stats`` may be given
  at construction or per call (the call wins); as in flax.nnx, it follows
  ``model.train()``/``model.eval()`` through ``use_running_average``.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxnorm import nnx as jnnx
  >>> sn = jnnx.SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  >>> sn.u.shape, sn.sigma.shape
  ((4,), ())
  >>> y = sn(jnp.ones((2, 3)))                 # training: updates u, sigma
  >>> sn.eval(); sigma = sn.sigma[...]
  >>> y = sn(jnp.ones((2, 3))); bool(sn.sigma[...] == sigma)
  True
  """

  def __init__(self, layer_instance: nnx.Module, *, param_name: str = "kernel",
               n_steps: int = 1, out_axis: int = -1, epsilon: float = 1e-12,
               n_init_steps: int = 15, dtype: DType | None = None,
               param_dtype: DType = jnp.float32, update_stats: bool = True,
               rngs: nnx.Rngs):
    fn = "jaxnorm.nnx.SpectralNorm"
    w = _kernel(layer_instance, param_name, fn=fn)[...]
    state = init_spectral_state(rngs.params(), w, out_axis=out_axis, n_steps=n_init_steps,
                                epsilon=epsilon, dtype=param_dtype)
    # validated here, not first at the first call
    spectral_norm(w, state, training=False, n_steps=n_steps, out_axis=out_axis,
                  epsilon=epsilon)
    self.layer_instance = layer_instance
    self.u = nnx.BatchStat(state.u)
    self.sigma = nnx.BatchStat(state.sigma)
    self.param_name = param_name
    self.n_steps = n_steps
    self.out_axis = out_axis
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_running_average = not _axes.check_training(update_stats, fn=fn,
                                                        name="update_stats")

  def __call__(self, *args, update_stats: bool | None = None, **kwargs):
    fn = "jaxnorm.nnx.SpectralNorm"
    training = _axes.check_training(first_from(
        update_stats, None if self.use_running_average is None
        else not self.use_running_average,
        error_msg=(f"{fn}: no `update_stats` was given. Pass it to the constructor or the "
                   "call, or set it with model.train() / model.eval().")),
        fn=fn, name="update_stats")
    w = _kernel(self.layer_instance, self.param_name, fn=fn)[...]
    w_bar, new = spectral_norm(w, SpectralState(u=self.u[...], sigma=self.sigma[...]),
                               training=training, n_steps=self.n_steps,
                               out_axis=self.out_axis, epsilon=self.epsilon, dtype=self.dtype)
    if training:
      self.u[...] = new.u
      self.sigma[...] = new.sigma
    return _run_with(self.layer_instance, self.param_name, w_bar, args, kwargs)
