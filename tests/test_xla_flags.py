"""config.xla_flags: checked, added to XLA_FLAGS unless set there, in effect in train.py's run."""

import os
import re
import subprocess
import sys

import ml_collections
import pytest

from gpas_jax import config as config_lib
from gpas_jax.perf import bench_jax
from gpas_jax.runtime import xla_flags
from tests.helpers import tiny_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YNN = '--xla_cpu_experimental_ynn_fusion_type'


def _config(flags):
  return ml_collections.ConfigDict({'xla_flags': flags})


def test_config_flags_are_appended_once_and_never_override_the_environment():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  c = _config(f'{YNN}=reduce  --xla_cpu_enable_fast_math=false')
  assert xla_flags.apply(c, env) == [f'{YNN}=reduce', '--xla_cpu_enable_fast_math=false']
  assert env['XLA_FLAGS'] == (f'--xla_force_host_platform_device_count=8 {YNN}=reduce '
                              '--xla_cpu_enable_fast_math=false')
  assert xla_flags.apply(c, env) == [] and env['XLA_FLAGS'].count(YNN) == 1  # idempotent
  assert xla_flags.not_in_effect(c, env) == []
  own = {'XLA_FLAGS': f'{YNN}=individual_dot,reduce'}
  assert xla_flags.apply(_config(f'{YNN}=reduce'), own) == []
  assert own['XLA_FLAGS'] == f'{YNN}=individual_dot,reduce'  # the user's setting wins
  none = {}
  assert xla_flags.apply(_config(''), none) == [] and 'XLA_FLAGS' not in none
  assert xla_flags.not_in_effect(_config(f'{YNN}=reduce'), {}) == [f'{YNN}=reduce']
  assert xla_flags.describe({}) == 'none'


@pytest.mark.parametrize('bad', ['xla_cpu_use_onednn=true', '--', '--=x', f'{YNN}=reduce -O2'])
def test_a_word_that_is_no_flag_is_refused_before_anything_runs(bad):
  with pytest.raises(config_lib.ConfigError, match='is not an XLA flag'):
    config_lib.validate(tiny_train_config(xla_flags=bad))


def test_bench_tries_xla_flags_in_a_worker():
  assert bench_jax.parse_overrides(f'xla_flags={YNN}=reduce') == ({}, {'XLA_FLAGS': f'{YNN}=reduce'})


def test_the_bench_config_runs_dots_on_eigen_and_reductions_on_ynnpack():
  from configs import bench_cpu  # pylint: disable=import-outside-toplevel
  assert bench_cpu.get_config().xla_flags == f'{YNN}=reduce'
  # In a fresh process (flags must precede the backend): a dot of its own is YNNPACK's under
  # XLA's default and Eigen's under the config's flag; the reduction is YNNPACK's either way.
  script = (
      'import re, sys, jax, jax.numpy as jnp\n'
      'from configs import bench_cpu\n'
      'from gpas_jax.runtime import xla_flags\n'
      'if sys.argv[1] == "config": xla_flags.apply(bench_cpu.get_config())\n'
      'f = jax.jit(lambda a, b: (a @ b, jnp.sum(jnp.exp(a), axis=1)))\n'
      'hlo = f.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()\n'
      'called = re.findall(r"calls=%([^,\\s]+).*__ynn_fusion", hlo)\n'
      'bodies = dict(re.findall(r"^%(\\S+) \\(.*?\\{\\n(.*?)\\n\\}", hlo, re.M | re.S))\n'
      'ynn = [bodies[c] for c in called]\n'
      'print(any(" dot(" in b for b in ynn), any("reduce(" in b for b in ynn))\n')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = ROOT
  out = {}
  for mode in ('default', 'config'):
    r = subprocess.run([sys.executable, '-c', script, mode], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    out[mode] = r.stdout.split()[-2:]
  assert out == {'default': ['True', 'True'], 'config': ['False', 'True']}


def test_train_py_applies_config_flags_and_names_them_in_its_start_up_block(tmp_path):
  cfg = tmp_path / 'cfg.py'
  cfg.write_text('from tests.helpers import tiny_train_config\n\n'
                 'def get_config():\n'
                 '  return tiny_train_config(num_train_steps=1, **{"optim.warmup_steps": 0})\n')
  env = dict(os.environ, PYTHONPATH=ROOT, GPAS_NO_JEMALLOC='1',
             XLA_FLAGS='--xla_backend_optimization_level=0')
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), f'--config={cfg}',
                      f'--config.xla_flags={YNN}=reduce', f'--workdir={tmp_path / "run"}'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'XLA_FLAGS     --xla_backend_optimization_level=0 {YNN}=reduce' in r.stdout, r.stdout
  assert re.search(r'final step 1: eval loss', r.stdout)


def test_in_process_training_warns_when_config_flags_are_not_in_effect(tmp_path, caplog):
  from gpas_jax.train import trainer  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  c = tiny_train_config(num_train_steps=1, xla_flags='--xla_cpu_enable_fast_min_max=false',
                        **{'optim.warmup_steps': 0})
  trainer.train(c, str(tmp_path), jax.devices()[:1])
  assert 'config.xla_flags --xla_cpu_enable_fast_min_max=false are not in XLA_FLAGS' in caplog.text
