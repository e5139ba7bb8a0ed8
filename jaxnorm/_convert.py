"""Checkpoint converters: PyTorch, Keras and Haiku normalization layers <-> jaxnorm/Flax.

jaxnorm (like ``flax.linen``) keeps a normalization layer's variables as::

  {"params": {"scale": (C,), "bias": (C,)}, "batch_stats": {"mean": (C,), "var": (C,)}}

The other frameworks differ in names, shapes and conventions:

============  ==========================  ===============================  =====================
framework     affine                      running statistics               momentum
============  ==========================  ===============================  =====================
PyTorch       ``weight``, ``bias``        ``running_mean``, ``running_var``  ``m``: jaxnorm ``1 - m``;
                                          (unbiased), ``num_batches_tracked``  ``None``: cumulative
Keras         ``gamma``, ``beta``         ``moving_mean``,                 same as jaxnorm
                                          ``moving_variance`` (biased)
Haiku         ``scale``, ``offset``       ``mean_ema``/``var_ema`` states   ``decay_rate`` = jaxnorm
              (BatchNorm: ``[1,..,1,C]``)  ``{counter, hidden, average}``    momentum, zero-debiased
============  ==========================  ===============================  =====================

Every ``from_*`` function returns :class:`Converted`: the variables (as above, for
the layer itself: nest them under the layer's name) and ``fields``, the constructor
fields of the matching ``jaxnorm.linen`` module (``jaxnorm.nnx`` takes the same
names), so ``jaxnorm.linen.BatchNorm(**fields)`` computes what the source layer
computed.  Every ``to_*`` function returns the source framework's variables and
constructor arguments.  Arrays come back as NumPy arrays (copies) in their own
dtype; PyTorch tensors are read with ``np.asarray(t.detach().cpu()).copy()`` (PyTorch itself
is never imported).  Layouts of the *inputs* (NCHW vs NHWC) are not changed: the
fields assume channels last (``axis=-1``); for NCHW data pass ``axis=1`` (or
``feature_axes``) yourself.  Convolution kernels: :func:`conv_kernel_from_torch`.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from . import _types

KINDS = ("batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm")


class Converted(NamedTuple):
  """A converted layer.

  Attributes:
    variables: ``{"params": {...}, "batch_stats": {...}}`` for this one layer
      (collections without entries are omitted).
    fields: keyword arguments for the matching ``jaxnorm.linen`` module
      (``BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``InstanceNorm``).
  """

  variables: dict
  fields: dict


def _counted_supported() -> bool:
  """Whether jaxnorm's running averages can count updates (PyTorch ``momentum=None``,
  Haiku's debiased EMA)."""
  return hasattr(_types, "CountedBatchStats")


def _array(v: Any) -> np.ndarray:
  """A NumPy copy of a NumPy/JAX array or a torch tensor (read via ``detach().cpu()``).

  A copy: a CPU tensor's NumPy view shares its memory, and PyTorch updates running
  statistics in place, which would silently change the converted values.
  """
  if hasattr(v, "detach") and hasattr(v, "cpu"):
    v = v.detach().cpu()
  return np.asarray(v).copy()


def _flip(momentum: float) -> float:
  """``1 - momentum`` (PyTorch <-> jaxnorm), rounded to 12 digits so 0.1 <-> 0.9 stay exact."""
  return round(1.0 - float(momentum), 12)


def _check_kind(kind: str, fn: str, kinds: Sequence[str] = KINDS) -> None:
  if kind not in kinds:
    raise ValueError(f"{fn}: kind must be one of {list(kinds)}, got {kind!r}.")


def _prefix(prefix: str) -> str:
  return prefix + "." if prefix and not prefix.endswith(".") else prefix


