"""The experiments behind the notebooks run, in tiny ``quick`` configurations, and
return sane results: finite measurements, the expected table columns, verdicts
with a valid status.  (No timing assertions; the notebooks run in full in CI.)"""

import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest

# The notebook extra is part of the test environment: fail loudly (not skip) without it.
_missing = [m for m in ("sklearn", "matplotlib", "tqdm") if importlib.util.find_spec(m) is None]
if _missing:
  raise ImportError(f"tests/test_experiments.py needs {', '.join(_missing)}: install the "
                    'notebook extra, pip install -e ".[notebooks]"')

import matplotlib  # noqa: E402

matplotlib.use("Agg")

from jaxnorm import experiments as ex  # noqa: E402
from jaxnorm.experiments import _common  # noqa: E402

STATUSES = {"held", "did not hold", "held only under conditions", "inconclusive"}


def _finite(a):
  a = np.asarray(a, np.float64)
  return a.size > 0 and np.isfinite(a).all()


def _check_result(r, name, columns):
  assert isinstance(r, ex.Result)
  assert r.name == name
  assert list(r.table.columns) == columns
  for t in r.tables.values():
    assert t.rows and all(len(row) == len(t.columns) for row in t.rows)
    assert str(t) and t.to_markdown().count("\n") == len(t.rows) + 1 + 2 * bool(t.title)
  assert r.verdicts and all(v.status in STATUSES and v.evidence for v in r.verdicts)
  report = r.report()
  assert name in report
  # a quick run's verdicts are not evidence: no status is printed, not even of parts
  assert r.quick and all(v.quick for v in r.verdicts)
  assert "quick mode: not evidence" in report
  for st in STATUSES:
    assert f"[{st.upper()}]" not in report and f"[{st}]" not in report
  figs = r.figures()
  assert figs
  import matplotlib.pyplot as plt
  for f in figs.values():
    plt.close(f)


def test_convergence():
  r = ex.convergence(quick=True, progress=False)
  _check_result(r, "convergence", [
      "norm", "best lr", "test acc at best lr (%, 95% CI)", "fewest steps to 96% (lr)",
      "usable lrs (every seed ≥ 96% at the end)", "lrs where a seed diverged"])
  norms = r.config["norms"]
  assert set(r.data["test_acc"]) == set(norms) == {"none", "batch"}
  s, l, e = r.data["test_acc"]["batch"].shape
  assert (s, l, e) == (2, len(r.config["lrs"]), len(r.data["steps"]))
  # the smallest learning rate trains: finite losses, accuracy above chance
  for n in norms:
    assert _finite(r.data["train_loss"][n][:, 0])
    assert r.data["test_acc"][n][:, 0, -1].mean() > 0.2
  assert [row[0] for row in r.tables["final_accuracy"].rows] == ["none", "BN"]


def test_ioffe_szegedy():
  r = ex.ioffe_szegedy(quick=True, progress=False)
  _check_result(r, "ioffe_szegedy", [
      "lr", "net", "test acc at step 20 (%)", "test acc at step 40 (%)",
      "sigmoid-input percentile drift"])
  p = r.data["percentiles"]["batch"]
  assert p.shape[-2:] == (100, 3) and _finite(p)
  assert (np.diff(p, axis=-1) >= 0).all()  # 15th <= 50th <= 85th
  assert len(r.verdicts) == 4


def test_initialization():
  r = ex.initialization(quick=True, progress=False)
  scales = r.config["weight_scales"]
  assert len(r.table.rows) == len(scales)
  assert r.table.columns[:4] == ["weight scale", "none test acc (%)",
                                 "none last-layer std at init", "none ||ΔW||/||W0||"]
  for n in ("none", "batch"):
    assert r.data["final_acc"][n].shape == (2, len(scales))
    assert _finite(r.data["init_std"][n])
  # without BN the forward signal grows with the weight scale; with BN it does not
  none_std, bn_std = r.data["init_std"]["none"][:, -1], r.data["init_std"]["batch"][:, -1]
  assert (np.diff(none_std) > 0).all()
  assert np.ptp(bn_std) < 0.1 * np.ptp(none_std)


def test_batch_size():
  r = ex.batch_size(quick=True, progress=False)
  assert r.table.columns == ["batch", "lr", "steps", "BN (%)", "GN (%)", "BN train-mode (%)",
                             "BN gap (pts)"]
  _check_result(r, "batch_size", r.table.columns)
  assert [row[0] for row in r.table.rows] == [str(b) for b in r.config["batch_sizes"]]
  for n in r.config["norms"]:
    assert _finite(r.data["eval_acc"][n])
  # group norm does not depend on the batch: no train/eval gap at all
  assert np.all(r.data["gap"]["group"] == 0)


