"""The TPU compiler (libtpu, the tpu extra) on abstract v5e devices: train and eval steps of the
tiny config compiled for a slice and for 2 slices, memory and cost read back; the scan's cost
corrected; a wrong sharding rule caught by the HBM it costs; the command line's JSON."""

import json
import os
import subprocess
import sys

import jax
import pytest

from gpas_jax import sharding
from tests.helpers import compiler_config

pytest.importorskip('libtpu', reason='the TPU compiler needs the tpu extra (pip install .[tpu])')

from gpas_jax.perf import tpu_plan  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024.0 ** 3


def _config(**overrides):
  """The tiny config scanned, remat'd, pure bf16, fsdp over the 4 chips of a v5e:2x2."""
  return compiler_config(4, **overrides)


def _state_bytes(c) -> float:
  from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel
  s = steps.setup(c, jax.devices('cpu')[:4])
  return float(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s.abstract_state)))


def test_tiny_train_and_eval_step_compile_for_v5e_with_scan_cost_corrected():
  c = _config()
  r = tpu_plan.compile_steps(c, 'v5e:2x2')
  assert r['compiler'] == 'tpu' and r['devices'] == 4 and r['fits'] is True
  assert r['hbm_bytes_per_chip'] == 16 * GIB
  mem = r['memory_bytes']
  assert mem['argument'] > 0 and 0 < r['peak_bytes_per_chip'] < r['hbm_bytes_per_chip']
  assert r['cost']['flops'] > 0 and r['cost']['bytes accessed'] > 0
  assert 0 < r['estimated_step_s'] < 1 and 0 < r['estimated_mfu'] < 1
  assert r['eval']['peak_bytes_per_chip'] > 0 and r['eval']['rows'] % 4 == 0
  # The TPU's cost analysis counts the scan's body once: the corrected count of the scanned
  # step matches the compiler's own count of the same step unrolled (remat full: 4/3 of the
  # model FLOPs, plus the elementwise work).
  unrolled = tpu_plan.compile_steps(_config(**{'model.scan_layers': False}), 'v5e:2x2',
                                    with_eval=False)
  assert r['cost_counted']['flops'] < 0.7 * unrolled['cost_counted']['flops']  # one layer of 4
  assert r['cost']['flops'] == pytest.approx(unrolled['cost']['flops'], rel=0.15)
  assert 1.2 < r['xla_over_model_flops'] < 2.0
  assert r['estimated_step_s'] == pytest.approx(unrolled['estimated_step_s'], rel=0.25)


@pytest.mark.parametrize('batch,group', [(16, 1), (8, 4)])
def test_release_chunks_compile_and_their_loop_is_counted(batch, group):
  """baseline_faithful's per-chunk backward, 4 chunks, fsdp over 4 chips: chunks of 4 rows run one
  after another, each split over the chips; chunks of 2 rows cannot split, so the 4 run at once,
  one a chip (one pass). Either way the corrected cost is the weighted form's (the same model
  FLOPs): the cost analysis counts a loop of chunk groups once and loop_ratio makes it whole."""
  from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel
  over = {'optim.global_batch_size': batch, 'optim.loss_chunks': 4, 'model.remat_policy': 'none'}
  c = _config(**over)
  c.baseline_faithful = True
  assert steps.chunk_layout(c, {'data': 1, 'fsdp': 4, 'tensor': 1})[0] == group
  r = tpu_plan.compile_steps(c, 'v5e:2x2', with_eval=False)
  weighted = tpu_plan.compile_steps(_config(**over), 'v5e:2x2', with_eval=False)
  assert r['fits'] is True
  assert r['loop_ratio'] == pytest.approx(weighted['loop_ratio'] * 4 / group)
  assert r['cost']['flops'] == pytest.approx(weighted['cost']['flops'], rel=0.2)
  if group == 4:  # one chunk at a time is refused before compiling, naming what fits
    c.optim.chunk_group = 1
    with pytest.raises(sharding.MeshError, match=r'set optim.chunk_group to one of \[4\]'):
      tpu_plan.compile_steps(c, 'v5e:2x2', with_eval=False)