def _flat(v: np.ndarray | None, c: int | None, *, name: str, fn: str) -> np.ndarray | None:
  """A per-channel array of shape (C,) from (C,) or a keep-dims (1, ..., 1, C)."""
  if v is None:
    return None
  if v.ndim >= 1 and all(d == 1 for d in v.shape[:-1]):
    v = v.reshape(v.shape[-1:])
  if v.ndim != 1 or (c is not None and v.shape[0] != c):
    raise ValueError(f"{fn}: {name} has shape {v.shape}; expected one entry per channel"
                     f"{'' if c is None else f' ({c},)'} (or (1, ..., 1, C)).")
  return v


def _build(kind: str, *, scale, bias, mean=None, var=None, count=None, epsilon: float,
           fn: str, **fields) -> Converted:
  """Variables and linen fields from per-channel arrays (``None`` = absent)."""
  params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
  out = dict(epsilon=float(epsilon))
  if kind != "rms_norm":
    out["use_bias"] = bias is not None
  out["use_scale"] = scale is not None
  variables: dict = {"params": params} if params else {}
  if mean is not None or var is not None:
    if mean is None or var is None:
      raise ValueError(f"{fn}: got only one of the running mean and variance; give both.")
    variables["batch_stats"] = {"mean": mean, "var": var}
    if count is not None:
      variables["batch_stats"]["count"] = count
  out.update(fields)
  return Converted(variables=variables, fields=out)


def _unpack(variables: Mapping, kind: str, *, fn: str):
  """``(scale, bias, mean, var, count)`` of one jaxnorm/flax layer's variables."""
  if not isinstance(variables, Mapping) or not set(variables) <= {"params", "batch_stats"}:
    got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
    raise ValueError(f"{fn}: variables must be one layer's {{'params': ..., 'batch_stats': "
                     f"...}}, got {got}. Pass e.g. variables['params']['BatchNorm_0'] wrapped "
                     "as {'params': ..., 'batch_stats': ...}.")
  p, s = variables.get("params", {}), variables.get("batch_stats", {})
  get = lambda d, k: None if d.get(k) is None else _array(d[k])
  scale, bias, mean, var, count = (get(p, "scale"), get(p, "bias"), get(s, "mean"),
                                   get(s, "var"), get(s, "count"))
  if kind == "batch_norm" and (mean is None or var is None):
    raise ValueError(f"{fn}: a batch norm needs batch_stats/mean and batch_stats/var, got "
                     f"batch_stats keys {sorted(s)}.")
  return scale, bias, mean, var, count


def _channels(*arrays) -> int | None:
  for a in arrays:
    if a is not None:
      return int(a.shape[-1])
  return None


# ----------------------------------------------------------------------------- PyTorch


