"""Checkpoint converters: real torch.nn modules <-> jaxnorm (outputs and running statistics
after training steps), Keras and Haiku formats (documented names, shapes and update rules,
simulated in NumPy: those frameworks are not installed), round trips and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------- PyTorch CNN


def torch_cnn():
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class TorchNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = nn.Conv2d(3, 8, 3)
      self.bn = nn.BatchNorm2d(8, momentum=0.3, eps=1e-3)
      self.gn = nn.GroupNorm(4, 8)
      self.ln = nn.LayerNorm(8)
      self.fc = nn.Linear(8, 5)

    def forward(self, x):  # x: NCHW
      h = torch.relu(self.bn(self.conv(x)))
      h = self.gn(h).permute(0, 2, 3, 1)  # -> NHWC
      h = self.ln(h).mean(dim=(1, 2))
      return self.fc(h)

  torch.manual_seed(0)
  return torch, TorchNet()


def jax_cnn(fields):
  import flax.linen as fnn

  from jaxnorm import linen as jnn

  class Net(fnn.Module):
    @fnn.compact
    def __call__(self, x, train: bool = False):  # x: NHWC
      h = fnn.Conv(8, (3, 3), padding="VALID", name="conv")(x)
      h = fnn.relu(jnn.BatchNorm(use_running_average=not train, name="bn", **fields["bn"])(h))
      h = jnn.GroupNorm(name="gn", **fields["gn"])(h)
      h = jnn.LayerNorm(name="ln", **fields["ln"])(h).mean(axis=(1, 2))
      return fnn.Dense(5, name="fc")(h)

  return Net()


def convert_cnn(sd):
  params, stats, fields = {}, {}, {}
  for name, kind, kw in (("bn", "batch_norm", dict(momentum=0.3, eps=1e-3)),
                         ("gn", "group_norm", dict(num_groups=4)), ("ln", "layer_norm", {})):
    c = jn.from_torch(sd, kind=kind, prefix=name, **kw)
    params[name] = c.variables["params"]
    if "batch_stats" in c.variables:
      stats[name] = c.variables["batch_stats"]
    fields[name] = c.fields
  for name in ("conv", "fc"):
    params[name] = dict(kernel=jn.conv_kernel_from_torch(sd[name + ".weight"]),
                        bias=np.asarray(sd[name + ".bias"].detach()))
  return {"params": params, "batch_stats": stats}, fields


def test_torch_cnn_eval_and_training_statistics():
  torch, tnet = torch_cnn()
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(16, 3, 8, 8)).astype(np.float32) * 2 + 0.5 for _ in range(4)]
  labels = [rng.integers(0, 5, size=16) for _ in range(4)]
  opt = torch.optim.SGD(tnet.parameters(), lr=0.05)
  # two torch training steps first, so the running statistics are non-trivial
  tnet.train()
  for xb, yb in zip(batches[:2], labels[:2]):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(tnet(torch.from_numpy(xb)), torch.from_numpy(yb)).backward()
    opt.step()
  variables, fields = convert_cnn(tnet.state_dict())
  assert fields["bn"] == dict(epsilon=1e-3, use_bias=True, use_scale=True, unbiased_var=True,
                              momentum=pytest.approx(0.7))
  assert fields["gn"] == dict(epsilon=1e-5, use_bias=True, use_scale=True, num_groups=4)
  assert "num_batches_tracked" not in variables["batch_stats"]["bn"]  # dropped
  model = jax_cnn(fields)
  nhwc = lambda x: np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))
  # evaluation outputs
  tnet.eval()
  xe = rng.normal(size=(8, 3, 8, 8)).astype(np.float32) * 2 + 0.5
  with torch.no_grad():
    y_t = tnet(torch.from_numpy(xe)).numpy()
  y_j = model.apply(variables, nhwc(xe))
  assert rel_err(y_j, y_t) < 1e-5
  # k training-mode steps with the weights fixed: the running statistics agree
  tnet.train()
  params, bstats = variables["params"], variables["batch_stats"]
  fwd = jax.jit(lambda p, s, xb: model.apply({"params": p, "batch_stats": s}, xb, train=True,
                                             mutable=["batch_stats"])[1]["batch_stats"])
  for xb in batches[:3]:
    with torch.no_grad():
      tnet(torch.from_numpy(xb))
    bstats = fwd(params, bstats, nhwc(xb))
  sd = tnet.state_dict()
  assert max_err(bstats["bn"]["mean"], sd["bn.running_mean"].numpy()) < 1e-6
  assert max_err(bstats["bn"]["var"], sd["bn.running_var"].numpy()) < 1e-6
  # and k SGD steps on both sides: the same trajectory up to float32 rounding of the
  # gradients (which moves the weights, hence the statistics, by ~1e-5)
  import optax
  tx = optax.sgd(0.05)
  ostate = tx.init(params)

  @jax.jit
  def step(params, bstats, ostate, xb, yb):
    def loss(p):
      logits, upd = model.apply({"params": p, "batch_stats": bstats}, xb, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd
    (_, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
    u, ostate = tx.update(g, ostate)
    return optax.apply_updates(params, u), upd["batch_stats"], ostate

  for xb, yb in zip(batches[2:], labels[2:]):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(tnet(torch.from_numpy(xb)), torch.from_numpy(yb)).backward()
    opt.step()
    params, bstats, ostate = step(params, bstats, ostate, nhwc(xb), yb)
  sd = tnet.state_dict()
  assert max_err(bstats["bn"]["mean"], sd["bn.running_mean"].numpy()) < 1e-4
  assert max_err(bstats["bn"]["var"], sd["bn.running_var"].numpy()) < 1e-4
  # the weights followed the same SGD path (up to float32 rounding of the gradients)
  np.testing.assert_allclose(params["conv"]["kernel"],
                             jn.conv_kernel_from_torch(sd["conv.weight"]), atol=1e-4)
  # and back: jaxnorm -> torch state_dict loads strictly and reproduces the outputs
  back, kwargs = jn.to_torch({"params": params["bn"], "batch_stats": bstats["bn"]},
                             kind="batch_norm", prefix="bn", epsilon=1e-3, momentum=0.7)
  assert kwargs == dict(eps=1e-3, num_features=8, affine=True, track_running_stats=True,
                        momentum=pytest.approx(0.3))
  np.testing.assert_array_equal(back["bn.running_var"], bstats["bn"]["var"])
  bn2 = torch.nn.BatchNorm2d(**kwargs)
  bn2.load_state_dict({k[3:]: torch.from_numpy(np.asarray(v)) for k, v in back.items()})


@pytest.mark.parametrize("case", ["bn1d", "bn3d_noaffine", "bn_nostats", "in_affine",
                                  "in_stats", "ln2d", "ln_nobias", "rms", "rms_eps", "gn"])
def test_torch_modules_eval_outputs(case):
  torch = pytest.importorskip("torch")
  nn = torch.nn
  torch.manual_seed(1)
  rng = np.random.default_rng(1)
  c = 6
  mod, kind, kw, shape = {
      "bn1d": (nn.BatchNorm1d(c, momentum=0.2), "batch_norm", dict(momentum=0.2), (12, c)),
      "bn3d_noaffine": (nn.BatchNorm3d(c, affine=False), "batch_norm", {}, (4, c, 3, 2, 2)),
      "bn_nostats": (nn.BatchNorm2d(c, track_running_stats=False), "batch_norm", {},
                     (4, c, 3, 3)),
      "in_affine": (nn.InstanceNorm2d(c, affine=True), "instance_norm", {}, (3, c, 4, 4)),
      "in_stats": (nn.InstanceNorm1d(c, affine=True, track_running_stats=True),
                   "instance_norm", {}, (3, c, 5)),
      "ln2d": (nn.LayerNorm((4, c)), "layer_norm", {}, (3, 4, c)),
      "ln_nobias": (nn.LayerNorm(c, bias=False, eps=1e-3), "layer_norm", dict(eps=1e-3),
                    (5, c)),
      "rms": (nn.RMSNorm(c), "rms_norm", {}, (5, c)),
      "rms_eps": (nn.RMSNorm((2, c), eps=1e-4), "rms_norm", dict(eps=1e-4), (3, 2, c)),
      "gn": (nn.GroupNorm(3, c, eps=1e-4), "group_norm", dict(eps=1e-4, num_groups=3),
             (2, c, 3, 3)),
  }[case]
  with torch.no_grad():  # non-trivial parameters and statistics
    for name, p in list(mod.named_parameters()) + list(mod.named_buffers()):
      if p.dtype.is_floating_point:
        p.copy_(torch.from_numpy(rng.uniform(0.5, 2, size=p.shape).astype(np.float32)))
  if case in ("bn1d", "in_stats"):  # a few training steps with torch
    mod.train()
    for _ in range(3):
      mod(torch.from_numpy(rng.normal(size=shape).astype(np.float32) * 3 + 1))
  mod.eval()
  x = rng.normal(size=shape).astype(np.float32) * 3 + 1
  with torch.no_grad():
    y_t = mod(torch.from_numpy(x)).numpy()
  conv = jn.from_torch(mod.state_dict(), kind=kind, num_features=c, **kw)
  f, v = conv.fields, conv.variables
  p = v.get("params", {})
  s, b = p.get("scale"), p.get("bias")
  assert f["use_scale"] == (s is not None)
  if kind in ("batch_norm", "instance_norm", "group_norm"):
    x_cl = np.moveaxis(x, 1, -1)  # channels last
    if kind == "batch_norm":
      stats = jn.BatchStats(**v["batch_stats"])
      y, _ = jn.batch_norm(x_cl, stats, s, b, training=not f.get("use_running_average", True),
                           epsilon=f["epsilon"], momentum=f["momentum"])
    elif kind == "instance_norm" and "batch_stats" in v:  # torch eval: the running stats
      y, _ = jn.batch_norm(x_cl, jn.BatchStats(**v["batch_stats"]), s, b, training=False,
                           epsilon=f["epsilon"])
    elif kind == "instance_norm":
      y = jn.instance_norm(x_cl, s, b, epsilon=f["epsilon"])
    else:
      y = jn.group_norm(x_cl, s, b, num_groups=f["num_groups"], epsilon=f["epsilon"])
    y = np.moveaxis(np.asarray(y), -1, 1)
  elif kind == "layer_norm":
    y = jn.layer_norm(x, s, b, epsilon=f["epsilon"], reduction_axes=f["reduction_axes"],
                      feature_axes=f["feature_axes"])
  else:
    y = jn.rms_norm(x, s, epsilon=f["epsilon"], reduction_axes=f["reduction_axes"],
                    feature_axes=f["feature_axes"])
  assert rel_err(y, y_t) < 1e-5, (case, rel_err(y, y_t))
  if case == "rms":
    assert f["epsilon"] == pytest.approx(float(np.finfo(np.float32).eps))
  # round trip: jaxnorm -> torch state_dict -> the module loads it strictly
  back, kwargs = jn.to_torch(v, kind=kind, epsilon=f["epsilon"],
                             momentum=f.get("momentum"), num_groups=f.get("num_groups"))
  if case not in ("bn_nostats", "bn3d_noaffine"):
    mod2 = type(mod)(**kwargs)
    mod2.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in back.items()})
    for k, a in mod.state_dict().items():
      np.testing.assert_array_equal(mod2.state_dict()[k].numpy(), a.numpy()
                                    if k != "num_batches_tracked" else 0)


def test_torch_momentum_none_cumulative_average():
  torch = pytest.importorskip("torch")
  bn = torch.nn.BatchNorm1d(3, momentum=None)
  rng = np.random.default_rng(2)
  xs = [rng.normal(size=(8, 3)).astype(np.float32) * 2 + 1 for _ in range(5)]
  bn.train()
  for x in xs[:2]:
    bn(torch.from_numpy(x))
  conv = jn.from_torch(bn.state_dict(), kind="batch_norm", momentum=None)
  assert conv.fields["momentum"] is None
  np.testing.assert_array_equal(conv.variables["batch_stats"]["count"], [2, 2, 2])
  st = jn.CountedBatchStats(**conv.variables["batch_stats"])
  p = conv.variables["params"]
  for x in xs[2:]:
    bn(torch.from_numpy(x))
    _, st = jn.batch_norm(x, st, p["scale"], p["bias"], training=True, momentum=None,
                          unbiased_var=True)
  sd = bn.state_dict()
  assert max_err(st.mean, sd["running_mean"].numpy()) < 1e-6
  assert max_err(st.var, sd["running_var"].numpy()) < 1e-6
  # the linen module built from the converted fields does the same
  from jaxnorm import linen as jnn
  module = jnn.BatchNorm(use_running_average=False, **conv.fields)
  variables = conv.variables
  for x in xs[2:]:
    _, upd = module.apply(variables, x, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": upd["batch_stats"]}
  assert max_err(variables["batch_stats"]["var"], sd["running_var"].numpy()) < 1e-6
  np.testing.assert_array_equal(variables["batch_stats"]["count"], [5, 5, 5])
  back, kwargs = jn.to_torch(
      {"params": p, "batch_stats": st._asdict()}, kind="batch_norm", epsilon=1e-5,
      momentum=None)
  assert kwargs["momentum"] is None and int(back["num_batches_tracked"]) == 5


def test_conv_kernel_layout_helpers():
  torch = pytest.importorskip("torch")
  import flax.linen as fnn
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
  nhwc = np.transpose(x, (0, 2, 3, 1))
  tconv = torch.nn.Conv2d(3, 4, 3, groups=1)
  w = jn.conv_kernel_from_torch(tconv.weight)
  assert w.shape == (3, 3, 3, 4)
  np.testing.assert_array_equal(jn.conv_kernel_to_torch(w), tconv.weight.detach().numpy())
  y = fnn.Conv(4, (3, 3), padding="VALID").apply(
      {"params": {"kernel": w, "bias": tconv.bias.detach().numpy()}}, nhwc)
  with torch.no_grad():
    y_t = tconv(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  assert rel_err(y, y_t) < 1e-5
  # transposed: torch (in, out, kH, kW) -> flax ConvTranspose(transpose_kernel=True)
  tct = torch.nn.ConvTranspose2d(3, 4, 2, stride=2)
  y = fnn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID", transpose_kernel=True).apply(
      {"params": {"kernel": jn.conv_kernel_from_torch(tct.weight),
                  "bias": tct.bias.detach().numpy()}}, nhwc)
  with torch.no_grad():
    y_t = tct(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  assert rel_err(y, y_t) < 1e-5


def test_torch_conversion_copies_buffers():
  torch = pytest.importorskip("torch")
  bn = torch.nn.BatchNorm1d(3)
  conv = jn.from_torch(bn.state_dict(), kind="batch_norm")
  bn.train()
  bn(torch.randn(8, 3) + 5)  # updates running_mean in place
  np.testing.assert_array_equal(conv.variables["batch_stats"]["mean"], np.zeros(3))


def test_torch_errors():
  sd = {"gn.weight": np.ones(4, np.float32), "gn.bias": np.zeros(4, np.float32)}
  with pytest.raises(ValueError, match="needs num_groups"):
    jn.from_torch(sd, kind="group_norm", prefix="gn")
  with pytest.raises(ValueError, match="kind must be one of"):
    jn.from_torch(sd, kind="batchnorm")
  with pytest.raises(KeyError, match="no entries start with 'xx.'"):
    jn.from_torch(sd, kind="layer_norm", prefix="xx")
  bad = dict(sd, **{"gn.running_mean": np.zeros(5, np.float32),
                    "gn.running_var": np.ones(5, np.float32)})
  with pytest.raises(ValueError, match=r"gn.running_mean has shape \(5,\).*\(4,\)"):
    jn.from_torch(bad, kind="batch_norm", prefix="gn")
  with pytest.raises(ValueError, match="needs momentum=None.*num_batches_tracked|"
                     "momentum=None needs"):
    jn.from_torch({"running_mean": np.zeros(2), "running_var": np.ones(2)}, kind="batch_norm",
                  momentum=None)
  with pytest.raises(ValueError, match="an RMS norm has no bias"):
    jn.from_torch(sd, kind="rms_norm", prefix="gn")


# ----------------------------------------------------------------------------- Keras


def keras_bn_eval(x, w, eps):
  """Keras BatchNormalization(training=False), from its documentation."""
  return (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + eps) * w["gamma"] + w["beta"]


def test_keras_batch_norm_names_semantics_and_round_trip():
  rng = np.random.default_rng(4)
  w = {k: rng.uniform(0.5, 2, size=5).astype(np.float32)
       for k in ("gamma", "beta", "moving_mean", "moving_variance")}
  tf_names = {f"model/batch_normalization/{k}:0": v for k, v in w.items()}
  conv = jn.from_keras(tf_names, kind="batch_norm", prefix="model/batch_normalization/",
                       momentum=0.9)
  assert conv.fields == dict(epsilon=1e-3, use_bias=True, use_scale=True, momentum=0.9,
                             unbiased_var=False)
  x = rng.normal(size=(7, 5)).astype(np.float32)
  v = conv.variables
  y, _ = jn.batch_norm(x, jn.BatchStats(**v["batch_stats"]), v["params"]["scale"],
                       v["params"]["bias"], training=False, epsilon=conv.fields["epsilon"])
  assert rel_err(y, keras_bn_eval(x.astype(np.float64), w, 1e-3)) < 1e-6
  # Keras' update (momentum * moving + (1 - momentum) * batch, biased variance) == jaxnorm's
  _, new = jn.batch_norm(x, jn.BatchStats(**v["batch_stats"]), training=True, momentum=0.9)
  np.testing.assert_allclose(new.var, 0.9 * w["moving_variance"] + 0.1 * x.var(0), rtol=1e-6)
  # get_weights() order, and back
  lst = [w[k] for k in ("gamma", "beta", "moving_mean", "moving_variance")]
  assert jax.tree.map(np.shape, jn.from_keras(lst, kind="batch_norm")) == jax.tree.map(
      np.shape, jn.from_keras(w, kind="batch_norm"))
  back, config = jn.to_keras(v, kind="batch_norm", epsilon=1e-3, momentum=0.9)
  assert list(back) == ["gamma", "beta", "moving_mean", "moving_variance"]
  assert config == dict(epsilon=1e-3, scale=True, center=True, momentum=0.9)
  for k in w:
    np.testing.assert_array_equal(back[k], w[k])
  # center=False: no beta, the list has three entries
  c2 = jn.from_keras(lst[:1] + lst[2:], kind="batch_norm", center=False)
  assert "bias" not in c2.variables["params"] and c2.fields["use_bias"] is False
  with pytest.raises(ValueError, match=r"has 4 weights \['gamma', 'beta', 'moving_mean'"):
    jn.from_keras(lst[:3], kind="batch_norm")
  with pytest.raises(KeyError, match=r"missing \['moving_variance'\]"):
    jn.from_keras({k: w[k] for k in ("gamma", "beta", "moving_mean")}, kind="batch_norm")


@pytest.mark.parametrize("kind", ["layer_norm", "group_norm", "rms_norm"])
def test_keras_feature_norms_round_trip(kind):
  rng = np.random.default_rng(5)
  names = ["scale"] if kind == "rms_norm" else ["gamma", "beta"]
  w = {n: rng.uniform(0.5, 2, size=6).astype(np.float32) for n in names}
  conv = jn.from_keras(w, kind=kind, groups=3)
  assert conv.fields["epsilon"] == (1e-6 if kind == "rms_norm" else 1e-3)
  if kind == "group_norm":
    assert conv.fields["num_groups"] == 3
  back, config = jn.to_keras(conv.variables, kind=kind, epsilon=conv.fields["epsilon"],
                             num_groups=3)
  assert list(back) == names and all(np.array_equal(back[n], w[n]) for n in names)


# ----------------------------------------------------------------------------- Haiku


def haiku_ema(state, value, decay):
  """hk.ExponentialMovingAverage (zero_debias=True), as documented in haiku/_src/moving_averages."""
  counter = state["counter"] + 1
  hidden = state["hidden"] * decay + value * (1 - decay)
  return dict(counter=counter, hidden=hidden, average=hidden / (1 - decay ** counter))


def haiku_bn_train(x, mean_ema, var_ema, decay):
  """hk.BatchNorm's statistics update (biased variance, keep-dims shapes)."""
  m = x.mean(0, keepdims=True)
  v = (x * x).mean(0, keepdims=True) - m * m
  return haiku_ema(mean_ema, m, decay), haiku_ema(var_ema, v, decay)


