"""Benchmarks the compiled train step: tokens/s, step time, compile time, memory, MFU.

  python -m gpas_jax.bench --config configs/bench_cpu.py [--config.x=v] [--steps N] [--warmup K]
                           [--torch] [--json]

For a config (its model, batch `optim.global_batch_size` x `data.max_length`, and mesh) it times
the jitted train step of gpas_jax.steps on random tokens, and in the same run, alternating one
step of each variant per round (so that a noisy, shared machine slows all variants alike):

- the same model without GPAS (`pre_gpas` -> `pre`, ...), or with it for a model without: the
  GPAS overhead (target <= 3%);
- with --torch, the PyTorch reference model (tests/torch_ref.py, torch.optim.Adam, the same
  shapes) eager, and `torch.compile`d where that works, each in its own subprocess: once with the
  default allocator (PyTorch as users run it; target JAX >= 1.3x) and once with jemalloc preloaded
  with the tuned MALLOC_CONF that the JAX side runs under (target >= 1.0x).

The JAX side runs in this process, re-executed with jemalloc preloaded when it is installed
(gpas_jax/allocator.py; GPAS_NO_JEMALLOC=1 opts out), which is what `python train.py` does too.
Reported step times are medians of `--steps` timed rounds after `--warmup` rounds (minima too).
"""

import dataclasses
import json
import math
import os
import resource
import select
import subprocess
import sys
import tempfile
import time
from typing import Any

