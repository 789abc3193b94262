"""Benchmarks the compiled train step: tokens/s, step time, compile time, memory, MFU, ratios.

  python -m gpas_jax.perf.bench [--config configs/bench_cpu.py] [--config.x=v] [--steps N]
                           [--warmup K] [--torch] [--try 'model.attention_impl=einsum'] [--json]

It times the jitted train step of gpas_jax.train.steps on random tokens for a config (its model, batch
`optim.global_batch_size` x `data.max_length`, mesh) and, in the same run, a set of variants,
alternating one step of each per round with the order rotated, so that a shared machine's load
hits all of them alike; every ratio is taken per round (gpas_jax/perf/bench_report.py). Variants:

- the model with GPAS toggled (`pre_gpas` <-> `pre`): the GPAS overhead (target <= 3%);
- `config.baseline_faithful=True` where the config has that field: its cost (target <= 5%);
- CPU: JAX under each other malloc found (glibc's, jemalloc, mimalloc), in worker processes;
- `--torch` (CPU): the PyTorch reference, eager and `torch.compile`d, under glibc malloc (as a
  fresh install runs it; targets >= 1.3x eager, >= 1.0x compiled) and under each fast malloc
  found (the same one as JAX: target >= 1.0x);
- `--try`: config fields and/or environment variables (XLA_FLAGS: a worker process).

A variant that is not run is listed with the reason. The JAX side runs in this process,
re-executed by gpas_jax/runtime/allocator.py with the fastest malloc installed, as `python train.py`
does. `--json` prints every figure as one JSON object on stdout (the report goes to stderr).
"""

import dataclasses
import json
import os
import sys
import time
from typing import Any

import gpas_jax
from gpas_jax.perf import bench_jax
from gpas_jax.perf import bench_proc
from gpas_jax.perf import bench_report
from gpas_jax.perf import bench_torch
from gpas_jax.runtime import allocator
from gpas_jax.runtime import xla_flags

TARGETS = bench_report.TARGETS
gpas_counterpart = bench_jax.gpas_counterpart
random_batch = bench_jax.random_batch
format_report = bench_report.format_report


def _peak_flops(compute_dtype: str, remeasure: bool) -> tuple[float | None, str]:
  import jax  # pylint: disable=import-outside-toplevel
  from gpas_jax.runtime import cpu_peak  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import metrics  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  peak, how = metrics.matmul_peak(dev.device_kind, compute_dtype,
                                  jax.config.jax_default_matmul_precision)
  if peak is not None:
    return peak, f'data sheet ({dev.device_kind}, {how})'
  if dev.platform == 'cpu':
    return cpu_peak.cpu_peak_flops('float32', remeasure=remeasure, refine=True)
  return None, f'unknown device kind {dev.device_kind!r} (add it to metrics.PEAK_FLOPS)'


_MAIN = 'main'  # stands for the main JaxVariant in comparisons set up before it is compiled


def _jax_variants(config, devices, compare_gpas, baseline_faithful, tries, log, results):
  """The in-process JAX variants (main first) and their comparisons."""
  m = config.model
  not_run = results['not_run']
  malloc = bench_torch.malloc_label(allocator.loaded() or allocator.DEFAULT)
  main = bench_jax.JaxVariant(f'jax {m.norm_type} ({malloc})', config, devices)
  log(f'[bench] {main.name}: lowered in {main.lower_s:.2f} s, compiled in {main.compile_s:.2f} s')
  variants, comps = [main], []
  other = gpas_counterpart(m.norm_type)
  if other is None:
    not_run[f'jax {m.norm_type}, GPAS toggled'] = f'{m.norm_type} has no GPAS counterpart'
  elif not compare_gpas:
    not_run[f'jax {other}'] = '--nocompare_gpas'
  else:
    v = bench_jax.JaxVariant(f'jax {other}', bench_jax.apply_overrides(config, {
        'model.norm_type': other}), devices)
    variants.append(v)
    with_g, without = (main, v) if m.norm_type.endswith('_gpas') else (v, main)
    comps.append(('gpas_overhead', f'GPAS overhead ({with_g.name} vs {without.name})',
                  'overhead', with_g, without, TARGETS['gpas_overhead']))
  if 'baseline_faithful' not in config:
    not_run['jax baseline_faithful'] = ('the config has no baseline_faithful field (a checkout '
                                        'from before it)')
  elif not baseline_faithful:
    not_run['jax baseline_faithful'] = '--nobaseline_faithful'
  else:
    flip = not bool(config.baseline_faithful)
    v = _build(f'jax {m.norm_type} baseline_faithful={flip}',
               bench_jax.apply_overrides(config, {'baseline_faithful': flip}), devices, not_run,
               log)
    if v is not None:
      variants.append(v)
      faithful, plain = (v, main) if flip else (main, v)
      comps.append(('baseline_faithful_cost', 'baseline_faithful cost (step time, on vs off)',
                    'overhead', faithful, plain, TARGETS['baseline_faithful_cost']))
  for text in tries:
    overrides, env = bench_jax.parse_overrides(text)
    if env:
      continue  # a worker (_worker_variants)
    v = _build(f'jax try {text}', bench_jax.apply_overrides(config, overrides), devices, not_run,
               log)
    if v is not None:
      variants.append(v)
      comps.append((f'try {text}', f'try {text} (step time vs JAX)', 'overhead', v, main, None))
  return main, variants, comps


