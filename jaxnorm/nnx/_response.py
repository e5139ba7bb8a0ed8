"""Filter Response Normalization (+ TLU) as a Flax NNX module."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers
from flax.nnx.nn import dtypes as _dtypes

from .. import _axes
from .._response import filter_response_norm, frn_axes
from .._types import Axes, DType
from ._norms import _fit, _value

Initializer = Any


class FilterResponseNorm(nnx.Module):
  """Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan 2019)::

    nu2 = mean(x^2)  over the spatial axes, per sample and channel
    y   = scale * x * rsqrt(nu2 + epsilon + |learned_epsilon|) + bias
    z   = max(y, tau)                       (use_tlu=True, the default)

  Replaces ``BatchNorm`` + ReLU; no batch dependence, no running averages.
  Variables (``nnx.Param``, ``(num_features,)`` unless noted): ``scale`` (ones),
  ``bias`` (zeros), ``tau`` (zeros, with ``use_tlu``), ``learned_epsilon`` (shape
  ``(1,)``, 1e-4, with ``use_learned_epsilon``).  Arguments as
  :class:`jaxnorm.linen.FilterResponseNorm`.  Computed by
  :func:`jaxnorm.filter_response_norm`.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxnorm import nnx as jnnx
  >>> frn = jnnx.FilterResponseNorm(1, epsilon=0., rngs=nnx.Rngs(0))
  >>> frn(jnp.array([[[3.], [-4.]]]))
  Array([[[0.84852815],
          [0.        ]]], dtype=float32)
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-6,
               dtype: DType | None = None, param_dtype: DType = jnp.float32,
               use_bias: bool = True, use_scale: bool = True, use_tlu: bool = True,
               use_learned_epsilon: bool = False,
               bias_init: Initializer = initializers.zeros_init(),
               scale_init: Initializer = initializers.ones_init(),
               tau_init: Initializer = initializers.zeros_init(),
               learned_epsilon_init: Initializer = initializers.constant(1e-4),
               reduction_axes: Axes | None = None, feature_axes: Axes = -1,
               axis_name: Any = None, axis_index_groups: Any = None,
               promote_dtype=_dtypes.promote_dtype, rngs: nnx.Rngs):
    shape = (num_features,)

    def make(use, init, shape):
      return nnx.Param(init(rngs.params(), shape, param_dtype)) if use else nnx.data(None)

    self.scale = make(use_scale, scale_init, shape)
    self.bias = make(use_bias, bias_init, shape)
    self.tau = make(use_tlu, tau_init, shape)
    self.learned_epsilon = make(use_learned_epsilon, learned_epsilon_init, (1,))
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.use_tlu = use_tlu
    self.use_learned_epsilon = use_learned_epsilon
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: jax.Array | None = None):
    """Normalizes ``x``; ``mask`` (boolean, broadcastable to ``x``) marks the
    positions that enter ``nu2`` (False for padding)."""
    fn = "jaxnorm.nnx.FilterResponseNorm"
    x, scale, bias, tau = self.promote_dtype(
        (x, _value(self.scale), _value(self.bias), _value(self.tau)), dtype=self.dtype)
    x = _axes.check_floating(x, fn=fn)
    red, feat = frn_axes(x.shape, self.reduction_axes, self.feature_axes, fn=fn)
    fshape = _axes.feature_shape(x.shape, feat)
    return filter_response_norm(
        x, _fit(scale, fshape), _fit(bias, fshape), tau=_fit(tau, fshape),
        reduction_axes=red, feature_axes=feat, where=mask, epsilon=self.epsilon,
        learned_epsilon=_value(self.learned_epsilon), axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        dtype=_dtypes.canonicalize_dtype(x, scale, bias, tau, dtype=self.dtype))
