"""scripts/gpu_bench.sh without a GPU: it fails fast with the fix, and its CPU smoke mode prints."""

import os
import subprocess
import sys
import time

from gpas_jax.perf import bench_report
from gpas_jax.train import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'gpu_bench.sh')


def _env(**extra):
  """The script runs this interpreter (a venv's python the suite runs under, activated or not)."""
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'SIZES', 'CPU_SMOKE')}
  env['PYTHON'] = sys.executable
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
  env.update(extra)
  return env


def test_without_a_gpu_it_stops_at_once_naming_the_fix(tmp_path):
  t0 = time.monotonic()
  out = subprocess.run(['bash', SCRIPT], env=_env(OUT_DIR=str(tmp_path)), capture_output=True,
                       text=True, timeout=180, check=False)
  assert out.returncode == 2, (out.stdout, out.stderr)
  assert 'sees no GPU' in out.stderr and 'jax[cuda12]' in out.stderr and 'CPU_SMOKE=1' in out.stderr
  assert '===' not in out.stdout  # no size was started
  assert time.monotonic() - t0 < 150  # seconds on an idle machine; jax's import dominates


def test_cpu_smoke_prints_every_column_for_both_attentions(tmp_path):
  out = subprocess.run(['bash', SCRIPT], env=_env(OUT_DIR=str(tmp_path), CPU_SMOKE='1',
                                                  SIZES='130m', SIZE_TIMEOUT='500'),
                       capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:] + (tmp_path / 'gpu_bench_130m.log').read_text()
  lines = out.stdout.splitlines()
  header = next(line for line in lines if line.startswith('size'))
  for column in ('step ms', 'tokens/s', 'MFU', 'compile s', 'XLA peak GiB', 'device peak GiB'):
    assert column in header
  rows = [line for line in lines if line.startswith('130m ')]
  assert len(rows) == 2 and 'attention xla' in rows[0] and 'attention einsum' in rows[1], lines
  assert all('%' in row for row in rows)  # the CPU's measured peak gives an MFU
  assert (tmp_path / 'gpu_bench_130m.json').exists()


def test_table_reports_an_unknown_chip_and_a_variant_that_did_not_compile():
  run = {'device': 'NVIDIA Z9', 'main': 'jax pre_gpas (glibc malloc)',
         'config': {'size_name': '350m', 'attention_impl': 'xla'},
         'jax': {'peak_flops_per_device': None, 'peak_flops_source': "unknown device kind 'Z9'",
                 'device_peak_bytes_in_use': 3 * 2**30},
         'variants': {'jax pre_gpas (glibc malloc)': {
             'median_s': 0.25, 'tokens_per_s': 32768.0, 'compile_s': 41.0,
             'memory_analysis_bytes': {'peak_estimate': 2.5 * 2**30}}},
         'not_run': {'jax try model.attention_impl=cudnn': 'XlaRuntimeError: no cuDNN'}}
  table = bench_report.variant_table([run])
  assert "MFU n/a: unknown device kind 'Z9'" in table
  row = next(line for line in table.splitlines() if line.startswith('350m   attention xla'))
  assert row.split()[3:] == ['250.0', '32,768', 'n/a', '41.0', '2.50', '3.0']
  assert 'model.attention_impl=cudnn: not run: XlaRuntimeError: no cuDNN' in table


def test_modern_nvidia_chips_have_a_bf16_peak():
  assert metrics.chip_name('NVIDIA H200') == 'h200'
  assert metrics.chip_name('NVIDIA B200') == 'b200'
  assert metrics.chip_name('NVIDIA GB200') == 'gb200'
  assert metrics.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert metrics.peak_flops('NVIDIA B200', 'bfloat16') == 2.25e15
