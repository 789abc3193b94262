"""Cheap checks of the data config and inputs, run before the model is built."""

import ml_collections

from gpas_jax import config as gconfig
from gpas_jax.data.errors import DataError
from gpas_jax.data import sources
from gpas_jax.data import tokenizer as tokenizer_lib
from gpas_jax.data import tokens
from gpas_jax.data import workers


def validate_data(config: ml_collections.ConfigDict, process_count: int | None = None) -> None:
  """Raises DataError (a ConfigError) naming the bad value or path and the fix; builds nothing."""
  d = config.data
  if d.source not in gconfig.DATA_SOURCES:
    raise DataError(f'data.source={d.source!r} is not supported; allowed values: '
                    f'{", ".join(gconfig.DATA_SOURCES)}.')
  if d.layout not in gconfig.LAYOUTS:
    raise DataError(f'data.layout={d.layout!r} is not supported; allowed values: '
                    f'{", ".join(gconfig.LAYOUTS)}.')
  if not isinstance(d.max_length, int) or d.max_length < 2:
    raise DataError(f'data.max_length={d.max_length!r} must be an integer >= 2 (an input and a '
                    'next-token target).')
  if d.pad_id == d.eos_id:
    raise DataError(f'data.pad_id and data.eos_id are both {d.pad_id}; they must differ.')
  for field, value in (('data.pad_id', d.pad_id), ('data.eos_id', d.eos_id)):
    if not 0 <= value < config.model.vocab_size:
      raise DataError(f'{field}={value} is outside 0..model.vocab_size-1='
                      f'{config.model.vocab_size - 1}.')
  if d.eval_tokens <= 0:
    raise DataError(f'data.eval_tokens={d.eval_tokens} must be positive.')
  workers.check(d.worker_count)
  if d.prefetch_buffer_size < 0:
    raise DataError(f'data.prefetch_buffer_size={d.prefetch_buffer_size} must be >= 0.')
  if process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_count = jax.process_count()
  for field, total in (('optim.global_batch_size', config.optim.global_batch_size),
                       ('data.eval_batch_size', d.eval_batch_size)):
    if total <= 0 or total % process_count:
      raise DataError(f'{field}={total} cannot be split evenly over {process_count} hosts '
                      f'(processes); make it a positive multiple of {process_count}.')
  if d.source == 'tokens':  # pre-tokenized: no tokenizer, no text source
    tokens.load_rows(d.tokens_path, config, 'data.tokens_path')
    if d.eval_tokens_path:
      tokens.load_rows(d.eval_tokens_path, config, 'data.eval_tokens_path')
    return
  if config.get('paper_recipe') and d.source in ('tfds', 'text_folder') and not d.tokenizer:
    raise DataError(
        f'the paper\'s {config.paper_recipe} recipe uses the T5 sentencepiece tokenizer (32k), but '
        'data.tokenizer is empty; pass --config.data.tokenizer=PATH/t5.model (docs/DATA.md).')
  if d.tokenizer:
    sp = tokenizer_lib.load_tokenizer(d.tokenizer)
    tokenizer_lib.check_tokenizer(sp, config, f'data.tokenizer={d.tokenizer!r}')
  else:
    vocab = d.tokenizer_vocab_size
    if vocab > config.model.vocab_size:
      raise DataError(f'data.tokenizer_vocab_size={vocab} is larger than model.vocab_size='
                      f'{config.model.vocab_size}; lower it or raise model.vocab_size.')
    if vocab < tokenizer_lib.MIN_VOCAB_SIZE:
      raise DataError(f'data.tokenizer_vocab_size={vocab} is too small; byte fallback needs at '
                      f'least {tokenizer_lib.MIN_VOCAB_SIZE}.')
    if d.pad_id != tokenizer_lib.SPECIAL_IDS['pad_id'] or d.eos_id != tokenizer_lib.SPECIAL_IDS[
        'eos_id']:
      raise DataError(f'The default tokenizer uses pad=0 and eos=1 but data.pad_id={d.pad_id}, '
                      f'data.eos_id={d.eos_id}; set them to 0 and 1 or give data.tokenizer.')
  sources.check_source(config)
