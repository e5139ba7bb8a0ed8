"""The fused CPU kernels (jaxnorm._cpu): layer and RMS norm over trailing axes.

(The column-sum kernel of batch/group/instance norm: tests/test_kernels_cols.py;
the thread-count test below covers both.)

Compared with the float64 oracle (tests/reference.py) and with the XLA path
(kernels forced off): outputs, statistics and first/second-order gradients over
dtypes, odd row lengths, one row, an empty batch, per-row masks, NaN/Inf rows,
FiLM parameters; plus thread-count independence, vmap as one kernel call, the
sharded-jit rule (no all-gather of x), the switches and the build fallback.
Skipped when the kernels cannot be built here (no compiler).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
from jaxnorm import _cpu, _vjp

import reference as ref
from kernel_checks import assert_sharded_jit_does_not_gather

pytestmark = pytest.mark.skipif(not jn.kernels_available(),
                                reason=f"kernels not built: {_cpu.build_error()}")

F64 = np.float64


def uses_kernel(f, *args) -> bool:
  return "jaxnorm_rows_fwd" in str(jax.make_jaxpr(f)(*args))


def data(shape, dtype=np.float32, seed=0, loc=0.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray((loc + rng.normal(size=shape)).astype(dtype))


def loss_of(f, w):
  return lambda x, s, b: jnp.sum(f(x, s, b).astype(jnp.float32) * w)


def ln(x, s, b):
  return jn.layer_norm(x, s, b)


def rms(x, s, b):
  del b
  return jn.rms_norm(x, s)


def oracle(kind, x, s, b, w):
  """float64 outputs and gradients (x, scale, bias) of the reference definition."""
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(a, F64)) for a in (x, s, b)]
    w64 = jnp.asarray(np.asarray(w, F64))
    if kind == "ln":
      f = lambda x, s, b: ref.layer_norm(x, s, b, xp=jnp).y
    else:
      f = lambda x, s, b: ref.rms_norm(x, s, xp=jnp).y
    y = f(*args)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) * w64), argnums=(0, 1, 2))(*args)
    return np.asarray(y), [np.asarray(g) for g in grads]


FNS = {"ln": ln, "rms": rms}


@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("shape", [(4, 1), (3, 3), (5, 7), (2, 1023), (1, 4097), (0, 8)])
def test_float32_matches_oracle_and_xla_path(kind, shape):
  f = FNS[kind]
  x = data(shape, loc=0.5)
  s, b = data(shape[-1:], seed=1), data(shape[-1:], seed=2)
  w = data(shape, seed=3)
  assert uses_kernel(f, x, s, b)
  y = jax.jit(f)(x, s, b)
  grads = jax.jit(jax.grad(loss_of(f, w), argnums=(0, 1, 2)))(x, s, b)
  with jn.no_kernels():
    g_xla = jax.jit(jax.grad(loss_of(lambda *a: f(*a), w), argnums=(0, 1, 2)))(x, s, b)
    y_xla = f(x, s, b)
  y64, g64 = oracle(kind, x, s, b, w)
  c = shape[-1]
  ref.assert_within(y, y64, 4e-6 * (1 + np.abs(y64)), f"{kind} y")
  ref.assert_within(y, y_xla, 4e-6 * (1 + np.abs(y64)), f"{kind} y vs XLA path")
  names = ("dx", "dscale", "dbias")
  for name, g, gx, gr in zip(names, grads, g_xla, g64):
    scale = 1 + np.abs(gr) + (np.sqrt(shape[0]) if name != "dx" else 0)
    tol = 2e-5 * np.sqrt(max(c, 1)) * scale
    ref.assert_within(g, gr, tol, f"{kind} {name}")
    ref.assert_within(g, gx, tol + np.abs(np.asarray(gx, F64) - gr), f"{kind} {name} vs XLA")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_low_precision_rounded_once(kind, dtype):
  f = FNS[kind]
  x = data((6, 37), dtype)
  s, b = data((37,), seed=1), data((37,), seed=2)
  w = data((6, 37), dtype, seed=3)
  y = jax.jit(f)(x, s, b)
  dx = jax.jit(jax.grad(loss_of(f, w)))(x, s, b)
  assert y.dtype == dtype and dx.dtype == dtype
  y64, g64 = oracle(kind, x, s, b, w)
  u = ref.ulp(dtype)
  # one rounding of a float32-accurate result: within one ulp (+ float32 noise)
  ref.assert_within(y, y64, 2 * u * np.abs(y64) + 1e-5, f"{kind} {dtype.__name__} y")
  ref.assert_within(dx, g64[0], 2 * u * np.abs(g64[0]) + 1e-4, f"{kind} {dtype.__name__} dx")
  with jn.no_kernels():
    dx_xla = jax.jit(jax.grad(loss_of(lambda *a: f(*a), w)))(x, s, b)
  ref.assert_within(dx, dx_xla, 4 * u * np.abs(g64[0]) + 1e-4, f"{kind} dx vs XLA path")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_streaming_stores_change_no_bit(monkeypatch, dtype):
  """Non-temporal stores (JAXNORM_STREAM_BYTES=0: always) write the same bits as
  plain stores: rows not 32-byte aligned (odd lengths), masked rows, both kernels."""
  mask = jnp.asarray(np.arange(7) % 3 != 1)[:, None]
  f = jax.jit(lambda x, s, b, w: (jn.layer_norm(x, s, b, where=mask), jax.grad(
      lambda x, s, b: jnp.sum(jn.layer_norm(x, s, b, where=mask).astype(jnp.float32) * w),
      argnums=(0, 1, 2))(x, s, b)))
  for c in (1, 3, 37, 1023):
    args = (data((7, c), dtype, loc=0.5), data((c,), seed=1), data((c,), seed=2),
            data((7, c), seed=3))
    out = {}
    for mode in ("0", "-1"):
      monkeypatch.setenv("JAXNORM_STREAM_BYTES", mode)
      out[mode] = jax.tree.map(np.asarray, f(*args))
    jax.tree.map(np.testing.assert_array_equal, out["0"], out["-1"])


def test_l3_size_is_read_from_sysfs():
  """The streaming threshold and the group kernel's sample cap follow the L3 size that
  Linux's sysfs gives for CPU 0 (glibc's sysconf said 8x that on a 2-core EPYC VM)."""
  base = "/sys/devices/system/cpu/cpu0/cache"
  sizes = []
  for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
    try:
      with open(f"{base}/{d}/level") as f:
        level = int(f.read())
      with open(f"{base}/{d}/size") as f:
        size = f.read().strip()
    except (OSError, ValueError):
      continue
    if level == 3 and size:
      unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
      sizes.append(int(size.rstrip("KMG")) * unit)
  if not sizes:
    pytest.skip("no L3 in sysfs here")
  assert _cpu.l3_cache_bytes() == sizes[0]


def test_output_dtype_differs_from_input():
  x = data((4, 16), jnp.bfloat16)
  y = jn.layer_norm(x, dtype=jnp.float32)
  with jn.no_kernels():
    y_xla = jn.layer_norm(x, dtype=jnp.float32)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, y_xla, atol=2e-6)


def test_accuracy_large_offset_and_plain_data():
  x = data((64, 1024), loc=1e4)
  y = jax.jit(jn.layer_norm)(x)
  y64 = ref.layer_norm(np.asarray(x, F64)).y
  err = np.abs(np.asarray(y, F64) - y64).max()
  assert err <= 1e-5, err
  x = data((512, 1024), seed=4)
  y64 = ref.layer_norm(np.asarray(x, F64)).y
  err = np.abs(np.asarray(jax.jit(jn.layer_norm)(x), F64) - y64).max()
  flax = pytest.importorskip("flax.linen")
  y_flax = flax.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False).apply({}, x)
  err_flax = np.abs(np.asarray(y_flax, F64) - y64).max()
  assert err <= max(err_flax, 1e-6), (err, err_flax)


def test_statistics_and_their_gradients():
  """The statistics the kernel returns equal the oracle's; gradients through them
  (a running-average update reads them) equal the XLA path's."""
  x = data((5, 9), loc=3.0)

  def f(x):
    y, st, _ = _vjp.standardize(x, (1,), None, None, epsilon=1e-6)
    return y, st

  y, st = f(x)
  o = ref.layer_norm(np.asarray(x, F64))
  np.testing.assert_allclose(st.shift + st.offset, o.mean, rtol=1e-6)
  np.testing.assert_allclose(st.var, o.var, rtol=1e-5)
  np.testing.assert_array_equal(st.count, o.count)

  def loss(x):
    y, st = f(x)
    return jnp.sum(y[:, :3]) + jnp.sum(jnp.sin(st.offset + st.shift)) + jnp.sum(st.var ** 2)

  g = jax.grad(loss)(x)
  with jn.no_kernels():
    g_xla = jax.grad(lambda x: loss(x))(x)
  np.testing.assert_allclose(g, g_xla, atol=2e-5)


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_per_row_mask_and_empty_rows(kind):
  x = data((3, 4, 10))
  s, b = data((10,), seed=1), data((10,), seed=2)
  mask = jnp.asarray(np.array([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]], bool)[..., None])
  if kind == "ln":
    f = lambda x, s, b: jn.layer_norm(x, s, b, where=mask)
  else:
    f = lambda x, s, b: jn.rms_norm(x, s, where=mask)
  assert uses_kernel(f, x, s, b)
  y = f(x, s, b)
  w = data(x.shape, seed=5)
  g = jax.grad(loss_of(f, w), argnums=(0, 1, 2))(x, s, b)
  with jn.no_kernels():
    y_xla = f(x, s, b)
    g_xla = jax.grad(loss_of(lambda *a: f(*a), w), argnums=(0, 1, 2))(x, s, b)
  np.testing.assert_allclose(y, y_xla, atol=3e-6)
  for a, c in zip(g, g_xla):
    np.testing.assert_allclose(a, c, atol=3e-5)
  empty = ~np.asarray(mask)[..., 0]
  expect = np.broadcast_to(np.asarray(b) if kind == "ln" else 0.0, (int(empty.sum()), 10))
  np.testing.assert_array_equal(np.asarray(y)[empty], expect)
  np.testing.assert_array_equal(np.asarray(g[0])[empty], 0)