def from_torch(state_dict: Mapping[str, Any], *, kind: str, prefix: str = "",
               eps: float | None = None, momentum: float | None = 0.1,
               num_groups: int | None = None, num_features: int | None = None) -> Converted:
  """Converts one PyTorch normalization layer's ``state_dict`` entries.

  ``kind``: ``"batch_norm"`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``),
  ``"layer_norm"``, ``"rms_norm"``, ``"group_norm"`` or ``"instance_norm"``
  (``InstanceNorm1d/2d/3d``).  Entries are ``prefix + name`` (``"bn1."`` or
  ``"bn1"``): ``weight`` -> ``params/scale``, ``bias`` -> ``params/bias``,
  ``running_mean`` -> ``batch_stats/mean``, ``running_var`` -> ``batch_stats/var``
  (each only if present: ``affine=False``, ``track_running_stats=False``).

  Hyperparameters are not in a ``state_dict``: pass the module's (defaults are
  PyTorch's).  The fields returned:

  * batch norm: ``momentum = 1 - m`` and ``unbiased_var=True`` (PyTorch updates
    the running variance with ``n / (n - 1)``); ``momentum=None`` (cumulative
    average) becomes jaxnorm's ``momentum=None`` with the update count
    ``batch_stats/count`` from ``num_batches_tracked``.  Otherwise
    ``num_batches_tracked`` is dropped (it is unused for a numeric momentum).
    Without running statistics (``track_running_stats=False``, where PyTorch
    normalizes with batch statistics also in ``eval()``) the fields say
    ``use_running_average=False`` and fresh ``mean = 0``, ``var = 1`` are
    returned for the module to hold (they are never read).
  * instance norm with ``track_running_stats=True``: the running statistics are
    kept in ``batch_stats``; PyTorch's ``eval()`` then normalizes with them,
    which is ``jaxnorm.batch_norm(x, BatchStats(mean, var), scale, bias,
    training=False, feature_axes=...)`` (``jaxnorm.linen.InstanceNorm`` uses
    per-instance statistics only, PyTorch's ``train()`` behaviour).
  * layer/RMS norm: ``reduction_axes = feature_axes`` = the last
    ``len(normalized_shape)`` axes; RMS norm with ``eps=None`` uses PyTorch's
    default ``finfo(float32).eps`` (PyTorch takes the input's dtype).
  * group norm: ``num_groups`` is required.
  ``eps`` defaults to PyTorch's 1e-5.

  >>> import numpy as np, jaxnorm as jn
  >>> sd = {"bn.weight": np.ones(2), "bn.bias": np.zeros(2), "bn.running_mean": np.zeros(2),
  ...       "bn.running_var": np.ones(2), "bn.num_batches_tracked": np.array(3)}
  >>> jn.from_torch(sd, kind="batch_norm", prefix="bn").fields
  {'epsilon': 1e-05, 'use_bias': True, 'use_scale': True, 'unbiased_var': True, 'momentum': 0.9}
  """
  fn = "jaxnorm.from_torch"
  _check_kind(kind, fn)
  pre = _prefix(prefix)
  get = lambda name: None if state_dict.get(pre + name) is None else _array(
      state_dict[pre + name])
  weight, bias = get("weight"), get("bias")
  mean, var, nbt = get("running_mean"), get("running_var"), get("num_batches_tracked")
  if weight is None and bias is None and mean is None and kind != "batch_norm":
    if not any(k.startswith(pre) for k in state_dict):
      raise KeyError(f"{fn}: no entries start with {pre!r}; keys look like "
                     f"{list(state_dict)[:6]}. Pass the layer's prefix, e.g. 'features.1'.")
  if kind in ("layer_norm", "rms_norm"):
    if kind == "rms_norm" and bias is not None:
      raise ValueError(f"{fn}: an RMS norm has no bias, but {pre}bias is present; is this a "
                       "LayerNorm (kind='layer_norm')?")
    shape = next((a.shape for a in (weight, bias) if a is not None), None)
    if shape is None:
      raise ValueError(f"{fn}: a {kind} without elementwise_affine has no entries; build "
                       f"jaxnorm.linen.{'LayerNorm' if kind == 'layer_norm' else 'RMSNorm'}"
                       "(use_scale=False, use_bias=False) directly.")
    axes = -1 if len(shape) == 1 else tuple(range(-len(shape), 0))
    if eps is None:
      eps = float(np.finfo(weight.dtype if weight is not None else np.float32).eps) if (
          kind == "rms_norm") else 1e-5
    return _build(kind, scale=weight, bias=bias if kind == "layer_norm" else None,
                  epsilon=eps, fn=fn, reduction_axes=axes, feature_axes=axes)
  c = _channels(weight, bias, mean, var) or num_features
  for name, v in (("weight", weight), ("bias", bias), ("running_mean", mean),
                  ("running_var", var)):
    _flat(v, c, name=pre + name, fn=fn)
  eps = 1e-5 if eps is None else eps
  if kind == "group_norm":
    if num_groups is None:
      raise ValueError(f"{fn}: kind='group_norm' needs num_groups (the module's, it is not "
                       "in the state_dict).")
    return _build(kind, scale=weight, bias=bias, epsilon=eps, fn=fn, num_groups=num_groups)
  if kind == "instance_norm":
    return _build(kind, scale=weight, bias=bias, mean=mean, var=var, epsilon=eps, fn=fn)
  # batch norm
  fields: dict = dict(unbiased_var=True)
  count = None
  if mean is None:
    if c is None:
      raise ValueError(f"{fn}: a BatchNorm with affine=False and track_running_stats=False "
                       "has no entries; pass num_features.")
    mean, var = np.zeros((c,), np.float32), np.ones((c,), np.float32)
    fields["use_running_average"] = False
  if momentum is None:
    if not _counted_supported():
      raise ValueError(f"{fn}: momentum=None (PyTorch's cumulative average) is not supported "
                       "by this jaxnorm version; pass the module's numeric momentum.")
    if nbt is None:
      raise ValueError(f"{fn}: momentum=None needs {pre}num_batches_tracked (the number of "
                       "averaged batches), which the state_dict lacks.")
    count = np.full(mean.shape, int(nbt), np.int32)
  fields["momentum"] = None if momentum is None else _flip(momentum)
  return _build(kind, scale=weight, bias=bias, mean=mean, var=var, count=count, epsilon=eps,
                fn=fn, **fields)


