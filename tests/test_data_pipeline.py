"""grain pipelines: layouts, resumable iterator state, host sharding, epochs, eval, bad config."""

import json
import pathlib

import grain
import numpy as np
import pytest

from configs import tiny
from gpas_jax.data.errors import DataError
from gpas_jax.data import get_tokenizer
from gpas_jax.data import layouts
from gpas_jax.data import loss_mask
from gpas_jax.data import make_eval_batches
from gpas_jax.data import make_train_iterator
from gpas_jax.data import sources
from gpas_jax.data import validate_data


@pytest.fixture(scope='module')
def numbered(tmp_path_factory) -> pathlib.Path:
  """A folder of 60 short, distinct documents, so rows can be traced back to documents."""
  folder = tmp_path_factory.mktemp('numbered')
  words = 'alpha beta gamma delta epsilon zeta eta theta'.split()
  with open(folder / 'docs.jsonl', 'w', encoding='utf-8') as f:
    for i in range(60):
      f.write(json.dumps({'text': f'doc{i:03d} ' + ' '.join(words[:1 + i % 8])}) + '\n')
  return folder


def _config(cache_dir, batch=16, **data):
  c = tiny.get_config()
  c.data.cache_dir = str(cache_dir)
  c.optim.global_batch_size = batch
  for k, v in data.items():
    c.data[k] = v
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return len(a) == len(b) and all(
      set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _row_texts(sp, batch):
  """Decodes each padded row's document (the tokens before its eos)."""
  out = []
  for ids_L, seg_L in zip(batch['input_ids'], batch['segment_ids']):
    n = int(seg_L.sum())
    assert ids_L[n - 1] == 1 and not seg_L[n:].any()
    out.append(sp.decode(ids_L[:n - 1].tolist()))
  return out


def test_padded_layout_rules():
  doc = np.array([5, 6, 7, 1], np.int32)  # 3 tokens + eos
  row = layouts.padded_row(doc, 6, pad_id=9)
  assert row['input_ids'].tolist() == [5, 6, 7, 1, 9, 9]
  assert row['segment_ids'].tolist() == [1, 1, 1, 1, 0, 0]
  exact = layouts.padded_row(np.array([5, 6, 7, 8, 9, 1], np.int32), 6, pad_id=0)
  assert exact['input_ids'].tolist() == [5, 6, 7, 8, 9, 1] and exact['segment_ids'].all()
  long = layouts.padded_row(np.arange(10, 30, dtype=np.int32).tolist() + [1], 6, pad_id=0)
  assert long['input_ids'].tolist() == [10, 11, 12, 13, 14, 1]  # tokens[:L-1] + [eos]
  assert row['input_ids'].dtype == np.int32 and row['segment_ids'].dtype == np.int32
  mask = loss_mask(row['segment_ids'][None])
  assert mask.tolist() == [[True, True, True, False, False]]  # 5->6, 6->7, 7->eos


def test_packed_layout_wastes_nothing_and_numbers_segments():
  docs = [np.array(d + [1], np.int32) for d in ([3, 4], [5, 6, 7, 8, 9, 10], [11], [12, 13])]
  rows = list(layouts.pack(grain.MapDataset.source(
      [{'input_ids': d} for d in docs]).to_iter_dataset(), max_length=5, pad_id=9))
  ids = np.stack([r['input_ids'] for r in rows])
  seg = np.stack([r['segment_ids'] for r in rows])
  assert ids.tolist() == [[3, 4, 1, 5, 6], [7, 8, 9, 10, 1], [11, 1, 12, 13, 1]]
  assert seg.tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 1], [1, 1, 2, 2, 2]]
  assert np.concatenate(docs).tolist() == ids[seg != 0].tolist()  # No token lost or padded.
  mask = loss_mask(seg)
  assert mask[0].tolist() == [True, True, False, True]  # No prediction across documents.
  # A final partial row is padded with pad_id and segment 0.
  tail = list(layouts.pack(grain.MapDataset.source([{'input_ids': docs[0]}]).to_iter_dataset(),
                           max_length=5, pad_id=9))
  assert tail[0]['input_ids'].tolist() == [3, 4, 1, 9, 9]
  assert tail[0]['segment_ids'].tolist() == [1, 1, 1, 0, 0]


