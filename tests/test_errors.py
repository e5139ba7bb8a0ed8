"""Bad input fails loudly and early: ValueError/TypeError at trace time (eagerly and
under jit) with a message that names what was expected, what was received and the fix.
Each case asserts on message fragments, not just the exception type.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn

X = jnp.ones((4, 6), jnp.float32)
X4 = jnp.ones((2, 3, 4, 6), jnp.float32)
S6 = jn.init_batch_stats(6)
M6 = jn.moments(X, axis=0)


def raises(exc, fn, *fragments, jit=True):
  """``fn(X)`` raises ``exc`` eagerly and while tracing under jit, naming every fragment."""
  runners = [("eager", lambda: fn(X))]
  if jit:
    runners.append(("jit", lambda: jax.jit(fn)(X)))
  for mode, run in runners:
    with pytest.raises(exc) as info:
      run()
    msg = str(info.value)
    assert type(info.value) is not AssertionError
    for frag in fragments:
      assert re.search(frag, msg), f"[{mode}] {frag!r} not in message: {msg}"


# every public function, called on an x that the test supplies
ALL = {
    "moments": lambda x: jn.moments(x, axis=0),
    "normalize": lambda x: jn.normalize(x, jnp.zeros((1, x.shape[-1])), jnp.ones((1, x.shape[-1]))),
    "batch_norm": lambda x: jn.batch_norm(x, jn.init_batch_stats(x.shape[-1]), training=True),
    "batch_norm_eval": lambda x: jn.batch_norm(x, jn.init_batch_stats(x.shape[-1]),
                                               training=False),
    "layer_norm": lambda x: jn.layer_norm(x),
    "rms_norm": lambda x: jn.rms_norm(x),
    "group_norm": lambda x: jn.group_norm(x, num_groups=2),
    "instance_norm": lambda x: jn.instance_norm(x[:, None]),
}


# ----------------------------------------------------------------------------- x dtype


@pytest.mark.parametrize("dtype", ["int32", "uint8", "bool"])
@pytest.mark.parametrize("name", sorted(ALL))
def test_non_floating_x(name, dtype):
  fn = ALL[name]
  x = jnp.ones((4, 6), dtype)
  for run in (lambda: fn(x), lambda: jax.jit(fn)(x)):
    with pytest.raises(TypeError) as info:
      run()
    msg = str(info.value)
    assert "floating" in msg and dtype in msg and "astype" in msg, msg
    assert msg.startswith("jaxnorm."), msg  # names the function


# ----------------------------------------------------------------------------- axes


@pytest.mark.parametrize("fn", [
    lambda x: jn.moments(x, axis=2),
    lambda x: jn.moments(x, axis=(0, -3)),
    lambda x: jn.batch_norm(x, S6, training=True, feature_axes=2),
    lambda x: jn.layer_norm(x, reduction_axes=5),
    lambda x: jn.layer_norm(x, feature_axes=-3),
    lambda x: jn.rms_norm(x, reduction_axes=(1, 2)),
    lambda x: jn.group_norm(x, num_groups=2, channel_axis=2),
    lambda x: jn.group_norm(x, num_groups=2, reduction_axes=(1, 9)),
    lambda x: jn.instance_norm(x[:, None], feature_axes=3),
], ids=["moments", "moments-neg", "bn", "ln-red", "ln-feat", "rms", "gn-channel", "gn-red",
        "in"])
def test_axis_out_of_range(fn):
  raises(ValueError, fn, "out of range", r"rank [23]", r"valid: -[23]\.\.[12]")


@pytest.mark.parametrize("fn", [
    lambda x: jn.moments(x, axis=(0, 0)),
    lambda x: jn.moments(x, axis=(1, -1)),
    lambda x: jn.batch_norm(x, S6, training=True, feature_axes=(1, -1)),
    lambda x: jn.layer_norm(x, reduction_axes=(0, -2)),
    lambda x: jn.rms_norm(x, feature_axes=(1, 1)),
    lambda x: jn.group_norm(x, num_groups=2, reduction_axes=(1, -1)),
], ids=["moments", "moments-neg", "bn", "ln", "rms", "gn"])
def test_axis_repeated(fn):
  raises(ValueError, fn, "same axis twice")


@pytest.mark.parametrize("fn", [
    lambda x: jn.moments(x, axis=1.0),
    lambda x: jn.moments(x, axis=(0, None)),
    lambda x: jn.layer_norm(x, reduction_axes=True),
])
def test_axis_not_int(fn):
  raises(TypeError, fn, "int")


@pytest.mark.parametrize("fn,frag", [
    (lambda x: jn.moments(x, axis=()), "at least one axis"),
    (lambda x: jn.layer_norm(x, reduction_axes=()), "at least one axis"),
])
def test_nothing_to_reduce(fn, frag):
  raises(ValueError, fn, frag)


@pytest.mark.parametrize("fn,frags", [
    # batch norm reduces every non-feature axis: features covering all axes leave none
    (lambda x: jn.batch_norm(x, jn.init_batch_stats((4, 6)), training=True,
                             feature_axes=(0, 1)), ["cover every axis", "nothing to reduce"]),
    # instance norm: the batch axis cannot also be a feature axis
    (lambda x: jn.instance_norm(x[:, None], feature_axes=(0, 2)), ["batch axis", "feature"]),
    (lambda x: jn.instance_norm(x), ["no axis besides", "spatial"]),
    # group norm: the channel (feature) axis must be among the reduced axes
    (lambda x: jn.group_norm(x, num_groups=2, reduction_axes=0), ["must include the channel"]),
], ids=["bn-all", "in-batch", "in-none", "gn-channel"])
def test_feature_and_reduction_axes_conflict(fn, frags):
  """The issue's "feature axes that overlap the reduction axes", as the API spells it: batch
  and instance norm derive their reduction axes from the feature axes, group norm derives its
  features from the channel axis; layer/RMS norm allow overlap on purpose (flax's default)."""
  raises(ValueError, fn, *frags)


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("stats,exc,frags", [
    (jn.init_batch_stats(5), ValueError, [r"running mean has shape \(5,\)", r"\(6,\)",
                                          "init_batch_stats"]),
    (jn.init_batch_stats((1, 6)), ValueError, [r"\(1, 6\)", "feature_axes"]),
    (jn.BatchStats(jnp.zeros(6), jnp.ones(5)), ValueError, [r"running var has shape \(5,\)"]),
    (jn.BatchStats(jnp.zeros(6, jnp.int32), jnp.ones(6, jnp.int32)), TypeError,
     ["must be floating", "int32", "init_batch_stats"]),
    ({"mean": jnp.zeros(6), "var": jnp.ones(6)}, TypeError, ["BatchStats", "dict"]),
], ids=["shape", "rank", "var-shape", "int-dtype", "dict"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_stats_mismatch(stats, exc, frags, training):
  raises(exc, lambda x: jn.batch_norm(x, stats, training=training), *frags)


def test_batch_stats_for_the_wrong_layout():
  """Channels-last input and state, but feature_axes=1 (NCHW) by mistake: the message names
  the feature axes and the shape the state would need."""
  raises(ValueError, lambda x: jn.batch_norm(X4, jn.init_batch_stats(6), training=True,
                                             feature_axes=1),
         r"\(3,\)", "feature axes", r"init_batch_stats\(\(3,\)\)")


def test_update_batch_stats_shape_mismatch():
  raises(ValueError, lambda x: jn.update_batch_stats(jn.init_batch_stats(5), M6, momentum=0.9),
         "running mean has shape", "keepdims")


def test_init_batch_stats_dtype():
  with pytest.raises(TypeError, match="floating"):
    jn.init_batch_stats(3, jnp.int32)


# ----------------------------------------------------------------------------- scale / bias


@pytest.mark.parametrize("fn,name", [
    (lambda x: jn.batch_norm(x, S6, jnp.ones(5), training=True), "scale"),
    (lambda x: jn.batch_norm(x, S6, None, jnp.ones((6, 1)), training=True), "bias"),
    (lambda x: jn.layer_norm(x, jnp.ones(4)), "scale"),
    (lambda x: jn.layer_norm(x, None, jnp.ones((4, 1, 6))), "bias"),
    (lambda x: jn.rms_norm(x, jnp.ones((1, 5))), "scale"),
    (lambda x: jn.group_norm(x, jnp.ones(3), num_groups=2), "scale"),
    (lambda x: jn.instance_norm(x[:, None], None, jnp.ones(2)), "bias"),
    (lambda x: jn.normalize(x, jnp.zeros(6), jnp.ones((1, 6))), "mean"),
    (lambda x: jn.normalize(x, jnp.zeros((1, 6)), jnp.ones((4, 6)), jnp.ones((2, 6))), "scale"),
], ids=["bn-scale", "bn-bias", "ln-scale", "ln-bias-rank", "rms", "gn", "in", "normalize-mean",
        "normalize-scale"])
def test_param_wrong_shape(fn, name):
  raises(ValueError, fn, f"{name} has shape", "feature shape", "broadcasts to")


def test_param_wrong_dtype():
  raises(TypeError, lambda x: jn.layer_norm(x, jnp.ones(6, jnp.int32)), "scale must be a floating")


# ----------------------------------------------------------------------------- masks


MASKED = {
    "moments": lambda x, w: jn.moments(x, axis=0, where=w),
    "batch_norm": lambda x, w: jn.batch_norm(x, S6, training=True, where=w),
    "layer_norm": lambda x, w: jn.layer_norm(x, where=w),
    "rms_norm": lambda x, w: jn.rms_norm(x, where=w),
    "group_norm": lambda x, w: jn.group_norm(x, num_groups=3, where=w),
    "instance_norm": lambda x, w: jn.instance_norm(x[:, None], where=w),
}


@pytest.mark.parametrize("shape", [(4,), (3, 6), (4, 1, 6, 1)], ids=["trailing", "rows", "rank"])
@pytest.mark.parametrize("name", sorted(MASKED))
def test_mask_does_not_broadcast(name, shape):
  w = jnp.ones(shape, bool)
  frags = ["rank"] if len(shape) > 2 + (name == "instance_norm") else [
      "does not broadcast", re.escape(str(shape))]
  raises(ValueError, lambda x: MASKED[name](x, w), *frags)


@pytest.mark.parametrize("dtype", ["float32", "int32"])
@pytest.mark.parametrize("name", sorted(MASKED))
def test_mask_not_boolean(name, dtype):
  w = jnp.ones((4, 1), dtype)
  raises(TypeError, lambda x: MASKED[name](x, w), "must be boolean", dtype, "astype\\(bool\\)")


@pytest.mark.parametrize("where", [jnp.asarray([1.0, 0.5, 0, 0, 0, 0]), jnp.ones(2, bool)],
                         ids=["float", "shape"])
def test_update_batch_stats_mask_validated(where):
  raises((TypeError, ValueError),
         lambda x: jn.update_batch_stats(S6, M6, momentum=0.9, where=where),
         "jaxnorm.update_batch_stats", "where")


# ----------------------------------------------------------------------------- groups


@pytest.mark.parametrize("kw,frags", [
    (dict(num_groups=4), ["num_groups=4", "dividing", "channels 6", r"divisors: \[1, 2, 3, 6\]"]),
    (dict(group_size=4), ["group_size=4", "dividing", r"divisors: \[1, 2, 3, 6\]"]),
    (dict(num_groups=0), ["positive"]),
    (dict(num_groups=-2), ["positive"]),
    (dict(num_groups=2.0), ["positive int"]),
    (dict(), ["exactly one of num_groups or group_size"]),
    (dict(num_groups=None), ["exactly one"]),
    (dict(num_groups=2, group_size=3), ["exactly one", "num_groups=2", "group_size=3"]),
])
def test_group_norm_groups(kw, frags):
  raises(ValueError, lambda x: jn.group_norm(x, **kw), *frags)


# ----------------------------------------------------------------------------- hyperparameters


EPS = {
    "normalize": lambda x, e: jn.normalize(x, jnp.zeros((1, 6)), jnp.ones((1, 6)), epsilon=e),
    "batch_norm": lambda x, e: jn.batch_norm(x, S6, training=True, epsilon=e),
    "batch_norm_eval": lambda x, e: jn.batch_norm(x, S6, training=False, epsilon=e),
    "layer_norm": lambda x, e: jn.layer_norm(x, epsilon=e),
    "rms_norm": lambda x, e: jn.rms_norm(x, epsilon=e),
    "group_norm": lambda x, e: jn.group_norm(x, num_groups=2, epsilon=e),
    "instance_norm": lambda x, e: jn.instance_norm(x[:, None], epsilon=e),
}


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), np.float32(-1)], ids=["neg", "nan", "np"])
@pytest.mark.parametrize("name", sorted(EPS))
def test_negative_epsilon(name, eps):
  raises(ValueError, lambda x: EPS[name](x, eps), "epsilon must be >= 0", "got")