def to_torch(variables: Mapping, *, kind: str, prefix: str = "", epsilon: float,
             momentum: float | None = 0.99, num_groups: int | None = None,
             num_batches_tracked: int | None = None) -> tuple[dict, dict]:
  """Converts one jaxnorm/flax layer's variables to PyTorch ``state_dict`` entries.

  The inverse of :func:`from_torch`.  Returns ``(state_dict, kwargs)``: NumPy
  arrays under ``prefix + name`` (load with ``{k: torch.from_numpy(v) ...}``), and
  the constructor arguments of the PyTorch module (``eps``, and for batch norm
  ``momentum = 1 - momentum`` (``None`` stays ``None``), ``affine``,
  ``track_running_stats``).  PyTorch's affine needs both ``weight`` and ``bias``:
  a missing one is filled with ones/zeros (the same map).  ``num_batches_tracked``
  is ``batch_stats/count`` when present, else the given value, else 0.  Note
  that PyTorch always updates the running variance unbiased: a model trained with
  ``unbiased_var=False`` converts exactly for evaluation, and continues in PyTorch's
  convention.
  """
  fn = "jaxnorm.to_torch"
  _check_kind(kind, fn)
  pre = _prefix(prefix)
  scale, bias, mean, var, count = _unpack(variables, kind, fn=fn)
  sd: dict = {}
  kwargs: dict = dict(eps=float(epsilon))
  if kind in ("layer_norm", "rms_norm"):
    for name, v in (("weight", scale), ("bias", bias if kind == "layer_norm" else None)):
      if v is not None:
        sd[pre + name] = v
    shape = next((a.shape for a in (scale, bias) if a is not None), None)
    kwargs.update(normalized_shape=shape, elementwise_affine=scale is not None)
    if kind == "layer_norm":
      kwargs["bias"] = bias is not None
    return sd, kwargs
  c = _channels(scale, bias, mean, var)
  affine = scale is not None or bias is not None
  if affine:
    sd[pre + "weight"] = scale if scale is not None else np.ones_like(bias)
    sd[pre + "bias"] = bias if bias is not None else np.zeros_like(scale)
  if kind == "group_norm":
    if num_groups is None:
      raise ValueError(f"{fn}: kind='group_norm' needs num_groups.")
    kwargs.update(num_groups=num_groups, num_channels=c, affine=affine)
    return sd, kwargs
  if mean is not None:
    sd[pre + "running_mean"], sd[pre + "running_var"] = mean, var
    n = count.reshape(-1)[0] if count is not None else (num_batches_tracked or 0)
    sd[pre + "num_batches_tracked"] = np.asarray(n, np.int64)
  kwargs.update(num_features=c, affine=affine, track_running_stats=mean is not None)
  if kind == "batch_norm" or mean is not None:
    kwargs["momentum"] = None if momentum is None else _flip(momentum)
  return sd, kwargs