def test_chunked_tokenization_matches_and_skips_empty(cache):
  sp = get_tokenizer(_config(cache))
  records = [{'text': t.encode()} for t in ('Hello world.', '', 'Zwei Wörter\n', 'x')]
  chunk = layouts.TokenizeChunk(sp, 'text', 1)(records)
  docs = layouts.SplitChunk(8).flat_map(chunk)
  want = [sp.encode(t) + [1] for t in ('Hello world.', 'Zwei Wörter\n', 'x')]
  assert [d['input_ids'].tolist() for d in docs] == want


@pytest.mark.parametrize('layout', ['padded', 'packed'])
def test_resume_replays_the_uninterrupted_stream(cache, layout):
  c = _config(cache, layout=layout)
  it = make_train_iterator(c, 0, 1)
  first = _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  restored = make_train_iterator(c, 0, 1)
  restored.set_state(state)
  assert _equal(_take(restored, 4), expected)
  assert first[0]['input_ids'].shape == (16, 128)
  seg = np.stack([b['segment_ids'] for b in first])
  if layout == 'packed':
    assert (seg[:, :, -1] > 0).all()  # Rows are full: no padding in an endless stream.
  else:
    assert ((seg == 0) | (seg == 1)).all() and (seg[:, :, 0] == 1).all()


def test_workers_give_the_same_batches_and_resume(cache):
  c0 = _config(cache, layout='packed', worker_count=0)
  reference = _take(make_train_iterator(c0, 0, 1), 6)
  # One iterator with workers (starting and stopping them is the slow part): its batches match
  # the worker-free stream, and restoring a JSON round-tripped state replays it.
  it = make_train_iterator(_config(cache, layout='packed', worker_count=2), 0, 1)
  try:
    assert _equal(_take(it, 2), reference[:2])
    state = json.loads(json.dumps(it.get_state()))
    assert _equal(_take(it, 4), reference[2:])
    it.set_state(state)
    assert _equal(_take(it, 4), reference[2:])
  finally:
    it.close()
  with pytest.raises(DataError, match=r'worker_count=2 but this run has worker_count=0'):
    make_train_iterator(c0, 0, 1).set_state(state)


