"""The embedded corpus, the text-folder builder, TFDS sources, and the errors for bad input."""

import gzip
import hashlib
import json
import os
import pathlib
import shutil
import socket

import pytest
import tensorflow_datasets as tfds

from tests.helpers import data_config
from gpas_jax.config import ConfigError
from gpas_jax.data import builders
from gpas_jax.data import corpus
from gpas_jax.data.errors import DataError
from gpas_jax.data import sources
from gpas_jax.data import validate_data


def _records_digest(ds_dir: pathlib.Path) -> dict[str, tuple[int, str]]:
  builder = tfds.builder_from_directory(str(ds_dir))
  out = {}
  for split in ('train', 'validation'):
    source = builder.as_data_source(split=split)
    h = hashlib.sha256()
    for i in range(len(source)):
      h.update(source[i]['text'] + b'\0')
    out[split] = (len(source), h.hexdigest())
  return out


def test_embedded_corpus_is_deterministic_and_offline(cache, tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError(f'network access: {args}')

  monkeypatch.setattr(socket.socket, 'connect', no_network)
  monkeypatch.setattr(socket, 'create_connection', no_network)
  ds_dir = sources.prepare_embedded(cache)
  corpus_dir = cache / 'corpus' / corpus.python_tag()
  # Extract again from scratch: the same bytes.
  fresh = corpus.write_embedded_corpus(tmp_path / 'corpus')
  for name in (corpus.TOPICS_FILE, corpus.DOCSTRINGS_FILE):
    assert (fresh / name).read_bytes() == (corpus_dir / name).read_bytes(), name
  text = b''.join((corpus_dir / n).read_bytes() for n in (corpus.TOPICS_FILE,
                                                          corpus.DOCSTRINGS_FILE))
  assert 1_000_000 < len(text) < 4_000_000  # ~1.7 MB of English.
  keys = [json.loads(line)['key'] for line in (corpus_dir / corpus.DOCSTRINGS_FILE).open()]
  assert 'json.dumps' in keys and not any(k.startswith(('this', 'antigravity', 'idlelib'))
                                          for k in keys)
  # Build the TFDS dataset again elsewhere: identical files and records.
  other = sources._build(tmp_path / 'tfds', text_dir=str(corpus_dir), text_field='text',
                         validation_percent=sources.EMBEDDED_VALIDATION_PERCENT)
  for f in sorted(p.name for p in ds_dir.glob('*.array_record*')):
    assert (other / f).read_bytes() == (ds_dir / f).read_bytes(), f
  digest = _records_digest(ds_dir)
  assert digest == _records_digest(other)
  n_train, n_val = digest['train'][0], digest['validation'][0]
  assert n_train > 3000 and 0.02 < n_val / (n_train + n_val) < 0.08


def _write_folder(root: pathlib.Path, n: int = 40) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  with open(root / 'docs.jsonl', 'w', encoding='utf-8') as f:
    for i in range(n):
      f.write(json.dumps({'body': f'Document number {i} says hello.'}) + '\n')
    f.write(json.dumps({'body': '   '}) + '\n')  # Blank: dropped.
  (root / 'sub').mkdir(exist_ok=True)
  (root / 'sub' / 'a.txt').write_text('A whole file is one document.\nSecond line é.\n')
  (root / 'ignored.md').write_text('not text input')
  return root


def test_text_folder_builds_split_and_reads_by_name(cache, tmp_path):
  folder = _write_folder(tmp_path / 'texts')
  c = data_config(cache, source='text_folder', text_dir=str(folder), text_field='body',
              validation_percent=10.0)
  validate_data(c, process_count=1)
  train = sources.open_split(c, 'train')
  val = sources.open_split(c, 'validation')
  texts = {sources.record_text(train.source[i], 'text') for i in range(len(train.source))}
  vtexts = {sources.record_text(val.source[i], 'text') for i in range(len(val.source))}
  expected = {f'Document number {i} says hello.' for i in range(40)}
  expected.add('A whole file is one document.\nSecond line é.\n')
  assert texts | vtexts == expected and not texts & vtexts and vtexts
  # The same folder is cached; an edit makes a new build.
  assert sources.open_split(c, 'train').description == train.description
  (folder / 'sub' / 'b.txt').write_text('A new document.')
  assert sources.open_split(c, 'train').description != train.description
  # TFDS reads the build by name from its data dir, with no builder code needed.
  ds_dir = sources.prepare_text_folder(cache, str(folder), 'body', 10.0)
  by_name = tfds.data_source('gpas_text_folder', split='train', data_dir=str(ds_dir.parent.parent),
                             download=False)
  assert len(by_name) >= 1


def test_gzipped_c4_files_split_by_file_name(cache, tmp_path):
  # The layout of Hugging Face's allenai/c4 en files: JSON lines, gzipped, split by file name.
  folder = tmp_path / 'c4'
  folder.mkdir()
  for name, n in (('c4-train.00000-of-00002.json.gz', 5), ('c4-train.00001-of-00002.json.gz', 4),
                  ('c4-validation.00000-of-00001.json.gz', 3)):
    with gzip.open(folder / name, 'wt', encoding='utf-8') as f:
      for i in range(n):
        f.write(json.dumps({'text': f'{name.split(".")[0]} page {i}', 'url': 'u'}) + '\n')
  c = data_config(cache, source='text_folder', text_dir=str(folder), validation_glob='c4-validation.*')
  val = sources.open_split(c, 'validation').source
  assert sorted(sources.record_text(val[i], 'text') for i in range(len(val))) == [
      f'c4-validation page {i}' for i in range(3)]
  assert len(sources.open_split(c, 'train').source) == 9
  c.data.validation_glob = 'c4-valid.*'
  with pytest.raises(DataError,
                     match=r"validation_glob='c4-valid.\*' matches the files of 0 of 12"):
    sources.open_split(c, 'train')


class FakeC4(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A few records laid out exactly like a prepared c4/en:3.1.0."""
  name = 'c4'
  VERSION = tfds.core.Version('3.1.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='en')]
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'text': tfds.features.Text(), 'url': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(0), 'validation': self._generate_examples(1)}

  def _generate_examples(self, part):
    for i in range(20):
      yield f'{part}-{i}', {'text': f'web page {part} {i}', 'url': f'https://x/{i}'}


def test_tfds_source_reads_prepared_dataset_and_reports_problems(cache, tmp_path):
  data_dir = tmp_path / 'tfds'
  FakeC4(config='en', data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  c = data_config(cache, source='tfds', tfds_name='c4/en:3.1.0', data_dir=str(data_dir))
  validate_data(c, process_count=1)
  split = sources.open_split(c, 'validation')
  assert sorted(sources.record_text(split.source[i], 'text') for i in range(20)) == sorted(
      f'web page 1 {i}' for i in range(20))
  assert len(sources.open_split(data_config(cache, source='tfds', tfds_name='c4/en',
                                        data_dir=str(data_dir)), 'train').source) == 20
  with pytest.raises(DataError, match=r"no split 'test'.*data.train_split"):
    sources.open_split(c, 'test')
  with pytest.raises(DataError, match=r"no feature 'content'.*data.text_field"):
    sources.open_split(data_config(cache, source='tfds', tfds_name='c4/en:3.1.0',
                               data_dir=str(data_dir), text_field='content'), 'train')
  # A copy prepared as TFRecord cannot be read without TensorFlow: say how to convert it.
  old = tmp_path / 'old'
  shutil.copytree(data_dir / 'c4' / 'en' / '3.1.0', old / 'c4' / 'en' / '3.1.0')
  info = old / 'c4' / 'en' / '3.1.0' / 'dataset_info.json'
  info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
  with pytest.raises(DataError, match=r'holds tfrecord files.*tfds convert_format '
                     r'--dataset_version_dir=.*--out_file_format=array_record'):
    sources.open_split(data_config(cache, source='tfds', tfds_name='c4/en:3.1.0', data_dir=str(old)),
                       'train')
  missing = tmp_path / 'nowhere'
  with pytest.raises(ConfigError, match=f"data.data_dir='{missing}' does not exist.*tfds build"):
    validate_data(data_config(cache, source='tfds', data_dir=str(missing)), process_count=1)
  with pytest.raises(DataError, match=r"tfds_name='c4/en:9.9.9' is not prepared.*c4/en/3.1.0"):
    validate_data(data_config(cache, source='tfds', tfds_name='c4/en:9.9.9', data_dir=str(data_dir)),
                  process_count=1)
  with pytest.raises(DataError, match=r"'wiki40b/en' is not prepared.*tfds build wiki40b/en"):
    validate_data(data_config(cache, source='tfds', tfds_name='wiki40b/en', data_dir=str(data_dir)),
                  process_count=1)


def test_text_folder_errors_name_the_path(cache, tmp_path):
  def check(folder, pattern, **data):
    with pytest.raises(DataError, match=pattern):
      c = data_config(cache, source='text_folder', text_dir=str(folder), **data)
      validate_data(c, process_count=1)
      sources.open_split(c, 'train')

  check('', r'data.text_dir is empty')
  check(tmp_path / 'absent', r"text_dir='.*absent' does not exist")
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'notes.md').write_text('x')
  check(tmp_path / 'empty', r"text_dir='.*empty' holds no .txt or .jsonl files")
  (tmp_path / 'file.txt').write_text('x')
  check(tmp_path / 'file.txt', r'is not a folder')
  bad = _write_folder(tmp_path / 'latin1')
  (bad / 'old.txt').write_bytes('caf\xe9 au lait\n'.encode('latin-1'))
  check(bad, r'latin1/old.txt is not UTF-8 text \(line 1.*iconv', text_field='body')
  bad_json = _write_folder(tmp_path / 'badjson')
  with open(bad_json / 'docs.jsonl', 'a', encoding='utf-8') as f:
    f.write('{"body": 3}\n')
  check(bad_json, r"docs.jsonl:42 has no string field 'body'", text_field='body')
  one = tmp_path / 'one'
  one.mkdir()
  (one / 'only.txt').write_text('just one')
  check(one, r'holds 1 non-blank document')
  if os.geteuid() != 0:  # root can read anything
    locked = _write_folder(tmp_path / 'locked')
    (locked / 'sub' / 'a.txt').chmod(0)
    check(locked, r'a.txt cannot be read')


def test_builder_split_is_stable_per_document():
  # The split depends only on each document's key, never on the other documents.
  keys = [f'docs.jsonl:{i}' for i in range(2000)]
  share = sum(builders._bucket(k) < 500 for k in keys) / len(keys)
  assert 0.03 < share < 0.07
  assert [builders._bucket(k) for k in keys[:5]] == [builders._bucket(k) for k in keys[:5]]
