"""The data pipeline's tokens/s per host beside what each paper size's TPU plan needs per host.

  python -m gpas_jax.perf.data_bench [--seconds 3] [--workers 0,1,2] [--layouts padded,packed]
      [--batch 32] [--length 256] [--vocab 32000] [--corpus c4like|embedded] [--tokenizer M]
      [--tokenizer_type unigram|bpe] [--cache_dir DIR] [--json]

Data: with --corpus=c4like (the default) a folder of C4-like English documents, built once
offline into --cache_dir (default: a folder under the system's temp dir) from the text every
Python ships (the embedded corpus: pydoc topics and standard-library docstrings), joined in
order and cut at line ends into documents of ~2 KB (seeded log-normal lengths, mean ~2 KB like
C4's), written as `c4-train.*-of-*.json.gz` / `c4-validation.*.json.gz` JSON lines with C4's
fields, and read through data.source='text_folder'; a SentencePiece tokenizer (unigram, T5's
kind, unless --tokenizer_type=bpe; --vocab pieces or as many as the text supports) is trained on
its train split once, or --tokenizer names one (T5's spiece.model).
--corpus=embedded measures the default source and tokenizer instead.

Throughput: `make_train_iterator(config, 0, 1)` as the trainer calls it on a host of one
process, with `--batch` rows of `--length` tokens; per layout and worker count it warms up (the
first batch, then --warmup seconds: workers start one after another) and counts the batches of
--seconds. 'tokens' are all B*L positions (what a TPU step consumes), 'real' the non-pad ones.
CPU-seconds are this process's plus its worker processes'; 'per core' is tokens per CPU-second
(with 0 workers the whole pipeline runs in this process, so it is the rate one core sustains,
undistorted by other jobs on the machine), 'main ceiling' tokens per CPU-second of this process
alone (what the trainer's process can pass on when workers tokenize: batching, and packing for
'packed', stay in it).

Need: for each paper size on its default slice (perf.tpu_table.DEFAULTS) the TPU compiler's plan
in docs/tpu_table.jsonl (the config's own plan, or the searched one where the compiler refused
it): needed tokens/s per host = tokens_per_s_per_chip x chips per host (TPU VM), cores =
needed / per-core rate (0 workers) of each layout, and whether the host's vCPUs under the
worker rule (data/workers.py) feed it: min(workers x per-core rate, main ceiling) >= needed.
"""

import argparse
import contextlib
import gzip
import json
import math
import os
import pathlib
import random
import sys
import tempfile
import time
from typing import Any

import gpas_jax
from gpas_jax.data import corpus
from gpas_jax.data import workers as workers_lib

# A TPU VM (one JAX process) per generation: (chips, vCPUs) of a multi-host slice's VM and of
# the one 8-chip VM of an 8-chip single-host slice, from Google's Cloud TPU docs (v5e:
# ct5lp-hightpu-4t / -8t; v6e: ct6e-standard-4t / -8t; v5p: ct5p-hightpu-4t; v4: 240 vCPUs).
TPU_VMS = {'v5e': ((4, 112), (8, 224)), 'v6e': ((4, 180), (8, 180)),
           'v5p': ((4, 208), None), 'v4': ((4, 240), None)}
DOC_BYTES = 2000  # C4 en: ~2.2 KB of text per document on average.
TRAIN_FILES = 4


def tpu_vm(slice_name: str, chips: int) -> tuple[int, int]:
  """(chips, vCPUs) of one host (TPU VM) of a slice of `chips` chips, e.g. 'v5e-256' -> (4, 112)."""
  gen = slice_name.split('-')[0]
  multi, single = TPU_VMS[gen]
  return single if single and chips == single[0] else multi


def _texts(text_dir: pathlib.Path) -> list[str]:
  lines = []
  for name in (corpus.TOPICS_FILE, corpus.DOCSTRINGS_FILE):
    with open(text_dir / name, encoding='utf-8') as f:
      lines += [json.loads(row)['text'] for row in f if row.strip()]
  return lines


