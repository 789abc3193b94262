"""SentencePiece tokenizers: load a .model, train one on a dataset, or train-and-cache the default.

Trained models use T5's special ids (pad=0, eos=1, unk=2, no bos) and are lossless:
normalization_rule_name='identity', remove_extra_whitespaces=False and byte_fallback=True make
decode(encode(text)) == text for any text; '\\n' is its own piece so line breaks stay cheap.
Training is deterministic: the input lines are taken in dataset order (no sampling) and
num_threads=1 (SentencePiece's EM with more threads gives different models). The default
tokenizer (data.tokenizer='') is a BPE model trained on the embedded corpus's train split and
cached under data.cache_dir/tokenizers, keyed by Python build and vocab size.

Command line (trains on the 'train' split of any source the pipeline reads; --help lists the
flags and their defaults):
  python -m gpas_jax.data.tokenizer --output=/tmp/sp8k.model --vocab_size=8000 \\
      --source=text_folder --text_dir=/path/to/texts
"""

from collections.abc import Iterable, Iterator
import hashlib
import io
import os
import pathlib
import sys
import time

from absl import flags
from absl import logging
import ml_collections
import sentencepiece as spm

from gpas_jax import storage
from gpas_jax.data import corpus
from gpas_jax.data.errors import DataError
from gpas_jax.data import sources
from gpas_jax.runtime import cli
from gpas_jax.runtime import console

SPECIAL_IDS = {'pad_id': 0, 'eos_id': 1, 'unk_id': 2, 'bos_id': -1}
# The default tokenizer is BPE: on the embedded corpus it trains in ~0.5 s versus ~3 s for
# unigram (T5's type, the command line's default), at the same compression.
DEFAULT_MODEL_TYPE = 'bpe'
# Byte fallback needs 256 byte pieces plus the specials and '\n'.
MIN_VOCAB_SIZE = 300


def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
  """Loads a SentencePiece .model file (local or gs://, read as bytes), or raises naming it."""
  if not storage.is_file(path):
    raise DataError(f'data.tokenizer={path!r} does not exist; give the path of a SentencePiece '
                    ".model file (e.g. T5's spiece.model), or '' to train the default one.")
  try:
    sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(path))
  except (OSError, RuntimeError, TypeError) as e:
    raise DataError(f'data.tokenizer={path!r} is not a SentencePiece model ({e}).') from None
  return sp


def fingerprint(sp: spm.SentencePieceProcessor) -> str:
  """Returns a short hash of the model, stored in iterator states to detect a changed tokenizer."""
  return hashlib.sha256(sp.serialized_model_proto()).hexdigest()[:16]


def training_lines(texts: Iterable[str], max_lines: int) -> Iterator[str]:
  """Yields the non-blank lines of the texts, in order, at most max_lines of them."""
  n = 0
  for text in texts:
    for line in text.split('\n'):
      if line.strip():
        yield line
        n += 1
        if n >= max_lines:
          return


