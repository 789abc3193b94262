"""`python -m gpas_jax.analysis.study --root RUNS --out DIR`: a seeded GPAS study's report.

For a sweep of base and +GPAS runs over several seeds (configs/sweeps/deep_cpu_study.py):
- table.md / table.csv: final eval perplexity, mean ± std per size and norm type (table.py);
- deltas.md / deltas.csv: each GPAS delta (GPAS minus base perplexity) paired by seed (same
  seed: the same data order and the same initial weights of every shared parameter), with its
  95% t interval and the paired t-test's two-sided p-value, plus Welch's unpaired p-value;
- downstream_deltas.md: the same paired deltas of each downstream score that
  gpas_jax.evals.harness recorded in the runs (downstream.json), when there are any;
- dynamics.md: per size and norm type, the last layer's variance at its peak and at the end,
  the variance spread over depth, first/last layer gradient norms and the final gates;
- per size: the compare figures (loss, per-layer variance and gradient norms, heatmaps on one
  scale, layer importance over seeds), the last layer's variance over training, and seed 0's
  per-run figures (variance heatmap, gradient norms, gates) under <size>/<norm_type>/.
Layer importance is computed from each run's last checkpoint when analysis/importance.json is
missing (`--importance_batches` eval batches each).
"""

import csv
import dataclasses
import io
import math
import os
import statistics
from typing import Any, Callable, Sequence

from absl import flags
import numpy as np
from scipy import stats as sp_stats

from gpas_jax import storage
from gpas_jax.analysis import cli
from gpas_jax.analysis import compare
from gpas_jax.analysis import plots
from gpas_jax.analysis import runs as runs_lib
from gpas_jax.analysis import table as table_lib
from gpas_jax.runtime import cli as cli_lib
from gpas_jax.runtime import console


@dataclasses.dataclass(frozen=True)
class Delta:
  """GPAS minus base final eval perplexity of one (size, base), over the seeds both finished."""
  size: str
  base: str
  seeds: tuple[int, ...]
  diffs: tuple[float, ...]  # per seed, GPAS - base
  base_values: tuple[float, ...]
  gpas_values: tuple[float, ...]

  @property
  def n(self) -> int:
    return len(self.diffs)

  @property
  def mean(self) -> float:
    return statistics.fmean(self.diffs)

  @property
  def std(self) -> float | None:
    return statistics.stdev(self.diffs) if self.n > 1 else None

  def interval(self, level: float = 0.95) -> tuple[float, float] | None:
    """The t interval of the mean paired difference (n - 1 degrees of freedom)."""
    if self.n < 2:
      return None
    half = sp_stats.t.ppf(0.5 + level / 2, self.n - 1) * self.std / math.sqrt(self.n)
    return self.mean - half, self.mean + half

  @property
  def p_paired(self) -> float | None:
    """Two-sided p of the paired t-test (NaN when every difference is equal)."""
    if self.n < 2:
      return None
    return float(sp_stats.ttest_rel(self.gpas_values, self.base_values).pvalue)

  @property
  def p_welch(self) -> float | None:
    """Two-sided p of Welch's unpaired t-test on the same perplexities."""
    if self.n < 2:
      return None
    return float(sp_stats.ttest_ind(self.gpas_values, self.base_values,
                                    equal_var=False).pvalue)


def paired_deltas(runs: Sequence[runs_lib.RunDir],
                  value_of: Callable[[runs_lib.RunDir], float | None] = runs_lib.RunDir.final_eval_ppl
                  ) -> list[Delta]:
  """One Delta per (size, base) that has finished base and GPAS runs of at least one shared seed;
  of the final eval perplexity, or of value_of(run) (a downstream score)."""
  ppl: dict[tuple[str, str, int], float] = {}
  for run in runs:
    value = value_of(run)
    if value is not None and math.isfinite(value):
      ppl[(run.size_name, run.norm_type, run.seed)] = value
  out = []
  sizes = sorted({k[0] for k in ppl}, key=table_lib.size_key)
  bases = sorted({k[1].removesuffix('_gpas') for k in ppl},
                 key=lambda b: (table_lib.BASES + (b,)).index(b))
  for size in sizes:
    for base in bases:
      seeds = tuple(sorted(k for (s, n, k) in ppl if s == size and n == base
                           and (size, f'{base}_gpas', k) in ppl))
      if not seeds:
        continue
      b = tuple(ppl[(size, base, k)] for k in seeds)
      g = tuple(ppl[(size, f'{base}_gpas', k)] for k in seeds)
      out.append(Delta(size, base, seeds, tuple(y - x for x, y in zip(b, g)), b, g))
  return out


