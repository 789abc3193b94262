"""One way to touch storage: local paths and gs:// URLs alike, through etils.epath.

Every path a user passes (workdir, data_dir, tokenizer, token rows, init_from, sweep roots,
analysis outputs) may be a bucket URL. epath (what Orbax and TFDS use) reaches gs:// through
gcsfs; Orbax writes array data with tensorstore; ArrayRecord reads with its own GCS client.
Credentials: Application Default Credentials (a TPU VM's service account). For a local GCS
server set STORAGE_EMULATOR_HOST (google-cloud-storage, gcsfs) and TENSORSTORE_GCS_HTTP_URL
(tensorstore); `configure_clients` derives what the other clients need from those two.

An object store has no append and no rename: a JSON file is written in one upload (it lands
whole or not at all) and a JSON-lines log is kept in memory and rewritten (JsonlLog).
Non-finite floats are written as the strings 'nan' / 'inf' / '-inf' (strict JSON has no NaN)
and read back as floats.
"""

import io
import json
import math
import os
from typing import Any, Mapping
import urllib.parse

from absl import logging
from etils import epath

_NONFINITE = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf,
              'infinity': math.inf, '-infinity': -math.inf}


def is_url(path: Any) -> bool:
  """True for 'gs://bucket/...' (any scheme://), False for a local path."""
  return '://' in os.fspath(path)


def configure_clients() -> None:
  """Points every client at the GCS server that STORAGE_EMULATOR_HOST names, if any.

  gcsfs would first probe each bucket's type over gRPC (60 s against a JSON-only server), and
  ArrayRecord's C++ client reads its own variable. A user's own setting of either wins.
  """
  host = os.environ.get('STORAGE_EMULATOR_HOST', '')
  if host:
    os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
    if not host.startswith(('http://', 'https://')):
      host = 'http://' + host
    os.environ.setdefault('CLOUD_STORAGE_EMULATOR_ENDPOINT', host)
  if os.environ.get('TENSORSTORE_GCS_HTTP_URL'):
    # tensorstore asks for ADC unless given a token; a local server takes any.
    os.environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'local')


_AUTH_QUIETED = []


def quiet_tensorstore_auth(url: str) -> None:
  """Starts tensorstore's GCS auth with stderr closed, once, where the token is a local one.

  Its C++ logs 'Using GOOGLE_AUTH_TOKEN_FOR_TESTING' when its shared auth provider starts (no
  switch turns that INFO line off); with configure_clients' token that only ever means a local
  test server, so the provider is started here, by one read, with file descriptor 2 closed.
  """
  if _AUTH_QUIETED or not is_url(url) or not os.environ.get('GOOGLE_AUTH_TOKEN_FOR_TESTING'):
    return
  _AUTH_QUIETED.append(True)
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(null, 2)
    try:
      store = ts.KvStore.open({'driver': 'gcs', 'bucket': bucket_and_name(url)[0]}).result()
      store.read('gpas_jax-auth-probe').result()
    except Exception:  # pylint: disable=broad-except  # any answer will do: auth has started
      pass
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


def write_failure_hint(path: str, cause: str) -> str:
  """What to check when a write under `path` failed with `cause`: the disk for a local path; for
  a URL the bucket and its server (a server without object generations named as such)."""
  if not is_url(path):
    return 'Free disk space or fix the storage'
  if 'StorageGeneration' in cause:
    return ('The storage server sent no object generations, which checkpoint writes need (the '
            'bare gcp-storage-emulator does not; python -m gpas_jax.testing.gcs_server does): '
            'fix the server')
  server = os.environ.get('STORAGE_EMULATOR_HOST') or 'GCS'
  bucket = urllib.parse.urlparse(os.fspath(path)).netloc
  return (f'A storage failure: check that bucket {bucket} exists, that this host may write to '
          f'it, and that the storage server ({server}) is reachable')


def _no_listing_cache() -> None:
  """gcsfs caches folder listings forever by default; Orbax (tensorstore), the lock (the GCS
  client) and other hosts write to the same folders behind its back, so a cached listing would
  hide their files. Listings are read fresh."""
  import fsspec  # pylint: disable=import-outside-toplevel
  for protocol in ('gs', 'gcs'):
    fsspec.config.conf.setdefault(protocol, {}).setdefault('use_listings_cache', False)


configure_clients()
_no_listing_cache()


def path(p: Any) -> epath.Path:
  """The epath.Path of a local path (with ~ expanded) or a URL."""
  s = os.fspath(p)
  return epath.Path(s if is_url(s) else os.path.expanduser(s))


