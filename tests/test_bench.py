"""gpas_jax.perf.bench: the statistics of its ratios, and a tiny run with every kind of variant.

Nothing here asserts a speed (the machine is shared): the figures exist, are positive and
finite, ratios are taken per round, and every variant is either timed or listed with a reason.
The FLOP count's hand check is tests/test_metrics.py::test_flops_against_hand_count.
"""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from gpas_jax.perf import bench
from gpas_jax.perf import bench_jax
from gpas_jax.perf import bench_report
from gpas_jax.runtime import allocator
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


@pytest.mark.parametrize('n,k', [(30, 10), (20, 6), (10, 2), (6, 1)])
def test_median_interval_matches_the_binomial_table(n, k):
  # The standard ~95% order-statistic interval of the median: x_(k) .. x_(n+1-k).
  xs = [float(i) for i in range(1, n + 1)][::-1]  # unsorted input
  lo, hi, coverage = bench_report.median_interval(xs)
  assert (lo, hi) == (k, n + 1 - k)
  expected = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n
  assert coverage == pytest.approx(expected) and coverage >= 0.95


def test_few_rounds_give_min_max_with_their_lower_coverage():
  lo, hi, coverage = bench_report.median_interval([3.0, 1.0, 2.0])
  assert (lo, hi) == (1.0, 3.0) and coverage == pytest.approx(0.75)


def test_ratios_are_taken_per_round():
  main = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # a load that changes from round to round
  factors = [1.1, 1.2, 1.0, 1.3, 0.9, 1.05]
  s = bench_report.speedup(main, [t * f for t, f in zip(main, factors)])
  assert (s['min'], s['max']) == pytest.approx((0.9, 1.3))
  assert s['median'] == pytest.approx(1.075) and s['rounds'] == 6
  assert s['of_medians'] == pytest.approx((3.0 + 4.5) / 2 / 3.5)
  o = bench_report.overhead([1.02, 2.04, 1.02], [1.0, 2.0, 1.0])
  assert o['median'] == pytest.approx(0.02) and o['of_minima'] == pytest.approx(0.02)


def test_verdicts_need_the_interval_for_a_plain_met():
  s = {'median': 1.4, 'low': 1.31, 'high': 1.5}
  assert bench_report.verdict('speedup', s, 1.3).endswith(': MET')
  assert 'MET on the median' in bench_report.verdict('speedup', dict(s, low=1.2), 1.3)
  assert 'NOT MET' in bench_report.verdict('speedup', dict(s, median=1.25, low=1.2), 1.3)
  o = {'median': 0.01, 'low': -0.02, 'high': 0.025}
  assert bench_report.verdict('overhead', o, 0.03).endswith(': MET')
  assert 'not inside' in bench_report.verdict('overhead', dict(o, low=-0.05), 0.03)
  assert 'NOT MET' in bench_report.verdict('overhead', dict(o, median=0.04), 0.03)
  assert bench_report.verdict('overhead', o, None) == ''


def test_try_overrides_split_config_and_environment():
  config, env = bench_jax.parse_overrides(
      'model.attention_impl=einsum; model.scan_layers=True;XLA_FLAGS=--xla_cpu_use_onednn=true')
  assert config == {'model.attention_impl': 'einsum', 'model.scan_layers': True}
  assert env == {'XLA_FLAGS': '--xla_cpu_use_onednn=true'}
  c = bench_jax.apply_overrides(tiny_train_config(), config)
  assert c.model.attention_impl == 'einsum' and c.model.scan_layers is True
  with pytest.raises(ValueError, match="no field 'model.attention'"):
    bench_jax.apply_overrides(tiny_train_config(), {'model.attention': 'x'})
  with pytest.raises(ValueError, match='not key=value'):
    bench_jax.parse_overrides('model.scan_layers')