def _fmt(x: float | None, spec: str = '+.2f') -> str:
  return '—' if x is None or not math.isfinite(x) else format(x, spec)


def deltas_markdown(deltas: Sequence[Delta], what: str = 'final eval perplexity',
                    better: str = 'negative', spec: str = '+.2f') -> str:
  """The deltas as a Markdown table."""
  lines = [f'GPAS minus base {what}, paired by seed ({better}: GPAS better). '
           '95% CI: t interval of the mean paired difference; p: two-sided paired t-test '
           "(Welch's unpaired test beside it).", '',
           '| size | architecture | seeds | per-seed deltas | mean delta | 95% CI | p (paired) | '
           'p (Welch) |', '|---|---|---|---|---|---|---|---|']
  for d in deltas:
    ci = d.interval()
    lines.append(
        f'| {d.size} | {d.base} vs {d.base}+GPAS | {",".join(map(str, d.seeds))} | '
        f'{", ".join(_fmt(x, spec) for x in d.diffs)} | {_fmt(d.mean, spec)} | '
        f'{"—" if ci is None else f"[{ci[0]:{spec}}, {ci[1]:{spec}}]"} | '
        f'{_fmt(d.p_paired, ".3f")} | {_fmt(d.p_welch, ".3f")} |')
  return '\n'.join(lines) + '\n'


def downstream_deltas_markdown(runs: Sequence[runs_lib.RunDir]) -> str:
  """Paired GPAS deltas of every downstream score the harness recorded ('' if none)."""
  metrics = sorted({m for r in runs for m in r.downstream() if not m.endswith('_stderr')})
  parts = []
  for m in metrics:
    lower = any(w in m for w in ('perplexity', 'bits_per_byte'))
    deltas = paired_deltas(runs, lambda r, m=m: r.downstream().get(m))
    parts.append(deltas_markdown(deltas, m, 'negative' if lower else 'positive', '+.3f'))
  return '\n'.join(parts)


