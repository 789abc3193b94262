"""grain pipelines: the resumable, host-sharded train iterator and the fixed eval batches.

Rows: each host reads exactly the global rows of a batch that its own devices hold (`rows`, from
sharding.host_rows; by default the contiguous block [h*B/P, (h+1)*B/P)), so global row r of a
batch is the same stream row on any host count and any device order.

Train: the split is shuffled globally with a seeded permutation that changes every epoch and is
repeated forever (`MapDataset.shuffle(seed).repeat(None)`); this global document stream is the
same on every host.
  'padded': global batch k holds the documents at stream positions [k*B, (k+1)*B) in order; a
    host reads positions k*B + r for its rows r. The whole pipeline is random access, so its
    state is just the next global position (as grain's ElasticIterator wrote it): a checkpoint
    resumes on any host count, device order or worker count.
  'packed': host h packs the stream positions h, h+P, h+2P, ... on its own, so its rows depend
    on P by design; restoring it under another host count raises DataError naming both counts.
Tokenization runs in worker processes (grain mp_prefetch) when data.worker_count resolves to
more than 0 (-1: chosen from the host's cores, workers.py); the batches are the same for any
worker count. Each batch is a dict of numpy int32[rows, max_length] 'input_ids' and
'segment_ids'; see layouts.py for the layouts and the loss convention.

Eval: the eval split in stored order (TFDS wrote it in a fixed hash order), laid out like
training, cut into global batches of eval_batch_size rows, of which a host keeps its rows. Every
host reads the whole global stream (so all hosts agree on the number of batches without
communicating, and the eval set is the same for any host count) and stops after the first global
batch at which the running count of non-pad tokens (segment_ids != 0) reaches eval_tokens, or at
the end of the split; a last partial global batch is filled with pad rows (pad_id, segment_ids
0), which add nothing to the loss. The first pass tokenizes; its rows are kept in memory, so
every later eval of the run reads them back instead of tokenizing again.
"""

from collections.abc import Iterator
from typing import Any

from absl import flags
from absl import logging
import grain
import ml_collections
import numpy as np

from gpas_jax.data.errors import DataError
from gpas_jax.data import layouts
from gpas_jax.data import sources
from gpas_jax.data import tokenizer as tokenizer_lib
from gpas_jax.data import tokens
from gpas_jax.data import validate
from gpas_jax.data import workers as workers_lib

STATE_VERSION = 1
# What a saved train state must agree on with the config to replay exactly, per layout. Padded
# states are positions in the global document stream, so they survive other changes.
_MUST_MATCH = {
    'padded': ('layout', 'dataset', 'seed'),
    'packed': ('layout', 'dataset', 'seed', 'process_count', 'process_index', 'worker_count',
               'global_batch_size', 'max_length', 'tokenizer'),
    # data.source='tokens': the state is a global batch index into the same rows.
    'tokens': ('layout', 'dataset', 'global_batch_size'),
}


def _hosts(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_count is None or process_index is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} is outside 0..process_count-1='
                    f'{process_count - 1}.')
  return process_index, process_count


def _host_rows(total: int, field: str, h: int, p: int, rows: Any = None) -> np.ndarray:
  """This host's global rows of a batch of `total`: `rows` as given, else its contiguous block."""
  if total <= 0 or total % p:
    raise DataError(f'{field}={total} cannot be split evenly over {p} hosts; make it '
                    f'a positive multiple of {p}.')
  if rows is None:
    return np.arange(h * total // p, (h + 1) * total // p)
  rows = np.asarray(rows, np.int64)
  if rows.ndim != 1 or not len(rows) or np.any(np.diff(rows) <= 0) or rows[0] < 0 or (
      rows[-1] >= total):
    raise DataError(f'host rows {rows.tolist()[:8]}... are not ascending rows of 0..{total - 1}.')
  return rows


def _read_options(elements: int) -> grain.ReadOptions:
  # One reader thread: tokenization holds the GIL, so more threads only contend with the trainer.
  return grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(1, elements))


def _mp_options(config: ml_collections.ConfigDict) -> grain.MultiprocessingOptions | None:
  workers = workers_lib.resolve(config.data.worker_count)
  if workers <= 0:
    return None
  if not flags.FLAGS.is_parsed():
    # grain's worker launcher reads its absl flags; outside absl.app (tests, notebooks) they are
    # unparsed, so take their defaults.
    flags.FLAGS.mark_as_parsed()
  return grain.MultiprocessingOptions(num_workers=workers,
                                      per_worker_buffer_size=config.data.prefetch_buffer_size)


def _fix_tuples(state: Any) -> Any:
  """Undoes JSON's tuple -> list on ConcatThenSplit's slice pairs, which it compares to tuples."""
  if isinstance(state, dict):
    return {k: ({f: tuple(v) for f, v in s.items()} if k == 'remainder_slices' else _fix_tuples(s))
            for k, s in state.items()}
  if isinstance(state, list):
    return [_fix_tuples(s) for s in state]
  return state