@pytest.mark.parametrize("m", [-0.1, 1.5, float("nan"), np.float64(2.0)])
@pytest.mark.parametrize("fn", ["batch_norm", "update_batch_stats"])
def test_momentum_out_of_range(fn, m):
  call = ((lambda x: jn.batch_norm(x, S6, training=True, momentum=m)) if fn == "batch_norm"
          else (lambda x: jn.update_batch_stats(S6, M6, momentum=m)))
  raises(ValueError, call, r"momentum must be in \[0, 1\]", "got", "1 - m")


@pytest.mark.parametrize("m", [0.0, 1.0])
def test_momentum_bounds_are_allowed(m):
  _, new = jn.batch_norm(X + jnp.arange(4.0)[:, None], S6, training=True, momentum=m)
  assert np.isfinite(np.asarray(new.var)).all()


@pytest.mark.parametrize("kw", [dict(epsilon=jnp.float32(-1.0)), dict(momentum=jnp.float32(2.0))],
                         ids=["epsilon", "momentum"])
def test_concrete_array_hyperparameters_checked(kw):
  raises(ValueError, lambda x: jn.batch_norm(x, S6, training=True, **kw), "must be", jit=False)


def test_degenerate_policy_name():
  raises(ValueError, lambda x: jn.batch_norm(x, S6, training=True, degenerate="skip"),
         "degenerate", "running", "batch", "skip")


