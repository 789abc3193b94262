"""Preloading jemalloc for CPU runs: a launcher that re-executes the process with LD_PRELOAD.

Why: XLA:CPU allocates a few hundred MB of temporaries per train step. Under glibc's malloc they
are returned to the OS and page-faulted in again every step (~15% of a CPU step on the benchmark
config). jemalloc with decay disabled keeps them mapped. Its default settings do not help; these
do (measured, /work/shared/PERF_NOTES.md):

    MALLOC_CONF=oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1

The library must be preloaded before the process starts, so `reexec_with_jemalloc()` replaces the
current process (same pid, same arguments) with one that has it. It does nothing when jemalloc is
not installed (Debian/Ubuntu: `apt-get install libjemalloc2`), when it is already preloaded, when
not on Linux, when an accelerator plugin is installed (libtpu, jax CUDA/ROCm plugins: untested
there; GPAS_JEMALLOC=1 forces it), or when GPAS_NO_JEMALLOC=1. Memory freed during a run is kept by the process (RSS
stays at its peak), which is what a training process wants. Import no jax from this module.
"""

import glob
import importlib.util
import os
import sys

MALLOC_CONF = 'oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1'
OPT_OUT_ENV = 'GPAS_NO_JEMALLOC'
FORCE_ENV = 'GPAS_JEMALLOC'
_ACCELERATOR_MODULES = ('libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin', 'jax_plugins')
_GUARD_ENV = 'GPAS_JEMALLOC_REEXEC'  # set in the re-executed process: never loop
_CANDIDATES = (
    '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2',
    '/usr/lib/aarch64-linux-gnu/libjemalloc.so.2',
    '/usr/lib64/libjemalloc.so.2',
    '/usr/lib/libjemalloc.so.2',
    '/usr/local/lib/libjemalloc.so.2',
)


def find_jemalloc() -> str | None:
  """The path of libjemalloc.so.2 (env GPAS_JEMALLOC_PATH first), or None."""
  explicit = os.environ.get('GPAS_JEMALLOC_PATH')
  if explicit:
    return explicit if os.path.exists(explicit) else None
  for path in _CANDIDATES:
    if os.path.exists(path):
      return path
  found = sorted(glob.glob('/usr/lib/*/libjemalloc.so.2'))
  return found[0] if found else None


def jemalloc_loaded() -> bool:
  """Whether this process has jemalloc mapped (preloaded or linked)."""
  try:
    with open('/proc/self/maps', encoding='utf-8') as f:
      return 'libjemalloc' in f.read()
  except OSError:
    return False


def jemalloc_env(env: dict[str, str] | None = None, enable: bool = True) -> dict[str, str]:
  """A copy of `env` (default os.environ) with jemalloc preloaded and tuned, or with it removed."""
  env = dict(os.environ if env is None else env)
  preload = [p for p in env.get('LD_PRELOAD', '').split(':') if p and 'jemalloc' not in p]
  if enable:
    path = find_jemalloc()
    if path is None:
      raise FileNotFoundError('libjemalloc.so.2 not found: apt-get install libjemalloc2 '
                              '(or set GPAS_JEMALLOC_PATH).')
    preload.insert(0, path)
    env['MALLOC_CONF'] = MALLOC_CONF
  else:
    env.pop('MALLOC_CONF', None)
  if preload:
    env['LD_PRELOAD'] = ':'.join(preload)
  else:
    env.pop('LD_PRELOAD', None)
  return env


def describe() -> str:
  """'jemalloc (MALLOC_CONF=...)' or 'default (glibc)' for this process."""
  if jemalloc_loaded():
    return f'jemalloc ({os.environ.get("MALLOC_CONF", "default settings")})'
  return 'default (glibc malloc)'


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


def reexec_with_jemalloc() -> None:
  """Re-executes this process with jemalloc preloaded, when possible and not opted out.

  Call it first thing in a launcher (before jax is imported, so no work is thrown away). The
  process keeps its pid and arguments (`sys.orig_argv`, so `python -m pkg.mod` works).
  """
  if (os.environ.get(OPT_OUT_ENV, '') not in ('', '0') or os.environ.get(_GUARD_ENV)
      or not sys.platform.startswith('linux') or jemalloc_loaded()):
    return
  if find_jemalloc() is None:
    return
  if os.environ.get(FORCE_ENV, '') in ('', '0') and not _cpu_only_host():
    return
  env = jemalloc_env()
  env[_GUARD_ENV] = '1'
  argv = list(getattr(sys, 'orig_argv', [sys.executable] + sys.argv))
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + argv[1:], env)
  except OSError:
    return  # keep running under the default allocator
