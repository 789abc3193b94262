"""Pre-tokenized rows (data.source='tokens'): train on exactly the token rows another trainer saw.

Files:
  .npy  an integer array [rows, max_length], each row a document padded with pad_id on the right
        (what the baseline's loader yields), or already-packed rows for the 'packed' layout.
  .bin  a flat token stream of data.tokens_dtype (uint16 or uint32, no header: the layout many GPT
        trainers write), documents separated by eos_id; cut into rows of max_length ('packed').
Order: global batch u is rows [u*B, (u+1)*B) (B = optim.global_batch_size); a host reads the
rows u*B + r for the global rows r its devices hold (runs of them, one ranged read each), so the
global batch keeps the file's row order on any host count and device order (chunk k of
optim.loss_chunks is rows [k*b, (k+1)*b) of it). After the last full batch the
rows start again from the top. The iterator's state is the next global batch index: a checkpoint
resumes exactly, on any host count.
Segment ids: 'padded' 1 on tokens, 0 on pad_id; 'packed' a new id after every eos_id (0 on pad_id).
"""

from collections.abc import Iterator
import io
from typing import Any

from absl import logging
import grain
import ml_collections
import numpy as np

from gpas_jax import storage
from gpas_jax.data.errors import DataError

_CHECK_ROWS = 1 << 16  # rows per block when scanning a file for out-of-range ids
_CHECKED: set[tuple] = set()


class Rows:
  """A token file as [rows, max_length], read by ranged reads (local or gs://, the same code).

  Only the rows asked for are read: each host of a pod reads its own part of each batch.
  """

  def __init__(self, path: str, offset: int, dtype: np.dtype, shape: tuple[int, int]):
    self.path, self.offset, self.dtype, self.shape = path, offset, np.dtype(dtype), shape
    self._row_bytes = shape[1] * self.dtype.itemsize
    self.check = None  # set for a bucket's file: the ids of each block read are checked

  def __len__(self) -> int:
    return self.shape[0]

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    """Every row (np.asarray of the whole file: a small file's tests and tools)."""
    rows = self[:]
    return rows if dtype is None else rows.astype(dtype)

  def __getitem__(self, rows: slice | int) -> np.ndarray:
    if isinstance(rows, (int, np.integer)):
      i = int(rows) + (self.shape[0] if rows < 0 else 0)
      return self[i:i + 1][0]
    start, stop, step = rows.indices(self.shape[0])
    if step != 1:
      raise IndexError('token rows are read as contiguous slices')
    n = max(0, stop - start)
    data = storage.read_range(self.path, self.offset + start * self._row_bytes,
                              n * self._row_bytes)
    block = np.frombuffer(data, self.dtype).reshape(n, self.shape[1])
    if self.check is not None and n:
      self.check(block, start)
    return block


def _npy_header(path: str, field: str) -> tuple[int, np.dtype, tuple[int, ...], bool]:
  """(data offset, dtype, shape, fortran order) of a .npy file, from its first bytes."""
  head = storage.read_range(path, 0, 1 << 16)
  f = io.BytesIO(head)
  try:
    major, _ = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if major == 1 else
            np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read(f)
  except ValueError as e:
    raise DataError(f'{field}={path!r} is not a plain .npy array ({e}).') from e
  if dtype.hasobject:
    raise DataError(f'{field}={path!r} is not a plain .npy array (it holds Python objects).')
  return f.tell(), dtype, shape, fortran


