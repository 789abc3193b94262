"""A fast malloc for CPU runs: a launcher that re-executes the process with one preloaded.

Why: XLA:CPU allocates a few hundred MB of temporaries per train step. Under glibc's malloc they
are returned to the OS and page-faulted in again every step (~15% of a CPU step on the benchmark
config). An allocator told to keep freed memory mapped avoids that. Two qualify, each with the
settings that make it keep memory (their defaults do not help; docs/PERFORMANCE.md):

- jemalloc, from the system (Debian/Ubuntu `apt-get install libjemalloc2`):
  MALLOC_CONF=oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1
- mimalloc, from the `cmeel-mimalloc` wheel that requirements.txt pins (so `pip install` alone
  brings the fast path): MIMALLOC_PURGE_DELAY=-1 MIMALLOC_ARENA_EAGER_COMMIT=1

`PREFERENCE` orders them by the benchmark (`python -m gpas_jax.perf.bench` times JAX under each one
it finds). A library must be preloaded before the process starts, so `reexec_with_fast_malloc()`
replaces the current process (same pid, same arguments) with one that has it. It does nothing
off Linux, when an accelerator plugin is installed (libtpu, jax CUDA/ROCm plugins: untested
there), or when no allocator is found. GPAS_ALLOCATOR picks one: 'auto' (default), 'jemalloc',
'mimalloc' (also on accelerator hosts), or 'default' (glibc; GPAS_NO_JEMALLOC=1 means the same).
Memory freed during a run is kept by the process (RSS stays at its peak), which is what a training
process wants. Import no jax from this module.
"""

import dataclasses
import glob
import importlib.metadata
import importlib.util
import os
import sys
from typing import Callable, Mapping

ALLOCATOR_ENV = 'GPAS_ALLOCATOR'
OPT_OUT_ENV = 'GPAS_NO_JEMALLOC'  # older opt-out, same as GPAS_ALLOCATOR=default
DEFAULT = 'default'
_GUARD_ENV = 'GPAS_ALLOCATOR_REEXEC'  # set in the re-executed process: never loop
_ACCELERATOR_MODULES = ('libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin', 'jax_plugins')


@dataclasses.dataclass(frozen=True)
class Allocator:
  """A preloadable malloc: how to find it, the settings it runs with, how to install it."""
  name: str
  library_tag: str  # a substring of its file name, as /proc/self/maps shows it
  path_env: str  # an explicit path overrides the search
  settings: Mapping[str, str]
  install_hint: str


JEMALLOC = Allocator(
    'jemalloc', 'libjemalloc', 'GPAS_JEMALLOC_PATH',
    {'MALLOC_CONF': 'oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1'},
    'apt-get install libjemalloc2')
MIMALLOC = Allocator(
    'mimalloc', 'libmimalloc', 'GPAS_MIMALLOC_PATH',
    {'MIMALLOC_PURGE_DELAY': '-1', 'MIMALLOC_ARENA_EAGER_COMMIT': '1'},
    'pip install -r requirements.txt (the cmeel-mimalloc wheel)')
ALLOCATORS = {a.name: a for a in (JEMALLOC, MIMALLOC)}
# Fastest first, measured with `python -m gpas_jax.perf.bench` (docs/PERFORMANCE.md, "The allocator").
PREFERENCE = ('jemalloc', 'mimalloc')
MALLOC_CONF = JEMALLOC.settings['MALLOC_CONF']

_JEMALLOC_PATHS = (
    '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2',
    '/usr/lib/aarch64-linux-gnu/libjemalloc.so.2',
    '/usr/lib64/libjemalloc.so.2',
    '/usr/lib/libjemalloc.so.2',
    '/usr/local/lib/libjemalloc.so.2',
)


def _find_jemalloc() -> str | None:
  for path in _JEMALLOC_PATHS:
    if os.path.exists(path):
      return path
  found = sorted(glob.glob('/usr/lib/*/libjemalloc.so.2'))
  return found[0] if found else None