def absolute(p: Any) -> str:
  """A URL as given; a local path made absolute (for Orbax, messages and records)."""
  s = os.fspath(p)
  return s if is_url(s) else os.path.abspath(os.path.expanduser(s))


def join(base: Any, *parts: str) -> str:
  """base/part/...: a URL keeps its scheme (os.path.join would do the same, but says why)."""
  return os.path.join(os.fspath(base), *parts)


def bucket_and_name(url: str) -> tuple[str, str]:
  """('bkt', 'run/lock') of 'gs://bkt/run/lock'."""
  u = urllib.parse.urlparse(url)
  return u.netloc, u.path.lstrip('/')


def exists(p: Any) -> bool:
  """Whether a file or folder exists there."""
  return path(p).exists()


def is_file(p: Any) -> bool:
  """Whether a file (an object) exists there."""
  return path(p).is_file()


def is_dir(p: Any) -> bool:
  """Whether a folder (a prefix with objects under it) exists there."""
  return path(p).is_dir()


def makedirs(p: Any) -> None:
  """Creates a local folder and its parents (a no-op for a URL: prefixes need no creation)."""
  if not is_url(p):
    path(p).mkdir(parents=True, exist_ok=True)


def read_bytes(p: Any) -> bytes:
  """The whole file."""
  return path(p).read_bytes()


def read_text(p: Any) -> str:
  """The whole file as UTF-8."""
  return path(p).read_text(encoding='utf-8')


def read_range(p: Any, offset: int, size: int) -> bytes:
  """`size` bytes from `offset`: one ranged read, not the whole file."""
  with path(p).open('rb') as f:
    f.seek(offset)
    return f.read(size)


def size(p: Any) -> int:
  """The file's size in bytes."""
  return path(p).stat().length


def write_bytes(p: Any, data: bytes) -> None:
  """Writes the file whole or not at all: one upload for a URL, temp file + rename locally."""
  target = path(p)
  if is_url(p):
    target.write_bytes(data)
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f'{target.name}.tmp{os.getpid()}'
  tmp.write_bytes(data)
  tmp.replace(target)


def write_text(p: Any, text: str) -> None:
  """Writes UTF-8 text whole or not at all."""
  write_bytes(p, text.encode('utf-8'))


def remove(p: Any) -> None:
  """Deletes a file if it is there."""
  target = path(p)
  if target.exists():
    target.unlink()


def walk(root: Any) -> list[str]:
  """Every file under root, as paths relative to it, sorted (one listing per folder)."""
  base, out = path(root), []
  pending = [base]
  while pending:
    for child in pending.pop().iterdir():
      if child.is_dir():
        pending.append(child)
      else:
        out.append(os.path.relpath(os.fspath(child), os.fspath(base)))
  return sorted(out)


def copy_tree(src: Any, dst: Any) -> None:
  """Copies every file under src to the same place under dst (either may be a URL)."""
  for rel in walk(src):
    write_bytes(join(dst, rel), read_bytes(join(src, rel)))


def move_tree(src: Any, dst: Any) -> None:
  """Moves a folder: a rename locally; copy then delete in a bucket (which has no rename)."""
  if not is_url(src) and not is_url(dst):
    path(dst).parent.mkdir(parents=True, exist_ok=True)
    os.replace(os.fspath(path(src)), os.fspath(path(dst)))
    return
  copy_tree(src, dst)
  path(src).rmtree()


def _decode(value: Any) -> Any:
  """Turns the strings 'nan' / 'inf' / '-inf' back into floats, in lists and dicts too."""
  if isinstance(value, str):
    return _NONFINITE.get(value.lower(), value)
  if isinstance(value, list):
    return [_decode(v) for v in value]
  if isinstance(value, dict):
    return {k: _decode(v) for k, v in value.items()}
  return value


def encode(value: Any) -> Any:
  """Writes non-finite floats as strings, since strict JSON has no NaN or Infinity."""
  if isinstance(value, float) and not math.isfinite(value):
    return 'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')
  if isinstance(value, (list, tuple)):
    return [encode(v) for v in value]
  if isinstance(value, dict):
    return {k: encode(v) for k, v in value.items()}
  return value


def dumps_record(record: Mapping[str, Any]) -> str:
  """One JSON line (without its newline), non-finite floats as strings."""
  return json.dumps(encode(dict(record)))


def read_json(p: Any) -> dict[str, Any] | None:
  """The decoded JSON object in `p`, or None when the file does not exist."""
  target = path(p)
  if not target.exists():
    return None
  return _decode(json.loads(target.read_text(encoding='utf-8')))


