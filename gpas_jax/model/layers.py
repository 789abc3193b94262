"""RMSNorm, rotary embedding, causal attention and the SwiGLU MLP, as the baseline computes them.

Shape letters: B batch, T sequence, N = B*T tokens, D hidden, H heads, K head dim, F ffn, V vocab.
Projections act on 2-D [N, D] activations: on CPU, [B, T, D] inputs cost XLA transposes in the
backward pass.
"""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gpas_jax import config as config_lib
from gpas_jax import sharding


def param(value: jax.Array, names: tuple[str | None, ...]) -> nnx.Param:
  """A parameter carrying its logical axis names (sharding is applied by the caller's jit)."""
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float | jax.Array,
           dtype: jnp.dtype) -> jax.Array:
  """N(0, std) samples in fp32, cast to the parameter dtype."""
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def xavier_std(fan_in: int, fan_out: int, gain: float) -> float:
  """The std of torch's xavier_normal_ with this gain."""
  return gain * math.sqrt(2.0 / (fan_in + fan_out))


@jax.custom_vjp
def broadcast_mul(s: jax.Array, x: jax.Array) -> jax.Array:
  """s * x for s broadcast over x's leading axes (a gain [D] or a scalar gate).

  Its gradient to s sums the products dy * x in (at least) float32 and rounds once, as torch's
  `sum_to_size` does; XLA's transpose of a bf16 broadcast would accumulate in bf16.
  """
  return s * x


def _broadcast_mul_fwd(s, x):
  return s * x, (s, x)


def _broadcast_mul_bwd(res, dy):
  s, x = res
  prod = dy * x  # rounded per element in x's dtype, as torch's mul backward
  acc = jnp.promote_types(prod.dtype, jnp.float32)
  ds = jnp.sum(prod.astype(acc), axis=tuple(range(x.ndim - s.ndim))).astype(s.dtype)
  return ds, (dy * s).astype(x.dtype)


broadcast_mul.defvjp(_broadcast_mul_fwd, _broadcast_mul_bwd)


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm: normalise in (at least) fp32, multiply the gain in the input dtype."""

  def __init__(self, dim: int, eps: float, init: float | jax.Array = 1.0,
               param_dtype: jnp.dtype = jnp.float32):
    self.eps = eps
    self.weight = param(jnp.full((dim,), init, param_dtype), ('norm',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return broadcast_mul(self.weight[...].astype(x.dtype), y)


def rope_tables(seq_len: int, head_dim: int, theta: float,
                dtype: jnp.dtype) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin [T, K] for the 'rotate half' convention, built as constants.

  Computed as HF LLaMA does, in float32 (float64 for float64 models), then cast to `dtype`:
  the baseline's bf16 tables are its float32 tables rounded by `model.to(bfloat16)`.
  """
  ct = np.promote_types(np.dtype(dtype), np.float32)
  inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2).astype(ct) / ct.type(head_dim)))).astype(ct)
  freqs_TxK2 = np.outer(np.arange(seq_len).astype(ct), inv_freq).astype(ct)
  emb_TxK = np.concatenate([freqs_TxK2, freqs_TxK2], axis=-1)
  return np.cos(emb_TxK).astype(dtype), np.sin(emb_TxK).astype(dtype)


def apply_rope(x_BxTxHxK: jax.Array, cos_TxK: np.ndarray, sin_TxK: np.ndarray) -> jax.Array:
  """Rotates the two halves of the head dim (not interleaved pairs), as HF LLaMA does."""
  half = x_BxTxHxK.shape[-1] // 2
  x1, x2 = x_BxTxHxK[..., :half], x_BxTxHxK[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BxTxHxK * cos_TxK[:, None, :] + rotated * sin_TxK[:, None, :]


def attention_blocks(seq_len: int) -> int:
  """Causal query blocks for 'xla' attention: one per 64 positions, at most 4 (1 below 128)."""
  return max(1, min(4, seq_len // 64))


def _masked_softmax_attention(q_BxHxQxK: jax.Array, k_BxHxSxK: jax.Array, v_BxHxSxK: jax.Array,
                              mask, scale: float, logits_f32: bool = False) -> jax.Array:
  """softmax(q k^T * scale, masked) v, with the softmax in (at least) fp32: [B, H, Q, K].

  logits_f32: q k^T accumulated into and kept in float32 (torch's SDPA on bf16 inputs) instead
  of rounded to the inputs' dtype.
  """
  out_type = jnp.promote_types(q_BxHxQxK.dtype, jnp.float32) if logits_f32 else None
  scores_BxHxQxS = jnp.einsum('bhqk,bhsk->bhqs', q_BxHxQxK, k_BxHxSxK,
                              preferred_element_type=out_type) * scale
  scores32 = scores_BxHxQxS.astype(jnp.promote_types(scores_BxHxQxS.dtype, jnp.float32))
  scores32 = jnp.where(mask, scores32, jnp.finfo(scores32.dtype).min)
  probs = jax.nn.softmax(scores32, axis=-1).astype(q_BxHxQxK.dtype)
  return jnp.einsum('bhqs,bhsk->bhqk', probs, v_BxHxSxK)


def causal_attention(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array,
                     segment_ids_BxT: jax.Array | None, impl: str = 'xla',
                     blocks: int | None = None, logits_f32: bool = False) -> jax.Array:
  """Causal softmax attention; with segment ids, tokens attend within their own segment only.

  impl:
    'xla'          einsum attention in `blocks` causal query blocks (default attention_blocks(T)):
                   block i attends to keys [0, end of block i) only, skipping the masked upper
                   blocks (4 blocks: 5/8 of the full square's work). The default: on the 2-core
                   CPU benchmark 3-8% faster per train step than the full square at T = 256.
    'einsum'       the full T x T square, masked: the reference form.
    'dot_product'  jax.nn.dot_product_attention(implementation='xla') (its softmax is always
                   float32, also for float64 inputs).
    'cudnn'        jax.nn.dot_product_attention(implementation='cudnn'): cuDNN flash attention
                   on NVIDIA GPUs (bf16/fp16 only; it fails elsewhere).
  All compute the same function (tests/test_layers.py checks it). logits_f32 ('xla', 'einsum'):
  keep q k^T in float32 (see _masked_softmax_attention). 'xla' and 'einsum' work in a
  head-major [B, H, T, K] layout (one transpose in, one out: cheaper on CPU than the transposes
  XLA adds around each block's batched matmul otherwise).
  """
  t, head_dim = q_BxTxHxK.shape[1], q_BxTxHxK.shape[-1]
  if impl in ('cudnn', 'dot_product'):
    mask = None
    if segment_ids_BxT is not None:
      mask = (segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :])
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, mask=mask,
                                        is_causal=True,
                                        implementation='cudnn' if impl == 'cudnn' else 'xla')
  if impl not in ('xla', 'einsum'):
    raise ValueError(f'attention impl {impl!r}; allowed: {", ".join(config_lib.ATTENTION_IMPLS)}')
  scale = 1.0 / math.sqrt(head_dim)
  if impl == 'einsum':
    blocks = 1
  elif blocks is None:
    blocks = attention_blocks(t)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK))  # [B, H, T, K]
  bounds = [round(i * t / blocks) for i in range(blocks + 1)]
  outs = []
  for start, end in zip(bounds[:-1], bounds[1:]):
    # Query rows [start, end) see keys [0, end): causal within the diagonal block only.
    mask = np.tril(np.ones((end - start, end), dtype=bool), k=start)[None, None]
    if segment_ids_BxT is not None:
      seg_q, seg_k = segment_ids_BxT[:, start:end], segment_ids_BxT[:, :end]
      mask = mask & (seg_q[:, None, :, None] == seg_k[:, None, None, :])
    outs.append(_masked_softmax_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end],
                                          mask, scale, logits_f32))
  out_BxHxTxK = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return jnp.swapaxes(out_BxHxTxK, 1, 2)


