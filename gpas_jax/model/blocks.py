"""One decoder layer of each residual form (pre, post, sandwich), with GPAS where the variant puts it.

A = attention, F = SwiGLU MLP, N1..N4 = RMSNorms, G = GPAS with the layer's gate, a = DeepNorm alpha:
  pre       h = x + A(N1(x));        y = h + F(N2(h))          (+ G after each sum)
  sandwich  h = x + N2(A(N1(x)));    y = h + N4(F(N3(h)))      (+ G after each sum)
  post      h = N2(a*x + A(x));      y = N4(a*h + F(h))        (+ G on the shortcut: a*G(x))
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gpas_jax.model import gpas as gpas_lib
from gpas_jax.model import layers

# The residual form and GPAS flag of each norm type; Mix-LN picks per stack (see transformer.py).
FORMS = {
    'pre': ('pre', False), 'pre_gpas': ('pre', True),
    'lns': ('pre', False), 'lns_gpas': ('pre', True),
    'post': ('post', False), 'deeppost': ('post', False), 'deeppost_gpas': ('post', True),
    'sandwich': ('sandwich', False), 'sandwich_gpas': ('sandwich', True),
}


class LayerConstant(nnx.Variable):
  """A per-layer constant that travels with the layer's state but is never trained."""


class DecoderBlock(nnx.Module):
  """A LLaMA decoder layer in one residual form; `layer` is its index in the whole model."""

  def __init__(self, cfg, form: str, use_gpas: bool, layer: jax.Array | int, rngs: nnx.Rngs):
    pd, cd = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
    d, f, nl = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    self.form, self.use_gpas = form, use_gpas
    self.compute_dtype = cd
    deep = cfg.norm_type in ('deeppost', 'deeppost_gpas')
    self.alpha = (2.0 * nl) ** 0.25 if deep else 1.0
    std = cfg.init_std
    attn_kw, mlp_std = {}, std
    if cfg.norm_type == 'deeppost':  # DeepNorm init; the baseline's deeppost_gpas keeps N(0, 0.02).
      beta = (8.0 * nl) ** -0.25
      attn_kw = dict(qk_std=layers.xavier_std(d, d, 1.0), vo_std=layers.xavier_std(d, d, beta))
      mlp_std = layers.xavier_std(d, f, beta)
    self.self_attn = layers.Attention(d, cfg.num_heads, rngs, std=std, param_dtype=pd,
                                      compute_dtype=cd, impl=cfg.attention_impl,
                                      logits_f32=cfg.attention_logits_dtype == 'float32', **attn_kw)
    self.mlp = layers.MLP(d, f, rngs, std=mlp_std, param_dtype=pd, compute_dtype=cd)

    lns = cfg.norm_type in ('lns', 'lns_gpas')
    lns_scale = 1.0 / jnp.sqrt(jnp.asarray(layer, jnp.promote_types(pd, jnp.float32)) + 1.0)
    gain_init = lns_scale if lns and cfg.lns_mode == 'init' else 1.0
    if lns and cfg.lns_mode == 'fixed':
      # The original LNS: a fixed multiplier on the N1 and N2 outputs, not a trained gain.
      self.lns_scale = LayerConstant(lns_scale)
    norm = lambda init=1.0: layers.RMSNorm(d, cfg.rms_eps, init, param_dtype=pd)
    if form == 'pre':
      self.input_layernorm = norm(gain_init)
      self.post_attention_layernorm = norm(gain_init)
    elif form == 'sandwich':
      self.input_layernorm = norm()
      self.post_attention_layernorm = norm()
      self.pre_feedforward_layernorm = norm()
      self.post_feedforward_layernorm = norm()
    else:
      self.post_attention_layernorm = norm()
      self.post_feedforward_layernorm = norm()
    if use_gpas:
      self.gpas_block = gpas_lib.GPAS(cfg.gate_act, cfg.gate_init, cfg.gate_learnable,
                                      cfg.gate_per_sublayer, pd)

  def _gate(self, x: jax.Array, sublayer: int) -> jax.Array:
    return self.gpas_block(x, sublayer) if self.use_gpas else x

  def __call__(self, x_NxD: jax.Array, batch: int, rope: tuple[np.ndarray, np.ndarray],
               segment_ids_BxT: jax.Array | None) -> jax.Array:
    """Applies the layer to the flattened residual stream [B*T, D]."""
    attn = lambda h: self.self_attn(h, batch, rope, segment_ids_BxT)
    n1, n2 = getattr(self, 'input_layernorm', None), self.post_attention_layernorm
    if self.form == 'pre':
      if hasattr(self, 'lns_scale'):
        scale = self.lns_scale[...]
        n1 = lambda h, n=n1: n(h) * scale.astype(h.dtype)
        n2 = lambda h, n=n2: n(h) * scale.astype(h.dtype)
      h = self._gate(x_NxD + attn(n1(x_NxD)), 0)
      return self._gate(h + self.mlp(n2(h)), 1)
    if self.form == 'sandwich':
      h = self._gate(x_NxD + n2(attn(n1(x_NxD))), 0)
      n3, n4 = self.pre_feedforward_layernorm, self.post_feedforward_layernorm
      return self._gate(h + n4(self.mlp(n3(h))), 1)
    a = self.alpha
    h = n2(a * self._gate(x_NxD, 0) + attn(x_NxD))
    return self.post_feedforward_layernorm(a * self._gate(h, 1) + self.mlp(h))
