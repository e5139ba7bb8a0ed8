"""Conditional normalization as Flax linen modules: FiLM, AdaLN, AdaLN-Zero, conditional BN.

The modules create the projection (``nn.Dense``, named ``projection``) or the
per-class tables and call the functional core (:func:`jaxnorm.adaptive_norm`,
:func:`jaxnorm.conditional_batch_norm`); all the math lives there.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as _dtypes
from jax.nn import initializers

from .. import _axes, _conditional
from .._conditional import adaptive_norm, conditional_batch_norm, per_sample
from .._types import Axes, BatchStats, DType

Initializer = Any


class _Adaptive(nn.Module, kw_only=True):
  """Shared fields of FiLM/AdaLN/AdaLNZero: the projection and the normalizer."""

  norm: str | None = "layer"
  epsilon: float = 1e-6
  dtype: DType | None = None
  param_dtype: DType = jnp.float32
  activation: Callable[[jax.Array], jax.Array] | None = nn.silu
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = initializers.zeros
  precision: Any = None
  reduction_axes: Axes | None = None
  feature_axes: Axes = -1
  num_groups: int | None = None
  group_size: int | None = None
  axis_name: Any = None
  axis_index_groups: Any = None

  def _modulation(self, x, cond, num_chunks: int, fn: str):
    """Validates, projects ``cond`` to ``num_chunks`` per-sample arrays of the feature shape."""
    x = _axes.check_floating(x, fn=fn)
    if x.ndim < 2:
      raise ValueError(f"{fn}: the input must have a batch axis 0 and features, got shape "
                       f"{x.shape}.")
    feat = _axes.canonical_axes(self.feature_axes, x.ndim, what="feature_axes", fn=fn)
    fshape = _axes.feature_shape(x.shape, feat)
    cond = _conditional.check_condition(cond, batch=x.shape[0], fn=fn)
    if self.activation is not None:
      cond = self.activation(cond)
    p = nn.Dense(num_chunks * math.prod(fshape), use_bias=self.use_bias, dtype=self.dtype,
                 param_dtype=self.param_dtype, precision=self.precision,
                 kernel_init=self.kernel_init, bias_init=self.bias_init,
                 name="projection")(cond)
    chunks = _conditional.split_modulation(p, num_chunks, fshape, fn=fn)
    return x, feat, chunks, _dtypes.canonicalize_dtype(x, p, dtype=self.dtype)

  def _norm(self, x, shift, scale, feat, out_dtype, mask):
    return adaptive_norm(x, shift, scale, norm=self.norm, reduction_axes=self.reduction_axes,
                         feature_axes=feat, num_groups=self.num_groups,
                         group_size=self.group_size, where=mask, epsilon=self.epsilon,
                         axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
                         dtype=out_dtype)


class FiLM(_Adaptive, kw_only=True):
  """Feature-wise linear modulation (Perez et al. 2018) of ``x`` by a condition ``c``::

    [dgamma, beta] = Dense(2 * F)(activation(c))      (F = features of x)
    y = norm(x) * (1 + dgamma) + beta

  FiLM's generator predicts ``dgamma`` (``gamma = 1 + dgamma``, as in the paper's
  implementation) so a zero projection is the identity.  ``norm`` (default
  ``None``: FiLM on ``x`` itself, to follow a ``BatchNorm(use_scale=False,
  use_bias=False)`` as in the paper's ResBlocks) may be ``"layer"``, ``"rms"``,
  ``"instance"`` (AdaIN) or ``"group"``, fused with the modulation.  Projection
  outputs in the paper's order: gamma then beta.  ``kernel_init=zeros`` makes the
  module start as ``norm(x)``.  Computed by :func:`jaxnorm.adaptive_norm`.

  Call: ``FiLM()(x, cond, mask=None)`` with ``cond`` of shape ``(N, cond_features)``.

  >>> import jax, jax.numpy as jnp
  >>> from jaxnorm import linen as jnn
  >>> x, c = jnp.ones((2, 5, 3)), jnp.ones((2, 4))
  >>> film = jnn.FiLM()
  >>> variables = film.init(jax.random.key(0), x, c)
  >>> jax.tree.map(jnp.shape, variables)
  {'params': {'projection': {'bias': (6,), 'kernel': (4, 6)}}}
  """

  norm: str | None = None
  activation: Callable[[jax.Array], jax.Array] | None = None

  @nn.compact
  def __call__(self, x, cond, *, mask: jax.Array | None = None):
    fn = "jaxnorm.linen.FiLM"
    x, feat, (dgamma, beta), out_dtype = self._modulation(x, cond, 2, fn)
    return self._norm(x, beta, dgamma, feat, out_dtype, mask)


class AdaLN(_Adaptive, kw_only=True):
  """Adaptive layer norm (DiT's adaLN): layer norm without its own affine, modulated
  by a projection of the condition::

    shift, scale = Dense(2 * F)(silu(c))
    y = LayerNorm(x) * (1 + scale) + shift

  Projection outputs in DiT's order (shift, scale).  ``norm="rms"`` gives AdaRMSNorm.
  The projection uses flax's default initialisation; see :class:`AdaLNZero` for
  the zero-initialised variant.  Computed by :func:`jaxnorm.adaptive_norm`.

  >>> import jax, jax.numpy as jnp
  >>> from jaxnorm import linen as jnn
  >>> x, c = jnp.arange(12.).reshape(2, 2, 3), jnp.ones((2, 4))
  >>> ada = jnn.AdaLN(kernel_init=jax.nn.initializers.zeros, epsilon=0.)
  >>> ada.apply(ada.init(jax.random.key(0), x, c), x, c)[0]
  Array([[-1.2247448,  0.       ,  1.2247448],
         [-1.2247448,  0.       ,  1.2247448]], dtype=float32)
  """

  @nn.compact
  def __call__(self, x, cond, *, mask: jax.Array | None = None):
    fn = "jaxnorm.linen.AdaLN"
    x, feat, (shift, scale), out_dtype = self._modulation(x, cond, 2, fn)
    return self._norm(x, shift, scale, feat, out_dtype, mask)


class AdaLNZero(_Adaptive, kw_only=True):
  """AdaLN-Zero (Peebles & Xie 2023, DiT): a zero-initialised projection of
  ``silu(c)`` to shift, scale and a residual gate::

    shift, scale, gate = Dense(3 * F, kernel_init=zeros, bias_init=zeros)(silu(c))
    h = LayerNorm(x) * (1 + scale) + shift          (no affine of its own)

  Returns ``(h, gate)``, ``gate`` laid out against ``x`` (DiT's
  ``gate.unsqueeze(1)``).  Use it as ``x = x + gate * f(h)`` or
  ``jaxnorm.gated_residual(x, f(h), gate)``: at initialisation ``gate = 0``, so
  every block is the identity.  DiT's block projects ``c`` once to 6 chunks
  (shift, scale, gate for attention, then for the MLP); two ``AdaLNZero`` modules
  hold the same weights split in two.  Computed by :func:`jaxnorm.adaptive_norm`.

  >>> import jax, jax.numpy as jnp
  >>> from jaxnorm import linen as jnn
  >>> x, c = jnp.ones((2, 5, 3)), jnp.ones((2, 4))
  >>> ada = jnn.AdaLNZero()
  >>> h, gate = ada.apply(ada.init(jax.random.key(0), x, c), x, c)
  >>> gate.shape, float(abs(gate).max())
  ((2, 1, 3), 0.0)
  """

  kernel_init: Initializer = initializers.zeros
  bias_init: Initializer = initializers.zeros

  @nn.compact
  def __call__(self, x, cond, *, mask: jax.Array | None = None):
    fn = "jaxnorm.linen.AdaLNZero"
    x, feat, (shift, scale, gate), out_dtype = self._modulation(x, cond, 3, fn)
    h = self._norm(x, shift, scale, feat, out_dtype, mask)
    return h, per_sample(gate, name="gate", x_shape=x.shape, feature_axes=feat, fn=fn)


class ConditionalBatchNorm(nn.Module, kw_only=True):
  """Class-conditional batch norm: batch statistics as :class:`BatchNorm`, and the
  scale and bias of each sample looked up by its integer class label::

    y[i] = (x[i] - mean_B) * rsqrt(var_B + epsilon) * scale[labels[i]] + bias[labels[i]]

  Variables: ``params/scale`` and ``params/bias`` of shape ``(num_classes,
  *feature_shape)``, ``batch_stats/mean`` and ``batch_stats/var`` of the feature
  shape.  With ``num_classes=1`` it computes exactly :class:`BatchNorm`.  Computed
  by :func:`jaxnorm.conditional_batch_norm`.

  Call: ``(x, labels, use_running_average=None, *, mask=None)``; ``labels`` is an
  integer array ``(N,)``.  Other fields as :class:`jaxnorm.linen.BatchNorm`.

  >>> import jax, jax.numpy as jnp
  >>> from jaxnorm import linen as jnn
  >>> x, labels = jnp.array([[1., 2.], [3., 6.]]), jnp.array([0, 2])
  >>> cbn = jnn.ConditionalBatchNorm(num_classes=3, use_running_average=False)
  >>> variables = cbn.init(jax.random.key(0), x, labels)
  >>> jax.tree.map(jnp.shape, variables['params'])
  {'bias': (3, 2), 'scale': (3, 2)}
  """

  num_classes: int
  use_running_average: bool | None = None
  axis: Axes = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: DType | None = None
  param_dtype: DType = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  degenerate: str = "running"
  unbiased_var: bool = False

  @nn.compact
  def __call__(self, x, labels, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    fn = "jaxnorm.linen.ConditionalBatchNorm"
    use_running_average = _axes.check_training(
        nn.merge_param("use_running_average", self.use_running_average, use_running_average),
        fn=fn, name="use_running_average")
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ValueError(f"{fn}: num_classes must be a positive int, got {self.num_classes!r}.")
    x = _axes.check_floating(x, fn=fn)
    feat = _axes.canonical_axes(self.axis, x.ndim, what="axis", fn=fn)
    fshape = list(_axes.feature_shape(x.shape, feat))
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), fshape)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), fshape)
    tshape = [self.num_classes] + fshape
    scale = (self.param("scale", self.scale_init, tshape, self.param_dtype)
             if self.use_scale else None)
    bias = self.param("bias", self.bias_init, tshape, self.param_dtype) if self.use_bias else None
    out_dtype = _dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    initializing = self.is_initializing()
    y, new_stats = conditional_batch_norm(
        x, BatchStats(mean=ra_mean.value, var=ra_var.value), labels, scale, bias,
        training=not use_running_average, feature_axes=feat, momentum=self.momentum,
        epsilon=self.epsilon, where=mask,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        degenerate=self.degenerate, unbiased_var=self.unbiased_var, dtype=out_dtype)
    if not use_running_average and not initializing:
      ra_mean.value = new_stats.mean
      ra_var.value = new_stats.var
    return y
