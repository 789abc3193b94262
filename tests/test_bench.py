"""gpas_jax.bench on a tiny config: it runs, alternates the variants, and reports sane figures.

Nothing here asserts a speed (the machine is shared): only that the figures exist, are positive
and finite. The FLOP count's hand check is tests/test_metrics.py::test_flops_against_hand_count.
"""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from gpas_jax import allocator
from gpas_jax import bench
from tests.helpers import tiny_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finite_positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_gpas_counterparts():
  assert bench.gpas_counterpart('pre_gpas') == 'pre'
  assert bench.gpas_counterpart('pre') == 'pre_gpas'
  assert bench.gpas_counterpart('post_pre_gpas') == 'post_pre'
  assert bench.gpas_counterpart('sandwich') == 'sandwich_gpas'
  assert bench.gpas_counterpart('post') is None  # the baseline has no post_gpas


def test_benchmark_runs_with_gpas_and_torch_variants():
  config = tiny_train_config()
  results = bench.run_benchmark(config, steps=2, warmup=1, torch=True, torch_compile=False,
                                torch_threads=1, devices=jax.devices()[:1], log=lambda s: None)
  report = bench.format_report(results)
  print(report)
  json.dumps(results, default=float)  # the --json output is serialisable
  j = results['jax']
  for key in ('step_time_s', 'tokens_per_s', 'compile_s', 'flops_per_step', 'mfu',
              'peak_flops_per_device', 'process_rss_peak_bytes'):
    assert _finite_positive(j[key]), (key, j[key])
  assert _finite_positive(j['memory_analysis_bytes']['temp'])
  assert math.isfinite(j['loss'])
  names = set(results['variants'])
  assert {'jax pre_gpas', 'jax pre', 'torch eager default-alloc'} <= names
  for v in results['variants'].values():
    assert len(v['times_s']) == 2 and all(t > 0 for t in v['times_s'])
  assert math.isfinite(results['gpas_overhead']['median'])
  ratios = results['jax_over_torch_tokens_per_s']
  assert _finite_positive(ratios['torch eager default-alloc']['median'])
  if allocator.find_jemalloc():
    assert _finite_positive(ratios['torch eager jemalloc']['median'])
  assert 'GPAS overhead' in report and 'target' in report


def test_jemalloc_env_adds_and_removes_the_preload():
  env = allocator.jemalloc_env({'LD_PRELOAD': '/x/libjemalloc.so.2:/y/libfoo.so',
                                'MALLOC_CONF': 'a:1'}, enable=False)
  assert env['LD_PRELOAD'] == '/y/libfoo.so' and 'MALLOC_CONF' not in env
  if allocator.find_jemalloc() is None:
    pytest.skip('libjemalloc2 is not installed here')
  env = allocator.jemalloc_env({}, enable=True)
  assert 'jemalloc' in env['LD_PRELOAD'] and env['MALLOC_CONF'] == allocator.MALLOC_CONF


def test_command_line_prints_one_json_object():
  cmd = [sys.executable, '-m', 'gpas_jax.bench', '--config', 'configs/tiny.py', '--steps', '1',
         '--warmup', '0', '--nocompare_gpas', '--json',
         '--config.model.hidden_size=32', '--config.model.intermediate_size=64',
         '--config.model.num_layers=1', '--config.model.vocab_size=256',
         '--config.data.tokenizer_vocab_size=256', '--config.data.max_length=32',
         '--config.optim.global_batch_size=2', '--config.data.eval_batch_size=2']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  assert _finite_positive(results['jax']['tokens_per_s'])
  assert 'step time' in out.stderr  # the human-readable report goes to stderr with --json
  if allocator.find_jemalloc():  # the launcher re-executed the process with jemalloc
    assert results['jax_allocator'].startswith('jemalloc')
