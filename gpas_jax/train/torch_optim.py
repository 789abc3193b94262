"""Optax transformations with torch.optim's arithmetic: the baseline's Adam and gradient clipping.

The baseline (`model.to(bfloat16)` before `torch.optim.Adam`) keeps parameters, gradients and
both Adam moments in bf16. Each torch op computes in float32 and rounds its result to the storage
dtype once; optax's Adam on bf16 state instead turns its constants into bf16 (b2 = 0.999 becomes
1.0) and rounds differently. Here every torch op of the update is one float32 expression followed
by one rounding (`jax.lax.reduce_precision`, which XLA cannot fuse away the way it may drop a
bf16 round trip), in torch's order:

  torch.optim.Adam (CPU, single-tensor path), t = update index + 1:
    m.lerp_(g, 1 - b1)                         m + (1 - b1) * (g - m)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)    v * b2, then v + ((1 - b2) * g) * g
    denom = (v.sqrt() / sqrt(bc2)).add_(eps)   three roundings
    p.addcdiv_(m, denom, value=-lr / bc1)      p + (-lr / bc1 * m) / denom
  torch.nn.utils.clip_grad_norm_ (foreach path):
    per-tensor norms in the gradients' dtype, their norm in that dtype, coef = max / (norm + 1e-6)
    in that dtype (as reciprocal, then times max), clamped to 1, then g * coef.

Python-double scalars become float32 inside torch's kernels; the bias corrections 1 - b**t are
computed as -expm1(t * log(b)) so float32 keeps their digits at small t. In float32 storage
this is the Adam torch computes in float32. The updates come back in float32 as
`new_param - param` (exact for bf16 params), so `optax.apply_updates` lands on torch's bf16 value.

A scanned layer stack stores one [layers, ...] array where torch has one tensor per layer; norms
are taken per layer slice (`stacked` says which leaves are stacks), as torch takes them.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpas_jax import tree_paths

PyTree = Any


def round_to(x32: jax.Array, dtype: Any) -> jax.Array:
  """Rounds float32 values to the nearest `dtype` value (ties to even), keeping float32."""
  info = jnp.finfo(dtype)
  if jnp.dtype(dtype).itemsize >= 4:
    return x32
  return jax.lax.reduce_precision(x32, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _f32(value: float) -> np.float32:
  """A Python double as torch's kernels see it: cast to float32."""
  return np.float32(value)


def bias_correction(beta: float, t: jax.Array) -> jax.Array:
  """1 - beta**t in float32 without the cancellation of computing beta**t first."""
  return -jnp.expm1(t * _f32(np.log(beta)))


def _is_stacked_path(path: tuple) -> bool:
  """A leaf of a scanned stack: 'layers' followed by a name, not by a layer index."""
  keys = [tree_paths.key_name(k) for k in path]
  for i, k in enumerate(keys[:-1]):
    if k == 'layers' and not isinstance(keys[i + 1], int):
      return True
  return False


def tensor_norms(tree: PyTree, stacked: Callable[[tuple], bool] = _is_stacked_path,
                 select: Callable[[tuple], bool] | None = None) -> list[jax.Array]:
  """The L2 norm of every torch tensor in `tree` (per layer slice of stacked leaves), float32.

  Each norm is rounded to its leaf's dtype, as `torch._foreach_norm` returns it.
  """
  norms = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if select is not None and not select(path):
      continue
    x32 = leaf.astype(jnp.float32)
    if stacked(path) and x32.ndim >= 1:
      n = jnp.sqrt(jnp.sum(jnp.square(x32.reshape(x32.shape[0], -1)), axis=1))
    else:
      n = jnp.sqrt(jnp.sum(jnp.square(x32))).reshape(1)
    norms.append(round_to(n, leaf.dtype))
  return norms