def test_haiku_batch_norm_debiased_state():
  rng = np.random.default_rng(6)
  c, decay = 4, 0.9
  fresh = lambda: dict(counter=np.int32(0), hidden=np.zeros((1, c)), average=np.zeros((1, c)))
  me, ve = fresh(), fresh()
  xs = [rng.normal(size=(10, c)) * 2 + 1 for _ in range(6)]
  for x in xs[:3]:
    me, ve = haiku_bn_train(x, me, ve, decay)
  params = {"scale": rng.uniform(0.5, 2, size=(1, c)), "offset": rng.normal(size=(1, c))}
  state = {"net/~/batch_norm/~/mean_ema": me, "net/~/batch_norm/~/var_ema": ve}
  conv = jn.from_haiku(params, state, kind="batch_norm", decay_rate=decay)
  v = conv.variables
  assert v["params"]["scale"].shape == (c,)
  np.testing.assert_array_equal(v["batch_stats"]["mean"], me["average"][0])
  assert conv.fields["momentum"] == decay and conv.fields["unbiased_var"] is False
  # evaluation: hk.BatchNorm normalizes with the debiased averages
  x = rng.normal(size=(5, c))
  y_hk = (x - me["average"]) * (params["scale"] * (ve["average"] + 1e-5) ** -0.5) + \
      params["offset"]
  y, _ = jn.batch_norm(jnp.asarray(x, jnp.float32),
                       jn.BatchStats(*(jnp.asarray(v["batch_stats"][k], jnp.float32)
                                       for k in ("mean", "var"))),
                       jnp.asarray(v["params"]["scale"], jnp.float32),
                       jnp.asarray(v["params"]["bias"], jnp.float32), training=False)
  assert rel_err(y, y_hk) < 1e-5
  # continued training: jaxnorm's debias=True follows Haiku's debiased EMA
  assert conv.fields["debias"] is True
  st = jn.CountedBatchStats(*(jnp.asarray(v["batch_stats"][k], t) for k, t in (
      ("mean", jnp.float32), ("var", jnp.float32), ("count", jnp.int32))))
  for x in xs[3:]:
    me, ve = haiku_bn_train(x, me, ve, decay)
    _, st = jn.batch_norm(jnp.asarray(x, jnp.float32), st, training=True, momentum=decay,
                          debias=True)
  assert max_err(st.mean, me["average"][0]) < 1e-5
  assert max_err(st.var, ve["average"][0]) < 1e-5
  # the linen module built from the converted fields (debias=True) does the same
  from jaxnorm import linen as jnn
  module = jnn.BatchNorm(use_running_average=False, **conv.fields)
  lv = jax.tree.map(jnp.asarray, v)
  lv = {"params": jax.tree.map(lambda a: a.astype(jnp.float32), lv["params"]),
        "batch_stats": {k: a.astype(jnp.int32 if k == "count" else jnp.float32)
                        for k, a in lv["batch_stats"].items()}}
  for x in xs[3:]:
    _, upd = module.apply(lv, jnp.asarray(x, jnp.float32), mutable=["batch_stats"])
    lv = {"params": lv["params"], "batch_stats": upd["batch_stats"]}
  assert max_err(lv["batch_stats"]["var"], ve["average"][0]) < 1e-5
  # back to Haiku: shapes [1, C], average = running average; with counter 2**30 Haiku's next
  # (debiased) update equals jaxnorm's plain EMA
  plain = {"params": v["params"], "batch_stats": {k: v["batch_stats"][k] for k in ("mean",
                                                                                   "var")}}
  hp, hs = jn.to_haiku(plain, kind="batch_norm", momentum=decay, ndim=2)
  assert hp["scale"].shape == (1, c) and hs["mean_ema"]["average"].shape == (1, c)
  np.testing.assert_array_equal(hs["var_ema"]["average"][0], v["batch_stats"]["var"])
  me2, ve2 = haiku_bn_train(xs[0], hs["mean_ema"], hs["var_ema"], decay)
  _, new = jn.batch_norm(xs[0], jn.BatchStats(mean=plain["batch_stats"]["mean"],
                                              var=plain["batch_stats"]["var"]),
                         training=True, momentum=decay)
  assert max_err(new.mean, me2["average"][0]) < 1e-6
  assert max_err(new.var, ve2["average"][0]) < 1e-6
  # with the counted state, the counter is kept: Haiku continues its own debiasing
  hp, hs = jn.to_haiku(v, kind="batch_norm", momentum=decay, ndim=2)
  assert int(hs["mean_ema"]["counter"]) == 3
  np.testing.assert_allclose(hs["mean_ema"]["hidden"], me_hidden_after(xs[:3], decay, c),
                             rtol=1e-12)


