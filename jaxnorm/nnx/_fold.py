"""Folding batch norms into the preceding layers of an NNX model, in place."""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx

from .._fold import fold_batch_norm
from .._types import BatchStats

Path = str | Sequence[Any]


class Identity(nnx.Module):
  """Returns its input unchanged; takes (and ignores) a batch norm's call arguments.

  :func:`fold_batch_norms` puts one where each folded batch norm was, so the
  model's ``__call__`` runs unchanged.
  """

  def __call__(self, x, *args, **kwargs):
    return x


def _path(p: Path) -> tuple[Any, ...]:
  return tuple(p.split("/")) if isinstance(p, str) else tuple(p)


def _child(node: Any, key: Any) -> Any:
  if isinstance(key, str) and hasattr(node, key):
    return getattr(node, key)
  try:
    return node[int(key) if isinstance(key, str) and key.lstrip("-").isdigit() else key]
  except (TypeError, KeyError, IndexError):
    return None


def _resolve(model: nnx.Module, path: tuple[Any, ...], *, what: str, fn: str):
  """``(parent, key, module)`` at ``path``."""
  if not path:
    raise ValueError(f"{fn}: an empty path names the model itself, not a {what}.")
  parent = model
  for i, key in enumerate(path[:-1]):
    parent = _child(parent, key)
    if parent is None:
      raise KeyError(f"{fn}: no submodule at '{'/'.join(map(str, path[:i + 1]))}' on the way "
                     f"to the {what} '{'/'.join(map(str, path))}'.")
  node = _child(parent, path[-1])
  if node is None:
    raise KeyError(f"{fn}: no {what} at '{'/'.join(map(str, path))}'. Paths are attribute "
                   "names (and list indices), e.g. 'conv1' or 'blocks/0/bn'.")
  return parent, path[-1], node


def _set(parent: Any, key: Any, value: Any) -> None:
  if isinstance(key, str) and hasattr(parent, key):
    setattr(parent, key, value)
  else:
    parent[int(key) if isinstance(key, str) else key] = value


def fold_batch_norms(model: nnx.Module, pairs: Sequence[tuple[Path, Path]]) -> nnx.Module:
  """Folds each batch norm into the Linear/Conv/ConvTranspose before it, in place.

  For each ``(layer, bn)`` pair of attribute paths (``"conv1"``, ``"blocks/0/bn"``
  or tuples), the layer's kernel and bias become (see :func:`jaxnorm.fold_batch_norm`)::

    kernel' = kernel * a,   bias' = (bias - mean) * a + bn_bias,   a = scale * rsqrt(var + eps)

  with ``eps`` read from the batch norm, a bias created (and ``use_bias`` set)
  where the layer had ``use_bias=False``, and the batch norm replaced by an
  :class:`Identity`, so the model's ``__call__`` runs unchanged and in
  evaluation gives the same outputs (to float32 rounding).  Works for
  ``jaxnorm.nnx.BatchNorm`` and ``flax.nnx.BatchNorm`` (anything with ``mean``,
  ``var``, ``scale``, ``bias`` and ``epsilon``); ``ConvTranspose(transpose_kernel=True)``
  is handled.  Only for inference: training the folded model no longer normalizes.

  Returns:
    ``model`` (modified in place).
  """
  fn = "jaxnorm.nnx.fold_batch_norms"
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f"{fn}: each entry of pairs must be (layer_path, bn_path), got {pair!r}.")
    _, _, layer = _resolve(model, _path(pair[0]), what="layer", fn=fn)
    bn_parent, bn_key, bn = _resolve(model, _path(pair[1]), what="batch norm", fn=fn)
    if isinstance(bn, Identity):
      raise ValueError(f"{fn}: '{pair[1]}' is already folded (it is an Identity).")
    missing = [a for a in ("mean", "var", "epsilon") if not hasattr(bn, a)]
    if missing:
      raise TypeError(f"{fn}: '{pair[1]}' is a {type(bn).__name__} without {missing}; the "
                      "second path of each pair must name a BatchNorm.")
    if not hasattr(layer, "kernel"):
      raise TypeError(f"{fn}: '{pair[0]}' is a {type(layer).__name__} without a kernel; the "
                      "first path of each pair must name a Linear/Conv/ConvTranspose.")
    value = lambda v: None if v is None else v[...]
    stats = BatchStats(mean=value(bn.mean), var=value(bn.var))
    out_axis = -2 if getattr(layer, "transpose_kernel", False) else -1
    old_bias = getattr(layer, "bias", None)
    kernel, bias = fold_batch_norm(
        layer.kernel[...], value(old_bias), stats, value(getattr(bn, "scale", None)),
        value(getattr(bn, "bias", None)), epsilon=bn.epsilon, out_axis=out_axis)
    layer.kernel[...] = kernel
    if old_bias is None:
      layer.bias = nnx.Param(bias)
      if hasattr(layer, "use_bias"):
        layer.use_bias = True
    else:
      layer.bias[...] = bias
    _set(bn_parent, bn_key, Identity())
  return model