def torch_clip_by_norm(max_norm: float, select: Callable[[tuple], bool] | None = None,
                       stacked: Callable[[tuple], bool] = _is_stacked_path
                       ) -> optax.GradientTransformation:
  """`torch.nn.utils.clip_grad_norm_(tensors, max_norm)` over the leaves `select` picks (all).

  The total norm, `norm + 1e-6` and the coefficient are each rounded to the gradients' dtype
  (the first selected leaf's), and each selected gradient becomes round(g * coef).
  """

  def update_fn(updates, state, params=None):
    del params
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    chosen = [i for i, (p, _) in enumerate(flat) if select is None or select(p)]
    if not chosen:
      return updates, state
    dtype = flat[chosen[0]][1].dtype
    norms = jnp.concatenate(tensor_norms(updates, stacked, select))
    total = round_to(jnp.sqrt(jnp.sum(jnp.square(norms))), dtype)
    # torch evaluates `max_norm / tensor` as `tensor.reciprocal() * max_norm`: two roundings.
    inv = round_to(1.0 / round_to(total + _f32(1e-6), dtype), dtype)
    coef = round_to(inv * _f32(max_norm), dtype)
    coef = jnp.minimum(coef, 1.0)
    leaves = [leaf for _, leaf in flat]
    for i in chosen:
      leaves[i] = round_to(leaves[i].astype(jnp.float32) * coef, leaves[i].dtype).astype(
          leaves[i].dtype)
    return jax.tree_util.tree_unflatten(treedef, leaves), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


class TorchAdamState(NamedTuple):
  """Adam's update count and moments, the moments stored in `state_dtype`."""
  count: jax.Array
  mu: PyTree
  nu: PyTree


def torch_adam(learning_rate: Callable[[jax.Array], jax.Array], b1: float = 0.9,
               b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
               decoupled: bool = False, state_dtype: Any = None) -> optax.GradientTransformation:
  """`torch.optim.Adam` (or AdamW with `decoupled`) as one optax transformation, lr included.

  `learning_rate(count)` is the schedule at the 0-based update index. The moments are kept in
  `state_dtype` (default: each parameter's dtype, as torch keeps them); every op rounds to it.
  Returns float32 updates `new_param - param`; `update` needs `params`.
  """
  w1, c2 = _f32(1 - b1), _f32(1 - b2)
  b2_32, eps32 = _f32(b2), _f32(eps)

  def init_fn(params):
    zeros = lambda p: jnp.zeros(p.shape, state_dtype or p.dtype)
    return TorchAdamState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params),
                          jax.tree.map(zeros, params))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError('torch_adam needs the parameters: tx.update(grads, state, params).')
    t = (state.count + 1).astype(jnp.float32)
    lr = jnp.asarray(learning_rate(state.count), jnp.float32)
    step_size = lr / bias_correction(b1, t)
    bc2_sqrt = jnp.sqrt(bias_correction(b2, t))

    def leaf(g, p, m, v):
      pd, md = p.dtype, m.dtype
      p32, g32 = p.astype(jnp.float32), g.astype(jnp.float32)
      if weight_decay and decoupled:
        p32 = round_to(p32 * (1 - lr * _f32(weight_decay)), pd)
      elif weight_decay:
        g32 = round_to(g32 + _f32(weight_decay) * p32, g.dtype)
      m32 = m.astype(jnp.float32)
      m32 = round_to(m32 + w1 * (g32 - m32), md)
      v32 = round_to(v.astype(jnp.float32) * b2_32, md)
      v32 = round_to(v32 + (c2 * g32) * g32, md)
      denom = round_to(jnp.sqrt(v32), md)
      denom = round_to(denom / bc2_sqrt, md)
      denom = round_to(denom + eps32, md)
      new32 = round_to(p32 + (-step_size * m32) / denom, pd)
      return new32 - p.astype(jnp.float32), m32.astype(md), v32.astype(md)

    out = jax.tree.map(leaf, grads, params, state.mu, state.nu)
    first = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)
    return first(0), TorchAdamState(state.count + 1, first(1), first(2))

  return optax.GradientTransformation(init_fn, update_fn)

