"""A TFDS builder over a folder of local text, written as ArrayRecord without TensorFlow.

Documents: each `.txt` file is one document; each line of a `.jsonl` file is one document (the
string under `text_field`); `.gz` versions of both are read too, so the `c4-*.json.gz` files of
Hugging Face's allenai/c4 work as they are. Files are found recursively, in sorted path order;
hidden files are skipped. Documents that are empty or only whitespace are dropped.

Split: with `validation_glob` (e.g. 'c4-validation.*'), files whose name matches it form
'validation' and the rest 'train'. Otherwise a document goes to 'validation' when the SHA-256 of
its key (the file's path relative to the folder, plus ':<line>' for JSON lines) falls in the
first `validation_percent` percent of the hash range, else to 'train'; so the split does not
depend on file order or on other documents. If no document lands in validation, the one with the
smallest hash is moved there.
"""

from collections.abc import Iterator
import fnmatch
import gzip
import hashlib
import json
import os
import pathlib

import tensorflow_datasets as tfds

from gpas_jax.data.errors import DataError
from gpas_jax.runtime import console

TEXT_SUFFIXES = ('.txt', '.jsonl', '.txt.gz', '.jsonl.gz', '.json.gz')
_HASH_BUCKETS = 10_000


def list_text_files(text_dir: str) -> list[pathlib.Path]:
  """Returns the folder's readable text files in sorted order, or raises naming the problem."""
  if not text_dir:
    raise DataError("data.text_dir is empty; with data.source='text_folder' set it to a folder of "
                    '.txt files (one document each) or .jsonl files (one document per line).')
  root = pathlib.Path(text_dir).expanduser()
  if not root.exists():
    raise DataError(f'data.text_dir={text_dir!r} does not exist; point it at a folder of .txt or '
                    '.jsonl files.')
  if not root.is_dir():
    raise DataError(f'data.text_dir={text_dir!r} is not a folder; point it at a folder of .txt or '
                    '.jsonl files.')
  if not os.access(root, os.R_OK | os.X_OK):
    raise DataError(f'data.text_dir={text_dir!r} cannot be read (permissions); fix its mode or '
                    'choose another folder.')
  files = sorted(
      p for p in root.rglob('*')
      if p.name.endswith(TEXT_SUFFIXES) and p.is_file()
      and not any(part.startswith('.') for part in p.relative_to(root).parts))
  if not files:
    raise DataError(f'data.text_dir={text_dir!r} holds no .txt or .jsonl files (searched '
                    'recursively); add some, or fix the path.')
  for p in files:
    if not os.access(p, os.R_OK):
      raise DataError(f'{p} cannot be read (permissions); fix its mode or remove it from '
                      f'data.text_dir={text_dir!r}.')
  return files


def _not_utf8(path: pathlib.Path, line: int, err: UnicodeDecodeError) -> DataError:
  return DataError(
      f'{path} is not UTF-8 text (line {line}: {err.reason} at byte {err.start} of that line); '
      'convert it, e.g. `iconv -f latin1 -t utf-8`, or move it out of data.text_dir.')


def iter_documents(root: pathlib.Path, path: pathlib.Path,
                   text_field: str) -> Iterator[tuple[str, str]]:
  """Yields (key, text) for each non-blank document of one file; raises naming file and line."""
  rel = path.relative_to(root).as_posix()
  opener = gzip.open if path.name.endswith('.gz') else open
  try:
    if path.name.endswith(('.txt', '.txt.gz')):
      with opener(path, 'rb') as f:
        data = f.read()
      try:
        text = data.decode('utf-8')
      except UnicodeDecodeError as e:
        line = data[:e.start].count(b'\n') + 1
        raise _not_utf8(path, line, e) from None
      if text.strip():
        yield rel, text
      return
    with opener(path, 'rb') as f:
      # Split on b'\n' only: str.splitlines would also split inside text at U+2028 and friends.
      for lineno, raw in enumerate(f, 1):
        try:
          line = raw.decode('utf-8')
        except UnicodeDecodeError as e:
          raise _not_utf8(path, lineno, e) from None
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f'{path}:{lineno} is not valid JSON ({e.msg}); each line of a JSON '
                          'lines file must be one JSON object.') from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
          raise DataError(f'{path}:{lineno} has no string field {text_field!r}; set '
                          'data.text_field to the field that holds the document text.')
        if obj[text_field].strip():
          yield f'{rel}:{lineno}', obj[text_field]
  except (OSError, EOFError) as e:
    raise DataError(f'{path} cannot be read ({e}); fix it or move it out of the folder.') from None