class TrainIterator(grain.DatasetIterator):
  """This host's endless train batches; get_state() is JSON-serialisable and set_state() replays."""

  def __init__(self, inner: grain.DatasetIterator, meta: dict[str, Any]):
    super().__init__(inner)
    self._meta = meta
    self._batches = 0

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    self._batches += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """Returns {'version', 'meta', 'batches', 'inner'}; store it with the checkpoint."""
    return {'version': STATE_VERSION, 'meta': dict(self._meta), 'batches': self._batches,
            'inner': self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a saved state; raises DataError when it cannot replay under this config."""
    if state.get('version') != STATE_VERSION:
      raise DataError(f'data iterator state version {state.get("version")!r} is not '
                      f'{STATE_VERSION}; it was written by another version of gpas_jax.data.')
    saved, now = state['meta'], self._meta
    layout = now['layout']
    if saved.get('process_count') != now['process_count'] and layout == 'packed':
      raise DataError(
          f"The checkpoint's data state was saved with {saved.get('process_count')} hosts "
          f"(processes) and this run has {now['process_count']}; the 'packed' layout packs "
          "per host, so it can only resume on the same host count. Resume with "
          f"{saved.get('process_count')} hosts, or use data.layout='padded', which resumes on "
          'any host count.')
    for key in _MUST_MATCH[layout]:
      if saved.get(key) != now[key]:
        raise DataError(
            f"The checkpoint's data state has {key}={saved.get(key)!r} but this run has "
            f'{key}={now[key]!r}; the {layout!r} pipeline cannot replay the same batches. '
            'Restore the original data config, or start the data stream afresh.')
    self._parent.set_state(_fix_tuples(state['inner']))
    self._batches = state['batches']
    if saved.get('process_count') != now['process_count']:
      logging.info('Resuming the padded data stream on %d hosts (saved on %d).',
                   now['process_count'], saved.get('process_count'))


def _shuffled_documents(split: sources.Split, seed: int) -> grain.MapDataset:
  return grain.MapDataset.source(split.source).shuffle(seed % 2**32).repeat(None)


class _HostRows(grain.MapDataset):
  """Element i: row rows[i % n] of global batch i // n, i.e. stream position (i // n)*B + r."""

  def __init__(self, parent: grain.MapDataset, batch: int, rows: np.ndarray):
    super().__init__(parent)
    self._batch, self._rows = batch, [int(r) for r in rows]

  def __len__(self) -> int:
    return len(self._parent) // self._batch * len(self._rows)

  def __str__(self) -> str:
    return f'_HostRows(batch={self._batch}, rows={len(self._rows)})'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    k, j = divmod(index, len(self._rows))
    return self._parent[k * self._batch + self._rows[j]]


class _PaddedStream(grain.DatasetIterator):
  """This host's rows of each global batch of the padded layout, from any global position.

  The state is grain's ElasticIterator's ({'global_next_index': k*B}), so checkpoints of either
  resume with the other.
  """

  def __init__(self, rows_ds: grain.MapDataset, batch: int, config: ml_collections.ConfigDict):
    super().__init__()
    self._rows_ds, self._batch, self._config = rows_ds, batch, config
    self._next, self._it = 0, None

  def _start(self) -> Iterator[dict[str, np.ndarray]]:
    d = self._config.data
    ds = self._rows_ds[self._next // self._batch:].to_iter_dataset(
        _read_options(d.prefetch_buffer_size))
    options = _mp_options(self._config)
    return iter(ds.mp_prefetch(options) if options is not None else ds)

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self._start()
    batch = next(self._it)
    self._next += self._batch
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'global_next_index': self._next}

  def set_state(self, state: dict[str, Any]) -> None:
    self._next, self._it = int(state['global_next_index']), None