def test_nan_and_inf_rows_like_xla_path():
  x = np.array(data((4, 6)))
  x[1, 2], x[2, 0], x[3, 5] = np.nan, np.inf, -np.inf
  x = jnp.asarray(x)
  s = data((6,), seed=1)
  for f in (lambda x: jn.layer_norm(x, s), lambda x: jn.rms_norm(x, s)):
    y = f(x)
    g = jax.grad(lambda x: jnp.sum(f(x)))(x)
    with jn.no_kernels():
      y_xla = f(x)
      g_xla = jax.grad(lambda x: jnp.sum(f(x)))(x)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_xla))
    np.testing.assert_array_equal(np.isnan(g), np.isnan(g_xla))
    np.testing.assert_allclose(y[0], y_xla[0], atol=3e-6)


def test_film_parameters_and_trailing_axes():
  x = data((4, 16, 2, 8))
  s = data((4, 1, 1, 8), seed=1)  # per-sample scale: partial sums per sample
  b = data((2, 8), seed=2)        # over two trailing axes
  f = lambda x, s, b: jn.layer_norm(x, s, b, reduction_axes=(2, 3), feature_axes=(2, 3))
  assert uses_kernel(f, x, s, b)
  w = data(x.shape, seed=6)
  g = jax.grad(loss_of(f, w), argnums=(0, 1, 2))(x, s, b)
  with jn.no_kernels():
    g_xla = jax.grad(loss_of(lambda *a: f(*a), w), argnums=(0, 1, 2))(x, s, b)
  for a, c in zip(g, g_xla):
    np.testing.assert_allclose(a, c, atol=5e-5)


