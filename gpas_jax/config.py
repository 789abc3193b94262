"""The config schema's tables (sizes, recipes, allowed values) and its validation."""

from typing import Any

from absl import logging
import ml_collections

from gpas_jax.runtime import cli
from gpas_jax.runtime import xla_flags

NORM_TYPES = (
    'pre', 'pre_gpas', 'post', 'deeppost', 'deeppost_gpas', 'sandwich', 'sandwich_gpas',
    'post_pre', 'post_pre_gpas', 'lns', 'lns_gpas',
)
GATE_ACTS = ('silu', 'identity', 'relu', 'tanh', 'leaky_relu', 'scale_silu', 'sigmoid', 'gelu')
REMAT_POLICIES = ('none', 'full', 'save_dots')
LNS_MODES = ('init', 'fixed')
DTYPES = ('float32', 'bfloat16', 'float64', 'float16')
ATTENTION_IMPLS = ('xla', 'einsum', 'dot_product', 'cudnn')  # model/layers.causal_attention's
OPTIMIZERS = ('adam', 'adamw')
NAN_POLICIES = ('stop', 'skip')
DATA_SOURCES = ('embedded', 'tfds', 'text_folder', 'tokens')
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
# loss_chunks: the baseline's GPUs x accumulation steps, each a token mean of batch/loss_chunks
# sequences (its per-GPU batch); ddp_gpus: its GPUs (DDP world size), loss_chunks / ddp_gpus its
# accumulation steps.
RECIPES = {
    '71m': dict(lr=1e-3, steps=10_000, warmup=1_000, batch=512, grad_clip=0.0, gate_clip=0.0,
                loss_chunks=2, ddp_gpus=1),
    '130m': dict(lr=1e-3, steps=20_000, warmup=2_000, batch=512, grad_clip=0.0, gate_clip=0.0,
                 loss_chunks=2, ddp_gpus=1),
    '250m': dict(lr=1e-3, steps=40_000, warmup=4_000, batch=512, grad_clip=0.0, gate_clip=0.0,
                 loss_chunks=4, ddp_gpus=2),
    '350m': dict(lr=5e-4, steps=60_000, warmup=6_000, batch=512, grad_clip=0.0, gate_clip=0.0,
                 loss_chunks=4, ddp_gpus=4),
    '1b': dict(lr=5e-4, steps=100_000, warmup=10_000, batch=512, grad_clip=0.0, gate_clip=0.0,
               loss_chunks=16, ddp_gpus=4),
    '7b': dict(lr=3e-4, steps=150_000, warmup=10_000, batch=2048, grad_clip=1.0, gate_clip=0.01,
               loss_chunks=512, ddp_gpus=8, remat='full'),
}

# What config.baseline_faithful sets. Each field is left unset (None) in configs/base.py, and
# resolve() fills it once, when the config is loaded: FAITHFUL's value under baseline_faithful,
# else DEFAULTS'. A value set explicitly (a config file, --config.x=v) is kept either way.
FAITHFUL = {
    'optim.arithmetic': 'torch',
    'optim.baseline_last_step': True,
    'model.loss_dtype': 'compute',
    'model.attention_logits_dtype': 'float32',
    'optim.grad_accumulation': 'torch',
    'model.excess_precision': False,
}
DEFAULTS = {
    'optim.arithmetic': 'optax',
    'optim.baseline_last_step': False,
    'model.loss_dtype': 'float32',
    'model.attention_logits_dtype': 'compute',
    'optim.grad_accumulation': 'weighted',
    'model.excess_precision': True,
}
# Fields newer than some saved config.json files, with the value those runs used.
_NEWER = {'optim.loss_chunks': 1, 'optim.ddp_world_size': 1, 'optim.chunk_group': 0}
ARITHMETICS = ('optax', 'torch')
# 'weighted': one backward of the batch's chunk-weighted loss (micro_batches split it for memory)
# | 'torch': the release's backward per chunk, summed in the compute dtype as .grad and DDP do.
GRAD_ACCUMULATIONS = ('weighted', 'torch')
LOSS_DTYPES = ('float32', 'compute')
ATTENTION_LOGITS_DTYPES = ('compute', 'float32')
TOKENS_DTYPES = ('uint16', 'uint32')


