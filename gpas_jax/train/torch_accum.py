"""The release's gradient: one backward per chunk, summed as torch's `.grad` and DDP sum it.

The release (torchrun_main.py) runs, per update, `gradient_accumulation` steps on each of its
`world_size` GPUs; each step backpropagates `loss / gradient_accumulation` (a token mean of the
GPU's chunk) into the bf16 `.grad`. It never uses `no_sync`, so DDP all-reduces after *every*
backward: its reducer copies each rank's `.grad` into a bucket multiplied by 1 / world_size
(`at::mul_out(bucket, grad, 1 / W)`: one bf16 rounding), sums the buckets over ranks in bf16
(NCCL) and copies the sum back into `.grad`. The next step's backward then adds its chunk's
gradient to that average (torch's AccumulateGrad: one bf16 rounding) before the next all-reduce.
So with W GPUs and A steps, chunk (a, r) = rows [(a*W + r)*b, (a*W + r + 1)*b):

    L_r = g(0, r)                   a = 0 (.grad was None: AccumulateGrad takes the gradient)
    L_r = round(G + g(a, r))        a > 0
    G   = round(...round(round(L_0 / W) + round(L_1 / W)) + ... + round(L_{W-1} / W))

every round in the compute dtype (`torch_optim.round_to`, which XLA cannot fuse away). The sum
over ranks is taken left to right: NCCL's order depends on the algorithm (ring, tree) and on an
element's place in the bucket; for W <= 2 every order gives the same bits (a + b is correctly
rounded and commutative), beyond that the order here is a fixed one.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gpas_jax.train import torch_optim

PyTree = Any
GroupGradFn = Callable[[PyTree, PyTree], tuple[tuple[jax.Array, jax.Array], PyTree]]


def _round(x32: jax.Array, dtype: Any) -> jax.Array:
  """One torch kernel's rounding of a float32 result to the storage dtype, kept in that dtype."""
  return torch_optim.round_to(x32, dtype).astype(dtype)


def _f32(x: jax.Array) -> jax.Array:
  # Rounding the upcast again drops any excess precision XLA kept in a fused producer.
  return torch_optim.round_to(x.astype(jnp.float32), x.dtype)


def accumulate_step(acc: PyTree, grads: PyTree, first: jax.Array) -> PyTree:
  """AccumulateGrad: `grads` when .grad is empty (first), else round(acc + grads), leafwise."""
  return jax.tree.map(
      lambda a, g: jnp.where(first, g, _round(_f32(a) + _f32(g), g.dtype)), acc, grads)


def ddp_scale(grads: PyTree, world_size: int) -> PyTree:
  """DDP's copy into the bucket: each leaf times 1 / world_size (a float32 scalar), rounded."""
  inv = np.float32(1.0 / world_size)  # wrapped_scalar_tensor(double(1) / W), float32 in the kernel
  return jax.tree.map(lambda g: _round(_f32(g) * inv, g.dtype), grads)


def fold_step(acc: tuple[PyTree, PyTree], g: PyTree, i: jax.Array, world_size: int
              ) -> tuple[PyTree, PyTree]:
  """(.grad, all-reduce sum) after chunk i's gradient g: its GPU's AccumulateGrad, then (W > 1)
  its bucket added in rank order, the sum becoming every .grad after the last rank's."""
  grad, reduced = acc
  w = world_size
  local = accumulate_step(grad, g, i < w)  # this GPU's .grad after its backward
  if w == 1:
    return local, reduced
  reduced = accumulate_step(reduced, ddp_scale(local, w), i % w == 0)
  grad = jax.tree.map(lambda r, gr: jnp.where(i % w == w - 1, r, gr), reduced, grad)
  return grad, reduced


def release_gradient(group_grad: GroupGradFn, params: PyTree, groups: PyTree, world_size: int,
                     with_chunks: bool = False) -> tuple:
  """(mean chunk loss, the release's gradient, counted targets) over chunks [M, G, b, ...].

  The K = M * G chunks are taken G at a time: `group_grad(params, group) -> ((loss[G],
  count[G]), grads[G, ...])` gives each chunk of a group its own backward of its loss / A (in the
  compute dtype; the loss is that loss / A, so the mean over the K chunks is the sum / W). The
  chunks' gradients are independent of one another, so only their sum follows the release's
  order: chunk k = accumulation step k // W on GPU k % W, folded in k order. One lax.scan over the
  M groups: activation memory is that of one group, plus G chunk gradients.

  with_chunks: also return every chunk's gradient [M, G, ...], the very values folded (a check
  of the fold needs them: XLA may round a chunk's backward differently in another program).
  """
  m, g_size = jax.tree.leaves(groups)[0].shape[:2]
  if (m * g_size) % world_size:
    raise ValueError(f'{m * g_size} chunks do not split over world_size={world_size} GPUs.')
  w = world_size
  first = jax.tree.map(lambda x: x[0], groups)
  (_, count_shape), grad_shape = jax.eval_shape(group_grad, params, first)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), grad_shape)
  # One GPU (W = 1) needs no bucket: its .grad is the gradient, one accumulator as today.
  acc0 = (zeros, zeros if w > 1 else None)

  def fold(acc, xs):
    i, g = xs
    return fold_step(acc, g, i, w), None

  def body(carry, xs):
    loss_sum, count_sum, acc = carry
    j, group = xs
    (loss, count), grads = group_grad(params, group)
    acc, _ = jax.lax.scan(fold, acc, (j * g_size + jnp.arange(g_size), grads))
    carry = (loss_sum + jnp.sum(loss.astype(jnp.float32)), count_sum + jnp.sum(count, 0), acc)
    return carry, (grads if with_chunks else None)

  carry0 = (jnp.zeros((), jnp.float32), jnp.zeros(count_shape.shape[1:], count_shape.dtype), acc0)
  (loss_sum, count, (grad, _)), chunks = jax.lax.scan(body, carry0, (jnp.arange(m), groups))
  if with_chunks:
    return loss_sum / w, grad, count, chunks
  return loss_sum / w, grad, count