def load_rows(path: str, config: ml_collections.ConfigDict, field: str) -> Rows:
  """Opens a token file as [rows, max_length] and checks it; raises DataError naming it."""
  d = config.data
  length, vocab = d.max_length, config.model.vocab_size
  if not path:
    raise DataError(f"{field} is empty; data.source='tokens' needs a .npy [rows, max_length] "
                    'array or a flat .bin token stream.')
  if not storage.is_file(path):
    raise DataError(f'{field}={path!r} does not exist.')
  if path.endswith('.npy'):
    offset, dtype, shape, fortran = _npy_header(path, field)
    if len(shape) != 2 or not np.issubdtype(dtype, np.integer):
      raise DataError(f'{field}={path!r} holds a {dtype} array of shape {shape}; it '
                      'must be an integer array [rows, max_length].')
    if fortran and shape[0] > 1 and shape[1] > 1:
      raise DataError(f'{field}={path!r} is stored column-major (Fortran order); save it with '
                      'np.save(path, np.ascontiguousarray(rows)).')
    if shape[1] != length:
      raise DataError(f'{field}={path!r} has rows of {shape[1]} tokens but data.max_length='
                      f'{length}; set --config.data.max_length={shape[1]}.')
    rows = Rows(path, offset, dtype, (shape[0], shape[1]))
  elif path.endswith('.bin'):
    if d.layout != 'packed':
      raise DataError(f"{field}={path!r} is a flat token stream: it needs data.layout='packed' "
                      f"(data.layout={d.layout!r}); padded rows come as a .npy [rows, max_length].")
    dtype = np.dtype(d.tokens_dtype)
    size = storage.size(path)
    if size % dtype.itemsize:
      raise DataError(f'{field}={path!r} has {size} bytes, not a whole number of {dtype} tokens; '
                      'check data.tokens_dtype.')
    rows = Rows(path, 0, dtype, (size // dtype.itemsize // length, length))
  else:
    raise DataError(f'{field}={path!r}: the token file must end in .npy or .bin.')
  if len(rows) == 0:
    raise DataError(f'{field}={path!r} holds no full row of {length} tokens.')
  stat = storage.path(path).stat()
  key = (storage.absolute(path), stat.length, stat.mtime, rows.shape, vocab)
  if key not in _CHECKED:  # validation and the pipeline both open the file: scan it once
    # In a bucket each host reads only its rows: the first block is checked now, every batch
    # as it is read (Rows.check); a local file is scanned whole.
    _check_ids(rows, vocab, field, path, whole=not storage.is_url(path))
    _CHECKED.add(key)
  if storage.is_url(path):
    rows.check = lambda block, start: _check_block(block, start, vocab, field, path)
  return rows


def _check_block(block: np.ndarray, start: int, vocab: int, field: str, path: str) -> None:
  """Raises DataError if rows start.. hold an id outside the model's vocabulary."""
  lo, hi = int(block.min()), int(block.max())
  if lo < 0 or hi >= vocab:
    bad = start + int(np.argmax(((block < 0) | (block >= vocab)).any(axis=1)))
    raise DataError(f'{field}={path!r} row {bad} holds token id {hi if hi >= vocab else lo}, '
                    f'outside 0..model.vocab_size-1={vocab - 1}; the file was tokenized for '
                    'another vocabulary.')


def _check_ids(rows: Rows, vocab: int, field: str, path: str, whole: bool = True) -> None:
  """Raises DataError at the first block holding an id outside the model's vocabulary."""
  for start in range(0, len(rows) if whole else 1, _CHECK_ROWS):
    _check_block(np.asarray(rows[start:start + _CHECK_ROWS]), start, vocab, field, path)


def row_batch(ids_BxT: np.ndarray, layout: str, pad_id: int, eos_id: int) -> dict[str, np.ndarray]:
  """Token rows -> {'input_ids', 'segment_ids'} int32 in the trainer's layout convention."""
  ids = np.asarray(ids_BxT, np.int32)
  tokens = ids != pad_id
  if layout == 'packed':  # a document ends at its eos; the next one gets the next id
    starts = np.pad(ids[:, :-1] == eos_id, ((0, 0), (1, 0)))
    seg = (1 + np.cumsum(starts, axis=1)) * tokens
  else:
    seg = tokens
  return {'input_ids': ids, 'segment_ids': seg.astype(np.int32)}


class _HostBatches:
  """Random access to this host's part of global batch u (grain reads it by index)."""

  def __init__(self, rows: Rows, config: ml_collections.ConfigDict, mine: np.ndarray):
    d = config.data
    self._rows, self._b = rows, config.optim.global_batch_size
    # Runs of consecutive rows: [(first, end), ...], one ranged read each.
    cuts = np.flatnonzero(np.diff(mine) != 1) + 1
    self._runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(np.asarray(mine), cuts)]
    self._layout, self._pad, self._eos = d.layout, d.pad_id, d.eos_id
    self._batches = len(rows) // self._b

  def __len__(self) -> int:
    return self._batches

  def __getitem__(self, u: int) -> dict[str, np.ndarray]:
    start = (u % self._batches) * self._b
    ids = np.concatenate([self._rows[start + lo:start + hi] for lo, hi in self._runs])
    return row_batch(ids, self._layout, self._pad, self._eos)


def description(path: str, rows: Rows, layout: str) -> str:
  """What a checkpoint's data state records of the file (a resume must read the same rows)."""
  return f'tokens:{storage.absolute(path)}:{rows.shape[0]}x{rows.shape[1]}:{layout}'


def train_iterator(config: ml_collections.ConfigDict, host: int, hosts: int, mine: np.ndarray
                   ) -> tuple[grain.DatasetIterator, dict[str, Any]]:
  """This host's endless train batches over the token rows (its global rows `mine` of each
  batch), and the meta its state records."""
  d = config.data
  rows = load_rows(d.tokens_path, config, 'data.tokens_path')
  batch = config.optim.global_batch_size
  if len(rows) < batch:
    raise DataError(f'data.tokens_path={d.tokens_path!r} has {len(rows)} rows, fewer than one '
                    f'global batch (optim.global_batch_size={batch}).')
  source = _HostBatches(rows, config, mine)
  if len(source) * batch < len(rows):
    logging.warning('data.tokens_path has %d rows: the last %d (less than a batch) are not used.',
                    len(rows), len(rows) - len(source) * batch)
  ds = grain.MapDataset.source(source).repeat(None).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(1, d.prefetch_buffer_size)))
  meta = {'layout': 'tokens', 'dataset': description(d.tokens_path, rows, d.layout),
          'seed': 0, 'process_count': hosts, 'process_index': host,
          'global_batch_size': batch, 'max_length': d.max_length}
  return iter(ds), meta


class EvalRows:
  """The eval token rows in order, as global batches of data.eval_batch_size (re-iterable)."""

  def __init__(self, config: ml_collections.ConfigDict, size: int | None = None):
    d = config.data
    self.rows = load_rows(d.eval_tokens_path, config, 'data.eval_tokens_path')
    self.description = description(d.eval_tokens_path, self.rows, d.layout)
    self._size, self._layout, self._pad, self._eos = (size or d.eval_batch_size, d.layout,
                                                      d.pad_id, d.eos_id)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(self.rows), self._size):
      yield row_batch(self.rows[start:start + self._size], self._layout, self._pad, self._eos)
