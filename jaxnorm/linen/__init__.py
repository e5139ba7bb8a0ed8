"""Flax linen modules: drop-in replacements for ``flax.linen``'s normalization layers.

``jaxnorm.linen.{BatchNorm, LayerNorm, RMSNorm, GroupNorm, InstanceNorm}`` accept
every constructor field of their ``flax.linen`` namesakes (same names, defaults and
meaning), take the same call arguments (``use_running_average``, ``mask``) and
create the same variables (``params/scale``, ``params/bias``,
``batch_stats/mean``, ``batch_stats/var``) with the same shapes and dtypes, so a
model switches by changing one import and its checkpoints load both ways::

  import flax.linen as nn
  from jaxnorm import linen as jnn   # then nn.BatchNorm -> jnn.BatchNorm

The modules only create variables and call the functional core
(:func:`jaxnorm.batch_norm`, :func:`jaxnorm.layer_norm`, ...); all the math lives
there.  Every normalizer computes

    y = (x - mean) * rsqrt(var + epsilon) * scale + bias

with ``mean`` and the biased ``var`` taken over the layer's reduction axes, in at
least float32, and returns ``y`` in ``dtype`` (default: ``x`` promoted with the
parameters, as flax does).

Deliberate differences from ``flax.linen`` (each tested against a float64 NumPy
reference in ``tests/test_linen.py``):

* Accurate statistics whatever ``use_fast_variance`` says.  flax's
  ``use_fast_variance=True`` (its default) computes ``E[x^2] - E[x]^2`` and loses
  every digit when ``|mean| >> std`` (``x = 1e4 + N(0, 1)`` in float32: errors
  of ~1e3 in the output); ``False`` makes a second pass over ``x`` (error ~8e-4
  there, from rounding the mean to float32).  jaxnorm always uses its one-pass
  shifted-data statistics, which keep the mean as ``shift + offset`` (error
  ~6e-7 there) at the cost of the fast method, so the field is accepted for
  compatibility and selects nothing.
* Statistics are always at least float32.  ``force_float32_reductions=False``
  still selects flax's dtypes for the ``batch_stats`` variables (``param_dtype``)
  so checkpoints match, but lowers the precision of neither the reductions nor
  ``rsqrt(var + epsilon)`` in evaluation, and the running averages keep their
  dtype when updated (flax.linen turns bfloat16 ones into float32 after an
  update from a float32 input).
* Across devices (``axis_name``) jaxnorm reduces sums and counts, so masked
  statistics equal the global batch's exactly; flax averages per-device means,
  which is wrong when masks leave devices with unequal counts.
* ``BatchNorm(degenerate="running")`` (jaxnorm's default): a feature with fewer
  than two included elements in the batch (a batch of one, an all-masked batch)
  or non-finite batch statistics is normalized with the running averages, which
  it leaves unchanged.  flax normalizes a batch of one to ``bias`` and lets NaN
  into the running averages; ``degenerate="batch"`` restores that behaviour.
* ``BatchNorm(unbiased_var=False)``: extra field; ``True`` updates the running
  variance with ``n / (n - 1)`` as PyTorch does.
* ``mask`` must be boolean (flax.linen silently casts other dtypes to bool).
* Hyperparameters are keyword-only: ``LayerNorm(12)`` raises ``TypeError``
  instead of meaning ``epsilon=12``.
"""

try:
  import flax  # noqa: F401
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
  raise ModuleNotFoundError(
      "jaxnorm.linen needs Flax, which is not installed. Install it with "
      "`pip install jaxnorm[flax]` (or `pip install flax`); the functional API "
      "(`import jaxnorm`) works without it.", name=e.name) from e

# The standard normalizers (_norms.py)
from ._norms import BatchNorm as BatchNorm
from ._norms import GroupNorm as GroupNorm
from ._norms import InstanceNorm as InstanceNorm
from ._norms import LayerNorm as LayerNorm
from ._norms import RMSNorm as RMSNorm
# Batch Renorm, Ghost BN, EvoNorm (_renorm.py)
from ._renorm import BatchRenorm as BatchRenorm
from ._renorm import EvoNormB0 as EvoNormB0
from ._renorm import EvoNormS0 as EvoNormS0
from ._renorm import GhostBatchNorm as GhostBatchNorm
# Population statistics, PreciseBN (_population.py)
from ._population import precise_batch_stats as precise_batch_stats
from ._population import sow_batch_moments as sow_batch_moments
# Weight standardization, weight norm, spectral norm (_weights.py)
from ._weights import SpectralNorm as SpectralNorm
from ._weights import StdConv as StdConv
from ._weights import StdDense as StdDense
from ._weights import WeightNorm as WeightNorm
from ._weights import WSConv as WSConv
from ._weights import WSDense as WSDense
# Filter Response Normalization + TLU (_response.py); conditional normalization (_conditional.py)
from ._response import FilterResponseNorm as FilterResponseNorm
from ._conditional import AdaLN as AdaLN
from ._conditional import AdaLNZero as AdaLNZero
from ._conditional import ConditionalBatchNorm as ConditionalBatchNorm
from ._conditional import FiLM as FiLM
# Batch-norm folding (_fold.py)
from ._fold import fold_batch_norms as fold_batch_norms
