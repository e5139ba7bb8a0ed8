"""Weight normalizers as Flax linen modules: standardized convolutions and dense
layers, and weight/spectral-norm wrappers around any layer with a kernel.

``StdConv``/``WSConv``/``StdDense``/``WSDense`` subclass ``flax.linen.Conv`` and
``flax.linen.Dense``: every field, call argument and behaviour is inherited, and
the kernel is standardized on every call (``param('kernel', ...)`` returns the
standardized kernel; the stored parameter is untouched), so a BiT/NFNet model
switches by one import and its ``params`` tree is the wrapped layer's (plus
``gain`` for the scaled ones).  ``WeightNorm`` and ``SpectralNorm`` wrap a layer
instance with ``nn.map_variables`` like their flax namesakes and create variables
with the same names.  The math is in :mod:`jaxnorm._weights`.
"""

from __future__ import annotations

from typing import Any, Iterable

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as _dtypes
from jax.nn import initializers

from .. import _axes
from .._types import Axes, DType
from .._weights import (SpectralState, init_spectral_state, scaled_weight_standardize,
                        spectral_norm, weight_norm, weight_norm_scale, weight_standardize)

Initializer = Any


# ----------------------------------------------------------------------------- standardized layers


def _standardized_kernel(mdl: nn.Module, kernel: jax.Array, *, scaled: bool) -> jax.Array:
  """The kernel standardized over its fan-in (all but the last axis); creates ``gain``."""
  if not scaled:
    return weight_standardize(kernel, epsilon=mdl.epsilon)
  gain = nn.Module.param(mdl, "gain", mdl.gain_init, (kernel.shape[-1],), mdl.param_dtype)
  return scaled_weight_standardize(kernel, gain, epsilon=mdl.epsilon)


class StdConv(nn.Conv):
  """``flax.linen.Conv`` with Weight Standardization (Qiao et al. 2019; BiT's ``StdConv2d``).

  ``kernel_hat = (kernel - mean) * rsqrt(var + epsilon)`` with the statistics over
  ``(*window, in // groups)`` for each output channel
  (:func:`jaxnorm.weight_standardize`; BiT used ``epsilon=1e-10``).
  Same ``params`` as ``nn.Conv``: ``kernel`` (raw) and ``bias``.

  >>> import jax, jax.numpy as jnp
  >>> from jaxnorm import linen as jnn
  >>> conv = jnn.StdConv(4, (3, 3))
  >>> variables = conv.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
  >>> jax.tree.map(jnp.shape, variables)
  {'params': {'bias': (4,), 'kernel': (3, 3, 3, 4)}}
  """

  epsilon: float = 1e-6

  @nn.nowrap
  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    value = super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    return _standardized_kernel(self, value, scaled=False) if name == "kernel" else value


class WSConv(nn.Conv):
  """``flax.linen.Conv`` with Scaled Weight Standardization and a learned gain (NFNets).

  ``kernel_hat = gain * (kernel - mean) * rsqrt(max(var * fan_in, epsilon))``, the
  statistics over ``(*window, in // groups)`` per output channel, ``fan_in`` their
  count (:func:`jaxnorm.scaled_weight_standardize`; DeepMind's ``WSConv2D``,
  ``epsilon=1e-4``).  ``params``: ``nn.Conv``'s ``kernel`` and ``bias`` plus
  ``gain`` of shape ``(features,)`` (``gain_init``, default ones).

  >>> import jax, jax.numpy as jnp
  >>> from jaxnorm import linen as jnn
  >>> conv = jnn.WSConv(4, (3, 3))
  >>> variables = conv.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
  >>> jax.tree.map(jnp.shape, variables)
  {'params': {'bias': (4,), 'gain': (4,), 'kernel': (3, 3, 3, 4)}}
  """

  epsilon: float = 1e-4
  gain_init: Initializer = initializers.ones

  @nn.nowrap
  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    value = super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    return _standardized_kernel(self, value, scaled=True) if name == "kernel" else value


class StdDense(nn.Dense):
  """``flax.linen.Dense`` with Weight Standardization of its ``(in, out)`` kernel
  over ``in`` (see :class:`StdConv`).  Same ``params`` as ``nn.Dense``."""

  epsilon: float = 1e-6

  @nn.nowrap
  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    value = super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    return _standardized_kernel(self, value, scaled=False) if name == "kernel" else value


class WSDense(nn.Dense):
  """``flax.linen.Dense`` with Scaled Weight Standardization of its ``(in, out)``
  kernel and a learned ``gain`` of shape ``(features,)`` (see :class:`WSConv`)."""

  epsilon: float = 1e-4
  gain_init: Initializer = initializers.ones

  @nn.nowrap
  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    value = super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    return _standardized_kernel(self, value, scaled=True) if name == "kernel" else value