def test_a_mesh_that_splits_a_physical_axis_is_made():
  """4 x 64 on a 16 x 16 torus (250m's release chunks over data on v6e-256) needs a physical
  axis split: jax.make_mesh refuses it, sharding.make_mesh falls back to a split device order."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  devices = tpu_plan.tpu_devices('v6e:16x16', 1)
  cfg = ml_collections.ConfigDict({'data': 4, 'fsdp': 64, 'tensor': 1, 'dcn_data': 1})
  mesh = sharding.make_mesh(cfg, devices)
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 64, 'tensor': 1}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_two_slices_over_dcn():
  c = _config(**{'model.num_layers': 2})
  c.mesh.data, c.mesh.fsdp = 2, 4  # one data replica per slice, fsdp within a slice
  r = tpu_plan.compile_steps(c, 'v5e:2x2', num_slices=2, with_eval=False)
  assert r['devices'] == 8 and r['num_slices'] == 2 and r['mesh'] == {'data': 2, 'fsdp': 4,
                                                                       'tensor': 1}
  assert r['fits'] and r['peak_bytes_per_chip'] > 0 and r['cost']['flops'] > 0


def test_replicated_embedding_costs_tpu_memory():
  # A vocab large next to the layers: the embedding and lm_head are most of the state.
  c = _config(**{'model.vocab_size': 8192, 'data.tokenizer_vocab_size': 8192,
                 'model.num_layers': 2})
  total = _state_bytes(c)
  good = tpu_plan.compile_steps(c, 'v5e:2x2', with_eval=False)
  # Sharded over fsdp: a chip holds about a quarter of the state (its arguments, the batch aside).
  assert good['memory_bytes']['argument'] < 0.35 * total
  bad = c.copy_and_resolve_references()
  bad.mesh.rules = [(k, None if k == 'embed' else v) for k, v in sharding.DEFAULT_RULES]
  wrong = tpu_plan.compile_steps(bad, 'v5e:2x2', with_eval=False)
  assert wrong['memory_bytes']['argument'] > 0.9 * total  # replicated: all of it on every chip
  assert wrong['peak_bytes_per_chip'] > 2 * good['peak_bytes_per_chip']


def test_command_line_json_and_search():
  cmd = [sys.executable, '-m', 'gpas_jax.perf.aot', '--topology', 'v5e:2x2', '--json',
         '--search', '--max_compiles', '1', '--config', 'configs/tiny.py',
         '--config.model.scan_layers=True', '--config.model.num_layers=2',
         '--config.model.param_dtype=bfloat16', '--config.model.compute_dtype=bfloat16',
         '--config.model.hidden_size=32', '--config.model.intermediate_size=64',
         '--config.model.vocab_size=256', '--config.data.max_length=32',
         '--config.optim.global_batch_size=16', '--config.data.eval_batch_size=8']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout)
  for key in ('compiler', 'topology', 'devices', 'fits', 'peak_bytes_per_chip',
              'hbm_bytes_per_chip', 'estimated_step_s', 'estimated_mfu', 'compile_s'):
    assert key in r, key
  assert r['compiler'] == 'tpu' and r['devices'] == 4 and r['fits'] is True
  assert '--config.mesh.fsdp' not in out.stdout  # stdout is the JSON alone; the table on stderr
  assert 'mesh d/f/t' in out.stderr and '4/1/1' in out.stderr  # the table: header, candidate


def test_cpu_host_with_libtpu_starts_jax_quietly():
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  code = 'import gpas_jax, jax; print(jax.devices()[0].platform)'
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120, check=True)
  if gpas_jax_tpu_present():
    pytest.skip('a TPU VM: JAX is meant to start its TPU here')
  assert out.stdout.strip() == 'cpu' and out.stderr == '', out.stderr


def gpas_jax_tpu_present() -> bool:
  import gpas_jax  # pylint: disable=import-outside-toplevel
  return gpas_jax._tpu_chip_present()  # pylint: disable=protected-access