def _find_mimalloc() -> str | None:
  """libmimalloc.so from the installed cmeel-mimalloc distribution (no import of it needed)."""
  try:
    files = importlib.metadata.files('cmeel-mimalloc') or []
  except importlib.metadata.PackageNotFoundError:
    return None
  libs = sorted(str(f.locate()) for f in files
                if f.name.startswith('libmimalloc.so') and f.parent.name == 'lib')
  existing = [p for p in libs if os.path.exists(p)]
  return existing[0] if existing else None  # 'libmimalloc.so' sorts first


_SEARCH: dict[str, Callable[[], str | None]] = {'jemalloc': _find_jemalloc,
                                                 'mimalloc': _find_mimalloc}


def find(name: str, env: Mapping[str, str] | None = None) -> str | None:
  """The library path of allocator `name` (its *_PATH env variable first), or None."""
  env = os.environ if env is None else env
  explicit = env.get(ALLOCATORS[name].path_env)
  if explicit:
    return explicit if os.path.exists(explicit) else None
  return _SEARCH[name]()


def find_jemalloc() -> str | None:
  """The path of libjemalloc.so.2 (env GPAS_JEMALLOC_PATH first), or None."""
  return find('jemalloc')


def available(env: Mapping[str, str] | None = None) -> dict[str, str]:
  """{name: library path} of the allocators found here, fastest first."""
  paths = {name: find(name, env) for name in PREFERENCE}
  return {name: path for name, path in paths.items() if path}


def requested(env: Mapping[str, str] | None = None) -> str:
  """GPAS_ALLOCATOR's value ('auto', 'default' or an allocator name); raises on a bad value."""
  env = os.environ if env is None else env
  if env.get(OPT_OUT_ENV, '') not in ('', '0'):
    return DEFAULT
  value = env.get(ALLOCATOR_ENV, '').strip().lower() or 'auto'
  value = 'default' if value in ('glibc', 'none') else value
  if value not in ('auto', DEFAULT, *ALLOCATORS):
    raise ValueError(f'{ALLOCATOR_ENV}={value!r} is not one of auto, default, '
                     f'{", ".join(ALLOCATORS)}.')
  return value


def choose(env: Mapping[str, str], found: Mapping[str, str],
           cpu_only: bool) -> tuple[str, str | None, str]:
  """(allocator name or 'default', its library path, why) for a launch.

  `found` maps the allocators installed here to their paths; `cpu_only` is False on hosts with
  an accelerator plugin, where only an explicit GPAS_ALLOCATOR=<name> preloads one.
  """
  want = requested(env)
  if want == DEFAULT:
    return DEFAULT, None, f'opted out ({ALLOCATOR_ENV}=default)'
  if want != 'auto':
    if want not in found:
      raise FileNotFoundError(f'{ALLOCATOR_ENV}={want}, but lib{want} was not found: '
                              f'{ALLOCATORS[want].install_hint}, or set '
                              f'{ALLOCATORS[want].path_env} to the library.')
    return want, found[want], f'asked for ({ALLOCATOR_ENV}={want})'
  if not cpu_only:
    return DEFAULT, None, (f'accelerator host (set {ALLOCATOR_ENV}=jemalloc or mimalloc to '
                           'preload one)')
  for name in PREFERENCE:
    if name in found:
      return name, found[name], 'the fastest one installed'
  return DEFAULT, None, ('no fast allocator installed: pip install -r requirements.txt '
                         '(cmeel-mimalloc) or apt-get install libjemalloc2')


def loaded(maps: str | None = None) -> str | None:
  """The name of the allocator mapped into this process (from /proc/self/maps), or None."""
  if maps is None:
    try:
      with open('/proc/self/maps', encoding='utf-8') as f:
        maps = f.read()
    except OSError:
      return None
  for a in ALLOCATORS.values():
    if a.library_tag in maps:
      return a.name
  return None