def train_tokenizer(texts: Iterable[str], vocab_size: int, output: str | os.PathLike[str], *,
                    model_type: str = 'unigram', max_lines: int = 2_000_000,
                    num_threads: int = 1, report: bool = False) -> spm.SentencePieceProcessor:
  """Trains a lossless SentencePiece model with T5's ids, writes it atomically, and returns it.

  report=True prints progress while the lines are read and when training starts (the command
  line's default; a large corpus takes minutes).
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise DataError(f'tokenizer vocab_size={vocab_size} is too small; byte fallback needs at '
                    f'least {MIN_VOCAB_SIZE}.')
  lines = training_lines(texts, max_lines)
  if report:
    lines = _reported(lines, max_lines, f'{model_type} model of {vocab_size} pieces')
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model,
        vocab_size=vocab_size, model_type=model_type, **SPECIAL_IDS,
        normalization_rule_name='identity', remove_extra_whitespaces=False, byte_fallback=True,
        user_defined_symbols=['\n'], input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=1 << 14, num_threads=num_threads, hard_vocab_limit=False,
        minloglevel=2)
  except RuntimeError as e:
    raise DataError(f'SentencePiece training failed: {e}') from None
  out = storage.absolute(output)
  storage.write_bytes(out, model.getvalue())  # whole or not at all, local or gs://
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  if sp.vocab_size() < vocab_size:
    logging.warning('The corpus supports only %d pieces; trained %s with that many instead of %d.',
                    sp.vocab_size(), out, vocab_size)
  return sp


def _reported(lines: Iterator[str], max_lines: int, what: str) -> Iterator[str]:
  """The lines, with progress while SentencePiece reads them and a line when training starts."""
  n = 0
  start = time.perf_counter()
  for line in console.progress(lines, 'reading lines', every_s=10.0, unit='lines'):
    n += 1
    yield line
  console.say(f'read {n:,} lines in {time.perf_counter() - start:.0f} s; training a {what} '
              '(no progress output from SentencePiece) ...')


def split_texts(split: sources.Split) -> Iterator[str]:
  """Yields the documents of a split in stored order."""
  for i in range(len(split.source)):
    yield sources.record_text(split.source[i], split.text_field)


def default_tokenizer_path(config: ml_collections.ConfigDict) -> pathlib.Path:
  """Returns where the default (embedded-corpus) tokenizer of this vocab size is cached."""
  vocab = config.data.tokenizer_vocab_size
  return (sources.cache_dir(config) / 'tokenizers' /
          f'embedded-{corpus.python_tag()}-{DEFAULT_MODEL_TYPE}-{vocab}.model')


def get_tokenizer(config: ml_collections.ConfigDict) -> spm.SentencePieceProcessor:
  """Loads data.tokenizer, or trains (first time, then cached) one on the embedded corpus."""
  if config.data.tokenizer:
    return load_tokenizer(config.data.tokenizer)
  path = default_tokenizer_path(config)
  if not path.exists():
    with sources.locked(path.with_name(path.name + '.lock')):
      if not path.exists():
        embedded = ml_collections.ConfigDict(config.data.to_dict())
        embedded.source = 'embedded'
        split = sources.open_split(ml_collections.ConfigDict({'data': embedded}), 'train')
        with console.timed(f'training the default tokenizer {path} (once; cached)'):
          train_tokenizer(split_texts(split), config.data.tokenizer_vocab_size, path,
                          model_type=DEFAULT_MODEL_TYPE)
  return load_tokenizer(str(path))


def check_tokenizer(sp: spm.SentencePieceProcessor, config: ml_collections.ConfigDict,
                    label: str) -> None:
  """Raises if the tokenizer's vocab or special ids do not fit the model and data config."""
  vocab, model_vocab = sp.vocab_size(), config.model.vocab_size
  if vocab > model_vocab:
    raise DataError(f'{label} has {vocab} pieces but model.vocab_size={model_vocab}; set '
                    f'model.vocab_size >= {vocab} or use a smaller tokenizer.')
  if sp.eos_id() != config.data.eos_id:
    raise DataError(f'{label} has eos id {sp.eos_id()} but data.eos_id={config.data.eos_id}; set '
                    'data.eos_id to match (T5 models use 1).')
  if sp.pad_id() >= 0 and sp.pad_id() != config.data.pad_id:
    raise DataError(f'{label} has pad id {sp.pad_id()} but data.pad_id={config.data.pad_id}; set '
                    'data.pad_id to match (T5 models use 0).')


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command line's flags (only when run as a program, or into a test's `fv`)."""
  d = {'flag_values': fv}
  flags.DEFINE_string('output', None, 'Path of the .model file to write.', required=True, **d)
  flags.DEFINE_integer('vocab_size', 32_000, f'Pieces in the model (at least {MIN_VOCAB_SIZE}: '
                       'byte fallback needs 256 of them).', **d)
  flags.DEFINE_enum('source', 'embedded', ['embedded', 'text_folder', 'tfds'],
                    'Where the training text comes from.', **d)
  flags.DEFINE_string('text_dir', '', 'With --source=text_folder: a folder of .txt/.jsonl.', **d)
  flags.DEFINE_string('text_field', 'text', 'Text field of .jsonl or TFDS records.', **d)
  flags.DEFINE_string('tfds_name', 'c4/en:3.1.0', 'With --source=tfds: the dataset.', **d)
  flags.DEFINE_string('data_dir', '', "With --source=tfds: its data dir ('' = $TFDS_DATA_DIR).",
                      **d)
  flags.DEFINE_string('split', 'train', 'The split to train on.', **d)
  flags.DEFINE_string('cache_dir', '', "Build cache of embedded/text_folder ('' = "
                      '~/.cache/gpas_jax).', **d)
  flags.DEFINE_enum('model_type', 'unigram', ['unigram', 'bpe'], 'SentencePiece model type.', **d)
  flags.DEFINE_integer('max_lines', 2_000_000,
                       'Train on the first N non-blank lines, in dataset order.', **d)
  flags.DEFINE_integer('num_threads', 1,
                       'More threads train faster but the model then depends on the count.', **d)


def main(argv: list[str], f: flags.FlagValues = flags.FLAGS) -> int:
  """Trains a tokenizer from the command line (absl flags; --help lists them)."""
  console.quiet_logs()
  path = cli.resolve_path  # relative paths: to the working directory, gs:// as it is
  data = ml_collections.ConfigDict(dict(
      source=f.source, text_dir=path(f.text_dir), text_field=f.text_field,
      tfds_name=f.tfds_name, data_dir=path(f.data_dir), cache_dir=path(f.cache_dir)))
  try:
    split = sources.open_split(ml_collections.ConfigDict({'data': data}), f.split)
    console.say(f'training a tokenizer on {split.description} ({len(split.source):,} documents)')
    start = time.time()
    sp = train_tokenizer(split_texts(split), f.vocab_size, path(f.output), model_type=f.model_type,
                         max_lines=f.max_lines, num_threads=f.num_threads, report=True)
  except DataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  console.say(f'Wrote {path(f.output)}: {sp.vocab_size()} pieces in {time.time() - start:.1f} s.')
  return 0


if __name__ == '__main__':
  define_flags()
  cli.run(main, file_flags=(), positional=False)
