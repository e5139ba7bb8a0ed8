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
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

INSTALL_HINT = 'pip install -e ".[notebooks]"'

HELD = "held"
NOT_HELD = "did not hold"
CONDITIONAL = "held only under conditions"
INCONCLUSIVE = "inconclusive"
STATUSES = (HELD, NOT_HELD, CONDITIONAL, INCONCLUSIVE)
CONFIDENCE = 0.95
QUICK_NOTE = "quick mode: not evidence"


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
  """A claim, its verdict and the measured evidence the verdict was computed from.

  ``status`` is one of :data:`STATUSES`: ``held`` (the confidence interval of the
  measured difference lies on the claim's side of the threshold stated in advance),
  ``did not hold`` (it lies on the other side), ``inconclusive`` (it contains the
  threshold), or ``held only under conditions`` (a claim made of parts, each of which
  was decided, some held and some did not).  Build verdicts with :func:`decide` and
  :func:`combine`.  ``estimate``, ``interval``, ``threshold`` and ``n`` are the numbers
  behind a :func:`decide` verdict; ``parts`` the sub-verdicts of a :func:`combine`.
  ``quick`` marks a verdict from a ``quick`` run: printed without its status.
  """

  claim: str
  status: str
  evidence: str
  estimate: float | None = None
  interval: tuple[float, float] | None = None
  threshold: float | None = None
  n: int | None = None
  parts: list["Verdict"] = dataclasses.field(default_factory=list)
  quick: bool = False

  def __post_init__(self):
    if self.status not in STATUSES:
      raise ValueError(f"Verdict status must be one of {', '.join(map(repr, STATUSES))}; "
                       f"got {self.status!r}.")

  def __str__(self) -> str:
    if self.quick:  # no status, not even of the parts
      numbers = re.sub(r"\[(?:" + "|".join(map(re.escape, STATUSES)) + r")\] ", "", self.evidence)
      return f"[{QUICK_NOTE.upper()}] {self.claim}\n    numbers: {numbers}"
    return f"[{self.status.upper()}] {self.claim}\n    evidence: {self.evidence}"

  __repr__ = __str__


def t_interval(samples, *, confidence: float = CONFIDENCE) -> tuple[float, float, float, int]:
  """Mean of a 1-D sample and its two-sided Student-t confidence interval:
  ``mean ± t_{(1+c)/2, n-1} · s / sqrt(n)`` with ``s`` the sample standard deviation
  (ddof 1).  Returns ``(mean, lo, hi, n)``; with one sample the interval is infinite,
  with a non-finite sample it is ``(nan, nan)``."""
  v = np.asarray(samples, np.float64).ravel()
  n = v.size
  if n == 0:
    raise ValueError("t_interval needs at least one sample, got none.")
  m = float(v.mean())
  if not np.isfinite(v).all():
    return m, math.nan, math.nan, n
  if n == 1:
    return m, -math.inf, math.inf, n
  stats = require("scipy.stats")
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(v.std(ddof=1)) / math.sqrt(n)
  return m, m - half, m + half, n


ALTERNATIVES = ("greater", "less", "within")


def decide(claim: str, samples, *, quantity: str, threshold: float = 0.0,
           alternative: str = "greater", scale: float = 1.0, unit: str = "",
           digits: int = 3, context: str = "", confidence: float = CONFIDENCE) -> Verdict:
  """The verdict on a claim about one measured quantity, from its per-seed values.

  ``samples`` holds the quantity once per seed (usually a paired difference: the same
  seed gives both networks the same initial weights and minibatches).  The claim is
  that the quantity's mean is ``> threshold`` (``alternative="greater"``), ``<
  threshold`` (``"less"``), or within ``(-threshold, threshold)`` (``"within"``, an
  equivalence claim).  With the ``confidence`` t-interval ``[lo, hi]`` of the mean
  (:func:`t_interval`):

  * ``held`` when the interval lies entirely on the claim's side of the threshold;
  * ``did not hold`` when it lies entirely on the other side (the data exclude the
    claimed effect);
  * ``inconclusive`` otherwise (the interval contains the threshold), and whenever a
    sample is not finite.

  ``scale`` and ``unit`` only format the printed numbers (e.g. 100 and " pts").
  """
  if alternative not in ALTERNATIVES:
    raise ValueError(f"decide: alternative must be one of {ALTERNATIVES}, got {alternative!r}.")
  if alternative == "within" and not threshold > 0:
    raise ValueError(f"decide: an equivalence claim ('within') needs a threshold > 0, got "
                     f"{threshold}.")
  m, lo, hi, n = t_interval(samples, confidence=confidence)
  t = threshold
  if math.isnan(lo) or math.isnan(hi):
    status = INCONCLUSIVE
  elif alternative == "greater":
    status = HELD if lo > t else NOT_HELD if hi < t else INCONCLUSIVE
  elif alternative == "less":
    status = HELD if hi < t else NOT_HELD if lo > t else INCONCLUSIVE
  else:
    status = (HELD if -t < lo and hi < t else NOT_HELD if lo > t or hi < -t
              else INCONCLUSIVE)
  f = lambda x: _num(x * scale, digits)
  rule = {"greater": f"held if the interval lies above {f(t)}{unit}",
          "less": f"held if the interval lies below {f(t)}{unit}",
          "within": f"held if the interval lies inside ±{f(t)}{unit}"}[alternative]
  other = {"greater": "below", "less": "above", "within": "outside"}[alternative]
  ev = (f"{quantity}: {f(m)}{unit}, {confidence:.0%} interval [{f(lo)}, {f(hi)}]{unit} over "
        f"{n} seeds ({rule}, did not hold if {other})")
  if context:
    ev += f"; {context}"
  return Verdict(claim, status, ev, estimate=m, interval=(lo, hi), threshold=t, n=n)