def _build(name, config, devices, not_run, log) -> bench_jax.JaxVariant | None:
  """A secondary variant, or None with the reason in not_run when it does not compile."""
  try:
    return bench_jax.JaxVariant(name, config, devices)
  except Exception as e:  # pylint: disable=broad-except
    # e.g. cuDNN attention on a GPU without it: the other variants still run.
    not_run[name] = f'{type(e).__name__}: {e}'.replace('\n', ' ')[:400]
    log(f'[bench] {name}: not run: {not_run[name]}')
    return None


def _worker_variants(config, other_mallocs, torch, torch_compile, torch_threads,
                     compile_timeout_s, tries, results, log):
  """Starts the worker variants (--try with env variables, JAX under other mallocs, PyTorch)."""
  import jax  # pylint: disable=import-outside-toplevel
  not_run, workers, comps = results['not_run'], [], []
  for text in tries:
    overrides, env = bench_jax.parse_overrides(text)
    if env:
      w = bench_jax.start(f'jax try {text}', bench_jax.apply_overrides(config, overrides),
                          allocator.loaded() or allocator.DEFAULT, env, 900)
      workers.append(w)
      comps.append((f'try {text}', f'try {text} (step time vs JAX)', 'overhead', w, _MAIN, None))
  on_cpu = jax.devices()[0].platform == 'cpu'
  jax_malloc = allocator.loaded() or allocator.DEFAULT
  found = allocator.available()
  results['mallocs_found'] = found
  for name in allocator.PREFERENCE:
    if name not in found:
      not_run[f'{name} variants'] = (f'lib{name} not installed '
                                     f'({allocator.ALLOCATORS[name].install_hint})')
  fast = [n for n in allocator.PREFERENCE if n in found]
  m = config.model
  if not on_cpu:
    not_run['JAX under other mallocs'] = 'the malloc matters for the CPU backend only'
  elif not other_mallocs:
    not_run['JAX under other mallocs'] = '--noother_mallocs'
  else:
    for malloc in [allocator.DEFAULT] + fast:
      if malloc != jax_malloc:
        label = bench_torch.malloc_label(malloc)
        w = bench_jax.start(f'jax {m.norm_type} ({label})', config, malloc, None, 900)
        workers.append(w)
        comps.append((f'malloc_{malloc}', f'JAX on {bench_torch.malloc_label(jax_malloc)} vs '
                      f'on {label}',
                      'speedup', _MAIN, w, None))
  if not torch:
    not_run['PyTorch'] = '--torch not given'
  elif not on_cpu:
    not_run['PyTorch'] = 'the PyTorch comparison runs on the CPU only'
    torch = False
  if torch:
    spec = bench_torch.spec_from_config(config, torch_threads)
    modes = [(False, allocator.DEFAULT)] + [(False, n) for n in fast]
    if not torch_compile:
      not_run['torch compile'] = '--notorch_compile'
    else:
      modes += [(True, allocator.DEFAULT)]
      if jax_malloc != allocator.DEFAULT:
        modes.append((True, jax_malloc))
    if jax_malloc == allocator.DEFAULT:
      not_run['PyTorch on the same malloc as JAX'] = ('JAX runs glibc malloc: see the glibc '
                                                      'malloc rows')
    for comp, malloc in modes:
      spec.compile = comp
      w = bench_torch.start(spec, malloc, compile_timeout_s if comp else 900)
      log(f'[bench] starting {w.name} ...')
      workers.append(w)
      key = f'vs_torch_{"compile" if comp else "eager"}_'
      if malloc == allocator.DEFAULT:
        key += 'default'
      elif malloc == jax_malloc:
        key += 'same'
      else:
        key += malloc
      comps.append((key, f'JAX / {w.name} tokens/s', 'speedup', _MAIN, w, TARGETS.get(key)))
  return workers, comps