def _cut(texts: list[str], seed: int = 0) -> list[str]:
  """Joins the texts in order and cuts them at line ends into documents of ~DOC_BYTES."""
  rng = random.Random(seed)
  lines = [line for t in texts for line in t.split('\n') if line.strip()]
  docs, cur, size, target = [], [], 0, 0
  for line in lines:
    if not cur:  # log-normal with mean DOC_BYTES, like web pages: many short, a long tail
      target = min(8 * DOC_BYTES, max(200, rng.lognormvariate(math.log(DOC_BYTES) - 0.2, 0.63)))
    cur.append(line)
    size += len(line) + 1
    if size >= target:
      docs.append('\n'.join(cur))
      cur, size = [], 0
  return docs + (['\n'.join(cur)] if cur else [])


def build_folder(cache: pathlib.Path) -> pathlib.Path:
  """Writes the C4-like folder once as cache/c4like (whole or not at all; hosts may share it)."""
  from gpas_jax.data import sources  # pylint: disable=import-outside-toplevel
  out = cache / 'c4like'
  with sources.locked(cache / 'c4like.lock'):
    if out.exists():
      return out
    tag = corpus.python_tag()
    with sources.locked(cache / 'corpus' / f'{tag}.lock'):  # the lock sources.py takes for it
      embedded = corpus.write_embedded_corpus(cache / 'corpus' / tag)
    docs = _cut(_texts(embedded))
    n_val = max(1, len(docs) // 50)  # C4's ~0.1% would leave too few documents to evaluate
    shards = [('c4-validation.00000-of-00001.json.gz', docs[:n_val])]
    shards += [(f'c4-train.{i:05d}-of-{TRAIN_FILES:05d}.json.gz', docs[n_val + i::TRAIN_FILES])
               for i in range(TRAIN_FILES)]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix='c4like.', dir=cache))
    for name, part in shards:
      rows = [json.dumps({'text': t, 'timestamp': '2019-04-25T12:00:00Z',
                          'url': f'https://docs.python.org/3/#{name}-{j}'}, ensure_ascii=False)
              for j, t in enumerate(part)]
      with gzip.open(tmp / name, 'wt', encoding='utf-8') as f:
        f.write('\n'.join(rows) + '\n')
    os.replace(tmp, out)
  return out


def bench_config(cache: pathlib.Path, args: argparse.Namespace):
  """configs/base.py with the benchmark's source, tokenizer and shape (built or trained once)."""
  sys.path.insert(0, gpas_jax.ROOT)
  from configs import base  # pylint: disable=import-outside-toplevel
  from gpas_jax.data import sources  # pylint: disable=import-outside-toplevel
  from gpas_jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  c = base.get_config()
  d = c.data
  d.cache_dir, d.max_length = str(cache), args.length
  c.optim.global_batch_size = args.batch
  c.model.vocab_size = d.tokenizer_vocab_size = args.vocab
  if args.corpus == 'embedded':
    return c
  d.source, d.text_dir, d.validation_glob = 'text_folder', str(build_folder(cache)), 'c4-valid*'
  if args.tokenizer:  # e.g. T5's spiece.model
    d.tokenizer = args.tokenizer
    c.model.vocab_size = max(args.vocab, tokenizer_lib.load_tokenizer(args.tokenizer).vocab_size())
    return c
  model = cache / f'c4like-{args.tokenizer_type}-{args.vocab}.model'
  if not model.exists():
    with sources.locked(model.with_name(model.name + '.lock')):
      if not model.exists():
        split = sources.open_split(c, 'train')
        tokenizer_lib.train_tokenizer(tokenizer_lib.split_texts(split), args.vocab, model,
                                      model_type=args.tokenizer_type)
  d.tokenizer = str(model)
  return c


def _cpu_seconds(proc) -> tuple[float, float]:
  """(this process's, its live children's) user + system CPU seconds."""
  import psutil  # pylint: disable=import-outside-toplevel  # a TFDS requirement
  own = proc.cpu_times()
  kids = 0.0
  for child in proc.children(recursive=True):
    try:
      t = child.cpu_times()
    except psutil.Error:  # a child that just exited
      continue
    kids += t.user + t.system
  return own.user + own.system, kids


