"""Conditional normalization as Flax NNX modules: FiLM, AdaLN, AdaLN-Zero, conditional BN.

The modules hold the projection (``nnx.Linear``, attribute ``projection``) or the
per-class tables and call the functional core (:func:`jaxnorm.adaptive_norm`,
:func:`jaxnorm.conditional_batch_norm`); all the math lives there.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes as _dtypes

from .. import _axes, _conditional
from .._conditional import adaptive_norm, conditional_batch_norm, per_sample
from .._types import Axes, BatchStats, DType
from ._norms import _fit, _value

Initializer = Any
_DEFAULT = object()


class _Adaptive(nnx.Module):
  """Shared constructor and projection of FiLM/AdaLN/AdaLNZero."""

  _chunks = 2
  _scale_first = False  # FiLM's projection order is (gamma, beta); DiT's is (shift, scale)
  _fn = ""

  def __init__(self, num_features: int, cond_features: int, *, norm: str | None,
               epsilon: float, dtype: DType | None, param_dtype: DType,
               activation: Callable[[jax.Array], jax.Array] | None, use_bias: bool,
               kernel_init: Initializer, bias_init: Initializer, precision: Any,
               reduction_axes: Axes | None, feature_axes: Axes, num_groups: int | None,
               group_size: int | None, axis_name: Any, axis_index_groups: Any,
               rngs: nnx.Rngs):
    _conditional._check_norm(norm, fn=self._fn)
    self.projection = nnx.Linear(cond_features, self._chunks * num_features, use_bias=use_bias,
                                 dtype=dtype, param_dtype=param_dtype, precision=precision,
                                 kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
    self.num_features = num_features
    self.cond_features = cond_features
    self.norm = norm
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.activation = activation
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.num_groups = num_groups
    self.group_size = group_size
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups

  def _modulate(self, x, cond, mask):
    """Projects ``cond`` and normalizes ``x``; returns ``(y, chunks, feat)``."""
    fn = self._fn
    x = _axes.check_floating(x, fn=fn)
    if x.ndim < 2:
      raise ValueError(f"{fn}: the input must have a batch axis 0 and features, got shape "
                       f"{x.shape}.")
    feat = _axes.canonical_axes(self.feature_axes, x.ndim, what="feature_axes", fn=fn)
    fshape = _axes.feature_shape(x.shape, feat)
    if _axes.size(fshape, range(len(fshape))) != self.num_features:
      raise ValueError(f"{fn}: the input {x.shape} has features of shape {fshape} at axes "
                       f"{feat}, but the module was built with num_features="
                       f"{self.num_features}.")
    cond = _conditional.check_condition(cond, batch=x.shape[0], fn=fn,
                                        features=self.cond_features)
    if self.activation is not None:
      cond = self.activation(cond)
    p = self.projection(cond)
    chunks = _conditional.split_modulation(p, self._chunks, fshape, fn=fn)
    scale, shift = chunks[:2] if self._scale_first else chunks[1::-1]
    y = adaptive_norm(x, shift, scale, norm=self.norm, reduction_axes=self.reduction_axes,
                      feature_axes=feat, num_groups=self.num_groups,
                      group_size=self.group_size, where=mask, epsilon=self.epsilon,
                      axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
                      dtype=_dtypes.canonicalize_dtype(x, p, dtype=self.dtype))
    return y, chunks, feat


def _init(value, default):
  return default if value is _DEFAULT else value


class FiLM(_Adaptive):
  """Feature-wise linear modulation (Perez et al. 2018) of ``x`` by a condition::

    [dgamma, beta] = Linear(cond_features, 2 * num_features)(activation(cond))
    y = norm(x) * (1 + dgamma) + beta

  ``norm`` defaults to ``None`` (FiLM on ``x`` itself); ``"layer"``, ``"rms"``,
  ``"instance"`` (AdaIN) or ``"group"`` fuse that normalizer (without its own
  affine) with the modulation.  ``activation`` defaults to ``None``; the
  projection to ``nnx.Linear``'s initialisation (``kernel_init=zeros`` starts as
  ``norm(x)``).  See :class:`jaxnorm.linen.FiLM`.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxnorm import nnx as jnnx
  >>> film = jnnx.FiLM(3, 4, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
  >>> film(jnp.ones((2, 5, 3)), jnp.ones((2, 4))).shape
  (2, 5, 3)
  """

  _chunks = 2
  _scale_first = True
  _fn = "jaxnorm.nnx.FiLM"

  def __init__(self, num_features: int, cond_features: int, *, norm: str | None = None,
               epsilon: float = 1e-6, dtype: DType | None = None,
               param_dtype: DType = jnp.float32,
               activation: Callable[[jax.Array], jax.Array] | None = None,
               use_bias: bool = True, kernel_init: Initializer = _DEFAULT,
               bias_init: Initializer = initializers.zeros_init(), precision: Any = None,
               reduction_axes: Axes | None = None, feature_axes: Axes = -1,
               num_groups: int | None = None, group_size: int | None = None,
               axis_name: Any = None, axis_index_groups: Any = None, rngs: nnx.Rngs):
    super().__init__(num_features, cond_features, norm=norm, epsilon=epsilon, dtype=dtype,
                     param_dtype=param_dtype, activation=activation, use_bias=use_bias,
                     kernel_init=_init(kernel_init, nnx.initializers.lecun_normal()),
                     bias_init=bias_init, precision=precision, reduction_axes=reduction_axes,
                     feature_axes=feature_axes, num_groups=num_groups, group_size=group_size,
                     axis_name=axis_name, axis_index_groups=axis_index_groups, rngs=rngs)

  def __call__(self, x, cond, *, mask: jax.Array | None = None):
    return self._modulate(x, cond, mask)[0]


class AdaLN(_Adaptive):
  """Adaptive layer norm (DiT's adaLN)::

    shift, scale = Linear(cond_features, 2 * num_features)(silu(cond))
    y = LayerNorm(x) * (1 + scale) + shift          (no affine of its own)

  See :class:`jaxnorm.linen.AdaLN`; :class:`AdaLNZero` is the zero-initialised
  variant with a gate.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxnorm import nnx as jnnx
  >>> ada = jnnx.AdaLN(3, 4, epsilon=0., kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
  >>> ada(jnp.arange(12.).reshape(2, 2, 3), jnp.ones((2, 4)))[0]
  Array([[-1.2247448,  0.       ,  1.2247448],
         [-1.2247448,  0.       ,  1.2247448]], dtype=float32)
  """

  _chunks = 2
  _fn = "jaxnorm.nnx.AdaLN"

  def __init__(self, num_features: int, cond_features: int, *, norm: str | None = "layer",
               epsilon: float = 1e-6, dtype: DType | None = None,
               param_dtype: DType = jnp.float32,
               activation: Callable[[jax.Array], jax.Array] | None = nnx.silu,
               use_bias: bool = True, kernel_init: Initializer = _DEFAULT,
               bias_init: Initializer = initializers.zeros_init(), precision: Any = None,
               reduction_axes: Axes | None = None, feature_axes: Axes = -1,
               num_groups: int | None = None, group_size: int | None = None,
               axis_name: Any = None, axis_index_groups: Any = None, rngs: nnx.Rngs):
    super().__init__(num_features, cond_features, norm=norm, epsilon=epsilon, dtype=dtype,
                     param_dtype=param_dtype, activation=activation, use_bias=use_bias,
                     kernel_init=_init(kernel_init, nnx.initializers.lecun_normal()),
                     bias_init=bias_init, precision=precision, reduction_axes=reduction_axes,
                     feature_axes=feature_axes, num_groups=num_groups, group_size=group_size,
                     axis_name=axis_name, axis_index_groups=axis_index_groups, rngs=rngs)

  def __call__(self, x, cond, *, mask: jax.Array | None = None):
    return self._modulate(x, cond, mask)[0]


class AdaLNZero(_Adaptive):
  """AdaLN-Zero (Peebles & Xie 2023, DiT)::

    shift, scale, gate = Linear(cond_features, 3 * num_features,
                                kernel_init=zeros, bias_init=zeros)(silu(cond))
    h = LayerNorm(x) * (1 + scale) + shift

  Returns ``(h, gate)`` with ``gate`` laid out against ``x``; use
  ``x + gate * f(h)`` or ``jaxnorm.gated_residual(x, f(h), gate)``, the identity
  at initialisation.  See :class:`jaxnorm.linen.AdaLNZero`.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxnorm import nnx as jnnx
  >>> ada = jnnx.AdaLNZero(3, 4, rngs=nnx.Rngs(0))
  >>> h, gate = ada(jnp.ones((2, 5, 3)), jnp.ones((2, 4)))
  >>> gate.shape, float(abs(gate).max())
  ((2, 1, 3), 0.0)
  """

  _chunks = 3
  _fn = "jaxnorm.nnx.AdaLNZero"

  def __init__(self, num_features: int, cond_features: int, *, norm: str | None = "layer",
               epsilon: float = 1e-6, dtype: DType | None = None,
               param_dtype: DType = jnp.float32,
               activation: Callable[[jax.Array], jax.Array] | None = nnx.silu,
               use_bias: bool = True, kernel_init: Initializer = initializers.zeros_init(),
               bias_init: Initializer = initializers.zeros_init(), precision: Any = None,
               reduction_axes: Axes | None = None, feature_axes: Axes = -1,
               num_groups: int | None = None, group_size: int | None = None,
               axis_name: Any = None, axis_index_groups: Any = None, rngs: nnx.Rngs):
    super().__init__(num_features, cond_features, norm=norm, epsilon=epsilon, dtype=dtype,
                     param_dtype=param_dtype, activation=activation, use_bias=use_bias,
                     kernel_init=kernel_init, bias_init=bias_init, precision=precision,
                     reduction_axes=reduction_axes, feature_axes=feature_axes,
                     num_groups=num_groups, group_size=group_size, axis_name=axis_name,
                     axis_index_groups=axis_index_groups, rngs=rngs)

  def __call__(self, x, cond, *, mask: jax.Array | None = None):
    h, (_, _, gate), feat = self._modulate(x, cond, mask)
    return h, per_sample(gate, name="gate", x_shape=jnp.shape(x), feature_axes=feat,
                         fn=self._fn)


class ConditionalBatchNorm(nnx.Module):
  """Class-conditional batch norm: :class:`BatchNorm`'s statistics and running
  averages (``nnx.BatchStat`` ``mean``/``var`` of ``(num_features,)``) with the scale
  and bias of each sample looked up by its integer label in ``nnx.Param`` tables
  ``scale``/``bias`` of shape ``(num_classes, num_features)``::

    y[i] = (x[i] - mean_B) * rsqrt(var_B + epsilon) * scale[labels[i]] + bias[labels[i]]

  Call: ``(x, labels, use_running_average=None, *, mask=None)``; follows
  ``model.train()``/``model.eval()``.  Other arguments as
  :class:`jaxnorm.nnx.BatchNorm`.  Computed by :func:`jaxnorm.conditional_batch_norm`.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxnorm import nnx as jnnx
  >>> cbn = jnnx.ConditionalBatchNorm(2, 3, epsilon=0., rngs=nnx.Rngs(0))
  >>> cbn(jnp.array([[1., 2.], [3., 6.]]), jnp.array([0, 2]))
  Array([[-1., -1.],
         [ 1.,  1.]], dtype=float32)
  """

  def __init__(self, num_features: int, num_classes: int, *,
               use_running_average: bool | None = False, axis: Axes = -1,
               momentum: float = 0.99, epsilon: float = 1e-5, dtype: DType | None = None,
               param_dtype: DType = jnp.float32, use_bias: bool = True,
               use_scale: bool = True, bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(), axis_name: Any = None,
               axis_index_groups: Any = None, promote_dtype=_dtypes.promote_dtype,
               rngs: nnx.Rngs, degenerate: str = "running", unbiased_var: bool = False):
    fn = "jaxnorm.nnx.ConditionalBatchNorm"
    _axes.check_choice(degenerate, ("running", "batch"), fn=fn, name="degenerate")
    if not isinstance(num_classes, int) or num_classes < 1:
      raise ValueError(f"{fn}: num_classes must be a positive int, got {num_classes!r}.")
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    tshape = (num_classes, num_features)
    self.scale = (nnx.Param(scale_init(rngs.params(), tshape, param_dtype)) if use_scale
                  else nnx.data(None))
    self.bias = (nnx.Param(bias_init(rngs.params(), tshape, param_dtype)) if use_bias
                 else nnx.data(None))
    self.num_features = num_features
    self.num_classes = num_classes
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.promote_dtype = promote_dtype
    self.degenerate = degenerate
    self.unbiased_var = unbiased_var

  def __call__(self, x, labels, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    fn = "jaxnorm.nnx.ConditionalBatchNorm"
    use_running_average = _axes.check_training(first_from(
        use_running_average, self.use_running_average,
        error_msg=(f"{fn}: no `use_running_average` was given. Pass it to the constructor "
                   "or the call, or set it with model.train() / model.eval().")),
        fn=fn, name="use_running_average")
    mean, var = self.mean[...], self.var[...]
    x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)),
                                        dtype=self.dtype)
    x = _axes.check_floating(x, fn=fn)
    out_dtype = _dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    feat = _axes.canonical_axes(self.axis, x.ndim, what="axis", fn=fn)
    fshape = _axes.feature_shape(x.shape, feat)
    table = lambda t: None if t is None else _fit(t, (self.num_classes,) + fshape)
    y, new_stats = conditional_batch_norm(
        x, BatchStats(mean=_fit(mean, fshape), var=_fit(var, fshape)), labels, table(scale),
        table(bias), training=not use_running_average, feature_axes=feat,
        momentum=self.momentum, epsilon=self.epsilon, where=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, degenerate=self.degenerate,
        unbiased_var=self.unbiased_var, dtype=out_dtype)
    if not use_running_average:
      if self.mean._can_update or self.var._can_update:
        stop_gradient = jax.lax.stop_gradient
      else:
        stop_gradient = lambda v: v
      self.mean[...] = stop_gradient(new_stats.mean.reshape(mean.shape))
      self.var[...] = stop_gradient(new_stats.var.reshape(var.shape))
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view(model, use_running_average=...)``."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
