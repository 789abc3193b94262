"""`python -m gpas_jax.analysis.compare --runs A B C --out DIR`: figures across runs.

Always the loss curves; when the runs have them, also the last step's per-layer activation
variance and gradient norms, and layer importance side by side (from each run's
analysis/importance.json, written by `python -m gpas_jax.analysis`).
"""

import os
from typing import Sequence

from absl import app
from absl import flags

from gpas_jax.analysis import plots
from gpas_jax.analysis import runs as runs_lib


def _labels(runs: list[runs_lib.RunDir]) -> list[str]:
  """The shortest label that tells the runs apart: norm_type/seed, plus size when sizes differ."""
  if len({r.size_name for r in runs}) > 1:
    labels = [r.label for r in runs]
  else:
    labels = [f'{r.norm_type}/seed{r.seed}' for r in runs]
  if len(set(labels)) < len(labels):  # Same settings in two places: fall back to the paths.
    labels = [os.path.relpath(r.path) for r in runs]
  return labels


def compare_runs(run_dirs: Sequence[str], out_dir: str,
                 labels: Sequence[str] | None = None) -> list[str]:
  """Writes the multi-run figures into out_dir; returns their paths."""
  runs = [runs_lib.load_run(p) for p in run_dirs]
  labels = list(labels) if labels else _labels(runs)
  os.makedirs(out_dir, exist_ok=True)
  written = [plots.loss_curves_plot({l: r.metrics() for l, r in zip(labels, runs)},
                                    os.path.join(out_dir, 'loss_curves.png'))]
  analyses = {l: r.analysis() for l, r in zip(labels, runs)}
  for key, fname, ylabel in (('act_var', 'act_var_by_layer.png', 'residual-stream variance'),
                             ('grad_norm', 'grad_norm_by_layer.png', 'gradient norm')):
    last = {l: recs[-1][key] for l, recs in analyses.items() if recs and key in recs[-1]}
    if last:
      written.append(plots.layer_profile_plot(
          last, os.path.join(out_dir, fname), ylabel, title=f'{ylabel} at the last analysis step'))
  importances = {}
  for l, r in zip(labels, runs):
    imp = runs_lib.read_json(os.path.join(r.path, 'analysis', 'importance.json'))
    if imp:
      importances[l] = imp['importance']
  if importances:
    written.append(plots.layer_importance_plot(importances,
                                               os.path.join(out_dir, 'layer_importance.png')))
  return written


def define_flags() -> None:
  """Defines this tool's flags (only when run as a program)."""
  flags.DEFINE_list('runs', None, 'Run directories (space- or comma-separated).', required=True)
  flags.DEFINE_string('out', None, 'Output folder.', required=True)
  flags.DEFINE_list('labels', None, 'Legend labels, one per run; default from the configs.')


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  # `--runs A B C`: absl leaves B and C as positional arguments; take them as runs too.
  for path in compare_runs(list(f.runs) + list(argv[1:]), f.out, f.labels):
    print(path)


if __name__ == '__main__':
  define_flags()
  app.run(main)
