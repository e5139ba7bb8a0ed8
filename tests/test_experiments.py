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

STATUSES = {"held", "did not hold", "held only under conditions"}


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
  assert name in r.report()
  figs = r.figures()
  assert figs
  import matplotlib.pyplot as plt
  for f in figs.values():
    plt.close(f)


def test_convergence():
  r = ex.convergence(quick=True, progress=False)
  _check_result(r, "convergence", [
      "norm", "best lr", "test acc at best lr (%)", "fewest steps to 96% (lr)",
      "lrs where all seeds reach 96%", "lrs that diverged (any seed)"])
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
  assert len(r.verdicts) == 3


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


def test_cli_writes_figures(tmp_path, capsys):
  from jaxnorm.experiments.__main__ import main
  assert main(["convergence", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "Summary per normalizer" in out and "Verdicts:" in out
  assert sorted(os.listdir(tmp_path)) == ["convergence_curves.png", "convergence_lr_sweep.png"]


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
