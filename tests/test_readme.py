"""Every ```python block of the README runs on its own, pasted into a fresh interpreter.

Each block is executed as a separate script in a new process (no names carried over from
earlier blocks, no test configuration: the block must set up its own data, imports and,
where it needs them, fake CPU devices).  A block that needs an optional package that is
not installed (flax, optax, torch) is skipped, naming the package.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
OPTIONAL = ("flax", "optax", "torch")


def python_blocks(text: str) -> list[tuple[int, str]]:
  """``(line number, code)`` of every fenced block tagged ``python``."""
  blocks = []
  for m in re.finditer(r"^```python[^\n]*\n(.*?)^```", text, re.S | re.M):
    blocks.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
  return blocks


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_blocks():
  assert len(BLOCKS) >= 5


def _missing(code: str) -> str | None:
  import importlib.util
  for name in OPTIONAL:
    if re.search(rf"^\s*(import|from)\s+{name}\b", code, re.M) and (
        importlib.util.find_spec(name) is None):
      return name
  return None


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_block_runs_alone(line, code, tmp_path):
  missing = _missing(code)
  if missing:
    pytest.skip(f"needs {missing}, which is not installed")
  script = tmp_path / "block.py"
  script.write_text(code)
  env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
  env["MPLBACKEND"] = "Agg"
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path, env=env)
  assert out.returncode == 0, (
      f"README.md line {line}: the block fails when run on its own:\n{code}\n"
      f"--- stderr ---\n{out.stderr[-3000:]}")