def conv_kernel_from_torch(weight: Any) -> np.ndarray:
  """PyTorch ``(out, in // groups, *window)`` to Flax ``(*window, in // groups, out)``.

  Also ``Linear`` ``(out, in)`` -> ``Dense`` ``(in, out)``, and ``ConvTranspose``
  ``(in, out // groups, *window)`` -> Flax ``ConvTranspose(transpose_kernel=True)``
  ``(*window, out, in)`` (Flax then computes PyTorch's transposed convolution).
  The axes are permuted ``(2, ..., n - 1, 1, 0)``; nothing is flipped.
  """
  w = _array(weight)
  if w.ndim < 2:
    raise ValueError(f"jaxnorm.conv_kernel_from_torch: expected a kernel of rank >= 2, got "
                     f"shape {w.shape}.")
  return np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))


def conv_kernel_to_torch(kernel: Any) -> np.ndarray:
  """Flax ``(*window, in // groups, out)`` to PyTorch ``(out, in // groups, *window)``
  (the inverse of :func:`conv_kernel_from_torch`)."""
  k = _array(kernel)
  if k.ndim < 2:
    raise ValueError(f"jaxnorm.conv_kernel_to_torch: expected a kernel of rank >= 2, got "
                     f"shape {k.shape}.")
  return np.transpose(k, (k.ndim - 1, k.ndim - 2) + tuple(range(k.ndim - 2)))


# ----------------------------------------------------------------------------- Keras

_KERAS_KINDS = ("batch_norm", "layer_norm", "rms_norm", "group_norm")
_KERAS_EPS = dict(batch_norm=1e-3, layer_norm=1e-3, rms_norm=1e-6, group_norm=1e-3)


def _keras_names(kind: str, scale: bool, center: bool) -> list[str]:
  """Weight names in ``layer.get_weights()`` order."""
  if kind == "rms_norm":
    return ["scale"]
  names = (["gamma"] if scale else []) + (["beta"] if center else [])
  return names + (["moving_mean", "moving_variance"] if kind == "batch_norm" else [])


def from_keras(weights: Mapping[str, Any] | Sequence[Any], *, kind: str, prefix: str = "",
               epsilon: float | None = None, momentum: float = 0.99, scale: bool = True,
               center: bool = True, groups: int = 32) -> Converted:
  """Converts a Keras normalization layer's weights.

  ``weights``: a mapping ``name -> array`` with names ``gamma``, ``beta``,
  ``moving_mean``, ``moving_variance`` (``scale`` for ``RMSNormalization``),
  optionally under ``prefix`` (``"bn/"``) and with a ``":0"`` suffix (TF
  checkpoints); or the list from ``layer.get_weights()`` (its order depends on
  ``scale``/``center``: pass them).  ``kind``: ``"batch_norm"``
  (``BatchNormalization``: its ``momentum`` means the same as jaxnorm's, and its
  moving variance is biased, so ``unbiased_var=False``; Keras 2's fused TF kernel
  applied ``n / (n - 1)``: set ``unbiased_var=True`` yourself to continue such a
  training), ``"layer_norm"``, ``"rms_norm"``, ``"group_norm"``.  ``epsilon``
  defaults to Keras' (1e-3; RMSNormalization 1e-6).
  """
  fn = "jaxnorm.from_keras"
  _check_kind(kind, fn, _KERAS_KINDS)
  names = _keras_names(kind, scale, center)
  if isinstance(weights, Mapping):
    found = {}
    for k, v in weights.items():
      if k.startswith(prefix):
        name = k[len(prefix):].removesuffix(":0").split("/")[-1]
        if name in names:
          found[name] = _array(v)
  else:
    if len(weights) != len(names):
      raise ValueError(f"{fn}: a {kind} with scale={scale}, center={center} has "
                       f"{len(names)} weights {names}, got a list of {len(weights)}.")
    found = {n: _array(v) for n, v in zip(names, weights)}
  missing = [n for n in names if n not in found]
  if missing:
    raise KeyError(f"{fn}: missing {missing} under prefix {prefix!r}; pass scale=/center= "
                   "as the layer was built, or the right prefix.")
  eps = _KERAS_EPS[kind] if epsilon is None else epsilon
  s = found.get("scale" if kind == "rms_norm" else "gamma")
  b = found.get("beta")
  if kind == "rms_norm":
    return _build(kind, scale=s, bias=None, epsilon=eps, fn=fn)
  if kind == "layer_norm":
    return _build(kind, scale=s, bias=b, epsilon=eps, fn=fn)
  if kind == "group_norm":
    return _build(kind, scale=s, bias=b, epsilon=eps, fn=fn, num_groups=groups)
  return _build(kind, scale=s, bias=b, mean=found["moving_mean"],
                var=found["moving_variance"], epsilon=eps, fn=fn, momentum=float(momentum),
                unbiased_var=False)