def deltas_csv(deltas: Sequence[Delta]) -> str:
  """The deltas as CSV, one row per (size, base)."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator='\n')
  w.writerow(['size', 'base', 'n', 'seeds', 'diffs', 'mean', 'std', 'ci_low', 'ci_high',
              'p_paired', 'p_welch'])
  for d in deltas:
    ci = d.interval() or (None, None)
    w.writerow([d.size, d.base, d.n, ' '.join(map(str, d.seeds)),
                ' '.join(repr(x) for x in d.diffs), repr(d.mean),
                *('' if x is None else repr(float(x)) for x in (d.std, *ci, d.p_paired,
                                                                 d.p_welch))])
  return buf.getvalue()


def _mean_std(values: Sequence[float]) -> str:
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return '—'
  if len(values) == 1:
    return f'{values[0]:.3g}'
  return f'{statistics.fmean(values):.3g} ± {statistics.stdev(values):.2g}'


def dynamics_rows(runs: Sequence[runs_lib.RunDir]) -> list[dict[str, Any]]:
  """Per (size, norm_type), over seeds: the last layer's residual variance at its peak and at
  the end, the end's spread over depth (largest / smallest over layers 1..L), the last step's
  gradient norms of layer 1 and layer L, and the final gates' range (analysis.jsonl)."""
  groups: dict[tuple[str, str], list[list[dict[str, Any]]]] = {}
  for r in runs:
    records = r.analysis()  # parsed once per run
    if records:
      groups.setdefault((r.size_name, r.norm_type), []).append(records)
  rows = []
  for (size, norm_type), record_sets in sorted(
      groups.items(), key=lambda kv: (table_lib.size_key(kv[0][0]), kv[0][1])):
    peak, peak_step, end, spread, g_first, g_last, gates = [], [], [], [], [], [], []
    for recs in record_sets:
      last_L = [rec['act_var'][-1] for rec in recs]
      k = int(np.argmax(last_L))
      peak.append(last_L[k])
      peak_step.append(recs[k]['step'])
      act = np.asarray(recs[-1]['act_var'][1:], np.float64)
      end.append(float(act[-1]))
      spread.append(float(act.max() / act.min()))
      grads = recs[-1].get('grad_norm') or [math.nan]
      g_first.append(float(grads[0]))
      g_last.append(float(grads[-1]))
      if recs[-1].get('gate') is not None:
        gates.extend(np.asarray(recs[-1]['gate'], np.float64).reshape(-1).tolist())
    rows.append({
        'size': size, 'norm_type': norm_type, 'seeds': len(record_sets),
        'peak_var_last': _mean_std(peak), 'peak_step': ','.join(str(s) for s in peak_step),
        'end_var_last': _mean_std(end), 'end_depth_spread': _mean_std(spread),
        'end_grad_layer1': _mean_std(g_first), 'end_grad_layerL': _mean_std(g_last),
        'end_gates': (f'{min(gates):+.4f}..{max(gates):+.4f}' if gates else '—'),
        'step': recs[-1]['step']})
  return rows


def dynamics_markdown(rows: Sequence[dict[str, Any]]) -> str:
  """dynamics_rows as a Markdown table."""
  lines = ['Training dynamics from analysis.jsonl, mean ± std over seeds: the residual-stream '
           'variance after the last layer at its peak (and the steps of the peaks) and at the '
           'last record; the spread of the last record over depth (largest / smallest variance '
           'of layers 1..L); the gradient norms of layers 1 and L at the last record; all '
           "seeds' final gates (min..max).", '',
           '| size | norm type | seeds | peak last-layer var (steps) | final last-layer var | '
           'final depth spread | grad norm layer 1 | grad norm layer L | final gates | step |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['size']} | {r['norm_type']} | {r['seeds']} | {r['peak_var_last']} "
                 f"({r['peak_step']}) | {r['end_var_last']} | {r['end_depth_spread']} | "
                 f"{r['end_grad_layer1']} | {r['end_grad_layerL']} | {r['end_gates']} | "
                 f"{r['step']} |")
  return '\n'.join(lines) + '\n'


def variance_over_training_plot(groups: dict[str, list[runs_lib.RunDir]], path: str,
                                title: str) -> str:
  """The last layer's residual-stream variance against the step, mean ± std over seeds."""
  fig, (ax,) = plots._figure()  # pylint: disable=protected-access
  for label, rs in groups.items():
    record_sets = [recs for recs in (r.analysis() for r in rs) if recs]  # parsed once per run
    series = [plots._matrix(recs, 'act_var')  # pylint: disable=protected-access
              for recs in record_sets]
    if not series:
      continue
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in series)))
    rows = np.asarray([[v[list(s).index(t), -1] for t in common] for s, v in series])
    plots._plot_band(ax, np.asarray(common), rows, label)  # pylint: disable=protected-access
  ax.set_yscale('log')
  ax.set_xlabel('training step')
  ax.set_ylabel('residual-stream variance after the last layer')
  ax.set_title(title)
  if ax.get_legend_handles_labels()[0]:  # no run recorded per-layer data: no empty legend
    ax.legend(fontsize='small')
  return plots._save(fig, path)  # pylint: disable=protected-access


def ensure_importance(runs: Sequence[runs_lib.RunDir], batches: int) -> None:
  """Writes analysis/importance.json for each finished run that lacks it."""
  for run in runs:
    path = run.importance_path
    if run.finished and not storage.exists(path):
      with console.timed(f'layer importance of {run.path}'):
        imp = cli.run_importance(run.path, max_batches=batches)
      storage.write_json(path, imp)


