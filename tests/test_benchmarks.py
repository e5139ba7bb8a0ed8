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
