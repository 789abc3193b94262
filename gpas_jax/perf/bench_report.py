"""The benchmark's statistics and report: per-round ratios with intervals, targets, the text.

Every ratio is computed per round (the variants of one round ran back to back, so they saw the
same load from other processes) and summarised by the median of the per-round ratios with a
distribution-free ~95% interval for that median (order statistics of the binomial, no
resampling), and the min and max per-round ratios. The ratio of the medians and the ratio of the
minima are kept too: when they disagree with the per-round median, the load changed in phases.
"""

import json
import math
import sys
from typing import Any

# Targets of the performance issue, printed beside the results (never asserted by a test).
TARGETS = {
    'gpas_overhead': 0.03,  # step time with GPAS / without - 1, interval inside +-3%
    'baseline_faithful_cost': 0.05,  # step time with config.baseline_faithful / without - 1
    'vs_torch_eager_default': 1.3,  # JAX tokens/s / PyTorch eager, PyTorch on glibc malloc
    'vs_torch_compile_default': 1.0,  # ... / torch.compile, PyTorch on glibc malloc
    'vs_torch_eager_same': 1.0,  # ... / PyTorch eager on the malloc JAX runs under
}


def median(xs: list[float]) -> float:
  """The median (nan for no values)."""
  xs = sorted(xs)
  n = len(xs)
  if not n:
    return math.nan
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def median_interval(xs: list[float], level: float = 0.95) -> tuple[float, float, float]:
  """(low, high, coverage): order statistics bracketing the median with >= `level` coverage.

  For n values, the median lies between the k-th smallest and the k-th largest with probability
  1 - 2 P(Binomial(n, 1/2) < k); the largest k that keeps this >= level is used. Below 6 values
  no k reaches 95%: the min and max are returned with their (lower) coverage.
  """
  xs = sorted(xs)
  n = len(xs)
  if not n:
    return math.nan, math.nan, 0.0
  cdf, k = 0.0, 0  # cdf = P(X < k + 1) as k grows
  best_k, best_cov = 1, 1 - 2 * 0.5 ** n
  for k in range(1, n // 2 + 1):
    cdf += math.comb(n, k - 1) * 0.5 ** n  # P(X <= k - 1) = P(X < k)
    cov = 1 - 2 * cdf
    if cov < level:
      break
    best_k, best_cov = k, cov
  return xs[best_k - 1], xs[n - best_k], best_cov


def summarize(ratios: list[float]) -> dict[str, float]:
  """Median, ~95% interval, coverage, min and max of per-round ratios."""
  lo, hi, cov = median_interval(ratios)
  return {'median': median(ratios), 'low': lo, 'high': hi, 'coverage': cov,
          'min': min(ratios) if ratios else math.nan,
          'max': max(ratios) if ratios else math.nan, 'rounds': len(ratios)}


def speedup(main_times: list[float], other_times: list[float]) -> dict[str, float]:
  """How many times faster the main variant is than another: other / main, per round."""
  s = summarize([b / a for a, b in zip(main_times, other_times)])
  s['of_medians'] = median(other_times) / median(main_times)
  s['of_minima'] = min(other_times) / min(main_times)
  return s


def overhead(times: list[float], reference_times: list[float]) -> dict[str, float]:
  """The relative extra step time of a variant over a reference: t / t_ref - 1, per round."""
  s = summarize([a / b - 1 for a, b in zip(times, reference_times)])
  s['of_medians'] = median(times) / median(reference_times) - 1
  s['of_minima'] = min(times) / min(reference_times) - 1
  return s


def verdict(kind: str, s: dict[str, float], target: float | None) -> str:
  """MET (the interval clears the target), MET on the median only, or NOT MET; '' without one."""
  if target is None:
    return ''
  if kind == 'speedup':
    if s['low'] >= target:
      return f'target >= {target:.2f}x: MET'
    if s['median'] >= target:
      return f'target >= {target:.2f}x: MET on the median (interval reaches below)'
    return f'target >= {target:.2f}x: NOT MET'
  inside = -target <= s['low'] and s['high'] <= target
  if s['median'] <= target and inside:
    return f'target <= {100 * target:.0f}%, interval inside +-{100 * target:.0f}%: MET'
  if s['median'] <= target:
    return (f'target <= {100 * target:.0f}%: MET on the median (interval not inside '
            f'+-{100 * target:.0f}%: more rounds or a quieter machine)')
  return f'target <= {100 * target:.0f}%: NOT MET'


def _fmt(kind: str, x: float) -> str:
  return f'{x:.2f}x' if kind == 'speedup' else f'{100 * x:+.1f}%'


def format_comparison(c: dict[str, Any]) -> str:
  """One line: label, median [interval], min..max, ratio of medians and minima, verdict."""
  k, s = c['kind'], c['stats']
  text = (f'{c["label"]}: {_fmt(k, s["median"])} [{_fmt(k, s["low"])}, {_fmt(k, s["high"])}] '
          f'({100 * s["coverage"]:.0f}% interval of the median of {s["rounds"]} per-round ratios;'
          f' range {_fmt(k, s["min"])}..{_fmt(k, s["max"])}; of medians '
          f'{_fmt(k, s["of_medians"])}, of minima {_fmt(k, s["of_minima"])})')
  v = verdict(k, s, c.get('target'))
  return text + (f'   {v}' if v else '')


def format_report(r: dict[str, Any]) -> str:
  """The human-readable summary of run_benchmark's figures."""
  c, j = r['config'], r['jax']
  gib = 1024.0 ** 3
  lines = [
      f'config: {c["size_name"]} {c["norm_type"]} hidden {c["hidden"]} x {c["layers"]} layers, '
      f'{c["heads"]} heads, ffn {c["ffn"]}, vocab {c["vocab"]}, batch {c["batch"]} x seq '
      f'{c["seq"]}, {c["param_dtype"]}/{c["compute_dtype"]}, attention {c["attention_impl"]}, '
      f'scan {c["scan_layers"]}, remat {c["remat_policy"]}',
      f'device: {r["device"]} x {j["devices"]} ({r.get("cpu_model", "")}, {r["cpu_count"]} CPUs); '
      f'jax {r.get("jax_version", "?")}',
      f'JAX malloc: {r["jax_allocator"]}',
      f'XLA_FLAGS: {r.get("xla_flags", "?")}' + (
          f' (WARNING: config.xla_flags {" ".join(r["xla_flags_not_in_effect"])} not in effect: '
          'JAX started before they were set)' if r.get('xla_flags_not_in_effect') else ''),
      f'step time {1e3 * j["step_time_s"]:.1f} ms (median of {r["steps"]}, min '
      f'{1e3 * j["step_time_min_s"]:.1f}), {j["tokens_per_s"]:.0f} tokens/s, compile '
      f'{j["compile_s"]:.2f} s (+ lower {j["lower_s"]:.2f} s), loss {j["loss"]:.3f}',
  ]
  if 'mfu' in j:
    lines.append(f'MFU {100 * j["mfu"]:.1f}% of {j["peak_flops_per_device"] / 1e12:.3g} TFLOP/s '
                 f'per device ({j["peak_flops_source"]}); {j["flops_per_step"] / 1e9:.1f} GFLOP '
                 'per step')
  else:
    lines.append(f'MFU: no peak for this device ({j["peak_flops_source"]})')
  mem = j['memory_analysis_bytes']
  if mem:
    lines.append(f'memory (XLA, per device): arguments {mem["argument"] / gib:.3f} GiB, temporaries '
                 f'{mem["temp"] / gib:.3f} GiB, outputs {mem["output"] / gib:.3f} GiB (aliased '
                 f'{mem["alias"] / gib:.3f}), peak estimate {mem["peak_estimate"] / gib:.3f} GiB')
  if 'process_rss_peak_bytes' in j:
    lines.append(f'process peak RSS {j["process_rss_peak_bytes"] / gib:.2f} GiB')
  if j.get('device_peak_bytes_in_use'):
    lines.append(f'device peak bytes in use {j["device_peak_bytes_in_use"] / gib:.2f} GiB')
  lines.append(f'variants, {r["steps"]} alternating rounds after {r["warmup"]} warm-up:')
  for name, v in r['variants'].items():
    lines.append(f'  {name:44s} median {1e3 * v["median_s"]:8.1f} ms   min '
                 f'{1e3 * v["min_s"]:8.1f} ms   first step {v["first_step_s"]:6.1f} s')
  for name, why in r.get('not_run', {}).items():
    lines.append(f'  {name:44s} not run: {why}')
  lines.append('ratios (per round; JAX = ' + r['main'] + '):')
  for comp in r.get('comparisons', []):
    lines.append('  ' + format_comparison(comp))
  best = r.get('fastest_malloc')
  if best:
    lines.append(f'fastest malloc for JAX here: {best} (the launcher prefers '
                 f'{", ".join(r["malloc_preference"])} in that order)')
  other = r.get('other_processes_cpu_share')
  lines.append(f'other processes used {"?" if other is None else f"{100 * other:.0f}%"} of the '
               f'{r["cpu_count"]} CPUs during the timed rounds (load average '
               f'{r["loadavg_before"][0]:.1f} before the run); wall time {r["wall_s"]:.0f} s')
  if r['platform'] == 'cpu' and other is not None and other > 0.1:
    lines.append('WARNING: the machine was busy with other work; absolute CPU timings are '
                 'unreliable and ratios lean against PyTorch (its OpenMP threads lose more than '
                 'XLA\'s pool on oversubscribed cores). Rerun on an idle machine for final figures.')
  if 'profile' in r:
    lines.append(r['profile']['text'])
  return '\n'.join(lines)


def variant_table(runs: list[dict[str, Any]]) -> str:
  """One row per JAX variant of each run: step time, tokens/s, MFU, compile time, memory."""
  gib = 1024.0 ** 3
  lines = []
  if runs:
    r = runs[0]
    src = r['jax']['peak_flops_source']
    peak = r['jax']['peak_flops_per_device']
    lines.append(f'device: {r["device"]}; peak {peak / 1e12:.0f} TFLOP/s ({src})' if peak else
                 f'device: {r["device"]}; MFU n/a: {src}')
  lines.append(f'{"size":6s} {"variant":36s} {"step ms":>8s} {"tokens/s":>10s} {"MFU":>6s} '
               f'{"compile s":>9s} {"XLA peak GiB":>12s} {"device peak GiB":>15s}')
  for r in runs:
    dev_peak = r['jax'].get('device_peak_bytes_in_use')
    dev_text = f'{dev_peak / gib:.1f}' if dev_peak else 'n/a'
    for name, v in r['variants'].items():
      if 'compile_s' not in v:
        continue  # worker variants (other mallocs, PyTorch) belong to the CPU report
      label = (f'attention {r["config"]["attention_impl"]}' if name == r['main'] else
               name.replace('jax try model.attention_impl=', 'attention ').replace('jax ', ''))
      mfu = f'{100 * v["mfu"]:.1f}%' if 'mfu' in v else 'n/a'
      mem = v.get('memory_analysis_bytes') or {}
      xla = f'{mem["peak_estimate"] / gib:.2f}' if mem else 'n/a'
      lines.append(f'{r["config"]["size_name"]:6s} {label:36s} {1e3 * v["median_s"]:8.1f} '
                   f'{v["tokens_per_s"]:10,.0f} {mfu:>6s} {v["compile_s"]:9.1f} {xla:>12s} '
                   f'{dev_text:>15s}')
    for name, why in r.get('not_run', {}).items():
      if name.startswith('jax try'):
        lines.append(f'{r["config"]["size_name"]:6s} {name[len("jax try "):]}: not run: {why}')
  return '\n'.join(lines)


if __name__ == '__main__':
  # python -m gpas_jax.perf.bench_report RUN.json ...: the table of `python -m gpas_jax.perf.bench --json`s.
  runs_ = []
  for path_ in sys.argv[1:]:
    with open(path_, encoding='utf-8') as f_:
      runs_.append(json.loads(f_.read().strip().splitlines()[-1]))
  print(variant_table(runs_))
