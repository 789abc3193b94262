"""`python -m gpas_jax.analysis.compare --runs A B C --out DIR`: figures across runs.

Runs that differ only in their seed are one line: the mean over seeds with a +-1 std band
(error bars for layer importance). Always the loss curves; when the runs have them, also the
last analysis step's per-layer activation variance and gradient norms, the variance heatmaps
side by side on one colour scale, and layer importance (from each run's
analysis/importance.json, written by `python -m gpas_jax.analysis`). A run that lacks the data
of a figure is named on the console, never silently left out.
"""

import os
from typing import Sequence

from absl import flags

from gpas_jax.analysis import plots
from gpas_jax.analysis import runs as runs_lib
from gpas_jax.runtime import cli
from gpas_jax.runtime import console
from gpas_jax import storage


def _labels(runs: list[runs_lib.RunDir]) -> list[str]:
  """One label per run without its seed (seeds of a label are averaged): norm_type, plus the size
  when sizes differ; paths when two runs would otherwise be the same line."""
  if len({r.size_name for r in runs}) > 1:
    labels = [f'{r.size_name}/{r.norm_type}' for r in runs]
  else:
    labels = [r.norm_type for r in runs]
  keys = [(l, r.seed) for l, r in zip(labels, runs)]
  if len(set(keys)) < len(keys):  # Same settings and seed in two places: tell them apart.
    labels = [r.path if storage.is_url(r.path) else os.path.relpath(r.path) for r in runs]
  return labels


def _grouped(labels: Sequence[str], items: Sequence) -> dict[str, list]:
  out: dict[str, list] = {}
  for label, item in zip(labels, items):
    out.setdefault(label, []).append(item)
  return out


def _report_missing(what: str, missing: list[str], hint: str = '') -> None:
  if missing:
    console.say(f'{what}: left out {len(missing)} run(s) without the data: '
                f'{", ".join(missing)}{hint}')


def compare_runs(run_dirs: Sequence[str], out_dir: str,
                 labels: Sequence[str] | None = None) -> list[str]:
  """Writes the multi-run figures into out_dir; returns their paths."""
  runs = [runs_lib.load_run(p) for p in run_dirs]
  if labels and len(labels) != len(runs):
    raise cli.UserError(f'--labels: {len(labels)} labels for {len(runs)} runs; give one label '
                        'per run.')
  labels = list(labels) if labels else _labels(runs)
  if not any(labels.count(l) > 1 for l in labels):  # one run per line: say which seed it is
    labels = [f'{l} (seed {r.seed})' for l, r in zip(labels, runs)]
  storage.makedirs(out_dir)
  groups = _grouped(labels, runs)
  written = [plots.loss_curves_plot(
      {l: [r.metrics() for r in rs] for l, rs in groups.items()},
      os.path.join(out_dir, 'loss_curves.png'),
      title='Loss, mean ± std over seeds' if any(len(rs) > 1 for rs in groups.values())
      else 'Loss')]
  analyses = {r.path: r.analysis() for r in runs}
  no_analysis = [r.path for r in runs if not analyses[r.path]]
  _report_missing('per-layer figures', no_analysis,
                  ' (train with --config.analysis.every_steps=N to record them)')
  for key, fname, ylabel, embedding in (
      ('act_var', 'act_var_by_layer.png', 'residual-stream variance', True),
      ('grad_norm', 'grad_norm_by_layer.png', "L2 norm of the layer's gradients", False)):
    last = {l: [analyses[r.path][-1][key] for r in rs if analyses[r.path]]
            for l, rs in groups.items()}
    last = {l: v for l, v in last.items() if v}
    if last:
      steps = sorted({analyses[r.path][-1]['step'] for r in runs if analyses[r.path]})
      at = f'step {steps[0]}' if len(steps) == 1 else f'steps {steps[0]}..{steps[-1]}'
      written.append(plots.layer_profile_plot(
          last, os.path.join(out_dir, fname), ylabel, title=f'{ylabel} at {at}',
          embedding=embedding))
  heatmap_runs = {l: analyses[rs[0].path] for l, rs in groups.items() if analyses[rs[0].path]}
  if len(heatmap_runs) > 1:
    written.append(plots.activation_variance_heatmaps(
        {l if '(seed ' in l else f'{l} (seed {groups[l][0].seed})': recs
         for l, recs in heatmap_runs.items()},
        os.path.join(out_dir, 'act_var_heatmaps.png'),
        title='Residual-stream variance after each layer (one colour scale)'))
  importances, no_importance = {l: [] for l in groups}, []
  for l, r in zip(labels, runs):
    imp = storage.read_json(r.importance_path)
    if imp:
      importances[l].append(imp['importance'])
    else:
      no_importance.append(r.path)
  importances = {l: v for l, v in importances.items() if v}
  _report_missing('layer importance', no_importance,
                  ' (no analysis/importance.json: run `python -m gpas_jax.analysis --workdir RUN`)')
  if importances:
    written.append(plots.layer_importance_plot(importances,
                                               os.path.join(out_dir, 'layer_importance.png')))
  return written


def define_flags() -> None:
  """Defines this tool's flags (only when run as a program)."""
  flags.DEFINE_list('runs', None, 'Run directories (space- or comma-separated).', required=True)
  flags.DEFINE_string('out', None, 'Output folder.', required=True)
  flags.DEFINE_list('labels', None, 'Legend labels, one per run (runs with the same label are '
                    'averaged); default: norm_type (and size when sizes differ).')


def main(argv: Sequence[str]) -> None:
  console.quiet_logs()
  f = flags.FLAGS
  # `--runs A B C`: absl leaves B and C as positional arguments; take them as runs too.
  run_dirs = [cli.resolve_path(p) for p in list(f.runs) + list(argv[1:])]
  for path in compare_runs(run_dirs, cli.resolve_path(f.out), f.labels):
    print(path)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
