"""The optimizer: the baseline's schedule, global and gate clipping, Adam(W), accumulation.

The paper's training recipe (README, Running experiments). In the order the chain applies them:

1. `optax.clip_by_global_norm(grad_clip)` over every parameter (skipped when grad_clip <= 0);
2. `clip_gates_by_joint_norm(gate_clip)`: one norm over all gate leaves (key path ending in
   'gate'), only those leaves rescaled (skipped when gate_clip <= 0);
3. Adam or AdamW with `lr_schedule(config)`.

Adam follows `torch.optim.Adam`: torch computes `p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`,
which is `lr * m_hat / (sqrt(v_hat) + eps)`, i.e. `optax.scale_by_adam` with eps outside the
square root and `eps_root=0` (tests/test_optim.py checks it step by step against numpy).
`adamw` is torch's AdamW (`p *= 1 - lr * wd` before the step), which is the same as optax's
`add_decayed_weights` after the Adam scaling; `adam` with weight_decay > 0 is torch Adam's
coupled L2 (`g += wd * p` before the moments).

Clipping divides by the plain norm (optax's convention); torch's `clip_grad_norm_` divides by
`norm + 1e-6`, a relative difference of 1e-6 / norm (1e-4 at the 7b recipe's gate clip of
0.01); `clip_gates_by_joint_norm(eps=1e-6)` reproduces torch where that matters.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gpas_jax.train import torch_optim
from gpas_jax import tree_paths

PyTree = Any
KeyPath = tuple[Any, ...]

# Trailing attribute keys that nnx.Variable leaves add to a path in an nnx.State.
_VARIABLE_ATTRS = ('value', 'raw_value')


def _strip_variable_attr(path: KeyPath) -> KeyPath:
  """Drops the trailing `.value` that an nnx.Variable leaf adds to its key path."""
  path = tuple(path)
  if (path and isinstance(path[-1], jax.tree_util.GetAttrKey)
      and path[-1].name in _VARIABLE_ATTRS):
    return path[:-1]
  return path


def path_str(path: KeyPath) -> str:
  """Returns a key path as 'layers/3/gpas/gate' (without the nnx `.value` suffix)."""
  return tree_paths.path_str(_strip_variable_attr(path))


def is_gate_path(path: KeyPath) -> bool:
  """Returns whether a jax key path names a GPAS gate: its last key is the string 'gate'."""
  path = _strip_variable_attr(path)
  return bool(path) and tree_paths.key_name(path[-1]) == 'gate'


def gate_mask(tree: PyTree) -> PyTree:
  """Returns a pytree of bools shaped like `tree`, True at the gate leaves."""
  return jax.tree_util.tree_map_with_path(lambda p, _: is_gate_path(p), tree)


def gate_leaves(params: PyTree) -> dict[str, jax.Array]:
  """{'layers/gpas/gate': leaf, ...}: the gate leaves a path selects (clipping's view of a tree;
  model.transformer.gate_values reads a model's gates per layer)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {path_str(p): v for p, v in flat if is_gate_path(p)}


def global_norm(tree: PyTree) -> jax.Array:
  """Returns the L2 norm of all leaves together, accumulated in float32."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def count_params(params: PyTree) -> int:
  """Returns the number of scalars in all array leaves of `params`."""
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree_util.tree_leaves(params)))


def lr_schedule(config: ml_collections.ConfigDict) -> Callable[[Any], jax.Array]:
  """Returns the baseline's warmup + cosine schedule as a function of the update index.

  With peak = optim.lr, W = optim.warmup_steps, N = num_train_steps, m = optim.min_lr_ratio:
  `peak * s / W` for s < W, else `peak * (m + (1 - m) * 0.5 * (1 + cos(pi * p)))` with
  `p = min(1, (s - W) / max(1, N - W))`. The `max(1, .)` guards are the baseline's own, so
  W = 0 starts at peak and N == W gives peak at s = W and `m * peak` after it.

  Baseline end quirk (`optim.baseline_last_step`): the baseline performs N + 1 updates,
  s = 0..N, the first at lr 0 (s / W) and the last, s == N, at `1e-7 * peak` (its cyclic
  schedule restarts at N and returns 1e-7 for the first two steps of a new cycle). With the
  quirk off, s == N gets `m * peak`. Steps beyond N hold `m * peak` either way.
  The step index is the optimizer's update count (optax's count starts at 0).
  """
  o = config.optim
  peak = float(o.lr)
  warmup = int(o.warmup_steps)
  total = int(config.num_train_steps)
  min_ratio = float(o.min_lr_ratio)
  last_step_quirk = bool(config.optim.baseline_last_step)

  def schedule(step):
    # float32 whatever jax_enable_x64 says, as optax's counters are int32; exact to 2**24 steps.
    s = jnp.asarray(step).astype(jnp.float32)
    warm = s / jnp.float32(max(1, warmup))
    progress = jnp.clip((s - warmup) / jnp.float32(max(1, total - warmup)), 0.0, 1.0)
    cosine = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(jnp.float32(np.pi) * progress))
    factor = jnp.where(s < warmup, warm, cosine)
    if last_step_quirk:
      factor = jnp.where(s == total, jnp.float32(1e-7), factor)
    return (jnp.float32(peak) * factor).astype(jnp.float32)

  return schedule


def clip_gates_by_joint_norm(
    max_norm: float,
    is_gate: Callable[[KeyPath], bool] = is_gate_path,
    eps: float = 0.0,
) -> optax.GradientTransformation:
  """Rescales the gate leaves together so that their joint L2 norm is at most `max_norm`.

  The norm is taken over the gate leaves only (in float32); every other leaf passes through
  untouched (the same array object). `eps` is added to the norm in the divisor (torch: 1e-6).
  """

  def update_fn(updates, state, params=None):
    del params
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    gate_idx = [i for i, (p, _) in enumerate(flat) if is_gate(p)]
    if not gate_idx:
      return updates, state
    norm = global_norm([flat[i][1] for i in gate_idx])
    scale = jnp.minimum(1.0, max_norm / (norm + eps)).astype(jnp.float32)
    leaves = [leaf for _, leaf in flat]
    for i in gate_idx:
      leaves[i] = (leaves[i].astype(jnp.float32) * scale).astype(leaves[i].dtype)
    return jax.tree_util.tree_unflatten(treedef, leaves), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _cast_floats(tree: PyTree, dtype: Any) -> PyTree:
  """Casts the floating leaves of a pytree to `dtype`; integer leaves (counters) stay."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def with_state_dtype(inner: optax.GradientTransformation,
                     dtype: Any) -> optax.GradientTransformation:
  """Keeps every floating leaf of `inner`'s state in `dtype`.

  optax.scale_by_adam has `mu_dtype` but no dtype for nu: nu is created like the params and
  later cast like its previous value. Casting the state at init and after each update pins both.
  """

  def init_fn(params):
    return _cast_floats(inner.init(params), dtype)

  def update_fn(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    return updates, _cast_floats(state, dtype)

  return optax.GradientTransformation(init_fn, update_fn)


def state_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """Returns the Adam moments' dtype: optim.state_dtype, or model.param_dtype when ''."""
  name = config.optim.state_dtype or config.model.param_dtype
  return jnp.dtype(name)


def uses_torch_arithmetic(config: ml_collections.ConfigDict) -> bool:
  """Whether clipping and Adam follow torch's op-by-op arithmetic (baseline_faithful implies it)."""
  return config.optim.arithmetic == 'torch'


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Returns clip (global) -> clip (gates) -> Adam/AdamW with the baseline's schedule.

  `optim.arithmetic='torch'` (or `baseline_faithful`) computes every op as torch does
  (gpas_jax/train/torch_optim.py): bit-identical bf16 parameters to `torch.optim.Adam` given the same
  gradients. `'optax'` uses optax's Adam; in pure bf16 (model.param_dtype='bfloat16',
  state_dtype='') it keeps both moments in bf16 but runs the arithmetic in bf16 (b2 rounds to 1).
  """
  o = config.optim
  name = o.name
  if name not in ('adam', 'adamw'):
    raise ValueError(f"optim.name={name!r} is not supported; allowed values: adam, adamw.")
  dtype = state_dtype(config)
  if uses_torch_arithmetic(config):
    parts = []
    if o.grad_clip and o.grad_clip > 0:
      parts.append(torch_optim.torch_clip_by_norm(float(o.grad_clip)))
    if o.gate_clip and o.gate_clip > 0:
      parts.append(torch_optim.torch_clip_by_norm(float(o.gate_clip), select=is_gate_path))
    parts.append(torch_optim.torch_adam(
        lr_schedule(config), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
        weight_decay=float(o.weight_decay), decoupled=name == 'adamw', state_dtype=dtype))
    return optax.chain(*parts)
  parts = []
  if o.grad_clip and o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(o.grad_clip)))
  if o.gate_clip and o.gate_clip > 0:
    parts.append(clip_gates_by_joint_norm(float(o.gate_clip)))
  if name == 'adam' and o.weight_decay:
    # torch.optim.Adam's weight_decay is L2 added to the (already clipped) gradient.
    parts.append(optax.add_decayed_weights(float(o.weight_decay)))
  parts.append(with_state_dtype(
      optax.scale_by_adam(b1=float(o.b1), b2=float(o.b2), eps=float(o.eps), eps_root=0.0,
                          mu_dtype=dtype), dtype))
  if name == 'adamw' and o.weight_decay:
    parts.append(optax.add_decayed_weights(float(o.weight_decay)))
  parts.append(optax.scale_by_learning_rate(lr_schedule(config)))
  return optax.chain(*parts)


def _split_micro_batches(batch: PyTree, micro_batches: int, split: str) -> PyTree:
  """Reshapes every leaf [B, ...] to [micro_batches, B // micro_batches, ...]."""

  def reshape(x):
    b = x.shape[0]
    if b % micro_batches:
      raise ValueError(f'batch size {b} is not divisible by optim.micro_batches={micro_batches}.')
    if split == 'contiguous':
      return x.reshape((micro_batches, b // micro_batches) + x.shape[1:])
    # Strided: row r goes to micro-batch r % k, so each data-parallel shard of the batch axis
    # feeds every micro-batch equally and no resharding is needed inside the scan.
    return jnp.swapaxes(x.reshape((b // micro_batches, micro_batches) + x.shape[1:]), 0, 1)

  if split not in ('contiguous', 'strided'):
    raise ValueError(f"split={split!r}; allowed values: 'contiguous', 'strided'.")
  return jax.tree.map(reshape, batch)


def accumulate_gradients(
    loss_and_grad_fn: Callable[[PyTree, PyTree], tuple[tuple[jax.Array, PyTree], PyTree]],
    params: PyTree,
    batch: PyTree,
    micro_batches: int,
    *,
    split: str = 'strided',
    aux_reduce: str = 'mean',
    accum_dtype: Optional[Any] = None,
    average: bool = True,
) -> tuple[jax.Array, PyTree, PyTree]:
  """Returns (loss, grads, aux) averaged over `micro_batches` equal slices of the batch.

  `loss_and_grad_fn(params, micro_batch) -> ((loss, aux), grads)`, e.g.
  `jax.value_and_grad(loss_fn, has_aux=True)`. As in the baseline, the step's loss is the mean
  of the micro-batches' losses (each a token mean) and the gradient the sum of grad / k, so
  micro-batches with unequal token counts weigh equally, not per token. The slices run under
  `jax.lax.scan`, so activation memory is that of one micro-batch; micro_batches == 1 is a
  plain call. `split`: 'strided' (micro-batch i = rows i::k; keeps a data-sharded batch local)
  or 'contiguous' (rows i*b:(i+1)*b, like consecutive loader batches). `aux_reduce`: 'mean',
  'sum' or 'stack' (leading axis k). `accum_dtype`: dtype of the gradient sum (default: the
  gradients' own, like torch accumulating into bf16 .grad); the grads come back in it.
  `average=False` sums the micro-batches' losses and gradients instead: for a loss that is
  already a weighted sum over the whole batch (steps.py's chunk weights), so that the split
  into micro-batches does not change the objective.
  """
  if aux_reduce not in ('mean', 'sum', 'stack'):
    raise ValueError(f"aux_reduce={aux_reduce!r}; allowed values: 'mean', 'sum', 'stack'.")
  if micro_batches < 1:
    raise ValueError(f'micro_batches={micro_batches} must be >= 1.')
  if micro_batches == 1:
    (loss, aux), grads = loss_and_grad_fn(params, batch)
    if accum_dtype is not None:
      grads = _cast_floats(grads, accum_dtype)
    if aux_reduce == 'stack':
      aux = jax.tree.map(lambda x: jnp.asarray(x)[None], aux)
    return loss, grads, aux

  k = micro_batches
  div = k if average else 1
  micro = _split_micro_batches(batch, k, split)
  first = jax.tree.map(lambda x: x[0], micro)
  (loss_shape, aux_shape), grad_shape = jax.eval_shape(loss_and_grad_fn, params, first)
  grads0 = jax.tree.map(
      lambda s: jnp.zeros(s.shape, accum_dtype or s.dtype), grad_shape)
  aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
  loss0 = jnp.zeros(loss_shape.shape, jnp.float32)

  def body(carry, mb):
    loss_sum, grad_sum, aux_sum = carry
    (loss, aux), grads = loss_and_grad_fn(params, mb)
    grad_sum = jax.tree.map(
        lambda acc, g: acc + (g / div).astype(acc.dtype), grad_sum, grads)
    loss_sum = loss_sum + loss.astype(jnp.float32) / div
    if aux_reduce == 'stack':
      return (loss_sum, grad_sum, aux_sum), aux
    aux_sum = jax.tree.map(lambda acc, a: acc + a, aux_sum, aux)
    return (loss_sum, grad_sum, aux_sum), None

  (loss, grads, aux_sum), stacked = jax.lax.scan(body, (loss0, grads0, aux0), micro)
  if aux_reduce == 'stack':
    aux = stacked
  elif aux_reduce == 'mean':
    aux = jax.tree.map(lambda a: a / k, aux_sum)
  else:
    aux = aux_sum
  return loss.astype(loss_shape.dtype), grads, aux