def test_benchmark_times_every_variant_or_says_why_not():
  config = tiny_train_config()
  results = bench.run_benchmark(
      config, steps=3, warmup=1, torch=True, torch_compile=False, torch_threads=1,
      other_mallocs=False, tries=('model.attention_impl=einsum',
                                  'XLA_FLAGS=--xla_cpu_enable_fast_math=false'),
      devices=jax.devices()[:1], log=lambda s: None)
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
  main = results['main']
  assert main.startswith('jax pre_gpas (')
  assert {main, 'jax pre', 'torch eager (glibc malloc)', 'jax try model.attention_impl=einsum',
          'jax try XLA_FLAGS=--xla_cpu_enable_fast_math=false'} <= names
  for v in results['variants'].values():
    assert len(v['times_s']) == 3 and all(t > 0 for t in v['times_s'])
  for name in allocator.PREFERENCE:
    if name in results['mallocs_found']:
      assert f'torch eager ({name})' in names
    else:
      assert 'not installed' in results['not_run'][f'{name} variants']
  assert results['not_run']['torch compile'] == '--notorch_compile'
  assert results['not_run']['JAX under other mallocs'] == '--noother_mallocs'
  if 'baseline_faithful' not in config:
    assert 'no baseline_faithful field' in results['not_run']['jax baseline_faithful']
  comps = {c['id']: c for c in results['comparisons']}
  assert {'gpas_overhead', 'vs_torch_eager_default', 'try model.attention_impl=einsum',
          'try XLA_FLAGS=--xla_cpu_enable_fast_math=false'} <= set(comps)
  for c in comps.values():
    s = c['stats']
    assert s['rounds'] == 3 and s['low'] <= s['median'] <= s['high'], c
  assert comps['gpas_overhead']['target'] == bench.TARGETS['gpas_overhead']
  assert 'GPAS overhead' in report and 'target' in report and 'not run: --notorch_compile' in report


def test_baseline_faithful_variant_when_the_config_has_the_field():
  config = tiny_train_config()
  if 'baseline_faithful' not in config:  # before issue 9's field: the wiring, with no effect
    config.baseline_faithful = False
  results = bench.run_benchmark(config, steps=2, warmup=0, compare_gpas=False,
                                other_mallocs=False, devices=jax.devices()[:1],
                                log=lambda s: None)
  assert 'jax baseline_faithful' not in results['not_run']
  assert 'jax pre_gpas baseline_faithful=True' in results['variants']
  comps = {c['id']: c for c in results['comparisons']}
  assert comps['baseline_faithful_cost']['target'] == bench.TARGETS['baseline_faithful_cost']
  assert comps['baseline_faithful_cost']['stats']['rounds'] == 2
  assert 'baseline_faithful cost' in bench.format_report(results)


def test_command_line_prints_one_json_object():
  cmd = [sys.executable, '-m', 'gpas_jax.perf.bench', '--config', 'configs/tiny.py', '--steps', '1',
         '--warmup', '0', '--nocompare_gpas', '--json',
         '--config.model.hidden_size=32', '--config.model.intermediate_size=64',
         '--config.model.num_layers=1', '--config.model.vocab_size=256',
         '--config.data.tokenizer_vocab_size=256', '--config.data.max_length=32',
         '--config.optim.global_batch_size=2', '--config.data.eval_batch_size=2']
  env = {k: v for k, v in os.environ.items() if k not in (
      'LD_PRELOAD', allocator.ALLOCATOR_ENV, allocator.OPT_OUT_ENV, 'GPAS_ALLOCATOR_REEXEC')}
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                       env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  assert _finite_positive(results['jax']['tokens_per_s'])
  assert 'step time' in out.stderr  # the human-readable report goes to stderr with --json
  # The launcher re-executed the process with the fastest malloc installed (the pinned wheel's
  # mimalloc at least), and the JAX step was timed under it and under glibc's.
  best = next(n for n in allocator.PREFERENCE if n in allocator.available())
  assert results['jax_allocator'].startswith(f'{best} (')
  assert f'jax pre_gpas ({best})' in results['variants']
  assert 'jax pre_gpas (glibc malloc)' in results['variants']
  assert results['fastest_malloc'] in (best, 'default')
