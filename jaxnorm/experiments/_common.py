"""Shared pieces of the experiments: optional dependencies, data, tables, verdicts, results.

Nothing here imports scikit-learn, matplotlib or tqdm at module import time; they
are loaded by :func:`require` when an experiment runs, with an error that says how
to install them.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import importlib
import math
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

INSTALL_HINT = 'pip install -e ".[notebooks]"'

HELD = "held"
NOT_HELD = "did not hold"
CONDITIONAL = "held only under conditions"


def require(module: str) -> Any:
  """Imports an optional dependency of the experiments, or says how to install it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    top = module.split(".")[0]
    raise ImportError(
        f"jaxnorm.experiments needs the optional dependency {top!r}, which could not be "
        f"imported ({e}). Install the notebook extra from the repository root: "
        f"{INSTALL_HINT}") from e


# ----------------------------------------------------------------------------- data


class Digits(NamedTuple):
  """scikit-learn's bundled 8x8 digits (1797 images), split into train and test.

  Images are flattened to 64 pixels in [0, 1] (float32); labels are int32 in 0..9.
  The split is stratified and fixed (it does not change with the training seed).
  """

  x_train: np.ndarray  # (1437, 64) float32
  y_train: np.ndarray  # (1437,) int32
  x_test: np.ndarray  # (360, 64) float32
  y_test: np.ndarray  # (360,) int32


