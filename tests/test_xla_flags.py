"""XLA:CPU defaults: added to XLA_FLAGS unless set, in effect in this process and in train.py."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

from gpas_jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YNN = '--xla_cpu_experimental_ynn_fusion_type'


def test_defaults_are_appended_once_and_never_override_the_user():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert xla_flags.apply_cpu_defaults(env) == [f'{YNN}=reduce']
  assert env['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=8 {YNN}=reduce'
  assert xla_flags.apply_cpu_defaults(env) == []  # idempotent: a re-executed launcher
  assert env['XLA_FLAGS'].count(YNN) == 1
  own = {'XLA_FLAGS': f'{YNN}=individual_dot,reduce'}
  assert xla_flags.apply_cpu_defaults(own) == [] and own['XLA_FLAGS'] == f'{YNN}=individual_dot,reduce'
  empty = {}
  xla_flags.apply_cpu_defaults(empty)
  assert empty['XLA_FLAGS'] == f'{YNN}=reduce'
  off = {xla_flags.OPT_OUT_ENV: '0'}
  assert xla_flags.apply_cpu_defaults(off) == [] and 'XLA_FLAGS' not in off
  assert xla_flags.describe({}) == 'none'


def _ynn_fusion_bodies(hlo: str) -> list[str]:
  called = re.findall(r'kind=kCustom, calls=%([^,\s]+).*__ynn_fusion', hlo)
  bodies = {m.group(1): m.group(2) for m in re.finditer(r'^%(\S+) \(.*?\{\n(.*?)\n\}', hlo,
                                                         re.M | re.S)}
  return [bodies[c] for c in called]


def test_this_process_compiles_dots_on_eigen_and_reductions_on_ynnpack():
  assert f'{YNN}=reduce' in os.environ['XLA_FLAGS']  # tests/conftest.py, as train.py does
  # A dot of its own (under XLA's default, YNNPACK's) and a reduction (YNNPACK's either way).
  # A dot whose only use is a reduction may still be fused into YNNPACK's reduction.
  f = jax.jit(lambda a, b: (a @ b, jnp.sum(jnp.exp(a), axis=1)))
  hlo = f.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
  bodies = _ynn_fusion_bodies(hlo)
  assert ' dot(' in hlo and not any(' dot(' in b for b in bodies), hlo
  assert any('reduce(' in b for b in bodies), hlo


def test_train_py_adds_the_defaults_and_names_them_in_its_start_up_block(tmp_path):
  cfg = tmp_path / 'cfg.py'
  cfg.write_text('from tests.helpers import tiny_train_config\n\n'
                 'def get_config():\n'
                 '  return tiny_train_config(num_train_steps=1, **{"optim.warmup_steps": 0})\n')
  env = dict(os.environ, PYTHONPATH=ROOT, GPAS_NO_JEMALLOC='1',
             XLA_FLAGS='--xla_backend_optimization_level=0')
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), f'--config={cfg}',
                      f'--workdir={tmp_path / "run"}'], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'XLA_FLAGS     --xla_backend_optimization_level=0 {YNN}=reduce' in r.stdout, r.stdout
