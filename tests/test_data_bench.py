"""gpas_jax.perf.data_bench: its C4-like folder, its tables' arithmetic, its command line.

Nothing here asserts a speed (the machine is shared): rates are positive and consistent with
the batches counted, and the needs follow from docs/tpu_table.jsonl and the per-core rates.
"""

import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest

from gpas_jax.data import workers
from gpas_jax.perf import data_bench
from gpas_jax.perf import tpu_table
from tests.helpers import DATA_CACHE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--seconds', '0.3', '--warmup', '0', '--workers', '0', '--batch', '2', '--length', '512',
        '--vocab', '1000', '--tokenizer_type', 'bpe', '--cache_dir', DATA_CACHE]


@pytest.fixture(scope='module')
def result() -> dict:
  """One tiny run of the command line (--json): seconds, with the data cached for the suite."""
  out = subprocess.run([sys.executable, '-m', 'gpas_jax.perf.data_bench', *TINY, '--json'],
                       capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
                       env={**os.environ, 'PYTHONPATH': ROOT})
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'padded workers=0' in out.stderr  # progress goes to stderr, the one object to stdout
  return json.loads(out.stdout)


def test_folder_is_c4_like():
  folder = data_bench.build_folder(pathlib.Path(DATA_CACHE))
  names = sorted(p.name for p in folder.iterdir())
  assert names == ['c4-train.00000-of-00004.json.gz', 'c4-train.00001-of-00004.json.gz',
                   'c4-train.00002-of-00004.json.gz', 'c4-train.00003-of-00004.json.gz',
                   'c4-validation.00000-of-00001.json.gz']
  docs = []
  for name in names:
    with gzip.open(folder / name, 'rt', encoding='utf-8') as f:
      docs += [json.loads(line) for line in f]
  assert all(set(d) == {'text', 'timestamp', 'url'} for d in docs)
  sizes = sorted(len(d['text'].encode()) for d in docs)
  assert len(docs) > 500 and 1700 < sum(sizes) / len(sizes) < 2500  # ~2 KB, like C4's
  assert sizes[len(sizes) // 10] < 1200 and sizes[-1] > 4000  # short pages and a long tail
  assert data_bench.build_folder(pathlib.Path(DATA_CACHE)) == folder  # built once


@pytest.mark.parametrize('slice_name,chips,vm', [
    ('v5e-8', 8, (8, 224)), ('v5e-64', 64, (4, 112)), ('v5e-256', 256, (4, 112)),
    ('v5p-8', 4, (4, 208)), ('v5p-128', 64, (4, 208)), ('v6e-8', 8, (8, 180)),
    ('v6e-256', 256, (4, 180)), ('v4-32', 16, (4, 240))])
def test_tpu_vm(slice_name, chips, vm):
  # Google's Cloud TPU docs: an 8-chip v5e/v6e slice is one VM; multi-host slices have 4 chips
  # per VM (v5e-256: 64 VMs), as have v5p and v4 hosts.
  assert data_bench.tpu_vm(slice_name, chips) == vm


def test_rates_count_every_position(result):
  rates = result['rates']
  assert [(r['layout'], r['workers']) for r in rates] == [('padded', 0), ('packed', 0)]
  for r in rates:
    tokens = r['batches'] * r['rows'] * r['length']
    assert (r['rows'], r['length']) == (2, 512) and r['batches'] > 0
    assert r['tokens_per_s'] == pytest.approx(tokens / r['wall_s'])
    assert r['tokens_per_cpu_s'] == pytest.approx(tokens / r['cpu_s'])
    assert 0 < r['real_tokens_per_s'] <= r['tokens_per_s']
  # 512 tokens hold the shorter documents whole: padded rows carry pads, packed rows none.
  assert rates[0]['real_tokens_per_s'] < rates[0]['tokens_per_s']
  assert rates[1]['real_tokens_per_s'] == rates[1]['tokens_per_s']


def test_needs_follow_the_tpu_table(result):
  table = [json.loads(line) for line in open(os.path.join(ROOT, 'docs', 'tpu_table.jsonl'))]
  per_core = {r['layout']: r['tokens_per_cpu_s'] for r in result['rates']}
  needs = result['needs']
  assert [(n['size'], n['slice']) for n in needs] == list(tpu_table.DEFAULTS)
  for n in needs:
    plan = [r for r in table if (r['size'], r['slice'], r['kind']) == (n['size'], n['slice'],
                                                                      n['kind'])][0]
    assert n['kind'] == 'default' or n['size'] == '1b'  # the compiler refused 1b's own plan
    assert n['tokens_per_s_per_chip'] == plan['tokens_per_s_per_chip']
    assert plan['tokens_per_s_per_chip'] == pytest.approx(
        plan['batch'] * plan['seq'] / plan['estimated_step_s'] / plan['devices'])
    chips, vcpus = data_bench.tpu_vm(n['slice'], plan['devices'])
    assert (n['chips_per_host'], n['vcpus_per_host']) == (chips, vcpus)
    assert n['needed_per_host'] == pytest.approx(plan['tokens_per_s_per_chip'] * chips)
    assert n['auto_workers'] == workers.auto_worker_count(vcpus) == 16
    for layout, v in n['layouts'].items():
      assert v['cores'] == pytest.approx(n['needed_per_host'] / per_core[layout])
      # No run with workers: nothing measured the trainer process's own ceiling.
      assert v['feedable_per_host'] == pytest.approx(16 * per_core[layout])
      assert v['fed'] == (v['feedable_per_host'] >= n['needed_per_host'])
  v5e8 = {n['size']: n for n in needs if n['slice'] == 'v5e-8'}
  assert v5e8['71m']['needed_per_host'] == pytest.approx(131072 / 0.10396103756570398, rel=1e-6)


def test_hungriest_plan_per_kind_of_host(result):
  hungry = {(n['slice'].split('-')[0], n['chips_per_host']): n for n in result['hungriest']}
  assert set(hungry) == {('v5e', 4), ('v5e', 8), ('v5p', 4), ('v6e', 4), ('v6e', 8), ('v4', 4)}
  assert (hungry[('v6e', 8)]['size'], hungry[('v6e', 8)]['slice']) == ('71m', 'v6e-8')
  top = max(result['hungriest'], key=lambda n: n['needed_per_host'])
  assert top['needed_per_host'] == pytest.approx(8 * top['tokens_per_s_per_chip'])


def test_the_trainer_process_caps_what_workers_feed():
  rates = [{'layout': 'packed', 'workers': 0, 'tokens_per_cpu_s': 1e6, 'main_ceiling': 0.0},
           {'layout': 'packed', 'workers': 2, 'tokens_per_cpu_s': 8e5, 'main_ceiling': 2e6},
           {'layout': 'packed', 'workers': 1, 'tokens_per_cpu_s': 9e5, 'main_ceiling': 3e6}]
  plan = {'size': '71m', 'slice': 'v6e-8', 'kind': 'best', 'devices': 8, 'batch': 512, 'seq': 256,
          'estimated_step_s': 0.045, 'tokens_per_s_per_chip': 362_000.0}
  [n] = data_bench.need([plan], rates)
  v = n['layouts']['packed']
  assert n['needed_per_host'] == pytest.approx(2.896e6) and v['cores'] == pytest.approx(2.896)
  # 16 workers could tokenize 16M tokens/s, but packing in the trainer's process stops at the
  # best ceiling measured (3M): just enough here, and not for a plan that needs more.
  assert v['feedable_per_host'] == pytest.approx(3e6) and v['fed']
  [n] = data_bench.need([{**plan, 'tokens_per_s_per_chip': 400_000.0}], rates)
  assert not n['layouts']['packed']['fed']


def test_report_tables(result):
  text = data_bench.report(result['rates'], result['needs'], result['hungriest'],
                           result['v5e_host'], result['info'])
  tables, current = [], None
  for line in text.splitlines():
    if line.startswith('|'):
      if current is None:
        current = []
        tables.append(current)
      current.append([c.strip() for c in line.strip('|').split('|')])
    else:
      current = None
  assert len(tables) == 3
  for t in tables:
    assert all(len(row) == len(t[0]) for row in t)  # header, rule and rows line up
  rates, needs, hungry = (t[2:] for t in tables)
  assert [row[:3] for row in rates] == [['padded', '0', '2 x 512'], ['packed', '0', '2 x 512']]
  assert [row[0] for row in needs] == [size for size, _ in tpu_table.DEFAULTS]
  assert needs[0][1] == 'v5e-8 (default)' and needs[0][4] == '8, 224, 16'
  assert len(hungry) == 6
  header = tables[1][0]
  cores = header.index('cores (padded)')
  needed = float(needs[0][header.index('needed tokens/s/host')].rstrip('k').replace(',', ''))
  per_core = result['rates'][0]['tokens_per_cpu_s'] / 1e3
  # Printed to 0.1 core from a need rounded to 1k tokens/s.
  assert float(needs[0][cores]) == pytest.approx(needed / per_core, abs=0.06)


def test_what_a_v5e_host_feeds(result):
  h = result['v5e_host']
  assert (h['chips'], h['vcpus'], h['auto_workers']) == (4, 112, 16)
  table = [json.loads(line) for line in open(os.path.join(ROOT, 'docs', 'tpu_table.jsonl'))]
  v5e = [r for r in table if r['slice'].startswith('v5e-') and r.get('fits')]
  assert h['hungriest_per_chip'] == max(r['tokens_per_s_per_chip'] for r in v5e)
  for r in result['rates']:
    v = h['layouts'][r['layout']]
    assert v['auto']['per_chip'] == pytest.approx(16 * r['tokens_per_cpu_s'] / 4)
    assert v['none']['per_chip'] == pytest.approx(r['tokens_per_cpu_s'] / 4)
    for label in ('auto', 'none'):
      assert v[label]['hungry'] == [f'{p["size"]}@{p["slice"]}' for p in v5e
                                    if p['tokens_per_s_per_chip'] > v[label]['per_chip']]