def make_train_iterator(config: ml_collections.ConfigDict, process_index: int | None = None,
                        process_count: int | None = None, rows: Any = None) -> TrainIterator:
  """Returns this host's endless train batches: its `rows` of each global batch (ascending
  global row indices, sharding.host_rows of the batch sharding; default its contiguous block)."""
  h, p = _hosts(process_index, process_count)
  validate.validate_data(config, p)
  d = config.data
  global_batch = config.optim.global_batch_size
  rows = _host_rows(global_batch, 'optim.global_batch_size', h, p, rows)
  if d.source == 'tokens':
    return TrainIterator(*tokens.train_iterator(config, h, p, rows))
  sp = tokenizer_lib.get_tokenizer(config)
  tokenizer_lib.check_tokenizer(sp, config, f'tokenizer {d.tokenizer or "(default)"}')
  split = sources.open_split(config, d.train_split)
  seed = int(d.get('seed', config.seed))
  tokenize = layouts.TokenizeDocument(sp, split.text_field, d.eos_id)
  docs = _shuffled_documents(split, seed)
  if d.layout == 'padded':
    ds = _HostRows(docs, global_batch, rows).map(
        layouts.PaddedRow(tokenize, d.max_length, d.pad_id)).batch(len(rows))
    inner = _PaddedStream(ds, global_batch, config)
  elif d.layout == 'packed':
    it = layouts.tokenized_documents(docs[h::p], sp, split.text_field, d.eos_id,
                                     _read_options(d.prefetch_buffer_size), _mp_options(config))
    it = layouts.pack(it, d.max_length, d.pad_id).batch(len(rows), drop_remainder=True)
    it = grain.experimental.ThreadPrefetchIterDataset(
        it, prefetch_buffer_size=max(1, d.prefetch_buffer_size))
    inner = iter(it)
  else:
    raise DataError(f"data.layout={d.layout!r} is not one of 'padded', 'packed'.")
  meta = {'layout': d.layout, 'dataset': split.description, 'seed': seed, 'process_count': p,
          'process_index': h, 'worker_count': workers_lib.resolve(d.worker_count),
          'global_batch_size': global_batch,
          'max_length': d.max_length, 'tokenizer': tokenizer_lib.fingerprint(sp)}
  return TrainIterator(inner, meta)


class EvalBatches:
  """A re-iterable view of this host's eval batches: tokenized on the first pass, then kept."""

  def __init__(self, config: ml_collections.ConfigDict, process_index: int, process_count: int,
               rows: int | None = None, host_rows: Any = None):
    d = config.data
    self._global = rows or d.eval_batch_size
    self._rows = _host_rows(self._global, 'data.eval_batch_size', process_index, process_count,
                            host_rows)
    self._budget = d.eval_tokens
    self._layout, self._length, self._pad_id, self._eos_id = (
        d.layout, d.max_length, d.pad_id, d.eos_id)
    self._kept: list[dict[str, np.ndarray]] | None = None
    self._token_rows = tokens.EvalRows(config, self._global) if d.source == 'tokens' else None
    if self._token_rows is not None:
      self._description = self._token_rows.description
      return
    self._read_options = _read_options(d.prefetch_buffer_size)
    self._mp_options = _mp_options(config)
    self._sp = tokenizer_lib.get_tokenizer(config)
    tokenizer_lib.check_tokenizer(self._sp, config, f'tokenizer {d.tokenizer or "(default)"}')
    self._split = sources.open_split(config, d.eval_split)
    self._description = self._split.description

  def _global_batches(self) -> Iterator[dict[str, np.ndarray]]:
    if self._token_rows is not None:
      return iter(self._token_rows)
    it = layouts.tokenized_documents(
        grain.MapDataset.source(self._split.source), self._sp, self._split.text_field,
        self._eos_id, self._read_options, self._mp_options)
    if self._layout == 'packed':
      it = layouts.pack(it, self._length, self._pad_id)
    else:
      length, pad_id = self._length, self._pad_id
      it = it.map(lambda doc: layouts.padded_row(doc['input_ids'], length, pad_id))
    return it.batch(self._global, drop_remainder=False)

  def _first_pass(self) -> Iterator[dict[str, np.ndarray]]:
    seen, kept = 0, []
    it = iter(self._global_batches())
    try:
      for batch in it:
        short = self._global - len(batch['input_ids'])
        if short:  # The split ended inside this batch: fill it with rows that carry no loss.
          batch = {'input_ids': np.pad(batch['input_ids'], ((0, short), (0, 0)),
                                       constant_values=self._pad_id),
                   'segment_ids': np.pad(batch['segment_ids'], ((0, short), (0, 0)))}
        seen += int(np.count_nonzero(batch['segment_ids']))
        mine = {k: np.ascontiguousarray(v[self._rows]) for k, v in batch.items()}
        kept.append(mine)
        yield mine
        if seen >= self._budget:
          break
      else:
        logging.info('Eval split %s ran out at %d of data.eval_tokens=%d non-pad tokens.',
                     self._description, seen, self._budget)
      self._kept = kept  # only a whole pass is kept: a cut one tokenizes again next time
    finally:
      it.close()

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return iter(self._kept) if self._kept is not None else self._first_pass()


def make_eval_batches(config: ml_collections.ConfigDict, process_index: int | None = None,
                      process_count: int | None = None, rows: int | None = None,
                      host_rows: Any = None) -> EvalBatches | None:
  """Returns a re-iterable of this host's eval batches (its host_rows of each global batch).

  rows: global rows per batch instead of eval_batch_size (steps.eval_rows: whole eval_batch_size
  batches that split over the mesh). host_rows: this host's rows of them (sharding.host_rows;
  default its contiguous block).

  None for data.source='tokens' without data.eval_tokens_path: such a run has no eval set.
  """
  h, p = _hosts(process_index, process_count)
  validate.validate_data(config, p)
  if config.data.source == 'tokens' and not config.data.eval_tokens_path:
    return None
  return EvalBatches(config, h, p, rows, host_rows)