@functools.lru_cache(maxsize=None)
def load_digits(*, test_size: int = 360, split_seed: int = 0) -> Digits:
  """Loads the digits that ship inside scikit-learn (no download)."""
  datasets = require("sklearn.datasets")
  model_selection = require("sklearn.model_selection")
  d = datasets.load_digits()
  x = (d.data / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  xtr, xte, ytr, yte = model_selection.train_test_split(
      x, y, test_size=test_size, random_state=split_seed, stratify=y)
  return Digits(xtr, ytr, xte, yte)


# ----------------------------------------------------------------------------- numbers


def mean_std(a, axis=0) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (population) standard deviation over ``axis``, ignoring nothing."""
  a = np.asarray(a, np.float64)
  return a.mean(axis), a.std(axis)


def pm(values, *, scale: float = 1.0, digits: int = 1) -> str:
  """``"mean ± std"`` of a 1-D sample (``"nan"`` entries are reported as such)."""
  v = np.asarray(values, np.float64) * scale
  if v.size == 0:
    return "-"
  m, s = v.mean(), v.std()
  if not np.isfinite(m):
    return "diverged" if np.isnan(v).all() else f"{np.nanmean(v):.{digits}f} (some nan)"
  return f"{m:.{digits}f} ± {s:.{digits}f}"


def first_reach(steps: np.ndarray, curve: np.ndarray, target: float) -> np.ndarray:
  """Step at which ``curve`` (..., E) first reaches ``target``; inf where it never does."""
  curve = np.nan_to_num(np.asarray(curve, np.float64), nan=-np.inf)
  hit = curve >= target
  idx = np.argmax(hit, axis=-1)
  out = np.asarray(steps, np.float64)[idx]
  return np.where(hit.any(axis=-1), out, np.inf)


def median_steps(reach: np.ndarray) -> str:
  """Median steps-to-target over seeds with how many seeds got there, e.g. ``"300 (5/5)"``."""
  reach = np.asarray(reach, np.float64)
  n_ok, n = int(np.isfinite(reach).sum()), reach.size
  if 2 * n_ok <= n:  # the median itself is "never"
    return f"never ({n_ok}/{n})"
  return f"{np.median(reach):.0f} ({n_ok}/{n})"


def fmt(x: float, digits: int = 3) -> str:
  """A compact number for evidence strings."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "nan"
  if isinstance(x, float) and math.isinf(x):
    return "never" if x > 0 else "-inf"
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  return f"{x:.{digits}g}"


# ----------------------------------------------------------------------------- reports


@dataclasses.dataclass(repr=False)
class Table:
  """A small result table (no pandas needed): ``columns`` and ``rows`` of cells.

  Prints as aligned text, renders as HTML in notebooks, ``to_markdown()`` for docs.
  """

  columns: list[str]
  rows: list[list[Any]]
  title: str = ""

  def column(self, name: str) -> list[Any]:
    i = self.columns.index(name)
    return [r[i] for r in self.rows]

  def records(self) -> list[dict[str, Any]]:
    return [dict(zip(self.columns, r)) for r in self.rows]

  def _cells(self) -> list[list[str]]:
    return [[str(c) for c in r] for r in self.rows]

  def __str__(self) -> str:
    cells = self._cells()
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    out = [self.title] if self.title else []
    out += [line(self.columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(out)

  __repr__ = __str__

  def to_markdown(self) -> str:
    out = [f"**{self.title}**", ""] if self.title else []
    out.append("| " + " | ".join(self.columns) + " |")
    out.append("|" + "|".join("---" for _ in self.columns) + "|")
    out += ["| " + " | ".join(r) + " |" for r in self._cells()]
    return "\n".join(out)

  def _repr_html_(self) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in self.columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>"
                   for r in self._cells())
    cap = f"<caption>{esc(self.title)}</caption>" if self.title else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclasses.dataclass(repr=False)
class Verdict:
  """A claim, its verdict (``held``, ``did not hold``, ``held only under conditions``)
  and the measured evidence the verdict was computed from."""

  claim: str
  status: str
  evidence: str

  def __post_init__(self):
    if self.status not in (HELD, NOT_HELD, CONDITIONAL):
      raise ValueError(f"Verdict status must be one of {HELD!r}, {NOT_HELD!r}, "
                       f"{CONDITIONAL!r}; got {self.status!r}.")

  def __str__(self) -> str:
    return f"[{self.status.upper()}] {self.claim}\n    evidence: {self.evidence}"

  __repr__ = __str__


@dataclasses.dataclass
class Result:
  """What every experiment returns.

  Attributes:
    name: the experiment's name (as on the command line).
    config: the settings it ran with.
    tables: named result tables; the first is the main one (``.table``).
    verdicts: the claims tested and their computed verdicts.
    data: the raw measurements (NumPy arrays), for plots and further analysis.
    seconds: wall-clock time of the run.
  """

  name: str
  config: dict[str, Any]
  tables: dict[str, Table]
  verdicts: list[Verdict]
  data: dict[str, Any]
  seconds: float = 0.0
  plotter: Callable[["Result"], dict[str, Any]] | None = dataclasses.field(
      default=None, repr=False)

  @property
  def table(self) -> Table:
    return next(iter(self.tables.values()))

  def figures(self) -> dict[str, Any]:
    """The experiment's matplotlib figures, by file stem."""
    return {} if self.plotter is None else self.plotter(self)

  def save_figures(self, out_dir: str = "figures", *, dpi: int = 110) -> list[str]:
    """Writes every figure as ``out_dir/<name>_<stem>.png`` and returns the paths."""
    plt = require("matplotlib.pyplot")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for stem, fig in self.figures().items():
      path = os.path.join(out_dir, f"{self.name}_{stem}.png")
      fig.savefig(path, dpi=dpi, bbox_inches="tight")
      plt.close(fig)
      paths.append(path)
    return paths

  def report(self) -> str:
    """Tables and verdicts as plain text."""
    parts = [f"== {self.name} ({self.seconds:.0f} s) =="]
    parts += [str(t) for t in self.tables.values()]
    parts += ["Verdicts:"] + [str(v) for v in self.verdicts]
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- compiling

# Quick runs (tests, --quick) are dominated by XLA compile time, not by running:
# compile them with LLVM's optimizations off (about 2x faster to compile).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit(fn: Callable, *, quick: bool = False, **kwargs) -> Callable:
  """``jax.jit``; with ``quick``, compiled for compile speed rather than run speed."""
  return jax.jit(fn, compiler_options=FAST_COMPILE if quick else None, **kwargs)


# ----------------------------------------------------------------------------- progress


class _NoBar:
  def update(self, n: int = 1) -> None:
    pass

  def set_postfix_str(self, s: str) -> None:
    pass

  def close(self) -> None:
    pass


def progress_bar(total: int, desc: str, enabled: bool):
  """A text tqdm bar (``enabled``) or a no-op with the same methods."""
  if not enabled:
    return _NoBar()
  tqdm = require("tqdm").tqdm
  return tqdm(total=total, desc=desc, unit="step", mininterval=1.0, dynamic_ncols=True,
              smoothing=0.1)


def seeds_list(seeds: int | Sequence[int]) -> list[int]:
  """``seeds`` as a list: an int ``n`` means seeds ``0..n-1``."""
  if isinstance(seeds, (int, np.integer)):
    if seeds < 1:
      raise ValueError(f"seeds must be a positive count or a list of seeds, got {seeds}.")
    return list(range(int(seeds)))
  out = [int(s) for s in seeds]
  if not out:
    raise ValueError("seeds must not be empty.")
  return out
