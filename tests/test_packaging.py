"""The package: pyproject pins match the requirements files; tools work from any directory."""

import os
import pathlib
import subprocess
import sys
import tomllib

from gpas_jax.train import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pins(path: pathlib.Path) -> set[str]:
  lines = (l.split('#')[0].strip() for l in path.read_text(encoding='utf-8').splitlines())
  return {l for l in lines if l}


def test_pyproject_matches_the_requirements_files():
  meta = tomllib.loads((ROOT / 'pyproject.toml').read_text(encoding='utf-8'))
  project, setup = meta['project'], meta['tool']['setuptools']
  assert project['name'] == 'gpas_jax' and project['version']
  # Runtime dependencies are read from requirements.txt itself: one list, never two.
  assert 'dependencies' in project['dynamic']
  assert setup['dynamic']['dependencies'] == {'file': ['requirements.txt']}
  assert all('==' in p for p in _pins(ROOT / 'requirements.txt'))
  extras = project['optional-dependencies']
  assert set(extras['test']) == _pins(ROOT / 'requirements-test.txt')
  torch = [p for p in extras['test'] if p.startswith('torch')]
  assert extras['torch'] == torch and torch[0].startswith('torch==')  # never unpinned
  assert any(p.startswith('tensorboard==') for p in extras['tensorboard'])
  # libtpu for the TPU compiler: pinned, the same pin as requirements-tpu.txt; CI installs it.
  assert set(extras['tpu']) == _pins(ROOT / 'requirements-tpu.txt')
  assert all(p.startswith('libtpu==') for p in extras['tpu'])
  # The GPU compiler: pinned, the same pins as requirements-gpu.txt; CI installs it; the chips'
  # descriptions ship as package data.
  assert set(extras['gpu']) == _pins(ROOT / 'requirements-gpu.txt')
  assert all('==' in p for p in extras['gpu'])
  assert '.[test,tpu,gpu]' in (ROOT / '.ci' / 'run').read_text(encoding='utf-8')
  assert meta['tool']['setuptools']['package-data']['gpas_jax.perf'] == ['gpu_specs/*.txtpb']
  # configs ships as a package, so `from configs import base` works once installed.
  assert {'configs', 'configs.*'} <= set(setup['packages']['find']['include'])
  assert (ROOT / 'configs' / '__init__.py').exists()
  assert (ROOT / 'configs' / 'sweeps' / '__init__.py').exists()


def test_tools_work_from_another_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert sweep.resolve('configs/tiny.py') == str(ROOT / 'configs' / 'tiny.py')
  assert sweep.resolve('train.py') == str(ROOT / 'train.py')
  assert sweep.load_config_file('configs/sweeps/cpu_study.py').seeds == (0, 1, 2)
  # `python -m gpas_jax.analysis --help` lists its own flags (absl puts them under --helpfull
  # unless __main__ adopts them).
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, '-m', 'gpas_jax.analysis', '--help'], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120).stdout
  for flag in ('--workdir', '--out', '--importance_batches', '--step'):
    assert f'  {flag}' in out, out
