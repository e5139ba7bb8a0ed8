"""Experiments that measure what normalization does, on scikit-learn's bundled digits.

Each experiment is a function that trains small networks written with the
jaxnorm functional API in plain JAX (explicit parameter pytrees, ``lax.scan``
training loops ``vmap``-ed over seeds and learning rates) and returns a
:class:`Result`: result tables, verdicts computed from the measurements, the raw
data, and figures (``Result.figures()`` / ``Result.save_figures(out_dir)``).

==================  =============================================================
``convergence``     no norm / BN / LN / GN / RMSNorm over a learning-rate sweep
``ioffe_szegedy``   Ioffe & Szegedy's MNIST figure: 3x100 sigmoid MLP with/without BN
``initialization``  weight-scale sweep with and without BN
``batch_size``      BN vs LN vs GN from batch 2 to 256; BN's train/eval gap
``recurrent``       tanh RNN with LN, BN or neither
``smoothness``      internal covariate shift vs loss smoothness (Santurkar et al.)
``devices``         synchronized vs per-device BN under ``shard_map`` (needs 8 devices)
==================  =============================================================

Every function takes ``seeds`` (a count or a list), ``quick`` (a tiny configuration
for tests) and ``progress`` (tqdm bars).  The same experiments run from the
command line: ``python -m jaxnorm.experiments [name] [--seeds N] [--out DIR]``.

The optional dependencies (scikit-learn, matplotlib, tqdm) are imported only when
an experiment runs; install them with ``pip install -e ".[notebooks]"``.
"""

from ._batch_size import batch_size as batch_size
from ._common import CONDITIONAL as CONDITIONAL
from ._common import HELD as HELD
from ._common import NOT_HELD as NOT_HELD
from ._common import Digits as Digits
from ._common import Result as Result
from ._common import Table as Table
from ._common import Verdict as Verdict
from ._common import load_digits as load_digits
from ._convergence import convergence as convergence
from ._convergence import ioffe_szegedy as ioffe_szegedy
from ._devices import devices as devices
from ._devices import exactness as exactness
from ._initialization import initialization as initialization
from ._nets import CNN as CNN
from ._nets import MLP as MLP
from ._nets import RNN as RNN
from ._recurrent import recurrent as recurrent
from ._smoothness import smoothness as smoothness
from ._train import train as train
from ._common import INCONCLUSIVE as INCONCLUSIVE
from ._common import combine as combine
from ._common import decide as decide
from ._common import t_interval as t_interval
from ._convergence import usable_runs as usable_runs
