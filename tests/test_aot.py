"""gpas_jax.perf.aot: the train step compiled on abstract arrays over 8 fake devices, memory and FLOPs."""

import os
import subprocess
import sys

import jax
import pytest

from gpas_jax.perf import aot
from tests.helpers import tiny_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  c = tiny_train_config(**overrides)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return c


@pytest.mark.parametrize('remat,scan', [('none', False), ('full', True)])
def test_plan_reports_memory_and_flops(remat, scan):
  c = _config(**{'model.remat_policy': remat, 'model.scan_layers': scan})
  p = aot.plan(c, chip='v5e')
  print(aot.format_plan(p))
  assert p['devices'] == 8 and p['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert p['params_bytes_per_device'] > 0 and p['opt_state_bytes_per_device'] > 0
  # Adam: two moments per parameter (and a scalar count), sharded like the parameters.
  assert p['opt_state_bytes_per_device'] == pytest.approx(2 * p['params_bytes_per_device'],
                                                          rel=0.05)
  mem = p['memory_analysis_bytes']
  assert mem['temp'] > 0 and mem['argument'] > 0 and mem['peak_estimate'] > mem['temp']
  assert p['fits'] is True and p['chip'] == 'v5e'
  # Per device: the parameters are sharded over fsdp x tensor (4 ways, the 1-D norms aside).
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(p_abstract(c)))
  assert total / 4 <= p['params_bytes_per_device'] < total / 2
  # XLA's count (unrolled layers) is the model count, + the recomputed forward with remat, +
  # the elementwise work the model count leaves out: within a small factor.
  ratio = p['xla_over_model_flops']
  assert 0.9 < ratio < 2.5, ratio
  if remat == 'full':
    assert ratio > 1.2  # the forward is recomputed


def p_abstract(c):
  from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel
  return steps.setup(c).abstract_state['params']


def test_parse_mesh():
  assert aot.parse_mesh('1,64,1') == (1, 64, 1)
  from gpas_jax.runtime import cli  # pylint: disable=import-outside-toplevel
  for bad in ('1,64', 'abc', '1,0,1'):
    with pytest.raises(cli.UserError, match=f'--mesh={bad}: give data,fsdp,tensor'):
      aot.parse_mesh(bad)


def test_compile_study_runs_small():
  r = aot.compile_study(layers_scanned=(1, 2), unscanned=2, hidden=32, ffn=64, heads=2, vocab=64,
                        seq=16, repeats=1, log=lambda s: None)
  assert r['scan_1'] > 0 and r['scan_2'] > 0 and r['loop_2'] > 0
  assert r['scan_2_over_scan_1'] > 0 and r['loop_2_over_scan_2'] > 0


def test_command_line_sets_its_own_fake_devices():
  cmd = [sys.executable, '-m', 'gpas_jax.perf.aot', '--config', 'configs/tiny.py', '--mesh', '1,4,1',
         '--chip', 'v5e', '--remat', 'full', '--config.model.hidden_size=32',
         '--config.model.intermediate_size=64', '--config.model.num_layers=2',
         '--config.model.vocab_size=256', '--config.data.max_length=32',
         '--config.optim.global_batch_size=8', '--config.data.eval_batch_size=8']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert '4 devices' in out.stdout and 'FITS' in out.stdout and 'TFLOP' in out.stdout