def to_keras(variables: Mapping, *, kind: str, prefix: str = "", epsilon: float,
             momentum: float = 0.99, num_groups: int | None = None) -> tuple[dict, dict]:
  """Converts one jaxnorm/flax layer to Keras: ``(weights, config)``.

  ``weights`` maps Keras names (``prefix + "gamma"``, ...) to arrays, in
  ``layer.get_weights()`` order (``list(weights.values())`` can be passed to
  ``layer.set_weights``); ``config`` has the layer's constructor arguments
  (``epsilon``, ``momentum``, ``center``, ``scale``, ``groups``).
  """
  fn = "jaxnorm.to_keras"
  _check_kind(kind, fn, _KERAS_KINDS)
  scale, bias, mean, var, _ = _unpack(variables, kind, fn=fn)
  config: dict = dict(epsilon=float(epsilon))
  if kind == "rms_norm":
    return ({prefix + "scale": scale} if scale is not None else {}), config
  config.update(scale=scale is not None, center=bias is not None)
  arrays = dict(gamma=scale, beta=bias, moving_mean=mean, moving_variance=var)
  names = _keras_names(kind, scale is not None, bias is not None)
  if kind == "group_norm":
    if num_groups is None:
      raise ValueError(f"{fn}: kind='group_norm' needs num_groups.")
    config["groups"] = num_groups
  if kind == "batch_norm":
    config["momentum"] = float(momentum)
  return {prefix + n: arrays[n] for n in names}, config


# ----------------------------------------------------------------------------- Haiku

_HAIKU_KINDS = KINDS
_HAIKU_DEBIASED_COUNTER = 2 ** 30  # decay ** counter == 0 in float32 for any decay < 1


