"""jaxnorm: normalization layers for JAX as pure functions with explicit state.

The functional API is re-exported here once, grouped by family (each family is a
private module of pure functions); the Flax frontends live in ``jaxnorm.linen`` and
``jaxnorm.nnx`` (importing ``jaxnorm`` does not import Flax).
"""

__version__ = "0.2.0"

# State and statistics (jaxnorm/_types.py, jaxnorm/_stats.py)
from ._types import BatchStats as BatchStats
from ._types import CountedBatchStats as CountedBatchStats
from ._types import Moments as Moments
from ._types import init_batch_stats as init_batch_stats
from ._stats import moments as moments
from ._stats import update_batch_stats as update_batch_stats
# The standard normalizers (jaxnorm/_norms.py)
from ._norms import batch_norm as batch_norm
from ._norms import group_norm as group_norm
from ._norms import instance_norm as instance_norm
from ._norms import layer_norm as layer_norm
from ._norms import normalize as normalize
from ._norms import rms_norm as rms_norm
# Batch Renorm, Ghost BN, EvoNorm (jaxnorm/_renorm.py)
from ._renorm import batch_renorm as batch_renorm
from ._renorm import evonorm_b0 as evonorm_b0
from ._renorm import evonorm_s0 as evonorm_s0
from ._renorm import ghost_batch_norm as ghost_batch_norm
from ._renorm import renorm_schedule as renorm_schedule
# Population statistics, PreciseBN (jaxnorm/_population.py)
from ._population import PopulationStats as PopulationStats
from ._population import init_population_stats as init_population_stats
from ._population import population_batch_stats as population_batch_stats
from ._population import update_population_stats as update_population_stats
# Weight standardization, weight norm, spectral norm (jaxnorm/_weights.py)
from ._weights import SpectralState as SpectralState
from ._weights import init_spectral_state as init_spectral_state
from ._weights import scaled_weight_standardize as scaled_weight_standardize
from ._weights import spectral_norm as spectral_norm
from ._weights import weight_norm as weight_norm
from ._weights import weight_norm_scale as weight_norm_scale
from ._weights import weight_standardize as weight_standardize
# Filter Response Normalization + TLU (jaxnorm/_response.py)
from ._response import filter_response_norm as filter_response_norm
from ._response import tlu as tlu
# Conditional normalization: FiLM, AdaLN, AdaLN-Zero, class-conditional BN (jaxnorm/_conditional.py)
from ._conditional import adaptive_norm as adaptive_norm
from ._conditional import conditional_batch_norm as conditional_batch_norm
from ._conditional import gated_residual as gated_residual
from ._conditional import modulate as modulate
# Batch-norm folding (jaxnorm/_fold.py) and checkpoint converters (jaxnorm/_convert.py)
from ._fold import fold_batch_norm as fold_batch_norm
from ._fold import fold_batch_norm_into_next as fold_batch_norm_into_next
from ._convert import Converted as Converted
from ._convert import conv_kernel_from_torch as conv_kernel_from_torch
from ._convert import conv_kernel_to_torch as conv_kernel_to_torch
from ._convert import from_haiku as from_haiku
from ._convert import from_keras as from_keras
from ._convert import from_torch as from_torch
from ._convert import to_haiku as to_haiku
from ._convert import to_keras as to_keras
from ._convert import to_torch as to_torch
# Autodiff path and fused CPU kernels (jaxnorm/_vjp.py, jaxnorm/_cpu/)
from ._vjp import plain_autodiff as plain_autodiff
from ._cpu import kernels_available as kernels_available
from ._cpu import no_kernels as no_kernels
