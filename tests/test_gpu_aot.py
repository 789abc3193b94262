"""The XLA:GPU compiler (the gpu extra) on abstract H100s, on this host without a GPU: the tiny
config's scanned, remat'd bf16 train step compiled for one node of 8 and two nodes of 8, memory
and loop-corrected FLOPs read back; a wrong sharding rule caught by the memory it costs; a plan
over HBM reported as not fitting; the command line's JSON without a CUDA toolkit in sight; JAX
quiet on the CPU with the extra installed."""

import json
import os
import subprocess
import sys
import tempfile

import jax
import pytest

from gpas_jax import sharding
from gpas_jax.perf import gpu_plan
from gpas_jax.perf import xla_plan
from tests.helpers import compiler_config

if not gpu_plan.gpu_compiler_available():
  pytest.skip('the GPU compiler needs the gpu extra (pip install .[gpu])', allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024.0 ** 3


def _config(**overrides):
  """The tiny config scanned, remat'd, pure bf16, fsdp over the 8 GPUs of a node."""
  return compiler_config(8, **overrides)


@pytest.fixture(scope='module')
def node():
  """One node of 8 H100s (the devices made once)."""
  return gpu_plan.target('h100:1x8')


# A vocab large next to the layers: the embedding and lm_head are most of the state.
BIG_VOCAB = {'model.vocab_size': 8192, 'data.tokenizer_vocab_size': 8192}


@pytest.fixture(scope='module')
def scanned(node):
  """The tiny config's scanned step and its eval step compiled for a node (made once)."""
  return xla_plan.compile_steps(_config(**BIG_VOCAB), node)


def test_tiny_steps_compile_for_an_h100_node_with_the_scan_cost_corrected(node, scanned):
  r = scanned
  assert r['compiler'] == 'gpu' and r['devices'] == 8 and r['fits'] is True
  assert r['hbm_total_bytes_per_chip'] == 84942979072  # the H100's, as CUDA reports it
  assert r['hbm_bytes_per_chip'] == pytest.approx(gpu_plan.mem_fraction() * 84942979072)
  assert r['memory_bytes']['argument'] > 0 and 0 < r['peak_bytes_per_chip'] < 1 * GIB
  assert r['cost']['flops'] > 0 and r['cost']['bytes accessed'] > 0
  assert 0 < r['estimated_step_s'] < 1 and 0 < r['estimated_mfu'] < 1
  assert r['peak_flops_per_chip'] == 989e12 and r['eval']['peak_bytes_per_chip'] > 0
  # The GPU's HLO cost analysis counts the scan's body once, as the TPU's does: the corrected
  # count matches the compiler's count of the same step unrolled (remat full: the layers'
  # forward counted again, plus elementwise work).
  unrolled = xla_plan.compile_steps(_config(**BIG_VOCAB, **{'model.scan_layers': False}), node,
                                    with_eval=False)
  assert r['cost_counted']['flops'] < 0.9 * unrolled['cost_counted']['flops']  # 1 layer of 4
  assert r['cost']['flops'] == pytest.approx(unrolled['cost']['flops'], rel=0.06)
  assert 1.05 < r['xla_over_model_flops'] < 2.0  # the head (most FLOPs here) is not remat'd


def test_two_nodes_of_eight():
  c = _config(**{'model.num_layers': 2})
  c.mesh.data, c.mesh.fsdp = 2, 8  # data over the nodes, fsdp within a node
  t = gpu_plan.target('h100:2x8')
  assert sorted({d.process_index for d in t.devices}) == [0, 1]
  r = xla_plan.compile_steps(c, t, with_eval=False)
  assert r['devices'] == 16 and r['hosts'] == 2 and r['mesh'] == {'data': 2, 'fsdp': 8,
                                                                   'tensor': 1}
  assert r['fits'] and r['peak_bytes_per_chip'] > 0 and r['cost']['flops'] > 0


def _state_bytes(c) -> float:
  from gpas_jax.train import steps  # pylint: disable=import-outside-toplevel
  s = steps.setup(c, jax.devices('cpu')[:8])
  return float(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s.abstract_state)))


def test_replicated_embedding_costs_gpu_memory(node, scanned):
  c = _config(**BIG_VOCAB)
  total = _state_bytes(c)
  assert scanned['memory_bytes']['argument'] < 0.25 * total  # an eighth of the state per GPU
  bad = c.copy_and_resolve_references()
  bad.mesh.rules = [(k, None if k == 'embed' else v) for k, v in sharding.DEFAULT_RULES]
  wrong = xla_plan.compile_steps(bad, node, with_eval=False)
  assert wrong['memory_bytes']['argument'] > 0.9 * total  # replicated: all of it on every GPU
  assert wrong['peak_bytes_per_chip'] - scanned['peak_bytes_per_chip'] > 0.5 * total