def _profile(main: bench_jax.JaxVariant, trace_dir: str, steps: int, log) -> dict[str, Any]:
  """Traces `steps` steps of `main` into trace_dir; where their time goes, as a dict."""
  from gpas_jax.runtime import profiling  # pylint: disable=import-outside-toplevel
  log(f'[bench] tracing {steps} steps of {main.name} into {trace_dir}')
  times = profiling.capture(main.step, steps, trace_dir)
  summary = profiling.summarize(profiling.latest_trace(trace_dir), main.compiled.as_text(),
                                steps, 1e3 * bench_report.median(times))
  groups = lambda gs: [dataclasses.asdict(g) | {'gflops_per_s': g.gflops_per_s} for g in gs]
  return {'trace_file': summary.trace_file, 'steps': steps, 'step_ms': summary.step_ms,
          'thread_busy': summary.thread_busy, 'dot_ms': summary.dot_ms,
          'other_ms': summary.other_ms, 'dots': groups(summary.dots),
          'others': groups(summary.others), 'text': profiling.format_summary(summary)}


def run_benchmark(config, *, steps: int = 30, warmup: int = 3, compare_gpas: bool = True,
                  baseline_faithful: bool = True, other_mallocs: bool = True, torch: bool = False,
                  torch_compile: bool = True, torch_compile_timeout_s: float = 300.0,
                  torch_threads: int = 0, tries: tuple[str, ...] = (),
                  remeasure_cpu_peak: bool = False, profile_dir: str = '', profile_steps: int = 3,
                  devices=None, log=print) -> dict[str, Any]:
  """Runs the benchmark and returns its figures (see the module docstring).

  profile_dir: afterwards, trace `profile_steps` more steps of the main variant there and add
  where their time goes (gpas_jax/runtime/profiling.py) as results['profile'].
  """
  import jax  # pylint: disable=import-outside-toplevel
  from gpas_jax.runtime import cpu_peak  # pylint: disable=import-outside-toplevel
  from gpas_jax.train import metrics  # pylint: disable=import-outside-toplevel
  t_start = time.perf_counter()
  m = config.model
  dev = jax.devices()[0]
  results: dict[str, Any] = {
      'config': {'size_name': config.get('size_name', ''), 'norm_type': m.norm_type,
                 'hidden': m.hidden_size, 'layers': m.num_layers, 'heads': m.num_heads,
                 'ffn': m.intermediate_size, 'vocab': m.vocab_size,
                 'batch': config.optim.global_batch_size, 'seq': config.data.max_length,
                 'param_dtype': m.param_dtype, 'compute_dtype': m.compute_dtype,
                 'attention_impl': m.attention_impl, 'scan_layers': m.scan_layers,
                 'remat_policy': m.remat_policy},
      'device': dev.device_kind, 'platform': dev.platform, 'jax_version': jax.__version__,
      'cpu_model': cpu_peak.cpu_model(), 'cpu_count': os.cpu_count(),
      'jax_allocator': allocator.describe(), 'malloc_preference': list(allocator.PREFERENCE),
      'xla_flags': xla_flags.describe(),
      'xla_flags_not_in_effect': xla_flags.not_in_effect(config),
      'steps': steps, 'warmup': warmup, 'targets': dict(TARGETS),
      'loadavg_before': os.getloadavg(), 'not_run': {},
  }
  workers = []
  try:
    # Workers start first: they import, build and compile while this process compiles.
    workers, worker_comps = _worker_variants(config, other_mallocs, torch, torch_compile,
                                             torch_threads, torch_compile_timeout_s, tries,
                                             results, log)
    main, variants, comps = _jax_variants(config, devices, compare_gpas, baseline_faithful,
                                          tries, log, results)
    comps += [tuple(main if x is _MAIN else x for x in c) for c in worker_comps]
    ready = []
    for w in workers:
      w.wait_ready()
      if w.ok:
        ready.append(w)
        log(f'[bench] {w.name}: ready after {w.ready_s:.1f} s (first step {w.first_step_s:.1f} s;'
            f' {w.info})')
      else:
        log(f'[bench] {w.name}: not run: {w.error}')
        results['not_run'][w.name] = w.error
    peak, peak_src = _peak_flops(m.compute_dtype, remeasure_cpu_peak)
    everyone = variants + ready
    pids = [os.getpid()] + [w.proc.pid for w in ready]
    cpu0 = bench_proc.cpu_sample(pids)
    for r in range(warmup + steps):
      # Rotate the order each round: every variant follows every other one equally often (the
      # one after another process's step starts with cold caches).
      k = r % len(everyone)
      for v in everyone[k:] + everyone[:k]:
        dt = v.step()
        if r >= warmup:
          v.times.append(dt)
      if (r + 1) % 10 == 0 or r + 1 == warmup + steps:
        log(f'[bench] round {r + 1}/{warmup + steps} ({len(everyone)} variants)')
    cpu1 = bench_proc.cpu_sample(pids)
  finally:
    for w in workers:
      w.close()
  results['other_processes_cpu_share'] = bench_proc.other_share(cpu0, cpu1)
  results['loadavg_after'] = os.getloadavg()
  results['main'] = main.name
  if profile_dir:  # after the workers are gone: nothing else runs while it traces
    results['profile'] = _profile(main, profile_dir, profile_steps, log)

  tokens = main.batch_size * main.seq
  flops = metrics.training_flops_per_step(main.s.model_config, main.batch_size, main.seq)
  n_dev = main.s.mesh.size
  # A measured CPU peak is the whole machine's, however many (fake) CPU devices there are.
  chips = 1 if dev.platform == 'cpu' else n_dev
  step_s = bench_report.median(main.times)
  jr = {'step_time_s': step_s, 'step_time_min_s': min(main.times),
        'tokens_per_s': tokens / step_s, 'compile_s': main.compile_s, 'lower_s': main.lower_s,
        'flops_per_step': flops['total'], 'devices': n_dev, 'loss': main.last_loss,
        'memory_analysis_bytes': main.memory, 'peak_flops_per_device': peak,
        'peak_flops_source': peak_src}
  if peak:
    jr['mfu'] = metrics.mfu(flops['total'], step_s, peak, chips)
  if dev.platform == 'cpu':
    jr['process_rss_peak_bytes'] = bench_proc.rss_peak_bytes()
  else:
    stats = dev.memory_stats() or {}
    jr['device_peak_bytes_in_use'] = stats.get('peak_bytes_in_use')
    jr['device_bytes_limit'] = stats.get('bytes_limit')
  results['jax'] = jr
  results['variants'] = {}
  for v in everyone:
    med = bench_report.median(v.times)
    row = {'median_s': med, 'min_s': min(v.times), 'times_s': v.times,
           'first_step_s': v.first_step_s, 'tokens_per_s': tokens / med}
    if isinstance(v, bench_jax.JaxVariant):
      row.update(compile_s=v.compile_s, memory_analysis_bytes=v.memory)
      if peak:
        row['mfu'] = metrics.mfu(flops['total'], med, peak, chips)
    else:
      row.update(info=v.info, rss_peak_bytes=v.rss_peak)
    results['variants'][v.name] = row
  results['comparisons'] = []
  for key, label, kind, a, b, target in comps:
    if a.times and b.times:
      stats = (bench_report.speedup(a.times, b.times) if kind == 'speedup'
               else bench_report.overhead(a.times, b.times))
      results['comparisons'].append({'id': key, 'label': label, 'kind': kind, 'stats': stats,
                                     'target': target})
  mallocs = {c['id'][len('malloc_'):]: c['stats']['median'] for c in results['comparisons']
             if c['id'].startswith('malloc_')}
  if mallocs:
    slowest_ratio = min(mallocs.values())
    own = allocator.loaded() or allocator.DEFAULT
    results['fastest_malloc'] = (own if slowest_ratio >= 1 else
                                 min(mallocs, key=mallocs.get))
  results['wall_s'] = time.perf_counter() - t_start
  return results


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  if f.steps < 1 or f.warmup < 0:
    raise ValueError(f'--steps={f.steps} must be >= 1 and --warmup={f.warmup} >= 0')
  if f.profile_dir and f.profile_steps < 1:
    raise ValueError(f'--profile_steps={f.profile_steps} must be >= 1 with --profile_dir')
  for text in f['try'].value or []:
    bench_jax.apply_overrides(f.config, bench_jax.parse_overrides(text)[0])  # fail fast
  # config.xla_flags, before JAX starts; the JAX workers inherit them (malloc is their difference).
  xla_flags.apply(f.config)
  log = (lambda s: print(s, file=sys.stderr, flush=True)) if f.json else print
  results = run_benchmark(f.config, steps=f.steps, warmup=f.warmup, compare_gpas=f.compare_gpas,
                          baseline_faithful=f.baseline_faithful,
                          other_mallocs=f.other_mallocs, torch=f.torch,
                          torch_compile=f.torch_compile,
                          torch_compile_timeout_s=f.torch_compile_timeout,
                          torch_threads=f.torch_threads, tries=tuple(f['try'].value or ()),
                          remeasure_cpu_peak=f.remeasure_cpu_peak,
                          profile_dir=f.profile_dir, profile_steps=f.profile_steps, log=log)
  report = format_report(results)
  if f.json:
    print(report, file=sys.stderr, flush=True)
    print(json.dumps(results, default=float), flush=True)
  else:
    print(report, flush=True)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from gpas_jax.runtime import cli  # pylint: disable=import-outside-toplevel
  cli.define_config_file('config', os.path.join(gpas_jax.ROOT, 'configs', 'bench_cpu.py'),
                         'A config file; override fields with --config.<field>=<value>.')
  flags.DEFINE_integer('steps', 30, 'Timed rounds (one step of every variant each).')
  flags.DEFINE_integer('warmup', 3, 'Untimed rounds first.')
  flags.DEFINE_bool('torch', False, 'Also time the PyTorch reference (CPU; eager, compiled).')
  flags.DEFINE_bool('torch_compile', True, 'With --torch: also time torch.compile.')
  flags.DEFINE_float('torch_compile_timeout', 300.0, 'Seconds allowed for torch.compile.')
  flags.DEFINE_integer('torch_threads', 0, 'PyTorch intra-op threads (0: its default).')
  flags.DEFINE_bool('compare_gpas', True, 'Also time the model with GPAS toggled.')
  flags.DEFINE_bool('baseline_faithful', True,
                    'Also time config.baseline_faithful toggled (where the config has it).')
  flags.DEFINE_bool('other_mallocs', True, 'CPU: also time JAX under the other mallocs found.')
  flags.DEFINE_multi_string('try', [], 'A variant: "field=value;ENV_VAR=value" (config fields '
                            'run in this process; XLA_FLAGS etc. in a worker). Repeatable.')
  flags.DEFINE_bool('remeasure_cpu_peak', False,
                    'Measure the CPU peak again (keeps the larger of it and the cached one).')
  flags.DEFINE_bool('json', False, 'Print the figures as one JSON object on stdout.')
  flags.DEFINE_string('profile_dir', '', 'Afterwards trace --profile_steps steps of the main '
                      'variant into this directory and print where their time goes.')
  flags.DEFINE_integer('profile_steps', 3, 'Steps traced with --profile_dir.')


if __name__ == '__main__':
  allocator.reexec_with_fast_malloc()
  from gpas_jax.runtime import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main)  # config files found anywhere, one-line errors (exit 2), --traceback
