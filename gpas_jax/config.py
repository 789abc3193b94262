"""The config schema's tables (sizes, recipes, allowed values) and its validation."""

from typing import Any

import ml_collections

NORM_TYPES = (
    'pre', 'pre_gpas', 'post', 'deeppost', 'deeppost_gpas', 'sandwich', 'sandwich_gpas',
    'post_pre', 'post_pre_gpas', 'lns', 'lns_gpas',
)
GATE_ACTS = ('silu', 'identity', 'relu', 'tanh', 'leaky_relu', 'scale_silu', 'sigmoid', 'gelu')
REMAT_POLICIES = ('none', 'full', 'save_dots')
LNS_MODES = ('init', 'fixed')
DTYPES = ('float32', 'bfloat16', 'float64', 'float16')
ATTENTION_IMPLS = ('xla', 'einsum', 'dot_product', 'cudnn')  # see layers.causal_attention
OPTIMIZERS = ('adam', 'adamw')
NAN_POLICIES = ('stop', 'skip')
DATA_SOURCES = ('embedded', 'tfds', 'text_folder')
LAYOUTS = ('padded', 'packed')

# name: (hidden, ffn, layers, heads, vocab), read from the baseline's JSON configs.
SIZES = {
    '9m': (128, 352, 4, 4, 32000),
    '20m': (256, 688, 4, 4, 32000),
    '35m': (384, 1024, 6, 8, 32000),
    '40m': (416, 1024, 8, 8, 32000),
    '60m': (512, 1376, 8, 8, 32000),
    '71m': (512, 1368, 12, 8, 32000),
    '100m': (640, 1708, 12, 10, 32100),
    '130m': (768, 2048, 12, 12, 32000),
    '250m': (768, 2560, 24, 16, 32000),
    '350m': (1024, 2736, 24, 16, 32000),
    '1b': (2048, 5461, 24, 32, 32000),
    '3b': (2560, 6848, 32, 32, 32000),
    '7b': (4096, 11008, 32, 32, 32000),
}

# The paper's training recipe per size; batch is the global batch in sequences of 256 tokens.
RECIPES = {
    '71m': dict(lr=1e-3, steps=10_000, warmup=1_000, batch=512, grad_clip=0.0, gate_clip=0.0),
    '130m': dict(lr=1e-3, steps=20_000, warmup=2_000, batch=512, grad_clip=0.0, gate_clip=0.0),
    '250m': dict(lr=1e-3, steps=40_000, warmup=4_000, batch=512, grad_clip=0.0, gate_clip=0.0),
    '350m': dict(lr=5e-4, steps=60_000, warmup=6_000, batch=512, grad_clip=0.0, gate_clip=0.0),
    '1b': dict(lr=5e-4, steps=100_000, warmup=10_000, batch=512, grad_clip=0.0, gate_clip=0.0),
    '7b': dict(lr=3e-4, steps=150_000, warmup=10_000, batch=2048, grad_clip=1.0, gate_clip=0.01,
               remat='full'),
}


class ConfigError(ValueError):
  """A config field holds a value that cannot work; the message names the field and the fix."""


def _choice(value: Any, field: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ConfigError(f'{field}={value!r} is not supported; allowed values: {", ".join(allowed)}.')


def _positive(value: Any, field: str) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ConfigError(f'{field}={value!r} must be a positive integer.')


def validate_model(m: ml_collections.ConfigDict, pad_id: int = 0, eos_id: int = 1) -> None:
  """Rejects a model config that cannot be built, naming the field and the allowed values."""
  _choice(m.norm_type, 'model.norm_type', NORM_TYPES)
  _choice(m.gate_act, 'model.gate_act', GATE_ACTS)
  _choice(m.remat_policy, 'model.remat_policy', REMAT_POLICIES)
  _choice(m.lns_mode, 'model.lns_mode', LNS_MODES)
  _choice(m.param_dtype, 'model.param_dtype', DTYPES)
  _choice(m.compute_dtype, 'model.compute_dtype', DTYPES)
  _choice(m.attention_impl, 'model.attention_impl', ATTENTION_IMPLS)
  for f in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads'):
    _positive(m[f], f'model.{f}')
  if m.hidden_size % m.num_heads:
    raise ConfigError(
        f'model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; '
        'choose num_heads among the divisors of hidden_size.')
  head_dim = m.hidden_size // m.num_heads
  if head_dim % 2:
    raise ConfigError(
        f'model.hidden_size / model.num_heads = {head_dim} is odd; rotary embeddings split the '
        'head dim in two halves, so it must be even.')
  if not 0 <= m.post_num <= m.num_layers:
    raise ConfigError(
        f'model.post_num={m.post_num} is outside 0..model.num_layers={m.num_layers}; '
        f'the baseline uses num_layers // 4 = {m.num_layers // 4}.')
  # The frozen row vocab_size-1 and the special ids must be distinct, real rows.
  need = max(pad_id, eos_id) + 2 if m.frozen_last_embed_row else max(pad_id, eos_id) + 1
  if m.vocab_size < need:
    raise ConfigError(
        f'model.vocab_size={m.vocab_size} is too small for the special ids (pad_id={pad_id}, '
        f'eos_id={eos_id}{", and the frozen last row" if m.frozen_last_embed_row else ""}); '
        f'it must be at least {need}.')


def validate(c: ml_collections.ConfigDict) -> None:
  """Rejects a bad run config before anything is built or compiled."""
  validate_model(c.model, c.data.pad_id, c.data.eos_id)
  _choice(c.optim.name, 'optim.name', OPTIMIZERS)
  _choice(c.nan_policy, 'nan_policy', NAN_POLICIES)
  _choice(c.data.source, 'data.source', DATA_SOURCES)
  _choice(c.data.layout, 'data.layout', LAYOUTS)
  if c.optim.state_dtype:
    _choice(c.optim.state_dtype, 'optim.state_dtype', DTYPES)
  for f in ('num_train_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
    _positive(c[f], f)
  _positive(c.optim.global_batch_size, 'optim.global_batch_size')
  _positive(c.optim.micro_batches, 'optim.micro_batches')
  if c.optim.global_batch_size % c.optim.micro_batches:
    raise ConfigError(
        f'optim.global_batch_size={c.optim.global_batch_size} is not divisible by '
        f'optim.micro_batches={c.optim.micro_batches}.')
  if c.data.max_length < 2:
    raise ConfigError(f'data.max_length={c.data.max_length} must be at least 2 (an input and '
                      'a next-token target).')
  if not 0 <= c.optim.warmup_steps <= c.num_train_steps:
    raise ConfigError(f'optim.warmup_steps={c.optim.warmup_steps} is outside '
                      f'0..num_train_steps={c.num_train_steps}.')
  for f in ('lr', 'grad_clip', 'gate_clip', 'weight_decay'):
    if c.optim[f] < 0:
      raise ConfigError(f'optim.{f}={c.optim[f]} must be >= 0.')
  if sum(1 for a in ('data', 'fsdp', 'tensor') if c.mesh[a] == -1) > 1:
    raise ConfigError(f'mesh data={c.mesh.data} fsdp={c.mesh.fsdp} tensor={c.mesh.tensor}: '
                      'at most one axis may be -1 (the rest of the devices).')
