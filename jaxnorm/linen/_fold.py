"""Folding batch norms into the preceding layers of a linen variable tree."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from .._fold import fold_batch_norm
from .._types import BatchStats

Path = str | Sequence[str]


def _path(p: Path) -> tuple[str, ...]:
  return tuple(p.split("/")) if isinstance(p, str) else tuple(p)


def _get(tree: Mapping, path: tuple[str, ...], *, what: str, fn: str) -> Any:
  node = tree
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      raise KeyError(f"{fn}: no {what} at '{'/'.join(path)}': '{'/'.join(path[:i]) or '<root>'}'"
                     f" holds {have}. Paths name submodules as in the variable tree, e.g. "
                     "'Conv_0' or 'block/BatchNorm_0'.")
    node = node[key]
  return node


def _pop(tree: dict, path: tuple[str, ...]) -> None:
  """Removes ``path`` and then any parent left empty."""
  parents = [tree]
  for key in path[:-1]:
    parents.append(parents[-1][key])
  del parents[-1][path[-1]]
  for node, key in zip(reversed(parents[:-1]), reversed(path[:-1])):
    if node[key]:
      break
    del node[key]


def _per_bn(value: Any, bn: tuple[str, ...], default: Any) -> Any:
  if isinstance(value, Mapping):
    for k, v in value.items():
      if _path(k) == bn:
        return v
    return default
  return value


def fold_batch_norms(variables: Mapping, pairs: Sequence[tuple[Path, Path]], *,
                     epsilon: float | Mapping[Path, float] = 1e-5,
                     out_axis: int | Mapping[Path, int] = -1) -> dict:
  """Folds each batch norm into the Dense/Conv layer before it, in a linen variable tree.

  For each ``(layer, bn)`` pair (paths of submodules in the tree, ``"a/b"`` or
  ``("a", "b")``), the layer's ``kernel`` and ``bias`` become (see
  :func:`jaxnorm.fold_batch_norm`)::

    kernel' = kernel * a,   bias' = (bias - mean) * a + bn_bias,   a = scale * rsqrt(var + eps)

  and the batch norm's ``params`` and ``batch_stats`` are removed (so is the
  ``batch_stats`` collection once empty).  A layer without a bias gets one.

  The returned variables belong to the same model *without* those batch norms and
  with ``use_bias=True`` on the folded layers.  Build it from the same module
  class with a flag, e.g.::

    class Net(nn.Module):
      folded: bool = False
      @nn.compact
      def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3), use_bias=self.folded, name="conv")(x)
        if not self.folded:
          x = jnn.BatchNorm(use_running_average=not train, name="bn")(x)
        return nn.relu(x)

    folded = jaxnorm.linen.fold_batch_norms(variables, [("conv", "bn")])
    Net(folded=True).apply(folded, x)

  Give the layers explicit ``name=``\\ s (or fold every batch norm): linen numbers
  unnamed submodules per class, so dropping some ``BatchNorm_i`` renumbers the rest.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` (dicts or FrozenDicts).
    pairs: ``(layer_path, bn_path)`` for each batch norm that follows a layer.
    epsilon: the batch norms' epsilon: one value, or a mapping ``bn_path -> epsilon``
      (missing paths use 1e-5, jaxnorm's and flax's default).
    out_axis: the kernels' output axis: one value or a mapping ``layer_path -> axis``
      (-2 for ``nn.ConvTranspose(transpose_kernel=True)``).

  Returns:
    A new nested ``dict`` of variables; ``variables`` is not modified.
  """
  fn = "jaxnorm.linen.fold_batch_norms"
  out = _copy(variables)  # FrozenDicts too: they are Mappings
  if "params" not in out:
    raise KeyError(f"{fn}: variables has no 'params' collection (got {sorted(out)}); pass the "
                   "whole variable dict returned by model.init.")
  seen = set()
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f"{fn}: each entry of pairs must be (layer_path, bn_path), got {pair!r}.")
    layer, bn = (_path(p) for p in pair)
    if bn in seen:
      raise ValueError(f"{fn}: batch norm '{'/'.join(bn)}' appears in two pairs; a batch norm "
                       "folds into one layer.")
    seen.add(bn)
    lp = _get(out["params"], layer, what="layer params", fn=fn)
    if "kernel" not in lp:
      raise KeyError(f"{fn}: '{'/'.join(layer)}' has params {sorted(lp)}, no 'kernel': it is "
                     "not a Dense/Conv layer (pairs are (layer_path, bn_path)).")
    bp = _get(out["params"], bn, what="batch norm params", fn=fn) if _has(
        out["params"], bn) else {}
    bs = _get(out.get("batch_stats", {}), bn, what="batch norm batch_stats (mean, var)", fn=fn)
    kernel, bias = fold_batch_norm(
        lp["kernel"], lp.get("bias"), BatchStats(mean=bs["mean"], var=bs["var"]),
        bp.get("scale"), bp.get("bias"), epsilon=_per_bn(epsilon, bn, 1e-5),
        out_axis=_per_bn(out_axis, layer, -1))
    lp["kernel"], lp["bias"] = kernel, bias
    if _has(out["params"], bn):
      _pop(out["params"], bn)
    _pop(out["batch_stats"], bn)
  if "batch_stats" in out and not out["batch_stats"]:
    del out["batch_stats"]
  return out


def _has(tree: Mapping, path: tuple[str, ...]) -> bool:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return False
    tree = tree[key]
  return True


def _copy(tree: Any) -> Any:
  """A copy of the nested mappings (arrays are shared, never modified)."""
  if isinstance(tree, Mapping):
    return {k: _copy(v) for k, v in tree.items()}
  return jnp.asarray(tree) if not hasattr(tree, "shape") else tree