class Attention(nnx.Module):
  """Multi-head causal self-attention with RoPE and no biases."""

  def __init__(self, hidden: int, heads: int, rngs: nnx.Rngs, *, std: float = 0.02,
               qk_std: float | None = None, vo_std: float | None = None,
               param_dtype: jnp.dtype = jnp.float32, compute_dtype: jnp.dtype = jnp.float32,
               impl: str = 'xla', logits_f32: bool = False):
    self.heads, self.head_dim = heads, hidden // heads
    self.compute_dtype, self.impl, self.logits_f32 = compute_dtype, impl, logits_f32
    qk_std = std if qk_std is None else qk_std
    vo_std = std if vo_std is None else vo_std
    hk = (hidden, heads, self.head_dim)
    self.q_proj = param(normal(rngs, hk, qk_std, param_dtype), ('embed', 'heads', 'kv'))
    self.k_proj = param(normal(rngs, hk, qk_std, param_dtype), ('embed', 'heads', 'kv'))
    self.v_proj = param(normal(rngs, hk, vo_std, param_dtype), ('embed', 'heads', 'kv'))
    self.o_proj = param(normal(rngs, (heads, self.head_dim, hidden), vo_std, param_dtype),
                        ('heads', 'kv', 'embed'))

  def __call__(self, x_NxD: jax.Array, batch: int, rope: tuple[np.ndarray, np.ndarray],
               segment_ids_BxT: jax.Array | None) -> jax.Array:
    n, d = x_NxD.shape
    t = n // batch
    cd = self.compute_dtype

    def project(w):
      y_NxHK = x_NxD @ w[...].astype(cd).reshape(d, -1)
      return y_NxHK.reshape(batch, t, self.heads, self.head_dim)

    cos, sin = rope
    q = apply_rope(project(self.q_proj), cos, sin)
    k = apply_rope(project(self.k_proj), cos, sin)
    v = project(self.v_proj)
    q = sharding.constrain(q, ('batch', 'act_length', 'act_heads', 'act_kv'))
    out_BxTxHxK = causal_attention(q, k, v, segment_ids_BxT, self.impl,
                                   logits_f32=self.logits_f32)
    return out_BxTxHxK.reshape(n, -1) @ self.o_proj[...].astype(cd).reshape(-1, d)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, hidden: int, ffn: int, rngs: nnx.Rngs, *, std: float = 0.02,
               param_dtype: jnp.dtype = jnp.float32, compute_dtype: jnp.dtype = jnp.float32):
    self.compute_dtype = compute_dtype
    self.gate_proj = param(normal(rngs, (hidden, ffn), std, param_dtype), ('embed', 'mlp'))
    self.up_proj = param(normal(rngs, (hidden, ffn), std, param_dtype), ('embed', 'mlp'))
    self.down_proj = param(normal(rngs, (ffn, hidden), std, param_dtype), ('mlp', 'embed'))

  def __call__(self, x_NxD: jax.Array) -> jax.Array:
    cd = self.compute_dtype
    h_NxF = jax.nn.silu(x_NxD @ self.gate_proj[...].astype(cd)) * (x_NxD @ self.up_proj[...].astype(cd))
    h_NxF = sharding.constrain(h_NxF, ('act_tokens', 'act_mlp'))
    return h_NxF @ self.down_proj[...].astype(cd)