def _field(config: ml_collections.ConfigDict, key: str) -> tuple[Any, str]:
  """(the section holding 'section.field', the field); a section a config.json lacks is added."""
  section, field = key.split('.')
  if section not in config:
    with config.unlocked():
      config[section] = ml_collections.ConfigDict()
  return config[section], field


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills, in place, each field baseline_faithful decides (and fields newer than an old
  config.json) with the value the run uses, so every reader reads the plain field and
  config.json records it. A value set explicitly is kept (a notice names it beside
  baseline_faithful). config.resolved_faithful records the switch it was resolved under: a
  second call changes nothing, and one after baseline_faithful was flipped moves the fields it
  had filled to the other side's values."""
  faithful = bool(config.get('baseline_faithful', False))
  before = config.get('resolved_faithful')
  if before is not None and bool(before) == faithful:
    return config
  filled = None if before is None else (FAITHFUL if before else DEFAULTS)
  kept = []
  with config.unlocked():
    for key, value in _NEWER.items():
      section, field = _field(config, key)
      if section.get(field) is None:
        section[field] = value
    for key in FAITHFUL:
      section, field = _field(config, key)
      value = section.get(field)
      if value is None or (filled is not None and value == filled[key]):
        section[field] = FAITHFUL[key] if faithful else DEFAULTS[key]
      elif faithful and value != FAITHFUL[key]:
        kept.append(key)
    config.resolved_faithful = faithful
  if kept:
    logging.warning('baseline_faithful: keeping %s as set (baseline_faithful alone sets %s).',
                    ', '.join(f'{k}={_field(config, k)[0][k.split(".")[1]]!r}' for k in kept),
                    ', '.join(f'{k}={FAITHFUL[k]!r}' for k in kept))
  return config


def from_saved(saved: dict[str, Any]) -> ml_collections.ConfigDict:
  """The resolved config of a run's config.json. One written before configs were resolved (no
  resolved_faithful) is read as it ran: under baseline_faithful, FAITHFUL's values won."""
  config = ml_collections.ConfigDict(saved)
  if saved.get('resolved_faithful') is None and saved.get('baseline_faithful'):
    with config.unlocked():
      for key, value in FAITHFUL.items():
        section, field = _field(config, key)
        section[field] = value
  return resolve(config)


# The fields that name files or folders: relative to the working directory (cli.resolve_path).
PATH_FIELDS = ('init_from', 'data.text_dir', 'data.tokens_path', 'data.eval_tokens_path',
               'data.data_dir', 'data.tokenizer', 'data.cache_dir', 'profile.dir')


def resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Makes every PATH_FIELDS entry absolute against the working directory, in place (URLs and
  empty fields untouched), so config.json records where the run's inputs really are."""
  for key in PATH_FIELDS:
    *parents, field = key.split('.')
    section = config
    for name in parents:
      section = section.get(name) if section is not None else None
    if section is not None and isinstance(section.get(field), str):
      section[field] = cli.resolve_path(section[field])
  return config


def total_updates(config: ml_collections.ConfigDict) -> int:
  """Updates a run performs: num_train_steps, plus the baseline's extra last one (N + 1)."""
  return config.num_train_steps + (1 if config.optim.baseline_last_step else 0)


class ConfigError(cli.UserError, ValueError):
  """A config field holds a value that cannot work; the message names the field and the fix."""