def test_second_order_gradients():
  x = data((3, 6))
  s = data((6,), seed=1)
  f = lambda x: jnp.sum(jn.layer_norm(x, s) ** 3)
  hvp = jax.grad(lambda x: jnp.sum(jax.grad(f)(x) * jnp.arange(6.0)[None]))(x)
  with jn.no_kernels():
    hvp_xla = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: f(x))(x) * jnp.arange(6.0)[None]))(x)
  np.testing.assert_allclose(hvp, hvp_xla, atol=1e-4)


def test_vmap_is_one_kernel_call():
  x = data((5, 4, 12))
  s = data((5, 12), seed=1)  # batched scale
  b = data((12,), seed=2)
  f = lambda x, s: jn.layer_norm(x, s, b)
  # the forward kernel runs when not differentiated, the backward kernel under grad
  for fn, target in ((f, "jaxnorm_rows_fwd["), (jax.grad(lambda x, s: jnp.sum(f(x, s) ** 2),
                                                         argnums=(0, 1)), "jaxnorm_rows_bwd[")):
    jaxpr = str(jax.make_jaxpr(jax.vmap(fn))(x, s))
    assert jaxpr.count(target) == 1
    assert "while[" not in jaxpr and "scan[" not in jaxpr
  np.testing.assert_allclose(jax.vmap(f)(x, s), np.stack([f(x[i], s[i]) for i in range(5)]),
                             atol=1e-6)
  gv = jax.vmap(jax.grad(lambda x, s: jnp.sum(f(x, s) ** 2), argnums=(0, 1)))(x, s)
  gl = [jax.grad(lambda x, s: jnp.sum(f(x, s) ** 2), argnums=(0, 1))(x[i], s[i])
        for i in range(5)]
  for j in range(2):
    np.testing.assert_allclose(gv[j], np.stack([g[j] for g in gl]), atol=2e-5)
  # grad of vmap with an unbatched scale: the per-example scale gradients are summed
  gs = jax.grad(lambda s0: jnp.sum(jax.vmap(lambda x: f(x, s0))(x) ** 2))(s[0])
  with jn.no_kernels():
    gs_xla = jax.grad(lambda s0: jnp.sum(jax.vmap(lambda x: f(x, s0))(x) ** 2))(s[0])
  np.testing.assert_allclose(gs, gs_xla, atol=1e-4)


