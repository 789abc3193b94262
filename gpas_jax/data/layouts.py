"""Sample layouts: how tokenized documents become rows of `input_ids` and `segment_ids`.

'padded' (the baseline's): one document per row. The row is tokens[:max_length-1] + [eos],
  right-padded with pad_id to max_length; segment_ids are 1 on those tokens and 0 on padding.
'packed': every document + [eos] is concatenated into one stream that is cut into rows of
  max_length (grain's ConcatThenSplit); segment_ids number the pieces of documents in a row 1, 2,
  3, ...; a document cut at a row end continues in the next row under a fresh id; 0 only marks the
  padding of a final partial row.
Loss convention (the trainer's): position t predicts token t+1, and counts iff
  segment_ids[t+1] != 0 and segment_ids[t+1] == segment_ids[t].
For 'padded' that is exactly the baseline: labels are the input ids with padding ignored.
"""

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import sentencepiece as spm

from gpas_jax.data import sources


class TokenizeDocument(grain.transforms.Map):
  """record -> {'input_ids': int32[n + 1]}: the document's tokens followed by eos."""

  def __init__(self, tokenizer: spm.SentencePieceProcessor, text_field: str, eos_id: int):
    self._tokenizer = tokenizer
    self._text_field = text_field
    self._eos_id = eos_id

  def map(self, element: Any) -> dict[str, np.ndarray]:
    text = sources.record_text(element, self._text_field)
    ids = self._tokenizer.encode(text) if text else []
    ids_N = np.empty(len(ids) + 1, np.int32)
    ids_N[:-1] = ids
    ids_N[-1] = self._eos_id
    return {'input_ids': ids_N}


def padded_row(ids_N: np.ndarray, max_length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Lays out one eos-terminated document: tokens[:max_length-1] + [eos], right-padded."""
  n = min(len(ids_N) - 1, max_length - 1)
  ids_L = np.full(max_length, pad_id, np.int32)
  ids_L[:n] = ids_N[:n]
  ids_L[n] = ids_N[-1]
  seg_L = np.zeros(max_length, np.int32)
  seg_L[:n + 1] = 1
  return {'input_ids': ids_L, 'segment_ids': seg_L}


class PaddedRow(grain.transforms.Map):
  """record -> one padded row (see padded_row)."""

  def __init__(self, tokenize: TokenizeDocument, max_length: int, pad_id: int):
    self._tokenize = tokenize
    self._max_length = max_length
    self._pad_id = pad_id

  def map(self, element: Any) -> dict[str, np.ndarray]:
    return padded_row(self._tokenize.map(element)['input_ids'], self._max_length, self._pad_id)


class TokenizeChunk:
  """A MapDataset batch_fn: records -> {'ids': all tokens (each document + eos), 'ends'}.

  Worker processes return one chunk of documents per element instead of one document, because
  the hand-off to the main process costs more than tokenizing a short document.
  """

  def __init__(self, tokenizer: spm.SentencePieceProcessor, text_field: str, eos_id: int):
    self._tokenizer = tokenizer
    self._text_field = text_field
    self._eos_id = eos_id

  def __call__(self, records: Sequence[Any]) -> dict[str, np.ndarray]:
    texts = [sources.record_text(r, self._text_field) for r in records]
    pieces = self._tokenizer.encode(texts, num_threads=1)
    ends_N = np.cumsum([len(p) + 1 for p in pieces], dtype=np.int64)
    ids_T = np.full(int(ends_N[-1]) if len(ends_N) else 0, self._eos_id, np.int32)
    start = 0
    for p, end in zip(pieces, ends_N):
      ids_T[start:end - 1] = p
      start = int(end)
    return {'ids': ids_T, 'ends': ends_N}


class SplitChunk(grain.experimental.FlatMapTransform):
  """Chunk -> its non-empty documents as {'input_ids': int32[n + 1]} (tokens + eos)."""

  def __init__(self, max_documents: int):
    self.max_fan_out = max_documents

  def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    ids_T, out, start = element['ids'], [], 0
    for end in element['ends'].tolist():
      if end - start > 1:  # Empty documents (eos alone) are skipped.
        out.append({'input_ids': ids_T[start:end]})
      start = end
    return out


def tokenized_documents(records: grain.MapDataset, tokenizer: spm.SentencePieceProcessor,
                        text_field: str, eos_id: int, read_options: grain.ReadOptions,
                        mp_options: grain.MultiprocessingOptions | None,
                        chunk: int = 64) -> grain.IterDataset:
  """Records -> non-empty eos-terminated token arrays, tokenized in worker processes if asked.

  The documents come out in record order whatever the worker count: workers get whole chunks
  round-robin, and grain interleaves their outputs back in the same order.
  """
  chunks = records.batch(chunk, batch_fn=TokenizeChunk(tokenizer, text_field, eos_id))
  it = chunks.to_iter_dataset(read_options)
  if mp_options is not None:
    it = it.mp_prefetch(mp_options)
  return grain.experimental.FlatMapIterDataset(it, SplitChunk(chunk))


class FinishPacked(grain.transforms.Map):
  """ConcatThenSplit output -> {'input_ids', 'segment_ids'} with pad_id on padding."""

  def __init__(self, pad_id: int):
    self._pad_id = pad_id

  def map(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids_L = np.asarray(element['input_ids'], np.int32)
    seg_L = np.asarray(element['input_ids_segment_ids'], np.int32)
    if self._pad_id != 0:  # ConcatThenSplit pads with zeros.
      ids_L = np.where(seg_L == 0, self._pad_id, ids_L).astype(np.int32)
    return {'input_ids': ids_L, 'segment_ids': seg_L}


def pack(docs: grain.IterDataset, max_length: int, pad_id: int) -> grain.IterDataset:
  """Packs eos-terminated documents into rows of max_length (see the module docstring)."""
  packed = grain.experimental.ConcatThenSplitIterDataset(
      docs, length_struct={'input_ids': max_length})
  return packed.map(FinishPacked(pad_id))


def loss_mask(segment_ids_BxL: np.ndarray) -> np.ndarray:
  """bool[B, L-1]: whether position t's prediction of token t+1 counts in the loss."""
  nxt_BxL1 = segment_ids_BxL[:, 1:]
  return (nxt_BxL1 != 0) & (nxt_BxL1 == segment_ids_BxL[:, :-1])
