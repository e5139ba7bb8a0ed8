"""Filter Response Normalization (+ TLU) as a Flax linen module."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as _dtypes
from jax.nn import initializers

from .. import _axes
from .._response import filter_response_norm, frn_axes
from .._types import Axes, DType

Initializer = Any


class FilterResponseNorm(nn.Module, kw_only=True):
  """Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan 2019)::

    nu2 = mean(x^2)  over the spatial axes, per sample and channel
    y   = scale * x * rsqrt(nu2 + epsilon + |learned_epsilon|) + bias
    z   = max(y, tau)                       (use_tlu=True, the default)

  A normalization *and* an activation: use it in place of ``BatchNorm`` + ReLU.
  No batch dependence and no running averages.  Variables (all ``params``, of the
  feature shape unless noted): ``scale`` (ones), ``bias`` (zeros), ``tau`` (zeros,
  with ``use_tlu``), ``learned_epsilon`` (shape ``(1,)``, 1e-4, with
  ``use_learned_epsilon``; recommended when the spatial extent is 1x1).
  Computed by :func:`jaxnorm.filter_response_norm`.

  Attributes:
    epsilon: fixed part of eps (>= 0).
    use_tlu, use_learned_epsilon, use_scale, use_bias: which parameters exist.
    reduction_axes: default every axis except 0 (batch) and ``feature_axes``.
    feature_axes: default -1 (NHWC); 1 for NCHW.
    dtype: output dtype; default ``x`` promoted with the parameters (flax's rule).
    param_dtype: dtype of the parameters.
    axis_name, axis_index_groups: reduce ``nu2`` across devices (sharded space).

  >>> import jax, jax.numpy as jnp
  >>> from jaxnorm import linen as jnn
  >>> x = jnp.array([[[3.], [-4.]]])                      # (N, L, C)
  >>> frn = jnn.FilterResponseNorm(epsilon=0.)
  >>> variables = frn.init(jax.random.key(0), x)
  >>> jax.tree.map(jnp.shape, variables)
  {'params': {'bias': (1,), 'scale': (1,), 'tau': (1,)}}
  >>> frn.apply(variables, x)
  Array([[[0.84852815],
          [0.        ]]], dtype=float32)
  """

  epsilon: float = 1e-6
  dtype: DType | None = None
  param_dtype: DType = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  use_tlu: bool = True
  use_learned_epsilon: bool = False
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  tau_init: Initializer = initializers.zeros
  learned_epsilon_init: Initializer = initializers.constant(1e-4)
  reduction_axes: Axes | None = None
  feature_axes: Axes = -1
  axis_name: Any = None
  axis_index_groups: Any = None

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    """Normalizes ``x``; ``mask`` (boolean, broadcastable to ``x``) marks the
    positions that enter ``nu2`` (False for padding)."""
    fn = "jaxnorm.linen.FilterResponseNorm"
    x = _axes.check_floating(x, fn=fn)
    red, feat = frn_axes(x.shape, self.reduction_axes, self.feature_axes, fn=fn)
    fshape = list(_axes.feature_shape(x.shape, feat))
    param = lambda name, init, shape: self.param(name, init, shape, self.param_dtype)
    scale = param("scale", self.scale_init, fshape) if self.use_scale else None
    bias = param("bias", self.bias_init, fshape) if self.use_bias else None
    tau = param("tau", self.tau_init, fshape) if self.use_tlu else None
    eps_l = (param("learned_epsilon", self.learned_epsilon_init, [1])
             if self.use_learned_epsilon else None)
    out_dtype = _dtypes.canonicalize_dtype(x, scale, bias, tau, dtype=self.dtype)
    return filter_response_norm(x, scale, bias, tau=tau, reduction_axes=red, feature_axes=feat,
                                where=mask, epsilon=self.epsilon, learned_epsilon=eps_l,
                                axis_name=self.axis_name,
                                axis_index_groups=self.axis_index_groups, dtype=out_dtype)
