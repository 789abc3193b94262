"""Finds, builds (once, cached) and opens the ArrayRecord split that a config names.

Three sources, all read through TFDS as random-access ArrayRecord data sources (no TensorFlow):
  'tfds'        a prepared TFDS dataset, e.g. c4/en:3.1.0, under data.data_dir;
  'text_folder' data.text_dir built by builders.GpasTextFolder into the cache;
  'embedded'    the corpus of corpus.py built by the same builder into the cache.
Cache layout under data.cache_dir (default ~/.cache/gpas_jax):
  corpus/<python tag>/*.jsonl              the embedded corpus text
  tfds/embedded-<python tag>/gpas_text_folder/1.0.0/   its ArrayRecord dataset
  tfds/text_folder-<fingerprint>/gpas_text_folder/1.0.0/  a text folder's (fingerprint: path,
                                           field, split rule, names, sizes, mtimes)
"""

from collections.abc import Iterator
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

from absl import logging
from etils import epath
import ml_collections
import tensorflow_datasets as tfds

from gpas_jax.data import builders
from gpas_jax.data import corpus
from gpas_jax.data.errors import DataError
from gpas_jax.runtime import console

EMBEDDED_VALIDATION_PERCENT = 5.0
_BUILDER_DIR = f'{builders.GpasTextFolder.name}/{builders.GpasTextFolder.VERSION}'


@dataclasses.dataclass(frozen=True)
class Split:
  """One readable split: a random-access source of records and the field holding the text."""
  source: Any  # tfds ArrayRecordDataSource: len() and [i] -> dict of bytes/str.
  text_field: str
  description: str  # Stable identity of the data, stored in iterator states.


def cache_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
  """Returns data.cache_dir, or ~/.cache/gpas_jax when it is empty."""
  return pathlib.Path(config.data.cache_dir or '~/.cache/gpas_jax').expanduser()


@contextlib.contextmanager
def locked(lock_path: pathlib.Path) -> Iterator[None]:
  """Serialises builds of one cache entry across processes (pytest-xdist, hosts sharing a disk)."""
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
  except ImportError:  # Not POSIX: builds are still atomic renames, just not serialised.
    yield
    return
  with open(lock_path, 'a+') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _build(data_dir: pathlib.Path, what: str = 'a dataset', **builder_kwargs) -> pathlib.Path:
  with locked(data_dir.with_name(data_dir.name + '.lock')), _tfds_quiet():
    builder = builders.GpasTextFolder(data_dir=str(data_dir), file_format='array_record',
                                      **builder_kwargs)
    if not builder.is_prepared():
      with console.timed(f'building {what} into {data_dir} (once; cached)'):
        builder.download_and_prepare()
  return data_dir / _BUILDER_DIR


@contextlib.contextmanager
def _tfds_quiet() -> Iterator[None]:
  """Silences TFDS's progress bars and log lines for a build (it reports itself), unless
  --verbosity asks for them."""
  if console.verbose():
    yield
    return
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # e.g. 'Variant folder ... has no dataset_info.json'
  tfds.disable_progress_bar()
  try:
    yield
  finally:
    tfds.enable_progress_bar()
    logging.set_verbosity(level)


def prepare_embedded(cache: pathlib.Path) -> pathlib.Path:
  """Builds the embedded corpus dataset once into the cache; returns its dataset folder."""
  tag = corpus.python_tag()
  data_dir = cache / 'tfds' / f'embedded-{tag}'
  if (data_dir / _BUILDER_DIR / 'dataset_info.json').exists():
    return data_dir / _BUILDER_DIR
  text_dir = cache / 'corpus' / tag
  with locked(cache / 'corpus' / f'{tag}.lock'):
    corpus.write_embedded_corpus(text_dir)
  return _build(data_dir, what='the embedded corpus', text_dir=str(text_dir), text_field='text',
                validation_percent=EMBEDDED_VALIDATION_PERCENT)


def folder_fingerprint(text_dir: str, text_field: str, validation_percent: float,
                       validation_glob: str = '') -> str:
  """Returns a short hash of what a text-folder build depends on; edits change it."""
  root = pathlib.Path(text_dir).expanduser().resolve()
  files = builders.list_text_files(str(root))  # under root, so relative_to holds
  listing = [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
             for p in files]
  blob = json.dumps([str(root), text_field, validation_percent, validation_glob,
                     str(builders.GpasTextFolder.VERSION), listing])
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_text_folder(cache: pathlib.Path, text_dir: str, text_field: str,
                        validation_percent: float, validation_glob: str = '') -> pathlib.Path:
  """Builds a text folder's dataset once into the cache; returns its dataset folder."""
  # Relative to the working directory (the one path rule); the build lists files under it.
  text_dir = os.path.abspath(os.path.expanduser(text_dir))
  fp = folder_fingerprint(text_dir, text_field, validation_percent, validation_glob)
  data_dir = cache / 'tfds' / f'text_folder-{fp}'
  if (data_dir / _BUILDER_DIR / 'dataset_info.json').exists():
    return data_dir / _BUILDER_DIR
  return _build(data_dir, what=f'the text folder {text_dir}', text_dir=text_dir,
                text_field=text_field, validation_percent=validation_percent,
                validation_glob=validation_glob)