# ----------------------------------------------------------------------------- training flag


def test_training_traced_under_jit():
  f = jax.jit(lambda x, t: jn.batch_norm(x, S6, training=t))
  with pytest.raises(TypeError) as info:
    f(X, True)
  msg = str(info.value)
  for frag in ("training", "Python bool", "static", "static_argnames", "lax.cond"):
    assert frag in msg, msg
  # the fix the message suggests works
  g = jax.jit(lambda x, training: jn.batch_norm(x, S6, training=training),
              static_argnames="training")
  assert g(X, training=True)[0].shape == X.shape


@pytest.mark.parametrize("t", [None, 1, 0, "yes", jnp.asarray(True)], ids=["None", "1", "0",
                                                                            "str", "array"])
def test_training_not_bool(t):
  raises(TypeError, lambda x: jn.batch_norm(x, S6, training=t), "must be a Python bool")


def test_training_required():
  with pytest.raises(TypeError, match="training"):
    jn.batch_norm(X, S6)


def test_training_numpy_bool_accepted():
  y, _ = jn.batch_norm(X, S6, training=np.bool_(True))
  assert y.shape == X.shape


# ----------------------------------------------------------------------------- keyword-only


@pytest.mark.parametrize("call", [
    lambda: jn.layer_norm(X, None, None, -1),
    lambda: jn.layer_norm(X, jnp.ones(6), jnp.zeros(6), 1e-6),
    lambda: jn.rms_norm(X, jnp.ones(6), 1e-6),
    lambda: jn.group_norm(X, None, None, 2),
    lambda: jn.instance_norm(X4, None, None, -1),
    lambda: jn.batch_norm(X, S6, None, None, True),
    lambda: jn.batch_norm(X, S6, None, None, training=True, *[0.9]),
    lambda: jn.normalize(X, jnp.zeros((1, 6)), jnp.ones((1, 6)), None, None, 1e-5),
    lambda: jn.moments(X, 0),
    lambda: jn.update_batch_stats(S6, M6, 0.9),
], ids=["ln-axis", "ln-eps", "rms-eps", "gn-groups", "in-axes", "bn-training", "bn-momentum",
        "normalize-eps", "moments-axis", "update-momentum"])