def measure(config, layout: str, workers: int, seconds: float, warmup: float) -> dict[str, Any]:
  """One setting's rates: make_train_iterator's batches over `seconds` after warming up."""
  import psutil  # pylint: disable=import-outside-toplevel  # a TFDS requirement
  from gpas_jax.data import make_train_iterator  # pylint: disable=import-outside-toplevel
  config.data.layout, config.data.worker_count = layout, workers
  proc = psutil.Process()
  start = time.perf_counter()
  it = make_train_iterator(config, 0, 1)
  b = next(it)
  first = time.perf_counter() - start
  rows, length = b['input_ids'].shape
  while time.perf_counter() - start < first + warmup:
    next(it)
  batches = real = 0
  main0, kids0 = _cpu_seconds(proc)
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b = next(it)
    batches += 1
    real += int((b['segment_ids'] != 0).sum())
  wall = time.perf_counter() - t0
  main1, kids1 = _cpu_seconds(proc)
  it.close()
  tokens = batches * rows * length
  main_cpu, kids_cpu = main1 - main0, max(0.0, kids1 - kids0)
  return {'layout': layout, 'workers': workers, 'rows': rows, 'length': length,
          'batches': batches, 'wall_s': wall, 'first_batch_s': first,
          'tokens_per_s': tokens / wall, 'real_tokens_per_s': real / wall,
          'cpu_s': main_cpu + kids_cpu, 'main_cpu_s': main_cpu,
          'tokens_per_cpu_s': tokens / max(main_cpu + kids_cpu, 1e-9),
          'main_ceiling': tokens / max(main_cpu, 1e-9)}


def load_plans(table: pathlib.Path) -> list[dict[str, Any]]:
  """The rows of docs/tpu_table.jsonl that the compiler accepted (fits, a finite step)."""
  rows = [json.loads(line) for line in table.read_text().splitlines() if line.strip()]
  return [r for r in rows if r.get('fits') and math.isfinite(r.get('estimated_step_s', math.nan))]


