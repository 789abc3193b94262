"""Benchmark worker processes: one variant per subprocess, stepped one call at a time over a pipe.

A variant that needs its own process environment (another malloc preloaded, other XLA_FLAGS, or
PyTorch) runs in a worker: `python -m gpas_jax.perf.bench_proc KIND SPEC_JSON` builds it, runs a
first (compiling) step, prints `ready <first step s> <info>`, then answers every `step` line on
stdin with `time <s>`, and `quit` with `rss <peak bytes>`. `Worker` is the driving side. Also the
CPU-share sampling from /proc that tells how busy the machine was.
"""

import json
import os
import resource
import select
import subprocess
import sys
import tempfile
import time
from typing import Callable

import gpas_jax


def rss_peak_bytes() -> int:
  """This process's peak resident set size."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def serve(build: Callable[[], tuple[Callable[[], float], str]], out=None) -> None:
  """The worker loop: build a step function, time its first call, then step on request."""
  out = out or sys.stdout
  try:
    step, info = build()
    first = step()  # compiles (jit, torch.compile) here
  except Exception as e:  # pylint: disable=broad-except
    msg = f'{type(e).__name__}: {e}'.replace('\n', ' ')[:400]
    print(f'error {msg}', file=out, flush=True)
    return
  print(f'ready {first:.6f} {info}', file=out, flush=True)
  for line in sys.stdin:
    cmd = line.strip()
    if cmd == 'step':
      print(f'time {step():.6f}', file=out, flush=True)
    elif cmd == 'quit':
      break
  print(f'rss {rss_peak_bytes()}', file=out, flush=True)


class Worker:
  """A variant in a worker subprocess with its own environment (see the module docstring)."""

  def __init__(self, name: str, kind: str, spec: dict, env: dict[str, str], timeout_s: float):
    self.name, self.kind, self.spec = name, kind, spec
    env = dict(env)
    env['PYTHONPATH'] = gpas_jax.ROOT + os.pathsep + env.get('PYTHONPATH', '')
    cmd = [sys.executable, '-m', 'gpas_jax.perf.bench_worker', kind, json.dumps(spec)]
    self._stderr = tempfile.TemporaryFile(mode='w+')
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self._stderr, text=True, cwd=gpas_jax.ROOT, env=env)
    self.times: list[float] = []
    self.error: str | None = None
    self.first_step_s = float('nan')
    self.ready_s = float('nan')
    self.info = ''
    self.rss_peak = float('nan')
    self.timeout_s = timeout_s
    self._t0 = time.perf_counter()

  def wait_ready(self) -> None:
    """Waits for the worker's first step (start-up, build, and compile)."""
    left = max(1.0, self.timeout_s - (time.perf_counter() - self._t0))
    line = self._read(left)
    if line is None:
      self.error = f'no first step within {self.timeout_s:.0f} s (compile too slow here); stopped'
      self.close(kill=True)
    elif line.startswith('error'):
      self.error = line[len('error '):] + self._stderr_tail()
      self.close()
    elif line.startswith('ready'):
      self.ready_s = time.perf_counter() - self._t0
      parts = line.split(maxsplit=2)
      self.first_step_s = float(parts[1])
      self.info = parts[2] if len(parts) > 2 else ''
    else:
      self.error = f'unexpected worker output {line!r}' + self._stderr_tail()
      self.close(kill=True)

  @property
  def ok(self) -> bool:
    return self.error is None

  def _stderr_tail(self) -> str:
    try:
      self._stderr.seek(0)
      tail = self._stderr.read()[-600:].strip().replace('\n', ' | ')
    except (OSError, ValueError):
      return ''
    return f' (stderr: ...{tail})' if tail else ''

  def _read(self, timeout_s: float) -> str | None:
    ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
    if not ready:
      return None
    line = self.proc.stdout.readline()
    return line.strip() if line else f'error the worker exited (code {self.proc.poll()})'

  def step(self) -> float:
    """Runs one step in the worker and returns its wall time in seconds."""
    self.proc.stdin.write('step\n')
    self.proc.stdin.flush()
    line = self._read(600)
    if not line or not line.startswith('time'):
      raise RuntimeError(f'worker {self.name}: {line}{self._stderr_tail()}')
    return float(line.split()[1])

  def close(self, kill: bool = False) -> None:
    """Stops the worker (reading its peak RSS when it stops cleanly)."""
    if kill and self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write('quit\n')
        self.proc.stdin.flush()
        line = self._read(30)
        if line and line.startswith('rss'):
          self.rss_peak = float(line.split()[1])
        self.proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired, ValueError):
        self.proc.kill()
        self.proc.wait()


def cpu_sample(pids: list[int]) -> tuple[float, float, float] | None:
  """(busy jiffies of the machine, jiffies of `pids`, wall time) from /proc; None off Linux."""
  try:
    with open('/proc/stat', encoding='utf-8') as f:
      fields = [float(x) for x in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
    ours = 0.0
    for pid in pids:
      with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
        stat = f.read().rsplit(')', 1)[1].split()
      ours += float(stat[11]) + float(stat[12])  # utime, stime
    return busy, ours, time.monotonic()
  except (OSError, ValueError, IndexError):
    return None


def other_share(a, b) -> float | None:
  """The share of all CPUs that other processes used between two samples (0 = idle machine)."""
  if a is None or b is None:
    return None
  hz = os.sysconf('SC_CLK_TCK')
  capacity = (b[2] - a[2]) * hz * (os.cpu_count() or 1)
  if capacity <= 0:
    return None
  return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / capacity)

