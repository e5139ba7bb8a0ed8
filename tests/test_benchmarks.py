"""The benchmark harness runs end to end (toy shapes, two rounds); timings are not checked."""

from __future__ import annotations

import sys

import pytest

from jaxnorm import benchmarks


def test_import_jaxnorm_does_not_import_flax_or_torch():
  import subprocess
  code = ("import sys, jaxnorm, jaxnorm.benchmarks; "
          "bad = [m for m in ('flax', 'torch') if m in sys.modules]; "
          "sys.exit(1 if bad else 0)")
  assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_every_case_has_three_sizes_and_a_unique_name():
  names = [c.name for c in benchmarks.CASES]
  assert len(names) == len(set(names))
  for c in benchmarks.CASES:
    assert len(c.shape) == len(c.quick_shape) == len(c.tiny_shape)


def test_harness_produces_the_tables(capsys):
  pytest.importorskip("flax")
  argv = ["--tiny", "--rounds", "2", "--max-seconds", "0", "--quiet", "--reference",
          "--cases", "layer_norm/fwd\\+bwd$|batch_norm/train/fwd/nhwc|group_norm/fwd\\+bwd",
          "--competitors", "floor,jaxnorm,flax.linen,flax.nnx,torch"]
  assert benchmarks.main(argv) == 0
  out = capsys.readouterr().out
  assert "jaxnorm benchmarks" in out and "machine:" in out and "GLIBC_TUNABLES" in out
  for case in ("layer_norm/fwd+bwd", "batch_norm/train/fwd/nhwc", "group_norm/fwd+bwd/nhwc"):
    assert case in out
  for name in ("floor", "jaxnorm", "flax.linen", "flax.nnx", benchmarks.REF):
    assert name in out
  assert "DIFFERS" not in out  # every competitor computed the same thing
  assert "temp MiB" in out and "limit" in out  # XLA's temporaries; the pass-count limit
  assert max(len(line) for line in out.splitlines()) <= 100


def test_markdown_and_selection():
  args = benchmarks.parse_args(["--markdown", "--quick"])
  assert args.markdown and args.size == "quick" and args.rounds > 0
  assert [c.name for c in benchmarks.select("rms_norm")] == ["rms_norm/fwd", "rms_norm/fwd+bwd"]
  assert benchmarks.main(["--cases", "no-such-case"]) == 2


def test_summary_says_who_beat_jaxnorm_and_fits_100_columns():
  """'beaten by' from fixed timings (no run), and the widest value keeps the summary of
  the harness test's competitors within 100 columns whatever the timings."""
  names = ("floor", "jaxnorm", benchmarks.REF, "flax.linen", "flax.nnx", "torch")
  case = next(c for c in benchmarks.CASES if c.name == "batch_norm/train/fwd/nhwc")

  def summary(jaxnorm, linen, torch):
    ms = dict.fromkeys(names, 1.0) | {"jaxnorm": jaxnorm, "flax.linen": linen, "torch": torch}
    r = benchmarks.Result(case, case.tiny_shape, {n: [t] for n, t in ms.items()}, {}, {}, {})
    return benchmarks.summary_table([r], markdown=False)

  for (j, l, t), who in (((1, 2, 2), "none"), ((2, 1, 3), "linen"), ((2, 3, 1), "torch"),
                         ((3, 1, 2), "both")):
    lines = summary(j, l, t)
    assert lines[0].split()[-2:] == ["beaten", "by"] and lines[-1].split()[-1] == who
    assert max(len(line) for line in lines) <= 100
