"""gpas_jax.runtime.allocator: which malloc the launcher preloads, its environment, and the re-exec."""

import os
import subprocess
import sys

import pytest

from gpas_jax.runtime import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOTH = {'jemalloc': '/lib/libjemalloc.so.2', 'mimalloc': '/wheel/libmimalloc.so'}
MIMALLOC_ONLY = {'mimalloc': '/wheel/libmimalloc.so'}


def test_auto_picks_the_fastest_installed_one_on_cpu_hosts():
  assert allocator.choose({}, BOTH, cpu_only=True)[:2] == ('jemalloc', BOTH['jemalloc'])
  assert allocator.choose({}, MIMALLOC_ONLY, cpu_only=True)[:2] == ('mimalloc',
                                                                    MIMALLOC_ONLY['mimalloc'])
  name, path, why = allocator.choose({}, {}, cpu_only=True)
  assert (name, path) == ('default', None) and 'pip install -r requirements.txt' in why


def test_accelerator_hosts_preload_only_when_asked():
  assert allocator.choose({}, BOTH, cpu_only=False)[0] == 'default'
  env = {allocator.ALLOCATOR_ENV: 'mimalloc'}
  assert allocator.choose(env, BOTH, cpu_only=False)[0] == 'mimalloc'


def test_opt_outs_and_explicit_choices():
  for env in ({allocator.ALLOCATOR_ENV: 'default'}, {allocator.ALLOCATOR_ENV: 'glibc'},
              {allocator.OPT_OUT_ENV: '1'}):
    assert allocator.choose(env, BOTH, cpu_only=True)[0] == 'default', env
  assert allocator.choose({allocator.OPT_OUT_ENV: '0'}, BOTH, cpu_only=True)[0] == 'jemalloc'
  env = {allocator.ALLOCATOR_ENV: 'MiMalloc'}
  assert allocator.choose(env, BOTH, cpu_only=True)[0] == 'mimalloc'


def test_bad_or_missing_choices_fail_with_the_fix():
  with pytest.raises(ValueError, match="'tcmalloc'.*auto, default, jemalloc, mimalloc"):
    allocator.choose({allocator.ALLOCATOR_ENV: 'tcmalloc'}, BOTH, cpu_only=True)
  with pytest.raises(FileNotFoundError, match='apt-get install libjemalloc2.*GPAS_JEMALLOC_PATH'):
    allocator.choose({allocator.ALLOCATOR_ENV: 'jemalloc'}, MIMALLOC_ONLY, cpu_only=True)


def test_the_pinned_wheel_provides_mimalloc(tmp_path):
  path = allocator.find('mimalloc', env={})
  assert path is not None, 'cmeel-mimalloc (requirements.txt) is not installed'
  assert os.path.basename(path).startswith('libmimalloc.so') and os.path.isfile(path)
  lib = tmp_path / 'libmimalloc.so'
  lib.write_bytes(b'')
  assert allocator.find('mimalloc', env={'GPAS_MIMALLOC_PATH': str(lib)}) == str(lib)
  assert allocator.find('mimalloc', env={'GPAS_MIMALLOC_PATH': str(tmp_path / 'no.so')}) is None


def test_allocator_env_swaps_libraries_and_settings():
  env = {'LD_PRELOAD': '/x/libjemalloc.so.2:/y/libfoo.so',
         'MALLOC_CONF': 'a:1', 'GPAS_NO_JEMALLOC': '1', 'GPAS_MIMALLOC_PATH': '/dev/null'}
  mi = allocator.allocator_env('mimalloc', env)
  assert mi['LD_PRELOAD'] == '/dev/null:/y/libfoo.so'
  assert 'MALLOC_CONF' not in mi and 'GPAS_NO_JEMALLOC' not in mi
  assert mi['MIMALLOC_PURGE_DELAY'] == '-1' and mi['MIMALLOC_ARENA_EAGER_COMMIT'] == '1'
  assert mi[allocator.ALLOCATOR_ENV] == 'mimalloc'
  plain = allocator.allocator_env('default', dict(mi, LD_PRELOAD='/w/libmimalloc.so.3'))
  assert 'LD_PRELOAD' not in plain and 'MIMALLOC_PURGE_DELAY' not in plain
  assert plain[allocator.ALLOCATOR_ENV] == 'default'


def test_loaded_reads_the_process_maps():
  assert allocator.loaded('7f00 r-xp /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n') == 'jemalloc'
  assert allocator.loaded('7f00 r-xp /site-packages/cmeel.prefix/lib/libmimalloc.so\n') == 'mimalloc'
  assert allocator.loaded('7f00 r-xp /usr/lib/x86_64-linux-gnu/libc.so.6\n') is None


_LAUNCHER = """
import os, sys
sys.path.insert(0, {root!r})
from gpas_jax.runtime import allocator
print('pid', os.getpid(), sys.argv[1:], flush=True)
allocator.reexec_with_fast_malloc()
print('loaded', allocator.loaded(), flush=True)
print('describe', allocator.describe(), flush=True)
"""


@pytest.mark.parametrize('setting,expected', [(None, 'auto'), ('default', None)])
def test_launcher_reexecutes_once_with_the_chosen_malloc(tmp_path, setting, expected):
  script = tmp_path / 'launch.py'
  script.write_text(_LAUNCHER.format(root=ROOT))
  env = {k: v for k, v in os.environ.items()
         if k not in ('LD_PRELOAD', allocator.ALLOCATOR_ENV, allocator.OPT_OUT_ENV,
                      'GPAS_ALLOCATOR_REEXEC')}
  env['JAX_PLATFORMS'] = 'cpu'
  if setting:
    env[allocator.ALLOCATOR_ENV] = setting
  out = subprocess.run([sys.executable, str(script), 'a', '--b=1'], env=env, capture_output=True,
                       text=True, timeout=60, check=True).stdout.splitlines()
  if expected == 'auto':
    expected = allocator.choose(env, allocator.available(env), cpu_only=True)[0]
    assert expected != 'default'  # the pinned mimalloc wheel at least
    pids = [line for line in out if line.startswith('pid')]
    assert len(pids) == 2 and pids[0] == pids[1], out  # once more, same pid and arguments
    assert "['a', '--b=1']" in pids[1]
    assert f'loaded {expected}' in out
    assert any(line.startswith(f'describe {expected} (') for line in out), out
  else:
    assert len([line for line in out if line.startswith('pid')]) == 1, out
    assert 'loaded None' in out
    assert 'describe default (glibc malloc): opted out' in ' '.join(out)


def test_a_library_that_fails_to_preload_runs_glibc_once_and_says_so(tmp_path):
  script = tmp_path / 'launch.py'
  script.write_text(_LAUNCHER.format(root=ROOT))
  broken = tmp_path / 'libmimalloc.so'
  broken.write_bytes(b'not a library')  # the dynamic loader ignores it, with a warning
  env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', allocator.OPT_OUT_ENV,
                                                          'GPAS_ALLOCATOR_REEXEC')}
  env.update({allocator.ALLOCATOR_ENV: 'mimalloc', 'GPAS_MIMALLOC_PATH': str(broken)})
  out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                       timeout=60, check=True).stdout.splitlines()
  assert len([line for line in out if line.startswith('pid')]) == 2, out  # no re-exec loop
  assert 'loaded None' in out
  assert 'the preload of mimalloc failed' in ' '.join(out)