def write_json(p: Any, obj: Any) -> None:
  """Writes `obj` as indented JSON, whole or not at all."""
  write_text(p, json.dumps(encode(obj), indent=2))


def parse_jsonl(text: str, where: str = '') -> list[dict[str, Any]]:
  """The records of JSON-lines text in order; skips a torn line (a run killed mid-write)."""
  out = []
  for n, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line:
      continue
    try:
      out.append(_decode(json.loads(line)))
    except json.JSONDecodeError:
      logging.warning('%s:%d is not valid JSON; skipped.', where, n)
  return out


def read_jsonl(p: Any) -> list[dict[str, Any]]:
  """Every record of a .jsonl file in file order ([] if absent); skips a torn line."""
  target = path(p)
  if not target.exists():
    return []
  return parse_jsonl(target.read_text(encoding='utf-8'), os.fspath(p))


def append_jsonl(p: Any, record: Mapping[str, Any]) -> None:
  """Appends one record: a real append locally; read, add, rewrite in a bucket."""
  line = dumps_record(record) + '\n'
  if is_url(p):
    old = read_text(p) if exists(p) else ''
    write_text(p, old + line)
    return
  makedirs(os.path.dirname(os.fspath(p)) or '.')
  with path(p).open('a', encoding='utf-8') as f:
    f.write(line)


class JsonlLog:
  """A JSON-lines log that survives a kill: appended and flushed per record on a local disk;
  in a bucket (no append) kept in memory and rewritten by flush(), which the trainer calls at
  every checkpoint save and at the end, so a kill loses at most the records since the last
  save (the resumed run writes those steps again)."""

  def __init__(self, p: Any, keep_through_step: int | None = None):
    """Opens the log; records after `keep_through_step` (a resume's start) are dropped."""
    self.path, self._remote = os.fspath(p), is_url(p)
    records = read_jsonl(p) if keep_through_step is not None else None
    if records is not None and any(r.get('step', 0) > keep_through_step for r in records):
      # steps past the restored checkpoint are trained again: their old records would repeat
      kept = [r for r in records if r.get('step', 0) <= keep_through_step]
      write_text(p, ''.join(dumps_record(r) + '\n' for r in kept))
    if self._remote:
      self._text = io.StringIO()
      self._text.write(read_text(p) if exists(p) else '')
      self._file = None
    else:
      makedirs(os.path.dirname(self.path) or '.')
      self._file = path(p).open('a', encoding='utf-8')

  def write(self, record: Mapping[str, Any]) -> None:
    """Adds one record (strict JSON: the caller has made every value finite or a string)."""
    line = json.dumps(dict(record), allow_nan=False) + '\n'
    if self._file is not None:
      self._file.write(line)
      self._file.flush()  # a crash or preemption keeps every line written so far
    else:
      self._text.write(line)

  def flush(self) -> None:
    """Makes every record so far durable (one upload for a bucket)."""
    if self._file is not None:
      self._file.flush()
    else:
      write_text(self.path, self._text.getvalue())

  def close(self) -> None:
    """Flushes and closes."""
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None


_CLIENT: Any = None


def gcs_client() -> Any:
  """A google-cloud-storage client: anonymous against a local server, else ADC (cached)."""
  global _CLIENT
  if _CLIENT is None:
    from google.cloud import storage as gcs  # pylint: disable=import-outside-toplevel
    if os.environ.get('STORAGE_EMULATOR_HOST'):
      from google.auth.credentials import AnonymousCredentials  # pylint: disable=import-outside-toplevel
      _CLIENT = gcs.Client(project='local', credentials=AnonymousCredentials())
    else:
      _CLIENT = gcs.Client()
  return _CLIENT


def check_writable(url: str) -> None:
  """Raises OSError naming the bucket when it does not exist or refuses a write."""
  bucket, name = bucket_and_name(url)
  probe = f'{name.rstrip("/")}/.gpas_jax_write_probe'.lstrip('/')
  try:
    blob = gcs_client().bucket(bucket).blob(probe)
    blob.upload_from_string(b'', timeout=20, retry=None)  # a missing bucket: say so at once
    blob.delete(timeout=20)
  except Exception as e:  # pylint: disable=broad-except
    reason = getattr(e, 'message', None) or ' '.join(str(e).split())[:200]
    raise OSError(f'gs://{bucket} cannot be written ({type(e).__name__}: {reason}); check that '
                  'the bucket exists and that these credentials may write to it.') from e