def test_recurrent():
  r = ex.recurrent(quick=True, progress=False)
  _check_result(r, "recurrent", ["norm", "best lr", "test acc (%)", "steps to 95%",
                                 "train-mode − eval-mode (pts)"])
  assert [row[0] for row in r.table.rows] == ["none", "LN", "BN"]
  for n in ("none", "layer"):
    assert np.all(r.data["train_eval_gap"][n] == 0)
  assert _finite(r.data["test_acc"]["batch"])


def test_smoothness():
  r = ex.smoothness(quick=True, progress=False)
  _check_result(r, "smoothness", [
      "net", "test acc (%)", "steps to 95%", "input shift", "ICS ||G-G'||/||G||",
      "ICS cos(G,G')", "loss range", "grad change", "β-smoothness", "actual/predicted Δloss"])
  for v in r.config["variants"]:
    for k in ("loss_range", "grad_change", "beta", "pred_ratio", "ics_rel"):
      assert _finite(r.data[k][v]), (v, k)
    assert _finite(r.data["shift"][v]) and (r.data["shift"][v] >= 0).all()
  assert len(r.verdicts) == 3  # no noisy-BN verdict without the noisy variant


def test_devices(devices):
  del devices  # conftest: fails (not skips) without 8 devices
  r = ex.devices(quick=True, progress=False)
  _check_result(r, "devices", [
      "per-device batch", "global batch", "sync BN test acc (%)", "per-device BN test acc (%)",
      "sync train/eval gap (pts)", "per-device train/eval gap (pts)"])
  t = r.tables["exactness"]
  assert t.columns == ["method", "mask", "y", "running mean", "running var", "dL/dx",
                       "dL/dscale"]
  sync = [row for row in t.rows if "sync" in row[0]]
  assert len(sync) == 2
  for row in sync:  # synchronized statistics equal the global batch's
    assert max(float(c) for c in row[2:]) < 1e-5, row


def test_cli_quick_writes_no_figures_into_the_default_folder(tmp_path, monkeypatch, capsys):
  from jaxnorm.experiments.__main__ import main
  monkeypatch.chdir(tmp_path)
  assert main(["convergence", "--quick", "--no-progress"]) == 0
  out = capsys.readouterr().out
  assert "Summary per normalizer" in out and "quick mode: not evidence" in out
  assert "[HELD]" not in out and "[DID NOT HOLD]" not in out and "[INCONCLUSIVE]" not in out
  assert not (tmp_path / "figures").exists()  # the real figures are never replaced
  paths = out.split("Figures: ")[1].strip().split(", ")
  assert [os.path.basename(p) for p in paths] == ["convergence_curves.png",
                                                   "convergence_lr_sweep.png"]
  assert all(os.path.isfile(p) and not p.startswith(str(tmp_path)) for p in paths)
  # an explicit --out is honoured
  assert main(["convergence", "--quick", "--no-progress", "--out", "here"]) == 0
  assert sorted(os.listdir(tmp_path / "here")) == ["convergence_curves.png",
                                                   "convergence_lr_sweep.png"]


