"""Executes every notebook end to end and fails on the first error in any of them.

  python notebooks/run_all.py                 # run all (from the .py sources), report times
  python notebooks/run_all.py --write         # ... and store outputs in the paired .ipynb
  python notebooks/run_all.py 02 05           # only the notebooks whose names start so
  python notebooks/run_all.py --verdicts v.json  # ... and save every printed verdict

Every verdict a notebook prints (a line ``[HELD] claim``, ``[INCONCLUSIVE] ...``) is
listed at the end, so two runs (e.g. under different ``XLA_FLAGS``) can be compared.

Each notebook runs in a fresh Jupyter kernel (ipykernel) with ``notebooks/`` as the
working directory.  Exit status 1 if any notebook raised.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def _tidy(nb) -> None:
  """Stores what a reader would see: consecutive stream outputs merged, and progress-bar
  redraws (text before a carriage return) dropped, so only each bar's final state stays."""
  for cell in nb.cells:
    outs = []
    for o in cell.get("outputs", []):
      if (o.get("output_type") == "stream" and outs and outs[-1].get("output_type") == "stream"
          and outs[-1]["name"] == o["name"]):
        outs[-1]["text"] += o["text"]
      else:
        outs.append(o)
    for o in outs:
      if o.get("output_type") == "stream":
        o["text"] = "\n".join(re.sub(r"^.*\r(?=.)", "", line)
                              for line in o["text"].split("\n"))
    if "outputs" in cell:
      cell["outputs"] = outs


VERDICT = re.compile(r"^\[(HELD|DID NOT HOLD|INCONCLUSIVE|HELD ONLY UNDER CONDITIONS)\] (.*)$")


def verdicts(nb) -> list[tuple[str, str]]:
  """``(status, claim)`` of every verdict line in the notebook's stream outputs."""
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.get("output_type") == "stream":
        for line in o["text"].split("\n"):
          m = VERDICT.match(line)
          if m:
            out.append((m.group(1).lower(), m.group(2)))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("only", nargs="*", help="name prefixes to run (default: all)")
  p.add_argument("--write", action="store_true",
                 help="write the executed notebooks (with outputs) to the paired .ipynb")
  p.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
  p.add_argument("--verdicts", metavar="JSON", help="also write every verdict printed, by "
                                                    "notebook, to this JSON file")
  args = p.parse_args(argv)

  import jupytext
  import nbclient

  sources = sorted(HERE.glob("[0-9][0-9]_*.py"))
  if args.only:
    sources = [s for s in sources if any(s.name.startswith(o) for o in args.only)]
  if not sources:
    print("no notebooks selected", file=sys.stderr)
    return 1
  times, failed, found = {}, [], {}
  for src in sources:
    nb = jupytext.read(src)
    t0 = time.time()
    print(f"[run] {src.name} ...", flush=True)
    try:
      nbclient.NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                              resources={"metadata": {"path": str(HERE)}}).execute()
    except Exception as e:  # noqa: BLE001 - report every notebook, then fail
      failed.append(src.name)
      print(f"[FAIL] {src.name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    times[src.name] = time.time() - t0
    print(f"[{'ok' if src.name not in failed else 'FAIL'}] {src.name} {times[src.name]:.0f} s",
          flush=True)
    found[src.name] = verdicts(nb)
    if args.verdicts:  # after every notebook, so a long run that is stopped keeps its part
      with open(args.verdicts, "w") as f:
        json.dump(found, f, indent=1)
    if args.write and src.name not in failed:
      _tidy(nb)
      jupytext.write(nb, src.with_suffix(".ipynb"))
  print("\n".join(["", "notebook                                   seconds"] +
                  [f"{k:42s} {v:7.0f}" for k, v in times.items()] +
                  [f"{'total':42s} {sum(times.values()):7.0f}"]))
  print("\nVerdicts:")
  for name, vs in found.items():
    for status, claim in vs:
      print(f"  {name[:2]}  {status:26s} {claim}")
  if failed:
    print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