def me_hidden_after(xs, decay, c):
  h = np.zeros((1, c))
  for x in xs:
    h = h * decay + x.mean(0, keepdims=True) * (1 - decay)
  return h


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm", "group_norm", "instance_norm"])
def test_haiku_feature_norms_round_trip(kind):
  rng = np.random.default_rng(7)
  params = {"scale": rng.uniform(0.5, 2, size=6)}
  if kind != "rms_norm":
    params["offset"] = rng.normal(size=6)
  conv = jn.from_haiku(params, kind=kind, groups=2)
  assert conv.fields["epsilon"] == 1e-5
  hp, hs = jn.to_haiku(conv.variables, kind=kind)
  assert hs == {} and set(hp) == set(params)
  for k in params:
    np.testing.assert_array_equal(hp[k], params[k])
  with pytest.raises(ValueError, match="kind must be one of"):
    jn.from_haiku(params, kind="norm")


def test_haiku_errors():
  with pytest.raises(ValueError, match="needs state.*and decay_rate"):
    jn.from_haiku({"scale": np.ones((1, 3))}, kind="batch_norm")
  st = {"a/~/mean_ema": {}, "b/~/mean_ema": {}, "a/~/var_ema": {}}
  with pytest.raises(KeyError, match="exactly one entry ending in 'mean_ema'"):
    jn.from_haiku({}, st, kind="batch_norm", decay_rate=0.9)
  with pytest.raises(ValueError, match="needs momentum"):
    jn.to_haiku({"batch_stats": {"mean": np.zeros(2), "var": np.ones(2)}}, kind="batch_norm")