def test_gradient_only_drops_the_forward_call():
  """The backward recomputes the row statistics from x, so when only gradients are
  used XLA removes the forward (one read of x and g, one write of dx).  When the output
  is used too, a differentiated forward of at least XLA_FORWARD_MIN elements is XLA
  operations (which XLA fuses into a following matmul), a smaller one the forward
  kernel; not differentiated, the forward kernel runs.  Gradients (epsilon's too)
  equal the XLA path's, and the forward's value the kernel's."""
  from jaxnorm._cpu import _rows
  for shape, routed in (((6, 40), False), ((_rows.XLA_FORWARD_MIN // 512, 512), True)):
    x, s, b = data(shape, loc=2.0), data(shape[-1:], seed=1), data(shape[-1:], seed=2)
    w = data(shape, seed=3)
    targets = lambda f: re.findall(r'custom_call_target="(jaxnorm_rows_\w+)"',
                                   f.lower(x, s, b).compile().as_text())
    only_grad = jax.jit(jax.grad(lambda x, s, b: jnp.sum(jn.layer_norm(x, s, b) * w),
                                 argnums=(0, 1, 2)))
    both = jax.jit(jax.value_and_grad(
        lambda x, s, b: jnp.sum(jnp.tanh(jn.layer_norm(x, s, b))), argnums=(0, 1, 2)))
    plain = jax.jit(lambda x, s, b: jnp.sum(jnp.tanh(jn.layer_norm(x, s, b))))
    assert targets(only_grad) == ["jaxnorm_rows_bwd"]
    assert sorted(targets(both)) == (["jaxnorm_rows_bwd"] if routed else
                                     ["jaxnorm_rows_bwd", "jaxnorm_rows_fwd"])
    assert targets(plain) == ["jaxnorm_rows_fwd"]
    np.testing.assert_allclose(both(x, s, b)[0], plain(x, s, b), rtol=1e-5)

  x, s, b = data((6, 40), loc=2.0), data((40,), seed=1), data((40,), seed=2)
  w = data((6, 40), seed=3)

  def loss(x, s, b, eps):
    y, _, _ = _vjp.standardize(x, (1,), s[None], b[None], epsilon=eps)
    return jnp.sum(jnp.tanh(y) * w)

  g = jax.grad(loss, argnums=(0, 1, 2, 3))(x, s, b, 1e-2)
  with jn.no_kernels():
    g_xla = jax.grad(lambda *a: loss(*a), argnums=(0, 1, 2, 3))(x, s, b, 1e-2)
  for a, e in zip(g, g_xla):
    np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5)


def test_switches_select_the_xla_path():
  x = data((2, 8))
  assert uses_kernel(jn.layer_norm, x)
  with jn.no_kernels():
    assert not jn.kernels_available()
    assert not uses_kernel(lambda x: jn.layer_norm(x), x)
  with jn.plain_autodiff():
    assert not uses_kernel(lambda x: jn.layer_norm(x), x)
  # layouts the kernels do not cover stay on the XLA path
  x4 = data((2, 3, 3, 4))
  assert not uses_kernel(lambda x: jn.group_norm(x, num_groups=2), x4)
  assert not uses_kernel(lambda x: jn.layer_norm(x, where=x > 0), x)  # per-element mask
  assert not uses_kernel(lambda x: jn.layer_norm(x, reduction_axes=0, feature_axes=0), x)
  env = dict(os.environ, JAXNORM_KERNELS="0")
  code = ("import jax, jax.numpy as jnp, jaxnorm as jn; "
          "print(jn.kernels_available(), 'jaxnorm_rows' in str(jax.make_jaxpr(jn.layer_norm)"
          "(jnp.ones((2, 4)))))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.stdout.split() == ["False", "False"], out.stderr


def test_axis_name_uses_xla_path():
  # axis_name: statistics across devices stay on the XLA path (psum between passes)
  x = data((8, 2, 6))
  assert not uses_kernel(jax.vmap(lambda x: jn.layer_norm(x, axis_name="d"), axis_name="d"), x)


def test_sharded_jit_does_not_gather_x(devices):
  loss = lambda x, s: jnp.sum(jn.layer_norm(x, s) ** 2)
  assert_sharded_jit_does_not_gather(devices, loss, data((16, 64)), (data((64,), seed=1),),
                                     "jaxnorm_rows", atol=2e-4, rtol=0)


_THREADS_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp, jaxnorm as jn
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(300, 257)).astype(np.float32))
    s = jnp.asarray(rng.normal(size=(257,)).astype(np.float32))
    b = jnp.asarray(rng.normal(size=(257,)).astype(np.float32))
    # the kernels' outputs only (XLA's own reductions, e.g. of a loss, may depend on threads)
    loss = lambda x, s, b: jnp.sum(jnp.sin(jn.layer_norm(x, s, b)))
    f = jax.jit(lambda x, s, b: (jn.layer_norm(x, s, b), jax.grad(loss, argnums=(0, 1, 2))(x, s, b)))
    y, g = f(x, s, b)
    # the column-sum kernel (batch norm): the running statistics, and dx
    bn = lambda x: jn.batch_norm(x, jn.init_batch_stats(257), training=True)
    st = jax.jit(lambda x: bn(x)[1])(x)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(bn(x)[0]))))(x)
    # the fused group-norm backward kernel: dx
    xg = jnp.asarray(rng.normal(size=(6, 10, 10, 32)).astype(np.float32))
    dxg = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(jn.group_norm(x, num_groups=8)))))(xg)
    np.save(sys.argv[1], np.concatenate([np.ravel(a) for a in (y, *g, st.mean, st.var, dx,
                                                               dxg)]))
