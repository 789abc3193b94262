"""The GPAS LLaMA model: embedding, scanned (or looped) layer stacks, final norm and untied head."""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from gpas_jax import config as config_lib
from gpas_jax.model import blocks
from gpas_jax.model import layers
from gpas_jax import sharding

REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's hyper-parameters (hashable, so a built model's structure is static under jit)."""
  vocab_size: int = 32000
  hidden_size: int = 512
  intermediate_size: int = 1368
  num_layers: int = 12
  num_heads: int = 8
  norm_type: str = 'pre_gpas'
  post_num: int = 0
  gate_act: str = 'silu'
  gate_init: float = 0.0
  gate_learnable: bool = True
  gate_per_sublayer: bool = False
  lns_mode: str = 'init'
  rms_eps: float = 1e-6
  rope_theta: float = 10000.0
  init_std: float = 0.02
  embed_init_std: float = (2 / 5) ** 0.5
  frozen_last_embed_row: bool = True
  scan_layers: bool = True
  remat_policy: str = 'none'
  param_dtype: str = 'float32'
  compute_dtype: str = 'float32'
  attention_impl: str = 'xla'
  attention_logits_dtype: str = 'compute'

  @classmethod
  def from_config(cls, cfg: Any) -> 'ModelConfig':
    """Builds from a `config.model` ConfigDict (or any mapping), validating it first."""
    if isinstance(cfg, ModelConfig):
      return cfg
    fields = {f.name for f in dataclasses.fields(cls)}
    # None: a field a config not yet resolved leaves unset (config.resolve); the default then.
    values = {k: v for k, v in dict(cfg).items() if k in fields and v is not None}
    out = cls(**values)
    config_lib.validate_model(out)
    return out

  def __getitem__(self, key: str) -> Any:
    return getattr(self, key)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def stack_plan(cfg: ModelConfig) -> list[tuple[str, bool, int, int]]:
  """(form, use_gpas, first layer, count) of each stack; Mix-LN has a post and a pre stack."""
  if cfg.norm_type in ('post_pre', 'post_pre_gpas'):
    use_gpas = cfg.norm_type.endswith('_gpas')
    plan = [('post', use_gpas, 0, cfg.post_num),
            ('pre', use_gpas, cfg.post_num, cfg.num_layers - cfg.post_num)]
    return [p for p in plan if p[3] > 0]
  form, use_gpas = blocks.FORMS[cfg.norm_type]
  return [(form, use_gpas, 0, cfg.num_layers)]


class LayerStack(nnx.Module):
  """Consecutive layers of one form: stacked params under a scan, or a list under a Python loop."""

  def __init__(self, cfg: ModelConfig, form: str, use_gpas: bool, start: int, count: int,
               rngs: nnx.Rngs):
    self.scan, self.remat_policy, self.start = cfg.scan_layers, cfg.remat_policy, start
    if cfg.scan_layers:
      @nnx.split_rngs(splits=count)
      @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def create(idx, r):
        return blocks.DecoderBlock(cfg, form, use_gpas, idx, r)
      self.layers = create(jnp.arange(start, start + count), rngs)
      # nnx.vmap leaves empty axis names (0-d gates) without the new 'layers' axis.
      for _, var in nnx.iter_graph(self.layers):
        if isinstance(var, nnx.Variable) and not var.get_metadata().get('out_sharding'):
          var.set_metadata(out_sharding=('layers',) + (None,) * (var.ndim - 1))
    else:
      self.layers = nnx.List(
          [blocks.DecoderBlock(cfg, form, use_gpas, start + i, rngs) for i in range(count)])

  def __len__(self) -> int:
    if self.scan:
      return jax.tree.leaves(nnx.state(self.layers))[0].shape[0]
    return len(self.layers)

  def __call__(self, x_NxD: jax.Array, batch: int, rope, segment_ids_BxT,
               keep_L: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Returns the stream after the stack and after each of its layers ([count, N, D]).

    keep_L (bool per layer) turns a layer into the identity where False: layer importance.
    """
    def apply(graphdef, state, x, keep):
      out = nnx.merge(graphdef, state)(x, batch, rope, segment_ids_BxT)
      out = sharding.constrain(out, ('act_tokens', 'act_embed'))
      return out if keep is None else jnp.where(keep, out, x)

    if self.remat_policy != 'none':
      apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.remat_policy], static_argnums=0)
    if self.scan:
      graphdef, state = nnx.split(self.layers)
      if keep_L is None:
        body = lambda x, s: (apply(graphdef, s, x, None),) * 2
        return jax.lax.scan(body, x_NxD, state)
      body = lambda x, sk: (apply(graphdef, sk[0], x, sk[1]),) * 2
      return jax.lax.scan(body, x_NxD, (state, keep_L))
    outs = []
    for i, block in enumerate(self.layers):
      x_NxD = apply(*nnx.split(block), x_NxD, None if keep_L is None else keep_L[i])
      outs.append(x_NxD)
    return x_NxD, jnp.stack(outs)