# ----------------------------------------------------------------------------- wrappers


def _path_name(layer: nn.Module, path) -> str:
  """flax's variable naming: ``'<layer name>/<path in the layer>'``."""
  return layer.name + "/" + jax.tree_util.keystr(path[1:], simple=True, separator="/")


def _selected(name: str, variable_filter: Iterable[str] | None) -> bool:
  return not variable_filter or any(f in name for f in variable_filter)


def _no_match(fn: str, layer: nn.Module, variable_filter, found: list[str]) -> ValueError:
  return ValueError(
      f"{fn}: no parameter of the wrapped layer {type(layer).__name__} matches "
      f"variable_filter={variable_filter!r} (its parameters: {found or 'none'}). Wrap a "
      "layer with a kernel (e.g. nn.Dense, nn.Conv) or set variable_filter to a substring "
      "of the parameter's path.")


def _call_mapped(mdl: nn.Module, transform, args, kwargs):
  """Calls ``mdl.layer_instance`` with ``transform(path, value)`` applied to its params.

  The layer's parameters are created by calling it plainly first (``init`` only):
  ``nn.map_variables(..., init=True)`` would store the *transformed* values as the
  parameters (with flax.linen's ``SpectralNorm``, ``init`` stores ``W / sigma``).
  """
  if mdl.is_initializing():
    mdl.layer_instance(*args, **kwargs)
  return nn.map_variables(
      lambda layer: layer(*args, **kwargs), "params",
      trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(transform, vs))(
          mdl.layer_instance)


class WeightNorm(nn.Module, kw_only=True):
  """Weight normalization (Salimans & Kingma 2016) of a wrapped layer's kernels.

  For every parameter of ``layer_instance`` whose path contains a string of
  ``variable_filter`` (default: ``{'kernel'}``), the layer runs with
  ``w = scale * v / ||v||`` (:func:`jaxnorm.weight_norm`), where ``v`` is the
  layer's own stored parameter (never overwritten) and ``||v||`` is taken over
  every axis except ``feature_axes`` (default -1; ``None``: one norm).  The trained
  ``scale`` lives in this module's ``params`` as ``'<layer>/<path>/scale'``
  (flax.linen's names).

  Initialisation: ``scale_init=None`` (default) sets ``scale = ||v||``, so the
  wrapped layer computes at initialisation exactly what it computed unwrapped
  (PyTorch's ``weight_norm``); ``scale_init=nn.initializers.ones`` is
  flax.linen's ``scale = 1``.  ``use_scale=False`` uses the direction ``v / ||v||``
  alone.  ``epsilon`` is added to ``||v||^2``.

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from jaxnorm import linen as jnn
  >>> x = jnp.ones((2, 3))
  >>> wn = jnn.WeightNorm(layer_instance=nn.Dense(4))
  >>> variables = wn.init(jax.random.key(0), x)
  >>> jax.tree.map(jnp.shape, variables['params'])
  {'layer_instance': {'bias': (4,), 'kernel': (3, 4)}, 'layer_instance/kernel/scale': (4,)}
  >>> bool(jnp.allclose(wn.apply(variables, x),
  ...                   nn.Dense(4).apply({'params': variables['params']['layer_instance']}, x)))
  True
  """

  layer_instance: nn.Module
  epsilon: float = 1e-12
  dtype: DType | None = None
  param_dtype: DType = jnp.float32
  use_scale: bool = True
  scale_init: Initializer | None = None
  feature_axes: Axes | None = -1
  variable_filter: Iterable[str] | None = dataclasses.field(
      default_factory=lambda: {"kernel"})

  @nn.compact
  def __call__(self, *args, **kwargs):
    fn = "jaxnorm.linen.WeightNorm"
    found: list[str] = []
    matched: list[str] = []

    def normalize(path, v):
      name = _path_name(self.layer_instance, path)
      found.append(name)
      if not _selected(name, self.variable_filter):
        return v
      matched.append(name)
      v = jnp.asarray(v)
      g = None
      if self.use_scale:
        fshape = jax.eval_shape(lambda v: weight_norm_scale(
            v, feature_axes=self.feature_axes), v).shape
        init = self.scale_init or (lambda _, shape, dtype: weight_norm_scale(
            v, feature_axes=self.feature_axes, epsilon=self.epsilon).astype(dtype))
        g = self.param(name + "/scale", init, fshape, self.param_dtype)
      dtype = _dtypes.canonicalize_dtype(v, g, dtype=self.dtype)
      return weight_norm(v, g, feature_axes=self.feature_axes, epsilon=self.epsilon,
                         dtype=dtype)

    y = _call_mapped(self, normalize, args, kwargs)
    if not matched:
      raise _no_match(fn, self.layer_instance, self.variable_filter, found)
    return y


