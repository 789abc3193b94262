"""The results table on fabricated run directories: numbers, order, missing and unfinished runs."""

import csv
import json
import math
import os
import subprocess
import sys

import ml_collections

from gpas_jax.analysis import runs as runs_lib
from gpas_jax.analysis import table
from gpas_jax import storage


def _run(root, rel, size, norm_type, seed, ppl=None, eval_loss=None, metrics_steps=()):
  path = os.path.join(root, rel)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'size_name': size, 'seed': seed, 'model': {'norm_type': norm_type}}, f)
  for s in metrics_steps:
    storage.append_jsonl(os.path.join(path, 'metrics.jsonl'), {'step': s, 'loss': 3.0})
  if ppl is not None or eval_loss is not None:
    summary = {'step': 100, 'eval_loss': eval_loss, 'wall_s': 1.0, 'finished': True}
    if ppl is not None:
      summary['eval_ppl'] = ppl
    storage.append_jsonl(os.path.join(path, 'summary.json'), summary)
  return path


def _fabricate(root):
  for seed, ppl in enumerate([10.0, 12.0, 14.0]):
    _run(root, f'tiny/pre/seed{seed}', 'tiny', 'pre', seed, ppl=ppl)
  _run(root, 'tiny/pre_gpas/seed0', 'tiny', 'pre_gpas', 0, ppl=11.0)
  _run(root, 'tiny/pre_gpas/seed1', 'tiny', 'pre_gpas', 1, eval_loss=math.log(12.0))
  _run(root, 'tiny/sandwich/seed0', 'tiny', 'sandwich', 0, ppl=20.0)
  _run(root, 'tiny/sandwich/seed1', 'tiny', 'sandwich', 1, ppl=float('nan'))  # diverged
  # Unfinished, with a resumed (repeated) step; and one with no metrics yet.
  _run(root, 'tiny/sandwich_gpas/seed0', 'tiny', 'sandwich_gpas', 0, metrics_steps=(50, 150, 100))
  _run(root, 'tiny/sandwich_gpas/seed1', 'tiny', 'sandwich_gpas', 1)
  # Other sizes, deeper in the tree: 9m must sort before 71m.
  _run(root, 'cluster/a/71m/pre/seed0', '71m', 'pre', 0, ppl=33.98)
  _run(root, 'cluster/a/71m/pre_gpas/seed0', '71m', 'pre_gpas', 0, ppl=33.38)
  _run(root, 'cluster/b/9m/post/seed0', '9m', 'post', 0, ppl=50.0)
  # Not runs: an HF export inside a run and one outside.
  os.makedirs(os.path.join(root, 'tiny/pre/seed0/hf'))
  with open(os.path.join(root, 'tiny/pre/seed0/hf/config.json'), 'w') as f:
    json.dump({'size_name': 'x', 'model': {'norm_type': 'pre'}}, f)
  os.makedirs(os.path.join(root, 'export'))
  with open(os.path.join(root, 'export/config.json'), 'w') as f:
    json.dump({'hidden_size': 32, 'norm_type': 'pre'}, f)


SWEEP = ml_collections.ConfigDict({'sizes': ('tiny',), 'seeds': (0, 1, 2),
                                   'norm_types': ('pre', 'pre_gpas', 'sandwich', 'sandwich_gpas'),
                                   'base_config': 'configs/tiny.py', 'overrides': {}})


def test_table_numbers(tmp_path):
  _fabricate(str(tmp_path))
  md_path, csv_path, t = table.write_table(str(tmp_path), str(tmp_path / 'out'), SWEEP)
  assert t.sizes == ['tiny', '9m', '71m'] and t.bases == ['pre', 'post', 'sandwich']
  with open(md_path, encoding='utf-8') as f:
    md = f.read()
  lines = md.splitlines()
  assert lines[2] == ('| size | pre | pre+GPAS | delta | post | sandwich | sandwich+GPAS | '
                      'delta |')
  # pre: 10, 12, 14 -> 12 ± 2; pre_gpas: 11, exp(log 12) -> 11.5 ± 0.71; delta -0.50.
  assert lines[4] == ('| tiny | 12.00 ± 2.00 (3) | 11.50 ± 0.71 (2) | -0.50 | — | '
                      '20.00 (1) [1 diverged] | — | — |')
  assert lines[5] == '| 9m | — | — | — | 50.00 (1) | — | — | — |'
  assert lines[6] == '| 71m | 33.98 (1) | 33.38 (1) | -0.60 | — | — | — | — |'
  missing = md[md.index('Missing runs'):md.index('Unfinished runs')]
  assert missing.splitlines()[1:-1] == [
      '- tiny / pre_gpas / seed 2', '- tiny / sandwich / seed 2', '- tiny / sandwich_gpas / seed 2']
  unfinished = md[md.index('Unfinished runs'):].splitlines()
  assert unfinished[0] == 'Unfinished runs (2):'
  assert unfinished[1].startswith('- tiny / sandwich_gpas / seed 0: last step 150 (')
  assert unfinished[2].startswith('- tiny / sandwich_gpas / seed 1: last step none (')

  with open(csv_path, encoding='utf-8', newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['size'] for r in rows] == ['tiny', '9m', '71m']
  tiny = rows[0]
  assert float(tiny['pre_mean']) == 12.0 and float(tiny['pre_std']) == 2.0
  assert tiny['pre_n'] == '3' and tiny['pre_gpas_n'] == '2'
  assert math.isclose(float(tiny['pre_gpas_mean']), 11.5, rel_tol=1e-12)
  assert math.isclose(float(tiny['pre_gpas_std']), math.sqrt(0.5), rel_tol=1e-12)
  assert math.isclose(float(tiny['pre_delta']), -0.5, rel_tol=1e-12)
  assert tiny['sandwich_std'] == '' and tiny['sandwich_diverged'] == '1'
  assert tiny['sandwich_gpas_mean'] == '' and tiny['sandwich_delta'] == ''
  assert math.isclose(float(rows[2]['pre_delta']), 33.38 - 33.98, rel_tol=1e-12)
  assert 'post_gpas_mean' not in tiny and rows[1]['post_mean'] == '50.0'


def test_size_order():
  assert sorted(['1b', '71m', 'tiny', '9m', '350m', 'odd', '7b'], key=table.size_key) == [
      'tiny', '9m', '71m', '350m', '1b', '7b', 'odd']


def test_cli_with_a_sweep_file(tmp_path):
  _fabricate(str(tmp_path / 'runs'))
  sweep = tmp_path / 'sweep.py'
  sweep.write_text(
      'import ml_collections\n\ndef get_config():\n'
      "  return ml_collections.ConfigDict({'sizes': ('tiny',), 'seeds': (0, 1, 2),\n"
      "      'norm_types': ('pre', 'pre_gpas'), 'base_config': 'configs/tiny.py',\n"
      "      'overrides': {}})\n")
  out = subprocess.run(
      [sys.executable, '-m', 'gpas_jax.analysis.table', '--root', str(tmp_path / 'runs'),
       '--out', str(tmp_path / 'o'), '--sweep', str(sweep)],
      capture_output=True, text=True, check=True, cwd=os.getcwd()).stdout
  assert '| tiny | 12.00 ± 2.00 (3) | 11.50 ± 0.71 (2) | -0.50 |' in out
  assert 'Missing runs (1):\n- tiny / pre_gpas / seed 2\n' in out
  assert sorted(os.listdir(tmp_path / 'o')) == ['table.csv', 'table.md']