class Transformer(nnx.Module):
  """The decoder-only LM; call it on token ids [B, T] to get logits [B, T, V]."""

  def __init__(self, cfg: ModelConfig | Any, rngs: nnx.Rngs):
    cfg = ModelConfig.from_config(cfg)
    self.config = cfg
    pd = jnp.dtype(cfg.param_dtype)
    v, d = cfg.vocab_size, cfg.hidden_size
    embed = layers.normal(rngs, (v, d), cfg.embed_init_std, pd)
    if cfg.frozen_last_embed_row:  # the baseline's padding_idx = vocab_size - 1 starts at zero
      embed = embed.at[v - 1].set(0)
    self.embed_tokens = layers.param(embed, ('vocab', 'embed'))
    self.stacks = nnx.List([LayerStack(cfg, *plan, rngs) for plan in stack_plan(cfg)])
    self.norm = layers.RMSNorm(d, cfg.rms_eps, param_dtype=pd)
    # Stored [V, D] as torch does: on CPU the head's matmul is faster this way round.
    self.lm_head = layers.param(layers.normal(rngs, (v, d), cfg.init_std, pd), ('vocab', 'embed'))

  def embed(self, input_ids_BxT: jax.Array) -> jax.Array:
    """Token embeddings [B*T, D] in the compute dtype; row vocab_size-1 gets no gradient."""
    cfg = self.config
    x_NxD = jnp.take(self.embed_tokens[...], input_ids_BxT.reshape(-1), axis=0)
    if cfg.frozen_last_embed_row:
      frozen_N = (input_ids_BxT.reshape(-1) == cfg.vocab_size - 1)[:, None]
      x_NxD = jnp.where(frozen_N, jax.lax.stop_gradient(x_NxD), x_NxD)
    return x_NxD.astype(cfg.compute_dtype)

  def __call__(self, input_ids_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None, *,
               keep_L: jax.Array | None = None, return_hidden: bool = False):
    """Logits [B, T, V]; segment ids (packed samples) keep attention within each document.

    keep_L: bool [num_layers], False makes that layer the identity (layer importance).
    return_hidden: also return the residual stream after the embedding and after every layer,
    [num_layers + 1, B*T, D] (the activation analyses).
    """
    cfg = self.config
    b, t = input_ids_BxT.shape
    rope = layers.rope_tables(t, cfg.head_dim, cfg.rope_theta, jnp.dtype(cfg.compute_dtype))
    x_NxD = sharding.constrain(self.embed(input_ids_BxT), ('act_tokens', 'act_embed'))
    hidden = [x_NxD[None]]
    for stack in self.stacks:
      keep = None if keep_L is None else keep_L[stack.start:stack.start + len(stack)]
      x_NxD, outs_LxNxD = stack(x_NxD, b, rope, segment_ids_BxT, keep)
      hidden.append(outs_LxNxD)
    logits_BxTxV = self.head(x_NxD).reshape(b, t, -1)
    if return_hidden:
      return logits_BxTxV, jnp.concatenate(hidden)
    return logits_BxTxV

  def head(self, x_NxD: jax.Array) -> jax.Array:
    """The final norm and the output projection: logits [N, V]."""
    x_NxD = self.norm(x_NxD)
    logits_NxV = x_NxD @ self.lm_head[...].astype(x_NxD.dtype).T
    return sharding.constrain(logits_NxV, ('act_tokens', 'act_vocab'))