def default_plans(plans: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Each paper size's plan on its default slice: the config's own, else the searched one."""
  from gpas_jax.perf import tpu_table  # pylint: disable=import-outside-toplevel
  out = []
  for size, slice_name in tpu_table.DEFAULTS:
    mine = sorted((r for r in plans if (r['size'], r['slice']) == (size, slice_name)),
                  key=lambda r: r['kind'] != 'default')
    out += mine[:1]
  return out


def layout_rates(rates: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
  """Per layout: the per-core rate (0 workers) and the main ceiling (the best with workers)."""
  out: dict[str, dict[str, float | None]] = {}
  for r in rates:
    b = out.setdefault(r['layout'], {'per_core': None, 'main_ceiling': None})
    if r['workers'] == 0:
      b['per_core'] = r['tokens_per_cpu_s']
    elif b['main_ceiling'] is None or r['main_ceiling'] > b['main_ceiling']:
      b['main_ceiling'] = r['main_ceiling']
  return {k: v for k, v in out.items() if v['per_core']}


def feedable(b: dict[str, float | None], workers: int) -> float:
  """Tokens/s a host's pipeline delivers with `workers` workers: each at the per-core rate, all
  through the trainer's process (its main ceiling); with none, the one process's own rate."""
  if not workers:
    return b['per_core']
  return min(workers * b['per_core'], b['main_ceiling'] or math.inf)


def need(plans: list[dict[str, Any]], rates: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per plan: the tokens/s per host it needs, the cores that takes at each layout's per-core
  rate, and whether one of its hosts (its vCPUs under the worker rule) feeds it."""
  by_layout = layout_rates(rates)
  out = []
  for p in plans:
    chips, vcpus = tpu_vm(p['slice'], p['devices'])
    needed = p['tokens_per_s_per_chip'] * chips
    workers = workers_lib.auto_worker_count(vcpus)
    row = {k: p[k] for k in ('size', 'slice', 'kind', 'devices', 'batch', 'seq',
                             'estimated_step_s', 'tokens_per_s_per_chip')}
    row.update(chips_per_host=chips, vcpus_per_host=vcpus, auto_workers=workers,
               needed_per_host=needed, layouts={})
    for layout, b in by_layout.items():
      feed = feedable(b, workers)
      row['layouts'][layout] = {'cores': needed / b['per_core'], 'feedable_per_host': feed,
                                'fed': feed >= needed}
    out.append(row)
  return out


def hungriest(plans: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """For each kind of TPU VM, the plan of the table that needs the most tokens/s per chip."""
  best: dict[tuple[int, int, str], dict[str, Any]] = {}
  for p in plans:
    key = (*tpu_vm(p['slice'], p['devices']), p['slice'].split('-')[0])
    if key not in best or p['tokens_per_s_per_chip'] > best[key]['tokens_per_s_per_chip']:
      best[key] = p
  return [best[k] for k in sorted(best, key=lambda k: (k[2], k[0]))]


def host_summary(plans: list[dict[str, Any]], rates: list[dict[str, Any]],
                 gen: str = 'v5e') -> dict[str, Any]:
  """What one multi-host TPU VM of `gen` feeds per chip, with the rule's workers and with none,
  and which of the table's `gen` plans (per chip) each leaves hungry."""
  chips, vcpus = TPU_VMS[gen][0]
  workers = workers_lib.auto_worker_count(vcpus)
  mine = [p for p in plans if p['slice'].startswith(gen + '-')]
  out = {'generation': gen, 'chips': chips, 'vcpus': vcpus, 'auto_workers': workers,
         'hungriest_per_chip': max(p['tokens_per_s_per_chip'] for p in mine), 'layouts': {}}
  for layout, b in layout_rates(rates).items():
    v = {}
    for label, w in (('auto', workers), ('none', 0)):
      per_chip = feedable(b, w) / chips
      v[label] = {'per_chip': per_chip, 'hungry': [
          f'{p["size"]}@{p["slice"]}' for p in mine if p['tokens_per_s_per_chip'] > per_chip]}
    out['layouts'][layout] = v
  return out


def _summary_lines(h: dict[str, Any]) -> list[str]:
  lines = ['', f'A {h["generation"]} TPU VM ({h["chips"]} chips, {h["vcpus"]} vCPUs, '
           f'{h["auto_workers"]} workers by data.worker_count=-1); the table\'s hungriest '
           f'{h["generation"]} plan needs {_k(h["hungriest_per_chip"])} tokens/s per chip:']
  for layout, v in h['layouts'].items():
    a, n = v['auto'], v['none']
    lines.append(f'  {layout}: feeds {_k(a["per_chip"])} tokens/s per chip with the workers '
                 f'(hungry: {", ".join(a["hungry"]) or "none"}); {_k(n["per_chip"])} with none '
                 f'(hungry: {", ".join(n["hungry"]) or "none"})')
  return lines


def _k(x: float) -> str:
  return f'{x / 1e3:,.0f}k'


def _need_table(title: str, needs: list[dict[str, Any]], layouts: list[str]) -> list[str]:
  lines = ['', f'{title}', '', '| size | slice (plan) | est. step s | tokens/s/chip | host: chips, '
           'vCPUs, auto workers | needed tokens/s/host | ' +
           ' | '.join(f'cores ({x})' for x in layouts) + ' | ' +
           ' | '.join(f'host feeds ({x})' for x in layouts) + ' |',
           '|' + '---|' * (6 + 2 * len(layouts))]
  for n in needs:
    v = n['layouts']
    lines.append(
        f'| {n["size"]} | {n["slice"]} ({n["kind"]}) | {n["estimated_step_s"]:.3f} | '
        f'{_k(n["tokens_per_s_per_chip"])} | {n["chips_per_host"]}, {n["vcpus_per_host"]}, '
        f'{n["auto_workers"]} | {_k(n["needed_per_host"])} | ' +
        ' | '.join(f'{v[x]["cores"]:.1f}' for x in layouts) + ' | ' +
        ' | '.join(f'{"yes" if v[x]["fed"] else "NO"}: {_k(v[x]["feedable_per_host"])}'
                   for x in layouts) + ' |')
  return lines


def report(rates: list[dict[str, Any]], needs: list[dict[str, Any]],
           hungry: list[dict[str, Any]], summary: dict[str, Any], info: dict[str, Any]) -> str:
  """The measured rates, the default plans' needs, the hungriest plan per kind of host and
  what a v5e host feeds."""
  lines = [f'{info["corpus"]}: {info["documents"]} documents, {info["mean_doc_bytes"]:.0f} bytes '
           f'on average; tokenizer {info["tokenizer_pieces"]} pieces, '
           f'{info["chars_per_token"]:.2f} chars/token; {info["cpus"]} CPUs, load average '
           f'{info["load"]:.1f}', '',
           '| layout | workers | B x L | tokens/s | real tokens/s | CPU-s/s | per core '
           '(tokens/CPU-s) | main ceiling | first batch s |', '|' + '---|' * 9]
  for r in rates:
    lines.append(f'| {r["layout"]} | {r["workers"]} | {r["rows"]} x {r["length"]} | '
                 f'{_k(r["tokens_per_s"])} | {_k(r["real_tokens_per_s"])} | '
                 f'{r["cpu_s"] / r["wall_s"]:.2f} | {_k(r["tokens_per_cpu_s"])} | '
                 f'{_k(r["main_ceiling"]) if r["workers"] else "-"} | {r["first_batch_s"]:.1f} |')
  layouts = list(dict.fromkeys(x for n in needs + hungry for x in n['layouts']))
  lines += _need_table('Each paper size on its default slice (docs/tpu_table.jsonl):', needs,
                       layouts)
  lines += _need_table('The hungriest plan of the table per kind of TPU VM:', hungry, layouts)
  return '\n'.join(lines + _summary_lines(summary))


def main(argv: list[str] | None = None) -> int:
  """Builds (once) the data, measures every setting and prints the tables (or --json)."""
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--seconds', type=float, default=3.0, help='timed seconds per setting')
  p.add_argument('--warmup', type=float, default=2.0, help='seconds after the first batch')
  p.add_argument('--workers', default='0,1,2', help='worker counts, comma-separated')
  p.add_argument('--layouts', default='padded,packed')
  p.add_argument('--batch', type=int, default=32, help='rows per batch (this host)')
  p.add_argument('--length', type=int, default=256, help='tokens per row (the paper: 256)')
  p.add_argument('--vocab', type=int, default=32_000, help='tokenizer pieces (T5: 32k)')
  p.add_argument('--corpus', choices=('c4like', 'embedded'), default='c4like')
  p.add_argument('--tokenizer', default='', help="a SentencePiece .model for c4like (T5's "
                 "spiece.model); '' trains one on the folder")
  p.add_argument('--tokenizer_type', choices=('unigram', 'bpe'), default='unigram',
                 help="of the trained tokenizer: unigram is T5's; bpe trains faster")
  p.add_argument('--cache_dir', default='', help='where the data and tokenizer are built once')
  p.add_argument('--tpu_table', default=os.path.join(gpas_jax.ROOT, 'docs', 'tpu_table.jsonl'))
  p.add_argument('--json', action='store_true', help='one JSON object on stdout')
  args = p.parse_args(argv)
  cache = pathlib.Path(args.cache_dir or os.path.join(
      tempfile.gettempdir(), f'gpas_jax_data_bench-{corpus.python_tag()}'))
  # With --json stdout holds the one object: progress (and the builds' messages) go to stderr.
  with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
    t0 = time.perf_counter()
    config = bench_config(cache, args)
    info = corpus_info(config, args.corpus)
    info['build_s'] = time.perf_counter() - t0
    print(f'data and tokenizer in {cache} ready after {info["build_s"]:.1f} s', flush=True)
    rates = []
    for layout in args.layouts.split(','):
      for w in (int(x) for x in args.workers.split(',')):
        rates.append(measure(config, layout, w, args.seconds, args.warmup))
        print(f'  {layout} workers={w}: {_k(rates[-1]["tokens_per_s"])} tokens/s', flush=True)
  plans = load_plans(pathlib.Path(args.tpu_table))
  needs, hungry = need(default_plans(plans), rates), need(hungriest(plans), rates)
  summary = host_summary(plans, rates)
  if args.json:
    print(json.dumps({'info': info, 'rates': rates, 'needs': needs, 'hungriest': hungry,
                      'v5e_host': summary}))
  else:
    print(report(rates, needs, hungry, summary, info))
  return 0


def corpus_info(config, name: str) -> dict[str, Any]:
  """Documents, their mean size and the tokenizer's pieces and chars/token on the train split."""
  from gpas_jax.data import sources  # pylint: disable=import-outside-toplevel
  from gpas_jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  sp = tokenizer_lib.get_tokenizer(config)
  texts = list(tokenizer_lib.split_texts(sources.open_split(config, 'train')))
  chars = sum(map(len, texts))
  return {'corpus': name, 'documents': len(texts), 'mean_doc_bytes':
          sum(len(t.encode()) for t in texts) / len(texts), 'tokenizer_pieces': sp.vocab_size(),
          'chars_per_token': chars / max(1, sum(map(len, sp.encode(texts)))),
          'cpus': workers_lib.available_cores(), 'load': os.getloadavg()[0]}


if __name__ == '__main__':
  sys.exit(main())
