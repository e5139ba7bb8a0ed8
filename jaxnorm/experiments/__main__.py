"""Command line: ``python -m jaxnorm.experiments [name] [--seeds N] [--out DIR] [--quick]``.

Runs one experiment (default: ``convergence``, the learning-rate sweep), shows its
progress, prints its result tables and verdicts, and writes its figures as PNG
files to ``--out`` (default ``figures/``).  ``all`` runs every experiment.
``--quick`` runs a tiny configuration: its verdicts are printed as "quick mode: not
evidence" and its figures go to a temporary folder unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

EXPERIMENTS = ("convergence", "ioffe-szegedy", "initialization", "batch-size", "recurrent",
               "smoothness", "devices")
DEFAULT = "convergence"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m jaxnorm.experiments",
      description="Measure what normalization does: run an experiment, print its result "
                  "table and verdicts, and write its figures.")
  p.add_argument("name", nargs="?", default=DEFAULT,
                 help=f"one of {', '.join(EXPERIMENTS)}, or 'all' (default: {DEFAULT})")
  p.add_argument("--seeds", type=int, default=None,
                 help="number of seeds (default: the experiment's own, 5 to 10)")
  p.add_argument("--out", default=None, help="folder for the figure files (default: "
                                             "figures/; with --quick a temporary folder)")
  p.add_argument("--quick", action="store_true",
                 help="a tiny configuration that only checks that everything runs: its "
                      "verdicts are not evidence and its figures never replace figures/")
  p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  name = args.name.replace("_", "-").lower()
  if name not in EXPERIMENTS + ("all",):
    _parser().error(f"unknown experiment {args.name!r}; choose one of "
                    f"{', '.join(EXPERIMENTS)} or 'all'")
  names = list(EXPERIMENTS) if name == "all" else [name]
  os.environ.setdefault("MPLBACKEND", "Agg")  # figures go to files

  import jax
  if "devices" in names:  # fake CPU devices must be requested before JAX is first used
    jax.config.update("jax_num_cpu_devices", 8)

  from jaxnorm import experiments as ex
  from jaxnorm.experiments import _common

  try:
    _common.require("sklearn")
    _common.require("matplotlib")
    _common.require("tqdm")
  except ImportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  t0 = time.time()
  for n in names:
    fn = getattr(ex, n.replace("-", "_"))
    kwargs = dict(quick=args.quick, progress=not args.no_progress)
    if args.seeds is not None:
      kwargs["seeds"] = args.seeds
    result = fn(**kwargs)
    print()
    print(result.report())
    paths = result.save_figures(args.out)
    print("\nFigures: " + ", ".join(paths))
  if len(names) > 1:
    print(f"\nAll experiments: {time.time() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