class SpectralNorm(nn.Module, kw_only=True):
  """Spectral normalization (Miyato et al. 2018) of a wrapped layer's matrices.

  Every parameter of ``layer_instance`` with at least two axes whose path
  contains a string of ``variable_filter`` (default ``{'kernel'}``) is used as
  ``w / sigma`` (:func:`jaxnorm.spectral_norm`, ``w`` read as an
  ``(out, in)`` matrix with ``out_axis`` first).  The stored parameter is never
  overwritten.  State in the ``collection_name`` collection (default
  ``'batch_stats'``), named as in flax.linen: ``'<layer>/<path>/u'`` of shape
  ``(1, out)`` and ``'<layer>/<path>/sigma'`` of shape ``()``, created by
  :func:`jaxnorm.init_spectral_state` (``n_init_steps`` power iterations, so
  evaluation right after ``init`` divides by a real estimate).

  ``update_stats=True`` (training; the collection must be mutable): ``n_steps``
  power iterations, ``sigma`` differentiable through ``w``, new ``u`` and
  ``sigma`` stored.  ``update_stats=False`` (evaluation): ``w / sigma`` with the
  stored ``sigma``, no iteration, nothing written -- unlike flax.linen, whose
  evaluation still iterates.  During ``init`` nothing is updated, and the wrapped
  layer's ``params`` hold its own initial kernel (flax.linen's ``SpectralNorm``
  stores ``W / sigma`` there, since ``nn.map_variables(init=True)`` writes the
  mapped value back).

  ``error_on_non_matrix=True`` raises for parameters of more than two axes
  (otherwise they are flattened around ``out_axis``); one-axis parameters (biases)
  are left alone, as in flax.

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from jaxnorm import linen as jnn
  >>> x = jnp.ones((2, 3))
  >>> sn = jnn.SpectralNorm(layer_instance=nn.Dense(4))
  >>> variables = sn.init(jax.random.key(0), x, update_stats=False)
  >>> jax.tree.map(jnp.shape, variables['batch_stats'])
  {'layer_instance/kernel/sigma': (), 'layer_instance/kernel/u': (1, 4)}
  >>> y, updates = sn.apply(variables, x, update_stats=True, mutable=['batch_stats'])
  """

  layer_instance: nn.Module
  n_steps: int = 1
  epsilon: float = 1e-12
  dtype: DType | None = None
  param_dtype: DType = jnp.float32
  error_on_non_matrix: bool = False
  collection_name: str = "batch_stats"
  out_axis: int = -1
  n_init_steps: int = 15
  variable_filter: Iterable[str] | None = dataclasses.field(
      default_factory=lambda: {"kernel"})

  @nn.compact
  def __call__(self, *args, update_stats: bool, **kwargs):
    fn = "jaxnorm.linen.SpectralNorm"
    training = _axes.check_training(update_stats, fn=fn, name="update_stats")
    initializing = self.is_initializing()
    found: list[str] = []
    matched: list[str] = []

    def normalize(path, w):
      name = _path_name(self.layer_instance, path)
      found.append(name)
      w = jnp.asarray(w)
      if w.ndim <= 1 or not _selected(name, self.variable_filter):
        return w
      if w.ndim > 2 and self.error_on_non_matrix:
        raise ValueError(f"{fn}: parameter {name} has {w.ndim} axes (shape {w.shape}) but "
                         "error_on_non_matrix=True; set it to False to flatten it around "
                         f"out_axis={self.out_axis}.")
      matched.append(name)
      init = {}

      def initial(field):
        if not init:  # one state for both variables
          init["state"] = init_spectral_state(
              self.make_rng("params"), w, out_axis=self.out_axis, n_steps=self.n_init_steps,
              epsilon=self.epsilon, dtype=self.param_dtype)
        return getattr(init["state"], field)

      u = self.variable(self.collection_name, name + "/u",
                        lambda: initial("u").reshape(1, -1))
      sigma = self.variable(self.collection_name, name + "/sigma", lambda: initial("sigma"))
      state = SpectralState(u=jnp.reshape(u.value, (-1,)), sigma=sigma.value)
      y, new = spectral_norm(w, state, training=training, n_steps=self.n_steps,
                             out_axis=self.out_axis, epsilon=self.epsilon, dtype=self.dtype)
      if training and not initializing:
        u.value = new.u.reshape(u.value.shape)
        sigma.value = new.sigma
      return y

    y = _call_mapped(self, normalize, args, kwargs)
    if not matched:
      raise _no_match(fn, self.layer_instance, self.variable_filter, found)
    return y
