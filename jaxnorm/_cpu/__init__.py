"""Fused CPU kernels (XLA FFI custom calls): build, load and the on/off switches.

The kernels are C++ (``rows.cc``: layer/RMS norm per row; ``cols.cc``: the column
sums behind batch, group and instance norm's statistics; ``groups.cc``: group and
instance norm's backward) compiled with ``g++ -O3 -march=native`` against the
FFI headers of the *installed* jaxlib (``jax.ffi.include_dir()``).  They are built at
first use into a per-user cache (``$JAXNORM_CACHE_DIR``, default
``~/.cache/jaxnorm``), keyed by a hash of the source, the jaxlib version, the
compiler and the CPU's flags, and loaded with ``ctypes``.  Building at first use
(not at ``pip install``) keeps the binary matched to the jaxlib actually imported
(an upgrade of jaxlib or a move to another CPU rebuilds it), works for editable
installs, and needs no jaxlib in pip's isolated build environment.  A failed build
never breaks ``import jaxnorm``: jaxnorm warns once and uses the XLA path.

Importing this module does not build anything; :func:`kernels_available` does.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

_HERE = pathlib.Path(__file__).parent
_SOURCES = (_HERE / "rows.cc", _HERE / "cols.cc", _HERE / "groups.cc")
_HEADERS = (_HERE / "common.h",)
_TARGETS = {"jaxnorm_rows_fwd": "JaxnormRowsFwd", "jaxnorm_rows_bwd": "JaxnormRowsBwd",
            "jaxnorm_column_sums": "JaxnormColumnSums", "jaxnorm_groups_bwd": "JaxnormGroupsBwd",
            "jaxnorm_axpb": "JaxnormAxpb"}

_lock = threading.Lock()
_state: dict = {"loaded": None, "error": None, "warned": False}
_disabled = 0  # depth of no_kernels() blocks


def _env_enabled() -> bool:
  return os.environ.get("JAXNORM_KERNELS", "1").strip().lower() not in ("0", "false", "off",
                                                                          "no")


@contextlib.contextmanager
def no_kernels():
  """Within this block, jaxnorm traces its XLA path instead of the fused CPU kernels.

  Like :func:`jaxnorm.plain_autodiff`, it applies to functions *traced* inside the
  block.  The environment variable ``JAXNORM_KERNELS=0`` turns the kernels off for
  the whole process (it is read at each trace).
  """
  global _disabled
  _disabled += 1
  try:
    yield
  finally:
    _disabled -= 1


def _cache_dir() -> pathlib.Path:
  if os.environ.get("JAXNORM_CACHE_DIR"):
    return pathlib.Path(os.environ["JAXNORM_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "jaxnorm"


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features", "model name")):
          return line
  except OSError:
    pass
  return platform.processor()


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build() -> pathlib.Path:
  """Compiles the kernels (``rows.cc``, ``cols.cc``) into the cache (once per key); returns the library path."""
  import jax
  import jaxlib
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
  include = jax.ffi.include_dir()
  # 512-bit vectors where the CPU has them (GCC's default for -march=native on recent Xeons
  # is 256): layer norm 0.89-0.97x the time on an AVX-512 Xeon; no effect on AVX2 CPUs.
  # Results are the same bits (the reductions' order is fixed by explicit 8-lane vectors).
  flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off",
           "-std=c++17", "-shared", "-fPIC", "-w"]
  key = hashlib.sha256()
  for part in (*(f.read_bytes() for f in _SOURCES + _HEADERS), jaxlib.__version__.encode(), cxx.encode(),
               " ".join(flags).encode(), _cpu_flags().encode(), sys.platform.encode()):
    key.update(part)
  out = _cache_dir() / f"rows-{key.hexdigest()[:16]}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out.with_suffix(".lock"), "w") as lock:
    try:  # one build at a time: other processes wait for it and then load it
      import fcntl
      fcntl.flock(lock, fcntl.LOCK_EX)
    except (ImportError, OSError):
      pass
    if out.exists():
      return out
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
      tmp_out = pathlib.Path(tmp) / out.name
      cmd = [cxx, *flags, f"-I{include}", *map(str, _SOURCES), "-o", str(tmp_out)]
      proc = subprocess.run(cmd, capture_output=True, text=True)
      if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
      os.replace(tmp_out, out)  # atomic
  return out


def _load():
  import ctypes

  import jax
  path = _build()
  lib = ctypes.CDLL(str(path))
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return lib


def kernels_available() -> bool:
  """Whether jaxnorm's fused CPU kernels are built, loaded and switched on.

  The first call builds them if needed (a few seconds to a minute, once per
  machine and jaxlib version).  False when ``JAXNORM_KERNELS=0``, inside
  :func:`no_kernels`, or when they could not be built (then jaxnorm warned once,
  with the reason, and uses its XLA path).

  >>> import jaxnorm as jn
  >>> isinstance(jn.kernels_available(), bool)
  True
  """
  if _disabled or not _env_enabled():
    return False
  if _state["loaded"] is None and _state["error"] is None:
    with _lock:
      if _state["loaded"] is None and _state["error"] is None:
        try:
          _state["loaded"] = _load()
        except Exception as e:  # never break the caller: fall back to the XLA path
          _state["error"] = f"{type(e).__name__}: {e}"
  if _state["error"] is not None:
    if not _state["warned"]:
      _state["warned"] = True
      warnings.warn("jaxnorm: the fused CPU kernels could not be built, using the XLA path "
                    f"(set JAXNORM_KERNELS=0 to silence this). Reason: {_state['error']}",
                    RuntimeWarning, stacklevel=3)
    return False
  return True


def l3_cache_bytes() -> int:
  """The L3 cache's size as the kernels see it: Linux's sysfs for CPU 0, else
  ``sysconf``, else 32 MiB (also when the kernels are not loaded)."""
  lib = _state["loaded"]
  if lib is None:
    return 32 << 20
  import ctypes
  fn = lib.jaxnorm_l3_bytes
  fn.restype = ctypes.c_int64
  return int(fn())


def build_error() -> str | None:
  """Why the kernels could not be built (None if they were, or were not tried)."""
  return _state["error"]
