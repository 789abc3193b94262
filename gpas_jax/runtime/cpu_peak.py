"""The CPU's peak FLOP/s for MFU: measured once per machine and cached, shared by train and bench.

CPUs have no data-sheet peak in metrics.PEAK_FLOPS, so the peak is the best rate of a jitted
1024^3 matmul (`measure`), the best of several timings since a busy moment
can only lower one. It is cached in $GPAS_CPU_PEAK_CACHE or ~/.cache/gpas_jax/cpu_peak.json
(XDG_CACHE_HOME respected), keyed by CPU model, usable core count, jax version and dtype, so that
every run on a machine divides by the same number. A measurement taken while other processes
held the cores is marked provisional; the bench measures again until one is quiet (see
cpu_peak_flops).
"""

import json
import os
import platform
import resource
import time

CACHE_ENV = 'GPAS_CPU_PEAK_CACHE'
_MATMUL_N = 1024
QUIET_SHARE = 0.85  # of the usable cores, for a measurement to count as final


def cache_path() -> str:
  """Where the measured peaks are kept."""
  explicit = os.environ.get(CACHE_ENV)
  if explicit:
    return explicit
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'gpas_jax', 'cpu_peak.json')


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), or the platform's processor string."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.lower().startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or 'unknown CPU'


def usable_cores() -> int:
  """The cores this process may run on (its affinity), else the machine's count."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def machine_key(dtype: str) -> str:
  """The cache key: CPU model, core count, jax version and dtype."""
  import jax  # pylint: disable=import-outside-toplevel
  return f'{cpu_model()} | {usable_cores()} cores | jax {jax.__version__} | {dtype}'


def _read(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}  # no cache yet, or an unreadable one: measure again


def _write(path: str, data: dict) -> None:
  try:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
  except OSError:
    pass  # a read-only home still gets the measured number, just not cached


def measure(dtype: str = 'float32', repeats: int = 30) -> tuple[float, float]:
  """(best FLOP/s of `repeats` timed 1024^3 matmuls, share of the cores they got).

  The share is this process's CPU time over wall time x usable cores during the timed calls:
  well below 1 means other processes took cores, and the rate is an underestimate.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  cpu = jax.devices('cpu')[0]
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(key_a, (_MATMUL_N, _MATMUL_N), dtype), cpu)
  b = jax.device_put(jax.random.normal(key_b, (_MATMUL_N, _MATMUL_N), dtype), cpu)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # compile and warm the caches outside the timing
  best, wall, used = float('inf'), 0.0, 0.0
  for _ in range(max(1, repeats)):
    t0, c0 = time.perf_counter(), _cpu_seconds()
    matmul(a, b).block_until_ready()
    dt = time.perf_counter() - t0
    best, wall, used = min(best, dt), wall + dt, used + _cpu_seconds() - c0
  return 2.0 * _MATMUL_N**3 / best, min(1.0, used / max(wall * usable_cores(), 1e-9))


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def cpu_peak_flops(dtype: str = 'float32', remeasure: bool = False,
                   refine: bool = False) -> tuple[float, str]:
  """(peak FLOP/s of this machine's CPUs, where it comes from), measuring only when not cached.

  A measurement that got under QUIET_SHARE of the cores is kept but marked provisional; with
  `refine` (the bench) a provisional one is measured again, keeping the best, until one runs on
  a quiet machine. `remeasure` measures again in any case.
  """
  path, key = cache_path(), machine_key(dtype)
  data = _read(path)
  entry = data.get(key) or {}
  again = remeasure or (refine and not entry.get('final'))
  if entry.get('flops', 0) > 0 and not again:
    state = '' if entry.get('final') else (
        f'; provisional: measured while other processes held the cores (the matmul got '
        f'{100 * float(entry.get("cpu_share", 0)):.0f}% of them), so the peak is low and MFU '
        'reads high; `python -m gpas_jax.perf.bench` measures it again')
    return float(entry['flops']), (f'measured {dtype} {_MATMUL_N}^3 matmul, cached '
                                   f'{entry.get("when", "?")} in {path}{state}')
  flops, share = measure(dtype)
  final = bool(entry.get('final')) or share >= QUIET_SHARE
  if flops >= float(entry.get('flops', 0)):  # a busy moment can only lower a measurement
    entry = {'flops': flops, 'when': time.strftime('%Y-%m-%d %H:%M'), 'matmul_n': _MATMUL_N,
             'cpu_share': round(share, 3)}
  best = float(entry['flops'])
  entry['final'] = final
  data[key] = entry
  _write(path, data)
  state = ('' if final else f'; provisional: the matmul got {100 * share:.0f}% of the cores, '
           'so the peak is low and MFU reads high; the bench measures it again')
  return best, f'measured {dtype} {_MATMUL_N}^3 matmul (best so far, cached in {path}{state})'