def from_haiku(params: Mapping[str, Any], state: Mapping[str, Any] | None = None, *,
               kind: str, eps: float = 1e-5, decay_rate: float | None = None,
               groups: int | None = None) -> Converted:
  """Converts one Haiku normalization module's parameters (and state).

  ``params``: the module's parameter dict (``params["net/~/batch_norm"]``), with
  ``scale`` and ``offset``; ``hk.BatchNorm`` shapes them ``[1, ..., 1, C]``,
  flattened here to ``(C,)``.  ``state`` (batch norm only): the module's two EMA
  states, a mapping with keys ending in ``mean_ema`` and ``var_ema`` (e.g. the
  entries ``"net/~/batch_norm/~/mean_ema"`` of the whole state), each
  ``{"counter", "hidden", "average"}``.  Haiku normalizes with the zero-debiased
  ``average = hidden / (1 - decay^counter)``, so that becomes the running
  average; ``hidden`` is dropped.  ``decay_rate`` is jaxnorm's ``momentum``, and
  Haiku's variance is biased (``unbiased_var=False``).  To continue training with
  Haiku's debiased updates, ``counter`` is kept as ``batch_stats/count`` and the
  fields say ``debias=True`` (when this jaxnorm has counted running averages);
  otherwise later updates are a plain EMA (equal once ``decay^counter`` is ~0).
  ``kind``: as :func:`from_torch`; ``groups`` is needed for group norm.
  """
  fn = "jaxnorm.from_haiku"
  _check_kind(kind, fn, _HAIKU_KINDS)
  s = params.get("scale")
  b = params.get("offset")
  s, b = (None if v is None else _flat(_array(v), None, name=n, fn=fn)
          for n, v in (("scale", s), ("offset", b)))
  if kind == "rms_norm":
    return _build(kind, scale=s, bias=None, epsilon=eps, fn=fn)
  if kind in ("layer_norm", "instance_norm"):
    return _build(kind, scale=s, bias=b, epsilon=eps, fn=fn)
  if kind == "group_norm":
    if groups is None:
      raise ValueError(f"{fn}: kind='group_norm' needs groups (hk.GroupNorm's).")
    return _build(kind, scale=s, bias=b, epsilon=eps, fn=fn, num_groups=groups)
  if state is None or decay_rate is None:
    raise ValueError(f"{fn}: a batch norm needs state (the mean_ema and var_ema entries) and "
                     "decay_rate (hk.BatchNorm's).")
  emas = {}
  for which in ("mean_ema", "var_ema"):
    keys = [k for k in state if k == which or k.endswith("/" + which)]
    if len(keys) != 1:
      raise KeyError(f"{fn}: state must hold exactly one entry ending in {which!r}, found "
                     f"{keys} among {sorted(state)[:6]}. Pass only this module's entries.")
    emas[which] = state[keys[0]]
  mean = _flat(_array(emas["mean_ema"]["average"]), None, name="mean_ema/average", fn=fn)
  var = _flat(_array(emas["var_ema"]["average"]), mean.shape[0], name="var_ema/average", fn=fn)
  fields: dict = dict(momentum=float(decay_rate), unbiased_var=False)
  count = None
  if _counted_supported():
    count = np.full(mean.shape, int(_array(emas["mean_ema"]["counter"])), np.int32)
    fields["debias"] = True
  return _build(kind, scale=s, bias=b, mean=mean, var=var, count=count, epsilon=eps, fn=fn,
                **fields)


def to_haiku(variables: Mapping, *, kind: str, momentum: float | None = None, ndim: int = 4,
             counter: int | None = None) -> tuple[dict, dict]:
  """Converts one jaxnorm/flax layer to Haiku: ``(params, state)``.

  ``params``: ``{"scale", "offset"}`` (``hk.BatchNorm``: shaped ``[1] * (ndim - 1)
  + [C]`` for inputs of rank ``ndim``; others ``(C,)``).  ``state`` (batch norm):
  ``{"mean_ema": {...}, "var_ema": {...}}``; place them under the module's names
  (``"<module>/~/mean_ema"``).  The running averages become ``average``, with
  ``hidden = average * (1 - decay^counter)`` so that Haiku's next update continues
  from them: ``counter`` is ``batch_stats/count`` if present, else the given value,
  else 2**30, for which ``decay^counter`` is 0 and Haiku's debiased updates equal
  a plain EMA with ``decay = momentum``.
  """
  fn = "jaxnorm.to_haiku"
  _check_kind(kind, fn, _HAIKU_KINDS)
  scale, bias, mean, var, count = _unpack(variables, kind, fn=fn)
  shape = lambda v: v.reshape((1,) * (ndim - 1) + v.shape) if kind == "batch_norm" else v
  params = {k: shape(v) for k, v in (("scale", scale), ("offset", bias)) if v is not None}
  if kind != "batch_norm":
    return params, {}
  if momentum is None:
    raise ValueError(f"{fn}: a batch norm needs momentum (it becomes hk.BatchNorm's "
                     "decay_rate).")
  n = int(count.reshape(-1)[0]) if count is not None else (
      _HAIKU_DEBIASED_COUNTER if counter is None else int(counter))
  debias = 1.0 - np.float64(momentum) ** n
  state = {}
  for name, v in (("mean_ema", mean), ("var_ema", var)):
    v = shape(v)
    state[name] = dict(counter=np.asarray(n, np.int32),
                       hidden=(v.astype(np.float64) * debias).astype(v.dtype), average=v)
  return params, state
