"""Flax NNX modules: drop-in replacements for ``flax.nnx``'s normalization layers.

``jaxnorm.nnx.{BatchNorm, LayerNorm, RMSNorm, GroupNorm, InstanceNorm}`` take the
constructor arguments of their ``flax.nnx`` namesakes (``num_features``, ``rngs``,
the same keyword names and defaults), hold the same variables (``scale`` and
``bias`` as ``nnx.Param``, ``mean`` and ``var`` as ``nnx.BatchStat``) with the same
shapes and dtypes, draw the same keys from ``rngs``, and follow
``model.train()`` / ``model.eval()`` / ``nnx.view`` through the
``use_running_average`` attribute.  A model switches by changing one import::

  from flax import nnx
  from jaxnorm import nnx as jnnx   # then nnx.BatchNorm -> jnnx.BatchNorm

The modules hold variables and call the functional core (:func:`jaxnorm.batch_norm`,
:func:`jaxnorm.layer_norm`, ...), which computes

    y = (x - mean) * rsqrt(var + epsilon) * scale + bias

with the statistics in at least float32.  ``promote_dtype`` is applied to the
input and parameters as in flax; the output dtype is flax's.

Deliberate differences from ``flax.nnx`` (tested against a float64 NumPy
reference in ``tests/test_nnx.py``):

* Accurate statistics whatever ``use_fast_variance`` says (it selects nothing:
  jaxnorm's one-pass shifted-data statistics are at least as accurate as flax's
  two-pass ones and as cheap as its ``E[x^2] - E[x]^2``, which fails at large
  offsets such as ``x = 1e4 + N(0, 1)``).
* ``BatchNorm`` in evaluation does not cast the running averages to ``dtype``
  before subtracting them: with ``dtype=jnp.bfloat16`` flax.nnx rounds the
  running mean to bfloat16 and loses most of the output's accuracy.  The
  ``promote_dtype`` hook is still called with flax's 5-tuple
  ``(x, mean, var, scale, bias)``; the ``mean`` and ``var`` it returns are unused.
* ``GroupNorm`` works with any ``reduction_axes`` that include the channel axis,
  and with unbatched input (flax.nnx 0.12.8 repeats the group statistics along
  a hard-coded axis 1, which is wrong or fails for those).
* Masked statistics across devices (``axis_name``) are exact (sums and counts,
  not a mean of per-device means).
* ``BatchNorm(degenerate="running")`` (default) and ``unbiased_var=False``: see
  :func:`jaxnorm.batch_norm`; ``degenerate="batch"`` is flax's behaviour.
* Hyperparameters are keyword-only after ``num_features``:
  ``LayerNorm(12, 1e-3, rngs=...)`` and ``GroupNorm(12, 4, rngs=...)`` raise
  ``TypeError`` (flax.nnx accepts ``num_groups``/``group_size`` positionally).
* ``mask`` must be boolean.
"""

try:
  import flax  # noqa: F401
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
  raise ModuleNotFoundError(
      "jaxnorm.nnx needs Flax, which is not installed. Install it with "
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
from ._population import BatchMoments as BatchMoments
from ._population import precise_batch_stats as precise_batch_stats
from ._population import sow_batch_moments as sow_batch_moments
# Weight standardization, weight norm, spectral norm (_weights.py)
from ._weights import SpectralNorm as SpectralNorm
from ._weights import StdConv as StdConv
from ._weights import StdLinear as StdLinear
from ._weights import WeightNorm as WeightNorm
from ._weights import WSConv as WSConv
from ._weights import WSLinear as WSLinear
# Filter Response Normalization + TLU (_response.py); conditional normalization (_conditional.py)
from ._response import FilterResponseNorm as FilterResponseNorm
from ._conditional import AdaLN as AdaLN
from ._conditional import AdaLNZero as AdaLNZero
from ._conditional import ConditionalBatchNorm as ConditionalBatchNorm
from ._conditional import FiLM as FiLM
# Batch-norm folding (_fold.py)
from ._fold import Identity as Identity
from ._fold import fold_batch_norms as fold_batch_norms