def test_two_hosts_split_the_stream_and_padded_resumes_on_any_host_count(cache, numbered):
  c = _config(cache, batch=4, source='text_folder', text_dir=str(numbered), max_length=64)
  sp = get_tokenizer(c)
  n = len(sources.open_split(c, 'train').source)
  hosts = [make_train_iterator(c, h, 2) for h in range(2)]
  single = make_train_iterator(c, 0, 1)
  steps = -(-n // 4)
  seen = [[], []]
  for _ in range(steps):
    parts = [next(it) for it in hosts]
    whole = next(single)
    assert all(p['input_ids'].shape == (2, 64) for p in parts)
    # Each global batch holds the same documents as on one host.
    assert sorted(_row_texts(sp, parts[0]) + _row_texts(sp, parts[1])) == sorted(
        _row_texts(sp, whole))
    for h in range(2):
      seen[h] += _row_texts(sp, parts[h])
      assert _row_texts(sp, parts[h]) == _row_texts(sp, whole)[2 * h:2 * h + 2]  # its rows
  # Stream position 4k + r is global row r of batch k; by default host h holds rows 2h, 2h + 1
  # (its contiguous block): within the first epoch the hosts' documents are disjoint and
  # together cover the split.
  by_host = [set(), set()]
  for pos in range(n):
    k, r = divmod(pos, 4)
    by_host[r // 2].add(seen[r // 2][2 * k + r % 2])
  train = sources.open_split(c, 'train').source
  every = {sources.record_text(train[i], 'text') for i in range(n)}
  assert not by_host[0] & by_host[1] and by_host[0] | by_host[1] == every
  # Save on two hosts, resume on one: the global batches continue unchanged.
  state = json.loads(json.dumps(hosts[0].get_state()))
  assert state['inner'] == json.loads(json.dumps(hosts[1].get_state()))['inner']
  resumed = make_train_iterator(c, 0, 1)
  resumed.set_state(state)
  assert _equal(_take(resumed, 3), _take(single, 3))


def _rows_file(c, path, rows: int) -> str:
  """A .npy of padded token rows of varying lengths (the tokens source)."""
  rng = np.random.default_rng(0)
  ids = np.zeros((rows, c.data.max_length), np.int32)
  for i in range(rows):
    n = int(rng.integers(2, c.data.max_length))
    ids[i, :n] = rng.integers(2, c.model.vocab_size, n)
    ids[i, n] = c.data.eos_id
  np.save(path, ids)
  return str(path)


@pytest.mark.parametrize('source', ['text_folder', 'tokens'])
def test_hosts_read_the_rows_their_devices_hold_in_any_order(cache, numbered, tmp_path, source):
  """Four hosts whose devices alternate along the batch axis (a TPU torus's order: host h holds
  global rows h and h + 4 of 8): each reads exactly those rows, so the batch its devices make up
  is row for row one host's batch; the eval batches too, and a save on 4 hosts resumes on 1."""
  c = _config(cache, batch=8, source='text_folder', text_dir=str(numbered), max_length=64)
  c.data.eval_batch_size = 8
  if source == 'tokens':
    c.data.source, c.data.tokens_path = 'tokens', _rows_file(c, tmp_path / 'rows.npy', 40)
    c.data.eval_tokens_path = _rows_file(c, tmp_path / 'eval.npy', 24)
  held = [[h, h + 4] for h in range(4)]
  hosts = [make_train_iterator(c, h, 4, rows=held[h]) for h in range(4)]
  single = make_train_iterator(c, 0, 1)
  for _ in range(6):  # past the end of the token rows: they start again from the top
    whole, placed = next(single), {}
    for h, it in enumerate(hosts):
      part = next(it)
      for k, v in part.items():
        placed.setdefault(k, np.zeros_like(whole[k]))[held[h]] = v
    assert _equal([placed], [whole])
  resumed = make_train_iterator(c, 0, 1)
  resumed.set_state(json.loads(json.dumps(hosts[2].get_state())))
  assert _equal(_take(resumed, 2), _take(single, 2))
  whole = list(make_eval_batches(c, 0, 1))
  parts = [list(make_eval_batches(c, h, 4, host_rows=held[h])) for h in range(4)]
  for b, *host_parts in zip(whole, *parts):
    placed = np.zeros_like(b['input_ids'])
    for h, part in enumerate(host_parts):
      placed[held[h]] = part['input_ids']
    assert np.array_equal(placed, b['input_ids'])
  with pytest.raises(DataError, match='not ascending rows'):
    make_train_iterator(c, 0, 4, rows=[4, 0])


def test_eval_set_is_tokenized_once_per_run(cache, monkeypatch):
  c = _config(cache)
  c.data.eval_batch_size, c.data.eval_tokens = 8, 3000
  passes = []
  real = layouts.tokenized_documents
  monkeypatch.setattr(layouts, 'tokenized_documents',
                      lambda *a, **k: passes.append(1) or real(*a, **k))
  batches = make_eval_batches(c, 0, 1)
  first, second = list(batches), list(batches)
  assert len(passes) == 1 and _equal(first, second) and len(first) > 1
  cut = make_eval_batches(c, 0, 1)
  next(iter(cut))  # a pass stopped early is not kept: the next one reads the split again
  assert _equal(list(cut), first) and len(passes) == 3


def test_epochs_cover_the_split_and_reshuffle(cache, numbered):
  c = _config(cache, batch=2, source='text_folder', text_dir=str(numbered), max_length=64)
  sp = get_tokenizer(c)
  n = len(sources.open_split(c, 'train').source)
  it = make_train_iterator(c, 0, 1)
  rows = []
  while len(rows) < 2 * n:
    rows += _row_texts(sp, next(it))
  first, second = rows[:n], rows[n:2 * n]
  assert len(set(first)) == n and set(first) == set(second) and first != second
  other_seed = _config(cache, batch=2, source='text_folder', text_dir=str(numbered),
                       max_length=64)
  other_seed.seed = 1
  assert _row_texts(sp, next(make_train_iterator(other_seed, 0, 1))) != rows[:2]


def test_packed_hosts_are_disjoint_and_refuse_another_host_count(cache, numbered):
  c = _config(cache, batch=2, source='text_folder', text_dir=str(numbered), layout='packed',
              max_length=32)
  sp = get_tokenizer(c)
  docs = []
  for h in range(2):
    it = make_train_iterator(c, h, 2)
    ids = np.concatenate([b['input_ids'].reshape(-1) for b in _take(it, 6)]).tolist()
    # Host streams are eos-separated documents; the last may be cut.
    docs.append({sp.decode(d) for d in np.split(ids, np.flatnonzero(np.equal(ids, 1)) + 1)[:-1]})
    state = json.loads(json.dumps(it.get_state()))
  assert docs[0] and docs[1] and not docs[0] & docs[1]
  assert all(d.startswith('doc') for d in docs[0] | docs[1])
  with pytest.raises(DataError, match=r'saved with 2 hosts.*this run has 1.*Resume with 2 hosts'):
    make_train_iterator(c, 0, 1).set_state(state)


def test_eval_is_fixed_budgeted_and_identical_across_hosts(cache):
  c = _config(cache)
  c.data.eval_batch_size = 8
  c.data.eval_tokens = 3000
  whole = list(make_eval_batches(c, 0, 1))
  assert _equal(whole, list(make_eval_batches(c, 0, 1)))  # Same batches every time.
  counts = np.cumsum([np.count_nonzero(b['segment_ids']) for b in whole])
  assert counts[-1] >= 3000 > counts[-2]  # Stops at the first batch that reaches the budget.
  parts = [list(make_eval_batches(c, h, 2)) for h in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for b, p0, p1 in zip(whole, *parts):
    assert p0['input_ids'].shape == (4, 128)
    assert np.array_equal(np.concatenate([p0['input_ids'], p1['input_ids']]), b['input_ids'])
  # A budget beyond the split: every validation document once, the last batch padded with rows
  # that carry no tokens.
  c.data.eval_tokens = 10**9
  c.data.eval_batch_size = 7
  c.data.layout = 'packed'
  full = list(make_eval_batches(c, 0, 1))
  sp = get_tokenizer(c)
  val = sources.open_split(c, 'validation')
  n_tokens = sum(len(sp.encode(sources.record_text(val.source[i], 'text'))) + 1
                 for i in range(len(val.source)))
  seg = np.concatenate([b['segment_ids'] for b in full])
  rows = -(-n_tokens // 128)
  assert np.count_nonzero(seg) == n_tokens and len(seg) == -(-rows // 7) * 7
  assert seg[:rows].any(axis=1).all() and not seg[rows:].any()


def test_bad_data_config_is_rejected_before_training(cache):
  c = _config(cache)
  c.data.max_length = 1
  with pytest.raises(DataError, match=r'data.max_length=1 must be an integer >= 2'):
    validate_data(c, process_count=1)
  c = _config(cache, batch=12)
  with pytest.raises(DataError, match=r'optim.global_batch_size=12 cannot be split evenly over 8 '
                     r'hosts'):
    validate_data(c, process_count=8)
  with pytest.raises(DataError, match=r'global_batch_size=12 cannot be split evenly over 8'):
    make_train_iterator(c, 0, 8)
  c = _config(cache)
  c.data.eval_batch_size = 30
  with pytest.raises(DataError, match=r'data.eval_batch_size=30 cannot be split evenly over 4'):
    validate_data(c, process_count=4)
  c = _config(cache, layout='ragged')
  with pytest.raises(DataError, match=r"data.layout='ragged' is not supported"):
    validate_data(c, process_count=1)
  validate_data(_config(cache), process_count=2)