def _choice(value: Any, field: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ConfigError(f'{field}={value!r} is not supported; allowed values: {", ".join(allowed)}.')


# Every numeric field with a range: (field, lo, hi, lo_open, hi_open, integer, fix). None is
# unbounded; open ends exclude the bound. NaN fails every range.
RANGES = (
    ('checkpoint_keep', 1, None, False, False, True, 'keep at least the latest checkpoint'),
    ('nan_max_consecutive', 1, None, False, False, True, 'skipped updates in a row stop a run'),
    ('nan_max_total', 1, None, False, False, True, 'skipped updates in all that stop a run'),
    ('seed', 0, None, False, False, True, ''),
    ('optim.lr', 0.0, None, False, False, False, ''),
    ('optim.min_lr_ratio', 0.0, 1.0, False, False, False,
     'the final lr as a fraction of the peak; below 0 the lr turns negative: gradient ascent'),
    ('optim.b1', 0.0, 1.0, False, True, False, 'Adam decay rates are in [0, 1)'),
    ('optim.b2', 0.0, 1.0, False, True, False, 'Adam decay rates are in [0, 1)'),
    ('optim.eps', 0.0, None, True, False, False, 'Adam divides by sqrt(v) + eps'),
    ('optim.weight_decay', 0.0, None, False, False, False, ''),
    ('optim.grad_clip', 0.0, None, False, False, False, '0 disables clipping'),
    ('optim.gate_clip', 0.0, None, False, False, False, '0 disables clipping'),
    ('model.rms_eps', 0.0, None, True, False, False, ''),
    ('model.rope_theta', 0.0, None, True, False, False, ''),
    ('model.init_std', 0.0, None, True, False, False, ''),
    ('model.embed_init_std', 0.0, None, True, False, False, ''),
    ('model.gate_init', None, None, False, False, False, ''),
    ('data.eval_tokens', 1, None, False, False, True, ''),
    ('data.eval_batch_size', 1, None, False, False, True, ''),
    ('data.worker_count', -1, None, False, False, True, '0: no workers; -1: from the cores'),
    ('data.prefetch_buffer_size', 0, None, False, False, True, ''),
    ('data.validation_percent', 0.0, 100.0, False, False, False, ''),
    ('data.tokenizer_vocab_size', 1, None, False, False, True, ''),
    ('data.pad_id', 0, None, False, False, True, ''),
    ('data.eos_id', 0, None, False, False, True, ''),
    ('mesh.dcn_data', 1, None, False, False, True, ''),
    ('analysis.every_steps', 0, None, False, False, True, '0 disables'),
    ('profile.start_step', 0, None, False, False, True, '0 disables; step 1 compiles'),
    ('profile.num_steps', 1, None, False, False, True, ''),
)


def _get(c: ml_collections.ConfigDict, field: str, default: Any = None) -> Any:
  for part in field.split('.'):
    if part not in c:
      return default
    c = c[part]
  return c


def check_range(value: Any, field: str, lo: Any, hi: Any, lo_open: bool = False,
                hi_open: bool = False, integer: bool = False, fix: str = '') -> None:
  """Raises ConfigError naming the field, its value and the allowed range."""
  kinds = (int,) if integer else (int, float)
  ok = isinstance(value, kinds) and not isinstance(value, bool)
  if ok:
    ok = value == value and abs(value) != float('inf')  # NaN and inf fail every range
    ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
    ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
  if not ok:
    left = '(' if lo_open else '['
    right = ')' if hi_open else ']'
    span = f'{left}{"-inf" if lo is None else lo}, {"inf" if hi is None else hi}{right}'
    kind = 'an integer' if integer else 'a finite number'
    raise ConfigError(f'{field}={value!r} must be {kind} in {span}' + (f' ({fix})' if fix else '')
                      + '.')


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
  _choice(getattr(m, 'attention_logits_dtype', None) or DEFAULTS['model.attention_logits_dtype'],
          'model.attention_logits_dtype', ATTENTION_LOGITS_DTYPES)  # None: resolve() sets it
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


def _validate_accumulation(c: ml_collections.ConfigDict, chunks: int) -> None:
  """optim.grad_accumulation and the release's DDP world size that its chunks are spread over."""
  _choice(c.optim.grad_accumulation, 'optim.grad_accumulation', GRAD_ACCUMULATIONS)
  world = c.optim.ddp_world_size
  _positive(world, 'optim.ddp_world_size')
  if chunks % world:
    raise ConfigError(
        f'optim.ddp_world_size={world} does not divide optim.loss_chunks={chunks}; the '
        'release\'s chunks are its GPUs x accumulation steps, so loss_chunks is a multiple of it.')
  # Under 'torch' micro_batches has no effect (each chunk's backward is whole: splitting a chunk
  # would change its rounding); optim.chunk_group sets how many chunks run at once.
  group = c.optim.chunk_group
  if not isinstance(group, int) or group < 0 or (group and chunks % group):
    raise ConfigError(
        f'optim.chunk_group={group!r} does not divide optim.loss_chunks={chunks}: it is how many '
        "chunks run their backwards at once under optim.grad_accumulation='torch'; choose a "
        'divisor of loss_chunks, or 0 (the fewest the mesh can split).')


def validate(c: ml_collections.ConfigDict) -> None:
  """Rejects a bad run config before anything is built or compiled (resolving it first)."""
  resolve(c)
  validate_model(c.model, c.data.pad_id, c.data.eos_id)
  try:
    xla_flags.parse(c.get('xla_flags', '') or '')
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _choice(c.optim.name, 'optim.name', OPTIMIZERS)
  _choice(c.nan_policy, 'nan_policy', NAN_POLICIES)
  _choice(c.data.source, 'data.source', DATA_SOURCES)
  _choice(c.data.layout, 'data.layout', LAYOUTS)
  _choice(c.optim.arithmetic, 'optim.arithmetic', ARITHMETICS)
  _choice(c.model.loss_dtype, 'model.loss_dtype', LOSS_DTYPES)
  _choice(c.data.get('tokens_dtype', 'uint16'), 'data.tokens_dtype', TOKENS_DTYPES)
  chunks = c.optim.loss_chunks
  _positive(chunks, 'optim.loss_chunks')
  if c.optim.global_batch_size % chunks:
    raise ConfigError(
        f'optim.loss_chunks={chunks} does not divide optim.global_batch_size='
        f'{c.optim.global_batch_size}; each chunk is a token mean over batch / loss_chunks rows.')
  _validate_accumulation(c, chunks)
  if c.get('paper_recipe') and c.data.source == 'embedded':
    raise ConfigError(
        f'this is the paper\'s {c.paper_recipe} recipe, which trains on C4 with the T5 tokenizer, '
        'but data.source=embedded (the small local corpus). Give the data: '
        '--config.data.source=tfds --config.data.data_dir=DIR --config.data.tokenizer=T5.model '
        '(or --config.data.source=tokens --config.data.tokens_path=ROWS.npy); or train this '
        "size on the embedded corpus on purpose with --config.paper_recipe=''.")
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
                      f'0..num_train_steps={c.num_train_steps}: set '
                      f'--config.optim.warmup_steps={max(0, c.num_train_steps // 10)} (10% of the '
                      'steps, as the paper\'s recipes) or a longer num_train_steps.')
  missing = object()
  for row in RANGES:
    value = _get(c, row[0], missing)
    if value is not missing:  # configs written before a field existed
      check_range(value, *row)
  for a in ('data', 'fsdp', 'tensor'):
    if c.mesh[a] != -1:
      _positive(c.mesh[a], f'mesh.{a}')
  if sum(1 for a in ('data', 'fsdp', 'tensor') if c.mesh[a] == -1) > 1:
    raise ConfigError(f'mesh data={c.mesh.data} fsdp={c.mesh.fsdp} tensor={c.mesh.tensor}: '
                      'at most one axis may be -1 (the rest of the devices).')
