"""SentencePiece: the cached default tokenizer, exact round trips, training, the CLI, errors."""

import os
import pathlib
import subprocess
import sys

from absl import flags
import pytest

from tests.helpers import data_config
from gpas_jax.data.errors import DataError
from gpas_jax.data import get_tokenizer
from gpas_jax.data import load_tokenizer
from gpas_jax.data import sources
from gpas_jax.data import tokenizer as tokenizer_lib
from gpas_jax.data import train_tokenizer
from gpas_jax.data import validate_data


def test_default_tokenizer_is_cached_t5_shaped_and_lossless(cache):
  c = data_config(cache)
  sp = get_tokenizer(c)
  path = tokenizer_lib.default_tokenizer_path(c)
  assert path.exists() and f'-{c.data.tokenizer_vocab_size}.model' in path.name
  ids = (sp.vocab_size(), sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id())
  assert ids == (4096, 0, 1, 2, -1)
  mtime = path.stat().st_mtime_ns
  assert tokenizer_lib.fingerprint(get_tokenizer(c)) == tokenizer_lib.fingerprint(sp)
  assert path.stat().st_mtime_ns == mtime  # Reused, not retrained.
  texts = []
  for split in ('train', 'validation'):
    texts += list(tokenizer_lib.split_texts(sources.open_split(c, split)))
  texts += ['  two leading spaces', 'trailing  \n\n', 'tabs\tand\u00a0nbsp', 'emoji 😀 ß ǅ',
            '\u2028odd separators\r\n', '']
  ids = sp.encode(texts)
  bad = [t for t, i in zip(texts, ids) if sp.decode(i) != t]
  assert not bad, bad[:3]
  # A compact vocab for English: well under one token per 2 characters on its own corpus.
  assert sum(map(len, ids)) < sum(map(len, texts)) / 2.5


def test_training_is_deterministic_and_lossless(tmp_path):
  texts = [f'Line {i}: the quick brown fox {i % 7} jumps over the lazy dog.\nok'
           for i in range(300)]
  a = train_tokenizer(texts, 400, tmp_path / 'a.model')
  b = train_tokenizer(texts, 400, tmp_path / 'b.model')
  assert (tmp_path / 'a.model').read_bytes() == (tmp_path / 'b.model').read_bytes()
  assert a.vocab_size() == b.vocab_size() <= 400
  sample = 'Zürich: unseen wörds\n  and 12345 digits'
  assert a.decode(a.encode(sample)) == sample
  assert load_tokenizer(str(tmp_path / 'a.model')).encode(sample) == a.encode(sample)


def test_cli_help_and_training_on_a_text_folder(tmp_path, capsys):
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
  out = subprocess.run([sys.executable, '-m', 'gpas_jax.data.tokenizer', '--help'],
                       capture_output=True, text=True, env=env, timeout=120)  # absl: rc 1
  assert '--vocab_size' in out.stdout and '--text_dir' in out.stdout
  folder = tmp_path / 'texts'
  folder.mkdir()
  for i in range(30):
    (folder / f'{i}.txt').write_text(f'File {i} holds some words about topic {i % 5}.\n' * 3)
  assert '(default: \'32000\')' in out.stdout  # absl flags show their defaults
  model = tmp_path / 'out' / 'sp.model'

  def cli(*args):
    fv = flags.FlagValues()
    tokenizer_lib.define_flags(fv)
    fv(['tokenizer', *args])
    return tokenizer_lib.main(['tokenizer'], fv)

  rc = cli('--output', str(model), '--vocab_size', '350', '--source', 'text_folder',
           '--text_dir', str(folder), '--cache_dir', str(tmp_path / 'cache'))
  assert rc == 0 and load_tokenizer(str(model)).eos_id() == 1
  printed = capsys.readouterr().out
  # 29 of the 30 files land in 'train' (one is validation), 3 lines each.
  assert 'read 87 lines' in printed and f'Wrote {model}' in printed, printed
  # The offline build says what it builds, not TFDS's 'Downloading and preparing dataset'.
  assert f'building the text folder {folder} into ' in printed
  assert 'Downloading' not in printed and 'downloaded' not in printed
  assert cli('--output', str(model), '--source', 'text_folder', '--text_dir',
             str(tmp_path / 'missing')) == 2


def test_tokenizer_errors(cache, tmp_path):
  with pytest.raises(DataError, match=r"data.tokenizer='.*nope.model' does not exist"):
    validate_data(data_config(cache, tokenizer=str(tmp_path / 'nope.model')), process_count=1)
  (tmp_path / 'junk.model').write_bytes(b'not a model')
  with pytest.raises(DataError, match=r'junk.model.* is not a SentencePiece model'):
    load_tokenizer(str(tmp_path / 'junk.model'))
  c = data_config(cache)
  c.model.vocab_size = 1024
  with pytest.raises(DataError, match=r'tokenizer_vocab_size=4096 is larger than model.vocab_size='
                     r'1024'):
    validate_data(c, process_count=1)
  c.data.tokenizer = str(tokenizer_lib.default_tokenizer_path(data_config(cache)))
  get_tokenizer(data_config(cache))  # Make sure the file exists.
  with pytest.raises(DataError, match=r'has 4096 pieces but model.vocab_size=1024; set '
                     r'model.vocab_size >= 4096'):
    validate_data(c, process_count=1)
  with pytest.raises(DataError, match=r'vocab_size=100 is too small'):
    train_tokenizer(['a b c'], 100, tmp_path / 'small.model')