# Targets of the performance issue, printed beside the results.
TARGETS = {
    'gpas_overhead': 0.03,  # step time with GPAS / without - 1 <= 3%
    'jax_vs_torch_eager_default': 1.3,  # JAX tokens/s / PyTorch eager (default allocator)
    'jax_vs_torch_eager_same_allocator': 1.0,  # both under tuned jemalloc
}
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpas_counterpart(norm_type: str) -> str | None:
  """The same architecture with GPAS toggled ('pre_gpas' <-> 'pre'); None if there is none."""
  if norm_type.endswith('_gpas'):
    return norm_type[:-len('_gpas')]
  if norm_type in ('pre', 'lns', 'deeppost', 'sandwich', 'post_pre'):
    return norm_type + '_gpas'
  return None  # 'post': the baseline has no post_gpas


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, Any]:
  """Token ids in [2, vocab - 1) (no pads, no frozen row), segment ids 1: every target counts."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, max(3, vocab - 1), size=(batch, seq)).astype(np.int32)
  return {'input_ids': ids, 'segment_ids': np.ones_like(ids)}


def _rss_peak_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# JAX side.


class JaxVariant:
  """One compiled train step on a fixed batch, stepped one call at a time."""

  def __init__(self, name: str, config, devices=None):
    import jax  # pylint: disable=import-outside-toplevel
    from gpas_jax import sharding  # pylint: disable=import-outside-toplevel
    from gpas_jax import steps  # pylint: disable=import-outside-toplevel
    self.name, self.config = name, config
    self.s = steps.setup(config, devices)
    self.batch_size, self.seq = config.optim.global_batch_size, config.data.max_length
    local = random_batch(self.batch_size, self.seq, config.model.vocab_size, config.seed)
    self.batch = steps.global_batch(self.s, local)
    self.state = steps.init_state(self.s)
    run = steps.make_train_step(self.s)
    with sharding.use_mesh(self.s.mesh, self.s.rules):
      t0 = time.perf_counter()
      lowered = run.jitted.lower(self.state, self.batch)
      t1 = time.perf_counter()
      self.compiled = lowered.compile()
      t2 = time.perf_counter()
    self.lower_s, self.compile_s = t1 - t0, t2 - t1
    self.times: list[float] = []
    self.memory = _memory_analysis(self.compiled)
    self._jax = jax

  def step(self) -> float:
    """Runs one step and returns its wall time in seconds."""
    from gpas_jax import sharding  # pylint: disable=import-outside-toplevel
    with sharding.use_mesh(self.s.mesh, self.s.rules):
      t0 = time.perf_counter()
      self.state, metrics = self.compiled(self.state, self.batch)
      self._jax.block_until_ready((self.state, metrics))
      dt = time.perf_counter() - t0
    self.last_loss = float(metrics['loss'])
    return dt


def _memory_analysis(compiled) -> dict[str, float]:
  """Per-device bytes from XLA's buffer assignment (arguments, outputs, temporaries, peak)."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    ma = None
  if ma is None:
    return {}
  out = {k: float(getattr(ma, f'{k}_size_in_bytes', 0) or 0)
         for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  out['peak_estimate'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


# ----------------------------------------------------------------------------------------------
# PyTorch side: a worker subprocess per allocator and mode, driven one step at a time by stdin.


@dataclasses.dataclass
class TorchSpec:
  vocab: int
  hidden: int
  ffn: int
  layers: int
  heads: int
  norm_type: str
  post_num: int
  batch: int
  seq: int
  dtype: str = 'float32'
  compile: bool = False
  threads: int = 0  # 0: torch's default (one per core), as users run it
  seed: int = 0
  lr: float = 1e-3


def torch_worker(spec: TorchSpec) -> None:
  """The worker loop: build, warm (and compile), then one timed step per 'step' line on stdin."""
  sys.path.insert(0, _REPO_ROOT)
  import torch  # pylint: disable=import-outside-toplevel
  from gpas_jax import torch_ref  # pylint: disable=import-outside-toplevel
  out = sys.stdout
  if spec.threads:
    torch.set_num_threads(spec.threads)
  cfg = torch_ref.RefConfig(vocab_size=spec.vocab, hidden_size=spec.hidden,
                            intermediate_size=spec.ffn, num_hidden_layers=spec.layers,
                            num_attention_heads=spec.heads, norm_type=spec.norm_type,
                            post_num=spec.post_num)
  model = torch_ref.RefModel(cfg, seed=spec.seed).to(getattr(torch, spec.dtype))
  opt = torch.optim.Adam(model.parameters(), lr=spec.lr)  # as users run it: defaults
  ids = torch.from_numpy(random_batch(spec.batch, spec.seq, spec.vocab, spec.seed)['input_ids'])
  ids = ids.long()
  forward = torch.compile(model) if spec.compile else model

  def step() -> float:
    t0 = time.perf_counter()
    loss = torch_ref.loss_fn(forward(ids), ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0

  try:
    first = step()  # torch.compile compiles here
  except Exception as e:  # pylint: disable=broad-except
    msg = f'{type(e).__name__}: {e}'.replace('\n', ' ')[:400]
    print(f'error {msg}', file=out, flush=True)
    return
  print(f'ready {first:.6f} {torch.get_num_threads()}', file=out, flush=True)
  for line in sys.stdin:
    cmd = line.strip()
    if cmd == 'step':
      print(f'time {step():.6f}', file=out, flush=True)
    elif cmd == 'quit':
      break
  print(f'rss {_rss_peak_bytes()}', file=out, flush=True)


class TorchVariant:
  """A torch worker subprocess under a chosen allocator."""

  def __init__(self, name: str, spec: TorchSpec, jemalloc: bool, timeout_s: float):
    from gpas_jax import allocator  # pylint: disable=import-outside-toplevel
    self.name, self.spec, self.jemalloc = name, spec, jemalloc
    env = allocator.jemalloc_env(enable=jemalloc)
    env[allocator.OPT_OUT_ENV] = '1'
    env['PYTHONPATH'] = _REPO_ROOT + os.pathsep + env.get('PYTHONPATH', '')
    cmd = [sys.executable, '-m', 'gpas_jax.bench', '--torch_worker',
           json.dumps(dataclasses.asdict(spec))]
    self._stderr = tempfile.TemporaryFile(mode='w+')
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self._stderr, text=True, cwd=_REPO_ROOT, env=env)
    self.times: list[float] = []
    self.error: str | None = None
    self.compile_s = math.nan
    self.rss_peak = math.nan
    self.timeout_s = timeout_s
    self._t0 = time.perf_counter()

  def wait_ready(self) -> None:
    """Waits for the worker's first step (start-up, and torch.compile where asked)."""
    timeout_s = self.timeout_s
    t0 = self._t0
    line = self._read(max(1.0, timeout_s - (time.perf_counter() - t0)))
    if line is None:
      self.error = f'no first step within {timeout_s:.0f} s (compile too slow here); stopped'
      self.close(kill=True)
    elif line.startswith('error'):
      self.error = line[len('error '):] + self._stderr_tail()
      self.close()
    elif line.startswith('ready'):
      self.ready_s = time.perf_counter() - t0  # start-up + first step (+ torch.compile)
      self.compile_s = float(line.split()[1])  # the first step (torch.compile compiles in it)
      self.threads = int(line.split()[2])
    else:
      self.error = f'unexpected worker output {line!r}' + self._stderr_tail()
      self.close(kill=True)

  def _stderr_tail(self) -> str:
    try:
      self._stderr.seek(0)
      tail = self._stderr.read()[-600:].strip().replace('\n', ' | ')
    except (OSError, ValueError):
      return ''
    return f' (stderr: ...{tail})' if tail else ''

  @property
  def ok(self) -> bool:
    return self.error is None

  def _read(self, timeout_s: float) -> str | None:
    ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
    if not ready:
      return None
    line = self.proc.stdout.readline()
    return line.strip() if line else f'error the worker exited (code {self.proc.poll()})'

  def step(self) -> float:
    self.proc.stdin.write('step\n')
    self.proc.stdin.flush()
    line = self._read(600)
    if not line or not line.startswith('time'):
      raise RuntimeError(f'torch worker {self.name}: {line}')
    return float(line.split()[1])

  def close(self, kill: bool = False) -> None:
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


# ----------------------------------------------------------------------------------------------
# The benchmark.


def _cpu_sample(pids: list[int]) -> tuple[float, float, float] | None:
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


def _other_share(a, b) -> float | None:
  """The share of all CPUs that other processes used between two samples (0 = idle machine)."""
  if a is None or b is None:
    return None
  hz = os.sysconf('SC_CLK_TCK')
  capacity = (b[2] - a[2]) * hz * (os.cpu_count() or 1)
  if capacity <= 0:
    return None
  return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / capacity)


def _median(xs: list[float]) -> float:
  xs = sorted(xs)
  n = len(xs)
  if not n:
    return math.nan
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _peak_flops(compute_dtype: str) -> tuple[float | None, str]:
  import jax  # pylint: disable=import-outside-toplevel
  from gpas_jax import metrics  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  peak = metrics.peak_flops(dev.device_kind, compute_dtype)
  if peak is not None:
    return peak, f'table ({dev.device_kind}, {compute_dtype})'
  if dev.platform == 'cpu':
    dtype = compute_dtype if compute_dtype in ('float32', 'bfloat16', 'float64') else 'float32'
    # The best of several timings: a busy moment can only lower a measurement.
    best = max(metrics.measure_cpu_peak_flops(dtype=dtype, repeats=10) for _ in range(2))
    return best, f'measured {dtype} 1024^3 matmul (CPU)'
  return None, f'unknown device kind {dev.device_kind!r}'


def run_benchmark(config, *, steps: int = 10, warmup: int = 2, compare_gpas: bool = True,
                  torch: bool = False, torch_compile: bool = True, torch_jemalloc: bool = True,
                  torch_compile_timeout_s: float = 300.0, torch_threads: int = 0, devices=None,
                  log=print) -> dict[str, Any]:
  """Runs the benchmark and returns its figures (see the module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  from gpas_jax import allocator  # pylint: disable=import-outside-toplevel
  from gpas_jax import metrics  # pylint: disable=import-outside-toplevel

  m = config.model
  results: dict[str, Any] = {
      'config': {'size_name': config.get('size_name', ''), 'norm_type': m.norm_type,
                 'hidden': m.hidden_size, 'layers': m.num_layers, 'heads': m.num_heads,
                 'ffn': m.intermediate_size, 'vocab': m.vocab_size,
                 'batch': config.optim.global_batch_size, 'seq': config.data.max_length,
                 'param_dtype': m.param_dtype, 'compute_dtype': m.compute_dtype,
                 'attention_impl': m.attention_impl, 'scan_layers': m.scan_layers,
                 'remat_policy': m.remat_policy},
      'device': jax.devices()[0].device_kind, 'platform': jax.devices()[0].platform,
      'jax_allocator': allocator.describe(), 'steps': steps, 'warmup': warmup,
      'targets': dict(TARGETS), 'cpu_count': os.cpu_count(),
      'loadavg_before': os.getloadavg(),
  }
  variants: list[Any] = []
  main = JaxVariant(f'jax {m.norm_type}', config, devices)
  variants.append(main)
  log(f'[bench] {main.name}: lowered in {main.lower_s:.2f} s, compiled in {main.compile_s:.2f} s')
  other = gpas_counterpart(m.norm_type) if compare_gpas else None
  if other is not None:
    c2 = config.copy_and_resolve_references()
    c2.model.norm_type = other
    variants.append(JaxVariant(f'jax {other}', c2, devices))
  torch_variants: list[TorchVariant] = []
  if torch and jax.devices()[0].platform != 'cpu':
    results['torch_errors'] = {'torch': 'the PyTorch comparison is a CPU benchmark (the reference '
                                        'model runs on the CPU); skipped on ' +
                                        jax.devices()[0].platform}
    torch = False
  if torch:
    spec = TorchSpec(vocab=m.vocab_size, hidden=m.hidden_size, ffn=m.intermediate_size,
                     layers=m.num_layers, heads=m.num_heads, norm_type=m.norm_type,
                     post_num=m.post_num, batch=config.optim.global_batch_size,
                     seq=config.data.max_length, seed=config.seed, threads=torch_threads,
                     dtype='bfloat16' if m.compute_dtype == 'bfloat16' else m.compute_dtype)
    modes = [(False, False)]
    if torch_jemalloc:
      if allocator.find_jemalloc():
        modes.append((False, True))
      else:
        results['torch_jemalloc_error'] = 'libjemalloc.so.2 not found (apt-get install libjemalloc2)'
    if torch_compile:
      modes += [(True, jem) for jem in (False, True) if (False, jem) in modes]
    started = []
    for comp, jem in modes:  # the workers start (import, build, compile) concurrently
      name = f'torch {"compile" if comp else "eager"} {"jemalloc" if jem else "default-alloc"}'
      log(f'[bench] starting {name} ...')
      started.append(TorchVariant(name, dataclasses.replace(spec, compile=comp), jem,
                                  torch_compile_timeout_s if comp else 600))
    for tv in started:
      tv.wait_ready()
      if tv.ok:
        torch_variants.append(tv)
        log(f'[bench] {tv.name}: ready after {tv.ready_s:.1f} s, first step (with any '
            f'torch.compile) {tv.compile_s:.1f} s, {tv.threads} threads')
      else:
        log(f'[bench] {tv.name}: unavailable: {tv.error}')
        results.setdefault('torch_errors', {})[tv.name] = tv.error
  peak_before = _peak_flops(m.compute_dtype)
  everyone = variants + torch_variants
  pids = [os.getpid()] + [tv.proc.pid for tv in torch_variants]
  cpu0 = _cpu_sample(pids)
  try:
    for r in range(warmup + steps):
      # Rotate the order each round: every variant follows every other one equally often (the
      # one after another process's step starts with cold caches).
      k = r % len(everyone)
      for v in everyone[k:] + everyone[:k]:
        dt = v.step()
        if r >= warmup:
          v.times.append(dt)
    cpu1 = _cpu_sample(pids)
  finally:
    for tv in torch_variants:
      tv.close()
  results['other_processes_cpu_share'] = _other_share(cpu0, cpu1)

  # Figures.
  results['loadavg_after'] = os.getloadavg()
  tokens = main.batch_size * main.seq
  flops = metrics.training_flops_per_step(main.s.model_config, main.batch_size, main.seq)
  peak, peak_src = max(peak_before, _peak_flops(m.compute_dtype), key=lambda p: p[0] or 0.0)
  n_dev = main.s.mesh.size
  step_s = _median(main.times)
  jr = {'step_time_s': step_s, 'step_time_min_s': min(main.times),
        'tokens_per_s': tokens / step_s, 'compile_s': main.compile_s, 'lower_s': main.lower_s,
        'flops_per_step': flops['total'], 'devices': n_dev, 'loss': main.last_loss,
        'memory_analysis_bytes': main.memory, 'peak_flops_per_device': peak,
        'peak_flops_source': peak_src}
  if peak:
    # A measured CPU peak is the whole machine's, however many (fake) CPU devices there are.
    chips = 1 if jax.devices()[0].platform == 'cpu' else n_dev
    jr['mfu'] = metrics.mfu(flops['total'], step_s, peak, chips)
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    jr['process_rss_peak_bytes'] = _rss_peak_bytes()
  else:
    stats = dev.memory_stats() or {}
    jr['device_peak_bytes_in_use'] = stats.get('peak_bytes_in_use')
    jr['device_bytes_limit'] = stats.get('bytes_limit')
  results['jax'] = jr
  results['variants'] = {v.name: {'median_s': _median(v.times), 'min_s': min(v.times),
                                  'times_s': v.times} for v in everyone}
  if len(variants) > 1:
    with_gpas, without = variants[:2]
    if not with_gpas.config.model.norm_type.endswith('_gpas'):
      with_gpas, without = without, with_gpas
    results['gpas_overhead'] = {
        'with': with_gpas.name, 'without': without.name,
        'median': _median(with_gpas.times) / _median(without.times) - 1,
        'min': min(with_gpas.times) / min(without.times) - 1,
        # Per-round ratios cancel slow phases of a shared machine.
        'median_of_round_ratios': _median([a / b for a, b in zip(with_gpas.times, without.times)]) - 1,
        'target_max': TARGETS['gpas_overhead']}
  ratios = {}
  for tv in torch_variants:
    ratios[tv.name] = {
        'median': _median(tv.times) / step_s, 'min': min(tv.times) / min(main.times),
        'median_of_round_ratios': _median([b / a for a, b in zip(main.times, tv.times)]),
        'torch_median_s': _median(tv.times), 'torch_first_step_s': tv.compile_s,
        'torch_ready_s': tv.ready_s,
        'torch_rss_peak_bytes': tv.rss_peak}
  if ratios:
    results['jax_over_torch_tokens_per_s'] = ratios
  return results


def format_report(r: dict[str, Any]) -> str:
  """The human-readable summary of run_benchmark's figures."""
  c, j = r['config'], r['jax']
  gib = 1024.0 ** 3
  lines = [
      f'config: {c["size_name"]} {c["norm_type"]} hidden {c["hidden"]} x {c["layers"]} layers, '
      f'{c["heads"]} heads, ffn {c["ffn"]}, vocab {c["vocab"]}, batch {c["batch"]} x seq '
      f'{c["seq"]}, {c["param_dtype"]}/{c["compute_dtype"]}, attention {c["attention_impl"]}, '
      f'scan {c["scan_layers"]}, remat {c["remat_policy"]}',
      f'device: {r["device"]} x {j["devices"]}; JAX allocator: {r["jax_allocator"]}',
      f'step time {1e3 * j["step_time_s"]:.1f} ms (median of {r["steps"]}, min '
      f'{1e3 * j["step_time_min_s"]:.1f}), {j["tokens_per_s"]:.0f} tokens/s, compile '
      f'{j["compile_s"]:.2f} s (+ lower {j["lower_s"]:.2f} s), loss {j["loss"]:.3f}',
  ]
  if 'mfu' in j:
    lines.append(f'MFU {100 * j["mfu"]:.1f}% of {j["peak_flops_per_device"] / 1e12:.3g} TFLOP/s '
                 f'per device ({j["peak_flops_source"]}); {j["flops_per_step"] / 1e9:.1f} GFLOP '
                 'per step')
  mem = j['memory_analysis_bytes']
  if mem:
    lines.append(f'memory (XLA, per device): arguments {mem["argument"] / gib:.3f} GiB, temporaries '
                 f'{mem["temp"] / gib:.3f} GiB, outputs {mem["output"] / gib:.3f} GiB (aliased '
                 f'{mem["alias"] / gib:.3f}), peak estimate {mem["peak_estimate"] / gib:.3f} GiB')
  if 'process_rss_peak_bytes' in j:
    lines.append(f'process peak RSS {j["process_rss_peak_bytes"] / gib:.2f} GiB')
  if j.get('device_peak_bytes_in_use'):
    lines.append(f'device peak bytes in use {j["device_peak_bytes_in_use"] / gib:.2f} GiB')
  for name, v in r['variants'].items():
    lines.append(f'  {name:36s} median {1e3 * v["median_s"]:8.1f} ms   min {1e3 * v["min_s"]:8.1f} ms')
  # Ratios: the headline is the median of per-round ratios (alternating rounds see the same load).
  if 'gpas_overhead' in r:
    g = r['gpas_overhead']
    head = g['median_of_round_ratios']
    ok = 'MET' if head <= g['target_max'] else 'NOT MET'
    lines.append(f'GPAS overhead ({g["with"]} vs {g["without"]}): {100 * head:+.1f}% (per-round; '
                 f'medians {100 * g["median"]:+.1f}%, mins {100 * g["min"]:+.1f}%)'
                 f'   target <= {100 * g["target_max"]:.0f}%: {ok}')
  for name, v in r.get('jax_over_torch_tokens_per_s', {}).items():
    target = None
    if name == 'torch eager default-alloc':
      target = TARGETS['jax_vs_torch_eager_default']
    elif name == 'torch eager jemalloc':
      target = TARGETS['jax_vs_torch_eager_same_allocator']
    head = v['median_of_round_ratios']
    tgt = '' if target is None else (f'   target >= {target:.2f}x: '
                                     f'{"MET" if head >= target else "NOT MET"}')
    lines.append(f'JAX / PyTorch tokens/s vs {name}: {head:.2f}x (per-round; medians '
                 f'{v["median"]:.2f}x, mins {v["min"]:.2f}x){tgt}')
  for name, err in r.get('torch_errors', {}).items():
    lines.append(f'{name}: not run: {err}')
  other = r.get('other_processes_cpu_share')
  lines.append(f'other processes used {"?" if other is None else f"{100 * other:.0f}%"} of the '
               f'{r["cpu_count"]} CPUs during the timed rounds (load average '
               f'{r["loadavg_before"][0]:.1f} before the run)')
  if r['platform'] == 'cpu' and other is not None and other > 0.1:
    lines.append('WARNING: the machine was busy with other work; CPU timings and ratios are '
                 'unreliable (PyTorch\'s OpenMP threads lose far more than XLA\'s thread pool when '
                 'cores are oversubscribed). Rerun on an idle machine.')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  if f.steps < 1 or f.warmup < 0:
    raise ValueError('--steps must be >= 1 and --warmup >= 0')
  config = f.config
  log = (lambda s: print(s, file=sys.stderr, flush=True)) if f.json else print
  results = run_benchmark(config, steps=f.steps, warmup=f.warmup, compare_gpas=f.compare_gpas,
                          torch=f.torch, torch_compile=f.torch_compile,
                          torch_compile_timeout_s=f.torch_compile_timeout,
                          torch_threads=f.torch_threads, log=log)
  report = format_report(results)
  if f.json:
    print(report, file=sys.stderr, flush=True)
    print(json.dumps(results, default=float), flush=True)
  else:
    print(report, flush=True)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file('config', os.path.join(_REPO_ROOT, 'configs', 'bench_cpu.py'),
                                  'A config file; override fields with --config.<field>=<value>.')
  flags.DEFINE_integer('steps', 10, 'Timed rounds (one step of every variant each).')
  flags.DEFINE_integer('warmup', 2, 'Untimed rounds first.')
  flags.DEFINE_bool('torch', False, 'Also time the PyTorch reference (eager, torch.compile).')
  flags.DEFINE_bool('torch_compile', True, 'With --torch: also try torch.compile.')
  flags.DEFINE_float('torch_compile_timeout', 300.0, 'Seconds allowed for torch.compile.')
  flags.DEFINE_integer('torch_threads', 0, 'PyTorch intra-op threads (0: its default).')
  flags.DEFINE_bool('compare_gpas', True, 'Also time the model with GPAS toggled.')
  flags.DEFINE_bool('json', False, 'Print the figures as one JSON object on stdout.')


if __name__ == '__main__':
  if len(sys.argv) > 2 and sys.argv[1] == '--torch_worker':
    torch_worker(TorchSpec(**json.loads(sys.argv[2])))
  else:
    from gpas_jax import allocator as _allocator  # pylint: disable=import-outside-toplevel
    _allocator.reexec_with_jemalloc()
    from absl import app  # pylint: disable=import-outside-toplevel
    _define_flags()
    app.run(main)