def target_weights(input_ids_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None,
                   pad_id: int = 0) -> jax.Array:
  """1 where position t's next token counts in the loss; the last position never counts."""
  if segment_ids_BxT is None:  # the baseline: targets equal to the pad id are ignored
    valid_Bx1T = input_ids_BxT[:, 1:] != pad_id
  else:
    seg = segment_ids_BxT
    valid_Bx1T = (seg[:, 1:] != 0) & (seg[:, 1:] == seg[:, :-1])
  return jnp.pad(valid_Bx1T, ((0, 0), (0, 1))).astype(jnp.float32)


def lm_loss(logits_BxTxV: jax.Array, input_ids_BxT: jax.Array,
            segment_ids_BxT: jax.Array | None = None, pad_id: int = 0,
            weights_BxT: jax.Array | None = None,
            loss_dtype: str = 'float32', chunks: int = 1) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy and the count of counted targets.

  Without weights: the mean over counted targets; with chunks > 1 (and no weights), one mean
  and one count per chunk of B / chunks consecutive rows, [chunks] each. With weights (per position, zero where a
  target does not count; see chunk_weights): the weighted sum. loss_dtype 'float32' takes the
  softmax of float32 logits; 'compute' rounds the log-probabilities to the logits' dtype, as
  torch's cross-entropy on bf16 logits does.
  """
  # Shifting the labels (not the logits) avoids copying the [B, T, V] logits.
  targets_BxT = jnp.pad(input_ids_BxT[:, 1:], ((0, 0), (0, 1)))
  mask_BxT = target_weights(input_ids_BxT, segment_ids_BxT, pad_id)
  logits = logits_BxTxV.astype(jnp.promote_types(logits_BxTxV.dtype, jnp.float32))
  if loss_dtype == 'compute':
    logp_BxTxV = jax.nn.log_softmax(logits).astype(logits_BxTxV.dtype)
    ce_BxT = -jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    ce_BxT = ce_BxT.astype(logits.dtype)
  else:
    ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxT)
  count = jnp.sum(mask_BxT)
  if weights_BxT is None and chunks > 1:
    b, t = mask_BxT.shape
    mask_KxN = mask_BxT.reshape(chunks, (b // chunks) * t)
    count_K = jnp.sum(mask_KxN, axis=1)
    sum_K = jnp.sum((ce_BxT.reshape(mask_KxN.shape) * mask_KxN.astype(ce_BxT.dtype)), axis=1)
    return sum_K / count_K, count_K
  if weights_BxT is None:
    return jnp.sum(ce_BxT * mask_BxT.astype(ce_BxT.dtype)) / count, count
  return jnp.sum(ce_BxT * weights_BxT.astype(ce_BxT.dtype)), count


def chunk_weights(input_ids_BxT: jax.Array, segment_ids_BxT: jax.Array | None, pad_id: int,
                  chunks: int) -> jax.Array:
  """Per-position loss weights [B, T] that make the weighted sum the mean of chunk token means.

  Chunk k holds rows [k*b, (k+1)*b), b = B / chunks (the baseline's per-GPU, per-accumulation
  batch); each counted target of chunk k weighs 1 / (chunks * its chunk's count). A chunk without
  a counted target adds nothing (torch would give NaN).
  """
  mask_BxT = target_weights(input_ids_BxT, segment_ids_BxT, pad_id)
  b, t = mask_BxT.shape
  count_K = jnp.sum(mask_BxT.reshape(chunks, (b // chunks) * t), axis=1)
  w_K = 1.0 / (chunks * jnp.maximum(count_K, 1.0))
  return mask_BxT * jnp.repeat(w_K, b // chunks)[:, None]


def gate_values(model: Transformer) -> jax.Array | None:
  """Every layer's gate, [num_layers] (or [num_layers, 2] per sub-layer); None without GPAS."""
  gates = []
  for stack in model.stacks:
    if stack.scan:
      block = stack.layers
      if hasattr(block, 'gpas_block'):
        gates.append(block.gpas_block.gate[...])
    else:
      gates += [b.gpas_block.gate[...][None] for b in stack.layers if hasattr(b, 'gpas_block')]
  return jnp.concatenate(gates) if gates else None


def create_model(cfg: ModelConfig | Any, seed: int = 0) -> Transformer:
  """Builds and initialises a model with the baseline's initialisation, as one compiled program."""
  cfg = ModelConfig.from_config(cfg)
  make = lambda: Transformer(cfg, nnx.Rngs(params=seed))
  # One jitted init instead of hundreds of eagerly dispatched (and compiled) small ops.
  graphdef = nnx.graphdef(nnx.eval_shape(make))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())