def _bucket(key: str) -> int:
  digest = hashlib.sha256(key.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') % _HASH_BUCKETS


class GpasTextFolder(tfds.core.GeneratorBasedBuilder):
  """Documents from a folder of text files, split into train/validation by hash or file name."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Folder of .txt (one document each) and .jsonl (one per line), '
                            'optionally gzipped.'}

  def __init__(self, *, text_dir: str = '', text_field: str = 'text',
               validation_percent: float = 2.0, validation_glob: str = '', **kwargs):
    """Only building needs text_dir; reading a prepared copy needs data_dir alone."""
    self._text_dir = text_dir
    self._text_field = text_field
    self._glob = validation_glob
    self._threshold = int(round(validation_percent * _HASH_BUCKETS / 100))
    super().__init__(**kwargs)

  # No checksums file ships with this builder; also skips a TFDS lookup of the code's folder
  # that needs the importlib_resources backport on Python >= 3.9.
  code_path = None

  # TFDS prints 'Downloading and preparing dataset Unknown size ...' and '... downloaded and
  # prepared' on stdout: wrong for a local build, which reports itself (sources._build).
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Documents from a folder of local text files (gpas_jax.data.builders).',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
    )

  def _documents(self, files: list[pathlib.Path],
                 split: bool | None = None) -> Iterator[tuple[str, bool, str]]:
    """Yields (key, whether it belongs to validation, text); split=True/False skips other files."""
    root = pathlib.Path(self._text_dir).expanduser()
    for path in files:
      by_name = fnmatch.fnmatch(path.name, self._glob) if self._glob else None
      if self._glob and split is not None and by_name != split:
        continue  # By-name split: the whole file belongs to the other split.
      for key, text in iter_documents(root, path, self._text_field):
        yield key, (by_name if self._glob else _bucket(key) < self._threshold), text

  def _scan(self, files: list[pathlib.Path]) -> str | None:
    """Validates every file before anything is written; returns a key forced into validation."""
    count, in_validation, smallest = 0, 0, None
    for key, is_validation, _ in self._documents(files):
      count += 1
      in_validation += is_validation
      if smallest is None or (_bucket(key), key) < smallest:
        smallest = (_bucket(key), key)
    if count < 2:
      raise DataError(f'data.text_dir={self._text_dir!r} holds {count} non-blank document(s); '
                      'at least 2 are needed (one for the validation split).')
    if self._glob and not 0 < in_validation < count:
      raise DataError(f'data.validation_glob={self._glob!r} matches the files of '
                      f'{in_validation} of {count} documents in data.text_dir={self._text_dir!r}; '
                      'both splits need documents. Fix the pattern (it matches file names).')
    return None if in_validation else smallest[1]

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the text is local.
    files = list_text_files(self._text_dir)
    forced = self._scan(files)
    return {
        'train': self._generate_examples(files=files, validation=False, forced=forced),
        'validation': self._generate_examples(files=files, validation=True, forced=forced),
    }

  def _generate_examples(self, files, validation, forced):
    split = 'validation' if validation else 'train'
    docs = console.progress(self._documents(files, validation), f'  {split} split',
                            unit='documents')
    for key, is_validation, text in docs:
      if (is_validation or key == forced) == validation:
        yield key, {'text': text}