def jemalloc_loaded() -> bool:
  """Whether this process has jemalloc mapped (preloaded or linked)."""
  return loaded() == 'jemalloc'


def allocator_env(name: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
  """A copy of `env` (default os.environ) that preloads allocator `name` with its settings.

  'default' removes every known allocator and its settings (glibc malloc). The copy also pins
  GPAS_ALLOCATOR, so a launcher started with it keeps that choice.
  """
  env = dict(os.environ if env is None else env)
  tags = [a.library_tag for a in ALLOCATORS.values()]
  preload = [p for p in env.get('LD_PRELOAD', '').split(':')
             if p and not any(t in p for t in tags)]
  for a in ALLOCATORS.values():
    for key in a.settings:
      env.pop(key, None)
  if name != DEFAULT:
    path = find(name, env)
    if path is None:
      a = ALLOCATORS[name]
      raise FileNotFoundError(f'lib{name} not found: {a.install_hint} (or set {a.path_env}).')
    preload.insert(0, path)
    env.update(ALLOCATORS[name].settings)
  if preload:
    env['LD_PRELOAD'] = ':'.join(preload)
  else:
    env.pop('LD_PRELOAD', None)
  env.pop(OPT_OUT_ENV, None)
  env[ALLOCATOR_ENV] = name
  return env


def jemalloc_env(env: dict[str, str] | None = None, enable: bool = True) -> dict[str, str]:
  """A copy of `env` with jemalloc preloaded and tuned, or with every fast allocator removed."""
  return allocator_env('jemalloc' if enable else DEFAULT, env)


def _cpu_only_host() -> bool:
  """No JAX accelerator plugin installed (or JAX_PLATFORMS=cpu)."""
  if os.environ.get('JAX_PLATFORMS', '').strip().lower() == 'cpu':
    return True
  for name in _ACCELERATOR_MODULES:
    try:
      if importlib.util.find_spec(name) is not None:
        return False
    except (ImportError, ValueError):
      continue
  return True


def describe() -> str:
  """Which malloc this process runs, with its settings, or why it runs glibc's."""
  name = loaded()
  if name is not None:
    settings = ' '.join(f'{k}={os.environ.get(k, "(unset: its defaults)")}'
                        for k in ALLOCATORS[name].settings)
    return f'{name} ({settings})'
  try:
    chosen, _, why = choose(os.environ, available(), _cpu_only_host())
    if chosen != DEFAULT and os.environ.get(_GUARD_ENV):
      why = f'the preload of {chosen} failed (LD_PRELOAD={os.environ.get("LD_PRELOAD", "")})'
    elif chosen != DEFAULT:
      why = (f'{chosen} is installed, but this process did not start through the launcher '
             '(train.py, python -m gpas_jax.train.launch, gpas_jax.baseline.compare and '
             'gpas_jax.perf.bench preload it)')
  except (ValueError, FileNotFoundError) as e:
    why = str(e)
  if not sys.platform.startswith('linux'):
    why = 'not Linux'
  return f'default (glibc malloc): {why}'


def reexec_with_fast_malloc() -> None:
  """Re-executes this process with the chosen allocator preloaded (see the module docstring).

  Call it first thing in a launcher (before jax is imported, so no work is thrown away). The
  process keeps its pid and arguments (`sys.orig_argv`, so `python -m pkg.mod` works). A bad
  GPAS_ALLOCATOR raises here, before any work.
  """
  if os.environ.get(_GUARD_ENV) or not sys.platform.startswith('linux'):
    return
  if loaded() is not None:
    return  # already preloaded by the caller
  name, _, _ = choose(os.environ, available(), _cpu_only_host())
  if name == DEFAULT:
    return
  env = allocator_env(name)
  env[_GUARD_ENV] = '1'
  argv = list(getattr(sys, 'orig_argv', [sys.executable] + sys.argv))
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + argv[1:], env)
  except OSError:
    return  # keep running under the default allocator


reexec_with_jemalloc = reexec_with_fast_malloc  # the name train.py used before mimalloc