def tfds_data_dir(config: ml_collections.ConfigDict) -> epath.Path:
  """Returns data.data_dir, or TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  d = config.data.data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
  return epath.Path(d).expanduser()  # epath: also gs:// and other remote file systems.


def find_tfds_dataset(name: str, data_dir: epath.Path) -> epath.Path:
  """Returns the folder of a prepared dataset 'name[/config][:version]', or raises with the fix."""
  base, _, version = name.partition(':')
  build_cmd = (f'`tfds build {base} --file_format=array_record --data_dir={data_dir}` on a machine '
               'with TensorFlow (and Apache Beam for c4), or copy prepared files there; see '
               'docs/DATA.md')
  if not data_dir.is_dir():
    raise DataError(f'data.data_dir={str(data_dir)!r} does not exist. Prepare {name} there with '
                    f'{build_cmd}, or fix data.data_dir.')
  ds_dir = data_dir / base
  if version:
    candidates = [ds_dir / version]
  else:  # Like TFDS: the newest prepared version.
    found = [p for p in ds_dir.glob('*') if (p / 'dataset_info.json').exists()]
    candidates = sorted(found, key=lambda p: tfds.core.Version(p.name) if
                        tfds.core.Version.is_valid(p.name) else tfds.core.Version('0.0.0'))[-1:]
  if not candidates or not (candidates[0] / 'dataset_info.json').exists():
    infos = [p for pattern in ('*/*/dataset_info.json', '*/*/*/dataset_info.json')
             for p in data_dir.glob(pattern)]  # name/version and name/config/version
    prepared = sorted(str(p.parent.relative_to(data_dir)) for p in infos)[:10]
    raise DataError(
        f'data.tfds_name={name!r} is not prepared in data.data_dir={str(data_dir)!r} (no '
        f'{ds_dir / (version or "<version>")}/dataset_info.json; prepared there: '
        f'{", ".join(prepared) or "nothing"}). Prepare it with {build_cmd}; or fix '
        'data.tfds_name / data.data_dir.')
  return candidates[0]


def _open_builder(ds_dir: epath.Path | pathlib.Path, label: str, split: str, text_field: str) -> Split:
  """Opens one split of a prepared dataset folder, checking format, split and field first."""
  builder = tfds.builder_from_directory(str(ds_dir))
  info = builder.info
  formats = info.available_file_formats()
  if tfds.core.FileFormat.ARRAY_RECORD not in formats:
    have = ', '.join(sorted(f.value for f in formats)) or 'no known format'
    raise DataError(
        f'{ds_dir} holds {have} files; reading without TensorFlow needs ArrayRecord. Convert it '
        f'with `tfds convert_format --dataset_version_dir={ds_dir} '
        '--out_file_format=array_record` (needs TensorFlow to read TFRecords) or rebuild with '
        '--file_format=array_record.')
  base_split = split.split('[')[0]
  if base_split not in info.splits:
    raise DataError(f'{label} has no split {base_split!r} (it has: {", ".join(info.splits)}); '
                    'fix data.train_split / data.eval_split.')
  if text_field not in info.features:
    raise DataError(f'{label} has no feature {text_field!r} (it has: '
                    f'{", ".join(info.features)}); set data.text_field.')
  source = builder.as_data_source(split=split, file_format='array_record')
  if not len(source):  # pylint: disable=g-explicit-length-test
    raise DataError(f'{label} split {split!r} is empty; choose another split.')
  return Split(source, text_field, f'{label}|{split}|{len(source)}')


def check_source(config: ml_collections.ConfigDict) -> None:
  """Cheap checks that the configured source exists (no building); raises DataError."""
  d = config.data
  if d.source == 'tfds':
    find_tfds_dataset(d.tfds_name, tfds_data_dir(config))
  elif d.source == 'text_folder':
    builders.list_text_files(d.text_dir)


def open_split(config: ml_collections.ConfigDict, split: str) -> Split:
  """Opens (building into the cache first if needed) the named split of the configured source."""
  d = config.data
  cache = cache_dir(config)
  if d.source == 'tfds':
    ds_dir = find_tfds_dataset(d.tfds_name, tfds_data_dir(config))
    return _open_builder(ds_dir, f'tfds:{d.tfds_name}', split, d.text_field)
  if d.source == 'text_folder':
    ds_dir = prepare_text_folder(cache, d.text_dir, d.text_field,
                                 float(d.get('validation_percent', 2.0)),
                                 d.get('validation_glob', ''))
    return _open_builder(ds_dir, f'text_folder:{ds_dir.parent.parent.name}', split, 'text')
  if d.source == 'embedded':
    ds_dir = prepare_embedded(cache)
    return _open_builder(ds_dir, f'embedded:{corpus.python_tag()}', split, 'text')
  raise DataError(f"data.source={d.source!r} is not one of 'embedded', 'tfds', 'text_folder'.")


def record_text(record: Any, text_field: str) -> str:
  """Returns the document text of one record (TFDS gives Text features as UTF-8 bytes)."""
  value = record[text_field] if isinstance(record, dict) else record
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)