def write_study(root: str, out_dir: str, importance_batches: int = 8,
                sweep: Any = None, extra: Sequence[tuple[str, Any]] = ()) -> list[str]:
  """Writes the tables and figures of the runs under root into out_dir; returns their paths.

  Runs whose recorded recipe differs from the sweep's (or, without a sweep, from the one most
  runs of their size share) are left out of every table and figure, and listed in table.md.
  """
  runs = sorted(runs_lib.find_runs(root), key=lambda r: r.path)
  if not runs:
    raise cli_lib.InputNotFound(f'no runs under {root} (no folder with a config.json that '
                                'train.py wrote); give the --root of the sweep.')
  storage.makedirs(out_dir)
  md, csv_path, table = table_lib.write_table(root, out_dir, sweep, extra)
  for path, diffs in table.mismatched:
    console.say(f'left out {path}: another recipe than {table.reference} ({"; ".join(diffs)})')
  runs = [r for r in runs if r.path not in table.left_out]
  deltas = paired_deltas(runs)
  written = [md, csv_path]
  downstream = downstream_deltas_markdown(runs)
  if downstream:
    storage.write_text(storage.join(out_dir, 'downstream_deltas.md'), downstream)
    written.append(storage.join(out_dir, 'downstream_deltas.md'))
  for name, text in (('deltas.md', deltas_markdown(deltas)), ('deltas.csv', deltas_csv(deltas)),
                     ('dynamics.md', dynamics_markdown(dynamics_rows(runs)))):
    storage.write_text(storage.join(out_dir, name), text)
    written.append(storage.join(out_dir, name))
  if importance_batches:
    ensure_importance(runs, importance_batches)
  for size in sorted({r.size_name for r in runs}, key=table_lib.size_key):
    of_size = [r for r in runs if r.size_name == size]
    size_dir = os.path.join(out_dir, size)
    written += compare.compare_runs([r.path for r in of_size], size_dir)
    groups: dict[str, list[runs_lib.RunDir]] = {}
    for r in sorted(of_size, key=lambda r: (r.norm_type, r.seed)):
      groups.setdefault(r.norm_type, []).append(r)
    written.append(variance_over_training_plot(
        groups, os.path.join(size_dir, 'last_layer_variance.png'),
        f'{size}: variance after the last layer over training'))
    for norm_type, rs in groups.items():
      written += cli.analyze_run(rs[0].path, os.path.join(size_dir, norm_type), importance=False)
  return written


def define_flags() -> None:
  """Defines this tool's flags (only when run as a program)."""
  flags.DEFINE_string('root', None, 'Folder searched (at any depth) for the runs.', required=True)
  flags.DEFINE_string('out', None, 'Output folder of the tables and figures.', required=True)
  flags.DEFINE_integer('importance_batches', 8, 'Eval batches per layer-importance measurement; '
                       '0 skips runs without analysis/importance.json.')
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file('sweep', None, 'The sweep config the runs come from: each '
                                  "run's recorded recipe is checked against it.")


def main(argv: Sequence[str]) -> None:
  console.quiet_logs()
  f = flags.FLAGS
  from gpas_jax.train import sweep as sweep_lib  # pylint: disable=import-outside-toplevel
  out = cli_lib.resolve_path(f.out)
  written = write_study(cli_lib.resolve_path(f.root), out, f.importance_batches, f.sweep,
                        sweep_lib.extra_overrides())
  print(storage.read_text(storage.join(out, 'deltas.md')))
  print(f'Wrote {len(written)} files under {out}.')


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  from gpas_jax.train import sweep as _sweep  # pylint: disable=g-import-not-at-top
  with cli_lib.readable_errors():
    sys.argv = _sweep.take_overrides(sys.argv)  # --sweep.overrides.<field>=v, as the sweep's
  define_flags()
  cli_lib.run(main, file_flags=('sweep',), positional=False)