def test_a_plan_over_hbm_is_reported_as_not_fitting(node):
  """The GPU compiler compiles a program larger than a GPU's memory; the plan's own comparison
  refuses it: a replicated 1M x 2048 float32 embedding and head with their gradients and Adam
  state is 64 GiB a GPU, under the H100's 79 GiB but over the 59 GiB JAX's allocator takes."""
  c = _config(**{'model.vocab_size': 2**20, 'data.tokenizer_vocab_size': 2**20,
                 'model.hidden_size': 2048, 'model.intermediate_size': 64, 'model.num_heads': 16,
                 'model.num_layers': 1, 'model.post_num': 0, 'model.param_dtype': 'float32',
                 'data.max_length': 8, 'optim.global_batch_size': 8})
  c.mesh.data, c.mesh.fsdp = 8, 1
  r = xla_plan.compile_steps(c, node, with_eval=False)
  assert r['hbm_bytes_per_chip'] < r['peak_bytes_per_chip'] < r['hbm_total_bytes_per_chip']
  assert r['fits'] is False


def _bare_env(**extra) -> dict[str, str]:
  """This environment without a CUDA toolkit in reach: no CUDA variables, a PATH of /usr/bin
  and /bin only (the image's /usr/local/cuda/bin has a ptxas)."""
  env = {k: v for k, v in os.environ.items()
         if 'CUDA' not in k and k not in ('JAX_PLATFORMS', 'LD_LIBRARY_PATH', 'XLA_FLAGS')}
  env.update(PATH='/usr/bin:/bin', PYTHONPATH=ROOT, **extra)
  return env


CLI = [sys.executable, '-m', 'gpas_jax.perf.aot', '--topology', 'h100:1x8', '--json',
       '--config', 'configs/tiny.py', '--config.model.scan_layers=True',
       '--config.model.num_layers=2', '--config.model.hidden_size=32',
       '--config.model.intermediate_size=64', '--config.model.vocab_size=256',
       '--config.data.max_length=32', '--config.optim.global_batch_size=16',
       '--config.data.eval_batch_size=8', '--config.mesh.data=1', '--config.mesh.fsdp=8']


def test_command_line_search_json_compiles_with_the_wheels_toolkit_alone():
  out = subprocess.run(CLI + ['--search', '--max_compiles', '1'], cwd=ROOT, env=_bare_env(),
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'GPU compiler' in out.stderr and 'attention' in out.stderr  # the search's table
  assert ' 8/1/1 ' in out.stderr  # its first candidate: data-parallel over the node
  r = json.loads(out.stdout)
  assert r['eval']['peak_bytes_per_chip'] > 0  # the chosen plan's eval step
  for key in ('compiler', 'topology', 'devices', 'fits', 'peak_bytes_per_chip',
              'hbm_bytes_per_chip', 'estimated_step_s', 'estimated_mfu', 'compile_s'):
    assert key in r, key  # the TPU path's keys (tests/test_tpu_aot.py)
  assert r['compiler'] == 'gpu' and r['topology'] == 'h100:1x8' and r['fits'] is True
  assert os.path.join('nvidia', 'cuda_nvcc') in r['cuda_data_dir']  # the wheel's ptxas
  # Without the wheel's ptxas and libdevice the command refuses in one line, naming the fix.
  with tempfile.TemporaryDirectory() as empty:
    out = subprocess.run(CLI, cwd=ROOT, env=_bare_env(CUDA_ROOT=empty), capture_output=True,
                         text=True, timeout=300, check=False)
  assert out.returncode == 2 and 'nvidia-cuda-nvcc-cu12' in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize('platforms', [None, 'cpu'])
def test_cpu_host_with_the_gpu_extra_starts_jax_quietly(platforms):
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  if platforms:
    env['JAX_PLATFORMS'] = platforms
  code = 'import gpas_jax, jax; print(jax.devices()[0].platform)'
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120, check=True)
  import gpas_jax  # pylint: disable=import-outside-toplevel
  if gpas_jax._gpu_present():  # pylint: disable=protected-access
    pytest.skip('a GPU host: JAX is meant to start its GPU here')
  assert out.stdout.strip() == 'cpu' and out.stderr == '', out.stderr