def combine(claim: str, parts: Sequence[Verdict], *, context: str = "") -> Verdict:
  """The verdict on a claim made of ``parts`` (every part is claimed).

  ``held`` if every part held; ``did not hold`` if no part held and every part was
  decided; ``held only under conditions`` if every part was decided and some held,
  some did not; ``inconclusive`` if any part was inconclusive.
  """
  parts = list(parts)
  if not parts:
    raise ValueError("combine needs at least one part.")
  st = [p.status for p in parts]
  if any(s == INCONCLUSIVE for s in st):
    status = INCONCLUSIVE
  elif all(s == HELD for s in st):
    status = HELD
  elif all(s == NOT_HELD for s in st):
    status = NOT_HELD
  else:
    status = CONDITIONAL
  ev = "; ".join(f"[{p.status}] {p.claim}: {p.evidence}" for p in parts)
  if context:
    ev += f"; {context}"
  return Verdict(claim, status, ev, parts=parts)


def _num(x: float, digits: int = 3) -> str:
  if math.isnan(x):
    return "nan"
  if math.isinf(x):
    return "inf" if x > 0 else "-inf"
  return f"{x:.{digits}g}"


def ci(values, *, scale: float = 1.0, digits: int = 1, confidence: float = CONFIDENCE,
       clip=None) -> str:
  """``"mean [lo, hi]"``: the mean of a 1-D sample and its t-interval, clipped to
  ``clip = (low, high)`` when given (accuracies: 0..100)."""
  m, lo, hi, _ = t_interval(np.asarray(values, np.float64) * scale, confidence=confidence)
  if not np.isfinite(m):
    return "diverged"
  if clip is not None:
    lo, hi = max(lo, clip[0]), min(hi, clip[1])
  return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def ci_bounds(values, *, axis: int = 0, confidence: float = CONFIDENCE, clip=None):
  """Mean and t-interval bounds over ``axis`` (for error bars), optionally clipped to
  ``clip = (low, high)`` (an accuracy interval never leaves 0..100 %)."""
  v = np.moveaxis(np.asarray(values, np.float64), axis, 0)
  n = v.shape[0]
  m = np.nanmean(v, 0)
  if n < 2:
    lo, hi = m.copy(), m.copy()
  else:
    stats = require("scipy.stats")
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * np.nanstd(v, 0, ddof=1) / math.sqrt(n)
    lo, hi = m - half, m + half
  if clip is not None:
    lo, hi = np.clip(lo, *clip), np.clip(hi, *clip)
  return m, lo, hi


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
    quick: a tiny configuration that only checks that the code runs: its verdicts
      are marked "quick mode: not evidence" and its figures do not go to
      ``figures/`` by default.
  """

  name: str
  config: dict[str, Any]
  tables: dict[str, Table]
  verdicts: list[Verdict]
  data: dict[str, Any]
  seconds: float = 0.0
  plotter: Callable[["Result"], dict[str, Any]] | None = dataclasses.field(
      default=None, repr=False)
  quick: bool = False

  def __post_init__(self):
    self.quick = bool(self.quick or self.config.get("quick", False))
    if self.quick:
      for v in self.verdicts:
        v.quick = True

  @property
  def table(self) -> Table:
    return next(iter(self.tables.values()))

  def figures(self) -> dict[str, Any]:
    """The experiment's matplotlib figures, by file stem."""
    return {} if self.plotter is None else self.plotter(self)

  def figure_dir(self, out_dir: str | None = None) -> str:
    """Where :meth:`save_figures` writes: ``out_dir``; by default ``figures/``, or for a
    quick run a fresh temporary folder (quick figures never replace the real ones)."""
    if out_dir is not None:
      return out_dir
    if self.quick:
      import tempfile
      return tempfile.mkdtemp(prefix="jaxnorm-quick-figures-")
    return "figures"

  def save_figures(self, out_dir: str | None = None, *, dpi: int = 110) -> list[str]:
    """Writes every figure as ``out_dir/<name>_<stem>.png`` (``<name>.png`` when the
    stem is the name) and returns the paths; ``out_dir`` as :meth:`figure_dir`."""
    plt = require("matplotlib.pyplot")
    out_dir = self.figure_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for stem, fig in self.figures().items():
      fname = f"{self.name}.png" if stem == self.name else f"{self.name}_{stem}.png"
      path = os.path.join(out_dir, fname)
      fig.savefig(path, dpi=dpi, bbox_inches="tight")
      plt.close(fig)
      paths.append(path)
    return paths

  def report(self) -> str:
    """Tables and verdicts as plain text (a quick run's verdicts marked as no evidence)."""
    parts = [f"== {self.name} ({self.seconds:.0f} s) =="]
    parts += [str(t) for t in self.tables.values()]
    head = (f"Verdicts ({QUICK_NOTE}: a tiny configuration that only checks that the code "
            "runs; run without --quick for evidence):" if self.quick else "Verdicts:")
    parts += [head] + [str(v) for v in self.verdicts]
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
