"""Prints the embedded corpus's and tokenizer's size and build time, and pipeline tokens/second.

Usage: python scripts/data_throughput.py [--cache_dir=DIR] [--seconds=3]
With no --cache_dir everything is built from scratch in a temporary folder, so the build times
are first-run times. Tokens/s counts every delivered position (B*L per batch); 'real' counts the
non-pad ones.
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
from gpas_jax.data import corpus  # pylint: disable=wrong-import-position
from gpas_jax.data import get_tokenizer  # pylint: disable=wrong-import-position
from gpas_jax.data import make_train_iterator  # pylint: disable=wrong-import-position
from gpas_jax.data import sources  # pylint: disable=wrong-import-position
from gpas_jax.data import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position


def _size(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob('*') if p.is_file())


def build_report(cache: pathlib.Path) -> None:
  """Builds (or reuses) the embedded corpus and default tokenizer and prints their numbers."""
  c = tiny.get_config()
  c.data.cache_dir = str(cache)
  start = time.time()
  corpus_dir = corpus.write_embedded_corpus(cache / 'corpus' / corpus.python_tag())
  t_extract = time.time() - start
  start = time.time()
  ds_dir = sources.prepare_embedded(cache)
  t_build = time.time() - start
  start = time.time()
  sp = get_tokenizer(c)
  t_tok = time.time() - start
  n = {s: len(sources.open_split(c, s).source) for s in ('train', 'validation')}
  texts = list(tokenizer_lib.split_texts(sources.open_split(c, 'train')))
  n_tokens = sum(map(len, sp.encode(texts)))
  val_texts = list(tokenizer_lib.split_texts(sources.open_split(c, 'validation')))
  n_bytes = sum(len(t.encode()) for t in texts + val_texts)
  print(f'embedded corpus: {n_bytes / 1e6:.2f} MB of text ({_size(corpus_dir) / 1e6:.2f} MB as '
        f'JSON lines), extracted in {t_extract:.2f} s')
  print(f'embedded ArrayRecord dataset: {_size(ds_dir) / 1e6:.2f} MB, train {n["train"]} / '
        f'validation {n["validation"]} documents, built in {t_build:.2f} s')
  model = tokenizer_lib.default_tokenizer_path(c)
  print(f'default tokenizer: {sp.vocab_size()} pieces, {model.stat().st_size / 1e3:.0f} KB, '
        f'trained in {t_tok:.2f} s; train split = {n_tokens} tokens '
        f'({sum(map(len, texts)) / n_tokens:.2f} chars/token)')


def throughput(cache: pathlib.Path, batch: int, length: int, layout: str, workers: int,
               seconds: float) -> None:
  """Prints the tokens/s that make_train_iterator delivers for one setting."""
  c = tiny.get_config()
  c.data.cache_dir = str(cache)
  c.optim.global_batch_size = batch
  c.data.max_length = length
  c.data.layout = layout
  c.data.worker_count = workers
  it = make_train_iterator(c, 0, 1)
  start = time.time()
  next(it)
  t_first = time.time() - start
  while time.time() - start < t_first + 2.0:  # Warm up: workers start one after another.
    next(it)
  batches, real = 0, 0
  start, cpu = time.time(), time.process_time()
  while time.time() - start < seconds:
    b = next(it)
    batches += 1
    real += int((b['segment_ids'] != 0).sum())
  dt, dcpu = time.time() - start, time.process_time() - cpu
  it.close()
  # With no workers all the work is in this process, so tokens per CPU second is a rate that
  # other jobs on the machine do not distort.
  per_cpu = f', {batches * batch * length / dcpu / 1e3:5.0f} k/CPU-s' if not workers else ''
  print(f'{layout:>6} B={batch:<3} L={length:<4} workers={workers}: '
        f'{batches * batch * length / dt / 1e3:6.0f} k tokens/s ({real / dt / 1e3:4.0f} k real)'
        f'{per_cpu}, first batch after {t_first:.2f} s')


def main() -> None:
  """Runs the build report and the throughput grid."""
  parser = argparse.ArgumentParser()
  parser.add_argument('--cache_dir', default='')
  parser.add_argument('--seconds', type=float, default=3.0)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    cache = pathlib.Path(args.cache_dir or tmp)
    print(f'cache: {cache}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}')
    build_report(cache)
    for batch, length in ((16, 128), (8, 256)):
      for layout in ('padded', 'packed'):
        for workers in (0, 2):
          throughput(cache, batch, length, layout, workers, args.seconds)


if __name__ == '__main__':
  main()