""")


def test_results_do_not_depend_on_thread_count(tmp_path):
  if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs at least 2 CPUs")
  script = tmp_path / "t.py"
  script.write_text(_THREADS_SCRIPT)
  outs = []
  for cpus in ("0", ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))):
    path = tmp_path / f"out{len(outs)}.npy"
    r = subprocess.run(["taskset", "-c", cpus, sys.executable, str(script), str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    outs.append(np.load(path))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_failed_build_warns_once_and_falls_back(tmp_path):
  code = textwrap.dedent("""
      import warnings, jax.numpy as jnp, jaxnorm as jn
      with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y1 = jn.layer_norm(jnp.ones((2, 4)))
        y2 = jn.rms_norm(jnp.ones((2, 4)))
      print(jn.kernels_available(), len([x for x in w if "could not be built" in str(x.message)]))
  """)
  env = dict(os.environ, JAXNORM_CACHE_DIR=str(tmp_path), CXX=str(tmp_path / "no-compiler"))
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["False", "1"], (r.stdout, r.stderr[-1000:])


def test_import_does_not_build_or_import_flax():
  code = ("import sys, jaxnorm; print('flax' in sys.modules, "
          "jaxnorm._cpu._state['loaded'] is None)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert r.stdout.split() == ["False", "True"], r.stderr[-1000:]