def test_hyperparameters_keyword_only(call):
  with pytest.raises(TypeError, match="positional argument"):
    call()


# ---------------------------------------------------------------- messages a newcomer hit


def test_forward_mode_points_to_plain_autodiff():
  for transform in (lambda f: jax.jvp(f, (X,), (X,)), lambda f: jax.jacfwd(f)(X)):
    with pytest.raises(TypeError, match=r"plain_autodiff\(\)"):
      transform(jn.layer_norm)
  with jn.plain_autodiff():  # the fix the message names works
    _, t = jax.jvp(lambda x: jn.layer_norm(x), (X,), (X,))
  assert t.shape == X.shape


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "batch_norm", "moments"])
def test_unbound_axis_name_says_where_it_belongs(name):
  fn = {"layer_norm": lambda x: jn.layer_norm(x, axis_name="batch"),
        "rms_norm": lambda x: jn.rms_norm(x, axis_name="batch"),
        "batch_norm": lambda x: jn.batch_norm(x, S6, training=True, axis_name="batch"),
        "moments": lambda x: jn.moments(x, axis=0, axis_name="batch")}[name]
  raises(NameError, fn, "axis_name='batch' is not bound", "shard_map", "no axis_name is needed")


def test_scalar_input_names_the_problem():
  for f in (jn.layer_norm, jn.rms_norm):
    with pytest.raises(ValueError, match="scalar") as info:
      f(jnp.float32(1.0))
    assert "0..-1" not in str(info.value)


def test_nnx_num_features_mismatch_names_the_module_fix():
  nnx = pytest.importorskip("flax.nnx")
  from jaxnorm import nnx as jnnx
  x = jnp.ones((4, 3, 16))
  for cls in (jnnx.BatchNorm, jnnx.LayerNorm, jnnx.RMSNorm, jnnx.InstanceNorm):
    with pytest.raises(ValueError, match=rf"num_features=8.*{cls.__name__}\(16, \.\.\.\)"):
      cls(8, rngs=nnx.Rngs(0))(x)
  with pytest.raises(ValueError, match=r"GroupNorm\(16, \.\.\.\)"):
    jnnx.GroupNorm(8, num_groups=2, rngs=nnx.Rngs(0))(x)


def test_linen_without_flax_names_the_extra():
  import subprocess
  import sys
  code = ("import sys; sys.modules['flax'] = None\n"
          "import jaxnorm\n"
          "try:\n  from jaxnorm import linen\nexcept ModuleNotFoundError as e:\n  print(e)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert "pip install jaxnorm[flax]" in out.stdout, out.stdout + out.stderr