def test_figure_named_once(tmp_path):
  r = ex.Result("smoothness", {}, {}, [], {}, plotter=lambda r: _two_figures())
  paths = r.save_figures(str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == ["smoothness.png", "smoothness_extra.png"]


def _two_figures():
  import matplotlib.pyplot as plt
  return {"smoothness": plt.figure(), "extra": plt.figure()}


# ----------------------------------------------------------------------------- verdict rule


def test_decide_held_inconclusive_did_not_hold():
  rng = np.random.default_rng(0)
  clear = 2.0 + 0.1 * rng.standard_normal(10)
  v = ex.decide("x beats y", clear, quantity="x - y")
  assert v.status == ex.HELD and v.interval[0] > 0 and v.n == 10
  assert "95% interval" in v.evidence and "held if the interval lies above 0" in v.evidence
  noisy = 0.1 + 1.0 * rng.standard_normal(10)
  assert ex.decide("x beats y", noisy, quantity="d").status == ex.INCONCLUSIVE
  assert ex.decide("x beats y", -clear, quantity="d").status == ex.NOT_HELD
  # a threshold: held only when the whole interval clears it
  assert ex.decide("x beats y by 3", clear, quantity="d", threshold=3.0).status == ex.NOT_HELD
  assert ex.decide("x beats y by its mean", clear, quantity="d",
                   threshold=float(clear.mean())).status == ex.INCONCLUSIVE
  # "less" and equivalence ("within")
  assert ex.decide("small", 0.01 * clear, quantity="d", threshold=0.05,
                   alternative="less").status == ex.HELD
  assert ex.decide("flat", 0.01 * clear - 0.02, quantity="d", threshold=0.05,
                   alternative="within").status == ex.HELD
  assert ex.decide("flat", clear, quantity="d", threshold=0.05,
                   alternative="within").status == ex.NOT_HELD
  # one seed, or a diverged (nan) seed, decides nothing
  assert ex.decide("c", [5.0], quantity="d").status == ex.INCONCLUSIVE
  assert ex.decide("c", [5.0, 6.0, np.nan], quantity="d").status == ex.INCONCLUSIVE
  with pytest.raises(ValueError, match="alternative must be one of"):
    ex.decide("c", clear, quantity="d", alternative="bigger")
  with pytest.raises(ValueError, match="threshold > 0"):
    ex.decide("c", clear, quantity="d", alternative="within")


def test_t_interval_matches_scipy():
  stats = pytest.importorskip("scipy.stats")
  x = np.array([0.3, 0.1, 0.4, 0.15, 0.9])
  m, lo, hi, n = ex.t_interval(x)
  ref = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
  assert n == 5 and m == pytest.approx(x.mean())
  assert (lo, hi) == pytest.approx(ref, rel=1e-12)


def test_combine():
  h = ex.Verdict("a", ex.HELD, "e")
  n = ex.Verdict("b", ex.NOT_HELD, "e")
  i = ex.Verdict("c", ex.INCONCLUSIVE, "e")
  assert ex.combine("all", [h, h]).status == ex.HELD
  assert ex.combine("all", [n, n]).status == ex.NOT_HELD
  assert ex.combine("all", [h, n]).status == ex.CONDITIONAL
  assert ex.combine("all", [h, n, i]).status == ex.INCONCLUSIVE
  assert "[held] a" in ex.combine("all", [h, n]).evidence


def test_usable_learning_rate_rule():
  # (seeds, lrs): lr 0 all trained; lr 1 one seed diverged (nan loss) although it once
  # reached the target; lr 2 one seed ends below the target
  final_acc = np.array([[0.97, 0.98, 0.97], [0.97, 0.10, 0.99], [0.98, 0.97, 0.95]])
  final_loss = np.array([[0.1, 0.1, 0.1], [0.1, np.nan, 0.1], [0.1, 0.1, 0.2]])
  trained = ex.usable_runs(final_acc, final_loss, 0.96)
  assert trained.all(axis=0).tolist() == [True, False, False]
  assert ex.usable_runs([0.99], [np.inf], 0.96).tolist() == [False]  # finite loss required


def test_cli_rejects_unknown_experiment(capsys):
  from jaxnorm.experiments.__main__ import main
  with pytest.raises(SystemExit):
    main(["nope"])
  assert "unknown experiment" in capsys.readouterr().err


def test_table_and_verdict():
  t = _common.Table(["a", "b"], [[1, "x"], [22, "yy"]], title="T")
  assert t.column("a") == [1, 22] and t.records()[1] == {"a": 22, "b": "yy"}
  assert "<table>" in t._repr_html_()
  with pytest.raises(ValueError, match="status"):
    _common.Verdict("claim", "probably", "numbers")
  assert _common.pm([0.9, 1.0], scale=100) == "95.0 ± 5.0"
  assert _common.median_steps(np.array([100.0, math.inf, 300.0])) == "300 (2/3)"
  assert _common.median_steps(np.array([100.0, math.inf, math.inf])) == "never (1/3)"
  reach = _common.first_reach(np.array([10, 20, 30]), np.array([[0.1, 0.97, 0.99],
                                                                 [0.1, 0.2, 0.3]]), 0.95)
  assert reach.tolist() == [20.0, math.inf]


def test_import_without_optional_dependencies():
  """``import jaxnorm.experiments`` works without the notebook extra; running an
  experiment then says how to install it."""
  code = (
      "import sys\n"
      "for m in ('sklearn', 'matplotlib', 'tqdm', 'optax'):\n"
      "  sys.modules[m] = None\n"
      "import jaxnorm, jaxnorm.experiments as ex\n"
      "try:\n"
      "  ex.load_digits()\n"
      "except ImportError as e:\n"
      "  assert 'pip install -e \".[notebooks]\"' in str(e), e\n"
      "  print('ok')\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "ok"
