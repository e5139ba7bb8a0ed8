"""One jitted training loop for every experiment.

Training runs ``chunk`` SGD steps per call inside ``lax.scan``, then evaluates on
the test set; the whole thing is ``vmap``-ed over seeds and learning rates, so a
learning-rate sweep over several seeds is one compiled program called
``steps / chunk`` times (which is also where the progress bar advances).
Programs are cached by configuration, so rerunning an experiment does not
recompile.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _common


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def loss_fn(model, params, state, x, y, key):
  """Training-mode loss; returns ``(loss, new_state)``."""
  logits, new_state = model.apply(params, state, x, training=True, key=key)
  return cross_entropy(logits, y), new_state


def make_step(model, momentum: float) -> Callable:
  """``step((params, state, velocity, key), idx, lr, x_train, y_train) -> (carry, loss)``:
  one step of SGD (heavy-ball ``momentum``; 0 is plain SGD) on the minibatch
  ``x_train[idx]``.  The key is split only for models that draw noise."""
  grad = jax.value_and_grad(functools.partial(loss_fn, model), has_aux=True)
  stochastic = getattr(model, "noise", 0) > 0

  def step(carry, idx, lr, xtr, ytr):
    params, state, vel, key = carry
    kn = None
    if stochastic:
      key, kn = jax.random.split(key)
    (loss, state), g = grad(params, state, xtr[idx], ytr[idx], kn)
    if momentum:
      vel = jax.tree.map(lambda v, gi: momentum * v + gi, vel, g)
      g = vel
    params = jax.tree.map(lambda p, gi: p - lr * gi, params, g)
    return (params, state, vel, key), loss

  return step


def batch_indices(seed: int, n: int, steps: int, batch_size: int) -> np.ndarray:
  """Minibatch indices, (steps, batch_size), drawn uniformly with replacement.

  Drawn with NumPy outside the compiled program (faster to compile and to run than
  threefry inside the loop); seed ``s`` gives the same minibatches to every model."""
  rng = np.random.default_rng(10_000 + seed)
  return rng.integers(0, n, size=(steps, batch_size), dtype=np.int32)


class History(NamedTuple):
  """Measurements of :func:`train`.

  Attributes:
    steps: (E,) the step counts at which the metrics were taken.
    metrics: name -> (S, L, E, ...) NumPy array over seeds S, learning rates L and
      evaluations E: ``train_loss`` (mean minibatch loss since the previous
      evaluation), ``test_loss`` and ``test_acc`` (evaluation mode: running
      averages for batch norm), plus what the probe returned.
    params, state: the final parameters and state, leaves shaped (S, L, ...).
  """

  steps: np.ndarray
  metrics: dict[str, np.ndarray]
  params: Any
  state: Any


@functools.lru_cache(maxsize=None)
def gap_probe(batch_size: int) -> Callable:
  """A probe reporting ``train_mode_acc`` and ``eval_mode_acc`` on the test set (see
  :func:`train_eval_accuracy`); one function per batch size, so programs are reused."""
  def probe(model, params, state, lr, key, xtr, ytr, xte, yte):
    del lr, key, xtr, ytr
    t, e = train_eval_accuracy(model, params, state, xte, yte, batch_size=batch_size)
    return {"train_mode_acc": t, "eval_mode_acc": e}
  return probe


@functools.lru_cache(maxsize=128)
def _program(model, chunk: int, momentum: float, probe: Callable | None, quick: bool):
  step = make_step(model, momentum)

  def run_chunk(carry, idx, lr, xtr, ytr, xte, yte):
    carry, losses = lax.scan(lambda c, i: step(c, i, lr, xtr, ytr), carry, idx)
    params, state = carry[0], carry[1]
    logits, _ = model.apply(params, state, xte, training=False)
    out = {"train_loss": losses.mean(), "test_loss": cross_entropy(logits, yte),
           "test_acc": accuracy(logits, yte)}
    if probe is not None:
      out.update(probe(model, params, state, lr, carry[3], xtr, ytr, xte, yte))
    return carry, out

  # inner: learning rates (same minibatches); outer: seeds
  per_lr = jax.vmap(run_chunk, in_axes=(0, None, 0, None, None, None, None))
  return _common.jit(jax.vmap(per_lr, in_axes=(0, 0, None, None, None, None, None)), quick=quick)


_WEIGHTS = ("w", "wx", "wh")


def init_carry(model, seeds: Sequence[int], n_lrs: int, weight_scales=None):
  """Initial ``(params, state, velocity, key)`` with leading axes (seeds, lrs).

  Seed ``s`` gives the same initial weights (``model.init(1000 + s)``) for every
  learning rate and every model with the same parameter shapes (paired
  comparisons).  ``weight_scales`` (one per learning rate, optional) multiply the
  initial weight matrices (not biases or normalizer parameters).  Built with NumPy:
  nothing is compiled.
  """
  inits = [model.init(1000 + s) for s in seeds]
  stack = lambda *a: np.stack([np.asarray(x) for x in a])
  params = jax.tree.map(stack, *[p for p, _ in inits])
  state = jax.tree.map(stack, *[s for _, s in inits])
  n = len(seeds)
  tile = lambda a: np.broadcast_to(a[:, None], (n, n_lrs) + a.shape[1:])
  params, state = jax.tree.map(tile, params), jax.tree.map(tile, state)
  if weight_scales is not None:
    ws = np.asarray(weight_scales, np.float32)

    def scale(path, leaf):
      if getattr(path[-1], "key", None) not in _WEIGHTS:
        return leaf
      return leaf * ws.reshape((1, n_lrs) + (1,) * (leaf.ndim - 2))

    params = jax.tree_util.tree_map_with_path(scale, params)
  vel = jax.tree.map(np.zeros_like, params)
  key_data = np.zeros((n, n_lrs, 2), np.uint32)
  key_data[..., 1] = np.asarray(seeds, np.uint32)[:, None]
  to_dev = lambda t: jax.tree.map(lambda a: jnp.asarray(a, a.dtype), t)
  return (to_dev(params), to_dev(state), to_dev(vel),
          jax.random.wrap_key_data(jnp.asarray(key_data), impl="threefry2x32"))


def train(model, data: _common.Digits, *, seeds: Sequence[int], lrs: Sequence[float],
          steps: int, batch_size: int, eval_every: int, momentum: float = 0.0,
          weight_scales: Sequence[float] | None = None, probe: Callable | None = None,
          bar=None, quick: bool = False) -> History:
  """Trains ``model`` for every (seed, learning rate) pair at once.

  ``weight_scales``, if given, has one entry per learning rate and multiplies the
  initial weight matrices of that column (an initialization sweep in one program).

  ``probe(model, params, state, lr, key, x_train, y_train, x_test, y_test)``, if
  given, is called at every evaluation (inside the jitted program) and returns a
  dict of extra metrics.  ``bar`` is a progress bar advanced by steps.  ``quick``
  compiles for compile speed (tiny test runs).
  """
  if steps % eval_every:
    raise ValueError(f"steps ({steps}) must be a multiple of eval_every ({eval_every}).")
  seeds = list(seeds)
  run = _program(model, int(eval_every), float(momentum), probe, bool(quick))
  if weight_scales is not None and len(weight_scales) != len(lrs):
    raise ValueError(f"weight_scales needs one entry per learning rate ({len(lrs)}), "
                     f"got {len(weight_scales)}.")
  carry = init_carry(model, seeds, len(lrs), weight_scales)
  lr = jnp.asarray(lrs, jnp.float32)
  args = tuple(jnp.asarray(a) for a in data)
  idx = np.stack([batch_indices(s, len(data.x_train), steps, batch_size) for s in seeds])
  history = []
  for c in range(steps // eval_every):
    chunk_idx = jnp.asarray(idx[:, c * eval_every:(c + 1) * eval_every])
    carry, out = run(carry, chunk_idx, lr, *args)
    history.append(out)
    if bar is not None:
      bar.update(eval_every)
  metrics = {k: np.stack([np.asarray(h[k]) for h in history], axis=2) for k in history[0]}
  steps_axis = np.arange(1, steps // eval_every + 1) * eval_every
  return History(steps_axis, metrics, carry[0], carry[1])


def evaluate(model, params, state, x, y) -> tuple[jax.Array, jax.Array]:
  """Accuracy and loss of one model on ``(x, y)`` in evaluation mode."""
  logits, _ = model.apply(params, state, jnp.asarray(x), training=False)
  return accuracy(logits, jnp.asarray(y)), cross_entropy(logits, jnp.asarray(y))


def train_eval_accuracy(model, params, state, x, y, *, batch_size: int):
  """Accuracy in training mode and in evaluation mode on the same samples.

  Training mode runs the model on consecutive batches of ``batch_size`` (batch norm
  uses each batch's own statistics, as during training); evaluation mode uses the
  running averages.  Both use the first ``len(x) // batch_size * batch_size``
  samples, so for batch-independent normalizers the two are identical.
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  n = (x.shape[0] // batch_size) * batch_size
  if n == 0:
    raise ValueError(f"train_eval_accuracy: batch_size {batch_size} exceeds the {x.shape[0]} "
                     "samples.")
  x, y = x[:n], y[:n]
  xb = x.reshape((-1, batch_size) + x.shape[1:])
  logits, _ = jax.vmap(lambda xi: model.apply(params, state, xi, training=True))(xb)
  train_mode = accuracy(logits.reshape(n, -1), y)
  eval_logits, _ = model.apply(params, state, x, training=False)
  return train_mode, accuracy(eval_logits, y)
